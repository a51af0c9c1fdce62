"""Training on accelerate: one code path for a CPU, one GPU, many GPUs and many nodes.

Epsilon-prediction MSE over 1000 DDPM timesteps with the encoded mask concatenated to the noisy image;
mask-ablated training removes each non-background class with probability 0.5, per example. Checkpoints
hold the full state (model, EMA, optimizer, LR schedule, RNG, step) and are written to a temporary
folder, then renamed, so a run killed at any moment resumes from the last complete one.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .data import SegDataset
from .errors import CheckpointError, DataLayoutError
from .masks import Encoding, Palette, ablate, encode, tile
from .models import CARD_FILE, ModelCard, build_unet
from .pipeline import SegDiffPipeline

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; the CLI fills it from the original flags."""

    output_dir: str
    img_dir: str
    seg_dir: str | None = None
    num_classes: int = 0  # K including background; 0 = unconditional
    class_names: tuple[str, ...] = ()
    img_size: int = 256
    img_channels: int = 1
    preset: str = "paper"
    encoding: Encoding = "onehot"  # "original" trains models the original code can also open
    model_type: str = "DDPM"  # the stored noise scheduler's class, as the original named its runs
    batch_size: int = 32
    eval_batch_size: int = 8
    num_epochs: int = 200
    max_train_steps: int | None = None  # overrides num_epochs when set
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 500
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    ema: bool = False
    ablate: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 2
    resume: bool = False
    resume_epoch: int | None = None  # the original's weights-only resume from output_dir/unet
    seed: int = 0
    save_image_epochs: int = 20  # sample grid, as the original
    save_model_epochs: int = 30
    sampler: str = "dpm++"
    num_inference_steps: int = 20
    dataloader_num_workers: int = 0
    command: str = ""  # recorded in the model card
    extra_card: dict = field(default_factory=dict)


def train(config: TrainConfig) -> Path:
    """Train, checkpoint and save the model to `config.output_dir`; returns that folder."""
    out = Path(config.output_dir)
    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard" if has_tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(config.seed)
    card = _card(config)
    train_set = SegDataset(
        config.img_dir,
        config.seg_dir,
        "train",
        config.img_size,
        config.img_channels,
        config.num_classes,
        card.palette if card.guided else None,
    )
    grid_set = _grid_set(config, card)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(train_set) > config.batch_size,
        num_workers=config.dataloader_num_workers,
        persistent_workers=config.dataloader_num_workers > 0,
    )

    unet = _initial_unet(config, card, out)
    noise_scheduler = (DDIMScheduler if config.model_type == "DDIM" else DDPMScheduler)(
        num_train_timesteps=1000
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate)
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    total_steps = config.max_train_steps or config.num_epochs * steps_per_epoch
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer, config.lr_warmup_steps * accelerator.num_processes, total_steps * accelerator.num_processes
    )
    ema = (
        EMAModel(
            unet.parameters(),
            use_ema_warmup=True,
            power=3 / 4,
            model_cls=UNet2DModel,
            model_config=unet.config,
        )
        if config.ema
        else None
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    step = 0
    if config.resume and (latest := latest_checkpoint(out)) is not None:
        accelerator.load_state(str(latest))
        step = int(CHECKPOINT.match(latest.name)[1])
        accelerator.print(f"resumed from {latest} at step {step} of {total_steps}")
    elif config.resume_epoch is not None:
        step = config.resume_epoch * steps_per_epoch
        for _ in range(step):  # the original restarted the LR schedule; we continue it where it was
            lr_scheduler.step()
    if accelerator.is_main_process:
        accelerator.init_trackers("train", config={k: v for k, v in asdict(config).items() if _scalar(v)})

    log = _CsvLog(out / "train_log.csv") if accelerator.is_main_process else None
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    started = time.time()
    epoch = step // steps_per_epoch
    while step < total_steps:
        done_in_epoch = (step % steps_per_epoch) * config.gradient_accumulation_steps
        batches = accelerator.skip_first_batches(loader, done_in_epoch) if done_in_epoch else loader
        unet.train()
        for batch in batches:
            with accelerator.accumulate(unet):
                loss = _loss(unet, noise_scheduler, batch, card, config.ablate)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.step(unet.parameters())
            loss_value = accelerator.gather(loss.detach()).mean().item()
            lr = lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", epoch=epoch)
            accelerator.log({"loss": loss_value, "lr": lr}, step=step)
            if log is not None:
                log.write(step=step, epoch=epoch, loss=loss_value, lr=lr, seconds=time.time() - started)
            if step % config.checkpointing_steps == 0 or step == total_steps:
                save_checkpoint(accelerator, out, step, config.checkpoints_total_limit)
            if step >= total_steps:
                break
        epoch += 1
        if accelerator.is_main_process:
            pipe = _pipeline(accelerator, unet, ema, noise_scheduler, card)
            if epoch % config.save_image_epochs == 0 or step >= total_steps:
                _save_grid(pipe, grid_set, out / "samples" / f"{epoch - 1:04d}.png", config, epoch)
            if epoch % config.save_model_epochs == 0 or step >= total_steps:
                card.training.update(steps=step, epochs=epoch, seconds_this_run=round(time.time() - started))
                pipe.save_pretrained(out)
            unet.train()
    bar.close()
    accelerator.end_training()
    return out


def _loss(unet, noise_scheduler, batch, card: ModelCard, ablated: bool) -> torch.Tensor:
    images, masks = batch["image"], batch["mask"]  # (B, C, H, W) in [-1, 1], (B, H, W) int64
    if ablated:
        masks = ablate(masks, card.num_classes)
    cond = encode(masks, card.encoding, card.num_classes)  # (B, C_mask, H, W)
    noise = torch.randn_like(images)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (images.shape[0],), device=images.device)
    noisy = noise_scheduler.add_noise(images, noise, t)
    prediction = unet(torch.cat([noisy, cond], dim=1), t).sample
    return F.mse_loss(prediction.float(), noise.float())


