"""Curvature-Guided LoRA (CG-LoRA), in one file.

Reading order = algorithm order (derived in docs/cg-lora.md, cited as §N):
LoRA layer -> K-FAC statistics (§2) -> whitening (§3) -> top-r SVD -> balanced factors (§4)
-> baselines (§6) -> the one function that writes an initialisation into a model (§5).
Model-agnostic: any nn.Module whose target layers are nn.Linear. Only torch is needed.
"""
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

LORA_ONE_GAMMA = 128  # LoRA-One's init scale: B, A divided by sqrt(sigma_1 * gamma)
LORA_GA_GAMMA = 16  # LoRA-GA's "stable" scale: B, A times d_out^(1/4) / sqrt(gamma)
SVD_OVERSAMPLE = 10  # extra columns in the randomized range finder (Halko et al. 2011)
SVD_ITERS = 4  # subspace iterations: enough for the fast-decaying spectra of gradients

# ----------------------------------------------------------------------------- LoRA layer


class LoRALinear(nn.Module):
    """y = base(x) + scaling * B A dropout(x), base frozen; peft's names and shapes.

    lora_A0, lora_B0 hold the factors subtracted from W0 by a shifted init (zero otherwise),
    so that always  W_effective = W0_original + scaling * (B A - B0 A0).
    """

    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0, rslora=False):
        super().__init__()
        d_out, d_in = base.weight.shape
        if not 0 < rank <= min(d_in, d_out):
            raise ValueError(f"rank {rank} must be in 1..min(d_in, d_out) = {min(d_in, d_out)}")
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.dropout = nn.Dropout(dropout)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        bound = 1 / math.sqrt(d_in)  # = kaiming_uniform_(a=sqrt(5)), the nn.Linear / LoRA default
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, **kw).uniform_(-bound, bound))  # r x in
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, **kw))  # out x r: zero, so y = base(x)
        self.register_buffer("lora_A0", torch.zeros(rank, d_in, **kw))
        self.register_buffer("lora_B0", torch.zeros(d_out, rank, **kw))
        self.merged = False

    def delta_weight(self):  # out x in, the update this adapter adds to base.weight
        return self.scaling * (self.lora_B @ self.lora_A)

    def merge(self):
        if not self.merged:
            self.base.weight.data += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    def unmerge(self):
        if self.merged:
            self.base.weight.data -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        return y + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)


