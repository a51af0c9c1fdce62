"""UNet presets, how a UNet is called, and the model card that travels with every segdiff model folder.

A model is one stage or a cascade of two (Ho et al., 2021, *Cascaded Diffusion Models*; Saharia et al., 2022,
SR3): a base model draws the anatomy at low resolution, and an upscaler, conditioned on the mask and on the
base's image enlarged to full size, draws the fine detail. The upscaler's UNet has no attention, so it trains
on crops and runs on whole images, and it works on pixel-unshuffled inputs (Shi et al., 2016), so its first
convolutions run at half the image size.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from . import files, hubcard
from .errors import CheckpointError
from .masks import ENCODINGS, Encoding, Palette, encoding_channels

CARD_FILE = "segdiff_card.json"

# UNet2DModel settings by name. `paper` is the original code's network, unchanged, so that its
# checkpoints load; the smaller ones trade capacity for speed on a laptop CPU.
PRESETS: dict[str, dict] = {
    "paper": dict(  # about 114 M parameters
        layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    ),
    "base": dict(  # about 26 M: for 128-256 px on one GPU
        layers_per_block=2,
        block_out_channels=(64, 64, 128, 256, 256),
        down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 3,
    ),
    "medium": dict(  # about 10.7 M: `small`'s shape, twice as wide; 64 px models that follow masks closer
        layers_per_block=1,
        block_out_channels=(32, 64, 128, 256),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
    "small": dict(  # about 2.7 M: 64 px demo models, 4 images x 12 steps in under a second on two CPU cores
        layers_per_block=1,
        block_out_channels=(16, 32, 64, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
    "upscaler": dict(  # about 1.1 M: a cascade's second stage; no attention, so any image size runs
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
        add_attention=False,
        norm_num_groups=8,
    ),
    "tiny": dict(  # tests only
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
}


@dataclass(frozen=True)
class Upscaling:
    """How a cascade's upscaler reads its base model's images; recorded in the upscaler's card."""

    base: str = "base"  # the sub-folder holding the base model
    low_res_size: int = 64  # the base's img_size
    unshuffle: int = 2  # the UNet runs at img_size / unshuffle, on unshuffle^2 x the channels
    # Noise-conditioning augmentation (Ho et al., 2021): training noises the enlarged low-resolution image to
    # a level drawn from 0..max_noise_level, which the UNet is told, so that at sampling time, told
    # `noise_level`, it treats the base's image as a noisy hint, not as detail to copy, errors included.
    max_noise_level: int = 250
    noise_level: int = 100
    steps: int = 4  # the upscaler's sampling steps at the model's default settings
    scheduler: str = "dpm++"  # and its sampler, whatever the base's (benchmarks/upscaler_sampling.py)

    def __post_init__(self):
        if self.unshuffle < 1 or self.low_res_size < 1:
            raise CheckpointError(f"upscaling {self}: expected a positive low_res_size and unshuffle")
        if not 0 <= self.noise_level <= self.max_noise_level < 1000:
            raise CheckpointError(f"upscaling {self}: expected 0 <= noise_level <= max_noise_level < 1000")


@dataclass(frozen=True)
class Student:
    """A few-step student distilled from a model (`segdiff.distillation`); recorded in the teacher's card.

    The student's UNet, in `folder`/ beside the teacher's unet/, draws in `steps` DDIM steps on the "trailing"
    grid what the teacher draws in `teacher_steps` DDIM steps on the same grid.
    """

    steps: int = 2
    teacher_steps: int = 12
    folder: str = "student"
    method: str = "progressive distillation"  # Salimans & Ho, 2022; one round of teacher_steps / steps
    training: dict = field(default_factory=dict)  # command, steps, time, hardware

    def __post_init__(self):
        if not 1 <= self.steps <= self.teacher_steps or self.teacher_steps % self.steps:
            raise CheckpointError(
                f"student {self.steps} steps for a teacher's {self.teacher_steps}: expected a divisor of it"
            )


def build_unet(
    preset: str, img_size: int, img_channels: int, cond_channels: int, upscaling: Upscaling | None = None
) -> UNet2DModel:
    """A fresh UNet taking `img_channels + cond_channels` inputs and predicting `img_channels` of noise.

    An upscaler's UNet takes them pixel-unshuffled and is also told the noise level of its low-resolution
    input (diffusers' timestep class embedding).
    """
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}, expected one of {sorted(PRESETS)}")
    r = upscaling.unshuffle if upscaling else 1
    if img_size % r:
        raise CheckpointError(f"img_size {img_size}: an upscaler unshuffling by {r} needs a multiple of {r}")
    return UNet2DModel(
        sample_size=img_size // r,
        in_channels=(img_channels + cond_channels) * r * r,
        out_channels=img_channels * r * r,
        class_embed_type="timestep" if upscaling else None,
        **PRESETS[preset],
    )


