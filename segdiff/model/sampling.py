"""Sampling to disk: a grid beside its masks, the mask-removal and blank-mask figures, and many samples.

These are the original code's `eval` and `eval_many` modes, made safe to interrupt: every file is written
under a temporary name and renamed, and `sample_many` skips the files already there. The noise of each
image depends only on (seed, mask index), and images are drawn in fixed batches (the k-th run of
`eval_batch_size` masks in the sampling order), so a resumed run, or one split over the processes of
`accelerate launch`, writes the images an uninterrupted single process would, bit for bit on the same
hardware. (Batches of another size may differ in the last bits: some kernels pick their algorithm by batch.)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from accelerate import PartialState
from accelerate.utils import gather
from tqdm.auto import tqdm

from ..choices import MAX_GUIDANCE, SAMPLERS, check_seed, mixed_seed, precision_of
from ..data.layout import SegDataset
from ..data.masks import ablate, omit_classes, tile
from ..errors import CheckpointError, ConfigError, check_range
from ..files import write_bytes, write_png
from ..processes import processes
from ..resolve import is_hub_id
from .card import ModelCard
from .pipeline import DEFAULT_STEPS, SegDiffPipeline

# The original sampled DDIM models with DDIM (50 steps, eta 0) and DDPM models with all 1000 DDPM steps.
ORIGINAL_SAMPLERS: dict[str, tuple[str, int]] = {"DDIM": ("ddim", 50), "DDPM": ("ddpm", 1000)}


def sampler_for(model_type: str, sampler: str | None = None, steps: int | None = None) -> tuple[str, int]:
    """(sampler, steps): the original's choice for `model_type` unless chosen.

    A sampler other than the original's defaults to the pipeline's step count: DPM++ needs about a dozen where
    DDPM needed 1000.
    """
    original, original_steps = ORIGINAL_SAMPLERS[model_type]
    sampler = sampler or original
    return sampler, steps or (original_steps if sampler == original else DEFAULT_STEPS)


@dataclass(frozen=True)
class EvalConfig:
    """Settings of the `eval` and `eval_many` modes; the CLI fills them from the original flags."""

    model_dir: str  # a segdiff model, an original run folder or a released NAME/unet/ checkpoint, or a Hub id
    output_dir: str  # samples/ and samples_many_{N}/ go here
    seg_dir: str | None = None  # masks come from SEG_DIR/*/test; None for unconditional models
    img_dir: str | None = None  # real test images, shown beside the samples in the grid
    num_classes: int | None = None  # K including background; only original checkpoints need it
    img_size: int | None = None  # checked against the model when given
    img_channels: int | None = None  # likewise
    model_type: str = "DDPM"  # picks the original's sampler unless `sampler` is set
    eval_batch_size: int = 8
    eval_sample_size: int = 1000
    sampler: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float = 1.0  # mask guidance; 1 = none
    shuffle: bool = True  # which test masks the grid shows and eval_many uses when N < the test set
    ablated_masks: bool = False  # the original's random class removal at sampling time
    mask_removal: bool = False
    blank_mask: bool = False
    seed: int = 0
    precision: str = "auto"  # bf16/fp16 on GPUs, fp32 where the CPU lacks native bf16
    device: str | None = None

    def __post_init__(self):
        if self.model_type not in ORIGINAL_SAMPLERS:
            raise ConfigError(f"--model_type {self.model_type}: expected one of {sorted(ORIGINAL_SAMPLERS)}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ConfigError(f"--scheduler {self.sampler}: expected one of {sorted(SAMPLERS)}")
        object.__setattr__(self, "precision", precision_of(self.precision, "--mixed_precision"))
        check_range("--eval_batch_size", self.eval_batch_size, 1, 4096)
        check_range("--eval_sample_size", self.eval_sample_size, 1, 10_000_000)
        check_seed(self.seed)
        if self.num_inference_steps is not None:
            check_range("--num_inference_steps", self.num_inference_steps, 1, 1000)
        check_range("--guidance_scale", self.guidance_scale, 1, MAX_GUIDANCE)
        if self.guidance_scale != 1 and self.seg_dir is None:
            raise ConfigError(
                f"--guidance_scale {self.guidance_scale:g}: mask guidance needs a segmentation-guided model: "
                "add --segmentation_guided --seg_dir SEG_DIR"
            )
        if self.seg_dir is None and (self.mask_removal or self.blank_mask or self.ablated_masks):
            raise ConfigError(
                "--eval_mask_removal, --eval_blank_mask and --eval_ablated_masks need a segmentation-guided "
                "model: add --segmentation_guided --seg_dir SEG_DIR"
            )


def open_model(config: EvalConfig, state: PartialState | None = None) -> SegDiffPipeline:
    """The model to sample from, checked against what the flags say it is; on `state`'s device if launched."""
    path = Path(config.model_dir)
    if not path.is_dir() and not is_hub_id(config.model_dir):
        raise CheckpointError(
            f"{path}: no such model folder (train one first, or point --model_dir at a model folder)"
        )
    guided = config.seg_dir is not None
    pipe = SegDiffPipeline.from_pretrained(
        path,
        num_classes=config.num_classes if guided else None,
        device=config.device or (state.device if state is not None and state.num_processes > 1 else None),
        precision=config.precision,
    )
    pipe.set_progress_bar_config(disable=True)
    card = pipe.card
    if guided != card.guided:
        raise CheckpointError(
            f"{path}: the model is {'segmentation-guided' if card.guided else 'unconditional'}; "
            + ("add --segmentation_guided --seg_dir SEG_DIR" if card.guided else "drop --segmentation_guided")
        )
    for flag, asked, actual in (
        ("--img_size", config.img_size, card.img_size),
        ("--num_img_channels", config.img_channels, card.img_channels),
    ):
        if asked is not None and asked != actual:
            raise CheckpointError(f"{path}: the model was trained with {flag} {actual}, not {asked}")
    return pipe


