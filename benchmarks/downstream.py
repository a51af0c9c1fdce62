"""Do synthetic pairs train segmenters? The project's segmenter trained on real pairs, real + synthetic pairs,
synthetic pairs alone and pseudo-labelled images, scored by Dice on real patients.

    python benchmarks/downstream.py --data ../shared/data/psfhs-128 [--work runs/downstream] \\
        [--sizes 50,200,1086] [--seeds 0,1,2] [--synthetic 512] [--generator_steps 3000] \\
        [--generator_preset small] [--segmenter_steps 2000] [--deform mild] [--steps S] [--scheduler ddpm] \\
        [--guidance_scale 1] [--min_dice D] [--unlabelled] [--draw_on labelled|pseudo] [--conditions abcd]
    python benchmarks/downstream.py --data ../shared/data/psfhs-128 [--seeds 0,1,2] \\
        --train-on-synthetic assets/models/psfhs-ultrasound-64 [--synthetic 512] [--real_segmenter DIR] \\
        [--deform mild] [--steps S] [--scheduler ddpm] [--guidance_scale 1] [--min_dice D]
    python benchmarks/downstream.py --data ../shared/data/psfhs-128 --smoke  # every condition, tiny: minutes

The table: for each N and seed, N real train pairs drawn by the seed; a generator trained by `train_cli.py` on
those N alone (the bundled PSFHS model's flags: `small` preset unless --generator_preset, `fast` recipe, mask
ablation, batch 16, bf16 where the hardware has it; `--generator_steps`), which draws M = --synthetic pairs on
mildly deformed copies of the N masks (`python -m segdiff.dataset synthesize`: --deform, --steps,
--guidance_scale; with --min_dice, checked by the segmenter of (a), which knows only the N real pairs). The
project's segmenter (`segdiff.quality train-segmenter`: 2000 steps of 16, AdamW 3e-3, the weights with the
best Dice on the real val split kept) is trained on (a) the N real pairs, (b) the N real + M synthetic pairs,
(c) the M synthetic pairs alone, (d) the N real pairs repeated M/N times + the M synthetic pairs (so half of
each batch is real, on average), (e) self-training, the usual answer without a generator: the segmenter of (a)
labels the other train images (`segdiff.measure.segmenter.pseudo_label`, masks at the images' stored size),
and one is trained on the N real + those pseudo-labelled pairs, (f) (e) + the M synthetic pairs; each is
scored by mean Dice on the real test split (pubic symphysis, fetal head).

Few labels, many images (issue 35): with --unlabelled each generator also trains on the other train
images, without their masks (`train_cli.py --unlabelled_dir`: every class ablated, the N labelled repeated
to about half of each epoch); with --draw_on pseudo the pairs are drawn on (deformed) pseudo-labels of those
images instead of the N masks. Each row's cost is the seconds of all it needed, as recorded when each part
was made (the generator's training, the drawing, the pseudo-labelling, (a)'s segmenter where it was used,
its own segmenter): rough on a shared machine; nan where a part made before costs were kept has no record.
Printed: mean +- standard deviation over the seeds of the Dice and the cost, and (b) - (a), (d) - (a),
(f) - (e).

At N = every real train pair, --generator MODEL (one trained on exactly those pairs with the flags above,
such as the bundled PSFHS model) draws instead of a new one; it draws at its defaults (the bundled model: its
2-step student) unless --steps is given (--steps 12: its teacher). --real_segmenter DIR stands for that row's
(a) at seed 0 (the bundled model's segmenter was trained so). Where that row has (a) and (c), the
train-on-synthetic ratio (c) / (a) is printed, per seed and of the means. --train-on-synthetic MODEL is that
row alone: --generator MODEL, conditions a and c. At N = every real train pair no image is left unlabelled:
(e) and (f) are skipped there, and the generator trains on the labelled pairs alone.

Everything lands under --work; a rerun reuses the finished generators, pairs and segmenters (a cut training
of a generator resumes from its checkpoints). Run it with OMP_NUM_THREADS set on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from segdiff.choices import SAMPLERS
from segdiff.data.layout import SPLITS, SegDataset, find_cases, image_format
from segdiff.data.masks import DEFORM_LEVELS
from segdiff.files import write_text
from segdiff.measure.segmenter import CONFIG_FILE as SEGMENTER_FILE
from segdiff.measure.segmenter import (
    Segmenter,
    dice,
    mean_dice,
    pseudo_label,
    round_score,
    train_segmenter,
)
from segdiff.model.card import CARD_FILE
from segdiff.model.pipeline import cpu_has_fast_bf16
from segdiff.synth.pairs import Settings, dropped, synthesize

ROOT = Path(__file__).resolve().parents[1]
MIN_RATIO, MIN_GAIN = 0.95, 0.02  # the targets of issue 20
CONDITIONS = (
    "a: real",
    "b: real + synthetic",
    "c: synthetic",
    "d: real x M/N + synthetic",
    "e: real + pseudo-labelled",
    "f: real + pseudo-labelled + synthetic",
)
NAMED = {c[0]: c for c in CONDITIONS}
# (better, base, target) at N = 50: issue 20's and 35's (f >= e: the pairs add to what pseudo-labels give)
GAINS = (("b", "a", MIN_GAIN), ("d", "a", MIN_GAIN), ("f", "e", 0.0))
# Every condition, tiny, to check the wiring in minutes (its figures mean nothing); flags given beside win.
SMOKE = {
    "work": "runs/downstream-smoke", "sizes": [50], "seeds": [0], "synthetic": 16, "generator_steps": 10,
    "segmenter_steps": 20, "unlabelled": True, "conditions": "abcdef",
}  # fmt: skip


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


def link_images(folder: Path, images: list[Path]) -> Path:
    """`images` linked into `folder`/train/, built once under a temporary name -> the folder."""
    if not folder.is_dir():
        staging = folder.with_name(f".{folder.name}.partial")
        (staging / "train").mkdir(parents=True, exist_ok=True)
        for image in images:
            if not (staging / "train" / image.name).is_symlink():
                (staging / "train" / image.name).symlink_to(image.resolve())
        staging.rename(folder)
    return folder


def train_split(data: Path, n: int, seed: int) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """N real train pairs drawn by `seed` (all of them when N is the split's size), and the other train
    images: the unlabelled ones, whose masks nothing here reads."""
    cases = find_cases(data / "img", data / "mask", "train")
    if n > len(cases):
        sys.exit(f"--sizes {n}: the train split holds {len(cases)} pairs")
    pick = np.random.default_rng(seed).choice(len(cases), n, replace=False) if n < len(cases) else range(n)
    labelled = set(int(i) for i in pick)
    return (
        [(case.image, case.masks[0]) for i, case in enumerate(cases) if i in labelled],
        [case.image for i, case in enumerate(cases) if i not in labelled],
    )


def repeated(pairs: list[tuple[Path, Path]], copies: int) -> list[tuple[Path, Path, str]]:
    """`pairs` `copies` times over, each copy under its own name (r<k>_<name>)."""
    return [(image, mask, f"r{k}_{image.name}") for k in range(copies) for image, mask in pairs]


def synthetic_pairs(folder: Path) -> list[tuple[Path, Path]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [(folder / p["image"], folder / p["mask"]) for p in manifest["pairs"] if not dropped(p)]


def spent(folder: Path, seconds: float = 0.0) -> float:
    """Seconds spent making `folder` (pairs drawn, images labelled), kept beside it in `<folder>.seconds`
    across reruns and resumed drawings; `seconds` adds to them. nan where nothing was recorded."""
    record = folder.with_name(f"{folder.name}.seconds")
    total = (float(record.read_text()) if record.is_file() else 0.0) + seconds
    if seconds:
        write_text(record, f"{total:.1f}\n")
    return total if record.is_file() else math.nan


def training_seconds(folder: Path) -> float:
    """The training seconds a generator's card or a segmenter's config records (nan where none)."""
    for file in (folder / CARD_FILE, folder / SEGMENTER_FILE):
        if file.is_file():
            return float((json.loads(file.read_text()).get("training") or {}).get("seconds", math.nan))
    return math.nan


def train_generator(args, data: Path, out: Path, seed: int, unlabelled: Path | None = None) -> Path:
    """A model trained by train_cli.py on `data`'s train split (+ the images of `unlabelled`, without masks),
    the bundled model's flags. -> its folder."""
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
    ] + (["--unlabelled_dir", str(unlabelled)] if unlabelled else [])  # fmt: skip
    print(f"training the generator {out.name} ({args.generator_steps} steps)", flush=True)
    with open(out / "train.out", "a") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"training {out.name} failed: see {out / 'train.out'}")
    return out


