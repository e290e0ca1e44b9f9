"""What CG-LoRA's initialisation and training cost, against the floor and against peft.

    python bench.py --tokenizer DIR                  # roberta-base shapes (random weights), query,value, CPU
    python bench.py --targets all --device cuda      # all six linear layers of every block
    python bench.py --shape tiny --repeats 1         # seconds: the smoke test
    python bench.py --pretrained DIR                 # a Hugging Face checkpoint directory
    python bench.py --shape llama-2048 --tokenizer DIR   # a Llama-style decoder, all 7 linear targets
    python bench.py --tokenizer DIR --nproc 2        # also the cg-lora init as 2 torchrun processes
    OMP_NUM_THREADS=1 python bench.py --tokenizer DIR --cpu_time   # CPU seconds: on a CPU other jobs share
    OMP_NUM_THREADS=1 python bench.py --routes 768,2048,5632 --cpu_time   # the damping choice's two routes, per width

cg-lora is the default init (one statistics pass, damping 1, one Cholesky per factor);
cg-lora-auto the damping search and the §8 diagnostics (2 folds, 7 damping values; --auto off
skips it); cg-lora-grouped the default in groups under --budget_mib of statistics (init_in_groups,
one pass per group). Every row of a shape runs on one model class: transformers' RoBERTa (the
roberta-base shapes: --targets all is all six linears of each block) or LlamaForCausalLM (the
llama-* shapes, TinyLlama-1.1B's widths: 2048 = hidden 2048, MLP 5632, 32 heads, 4 key-value
heads, and half of them, 1024; 2 blocks; causal-LM loss), with random weights; --shape tiny is
our encoder (the smoke test, no peers).

Each measurement runs in a fresh process, so its CPU peak memory is that process's peak RSS;
times are the median of --repeats runs after one warm-up, each on a freshly built model. The
peers (peft's LoRA-GA, an HF+peft LoRA training step) are timed on the same shapes and batches
when transformers and peft are installed.
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import cglora
import data
import models
import train as train_py  # `train` names the training batches below

ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                    layer_norm_eps=1e-5, model_type="roberta")  # HF config.json keys
ALL = "query,key,value,attn_out,ffn_in,ffn_out"
LLAMA = {w: dict(vocab_size=50265, hidden_size=w, intermediate_size=w * 11 // 4, num_hidden_layers=2,
                 num_attention_heads=w // 64, num_key_value_heads=4, max_position_embeddings=256)
         for w in (1024, 2048)}  # TinyLlama-1.1B: 2048 / 5632 / 32 heads / 4 kv heads
LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
HF_TARGET = dict(query=r"attention\.self\.query", key=r"attention\.self\.key", value=r"attention\.self\.value",
                 attn_out=r"attention\.output\.dense", ffn_in=r"intermediate\.dense", ffn_out=r"output\.dense")


# ----------------------------------------------------------------------------- one measurement (child)


def setup(args, device):
    """(build_ours, build_hf, calibration batches, training batches, loss) for the chosen shape."""
    texts = ([ex.text_a for ex in data.read_split(data.get_task("cola"), "train")] if os.environ.get("GLUE_DIR")
             else [f"sentence number {i} is a short one ." for i in range(8192)])
    loss, llama = cglora.default_loss, args.shape.startswith("llama")
    blocks = dict(num_hidden_layers=args.blocks) if args.blocks else {}  # the shape's own depth by default
    if args.pretrained:
        tok, hf_dir = data.load_tokenizer(args.pretrained), args.pretrained
        build = lambda: models.from_pretrained(args.pretrained, 2)  # noqa: E731
    elif args.shape == "tiny":
        tok, hf_dir = data.build_tokenizer(texts), None
        build = lambda: models.Encoder(models.tiny_config(tok.vocab_size, 2, tok.pad_id))  # noqa: E731
    elif llama:  # one model class for ours and the peer: cglora wraps its nn.Linear layers in place
        import transformers
        tok, hf_dir, loss = data.load_tokenizer(args.tokenizer), None, cglora.causal_lm_loss
        build = lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(  # noqa: E731
            **dict(LLAMA[int(args.shape[6:])], **blocks)))
    else:  # transformers' RoBERTa for every row: ours and the peers on one model class
        import transformers
        tok, hf_dir = data.load_tokenizer(args.tokenizer), None
        build = lambda: transformers.RobertaForSequenceClassification(  # noqa: E731
            transformers.RobertaConfig(**dict(ROBERTA_BASE, **blocks)))

    def build_hf():
        import transformers
        if hf_dir:
            return transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=2)
        if args.shape == "tiny":
            raise SystemExit("peers need --shape roberta-base, llama-* or --pretrained")
        return build()

    def batches(n, size, offset=0):
        rows = [data.Example(t, None, i % 2) for i, t in enumerate(texts[offset:offset + n * size])]
        out = [{k: v.to(device) for k, v in b.items() if not (llama and k == "token_type_ids")}
               for b in data.batches(data.encode_examples(rows, tok, 128), size, tok.pad_id)]
        if llama:  # next-token labels: the input ids, padding ignored
            out = [dict(b, labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, cglora.IGNORE)) for b in out]
        return out

    return build, build_hf, batches(args.calib_batches, args.calib_batch_size), batches(4, 32, offset=4096), loss


def logits(model, batch):
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return out if torch.is_tensor(out) else out.logits


def floor_pass(model, batches, loss=cglora.default_loss):
    """Forward + backward of the frozen model down to its embeddings, no weight gradients: the
    least any gradient-based init pays for the same calibration batches."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.requires_grad_()))
    try:
        for b in batches:
            seen.clear()
            torch.autograd.grad(loss(logits(model, b), b["labels"]), seen)
    finally:
        hook.remove()


