"""results/cost.py's tables against their rows, and the README's copy of the current table."""
import json
from pathlib import Path

from conftest import _results_sandbox
from results import common, cost

ROOT = Path(__file__).resolve().parents[1]


def _measured(seconds, peak, **more):
    return dict(seconds=seconds, peak_rss_mib=peak, **more)


def test_cost_report_renders_the_rows(tmp_path, monkeypatch):
    here = _results_sandbox(tmp_path, monkeypatch, "cost")
    (here / "README.md").write_text((here / "README.md").read_text()
                                    + "<!-- cost-first -->\nSTALE\n<!-- /cost-first -->\n")
    for prefix in cost.RUNS.values():
        for shape in cost.SHAPES:
            results = {"floor": _measured(2.0, 900.0), "peft-lora-ga": _measured(4.0, 1000.0),
                       "cg-lora": _measured(5.0, 1250.0, statistics_mib=316.5)}
            if shape == "roberta-base-qv":
                results.update({"cg-lora-auto": _measured(12.34, 1500.4),
                                "our-step": _measured(3.0, 0), "frozen-step": _measured(2.0, 0),
                                "peft-step": _measured(4.0, 0)})
            if shape == "llama-2048":  # 3 passes under a memory budget of 627 MiB
                results["cg-lora-grouped"] = _measured(10.0, 800.0, statistics_mib=100, passes=3)
            (here / f"{prefix}-{shape}.json").write_text(json.dumps(
                dict(args=dict(budget_mib=627.0), results=results)))
    cost.report()
    readme = (here / "README.md").read_text()
    assert "STALE" not in readme and readme.startswith("head\n") and readme.count("tail\n") == 1
    assert "over `results/cost-cpu-*.json`" in readme
    assert "over `results/cost-first-cpu-*.json`" in readme
    # 5 / 4 s and 1250 / 1000 MiB: 1.25 both ways; 316.5 MiB rounds to even
    assert "| RoBERTa q,v ×12 | 2.0 / 900 | 4.0 / 1000 | 5.0 / 1250 | **1.25 / 1.25** | 316 | " \
           "12.3 / 1500 |" in readme
    assert "| RoBERTa all 6 ×12 | 2.0 / 900 | 4.0 / 1000 | 5.0 / 1250 | **1.25 / 1.25** | 316 | " \
           "not run |" in readme
    assert "| the same, grouped, 627 MiB | | | 10.0 / 800 | 2.50 / 0.80 | 100 | 3 passes |" \
           in readme
    assert readme.index("Llama-1024") < readme.index("Llama-2048") < readme.index("grouped")
    assert "ours 3.00, the frozen model's\nforward + backward 2.00, transformers + peft 4.00: " \
           "ours is 1.50× the first and 0.75× the second." in readme
    assert readme.count("A training step") == 1  # in the current block only


def test_the_readme_cost_table_is_the_current_rows_table():
    """The README's Cost table is written by hand: it must stay what the committed rows give."""
    section = (ROOT / "README.md").read_text().split("\n## Cost\n")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert common.HERE == ROOT / "results"
    assert table == cost.table(cost.RUNS["cost"])
