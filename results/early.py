"""Early training: when does the initial direction matter? train.py's first steps with the train
loss of every step, dev evaluations, and how far the adapters move from their init.

    python results/early.py run --tasks cola --seeds 0,1,2,3,4     # the first 300 steps (AdamW)
    python results/early.py run --tasks cola,sts-b --heads probe --methods rslora,lora-one,cg-lora
    python results/early.py run --tasks mrpc --heads probe --methods rslora,lora-one,cg-lora \
        --seeds 0 --steps 228                                      # all of MRPC's budget
    python results/early.py sgd --tasks cola,sts-b --methods rslora,lora-one,cg-lora  # SGD
    python results/early.py report   # results/README.md's early block and its figures

Each finished run appends one row to results/early.jsonl; a row already there is skipped.
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
import train  # noqa: E402
from results import common, grid  # noqa: E402
from results.common import BUDGET, mean_se, paired  # noqa: E402

EARLY = "early.jsonl"
METHODS = ["rslora", "lora-one", "cg-lora", "random", "full"]  # random: LoRA-One's size, random way
STEPS = 300
WINDOWS = ((1, 20), (41, 60), (91, 110), (181, 200), (281, 300))  # the report's train-loss windows
EVALS = (0, 50, 100, 200)  # dev evaluations, besides the end of epoch 1 and the last step
MOVES = (10, 50, 200)  # the adapters' product measured against its init, besides the last step
SGD_RATES = [0.01, 0.03, 0.1, 0.3]  # SGD (momentum 0.9): a rate by the train loss over steps 51-100
PROBE = dict(steps=300, batch_size=32, lr=1e-3)  # the head trained alone first (head="probe")
COLOURS = dict(zip(METHODS, ["#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f", "#d62728"]))
SMOOTH = 10  # the figures' train loss: means over windows of this many steps


# ------------------------------------------------------------ train.py's run, opened
# The measurements need what train.train() does not return: every step's loss, the model between
# steps, SGD. So train.py's steps up to its init are called one by one here, and its loop is
# restated in early_steps; a test holds both to train.py's own run, step by step.

def setup(task_name, init, seed, lr, pretrained, damping):
    """train.py's run up to its init, on the CPU, without a run directory: (cfg, run, task, model
    (its fresh head seeded as train.py), tokenizer, training examples, dev batches, (calibration
    batches, the real check's))."""
    cfg = train.Config(task=task_name, pretrained=pretrained, init=init, seed=seed, lr=lr,
                       damping=damping, out="unused", device="cpu", real_check=4, **BUDGET)
    run = train.Run(cfg, Path("unused"), 1, 0, torch.device("cpu"), False)  # no run directory
    task, train_set, dev_set = train.read_data(run)
    return (cfg, run, task, *train.model_and_batches(run, task, train_set, dev_set))


def initialise(cfg, run, model, calib):  # train.py's init; its record
    return train.initialise(cfg, model, calib, run.device, lambda *a: None)


def evaluate(cfg, run, task, model, dev):  # train.py's dev evaluation: its metrics and loss
    return train.evaluate(model, dev, task, cfg, run.device)


def early_steps(model, cfg, train_enc, pad_id, optimizer, steps):
    """train.py's first `steps` steps of the model's trainable parameters: its data order and its
    schedule over BUDGET's epochs; AdamW, or SGD with momentum 0.9. Yields (step, train loss) after
    each step, the model in train mode, so that the caller can measure it between steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
           if optimizer == "adamw" else torch.optim.SGD(params, lr=cfg.lr, momentum=0.9))
    per_epoch = len(train_enc) // cfg.batch_size
    sched = train.schedule(opt, per_epoch * cfg.epochs, cfg.warmup)
    step = 0
    while step < steps:
        order = list(data.batches(train_enc, cfg.batch_size, pad_id, shuffle=True,
                                  seed=cfg.seed * 1000 + step // per_epoch + 1))[:per_epoch]
        for batch in order[step % per_epoch:][:steps - step]:
            model.train()  # again after any evaluation the caller made
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
            loss = common.loss(out, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            yield step, loss.item()


def probe(model, pool, pad_id, seed, steps, batch_size, lr):
    """Train model.head alone (AdamW) on first-token features of `pool`, computed once (eval mode,
    no dropout: the same as training the head inside the frozen model, at a fraction of the cost,
    which train.py has no flag for). Returns the mean train loss of the last 50 steps and over the
    whole pool after training."""
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.encode(**{k: v for k, v in b.items() if k != "labels"})[:, 0]
                           for b in data.batches(pool, 64, pad_id)])  # n x hidden
    labels = torch.tensor([y for _, _, y in pool])
    head = lambda h: model.head.out_proj(torch.tanh(model.head.dense(h)))  # noqa: E731  (eval mode)
    model.head.requires_grad_(True)
    opt = torch.optim.AdamW(model.head.parameters(), lr=lr)
    g, order, losses = torch.Generator().manual_seed(seed), torch.tensor([], dtype=torch.long), []
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(pool), generator=g)])
        idx, order = order[:batch_size], order[batch_size:]
        loss = common.loss(head(feats[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.head.requires_grad_(False)
    with torch.no_grad():
        return statistics.mean(losses[-50:]), common.loss(head(feats), labels).item()


# ------------------------------------------------------------ measurements

def products(layers):  # {name: s B A} in fp32, the adapters' current update of W0
    return {n: m.scaling * (m.lora_B.detach().float() @ m.lora_A.detach().float())
            for n, m in layers.items()}


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


def randomise(model, init, seed):
    """LoRA-One's ||s B A||_2 per layer (init's rows), in a seeded random direction, balanced."""
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, cglora.LoRALinear)]
    for r, m in zip(init["layers"], layers):
        B, A = torch.randn(m.lora_B.shape, generator=g), torch.randn(m.lora_A.shape, generator=g)
        cglora.write_adapter(m, *cglora.balance(*common.sized(B, A, m.scaling, r["update_norm"])),
                             False)


def early(task_name, method, seed, pretrained, optimizer="adamw", lr=None, head="fresh",
          steps=STEPS):
    """The first `steps` steps of train.py's run (same seeding, calibration, init, data order and
    schedule over BUDGET's epochs; AdamW, or SGD with momentum 0.9): the train loss of every step,
    dev at EVALS, the end of epoch 1 and the last step, and the adapters' product against its init
    at MOVES and the end. head="probe": the head is first trained alone (PROBE). Also the share of
    the final update in the init's subspaces and in LoRA-One's (the calibration gradient's top-r
    singular subspaces, for every method)."""
    rate = lr or grid.best_rates(common.read_rows(grid.RUNS))["lora-one" if method == "random"
                                                            else method]
    key = dict(task=task_name, method=method, seed=seed, optimizer=optimizer, lr=rate, head=head,
               steps=steps)
    if common.has_row(EARLY, **key):
        return
    t0 = time.time()
    cfg, run, task, model, tokenizer, train_enc, dev, calib = setup(
        task_name, "lora-one" if method == "random" else method, seed, rate, pretrained,
        grid.DAMPING)
    probed = None
    if head == "probe":
        pool = train_enc[:PROBE["steps"] * PROBE["batch_size"]]
        last, _ = probe(model, pool, tokenizer.pad_id, seed, **PROBE)
        probed = dict(PROBE, train_loss_last50=last)
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("query", "value")]
    stats = cglora.collect_statistics(model, {n: model.get_submodule(n) for n in names}, calib[0],
                                      folds=1)  # LoRA-One's subspaces, for every method
    one = {n: cglora.top_svd(st.G, BUDGET["rank"])[::2] for n, st in stats.items()}  # (U, V)
    del stats
    init = initialise(cfg, run, model, calib)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, cglora.LoRALinear)}
    if method == "random":
        randomise(model, init, seed)
    if method == "full":  # the same layers' weight change stands in for the product (P0 = 0)
        w0 = {n: model.get_submodule(n).weight.detach().float().clone() for n in names}
        now = lambda: {n: model.get_submodule(n).weight.detach().float() - w  # noqa: E731
                       for n, w in w0.items()}
        bases = {n: (None, None) for n in names}
    else:
        now = lambda: products(layers)  # noqa: E731
        orth = lambda X: torch.linalg.qr(X.float()).Q if X.abs().max() > 0 else None  # noqa: E731
        bases = {n: (orth(m.lora_B.detach()), orth(m.lora_A.detach().T)) for n, m in layers.items()}
    P0 = now()
    at = sorted(set(EVALS) | {len(train_enc) // cfg.batch_size, steps})  # and the end of epoch 1
    losses, evals, moves = [], [dict(step=0, **evaluate(cfg, run, task, model, dev))], {}
    for step, loss in early_steps(model, cfg, train_enc, tokenizer.pad_id, optimizer, steps):
        losses.append(loss)
        if step in MOVES or step == steps:
            moves[step] = movement(now(), P0)
        if step in at:
            evals.append(dict(step=step, **evaluate(cfg, run, task, model, dev)))
    D = {n: P - P0[n] for n, P in now().items()}
    row = dict(key, budget=BUDGET, probe=probed,
               init={k: init.get(k) for k in ("damping", "seconds")},
               # random: the real check judged LoRA-One's init, not this one
               real=None if method == "random" else init.get("summary", {}).get("real_decrease"),
               train_loss=[round(x, 5) for x in losses], evals=evals,
               moves={str(k): v for k, v in moves.items()}, in_init=in_subspaces(D, bases),
               in_lora_one=in_subspaces(D, one), seconds=time.time() - t0,
               command=f"python results/early.py run --tasks {task_name} --methods {method} "
                       f"--seeds {seed} --optimizer {optimizer} --heads {head}"
                       + (f" --lr {rate:g}" if lr else ""))
    common.append_row(EARLY, row)
    main = next(k for k in evals[-1] if k not in ("step", "loss"))
    print(f"{task_name} {method} seed {seed} {optimizer} lr {rate:g} {head}: train loss (last 20) "
          f"{statistics.mean(losses[-20:]):.4f}, dev {main} {evals[-1][main]:.4f} at step {steps}, "
          f"moved {moves[steps]['moved']:.3g} ({row['seconds']:.0f} s)", flush=True)


def sgd_rates(task, methods, steps=100):
    """Each method's SGD rate: the SGD_RATES candidate with the lowest mean train loss over steps
    51-100, seed 0 (rows of `steps` steps)."""
    rows = [r for r in common.read_rows(EARLY) if r["optimizer"] == "sgd" and r["steps"] == steps
            and r["task"] == task]
    late = lambda r: statistics.mean(r["train_loss"][50:])  # noqa: E731
    return {m: min((r for r in rows if r["method"] == m),
                   key=lambda r: late(r) if math.isfinite(late(r)) else math.inf)["lr"]
            for m in methods}


# ------------------------------------------------------------ report

def window(losses, a, b):  # mean train loss over steps a..b (1-based, inclusive)
    return statistics.mean(losses[a - 1:b]) if len(losses) >= b else None


def windows(r):  # the figures' points: mean train loss over each SMOOTH steps
    n = len(r["train_loss"]) - SMOOTH + 1
    return [statistics.mean(r["train_loss"][i:i + SMOOTH]) for i in range(0, n, SMOOTH)]


def curve(values):  # per-seed window means -> [(step, mean, se)]
    return [((i + 1) * SMOOTH, m, se) for i, m, se in common.mean_curve(values)]


def figures(task, by, probed):
    """early_curves_<task>.svg: the train loss in windows of SMOOTH steps, mean ± standard error
    over seeds, per method (fresh head; dashed: head trained first); early_diff_<task>.svg: each
    method's minus rsLoRA's on the same seed (the same batches, so their noise cancels). Returns
    the results/README.md lines that show them."""
    first = [(m, [r for r in probed if r["method"] == m]) for m in METHODS]
    series = {f"{m} ({len(rr)})": (COLOURS[m], "", curve([windows(r) for r in rr]))
              for m, rr in by.items() if rr}
    series.update({f"{m}, head first ({len(rr)})": (COLOURS[m], "5,3", curve(map(windows, rr)))
                   for m, rr in first if rr})
    common.write_figure(f"early_curves_{task}.svg", common.band_svg(
        series, f"{task} train loss, means over {SMOOTH} steps, ± one standard error over seeds"))
    base = {r["seed"]: windows(r) for r in by.get("rslora", [])}
    diff = {}
    for m, rr in list(by.items()) + [(m + ", head first", rr) for m, rr in first]:
        pairs = [[a - b for a, b in zip(windows(r), base[r["seed"]])] for r in rr
                 if r["seed"] in base]
        if pairs and m != "rslora":
            diff[f"{m} ({len(pairs)})"] = (COLOURS[m.split(",")[0]],
                                           "5,3" if "head first" in m else "", curve(pairs))
    lines = f"\n![{task}, early training: train loss](early_curves_{task}.svg)"
    if diff:
        common.write_figure(f"early_diff_{task}.svg", common.band_svg(
            diff, f"{task} train loss minus rsLoRA's (same seed, same batches), "
                  "± one standard error"))
        lines += (f"\n\n![{task}, early training: train loss minus rsLoRA's on the same seed]"
                  f"(early_diff_{task}.svg)")
    return lines


def tables(rs, groups, steps, main, per_epoch):
    """One group's tables (task, optimizer, head, steps): means, differences paired by seed, and
    how far the adapters moved."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rs)]
    by = {m: [r for r in rs if r["method"] == m] for m in methods}
    def dev(r, step, k):  # a dev evaluation's value, if the run has one at `step`
        return next((e[k] for e in r["evals"] if e["step"] == step), None)
    columns = [lambda r, a=a, b=b: window(r["train_loss"], a, b) for a, b in WINDOWS] \
        + [lambda r, s=s: dev(r, s, "loss") for s in (0, 50, 100, steps)] \
        + [lambda r: dev(r, per_epoch, main), lambda r: dev(r, steps, main)]
    header = (f"train loss 1-20 | 41-60 | 91-110 | 181-200 | 281-300 | dev loss 0 | 50 | 100 | "
              f"{steps} | dev {main} {per_epoch}")
    text = [f"| method | rate | real decrease at init | {header} (epoch 1) | {steps} |",
            "|---|" + "---|" * 13]
    for m in methods:
        rates = ", ".join(sorted({f"{r['lr']:g}" for r in by[m]}))
        text.append(f"| {m} | {rates} | {mean_se([r['real'] for r in by[m]], 4)} | "
                    + " | ".join(mean_se([f(r) for r in by[m]]) for f in columns) + " |")
    seeds = lambda rows, m: {r["seed"]: r for r in rows if r["method"] == m}  # noqa: E731
    if base := seeds(rs, "rslora"):  # the same calibration, data order and dropout draws
        text += ["\nThe same runs minus rsLoRA's on the same seed (mean ± standard error of the "
                 "per-seed differences; last row: CG-LoRA minus LoRA-One):\n",
                 f"| method | {header} | {steps} |", "|---|" + "---|" * 11]
        pairs = [(m, m, base) for m in methods if m != "rslora"]
        if {"cg-lora", "lora-one"} <= set(methods):
            pairs.append(("cg-lora − lora-one", "cg-lora", seeds(rs, "lora-one")))
        for label, m, ref in pairs:
            text.append(f"| {label} | " + " | ".join(paired(by[m], ref, f) for f in columns) + " |")
    head, fresh = rs[0]["head"], groups.get((rs[0]["task"], rs[0]["optimizer"], "fresh", steps), [])
    if head == "probe" and fresh:  # what the warm-up did to each method, paired by seed
        text += ["\nHead first minus fresh head, same method and seed:\n",
                 f"| method | train loss 281-300 | dev loss 0 | 50 | {steps} | dev {main} "
                 f"{per_epoch} | {steps} |", "|---|---|---|---|---|---|---|"]
        for m in methods:
            text.append(f"| {m} | " + " | ".join(paired(by[m], seeds(fresh, m), columns[i])
                                                 for i in (4, 5, 6, 8, 9, 10)) + " |")
    text += [f"\nHow far the adapters' product `s·B·A` moved from its init (`‖P − P₀‖_F` over the "
             "layers ÷ `‖P₀‖_F`; for rsLoRA `P₀ = 0`, the absolute movement; full: `‖W − W₀‖_F` of "
             "the same layers), how much of the init is left (`⟨P, P₀⟩ / ‖P₀‖²`), and how much of "
             "the update `P − P₀` at the last step lies in the init's r-dimensional column / row "
             "spaces and in LoRA-One's (the calibration gradient's top "
             f"{BUDGET['rank']} singular subspaces); a random subspace holds r/d = "
             f"{BUDGET['rank']}/384 = {BUDGET['rank'] / 384:.3f} of it:\n",
             "| method | moved ÷ init, step " + " | ".join(map(str, MOVES)) + f" | {steps} | init "
             f"left at {steps} | update in init's columns / rows | in LoRA-One's columns / rows |",
             "|---|" + "---|" * (len(MOVES) + 4)]
    rel = lambda r, k: r["moves"][k]["moved"] / (r["moves"][k]["init"] or 1)  # noqa: E731
    for m in methods:
        rr = by[m]
        def share(f, rr=rr):  # columns / rows
            return " / ".join(mean_se([r[f][k] for r in rr], 2) for k in ("left", "right"))
        text.append(f"| {m} | " + " | ".join(mean_se([rel(r, k) for r in rr], 2)
                                             for k in [*map(str, MOVES), str(steps)])
                    + f" | {mean_se([r['moves'][str(steps)]['kept'] for r in rr], 2)} | "
                    + f"{share('in_init')} | {share('in_lora_one')} |")
    return text, by


