"""The constant background outside a scan's field of view, drawn exactly.

Scanners write one value where they image nothing: the black field around an ultrasound sector, air clipped to
the floor of a CT window, the zero padding of a resampled MRI slice. A diffusion model draws that field as dark
grain a few grey levels deep (the bundled 256 px PSFHS cascade: a median of 2/255 and a 90th percentile of
8/255 where its real images hold 0 and 1), and texture measures read the grain as tissue: FRD, whose
radiomics bin intensities at a twentieth of their standard deviation, put the cascade at 60 on 64 test masks,
and 8.3 once the field of each image was copied from its real scan (real-vs-real: 7.9).

`Background`, recorded in a model's card, says what the field holds and how to find it in a drawn image:
pixels darker than `below` after Gaussian smoothing over `smooth` px, at least `guard` px from every class of
the mask, and connected to the image border. `Background.apply` sets them to `value`. The model still decides
where its field of view ends; the anatomy its mask places, and dark tissue enclosed by brighter tissue, are
never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from ..errors import CheckpointError


@dataclass(frozen=True)
class Background:
    """A model's constant background (see the module's docstring); intensities in [0, 1], lengths in pixels
    of the model's images."""

    value: float = 0.0  # what the scanner writes outside its field of view
    below: float = 16 / 255  # the smoothed darkness under which a pixel may be field
    smooth: float = 2.0  # the Gaussian's sigma, so that grain does not break the field into specks
    guard: int = 5  # the distance kept from every mask class

    def __post_init__(self):
        if not (0 <= self.value <= 1 and 0 <= self.below <= 1 and self.smooth >= 0 and self.guard >= 0):
            raise CheckpointError(
                f"background {self}: expected value and below in [0, 1], smooth >= 0 and guard >= 0"
            )

    def field(self, grey: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """(H, W) bool: where the image `grey` (H, W) in [0, 1] shows the field, given its class ids `mask`
        (H, W) (None or all 0: no class to keep clear of)."""
        grey = grey.astype(np.float32)
        dark = (cv2.GaussianBlur(grey, (0, 0), self.smooth) if self.smooth else grey) <= self.below
        if mask is not None and mask.any():
            kernel = np.ones((2 * self.guard + 1,) * 2, np.uint8)
            dark &= ~cv2.dilate((mask > 0).astype(np.uint8), kernel).astype(bool)
        _, labels = cv2.connectedComponents(dark.astype(np.uint8), connectivity=4)
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        return np.isin(labels, edge[edge > 0])

    def apply(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """`images` (B, C, H, W) in [0, 1] with each one's field set to `value`, in every channel; `masks`
        (B, H, W) class ids at the images' size, or None for an unconditional model."""
        grey = images.float().mean(1).cpu().numpy()
        ids = [None] * len(grey) if masks is None else masks.cpu().numpy()
        field = np.stack([self.field(g, m) for g, m in zip(grey, ids, strict=True)])
        field = torch.from_numpy(field).to(images.device)[:, None].expand_as(images)
        return images.masked_fill(field, self.value)


def background_value(images: np.ndarray) -> float:
    """The value a set of scans holds outside their field of view: the most common intensity on their border
    rows and columns. images: (N, H, W) uint8."""
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=None)
    return float(np.bincount(border.astype(np.int64)).argmax() / 255)
