"""Synthesis across processes: `python -m segdiff.dataset synthesize` in one process against the same run
under torchrun with N processes, one thread each, on the same model, masks and pairs.

Each run draws into a new folder; the rounds alternate (one process, N processes, ...), so a machine shared
with other work slows both alike, and the median round counts. Pairs per second are the command's own (pairs
drawn over the time from the first draw to the last process's last file, model loading left out). Prints both
rates, their ratio (issue 36's target on 2 CPU cores: >= 1.6x) and whether the N-process files equal the
one-process files byte for byte.

    python benchmarks/synthesis_speed.py [--model assets/models/psfhs-ultrasound-64]
        [--masks assets/examples/psfhs-ultrasound-64] [--n 128] [--processes 2] [--rounds 2] [-- FLAGS]

FLAGS go to `synthesize` as they are (say `--steps 4`); without them the model card's settings draw.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.6  # issue 36: two processes on 2 cores, one thread each


def synthesize(launcher: list[str], model: str, masks: str, n: int, out: Path, flags: list[str]) -> float:
    """Run the command under `launcher`; -> its pairs per second."""
    # --num_pairs: torchrun reads --n as an abbreviation of its own options.
    command = [*launcher, "-m", "segdiff.dataset", "synthesize", model, str(out), "--masks", masks,
               "--num_pairs", str(n), *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return float(re.search(r"([\d.]+) pairs/s", done.stdout)[1])


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="assets/models/psfhs-ultrasound-64")
    parser.add_argument("--masks", default="assets/examples/psfhs-ultrasound-64")
    parser.add_argument("--n", type=int, default=128, help="pairs per run (whole batches of 16 share out evenly)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("flags", nargs="*", help="after --: flags for synthesize")
    args = parser.parse_args()
    alone = [sys.executable]
    many = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(args.processes)]  # fmt: skip
    rates: dict[int, list[float]] = {1: [], args.processes: []}
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            for count, launcher in ((1, alone), (args.processes, many)):
                out = Path(work) / f"{count}-{r}"
                rates[count].append(synthesize(launcher, args.model, args.masks, args.n, out, args.flags))
                print(f"round {r}, {count} process(es): {rates[count][-1]:.2f} pairs/s", flush=True)
        same = all(files(Path(work) / f"1-{r}") == files(Path(work) / f"{args.processes}-{r}")
                   for r in range(args.rounds))  # fmt: skip
    one, several = statistics.median(rates[1]), statistics.median(rates[args.processes])
    print(f"\n{args.model}, {args.n} pairs, {' '.join(args.flags) or 'the card settings'}, one thread each")
    print(f"| processes | pairs/s (median of {args.rounds}) |\n| --- | --- |")
    print(f"| 1 | {one:.2f} |\n| {args.processes} | {several:.2f} |")
    identical = "yes" if same else "NO"
    print(f"ratio: {several / one:.2f}x (target on 2 cores: >= {TARGET}x); files identical: {identical}")


if __name__ == "__main__":
    main()