def generator(args, real: Path, rest: list[Path], key: str, seed: int) -> tuple[Path, str]:
    """The model that draws the pairs of one N and seed -> (its folder, the name its pairs go under)."""
    if not rest and args.generator:  # a model trained on exactly these pairs, these flags
        return Path(args.generator), f"{key}-{Path(args.generator).name}"
    work = Path(args.work)
    unlabelled = link_images(work / "data" / f"{key}-unlabelled", rest) if args.unlabelled and rest else None
    preset = f"-{args.generator_preset}" if args.generator_preset != "small" else ""
    name = f"{key}-steps{args.generator_steps}{preset}" + ("-unlabelled" if unlabelled else "")
    folder = train_generator(args, real, work / "generators" / name, seed, unlabelled)
    return folder, folder.name


def draw_pairs(
    args, model: str | Path, masks: Path, out: Path, seed: int, reader: Path | None = None
) -> Path:
    """M pairs drawn by `model` on deformed `masks`; with --min_dice, read back by `reader` (default: the
    model's own segmenter)."""
    settings = Settings(model=str(model), masks=str(masks), n=args.synthetic, deform=args.deform, seed=seed,
                        steps=args.steps, scheduler=args.scheduler, guidance_scale=args.guidance_scale,
                        min_dice=args.min_dice,
                        segmenter=str(reader) if reader and args.min_dice is not None else None)  # fmt: skip
    result = synthesize(settings, out)
    if result["drawn"]:
        spent(out, result["seconds"])
        rate = result["drawn"] / result["seconds"]
        print(
            f"drew {result['drawn']} pairs into {out.name}: {rate:.2f} pairs/s, {result['threads']} thread(s)"
        )
    return out


