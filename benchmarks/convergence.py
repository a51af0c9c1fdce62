"""How fast each training recipe learns to follow the masks: Dice of samples at checkpoints, same budget.

    python benchmarks/convergence.py --data ../shared/data/psfhs-128 --img_size 64 --segmenter SEG \\
        --steps 1500 --every 250 --runs runs/convergence [--recipe NAME=RECIPE[,FLAG=VALUE...] ...]

Every recipe trains the same preset on the same data with the same seed, batch and data order, through
`train_cli.py` itself (so the runs are what users get), keeping a checkpoint every `--every` steps. Each
checkpoint then draws one image per held-out TEST mask from noise fixed by the mask's index (the same noise
for every recipe and checkpoint), and a segmenter trained on the real TRAIN images (`python -m segdiff.quality
train-segmenter`) measures the Dice between what it finds and the mask. The segmenter's Dice on the real test
images is the ceiling. The table prints Dice per recipe per checkpoint, and the steps each recipe needs to
reach 0.5x, 0.8x and 0.9x of the ceiling and the original recipe's final Dice.

Runs and scores are kept under `--runs`: rerun the same command to continue a cut benchmark (training resumes
from its checkpoints, scored checkpoints are not sampled again). `--parallel 2` trains two recipes at once,
one thread each. A recipe is `NAME=RECIPE` plus train_cli.py flags as `flag=value` (`--recipe
lr=original,learning_rate=1e-3,lr_warmup_steps=100`); the default compares `original` with `fast`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from segdiff import SegDiffPipeline
from segdiff.measure.quality import load_test_set, measure_quality
from segdiff.measure.segmenter import Segmenter
from segdiff.model.pipeline import DEFAULT_SCHEDULER, DEFAULT_STEPS
from segdiff.train.checkpoints import CHECKPOINT, checkpoints, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.5, 0.8, 0.9)


def parse_recipe(text: str) -> tuple[str, list[str]]:
    """`lr=original,learning_rate=1e-3` -> ("lr", ["--recipe", "original", "--learning_rate", "1e-3"]).

    `max_train_steps=N` gives that recipe its own budget (its LR schedule ends there)."""
    name, _, spec = text.partition("=")
    recipe, *overrides = spec.split(",")
    flags = ["--recipe", recipe]
    for item in overrides:
        flag, _, value = item.partition("=")
        flags += [f"--{flag}"] + ([value] if value else [])
    return name, flags


def train_command(args, flags: list[str], out: Path) -> list[str]:
    return [
        sys.executable, str(ROOT / "train_cli.py"), "--mode", "train", "--dataset", "convergence",
        "--img_size", str(args.img_size), "--img_dir", str(Path(args.data) / "img"),
        "--seg_dir", str(Path(args.data) / "mask"), "--segmentation_guided",
        "--num_segmentation_classes", str(args.num_classes), "--use_ablated_segmentations",
        "--preset", args.preset, "--train_batch_size", str(args.batch), "--max_train_steps", str(args.steps),
        "--checkpointing_steps", str(args.every), "--checkpoints_total_limit", "100000",
        "--save_image_epochs", "100000", "--save_model_epochs", "100000", "--mixed_precision", args.precision,
        "--seed", str(args.seed), "--output_dir", str(out), "--resume", *flags,
    ]  # fmt: skip


def budget(args, flags: list[str]) -> int:
    """The recipe's own --max_train_steps where it sets one (the last flag wins, as in argparse)."""
    given = [int(flags[i + 1]) for i, flag in enumerate(flags) if flag == "--max_train_steps"]
    return given[-1] if given else args.steps


def train_all(args, recipes: dict[str, list[str]], runs: Path) -> None:
    """Train every recipe to --steps (resuming), `--parallel` at a time with one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    pending = [(n, f) for n, f in recipes.items() if not (runs / n / f"checkpoint-{budget(args, f)}").is_dir()]
    while pending:
        wave, pending = pending[: args.parallel], pending[args.parallel :]
        procs = []
        for name, flags in wave:
            (runs / name).mkdir(parents=True, exist_ok=True)
            log = open(runs / name / "train.out", "a")  # noqa: SIM115 - closed below
            procs.append((name, log, subprocess.Popen(train_command(args, flags, runs / name), stdout=log,
                                                      stderr=subprocess.STDOUT, env=env)))  # fmt: skip
            print(f"training {name}: {' '.join(flags)}", flush=True)
        for name, log, proc in procs:
            if proc.wait():
                sys.exit(f"training {name} failed: see {runs / name / 'train.out'}")
            log.close()


def score_checkpoints(args, name: str, run: Path, segmenter, masks, images) -> dict[int, float]:
    """Mean Dice of each checkpoint's samples; cached in RUN/convergence.json."""
    cache_file = run / "convergence.json"
    cache = {int(k): v for k, v in json.loads(cache_file.read_text()).items()} if cache_file.is_file() else {}
    for folder in checkpoints(run):
        step = int(CHECKPOINT.match(folder.name)[1])
        if step in cache or step % args.every:
            continue
        pipe = SegDiffPipeline.from_pretrained(folder, precision=args.sample_precision)
        result = measure_quality(pipe, segmenter, masks, images, scheduler=args.sampler,
                                 num_inference_steps=args.sample_steps, precision=args.sample_precision,
                                 seed=args.seed, omit_each=False, progress=False)  # fmt: skip
        cache[step] = {"mean_dice": result["mean_dice"], "ceiling": result["real"]["mean_dice"]}
        print(f"{name} step {step}: mean Dice {result['mean_dice']:.4f}", flush=True)
        cache_file.write_text(json.dumps(cache, indent=1))
    return cache


