"""Checkpoints of a training run: written whole or not at all, listed, pruned, and resumed from.

Each `checkpoint-<step>` holds accelerate's full state (model, optimizer, LR schedule, RNG of every
process), the trainer's step, time and plan, and a model folder that `SegDiffPipeline.from_pretrained` opens
(EMA weights when EMA is on, which is also where resuming reads the EMA state from). It is written to
`.tmp-checkpoint-<step>` and renamed in, so a run killed at any moment leaves only complete checkpoints.
One run at a time writes a run folder (`hold_run_folder`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
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

from ..errors import CheckpointError, ConfigError
from ..files import clean_interrupted_saves, staged_folder, write_json
from ..model.card import CARD_FILE, ModelCard
from ..resolve import MARKER

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
LOCK_FILE = ".train.lock"


@dataclass
class TrainerState:
    """Where a run stands; written beside each checkpoint as trainer_state.json."""

    step: int = 0
    ema_step: int = 0
    seconds: float = 0.0  # training time over all resumes
    processes: int = 1  # the LR schedule and the data shards count in processes: resume with as many
    # The plan, fixing the batches and the LR schedule; None in checkpoints from before it was recorded.
    train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    learning_rate: float | None = None
    lr_warmup_steps: int | None = None
    total_steps: int | None = None
    adversarial_weight: float = 0.0  # a distillation's critic, whose state its checkpoints then hold


@contextlib.contextmanager
def hold_run_folder(out: str | os.PathLike):
    """Hold the run folder `out` (created if new) while the block runs; ConfigError while another run holds it.

    The hold is an flock on OUT/.train.lock, which the system drops when its process ends, however it ends:
    a killed run leaves nothing stuck. The file names the holding process for the refusal.
    """
    out = Path(out)
    new = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK_FILE, "a+")  # noqa: SIM115 - closed by the `with` below
    except OSError as e:
        raise ConfigError(
            f"--output_dir {out}: cannot create it ({e.strerror}); expected a writable place"
        ) from e
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "just starting"
            raise ConfigError(
                f"--output_dir {out}: another training run (process {holder}) is writing to it; wait for it "
                "to end, or choose another --output_dir"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()} on {platform.node()}\n")
        lock.flush()
        try:
            yield
        finally:
            (out / LOCK_FILE).unlink(missing_ok=True)  # while still held: a later run locks a fresh file
            if new:
                with contextlib.suppress(OSError):  # a new folder goes when this run wrote nothing into it
                    out.rmdir()


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
        if bool(old_card.student) != bool(card.student):  # a training run's checkpoint is no distillation's
            held = "a model with its distilled student" if old_card.student else "a model without a student"
            doing = "distills a student" if card.student else "trains a model"
            raise CheckpointError(
                f"{folder}: holds {held}, and this run {doing}; choose another --output_dir"
            )


def check_student_folder(out: str | os.PathLike, teacher: str) -> None:
    """Refuse a distillation's run folder that holds a model the run would replace.

    The run writes a copy of `teacher` (a folder or Hub id) with its student to `out`, and leaves the teacher
    as it was: `out` may be new, or an unfinished or resumable distillation of the same teacher; never the
    teacher's own folder (or one inside it), nor a folder holding any other model, checkpoints or not.
    """
    out, source = Path(out), Path(teacher).resolve()
    if out.resolve() == source or source in out.resolve().parents:
        where = "the teacher's own folder" if out.resolve() == source else "inside the teacher's folder"
        raise ConfigError(
            f"--output_dir {out}: {where} (--model_dir {teacher}); a distillation writes a copy of its teacher "
            "with the student, and leaves the teacher as it was: choose a new --output_dir"
        )
    if not ((out / MARKER).is_file() or (out / CARD_FILE).is_file()):
        return
    record = ModelCard.load(out).student.get("training", {}) if (out / CARD_FILE).is_file() else {}
    if not record.get("teacher") or Path(record["teacher"]).resolve() != source:
        whose = f" (the student of {record['teacher']})" if record.get("teacher") else ""
        raise ConfigError(
            f"--output_dir {out}: holds a model{whose}, which distilling {teacher} there would replace; "
            "choose a new --output_dir"
        )
    if record.get("finished") and not checkpoints(out):
        raise ConfigError(
            f"--output_dir {out}: holds a finished student of {teacher} and no checkpoint to continue it from, "
            "which a new distillation there would replace; choose a new --output_dir"
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


def check_same_plan(folder: Path, saved: TrainerState, asked: TrainerState) -> None:
    """Refuse to resume a checkpoint with another batch size, LR schedule or critic than its run had.

    Another batch size would not replay the uninterrupted run's batches; another learning rate or warm-up
    would not be what the restored schedule applies; a critic is in the checkpoint or not. The step budget may
    grow (extending a finished run): the cosine decay then runs on to the new last step.
    """
    plan = ("train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_warmup_steps", "adversarial_weight")
    for flag in plan:
        old, new = getattr(saved, flag), getattr(asked, flag)
        if old is not None and old != new:
            raise ConfigError(
                f"{folder}: its run trained with --{flag} {old:g}, this one asks {new:g}; resume with "
                f"--{flag} {old:g} (the batches and LR schedule of the run so far), or choose another --output_dir"
            )
    if asked.total_steps < saved.step:
        raise ConfigError(
            f"{folder}: its run is at step {saved.step}, this one asks for {asked.total_steps} steps in all "
            f"(--max_train_steps, else --num_epochs); expected at least {saved.step}"
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
    # the folder exists before any process writes. The main process alone swaps it in.
    final, tmp = out / f"checkpoint-{state.step}", out / f".tmp-checkpoint-{state.step}"
    main = accelerator.is_main_process
    with staged_folder(final, tmp) if main else contextlib.nullcontext(tmp):
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            pipe = pipeline()
            pipe.card.last_training.update(steps=state.step, seconds=round(state.seconds, 1))
            pipe.save_pretrained(tmp)
            write_json(tmp / STATE_FILE, asdict(state))
    if main:
        prune_checkpoints(out, keep)
    return final


def resume(
    accelerator: Accelerator, out: Path, unet, ema: EMAModel | None, card: ModelCard, plan: TrainerState
) -> tuple[Path, TrainerState]:
    """Restore the newest checkpoint that loads on every process, newest first. -> (its folder, state).

    `plan` is this run's: a checkpoint of another plan (`check_same_plan`) is refused.

    A damaged one (a truncated or garbled file) is named and skipped for the one before it; processes
    agree on each verdict, so all of them resume from the same step.
    """
    damaged = []
    for folder in reversed(checkpoints(out)):
        try:
            state = _load_checkpoint(accelerator, folder, unet, ema, card, plan)
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
    accelerator: Accelerator, folder: Path, unet, ema: EMAModel | None, card: ModelCard, plan: TrainerState
) -> TrainerState:
    """Restore what `save_checkpoint` wrote, after `accelerator.prepare`. Raises `_Damaged` for unreadable
    files, CheckpointError for a model of another shape, ConfigError for another plan.

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
        check_same_model(folder, accelerator.unwrap_model(unet), card)  # what it holds, then how it trained
        check_same_plan(folder, state, plan)
        accelerator.load_state(str(folder))
        if ema is not None:
            trained = card.distilled.folder if card.distilled else "unet"  # a student's EMA is the student
            ema_unet = UNet2DModel.from_pretrained(folder / trained, use_safetensors=True)
            ema.shadow_params = [p.detach().clone().to(accelerator.device) for p in ema_unet.parameters()]
            ema.optimization_step = state.ema_step
    except (CheckpointError, ConfigError):
        raise
    except _UNREADABLE as e:
        raise _Damaged(f"{folder}: damaged checkpoint, cannot resume from it ({e})") from e
    return state


def clean_interrupted(out: Path) -> None:
    """Remove what a run killed while saving left in `out`: a half-written checkpoint, a half-swapped model."""
    for stale in out.glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    clean_interrupted_saves(out)
