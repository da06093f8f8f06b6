#!/usr/bin/env bash
# The device checks for the day a GPU machine is lent (never needed by the tests or CI): the speed bench
# on CUDA in bf16 beside fp32 and τ kept in host memory, then LoRA experts kept factorized vs dense.
# Writes both tables under $OUT (or bench/gpu_results.md) and prints them. About 5 minutes on one GPU.
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench}/gpu_results.md"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python bench/speed.py --device cuda --dtype bfloat16 --ks 4 16 --repeats 20 --impls floor adamerge \
    --threads 4 --write "$out"
python bench/speed.py --device cuda --lora 8 --ks 4 16 64 --repeats 20 \
    --impls floor adamerge adamerge-factorized adamerge-adapters --threads 4 --write "$out"
# the merge's cost does not grow with a step's tokens, the floor's does: K = 64 at 4x the tokens
python bench/speed.py --device cuda --lora 8 --ks 64 --batch 64 --repeats 20 \
    --impls floor adamerge-factorized --threads 4 --write "$out"
cat "$out"
