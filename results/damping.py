"""The damping rule: how much calibration the damping search needs, and why a fixed λ = 1 is the
default (cglora.DAMPING; docs/cg-lora.md §8.1).

    python results/damping.py diagnose --tasks cola,sts-b   # N examples, judged on 512 more
    python results/damping.py report   # results/README.md's damping block

`diagnose` fits CG-LoRA's and LoRA-One's directions on N training examples and judges them on the
next HELD_OUT, which no calibration saw; a row already in results/diagnostics.jsonl is skipped.
The report also pairs, seed by seed, the grid's CG-LoRA runs at λ = 1 with the same runs at the
searched λ (results/runs.jsonl), and counts which λ had the largest real decrease in
results/realloss.jsonl.
"""
import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cglora  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
from results import common, grid  # noqa: E402
from results.common import BUDGET, HELD_OUT  # noqa: E402

DIAGNOSTICS, REALLOSS = "diagnostics.jsonl", "realloss.jsonl"


def diagnose(task_name, calibration, seed, pretrained):
    """CG-LoRA's and LoRA-One's initial directions from `calibration` training examples (train.py's
    seeded shuffle, batches of 8), judged on the next HELD_OUT examples: q of §8, per damping."""
    task = data.get_task(task_name)
    if common.has_row(DIAGNOSTICS, task=task.name, calibration=calibration, seed=seed):
        return
    tokenizer = data.load_tokenizer(pretrained)
    encoded = data.encode_examples(data.read_split(task, "train"), tokenizer, BUDGET["max_len"])
    batches = list(data.batches(encoded, 8, tokenizer.pad_id, shuffle=True, seed=seed))
    n = calibration // 8
    calib, held = batches[:n], batches[n:n + HELD_OUT // 8]
    torch.manual_seed(seed)
    model = models.from_pretrained(pretrained, task.num_labels)
    layers = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("query", "value")}
    t0 = time.perf_counter()
    stats = cglora.collect_statistics(model, layers, calib, folds=2)
    seconds = time.perf_counter() - t0
    test = cglora.collect_statistics(model, layers, held)
    ranks = {n: BUDGET["rank"] for n in layers}
    t0 = time.perf_counter()  # the damping choice and the diagnostics at it
    chosen, table = cglora.choose_damping(stats, ranks)
    rows = cglora.diagnose(stats, ranks, "cg-lora", chosen)
    select_seconds = time.perf_counter() - t0
    one = cglora.diagnose(stats, ranks, "lora-one")

    def judged(method, damping):  # held-out q, summed over layers, of the direction fitted on all
        return sum(cglora.predicted_decrease(*cglora.direction(method, stats[n], ranks[n], damping),
                                             test[n].G, test[n].S, test[n].T) for n in layers)
    overlap = lambda rs: [statistics.mean(r[k] for r in rs.values())  # noqa: E731
                          for k in ("overlap_left", "overlap_right")]
    q_one = judged("lora-one", None)
    row = dict(task=task.name, calibration=calibration, seed=seed, held_out=len(held) * 8,
               damping=chosen, statistics_seconds=seconds, selection_seconds=select_seconds,
               overlap=overlap(rows), overlap_lora_one=overlap(one),
               kfold_ratio=sum(r["heldout"] for r in rows.values())
               / sum(r["heldout_lora_one"] for r in rows.values()),
               heldout_ratio={f"{lam:g}": judged("cg-lora", lam) / q_one
                              for lam in cglora.DAMPING_GRID},
               kfold_by_damping={f"{lam:g}": q for lam, q in table.items()})
    row["heldout_ratio_chosen"] = row["heldout_ratio"][f"{chosen:g}"]
    common.append_row(DIAGNOSTICS, row)
    print(f"{task.name} calibration {calibration}: damping {chosen:g}, held-out q / LoRA-One's "
          f"{row['heldout_ratio_chosen']:.2f} (K-fold {row['kfold_ratio']:.2f}), overlap "
          f"{row['overlap'][0]:.2f}/{row['overlap'][1]:.2f} (LoRA-One "
          f"{row['overlap_lora_one'][0]:.2f}/{row['overlap_lora_one'][1]:.2f}), statistics "
          f"{seconds:.1f} s, selection {select_seconds:.1f} s", flush=True)


