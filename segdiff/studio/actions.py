"""The studio's actions: what `app.py` does with a click, as plain functions on arrays and files.

The app wires widgets to these and nothing else; no gradio here. A `Studio` holds one opened model and
turns a painted canvas or an uploaded file into a mask, samples images from it (`generate`), renders the
same noise with each class omitted in turn (`sweep`), writes every result with its settings, and draws one
quick image at the model's default settings while a mask is being painted (`preview`).

Canvas resolution: a 64 px mask is too coarse to paint on, so the canvas is `canvas_scale` times the model's
size (about 256 px, shown zoomed to fit the editor). Its composite is snapped to the palette at full
resolution first (the canvas anti-aliases, so edges are blends of two class colours), then each scale x scale
block takes its most frequent class: a stroke counts where it covers most of a model pixel, and no blended colour survives.
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from safetensors import SafetensorError

from ..choices import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_STEPS,
    SAMPLERS,
    STUDENT,
    check_seed,
    is_guidance,
)
from ..data.layout import read_image
from ..data.masks import omit_classes, overlay
from ..errors import (
    CheckpointError,
    ConfigError,
    DataLayoutError,
    ImageError,
    MaskError,
    SegdiffError,
    check_integer,
)
from ..files import write_png
from ..measure.quality import faithfulness
from ..measure.segmenter import Segmenter
from ..model.pipeline import SegDiffPipeline
from .batching import Lanes
from .runs import Run, new_run_folder, write_run

# Caps on what one request may ask of a shared server.
MAX_IMAGES = 8
# Pixels per side of any image a request brings (canvas background, layers and composite, start image, mask
# file), read from its header before anything decodes it: a small PNG can hold a huge flat image.
MAX_IMAGE_SIDE = 2048
# The painting canvas is the model size times the integer scale nearest this. The browser encodes the canvas as
# PNGs after every stroke (for the live preview): at 512 px that took 0.4 s a time in headless Chromium, at
# 256 px 0.07 s. The editor zooms the canvas to fit its box, so this sets resolution, not size on screen.
CANVAS_SIDE = 256
DISPLAY_SIDE = 256  # results are shown (and outlined) at about this size; files keep the model's size
# On a CPU, one network call of many large images runs out of cache: 20 previews at 256 px took 0.20 s each in
# one call and 0.13-0.17 s each in calls of 4 to 8 (2-core CPU, 2026-12-07; 64 px: as fast per image from 8 to
# 64 a call). There the lanes put at most this many pixels in a call (requests that wait longer are drawn in
# the next); on a GPU, as many images as the lane takes.
CPU_CALL_PIXELS = 8 * 256 * 256

Progress = Callable[[int, int], None]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """Everything that fixes a result, besides the mask: seed i + k draws the noise of image k.

    Checked when made, so a `Settings` always holds typed values in range: a request's raw JSON may hold
    anything, and the first value that is off is refused by name (ConfigError). Whole floats (3.0, as JSON
    numbers may arrive) become ints; 2.9, True, "7" and None are refused, never rounded. `omit` and the
    student are checked against a model where a model applies them (`Studio`), whose requests default to its
    own sampler (`Studio.settings`).
    """

    seed: int = 0
    steps: int = DEFAULT_STEPS  # not used by STUDENT, which draws in its own steps
    sampler: str = DEFAULT_SAMPLER  # one of SAMPLERS, or STUDENT: the model's few-step student (its defaults)
    omit: tuple[int, ...] = ()  # class ids the model may invent
    num_images: int = 4
    strength: float = 1.0  # with a start image: the fraction of the schedule run from it
    guidance_scale: float = 1.0  # mask guidance; 1 = none

    def __post_init__(self):
        typed = dict(
            seed=check_seed(self.seed, "seed"),
            steps=check_integer("steps", self.steps, 1, MAX_STEPS),
            num_images=check_integer("num_images", self.num_images, 1, MAX_IMAGES),
        )
        if not isinstance(self.sampler, str) or self.sampler not in (*SAMPLERS, STUDENT):
            raise ConfigError(f"sampler {self.sampler!r}: expected one of {[*SAMPLERS, STUDENT]}")
        strength = self.strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise ConfigError(f"strength {self.strength!r}: expected a value in (0, 1]")
        guidance = self.guidance_scale
        if not is_guidance(guidance):
            raise ConfigError(
                f"guidance_scale {guidance!r}: expected a value from 1 (none) to {MAX_GUIDANCE:g}"
            )
        typed.update(
            strength=float(strength), omit=tuple(self.omit), guidance_scale=float(self.guidance_scale)
        )
        for name, value in typed.items():  # frozen: the typed values replace the raw ones once, here
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class Recipe:
    """What a batched network call draws, as plain values that may cross to another process (ZeroGPU): the
    model by name, its settings (None: a preview, at the model's defaults) and start image (1, C, H, W)."""

    model: str
    settings: Settings | None = None
    image: torch.Tensor | None = None


class Studio:
    """An opened model and the actions the studio offers on it; `name` (default: the folder's) labels its results.

    lanes: where its network calls are drawn, batched with other requests' (shared by a registry's models).
    """

    def __init__(
        self,
        pipe: SegDiffPipeline,
        folder: str | os.PathLike | None = None,
        name: str | None = None,
        lanes: Lanes | None = None,
    ):
        folder = Path(folder) if folder is not None else None
        name = name or (model_name(folder) if folder else "model")
        card = pipe.card
        if not card.guided or card.num_classes < 2:
            raise CheckpointError(
                f"{name}: an unconditional model ({card.num_classes} classes, {card.encoding} encoding); "
                "the studio needs a segmentation-guided model"
            )
        self.pipe, self.name, self.folder = pipe, name, folder
        self.card, self.palette = card, card.palette
        self.size = card.img_size
        self.device = pipe.device.type  # read once: the lookup walks every module
        self.per_call = max(1, CPU_CALL_PIXELS // self.size**2) if self.device == "cpu" else None
        self.canvas_scale = max(1, round(CANVAS_SIDE / self.size))
        self.display_scale = max(1, round(DISPLAY_SIDE / self.size))
        self.lanes = (lanes or Lanes()).serve(self.draw_batch)  # lanes a registry shares, it serves itself
        self.segmenter, self.segmenter_fault = load_segmenter(self)
        self.results = Path(tempfile.mkdtemp(prefix="segdiff-studio-"))
        weakref.finalize(self, shutil.rmtree, self.results, True)

    # ---- describing the model ------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        return list(self.palette.names)

    def summary(self) -> str:
        """One line for the page header: name, size, channels, classes, where it runs."""
        card = self.card
        parts = [
            self.name,
            f"{self.size} px",
            f"{card.img_channels} channel{'s' if card.img_channels > 1 else ''}",
            f"{card.num_classes} classes",
            f"runs on {self.device.upper()}",
        ]
        if card.dataset:  # the credit the training data's licence asks for, wherever the model is shown
            parts.append(
                f"trained on {card.dataset.get('name', 'real data')} ({card.dataset.get('license', '')})"
            )
        if self.segmenter_fault:
            parts.append(f"no Dice readout: {self.segmenter_fault}")
        return " · ".join(parts)

    @property
    def samplers(self) -> tuple[str, ...]:
        """The samplers this model draws with, its default first: the card's `Sampling` where it records one
        (the sampler whose images measured most like real scans), else STUDENT where the model has a distilled
        student (the fastest), else DEFAULT_SAMPLER; STUDENT comes only with a student."""
        offered = (STUDENT, *SAMPLERS) if self.card.distilled is not None else SAMPLERS
        chosen = self.card.generation
        return offered if chosen is None else (chosen.sampler, *(s for s in offered if s != chosen.sampler))

    def steps_for(self, sampler: str) -> int:
        """The steps `sampler` draws in when a request names none: those the card's `Sampling` records for its
        sampler, else DEFAULT_STEPS (which STUDENT ignores)."""
        chosen = self.card.generation
        return chosen.steps if chosen is not None and chosen.sampler == sampler else DEFAULT_STEPS

    @property
    def guidance(self) -> float:
        """The mask guidance this model draws at when a request names none, previews included: the card's
        `Sampling` where it records one (what measured most faithful without costing realism), else 1 (none)."""
        chosen = self.card.generation
        return chosen.guidance_scale if chosen is not None else 1.0

    def sampling(self, sampler: str, steps: int) -> dict:
        """What draws at `sampler` and `steps`, as a run records it: the sampler and steps of the model (of a
        cascade's base), and a cascade's upscaler's. STUDENT draws at the pipeline's defaults: each model's
        own student in its own steps (a cascade's base without one draws as the pipeline draws it then)."""
        upscaling = self.card.upscaling
        upscaler = upscaling and (upscaling.scheduler, upscaling.steps)
        if sampler == STUDENT:
            first = (self.pipe.base.card if self.pipe.base is not None else self.card).distilled
            sampler, steps = (STUDENT, first.steps) if first else (DEFAULT_SAMPLER, DEFAULT_STEPS)
            upscaler = upscaling and (STUDENT, self.card.distilled.steps)
        drawn = {"sampler": sampler, "steps": steps}
        if upscaler:
            drawn.update(upscale_sampler=upscaler[0], upscale_steps=upscaler[1])
        return drawn

    def settings(self, omit=(), keep=None, sampler=None, **raw) -> Settings:
        """Settings from a request's raw values (JSON of any type); the first one that is off is refused by name.

        omit: class names (or ids) the model may invent, one name alone or a list; keep: the classes to
        follow instead (a checklist's ticked names), every other class being omitted; sampler: one of
        `samplers`, None for the model's default (its first); steps: None (or left out) for the sampler's own
        (`steps_for`); guidance_scale: None (or left out) for the model's (`guidance`). The other keywords are
        `Settings`' fields, their defaults its own.
        """
        if keep is not None:
            kept = self.omit_ids(keep, "keep")
            omit = [c for c in range(1, self.card.num_classes) if c not in kept]
        sampler = self.samplers[0] if sampler is None else sampler
        if raw.get("steps") is None and isinstance(sampler, str):
            raw["steps"] = self.steps_for(sampler)
        if raw.get("guidance_scale") is None:
            raw["guidance_scale"] = self.guidance
        settings = Settings(**raw, sampler=sampler, omit=self.omit_ids(omit))
        self._check_sampler(settings.sampler)
        return settings

    def omit_ids(self, names: Sequence[str | int] | str | None, what: str = "omit") -> tuple[int, ...]:
        """Class names (or ids) -> sorted class ids; background cannot be omitted. One name may come alone."""
        if names is None or isinstance(names, str):
            names = [] if names is None else [names]
        if not isinstance(names, (list, tuple)):
            raise MaskError(f"{what} {names!r}: expected a list of class names from {self.class_names[1:]}")
        ids = []
        for item in names:
            key = str(item).strip()
            if key in self.class_names[1:]:
                ids.append(self.class_names.index(key))
            elif key.isdigit() and 1 <= int(key) < self.card.num_classes:
                ids.append(int(key))
            else:
                raise MaskError(
                    f"{what}: {item!r} is not a class; expected names from {self.class_names[1:]} "
                    f"or ids 1..{self.card.num_classes - 1}"
                )
        return tuple(sorted(set(ids)))

    # ---- masks in -----------------------------------------------------------------------------------

    def canvas(self, mask: np.ndarray | None = None) -> np.ndarray:
        """(H, W) class ids (blank when None) -> (S, S, 3) uint8 palette colours at canvas size."""
        if mask is None:
            mask = np.zeros((self.size, self.size), np.int64)
        rgb = self.palette.to_rgb(mask)
        return np.repeat(np.repeat(rgb, self.canvas_scale, axis=0), self.canvas_scale, axis=1)

    def layer(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) class ids -> (S, S, 4) uint8 paint layer: class colours, background transparent."""
        rgb = self.canvas(mask)
        alpha = np.repeat(np.repeat(mask > 0, self.canvas_scale, axis=0), self.canvas_scale, axis=1)
        return np.concatenate([rgb, (alpha * 255).astype(np.uint8)[..., None]], axis=-1)

    def example_masks(self, folder: str | os.PathLike) -> list[str]:
        """The mask files in `folder` this model reads, as previews at its size (thumbnails a person can read)."""
        folder = Path(folder)
        paths = []
        for path in sorted(folder.glob("*.png")) + sorted(folder.glob("*.npy")):
            try:
                mask, _ = self.mask_from_file(path)
            except SegdiffError as e:
                log.warning("segdiff studio: skipping example %s", e)
                continue
            paths.append(self.write_preview(mask, path.stem))
        return paths

    def write_preview(self, mask: np.ndarray, stem: str) -> str:
        """Write `mask` as a palette-coloured PNG at the model's size (it reads back exactly); its path."""
        folder = self.results / "previews"
        folder.mkdir(exist_ok=True)
        path = folder / f"{stem}.png"
        write_png(self.palette.to_rgb(mask), path)
        return str(path)

    def mask_from_canvas(self, image: np.ndarray | None, layers: Sequence[np.ndarray] = ()) -> np.ndarray:
        """A painted canvas (S, S, 3|4) uint8, with paint layers (S, S, 4) over it -> (H, W) int64 class ids.

        Layers are alpha-composited over `image` first. Pixels snap to the nearest palette colour at the
        canvas's resolution, then each block of canvas_scale x canvas_scale pixels takes its most
        frequent class (ties go to the lower id). No canvas at all is an empty mask.
        """
        if image is None:
            return np.zeros((self.size, self.size), np.int64)
        image = np.asarray(image, np.float32)
        rgb = image[..., :3]
        alpha = image[..., 3:] / 255 if image.shape[-1] == 4 else np.ones_like(rgb[..., :1])
        for layer in layers:  # "over" compositing; our background is opaque, so plain blending is exact
            layer_alpha = layer[..., 3:].astype(np.float32) / 255
            rgb = layer[..., :3] * layer_alpha + rgb * (1 - layer_alpha)
            alpha = layer_alpha + alpha * (1 - layer_alpha)
        flat = np.concatenate([rgb, alpha * 255], axis=-1).round().astype(np.uint8)
        labels = self.palette.to_labels(flat, source="painted mask")
        return _downscale_labels(labels, self.size, self.card.num_classes)

    def read_canvas(self, file: str | os.PathLike | bytes, source: str = "canvas") -> np.ndarray:
        """One canvas image (a PNG path or its bytes) -> (S, S, 4) uint8 RGBA at the canvas size.

        The size is checked from the header first; the image is decoded once, brought to the canvas
        size in its own mode (nearest), and only then expanded to RGBA: a request costs what the canvas
        costs, whatever size it claims.
        """
        side = self.size * self.canvas_scale
        with _open_image(file, source) as im:
            if im.size != (side, side):
                im = im.resize((side, side), PIL.Image.NEAREST)
            return np.asarray(im.convert("RGBA"))

    def mask_from_editor(self, background=None, layers=(), composite=None) -> np.ndarray:
        """The image editor's files (PNG paths or bytes, None when absent) -> (H, W) int64 class ids.

        The browser sends a composite once painted on; a mask we loaded into the layer comes back
        without one, as background and layers. Nothing at all is an empty mask.
        """
        if composite is not None:
            return self.mask_from_canvas(self.read_canvas(composite, "canvas composite"))
        if background is None:
            return self.mask_from_canvas(None)
        layers = [self.read_canvas(f, f"canvas layer {i}") for i, f in enumerate(layers) if f is not None]
        return self.mask_from_canvas(self.read_canvas(background, "canvas background"), layers)

    def mask_from_file(self, path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
        """An uploaded mask file -> ((H, W) int64 class ids, notices for the user).

        Integer-label PNGs, palette PNGs and `.npy` label maps; a mask of another size is resized
        nearest-neighbour, with a notice. Errors name the file as the user called it, not our copy.
        """
        path = Path(path)
        try:
            _check_side(path, str(path))
            mask = self.pipe.read_mask(path)
        except (MaskError, DataLayoutError, ImageError) as e:
            raise type(e)(str(e).replace(str(path), path.name)) from e
        notices = []
        if mask.shape != (self.size, self.size):
            notices.append(
                f"{path.name}: {mask.shape[1]}x{mask.shape[0]} px resized (nearest) to the model's "
                f"{self.size}x{self.size}"
            )
            mask = np.asarray(
                PIL.Image.fromarray(mask.astype(np.uint8)).resize((self.size, self.size), PIL.Image.NEAREST)
            ).astype(np.int64)
        return mask, notices

    def start_image(self, path: str | os.PathLike) -> torch.Tensor:
        """An uploaded image -> (1, C, H, W) float32 in [0, 1] at the model's size, for `strength`."""
        path = Path(path)
        try:
            _check_side(path, str(path))
            image = read_image(path, self.card.img_channels, self.size)
        except (DataLayoutError, ImageError) as e:
            raise type(e)(str(e).replace(str(path), path.name)) from e
        scaled = image / 255.0 if image.dtype == np.uint8 else image  # `.npy` images are [0, 1] already
        return torch.from_numpy(np.asarray(scaled, np.float32))[None]

    # ---- sampling -----------------------------------------------------------------------------------

    def generate(
        self,
        mask: np.ndarray,
        settings: Settings,
        image: torch.Tensor | None = None,
        progress: Progress | None = None,
        notices: Sequence[str] = (),
    ) -> Run:
        """`settings.num_images` images under one mask; image k is drawn from seed + k.

        `notices`: what the request was told so far (a resized mask file); the settings written with the
        results record them, then the run's own (a mask that leaves the model nothing to follow).
        """
        self._check_omit(settings.omit)
        self._check_sampler(settings.sampler)
        seeds = [(settings.seed + k) % (MAX_SEED + 1) for k in range(settings.num_images)]
        kept = np.asarray(omit_classes(mask, settings.omit))
        images = self._sample([kept] * len(seeds), seeds, settings, image, progress)
        omitted = [self.class_names[c] for c in settings.omit]
        record = self._record("generate", settings, image, omit=omitted, seeds=seeds)
        own = [{"seed": s} for s in seeds]
        captions = [f"seed {s}" for s in seeds]
        notices = [*notices, *_nothing_to_follow(mask, kept)]
        return self._finish("generate", images, [kept] * len(seeds), captions, own, record, mask, notices)

    def sweep(self, mask: np.ndarray, settings: Settings, image: torch.Tensor | None = None,
              progress: Progress | None = None, notices: Sequence[str] = ()) -> Run:  # fmt: skip
        """One noise, all classes kept, then each class present in the mask omitted in turn (`notices`: as
        for `generate`); `settings.omit` and `num_images` are not used."""
        self._check_sampler(settings.sampler)
        settings = replace(settings, omit=(), num_images=1)
        present = [c for c in range(1, self.card.num_classes) if (mask == c).any()]
        variants = [(), *((c,) for c in present)]
        masks = [np.asarray(omit_classes(mask, v)) for v in variants]
        images = self._sample(masks, [settings.seed] * len(variants), settings, image, progress)
        captions = ["all classes kept", *(f"without {self.class_names[c]}" for c in present)]
        omitted = [[self.class_names[c] for c in v] for v in variants]
        record = self._record("sweep", settings, image, seeds=[settings.seed], variants=omitted)
        own = [{"seed": settings.seed, "omit": names} for names in omitted]
        absent = [n for c, n in enumerate(self.class_names) if c and c not in present]
        if present and absent:
            notices = [*notices, f"not in the mask, so not swept: {', '.join(absent)}"]
        notices = [*notices, *_nothing_to_follow(mask, mask)]
        return self._finish("sweep", images, masks, captions, own, record, mask, [*notices])

    def preview(self, mask: np.ndarray, omit: Sequence[int] = (), seed: int = 0) -> PIL.Image.Image:
        """One image of `mask` with `omit` left to the model, from the noise of `seed`, drawn at the model's
        default settings (its few-step student when it has one) and mask guidance (`guidance`): a quick look
        while the mask is painted.

        The mask and omitted classes are checked as `generate` checks them; nothing is written. Previews asked
        for at the same time are drawn together (`lanes.preview`).
        """
        seed = check_seed(seed, "seed")
        self._check_omit(omit)
        kept = np.asarray(omit_classes(mask, omit))
        [image] = self.lanes.preview.draw(self, [(kept, seed)], Recipe(self.name), most=self.per_call)
        return image

    def _check_omit(self, omit: Sequence[int]) -> None:
        bad = [c for c in omit if not 1 <= c < self.card.num_classes]
        if bad:
            raise MaskError(f"omit={list(omit)}: {bad[0]} is not a class id 1..{self.card.num_classes - 1}")

    def _check_sampler(self, sampler: str) -> None:
        if sampler not in self.samplers:
            raise ConfigError(
                f"sampler {sampler!r}: {self.name} has no distilled student; expected one of {list(self.samplers)}"
            )

    def _sample(self, masks, seeds, settings: Settings, image, progress) -> list[np.ndarray]:
        """One (H, W, C) uint8 image per (mask, seed), drawn with other requests at the same settings
        (`lanes.sample`); a request with a start image is drawn alone."""
        # The student draws in its own steps, whatever a request asks: requests differing only there share a call.
        steps = None if settings.sampler == STUDENT else settings.steps
        key = (self, steps, settings.sampler, settings.guidance_scale) if image is None else object()
        items = list(zip(masks, seeds, strict=True))
        return self.lanes.sample.draw(key, items, Recipe(self.name, settings, image), progress, self.per_call)

    def draw_batch(
        self, recipe: Recipe, items: list[tuple[np.ndarray, int]], progress: Progress | None
    ) -> list:
        """One network call: (kept mask (H, W), seed) pairs -> a PIL image each at the model's defaults and mask
        guidance (a preview recipe), or an (H, W, C) uint8 array each at the recipe's settings (STUDENT: the
        pipeline's defaults, which draw with the model's student)."""
        masks, seeds = zip(*items, strict=True)
        if recipe.settings is None:
            return self.pipe(
                list(masks), generator=_generators(seeds), output_type="pil", guidance_scale=self.guidance
            ).images
        settings, image = recipe.settings, recipe.image
        student = settings.sampler == STUDENT
        out = self.pipe(
            list(masks),
            num_inference_steps=None if student else settings.steps,
            sampler=None if student else settings.sampler,
            generator=_generators(seeds),
            image=image,
            strength=settings.strength if image is not None else 1.0,
            callback=progress,
            output_type="np",
            guidance_scale=settings.guidance_scale,
        ).images  # (B, H, W, C) float in [0, 1]
        return list((out * 255).round().astype(np.uint8))

    def _record(self, kind: str, settings: Settings, image, **extra) -> dict:
        return {
            "kind": kind,
            "model": self.name,
            **self.sampling(settings.sampler, settings.steps),
            "guidance_scale": settings.guidance_scale,
            "seed": settings.seed,
            **extra,
            "start_image_strength": settings.strength if image is not None else None,
            "precision": self.pipe.precision,
            "device": self.device,
            "classes": self.class_names,
        }

    def _finish(self, kind, images, masks, captions, own, record, mask, notices) -> Run:
        """Complete the record (notices, Dice) and captions, then write them: what is written is what the run
        holds. `own`: what each image's settings hold besides the run's."""
        record["notices"] = notices
        if self.segmenter is not None:
            # `masks` hold the kept classes only, so scoring every class of them scores the kept ones.
            dice = faithfulness(
                self.segmenter, np.stack(images), np.stack(masks), range(1, self.card.num_classes)
            )
            record["dice_kept"] = [None if math.isnan(d) else round(d, 4) for d in dice]
            captions = [
                c if math.isnan(d) else f"{c} · Dice {d:.2f}" for c, d in zip(captions, dice, strict=True)
            ]
        pngs = [
            (f"{kind}_{k:02d}_seed{o['seed']}.png", image, {**record, **o, "image": k, "caption": caption})
            for k, (image, caption, o) in enumerate(zip(images, captions, own, strict=True))
        ]
        folder = new_run_folder(self.results, kind)
        files, archive = write_run(folder, pngs, mask, record, f"segdiff_{kind}_seed{record['seed']}.zip")
        return Run(kind, images, masks, captions, record, folder, files, archive, notices)

    # ---- results out --------------------------------------------------------------------------------

    def gallery(self, run: Run, contours: bool = False) -> list[tuple[np.ndarray | str, str]]:
        """(image, caption) pairs to show; contours draw the kept classes' outlines at display size.

        Without contours the items are the written PNGs, so a download from the gallery keeps its
        settings. Outlines are drawn on a nearest-upscaled copy: a 1 px line at 64 px would hide the
        structure it outlines.
        """
        if not contours:
            return [(str(f), c) for f, c in zip(run.files, run.captions, strict=True)]
        s = self.display_scale
        items = []
        for image, mask, caption in zip(run.images, run.masks, run.captions, strict=True):
            big = np.repeat(np.repeat(image, s, axis=0), s, axis=1)
            big_mask = np.repeat(np.repeat(mask, s, axis=0), s, axis=1)
            items.append((overlay(big, big_mask, self.palette, style="contour"), caption))
        return items


def model_name(folder: str | os.PathLike) -> str:
    """What the studio calls a model folder: its name (a released NAME/unet/ checkpoint goes by NAME)."""
    folder = Path(folder).resolve()
    return (folder.parent if folder.name == "unet" else folder).name


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    # One CPU generator per image: the pipeline draws each image's noise (both stages' for a cascade) from its
    # own, on the CPU, so an image depends on its seed alone, on any device, and in a batch of any size.
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _nothing_to_follow(mask: np.ndarray, kept: np.ndarray) -> list[str]:
    """A notice when the images follow no class: the mask is all background, or every class in it omitted."""
    if not mask.any():
        return ["the mask is empty (all background), so the images follow no class; paint or upload a mask"]
    if not kept.any():
        return ["every class in the mask is omitted, so the images follow none of it"]
    return []


def _downscale_labels(labels: np.ndarray, size: int, num_classes: int) -> np.ndarray:
    """(S, S) class ids -> (size, size) by the most frequent class of each block; nearest otherwise."""
    h, w = labels.shape
    if (h, w) == (size, size):
        return labels.astype(np.int64)
    if h % size or w % size:
        return np.asarray(
            PIL.Image.fromarray(labels.astype(np.uint8)).resize((size, size), PIL.Image.NEAREST)
        ).astype(np.int64)
    blocks = labels.reshape(size, h // size, size, w // size)
    counts = np.stack([(blocks == k).sum(axis=(1, 3)) for k in range(num_classes)], axis=-1)  # (H, W, K)
    return counts.argmax(-1).astype(np.int64)


def _open_image(file: str | os.PathLike | bytes, source: str) -> PIL.Image.Image:
    """A PNG (or other PIL image) path or bytes, opened lazily after its header passed `_check_side`."""
    _check_side(file, source)
    try:
        return PIL.Image.open(io.BytesIO(file) if isinstance(file, bytes) else file)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataLayoutError(f"{source}: cannot read the file ({e})") from e


def _check_side(file: str | os.PathLike | bytes, source: str) -> None:
    """Refuse an image or `.npy` larger than MAX_IMAGE_SIDE on a side, from its header alone."""
    try:
        if not isinstance(file, bytes) and Path(file).suffix.lower() == ".npy":
            with open(file, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read = (
                    np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                )
                shape, _, _ = read(f)
            sides = shape[::-1]  # width first, as for images
        else:
            with PIL.Image.open(io.BytesIO(file) if isinstance(file, bytes) else file) as im:
                sides = im.size
    except PIL.Image.DecompressionBombError as e:  # PIL's own cap, far above ours
        raise ImageError(f"{source}: {e}; expected at most {MAX_IMAGE_SIDE} px on a side") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise DataLayoutError(f"{source}: cannot read the file ({e})") from e
    if max(sides, default=0) > MAX_IMAGE_SIDE:
        size = " x ".join(str(n) for n in sides)
        raise ImageError(
            f"{source}: {size} px, expected at most {MAX_IMAGE_SIDE} px on a side (MAX_IMAGE_SIDE)"
        )


def load_segmenter(studio: Studio) -> tuple[Segmenter | None, str | None]:
    """(the Dice segmenter the model card names (a sub-folder of the model), or None; why it is missing).

    The segmenter only scores results, so a damaged one costs the Dice readout, not the model: the studio
    opens without it, says so in the log, and its summary line says so on the page.
    """
    if studio.card.segmenter is None or studio.folder is None:
        return None, None
    folder = studio.folder / studio.card.segmenter
    try:
        return Segmenter.from_pretrained(folder, device=studio.pipe.device), None
    except (SegdiffError, SafetensorError) as e:
        log.warning("segdiff studio: %s opens without its Dice readout: %s", studio.name, e)
        return None, f"the segmenter in {studio.card.segmenter}/ cannot be read"