def denoise(
    unet: UNet2DModel,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    upscaling: Upscaling | None = None,
    noise_level: torch.Tensor | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """The UNet's prediction for noisy images `x` (B, C, H, W) at timestep `t`, given `cond` (B, C_cond, H, W)
    (the encoded mask, after the enlarged low-resolution image for upscalers) -> (B, C, H, W)."""
    model_input = torch.cat([x, cond], dim=1)  # (B, C + C_cond, H, W)
    r = upscaling.unshuffle if upscaling else 1
    if r > 1:
        model_input = F.pixel_unshuffle(model_input, r)  # (B, (C + C_cond) r^2, H / r, W / r)
    if channels_last:
        model_input = model_input.contiguous(memory_format=torch.channels_last)
    prediction = unet(model_input, t, class_labels=noise_level).sample
    return F.pixel_shuffle(prediction, r) if r > 1 else prediction


def shrink(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) images -> (B, C, size, size) by area averaging: the base model's view of them."""
    return F.interpolate(images, size=(size, size), mode="area")


def shrink_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) class ids -> (B, size, size) by nearest neighbour at pixel centres, as masks load."""
    if masks.shape[-1] == size:
        return masks
    return F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0].long()


def low_res_condition(
    low: torch.Tensor, size: int, scheduler, level: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """A low-resolution image (B, C, h, w) in [-1, 1] -> the upscaler's input: enlarged to `size` (bicubic)
    and noised to `level` (B,) of the training schedule."""
    enlarged = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    return scheduler.add_noise(enlarged, noise, level)


@dataclass
class ModelCard:
    """What a model needs to be used well: its classes, input format, encoding, training and quality.

    Written as `segdiff_card.json` beside `unet/`, with the Hub's README.md rendered from it (`hubcard`);
    original checkpoints get one built from their config.
    """

    num_classes: int  # including background 0; 0 for unconditional models
    img_channels: int
    img_size: int
    encoding: Encoding = "onehot"
    class_names: list[str] = field(default_factory=list)
    colors: list[list[int]] = field(default_factory=list)
    preset: str | None = None
    training: dict = field(default_factory=dict)  # command, steps, time, hardware
    # Where the training images came from, for the credit their licence asks: name, source, licence,
    # citation, the changes made. Shown by the studio and kept with every copy of the model.
    dataset: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)  # measured Dice and realism, from segdiff.evaluation
    segmenter: str | None = None  # sub-folder holding the Dice segmenter, when the model has one
    upscale: dict = field(default_factory=dict)  # an upscaler's `Upscaling`; {} for one-stage models
    student: dict = field(default_factory=dict)  # its few-step `Student`; {} for models without one

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise CheckpointError(f"model card: encoding {self.encoding!r}, expected one of {ENCODINGS}")
        if self.num_classes and not self.class_names:
            palette = Palette.default(self.num_classes)
            self.class_names, self.colors = list(palette.names), [list(c) for c in palette.colors]
        if self.num_classes and not self.colors:
            self.colors = [list(c) for c in Palette.default(self.num_classes).colors]
        for name, record in (("upscale", "upscaling"), ("student", "distilled")):
            try:
                getattr(self, record)  # refuses a damaged record now, not mid-sampling
            except TypeError as e:
                raise CheckpointError(
                    f"model card: {name} {getattr(self, name)} is not a valid record ({e})"
                ) from e

    @property
    def guided(self) -> bool:
        return self.encoding != "none"

    @property
    def upscaling(self) -> Upscaling | None:
        return Upscaling(**self.upscale) if self.upscale else None

    @property
    def distilled(self) -> Student | None:
        return Student(**self.student) if self.student else None

    @property
    def last_training(self) -> dict:
        """The record of the model's last training run: its student's distillation, when it has one."""
        return self.student.setdefault("training", {}) if self.student else self.training

    @property
    def cond_channels(self) -> int:
        """Input channels beside the noisy image: the encoded mask, and an upscaler's low-resolution image."""
        low_res = self.img_channels if self.upscale else 0
        return low_res + encoding_channels(self.encoding, self.num_classes)

    @property
    def palette(self) -> Palette:
        return Palette(tuple(self.class_names), tuple(tuple(c) for c in self.colors))

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        text = json.dumps(asdict(self), indent=2)
        hubcard.write(folder, self)  # README.md, the model's page on the Hub, from the same facts
        files.write_text(folder / CARD_FILE, text)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ModelCard:
        path = Path(folder) / CARD_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read the model card ({e})") from e
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
