"""Tests of bench.py."""
import json

import pytest


def test_bench_smoke_on_the_tiny_preset(tmp_path, monkeypatch):
    import bench
    monkeypatch.delenv("GLUE_DIR", raising=False)  # synthetic sentences: seconds, not minutes
    out = tmp_path / "bench.json"
    bench.main(["--shape", "tiny", "--repeats", "1", "--calib_batches", "4", "--peers", "off", "--json", str(out)])
    result = json.loads(out.read_text())
    r = result["results"]
    assert set(r) == {"floor", "cg-lora", "cg-lora-auto", "frozen-step", "our-step"}
    assert all(v["seconds"] > 0 and v["peak_rss_mib"] > 0 for v in r.values())
    # the statistics' memory: one copy (for auto the pooled one and one per fold, 2 folds) of S
    # (one per input, query and value share it), G and T, in fp32
    d, blocks = 128, 2  # the tiny preset
    one = blocks * (d * d + 2 * (2 * d * d)) * 4 / 2 ** 20
    assert r["cg-lora"]["statistics_mib"] == pytest.approx(one)
    assert r["cg-lora-auto"]["statistics_mib"] == pytest.approx(3 * one)
    total = r["cg-lora"]["statistics"] + r["cg-lora"]["factorization"]
    assert total == pytest.approx(r["cg-lora"]["seconds"], rel=0.1)
    ratio = r["cg-lora"]["seconds"] / r["floor"]["seconds"]
    assert result["ratios"]["cg-lora / floor (time)"] == pytest.approx(ratio)


def test_bench_routes_prints_both_routes_per_width(capsys):
    import bench
    bench.main(["--routes", "16,32"])
    lines = capsys.readouterr().out.splitlines()
    assert "eigh route d^3 / Cholesky route d^3 (7 lambdas)" in lines[0] and [ln.split()[0] for ln in lines[1:]] == ["16", "32"]
