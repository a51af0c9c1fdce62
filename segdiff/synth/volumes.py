"""Synthetic volumes: a model draws a label volume's slices, written back as NIfTI on the labels' grid.

Slices are cut, fitted and mapped to intensities as `segdiff.volumes` converted the training data, with the
settings it recorded in the data's classes.json and, through training, the model card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from tqdm.auto import tqdm

from .. import files
from ..choices import check_seed
from ..data.volumes import (
    AXES,
    SUFFIXES,
    Conversion,
    fit,
    from_slice,
    label_names,
    map_labels,
    parse_classes,
    read_volume,
    slice_spacing,
    to_slice,
    unfit,
    voxels,
)
from ..errors import VolumeError
from ..model.pipeline import DEFAULT_STEPS, SegDiffPipeline

_NOISE_SPAN = 8  # slices between independent noise anchors: neighbours' noise correlates at cos(pi/16) = 0.98


def recorded_conversion(pipe: SegDiffPipeline, data: str | os.PathLike | None, model: str) -> Conversion:
    """The conversion settings stored in the model card (by train_cli.py), else in `data`/classes.json."""
    if data is not None:
        path = Path(data) / "classes.json"
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise VolumeError(f"{path}: cannot read the conversion settings ({e})") from e
        source = str(path)
    else:
        info, source = pipe.card.training.get("data", {}), f"{model} (model card)"
    if "conversion" not in info:
        raise VolumeError(f"{source}: no conversion settings; train on a folder that `segdiff.volumes "
                          "convert` wrote, or pass --data OUT_DIR of that conversion")
    return Conversion.from_json(info["conversion"], source)


def slice_noise(count: int, shape: tuple[int, ...], seed: int, independent: bool) -> torch.Tensor:
    """(count, *shape) unit Gaussian noise, one per slice. Shared: slice k blends the anchors drawn every
    `_NOISE_SPAN` slices as cos(a) A_m + sin(a) A_m+1, still unit Gaussian, changing smoothly along the axis."""
    generator = torch.Generator().manual_seed(seed)
    if independent:
        return torch.randn((count, *shape), generator=generator)
    anchors = torch.randn((count // _NOISE_SPAN + 2, *shape), generator=generator)
    k = torch.arange(count)
    angle = ((k % _NOISE_SPAN).float() / _NOISE_SPAN * (torch.pi / 2)).view(-1, *(1,) * len(shape))
    return anchors[k // _NOISE_SPAN] * angle.cos() + anchors[k // _NOISE_SPAN + 1] * angle.sin()


def synthesize(
    model: str | os.PathLike,
    labels: str | os.PathLike,
    out: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    classes: str | None = None,
    names_file: str | os.PathLike | None = None,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 8,
    independent_noise: bool = False,
    progress: bool = False,
) -> dict:
    """Draw a volume over a label volume and write it as NIfTI with the labels' affine and header.

    Slices holding a kept class are drawn by the model; the others get the value of pixel 0 (the window's
    minimum). Returns {"path", "shape", "drawn", "slices", "intensity_range"}.
    """
    out = Path(out)
    if not out.name.endswith(SUFFIXES) or out.is_dir():
        raise VolumeError(f"{out}: expected a .nii or .nii.gz file name{', not a folder' * out.is_dir()}")
    if batch_size < 1 or steps < 1:
        raise VolumeError(f"--batch_size {batch_size}, --steps {steps}: expected both >= 1")
    check_seed(seed)
    if out.resolve() == Path(labels).resolve():
        raise VolumeError(f"{out}: the label volume itself; expected a new file name for the synthetic volume")
    pipe = SegDiffPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    conversion = recorded_conversion(pipe, data, str(model))
    kept = parse_classes(classes, label_names(labels, names_file)) if classes else conversion.classes
    if len(kept) + 1 != pipe.card.num_classes or pipe.card.img_channels != 1:
        raise VolumeError(
            f"{model}: a model of {pipe.card.num_classes} classes and {pipe.card.img_channels} image channels; "
            f"expected {len(kept) + 1} classes ({', '.join(c.name for c in kept)} and background) and 1 channel"
        )
    original = read_volume(Path(labels))
    label_image = nib.as_closest_canonical(original)
    mask = map_labels(voxels(label_image, Path(labels), labels=True), kept)
    axis, size = AXES[conversion.axis], pipe.card.img_size
    spacing, (low, high) = slice_spacing(label_image, axis), conversion.intensity_range
    drawn = [k for k in range(mask.shape[axis]) if np.take(mask, k, axis=axis).any()]
    noise = slice_noise(mask.shape[axis], (pipe.card.img_channels, size, size), seed, independent_noise)

    result = np.full(mask.shape, low, np.float32)
    bar = tqdm(total=len(drawn), desc="synthesize", unit="slice", disable=not progress)
    for start in range(0, len(drawn), batch_size):
        batch = drawn[start : start + batch_size]
        masks = np.stack([fit(to_slice(mask, axis, k), spacing, size, nearest=True) for k in batch])
        images = pipe(masks, num_inference_steps=steps, latents=noise[batch], output_type="np").images
        for k, image in zip(batch, images, strict=True):
            shape = to_slice(mask, axis, k).shape
            values = low + unfit(image[..., 0], shape, spacing) * (high - low)  # pixels [0, 1] -> intensities
            index = [slice(None)] * 3
            index[axis] = k
            result[tuple(index)] = from_slice(values)
        bar.update(len(batch))
    bar.close()

    # Back from RAS+ to the label file's own axes, so its affine and header describe the result.
    back = ornt_transform(axcodes2ornt("RAS"), io_orientation(original.affine))
    volume = apply_orientation(result, back).astype(np.float32)
    header = original.header.copy()
    header.set_data_dtype(np.float32)
    written = type(original)(volume, original.affine, header)
    written.header.set_slope_inter(1.0, 0.0)
    written.header["cal_min"], written.header["cal_max"] = low, high  # the display window, for viewers
    suffix = next(s for s in SUFFIXES if out.name.endswith(s))
    try:
        files.atomic(out, lambda tmp: nib.save(written, tmp), suffix=suffix)
    except OSError as e:
        raise VolumeError(
            f"{out}: cannot write it ({e.strerror}); expected a new file in a writable folder"
        ) from e
    return {"path": str(out), "shape": volume.shape, "drawn": len(drawn), "slices": mask.shape[axis],
            "intensity_range": (low, high), "window": conversion.window}