def calibration_table():
    """diagnostics.jsonl: the search's choice and its held-out ratio per calibration size."""
    text = ["| task | calibration examples | damping chosen | held-out q ÷ LoRA-One's, at it | "
            "best damping on the unseen examples (ratio) | 2-fold estimate | split-half overlap "
            "L / R: cg-lora | lora-one | statistics, damping choice (s) |",
            "|---|---|---|---|---|---|---|---|---|"]
    rows = common.read_rows(DIAGNOSTICS)
    for d in sorted(rows, key=lambda d: (common.TASKS.index(d["task"]), d["calibration"])):
        best = max(d["heldout_ratio"], key=d["heldout_ratio"].get)
        text.append(
            f"| {d['task']} | {d['calibration']} | {d['damping']:g} | "
            f"{d['heldout_ratio_chosen']:.2f} | {best} ({d['heldout_ratio'][best]:.2f}) | "
            f"{d['kfold_ratio']:.2f} | {d['overlap'][0]:.2f} / {d['overlap'][1]:.2f} | "
            f"{d['overlap_lora_one'][0]:.2f} / {d['overlap_lora_one'][1]:.2f} | "
            f"{d['statistics_seconds']:.0f}, {d['selection_seconds']:.0f} |")
    return text


def counts(counter):  # "1 (6), 10 (5)": most frequent first
    return ", ".join(f"{k:g} ({n})" for k, n in counter.most_common())


def rule():
    """The rule behind the default: the search's choices over the grid and the real-loss rows, the
    damping with the largest real decrease there, and the grid's CG-LoRA at λ = 1 against the same
    seeds at the searched λ (init size 0.3, the grid's rate)."""
    runs = common.read_rows(grid.RUNS)
    searched = list({(r["task"], r["seed"]): r["chosen_damping"] for r in runs
                     if r.get("chosen_damping") and grid.matches(
                         r, method="cg-lora", damping="auto", init_norm=None)}.values())
    real = common.read_rows(REALLOSS)
    best = Counter()
    for r in real:
        at = {d["damping"]: d["real"]["decrease"] for d in r["directions"]
              if d["method"] == "cg-lora"}
        best[max(at, key=at.get)] += 1
    text = [f"The search's choice: over the grid's {len(searched)} CG-LoRA runs at the default "
            f"size {counts(Counter(searched))}; over the {len(real)} real-loss rows "
            f"{counts(Counter(r['damping_auto'] for r in real))}. The λ with the largest real "
            f"decrease in those rows: {counts(best)}.\n",
            "| task | seeds | dev at λ = 1 − at the searched λ, per seed | mean ± standard error |",
            "|---|---|---|---|"]
    rate = grid.best_rates(runs)["cg-lora"]
    for task in ("cola", "sts-b"):
        at = {d: {r["seed"]: grid.score(r) for r in runs if grid.matches(
            r, task=task, method="cg-lora", damping=d, lr=rate, init_norm=0.3)}
              for d in ("auto", 1.0)}
        seeds = sorted(set(at["auto"]) & set(at[1.0]))
        if len(seeds) > 1:
            diff = [at[1.0][k] - at["auto"][k] for k in seeds]
            text.append(f"| {task} | {', '.join(map(str, seeds))} | " + ", ".join(
                f"{at[1.0][k]:.4f} − {at['auto'][k]:.4f}" for k in seeds) + " | "
                f"{statistics.mean(diff) + 0.0:+.4f} ± "  # + 0.0: no -0.0000
                f"{statistics.stdev(diff) / len(diff) ** 0.5:.4f} |")
    return text


def report():
    """results/README.md's damping block from diagnostics.jsonl, runs.jsonl and realloss.jsonl."""
    text = "\n".join(
        [f"`python results/damping.py report` over {len(common.read_rows(DIAGNOSTICS))} rows of "
         "`results/diagnostics.jsonl` (`python results/damping.py diagnose`), the grid's rows and "
         "the real-loss rows. Calibration size: CG-LoRA's and LoRA-One's directions fitted on the "
         f"first N training examples of the seed-0 shuffle, judged on the next {HELD_OUT}, which "
         "no calibration saw (seed 0; times on the loaded 2-core CPU):\n"]
        + calibration_table() + [""] + rule()) + "\n"
    return common.write_block("damping", text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["diagnose", "report"])
    p.add_argument("--calibration", default="128,512,2048", help="diagnose: calibration sizes")
    args = common.arguments(p).parse_args(argv)
    if args.command == "report":
        return print(report())
    pretrained = args.pretrained or common.minilm()
    common.parallel(diagnose, [(t, int(n), 0, pretrained) for t in args.tasks.split(",")
                               for n in args.calibration.split(",")], args.workers)


if __name__ == "__main__":
    main()
