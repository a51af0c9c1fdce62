"""Masks: label maps of class ids, their colours, their encodings for the UNet, and what we do to them.

A `mask` is an (H, W) (or batched (B, H, W)) array of integer class ids 0..K-1, 0 being background.
This module holds arrays only; reading files is `segdiff.data.layout`'s job.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MaskError

Encoding = Literal["original", "onehot", "none"]
ENCODINGS: tuple[str, ...] = ("original", "onehot", "none")

# Background is black; then colours chosen to stay apart from each other and from black and white, so that
# anti-aliased strokes between two of them still snap back to one of the two.
_BASE_COLORS = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)


def _extra_color(i: int) -> tuple[int, int, int]:
    """Colours past the base list: golden-ratio hue steps at two brightness levels."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95 if i % 2 else 0.7)
    return round(r * 255), round(g * 255), round(b * 255)


@dataclass(frozen=True)
class Palette:
    """Class names and opaque RGB colours, indexed by class id (0 = background)."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    def __post_init__(self):
        if len(self.names) != len(self.colors):
            raise MaskError(f"palette has {len(self.names)} names but {len(self.colors)} colours")
        if len(set(self.colors)) != len(self.colors):
            raise MaskError(f"palette colours must be distinct, got {list(self.colors)}")

    @classmethod
    def default(cls, num_classes: int, names: Sequence[str] | None = None) -> Palette:
        if num_classes < 1:
            raise MaskError(f"num_classes={num_classes}, expected at least 1")
        names = (
            tuple(names) if names else ("background", *(f"class {i}" for i in range(1, num_classes)))
        )
        if len(names) != num_classes:
            raise MaskError(f"{len(names)} class names {list(names)} for num_classes={num_classes}")
        colors = [_BASE_COLORS[i] if i < len(_BASE_COLORS) else _extra_color(i) for i in range(num_classes)]
        return cls(names, tuple(colors))

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def hex(self, class_id: int) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.colors[class_id])

    def to_rgb(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) class ids -> (H, W, 3) uint8 colours."""
        return np.asarray(self.colors, dtype=np.uint8)[np.asarray(mask)]

    def to_labels(self, rgb: np.ndarray, alpha_threshold: int = 128, source: str = "mask") -> np.ndarray:
        """(H, W, 3|4) uint8 colours -> (H, W) int64 class ids by nearest palette colour.

        Painting tools anti-alias their strokes, so edge pixels are blends: each pixel snaps to the
        nearest colour, and pixels less opaque than `alpha_threshold` are background. An image more than
        a fifth of whose opaque pixels lie more than 16 levels from every palette colour is not a mask (a
        photo, say): MaskError.
        """
        rgb = np.asarray(rgb)
        opaque = rgb[..., 3] >= alpha_threshold if rgb.shape[-1] == 4 else np.ones(rgb.shape[:2], bool)
        channels = [rgb[..., c].astype(np.int32) for c in range(3)]
        # One class at a time, so memory per pixel stays the same for 4 classes or 40.
        nearest = np.full(rgb.shape[:2], np.iinfo(np.int32).max, np.int32)
        labels = np.zeros(rgb.shape[:2], np.int64)
        for k, color in enumerate(self.colors):
            dist2 = sum((channel - value) ** 2 for channel, value in zip(channels, color, strict=True))
            closer = dist2 < nearest
            labels[closer] = k
            np.minimum(nearest, dist2, out=nearest)
        # A mask's pixels are class colours, but for blends of two along its edges (a few percent of a painted
        # canvas; a tenth where thin strokes cover it). Most of a photo's are neither, though the dark ones
        # snap to black: an ultrasound photo tinted brown had 78% within 48 levels of black, 34% past 16 of all.
        far = (nearest > 16**2) & opaque
        if opaque.any() and far.sum() > 0.2 * opaque.sum():
            raise MaskError(
                f"{source}: {far.sum() / opaque.sum():.0%} of its pixels are far from every class colour; "
                f"expected a mask painted in the {self.num_classes} palette colours or holding class ids"
            )
        return np.where(opaque, labels, 0).astype(np.int64)


