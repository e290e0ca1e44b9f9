"""The training grid: every init method trained by train.py on GLUE tasks, seeds and rates.

    python results/grid.py sweep    # CoLA, seed 0: each method's candidate and sensitivity rates
    python results/grid.py sizes    # CG-LoRA's and LoRA-One's init sizes on CoLA and STS-B (seed 0)
    python results/grid.py grid --tasks cola,mrpc,rte,sts-b   # seeds 0-2 at each method's best rate
    python results/grid.py report   # results/README.md's grid block and cola_curves.svg

Each finished run appends one row to results/runs.jsonl; a run already there is skipped, so an
interrupted grid continues where it stopped. results/runs-superseded.jsonl holds the rows of
CG-LoRA's earlier versions, which the report summarises apart.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results import common  # noqa: E402
from results.common import BUDGET, mean_std  # noqa: E402

RUNS, SUPERSEDED = "runs.jsonl", "runs-superseded.jsonl"
METHODS = ["lora", "rslora", "lora-ga", "lora-one", "cg-lora", "cg-lora-shift", "full"]
RATES = {m: [1e-3, 3e-3] for m in ("lora", "rslora", "lora-one", "cg-lora", "cg-lora-shift")}
RATES.update({"lora-ga": [5e-5, 2e-4], "full": [2e-5, 5e-5]})  # LoRA-GA: full-FT-like rates
# the paper claims CG-LoRA is less sensitive to the rate on CoLA: `sweep` also runs these, but the
# grid's rate is chosen among RATES only (the grid ran before they were added)
SENSITIVITY = {m: [5e-4, 2e-3] for m in ("lora", "rslora", "lora-one", "cg-lora", "cg-lora-shift")}
BASELINES = ["lora", "rslora", "lora-ga", "lora-one", "full"]  # what the report compares with
# The grid ran CG-LoRA with the damping chosen on held-out folds (--damping auto); train.py's
# default is now the fixed 1.0, so the grid names its damping. Rows without a damping key ran at
# the fixed 1e-2 of CG-LoRA's first version.
DAMPING = "auto"
OLD_DAMPING = 1e-2
SIZED = ["cg-lora", "lora-one"]  # init_norm (LoRA-One's gamma) swept on CoLA and STS-B, seed 0
INIT_NORMS = [None, 0.3]  # None: LoRA-One's own size, alpha / (sqrt(r) 128) = 0.044 here
# CG-LoRA's rate where no sweep row says otherwise: the sweep of its earlier version (damping 1e-2,
# randomized SVD; rows in runs-superseded.jsonl) chose 1e-3 for both variants
SWEPT_BEFORE = {"cg-lora": 1e-3, "cg-lora-shift": 1e-3}
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f"]


def matches(row, **key):
    """A stored row has this key (rows from before a key existed have its old default)."""
    default = dict(damping=OLD_DAMPING, init_norm=None, allocate=None)
    if not key.get("method", row["method"]).startswith("cg-lora"):
        key.pop("damping", None)  # only CG-LoRA has a damping
    return all(row.get(k, default.get(k)) == v for k, v in key.items())


def run(task, method, seed, lr, pretrained, damping=DAMPING, init_norm=None, allocate=None,
        file=RUNS):
    """One train.py run at BUDGET, in its own process, and its row in results/`file` (allocate:
    train.py's --allocate, its per-layer ranks in the row)."""
    key = dict(task=task, method=method, seed=seed, lr=lr, damping=damping, init_norm=init_norm,
               **({"allocate": allocate} if allocate else {}))  # older rows have no allocate
    if any(matches(r, **key) for r in common.read_rows(file)):
        return
    name = (f"{task}-{method}-s{seed}-lr{lr:g}" + ("" if init_norm is None else f"-n{init_norm:g}")
            + (f"-a{allocate}" if allocate else ""))
    args = ["--task", task, "--init", method, "--seed", str(seed), "--lr", str(lr),
            "--damping", str(damping), "--log_every", "100000", "--overwrite"]
    # --overwrite: a run that is not in `file` failed or was stopped, and its folder is run again
    args += ["--init_norm", str(init_norm)] if init_norm is not None else []
    args += ["--allocate", allocate] if allocate else []
    args += [a for k, v in BUDGET.items() for a in (f"--{k}", str(v))]
    out = common.HERE / "runs" / name
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(common.ROOT / "train.py"), *args,
                           "--pretrained", pretrained, "--out", str(out)],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: train.py {' '.join(args)}\n{proc.stderr[-3000:]}")
    row = dict(key, **recorded(out, time.time() - t0),
               # the command as run from the repository root
               command=f"python train.py {' '.join(args)} --pretrained <all-MiniLM-L6-v2> "
                       f"--out results/runs/{name}")
    common.append_row(file, row)
    print(f"{task} {method} seed {seed} lr {lr:g} init_norm {init_norm}: "
          f"{main_key(row['history'][-1])} {score(row):.4f} ({row['wall_seconds']:.0f} s)",
          flush=True)


