"""DICOM series in: an oblique series written with shuffled file names converts to the same slices as its
NIfTI twin; its geometry and values agree with nibabel's own DICOM wrapper; broken series are refused in
one line each."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLSLossless
from test_volumes import LABELS, case_volumes, png, save

from segdiff.cli.volumes import main
from segdiff.data.dicom import LPS_TO_RAS, read_series, write_series


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = (i for i in range(3) if i != axis)
    turn = np.eye(4)
    turn[a, a], turn[a, b], turn[b, a], turn[b, b] = c, -s, s, c
    return turn


# Voxels of 1.5 x 2 x 3 mm, turned 20 degrees about one axis and 10 about another: an oblique acquisition.
OBLIQUE = (
    rotation(2, 20)
    @ rotation(0, 10)
    @ np.array([[1.5, 0, 0, -40], [0, 2.0, 0, 30], [0, 0, 3.0, -12], [0, 0, 0, 1]])
)


@pytest.fixture
def twins(tmp_path):
    """Two cases as NIfTI (nifti/CASE.nii.gz) and as DICOM series folders (dicom/CASE/), labels as NIfTI."""
    for i in range(2):
        ct, labels = case_volumes(i)
        save(ct, tmp_path / "nifti" / f"case{i}.nii.gz", OBLIQUE)
        save(labels, tmp_path / "labels" / f"case{i}.nii.gz", OBLIQUE)
        write_series(nib.Nifti1Image(ct, OBLIQUE), tmp_path / "dicom" / f"case{i}", seed=i)
    (tmp_path / "labels" / "dataset.json").write_text(json.dumps({"labels": LABELS}))
    return tmp_path


def convert(out, images, labels, *flags):
    main(["convert", str(out), "--images", str(images), "--labels", str(labels), "--size", "24", *flags])


def test_an_oblique_shuffled_series_converts_like_its_nifti_twin(twins):
    files = sorted(p.name for p in (twins / "dicom" / "case0").iterdir())
    order = [int(pydicom.dcmread(twins / "dicom" / "case0" / f).InstanceNumber) for f in files]
    assert order != sorted(order), "file names must not follow the slice order"
    for normalize in (["--window", "abdomen"], []):
        convert(twins / "a", twins / "nifti", twins / "labels", "--split", "1,0,0", *normalize)
        convert(twins / "b", twins / "dicom", twins / "labels", "--split", "1,0,0", *normalize)
        written = sorted(p.relative_to(twins / "a") for p in (twins / "a").rglob("*.png"))
        assert written and written == sorted(p.relative_to(twins / "b") for p in (twins / "b").rglob("*.png"))
        for name in written:
            assert np.array_equal(png(twins / "a" / name), png(twins / "b" / name)), name
        for out in ("a", "b"):
            for path in sorted((twins / out).rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()


def test_geometry_and_values_agree_with_nibabels_dicom_wrapper(twins):
    with pytest.warns(
        UserWarning, match="DICOM readers are highly experimental"
    ):  # Siemens mosaics: not used here
        from nibabel.nicom import dicomwrappers
    volume = read_series(twins / "dicom" / "case0")
    voxels, to_lps = volume.get_fdata(), np.linalg.inv(LPS_TO_RAS) @ volume.affine
    found = set()
    for path in (twins / "dicom" / "case0").iterdir():
        wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))  # (row, column) voxels, LPS mm
        k = int(np.argmin([np.abs(to_lps @ [0, 0, k, 1] - wrapper.affine[:, 3]).max()
                           for k in range(voxels.shape[2])]))  # fmt: skip
        found.add(k)
        assert np.allclose(to_lps @ [0, 0, k, 1], wrapper.affine[:, 3], atol=1e-4)
        # our first array axis runs along a row (the wrapper's second), our second down a column
        assert np.allclose(to_lps[:3, [1, 0]], wrapper.affine[:3, [0, 1]], atol=1e-4)
        assert np.array_equal(voxels[:, :, k], wrapper.get_data().T)
    assert found == set(range(voxels.shape[2]))
    ct, _ = case_volumes(0)
    assert np.array_equal(voxels, ct) and np.allclose(volume.affine, OBLIQUE, atol=1e-6)


def series(folder):
    return sorted(folder.iterdir())


def mixed(folder):
    ct, _ = case_volumes(1)
    other = write_series(nib.Nifti1Image(ct, OBLIQUE), folder.parent / "other")
    other[0].rename(folder / "XX.dcm")


def missing(folder):
    by_position = sorted(series(folder), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))
    by_position[3].unlink()


def tilted(folder):
    for path in series(folder):
        ds = pydicom.dcmread(path)
        position = np.array(ds.ImagePositionPatient, float)
        ds.ImagePositionPatient = [
            f"{v:.6f}" for v in position + np.array([0.5 * int(ds.InstanceNumber), 0, 0])
        ]
        ds.save_as(path)


def compressed(folder):
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here, so such a series is read")
    path = series(folder)[0]
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not decoded \xff\xd9"])
    ds.save_as(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (mixed, "case0: 2 series mixed (SeriesInstanceUID "),
        (missing, "are 6 mm apart, the others 3 mm; missing slices? expected evenly spaced slices"),
        (tilted, "degrees off their normal (gantry tilt); expected an untilted series"),
        (
            compressed,
            "pixel data compressed as JPEG-LS Lossless Image Compression, and no decoder is installed",
        ),
    ],
    ids=["mixed", "missing", "tilt", "compressed"],
)
def test_broken_series_are_refused_in_one_line(twins, capsys, damage, message):
    folder = twins / "dicom" / "case0"
    damage(folder)
    with pytest.raises(SystemExit) as stop:
        convert(twins / "out", folder, twins / "labels" / "case0.nii.gz", "--classes", "liver")
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert stop.value.code == 2 and err.startswith("error: ") and message in err, err
    assert not (twins / "out").exists()


def set_tag(tag, value):
    def damage(path):
        ds = pydicom.dcmread(path)
        setattr(ds, tag, value)
        ds.save_as(path)

    return damage


def header_only(path):
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)


def truncated(path):
    """The second half of the slice's pixel data cut off."""
    cut = len(pydicom.dcmread(path).PixelData) // 2
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - cut)


