"""The ruler for generated images: a segmenter trained on real images and masks, and its Dice.

Faithfulness, as the paper measures it (Konz et al., MICCAI 2024), needs a segmentation network trained on
REAL images and masks: it segments each generated image, and the Dice between what it finds and the
conditioning mask says how closely the image follows the mask (`segdiff.measure.quality` does that). This module is
the network, its training and the Dice itself.

    python -m segdiff.quality train-segmenter --img_dir D/img --seg_dir D/mask --num_classes 4 --img_size 64 --out S
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..choices import check_seed
from ..data.layout import SegDataset, read_image
from ..data.masks import check_mask
from ..errors import ArgumentError, CheckpointError, ImageError, MaskError
from ..files import staged_folder, write_json, write_png
from ..model.pipeline import default_device

CONFIG_FILE, WEIGHTS_FILE = "segmenter.json", "model.safetensors"


# ---- the network ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmenterConfig:
    """What rebuilds a segmenter; saved as `segmenter.json` beside its weights."""

    num_classes: int  # K, background 0 included
    img_channels: int = 1
    img_size: int = 64
    # Three poolings (64 px -> 8 px bottleneck), about 0.5 M parameters: on 64 px breast phantoms, 2000
    # steps of 16 reach test Dice 0.998 / 0.989 / 0.996 (half these widths: 0.997 / 0.976 / 0.993).
    widths: tuple[int, ...] = (16, 32, 64, 128)
    training: dict = field(default_factory=dict)  # data, steps, validation Dice, time

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(self.widths))
        if self.num_classes < 2:
            raise CheckpointError(f"segmenter num_classes={self.num_classes}, expected at least 2")
        step = 2 ** (len(self.widths) - 1)
        if self.img_size % step:
            raise CheckpointError(f"segmenter img_size={self.img_size}, expected a multiple of {step}")


def _block(c_in: int, c_out: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: a prediction must not depend on which other images share its batch.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(math.gcd(8, c_out), c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(math.gcd(8, c_out), c_out),
        nn.SiLU(),
    )


class Segmenter(nn.Module):
    """A compact UNet: images -> per-pixel class logits, and pooled features for KID."""

    def __init__(self, config: SegmenterConfig):
        super().__init__()
        self.config = config
        w = config.widths
        self.down = nn.ModuleList(
            [_block(config.img_channels, w[0])] + [_block(a, b) for a, b in itertools.pairwise(w)]
        )
        self.up = nn.ModuleList([_block(w[i + 1] + w[i], w[i]) for i in reversed(range(len(w) - 1))])
        self.head = nn.Conv2d(w[0], config.num_classes, 1)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        return skips  # full resolution first, bottleneck last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [-1, 1] -> (B, K, H, W) logits."""
        skips = self._encode(x)
        x = skips[-1]
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)

    # ---- use --------------------------------------------------------------------------------------------

    def _batches(self, x: torch.Tensor, batch_size: int):
        """(B, C, H, W) in [0, 1] -> batches in [-1, 1] at the segmenter's size: larger images (a multiple of
        it, as a cascade draws them) are shrunk by area averaging first, as its training images were made."""
        device, size = next(self.parameters()).device, self.config.img_size
        self.eval()
        for start in range(0, x.shape[0], batch_size):
            batch = x[start : start + batch_size].to(device)
            if batch.shape[-1] != size:
                batch = F.interpolate(batch, size=(size, size), mode="area")
            yield batch * 2 - 1

    @torch.no_grad()
    def predict(self, images, batch_size: int = 64) -> np.ndarray:
        """Images -> (B, H, W) int64 class ids, at the images' size.

        images: (B, H, W, C) numpy float in [0, 1] (the pipeline's output_type="np") or uint8, or
        (B, C, H, W) torch float in [0, 1]; a single image without the batch axis is accepted too. H = W =
        the segmenter's size or a multiple of it: larger images are read at its size and its class scores
        enlarged bilinearly to theirs.
        """
        x, out = self._as_tensor(images), []
        for batch in self._batches(x, batch_size):
            logits = self(batch)  # (B, K, h, w)
            if logits.shape[-2:] != x.shape[-2:]:
                logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
            out.append(logits.argmax(1).cpu())
        return torch.cat(out).numpy().astype(np.int64)

    @torch.no_grad()
    def features(self, images, batch_size: int = 64) -> np.ndarray:
        """Images (as `predict` takes them) -> (B, D) float64: every encoder level, globally average-pooled.

        D = sum(config.widths): early levels see texture and noise, the bottleneck sees anatomy.
        """
        out = [
            torch.cat([s.mean((2, 3)) for s in self._encode(x)], 1).cpu()
            for x in self._batches(self._as_tensor(images), batch_size)
        ]
        return torch.cat(out).double().numpy()

    def _as_tensor(self, images) -> torch.Tensor:
        """Accepted image layouts -> (B, C, H, W) float32 in [0, 1] on the CPU, checked against the config."""
        c, size = self.config.img_channels, self.config.img_size
        x, layout = image_batch(images)
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] != x.shape[3] or x.shape[2] % size:
            raise ImageError(
                f"images of shape {tuple(images.shape)}, expected {layout} with C={c}, H=W={size} "
                "(the segmenter's channels and size) or a multiple of that size"
            )
        return x

    def check_reads(self, num_classes: int, img_channels: int, img_size: int) -> None:
        """Raise CheckpointError unless this segmenter reads the images of a model drawing `num_classes`
        classes and `img_channels` channels at `img_size` px (its own size or a multiple of it)."""
        mine = self.config
        same = (mine.num_classes, mine.img_channels) == (num_classes, img_channels)
        if not same or img_size % mine.img_size:
            raise CheckpointError(
                f"the segmenter reads {mine.num_classes} classes, {mine.img_channels} channel(s) at "
                f"{mine.img_size} px; the model draws {num_classes} classes, {img_channels} channel(s) at "
                f"{img_size} px (a multiple of the segmenter's size is read at its size)"
            )

    # ---- files ------------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> None:
        """Write `segmenter.json` and `model.safetensors` to a temporary folder, then swap it in whole."""
        with staged_folder(folder) as staging:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, staging / WEIGHTS_FILE)
            write_json(staging / CONFIG_FILE, asdict(self.config))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> Segmenter:
        folder = Path(folder)
        config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not config_file.is_file() or not weights_file.is_file():
            raise CheckpointError(
                f"{folder}: not a segmenter folder (expected {CONFIG_FILE} and {WEIGHTS_FILE}; "
                "train one with `python -m segdiff.quality train-segmenter`)"
            )
        try:
            data = json.loads(config_file.read_text())
            known = set(SegmenterConfig.__dataclass_fields__)
            model = cls(SegmenterConfig(**{k: v for k, v in data.items() if k in known}))
            model.load_state_dict(load_file(weights_file))
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{folder}: cannot load the segmenter ({e})") from e
        return model.to(device).eval()


