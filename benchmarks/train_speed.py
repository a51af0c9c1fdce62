"""Training speed: the original loop's choices against segdiff's training, same model and batch, one run.

The original loop (re-created here as it was): fp32, eager, images and masks decoded from PNG files in
every step, a DataLoader without workers, one set of class removals per batch, the `class_id / 255` mask
channel, plain AdamW, the loss read back (`.item()`) every step. segdiff: `segdiff.train.loop.train` itself
(data decoded once, TF32 and cuDNN autotuning on GPUs, fused AdamW, per-example ablation, one-hot masks),
timed from its own CSV log, first at fp32 and then adding one speed candidate per row.

Rows alternate within each round, so a machine shared with other work slows all alike; each row's rate
is the median over rounds of (timed steps / their seconds), after warm-up steps. Model FLOP utilisation:
the UNet's forward and backward FLOPs per step (counted by torch.utils.flop_counter on the meta device)
times steps/s, over the card's dense tensor-core peak for the row's precision (TF32 for fp32 rows).

    python benchmarks/train_speed.py                       # small preset, 64 px, batch 16, phantoms (CPU)
    python benchmarks/train_speed.py --preset paper --img_size 256 --batch 16 \\
        --data ../shared/data/psfhs-256 --num_classes 3 --warmup 10 --steps 30 --log_every 10 --compile
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
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segdiff.data.layout import SegDataset, find_cases
from segdiff.data.masks import ablate, encode
from segdiff.data.phantoms import write_dataset
from segdiff.model.unet import build_unet
from segdiff.train.loop import TrainConfig, train

# Dense tensor-core peaks in TFLOP/s from the vendors' data sheets: (bf16/fp16, tf32). First match wins.
PEAK_TFLOPS = {
    "H100 PCIe": (756.0, 378.0),
    "H100 NVL": (835.0, 418.0),
    "H100": (989.4, 494.7),  # SXM
    "H200": (989.4, 494.7),
    "A100": (312.0, 156.0),
    "RTX 4090": (165.2, 82.6),
    "RTX 3090": (71.0, 35.6),
}
TARGET_RATIO = 3.0  # issue 13: paper preset, 256 px, batch 16, on an H100 or H200
LAYOUTS = ("contiguous", "channels_last")


def layouts(text: str) -> tuple[str, ...]:
    """`--compile_layout`'s value: memory layouts, comma-separated."""
    chosen = tuple(text.split(","))
    if not chosen or set(chosen) - set(LAYOUTS):
        raise argparse.ArgumentTypeError(f"{text!r}: expected contiguous, channels_last or both, comma-separated")
    return chosen


def add_compile_flags(parser: argparse.ArgumentParser) -> None:
    """`--compile` and `--compile_layout`, shared with sample_speed.py."""
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to warm up)")
    parser.add_argument(
        "--compile_layout",
        type=layouts,
        default=LAYOUTS,
        help="memory layouts of the torch.compile rows: contiguous, channels_last or both (comma-separated)",
    )


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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def original_rate(args, img_dir, seg_dir, num_classes: int) -> float:
    """Steps/s of the original loop over the timed steps, data loading included."""
    loader = torch.utils.data.DataLoader(
        FilesEveryStep(img_dir, seg_dir, args.img_size), batch_size=args.batch, shuffle=True, drop_last=True
    )
    if args.device == "cuda":  # torch's defaults, which segdiff's rows change for the process
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = False, False
    torch.manual_seed(0)
    unet = build_unet(args.preset, args.img_size, 1, 1)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, 500, 10_000)
    unet.to(args.device).train()
    batches = iter(loader)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(args.device)
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
    sync(args.device)
    return args.steps / (time.perf_counter() - start)


def segdiff_rate(args, img_dir, seg_dir, num_classes: int, out: Path, **options) -> float:
    """Steps/s of `segdiff.train.loop.train` between its first log row after warm-up and its last one."""
    never = 10**6
    AcceleratorState._reset_state(reset_partial_state=True)  # each row sets its own mixed precision
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
            ablate=True,
            checkpointing_steps=never,
            save_image_epochs=never,
            save_model_epochs=never,
            eval_batch_size=1,  # the final grid and model save come after the timed steps
            sampler="ddim",
            num_inference_steps=1,
            **options,
        )
    )
    with open(out / "train_log.csv", newline="") as f:
        rows = [(int(row["step"]), float(row["seconds"])) for row in csv.DictReader(f)]
    first = next(row for row in rows if row[0] >= args.warmup)
    return (rows[-1][0] - first[0]) / (rows[-1][1] - first[1])


def flops_per_step(preset: str, size: int, batch: int, in_channels: int) -> float:
    """Forward and backward FLOPs of the UNet for one batch, counted on the meta device (no arithmetic)."""
    with torch.device("meta"):
        unet = build_unet(preset, size, 1, in_channels - 1)
        x = torch.randn(batch, in_channels, size, size)
        t = torch.randint(0, 1000, (batch,))
    with FlopCounterMode(display=False) as counter:
        unet(x, t).sample.sum().backward()
    return float(counter.get_total_flops())


