#!/usr/bin/env bash
# Speed of the shipped recipes on one GPU (issue 19), offline, about 8 minutes on an H200 (budget: 9.5):
#   1. recipes/bimedix-mixtral/sft_qlora.yaml as shipped (folded expert LoRA, 2 samples per padding-free
#      micro-batch), Mixtral-8x7B dimensions at 1 and 3 layers, extrapolated to 32;
#   2. the same recipe as it was before the speed work (PEFT's expert path, 1 sample x 2 accumulation steps,
#      transformers' layers): the reference the changes are measured against;
#   3. recipes/qwen3-30b-a3b/sft_qlora.yaml at 2 and 4 layers (extrapolated to 48);
#   4. recipes/olmoe-1b-7b/sft_qlora.yaml at 2 and 4 layers (extrapolated to 16).
# More runs are there to be picked with --runs:
#   mixtral-no-recompute, qwen3-no-recompute: the recipes with activation checkpointing off (what `bimedix
#     estimate-memory --gpu 80` calls faster: no layer's forward runs again in backward), measuring the speed
#     that buys and the memory of layers kept whole against the estimate;
#   mixtral-no-liger: the paper recipe with `fused_kernels: off`, against `mixtral` (Liger's RMSNorm and RoPE
#     kernels when liger-kernel is carried);
#   qwen3-4x4, olmoe-4x4: the Qwen3-30B-A3B and OLMoE-1B-7B recipes with their 16 samples per step as 4
#     padding-free micro-batches of 4 instead of 16 of 1 (a quarter of the NF4 dequantizations; sdpa attends
#     over the packed row with a block-diagonal mask), measuring the speed that buys and the peak memory of
#     4-sample rows (with their row x row sdpa mask) against the estimate, which says 4 x 4 fits 24 GB for
#     Qwen3 (21.9 GiB) and 16 GB for OLMoE (7.7 GiB);
#   qwen3-4x4-flex: qwen3-4x4 with `attn_implementation: flex_attention`, which attends within each sample's
#     blocks of the packed row instead of over the whole row (compiled by torch; its backward needs CUDA, so
#     the CPU dry run skips it);
#   flex-equivalence: `pytest -m gpu tests/test_fast_paths.py`, padding-free 2 x 1 under flex attention against
#     1 x 2 padded under sdpa, losses and adapter weights, on the tiny model (about a minute);
#   liger-equivalence: `pytest -m gpu tests/test_fused_kernels.py`, Liger's losses and gradients against
#     transformers' layers on tiny Mixtral and Qwen3-MoE models (about a minute).
# Each prints non-padding tokens/s, MFU, peak memory vs estimate-memory, projected hours and a profile
# (benchmarks/recipe_speed.py); everything goes to DIR/speed.log, the figures to DIR/*.json.
#
#   bash benchmarks/gpu_speed.sh [--output DIR]          # on the GPU machine (default DIR: runs/gpu-speed)
#   bash benchmarks/gpu_speed.sh --cpu [--output DIR]    # the same runs at toy sizes on CPU (a dry run)
#   bash benchmarks/gpu_speed.sh --runs mixtral,mixtral-no-recompute    # these runs only, in this order
#
# On the lent GPU machine (../shared/gpu/README.md): build the wheels here once, with Liger (pure Python; the
# machine's torch brings Triton) and pytest for the equivalence run
#   bash ../shared/gpu/make_wheels.sh .whl && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps -d .whl liger-kernel==0.8.5 pytest==9.2.0 pluggy==1.7.0 \
#     iniconfig==2.3.1 pygments==2.21.0
# then run, carrying `.whl`, with a timeout_s of 600:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH bash benchmarks/gpu_speed.sh --output $OUT/speed
# The checkout's own bimedix is used (this script puts the repository first on PYTHONPATH).
set -uo pipefail

mode=gpu
output=runs/gpu-speed
runs=mixtral,mixtral-before,qwen3-30b-a3b,olmoe-1b-7b
known=" mixtral mixtral-before qwen3-30b-a3b olmoe-1b-7b mixtral-no-recompute qwen3-no-recompute "
known+="mixtral-no-liger liger-equivalence qwen3-4x4 olmoe-4x4 qwen3-4x4-flex flex-equivalence "
usage="usage: bash benchmarks/gpu_speed.sh [--cpu] [--output DIR] [--runs NAME,...] (names:$known)"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu; shift ;;
    --output) output="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
for name in ${runs//,/ }; do
  [[ "$known" == *" $name "* ]] || { echo "unknown run $name; $usage" >&2; exit 2; }
done
if [ -e "$output" ]; then
  echo "$output exists: pass a new --output folder (this script does not write over earlier results)" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 USE_HUB_KERNELS=0
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python3}"
mkdir -p "$output"
log="$output/speed.log"
SECONDS=0
failed=0
step() { echo; echo "== [$SECONDS s] $*"; } >> "$log"

