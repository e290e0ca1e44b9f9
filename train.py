"""Fine-tune an encoder on a GLUE task with CG-LoRA (or a baseline) and evaluate it on dev.

    python train.py --task cola                                  # tiny built-in encoder, CPU
    python train.py --task rte --pretrained DIR --init lora-ga    # a Hugging Face checkpoint
    torchrun --nproc_per_node=2 train.py --task cola              # data parallel
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import cglora
import data
import models


def flag(default, why):
    """A Config field and its --help line: the default and why."""
    return dataclasses.field(default=default, metadata=dict(help=why))


@dataclasses.dataclass
class Config:
    task: str = flag("cola", "GLUE task: cola, sst-2, mrpc, qqp, sts-b, mnli, qnli, rte, wnli")
    data_dir: str = flag(None, "GLUE root; default $GLUE_DIR, else ./glue_data")
    pretrained: str = flag(None, "HF BERT/RoBERTa checkpoint dir; none: the tiny encoder")
    init: str = flag("cg-lora", "cg-lora, cg-lora-shift, lora, rslora, lora-ga, lora-one, full")
    rank: int = flag(8, "LoRA rank r")
    alpha: float = flag(16.0, "scaling alpha/r (alpha/sqrt(r) for rslora, lora-one, cg-lora)")
    targets: str = flag("query,value", "adapted linear layers by last name, or all: a block's six")
    dropout: float = flag(0.0, "LoRA dropout, in [0, 1)")
    lr: float = flag(1e-3, "peak AdamW learning rate (LoRA-GA and full fine-tuning want ~10x less)")
    epochs: int = flag(3, "epochs; the learning-rate schedule spans them")
    batch_size: int = flag(32, "examples per step and process")
    max_len: int = flag(128, "tokens per example, pairs truncated longest-first")
    warmup: float = flag(0.06, "fraction of the steps with a linear learning-rate warm-up")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    calib_batches: int = flag(16, "calibration batches for the statistics of a data-driven init")
    calib_batch_size: int = flag(8, "examples per calibration batch")
    real_check: int = flag(0, "held-out batches to judge the init on by the real loss (0: off)")
    damping: str = flag(str(cglora.DAMPING), "relative damping of S and T (§3): a number > 0, or "
                        "auto: chosen on 2 folds (§8.1)")
    diagnostics: bool = flag(False, "keep the statistics in 2 folds and report the §8 diagnostics "
                             "(on with --damping auto)")
    allocate: str = flag(None, "cg-lora or gradient: spend r x targets ranks on the directions "
                         "predicted to lower the loss most (§3); none: rank r everywhere")
    step: float = flag(1.0, "Newton step length; only matters with --init_norm 0")
    init_norm: float = flag(None, "CG-LoRA's ||s B A||_2; none: LoRA-One's, alpha/(sqrt(r) 128)")
    fisher: str = flag("empirical", "empirical (true labels) or sampled (labels from the model)")
    balance: str = flag("euclidean", "CG-LoRA's factors with B^T B = A A^T, or in the curvature")
    freeze_embeddings: bool = flag(False, "keep the tiny encoder's random word embeddings frozen")
    seed: int = flag(0, "one seed, one result (on CPU): data order, tiny weights, fresh head, init")
    device: str = flag("auto", "auto, cpu, cuda")
    threads: int = flag(1, "torch's CPU threads: 1 is fastest for the tiny encoder or on a busy "
                        "machine; 0: torch's choice ($OMP_NUM_THREADS, else every core)")
    bf16: bool = flag(False, "autocast on CUDA; statistics and factorizations stay fp32")
    out: str = flag(None, "run directory; default "
                    "runs/<task>-<model>-<init>-r<rank>-<targets>-s<seed>[-w<processes>]")
    max_steps: int = flag(0, "stop after this many steps (0: none); the schedule spans --epochs")
    resume: bool = flag(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = flag(False, "clear the earlier run in --out (only files train.py writes)")
    merge: bool = flag(False, "also write merged.pt: a plain state dict with the adapters merged")
    log_every: int = flag(100, "steps between progress lines and metrics.jsonl's step rows")


# --targets all: every linear of a block
ALL_TARGETS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
# a long pass (statistics, evaluation) prints a progress line at most this often
PROGRESS_SECONDS = 5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        kind = f.type if f.type in (int, float) else str
        how = dict(action="store_true") if f.type is bool else dict(type=kind, default=f.default)
        p.add_argument(f"--{f.name}", **how,
                       help=f"{f.metadata['help']} (default: {how.get('default', 'off')})")
    return check_flags(Config(**vars(p.parse_args(argv))), int(os.environ.get("WORLD_SIZE", 1)))


CHOICES = dict(init=cglora.METHODS + ("full",), fisher=("empirical", "sampled"),
               balance=("euclidean", "curvature"), device=("auto", "cpu", "cuda"))
RANGES = dict(  # flag: (holds, what it must be)
    **dict.fromkeys(("rank", "epochs", "batch_size", "max_len", "calib_batches", "calib_batch_size",
                     "log_every", "alpha", "lr", "step"), (lambda x: 0 < x < math.inf, "positive")),
    dropout=(lambda x: 0 <= x < 1, "in [0, 1)"), warmup=(lambda x: 0 <= x <= 1, "in [0, 1]"),
    weight_decay=(lambda x: x >= 0, ">= 0"), threads=(lambda x: x >= 0, ">= 0 (0: torch's choice)"),
    max_steps=(lambda x: x >= 0, ">= 0 (0: all epochs)"),
    real_check=(lambda x: x >= 0, ">= 0 (0: no real loss check)"),
    init_norm=(lambda x: x is None or x >= 0, ">= 0 (0: the raw Newton step)"))


def check_flags(cfg, world):
    """Every flag before any work or file, as one table of (refused, why) naming the flag and what
    it takes; sets --damping's number, --targets all's names, the default --out. (Against the model:
    check_against_model.)"""
    task, cuda = data.get_task(cfg.task), torch.cuda.is_available()
    folds = statistics_folds(cfg)
    need = max(folds, world)  # calibration batches: a fold's, and a batch per process
    try:
        damping = float(cfg.damping)
    except ValueError:
        damping = math.nan  # auto, or refused below
    cfg.targets = ",".join(ALL_TARGETS) if cfg.targets == "all" else cfg.targets
    value = lambda name: getattr(cfg, name)  # noqa: E731
    refusals = [(value(n) not in allowed, f"--{n} {value(n)!r}: choose from {', '.join(allowed)}")
                for n, allowed in CHOICES.items()]
    refusals += [(not holds(value(n)), f"--{n} must be {want}, got {value(n)}")
                 for n, (holds, want) in RANGES.items()]
    refusals += [
        (cfg.damping != "auto" and not 0 < damping < math.inf,
         f"--damping takes a number > 0 or auto, got {cfg.damping!r}"),
        (cfg.init not in ("lora", "rslora", "full") and cfg.calib_batches < need,
         f"--calib_batches {cfg.calib_batches}: {cfg.init} needs a batch per fold ({folds}) and "
         f"per process ({world}): pass --calib_batches {need} or more"),
        (cfg.device == "cuda" and not cuda,
         "--device cuda: this torch sees no CUDA device: use --device cpu, or auto"),
        (cfg.bf16 and (cfg.device == "cpu" or not cuda),
         "--bf16 autocasts on CUDA only: drop it on the CPU"),
        (cfg.resume and cfg.overwrite,
         "--resume continues the run in --out, --overwrite clears it: pass one of them"),
        (not all(cfg.targets.split(",")),
         f"--targets {cfg.targets!r}: comma-separated layer names, or all"),
        (cfg.allocate is not None and (cfg.allocate not in ("cg-lora", "gradient") or cfg.damping
                                       == "auto" or cfg.init not in ("cg-lora", "cg-lora-shift")),
         f"--allocate {cfg.allocate} (--init {cfg.init}, --damping {cfg.damping}): it takes "
         "cg-lora or gradient, with --init cg-lora or cg-lora-shift at a --damping number")]
    for refused, why in refusals:
        if refused:
            raise ValueError(why)
    cfg.damping = cfg.damping if cfg.damping == "auto" else damping
    if not cfg.out:
        names = cfg.targets.split(",")
        model = Path(cfg.pretrained).resolve().name if cfg.pretrained else "tiny"
        targets = "all" if sorted(names) == sorted(ALL_TARGETS) else "+".join(names)
        cfg.out = (f"runs/{task.name}-{model}-{cfg.init}-r{cfg.rank}-{targets}-s{cfg.seed}"
                   + f"-a{cfg.allocate}" * bool(cfg.allocate) + f"-w{world}" * (world > 1))
    return cfg


def check_against_model(cfg, model, tokenizer, task, n_train, world):
    """The flags that need the model and data: --targets and --rank against the model's linear
    layers, --max_len against the special tokens, --batch_size against the training set."""
    if cfg.init != "full":
        try:
            layers = cglora.target_layers(model, cfg.targets.split(","), torch.nn.Linear)
        except ValueError as e:
            raise ValueError(f"--targets {cfg.targets}: {e}; or --targets all") from None
        factor = 2 if cfg.init == "lora-ga" else 1  # LoRA-GA takes 2r singular vectors
        name, shape = min(((n, tuple(m.weight.shape)) for n, m in layers.items()),
                          key=lambda item: min(item[1]))
        if factor * cfg.rank > min(shape):
            raise ValueError(f"--rank {cfg.rank}: {cfg.init} needs {'2 x ' * (factor - 1)}rank <= "
                             f"the smallest side of each target, and {name} is {shape}: pass "
                             f"--rank {min(shape) // factor} or less")
    pair = task.columns[1] is not None
    shortest = 2 + (tokenizer.n_sep + 2 if pair else 1)  # the special tokens and a token per text
    if cfg.max_len < shortest:
        raise ValueError(f"--max_len {cfg.max_len} leaves no room for text: {task.name} examples "
                         f"take {shortest - 1 - pair} special tokens: pass --max_len {shortest} or "
                         "more")
    if n_train // cfg.batch_size // world == 0:
        raise ValueError(f"{n_train} training examples make no full batch of {cfg.batch_size} "
                         f"per process ({world} processes): lower --batch_size")


# ----------------------------------------------------------------------------- pieces


def build_model(cfg, tokenizer, num_labels):
    """The pretrained checkpoint (tokenizer unused) or the tiny encoder, seeded: same seed, same
    model."""
    torch.manual_seed(cfg.seed)  # the tiny encoder's random weights and any fresh head
    if cfg.pretrained:
        return models.from_pretrained(cfg.pretrained, num_labels)
    return models.Encoder(models.tiny_config(tokenizer.vocab_size, num_labels, tokenizer.pad_id))


def statistics_folds(cfg):  # 2 for the damping search and the diagnostics (§8.1), else 1
    return 2 if cfg.diagnostics or cfg.damping == "auto" else 1


def trainable_modules(cfg):
    """Modules that train besides the adapters: the head, and the tiny encoder's word embeddings
    (random and task-built: with them frozen, LoRA has nothing to steer and dev MCC stays at 0)."""
    return ["head"] + ([] if cfg.pretrained or cfg.freeze_embeddings else ["word_embeddings"])


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def autocast(cfg, device):
    return torch.autocast("cuda", torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")


def progress(what, total, log):
    """callback(done) that logs `what: done/total batches, eta` at most every PROGRESS_SECONDS."""
    t0 = shown = time.monotonic()

    def report(done):
        nonlocal shown
        if done and time.monotonic() - shown >= PROGRESS_SECONDS:
            shown = time.monotonic()
            log(f"{what}: {done}/{total} batches, eta {(shown - t0) / done * (total - done):.0f} s")
    return report


@torch.no_grad()
def evaluate(model, dev, task, cfg, device, log=None):
    model.eval()
    report = progress("evaluation", len(dev), log or (lambda *a: None))
    preds, labels, loss = [], [], 0.0
    for i, batch in enumerate(dev):
        report(i)
        batch = to_device(batch, device)
        with autocast(cfg, device):
            out = model(**{k: v for k, v in batch.items() if k != "labels"}).float()
        loss += cglora.default_loss(out, batch["labels"]).item() * len(batch["labels"])
        preds.append(out.squeeze(-1) if task.num_labels == 1 else out.argmax(-1))
        labels.append(batch["labels"])
    model.train()
    preds, labels = torch.cat(preds).cpu(), torch.cat(labels).cpu()
    return dict(data.compute_metrics(task, preds.tolist(), labels.tolist()),
                loss=loss / len(labels))


def initialise(cfg, model, batches, device, log):
    """Adapters + init by method (full: every weight trains): the statistics of the targets, their
    ranks (--allocate), add_lora, the init, the real check when asked. The init.json record."""
    calib, heldout = batches
    t0, names = time.perf_counter(), cfg.targets.split(",")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    record = dict(method=cfg.init, layers=[])
    add = functools.partial(cglora.add_lora, model, names, alpha=cfg.alpha, dropout=cfg.dropout,
                            rslora=cglora.RSLORA.get(cfg.init), trainable=trainable_modules(cfg))
    if cfg.init == "full":
        model.requires_grad_(True)
    elif cfg.resume:  # the checkpoint holds the initialised (and trained) weights, at these ranks
        add(rank={row["layer"]: row["rank"] for row in json.loads(
            (Path(cfg.out) / "init.json").read_text())["layers"]} if cfg.allocate else cfg.rank)
    else:
        stats = None if cfg.init in ("lora", "rslora") else cglora.collect_statistics(
            model, cglora.target_layers(model, names, torch.nn.Linear),  # add_lora's bases
            (to_device(b, device) for b in calib), fisher=cfg.fisher, folds=statistics_folds(cfg),
            generator=torch.Generator().manual_seed(cfg.seed),
            progress=progress("statistics", len(calib), log))
        layers = add(rank=cglora.allocate_ranks(stats, cfg.rank, damping=cfg.damping,
                                                score=cfg.allocate) if cfg.allocate else cfg.rank)
        record.update(statistics_seconds=time.perf_counter() - t0,
                      **init_layers(cfg, layers, stats, log))
        if stats and heldout:
            record["summary"].update(real_check(
                model, layers, record["layers"], [to_device(b, device) for b in heldout], log))
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return dict(record, seconds=time.perf_counter() - t0, peak_memory_mib=peak / 2 ** 20,
                trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))


def init_layers(cfg, layers, stats, log):
    """The init by the flags: the damping (--damping auto: chosen on 2 folds), the factors written
    (under torchrun each layer's by its owner), the §8 diagnostics with 2 folds; their summary."""
    cg, ranks = cfg.init.startswith("cg-lora"), {n: m.rank for n, m in layers.items()}
    damping, table = (cglora.DAMPING if cfg.damping == "auto" else cfg.damping), None
    if cg and cfg.damping == "auto":
        log(f"choosing the damping among {len(cglora.DAMPING_GRID)} values on 2 folds of the "
            "calibration batches ...")
        damping, table = cglora.choose_damping(stats, ranks)
    log(f"init {cfg.init}: {len(layers)} layers, W0 "
        + ("shifted by -s B A" if cfg.init in cglora.SHIFTED else "kept")
        + (f", damping {damping:g}" if cg else ""))
    init = cglora.init_owned if dist.is_initialized() else cglora.init_adapters
    rows = init(layers, stats, cfg.init, damping=damping, step=cfg.step, init_norm=cfg.init_norm,
                factor_balance=cfg.balance, generator=torch.Generator().manual_seed(cfg.seed))
    diagnostics = (cglora.diagnose(stats, ranks, cfg.init, damping)
                   if stats and statistics_folds(cfg) > 1 else {})
    for row in rows:
        row.update(diagnostics.get(row["layer"], {}))
    summary = summarise(rows, cfg.rank, table, damping if cg else None, log)
    if cfg.allocate:  # what the allocation held equal: the rank sum (one shape: the parameters)
        width = {n: m.lora_A.shape[1] + m.lora_B.shape[0] for n, m in layers.items()}
        summary.update(rank_sum=sum(ranks.values()), uniform_rank_sum=cfg.rank * len(ranks),
                       adapter_parameters=sum(ranks[n] * w for n, w in width.items()),
                       uniform_adapter_parameters=cfg.rank * sum(width.values()))
        log(f"ranks allocated by {cfg.allocate}: {sorted(ranks.values())}, sum "
            f"{sum(ranks.values())} = {len(ranks)} x {cfg.rank}")
    return dict(layers=rows, damping=damping if cg else None, summary=summary)


# the real check's multiples of each layer's quadratic-model step
REAL_SCALES = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


def real_check(model, layers, rows, heldout, log):
    """The init judged by the real loss (docs/cg-lora.md §8.2): the mean loss on `heldout` at W0
    and with every layer moved by REAL_SCALES times its update's quadratic-model step
    (quadratic_step), jointly; the decrease is the loss at W0 minus the best, beside what the
    calibration model predicts (summed in-sample q, with the diagnostics); and the loss at the
    init's update as written, W0 + s B A (a shifted init then moves W0)."""
    factors = {n: (m.lora_B.detach().clone(), m.lora_A.detach().clone())  # as written
               for n, m in layers.items()}
    step = {r["layer"]: r.get("quadratic_step", 0.0) for r in rows}
    directions = {n: (step[n] * B, A) for n, (B, A) in factors.items()}
    at_W0, losses = cglora.real_decrease(model, layers, directions, heldout, REAL_SCALES)
    at_init = cglora.real_decrease(model, layers, factors, heldout, (1.0,))[1][1.0]
    best = min(losses, key=losses.get)
    predicted = sum(r.get("insample") or 0.0 for r in rows)
    real = dict(real_loss_at_W0=at_W0, real_losses=losses, real_best_scale=best,
                real_decrease=at_W0 - losses[best], real_loss_at_init=at_init,
                predicted_decrease=predicted,
                real_examples=sum(len(b["labels"]) for b in heldout))
    log(f"real loss check on {real['real_examples']} held-out examples: {at_W0:.4f} "
        f"at W0, {losses[best]:.4f} at {best:g}x each layer's quadratic-model step, a decrease "
        f"of {at_W0 - losses[best]:.4f}"
        + (f"; the calibration model predicts {predicted:.3g} "
           f"({predicted / max(at_W0 - losses[best], 1e-12):.0f}x)" if predicted else "")
        + f"; at the init's own size {at_init:.4f}, a decrease of {at_W0 - at_init:.2g}")
    return real


def summarise(rows, rank, table, damping, log):
    """The init's summary, logged and returned for init.json: captured energy (§3), the damping
    search's table, and the §8 diagnostics summed over the layers (the ratios are of the sums)."""
    captured = [r["captured"] for r in rows if r["captured"] is not None]
    summary = (dict(captured_mean=sum(captured) / len(captured), captured_min=min(captured))
               if captured else {})
    if captured:
        log(f"captured energy at rank {rank}: mean {summary['captured_mean']:.3f}, "
            f"min {summary['captured_min']:.3f} over {len(captured)} layers")
    if table:
        log("damping auto: held-out predicted decrease "
            + ", ".join(f"{lam:g}: {q:.3g}" for lam, q in table.items())
            + f" -> damping {damping:g}")
    rows = [r for r in rows if r.get("heldout") is not None]
    if rows:
        total = lambda key: sum(r[key] for r in rows)  # noqa: E731
        keys = ("heldout", "heldout_lora_one", "insample", "insample_lora_one")
        summary.update({key: total(key) for key in keys})
        summary.update(
            overlap_left=total("overlap_left") / len(rows),
            overlap_right=total("overlap_right") / len(rows),
            heldout_ratio=summary["heldout"] / max(summary["heldout_lora_one"], 1e-30),
            insample_ratio=summary["insample"] / max(summary["insample_lora_one"], 1e-30),
            damping=damping, heldout_by_damping=table)
        log(f"calibration check: split-half overlap left {summary['overlap_left']:.2f} / right "
            f"{summary['overlap_right']:.2f}; predicted decrease vs LoRA-One's direction: held-out "
            f"{summary['heldout_ratio']:.2f}x, in-sample {summary['insample_ratio']:.2f}x")
    return summary


def check_ranks_agree(model):
    """Under torch.distributed every rank must hold the same init: compare a checksum."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters() if p.requires_grad])
    sums = [torch.zeros(2, device=flat.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, torch.stack([flat.sum(), flat.square().sum()]))
    if any(not torch.equal(s, sums[0]) for s in sums):
        raise RuntimeError(f"ranks disagree on the initial adapters: {[s.tolist() for s in sums]}")


def hf_name(cfg, model):
    """Our parameter name -> the checkpoint's in its *ForSequenceClassification
    (`layers.0.query.weight` -> `bert.encoder.layer.0.attention.self.query.weight`,
    `head.out_proj.weight` -> `classifier.weight`), or ours."""
    if not cfg.pretrained:
        return lambda name: name
    names, kind = models.hf_names(model.config), model.config.model_type
    return lambda name: (names[name] if names[name].startswith("classifier")
                         else f"{kind}.{names[name]}")


def export_adapter(cfg, model, out):
    """A peft adapter directory by cglora.save_peft, with the modules trained whole; from
    --pretrained under the checkpoint's own names (hf_name), as peft finds them; on the CPU."""
    # one module to save per Linear/Embedding: peft wraps each, and our head is a ModuleDict
    whole = [n for n, m in model.named_modules()
             if n.split(".")[0] in trainable_modules(cfg) and not list(m.children())]
    config = cglora.save_peft(model, out, whole, base_model_name_or_path=cfg.pretrained,
                              task_type="SEQ_CLS" if cfg.pretrained else None)
    rename, prefix = hf_name(cfg, model), "base_model.model."
    module_name = lambda n: rename(f"{n}.weight").removesuffix(".weight")  # noqa: E731

    def theirs(key):  # base_model.model.<module>.lora_A.weight, or <module>.<weight|bias>
        module, lora, name = key.removeprefix(prefix).rpartition(".lora_")
        return prefix + (module_name(module) + lora + name if lora else rename(name))
    # save_peft keeps the trained-whole modules' tensors on their device: ours load anywhere
    state = torch.load(out / "adapter_model.bin", map_location="cpu", weights_only=False)
    torch.save({theirs(k): v.to("cpu") for k, v in state.items()}, out / "adapter_model.bin")
    if cfg.pretrained:  # the head: BERT's pooler and classifier, RoBERTa's classifier
        kind = model.config.model_type
        pattern = {re.escape(n): re.escape(module_name(n)) for n in config["target_modules"]}
        config.update({k: {pattern[n]: x for n, x in config[k].items()}  # per-layer ranks, alphas
                       for k in ("rank_pattern", "alpha_pattern")})
        config.update(target_modules=sorted(map(module_name, config["target_modules"])),
                      modules_to_save=sorted({module_name(n).removeprefix(f"{kind}.").split(".")[0]
                                              for n in whole}))
        (out / "adapter_config.json").write_text(json.dumps(config, indent=1))


def merged_state_dict(cfg, model):
    """A plain state dict with every adapter merged, under hf_name's names of the wrapped layers."""
    state, rename = model.state_dict(), hf_name(cfg, model)
    for name, m in model.named_modules():
        if isinstance(m, cglora.LoRALinear):
            state[f"{name}.base.weight"] = m.base.weight.detach() + m.delta_weight().detach()
    return {rename(k.replace(".base.", ".")): v.to("cpu", copy=True) for k, v in state.items()
            if ".lora_" not in k}


def curves_svg(rows, metric, w=360, h=240, pad=44):
    """A dependency-free SVG of metrics.jsonl: the train and dev loss, and the dev metric, against
    the step; each axis numbered at its ends and middle."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{h}" '
           'font-family="sans-serif" font-size="11" style="background: white">']
    evals = [r for r in rows if r["kind"] == "eval"]
    panels = [("loss: train (blue), dev (orange)",
               [[(r["step"], r["train_loss"]) for r in rows if r["kind"] == "step"],
                [(r["step"], r["dev_loss"]) for r in evals]]),
              (f"dev {metric}", [[(r["step"], r[f"dev_{metric}"]) for r in evals]])]
    for i, (title, lines) in enumerate(panels):
        points = [p for line in lines for p in line] or [(0, 0)]
        (x0, x1), (y0, y1) = ((min(v), max(v)) for v in zip(*points))
        left, right, top, bottom = i * w + pad, (i + 1) * w - pad / 2, pad, h - pad
        X = lambda x: left + (x - x0) / ((x1 - x0) or 1) * (right - left)  # noqa: E731
        Y = lambda y: bottom - (y - y0) / ((y1 - y0) or 1) * (bottom - top)  # noqa: E731
        out += [f'<text x="{left}" y="{top - 14}">{title}</text>',
                f'<polyline fill="none" stroke="black" points="{left},{top} {left},{bottom} '
                f'{right},{bottom}"/>']
        for t in (0, 0.5, 1):  # the numbers on the axes
            x, y = round(x0 + t * (x1 - x0)), y0 + t * (y1 - y0)  # steps: whole numbers
            out += [f'<text x="{X(x):.1f}" y="{bottom + 16}" text-anchor="middle">{x:g}</text>',
                    f'<text x="{left - 4}" y="{Y(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>']
        out += [f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                + " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in line) + '"/>'
                for line, color in zip(lines, ("#1f77b4", "#ff7f0e")) if line]
        out.append(f'<text x="{(left + right) / 2}" y="{h - 8}" text-anchor="middle">step</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


# ----------------------------------------------------------------------------- a run, step by step


@dataclasses.dataclass
class Run:
    """Where a run happens: its config (on --resume the saved one), directory, ranks, device."""
    cfg: Config
    out: Path
    world: int
    rank: int
    device: torch.device
    main: bool  # rank 0: the process that logs and writes the run directory

    def log(self, *args):
        if self.main:
            print(*args)


def train(cfg):
    """One run, step by step; every flag is checked before the first file is written."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run, ck = start(cfg)
    task, train_set, dev_set = read_data(run)
    model, tokenizer, train_enc, dev, calib = model_and_batches(run, task, train_set, dev_set)
    model_and_init(run, model, calib)
    opt, sched, per_epoch, total = optimisation(run, model, len(train_enc))
    at = resume_from(run, ck, model, opt, sched) if ck else (0, [], [])
    history, step, seconds = fit(run, model, opt, sched, per_epoch, total, train_enc, dev, task,
                                 tokenizer.pad_id, at)
    if run.main:
        finish(run, model, task, history, step, seconds)
    if run.world > 1:
        dist.destroy_process_group()
    return history


def fit(run, model, opt, sched, per_epoch, total, train_enc, dev, task, pad_id, at):
    """The loop from `at` (step, evaluations, this epoch's losses): a step row every --log_every
    steps; at each epoch's end and the last step an evaluation, a checkpoint, then the evaluation's
    row (so metrics.jsonl never has one the checkpoint lacks). Returns (evaluations, steps, s)."""
    cfg, device, end = run.cfg, run.device, min(total, run.cfg.max_steps or total)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if run.world > 1 else model
    (step, history, losses), t0 = at, time.perf_counter()

    def evaluation(epoch, train_loss, checkpoint=True):
        rng = rng_states(device, run.world) if checkpoint else None  # every rank takes part
        if run.main:
            metrics = evaluate(model, dev, task, cfg, device, run.log)
            history.append(dict(kind="eval", step=step, epoch=epoch, train_loss=train_loss,
                                elapsed=time.perf_counter() - t0,
                                **{f"dev_{k}": v for k, v in metrics.items()}))
            run.log(f"eval epoch {epoch} step {step}: dev "
                    + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if checkpoint:
                save_checkpoint(run, model, opt, sched, rng, step, losses, history)
            write_metrics(run.out, history[-1:])

    if step == 0:
        evaluation(0, None, checkpoint=False)
    model.train()
    while step < end:
        order = list(data.batches(train_enc, cfg.batch_size, pad_id, shuffle=True,
                                  seed=cfg.seed * 1000 + step // per_epoch + 1))
        for batch in order[run.rank::run.world][:per_epoch][step % per_epoch:][:end - step]:
            batch = to_device(batch, device)
            with autocast(cfg, device):
                logits = ddp(**{k: v for k, v in batch.items() if k != "labels"})
            loss = cglora.default_loss(logits, batch["labels"])  # fp32 inside
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr = sched.get_last_lr()[0]  # this step's
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            if step % cfg.log_every == 0 or step == end:
                recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
                rate = (step - at[0]) / (time.perf_counter() - t0)
                run.log(f"step {step}/{end} | loss {recent:.4f} | lr {lr:.3g} | {rate:.1f} steps/s "
                        f"| eta {(end - step) / rate:.0f} s")
                if run.main:
                    write_metrics(run.out, [dict(kind="step", step=step, train_loss=recent, lr=lr)])
        train_loss, epoch_end = sum(losses) / len(losses), step % per_epoch == 0
        losses = [] if epoch_end else losses  # a new epoch: the checkpoint holds its (no) losses
        evaluation(step // per_epoch if epoch_end else round(step / per_epoch, 4), train_loss)
    return history, step, time.perf_counter() - t0


def start(cfg):
    """(Run, --resume's checkpoint) once the run directory passed its checks; torchrun joined."""
    world, device = join(cfg.device)
    out, rank = Path(cfg.out), dist.get_rank() if world > 1 else 0
    run_cfg, ck = resumed(cfg, out, world) if cfg.resume else (check_new_run(cfg, out), None)
    return Run(run_cfg, out, world, rank, device, rank == 0), ck


def join(device_flag):
    """(processes, device): on CUDA (--device cuda, or auto where there is one) LOCAL_RANK's GPU,
    made current, and nccl, else the CPU and gloo; under torchrun the process group started."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return world, device


def read_data(run):
    """The task and its train and dev examples, missing files downloaded first (by rank 0)."""
    cfg, task = run.cfg, data.get_task(run.cfg.task)
    cfg.data_dir = str(data.resolve_data_dir(cfg.data_dir).resolve())
    if run.main and data.missing_files(task, cfg.data_dir):
        data.download_task(task, cfg.data_dir, log=run.log)
    if run.world > 1:
        dist.barrier()
    return task, *(data.read_split(task, split, cfg.data_dir) for split in ("train", "dev"))


def model_and_batches(run, task, train_set, dev_set):
    """The model and tokenizer checked against the flags, a new run's directory, the token ids:
    (model, tokenizer, training examples, dev batches, (this rank's calibration batches, the real
    check's, which no calibration saw))."""
    cfg = run.cfg
    if cfg.pretrained:  # the model first: a checkpoint without weights says so before its tokenizer
        model = build_model(cfg, None, task.num_labels)
        tokenizer = data.load_tokenizer(cfg.pretrained)
    else:
        tokenizer = (data.load_tokenizer(run.out / "tokenizer") if cfg.resume
                     else data.build_tokenizer([t for ex in train_set for t in ex[:2] if t]))
        model = build_model(cfg, tokenizer, task.num_labels)
    check_against_model(cfg, model, tokenizer, task, len(train_set), run.world)
    if run.main and not cfg.resume:
        new_directory(cfg, run.out, None if cfg.pretrained else tokenizer)
    train_enc = data.encode_examples(train_set, tokenizer, cfg.max_len)
    dev = list(data.batches(data.encode_examples(dev_set, tokenizer, cfg.max_len),
                            2 * cfg.batch_size, tokenizer.pad_id))
    calib = list(data.batches(train_enc, cfg.calib_batch_size, tokenizer.pad_id, shuffle=True,
                              seed=cfg.seed))
    run.log(f"{task.name}: {len(train_set)} train / {len(dev_set)} dev examples, vocabulary "
            f"{tokenizer.vocab_size}, device {run.device}, {run.world} process(es)")
    return model, tokenizer, train_enc, dev, (calib[:cfg.calib_batches][run.rank::run.world],
                                              calib[cfg.calib_batches:][:cfg.real_check])


def model_and_init(run, model, calib):
    """The model on its device, its adapters initialised; a new run's init.json, adapter_init/."""
    model.to(run.device)
    record = initialise(run.cfg, model, calib, run.device, run.log)
    if run.world > 1:
        check_ranks_agree(model)
    if run.main and not run.cfg.resume:
        (run.out / "init.json").write_text(json.dumps(record, indent=1))
        if run.cfg.init != "full":
            export_adapter(run.cfg, model, run.out / "adapter_init")
        run.log(f"init {run.cfg.init}: {record['seconds']:.2f} s, peak "
                f"{record['peak_memory_mib']:.0f} MiB, {record['trainable_parameters']} trainable "
                "parameters")


def optimisation(run, model, n_train):
    """AdamW and its schedule over --epochs: (optimizer, schedule, steps per epoch, total steps)."""
    cfg = run.cfg
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    per_epoch = n_train // cfg.batch_size // run.world  # drop the ragged last batch
    return opt, schedule(opt, per_epoch * cfg.epochs, cfg.warmup), per_epoch, per_epoch * cfg.epochs


def schedule(opt, total, warmup):
    """A linear warm-up over a `warmup` fraction of the `total` steps, then linear decay to 0."""
    warm = max(1, int(warmup * total))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))


def finish(run, model, task, history, step, seconds):
    """Rank 0 ends the run: the trained adapter, merged.pt (--merge), curves.svg, the done line."""
    cfg, out, key = run.cfg, run.out, f"dev_{task.main_metric}"
    if cfg.init != "full":
        export_adapter(cfg, model, out)
    if cfg.merge:
        torch.save(merged_state_dict(cfg, model), out / "merged.pt")
    (out / "curves.svg").write_text(curves_svg(read_metrics(out), task.main_metric))
    last, best = history[-1], max([h for h in history if h["epoch"] > 0] or history,
                                  key=lambda h: h[key])
    run.log(f"done: {task.name} {cfg.init} dev {task.main_metric} {last[key]:.4f} at step "
            f"{last['step']} (best {best[key]:.4f} at step {best['step']}, epoch {best['epoch']}), "
            f"{step} steps, train {seconds:.0f} s -> {out}")


# ----------------------------------------------------------------------------- the run directory

# what a --resume may change
PER_CALL = ("out", "data_dir", "max_steps", "resume", "overwrite", "log_every", "threads")
RUN_FILES = ("config.json", "init.json", "metrics.jsonl", "metrics.tmp", "curves.svg", "tokenizer",
             "adapter_init", "adapter_model.bin", "adapter_config.json", "checkpoint.pt",
             "checkpoint.tmp", "merged.pt")


def check_new_run(cfg, out):
    """A new run needs a directory without another run in it; --overwrite clears one, but only the
    files train.py writes (RUN_FILES). Returns cfg."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: pick a directory")
    found = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if found and not cfg.overwrite:
        raise ValueError(f"{out} holds another run "
                         f"({', '.join(found[:4])}{', ...' * (len(found) > 4)}): continue it with "
                         "--resume, pick a new --out, or pass --overwrite to clear it first")
    if set(found) - set(RUN_FILES):
        raise ValueError(f"--overwrite clears only what train.py writes, and {out} also holds "
                         f"{', '.join(sorted(set(found) - set(RUN_FILES)))}: pick a new --out")
    return cfg


def new_directory(cfg, out, tokenizer):
    """Rank 0 starts a new run's directory: an earlier run's files cleared (--overwrite), then
    config.json (with the data dir used, the torch and code versions) and the tiny tokenizer."""
    for path in filter(Path.exists, (out / name for name in RUN_FILES)):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    try:  # the git commit of this checkout, "-dirty" with uncommitted changes
        version = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40",
                                  "--exclude=*"], cwd=Path(__file__).resolve().parent,
                                 capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = ""
    (out / "config.json").write_text(json.dumps(dict(
        dataclasses.asdict(cfg), torch_version=torch.__version__,
        code_version=version or "unknown"), indent=1))
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer")


def load_config(out):
    """The Config a run directory's config.json holds (the versions recorded beside it left out)."""
    saved = json.loads((Path(out) / "config.json").read_text())
    return Config(**{f.name: saved[f.name] for f in dataclasses.fields(Config) if f.name in saved})


def read_metrics(out):
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_metrics(out, rows, replace=False):
    """Append rows to metrics.jsonl, or replace it with them atomically."""
    with open(out / ("metrics.tmp" if replace else "metrics.jsonl"), "w" if replace else "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    if replace:
        os.replace(out / "metrics.tmp", out / "metrics.jsonl")


def save_atomic(obj, path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(run, model, opt, sched, rng, step, losses, history):
    """checkpoint.pt: all --resume needs to go on as if the run had not stopped."""
    save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), rng=rng, losses=losses,
                     scheduler=sched.state_dict(), step=step, history=history,
                     config=dataclasses.asdict(run.cfg)), run.out / "checkpoint.pt")


def rng_states(device, world):
    """Every process's random state, which dropout draws from: its CPU's, and on CUDA its GPU's."""
    mine = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)]
                                      if device.type == "cuda" else [])
    if world == 1:
        return [mine]
    gathered = [[torch.empty_like(s, device=device) for _ in range(world)] for s in mine]
    for into, s in zip(gathered, mine):
        dist.all_gather(into, s.to(device))
    return [[g[r].cpu() for g in gathered] for r in range(world)]


def resumed(cfg, out, world):
    """--resume: the saved config (this call's PER_CALL flags in it) and the checkpoint, once known
    to be the run's latest state: of that config, as many processes, every evaluation."""
    path = out / "checkpoint.pt"
    if not out.is_dir() or not any(out.iterdir()):
        raise ValueError(f"--resume: there is no run in {out} (no such directory, or an empty "
                         "one): check --out, or start the run without --resume")
    if not (out / "config.json").is_file() or not path.is_file():
        raise ValueError(f"--resume: no checkpoint in {out} (the run stopped before its first "
                         "one): start it again with --overwrite")
    saved = load_config(out)
    fixed = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k not in PER_CALL}  # noqa
    given = [k for k, v in fixed(cfg).items() if v not in (getattr(Config(), k), getattr(saved, k))]
    if given:
        raise ValueError(f"--resume continues {out} as it was configured: " + ", ".join(
            f"--{k} {getattr(cfg, k)} (the run has {getattr(saved, k)})" for k in given)
            + "; drop these flags, or start another run with a new --out")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    theirs = ck.get("config", {})
    differ = [k for k, v in fixed(saved).items() if theirs.get(k) != v]
    if differ:
        raise ValueError(f"--resume: {path} is another run's: it has " + ", ".join(
            f"{k} {theirs.get(k)}" for k in differ) + f" where {out / 'config.json'} has "
            + ", ".join(f"{k} {getattr(saved, k)}" for k in differ)
            + "; start the run again with --overwrite")
    if len(ck["rng"]) != world:
        raise ValueError(f"--resume: {path} has {len(ck['rng'])} process(es): resume with as many")
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    if evals != ck["history"][:len(evals)]:
        raise ValueError(f"--resume: {path} (step {ck['step']}) is not the run's latest state: "
                         f"{out / 'metrics.jsonl'} has evaluations it lacks (the last at step "
                         f"{evals[-1]['step']}); start the run again with --overwrite")
    calls = {k: getattr(cfg, k) for k in PER_CALL}
    return dataclasses.replace(saved, **dict(calls, data_dir=cfg.data_dir or saved.data_dir)), ck


