"""Tests: each checks a claim of docs/cg-lora.md or of the code, and fails if it is false.

Sections in reading order: cglora.py (math, model side, LoRA layer, init), models.py, data.py, train.py.
Real GLUE files are read from $GLUE_DIR, real tokenizer files from $TOKENIZERS_DIR/roberta-base and
$TOKENIZERS_DIR/all-minilm-l6-v2 (those tests skip when unset); Hugging Face parity tests skip without
transformers. No test reaches the network.
"""
import ast
import contextlib
import copy
import dataclasses
import http.server
import json
import math
import os
import struct
import subprocess
import sys
import warnings
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import cglora
import data
import models
import train
from cglora import (LoRALinear, add_lora, balance, cg_lora_factors, collect_statistics,
                    init_adapters, lora_state_dict, top_svd)
from data import Example
from models import (EncoderConfig, Encoder, from_pretrained, hf_names, load_adapter, read_safetensors,
                    tiny_config)


# The GLUE fixtures here hold a few rows, not GLUE's counts: read_split's RowCountWarning is expected
# (pytest.warns still sees it where a test checks it).
pytestmark = pytest.mark.filterwarnings("ignore::data.RowCountWarning")


@pytest.fixture(autouse=True)
def _offline(tmp_path_factory, monkeypatch):
    """No test reaches the network: a download a test does not point elsewhere goes to an empty local folder."""
    monkeypatch.setenv("GLUE_URL", tmp_path_factory.mktemp("no-mirror").as_uri())


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
    B, A, sigma = cg_lora_factors(G, S, T, rank, damping=damping, step=step, scaling=scaling)
    dW, sigma_ref = _brute_step(G, S, T, rank, damping)
    torch.testing.assert_close(scaling * B @ A, step * dW, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(sigma, sigma_ref[:rank], atol=1e-8, rtol=1e-8)
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
    B, A, _ = cg_lora_factors(G, I5, I6, rank=2, damping=0.0, step=0.7, scaling=3.0)
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
    B, A, sigma = cg_lora_factors(G, S, T, 2, damping=0.3)
    for G2, S2, T2 in ((c * G, c * c * S, T), (c * G, S, c * c * T)):
        B2, A2, sigma2 = cg_lora_factors(G2, S2, T2, 2, damping=0.3)
        torch.testing.assert_close(B2 @ A2, B @ A / c, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(sigma2, sigma, atol=1e-10, rtol=1e-8)


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
    B, A, sigma = cg_lora_factors(torch.zeros(6, 5, dtype=torch.float64), S, torch.zeros_like(T), 2)
    assert torch.isfinite(B).all() and torch.isfinite(A).all() and (B @ A).abs().max() == 0


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
    Bc, Ac, sigma = cg_lora_factors(G, S, T, 2, damping=0.0)
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
    for name in layers:  # the folds are the only copies: pooled statistics are formed on access
        assert all(f.S is g.S for f, g in zip(three[name].folds, three["query"].folds)) == (name == "query")
    with pytest.raises(ValueError, match="6 folds need at least 6 calibration batches"):
        collect_statistics(model, layers, batches, folds=6)


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
            out.append(cglora.Fold(S, G, T, samples, samples))
            continue
        X = torch.randn(samples, d, generator=g, dtype=S.dtype) @ torch.linalg.cholesky(S).T
        D = X @ W.T + torch.randn(samples, d, generator=g, dtype=S.dtype) @ torch.linalg.cholesky(E).T
        out.append(cglora.Fold(X.T @ X / samples, D.T @ X / samples, D.T @ D / samples, samples, samples))
    return cglora.Statistics(tuple(out)), (G, S, T)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_auto_damping_is_near_the_best_grid_point_on_noisy_folds_and_small_without_noise(seed):
    stats, truth = _synthetic_folds(seed=seed)
    chosen, rows = cglora.diagnose("cg-lora", {"w": stats}, {"w": 2})
    # each lambda's direction from all the samples, judged on the true quadratic model (data no fold saw)
    true_q = {lam: cglora.predicted_decrease(*cglora.direction("cg-lora", stats, 2, lam), *truth)
              for lam in cglora.DAMPING_GRID}
    assert true_q[chosen] >= 0.9 * max(true_q.values()), (chosen, true_q)
    assert true_q[chosen] > 1.5 * true_q[min(true_q)]  # and the noise made the smallest damping a bad choice
    assert rows["w"]["heldout_by_damping"][chosen] == max(rows["w"]["heldout_by_damping"].values())
    clean, _ = _synthetic_folds(noise=False, seed=seed)  # exact statistics: the Newton step itself wins
    assert cglora.diagnose("cg-lora", {"w": clean}, {"w": 2})[0] == min(cglora.DAMPING_GRID)


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
        out.append(cglora.Fold(X.T @ X / len(X), G + noise, D.T @ D / len(D), 100.0, 100.0))
    return cglora.Statistics(tuple(out))


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
    chosen, rows = cglora.diagnose("cg-lora", {"w": stats}, {"w": 8}, grid=grid)
    exact = _exact_scores(stats, 8, grid)
    cheap = rows["w"]["heldout_by_damping"]
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


def test_init_adapters_reports_the_calibration_diagnostics():
    _, _, _, report = _adapted("cg-lora", folds=2, damping="auto")
    grid = set(cglora.DAMPING_GRID)
    for row in report:
        assert row["damping"] in grid and set(row["heldout_by_damping"]) == grid
        assert row["heldout"] == row["heldout_by_damping"][row["damping"]] > 0
        assert 0 <= row["overlap_left"] <= 1 + 1e-6 and 0 <= row["overlap_right"] <= 1 + 1e-6
        assert row["insample"] > 0 and row["insample_lora_one"] > 0 and row["heldout_lora_one"] > 0
    model = _model()
    stats = collect_statistics(model, {n: getattr(model, n) for n in ("query", "value", "mix")}, _batches(),
                               folds=2)
    held = {id(X): X for st in stats.values() for f in st.folds for X in f[:3]}  # query and value share S
    assert sum(r["statistics_mib"] for r in report) == pytest.approx(
        sum(X.numel() * 4 for X in held.values()) / 2 ** 20, rel=1e-9)
    fixed = _adapted("cg-lora", damping=0.5, folds=2)[3]
    assert all(r["damping"] == 0.5 and r["heldout_by_damping"] is None for r in fixed)
    one = _adapted("lora-one", folds=2)[3]
    assert all(r["heldout"] == r["heldout_lora_one"] and r["damping"] is None for r in one)
    model = _model()
    layers = add_lora(model, ["mix"], rank=2, alpha=4)
    stats = collect_statistics(model, {"mix": layers["mix"].base}, _batches(), folds=1)
    with pytest.raises(ValueError, match="damping='auto' chooses lambda on held-out folds"):
        init_adapters(layers, "cg-lora", stats, damping="auto", log=lambda *a: None)


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
    assert all(f.S is g.S for f, g in zip(stats["query"].folds, stats["value"].folds))  # one S
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
    assert st.folds[0].tokens == 24


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


def test_lora_ga_too_wide_is_refused_before_the_diagnostics_run():
    model = _model()
    layers = add_lora(model, ["query", "mix"], rank=3, alpha=4)  # 2 * 3 > 5: both layers are too narrow
    stats = collect_statistics(model, {n: layer.base for n, layer in layers.items()}, _batches(sizes=(3, 2, 2)))
    with pytest.raises(ValueError, match=r"layers \['query', 'mix'\]: lora-ga needs 2 \* rank <= min"):
        init_adapters(layers, "lora-ga", stats, log=lambda *a: None)


def test_init_adapters_leaves_the_callers_statistics_for_another_method():
    model = _model()
    layers = add_lora(model, ["query", "value"], rank=2, alpha=4, rslora=True)
    stats = collect_statistics(model, {n: layer.base for n, layer in layers.items()}, _batches())
    init_adapters(layers, "lora-one", stats, log=lambda *a: None)
    assert sorted(stats) == ["query", "value"]
    report = init_adapters(layers, "cg-lora", stats, log=lambda *a: None)
    assert all(r["captured"] > 0 for r in report)


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_one_hot_float_labels_on_a_classifier_are_refused_not_read_as_regression(fisher):
    batches = [dict(b, labels=nn.functional.one_hot(b["labels"], 3).float()) for b in _batches()]
    model = _model()
    with pytest.raises(ValueError, match=r"float labels as one regression target per example .* got \[3, 3\] "
                                         r"and \[3, 3\]: for classes pass integer labels \(one-hot: labels.argmax"):
        collect_statistics(model, {"query": model.query}, batches, fisher=fisher)


# ============================================================================ cglora.py: init


def _adapted(method, seed=0, folds=1, **kw):
    model = _model(seed)
    reference = copy.deepcopy(model)
    layers = add_lora(model, ["query", "value", "mix"], rank=2, alpha=4, rslora=cglora.RSLORA[method])
    stats = collect_statistics(model, {n: layer.base for n, layer in layers.items()}, _batches(),
                               folds=folds)
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
    S, G, T = (X.double() for X in _sgt(stats["mix"]))
    report = init_adapters(layers, "cg-lora", stats, damping=0.1, step=0.3, init_norm=0, log=lambda *a: None)
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
        dW, _ = _brute_step(G, S, T, 2, row["damping"])  # the damping the init chose (auto)
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
    # CG-LoRA with the automatic damping draws nothing: two runs agree bit for bit
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
    report = init_adapters(layers, "cg-lora", dict(stats), log=lambda *a: None)
    rows = {r["layer"]: r for r in report}
    assert rows["dead"]["fallback"] and rows["mix"]["fallback"] is None
    assert "heldout" not in rows["dead"] and rows["mix"]["heldout"] > 0  # no direction, so no diagnostics
    assert layers["dead"].lora_B.abs().max() == 0 and torch.isfinite(layers["dead"].lora_A).all()
    bad = {"mix": cglora.Statistics(tuple(f._replace(G=f.G * float("nan")) for f in stats["mix"].folds))}
    with pytest.raises(ValueError, match="layer mix: statistics contain NaN"):
        init_adapters({"mix": layers["mix"]}, "cg-lora", bad, log=lambda *a: None)
    with pytest.raises(ValueError, match="unknown init method 'pissa'"):
        init_adapters(layers, "pissa", stats)


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
    and fold 1; K = 3: folds 0 + 2 and fold 1), heldout_lora_one is LoRA-One's K-fold held-out q; on a
    spectrum gapped enough for the directions to be defined."""
    i = torch.arange(80, dtype=torch.float64)
    stats = _spectrum_folds(torch.where(i < 8, 1.5, 1 / (1 + 0.01 * i)), folds=folds, seed=1)
    f = stats.folds
    for method in ("cg-lora", "lora-one"):
        lam, rows = cglora.diagnose(method, {"w": stats}, {"w": 8})
        row = rows["w"]
        halves = [cglora.direction(method, cglora.pool(f[h::2]), 8, lam) for h in (0, 1)]
        left, right = cglora.overlap(halves[0][0], halves[1][0]), cglora.overlap(halves[0][1].T, halves[1][1].T)
        assert 0.2 < left < 0.99 and 0.2 < right < 0.99  # neither chance nor the same subspace
        assert row["overlap_left"] == pytest.approx(left, abs=5e-3)  # K = 2: the cheap route's directions
        assert row["overlap_right"] == pytest.approx(right, abs=5e-3)
        one = sum(cglora.predicted_decrease(*cglora.lora_one_factors(cglora.pool(f[:k] + f[k + 1:]).G, 8), fk.G, fk.S, fk.T)
                  for k, fk in enumerate(f))
        assert row["heldout_lora_one"] == pytest.approx(one, rel=1e-3)


def test_init_from_unfolded_statistics_at_a_fixed_damping():
    """Statistics collected with folds=1 (documented) serve a fixed damping and every baseline, without
    diagnostics; 'auto' and a negative damping are clear errors."""
    model = _model()
    layers = add_lora(model, ["query", "mix"], rank=2, alpha=4, rslora=True)
    stats = collect_statistics(model, {n: layer.base for n, layer in layers.items()}, _batches(), folds=1)
    for method in ("cg-lora", "lora-one", "lora-ga"):
        report = init_adapters(layers, method, dict(stats), damping=0.1, log=lambda *a: None)
        assert all(r["heldout"] is None if "heldout" in r else True for r in report)
        assert all("overlap_left" not in r and r["update_norm"] > 0 for r in report)
    ref = cg_lora_factors(stats["mix"].G, stats["mix"].S, stats["mix"].T, 2, damping=0.1)
    init_adapters(layers, "cg-lora", dict(stats), damping=0.1, init_norm=0, log=lambda *a: None)
    torch.testing.assert_close(layers["mix"].delta_weight(), ref[0] @ ref[1],  # the raw step dW_r
                               atol=1e-6, rtol=1e-4)
    for damping in (-0.1, "loud"):
        with pytest.raises(ValueError, match="damping must be 'auto' or a number >= 0"):
            init_adapters(layers, "cg-lora", dict(stats), damping=damping, log=lambda *a: None)


def test_the_default_loss_refuses_anything_but_logits_batch_by_classes_and_labels_batch():
    for logits, labels in ((torch.randn(3, 4), torch.zeros(3, 5).long()),  # token labels on sequence logits
                           (torch.randn(3, 5, 4), torch.zeros(3).long()),  # per-token logits, one label each
                           (torch.randn(3, 5, 4), torch.zeros(3, 5).long())):  # a language model's
        with pytest.raises(ValueError, match=r"the default loss takes logits \[batch, classes\] and labels \[batch\]"):
            cglora._loss(logits, labels)
    assert cglora._loss(torch.zeros(3, 4), torch.zeros(3).long()).item() == pytest.approx(math.log(4))


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
    torch.testing.assert_close(cglora._damped(torch.zeros(3, 3), 0.5), 0.5 * torch.eye(3))  # X = 0: lambda I
    assert cglora._eig(torch.zeros(3, 3)).mu == 1.0
    stats, _ = _synthetic_folds()  # a gradient with no positive entry is not a zero gradient
    nonpositive = cglora.Statistics(tuple(f._replace(G=-f.G.abs() * (f.G.abs() > f.G.abs().min())) for f in stats.folds))
    assert all(f.G.max() == 0 for f in nonpositive.folds)
    assert set(cglora.diagnose("cg-lora", {"w": nonpositive}, {"w": 2})[1]) == {"w"}
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
report = cglora.init_adapters(layers, "cg-lora", stats, damping="auto", log=lambda *a: None)
torch.save(dict(held=held, report=report, BA={n: m.lora_B.detach() @ m.lora_A.detach() for n, m in layers.items()}),
           f"{sys.argv[2]}/rank{rank}.pt")
if distributed:  # as train.py ends: a rank that exits with its gloo group alive may abort at exit
    dist.barrier()
    dist.destroy_process_group()
"""


def test_torchrun_layers_are_owned_factorized_once_and_broadcast(tmp_path):
    """Under torch.distributed each layer's statistics are reduced to one owner (the i-th distinct input's
    layers to rank i mod world: query and value share theirs) and freed elsewhere; the damping scores are
    summed across ranks, so both ranks choose one process's lambda, and the owner's factors reach every rank."""
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
        assert [r["damping"] for r in got["report"]] == [r["damping"] for r in ref["report"]]
        for r1, r2 in zip(ref["report"], got["report"]):
            for key in ("heldout", "heldout_lora_one", "insample", "overlap_left", "captured", "statistics_mib"):
                assert r2[key] == pytest.approx(r1[key], rel=1e-4), key
        for name, BA in ref["BA"].items():
            torch.testing.assert_close(got["BA"][name], BA, atol=1e-6, rtol=1e-4)


def test_readme_example_runs(tmp_path, monkeypatch):
    readme = Path(__file__).resolve().parent.joinpath("README.md").read_text()
    code = readme.split("```python\n")[1].split("```")[0]
    assert "cglora.add_lora" in code and "init_adapters" in code
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code, scope)
    assert scope["report"][0]["captured"] > 0 and (tmp_path / "adapter_model.bin").exists()
    assert scope["model"].body.lora_B.abs().max() > 0


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

    def merged(c):  # W0 + s c B A written into the weights of a plain copy of the model
        plain = _model().eval()
        with torch.no_grad():
            for n, (B, A) in directions.items():
                getattr(plain, n).weight += layers[n].scaling * c * B @ A
        return torch.cat([nn.functional.cross_entropy(plain(b["input_ids"], b["attention_mask"]), b["labels"],
                                                      reduction="none") for b in batches]).mean().item()

    assert at_W0 == pytest.approx(merged(0.0), rel=1e-6)
    assert losses == pytest.approx({0.5: merged(0.5), 2.0: merged(2.0)}, rel=1e-5)
    assert model.training and all(torch.equal(v, found[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError):  # an error mid-way (labels of the wrong shape) restores them too
        bad = dict(batches[0], labels=torch.zeros(2, 2).long())
        cglora.real_decrease(model, layers, directions, batches + [bad], [1.0])
    assert model.training and all(torch.equal(v, found[k]) for k, v in model.state_dict().items())


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
    report = init_adapters(adapters, "cg-lora", stats, log=lambda *a: None)
    assert len(report) == 8 and all(r["captured"] > 0 and r["fallback"] is None for r in report)


def test_the_default_init_is_one_pass_at_a_fixed_damping_with_no_diagnostics():
    """Issue 32: one statistics copy (folds=1), lambda = cglora.DAMPING, no §8 diagnostics."""
    report = _adapted("cg-lora")[3]
    assert cglora.DAMPING == 1.0
    assert all(r["damping"] == 1.0 and "heldout" not in r and "insample" not in r for r in report)
    model = _model()  # W0, as the init saw it
    stats = collect_statistics(model, {n: getattr(model, n) for n in ("query", "value", "mix")}, _batches())
    assert all(len(st.folds) == 1 for st in stats.values())
    S, G, T = _sgt(stats["mix"])  # the init is the Newton step at that damping, as cg_lora_factors has it
    B, A, _ = cg_lora_factors(G.double(), S.double(), T.double(), 2, damping=1.0)
    torch.testing.assert_close(_adapted("cg-lora", init_norm=0)[2]["mix"].delta_weight().double(),
                               B @ A * 1.0, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("blocks", [2, 3])
def test_symmetric_sums_in_lower_blocks_equal_the_whole_products(monkeypatch, blocks):
    """S and T are summed in their lower block triangle and mirrored: the same as a^T a whole."""
    model = _model()
    bases = {n: getattr(model, n) for n in ("query", "value", "mix")}
    monkeypatch.setattr(cglora, "FLUSH_ROWS", 4)  # several flushes
    whole = collect_statistics(model, bases, _batches(sizes=(3, 2, 4)))
    monkeypatch.setattr(cglora, "GRAM_MIN_WIDTH", 1)
    monkeypatch.setattr(cglora, "GRAM_BLOCKS", blocks)
    split = collect_statistics(model, bases, _batches(sizes=(3, 2, 4)))
    for name in bases:
        for X, Y in zip(split[name].folds[0][:3], whole[name].folds[0][:3]):
            torch.testing.assert_close(X, Y, rtol=1e-6, atol=1e-7)
        S, T = split[name].folds[0].S, split[name].folds[0].T
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
            init_adapters(layers, method, stats, log=lambda *a: None)
            groups = [list(layers)]
        else:
            groups = cglora.init_in_groups(model, layers, _batches(), method, budget, log=lambda *a: None)[1]
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
        B, A, sigma = cglora.cg_lora_factors(G_, S_, T_, 3)
        made = [*cglora.top_r(G_, 4), *cglora.lora_ga_factors(G_, 2), *cglora.lora_one_factors(G_, 2),
                *cglora.whiten(G_, S_, T_), B, A, sigma, *cglora.balance(B, A),
                *cglora.lora_factors(12, 10, 4, device=G_.device)]
    assert all(_on_accelerator(X) for X in made)
    B_cpu, A_cpu, _ = cglora.cg_lora_factors(G, S, T, 3)  # the same step as on the CPU
    torch.testing.assert_close(B.elem @ A.elem, B_cpu @ A_cpu)


def _init_and_step(method, on_accelerator, **kw):
    """Statistics, init and one AdamW step, on the CPU or the stand-in accelerator. Returns the
    tensors made (statistics, parameters, buffers) and the step's loss."""
    stats_kw = {k: kw.pop(k) for k in ("fisher", "folds") if k in kw}
    move = (lambda x: x.to(_ACCELERATOR)) if on_accelerator else (lambda x: x)
    with _Accelerator() if on_accelerator else contextlib.nullcontext():
        model = move(_model())
        layers = add_lora(model, ["query", "value", "mix"], rank=2, alpha=4, trainable=["head"])
        batches = [{k: move(v) for k, v in b.items()} for b in _batches(sizes=(3, 2, 4, 2))]
        stats = None if method in ("lora", "rslora") else collect_statistics(
            model, {n: m.base for n, m in layers.items()}, batches, **stats_kw)
        made = [X for st in (stats or {}).values() for f in st.folds for X in f[:3]]
        init_adapters(layers, method, stats, log=lambda *a: None, **kw)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        inputs = {k: v for k, v in batches[0].items() if k != "labels"}
        loss = cglora._loss(model(**inputs), batches[0]["labels"])
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


@pytest.mark.parametrize("flush_rows", [1, 10 ** 6])
def test_statistics_are_fp32_under_autocast(monkeypatch, flush_rows):
    """A caller's bf16 autocast reaches the statistics pass: the sums stay fp32 whether they are
    flushed many times (flush_rows=1) or once, and the init still runs."""
    monkeypatch.setattr(cglora, "FLUSH_ROWS", flush_rows)
    model = _model()
    layers = add_lora(model, ["query", "value", "mix"], rank=2, alpha=4)
    bases = {n: m.base for n, m in layers.items()}
    with torch.autocast("cpu", torch.bfloat16):
        stats = collect_statistics(model, bases, _batches(), folds=1)
        init_adapters(layers, "cg-lora", stats, damping=0.1, log=lambda *a: None)
    exact = collect_statistics(model, bases, _batches(), folds=1)
    for name, st in stats.items():
        for X, Y in zip(st.folds[0][:3], exact[name].folds[0][:3]):
            assert X.dtype == torch.float32
            torch.testing.assert_close(X, Y, rtol=0.1, atol=0.05 * Y.abs().max().item())


# ============================================================================ models.py


def _small_config(model_type, num_labels=3):
    pad = 1 if model_type == "roberta" else 0
    return EncoderConfig(vocab_size=40, hidden=32, layers=2, heads=4, intermediate=64,
                         max_positions=24 + pad + 1, type_vocab_size=2, pad_id=pad, layer_norm_eps=1e-5,
                         roberta_positions=model_type == "roberta", num_labels=num_labels, model_type=model_type)


def _batch(config, seed=0):
    """A padded batch [3, 10]: real lengths 10, 4, 7; ids never equal pad_id; segment B from the middle."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, config.vocab_size, (3, 10), generator=g)
    mask = torch.zeros(3, 10, dtype=torch.long)
    for row, n in enumerate((10, 4, 7)):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, config.pad_id)
    types = (torch.arange(10) >= 3).long().expand(3, 10) * mask
    return ids, mask, types


def _perturb(model, seed=0):
    """Move every parameter (LayerNorms too) away from its init, so a swapped key cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _hf_config_json(c: EncoderConfig):
    return dict(model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden,
                num_hidden_layers=c.layers, num_attention_heads=c.heads, intermediate_size=c.intermediate,
                max_position_embeddings=c.max_positions, type_vocab_size=c.type_vocab_size,
                pad_token_id=c.pad_id, layer_norm_eps=c.layer_norm_eps, hidden_act="gelu",
                hidden_dropout_prob=c.dropout)


def _write_safetensors(path, tensors, metadata=None):
    """Written by hand from the format spec: u64 LE header length, JSON header, raw LE bytes."""
    header, chunks, offset = {}, [], 0
    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = dict(dtype=codes[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(raw)])
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(chunks))


# Our module -> its Hugging Face name, written out from transformers' BertModel / RobertaModel, not taken
# from models.hf_names: checkpoints are saved by this layout and loaded by that map; {p}: "bert." or "roberta."
_HF_LAYOUT = {
    "word_embeddings": "{p}embeddings.word_embeddings", "position_embeddings": "{p}embeddings.position_embeddings",
    "token_type_embeddings": "{p}embeddings.token_type_embeddings", "embed_norm": "{p}embeddings.LayerNorm",
    "layers.{i}.query": "{p}encoder.layer.{i}.attention.self.query",
    "layers.{i}.key": "{p}encoder.layer.{i}.attention.self.key",
    "layers.{i}.value": "{p}encoder.layer.{i}.attention.self.value",
    "layers.{i}.attn_out": "{p}encoder.layer.{i}.attention.output.dense",
    "layers.{i}.attn_norm": "{p}encoder.layer.{i}.attention.output.LayerNorm",  # after attention
    "layers.{i}.ffn_in": "{p}encoder.layer.{i}.intermediate.dense",
    "layers.{i}.ffn_out": "{p}encoder.layer.{i}.output.dense",
    "layers.{i}.ffn_norm": "{p}encoder.layer.{i}.output.LayerNorm",  # after the feed-forward
}
_HF_HEAD_LAYOUT = {"bert": {"head.dense": "bert.pooler.dense", "head.out_proj": "classifier"},
                   "roberta": {"head.dense": "classifier.dense", "head.out_proj": "classifier.out_proj"}}


def _hf_layout(model_type, layers):
    """{Hugging Face key of a *ForSequenceClassification checkpoint: our parameter name}."""
    modules = {ours.format(i=i): theirs.format(i=i, p=model_type + ".")
               for ours, theirs in _HF_LAYOUT.items() for i in range(layers)} | _HF_HEAD_LAYOUT[model_type]
    return {f"{theirs}.{p}": f"{ours}.{p}" for ours, theirs in modules.items()
            for p in (("weight",) if ours.endswith("embeddings") else ("weight", "bias"))}


def _save_ours_as_hf(model, path, fmt):
    """Our weights in Hugging Face key layout (_HF_LAYOUT): encoder keys `<model_type>.…`, head keys bare."""
    os.makedirs(path, exist_ok=True)
    c, state = model.config, model.state_dict()
    hf = {theirs: state[ours] for theirs, ours in _hf_layout(c.model_type, c.layers).items()}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_hf_config_json(c), f)
    if fmt == "safetensors":
        _write_safetensors(os.path.join(path, "model.safetensors"), hf)
    else:
        torch.save(hf, os.path.join(path, "pytorch_model.bin"))
    return hf


# ---------------------------------------------------------------------------------------------
# the model itself

def test_module_names_shapes_and_tiny_preset():
    model = Encoder(tiny_config(vocab_size=100, num_labels=3))
    assert (model.config.hidden, model.config.layers, model.config.heads) == (128, 2, 4)
    assert model.get_input_embeddings() is model.word_embeddings
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    block = sorted(n.split(".")[-1] for n in linears if n.startswith("layers.0."))
    assert block == sorted(["query", "key", "value", "attn_out", "ffn_in", "ffn_out"])
    assert {n for n in linears if n.startswith("head")} == {"head.dense", "head.out_proj"}
    assert model.head.out_proj.out_features == 3
    ids = torch.randint(1, 100, (2, 7))
    assert model.encode(ids).shape == (2, 7, 128)
    assert model(ids).shape == (2, 3)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_padding_does_not_change_real_tokens(model_type):
    """A sequence alone and the same sequence padded in a batch give the same hidden states
    (tests the attention mask, and RoBERTa positions skipping padding)."""
    c = _small_config(model_type)
    model = _perturb(Encoder(c)).eval()
    ids, mask, types = _batch(c)
    with torch.no_grad():
        batched = model.encode(ids, mask, types)
        alone = model.encode(ids[1:2, :4], mask[1:2, :4], types[1:2, :4])
        assert (batched[1, :4] - alone[0]).abs().max() < 1e-5
        left = torch.cat([torch.full((1, 6), c.pad_id), ids[1:2, :4]], 1)  # padding on the left
        left_mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), mask[1:2, :4]], 1)
        shifted = model.encode(left, left_mask)
        alone = model.encode(ids[1:2, :4])
        # RoBERTa numbers positions past the padding, BERT does not
        assert ((shifted[0, 6:] - alone[0]).abs().max() < 1e-5) == (model_type == "roberta")