def report():
    """results/README.md's early block and its figures from results/early.jsonl."""
    keys = ("task", "method", "seed", "optimizer", "lr", "head", "steps")
    rows = list({tuple(r[k] for k in keys): r for r in reversed(common.read_rows(EARLY))}
                .values())[::-1]  # the first row of a key
    text = [f"`python results/early.py report` over {len(rows)} rows of `results/early.jsonl`; "
            f"each row's command is in it. {' and '.join(sorted({r['task'] for r in rows}))}, "
            "all-MiniLM-L6-v2, the grid's budget (rank 8, α 16, query + value, batch 32, 16×8 "
            "calibration examples) and each method's grid rate; the grid's 2-epoch schedule, its "
            f"first {STEPS} steps or all of it where it is shorter. Mean ± standard error over "
            "seeds (number of seeds)."]
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["optimizer"], r["head"], r["steps"]), []).append(r)
    for (task, opt, head, steps), rs in sorted(groups.items()):
        if opt == "sgd" and steps != STEPS:  # the SGD rate probe: one line per (method, rate)
            text.append(f"\n{task}, {opt} rate probe ({steps} steps, seed 0): mean train loss over "
                        "steps 51-100 — " + "; ".join(
                            f"{r['method']} {r['lr']:g}: {window(r['train_loss'], 51, 100):.4f}"
                            for r in sorted(rs, key=lambda r: (METHODS.index(r["method"]),
                                                               r["lr"]))))
            continue
        per_epoch = next((e["step"] for e in rs[0]["evals"] if e["step"] not in (0, *EVALS, steps)),
                         None)
        main = next(k for k in rs[0]["evals"][0] if k not in ("step", "loss"))
        text.append(f"\n**{task}, {opt.upper() if opt == 'sgd' else 'AdamW'}, {head} head**"
                    + (" (the head trained alone first: 300 steps of 32, lr 10⁻³, on the frozen "
                       "features)" if head == "probe" else "") + ":\n")
        lines, by = tables(rs, groups, steps, main, per_epoch)
        text += lines
        if (opt, head) == ("adamw", "fresh"):
            text.append(figures(task, by, groups.get((task, opt, "probe", steps), [])))
    return common.write_block("early", "\n".join(text) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "sgd", "report"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--heads", default="fresh", help="fresh, or probe (the head trained alone "
                   "first), or both: fresh,probe")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float, default=None,
                   help="the rate (default: the method's grid rate)")
    p.add_argument("--steps", type=int, default=STEPS)
    args = common.arguments(p, tasks="cola", seeds="0,1,2").parse_args(argv)
    if args.command == "report":
        return print(report())
    pretrained, methods = args.pretrained or common.minilm(), args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        sys.exit(f"--methods: {', '.join(sorted(unknown))} not among {', '.join(METHODS)}")
    tasks, seeds, heads = args.tasks.split(","), args.seeds.split(","), args.heads.split(",")
    rates = {}
    if args.command == "sgd":  # first each method's rate, from 100-step runs of seed 0
        common.parallel(early, [(t, m, 0, pretrained, "sgd", lr, "fresh", 100) for t in tasks
                                for m in methods for lr in SGD_RATES], args.workers)
        rates = {t: sgd_rates(t, methods) for t in tasks}
    common.parallel(early, [
        (t, m, int(s), pretrained, "sgd" if rates else args.optimizer,
         rates[t][m] if rates else args.lr, h, args.steps)
        for t in tasks for s in seeds for h in heads for m in methods], args.workers)


if __name__ == "__main__":
    main()
