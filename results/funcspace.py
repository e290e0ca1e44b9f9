"""Function space: does CG-LoRA's init point where full fine-tuning goes, and do its predictions
stay closer to full fine-tuning's along training?

    python results/funcspace.py run --tasks cola,sts-b --seeds 0,1,2,3   # 100 steps, 5 methods
    python results/funcspace.py run --tasks cola --seeds 0,1,2 --steps 300
    python results/funcspace.py run --tasks cola,sts-b --seeds 0,1,2 --steps end   # all of it
    python results/funcspace.py report   # results/README.md's funcspace block and its figures

Rows of results/funcspace.jsonl: kind "train", one run's dev outputs along training; kind "init",
the init directions' output change at W0 against full fine-tuning's (which needs the full run of
the same task, seed and steps first). A row already there is skipped.
"""
import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cglora  # noqa: E402
import data  # noqa: E402
from results import common, early, grid  # noqa: E402
from results.common import BUDGET, mean_se  # noqa: E402

FUNCSPACE = "funcspace.jsonl"
METHODS = ["full", "cg-lora", "lora-one", "rslora", "lora-ga"]  # full first: the others' reference
DAMPING = 1.0  # CG-LoRA's damping here: the project's fixed default
STEPS = 100  # what the 2-core CPU affords for 2 tasks x 5 methods x 3 seeds
AT = (0, 1, 10, 50, 100, 300)  # the dev outputs are kept at these steps (to the last) and the last
K = (1, 10, 100)  # full fine-tuning's steps that the init directions meet, and its last
DEV = 512  # the first DEV dev examples
INIT_DEV = 256  # ... and the first 256 of them for the init's JVPs (K + 1 forward passes each)
SNAPSHOTS = "tmp/funcspace"  # full fine-tuning's update of the target layers at AT (not committed)
LABELS = {"cg-lora": "CG-LoRA (λ 1)", "cg-lora auto": "CG-LoRA (λ auto)",
          "K-FAC Newton, full rank": "K-FAC Newton, full rank (λ 1)",
          "K-FAC Newton, full rank auto": "K-FAC Newton, full rank (λ auto)",
          "lora-one": "LoRA-One",
          "lora-ga": "LoRA-GA (s B A)", "random": "random rank 8", "-G, full rank": "−G, full rank"}
COLOURS = dict(zip(METHODS + ["untrained"],
                   ["#d62728", "#2ca02c", "#ff7f0e", "#1f77b4", "#9467bd", "#7f7f7f"]))


def schedule_end(task_name, glue=False):
    """The last step of train.py's schedule at BUDGET: its epochs of whole batches of the training
    set (glue=True: of GLUE's row count, without reading the file)."""
    task = data.get_task(task_name)
    n = data.glue_rows(task, "train") if glue else \
        len(data.read_split(task, "train", data.resolve_data_dir(None)))
    return n // BUDGET["batch_size"] * BUDGET["epochs"]


