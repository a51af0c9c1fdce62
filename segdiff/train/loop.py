"""Training on accelerate: one code path for a CPU, one GPU, many GPUs and many nodes.

An MSE diffusion loss over 1000 DDPM timesteps with the encoded mask concatenated to the noisy image;
mask-ablated training removes each non-background class with probability 0.5, per example, and images
without masks (`unlabelled_dir`) train beside the labelled ones with every class removed. AdamW with a
cosine schedule after a linear warm-up, gradients clipped at 1.0, as the original. What the UNet predicts,
the loss weighting, the noise schedule, the learning rate and the EMA come from a `Recipe`
(`segdiff.train.recipes`): `original` is the original code's, `fast` the measured default.

A run killed at any moment resumes from its last complete checkpoint (`segdiff.train.checkpoints`), or the one
before when the newest is damaged. One run at a time trains in a folder; a second is refused while the first
runs.

Exact resumes: each epoch's order of examples is a function of (seed, epoch) alone, and no RNG draw depends
on where a run started, so a run resumed mid-epoch trains on exactly the batches, noise and timesteps of an
uninterrupted one. Under N processes (`accelerate launch`) the loader is sharded, steps are counted on the
sharded loader, and each optimizer step sees the global batch N x --train_batch_size: epochs, steps, the LR
schedule, grids, saves and checkpoints are those of one process with the same global batch.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.utils.data import ConcatDataset
from tqdm.auto import tqdm

from ..choices import (
    DEFAULT_STEPS,
    MAX_SEED,
    SAMPLERS,
    Precision,
    accelerate_precision,
    mixed_seed,
    precision_of,
)
from ..data.layout import SegDataset, UnlabelledDataset
from ..data.masks import Encoding, Palette, ablate, encode
from ..errors import CheckpointError, ConfigError, DataLayoutError, check_range
from ..files import write_png, write_text
from ..model.card import CARD_FILE, ModelCard, Student, Upscaling
from ..model.pipeline import SegDiffPipeline
from ..model.sampling import ORIGINAL_SAMPLERS, sample_grid, sampler_for
from ..model.unet import PRESETS, build_unet, denoise, low_res_condition, shrink
from ..processes import announce, launched_processes
from .adversarial import CRITIC_LEARNING_RATE, Adversary, Critic, critic_optimizer
from .checkpoints import (
    TrainerState,
    check_same_model,
    check_same_schedule,
    check_student_folder,
    clean_interrupted,
    hold_run_folder,
    latest_checkpoint,
    resume,
    save_checkpoint,
)
from .distillation import Trajectory, distill_loss, segments
from .recipes import DEFAULT_RECIPE, RECIPES, Recipe


def run_name(
    model_type: str,
    dataset: str,
    img_size: int,
    segmentation_guided: bool = False,
    use_ablated_segmentations: bool = False,
    eval_mask_removal: bool = False,
    eval_blank_mask: bool = False,
) -> str:
    """The original code's run folder name: `{model_type.lower()}-{dataset}-{img_size}[-segguided][-ablated]`.

    As in the original, the eval figure flags also add `-ablated`: they were meant for ablated models.
    """
    name = f"{model_type.lower()}-{dataset}-{img_size}"
    if segmentation_guided:
        name += "-segguided"
    if use_ablated_segmentations or eval_mask_removal or eval_blank_mask:
        name += "-ablated"
    return name


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; the CLI fills it from the original flags (named in the errors)."""

    output_dir: str
    img_dir: str | None
    seg_dir: str | None = None  # None trains an unconditional model
    num_classes: int = 0  # K including background; needed when seg_dir is given
    class_names: tuple[str, ...] = ()
    img_size: int = 256
    img_channels: int = 1
    preset: str | None = None  # None: "paper", the original network; "upscaler" for an upscaler
    encoding: Encoding = "onehot"  # "original" trains models the original code can also open
    model_type: str = "DDPM"  # the stored noise scheduler's class, as the original named its runs
    train_batch_size: int = 32
    eval_batch_size: int = 8
    num_epochs: int = 200
    max_train_steps: int | None = None  # overrides num_epochs when set
    recipe: str = DEFAULT_RECIPE  # a name in segdiff.train.recipes.RECIPES; the fields below override its parts
    prediction_type: str | None = None
    loss_weighting: str | None = None
    snr_gamma: float | None = None
    beta_schedule: str | None = None
    zero_terminal_snr: bool | None = None
    learning_rate: float | None = None  # None: the recipe's (for `fast`, by preset)
    lr_warmup_steps: int | None = None
    ema: bool | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: Precision = "auto"  # auto: what `accelerate launch`/`accelerate config` says, else fp32
    ablate: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 2
    resume: bool = False
    resume_epoch: int | None = None  # the original's weights-only resume from output_dir/unet
    seed: int = 0
    save_image_epochs: int = 20  # sample grid, as the original
    save_model_epochs: int = 30
    sampler: str | None = None  # for the grid; None: the original's sampler for model_type
    num_inference_steps: int | None = None
    dataloader_num_workers: int = 0
    # Off: no gain measured on a 2-core CPU (within noise, fp32 and bf16), and on an H200 the layout made
    # sampling 22% slower (the UNet's GroupNorms pay for it) and bf16 training no faster than fp32 without it.
    channels_last: bool = False
    # GPU speed candidates measured by benchmarks/train_speed.py (off: no gain on a 2-core CPU).
    compile: bool = False  # torch.compile the UNet (inductor): slow first steps, then faster ones
    log_every: int = 1  # log the loss (mean since the last row) every N steps: each log waits for the GPU
    # A cascade's second stage: the base model folder it upscales, and the size of the random crops it trains
    # on (None: half of img_size). Its UNet has no attention, so crops train it for whole images.
    upscale_from: str | None = None
    crop_size: int | None = None
    # Distillation: a trained model (folder or Hub id) whose few-step student this run trains; the run folder
    # then holds the teacher with its student in student/ (`segdiff.train.distillation`).
    distill_from: str | None = None
    student_steps: int = 2
    teacher_steps: int | None = None  # None: DEFAULT_STEPS, or the steps an upscaler's card records
    # A patch critic's term beside the distillation loss, this much of it (`segdiff.train.adversarial`); 0: none.
    adversarial_weight: float = 0.0
    # Images without masks (DIR/train/ or DIR itself), trained beside the labelled ones with every class
    # ablated: they teach what the images look like, the labelled ones how masks lay them out (`_train_set`).
    unlabelled_dir: str | None = None
    # Unlabelled images teach nothing of the masks, so few labelled ones among many would learn them from a
    # sliver of each batch (50 of 1086: 5%). Each epoch repeats the labelled set to make about this share of
    # it; 0: every image once, plain concatenation. Not yet measured against other shares.
    labelled_fraction: float = 0.5
    command: str = ""  # recorded in the model card
    extra_card: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.preset is None:
            object.__setattr__(self, "preset", "upscaler" if self.upscale_from else "paper")
        if self.upscale_from and self.crop_size is None:
            object.__setattr__(self, "crop_size", self.img_size // 2)
        object.__setattr__(self, "mixed_precision", precision_of(self.mixed_precision, "--mixed_precision"))
        if not self.img_dir:
            raise ConfigError("training needs --img_dir IMG_DIR (holding IMG_DIR/train/ and IMG_DIR/val/)")
        if not self.output_dir:
            raise ConfigError("--output_dir is empty")
        if self.seg_dir is not None:
            if not self.num_classes:
                raise ConfigError(
                    "segmentation-guided training needs --num_segmentation_classes K (classes including "
                    "background 0)"
                )
            check_range("--num_segmentation_classes", self.num_classes, 2, 256)
            if self.class_names and len(self.class_names) != self.num_classes:
                raise ConfigError(
                    f"--class_names: {len(self.class_names)} names ({', '.join(self.class_names)}) for "
                    f"--num_segmentation_classes {self.num_classes}; give one per class, background first"
                )
        choices = (
            ("--recipe", self.recipe, RECIPES),
            ("--preset", self.preset, PRESETS),
            ("--mask_encoding", self.encoding, ("onehot", "original")),
            ("--model_type", self.model_type, ORIGINAL_SAMPLERS),
            ("--scheduler", self.sampler, (None, *SAMPLERS)),
        )
        for flag, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"{flag} {value}: expected one of {sorted(a for a in allowed if a)}")
        check_range("--num_img_channels", self.img_channels, 1, 64)
        check_range("--img_size", self.img_size, 8, 4096)
        halvings = len(PRESETS[self.preset]["block_out_channels"]) - 1
        sizes = [("--img_size", self.img_size)]
        if self.upscale_from:
            check_range("--crop_size", self.crop_size, 8, self.img_size)
            sizes.append(("--crop_size", self.crop_size))
        # An upscaler's UNet runs on pixel-unshuffled inputs: one more halving.
        factor = 2**halvings * (Upscaling().unshuffle if self.upscale_from else 1)
        for flag, size in sizes:
            if size % factor:
                raise ConfigError(
                    f"{flag} {size}: the {self.preset} preset{' of an upscaler' if self.upscale_from else ''} "
                    f"halves the image {factor.bit_length() - 1} times, so the size must be a multiple of {factor}"
                )
        for flag, value, low, high in (
            ("--train_batch_size", self.train_batch_size, 1, 4096),
            ("--eval_batch_size", self.eval_batch_size, 1, 4096),
            ("--num_epochs", self.num_epochs, 1, 1_000_000),
            ("--max_train_steps", self.max_train_steps, 1, 100_000_000),
            ("--learning_rate", self.learning_rate, 1e-10, 1.0),
            ("--lr_warmup_steps", self.lr_warmup_steps, 0, 100_000_000),
            ("--gradient_accumulation_steps", self.gradient_accumulation_steps, 1, 4096),
            ("--checkpointing_steps", self.checkpointing_steps, 1, 100_000_000),
            ("--checkpoints_total_limit", self.checkpoints_total_limit, 1, 1_000_000),
            ("--resume_epoch", self.resume_epoch, 0, 1_000_000),
            ("--seed", self.seed, 0, MAX_SEED),
            ("--save_image_epochs", self.save_image_epochs, 1, 1_000_000),
            ("--save_model_epochs", self.save_model_epochs, 1, 1_000_000),
            ("--num_inference_steps", self.num_inference_steps, 1, 1000),
            ("--dataloader_num_workers", self.dataloader_num_workers, 0, 256),
            ("--log_every", self.log_every, 1, 1_000_000),
            ("--student_steps", self.student_steps, 1, 1000),
            ("--teacher_steps", self.teacher_steps, 1, 1000),
            ("--adversarial_weight", self.adversarial_weight, 0, 100),
            ("--labelled_fraction", self.labelled_fraction, 0, 0.95),
        ):
            if value is not None:
                check_range(flag, value, low, high)
        if self.resume and self.resume_epoch is not None:
            raise ConfigError("--resume and --resume_epoch: choose one (--resume continues the full state)")
        self.training_recipe  # noqa: B018 - refuses contradictory recipe settings now, not mid-run

    @property
    def training_recipe(self) -> Recipe:
        """The named recipe with this run's overrides."""
        return RECIPES[self.recipe].with_overrides(
            prediction_type=self.prediction_type,
            loss_weighting=self.loss_weighting,
            snr_gamma=self.snr_gamma,
            beta_schedule=self.beta_schedule,
            zero_terminal_snr=self.zero_terminal_snr,
            learning_rate=self.learning_rate,
            lr_warmup_steps=self.lr_warmup_steps,
            ema=self.ema,
        )