def measure(name, args):
    world, device = train_py.join(args.device)  # under torchrun: one GPU per process, as train.py
    torch.manual_seed(0)
    build, build_hf, calib, train, loss = setup(args, device)
    clock = time.process_time if args.cpu_time else time.perf_counter
    if world > 1:  # under torchrun: this rank's calibration batches (train.py's)
        calib = calib[torch.distributed.get_rank()::world]
    llama, ours_class = args.shape.startswith("llama"), args.shape == "tiny" and not args.pretrained
    targets = LLAMA_TARGETS if llama else ALL if args.targets == "all" else args.targets
    hf_targets = (targets.split(",") if llama else
                  r".*encoder\.layer\.\d+\.(" + "|".join(HF_TARGET[t] for t in targets.split(",")) + ")")
    head = [] if llama else ["head"] if ours_class else ["classifier"]
    parts = {}

    def fresh(hf=False):  # a new model for every repeat: inits mutate it
        model = (build_hf() if hf else build()).to(device)
        model.requires_grad_(False)
        return model

    def our_targets(model):  # the full names of the target layers (hf_targets' on a transformers model)
        if ours_class or llama:
            return targets.split(",")
        return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(hf_targets, n)]

    def ours_init(damping=cglora.DAMPING, folds=1, budget_mib=None):
        model = fresh()
        layers = cglora.add_lora(model, our_targets(model), 8, 16, rslora=True, trainable=head)

        def run():
            if budget_mib is not None:  # the grouped path: statistics and factors per group
                report, groups = cglora.init_in_groups(model, layers, calib, "cg-lora", budget_mib,
                                                       dict(loss=loss))
                size = {r["layer"]: r["statistics_mib"] for r in report}
                parts.setdefault("passes", []).append(len(groups))
                parts.setdefault("statistics_mib", []).append(max(sum(size[n] for n in g) for g in groups))
                return
            t0 = clock()
            stats = cglora.collect_statistics(model, {n: m.base for n, m in layers.items()}, calib, loss=loss,
                                              folds=folds)
            t1 = clock()
            if damping == "auto":  # as train.py --damping auto: the search, the init, the diagnostics
                ranks = {n: m.rank for n, m in layers.items()}
                chosen = cglora.choose_damping(stats, ranks)[0]
                report = cglora.init_adapters(layers, stats, "cg-lora", damping=chosen)
                cglora.diagnose(stats, ranks, "cg-lora", chosen)
            else:
                report = cglora.init_adapters(layers, stats, "cg-lora", damping=damping)
            parts.setdefault("statistics", []).append(t1 - t0)
            parts.setdefault("factorization", []).append(clock() - t1)
            parts.setdefault("statistics_mib", []).append(sum(r["statistics_mib"] for r in report))
        return run

    def peft_loraga():
        import peft
        model = fresh(hf=True)
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=hf_targets, init_lora_weights="lora_ga",
                                 lora_ga_config=peft.LoraGAConfig())

        def run():
            def train_step():
                for b in calib:
                    loss(logits(model, b), b["labels"]).backward()
            peft.preprocess_loraga(model, config, train_step)
            peft.get_peft_model(model, config)
        return run

    def train_step(hf=False):
        model = fresh(hf)
        if hf:
            import peft
            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=hf_targets,
                                                               modules_to_save=None if llama else ["classifier"]))
        else:
            cglora.add_lora(model, our_targets(model), 8, 16, trainable=head)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run():
            for b in train:
                with torch.autocast("cuda", torch.bfloat16, enabled=args.bf16 and device.type == "cuda"):
                    value = loss(logits(model, b), b["labels"])
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
        return run

    make = {"floor": lambda: (lambda m: lambda: floor_pass(m, calib, loss))(fresh()),
            "cg-lora": ours_init, "cg-lora-auto": lambda: ours_init("auto", folds=2),
            "cg-lora-grouped": lambda: ours_init(budget_mib=args.budget_mib),
            "peft-lora-ga": peft_loraga,
            "frozen-step": lambda: (lambda m: lambda: floor_pass(m, train, loss))(fresh()),
            "our-step": train_step, "peft-step": lambda: train_step(hf=True)}[name]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, after data and imports
    times = []
    for _ in range(args.warmups + args.repeats):  # the first --warmups runs are not timed
        fn = make()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t0)
        del fn
    per = 1 if name not in ("frozen-step", "our-step", "peft-step") else len(train)  # seconds per step
    result = dict(seconds=statistics.median(times[args.warmups:]) / per, model_mib=sum(
        p.numel() * p.element_size() for p in build().parameters()) / 2 ** 20,
                  **{k: statistics.median(v[args.warmups:]) for k, v in parts.items()})
    if device.type == "cuda":
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["rss_before_mib"] = rss0
    if torch.distributed.is_initialized():  # as train.py ends: gloo may abort a rank that exits with it alive
        torch.distributed.destroy_process_group()
    return result


