"""Checkpoints of a training run: written whole or not at all, listed, pruned, and resumed from.

Each `checkpoint-<step>` holds accelerate's full state (model, optimizer, LR schedule, RNG of every
process), the trainer's step and time, and a model folder that `SegDiffPipeline.from_pretrained` opens
(EMA weights when EMA is on, which is also where resuming reads the EMA state from). It is written to
`.tmp-checkpoint-<step>` and renamed in, so a run killed at any moment leaves only complete checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from pickle import UnpicklingError  # the exception only: nothing here unpickles

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError

from .errors import CheckpointError, ConfigError
from .models import CARD_FILE, ModelCard
from .pipeline import clean_interrupted_saves

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where a run stands; written beside each checkpoint as trainer_state.json."""

    step: int = 0
    ema_step: int = 0
    seconds: float = 0.0  # training time over all resumes
    processes: int = 1  # the LR schedule and the data shards count in processes: resume with as many


def check_same_model(folder: Path, unet: UNet2DModel, card: ModelCard) -> None:
    """Refuse a folder holding a model of another shape, classes or encoding than this run trains."""
    saved = folder / "unet" / "config.json"
    if saved.is_file():
        old = json.loads(saved.read_text())
        for key in ("in_channels", "out_channels", "sample_size", "block_out_channels", "layers_per_block"):
            if key in old and list(np.atleast_1d(old[key])) != list(np.atleast_1d(unet.config[key])):
                raise CheckpointError(
                    f"{folder}: holds a model with {key}={old[key]}, this run builds {unet.config[key]}; "
                    "choose another --output_dir or remove the old model"
                )
    if (folder / CARD_FILE).is_file():
        old_card = ModelCard.load(folder)
        if (old_card.num_classes, old_card.encoding) != (card.num_classes, card.encoding):
            raise CheckpointError(
                f"{folder}: holds a model for {old_card.num_classes} classes ({old_card.encoding} encoding), "
                f"this run trains {card.num_classes} ({card.encoding}); choose another --output_dir"
            )


def check_same_schedule(folder: Path, noise_scheduler) -> None:
    """Refuse to continue a model trained to another target or noise schedule than this run's recipe."""
    saved = folder / "scheduler" / "scheduler_config.json"
    if not saved.is_file():
        return
    old, new = json.loads(saved.read_text()), noise_scheduler.config
    defaults = {"prediction_type": "epsilon", "beta_schedule": "linear", "rescale_betas_zero_snr": False}
    for key, default in defaults.items():
        if old.get(key, default) != new[key]:
            raise ConfigError(
                f"{folder}: its model was trained with {key}={old.get(key, default)}, this run's recipe "
                f"uses {new[key]}; continue it with the same recipe (runs from before recipes existed, and "
                "the original code's: --recipe original), or choose another --output_dir"
            )


def checkpoints(out: str | os.PathLike) -> list[Path]:
    """The complete `checkpoint-<step>` folders in `out`, oldest step first; half-written ones are still
    `.tmp-checkpoint-*`."""
    found = ((int(m[1]), p) for p in Path(out).glob("checkpoint-*") if (m := CHECKPOINT.match(p.name)))
    return [p for _, p in sorted(found) if p.is_dir()]


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder, None when there is none."""
    found = checkpoints(out)
    return found[-1] if found else None


def prune_checkpoints(out: str | os.PathLike, keep: int | None) -> list[Path]:
    """Remove all but the `keep` newest complete checkpoints (None keeps all). -> the removed folders."""
    removed = checkpoints(out)[:-keep] if keep else []
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    return removed


def save_checkpoint(
    accelerator: Accelerator, out: Path, state: TrainerState, keep: int | None, pipeline
) -> Path:
    """Write the full state and a model folder to `.tmp-checkpoint-<step>`, rename it in, then prune.

    `pipeline` (main process only) builds the model as it is saved: its unet/ holds the EMA weights when
    EMA is on, which is also where resuming reads the EMA state from.
    """
    # Every process writes into this folder (its RNG state), so the path follows from the step alone and
    # the folder exists before any process writes.
    final, tmp = out / f"checkpoint-{state.step}", out / f".tmp-checkpoint-{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return final
    pipe = pipeline()
    pipe.card.training.update(steps=state.step, seconds=round(state.seconds, 1))
    pipe.save_pretrained(tmp)
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    prune_checkpoints(out, keep)
    return final


def resume(
    accelerator: Accelerator, out: Path, unet, ema: EMAModel | None, card: ModelCard
) -> tuple[Path, TrainerState]:
    """Restore the newest checkpoint that loads on every process, newest first. -> (its folder, state).

    A damaged one (a truncated or garbled file) is named and skipped for the one before it; processes
    agree on each verdict, so all of them resume from the same step.
    """
    damaged = []
    for folder in reversed(checkpoints(out)):
        try:
            state = _load_checkpoint(accelerator, folder, unet, ema, card)
        except _Damaged as e:
            state, reason = None, str(e)
        loaded = torch.tensor([state is not None], device=accelerator.device)
        if accelerator.gather(loaded).all():
            for reason in damaged:
                accelerator.print(f"warning: {reason}; resumed from {folder.name} instead")
            return folder, state
        damaged.append(reason if state is None else f"{folder}: damaged on another process")
    raise CheckpointError(
        f"--resume: no checkpoint in {out} can be loaded ({'; '.join(damaged)}); remove the damaged "
        "checkpoint folders to start over"
    )


class _Damaged(CheckpointError):
    """A checkpoint whose files cannot be read; an older one may still be."""


# What reading a truncated or garbled checkpoint raises, from json, safetensors, torch and accelerate.
_UNREADABLE = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    RuntimeError,
    EOFError,
    SafetensorError,
    UnpicklingError,
)


def _load_checkpoint(
    accelerator: Accelerator, folder: Path, unet, ema: EMAModel | None, card: ModelCard
) -> TrainerState:
    """Restore what `save_checkpoint` wrote, after `accelerator.prepare`. Raises `_Damaged` for unreadable
    files, CheckpointError for a model of another shape.

    accelerate reads the model from safetensors and the optimizer, LR schedule and RNG states with
    weights-only unpickling; the EMA weights come from the checkpoint's unet/ (safetensors).
    """
    try:
        state = TrainerState(**json.loads((folder / STATE_FILE).read_text()))
        if state.processes != accelerator.num_processes:
            raise CheckpointError(
                f"{folder}: written by {state.processes} process(es), resumed by {accelerator.num_processes}; "
                f"launch {state.processes} to continue it (the LR schedule counts steps x processes)"
            )
        check_same_model(folder, accelerator.unwrap_model(unet), card)
        accelerator.load_state(str(folder))
        if ema is not None:
            ema_unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True)
            ema.shadow_params = [p.detach().clone().to(accelerator.device) for p in ema_unet.parameters()]
            ema.optimization_step = state.ema_step
    except CheckpointError:
        raise
    except _UNREADABLE as e:
        raise _Damaged(f"{folder}: damaged checkpoint, cannot resume from it ({e})") from e
    return state


def clean_interrupted(out: Path) -> None:
    """Remove what a run killed while saving left in `out`: a half-written checkpoint, a half-swapped model."""
    for stale in out.glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    clean_interrupted_saves(out)
