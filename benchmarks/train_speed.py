"""Training speed: the original loop's choices against segdiff's training, same model and batch, one run.

The original loop (re-created here as it was): fp32, eager, images and masks decoded from PNG files in
every step, a DataLoader without workers, one set of class removals per batch, the `class_id / 255` mask
channel, plain AdamW. segdiff: `segdiff.training.train` itself, with its defaults (data decoded once,
TF32 and cuDNN autotuning on GPUs, fused AdamW, per-example ablation, one-hot
masks), timed from its own CSV log.

Rounds alternate between the two so that a machine shared with other work slows both alike; steps/s is
the median over the timed steps, after warm-up.

    python benchmarks/train_speed.py                       # small preset, 64 px, batch 16 (CPU)
    python benchmarks/train_speed.py --preset paper --img_size 256 --batch 16 --mixed_precision bf16  # GPU
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segdiff.data import find_cases
from segdiff.masks import ablate, encode
from segdiff.models import build_unet
from segdiff.phantoms import write_dataset
from segdiff.training import TrainConfig, train


class FilesEveryStep(torch.utils.data.Dataset):
    """The original's data path: each item decodes its image and mask files and resizes them."""

    def __init__(self, img_dir: Path, seg_dir: Path, size: int):
        self.cases, self.size = find_cases(img_dir, seg_dir, "train"), size

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, i):
        case = self.cases[i]
        with PIL.Image.open(case.image) as im:
            image = np.asarray(im.convert("L").resize((self.size, self.size), PIL.Image.BILINEAR))
        with PIL.Image.open(case.masks[0]) as im:
            mask = np.asarray(im.convert("L").resize((self.size, self.size), PIL.Image.NEAREST))
        image = torch.from_numpy(image.copy()).float()[None] / 127.5 - 1  # ToTensor + Normalize(0.5, 0.5)
        return {"image": image, "mask": torch.from_numpy(mask.astype(np.int64))}


def original_steps(args, img_dir, seg_dir, num_classes: int) -> list[float]:
    """Seconds per step of the original loop, data loading included."""
    loader = torch.utils.data.DataLoader(
        FilesEveryStep(img_dir, seg_dir, args.img_size), batch_size=args.batch, shuffle=True, drop_last=True
    )
    torch.manual_seed(0)
    unet = build_unet(args.preset, args.img_size, 1, 1)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, 500, 10_000)
    unet.to(args.device).train()
    times, batches = [], iter(loader)
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:  # a new epoch
            batches = iter(loader)
            batch = next(batches)
        images, masks = batch["image"].to(args.device), batch["mask"].to(args.device)
        masks = ablate(masks, num_classes, per_example=False)
        cond = encode(masks, "original", num_classes)  # (B, 1, H, W): class_id / 255
        noise = torch.randn_like(images)
        t = torch.randint(0, 1000, (images.shape[0],), device=args.device)
        prediction = unet(torch.cat([scheduler.add_noise(images, noise, t), cond], dim=1), t).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        loss.item()  # the original logged the loss every step
        times.append(time.perf_counter() - start)
    return times[args.warmup :]


def segdiff_steps(args, img_dir, seg_dir, num_classes: int, out: Path) -> list[float]:
    """Seconds per step of `segdiff.training.train`, read from its CSV log."""
    never = 10**6
    train(
        TrainConfig(
            output_dir=str(out),
            img_dir=str(img_dir),
            seg_dir=str(seg_dir),
            num_classes=num_classes,
            img_size=args.img_size,
            preset=args.preset,
            train_batch_size=args.batch,
            max_train_steps=args.warmup + args.steps,
            mixed_precision=args.mixed_precision,
            ablate=True,
            checkpointing_steps=never,
            save_image_epochs=never,
            save_model_epochs=never,
            eval_batch_size=1,  # the final grid and model save come after the timed steps
            sampler="ddim",
            num_inference_steps=1,
        )
    )
    with open(out / "train_log.csv", newline="") as f:
        seconds = [0.0] + [float(row["seconds"]) for row in csv.DictReader(f)]
    return list(np.diff(seconds))[args.warmup :]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round and loop")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two loops")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--mixed_precision", choices=("no", "fp16", "bf16"), default="no", help="segdiff only"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = (
        torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"{args.preset} preset, {args.img_size} px, batch {args.batch}, {device}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = write_dataset(
            Path(tmp) / "data", size=args.img_size, n_train=2 * args.batch, n_val=2, n_test=2
        )
        img_dir, seg_dir = root / "img", root / "mask"
        num_classes = json.loads((root / "classes.json").read_text())["num_classes"]
        original, ours = [], []
        for r in range(args.rounds):
            original += original_steps(args, img_dir, seg_dir, num_classes)
            ours += segdiff_steps(args, img_dir, seg_dir, num_classes, Path(tmp) / f"run{r}")
            print(f"round {r + 1}/{args.rounds}: original {statistics.median(original):.3f} s/step, "
                  f"segdiff {statistics.median(ours):.3f} s/step", flush=True)  # fmt: skip

    original_rate, our_rate = 1 / statistics.median(original), 1 / statistics.median(ours)
    print(f"original loop: {original_rate:.3f} steps/s (fp32, eager, PNGs decoded every step, no workers, "
          "per-batch ablation, class_id/255 mask channel, AdamW)")  # fmt: skip
    print(f"segdiff:       {our_rate:.3f} steps/s (train(): data decoded once, fused AdamW, TF32 on GPUs, "
          f"per-example ablation, one-hot masks, mixed precision {args.mixed_precision})")  # fmt: skip
    print(f"ratio: {our_rate / original_rate:.2f}x")


if __name__ == "__main__":
    main()