def routes(widths, clock, rank=8, grid=len(cglora.DAMPING_GRID)):
    """The O(d^3) and per-iteration costs of the two routes to every lambda's direction on one fold:
    one eigh per statistics factor + the rotation C = Q_T^T G Q_S (two d^3 products, per layer), against one
    Cholesky per factor and lambda with top_r matrix-free through triangular solves (no d x d whitening)."""
    def time_of(f, n=3):
        f()
        t0 = clock()
        for _ in range(n):
            f()
        return (clock() - t0) / n
    print(f"{'d':>6}{'eigh s':>10}{'cholesky s':>12}{'eigh/chol':>10}{'2 d^3 gemm s':>14}{'iter dense ms':>15}"
          f"{'iter solves ms':>16}   per factor and fold: eigh route d^3 / Cholesky route d^3 ({grid} lambdas)")
    for d in widths:
        X = torch.randn(d, 2 * d)
        S, G, V = X @ X.T / (2 * d) + 1e-3 * torch.eye(d), torch.randn(d, d), torch.randn(d, 2 * rank)
        L, n = torch.linalg.cholesky(S), 3 if d <= 2048 else 1
        e, c, g = time_of(lambda: torch.linalg.eigh(S), n), time_of(lambda: torch.linalg.cholesky(S), n), time_of(lambda: G @ G, n)
        solve = lambda X: torch.linalg.solve_triangular(L, X, upper=False)  # noqa: E731  L^-1 X
        solve_T = lambda X: torch.linalg.solve_triangular(L.T, X, upper=True)  # noqa: E731  L^-T X

        def iteration(M, MT):  # one top_r iteration: Q = qr(M V), then qr(M^T Q)
            return torch.linalg.qr(MT(torch.linalg.qr(M(V)).Q))
        dense = time_of(lambda: iteration(lambda X: G @ X, lambda X: G.T @ X), 5 * n)
        solves = time_of(lambda: iteration(lambda X: solve(G @ solve_T(X)), lambda X: solve(G.T @ solve_T(X))), 5 * n)
        print(f"{d:>6}{e:>10.3f}{c:>12.4f}{e / c:>10.1f}{2 * g:>14.3f}{dense * 1e3:>15.2f}{solves * 1e3:>16.2f}"
              f"   {e + 2 * g:.3f} / {grid * c:.3f} s")


