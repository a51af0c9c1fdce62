"""segdiff.dataset: new image-mask pairs from deformed masks, on the tiny 32 px model and masks drawn here."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import pytest

from segdiff.cli.dataset import main
from segdiff.data.layout import SegDataset, data_info, read_image, read_mask
from segdiff.data.masks import DEFORMATIONS, deform_keeping_classes

ROOT = Path(__file__).resolve().parents[1]


def pieces(mask: np.ndarray, class_id: int) -> int:
    """Connected regions of one class."""
    return cv2.connectedComponents((mask == class_id).astype(np.uint8), connectivity=8)[0] - 1


@pytest.mark.parametrize("level", list(DEFORMATIONS))
def test_deformed_masks_keep_their_classes_and_size_and_are_new(mask, level):
    rng = np.random.default_rng(0)
    for _ in range(8):
        warped, record = deform_keeping_classes(mask, level, rng)
        assert warped.shape == mask.shape and warped.dtype == mask.dtype
        assert record["used"] == level and record["draws"] >= 1
        assert set(np.unique(warped)) == set(np.unique(mask))
        assert (warped != mask).mean() > 0.01  # a new anatomy, not the source again
        for c in (1, 2, 3):  # each class stays one piece: nothing tears off
            assert pieces(warped, c) == pieces(mask, c) == 1


def test_strong_moves_masks_further_than_mild(mask):
    moved = {
        level: np.mean(
            [
                (deform_keeping_classes(mask, level, np.random.default_rng(s))[0] != mask).mean()
                for s in range(10)
            ]
        )
        for level in DEFORMATIONS
    }
    assert moved["strong"] > moved["mild"] > 0


def write_masks(folder: Path, count: int = 3, size: int = 48) -> Path:
    """`count` masks of 3 classes at 48 px (the 32 px model resizes them): a head and a symphysis."""
    folder.mkdir(parents=True)
    for i in range(count):
        mask = np.zeros((size, size), np.uint8)
        cv2.circle(mask, (24 + 2 * i, 28), 12 + i, 2, -1)
        cv2.ellipse(mask, (14, 10), (7, 3), 20 * i, 0, 360, 1, -1)
        PIL.Image.fromarray(mask).save(folder / f"case_{i}.png")
    return folder


def run(model, out, masks, *flags) -> None:
    main(["synthesize", str(model), str(out), "--masks", str(masks), "--steps", "2", *flags])


@pytest.mark.parametrize("layout", ["original", "nnunet"])
def test_both_layouts_are_complete_and_reopen_with_the_data_reader(small_model_dir, tmp_path, capsys, layout):
    masks = write_masks(tmp_path / "masks")
    out = tmp_path / "out"
    run(small_model_dir, out, masks, "--n", "5", "--batch_size", "2", "--layout", layout)
    assert "wrote 5 pairs" in capsys.readouterr().out
    names = [f"syn_{i:05d}" for i in range(5)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["settings"]["layout"] == layout
    assert manifest["sampling"] == "dpm++, 2 steps"  # asked for; without --steps, the model's defaults
    assert [p["name"] for p in manifest["pairs"]] == names
    assert {p["source"] for p in manifest["pairs"]} <= {f"case_{i}.png" for i in range(3)}
    assert all(p["deformation"]["used"] == "mild" for p in manifest["pairs"])
    assert "data_credit" in manifest
    if layout == "original":
        data = SegDataset(out / "img", out / "mask", "train", 32, 1, 3)
        assert [c.name for c in data.cases] == [f"{n}.png" for n in names]
        assert data_info(out / "img", out / "mask", 3)["class_names"] == [
            "background",
            "pubic symphysis",
            "fetal head",
        ]
        masks_read = data.masks
    else:
        info = json.loads((out / "dataset.json").read_text())
        assert (
            info["numTraining"] == 5
            and info["file_ending"] == ".png"
            and info["channel_names"] == {"0": "image"}
        )
        assert info["labels"] == {"background": 0, "pubic symphysis": 1, "fetal head": 2}
        assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{n}_0000.png" for n in names]
        masks_read = np.stack([read_mask(out / "labelsTr" / f"{n}.png", 3) for n in names])
        assert all(read_image(out / "imagesTr" / f"{n}_0000.png", 1, 32).shape == (1, 32, 32) for n in names)
    assert masks_read.shape == (5, 32, 32)
    assert all(set(np.unique(m)) == {0, 1, 2} for m in masks_read)


def test_deform_none_reuses_the_masks_as_they_are(small_model_dir, tmp_path):
    masks = write_masks(tmp_path / "masks", size=32)
    out = tmp_path / "out"
    run(small_model_dir, out, masks, "--deform", "none")  # --n defaults to one pair per mask
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["pairs"]) == 3
    for pair in manifest["pairs"]:
        assert np.array_equal(read_mask(out / pair["mask"], 3), read_mask(masks / pair["source"], 3))


def test_guided_pairs_share_the_masks_and_a_run_from_before_guidance_continues(small_model_dir, tmp_path, capsys):
    masks = write_masks(tmp_path / "masks")
    plain, guided = tmp_path / "plain", tmp_path / "guided"
    run(small_model_dir, plain, masks, "--n", "2")
    run(small_model_dir, guided, masks, "--n", "2", "--guidance_scale", "3")
    manifest = json.loads((guided / "manifest.json").read_text())
    assert manifest["sampling"] == "dpm++, 2 steps, mask guidance 3" and manifest["settings"]["guidance_scale"] == 3
    for pair in manifest["pairs"]:  # the same new masks and noise; the images follow the masks harder
        assert (guided / pair["mask"]).read_bytes() == (plain / pair["mask"]).read_bytes()
        assert not np.array_equal(read_image(guided / pair["image"], 1, 32), read_image(plain / pair["image"], 1, 32))
    # A folder written before mask guidance existed holds no guidance_scale: it was drawn without any.
    path = plain / "manifest.json"
    older = json.loads(path.read_text())
    del older["settings"]["guidance_scale"]
    path.write_text(json.dumps(older))
    capsys.readouterr()
    run(small_model_dir, plain, masks, "--n", "2")
    assert "wrote 0 pairs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run(small_model_dir, plain, masks, "--n", "2", "--guidance_scale", "3")
    assert "guidance_scale 1.0 -> 3.0" in capsys.readouterr().err


def test_min_dice_redraws_pairs_read_back_below_it_and_leaves_out_those_never_passing(
    small_model_dir, tmp_path, monkeypatch, capsys
):
    import segdiff.synth.pairs as dataset

    masks = write_masks(tmp_path / "masks")
    threshold = {}

    class Reader:  # a stand-in segmenter: a bright image reads back as its mask, a dark one as background
        def predict(self, images):
            pairs = zip(images, self.masks, strict=True)
            return np.stack([m if img.mean() > threshold["mean"] else np.zeros_like(m) for img, m in pairs])

    reader = Reader()
    real_draw = dataset.draw

    def draw(pipe, new_masks, indices, settings, attempt=0):
        reader.masks = new_masks[indices]
        return real_draw(pipe, new_masks, indices, settings, attempt)

    monkeypatch.setattr(dataset, "draw", draw)
    monkeypatch.setattr(dataset, "open_segmenter", lambda settings, pipe: reader if settings.min_dice else None)
    plain = tmp_path / "plain"
    run(small_model_dir, plain, masks, "--n", "12")
    pairs = json.loads((plain / "manifest.json").read_text())["pairs"]
    means = [read_image(plain / p["image"], 1, 32).mean() / 255 for p in pairs]
    middle = sorted(means)[5:7]
    threshold["mean"] = (middle[0] + middle[1]) / 2  # half the first draws pass
    checked = tmp_path / "checked"
    run(small_model_dir, checked, masks, "--n", "12", "--min_dice", "0.5")
    manifest = json.loads((checked / "manifest.json").read_text())
    assert "redrawn (up to 8 draws) while the segmenter reads Dice < 0.5" in manifest["sampling"]
    draws = [p["check"]["draws"] for p in manifest["pairs"]]
    assert 1 in draws and max(draws) > 1  # about half passed at once, the others were drawn again
    for pair, first in zip(manifest["pairs"], means, strict=True):
        if pair["check"]["dropped"]:
            assert pair["check"]["dice"] == 0.0 and pair["check"]["draws"] == 8
            assert not (checked / pair["image"]).exists() and not (checked / pair["mask"]).exists()
            continue
        mean = read_image(checked / pair["image"], 1, 32).mean() / 255
        assert pair["check"]["dice"] == 1.0 and mean > threshold["mean"]
        if pair["check"]["draw"] == 1:  # the first draw kept: the same image as without the check
            assert (checked / pair["image"]).read_bytes() == (plain / pair["image"]).read_bytes()
        else:
            assert first <= threshold["mean"]
        assert (checked / pair["mask"]).read_bytes() == (plain / pair["mask"]).read_bytes()  # the anatomy stays
    left_out = sum(p["check"]["dropped"] for p in manifest["pairs"])
    assert SegDataset(checked / "img", checked / "mask", "train", 32, 1, 3).masks.shape[0] == 12 - left_out
    capsys.readouterr()
    run(small_model_dir, checked, masks, "--n", "12", "--min_dice", "0.5")  # done: nothing is drawn again
    assert "wrote 0 pairs" in capsys.readouterr().out


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def everything(folder: Path) -> dict[str, bytes] | None:
    """Every file under `folder`, hidden ones too, by path; None when there is no such folder."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(model, out, masks, n: int) -> list[str]:
    flags = ["--n", str(n), "--batch_size", "1", "--steps", "20"]
    return [
        sys.executable,
        "-m",
        "segdiff.dataset",
        "synthesize",
        str(model),
        str(out),
        "--masks",
        str(masks),
        *flags,
    ]


