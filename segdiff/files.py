"""Files written whole or not at all: the one home of segdiff's file writing.

A file is written under a temporary name beside its target (the same folder, so the same file system) and
renamed over it with `os.replace`, so a reader, or a run resumed after a kill, sees the old file or the new
one, never half of one. Every temporary has the one name `temp_path` gives it: hidden, the target's name,
this process's id (two processes writing the same file never share a temporary). Folders are swapped in
whole by `swap_in`; `clean_interrupted_saves` tidies what a killed save left.

Light on purpose (numpy and PIL only), so the command lines that write files import no torch.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.PngImagePlugin


def temp_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """The temporary name `path` is written under: `.NAME.PID.tmp`, and `suffix` after it for writers that
    read the format from the name (nibabel's `.nii.gz`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")


def atomic(path: str | os.PathLike, write: Callable[[Path], object], suffix: str = "") -> Path:
    """Call `write(temporary path)`, then rename the temporary to `path` (its folder made if missing).

    A failed write leaves `path` as it was and removes its temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # what a failed write left
            tmp.unlink()
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` as UTF-8, line ends as they are."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data) -> Path:
    """`data` as indented JSON with a final newline."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def png_bytes(array: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """(H, W), (H, W, 1|3|4) uint8 -> PNG file bytes, `text` as its text chunks."""
    info = PIL.PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    PIL.Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array).save(
        buffer, format="PNG", pnginfo=info
    )
    return buffer.getvalue()


def write_png(array: np.ndarray, path: str | os.PathLike, text: dict[str, str] | None = None) -> Path:
    """(H, W), (H, W, 1|3|4) uint8 -> a PNG file, written whole or not at all."""
    return write_bytes(path, png_bytes(array, text))


def swap_in(new: Path, target: Path) -> None:
    """Replace `target` with `new`: files by one rename, folders by two renames around the old one."""
    if new.is_file() or not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def clean_interrupted_saves(folder: str | os.PathLike) -> None:
    """Undo what a save killed midway left in `folder`: `.saving-*` staging folders go, and a `.old-<name>`
    that `swap_in` moved aside comes back where its replacement never arrived. One save at a time per folder.
    """
    folder = Path(folder)
    for staging in folder.glob(".saving-*"):
        shutil.rmtree(staging, ignore_errors=True)
    for old in folder.glob(".old-*"):
        current = folder / old.name.removeprefix(".old-")
        if current.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, current)
