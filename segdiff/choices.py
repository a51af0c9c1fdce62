"""The names the library, the command lines and the studio share, each defined once.

Light on purpose (no torch), so command lines that do not sample, such as `segdiff.volumes convert`, can
show these defaults without importing a model's dependencies.
"""

from __future__ import annotations

from typing import Literal, get_args

# How sampling computes: "auto" is bf16/fp16 on GPUs, bf16 on CPUs that run it natively, else fp32.
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

# The sampling algorithms, by the one public word "sampler" (`scheduler=` is accepted where it was the name;
# a model's `pipe.scheduler` is its noise schedule, which every sampler shares). Fast ones first.
SAMPLERS = ("dpm++", "unipc", "ddim", "ddpm")
DEFAULT_SAMPLER = "dpm++"

SPLITS = ("train", "val", "test")  # the original data layout's split folders, in order

# Chosen by benchmarks/quality.py. The demo model scores the same from 8 to 20 DPM-Solver++ steps (mean Dice
# 0.995-0.996, Frechet distance 0.063-0.068), above DDIM 50 (0.984, 0.079); an earlier, less trained one
# matched 20 steps at 12 (0.934 vs 0.931) but lost Dice and realism at 10. Less trained models need more.
DEFAULT_STEPS = 12