def test_a_killed_run_resumes_to_the_same_files(small_model_dir, tmp_path):
    masks = write_masks(tmp_path / "masks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    n, killed, whole = 40, tmp_path / "killed", tmp_path / "whole"
    process = subprocess.Popen(
        cli(small_model_dir, killed, masks, n), env=env, cwd=ROOT, stderr=subprocess.DEVNULL
    )
    while process.poll() is None and len(list(killed.glob("img/train/syn_*.png"))) < 3:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    drawn = list(killed.glob("img/train/syn_*.png"))
    assert 3 <= len(drawn) < n, "the run was to be killed part way"
    for path in drawn:  # what a killed run leaves is whole
        PIL.Image.open(path).load()
    for out in (killed, whole):
        subprocess.run(
            cli(small_model_dir, out, masks, n), env=env, cwd=ROOT, check=True, capture_output=True
        )
    assert files(killed) == files(whole) and len(files(whole)) == 2 * n
    assert not list(killed.rglob(".*.tmp"))  # nothing half-written is left behind
    assert json.loads((killed / "manifest.json").read_text()) == json.loads(
        (whole / "manifest.json").read_text()
    )


@pytest.mark.parametrize(
    ("what", "flags", "message"),
    [
        ("empty", [], "no mask files inside"),
        ("unknown id", [], "case_0.png: pixel value 7, expected class ids 0..2"),
        ("fine", ["--n", "0"], "--n 0: expected a number of pairs from 1 to 16777215"),
        ("fine", ["--deform", "wild"], "--deform wild: expected one of none, mild, strong"),
        ("fine", ["--guidance_scale", "0.5"], "--guidance_scale 0.5: expected 1 (none) to 20"),
        ("fine", ["--min_dice", "1.5"], "--min_dice 1.5: expected a Dice between 0 and 1"),
        ("fine", ["--segmenter", "seg"], "--segmenter: it reads the images back for --min_dice"),
        ("fine", ["--min_dice", "0.5"], "has no segmenter of its own; pass --segmenter DIR"),
        ("other run", ["--n", "1", "--seed", "1"], "holds a run with other settings (seed 0 -> 1)"),
        ("fine", ["--steps", "100000"], "--steps 100000: expected a value in 1..100"),
        ("fine", ["--batch_size", "100000"], "--batch_size 100000: expected a value in 1..1024"),
        ("fine", ["--scheduler", "euler"], "--scheduler euler: expected one of dpm++, unipc, ddim, ddpm, or student"),
        ("fine", ["--scheduler", "student"], "--steps 2 with --scheduler student: the student draws in the steps"),
        ("fine", ["--shard", "2/2"], "--shard 2/2: expected I/N with 0 <= I < N"),
        ("fine", ["--shard", "half"], "--shard half: expected I/N with 0 <= I < N"),
    ],
)
def test_bad_input_exits_2_with_one_line(small_model_dir, tmp_path, capsys, what, flags, message):
    masks = tmp_path / "masks"
    if what == "empty":
        masks.mkdir()
    else:
        write_masks(masks)
    if what == "unknown id":
        PIL.Image.fromarray(np.full((48, 48), 7, np.uint8)).save(masks / "case_0.png")
    if what == "other run":
        run(small_model_dir, tmp_path / "out", masks, "--n", "1")
        capsys.readouterr()
    before = everything(tmp_path / "out")
    with pytest.raises(SystemExit) as stop:
        run(small_model_dir, tmp_path / "out", masks, *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert everything(tmp_path / "out") == before  # nothing written, nothing touched


def test_min_dice_reads_back_with_a_segmenter_folder_of_the_models_classes(small_model_dir, tmp_path, capsys):
    from segdiff.measure.segmenter import Segmenter, SegmenterConfig

    masks = write_masks(tmp_path / "masks")
    for name, classes in (("right", 3), ("wrong", 5)):
        Segmenter(SegmenterConfig(classes, 1, 32, widths=(4, 8))).save_pretrained(tmp_path / name)
    run(small_model_dir, tmp_path / "out", masks, "--n", "2", "--min_dice", "0.9", "--segmenter", str(tmp_path / "right"))
    checks = [p["check"] for p in json.loads((tmp_path / "out" / "manifest.json").read_text())["pairs"]]
    assert all(1 <= c["draw"] <= c["draws"] <= 8 and 0 <= c["dice"] <= 1 for c in checks)
    assert all(c["draws"] == 8 and c["dropped"] for c in checks if c["dice"] < 0.9)  # few pass an untrained reader
    with pytest.raises(SystemExit):
        run(small_model_dir, tmp_path / "other", masks, "--min_dice", "0.9", "--segmenter", str(tmp_path / "wrong"))
    assert "the segmenter reads 5 classes, 1 channel(s) at 32 px; the model draws 3 classes" in capsys.readouterr().err


@pytest.mark.parametrize("under", [False, True])
def test_an_out_that_is_a_file_or_under_one_is_refused_and_left_as_it_was(
    small_model_dir, tmp_path, capsys, under
):
    masks = write_masks(tmp_path / "masks")
    file = tmp_path / "file.txt"
    file.write_text("mine")
    with pytest.raises(SystemExit) as stop:
        run(small_model_dir, file / "sub" if under else file, masks)
    err = capsys.readouterr().err.strip().splitlines()
    words = f"lies under {file}, a file" if under else "is a file"
    assert stop.value.code == 2 and len(err) == 1 and words in err[0], err
    assert file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "masks"]


def test_a_rerun_on_changed_masks_is_refused_naming_them_and_a_respelled_folder_continues(
    small_model_dir, tmp_path, capsys, monkeypatch
):
    masks = write_masks(tmp_path / "masks")
    out = tmp_path / "out"
    run(small_model_dir, out, f"{masks}/", "--n", "4")
    drawn = files(out)
    monkeypatch.chdir(tmp_path)
    for spelling in ("masks", "./masks/", masks):  # one folder, whatever the spelling
        capsys.readouterr()
        run(small_model_dir, out, spelling, "--n", "4")
        assert "wrote 0 pairs to" in capsys.readouterr().out and files(out) == drawn
    before = everything(out)
    PIL.Image.fromarray(np.full((48, 48), 2, np.uint8)).save(masks / "case_3.png")  # one mask more
    rewritten = np.asarray(PIL.Image.open(masks / "case_1.png")).copy()
    rewritten[20:30] = 0  # through the head
    for change, words in (("added", "1 added: case_3.png"), ("changed", "1 changed: case_1.png")):
        if change == "changed":
            (masks / "case_3.png").unlink()
            PIL.Image.fromarray(rewritten).save(masks / "case_1.png")
        with pytest.raises(SystemExit) as stop:
            run(small_model_dir, out, masks, "--n", "4")
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1, err
        assert f"not the masks the run in {out} was planned on ({words})" in err[0], err
        assert everything(out) == before


def test_min_dice_leaving_out_every_pair_says_none_was_written(
    small_model_dir, tmp_path, monkeypatch, capsys
):
    import segdiff.synth.pairs as dataset

    class Blind:  # a segmenter that finds nothing: no image reads back
        def predict(self, images):
            return np.zeros(images.shape[:3], np.int64)

    monkeypatch.setattr(dataset, "open_segmenter", lambda settings, pipe: Blind())
    out = tmp_path / "out"
    run(small_model_dir, out, write_masks(tmp_path / "masks"), "--min_dice", "0.5")
    said = capsys.readouterr().out
    assert "wrote 0 pairs to" in said and "3 left out: no draw read back at --min_dice" in said, said
    pairs = json.loads((out / "manifest.json").read_text())["pairs"]
    assert not files(out) and len(pairs) == 3 and all(p["check"]["dropped"] for p in pairs)


def test_the_model_cards_recommended_settings_are_the_defaults_and_flags_override_them(
    small_model_dir, tmp_path, capsys
):
    from segdiff.model.card import ModelCard, render

    model, masks = tmp_path / "model", write_masks(tmp_path / "masks", size=32)
    shutil.copytree(small_model_dir, model)
    card = ModelCard.load(model)
    card.synthesis = {"deform": "none", "steps": 3, "guidance_scale": 2.0}
    card.save(model)
    assert "`--deform none --steps 3 --guidance_scale 2`" in (model / "README.md").read_text() == render(card)

    def synthesize(out: str, *flags: str) -> dict:  # -> the manifest of the run
        main(["synthesize", str(model), str(tmp_path / out), "--masks", str(masks), "--n", "2", *flags])
        return json.loads((tmp_path / out / "manifest.json").read_text())

    used = synthesize("card")
    assert {k: used["settings"][k] for k in ("deform", "steps", "scheduler", "guidance_scale")} == {
        "deform": "none", "steps": 3, "scheduler": None, "guidance_scale": 2.0
    }  # fmt: skip
    sources = {"deform": "card", "steps": "card", "scheduler": "default", "guidance_scale": "card"}
    assert used["settings_from"] == sources and used["sampling"] == "dpm++, 3 steps, mask guidance 2"
    for pair in used["pairs"]:  # deform none: the masks as they are
        drawn = read_mask(tmp_path / "card" / pair["mask"], 3)
        assert np.array_equal(drawn, read_mask(masks / pair["source"], 3))
    capsys.readouterr()
    synthesize("card", "--steps", "3")
    assert "wrote 0 pairs" in capsys.readouterr().out  # the same settings, by flag or by card, continue the run

    used = synthesize("flags", "--steps", "2", "--deform", "mild")
    assert (used["settings"]["steps"], used["settings"]["deform"], used["settings"]["guidance_scale"]) == (
        2, "mild", 2.0
    )  # fmt: skip
    assert used["settings_from"] == sources | {"deform": "flag", "steps": "flag"}

    for advice, words in (
        ({"steps": 1000}, "{'steps': 1000}: --steps 1000: expected a value in 1..100"),
        ({"cfg": 2}, "{'cfg': 2}: expected settings among deform, steps, scheduler, guidance_scale"),
        ({"scheduler": "student"}, f"{{'scheduler': 'student'}}: scheduler student: {model} has no"),
    ):
        card.synthesis = advice
        card.save(model)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            main(["synthesize", str(model), str(tmp_path / "bad"), "--masks", str(masks)])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and f"{model}/segdiff_card.json: synthesis {words}" in err[0], err
    assert not (tmp_path / "bad").exists()


def launched(*args) -> list[str]:
    """`torchrun` with two CPU processes on `python -m segdiff.dataset ARGS`."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return [*launcher, "-m", "segdiff.dataset", *map(str, args)]


def test_two_processes_killed_and_resumed_write_what_one_process_writes(small_model_dir, tmp_path):
    masks = write_masks(tmp_path / "masks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    # --num_pairs: torchrun takes --n for an abbreviation of its own options, even after the module's name.
    flags = ["--masks", masks, "--num_pairs", 40, "--batch_size", 2, "--steps", 20, "--layout", "nnunet"]
    log = tmp_path / "two.log"
    with open(log, "w") as stdout:
        process = subprocess.Popen(
            launched("synthesize", small_model_dir, tmp_path / "two", *flags),
            cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            while process.poll() is None and len(list((tmp_path / "two").glob("imagesTr/*.png"))) < 4:
                time.sleep(0.01)
            ranks = dict(re.findall(r"process (\d) of 2 on \S+ \(pid (\d+)\)", log.read_text()))
            os.kill(int(ranks["1"]), signal.SIGKILL)  # one process of two, as a node fails
        finally:
            process.wait(timeout=120)
    assert process.returncode != 0, log.read_text()[-3000:]
    assert 4 <= len(list((tmp_path / "two").glob("imagesTr/*.png"))) < 40, "the run was to be killed part way"
    resumed = subprocess.run(
        launched("synthesize", small_model_dir, tmp_path / "two", *flags),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert {"process 0 of 2", "process 1 of 2"} <= set(re.findall(r"process \d of 2", resumed.stdout))
    assert "already there" in resumed.stdout and "x 2 processes" in resumed.stdout
    main(["synthesize", str(small_model_dir), str(tmp_path / "one"), *map(str, flags)])
    one, two = everything(tmp_path / "one"), everything(tmp_path / "two")
    assert len(one) == 2 * 40 + 2 and two == one  # pairs, manifest.json and dataset.json, byte for byte


def test_shards_merge_into_what_one_process_writes(small_model_dir, tmp_path, capsys):
    from segdiff.measure.segmenter import Segmenter, SegmenterConfig

    masks = write_masks(tmp_path / "masks")
    Segmenter(SegmenterConfig(3, 1, 32, widths=(4, 8))).save_pretrained(tmp_path / "reader")
    # --min_dice: which pairs were left out must reach the manifest from every shard
    flags = ["--n", "7", "--batch_size", "2", "--min_dice", "0.3", "--segmenter", str(tmp_path / "reader")]
    run(small_model_dir, tmp_path / "one", masks, *flags)
    sharded = tmp_path / "sharded"
    run(small_model_dir, sharded, masks, *flags, "--shard", "1/2")
    assert "shard 1/2: wrote" in capsys.readouterr().out
    assert not json.loads((sharded / "manifest.json").read_text())["complete"]
    with pytest.raises(SystemExit):
        run(small_model_dir, sharded, masks, *flags, "--shard", "0/2", "--seed", "1")
    assert "holds a run with other settings (seed 0 -> 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["merge", str(small_model_dir), str(sharded), "--masks", str(masks), "--steps", "2", *flags])
    assert "pairs not drawn yet (syn_00000, syn_00001, syn_00004" in capsys.readouterr().err
    run(small_model_dir, sharded, masks, *flags, "--shard", "0/2")
    main(["merge", str(small_model_dir), str(sharded), "--masks", str(masks), "--steps", "2", *flags])
    assert "wrote 0 pairs" in capsys.readouterr().out
    one = everything(tmp_path / "one")
    assert everything(sharded) == one and "manifest.json" in one and "classes.json" in one
    checks = [p["check"] for p in json.loads(one["manifest.json"])["pairs"]]
    assert len(checks) == 7 and all(c["draws"] >= 1 for c in checks)
