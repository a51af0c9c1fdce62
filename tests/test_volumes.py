"""segdiff.volumes: NIfTI volumes to slices in the original layout and back, on tiny volumes made here.

The volumes are stored posterior-left-inferior with swapped axes (array axis 0 runs posteriorly, axis 1 to
the patient's left, axis 2 inferiorly), so a slice only looks right if reorientation works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import train_cli
from segdiff import SegDiffPipeline
from segdiff.cli.volumes import main
from segdiff.data.volumes import label_names
from segdiff.synth.volumes import slice_noise

# World x = 10 - 2 j (2 mm, to the left), y = 5 - 1.5 i (1.5 mm, posterior), z = 20 - 3 k (3 mm, inferior).
AFFINE = np.array([[0, -2.0, 0, 10], [-1.5, 0, 0, 5], [0, 0, -3.0, 20], [0, 0, 0, 1]])
SHAPE = (12, 10, 8)
LABELS = {"background": 0, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 9}
AIR, TISSUE, MARKER = -1000.0, 40.0, 1000.0
ORGAN_SLICES = (2, 3, 4)  # stored k holding liver and kidneys: RAS+ (superior-up) indices 5, 4, 3


def case_volumes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CT in HU (air around a tissue block, a bright marker at the patient's right-anterior corner) and
    labels: liver on the patient's right, both kidneys on the left in ORGAN_SLICES, stomach in slice 6 only."""
    ct = np.full(SHAPE, AIR, np.float32)
    ct[1:11, 1:9] = TISSUE
    ct[1:4, 1:4] = MARKER  # small i = anterior, small j = the patient's right
    labels = np.zeros(SHAPE, np.uint8)
    for k in ORGAN_SLICES:
        labels[4:9, 1:4, k] = 5
        labels[4:9, 6:8, k] = 3 if seed % 2 else 2  # a kidney block, right in even cases
        labels[8, 7, k] = 3  # both kidney ids in every organ slice
        labels[8, 6, k] = 2
    labels[5:7, 5, 6] = 9
    return ct, labels


def save(array: np.ndarray, path, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


@pytest.fixture
def nnunet(tmp_path):
    """An nnU-Net-style data set of four cases with dataset.json naming the labels."""
    root = tmp_path / "Dataset001"
    for i in range(4):
        ct, labels = case_volumes(i)
        save(ct, root / "imagesTr" / f"case{i}_0000.nii.gz")
        save(labels, root / "labelsTr" / f"case{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": LABELS, "channel_names": {"0": "CT"}}))
    return root


def run_convert(root, out, *flags) -> dict:
    main(["convert", str(out), "--images", str(root / "imagesTr"), "--labels", str(root / "labelsTr"), *flags])
    return json.loads((out / "split.json").read_text())


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_slices_are_read_as_radiologists_read_them(nnunet, tmp_path):
    out = tmp_path / "slices"
    record = run_convert(nnunet, out, "--classes", "liver,kidneys=kidney_left+kidney_right",
                         "--window", "abdomen", "--size", "20", "--split", "1,0,0")  # fmt: skip
    names = sorted(p.name for p in (out / "img" / "train").iterdir())
    # the stored slices 2, 3, 4 are RAS+ 5, 4, 3; the stomach's slice holds no kept class and is dropped
    assert names == [f"case{i}_z{z:03d}.png" for i in range(4) for z in (3, 4, 5)]
    assert record["slices"] == {"train": 12, "val": 0, "test": 0}
    assert json.loads((out / "classes.json").read_text())["conversion"]["intensity_range"] == [-160, 240]
    image, mask = png(out / "img" / "train" / names[0]), png(out / "mask" / "all" / "train" / names[0])
    rows, cols = np.nonzero(image == 255)  # the marker: the patient's right-anterior corner
    assert rows.max() < 10 and cols.max() < 10, "anterior must be up and the patient's right on the left"
    assert np.nonzero(mask == 1)[1].mean() < np.nonzero(mask == 2)[1].mean()  # liver right, kidneys left
    # 1 px per mm on both axes (voxels 2 mm wide, 1.5 mm high): the 16 x 15 mm tissue block is 16 x 15 px
    rows, cols = np.nonzero(image > 64)
    assert image.shape == (20, 20) and (np.ptp(rows) + 1, np.ptp(cols) + 1) == (15, 16)