def _card(config: TrainConfig) -> ModelCard:
    guided = config.seg_dir is not None
    names = (list(config.class_names) or list(Palette.default(config.num_classes).names)) if guided else []
    palette = Palette.default(config.num_classes, names) if guided else None
    return ModelCard(
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
            "ablated": config.ablate,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "mixed_precision": config.mixed_precision,
            "ema": config.ema,
            "data": {"img_dir": str(config.img_dir), "seg_dir": str(config.seg_dir)},
            **config.extra_card,
        },
    )


def _initial_unet(config: TrainConfig, card: ModelCard, out: Path) -> UNet2DModel:
    """A fresh UNet, or the saved one for --resume_epoch; refuses a folder holding a different model."""
    unet = build_unet(config.preset, config.img_size, config.img_channels, card.cond_channels)
    saved = out / "unet" / "config.json"
    if saved.is_file():
        old = json.loads(saved.read_text())
        for key in ("in_channels", "out_channels", "sample_size", "block_out_channels"):
            if key in old and list(np.atleast_1d(old[key])) != list(np.atleast_1d(unet.config[key])):
                raise CheckpointError(
                    f"{out}: already holds a model with {key}={old[key]}, this run builds {unet.config[key]}; "
                    "choose another --output_dir or remove the old model"
                )
    if (out / CARD_FILE).is_file():
        old_card = ModelCard.load(out)
        if (old_card.num_classes, old_card.encoding) != (card.num_classes, card.encoding):
            raise CheckpointError(
                f"{out}: holds a model for {old_card.num_classes} classes ({old_card.encoding} encoding), "
                f"this run trains {card.num_classes} ({card.encoding})"
            )
    if config.resume_epoch is not None:
        if not saved.is_file():
            raise CheckpointError(f"--resume_epoch {config.resume_epoch}: {out}/unet/ holds no saved model")
        unet = UNet2DModel.from_pretrained(out / "unet", use_safetensors=True)
    return unet


def _grid_set(config: TrainConfig, card: ModelCard) -> SegDataset | None:
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
                card.palette if card.guided else None,
            )
        except DataLayoutError:  # a missing val split only costs the grid its validation cases
            continue
    return None


def _pipeline(accelerator, unet, ema, noise_scheduler, card) -> SegDiffPipeline:
    """The model as saved and sampled: EMA weights when EMA is on, the trained ones otherwise."""
    model = accelerator.unwrap_model(unet)
    if ema is not None:
        model = UNet2DModel.from_config(model.config).to(accelerator.device)
        ema.copy_to(model.parameters())
    pipe = SegDiffPipeline(unet=model.eval(), scheduler=noise_scheduler, card=card)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _save_grid(pipe: SegDiffPipeline, grid_set, path: Path, config: TrainConfig, epoch: int) -> None:
    """Rows: conditioning masks, samples, real images. The grid cycles through the validation set."""
    if grid_set is None:
        return
    n = min(config.eval_batch_size, len(grid_set))
    start = (epoch // max(config.save_image_epochs, 1) * n) % len(grid_set)
    items = [grid_set[(start + i) % len(grid_set)] for i in range(n)]
    masks = torch.stack([item["mask"] for item in items])
    generator = torch.Generator().manual_seed(config.seed)
    samples = pipe(
        masks if pipe.card.guided else None,
        batch_size=n,
        generator=generator,
        scheduler=config.sampler,
        num_inference_steps=config.num_inference_steps,
        output_type="np",
    ).images
    rows = [
        _to_rgb(samples),
        _to_rgb(np.stack([(item["image"].permute(1, 2, 0).numpy() + 1) / 2 for item in items])),
    ]
    if pipe.card.guided:
        rows.insert(0, pipe.card.palette.to_rgb(masks.numpy()))
    _write_png(tile([img for row in rows for img in row], columns=n), path)


def _to_rgb(images: np.ndarray) -> np.ndarray:
    """(B, H, W, C) float in [0, 1] -> (B, H, W, 3) uint8, showing the first channel of C != 3."""
    images = (images.clip(0, 1) * 255).round().astype(np.uint8)
    return images if images.shape[-1] == 3 else np.repeat(images[..., :1], 3, axis=-1)


def _write_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    PIL.Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete `checkpoint-<step>` folder; half-written ones are still `.tmp-*`."""
    found = [
        (int(m[1]), p) for p in out.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name)) and p.is_dir()
    ]
    return max(found)[1] if found else None


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, keep: int | None) -> None:
    """Write the full state to a temporary folder, rename it in, then prune the oldest."""
    final, tmp = out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep:
        checkpoints = sorted((int(CHECKPOINT.match(p.name)[1]), p) for p in out.glob("checkpoint-*"))
        for _, old in checkpoints[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


class _CsvLog:
    """Append-only CSV of the training curve; survives resumes."""

    FIELDS = ("step", "epoch", "loss", "lr", "seconds")

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        self.file = open(path, "a", newline="")  # noqa: SIM115 - lives as long as the run
        self.writer = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        if new:
            self.writer.writeheader()

    def write(self, **row):
        self.writer.writerow(row)
        self.file.flush()


def _scalar(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
