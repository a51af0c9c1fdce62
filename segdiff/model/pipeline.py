"""SegDiffPipeline: sample images that follow a segmentation mask, from segdiff or original checkpoints.

Sampling (Konz et al., MICCAI 2024): start from Gaussian noise; at every step concatenate the encoded
mask to the noisy image, predict the noise, and step the scheduler on the image channels only.

Mask guidance (`guidance_scale` > 1) is classifier-free guidance (Ho & Salimans, 2022) with the blank mask as
the unconditional input: a model trained with mask ablation has learned the all-background mask as "any
anatomy", so eps = eps(blank) + w * (eps(mask) - eps(blank)) pushes each image towards its mask. It costs a
second UNet pass per step.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    ImagePipelineOutput,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from ..choices import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    MAX_GUIDANCE,
    PRECISION_ALIASES,
    PRECISIONS,
    SAMPLERS,
    Precision,
    is_guidance,
)
from ..data.layout import read_mask
from ..data.masks import check_mask, encode, omit_classes
from ..errors import ArgumentError, CheckpointError, MaskError
from ..files import clean_interrupted_saves, staged_folder
from ..resolve import model_folder
from .card import CARD_FILE, ModelCard, Upscaling
from .unet import denoise, low_res_condition, shrink, shrink_masks

# Multistep samplers start at t = T-1 ("linspace") and, like DDIM's clip_sample, keep each step's x0
# estimate inside the image range: without it, pixel-space models extrapolate to saturated noise at few
# steps. With sample_max_value 1, dynamic thresholding is exactly clipping x0 to [-1, 1].
_MULTISTEP = {"timestep_spacing": "linspace", "thresholding": True, "sample_max_value": 1.0}


class _ClipX0:
    """Dynamic thresholding with sample_max_value 1 clamps each image's |x0| quantile to [1, 1], so it is
    exactly clipping x0 to [-1, 1]: the same numbers without the quantile, a few percent of a CPU step."""

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        if self.config.sample_max_value != 1.0:
            return super()._threshold_sample(sample)
        return sample.clamp(-1.0, 1.0)


class _DPMSolverPlusPlus(_ClipX0, DPMSolverMultistepScheduler):
    pass


class _UniPC(_ClipX0, UniPCMultistepScheduler):
    pass


# Sampler name -> (scheduler class, settings over the model's own scheduler config).
SCHEDULERS: dict[str, tuple[type, dict]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "dpm++": (_DPMSolverPlusPlus, {"algorithm_type": "dpmsolver++", "solver_order": 2, **_MULTISTEP}),
    "unipc": (_UniPC, _MULTISTEP),
}
assert set(SCHEDULERS) == set(SAMPLERS)
def student_scheduler(schedule) -> DDIMScheduler:
    """The sampler a student (and its teacher, while distilling) steps with: deterministic DDIM over the model's
    noise `schedule`, on the trailing grid, its last step going to t = -1 (alpha_bar = 1), x0 clipped."""
    config = {k: v for k, v in schedule.config.items() if k != "_use_default_values"}
    return DDIMScheduler.from_config(
        config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=True, thresholding=False
    )


DEFAULT_SCHEDULER = DEFAULT_SAMPLER  # by the public word, "scheduler"
ORIGINAL_PIPELINES = ("SegGuidedDDIMPipeline", "SegGuidedDDPMPipeline", "DDIMPipeline", "DDPMPipeline")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The dtype to autocast to, or None for plain fp32.

    "auto": bf16 on GPUs that have it, else fp16; on CPUs bf16 only where oneDNN runs it on AMX tiles:
    emulated bf16 on an AVX2 CPU is several times slower than fp32, and AVX512-BF16 alone was slower too.
    """
    if precision == "fp32":
        return None
    if precision != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN computes bf16 on AMX tiles here.

    Without AMX, bf16 autocast is slower than fp32 (benchmarks/sample_speed.py; docs/benchmarks.md), as on a
    CPU whose oneDNN is held to AVX512-BF16 (`ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`). torch's AMX probe reads
    the CPU, not that cap, so the cap oneDNN obeys is read here too.
    """
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return (
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
        and torch.cpu._is_amx_tile_supported()
        and (cap == "ALL" or "AMX" in cap)
    )


class SegDiffPipeline(DiffusionPipeline):
    """Segmentation-guided sampling with any diffusers scheduler.

    Parameters:
        unet: a `UNet2DModel` whose input is the noisy image followed by the encoded mask channels.
        scheduler: the noise schedule the model was trained with; samplers are built from its config.
        card: the model card (classes, colours, encoding, size); `ModelCard` defaults when omitted.
        base: a cascade's first stage, when this pipeline's UNet is its upscaler (`card.upscale` says how).
        student: a few-step UNet distilled from `unet` (`card.student` says how), used at the default settings.
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler,
        card: ModelCard | None = None,
        base: SegDiffPipeline | None = None,
        student: UNet2DModel | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.card = card or ModelCard(
            num_classes=0,
            img_channels=unet.config.out_channels,
            img_size=unet.config.sample_size,
            encoding="none",
        )
        upscaling = self.card.upscaling
        r = upscaling.unshuffle if upscaling else 1
        expected = (self.card.img_channels + self.card.cond_channels) * r * r
        if unet.config.in_channels != expected:
            raise CheckpointError(
                f"the UNet takes {unet.config.in_channels} input channels, but the card's {self.card.img_channels} "
                f"image channels + {self.card.cond_channels} condition channels ({self.card.encoding} encoding, "
                f"{self.card.num_classes} classes{', a low-resolution image' if upscaling else ''}"
                f"{f', unshuffled by {r}' if r > 1 else ''}) make {expected}"
            )
        if (upscaling is None) != (base is None):
            raise CheckpointError(
                "an upscaler needs its base model and only an upscaler takes one: "
                f"card.upscale={self.card.upscale}, base={'given' if base else 'none'}"
            )
        if base is not None:
            check_stages(base.card, self.card)
        if (self.card.distilled is None) != (student is None):
            raise CheckpointError(
                f"a student needs its card's record and a card's record its student: card.student="
                f"{self.card.student}, student={'given' if student else 'none'}"
            )
        if student is not None and _shape(student) != _shape(unet):
            raise CheckpointError(
                "the student's UNet is not shaped as its teacher's: a student of another model"
            )
        self.base, self.student = base, student
        self.precision: Precision = "fp32"

    # ---- opening and saving -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        num_classes: int | None = None,
        device: str | torch.device | None = None,
        precision: Precision = "auto",
        channels_last: bool | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        torch_dtype: torch.dtype | None = None,
        **unknown,
    ) -> SegDiffPipeline:
        """Open a segdiff model folder, an original run folder, or a bare `unet/` folder, or any of them
        on the Hugging Face Hub by id `org/name` (at `revision`, through the Hub cache; `segdiff.hub`).

        `num_classes` (K, background included) is needed only where the folder cannot say: models trained
        by the original code. The model lands on `device` (CUDA when present) with `precision` and
        channels-last memory set as `set_speed` does. diffusers' `torch_dtype=` is read as that precision
        (torch.float32 "fp32", torch.bfloat16 "bf16", torch.float16 "fp16"): weights stay fp32, sampling
        autocasts. Other keyword arguments are refused rather than ignored.
        """
        if unknown:
            raise ArgumentError(
                f"from_pretrained(): unknown keyword argument(s) {', '.join(sorted(unknown))}; it takes "
                "num_classes, device, precision, channels_last, revision, cache_dir, token, local_files_only "
                "and torch_dtype (read as precision)"
            )
        if torch_dtype is not None:
            precision = _precision_of(torch_dtype, precision)
        hub = dict(cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        folder = model_folder(path, revision, **hub)
        card, unet_dir, scheduler = _inspect_folder(folder, num_classes)
        base = None
        if card.upscaling is not None:
            base_dir = folder / card.upscaling.base
            if not base_dir.is_dir():
                raise CheckpointError(
                    f"{path}: a cascade's upscaler whose base model {card.upscaling.base}/ is missing"
                )
            base = cls.from_pretrained(
                base_dir, device=device, precision=precision, channels_last=channels_last
            )
        unet = _load_unet(unet_dir).eval()
        student = _load_unet(folder / card.distilled.folder).eval() if card.distilled else None
        pipe = cls(unet=unet, scheduler=scheduler, card=card, base=base, student=student)
        pipe.to(torch.device(device) if device else default_device())
        return pipe.set_speed(precision=precision, channels_last=channels_last)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write `model_index.json`, `unet/`, `scheduler/` and the card, each swapped in whole.

        Everything is written to a temporary folder first, so a crash mid-save leaves the previous model;
        the folder's other entries (a checkpoint's training state) stay.
        """
        target = Path(save_directory)
        clean_interrupted_saves(target)
        with staged_folder(target, merge=True, last=CARD_FILE) as staging:
            super().save_pretrained(staging, safe_serialization=True, **kwargs)
            if self.base is not None:
                self.base.save_pretrained(staging / self.card.upscaling.base)
            if self.student is not None:
                self.student.save_pretrained(staging / self.card.distilled.folder, safe_serialization=True)
            self.card.save(staging)

    # ---- speed --------------------------------------------------------------------------------------

    def set_speed(
        self, precision: Precision = "auto", channels_last: bool | None = None, compile: bool = False
    ):
        """Choose numeric precision, memory layout and `torch.compile` for sampling. Returns self.

        `precision="fp32", channels_last=False, compile=False` are the original code's settings.
        `channels_last=None` picks it on CPUs only: it speeds sampling there but slows it on GPUs, where the
        UNet's GroupNorms pay for the layout (benchmarks/sample_speed.py; docs/benchmarks.md).
        """
        precision = PRECISION_ALIASES.get(precision, precision)
        if precision not in PRECISIONS:
            expected = ", ".join(map(repr, PRECISIONS[:-1]))
            raise ArgumentError(f"precision={precision!r}, expected {expected} or {PRECISIONS[-1]!r}")
        if self.base is not None:
            self.base.set_speed(precision, channels_last, compile)
        self.precision = precision
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for name in ("unet", "student"):
            if (network := getattr(self, name)) is not None:
                network.to(memory_format=memory_format)
                setattr(self, name, torch.compile(network) if compile else network)
        return self

    def to(self, *args, **kwargs):
        if self.base is not None:
            self.base.to(*args, **kwargs)
        if self.student is not None:
            self.student.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def set_progress_bar_config(self, **kwargs):
        if self.base is not None:
            self.base.set_progress_bar_config(**kwargs)
        super().set_progress_bar_config(**kwargs)

    def _autocast(self, device: torch.device):
        """One context for every step: `self.device` walks all modules, 10% of a CPU step (demo model)."""
        dtype = autocast_dtype(device, self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def make_scheduler(self, name: str = DEFAULT_SCHEDULER):
        """A fresh sampler of kind `name`, sharing the model's noise schedule."""
        if name not in SCHEDULERS:
            raise ArgumentError(f"scheduler={name!r}, expected one of {sorted(SCHEDULERS)}")
        scheduler_cls, overrides = SCHEDULERS[name]
        # Take the stored values as they are, whether or not they were library defaults when saved, so a
        # model samples the same before and after a save.
        config = {k: v for k, v in self.scheduler.config.items() if k != "_use_default_values"}
        return scheduler_cls.from_config(config, **overrides)

    # ---- sampling -----------------------------------------------------------------------------------

    def read_mask(self, path: str | os.PathLike) -> np.ndarray:
        """A mask file -> (H, W) int64 class ids of this model, checked against its classes, as the studio
        reads uploads: PNGs of class ids (any bit depth), palette-mode PNGs, PNGs coloured in the card's
        palette (the bundled examples, `assets/examples/<model>/`) and `.npy` label maps. The file's size is
        kept; `pipe(...)` takes masks of `card.img_size`."""
        return read_mask(path, self.card.num_classes, self.card.palette)

    def prepare_masks(self, masks, omit: Sequence[int] = (), batch_size: int | None = None) -> torch.Tensor:
        """Masks in any accepted form -> validated (B, H, W) int64 with `omit` set to background."""
        card = self.card
        if isinstance(masks, (list, tuple)):
            masks = torch.stack([self.prepare_masks(m)[0] for m in masks])
        elif isinstance(masks, PIL.Image.Image):
            masks = torch.from_numpy(np.asarray(masks.convert("L")).astype(np.int64))
        elif isinstance(masks, np.ndarray):
            masks = torch.from_numpy(masks.astype(np.int64))
        elif not isinstance(masks, torch.Tensor):
            raise MaskError(
                f"masks of type {type(masks).__name__}, expected numpy, torch, PIL or a list of them"
            )
        masks = masks.long().cpu()
        if masks.ndim == 2:
            masks = masks[None]
        size = (card.img_size, card.img_size)
        if masks.ndim != 3 or tuple(masks.shape[1:]) != size:
            raise MaskError(
                f"mask shape {tuple(masks.shape)}, expected (H, W) or (B, H, W) with H, W = {size}"
            )
        check_mask(masks, card.num_classes)
        bad_omit = [c for c in omit if not 1 <= int(c) < card.num_classes]
        if bad_omit:
            raise MaskError(
                f"omit={list(omit)}: class {bad_omit[0]} is not a class id 1..{card.num_classes - 1}"
            )
        if batch_size is not None and masks.shape[0] == 1:
            masks = masks.expand(batch_size, -1, -1)
        return omit_classes(masks, omit)

    @torch.no_grad()
    def __call__(
        self,
        masks=None,
        omit: Sequence[int] = (),
        num_inference_steps: int | None = None,
        scheduler: str | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: Literal["pil", "np", "pt"] = "pil",
        batch_size: int | None = None,
        image: torch.Tensor | None = None,
        strength: float = 1.0,
        callback: Callable[[int, int], None] | None = None,
        return_dict: bool = True,
        upscale_steps: int | None = None,
        sampler: str | None = None,
        guidance_scale: float = 1.0,
        exact_background: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Draw one image per mask.

        At the default settings (no steps, no sampler asked) a model with a distilled student draws with it, in
        the student's few steps; others, and any asked setting, draw with the model itself, by default in
        DEFAULT_STEPS steps of DEFAULT_SAMPLER.

        Args:
            masks: (H, W) or (B, H, W) int class ids (numpy, torch, PIL "L", or a list of them), H = W =
                `card.img_size`. None for unconditional models. A single mask is repeated `batch_size` times.
            omit: class ids treated as unknown: set to background, so the model may invent them.
            num_inference_steps: denoising steps (>= 1); for a cascade, its base model's.
            scheduler: the sampler: "dpm++" (DPM-Solver++ 2M, the fast default), "unipc", "ddim" or "ddpm"; for a
                cascade, its base model's (the upscaler runs the sampler and steps its card records).
            eta: DDIM noise (0 = deterministic); ignored by other samplers and by students.
            generator: torch generator(s) for the initial noise and stochastic samplers.
            latents: (B, C, H, W) initial noise, drawn from `generator` when None; for a cascade, its base
                model's, at the base's size.
            output_type: "pil" (list of images), "np" (B, H, W, C) float in [0, 1], or "pt" (B, C, H, W).
            batch_size: number of images for unconditional models, or copies of a single mask.
            image: (B|1, C, H, W) float in [0, 1]: start from this image noised to `strength` instead of
                pure noise (SDEdit), so the result keeps its look to a chosen degree.
            strength: in (0, 1]; the fraction of the schedule run from `image` (1 = ignore its content).
            callback: called as `callback(step, total)` after every step (of both stages of a cascade).
            upscale_steps: a cascade's upscaler steps; None for the number its card records (or its student's).
            sampler: another name for `scheduler` (the studio's word); give one of the two.
            guidance_scale: mask guidance w in [1, MAX_GUIDANCE]; 1 = none. Above 1, each step also predicts for
                the blank mask and extrapolates away from it, so images follow their masks more closely
                (meant for models trained with mask ablation; for a cascade, its base model is guided).
            exact_background: where the card records its scans' constant background (`card.backdrop`), set
                the field each image draws outside its field of view to it (`segdiff.model.background`);
                False for the network's own pixels.
        """
        scheduler = _check_arguments(num_inference_steps, upscale_steps, scheduler, sampler, output_type, strength)
        card = self.card
        check_guidance(guidance_scale, card.guided)
        if card.guided:
            if masks is None:
                raise MaskError("this model is segmentation-guided: pass masks")
            masks = self.prepare_masks(masks, omit, batch_size)
            batch_size = masks.shape[0]
        else:
            batch_size = batch_size or (latents.shape[0] if latents is not None else 1)
            masks = torch.zeros(batch_size, card.img_size, card.img_size, dtype=torch.long)
        device = self._execution_device  # once: the lookup walks every module, ~3 ms on a CPU
        cond = encode(masks, card.encoding, card.num_classes).to(device)  # (B, C_mask, H, W)
        blank = None
        if guidance_scale != 1:
            blank = encode(torch.zeros_like(masks), card.encoding, card.num_classes).to(device)
        shape = (batch_size, card.img_channels, card.img_size, card.img_size)
        if image is not None:
            image = torch.as_tensor(image, dtype=torch.float32, device=device).expand(shape)

        def run(n: int) -> int:  # the steps SDEdit runs of n
            return n if image is None else max(1, round(n * strength))

        noise_level = None
        if self.base is not None:
            upscaling = card.upscaling
            defaults = num_inference_steps is None and scheduler is None
            # Any setting asked draws with the upscaler itself, at its card's steps unless they are asked too.
            stage = self._stage(upscale_steps or (None if defaults else upscaling.steps), None, upscaling)
            base_steps = run(self.base._stage(num_inference_steps, scheduler).steps)
            total_steps = base_steps + run(stage.steps)
            outer = callback
            low = self.base(
                shrink_masks(masks, upscaling.low_res_size) if card.guided else None,
                num_inference_steps=num_inference_steps, scheduler=scheduler, eta=eta, generator=generator,
                latents=latents, output_type="pt", batch_size=batch_size,
                image=None if image is None else shrink(image, upscaling.low_res_size), strength=strength,
                callback=outer and (lambda i, _: outer(i, total_steps)), guidance_scale=guidance_scale,
                exact_background=False,
            ).images  # (B, C, h, w) in [0, 1]  # fmt: skip
            noise_level = torch.full((batch_size,), upscaling.noise_level, device=device)
            aug = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            low = low_res_condition(low * 2 - 1, card.img_size, self.scheduler, noise_level, aug)
            cond = torch.cat([low, cond], dim=1)  # (B, C_img + C_mask, H, W)
            latents, blank = None, None  # the base stage was guided; the upscaler follows its image
            callback = outer and (lambda i, _: outer(base_steps + i, total_steps))
        else:
            stage = self._stage(num_inference_steps, scheduler)

        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ArgumentError(f"latents of shape {tuple(latents.shape)}, expected {shape}")
        guidance = Guidance(blank, guidance_scale) if blank is not None else None
        x = self._denoise(stage, latents.to(device, torch.float32), cond, guidance, noise_level, eta, generator,
                          image, strength, callback)  # fmt: skip
        images = (x / 2 + 0.5).clamp(0, 1)
        if exact_background and card.backdrop is not None:
            images = card.backdrop.apply(images, masks if card.guided else None)
        images = self._output(images, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _output(self, images: torch.Tensor, output_type: str):
        """(B, C, H, W) in [0, 1] -> as `output_type` asks: the tensor, (B, H, W, C) numpy, or PIL images."""
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return images
        if self.card.img_channels not in (1, 3):
            raise ArgumentError(f"{self.card.img_channels}-channel images cannot be PIL images: use output_type='np'")
        return self.numpy_to_pil(images)

    def _stage(self, steps: int | None, sampler: str | None, upscaling: Upscaling | None = None) -> _Stage:
        """What draws at these settings: the student at the defaults (None, None) when there is one, else the
        model with the sampler and steps asked, or its defaults (an upscaler's: those its card records)."""
        if steps is None and sampler is None and self.student is not None:
            return _Stage(self.student, student_scheduler(self.scheduler), self.card.distilled.steps)
        if upscaling is not None:
            sampler, steps = upscaling.scheduler, steps or upscaling.steps
        return _Stage(self.unet, self.make_scheduler(sampler or DEFAULT_SAMPLER), steps or DEFAULT_STEPS)

    def _denoise(
        self, stage: _Stage, x, cond, guidance, noise_level, eta, generator, image, strength, callback
    ) -> torch.Tensor:
        """The sampling loop: noise `x` (B, C, H, W) -> images in [-1, 1], concatenating `cond` at every step
        and stepping the stage's sampler on the image channels only. With `guidance`, each prediction is
        extrapolated away from the blank mask's; with `image`, SDEdit from `strength`."""
        sampler, steps = stage.sampler, stage.steps
        sampler.set_timesteps(steps, device=x.device)
        timesteps = sampler.timesteps
        if image is not None:
            start = steps - max(1, round(steps * strength))
            timesteps = timesteps[start * sampler.order :]
            if hasattr(sampler, "set_begin_index"):
                sampler.set_begin_index(start * sampler.order)
            x = sampler.add_noise(image * 2 - 1, x, timesteps[:1])
        step_kwargs = {"eta": eta, "generator": generator}
        step_kwargs = {k: v for k, v in step_kwargs.items() if k in _step_arguments(type(sampler))}
        upscaling = self.card.upscaling
        autocast = self._autocast(x.device)
        for i, t in enumerate(self.progress_bar(timesteps)):
            with autocast:
                if guidance is None:
                    prediction = denoise(stage.unet, x, t, cond, upscaling, noise_level)
                else:
                    both = denoise(stage.unet, torch.cat([x, x]), t, torch.cat([cond, guidance.blank]))
                    prediction = guidance.combine(*both.float().chunk(2))
            x = sampler.step(prediction.float(), t, x, **step_kwargs).prev_sample
            if callback is not None:
                callback(i + 1, len(timesteps))
        return x


def _check_arguments(num_inference_steps, upscale_steps, scheduler, sampler, output_type, strength) -> str | None:
    """Refuse a call's malformed settings, naming each; -> the sampler asked (`scheduler` or its alias)."""
    if sampler is not None and scheduler not in (None, sampler):
        raise ArgumentError(f"scheduler={scheduler!r} and sampler={sampler!r}: the same setting; give one")
    scheduler = sampler if sampler is not None else scheduler
    for name, steps in (("num_inference_steps", num_inference_steps), ("upscale_steps", upscale_steps)):
        if steps is not None and not (isinstance(steps, int) and steps >= 1):
            raise ArgumentError(f"{name}={steps!r}, expected an integer >= 1")
    if output_type not in ("pil", "np", "pt"):
        raise ArgumentError(f"output_type={output_type!r}, expected 'pil', 'np' or 'pt'")
    if not 0.0 < strength <= 1.0:
        raise ArgumentError(f"strength={strength}, expected a value in (0, 1]")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ArgumentError(f"scheduler={scheduler!r}, expected one of {sorted(SCHEDULERS)}")
    return scheduler


@dataclass
class Guidance:
    """Mask guidance: the blank mask's encoding (B, C_mask, H, W) and the scale w."""

    blank: torch.Tensor
    scale: float

    def combine(self, conditional: torch.Tensor, blank: torch.Tensor) -> torch.Tensor:
        return blank + self.scale * (conditional - blank)


def check_guidance(scale, guided: bool) -> None:
    """A usable mask guidance scale, or an ArgumentError naming what was wrong."""
    if not is_guidance(scale):
        raise ArgumentError(
            f"guidance_scale={scale!r}, expected a number from 1 (no guidance) to {MAX_GUIDANCE:g}"
        )
    if scale != 1 and not guided:
        raise ArgumentError(f"guidance_scale={scale}: an unconditional model has no mask to be guided by")


@dataclass
class _Stage:
    """One sampling run's network, its sampler and its number of steps."""

    unet: UNet2DModel
    sampler: object
    steps: int


@functools.cache
def _step_arguments(scheduler_cls: type) -> frozenset[str]:
    """Which of (eta, generator) a sampler's `step` takes, read once per class rather than at every call."""
    return frozenset(inspect.signature(scheduler_cls.step).parameters)


def _shape(unet: UNet2DModel) -> dict:
    return {k: v for k, v in unet.config.items() if not k.startswith("_")}


def _precision_of(torch_dtype, precision: Precision) -> Precision:
    """diffusers' `torch_dtype=` as a segdiff precision; refused where `precision` says otherwise."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if torch_dtype not in names:
        raise ArgumentError(
            f"torch_dtype={torch_dtype!r}, expected torch.float32, torch.bfloat16 or torch.float16"
        )
    if precision not in ("auto", names[torch_dtype]):
        raise ArgumentError(f"torch_dtype={torch_dtype!r} and precision={precision!r}: give one of them")
    return names[torch_dtype]


def check_stages(base: ModelCard, upscaler: ModelCard) -> None:
    """Refuse a cascade whose base model draws other classes, channels or sizes than its upscaler reads."""
    ups = upscaler.upscaling
    pairs = (
        ("img_size", base.img_size, ups.low_res_size),
        ("num_classes", base.num_classes, upscaler.num_classes),
        ("img_channels", base.img_channels, upscaler.img_channels),
        ("encoding", base.encoding, upscaler.encoding),
    )
    for name, got, expected in pairs:
        if got != expected:
            raise CheckpointError(
                f"cascade: the base model in {ups.base}/ has {name}={got}, but its upscaler expects {expected}"
            )
    if upscaler.img_size % ups.low_res_size:
        raise CheckpointError(
            f"cascade: the upscaler's img_size {upscaler.img_size} is not a multiple of its base's "
            f"{ups.low_res_size}"
        )


def _inspect_folder(path: Path, num_classes: int | None):
    """Tell which kind of model folder `path` is: -> (card, unet folder, scheduler)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model folder")
    if (path / "config.json").is_file() and not (path / "unet").is_dir():
        path = path.parent if path.name == "unet" else path  # pointed at the unet/ folder itself
    unet_dir = path / "unet"
    if not (unet_dir / "config.json").is_file():
        raise CheckpointError(
            f"{path}: expected a model folder holding unet/config.json (a segdiff model, an original run "
            f"folder or a released NAME/unet/ checkpoint)"
        )
    unet_config = json.loads((unet_dir / "config.json").read_text())
    scheduler = _load_scheduler(path)
    if (path / CARD_FILE).is_file():
        card = ModelCard.load(path)
        if num_classes is not None and num_classes != card.num_classes:
            raise CheckpointError(f"{path}: num_classes={num_classes}, but its card says {card.num_classes}")
        return card, unet_dir, scheduler

    # Trained by the original code: one `class_id / 255` mask channel when guided, none otherwise.
    index = path / "model_index.json"
    class_name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if class_name == SegDiffPipeline.__name__:
        raise CheckpointError(
            f"{path}: a segdiff model without its {CARD_FILE} (classes, encoding, size); "
            "expected the model folder as saved, card included"
        )
    if class_name is not None and class_name not in ORIGINAL_PIPELINES:
        raise CheckpointError(f"{index}: pipeline {class_name!r}, expected one of {ORIGINAL_PIPELINES}")
    mask_channels = unet_config["in_channels"] - unet_config["out_channels"]
    if mask_channels not in (0, 1):
        raise CheckpointError(
            f"{unet_dir}: {unet_config['in_channels']} inputs for {unet_config['out_channels']} outputs; "
            "original models take 0 or 1 mask channel, and this folder has no segdiff_card.json"
        )
    if mask_channels and num_classes is None:
        raise CheckpointError(
            f"{path}: a segmentation-guided model of the original code; its folder does not record the "
            "number of classes: pass num_classes=K (including background)"
        )
    if mask_channels and not 2 <= num_classes <= 256:
        raise CheckpointError(f"num_classes={num_classes}, expected 2..256 for the original mask encoding")
    card = ModelCard(
        num_classes=num_classes if mask_channels else 0,
        img_channels=unet_config["out_channels"],
        img_size=unet_config["sample_size"],
        encoding="original" if mask_channels else "none",
        training={"source": f"original code ({class_name or 'released unet/ checkpoint'})"},
    )
    return card, unet_dir, scheduler


def _load_scheduler(path: Path):
    config_file = path / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():  # released checkpoints: the original training schedule
        return DDIMScheduler(num_train_timesteps=1000)
    config = json.loads(config_file.read_text())
    known = {"DDIMScheduler": DDIMScheduler, "DDPMScheduler": DDPMScheduler}
    scheduler_cls = known.get(config.get("_class_name"), DDPMScheduler)
    return scheduler_cls.from_config(config)


def _load_unet(unet_dir: Path) -> UNet2DModel:
    if not any(unet_dir.glob("*.safetensors")):
        pickled = [p.name for p in unet_dir.glob("*.bin")]
        raise CheckpointError(
            f"{unet_dir}: no .safetensors weights"
            + (
                f" (found {pickled}: pickle files are not loaded; convert them to safetensors)"
                if pickled
                else ""
            )
        )
    try:
        return UNet2DModel.from_pretrained(unet_dir, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{unet_dir}: cannot load the UNet ({e})") from e
