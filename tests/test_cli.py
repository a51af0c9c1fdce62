"""train_cli.py end to end: the original commands, run folders and sample names; resume after SIGKILL;
original checkpoints; one clear line and exit status 2 for every bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from PIL import Image
from test_training import write_data

import train_cli
from segdiff import SegDiffPipeline
from segdiff.model.unet import PRESETS
from segdiff.train.loop import TrainConfig

CLI = Path(train_cli.__file__).resolve()
# One thread per process: the tiny models gain nothing from more, and the test machine's cores are shared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--img_size", "32", "--preset", "tiny", "--train_batch_size", "4", "--lr_warmup_steps", "2"]
FAST_SAMPLING = ["--sampler", "ddim", "--num_inference_steps", "2", "--eval_batch_size", "3"]


def cli(*args, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, str(CLI), *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)


def guided(data) -> list[str]:
    img_dir, seg_dir = data
    return [
        "--img_dir",
        img_dir,
        "--seg_dir",
        seg_dir,
        "--segmentation_guided",
        "--num_segmentation_classes",
        "3",
    ]


def steps_logged(run) -> list[int]:
    with open(Path(run) / "train_log.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working directory with a data set, where run folders get their default names."""
    work = tmp_path_factory.mktemp("work")
    write_data(work / "data", counts=(8, 4, 5))
    return work


@pytest.fixture(scope="module")
def data(work):
    return ["data/img", "data/mask"]


@pytest.fixture(scope="module")
def trained(work, data):
    """A guided, mask-ablated DDIM model trained for two epochs by the original command plus --preset tiny."""
    flags = [*guided(data), "--use_ablated_segmentations", "--model_type", "DDIM", "--dataset", "phantom"]
    result = cli("--mode", "train", *flags, *TINY, *FAST_SAMPLING, "--num_epochs", "2", cwd=work)
    assert result.returncode == 0, result.stderr
    return work / "ddim-phantom-32-segguided-ablated", flags


# ---- flags ---------------------------------------------------------------------------------------------


def test_help_documents_every_original_and_new_flag():
    text = train_cli.build_parser().format_help()
    original = ["--mode", "--img_size", "--num_img_channels", "--dataset", "--img_dir", "--seg_dir", "--model_type",
                "--segmentation_guided", "--segmentation_channel_mode", "--num_segmentation_classes",
                "--train_batch_size", "--eval_batch_size", "--num_epochs", "--resume_epoch",
                "--use_ablated_segmentations", "--eval_noshuffle_dataloader", "--eval_mask_removal",
                "--eval_blank_mask", "--eval_sample_size"]  # fmt: skip
    new = ["--output_dir", "--model_dir", "--preset", "--mask_encoding", "--learning_rate", "--lr_warmup_steps",
           "--mixed_precision", "--ema", "--checkpointing_steps", "--checkpoints_total_limit", "--resume", "--seed",
           "--sampler", "--num_inference_steps", "--class_names", "--dataloader_num_workers",
           "--gradient_accumulation_steps", "--max_train_steps", "--eval_ablated_masks", "--recipe",
           "--prediction_type", "--loss_weighting", "--snr_gamma", "--beta_schedule", "--zero_terminal_snr",
           "--compile"]  # fmt: skip
    for flag in original + new:
        assert f"{flag} " in text or f"{flag}\n" in text, flag
    for action in train_cli.build_parser()._actions:
        assert action.help, action.dest


def test_speed_flags_reach_the_training_config(tmp_path):
    flags = ["--img_dir", str(tmp_path), "--mixed_precision", "bf16", "--dataloader_num_workers", "2"]
    plain = train_cli.train_config(train_cli.build_parser().parse_args(flags), str(tmp_path), "cmd")
    compiled = train_cli.train_config(train_cli.build_parser().parse_args([*flags, "--compile"]), str(tmp_path), "cmd")
    assert (plain.compile, compiled.compile) == (False, True)
    assert (compiled.mixed_precision, compiled.dataloader_num_workers) == ("bf16", 2)


def test_defaults_are_the_originals():
    args = vars(train_cli.build_parser().parse_args([]))
    expected = {
        "mode": "train", "img_size": 256, "num_img_channels": 1, "dataset": "breast_mri", "img_dir": None,
        "seg_dir": None, "model_type": "DDPM", "segmentation_guided": False, "segmentation_channel_mode": "single",
        "num_segmentation_classes": None, "train_batch_size": 32, "eval_batch_size": 8, "num_epochs": 200,
        "resume_epoch": None, "use_ablated_segmentations": False, "eval_noshuffle_dataloader": False,
        "eval_mask_removal": False, "eval_blank_mask": False, "eval_sample_size": 1000,
    }  # fmt: skip
    assert {key: args[key] for key in expected} == expected
    # No --preset: the original's network, or the attention-free upscaler for a cascade's second stage.
    assert TrainConfig(output_dir="run", img_dir="img").preset == "paper"
    assert TrainConfig(output_dir="run", img_dir="img", upscale_from="base").preset == "upscaler"


