"""Curvature-Guided LoRA (CG-LoRA) in one file, derived in docs/cg-lora.md (cited as §N).

Part I is the default path, in the algorithm's order, each helper above its first use:
LoRA layer -> K-FAC statistics (§2; the model plumbing under them in its own section) ->
whitening (§3) -> top r -> balanced factors (§4) -> baselines (§6) -> init_adapters (§5), a loop
that computes each layer's factors and writes them with write_adapter. Part II is optional, each
piece a call of its own that the default path never enters: the damping choice (§8.1), the
diagnostics and the real loss (§8, §8.2), layers in groups, torchrun, peft.
Model-agnostic: any nn.Module whose target layers are nn.Linear. Only torch is needed.
"""
import collections
import contextlib
import inspect
import json
import math
import numbers
import os
import re
import time
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [  # the public API, in reading order
    "LoRALinear", "add_lora", "collect_statistics", "Statistics", "default_loss",
    "causal_lm_loss", "masked_lm_loss", "seq2seq_lm_loss", "cg_lora_factors", "lora_ga_factors",
    "lora_one_factors", "layer_factors", "write_adapter", "init_adapters", "choose_damping",
    "diagnose", "allocate_ranks", "real_decrease", "init_in_groups", "init_owned",
    "initialize_peft", "save_peft",
]

DAMPING = 1.0  # the relative damping lambda of S and T (§3); the rule that chose it: §8.1
DAMPING_GRID = tuple(10.0 ** k for k in range(-3, 4))  # choose_damping's default grid (§8.1)
METHODS = ("cg-lora", "cg-lora-shift", "lora", "rslora", "lora-ga", "lora-one")
RSLORA = {"cg-lora": True, "cg-lora-shift": True, "lora": False, "rslora": True,
          "lora-ga": False, "lora-one": True}  # scaling alpha/sqrt(r) (True) or alpha/r
SHIFTED = {"cg-lora-shift", "lora-ga"}  # these subtract s B A from W0 at init
LORA_ONE_GAMMA = 128  # LoRA-One's init scale: B, A divided by sqrt(sigma_1 * gamma)
LORA_GA_GAMMA = 16  # LoRA-GA's "stable" scale: B, A times d_out^(1/4) / sqrt(gamma)
_FINAL_TOL = 1e-8  # the init's top_r stop: its captured energy within 1e-6 of the exact (§3)
_FLUSH_ROWS = 512  # token rows gathered before the sums are updated (memory: rows x dim a layer)
_GRAM_BLOCKS, _GRAM_MIN_WIDTH = 4, 512  # Gram sums in row blocks; narrower ones in one block


# =================================================================================================
# Part I: the algorithm
# =================================================================================================


# ----------------------------------------------------------------------------- LoRA layer


def _base_shape(base):  # (d_out, d_in) of a base layer: nn.Linear, or transformers' Conv1D
    if type(base).__name__ == "Conv1D":  # GPT-2's: y = x @ weight + bias, weight d_in x d_out
        return base.weight.shape[1], base.weight.shape[0]
    return base.out_features, base.in_features  # a bitsandbytes layer's weight is packed


def _fixed_w0(layer):  # why a layer's W0 must not move (shift, merge): (what it is, what moving
    if getattr(layer, "tied", False):  # it would do), or None
        return "tied to another module's", "would change that module too"
    if not layer.base.weight.is_floating_point():  # bitsandbytes' packed uint8 / int8
        return (f"quantized ({layer.base.weight.dtype})",
                "would requantize it, a rounding the adapter cannot undo")
    return None


def _refuse_moving_w0(layer, doing, fix):  # LoRALinear.merge's and write_adapter's shift
    if why := _fixed_w0(layer):
        raise ValueError(f"base weight {why[0]}: {doing} {why[1]}: {fix}")


class LoRALinear(nn.Module):
    """y = base(x) + scaling * B A dropout(x), base frozen; peft's names and shapes. lora_A0,
    lora_B0: the factors a shifted init subtracted from W0 (else zero), so that always
    W_effective = W0_original + scaling * (B A - B0 A0)."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0, rslora=False):
        super().__init__()
        d_out, d_in = _base_shape(base)  # bitsandbytes: a packed weight, factors at compute_dtype
        if not (isinstance(rank, numbers.Integral) and 0 < rank <= min(d_in, d_out)):
            raise ValueError(f"rank {rank!r} must be an integer in 1..min(d_in, d_out) = "
                             f"{min(d_in, d_out)}")
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.dropout = nn.Dropout(dropout)
        dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
        kw = dict(device=base.weight.device, dtype=getattr(base, "compute_dtype", None) or dtype)
        bound = 1 / math.sqrt(d_in)  # = kaiming_uniform_(a=sqrt(5)), the nn.Linear / LoRA default
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, **kw).uniform_(-bound, bound))  # r x in
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, **kw))  # out x r: zero, so y = base(x)
        self.register_buffer("lora_A0", torch.zeros(rank, d_in, **kw))
        self.register_buffer("lora_B0", torch.zeros(d_out, rank, **kw))
        self.merged = False
        self.tied = False  # add_lora: base.weight is another module's too (tied embeddings)

    def delta_weight(self):  # out x in, the update this adapter adds to base.weight
        return self.scaling * (self.lora_B @ self.lora_A)

    def merge(self):
        _refuse_moving_w0(self, "merging", "keep the adapter unmerged")
        if not self.merged:
            self.base.weight.data += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    def unmerge(self):
        if self.merged:
            self.base.weight.data -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def forward(self, x):  # the adapter at its factors' dtype (fp32 on a bf16 base, as peft keeps
        y, x = self.base(x), self.dropout(x).to(self.lora_A.dtype)  # them), the sum at the base's
        lora = 0.0 if self.merged else F.linear(F.linear(x, self.lora_A), self.lora_B)
        return (y + self.scaling * lora).to(y.dtype)


def target_layers(model, names, kind):
    """The modules of type `kind` whose full name or last component is in `names`."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, kind)}
    hits = {n: m for n, m in found.items() if n in names or n.rsplit(".", 1)[-1] in names}
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in hits)]
    other = [(n, m) for n, m in model.named_modules() for t in missing
             if n == t or n.endswith("." + t)]
    if other:  # e.g. transformers' Conv1D (GPT-2): the name is right, the type is not
        n, m = other[0]
        if isinstance(m, LoRALinear):
            raise ValueError(f"layer {n} already has a LoRA adapter (LoRALinear); add_lora wraps a "
                             "layer once: target other layers, or start from the model without")
        fix = ("swap it for an nn.Linear with weight = conv.weight.T and the same bias (Conv1D "
               "computes x @ weight + bias)" if type(m).__name__ == "Conv1D"
               else f"target the nn.{kind.__name__} layers inside it")
        raise ValueError(f"layer {n} is {type(m).__name__}, not nn.{kind.__name__}, and only "
                         f"nn.{kind.__name__} layers can be targets: {fix}")
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in found})
        raise ValueError(f"targets {missing} match no {kind.__name__} layer; "
                         f"the model has {short} (full names like {next(iter(found), None)!r})")
    return hits


