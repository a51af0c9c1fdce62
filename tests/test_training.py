"""Training: checkpoints are complete or absent, resume continues the step count, configs refuse bad values."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from segdiff import CheckpointError, ConfigError, SegDiffPipeline
from segdiff.train.checkpoints import latest_checkpoint, prune_checkpoints
from segdiff.train.loop import TrainConfig, run_name, train

SPLITS = ("train", "val", "test")


def write_data(root, size=32, counts=(8, 4, 4), channels=1, num_classes=3, seed=0, segtypes=("all",)):
    """A tiny data set in the original layout: discs of each class on noise. -> (img_dir, seg_dir).

    Images of 1 or 3 channels are PNGs; other counts are .npy (C, H, W) arrays with .npy label maps
    beside them, since the file names of images and masks must agree.
    """
    rng = np.random.default_rng(seed)
    img_dir, seg_dir = Path(root) / "img", Path(root) / "mask"
    yy, xx = np.mgrid[:size, :size]
    for split, n in zip(SPLITS, counts, strict=True):
        (img_dir / split).mkdir(parents=True, exist_ok=True)
        for segtype in segtypes:
            (seg_dir / segtype / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = np.zeros((size, size), np.uint8)
            for c in range(1, num_classes):
                cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
                r = rng.integers(size // 8, size // 4)
                mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
            grey = (mask * (180 // num_classes) + rng.integers(0, 60, (size, size))).astype(np.uint8)
            name = f"{split}_{i:03d}" + (".png" if channels in (1, 3) else ".npy")
            if channels in (1, 3):
                Image.fromarray(grey if channels == 1 else np.stack([grey] * 3, -1)).save(
                    img_dir / split / name
                )
            else:
                np.save(img_dir / split / name, np.stack([grey / 255.0] * channels).astype(np.float32))
            for k, segtype in enumerate(segtypes):  # several segtypes: class c lives in folder c % len
                layer = np.where(mask % len(segtypes) == k, mask, 0).astype(np.uint8)
                if channels in (1, 3):
                    Image.fromarray(layer).save(seg_dir / segtype / split / name)
                else:
                    np.save(seg_dir / segtype / split / name, layer)
    return img_dir, seg_dir



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), counts=(8, 4, 4))


def config(out, data, **overrides) -> TrainConfig:
    img_dir, seg_dir = data
    settings = dict(
        output_dir=str(out),
        img_dir=str(img_dir),
        seg_dir=str(seg_dir),
        num_classes=3,
        img_size=32,
        preset="tiny",
        train_batch_size=4,
        num_epochs=2,
        lr_warmup_steps=2,
        checkpointing_steps=2,
        sampler="ddim",
        num_inference_steps=2,
        eval_batch_size=3,
    )
    return TrainConfig(**{**settings, **overrides})


def steps_logged(out) -> list[int]:
    with open(Path(out) / "train_log.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


# ---- checkpoints on disk ------------------------------------------------------------------------------


def test_latest_checkpoint_takes_the_highest_complete_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-9", ".tmp-checkpoint-12", "checkpoint-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-11").write_text("a file, not a checkpoint")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_prune_keeps_the_newest_and_never_touches_half_written_ones(tmp_path):
    for step in (1, 5, 20, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / ".tmp-checkpoint-25").mkdir()
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-1", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-checkpoint-25",
        "checkpoint-20",
        "checkpoint-5",
    ]
    assert prune_checkpoints(tmp_path, keep=None) == []
    assert len(list(tmp_path.iterdir())) == 3


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("DDPM", "breast_mri", 256), "ddpm-breast_mri-256"),
        (("DDIM", "ct", 64, True), "ddim-ct-64-segguided"),
        (("DDIM", "ct", 64, True, True), "ddim-ct-64-segguided-ablated"),
        (("DDPM", "ct", 64, True, False, True), "ddpm-ct-64-segguided-ablated"),
        (("DDPM", "ct", 64, False, False, False, True), "ddpm-ct-64-ablated"),
    ],
)
def test_run_folder_is_named_as_the_original(flags, expected):
    assert run_name(*flags) == expected


# ---- settings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"img_dir": None}, "--img_dir"),
        ({"num_classes": 0}, "--num_segmentation_classes"),
        ({"num_classes": 1}, "--num_segmentation_classes 1"),
        ({"img_size": 0}, "--img_size 0"),
        ({"img_size": -32}, "--img_size -32"),
        ({"img_size": 1_000_000}, "--img_size 1000000"),
        ({"img_size": 48, "preset": "paper"}, "multiple of 32"),
        ({"train_batch_size": 0}, "--train_batch_size 0"),
        ({"eval_batch_size": -1}, "--eval_batch_size -1"),
        ({"num_epochs": 0}, "--num_epochs 0"),
        ({"max_train_steps": -3}, "--max_train_steps -3"),
        ({"learning_rate": 0.0}, "--learning_rate 0.0"),
        ({"img_channels": 0}, "--num_img_channels 0"),
        ({"checkpointing_steps": 0}, "--checkpointing_steps 0"),
        ({"preset": "huge"}, "--preset huge"),
        ({"sampler": "euler"}, "--scheduler euler"),
        ({"resume": True, "resume_epoch": 3}, "--resume and --resume_epoch"),
    ],
)
def test_config_refuses_bad_values_naming_the_flag(tmp_path, data, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config(tmp_path / "run", data, **overrides)


# ---- training runs ------------------------------------------------------------------------------------------


def test_checkpoints_are_model_folders_and_resume_continues_the_step_count(tmp_path, data):
    out = tmp_path / "run"
    train(config(out, data, max_train_steps=3, ema=True, checkpoints_total_limit=None))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert steps_logged(out) == [1, 2, 3]

    # Each checkpoint opens as a model, holding the EMA weights rather than the raw ones.
    pipe = SegDiffPipeline.from_pretrained(out / "checkpoint-2", device="cpu")
    assert pipe.card.num_classes == 3 and pipe.card.training["steps"] == 2
    raw = load_file(out / "checkpoint-2" / "model.safetensors")
    saved = pipe.unet.state_dict()
    assert raw.keys() == saved.keys()
    assert any(not torch.equal(raw[k], saved[k].float()) for k in raw)

    # A stray half-written checkpoint is ignored and cleaned; the run continues from step 3 to 5.
    (out / ".tmp-checkpoint-4").mkdir()
    train(config(out, data, max_train_steps=5, ema=True, resume=True, checkpoints_total_limit=None))
    assert steps_logged(out) == [1, 2, 3, 4, 5]
    assert not list(out.glob(".tmp-*"))
    state = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["ema_step"] == 5
    card = json.loads((out / "segdiff_card.json").read_text())
    assert card["training"]["steps"] == 5 and card["training"]["finished"]


def test_progress_grids_cycle_through_the_validation_masks(tmp_path, data):
    # 4 validation cases, 3 per grid, a grid every epoch: the original ran out of masks and crashed.
    out = tmp_path / "run"
    train(config(out, data, num_epochs=3, save_image_epochs=1, checkpointing_steps=100))
    grids = [np.asarray(Image.open(out / "samples" / f"{epoch:04d}.png")) for epoch in range(3)]
    mask_rows = [grid[: grid.shape[0] // 3] for grid in grids]  # rows: masks, samples, real images
    assert not np.array_equal(mask_rows[0], mask_rows[1])


def test_a_grid_shows_its_sampling_progress(tmp_path, data, capsys):
    # The original's DDPM grid is 1000 steps: minutes of silence on a CPU at the end of a run without a bar.
    train(config(tmp_path / "run", data, num_epochs=1, checkpointing_steps=100, num_inference_steps=3))
    err = capsys.readouterr().err
    assert "samples/0000.png:   0%|" in err and "| 0/3 [" in err, err  # (tqdm may skip later redraws)


def test_refuses_a_folder_holding_another_model_or_run(tmp_path, data):
    out = tmp_path / "run"
    train(config(out, data, max_train_steps=2))
    with pytest.raises(CheckpointError, match="in_channels"):
        train(config(out, data, max_train_steps=2, encoding="original"))
    with pytest.raises(ConfigError, match="--resume"):
        train(config(out, data, max_train_steps=2))


@pytest.mark.parametrize("resume", [False, True])
def test_refuses_a_folder_holding_a_finished_model_without_checkpoints(tmp_path, data, resume):
    out = tmp_path / "model"  # as every bundled model: the weights and card of a finished run, no checkpoints
    train(config(out, data, max_train_steps=2, checkpoints_total_limit=None))
    for checkpoint in out.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="holds a finished model and no checkpoint"):
        train(config(out, data, max_train_steps=2, resume=resume))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_epoch_reloads_the_saved_weights_and_counts_on(tmp_path, data):
    out = tmp_path / "run"
    train(config(out, data, num_epochs=1, checkpointing_steps=100))
    for checkpoint in out.glob("checkpoint-*"):  # an original run folder has none
        shutil.rmtree(checkpoint)
    train(config(out, data, num_epochs=2, resume_epoch=1, checkpointing_steps=100))
    assert steps_logged(out) == [1, 2, 3, 4]
    assert json.loads((out / "segdiff_card.json").read_text())["training"]["steps"] == 4


def test_resume_refuses_another_batch_size_or_lr_schedule_and_extends_a_finished_run(tmp_path, data):
    out = tmp_path / "run"
    train(config(out, data, max_train_steps=2))
    for flag, asked, message in (
        ("learning_rate", 1e-2, "--learning_rate 0.001, this one asks 0.01"),
        ("lr_warmup_steps", 3, "--lr_warmup_steps 2, this one asks 3"),
        ("train_batch_size", 2, "--train_batch_size 4, this one asks 2"),  # other batches, other epochs
        ("gradient_accumulation_steps", 2, "--gradient_accumulation_steps 1, this one asks 2"),
        ("max_train_steps", 1, "its run is at step 2, this one asks for 1 steps in all"),
    ):
        with pytest.raises(ConfigError, match=f"checkpoint-2: (its run trained with )?{re.escape(message)}"):
            train(config(out, data, resume=True, **{"max_train_steps": 4, flag: asked}))
    assert steps_logged(out) == [1, 2]

    # A larger step budget continues the run; the LR decay then ends at the new last step.
    train(config(out, data, max_train_steps=4, resume=True))
    with open(out / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    card = json.loads((out / "segdiff_card.json").read_text())["training"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and float(rows[-1]["lr"]) == 0
    assert card["steps"] == 4 and card["flags"]["max_train_steps"] == 4
    assert card["recipe"]["learning_rate"] == float(rows[0]["lr"]) * 2  # step 1 of 2 warm-up steps
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["total_steps"] == 4


HOLD = """import sys, time
from segdiff.train.checkpoints import hold_run_folder
with hold_run_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_in_a_folder_is_refused_until_the_first_ends_even_by_a_kill(tmp_path, data):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        refusal = f"run: another training run \\(process {holder.pid} on .*\\) is writing to it"
        with pytest.raises(ConfigError, match=refusal):
            train(config(out, data, max_train_steps=2))
    finally:
        holder.kill()  # as SIGKILL leaves a run: no chance to clean up
        holder.wait()
    assert (out / ".train.lock").exists()
    train(config(out, data, max_train_steps=2))
    assert steps_logged(out) == [1, 2] and not (out / ".train.lock").exists()