def _matching(model, names, kind):
    """Names of the modules of type `kind` whose full name or last component is in `names`."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, kind)}
    hits = {n: m for n, m in found.items() if n in names or n.rsplit(".", 1)[-1] in names}
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in hits)]
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in found})
        raise ValueError(f"targets {missing} match no {kind.__name__} layer; "
                         f"the model has {short} (full names like {next(iter(found), None)!r})")
    return hits


def add_lora(model, targets, rank, alpha, dropout=0.0, rslora=False, trainable=()):
    """Swap the nn.Linear layers named in `targets` (full name or last component, e.g. "query")
    for LoRALinear, freeze every other parameter except modules named in `trainable`
    (e.g. a classifier head), and return {name: LoRALinear}."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name, linear in _matching(model, list(targets), nn.Linear).items():
        try:
            layer = LoRALinear(linear, rank, alpha, dropout, rslora)
        except ValueError as e:
            raise ValueError(f"layer {name}: {e}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        layers[name] = layer
    for name in trainable:
        modules = [m for n, m in model.named_modules() if n == name or n.endswith("." + name)]
        if not modules:
            raise ValueError(f"trainable module {name!r} not found in the model")
        for m in modules:
            m.requires_grad_(True)
    return layers


def lora_state_dict(model):
    """Adapter weights with peft's key names; a shifted adapter is exported relative to the
    original W0 as rank 2r: s (B A - B0 A0) = s [B | B0] [A ; -A0] (§5)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            B, A = m.lora_B.detach(), m.lora_A.detach()
            if m.lora_B0.any():
                B, A = torch.cat([B, m.lora_B0], 1), torch.cat([A, -m.lora_A0], 0)
            out[f"base_model.model.{name}.lora_A.weight"] = A.clone()
            out[f"base_model.model.{name}.lora_B.weight"] = B.clone()
    return out


# ----------------------------------------------------------------------------- §2 statistics


def _tokens(t, keep):  # [batch, length, dim] -> [real tokens, dim] in fp32; [batch, dim] stays
    return (t[keep] if keep is not None and t.dim() == 3 else t.reshape(-1, t.shape[-1])).float()


def _sampled_labels(out, generator):
    """Labels drawn from the model's own predictive distribution (CPU generator: any device)."""
    out = out.detach().float().cpu()
    if out.shape[-1] == 1:  # regression: y ~ N(f(x), 1)
        return out.squeeze(-1) + torch.randn(out.shape[0], generator=generator)
    return torch.multinomial(out.softmax(-1), 1, generator=generator).squeeze(-1)


def _loss(out, labels):  # mean over the batch: MSE for float labels, cross entropy otherwise
    if labels.is_floating_point():
        return F.mse_loss(out.squeeze(-1).float(), labels.float())
    return F.cross_entropy(out.float(), labels)


class _Sums:
    """Running sums of a^T b over token rows. Rows wait until FLUSH_ROWS of them have come, then
    one matmul adds them: a d x d update from one short batch would be memory-bound."""

    def __init__(self):
        self.total, self.rows, self.count = {}, {}, {}

    def add(self, key, a, b=None):  # b=None: a^T a
        self.rows.setdefault(key, []).append((a, b))
        self.count[key] = self.count.get(key, 0) + a.shape[0]

    @torch.no_grad()
    def flush(self):
        for key, pairs in self.rows.items():
            a = torch.cat([p[0] for p in pairs])
            b = a if pairs[0][1] is None else torch.cat([p[1] for p in pairs])
            if key in self.total:
                self.total[key].addmm_(a.T, b)
            else:
                self.total[key] = a.T @ b
        self.rows.clear()


FLUSH_ROWS = 128  # tokens gathered before the sums are updated (memory: FLUSH_ROWS x dim per layer)


def collect_statistics(model, layers, batches, fisher="empirical", generator=None):
    """Streaming K-FAC statistics of §2 for `layers` ({name: nn.Linear}) over calibration batches.

    A batch is a dict: "labels" (long: cross entropy, float: MSE) is the target, "attention_mask"
    (1 = real token) excludes padding, the other entries go to model(**inputs), whose output (or
    its .logits) is [batch, classes]. Returns {name: (S, G, T)} in fp32: S d_in x d_in, G and T
    as the design; layers fed the same input tensor share one S. Under torch.distributed the
    sums are all-reduced, so every rank gets the statistics of the union of all ranks' batches.
    No weight gradients are made: activations and output gradients are read by hooks.
    """
    if fisher not in ("empirical", "sampled"):
        raise ValueError(f"fisher must be 'empirical' or 'sampled', got {fisher!r}")
    generator = generator or torch.Generator().manual_seed(0)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    seen = {}  # name -> (input, output) of the current batch
    S, G, T, share, names = _Sums(), _Sums(), _Sums(), {}, list(layers)
    n = pending = 0

    def pre_hook(module, inputs):  # frozen weights: make the input need grad so backward runs
        if torch.is_grad_enabled() and not inputs[0].requires_grad:
            inputs[0].requires_grad_(True)

    def hook(name):
        return lambda module, inputs, output: seen.__setitem__(name, (inputs[0], output))

    handles = [h for name, m in layers.items()
               for h in (m.register_forward_pre_hook(pre_hook), m.register_forward_hook(hook(name)))]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        for batch in batches:
            labels = batch["labels"]
            seen.clear()
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
            out = getattr(out, "logits", out)
            missing = [name for name in names if name not in seen]
            if missing:
                raise ValueError(f"layers {missing} were not called in the forward pass")
            if not share:  # first batch: layers whose input is the same tensor share S
                first = {}
                share.update({name: first.setdefault(id(seen[name][0]), name) for name in names})
            keep = batch.get("attention_mask")
            keep = None if keep is None else keep.bool()
            x = {key: _tokens(seen[key][0].detach(), keep) for key in dict.fromkeys(share.values())}
            ys, n_b = [seen[name][1] for name in names], labels.shape[0]
            seen.clear()
            delta = torch.autograd.grad(_loss(out, labels.to(out.device)), ys, allow_unused=True,
                                        retain_graph=fisher == "sampled")
            delta_T = [None] * len(names)
            if fisher == "sampled":
                sampled = _sampled_labels(out, generator).to(out.device)
                delta_T = torch.autograd.grad(_loss(out, sampled), ys, allow_unused=True)
            for key, rows in x.items():
                S.add(key, rows)  # sum_t x x^T  (d_in x d_in)
            for name, y, d, d_T in zip(names, ys, delta, delta_T):
                # d(mean loss)/dy * n_b = d(own loss)/dy per example; None: y does not reach the loss
                d = _tokens(torch.zeros_like(y) if d is None else d * n_b, keep)
                G.add(name, d, x[share[name]])  # sum_i sum_t delta x^T  (d_out x d_in)
                T.add(name, d if d_T is None else _tokens(d_T * n_b, keep))  # sum delta delta^T
            n, pending = n + n_b, pending + max(r.shape[0] for r in x.values())
            del out, ys, delta, delta_T, x
            if pending >= FLUSH_ROWS:
                for sums in (S, G, T):
                    sums.flush()
                pending = 0
        for sums in (S, G, T):
            sums.flush()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    if n == 0:
        raise ValueError("collect_statistics got no calibration batches")
    tokens = S.count
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        counts = torch.tensor([float(n)] + [float(tokens[k]) for k in sorted(tokens)],
                              device=next(iter(G.total.values())).device)
        for t in [counts] + [sums.total[k] for sums in (S, G, T) for k in sorted(sums.total)]:
            torch.distributed.all_reduce(t)
        n, tokens = counts[0].item(), dict(zip(sorted(tokens), counts[1:].tolist()))
    for key, total in S.total.items():  # in place: the statistics are the largest thing here
        total.div_(max(tokens[key], 1))
    for total in (*G.total.values(), *T.total.values()):
        total.div_(n)
    return {name: (S.total[share[name]], G.total[name], T.total[name]) for name in names}


# ----------------------------------------------------------------------------- §3 whitening


def _damped(X, damping):  # X + damping * (tr X / d) I; the identity when X = 0
    scale = X.trace() / X.shape[0]
    scale = scale if scale > 0 else X.new_tensor(1.0)
    return X + damping * scale * torch.eye(X.shape[0], dtype=X.dtype, device=X.device)


def whiten(G, S, T, damping=1e-2):
    """Cholesky factors of the damped metrics, S_l = L_S L_S^T and T_l = L_T L_T^T, and
    M = L_T^-1 G L_S^-T: the same singular values as T_l^-1/2 G S_l^-1/2 (orthogonal factors
    apart). Two Cholesky factorizations and two triangular solves; no inverse, no eigh."""
    try:
        L_S = torch.linalg.cholesky(_damped(S, damping))
        L_T = torch.linalg.cholesky(_damped(T, damping))
    except RuntimeError:
        raise ValueError(f"damped statistics are not positive definite (damping={damping}): "
                         "use damping > 0") from None
    M = torch.linalg.solve_triangular(L_T, G, upper=False)  # L_T^-1 G
    M = torch.linalg.solve_triangular(L_S, M.T, upper=False).T  # (L_S^-1 (L_T^-1 G)^T)^T
    return M, L_T, L_S


# ----------------------------------------------------------------------------- top-r SVD


def top_svd(M, k, generator=None):
    """Top singular triplets (U, sigma, V), M ~ U diag(sigma) V^T, at least k of them.

    Exact SVD when the matrix is small (then all singular values), else a randomized range
    finder with SVD_ITERS subspace iterations and a seeded generator: deterministic."""
    p = k + SVD_OVERSAMPLE
    if min(M.shape) <= 2 * p:
        U, sigma, Vh = torch.linalg.svd(M, full_matrices=False)
        return U, sigma, Vh.T
    generator = generator or torch.Generator().manual_seed(0)
    omega = torch.randn(M.shape[1], p, generator=generator, dtype=M.dtype).to(M.device)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(SVD_ITERS):
        Q = torch.linalg.qr(M @ torch.linalg.qr(M.T @ Q).Q).Q
    U, sigma, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)  # p x d_in, small
    return Q @ U, sigma, Vh.T


