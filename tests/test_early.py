"""Tests of results/early.py: the movement and subspace measures against brute force, a run
against train.py's own, and the report against its rows."""
import json

import pytest
import torch

import train
from conftest import _metrics, _pretrained_checkpoint, _results_sandbox
from results import common, early

# The GLUE fixtures here hold a few rows, not GLUE's counts: read_split's RowCountWarning is expected.
pytestmark = pytest.mark.filterwarnings("ignore::data.RowCountWarning")


def test_early_movement_and_subspace_fractions_against_projections():
    """Issue 21 item 4: |P - P0| and <P, P0>/|P0|^2 summed over layers; the update's share in an r-dim column /
    row space is |Pr_U D|^2 / |D|^2 with the explicit projector; a side without a basis (B0 = 0) has none."""
    run, g = early, torch.Generator().manual_seed(3)
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
    run = early
    ckpt = tmp_path / "ckpt"
    _pretrained_checkpoint(ckpt, glue)
    budget = dict(rank=2, alpha=4, epochs=2, batch_size=8, max_len=16, calib_batches=2, calib_batch_size=8)
    monkeypatch.setattr(run, "BUDGET", budget)
    monkeypatch.setattr(common, "HERE", tmp_path)
    monkeypatch.setattr(run, "EVALS", (0,))
    monkeypatch.setattr(run, "MOVES", (2,))
    monkeypatch.setenv("GLUE_DIR", str(glue))
    run.early("cola", method, 0, str(ckpt), lr=1e-2, steps=5)
    row, = common.read_rows(run.EARLY)
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
        # rel 1e-4, not bitwise: on 2 threads the same real check, run twice in one process, gave
        # 0.1813074 and 0.1813093 (one thread: equal)
        assert row["init"]["damping"] == init["damping"]
        assert row["real"] == pytest.approx(init["summary"]["real_decrease"], rel=1e-4)
        assert 0 < row["in_init"]["both"] <= min(row["in_init"]["left"], row["in_init"]["right"]) <= 1
    else:
        assert row["in_init"] == dict(left=None, right=None, both=None) and row["in_lora_one"]["left"] > 0


def test_early_trains_the_fresh_head_unless_told(monkeypatch):
    """`early.py run` trains the fresh head unless told --heads probe, one job per (task, seed,
    head, method) in order with --workers 1."""
    calls = []
    monkeypatch.setattr(early, "early", lambda task, m, seed, pretrained, opt, lr, head, steps:
                        calls.append((task, m, seed, head, steps)))
    for heads in ([], ["--heads", "probe"], ["--heads", "fresh,probe"]):
        early.main(["run", "--tasks", "cola", "--seeds", "0", "--methods", "rslora,cg-lora",
                    "--pretrained", "unused", "--workers", "1", *heads])
    assert calls == [("cola", m, 0, h, 300) for heads in (["fresh"], ["probe"], ["fresh", "probe"])
                     for h in heads for m in ("rslora", "cg-lora")]
    with pytest.raises(SystemExit, match="--methods: lora-x not among"):
        early.main(["run", "--methods", "lora-x", "--pretrained", "unused"])