# ---- exact resumes ------------------------------------------------------------------------------------------


def test_resume_mid_epoch_trains_exactly_the_uninterrupted_run(tmp_path, data):
    # 8 examples, batch 2: 4 steps an epoch. A copy of checkpoint-3 is a run killed after 3 of 4 batches.
    settings = dict(train_batch_size=2, checkpointing_steps=3, checkpoints_total_limit=None, ema=True, ablate=True)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(config(full, data, **settings))
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    train(config(resumed, data, resume=True, **settings))
    assert steps_logged(resumed) == [4, 5, 6, 7, 8]
    for name in ("checkpoint-8/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):  # raw, EMA
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("damaged", ["model.safetensors", "unet/diffusion_pytorch_model.safetensors"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumes(tmp_path, data, capsys, damaged):
    out = tmp_path / "run"
    settings = dict(max_train_steps=4, checkpoints_total_limit=None, ema=True)
    train(config(out, data, **settings))
    path = out / "checkpoint-4" / damaged
    path.write_bytes(path.read_bytes()[:100])  # a kill or a full disk mid-write
    capsys.readouterr()
    train(config(out, data, resume=True, **settings))
    printed = capsys.readouterr().out
    assert f"{out / 'checkpoint-4'}: damaged checkpoint" in printed and "resumed from checkpoint-2" in printed
    assert steps_logged(out) == [1, 2, 3, 4]
    assert SegDiffPipeline.from_pretrained(out / "checkpoint-4", device="cpu").card.training["steps"] == 4

    for checkpoint in ("checkpoint-2", "checkpoint-4"):  # nothing loadable left: one error naming both
        (out / checkpoint / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError, match="checkpoint-4: damaged.*checkpoint-2: damaged"):
        train(config(out, data, resume=True, **settings))


def test_a_save_killed_midway_leaves_nothing_behind_at_the_next_start(tmp_path, data):
    out = tmp_path / "run"
    train(config(out, data, max_train_steps=2))
    # What SIGKILL leaves mid-save: a staging folder, and unet/ moved aside with its successor not yet in.
    (out / ".saving-x1y2" / "unet").mkdir(parents=True)
    (out / "unet").rename(out / ".old-unet")
    (out / ".old-scheduler").mkdir()
    train(config(out, data, max_train_steps=3, resume=True))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert SegDiffPipeline.from_pretrained(out, device="cpu").card.training["steps"] == 3