# ---- the original commands, end to end ------------------------------------------------------------------


def test_guided_ablated_training_writes_the_original_run_folder(trained):
    run, _ = trained
    pipe = SegDiffPipeline.from_pretrained(run, device="cpu")
    assert pipe.card.num_classes == 3 and pipe.card.encoding == "onehot"
    assert pipe.card.training["steps"] == 4 and pipe.card.training["flags"]["ablate"]
    assert json.loads((run / "model_index.json").read_text())["_class_name"] == "SegDiffPipeline"
    assert (run / "samples" / "0001.png").is_file()  # the final grid, named by its epoch as the original
    assert steps_logged(run) == [1, 2, 3, 4]


def test_eval_many_names_one_sample_per_test_mask(trained, work):
    run, flags = trained
    result = cli(
        "--mode", "eval_many", *flags, "--img_size", "32", *FAST_SAMPLING, "--eval_sample_size", "3", cwd=work
    )
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (run / "samples_many_3").iterdir())
    test_masks = {p.name for p in (work / "data" / "mask" / "all" / "test").iterdir()}
    assert len(names) == 3 and {n.removeprefix("condon_") for n in names} <= test_masks


def test_eval_mask_removal_writes_its_figure(trained, work, monkeypatch):
    run, flags = trained
    monkeypatch.chdir(work)
    assert (
        train_cli.main(["--mode", "eval", *flags, "--img_size", "32", *FAST_SAMPLING, "--eval_mask_removal"])
        == 0
    )
    figure = np.asarray(Image.open(run / "samples" / "eval_mask_removal.png"))
    assert figure.shape[0] == 2 * 3 * 34 + 2  # 3 examples, each a row of masks over a row of samples
    assert (run / "samples" / "eval_grid.png").is_file()


def test_sigkill_mid_run_then_resume_reaches_the_same_final_step(work, data, tmp_path):
    run = tmp_path / "run"
    flags = ["--mode", "train", *guided(data), *TINY, *FAST_SAMPLING, "--output_dir", run, "--max_train_steps", "60",
             "--checkpointing_steps", "4", "--ema"]  # fmt: skip
    command = [sys.executable, str(CLI), *map(str, flags)]
    process = subprocess.Popen(
        command, cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 600
        while not (run / "checkpoint-8").is_dir() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = max(int(p.name.removeprefix("checkpoint-")) for p in run.glob("checkpoint-*"))
    assert 8 <= killed_at < 60

    result = cli(*flags, "--resume", cwd=work)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {run / f'checkpoint-{killed_at}'} at step {killed_at} of 60" in result.stdout
    assert steps_logged(run) == list(range(1, 61))  # steps past the checkpoint are redone, logged once
    card = json.loads((run / "segdiff_card.json").read_text())
    assert card["training"]["steps"] == 60 and card["training"]["finished"]


@pytest.mark.parametrize("channels", [3, 5])
def test_rgb_and_npy_images_train_and_sample(tmp_path, monkeypatch, channels):
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path / "data", counts=(4, 2, 2), channels=channels)
    flags = [*guided(["data/img", "data/mask"]), "--num_img_channels", str(channels), "--dataset", "multi"]
    assert train_cli.main(["--mode", "train", *flags, *TINY, *FAST_SAMPLING, "--num_epochs", "1"]) == 0
    run = tmp_path / "ddpm-multi-32-segguided"
    assert SegDiffPipeline.from_pretrained(run, device="cpu").card.img_channels == channels
    code = train_cli.main(["--mode", "eval_many", *flags, "--img_size", "32", *FAST_SAMPLING,
                           "--output_dir", str(run), "--eval_sample_size", "2"])  # fmt: skip
    assert code == 0
    samples = sorted((run / "samples_many_2").iterdir())
    assert len(samples) == 2
    if channels == 3:
        assert Image.open(samples[0]).mode == "RGB"
    else:
        assert samples[0].suffix == ".npy" and np.load(samples[0]).shape == (5, 32, 32)


# ---- the original code's checkpoints -------------------------------------------------------------------


