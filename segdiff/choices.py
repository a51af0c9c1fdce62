"""The names the library, the command lines and the studio share, each defined once.

Light on purpose (no torch), so command lines that do not sample, such as `segdiff.volumes convert`, can
show these defaults without importing a model's dependencies.
"""

from __future__ import annotations

SPLITS = ("train", "val", "test")  # the original data layout's split folders, in order

# Chosen by benchmarks/quality.py. The demo model scores the same from 8 to 20 DPM-Solver++ steps (mean Dice
# 0.995-0.996, Frechet distance 0.063-0.068), above DDIM 50 (0.984, 0.079); an earlier, less trained one
# matched 20 steps at 12 (0.934 vs 0.931) but lost Dice and realism at 10. Less trained models need more.
DEFAULT_STEPS = 12
