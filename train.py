"""Fine-tune an encoder on a GLUE task with CG-LoRA (or a baseline) and evaluate it on dev.

    python train.py --task cola                                  # tiny built-in encoder, CPU
    python train.py --task rte --pretrained DIR --init lora-ga    # a Hugging Face checkpoint
    torchrun --nproc_per_node=2 train.py --task cola              # data parallel
"""
import argparse
import dataclasses
import inspect
import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import cglora
import data
import models


@dataclass
class Config:
    task: str = "cola"  # GLUE task: cola, sst-2, mrpc, qqp, sts-b, mnli, qnli, rte, wnli
    data_dir: str = None  # GLUE root; default $GLUE_DIR, else ./glue_data
    pretrained: str = None  # HF BERT/RoBERTa checkpoint dir (model + tokenizer); None: tiny encoder
    init: str = "cg-lora"  # cg-lora, cg-lora-shift, lora, rslora, lora-ga, lora-one, full
    rank: int = 8
    alpha: float = 16.0  # scaling alpha/r (alpha/sqrt(r) for rslora, lora-one, cg-lora)
    targets: str = "query,value"  # linear layers that get adapters (last name component)
    dropout: float = 0.0  # LoRA dropout
    lr: float = 1e-3  # peak AdamW learning rate (LoRA-GA and full fine-tuning want ~10x less)
    epochs: int = 3
    batch_size: int = 32  # per process
    max_len: int = 128  # tokens per example, pairs truncated longest-first
    warmup: float = 0.06  # fraction of the steps with a linear learning-rate warm-up
    weight_decay: float = 0.0
    calib_batches: int = 16  # calibration batches for the statistics (lora-ga, lora-one, cg-lora)
    calib_batch_size: int = 8
    damping: str = "auto"  # relative damping of S and T (docs/cg-lora.md section 3): a number, or auto: chosen on held-out folds (section 8.1)
    step: float = 1.0  # Newton step length; only matters with --init_norm 0
    init_norm: float = None  # ||s B A||_2 of the CG-LoRA init; None: LoRA-One's, alpha/(sqrt(r) 128)
    fisher: str = "empirical"  # empirical (true labels) or sampled (labels from the model)
    balance: str = "euclidean"  # CG-LoRA factors balanced as B^T B = A A^T, or in the curvature metric
    freeze_embeddings: bool = False  # tiny encoder: keep its random word embeddings frozen too (they train by default)
    seed: int = 0  # one seed, one result (on CPU): data order, tiny weights, fresh head, init
    device: str = "auto"  # auto, cpu, cuda
    bf16: bool = False  # autocast on CUDA; statistics and factorizations stay fp32
    out: str = None  # run directory; default runs/<task>-<init>-s<seed>
    max_steps: int = 0  # stop after this many steps (0: all epochs); the schedule spans --epochs
    resume: bool = False  # continue the run in --out from its last checkpoint
    merge: bool = False  # also write merged.pt: a plain state dict with the adapters merged
    log_every: int = 100  # steps between progress lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    why = dict(re.findall(r"^    (\w+): .*?# (.*)$", inspect.getsource(Config), re.M))  # field comments
    for f in dataclasses.fields(Config):
        if f.type is bool:
            p.add_argument(f"--{f.name}", action="store_true", help=f"{why.get(f.name, '')} (default: off)")
        else:
            kind = {"int": int, "float": float}.get(getattr(f.type, "__name__", f.type), str)
            p.add_argument(f"--{f.name}", type=kind, default=f.default,
                           help=f"{why.get(f.name, '')} (default: {f.default})")
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.init not in cglora.METHODS + ("full",):
        raise ValueError(f"--init {cfg.init!r}: choose from {', '.join(cglora.METHODS + ('full',))}")
    for name in ("rank", "epochs", "batch_size", "max_len", "calib_batches", "calib_batch_size"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.damping != "auto":
        try:
            cfg.damping = float(cfg.damping)
        except ValueError:
            raise ValueError(f"--damping takes a number or auto, got {cfg.damping!r}") from None
    if cfg.fisher not in ("empirical", "sampled") or cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError("--fisher takes empirical|sampled, --device auto|cpu|cuda")
    cfg.out = cfg.out or f"runs/{data.get_task(cfg.task).name}-{cfg.init}-s{cfg.seed}"
    return cfg


# ----------------------------------------------------------------------------- pieces


def build_model(cfg, tokenizer, num_labels):
    """The pretrained checkpoint (tokenizer unused) or the tiny encoder, seeded: same seed, same model."""
    torch.manual_seed(cfg.seed)  # the tiny encoder's random weights and any fresh head
    if cfg.pretrained:
        return models.from_pretrained(cfg.pretrained, num_labels)
    return models.Encoder(models.tiny_config(tokenizer.vocab_size, num_labels, tokenizer.pad_id))


def trainable_modules(cfg):
    """Modules that train besides the adapters: the head, and the tiny encoder's word embeddings
    (random and task-built: with them frozen, LoRA has nothing to steer and dev MCC stays at 0)."""
    return ["head"] + ([] if cfg.pretrained or cfg.freeze_embeddings else ["word_embeddings"])


def fetch_data(task, cfg, main, world, log):
    """Download the task into the data dir when its files are missing (rank 0; the other ranks wait)."""
    data_dir = data.resolve_data_dir(cfg.data_dir)
    if main and data.missing_files(task, data_dir):
        log(f"{task.dir} is not in {data_dir}: downloading it")
        data.download_task(task, data_dir, log=log)
    if world > 1:
        dist.barrier()


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def autocast(cfg, device):
    return torch.autocast("cuda", torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")


@torch.no_grad()
def evaluate(model, dev, task, cfg, device):
    model.eval()
    preds, labels, loss = [], [], 0.0
    for batch in dev:
        batch = to_device(batch, device)
        with autocast(cfg, device):
            out = model(**{k: v for k, v in batch.items() if k != "labels"}).float()
        loss += cglora._loss(out, batch["labels"]).item() * len(batch["labels"])
        preds.append(out.squeeze(-1) if task.num_labels == 1 else out.argmax(-1))
        labels.append(batch["labels"])
    model.train()
    preds, labels = torch.cat(preds).cpu(), torch.cat(labels).cpu()
    return dict(data.compute_metrics(task, preds.tolist(), labels.tolist()), loss=loss / len(labels))


def initialise(cfg, model, calib, device, log):
    """Adapters + init by method (full: every weight trains). Returns the init.json record."""
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    record = dict(method=cfg.init, layers=[])
    if cfg.init == "full":
        model.requires_grad_(True)
    else:
        layers = cglora.add_lora(model, cfg.targets.split(","), cfg.rank, cfg.alpha, cfg.dropout,
                                 rslora=cglora.RSLORA[cfg.init], trainable=trainable_modules(cfg))
        if cfg.resume:  # the checkpoint holds the initialised (and trained) weights
            return record
        stats = None
        if cfg.init not in ("lora", "rslora"):
            stats = cglora.collect_statistics(model, {n: m.base for n, m in layers.items()},
                                              (to_device(b, device) for b in calib), cfg.fisher,
                                              torch.Generator().manual_seed(cfg.seed))
        record["statistics_seconds"] = time.perf_counter() - t0
        record["layers"] = cglora.init_adapters(layers, cfg.init, stats, cfg.damping, cfg.step,
                                                cfg.init_norm, torch.Generator().manual_seed(cfg.seed), log,
                                                cfg.balance)
        record["damping"] = next((r["damping"] for r in record["layers"] if r["damping"] is not None), None)
        summarise(record["layers"], cfg.rank, log)
    record["seconds"] = time.perf_counter() - t0
    record["peak_memory_mib"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    record["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return record


def summarise(rows, rank, log):
    """The init's one-line summaries: captured energy (§3) and the §8 calibration diagnostics."""
    captured = [r["captured"] for r in rows if r["captured"] is not None]
    if captured:
        log(f"captured energy at rank {rank}: mean {sum(captured) / len(captured):.3f}, "
            f"min {min(captured):.3f} over {len(captured)} layers")
    rows = [r for r in rows if r.get("heldout") is not None]
    if rows:
        mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        ratio = lambda key: sum(r[key] for r in rows) / max(sum(r[key + "_lora_one"] for r in rows), 1e-30)  # noqa: E731
        by_damping = rows[0]["heldout_by_damping"]
        if by_damping:
            log("damping auto: held-out predicted decrease " + ", ".join(
                f"{lam:g}: {sum(r['heldout_by_damping'][lam] for r in rows):.3g}" for lam in by_damping)
                + f" -> damping {rows[0]['damping']:g}")
        log(f"calibration check: split-half overlap left {mean('overlap_left'):.2f} / right "
            f"{mean('overlap_right'):.2f}; predicted decrease vs LoRA-One's direction: held-out "
            f"{ratio('heldout'):.2f}x, in-sample {ratio('insample'):.2f}x")


def check_ranks_agree(model):
    """Under torch.distributed every rank must hold the same init: compare a checksum."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters() if p.requires_grad])
    sums = [torch.zeros(2, device=flat.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, torch.stack([flat.sum(), flat.square().sum()]))
    if any(not torch.equal(s, sums[0]) for s in sums):
        raise RuntimeError(f"ranks disagree on the initial adapters: {[s.tolist() for s in sums]}")


def peft_module_name(cfg, model):
    """Our module name -> the name the adapter is saved under. A Hugging Face checkpoint's own
    module names in its *ForSequenceClassification (`layers.0.query` -> `bert.encoder.layer.0.
    attention.self.query`, `head.out_proj` -> `classifier`: the converter's name map reversed);
    the tiny encoder keeps ours."""
    if not cfg.pretrained:
        return lambda name: name
    names, kind = models.hf_names(model.config), model.config.model_type
    hf = {ours.removesuffix(".weight"): theirs.removesuffix(".weight") for ours, theirs in names.items()}
    return lambda name: hf[name] if hf[name].startswith("classifier") else f"{kind}.{hf[name]}"


def adapter_files(cfg, model, out, name="adapter_model.bin"):
    """The adapter as peft saves it: weights (shifted inits exported against the original W0 as
    rank 2r, §5) and adapter_config.json, a peft LoraConfig with exactly our scaling. On a Hugging
    Face checkpoint the names are the checkpoint's own, so that PeftModel.from_pretrained(
    AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=...), run dir) loads it."""
    rename, state, targets, head = peft_module_name(cfg, model), {}, [], set()
    for key, value in cglora.lora_state_dict(model).items():  # base_model.model.<module>.lora_A.weight
        module, _, param = key.removeprefix("base_model.model.").rpartition(".lora_")
        state[f"base_model.model.{rename(module)}.lora_{param}"] = value
        targets.append(rename(module))
    saved = trainable_modules(cfg)  # the head, and the tiny encoder's word embeddings when they train
    for key, value in model.state_dict().items():
        if key.split(".")[0] in saved:  # in peft's modules_to_save: HF's classifier and
            module, _, param = key.rpartition(".")  # BERT's pooler whole; our head.* one by one (a ModuleDict)
            state[f"base_model.model.{rename(module)}.{param}"] = value.clone()
            head.add(rename(module).removeprefix(f"{model.config.model_type}.").split(".")[0] if cfg.pretrained
                     else module)
    torch.save(state, out / name)
    r, = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    if r == cfg.rank:  # peft computes alpha / sqrt(r) or alpha / r as LoRALinear does
        alpha, rslora = cfg.alpha, cglora.RSLORA[cfg.init]
    else:  # shifted, rank 2r: the same scaling s = alpha' / 2r
        alpha, rslora = next(m for m in model.modules() if isinstance(m, cglora.LoRALinear)).scaling * r, False
    (out / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", task_type="SEQ_CLS" if cfg.pretrained else None, base_model_name_or_path=cfg.pretrained,
        r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=cfg.dropout, bias="none",
        target_modules=sorted(set(targets)), modules_to_save=sorted(head)), indent=1))


def merged_state_dict(model):
    """A plain state dict of the model with every adapter merged (keys as before add_lora)."""
    for m in model.modules():
        if isinstance(m, cglora.LoRALinear):
            m.merge()
    state = {k.replace(".base.", "."): v.clone() for k, v in model.state_dict().items()
             if ".lora_" not in k}
    for m in model.modules():
        if isinstance(m, cglora.LoRALinear):
            m.unmerge()
    return state


def rng_states(device, world):
    """Every process's random state, which dropout draws from: its CPU generator, and its GPU's on CUDA."""
    mine = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])
    if world == 1:
        return [mine]
    gathered = [[torch.empty_like(s, device=device) for _ in range(world)] for s in mine]
    for into, s in zip(gathered, mine):
        dist.all_gather(into, s.to(device))
    return [[g[r].cpu() for g in gathered] for r in range(world)]


def set_rng_states(states, device):  # this process's entry of rng_states()
    torch.set_rng_state(states[0].cpu())
    if device.type == "cuda" and len(states) > 1:
        torch.cuda.set_rng_state(states[1].cpu(), device)


def save_atomic(obj, path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main


def train(cfg):
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    main = rank == 0
    log = print if main else (lambda *a, **k: None)
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    out = Path(cfg.out)
    if cfg.resume:
        if not (out / "checkpoint.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {out / 'checkpoint.pt'}")
        saved = json.loads((out / "config.json").read_text())
        cfg = Config(**dict(saved, resume=True, max_steps=cfg.max_steps))
    out.mkdir(parents=True, exist_ok=True)

    # data and tokenizer
    task = data.get_task(cfg.task)
    fetch_data(task, cfg, main, world, log)
    train_set = data.read_split(task, "train", cfg.data_dir)
    dev_set = data.read_split(task, "dev", cfg.data_dir)
    if cfg.pretrained:
        model = build_model(cfg, None, task.num_labels)  # first: a bad checkpoint fails fast
        tokenizer = data.load_tokenizer(cfg.pretrained)
    elif cfg.resume:
        tokenizer = data.load_tokenizer(out / "tokenizer")
    else:
        tokenizer = data.build_tokenizer([t for ex in train_set for t in ex[:2] if t])
        if main:
            tokenizer.save(out / "tokenizer")
    train_enc = data.encode_examples(train_set, tokenizer, cfg.max_len)
    dev_batches = list(data.batches(data.encode_examples(dev_set, tokenizer, cfg.max_len),
                                    2 * cfg.batch_size, tokenizer.pad_id))
    calib = list(data.batches(train_enc, cfg.calib_batch_size, tokenizer.pad_id, shuffle=True,
                              seed=cfg.seed))[:cfg.calib_batches][rank::world]
    log(f"{task.name}: {len(train_set)} train / {len(dev_set)} dev examples, vocabulary "
        f"{tokenizer.vocab_size}, device {device}, {world} process(es)")

    # model and initialisation
    if not cfg.pretrained:
        model = build_model(cfg, tokenizer, task.num_labels)
    model.to(device)
    record = initialise(cfg, model, calib, device, log)
    if world > 1:
        check_ranks_agree(model)
    if main and not cfg.resume:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        (out / "init.json").write_text(json.dumps(record, indent=1))
        if cfg.init != "full":
            adapter_files(cfg, model, out, "adapter_init.bin")  # what training starts from
        log(f"init {cfg.init}: {record['seconds']:.2f} s, peak {record['peak_memory_mib']:.0f} MiB, "
            f"{record['trainable_parameters']} trainable parameters")

    # optimisation
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = len(train_enc) // cfg.batch_size // world  # drop the ragged last batch
    if per_epoch == 0:
        raise ValueError(f"{len(train_enc)} training examples make no full batch of {cfg.batch_size} "
                         f"per process ({world} processes): lower --batch_size")
    total = per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    step, history, losses = 0, [], []  # losses: the current epoch's, so far
    if cfg.resume:
        ck = torch.load(out / "checkpoint.pt", map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if len(ck["rng"]) != world:
            raise ValueError(f"--resume: {out / 'checkpoint.pt'} was written by {len(ck['rng'])} process(es); "
                             f"resume with as many")
        set_rng_states(ck["rng"][rank], device)
        step, history, losses = ck["step"], ck["history"], ck["losses"]
        log(f"resumed from {out / 'checkpoint.pt'} at step {step}")

    def checkpoint():
        rng = rng_states(device, world)  # every rank takes part in the gather
        if main:
            save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), rng=rng, losses=losses,
                             scheduler=sched.state_dict(), step=step, history=history), out / "checkpoint.pt")

    def record_eval(epoch, train_loss):
        if not main:
            return
        metrics = evaluate(model, dev_batches, task, cfg, device)
        row = dict(step=step, epoch=epoch, train_loss=train_loss, elapsed=time.perf_counter() - t0,
                   **{f"dev_{k}": v for k, v in metrics.items()})
        history.append(row)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"eval epoch {epoch} step {step}: dev " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    t0 = time.perf_counter()
    if step == 0:
        if main and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
        record_eval(0, None)
    model.train()
    first = step
    while step < total and (not cfg.max_steps or step < cfg.max_steps):
        epoch = step // per_epoch
        order = list(data.batches(train_enc, cfg.batch_size, tokenizer.pad_id, shuffle=True,
                                  seed=cfg.seed * 1000 + epoch + 1))[rank::world][:per_epoch]
        for batch in order[step % per_epoch:]:
            batch = to_device(batch, device)
            with autocast(cfg, device):
                out_ = ddp(**{k: v for k, v in batch.items() if k != "labels"})
            loss = cglora._loss(out_, batch["labels"])  # fp32 inside
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            if step % cfg.log_every == 0 or step == total:
                rate = (step - first) / (time.perf_counter() - t0)
                log(f"step {step}/{total} | loss {sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]):.4f}"
                    f" | {rate:.1f} steps/s | eta {(total - step) / rate:.0f} s")
            if cfg.max_steps and step >= cfg.max_steps:
                break
        if step % per_epoch == 0:
            record_eval(epoch + 1, sum(losses) / max(1, len(losses)))
            losses = []
        checkpoint()

    if main:
        if cfg.init != "full":
            adapter_files(cfg, model, out)
        if cfg.merge:
            torch.save(merged_state_dict(model), out / "merged.pt")
        key = f"dev_{task.main_metric}"
        scored = [h for h in history if h["epoch"] > 0] or history
        best = max(scored, key=lambda h: h[key])
        log(f"done: {task.name} {cfg.init} dev {task.main_metric} {history[-1][key]:.4f} (best {best[key]:.4f} "
            f"at epoch {best['epoch']}), {step} steps, train {time.perf_counter() - t0:.0f} s -> {out}")
    if world > 1:
        dist.destroy_process_group()
    return history


def main(argv=None):
    try:
        train(parse_args(argv))
    except (ValueError, FileNotFoundError, NotADirectoryError, data.DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
