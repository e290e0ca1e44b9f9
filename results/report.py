"""Regenerate every generated block and figure of results/README.md from the committed rows.

    python results/report.py

Each question's file has the report it calls (`python results/<question>.py report`) and the
command that reruns its experiment; this one needs no data, model or network, and in a clean
checkout it leaves `git status` clean.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results import allocation, cost, damping, early, funcspace, grid, qlora, realloss  # noqa: E402

QUESTIONS = [grid, damping, realloss, early, funcspace, qlora, allocation, cost]  # README's order


def main():
    for question in QUESTIONS:
        question.report()
        print(f"results/{Path(question.__file__).name}: its block of results/README.md rewritten")


if __name__ == "__main__":
    main()