def original_unet(folder, channels=1):
    """A UNet as the original saved it: image channels + one `class_id / 255` mask channel."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=channels + 1, out_channels=channels, **PRESETS["tiny"])
    unet.save_pretrained(folder / "unet")


def test_eval_many_on_an_original_run_folder_and_a_released_unet(work, data, tmp_path, monkeypatch):
    monkeypatch.chdir(work)
    run = work / "ddim-original-32-segguided"  # as the original named it; eval finds it by default
    original_unet(run)
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(run / "scheduler")
    index = {"_class_name": "SegGuidedDDIMPipeline", "_diffusers_version": "0.26.0", "eval_dataloader": [None, None],
             "external_config": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
             "unet": ["diffusers", "UNet2DModel"]}  # fmt: skip
    (run / "model_index.json").write_text(json.dumps(index))
    flags = ["--model_type", "DDIM", "--img_size", "32", "--dataset", "original", *guided(data)[2:]]
    result = cli("--mode", "eval_many", *flags, "--eval_sample_size", "2", "--eval_batch_size", "2", cwd=work)
    assert result.returncode == 0, result.stderr
    assert len(list((run / "samples_many_2").glob("condon_*.png"))) == 2

    released = tmp_path / "released"
    original_unet(released)
    out = tmp_path / "samples-from-released"
    code = train_cli.main(["--mode", "eval", *flags, "--model_dir", str(released / "unet"), "--output_dir", str(out),
                           *FAST_SAMPLING])  # fmt: skip
    assert code == 0 and (out / "samples" / "eval_grid.png").is_file()


# ---- bad input: exit status 2 and one line naming what is wrong ------------------------------------------


def corrupt(root):
    (root / "data" / "img" / "train" / "train_000.png").write_bytes(b"not a png")


def unmatched(root):
    os.rename(
        root / "data" / "mask" / "all" / "train" / "train_001.png",
        root / "data" / "mask" / "all" / "train" / "x.png",
    )


def too_many_classes(root):
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(
        root / "data" / "mask" / "all" / "train" / "train_002.png"
    )


BAD = [
    ([], None, "--img_dir"),
    (["--img_dir", "data/img", "--segmentation_guided"], None, "--segmentation_guided needs --seg_dir"),
    (
        ["--img_dir", "data/img", "--segmentation_guided", "--seg_dir", "data/mask"],
        None,
        "--num_segmentation_classes",
    ),
    (["GUIDED", "--num_segmentation_classes", "1"], None, "--num_segmentation_classes 1"),
    (["GUIDED", "--segmentation_channel_mode", "multi"], None, "--segmentation_channel_mode multi"),
    (["GUIDED", "--img_size", "0"], None, "--img_size 0"),
    (["GUIDED", "--img_size", "-64"], None, "--img_size -64"),
    (["GUIDED", "--img_size", "100000"], None, "--img_size 100000"),
    (["GUIDED", "--img_size", "33"], None, "multiple of 2"),
    (["GUIDED", "--train_batch_size", "0"], None, "--train_batch_size 0"),
    (["GUIDED", "--train_batch_size", "-4"], None, "--train_batch_size -4"),
    (["GUIDED", "--eval_batch_size", "0"], None, "--eval_batch_size 0"),
    (["GUIDED", "--num_epochs", "0"], None, "--num_epochs 0"),
    (["GUIDED", "--num_epochs", "-1"], None, "--num_epochs -1"),
    (["GUIDED", "--learning_rate", "-1e-3"], None, "--learning_rate -0.001: expected a value in 1e-10..1.0"),
    (["GUIDED", "--img_dir", "nowhere"], None, "nowhere/train: missing image folder"),
    (["GUIDED"], corrupt, "train_000.png: cannot read the image"),
    (["GUIDED"], unmatched, "train_001.png"),
    (["GUIDED"], too_many_classes, "train_002.png: pixel value 7, expected class ids 0..2"),
    (["--mode", "eval", "GUIDED", "--output_dir", "no-model"], None, "no-model: no such model folder"),
    (["--mode", "eval", "GUIDED", "--guidance_scale", "30"], None, "--guidance_scale 30.0: expected a value in 1..20"),
    (
        ["--mode", "eval_many", "--img_dir", "data/img", "--guidance_scale", "2"],
        None,
        "--guidance_scale 2: mask guidance needs a segmentation-guided model",
    ),
    (["GUIDED", "--output_dir", "data/img/train/train_000.png"], None, "train_000.png: a file, not a folder"),
]


@pytest.mark.parametrize(("flags", "damage", "message"), BAD, ids=[b[2] for b in BAD])
def test_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys, flags, damage, message):
    write_data(tmp_path / "data", counts=(4, 2, 2))
    if damage:
        damage(tmp_path)
    monkeypatch.chdir(tmp_path)
    flags = [f for flag in flags for f in (guided(["data/img", "data/mask"]) if flag == "GUIDED" else [flag])]
    size = [] if "--img_size" in flags else ["--img_size", "32"]
    code = train_cli.main([*flags, *size, "--preset", "tiny"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_output_folder_holding_another_model_is_refused(trained, work, monkeypatch, capsys):
    run, flags = trained
    monkeypatch.chdir(work)
    code = train_cli.main(["--mode", "train", *flags, *TINY, "--num_segmentation_classes", "4",
                           "--output_dir", str(run)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {run}") and "\n" not in err


def test_malformed_flags_exit_2_with_one_line(capsys):
    for flags, message in (
        (["--img_size", "abc"], "--img_size: invalid int value"),
        (["--mode", "fit"], "--mode"),
    ):
        with pytest.raises(SystemExit) as stop:
            train_cli.main(flags)
        err = capsys.readouterr().err
        assert (
            stop.value.code == 2
            and err.startswith("error: argument ")
            and message in err
            and err.count("\n") == 1
        )


def test_a_user_mistake_prints_no_traceback(tmp_path):
    result = cli("--img_dir", "nowhere", "--img_size", "32", "--preset", "tiny", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: nowhere/train: missing image folder"