def add_lora(model, targets, rank, alpha, dropout=0.0, rslora=False, trainable=()):
    """Swap the nn.Linear layers named in `targets` (full name or last component, e.g. "query";
    one may be a string) for LoRALinear of `rank` (one r, or {full name: r}: allocate_ranks'),
    freeze every other parameter but `trainable`'s (e.g. a head); return {name: LoRALinear}."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    targets = target_layers(model, targets, nn.Linear)  # first: a bad target leaves the model alone
    ranks = rank if isinstance(rank, Mapping) else dict.fromkeys(targets, rank)
    if ranks.keys() != targets.keys():
        raise ValueError(f"rank gives no rank to layers {[n for n in targets if n not in ranks]} "
                         f"and one to non-targets {[n for n in ranks if n not in targets]}: give "
                         "one r, or {full name: r} for exactly the targets")
    layers, train = {}, []  # every check (ranks, trainable names) before the model changes
    for name, linear in targets.items():
        try:
            layers[name] = LoRALinear(linear, ranks[name], alpha, dropout, rslora)
        except ValueError as e:
            raise ValueError(f"layer {name}: {e}") from None
    for name in trainable:
        modules = [m for n, m in model.named_modules() if n == name or n.endswith("." + name)]
        if not modules:
            raise ValueError(f"trainable module {name!r} not found in the model")
        train += modules
    uses = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        layer.tied = uses[id(layer.base.weight)] > 1  # another module uses it too
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    for m in train:
        m.requires_grad_(True)
    return layers


# ----------------------------------------------------------------- the plumbing of the statistics
# Not the algorithm: what collect_statistics needs of the model, of autocast and of torchrun. What
# it guarantees, whatever the model: hooks and flags restored on exit; G and T exact for the loss
# it computes, over every token row of every call of a target; a mask keeps rows out of S only,
# and only where the call's input comes from the batch; a transformers LM gets its own token loss
# (§9); fp32 under autocast; under torchrun each layer's sums on one owner. What cannot be made
# exact is refused in one line.


@contextlib.contextmanager
def _fp32():  # autocast off (CPU, CUDA): statistics, factorizations stay fp32 (§2); or @_fp32()
    with contextlib.ExitStack() as stack:
        for kind in ("cpu", "cuda"):
            if torch.is_autocast_enabled(kind):
                stack.enter_context(torch.autocast(kind, enabled=False))
        yield


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank_and_world():  # this process's rank and the number of processes
    return (torch.distributed.get_rank(),
            torch.distributed.get_world_size()) if _distributed() else (0, 1)


def _comm(t):  # where a collective can take t: the current GPU under nccl, else where it is
    nccl = torch.distributed.get_backend() == "nccl"
    return t.to(torch.device("cuda", torch.cuda.current_device())) if nccl else t


def _to_owners(sums, counts, share):
    """(counts, owner, this rank): the i-th distinct input's layers owned by rank i mod world (as
    KAISA places K-FAC work); under torchrun each sum reduced to its owner (freed elsewhere; a fold
    without batches here adds zeros) and the counts to every rank."""
    (proc, world), inputs = _rank_and_world(), list(dict.fromkeys(share.values()))
    owner = {name: inputs.index(key) % world for name, key in share.items()}
    if world == 1:
        return counts, owner, proc
    torch.distributed.all_reduce(counts := _comm(counts))
    for j in range(3):
        like = {k: t.new_zeros(()).expand(t.shape)  # zeros for a fold without batches here
                for k, t in next(f[j].total for f in sums if f[j].total).items()}
        for fold in sums:
            for key in sorted(like):
                t = _comm(fold[j].total.get(key, like[key]).contiguous())
                torch.distributed.reduce(t, owner[key])
                if owner[key] == proc:
                    fold[j].total[key] = t.to(like[key].device)
                else:
                    fold[j].total.pop(key, None)
    return counts.cpu(), owner, proc


def _labels(batch, i):  # calibration batch i's labels, once it is a dict that has them
    if not isinstance(batch, Mapping):
        raise TypeError("batches must be an iterable of dicts (a list of batches, not one batch: "
                        f"[batch]); item {i} is {type(batch).__name__} {str(batch)[:40]!r}")
    if "labels" not in batch:
        raise ValueError(f"batch {i} has no 'labels' (it has {sorted(batch)}): each batch needs "
                         "the targets of its loss under 'labels'")
    return batch["labels"]


def _logits(out):
    """A model's output -> its logits: a tensor; .logits or a dict's "logits"; a tuple's first
    tensor that is not a scalar (transformers' return_dict=False puts a loss first)."""
    if isinstance(out, Mapping) and "logits" in out or getattr(out, "logits", None) is not None:
        return out["logits"] if isinstance(out, Mapping) else out.logits
    if isinstance(out, (tuple, list)):
        out = next((t for t in out if torch.is_tensor(t) and t.dim() > 0), out)
    if not torch.is_tensor(out):
        keys = f" with keys {list(out)}" if isinstance(out, Mapping) else ""
        raise TypeError(f"the model returned {type(out).__name__}{keys}: the loss needs logits, "
                        "returned as a tensor, a tuple's first tensor or a dict's 'logits'")
    return out


def _encoder(model):  # an encoder-decoder's encoder (transformers' get_encoder()), else None;
    for m in model.modules():  # the model itself, or inside a wrapper of the caller's
        if getattr(getattr(m, "config", None), "is_encoder_decoder", False):
            encoder = m.get_encoder()
            return None if encoder is m else encoder
    return None


def _model_inputs(batch, loss, encoder=None):
    """model(**inputs)'s inputs: the batch without its labels, unless loss.model_labels (an
    encoder-decoder builds its decoder inputs from them)."""
    if getattr(loss, "model_labels", False):
        return dict(batch)
    if encoder is not None and batch["labels"].dim() == 2 and not (
            {"decoder_input_ids", "decoder_inputs_embeds"} & set(batch)):
        raise ValueError("token labels [batch, length] on an encoder-decoder model with no "
                         "decoder_input_ids: pass loss=cglora.seq2seq_lm_loss, which gives the "
                         "labels to the model to build them")
    return {k: v for k, v in batch.items() if k != "labels"}


def _shared_inputs(seen, names):  # layers whose inputs are the same tensors (every call) share S
    first = {}
    return {name: first.setdefault(tuple(id(c[0]) for c in seen[name]), name) for name in names}


def _tokens(t, keep=None):  # [batch, length, dim] -> [tokens keep marks, dim] in fp32; no mask,
    fits = keep is not None and t.dim() == 3 and keep.shape == t.shape[:2]  # or one that does not
    return (t[keep.to(t.device)] if fits else t.reshape(-1, t.shape[-1])).float()  # fit: every row


def _rows(tensors, keeps=None):  # a layer's calls -> their token rows (each call's mask kept)
    return torch.cat([_tokens(t, k) for t, k in zip(tensors, keeps or [None] * len(tensors))])


def _masks(batch, labels, encoder):
    """The batch's token masks by name (§2): attention_mask; an encoder-decoder's
    decoder_attention_mask, else its target tokens (labels other than IGNORE)."""
    masks = {k: batch[k].bool() for k in ("attention_mask", "decoder_attention_mask")
             if batch.get(k) is not None}
    if encoder is not None and labels.dim() == 2:
        masks.setdefault("decoder_attention_mask", labels != IGNORE)
    return masks


@contextlib.contextmanager
def _recording(model, layers, encoder=None):
    """While open, the model is frozen, in eval mode, and each of `layers` records every call in
    seen[name] as [input, output, mask]: the batch mask that indexes the input's rows (§2), or None
    for an input not from the batch (run(inputs) traces it: float inputs, nn.Embedding outputs
    require grad); after an encoder, the decoder's mask unless the input is the encoder's output."""
    flags, was_training = [(p, p.requires_grad) for p in model.parameters()], model.training
    # name -> calls; id(input) -> (input, alias); the encoder's output; where the batch entered
    seen, alias, encoded, traced = {}, {}, [], []

    def pre_hook(module, inputs):  # frozen weights: backward needs an input that requires grad
        if not torch.is_grad_enabled() or inputs[0].requires_grad:
            return None
        key = id(inputs[0])  # one alias per tensor, so layers sharing an input still share it
        alias.setdefault(key, (inputs[0], inputs[0].detach().requires_grad_()))
        return (alias[key][1],) + tuple(inputs[1:])

    def hook(name):
        def record(module, inputs, output):
            x = next((x for x, a in alias.values() if a is inputs[0]), inputs[0])  # before alias
            mask = "decoder_attention_mask" if encoded and encoded[0] is not x else "attention_mask"
            seen.setdefault(name, []).append([inputs[0], output, mask, x.requires_grad])
        return record

    def embedded(module, inputs, output):  # the batch's tokens enter: what they reach needs grad
        if torch.is_grad_enabled() and output.is_floating_point() and not output.requires_grad:
            traced.append(module)
            return output.requires_grad_()
        return None

    def run(inputs):  # model(**inputs), the batch traced; then each call's mask, or None
        floats = {k for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point()}
        traced.extend(floats)
        out = model(**{k: v.detach().requires_grad_() if k in floats else v
                       for k, v in inputs.items()})
        for call in (c for calls in seen.values() for c in calls):
            call[2] = call[2] if call.pop() or not traced else None
        return out

    handles = [h for name, m in layers.items() for h in (m.register_forward_pre_hook(pre_hook),
                                                          m.register_forward_hook(hook(name)))]
    handles += [m.register_forward_hook(embedded) for m in model.modules()
                if isinstance(m, nn.Embedding)]
    if encoder is not None:  # its output: a ModelOutput or a tuple, the hidden states first
        handles.append(encoder.register_forward_hook(lambda m, i, out: encoded.append(out[0])))
    try:
        model.requires_grad_(False).eval()
        yield seen, run, lambda: (seen.clear(), alias.clear(), encoded.clear(), traced.clear())
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _output_gradients(loss, out, labels, ys, fisher, generator):
    """d(batch loss)/dy for each target output y (None where y does not reach the loss), for G;
    for T the same with labels drawn from the model (fisher="sampled"), else Nones (G's serve)."""
    delta = torch.autograd.grad(loss(out, labels), ys, allow_unused=True,
                                retain_graph=fisher == "sampled")
    if fisher != "sampled":
        return delta, [None] * len(ys)
    return delta, torch.autograd.grad(loss(out, loss.sample(out, labels, generator)), ys,
                                      allow_unused=True)


# ----------------------------------------------------------------------------- losses (§2, §9)


class Loss:
    """What collect_statistics needs of a loss (any callable(output, labels) returning the batch
    mean works): terms(labels), the loss terms of that mean; sample(output, labels, generator),
    labels drawn from the model (fisher="sampled"); model_labels: the model takes the labels."""
    model_labels = False

    def terms(self, labels):
        return len(labels)


class ExampleLoss(Loss):
    """One term per example: MSE for float labels (one regression target each), cross entropy for
    class labels (labels [batch] or [batch, 1], as transformers accepts)."""

    def __call__(self, out, labels):
        if labels.dim() == 2 and labels.shape[1] == 1 and out.dim() == 2:  # [batch, 1]
            labels = labels[:, 0]
        if labels.is_floating_point() and (labels.dim() != 1 or out.squeeze(-1).shape !=
                                           labels.shape):  # never MSE on logits
            one_hot = labels.dim() == 2 and ((labels == 0) | (labels == 1)).all() and (
                labels.sum(-1) == 1).all()
            bce = "loss=lambda out, y: torch.nn.functional.binary_cross_entropy_with_logits(out, y)"
            raise ValueError("the default loss takes float labels as one regression target per "
                             "example ([batch], MSE against an output [batch, 1]), got "
                             f"{list(labels.shape)} and {list(out.shape)}: " + (
                                 "for one-hot class labels trained with cross entropy: pass "
                                 "labels.argmax(-1); with a binary loss (transformers' own on "
                                 f"float labels): pass {bce}" if one_hot
                                 else f"for multi-label targets: pass {bce}"))
        if labels.is_floating_point():
            return F.mse_loss(out.squeeze(-1).float(), labels.float())
        if out.dim() != 2 or labels.dim() != 1:  # cross_entropy would read [b, L, V] as L classes
            raise ValueError("the default loss takes logits [batch, classes] and labels [batch], "
                             f"got {list(out.shape)} and {list(labels.shape)}: " + (
                                 _LM_LOSSES if out.dim() == 3 else "pass a loss(output, labels) "
                                 "returning the batch mean"))
        return F.cross_entropy(out.float(), labels)

    def sample(self, out, labels, generator):  # categorical, or y ~ N(f(x), 1) (§2); CPU draws
        out, labels = out.detach().float().cpu(), labels.flatten() if labels.dim() == 2 else labels
        if labels.is_floating_point():
            drawn = out.squeeze(-1) + torch.randn(out.shape[0], generator=generator)
        else:
            drawn = torch.multinomial(out.softmax(-1), 1, generator=generator).squeeze(-1)
        return drawn.to(labels.device)


IGNORE = -100  # a label that takes no part in a token-level loss (Hugging Face's ignore_index)
_LM_LOSSES = ("token logits need a token loss: loss=cglora.causal_lm_loss where position t "
              "predicts token t + 1 (a causal LM), cglora.masked_lm_loss where it predicts its own "
              "label (a masked LM), cglora.seq2seq_lm_loss for an encoder-decoder")


class TokenLoss(Loss):
    """Hugging Face's token-level LM loss (§9): logits [b, L, V] at position t predict
    labels[:, t + shift] (labels [b, L] aligned with the inputs), labels equal to IGNORE take no
    part, and the result is the mean over the batch's target tokens: one loss term per target."""

    def __init__(self, shift, model_labels=False):
        self.shift, self.model_labels = shift, model_labels

    def __call__(self, logits, labels):
        logits, labels = logits[:, :logits.shape[1] - self.shift], labels[:, self.shift:]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)

    def terms(self, labels):
        return (labels[:, self.shift:] != IGNORE).sum()

    def sample(self, logits, labels, generator):  # each target from the softmax at its position
        target = labels[:, self.shift:] != IGNORE  # b x (L - shift)
        probs = logits[:, :logits.shape[1] - self.shift][target].detach().float().cpu().softmax(-1)
        sampled = labels.clone()
        draws = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        sampled[:, self.shift:][target] = draws.to(labels.device)
        return sampled


