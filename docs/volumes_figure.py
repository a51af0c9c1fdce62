"""README's volume figure: axial slices of a CT, the same slices drawn by a model over its labels.

    python docs/volumes_figure.py CT.nii.gz LABELS.nii.gz SYNTHETIC.nii.gz DATA_DIR   # writes docs/volumes.png

DATA_DIR is the folder `python -m segdiff.volumes convert` wrote: its classes.json gives the kept classes and
the window. Rows: the CT, the synthetic volume; kept classes outlined on both; four slices from inferior up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from segdiff.data.masks import Palette, overlay, tile
from segdiff.data.volumes import (
    AXES,
    Conversion,
    fit,
    map_labels,
    read_volume,
    slice_spacing,
    to_pixels,
    to_slice,
)

SIZE = 160  # px per slice in the figure


def main(ct: str, labels: str, synthetic: str, data: str) -> Path:
    info = json.loads((Path(data) / "classes.json").read_text())
    conversion = Conversion.from_json(info["conversion"], data)
    axis = AXES[conversion.axis]
    volumes = [nib.as_closest_canonical(read_volume(Path(p))) for p in (ct, labels, synthetic)]
    mask = map_labels(np.asarray(volumes[1].dataobj).astype(np.int64), conversion.classes)
    spacing = slice_spacing(volumes[1], axis)
    palette = Palette.default(len(info["class_names"]), info["class_names"])
    slices = np.linspace(0.15, 0.85, 4) * (mask.shape[axis] - 1)
    tiles = []
    for image in (volumes[0], volumes[2]):
        values = image.get_fdata(dtype=np.float32)
        for k in slices.round().astype(int):
            pixels = fit(to_pixels(to_slice(values, axis, k), conversion.intensity_range), spacing, SIZE, False)
            outline = fit(to_slice(mask, axis, k), spacing, SIZE, nearest=True)
            tiles.append(overlay(pixels.round().astype(np.uint8), outline, palette))
    out = Path(__file__).resolve().parent / "volumes.png"
    Image.fromarray(tile(tiles, columns=len(slices))).save(out)
    return out


if __name__ == "__main__":
    print(f"wrote {main(*sys.argv[1:5])}")
