"""Synthetic paired data: new masks bent from real ones, and an image drawn by a model for each.

Drawing images for the masks one already has adds no anatomy; bending those masks (`segdiff.data.masks.deform`)
does. The pairs land in a layout segmentation tools read:

    original  OUT/img/train/syn_<i>.png, OUT/mask/all/train/syn_<i>.png, OUT/classes.json
    nnunet    OUT/imagesTr/syn_<i>_0000.png, OUT/labelsTr/syn_<i>.png, OUT/dataset.json (nnU-Net v2 raw)

and OUT/manifest.json records the model, its card's data credit, the settings, and each pair's source mask
and deformation. Pair i depends only on (seed, i): its source mask, its deformation and its noise. Images are
drawn in fixed batches and every file is written under a temporary name and renamed, so a killed run, rerun
with the same arguments, writes the files an uninterrupted one would.

    python -m segdiff.dataset synthesize MODEL OUT --masks MASK_DIR [--n N] [--deform none|mild|strong]
        [--layout original|nnunet] [--seed S] [--batch_size B] [--steps STEPS] [--guidance_scale W]
        [--min_dice D [--segmenter DIR]]

--min_dice is quality control: the model's own segmenter (trained on its real training pairs) reads each image
back, and a pair it reads back at a mean Dice below D against its mask is drawn again with new noise, up to
MAX_ATTEMPTS draws in all; a pair no draw brings to D is left out (the manifest marks it dropped), so the run
writes at most N pairs. What it measured on PSFHS, and mask guidance beside it: docs/dataset.md.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.layout import read_mask
from ..data.masks import DEFORM_LEVELS, deform_keeping_classes, deformation_bounds
from ..errors import ConfigError, DataLayoutError
from ..files import write_json, write_png
from ..measure.segmenter import Segmenter, mean_dice
from ..model.pipeline import DEFAULT_SCHEDULER, DEFAULT_STEPS, MAX_GUIDANCE, SegDiffPipeline, check_guidance
from ..model.sampling import noise_generator, write_sample
from ..resolve import model_folder

LAYOUTS = ("original", "nnunet")
MANIFEST = "manifest.json"
MAX_PAIRS = 2**24  # pair i's draw a has the noise of index i + a * MAX_PAIRS
MAX_ATTEMPTS = 8  # draws of one pair at most under --min_dice


@dataclass(frozen=True)
class Settings:
    """What a run draws; a rerun continues a folder only when every one of these is the same."""

    model: str
    masks: str
    n: int | None = None  # None: one pair per mask
    deform: str = "mild"
    layout: str = "original"
    seed: int = 0
    batch_size: int = 16
    steps: int | None = None  # None with scheduler None: the model's defaults (its student, if it has one)
    scheduler: str | None = None
    guidance_scale: float = 1.0  # mask guidance; 1 = none
    min_dice: float | None = None  # redraw pairs the segmenter reads back below this
    segmenter: str | None = None  # None: the model's own

    def __post_init__(self):
        if self.n is not None and not 1 <= self.n < MAX_PAIRS:
            raise ConfigError(f"--n {self.n}: expected a number of pairs from 1 to {MAX_PAIRS - 1}")
        if self.batch_size < 1 or (self.steps is not None and self.steps < 1):
            raise ConfigError(f"--batch_size {self.batch_size}, --steps {self.steps}: expected both >= 1")
        if self.deform not in DEFORM_LEVELS:
            raise ConfigError(f"--deform {self.deform}: expected one of {', '.join(DEFORM_LEVELS)}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"--layout {self.layout}: expected one of {', '.join(LAYOUTS)}")
        if not 1 <= self.guidance_scale <= MAX_GUIDANCE:
            raise ConfigError(
                f"--guidance_scale {self.guidance_scale}: expected 1 (none) to {MAX_GUIDANCE:g}"
            )
        if self.min_dice is not None and not 0 < self.min_dice < 1:
            raise ConfigError(f"--min_dice {self.min_dice}: expected a Dice between 0 and 1")
        if self.segmenter is not None and self.min_dice is None:
            raise ConfigError("--segmenter: it reads the images back for --min_dice; give --min_dice too")


def pair_name(index: int, n: int) -> str:
    """`syn_00042`: zero-padded to at least 5 digits, so names sort in drawing order."""
    return f"syn_{index:0{max(5, len(str(n - 1)))}d}"


def pair_paths(out: Path, layout: str, name: str, suffix: str = ".png") -> tuple[Path, Path]:
    """(image path, mask path) of pair `name` in `layout`."""
    if layout == "nnunet":
        return out / "imagesTr" / f"{name}_0000{suffix}", out / "labelsTr" / f"{name}.png"
    return out / "img" / "train" / f"{name}{suffix}", out / "mask" / "all" / "train" / f"{name}.png"


def read_masks(mask_dir: str | os.PathLike, pipe: SegDiffPipeline) -> tuple[list[str], np.ndarray]:
    """Every mask file of `mask_dir` -> (file names, (N, H, W) uint8 class ids at the model's size).

    Masks of another size are resized by nearest neighbour; ids the model does not know are refused.
    """
    folder = Path(mask_dir)
    if not folder.is_dir():
        raise DataLayoutError(f"{folder}: no such mask folder (expected a folder of mask PNGs)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataLayoutError(f"{folder}: no mask files inside (expected mask PNGs of class ids)")
    card = pipe.card
    masks = [read_mask(f, card.num_classes, card.palette, size=card.img_size) for f in files]
    return [f.name for f in files], np.stack(masks).astype(np.uint8)


def plan(names: list[str], masks: np.ndarray, n: int, settings: Settings) -> tuple[list[dict], np.ndarray]:
    """Each of `n` pairs' source mask and deformation -> (JSON-ready records, (n, H, W) uint8 new masks).

    Sources run through the masks in an order shuffled by the seed, so the first N of a larger run are the
    pairs of a smaller one; pair i's deformation draws from its own generator for (seed, i).
    """
    order = np.random.default_rng(settings.seed).permutation(len(names))
    records, new_masks = [], []
    for i in range(n):
        source = int(order[i % len(names)])
        mask, record = deform_keeping_classes(
            masks[source], settings.deform, np.random.default_rng([settings.seed, i])
        )
        records.append({"name": pair_name(i, n), "source": names[source], "deformation": record})
        new_masks.append(mask)
    return records, np.stack(new_masks)


def _check_folder(out: Path, manifest: dict) -> list[dict]:
    """Refuse a folder holding another run (or files of something else); one of this run is continued.
    -> the pairs of the earlier run's manifest (none for a new folder)."""
    path = out / MANIFEST
    if path.is_file():
        try:
            earlier = json.loads(path.read_text())
            before = earlier["settings"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataLayoutError(f"{path}: cannot read the earlier run's settings ({e})") from e
        defaults = {f.name: f.default for f in fields(Settings)}  # of settings added since that run
        changed = [
            f"{k} {before.get(k, defaults.get(k))!r} -> {v!r}"
            for k, v in manifest["settings"].items()
            if before.get(k, defaults.get(k)) != v
        ]
        if changed:
            raise DataLayoutError(
                f"{out}: holds a run with other settings ({'; '.join(changed)}); "
                "rerun with the same arguments to continue it, or choose a new folder"
            )
        return earlier.get("pairs", [])
    if out.is_dir() and any(out.iterdir()):
        raise DataLayoutError(f"{out}: holds files but no {MANIFEST}; expected a new or empty folder")
    return []


def dropped(record: dict) -> bool:
    """Whether --min_dice left this pair out (no draw read back at its Dice)."""
    return bool(record.get("check", {}).get("dropped"))


def _keep_checks(earlier: list[dict], records: list[dict]) -> None:
    """The read-back Dice of the pairs an earlier run of these settings drew (`earlier`: its manifest's)."""
    checks = {p["name"]: p["check"] for p in earlier if p.get("check")}
    for record in records:
        if record["name"] in checks:
            record["check"] = checks[record["name"]]


def _layout_files(out: Path, pipe: SegDiffPipeline, settings: Settings, manifest: dict, n: int) -> None:
    """The layout's own description: classes.json (original) or nnU-Net's dataset.json."""
    card = pipe.card
    if settings.layout == "original":
        info = {"source": "segdiff.dataset", "class_names": card.class_names, "num_classes": card.num_classes}
        write_json(out / "classes.json", info)
        return
    channels = {"0": "image"} if card.img_channels == 1 else {"0": "R", "1": "G", "2": "B"}
    info = {
        "channel_names": channels,
        "labels": {name: i for i, name in enumerate(card.class_names)},
        "numTraining": n,
        "file_ending": ".png",
        "name": f"synthetic pairs from {Path(settings.model).name}",
        "reference": manifest["data_credit"].get("citation", ""),
        "licence": manifest["data_credit"].get("license", ""),
    }
    write_json(out / "dataset.json", info)


def _sampling(settings: Settings, card) -> str:
    """What draws the images, in words: the model's student at its defaults, else a sampler and steps; and
    the mask guidance, when there is some."""
    if settings.steps is None and settings.scheduler is None and card.distilled:
        words = f"the model's student, {card.distilled.steps} steps"
    else:
        words = f"{settings.scheduler or DEFAULT_SCHEDULER}, {settings.steps or DEFAULT_STEPS} steps"
    if settings.guidance_scale != 1:
        words += f", mask guidance {settings.guidance_scale:g}"
    if settings.min_dice is not None:
        words += (
            f"; redrawn (up to {MAX_ATTEMPTS} draws) while the segmenter reads Dice < {settings.min_dice:g}"
        )
    return words


def open_segmenter(settings: Settings, pipe: SegDiffPipeline) -> Segmenter | None:
    """The segmenter that reads the images back under --min_dice: --segmenter, else the model's own."""
    if settings.min_dice is None:
        return None
    card = pipe.card
    if settings.segmenter is not None:
        segmenter = Segmenter.from_pretrained(settings.segmenter)
    elif card.segmenter is not None:
        segmenter = Segmenter.from_pretrained(model_folder(settings.model) / card.segmenter)
    else:
        raise ConfigError(f"--min_dice: {settings.model} has no segmenter of its own; pass --segmenter DIR")
    segmenter.check_reads(card.num_classes, card.img_channels, card.img_size)
    return segmenter.to(pipe.device)


def draw(pipe, masks: np.ndarray, indices: list[int], settings: Settings, attempt: int = 0) -> np.ndarray:
    """Draw `attempt` of pairs `indices` -> (B, H, W, C) float in [0, 1]; it depends only on (seed, i, attempt)."""
    return pipe(
        masks[indices],
        num_inference_steps=settings.steps,
        scheduler=settings.scheduler,
        generator=[noise_generator(settings.seed, i + attempt * MAX_PAIRS) for i in indices],
        output_type="np",
        guidance_scale=settings.guidance_scale,
    ).images


def draw_checked(
    pipe, segmenter, masks, indices: list[int], settings: Settings
) -> tuple[np.ndarray, list[dict]]:
    """The images of pairs `indices`; under --min_dice, each one the segmenter reads back below it drawn again
    (attempts 1, 2, ...) until one passes or MAX_ATTEMPTS are spent, the best kept.
    -> (images, per pair {"dice": its read-back Dice, "draw": which draw was kept (1 = the first), "draws": how
    many were made}; none without --min_dice)."""
    images = draw(pipe, masks, indices, settings)
    if segmenter is None:
        return images, []
    k = pipe.card.num_classes

    def scores(drawn: np.ndarray, which: list[int]) -> list[float]:
        pred = segmenter.predict(drawn)
        # A mask of background alone asks nothing of its image: it passes.
        return [np.nan_to_num(mean_dice(p, masks[i], k), nan=1.0) for p, i in zip(pred, which, strict=True)]

    checks = [{"dice": score, "draw": 1, "draws": 1} for score in scores(images, indices)]
    for attempt in range(1, MAX_ATTEMPTS):
        redo = [j for j, check in enumerate(checks) if check["dice"] < settings.min_dice]
        if not redo:
            break
        which = [indices[j] for j in redo]
        again = draw(pipe, masks, which, settings, attempt)
        for j, image, score in zip(redo, again, scores(again, which), strict=True):
            checks[j]["draws"] += 1
            if score > checks[j]["dice"]:
                images[j], checks[j]["dice"], checks[j]["draw"] = image, score, attempt + 1
    for check in checks:
        check["dice"] = round(float(check["dice"]), 4)
    return images, checks


def synthesize(settings: Settings, out: str | os.PathLike, progress: bool = False) -> dict:
    """Write `settings.n` new image-mask pairs (one per mask when None) to `out`, continuing an earlier run of
    the same settings.

    Returns {"folder", "drawn" (pairs drawn now), "skipped" (pairs already there), "dropped" (pairs left out
    by --min_dice, in all), "seconds" (drawing time), "device", "threads"}.
    """
    out = Path(out)
    pipe = SegDiffPipeline.from_pretrained(settings.model)
    pipe.set_progress_bar_config(disable=True)
    card = pipe.card
    if not card.guided:
        raise ConfigError(f"{settings.model}: an unconditional model; expected a segmentation-guided one")
    check_guidance(settings.guidance_scale, card.guided)
    segmenter = open_segmenter(settings, pipe)
    if settings.layout == "nnunet" and card.img_channels not in (1, 3):
        raise ConfigError(f"--layout nnunet: {card.img_channels}-channel images cannot be PNGs; use original")
    names, masks = read_masks(settings.masks, pipe)
    n = settings.n or len(names)
    records, new_masks = plan(names, masks, n, settings)
    suffix = ".png" if card.img_channels in (1, 3) else ".npy"
    for record in records:
        image, mask = pair_paths(out, settings.layout, record["name"], suffix)
        record["image"], record["mask"] = str(image.relative_to(out)), str(mask.relative_to(out))
    manifest = {
        "tool": "python -m segdiff.dataset synthesize",
        "model": settings.model,
        "data_credit": card.dataset or {"note": "the model card names no data set"},
        "class_names": card.class_names,
        "settings": asdict(settings),
        "sampling": _sampling(settings, card),
        "deformation_bounds": deformation_bounds(),
        "complete": False,
        "pairs": records,
    }
    _keep_checks(_check_folder(out, manifest), records)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob(".*.tmp"):  # what a killed run was writing when it stopped
        stale.unlink()
    write_json(out / MANIFEST, manifest)

    def done(i: int) -> bool:  # pair i's files are there, or --min_dice left it out
        return dropped(records[i]) or all((out / records[i][k]).is_file() for k in ("image", "mask"))

    batches = [range(s, min(s + settings.batch_size, n)) for s in range(0, n, settings.batch_size)]
    todo = [b for b in batches if not all(done(i) for i in b)]
    drawn = sum(len(b) for b in todo)
    bar = tqdm(total=drawn, desc="synthesize", unit="pair", disable=not progress)
    started = time.perf_counter()
    for batch in todo:
        images, checks = draw_checked(pipe, segmenter, new_masks, list(batch), settings)
        for i, check in zip(batch, checks, strict=False):
            records[i]["check"] = {**check, "dropped": check["dice"] < settings.min_dice}
        for i, image in zip(batch, images, strict=True):
            if not dropped(records[i]):
                write_sample(image, out / records[i]["image"])
                write_png(new_masks[i], out / records[i]["mask"])
        if checks:  # which pairs were left out must outlive a killed run: they have no files to tell
            write_json(out / MANIFEST, manifest)
        bar.update(len(batch))
    seconds = time.perf_counter() - started
    bar.close()
    left_out = sum(dropped(r) for r in records)
    _layout_files(out, pipe, settings, manifest, n - left_out)
    write_json(out / MANIFEST, {**manifest, "complete": True})
    return {
        "folder": str(out),
        "drawn": drawn,
        "skipped": n - drawn,
        "dropped": left_out,
        "seconds": seconds,
        "device": pipe.device.type,
        "threads": torch.get_num_threads(),
    }