def variant(args) -> str:
    """The part of a folder name that tells pairs drawn on other deformations, in other steps, with mask
    guidance or with quality control apart."""
    deform = f"-deform-{args.deform}" if args.deform not in (None, "mild") else ""
    steps = f"-steps{args.steps}" if args.steps else ""
    steps = (f"-{args.scheduler.replace('+', 'p')}" if args.scheduler else "") + steps
    guided = f"-w{args.guidance_scale:g}" if args.guidance_scale not in (None, 1) else ""
    checked = f"-dice{args.min_dice:g}" if args.min_dice is not None else ""
    # pseudo-labels are (a)'s segmenter's, so its steps tell them apart
    on = f"-on-pseudo{args.segmenter_steps}" if args.draw_on == "pseudo" else ""
    return deform + steps + guided + checked + on


def segment(args, data: Path, out: Path, seed: int) -> Segmenter:
    """The project's segmenter trained on `data` (kept at `out`, reused when there)."""
    if not (out / "segmenter.json").is_file():
        print(f"training the segmenter {out.name}", flush=True)
        train_segmenter(data / "img", data / "mask", args.num_classes, args.img_size, 1, out,
                        steps=args.segmenter_steps, seed=seed)  # fmt: skip
    return Segmenter.from_pretrained(out)


def pseudo_labels(args, reader: Path, images: list[Path]) -> Path:
    """`images` labelled by the segmenter at `reader` (trained on the N real pairs), the masks at the images'
    stored size where it is a multiple of --img_size -> their folder (reused when there)."""
    out = Path(args.work) / "pseudo" / reader.name
    if not out.is_dir():
        print(f"labelling {len(images)} images with {reader.name}", flush=True)
        stored, started = image_format(images[0])[0], time.perf_counter()
        size = stored if stored % args.img_size == 0 else None
        pseudo_label(Segmenter.from_pretrained(reader), images, out, size)
        spent(out, time.perf_counter() - started)
    return out


