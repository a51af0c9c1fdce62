"""Do synthetic pairs train segmenters? The project's segmenter trained on real pairs, real + synthetic pairs
and synthetic pairs alone, scored by Dice on real patients.

    python benchmarks/downstream.py --data ../shared/data/psfhs-128 [--work runs/downstream] \\
        [--sizes 50,200,1086] [--seeds 0,1,2] [--synthetic 512] [--generator_steps 3000] \\
        [--generator_preset small] [--segmenter_steps 2000] [--deform mild] [--steps S] \\
        [--guidance_scale 1] [--min_dice D]
    python benchmarks/downstream.py --data ../shared/data/psfhs-128 [--seeds 0,1,2] \\
        --train-on-synthetic assets/models/psfhs-ultrasound-64 [--synthetic 512] [--real_segmenter DIR] \\
        [--deform mild] [--steps S] [--guidance_scale 1] [--min_dice D]

The table: for each N and seed, N real train pairs drawn by the seed; a generator trained by `train_cli.py` on
those N alone (the bundled PSFHS model's flags: `small` preset unless --generator_preset, `fast` recipe, mask
ablation, batch 16, bf16 where the hardware has it; `--generator_steps`), which draws M = --synthetic pairs on
mildly deformed copies of the N masks (`python -m segdiff.dataset synthesize`: --deform, --steps,
--guidance_scale; with --min_dice, checked by the segmenter of (a), which knows only the N real pairs). The
project's segmenter (`segdiff.quality train-segmenter`: 2000 steps of 16, AdamW 3e-3, the weights with the
best Dice on the real val split kept) is trained on (a) the N real pairs, (b) the N real + M synthetic pairs,
(c) the M synthetic pairs alone, (d) the N real pairs repeated M/N times + the M synthetic pairs (so half of
each batch is real, on average), and scored by mean Dice on the real test split (pubic symphysis, fetal
head). Printed: mean +- standard deviation over the seeds, and the gains of (b) and (d) over (a).

At N = every real train pair, --generator MODEL (one trained on exactly those pairs with the flags above,
such as the bundled PSFHS model) draws instead of a new one; it draws at its defaults (the bundled model: its
2-step student) unless --steps is given (--steps 12: its teacher). --real_segmenter DIR stands for that row's
(a) at seed 0 (the bundled model's segmenter was trained so). Where that row has (a) and (c), the
train-on-synthetic ratio (c) / (a) is printed, per seed and of the means. --train-on-synthetic MODEL is that
row alone: --generator MODEL, conditions a and c.

Everything lands under --work; a rerun reuses the finished generators, pairs and segmenters (a cut training
of a generator resumes from its checkpoints). Run it with OMP_NUM_THREADS set on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from segdiff.data.layout import SPLITS, SegDataset, find_cases
from segdiff.data.masks import DEFORM_LEVELS
from segdiff.measure.segmenter import Segmenter, dice, mean_dice, round_score, train_segmenter
from segdiff.model.card import CARD_FILE
from segdiff.model.pipeline import cpu_has_fast_bf16
from segdiff.synth.pairs import Settings, dropped, synthesize

ROOT = Path(__file__).resolve().parents[1]
MIN_RATIO, MIN_GAIN = 0.95, 0.02  # the targets of issue 20
CONDITIONS = ("a: real", "b: real + synthetic", "c: synthetic", "d: real x M/N + synthetic")


def link_folder(folder: Path, data: Path, pairs: list[tuple]) -> Path:
    """A data set in the original layout: `pairs` (image, mask[, name]) linked as its train split (under
    `name` when given, else under their own names), the real val and test splits of `data` linked whole.
    Built once, under a temporary name; -> the folder."""
    if folder.is_dir():
        return folder
    staging = folder.with_name(f".{folder.name}.partial")
    for kind, sub in (("img", Path()), ("mask", Path("all"))):
        train = staging / kind / sub / "train"
        train.mkdir(parents=True, exist_ok=True)
        for pair in pairs:
            link = train / (pair[2] if len(pair) > 2 else pair[0 if kind == "img" else 1].name)
            if not link.is_symlink():
                link.symlink_to(pair[0 if kind == "img" else 1].resolve())
        for split in SPLITS[1:]:
            if not (staging / kind / sub / split).is_symlink():
                (staging / kind / sub / split).symlink_to((data / kind / sub / split).resolve())
    staging.rename(folder)
    return folder


def real_pairs(data: Path, n: int, seed: int) -> list[tuple[Path, Path]]:
    """N real train pairs drawn by `seed` (all of them when N is the split's size)."""
    cases = find_cases(data / "img", data / "mask", "train")
    if n > len(cases):
        sys.exit(f"--sizes {n}: the train split holds {len(cases)} pairs")
    pick = np.random.default_rng(seed).choice(len(cases), n, replace=False) if n < len(cases) else range(n)
    return [(cases[i].image, cases[i].masks[0]) for i in sorted(pick)]


def repeated(pairs: list[tuple[Path, Path]], copies: int) -> list[tuple[Path, Path, str]]:
    """`pairs` `copies` times over, each copy under its own name (r<k>_<name>)."""
    return [(image, mask, f"r{k}_{image.name}") for k in range(copies) for image, mask in pairs]


def synthetic_pairs(folder: Path) -> list[tuple[Path, Path]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [(folder / p["image"], folder / p["mask"]) for p in manifest["pairs"] if not dropped(p)]


def train_generator(args, data: Path, out: Path, seed: int) -> Path:
    """A model trained by train_cli.py on `data`'s train split, the bundled model's flags. -> its folder."""
    card = out / CARD_FILE
    if card.is_file() and json.loads(card.read_text()).get("training", {}).get("finished"):
        return out
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, str(ROOT / "train_cli.py"), "--mode", "train", "--dataset", "downstream",
        "--img_size", str(args.img_size), "--img_dir", str(data / "img"), "--seg_dir", str(data / "mask"),
        "--segmentation_guided", "--num_segmentation_classes", str(args.num_classes),
        "--use_ablated_segmentations", "--preset", args.generator_preset, "--recipe", "fast",
        "--train_batch_size", "16",
        "--max_train_steps", str(args.generator_steps), "--checkpointing_steps", "250",
        "--save_image_epochs", "100000", "--save_model_epochs", "100000", "--sampler", "dpm++",
        "--mixed_precision", args.generator_precision,
        "--seed", str(seed), "--output_dir", str(out), "--resume",
    ]  # fmt: skip
    print(f"training the generator {out.name} ({args.generator_steps} steps)", flush=True)
    with open(out / "train.out", "a") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"training {out.name} failed: see {out / 'train.out'}")
    return out


