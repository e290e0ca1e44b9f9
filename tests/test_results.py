"""Tests of results/run.py: the report commands against the runs and their own recomputations."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import train
from conftest import _metrics, _pretrained_checkpoint
from test_cglora import _batches, _model


# The GLUE fixtures here hold a few rows, not GLUE's counts: read_split's RowCountWarning is expected
# (pytest.warns still sees it where a test checks it).
pytestmark = pytest.mark.filterwarnings("ignore::data.RowCountWarning")


def _results_run():  # results/run.py as a module (it is a script, not a package)
    import importlib.util
    spec = importlib.util.spec_from_file_location("results_run", Path(__file__).resolve().parents[1] / "results" / "run.py")
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