# ----------------------------------------------------------------------------- §4 factors


def _balanced_factors(M, L_T, L_S, rank, step, scaling, generator):
    """B = -sqrt(step/s) L_T^-T U_r S_r^1/2,  A = sqrt(step/s) S_r^1/2 V_r^T L_S^-1."""
    if not 0 < rank <= min(M.shape):
        raise ValueError(f"rank {rank} must be in 1..min(d_out, d_in) = {min(M.shape)}")
    U, sigma, V = top_svd(M, rank, generator)
    root, c = sigma[:rank].sqrt(), math.sqrt(step / scaling)
    B = -c * torch.linalg.solve_triangular(L_T.T, U[:, :rank] * root, upper=True)
    A = c * torch.linalg.solve_triangular(L_S.T, V[:, :rank] * root, upper=True).T
    return B, A, sigma


def cg_lora_factors(G, S, T, rank, damping=1e-2, step=1.0, scaling=1.0, generator=None):
    """CG-LoRA factors (§3-4): scaling * B @ A = step * dW_r, the best rank-r K-FAC Newton step.

    G: d_out x d_in gradient, S: d_in x d_in, T: d_out x d_out. Returns (B d_out x r,
    A r x d_in, sigma): sigma holds the top singular values of the whitened gradient
    (sigma_i^2 / 2 is direction i's predicted loss decrease). A zero gradient gives zero factors.
    """
    dtype = torch.float64 if G.dtype == torch.float64 else torch.float32  # fp32 at least
    M, L_T, L_S = whiten(G.to(dtype), S.to(dtype), T.to(dtype), damping)
    return _balanced_factors(M, L_T, L_S, rank, step, scaling, generator)