def recorded(out, wall_seconds):
    """What a finished train.py run's folder says: its evaluations, init time and captured
    energy, the damping search's diagnostics, the allocated ranks (--allocate)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    init = json.loads((out / "init.json").read_text())
    summary = init.get("summary", {})  # train.py's totals of the calibration diagnostics
    diagnostics = dict(
        chosen_damping=init.get("damping"),
        overlap=[summary["overlap_left"], summary["overlap_right"]],
        heldout_ratio=summary["heldout_ratio"], insample_ratio=summary["insample_ratio"],
    ) if "heldout_ratio" in summary else {}
    if "rank_sum" in summary:  # --allocate: the ranks, layer by layer
        diagnostics.update(ranks={r["layer"]: r["rank"] for r in init["layers"]})
    return dict(budget=BUDGET, history=[r for r in lines if r.get("kind", "eval") == "eval"],
                init_seconds=init["seconds"], captured=[
                    r["captured"] for r in init["layers"] if r.get("captured") is not None],
                **diagnostics, wall_seconds=wall_seconds)


def main_key(entry):  # the task's main dev metric in a metrics.jsonl entry: the first after "dev_"
    return next(k for k in entry if k.startswith("dev_") and k != "dev_loss")


def score(row, epoch=None):  # the main metric after `epoch` (None: the last)
    entry = [h for h in row["history"] if epoch is None or h["epoch"] == epoch][-1]
    return entry[main_key(entry)]


def best_rates(rows):
    """Each method's best candidate rate on CoLA, seed 0, at its default size."""
    sweep = [r for r in rows if r["task"] == "cola" and r["seed"] == 0
             and r.get("init_norm") is None]
    candidates = {m: [r for r in sweep if r["method"] == m and r["lr"] in RATES[m]]
                  for m in METHODS}
    return {**SWEPT_BEFORE, **{m: max(rs, key=score)["lr"] for m, rs in candidates.items() if rs}}


def best_sizes(rows, rates):
    """Each SIZED method's init_norm with the best mean over CoLA and STS-B (seed 0)."""
    def mean_score(m, n):
        runs = [r for r in rows if r["task"] in ("cola", "sts-b") and
                matches(r, method=m, seed=0, lr=rates[m], damping=DAMPING, init_norm=n)]
        return statistics.mean(score(r) for r in runs) if len(runs) == 2 else None
    best = {m: max(INIT_NORMS, key=lambda n: mean_score(m, n)) for m in SIZED
            if all(mean_score(m, n) is not None for n in INIT_NORMS)}
    if "cg-lora" in best:
        best["cg-lora-shift"] = best["cg-lora"]  # the shift changes W0, not the update's size
    return best


def difference(a, b, epoch=None):
    """cg-lora's runs minus a baseline's: the difference of the means ± its standard error."""
    if len(a) < 2 or len(b) < 2:
        return "—"
    xa, xb = [score(r, epoch) for r in a], [score(r, epoch) for r in b]
    se = (statistics.variance(xa) / len(xa) + statistics.variance(xb) / len(xb)) ** 0.5
    d = round(statistics.mean(xa) - statistics.mean(xb), 3) + 0.0  # + 0.0: a rounded -0.0 as +0.000
    return f"{d:+.3f} ± {se:.3f}"


def cell(runs, epoch=None):  # mean ± std of the main metric (after `epoch`, default the last)
    return f"{mean_std([score(r, epoch) for r in runs])} ({len(runs)})" if runs else "—"