def test_dropout_only_in_training():
    model = _perturb(Encoder(_small_config("roberta")))
    ids, mask, _ = _batch(model.config)
    torch.manual_seed(0)
    a, b = model.train()(ids, mask), model(ids, mask)
    assert not torch.allclose(a, b)
    assert torch.equal(model.eval()(ids, mask), model(ids, mask))


# ---------------------------------------------------------------------------------------------
# checkpoint reading without transformers

def test_read_safetensors_hand_written_file(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
               "b": torch.tensor([-3, 2**40], dtype=torch.int64),
               "c": torch.tensor([0.5, -2.25], dtype=torch.float16),
               "d": torch.tensor([[1.5], [-0.125]], dtype=torch.bfloat16),
               "empty": torch.zeros(0, 4)}
    path = tmp_path / "x.safetensors"
    _write_safetensors(path, tensors, metadata={"format": "pt"})
    # independent check of the layout: the first 8 bytes are the header length, then JSON
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert json.loads(raw[8:8 + n])["a"]["dtype"] == "F32"
    assert np.frombuffer(raw[8 + n:8 + n + 24], "<f4").tolist() == tensors["a"].flatten().tolist()
    got = read_safetensors(path)
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_hf_keys_land_in_the_right_modules(tmp_path, model_type):
    """Every tensor of a hand-made checkpoint holds its own tag; after loading, each of our parameters
    holds the tag of the Hugging Face key _HF_LAYOUT gives it (swapped LayerNorm names fail here)."""
    c = _small_config(model_type)
    layout = _hf_layout(model_type, c.layers)
    shapes = {k: v.shape for k, v in Encoder(c).state_dict().items()}
    assert sorted(layout.values()) == sorted(shapes)  # the layout covers every parameter
    tags = {theirs: float(i + 1) for i, theirs in enumerate(layout)}
    _write_safetensors(tmp_path / "model.safetensors",
                       {theirs: torch.full(shapes[ours], tags[theirs]) for theirs, ours in layout.items()})
    (tmp_path / "config.json").write_text(json.dumps(_hf_config_json(c)))
    loaded = from_pretrained(tmp_path, num_labels=3).state_dict()
    assert {ours: loaded[ours].unique().tolist() for ours in layout.values()} == \
        {ours: [tags[theirs]] for theirs, ours in layout.items()}


@pytest.mark.parametrize("model_type, fmt", [("bert", "safetensors"), ("roberta", "bin"),
                                             ("roberta", "safetensors")])
def test_round_trip_in_hf_layout(tmp_path, model_type, fmt):
    model = _perturb(Encoder(_small_config(model_type))).eval()
    _save_ours_as_hf(model, tmp_path, fmt)
    loaded = from_pretrained(tmp_path, num_labels=3).eval()
    assert loaded.config == model.config
    ids, mask, types = _batch(model.config)
    with torch.no_grad():
        assert torch.equal(loaded.encode(ids, mask, types), model.encode(ids, mask, types))
        assert torch.equal(loaded(ids, mask, types), model(ids, mask, types))


def test_fresh_head_and_ignored_keys(tmp_path):
    """No head in the checkpoint: head is freshly initialised (std = initializer_range, zero bias);
    known-unused keys are ignored silently."""
    model = _perturb(Encoder(_small_config("roberta")))
    hf = _save_ours_as_hf(model, tmp_path, "bin")
    hf = {k: v for k, v in hf.items() if not k.startswith("classifier.")}
    hf |= {"roberta.pooler.dense.weight": torch.zeros(32, 32), "lm_head.bias": torch.zeros(40),
           "roberta.embeddings.position_ids": torch.arange(26)[None]}
    torch.save(hf, tmp_path / "pytorch_model.bin")
    cfg = json.loads((tmp_path / "config.json").read_text()) | {"initializer_range": 0.5}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    loaded = from_pretrained(tmp_path, num_labels=2)
    torch.manual_seed(0)
    again = from_pretrained(tmp_path, num_labels=2)
    assert torch.equal(loaded.head.dense.weight, again.head.dense.weight)  # global RNG, seeded by caller
    assert torch.all(loaded.head.out_proj.bias == 0) and torch.all(loaded.head.dense.bias == 0)
    assert 0.4 < loaded.head.dense.weight.std() < 0.6
    assert torch.equal(loaded.layers[1].ffn_in.weight, model.layers[1].ffn_in.weight)


# ---------------------------------------------------------------------------------------------
# bad input: each a clear error

def test_missing_directory_or_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*config.json"):
        from_pretrained(tmp_path / "nope", num_labels=2)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path, num_labels=2)
    (tmp_path / "config.json").write_text(json.dumps(_hf_config_json(_small_config("bert"))))
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        from_pretrained(tmp_path, num_labels=2)


