"""Sampling to disk: names as the original's, whole files only, resumable, the same noise along a figure row."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image
from test_training import write_data

from segdiff import CheckpointError, ConfigError, SegDiffPipeline
from segdiff.files import temp_path
from segdiff.model.card import ModelCard
from segdiff.model.pipeline import DEFAULT_STEPS
from segdiff.model.sampling import (
    EvalConfig,
    evaluate,
    mask_removal_grid,
    sample_grid,
    sample_many,
    sample_name,
    sampler_for,
    write_sample,
)
from segdiff.model.unet import build_unet


def tiny_model(folder, num_classes=3, channels=1, blind=False):
    """A random tiny segdiff model saved in `folder`; `blind` zeroes its output, so it ignores the mask."""
    encoding = "onehot" if num_classes else "none"
    card = ModelCard(
        num_classes=num_classes, img_channels=channels, img_size=32, encoding=encoding, preset="tiny"
    )
    torch.manual_seed(0)
    unet = build_unet("tiny", 32, channels, card.cond_channels)
    if blind:
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
    SegDiffPipeline(unet=unet, scheduler=DDIMScheduler(), card=card).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), counts=(2, 2, 5))


def eval_config(model, out, data, **overrides) -> EvalConfig:
    settings = dict(
        model_dir=str(model),
        output_dir=str(out),
        seg_dir=str(data[1]),
        img_size=32,
        eval_batch_size=2,
        eval_sample_size=4,
        sampler="ddim",
        num_inference_steps=2,
    )
    return EvalConfig(**{**settings, **overrides})


@pytest.mark.parametrize(
    ("mask_name", "index", "channels", "expected"),
    [
        ("case_001.png", 0, 1, "condon_case_001.png"),
        ("case_001.jpg", 0, 3, "condon_case_001.jpg"),
        ("case_001.npy", 0, 1, "condon_case_001.png"),  # a label map: the sample is still an image
        ("case_001.png", 0, 5, "condon_case_001.npy"),
        (None, 7, 1, "0007.png"),
        (None, 12345, 5, "12345.npy"),
    ],
)
def test_sample_names_follow_the_original(mask_name, index, channels, expected):
    assert sample_name(mask_name, index, channels) == expected


def test_sampler_defaults_to_the_originals_for_the_model_type():
    assert sampler_for("DDIM") == ("ddim", 50)
    assert sampler_for("DDPM") == ("ddpm", 1000)
    assert sampler_for("DDPM", "dpm++") == ("dpm++", DEFAULT_STEPS)
    assert sampler_for("DDIM", None, 10) == ("ddim", 10)


def test_write_sample_leaves_whole_files_only(tmp_path):
    image = np.random.default_rng(0).random((8, 8, 5)).astype(np.float32)
    write_sample(image, tmp_path / "x.npy")
    assert np.load(tmp_path / "x.npy").shape == (5, 8, 8)
    write_sample(image[..., :1], tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").mode == "L"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy", "x.png"]


def test_sample_many_names_counts_and_resumes_by_skipping(tmp_path, data):
    model = tiny_model(tmp_path / "model")
    cfg = eval_config(model, tmp_path / "run", data)
    folder, written, skipped = sample_many(cfg)
    names = sorted(p.name for p in folder.iterdir())
    assert folder.name == "samples_many_4" and (written, skipped) == (4, 0)
    assert len(names) == 4 and all(n.startswith("condon_test_") and n.endswith(".png") for n in names)

    # Interrupted: one file missing, one half-written temporary left behind. The rerun writes only the
    # missing one, and it is the image an uninterrupted run drew.
    first = (folder / names[0]).read_bytes()
    os.remove(folder / names[0])
    temp_path(folder / names[0]).write_bytes(b"half")
    stamps = {n: (folder / n).stat().st_mtime_ns for n in names[1:]}
    assert sample_many(cfg)[1:] == (1, 3)
    assert (folder / names[0]).read_bytes() == first
    assert {n: (folder / n).stat().st_mtime_ns for n in names[1:]} == stamps
    assert sorted(p.name for p in folder.iterdir()) == names

    # All test masks asked for: one sample each, never more.
    assert sample_many(eval_config(model, tmp_path / "run", data, eval_sample_size=100))[1] == 5


def test_a_rerun_draws_each_missing_image_in_the_batch_it_was_first_drawn_in(tmp_path, data, monkeypatch):
    # Kernels may pick their algorithm by batch size, so an image drawn in a smaller batch could differ in
    # its last bits: a rerun must sample the missing image among the same neighbours as the first run.
    import segdiff.model.sampling as evaluation

    drawn = []
    sample = evaluation._sample
    monkeypatch.setattr(evaluation, "_sample", lambda *a: drawn.append(list(a[2])) or sample(*a))
    cfg = eval_config(tiny_model(tmp_path / "model"), tmp_path / "run", data, eval_sample_size=5)
    folder, _, _ = sample_many(cfg)
    first = drawn[:]
    assert [len(b) for b in first] == [2, 2, 1]
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}

    drawn.clear()
    lost = f"condon_test_{first[1][1]:03d}.png"  # the second image of the second batch
    os.remove(folder / lost)
    assert sample_many(cfg)[1:] == (1, 4)
    assert drawn == [first[1]]  # that whole batch again, nothing else
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert after[lost][0] == before[lost][0]  # the same image, bit for bit
    del after[lost], before[lost]
    assert after == before  # its neighbour was drawn again but not rewritten


def test_unconditional_sample_many_numbers_its_files(tmp_path, data):
    model = tiny_model(tmp_path / "model", num_classes=0)
    folder, _, _ = sample_many(eval_config(model, tmp_path / "run", data, seg_dir=None, eval_sample_size=3))
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "0002.png"]


def test_mask_removal_keeps_the_noise_along_each_row(tmp_path, data):
    # A model that ignores its mask draws the same image along a row iff the row shares its noise.
    pipe = SegDiffPipeline.from_pretrained(tiny_model(tmp_path / "model", blind=True), device="cpu")
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[:, 4:12, 4:12], masks[:, 20:28, 20:28] = 1, 2
    grid = mask_removal_grid(pipe, masks, sampler="ddim", steps=2)
    cell = 32 + 2
    cells = [
        [grid[2 + r * cell : r * cell + cell, 2 + c * cell : c * cell + cell] for c in range(3)]
        for r in range(4)
    ]
    assert grid.shape[:2] == (4 * cell + 2, 3 * cell + 2)  # per example: masks row, samples row; 3 states
    for masks_row, samples_row in ((cells[0], cells[1]), (cells[2], cells[3])):
        assert all(np.array_equal(samples_row[0], s) for s in samples_row[1:])
        assert not np.array_equal(masks_row[0], masks_row[1]) and not masks_row[2].any()
    assert not np.array_equal(cells[1][0], cells[3][0])  # the two examples have their own noise
    # The full-mask column is the plain grid's sample: the figure and the grid share their noise.
    plain = sample_grid(pipe, 2, masks, sampler="ddim", steps=2)
    assert np.array_equal(plain[cell + 2 : 2 * cell, 2:cell], cells[1][0])


def test_eval_writes_the_grid_and_the_figures_asked_for(tmp_path, data, capsys):
    model = tiny_model(tmp_path / "model")
    cfg = eval_config(model, tmp_path / "run", data, img_dir=str(data[0]), mask_removal=True, blank_mask=True)
    written = evaluate(cfg)
    assert [p.name for p in written] == ["eval_grid.png", "eval_mask_removal.png", "eval_blank_mask.png"]
    assert all(p.parent == tmp_path / "run" / "samples" for p in written)
    assert "eval:" in capsys.readouterr().err  # a bar: the original settings' 1000 steps are minutes on a CPU


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"img_size": 64}, CheckpointError, "--img_size 32, not 64"),
        ({"img_channels": 3}, CheckpointError, "--num_img_channels 1, not 3"),
        ({"seg_dir": None}, CheckpointError, "segmentation-guided"),
        ({"model_dir": "nowhere"}, CheckpointError, "nowhere: no such model folder"),
        ({"num_classes": 4}, CheckpointError, "num_classes=4"),
        ({"seg_dir": None, "mask_removal": True}, ConfigError, "--eval_mask_removal"),
        ({"eval_batch_size": 0}, ConfigError, "--eval_batch_size 0"),
        ({"eval_sample_size": -1}, ConfigError, "--eval_sample_size -1"),
        ({"sampler": "euler"}, ConfigError, "--scheduler euler"),
    ],
)
def test_eval_refuses_a_model_unlike_the_flags(tmp_path, data, overrides, error, message):
    model = tiny_model(tmp_path / "model")
    with pytest.raises(error, match=message):
        sample_many(eval_config(model, tmp_path / "run", data, **overrides))