def draw_pairs(
    args, model: str | Path, masks: Path, out: Path, seed: int, reader: Path | None = None
) -> Path:
    """M pairs drawn by `model` on deformed `masks`; with --min_dice, read back by `reader` (default: the
    model's own segmenter)."""
    settings = Settings(model=str(model), masks=str(masks), n=args.synthetic, deform=args.deform, seed=seed,
                        steps=args.steps, guidance_scale=args.guidance_scale, min_dice=args.min_dice,
                        segmenter=str(reader) if reader and args.min_dice is not None else None)  # fmt: skip
    result = synthesize(settings, out)
    if result["drawn"]:
        rate = result["drawn"] / result["seconds"]
        print(
            f"drew {result['drawn']} pairs into {out.name}: {rate:.2f} pairs/s, {result['threads']} thread(s)"
        )
    return out


def variant(args) -> str:
    """The part of a folder name that tells pairs drawn on other deformations, in other steps, with mask
    guidance or with quality control apart."""
    deform = f"-deform-{args.deform}" if args.deform != "mild" else ""
    steps = f"-steps{args.steps}" if args.steps else ""
    guided = f"-w{args.guidance_scale:g}" if args.guidance_scale != 1 else ""
    return deform + steps + guided + (f"-dice{args.min_dice:g}" if args.min_dice is not None else "")


def segment(args, data: Path, out: Path, seed: int) -> Segmenter:
    """The project's segmenter trained on `data` (kept at `out`, reused when there)."""
    if not (out / "segmenter.json").is_file():
        print(f"training the segmenter {out.name}", flush=True)
        train_segmenter(data / "img", data / "mask", args.num_classes, args.img_size, 1, out,
                        steps=args.segmenter_steps, seed=seed)  # fmt: skip
    return Segmenter.from_pretrained(out)


