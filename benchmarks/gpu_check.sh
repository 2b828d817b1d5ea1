#!/usr/bin/env bash
# GPU check of the training step: run on the GPU machine from the repository root.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh
#
# Needs the wheels of .whl/ (git-ignored, so they must be carried along with the working tree): open_clip_torch,
# ftfy, wcwidth, webdataset, braceexpand, fire, termcolor; the machine already has torch, torchvision, timm,
# huggingface_hub, safetensors, regex, tqdm, pyyaml, numpy, pillow. No network is needed: the models are built
# with random weights (no pretrained tag) and open_clip's tokenizer vocabulary ships inside its wheel.
#
# Writes into $OUT: train_step.log and train_step_<gpu>.json (the bf16 sweep, recipe paper),
# train_step_fp32.log and fp32/train_step_<gpu>.json (a 2-step fp32 check, recipe reference).
# Both runs always happen; the exit status is non-zero if either failed.
set -uo pipefail

OUT="${OUT:-benchmarks/output}"
mkdir -p "$OUT"

# (1) the missing packages, without dependency resolution (everything else is on the machine)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/*.whl failed (were the wheels carried?)" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1

# (2) machine and versions
nvidia-smi -L
python3 --version
python3 -c "import torch, open_clip, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| open_clip', open_clip.__version__, '| timm', timm.__version__)"

status=0

# (3) the benchmark with the GPU defaults: ViT-B-16-quickgelu (random weights), recipe paper (bf16 autocast),
#     4 frames, 3 warm-up + 10 timed steps per configuration; OOM configurations are reported and skipped
python3 -m benchmarks.train_step --model ViT-B-16-quickgelu --batches 32x32,64x64,128x128,256x256 \
    --steps 10 --warmup 3 --out "$OUT" 2>&1 | tee "$OUT/train_step.log" || status=1

# (4) the fp32 path on GPU: recipe reference (precision fp32, KL distillation, sigma 0.015), 8x8, 2 timed steps
python3 -m benchmarks.train_step --model ViT-B-16-quickgelu --recipe reference --batches 8x8 \
    --steps 2 --warmup 1 --out "$OUT/fp32" 2>&1 | tee "$OUT/train_step_fp32.log" || status=1

# (5) the whole trainer on the GPU (NCCL-free single rank, bf16 autocast, fused AdamW), if demo shards were carried
if [ -d demo_output/shards/labeled ]; then
    python3 -m train.main --recipe demo --device cuda --model train/model_configs/demo-clip.json --teacher_weights "" \
        --labeled demo_output/shards/labeled --unlabeled demo_output/shards/train --val demo_output/shards/val \
        --out /tmp/gpu_run --steps 20 --val_every 10 --log_every 5 --workers 2 --wandb off --progress False \
        2>&1 | tee "$OUT/train_main_gpu.log" || status=1
    cp /tmp/gpu_run/summary.json "$OUT/train_main_gpu_summary.json" 2>/dev/null || status=1
fi

echo "gpu_check: exit status $status"
exit $status