def test_coronal_slices_have_superior_up(nnunet, tmp_path):
    record = run_convert(nnunet, tmp_path / "out", "--classes", "liver,stomach", "--axis", "coronal",
                         "--size", "24", "--split", "1,0,0")  # fmt: skip
    assert record["slices"]["train"] == 4 * 5  # the liver's five coronal (stored i = 4..8) slices per case
    mask = png(tmp_path / "out" / "mask" / "all" / "train" / "case0_y005.png")  # stored i = 6: both organs
    (liver_rows, liver_cols), (stomach_rows, stomach_cols) = np.nonzero(mask == 1), np.nonzero(mask == 2)
    assert stomach_rows.min() > liver_rows.max()  # the stomach's slice is inferior to the liver's: lower
    assert liver_cols.mean() < stomach_cols.mean()  # the liver on the patient's right: the image's left


def at(image: np.ndarray, i: int, j: int) -> int:
    """The pixel at the centre of stored voxel (i, j) on a 40 px slice: 4 px per voxel across (2 mm at
    2 px/mm), 3 px down (1.5 mm), below 2 px of padding (36 px high)."""
    return int(image[2 + 3 * i + 1, 4 * j + 2])


def test_window_and_percentile_give_the_documented_pixels(nnunet, tmp_path):
    run_convert(nnunet, tmp_path / "ct", "--classes", "liver", "--window", "95,510", "--size", "40")
    image = png(next((tmp_path / "ct" / "img").glob("*/case0_z004.png")))
    # pixel = 255 * clip((HU - (level - width / 2)) / width, 0, 1): marker 255, tissue 100, air 0
    assert [at(image, i, j) for i, j in ((2, 2), (7, 6), (11, 9))] == [255, 100, 0]
    info = json.loads((tmp_path / "ct" / "classes.json").read_text())
    assert info["conversion"]["window"] == [95, 510] and info["conversion"]["intensity_range"] == [-160, 350]

    hot = nnunet / "hot"
    ct, labels = case_volumes()
    ct[0, 0, 0] = ct[11, 9, 7] = 1e6  # 0.2% of voxels wildly bright: the 99.5th percentile ignores them
    save(ct, hot / "images" / "a.nii.gz")
    save(labels, hot / "labels" / "a.nii.gz")
    main(["convert", str(tmp_path / "mr"), "--images", str(hot / "images"), "--labels", str(hot / "labels"),
          "--classes", "5", "--normalize", "percentile", "--size", "40"])  # fmt: skip
    image = png(tmp_path / "mr" / "img" / "train" / "a_z004.png")
    # percentile 0.5 = air -> 0, 99.5 = marker -> 255, tissue in between at its share of the range
    expected = [255, round(255 * (TISSUE - AIR) / (MARKER - AIR)), 0]
    assert [at(image, i, j) for i, j in ((2, 2), (7, 6), (11, 9))] == expected
    assert json.loads((tmp_path / "mr" / "classes.json").read_text())["conversion"]["normalize"] == "percentile"