class EpochOrder(torch.utils.data.Sampler):
    """A shuffled order of `n` examples that is a function of (seed, epoch) alone; set `epoch` before each pass.

    A sampler drawing from the global RNG would give a run resumed mid-epoch a new permutation, training
    some examples twice and others not at all. Every process draws the same order; accelerate shards it.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=generator).tolist())


def train(config: TrainConfig) -> Path:
    """Train, checkpoint and save the model to `config.output_dir`; returns that folder (on every process).

    The main process holds the folder for the run: a second run there is refused, naming the first.
    With `distill_from`, the run trains that model's few-step student instead (`segdiff.train.distillation`).
    """
    if config.adversarial_weight and not config.distill_from:
        raise ConfigError(
            f"--adversarial_weight {config.adversarial_weight}: a term of distillation (--mode distill); "
            "a model trains without it"
        )
    teacher = None
    if config.distill_from:
        teacher = SegDiffPipeline.from_pretrained(
            config.distill_from, num_classes=config.num_classes or None, device="cpu", precision="fp32"
        )
        config = _for_teacher(config, teacher.card)
        check_student_folder(config.output_dir, config.distill_from)
    if config.unlabelled_dir and config.seg_dir is not None and not config.ablate:  # after the teacher's say
        raise ConfigError(
            f"--unlabelled_dir {config.unlabelled_dir}: images without masks train with every class removed, "
            "which only a mask-ablated model reads as 'any anatomy'; add --use_ablated_segmentations"
        )
    if os.environ.get("RANK", "0") != "0":  # the other processes of a launch write with the main one
        return _train(config, teacher)
    with hold_run_folder(config.output_dir):
        return _train(config, teacher)


def _for_teacher(config: TrainConfig, card: ModelCard) -> TrainConfig:
    """A distillation's settings: the teacher's size, classes, channels and encoding, refused where the data or
    the flags disagree; ablated masks when the teacher learned them, so its student can omit classes too."""
    source = f"--model_dir {config.distill_from}"
    if card.guided and config.seg_dir is None:
        raise ConfigError(
            f"{source}: a segmentation-guided model; distilling it needs --segmentation_guided --seg_dir"
        )
    upscaling = card.upscaling
    teacher_steps = config.teacher_steps or (upscaling.steps if upscaling else DEFAULT_STEPS)
    if teacher_steps % config.student_steps:
        raise ConfigError(
            f"--student_steps {config.student_steps}: each student step stands for a whole number of teacher "
            f"steps; expected a divisor of --teacher_steps {teacher_steps}"
        )
    flags = card.training.get("flags", {})
    return replace(
        config,
        img_size=card.img_size,
        img_channels=card.img_channels,
        num_classes=card.num_classes,
        class_names=tuple(card.class_names),
        encoding=card.encoding if card.guided else config.encoding,
        preset=card.preset or "paper",
        teacher_steps=teacher_steps,
        ablate=config.ablate or bool(flags.get("ablate")),
        crop_size=config.crop_size or (card.img_size // 2 if upscaling else None),
    )


def _train(config: TrainConfig, teacher: SegDiffPipeline | None = None) -> Path:
    out = Path(config.output_dir)
    accelerator = _accelerator(config, out)
    announce(accelerator)
    _fast_backends(accelerator.device)
    # Each process its own noise, process 0 as a single one; wrapped, as numpy takes seeds below 2^32 only.
    set_seed((config.seed + accelerator.process_index) % (MAX_SEED + 1))
    recipe = config.training_recipe
    base = _base_model(config, accelerator.device) if config.upscale_from else None
    if teacher is not None:
        teacher.to(accelerator.device)
        card = _student_card(config, teacher.card)
    else:
        card = _card(config, base.card if base else None)
    record = card.last_training  # a student's record: its teacher's own stays as it was
    record.update(mixed_precision=accelerator.mixed_precision, processes=accelerator.num_processes)
    palette = card.palette if card.guided else None
    train_set, record["images"] = _train_set(config, palette)
    grid_set = _grid_set(config, palette)
    order = EpochOrder(len(train_set), config.seed)
    loader = _loader(config, train_set, order, accelerator)
    noise_scheduler = teacher.scheduler if teacher else recipe.noise_scheduler(config.model_type)
    unet = _initial_unet(config, card, noise_scheduler, out, teacher)
    if config.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer = _optimizer(unet, recipe.peak_learning_rate(config.preset), accelerator.device)
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)  # per process
    total_steps = config.max_train_steps or config.num_epochs * steps_per_epoch
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer, recipe.lr_warmup_steps * accelerator.num_processes, total_steps * accelerator.num_processes
    )
    ema = recipe.ema_model(unet)

    state = TrainerState(  # the plan a resume must share (checkpoints.check_same_plan)
        processes=accelerator.num_processes,
        train_batch_size=config.train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=recipe.peak_learning_rate(config.preset),
        lr_warmup_steps=recipe.lr_warmup_steps,
        total_steps=total_steps,
        adversarial_weight=config.adversarial_weight,
    )
    if config.resume_epoch is not None:
        state.step = config.resume_epoch * steps_per_epoch
        _fast_forward(lr_scheduler, state.step * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    adversary = _adversary(config, card, accelerator) if config.adversarial_weight else None
    if config.compile:  # after prepare: checkpoints keep the plain UNet's names, so any run can resume them
        unet = torch.compile(unet)
    if ema is not None:
        ema.to(accelerator.device)
    if config.resume:
        _resume(accelerator, out, unet, ema, card, state)
    if accelerator.is_main_process:
        clean_interrupted(out)
        accelerator.init_trackers("train", config={k: v for k, v in asdict(config).items() if _scalar(v)})

    def pipeline() -> SegDiffPipeline:
        return _pipeline(accelerator, unet, ema, noise_scheduler, card, base, teacher)

    # Grids show the model at the default settings when this run trains a student: the student itself.
    sampler, steps = (
        (None, None)
        if teacher
        else sampler_for(config.model_type, config.sampler, config.num_inference_steps)
    )
    objective = _objective(config, card, recipe, noise_scheduler, teacher, adversary)

    def save_grid(epochs_done: int) -> None:
        if grid_set is not None:
            _save_grid(pipeline(), grid_set, config, epochs_done, sampler, steps)

    def save_model(epochs_done: int, seconds: float) -> None:
        record.update(steps=state.step, epochs=epochs_done, seconds=round(seconds, 1))
        pipeline().save_pretrained(out)

    progress = _Progress(accelerator, out / "train_log.csv", state.step, total_steps)
    started, seconds_before = time.time(), state.seconds
    loss_sum, loss_steps = 0.0, 0  # a tensor once added to: summed on the device, no wait per step
    while state.step < total_steps:
        epoch = state.step // steps_per_epoch
        done_in_epoch = (state.step % steps_per_epoch) * config.gradient_accumulation_steps
        order.epoch = epoch  # this epoch's permutation; a resumed run then skips the batches done
        unet.train()
        for batch in accelerator.skip_first_batches(loader, done_in_epoch) if done_in_epoch else loader:
            with accelerator.accumulate(unet):
                loss = objective(unet, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            if ema is not None:
                ema.step(unet.parameters())
                state.ema_step = ema.optimization_step
            loss_sum, loss_steps = loss_sum + loss.detach(), loss_steps + 1
            logging = state.step % config.log_every == 0 or state.step == total_steps
            if logging:
                loss_value = accelerator.gather(loss_sum / loss_steps).mean().item()  # waits for the device
                loss_sum, loss_steps = 0.0, 0
            state.seconds = seconds_before + time.time() - started
            progress.update()
            if logging:
                progress.log(state.step, epoch, loss_value, lr_scheduler.get_last_lr()[0], state.seconds)
            if state.step % config.checkpointing_steps == 0 or state.step == total_steps:
                save_checkpoint(
                    accelerator,
                    out,
                    state,
                    config.checkpoints_total_limit,
                    pipeline if accelerator.is_main_process else None,
                )
                unet.train()  # the checkpoint's pipeline put the model in eval mode
            if state.step >= total_steps:
                break
        epochs_done = state.step // steps_per_epoch
        if accelerator.is_main_process and state.step < total_steps and state.step % steps_per_epoch == 0:
            if epochs_done % config.save_image_epochs == 0:
                save_grid(epochs_done)
            if epochs_done % config.save_model_epochs == 0:
                save_model(epochs_done, state.seconds)
    progress.close()
    if accelerator.is_main_process:
        epochs_done = math.ceil(state.step / steps_per_epoch)
        save_grid(epochs_done)
        record["finished"] = True
        save_model(epochs_done, state.seconds)
    accelerator.wait_for_everyone()  # every process returns once the model is saved
    accelerator.end_training()
    return out


def _fast_forward(lr_scheduler, steps: int) -> None:
    """Step the LR schedule `steps` times: --resume_epoch continues it where the original restarted it."""
    with warnings.catch_warnings():  # "scheduler stepped before the optimizer": on purpose
        warnings.simplefilter("ignore")
        for _ in range(steps):
            lr_scheduler.step()


def _resume(accelerator: Accelerator, out: Path, unet, ema, card: ModelCard, state: TrainerState) -> None:
    """--resume: continue from the newest checkpoint that loads (its step, EMA and time into `state`), or say
    that there is none yet."""
    total_steps = state.total_steps
    if latest_checkpoint(out) is None:
        accelerator.print(f"--resume: no checkpoint in {out} yet, starting at step 0 of {total_steps}")
        return
    latest, saved = resume(accelerator, out, unet, ema, card, state)
    state.step, state.ema_step, state.seconds = saved.step, saved.ema_step, saved.seconds
    accelerator.print(f"resumed from {latest} at step {state.step} of {total_steps}")
    planned = saved.total_steps or total_steps
    if planned != total_steps:  # a new step budget: the cosine decay stretches or shrinks to it
        accelerator.print(f"its run planned {planned} steps; the LR decay now ends at step {total_steps}")


def _save_grid(
    pipe: SegDiffPipeline, grid_set: SegDataset, config: TrainConfig, epochs_done: int, sampler, steps
) -> None:
    """samples/<epoch>.png: the next validation cases' masks, samples and real images. Each grid takes the
    cases after the last one's, wrapping around: the original ran out and crashed."""
    n = min(config.eval_batch_size, len(grid_set))
    start = epochs_done // config.save_image_epochs * n
    items = [grid_set[(start + i) % len(grid_set)] for i in range(n)]
    masks = torch.stack([item["mask"] for item in items]) if pipe.card.guided else None
    images = torch.stack([item["image"] for item in items])
    name = f"samples/{epochs_done - 1:04d}.png"
    pipe.set_progress_bar_config(desc=name, leave=False)  # DDPM's 1000 steps: minutes on a CPU
    grid = sample_grid(pipe, n, masks, images, sampler=sampler, steps=steps, seed=config.seed)
    write_png(grid, Path(config.output_dir) / name)


