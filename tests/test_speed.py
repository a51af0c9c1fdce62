"""Speed options change the arithmetic's speed, not its result: compiled = eager, rare loss logs = their mean."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from test_pipeline import SIZE, square_masks, tiny_unet
from test_training import config, write_data

from segdiff import SegDiffPipeline
from segdiff.model.card import ModelCard
from segdiff.train.loop import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), counts=(8, 2, 2))


def run(out, data, **overrides) -> list[dict]:
    """Train the tiny model 4 steps (data of 8 cases: 2 epochs) at fp32; -> the CSV log's rows."""
    settings = dict(max_train_steps=4, lr_warmup_steps=1, checkpointing_steps=100, mixed_precision="no")
    train(config(out, data, **(settings | overrides)))
    with open(out / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_compiled_sampling_draws_the_eager_images():
    card = ModelCard(num_classes=4, img_channels=1, img_size=SIZE)
    pipe = SegDiffPipeline(tiny_unet(in_channels=4), DDPMScheduler(num_train_timesteps=1000), card)
    pipe.set_progress_bar_config(disable=True)
    masks = square_masks()

    def draw():
        return pipe(
            masks, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np"
        )

    eager = draw().images
    pipe.set_speed(precision="fp32", channels_last=False, compile=True)
    compiled = draw().images
    assert hasattr(pipe.unet, "_orig_mod")  # the compiled module ran
    other_seed = pipe(
        masks, generator=torch.Generator().manual_seed(1), num_inference_steps=3, output_type="np"
    )
    assert np.abs(compiled - eager).max() < 1e-3 < np.abs(other_seed.images - eager).max()


def test_compiled_training_follows_the_eager_losses_and_saves_a_plain_model(tmp_path, data):
    eager = run(tmp_path / "eager", data)
    compiled = run(tmp_path / "compiled", data, compile=True)
    assert [row["step"] for row in compiled] == [row["step"] for row in eager] == ["1", "2", "3", "4"]
    losses = np.array([[float(row["loss"]) for row in rows] for rows in (eager, compiled)])
    # The same weights and noise give the same loss; then Adam divides rounding-sized gradient differences
    # by rounding-sized second moments, so later steps drift apart a little.
    np.testing.assert_allclose(losses[1, :2], losses[0, :2], rtol=1e-4)
    np.testing.assert_allclose(losses[1], losses[0], rtol=3e-2)
    reopened = SegDiffPipeline.from_pretrained(tmp_path / "compiled", precision="fp32")
    assert not hasattr(reopened.unet, "_orig_mod")  # the saved model is the plain UNet


def test_rare_loss_logs_hold_the_mean_of_the_steps_between(tmp_path, data):
    every = run(tmp_path / "every", data, max_train_steps=5)
    rare = run(tmp_path / "rare", data, max_train_steps=5, log_every=2)
    assert [row["step"] for row in rare] == ["2", "4", "5"]  # and always the last step
    losses = [float(row["loss"]) for row in every]
    expected = [np.mean(losses[0:2]), np.mean(losses[2:4]), losses[4]]
    np.testing.assert_allclose([float(row["loss"]) for row in rare], expected, rtol=1e-5)