if [ "$mode" = gpu ]; then
  "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: run with --cpu")' \
    || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$log" 2>&1 || true
  timed=(--warmup 2 --steps 5 --profile_steps 1)
  deep=(1 3); shallow=(2 4 --); limit=(150 130 130 110)  # seconds per recipe, 520 in all for the default runs
  packed=(--per_device_train_batch_size 4 --gradient_accumulation_steps 4 --padding_free true)
else
  timed=(--cpu --warmup 1 --steps 1 --profile_steps 1)
  # 128 and 64 experts loop on CPU: the dry run takes 2 samples per step there instead of 16
  deep=(1 2); shallow=(1 2 -- --gradient_accumulation_steps 2); limit=(600 600 600 600)
  packed=(--per_device_train_batch_size 2 --gradient_accumulation_steps 1 --padding_free true)
fi
"$python" -c 'import torch, transformers, peft, trl, bitsandbytes as b; print("torch", torch.__version__,
  "transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__, "bitsandbytes",
  b.__version__)' >> "$log" 2>&1

speed() {  # name, seconds, recipe, layers..., [-- recipe flags]
  local name="$1" seconds="$2" recipe="$3"; shift 3
  step "$name: $recipe $*"
  timeout "$seconds" "$python" "$here/recipe_speed.py" --recipe "$repo/$recipe" "${timed[@]}" \
    --json "$output/$name.json" --layers "$@" >> "$log" 2>&1
  local status=$?
  [ $status -eq 0 ] || { echo "!! $name failed or timed out (exit $status)" >> "$log"; failed=1; }
}

paper=recipes/bimedix-mixtral/sft_qlora.yaml
for name in ${runs//,/ }; do
  case "$name" in
    mixtral) speed mixtral "${limit[0]}" $paper "${deep[@]}" ;;
    mixtral-before) speed mixtral-before "${limit[1]}" $paper "${deep[@]}" -- --expert_lora peft \
      --per_device_train_batch_size 1 --gradient_accumulation_steps 2 --padding_free false \
      --logging_nan_inf_filter true --fused_kernels off ;;
    qwen3-30b-a3b) speed qwen3-30b-a3b "${limit[2]}" recipes/qwen3-30b-a3b/sft_qlora.yaml "${shallow[@]}" ;;
    olmoe-1b-7b) speed olmoe-1b-7b "${limit[3]}" recipes/olmoe-1b-7b/sft_qlora.yaml "${shallow[@]}" ;;
    mixtral-no-recompute) speed mixtral-no-recompute "${limit[1]}" $paper "${deep[@]}" -- \
      --activation_checkpointing false ;;
    qwen3-no-recompute) speed qwen3-no-recompute "${limit[2]}" recipes/qwen3-30b-a3b/sft_qlora.yaml \
      "${shallow[@]}" --activation_checkpointing false ;;
    mixtral-no-liger) speed mixtral-no-liger "${limit[0]}" $paper "${deep[@]}" -- --fused_kernels off ;;
    qwen3-4x4) speed qwen3-4x4 "${limit[2]}" recipes/qwen3-30b-a3b/sft_qlora.yaml "${shallow[@]}" "${packed[@]}" ;;
    olmoe-4x4) speed olmoe-4x4 "${limit[3]}" recipes/olmoe-1b-7b/sft_qlora.yaml "${shallow[@]}" "${packed[@]}" ;;
    qwen3-4x4-flex)
      if [ "$mode" = gpu ]; then
        speed qwen3-4x4-flex 200 recipes/qwen3-30b-a3b/sft_qlora.yaml "${shallow[@]}" "${packed[@]}" \
          --attn_implementation flex_attention
      else
        step "qwen3-4x4-flex: skipped on CPU (flex attention's backward needs CUDA)"
      fi ;;
    liger-equivalence | flex-equivalence)
      tests=$([ "$name" = liger-equivalence ] && echo test_fused_kernels.py || echo test_fast_paths.py)
      step "$name: pytest -m gpu tests/$tests"
      # on CPU the CUDA tests skip: the dry run checks that they are collected
      timeout 150 "$python" -m pytest -q -m gpu -p no:cacheprovider "$repo/tests/$tests" \
        >> "$log" 2>&1 || { echo "!! $name failed or timed out" >> "$log"; failed=1; } ;;
  esac
done
step "done (failures: $failed)"
grep -E "^(Recipe|Settings|Extrapolation|Throughput|MFU|Memory at|Projected|==|!!)|(passed|failed|skipped).* in " \
  "$log"
exit $failed