default_loss = ExampleLoss()  # collect_statistics' default, unless the model is a transformers LM
causal_lm_loss = TokenLoss(shift=1)  # a causal LM: position t predicts token t + 1
masked_lm_loss = TokenLoss(shift=0)  # a masked LM: position t predicts its own label
# an encoder-decoder (T5, BART): the labels go to the model, which builds its decoder inputs
seq2seq_lm_loss = TokenLoss(shift=0, model_labels=True)


def _lm_loss(model):  # a Hugging Face LM's loss (§9), known by its class and config; else None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = type(base).__name__
    # GPT-2 and its kin are *LMHeadModel; XLNet's LM head predicts each position's own label
    if kind.endswith("ForCausalLM") or kind.endswith("LMHeadModel") and kind != "XLNetLMHeadModel":
        return causal_lm_loss
    if kind.endswith("ForMaskedLM"):
        return masked_lm_loss
    return seq2seq_lm_loss if kind.endswith("ForConditionalGeneration") and _encoder(base) else None


def _check_statistics(model, loss, fisher, folds):  # collect_statistics' options; its loss
    loss = loss or _lm_loss(model) or default_loss
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        raise RuntimeError("collect_statistics backpropagates the loss to each target's output: "
                           "call it outside torch.no_grad() and torch.inference_mode()")
    if fisher not in ("empirical", "sampled") or fisher == "sampled" and not hasattr(loss,
                                                                                     "sample"):
        raise ValueError(f"fisher must be 'empirical' or 'sampled' (with a loss that has a "
                         f".sample(output, labels, generator), as cglora's), got {fisher!r}")
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    return loss


# ----------------------------------------------------------------------------- §2 statistics


