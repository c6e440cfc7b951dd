#!/usr/bin/env bash
# GPU check of the 4-bit experts (issue 13), offline, about 5 minutes on one H200-class GPU (budget: 8):
#   1. a 2-layer stack of Mixtral-dimension MoE layers (hidden 4096, intermediate 14336, 8 experts, top-2,
#      2048 tokens, LoRA r=16 on router + experts): bf16 vs NF4 experts x PEFT vs folded expert LoRA,
#      tokens/s and peak memory, and their ratios (benchmarks/moe_experts.py);
#   2. the tiny 4-bit-experts recipe end to end on CUDA: as shipped, and as full QLoRA (`load_in_4bit` too)
#      from a checkpoint folder; merge (logit-checked) and the hf evaluation backend on the merged model;
#   3. `bimedix eval --backend vllm --peft` on the expert adapter (merged in a temporary folder) when vLLM is
#      installed; skipped with a message otherwise.
# No Hub access and no download: the models are random, the tokenizer ships with bimedix.
#
#   bash benchmarks/gpu_check.sh [--output DIR]     # on the GPU machine; writes DIR (default runs/gpu-check)
#   bash benchmarks/gpu_check.sh --cpu [--output DIR]   # the same steps at tiny sizes on CPU (tests/test_gpu_check.py)
set -euo pipefail

mode=gpu
output=runs/gpu-check
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu; shift ;;
    --output) output="$2"; shift 2 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--cpu] [--output DIR]" >&2; exit 2 ;;
  esac
done
if [ -e "$output" ]; then
  echo "$output exists: pass a new --output folder (this script does not write over earlier results)" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
mkdir -p "$output"
SECONDS=0
step() { echo; echo "== [$SECONDS s] $*"; }

recipe="$("$python" -c 'from bimedix.resources import resource_path; print(resource_path("recipes", "tiny", "sft_4bit_experts.yaml"))')"
if [ "$mode" = gpu ]; then
  "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: run with --cpu")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  bench=(--layers 2 --tokens 2048 --rank 16 --steps 3)
  device=(--use_cpu false --bf16 true --dtype bfloat16)
  steps=12
  # a tiny Mixtral wide enough for vLLM's attention kernels (head_dim 32)
  base_config="hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2"
else
  bench=(--layers 2 --hidden 64 --intermediate 128 --tokens 64 --rank 4 --steps 1)
  device=(--max_length 96 --per_device_train_batch_size 2 --gradient_accumulation_steps 1)
  steps=2
  base_config="hidden_size=16"
fi
"$python" -c 'import torch, transformers, peft, bitsandbytes, trl; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, trl {trl.__version__}")'

step "1. MoE stack: bf16 vs NF4 experts x PEFT vs folded expert LoRA"
"$python" "$here/moe_experts.py" "${bench[@]}" --configs "bf16 experts, PEFT LoRA, grouped_mm" \
  "bf16 experts, folded LoRA" "nf4 experts, PEFT LoRA, grouped_mm" "nf4 experts, folded LoRA"

if [ "$mode" = gpu ]; then
  step "2a. tiny 4-bit-experts recipe as shipped (NF4 experts, folded LoRA), $steps steps"
  bimedix sft --config "$recipe" --output_dir "$output/sft-4bit-experts" "${device[@]}" --max_steps "$steps" \
    --save_strategy no
fi

step "2b. full QLoRA (load_in_4bit + NF4 experts) from a checkpoint folder, $steps steps"
"$python" -c "from bimedix.training.tiny import save_tiny_model; save_tiny_model('$output/base', 'mixtral', seed=0, $base_config)"
sed -e "s|^tiny_model: .*|model_name_or_path: $output/base|" "$recipe" > "$output/sft_qlora_checkpoint.yaml"
bimedix sft --config "$output/sft_qlora_checkpoint.yaml" --output_dir "$output/sft-qlora" "${device[@]}" \
  --load_in_4bit true --use_bnb_nested_quant true --bnb_4bit_quant_type nf4 --max_steps "$steps" --save_strategy no
"$python" -c "import json; s = json.load(open('$output/sft-qlora/trainer_state.json')); print('losses:', [round(e['loss'], 3) for e in s['log_history'] if 'loss' in e])"

step "2c. merge into the 4-bit experts the adapter was trained on (logit check), then evaluate with the hf backend"
bimedix merge --base "$output/base" --adapter "$output/sft-qlora" --output "$output/merged" --quantize_experts nf4
eval_device=(); [ "$mode" = cpu ] && eval_device=(--device cpu)
bimedix eval --model "$output/merged" --tasks bimedix_medqa_en,bimedix_mmlu_anatomy_ar --limit 2 "${eval_device[@]}" \
  --output "$output/eval-hf" > "$output/eval-hf.log"
tail -n 5 "$output/eval-hf.log"

step "3. bimedix eval --backend vllm --peft (the expert adapter is merged first)"
if [ "$mode" = cpu ]; then
  echo "skipped: the vllm backend runs on CUDA only (--cpu)"
elif ! "$python" -c 'import vllm' 2>/dev/null; then
  echo "skipped: vLLM is not installed (pip install vllm)"
else
  bimedix eval --model "$output/base" --peft "$output/sft-qlora" --backend vllm \
    --tasks bimedix_medqa_en,bimedix_mmlu_anatomy_ar --limit 2 --output "$output/eval-vllm"
fi
step "done: $output"
