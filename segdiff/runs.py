"""A studio run's results on disk: the `Run` record, its bounded folders, its PNGs, zip and settings read back."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image

from .errors import DataLayoutError
from .files import png_bytes, write_bytes

KEEP_RUNS = 32  # result folders kept on disk; the app serves copies of older ones from its own cache


@dataclass
class Run:
    """One click's results: images (H, W, C) uint8, the mask each was drawn from, captions, files."""

    kind: str  # "generate" | "sweep"
    images: list[np.ndarray]
    masks: list[np.ndarray]  # (H, W) class ids as the model saw them, omitted classes already removed
    captions: list[str]
    settings: dict  # the run's settings, as written to settings.json
    folder: Path
    files: list[Path] = field(default_factory=list)  # one PNG per image, settings in its text chunk
    archive: Path | None = None  # zip of the image PNGs, the mask and settings.json
    notices: list[str] = field(default_factory=list)


def new_run_folder(results: Path, kind: str) -> Path:
    """A fresh folder for a `kind` run in `results`. Bounded on disk: the oldest runs go (KEEP_RUNS stay); the
    example previews the page links to stay."""
    runs = sorted((p for p in results.iterdir() if p.name != "previews"), key=lambda p: p.stat().st_mtime)
    for old in runs[: max(0, len(runs) - KEEP_RUNS + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{time.strftime('%H%M%S')}-{kind}-", dir=results))


def write_run(run: Run, mask: np.ndarray) -> None:
    """Write image PNGs (each with its settings as PNG text), the mask, settings.json and one zip."""
    settings = run.settings
    contents: dict[str, bytes] = {}
    for k, (image, caption) in enumerate(zip(run.images, run.captions, strict=True)):
        own = {**settings, "image": k, "caption": caption}
        if run.kind == "generate":
            own["seed"] = settings["seeds"][k]
        else:
            own["omit"] = settings["variants"][k]
        name = f"{run.kind}_{k:02d}_seed{own['seed']}.png"
        contents[name] = png_bytes(image, {"segdiff": json.dumps(own), "Software": "segdiff studio"})
        run.files.append(run.folder / name)
    contents["mask.png"] = png_bytes(mask.astype(np.uint8))  # class ids, as the original code reads masks
    contents["settings.json"] = json.dumps(settings, indent=2).encode()
    for name, data in contents.items():
        write_bytes(run.folder / name, data)
    run.archive = run.folder / f"segdiff_{run.kind}_seed{settings['seed']}.zip"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name, data in contents.items():
            zipped.writestr(name, data)
    write_bytes(run.archive, archive.getvalue())


def settings_of(path: str | os.PathLike) -> dict:
    """The settings stored in a result PNG's text chunk (for scripts that reproduce a result)."""
    with PIL.Image.open(path) as im:
        text = im.info.get("segdiff")
    if text is None:
        raise DataLayoutError(f"{path}: no segdiff settings in this PNG's metadata")
    return json.loads(text)