def evaluate(config: EvalConfig) -> list[Path]:
    """The `eval` mode: one grid of samples beside their masks, and the figures asked for. -> files written.

    samples/eval_grid.png         rows: coloured masks, samples, real images (those given by `img_dir`)
    samples/eval_mask_removal.png per example, masks above samples as classes go one after another
    samples/eval_blank_mask.png   samples conditioned on all-background masks

    Under `accelerate launch` the batches (grid, blank masks, each mask-removal state) are shared out
    between the processes and the main process writes the figures; every process returns their paths.
    """
    state = processes()
    pipe = open_model(config, state)
    # One bar per batch's steps: the original settings' 1000 DDPM steps are minutes of silence on a CPU.
    pipe.set_progress_bar_config(desc="eval", leave=False, disable=not state.is_main_process)
    sampler, steps = sampler_for(config.model_type, config.sampler, config.num_inference_steps)
    folder = Path(config.output_dir) / "samples"
    # file name -> the masks of its batches, (B, H, W) each; None for an unconditional model's grid
    figures: dict[str, list[torch.Tensor] | None] = {"eval_grid.png": None}
    masks = images = None
    if pipe.card.guided:
        test_set = _test_set(config, pipe.card, images=config.img_dir is not None)
        picks = _order(len(test_set), config)[: config.eval_batch_size]
        masks = torch.stack([test_set[i]["mask"] for i in picks])  # (B, H, W)
        images = torch.stack([test_set[i]["image"] for i in picks]) if config.img_dir else None
        figures["eval_grid.png"] = [masks]
        if config.mask_removal:
            figures["eval_mask_removal.png"] = removal_states(masks)
        if config.blank_mask:
            figures["eval_blank_mask.png"] = [torch.zeros_like(masks)]
    n = config.eval_batch_size if masks is None else masks.shape[0]
    batches = [batch for states in figures.values() for batch in (states or [None])]
    samples = _sample_shared(
        state, pipe, batches, list(range(n)), sampler, steps, config.seed, config.guidance_scale
    )
    if state.is_main_process:
        for name, states in figures.items():
            batch = [samples.pop(0) for _ in states or [None]]
            if name == "eval_mask_removal.png":
                figure = removal_figure(pipe, states, batch)
            else:
                figure = grid_figure(pipe, batch[0], None if states is None else states[0], images)
            write_png(figure, folder / name)
    state.wait_for_everyone()
    return [folder / name for name in figures]


