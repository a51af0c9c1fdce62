"""Sampling speed: segdiff's default fast settings against the original settings, in one run.

The original settings: the original pipeline's loop (`SegGuidedDDIMPipeline.__call__`, re-created below),
fp32, eager, contiguous memory, DDIM 50 steps. Same weights, masks and batch. Every setting is timed once
per round and the rounds alternate, so a machine shared with other work slows all alike; the median round
counts. Prints images/s of each, the ratio to the original, and what each choice adds.

    python benchmarks/sample_speed.py                       # paper preset, 64 px, random weights (CPU)
    python benchmarks/sample_speed.py --model assets/models/phantom-breast-64
    python benchmarks/sample_speed.py --size 256 --batch 64 --compile   # on a GPU: the issue's targets
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/sample_speed.py ...  # a CPU without AMX
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from train_speed import add_compile_flags

from segdiff import SegDiffPipeline
from segdiff.data.masks import encode
from segdiff.model.card import ModelCard
from segdiff.model.pipeline import DEFAULT_SCHEDULER, DEFAULT_STEPS, autocast_dtype
from segdiff.model.unet import build_unet

# GPU targets of issue 13 (paper preset, 256 px, batch 64, default steps).
TARGET_RATIO, TARGET_RATE = 10.0, 60.0


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


@torch.no_grad()
def original_loop(unet, scheduler_config, cond: torch.Tensor, generator, steps: int = 50) -> torch.Tensor:
    """The original pipeline's loop: noise, then per step concatenate the mask, predict, DDIM step (eta 0)."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    shape = (cond.shape[0], unet.config.out_channels, *cond.shape[2:])
    image = randn_tensor(shape, generator=generator, device=cond.device, dtype=unet.dtype)
    for t in scheduler.timesteps:
        model_output = unet(torch.cat((image, cond), dim=1), t).sample
        image = scheduler.step(model_output, t, image, eta=0.0, generator=generator).prev_sample
    return (image / 2 + 0.5).clamp(0, 1)


def cpu_isa() -> str:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    amx = "AMX" if torch.cpu._is_amx_tile_supported() else "no AMX"
    return f"{torch.backends.cpu.get_cpu_capability()}, {amx}" + (f", oneDNN capped at {cap}" if cap else "")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a model folder; default: random weights of --preset")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (median counts)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER)
    add_compile_flags(parser)
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    if args.model:
        pipe = SegDiffPipeline.from_pretrained(args.model)
        label = args.model
    else:
        pipe = random_pipeline(args.preset, args.size).to(
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        label = f"{args.preset} preset, random weights"
    pipe.set_progress_bar_config(disable=True)
    device = pipe.device
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_isa()})"
    print(f"{label}: {pipe.card.img_size} px, batch {args.batch}, {hardware}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip

    masks = masks_for(pipe.card, args.batch)
    cond = encode(pipe.prepare_masks(masks), pipe.card.encoding, pipe.card.num_classes).to(device)
    contiguous = pipe.unet.to(memory_format=torch.contiguous_format)
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    default_unet = channels_last if device.type == "cpu" else contiguous  # as set_speed(channels_last=None)
    dtype = autocast_dtype(device, "auto")
    fast = {"scheduler": args.scheduler, "num_inference_steps": args.steps}

    def ours(unet, precision):
        def run():
            pipe.unet, pipe.precision = unet, precision
            pipe(masks, generator=torch.Generator().manual_seed(0), output_type="pt", **fast)

        return run

    original_config = pipe.make_scheduler("ddim").config
    rows = {"original: fp32, eager, DDIM 50, original loop": lambda: original_loop(
        contiguous, original_config, cond, torch.Generator().manual_seed(0))}  # fmt: skip
    default = f"+ sampler: {args.scheduler} {args.steps} steps"
    rows[default] = ours(contiguous, "fp32")
    if dtype is not None:
        default = f"+ {dtype} autocast"
        rows[default] = ours(contiguous, "auto")
    else:
        print("  (no autocast row: 'auto' is fp32 here, as bf16 ran slower than fp32 on CPUs without AMX)")
    rows["+ channels_last"] = ours(channels_last, "auto")
    if default_unet is channels_last:
        default = "+ channels_last"
    if pipe.student is not None:  # a distilled model's defaults: its few-step student, in the same layout
        pipe.student.to(memory_format=torch.channels_last if default_unet is channels_last else torch.contiguous_format)

        def student():
            pipe.unet, pipe.precision = default_unet, "auto"
            pipe(masks, generator=torch.Generator().manual_seed(0), output_type="pt")

        default = f"+ student: {pipe.card.distilled.steps} steps (model defaults)"
        rows[default] = student
    for layout in args.compile_layout if args.compile else ():  # compiled GroupNorms may take channels-last
        unet = channels_last if layout == "channels_last" else contiguous
        rows[f"defaults + torch.compile ({layout})"] = ours(torch.compile(copy.deepcopy(unet)), "auto")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds = {name: [] for name in rows}
    for r in range(args.rounds):
        for name, run in rows.items():
            if r == 0:
                run()  # warm-up, compilation included
            sync()
            start = time.perf_counter()
            run()
            sync()
            seconds[name].append(time.perf_counter() - start)
            print(f"  round {r + 1}/{args.rounds}: {name}: {args.batch / seconds[name][-1]:.2f} images/s", flush=True)
    rates = {name: args.batch / statistics.median(s) for name, s in seconds.items()}
    base = next(iter(rates.values()))
    for name, rate in rates.items():
        mark = "  <- segdiff defaults" if name == default else ""
        print(f"  {name:<48} {rate:8.2f} images/s   x{rate / base:5.2f}{mark}")
    layout = "channels-last" if default_unet is channels_last else "contiguous"
    sampler = f"student {pipe.card.distilled.steps}" if pipe.student is not None else f"{args.scheduler} {args.steps}"
    print(f"segdiff defaults ({sampler}, {dtype or 'fp32'}, {layout}) vs original: "
          f"{rates[default]:.2f} / {base:.2f} images/s = x{rates[default] / base:.2f} "
          f"(median of {args.rounds} alternating rounds)")  # fmt: skip
    if device.type == "cuda":
        best = max(rates, key=rates.get)
        print(f"targets (>= {TARGET_RATIO:.0f}x and >= {TARGET_RATE:.0f} images/s): best {best!r} "
              f"x{rates[best] / base:.2f}, {rates[best]:.1f} images/s: "
              f"{'met' if rates[best] / base >= TARGET_RATIO and rates[best] >= TARGET_RATE else 'NOT met'}")  # fmt: skip
    if args.json:
        rows = [{"row": name, "images_per_s": rate, "ratio": rate / base, "default": name == default}
                for name, rate in rates.items()]  # fmt: skip
        args.json.write_text(json.dumps({"device": hardware, "label": label, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
