"""Rank allocation: does spending the rank budget where CG-LoRA predicts the loss falls most
(cglora.allocate_ranks; docs/cg-lora.md §3) hold up on examples the allocation never saw, and
does it train better than uniform ranks at equal adapter parameters?

    python results/allocation.py cheap   # split A allocates, split B judges (real and predicted)
    python results/allocation.py grid    # train.py: uniform, --allocate cg-lora, gradient
    python results/allocation.py report  # results/README.md's allocation block, allocation.svg

`cheap` appends one row per (task, seed) to results/allocation.jsonl; `grid` one row per run to
results/allocation-runs.jsonl (the uniform runs are the grid's own, in results/runs.jsonl). A row
already there is skipped.
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cglora  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from results import common, grid, realloss  # noqa: E402
from results.common import BUDGET  # noqa: E402

CHEAP, TRAIN = "allocation.jsonl", "allocation-runs.jsonl"
RULES = ["cg-lora", "gradient"]  # allocate_ranks' scores; the grid's arms besides uniform
TARGETS = ["query", "value"]
CAP = 2  # allocate_ranks' default: each rank <= 2 r
# one layer's top direction moved alone: multiples of its quadratic-model step on A
LAYER_SCALES = sorted(realloss.BELOW + realloss.SCALES)


# ------------------------------------------------------------ cheap: split A allocates, B judges

def splits(task, tokenizer, seed):
    """train.py's seeded calibration batches (8 examples each): A, the 16 it calibrates on, and B,
    the next 16 (its --real_check batches), which A's statistics never saw."""
    encoded = data.encode_examples(data.read_split(task, "train"), tokenizer, BUDGET["max_len"])
    batches = list(data.batches(encoded, BUDGET["calib_batch_size"], tokenizer.pad_id,
                                shuffle=True, seed=seed))
    n = BUDGET["calib_batches"]
    return batches[:n], batches[n:2 * n]


def heldout_ranks(stats, rank, damping=cglora.DAMPING, cap=CAP):
    """allocate_ranks' budget (rank x layers; each layer 1..min(cap r, d_out, d_in)) spent by
    scores judged on held-out folds: Q_l(k), layer l's rank-k CG-LoRA direction fitted on one fold
    and its predicted decrease q on the other, summed over both ways round (stats: folds=2). The
    top-k directions are nested (exact SVD), so one fit per fold gives every k. Q_l need not be
    concave, so the ranks grow greedily by the largest next gain Q_l(k + 1) - Q_l(k)."""
    gains = {}
    for name, st in stats.items():
        k = min(cap * rank, *st.G.shape)
        Q = [0.0] * (k + 1)
        for fit, held in (st.folds, st.folds[::-1]):
            B, A = cglora.direction("cg-lora", fit, k, damping)
            for j in range(1, k + 1):
                Q[j] += cglora.predicted_decrease(B[:, :j], A[:j], held.G, held.S, held.T)
        gains[name] = [b - a for a, b in zip(Q[1:], Q[2:])]  # gains[n][j - 1]: rank j -> j + 1
    ranks = dict.fromkeys(stats, 1)
    for _ in range(rank * len(stats) - len(stats)):  # ties: the earlier layer
        name = max((n for n in stats if ranks[n] <= len(gains[n])),
                   key=lambda n: gains[n][ranks[n] - 1])
        ranks[name] += 1
    return ranks


