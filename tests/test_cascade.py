"""Cascades: a 32 px base and an upscaler to 64 px train, save, resume exactly, reopen as one model and draw
64 px images that follow the mask; omitted classes reach both stages; a damaged cascade is refused in words."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SMALL_CLASS_NAMES, save_tiny_model, sdedit_distance
from PIL import Image
from safetensors.torch import load_file
from test_training import config, steps_logged, write_data

import train_cli
from segdiff import CheckpointError, ConfigError, SegDiffPipeline
from segdiff.measure.quality import measure_quality, run_label
from segdiff.measure.segmenter import Segmenter, SegmenterConfig
from segdiff.model.card import CARD_FILE
from segdiff.train.loop import train

# Learns fast enough that a few dozen tiny steps draw the classes' grey levels.
LEARN = dict(train_batch_size=8, learning_rate=3e-3, lr_warmup_steps=5, checkpointing_steps=1000)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), size=64, counts=(16, 4, 4))


@pytest.fixture(scope="module")
def cascade(tmp_path_factory, data):
    """(base folder, cascade folder): a 32 px base and its upscaler to 64 px, briefly trained."""
    root = tmp_path_factory.mktemp("cascade")
    base, cascade = root / "base-32", root / "cascade-64"
    train(config(base, data, img_size=32, max_train_steps=60, **LEARN))
    train(
        config(cascade, data, img_size=64, upscale_from=str(base), crop_size=32, max_train_steps=60, **LEARN)
    )
    return base, cascade


def class_means(image: np.ndarray, mask: np.ndarray) -> list[float]:
    return [float(image[mask == c].mean()) for c in range(3)]


def test_a_cascade_reopens_as_one_model_and_draws_its_upscalers_size(cascade, data):
    base_dir, folder = cascade
    card = json.loads((folder / "segdiff_card.json").read_text())
    assert card["img_size"] == 64 and card["training"]["flags"]["upscale_from"] == str(base_dir)
    assert card["upscale"]["low_res_size"] == 32 and card["upscale"]["base"] == "base"
    assert (folder / "base" / "segdiff_card.json").is_file()

    pipe = SegDiffPipeline.from_pretrained(folder, device="cpu")
    assert pipe.base is not None and pipe.base.card.img_size == 32
    assert pipe.unet.config.sample_size == 32  # it runs on 2x2-unshuffled inputs
    mask = np.zeros((64, 64), np.int64)
    mask[8:56, 8:30] = 1
    mask[16:48, 36:60] = 2
    steps = []
    images = pipe(
        mask,
        batch_size=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        callback=lambda i, n: steps.append((i, n)),
    ).images
    assert images.shape == (4, 64, 64, 1)
    # Both stages report progress, on one count: 12 base steps then the upscaler's 4.
    assert steps[-1] == (16, 16) and [i for i, _ in steps] == list(range(1, 17))
    # The training images' grey rises with the class id; the drawn ones follow the mask's layout.
    means = class_means(images.mean(0)[..., 0], mask)
    assert means[0] < means[1] < means[2], means
    # Each checkpoint is a whole cascade too.
    again = SegDiffPipeline.from_pretrained(folder / "checkpoint-60", device="cpu")
    assert again.base is not None and again.card.img_size == 64


def test_omitted_classes_reach_both_stages(cascade):
    pipe = SegDiffPipeline.from_pretrained(cascade[1], device="cpu")
    mask = np.zeros((64, 64), np.int64)
    mask[8:56, 8:30] = 1
    mask[16:48, 36:60] = 2
    kwargs = dict(batch_size=2, output_type="np")
    omitted = pipe(mask, omit=[2], generator=torch.Generator().manual_seed(1), **kwargs).images
    without = pipe(np.where(mask == 2, 0, mask), generator=torch.Generator().manual_seed(1), **kwargs).images
    kept = pipe(mask, generator=torch.Generator().manual_seed(1), **kwargs).images
    np.testing.assert_array_equal(omitted, without)
    assert not np.array_equal(omitted, kept)


def test_sdedit_runs_through_both_stages(cascade):
    pipe = SegDiffPipeline.from_pretrained(cascade[1], device="cpu")
    mask = np.zeros((64, 64), np.int64)
    mask[20:44, 20:44] = 1
    start = torch.zeros(1, 1, 64, 64)
    start[..., :, 32:] = 1.0  # half black, half white: nothing the model would draw from this mask

    assert sdedit_distance(pipe, mask, start, 0.2) < sdedit_distance(pipe, mask, start, 1.0)


def test_the_upscaler_resumes_exactly(tmp_path, data, cascade):
    settings = dict(
        img_size=64,
        upscale_from=str(cascade[0]),
        crop_size=32,
        train_batch_size=4,
        checkpointing_steps=3,
        checkpoints_total_limit=None,
        ema=True,
        ablate=True,
        max_train_steps=5,
    )
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(config(full, data, **settings))
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    train(config(resumed, data, resume=True, **settings))
    assert steps_logged(resumed) == [4, 5]
    for name in ("checkpoint-5/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (resumed / "base" / "unet").is_dir()


def test_a_cascades_upscaler_gets_a_student_that_draws_at_the_defaults(tmp_path, data, cascade):
    """`--mode distill` on a cascade distils its upscaler (at the card's noise level, on crops); the base
    and the upscaler itself are kept as they were, and the student draws only at the default settings."""
    folder, out = cascade[1], tmp_path / "cascade-student"
    settings = dict(distill_from=str(folder), student_steps=2, teacher_steps=4, max_train_steps=6)
    train(config(out, data, checkpointing_steps=1000, **settings))
    for name in ("unet/diffusion_pytorch_model.safetensors", "base/unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(folder / name), load_file(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name

    pipe = SegDiffPipeline.from_pretrained(out, device="cpu")
    assert pipe.student is not None and pipe.card.distilled.steps == 2 and pipe.card.img_size == 64
    mask = np.zeros((64, 64), np.int64)
    mask[8:56, 8:30] = 1

    def steps(**kwargs) -> int:
        seen = []
        pipe(mask, callback=lambda i, n: seen.append(n), output_type="np", **kwargs)
        return seen[-1]

    base_steps = pipe.base._stage(None, None).steps
    assert steps() == base_steps + 2  # the upscaler's student
    assert steps(upscale_steps=4) == base_steps + 4  # asked for: the upscaler itself
    assert steps(num_inference_steps=3) == 3 + pipe.card.upscaling.steps  # any setting asked: no students

    # measured as drawn: the students, or the base's student and the upscaler itself at the steps asked
    torch.manual_seed(0)
    segmenter = Segmenter(SegmenterConfig(num_classes=3, img_size=32))
    masks = np.stack([mask, mask[::-1]])
    images = np.zeros((2, 64, 64, 1), np.float32)
    settings = dict(scheduler="student", progress=False, omit_each=False)
    students = measure_quality(pipe, segmenter, masks, images, **settings)
    detail = measure_quality(pipe, segmenter, masks, images, upscale_steps=4, **settings)
    base = run_label(students).split(" + ")[0]  # this base has no student: the pipeline's default sampler
    assert run_label(students) == f"{base} + student 2 auto"
    assert run_label(detail) == f"{base} + {pipe.card.upscaling.scheduler} 4 auto"
    assert detail["detail"]["generated"] != students["detail"]["generated"]


def test_a_cascade_with_a_missing_or_mismatched_stage_is_refused(tmp_path, cascade):
    folder = cascade[1]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("checkpoint-*"))
    shutil.rmtree(broken / "base")
    with pytest.raises(CheckpointError, match=r"base model base/ is missing"):
        SegDiffPipeline.from_pretrained(broken, device="cpu")

    save_tiny_model(broken / "base", 64, SMALL_CLASS_NAMES)  # a base of the upscaler's size, not 32 px
    with pytest.raises(
        CheckpointError, match=r"base model in base/ has img_size=64, but its upscaler expects 32"
    ):
        SegDiffPipeline.from_pretrained(broken, device="cpu")


@pytest.mark.parametrize(
    "record, field, value",
    [
        ("upscale", "base", "ELSEWHERE"),
        ("upscale", "base", "../elsewhere"),
        ("student", "folder", "../elsewhere/unet"),
        (None, "segmenter", "ELSEWHERE"),
    ],
    ids=["absolute-base", "base-outside", "student-outside", "segmenter-outside"],
)
def test_a_card_naming_a_folder_outside_its_model_is_refused(tmp_path, record, field, value):
    """A downloaded card must not make the pipeline open another model on disk (or a save write there)."""
    elsewhere = save_tiny_model(tmp_path / "elsewhere", 32, SMALL_CLASS_NAMES)
    folder = save_tiny_model(tmp_path / "model", 64, SMALL_CLASS_NAMES)
    value = str(elsewhere) if value == "ELSEWHERE" else value
    card = json.loads((folder / CARD_FILE).read_text())
    if record:
        card[record] = {field: value}
    else:
        card[field] = value
    (folder / CARD_FILE).write_text(json.dumps(card))
    what = {"upscale": "upscale base", "student": "student folder", None: "segmenter"}[record]
    with pytest.raises(CheckpointError) as caught:
        SegDiffPipeline.from_pretrained(folder, device="cpu")
    assert str(caught.value) == (
        f"{folder / CARD_FILE}: {what} {value!r}; expected a sub-folder of the model folder (a relative path "
        "without '..')"
    )


def test_training_refuses_a_base_of_other_classes_or_size(tmp_path, data, cascade):
    base_dir, folder = cascade
    with pytest.raises(ConfigError, match=r"3 classes, this run trains on 1 channel\(s\) and 4 classes"):
        train(
            config(tmp_path / "a", data, img_size=64, upscale_from=str(base_dir), num_classes=4, crop_size=32)
        )
    with pytest.raises(
        ConfigError, match=r"--img_size 32: an upscaler draws a multiple of its base's size, 32"
    ):
        train(config(tmp_path / "b", data, img_size=32, upscale_from=str(base_dir), crop_size=16))
    with pytest.raises(ConfigError, match="already a cascade"):
        train(config(tmp_path / "c", data, img_size=128, upscale_from=str(folder), crop_size=32))
    with pytest.raises(ConfigError, match=r"--crop_size 18: .* must be a multiple of 4"):
        config(tmp_path / "d", data, img_size=64, upscale_from=str(base_dir), crop_size=18)
    # Upscalers default to the attention-free preset, trained on crops of half the image.
    defaults = config(tmp_path / "e", data, img_size=64, upscale_from=str(base_dir), preset=None)
    assert (defaults.preset, defaults.crop_size) == ("upscaler", 32)


def test_eval_many_draws_at_the_upscalers_size(cascade, data, tmp_path):
    img_dir, seg_dir = data
    code = train_cli.main([
        "--mode", "eval_many", "--model_dir", str(cascade[1]), "--img_dir", str(img_dir), "--seg_dir",
        str(seg_dir), "--segmentation_guided", "--num_segmentation_classes", "3", "--img_size", "64",
        "--sampler", "ddim", "--num_inference_steps", "2", "--eval_batch_size", "2", "--eval_sample_size", "2",
        "--output_dir", str(tmp_path / "run"),
    ])  # fmt: skip
    assert code == 0
    files = sorted((tmp_path / "run" / "samples_many_2").iterdir())
    assert len(files) == 2 and all(Image.open(f).size == (64, 64) for f in files)


def test_mask_guidance_guides_the_base_stage(cascade):
    pipe = SegDiffPipeline.from_pretrained(cascade[1], device="cpu")
    mask = np.zeros((64, 64), np.int64)
    mask[8:56, 8:30] = 1
    asked = []

    class Base:  # the base stage, recording what it is asked
        def __init__(self, base):
            self.base, self.card = base, base.card

        def __call__(self, *args, **kwargs):
            asked.append(kwargs["guidance_scale"])
            return self.base(*args, **kwargs)

        def _stage(self, *args):
            return self.base._stage(*args)

    pipe.base = Base(pipe.base)
    plain = pipe(mask, generator=torch.Generator().manual_seed(1), output_type="np").images
    guided = pipe(mask, generator=torch.Generator().manual_seed(1), output_type="np", guidance_scale=3).images
    assert asked == [1.0, 3] and guided.shape == plain.shape == (1, 64, 64, 1)
    assert not np.array_equal(plain, guided)