def peak_flops(device: str, precision: str) -> float | None:
    """The card's dense peak in FLOP/s for `precision` ("bf16"/"fp16" or fp32 on TF32), None if unknown."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    for key, (half, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return 1e12 * (half if precision in ("bf16", "fp16") else tf32)
    return None


def loader_ms_per_batch(img_dir, seg_dir, args, num_classes: int, batches: int = 20) -> float:
    """segdiff's data path alone (decoded once, then collated per batch): host time the GPU step must hide."""
    dataset = SegDataset(img_dir, seg_dir, "train", args.img_size, 1, num_classes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True)
    start, done = time.perf_counter(), 0
    while done < batches:
        for batch in loader:
            batch["image"].to(args.device, non_blocking=True)
            done += 1
            if done == batches:
                break
    return 1000 * (time.perf_counter() - start) / batches


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--data", type=Path, help="img/ and mask/ in the original layout; default: phantoms")
    parser.add_argument("--num_classes", type=int, help="with --data: K, background included")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the rows")
    parser.add_argument("--log_every", type=int, default=2, help="the 'loss logged every N steps' row")
    add_compile_flags(parser)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument(
        "--mixed_precision", choices=("no", "fp16", "bf16"), default="bf16", help="segdiff's rows after fp32"
    )
    args = parser.parse_args(argv)
    if args.warmup % args.log_every or args.steps % args.log_every:
        parser.error("--warmup and --steps must be multiples of --log_every: rows are timed between log rows")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = (
        torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )

    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            img_dir, seg_dir = args.data / "img", args.data / "mask"
            classes = args.data / "classes.json"
            num_classes = args.num_classes or json.loads(classes.read_text())["num_classes"]
        else:
            root = write_dataset(
                Path(tmp) / "data", size=args.img_size, n_train=2 * args.batch, n_val=2, n_test=2
            )
            img_dir, seg_dir = root / "img", root / "mask"
            num_classes = json.loads((root / "classes.json").read_text())["num_classes"]
        print(f"{args.preset} preset, {args.img_size} px, batch {args.batch}, {device}, data {img_dir.parent} "
              f"({num_classes} classes)", flush=True)  # fmt: skip

        mixed = args.mixed_precision
        logged = {"mixed_precision": mixed, "log_every": args.log_every}
        rows = {
            "original loop (fp32, PNGs every step, .item() every step)": None,
            "segdiff fp32 (TF32 on GPUs)": {"mixed_precision": "no"},
            f"+ {mixed} autocast": {"mixed_precision": mixed},
            f"+ loss logged every {args.log_every} steps": logged,
            "+ channels_last": logged | {"channels_last": True},
        }
        # The H200 profile (benchmarks/train_profile.py) of the compiled contiguous step: 28% of its GPU time
        # went to cuDNN turning NCHW activations into NHWC and back around every bf16 convolution.
        for layout in args.compile_layout if args.compile else ():
            channels_last = {"channels_last": layout == "channels_last"}
            rows[f"+ torch.compile ({layout})"] = logged | {"compile": True} | channels_last
        precisions = {
            name: "fp32" if opts is None else opts["mixed_precision"] for name, opts in rows.items()
        }
        rates = {name: [] for name in rows}
        for r in range(args.rounds):
            for i, (name, options) in enumerate(rows.items()):
                if options is None:
                    rate = original_rate(args, img_dir, seg_dir, num_classes)
                else:
                    rate = segdiff_rate(
                        args, img_dir, seg_dir, num_classes, Path(tmp) / f"run{r}-{i}", **options
                    )
                rates[name].append(rate)
                print(f"  round {r + 1}/{args.rounds}: {name}: {rate:.3f} steps/s", flush=True)
        data_ms = loader_ms_per_batch(img_dir, seg_dir, args, num_classes)

    flops = flops_per_step(args.preset, args.img_size, args.batch, 1 + num_classes - 1)
    median = {name: statistics.median(r) for name, r in rates.items()}
    base = median[next(iter(rows))]
    print(f"\nUNet forward + backward: {flops / 1e9:.1f} GFLOP per step; segdiff's loader alone "
          f"{data_ms:.1f} ms per batch on the host")  # fmt: skip
    table = []
    for name, rate in median.items():
        peak = peak_flops(args.device, precisions[name])
        mfu = f"{100 * flops * rate / peak:5.1f}%" if peak else "  n/a"
        print(
            f"  {name:<58} {rate:7.3f} steps/s {rate * args.batch:8.1f} images/s  x{rate / base:5.2f}  MFU {mfu}"
        )
        table.append({"row": name, "steps_per_s": rate, "images_per_s": rate * args.batch,
                      "ratio": rate / base, "mfu": flops * rate / peak if peak else None})  # fmt: skip
    best = max(median, key=median.get)
    print(f"best: {best!r}, x{median[best] / base:.2f} the original loop's steps/s "
          f"(target >= {TARGET_RATIO:.0f}x at the paper preset, 256 px, batch 16 on an H100/H200; "
          f"median of {args.rounds} alternating rounds)")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps({"device": device, "tflop_per_step": flops / 1e12, "rows": table}, indent=2)
        )


if __name__ == "__main__":
    main()