def judged(model, targets, ranks, stats, test, held, init_norm):
    """The CG-LoRA init at `ranks` (init_adapters from A's statistics, at λ = DAMPING and the grid's
    size) on a copy of the model: sum sigma_i^2 of its directions at λ (what allocate_ranks
    spends the budget on), q of its update on A (in sample) and on B (cglora.predicted_decrease,
    undamped statistics), and train.py's real check on B's batches."""
    model = copy.deepcopy(model)
    layers = cglora.add_lora(model, list(targets), ranks, BUDGET["alpha"],
                             rslora=cglora.RSLORA["cg-lora"])
    rows = cglora.init_adapters(layers, stats, "cg-lora", init_norm=init_norm)
    sigma2 = sum(cglora.cg_lora_factors(st.G, st.S, st.T, ranks[n])[2].square().sum().item()
                 for n, st in stats.items())
    q = lambda on: sum(cglora.predicted_decrease(m.lora_B, m.lora_A, on[n].G, on[n].S,  # noqa
                                                 on[n].T) for n, m in layers.items())
    real = train.real_check(model, layers, rows, held, lambda *_: None)
    return dict(ranks=[ranks[n] for n in targets], sigma2=sigma2, q_A=q(stats), q_B=q(test),
                real=real["real_decrease"], real_scale=real["real_best_scale"],
                real_at_init=real["real_loss_at_W0"] - real["real_loss_at_init"])


def top_directions(model, targets, stats, test, held):
    """Each layer's top CG-LoRA direction (rank 1, A's statistics at λ = DAMPING), moved alone:
    its predicted decrease sigma_1^2 / 2 on A, its q on B, and its real decrease on B, the loss at
    W0 less the least over LAYER_SCALES multiples of its quadratic-model step on A."""
    model = copy.deepcopy(model)
    layers = cglora.add_lora(model, list(targets), 1, BUDGET["alpha"],
                             rslora=cglora.RSLORA["cg-lora"])
    out = {}
    for name, st in stats.items():
        B, A, sigma, _ = cglora.cg_lora_factors(st.G, st.S, st.T, 1)
        step = -(B * (st.G @ A.T)).sum() / ((B.T @ st.T @ B) * (A @ st.S @ A.T)).sum()
        at_W0, losses = cglora.real_decrease(
            model, layers, {name: (step * B / layers[name].scaling, A)}, held, LAYER_SCALES)
        best = min(losses, key=losses.get)
        out[name] = dict(predicted=sigma[0].item() ** 2 / 2, real=at_W0 - losses[best],
                         scale=best, q_B=cglora.predicted_decrease(B, A, test[name].G,
                                                                   test[name].S, test[name].T))
    return out


def cheap(task_name, seed, pretrained, init_norm):
    """One (task, seed): uniform ranks against allocate_ranks' two scores and the held-out-fold
    rule, each judged on B; every layer's top direction, predicted against real."""
    key = dict(task=task_name, seed=seed)
    if common.has_row(CHEAP, **key):
        return
    t0, rank = time.time(), BUDGET["rank"]
    task = data.get_task(task_name)
    A, B = splits(task, data.load_tokenizer(pretrained), seed)
    torch.manual_seed(seed)  # the fresh head, as train.py
    model = models.from_pretrained(pretrained, task.num_labels)
    targets = cglora.target_layers(model, TARGETS, torch.nn.Linear)
    stats = cglora.collect_statistics(model, targets, A, folds=2)
    test = cglora.collect_statistics(model, targets, B)
    rules = {"uniform": dict.fromkeys(targets, rank),
             **{r: cglora.allocate_ranks(stats, rank, cap=CAP, score=r) for r in RULES},
             "held-out folds": heldout_ranks(stats, rank)}
    out = {r: judged(model, targets, ranks, stats, test, B, init_norm)
           for r, ranks in rules.items()}
    for r, x in out.items():
        print(f"{task.name} seed {seed} {r}: ranks {x['ranks']}, sigma2 {x['sigma2']:.3f}, "
              f"q_A {x['q_A']:.3f}, q_B {x['q_B']:.3f}, real {x['real']:.4f}", flush=True)
    row = dict(key, calibration=len(A) * BUDGET["calib_batch_size"],
               held_out=len(B) * BUDGET["calib_batch_size"], rank=rank, alpha=BUDGET["alpha"],
               damping=cglora.DAMPING, init_norm=init_norm, cap=CAP, layer_names=list(targets),
               rules=out, top=top_directions(model, targets, stats, test, B),
               seconds=time.time() - t0,
               command=f"python results/allocation.py cheap --tasks {task.name} --seeds {seed}")
    common.append_row(CHEAP, row)