def test_dice(segmenter: Segmenter, test: SegDataset) -> dict:
    """Per-class and mean Dice of `segmenter` on the real test split."""
    images = torch.stack([test[i]["image"] for i in range(len(test))]) / 2 + 0.5  # (N, C, H, W) in [0, 1]
    pred, k = segmenter.predict(images), test.num_classes
    per_class = {str(c): round_score(v) for c, v in dice(pred, test.masks, k).items()}
    return {"dice": per_class, "mean_dice": round_score(mean_dice(pred, test.masks, k))}


def table(args, test: SegDataset) -> None:
    work, data = Path(args.work), Path(args.data)
    everything = len(find_cases(data / "img", data / "mask", "train"))
    scores: dict[int, dict[str, list[float]]] = {}
    for n in args.sizes:
        for seed in args.seeds:
            key = f"N{n}-seed{seed}"
            real = link_folder(work / "data" / f"{key}-real", data, real_pairs(data, n, seed))
            if n == everything and args.generator:  # a model trained on exactly these pairs, these flags
                generator, drawn = Path(args.generator), f"{key}-{Path(args.generator).name}"
            else:
                preset = f"-{args.generator_preset}" if args.generator_preset != "small" else ""
                generator = train_generator(
                    args, real, work / "generators" / f"{key}-steps{args.generator_steps}{preset}", seed
                )
                drawn = generator.name
            reader = work / "segmenters" / f"{real.name}-seg{args.segmenter_steps}"  # (a)'s, for --min_dice
            if n == everything and seed == 0 and args.real_segmenter:
                reader = Path(args.real_segmenter)
            if args.min_dice is not None:
                segment(args, real, reader, seed)
            pairs = draw_pairs(args, generator, real / "mask" / "all" / "train",
                               work / "pairs" / f"{drawn}-syn{args.synthetic}{variant(args)}", seed,
                               reader)  # fmt: skip
            synthetic, originals = synthetic_pairs(pairs), real_pairs(data, n, seed)
            copies = max(1, round(len(synthetic) / n))  # the real pairs as many as the synthetic ones
            folders = {
                CONDITIONS[0]: real,
                CONDITIONS[1]: link_folder(
                    work / "data" / f"{pairs.name}-real+syn", data, originals + synthetic
                ),
                CONDITIONS[2]: link_folder(work / "data" / f"{pairs.name}-syn", data, synthetic),
                CONDITIONS[3]: link_folder(
                    work / "data" / f"{pairs.name}-realx{copies}+syn",
                    data,
                    repeated(originals, copies) + synthetic,
                ),
            }
            for condition, folder in ((c, f) for c, f in folders.items() if c[0] in args.conditions):
                trained = work / "segmenters" / f"{folder.name}-seg{args.segmenter_steps}"
                out = reader if folder == real else trained
                score = test_dice(segment(args, folder, out, seed), test)
                scores.setdefault(n, {}).setdefault(condition, []).append(score["mean_dice"])
                print(f"N={n} seed {seed} {condition}: test mean Dice {score['mean_dice']:.4f}", flush=True)
    sizes = "-".join(str(n) for n in args.sizes)
    (work / f"table-N{sizes}{variant(args)}.json").write_text(
        json.dumps({str(n): s for n, s in scores.items()}, indent=2) + "\n"
    )
    drawing = f", --deform {args.deform}" + (f", {args.steps} steps" if args.steps else "")
    drawing += f", mask guidance {args.guidance_scale:g}" if args.guidance_scale != 1 else ""
    print(report(scores, args.synthetic, drawing))  # the columns trained
    if {CONDITIONS[0], CONDITIONS[2]} <= set(scores.get(everything, {})):
        print(ratio_report(scores[everything]))


def ratio_report(by_condition: dict[str, list[float]]) -> str:
    """Train on synthetic, test on real: (c) over (a) with every real train pair, per seed and overall."""
    real, synthetic = np.array(by_condition[CONDITIONS[0]]), np.array(by_condition[CONDITIONS[2]])
    per_seed = synthetic / real
    spread = f" (per seed {', '.join(f'{r:.3f}' for r in per_seed)})" if len(per_seed) > 1 else ""
    ratio = synthetic.mean() / real.mean()
    return (
        f"train on synthetic, test on real: {ratio:.3f}x the Dice of real training{spread} "
        f"[{'ok' if ratio >= MIN_RATIO else 'MISSED'}: target >= {MIN_RATIO}x]"
    )