def test_dice(segmenter: Segmenter, test: SegDataset) -> dict:
    """Per-class and mean Dice of `segmenter` on the real test split."""
    images = torch.stack([test[i]["image"] for i in range(len(test))]) / 2 + 0.5  # (N, C, H, W) in [0, 1]
    pred, k = segmenter.predict(images), test.num_classes
    per_class = {str(c): round_score(v) for c, v in dice(pred, test.masks, k).items()}
    return {"dice": per_class, "mean_dice": round_score(mean_dice(pred, test.masks, k))}


def mixes(pairs: Path, originals: list, pseudo: list | None, steps: int) -> dict[str, tuple[str, list]]:
    """The training sets that hold the synthetic pairs in `pairs` beside the N real `originals` (and, for
    (f), the `pseudo`-labelled pairs of (a)'s segmenter of `steps` steps): condition -> (folder name,
    pairs)."""
    synthetic = synthetic_pairs(pairs)
    copies = max(1, round(len(synthetic) / len(originals)))  # the real pairs as many as the synthetic ones
    sets = {
        "b": (f"{pairs.name}-real+syn", originals + synthetic),
        "c": (f"{pairs.name}-syn", synthetic),
        "d": (f"{pairs.name}-realx{copies}+syn", repeated(originals, copies) + synthetic),
    }
    if pseudo is not None:
        sets["f"] = (f"{pairs.name}-real+pseudo{steps}+syn", originals + pseudo + synthetic)
    return sets


def trained(args, data: Path, n: int, seed: int) -> dict[str, tuple[Segmenter, float]]:
    """The conditions asked at one N and seed -> {condition: (its segmenter, its cost in seconds)}, the cost
    summing what it needed: its segmenter, and the generator, the drawing, (a)'s segmenter and the
    pseudo-labelling where it used them."""
    work, key = Path(args.work), f"N{n}-seed{seed}"
    originals, rest = train_split(data, n, seed)
    real = link_folder(work / "data" / f"{key}-real", data, originals)
    reader = work / "segmenters" / f"{real.name}-seg{args.segmenter_steps}"  # (a)'s: reads back, labels
    if not rest and seed == 0 and args.real_segmenter:
        reader = Path(args.real_segmenter)
    asked = sorted(c for c in set(args.conditions) if rest or c not in "ef")  # at N = all, none to label
    on_pseudo = args.draw_on == "pseudo" and bool(rest)
    labelling = bool(set(asked) & set("ef")) or on_pseudo
    folders: dict[str, tuple[Path, set[str]]] = {"a": (real, set())}  # condition: (data, the parts it used)
    costs: dict[str, float] = {}
    if labelling or args.min_dice is not None:
        segment(args, real, reader, seed)
        costs["a"] = training_seconds(reader)
    pseudo_pairs = None
    if labelling:
        pseudo = pseudo_labels(args, reader, rest)
        costs["label"] = spent(pseudo)
        pseudo_pairs = [(image, pseudo / image.name) for image in rest]
        e = link_folder(work / "data" / f"{reader.name}-pseudo", data, originals + pseudo_pairs)
        folders["e"] = (e, {"a", "label"})
    if set(asked) & set("bcdf"):
        model, drawn = generator(args, real, rest, key, seed)
        masks = pseudo if on_pseudo else real / "mask" / "all" / "train"
        pairs = draw_pairs(args, model, masks, work / "pairs" / f"{drawn}-syn{args.synthetic}{variant(args)}",
                           seed, reader)  # fmt: skip
        costs["generator"], costs["draw"] = training_seconds(model), spent(pairs)
        used = {"generator", "draw"} | ({"a", "label"} if on_pseudo else set())
        used |= {"a"} if args.min_dice is not None else set()
        for letter, (name, mix) in mixes(pairs, originals, pseudo_pairs, args.segmenter_steps).items():
            if letter in asked:
                pseudo_used = {"a", "label"} if letter == "f" else set()
                folders[letter] = (link_folder(work / "data" / name, data, mix), used | pseudo_used)
    result = {}
    for letter in asked:
        folder, used = folders[letter]
        out = reader if letter == "a" else work / "segmenters" / f"{folder.name}-seg{args.segmenter_steps}"
        segmenter = segment(args, folder, out, seed)
        result[NAMED[letter]] = (segmenter, training_seconds(out) + sum(costs[part] for part in used))
    return result


