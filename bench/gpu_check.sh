#!/usr/bin/env bash
# Device check: the throughput and memory numbers of BENCHMARKS.md that need a GPU, in one script.
#
#   bench/gpu_check.sh          # on one CUDA GPU (about 8 minutes on an H100)
#   bench/gpu_check.sh --cpu    # the same steps end to end on CPU with the tiny model (a few minutes; for CI)
#
# Steps (each log under $GPU_CHECK_OUT, default runs/gpu_check/):
#   1. tree_kernel  packed rows + the tree attention kernel (FlexAttention on CUDA) against one pair per forward
#                   with the dense mask: loss and every gradient (bench/tree_kernel_check.py)
#   2. trl          our train stage against TRL's DPOTrainer, both on the device (bench/train_vs_trl.py;
#                   SmolLM2-135M, bf16 and fp32, reference on the fly and precomputed, train.pack_tokens on)
#   3. pack_1b      one pair per forward vs packed rows vs padded rows at a random-init 1B shape in bf16: pairs/s
#                   and peak memory (bench/pack_throughput.py)
#   4. big_step     one training step of a 7B-shape Llama, FSDP2 and gradient checkpointing (bench/big_step.py)
#
# The GPU machine has no network: what its image lacks (TRL) is installed from wheel files carried along,
# $WHEELS (default .cache/wheels; fill it where there is network with
#   .venv/bin/pip download -d .cache/wheels -c constraints.txt "trl==1.16.0").
# Python: $PYTHON (default .venv/bin/python). Exit status 1 when any step fails; every step still runs.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; elif [[ -n "${1:-}" ]]; then echo "usage: $0 [--cpu]" >&2; exit 2; fi
PY=${PYTHON:-.venv/bin/python}
LOGS=${GPU_CHECK_OUT:-runs/gpu_check}
WHEELS=${WHEELS:-.cache/wheels}
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
mkdir -p "$LOGS"

if ! "$PY" -c "import trl" 2>/dev/null; then
    if [[ -d "$WHEELS" ]]; then
        "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" -c constraints.txt "trl==1.16.0" || exit 1
    else
        echo "trl is not installed and $WHEELS holds no wheels (see the header of $0)" >&2
        exit 1
    fi
fi
if [[ $MODE == gpu ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device here: run $0 --cpu" >&2
    exit 1
fi
if [[ $MODE == cpu ]]; then export CUDA_VISIBLE_DEVICES=""; fi

"$PY" - <<'EOF' | tee "$LOGS/environment.log"
import os, platform, torch, transformers
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
print(f"device: {device}; torch {torch.__version__}, transformers {transformers.__version__}; load average {os.getloadavg()}")
EOF

FAILED=()
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log it, keep going on failure
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local status=$?
    grep -v -i -E "warning|warn\(|^\s*$" "$LOGS/$name.log" | grep -E "^\||pairs/s|OK|FAILED|differ|step|peak|positions|load|device|shape|repeat|rep " | tail -40
    echo "-- $name: exit $status, $((SECONDS - started)) s"
    if [[ $status -ne 0 ]]; then FAILED+=("$name"); tail -20 "$LOGS/$name.log"; fi
}

ONE_B=(model.tiny.hidden_size=2048 model.tiny.intermediate_size=8192 model.tiny.num_layers=16 model.tiny.num_heads=32
       model.tiny.max_position_embeddings=4096)
if [[ $MODE == gpu ]]; then
    step tree_kernel 120 "$PY" bench/tree_kernel_check.py
    step trl 240 "$PY" bench/train_vs_trl.py --precisions bf16 fp32 --repeats 1 --skip-rss --pack-tokens 4096
    step pack_1b 150 "$PY" bench/pack_throughput.py --model tiny --extra "${ONE_B[@]}" --precision bf16 --padded \
        --budgets 2048 8192 --pairs 32 --problems 30 --reps 2 --max-length 512 --cache .cache/gpu_check_1b
    step big_step 120 "$PY" bench/big_step.py
else  # generous limits: a shared CI runner can be several times slower than an idle one
    step tree_kernel 600 "$PY" bench/tree_kernel_check.py
    step trl 900 "$PY" bench/train_vs_trl.py --model tiny --precisions fp32 --cases b --repeats 1 --skip-rss \
        --pack-tokens 1024
    step pack_1b 600 "$PY" bench/pack_throughput.py --model tiny --padded --budgets 1024 --pairs 8 --problems 8 \
        --reps 1 --cache .cache/gpu_check_cpu
    step big_step 600 "$PY" bench/big_step.py --cpu --prompt 32 --response 16
fi

if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "gpu_check ($MODE): FAILED: ${FAILED[*]} (logs in $LOGS)"
    exit 1
fi
echo "gpu_check ($MODE): all steps passed (logs in $LOGS)"