def report():
    """results/README.md's grid block and cola_curves.svg from results/runs.jsonl. A method is shown
    at its best init size once the grid there covers every (task, seed) its default size's grid
    does, else at its default size, and the text says so."""
    rows = common.read_rows(RUNS)
    rates = best_rates(rows)

    def grid(t, m, n):  # method m's grid runs on task t at init size n, in seed order
        return sorted((r for r in rows if matches(r, task=t, method=m, lr=rates.get(m),
                                                  damping=DAMPING, init_norm=n)),
                      key=lambda r: r["seed"])
    best = best_sizes(rows, rates)
    def covered(m, n):  # the (task, seed) pairs of m's grid at init size n
        return {(r["task"], r["seed"]) for t in common.TASKS for r in grid(t, m, n)}
    sizes = {m: n for m, n in best.items() if (at := covered(m, n)) and at >= covered(m, None)}
    not_run = [f"{m} {n:g}" for m, n in best.items() if n is not None and m not in sizes]
    tasks = sorted({r["task"] for r in rows}, key=common.TASKS.index)
    pick = {(t, m): grid(t, m, sizes.get(m)) for t in tasks for m in METHODS}
    text = [
        f"`python results/grid.py report` over {len(rows)} runs in `results/runs.jsonl` "
        + timing(rows, tasks) + " all-MiniLM-L6-v2, rank 8, α 16, query+value, "
        f"{BUDGET['epochs']} epochs, batch {BUDGET['batch_size']}, max length {BUDGET['max_len']}, "
        f"{BUDGET['calib_batches']}x{BUDGET['calib_batch_size']} calibration examples, CG-LoRA at "
        "damping auto. Main dev metric (CoLA MCC, RTE/SST-2 accuracy, MRPC F1, STS-B Pearson) "
        "after the last epoch and after epoch 1: mean ± std over seeds (number of seeds), each "
        "method at its best CoLA seed-0 rate and, for CG-LoRA and LoRA-One, its best init size "
        "(below) where the grid has run at it"
        + (f"; the best init size of {', '.join(not_run)} has not been run on every task and seed "
           "of the grid yet, so the table shows the default size" if not_run else "") + ".\n",
        "| method | lr | init_norm | " + " | ".join(tasks) + " | "
        + " | ".join(f"{t}, epoch 1" for t in tasks) + " |",
        "|---|---|---|" + "---|" * 2 * len(tasks)]
    for m in METHODS:
        size = "—" if m not in SIZED + ["cg-lora-shift"] else \
            f"{sizes[m]:g}" if sizes.get(m) else "default"
        text.append(f"| {m} | {rates.get(m, '—')} | {size} | " + " | ".join(
            [cell(pick[t, m]) for t in tasks] + [cell(pick[t, m], 1) for t in tasks]) + " |")
    text += ["\nCG-LoRA minus each baseline, difference of the means ± its standard error "
             "(√(s₁²/n₁ + s₂²/n₂)); a difference inside ±2 standard errors is not a win"
             + ("; where CG-LoRA's best init size is not the default, its default-size grid is "
                "compared too" if sizes.get("cg-lora") is not None else "") + ":\n",
             "| task | " + " | ".join(f"cg-lora − {b}" for b in BASELINES) + " |",
             "|---|" + "---|" * len(BASELINES)]
    for t in tasks:
        for epoch, name in ((None, t), (1, f"{t}, epoch 1")):
            text.append(f"| {name} | " + " | ".join(
                difference(pick[t, "cg-lora"], pick[t, b], epoch) for b in BASELINES) + " |")
        if sizes.get("cg-lora") is not None:  # also at the size LoRA-One and the others start from
            text.append(f"| {t}, cg-lora at the default size | " + " | ".join(
                difference(grid(t, "cg-lora", None), pick[t, b]) for b in BASELINES) + " |")
    text += diagnostics_table(tasks, pick) + sizes_table(rows, rates) + sweep_table(rows)
    text += superseded_table() + ["\n![CoLA dev MCC per epoch](cola_curves.svg)"]
    common.write_block("results", "\n".join(text) + "\n")
    cola = {m: pick["cola", m] for m in METHODS if pick.get(("cola", m))}
    common.write_figure("cola_curves.svg", common.lines_svg({m: [
        (e, statistics.mean(h["dev_mcc"] for r in rr for h in r["history"] if h["epoch"] == e))
        for e in sorted({h["epoch"] for r in rr for h in r["history"]})] for m, rr in cola.items()},
        COLOURS))
    return "\n".join(text) + "\n"


def timing(rows, tasks):  # the median is robust to a stalled run
    per_task = {t: [r["wall_seconds"] for r in rows if r["task"] == t] for t in tasks}
    minutes = sum(len(s) * statistics.median(s) for s in per_task.values()) / 60
    return ("(median per run on the 2-core CPU: " + ", ".join(
        f"{t} {statistics.median(s):.0f} s" for t, s in per_task.items())
        + f"; about {minutes:.0f} CPU minutes in all).")


def diagnostics_table(tasks, pick):  # train.py's calibration diagnostics, as the grid's rows hold
    text = ["\nCG-LoRA's calibration diagnostics in these runs (mean over seeds; §8 of the "
            "derivation):\n",
            "| task | chosen damping (per seed) | split-half overlap L / R: cg-lora | lora-one | "
            "held-out q ÷ LoRA-One's (2-fold) | in-sample q ÷ LoRA-One's |",
            "|---|---|---|---|---|---|"]
    mean = lambda runs, f: statistics.mean(f(r) for r in runs)  # noqa: E731
    overlap = lambda runs: (f"{mean(runs, lambda r: r['overlap'][0]):.2f} / "  # noqa: E731
                            f"{mean(runs, lambda r: r['overlap'][1]):.2f}")
    for t in tasks:
        cg = pick[t, "cg-lora"]
        one = [r for r in pick[t, "lora-one"] if "overlap" in r]  # older rows have none
        if cg and all("overlap" in r for r in cg):
            lams = ", ".join(f"{r['chosen_damping']:g}" for r in cg)
            text.append(f"| {t} | {lams} | {overlap(cg)} | {overlap(one) if one else '—'} | "
                        f"{mean(cg, lambda r: r['heldout_ratio']):.2f} | "
                        f"{mean(cg, lambda r: r['insample_ratio']):.2f} |")
    return text