# ---- training ------------------------------------------------------------------------------------------


def image_batch(images) -> tuple[torch.Tensor, str]:
    """Images -> ((B, C, H, W) float32 in [0, 1] on the CPU, the layout's name for the caller's messages).

    images: (B, H, W, C) numpy float in [0, 1] (the pipeline's output_type="np") or uint8, or (B, C, H, W)
    torch float in [0, 1]; a single image without the batch axis is accepted too. Values are checked here,
    shapes by the caller, who knows the channels and sizes it reads.
    """
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        x = x[None] if x.ndim == 3 else x
        layout = "(B, C, H, W) torch"
    elif isinstance(images, np.ndarray):
        x = np.asarray(images)
        x = x / 255.0 if x.dtype == np.uint8 else x
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        x = x[None] if x.ndim == 3 else x
        x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x
        layout = "(B, H, W, C) numpy"
    else:
        raise ImageError(f"images of type {type(images).__name__}, expected a numpy array or a torch tensor")
    if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        raise ImageError(f"image values in [{x.min():.3g}, {x.max():.3g}], expected floats in [0, 1]")
    return x, layout


def _load_split(img_dir, seg_dir, split: str, num_classes: int, img_size: int, img_channels: int):
    """A split -> images (N, C, H, W) float32 in [0, 1], masks (N, H, W) int64."""
    data = SegDataset(img_dir, seg_dir, split, img_size, img_channels, num_classes)
    images = torch.stack([data[i]["image"] for i in range(len(data))]) / 2 + 0.5
    return images, torch.from_numpy(data.masks.astype(np.int64))


