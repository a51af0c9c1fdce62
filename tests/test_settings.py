"""Each setting declared once: one seed range every command takes, flag defaults read from the configs, one
precision vocabulary and one sampler word, each with its other spelling accepted."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch
from test_studio import save_student

import train_cli
from segdiff import SegDiffPipeline
from segdiff.choices import MAX_SEED, STUDENT, accelerate_precision, precision_of
from segdiff.cli import dataset, phantoms, quality, volumes
from segdiff.errors import ArgumentError, ConfigError
from segdiff.model.sampling import EvalConfig, noise_generator, sample_grid
from segdiff.studio.actions import Settings, Studio
from segdiff.synth.pairs import Settings as PairSettings
from segdiff.train.loop import EpochOrder, TrainConfig

BAD_SEEDS = [-1, MAX_SEED + 1]


def old_noise_seed(seed: int, index: int, stream: int) -> int:
    """The generator seed `noise_generator` used before seeds were hashed: bit fields of seed and index."""
    return ((seed * 2 + stream) << 32) + index


# ---- seeds ---------------------------------------------------------------------------------------------


def noise(seed: int, index: int = 0, stream: int = 0) -> torch.Tensor:
    return torch.randn(16, generator=noise_generator(seed, index, stream))


def test_every_seed_index_and_stream_draws_noise_of_its_own():
    # torch's CPU generator keeps only the low 32 bits of its seed: the old bit fields left the seed and the
    # stream without effect, so every seed drew the same images.
    assert torch.equal(torch.randn(16, generator=torch.Generator().manual_seed(old_noise_seed(0, 3, 0))),
                       torch.randn(16, generator=torch.Generator().manual_seed(old_noise_seed(12345, 3, 1))))
    draws = [noise(s, i, k) for s in (0, 1, 12345, MAX_SEED) for i in (0, 1, 2**27) for k in (0, 1)]
    assert all(not torch.equal(a, b) for j, a in enumerate(draws) for b in draws[j + 1:])
    assert torch.equal(noise(12345, 7, 1), noise(12345, 7, 1))


def test_the_training_order_depends_on_the_seed():
    orders = {tuple(EpochOrder(50, seed)) for seed in (0, 1, 99)}
    assert len(orders) == 3


def test_the_largest_seed_samples_a_grid(small_model_dir):
    with pytest.raises(ValueError, match="Overflow"):  # what the progress grid of such a run died of
        torch.Generator().manual_seed(old_noise_seed(MAX_SEED, 0, 0))
    pipe = SegDiffPipeline.from_pretrained(small_model_dir, device="cpu", precision="fp32")
    pipe.set_progress_bar_config(disable=True)
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[:, 8:24, 8:24] = 1
    grid = sample_grid(pipe, 2, masks, sampler="ddim", steps=1, seed=MAX_SEED)
    again = sample_grid(pipe, 2, masks, sampler="ddim", steps=1, seed=MAX_SEED)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[0] > 2 * 32  # mask row, sample row
    np.testing.assert_array_equal(grid, again)  # the same seed, the same grid


def _refused(capsys, seed: int, status) -> None:
    """The command refused `seed` in one line naming it and the range, with exit status 2."""
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"--seed {seed}: " in err and f"0..{MAX_SEED}" in err, err


def _exit_status(main, argv) -> int:
    with pytest.raises(SystemExit) as ended:
        main(argv)
    return ended.value.code


@pytest.mark.parametrize("seed", BAD_SEEDS)
@pytest.mark.parametrize("mode", ["train", "eval", "eval_many", "distill"])
def test_train_cli_refuses_a_seed_out_of_range_before_anything_runs(tmp_path, capsys, seed, mode):
    out = tmp_path / "run"
    argv = ["--mode", mode, "--img_dir", str(tmp_path), "--output_dir", str(out), "--seed", str(seed)]
    if mode != "train":
        argv += ["--model_dir", str(tmp_path / "no-model")]
    _refused(capsys, seed, train_cli.main(argv))
    assert not out.exists()


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_dataset_synthesize_refuses_a_seed_out_of_range_leaving_no_manifest(tmp_path, capsys, seed):
    out = tmp_path / "pairs"
    argv = ["synthesize", str(tmp_path / "model"), str(out), "--masks", str(tmp_path), "--seed", str(seed)]
    _refused(capsys, seed, _exit_status(dataset.main, argv))
    assert not out.exists()


@pytest.mark.parametrize("seed", BAD_SEEDS)
@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--img_dir", "img", "--seg_dir", "seg", "--model", "no-model"],
        ["train-segmenter", "--img_dir", "img", "--seg_dir", "seg", "--num_classes", "3", "--img_size", "32",
         "--out", "SEGMENTER"],
    ],
)  # fmt: skip
def test_quality_refuses_a_seed_out_of_range(tmp_path, capsys, seed, argv):
    argv = [str(tmp_path / a) if a == "SEGMENTER" else a for a in argv]
    _refused(capsys, seed, _exit_status(quality.main, [*argv, "--seed", str(seed)]))
    assert not (tmp_path / "SEGMENTER").exists()


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_phantoms_and_volumes_refuse_a_seed_out_of_range(tmp_path, capsys, seed):
    _refused(capsys, seed, _exit_status(phantoms.main, [str(tmp_path / "ph"), "--n_train", "1", "--seed", str(seed)]))
    convert = ["convert", str(tmp_path / "slices"), "--images", "img.nii.gz", "--labels", "lab.nii.gz"]
    _refused(capsys, seed, _exit_status(volumes.main, [*convert, "--seed", str(seed)]))
    synthesize = ["synthesize", "model", "labels.nii.gz", str(tmp_path / "out.nii.gz")]
    _refused(capsys, seed, _exit_status(volumes.main, [*synthesize, "--seed", str(seed)]))
    assert sorted(tmp_path.iterdir()) == []


def test_every_use_takes_the_whole_range(tmp_path):
    """The largest seed passes each config's check (the studio's, the pairs', training's and eval's)."""
    assert Settings(seed=MAX_SEED).seed == MAX_SEED
    assert PairSettings(model="m", masks="m", seed=MAX_SEED).seed == MAX_SEED
    assert TrainConfig(output_dir="run", img_dir="img", seed=MAX_SEED).seed == MAX_SEED
    assert EvalConfig(model_dir="m", output_dir="run", seed=MAX_SEED).seed == MAX_SEED
    for make in (Settings, lambda seed: EvalConfig(model_dir="m", output_dir="run", seed=seed)):
        with pytest.raises(ConfigError, match=f"0..{MAX_SEED}"):
            make(seed=MAX_SEED + 1)


