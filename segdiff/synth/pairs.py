"""Synthetic paired data: new masks bent from real ones, and an image drawn by a model for each.

Drawing images for the masks one already has adds no anatomy; bending those masks
(`segdiff.data.masks.deform`) does. The pairs land in a layout segmentation tools read:

    original  OUT/img/train/syn_<i>.png, OUT/mask/all/train/syn_<i>.png, OUT/classes.json
    nnunet    OUT/imagesTr/syn_<i>_0000.png, OUT/labelsTr/syn_<i>.png, OUT/dataset.json (nnU-Net v2 raw)

and OUT/manifest.json records the model, its card's data credit, the settings and where each came from (a
flag, the model card's recommendation, or the default), the masks' fingerprints, and each pair's source mask
and deformation. Pair i depends only on (seed, i): its source mask, its deformation and its noise. Images are
drawn in fixed batches and every file is written under a temporary name and renamed, so a killed run, rerun
with the same arguments, writes the files an uninterrupted one would.

    python -m segdiff.dataset synthesize MODEL OUT --masks MASK_DIR [--n N] [--deform none|mild|strong]
        [--layout original|nnunet] [--seed S] [--batch_size B] [--steps STEPS] [--scheduler S|student]
        [--guidance_scale W] [--min_dice D [--segmenter DIR]] [--shard I/N]

Settings a run leaves open (deform, steps, scheduler, guidance_scale) are the model card's recommendation
(`ModelCard.synthesis`: the settings whose pairs trained segmenters best), else the defaults
(`segdiff.synth.settings`).

Many processes: under `torchrun` or `accelerate launch` the batches are shared out between the processes
(`segdiff.processes`), each batch drawn whole by one of them, so every file is the one a single process
writes; the main process writes the manifest and the layout's files. `--shard I/N` draws only batches I,
I + N, ... (for machines that share no launcher: a cluster's array job, each shard into the same OUT); a
last run without --shard (or `merge`, which refuses while pairs are missing) writes what describes the whole.

--min_dice is quality control: the model's own segmenter (trained on its real training pairs) reads each image
back, and a pair it reads back at a mean Dice below D is drawn again with new noise, up to
MAX_ATTEMPTS draws in all; a pair no draw brings to D is left out (the manifest marks it dropped), so the run
writes at most N pairs. What it measured on PSFHS, and mask guidance beside it: docs/dataset.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..choices import STUDENT
from ..data.layout import read_mask
from ..data.masks import deform_keeping_classes, deformation_bounds
from ..errors import ConfigError, DataLayoutError
from ..files import write_json, write_png
from ..measure.segmenter import Segmenter, mean_dice
from ..model.card import ModelCard
from ..model.pipeline import DEFAULT_SCHEDULER, DEFAULT_STEPS, SegDiffPipeline, check_guidance
from ..model.sampling import noise_generator, write_sample
from ..processes import processes
from ..resolve import model_folder
from .settings import MAX_PAIRS, Settings, differences, recommended

MANIFEST = "manifest.json"
CHECKS = ".checks"  # per batch, its pairs' --min_dice records, until the finished manifest holds them
MAX_ATTEMPTS = 8  # draws of one pair at most under --min_dice


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


def fingerprints(names: list[str], masks: np.ndarray) -> dict[str, str]:
    """Each mask's file name -> a digest of its class ids at the model's size, what a plan is made from."""
    return {
        name: hashlib.sha256(mask.tobytes()).hexdigest()[:16] for name, mask in zip(names, masks, strict=True)
    }


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


def check_out(out: Path) -> None:
    """Refuse an OUT that is a file or lies under one, before anything is opened or written."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == out else f"lies under {folder}, a file"
                raise DataLayoutError(f"{out}: {where}; expected a folder to write the pairs in")
            return


def _mask_changes(before: dict | None, now: dict) -> str:
    """What differs between two runs' mask fingerprints, in words; "" when nothing (or `before` has none)."""
    if before is None:  # a run from before the masks were fingerprinted
        return ""
    groups = {
        "added": sorted(set(now) - set(before)),
        "removed": sorted(set(before) - set(now)),
        "changed": sorted(k for k in now if k in before and now[k] != before[k]),
    }
    return "; ".join(
        f"{len(names)} {word}: {', '.join(names[:3])}{', ...' * (len(names) > 3)}"
        for word, names in groups.items()
        if names
    )