def labels_from_array(array: np.ndarray, palette: Palette, source: str = "mask") -> np.ndarray:
    """A decoded mask image -> (H, W) int64 class ids.

    Integer images (greyscale, or RGB whose channels agree) hold class ids directly, as the original
    code reads them; coloured images are snapped to `palette`. Values are not range-checked here, but
    anything that is not a whole real number (strings, records, complex, NaN, infinity, fractions) and
    empty arrays are refused by name, never cast into some class id.
    """
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":  # strings, objects, records, complex: no class ids in there
        raise MaskError(f"{source}: dtype {array.dtype}, expected integer class ids")
    if array.size == 0:
        raise MaskError(f"{source}: shape {tuple(array.shape)} holds no pixels, expected a 2-D label map (H, W)")
    if array.ndim == 3 and array.shape[-1] in (1, 2):  # grey, grey + alpha
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = array[..., :3]
        if (rgb == rgb[..., :1]).all():
            array = rgb[..., 0]
        else:
            return palette.to_labels(array, source=source)
    if array.ndim != 2:
        raise MaskError(f"{source}: shape {tuple(array.shape)}, expected a 2-D label map (H, W)")
    if array.dtype.kind == "f":
        for bad, what in ((np.isnan(array), "NaN (not a number)"), (np.isinf(array), "infinite values")):
            if bad.any():
                raise MaskError(f"{source}: {what} at {bad.sum()} pixel(s), expected integer class ids")
        if not np.array_equal(array, np.round(array)):
            fraction = array[array != np.round(array)].flat[0]
            raise MaskError(f"{source}: fractional value {fraction:g}, expected integer class ids")
    if array.dtype.kind in "fu":  # values past int64 would wrap into some other number when cast
        extreme = max(array.max(), array.min(), key=abs)
        if abs(extreme) > 2**62:
            raise MaskError(f"{source}: pixel value {extreme}, expected integer class ids")
    return array.astype(np.int64)


def check_mask(mask: np.ndarray | torch.Tensor, num_classes: int, source: str = "mask") -> None:
    """Raise MaskError naming the first value outside 0..num_classes-1."""
    values = mask.unique().tolist() if isinstance(mask, torch.Tensor) else np.unique(mask).tolist()
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise MaskError(
            f"{source}: pixel value {bad[0]}, "
            f"expected class ids 0..{num_classes - 1} (num_classes={num_classes})"
        )


def omit_classes(mask, classes: Iterable[int]):
    """Set the pixels of `classes` to background: the model is then free to invent them."""
    classes = list(classes)
    if not classes:
        return mask
    if isinstance(mask, torch.Tensor):
        return torch.where(torch.isin(mask, torch.tensor(classes, device=mask.device)), 0, mask)
    return np.where(np.isin(mask, classes), 0, mask)


def ablate(
    masks: torch.Tensor,
    num_classes: int,
    p: float = 0.5,
    generator: torch.Generator | None = None,
    per_example: bool = True,
) -> torch.Tensor:
    """Mask-ablated training: remove each non-background class with probability `p`.

    (B, H, W) int64 -> (B, H, W) int64. Removals are drawn per example; `per_example=False` draws one set
    for the whole batch, as the original code did. An image without a mask is the limit case, every class
    removed: training gives it the all-background mask, which this leaves as it is.
    """
    rows = masks.shape[0] if per_example else 1
    keep = torch.rand(rows, num_classes, generator=generator, device=generator.device if generator else None)
    keep = (keep.to(masks.device) >= p).expand(masks.shape[0], -1).clone()  # (B, K)
    keep[:, 0] = True
    kept = keep.gather(1, masks.flatten(1)).view_as(masks)
    return masks * kept


def encoding_channels(encoding: Encoding, num_classes: int) -> int:
    """How many UNet input channels the mask takes."""
    return {"original": 1, "onehot": max(num_classes - 1, 1), "none": 0}[encoding]