def cut_in_its_header(path):
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) // 3)


@pytest.mark.parametrize(
    "damage, message",
    [
        (set_tag("PixelSpacing", ["2.5", "1.5"]), "PixelSpacing [2.5, 1.5] mm, IM00000.dcm has [2.0, 1.5]; "
                                                  "expected one pixel spacing per series"),
        (truncated, "cannot decode its pixel data (The number of bytes of pixel data is less than expected"),
        (set_tag("ImagePositionPatient", ["nan", "0", "0"]), "ImagePositionPatient nan\\0\\0; expected 3 finite "
                                                             "numbers"),
        (header_only, "a slice without pixel data (header only); expected its image too"),
        (cut_in_its_header, "a slice without pixel data (header only); expected its image too"),
    ],
    ids=["pixel-spacing", "truncated", "nan-position", "header-only", "cut-in-its-header"],
)  # fmt: skip
def test_a_bad_slice_is_refused_in_one_line_naming_it(twins, capsys, damage, message):
    folder = twins / "dicom" / "case0"
    bad = series(folder)[-1]  # not the first by name, the slice the others are compared with
    damage(bad)
    with pytest.raises(SystemExit) as stop:
        convert(twins / "out", folder, twins / "labels" / "case0.nii.gz", "--classes", "liver")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and err.startswith(f"error: {bad}: {message}"), err
    assert not (twins / "out").exists()


def test_a_zero_orientation_is_called_no_orientation(twins, capsys):
    folder = twins / "dicom" / "case0"
    for path in series(folder):
        set_tag("ImageOrientationPatient", ["0"] * 6)(path)
    with pytest.raises(SystemExit):
        convert(twins / "out", folder, twins / "labels" / "case0.nii.gz", "--classes", "liver")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {series(folder)[0]}: ImageOrientationPatient [0.0, 0.0, 0.0, 0.0, 0.0, 0.0] is not an "
        "orientation; expected two perpendicular unit vectors (the row and column directions)"
    )


@pytest.mark.parametrize("layout", ["one-series", "case-folders"])
def test_files_named_dcm_that_are_not_dicom_are_blamed_not_the_labels(twins, capsys, layout):
    folder = twins / "junk" / "case0"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"IM{i:05d}.dcm").write_bytes(b"not a DICOM file" * 20)
    images, labels = (folder, twins / "labels" / "case0.nii.gz")
    if layout == "case-folders":
        images, labels = twins / "junk", twins / "labels"
    with pytest.raises(SystemExit) as stop:
        convert(twins / "out", images, labels, "--classes", "liver")
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {folder}: not a DICOM series (IM00000.dcm is not a DICOM file (no DICM preamble)); expected a "
        "folder of DICOM slice files"
    )