def balance(B, A, P=None, Q=None):
    """Square-root balancing (§4): B <- B R, A <- R^-1 A (B A unchanged) with
    B^T P B = A Q A^T = diag(h). P: d_out x d_out, Q: d_in x d_in, identity when None."""
    W_b = B.T @ B if P is None else B.T @ P @ B  # r x r "observability" gramian
    W_a = A @ A.T if Q is None else A @ Q @ A.T  # r x r "controllability" gramian
    try:
        L_b, L_a = torch.linalg.cholesky(W_b), torch.linalg.cholesky(W_a)
    except RuntimeError:
        raise ValueError("balance needs B and A of full rank r (got a rank-deficient pair)") from None
    U, h, Vh = torch.linalg.svd(L_b.T @ L_a)  # h: the "Hankel" singular values
    return B @ L_a @ Vh.T / h.sqrt(), (U.T @ L_b.T @ A) / h.sqrt()[:, None]


# ----------------------------------------------------------------------------- §6 baselines


def lora_factors(d_out, d_in, rank, generator=None):
    """Hu et al. 2022: A Kaiming-uniform (a = sqrt(5)), B = 0."""
    generator = generator or torch.Generator().manual_seed(0)
    A = (torch.rand(rank, d_in, generator=generator) * 2 - 1) / math.sqrt(d_in)
    return torch.zeros(d_out, rank), A


def lora_ga_factors(G, rank, gamma=LORA_GA_GAMMA, generator=None):
    """LoRA-GA (original repo): A = V[:, :r]^T, B = U[:, r:2r], both * d_out^(1/4) / sqrt(gamma)."""
    if 2 * rank > min(G.shape):
        raise ValueError(f"lora-ga needs 2 * rank <= min(d_out, d_in) = {min(G.shape)}")
    U, _, V = top_svd(G.float(), 2 * rank, generator)
    c = G.shape[0] ** 0.25 / math.sqrt(gamma)
    return c * U[:, rank:2 * rank], c * V[:, :rank].T


def lora_one_factors(G, rank, gamma=LORA_ONE_GAMMA, generator=None):
    """LoRA-One: SVD of -G, B = U_r S_r^1/2, A = S_r^1/2 V_r^T, both / sqrt(sigma_1 gamma)."""
    U, sigma, V = top_svd(-G.float(), rank, generator)
    root = sigma[:rank].sqrt() / math.sqrt(sigma[0] * gamma)
    return U[:, :rank] * root, (V[:, :rank] * root).T


# ----------------------------------------------------------------------------- §5 apply

METHODS = ("cg-lora", "cg-lora-shift", "lora", "rslora", "lora-ga", "lora-one")
RSLORA = {"cg-lora": True, "cg-lora-shift": True, "lora": False, "rslora": True,
          "lora-ga": False, "lora-one": True}  # scaling alpha/sqrt(r) (True) or alpha/r
SHIFTED = {"cg-lora-shift", "lora-ga"}  # these subtract s B A from W0 at init


def _norm2(B, A):  # spectral norm of B A from two thin QRs: ||B A|| = ||R_B R_A^T||
    return torch.linalg.matrix_norm(torch.linalg.qr(B).R @ torch.linalg.qr(A.T).R.T, ord=2)