def report(scores: dict[int, dict[str, list[float]]], m: int, drawing: str = "") -> str:
    """Mean +- standard deviation over the seeds per N and condition trained, and the gains of (b) and (d)
    over (a) where they were trained."""

    def cell(values: list[float]) -> str:
        spread = np.std(values, ddof=1) if len(values) > 1 else math.nan
        return f"{np.mean(values):.4f} +- {spread:.4f} ({len(values)})" if values else "-"

    trained = [c for c in CONDITIONS if any(c in by_condition for by_condition in scores.values())]
    mixes = [c for c in (CONDITIONS[1], CONDITIONS[3]) if c in trained and CONDITIONS[0] in trained]

    def gain(by_condition: dict[str, list[float]], mixed: str) -> list[float]:
        return list(np.array(by_condition[mixed]) - np.array(by_condition[CONDITIONS[0]]))

    lines = [f"mean Dice on the real test split, mean +- sd (seeds); M = {m} synthetic pairs{drawing}"]
    lines.append(" | ".join(["N".rjust(5), *(c.ljust(26) for c in trained), *(f"{c[0]} - a" for c in mixes)]))
    for n, by_condition in scores.items():
        row = [cell(by_condition.get(c, [])).ljust(26) for c in trained]
        lines.append(
            " | ".join([str(n).rjust(5), *row, *(cell(gain(by_condition, c)).ljust(24) for c in mixes)])
        )
    for mixed in mixes if 50 in scores else ():
        gains = np.array(gain(scores[50], mixed))
        spread = np.std(gains, ddof=1) if len(gains) > 1 else math.nan
        met = gains.mean() >= MIN_GAIN and gains.mean() > spread
        verdict = f"[{'ok' if met else 'MISSED'}: target >= {MIN_GAIN}, beyond the seed spread]"
        lines.append(f"N=50: {mixed[3:]} - real = {gains.mean():+.4f} (sd {spread:.4f}) {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="real data in the original layout (img/, mask/all/)")
    parser.add_argument("--work", default="runs/downstream", help="where models, pairs and segmenters go")
    parser.add_argument("--num_classes", type=int, default=3)
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[50, 200, 1086])
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--synthetic", type=int, default=512, help="M, synthetic pairs per generator")
    parser.add_argument(
        "--deform",
        default="mild",
        choices=DEFORM_LEVELS,
        help="deformation of the masks the pairs are drawn on",
    )
    parser.add_argument(
        "--steps", type=int, help="sampling steps of the drawing (default: the model's, its student if any)"
    )
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="mask guidance of the drawing")
    parser.add_argument(
        "--min_dice", type=float, help="quality control of the drawing (synthesize --min_dice)"
    )
    parser.add_argument("--generator_steps", type=int, default=3000, help="as the bundled PSFHS model")
    parser.add_argument(
        "--generator_preset",
        choices=("small", "medium"),
        default="small",
        help="the per-N generators' UNet (small: as psfhs-ultrasound-64, medium: as psfhs-ultrasound-64-medium)",
    )
    parser.add_argument(
        "--generator_precision",
        choices=["no", "bf16"],
        default="bf16" if torch.cuda.is_available() or cpu_has_fast_bf16() else "no",
        help="bf16 as the bundled model, where it is fast (GPUs, CPUs with native bf16); else no (fp32)",
    )
    parser.add_argument("--segmenter_steps", type=int, default=2000, help="as the bundled model's segmenter")
    parser.add_argument(
        "--conditions", default="abcd", help="which of the table's conditions to train (default: abcd, all)"
    )
    parser.add_argument(
        "--generator", help="at N = every real train pair, this model draws (trained there with these flags)"
    )
    parser.add_argument("--train-on-synthetic", metavar="MODEL", help="measure only the ratio, with MODEL")
    parser.add_argument(
        "--real_segmenter", help="(a) at N = every real train pair, seed 0, already trained: to reuse"
    )
    args = parser.parse_args(argv)
    test = SegDataset(
        Path(args.data) / "img", Path(args.data) / "mask", "test", args.img_size, 1, args.num_classes
    )
    if args.train_on_synthetic:  # the table's (a) and (c) at N = every real train pair, MODEL drawing
        everything = len(find_cases(Path(args.data) / "img", Path(args.data) / "mask", "train"))
        args.generator, args.sizes, args.conditions = args.train_on_synthetic, [everything], "ac"
    table(args, test)


if __name__ == "__main__":
    main()