def table(args, test: SegDataset) -> None:
    work, data = Path(args.work), Path(args.data)
    everything = len(find_cases(data / "img", data / "mask", "train"))
    scores: dict[int, dict[str, dict[str, list[float]]]] = {}  # N: condition: {"dice", "seconds"}: per seed
    for n in args.sizes:
        for seed in args.seeds:
            for condition, (segmenter, seconds) in trained(args, data, n, seed).items():
                score = test_dice(segmenter, test)["mean_dice"]
                row = scores.setdefault(n, {}).setdefault(condition, {"dice": [], "seconds": []})
                row["dice"].append(score)
                row["seconds"].append(seconds)
                print(
                    f"N={n} seed {seed} {condition}: test mean Dice {score:.4f}, cost {seconds:.0f} s",
                    flush=True,
                )
    sizes = "-".join(str(n) for n in args.sizes)
    generators = "-unlabelled" if args.unlabelled else ""
    (work / f"table-N{sizes}{generators}{variant(args)}.json").write_text(
        json.dumps({str(n): s for n, s in scores.items()}, indent=2) + "\n"
    )
    drawing = f", --deform {args.deform}" if args.deform else ", the generator card's drawing settings"
    drawing += f", {args.steps} steps" if args.steps else ""
    drawing += f" of {args.scheduler}" if args.scheduler else ""
    drawing += f", mask guidance {args.guidance_scale:g}" if args.guidance_scale not in (None, 1) else ""
    drawing += ", on the pseudo-labels" if args.draw_on == "pseudo" else ""
    drawing += "; generators with the other train images unlabelled" if args.unlabelled else ""
    print(report(scores, args.synthetic, drawing))  # the rows trained
    if {CONDITIONS[0], CONDITIONS[2]} <= set(scores.get(everything, {})):
        print(ratio_report(scores[everything]))


def ratio_report(by_condition: dict[str, dict[str, list[float]]]) -> str:
    """Train on synthetic, test on real: (c) over (a) with every real train pair, per seed and overall."""
    real = np.array(by_condition[CONDITIONS[0]]["dice"])
    synthetic = np.array(by_condition[CONDITIONS[2]]["dice"])
    per_seed = synthetic / real
    spread = f" (per seed {', '.join(f'{r:.3f}' for r in per_seed)})" if len(per_seed) > 1 else ""
    ratio = synthetic.mean() / real.mean()
    return (
        f"train on synthetic, test on real: {ratio:.3f}x the Dice of real training{spread} "
        f"[{'ok' if ratio >= MIN_RATIO else 'MISSED'}: target >= {MIN_RATIO}x]"
    )


def cell(values: list[float], digits: int = 4) -> str:
    """Mean +- standard deviation over the seeds (their count)."""
    spread = np.std(values, ddof=1) if len(values) > 1 else math.nan
    return f"{np.mean(values):.{digits}f} +- {spread:.{digits}f} ({len(values)})"