def _augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-right flips, contrast jitter and noise, so that the ruler also reads generated images.

    Vertical flips are left out: anatomy has an up (the chest wall is at the bottom of a breast MRI).
    """
    b = x.shape[0]
    flip = torch.rand(b, generator=g) < 0.5
    x, y = (
        torch.where(flip[:, None, None, None], x.flip(-1), x),
        torch.where(flip[:, None, None], y.flip(-1), y),
    )

    def uniform(low, high):
        return low + (high - low) * torch.rand(b, 1, 1, 1, generator=g)

    x = x.clamp(0, 1) ** uniform(0.8, 1.25) * uniform(0.9, 1.1) + uniform(-0.05, 0.05)
    x = x + uniform(0, 0.05) * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1), y


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice over the non-background classes (Dice keeps thin classes from vanishing)."""
    probs = logits.softmax(1)[:, 1:]  # (B, K-1, H, W)
    target = F.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter, total = (probs * target).sum((0, 2, 3)), (probs + target).sum((0, 2, 3))
    return F.cross_entropy(logits, y) + (1 - (2 * inter + 1) / (total + 1)).mean()


def train_segmenter(
    img_dir: str | Path,
    seg_dir: str | Path,
    num_classes: int,
    img_size: int,
    img_channels: int,
    out_dir: str | Path,
    *,
    steps: int = 2000,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    seed: int = 0,
    widths: Sequence[int] = SegmenterConfig.widths,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Segmenter:
    """Train a segmenter on the REAL images and masks of the 'train' split and save it to `out_dir`.

    AdamW with a cosine learning rate, cross-entropy + soft Dice. When a 'val' split exists, the weights
    with the best validation mean Dice are kept and that Dice is recorded in the config.
    """
    if steps < 1 or batch_size < 1:
        raise ArgumentError(f"steps={steps}, batch_size={batch_size}: expected integers >= 1")
    check_seed(seed, "seed")
    device = torch.device(device) if device else default_device()
    torch.manual_seed(seed)
    config = SegmenterConfig(num_classes, img_channels, img_size, tuple(widths))
    images, masks = _load_split(img_dir, seg_dir, "train", num_classes, img_size, img_channels)
    has_val = (Path(img_dir) / "val").is_dir()
    val = _load_split(img_dir, seg_dir, "val", num_classes, img_size, img_channels) if has_val else None

    model = Segmenter(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    warmup = min(100, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    g = torch.Generator().manual_seed(seed)
    evaluate_every = max(1, min(250, steps // 4))
    best, best_state, started = -1.0, None, time.time()
    bar = tqdm(range(1, steps + 1), desc="segmenter", disable=not progress)
    for step in bar:
        model.train()
        pick = torch.randint(len(images), (batch_size,), generator=g)
        x, y = _augment(images[pick], masks[pick], g)
        loss = _loss(model(x.to(device) * 2 - 1), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if val is not None and (step % evaluate_every == 0 or step == steps):
            score = mean_dice(model.predict(val[0]), val[1], num_classes)
            if score > best:
                best, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
            bar.set_postfix(loss=f"{loss.item():.3f}", val_dice=f"{score:.3f}")
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if best_state is not None:
        model.load_state_dict(best_state)
    training = {
        "img_dir": str(img_dir),
        "seg_dir": str(seg_dir),
        "train_images": len(images),
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "seconds": round(time.time() - started),
        "device": str(device),
    }
    if val is not None:
        training["val_dice"] = {
            str(c): round_score(v) for c, v in dice(model.predict(val[0]), val[1], num_classes).items()
        }
        training["val_mean_dice"] = round_score(best)
    model.config = SegmenterConfig(num_classes, img_channels, img_size, tuple(widths), training)
    model.save_pretrained(out_dir)
    return model.eval()


# ---- pseudo-labels -----------------------------------------------------------------------------------------


def pseudo_label(
    segmenter: Segmenter,
    images: Sequence[str | Path],
    out_dir: str | Path,
    size: int | None = None,
    batch_size: int = 64,
) -> Path:
    """Masks for images that have none, as self-training takes them: each image file of `images` segmented by
    `segmenter`, its (size, size) mask of class ids written to `out_dir` under the image's own name (the
    original layout pairs files by name): an 8-bit PNG, or a uint8 (H, W) array for `.npy` images.

    size: the px the images are read at (default: the segmenter's); a multiple of the segmenter's size is read
    at its size and the class scores enlarged, so masks can keep the stored images' size. The folder is
    written whole or not at all. -> out_dir
    """
    size, channels = size or segmenter.config.img_size, segmenter.config.img_channels
    with staged_folder(out_dir) as staging:
        for start in range(0, len(images), batch_size):
            paths = [Path(p) for p in images[start : start + batch_size]]
            decoded = [read_image(p, channels, size) for p in paths]  # (C, H, W) uint8, or float in [0, 1]
            x = np.stack([im / 255.0 if im.dtype == np.uint8 else im for im in decoded])  # (B, C, H, W)
            for path, mask in zip(paths, segmenter.predict(torch.from_numpy(x).float()), strict=True):
                if path.suffix.lower() == ".npy":
                    np.save(staging / path.name, mask.astype(np.uint8))
                else:
                    write_png(mask.astype(np.uint8), staging / path.name)
    return Path(out_dir)


# ---- Dice --------------------------------------------------------------------------------------------------


def labels(masks, what: str) -> np.ndarray:
    """Class-id masks (numpy or torch) as an int64 array; `what` names them in the error."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if not np.issubdtype(masks.dtype, np.integer):
        raise MaskError(f"{what}: dtype {masks.dtype}, expected integer class ids")
    return masks.astype(np.int64)


def dice(pred, target, num_classes: int, classes: Sequence[int] | None = None) -> dict[int, float]:
    """Per-class Dice of `pred` against `target` over a whole set, as the paper reports it.

    pred, target: (H, W) or (B, H, W) int class ids (numpy or torch). For class c,
    Dice = 2 * sum|P_c & T_c| / (sum|P_c| + sum|T_c|), the sums running over every pixel of every image (a
    set-level score: large and small instances weigh by their pixels, not one vote per image).
    `classes` defaults to 1..K-1: background is left out, it would inflate every mean. A class absent from
    both pred and target has no defined Dice: it maps to NaN, and `mean_dice` leaves it out.
    """
    pred, target = labels(pred, "pred"), labels(target, "target")
    if pred.shape != target.shape:
        raise MaskError(
            f"pred of shape {pred.shape} and target of shape {target.shape}, expected equal shapes"
        )
    check_mask(pred, num_classes, "pred")
    check_mask(target, num_classes, "target")
    classes = range(1, num_classes) if classes is None else classes
    # confusion[t, p] = pixels of true class t predicted as p, over the whole set
    confusion = np.bincount((target * num_classes + pred).ravel(), minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)
    inter, pred_sum, target_sum = np.diag(confusion), confusion.sum(0), confusion.sum(1)
    out = {}
    for c in classes:
        if not 0 <= c < num_classes:
            raise MaskError(f"class {c}, expected a class id 0..{num_classes - 1}")
        total = pred_sum[c] + target_sum[c]
        out[int(c)] = float(2 * inter[c] / total) if total else math.nan
    return out


def mean_dice(pred, target, num_classes: int, classes: Sequence[int] | None = None) -> float:
    """The mean of `dice` over the classes that have one (NaN when none has)."""
    values = [v for v in dice(pred, target, num_classes, classes).values() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def round_score(value: float) -> float | None:
    """A score as the cards and tables store it: 4 decimals, None for NaN (JSON has no NaN)."""
    return None if math.isnan(value) else round(float(value), 4)
