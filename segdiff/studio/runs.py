"""Results on disk: the `Run` record, bounded run folders, PNGs with their settings, one zip, settings read back.

This module writes what it is given; what a run's files are called and what each image's settings say is
the studio's business (`segdiff.studio.actions`).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from ..errors import DataLayoutError
from ..files import png_bytes, write_bytes

KEEP_RUNS = 32  # run folders kept on disk; the app serves copies of older ones from its own cache
RUN_FOLDER = re.compile(r"\d{6}-.+-\w+")  # what `new_run_folder` names: HHMMSS-kind-random
SETTINGS_KEY = "segdiff"  # the PNG text chunk holding an image's settings as JSON


@dataclass(frozen=True)
class Run:
    """One action's results, complete and written: images (H, W, C) uint8, the mask each was drawn from,
    captions, the settings written with them, and the files holding them."""

    kind: str  # what the studio did: "generate" | "sweep"
    images: list[np.ndarray]
    masks: list[np.ndarray]  # (H, W) class ids as the model saw them, omitted classes already removed
    captions: list[str]
    settings: dict  # as written to settings.json
    folder: Path
    files: list[Path]  # one PNG per image, its own settings in the text chunk
    archive: Path  # zip of the image PNGs, the mask and settings.json
    notices: list[str]  # what the user should be told: also in settings["notices"]


def new_run_folder(results: Path, kind: str) -> Path:
    """A fresh folder `HHMMSS-kind-XXXX` in `results`. Bounded on disk: of the folders named so, the oldest go
    (KEEP_RUNS stay); whatever else `results` holds stays."""
    runs = sorted(
        (p for p in results.iterdir() if RUN_FOLDER.fullmatch(p.name)), key=lambda p: p.stat().st_mtime
    )
    for old in runs[: max(0, len(runs) - KEEP_RUNS + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{time.strftime('%H%M%S')}-{kind}-", dir=results))


def write_run(
    folder: Path,
    pngs: Sequence[tuple[str, np.ndarray, dict]],
    mask: np.ndarray,
    settings: dict,
    archive: str,
) -> tuple[list[Path], Path]:
    """Write each (file name, image, its settings) as a PNG carrying its settings, the mask as `mask.png`
    (class ids, as the original code reads masks), `settings.json`, and all of them zipped as `archive`.

    Returns the PNGs' paths and the zip's.
    """
    contents: dict[str, bytes] = {}
    for name, image, own in pngs:
        contents[name] = png_bytes(image, {SETTINGS_KEY: json.dumps(own), "Software": "segdiff studio"})
    contents["mask.png"] = png_bytes(mask.astype(np.uint8))
    contents["settings.json"] = json.dumps(settings, indent=2).encode()
    for name, data in contents.items():
        write_bytes(folder / name, data)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in contents.items():
            z.writestr(name, data)
    write_bytes(folder / archive, zipped.getvalue())
    return [folder / name for name, _, _ in pngs], folder / archive


def settings_of(path: str | os.PathLike) -> dict:
    """The settings stored in a result PNG's text chunk (for scripts that reproduce a result)."""
    with PIL.Image.open(path) as im:
        text = im.info.get(SETTINGS_KEY)
    if text is None:
        raise DataLayoutError(f"{path}: no segdiff settings in this PNG's metadata")
    return json.loads(text)