def resume_from(run, ck, model, opt, sched):
    """The checkpoint's model, optimizer, schedule, random states, and metrics.jsonl as at it (later
    rows dropped, an evaluation it missed added): the loop's (step, evaluations, epoch's losses)."""
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    run.log(restore_rng(ck["rng"][run.rank], run.device))
    if run.main:
        rows = [r for r in read_metrics(run.out) if r["step"] <= ck["step"]]
        evals = sum(r["kind"] == "eval" for r in rows)
        write_metrics(run.out, rows + ck["history"][evals:], replace=True)
        run.log(f"resumed from {run.out / 'checkpoint.pt'} at step {ck['step']}")
    return ck["step"], ck["history"], ck["losses"]


def restore_rng(states, device):
    """This process's random states from its rng_states() entry; returns the line saying which (on
    another kind of device than the checkpoint's, dropout's draws cannot be restored)."""
    torch.set_rng_state(states[0])
    if device.type == "cuda" and len(states) > 1:
        torch.cuda.set_rng_state(states[1], device)
        return "resume: restored the CPU and CUDA random states"
    lost = ("; the checkpoint has no CUDA state (written on the CPU): the GPU's draws start afresh"
            if device.type == "cuda" else "; the checkpoint's CUDA state is unused here: dropout's "
            "draws differ from the GPU run's" if len(states) > 1 else "")
    return "resume: restored the CPU random state" + lost