def dev_outputs(model, batches):
    """The model's outputs on `batches` (n x C: logits, or C = 1 regression scores), eval mode."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).float()
                              for b in batches])
    finally:
        model.train(was_training)


def funcspace(task_name, method, seed, pretrained, steps=STEPS):
    """train.py's first `steps` steps of `method` (early.early_steps; CG-LoRA at damping DAMPING)
    and its outputs on the first DEV dev examples at AT. Full fine-tuning also saves its target
    layers' weight update at those steps for init_row (SNAPSHOTS)."""
    rate = grid.best_rates(common.read_rows(grid.RUNS))[method]
    damping = DAMPING if method.startswith("cg-lora") else None
    key = dict(kind="train", task=task_name, method=method, seed=seed, lr=rate, damping=damping,
               steps=steps)
    if common.has_row(FUNCSPACE, **key):
        return
    t0 = time.time()
    cfg, run, task, model, tokenizer, train_enc, dev, calib = early.setup(
        task_name, method, seed, rate, pretrained, grid.DAMPING if damping is None else damping)
    init = early.initialise(cfg, run, model, calib)
    subset = dev[:DEV // (2 * cfg.batch_size)]  # train.py's dev batches hold 2 x batch_size
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("query", "value")]
    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in names
          if method == "full"}
    at = {k for k in AT if k <= steps} | {steps}
    outputs, snapshots = {0: dev_outputs(model, subset)}, {}
    for step, _ in early.early_steps(model, cfg, train_enc, tokenizer.pad_id, "adamw", steps):
        if step in at:
            outputs[step] = dev_outputs(model, subset)
            snapshots[step] = {n: model.get_submodule(n).weight.detach() - w for n, w in w0.items()}
    if method == "full":
        (common.HERE / SNAPSHOTS).mkdir(parents=True, exist_ok=True)
        torch.save(snapshots, common.HERE / SNAPSHOTS / f"{task_name}-s{seed}-{steps}.pt")
    row = dict(key, budget=BUDGET, dev_examples=len(outputs[0]), init_damping=init.get("damping"),
               outputs={str(k): [[round(x, 5) for x in o] for o in v.tolist()]
                        for k, v in outputs.items()},
               seconds=time.time() - t0,
               command=f"python results/funcspace.py run --tasks {task_name} --methods {method} "
                       f"--seeds {seed} --steps {steps}")
    common.append_row(FUNCSPACE, row)
    print(f"{task_name} {method} seed {seed}: {steps} steps, dev outputs at {sorted(at | {0})} "
          f"({row['seconds']:.0f} s)", flush=True)


# ------------------------------------------------------------ at init

def centred(out):  # n x C outputs less their mean over the C classes: what a softmax sees
    return out - out.mean(-1, keepdim=True) if out.shape[-1] > 1 else out