def sample_many(config: EvalConfig) -> tuple[Path, int, int]:
    """The `eval_many` mode: N samples written one file each. -> (folder, files written, files skipped).

    Guided models draw one sample per test mask, at most N, named `condon_<mask file name>`; unconditional
    ones draw N named `{i:04d}.png`. Files already present are skipped, so an interrupted run resumes: a
    batch with any file missing is drawn whole again, so each image comes from the batch it always does.
    Under `accelerate launch` the batches are shared out between the processes; each file is written once.
    """
    state = processes()
    pipe = open_model(config, state)
    card = pipe.card
    sampler, steps = sampler_for(config.model_type, config.sampler, config.num_inference_steps)
    folder = Path(config.output_dir) / f"samples_many_{config.eval_sample_size}"
    if card.guided:
        test_set = _test_set(config, card, images=False)
        picks = _order(len(test_set), config)[: config.eval_sample_size]
        names = [sample_name(test_set.cases[i].name, i, card.img_channels) for i in picks]
    else:
        test_set = None
        picks = list(range(config.eval_sample_size))
        names = [sample_name(None, i, card.img_channels) for i in picks]
    jobs = list(zip(picks, names, strict=True))
    batches = [
        jobs[start : start + config.eval_batch_size] for start in range(0, len(jobs), config.eval_batch_size)
    ]
    missing = [{name for _, name in batch if not (folder / name).exists()} for batch in batches]
    todo = [(batch, wanted) for batch, wanted in zip(batches, missing, strict=True) if wanted]
    written = sum(len(wanted) for _, wanted in todo)
    state.wait_for_everyone()  # all processes see the same files missing before any writes one

    mine = todo[state.process_index :: state.num_processes]
    bar = tqdm(
        total=sum(len(wanted) for _, wanted in mine),
        unit="image",
        desc="eval_many",
        disable=not state.is_main_process,
    )
    for batch, wanted in mine:
        masks = None
        if test_set is not None:
            masks = torch.stack([test_set[i]["mask"] for i, _ in batch])  # (B, H, W)
            if config.ablated_masks:
                masks = torch.cat(
                    [
                        ablate(m[None], card.num_classes, generator=noise_generator(config.seed, i, stream=1))
                        for m, (i, _) in zip(masks, batch, strict=True)
                    ]
                )
        images = _sample(
            pipe, masks, [i for i, _ in batch], sampler, steps, config.seed, config.guidance_scale
        )
        for (_, name), image in zip(batch, images, strict=True):
            if name in wanted:
                write_sample(image, folder / name)
        bar.update(len(wanted))
    bar.close()
    state.wait_for_everyone()
    return folder, written, len(picks) - written


# ---- figures --------------------------------------------------------------------------------------------


def sample_grid(
    pipe: SegDiffPipeline,
    count: int,
    masks: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    *,
    sampler: str,
    steps: int,
    seed: int = 0,
) -> np.ndarray:
    """Rows: coloured masks (guided models), one sample each, real images when given. -> (H', W', 3) uint8.

    masks (B, H, W) int64 with B = count; images (B, C, H, W) float in [-1, 1].
    """
    return grid_figure(pipe, _sample(pipe, masks, list(range(count)), sampler, steps, seed), masks, images)


def grid_figure(
    pipe: SegDiffPipeline, samples: np.ndarray, masks: torch.Tensor | None, images: torch.Tensor | None
) -> np.ndarray:
    """`sample_grid`'s figure from its samples (B, H, W, C) float in [0, 1]. -> (H', W', 3) uint8."""
    rows = [to_rgb(samples)]
    if masks is not None:
        rows.insert(0, pipe.card.palette.to_rgb(masks.numpy()))
    if images is not None:
        rows.append(to_rgb((images.permute(0, 2, 3, 1).numpy() + 1) / 2))
    return tile([cell for row in rows for cell in row], columns=samples.shape[0])


def mask_removal_grid(
    pipe: SegDiffPipeline, masks: torch.Tensor, *, sampler: str, steps: int, seed: int = 0
) -> np.ndarray:
    """Classes removed one after another, cumulatively, until the masks are blank. -> (H', W', 3) uint8.

    The classes present in `masks` (B, H, W) go in ascending id order, as in the original figure. Each
    example gets a row of masks with the samples below; every sample of a row starts from the same noise,
    so what changes along it is the conditioning alone. Colours come from the model card.
    """
    states = removal_states(masks)
    indices = list(range(masks.shape[0]))
    return removal_figure(
        pipe, states, [_sample(pipe, state, indices, sampler, steps, seed) for state in states]
    )


def removal_states(masks: torch.Tensor) -> list[torch.Tensor]:
    """`masks` (B, H, W), then with the classes present removed one after another, up to blank masks."""
    present = [c for c in masks.unique().tolist() if c != 0]
    return [omit_classes(masks, present[:k]) for k in range(len(present) + 1)]


def removal_figure(
    pipe: SegDiffPipeline, states: list[torch.Tensor], samples: list[np.ndarray]
) -> np.ndarray:
    """`mask_removal_grid`'s figure from each state's samples (B, H, W, C). -> (H', W', 3) uint8."""
    cells = []
    for b in range(states[0].shape[0]):
        cells += [pipe.card.palette.to_rgb(state[b].numpy()) for state in states]
        cells += list(to_rgb(np.stack([s[b] for s in samples])))
    return tile(cells, columns=len(states))


