"""QLoRA: how far is the init on a 4-bit base from the init on the full-precision one, and what
does it cost?

    OMP_NUM_THREADS=1 python results/qlora.py run   # needs GLUE_DIR (CoLA)
    python results/qlora.py report   # results/README.md's qlora block

all-MiniLM-L6-v2 loaded twice by transformers, in fp32 and in 4 bits (bitsandbytes NF4, compute
fp32, every linear layer but the classifier, on the CPU), with the same seeded classifier; the
grid's budget (common.BUDGET: rank 8, alpha 16, query and value, 16 x 8 CoLA calibration examples
in train.py's seeded order). Each base is initialised in its own process (cg-lora and lora-one from
one statistics pass), which reports the seconds and the peak RSS of collect_statistics +
init_adapters (the peak reset before, /proc/self/clear_refs); then per layer: the overlap of the
column spaces of B and of A^T (4-bit against fp32; 1 = the same subspace, r / d = random) and the
predicted decrease (cglora.predicted_decrease on the fp32 statistics) of the 4-bit init over the
fp32 init's. One row in results/qlora.jsonl; a row already there is skipped. Needs transformers,
bitsandbytes (the qlora extra) and the checkpoint (common.minilm).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cglora  # noqa: E402
import data  # noqa: E402
from results import common  # noqa: E402
from results.common import BUDGET  # noqa: E402

QLORA = "qlora.jsonl"
METHODS = ("cg-lora", "lora-one")
KEY = dict(model="all-MiniLM-L6-v2", task="cola", seed=0)


def model(base, head, pretrained):
    """BertForSequenceClassification (2 labels) in fp32 (its seeded classifier) or in NF4 (the
    classifier `head`, the fp32 model's state: both bases start from the same head)."""
    import transformers
    if base == "fp32":
        torch.manual_seed(KEY["seed"])
        return transformers.BertForSequenceClassification.from_pretrained(pretrained, num_labels=2)
    bits = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch.float32,
                                           llm_int8_skip_modules=["classifier"])
    nf4 = transformers.BertForSequenceClassification.from_pretrained(
        pretrained, num_labels=2, quantization_config=bits, device_map="cpu")
    nf4.classifier.load_state_dict(head)
    return nf4


def calibration(pretrained):  # train.py's calibration batches for CoLA at the grid's budget
    tokenizer = data.load_tokenizer(pretrained)
    train = data.encode_examples(data.read_split(data.get_task(KEY["task"]), "train"), tokenizer,
                                 BUDGET["max_len"])
    batches = data.batches(train, BUDGET["calib_batch_size"], tokenizer.pad_id, shuffle=True,
                           seed=KEY["seed"])
    return [b for _, b in zip(range(BUDGET["calib_batches"]), batches)]


def mib(field):  # this process's VmRSS (resident now) or VmHWM (peak since the last reset)
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith(field)).split()[1]) / 1024


def initialise(base, out, pretrained):
    """One base's statistics and inits, in this process: their factors, statistics and classifier
    go to `out` (beside fp32.pt, whose classifier NF4 takes), their cost to stdout."""
    head = None if base == "fp32" else torch.load(Path(out).with_name("fp32.pt"))["head"]
    net, batches = model(base, head, pretrained), calibration(pretrained)
    head = {k: v.clone() for k, v in net.classifier.state_dict().items()}
    packed = sum(p.numel() for p in net.parameters() if not p.is_floating_point())
    rss = mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the init's
    t0, cpu0 = time.perf_counter(), time.process_time()
    layers = cglora.add_lora(net, ["query", "value"], BUDGET["rank"], BUDGET["alpha"], rslora=True)
    stats = cglora.collect_statistics(net, {n: m.base for n, m in layers.items()}, batches)
    factors = {}
    for method in METHODS:
        cglora.init_adapters(layers, stats, method)
        factors[method] = {n: (m.lora_B.detach().clone(), m.lora_A.detach().clone())
                           for n, m in layers.items()}
    cost = dict(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - cpu0,
                peak_mib=mib("VmHWM"), rss_before_mib=rss, packed_params=packed)
    torch.save(dict(factors=factors, stats={n: (s.G, s.S, s.T) for n, s in stats.items()},
                    head=head), out)
    print(json.dumps(cost))


