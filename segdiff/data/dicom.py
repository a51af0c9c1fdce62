"""DICOM series in: one folder of single-slice files -> the voxel array and RAS+ affine nibabel gives for a
NIfTI of the same scan, so that `segdiff.volumes` converts both to the same slices.

Geometry. A file's pixel (row r, column c) lies at ImagePositionPatient + c * dc * X + r * dr * Y, where X
and Y are the row and column direction cosines of ImageOrientationPatient and (dr, dc) is PixelSpacing.
Slices are ordered by their position along the slice normal X x Y, never by file name or instance number.
The array is stored as NIfTI converters store it, (column, row, slice), and DICOM's patient coordinates
(LPS: +x left, +y posterior) are turned into NIfTI's RAS+ by negating x and y.

Refused, one line each naming the file: several series in one folder, missing slices (uneven spacing) or
header-only ones, gantry tilt (slices stepping off their normal), slices of another orientation, size or pixel
spacing, geometry that is no geometry (NaN, an all-zero orientation), multi-frame files, colour images,
compressed pixel data without a decoder, and pixel data that cannot be decoded (a truncated file).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom
from pydicom.pixels import apply_modality_lut, get_decoder

from ..errors import VolumeError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Positions are written as decimal strings of at most 16 characters; steps that differ by more than this
# share of a step are a missing slice or a tilt, not rounding.
TOLERANCE = 0.01


def is_series(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding DICOM files directly (not only in sub-folders)."""
    path = Path(path)
    return path.is_dir() and any(_dicom_files(path))


def _dicom_files(folder: Path):
    return (p for p in _files(folder) if is_dicom(p))


def _files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]


def not_a_series(folder: Path) -> VolumeError:
    """The error for a folder given as a DICOM series that holds no DICOM file, naming a file it holds."""
    files = _files(folder)
    what = f"{files[0].name} is not a DICOM file (no DICM preamble)" if files else "it holds no file"
    return VolumeError(f"{folder}: not a DICOM series ({what}); expected a folder of DICOM slice files")


def _read(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise VolumeError(f"{path}: cannot read the DICOM file ({e})") from e


def _slices(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """The image files of the one series in `folder`, checked to be single greyscale frames we can decode."""
    found = [(path, _read(path)) for path in _dicom_files(folder)]
    for path, ds in found:  # a slice cut short in its header reads as one without pixels: refuse, not skip
        image_class = "Image Storage" in pydicom.uid.UID(ds.file_meta.get("MediaStorageSOPClassUID", "")).name
        if "PixelData" not in ds and (image_class or "ImagePositionPatient" in ds):
            raise VolumeError(f"{path}: a slice without pixel data (header only); expected its image too")
    images = [(path, ds) for path, ds in found if "PixelData" in ds]  # a DICOMDIR or report has none
    if not images:
        raise VolumeError(f"{folder}: no DICOM image inside, expected one series of slices")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in images})
    if len(series) > 1:
        raise VolumeError(
            f"{folder}: {len(series)} series mixed (SeriesInstanceUID {', '.join(series[:3])}"
            f"{', ...' if len(series) > 3 else ''}); expected one series per folder"
        )
    for path, ds in images:
        syntax = ds.file_meta.TransferSyntaxUID
        if syntax.is_compressed and not get_decoder(syntax).is_available:
            needs = "; or ".join(get_decoder(syntax).missing_dependencies) or "a pixel data plugin"
            raise VolumeError(
                f"{path}: pixel data compressed as {syntax.name}, and no decoder is installed ({needs})"
            )
        if int(ds.get("NumberOfFrames", 1)) > 1:
            raise VolumeError(
                f"{path}: a multi-frame file of {ds.NumberOfFrames} frames; expected one slice per file"
            )
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise VolumeError(f"{path}: {ds.SamplesPerPixel} samples per pixel; expected a greyscale series")
    return images


