#!/usr/bin/env bash
# Every GPU number of the README's speed table in one run of under 8 minutes on an H100/H200, then a table:
# sampling (issue 13 item 4: paper preset, 256 px, batch 64, default steps, against fp32 DDIM 50 in the
# original loop) and training (item 3: paper preset, 256 px, batch 16, on the real psfhs-256 images and
# masks, against the original loop), each with torch.compile. Logs and JSON land in $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_session.sh          # on the GPU machine
#   bash benchmarks/gpu_session.sh --dry-run             # tiny sizes on a CPU: the same code paths, to
#                                                          know it will not crash on the GPU
#   bash benchmarks/gpu_session.sh --train-demo          # then train the demo model in the time left
#   bash benchmarks/gpu_session.sh --no-bench --train-demo   # only the demo model (psfhs-128 in shared/data)
#   bash benchmarks/gpu_session.sh --no-bench --train-upscaler   # only the 256 px cascade (issue 32): a
#                                                          longer-trained upscaler over the bundled base, its student
#
# The data: $DATA, else shared/data/psfhs-256 or data/psfhs-256 in the repository root (the device machine gets
# it there when it is carried: `cp -r ../shared/data/psfhs-256 data/`, 44 MB, carry ["data/psfhs-256"]), else
# ../shared/data/psfhs-256 beside the checkout, else synthetic phantoms (said so).
# A machine without diffusers gets it from wheels in .whl/ (pip download ... -d .whl diffusers).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/segdiff-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DRY=0 DEMO=0 BENCH=1 UPSCALER=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --train-demo) DEMO=1 ;;
    --train-upscaler) UPSCALER=1 ;;
    --no-bench) BENCH=0 ;;
    *) echo "unknown argument $arg (expected --dry-run, --train-demo, --train-upscaler or --no-bench)" >&2; exit 2 ;;
  esac
done
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# What a training run leaves in $OUT: NAME.log (its exit status, every 200th line of its output and the last 30),
# NAME_train_log.csv, and NAME.tar holding FILE... of its model (the finished one, else its last checkpoint).
latest() {  # the model a run folder holds: the finished one, else its last checkpoint, else nothing
  if grep -q '"finished": true' "$1/segdiff_card.json" 2>/dev/null; then echo "$1"; return; fi
  ls -d "$1"/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -n 1
}
bring_back() {  # bring_back STATUS RUN_DIR OUTPUT_FILE NAME FILE...  (RUN_DIR may be a checkpoint itself)
  local status=$1 run=$2 output=$3 name=$4 model
  shift 4
  echo "$name exit $status" > "$OUT/$name.log"
  tr '\r' '\n' < "$output" | grep -v '^\s*$' | awk 'NR % 200 == 1' >> "$OUT/$name.log"
  tr '\r' '\n' < "$output" | grep -v '^\s*$' | tail -n 30 >> "$OUT/$name.log"
  cp "$run/train_log.csv" "$OUT/${name}_train_log.csv" 2>/dev/null
  model=$(latest "$run")
  [ -z "$model" ] && [ -f "$run/model_index.json" ] && model=$run
  [ -n "$model" ] && tar -C "$model" -cf "$OUT/$name.tar" "$@"
  echo "$name from $model" >> "$OUT/$name.log"
}

DATA=${DATA:-}
for candidate in shared/data/psfhs-256 data/psfhs-256 ../shared/data/psfhs-256; do
  [ -z "$DATA" ] && [ -d "$candidate/img/train" ] && DATA=$candidate
done
data_args=()
if [ -n "$DATA" ]; then data_args=(--data "$DATA" --num_classes 3); else echo "psfhs-256 not found: training on phantoms"; fi

if [ "$DRY" = 1 ]; then
  sample=(--preset tiny --size 32 --batch 2 --rounds 1)
  training=(--preset tiny --img_size 32 --batch 4 --warmup 2 --steps 2 --log_every 2 --rounds 1)
  limits=(1200 1200)
else
  sample=(--preset paper --size 256 --batch 64 --rounds 1)
  # One compiled training row (compiling the paper network's forward and backward takes 100 s): channels-last,
  # which the H200 profile favours; contiguous measured 2.16x (README).
  training=(--preset paper --img_size 256 --batch 16 --warmup 10 --steps 30 --log_every 10 --rounds 1
            --compile_layout channels_last)
  limits=(240 280)  # seconds: with the machine's start, about 8 minutes
fi
if [ "$BENCH" = 1 ]; then
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU (dry run)"
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
  timeout "${limits[0]}" python3 benchmarks/sample_speed.py "${sample[@]}" --compile --json "$OUT/sample.json"
  timeout "${limits[1]}" python3 benchmarks/train_speed.py "${training[@]}" "${data_args[@]}" --mixed_precision bf16 \
    --compile --json "$OUT/train.json"
} 2>&1 | tee "$OUT/bench.log"

python3 - "$OUT" <<'PY' | tee "$OUT/table.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("sample", "train"):
    path = out / f"{name}.json"
    if not path.exists():
        print(f"{name}: no result (see bench.log)\n")
        continue
    result = json.loads(path.read_text())
    print(f"**{name}** on {result['device']}\n\n| row | steps/s | images/s | x original | MFU |\n|---|---|---|---|---|")
    for row in result["rows"]:
        steps = f"{row['steps_per_s']:.2f}" if "steps_per_s" in row else "-"
        mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") else "n/a"
        print(f"| {row['row']} | {steps} | {row['images_per_s']:.2f} | {row['ratio']:.2f}x | {mfu} |")
    print()
