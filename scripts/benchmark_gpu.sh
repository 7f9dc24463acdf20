#!/usr/bin/env bash
# The whole GPU measurement in one command, within ten minutes on one H100/H200-class device:
#   scripts/benchmark_gpu.sh            (PYTHON=... to choose the interpreter, OUT=... the JSON directory)
# Real sizes in bf16: BLIP-base caption greedy / beam 3 at batch 64 plus each side's best batch (64, 256, 1024),
# ITM / ITC, BLIP-2 ViT-g + OPT-2.7b and FlanT5-XL caption / VQA, the training steps, each with blip compiled
# (CUDA graphs) next to eager; then one fine-tuning step's memory (full vs LoRA), load time and memory. Results
# after every workload go to $OUT/*.json and the GPU section of docs/benchmarks.md, so a run cut short keeps what
# it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmark_gpu}
mkdir -p "$OUT"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true

timeout 420 "$PYTHON" scripts/benchmark.py --device cuda --dtype bf16 --size real --batch 64 --iters 5 --compile \
    --best-batches 64,256,1024 --new-tokens 20 \
    --only caption,retrieval,blip2_opt,blip2_t5,caption_train_step,blip_pretrain_step,blip2_stage1_step,blip2_stage2_step \
    --note "scripts/benchmark_gpu.sh" --out "$OUT/gpu.json" --markdown docs/benchmarks.md || echo "main run: exit $?"
# fine-tuning memory, ViT-g + OPT-2.7b: full (the blip2_caption recipe: ViT + Q-Former train) vs LoRA r 8 on the LLM
timeout 240 "$PYTHON" scripts/benchmark.py --device cuda --dtype bf16 --size real --batch 16 --iters 3 \
    --only finetune_memory --note "fine-tuning step memory" --out "$OUT/gpu_finetune.json" || echo "finetune run: exit $?"
timeout 150 "$PYTHON" scripts/benchmark.py --device cuda --dtype bf16 --size real --iters 1 --only load \
    --note "load: CPU, fp32, fresh processes" --out "$OUT/gpu_load.json" || echo "load run: exit $?"
