"""Volumes to slices in the original layout, and the cutting, fitting and intensity mapping that
`segdiff.synth.volumes` uses to draw slices back into a volume. An image volume is a NIfTI file or a DICOM series
(a folder of its slice files, read by `segdiff.data.dicom`). The command line is `python -m segdiff.volumes`.

Orientation. Volumes are turned to RAS+ (nibabel's closest canonical orientation: the first array axis runs
to the patient's right, the second anteriorly, the third superiorly) and cut along one axis; each slice is
shown as radiologists read it: axial with anterior up and the patient's right on the image's left, coronal
with superior up and right on the left, sagittal with superior up and anterior on the left. File names keep
the case and the slice's RAS+ index: `CASE_z042.png` (x, y, z for sagittal, coronal, axial).

Geometry. A slice is resized to `size` px on its longer physical side (voxel spacing counted, so anisotropic
voxels keep their true aspect) and centred on a square of background; masks resize by nearest neighbour.

Intensities. A CT window (level, width in HU) or the 0.5-99.5 percentile range of each volume maps to
0..255. The range is recorded, so synthesized pixels map back: to HU under a window, to the median range
of the training volumes under percentile normalisation (MR has no absolute unit).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from tqdm.auto import tqdm

from ..choices import SPLITS, check_seed
from ..errors import VolumeError
from ..files import staged_folder, write_json, write_png
from .dicom import is_series, not_a_series, read_series

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS+ array axis each slice is cut across
WINDOWS = {  # (level, width) in HU, the usual radiology presets
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "soft": (50.0, 350.0),
}
PERCENTILES = (0.5, 99.5)  # robust to a few hot voxels, which would otherwise squeeze MR tissue to black
MAX_CLASSES = 256  # background included, as masks are 8-bit PNGs
SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class KeptClass:
    """A class of the converted data: its name and the label ids of the volumes merged into it."""

    name: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Conversion:
    """How volumes become slices; recorded with the data (and through training, the model card), so that
    `synthesize` maps a label volume the same way and maps intensities back."""

    classes: tuple[KeptClass, ...]  # class id i + 1 = classes[i]
    axis: str = "axial"
    size: int = 256
    window: tuple[float, float] | None = None  # (level, width) in HU; None: percentile normalisation
    intensity_range: tuple[float, float] | None = None  # value of pixel 0 and of pixel 255

    @property
    def class_names(self) -> list[str]:
        return ["background", *(c.name for c in self.classes)]

    def to_json(self) -> dict:
        info = asdict(self)
        info["normalize"] = "window" if self.window else "percentile"
        return info

    @classmethod
    def from_json(cls, info: dict, source: str) -> Conversion:
        try:
            return cls(
                classes=tuple(KeptClass(c["name"], tuple(c["ids"])) for c in info["classes"]),
                axis=info["axis"],
                size=int(info["size"]),
                window=tuple(info["window"]) if info.get("window") else None,
                intensity_range=tuple(info["intensity_range"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise VolumeError(f"{source}: conversion settings are incomplete ({e!r})") from e


# ---- reading --------------------------------------------------------------------------------------------


def _stem(path: Path) -> str:
    return next(path.name[: -len(s)] for s in SUFFIXES if path.name.endswith(s))


def _volume_files(folder: Path) -> dict[str, Path]:
    """Case name -> NIfTI file (`CASE.nii.gz`) or DICOM series folder (`CASE/`) in `folder`."""
    found = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]  # macOS leaves ._CASE.nii.gz files
    volumes = {}
    for path in found:
        if path.name.endswith(SUFFIXES) and path.is_file():
            name = _stem(path)
        elif is_series(path):
            name = path.name
        elif path.is_dir() and any(path.glob("*.dcm")):  # meant as a series: say why it is none
            raise not_a_series(path)
        else:
            continue
        if name in volumes:
            raise VolumeError(
                f"{folder}: holds {volumes[name].name} and {path.name}; expected one volume of each name"
            )
        volumes[name] = path
    return volumes


def pair_volumes(images: str | os.PathLike, labels: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """(case, image, label) triples: two files, two folders of same-named files, or nnU-Net/MSD folders
    (`imagesTr/CASE_0000.nii.gz` with `labelsTr/CASE.nii.gz`)."""
    images, labels = Path(images), Path(labels)
    if is_series(images) and labels.is_file():  # one DICOM series, named by its folder
        return [(images.name, images, labels)]
    if images.is_dir() and labels.is_file() and not _volume_files(images):
        raise not_a_series(images)
    if images.is_file() and labels.is_file():
        return [(_stem(images) if images.name.endswith(SUFFIXES) else images.stem, images, labels)]
    for path in (images, labels):
        if not path.is_dir():
            raise VolumeError(f"{path}: no such folder (expected two folders of .nii/.nii.gz, or two files)")
    image_files, label_files = _volume_files(images), _volume_files(labels)
    if not image_files:
        raise VolumeError(f"{images}: no .nii or .nii.gz volume or DICOM series folder inside")
    by_case = {}
    for stem, path in image_files.items():
        case = stem[:-5] if stem.endswith("_0000") and stem not in label_files else stem
        if case != stem and any(s.startswith(f"{case}_") and s != stem for s in image_files):
            raise VolumeError(f"{path}: case {case} has several channel files; segdiff converts one channel")
        if case not in label_files:
            raise VolumeError(f"{path}: no label volume for case {case} in {labels}")
        by_case[case] = path
    if extra := sorted(set(label_files) - set(by_case)):
        raise VolumeError(f"{label_files[extra[0]]}: a label volume without an image in {images}")
    return [(case, by_case[case], label_files[case]) for case in sorted(by_case)]


def read_volume(path: Path) -> nib.Nifti1Image:
    """A 3-D NIfTI image as stored (3-D data saved with one time point included), or a DICOM series folder
    read onto the grid a NIfTI of it would have; errors name the file."""
    if path.is_dir():
        return read_series(path)
    try:
        image = nib.load(path)
        if image.ndim == 4 and image.shape[3] == 1:
            image = image.slicer[..., 0]
    except (OSError, EOFError, ValueError, ImageFileError, zlib.error) as e:
        raise VolumeError(f"{path}: cannot read the NIfTI volume ({e})") from e
    if image.ndim != 3:
        raise VolumeError(f"{path}: a {image.ndim}-D volume of shape {image.shape}, expected 3-D")
    return image


def voxels(image: nib.Nifti1Image, path: Path, labels: bool = False) -> np.ndarray:
    """The voxel array as float32, or as int64 label ids >= 0 when `labels`; errors name `path`."""
    try:
        data = np.asarray(image.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise VolumeError(f"{path}: cannot read the NIfTI volume ({e})") from e
    if not labels:
        return data.astype(np.float32)
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data) | (data != np.round(data))
        if bad.any():
            raise VolumeError(f"{path}: label value {data[bad].flat[0]:g}, expected integer label ids")
    if data.min() < 0:
        raise VolumeError(f"{path}: label value {data.min()}, expected label ids >= 0")
    return data.astype(np.int64)


def label_names(labels: str | os.PathLike, names_file: str | os.PathLike | None = None) -> dict[int, str]:
    """Label id -> name from `names_file` or a `dataset.json` (nnU-Net/MSD) beside or above `labels`.

    Both directions are read: {"1": "spleen"} and {"spleen": 1}; {} when nothing names the labels.
    """
    labels = Path(labels)
    if names_file is None:
        folder = labels if labels.is_dir() else labels.parent
        found = [p for p in (folder / "dataset.json", folder.parent / "dataset.json") if p.is_file()]
        if not found:
            return {}
        names_file = found[0]
    try:
        info = json.loads(Path(names_file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VolumeError(f"{names_file}: cannot read the label names ({e})") from e
    table = info.get("labels", info) if isinstance(info, dict) else None
    if not isinstance(table, dict):
        raise VolumeError(f"{names_file}: expected a JSON object of label id -> name (or a dataset.json)")
    names = {}
    for key, value in table.items():
        if isinstance(value, int):  # nnU-Net v2: name -> id
            names[value] = str(key)
        elif str(key).isdigit():  # MSD and TotalSegmentator: id -> name
            names[int(key)] = str(value)
    return names


def parse_classes(spec: str | None, names: dict[int, str]) -> tuple[KeptClass, ...]:
    """`liver,spleen,kidneys=kidney_left+kidney_right` (names or ids) -> kept classes 1..K in that order.

    Without a spec, every named label but background is kept, each its own class.
    """
    if not spec and not names:
        raise VolumeError("--classes: nothing names the labels (no dataset.json, no --label-names); "
                          "list the label ids to keep, e.g. --classes 1,2,3")
    groups = spec.split(",") if spec else [str(i) for i in sorted(names) if i > 0]
    by_name = {name: i for i, name in names.items()}
    classes, used = [], {}
    for group in groups:
        given, _, members = group.rpartition("=")
        ids = []
        for token in (t.strip() for t in members.split("+")):
            if token in by_name:
                ids.append(by_name[token])
            elif token.isdigit():
                ids.append(int(token))
            else:
                known = ", ".join(n for _, n in sorted(names.items())) or "none (pass --label-names)"
                raise VolumeError(f"--classes: unknown label {token!r}; known names: {known}")
            if ids[-1] == 0:
                raise VolumeError(f"--classes: label {token!r} is 0, the background")
            if ids[-1] in used:
                raise VolumeError(f"--classes: label {token!r} is already in class {used[ids[-1]]!r}")
            used[ids[-1]] = given.strip() or group
        name = given.strip() or "+".join(names.get(i, f"label {i}") for i in ids)
        classes.append(KeptClass(name, tuple(ids)))
    if len(classes) + 1 > MAX_CLASSES:
        raise VolumeError(f"--classes: {len(classes)} classes, expected at most {MAX_CLASSES - 1}")
    return tuple(classes)


def map_labels(labels: np.ndarray, classes: tuple[KeptClass, ...]) -> np.ndarray:
    """Label ids -> uint8 class ids 1..K of the kept classes; every other label becomes background 0."""
    mask = np.zeros(labels.shape, np.uint8)
    for class_id, kept in enumerate(classes, start=1):
        mask[np.isin(labels, kept.ids)] = class_id
    return mask


# ---- slices ---------------------------------------------------------------------------------------------


def to_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """RAS+ volume -> one slice as radiologists read it (rows from superior/anterior, patient's right left)."""
    return np.take(volume, index, axis=axis).T[::-1, ::-1]


def from_slice(image: np.ndarray) -> np.ndarray:
    """The inverse of `to_slice`: a displayed slice back to the volume's two remaining axes."""
    return image[::-1, ::-1].T


def slice_spacing(image: nib.Nifti1Image, axis: int) -> np.ndarray:
    """(row, column) voxel spacing in mm of the slices `to_slice` cuts across `axis` of a RAS+ image."""
    first, second = (a for a in range(3) if a != axis)
    sizes = nib.affines.voxel_sizes(image.affine)
    return np.array([sizes[second], sizes[first]])


def _frame(shape: tuple[int, int], spacing: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """Where a slice lands on the size x size square: (top, left, height, width), true aspect kept."""
    extent = np.array(shape) * spacing
    height, width = (int(np.clip(round(e * size / extent.max()), 1, size)) for e in extent)
    return (size - height) // 2, (size - width) // 2, height, width


def _resize(array: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
    if nearest:
        interpolation = cv2.INTER_NEAREST
    else:  # area averaging when shrinking avoids aliasing fine texture
        interpolation = cv2.INTER_AREA if height * width < array.size else cv2.INTER_LINEAR
    return cv2.resize(array, (width, height), interpolation=interpolation)


def fit(array: np.ndarray, spacing: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """A displayed slice -> (size, size), its longer physical side filling the square, padded with 0."""
    top, left, height, width = _frame(array.shape, spacing, size)
    out = np.zeros((size, size), array.dtype)
    out[top : top + height, left : left + width] = _resize(array, height, width, nearest)
    return out


def unfit(image: np.ndarray, shape: tuple[int, int], spacing: np.ndarray) -> np.ndarray:
    """The inverse of `fit`: crop the padding and resize back to the slice's `shape`."""
    top, left, height, width = _frame(shape, spacing, image.shape[0])
    return _resize(image[top : top + height, left : left + width], *shape, nearest=False)


def intensity_range(volume: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    """What pixels 0 and 255 stand for: the window's ends, or the volume's 0.5 and 99.5 percentiles."""
    if window is not None:
        level, width = window
        return level - width / 2, level + width / 2
    low, high = np.percentile(volume[np.isfinite(volume)], PERCENTILES)
    return float(low), float(max(high, low + 1e-6))


def to_pixels(values: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Intensities -> float32 pixels in [0, 255] (round when written)."""
    low, high = value_range
    return (np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.float32)


# ---- convert --------------------------------------------------------------------------------------------


def parse_window(text: str) -> tuple[float, float]:
    """`abdomen` (a preset of WINDOWS) or `LEVEL,WIDTH` in HU -> (level, width)."""
    if text in WINDOWS:
        return WINDOWS[text]
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        level, width = 0.0, 0.0
    if not (math.isfinite(level) and 0 < width < math.inf):
        raise VolumeError(
            f"--window {text}: expected one of {', '.join(WINDOWS)} or LEVEL,WIDTH in HU, finite, width > 0"
        )
    return level, width


def split_cases(cases: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Whole cases to train/val/test in the given proportions (largest remainder), shuffled by `seed`."""
    if len(fractions) != 3 or not (min(fractions) >= 0 and abs(sum(fractions) - 1) <= 1e-6):  # NaN too
        raise VolumeError(f"--split {fractions}: expected three fractions >= 0 summing to 1, e.g. 0.8,0.1,0.1")
    exact = np.array(fractions) * len(cases)
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: len(cases) - counts.sum()]:
        counts[i] += 1
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    bounds = np.cumsum([0, *counts])
    return {split: sorted(order[bounds[i] : bounds[i + 1]]) for i, split in enumerate(SPLITS)}


def _grid(case: str, image_path: Path, label_path: Path) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Image and label volumes of one case, checked to share one voxel grid, reoriented to RAS+."""
    image, label = read_volume(image_path), read_volume(label_path)
    for what, a, b in (("shape", image.shape, label.shape), ("affine", image.affine, label.affine)):
        if np.shape(a) != np.shape(b) or not np.allclose(a, b, atol=1e-3):  # mm: float32 headers round
            raise VolumeError(
                f"case {case}: {image_path} and {label_path} differ in {what} "
                f"({np.round(a, 3).tolist()} vs {np.round(b, 3).tolist()}); expected one voxel grid"
            )
    return nib.as_closest_canonical(image), nib.as_closest_canonical(label)


def _staging(out: Path) -> Path:
    """A new hidden folder beside `out` to convert into; those killed conversions into `out` left go first."""
    target = out.resolve()  # `.` has no name to put beside it
    for old in target.parent.glob(f".{target.name}.partial-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        for s in SPLITS:
            (staging / "img" / s).mkdir(parents=True)
            (staging / "mask" / "all" / s).mkdir(parents=True)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise VolumeError(
            f"{out}: cannot create it ({e.strerror}); expected a path in a writable folder"
        ) from e
    return staging


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # running, as another user
        pass
    return True


def convert(
    out_dir: str | os.PathLike,
    images: str | os.PathLike,
    labels: str | os.PathLike,
    *,
    classes: str | None = None,
    names_file: str | os.PathLike | None = None,
    axis: str = "axial",
    window: tuple[float, float] | None = None,
    size: int = 256,
    keep_empty: bool = False,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Write volumes as slices in the original layout; returns what split.json records.

    Layout: `img/<split>/CASE_z042.png` (8-bit greyscale), `mask/all/<split>/<same name>` (class ids),
    `classes.json` (class names and the conversion settings) and `split.json` (cases and slices per split).
    `window` (level, width) in HU maps CT intensities; None normalises each volume to its percentiles.
    Everything is written to a hidden folder beside `out_dir` and renamed at the end: a failed run leaves
    nothing half-converted, and the folder a killed one leaves goes at the next conversion into `out_dir`.
    """
    if axis not in AXES:
        raise VolumeError(f"--axis {axis}: expected one of {', '.join(AXES)}")
    if not 8 <= size <= 4096:
        raise VolumeError(f"--size {size}: expected 8..4096 px")
    check_seed(seed)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VolumeError(f"{out} already exists and is not an empty folder, expected a new or empty one")
    pairs = pair_volumes(images, labels)
    kept = parse_classes(classes, label_names(labels, names_file))
    splits = split_cases([case for case, _, _ in pairs], split, seed)
    where = {case: s for s, cases in splits.items() for case in cases}
    along, per_case = AXES[axis], {}
    # An empty `out` is filled rather than replaced, as a shell may stand in it.
    with staged_folder(out, _staging(out), merge=True, last="split.json") as staging:  # the record last
        for case, image_path, label_path in tqdm(pairs, desc="convert", unit="volume", disable=not progress):
            image, label = _grid(case, image_path, label_path)
            volume, mask = voxels(image, image_path), map_labels(voxels(label, label_path, labels=True), kept)
            value_range, spacing = intensity_range(volume, window), slice_spacing(image, along)
            written = 0
            for index in range(volume.shape[along]):
                mask_slice = to_slice(mask, along, index)
                if not keep_empty and not mask_slice.any():
                    continue
                pixels = fit(to_pixels(to_slice(volume, along, index), value_range), spacing, size, False)
                name = f"{where[case]}/{case}_{'xyz'[along]}{index:03d}.png"
                write_png(np.round(pixels).astype(np.uint8), staging / "img" / name)
                write_png(fit(mask_slice, spacing, size, nearest=True), staging / "mask" / "all" / name)
                written += 1
            per_case[case] = {"split": where[case], "slices": written, "intensity_range": list(value_range)}

        # Percentile models map back to the typical range of the volumes they were trained on.
        ranges = [per_case[c]["intensity_range"] for c in splits["train"] or per_case]
        conversion = Conversion(kept, axis, size, window, tuple(float(v) for v in np.median(ranges, axis=0)))
        info = {"source": "segdiff.volumes", "class_names": conversion.class_names,
                "num_classes": len(conversion.class_names), "conversion": conversion.to_json()}  # fmt: skip
        record = {
            "class_names": conversion.class_names,
            "settings": {"images": str(images), "labels": str(labels), "split": list(split), "seed": seed,
                         "keep_empty": keep_empty, **conversion.to_json()},
            "cases": splits,
            "slices": {s: sum(v["slices"] for v in per_case.values() if v["split"] == s) for s in SPLITS},
            "per_case": per_case,
        }
        write_json(staging / "classes.json", info)
        write_json(staging / "split.json", record)
    return record
