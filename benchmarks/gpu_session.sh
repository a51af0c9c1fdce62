#!/usr/bin/env bash
# One prepared run on a lent GPU machine (about ten minutes): sampling and training speed at the paper's
# size, then the demo model trained longer than a laptop can. Everything lands in $OUT:
#   bench.log      sample_speed.py and train_speed.py output
#   train.log      the demo model's training output
#   demo.tar       the trained model folder (final, or the newest complete checkpoint if time ran out)
#   train_log.csv, last_grid.png   its loss curve and latest sample grid
#
#   OUT=/tmp/out bash benchmarks/gpu_session.sh
# A machine without diffusers gets it from wheels in .whl/ (pip download ... -d .whl diffusers).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/segdiff-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
STEPS=${DEMO_STEPS:-8000}
DEADLINE=${DEADLINE:-570}  # seconds for the whole script; training gets what the benchmarks leave

[ "${BENCH:-1}" = 1 ] && {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
  timeout 150 python3 benchmarks/sample_speed.py --preset paper --size 256 --batch 64 --repeats 2
  timeout 120 python3 benchmarks/train_speed.py --preset paper --img_size 256 --batch 16 --mixed_precision bf16 \
    --steps 6 --warmup 3 --rounds 2
} 2>&1 | tee "$OUT/bench.log"

# The demo model: the same data and flags as the CPU-trained one (held-out test ids stay held out), a
# larger batch, bf16, and as many steps as the time allows; checkpoints make a cut run still usable.
rm -rf /tmp/run /tmp/data
python3 -m segdiff.phantoms /tmp/data --family breast --size 64 --n-train 2000 --n-val 64 --n-test 64 --seed 0 \
  > /dev/null 2>&1
timeout $((DEADLINE - SECONDS - 20)) python3 train_cli.py --mode train --model_type DDPM --img_size 64 --num_img_channels 1 \
  --dataset phantom_breast --img_dir /tmp/data/img --seg_dir /tmp/data/mask --segmentation_guided \
  --num_segmentation_classes 4 --use_ablated_segmentations --preset small --train_batch_size 64 \
  --eval_batch_size 8 --learning_rate 3e-4 --lr_warmup_steps 500 --ema --mixed_precision bf16 \
  --max_train_steps "$STEPS" --checkpointing_steps 1000 --dataloader_num_workers 4 \
  --sampler dpm++ --num_inference_steps 20 --class_names background breast vessels fibroglandular \
  --output_dir /tmp/run > /tmp/train_full.log 2>&1
echo "train exit $?" > "$OUT/train.log"
tr '\r' '\n' < /tmp/train_full.log | awk 'NR % 500 == 1' >> "$OUT/train.log"
tr '\r' '\n' < /tmp/train_full.log | tail -n 40 >> "$OUT/train.log"
tail -n 3 /tmp/run/train_log.csv >> "$OUT/train.log" 2>/dev/null

model=/tmp/run
if ! grep -q '"finished": true' /tmp/run/segdiff_card.json 2>/dev/null; then
  model=$(ls -d /tmp/run/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -n 1)
fi
[ -n "$model" ] && tar -C "$model" -cf "$OUT/demo.tar" model_index.json segdiff_card.json unet scheduler \
  && cp /tmp/run/train_log.csv "$OUT/" && cp "$(ls /tmp/run/samples/*.png | sort | tail -n 1)" "$OUT/last_grid.png"
echo "model from $model" >> "$OUT/train.log"
