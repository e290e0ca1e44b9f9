"""Tests of cglora.py: each checks a claim of docs/cg-lora.md or of the code and fails if it is
false.

Sections in reading order: cglora.py (math, model side, LoRA layer, init, token-level losses, devices,
clear failures). The other modules' tests mirror them under tests/ (test_models.py, test_data.py,
test_train.py, test_bench.py, test_results.py, test_interop.py, test_readme.py), with the fixtures
they share in tests/conftest.py. No test reaches the network.
"""
import contextlib
import copy
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import cglora
import train
from cglora import (LoRALinear, add_lora, balance, cg_lora_factors, collect_statistics,
                    init_adapters, lora_state_dict, top_svd)
from tests.conftest import _offline  # noqa: F401  autouse: no test reaches the network


# ============================================================================ cglora.py: math


def _spd(d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, 3 * d, generator=g, dtype=dtype)
    return X @ X.T / (3 * d) + 0.1 * torch.eye(d, dtype=dtype)


def _mpow(X, p):  # symmetric matrix power by eigh: the brute-force route the code avoids
    w, Q = torch.linalg.eigh(X)
    return Q @ torch.diag(w ** p) @ Q.T


def _sgt(stats):  # a layer's pooled S, G, T
    return stats.S, stats.G, stats.T


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
    B, A, sigma, energy = cg_lora_factors(G, S, T, rank, damping=damping, step=step,
                                          scaling=scaling)
    dW, sigma_ref = _brute_step(G, S, T, rank, damping)
    torch.testing.assert_close(scaling * B @ A, step * dW, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(sigma, sigma_ref[:rank], atol=1e-8, rtol=1e-8)
    assert energy.item() == pytest.approx(sigma_ref.square().sum().item(), rel=1e-10)  # ||M||_F^2
    H = torch.kron(_damp(S, damping), _damp(T, damping))
    # value of the rank-r step in the explicit second-order model: -1/2 sum_{i<=r} sigma_i^2
    assert _objective(dW, G, H).item() == pytest.approx(-0.5 * sigma[:rank].square().sum().item())


def test_full_rank_step_is_the_kfac_newton_step():
    G, S, T = _problem()
    B, A = cg_lora_factors(G, S, T, rank=5, damping=1e-2)[:2]
    H = torch.kron(_damp(S, 1e-2), _damp(T, 1e-2))
    newton = -torch.linalg.solve(H, G.T.reshape(-1)).reshape(5, 6).T  # -H^-1 vec(G), unvec
    torch.testing.assert_close(B @ A, newton, atol=1e-8, rtol=1e-8)


def test_cg_step_beats_random_and_baseline_updates_in_the_curvature_metric():
    G, S, T = _problem(8, 7, seed=3)
    rank, damping = 2, 1e-2
    H = torch.kron(_damp(S, damping), _damp(T, damping))
    B, A = cg_lora_factors(G, S, T, rank, damping=damping)[:2]
    best = _objective(B @ A, G, H)

    def best_multiple(D):  # min over c of f(c D): the direction D at its best length (exact line search)
        v = D.T.reshape(-1)
        return -((G * D).sum() ** 2) / (2 * v @ H @ v)

    assert best_multiple(B @ A) == pytest.approx(best.item(), rel=1e-10)  # the step is at its best length
    g = torch.Generator().manual_seed(0)
    for _ in range(100):  # the claim is about every rank-r update: give each random one its best length
        D = torch.randn(8, rank, generator=g, dtype=G.dtype) @ torch.randn(rank, 7, generator=g, dtype=G.dtype)
        assert best < best_multiple(D)
    Bg, Ag = cglora.lora_ga_factors(G, rank)
    Bo, Ao = cglora.lora_one_factors(G, rank)
    for D in (Bg @ Ag, Bo @ Ao):
        assert best < best_multiple(D.double()) - 1e-6


def test_no_whitening_reduces_to_top_r_step_of_minus_G():
    G, _, _ = _problem()
    I5, I6 = torch.eye(5, dtype=G.dtype), torch.eye(6, dtype=G.dtype)
    B, A = cg_lora_factors(G, I5, I6, rank=2, damping=0.0, step=0.7, scaling=3.0)[:2]
    U, s, Vh = torch.linalg.svd(G)
    top = U[:, :2] @ torch.diag(s[:2]) @ Vh[:2]
    torch.testing.assert_close(3.0 * B @ A, -0.7 * top, atol=1e-10, rtol=1e-10)
    # and so, after one rescale, CG-LoRA's update is LoRA-One's (same directions and weights)
    Bo, Ao = cglora.lora_one_factors(G, 2)
    ours, theirs = B @ A, (Bo @ Ao).double()
    torch.testing.assert_close(ours / ours.norm(), theirs / theirs.norm(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("c", [0.05, 20.0])
def test_relative_damping_makes_the_step_independent_of_the_scale_of_inputs_and_loss(c):
    """§3: the damping is relative to tr S / d and tr T / d, so inputs scaled by c (G -> c G, S -> c^2 S) give
    the step dW_r / c, and a loss scaled by c (G -> c G, T -> c^2 T) gives dW_r / c: the same M, the same
    directions, at any scale of the statistics (here tr / d far below and above 1)."""
    G, S, T = _problem(seed=5)
    B, A, sigma = cg_lora_factors(G, S, T, 2, damping=0.3)[:3]
    for G2, S2, T2 in ((c * G, c * c * S, T), (c * G, S, c * c * T)):
        B2, A2, sigma2 = cg_lora_factors(G2, S2, T2, 2, damping=0.3)[:3]
        torch.testing.assert_close(B2 @ A2, B @ A / c, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(sigma2, sigma, atol=1e-10, rtol=1e-8)


def test_cg_factors_are_balanced_in_the_curvature_metric():
    G, S, T = _problem()
    B, A, sigma = cg_lora_factors(G, S, T, rank=3, damping=0.1, step=2.0, scaling=0.5)[:3]
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


def test_gradient_descent_on_a_lora_layer_conserves_euclidean_imbalance_to_second_order():
    """§4: gradient descent on (A, B) changes B^T B - A A^T only at second order in the step, for any
    loss of the product B A, so a balanced init stays balanced. One SGD step through LoRALinear (with
    dropout on its input, where peft puts it) on a least-squares loss, the same dropout mask at every step size."""
    g = torch.Generator().manual_seed(0)
    B0, A0 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 5, generator=g, dtype=torch.float64)

    def drift(eta):  # one step: change of B^T B, change of the imbalance
        torch.manual_seed(1)  # the same base weight and dropout mask at every step size
        layer = LoRALinear(nn.Linear(4, 5, dtype=torch.float64), rank=3, alpha=3, dropout=0.3)
        with torch.no_grad():
            layer.lora_B.copy_(B0), layer.lora_A.copy_(A0)
        (0.5 * (layer(x) - y).square().sum(1).mean()).backward()
        torch.optim.SGD([layer.lora_A, layer.lora_B], lr=eta).step()
        B, A = layer.lora_B.detach(), layer.lora_A.detach()
        return ((B.T @ B - B0.T @ B0).norm().item(),
                ((B.T @ B - A @ A.T) - (B0.T @ B0 - A0 @ A0.T)).norm().item())

    (moved, d2), (_, d3) = drift(1e-3), drift(1e-4)
    assert d2 < 0.05 * moved  # B^T B moves at first order, the imbalance does not
    assert 80 < d2 / d3 < 120  # O(eta^2): a ten times smaller step drifts 100 times less


def _old_randomized_top_svd(M, k, iters=4, oversample=10):  # what top_svd was: fixed iterations
    omega = torch.randn(M.shape[1], k + oversample, generator=torch.Generator().manual_seed(0), dtype=M.dtype)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(iters):
        Q = torch.linalg.qr(M @ torch.linalg.qr(M.T @ Q).Q).Q
    U, sigma, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ U[:, :k], sigma[:k], Vh[:k].T


def test_top_svd_is_exact_on_a_flat_spectrum_where_fixed_iterations_fail():
    # a real layer's whitened gradient: sigma_8 / sigma_9 = 1.01, a slowly decaying tail (design §3)
    g = torch.Generator().manual_seed(0)
    U0 = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(250, 250, generator=g, dtype=torch.float64)).Q
    sigma0 = 1.0 / (1 + 0.01 * torch.arange(250, dtype=torch.float64))
    M = U0[:, :250] @ torch.diag(sigma0) @ V0.T
    exact = U0[:, :8] @ torch.diag(sigma0[:8]) @ V0[:, :8].T  # the best rank-8 approximation

    def error(U, s, V):
        return ((U * s) @ V.T - exact).norm().item() / exact.norm().item()

    assert error(*_old_randomized_top_svd(M, 8)) > 0.3  # the old code: far from the exact top 8
    U, s, V = top_svd(M, 8)
    assert error(U, s, V) < 1e-10  # the product, so a sign flip of V alone would fail
    torch.testing.assert_close(s, sigma0[:8], rtol=1e-12, atol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(8, dtype=M.dtype), atol=1e-12, rtol=0)
    assert (U.gather(0, U.abs().argmax(0, keepdim=True)) > 0).all()  # the sign convention
    assert all(torch.equal(a, b) for a, b in zip((U, s, V), top_svd(M.clone(), 8)))  # deterministic


def test_zero_gradient_gives_zero_factors_not_nan():
    _, S, T = _problem()
    G = torch.zeros(6, 5, dtype=torch.float64)
    B, A, _, energy = cg_lora_factors(G, S, torch.zeros_like(T), 2)
    assert torch.isfinite(B).all() and torch.isfinite(A).all()
    assert (B @ A).abs().max() == 0 == energy


def test_rank_too_large_for_factors():
    G, S, T = _problem()
    for rank in (6, 0):
        with pytest.raises(ValueError, match=f"rank {rank} must be in 1..min"):
            cg_lora_factors(G, S, T, rank=rank)


def test_singular_statistics_without_damping_is_a_clear_error():
    G, S, T = _problem()
    with pytest.raises(ValueError, match="damping"):
        cg_lora_factors(G, torch.zeros_like(S) + 1.0, T, rank=2, damping=0.0)


def test_predicted_decrease_is_the_best_multiple_in_the_explicit_quadratic_model():
    G, S, T = _problem(7, 6, seed=4)
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(7, 2, generator=g, dtype=G.dtype), torch.randn(2, 6, generator=g, dtype=G.dtype)
    H = torch.kron(S, T)
    best = min(_objective(c * B @ A, G, H).item() for c in torch.linspace(-3, 3, 20001, dtype=G.dtype))
    assert cglora.predicted_decrease(B, A, G, S, T) == pytest.approx(-best, rel=1e-6)
    assert cglora.predicted_decrease(B, -A, G, S, T) == pytest.approx(-best, rel=1e-6)  # the sign is free
    # the rank-r CG step reaches the whole rank-r optimum: q = sum of its sigma_i^2 / 2
    Bc, Ac, sigma = cg_lora_factors(G, S, T, 2, damping=0.0)[:3]
    assert cglora.predicted_decrease(Bc, Ac, G, S, T) == pytest.approx(0.5 * sigma.square().sum().item())


def test_overlap_of_column_spaces():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    assert cglora.overlap(X, X @ torch.randn(3, 3, generator=g, dtype=X.dtype)) == pytest.approx(1.0)
    Q = torch.linalg.qr(torch.randn(20, 6, generator=g, dtype=X.dtype)).Q
    assert cglora.overlap(Q[:, :3], Q[:, 3:]) == pytest.approx(0.0, abs=1e-12)
    Y = torch.randn(20, 3, generator=g, dtype=X.dtype)
    P = lambda Z: Z @ torch.linalg.pinv(Z)  # noqa: E731  orthogonal projector onto span(Z)
    assert cglora.overlap(X, Y) == pytest.approx((P(X) @ P(Y)).trace().item() / 3)


def test_folds_pool_to_the_statistics_of_all_batches():
    model, batches = _model(), _batches(sizes=(3, 2, 4, 1, 2))
    layers = {"query": model.query, "mix": model.mix}
    one = collect_statistics(model, layers, batches, folds=1)
    three = collect_statistics(model, layers, batches, folds=3)
    for name in layers:
        for X, Y in zip(_sgt(one[name]), _sgt(three[name])):
            torch.testing.assert_close(X, Y, atol=1e-6, rtol=1e-5)
        for k, fold in enumerate(three[name].folds):  # fold k = batches k, k + 3, ...
            alone = collect_statistics(model, layers, batches[k::3], folds=1)[name]
            for X, Y in zip(_sgt(alone), fold[:3]):
                torch.testing.assert_close(X, Y, atol=1e-6, rtol=1e-5)
            assert fold.n == sum(b["labels"].shape[0] for b in batches[k::3])
            assert fold.tokens == sum(b["attention_mask"].sum().item() for b in batches[k::3])
    assert cglora.pool(three["mix"].folds[1:2]) is three["mix"].folds[1]  # one fold's pool is itself, not a copy
    for name in layers:  # a fold's S is its own, not another input's
        assert all(f.S is g.S for f, g in zip(three[name].folds, three["query"].folds)) == (name == "query")
    with pytest.raises(ValueError, match="a fold has no loss terms: 6 folds need at least 6 batches with labels not all -100"):
        collect_statistics(model, layers, batches, folds=6)


def test_statistics_hold_pooled_tensors_one_S_per_input_and_folds_only_when_asked():
    """Statistics holds the pooled S, G, T: layers fed one input (query, value) hold the very same
    S tensor, pooled and per fold; with folds=2 the pooled S is the token-weighted mean of the
    folds', G and T their loss-term-weighted means (weights counted here from the batches); with
    folds=1 there are no folds."""
    model, batches = _model(), _batches(sizes=(3, 2, 4, 1, 2))
    layers = {n: getattr(model, n) for n in ("query", "value", "mix")}
    one = collect_statistics(model, layers, batches)
    assert all(st.folds == () for st in one.values())
    assert one["query"].S is one["value"].S and one["mix"].S is not one["query"].S
    assert [st.input for st in one.values()] == ["query", "query", "mix"]
    two = collect_statistics(model, layers, batches, folds=2)
    assert two["query"].S is two["value"].S
    assert all(f.S is g.S for f, g in zip(two["query"].folds, two["value"].folds))
    tokens = [sum(b["attention_mask"].sum().item() for b in batches[k::2]) for k in (0, 1)]
    terms = [sum(len(b["labels"]) for b in batches[k::2]) for k in (0, 1)]
    for name, st in two.items():
        f = st.folds
        assert len(f) == 2 and all(k.folds == () for k in f) and st.folds[0].S is not st.S
        assert (st.tokens, st.n) == (sum(tokens), sum(terms))
        for X, Y, w in ((st.S, [k.S for k in f], tokens), (st.G, [k.G for k in f], terms),
                        (st.T, [k.T for k in f], terms)):
            want = (Y[0] * w[0] + Y[1] * w[1]) / sum(w)
            torch.testing.assert_close(X, want, atol=1e-7, rtol=1e-6)
        for X, Y in zip(_sgt(st), _sgt(one[name])):  # and the statistics of all batches at once
            torch.testing.assert_close(X, Y, atol=1e-6, rtol=1e-5)


def _held(st):  # the tensors a layer's Statistics holds: S, G, T pooled, then each fold's
    return [*st[:3], *(X for f in st.folds for X in f[:3])]


def _folded(folds):  # statistics as collect_statistics(folds=K) holds them: pooled, and the folds
    return cglora.pool(folds)._replace(folds=tuple(folds))


def _synthetic_folds(noise=True, seed=0, d=16, samples=100, folds=2):
    """Known statistics and per-example samples of them. Inputs x ~ N(0, S*) and output gradients
    delta = W x + eps, eps ~ N(0, E): so G* = W S*, T* = E + W S* W^T, and a fold's statistics are the
    moments of `samples` draws, noisy as real ones are (gradient noise shaped like the Fisher).
    S*, E spread over three decades; the signal W lives in their top two directions."""
    g = torch.Generator().manual_seed(seed)

    def spd():
        Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
        return Q @ torch.diag(torch.logspace(0, -3, d, dtype=torch.float64)) @ Q.T, Q

    (S, QS), (E, QE) = spd(), spd()
    W = 0.3 * QE[:, :2] @ torch.randn(2, 2, generator=g, dtype=torch.float64) @ QS[:, :2].T
    G, T = W @ S, E + W @ S @ W.T
    out = []
    for _ in range(folds):
        if not noise:
            out.append(cglora.Statistics(S, G, T, samples, samples, "w"))
            continue
        X = torch.randn(samples, d, generator=g, dtype=S.dtype) @ torch.linalg.cholesky(S).T
        D = X @ W.T + torch.randn(samples, d, generator=g, dtype=S.dtype) @ torch.linalg.cholesky(E).T
        moments = (X.T @ X / samples, D.T @ X / samples, D.T @ D / samples)
        out.append(cglora.Statistics(*moments, samples, samples, "w"))
    return _folded(out), (G, S, T)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_auto_damping_is_near_the_best_grid_point_on_noisy_folds_and_small_without_noise(seed):
    stats, truth = _synthetic_folds(seed=seed)
    chosen, table = cglora.choose_damping({"w": stats}, {"w": 2})
    # each lambda's direction from all the samples, judged on the true quadratic model (data no fold saw)
    true_q = {lam: cglora.predicted_decrease(*cglora.direction("cg-lora", stats, 2, lam), *truth)
              for lam in cglora.DAMPING_GRID}
    assert true_q[chosen] >= 0.9 * max(true_q.values()), (chosen, true_q)
    assert true_q[chosen] > 1.5 * true_q[min(true_q)]  # and the noise made the smallest damping a bad choice
    assert set(table) == set(cglora.DAMPING_GRID) and table[chosen] == max(table.values())
    clean, _ = _synthetic_folds(noise=False, seed=seed)  # exact statistics: the Newton step itself wins
    assert cglora.choose_damping({"w": clean}, {"w": 2})[0] == min(cglora.DAMPING_GRID)


def _spectrum_folds(sigma0, d_out=90, d_in=80, folds=2, seed=0):
    """Fold statistics whose whitened gradient has singular values ~ sigma0 (flat or gapped at the cut):
    S, T with eigenvalues over two decades, G = T^1/2 U0 diag(sigma0) V0^T S^1/2, each fold perturbed."""
    g = torch.Generator().manual_seed(seed)

    def spd(d):
        Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
        return Q @ torch.diag(torch.logspace(0, -2, d, dtype=torch.float64)) @ Q.T

    S, T = spd(d_in), spd(d_out)
    U0 = torch.linalg.qr(torch.randn(d_out, d_in, generator=g, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64)).Q
    G = _mpow(T, 0.5) @ U0 @ torch.diag(sigma0) @ V0.T @ _mpow(S, 0.5)
    out = []
    for _ in range(folds):
        X = torch.randn(4 * d_in, d_in, generator=g, dtype=torch.float64) @ _mpow(S, 0.5)
        D = torch.randn(4 * d_out, d_out, generator=g, dtype=torch.float64) @ _mpow(T, 0.5)
        noise = 0.2 * G.norm() / math.sqrt(d_out * d_in) * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        moments = (X.T @ X / len(X), G + noise, D.T @ D / len(D))
        out.append(cglora.Statistics(*moments, 100.0, 100.0, "w"))
    return _folded(out)


def _exact_scores(stats, rank, grid):  # §8.1 by the exact route: every lambda's direction by a full SVD
    folds = stats.folds
    return {lam: sum(cglora.predicted_decrease(*cglora.direction("cg-lora", cglora.pool(folds[:k] + folds[k + 1:]),
                                                                 rank, lam), f.G, f.S, f.T)
                     for k, f in enumerate(folds)) for lam in grid}


@pytest.mark.parametrize("spectrum", ["flat", "gapped"])
def test_cheap_damping_choice_agrees_with_the_exact_route(spectrum):
    """§8.1: one eigh per fold and a top_r per lambda give every lambda's held-out q within 1% of the
    exact route (full SVD per lambda), and the same lambda; on a gapped spectrum the directions
    themselves match. Flat: sigma_8 / sigma_9 = 1.01 with a slowly decaying tail, as on real layers."""
    i = torch.arange(80, dtype=torch.float64)
    sigma0 = 1 / (1 + 0.01 * i) if spectrum == "flat" else torch.where(i < 8, 10.0, 1 / (1 + 0.01 * i))
    stats = _spectrum_folds(sigma0)
    grid = cglora.DAMPING_GRID
    chosen, cheap = cglora.choose_damping({"w": stats}, {"w": 8}, grid=grid)
    exact = _exact_scores(stats, 8, grid)
    assert chosen == max(exact, key=exact.get)
    assert cheap[chosen] == pytest.approx(exact[chosen], rel=1e-2)
    assert all(cheap[lam] == pytest.approx(exact[lam], rel=0.05) for lam in grid)
    if spectrum == "gapped":  # the subspace is defined: the fold directions are the exact ones
        train = stats.folds[1]
        eig = lambda X: cglora._eig(X.float())  # noqa: E731
        dirs = cglora.cg_directions(train.G.float(), eig(train.S), eig(train.T), 8, grid)
        for lam in grid:  # within 0.5% (the energy criterion's tolerance; 1e-5 at the larger lambdas)
            B, A = cglora.direction("cg-lora", train, 8, lam)
            dW = B @ A
            assert ((dirs[lam][0] @ dirs[lam][1]).double() - dW).norm() < 5e-3 * dW.norm()
            assert cglora.overlap(dirs[lam][0].double(), B) > 1 - 1e-5


def test_the_eigh_route_of_the_damping_search_is_the_cholesky_route_at_every_lambda():
    """cg_directions (choose_damping's route: one eigh of S and of T, each lambda a rescaling) gives
    cg_lora_factors' update (Cholesky, exact SVD) at every lambda of the grid: the same B A to
    rounding where top_r's block 2r spans the whole space (6 x 5, rank 3), so the two routes'
    algebra and relative damping agree; where top_r iterates (12 x 10, rank 3), the captured
    energy -<G, B A> = sum sigma_i^2 within its stop, 1e-4 relative (B A itself differs by up to
    5e-4 there: top_r stops on the energy, not on the subspace)."""
    for (d_out, d_in), exact in (((6, 5), True), ((12, 10), False)):
        G, S, T = _problem(d_out, d_in, seed=6)
        dirs = cglora.cg_directions(G, cglora._eig(S), cglora._eig(T), 3, cglora.DAMPING_GRID)
        assert set(dirs) == set(cglora.DAMPING_GRID)
        for lam, (B, A) in dirs.items():
            B_ref, A_ref, sigma, _ = cg_lora_factors(G, S, T, 3, damping=lam)
            if exact:
                assert (B @ A - B_ref @ A_ref).norm() <= 1e-10 * (B_ref @ A_ref).norm(), lam
            captured = -(G * (B @ A)).sum()
            assert captured.item() == pytest.approx(sigma.square().sum().item(), rel=1e-4), lam


def test_top_r_captures_the_exact_energy_and_is_deterministic():
    """top_r stops on the captured energy: on the flat spectrum where 4 fixed iterations lose energy
    (test above), its energy is within 1e-6 of the exact top r at a tight tolerance, within 1e-3 at the
    selection's; on a gapped spectrum its subspace is the exact one. One seed, one result."""
    g = torch.Generator().manual_seed(0)
    U0 = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(250, 250, generator=g, dtype=torch.float64)).Q
    flat = 1.0 / (1 + 0.01 * torch.arange(250, dtype=torch.float64))
    for sigma0 in (flat, torch.cat([flat[:8] * 10, flat[8:]])):
        M = U0[:, :250] @ torch.diag(sigma0) @ V0.T
        exact = sigma0[:8].square().sum()
        for tol, within in ((1e-4, 1e-3), (1e-12, 1e-6)):
            U, sigma, V, _ = cglora.top_r(M, 8, tol=tol)
            assert exact * (1 - within) <= sigma.square().sum() <= exact * (1 + 1e-12)
            torch.testing.assert_close(U.T @ U, torch.eye(8, dtype=M.dtype), atol=1e-10, rtol=0)
            torch.testing.assert_close(U.T @ M @ V, torch.diag(sigma), atol=1e-8, rtol=0)  # Ritz triplets
    assert cglora.overlap(U, U0[:, :8]) > 1 - 1e-8 and cglora.overlap(V, V0[:, :8]) > 1 - 1e-8
    assert all(torch.equal(a, b) for a, b in zip(cglora.top_r(M, 8), cglora.top_r(M.clone(), 8)))


def test_choose_damping_and_diagnose_report_the_calibration_diagnostics():
    """On statistics with folds=2: choose_damping returns the grid's lambda of the largest held-out
    q and its table; the init at that lambda reports no diagnostics, and counts the statistics
    held once (a shared S in its first layer, folds included); diagnose, called after it, gives
    every layer its §8 row, whose held-out q summed over the layers is the table's (diagnose fits
    by the Cholesky route, the table by the eigh route: 1e-4 at the chosen lambda, 1% at every
    one). LoRA-One's held-out q is its own baseline's; it has no damping."""
    model = _model()
    layers = add_lora(model, ["query", "value", "mix"], rank=2, alpha=4, rslora=True)
    stats = collect_statistics(model, {n: m.base for n, m in layers.items()}, _batches(), folds=2)
    ranks, grid = {n: 2 for n in layers}, set(cglora.DAMPING_GRID)
    damping, table = cglora.choose_damping(stats, ranks)
    assert damping in grid and set(table) == grid and table[damping] == max(table.values()) > 0
    report = init_adapters(layers, stats, damping=damping)
    assert all(r["damping"] == damping for r in report)
    assert all("heldout" not in r and "overlap_left" not in r for r in report)
    held = {id(X): X for st in stats.values() for X in _held(st)}
    assert sum(r["statistics_mib"] for r in report) == pytest.approx(
        sum(X.numel() * 4 for X in held.values()) / 2 ** 20, rel=1e-9)
    assert len(held) == 3 * (2 * 3 + 2)  # query and value share S: pooled and in each fold
    rows = cglora.diagnose(stats, ranks, damping=damping)
    assert list(rows) == list(layers)
    for row in rows.values():
        assert 0 <= row["overlap_left"] <= 1 + 1e-6 and 0 <= row["overlap_right"] <= 1 + 1e-6
        assert row["insample"] > 0 and row["insample_lora_one"] > 0 and row["heldout_lora_one"] > 0
    assert sum(r["heldout"] for r in rows.values()) == pytest.approx(table[damping], rel=1e-4)
    for lam in grid:
        heldout = sum(r["heldout"] for r in cglora.diagnose(stats, ranks, damping=lam).values())
        assert heldout == pytest.approx(table[lam], rel=1e-2), lam
    one = cglora.diagnose(stats, ranks, "lora-one")
    assert all(r["heldout"] == r["heldout_lora_one"] > 0 for r in one.values())
    assert all(r["damping"] is None for r in init_adapters(layers, stats, "lora-one"))


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


def _model(seed=0, classes=3):
    torch.manual_seed(seed)
    return _Tiny(classes=classes)


def _scores(batches):  # the same batches as a regression task: float labels (MSE statistics)
    return [dict(b, labels=b["labels"].float() * 1.5 - 0.7) for b in batches]


def _mse(out, y):  # the regression loss, written out: mean squared error of the single output
    return (out.squeeze(-1) - y).square().mean()


def _per_example_stats(model, batches, names, loss_fn=nn.functional.cross_entropy):
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
            loss = loss_fn(model(ids, mask), batch["labels"][i:i + 1])
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


@pytest.mark.parametrize("regression", [False, True])
def test_statistics_equal_per_example_brute_force_with_padding(regression):
    model, batches = (_model(classes=1), _scores(_batches())) if regression else (_model(), _batches())
    names = ["query", "value", "mix", "head", "dead"]
    stats = collect_statistics(model, {n: getattr(model, n) for n in names}, batches)
    ref = _per_example_stats(model, batches, names, _mse if regression else nn.functional.cross_entropy)
    for n in names:
        for got, want in zip(_sgt(stats[n]), ref[n]):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert stats["query"].S is stats["value"].S  # one input, one S tensor
    assert stats["dead"].G.abs().max() == 0  # called, but does not reach the loss


def test_statistics_G_is_autograd_gradient_of_mean_loss():
    model, batches = _model(), _batches(sizes=(4, 1, 2))
    stats = collect_statistics(model, {"mix": model.mix}, batches)
    n = sum(b["labels"].shape[0] for b in batches)
    loss = sum(nn.functional.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"],
                                           reduction="sum") for b in batches) / n
    grad, = torch.autograd.grad(loss, model.mix.weight)
    torch.testing.assert_close(stats["mix"].G, grad, atol=1e-6, rtol=1e-5)


