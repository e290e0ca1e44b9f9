"""Cost: what the default init (one statistics pass, λ = 1) costs beside peft's LoRA-GA, in CPU
seconds of one thread and peak memory, at five shapes of two model classes.

    bash results/cost_cpu.sh          # reruns every shape with bench.py (an idle machine, long)
    python results/cost.py report     # results/README.md's cost blocks

The rows are bench.py's JSON reports, one file per shape: results/cost-cpu-<shape>.json from the
current run, results/cost-first-cpu-<shape>.json from the first run of results/cost_cpu.sh, made
before it touched the machine's memory first. The README's Cost table is the current block's
table, which tests/test_cost.py holds equal to it.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results import common  # noqa: E402

# each shape's file name and its label, in the table's order (×n: n blocks)
SHAPES = {"roberta-base-qv": "RoBERTa q,v ×12", "roberta-base-all-2blocks": "RoBERTa all 6 ×2",
          "roberta-base-all": "RoBERTa all 6 ×12", "llama-1024": "Llama-1024, 7 ×2",
          "llama-2048": "Llama-2048 all 7 ×2"}
RUNS = {"cost": "cost-cpu", "cost-first": "cost-first-cpu"}  # each block and its rows' prefix


def read(prefix):
    """{shape: bench.py's report} of one run."""
    return {shape: json.loads((common.HERE / f"{prefix}-{shape}.json").read_text())
            for shape in SHAPES}


def cell(r):  # one measurement: CPU seconds / peak RSS in MiB
    return f"{r['seconds']:.1f} / {r['peak_rss_mib']:.0f}"


def over(r, peer):  # time and peak memory as multiples of the peer's
    return f"{r['seconds'] / peer['seconds']:.2f} / {r['peak_rss_mib'] / peer['peak_rss_mib']:.2f}"


def table(prefix):
    """One row per shape: the floor, peft's LoRA-GA, the default init and it ÷ LoRA-GA, its
    statistics, the damping search with the diagnostics where run; the grouped path (a memory
    budget, several statistics passes) in a row of its own under the shape it ran on."""
    text = ["| CPU s / MiB | floor | peft LoRA-GA | CG-LoRA default | ÷ LoRA-GA | stats MiB | "
            "`auto` + diag. |", "|---|---|---|---|---|---|---|"]
    for shape, report in read(prefix).items():
        r = report["results"]
        peer, lean = r["peft-lora-ga"], r["cg-lora"]
        auto = cell(r["cg-lora-auto"]) if "cg-lora-auto" in r else "not run"
        text.append(f"| {SHAPES[shape]} | {cell(r['floor'])} | {cell(peer)} | {cell(lean)} | "
                    f"**{over(lean, peer)}** | {lean['statistics_mib']:.0f} | {auto} |")
        if "cg-lora-grouped" in r:
            g = r["cg-lora-grouped"]
            text.append(f"| the same, grouped, {report['args']['budget_mib']:g} MiB | | | "
                        f"{cell(g)} | {over(g, peer)} | {g['statistics_mib']:.0f} | "
                        f"{g['passes']} passes |")
    return text


def steps(prefix):
    """The training steps timed beside the inits (query and value only), CPU seconds a step."""
    r = read(prefix)["roberta-base-qv"]["results"]
    ours, frozen, peft = (r[k]["seconds"] for k in ("our-step", "frozen-step", "peft-step"))
    return (f"A training step on {SHAPES['roberta-base-qv']} (batch 32, CPU seconds): ours "
            f"{ours:.2f}, the frozen model's\nforward + backward {frozen:.2f}, transformers + "
            f"peft {peft:.2f}: ours is {ours / frozen:.2f}× the first and {ours / peft:.2f}× the "
            "second.\n")


def report():
    """results/README.md's two cost blocks from the rows of both runs."""
    texts = []
    for block, prefix in RUNS.items():
        text = "\n".join([f"`python results/cost.py report` over `results/{prefix}-*.json` "
                          f"(`bash results/cost_cpu.sh`):\n"] + table(prefix)) + "\n"
        if block == "cost":
            text += "\n" + steps(prefix)
        common.write_block(block, text)
        texts.append(text)
    return "\n".join(texts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["report"], help="rerun: bash results/cost_cpu.sh")
    p.parse_args(argv)
    print(report())


if __name__ == "__main__":
    main()
