"""Sampling speed: segdiff's default fast settings against the original settings, in one run.

The original settings are fp32, eager, contiguous memory and DDIM with 50 steps through the original
pipeline's loop (tests/test_pipeline.py shows SegDiffPipeline reproduces that loop to float rounding).
Same weights, same masks, same batch. Prints images/s of each, the ratio, and what each choice adds.

    python benchmarks/sample_speed.py                       # paper preset, 64 px, random weights (CPU)
    python benchmarks/sample_speed.py --model assets/models/phantom-breast-64
    python benchmarks/sample_speed.py --size 256 --batch 64  # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from segdiff import SegDiffPipeline
from segdiff.models import ModelCard, build_unet
from segdiff.pipeline import DEFAULT_SCHEDULER, DEFAULT_STEPS, autocast_dtype


def random_pipeline(preset: str, size: int, num_classes: int = 4) -> SegDiffPipeline:
    card = ModelCard(num_classes=num_classes, img_channels=1, img_size=size, encoding="onehot", preset=preset)
    unet = build_unet(preset, size, 1, card.cond_channels).eval()
    return SegDiffPipeline(unet, DDPMScheduler(num_train_timesteps=1000), card)


def masks_for(card: ModelCard, batch: int) -> np.ndarray:
    """Nested squares, one class each: the content does not change the speed."""
    size, k = card.img_size, max(card.num_classes, 1)
    masks = np.zeros((batch, size, size), np.int64)
    for c in range(1, k):
        lo, hi = c * size // (2 * k), size - c * size // (2 * k)
        masks[:, lo:hi, lo:hi] = c
    return masks


def images_per_second(pipe, masks, repeats: int, **settings) -> float:
    """Best of `repeats` timed runs after one warm-up run (which also triggers compilation)."""
    run = lambda: pipe(masks, generator=torch.Generator().manual_seed(0), output_type="pt", **settings)  # noqa: E731
    run()
    best = float("inf")
    for _ in range(repeats):
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return len(masks) / best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder; default: random weights of --preset")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to warm up)")
    args = parser.parse_args(argv)

    if args.model:
        pipe = SegDiffPipeline.from_pretrained(args.model)
        label = args.model
    else:
        pipe = random_pipeline(args.preset, args.size).to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        label = f"{args.preset} preset, random weights"
    pipe.set_progress_bar_config(disable=True)
    masks = masks_for(pipe.card, args.batch)
    fast = {"scheduler": args.scheduler, "num_inference_steps": args.steps}
    original = {"scheduler": "ddim", "num_inference_steps": 50}
    device = pipe.device
    print(f"{label}: {pipe.card.img_size} px, batch {args.batch}, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    def measure(name, precision, channels_last, settings, compile=False):
        pipe.set_speed(precision=precision, channels_last=channels_last, compile=compile)
        rate = images_per_second(pipe, masks, args.repeats, **settings)
        if compile:
            pipe.unet = pipe.unet._orig_mod  # back to eager for the next row
        return name, rate

    rows = [measure("original: fp32, eager, DDIM 50", "fp32", False, original)]
    rows.append(measure(f"+ sampler: {args.scheduler} {args.steps} steps", "fp32", False, fast))
    dtype = autocast_dtype(device, "auto")
    if dtype is not None:
        rows.append(measure(f"+ {dtype} autocast", "auto", False, fast))
    else:
        print("  (bf16/fp16 autocast skipped: this CPU has no native bf16, where it runs slower than fp32)")
    rows.append(measure("+ channels_last", "auto", True, fast))
    if args.compile:
        rows.append(measure("defaults + torch.compile", "auto", None, fast, compile=True))
    base = rows[0][1]
    for name, rate in rows:
        print(f"  {name:<40} {rate:8.2f} images/s   x{rate / base:5.2f}")
    default = measure("segdiff defaults", "auto", None, fast)[1]
    layout = "channels-last" if device.type == "cpu" else "contiguous"
    print(f"segdiff default fast settings ({args.scheduler} {args.steps}, {dtype or 'fp32'}, {layout}) vs original: "
          f"{default:.2f} / {base:.2f} images/s = x{default / base:.2f}")


if __name__ == "__main__":
    main()