def report(scores: dict[int, dict[str, dict[str, list[float]]]], m: int, drawing: str = "") -> str:
    """Per N, a row per condition trained (test Dice and cost over the seeds), then the GAINS whose both
    sides were trained (Dice and extra cost, seed by seed), and at N = 50 their verdicts."""
    lines = [
        f"mean Dice on the real test split and cost in seconds, mean +- sd (seeds); M = {m} synthetic pairs"
        + drawing,
        " | ".join(["N".rjust(5), "condition".ljust(38), "test mean Dice".ljust(22), "cost (s)"]),
    ]
    verdicts = []
    for n, by_condition in scores.items():
        for condition, row in by_condition.items():
            cells = [cell(row["dice"]).ljust(22), cell(row["seconds"], 0)]
            lines.append(" | ".join([str(n).rjust(5), condition.ljust(38), *cells]))
        for better, base, target in GAINS:
            if not {NAMED[better], NAMED[base]} <= set(by_condition):
                continue
            gain, extra = (
                list(np.array(by_condition[NAMED[better]][k]) - np.array(by_condition[NAMED[base]][k]))
                for k in ("dice", "seconds")
            )
            lines.append(" | ".join([str(n).rjust(5), f"{better} - {base}".ljust(38), cell(gain).ljust(22),
                                     cell(extra, 0)]))  # fmt: skip
            if n == 50:
                spread = np.std(gain, ddof=1) if len(gain) > 1 else math.nan
                met = np.mean(gain) >= target and (target == 0 or np.mean(gain) > spread)
                aim = f">= {target:+g}" + (", beyond the seed spread" if target else "")
                verdicts.append(
                    f"N=50: {better} - {base} = {np.mean(gain):+.4f} (sd {spread:.4f}) "
                    f"[{'ok' if met else 'MISSED'}: target {aim}]"
                )
    return "\n".join(lines + verdicts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="real data in the original layout (img/, mask/all/)")
    parser.add_argument("--work", default="runs/downstream", help="where models, pairs and segmenters go")
    parser.add_argument("--num_classes", type=int, default=3)
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[50, 200, 1086])
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--synthetic", type=int, default=512, help="M, synthetic pairs per generator")
    # Left out, the drawing settings are what `dataset synthesize` takes with no flags: the generator card's
    # recommendation (`synthesis`), else --deform mild, the model's default sampling and no mask guidance.
    parser.add_argument(
        "--deform", choices=DEFORM_LEVELS, help="deformation of the masks the pairs are drawn on"
    )
    parser.add_argument("--steps", type=int, help="sampling steps of the drawing")
    parser.add_argument(
        "--scheduler", "--sampler", choices=SAMPLERS, help="sampler of the drawing (ddpm: the texture of scans)"
    )
    parser.add_argument("--guidance_scale", type=float, help="mask guidance of the drawing")
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
        "--conditions",
        default="abcd",
        help="which of the table's conditions a-f to train (default: abcd; issue 35's table: abef)",
    )
    parser.add_argument(
        "--unlabelled",
        action="store_true",
        help="the generators also train on the other train images, without their masks (--unlabelled_dir)",
    )
    parser.add_argument(
        "--draw_on",
        choices=("labelled", "pseudo"),
        default="labelled",
        help="the masks the pairs are drawn on (deformed by --deform): the N real ones, or the pseudo-labels "
        "(a)'s segmenter gives the other train images",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every condition in minutes, to check the wiring: N = 50, seed 0, 16 pairs, 10-step generators "
        "with the unlabelled images, 20-step segmenters, in runs/downstream-smoke (other flags still apply)",
    )
    parser.add_argument(
        "--generator", help="at N = every real train pair, this model draws (trained there with these flags)"
    )
    parser.add_argument("--train-on-synthetic", metavar="MODEL", help="measure only the ratio, with MODEL")
    parser.add_argument(
        "--real_segmenter", help="(a) at N = every real train pair, seed 0, already trained: to reuse"
    )
    args = parser.parse_args(argv)
    if args.smoke:  # tiny defaults; flags given beside --smoke still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    if set(args.conditions) - set(NAMED):
        parser.error(f"--conditions {args.conditions}: expected letters among {''.join(NAMED)}")
    test = SegDataset(
        Path(args.data) / "img", Path(args.data) / "mask", "test", args.img_size, 1, args.num_classes
    )
    if args.train_on_synthetic:  # the table's (a) and (c) at N = every real train pair, MODEL drawing
        everything = len(find_cases(Path(args.data) / "img", Path(args.data) / "mask", "train"))
        args.generator, args.sizes, args.conditions = args.train_on_synthetic, [everything], "ac"
    table(args, test)


if __name__ == "__main__":
    main()