def _geometry(path: Path, ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A slice's (orientation (6,), position (3,) in mm, pixel spacing (2,) in mm), refused in a line naming
    the file where a value is missing, not a number, or no geometry (a zero orientation, a zero spacing)."""
    values = []
    for tag, count in (("ImageOrientationPatient", 6), ("ImagePositionPatient", 3), ("PixelSpacing", 2)):
        if tag not in ds:
            raise VolumeError(f"{path}: no {tag}; expected the geometry of a cross-sectional image")
        stored = ds.get_item(tag).value  # the text as written while not yet read as numbers
        try:
            value = np.array(ds[tag].value, float).reshape(-1)
        except (TypeError, ValueError):  # pydicom refuses text that is no number
            value = np.array([])
        if value.shape != (count,) or not np.isfinite(value).all():
            shown = stored.decode(errors="replace").strip() if isinstance(stored, bytes) else stored
            raise VolumeError(f"{path}: {tag} {shown}; expected {count} finite numbers")
        values.append(value)
    orientation, position, spacing = values
    across, down = orientation[:3], orientation[3:]
    lengths = np.linalg.norm([across, down], axis=1)
    if np.abs(lengths - 1).max() > TOLERANCE or abs(across @ down) > TOLERANCE:
        raise VolumeError(
            f"{path}: ImageOrientationPatient {orientation.tolist()} is not an orientation; expected two "
            "perpendicular unit vectors (the row and column directions)"
        )
    if spacing.min() <= 0:
        raise VolumeError(f"{path}: PixelSpacing {spacing.tolist()}; expected two positive spacings in mm")
    return orientation, position, spacing


def _pixels(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """A slice's values with rescale slope and intercept applied, (columns, rows)."""
    # pixel_array is (rows, columns): transposed, the first array axis runs along a row as NIfTI's does.
    try:
        return apply_modality_lut(ds.pixel_array, ds).T
    except (ValueError, TypeError, AttributeError, NotImplementedError, RuntimeError) as e:
        raise VolumeError(f"{path}: cannot decode its pixel data ({e})") from e


def read_series(folder: str | os.PathLike) -> nib.Nifti1Image:
    """A DICOM series folder -> float32 (columns, rows, slices) voxels with rescale slope and intercept
    applied, and the RAS+ affine of that grid. Errors are `VolumeError` lines naming the folder or file."""
    folder = Path(folder)
    images = _slices(folder)
    geometry = [_geometry(path, ds) for path, ds in images]
    (path0, first), (orientation, _, spacing) = images[0], geometry[0]
    across, down = orientation[:3], orientation[3:]  # direction of increasing column, of increasing row
    normal = np.cross(across, down)
    for (path, ds), (its_orientation, _, its_spacing) in zip(images, geometry, strict=True):
        if not np.allclose(its_orientation, orientation, atol=1e-4):
            raise VolumeError(
                f"{path}: orientation differs from {path0.name}'s; expected one orientation per series"
            )
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise VolumeError(
                f"{path}: {ds.Rows}x{ds.Columns} pixels, {path0.name} has {first.Rows}x{first.Columns}"
            )
        if not np.allclose(its_spacing, spacing, rtol=1e-4, atol=0):
            raise VolumeError(
                f"{path}: PixelSpacing {its_spacing.tolist()} mm, {path0.name} has {spacing.tolist()}; expected "
                "one pixel spacing per series"
            )
    positions = np.array([position for _, position, _ in geometry])  # (N, 3) in mm, LPS
    order = np.argsort(positions @ normal, kind="stable")
    images, positions = [images[i] for i in order], positions[order]
    step = _slice_step(folder, images, positions, normal)

    row_spacing, column_spacing = spacing
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = across * column_spacing, down * row_spacing
    affine[:3, 2], affine[:3, 3] = step, positions[0]
    voxels = np.stack([_pixels(path, ds) for path, ds in images], axis=-1)
    image = nib.Nifti1Image(voxels.astype(np.float32), LPS_TO_RAS @ affine)
    image.header.set_xyzt_units("mm")
    return image


def _slice_step(folder: Path, images: list, positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The vector from one slice to the next (mm, LPS), checked to be even and along the slice normal."""
    if len(images) == 1:
        ds = images[0][1]
        return normal * float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
    gaps = np.diff(positions @ normal)
    typical = float(np.median(gaps))
    if typical <= 0 or np.min(gaps) <= TOLERANCE * typical:
        i = int(np.argmin(gaps))
        raise VolumeError(
            f"{images[i + 1][0]}: at the same position as {images[i][0].name}; expected one slice per position"
        )
    if np.max(np.abs(gaps - typical)) > TOLERANCE * typical:
        i = int(np.argmax(np.abs(gaps - typical)))
        raise VolumeError(
            f"{folder}: slices {images[i][0].name} and {images[i + 1][0].name} are {gaps[i]:.3g} mm apart, the others "
            f"{typical:.3g} mm; missing slices? expected evenly spaced slices"
        )
    step = (positions[-1] - positions[0]) / (len(images) - 1)
    off_normal = step - (step @ normal) * normal
    if np.linalg.norm(off_normal) > TOLERANCE * typical:
        degrees = np.degrees(np.arctan2(np.linalg.norm(off_normal), step @ normal))
        raise VolumeError(
            f"{folder}: slices step {degrees:.2f} degrees off their normal (gantry tilt); expected an untilted "
            "series: resample it first (dcm2niix does)"
        )
    return step


def write_series(
    image: nib.Nifti1Image,
    folder: str | os.PathLike,
    *,
    intercept: float = -1024.0,
    slope: float = 1.0,
    seed: int = 0,
) -> list[Path]:
    """Write a 3-D volume as a CT series of uncompressed single-slice files, named in shuffled order.

    The inverse of `read_series`, for checking it against a NIfTI twin (tests, benchmarks/dicom_roundtrip.py):
    values are stored as unsigned 16-bit `round((value - intercept) / slope)`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = np.asarray(image.dataobj, dtype=np.float64)
    stored = np.round((data - intercept) / slope)
    if stored.min() < 0 or stored.max() > 65535:
        raise VolumeError(
            f"values {data.min():g}..{data.max():g} do not fit 16 bits with intercept {intercept:g}"
        )
    affine = LPS_TO_RAS @ image.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    orientation = [*(affine[:3, 0] / spacing[0]), *(affine[:3, 1] / spacing[1])]
    series, study = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    names = np.random.default_rng(seed).permutation(data.shape[2])
    written = []
    for k in range(data.shape[2]):
        meta = pydicom.dataset.FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", study, series
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.ImagePositionPatient = [_ds(v) for v in (affine @ [0, 0, k, 1])[:3]]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # between rows, between columns
        ds.SliceThickness = _ds(spacing[2])
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(intercept), _ds(slope), "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<u2").tobytes()
        path = folder / f"IM{names[k]:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters, as DICOM allows, keeping as many digits as fit."""
    return pydicom.valuerep.format_number_as_ds(float(value))