def run(pretrained):
    """Both bases, each in a process of its own (each peak its own; fp32 first, for its head),
    compared layer by layer: one row."""
    if common.has_row(QLORA, **KEY):
        return
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for base in ("fp32", "nf4"):
            out = Path(tmp) / f"{base}.pt"
            done = subprocess.run([sys.executable, __file__, "run", "--base", base, "--out",
                                   str(out), "--pretrained", pretrained],
                                  check=True, capture_output=True, text=True)
            runs[base] = dict(cost=json.loads(done.stdout.strip().splitlines()[-1]),
                              **torch.load(out))
    stats = runs["fp32"]["stats"]
    row = dict(KEY, targets="query,value", **{k: BUDGET[k] for k in (
        "rank", "alpha", "calib_batches", "calib_batch_size", "max_len")},
        torch=torch.__version__, cost={b: r["cost"] for b, r in runs.items()},
        command="OMP_NUM_THREADS=1 python results/qlora.py run")
    first = next(iter(runs["fp32"]["factors"]["cg-lora"].values()))[0]
    row.update(layers=len(stats), width=first.shape[0])  # query, value: d x d, one width
    for method in METHODS:
        full, nf4 = runs["fp32"]["factors"][method], runs["nf4"]["factors"][method]
        left = [cglora.overlap(nf4[n][0], full[n][0]) for n in full]
        right = [cglora.overlap(nf4[n][1].T, full[n][1].T) for n in full]
        q = {b: sum(cglora.predicted_decrease(*f[n], *stats[n]) for n in full)
             for b, f in (("fp32", full), ("nf4", nf4))}
        row[method] = dict(overlap_left=sum(left) / len(left), overlap_left_min=min(left),
                           overlap_right=sum(right) / len(right), overlap_right_min=min(right),
                           q_fp32=q["fp32"], q_nf4=q["nf4"], q_ratio=q["nf4"] / q["fp32"])
    common.append_row(QLORA, row)


def report():
    """results/README.md's qlora block from results/qlora.jsonl's row."""
    row = common.read_rows(QLORA)[-1]
    direction = ["| method | overlap B (min) | overlap Aᵀ (min) | q(NF4 init) / q(fp32 init) |",
                 "|---|---|---|---|"]
    for method in METHODS:
        r = row[method]
        direction.append(f"| {method} | {r['overlap_left']:.3f} ({r['overlap_left_min']:.3f}) | "
                         f"{r['overlap_right']:.3f} ({r['overlap_right_min']:.3f}) | "
                         f"{r['q_ratio']:.3f} |")
    cost = ["| base | seconds (CPU) | peak RSS MiB during it | RSS MiB before |",
            "|---|---|---|---|"]
    for base, c in row["cost"].items():
        cost.append(f"| {base} | {c['seconds']:.1f} ({c['cpu_seconds']:.1f}) | "
                    f"{c['peak_mib']:.0f} | {c['rss_before_mib']:.0f} |")
    fp32, nf4 = row["cost"]["fp32"], row["cost"]["nf4"]
    text = (f"`{row['command']}`, then `python results/qlora.py report` (row: "
            "`results/qlora.jsonl`). Overlap of the 4-bit init's column spaces with the fp32 "
            f"init's (mean over the {row['layers']} layers, the lowest in brackets; 1 = the same, "
            f"{row['rank']}/{row['width']} = random), and the decrease the fp32 statistics predict "
            "for the 4-bit init over the fp32 init's (`predicted_decrease`, summed over the "
            "layers):\n\n" + "\n".join(direction)
            + "\n\nCost of `collect_statistics` + both inits, one thread, one run each (the NF4 "
            f"base: {nf4['cpu_seconds'] / fp32['cpu_seconds'] - 1:+.0%} CPU time, "
            f"{nf4['peak_mib'] - nf4['rss_before_mib']:.0f} MiB above its start against the fp32 "
            f"base's {fp32['peak_mib'] - fp32['rss_before_mib']:.0f}):\n\n" + "\n".join(cost)
            + "\n")
    return common.write_block("qlora", text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report"])
    p.add_argument("--pretrained", default=None, help="checkpoint dir (default: all-MiniLM-L6-v2)")
    p.add_argument("--base", choices=["fp32", "nf4"], help="(run's own child process) one base")
    p.add_argument("--out", help="(run's own child process) where that base's init goes")
    args = p.parse_args(argv)
    if args.command == "report":
        return print(report())
    pretrained = args.pretrained or common.minilm()
    if args.base:
        return initialise(args.base, args.out, pretrained)
    run(pretrained)


if __name__ == "__main__":
    main()