def encode(masks: torch.Tensor, encoding: Encoding, num_classes: int) -> torch.Tensor:
    """(B, H, W) int64 class ids -> (B, C, H, W) float32 UNet conditioning channels.

    `original`: one channel holding class_id / 255, bit for bit what the original code fed its models
    (ToTensor of an 8-bit mask). `onehot`: one 0/1 channel per non-background class, so classes differ by
    a whole unit instead of 1/255. `none`: unconditional models take no channel.
    """
    if encoding == "original":
        return masks[:, None].float() / 255
    if encoding == "onehot":
        if num_classes == 1:
            return torch.zeros_like(masks, dtype=torch.float32)[:, None]
        return F.one_hot(masks, num_classes)[..., 1:].permute(0, 3, 1, 2).float()
    if encoding == "none":
        return masks.new_zeros((masks.shape[0], 0, *masks.shape[1:]), dtype=torch.float32)
    raise MaskError(f"unknown mask encoding {encoding!r}, expected one of {ENCODINGS}")


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    palette: Palette,
    style: Literal["contour", "tint"] = "contour",
    alpha: float = 0.4,
) -> np.ndarray:
    """Draw `mask` over `image`: class outlines ("contour") or a translucent fill ("tint").

    image (H, W) or (H, W, C) uint8, mask (H, W) class ids -> (H, W, 3) uint8.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    out = np.ascontiguousarray(np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3])
    mask = np.asarray(mask)
    if style == "tint":
        fill = palette.to_rgb(mask).astype(np.float32)
        blended = (1 - alpha) * out + alpha * fill
        return np.where((mask > 0)[..., None], blended, out).round().astype(np.uint8)
    for class_id in np.unique(mask):
        if class_id == 0:
            continue
        contours, _ = cv2.findContours(
            (mask == class_id).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(out, contours, -1, palette.colors[class_id], thickness=1)
    return out


def tile(images: Sequence[np.ndarray], columns: int, pad: int = 2) -> np.ndarray:
    """Equal-size (H, W, 3) uint8 images -> one (rows * H, columns * W, 3) grid, filled row by row."""
    h, w = images[0].shape[:2]
    rows = -(-len(images) // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            image
        )
    return grid


# ---- deformation: new masks from real ones -------------------------------------------------------------


@dataclass(frozen=True)
class Deformation:
    """Bounds of a random, plausible warp of a mask: an affine about the centre, then a smooth elastic field.

    Rotation, scale and shift are drawn uniformly within +-bounds. The elastic field is a `grid` x `grid`
    lattice of Gaussian displacements upsampled bicubically to the mask, so neighbouring pixels move together;
    its spacing (a third of the side) is many times the displacements, so the warp never folds.
    """

    rotate: float  # degrees
    scale: float  # relative: 0.08 draws a zoom in 0.92..1.08
    shift: float  # fraction of the side, along each axis
    elastic: float  # standard deviation of the lattice displacements, fraction of the side
    grid: int = 4


# mild: what a probe or a patient moving a little would show; strong: clearly new anatomy, still believable.
DEFORMATIONS = {
    "mild": Deformation(rotate=10.0, scale=0.08, shift=0.05, elastic=0.02),
    "strong": Deformation(rotate=20.0, scale=0.15, shift=0.10, elastic=0.04),
}
DEFORM_LEVELS = ("none", *DEFORMATIONS)  # mildest first: a mask that loses a class falls back one level
MIN_KEPT_AREA = 0.5  # a deformed mask keeps a class when at least this fraction of its pixels survives


def deform(mask: np.ndarray, deformation: Deformation, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """(H, W) class ids -> (the warped mask, same shape and dtype; the parameters drawn, JSON-ready).

    Each class present is warped as its own 0/1 channel with bilinear sampling, and every pixel takes the
    class of the largest value (one-hot argmax): boundaries stay smooth, and two classes can neither overlap
    (one id per pixel) nor tear apart (the warp is smooth and one-to-one). Past the edge the edge continues:
    anatomy cut by the field of view goes on beyond it.
    """
    mask = np.asarray(mask)
    h, w = mask.shape
    angle = rng.uniform(-deformation.rotate, deformation.rotate)
    zoom = 1 + rng.uniform(-deformation.scale, deformation.scale)
    shift = rng.uniform(-deformation.shift, deformation.shift, 2) * (w, h)  # (x, y) px
    lattice = rng.normal(0, deformation.elastic, (2, deformation.grid, deformation.grid)).astype(np.float32)

    # forward: source pixel -> output pixel; the output samples the source through its inverse
    forward = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, zoom)
    forward[:, 2] += shift
    inverse = cv2.invertAffineTransform(forward)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    field_x = cv2.resize(lattice[0] * w, (w, h), interpolation=cv2.INTER_CUBIC)
    field_y = cv2.resize(lattice[1] * h, (w, h), interpolation=cv2.INTER_CUBIC)
    map_x = (inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2] + field_x).astype(np.float32)
    map_y = (inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2] + field_y).astype(np.float32)

    classes = np.unique(mask)
    channels = [
        cv2.remap(
            (mask == c).astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        for c in classes
    ]
    warped = classes[np.argmax(np.stack(channels), axis=0)].astype(mask.dtype)
    drawn = {
        "rotate_deg": round(float(angle), 3),
        "scale": round(float(zoom), 4),
        "shift_px": [round(float(v), 3) for v in shift],
        "elastic_max_px": round(float(np.abs(np.stack([field_x, field_y])).max()), 3),
    }
    return warped, drawn


def keeps_classes(source: np.ndarray, warped: np.ndarray) -> bool:
    """Whether `warped` holds every class of `source`, each with at least MIN_KEPT_AREA of its pixels."""
    ids, counts = np.unique(source, return_counts=True)
    after = dict(zip(*np.unique(warped, return_counts=True), strict=True))
    return all(after.get(c, 0) >= MIN_KEPT_AREA * n for c, n in zip(ids, counts, strict=True))


def deform_keeping_classes(
    mask: np.ndarray, level: str, rng: np.random.Generator, tries: int = 10
) -> tuple[np.ndarray, dict]:
    """`deform` at `level` ("none", "mild", "strong") until the result `keeps_classes` of `mask`.

    After `tries` failed draws the next milder level is tried, down to "none" (the mask unchanged). Returns
    the mask and a JSON-ready record: the level asked and used, the draws it took and the parameters.
    """
    if level not in DEFORM_LEVELS:
        raise MaskError(f"deformation {level!r}, expected one of {DEFORM_LEVELS}")
    for used in reversed(DEFORM_LEVELS[1 : DEFORM_LEVELS.index(level) + 1]):
        for attempt in range(1, tries + 1):
            warped, drawn = deform(mask, DEFORMATIONS[used], rng)
            if keeps_classes(mask, warped):
                return warped, {"asked": level, "used": used, "draws": attempt, **drawn}
    return np.array(mask, copy=True), {"asked": level, "used": "none"}


def deformation_bounds() -> dict[str, dict]:
    """Each level's bounds, as a manifest records them."""
    return {name: asdict(d) for name, d in DEFORMATIONS.items()}
