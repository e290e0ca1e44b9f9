"""Tests: each checks a claim of ../shared/design/cg-lora.md (or of the code) and fails if it is false."""
import copy
import math

import pytest
import torch
from torch import nn

import cglora
from cglora import (LoRALinear, add_lora, balance, cg_lora_factors, collect_statistics,
                    init_adapters, lora_state_dict, top_svd)

# ============================================================================ cglora.py: math


def _spd(d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, 3 * d, generator=g, dtype=dtype)
    return X @ X.T / (3 * d) + 0.1 * torch.eye(d, dtype=dtype)


def _mpow(X, p):  # symmetric matrix power by eigh: the brute-force route the code avoids
    w, Q = torch.linalg.eigh(X)
    return Q @ torch.diag(w ** p) @ Q.T


def _damp(X, damping):
    return X + damping * X.trace() / X.shape[0] * torch.eye(X.shape[0], dtype=X.dtype)


def _brute_step(G, S, T, rank, damping):
    """dW_r by explicit whitening with eigh: -T^-1/2 [T^-1/2 G S^-1/2]_r S^-1/2, and sigma."""
    Sl, Tl = _damp(S, damping), _damp(T, damping)
    U, sigma, Vh = torch.linalg.svd(_mpow(Tl, -0.5) @ G @ _mpow(Sl, -0.5))
    dW = -_mpow(Tl, -0.5) @ U[:, :rank] @ torch.diag(sigma[:rank]) @ Vh[:rank] @ _mpow(Sl, -0.5)
    return dW, sigma


def _objective(dW, G, H):  # 1/2 vec(dW)^T (S (x) T) vec(dW) + <G, dW>, built explicitly
    v = dW.T.reshape(-1)  # column-major vec, so that (S (x) T) vec(dW) = vec(T dW S)
    return 0.5 * v @ H @ v + (G * dW).sum()