def _accelerator(config: TrainConfig, out: Path) -> Accelerator:
    launched = launched_processes()
    accelerator = Accelerator(
        # Without a GPU, accelerate joins the processes of a launch (over gloo) only when told `cpu`; else
        # each would train alone, all of them writing the same run folder.
        cpu=launched > 1 and not torch.cuda.is_available(),
        mixed_precision=accelerate_precision(config.mixed_precision),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard" if importlib.util.find_spec("tensorboard") else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if launched > 1 and accelerator.num_processes == 1:
        raise ConfigError(
            f"launched as {launched} processes (WORLD_SIZE={launched}), but accelerate did not join them, so "
            "each would train alone into the same folder; to join them on CPUs, set ACCELERATE_USE_CPU=1"
        )
    return accelerator


def _train_set(config: TrainConfig, palette: Palette | None) -> tuple[torch.utils.data.Dataset, dict]:
    """The training examples, and the card's count of the images with masks and without.

    The unlabelled images follow the labelled ones with all-background masks: every class ablated, the mask
    that mask-ablated training teaches as "any anatomy". The labelled set is repeated to make about
    `labelled_fraction` of the whole, which EpochOrder then shuffles as one: an exact resume needs no more.
    """
    size, channels, guided = config.img_size, config.img_channels, config.seg_dir is not None
    classes = config.num_classes
    labelled = SegDataset(config.img_dir, config.seg_dir, "train", size, channels, classes, palette)
    unlabelled = None
    if config.unlabelled_dir:
        unlabelled = UnlabelledDataset(config.unlabelled_dir, config.img_dir, size, channels)
    extra = len(unlabelled) if unlabelled is not None else 0
    counts = {"labelled": len(labelled), "unlabelled": extra}
    if not guided:  # an unconditional model: no image trains with a mask
        counts = {"labelled": 0, "unlabelled": len(labelled) + extra}
    if unlabelled is None:
        return labelled, counts
    share = config.labelled_fraction if guided else 0
    counts["labelled_repeats"] = repeats = max(1, round(share / (1 - share) * extra / len(labelled)))
    return ConcatDataset([labelled] * repeats + [unlabelled]), counts


def _loader(
    config: TrainConfig, train_set: torch.utils.data.Dataset, order: EpochOrder, accelerator: Accelerator
):
    """The training batches in `order`, sharded across the processes: each then runs len(loader) an epoch."""
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=config.train_batch_size,
        sampler=order,
        # Partial batches only where the set is smaller than one global batch.
        drop_last=len(train_set) > config.train_batch_size * accelerator.num_processes,
        num_workers=config.dataloader_num_workers,
        persistent_workers=config.dataloader_num_workers > 0,
        pin_memory=accelerator.device.type == "cuda",
        # The loader draws a seed per pass; from the global RNG, a resumed run's draws would shift.
        generator=torch.Generator().manual_seed(config.seed),
    )
    return accelerator.prepare(loader)


