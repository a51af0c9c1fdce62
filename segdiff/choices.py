"""The names the library, the command lines and the studio share, each defined once.

Light on purpose (numpy, no torch), so command lines that do not sample, such as `segdiff.volumes convert`,
can show these defaults without importing a model's dependencies.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from .errors import ConfigError, check_integer

# How a model computes. Sampling: "auto" is bf16/fp16 on GPUs, bf16 on CPUs that run it natively, else fp32;
# training: "auto" is what `accelerate launch`/`accelerate config` says, else fp32.
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# accelerate's words, which training's --mixed_precision (an original flag) spoke first: "no" is fp32.
PRECISION_ALIASES = {"no": "fp32"}


def precision_of(value: str | None, name: str = "precision") -> Precision:
    """A precision by either word (None: "auto") -> its name in PRECISIONS; ConfigError naming it if neither."""
    precision = "auto" if value is None else PRECISION_ALIASES.get(value, value)
    if precision not in PRECISIONS:
        raise ConfigError(f"{name} {value!r}: expected one of {', '.join([*PRECISIONS, *PRECISION_ALIASES])}")
    return precision


def accelerate_precision(precision: Precision) -> str | None:
    """A precision as `accelerate.Accelerator(mixed_precision=...)` takes it: None defers to its configuration."""
    return {"auto": None, "fp32": "no"}.get(precision, precision)


# The sampling algorithms, fast ones first. Their public word is "scheduler", as diffusers' and the pipeline's
# `scheduler=` (a model's `pipe.scheduler` is its noise schedule, which every sampler shares); "sampler" is
# accepted wherever it was the name: `pipe(sampler=...)`, the command lines' --sampler, the studio's field.
SAMPLERS = ("dpm++", "unipc", "ddim", "ddpm")
DEFAULT_SAMPLER = "dpm++"
# Not a sampler: the word for a distilled model's own few-step student at its steps, wherever a command line
# (`quality evaluate --scheduler`, `dataset synthesize`) or the studio names how to draw. `pipe()` does not take
# it: its defaults (no steps, no scheduler) are the student.
STUDENT = "student"

# Mask guidance (classifier-free guidance against the blank mask): 1 is none; beyond the cap, images saturate
# long before they follow the mask any closer.
MAX_GUIDANCE = 20.0


def is_guidance(scale) -> bool:
    """Whether `scale` is a usable mask guidance: a number (not a bool) from 1 to MAX_GUIDANCE."""
    return not isinstance(scale, bool) and isinstance(scale, (int, float)) and 1 <= scale <= MAX_GUIDANCE

# Seeds: one range for every use, from each command line's --seed to the studio's field: 32 bits, what numpy's
# legacy seeding and torch's CPU generator both take whole. Image i's noise comes from a generator seeded with
# `mixed_seed(seed, stream, i)` (`segdiff.model.sampling.noise_generator`).
MAX_SEED = 2**32 - 1


def check_seed(seed, name: str = "--seed") -> int:
    """`seed` as an int in 0..MAX_SEED, else ConfigError naming it and the range."""
    return check_integer(name, seed, 0, MAX_SEED)


def mixed_seed(*parts: int) -> int:
    """One generator seed for a tuple of non-negative ints (a seed, a stream, an image index...).

    torch's CPU generator keeps only the low 32 bits of its seed, so packing the parts into bit fields
    (`(seed << 32) + index`) would leave every part but the lowest without effect; numpy's SeedSequence hashes
    all of them into every bit."""
    return int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0])


SPLITS = ("train", "val", "test")  # the original data layout's split folders, in order

# Chosen by benchmarks/quality.py. The demo model scores the same from 8 to 20 DPM-Solver++ steps (mean Dice
# 0.995-0.996, Frechet distance 0.063-0.068), above DDIM 50 (0.984, 0.079); an earlier, less trained one
# matched 20 steps at 12 (0.934 vs 0.931) but lost Dice and realism at 10. Less trained models need more.
DEFAULT_STEPS = 12
# The most sampling steps any one request may ask (the studio's field, `dataset synthesize --steps`): beyond
# it a sampler draws no better, and a shared server or a long synthesis run would spend hours on a typo.
MAX_STEPS = 100