class _Twice(nn.Module):
    """One nn.Linear applied twice per forward (a shared layer, as ALBERT's), its output as `kind` says."""
    def __init__(self, kind=None):
        super().__init__()
        self.kind, self.inner, self.head = kind, nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        logits = self.head(self.inner(torch.tanh(self.inner(x))))
        return {"tuple": (logits, x), "dict": {"logits": logits, "x": x}}.get(self.kind, logits)


def test_a_layer_called_twice_sums_both_calls_as_k_fac_does():
    """§2, shared layers: G = the sum over calls (exact), S the mean over both calls' token rows."""
    torch.manual_seed(0)
    model = _Twice()
    batches = [dict(x=torch.randn(6, 4), labels=torch.randint(0, 3, (6,))) for _ in range(2)]
    st = collect_statistics(model, {"inner": model.inner}, batches, folds=1)["inner"]
    x = torch.cat([b["x"] for b in batches])
    loss = nn.functional.cross_entropy(model(x), torch.cat([b["labels"] for b in batches]))
    torch.testing.assert_close(st.G, torch.autograd.grad(loss, model.inner.weight)[0], atol=1e-6, rtol=1e-5)
    rows = torch.cat([x, torch.tanh(model.inner(x))]).detach()  # the inputs of its two calls
    torch.testing.assert_close(st.S, rows.T @ rows / 24, atol=1e-6, rtol=1e-5)
    assert st.tokens == 24 and st.folds == ()


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_tuple_and_dict_outputs_give_the_logits_statistics(kind):
    torch.manual_seed(0)
    batches = [dict(x=torch.randn(6, 4), labels=torch.randint(0, 3, (6,))) for _ in range(2)]
    model = _Twice(kind)
    G = collect_statistics(model, {"inner": model.inner}, batches, folds=1)["inner"].G
    model.kind = "tensor"
    torch.testing.assert_close(G, collect_statistics(model, {"inner": model.inner}, batches, folds=1)["inner"].G)
    model.kind = "none"
    model.forward = lambda x: {"x": x}
    with pytest.raises(TypeError, match=r"the model returned dict with keys \['x'\]: the loss needs logits"):
        collect_statistics(model, {"inner": model.inner}, batches)