def test_truncated_or_damaged_safetensors(tmp_path):
    _save_ours_as_hf(Encoder(_small_config("bert")), tmp_path, "safetensors")
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(raw[:8 + n // 2])  # header cut in half
    with pytest.raises(ValueError, match="truncated"):
        from_pretrained(tmp_path, num_labels=3)
    path.write_bytes(raw[:5])  # not even the length
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(path)
    path.write_bytes(raw[:-100])  # header intact, data cut
    with pytest.raises(ValueError, match="damaged"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_safetensors(path)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    hf = _save_ours_as_hf(Encoder(_small_config("bert")), tmp_path, "bin")
    hf["bert.encoder.layer.1.attention.self.key.weight"] = torch.zeros(32, 31)
    torch.save(hf, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"encoder.layer.1.attention.self.key.weight has shape \(32, 31\), "
                                         r"expected \(32, 32\)"):
        from_pretrained(tmp_path, num_labels=3)
    with pytest.raises(ValueError, match=r"classifier.weight has shape \(3, 32\), expected \(5, 32\)"):
        torch.save(_save_ours_as_hf(Encoder(_small_config("bert")), tmp_path, "bin"), tmp_path / "pytorch_model.bin")
        from_pretrained(tmp_path, num_labels=5)


def test_missing_and_unexpected_keys_in_one_message(tmp_path):
    hf = _save_ours_as_hf(Encoder(_small_config("bert")), tmp_path, "bin")
    del hf["bert.encoder.layer.0.output.dense.bias"], hf["bert.embeddings.LayerNorm.weight"]
    hf["bert.encoder.layer.2.output.dense.bias"] = torch.zeros(32)  # a third layer the config lacks
    torch.save(hf, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        from_pretrained(tmp_path, num_labels=3)
    msg = str(e.value)
    assert "missing keys" in msg and "unexpected keys" in msg
    for key in ("encoder.layer.0.output.dense.bias", "embeddings.LayerNorm.weight", "encoder.layer.2.output.dense.bias"):
        assert key in msg


def test_unsupported_config_and_too_long_input(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2'.*supported: bert, roberta"):
        from_pretrained(tmp_path, num_labels=2)
    (tmp_path / "config.json").write_text(json.dumps(_hf_config_json(_small_config("bert")) | {"hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        from_pretrained(tmp_path, num_labels=2)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="config.json lacks 'vocab_size'"):
        from_pretrained(tmp_path, num_labels=2)
    model = Encoder(_small_config("roberta"))  # 26 rows, pad_id 1: 24 usable positions
    model.encode(torch.full((1, 24), 5))
    with pytest.raises(ValueError, match="length 25 exceeds.*24"):
        model.encode(torch.full((1, 25), 5))


# ---------------------------------------------------------------------------------------------
# parity with Hugging Face transformers

def _hf_models(model_type, num_labels, seed=0):
    transformers = pytest.importorskip("transformers")
    c = _small_config(model_type)
    kind = {"bert": "Bert", "roberta": "Roberta"}[model_type]
    config = getattr(transformers, kind + "Config")(
        vocab_size=c.vocab_size, hidden_size=c.hidden, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        intermediate_size=c.intermediate, max_position_embeddings=c.max_positions, type_vocab_size=c.type_vocab_size,
        pad_token_id=c.pad_id, layer_norm_eps=c.layer_norm_eps, num_labels=num_labels)
    torch.manual_seed(seed)
    base = _perturb(getattr(transformers, kind + "Model")(config), seed).eval()
    task = _perturb(getattr(transformers, kind + "ForSequenceClassification")(config), seed + 1).eval()
    return c, base, task


def _assert_encode_matches(ours, hf_model, c):
    ids, mask, types = _batch(c)
    with torch.no_grad():
        got = ours.encode(ids, mask, types)
        want = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    # compare real tokens: outputs at padding positions are unused and HF's own sdpa and eager paths differ there
    assert (got - want)[mask.bool()].abs().max() <= 1e-5


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_hf_parity_base_model_safetensors(tmp_path, model_type):
    c, base, _ = _hf_models(model_type, num_labels=3)
    base.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ours = from_pretrained(tmp_path, num_labels=3).eval()
    _assert_encode_matches(ours, base, c)
    if model_type == "bert":  # BertModel's pooler becomes head.dense; RoBERTa's pooler is ignored
        assert torch.equal(ours.head.dense.weight, base.pooler.dense.weight)
    assert torch.all(ours.head.out_proj.bias == 0)


@pytest.mark.parametrize("model_type, num_labels", [("bert", 3), ("roberta", 3), ("roberta", 1)])
def test_hf_parity_task_model_bin(tmp_path, model_type, num_labels):
    c, _, task = _hf_models(model_type, num_labels)
    task.config.save_pretrained(tmp_path)
    torch.save(task.state_dict(), tmp_path / "pytorch_model.bin")
    assert set(task.state_dict()) == set(_hf_layout(model_type, c.layers))  # the hand-written layout is transformers'
    ours = from_pretrained(tmp_path, num_labels=num_labels).eval()
    _assert_encode_matches(ours, getattr(task, model_type), c)
    ids, mask, types = _batch(c)
    with torch.no_grad():
        got = ours(ids, mask, types)
        want = task(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert got.shape == (3, num_labels) and (got - want).abs().max() <= 1e-5


# ============================================================================ data.py


_HERE = Path(__file__).resolve().parent
_TOKENIZERS = os.environ.get("TOKENIZERS_DIR")  # holds roberta-base/ and all-minilm-l6-v2/
_HF = {"roberta": ("roberta-base", "RobertaTokenizerFast"), "bert": ("all-minilm-l6-v2", "BertTokenizerFast")}  # Rust-backed

# ---------------------------------------------------------------------------------------------
# Tasks and readers

_A = "it 's a charming and often affecting journey . "  # SST-2 style: tokenized, trailing space
_B = '" The foodservice pie business does not fit our strategy .'  # quotes: no quote handling allowed
_C = 'He said "hi" to them.'
_D = "Who went?"

# The real GLUE layouts (as GLUE's download_glue_data.py writes them):
# file -> (header line or None, row(text_a, text_b, raw_label) -> fields).
_MNLI_TRAIN = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t" \
              "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
_MNLI_DEV = _MNLI_TRAIN.replace("label1\t", "label1\tlabel2\tlabel3\tlabel4\tlabel5\t")
_MNLI_ID = ["0", "31193", "31193n", "government", "( a )", "( b )", "(ROOT a)", "(ROOT b)"]  # before sentence1


def _both(header, row):
    return {"train.tsv": (header, row), "dev.tsv": (header, row)}


_FORMATS = {
    "cola": _both(None, lambda a, b, y: ["gj04", y, "" if y == "1" else "*", a]),
    "sst-2": _both("sentence\tlabel", lambda a, b, y: [a, y]),
    "mrpc": _both("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String", lambda a, b, y: [y, "1355540", "1355592", a, b]),
    "qqp": _both("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", lambda a, b, y: ["7", "13", "14", a, b, y]),
    "sts-b": _both("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                   lambda a, b, y: ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", a, b, y]),
    "mnli": {"train.tsv": (_MNLI_TRAIN, lambda a, b, y: [*_MNLI_ID, a, b, y, y]),  # label1, gold_label
             "dev_matched.tsv": (_MNLI_DEV, lambda a, b, y: [*_MNLI_ID, a, b, *[y] * 6]),  # label1-5, gold_label
             "dev_mismatched.tsv": (_MNLI_DEV, lambda a, b, y: [*_MNLI_ID, a, b, *[y] * 6])},
    "qnli": _both("index\tquestion\tsentence\tlabel", lambda a, b, y: ["0", a, b, y]),
    "rte": _both("index\tsentence1\tsentence2\tlabel", lambda a, b, y: ["0", a, b, y]),
    "wnli": _both("index\tsentence1\tsentence2\tlabel", lambda a, b, y: ["0", a, b, y]),
}
# raw label in the file -> label read_split must return, for the two rows of each file
_LABELS = {
    "cola": [("1", 1), ("0", 0)], "sst-2": [("0", 0), ("1", 1)], "mrpc": [("1", 1), ("0", 0)],
    "qqp": [("0", 0), ("1", 1)], "sts-b": [("3.800", 3.8), ("0.000", 0.0)],
    "mnli": [("neutral", 2), ("contradiction", 0)], "qnli": [("not_entailment", 1), ("entailment", 0)],
    "rte": [("entailment", 0), ("not_entailment", 1)], "wnli": [("1", 1), ("0", 0)],
}
_SINGLE = ("cola", "sst-2")  # single-sentence tasks
_SPLIT_OF = {"train.tsv": "train", "dev.tsv": "dev", "dev_matched.tsv": "dev", "dev_mismatched.tsv": "dev_mismatched"}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def _write_task(root, name):
    """Write a two-row GLUE-format fixture for every file of `name`; return {split: expected examples}."""
    task = data.get_task(name)
    pair = name not in _SINGLE
    texts = [(_A, _B if pair else None), (_C, _D if pair else None)]
    for file, (header, row) in _FORMATS[name].items():
        rows = ["\t".join(row(a, b, raw)) for (a, b), (raw, _) in zip(texts, _LABELS[name])]
        end = "" if file.startswith("dev") else "\n"  # dev files without a final newline, as CoLA's
        _write(root / task.dir / file, "\n".join(([header] if header else []) + rows) + end)
    expected = [Example(a, b, label) for (a, b), (_, label) in zip(texts, _LABELS[name])]
    return {_SPLIT_OF[file]: expected for file in _FORMATS[name]}


@pytest.mark.parametrize("name", list(_FORMATS))
def test_read_split_every_task_on_a_glue_format_fixture(tmp_path, name):
    expected = _write_task(tmp_path, name)
    task = data.get_task(name)
    assert set(expected) == {split for split, _ in task.files}
    for split, examples in expected.items():
        got = data.read_split(task, split, tmp_path)
        assert got == examples, (name, split)
        assert all(type(e.label) is (float if name == "sts-b" else int) for e in got)


def test_get_task_names_aliases_and_metadata():
    for alias in ["cola", "CoLA", "COLA"]:
        assert data.get_task(alias).name == "cola"
    for alias in ["sts-b", "stsb", "STS-B", "sts_b"]:
        assert data.get_task(alias).name == "sts-b"
    assert data.get_task("sst2").dir == "SST-2" and data.get_task("Mnli").dir == "MNLI"
    num_labels = {"cola": 2, "sst-2": 2, "mrpc": 2, "qqp": 2, "sts-b": 1, "mnli": 3, "qnli": 2, "rte": 2, "wnli": 2}
    assert {n: data.get_task(n).num_labels for n in num_labels} == num_labels
    metrics = {"cola": {"mcc"}, "sst-2": {"accuracy"}, "mrpc": {"accuracy", "f1"}, "qqp": {"accuracy", "f1"},
               "sts-b": {"pearson", "spearman"}, "mnli": {"accuracy"}, "qnli": {"accuracy"}, "rte": {"accuracy"},
               "wnli": {"accuracy"}}
    for n, m in metrics.items():
        task = data.get_task(n)
        assert set(task.metrics) == m and task.main_metric in m
    assert data.get_task("cola").main_metric == "mcc" and data.get_task("sts-b").main_metric == "pearson"
    assert [split for split, _ in data.get_task("mnli").files] == ["train", "dev", "dev_mismatched"]
    with pytest.raises(ValueError) as err:
        data.get_task("squad")
    assert "'squad'" in str(err.value) and all(n in str(err.value) for n in num_labels)


def test_resolve_data_dir_order(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", "/env/glue")
    assert data.resolve_data_dir("/flag/glue") == Path("/flag/glue")
    assert data.resolve_data_dir() == Path("/env/glue")
    monkeypatch.delenv("GLUE_DIR")
    assert data.resolve_data_dir() == Path("glue_data")


def test_read_split_uses_glue_dir(tmp_path, monkeypatch):
    expected = _write_task(tmp_path, "rte")
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    assert data.read_split(data.get_task("rte"), "dev") == expected["dev"]


def test_read_split_bad_input(tmp_path):
    rte, stsb = data.get_task("rte"), data.get_task("sts-b")
    header = "index\tsentence1\tsentence2\tlabel\n"
    path = _write(tmp_path / "RTE" / "train.tsv", header + "0\ta\tb\tentailment\n1\ta b\tnot_entailment\n")
    _write(tmp_path / "RTE" / "dev.tsv", header + "0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=rf"{path}:3: expected 4 tab-separated fields .*found 3"):
        data.read_split(rte, "train", tmp_path)
    with pytest.raises(ValueError, match=r"dev.tsv:2: unknown label 'maybe'.*entailment, not_entailment"):
        data.read_split(rte, "dev", tmp_path)
    _write(path, "")
    with pytest.raises(ValueError, match=rf"{path} is empty"):
        data.read_split(rte, "train", tmp_path)
    _write(path, header)
    with pytest.raises(ValueError, match="no data rows"):
        data.read_split(rte, "train", tmp_path)
    _write(path, "index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(ValueError, match=r"train.tsv:1: header .* lacks column"):
        data.read_split(rte, "train", tmp_path)
    _write(tmp_path / "STS-B" / "train.tsv", "\t".join(f"c{i}" for i in range(7)) + "\tsentence1\tsentence2\tscore\n"
           + "\t".join(["x"] * 9) + "\thigh\n")
    with pytest.raises(ValueError, match=r"STS-B/train.tsv:2: expected a numeric score, found 'high'"):
        data.read_split(stsb, "train", tmp_path)
    with pytest.raises(ValueError, match="dev_mismatched"):
        data.read_split(rte, "dev_mismatched", tmp_path)


def test_read_split_warns_of_a_row_count_not_glues_and_refuses_a_cut_last_line(tmp_path):
    rte = data.get_task("rte")
    header = "index\tsentence1\tsentence2\tlabel\n"
    path = _write(tmp_path / "RTE" / "train.tsv", header + "0\ta\tb\tentailment\n1\tc\td\tnot_entailment\n")
    with pytest.warns(data.RowCountWarning, match=rf"{path} has 2 rows where GLUE's has 2490: a truncated or edited "
                                                  rf"copy\? For GLUE's own, delete {tmp_path / 'RTE'} and run again"):
        assert len(data.read_split(rte, "train", tmp_path)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # GLUE's count: no warning
        data.read_split(dataclasses.replace(rte, rows=(2, 277)), "train", tmp_path)
    _write(path, header + "0\ta\tb\tentailment\n1\tc d")  # cut mid-row: no line end, 2 of 4 fields
    with pytest.raises(ValueError, match=rf"{path}:3: the last line has 2 of 4 tab-separated fields and no line "
                                         rf"end: the file is cut short. Restore it whole \(delete {tmp_path / 'RTE'}"):
        data.read_split(rte, "train", tmp_path)


def test_real_cola_cut_at_byte_200000_warns_with_both_counts(tmp_path):
    """The cut falls mid-sentence, so the last line still has its four fields: the count tells."""
    source = _glue_dir() / "CoLA" / "train.tsv"
    if not source.is_file():
        pytest.skip("CoLA train not in $GLUE_DIR")
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_bytes(source.read_bytes()[:200_000])
    with pytest.warns(data.RowCountWarning, match="has 3875 rows where GLUE's has 8551"):
        data.read_split(data.get_task("cola"), "train", tmp_path)


def test_missing_files_name_every_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.read_split(data.get_task("mnli"), "train", tmp_path)
    message = str(err.value)
    for file in ["train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"]:
        assert str(tmp_path / "MNLI" / file) in message
    assert "--data_dir" in message and "$GLUE_DIR" in message and "download_task" in message


def _zip(files, stored=False):
    """Bytes of a zip holding {member name: text}."""
    import io
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buffer.getvalue()


def _task_zip(tmp_path, name, **kwargs):
    """(GLUE archive bytes of a fixture task, the examples read_split must return, the task with the
    fixture's row counts in place of GLUE's)."""
    expected = _write_task(tmp_path / "source", name)
    task = data.get_task(name)
    files = {f"{task.dir}/{f}": (tmp_path / "source" / task.dir / f).read_text() for _, f in task.files}
    rows = tuple(len(expected[split]) for split, _ in task.files)
    return _zip(files, **kwargs), expected, dataclasses.replace(task, rows=rows)


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves {path: (body, Content-Length to announce)}; anything else is a 404."""
    files = {}

    def do_GET(self):
        if self.path not in self.files:
            self.send_error(404)
            return
        body, length = self.files[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True  # a body shorter than announced ends with the connection

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A real HTTP server on 127.0.0.1 in a thread: (base URL, {path: (body, Content-Length)})."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    files = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Files,), {"files": files}))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)  # poll: quick shutdown
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", files
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_download_task_over_http(tmp_path, server):
    base, files = server
    archive, expected, task = _task_zip(tmp_path, "rte")
    files["/RTE.zip"] = (archive, len(archive))
    target, lines = tmp_path / "glue_data", []
    assert data.download_task(task, target, base, log=lines.append) == target / "RTE"
    assert data.read_split(task, "train", target) == expected["train"]
    assert data.read_split(task, "dev", target) == expected["dev"]
    assert os.listdir(target) == ["RTE"]  # the archive and the temporary folder are gone
    assert lines[0] == f"downloading {base}/RTE.zip ({len(archive) / 1e6:.1f} MB)" and "checked" in lines[-1]
    assert data.download_task(task, target, base + "/elsewhere") == target / "RTE"  # complete: left as it is


def _fails(task, target, base, *messages):
    with pytest.raises(data.DownloadError) as err:
        data.download_task(task, target, base, log=lambda *a: None)
    message = str(err.value)
    assert all(m in message for m in messages), message
    assert "\n" not in message and "To get" in message  # one line that says how to get the task by hand
    assert not target.exists() or os.listdir(target) == []  # no task folder, no temporary files
    return message


@pytest.mark.parametrize("fault,message", [
    ("404", "HTTP Error 404"),
    ("cut connection", "cut short"),  # the server announces more bytes than it sends
    ("truncated zip", "not a readable zip"),  # a short file, served whole
    ("corrupt zip", "fails its CRC check"),
    ("no dev.tsv", "lacks RTE/dev.tsv"),
    ("wrong row count", "has 2 rows where GLUE's has 3"),
])
def test_download_task_failures_leave_nothing(tmp_path, server, fault, message):
    base, files = server
    archive, _, task = _task_zip(tmp_path, "rte", stored=True)
    body, length = archive, len(archive)
    if fault == "cut connection":
        body = archive[:len(archive) // 2]
    elif fault == "truncated zip":
        body = archive[:len(archive) // 2]
        length = len(body)
    elif fault == "corrupt zip":
        at = archive.index(b"entailment")  # inside a stored member's data: only its CRC can tell
        body = archive[:at] + b"E" + archive[at + 1:]
    elif fault == "no dev.tsv":
        body = _zip({"RTE/train.tsv": "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"})
        length = len(body)
    elif fault == "wrong row count":
        task = dataclasses.replace(task, rows=(3, 2))
    if fault != "404":
        files["/RTE.zip"] = (body, length)
    _fails(task, tmp_path / "glue_data", base, message, f"{base}/RTE.zip", str(tmp_path / "glue_data"))


def test_download_interrupted_while_unpacking_leaves_nothing(tmp_path, server, monkeypatch):
    base, files = server
    archive, expected, task = _task_zip(tmp_path, "rte")
    files["/RTE.zip"] = (archive, len(archive))
    target, extract = tmp_path / "glue_data", zipfile.ZipFile.extract
    calls = []

    def fail_second(self, member, path=None, pwd=None):
        calls.append(member)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", fail_second)
    _fails(task, target, base, "No space left on device")
    assert data.missing_files(task, target)  # a later run still sees the task as missing
    monkeypatch.setattr(zipfile.ZipFile, "extract", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        data.download_task(task, target, base, log=lambda *a: None)
    assert os.listdir(target) == []
    monkeypatch.setattr(zipfile.ZipFile, "extract", extract)
    data.download_task(task, target, base, log=lambda *a: None)  # and a later download starts afresh
    assert data.read_split(task, "dev", target) == expected["dev"]


def test_download_refuses_an_incomplete_task_folder(tmp_path, server):
    base, _ = server
    _write(tmp_path / "glue_data" / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(data.DownloadError, match=r"RTE exists but lacks dev.tsv: complete it or remove it"):
        data.download_task(data.get_task("rte"), tmp_path / "glue_data", base)
    assert os.listdir(tmp_path / "glue_data" / "RTE") == ["train.tsv"]


def test_download_mrpc_splits_microsofts_file_as_glue_does(tmp_path, server):
    base, files = server
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n"
    pairs = [("1", "11", "12", "A cat .", "A cat sat ."), ("0", "21", "22", "Rain .", "Sun ."),
             ("1", "31", "32", "He ran .", "He ran off ."), ("0", "41", "42", "Yes .", "No .")]
    source = header + "".join("\t".join(p) + " \r\n" for p in pairs)  # CRLF and a trailing space, stripped
    for name, text in {"msr_paraphrase_train.txt": source, "mrpc_dev_ids.tsv": "21\t22\r\n41\t42\r\n"}.items():
        files[f"/{name}"] = (text.encode("utf-8"), len(text.encode("utf-8")))
    task = dataclasses.replace(data.get_task("mrpc"), rows=(2, 2))
    target = tmp_path / "glue_data"
    data.download_task(task, target, base, log=lambda *a: None)
    head = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    expected = {"train": [pairs[0], pairs[2]], "dev": [pairs[1], pairs[3]]}
    for split, rows in expected.items():
        assert (target / "MRPC" / f"{split}.tsv").read_bytes() == (head + "".join(
            "\t".join(p) + "\n" for p in rows)).encode("utf-8")
        assert [e.label for e in data.read_split(task, split, target)] == [int(p[0]) for p in rows]
    assert sorted(os.listdir(target)) == ["MRPC"] and (target / "MRPC" / "dev_ids.tsv").is_file()
    message = _fails(task, tmp_path / "other", base + "/missing", "HTTP Error 404", "mrpc_dev_ids.tsv")
    assert "download_glue_data.py" in message


def test_task_sources_official_or_mirror(monkeypatch):
    cola, mrpc = data.get_task("cola"), data.get_task("mrpc")
    monkeypatch.delenv("GLUE_URL")
    assert data.task_sources(cola) == {"CoLA.zip": "https://dl.fbaipublicfiles.com/glue/data/CoLA.zip"}
    assert set(data.task_sources(mrpc).values()) == set(data.MRPC_SOURCES.values())
    assert data.task_sources(data.get_task("qnli"))["QNLIv2.zip"].endswith("/glue/data/QNLIv2.zip")
    monkeypatch.setenv("GLUE_URL", "http://mirror/glue/")
    assert data.task_sources(cola) == {"CoLA.zip": "http://mirror/glue/CoLA.zip"}
    assert data.task_sources(mrpc) == {n: f"http://mirror/glue/{n}" for n in data.MRPC_SOURCES}
    assert data.task_sources(cola, "file:///srv/glue") == {"CoLA.zip": "file:///srv/glue/CoLA.zip"}


def test_download_task_from_a_file_url(tmp_path):
    archive, expected, task = _task_zip(tmp_path, "sts-b")
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "STS-B.zip").write_bytes(archive)
    target = tmp_path / "glue_data"
    data.download_task(task, target, (tmp_path / "mirror").as_uri(), log=lambda *a: None)
    assert data.read_split(task, "train", target) == expected["train"]


# rows and, where known, the count of label 1 (STS-B: mean score)
_REAL = [("cola", "train", 8551, 6023), ("cola", "dev", 1043, 721), ("sst-2", "train", 67349, 37569),
         ("sst-2", "dev", 872, 444), ("mrpc", "train", 3668, 2474), ("mrpc", "dev", 408, 279),
         ("qqp", "train", 363846, None), ("qqp", "dev", 40430, None), ("sts-b", "train", 5749, 2.70),
         ("sts-b", "dev", 1500, 2.36), ("mnli", "train", 392702, None), ("mnli", "dev", 9815, None),
         ("mnli", "dev_mismatched", 9832, None), ("qnli", "train", 104743, None), ("qnli", "dev", 5463, 2761),
         ("rte", "train", 2490, 1241), ("rte", "dev", 277, 131), ("wnli", "train", 635, None),
         ("wnli", "dev", 71, None)]


def _glue_dir():
    if not os.environ.get("GLUE_DIR"):
        pytest.skip("set GLUE_DIR to the glue_data folder to test on the real files")
    return Path(os.environ["GLUE_DIR"])


def _real_split(name, split):
    task = data.get_task(name)
    if not (_glue_dir() / task.dir / dict(task.files)[split]).is_file():
        pytest.skip(f"{task.dir} {split} not in $GLUE_DIR")
    return data.read_split(task, split)


@pytest.mark.parametrize("name,split,rows,balance", _REAL)
def test_real_glue_files(name, split, rows, balance):
    examples = _real_split(name, split)
    assert len(examples) == rows
    labels = [e.label for e in examples]
    if name == "sts-b":
        assert round(sum(labels) / rows, 2) == balance and min(labels) >= 0 and max(labels) <= 5
    elif balance is not None:
        assert sum(y == 1 for y in labels) == balance
    pair = name not in _SINGLE
    assert all(isinstance(e.text_a, str) and e.text_a and (e.text_b is not None) == pair for e in examples)


# ---------------------------------------------------------------------------------------------
# Tokenizers


def _tokenizer_dir(kind):
    if not _TOKENIZERS:
        pytest.skip("set TOKENIZERS_DIR to test on real tokenizer files")
    folder = Path(_TOKENIZERS) / _HF[kind][0]
    if not folder.is_dir():
        pytest.skip(f"no tokenizer files at {folder}")
    return folder


@pytest.fixture(scope="module", params=list(_HF))
def parity_pair(request):
    """(kind, ours, Hugging Face's) for the real RoBERTa BPE and BERT uncased WordPiece files."""
    transformers = pytest.importorskip("transformers")
    folder = _tokenizer_dir(request.param)
    hf = getattr(transformers, _HF[request.param][1]).from_pretrained(str(folder))
    return request.param, data.load_tokenizer(folder), hf


def _mismatches(kind, ours, hf, texts, pairs=None, max_len=None):
    """Rows where our ids (and BERT token type ids) differ from Hugging Face's tokenizer(texts, pairs)."""
    kwargs = {"truncation": True, "max_length": max_len} if max_len else {}
    ref = hf(texts, pairs, **kwargs) if pairs else hf(texts, **kwargs)
    bad = []
    for i, text in enumerate(texts):
        ids, types = ours.encode_pair(text, pairs[i] if pairs else None, max_len)
        ref_types = ref["token_type_ids"][i] if kind == "bert" else [0] * len(ref["input_ids"][i])
        if ids != ref["input_ids"][i] or types != ref_types or ids != ours.encode(text, pairs and pairs[i], max_len):
            bad.append((text, pairs and pairs[i], max_len, ids, ref["input_ids"][i]))
    return bad


_TRICKY = [
    "Hello world", " Hello  world ", "", " ", "a\tb\nc\r\nd \n\n e  ", "He's I'M we'll they'd 'S 'tis",
    "naïve café résumé Ångström", "ΟΔΟΣ σοφός", "İstanbul DİYARBAKIR", "Ｈｅｌｌｏ，世界！", "日本語の文章です。한국어",
    "中文字符和English混合", "$5+3=8 | a^b ~c `d` <e> @f #g", "1,000.50 ٣٤ Ⅻ x² ½ 〇一二三", "ǅ ʰ ᵃ ﬁ",
    "\u00a0nbsp\u2009thin\u3000ideo\u2028line\u0085nel", "ctrl\x00\x1c\x1f\x7f\ufffd\u200bzw",
    "e\u0301 \u0301 क्षत्रिय",
    "emoji 😀 👩‍👩‍👧 🇫🇷!!", "…—–“quotes” «guillemets» ‘single’", "\u1fef`grave", "a" * 101, "b" * 100,
    "supercalifragilisticexpialidocious antidisestablishmentarianism", "<s>x</s> <mask> y <pad><unk>",
    "[CLS] a [SEP] b [UNK] [MASK] [PAD] [cls]", "https://example.com/a_b?c=d&e=f", "don't can't won't ain't",
]


def test_tokenizer_parity_on_tricky_strings(parity_pair):
    kind, ours, hf = parity_pair
    texts = [t for t in _TRICKY if t]  # Hugging Face refuses an empty batch item
    assert _mismatches(kind, ours, hf, texts) == []
    assert _mismatches(kind, ours, hf, texts, texts[1:] + texts[:1]) == []
    for max_len in (5, 8, 11):
        assert _mismatches(kind, ours, hf, texts, texts[::-1], max_len) == []
    assert ours.encode("") == hf("")["input_ids"]
    assert ours.encode("a b", "") == hf("a b", "")["input_ids"]  # an empty pair is no pair, as in HF


@pytest.mark.parametrize("name", ["cola", "sst-2", "mrpc", "sts-b", "rte"])
def test_tokenizer_parity_on_real_dev_sets(parity_pair, name):
    """Every sentence of the dev set alone, every pair, and pairs cut by longest-first: 100% identical ids."""
    kind, ours, hf = parity_pair
    examples = _real_split(name, "dev")
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples if e.text_b is not None]
    compared, bad = 0, []
    for texts in (a, b):
        if texts:
            bad += _mismatches(kind, ours, hf, texts) + _mismatches(kind, ours, hf, texts, max_len=8)
            compared += 2 * len(texts)
    if b:
        for max_len in (None, 16, 17, 40):  # odd and even budgets; 40 cuts RTE premises, not hypotheses
            bad += _mismatches(kind, ours, hf, a, b, max_len)
            compared += len(a)
        assert any(len(ours.encode(x, y, 17)) == 17 for x, y in zip(a, b))  # truncation did happen
    print(f"{kind} {name}: {compared} encodings compared, {len(bad)} mismatches")
    assert not bad, bad[:3]


def test_roberta_known_ids_and_pair_layout():
    tok = data.load_tokenizer(_tokenizer_dir("roberta"))
    assert isinstance(tok, data.BPETokenizer)
    assert tok.encode("Hello world") == [0, 31414, 232, 2]
    ids, types = tok.encode_pair("Hello world", "Hello world")
    assert ids == [0, 31414, 232, 2, 2, 31414, 232, 2] and types == [0] * 8  # <s> A </s></s> B </s>
    assert tok.encode("Hello world", max_len=3) == [0, 31414, 2]
    assert (tok.pad_id, tok.vocab_size) == (1, 50265)  # <mask> = 50264


def test_bert_known_ids_and_token_types():
    tok = data.load_tokenizer(_tokenizer_dir("bert"))
    assert isinstance(tok, data.WordPieceTokenizer) and tok.lower
    ids, types = tok.encode_pair("Hello, WORLD!", "Héllo")
    assert ids == [101, 7592, 1010, 2088, 999, 102, 7592, 102]  # [CLS] hello , world ! [SEP] hello [SEP]
    assert types == [0, 0, 0, 0, 0, 0, 1, 1]
    assert (tok.pad_id, tok.vocab_size) == (0, 30522)
    assert tok.encode("a" * 101) == [101, 100, 102]  # over 100 characters: [UNK]


def test_truncate_longest_first():
    a, b = list(range(10)), list(range(100, 103))
    assert data.truncate(a, b, 13) == (a, b)  # fits: untouched
    assert data.truncate(a, b, 8) == (a[:5], b)  # only the longer one is cut
    assert data.truncate(a, b, 5) == (a[:3], b[:2])  # both cut: the shorter keeps room // 2
    assert data.truncate(b, a, 5) == (b[:2], a[:3])
    assert data.truncate(a[:4], a[:4], 5) == (a[:2], a[:3])  # tie: A keeps room // 2
    assert data.truncate(a, None, 4) == (a[:4], None)


def test_simple_tokenizer_for_the_tiny_encoder(tmp_path):
    tok = data.build_tokenizer(["The cat sat.", "the cat ran!"])
    # specials first, then words by count, ties alphabetical: cat the ! . ran sat
    assert [t for t, _ in sorted(tok.vocab.items(), key=lambda kv: kv[1])] == \
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "cat", "the", "!", ".", "ran", "sat"]
    assert tok.pad_id == 0 and tok.vocab_size == 10
    assert tok.encode("The dog sat.") == [2, 5, 1, 9, 7, 3]
    assert tok.encode_pair("cat", "catty") == ([2, 4, 3, 1, 3], [0, 0, 0, 1, 1])  # whole words only
    assert tok.encode("the cat sat on", max_len=4) == [2, 5, 4, 3]
    assert data.build_tokenizer(["The cat sat.", "the cat ran!"], min_freq=2).vocab_size == 6
    assert data.build_tokenizer(["The cat sat.", "the cat ran!"], max_size=5).vocab_size == 5
    tok.save(tmp_path / "run")
    back = data.load_tokenizer(tmp_path / "run")
    assert back.vocab == tok.vocab and back.pad_id == 0
    for text in ["The dog sat.", "Ran, cat!"]:
        assert back.encode_pair(text, text) == tok.encode_pair(text, text)


@pytest.mark.parametrize("kind", list(_HF))
def test_pretrained_tokenizers_round_trip_through_save(tmp_path, kind):
    tok = data.load_tokenizer(_tokenizer_dir(kind))
    tok.save(tmp_path)
    back = data.load_tokenizer(tmp_path)
    assert type(back) is type(tok) and back.vocab == tok.vocab and back.vocab_size == tok.vocab_size
    assert getattr(back, "merges", None) == getattr(tok, "merges", None)
    for text in _TRICKY:
        assert back.encode(text, text[::-1], 24) == tok.encode(text, text[::-1], 24)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vocab.json.*merges.txt.*vocab.txt"):
        data.load_tokenizer(tmp_path)
    _write(tmp_path / "vocab.txt", "[PAD]\nhello\n")
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \['\[CLS\]', '\[SEP\]', '\[UNK\]'\]"):
        data.load_tokenizer(tmp_path)


def test_encode_examples_truncates_and_keeps_labels():
    tok = data.build_tokenizer(["a b c d e f"])
    encoded = data.encode_examples([Example("a b c d e", "f", 1), Example("a", None, 2.5)], tok, max_len=6)
    assert encoded[0] == (tok.encode("a b", "f"), [0, 0, 0, 0, 1, 1], 1)
    assert encoded[1] == ([2, tok.vocab["a"], 3], [0, 0, 0], 2.5)


# ---------------------------------------------------------------------------------------------
# Batches


def test_batches_dynamic_padding_and_masks():
    lengths = [3, 5, 2, 4, 1]
    encoded = [(list(range(10, 10 + n)), [0] * (n - 1) + [1], i) for i, n in enumerate(lengths)]
    out = list(data.batches(encoded, batch_size=2, pad_id=7))
    assert [tuple(b["input_ids"].shape) for b in out] == [(2, 5), (2, 4), (1, 1)]
    first = out[0]
    assert first["input_ids"].tolist() == [[10, 11, 12, 7, 7], [10, 11, 12, 13, 14]]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert first["token_type_ids"].tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, 1]]
    assert first["labels"].tolist() == [0, 1]
    for b in out:
        assert all(b[k].dtype == torch.long for k in ("input_ids", "attention_mask", "token_type_ids", "labels"))
        assert (b["input_ids"][b["attention_mask"] == 0] == 7).all()
    regression = list(data.batches([([1, 2], [0, 0], 3.8), ([1], [0], 0.5)], 4, pad_id=0))
    labels = regression[0]["labels"]
    assert labels.dtype == torch.float32 and labels.tolist() == pytest.approx([3.8, 0.5])


def test_batches_shuffle_is_deterministic_by_seed():
    encoded = [([1] * (1 + i % 5), [0] * (1 + i % 5), i) for i in range(20)]

    def order(**kw):
        return [y for b in data.batches(encoded, 3, 0, **kw) for y in b["labels"].tolist()]

    assert order() == list(range(20))
    assert order(shuffle=True, seed=0) == order(shuffle=True, seed=0) != list(range(20))
    assert order(shuffle=True, seed=1) != order(shuffle=True, seed=0)
    assert sorted(order(shuffle=True, seed=1)) == list(range(20))


# ---------------------------------------------------------------------------------------------
# Metrics


def test_metrics_against_hand_computed_values():
    pred, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, tn 1, fp 1, fn 1
    assert data.compute_metrics(data.get_task("cola"), pred, gold) == pytest.approx({"mcc": 1 / 6})
    assert data.compute_metrics(data.get_task("mrpc"), pred, gold) == pytest.approx({"f1": 2 / 3, "accuracy": 0.6})
    assert list(data.compute_metrics(data.get_task("qqp"), pred, gold)) == list(data.get_task("qqp").metrics)
    assert data.compute_metrics(data.get_task("mnli"), [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}
    assert data.compute_metrics(data.get_task("rte"), torch.tensor([0, 1]), torch.tensor([1, 1])) == {"accuracy": 0.5}
    stsb = data.get_task("sts-b")
    # deviations [-1, 0, 1] and [-1, 1, 0]: covariance 1, variances 2 and 2
    assert data.compute_metrics(stsb, [1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == \
        pytest.approx({"pearson": 0.5, "spearman": 0.5})
    # ties take average ranks: [1, 2.5, 2.5, 4] against [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5)
    tied = data.compute_metrics(stsb, [1.0, 5.0, 5.0, 9.0], [0.1, 0.2, 0.3, 0.4])
    assert tied["spearman"] == pytest.approx(4.5 / math.sqrt(22.5))
    monotone = data.compute_metrics(stsb, [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 100.0])
    assert monotone["spearman"] == pytest.approx(1.0) and monotone["pearson"] < 0.9


def test_metrics_degenerate_cases_are_zero_not_nan():
    assert data.compute_metrics(data.get_task("cola"), [1, 1, 1, 1], [1, 0, 1, 0]) == {"mcc": 0.0}
    assert data.compute_metrics(data.get_task("cola"), [1, 0, 1, 0], [1, 1, 1, 1]) == {"mcc": 0.0}
    assert data.compute_metrics(data.get_task("mrpc"), [0, 0], [0, 0]) == {"f1": 0.0, "accuracy": 1.0}
    assert data.compute_metrics(data.get_task("sts-b"), [0.1] * 7, [0, 1, 2, 3, 4, 5, 5]) == \
        {"pearson": 0.0, "spearman": 0.0}
    with pytest.raises(ValueError, match="as many predictions as labels"):
        data.compute_metrics(data.get_task("rte"), [0, 1], [0])


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=200), rng.integers(0, 6, size=200).astype(float)  # y has many ties
    got = data.compute_metrics(data.get_task("sts-b"), x, y)
    assert got["pearson"] == pytest.approx(stats.pearsonr(x, y)[0])
    assert got["spearman"] == pytest.approx(stats.spearmanr(x, y)[0])


# ---------------------------------------------------------------------------------------------
# The module itself


def test_data_py_depends_on_stdlib_numpy_torch_only():
    tree = ast.parse((_HERE / "data.py").read_text(encoding="utf-8"))
    nodes = list(ast.walk(tree))
    roots = {a.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for a in node.names}
    roots |= {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom)}
    assert roots - set(sys.stdlib_module_names) <= {"numpy", "torch"}, roots


# ============================================================================ train.py


def _glue_fixture(root, n_train=96, n_dev=32, seed=0):
    """CoLA (no header: source, label, mark, sentence) and STS-B (sentence pairs, a score) in GLUE
    format, with a learnable rule: the first word, "good" or "bad", gives the label (score 4.5 or 0.5)."""
    g = torch.Generator().manual_seed(seed)
    words = "the a cat dog sees runs big small red old new bird tree".split()
    header, stsb_row = _FORMATS["sts-b"]["train.tsv"]
    for split, n in (("train", n_train), ("dev", n_dev)):
        cola, stsb = [], [header]
        for i in range(n):
            body = [words[j] for j in torch.randint(0, len(words), (5,), generator=g)]
            body[int(torch.randint(0, 5, (1,), generator=g))] = "good" if i % 2 else "bad"
            body = (["good"] if i % 2 else ["bad"]) + body
            cola.append(f"src\t{i % 2}\t{'' if i % 2 else '*'}\t{' '.join(body)} .")
            stsb.append("\t".join(stsb_row(" ".join(body), " ".join(body[1:]), "4.500" if i % 2 else "0.500")))
        _write(root / "CoLA" / f"{split}.tsv", "\n".join(cola) + "\n")
        _write(root / "STS-B" / f"{split}.tsv", "\n".join(stsb) + "\n")
    return root


def _train(tmp_path, *flags, out="run"):
    args = ["--task", "cola", "--data_dir", str(tmp_path / "glue"), "--epochs", "2", "--batch_size", "8",
            "--calib_batches", "2", "--calib_batch_size", "8", "--lr", "1e-2", "--out", str(tmp_path / out),
            "--log_every", "1000", *flags]
    train.main(args)
    return _metrics(tmp_path / out)


def _metrics(run, kind="eval"):
    return [row for row in train.read_metrics(run) if row["kind"] == kind]


def _pretrained_checkpoint(path, glue):
    """A tiny random BERT checkpoint in Hugging Face format, written without transformers (our Encoder by
    _save_ours_as_hf), dropout 0, a 2-class head, and a WordPiece vocabulary of the fixture's words.
    Returns the model it holds."""
    tokenizer = data.build_tokenizer([e.text_a for e in data.read_split(data.get_task("cola"), "train", glue)])
    c = _small_config("bert", num_labels=2)
    c.dropout = 0.0
    assert tokenizer.vocab_size <= c.vocab_size
    torch.manual_seed(0)
    source = _perturb(Encoder(c)).eval()
    _save_ours_as_hf(source, path, "safetensors")
    tokenizer.save(path)
    return source


@pytest.fixture
def glue(tmp_path):
    return _glue_fixture(tmp_path / "glue")


@pytest.mark.parametrize("method", ["cg-lora", "cg-lora-shift", "lora", "rslora", "lora-ga", "lora-one", "full"])
def test_train_end_to_end_every_init(tmp_path, glue, method):
    history = _train(tmp_path, "--init", method, "--epochs", "3", "--lr", "3e-3")
    run = tmp_path / "run"
    assert [h["epoch"] for h in history] == [0, 1, 2, 3] and "dev_mcc" in history[-1]
    assert history[-1]["train_loss"] < 0.9 * history[1]["train_loss"]  # it learns
    init = json.loads((run / "init.json").read_text())
    assert init["method"] == method and init["seconds"] > 0 and init["peak_memory_mib"] > 0
    assert json.loads((run / "config.json").read_text())["init"] == method
    assert (run / "checkpoint.pt").exists() and (run / "tokenizer").is_dir()
    if method != "full":
        assert {r["layer"] for r in init["layers"]} == {f"layers.{i}.{n}" for i in (0, 1) for n in ("query", "value")}
        if method.startswith("cg-lora"):
            assert all(0 < r["captured"] <= 1 for r in init["layers"])
        adapter = torch.load(run / "adapter_model.bin")
        assert "base_model.model.layers.0.query.lora_A.weight" in adapter
        assert not torch.equal(adapter["base_model.model.layers.0.query.lora_B.weight"],
                               torch.load(run / "adapter_init.bin")["base_model.model.layers.0.query.lora_B.weight"])


def test_every_data_driven_init_is_judged_by_the_real_loss_from_the_same_W0(tmp_path, glue, capsys):
    """The real loss check (§8.2): the examples after the calibration batches, the loss at W0 and along each
    layer's quadratic-model step; a shifted init is judged before W0 moves, so every method of one seed sees
    one loss at W0. The decrease is the loss at W0 minus the best scale's, beside the calibration model's
    prediction (the summed in-sample q)."""
    summaries = {}
    for method in ("cg-lora", "cg-lora-shift", "lora-ga", "lora-one"):
        _train(tmp_path, "--init", method, "--max_steps", "1", "--real_check", "2", "--diagnostics",
               out=method)
        summaries[method] = json.loads((tmp_path / method / "init.json").read_text())["summary"]
        assert "real loss check on 16 held-out examples" in capsys.readouterr().out
    for method, s in summaries.items():
        assert s["real_examples"] == 16 and set(map(float, s["real_losses"])) == set(train.REAL_SCALES)
        assert s["real_loss_at_W0"] == pytest.approx(summaries["cg-lora"]["real_loss_at_W0"], rel=1e-6), method
        assert s["real_decrease"] == pytest.approx(s["real_loss_at_W0"] - min(s["real_losses"].values()))
        assert s["predicted_decrease"] == pytest.approx(s["insample"])
    assert summaries["cg-lora-shift"]["real_losses"] == pytest.approx(summaries["cg-lora"]["real_losses"], rel=1e-5)
    assert summaries["cg-lora-shift"]["real_loss_at_init"] == pytest.approx(summaries["cg-lora"]["real_loss_at_init"],
                                                                           rel=1e-5)  # the same update, before the shift
    _train(tmp_path, "--init", "lora", "--max_steps", "1", out="plain")  # no statistics, no direction to judge
    assert "real_decrease" not in json.loads((tmp_path / "plain" / "init.json").read_text())["summary"]


def test_the_real_check_also_judges_the_init_as_written():
    """real_loss_at_init is the held-out loss of the model as an unshifted init leaves it (W0 + s B A at
    the init size); a shifted init is judged at the same update, while its model keeps W0's loss."""
    held = _batches(seed=3, sizes=(4, 4))

    @torch.no_grad()
    def loss_of(model):  # the mean example loss of the model as it is, in eval mode
        model.eval()
        return torch.cat([nn.functional.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"],
                                                      reduction="none") for b in held]).mean().item()

    for method in ("lora-one", "cg-lora-shift"):
        model = _model()
        layers = add_lora(model, ["query", "value"], rank=2, alpha=4, rslora=True)
        stats = cglora.collect_statistics(model, {n: m.base for n, m in layers.items()}, _batches(sizes=(3, 2, 3, 2)))
        record = {}
        cglora.init_adapters(layers, method, stats, damping=1.0, init_norm=0.5, log=lambda *a: None,
                             judge=train.real_check(model, layers, held, record, lambda *a: None))
        real = record["real"]
        if method == "lora-one":
            assert real["real_loss_at_init"] == pytest.approx(loss_of(model), rel=1e-6)
        else:
            assert loss_of(model) == pytest.approx(real["real_loss_at_W0"], rel=1e-5)
            with torch.no_grad():  # undo the shift: W0 + s B A
                for m in layers.values():
                    m.base.weight += m.scaling * m.lora_B0 @ m.lora_A0
            assert real["real_loss_at_init"] == pytest.approx(loss_of(model), rel=1e-5)
        assert abs(real["real_loss_at_init"] - real["real_loss_at_W0"]) > 1e-4  # the update moved the loss


def test_train_regression_end_to_end_with_sampled_fisher(tmp_path, glue):
    """STS-B (one output, MSE loss, labels for T drawn from N(f, 1)): dev scored by correlation, and learnt."""
    history = _train(tmp_path, "--task", "sts-b", "--fisher", "sampled", "--epochs", "3")
    assert [h["epoch"] for h in history] == [0, 1, 2, 3] and {"dev_pearson", "dev_spearman"} <= set(history[-1])
    assert history[-1]["dev_pearson"] > 0.9 and history[-1]["dev_loss"] < 0.2 * history[0]["dev_loss"]


def test_evaluate_regression_is_mse_and_correlation_over_all_examples():
    class Half(nn.Module):  # predicts half its first token id
        def forward(self, input_ids, attention_mask, token_type_ids):
            return input_ids[:, :1].float() / 2

    ids, labels = [3, 8, 5, 12, 7], [1.0, 3.5, 2.0, 4.0, 4.5]
    dev = list(data.batches([([i, 1], [0, 0], y) for i, y in zip(ids, labels)], 3, pad_id=0))  # 3 + 2
    got = train.evaluate(Half(), dev, data.get_task("sts-b"), train.Config(), torch.device("cpu"))
    f, y = np.array(ids) / 2, np.array(labels)
    assert got["loss"] == pytest.approx(np.square(f - y).mean())
    assert got["pearson"] == pytest.approx(np.corrcoef(f, y)[0, 1])
    assert got["spearman"] == pytest.approx(np.corrcoef(f.argsort().argsort(), y.argsort().argsort())[0, 1])


def test_fisher_flag_reaches_the_statistics(tmp_path, glue):
    """--fisher sampled gives another T, so another init than empirical; one seed gives one sampled init."""
    B = {}
    for fisher, out in (("empirical", "e"), ("sampled", "s"), ("sampled", "s_again")):
        _train(tmp_path, "--fisher", fisher, "--max_steps", "1", out=out)
        B[out] = torch.load(tmp_path / out / "adapter_init.bin")["base_model.model.layers.0.query.lora_B.weight"]
    assert torch.equal(B["s"], B["s_again"]) and not torch.allclose(B["s"], B["e"], rtol=1e-3, atol=0)


def test_train_on_real_cola(tmp_path, capsys):
    """30 steps on the real CoLA files (an epoch is 267): the whole files are read, and the dev loss of
    the checkpoint falls from the fresh head's toward the label prior's entropy (dev: 721 / 1043
    acceptable, 0.618), which needs the labels of both files read right."""
    dev_set = _real_split("cola", "dev")
    run = tmp_path / "run"
    train.main(["--task", "cola", "--data_dir", str(_glue_dir()), "--max_steps", "30", "--out", str(run),
                "--log_every", "1000"])
    assert "cola: 8551 train / 1043 dev examples" in capsys.readouterr().out
    cfg = train.load_config(run)
    tokenizer = data.load_tokenizer(run / "tokenizer")
    model = train.build_model(cfg, tokenizer, 2)
    add_lora(model, cfg.targets.split(","), cfg.rank, cfg.alpha, rslora=cglora.RSLORA[cfg.init], trainable=["head"])
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    model.load_state_dict(ck["model"])
    dev = list(data.batches(data.encode_examples(dev_set, tokenizer, cfg.max_len), 64, tokenizer.pad_id))
    after = train.evaluate(model, dev, data.get_task("cola"), cfg, torch.device("cpu"))
    assert ck["step"] == 30 and after["loss"] < _metrics(run)[0]["dev_loss"] - 0.03


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("stops,device", [((12,), "cpu"), ((5, 17), "cpu"), pytest.param((5, 17), "cuda", marks=_CUDA)])
def test_resume_equals_uninterrupted_run(tmp_path, glue, stops, device):
    """Stopped at the end of epoch 1 (96 / 8 = 12 steps), or mid-epoch 1 and again mid-epoch 2, then
    resumed: metrics.jsonl equals the uninterrupted run's, train_loss (the mean over every step of the
    epoch) and the step rows included, but for the evaluations at the stops. Dropout in the encoder and
    the adapters draws from the RNG, so its state must resume."""
    flags = ["--init", "cg-lora", "--dropout", "0.1", "--device", device, "--log_every", "4"]
    _train(tmp_path, *flags, out="a")
    _train(tmp_path, *flags, "--max_steps", str(stops[0]), out="b")
    for stop in (*stops[1:], 0):
        assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] in stops
        train.main(["--resume", "--out", str(tmp_path / "b"), "--max_steps", str(stop), "--log_every", "4"])
    rows = {run: [{k: v for k, v in r.items() if k != "elapsed"} for r in train.read_metrics(tmp_path / run)]
            for run in "ab"}
    assert [r["step"] for r in rows["b"] if r["kind"] == "eval" and r["step"] in stops] == list(stops)
    at_stops = [r for r in rows["b"] if r["kind"] == "eval" and r["step"] in stops and r["step"] % 12]  # mid-epoch
    assert all(r["epoch"] == round(r["step"] / 12, 4) for r in at_stops)
    stop_rows = [r for r in rows["b"] if r["kind"] == "step" and r["step"] in stops and r["step"] % 4]
    assert [r for r in rows["b"] if r not in at_stops + stop_rows] == rows["a"]


def _refused(capsys, args):
    """The one error line of a refused train.py call (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as e:
        train.main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _files(run):
    return {p.name: p.stat().st_mtime_ns for p in run.iterdir()}


def test_default_run_directory_tells_experiments_apart():
    def out(*flags, world=1):  # the default --out of these flags (name, value, ...) under `world` processes
        return train.check_flags(train.Config(**dict(zip(flags[::2], flags[1::2]))), world).out

    assert out() == "runs/cola-tiny-cg-lora-r8-query+value-s0"
    assert out("pretrained", "path/to/all-MiniLM-L6-v2/") == "runs/cola-all-MiniLM-L6-v2-cg-lora-r8-query+value-s0"
    assert out("targets", "all", "rank", 4) == "runs/cola-tiny-cg-lora-r4-all-s0"
    assert out(world=2) == "runs/cola-tiny-cg-lora-r8-query+value-s0-w2"
    assert len({out(), out("rank", 4), out("targets", "query"), out("init", "lora"), out("seed", 1),
                out("task", "rte"), out(world=2)}) == 7


def test_a_run_directory_holds_one_run(tmp_path, glue, capsys):
    """A second run into a run's directory is refused and changes nothing; --overwrite clears it first, so
    a --pretrained run leaves no tiny-encoder tokenizer behind; it refuses to clear files train.py did not
    write; --resume refuses flags that differ from the run's."""
    run = tmp_path / "run"
    _train(tmp_path, "--max_steps", "2")
    before = _files(run)
    args = ["--data_dir", str(glue), "--out", str(run), "--calib_batches", "2", "--batch_size", "8"]
    line = _refused(capsys, [*args, "--rank", "4"])
    assert line == (f"error: {run} holds another run (adapter_config.json, adapter_init.bin, adapter_model.bin, "
                    f"checkpoint.pt, ...): continue it with --resume, pick a new --out, or pass --overwrite to "
                    f"clear it first")
    assert _files(run) == before
    line = _refused(capsys, ["--resume", "--out", str(run), "--rank", "4"])
    assert f"--resume continues {run} as it was configured: --rank 4 (the run has 8); drop" in line
    _pretrained_checkpoint(tmp_path / "ckpt", glue)
    _train(tmp_path, "--pretrained", str(tmp_path / "ckpt"), "--max_steps", "2", "--overwrite")
    assert not (run / "tokenizer").exists() and train.load_config(run).pretrained == str(tmp_path / "ckpt")
    assert all(p.stat().st_mtime_ns > max(before.values()) for p in run.iterdir())  # every file is the new run's
    (run / "notes.txt").write_text("mine")
    line = _refused(capsys, [*args, "--overwrite"])
    assert "--overwrite clears only what train.py writes" in line and "notes.txt" in line
    assert (run / "notes.txt").read_text() == "mine" and (run / "checkpoint.pt").exists()


def test_resume_refuses_a_checkpoint_that_is_not_the_runs_latest_state(tmp_path, glue, capsys):
    run = tmp_path / "run"
    _train(tmp_path, "--max_steps", "12")  # a checkpoint at the end of epoch 1
    resume = ["--resume", "--out", str(run)]
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(config, rank=4)))  # another run's config beside it
    assert f"{run / 'checkpoint.pt'} is another run's: it has rank 8 where {run / 'config.json'} has rank 4" \
        in _refused(capsys, resume)
    (run / "config.json").write_text(json.dumps(config))
    old = (run / "checkpoint.pt").read_bytes()
    train.main(resume)  # to the end: step 24
    (run / "checkpoint.pt").write_bytes(old)  # a stale checkpoint
    line = _refused(capsys, resume)
    assert "(step 12) is not the run's latest state" in line and "(the last at step 24)" in line


def test_ctrl_c_says_where_the_last_checkpoint_is_and_resume_continues(tmp_path, glue, capsys, monkeypatch):
    """Interrupted before the first checkpoint: one line, nothing to resume (and --resume refuses); after
    one: one line naming it and the resume command, which gives the uninterrupted run's evaluations."""
    uninterrupted = _train(tmp_path, out="a")
    evaluate, calls = train.evaluate, []

    def interrupt_at(n):
        def fake(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return evaluate(*args, **kwargs)
        calls.clear()
        monkeypatch.setattr(train, "evaluate", fake)

    for n, out in ((2, "b"), (3, "c")):  # in the evaluation at the end of epoch 1, or of epoch 2
        interrupt_at(n)
        with pytest.raises(SystemExit) as e:
            _train(tmp_path, out=out)
        err = capsys.readouterr().err.splitlines()
        said = (f"interrupted before the run's first checkpoint: nothing to resume; start it again with "
                f"--overwrite --out {tmp_path / out}" if n == 2 else
                f"interrupted: the last checkpoint is {tmp_path / out / 'checkpoint.pt'} (step 12); continue with: "
                f"python train.py --resume --out {tmp_path / out}")
        assert e.value.code == 130 and [line for line in err if not line.startswith("warning: ")] == [said]
    monkeypatch.setattr(train, "evaluate", evaluate)
    assert "--resume: no checkpoint in" in _refused(capsys, ["--resume", "--out", str(tmp_path / "b")])
    train.main(["--resume", "--out", str(tmp_path / "c")])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]  # noqa: E731
    assert strip(_metrics(tmp_path / "c")) == strip(uninterrupted)


def test_max_steps_evaluates_the_last_step(tmp_path, glue, capsys):
    history = _train(tmp_path, "--max_steps", "5", "--log_every", "2")
    out = capsys.readouterr().out
    assert [(h["step"], h["epoch"]) for h in history] == [(0, 0), (5, round(5 / 12, 4))]
    assert "step 5/5 |" in out and "step 4/5 |" in out and "/24" not in out
    assert f"dev mcc {history[-1]['dev_mcc']:.4f} at step 5 (best" in out
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 5


def test_long_passes_show_progress(tmp_path, glue, capsys, monkeypatch):
    monkeypatch.setattr(train, "PROGRESS_SECONDS", 0)  # every batch: as if each took a while
    _train(tmp_path, "--calib_batches", "3", "--max_steps", "1", "--damping", "auto")
    out = capsys.readouterr().out
    assert "statistics: 1/3 batches, eta" in out and "statistics: 2/3 batches" in out
    assert "choosing the damping among 7 values on 2 folds of the calibration batches" in out
    assert "evaluation: 1/2 batches, eta" in out  # 32 dev examples in batches of 16


def test_run_directory_has_what_an_analysis_needs(tmp_path, glue, capsys):
    """Step rows (train loss, learning rate) every --log_every steps and the evaluations in metrics.jsonl,
    the init summary in init.json, the versions and the data dir in config.json, curves.svg; --targets all."""
    run = tmp_path / "run"
    _train(tmp_path, "--targets", "all", "--log_every", "5", "--warmup", "0.25", "--diagnostics")
    assert "CoLA/train.tsv has 96 rows where GLUE's has 8551" in capsys.readouterr().err  # a warning line
    steps, evals = _metrics(run, "step"), _metrics(run, "eval")
    assert [r["step"] for r in steps] == [5, 10, 15, 20, 24] and [r["step"] for r in evals] == [0, 12, 24]
    warm = 6  # 25% of 24 steps
    assert [r["lr"] for r in steps] == pytest.approx([1e-2 * min(s / warm, (24 - s + 1) / (24 - warm))
                                                      for s in (5, 10, 15, 20, 24)])
    assert all(r["train_loss"] > 0 for r in steps)
    init = json.loads((run / "init.json").read_text())
    layers, summary = init["layers"], init["summary"]
    assert len(layers) == 12  # all six linear types in both blocks
    total = lambda key: sum(r[key] for r in layers)  # noqa: E731
    assert summary["damping"] == init["damping"] == layers[0]["damping"]
    assert summary["heldout_ratio"] == pytest.approx(total("heldout") / total("heldout_lora_one"))
    assert summary["insample_ratio"] == pytest.approx(total("insample") / total("insample_lora_one"))
    assert summary["overlap_left"] == pytest.approx(total("overlap_left") / 12)
    config = json.loads((run / "config.json").read_text())
    assert config["targets"] == "query,key,value,attn_out,ffn_in,ffn_out"
    assert config["torch_version"] == torch.__version__
    assert config["data_dir"] == str(glue.resolve())
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_HERE, capture_output=True, text=True)
    assert config["code_version"].startswith(git.stdout.strip()) if git.returncode == 0 else config["code_version"]
    svg = (run / "curves.svg").read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>") and "train loss" in svg and "dev mcc" in svg
    points = [line.split('points="')[1].count(",") for line in svg.splitlines() if 'stroke="#1f77b4"' in line]
    assert points == [len(steps), len(evals)]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while the new checkpoint is written, or between writing and renaming it, leaves the last
    good checkpoint loadable; the leftover partial file does not block the next save."""
    path = tmp_path / "checkpoint.pt"
    train.save_atomic({"step": 12}, path)

    def dies_mid_write(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")  # some bytes reach the disk, then the process dies
        raise KeyboardInterrupt

    def dies_before_rename(src, dst):
        raise KeyboardInterrupt

    for module, name, crash in ((torch, "save", dies_mid_write), (os, "replace", dies_before_rename)):
        with monkeypatch.context() as m:
            m.setattr(module, name, crash)
            with pytest.raises(KeyboardInterrupt):
                train.save_atomic({"step": 17}, path)
        assert torch.load(path) == {"step": 12}, name
    train.save_atomic({"step": 17}, path)
    assert torch.load(path) == {"step": 17}


@pytest.mark.parametrize("pretrained", [False, True])
def test_shifted_export_applies_to_the_original_weights(tmp_path, glue, pretrained):
    """merged.pt = the original weights + the exported adapters. With --pretrained the original weights
    are those of the model written into the checkpoint, and so is the function at step 0 (the shift
    keeps it): the step-0 dev loss is that model's."""
    source = _pretrained_checkpoint(tmp_path / "ckpt", glue) if pretrained else None
    history = _train(tmp_path, "--init", "cg-lora-shift", "--merge", "--epochs", "1",
                     *(["--pretrained", str(tmp_path / "ckpt")] if pretrained else []))
    run = tmp_path / "run"
    cfg = train.load_config(run)
    if pretrained:
        original, tokenizer = source.state_dict(), data.load_tokenizer(tmp_path / "ckpt")
        dev = data.encode_examples(data.read_split(data.get_task("cola"), "dev", glue), tokenizer, cfg.max_len)
        dev = list(data.batches(dev, 16, tokenizer.pad_id))
        want = train.evaluate(source, dev, data.get_task("cola"), cfg, torch.device("cpu"))["loss"]
        assert history[0]["dev_loss"] == pytest.approx(want, rel=1e-5)
    else:
        original = train.build_model(cfg, data.load_tokenizer(run / "tokenizer"), 2).state_dict()
    adapter = torch.load(run / "adapter_model.bin")
    scale = json.loads((run / "adapter_config.json").read_text())
    scale = scale["lora_alpha"] / scale["r"]
    merged = torch.load(run / "merged.pt")
    to_hf = train.hf_name(cfg, source)  # --pretrained: merged.pt has the checkpoint's own names
    assert set(merged) == {to_hf(key) for key in original}
    merged = {key: merged[to_hf(key)] for key in original}
    rename = train.peft_module_name(cfg, source)  # the names the adapter is saved under
    for key, W0 in original.items():
        module, _, param = key.rpartition(".")
        prefix = "base_model.model." + rename(module)
        if f"{prefix}.lora_A.weight" in adapter and param == "weight":
            A, B = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
            assert A.shape[0] == 2 * cfg.rank
            torch.testing.assert_close(W0 + scale * B @ A, merged[key], atol=1e-5, rtol=0)
        elif f"{prefix}.{param}" in adapter:  # head and word embeddings: trained whole
            torch.testing.assert_close(adapter[f"{prefix}.{param}"], merged[key])
        else:
            torch.testing.assert_close(W0, merged[key], atol=0, rtol=0)


# torchrun runs this instead of train.py: the same run, and every rank saves its trained parameters
# (rank<r>.pt in --out) just before train.py ends the process group.
_RANK_WEIGHTS = """
import os, sys
import torch
import train

made = []


class Recorded(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        made.append(self)


def save_then_end(end=torch.distributed.destroy_process_group):
    trained = {k: v.detach() for k, v in made[0].module.named_parameters() if v.requires_grad}
    torch.save(trained, os.path.join(sys.argv[sys.argv.index("--out") + 1], f"rank{os.environ['RANK']}.pt"))
    end()


torch.nn.parallel.DistributedDataParallel = Recorded
torch.distributed.destroy_process_group = save_then_end
train.main(sys.argv[1:])
"""


def test_tiny_encoder_trains_and_exports_its_word_embeddings(tmp_path, glue):
    _train(tmp_path, "--init", "lora", "--epochs", "1")
    _train(tmp_path, "--init", "lora", "--epochs", "1", "--freeze_embeddings", out="frozen")
    cfg = train.load_config(tmp_path / "run")
    original = train.build_model(cfg, data.load_tokenizer(tmp_path / "run" / "tokenizer"), 2).state_dict()
    key = "word_embeddings.weight"
    for run, trains in (("run", True), ("frozen", False)):
        adapter = torch.load(tmp_path / run / "adapter_model.bin")
        saved = json.loads((tmp_path / run / "adapter_config.json").read_text())["modules_to_save"]
        weights = torch.load(tmp_path / run / "checkpoint.pt", weights_only=False)["model"][key]
        assert ("word_embeddings" in saved) is trains and {"head.dense", "head.out_proj"} <= set(saved)
        assert torch.equal(weights, original[key]) is not trains
        if trains:  # the export holds what was trained
            assert torch.equal(adapter["base_model.model." + key], weights)
        else:
            assert "base_model.model." + key not in adapter
    assert train.trainable_modules(train.Config(pretrained="DIR")) == ["head"]  # pretrained: frozen


def test_train_downloads_a_missing_task(tmp_path, server, monkeypatch, capsys):
    base, files = server
    source = _glue_fixture(tmp_path / "source")
    archive = _zip({f"CoLA/{f}": (source / "CoLA" / f).read_text() for f in ("train.tsv", "dev.tsv")})
    files["/CoLA.zip"] = (archive, len(archive))
    monkeypatch.setenv("GLUE_URL", base)
    cola = dataclasses.replace(data.get_task("cola"), rows=(96, 32))  # the fixture's rows, not GLUE's
    monkeypatch.setattr(data, "_TASKS", [cola if t.name == "cola" else t for t in data._TASKS])
    history = _train(tmp_path, "--epochs", "1")  # --data_dir tmp_path/glue, which does not exist
    assert [h["epoch"] for h in history] == [0, 1]
    assert os.listdir(tmp_path / "glue") == ["CoLA"]
    assert f"downloading {base}/CoLA.zip" in capsys.readouterr().out
    del files["/CoLA.zip"]
    with pytest.raises(SystemExit) as e:
        train.main(["--data_dir", str(tmp_path / "empty"), "--out", str(tmp_path / "failed")])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: could not fetch")
    assert "HTTP Error 404" in err[0] and "To get CoLA by hand" in err[0]
    assert not (tmp_path / "empty" / "CoLA").exists() and os.listdir(tmp_path / "empty") == []


def test_torchrun_two_processes_match_one(tmp_path, glue):
    """Two processes with batch 8 each against one process with batch 16: 2 steps of cg-lora on a
    --pretrained checkpoint with dropout 0. data.batches cuts one shuffled order into batches, so rank r's
    s-th batch (batch 2s + r) is half of the one process's s-th batch, and the mean of the two ranks'
    mean-loss gradients is its gradient: the runs must agree. Asserted: the calibration statistics
    summed over the ranks give one process's init (B A to 1e-3: fp32 summation order, amplified by the
    whitening); after the steps both ranks hold identical weights, and these equal the one process's
    to 1% of how far the steps moved them (B A and the head; measured: at most 0.13%; ranks that do not
    split the batches, and so step on other data, are off by about 50%)."""
    _pretrained_checkpoint(tmp_path / "ckpt", glue)
    common = ["--task", "cola", "--data_dir", str(glue), "--pretrained", str(tmp_path / "ckpt"), "--calib_batches", "4",
              "--calib_batch_size", "8", "--max_steps", "2", "--log_every", "1000", "--damping", "1",
              "--diagnostics"]
    # a fixed damping: at the small one these fixtures choose, the exact top r turns over under fp32 noise
    (tmp_path / "rank_weights.py").write_text(_RANK_WEIGHTS)
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=here)
    one = subprocess.run([sys.executable, "train.py", *common, "--batch_size", "16", "--out", str(tmp_path / "one")],
                         cwd=here, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(tmp_path / "rank_weights.py"), *common, "--batch_size", "8", "--out", str(tmp_path / "two")],
                         cwd=here, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-1000:] + two.stderr[-3000:]  # includes train.py's check that both ranks agree
    assert "2 process(es)" in two.stdout
    cfg = train.load_config(tmp_path / "one")
    model = from_pretrained(str(tmp_path / "ckpt"), 2)
    rename = train.peft_module_name(cfg, model)  # ours -> the checkpoint's names the adapter is saved under
    ours = {rename(n): n for n in {k.rpartition(".")[0] for k in hf_names(model.config)}}

    def our_name(key):  # base_model.model.<their module>.lora_A.weight -> <our module>.lora_A, and so on
        module, _, param = key.removeprefix("base_model.model.").removesuffix(".weight").rpartition(".")
        if param.startswith("lora_"):
            return f"{ours[module]}.{param}"
        module, _, param = key.removeprefix("base_model.model.").rpartition(".")
        return f"{ours[module]}.{param}"

    init = [{our_name(k): v for k, v in torch.load(tmp_path / run / "adapter_init.bin").items()}
            for run in ("one", "two")]
    records = [json.loads((tmp_path / run / "init.json").read_text())["layers"] for run in ("one", "two")]
    for r1, r2 in zip(*records):  # the per-fold statistics too: the same calibration diagnostics
        for key in ("heldout", "heldout_lora_one", "insample", "overlap_left", "overlap_right", "captured"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-3), key
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1)]
    trained = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    assert len(ranks[0]) == 12 and all(torch.equal(w, ranks[1][k]) for k, w in ranks[0].items())

    def update(weights, name):  # an adapter's B A (fp noise may flip the sign of a column of B and the row of
        # A: B A and Adam's steps are unchanged by that), or a head parameter
        return weights[name + ".lora_B"] @ weights[name + ".lora_A"] if name + ".lora_A" in weights else weights[name]

    adapters = sorted({k.split(".lora_")[0] for k in ranks[0] if ".lora_" in k})
    for name in adapters:  # the statistics summed over the ranks: one process's init
        d1, d2 = update(init[0], name), update(init[1], name)
        assert (d1 - d2).norm() < 1e-3 * d1.norm(), (name, ((d1 - d2).norm() / d1.norm()).item())
    for name in adapters + [k for k in ranks[0] if k.startswith("head.")]:  # the steps: one process's steps
        moved = (update(trained, name) - update(init[0], name)).norm()
        assert (update(ranks[0], name) - update(trained, name)).norm() < 1e-2 * moved, name


_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")


@pytest.mark.parametrize("flags,message", [
    (["--task", "colaa"], "unknown GLUE task"),
    (["--init", "pissa"], "--init 'pissa'"),
    (["--rank", "0"], "--rank must be positive"),
    (["--rank", "100000"], "--rank 100000: cg-lora needs rank <= the smallest side of each target, and layers.0.query "
                           "is (128, 128): pass --rank 128 or less"),
    (["--init", "lora-ga", "--rank", "100"], "lora-ga needs 2 x rank"),
    (["--targets", "nosuchlayer"], "--targets nosuchlayer: targets ['nosuchlayer'] match no Linear layer"),
    (["--targets", "query,,value"], "--targets 'query,,value'"),
    (["--damping", "-1"], "--damping takes a number > 0 or auto, got '-1'"),
    (["--damping", "0"], "--damping takes a number > 0 or auto, got '0'"),
    (["--damping", "high"], "--damping takes a number > 0 or auto"),
    (["--balance", "nosuch"], "--balance 'nosuch': choose from euclidean, curvature"),
    (["--fisher", "exact"], "--fisher 'exact': choose from empirical, sampled"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
    (["--calib_batches", "1", "--diagnostics"], "--calib_batches 1: cg-lora needs a batch per fold (2)"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--warmup", "2"], "--warmup must be in [0, 1]"),
    (["--max_len", "2"], "--max_len 2 leaves no room for text: cola examples take 2 special tokens: pass --max_len 3"),
    (["--task", "sts-b", "--max_len", "4"], "sts-b examples take 3 special tokens: pass --max_len 5 or more"),
    pytest.param(["--device", "cuda"], "--device cuda: this torch sees no CUDA device", marks=_NO_CUDA),
    pytest.param(["--bf16"], "--bf16 autocasts on CUDA only", marks=_NO_CUDA),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--resume"], "--resume: no checkpoint in"),
    (["--data_dir", "MISSING"], "train.tsv"),
    (["--pretrained", "NOWEIGHTS"], "model.safetensors"),
    (["--batch_size", "1000"], "lower --batch_size"),
])
def test_train_bad_input_is_one_line_exit_2(tmp_path, glue, capsys, flags, message):
    """Each bad flag: one error line naming the flag (train.py's, not an internal name), exit 2, no traceback
    and no file in the run directory."""
    (tmp_path / "NOWEIGHTS").mkdir()
    (tmp_path / "NOWEIGHTS" / "config.json").write_text(json.dumps(dict(
        model_type="bert", vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=32)))
    flags = [str(tmp_path / f) if f in ("MISSING", "NOWEIGHTS") else f for f in flags]
    with pytest.raises(SystemExit) as e:
        train.main(["--data_dir", str(glue), "--out", str(tmp_path / "run"), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error") or ": error:" in line]) == 1
    assert not (tmp_path / "run").exists()


def test_torchrun_on_gpus_puts_each_process_on_its_own_gpu_with_nccl(tmp_path, monkeypatch):
    """Under torchrun on a CUDA machine (simulated: no GPU here) rank 1 takes cuda:1 as its current
    device and nccl with device_id, --device auto included; without CUDA, the CPU and gloo."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(train.dist, "init_process_group", lambda *a, **k: calls.append(("init", a, k)))
    monkeypatch.setattr(train.dist, "get_rank", lambda: 1)
    for flag in ("cuda", "auto"):
        calls.clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        run = train.start(train.Config(device=flag, out=str(tmp_path / flag)))[0]
        gpu = torch.device("cuda", 1)
        assert run.device == gpu and run.rank == 1
        assert calls == [("set_device", gpu), ("init", ("nccl",), dict(device_id=gpu))]
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.start(train.Config(out=str(tmp_path / "cpu")))[0].device == torch.device("cpu")
    assert calls == [("init", ("gloo",), dict(device_id=None))]


def test_resume_says_which_random_states_it_restored(monkeypatch):
    cpu = torch.get_rng_state()
    expected = torch.rand(3)
    cuda = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: cuda.append(d))
    assert train.restore_rng([cpu], torch.device("cpu")) == "resume: restored the CPU random state"
    assert torch.equal(torch.rand(3), expected)  # restored indeed
    assert "CUDA state is unused" in train.restore_rng([cpu, cpu], torch.device("cpu")) and not cuda
    assert "draws start afresh" in train.restore_rng([cpu], torch.device("cuda", 0)) and not cuda
    assert "CPU and CUDA" in train.restore_rng([cpu, cpu], torch.device("cuda", 0))
    assert cuda == [torch.device("cuda", 0)]


def test_exports_of_a_model_on_an_accelerator_hold_cpu_tensors(tmp_path):
    """adapter_init.bin, adapter_model.bin and merged.pt load with a plain torch.load anywhere."""
    cfg = train.Config(init="cg-lora", rank=2, alpha=4)
    with _Accelerator():
        model = models.Encoder(models.tiny_config(30, 2)).to(_ACCELERATOR)
        cglora.add_lora(model, ["query", "value"], 2, 4, rslora=True, trainable=train.trainable_modules(cfg))
        exports = [cglora.lora_state_dict(model), train.merged_state_dict(cfg, model)]
        train.adapter_files(cfg, model, tmp_path)
    exports.append(torch.load(tmp_path / "adapter_model.bin"))
    for state in exports:
        assert state and all(type(v) is torch.Tensor and v.device.type == "cpu" for v in state.values())


# ============================================================================ bench.py


def test_bench_smoke_on_the_tiny_preset(tmp_path, monkeypatch):
    import bench
    monkeypatch.delenv("GLUE_DIR", raising=False)  # synthetic sentences: seconds, not minutes
    out = tmp_path / "bench.json"
    bench.main(["--shape", "tiny", "--repeats", "1", "--calib_batches", "4", "--peers", "off", "--json", str(out)])
    result = json.loads(out.read_text())
    r = result["results"]
    assert set(r) == {"floor", "cg-lora", "cg-lora-auto", "frozen-step", "our-step"}
    assert all(v["seconds"] > 0 and v["peak_rss_mib"] > 0 for v in r.values())
    # the statistics' memory: one copy (two folds for auto) of S (one per input, query and value
    # share it), G and T, in fp32
    d, blocks = 128, 2  # the tiny preset
    one = blocks * (d * d + 2 * (2 * d * d)) * 4 / 2 ** 20
    assert r["cg-lora"]["statistics_mib"] == pytest.approx(one)
    assert r["cg-lora-auto"]["statistics_mib"] == pytest.approx(2 * one)
    assert r["cg-lora"]["statistics"] + r["cg-lora"]["factorization"] == pytest.approx(r["cg-lora"]["seconds"], rel=0.1)
    assert result["ratios"]["cg-lora / floor (time)"] == pytest.approx(r["cg-lora"]["seconds"] / r["floor"]["seconds"])


def test_bench_routes_prints_both_routes_per_width(capsys):
    import bench
    bench.main(["--routes", "16,32"])
    lines = capsys.readouterr().out.splitlines()
    assert "eigh route d^3 / Cholesky route d^3 (7 lambdas)" in lines[0] and [ln.split()[0] for ln in lines[1:]] == ["16", "32"]


# ============================================================================ results/run.py


def _results_run():  # results/run.py as a module (it is a script, not a package)
    import importlib.util
    spec = importlib.util.spec_from_file_location("results_run", Path(__file__).parent / "results" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run


def _results_sandbox(tmp_path, monkeypatch, block, **files):
    """results/run.py in tmp_path: results/README.md with a STALE `block`, and each files[NAME] (run.NAME) there."""
    run = _results_run()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "README.md").write_text(f"head\n<!-- {block} -->\nSTALE\n<!-- /{block} -->\ntail\n")
    monkeypatch.setattr(run, "HERE", tmp_path / "results")
    for name, file in files.items():
        monkeypatch.setattr(run, name, tmp_path / "results" / file)
    return run


def test_results_report_matches_the_runs(tmp_path, monkeypatch):
    """The README table is computed from the JSON lines: best seed-0 CoLA rate, mean ± std, differences."""
    run = _results_sandbox(tmp_path, monkeypatch, "results", RUNS="runs.jsonl", DIAGNOSTICS="diagnostics.jsonl")
    scores = {("cg-lora", 1e-3): [0.30, 0.20, 0.10], ("cg-lora", 3e-3): [0.05], ("cg-lora", 5e-4): [0.9],
              ("lora-one", 1e-3): [0.10, 0.12, 0.14], ("lora-one", 3e-3): [0.15, 0.0, 0.0]}
    with open(run.RUNS, "w") as f:
        for (method, lr), xs in scores.items():
            for seed, x in enumerate(xs):
                history = [dict(epoch=1, dev_mcc=x / 2, dev_loss=1.0), dict(epoch=2, dev_mcc=x, dev_loss=0.5)]
                f.write(json.dumps(dict(task="cola", method=method, seed=seed, lr=lr, damping=run.DAMPING,
                                        history=history, captured=[0.5], wall_seconds=60.0)) + "\n")
    run.report()
    readme = (tmp_path / "results" / "README.md").read_text()
    assert readme.startswith("head\n<!-- results -->\n") and readme.endswith("<!-- /results -->\ntail\n")
    assert "STALE" not in readme
    # cg-lora's best seed-0 rate is 1e-3 (0.30 > 0.05; 5e-4 is a sensitivity rate, not a candidate),
    # lora-one's is 3e-3 (0.15 > 0.10)
    assert "| cg-lora | 0.0005: 0.900, **0.001**: 0.300, **0.003**: 0.050 |" in readme
    assert "| cg-lora | 0.001 | default | 0.200 ± 0.100 (3) | 0.100 ± 0.050 (3) |" in readme
    assert "| lora-one | 0.003 | default | 0.050 ± 0.087 (3) | 0.025 ± 0.043 (3) |" in readme
    se = math.sqrt(0.1 ** 2 / 3 + 0.0075 / 3)  # sample variances of (0.3, 0.2, 0.1) and (0.15, 0, 0)
    assert f"| cola | — | — | — | +0.150 ± {se:.3f} | — |" in readme  # columns: run.BASELINES
    assert f"| cola, epoch 1 | — | — | — | +0.075 ± {se / 2:.3f} | — |" in readme
    assert (tmp_path / "results" / "cola_curves.svg").read_text().startswith("<svg")
    # an init-size sweep on CoLA and STS-B: the grid then uses each method's best mean size
    with open(run.RUNS, "a") as f:
        for method, lr in (("cg-lora", 1e-3), ("lora-one", 3e-3)):
            for n, x in zip(run.INIT_NORMS, (0.3, 0.5, 0.1)):
                for task in ("cola", "sts-b"):
                    if n is None and task == "cola":
                        continue  # the seed-0 run above is the default size's CoLA row
                    history = [dict(epoch=1, dev_mcc=x, dev_pearson=x, dev_loss=1.0)]
                    f.write(json.dumps(dict(task=task, method=method, seed=0, lr=lr, damping=run.DAMPING, init_norm=n,
                                            history=history, captured=[0.5], wall_seconds=60.0)) + "\n")
    assert run.best_sizes(run.done(), run.best_rates(run.done())) == {
        "cg-lora": run.INIT_NORMS[1], "cg-lora-shift": run.INIT_NORMS[1], "lora-one": run.INIT_NORMS[1]}
    # until the grid has run at the best size, the table keeps the default size's grid and says so
    run.report()
    readme = (tmp_path / "results" / "README.md").read_text()
    assert "| cg-lora | 0.001 | default | 0.200 ± 0.100 (3) |" in readme
    n = f"{run.INIT_NORMS[1]:g}"
    assert f"best init size of cg-lora {n}, lora-one {n}, cg-lora-shift {n} has not been run on every" in readme
    with open(run.RUNS, "a") as f:  # the grid at cg-lora's best size: seeds 1 and 2 on CoLA
        for seed, x in ((1, 0.4), (2, 0.6)):
            history = [dict(epoch=1, dev_mcc=x / 2, dev_loss=1.0), dict(epoch=2, dev_mcc=x, dev_loss=0.5)]
            f.write(json.dumps(dict(task="cola", method="cg-lora", seed=seed, lr=1e-3, damping=run.DAMPING,
                                    init_norm=run.INIT_NORMS[1], history=history, captured=[0.5],
                                    wall_seconds=60.0)) + "\n")
    run.report()
    readme = (tmp_path / "results" / "README.md").read_text()  # seed 0 at 0.3 scored 0.5 above
    assert f"| cg-lora | 0.001 | {run.INIT_NORMS[1]:g} | 0.500 ± 0.100 (3) |" in readme
    assert "best init size of lora-one" in readme and "best init size of cg-lora " not in readme
    se = math.sqrt(0.1 ** 2 / 3 + 0.0075 / 3)  # (0.5, 0.4, 0.6) at 0.3; (0.3, 0.2, 0.1) at the default
    assert f"| cola | — | — | — | +0.450 ± {se:.3f} | — |" in readme
    assert f"| cola, cg-lora at the default size | — | — | — | +0.150 ± {se:.3f} | — |" in readme


def test_realloss_curvatures_equal_per_example_gradients():
    """K-FAC reduce's S_red, T_red and the exact-Fisher projections <g_i, B A> of one pass against each
    example's own weight and bias gradients (the bias gradient is sum_t delta_t); q_F <= 1/2."""
    run, model, batches = _results_run(), _model(), _batches(sizes=(3, 1, 4))
    layers = {"query": model.query, "value": model.value}  # they share an input
    g = torch.Generator().manual_seed(2)
    directions = [{n: (torch.randn(5, 2, generator=g), torch.randn(2, 6, generator=g)) for n in layers}
                  for _ in range(3)]
    reduced, p = run.sequence_curvature(model, layers, batches, directions)
    assert not model.query._forward_hooks and not model.value._forward_hooks
    grads, xbar = {n: [] for n in layers}, []
    for b in batches:  # brute force: one unpadded example at a time
        for i in range(len(b["labels"])):
            L = int(b["attention_mask"][i].sum())
            ids, mask = b["input_ids"][i:i + 1, :L], b["attention_mask"][i:i + 1, :L]
            loss = nn.functional.cross_entropy(model(ids, mask), b["labels"][i:i + 1])
            for n in layers:
                grads[n].append(torch.autograd.grad(loss, [layers[n].weight, layers[n].bias], retain_graph=True))
            xbar.append(model.emb(ids)[0].mean(0).detach())
    xbar = torch.stack(xbar)  # n x d_in
    for n in layers:
        dbar = torch.stack([gb for _, gb in grads[n]])  # n x d_out
        torch.testing.assert_close(reduced[n][0], xbar.T @ xbar / len(xbar))
        torch.testing.assert_close(reduced[n][1], dbar.T @ dbar / len(dbar))
        for d, pk in zip(directions, p):
            B, A = d[n]
            brute = torch.stack([(gw * (B @ A)).sum() for gw, _ in grads[n]])  # <g_i, B A>
            torch.testing.assert_close(pk[n], brute, rtol=1e-4, atol=1e-6)
            want = brute.mean() ** 2 / (2 * brute.square().mean())
            assert run.fisher_decrease(pk[n]) == pytest.approx(want.item(), rel=1e-4)
            assert 0 <= run.fisher_decrease(pk[n]) <= 0.5
        G = torch.stack([gw for gw, _ in grads[n]]).mean(0)  # the direction of the gradient itself: still <= 1/2
        U, sigma, Vh = torch.linalg.svd(G)
        pG = run.sequence_curvature(model, {n: layers[n]}, batches, [{n: (U[:, :2] * sigma[:2], Vh[:2])}])[1][0][n]
        assert run.fisher_decrease(pG) <= 0.5
    assert run.fisher_decrease(torch.tensor([3.0, 3.0])) == pytest.approx(0.5)  # equal gradients: the bound


def test_realloss_report_renders_the_rows(tmp_path, monkeypatch):
    """The realloss table: mean ± std over seeds at the auto damping, predicted ÷ real, rank correlations."""
    run = _results_sandbox(tmp_path, monkeypatch, "realloss", REALLOSS="realloss.jsonl")

    def direction(method, damping, q, real, auto=False):  # two layers sharing q; the joint Fisher q = q / 4
        layer = dict(expand=q, reduce=2 * q, fisher=q / 2)
        return dict(method=method, damping=damping, auto=auto, layers={"a": layer, "b": layer},
                    joint=dict(fisher=q / 4), real=dict(decrease=real))
    with open(run.REALLOSS, "w") as f:
        for seed, real in enumerate((0.1, 0.3)):
            x = 1 + seed / 10  # seed 1 predicts 10% more: no ties in the ranks
            ds = [direction("cg-lora", 1.0, 1.0 * x, real / 2), direction("cg-lora", 10.0, 3.0 * x, real, auto=True),
                  direction("lora-one", None, 2.0 * x, 2 * real), direction("lora-ga", None, 0.5 * x, real / 4),
                  direction("random", None, 0.25 * x, real / 8)]
            f.write(json.dumps(dict(task="cola", seed=seed, head="fresh", directions=ds)) + "\n")
    run.realloss_report()
    readme = (tmp_path / "results" / "README.md").read_text()
    assert readme.startswith("head\n<!-- realloss -->\n") and readme.endswith("<!-- /realloss -->\ntail\n")
    assert "STALE" not in readme and "python results/run.py realloss-report" in readme
    # cg-lora at the auto damping: q expand 6 and 6.6 (3 and 3.3 per layer), reduce twice, Fisher half, joint a
    # quarter; real 0.1 and 0.3; predicted / real = the ratio of the means
    assert ("| cola | fresh | cg-lora | 10, 10 | 6.300 ± 0.424 | 12.600 ± 0.849 | 3.150 ± 0.212 | 0.788 ± 0.053 | "
            "0.200 ± 0.141 (2) | 31.5 | 63.0 | 15.8 | 3.9 |") in readme
    # every model ranks the directions alike but cg-lora at lambda 10 over lora-one: Spearman 0.9 within a run,
    # 0.88 over the ten (as scipy.stats.spearmanr); the lambda every model chooses (10) is the real best in both runs
    assert "| K-FAC expand | cola | 0.88 (10) | 0.90 (2) |" in readme
    assert "| exact Fisher, joint | cola | 0.88 (10) | 0.90 (2) |" in readme and "| 10, 10 | 2 of 2 | 0.0000 |" in readme
    assert "| cola | fresh | 1.50, 1.50 | 1.50, 1.50 | 0.50, 0.50 |" in readme  # cg-lora (auto) / lora-one per seed
    assert "K-FAC expand 14 of 20, largest 3.30" in readme  # 1, 3, 2 and seed 1's 0.55, in two layers


def test_early_movement_and_subspace_fractions_against_projections():
    """Issue 21 item 4: |P - P0| and <P, P0>/|P0|^2 summed over layers; the update's share in an r-dim column /
    row space is |Pr_U D|^2 / |D|^2 with the explicit projector; a side without a basis (B0 = 0) has none."""
    run, g = _results_run(), torch.Generator().manual_seed(3)
    P0 = {n: torch.randn(6, 5, generator=g) for n in "ab"}
    P = {n: X + 0.1 * torch.randn(6, 5, generator=g) for n, X in P0.items()}
    m = run.movement(P, P0)
    flat = lambda Q: torch.cat([X.flatten() for X in Q.values()])  # noqa: E731
    assert m["moved"] == pytest.approx((flat(P) - flat(P0)).norm().item(), rel=1e-5)
    assert m["init"] == pytest.approx(flat(P0).norm().item(), rel=1e-5)
    assert m["kept"] == pytest.approx((flat(P) @ flat(P0) / flat(P0).square().sum()).item(), rel=1e-5)
    assert run.movement(P, {n: torch.zeros(6, 5) for n in "ab"})["kept"] is None
    D = {n: P[n] - P0[n] for n in "ab"}
    bases = {n: (torch.linalg.qr(torch.randn(6, 2, generator=g)).Q, torch.linalg.qr(torch.randn(5, 2, generator=g)).Q)
             for n in "ab"}
    got, total = run.in_subspaces(D, bases), sum(X.square().sum() for X in D.values())
    left = sum((U @ U.T @ D[n]).square().sum() for n, (U, _) in bases.items()) / total
    right = sum((D[n] @ V @ V.T).square().sum() for n, (_, V) in bases.items()) / total
    both = sum((U @ U.T @ D[n] @ V @ V.T).square().sum() for n, (U, V) in bases.items()) / total
    assert [got[k] for k in ("left", "right", "both")] == pytest.approx([left.item(), right.item(), both.item()], rel=1e-5)
    assert both <= min(left, right) and 0 < both
    full = {n: (torch.eye(6), torch.eye(5)) for n in "ab"}  # the whole space holds all of it
    assert run.in_subspaces(D, full) == pytest.approx(dict(left=1.0, right=1.0, both=1.0))
    half = run.in_subspaces(D, {n: (None, V) for n, (_, V) in bases.items()})
    assert half["left"] is None and half["both"] is None and half["right"] == pytest.approx(right.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["cg-lora", "full"])
def test_early_trains_exactly_the_first_steps_of_train_py(tmp_path, glue, monkeypatch, method):
    """results/run.py early measures train.py's own run: the same init, the loss of every step and the dev
    evaluation at the last step, on a tiny checkpoint (the step rows of --log_every 1 are single steps)."""
    run = _results_run()
    ckpt = tmp_path / "ckpt"
    _pretrained_checkpoint(ckpt, glue)
    budget = dict(rank=2, alpha=4, epochs=2, batch_size=8, max_len=16, calib_batches=2, calib_batch_size=8)
    monkeypatch.setattr(run, "BUDGET", budget)
    monkeypatch.setattr(run, "EARLY", tmp_path / "early.jsonl")
    monkeypatch.setattr(run, "EVALS", (0,))
    monkeypatch.setattr(run, "MOVES", (2,))
    monkeypatch.setenv("GLUE_DIR", str(glue))
    run.early("cola", method, 0, str(ckpt), lr=1e-2, steps=5)
    row = json.loads(run.EARLY.read_text())
    train.main(["--task", "cola", "--init", method, "--pretrained", str(ckpt), "--lr", "1e-2", "--max_steps", "5",
                "--log_every", "1", "--out", str(tmp_path / "run"), "--seed", "0", "--damping", "auto",
                "--real_check", "4",
                *[a for k, v in budget.items() for a in (f"--{k}", str(v))]])
    steps = _metrics(tmp_path / "run", kind="step")
    assert row["train_loss"] == pytest.approx([r["train_loss"] for r in steps], abs=1e-5) and len(steps) == 5
    last = _metrics(tmp_path / "run")[-1]
    assert row["evals"][-1]["step"] == last["step"] == 5 and row["evals"][-1]["loss"] == pytest.approx(last["dev_loss"])
    assert set(row["moves"]) == {"2", "5"} and row["moves"]["5"]["moved"] > row["moves"]["2"]["moved"] > 0
    if method == "cg-lora":  # its init is train.py's: the same damping and real check
        init = json.loads((tmp_path / "run" / "init.json").read_text())
        assert row["init"]["damping"] == init["damping"] and row["real"] == pytest.approx(init["summary"]["real_decrease"])
        assert 0 < row["in_init"]["both"] <= min(row["in_init"]["left"], row["in_init"]["right"]) <= 1
    else:
        assert row["in_init"] == dict(left=None, right=None, both=None) and row["in_lora_one"]["left"] > 0


def test_results_commands_default_heads(monkeypatch):
    """`early` trains the fresh head unless told --heads probe; `realloss` measures both heads by default."""
    run, calls = _results_run(), []
    monkeypatch.setattr(run, "early", lambda task, m, seed, pretrained, opt, lr, head, steps: calls.append(("early", head)))
    monkeypatch.setattr(run, "realloss", lambda task, seed, head, pretrained: calls.append(("realloss", head)))
    for argv in (["early"], ["early", "--heads", "probe"], ["realloss"]):
        monkeypatch.setattr(sys, "argv", ["run.py", *argv, "--tasks", "cola", "--seeds", "0", "--methods", "rslora",
                                          "--pretrained", "unused"])
        run.main()
    assert calls == [("early", "fresh"), ("early", "probe"), ("realloss", "fresh"), ("realloss", "probe")]


def test_early_report_means_and_figure(tmp_path, monkeypatch):
    """The early-training block: window means of the train loss, mean ± standard error over seeds, the figure."""
    run = _results_sandbox(tmp_path, monkeypatch, "early", EARLY="early.jsonl")
    with open(run.EARLY, "w") as f:
        for seed, level in enumerate((0.6, 0.8)):
            moves = {str(k): dict(moved=level * k, init=2.0, kept=0.5) for k in (*run.MOVES, 300)}
            evals = [dict(step=s, mcc=level / 10, loss=level) for s in (*run.EVALS, 267, 300)]
            f.write(json.dumps(dict(task="cola", method="cg-lora", seed=seed, optimizer="adamw", lr=1e-3, head="fresh",
                                    steps=300, real=0.01 * (seed + 1), train_loss=[level] * 300, evals=evals,
                                    moves=moves, in_init=dict(left=0.5, right=0.25, both=0.1),
                                    in_lora_one=dict(left=0.2, right=0.1, both=0.0))) + "\n")
    run.early_report()
    readme = (tmp_path / "results" / "README.md").read_text()
    assert readme.startswith("head\n<!-- early -->\n") and readme.endswith("<!-- /early -->\ntail\n")
    assert "STALE" not in readme
    # train loss 0.6 and 0.8 at every step: 0.700 ± 0.100 (stdev 0.141 / sqrt 2); real decrease 0.0150 ± 0.0050
    assert "| cg-lora | 0.001 | 0.0150 ± 0.0050 (2) | 0.700 ± 0.100 (2) |" in readme
    assert "| dev mcc 267 (epoch 1) | 300 |" in readme and "0.070 ± 0.010 (2) |" in readme
    assert "| cg-lora | 3.50 ± 0.50 (2) |" in readme  # moved / init at step 10: 0.6 * 10 / 2 and 0.8 * 10 / 2
    assert "0.50 ± 0.00 (2) / 0.25 ± 0.00 (2)" in readme
    svg = (tmp_path / "results" / "early_curves_cola.svg").read_text()
    assert svg.startswith("<svg") and "cg-lora (2)" in svg and svg.count("<polyline") == 1
    assert not (tmp_path / "results" / "early_diff_cola.svg").exists()  # no rsLoRA rows: no paired difference
    with open(run.EARLY, "a") as f:  # rsLoRA at 0.5 on seed 0 only: one pair, cg-lora minus rsLoRA = 0.1
        f.write(json.dumps(dict(json.loads(run.EARLY.read_text().splitlines()[0]), method="rslora",
                                train_loss=[0.5] * 300)) + "\n")
    run.early_report()
    diff = (tmp_path / "results" / "early_diff_cola.svg").read_text()
    assert "cg-lora (1)" in diff and "rslora" not in diff and "0.100" in diff  # the y axis spans the one value
    first = json.loads(run.EARLY.read_text().splitlines()[0])
    with open(run.EARLY, "a") as f:  # LoRA-One at 0.45 on seed 0: its row against rsLoRA, and CG-LoRA's against it
        f.write(json.dumps(dict(first, method="lora-one", train_loss=[0.45] * 300)) + "\n")
    run.early_report()
    readme = (tmp_path / "results" / "README.md").read_text()
    assert "| lora-one | -0.050 (1) |" in readme and "| cg-lora − lora-one | 0.150 (1) |" in readme
    with open(run.EARLY, "a") as f:  # a second task: its own table and figure
        f.write(json.dumps(dict(first, task="sts-b", train_loss=[2.0] * 300,
                                evals=[dict(step=s, pearson=0.5, loss=2.0) for s in (*run.EVALS, 179, 300)])) + "\n")
    run.early_report()
    readme = (tmp_path / "results" / "README.md").read_text()
    assert "cola and sts-b, all-MiniLM-L6-v2" in readme and "**sts-b, AdamW, fresh head**" in readme
    assert "| dev pearson 179 (epoch 1) | 300 |" in readme and "](early_curves_sts-b.svg)" in readme
    assert "sts-b train loss" in (tmp_path / "results" / "early_curves_sts-b.svg").read_text()
    assert "cg-lora (2)" in (tmp_path / "results" / "early_curves_cola.svg").read_text()  # cola's unchanged
    with open(run.EARLY, "a") as f:  # a whole budget under 300 steps (MRPC's 228): a table, not the SGD rate probe's line
        f.write(json.dumps(dict(first, task="mrpc", steps=228, train_loss=[0.5] * 228,
                                moves={str(k): v for k, v in zip((*run.MOVES, 228), first["moves"].values())},
                                evals=[dict(step=s, f1=0.8, loss=0.5) for s in (0, 50, 100, 114, 200, 228)])) + "\n")
    run.early_report()
    readme = (tmp_path / "results" / "README.md").read_text()
    assert "**mrpc, AdamW, fresh head**" in readme and "rate probe" not in readme
    assert "| dev loss 0 | 50 | 100 | 228 | dev f1 114 (epoch 1) | 228 |" in readme
    # a diverged run (nan) is counted, not averaged into the others
    assert run.mean_se([1.0, 3.0, float("nan")]) == "2.000 ± 1.000 (2; 1 diverged)"
    assert run.mean_se([0.5, float("inf")], 2) == "0.50 (1; 1 diverged)" and run.mean_se([math.nan]) == "— (1 diverged)"


# ============================================================================ adapters in other code: peft, transformers


def test_add_lora_names_the_type_of_a_target_that_is_not_linear():
    model = _model()
    with pytest.raises(ValueError, match=r"layer emb is Embedding, not nn\.Linear, .* target the nn\.Linear layers"):
        add_lora(model, ["query", "emb"], rank=2, alpha=4)
    assert isinstance(model.query, nn.Linear) and all(p.requires_grad for p in model.parameters())  # as it was


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


def test_add_lora_on_gpt2_conv1d_says_how_to_convert_it():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match=r"layer transformer\.h\.0\.attn\.c_attn is Conv1D, not nn\.Linear.*"
                                         r"nn\.Linear with weight = conv\.weight\.T"):
        add_lora(transformers.GPT2LMHeadModel(config), ["c_attn"], rank=2, alpha=4)


def test_shifted_export_is_rank_2r_for_every_layer_even_a_zero_gradient_one():
    model = _model()
    reference = copy.deepcopy(model)
    layers = add_lora(model, ["dead", "mix"], rank=2, alpha=4, rslora=True)
    stats = collect_statistics(model, {n: layer.base for n, layer in layers.items()}, _batches())
    report = init_adapters(layers, "cg-lora-shift", stats, log=lambda *a: None)
    assert {r["layer"]: r["fallback"] is not None for r in report} == {"dead": True, "mix": False}  # B = B0 = 0
    sd = lora_state_dict(model)  # peft needs one rank for all layers of an adapter
    for n, layer in layers.items():
        A, B = sd[f"base_model.model.{n}.lora_A.weight"], sd[f"base_model.model.{n}.lora_B.weight"]
        assert A.shape[0] == 4
        torch.testing.assert_close(getattr(reference, n).weight + layer.scaling * B @ A,
                                   layer.base.weight + layer.delta_weight(), atol=1e-6, rtol=0)


def _hf_checkpoint(tmp_path, glue, model_type):
    """A random Hugging Face *ForSequenceClassification checkpoint on disk (2 labels), with a WordPiece
    vocabulary of the CoLA fixture's words (ids below the model's 40; train.py takes any tokenizer)."""
    c, _, task = _hf_models(model_type, num_labels=2)
    task.save_pretrained(tmp_path / "checkpoint")
    texts = [t for ex in data.read_split(data.get_task("cola"), "train", glue) for t in ex[:2] if t]
    data.build_tokenizer(texts).save(tmp_path / "checkpoint")
    return c, tmp_path / "checkpoint"


@pytest.mark.parametrize("model_type, method", [("bert", "cg-lora"), ("bert", "cg-lora-shift"), ("roberta", "cg-lora"),
                                                ("roberta", "cg-lora-shift"), ("tiny", "cg-lora-shift")])
def test_run_loads_in_peft_with_our_logits(tmp_path, glue, model_type, method):
    """A run on a Hugging Face checkpoint under that checkpoint's names, the tiny encoder under ours: the
    adapter in peft, and merged.pt in the checkpoint's own *ForSequenceClassification, give our logits."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    flags = ["--init", method, "--targets", "query,key,value,attn_out,ffn_in,ffn_out", "--max_steps", "4", "--merge"]
    run = tmp_path / "run"
    if model_type == "tiny":
        _train(tmp_path, *flags)
        cfg = train.load_config(run)
        build = lambda: train.build_model(cfg, data.load_tokenizer(run / "tokenizer"), 2)  # noqa: E731
        base = build()
    else:
        _, checkpoint = _hf_checkpoint(tmp_path, glue, model_type)
        _train(tmp_path, "--pretrained", str(checkpoint), *flags)
        build = lambda: from_pretrained(checkpoint, num_labels=2)  # noqa: E731
        base = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint)
    config = json.loads((run / "adapter_config.json").read_text())
    assert peft.LoraConfig(**config).r == (16 if method.endswith("shift") else 8)  # a key peft lacks: TypeError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(base, run).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert set(torch.load(run / "adapter_model.bin")) == set(peft.get_peft_model_state_dict(theirs))  # none ignored
    ours, plain = build(), build()
    merged = torch.load(run / "merged.pt")
    if model_type != "tiny":  # under the checkpoint's own names: its *ForSequenceClassification loads it strictly
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
        hf.load_state_dict(merged, strict=True)
        rename = train.hf_name(train.load_config(run), ours)
        merged = {key: merged[rename(key)] for key in ours.state_dict()}
    ours.load_state_dict(merged)
    plain.head.load_state_dict(ours.head.state_dict())  # the trained head without the adapters
    ids, mask, types = _batch(ours.config)
    with torch.no_grad():
        got, without = ours.eval()(ids, mask, types), plain.eval()(ids, mask, types)
        want = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
        if model_type != "tiny":
            assert (hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits - got).abs().max() <= 1e-5
    want = getattr(want, "logits", want)  # our encoder returns the logits themselves
    assert (got - want).abs().max() <= 1e-4 and (got - without).abs().max() > 1e-2
    back = build()
    assert len(load_adapter(back, run)) == 12  # and back into our encoder
    with torch.no_grad():
        assert (back.eval()(ids, mask, types) - got).abs().max() <= 1e-5


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_load_adapter_saved_by_peft_gives_peft_logits(tmp_path, model_type):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    c, _, task = _hf_models(model_type, num_labels=2)
    task.save_pretrained(tmp_path / "checkpoint")
    config = peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["query", "output.dense"],
                             task_type="SEQ_CLS", modules_to_save=["pooler"] if model_type == "bert" else None)
    theirs = peft.get_peft_model(task, config)  # output.dense: attention.output.dense and the FFN's output.dense
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking adapters and head, so that a skipped key shows
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path / "adapter")  # adapter_model.safetensors: read by our reader
    ours = from_pretrained(tmp_path / "checkpoint", num_labels=2)
    assert sorted(load_adapter(ours, tmp_path / "adapter")) == [
        f"layers.{i}.{n}" for i in (0, 1) for n in ("attn_out", "ffn_out", "query")]
    ids, mask, types = _batch(c)
    with torch.no_grad():
        got = ours.eval()(ids, mask, types)
        want = theirs.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        without = from_pretrained(tmp_path / "checkpoint", num_labels=2).eval()(ids, mask, types)
    assert (got - want).abs().max() <= 1e-5 and (got - without).abs().max() > 1e-2
    saved = tmp_path / "adapter" / "adapter_config.json"
    saved.write_text(json.dumps(dict(json.loads(saved.read_text()), use_dora=True)))
    with pytest.raises(ValueError, match="only a plain LoRA adapter .*'use_dora': True"):
        load_adapter(from_pretrained(tmp_path / "checkpoint", num_labels=2), tmp_path / "adapter")


def _readme_block(marker):
    """The README's ```python block that contains `marker`."""
    readme = Path(__file__).resolve().parent.joinpath("README.md").read_text()
    block, = [b.split("```")[0] for b in readme.split("```python\n")[1:] if marker in b.split("```")[0]]
    return block



def test_readme_recipe_with_cglora_layers_runs():
    pytest.importorskip("transformers")
    scope = {}
    exec(_readme_block("from transformers import BertConfig"), scope)
    model, layers = scope["model"], scope["layers"]
    assert sorted(layers) == [f"bert.encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")]
    assert all(layer.lora_B.abs().max() > 0 for layer in layers.values())
    head = {f"{m}.{p}" for m in ("classifier", "bert.pooler.dense") for p in ("weight", "bias")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{f}" for n in layers for f in "AB"} | head


def test_readme_recipe_with_peft_gives_the_same_update():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    scope = {}
    exec(_readme_block("from transformers import BertConfig"), scope)
    exec(_readme_block("get_peft_model("), scope)  # the README's second block continues the first
    lora = {n: m for n, m in scope["peft_model"].named_modules() if hasattr(m, "get_delta_weight")}
    assert len(lora) == len(scope["report"]) == 4
    trained = {name: sum(p.numel() for p in scope[name].parameters() if p.requires_grad) for name in ("model", "peft_model")}
    assert trained == {"model": 2146, "peft_model": 2146}  # the same set: adapters, classifier, pooler
    for name, m in lora.items():  # same weights, same batches: peft's s B A is cglora's
        ours = scope["layers"][name.removeprefix("base_model.model.")].delta_weight()
        assert ours.abs().max() > 0
        torch.testing.assert_close(m.get_delta_weight("default"), ours, atol=1e-6, rtol=1e-4)


# ============================================================================ README and CI


def test_ci_installs_what_the_readme_says_and_runs_its_test_command():
    here = Path(__file__).resolve().parent
    block = (here / "README.md").read_text().split("```bash\n")[1].split("```")[0]
    install, test = block.splitlines()[1].split(" && ")  # the second line: the test install and command
    ci = [line.split("#")[0].strip() for line in (here / ".ci" / "run").read_text().splitlines()]
    assert install.replace("pip install", "pip install -q") in ci and test in ci
    assert ci.index(install.replace("pip install", "pip install -q")) < ci.index(test)
