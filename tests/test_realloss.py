"""Tests of results/realloss.py: the sequence curvatures against per-example gradients, a row on
a tiny checkpoint, the command's defaults, and the report against its rows."""
import json

import pytest
import torch
import torch.nn as nn

from conftest import _pretrained_checkpoint, _results_sandbox
from results import common, realloss
from test_cglora import _batches, _model


def test_realloss_curvatures_equal_per_example_gradients():
    """K-FAC reduce's S_red, T_red and the exact-Fisher projections <g_i, B A> of one pass against each
    example's own weight and bias gradients (the bias gradient is sum_t delta_t); q_F <= 1/2."""
    run, model, batches = realloss, _model(), _batches(sizes=(3, 1, 4))
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


@pytest.mark.filterwarnings("ignore::data.RowCountWarning")  # the fixture holds a few GLUE rows
def test_realloss_row_on_a_tiny_checkpoint(tmp_path, glue, monkeypatch):
    """One (task, seed, head) end to end (the damping search needs its 2 folds): the one direction
    marked auto is CG-LoRA at the row's searched damping, each direction's real decrease is the
    loss at W0 less its best over the scales, the joint expand q is the layers' sum, and at
    λ = 1000 (S and T damped to nearly a multiple of I) CG-LoRA's q is LoRA-One's."""
    _pretrained_checkpoint(tmp_path / "ckpt", glue)
    _results_sandbox(tmp_path, monkeypatch, "realloss")
    monkeypatch.setenv("GLUE_DIR", str(glue))
    monkeypatch.setattr(realloss, "CALIBRATION", 32)
    monkeypatch.setattr(realloss, "HELD_OUT", 32)
    monkeypatch.setattr(realloss, "BUDGET", dict(common.BUDGET, rank=2, alpha=4, max_len=16))
    realloss.realloss("cola", 0, "fresh", str(tmp_path / "ckpt"))
    row, = common.read_rows(realloss.REALLOSS)
    ds = row["directions"]
    auto = [(d["method"], d["damping"]) for d in ds if d["auto"]]
    assert auto == [("cg-lora", row["damping_auto"])]
    for d in ds:
        losses = d["real"]["losses"]
        assert d["real"]["decrease"] == pytest.approx(row["loss_W0"] - min(losses.values()))
        assert losses[f"{d['real']['best_scale']:g}"] == min(losses.values())
        assert d["joint"]["expand"] == pytest.approx(sum(x["expand"] for x in d["layers"].values()))
    q = {(d["method"], d["damping"]): d["joint"]["expand"] for d in ds}
    assert q[("cg-lora", 1000.0)] == pytest.approx(q[("lora-one", None)], rel=0.02)


def test_realloss_report_renders_the_rows(tmp_path, monkeypatch):
    """The realloss table: mean ± std over seeds at the auto damping, predicted ÷ real, rank correlations."""
    here, run = _results_sandbox(tmp_path, monkeypatch, "realloss"), realloss

    def direction(method, damping, q, real, auto=False):  # two layers sharing q; the joint Fisher q = q / 4
        layer = dict(expand=q, reduce=2 * q, fisher=q / 2)
        return dict(method=method, damping=damping, auto=auto, layers={"a": layer, "b": layer},
                    joint=dict(fisher=q / 4), real=dict(decrease=real))
    with open(here / run.REALLOSS, "w") as f:
        for seed, real in enumerate((0.1, 0.3)):
            x = 1 + seed / 10  # seed 1 predicts 10% more: no ties in the ranks
            ds = [direction("cg-lora", 1.0, 1.0 * x, real / 2), direction("cg-lora", 10.0, 3.0 * x, real, auto=True),
                  direction("lora-one", None, 2.0 * x, 2 * real), direction("lora-ga", None, 0.5 * x, real / 4),
                  direction("random", None, 0.25 * x, real / 8)]
            f.write(json.dumps(dict(task="cola", seed=seed, head="fresh", directions=ds)) + "\n")
    run.report()
    readme = (here / "README.md").read_text()
    assert readme.startswith("head\n<!-- realloss -->\n") and readme.endswith("<!-- /realloss -->\ntail\n")
    assert "STALE" not in readme and "python results/realloss.py report" in readme
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


def test_realloss_measures_both_heads_by_default(monkeypatch):
    calls = []
    monkeypatch.setattr(realloss, "realloss", lambda task, seed, head, pretrained:
                        calls.append((task, seed, head)))
    realloss.main(["run", "--tasks", "cola,sts-b", "--seeds", "0", "--pretrained", "unused",
                   "--workers", "1"])
    assert calls == [("cola", 0, "fresh"), ("cola", 0, "probe"), ("sts-b", 0, "fresh"),
                     ("sts-b", 0, "probe")]
