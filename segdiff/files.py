"""Files written whole or not at all: the one home of segdiff's file writing.

A file is written under a temporary name beside its target (the same folder, so the same file system) and
renamed over it with `os.replace`, so a reader, or a run resumed after a kill, sees the old file or the new
one, never half of one. Every temporary has the one name `temp_path` gives it: hidden, the target's name,
this process's id (two processes writing the same file never share a temporary). A folder is written the
same way: into the folder `staged_folder` gives, swapped in when it is complete (`swap_in`), removed when
its writing fails; `clean_interrupted_saves` tidies what a killed save left.

Light on purpose (numpy and PIL only), so the command lines that write files import no torch.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def staged_folder(
    target: str | os.PathLike,
    staging: str | os.PathLike | None = None,
    *,
    merge: bool = False,
    last: str | None = None,
) -> Iterator[Path]:
    """Yield a folder to write `target`'s content into; when the block ends it is swapped in for `target`
    (the old folder moved aside, then removed), and when the block raises it is removed, `target` untouched.

    merge: swap in each entry of the folder over its namesake in `target` instead, the one named `last`
    last (the file whose presence says the rest is complete); `target`'s other entries stay. The folder
    is then made inside `target` (`.saving-*`), otherwise beside it (`.saving-<name>-*`): there
    `clean_interrupted_saves` finds what a killed save left.
    staging: write into this folder instead (made if missing), for writers whose processes must agree on
    its name or that tidy their own leftovers.
    """
    target = Path(target)
    if staging is None:
        home, prefix = (target, ".saving-") if merge else (target.parent, f".saving-{target.name}-")
        home.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=prefix, dir=home)
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
        if merge and target.is_dir():
            for entry in sorted(staging.iterdir(), key=lambda p: p.name == last):
                swap_in(entry, target / entry.name)
        else:
            swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # what a failed write left; gone already on success


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
