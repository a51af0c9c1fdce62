"""UNet presets and how a UNet is called: built, given its inputs, and a cascade's resizing.

A model is one stage or a cascade of two (Ho et al., 2021, *Cascaded Diffusion Models*; Saharia et al., 2022,
SR3): a base model draws the anatomy at low resolution, and an upscaler, conditioned on the mask and on the
base's image enlarged to full size, draws the fine detail. The upscaler's UNet has no attention, so it trains
on crops and runs on whole images, and it works on pixel-unshuffled inputs (Shi et al., 2016), so its first
convolutions run at half the image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from ..errors import CheckpointError
from .card import Upscaling

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