def _check_folder(out: Path, manifest: dict, restart: bool) -> list[dict]:
    """Refuse a folder holding another run (or files of something else); one of this run is continued, and
    with `restart` one whose pairs never reached the disk is planned anew. -> the earlier run's pairs."""
    path = out / MANIFEST
    if not path.is_file():
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise DataLayoutError(f"{out}: holds files but no {MANIFEST}; expected a new or empty folder")
        return []
    try:
        earlier = json.loads(path.read_text())
        before, pairs = earlier["settings"], earlier.get("pairs", [])
        on_disk = any((out / p[k]).is_file() for p in pairs for k in ("image", "mask"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataLayoutError(f"{path}: cannot read the earlier run's settings ({e})") from e
    if restart and not on_disk and not any((out / CHECKS).glob("*.json")):
        return []
    changed = differences(before, manifest["settings"])
    if changed:
        raise DataLayoutError(
            f"{out}: holds a run with other settings ({'; '.join(changed)}); "
            "rerun with the same arguments to continue it, or choose a new folder"
        )
    masks = _mask_changes(earlier.get("mask_fingerprints"), manifest["mask_fingerprints"])
    if masks:
        raise DataLayoutError(
            f"{manifest['settings']['masks']}: not the masks the run in {out} was planned on ({masks}); "
            "rerun with those masks to continue it, or choose a new folder"
        )
    return pairs


def dropped(record: dict) -> bool:
    """Whether --min_dice left this pair out (no draw read back at its Dice)."""
    return bool(record.get("check", {}).get("dropped"))


def _checks(out: Path, earlier: list[dict]) -> dict[str, dict]:
    """Pair name -> its --min_dice record, from an earlier run of these settings: its manifest's `earlier`
    pairs, and the records its batches left in OUT/.checks."""
    found = {p["name"]: p["check"] for p in earlier if p.get("check")}
    for path in sorted((out / CHECKS).glob("*.json")):
        found.update(json.loads(path.read_text()))
    return found


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


def _student(settings: Settings, card: ModelCard) -> bool:
    """Whether the model's distilled student draws: asked for, or the model's defaults where it has one."""
    defaults = settings.steps is None and settings.scheduler is None
    return settings.scheduler == STUDENT or (defaults and card.distilled is not None)


def _sampling(settings: Settings, card: ModelCard) -> str:
    """What draws the images, in words: the model's student at its defaults, else a sampler and steps; and
    the mask guidance, when there is some."""
    if _student(settings, card):
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
    """Draw `attempt` of pairs `indices` -> (B, H, W, C) float in [0, 1]; each depends only on (seed, i,
    attempt)."""
    student = settings.scheduler == STUDENT  # the pipeline's defaults, with the student
    return pipe(
        masks[indices],
        num_inference_steps=None if student else settings.steps,
        scheduler=None if student else settings.scheduler,
        generator=[noise_generator(settings.seed, i + attempt * MAX_PAIRS) for i in indices],
        output_type="np",
        guidance_scale=settings.guidance_scale,
    ).images


def draw_checked(
    pipe, segmenter, masks, indices: list[int], settings: Settings
) -> tuple[np.ndarray, list[dict]]:
    """The images of pairs `indices`; under --min_dice, each one the segmenter reads back below it drawn again
    (attempts 1, 2, ...) until one passes or MAX_ATTEMPTS are spent, the best kept.
    -> (images, per pair {"dice": its read-back Dice, "draw": which draw was kept (1 = the first), "draws":
    how many were made}; none without --min_dice)."""
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


def _manifest(card: ModelCard, settings: Settings, source: dict, names, masks, records: list[dict]) -> dict:
    """What OUT/manifest.json says of a run: model, credit, settings and their sources, masks, pairs."""
    return {
        "tool": "python -m segdiff.dataset synthesize",
        "model": settings.model,
        "data_credit": card.dataset or {"note": "the model card names no data set"},
        "class_names": card.class_names,
        "settings": asdict(settings),
        "settings_from": source,
        "sampling": _sampling(settings, card),
        "deformation_bounds": deformation_bounds(),
        "mask_fingerprints": fingerprints(names, masks),
        "complete": False,
        "pairs": records,
    }


def _attach(records: list[dict], checks: dict[str, dict]) -> None:
    """Give each pair record its --min_dice record, where `checks` (by pair name) holds one."""
    for record in records:
        if record["name"] in checks:
            record["check"] = checks[record["name"]]


def _draw_batches(pipe, segmenter, new_masks, records: list[dict], batches, settings: Settings, out: Path,
                  progress: bool) -> None:  # fmt: skip
    """Draw `batches` (ranges of pair indices) and write their files, and their --min_dice records to
    OUT/.checks, one file a batch."""
    bar = tqdm(total=sum(len(b) for b in batches), desc="synthesize", unit="pair", disable=not progress)
    for batch in batches:
        images, checks = draw_checked(pipe, segmenter, new_masks, list(batch), settings)
        for i, check in zip(batch, checks, strict=False):
            records[i]["check"] = {**check, "dropped": check["dice"] < settings.min_dice}
        for i, image in zip(batch, images, strict=True):
            if not dropped(records[i]):
                write_sample(image, out / records[i]["image"])
                write_png(new_masks[i], out / records[i]["mask"])
        if checks:  # which pairs were left out must outlive a killed run: they have no files to tell
            found = {records[i]["name"]: records[i]["check"] for i in batch}
            write_json(out / CHECKS / f"{records[batch[0]]['name']}.json", found)
        bar.update(len(batch))
    bar.close()


def synthesize(
    settings: Settings,
    out: str | os.PathLike,
    progress: bool = False,
    shard: tuple[int, int] | None = None,
    draw_missing: bool = True,
) -> dict | None:
    """Write `settings.n` new image-mask pairs (one per mask when None) to `out`, continuing an earlier run of
    the same settings, and the manifest and layout files that describe them.

    Under torchrun or `accelerate launch` the batches are shared out between the processes. `shard` (I, N):
    draw only batches I, I + N, ... and leave the describing files to a last run without it. Without
    `draw_missing` (a merge of shards) refuse, naming them, when pairs are still missing.
    Returns, on the main process (None on the others), {"folder", "drawn" (pairs drawn now), "written" (of
    them, written), "there" (pairs already there), "dropped" (pairs left out by --min_dice, in all),
    "seconds" (drawing time), "device", "threads", "processes"}; each counts this shard's pairs only.
    """
    out = Path(out)
    check_out(out)
    state = processes()
    device = state.device if state.num_processes > 1 else None  # alone: the pipeline's choice
    pipe = SegDiffPipeline.from_pretrained(settings.model, device=device)
    pipe.set_progress_bar_config(disable=True)
    card = pipe.card
    if not card.guided:
        raise ConfigError(f"{settings.model}: an unconditional model; expected a segmentation-guided one")
    settings, source = recommended(settings, card)
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
    manifest = _manifest(card, settings, source, names, masks, records)
    # Every process reads the folder alike before any writes to it: all refuse, or all go on.
    earlier = _check_folder(out, manifest, restart=shard is None)
    _attach(records, _checks(out, earlier))

    def done(i: int) -> bool:  # pair i's files are there, or --min_dice left it out
        return dropped(records[i]) or all((out / records[i][k]).is_file() for k in ("image", "mask"))

    batches = [range(s, min(s + settings.batch_size, n)) for s in range(0, n, settings.batch_size)]
    index, count = shard or (0, 1)
    ours = batches[index::count]
    todo = [b for b in ours if not all(done(i) for i in b)]
    if todo and not draw_missing:
        missing = [records[i]["name"] for b in todo for i in b if not done(i)]
        raise DataLayoutError(
            f"{out}: {len(missing)} pairs not drawn yet ({', '.join(missing[:3])}"
            f"{', ...' * (len(missing) > 3)}); rerun the shards that draw them, or synthesize without "
            "--shard to draw them here"
        )
    drawing = {b.start for b in todo}
    there = sum(not dropped(records[i]) for b in ours if b.start not in drawing for i in b)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if shard is None:  # alone in OUT: what a killed run was writing when it stopped goes
            for stale in out.rglob(".*.tmp"):
                stale.unlink()
        if shard is None or not (out / MANIFEST).is_file():  # shards leave one another's manifest be
            write_json(out / MANIFEST, manifest)
    state.wait_for_everyone()
    started = time.perf_counter()
    mine = todo[state.process_index :: state.num_processes]
    _draw_batches(
        pipe, segmenter, new_masks, records, mine, settings, out, progress and state.is_main_process
    )
    state.wait_for_everyone()  # every batch written before the main process describes them
    seconds = time.perf_counter() - started
    if not state.is_main_process:
        return None
    _attach(records, _checks(out, earlier))  # the other processes' records too
    left_out = sum(dropped(records[i]) for b in ours for i in b)
    drawn = sum(len(b) for b in todo)
    if shard is None:
        _layout_files(out, pipe, settings, manifest, n - left_out)
        write_json(out / MANIFEST, {**manifest, "complete": True})
        shutil.rmtree(out / CHECKS, ignore_errors=True)  # the manifest holds them now
    return {
        "folder": str(out),
        "drawn": drawn,
        "written": drawn - sum(dropped(records[i]) for b in todo for i in b),
        "there": there,
        "dropped": left_out,
        "seconds": seconds,
        "device": pipe.device.type,
        "threads": torch.get_num_threads(),
        "processes": state.num_processes,
    }