def test_early_report_means_and_figure(tmp_path, monkeypatch):
    """The early-training block: window means of the train loss, mean ± standard error over seeds, the figure."""
    here, run = _results_sandbox(tmp_path, monkeypatch, "early"), early
    with open(here / run.EARLY, "w") as f:
        for seed, level in enumerate((0.6, 0.8)):
            moves = {str(k): dict(moved=level * k, init=2.0, kept=0.5) for k in (*run.MOVES, 300)}
            evals = [dict(step=s, mcc=level / 10, loss=level) for s in (*run.EVALS, 267, 300)]
            f.write(json.dumps(dict(task="cola", method="cg-lora", seed=seed, optimizer="adamw", lr=1e-3, head="fresh",
                                    steps=300, real=0.01 * (seed + 1), train_loss=[level] * 300, evals=evals,
                                    moves=moves, in_init=dict(left=0.5, right=0.25, both=0.1),
                                    in_lora_one=dict(left=0.2, right=0.1, both=0.0))) + "\n")
    run.report()
    readme = (here / "README.md").read_text()
    assert readme.startswith("head\n<!-- early -->\n") and readme.endswith("<!-- /early -->\ntail\n")
    assert "STALE" not in readme
    # train loss 0.6 and 0.8 at every step: 0.700 ± 0.100 (stdev 0.141 / sqrt 2); real decrease 0.0150 ± 0.0050
    assert "| cg-lora | 0.001 | 0.0150 ± 0.0050 (2) | 0.700 ± 0.100 (2) |" in readme
    assert "| dev mcc 267 (epoch 1) | 300 |" in readme and "0.070 ± 0.010 (2) |" in readme
    assert "| cg-lora | 3.50 ± 0.50 (2) |" in readme  # moved / init at step 10: 0.6 * 10 / 2 and 0.8 * 10 / 2
    assert "0.50 ± 0.00 (2) / 0.25 ± 0.00 (2)" in readme
    svg = (here / "early_curves_cola.svg").read_text()
    assert svg.startswith("<svg") and "cg-lora (2)" in svg and svg.count("<polyline") == 1
    assert not (here / "early_diff_cola.svg").exists()  # no rsLoRA rows: no paired difference
    with open(here / run.EARLY, "a") as f:  # rsLoRA at 0.5 on seed 0 only: one pair, cg-lora minus rsLoRA = 0.1
        f.write(json.dumps(dict(json.loads((here / run.EARLY).read_text().splitlines()[0]), method="rslora",
                                train_loss=[0.5] * 300)) + "\n")
    run.report()
    diff = (here / "early_diff_cola.svg").read_text()
    assert "cg-lora (1)" in diff and "rslora" not in diff and "0.100" in diff  # the y axis spans the one value
    first = json.loads((here / run.EARLY).read_text().splitlines()[0])
    with open(here / run.EARLY, "a") as f:  # LoRA-One at 0.45 on seed 0: its row against rsLoRA, and CG-LoRA's against it
        f.write(json.dumps(dict(first, method="lora-one", train_loss=[0.45] * 300)) + "\n")
    run.report()
    readme = (here / "README.md").read_text()
    assert "| lora-one | -0.050 (1) |" in readme and "| cg-lora − lora-one | 0.150 (1) |" in readme
    with open(here / run.EARLY, "a") as f:  # a second task: its own table and figure
        f.write(json.dumps(dict(first, task="sts-b", train_loss=[2.0] * 300,
                                evals=[dict(step=s, pearson=0.5, loss=2.0) for s in (*run.EVALS, 179, 300)])) + "\n")
    run.report()
    readme = (here / "README.md").read_text()
    assert "cola and sts-b, all-MiniLM-L6-v2" in readme and "**sts-b, AdamW, fresh head**" in readme
    assert "| dev pearson 179 (epoch 1) | 300 |" in readme and "](early_curves_sts-b.svg)" in readme
    assert "sts-b train loss" in (here / "early_curves_sts-b.svg").read_text()
    assert "cg-lora (2)" in (here / "early_curves_cola.svg").read_text()  # cola's unchanged
    with open(here / run.EARLY, "a") as f:  # a whole budget under 300 steps (MRPC's 228): a table, not the SGD rate probe's line
        f.write(json.dumps(dict(first, task="mrpc", steps=228, train_loss=[0.5] * 228,
                                moves={str(k): v for k, v in zip((*run.MOVES, 228), first["moves"].values())},
                                evals=[dict(step=s, f1=0.8, loss=0.5) for s in (0, 50, 100, 114, 200, 228)])) + "\n")
    run.report()
    readme = (here / "README.md").read_text()
    assert "**mrpc, AdamW, fresh head**" in readme and "rate probe" not in readme
    assert "| dev loss 0 | 50 | 100 | 228 | dev f1 114 (epoch 1) | 228 |" in readme
