"""Synthetic medical phantoms: anatomy-like masks and images written in the original data layout.

A case is drawn in two stages, as a scanner would see it.

1. Anatomy. Organs are smooth random closed curves (ellipses whose radius carries a few low harmonics
   with random phases), glandular tissue is thresholded smooth noise and vessels are random walks with
   momentum drawn as tubes. Every parameter is redrawn per case, so shapes vary case to case, and a case
   missing a class is redrawn.
   - ``breast`` (axial breast MRI, anterior up): one or two breast lobes resting on a chest-wall band at
     the bottom edge; fibroglandular tissue (FGT) as blobs gathered towards each lobe's centre; a few
     vessels running from the chest wall towards the nipple.
   - ``ct`` (axial contrast CT of the abdomen at kidney level, anterior up, the patient's right on the
     image's left): body with a subcutaneous fat ring and mottled bowel, liver, spleen, kidneys with
     cortex and medulla, vertebra, aorta.
2. Acquisition. Tissue levels vary case to case and inside a class (muscle, fat ring, kidney medulla),
   then come fine texture, partial-volume blur, a smooth multiplicative bias field (MRI) and Rician (MRI)
   or Gaussian (CT) noise. An image is therefore not a lookup table of its mask, while every class keeps
   its own contrast and place, so a small segmenter can find it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from ..choices import SPLITS, check_seed
from ..errors import ArgumentError
from ..files import write_json, write_png

MIN_SIZE, MAX_SIZE = 16, 1024
_MAX_TRIES = 50  # redraws before giving up on a case that keeps losing a class (rare below 24 px)

Grid = tuple[np.ndarray, np.ndarray]  # (yy, xx), each (size, size) float32 in (0, 1), y pointing down


@dataclass(frozen=True)
class Scanner:
    """How tissue levels become pixels; amplitudes are fractions of the full grey range."""

    bias: float  # std of the log bias field: coil sensitivity makes MRI brightness drift smoothly
    noise: float  # std of the acquisition noise
    rician: bool  # MRI magnitude images have Rician noise (brighter, non-negative background)
    texture: float  # std of multiplicative fine texture inside tissue


@dataclass(frozen=True)
class Family:
    """A phantom family: class names (index = class id, background first) and its anatomy generator.

    ``anatomy(size, rng)`` returns ``(mask, tissue)``: mask (size, size) uint8 class ids and tissue
    (size, size) float32 noise-free levels in [0, 1]; ``scanner`` turns tissue into an image.
    """

    name: str
    class_names: tuple[str, ...]
    anatomy: Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    scanner: Scanner

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def make(self, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One case: image (size, size) uint8 and mask (size, size) uint8 holding every class id."""
        min_pixels = max(1, size * size // 500)  # a class this small would be invisible to a segmenter
        for _ in range(_MAX_TRIES):
            mask, tissue = self.anatomy(size, rng)
            if np.bincount(mask.ravel(), minlength=self.num_classes).min() >= min_pixels:
                return _acquire(tissue, self.scanner, rng), mask
        raise RuntimeError(f"{self.name} phantom at size {size} px: a class vanished in {_MAX_TRIES} draws")


# --- shared drawing helpers ---------------------------------------------------------------------------


def _grid(size: int) -> Grid:
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    return yy, xx


def _noise(size: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth noise (size, size) float32 whose blobs span about size / cells px."""
    cells = int(np.clip(cells, 2, size))
    field = cv2.resize(rng.standard_normal((cells, cells)).astype(np.float32), (size, size),
                       interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _shape(grid: Grid, rng: np.random.Generator, centre: tuple[float, float], radii: tuple[float, float],
           wobble: float, angle: float = 0.0) -> np.ndarray:
    """Normalised radius of a randomly perturbed ellipse: 0 at the centre, 1 on the outline, > 1 outside.

    centre and radii are (y, x) in image fractions; the outline's radius carries harmonics 2..5 with
    random phases and amplitudes up to wobble / k, low enough to stay smooth and star-shaped.
    """
    dy, dx = grid[0] - centre[0], grid[1] - centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = (cos * dx + sin * dy) / radii[1], (cos * dy - sin * dx) / radii[0]
    k = np.arange(2, 6, dtype=np.float32)[:, None, None]
    amp = wobble * rng.uniform(0.3, 1.0, (4, 1, 1)).astype(np.float32) / k
    phase = rng.uniform(0, 2 * np.pi, (4, 1, 1)).astype(np.float32)
    outline = 1 + (amp * np.cos(k * np.arctan2(v, u) + phase)).sum(0)
    return np.hypot(u, v) / outline


def _walk(rng: np.random.Generator, start: tuple[float, float], heading: float, length: float,
          step: float = 0.01) -> np.ndarray:
    """A smooth random path (n, 2) of (y, x) image fractions: the turn rate itself wanders (momentum)."""
    turns = np.zeros(max(2, int(length / step)))
    for i in range(1, turns.size):  # one iteration per path point, not per pixel
        turns[i] = 0.7 * turns[i - 1] + rng.normal(0, 0.05)
    angles = heading + np.cumsum(turns)
    moves = step * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    return np.asarray(start) + np.cumsum(moves, axis=0)


def _tubes(size: int, paths: list[np.ndarray], width: float) -> np.ndarray:
    """Boolean (size, size) mask of the paths drawn as tubes about `width` px wide."""
    # cv2 rounds thickness to odd pixel counts (2 -> 3 px), so draw 4x larger and average down
    canvas = np.zeros((4 * size, 4 * size), np.uint8)
    points = [np.round(path[:, ::-1] * 4 * size).astype(np.int32) for path in paths]  # cv2 wants (x, y)
    cv2.polylines(canvas, points, isClosed=False, color=255, thickness=max(1, round(4 * width)))
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA) > 127


def _level(rng: np.random.Generator, low: float, high: float) -> float:
    """A tissue's mean level for this case: contrast varies between patients and protocols."""
    return float(rng.uniform(low, high))


def _acquire(tissue: np.ndarray, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """Noise-free tissue levels (size, size) float32 -> image (size, size) uint8."""
    size = tissue.shape[0]
    image = tissue * (1 + scanner.texture * _noise(size, rng, size // 3))
    image = cv2.GaussianBlur(image, (0, 0), 0.5 * max(1.0, size / 64))  # partial volume at tissue borders
    image = image * np.exp(scanner.bias * _noise(size, rng, 3))
    noise = scanner.noise * rng.standard_normal((2, size, size)).astype(np.float32)
    image = np.hypot(image + noise[0], noise[1]) if scanner.rician else image + noise[0]
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


# --- breast MRI ---------------------------------------------------------------------------------------


def _chest(grid: Grid, rng: np.random.Generator, wall: float) -> np.ndarray:
    """Chest: a wide ellipse below the image whose top arc is the chest wall at height `wall`."""
    depth = rng.uniform(0.28, 0.34)
    return _shape(grid, rng, (wall + depth, 0.5 + rng.normal(0, 0.02)), (depth, rng.uniform(0.6, 0.75)), 0.05)


def _breast_lobes(grid: Grid, rng: np.random.Generator, wall: float) -> np.ndarray:
    """Normalised radius of the nearest breast lobe; lobes hang forward (up) from the chest wall."""
    if rng.random() < 0.8:
        offset = rng.uniform(0.2, 0.25)
        centres = [0.5 - offset, 0.5 + offset]
        radii = (rng.uniform(0.27, 0.37), rng.uniform(0.18, 0.23))
    else:  # a single breast in view (unilateral scan or off-centre slice)
        centres = [rng.uniform(0.38, 0.62)]
        radii = (rng.uniform(0.3, 0.4), rng.uniform(0.24, 0.3))
    lobes = [_shape(grid, rng, (wall - rng.uniform(0.04, 0.1), x), radii, 0.15,
                    angle=np.sign(x - 0.5) * rng.uniform(0, 0.25)) for x in centres]
    return np.minimum.reduce(lobes)


def _fibroglandular(size: int, rng: np.random.Generator, lobes: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Dense tissue: smooth noise biased towards each lobe's centre, keeping a random share of the breast."""
    score = _noise(size, rng, rng.integers(7, 12)) + 1.2 * (1 - lobes)
    candidate = inside & (lobes < 0.85)  # a rim of subcutaneous fat stays between FGT and skin
    if not candidate.any():
        return candidate
    threshold = np.quantile(score[candidate], 1 - rng.uniform(0.25, 0.45))
    return candidate & (score > threshold)


def _breast_vessels(size: int, rng: np.random.Generator, lobes: np.ndarray, inside: np.ndarray,
                    wall: float) -> np.ndarray:
    """A few vessels from the chest wall towards the nipple, 2-3 px wide at 64 px."""
    ys, xs = np.nonzero(inside & (lobes < 0.8))
    if ys.size == 0:
        return np.zeros((size, size), bool)
    paths = []
    for _ in range(rng.integers(2, 5)):
        i = rng.integers(ys.size)
        start = (min(wall, ys[i] / size + rng.uniform(0.05, 0.15)), xs[i] / size)
        paths.append(_walk(rng, start, -np.pi / 2 + rng.normal(0, 0.5), rng.uniform(0.2, 0.4)))
    return _tubes(size, paths, rng.uniform(2, 3) * size / 64) & inside & (lobes < 0.95)


def _breast_anatomy(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    grid = _grid(size)
    wall = rng.uniform(0.7, 0.8)
    chest, lobes = _chest(grid, rng, wall), _breast_lobes(grid, rng, wall)
    breast, inside = lobes < 1, (lobes < 1) & (chest > 1.08)  # retromammary fat before the wall
    fgt = _fibroglandular(size, rng, lobes, inside)
    vessels = _breast_vessels(size, rng, lobes, inside, wall)

    mask = np.zeros((size, size), np.uint8)
    tissue = np.full((size, size), _level(rng, 0.0, 0.04), np.float32)
    mask[breast | (chest < 1)] = 1
    tissue[breast] = _level(rng, 0.5, 0.62)  # fat: bright on T1
    muscle = (chest < 1) & (chest > rng.uniform(0.85, 0.9))  # pectoralis along the wall, darker than fat
    tissue[chest < 1] = _level(rng, 0.25, 0.4) * (1 + 0.25 * _noise(size, rng, 6)[chest < 1])  # thorax
    tissue[muscle] = _level(rng, 0.15, 0.25)
    mask[fgt], tissue[fgt] = 3, _level(rng, 0.2, 0.32)
    mask[vessels], tissue[vessels] = 2, _level(rng, 0.88, 1.0)  # contrast-enhanced: brightest
    return mask, tissue


# --- abdominal CT -------------------------------------------------------------------------------------


def _kidney(grid: Grid, rng: np.random.Generator, centre: tuple[float, float], side: int) -> np.ndarray:
    """Normalised radius of one kidney, its long axis running from the spine forwards and outwards."""
    radii = (rng.uniform(0.075, 0.095), rng.uniform(0.045, 0.06))
    return _shape(grid, rng, centre, radii, 0.1, angle=side * rng.uniform(0.3, 0.6))


def _ct_anatomy(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    grid = _grid(size)
    cy, cx = 0.5 + rng.normal(0, 0.02), 0.5 + rng.normal(0, 0.02)
    ry, rx = rng.uniform(0.27, 0.33), rng.uniform(0.4, 0.46)
    body = _shape(grid, rng, (cy, cx), (ry, rx), 0.06)
    inside = body < rng.uniform(0.82, 0.9)  # organs stay inside the subcutaneous fat ring
    spine = (cy + 0.58 * ry, cx + rng.normal(0, 0.01))
    vertebra = np.minimum(_shape(grid, rng, spine, (0.055, 0.06), 0.05),  # body + spinous process
                          _shape(grid, rng, (spine[0] + 0.085, spine[1]), (0.045, 0.018), 0.05))
    organs = {  # class id -> normalised radius; later entries are painted over earlier ones
        2: _shape(grid, rng, (cy - 0.25 * ry, cx - 0.45 * rx), (rng.uniform(0.45, 0.6) * ry,
                  rng.uniform(0.35, 0.45) * rx), 0.15, angle=rng.uniform(-0.3, 0.3)),  # liver
        3: _shape(grid, rng, (cy + 0.1 * ry, cx + 0.62 * rx), (0.35 * ry, 0.18 * rx), 0.12,
                  angle=rng.uniform(0.3, 0.8)),  # spleen
        4: np.minimum(*[_kidney(grid, rng, (cy + 0.3 * ry, cx + s * 0.42 * rx), s) for s in (-1, 1)]),
        5: vertebra,
        6: _shape(grid, rng, (spine[0] - 0.1, spine[1] + 0.04), (rng.uniform(0.033, 0.043),) * 2, 0.03),
    }

    mask = np.zeros((size, size), np.uint8)
    tissue = np.zeros((size, size), np.float32)  # air is black on a CT window
    mask[body < 1], tissue[body < 1] = 1, _level(rng, 0.18, 0.28)  # subcutaneous fat
    bowel = inside & (_noise(size, rng, rng.integers(6, 10)) > rng.uniform(-0.5, 0.5))
    tissue[bowel] = _level(rng, 0.4, 0.5)  # bowel and muscle mottled with mesenteric fat
    levels = {2: (0.52, 0.62), 3: (0.56, 0.68), 4: (0.68, 0.8), 5: (0.85, 1.0), 6: (0.8, 0.95)}
    for class_id, radius in organs.items():
        region = (radius < 1) & inside
        mask[region], tissue[region] = class_id, _level(rng, *levels[class_id])
    medulla = (organs[4] < rng.uniform(0.45, 0.6)) & (mask == 4)
    tissue[medulla] *= rng.uniform(0.7, 0.85)  # cortex enhances before the medulla
    marrow = (vertebra < rng.uniform(0.6, 0.75)) & (mask == 5)
    tissue[marrow] *= rng.uniform(0.7, 0.8)  # cancellous bone inside the dense cortex
    return mask, tissue


FAMILIES: dict[str, Family] = {
    "breast": Family("breast", ("background", "breast", "vessels", "fibroglandular"), _breast_anatomy,
                     Scanner(bias=0.2, noise=0.03, rician=True, texture=0.08)),
    "ct": Family("ct", ("background", "body", "liver", "spleen", "kidneys", "spine", "aorta"), _ct_anatomy,
                 Scanner(bias=0.0, noise=0.03, rician=False, texture=0.05)),
}


# --- public API ---------------------------------------------------------------------------------------


def _checked(family: str, size: int) -> Family:
    if family not in FAMILIES:
        raise ArgumentError(f"unknown phantom family {family!r}, expected one of {sorted(FAMILIES)}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ArgumentError(f"phantom size {size}, expected {MIN_SIZE}..{MAX_SIZE} px")
    return FAMILIES[family]


def make_case(family: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One phantom case: image (size, size) uint8 and mask (size, size) uint8 of class ids 0..K-1."""
    return _checked(family, size).make(size, rng)


def write_dataset(out_dir: str | os.PathLike, *, family: str = "breast", size: int = 64, n_train: int = 800,
                  n_val: int = 64, n_test: int = 64, seed: int = 0, progress: bool = False) -> Path:
    """Write a phantom data set in the original layout and return its folder.

    Layout: ``img/{train,val,test}/case_NNNNN.png`` (greyscale "L"), ``mask/all/<split>/<same name>``
    (pixel = class id) and ``classes.json`` (family, class_names, num_classes). The case index runs on
    across splits, so names are unique. Case i depends only on (seed, i), not on the split sizes.
    """
    spec = _checked(family, size)  # before touching the disk
    check_seed(seed)
    counts = dict(zip(SPLITS, (n_train, n_val, n_test), strict=True))
    bad = {split: n for split, n in counts.items() if n < 0}
    if bad:
        raise ArgumentError(f"case counts {bad}, expected >= 0")
    out = Path(out_dir)
    folders = {split: (out / "img" / split, out / "mask" / "all" / split) for split in SPLITS}
    for folder in (f for pair in folders.values() for f in pair):
        if folder.is_dir() and any(folder.iterdir()):
            # stale cases from an earlier, larger run would silently join this data set
            raise FileExistsError(f"{folder} already holds files, expected an empty or new folder")

    seeds = np.random.SeedSequence(seed).spawn(sum(counts.values()))
    bar = tqdm(total=len(seeds), desc=f"{family} phantoms", unit="case", disable=not progress)
    index = 0
    for split, count in counts.items():
        img_dir, mask_dir = folders[split]
        img_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            image, mask = spec.make(size, np.random.default_rng(seeds[index]))
            name = f"case_{index:05d}.png"
            write_png(image, img_dir / name)  # readers never see a half-written file
            write_png(mask, mask_dir / name)
            index += 1
            bar.update()
    bar.close()
    info = {"family": family, "class_names": list(spec.class_names), "num_classes": spec.num_classes}
    write_json(out / "classes.json", info)
    return out