# ---- files ---------------------------------------------------------------------------------------------


def sample_name(mask_name: str | None, index: int, channels: int) -> str:
    """The file name of a sample, as the original named them.

    Guided: `condon_<mask file name>`, in the image format its suffix names (PNG when no image format has
    that suffix); unconditional: `{index:04d}.png`. Images of other than 1 or 3 channels are `.npy`.
    """
    name = Path(f"condon_{mask_name}" if mask_name is not None else f"{index:04d}.png")
    if channels not in (1, 3):
        return name.with_suffix(".npy").name
    return (
        name.name
        if name.suffix.lower() in PIL.Image.registered_extensions()
        else name.with_suffix(".png").name
    )


def write_sample(image: np.ndarray, path: Path) -> Path:
    """(H, W, C) float in [0, 1] -> an image file (C = 1 or 3), else a `.npy` (C, H, W) float32 array."""
    buffer = io.BytesIO()
    if path.suffix == ".npy":
        np.save(buffer, np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
    else:
        pixels = (image * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil
        picture = PIL.Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        picture.save(buffer, format=PIL.Image.registered_extensions()[path.suffix.lower()])
    return write_bytes(path, buffer.getvalue())


def to_rgb(images: np.ndarray) -> np.ndarray:
    """(B, H, W, C) float in [0, 1] -> (B, H, W, 3) uint8; images of C != 3 show their first channel."""
    images = (images.clip(0, 1) * 255).round().astype(np.uint8)
    return images if images.shape[-1] == 3 else np.repeat(images[..., :1], 3, axis=-1)


# ---- sampling ------------------------------------------------------------------------------------------


def noise_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """Image `index`'s own generator: its noise (stream 0) or its mask ablation (stream 1).

    Every (seed, index, stream) has noise of its own (`mixed_seed`), whatever the batching or the process.
    """
    return torch.Generator().manual_seed(mixed_seed(seed, stream, index))


def _sample(
    pipe, masks, indices: Sequence[int], sampler: str, steps: int, seed: int, guidance_scale: float = 1.0
) -> np.ndarray:
    """One sample per index (and mask), each from its own generator. -> (B, H, W, C) float in [0, 1]."""
    return pipe(
        masks if pipe.card.guided else None,
        batch_size=len(indices),
        generator=[noise_generator(seed, i) for i in indices],
        scheduler=sampler,
        num_inference_steps=steps,
        output_type="np",
        guidance_scale=guidance_scale,
    ).images


def _sample_shared(
    state: PartialState,
    pipe,
    batches: list,
    indices: Sequence[int],
    sampler: str,
    steps: int,
    seed: int,
    guidance_scale: float = 1.0,
) -> list[np.ndarray] | None:
    """`_sample` of each batch of masks, the batches shared out between the processes of a launch.

    -> on the main process the samples of every batch, in order ((B, H, W, C) each); None elsewhere.
    """
    if state.num_processes == 1:
        return [_sample(pipe, masks, indices, sampler, steps, seed, guidance_scale) for masks in batches]
    per_process = -(-len(batches) // state.num_processes)
    shape = (len(indices), pipe.card.img_size, pipe.card.img_size, pipe.card.img_channels)
    mine = torch.zeros(per_process, *shape, device=state.device)  # padded so every process sends as many
    for slot, masks in enumerate(batches[state.process_index :: state.num_processes]):
        mine[slot] = torch.from_numpy(_sample(pipe, masks, indices, sampler, steps, seed, guidance_scale))
    everyone = gather(mine).cpu().numpy()  # (processes x per_process, B, H, W, C), by process
    if not state.is_main_process:
        return None
    return [
        everyone[(j % state.num_processes) * per_process + j // state.num_processes]
        for j in range(len(batches))
    ]


def _test_set(config: EvalConfig, card: ModelCard, images: bool) -> SegDataset:
    """The test masks, merged over segtypes as in training (and the test images when asked)."""
    return SegDataset(
        config.img_dir if images else None,
        config.seg_dir,
        "test",
        card.img_size,
        card.img_channels,
        card.num_classes,
        card.palette,
    )


def _order(n: int, config: EvalConfig) -> list[int]:
    """Test-set indices, shuffled by the seed unless --eval_noshuffle_dataloader."""
    if not config.shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