def test_classes_are_picked_and_merged_by_name_or_id(nnunet, tmp_path):
    run_convert(nnunet, tmp_path / "out", "--classes", "9,liver+1,kidney_right", "--keep-empty", "--size", "20")
    info = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert info["class_names"] == ["background", "stomach", "liver+spleen", "kidney_right"]
    masks = {p.name: png(p) for p in (tmp_path / "out" / "mask" / "all").glob("*/*.png")}
    assert len(masks) == 4 * SHAPE[2]  # --keep-empty: every slice
    assert set(np.unique(masks["case0_z001.png"])) == {0, 1}  # stored slice 6: the stomach alone
    right, left = masks["case0_z004.png"], masks["case1_z004.png"]  # kidney block: right in case 0, left in 1
    assert set(np.unique(right)) == set(np.unique(left)) == {0, 2, 3}
    assert (left == 3).sum() * 4 < (right == 3).sum()  # kidney_left was not kept: background
    assert (left == 2).sum() == (right == 2).sum()  # the liver, merged with the (absent) spleen

    run_convert(nnunet, tmp_path / "all", "--size", "16")  # no --classes: every label dataset.json names
    names = json.loads((tmp_path / "all" / "classes.json").read_text())["class_names"]
    assert names == ["background", "spleen", "kidney_right", "kidney_left", "liver", "stomach"]


@pytest.mark.parametrize(
    "table",
    [{"labels": {"0": "background", "5": "liver"}},  # MSD dataset.json: id -> name
     {"labels": {"background": 0, "liver": 5}},  # nnU-Net v2 dataset.json: name -> id
     {"5": "liver", "1": "spleen"}],  # a bare id -> name table, as TotalSegmentator's label names
)  # fmt: skip
def test_label_names_are_read_in_every_common_form(tmp_path, table):
    (tmp_path / "names.json").write_text(json.dumps(table))
    assert label_names(tmp_path, tmp_path / "names.json")[5] == "liver"


