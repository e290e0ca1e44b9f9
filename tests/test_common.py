"""Tests of results/common.py: the statistics' formats, the README blocks, and the workers."""
import math
import os
from pathlib import Path

import pytest

from conftest import _results_sandbox
from results import common


def test_mean_se_counts_a_diverged_run_apart():
    assert common.mean_se([1.0, 3.0, float("nan")]) == "2.000 ± 1.000 (2; 1 diverged)"
    assert common.mean_se([0.5, float("inf")], 2) == "0.50 (1; 1 diverged)"
    assert common.mean_se([math.nan]) == "— (1 diverged)" and common.mean_se([None]) == "—"


def test_paired_differences_use_the_seeds_both_have():
    runs = [dict(seed=0, x=1.0), dict(seed=1, x=4.0), dict(seed=2, x=9.0)]
    reference = {0: dict(seed=0, x=0.5), 1: dict(seed=1, x=2.0)}  # seed 2 has no partner
    assert common.paired(runs, reference, lambda r: r["x"]) == "1.250 ± 0.750 (2)"


def test_write_block_replaces_only_its_block_and_adds_a_missing_one(tmp_path, monkeypatch):
    here = _results_sandbox(tmp_path, monkeypatch, "a")
    common.write_block("a", "new\n")
    assert (here / "README.md").read_text() == "head\n<!-- a -->\nnew\n<!-- /a -->\ntail\n"
    common.write_block("b", "more\n")
    assert (here / "README.md").read_text().endswith("tail\n\n<!-- b -->\nmore\n<!-- /b -->\n")


def _append(folder, i):  # a worker's job: its row, with its process id, in `folder`
    common.HERE = Path(folder)  # a spawned worker imports common afresh
    common.append_row("rows.jsonl", dict(i=i, pid=os.getpid()))


def test_parallel_workers_append_every_row(tmp_path, monkeypatch):
    """Two worker processes write into the same rows file without losing one; --workers 1 runs the
    jobs in order in this process."""
    monkeypatch.setattr(common, "HERE", tmp_path)
    common.parallel(_append, [(str(tmp_path), i) for i in range(6)], workers=1)
    rows = common.read_rows("rows.jsonl")
    assert [r["i"] for r in rows] == list(range(6)) and {r["pid"] for r in rows} == {os.getpid()}
    assert common.has_row("rows.jsonl", i=5) and not common.has_row("rows.jsonl", i=6)
    (tmp_path / "rows.jsonl").unlink()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # parallel sets it for its workers
    common.parallel(_append, [(str(tmp_path), i) for i in range(6)], workers=2)
    rows = common.read_rows("rows.jsonl")
    assert sorted(r["i"] for r in rows) == list(range(6))
    assert os.getpid() not in {r["pid"] for r in rows}
