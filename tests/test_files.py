"""Folders written whole or not at all: staged beside their target, swapped in, tidied after a kill."""

import subprocess
import sys

import pytest

from segdiff import files
from segdiff.files import clean_interrupted_saves, staged_folder


def folder(path, **entries):
    path.mkdir(parents=True)
    for name, text in entries.items():
        (path / name).write_text(text)
    return path


def content(path):
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def test_a_staged_folder_replaces_its_target_whole_on_success(tmp_path):
    target = folder(tmp_path / "model", weights="old", stale="old")
    with staged_folder(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".saving-model-")
        (staging / "weights").write_text("new")
        assert content(target) == {"stale": "old", "weights": "old"}  # untouched until the block ends
    assert content(target) == {"weights": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_write_leaves_the_old_folder_untouched(tmp_path):
    target = folder(tmp_path / "model", weights="old")
    with pytest.raises(OSError, match="disk full"), staged_folder(target) as staging:
        (staging / "weights").write_text("half")
        raise OSError("disk full")
    assert content(target) == {"weights": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_merge_swaps_in_its_entries_the_last_one_last_and_keeps_the_rest(tmp_path, monkeypatch):
    target = folder(tmp_path / "run", card="old", unet="old", state="kept")
    order = []
    swap_in = files.swap_in
    monkeypatch.setattr(files, "swap_in", lambda new, old: (order.append(new.name), swap_in(new, old)))
    with staged_folder(target, merge=True, last="card") as staging:
        assert staging.parent == target and staging.name.startswith(".saving-")
        for name in ("card", "unet", "scheduler"):
            (staging / name).write_text("new")
    assert content(target) == {"card": "new", "scheduler": "new", "state": "kept", "unet": "new"}
    assert order[-1] == "card" and sorted(order) == ["card", "scheduler", "unet"]


def test_a_merge_into_a_missing_folder_renames_the_staging_folder_in(tmp_path):
    staging = tmp_path / ".out.partial-1"
    with staged_folder(tmp_path / "out", staging, merge=True) as written:
        assert written == staging
        (staging / "split.json").write_text("{}")
    assert content(tmp_path / "out") == {"split.json": "{}"}
    assert not staging.exists()


def test_a_save_killed_midway_leaves_the_old_folder_and_is_tidied(tmp_path):
    target = folder(tmp_path / "model", weights="old")
    kill = (
        "import os, signal, sys\n"
        "from segdiff.files import staged_folder\n"
        "with staged_folder(sys.argv[1]) as staging:\n"
        "    (staging / 'weights').write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", kill, str(target)], check=False)
    assert killed.returncode == -9
    assert content(target) == {"weights": "old"}
    assert len(list(tmp_path.glob(".saving-model-*"))) == 1
    clean_interrupted_saves(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