def test_split_is_by_case_and_recorded(nnunet, tmp_path):
    record = run_convert(nnunet, tmp_path / "a", "--classes", "liver", "--split", "0.5,0.25,0.25",
                         "--seed", "3", "--size", "16")  # fmt: skip
    cases = record["cases"]
    assert sorted(c for split in cases.values() for c in split) == [f"case{i}" for i in range(4)]
    assert [len(cases[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    for split, names in cases.items():
        on_disk = {p.name.split("_z")[0] for p in (tmp_path / "a" / "img" / split).iterdir()}
        assert on_disk == set(names)  # each case's slices all in its own split
    assert record["settings"]["seed"] == 3 and record["settings"]["split"] == [0.5, 0.25, 0.25]
    again = run_convert(nnunet, tmp_path / "b", "--classes", "liver", "--split", "0.5,0.25,0.25",
                        "--seed", "3", "--size", "16")  # fmt: skip
    assert again["cases"] == cases


def damage(root, what):
    ct, labels = case_volumes()
    images, label_dir = root / "imagesTr", root / "labelsTr"
    if what == "no label":
        save(ct, images / "extra_0000.nii.gz")
    elif what == "shape":
        save(labels[:, :, :7], label_dir / "case1.nii.gz")
    elif what == "affine":
        save(labels, label_dir / "case1.nii.gz", affine=AFFINE @ np.diag([1, 1, 1.1, 1]))
    elif what == "non-integer":
        save(labels.astype(np.float32) + 0.5, label_dir / "case1.nii.gz")
    elif what == "4-D":
        save(np.stack([ct, ct], -1), images / "case1_0000.nii.gz")
    elif what == "unreadable":
        (images / "case1_0000.nii.gz").write_bytes(b"not a volume")
    elif what == "output":
        (root.parent / "out").mkdir()
        (root.parent / "out" / "notes.txt").write_text("kept")
    elif what == "twin":  # the same case twice: which one would be converted?
        save(ct, images / "case1_0000.nii")


ERRORS = [
    ("no label", [], "extra_0000.nii.gz: no label volume for case extra"),
    ("shape", [], "case1.nii.gz differ in shape"),
    ("affine", [], "case1.nii.gz differ in affine"),
    ("non-integer", [], "case1.nii.gz: label value 0.5, expected integer label ids"),
    ("4-D", [], "case1_0000.nii.gz: a 4-D volume of shape (12, 10, 8, 2), expected 3-D"),
    ("unreadable", [], "case1_0000.nii.gz: cannot read the NIfTI volume"),
    (None, ["--classes", "liver,pancreas"], "unknown label 'pancreas'; known names: background, spleen"),
    (None, ["--window", "wide"], "--window wide: expected one of abdomen"),
    (None, ["--window", "bone", "--normalize", "percentile"], "--window and --normalize: choose one"),
    (None, ["--window", "nan,400"], "--window nan,400: expected one of abdomen"),
    (None, ["--window", "0,inf"], "--window 0,inf: expected one of abdomen"),
    (None, ["--split", "nan,nan,nan"], "--split (nan, nan, nan): expected three fractions >= 0 summing to 1"),
    ("twin", [], "imagesTr: holds case1_0000.nii and case1_0000.nii.gz; expected one volume of each name"),
    ("output", [], "out already exists and is not an empty folder"),
]


@pytest.mark.parametrize(("what", "flags", "message"), ERRORS, ids=[e[2][:30] for e in ERRORS])
def test_bad_volumes_exit_2_naming_the_file(nnunet, tmp_path, capsys, what, flags, message):
    damage(nnunet, what)
    with pytest.raises(SystemExit) as stop:
        run_convert(nnunet, tmp_path / "out", *(flags or ["--classes", "liver"]), "--size", "16")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and err.startswith("error: ") and message in err, err
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == (["Dataset001", "out"] if what == "output" else ["Dataset001"])  # nothing half-written


def test_convert_into_dot_removing_what_killed_conversions_left(nnunet, tmp_path, monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    for pid in (ended.pid, os.getppid()):  # the staging folders of a killed conversion and of a running one
        (tmp_path / f".here.partial-{pid}" / "img").mkdir(parents=True)
    monkeypatch.chdir(here)
    run_convert(nnunet, Path("."), "--classes", "liver", "--size", "16")
    assert sorted(p.name for p in here.iterdir()) == ["classes.json", "img", "mask", "split.json"]
    assert [p.name for p in tmp_path.glob(".here.*")] == [f".here.partial-{os.getppid()}"]

    (tmp_path / "file").touch()
    with pytest.raises(SystemExit) as stop:
        run_convert(nnunet, tmp_path / "file" / "out", "--classes", "liver")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    expected = "cannot create it (Not a directory); expected a path in a writable folder"
    assert stop.value.code == 2 and err == f"error: {tmp_path / 'file' / 'out'}: {expected}"
    assert sorted(p.name for p in tmp_path.glob("[!.]*")) == ["Dataset001", "file", "here"]


def test_neighbouring_slices_share_noise_unless_asked_not_to():
    shared = slice_noise(40, (1, 32, 32), seed=0, independent=False).flatten(1)
    fresh = slice_noise(40, (1, 32, 32), seed=0, independent=True).flatten(1)
    assert 0.9 < shared.std() < 1.1
    neighbours = torch.stack([torch.corrcoef(x[i : i + 2])[0, 1] for x in (shared, fresh) for i in range(39)])
    assert neighbours[:39].min() > 0.9 and neighbours[39:].abs().max() < 0.2
    assert torch.corrcoef(shared[[0, 20]])[0, 1].abs() < 0.2  # far apart: independent, not one noise


def test_convert_train_synthesize_round_trip(nnunet, tmp_path, capsys):
    data, model, synthetic = tmp_path / "data", tmp_path / "model", tmp_path / "synthetic.nii.gz"
    run_convert(nnunet, data, "--classes", "liver,kidneys=kidney_left+kidney_right", "--window", "abdomen",
                "--size", "16", "--split", "0.75,0.25,0")  # fmt: skip
    code = train_cli.main([
        "--img_dir", str(data / "img"), "--seg_dir", str(data / "mask"), "--segmentation_guided",
        "--num_segmentation_classes", "3", "--img_size", "16", "--preset", "tiny", "--train_batch_size", "4",
        "--num_epochs", "1", "--lr_warmup_steps", "1", "--sampler", "ddim", "--num_inference_steps", "2",
        "--eval_batch_size", "2", "--output_dir", str(model),
    ])  # fmt: skip
    assert code == 0
    card = SegDiffPipeline.from_pretrained(model).card
    assert card.class_names == ["background", "liver", "kidneys"]  # from classes.json, no --class_names

    labels_path = nnunet / "labelsTr" / "case0.nii.gz"
    main(["synthesize", str(model), str(labels_path), str(synthetic), "--steps", "2", "--batch_size", "2"])
    assert "3 of 8 slices drawn" in capsys.readouterr().out
    labels, written = nib.load(labels_path), nib.load(synthetic)
    volume = written.get_fdata()
    assert volume.shape == labels.shape and np.allclose(written.affine, labels.affine)
    assert nib.aff2axcodes(written.affine) == ("P", "L", "I")
    assert volume.min() >= -160 and volume.max() <= 240  # pixels mapped back to HU of the abdomen window
    for k in range(SHAPE[2]):  # the stored axis, back from RAS+: organ slices drawn, the others background
        drawn = np.unique(volume[..., k]).size > 10
        assert drawn == (k in ORGAN_SLICES), k
    kept = np.isin(labels.get_fdata(), [2, 3, 5])
    assert np.unique(volume[kept]).size > 20  # the kept-class voxels were drawn, not filled


def test_a_class_count_other_than_classes_json_is_refused(nnunet, tmp_path, capsys):
    run_convert(nnunet, tmp_path / "data", "--classes", "liver", "--size", "16")
    code = train_cli.main(["--img_dir", str(tmp_path / "data" / "img"), "--seg_dir", str(tmp_path / "data" / "mask"),
                           "--segmentation_guided", "--num_segmentation_classes", "3", "--img_size", "16",
                           "--preset", "tiny", "--output_dir", str(tmp_path / "model")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "classes.json: names 2 classes (background, liver)" in err


def test_synthesize_refuses_a_folder_as_its_output_leaving_nothing(nnunet, tmp_path, tiny_model_dir, capsys):
    data, out = tmp_path / "data", tmp_path / "synthetic.nii.gz"
    run_convert(nnunet, data, "--classes", "liver,spleen,kidneys=kidney_left+kidney_right", "--size", "16")
    out.mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["synthesize", str(tiny_model_dir), str(nnunet / "labelsTr" / "case0.nii.gz"), str(out),
              "--data", str(data), "--steps", "1"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and err == f"error: {out}: expected a .nii or .nii.gz file name, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset001", "data", "synthetic.nii.gz"]


def test_synthesize_takes_the_settings_from_the_data_when_the_model_lacks_them(nnunet, tmp_path, tiny_model_dir,
                                                                                 capsys):
    labels, out = nnunet / "labelsTr" / "case0.nii.gz", tmp_path / "synthetic.nii"
    with pytest.raises(SystemExit) as stop:
        main(["synthesize", str(tiny_model_dir), str(labels), str(out)])
    assert stop.value.code == 2 and "no conversion settings" in capsys.readouterr().err and not out.exists()
    run_convert(nnunet, tmp_path / "data", "--classes", "liver,spleen,kidneys=kidney_left+kidney_right",
                "--normalize", "percentile", "--size", "16")  # fmt: skip
    main(["synthesize", str(tiny_model_dir), str(labels), str(out), "--data", str(tmp_path / "data"),
          "--steps", "1", "--independent-noise"])  # fmt: skip
    volume = nib.load(out).get_fdata()
    # percentile settings: pixels map back to the training volumes' 0.5-99.5 percentile range (air..marker)
    assert volume.shape == SHAPE and volume.min() >= AIR and volume.max() <= MARKER and volume.max() > 240