# ----------------------------------------------------------------------------- the command line


def interrupted(cfg):
    """The one line Ctrl-C ends with: where the last checkpoint is and how to resume."""
    path = Path(cfg.out) / "checkpoint.pt" if cfg else None
    if path and path.is_file():
        step = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["step"]
        return (f"interrupted: the last checkpoint is {path} (step {step}); continue with: "
                f"python train.py --resume --out {cfg.out}")
    return "interrupted before the run's first checkpoint: nothing to resume" + (
        f"; start it again with --overwrite --out {cfg.out}" if cfg and Path(cfg.out).exists()
        else "")


def main(argv=None):
    cfg = None
    with warnings.catch_warnings():  # a warning (data.RowCountWarning) is one line too
        warnings.simplefilter("always", data.RowCountWarning)
        warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
        try:
            cfg = parse_args(argv)
            train(cfg)
        except (ValueError, FileNotFoundError, NotADirectoryError, data.DownloadError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except PermissionError as e:  # the OS refused a path: the data, the checkpoint or --out
            print(f"error: {e.filename}: {e.strerror}: give this user the access train.py needs "
                  "(chmod, chown), or pass another --data_dir, --pretrained or --out",
                  file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            if os.environ.get("RANK", "0") == "0":
                print(interrupted(cfg), file=sys.stderr)
            sys.exit(130)


if __name__ == "__main__":
    main()
