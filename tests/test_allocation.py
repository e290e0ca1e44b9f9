"""Tests of results/allocation.py: the held-out-fold rule against allocate_ranks, the cheap answer
on a tiny checkpoint, the report against made-up rows (its Spearman against the textbook formula)."""
import json

import pytest
import torch

import cglora
from conftest import _pretrained_checkpoint, _results_sandbox
from results import allocation, common, grid


def _statistics(d_out, d_in, n, seed):  # well-conditioned K-FAC statistics from n samples
    g = torch.Generator().manual_seed(seed)
    x, delta = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    return cglora.Statistics(x.T @ x / n, delta.T @ x / n, delta.T @ delta / n, n, n, f"in{seed}")


def test_heldout_rule_with_identical_folds_is_allocate_ranks():
    """Both folds equal to the pool and λ -> 0: a layer's rank-k direction judged on its own
    undamped statistics predicts sum_{i <= k} sigma_i^2 / 2 (§3), so the held-out gains are
    allocate_ranks' scores and the two rules give the same ranks, summing to the budget."""
    stats = {}
    for i, (d_out, d_in) in enumerate(((6, 5), (5, 6), (7, 4), (4, 4))):
        st = _statistics(d_out, d_in, 20 + 5 * i, i)  # more samples than dims: S, T of full rank
        stats[f"l{i}"] = st._replace(folds=(st, st))
    want = cglora.allocate_ranks(stats, 2, damping=1e-7)
    got = allocation.heldout_ranks(stats, 2, damping=1e-7)
    assert got == want and sum(got.values()) == 8 and want != dict.fromkeys(stats, 2)
    assert all(1 <= r <= 4 for r in got.values())


@pytest.mark.filterwarnings("ignore::data.RowCountWarning")  # the fixture holds a few GLUE rows
def test_cheap_on_a_tiny_checkpoint(tmp_path, glue, monkeypatch):
    """One (task, seed) end to end: every rule's ranks sum to the uniform budget within 1..2r; the
    cg-lora rule's are allocate_ranks' on split A's statistics, and its sum of sigma^2 (what it
    maximises) is at least uniform's; a row already there is not measured again."""
    _pretrained_checkpoint(tmp_path / "ckpt", glue)
    _results_sandbox(tmp_path, monkeypatch, "allocation")
    monkeypatch.setenv("GLUE_DIR", str(glue))
    budget = dict(common.BUDGET, rank=2, alpha=4, max_len=16, calib_batches=4)
    monkeypatch.setattr(allocation, "BUDGET", budget)
    for _ in range(2):
        allocation.cheap("cola", 0, str(tmp_path / "ckpt"), 0.3)
    row, = common.read_rows(allocation.CHEAP)
    assert row["calibration"] == row["held_out"] == 32
    names = row["layer_names"]
    for rule, x in row["rules"].items():
        assert sum(x["ranks"]) == 2 * len(names) and all(1 <= r <= 4 for r in x["ranks"]), rule
    assert row["rules"]["uniform"]["ranks"] == [2] * len(names)
    assert row["rules"]["cg-lora"]["sigma2"] >= row["rules"]["uniform"]["sigma2"] - 1e-6
    # the allocation from A's statistics, recomputed
    import data
    import models
    A, _ = allocation.splits(data.get_task("cola"), data.load_tokenizer(tmp_path / "ckpt"), 0)
    model = models.from_pretrained(str(tmp_path / "ckpt"), 2)
    stats = cglora.collect_statistics(model, cglora.target_layers(model, ["query", "value"],
                                                                  torch.nn.Linear), A)
    assert row["rules"]["cg-lora"]["ranks"] == list(cglora.allocate_ranks(stats, 2).values())
    top = row["top"]  # sigma_1^2 / 2 of each layer's top direction on A
    for n in names:
        sigma = cglora.cg_lora_factors(stats[n].G, stats[n].S, stats[n].T, 1)[2]
        assert top[n]["predicted"] == pytest.approx(sigma[0].item() ** 2 / 2, rel=1e-4)


