#!/usr/bin/env bash
# The README's Cost table: each shape's rows side by side in one bench.py run, on one model
# class, in CPU seconds of one thread, on an otherwise idle machine. TOKENIZERS_DIR holds roberta-base/
# (vocab.json, merges.txt); GLUE_DIR, if set, gives real CoLA calibration sentences.
#     bash results/cost_cpu.sh          # writes results/cost-cpu-<shape>.json and prints each table
#     python results/cost.py report     # then: results/README.md's table from those rows
# A virtual machine may back a page of its memory only when it is first touched (this project's did:
# 1.4 GB of zeros took 6.9 s in a fresh process, 1.6 s after 12 GiB had been touched once), which
# charges the rows that hold more memory the most: each shape first touches 60% of the available
# memory once, so that the rows time their own work.
set -euo pipefail
cd "$(dirname "$0")/.."
warm() { python -c "import torch; kb = int(open('/proc/meminfo').read().split('MemAvailable:')[1].split()[0])
torch.ones(int(kb * 1024 * 0.6) // 4)"; }
bench() { warm; OMP_NUM_THREADS=1 python bench.py --tokenizer "$TOKENIZERS_DIR/roberta-base" --repeats 1 \
    --warmups 0 --cpu_time "$@"; }
bench --json results/cost-cpu-roberta-base-qv.json
bench --targets all --blocks 2 --json results/cost-cpu-roberta-base-all-2blocks.json
bench --targets all --auto off --json results/cost-cpu-roberta-base-all.json  # auto: 2-block row
bench --shape llama-1024 --json results/cost-cpu-llama-1024.json
# the grouped path under half of the one-pass statistics (1255 MiB for the two blocks' 14 layers)
bench --shape llama-2048 --auto off --budget_mib 627 --json results/cost-cpu-llama-2048.json