def _adversary(config: TrainConfig, card: ModelCard, accelerator: Accelerator) -> Adversary:
    """A distillation's critic and its optimiser, prepared after the student's: checkpoints hold them too."""
    critic = Critic(card.img_channels, card.cond_channels).to(accelerator.device)
    critic, optimizer = accelerator.prepare(critic, critic_optimizer(critic, CRITIC_LEARNING_RATE))
    return Adversary(critic, optimizer, config.adversarial_weight)


def _objective(
    config: TrainConfig, card: ModelCard, recipe: Recipe, noise_scheduler, teacher, adversary=None
):
    """The loss of a batch, `objective(unet, batch)`: the diffusion loss, or a student's distillation loss
    (with a critic's term when `adversary` is given)."""
    upscaling = card.upscaling
    if teacher is not None:
        trajectory = Trajectory(noise_scheduler, teacher.device)
        grid = segments(noise_scheduler, card.distilled)
        noise_level = upscaling.noise_level if upscaling else None  # the student serves the card's level only

    def objective(unet, batch) -> torch.Tensor:
        images, masks = batch["image"], batch["mask"]  # (B, C, H, W) in [-1, 1], (B, H, W) int64
        if config.ablate:
            masks = ablate(masks, card.num_classes)
        cond = encode(masks, card.encoding, card.num_classes)  # (B, C_mask, H, W)
        level = None
        if upscaling is not None:
            fixed = noise_level if teacher is not None else None
            images, cond, level = _upscaler_inputs(
                images, cond, upscaling, noise_scheduler, config.crop_size, fixed
            )
        if teacher is not None:
            def conditioned(net):
                return lambda x, t: denoise(net, x, t, cond, upscaling, level)

            judge = None if adversary is None else lambda real, drawn: adversary(real, drawn, cond)
            return distill_loss(
                conditioned(unet), conditioned(teacher.unet), trajectory, grid, images, judge
            )
        noise = torch.randn_like(images)
        t = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (images.shape[0],), device=images.device
        )
        noisy = noise_scheduler.add_noise(images, noise, t)
        prediction = denoise(unet, noisy, t, cond, upscaling, level, config.channels_last)
        return recipe.loss(prediction, noise_scheduler, images, noise, t)

    return objective