def _problem(d_out=6, d_in=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return G, _spd(d_in, seed + 1), _spd(d_out, seed + 2)


@pytest.mark.parametrize("rank,damping,step,scaling", [(1, 1e-2, 1.0, 1.0), (2, 0.3, 0.5, 2.0),
                                                       (3, 0.0, 1.0, 0.25)])
def test_cg_factors_equal_brute_force_kronecker_whitening(rank, damping, step, scaling):
    G, S, T = _problem()
    B, A, sigma = cg_lora_factors(G, S, T, rank, damping=damping, step=step, scaling=scaling)
    dW, sigma_ref = _brute_step(G, S, T, rank, damping)
    torch.testing.assert_close(scaling * B @ A, step * dW, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(sigma, sigma_ref, atol=1e-8, rtol=1e-8)
    H = torch.kron(_damp(S, damping), _damp(T, damping))
    # value of the rank-r step in the explicit second-order model: -1/2 sum_{i<=r} sigma_i^2
    assert _objective(dW, G, H).item() == pytest.approx(-0.5 * sigma[:rank].square().sum().item())


def test_full_rank_step_is_the_kfac_newton_step():
    G, S, T = _problem()
    B, A, _ = cg_lora_factors(G, S, T, rank=5, damping=1e-2)
    H = torch.kron(_damp(S, 1e-2), _damp(T, 1e-2))
    newton = -torch.linalg.solve(H, G.T.reshape(-1)).reshape(5, 6).T  # -H^-1 vec(G), unvec
    torch.testing.assert_close(B @ A, newton, atol=1e-8, rtol=1e-8)


def test_cg_step_beats_random_and_baseline_updates_in_the_curvature_metric():
    G, S, T = _problem(8, 7, seed=3)
    rank, damping = 2, 1e-2
    H = torch.kron(_damp(S, damping), _damp(T, damping))
    B, A, _ = cg_lora_factors(G, S, T, rank, damping=damping)
    best = _objective(B @ A, G, H)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        D = torch.randn(8, rank, generator=g, dtype=G.dtype) @ torch.randn(rank, 7, generator=g, dtype=G.dtype)
        assert best < _objective(D, G, H)

    def best_multiple(D):  # min over c of f(c D): the baseline direction at its best length
        v = D.T.reshape(-1)
        return -((G * D).sum() ** 2) / (2 * v @ H @ v)

    Bg, Ag = cglora.lora_ga_factors(G, rank)
    Bo, Ao = cglora.lora_one_factors(G, rank)
    for D in (Bg @ Ag, Bo @ Ao):
        assert best < best_multiple(D.double()) - 1e-6


def test_no_whitening_reduces_to_top_r_step_of_minus_G():
    G, _, _ = _problem()
    I5, I6 = torch.eye(5, dtype=G.dtype), torch.eye(6, dtype=G.dtype)
    B, A, _ = cg_lora_factors(G, I5, I6, rank=2, damping=0.0, step=0.7, scaling=3.0)
    U, s, Vh = torch.linalg.svd(G)
    top = U[:, :2] @ torch.diag(s[:2]) @ Vh[:2]
    torch.testing.assert_close(3.0 * B @ A, -0.7 * top, atol=1e-10, rtol=1e-10)
    # and so, after one rescale, CG-LoRA's update is LoRA-One's (same directions and weights)
    Bo, Ao = cglora.lora_one_factors(G, 2)
    ours, theirs = B @ A, (Bo @ Ao).double()
    torch.testing.assert_close(ours / ours.norm(), theirs / theirs.norm(), atol=1e-6, rtol=1e-6)


def test_cg_factors_are_balanced_in_the_curvature_metric():
    G, S, T = _problem()
    B, A, sigma = cg_lora_factors(G, S, T, rank=3, damping=0.1, step=2.0, scaling=0.5)
    left, right = B.T @ _damp(T, 0.1) @ B, A @ _damp(S, 0.1) @ A.T
    torch.testing.assert_close(left, right, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(left, torch.diag(2.0 / 0.5 * sigma[:3]), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("metric", [False, True])
def test_balance_keeps_product_and_balances(metric):
    g = torch.Generator().manual_seed(5)
    B = torch.randn(7, 3, generator=g, dtype=torch.float64)
    A = torch.randn(3, 6, generator=g, dtype=torch.float64) * 10  # badly unbalanced
    P, Q = (_spd(7, 1), _spd(6, 2)) if metric else (None, None)
    B2, A2 = balance(B, A, P, Q)
    torch.testing.assert_close(B2 @ A2, B @ A, atol=1e-10, rtol=1e-10)
    left = B2.T @ (P if metric else torch.eye(7, dtype=B.dtype)) @ B2
    right = A2 @ (Q if metric else torch.eye(6, dtype=B.dtype)) @ A2.T
    torch.testing.assert_close(left, right, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(left, torch.diag(torch.diag(left)), atol=1e-9, rtol=1e-9)
    assert not torch.allclose(B.T @ B, A @ A.T, atol=1e-3)  # the input really was unbalanced


def test_balance_rejects_rank_deficient_pair():
    with pytest.raises(ValueError, match="full rank"):
        balance(torch.zeros(4, 2), torch.randn(2, 3))


def test_gradient_descent_conserves_euclidean_imbalance_to_second_order():
    g = torch.Generator().manual_seed(0)
    B0, A0, X = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 3), (3, 4), (5, 4)))

    def drift(eta):  # one gradient step on 1/2 ||B A - X||^2: change of B^T B, of the imbalance
        E = B0 @ A0 - X
        B, A = B0 - eta * E @ A0.T, A0 - eta * B0.T @ E
        return ((B.T @ B - B0.T @ B0).norm().item(),
                ((B.T @ B - A @ A.T) - (B0.T @ B0 - A0 @ A0.T)).norm().item())

    (moved, d2), (_, d3) = drift(1e-2), drift(1e-3)
    assert d2 < 0.05 * moved  # B^T B moves at first order, the imbalance does not
    assert 80 < d2 / d3 < 120  # O(eta^2): a ten times smaller step drifts 100 times less


def test_randomized_top_svd_matches_exact_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    U0 = torch.linalg.qr(torch.randn(200, 60, generator=g, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(150, 60, generator=g, dtype=torch.float64)).Q
    M = U0 @ torch.diag(0.7 ** torch.arange(60, dtype=torch.float64)) @ V0.T
    U, s, V = top_svd(M, 5, torch.Generator().manual_seed(1))
    assert s.shape[0] == 5 + cglora.SVD_OVERSAMPLE  # really the randomized path (exact gives 150)
    torch.testing.assert_close(s[:5], 0.7 ** torch.arange(5, dtype=torch.float64), rtol=1e-9, atol=0)
    overlap = (U[:, :5].T @ U0[:, :5]).abs()
    torch.testing.assert_close(overlap, torch.eye(5, dtype=M.dtype), atol=1e-8, rtol=0)
    U2, s2, V2 = top_svd(M, 5, torch.Generator().manual_seed(1))
    assert torch.equal(U, U2) and torch.equal(s, s2) and torch.equal(V, V2)


def test_zero_gradient_gives_zero_factors_not_nan():
    _, S, T = _problem()
    B, A, sigma = cg_lora_factors(torch.zeros(6, 5, dtype=torch.float64), S, torch.zeros_like(T), 2)
    assert torch.isfinite(B).all() and torch.isfinite(A).all() and (B @ A).abs().max() == 0


def test_rank_too_large_for_factors():
    G, S, T = _problem()
    with pytest.raises(ValueError, match="rank 6"):
        cg_lora_factors(G, S, T, rank=6)


def test_singular_statistics_without_damping_is_a_clear_error():
    G, S, T = _problem()
    with pytest.raises(ValueError, match="damping"):
        cg_lora_factors(G, torch.zeros_like(S) + 1.0, T, rank=2, damping=0.0)


# ============================================================================ cglora.py: model side


class _Tiny(nn.Module):
    """Two layers share an input (query/value), one sees a padded sequence, one is a 2-d head,
    one is called but does not reach the loss (zero gradient)."""

    def __init__(self, vocab=13, d=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.query, self.value = nn.Linear(d, 5), nn.Linear(d, 5)
        self.mix, self.dead = nn.Linear(5, d), nn.Linear(d, 4)
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)  # B L d
        self.dead(h)
        z = self.mix(torch.tanh(self.query(h)) * self.value(h))
        m = attention_mask.unsqueeze(-1).float()
        return self.head(torch.tanh((z * m).sum(1) / m.sum(1)))


def _batches(seed=0, sizes=(3, 2), vocab=13, classes=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        lengths = torch.randint(2, 7, (n,), generator=g)
        L = int(lengths.max())
        ids = torch.randint(1, vocab, (n, L), generator=g)
        mask = (torch.arange(L)[None] < lengths[:, None]).long()
        out.append(dict(input_ids=ids * mask, attention_mask=mask,
                        labels=torch.randint(0, classes, (n,), generator=g)))
    return out


def _model(seed=0):
    torch.manual_seed(seed)
    return _Tiny()


def _per_example_stats(model, batches, names):
    """S, G, T of section 2 by brute force: one unpadded example at a time, the output
    gradient of the example's own loss read through an added zero tensor."""
    model = copy.deepcopy(model)
    acc = {n: [0, 0, 0] for n in names}
    tokens, n_ex = 0, 0
    for batch in batches:
        for i in range(batch["labels"].shape[0]):
            L = int(batch["attention_mask"][i].sum())
            ids, mask = batch["input_ids"][i:i + 1, :L], batch["attention_mask"][i:i + 1, :L]
            xs, zs, hooks = {}, {}, []
            for n in names:
                def hook(m, inp, out, n=n):
                    xs[n] = inp[0].detach().reshape(-1, inp[0].shape[-1])
                    zs[n] = torch.zeros_like(out, requires_grad=True)
                    return out + zs[n]
                hooks.append(getattr(model, n).register_forward_hook(hook))
            loss = nn.functional.cross_entropy(model(ids, mask), batch["labels"][i:i + 1])
            grads = torch.autograd.grad(loss, [zs[n] for n in names], allow_unused=True)
            for h in hooks:
                h.remove()
            for n, d in zip(names, grads):
                d = torch.zeros_like(zs[n]) if d is None else d
                d = d.reshape(-1, d.shape[-1])
                acc[n][0] = acc[n][0] + xs[n].T @ xs[n]
                acc[n][1] = acc[n][1] + d.T @ xs[n]
                acc[n][2] = acc[n][2] + d.T @ d
            tokens, n_ex = tokens + L, n_ex + 1
    return {n: (S / (tokens if n != "head" else n_ex), G / n_ex, T / n_ex) for n, (S, G, T) in acc.items()}


def test_statistics_equal_per_example_brute_force_with_padding():
    model, batches = _model(), _batches()
    names = ["query", "value", "mix", "head", "dead"]
    stats = collect_statistics(model, {n: getattr(model, n) for n in names}, batches)
    ref = _per_example_stats(model, batches, names)
    for n in names:
        for got, want in zip(stats[n], ref[n]):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert stats["query"][0] is stats["value"][0]  # a shared input shares one S
    assert stats["dead"][1].abs().max() == 0  # called, but does not reach the loss


def test_statistics_G_is_autograd_gradient_of_mean_loss():
    model, batches = _model(), _batches(sizes=(4, 1, 2))
    stats = collect_statistics(model, {"mix": model.mix}, batches)
    n = sum(b["labels"].shape[0] for b in batches)
    loss = sum(nn.functional.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"],
                                           reduction="sum") for b in batches) / n
    grad, = torch.autograd.grad(loss, model.mix.weight)
    torch.testing.assert_close(stats["mix"][1], grad, atol=1e-6, rtol=1e-5)


def test_statistics_leave_no_hooks_grads_or_changed_flags():
    model, batches = _model(), _batches()
    model.head.weight.requires_grad_(False)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    collect_statistics(model, {"query": model.query, "mix": model.mix}, batches, fisher="sampled")
    with pytest.raises(KeyError):  # a failing pass must clean up too
        collect_statistics(model, {"query": model.query}, [{"input_ids": batches[0]["input_ids"]}])
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags and model.training


def test_sampled_fisher_estimates_the_model_expected_T():
    model, batch = _model(1), _batches(seed=2, sizes=(4,))[0]
    layers = {"mix": model.mix}
    est = collect_statistics(model, layers, [batch] * 300, fisher="sampled",
                             generator=torch.Generator().manual_seed(0))["mix"]
    emp = collect_statistics(model, layers, [batch])["mix"]
    with torch.no_grad():
        probs = model(batch["input_ids"], batch["attention_mask"]).softmax(-1)
    exact = 0  # E_{y ~ model}[T]: enumerate every class, weighted by its probability
    for c in range(3):
        b = dict(batch, labels=torch.full_like(batch["labels"], c))
        for i in range(4):
            one = {k: v[i:i + 1] for k, v in b.items()}
            exact = exact + probs[i, c] * collect_statistics(model, layers, [one])["mix"][2] / 4
    torch.testing.assert_close(est[1], emp[1])  # G always uses the true labels
    err = ((est[2] - exact).norm() / exact.norm()).item()
    assert err < 0.15 and err < ((emp[2] - exact).norm() / exact.norm()).item()


# ============================================================================ cglora.py: LoRA layer


def test_lora_linear_zero_B_equals_base_and_merge_round_trip():
    torch.manual_seed(0)
    base = nn.Linear(5, 4)
    layer = LoRALinear(base, rank=2, alpha=4)
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    y = layer(x)
    W = base.weight.detach().clone()
    torch.testing.assert_close(y, x @ (W + 2.0 * layer.lora_B @ layer.lora_A).T + base.bias)
    layer.merge()
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(base.weight, W + layer.delta_weight())
    layer.unmerge()
    torch.testing.assert_close(base.weight, W)
    torch.testing.assert_close(layer(x), y)
    assert LoRALinear(nn.Linear(16, 16), 4, alpha=8, rslora=True).scaling == 4.0


def test_add_lora_trains_only_adapters_and_named_modules_with_peft_keys():
    model = _model()
    layers = add_lora(model, ["query", "mix"], rank=2, alpha=4, trainable=["head"])
    assert set(layers) == {"query", "mix"} and isinstance(model.query, LoRALinear)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_()
    b = _batches()[0]
    nn.functional.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"]).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {"query.lora_A", "query.lora_B", "mix.lora_A", "mix.lora_B", "head.weight", "head.bias"}
    assert sorted(lora_state_dict(model)) == [f"base_model.model.{n}.lora_{f}.weight"
                                              for n in ("mix", "query") for f in "AB"]
    assert lora_state_dict(model)["base_model.model.query.lora_A.weight"].shape == (2, 6)


def test_add_lora_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"\['nope'\].*'query'"):
        add_lora(_model(), ["query", "nope"], rank=2, alpha=4)
    with pytest.raises(ValueError, match="layer head: rank 4"):
        add_lora(_model(), ["head"], rank=4, alpha=4)
    with pytest.raises(ValueError, match="trainable module 'classifier'"):
        add_lora(_model(), ["query"], rank=2, alpha=4, trainable=["classifier"])


# ============================================================================ cglora.py: init


def _adapted(method, seed=0, **kw):
    model = _model(seed)
    reference = copy.deepcopy(model)
    layers = add_lora(model, ["query", "value", "mix"], rank=2, alpha=4, rslora=cglora.RSLORA[method])
    stats = collect_statistics(model, {n: layer.base for n, layer in layers.items()}, _batches())
    report = init_adapters(layers, method, stats, log=lambda *a: None, **kw)
    return model, reference, layers, report


@pytest.mark.parametrize("method", ["cg-lora-shift", "lora-ga"])
def test_shifted_inits_keep_the_model_function(method):
    model, reference, layers, report = _adapted(method)
    assert all(r["shifted"] for r in report)
    assert all(layer.lora_B.abs().max() > 0 for layer in layers.values())
    for b in _batches(seed=7):
        torch.testing.assert_close(model(b["input_ids"], b["attention_mask"]),
                                   reference(b["input_ids"], b["attention_mask"]), atol=1e-5, rtol=0)
    # exported relative to the original W0 as rank 2r: W0 + s B' A' is the effective weight
    sd = lora_state_dict(model)
    for n, layer in layers.items():
        A, B = sd[f"base_model.model.{n}.lora_A.weight"], sd[f"base_model.model.{n}.lora_B.weight"]
        assert A.shape[0] == 4
        W0 = getattr(reference, n).weight
        torch.testing.assert_close(W0 + layer.scaling * B @ A, layer.base.weight + layer.delta_weight(),
                                   atol=1e-6, rtol=0)


def test_unshifted_cg_lora_moves_weights_by_exactly_step_dW_r():
    model = _model()
    W0 = model.mix.weight.detach().clone()
    layers = add_lora(model, ["mix"], rank=2, alpha=4)
    stats = collect_statistics(model, {"mix": layers["mix"].base}, _batches())
    S, G, T = (X.double() for X in stats["mix"])
    report = init_adapters(layers, "cg-lora", stats, damping=0.1, step=0.3, init_norm=0, log=lambda *a: None)
    dW, sigma = _brute_step(G, S, T, 2, 0.1)
    layer = layers["mix"]
    assert torch.equal(layer.base.weight, W0) and not report[0]["shifted"]
    torch.testing.assert_close(layer.delta_weight().double(), 0.3 * dW, atol=1e-5, rtol=1e-4)
    assert report[0]["captured"] == pytest.approx((sigma[:2].square().sum() / sigma.square().sum()).item(), rel=1e-4)


@pytest.mark.parametrize("init_norm", [None, 0.02])
def test_cg_lora_update_norm_is_normalised(init_norm):
    _, _, layers, report = _adapted("cg-lora", init_norm=init_norm)
    want = 4 / (math.sqrt(2) * cglora.LORA_ONE_GAMMA) if init_norm is None else init_norm
    for layer, row in zip(layers.values(), report):
        norm = torch.linalg.matrix_norm(layer.delta_weight(), ord=2).item()
        assert norm == pytest.approx(want, rel=1e-4) and row["update_norm"] == pytest.approx(want, rel=1e-4)
        assert 0 < row["captured"] <= 1


def test_same_seed_gives_identical_factors():
    a = _adapted("cg-lora", generator=torch.Generator().manual_seed(3))[2]
    b = _adapted("cg-lora", generator=torch.Generator().manual_seed(3))[2]
    for n in a:
        assert torch.equal(a[n].lora_A, b[n].lora_A) and torch.equal(a[n].lora_B, b[n].lora_B)


def test_lora_one_size_equals_cg_default_norm():
    _, _, layers, _ = _adapted("lora-one")
    for layer in layers.values():  # ||s B A|| = s / gamma, the default CG-LoRA init_norm
        norm = torch.linalg.matrix_norm(layer.delta_weight(), ord=2).item()
        assert norm == pytest.approx(4 / (math.sqrt(2) * cglora.LORA_ONE_GAMMA), rel=1e-4)


def test_init_errors_and_zero_gradient_fallback():
    model = _model()
    layers = add_lora(model, ["dead", "mix"], rank=2, alpha=4)
    stats = collect_statistics(model, {n: layer.base for n, layer in layers.items()}, _batches())
    report = init_adapters(layers, "cg-lora", dict(stats), log=lambda *a: None)
    rows = {r["layer"]: r for r in report}
    assert rows["dead"]["fallback"] and rows["mix"]["fallback"] is None
    assert layers["dead"].lora_B.abs().max() == 0 and torch.isfinite(layers["dead"].lora_A).all()
    S, G, T = stats["mix"]
    bad = {"mix": (S, G * float("nan"), T)}
    with pytest.raises(ValueError, match="layer mix: statistics contain NaN"):
        init_adapters({"mix": layers["mix"]}, "cg-lora", bad, log=lambda *a: None)
    with pytest.raises(ValueError, match="unknown init method 'pissa'"):
        init_adapters(layers, "pissa", stats)
