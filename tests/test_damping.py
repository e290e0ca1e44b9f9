"""Tests of results/damping.py: its diagnose on a tiny checkpoint, its report against its rows."""
import pytest

from conftest import _pretrained_checkpoint, _results_sandbox
from results import common, damping, grid


def _realloss_row(task, seed, auto, real):  # CG-LoRA's real decrease per damping
    return dict(task=task, seed=seed, damping_auto=auto, directions=[
        dict(method="cg-lora", damping=lam, real=dict(decrease=x)) for lam, x in real.items()])


def test_damping_report_renders_the_rows(tmp_path, monkeypatch):
    here = _results_sandbox(tmp_path, monkeypatch, "damping")
    common.append_row(damping.DIAGNOSTICS, dict(
        task="sts-b", calibration=128, damping=1.0, heldout_ratio_chosen=3.3, kfold_ratio=2.9,
        heldout_ratio={"0.1": 3.4, "1": 3.3}, overlap=[0.28, 0.32], overlap_lora_one=[0.59, 0.54],
        statistics_seconds=92.0, selection_seconds=527.0))
    common.append_row(damping.DIAGNOSTICS, dict(
        task="cola", calibration=512, damping=10.0, heldout_ratio_chosen=1.7, kfold_ratio=1.4,
        heldout_ratio={"1": 1.8, "10": 1.7}, overlap=[0.2, 0.3], overlap_lora_one=[0.4, 0.5],
        statistics_seconds=29.0, selection_seconds=103.0))
    common.append_row(damping.REALLOSS, _realloss_row("cola", 0, 1.0, {1.0: 0.1, 1000.0: 0.3}))
    common.append_row(damping.REALLOSS, _realloss_row("cola", 1, 10.0, {1.0: 0.2, 10.0: 0.1}))
    history = lambda x: [dict(epoch=2, dev_mcc=x, dev_loss=0.5)]  # noqa: E731
    for seed, (at_1, searched) in enumerate(((0.3, 0.2), (0.2, 0.2), (0.4, 0.1))):
        for d, x in ((1.0, at_1), ("auto", searched)):
            common.append_row(grid.RUNS, dict(task="cola", method="cg-lora", seed=seed, lr=1e-3,
                                              damping=d, init_norm=0.3, history=history(x),
                                              chosen_damping=None if d == 1.0 else 10.0))
    damping.report()
    readme = (here / "README.md").read_text()
    assert "STALE" not in readme and "over 2 rows of `results/diagnostics.jsonl`" in readme
    rows = readme.split("| cola | 512 |")[1], readme.split("| sts-b | 128 |")[1]
    assert readme.index("| cola | 512 |") < readme.index("| sts-b | 128 |")  # the tasks' order
    assert rows[0].startswith(" 10 | 1.70 | 1 (1.80) | 1.40 | 0.20 / 0.30 | 0.40 / 0.50 | 29, 103 |")
    assert rows[1].startswith(" 1 | 3.30 | 0.1 (3.40) |")
    assert "over the 2 real-loss rows 1 (1), 10 (1)" in readme
    assert "largest real decrease in those rows: 1000 (1), 1 (1)" in readme
    # λ = 1 minus the searched λ per seed: +0.1, 0, +0.3: mean 0.1333, standard error 0.0882
    assert "| cola | 0, 1, 2 | 0.3000 − 0.2000, 0.2000 − 0.2000, 0.4000 − 0.1000 | " \
           "+0.1333 ± 0.0882 |" in readme


@pytest.mark.filterwarnings("ignore::data.RowCountWarning")  # the fixture holds a few GLUE rows
def test_damping_diagnose_on_a_tiny_checkpoint(tmp_path, glue, monkeypatch):
    """`damping.py diagnose` end to end: the λ chosen has the largest 2-fold held-out q of the grid
    (the search's table, summed over layers), at λ = 1000 (S and T damped to nearly a multiple of
    I) CG-LoRA's direction judged on the unseen examples is LoRA-One's, and a row already there is
    not measured again."""
    _pretrained_checkpoint(tmp_path / "ckpt", glue)
    _results_sandbox(tmp_path, monkeypatch, "damping")
    monkeypatch.setenv("GLUE_DIR", str(glue))
    monkeypatch.setattr(damping, "HELD_OUT", 32)
    monkeypatch.setattr(damping, "BUDGET", dict(common.BUDGET, rank=2, max_len=16))
    for _ in range(2):
        damping.diagnose("cola", 32, 0, str(tmp_path / "ckpt"))
    row, = common.read_rows(damping.DIAGNOSTICS)
    kfold = row["kfold_by_damping"]
    assert list(kfold) == list(row["heldout_ratio"]) == ["0.001", "0.01", "0.1", "1", "10", "100",
                                                         "1000"]
    assert f"{row['damping']:g}" == max(kfold, key=kfold.get) and min(kfold.values()) > 0
    assert row["held_out"] == 32 and row["kfold_ratio"] > 0
    assert row["heldout_ratio"]["1000"] == pytest.approx(1.0, abs=0.02)
    assert all(0 <= x <= 1 + 1e-6 for x in row["overlap"] + row["overlap_lora_one"])
