"""The initial direction in the real loss: each data-driven direction's predicted decrease under
three curvature models of held-out examples, against the decrease of the real held-out loss.

    python results/realloss.py run --tasks cola,sts-b --seeds 0,1,2   # both heads: fresh, probe
    python results/realloss.py cost   # seconds of the exact-Fisher pass against the statistics pass
    python results/realloss.py report   # results/README.md's realloss block

Each finished (task, seed, head) appends one row to results/realloss.jsonl; a row already there
is skipped.
"""
import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cglora  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
from results import common, early  # noqa: E402
from results.common import BUDGET, HELD_OUT, mean_std, spearman  # noqa: E402

REALLOSS = "realloss.jsonl"
SCALES = [0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100]  # multiples of each layer's K-FAC step
BELOW = [0.0001, 0.0003, 0.001]  # also tried when a direction's best scale is SCALES[0]
CALIBRATION = 128
MODELS = {"expand": "K-FAC expand", "reduce": "K-FAC reduce", "fisher": "exact Fisher",
          "joint": "exact Fisher, joint"}
REPORTED = ["cg-lora", "lora-one", "lora-ga", "random"]  # cg-lora: at the damping "auto" chose


def split(task, tokenizer, seed):
    """train.py's seeded shuffle of the training set: the calibration batches (8 each, as train.py),
    the next HELD_OUT examples and the rest; the last two sorted by length (less padding: every
    quantity here is a per-example mean, so how examples are batched does not change it)."""
    encoded = data.encode_examples(data.read_split(task, "train"), tokenizer, BUDGET["max_len"])
    calib = list(data.batches(encoded, 8, tokenizer.pad_id, shuffle=True, seed=seed))
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    held, rest = ([encoded[i] for i in order[a:b]] for a, b in (
        (CALIBRATION, CALIBRATION + HELD_OUT), (CALIBRATION + HELD_OUT, len(order))))
    by_length = lambda es: sorted(es, key=lambda e: len(e[0]))  # noqa: E731
    return calib[:CALIBRATION // 8], by_length(held), by_length(rest)


def sequence_curvature(model, layers, batches, directions):
    """One forward + backward over `batches` for the two curvature models that see whole sequences,
    which cglora's statistics (K-FAC expand, one token at a time) do not hold.

    layers: {name: nn.Linear}; directions: K dicts {name: (B d_out x r, A r x d_in)}. With x_it a
    layer's input and delta_it = n_b dL_batch/dy_it (collect_statistics' hooks) at the real tokens
    t = 1..R_i of sequence i, an example's weight gradient is g_i = sum_t delta_it x_it^T.
    K-FAC reduce (Eschenhagen et al. 2023): xbar_i = (1/R_i) sum_t x_it, dbar_i = sum_t delta_it;
    g_i ~ dbar_i xbar_i^T (exact when x_it is the same at every token, and <G, dW> keeps its
    value there: sum_t delta_it = dbar_i), so F = (1/n) sum_i vec g_i vec g_i^T ~ (1/n) sum_i
    (xbar xbar^T) (x) (dbar dbar^T) ~ S_red (x) T_red, S_red = (1/n) sum_i xbar xbar^T
    (d_in x d_in), T_red = (1/n) sum_i dbar dbar^T (d_out x d_out): K-FAC's mean of products ->
    product of means.
    Exact empirical Fisher along dW = B A: p_i = <g_i, B A> = sum_t (B^T delta_it) . (A x_it), from
    r-dimensional projections. Returns ({name: (S_red, T_red)}, [{name: p (n,)}] per direction)."""
    sums = {n: [0.0, 0.0] for n in layers}
    p = [{n: [] for n in layers} for _ in directions]
    BA = {n: (torch.cat([d[n][0] for d in directions], 1), torch.cat([d[n][1] for d in directions]))
          for n in layers}  # d_out x K r, K r x d_in
    seen, was_training = {}, model.training

    def hook(name):
        def add_zero(module, inputs, y):  # y + z, z = 0: dL/dz = dL/dy; the graph through y stays
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
            n_b = batch["labels"].shape[0]
            keep = batch["attention_mask"][..., None].float()  # b x L x 1
            grads = torch.autograd.grad(common.loss(out, batch["labels"]),
                                        [seen[n][1] for n in layers])
            for n, dy in zip(layers, grads):
                x, delta = seen[n][0].float() * keep, dy.float() * n_b * keep  # b x L x d_in, d_out
                xbar, dbar = x.sum(1) / keep.sum(1), delta.sum(1)  # b x d_in, b x d_out
                sums[n][0] = sums[n][0] + xbar.T @ xbar
                sums[n][1] = sums[n][1] + dbar.T @ dbar
                # b x K r: sum_t (B^T delta_t)_j (A x_t)_j
                proj = ((delta @ BA[n][0]) * (x @ BA[n][1].T)).sum(1)
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
    decrease the exact empirical Fisher predicts for the best multiple of dW; <= 1/2
    (Cauchy-Schwarz)."""
    return (p.mean().square() / (2 * p.square().mean())).item() if p.square().mean() > 0 else 0.0


def directions(stats, ranks, seed):
    """(label, {name: (B, A)}) for CG-LoRA at every λ of the grid, LoRA-One, LoRA-GA and a seeded
    random rank-r direction, all fitted on the calibration statistics."""
    g = torch.Generator().manual_seed(seed)
    fitted = lambda m, lam: {n: cglora.direction(m, st, ranks[n], lam)  # noqa: E731
                             for n, st in stats.items()}
    out = [(dict(method="cg-lora", damping=lam), fitted("cg-lora", lam))
           for lam in cglora.DAMPING_GRID]
    out += [(dict(method=m, damping=None), fitted(m, None)) for m in ("lora-one", "lora-ga")]
    out.append((dict(method="random", damping=None), {
        n: (torch.randn(st.G.shape[0], ranks[n], generator=g),
            torch.randn(ranks[n], st.G.shape[1], generator=g)) for n, st in stats.items()}))
    return out


def prepared(task_name, seed, head, pretrained):
    """all-MiniLM-L6-v2 seeded as train.py (its fresh head), the head probed first if head="probe",
    rank-8 rsLoRA adapters on query and value, the calibration statistics (2 folds) and the held-out
    batches. Returns (task, model, layers, held, stats, probe record or None)."""
    task = data.get_task(task_name)
    tokenizer = data.load_tokenizer(pretrained)
    calib, held, rest = split(task, tokenizer, seed)
    torch.manual_seed(seed)  # the fresh head, as train.py
    model = models.from_pretrained(pretrained, task.num_labels)
    probed = None
    if head == "probe":
        pool = rest[:early.PROBE["steps"] * early.PROBE["batch_size"]]
        last, whole = early.probe(model, pool, tokenizer.pad_id, seed, **early.PROBE)
        probed = dict(early.PROBE, examples=len(pool), train_loss_last50=last, train_loss=whole)
    layers = cglora.add_lora(model, ["query", "value"], BUDGET["rank"], BUDGET["alpha"],
                             rslora=cglora.RSLORA["cg-lora"])
    stats = cglora.collect_statistics(model, {n: m.base for n, m in layers.items()}, calib,
                                      folds=2)
    return task, model, layers, list(data.batches(held, 8, tokenizer.pad_id)), stats, probed


def cost(task_name, seed, pretrained):
    """Seconds of the statistics pass and of the one pass that scores every direction under the
    exact Fisher (sequence_curvature, K-FAC reduce included), on the same held-out examples."""
    task, model, layers, held, stats, _ = prepared(task_name, seed, "fresh", pretrained)
    base = {n: m.base for n, m in layers.items()}
    ds = [d for _, d in directions(stats, {n: m.rank for n, m in layers.items()}, seed)]
    for _ in range(2):  # the second round: warm
        t0 = time.perf_counter()
        cglora.collect_statistics(model, base, held, folds=1)
        t1 = time.perf_counter()
        sequence_curvature(model, base, held, ds)
        t2 = time.perf_counter()
        sequence_curvature(model, base, held, ds[:1])
        t3 = time.perf_counter()
    print(f"{task.name} seed {seed}, {len(held) * 8} held-out examples: statistics pass "
          f"{t1 - t0:.1f} s; exact-Fisher pass for {len(ds)} directions {t2 - t1:.1f} s "
          f"({(t2 - t1) / (t1 - t0):.2f}x), for one {t3 - t2:.1f} s")


def judged(d, p, test, reduced):
    """One direction's per-layer and joint predicted decreases and each layer's expand step."""
    per_layer, step = {}, {}
    for n, (B, A) in d.items():
        G, S, T = test[n].G, test[n].S, test[n].T
        inner, curv = (B * (G @ A.T)).sum().item(), ((B.T @ T @ B) * (A @ S @ A.T)).sum().item()
        step[n] = -inner / curv  # the expand model's optimal multiple of B A
        S_r, T_r = reduced[n]
        per_layer[n] = dict(
            expand=cglora.predicted_decrease(B, A, G, S, T),
            reduce=cglora.predicted_decrease(B, A, G, S_r, T_r), fisher=fisher_decrease(p[n]),
            inner=inner, inner_fisher=p[n].mean().item(), step=step[n],
            curvature_reduce=((B.T @ T_r @ B) * (A @ S_r @ A.T)).sum().item(), curvature=curv)
    joint_p = sum(step[n] * p[n] for n in d)  # <g_i, sum_l step_l B_l A_l>
    num = sum(step[n] * r["inner"] for n, r in per_layer.items()) ** 2
    joint = dict(expand=sum(r["expand"] for r in per_layer.values()),
                 fisher=fisher_decrease(joint_p),
                 reduce=num / (2 * sum(step[n] ** 2 * r["curvature_reduce"]
                                       for n, r in per_layer.items())))
    return per_layer, step, joint


def realloss(task_name, seed, head, pretrained):
    """For each direction, its held-out predicted decrease under K-FAC expand, K-FAC reduce and the
    exact per-example Fisher, per layer and jointly, and its real held-out decrease."""
    key = dict(task=task_name, seed=seed, head=head)
    if common.has_row(REALLOSS, **key):
        return
    t0 = time.time()
    task, model, layers, held, stats, probed = prepared(task_name, seed, head, pretrained)
    base, ranks = {n: m.base for n, m in layers.items()}, {n: m.rank for n, m in layers.items()}
    chosen = cglora.choose_damping(stats, ranks)[0]
    ds = directions(stats, ranks, seed)
    test = cglora.collect_statistics(model, base, held, folds=1)  # K-FAC expand, held out
    reduced, projections = sequence_curvature(model, base, held, [d for _, d in ds])
    s, out, at_W0 = next(iter(layers.values())).scaling, [], None
    for (label, d), p in zip(ds, projections):
        per_layer, step, joint = judged(d, p, test, reduced)
        # the real loss at every scale; where the best is the smallest, three smaller scales too
        update = {n: (step[n] / s * B, A) for n, (B, A) in d.items()}  # s (step B / s) A = step B A
        at_W0, losses = cglora.real_decrease(model, layers, update, held, SCALES)
        on_grid = at_W0 - min(losses.values())
        if min(losses, key=losses.get) == SCALES[0]:
            again, below = cglora.real_decrease(model, layers, update, held, BELOW)
            assert abs(again - at_W0) < 1e-6, (again, at_W0)  # the adapters were restored
            losses.update(below)
        best = min(losses, key=losses.get)
        out.append(dict(label, auto=label["method"] == "cg-lora" and label["damping"] == chosen,
                        layers=per_layer, joint=joint, real=dict(
                            losses={f"{c:g}": v for c, v in sorted(losses.items())},
                            best_scale=best, decrease=at_W0 - losses[best],
                            decrease_on_grid=on_grid)))
        total = lambda m: f"{sum(x[m] for x in per_layer.values()):.3f}"  # noqa: E731
        print(f"{task.name} seed {seed} {head} {label['method']}"
              + (f" λ={label['damping']:g}" if label["damping"] else "")
              + (" (auto)" if out[-1]["auto"] else "") + ": q expand / reduce / fisher "
              + " / ".join(map(total, ("expand", "reduce", "fisher")))
              + f", joint fisher {joint['fisher']:.3f}; real {out[-1]['real']['decrease']:.4f} "
              f"at {best:g}x (W0 {at_W0:.4f})", flush=True)
    row = dict(key, calibration=CALIBRATION, held_out=HELD_OUT, rank=BUDGET["rank"],
               alpha=BUDGET["alpha"], scaling=s, targets=["query", "value"], probe=probed,
               damping_auto=chosen, loss_W0=at_W0, scales=SCALES, directions=out,
               seconds=time.time() - t0,
               command=f"python results/realloss.py run --tasks {task.name} --seeds {seed} "
                       f"--heads {head}")
    common.append_row(REALLOSS, row)


# ------------------------------------------------------------ report

def predicted(d, model):  # a direction's predicted decrease: summed over layers, or the joint q
    return d["joint"]["fisher"] if model == "joint" else sum(x[model] for x in d["layers"].values())


def tracking(runs, model):
    """How one curvature model's q tracks the real decrease in `runs`: the Spearman correlation over
    all their directions and the mean within a run, log10(q / real), and for the λ it would choose
    (the largest q of CG-LoRA's directions in a run): how often it is the λ of the largest real
    decrease, and the real decrease lost by it."""
    q = lambda ds: [predicted(d, model) for d in ds]  # noqa: E731
    real = lambda ds: [d["real"]["decrease"] for d in ds]  # noqa: E731
    every = [d for r in runs for d in r["directions"]]
    within = statistics.mean(spearman(q(r["directions"]), real(r["directions"])) for r in runs)
    logs = [math.log10(a / b) for a, b in zip(q(every), real(every)) if a > 0 and b > 0]
    cg = [[d for d in r["directions"] if d["method"] == "cg-lora"] for r in runs]
    chosen = [max(c, key=lambda d: predicted(d, model)) for c in cg]
    best = [max(c, key=lambda d: d["real"]["decrease"]) for c in cg]
    lost = statistics.mean(b["real"]["decrease"] - c["real"]["decrease"]
                           for c, b in zip(chosen, best))
    lams = ", ".join(f"{c['damping']:g}" for c in chosen)
    return (f"{spearman(q(every), real(every)):.2f} ({len(every)}) | {within:.2f} ({len(runs)}) | "
            f"{mean_std(logs)} ({len(logs)}) | {lams} | "
            f"{sum(c is b for c, b in zip(chosen, best))} of {len(runs)} | {lost:.4f}")


def report():
    """results/README.md's realloss block from results/realloss.jsonl."""
    rows = common.read_rows(REALLOSS)
    groups = sorted({(r["task"], r["head"]) for r in rows},
                    key=lambda g: (common.TASKS.index(g[0]), g[1]))
    runs = {g: sorted((r for r in rows if (r["task"], r["head"]) == g), key=lambda r: r["seed"])
            for g in groups}
    pick = lambda r, m: next(d for d in r["directions"]  # noqa: E731  (cg-lora: at the auto λ)
                             if d["method"] == m and (m != "cg-lora" or d["auto"]))
    table = ["| task | head | method | λ (per seed) | "
             + " | ".join(f"q {v}" for v in MODELS.values()) + " | real decrease | "
             + " | ".join(f"{v} ÷ real" for v in MODELS.values()) + " |",
             "|---|---|---|---|" + "---|" * (2 * len(MODELS) + 1)]
    for task, head in groups:
        for m in REPORTED:
            ds = [pick(r, m) for r in runs[task, head]]
            real = [d["real"]["decrease"] for d in ds]
            lam = ", ".join(f"{d['damping']:g}" for d in ds) if m == "cg-lora" else "—"
            table.append(f"| {task} | {head} | {m} | {lam} | " + " | ".join(
                mean_std([predicted(d, k) for d in ds]) for k in MODELS)
                + f" | {mean_std(real)} ({len(ds)}) | " + " | ".join(
                f"{statistics.mean(predicted(d, k) for d in ds) / statistics.mean(real):.1f}"
                for k in MODELS) + " |")
    track = ["| curvature model | task | Spearman over all directions | mean Spearman within a "
             "run | log₁₀(predicted ÷ real): mean ± std | its λ per run | its λ is the real best "
             "λ | real decrease lost by its λ |", "|---|---|---|---|---|---|---|---|"]
    for k, name in MODELS.items():
        for task in sorted({r["task"] for r in rows}, key=common.TASKS.index):
            track.append(f"| {name} | {task} | "
                         f"{tracking([r for r in rows if r['task'] == task], k)} |")
    pair = ["| task | head | CG-LoRA (auto λ) ÷ LoRA-One, per seed: q K-FAC expand | "
            "q exact Fisher, joint | real decrease |", "|---|---|---|---|---|"]
    for task, head in groups:
        def ratio(f, rs=runs[task, head]):  # per seed
            return ", ".join(f"{f(pick(r, 'cg-lora')) / f(pick(r, 'lora-one')):.2f}" for r in rs)
        pair.append(f"| {task} | {head} | {ratio(lambda d: predicted(d, 'expand'))} | "
                    f"{ratio(lambda d: predicted(d, 'joint'))} | "
                    f"{ratio(lambda d: d['real']['decrease'])} |")
    layer_q = {k: [x[k] for r in rows for d in r["directions"] for x in d["layers"].values()]
               for k in ("expand", "reduce", "fisher")}
    bound = "; ".join(f"{MODELS[k]} {sum(q > 0.5 for q in qs)} of {len(qs)}, largest {max(qs):.2f}"
                      for k, qs in layer_q.items())
    text = ("`python results/realloss.py run --tasks cola,sts-b --seeds 0,1,2`, then `python "
            f"results/realloss.py report`, over {len(rows)} rows of `results/realloss.jsonl`.\n\n"
            + "\n".join(table)
            + "\n\nWhich curvature model's q tracks the real decrease (all directions: CG-LoRA at "
            "every λ, LoRA-One, LoRA-GA, random; both heads; the λ columns: the λ of the grid with "
            "the largest q of that model, per run, against the λ with the largest real decrease):"
            "\n\n" + "\n".join(track)
            + "\n\nCG-LoRA's direction against LoRA-One's in the same run:\n\n" + "\n".join(pair)
            + "\n\nOne layer's q above ½ (impossible under the exact empirical Fisher), of all "
            f"(layer, direction) pairs: {bound}.\n")
    return common.write_block("realloss", text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "cost", "report"])
    p.add_argument("--heads", default="fresh,probe", help="fresh head, or probe (head trained "
                   "alone first), comma list")
    args = common.arguments(p).parse_args(argv)
    if args.command == "report":
        return print(report())
    pretrained = args.pretrained or common.minilm()
    if args.command == "cost":
        return cost(args.tasks.split(",")[0], int(args.seeds.split(",")[0]), pretrained)
    common.parallel(realloss, [(t, int(s), h, pretrained) for s in args.seeds.split(",")
                               for t in args.tasks.split(",") for h in args.heads.split(",")],
                    args.workers)


if __name__ == "__main__":
    main()