def _upscaler_inputs(
    images, cond, upscaling: Upscaling, noise_scheduler, crop_size: int, level: int | None = None
):
    """Real images (B, C, H, W) -> (random crops of them, the same crops of the upscaler's condition, the noise
    levels (B,)). The condition is the base model's view of each image (shrunk to its size, enlarged back and
    noised to `level`, or a random level) followed by the mask channels `cond`, as `SegDiffPipeline` builds it."""
    b, c, size, _ = images.shape
    if level is None:
        level = torch.randint(0, upscaling.max_noise_level + 1, (b,), device=images.device)
    else:
        level = torch.full((b,), level, device=images.device)
    low = low_res_condition(
        shrink(images, upscaling.low_res_size), size, noise_scheduler, level, torch.randn_like(images)
    )
    stacked = torch.cat([images, low, cond], dim=1)  # (B, 2C + C_mask, H, W)
    corners = torch.randint(0, size - crop_size + 1, (b, 2)).tolist()
    crops = torch.stack(
        [stacked[i, :, y : y + crop_size, x : x + crop_size] for i, (y, x) in enumerate(corners)]
    )
    return crops[:, :c], crops[:, c:], level


def _optimizer(unet: torch.nn.Module, learning_rate: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as the original, with the fused kernel where this torch has one for the device."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(unet.parameters(), lr=learning_rate, fused=fused)


def _fast_backends(device: torch.device) -> None:
    """TF32 matmuls and cuDNN autotuning on GPUs: the same fp32 training, run on tensor cores."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def _base_model(config: TrainConfig, device: torch.device) -> SegDiffPipeline:
    """The base model an upscaler is trained for, refused when its classes or channels differ from the data's."""
    base = SegDiffPipeline.from_pretrained(config.upscale_from, device=device, precision="fp32")
    guided = config.seg_dir is not None
    theirs = (base.card.num_classes, base.card.img_channels)
    ours = (config.num_classes if guided else 0, config.img_channels)
    if theirs != ours:
        raise ConfigError(
            f"--upscale_from {config.upscale_from}: its model draws {base.card.img_channels}-channel images for "
            f"{base.card.num_classes} classes, this run trains on {config.img_channels} channel(s) and "
            f"{config.num_classes if guided else 0} classes"
        )
    if config.img_size % base.card.img_size or config.img_size <= base.card.img_size:
        raise ConfigError(
            f"--img_size {config.img_size}: an upscaler draws a multiple of its base's size, "
            f"{base.card.img_size} px ({config.upscale_from})"
        )
    if base.card.upscale:
        raise ConfigError(f"--upscale_from {config.upscale_from}: already a cascade; give its base model")
    if guided and base.card.encoding != config.encoding:
        raise ConfigError(
            f"--mask_encoding {config.encoding}: the base model {config.upscale_from} reads masks in the "
            f"{base.card.encoding} encoding; pass --mask_encoding {base.card.encoding}"
        )
    return base


def _card(config: TrainConfig, base: ModelCard | None = None) -> ModelCard:
    guided = config.seg_dir is not None
    names = (list(config.class_names) or list(Palette.default(config.num_classes).names)) if guided else []
    palette = Palette.default(config.num_classes, names) if guided else None
    if base is not None and guided:  # the cascade speaks its base's classes
        names, palette = base.class_names, base.palette
    flags = {k: v for k, v in asdict(config).items() if k not in ("command", "extra_card")}
    recipe = config.training_recipe
    recipe_card = {"name": config.recipe, **recipe.as_dict()}
    recipe_card["learning_rate"] = recipe.peak_learning_rate(config.preset)
    upscaling = {}
    if base is not None:
        upscaling = asdict(Upscaling(low_res_size=base.img_size))
    card = ModelCard(
        num_classes=config.num_classes if guided else 0,
        img_channels=config.img_channels,
        img_size=config.img_size,
        encoding=config.encoding if guided else "none",
        class_names=names,
        colors=[list(c) for c in palette.colors] if palette else [],
        preset=config.preset,
        training={
            "command": config.command,
            "hardware": _hardware(),
            "flags": flags,
            "recipe": recipe_card,
            **config.extra_card,
        },
        upscale=upscaling,
    )
    if base is not None:
        card.training["base"] = base.training.get("command", "")
        card.dataset = base.dataset
    return card


def _student_card(config: TrainConfig, card: ModelCard) -> ModelCard:
    """The teacher's card with the record of the student this run trains."""
    flags = {k: v for k, v in asdict(config).items() if k not in ("command", "extra_card")}
    training = {
        "command": config.command,
        "hardware": _hardware(),
        "flags": flags,
        "teacher": config.distill_from,
    }
    method = Student.method + (" with a patch critic" if config.adversarial_weight else "")
    student = Student(
        steps=config.student_steps, teacher_steps=config.teacher_steps, method=method, training=training
    )
    return replace(card, student=asdict(student))


def _initial_unet(
    config: TrainConfig, card: ModelCard, noise_scheduler, out: Path, teacher: SegDiffPipeline | None = None
) -> UNet2DModel:
    """A fresh UNet (a student: a copy of its teacher's), or the saved one for --resume_epoch; refuses folders
    this run would damage."""
    if teacher is not None:
        unet = UNet2DModel.from_config(teacher.unet.config)
        unet.load_state_dict(teacher.unet.state_dict())
    else:
        unet = build_unet(
            config.preset, config.img_size, config.img_channels, card.cond_channels, card.upscaling
        )
    check_same_model(out, unet, card)
    if config.resume or config.resume_epoch is not None:
        for folder in (out, latest_checkpoint(out)):
            if folder is not None:
                check_same_schedule(folder, noise_scheduler)
    if not config.resume and (old := latest_checkpoint(out)) is not None:
        raise ConfigError(
            f"{out}: holds {old.name} from an earlier run; pass --resume to continue it, or choose another "
            "--output_dir (a new run here would prune that run's checkpoints)"
        )
    saved = (out / "unet" / "config.json").is_file()
    if config.resume_epoch is not None:
        if not saved:
            raise CheckpointError(f"--resume_epoch {config.resume_epoch}: {out}/unet/ holds no saved model")
        unet = UNet2DModel.from_pretrained(out / "unet", use_safetensors=True)
    elif saved and teacher is None and latest_checkpoint(out) is None and _finished(out):
        raise ConfigError(
            f"{out}: holds a finished model and no checkpoint to continue; a new run here would replace it: "
            "choose another --output_dir (or --resume_epoch N to train on from its weights)"
        )
    return unet


def _finished(out: Path) -> bool:
    """Whether `out` holds a model no run of ours is still writing: one whose training finished, or one saved
    by another tool (no card, or a card without a training record)."""
    if not (out / CARD_FILE).is_file():
        return True
    return ModelCard.load(out).training.get("finished", True)


def _grid_set(config: TrainConfig, palette: Palette | None) -> SegDataset | None:
    """Validation masks (and images) for the progress grid; falls back to training cases."""
    for split in ("val", "train"):
        try:
            return SegDataset(
                config.img_dir,
                config.seg_dir,
                split,
                config.img_size,
                config.img_channels,
                config.num_classes,
                palette,
            )
        except DataLayoutError:  # a missing val split only costs the grid its validation cases
            continue
    return None


def _pipeline(accelerator, unet, ema, noise_scheduler, card, base=None, teacher=None) -> SegDiffPipeline:
    """The model as saved and sampled: EMA weights when EMA is on, the trained ones otherwise; a student is saved
    with its teacher, which stays as it was."""
    model = accelerator.unwrap_model(unet, keep_torch_compile=False)
    if ema is not None:
        with torch.random.fork_rng(devices=[]):  # its random init must not move the training RNG
            model = UNet2DModel.from_config(model.config).to(accelerator.device)
        ema.copy_to(model.parameters())
    if teacher is not None:
        pipe = SegDiffPipeline(teacher.unet, noise_scheduler, card, teacher.base, student=model.eval())
    else:
        pipe = SegDiffPipeline(unet=model.eval(), scheduler=noise_scheduler, card=card, base=base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Progress:
    """A run's progress: the bar, the trackers (TensorBoard), and the curve as OUT/train_log.csv, from which a
    resumed run first drops the rows past its checkpoint's step."""

    FIELDS = ("step", "epoch", "loss", "lr", "seconds")

    def __init__(self, accelerator: Accelerator, path: Path, start_step: int, total_steps: int):
        self.accelerator, self.file = accelerator, None
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            desc="train",
            disable=not accelerator.is_local_main_process,
        )
        if not accelerator.is_main_process:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if path.exists():
            with open(path, newline="") as f:
                rows = [
                    row
                    for row in csv.DictReader(f)
                    if row.get("step", "").isdigit() and int(row["step"]) <= start_step
                ]
        kept = io.StringIO()
        writer = csv.DictWriter(kept, fieldnames=self.FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        write_text(path, kept.getvalue())
        self.file = open(path, "a", newline="")  # noqa: SIM115 - lives as long as the run
        self.writer = csv.DictWriter(self.file, fieldnames=self.FIELDS)

    def update(self) -> None:
        self.bar.update(1)

    def log(self, step: int, epoch: int, loss: float, lr: float, seconds: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=epoch)
        self.accelerator.log({"loss": loss, "lr": lr}, step=step)
        if self.file is not None:
            self.writer.writerow(dict(step=step, epoch=epoch, loss=loss, lr=lr, seconds=round(seconds, 3)))
            self.file.flush()

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


def _scalar(value) -> bool:
    return isinstance(value, (int, float, str, bool))  # what TensorBoard's hparams take


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