PY
fi

if [ "$UPSCALER" = 1 ]; then
  # Issue 32: the 256 px cascade's upscaler trained far longer, in two runs within $UPS_DEADLINE, over the
  # bundled cascade's base (psfhs-ultrasound-64-medium and its 2-step student, which the upscaler's run copies):
  # 1. the upscaler, the bundled one's preset (so a CPU draws it as fast) trained about 20x longer: batch 64 of
  #    128 px crops, bf16;
  # 2. its 2-step student, with the patch critic (--adversarial_weight 0.05, as the bundled one's since 2026-12-08).
  # A run that is cut leaves its last checkpoint, which the next one starts from. What comes back
  # ($OUT/upscaler.tar) is a complete cascade folder; on the CPU, copy the bundled model's segmenter/ and
  # background record in, then `quality evaluate --realism`.
  if [ -z "$DATA" ]; then echo "psfhs-256 not found: no upscaler trained" | tee "$OUT/upscaler.log"; exit 1; fi
  UPS_STEPS=${UPS_STEPS:-12000} STUDENT_STEPS=${STUDENT_STEPS:-1500}
  UPS_DEADLINE=${UPS_DEADLINE:-540}  # seconds for the whole script: with the start, under the 15 device minutes
  batch=64 crop=128 workers=6 checkpoints=500
  if [ "$DRY" = 1 ]; then UPS_STEPS=3 STUDENT_STEPS=2 batch=2 crop=64 workers=0 checkpoints=2; fi
  guided=(--segmentation_guided --num_segmentation_classes 3 --mixed_precision bf16 --seed 0
          --save_image_epochs 100000 --save_model_epochs 100000 --checkpoints_total_limit 2)
  rm -rf /tmp/ups /tmp/ups-student
  base=assets/models/psfhs-ultrasound-256/base
  left=$((UPS_DEADLINE - SECONDS - ${UPS_STUDENT_S:-120} - 40))
  timeout "$left" python3 train_cli.py --mode train --dataset psfhs --img_size 256 --img_dir "$DATA/img" \
    --seg_dir "$DATA/mask" "${guided[@]}" --use_ablated_segmentations --upscale_from "$base" --preset upscaler \
    --crop_size "$crop" --train_batch_size "$batch" --max_train_steps "$UPS_STEPS" \
    --checkpointing_steps "$checkpoints" --dataloader_num_workers "$workers" --sampler dpm++ \
    --num_inference_steps 12 --output_dir /tmp/ups > /tmp/ups_full.log 2>&1  # dpm++ 12: a grid in seconds
  status=$?
  cascade=$(latest /tmp/ups)
  if [ -n "$cascade" ]; then
    left=$((UPS_DEADLINE - SECONDS - 25))
    timeout "$left" python3 train_cli.py --mode distill --model_dir "$cascade" --img_size 256 \
      --img_dir "$DATA/img" --seg_dir "$DATA/mask" "${guided[@]}" --crop_size "$crop" \
      --train_batch_size "$batch" --max_train_steps "$STUDENT_STEPS" --checkpointing_steps "$checkpoints" \
      --dataloader_num_workers "$workers" --adversarial_weight 0.05 --output_dir /tmp/ups-student \
      >> /tmp/ups_full.log 2>&1
    status=$?
    [ -n "$(latest /tmp/ups-student)" ] && cascade=/tmp/ups-student
  fi
  bring_back $status "$cascade" /tmp/ups_full.log upscaler model_index.json segdiff_card.json README.md unet \
    scheduler base student
fi

[ "$DEMO" = 1 ] || exit 0
# The demo model: the bundled psfhs-ultrasound-64's data, preset and recipe (held-out test ids stay held
# out), a 4x larger batch, bf16, and as many steps as $DEADLINE allows; checkpoints make a cut run usable.
STEPS=${DEMO_STEPS:-20000}
DEADLINE=${DEADLINE:-570}  # seconds for the whole script; training gets what the benchmarks leave
DEMO_DATA=${DEMO_DATA:-shared/data/psfhs-128}
left=$((DEADLINE - SECONDS - 25))
if [ "$left" -lt 60 ]; then echo "no time left to train the demo model ($left s)" | tee "$OUT/demo.log"; exit 0; fi
rm -rf /tmp/run
timeout "$left" python3 train_cli.py --mode train --model_type DDPM --img_size 64 \
  --num_img_channels 1 --dataset psfhs --img_dir "$DEMO_DATA/img" --seg_dir "$DEMO_DATA/mask" \
  --segmentation_guided --num_segmentation_classes 3 --use_ablated_segmentations --preset small \
  --recipe fast --train_batch_size 64 --eval_batch_size 8 --mixed_precision bf16 --seed 0 \
  --max_train_steps "$STEPS" --checkpointing_steps 500 --save_image_epochs 100000 --save_model_epochs 100000 \
  --dataloader_num_workers 2 --class_names background "pubic symphysis" "fetal head" \
  --output_dir /tmp/run > /tmp/train_full.log 2>&1
bring_back $? /tmp/run /tmp/train_full.log demo model_index.json segdiff_card.json unet scheduler