def test_statistics_leave_no_hooks_grads_or_changed_flags():
    model, batches = _model(), _batches()
    model.head.weight.requires_grad_(False)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    collect_statistics(model, {"query": model.query, "mix": model.mix}, batches, fisher="sampled")
    with pytest.raises(ValueError, match="no 'labels'"):  # a failing pass must clean up too
        collect_statistics(model, {"query": model.query}, [{"input_ids": batches[0]["input_ids"]}])
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags and model.training


def test_statistics_leave_the_callers_input_tensors_alone():
    """The README promises requires_grad flags are left as found: that includes the caller's own
    calibration tensors, here (as in the README example) an input that goes straight into a target layer."""
    # Fails until collect_statistics stops calling requires_grad_(True) on its inputs (the fix is in cglora.py).
    class Net(nn.Module):  # the README example's model
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    torch.manual_seed(0)
    model = Net()
    batches = [dict(x=torch.randn(6, 4), labels=torch.randint(0, 3, (6,))) for _ in range(2)]
    G = collect_statistics(model, {"body": model.body}, batches)["body"].G
    assert G.abs().max() > 0 and not any(b["x"].requires_grad for b in batches)


def _one(batch, i, label):  # example i of the batch alone, with the given label
    return {k: (v.new_tensor([label]) if k == "labels" else v[i:i + 1]) for k, v in batch.items()}


def _sampled_T(model, batch, k, seed=0):
    """T of fisher="sampled" from one pass over the batch's examples repeated k times: k draws each."""
    big = {key: v.repeat(k, *[1] * (v.dim() - 1)) for key, v in batch.items()}
    return collect_statistics(model, {"mix": model.mix}, [big], fisher="sampled", folds=1,
                              generator=torch.Generator().manual_seed(seed))["mix"]


def test_sampled_fisher_estimates_the_model_expected_T():
    """fisher="sampled" draws each label from the model's softmax, so its T estimates
    E_{y ~ p} T = (1/n) sum_i sum_c p_ic T_ic (T_ic: example i alone with label c), enumerated here, with
    the Monte-Carlo standard error se computed from the same enumeration. The model is made confident
    (probabilities 0.1 to 0.5): uniform labels, or a softmax at temperature 0.5, have expectations more
    than 8 se away from the right one, and the estimate must be within 4 se of it."""
    model, batch, n, k = _model(1), _batches(seed=2, sizes=(4,))[0], 4, 2000
    with torch.no_grad():
        model.head.weight.mul_(5)
        logits = model(batch["input_ids"], batch["attention_mask"])
    layers = {"mix": model.mix}
    T = torch.stack([torch.stack([collect_statistics(model, layers, [_one(batch, i, c)], folds=1)["mix"].T
                                  for c in range(3)]) for i in range(n)])  # [n, classes, d, d]

    def expected(p):  # E T when example i's label is drawn from p[i]
        return torch.einsum("ic,icjk->jk", p, T) / n

    p = logits.softmax(-1)
    assert p.min() < 0.15 and p.max() > 0.45
    exact = expected(p)
    spread = T - torch.einsum("ic,icjk->ijk", p, T)[:, None]
    se = (torch.einsum("ic,icjk->", p, spread.square()) / k).sqrt() / n  # sqrt(E ||estimate - exact||^2)
    est = _sampled_T(model, batch, k)
    torch.testing.assert_close(est.G, collect_statistics(model, layers, [batch], folds=1)["mix"].G)  # G: true labels
    assert (est.T - exact).norm() < 4 * se
    for wrong in (torch.full_like(p, 1 / 3), (2 * logits).softmax(-1)):
        assert (expected(wrong) - exact).norm() > 8 * se


def test_sampled_fisher_for_regression_draws_labels_from_N_f_1():
    """Regression (one output f, MSE loss (f - y)^2): with y ~ N(f, 1) the output gradient is -2 eps J,
    eps ~ N(0, 1), so E T = (1/n) sum_i T_i with T_i = 4 J_i J_i^T: example i's T with the label f_i + 1.
    Var(eps^2) = 2 gives the Monte-Carlo error. Labels drawn around 0 instead of f would be far off."""
    model, batch, n, k = _model(1, classes=1), _scores(_batches(seed=2, sizes=(4,)))[0], 4, 1000
    with torch.no_grad():
        model.head.bias.fill_(2.0)  # f ~ 2: far from 0
        f = model(batch["input_ids"], batch["attention_mask"]).squeeze(-1)
    T = [collect_statistics(model, {"mix": model.mix}, [_one(batch, i, f[i].item() + 1)], folds=1)["mix"].T
         for i in range(n)]
    exact = sum(T) / n
    se = (2 * sum(Ti.square().sum() for Ti in T) / k).sqrt() / n
    assert (_sampled_T(model, batch, k).T - exact).norm() < 4 * se
    around_zero = sum((f[i] ** 2 + 1) * T[i] for i in range(n)) / n  # E T if y ~ N(0, 1)
    assert (around_zero - exact).norm() > 8 * se


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


def test_fp32_factors_on_a_bf16_base_compute_in_fp32_and_return_the_bases_dtype():
    """Adapters kept in fp32 on a bf16 base (peft's default): the input is cast to the factors'
    dtype, the sum returned at the base's; the factors get fp32 gradients."""
    torch.manual_seed(0)
    base = nn.Linear(6, 4).to(torch.bfloat16)
    layer = LoRALinear(base, rank=2, alpha=4)
    layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), torch.randn(4, 2)
    x = torch.randn(3, 6, dtype=torch.bfloat16)
    y = layer(x)
    lora = 2.0 * x.float() @ (layer.lora_B @ layer.lora_A).detach().T
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, (base(x).float() + lora).to(torch.bfloat16))
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32