def _blocks(d):  # _GRAM_BLOCKS row blocks of a d x d Gram sum (one below _GRAM_MIN_WIDTH)
    k = _GRAM_BLOCKS if d >= _GRAM_MIN_WIDTH else 1
    return [(i * d // k, (i + 1) * d // k) for i in range(k)]


class _Sums:
    """Running sums of a^T b over token rows, on `device`, one matmul per _FLUSH_ROWS rows; a Gram
    sum a^T a (b=None) in its lower block triangle (5/8 of the work), mirrored by symmetric()."""

    def __init__(self, device=None):
        self.total, self.rows, self.count, self.device = {}, {}, {}, device

    def add(self, key, a, b=None):
        self.rows.setdefault(key, []).append((a, b))
        self.count[key] = self.count.get(key, 0) + a.shape[0]

    @torch.no_grad()
    @_fp32()
    def flush(self):
        for key, pairs in self.rows.items():
            a = torch.cat([p[0] for p in pairs]).to(self.device)
            b = None if pairs[0][1] is None else torch.cat([p[1] for p in pairs]).to(self.device)
            if key not in self.total:
                self.total[key] = a.new_zeros(a.shape[1], (a if b is None else b).shape[1])
            if b is not None:
                self.total[key].addmm_(a.T, b)
                continue
            for i, j in _blocks(a.shape[1]):  # row block i..j of the lower triangle: a_i^T a_:j
                self.total[key][i:j, :j].addmm_(a[:, i:j].T, a[:, :j])
        self.rows.clear()

    def symmetric(self):  # each (Gram) sum's upper blocks from its lower ones
        for total in self.total.values():
            for i, j in _blocks(total.shape[0]):
                total[i:j, j:] = total[j:, i:j].T


class Statistics(NamedTuple):
    """One layer's K-FAC statistics (§2), fp32, as collect_statistics returns them."""
    S: torch.Tensor  # d_in x d_in: mean of x x^T over the token rows the masks keep
    G: torch.Tensor  # d_out x d_in: mean over loss terms of sum_t delta_t x_t^T
    T: torch.Tensor  # d_out x d_out: mean over loss terms of sum_t delta_t delta_t^T
    n: float  # loss terms (examples, or target tokens)
    tokens: float  # token rows behind S
    input: str  # the first target fed the same input: layers with one input share S (a tensor)
    owner: int = 0  # torchrun: the rank that holds S, G, T (None on the others)
    folds: tuple = ()  # with folds=K >= 2: K Statistics, batch i in fold i mod K (§8.1)


def pool(folds, S=None):  # the union of folds: S by tokens (or `S`, pooled for its input), G, T
    # weighted by loss terms
    if len(folds) == 1:
        return folds[0]
    n, tokens = sum(f.n for f in folds), sum(f.tokens for f in folds)
    S = sum(f.S * (f.tokens / tokens) for f in folds) if S is None else S
    G = sum(f.G * (f.n / n) for f in folds)
    T = sum(f.T * (f.n / n) for f in folds)
    return Statistics(S, G, T, n, tokens, folds[0].input, folds[0].owner)


def _normalise(sums, n, share):
    """Per-fold sums -> {name: Statistics}: on each layer's owner (torchrun), divided by the
    counts; with K >= 2 folds pooled (one S per input) and kept per fold too."""
    if not share:
        raise ValueError("collect_statistics got no calibration batches")
    keys = sorted(set(share.values()))
    counts = torch.tensor([[float(n_k)] + [float(fold[0].count.get(k, 0)) for k in keys]
                           for n_k, fold in zip(n, sums)], dtype=torch.float64)
    counts, owner, proc = _to_owners(sums, counts, share)
    if (counts[:, 0] == 0).any():  # no loss term in a fold: no batch, or every label ignored
        raise ValueError(f"a fold has no loss terms: {len(sums)} folds need at least {len(sums)} "
                         f"batches with labels not all {IGNORE}: pass more, or fewer folds")
    folds = []
    for (S, G, T), (terms, *rows) in zip(sums, counts.tolist()):
        tokens = dict(zip(keys, rows))
        for key, total in S.total.items():  # in place: the statistics are the largest thing here
            total.div_(max(tokens[key], 1))
        for total in (*G.total.values(), *T.total.values()):
            total.div_(terms)
        folds.append({name: Statistics(S.total[key], G.total[name], T.total[name], terms,
                                       tokens[key], key, proc)
                      for name, key in share.items() if owner[name] == proc})
    stats = {}
    for name, key in share.items():
        per_fold = tuple(fold[name] for fold in folds if name in fold)
        if not per_fold:  # another rank's
            stats[name] = Statistics(None, None, None, 0.0, 0.0, key, owner[name])
        elif len(folds) == 1:
            stats[name] = per_fold[0]
        else:  # the input's S pooled once, by its first layer
            S = stats[key].S if key != name else None
            stats[name] = pool(per_fold, S)._replace(folds=per_fold)
    return stats


def _add_batch(sums, calls, share, out, labels, masks, loss, fisher, generator):
    """One batch into one fold's sums (S, G, T): into S the input rows the masks keep, into G and T
    every row (§2). Returns the batch's loss terms and its most rows of an input."""
    S, G, T = sums
    xs = {key: [c[0].detach() for c in calls[key]] for key in dict.fromkeys(share.values())}
    for key, inputs in xs.items():  # sum_t x x^T (d_in x d_in) over each call's kept tokens
        S.add(key, _rows(inputs, [masks.get(c[2]) for c in calls[key]]))
    x = {key: _rows(inputs) for key, inputs in xs.items()}
    ys = [y for name in share for _, y, _ in calls[name]]
    n_b = int(getattr(loss, "terms", len)(labels))
    delta, delta_T = (iter(g) for g in _output_gradients(loss, out, labels.to(out.device), ys,
                                                          fisher, generator))
    for name in share:  # a layer called k times: G, T sum over its k calls (shared weights, §2)
        # d(mean loss)/dy * n_b = d(own loss)/dy per loss term (None: y does not reach the loss)
        rows = (_rows([torch.zeros_like(y) if g is None else g * n_b
                       for (_, y, _), g in zip(calls[name], grads)])
                for grads in (delta, delta_T))
        d = next(rows)  # G's rows, then (sampled) T's
        G.add(name, d, x[share[name]])  # sum_i sum_t delta x^T  (d_out x d_in)
        T.add(name, next(rows) if fisher == "sampled" else d)  # sum delta delta^T
    return n_b, max(r.shape[0] for r in x.values())


def collect_statistics(model, layers, batches, *, loss=None, fisher="empirical", folds=1,
                       generator=None, device=None, progress=None):
    """Streaming K-FAC statistics (§2) of `layers` ({name: nn.Linear}) over calibration batches.

    A batch is a dict: "labels" the targets; "attention_mask" (1 = real token) keeps padding out of
    S (a decoder's: "decoder_attention_mask", else labels other than IGNORE), never out of G or T;
    the rest goes to model(**inputs). loss(output, labels): the batch mean over loss.terms(labels)
    terms (default: a transformers LM's own, §9, else cross entropy, or MSE for float labels).
    fisher="sampled" draws T's labels with loss.sample. folds=K >= 2 keeps each fold's statistics
    too (batch i in fold i mod K). progress(i) is called before batch i; `device` holds the sums.
    Under torchrun rank r's i-th batch is batch r + i * world, and the i-th distinct input's layers
    are owned by rank i mod world (as KAISA places K-FAC work). Returns {name: Statistics}."""
    loss = _check_statistics(model, loss, fisher, folds)
    generator = generator or torch.Generator().manual_seed(0)
    proc, world = _rank_and_world()
    sums = [(_Sums(device), _Sums(device), _Sums(device)) for _ in range(folds)]  # S, G, T
    n, share, pending, encoder = [0] * folds, {}, 0, _encoder(model)
    flush = lambda: [s.flush() for fold in sums for s in fold] and 0  # noqa: E731  (-> 0 rows)
    with _recording(model, layers, encoder) as (seen, run, reset):
        for i, batch in enumerate(batches):
            if progress:
                progress(i)
            labels = _labels(batch, i)
            out = _logits(run(_model_inputs(batch, loss, encoder)))
            calls = dict(seen)  # {layer: its calls' [input, output, mask]}
            reset()
            if missing := [name for name in layers if name not in calls]:
                raise ValueError(f"layers {missing} were not called in the forward pass")
            share = share or _shared_inputs(calls, layers)  # {layer: the first layer of its input}
            fold = (proc + i * world) % folds  # the global batch index decides the fold
            n_b, rows = _add_batch(sums[fold], calls, share, out, labels,
                                   _masks(batch, labels, encoder), loss, fisher, generator)
            n[fold], pending = n[fold] + n_b, pending + rows
            if pending >= _FLUSH_ROWS:
                pending = flush()
        flush()
    for S, _, T in sums:
        S.symmetric()
        T.symmetric()
    return _normalise(sums, n, share)


# ----------------------------------------------------------------------------- §3 whitening


def damped_cholesky(X, damping=DAMPING):
    """L, lower triangular, with L L^T = X_l = X + damping (tr X / d) I (§3; tr X / d taken as 1
    when X = 0)."""
    scale = X.trace() / X.shape[0]
    X = X.clone()
    X.diagonal().add_(damping * (scale if scale > 0 else 1.0))
    L, info = torch.linalg.cholesky_ex(X)
    if info.item() != 0:
        raise ValueError(f"damped statistics are not positive definite (damping={damping}): "
                         "use damping > 0")
    return L


def whiten(G, S, T, damping=DAMPING, L_S=None):
    """Cholesky factors of the damped metrics, S_l = L_S L_S^T and T_l = L_T L_T^T, and M =
    L_T^-1 G L_S^-T: T_l^-1/2 G S_l^-1/2's singular values (orthogonal factors apart), by two
    triangular solves, no inverse, no eigh. L_S: S's factor if computed (one per input)."""
    L_S = damped_cholesky(S, damping) if L_S is None else L_S
    L_T = damped_cholesky(T, damping)
    M = torch.linalg.solve_triangular(L_T, G, upper=False)  # L_T^-1 G
    M = torch.linalg.solve_triangular(L_S, M.T, upper=False).T  # (L_S^-1 (L_T^-1 G)^T)^T
    return M, L_T, L_S


# ----------------------------------------------------------------------------- top r


def top_svd(M, k):
    """The exact top-k singular triplets (U d_out x k, sigma k, V d_in x k) by a full SVD (§3: real
    spectra are flat), each pair's sign fixed so that the largest entry of u_i is positive."""
    U, sigma, Vh = torch.linalg.svd(M, full_matrices=False)
    U, sigma, V = U[:, :k], sigma[:k], Vh[:k].T
    sign = U.gather(0, U.abs().argmax(0, keepdim=True)).sign()  # never 0: a column has unit norm
    return U * sign, sigma, V * sign


def top_r(M, rank, start=None, tol=1e-4, max_iters=300, generator=None):
    """The top-r singular triplets of M (as top_svd) by block subspace iteration (block 2r,
    Rayleigh-Ritz), O(d^2 r) an iteration, stopped when the captured energy sum sigma_i^2 changes by
    less than `tol` relative (§3: met fast on flat spectra). Also returns the block (d_in x 2r), to
    warm-start a nearby matrix; the first start is a seeded random block."""
    p = min(2 * rank, *M.shape)
    if start is None:  # drawn by a CPU generator, then moved: one seed, one block on any device
        start = torch.linalg.qr(torch.randn(M.shape[1], p, dtype=M.dtype, generator=generator
                                            or torch.Generator().manual_seed(0)).to(M.device)).Q
    V, energy = start, None
    for _ in range(max_iters):
        Q = torch.linalg.qr(M @ V).Q  # d_out x p, the range of M V
        V, R = torch.linalg.qr(M.T @ Q)  # Q^T M = R^T V^T: its singular values are the Ritz values
        u, sigma, vh = torch.linalg.svd(R.T)
        captured = sigma[:rank].square().sum()
        if energy is not None and abs(captured - energy) <= tol * captured:
            break
        energy = captured
    V = V @ vh.T  # Ritz vectors, in descending order
    return Q @ u[:, :rank], sigma[:rank], V[:, :rank], V


# ----------------------------------------------------------------------------- §4 balanced factors


@_fp32()
def cg_lora_factors(G, S, T, rank, damping=DAMPING, step=1.0, scaling=1.0, tol=None, L_S=None):
    """CG-LoRA factors (§3-4): scaling * B @ A = step * dW_r, the best rank-r K-FAC Newton step,
    B = -sqrt(step/s) L_T^-T U_r S_r^1/2,  A = sqrt(step/s) S_r^1/2 V_r^T L_S^-1 for the top r of
    the whitened gradient M = U S V^T (whiten); a zero gradient gives zero factors. G: d_out x
    d_in, S: d_in x d_in, T: d_out x d_out; tol: None, M's exact top r (top_svd), else top_r's;
    L_S: S's damped Cholesky factor, if computed. Returns (B d_out x r, A r x d_in, sigma, energy):
    sigma_i^2 / 2 is direction i's predicted loss decrease, energy = ||M||_F^2 their total."""
    if not 0 < rank <= min(G.shape):
        raise ValueError(f"rank {rank} must be in 1..min(d_out, d_in) = {min(G.shape)}")
    dtype = torch.float64 if G.dtype == torch.float64 else torch.float32  # fp32 at least
    M, L_T, L_S = whiten(G.to(dtype), S.to(dtype), T.to(dtype), damping, L_S)
    U, sigma, V = top_svd(M, rank) if tol is None else top_r(M, rank, tol=tol)[:3]
    root, c = sigma.sqrt(), math.sqrt(step / scaling)
    B = -c * torch.linalg.solve_triangular(L_T.T, U * root, upper=True)  # d_out x r
    A = c * torch.linalg.solve_triangular(L_S.T, V * root, upper=True).T  # r x d_in
    return B, A, sigma, M.square().sum()


def balance(B, A, P=None, Q=None):
    """Square-root balancing (§4): B <- B R, A <- R^-1 A (B A unchanged) with B^T P B = A Q A^T =
    diag(h); P: d_out x d_out, Q: d_in x d_in, identity when None."""
    W_b = B.T @ B if P is None else B.T @ P @ B  # r x r "observability" gramian
    W_a = A @ A.T if Q is None else A @ Q @ A.T  # r x r "controllability" gramian
    try:
        L_b, L_a = torch.linalg.cholesky(W_b), torch.linalg.cholesky(W_a)
    except RuntimeError:
        raise ValueError("balance needs B and A of full rank r, not rank-deficient") from None
    U, h, Vh = torch.linalg.svd(L_b.T @ L_a)  # h: the "Hankel" singular values
    return B @ L_a @ Vh.T / h.sqrt(), (U.T @ L_b.T @ A) / h.sqrt()[:, None]


# ----------------------------------------------------------------------------- §6 baselines


def lora_factors(d_out, d_in, rank, generator=None, device=None):
    """Hu et al. 2022: A Kaiming-uniform (a = sqrt(5)), B = 0; drawn on the CPU, then moved to
    `device`."""
    generator = generator or torch.Generator().manual_seed(0)
    A = (torch.rand(rank, d_in, generator=generator) * 2 - 1) / math.sqrt(d_in)
    return torch.zeros(d_out, rank, device=device), A.to(device)


def lora_ga_factors(G, rank, gamma=LORA_GA_GAMMA):
    """LoRA-GA (original repo): A = V[:, :r]^T, B = U[:, r:2r], both * d_out^(1/4) / sqrt(gamma)."""
    if 2 * rank > min(G.shape):
        raise ValueError(f"lora-ga needs 2 * rank <= min(d_out, d_in) = {min(G.shape)}")
    U, _, V = top_svd(G.float(), 2 * rank)
    c = G.shape[0] ** 0.25 / math.sqrt(gamma)
    return c * U[:, rank:2 * rank], c * V[:, :rank].T


def lora_one_factors(G, rank, gamma=LORA_ONE_GAMMA):
    """LoRA-One: SVD of -G, B = U_r S_r^1/2, A = S_r^1/2 V_r^T, both / sqrt(sigma_1 gamma)."""
    U, sigma, V = top_svd(-G.float(), rank)
    root = sigma.sqrt() / math.sqrt(sigma[0] * gamma)
    return U * root, (V * root).T


# ----------------------------------------------------------------------------- §5 the init


def _norm2(B, A):  # spectral norm of B A from two thin QRs: ||B A|| = ||R_B R_A^T||
    return torch.linalg.matrix_norm(torch.linalg.qr(B).R @ torch.linalg.qr(A.T).R.T, ord=2)


def _sized(B, A, scaling, norm):  # one scalar on both factors, so ||s B A||_2 = norm
    c = math.sqrt(norm / (scaling * _norm2(B, A)).item())
    return B * c, A * c


def _check_init(layers, stats, method, damping, factor_balance):  # init_adapters' options
    if method not in METHODS:
        raise ValueError(f"unknown init method {method!r}; choose from {', '.join(METHODS)}")
    if factor_balance not in ("euclidean", "curvature"):
        raise ValueError(f"factor_balance takes 'euclidean' or 'curvature', not {factor_balance!r}")
    if not (isinstance(damping, (int, float)) and damping >= 0):
        raise ValueError(f"damping must be a number >= 0, got {damping!r} (choose_damping: λ)")
    if method in SHIFTED and (fixed := {n: why for n, m in layers.items()
                                        if (why := _fixed_w0(m))}):
        what, moving = next(iter(fixed.values()))
        raise ValueError(f"layers {list(fixed)[:3]}: {method} shifts W0, and their weights are "
                         f"{what}: the shift {moving}: use cg-lora or lora-one (W0 kept)")
    if method == "lora-ga" and (narrow := [n for n, m in layers.items()
                                           if 2 * m.rank > min(_base_shape(m.base))]):
        raise ValueError(f"layers {narrow}: lora-ga needs 2 * rank <= min(d_out, d_in): use a "
                         "smaller rank")
    if method not in ("lora", "rslora") and (stats is None or any(n not in stats for n in layers)):
        raise ValueError(f"layers {[n for n in layers if n not in (stats or {})]}: method {method} "
                         "needs statistics for them (collect_statistics)")
    for name in layers if method not in ("lora", "rslora") else ():
        if stats[name].G is None:
            raise ValueError(f"layer {name}: its statistics are held by rank {stats[name].owner} "
                             "(torchrun): initialise with init_owned")
        _check_finite(name, stats[name])


def _check_finite(name, st):  # NaN, Inf: in the sum
    if not all(X.sum().isfinite() for X in st[:3]):
        raise ValueError(f"layer {name}: statistics contain NaN or Inf; check the calibration data "
                         "and loss (run the model in fp32)")


def _report(B, A, st, s, first):  # quadratic_step: the multiple of s B A minimising the quadratic
    # model of the statistics; statistics_mib: what they hold (a shared S in its first layer)
    curvature = ((B.T @ st.T @ B) * (A @ st.S @ A.T)).sum() * s  # <dW, T dW S> / s, dW = s B A
    step = -(B * (st.G @ A.T)).sum() / curvature if curvature > 0 else torch.zeros(())
    mib = sum(X.numel() * 4 for X in (st.G, st.T, st.S)[:2 + first]) * (1 + len(st.folds)) / 2**20
    return dict(quadratic_step=step.item(), statistics_mib=mib)


def layer_factors(layers, stats, method, damping=DAMPING, init_norm=None, step=1.0,
                  factor_balance="euclidean", generator=None):
    """Each layer's initial factors by `method`, in order: yields (name, B, A, report row).
    CG-LoRA's and LoRA-One's rescaled by one scalar to ||s B A||_2 = init_norm (default: LoRA-One's
    alpha / (sqrt(r) 128); 0: CG-LoRA's raw step * dW_r), CG-LoRA's then balanced to B^T B = A A^T
    or left in the curvature metric (§4). Plain LoRA, zero-gradient layers: from `generator`."""
    _check_init(layers, stats, method, damping, factor_balance)
    generator = generator or torch.Generator().manual_seed(0)
    cg, L_S, last = method.startswith("cg-lora"), None, None  # L_S: the last input's S factor
    for name, layer in layers.items():
        t0, r, s = time.perf_counter(), layer.rank, layer.scaling
        st = None if method in ("lora", "rslora") else stats[name]
        norm = layer.alpha / (math.sqrt(r) * LORA_ONE_GAMMA) if init_norm is None else init_norm
        row = dict(layer=name, rank=r, shifted=method in SHIFTED, damping=damping if cg else None,
                   captured=None, fallback=None, statistics_mib=0.0)
        with _fp32():
            if st is None or not st.G.any():
                B, A = lora_factors(*_base_shape(layer.base), r, generator, layer.lora_A.device)
                row["fallback"] = None if st is None else "zero gradient: plain LoRA init"
            elif method == "lora-ga":
                B, A = lora_ga_factors(st.G, r)
            elif method == "lora-one":
                B, A = lora_one_factors(st.G, r)
                B, A = _sized(B, A, s, norm) if norm else (B, A)
            else:
                if st.input != last:  # layers fed one input share its Cholesky factor
                    L_S, last = damped_cholesky(st.S, damping), st.input
                B, A, sigma, energy = cg_lora_factors(st.G, st.S, st.T, r, damping, step, s,
                                                      tol=_FINAL_TOL, L_S=L_S)
                row["captured"] = (sigma.square().sum() / energy).item()
                B, A = _sized(B, A, s, norm) if norm else (B, A)
                if factor_balance == "euclidean" and sigma[-1] > 0:  # sigma_r = 0: rank < r
                    B, A = balance(B, A)
            if st is not None and not row["fallback"]:
                row.update(_report(B, A, st, s, st.input == name))
            row.update(update_norm=(s * _norm2(B.float(), A.float())).item(),
                       seconds=time.perf_counter() - t0)
        yield name, B, A, row


@torch.no_grad()
def write_adapter(layer: LoRALinear, B, A, shift: bool):
    """The one place that writes an init into a model. shift: W0 <- W0 - s B A, computed from
    the factors after casting them to the model dtype, so the model's function is unchanged."""
    B, A = B.to(layer.lora_B), A.to(layer.lora_A)  # their device and dtype
    if shift:  # first: a refusal leaves the layer as it was
        _refuse_moving_w0(layer, "shifting W0", "write with shift=False")
        layer.base.weight.copy_(layer.base.weight.float() - layer.scaling * (B.float() @ A.float()))
    layer.lora_B.copy_(B)
    layer.lora_A.copy_(A)
    layer.lora_B0.copy_(B if shift else torch.zeros_like(B))
    layer.lora_A0.copy_(A if shift else torch.zeros_like(A))


def init_adapters(layers, stats, method="cg-lora", *, damping=DAMPING, init_norm=None, step=1.0,
                  factor_balance="euclidean", generator=None):
    """Initialise every LoRALinear in `layers` ({name: layer}) by `method` (METHODS) from `stats`
    (collect_statistics'; None for lora, rslora): each layer's factors (layer_factors) written by
    write_adapter (cg-lora-shift, lora-ga shift W0 by -s B A). damping: CG-LoRA's lambda (§3).
    Returns each layer's report row (rank, captured, quadratic_step, update_norm, seconds, ...)."""
    report = []
    for name, B, A, row in layer_factors(layers, stats, method, damping, init_norm, step,
                                         factor_balance, generator):
        write_adapter(layers[name], B, A, method in SHIFTED)
        report.append(row)
    return report


# =================================================================================================
# Part II, optional: each a call the caller makes. The diagnostics (§8), the damping choice
# (§8.1), the real loss (§8.2), layers in groups, torchrun's owners, peft.
# =================================================================================================


# ----------------------------------------------------------------------------- §8 diagnostics


def predicted_decrease(B, A, G, S, T):
    """q(dW) = <G, dW>^2 / (2 <dW, T dW S>) for dW = B A: the loss decrease the quadratic model of
    the statistics (G, S, T) predicts for the best multiple of dW (a line search on its scale, §8).
    Only r x r products: <G, B A> = tr(B^T G A^T), <dW, T dW S> = tr(B^T T B A S A^T)."""
    B, A = B.to(G.dtype), A.to(G.dtype)
    num = (B * (G @ A.T)).sum()
    den = ((B.T @ T @ B) * (A @ S @ A.T)).sum()
    return (num.square() / (2 * den)).item() if den > 0 else 0.0


def overlap(X, Y):
    """||Q_X^T Q_Y||_F^2 / r of the column spaces of X and Y (d x r): 1 for the same subspace,
    r / d for independent random ones (§8)."""
    return (torch.linalg.qr(X).Q.T @ torch.linalg.qr(Y).Q).square().sum().item() / X.shape[1]


def direction(method, st, rank, damping=DAMPING):
    """The rank-r update (B, A) of a data-driven method from statistics `st`, before its size is
    set: the factor function init_adapters runs (cg_lora_factors exact, not stopped by energy)."""
    if method == "lora-ga":
        return lora_ga_factors(st.G, rank)
    if method == "lora-one":
        return lora_one_factors(st.G, rank)
    return cg_lora_factors(st.G, st.S, st.T, rank, damping)[:2]


def _held_out(stats):  # the layers this rank holds whose gradient is not zero, checked for folds
    if any(st.G is not None and not st.folds for st in stats.values()):
        raise ValueError("directions are judged on held-out folds: collect the statistics with "
                         "folds=2")
    return {name: st for name, st in stats.items() if st.G is not None and st.G.any()}


def _gathered(rows):  # {layer: row} of every rank, on every rank (torchrun; else as given)
    if not _distributed():
        return rows
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, rows)
    return {k: v for part in parts for k, v in part.items()}


@_fp32()
def diagnose(stats, ranks, method="cg-lora", damping=DAMPING):
    """§8 diagnostics of a data-driven method's directions (`direction` at `damping`) from
    statistics collected with folds=K >= 2; ranks: {layer: r}. Returns {layer: row}, every layer's
    on every rank: heldout / heldout_lora_one, the K-fold held-out q of this method's and of
    LoRA-One's directions (each fitted on all folds but one, judged on that one); insample /
    insample_lora_one, their q on the statistics they were fitted on; overlap_left / overlap_right,
    of the column spaces of B and of A^T fitted on the two halves of the folds (even, odd)."""
    if method not in ("cg-lora", "cg-lora-shift", "lora-ga", "lora-one"):
        raise ValueError(f"diagnose takes a data-driven method, got {method!r}")
    rows = {}
    for name, st in _held_out(stats).items():
        def fitted(m, on):  # method m's direction fitted on the statistics `on`
            return direction(m, on, ranks[name], damping)

        def q(dW, on):  # its predicted decrease judged on `on`
            return predicted_decrease(*dW, on.G, on.S, on.T)
        held = [(pool(st.folds[:k] + st.folds[k + 1:]), f) for k, f in enumerate(st.folds)]
        fits = [fitted(method, fit) for fit, _ in held]
        # two folds: the halves' directions are the held-out fits (fold 1's, fold 0's), not refitted
        halves = fits if len(st.folds) == 2 else [fitted(method, pool(st.folds[h::2]))
                                                  for h in (0, 1)]
        rows[name] = dict(heldout=sum(q(dW, f) for dW, (_, f) in zip(fits, held)),
                          heldout_lora_one=sum(q(fitted("lora-one", fit), f) for fit, f in held),
                          insample=q(fitted(method, st), st),
                          insample_lora_one=q(fitted("lora-one", st), st),
                          overlap_left=overlap(halves[0][0], halves[1][0]),
                          overlap_right=overlap(halves[0][1].T, halves[1][1].T))
    return _gathered(rows)


# ----------------------------------------------------------------------------- §8.1 the damping


class _Eig(NamedTuple):  # X = Q diag(w) Q^T, and the scale of its relative damping, mu = tr X / d
    Q: torch.Tensor
    w: torch.Tensor
    mu: float


def _eig(X):  # damped_cholesky's rule: mu = tr X / d, taken as 1 when X = 0
    w, Q = torch.linalg.eigh(X)
    mu = w.mean().item()
    return _Eig(Q, w.clamp(min=0), mu if mu > 0 else 1.0)


def cg_directions(G, eig_S, eig_T, rank, grid):
    """CG-LoRA's rank-r direction at every lambda of `grid` from one eigendecomposition each of S
    and T: a second route to cg_lora_factors', kept for its cost (O(d^2 r) a lambda, where the
    Cholesky route is O(d^3); a test ties the two). With S_l = Q_S diag(w_S + l mu_S) Q_S^T,
    T_l^-1/2 G S_l^-1/2 = Q_T D_T C D_S Q_S^T for C = Q_T^T G Q_S and diagonal D's: each lambda
    rescales C, whose top r comes from top_r warm-started at the neighbouring lambda. Returns
    {lambda: (B, A)}, B A = -T_l^-1/2 [T_l^-1/2 G S_l^-1/2]_r S_l^-1/2 = dW_r."""
    C = eig_T.Q.T @ G @ eig_S.Q  # d_out x d_in
    out, start = {}, None
    for lam in sorted(grid, reverse=True):  # from the most damped, nearest -G's top r
        dT, dS = eig_T.w + lam * eig_T.mu, eig_S.w + lam * eig_S.mu
        if not (dT.min() > 0 and dS.min() > 0):
            raise ValueError(f"damped statistics are not positive definite (damping={lam}): use "
                             "damping > 0")
        dT, dS = dT.rsqrt(), dS.rsqrt()
        U, sigma, V, start = top_r(dT[:, None] * C * dS, rank, start)
        root = sigma.sqrt()
        out[lam] = (-eig_T.Q @ (dT[:, None] * U * root), (eig_S.Q @ (dS[:, None] * V * root)).T)
    return out


@_fp32()
def choose_damping(stats, ranks, grid=DAMPING_GRID):
    """§8.1: the lambda of `grid` whose CG-LoRA directions, each fitted on all folds but one,
    predict the largest decrease q on the fold left out, summed over folds and layers (under
    torchrun, every rank's). stats: collected with folds=K >= 2; ranks: {layer: r}. Returns
    (lambda, {lambda: that sum})."""
    total, eig_S, last = dict.fromkeys(grid, 0.0), {}, None  # eig_S: the last input's, by fold
    for name, st in _held_out(stats).items():
        if st.input != last:
            eig_S, last = {}, st.input
        q = dict.fromkeys(grid, 0.0)
        for k, held in enumerate(st.folds):
            fit = pool(st.folds[:k] + st.folds[k + 1:])
            eig_S[k] = eig_S.get(k) or _eig(fit.S)
            for lam, (B, A) in cg_directions(fit.G, eig_S[k], _eig(fit.T), ranks[name],
                                             grid).items():
                q[lam] += predicted_decrease(B, A, held.G, held.S, held.T)
        for lam in grid:
            total[lam] += q[lam]
    sums = torch.tensor([total[lam] for lam in grid], dtype=torch.float64)
    if _distributed():
        torch.distributed.all_reduce(sums := _comm(sums))
    return tuple(grid)[int(sums.argmax())], dict(zip(grid, sums.cpu().tolist()))


# ----------------------------------------------------------------------------- rank allocation


@_fp32()
def allocate_ranks(stats, ranks, budget=None, cap=2, damping=DAMPING, score="cg-lora"):
    """Per-layer ranks that spend a rank budget where the loss is predicted to fall most: a call
    before add_lora (which takes them), with the statistics of the plain target layers.

    Each direction i of a layer is scored by its predicted loss decrease sigma_i^2 / 2 (§3): sigma
    the singular values of the whitened gradient at `damping` (cg_lora_factors'), in units of the
    loss, so different layers' scores compare. score="gradient" takes G's own singular values
    instead (no whitening: LoRA-One's directions), a peer rule. ranks: the uniform ranks, one r
    or {layer: r}; budget: the rank sum to spend, default theirs (so targets of one shape keep
    the adapter parameter count). Each layer gets rank 1 (every target keeps its adapter, where
    peft's EVA removes a layer at 0), then the budget left goes to the highest scores overall,
    each layer capped at min(cap r, d_out, d_in) (cap 2: peft's EVA's rho = 2). A layer's scores
    fall, so it gets its top directions; ties go to the earlier layer, then direction, so one
    input gives one result. Under torchrun each owner scores its layers and the scores are
    gathered. Returns {layer: rank} in the order of `stats`."""
    if score not in ("cg-lora", "gradient") or not cap >= 1:
        raise ValueError(f"score must be 'cg-lora' or 'gradient' and cap >= 1, got {score!r}, "
                         f"{cap!r}")
    uniform = ranks if isinstance(ranks, Mapping) else dict.fromkeys(stats, ranks)
    if missing := [n for n in stats if n not in uniform]:
        raise ValueError(f"ranks has no rank for layers {missing[:3]}: give one r or every layer's")
    scores, L_S, last = {}, None, None  # L_S: the last input's S factor, shared as layer_factors
    for name, st in stats.items():
        if st.G is None:  # another rank's (torchrun): its owner scores it
            continue
        _check_finite(name, st)
        k = min(int(cap * uniform[name]), *st.G.shape)
        if score == "gradient":
            sigma = top_svd(st.G.float(), k)[1]
        else:
            if st.input != last:
                L_S, last = damped_cholesky(st.S, damping), st.input
            sigma = cg_lora_factors(st.G, st.S, st.T, k, damping, L_S=L_S)[2]
        scores[name] = (sigma.square() / 2).tolist()
    scores, names = _gathered(scores), list(stats)
    budget = sum(uniform[n] for n in names) if budget is None else budget
    most = sum(len(s) for s in scores.values())
    if not (isinstance(budget, numbers.Integral) and len(names) <= budget <= most):
        raise ValueError(f"budget {budget} must be in {len(names)}..{most}: each layer's rank "
                         f"is in 1..min({cap} r, d_out, d_in)")
    rank = dict.fromkeys(names, 1)
    best = sorted((-x, i, j) for i, n in enumerate(names) for j, x in enumerate(scores[n]) if j)
    for _, i, _ in best[:budget - len(names)]:
        rank[names[i]] += 1
    return rank


# ----------------------------------------------------------------------------- §8.2 the real loss


@torch.no_grad()
def real_decrease(model, layers, directions, batches, scales, loss=None):
    """The real loss along a joint update of all layers (§8.2), in eval mode: the mean example loss
    over `batches` at W0 and, for each c in `scales`, at W0 + s c B A for each layer's direction
    (B d_out x r, A r x d_in; layers: {name: LoRALinear}). W0 is the weight before the init: the
    adapter at (B0, A0), zero unless a shifted init moved W0 by -s B0 A0, where the update is
    (B0 + c B, A), so A must be A0. Returns (loss at W0, {c: loss}); adapters, mode restored."""
    loss, batches = loss or default_loss, list(batches)
    if shifted := [n for n, (B, A) in directions.items() if layers[n].lora_B0.any()
                   and not torch.equal(A.to(layers[n].lora_A0), layers[n].lora_A0)]:
        raise ValueError(f"layers {shifted[:3]}: their init shifted W0 by -s B0 A0, so a direction "
                         "along them must keep A0 (the layer's lora_A0)")
    saved = {name: (m.lora_B.clone(), m.lora_A.clone()) for name, m in layers.items()}
    was_training = model.training

    def mean_loss(moved):  # at the adapters (B0 + c B, A), c = moved; batch means by examples
        for name, m in layers.items():
            B, A = directions[name] if moved and name in directions else (0, m.lora_A0)
            m.lora_B.copy_(m.lora_B0 + moved * B)
            m.lora_A.copy_(A)
        total = sum(loss(_logits(model(**_model_inputs(b, loss))), b["labels"]).item()
                    * b["labels"].shape[0] for b in batches)
        return total / sum(b["labels"].shape[0] for b in batches)

    try:
        model.eval()
        return mean_loss(0), {c: mean_loss(c) for c in scales}
    finally:
        for name, (B, A) in saved.items():
            layers[name].lora_B.copy_(B)
            layers[name].lora_A.copy_(A)
        model.train(was_training)


# ----------------------------------------------------------------------------- layers in groups


def statistics_mib(layers, folds=1):
    """An upper bound on the fp32 statistics collect_statistics holds for `layers` ({name:
    LoRALinear}): S, G and T of each layer, pooled and, with folds >= 2, per fold."""
    shapes = [_base_shape(m.base) for m in layers.values()]
    floats = sum(d_in ** 2 + d_out * d_in + d_out ** 2 for d_out, d_in in shapes)
    return floats * 4 * (1 + folds if folds > 1 else 1) / 2 ** 20


def init_in_groups(model, layers, batches, method="cg-lora", budget_mib=None, stats_kw=None,
                   **init_kw):
    """collect_statistics + init_adapters for `layers` ({name: LoRALinear}) in consecutive groups
    whose statistics (statistics_mib) fit in `budget_mib` (None: one group), one calibration pass
    over `batches` (a list) per group, all factors written after the last: a model whose statistics
    do not fit at once is still initialised as in one pass. stats_kw: collect_statistics'
    keywords; init_kw: init_adapters'. Returns (every layer's report, the groups' layer names)."""
    stats_kw, groups, held = dict(stats_kw or {}), [[]], 0.0  # held: the last group's MiB
    for name, layer in layers.items():
        size = statistics_mib({name: layer}, stats_kw.get("folds", 1))
        if budget_mib is not None and size > budget_mib:
            raise ValueError(f"layer {name}'s statistics take up to {size:.3g} MiB, over the "
                             f"budget of {budget_mib:g} MiB: raise budget_mib")
        if budget_mib is not None and held + size > budget_mib:
            groups, held = groups + [[]], 0.0
        groups[-1].append(name)
        held += size
    # one random stream over all groups, as over one pass
    init_kw["generator"] = init_kw.get("generator") or torch.Generator().manual_seed(0)
    chosen, data = [], method not in ("lora", "rslora")
    for group in groups:
        stats = collect_statistics(model, {n: layers[n].base for n in group}, batches,
                                   **stats_kw) if data else None
        chosen += layer_factors({n: layers[n] for n in group}, stats, method, **init_kw)
        del stats
    for name, B, A, _ in chosen:
        write_adapter(layers[name], B, A, method in SHIFTED)
    return [row for *_, row in chosen], groups


# ----------------------------------------------------------------------------- torchrun


def init_owned(layers, stats, method="cg-lora", **init_kw):
    """init_adapters under torchrun, each layer factorized once, by its owner (collect_statistics),
    whose factors are broadcast and written on every rank. Returns every layer's report on every
    rank. Without torch.distributed, or for lora and rslora: init_adapters."""
    if stats is None or not _distributed():
        return init_adapters(layers, stats, method, **init_kw)
    proc = torch.distributed.get_rank()
    mine = {n: m for n, m in layers.items() if stats[n].owner == proc}
    factors = {name: (B, A, row) for name, B, A, row in layer_factors(mine, stats, method,
                                                                      **init_kw)}
    rows = _gathered({name: row for name, (_, _, row) in factors.items()})
    for name, layer in layers.items():  # the owner's factors (fp32, contiguous), on every rank
        B, A = factors[name][:2] if name in factors else (torch.zeros(layer.lora_B.shape),
                                                          torch.zeros(layer.lora_A.shape))
        B, A = _comm(B.float().contiguous()), _comm(A.float().contiguous())
        for X in (B, A):
            torch.distributed.broadcast(X, stats[name].owner)
        write_adapter(layer, B, A, method in SHIFTED)
    return [rows[name] for name in layers]


# ----------------------------------------------------------------------------- peft


class _Shape(nn.Module):  # stands in for a base layer of d_out x d_in: a weight with no storage
    def __init__(self, d_out, d_in, like):
        super().__init__()
        self.weight = like.new_zeros(()).expand(d_out, d_in)
        self.out_features, self.in_features = d_out, d_in


def _check_peft(model, lora, name):
    """Refuse in one line what initialize_peft cannot initialise exactly: a LoRA variant (not
    W0 + s B A), adapters tied to another module's, LoRA on embeddings, other base layers."""
    if variant := [f"{n} ({type(m.lora_variant[name]).__name__})" for n, m in lora.items()
                   if name in getattr(m, "lora_variant", {})]:
        raise ValueError(f"layers {variant[:3]} are a LoRA variant (use_dora, ...), not "
                         "W0 + s B A, which CG-LoRA initialises: create the adapter without it")
    own = {p.data_ptr(): p for m in lora.values()
           for p in (m.lora_A[name].weight, m.lora_B[name].weight)}
    if tied := sorted({n for n, p in model.named_parameters(remove_duplicate=False)
                       if own.get(p.data_ptr(), p) is not p}):
        raise ValueError(f"adapters {tied[:2]} share their weights with a target's "
                         "(ensure_weight_tying): the gradient sums both uses, which one layer's "
                         "statistics do not hold: set ensure_weight_tying=False")
    if embedded := [n for n, m in model.named_modules() if name in getattr(m, "lora_embedding_A",
                                                                           ())]:
        raise ValueError(f"layers {embedded[:3]} have LoRA on an embedding, which CG-LoRA does not "
                         "initialise (it needs a linear input): leave embeddings out of "
                         "target_modules")
    if other := [f"{n} ({type(m.base_layer).__name__})" for n, m in lora.items()
                 if type(m.base_layer).__name__ != "Conv1D"
                 and not isinstance(m.base_layer, nn.Linear)]:
        raise ValueError(f"layers {other[:3]}: only nn.Linear (and transformers' Conv1D) base "
                         "layers can be initialised here")


def initialize_peft(peft_model, batches, method="cg-lora", adapter_name="default", **kw):
    """Initialise a peft LoRA adapter by `method` from calibration `batches` in one call, as peft's
    own data-driven inits do (EVA's initialize_lora_eva_weights(model, dataloader)); duck-typed on
    peft's LoraLayer, peft is not imported. The statistics are collected at W0 (adapter disabled)
    on each base layer (nn.Linear, transformers' Conv1D, bitsandbytes' 4- and 8-bit: G is then the
    gradient w.r.t. the weight they compute with), and lora_A, lora_B get the factors that
    init_adapters gives for each layer's peft rank (a rank_pattern's too) and scaling, at the
    adapter's dtype. kw: collect_statistics' and init_adapters' keywords. Returns init_adapters'
    report."""
    if method in SHIFTED:
        raise ValueError(f"initialize_peft: {method} shifts W0, which a peft adapter does not "
                         "carry: use cg-lora or lora-one, or add_lora + init_adapters + save_peft "
                         "(the shift exported against the original W0 as rank 2r)")
    known = [set(inspect.signature(f).parameters) for f in (collect_statistics, init_adapters)]
    if unknown := sorted(set(kw) - known[0] - known[1]):
        raise TypeError(f"initialize_peft got {unknown}: it takes collect_statistics' and "
                        "init_adapters' keywords")
    lora = {n: m for n, m in peft_model.named_modules()  # peft's LoraLayers holding the adapter
            if hasattr(m, "base_layer") and adapter_name in getattr(m, "lora_A", ())}
    if not lora:
        raise ValueError(f"no peft LoRA layer holds an adapter {adapter_name!r}: pass "
                         "get_peft_model's model and the adapter's name")
    _check_peft(peft_model, lora, adapter_name)
    scratch = {}  # our LoRALinear of each layer's shape, peft's rank and scaling, adapter dtype
    for n, m in lora.items():
        A = m.lora_A[adapter_name].weight
        scratch[n] = LoRALinear(_Shape(*_base_shape(m.base_layer), A), m.r[adapter_name],
                                m.lora_alpha[adapter_name])
        scratch[n].scaling = m.scaling[adapter_name]
    with getattr(peft_model, "disable_adapter", contextlib.nullcontext)():
        stats = collect_statistics(peft_model, {n: m.base_layer for n, m in lora.items()}, batches,
                                   **{k: v for k, v in kw.items() if k in known[0]})
    report = init_adapters(scratch, stats, method, **{k: v for k, v in kw.items()
                                                      if k in known[1]})
    with torch.no_grad():
        for n, m in lora.items():
            m.lora_A[adapter_name].weight.copy_(scratch[n].lora_A)
            m.lora_B[adapter_name].weight.copy_(scratch[n].lora_B)
    return report


def lora_state_dict(model):
    """Adapter weights under peft's keys, base_model.model.<module>.lora_{A,B}.weight, on the CPU;
    a shifted adapter relative to the original W0 as rank 2r: s (B A - B0 A0) = s [B | B0] [A ;
    -A0] (§5; B0 = 0 in a zero-gradient layer still gives 2r, as its peers)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            B, A = m.lora_B.detach(), m.lora_A.detach()
            if m.lora_A0.any():
                B, A = torch.cat([B, m.lora_B0], 1), torch.cat([A, -m.lora_A0], 0)
            out[f"base_model.model.{name}.lora_A.weight"] = A.to("cpu", copy=True)
            out[f"base_model.model.{name}.lora_B.weight"] = B.to("cpu", copy=True)
    return out


def save_peft(model, directory, modules_to_save=(), **config):
    """Write add_lora's adapters as a peft adapter directory that PeftModel.from_pretrained(the
    original model, directory) loads to this model's function: adapter_model.bin (lora_state_dict
    and the modules trained whole) and adapter_config.json (r, lora_alpha, use_rslora, and per
    layer where it differs rank_pattern and alpha_pattern: each layer's rank and scaling; a
    shifted init as rank 2r at lora_alpha = s 2r, §5). `config` adds entries (task_type,
    base_model_name_or_path). Returns the config written."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    state = lora_state_dict(model)
    if not layers:
        raise ValueError("save_peft found no LoRALinear layer in the model: add_lora first")
    if len({m.dropout.p for m in layers.values()}) != 1:
        raise ValueError("save_peft writes one lora_dropout for all adapters, and the layers have "
                         f"{sorted({m.dropout.p for m in layers.values()})}: add_lora with one")
    r = {n: state[f"base_model.model.{n}.lora_A.weight"].shape[0] for n in layers}  # shifted: 2r
    # peft has one use_rslora: rsLoRA's if a layer (not shifted) has it, and alpha fits each layer
    rslora = any(r[n] == m.rank and m.scaling != m.alpha / m.rank for n, m in layers.items())
    root = math.sqrt if rslora else (lambda x: x)
    alpha = {n: m.alpha if m.alpha / root(r[n]) == m.scaling else m.scaling * root(r[n])
             for n, m in layers.items()}  # peft's scaling lora_alpha / root(r) is then ours
    for target in modules_to_save:
        found = {n: m for n, m in model.named_modules() if n == target or n.endswith("." + target)}
        if not found:
            raise ValueError(f"module {target!r} of modules_to_save is not in the model")
        for n, m in found.items():
            state.update({f"base_model.model.{n}.{k}": v.detach().clone()
                          for k, v in m.state_dict().items()})
    (rank, _), (lora_alpha, _) = (collections.Counter(x.values()).most_common(1)[0]
                                  for x in (r, alpha))
    # peft matches a pattern key as a regular expression ending the module's name: escaped, exact
    config = dict(peft_type="LORA", r=rank, lora_alpha=lora_alpha, use_rslora=rslora,
                  rank_pattern={re.escape(n): x for n, x in r.items() if x != rank},
                  alpha_pattern={re.escape(n): x for n, x in alpha.items() if x != lora_alpha},
                  target_modules=sorted(layers), modules_to_save=list(modules_to_save) or None,
                  lora_dropout=next(iter(layers.values())).dropout.p, bias="none", **config)
    os.makedirs(directory, exist_ok=True)
    torch.save(state, os.path.join(directory, "adapter_model.bin"))
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return config
