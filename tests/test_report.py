"""results/report.py regenerates every block and figure of results/README.md from the committed rows,
byte for byte: a copy of results/ is rewritten and compared with the checkout's files."""
import shutil
from pathlib import Path

from results import common, report

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_report_rewrites_the_committed_readme_and_figures_unchanged(tmp_path, monkeypatch):
    files = [RESULTS / "README.md", *RESULTS.glob("*.json*"), *RESULTS.glob("*.svg")]
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "README.md").write_text((RESULTS / "README.md").read_text().replace(
        "<!-- /results -->", "STALE\n<!-- /results -->"))  # one block made stale: it is rewritten
    for svg in tmp_path.glob("*.svg"):
        svg.unlink()
    monkeypatch.setattr(common, "HERE", tmp_path)
    report.main()
    for f in files:
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name