# ---- defaults read from the configs --------------------------------------------------------------------


def test_train_cli_defaults_are_the_configs(tmp_path):
    args = train_cli.build_parser().parse_args(["--img_dir", str(tmp_path)])
    assert train_cli.train_config(args, "run", "cmd") == TrainConfig(output_dir="run", img_dir=str(tmp_path),
                                                                     command="cmd")  # fmt: skip
    evaluated = train_cli.eval_config(args, "run")
    # the two fields the original flags give a default the config leaves open (None: the model's own)
    sizes = dict(img_size=args.img_size, img_channels=args.num_img_channels)
    assert evaluated == EvalConfig(model_dir="run", output_dir="run", img_dir=str(tmp_path), **sizes)


def test_dataset_flags_default_to_the_pairs_settings(tmp_path):
    args = dataset.parser().parse_args(["synthesize", "model", "out", "--masks", "masks"])
    for field in fields(PairSettings):
        if hasattr(args, field.name) and field.name not in ("model", "masks"):
            assert getattr(args, field.name) == field.default, field.name


def test_studio_settings_default_to_settings(small_model_dir, tmp_path):
    studio = Studio(SegDiffPipeline.from_pretrained(small_model_dir, device="cpu"))
    assert studio.settings() == Settings() == studio.settings(sampler=None)
    assert studio.settings(seed=3, keep=["fetal head"]) == Settings(seed=3, omit=(1,))
    with pytest.raises(TypeError):
        studio.settings(seeds=3)
    # A model with a student draws with it unless a request names a sampler: the word the command lines speak.
    with_student = Studio(SegDiffPipeline.from_pretrained(save_student(small_model_dir, tmp_path / "m"), device="cpu"))
    assert with_student.settings() == Settings(sampler=STUDENT) == Settings(sampler="student")
    assert with_student.settings(sampler="ddim", steps=20) == Settings(sampler="ddim", steps=20)


# ---- one vocabulary, the other spelling an alias --------------------------------------------------------


def test_precision_speaks_one_vocabulary_with_accelerates_no_as_fp32(tmp_path, small_model_dir):
    assert [precision_of(p) for p in (None, "auto", "no", "fp32", "bf16")] == ["auto", "auto", "fp32", "fp32", "bf16"]
    assert [accelerate_precision(p) for p in ("auto", "fp32", "bf16", "fp16")] == [None, "no", "bf16", "fp16"]
    with pytest.raises(ConfigError, match="'fp8'"):
        precision_of("fp8")
    parser = train_cli.build_parser()
    for word in ("no", "fp32"):
        args = parser.parse_args(["--img_dir", str(tmp_path), "--mixed_precision", word])
        assert train_cli.train_config(args, "run", "cmd").mixed_precision == "fp32"
        assert train_cli.eval_config(args, "run").precision == "fp32"
    args = quality.parser().parse_args(["evaluate", "--img_dir", "i", "--seg_dir", "s", "--model", "m",
                                        "--precision", "no"])  # fmt: skip
    assert precision_of(args.precision) == "fp32"
    pipe = SegDiffPipeline.from_pretrained(small_model_dir, device="cpu", precision="no")
    assert pipe.precision == "fp32"


def test_scheduler_is_the_word_and_sampler_its_alias(small_model_dir):
    parser = train_cli.build_parser()
    assert parser.parse_args(["--scheduler", "ddim"]).sampler == parser.parse_args(["--sampler", "ddim"]).sampler == "ddim"
    evaluate = ["evaluate", "--img_dir", "i", "--seg_dir", "s", "--model", "m"]
    for flag in ("--scheduler", "--sampler"):
        assert quality.parser().parse_args([*evaluate, flag, "ddim"]).scheduler == "ddim"
    pipe = SegDiffPipeline.from_pretrained(small_model_dir, device="cpu", precision="fp32")
    pipe.set_progress_bar_config(disable=True)
    mask = np.zeros((32, 32), np.int64)
    mask[8:24, 8:24] = 2

    def draw(**choice):
        kwargs = dict(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
        return pipe(mask, **choice, **kwargs).images

    np.testing.assert_array_equal(draw(scheduler="ddpm"), draw(sampler="ddpm"))
    assert not np.array_equal(draw(scheduler="ddim"), draw(sampler="ddpm"))
    with pytest.raises(ArgumentError, match="scheduler='ddpm' and sampler='ddim'"):
        draw(scheduler="ddpm", sampler="ddim")
