"""The original code's data layout: discovery, validation and a dataset that decodes each file once.

    IMG_DIR/{train,val,test}/<name>              1- or 3-channel images, or .npy (C, H, W) arrays
    SEG_DIR/<segtype>/{train,val,test}/<name>    masks of class ids, the same file names as the images

Several segtype folders merge into one mask: a pixel takes the first non-zero id in sorted folder order.
Images without masks (`UnlabelledDataset`) sit in a folder of their own, DIR/train/ or DIR itself.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..choices import SPLITS
from ..errors import DataLayoutError
from .masks import Palette, check_mask, labels_from_array

DATA_INFO = "classes.json"  # beside img/ and mask/: class names, and how volumes were converted


@dataclass(frozen=True)
class Case:
    """One example: its file name, image path (None for mask-only sets) and one mask path per segtype."""

    name: str
    image: Path | None
    masks: tuple[Path, ...]


# What file managers leave in folders they show (besides dotfiles such as .DS_Store): never a case.
LITTER = frozenset({"Thumbs.db", "ehthumbs.db", "desktop.ini"})


def _listing(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataLayoutError(f"{folder}: missing {what} folder")
    files = {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name not in LITTER
    }
    if not files:
        raise DataLayoutError(f"{folder}: the {what} folder is empty")
    return files


def _unmatched(names: set[str], where: Path, other: Path) -> str:
    first = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
    return f"{len(names)} file(s) in {where} have no match of the same name in {other}: {first}"


def segtypes(seg_dir: str | os.PathLike) -> list[str]:
    """The segtype folders of `seg_dir` in the order they are merged (sorted)."""
    seg_dir = Path(seg_dir)
    if not seg_dir.is_dir():
        raise DataLayoutError(
            f"{seg_dir}: no such mask folder (expected SEG_DIR/<segtype>/{{train,val,test}}/)"
        )
    found = sorted(p.name for p in seg_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataLayoutError(f"{seg_dir}: no segtype folder inside (expected e.g. {seg_dir}/all/train/)")
    return found


def find_cases(
    img_dir: str | os.PathLike | None, seg_dir: str | os.PathLike | None, split: str
) -> list[Case]:
    """Pair images and masks of one split by file name, or list either alone; errors name what is off."""
    if img_dir is None and seg_dir is None:
        raise DataLayoutError("neither an image folder nor a mask folder was given")
    images = _listing(Path(img_dir) / split, "image") if img_dir is not None else None
    per_type = []
    if seg_dir is not None:
        for segtype in segtypes(seg_dir):
            folder = Path(seg_dir) / segtype / split
            masks = _listing(folder, "mask")
            if images is not None:
                if extra := set(images) - set(masks):
                    raise DataLayoutError(_unmatched(extra, Path(img_dir) / split, folder))
                if extra := set(masks) - set(images):
                    raise DataLayoutError(_unmatched(extra, folder, Path(img_dir) / split))
            elif per_type and set(masks) != set(per_type[0]):
                raise DataLayoutError(_unmatched(set(masks) ^ set(per_type[0]), folder, Path(seg_dir)))
            per_type.append(masks)
    names = sorted(images if images is not None else per_type[0])
    return [
        Case(name, images[name] if images is not None else None, tuple(m[name] for m in per_type))
        for name in names
    ]


def data_info(
    img_dir: str | os.PathLike | None, seg_dir: str | os.PathLike | None, num_classes: int | None = None
) -> dict:
    """The data set's `classes.json` (segdiff.phantoms and segdiff.volumes write one above IMG_DIR and
    SEG_DIR): its class names, background first, and how volumes were converted; {} when there is none.

    A file naming another number of classes than `num_classes` is refused: the names would be wrong.
    """
    found = [Path(d).parent / DATA_INFO for d in (seg_dir, img_dir) if d is not None]
    path = next((p for p in found if p.is_file()), None)
    if path is None:
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataLayoutError(f"{path}: cannot read the class names ({e})") from e
    names = info.get("class_names") if isinstance(info, dict) else None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise DataLayoutError(f"{path}: expected a JSON object whose class_names lists names, background first")
    if num_classes and len(names) != num_classes:
        raise DataLayoutError(
            f"{path}: names {len(names)} classes ({', '.join(names)}), but --num_segmentation_classes is "
            f"{num_classes}; pass {len(names)}, or --class_names"
        )
    return info


def read_mask(
    path: str | os.PathLike,
    num_classes: int,
    palette: Palette | None = None,
    size: int | None = None,
) -> np.ndarray:
    """A mask file -> (H, W) int64 class ids, validated against `num_classes`.

    Integer PNGs (any bit depth) and `.npy` label maps hold ids directly; palette-mode PNGs hold ids as
    palette indices; coloured PNGs snap to `palette` (the model's). `size` resizes by nearest neighbour.
    """
    path = Path(path)
    palette = palette or Palette.default(num_classes)
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with PIL.Image.open(path) as im:
                array = np.asarray(im if im.mode in ("L", "P", "I", "I;16", "1") else im.convert("RGBA"))
    except (OSError, ValueError, SyntaxError) as e:
        raise DataLayoutError(f"{path}: cannot read the mask ({e})") from e
    if array.ndim == 3 and array.shape[0] == 1 and path.suffix.lower() == ".npy":
        array = array[0]  # (1, H, W) label maps, as some tools save them
    mask = labels_from_array(array, palette, source=str(path))
    check_mask(mask, num_classes, source=str(path))
    if size is not None and mask.shape != (size, size):
        mask = np.asarray(PIL.Image.fromarray(mask.astype(np.uint8)).resize((size, size), PIL.Image.NEAREST))
    return mask.astype(np.int64)


def read_image(path: str | os.PathLike, channels: int, size: int) -> np.ndarray:
    """An image file -> (C, H, W) array: uint8 for PIL-readable images, float32 in [0, 1] for `.npy`.

    1 channel reads as greyscale ("L"), 3 as RGB, any other count must be a `.npy` (C, H, W) array.
    Images resize bilinearly and `.npy` arrays by nearest neighbour, as the original code did.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            if channels not in (1, 3):
                raise DataLayoutError(f"{path}: {channels}-channel images must be .npy (C, H, W) arrays")
            with PIL.Image.open(path) as im:
                im = _eight_bit(im, path).convert("L" if channels == 1 else "RGB")
                im = im.resize((size, size), PIL.Image.BILINEAR)
                return np.asarray(im).reshape(size, size, channels).transpose(2, 0, 1).copy()
    except DataLayoutError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise DataLayoutError(f"{path}: cannot read the image ({e})") from e
    if array.ndim != 3 or array.shape[0] != channels:
        raise DataLayoutError(
            f"{path}: array of shape {array.shape}, expected ({channels}, H, W) for --num_img_channels {channels}"
        )
    if array.dtype == np.uint8:
        array = array / 255.0
    elif not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise DataLayoutError(
            f"{path}: values in [{array.min():.3g}, {array.max():.3g}], expected uint8 or floats in [0, 1]"
        )
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return F.interpolate(tensor, size=(size, size), mode="nearest")[0].numpy()


def _eight_bit(im: PIL.Image.Image, path: Path) -> PIL.Image.Image:
    """A 16-bit, 32-bit or float greyscale image as 8 bits ("L"), exactly, or refused in words: integers must lie
    in 0..255 and floats in [0, 1] (as `.npy` images), else PIL's conversion would clip them, silently."""
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    scale, expected = (255, "[0, 1]") if im.mode == "F" else (1, "0..255")
    low, high = im.getextrema()
    if low < 0 or high * scale > 255:
        raise DataLayoutError(
            f"{path}: {im.mode} pixels with values {low:g}..{high:g}, expected {expected}: converting them to "
            "the 8 bits images are read as would clip them. Window the image to 8 bits first (the same window for "
            "every image)"
        )
    return PIL.Image.fromarray(np.rint(np.asarray(im, np.float64) * scale).astype(np.uint8), "L")


def image_format(path: str | os.PathLike) -> tuple[int, int, int]:
    """An image (or mask) file's stored (H, W, channels), from its header: what `read_image` resizes away.
    `.npy` arrays are (C, H, W), or (H, W) with one channel."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            return (*shape[-2:], shape[0] if len(shape) == 3 else 1) if len(shape) in (2, 3) else (0, 0, 0)
        with PIL.Image.open(path) as im:
            return im.height, im.width, len(im.getbands())
    except (OSError, ValueError, SyntaxError) as e:
        raise DataLayoutError(f"{path}: cannot read the image ({e})") from e


def _as_tensor(image: np.ndarray) -> torch.Tensor:
    """A decoded image (uint8, or float32 in [0, 1]) -> (C, H, W) float32 in [-1, 1]."""
    if image.dtype == np.uint8:
        return torch.from_numpy(image).float() / 127.5 - 1  # ToTensor + Normalize(0.5, 0.5)
    return torch.from_numpy(image) * 2 - 1


class SegDataset(torch.utils.data.Dataset):
    """Images in [-1, 1] and their masks, decoded and validated once when the dataset is built.

    Items: {"image": (C, H, W) float32 in [-1, 1] (zeros for mask-only sets), "mask": (H, W) int64, "name"}.
    """

    def __init__(
        self,
        img_dir: str | os.PathLike | None,
        seg_dir: str | os.PathLike | None,
        split: str,
        img_size: int,
        img_channels: int = 1,
        num_classes: int = 0,
        palette: Palette | None = None,
        workers: int = 8,
    ):
        if split not in SPLITS:
            raise DataLayoutError(f"split {split!r}, expected one of {SPLITS}")
        if seg_dir is not None and num_classes < 2:
            raise DataLayoutError(f"num_classes={num_classes}, expected at least 2 (background + one class)")
        self.cases = find_cases(img_dir, seg_dir, split)
        self.img_size, self.img_channels, self.num_classes = img_size, img_channels, num_classes
        self.palette = palette
        # Decoding releases the GIL in PIL and numpy, so threads decode in parallel.
        with ThreadPoolExecutor(workers) as pool:
            decoded = list(pool.map(self._decode, self.cases))
        self.images = [image for image, _ in decoded]
        self.masks = np.stack([mask for _, mask in decoded])  # (N, H, W) uint8

    def _decode(self, case: Case) -> tuple[np.ndarray | None, np.ndarray]:
        image = read_image(case.image, self.img_channels, self.img_size) if case.image else None
        mask = np.zeros((self.img_size, self.img_size), np.int64)
        for path in case.masks:  # first non-zero wins, in sorted segtype order
            layer = read_mask(path, self.num_classes, self.palette, size=self.img_size)
            if case.image:
                _check_aligned(case.image, path)
            mask = np.where(mask == 0, layer, mask)
        return image, mask.astype(np.uint8 if self.num_classes <= 256 else np.int64)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        image, size = self.images[i], self.img_size
        return {
            "image": torch.zeros(self.img_channels, size, size) if image is None else _as_tensor(image),
            "mask": torch.from_numpy(self.masks[i].astype(np.int64)),
            "name": self.cases[i].name,
        }


class UnlabelledDataset(torch.utils.data.Dataset):
    """Images without masks, to train beside the labelled ones as examples with every class ablated.

    Read from `folder`/train/ when there is one (its val/ and test/ are not read), else from the files in
    `folder`. Refused, naming the file: a name that is also a labelled image's (in any split of `img_dir`: an
    image trains with its mask or without, and test images not at all), an image no labelled one matches in
    stored size and channels, and a file that does not decode. Items as SegDataset's, the mask all background:
    {"image": (C, H, W) float32 in [-1, 1], "mask": (H, W) int64 zeros, "name"}.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        img_dir: str | os.PathLike,
        img_size: int,
        img_channels: int = 1,
        workers: int = 8,
    ):
        folder = Path(folder)
        files = _listing(folder / "train" if (folder / "train").is_dir() else folder, "unlabelled image")
        _refuse_labelled_names(files, Path(img_dir))
        self.img_size, self.img_channels = img_size, img_channels
        self.source = Path(img_dir) / "train"
        self.formats: dict[tuple[int, int], set[int]] = {}  # the labelled images' stored (H, W): channels
        for case in find_cases(img_dir, None, "train"):
            height, width, channels = image_format(case.image)
            self.formats.setdefault((height, width), set()).add(channels)
        self.names = sorted(files)
        with ThreadPoolExecutor(workers) as pool:
            self.images = list(pool.map(self._decode, (files[name] for name in self.names)))

    def _decode(self, path: Path) -> np.ndarray:
        image = read_image(path, self.img_channels, self.img_size)  # names a file that does not decode
        height, width, channels = image_format(path)
        expected = self.formats.get((height, width))
        if expected is None:
            sizes = sorted(f"{w}x{h}" for h, w in self.formats)
            raise DataLayoutError(
                f"{path}: {width}x{height} pixels, expected the size of the labelled images in {self.source} "
                f"({', '.join(sizes[:3])}{', ...' if len(sizes) > 3 else ''})"
            )
        if channels not in expected:
            raise DataLayoutError(
                f"{path}: {channels} channel(s), expected {' or '.join(map(str, sorted(expected)))} as the "
                f"labelled images of its size in {self.source}"
            )
        return image

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        mask = torch.zeros(self.img_size, self.img_size, dtype=torch.int64)  # every class ablated
        return {"image": _as_tensor(self.images[i]), "mask": mask, "name": self.names[i]}


def _check_aligned(image: Path, mask: Path) -> None:
    """Refuse a mask whose shape is not its image's: both are resized to the square model size, so a mask may be
    a scaled copy (half the pixels each way), but one of another aspect would not line up with its image."""
    (h, w, _), (mh, mw, _) = image_format(image), image_format(mask)
    if abs(h * mw - mh * w) > 0.01 * max(h * mw, mh * w):
        raise DataLayoutError(
            f"{mask}: {mw}x{mh} pixels, but its image {image} is {w}x{h}: a mask must have its image's shape "
            "(or be a scaled copy of it), else the two do not line up"
        )


def _refuse_labelled_names(files: dict[str, Path], img_dir: Path) -> None:
    for split in SPLITS:
        folder = img_dir / split
        shared = sorted(set(files) & {p.name for p in folder.iterdir()}) if folder.is_dir() else []
        if shared:
            more = f" and {len(shared) - 1} more" if len(shared) > 1 else ""
            raise DataLayoutError(
                f"{files[shared[0]]}{more}: the same file name as the labelled image {folder / shared[0]}; "
                "an image trains with its mask or without (and test images not at all): remove one copy"
            )