@torch.no_grad()
def write_adapter(layer: LoRALinear, B, A, shift: bool):
    """The one place that writes an init into a model. shift: W0 <- W0 - s B A, computed from
    the factors after casting them to the model dtype, so the model's function is unchanged."""
    dtype = layer.lora_A.dtype
    B, A = B.to(layer.lora_B.device, dtype), A.to(layer.lora_A.device, dtype)
    layer.lora_B.copy_(B)
    layer.lora_A.copy_(A)
    layer.lora_B0.copy_(B if shift else torch.zeros_like(B))
    layer.lora_A0.copy_(A if shift else torch.zeros_like(A))
    if shift:
        offset = layer.scaling * (B.float() @ A.float())
        layer.base.weight.copy_((layer.base.weight.float() - offset).to(layer.base.weight.dtype))


def init_adapters(layers, method, stats=None, damping=1e-2, step=1.0, init_norm=None,
                  generator=None, log=print, factor_balance="euclidean"):
    """Initialise every LoRALinear in `layers` ({name: layer}) by `method`, from one statistics
    pass `stats` ({name: (S, G, T)}, as collect_statistics returns; entries are freed as used).

    CG-LoRA's factors are rescaled by one scalar per layer so that ||s B A||_2 = init_norm
    (default: LoRA-One's init size alpha / (sqrt(r) * 128); 0: the raw step * dW_r), then
    rebalanced so that B^T B = A A^T (factor_balance="euclidean", the default: the balance gradient
    descent on (A, B) conserves, as LoRA-One's factors have; B A is unchanged) or kept balanced in
    the curvature metric ("curvature": there |B| / |A| ~ sqrt(tr S / tr T), thousands through a
    fresh head, and training did not learn, see README). A layer whose gradient is zero keeps the
    plain LoRA init (reported as "fallback").
    Returns one report dict per layer: rank, captured energy, shifted, seconds, update norm.
    """
    if method not in METHODS:
        raise ValueError(f"unknown init method {method!r}; choose from {', '.join(METHODS)}")
    if factor_balance not in ("euclidean", "curvature"):
        raise ValueError(f"factor_balance must be 'euclidean' or 'curvature', got {factor_balance!r}")
    generator = generator or torch.Generator().manual_seed(0)
    shift = method in SHIFTED
    log(f"init {method}: {len(layers)} layers, W0 {'shifted by -s B A' if shift else 'kept'}")
    report = []
    for name, layer in layers.items():
        t0, r, s = time.perf_counter(), layer.rank, layer.scaling
        row = dict(layer=name, rank=r, shifted=shift, captured=None, fallback=None)
        B, A = lora_factors(*layer.base.weight.shape, r, generator)
        if method not in ("lora", "rslora"):
            if stats is None or name not in stats:
                raise ValueError(f"layer {name}: method {method} needs statistics for it")
            S, G, T = stats.pop(name)
            if not all(torch.isfinite(X).all() for X in (S, G, T)):
                raise ValueError(f"layer {name}: statistics contain NaN or Inf; check the "
                                 "calibration data and loss (run the model in fp32)")
            if G.abs().max() == 0:
                row["fallback"] = "zero gradient: plain LoRA init"
            elif method == "lora-ga":
                B, A = lora_ga_factors(G, r, generator=generator)
            elif method == "lora-one":
                B, A = lora_one_factors(G, r, generator=generator)
            else:
                try:
                    M, L_T, L_S = whiten(G, S, T, damping)
                    B, A, sigma = _balanced_factors(M, L_T, L_S, r, step, s, generator)
                except ValueError as e:
                    raise ValueError(f"layer {name}: {e}") from None
                row["captured"] = (sigma[:r].square().sum() / M.square().sum()).item()
                target = init_norm
                if target is None:
                    target = layer.alpha / (math.sqrt(r) * LORA_ONE_GAMMA)
                if target:
                    c = math.sqrt(target / (s * _norm2(B, A)).item())
                    B, A = B * c, A * c
                if factor_balance == "euclidean" and sigma[r - 1] > 0:  # sigma_r = 0: rank < r, B A is 0 there
                    B, A = balance(B, A)
        write_adapter(layer, B, A, shift)
        row["update_norm"] = (s * _norm2(layer.lora_B.float(), layer.lora_A.float())).item()
        row["seconds"] = time.perf_counter() - t0
        report.append(row)
    return report