def output_change(model, deltas, batches):
    """J D for K updates at once: the first-order change of the model's outputs on `batches` when
    the weight of each module named in D ({name: d_out x d_in}; the same names in every D) moves
    by D.
    A forward-mode JVP, vmapped over the K updates, in eval mode. Returns K x n x C."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    keys = [f"{n}.weight" for n in deltas[0]]
    tangents = [torch.stack([D[k.rsplit(".", 1)[0]].to(params[k].dtype) for D in deltas])
                for k in keys]  # K x W
    was_training, out = model.training, []
    try:
        model.eval()
        for b in batches:
            inputs = {k: v for k, v in b.items() if k != "labels"}
            def f(*ws, inputs=inputs):
                return functional_call(model, {**params, **dict(zip(keys, ws))}, kwargs=inputs)
            # the fused CPU attention has no forward-mode derivative
            with sdpa_kernel(SDPBackend.MATH):
                out.append(vmap(lambda *t: jvp(f, tuple(params[k] for k in keys), t)[1])(*tangents))
    finally:
        model.train(was_training)
    return torch.cat(out, 1)


def cosine(a, b):
    return (a.flatten() @ b.flatten() / (a.norm() * b.norm())).item()


def explained(target, change):
    """The share of |target|^2 that the best multiple c of `change` explains:
    1 - |target - c change|^2 / |target|^2 at c = <target, change> / |change|^2 (= the squared
    cosine)."""
    c = target.flatten() @ change.flatten() / change.square().sum()
    return (1 - (target - c * change).square().sum() / target.square().sum()).item()


def newton_step(G, S, T, damping):
    """The full-rank K-FAC Newton step -T_l^-1 G S_l^-1 (d_out x d_in; S_l, T_l damped as whiten
    does) through whiten's Cholesky factors: -L_T^-T M L_S^-1 with M = L_T^-1 G L_S^-T. CG-LoRA's
    B A is its best rank-r approximation in the metric of T_l and S_l; cglora never forms the whole
    step, which is what this measurement compares rank r with."""
    dtype = torch.float64 if G.dtype == torch.float64 else torch.float32  # fp32 at least
    M, L_T, L_S = cglora.whiten(G.to(dtype), S.to(dtype), T.to(dtype), damping)
    X = torch.linalg.solve_triangular(L_T.T, M, upper=True)  # L_T^-T M
    return -torch.linalg.solve_triangular(L_S.T, X.T, upper=True).T  # ... L_S^-1


def init_directions(stats, rank, alpha, dampings, seed):
    """The init directions, {name: the update of W0 (d_out x d_in)} per label: CG-LoRA at each
    damping at its init's size (LoRA-One's ||s B A||_2 per layer); the full-rank K-FAC Newton step
    at its own size; LoRA-One's init; LoRA-GA's s B A; a seeded random rank-r direction at
    LoRA-One's size; -G (full rank: plain gradient descent's direction)."""
    norm = alpha / (math.sqrt(rank) * cglora.LORA_ONE_GAMMA)  # init_adapters' default size
    sized = lambda P: P * (norm / torch.linalg.matrix_norm(P, ord=2))  # noqa: E731
    def product(m, st, lam):  # B A of method m's direction
        B, A = cglora.direction(m, st, rank, lam)
        return B @ A
    g = torch.Generator().manual_seed(seed)
    out = []
    for lam in dampings:
        out += [(dict(method="cg-lora", damping=lam),
                 {n: sized(product("cg-lora", st, lam)) for n, st in stats.items()}),
                (dict(method="K-FAC Newton, full rank", damping=lam),
                 {n: newton_step(st.G, st.S, st.T, lam) for n, st in stats.items()})]
    rand = {n: sized(torch.randn(st.G.shape[0], rank, generator=g)
                     @ torch.randn(rank, st.G.shape[1], generator=g)) for n, st in stats.items()}
    return out + [
        (dict(method="lora-one", damping=None),
         {n: sized(product("lora-one", st, None)) for n, st in stats.items()}),
        (dict(method="lora-ga", damping=None),
         {n: (alpha / rank) * product("lora-ga", st, None) for n, st in stats.items()}),
        (dict(method="random", damping=None), rand),
        (dict(method="-G, full rank", damping=None), {n: -st.G for n, st in stats.items()})]


def init_row(task_name, seed, pretrained, steps=STEPS):
    """At W0 (the fresh head of `seed`), each init direction's output change on the first INIT_DEV
    dev examples (output_change, centred), against full fine-tuning's after k of its `steps` steps
    (same seed, data order and head): its whole change, and J applied to its query/value update."""
    key = dict(kind="init", task=task_name, seed=seed, steps=steps)
    rows = common.read_rows(FUNCSPACE)
    if common.has_row(FUNCSPACE, **key):
        return
    full = next((r for r in rows if r["kind"] == "train" and r["method"] == "full"
                 and r["task"] == task_name and r["seed"] == seed and r["steps"] == steps), None)
    if full is None:
        sys.exit(f"no full fine-tuning run of {task_name} seed {seed}: run --methods full first")
    t0 = time.time()
    cfg, run, task, model, tokenizer, train_enc, dev, calib = early.setup(
        task_name, "full", seed, full["lr"], pretrained, grid.DAMPING)
    subset = dev[:INIT_DEV // (2 * cfg.batch_size)]
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("query", "value")]
    stats = cglora.collect_statistics(
        model, {n: model.get_submodule(n) for n in names}, calib[0], fisher=cfg.fisher,
        generator=torch.Generator().manual_seed(seed), folds=2)  # 2 folds: for auto's λ
    auto = cglora.choose_damping(stats, {n: cfg.rank for n in names})[0]
    directions = init_directions(stats, cfg.rank, cfg.alpha, [DAMPING, auto], seed)
    at_W0 = dev_outputs(model, subset)
    whole = lambda k: torch.tensor(full["outputs"][str(k)][:len(at_W0)])  # noqa: E731  (its first)
    assert torch.allclose(at_W0, whole(0), atol=1e-4), "not full fine-tuning's W0"
    ks = [k for k in K if k < steps] + [steps]
    snapshots = torch.load(common.HERE / SNAPSHOTS / f"{task_name}-s{seed}-{steps}.pt")
    changes = centred(output_change(model, [D for _, D in directions] + [snapshots[k] for k in ks],
                                    subset))
    targets = {f"whole {k}": centred(whole(k) - at_W0) for k in ks}
    targets.update({f"target layers {k}": c for k, c in zip(ks, changes[len(directions):])})
    shifted = lambda y: y - y.mean(0)  # noqa: E731  (less the shift every example shares: a bias's)
    measures = lambda c, y: dict(cosine=cosine(c, y), explained=explained(y, c),  # noqa: E731
                                 cosine_unshifted=cosine(shifted(c), shifted(y)),
                                 explained_unshifted=explained(shifted(y), shifted(c)))
    out = [dict(label, size=math.sqrt(sum(P.square().sum().item() for P in D.values())),
                against={t: measures(c, y) for t, y in targets.items()})
           for (label, D), c in zip(directions, changes)]
    full_parts = {str(k): measures(targets[f"target layers {k}"], targets[f"whole {k}"])
                  for k in ks}  # how much of full fine-tuning's change its query/value updates make
    row = dict(key, damping=DAMPING, damping_auto=auto, dev_examples=len(at_W0), ks=ks,
               directions=out, full_parts=full_parts, seconds=time.time() - t0,
               command=f"python results/funcspace.py run --tasks {task_name} --seeds {seed} "
                       f"--steps {steps}")
    common.append_row(FUNCSPACE, row)
    print(f"{task_name} seed {seed} init (auto damping {auto:g}) ({row['seconds']:.0f} s)",
          flush=True)


def divergence(full, other):
    """How far `other`'s outputs (n x C) are from full fine-tuning's on the same examples: the mean
    KL(full || other) of the softmax and the share of equal argmax (C > 1), or the RMSE (C = 1)."""
    full = torch.as_tensor(full, dtype=torch.float64)
    other = torch.as_tensor(other, dtype=torch.float64)
    if full.shape[-1] == 1:
        return dict(rmse=(full - other).square().mean().sqrt().item())
    log_p, log_q = full.log_softmax(-1), other.log_softmax(-1)
    return dict(kl=(log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
                agreement=(full.argmax(-1) == other.argmax(-1)).double().mean().item())


def by_label(row):  # an init row's directions by LABELS key: a method's second one is at auto's λ
    seen, out = set(), {}
    for d in row["directions"]:
        out[d["method"] + (" auto" if d["method"] in seen else "")] = d
        seen.add(d["method"])
    return out


# ------------------------------------------------------------ report

def report():
    """results/README.md's funcspace block and funcspace_<task>[_<steps>].svg from
    results/funcspace.jsonl: one set of tables per run length."""
    rows = common.read_rows(FUNCSPACE)
    lengths = sorted({r["steps"] for r in rows})
    ends = ", ".join(f"{t} {schedule_end(t, glue=True)}" for t in ("cola", "sts-b"))
    text = [f"`python results/funcspace.py run --tasks cola,sts-b --seeds 0,1,2` (each row's own "
            "command is in it), then `python results/funcspace.py report`, over "
            f"{len(rows)} rows of `results/funcspace.jsonl`. all-MiniLM-L6-v2, the grid's budget "
            "(rank 8, α 16, query + value, batch 32, 16×8 calibration examples, each method's grid "
            f"rate), the first {' or '.join(map(str, lengths))} steps of the grid's 2-epoch "
            f"schedule (`--steps end`: all of it, {ends}); CG-LoRA at damping {DAMPING:g}. Mean "
            "± standard error over seeds (number of seeds)."]
    for n in lengths:
        runs = [r for r in rows if r["steps"] == n]
        tasks = sorted({r["task"] for r in runs}, key=common.TASKS.index)
        inits = {(r["task"], r["seed"]): r for r in runs if r["kind"] == "init"}
        text.append(f"\n### Runs of {n} steps")
        for task in tasks:
            text += at_init([r for k, r in sorted(inits.items()) if k[0] == task])
        for task in tasks:
            text += along_training(task, runs, inits, n, n == STEPS)
    return common.write_block("funcspace", "\n".join(text) + "\n")


def at_init(rs):
    """One task's init directions against full fine-tuning's change (init rows, in seed order)."""
    if not rs:
        return []
    ks, by = rs[0]["ks"], {}
    for r in rs:
        for label, d in by_label(r).items():
            by.setdefault(label, []).append(d)
    cell = lambda ds, t, m: mean_se([d["against"][t][m] for d in ds])  # noqa: E731
    end, lams = ks[-1], ", ".join(f"{r['damping_auto']:g}" for r in rs)
    text = [f"\n**{rs[0]['task']}, at init**: the change of the centred outputs on the first "
            f"{rs[0]['dev_examples']} dev examples along each direction (J d), against full "
            "fine-tuning's after k steps: J ΔW_k (its query/value update through the same "
            "Jacobian) and its whole change (head and every layer); "
            f"λ auto chose {lams} (per seed). Cosine; share: the part of full fine-tuning's change "
            "that the best multiple of J d explains (= cosine²); *less shift*: both with the "
            "change every example shares removed first.\n",
            "| direction | cosine, J ΔW_" + " | J ΔW_".join(map(str, ks)) + f" | whole {end} | "
            f"share of J ΔW_{end} | cosine less shift, J ΔW_{end} | whole {end} |",
            "|---|" + "---|" * (len(ks) + 4)]
    for label, name in LABELS.items():
        if ds := by.get(label):
            text.append(f"| {name} | " + " | ".join(
                [cell(ds, f"target layers {k}", "cosine") for k in ks]
                + [cell(ds, f"whole {end}", "cosine"),
                   cell(ds, f"target layers {end}", "explained"),
                   cell(ds, f"target layers {end}", "cosine_unshifted"),
                   cell(ds, f"whole {end}", "cosine_unshifted")]) + " |")
    text.append("| *full fine-tuning's J ΔW_k against its whole change* | "
                + " | ".join(mean_se([r["full_parts"][str(k)]["cosine"] for r in rs]) for k in ks)
                + " | | | " + mean_se([r["full_parts"][str(end)]["cosine_unshifted"] for r in rs])
                + " | |")
    against = lambda a, b, m: mean_se([  # noqa: E731
        x["against"][f"target layers {end}"][m] - y["against"][f"target layers {end}"][m]
        for x, y in zip(by[a], by[b])])
    def both(a, b):  # as is / less shift
        return f"{against(a, b, 'cosine')} / {against(a, b, 'cosine_unshifted')}"
    newton = "K-FAC Newton, full rank"
    text.append(f"\nPaired by seed, cosine with J ΔW_{end} (as is / less shift): CG-LoRA (λ 1) − "
                f"LoRA-One {both('cg-lora', 'lora-one')}; full-rank Newton − CG-LoRA, both λ 1 "
                f"(what rank 8 loses) {both(newton, 'cg-lora')}; full-rank Newton (λ 1) − (−G) "
                f"{both(newton, '-G, full rank')}.")
    return text


def along_training(task, runs, inits, n, default):
    """One task's outputs along training against full fine-tuning's of the same seed and step, its
    figure, and whether the init's cosine ranks the distance at the end."""
    train = {(r["method"], r["seed"]): r for r in runs
             if r["kind"] == "train" and r["task"] == task}
    seeds = sorted({s for m, s in train if m == "full"})
    methods = [m for m in METHODS[1:] if any((m, s) in train for s in seeds)]
    if not methods:
        return []
    outputs = lambda m, s, k: train[m, s]["outputs"][str(k)]  # noqa: E731
    at = sorted({int(k) for s in seeds for k in train["full", s]["outputs"]})
    dist = {(m, s): {k: divergence(outputs("full", s, k), outputs(m, s, k)) for k in at}
            for m in methods for s in seeds if (m, s) in train}
    methods.append("untrained")  # the model at W0 with the fresh head: how far full FT itself moved
    dist.update({("untrained", s): {k: divergence(outputs("full", s, k), outputs("full", s, 0))
                                    for k in at} for s in seeds})
    metrics = list(next(iter(dist.values()))[0])
    digits = lambda x: 4 if x == "kl" else 3  # noqa: E731
    text = [f"\n**{task}, along training**: each method's outputs on the first "
            f"{train['full', seeds[0]]['dev_examples']} dev examples against full fine-tuning's at "
            "the same step (same seed): " + ("mean KL(full ‖ method) of the softmax, and the share "
                                             "of examples with the same argmax" if "kl" in metrics
                                             else "RMSE of the predicted scores") + ".\n",
            "| method | " + " | ".join(f"{m.upper() if m != 'agreement' else m}, step {k}"
                                      for m in metrics for k in at) + " |",
            "|---|" + "---|" * (len(metrics) * len(at))]
    for m in methods:
        text.append(f"| {m} | " + " | ".join(
            mean_se([dist[m, s][k][x] for s in seeds if (m, s) in dist], digits(x))
            for x in metrics for k in at) + " |")
    for a, b in (("cg-lora", "lora-one"), ("cg-lora", "rslora"), ("lora-one", "rslora")):
        if both := [s for s in seeds if (a, s) in dist and (b, s) in dist]:
            text.append(f"| {a} − {b} (paired) | " + " | ".join(
                mean_se([dist[a, s][k][x] - dist[b, s][k][x] for s in both], digits(x))
                for x in metrics for k in at) + " |")
    main = metrics[0]
    series = {}
    for m in methods[:-1]:  # not "untrained": its scale would flatten the others (in the table)
        values = [[dist[m, s][k][main] for k in at] for s in seeds if (m, s) in dist]
        series[f"{m} ({len(values)})"] = (COLOURS[m], "", [
            (at[i], mean, se) for i, mean, se in common.mean_curve(values)])
    figure = f"funcspace_{task}.svg" if default else f"funcspace_{task}_{n}.svg"
    distance = "KL(full || method)" if main == "kl" else "RMSE to full"
    common.write_figure(figure, common.band_svg(
        series, f"{task}: {distance} on dev, ± one standard error"))
    text.append(f"\n![{task}: distance to full fine-tuning's predictions against step]({figure})")

    def ranked(measure):  # Spearman of the init's cosine with J dW_end and the distance at the end
        pairs = [(by_label(r)[m]["against"][f"target layers {r['ks'][-1]}"][measure],
                  dist[m, r["seed"]][at[-1]][main])
                 for (t, _), r in inits.items() if t == task
                 for m in ("cg-lora", "lora-one", "lora-ga") if (m, r["seed"]) in dist]
        return (f"{common.spearman(*map(list, zip(*pairs))):.2f} ({len(pairs)} runs)"
                if len(pairs) > 2 else "—")
    text.append(f"\nDoes the init's cosine with J ΔW_{at[-1]} rank the {main} at step {at[-1]}? "
                "Spearman over (method, seed), CG-LoRA (λ 1), LoRA-One and LoRA-GA (negative: a "
                f"larger cosine, a smaller distance): as is {ranked('cosine')}, less shift "
                f"{ranked('cosine_unshifted')}.")
    return text


def task_seed(task, s, methods, pretrained, steps):
    """One parallel job: a task and seed, full fine-tuning (and the init row, which needs it) first,
    so that an interrupted command leaves whole seeds."""
    steps = schedule_end(task) if steps == "end" else int(steps)
    for m in [m for m in METHODS if m in methods]:
        funcspace(task, m, s, pretrained, steps)
        if m == "full":
            init_row(task, s, pretrained, steps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", default=str(STEPS), help="training steps, or 'end': the last step of "
                   "train.py's schedule")
    args = common.arguments(p).parse_args(argv)
    if args.command == "report":
        return print(report())
    pretrained = args.pretrained or common.minilm()
    common.parallel(task_seed, [(t, int(s), args.methods.split(","), pretrained, args.steps)
                           for s in args.seeds.split(",") for t in args.tasks.split(",")],
                    args.workers)


if __name__ == "__main__":
    main()