def arms():
    """The grid's CG-LoRA setting at λ = 1 (its rate and init size, as results/grid.py chose them)
    for the uniform arm and each allocation rule: (allocate or None, rows file, lr, init_norm)."""
    rows = common.read_rows(grid.RUNS)
    rates = grid.best_rates(rows)
    lr, norm = rates["cg-lora"], grid.best_sizes(rows, rates).get("cg-lora")
    return [(None, grid.RUNS, lr, norm)] + [(rule, TRAIN, lr, norm) for rule in RULES]


# ------------------------------------------------------------ report

ORDER = ["uniform", *RULES, "held-out folds"]
COLOURS = {"cg-lora": "#d62728", "gradient": "#1f77b4"}
DASH = {"cola": "", "sts-b": "5,3"}


def cheap_table(rows):
    """Each rule against uniform, per task: ratios to uniform's in the same (task, seed)."""
    text = ["| task | rule | ranks, seed 0 | Σσ² on A ÷ uniform | q on A ÷ uniform | "
            "q on B ÷ uniform | real decrease on B (best multiple, per seed) | ÷ uniform | "
            "real decrease at init size | ÷ uniform |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in sorted({r["task"] for r in rows}, key=common.TASKS.index):
        runs = sorted((r for r in rows if r["task"] == t), key=lambda r: r["seed"])
        for rule in ORDER:
            x = [r["rules"][rule] for r in runs]
            ratio = lambda k: common.mean_se([a[k] / r["rules"]["uniform"][k]  # noqa: E731
                                              for a, r in zip(x, runs)], 2)
            scales = ", ".join(f"{a['real_scale']:g}" for a in x)
            text.append(f"| {t} | {rule} | {' '.join(map(str, x[0]['ranks']))} | "
                        f"{ratio('sigma2')} | {ratio('q_A')} | {ratio('q_B')} | "
                        f"{common.mean_se([a['real'] for a in x], 4)}, at {scales}× | "
                        f"{ratio('real')} | {common.mean_se([a['real_at_init'] for a in x], 4)} | "
                        f"{ratio('real_at_init')} |")
    return text


def layer_table(rows):
    """Across layers, per (task, seed): Spearman of each layer's predicted decrease of its top
    direction (sigma_1^2 / 2 on A; its q on B) against its real decrease on B."""
    text = ["| task | seed | Spearman: σ₁²/2 on A vs real on B | q on B vs real on B | "
            "real ÷ σ₁²/2, median over layers |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (common.TASKS.index(r["task"]), r["seed"])):
        top = [r["top"][n] for n in r["layer_names"]]
        real = [x["real"] for x in top]
        text.append(f"| {r['task']} | {r['seed']} | "
                    f"{common.spearman([x['predicted'] for x in top], real):.2f} | "
                    f"{common.spearman([x['q_B'] for x in top], real):.2f} | "
                    f"{statistics.median(x['real'] / x['predicted'] for x in top):.2g} |")
    return text


def runs_by_arm():
    """{(task, arm): {seed: row}}: the uniform arm's runs from the grid's rows, the others'."""
    (_, _, lr, norm), rows = arms()[0], common.read_rows(TRAIN)
    uniform = [r for r in common.read_rows(grid.RUNS) if grid.matches(
        r, method="cg-lora", lr=lr, damping=cglora.DAMPING, init_norm=norm)]
    out = {}
    for r in uniform + rows:
        out.setdefault((r["task"], r.get("allocate") or "uniform"), {})[r["seed"]] = r
    return out


def grid_table(runs):
    text = ["| task | arm | dev metric (mean ± SE, seeds) | − uniform, paired by seed | "
            "epoch 1 | epoch 1 − uniform |", "|---|---|---|---|---|---|"]
    for t in sorted({t for t, _ in runs}, key=common.TASKS.index):
        ref = runs.get((t, "uniform"), {})
        for arm in ["uniform", *RULES]:
            rs = list(runs.get((t, arm), {}).values())
            text.append(f"| {t} | {arm} | {common.mean_se([grid.score(r) for r in rs])} | "
                        + ("—" if arm == "uniform" else common.paired(rs, ref, grid.score))
                        + f" | {common.mean_se([grid.score(r, 1) for r in rs])} | "
                        + ("—" if arm == "uniform" else common.paired(
                            rs, ref, lambda r: grid.score(r, 1))) + " |")
    return text


def curves(runs):
    """Each rule minus uniform at every evaluation (paired by seed): mean ± standard error."""
    series = {}
    for (t, arm), rs in sorted(runs.items()):
        ref = runs.get((t, "uniform"), {})
        seeds = [s for s in sorted(rs) if s in ref]
        if arm == "uniform" or not seeds:
            continue
        steps = [h["step"] for h in rs[seeds[0]]["history"]]
        diffs = [[grid.score(rs[s], e) - grid.score(ref[s], e) for e in range(len(steps))]
                 for s in seeds]
        series[f"{t}: {arm} − uniform"] = (COLOURS[arm], DASH.get(t, ""), [
            (steps[i], m, se) for i, m, se in common.mean_curve(diffs)])
    return series


def report():
    """results/README.md's allocation block and allocation.svg from the rows."""
    rows, runs = common.read_rows(CHEAP), runs_by_arm()
    text = [f"`python results/allocation.py cheap`, then `report`, over {len(rows)} rows of "
            "`results/allocation.jsonl`: all-MiniLM-L6-v2, query+value, r = 8, cap 2r, λ = 1; "
            "split A = train.py's 128 calibration examples, B = the next 128. Each rule's ranks "
            "(layer order: block 0 query, value, block 1 ...) from A, the CG-LoRA init at them "
            "from A (init size 0.3), judged on B: K-FAC's q (undamped statistics) and the real "
            "loss decrease along the init's quadratic-model step multiples (train.py's real "
            "check, best of 0.001–100×) and at the init's own size. Mean ± SE over seeds:\n",
            *cheap_table(rows),
            "\nEach layer's top direction moved alone, predicted against real (12 layers):\n",
            *layer_table(rows),
            "\n`python results/allocation.py grid` (train.py, the grid's budget, lr and init "
            "size; uniform: the grid's own λ = 1 runs in `results/runs.jsonl`; the others in "
            "`results/allocation-runs.jsonl`): main dev metric after the last epoch and after "
            "epoch 1, differences paired by seed:\n", *grid_table(runs)]
    if series := curves(runs):
        common.write_figure("allocation.svg", common.band_svg(
            series, "dev metric, allocated − uniform (paired by seed, ± SE)"))
        text.append("\n![allocated minus uniform during training](allocation.svg)")
    return common.write_block("allocation", "\n".join(text) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["cheap", "grid", "report"])
    args = common.arguments(p).parse_args(argv)
    if args.command == "report":
        return print(report())
    pretrained = args.pretrained or common.minilm()
    if args.command == "cheap":
        common.parallel(cheap, [(t, int(s), pretrained, arms()[0][3]) for s in
                                args.seeds.split(",") for t in args.tasks.split(",")],
                        args.workers)
    if args.command == "grid":
        jobs = [(t, "cg-lora", int(s), lr, pretrained, cglora.DAMPING, norm, rule, rows)
                for s in args.seeds.split(",") for t in args.tasks.split(",")
                for rule, rows, lr, norm in arms()]
        common.parallel(grid.run, jobs, args.workers)


if __name__ == "__main__":
    main()