def test_lora_dropout_drops_the_adapter_input_in_training_only():
    torch.manual_seed(0)
    base = nn.Linear(5, 4)
    layer = LoRALinear(base, rank=2, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x, delta = torch.randn(3, 5), 2.0 * layer.lora_B @ layer.lora_A
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    kept = nn.functional.dropout(torch.ones_like(x), 0.5)  # the same draw: 0 or 1 / (1 - p) per input entry
    assert (kept == 0).any() and (kept == 2).any()
    torch.testing.assert_close(y, base(x) + (x * kept) @ delta.T)  # the base layer sees all of x
    torch.testing.assert_close(layer.eval()(x), base(x) + x @ delta.T)


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


def test_add_lora_checks_every_rank_and_trainable_name_before_changing_the_model():
    for kw in (dict(targets=["query", "value", "dead"], rank=5), dict(targets=["query"], rank=2, trainable=["nope"])):
        model = _model()  # dead is 6 -> 4 wide: rank 5 fits query and value (6 -> 5), not dead, the last
        before = {n: (type(m), [p.requires_grad for p in m.parameters()]) for n, m in model.named_modules()}
        with pytest.raises(ValueError, match="layer dead: rank 5|trainable module 'nope'"):
            add_lora(model, alpha=4, **kw)
        assert {n: (type(m), [p.requires_grad for p in m.parameters()]) for n, m in model.named_modules()} == before


def test_lora_ga_too_wide_is_refused_for_every_layer_before_any_is_written():
    model = _model()
    layers = add_lora(model, ["query", "mix"], rank=3, alpha=4)  # 2 * 3 > 5: both layers are too narrow
    stats = collect_statistics(model, {n: layer.base for n, layer in layers.items()}, _batches(sizes=(3, 2, 2)))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layers \['query', 'mix'\]: lora-ga needs 2 \* rank <= min"):
        init_adapters(layers, stats, "lora-ga")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_init_adapters_leaves_the_callers_statistics_for_another_method():
    model = _model()
    layers = add_lora(model, ["query", "value"], rank=2, alpha=4, rslora=True)
    stats = collect_statistics(model, {n: layer.base for n, layer in layers.items()}, _batches())
    init_adapters(layers, stats, "lora-one")
    assert sorted(stats) == ["query", "value"]
    report = init_adapters(layers, stats, "cg-lora")
    assert all(r["captured"] > 0 for r in report)


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_one_hot_float_labels_on_a_classifier_are_refused_not_read_as_regression(fisher):
    batches = [dict(b, labels=nn.functional.one_hot(b["labels"], 3).float()) for b in _batches()]
    model = _model()
    with pytest.raises(ValueError, match=r"float labels as one regression target per example .* got \[3, 3\] "
                                         r"and \[3, 3\]: for one-hot class labels trained with cross entropy: "
                                         r"pass labels.argmax\(-1\); with a binary loss .*: pass loss=.*"
                                         r"binary_cross_entropy_with_logits"):
        collect_statistics(model, {"query": model.query}, batches, fisher=fisher)


def test_each_fix_the_one_hot_error_names_gives_the_exact_G_of_its_own_loss():
    """The two losses one-hot float labels can be trained with, each as the error says to pass it:
    G is autograd's gradient of that loss (they differ: each fix fits one of them only)."""
    batches = [dict(b, labels=nn.functional.one_hot(b["labels"], 3).float()) for b in _batches()]
    model, n = _model(), sum(len(b["labels"]) for b in batches)
    bce = nn.functional.binary_cross_entropy_with_logits
    fixes = {"argmax": (None, lambda y: y.argmax(-1), nn.functional.cross_entropy),
             "binary": (bce, lambda y: y, bce)}
    Gs = {}
    for fix, (loss, labels, reference) in fixes.items():
        stats = collect_statistics(model, {"mix": model.mix}, [dict(b, labels=labels(b["labels"]))
                                                               for b in batches], loss=loss)
        total = sum(reference(model(b["input_ids"], b["attention_mask"]), labels(b["labels"]))
                    * len(b["labels"]) for b in batches)
        grad, = torch.autograd.grad(total / n, model.mix.weight)
        torch.testing.assert_close(stats["mix"].G, grad, atol=1e-6, rtol=1e-5)
        Gs[fix] = grad
    assert not torch.allclose(Gs["argmax"], Gs["binary"], rtol=0.1)


def test_multi_hot_labels_are_pointed_at_a_binary_loss_which_gives_the_exact_G():
    """Multi-label targets are not one-hot: argmax would change the loss, so the error names a binary
    cross entropy, and that loss passed as loss= gives autograd's gradient of it."""
    g = torch.Generator().manual_seed(0)
    batches = [dict(b, labels=(torch.rand(len(b["labels"]), 3, generator=g) < 0.5).float()) for b in _batches()]
    model = _model()
    with pytest.raises(ValueError, match=r"for multi-label targets: pass loss=.*binary_cross_entropy_with_logits"):
        collect_statistics(model, {"mix": model.mix}, batches)
    bce = nn.functional.binary_cross_entropy_with_logits
    stats = collect_statistics(model, {"mix": model.mix}, batches, loss=bce)
    n = sum(len(b["labels"]) for b in batches)
    total = sum(bce(model(b["input_ids"], b["attention_mask"]), b["labels"]) * len(b["labels"]) for b in batches)
    grad, = torch.autograd.grad(total / n, model.mix.weight)
    torch.testing.assert_close(stats["mix"].G, grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("regression", [False, True])
def test_labels_of_shape_batch_by_one_are_the_labels_of_shape_batch(regression):
    """transformers accepts class (and regression) labels [batch, 1]; so does the default loss."""
    model, batches = (_model(classes=1), _scores(_batches())) if regression else (_model(), _batches())
    column = [dict(b, labels=b["labels"][:, None]) for b in batches]
    for fisher in ("empirical", "sampled"):
        want, got = (collect_statistics(model, {"mix": model.mix}, bs, fisher=fisher)["mix"]
                     for bs in (batches, column))
        for X, Y in zip(_sgt(got), _sgt(want)):
            torch.testing.assert_close(X, Y)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_statistics_without_autograd_are_refused_in_one_line(context):
    model = _model()
    with context(), pytest.raises(RuntimeError, match=r"backpropagates the loss .* call it outside "
                                                     r"torch.no_grad\(\) and torch.inference_mode\(\)"):
        collect_statistics(model, {"mix": model.mix}, _batches())


# ============================================================================ cglora.py: init


def _adapted(method, seed=0, folds=1, **kw):
    model = _model(seed)
    reference = copy.deepcopy(model)
    layers = add_lora(model, ["query", "value", "mix"], rank=2, alpha=4, rslora=cglora.RSLORA[method])
    stats = collect_statistics(model, {n: layer.base for n, layer in layers.items()}, _batches(),
                               folds=folds)
    report = init_adapters(layers, stats, method, **kw)
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
    S, G, T = (X.double() for X in _sgt(stats["mix"]))
    report = init_adapters(layers, stats, "cg-lora", damping=0.1, step=0.3, init_norm=0)
    dW, sigma = _brute_step(G, S, T, 2, 0.1)
    layer = layers["mix"]
    assert torch.equal(layer.base.weight, W0) and not report[0]["shifted"]
    torch.testing.assert_close(layer.delta_weight().double(), 0.3 * dW, atol=1e-5, rtol=1e-4)
    assert report[0]["captured"] == pytest.approx((sigma[:2].square().sum() / sigma.square().sum()).item(), rel=1e-4)


def _stats_of(reference, layers):  # the statistics _adapted's init used, again, in float64
    stats = collect_statistics(reference, {n: getattr(reference, n) for n in layers}, _batches())
    return {n: tuple(X.double() for X in _sgt(st)) for n, st in stats.items()}


@pytest.mark.parametrize("init_norm", [None, 0.02])
def test_cg_lora_init_is_the_newton_step_rescaled_to_init_norm(init_norm):
    """The default init path (rescale, then Euclidean balance): s B A = init_norm * dW_r / ||dW_r||_2 with
    dW_r from brute-force whitening, so it is a descent direction (<G, s B A> < 0); a sign flip of A or
    of the SVD's V turns it into an ascent step and fails here."""
    _, reference, layers, report = _adapted("cg-lora", init_norm=init_norm)
    want = 4 / (math.sqrt(2) * cglora.LORA_ONE_GAMMA) if init_norm is None else init_norm
    stats = _stats_of(reference, layers)
    for (name, layer), row in zip(layers.items(), report):
        S, G, T = stats[name]
        dW, _ = _brute_step(G, S, T, 2, row["damping"])  # the damping the init used
        update = layer.delta_weight().double()
        torch.testing.assert_close(update, want * dW / torch.linalg.matrix_norm(dW, ord=2), atol=1e-6, rtol=1e-4)
        assert (G * update).sum() < 0
        norm = torch.linalg.matrix_norm(update, ord=2).item()
        assert norm == pytest.approx(want, rel=1e-4) and row["update_norm"] == pytest.approx(want, rel=1e-4)
        assert 0 < row["captured"] <= 1


def test_lora_ga_factors_are_the_original_repos():
    """LoRA-GA as its original repository (§6): from the SVD G = U diag(s) V^T, B = U[:, r:2r] and
    A = V[:, :r]^T, both times d_out^(1/4) / sqrt(16); scaling alpha / r. A singular vector has no sign,
    so each column is compared up to its own sign."""
    _, reference, layers, _ = _adapted("lora-ga")
    stats = _stats_of(reference, layers)
    for name, layer in layers.items():
        G = stats[name][1]
        U, _, Vh = torch.linalg.svd(G)
        c = G.shape[0] ** 0.25 / math.sqrt(16)
        for got, want in ((layer.lora_B.double(), c * U[:, 2:4]), (layer.lora_A.double().T, c * Vh[:2].T)):
            # entries ~0.15; the code's fp32 SVD moves a vector by ~1e-7 sigma_1 / gap (mix: sigma_4 = 6e-5)
            torch.testing.assert_close(got, want * torch.sign((got * want).sum(0)), atol=2e-4, rtol=0)
        assert layer.scaling == 4 / 2
    with pytest.raises(ValueError, match=r"lora-ga needs 2 \* rank <= min\(d_out, d_in\) = 5"):
        cglora.lora_ga_factors(torch.randn(6, 5), 3)


def test_cg_lora_init_is_euclidean_balanced_with_the_same_update():
    _, _, eu, _ = _adapted("cg-lora")
    _, _, cu, _ = _adapted("cg-lora", factor_balance="curvature")
    for n in eu:
        B, A = eu[n].lora_B, eu[n].lora_A
        torch.testing.assert_close(B.T @ B, A @ A.T, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(eu[n].delta_weight(), cu[n].delta_weight(), atol=1e-7, rtol=1e-4)
        assert not torch.allclose(cu[n].lora_B.T @ cu[n].lora_B, cu[n].lora_A @ cu[n].lora_A.T, rtol=1e-2)


def test_one_seed_one_init_where_randomness_acts():
    # the random draws: plain LoRA's A, and the sampled Fisher's labels (which change T, so CG-LoRA)
    def factors(method, seed, **kw):
        layers = _adapted(method, generator=torch.Generator().manual_seed(seed), **kw)[2]
        return [t.clone() for layer in layers.values() for t in (layer.lora_A, layer.lora_B)]

    def sampled_T(seed):
        model = _model()
        return collect_statistics(model, {"mix": model.mix}, _batches(), fisher="sampled",
                                  generator=torch.Generator().manual_seed(seed))["mix"].T

    for method in ("lora", "rslora"):
        assert all(torch.equal(a, b) for a, b in zip(factors(method, 3), factors(method, 3)))
        assert not all(torch.equal(a, b) for a, b in zip(factors(method, 3), factors(method, 4)))
    assert torch.equal(sampled_T(3), sampled_T(3)) and not torch.equal(sampled_T(3), sampled_T(4))
    # CG-LoRA at a fixed damping draws nothing: two runs agree bit for bit
    assert all(torch.equal(a, b) for a, b in zip(factors("cg-lora", 3), factors("cg-lora", 4)))


@pytest.mark.parametrize("init_norm", [None, 0.3])
def test_lora_one_size_equals_cg_default_norm_and_follows_init_norm(init_norm):
    _, _, layers, _ = _adapted("lora-one", init_norm=init_norm)
    want = 4 / (math.sqrt(2) * cglora.LORA_ONE_GAMMA) if init_norm is None else init_norm
    for layer in layers.values():  # default: ||s B A|| = s / gamma, the default CG-LoRA init_norm
        norm = torch.linalg.matrix_norm(layer.delta_weight(), ord=2).item()
        assert norm == pytest.approx(want, rel=1e-4)
        torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, layer.lora_A @ layer.lora_A.T, atol=1e-6, rtol=1e-4)


def test_init_errors_and_zero_gradient_fallback():
    model = _model()
    layers = add_lora(model, ["dead", "mix"], rank=2, alpha=4)
    stats = collect_statistics(model, {n: layer.base for n, layer in layers.items()}, _batches(), folds=2)
    report = init_adapters(layers, dict(stats), "cg-lora")
    rows = {r["layer"]: r for r in report}
    assert rows["dead"]["fallback"] and rows["mix"]["fallback"] is None
    diagnostics = cglora.diagnose(stats, {n: 2 for n in layers})
    assert "dead" not in diagnostics  # no direction, so no diagnostics
    assert diagnostics["mix"]["heldout"] > 0
    assert layers["dead"].lora_B.abs().max() == 0 and torch.isfinite(layers["dead"].lora_A).all()
    bad = {"mix": stats["mix"]._replace(G=stats["mix"].G * float("nan"))}
    with pytest.raises(ValueError, match="layer mix: statistics contain NaN"):
        init_adapters({"mix": layers["mix"]}, bad, "cg-lora")
    with pytest.raises(ValueError, match="unknown init method 'pissa'"):
        init_adapters(layers, stats, "pissa")


def test_plain_lora_A_is_kaiming_uniform():
    """lora_factors (§6): B = 0 and A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), what nn.Linear's kaiming_uniform_
    with a = sqrt(5) draws: range, mean and variance (bound^2 / 3) of 64k draws."""
    B, A = cglora.lora_factors(7, 256, 256, torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(256)
    assert B.shape == (7, 256) and B.abs().max() == 0 and A.shape == (256, 256)
    assert -bound <= A.min() < -0.99 * bound and 0.99 * bound < A.max() <= bound
    assert abs(A.mean().item()) < 0.01 * bound
    assert A.var().item() == pytest.approx(bound ** 2 / 3, rel=0.02)


def test_lora_one_own_size_is_one_over_gamma():
    """LoRA-One's factors (§6): B A = -[G]_r / (sigma_1 gamma), so ||B A||_2 = 1 / gamma, with B = U_r S_r^1/2 and
    A = S_r^1/2 V_r^T scaled alike (B^T B = A A^T); init_norm=0 keeps that size: ||s B A||_2 = s / gamma."""
    G, _, _ = _problem(8, 7, seed=2)
    B, A = cglora.lora_one_factors(G, 3)
    U, sigma, Vh = torch.linalg.svd(G)
    torch.testing.assert_close((B @ A).double(), -U[:, :3] @ torch.diag(sigma[:3]) @ Vh[:3] / (sigma[0] * 128),
                               atol=1e-7, rtol=1e-5)
    assert torch.linalg.matrix_norm(B @ A, ord=2).item() == pytest.approx(1 / 128, rel=1e-5)
    torch.testing.assert_close(B.T @ B, A @ A.T, atol=1e-7, rtol=1e-5)
    _, _, layers, report = _adapted("lora-one", init_norm=0)
    for row, layer in zip(report, layers.values()):
        assert row["update_norm"] == pytest.approx(layer.scaling / 128, rel=1e-4)


@pytest.mark.parametrize("folds", [2, 3])
def test_diagnostics_against_a_recomputation_from_fixed_halves(folds):
    """§8 diagnostics: the overlaps are those of the exact directions fitted on the two halves (K = 2: fold 0
    and fold 1; K = 3: folds 0 + 2 and fold 1), heldout and heldout_lora_one are this method's and
    LoRA-One's K-fold held-out q; on a spectrum gapped enough for the directions to be defined."""
    i = torch.arange(80, dtype=torch.float64)
    stats = _spectrum_folds(torch.where(i < 8, 1.5, 1 / (1 + 0.01 * i)), folds=folds, seed=1)
    f = stats.folds
    lam = cglora.choose_damping({"w": stats}, {"w": 8})[0]  # diagnose at the damping chosen
    for method in ("cg-lora", "lora-one"):
        row = cglora.diagnose({"w": stats}, {"w": 8}, method, damping=lam)["w"]
        halves = [cglora.direction(method, cglora.pool(f[h::2]), 8, lam) for h in (0, 1)]
        left, right = cglora.overlap(halves[0][0], halves[1][0]), cglora.overlap(halves[0][1].T, halves[1][1].T)
        assert 0.2 < left < 0.99 and 0.2 < right < 0.99  # neither chance nor the same subspace
        assert row["overlap_left"] == pytest.approx(left, abs=5e-3)
        assert row["overlap_right"] == pytest.approx(right, abs=5e-3)
        one = sum(cglora.predicted_decrease(*cglora.lora_one_factors(cglora.pool(f[:k] + f[k + 1:]).G, 8), fk.G, fk.S, fk.T)
                  for k, fk in enumerate(f))
        assert row["heldout_lora_one"] == pytest.approx(one, rel=1e-3)
        fitted = [cglora.direction(method, cglora.pool(f[:k] + f[k + 1:]), 8, lam)
                  for k in range(folds)]
        held = sum(cglora.predicted_decrease(*BA, fk.G, fk.S, fk.T) for BA, fk in zip(fitted, f))
        assert row["heldout"] == pytest.approx(held, rel=1e-6)  # this method's, at that damping


def test_init_from_unfolded_statistics_at_a_fixed_damping():
    """Statistics collected with folds=1 (documented) serve a fixed damping and every baseline, without
    diagnostics; 'auto' and a negative damping are clear errors, one line naming choose_damping;
    choose_damping and diagnose, which judge on held-out folds, refuse such statistics in one
    line."""
    model = _model()
    layers = add_lora(model, ["query", "mix"], rank=2, alpha=4, rslora=True)
    stats = collect_statistics(model, {n: layer.base for n, layer in layers.items()}, _batches(), folds=1)
    for method in ("cg-lora", "lora-one", "lora-ga"):
        report = init_adapters(layers, dict(stats), method, damping=0.1)
        assert all("heldout" not in r and "insample" not in r for r in report)
        assert all("overlap_left" not in r and r["update_norm"] > 0 for r in report)
    ref = cg_lora_factors(stats["mix"].G, stats["mix"].S, stats["mix"].T, 2, damping=0.1)
    init_adapters(layers, dict(stats), "cg-lora", damping=0.1, init_norm=0)
    torch.testing.assert_close(layers["mix"].delta_weight(), ref[0] @ ref[1],  # the raw step dW_r
                               atol=1e-6, rtol=1e-4)
    for damping in (-0.1, "loud", "auto"):
        error = f"damping must be a number >= 0, got {damping!r} .*choose_damping"
        with pytest.raises(ValueError, match=error) as e:
            init_adapters(layers, dict(stats), "cg-lora", damping=damping)
        assert "\n" not in str(e.value)
    ranks = {n: 2 for n in layers}
    for call in (cglora.choose_damping, cglora.diagnose):
        error = "on held-out folds: collect the statistics with folds=2"
        with pytest.raises(ValueError, match=error) as e:
            call(stats, ranks)
        assert "\n" not in str(e.value)


def test_the_default_loss_refuses_anything_but_logits_batch_by_classes_and_labels_batch():
    for logits, labels in ((torch.randn(3, 4), torch.zeros(3, 5).long()),  # token labels on sequence logits
                           (torch.randn(3, 5, 4), torch.zeros(3).long()),  # per-token logits, one label each
                           (torch.randn(3, 5, 4), torch.zeros(3, 5).long())):  # a language model's
        with pytest.raises(ValueError, match=r"the default loss takes logits \[batch, classes\] and labels \[batch\]"):
            cglora.default_loss(logits, labels)
    assert cglora.default_loss(torch.zeros(3, 4), torch.zeros(3).long()).item() == pytest.approx(math.log(4))


def test_a_fold_of_one_token_row_is_that_token_s_statistics():
    """_normalise divides each fold's sums by its own counts, down to a fold of a single token."""
    model, (big,) = _model(), _batches(sizes=(3,))
    one = dict(input_ids=big["input_ids"][:1, :1], attention_mask=torch.ones(1, 1, dtype=torch.long),
               labels=big["labels"][:1])
    names = ["query", "mix"]
    stats = collect_statistics(model, {n: getattr(model, n) for n in names}, [big, one], folds=2)
    ref = _per_example_stats(model, [one], names)
    for n in names:
        assert stats[n].folds[1].tokens == 1 and stats[n].folds[1].n == 1
        for got, want in zip(stats[n].folds[1][:3], ref[n]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_edge_cases_of_the_small_helpers():
    G, S, T = _problem(6, 4)
    B, A = cglora.lora_ga_factors(G, 2)  # 2r = min(d_out, d_in) is allowed: the whole spectrum
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    c = 6 ** 0.25 / 4
    assert cglora.overlap(B.double(), U[:, 2:4]) == pytest.approx(1, abs=1e-6)
    assert cglora.overlap(A.double().T, Vh[:2].T) == pytest.approx(1, abs=1e-6)
    assert B.norm().item() == pytest.approx(c * math.sqrt(2), rel=1e-5)
    with pytest.raises(ValueError, match="2 \\* rank <= min"):
        cglora.lora_ga_factors(G, 3)
    assert cglora.predicted_decrease(torch.zeros(6, 2), torch.randn(2, 4), G, S, T) == 0.0  # no direction
    L = cglora.damped_cholesky(torch.zeros(3, 3), 0.5)
    torch.testing.assert_close(L @ L.T, 0.5 * torch.eye(3))  # X = 0: lambda I
    assert cglora._eig(torch.zeros(3, 3)).mu == 1.0
    stats, _ = _synthetic_folds()  # a gradient with no positive entry is not a zero gradient
    nonpositive = _folded([f._replace(G=-f.G.abs() * (f.G.abs() > f.G.abs().min()))
                           for f in stats.folds])
    assert all(f.G.max() == 0 for f in nonpositive.folds) and nonpositive.G.max() <= 0
    assert set(cglora.diagnose({"w": nonpositive}, {"w": 2})) == {"w"}
    assert min(cglora.choose_damping({"w": nonpositive}, {"w": 2})[1].values()) > 0
    model = _model()
    with pytest.raises(ValueError, match="folds must be >= 1, got 0"):
        collect_statistics(model, {"mix": model.mix}, _batches(), folds=0)


def test_sampled_fisher_on_a_regression_model_with_a_flat_output():
    """A regression model may return [batch] rather than [batch, 1]: the same statistics either way."""
    class Flat(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids, attention_mask).squeeze(-1)

    model, batches = _model(classes=1), _scores(_batches())
    kw = dict(fisher="sampled", generator=None)
    a = collect_statistics(model, {"mix": model.mix}, batches, **kw)["mix"]
    b = collect_statistics(Flat(model), {"mix": model.mix}, batches, **kw)["mix"]
    for X, Y in zip(_sgt(a), _sgt(b)):
        torch.testing.assert_close(X, Y)


_OWNERS = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import cglora, test_cglora as tc
distributed = len(sys.argv) > 3
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
model, batches = tc._model(), tc._batches(sizes=(3, 2, 4, 1, 2, 3, 2, 2))
layers = cglora.add_lora(model, ["query", "value", "mix"], rank=2, alpha=4, rslora=True)
stats = cglora.collect_statistics(model, {n: m.base for n, m in layers.items()}, batches[rank::world],
                                  folds=2)
held = {n: (st.owner, len(st.folds)) for n, st in stats.items()}
ranks = {n: 2 for n in layers}
damping, table = cglora.choose_damping(stats, ranks)
report = cglora.init_owned(layers, stats, damping=damping)
diagnostics = cglora.diagnose(stats, ranks, damping=damping)
for row in report:
    row.update(diagnostics[row["layer"]])
torch.save(dict(held=held, table=table, report=report,
                BA={n: m.lora_B.detach() @ m.lora_A.detach() for n, m in layers.items()}),
           f"{sys.argv[2]}/rank{rank}.pt")
if distributed:  # as train.py ends: a rank that exits with its gloo group alive may abort at exit
    dist.barrier()
    dist.destroy_process_group()
"""


def test_torchrun_layers_are_owned_factorized_once_and_broadcast(tmp_path):
    """Under torch.distributed each layer's statistics are reduced to one owner (the i-th distinct input's
    layers to rank i mod world: query and value share theirs) and freed elsewhere; choose_damping's
    scores are summed across ranks, so both ranks choose one process's lambda; init_owned's owner
    factorizes each layer and its factors reach every rank; diagnose gives every layer's row on
    every rank."""
    (tmp_path / "owners.py").write_text(_OWNERS)
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = subprocess.run([sys.executable, str(tmp_path / "owners.py"), here, str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(tmp_path / "owners.py"), here, str(tmp_path / "two"), "distributed"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-1000:] + two.stderr[-3000:]
    ref = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1)]
    assert ref["held"] == {"query": (0, 2), "value": (0, 2), "mix": (0, 2)}
    assert ranks[0]["held"] == {"query": (0, 2), "value": (0, 2), "mix": (1, 0)}
    assert ranks[1]["held"] == {"query": (0, 0), "value": (0, 0), "mix": (1, 2)}
    for got in ranks:
        assert got["table"] == pytest.approx(ref["table"], rel=1e-4)
        assert [r["damping"] for r in got["report"]] == [r["damping"] for r in ref["report"]]
        for r1, r2 in zip(ref["report"], got["report"]):
            for key in ("heldout", "heldout_lora_one", "insample", "overlap_left", "captured", "statistics_mib"):
                assert r2[key] == pytest.approx(r1[key], rel=1e-4), key
        for name, BA in ref["BA"].items():
            torch.testing.assert_close(got["BA"][name], BA, atol=1e-6, rtol=1e-4)


def _merged_loss(layers, directions, c, batches):
    """The mean example loss, in eval mode, of a plain copy of _model() (the model before any init)
    with W0 + s c B A written into its weights."""
    plain = _model().eval()
    with torch.no_grad():
        for n, (B, A) in directions.items():
            getattr(plain, n).weight += layers[n].scaling * c * B @ A
    return torch.cat([nn.functional.cross_entropy(plain(b["input_ids"], b["attention_mask"]),
                                                  b["labels"], reduction="none")
                      for b in batches]).mean().item()


def test_real_decrease_equals_the_merged_update_and_leaves_the_adapters_as_found():
    """real_decrease: the mean example loss at W0 and at W0 + s c B A in every layer at once, in eval
    mode, against merging the update by hand; adapter weights and train mode come back as found."""
    model, batches = _model(), _batches(sizes=(3, 1, 4))  # unequal batches: a mean over examples
    layers = add_lora(model, ["query", "value"], rank=2, alpha=4, rslora=True)
    g = torch.Generator().manual_seed(1)
    directions = {n: (torch.randn(5, 2, generator=g), torch.randn(2, 6, generator=g)) for n in layers}
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(generator=g)  # adapters that contribute: W0 must still be measured without them
    found = {k: v.clone() for k, v in model.state_dict().items()}
    at_W0, losses = cglora.real_decrease(model.train(), layers, directions, batches, [0.5, 2.0])

    merged = lambda c: _merged_loss(layers, directions, c, batches)  # noqa: E731
    assert at_W0 == pytest.approx(merged(0.0), rel=1e-6)
    assert losses == pytest.approx({0.5: merged(0.5), 2.0: merged(2.0)}, rel=1e-5)
    assert model.training and all(torch.equal(v, found[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError):  # an error mid-way (labels of the wrong shape) restores them too
        bad = dict(batches[0], labels=torch.zeros(2, 2).long())
        cglora.real_decrease(model, layers, directions, batches + [bad], [1.0])
    assert model.training and all(torch.equal(v, found[k]) for k, v in model.state_dict().items())


def test_real_decrease_after_a_shifted_init_measures_from_the_original_W0():
    """Called after a shifted init is written (W0 moved by -s B0 A0), real_decrease measures from
    the original W0: its loss at W0 is the model's before the init, and scale c is W0 + s c B A0
    (merged by hand into a plain copy); a direction whose A is not the layer's A0 is refused in one
    line, and the adapters and weights come back as found either way."""
    model, batches = _model(), _batches(sizes=(3, 1, 4))
    layers = add_lora(model, ["query", "value"], rank=2, alpha=4, rslora=True)
    stats = collect_statistics(model, {n: m.base for n, m in layers.items()}, _batches())
    init_adapters(layers, stats, "cg-lora-shift")
    assert all(m.lora_B0.any() and not torch.equal(m.base.weight, getattr(_model(), n).weight)
               for n, m in layers.items())  # W0 moved
    g = torch.Generator().manual_seed(2)
    directions = {n: (torch.randn(5, 2, generator=g), m.lora_A0.clone()) for n, m in layers.items()}
    found = {k: v.clone() for k, v in model.state_dict().items()}
    at_W0, losses = cglora.real_decrease(model, layers, directions, batches, [0.5, 2.0])
    assert at_W0 == pytest.approx(_merged_loss(layers, directions, 0.0, batches), rel=1e-6)
    merged = {c: _merged_loss(layers, directions, c, batches) for c in (0.5, 2.0)}
    assert losses == pytest.approx(merged, rel=1e-5)
    assert all(torch.equal(v, found[k]) for k, v in model.state_dict().items())
    B, A = directions["value"]
    error = r"layers \['value'\]: their init shifted W0 .* must keep A0"
    with pytest.raises(ValueError, match=error) as e:
        cglora.real_decrease(model, layers, dict(directions, value=(B, A + 0.1)), batches, [1.0])
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, found[k]) for k, v in model.state_dict().items())


# ============================================================================ cglora.py: token-level losses (§9)


class _Causal(nn.Module):
    """A causal language model small enough to differentiate by hand: position t averages the
    embeddings of the real tokens up to t, then two target layers, `proj` and the LM head."""

    def __init__(self, vocab=7, d=5):
        super().__init__()
        self.emb, self.proj, self.lm_head = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, vocab)

    def mix(self, input_ids, attention_mask):  # [b, L, d], causal: padding after t cannot reach t
        m = attention_mask.unsqueeze(-1).float()
        return (self.emb(input_ids) * m).cumsum(1) / m.cumsum(1).clamp(min=1)

    def forward(self, input_ids, attention_mask):  # an output with .logits, as transformers' models
        return SimpleNamespace(logits=self.lm_head(torch.tanh(self.proj(self.mix(input_ids, attention_mask)))))


def _token_batches(seed=0, sizes=(3, 2), vocab=7, length=7):
    """Right-padded sequences labelled as Hugging Face does (labels = input ids, -100 on padding),
    with a prompt of 0-2 tokens also labelled -100; every sequence keeps at least one target."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        lengths = torch.randint(4, length + 1, (n,), generator=g)
        prompts = torch.randint(0, 3, (n,), generator=g)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        ids = torch.randint(1, vocab, (n, length), generator=g) * mask
        labels = ids.masked_fill((mask == 0) | (torch.arange(length)[None] < prompts[:, None]), cglora.IGNORE)
        out.append(dict(input_ids=ids, attention_mask=mask, labels=labels))
    return out


def _causal_brute_force(model, batches):
    """S, G, T of §2 and §9 for `proj` and `lm_head`, one unpadded sequence at a time, differentiating
    the model's steps directly: one loss term is one target token, so delta_it is the gradient of the
    sequence's summed token losses, and G, T are sums over sequences divided by all target tokens R:
    G the gradient of the mean token loss, S (x) T the K-FAC (expand) factors of its Fisher."""
    sums, tokens, n = {"proj": [0, 0, 0], "lm_head": [0, 0, 0]}, 0, 0
    for batch in batches:
        labels = batch["labels"]
        n = n + (labels[:, 1:] != cglora.IGNORE).sum()
        for ids, mask, target in zip(batch["input_ids"], batch["attention_mask"], labels):
            L = int(mask.sum())
            x = model.mix(ids[None, :L], mask[None, :L])[0]  # [L, d]
            y = model.proj(x)
            h = torch.tanh(y)
            logits = model.lm_head(h)  # [L, vocab]
            loss = nn.functional.cross_entropy(logits[:-1], target[1:L], ignore_index=cglora.IGNORE, reduction="sum")
            for name, inp, d in zip(sums, (x, h), torch.autograd.grad(loss, [y, logits])):
                inp = inp.detach()
                for j, term in enumerate((inp.T @ inp, d.T @ inp, d.T @ d)):
                    sums[name][j] = sums[name][j] + term
            tokens = tokens + L
    return {name: (S / tokens, G / n, T / n) for name, (S, G, T) in sums.items()}


def test_causal_lm_statistics_equal_per_sequence_brute_force_with_padding_and_ignored_labels():
    torch.manual_seed(0)
    model, batches = _Causal(), _token_batches()
    stats = collect_statistics(model, {"proj": model.proj, "lm_head": model.lm_head}, batches,
                               loss=cglora.causal_lm_loss)
    ref = _causal_brute_force(model, batches)
    for name in ref:
        for got, want in zip(_sgt(stats[name]), ref[name]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[3, 7, 7\] and \[3, 7\]: .* loss=cglora.causal_lm_loss"):
        collect_statistics(model, {"proj": model.proj}, batches)


def test_labels_that_count_padding_give_exact_G_and_T_while_S_keeps_the_real_tokens():
    """§2: labels = input ids with padding not set to -100 (transformers' loss then counts the padded
    targets): G and T hold every position where the loss has a gradient, S only the real tokens."""
    torch.manual_seed(0)
    model, names = _Causal(), ("proj", "lm_head")
    batches = [dict(b, labels=b["input_ids"].clone()) for b in _token_batches()]
    stats = collect_statistics(model, {n: getattr(model, n) for n in names}, batches, loss=cglora.causal_lm_loss)
    sums, tokens, n, padded = {name: [0, 0, 0] for name in names}, 0, 0, 0
    for batch in batches:  # brute force: each sequence alone, at its padded length
        n = n + batch["labels"][:, 1:].numel()
        for ids, mask, target in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            x = model.mix(ids[None], mask[None])[0]  # [L, d], padded positions included
            y = model.proj(x)
            h = torch.tanh(y)
            logits = model.lm_head(h)
            loss = nn.functional.cross_entropy(logits[:-1], target[1:], reduction="sum")
            keep = mask.bool()
            for name, inp, d in zip(names, (x, h), torch.autograd.grad(loss, [y, logits])):
                inp = inp.detach()
                padded = padded + d[~keep].abs().sum()
                for j, term in enumerate((inp[keep].T @ inp[keep], d.T @ inp, d.T @ d)):
                    sums[name][j] = sums[name][j] + term
            tokens = tokens + keep.sum()
    assert padded > 0  # the padded targets have a gradient
    for name, (S, G, T) in sums.items():
        for got, want in zip(_sgt(stats[name]), (S / tokens, G / n, T / n)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


class _RelativePositions(nn.Module):
    """`query` is applied to the tokens and to a learned table of relative positions [1, span, d]
    (as DeBERTa's projections are): the table's rows are not the batch's tokens, whatever its shape."""

    def __init__(self, vocab=11, d=4, span=5):
        super().__init__()
        self.emb, self.query, self.head = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, 3)
        self.positions = nn.Parameter(torch.randn(1, span, d))

    def forward(self, input_ids, attention_mask):
        q, p = self.query(self.emb(input_ids)), self.query(self.positions)  # [b, L, d], [1, span, d]
        m = attention_mask.unsqueeze(-1).float()
        h = q * torch.tanh(q @ p.transpose(1, 2)).mean(-1, keepdim=True)
        return self.head((h * m).sum(1) / m.sum(1))


@pytest.mark.parametrize("length", [5, 6])
def test_a_mask_applies_only_to_the_calls_whose_rows_are_the_batch_tokens(length):
    """One example whose length equals the table's (5), where the mask's shape fits the table too,
    and one where it does not (6): S is the real tokens' rows and every table row, G is autograd's."""
    torch.manual_seed(0)
    model = _RelativePositions()
    ids = torch.randint(1, 11, (1, length))
    mask = (torch.arange(length) < 3).long()[None]
    batch = dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([1]))
    stats = collect_statistics(model, {"query": model.query}, [batch])["query"]
    x = torch.cat([model.emb(ids)[0, :3], model.positions[0]]).detach()
    torch.testing.assert_close(stats.S, x.T @ x / 8, atol=1e-6, rtol=1e-5)
    grad, = torch.autograd.grad(nn.functional.cross_entropy(model(ids, mask), batch["labels"]),
                                model.query.weight)
    torch.testing.assert_close(stats.G, grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("folds", [1, 2])
def test_batches_whose_labels_are_all_ignored_are_refused_as_having_no_loss_terms(folds):
    """Every label IGNORE: no loss term, so G and T are 0 / 0; the error says so, not only that
    batches are missing (there are enough)."""
    batches = [dict(b, labels=torch.full_like(b["labels"], cglora.IGNORE)) for b in _token_batches()]
    model = _Causal()
    with pytest.raises(ValueError, match=r"a fold has no loss terms: \d folds need at least \d batches with labels not all -100"):
        collect_statistics(model, {"proj": model.proj}, batches, loss=cglora.causal_lm_loss, folds=folds)


def test_token_logits_on_the_default_loss_name_each_token_loss_by_its_convention():
    """A causal LM shifts its labels by one, a masked LM does not: the error names both; masked_lm_loss is
    the unshifted token mean and gives the labels to no model."""
    with pytest.raises(ValueError, match=r"causal_lm_loss where position t predicts token t \+ 1 .*"
                                         r"masked_lm_loss where it predicts its own label"):
        cglora.default_loss(torch.randn(2, 4, 7), torch.zeros(2, 4).long())
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 4, 7, generator=g), torch.randint(0, 7, (2, 4), generator=g)
    labels[0, 1:3] = cglora.IGNORE
    keep = labels != cglora.IGNORE
    torch.testing.assert_close(cglora.masked_lm_loss(logits, labels),
                               nn.functional.cross_entropy(logits[keep], labels[keep]))
    assert cglora.masked_lm_loss.terms(labels) == 6 and not getattr(cglora.masked_lm_loss, "model_labels", False)


def test_seq2seq_lm_loss_is_the_unshifted_token_mean_and_samples_only_its_targets():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 4, 7, generator=g), torch.randint(0, 7, (2, 4), generator=g)
    labels[1, 2:] = cglora.IGNORE
    want = nn.functional.cross_entropy(logits[labels != cglora.IGNORE], labels[labels != cglora.IGNORE])
    torch.testing.assert_close(cglora.seq2seq_lm_loss(logits, labels), want)
    assert cglora.seq2seq_lm_loss.terms(labels) == 6 and cglora.seq2seq_lm_loss.model_labels
    sampled = cglora.seq2seq_lm_loss.sample(logits, labels, g)
    assert (sampled[1, 2:] == cglora.IGNORE).all() and sampled[labels != cglora.IGNORE].min() >= 0


def test_causal_lm_sampled_fisher_is_the_expectation_over_the_model_tokens():
    torch.manual_seed(0)
    model, batch = _Causal(), _token_batches(seed=1, sizes=(3,))[0]
    with torch.no_grad():  # peaked predictions that change along the sequence: a sampler reading the
        model.emb.weight.mul_(3)  # wrong position or ignoring the model would miss E[T] by 3x the error bar
        model.lm_head.weight.mul_(3)
    logits = model(batch["input_ids"], batch["attention_mask"]).logits
    drawn = cglora.causal_lm_loss.sample(logits, batch["labels"], torch.Generator().manual_seed(0))
    fixed = (batch["labels"] == cglora.IGNORE) | (torch.arange(drawn.shape[1]) == 0)  # never a target
    assert torch.equal(drawn[fixed], batch["labels"][fixed]) and drawn[~fixed].ge(0).all()
    # exact E[T]: delta_i sums independent token terms whose mean is zero, so E[delta delta^T] sums
    # over target positions s and tokens c, weighted by p_s(c), the outer products of one term's gradient
    R = (batch["labels"][:, 1:] != cglora.IGNORE).sum()  # loss terms: target tokens
    exact = 0
    for ids, mask, target in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        L = int(mask.sum())
        y = model.proj(model.mix(ids[None, :L], mask[None, :L])[0])
        logits = model.lm_head(torch.tanh(y))
        for s in (s for s in range(1, L) if target[s] != cglora.IGNORE):
            for c, p in enumerate(logits[s - 1].softmax(-1).detach()):
                d, = torch.autograd.grad(nn.functional.cross_entropy(logits[s - 1], torch.tensor(c)), y,
                                         retain_graph=True)
                exact = exact + p * d.T @ d / R
    folds = 8  # each fold's T is an independent Monte Carlo estimate: their spread gives the error bar
    est = collect_statistics(model, {"proj": model.proj}, [batch] * 200, fisher="sampled", loss=cglora.causal_lm_loss,
                             generator=torch.Generator().manual_seed(0), folds=folds)["proj"]
    spread = torch.stack([f.T for f in est.folds]).var(0).sum() / folds  # E ||T_est - E T||_F^2
    empirical = collect_statistics(model, {"proj": model.proj}, [batch], loss=cglora.causal_lm_loss, folds=1)["proj"]
    torch.testing.assert_close(est.G, empirical.G)  # G always uses the true labels
    assert (est.T - exact).norm() < 4 * spread.sqrt() < (empirical.T - exact).norm()


def test_causal_lm_on_transformers_llama_G_is_its_loss_gradient_and_cg_lora_initialises():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    batch = _token_batches(seed=2, sizes=(4,), vocab=50, length=9)[0]
    layers = {"q": model.model.layers[0].self_attn.q_proj, "down": model.model.layers[1].mlp.down_proj}
    stats = collect_statistics(model, layers, [batch], loss=cglora.causal_lm_loss, folds=1)
    out = model(**batch)
    torch.testing.assert_close(cglora.causal_lm_loss(out.logits, batch["labels"]), out.loss)
    grads = torch.autograd.grad(out.loss, [layer.weight for layer in layers.values()])
    for name, grad in zip(layers, grads):
        assert (stats[name].G - grad).norm() <= 1e-5 * grad.norm(), name
    # and the whole path, cglora alone: adapters on every attention projection, initialised by CG-LoRA
    adapters = add_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=2, alpha=4, rslora=True)
    stats = collect_statistics(model, {n: layer.base for n, layer in adapters.items()},
                               _token_batches(seed=3, sizes=(2, 3), vocab=50, length=9), loss=cglora.causal_lm_loss)
    report = init_adapters(adapters, stats, "cg-lora")
    assert len(report) == 8 and all(r["captured"] > 0 and r["fallback"] is None for r in report)


def test_the_default_init_is_one_pass_at_a_fixed_damping_with_no_diagnostics():
    """Issue 32: one statistics copy (folds=1), lambda = cglora.DAMPING, no §8 diagnostics."""
    report = _adapted("cg-lora")[3]
    assert cglora.DAMPING == 1.0
    assert all(r["damping"] == 1.0 and "heldout" not in r and "insample" not in r for r in report)
    model = _model()  # W0, as the init saw it
    stats = collect_statistics(model, {n: getattr(model, n) for n in ("query", "value", "mix")}, _batches())
    assert all(st.folds == () for st in stats.values())  # one copy: no folds
    S, G, T = _sgt(stats["mix"])  # the init is the Newton step at that damping, as cg_lora_factors has it
    B, A = cg_lora_factors(G.double(), S.double(), T.double(), 2, damping=1.0)[:2]
    torch.testing.assert_close(_adapted("cg-lora", init_norm=0)[2]["mix"].delta_weight().double(),
                               B @ A * 1.0, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("blocks", [2, 3])
def test_symmetric_sums_in_lower_blocks_equal_the_whole_products(monkeypatch, blocks):
    """S and T are summed in their lower block triangle and mirrored: the same as a^T a whole."""
    model = _model()
    bases = {n: getattr(model, n) for n in ("query", "value", "mix")}
    monkeypatch.setattr(cglora, "_FLUSH_ROWS", 4)  # several flushes
    whole = collect_statistics(model, bases, _batches(sizes=(3, 2, 4)))
    monkeypatch.setattr(cglora, "_GRAM_MIN_WIDTH", 1)
    monkeypatch.setattr(cglora, "_GRAM_BLOCKS", blocks)
    split = collect_statistics(model, bases, _batches(sizes=(3, 2, 4)))
    for name in bases:
        for X, Y in zip(split[name][:3], whole[name][:3]):
            torch.testing.assert_close(X, Y, rtol=1e-6, atol=1e-7)
        S, T = split[name].S, split[name].T
        assert torch.equal(S, S.T) and torch.equal(T, T.T)


def test_layers_that_share_an_input_share_one_cholesky_of_S(monkeypatch):
    calls = []
    real = cglora.damped_cholesky
    monkeypatch.setattr(cglora, "damped_cholesky", lambda X, damping: calls.append(X.shape) or real(X, damping))
    _adapted("cg-lora")  # query and value share their input: S (6 x 6) is factorized once
    assert sorted(calls) == sorted([(6, 6), (5, 5), (5, 5), (5, 5), (6, 6)])  # S_qv, S_mix, 3 T's


@pytest.mark.parametrize("method", ["cg-lora", "cg-lora-shift", "lora-ga", "lora-one", "lora"])
def test_init_in_groups_under_a_budget_gives_the_factors_of_one_pass(method):
    """Issue 32: layers in groups, one calibration pass per group, under a statistics budget;
    every factor and weight equal to collect_statistics + init_adapters over all layers at once."""
    def adapters(budget):
        model = _model()
        layers = add_lora(model, ["query", "value", "mix"], rank=2, alpha=4, rslora=cglora.RSLORA[method])
        if budget is None:
            stats = collect_statistics(model, {n: m.base for n, m in layers.items()}, _batches())
            init_adapters(layers, stats, method)
            groups = [list(layers)]
        else:
            groups = cglora.init_in_groups(model, layers, _batches(), method, budget)[1]
        return groups, model.state_dict()
    one_mib = cglora.statistics_mib({"mix": add_lora(_model(), ["mix"], 2, 4)["mix"]})
    one, state = adapters(None)
    groups, grouped = adapters(1.5 * one_mib)  # one layer a group: three passes
    assert groups == [["query"], ["value"], ["mix"]] and one == [["query", "value", "mix"]]
    for key, value in state.items():
        assert torch.equal(grouped[key], value), key
    with pytest.raises(ValueError, match="over the budget .* raise budget_mib"):
        cglora.init_in_groups(_model(), add_lora(_model(), ["mix"], 2, 4), _batches(), method, one_mib / 2)


# ============================================================================ cglora.py: devices


# No GPU runs these tests. _Accelerator stands in for one: real CPU data that reports another
# device and refuses, as CUDA does, any op that meets tensors of two devices (CPU scalars apart) and
# a random draw on it from a CPU generator.
class _OnAccelerator(torch.Tensor):
    """A CPU tensor that says it lives on the accelerator (device "meta": torch has no CUDA here)."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=_ACCELERATOR, requires_grad=elem.requires_grad)

    def __init__(self, elem):
        self.elem = elem

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        seen = set()

        def unwrap(x):
            if isinstance(x, _OnAccelerator):
                seen.add("accelerator")
                return x.elem
            if isinstance(x, torch.Tensor) and x.dim() > 0:  # CUDA accepts CPU scalars, nothing else
                seen.add(str(x.device))
            return x

        args, kwargs = pytree.tree_map(unwrap, (args, kwargs or {}))
        if len(seen) > 1:
            raise RuntimeError(f"{func}: expected all tensors to be on the same device, got {seen}")
        if func is torch.ops.aten._to_copy.default:
            if torch.device(kwargs.pop("device", _ACCELERATOR)).type == "cpu":
                return func(*args, **kwargs)  # .cpu(): a plain tensor again
        out = func(*args, **kwargs)
        return pytree.tree_map(lambda x: cls(x) if isinstance(x, torch.Tensor) else x, out)


_ACCELERATOR = torch.device("meta")


class _Accelerator(TorchDispatchMode):
    """While active, tensors made or moved to _ACCELERATOR are _OnAccelerator (real data)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is None or torch.device(device) != _ACCELERATOR or any(
                isinstance(x, _OnAccelerator) for x in args):
            return func(*args, **kwargs)
        generator = kwargs.get("generator")
        if generator is not None and generator.device != _ACCELERATOR:
            raise RuntimeError(f"{func}: a {generator.device} generator draws on its own device only")
        return _OnAccelerator(func(*args, **dict(kwargs, device="cpu")))


def _on_accelerator(x):
    return isinstance(x, _OnAccelerator)


def test_the_accelerator_stand_in_refuses_what_cuda_refuses():
    with _Accelerator():
        x = torch.ones(2, 3).to(_ACCELERATOR)
        assert _on_accelerator(x) and x.device == _ACCELERATOR and (x * 2).sum().item() == 12
        assert _on_accelerator(x + torch.tensor(1.0))  # a CPU scalar is fine
        with pytest.raises(RuntimeError, match="same device"):
            x @ torch.ones(3, 2)
        with pytest.raises(RuntimeError, match="generator"):
            torch.randn(3, generator=torch.Generator().manual_seed(0), device=_ACCELERATOR)
        assert not _on_accelerator(x.cpu()) and x.cpu().sum().item() == 6


def test_top_r_and_the_factor_routines_keep_an_accelerator_matrix_there():
    """Issue 31's crash: top_r drew its start block on the CPU and met M on the GPU. (torch's
    FakeTensorMode reproduces it too, but on a CPU-only torch it cannot run an SVD, nor move a
    tensor, on a fake CUDA device: hence the stand-in.)"""
    g = torch.Generator().manual_seed(0)
    G, S, T = torch.randn(12, 10, generator=g), _spd(10, 1, torch.float32), _spd(12, 2, torch.float32)
    with _Accelerator():
        G_, S_, T_ = (X.to(_ACCELERATOR) for X in (G, S, T))
        B, A, sigma, energy = cglora.cg_lora_factors(G_, S_, T_, 3)
        made = [*cglora.top_r(G_, 4), *cglora.lora_ga_factors(G_, 2), *cglora.lora_one_factors(G_, 2),
                *cglora.whiten(G_, S_, T_), B, A, sigma, energy, *cglora.balance(B, A),
                *cglora.lora_factors(12, 10, 4, device=G_.device)]
    assert all(_on_accelerator(X) for X in made)
    B_cpu, A_cpu = cglora.cg_lora_factors(G, S, T, 3)[:2]  # the same step as on the CPU
    torch.testing.assert_close(B.elem @ A.elem, B_cpu @ A_cpu)


def _init_and_step(method, on_accelerator, **kw):
    """Statistics, init and one AdamW step, on the CPU or the stand-in accelerator; with folds, the
    damping search (damping="auto": choose_damping's, as train.py does) and the diagnostics too.
    Returns the tensors made (statistics, parameters, buffers) and the step's loss."""
    stats_kw = {k: kw.pop(k) for k in ("fisher", "folds") if k in kw}
    move = (lambda x: x.to(_ACCELERATOR)) if on_accelerator else (lambda x: x)
    with _Accelerator() if on_accelerator else contextlib.nullcontext():
        model = move(_model())
        layers = add_lora(model, ["query", "value", "mix"], rank=2, alpha=4, trainable=["head"])
        batches = [{k: move(v) for k, v in b.items()} for b in _batches(sizes=(3, 2, 4, 2))]
        stats = None if method in ("lora", "rslora") else collect_statistics(
            model, {n: m.base for n, m in layers.items()}, batches, **stats_kw)
        made = [X for st in (stats or {}).values() for X in _held(st)]
        ranks = {n: 2 for n in layers}
        if kw.get("damping") == "auto":
            kw["damping"] = cglora.choose_damping(stats, ranks)[0]
        init_adapters(layers, stats, method, **kw)
        if stats_kw.get("folds", 1) > 1:
            assert cglora.diagnose(stats, ranks, method, **kw).keys() == layers.keys()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        inputs = {k: v for k, v in batches[0].items() if k != "labels"}
        loss = cglora.default_loss(model(**inputs), batches[0]["labels"])
        loss.backward()
        opt.step()
        return made + list(model.parameters()) + list(model.buffers()), loss.item()


@pytest.mark.parametrize("method,kw", [(m, {}) for m in cglora.METHODS]
                         + [("cg-lora", dict(damping="auto", folds=2)),
                            ("cg-lora", dict(fisher="sampled", damping=0.1)),
                            ("lora-one", dict(folds=2))])
def test_every_init_and_a_training_step_stay_on_the_accelerator(method, kw):
    """Statistics, every method's init (the damping search and diagnostics too) and a step on an
    accelerator: no op meets two devices, every tensor made lives with the model, and the random
    draws are the CPU's (the same seed gives the same loss)."""
    made, loss = _init_and_step(method, True, **kw)
    assert all(_on_accelerator(X) for X in made)
    assert loss == pytest.approx(_init_and_step(method, False, **kw)[1], rel=1e-6)  # rounding apart


def test_init_in_groups_factorizes_in_fp32_under_autocast():
    """The grouped path's factors are computed as init_adapters' are, autocast off: each update at
    its exact size (in bf16 the size's spectral norm raised an error)."""
    model = _model()
    layers = add_lora(model, ["query", "value", "mix"], rank=2, alpha=4, rslora=True)
    with torch.autocast("cpu", torch.bfloat16):
        report, groups = cglora.init_in_groups(model, layers, _batches(), "cg-lora", 0.0004)
    assert len(groups) == 3
    for row in report:
        assert row["update_norm"] == pytest.approx(4 / (math.sqrt(2) * cglora.LORA_ONE_GAMMA), rel=1e-5)


@pytest.mark.parametrize("flush_rows", [1, 10 ** 6])
def test_statistics_are_fp32_under_autocast(monkeypatch, flush_rows):
    """A caller's bf16 autocast reaches the statistics pass: the sums stay fp32 whether they are
    flushed many times (flush_rows=1) or once, and the init still runs."""
    monkeypatch.setattr(cglora, "_FLUSH_ROWS", flush_rows)
    model = _model()
    layers = add_lora(model, ["query", "value", "mix"], rank=2, alpha=4)
    bases = {n: m.base for n, m in layers.items()}
    with torch.autocast("cpu", torch.bfloat16):
        stats = collect_statistics(model, bases, _batches(), folds=1)
        init_adapters(layers, stats, "cg-lora", damping=0.1)
    exact = collect_statistics(model, bases, _batches(), folds=1)
    for name, st in stats.items():
        for X, Y in zip(st[:3], exact[name][:3]):
            assert X.dtype == torch.float32
            torch.testing.assert_close(X, Y, rtol=0.1, atol=0.05 * Y.abs().max().item())


# ============================================================================ cglora.py: clear failures, the shifted export


def test_add_lora_names_the_type_of_a_target_that_is_not_linear():
    model = _model()
    with pytest.raises(ValueError, match=r"layer emb is Embedding, not nn\.Linear, .* target the nn\.Linear layers"):
        add_lora(model, ["query", "emb"], rank=2, alpha=4)
    assert isinstance(model.query, nn.Linear) and all(p.requires_grad for p in model.parameters())  # as it was


def test_a_target_whose_weight_is_tied_to_another_module_refuses_a_shift_and_a_merge():
    """Tied input/output embeddings: the adapter's G is the head's use alone (exact for the adapter), but
    moving W0 would move the embedding too: shifted inits and merging are refused."""
    torch.manual_seed(0)
    model = _Causal(vocab=5, d=5)
    model.lm_head.weight = model.emb.weight  # vocab x d both
    batches = _token_batches(vocab=5)
    layers = add_lora(model, ["lm_head", "proj"], rank=2, alpha=4)
    assert layers["lm_head"].tied and not layers["proj"].tied
    stats = collect_statistics(model, {n: m.base for n, m in layers.items()}, batches, loss=cglora.causal_lm_loss)
    for method in ("cg-lora-shift", "lora-ga"):
        with pytest.raises(ValueError, match=r"\['lm_head'\]: .* tied to another module's"):
            init_adapters(layers, stats, method)
    with pytest.raises(ValueError, match="tied to another module's: merging would change that module"):
        layers["lm_head"].merge()
    init_adapters(layers, stats, "cg-lora")
    before = model.emb.weight.clone()
    layers["proj"].merge()
    assert torch.equal(model.emb.weight, before)


def test_add_lora_takes_one_target_name_and_names_an_existing_adapter():
    model = _model()
    assert list(add_lora(model, "query", rank=2, alpha=4)) == ["query"]  # "query", not "q", "u", ...
    with pytest.raises(ValueError, match=r"layer query already has a LoRA adapter \(LoRALinear\)"):
        add_lora(model, ["query"], rank=2, alpha=4)


def test_collect_statistics_wants_a_list_of_dicts_with_labels():
    model = _model()
    batch = _batches()[0]
    with pytest.raises(TypeError, match=r"iterable of dicts \(a list of batches, not one batch: \[batch\]\); "
                                        r"item 0 is str 'input_ids'"):
        collect_statistics(model, {"query": model.query}, batch)  # one dict: its keys are iterated
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match=r"batch 1 has no 'labels' \(it has \['attention_mask', 'input_ids'\]\)"):
        collect_statistics(model, {"query": model.query}, [batch, unlabelled])
    done = []
    collect_statistics(model, {"query": model.query}, _batches(sizes=(2, 2, 2)), progress=done.append)
    assert done == [0, 1, 2]


def test_shifted_export_is_rank_2r_for_every_layer_even_a_zero_gradient_one():
    model = _model()
    reference = copy.deepcopy(model)
    layers = add_lora(model, ["dead", "mix"], rank=2, alpha=4, rslora=True)
    stats = collect_statistics(model, {n: layer.base for n, layer in layers.items()}, _batches())
    report = init_adapters(layers, stats, "cg-lora-shift")
    assert {r["layer"]: r["fallback"] is not None for r in report} == {"dead": True, "mix": False}  # B = B0 = 0
    sd = lora_state_dict(model)  # peft needs one rank for all layers of an adapter
    for n, layer in layers.items():
        A, B = sd[f"base_model.model.{n}.lora_A.weight"], sd[f"base_model.model.{n}.lora_B.weight"]
        assert A.shape[0] == 4
        torch.testing.assert_close(getattr(reference, n).weight + layer.scaling * B @ A,
                                   layer.base.weight + layer.delta_weight(), atol=1e-6, rtol=0)


# ============================================================================ cglora.py: rank allocation
import itertools  # noqa: E402  (this section's own: the file is appended to)
import json  # noqa: E402


def _allocation_problem(shapes=((6, 5), (4, 7), (5, 5), (3, 6)), seed=0):  # layers of other shapes
    return {f"l{i}": cglora.Statistics(S, G, T, 10.0, 20.0, f"l{i}")
            for i, (d_out, d_in) in enumerate(shapes)
            for G, S, T in [_problem(d_out, d_in, seed + 3 * i)]}


@pytest.mark.parametrize("rank, budget", [(2, None), (1, 4), (2, 5), (2, 11), (3, 16)])
def test_allocated_ranks_are_the_best_directions_the_budget_buys_within_the_bounds(rank, budget):
    """Every allocation with ranks in 1..min(2r, d_out, d_in) that spends the budget, enumerated: the
    one chosen has the largest total predicted decrease, sigma^2 / 2 of the whitened gradient by eigh;
    and its directions past each layer's first are the top scores overall (a direct sort)."""
    stats = _allocation_problem()
    got = cglora.allocate_ranks(stats, rank, budget, damping=0.3)
    scores = {n: (_brute_step(st.G, st.S, st.T, 1, 0.3)[1] ** 2 / 2).tolist() for n, st in stats.items()}
    top = {n: min(2 * rank, len(s)) for n, s in scores.items()}  # min(2r, d_out, d_in)
    budget = budget or rank * len(stats)
    spending = [r for r in itertools.product(*(range(1, top[n] + 1) for n in stats)) if sum(r) == budget]
    best = max(spending, key=lambda r: sum(sum(scores[n][:k]) for n, k in zip(stats, r)))
    assert got == dict(zip(stats, best)) and sum(got.values()) == budget
    rest = sorted((x for n in stats for x in scores[n][1:top[n]]), reverse=True)[:budget - len(stats)]
    assert sorted((x for n in stats for x in scores[n][1:got[n]]), reverse=True) == pytest.approx(rest)
    assert cglora.allocate_ranks(stats, rank, budget, damping=0.3) == got  # one input, one result


def test_allocation_is_uniform_when_every_layer_has_the_same_spectrum():
    """Layers whose whitened gradients are rotations of one another (and whose gradients are: the
    peer rule) have one spectrum up to rounding: each gets the uniform rank, under either score. The
    ranks given per layer are the cap's r and the budget's."""
    G, S, T = _problem(6, 5)
    stats = {}
    for i, name in enumerate("abc"):
        g = torch.Generator().manual_seed(i)
        Q_out, Q_in = (torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q for d in (6, 5))
        stats[name] = cglora.Statistics(Q_in @ S @ Q_in.T, Q_out @ G @ Q_in.T, Q_out @ T @ Q_out.T, 1.0, 1.0, name)
    same = {n: cglora.Statistics(S, G, T, 1.0, 1.0, n) for n in "abc"}  # exact ties: the earlier layer
    assert [cglora.allocate_ranks(same, 1, b) for b in (4, 5)] == [{"a": 2, "b": 1, "c": 1}, {"a": 2, "b": 2, "c": 1}]
    for score in ("cg-lora", "gradient"):
        assert cglora.allocate_ranks(stats, 2, score=score) == {"a": 2, "b": 2, "c": 2}
        assert cglora.allocate_ranks(stats, {"a": 1, "b": 3, "c": 2}, score=score) == {"a": 2, "b": 2, "c": 2}
    # the peer rule scores G's own singular values: with S = T = I and no damping, the same ranks
    stats = _allocation_problem()
    plain = {n: st._replace(S=torch.eye(st.S.shape[0], dtype=torch.float64),
                            T=torch.eye(st.T.shape[0], dtype=torch.float64)) for n, st in stats.items()}
    assert cglora.allocate_ranks(stats, 2, score="gradient") == cglora.allocate_ranks(plain, 2, damping=0.0)


def test_allocation_and_per_layer_ranks_refuse_bad_input_in_one_line():
    stats = _allocation_problem()
    for kw, message in [(dict(budget=3), r"budget 3 must be in 4..15: each layer's rank is in 1..min\(2 r"),
                        (dict(budget=16), r"budget 16 must be in 4..15"),
                        (dict(score="eva"), r"score must be 'cg-lora' or 'gradient' and cap >= 1, got 'eva'"),
                        (dict(cap=0.5), r"cap >= 1, got 'cg-lora', 0.5")]:
        with pytest.raises(ValueError, match=message):
            cglora.allocate_ranks(stats, 2, **kw)
    with pytest.raises(ValueError, match=r"ranks has no rank for layers \['l3'\]: give one r or every layer's"):
        cglora.allocate_ranks(stats, {"l0": 2, "l1": 2, "l2": 2})
    nan = dict(stats, l1=stats["l1"]._replace(G=stats["l1"].G * math.nan))
    with pytest.raises(ValueError, match="layer l1: statistics contain NaN or Inf"):
        cglora.allocate_ranks(nan, 2, score="gradient")
    model = _model()
    for rank, message in [({"query": 2}, r"no rank to layers \['value'\] and one to non-targets \[\]"),
                          ({"query": 2, "value": 2, "mix": 1}, r"\[\] and one to non-targets \['mix'\]: give"),
                          ({"query": 2, "value": 2.0}, r"layer value: rank 2.0 must be an integer in 1..min"),
                          ({"query": 2, "value": 6}, r"layer value: rank 6 must be an integer in 1..min\(d_in, "
                                                     r"d_out\) = 5")]:
        with pytest.raises(ValueError, match=message):
            add_lora(model, ["query", "value"], rank, alpha=4)
        assert all(type(m) is nn.Linear for m in (model.query, model.value))  # the model left alone


def test_statistics_before_add_lora_allocate_and_init_at_per_layer_ranks():
    """train.py's order: statistics of the plain targets (the same as of add_lora's base layers, whose
    adapters add zero), allocate_ranks, add_lora at those ranks, init_adapters with the same statistics.
    Each layer's init is the one a uniform add_lora at its rank gives; the zero-gradient layer keeps
    rank 1 and the plain LoRA init."""
    targets = ["query", "value", "mix", "dead"]
    model, batches = _model(), _batches()
    stats = collect_statistics(model, cglora.target_layers(model, targets, nn.Linear), batches)
    ranks = cglora.allocate_ranks(stats, 2)
    assert ranks["dead"] == 1 and sum(ranks.values()) == 8 and len(set(ranks.values())) > 1, ranks
    layers = add_lora(model, targets, ranks, alpha=4, rslora=True)
    after = collect_statistics(model, {n: m.base for n, m in layers.items()}, batches)
    for name in targets:
        for X, Y in zip(_sgt(stats[name]), _sgt(after[name])):
            torch.testing.assert_close(X, Y, atol=0, rtol=0)
    rows = cglora.init_adapters(layers, stats)
    assert [(r["layer"], r["rank"]) for r in rows] == list(ranks.items())
    assert [r["layer"] for r in rows if r["fallback"]] == ["dead"]
    for name, r in ranks.items():
        alone = _model()
        one = add_lora(alone, [name], r, alpha=4, rslora=True)
        cglora.init_adapters(one, {name: stats[name]})
        torch.testing.assert_close(one[name].delta_weight(), layers[name].delta_weight(), atol=0, rtol=0)


@pytest.mark.parametrize("method, rslora", [("cg-lora", True), ("cg-lora", False), ("cg-lora-shift", True)])
def test_per_layer_ranks_reload_in_peft_to_our_logits(tmp_path, method, rslora):
    """save_peft writes each layer's rank and scaling (rank_pattern, alpha_pattern: rsLoRA's
    alpha / sqrt(r_i) per layer, a shifted layer's 2 r_i) and PeftModel.from_pretrained(the original
    model) gives our logits."""
    peft = pytest.importorskip("peft")
    model, batches = _model(), _batches()
    targets = ["query", "value", "mix"]
    layers = add_lora(model, targets, {"query": 1, "value": 3, "mix": 2}, alpha=4, rslora=rslora)
    cglora.init_adapters(layers, collect_statistics(model, {n: m.base for n, m in layers.items()}, batches),
                         method)
    with torch.no_grad():  # as if trained
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    config = cglora.save_peft(model, tmp_path)
    factor = 2 if method == "cg-lora-shift" else 1
    assert (config["r"], config["use_rslora"]) == (factor * 1, rslora and factor == 1)
    assert config["rank_pattern"] == {"value": 3 * factor, "mix": 2 * factor}
    loaded = peft.PeftModel.from_pretrained(_model(), tmp_path).eval()
    lora = {n.removeprefix("base_model.model."): m for n, m in loaded.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, layer in layers.items():
        assert lora[name].r["default"] == factor * layer.rank
        if factor == 1:
            assert lora[name].scaling["default"] == layer.scaling  # exactly ours
    x = batches[0]
    want = model.eval()(x["input_ids"], x["attention_mask"])
    torch.testing.assert_close(loaded(input_ids=x["input_ids"], attention_mask=x["attention_mask"]), want,
                               atol=1e-6, rtol=1e-5)


def test_initialize_peft_at_a_rank_pattern_is_add_lora_and_init_adapters_at_those_ranks():
    peft = pytest.importorskip("peft")
    targets, ranks, batches = ["query", "value", "mix"], {"query": 3, "value": 2, "mix": 1}, _batches()
    model = _model()
    layers = add_lora(model, targets, ranks, alpha=4, rslora=True)
    cglora.init_adapters(layers, collect_statistics(model, {n: m.base for n, m in layers.items()}, batches))
    config = peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=targets,
                             rank_pattern={"query": 3, "mix": 1})
    peft_model = peft.get_peft_model(_model(), config)
    cglora.initialize_peft(peft_model, batches)
    for name, layer in layers.items():
        theirs = peft_model.get_submodule(f"base_model.model.{name}")
        assert theirs.r["default"] == ranks[name]
        torch.testing.assert_close(theirs.get_delta_weight("default"), layer.delta_weight(), atol=1e-7, rtol=1e-5)


_ALLOCATE = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import cglora, test_cglora as tc
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model, batches = tc._model(), tc._batches(sizes=(3, 2, 4, 1, 2, 3, 2, 2))
layers = cglora.target_layers(model, ["query", "value", "mix"], torch.nn.Linear)
stats = cglora.collect_statistics(model, layers, batches[rank::world])
torch.save(dict(owned=[n for n, st in stats.items() if st.G is not None], ranks=cglora.allocate_ranks(stats, 2)),
           f"{sys.argv[2]}/rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
"""


def test_allocation_under_torchrun_gathers_every_owners_scores(tmp_path):
    """Each rank holds some layers' statistics only; the scores are gathered, so every rank allocates
    the ranks one process allocates from all the batches."""
    (tmp_path / "allocate.py").write_text(_ALLOCATE)
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(tmp_path / "allocate.py"), here, str(tmp_path)],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-1000:] + run.stderr[-3000:]
    model = _model()
    want = cglora.allocate_ranks(collect_statistics(model, cglora.target_layers(
        model, ["query", "value", "mix"], nn.Linear), _batches(sizes=(3, 2, 4, 1, 2, 3, 2, 2))), 2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [g["owned"] for g in got] == [["query", "value"], ["mix"]]
    assert got[0]["ranks"] == got[1]["ranks"] == want


def test_train_allocate_holds_the_rank_sum_writes_each_layers_rank_and_resumes(tmp_path):
    """train.py --allocate on the tiny encoder: init.json's rows carry the allocated ranks, summing to
    the uniform run's, so (query and value: one shape) the same adapter parameters; the exported
    adapter's rank_pattern holds them; --resume rebuilds the adapters at those ranks; other inits and
    the damping search are refused."""
    from tests.conftest import _glue_fixture, _train
    _glue_fixture(tmp_path / "glue")
    _train(tmp_path, "--max_steps", "1", out="uniform")
    _train(tmp_path, "--max_steps", "1", "--allocate", "cg-lora", out="allocated")
    uniform, init = (json.loads((tmp_path / run / "init.json").read_text()) for run in ("uniform", "allocated"))
    ranks = {row["layer"]: row["rank"] for row in init["layers"]}
    assert sorted(ranks) == sorted(row["layer"] for row in uniform["layers"]) and len(set(ranks.values())) > 1
    summary = init["summary"]
    assert summary["rank_sum"] == summary["uniform_rank_sum"] == 8 * len(ranks) == sum(ranks.values())
    assert summary["adapter_parameters"] == summary["uniform_adapter_parameters"]
    assert init["trainable_parameters"] == uniform["trainable_parameters"]
    config = json.loads((tmp_path / "allocated" / "adapter_init" / "adapter_config.json").read_text())
    assert {n: config["rank_pattern"].get(n.replace(".", r"\."), config["r"]) for n in ranks} == ranks
    train.main(["--resume", "--out", str(tmp_path / "allocated"), "--max_steps", "2"])
    assert train.read_metrics(tmp_path / "allocated")[-1]["step"] == 2
    for flags in (["--init", "lora-one"], ["--damping", "auto"], ["--allocate", "eva"]):
        with pytest.raises(ValueError, match=r"--allocate [\w-]+ \(--init .*\): it takes cg-lora or gradient, "
                                             r"with --init cg-lora or cg-lora-shift at a --damping number"):
            train.parse_args(["--allocate", "cg-lora", *flags])


def test_train_allocate_on_a_checkpoint_exports_ranks_under_its_names_that_peft_loads(tmp_path):
    """From a Hugging Face checkpoint the adapter is saved under the checkpoint's module names: the
    rank_pattern's keys are renamed with them, so peft builds each layer at its allocated rank."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    from tests.conftest import _glue_fixture, _pretrained_checkpoint, _train
    glue = _glue_fixture(tmp_path / "glue")
    _pretrained_checkpoint(tmp_path / "checkpoint", glue)
    _train(tmp_path, "--pretrained", str(tmp_path / "checkpoint"), "--allocate", "cg-lora", "--max_steps", "1")
    run = tmp_path / "run"
    rename = train.hf_name(train.load_config(run), train.build_model(
        train.load_config(run), None, 2))
    ranks = {rename(row["layer"] + ".weight").removesuffix(".weight"): row["rank"]
             for row in json.loads((run / "init.json").read_text())["layers"]}
    assert len(set(ranks.values())) > 1
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "checkpoint")
    loaded = peft.PeftModel.from_pretrained(base, run)
    got = {n.removeprefix("base_model.model."): m.r["default"] for n, m in loaded.named_modules()
           if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert got == ranks