def first_step(curve: dict[int, float], level: float) -> int | None:
    return next((step for step, dice in sorted(curve.items()) if dice >= level), None)


def report(curves: dict[str, dict[int, float]], ceiling: float, reference: str | None) -> str:
    names = list(curves)
    steps = sorted({s for c in curves.values() for s in c})
    width = max(12, *(len(n) + 2 for n in names))
    lines = ["step".rjust(6) + "".join(n.rjust(width) for n in names)]
    for step in steps:
        cells = [f"{curves[n][step]:.3f}" if step in curves[n] else "" for n in names]
        lines.append(f"{step:6d}" + "".join(c.rjust(width) for c in cells))
    lines.append(f"\nreal test images (ceiling): mean Dice {ceiling:.3f}")
    targets = [(f"{f:.1f}x ceiling ({f * ceiling:.3f})", f * ceiling) for f in FRACTIONS]
    if curves.get(reference):
        final_step = max(curves[reference])
        final = curves[reference][final_step]
        targets.append((f"{reference}'s final Dice ({final:.3f} at {final_step})", final))
    for label, level in targets:
        cells = []
        for n in names:
            step = first_step(curves[n], level)
            cells.append(f"{n} {step}" if step is not None else f"{n} >{max(curves[n], default=0)}")
        lines.append(f"steps to {label}: " + ", ".join(cells))
    if curves.get(reference):
        final_step = max(curves[reference])
        for n in names:
            step = first_step(curves[n], curves[reference][final_step])
            if n != reference and step is not None:
                lines.append(f"{n} reaches {reference}'s {final_step}-step Dice in {step} steps: "
                             f"{step / final_step:.2f} of the budget ({final_step / step:.1f}x fewer steps)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a folder holding img/ and mask/ in the original layout")
    parser.add_argument("--segmenter", required=True, help="trained on DATA's train split at --img_size")
    parser.add_argument("--runs", default="runs/convergence", help="where the runs and their scores live")
    parser.add_argument("--recipe", action="append", dest="recipes", metavar="NAME=RECIPE[,FLAG=VALUE]")
    parser.add_argument("--reference", default="original", help="the recipe whose final Dice others chase")
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--num_classes", type=int, default=3)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="bf16", choices=("no", "bf16", "fp16"), help="training")
    parser.add_argument("--parallel", type=int, default=1, help="recipes trained at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    parser.add_argument("--num_masks", type=int, default=64, help="test masks scored per checkpoint")
    parser.add_argument("--sampler", default=DEFAULT_SCHEDULER)
    parser.add_argument("--sample_steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--sample_precision", default="auto")
    parser.add_argument("--score_only", action="store_true", help="score the checkpoints there, train nothing")
    args = parser.parse_args(argv)
    recipes = dict(parse_recipe(r) for r in (args.recipes or ["original=original", "fast=fast"]))
    runs = Path(args.runs)
    if not args.score_only:
        train_all(args, recipes, runs)
    segmenter = Segmenter.from_pretrained(args.segmenter)
    curves, ceiling = {}, math.nan
    for name in recipes:
        some = latest_checkpoint(runs / name)
        if some is None:
            continue
        card = SegDiffPipeline.from_pretrained(some, device="cpu").card
        masks, images, _ = load_test_set(Path(args.data) / "img", Path(args.data) / "mask", card, args.num_masks)
        scores = score_checkpoints(args, name, runs / name, segmenter, masks, images)
        curves[name] = {step: s["mean_dice"] for step, s in scores.items()}
        ceiling = next(iter(scores.values()))["ceiling"] if scores else ceiling
    print(f"\n{args.preset} preset, {args.img_size} px, batch {args.batch}, {args.num_masks} test masks, "
          f"samples: {args.sampler} {args.sample_steps} steps; {args.data}")  # fmt: skip
    print(report(curves, ceiling, args.reference))


if __name__ == "__main__":
    main()