def _spearman(xs, ys):  # the textbook formula (no ties): 1 - 6 sum d^2 / (n (n^2 - 1))
    rank = lambda v: [sorted(v).index(x) for x in v]  # noqa: E731
    n = len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rank(xs), rank(ys))) / (n * (n * n - 1))


def test_allocation_report_renders_the_rows(tmp_path, monkeypatch):
    here = _results_sandbox(tmp_path, monkeypatch, "allocation")
    names = ["a", "b", "c", "d"]
    predicted, real = [0.4, 0.3, 0.2, 0.1], [0.02, 0.04, 0.01, 0.005]
    rule = lambda s, q_B, r: dict(ranks=[2, 2, 2, 2], sigma2=s, q_A=s / 2, q_B=q_B,  # noqa: E731
                                  real=r, real_scale=1.0, real_at_init=r / 10)
    for seed, k in ((0, 1.0), (1, 1.2)):
        common.append_row(allocation.CHEAP, dict(
            task="cola", seed=seed, layer_names=names,
            rules={"uniform": rule(1.0, 0.5, 0.01), "cg-lora": rule(1.3 * k, 0.4, 0.01 * k),
                   "gradient": rule(1.0, 0.5, 0.02), "held-out folds": rule(1.1, 0.6, 0.01)},
            top={n: dict(predicted=p, real=r * k, q_B=p / 2 + (i == 3), scale=1.0)
                 for i, (n, p, r) in enumerate(zip(names, predicted, real))}))
    def history(x):
        return [dict(epoch=0, step=0, dev_mcc=0.0), dict(epoch=1, step=5, dev_mcc=x / 2),
                dict(epoch=2, step=10, dev_mcc=x)]
    for seed, (u, c) in enumerate(((0.2, 0.3), (0.25, 0.3), (0.3, 0.3))):
        common.append_row(grid.RUNS, dict(task="cola", method="cg-lora", seed=seed, lr=1e-3,
                                          damping=1.0, init_norm=0.3, history=history(u)))
        common.append_row(allocation.TRAIN, dict(task="cola", method="cg-lora", seed=seed, lr=1e-3,
                                                 damping=1.0, init_norm=0.3, allocate="cg-lora",
                                                 history=history(c)))
    monkeypatch.setattr(allocation, "arms", lambda: [(None, grid.RUNS, 1e-3, 0.3)])
    allocation.report()
    readme = (here / "README.md").read_text()
    assert "STALE" not in readme and readme.endswith("<!-- /allocation -->\ntail\n")
    # ratios to uniform per seed: 1.3 and 1.56 -> 1.43 ± 0.13; q on B 0.8 both seeds
    assert "| cola | cg-lora | 2 2 2 2 | 1.43 ± 0.13 (2) | 1.43 ± 0.13 (2) | 0.80 ± 0.00 (2) |" \
        in readme
    want = _spearman(predicted, real)  # ranks 3 2 1 0 against 2 3 1 0: 0.8
    assert want == pytest.approx(0.8)
    assert f"| cola | 0 | {want:.2f} | {_spearman([0.2, 0.15, 0.1, 1.05], real):.2f} | " in readme
    # paired by seed: +0.1, +0.05, 0 -> 0.05 ± 0.029; epoch 1 half of it
    assert "| cola | cg-lora | 0.300 ± 0.000 (3) | 0.050 ± 0.029 (3) | 0.150 ± 0.000 (3) | " \
           "0.025 ± 0.014 (3) |" in readme
    assert "| cola | gradient | — | — | — | — |" in readme
    svg = (here / "allocation.svg").read_text()
    assert svg.startswith("<svg") and "cola: cg-lora − uniform" in svg
    assert json.loads(json.dumps(allocation.report())) == allocation.report()  # deterministic
