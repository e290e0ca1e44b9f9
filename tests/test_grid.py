"""Tests of results/grid.py: the report against the runs and its own recomputations."""
import json
import math

from conftest import _results_sandbox
from results import common, grid


def test_grid_report_matches_the_runs(tmp_path, monkeypatch):
    """The README table is computed from the JSON lines: best seed-0 CoLA rate, mean ± std, differences."""
    here, run = _results_sandbox(tmp_path, monkeypatch, "results"), grid
    scores = {("cg-lora", 1e-3): [0.30, 0.20, 0.10], ("cg-lora", 3e-3): [0.05], ("cg-lora", 5e-4): [0.9],
              ("lora-one", 1e-3): [0.10, 0.12, 0.14], ("lora-one", 3e-3): [0.15, 0.0, 0.0]}
    with open(here / run.RUNS, "w") as f:
        for (method, lr), xs in scores.items():
            for seed, x in enumerate(xs):
                history = [dict(epoch=1, dev_mcc=x / 2, dev_loss=1.0), dict(epoch=2, dev_mcc=x, dev_loss=0.5)]
                f.write(json.dumps(dict(task="cola", method=method, seed=seed, lr=lr, damping=run.DAMPING,
                                        history=history, captured=[0.5], wall_seconds=60.0)) + "\n")
    run.report()
    readme = (here / "README.md").read_text()
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
    assert (here / "cola_curves.svg").read_text().startswith("<svg")
    # an init-size sweep on CoLA and STS-B: the grid then uses each method's best mean size
    with open(here / run.RUNS, "a") as f:
        for method, lr in (("cg-lora", 1e-3), ("lora-one", 3e-3)):
            for n, x in zip(run.INIT_NORMS, (0.3, 0.5, 0.1)):
                for task in ("cola", "sts-b"):
                    if n is None and task == "cola":
                        continue  # the seed-0 run above is the default size's CoLA row
                    history = [dict(epoch=1, dev_mcc=x, dev_pearson=x, dev_loss=1.0)]
                    f.write(json.dumps(dict(task=task, method=method, seed=0, lr=lr, damping=run.DAMPING, init_norm=n,
                                            history=history, captured=[0.5], wall_seconds=60.0)) + "\n")
    rows = common.read_rows(run.RUNS)
    assert run.best_sizes(rows, run.best_rates(rows)) == {
        "cg-lora": run.INIT_NORMS[1], "cg-lora-shift": run.INIT_NORMS[1], "lora-one": run.INIT_NORMS[1]}
    # until the grid has run at the best size, the table keeps the default size's grid and says so
    run.report()
    readme = (here / "README.md").read_text()
    assert "| cg-lora | 0.001 | default | 0.200 ± 0.100 (3) |" in readme
    n = f"{run.INIT_NORMS[1]:g}"
    assert f"best init size of cg-lora {n}, lora-one {n}, cg-lora-shift {n} has not been run on every" in readme
    with open(here / run.RUNS, "a") as f:  # the grid at cg-lora's best size: seeds 1 and 2 on CoLA
        for seed, x in ((1, 0.4), (2, 0.6)):
            history = [dict(epoch=1, dev_mcc=x / 2, dev_loss=1.0), dict(epoch=2, dev_mcc=x, dev_loss=0.5)]
            f.write(json.dumps(dict(task="cola", method="cg-lora", seed=seed, lr=1e-3, damping=run.DAMPING,
                                    init_norm=run.INIT_NORMS[1], history=history, captured=[0.5],
                                    wall_seconds=60.0)) + "\n")
    run.report()
    readme = (here / "README.md").read_text()  # seed 0 at 0.3 scored 0.5 above
    assert f"| cg-lora | 0.001 | {run.INIT_NORMS[1]:g} | 0.500 ± 0.100 (3) |" in readme
    assert "best init size of lora-one" in readme and "best init size of cg-lora " not in readme
    se = math.sqrt(0.1 ** 2 / 3 + 0.0075 / 3)  # (0.5, 0.4, 0.6) at 0.3; (0.3, 0.2, 0.1) at the default
    assert f"| cola | — | — | — | +0.450 ± {se:.3f} | — |" in readme
    assert f"| cola, cg-lora at the default size | — | — | — | +0.150 ± {se:.3f} | — |" in readme


def test_grid_run_records_its_row_in_the_file_it_is_given(tmp_path, monkeypatch):
    """grid.run with train.py stood in: the row, with the allocated ranks, goes to `file` (and not
    to runs.jsonl), and a second call finds it there and runs nothing."""
    here, calls = _results_sandbox(tmp_path, monkeypatch, "results"), []

    def train_py(argv, **kw):  # what train.py leaves in --out
        calls.append(argv)
        out = tmp_path / argv[argv.index("--out") + 1]
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text(json.dumps(dict(kind="eval", epoch=2, dev_mcc=0.3)))
        (out / "init.json").write_text(json.dumps(dict(seconds=1.0, summary=dict(rank_sum=3), layers=[
            dict(layer="a", rank=1, captured=0.5), dict(layer="b", rank=2, captured=0.6)])))
        return grid.subprocess.CompletedProcess(argv, 0, "", "")
    monkeypatch.setattr(grid.subprocess, "run", train_py)
    for _ in range(2):
        grid.run("cola", "cg-lora", 0, 1e-3, "ckpt", 1.0, 0.3, allocate="gradient", file="other.jsonl")
    row, = common.read_rows("other.jsonl")
    assert len(calls) == 1 and "--allocate" in calls[0] and not (here / grid.RUNS).exists()
    assert row["ranks"] == {"a": 1, "b": 2} and row["allocate"] == "gradient" and row["captured"] == [0.5, 0.6]
    assert grid.score(row) == 0.3