# ----------------------------------------------------------------------------- the table (parent)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["roberta-base", "tiny", "llama-1024", "llama-2048"], default="roberta-base")
    p.add_argument("--pretrained", default=None, help="HF checkpoint directory (overrides --shape)")
    p.add_argument("--tokenizer", default=None, help="roberta-base's tokenizer files (vocab.json, merges.txt), "
                   "for --shape roberta-base")
    p.add_argument("--targets", default="query,value", help=f"comma list, or 'all' = {ALL}")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available()
                   else "cpu", help="cuda: under torchrun, the GPU LOCAL_RANK names (train.join)")
    p.add_argument("--bf16", action="store_true", help="autocast training steps on CUDA")
    p.add_argument("--calib_batches", type=int, default=64)  # LoRA-GA's default budget: 64 x 2
    p.add_argument("--calib_batch_size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu_time", action="store_true", help="time in CPU seconds of each process (all its threads) "
                   "instead of wall seconds: ratios that hold on a CPU other jobs share (CPU only)")
    p.add_argument("--warmups", type=int, default=1, help="untimed runs first (0 for slow shapes)")
    p.add_argument("--peers", choices=["auto", "off"], default="auto", help="time peft when installed")
    p.add_argument("--json", default=None, help="write the results here (default: print only)")
    p.add_argument("--nproc", type=int, default=1, help="also time the cg-lora init under torchrun with this many "
                   "processes (each layer factorized by its owner)")
    p.add_argument("--blocks", type=int, default=None, help="roberta-base / llama-*: this many blocks "
                   "(default: the shape's 12 / 2)")
    p.add_argument("--routes", default=None, help="only time the damping choice's two routes at these widths")
    p.add_argument("--auto", choices=["on", "off"], default="on", help="also time damping auto + the diagnostics")
    p.add_argument("--budget_mib", type=float, default=None, help="also time the grouped init (init_in_groups) "
                   "under this statistics budget")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.routes:
        return routes([int(d) for d in args.routes.split(",")], time.process_time if args.cpu_time else time.perf_counter)
    if args.shape != "tiny" and not (args.pretrained or args.tokenizer):
        p.error(f"--shape {args.shape} needs --tokenizer DIR, a folder with roberta-base's vocab.json and merges.txt")
    if args.child:
        result = measure(args.child, args)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(json.dumps(result))
        return
    llama = args.shape.startswith("llama") and not args.pretrained
    lean = llama or args.targets == "all"  # wide targets: the inits only, for their time and memory
    names = ["floor", "cg-lora"] + (["cg-lora-auto"] if args.auto == "on" else [])
    names += ["cg-lora-grouped"] if args.budget_mib is not None else []
    names += [] if lean else ["frozen-step", "our-step"]
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
        peers = args.peers == "auto" and (args.shape != "tiny" or args.pretrained)
    except ImportError:
        peers = False
    names += (["peft-lora-ga"] if lean else ["peft-lora-ga", "peft-step"]) if peers else []
    forward = [f"--{k}" if v is True else f"--{k}={v}" for k, v in vars(args).items()
               if k not in ("json", "child", "nproc") and v is not None and v is not False]
    runs = {name: ([sys.executable], name) for name in names}  # name: (launcher, the child's measurement)
    if args.nproc > 1:
        runs[f"cg-lora-x{args.nproc}"] = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                           f"--nproc_per_node={args.nproc}"], "cg-lora")
    results = {}
    for name, (launch, child) in runs.items():
        proc = subprocess.run([*launch, __file__, *forward, "--child", child], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"bench {name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    mem = "peak_mib" if args.device.startswith("cuda") else "peak_rss_mib"
    r, ratios = results, {}
    for name in ("cg-lora", "cg-lora-auto", "cg-lora-grouped", "peft-lora-ga"):
        if name in r:
            ratios[f"{name} / floor (time)"] = r[name]["seconds"] / r["floor"]["seconds"]
    for name in ("cg-lora", "cg-lora-auto", "cg-lora-grouped"):
        if name in r and peers:
            ratios[f"{name} / peft-lora-ga (time)"] = r[name]["seconds"] / r["peft-lora-ga"]["seconds"]
            ratios[f"{name} / peft-lora-ga (memory)"] = r[name][mem] / r["peft-lora-ga"][mem]
    if not lean:
        ratios["our step / frozen forward+backward"] = r["our-step"]["seconds"] / r["frozen-step"]["seconds"]
        if peers:
            ratios["our step / hf+peft step"] = r["our-step"]["seconds"] / r["peft-step"]["seconds"]
    if args.nproc > 1:
        ratios[f"cg-lora factorization, {args.nproc} processes / 1"] = (r[f"cg-lora-x{args.nproc}"]["factorization"]
                                                                      / r["cg-lora"]["factorization"])
    what = args.pretrained or args.shape
    print(f"{what}, targets {LLAMA_TARGETS if llama else args.targets}, {args.device}, calibration {args.calib_batches} x "
          f"{args.calib_batch_size}, training batch 32, median of {args.repeats}"
          + (", CPU seconds" if args.cpu_time else ""))
    print(f"{'measurement':<16}{'seconds':>10}{'stats s':>10}{'factor s':>10}{mem:>16}{'statistics MiB':>16}"
          f"{'model MiB':>11}{'passes':>8}")
    for name, v in results.items():
        print(f"{name:<16}{v['seconds']:>10.4f}{v.get('statistics', float('nan')):>10.3f}"
              f"{v.get('factorization', float('nan')):>10.3f}{v[mem]:>16.0f}{v.get('statistics_mib', float('nan')):>16.0f}"
              f"{v['model_mib']:>11.0f}{v.get('passes', 1):>8.0f}")
    for k, v in ratios.items():
        print(f"{k:<44}{v:>8.2f}")
    if args.json:
        record = {k: (Path(v).name if k in ("tokenizer", "pretrained") and v else v) for k, v in vars(args).items()}
        Path(args.json).write_text(json.dumps(dict(args=record, results=results, ratios=ratios), indent=1))  # no machine paths


if __name__ == "__main__":
    main()
