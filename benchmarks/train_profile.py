"""Where a training step's GPU time goes: the UNet's forward, backward and fused AdamW step, profiled.

Times the step the way `segdiff.train.loop` runs it on a GPU (bf16 autocast, TF32, cuDNN autotuning, fused
AdamW) in each memory layout, eager and compiled, and prints the share of kernel time taken by each kind of
kernel (convolutions, matrix products, normalisation, fused Triton kernels, the optimizer, other element-wise
work) for each variant. It answers "what is the next lever" after train_speed.py says how fast a step is.

    python benchmarks/train_profile.py --preset paper --img_size 256 --batch 16            # on a GPU
    python benchmarks/train_profile.py --preset tiny --img_size 32 --batch 2 --modes eager  # a CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segdiff.model.unet import build_unet

# Kernel kinds by name, first match wins (cuDNN, cuBLAS/CUTLASS and Triton kernel names; CPU op names).
# Inductor's fused kernels first (their names list every op fused, copies included), then layout changes:
# cuDNN names its NCHW <-> NHWC conversions `cudnn::...nchwToNhwcKernel`.
KINDS = [
    ("fused (Triton)", r"^triton_"),
    ("copy / layout", r"nchwtonhwc|nhwctonchw|copy|transpose|permute|\bcat\b"),
    ("convolution", r"conv|cudnn|implicit_gemm|wgrad|dgrad|fprop|xmma"),
    ("matrix product", r"gemm|cublas|cutlass|matmul|sm90_|\bb?mm\b|addmm|linear"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("normalisation", r"norm|welford|batch_norm"),
    ("optimizer", r"adam|multi_tensor|foreach"),
]


def kind(name: str) -> str:
    lowered = name.lower()
    return next((label for label, pattern in KINDS if re.search(pattern, lowered)), "other element-wise")


def step_fn(unet, optimizer, x, t, target, device):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.mse_loss(unet(x, t).sample.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(args, unet, channels_last: bool, compiled: bool, device) -> None:
    unet = copy.deepcopy(unet)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet.to(memory_format=fmt).train()
    in_channels = unet.config.in_channels
    x = torch.randn(args.batch, in_channels, args.img_size, args.img_size, device=device).to(
        memory_format=fmt
    )
    target = torch.randn(args.batch, unet.config.out_channels, args.img_size, args.img_size, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    model = torch.compile(unet) if compiled else unet
    step = step_fn(model, optimizer, x, t, target, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    per_step = (time.perf_counter() - start) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step()
        sync()
    by_kind: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if device.type == "cuda":  # the kernels themselves: the ops that launched them hold the same time
            us = event.self_device_time_total if event.device_type == DeviceType.CUDA else 0.0
        else:  # no kernels: the leaf aten ops' own CPU time
            us = event.self_cpu_time_total if event.key.startswith("aten::") else 0.0
        if us > 0:
            by_kind[kind(event.key)] += us
    total = sum(by_kind.values()) or 1.0
    label = f"{'compiled' if compiled else 'eager'}, {'channels-last' if channels_last else 'contiguous'}"
    kernel_ms = total / 1000 / args.profile_steps
    print(f"\n{label}: {1 / per_step:.2f} steps/s ({1000 * per_step:.1f} ms; kernels {kernel_ms:.1f} ms), "
          f"warm-up {warm:.0f} s")  # fmt: skip
    for name, us in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {name:<22} {100 * us / total:5.1f}%  {us / 1000 / args.profile_steps:8.2f} ms/step")
    if args.top:
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=70))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--img_size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num_classes", type=int, default=3, help="one-hot mask channels: K - 1")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (outside the profiler)")
    parser.add_argument("--profile_steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=0, help="also print the N most expensive kernels")
    parser.add_argument("--modes", default="eager,compiled", help="eager, compiled or both")
    parser.add_argument(
        "--layouts", default="contiguous,channels_last", help="contiguous, channels_last or both"
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # as segdiff.train.loop sets them
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(
        f"{args.preset} preset, {args.img_size} px, batch {args.batch}, bf16 autocast, {name}, torch {torch.__version__}"
    )
    unet = build_unet(args.preset, args.img_size, 1, args.num_classes - 1).to(device)
    for layout in args.layouts.split(","):
        for mode in args.modes.split(","):
            measure(args, unet, layout == "channels_last", mode == "compiled", device)


if __name__ == "__main__":
    main()