def sizes_table(rows, rates):
    text = ["\nInit size `‖s·B·A‖₂` (seed 0; a method's best mean over the two tasks is the size "
            "its grid runs at):\n", "| method | init_norm | cola | sts-b |", "|---|---|---|---|"]
    for m in SIZED:
        for n in INIT_NORMS:
            runs = {t: [r for r in rows if matches(r, task=t, method=m, seed=0, lr=rates.get(m),
                                                   damping=DAMPING, init_norm=n)]
                    for t in ("cola", "sts-b")}
            text.append(f"| {m} | {'default (0.044)' if n is None else n} | " + " | ".join(
                f"{score(runs[t][0]):.3f}" if runs[t] else "—" for t in ("cola", "sts-b")) + " |")
    return text


def sweep_table(rows):
    text = ["\nCoLA learning-rate sweep:\n",
            "| method | dev MCC at each rate (seed 0; **bold**: a rate the grid chose among) |",
            "|---|---|"]
    for m in METHODS:
        runs = sorted((r for r in rows if matches(r, task="cola", seed=0, method=m,
                                                  damping=DAMPING, init_norm=None)),
                      key=lambda r: r["lr"])
        text.append(f"| {m} | " + ", ".join(
            (f"**{r['lr']:g}**" if r["lr"] in RATES[m] else f"{r['lr']:g}") + f": {score(r):.3f}"
            for r in runs) + " |")
    return text


def superseded_table():
    """CG-LoRA's earlier versions (damping 1e-2 with a randomized SVD, or another damping, before
    the exact top r): their rows, kept apart so that the grid above compares one version."""
    rows = common.read_rows(SUPERSEDED)
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], r.get("damping"), r["lr"]), []).append(r)
    text = [f"\nSuperseded runs (`results/runs-superseded.jsonl`, {len(rows)} rows; damping — : "
            "the version before the key existed): main dev metric, mean ± std (number of runs):\n",
            "| task | method | damping | lr | dev |", "|---|---|---|---|---|"]
    for (t, m, d, lr), rr in sorted(groups.items(), key=lambda g: (
            common.TASKS.index(g[0][0]), g[0][1], str(g[0][2]), g[0][3])):
        text.append(f"| {t} | {m} | {'—' if d is None else d} | {lr:g} | {cell(rr)} |")
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["sweep", "sizes", "grid", "report"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--default_size", action="store_true",
                   help="grid: every method at its default init size")
    p.add_argument("--damping", default=None, help="grid: CG-LoRA's damping (default: auto)")
    args = common.arguments(p, tasks="cola,rte,mrpc,sts-b").parse_args(argv)
    if args.command == "report":
        return print(report())
    pretrained, methods = args.pretrained or common.minilm(), args.methods.split(",")
    rows = common.read_rows(RUNS)
    rates = best_rates(rows)
    if args.command == "sweep":
        jobs = [("cola", m, 0, lr, pretrained) for m in methods
                for lr in RATES[m] + SENSITIVITY.get(m, [])]
    elif args.command == "sizes":
        jobs = [(t, m, 0, rates[m], pretrained, DAMPING, n) for t in args.tasks.split(",")
                if t in ("cola", "sts-b") for m in SIZED for n in INIT_NORMS]
    else:
        sizes = {} if args.default_size else best_sizes(rows, rates)
        if missing := [m for m in methods if m not in rates]:
            sys.exit(f"no CoLA sweep for {', '.join(missing)}: run "
                     "`python results/grid.py sweep` first")
        if missing := [m for m in methods if m in SIZED + ["cg-lora-shift"] and m not in sizes
                       and not args.default_size]:
            sys.exit(f"no init-size sweep for {', '.join(missing)}: run "
                     "`python results/grid.py sizes` first")
        fixed = float(args.damping) if args.damping else None
        jobs = [(t, m, int(s), rates[m], pretrained,
                 fixed if fixed is not None and m.startswith("cg-lora") else DAMPING, sizes.get(m))
                for t in args.tasks.split(",") for s in args.seeds.split(",") for m in methods]
    common.parallel(run, jobs, args.workers)


if __name__ == "__main__":
    main()
