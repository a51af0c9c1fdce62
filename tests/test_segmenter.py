"""The Dice ruler: Dice and KID on hand-made data, segmenter training and files, quality runs, the CLI."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from segdiff import SegDiffPipeline
from segdiff.cli.quality import main
from segdiff.data.layout import read_mask
from segdiff.data.phantoms import write_dataset
from segdiff.errors import ArgumentError, CheckpointError, DataLayoutError, ImageError, MaskError
from segdiff.measure.quality import (
    faithfulness,
    frechet_distance,
    kid,
    load_test_set,
    load_train_subset,
    measure_quality,
    quality_table,
    run_label,
)
from segdiff.measure.segmenter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Segmenter,
    SegmenterConfig,
    dice,
    mean_dice,
    pseudo_label,
    train_segmenter,
)
from segdiff.model.card import ModelCard
from segdiff.model.unet import PRESETS

SIZE, K = 32, 4  # breast phantoms: background, breast, vessels, fibroglandular



# ---- Dice and KID on data made by hand -----------------------------------------------------------------


def test_dice_sums_over_the_whole_set():
    target = np.zeros((2, 4, 4), np.int64)
    pred = np.zeros((2, 4, 4), np.int64)
    target[0, :2, :2] = 1  # image 0: class 1 is 4 px, predicted on 2 of them plus 1 wrong px
    pred[0, :1, :2] = 1
    pred[0, 3, 3] = 1
    target[1, :, 0] = 1  # image 1: class 1 is 4 px, all found
    pred[1, :, 0] = 1
    target[1, 2:, 2:] = 2  # image 1: class 2 is 4 px, predicted as 2 of them and 6 others
    pred[1, 2:, 2:] = 2
    pred[1, 0, 1:4] = 2
    pred[1, 1, 1:4] = 2
    pred[1, 2:, 3] = 0
    # class 1: intersection 2 + 4 = 6, |pred| 3 + 4 = 7, |target| 4 + 4 = 8 -> 12 / 15
    # class 2: intersection 2, |pred| 2 + 6 = 8, |target| 4 -> 4 / 12
    # class 3: in neither -> NaN, left out of the mean
    scores = dice(pred, target, num_classes=K)
    assert list(scores) == [1, 2, 3]
    assert scores[1] == pytest.approx(12 / 15)
    assert scores[2] == pytest.approx(4 / 12)
    assert math.isnan(scores[3])
    assert mean_dice(pred, target, K) == pytest.approx((12 / 15 + 4 / 12) / 2)
    # a mean of per-image Dice would weigh image 0 (Dice 4/7) like image 1 (Dice 1): not what we report
    assert dice(pred, target, K, classes=[1])[1] != pytest.approx((4 / 7 + 1) / 2)


def test_dice_edge_cases_and_bad_input():
    mask = np.array([[0, 1], [1, 0]])
    assert dice(mask, mask, 2) == {1: 1.0}
    assert dice(torch.from_numpy(mask), torch.from_numpy(1 - mask), 2, classes=[0, 1]) == {0: 0.0, 1: 0.0}
    assert math.isnan(mean_dice(np.zeros((2, 2), int), np.zeros((2, 2), int), 3))
    with pytest.raises(MaskError, match="pred: pixel value 5"):
        dice(mask * 5, mask, 2)
    with pytest.raises(MaskError, match="equal shapes"):
        dice(mask, mask[:1], 2)


def test_kid_is_zero_within_a_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 16))
    same_mean, same_std = kid(real[:200], real[200:], subsets=20, subset_size=100)
    shifted_mean, shifted_std = kid(
        real[:200], rng.normal(0.5, 1.0, size=(200, 16)), subsets=20, subset_size=100
    )
    assert abs(same_mean) < 3 * same_std + 1e-3  # unbiased: around zero, either sign
    assert shifted_mean > 10 * abs(same_mean)
    assert shifted_mean > 3 * shifted_std
    with pytest.raises(ValueError, match="expected \\(N, D\\)"):
        kid(real, real[:, :8])


def test_frechet_distance_is_the_gaussian_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3))
    a -= a.mean(0)  # so that scaling leaves the mean where it is
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    # shifting by (1, 2, 0) adds |shift|^2 = 5; scaling by 2 turns sigma^2 + 4 sigma^2 - 2 * 2 sigma^2
    # into sigma^2 per dimension
    shifted = frechet_distance(a, a + np.array([1, 2, 0]))
    assert shifted == pytest.approx(5, rel=1e-6)
    scaled = frechet_distance(a, 2 * a)
    assert scaled == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-6)
    few = rng.normal(size=(10, 40))  # fewer samples than dimensions still gives a finite distance
    assert np.isfinite(frechet_distance(few, rng.normal(size=(10, 40))))


def test_faithfulness_scores_each_image_on_its_kept_classes():
    class Oracle:  # a segmenter that finds exactly these maps
        config = SegmenterConfig(num_classes=K, img_size=8)

        def __init__(self, found):
            self.found = found

        def predict(self, images):
            return self.found

    masks = np.zeros((3, 8, 8), np.int64)
    masks[:, 2:6, 2:6] = 1
    masks[:2, 3:5, 3:5] = 2  # classes 1 and 2 in images 0, 1; class 1 only in image 2
    found = masks.copy()
    found[1][found[1] == 2] = 1  # image 1 lost class 2 entirely
    scores = faithfulness(Oracle(found), None, masks, kept_classes=[0, 1, 2])
    # image 0 perfect; image 1: class 1 Dice 2*12/(16+12) = 6/7, class 2 Dice 0; image 2: class 1 only
    assert scores == pytest.approx([1.0, (6 / 7 + 0) / 2, 1.0])
    assert math.isnan(faithfulness(Oracle(found), None, masks, kept_classes=[3])[0])


# ---- a segmenter trained on tiny phantoms --------------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), size=SIZE, n_train=12, n_val=4, n_test=4, seed=1)


@pytest.fixture(scope="module")
def segmenter_dir(phantoms):
    out = phantoms.parent / "segmenter"
    main(
        [
            "train-segmenter",
            "--img_dir",
            str(phantoms / "img"),
            "--seg_dir",
            str(phantoms / "mask"),
            "--num_classes",
            "4",
            "--img_size",
            str(SIZE),
            "--out",
            str(out),
            "--steps",
            "3",
            "--batch_size",
            "4",
        ]
    )
    return out


def real_test_set(phantoms):
    card = ModelCard(num_classes=K, img_channels=1, img_size=SIZE)
    return load_test_set(phantoms / "img", phantoms / "mask", card)


def test_segmenter_saves_whole_and_reopens_the_same(segmenter_dir, phantoms):
    assert sorted(p.name for p in segmenter_dir.iterdir()) == [WEIGHTS_FILE, CONFIG_FILE]
    assert not [p for p in segmenter_dir.parent.iterdir() if p.name.startswith(".saving")]
    config = json.loads((segmenter_dir / CONFIG_FILE).read_text())
    assert config["num_classes"] == K and config["training"]["steps"] == 3
    assert set(config["training"]["val_dice"]) == {"1", "2", "3"}

    model = Segmenter.from_pretrained(segmenter_dir)
    masks, images, _ = real_test_set(phantoms)  # images (N, 1, H, W) torch in [0, 1]
    pred = model.predict(images)
    assert pred.shape == masks.shape and pred.dtype == np.int64
    assert pred.min() >= 0 and pred.max() < K
    as_numpy = images.permute(0, 2, 3, 1).numpy()  # the pipeline's output_type="np" layout
    np.testing.assert_array_equal(model.predict(as_numpy), pred)
    np.testing.assert_array_equal(model.predict((as_numpy * 255).round().astype(np.uint8)[:1]), pred[:1])
    features = model.features(as_numpy)
    assert features.shape == (len(images), sum(model.config.widths))
    model.save_pretrained(segmenter_dir)  # a second save swaps the first out whole
    again = Segmenter.from_pretrained(segmenter_dir)
    np.testing.assert_array_equal(again.predict(images), pred)
    np.testing.assert_allclose(again.features(images), features)


def test_segmenter_learns_the_phantoms(phantoms, tmp_path):
    masks, images, _ = real_test_set(phantoms)
    untrained = Segmenter(SegmenterConfig(num_classes=K, img_size=SIZE, widths=(8, 16)))
    trained = train_segmenter(
        phantoms / "img",
        phantoms / "mask",
        K,
        SIZE,
        1,
        tmp_path / "s",
        steps=40,
        batch_size=8,
        widths=(8, 16),
        progress=False,
    )
    # the body (class 1) is the large, bright class: 40 steps find it
    assert dice(trained.predict(images), masks, K)[1] > max(0.6, dice(untrained.predict(images), masks, K)[1])


def test_bad_images_and_folders_are_named(segmenter_dir, tmp_path):
    model = Segmenter.from_pretrained(segmenter_dir)
    with pytest.raises(ImageError, match=r"shape \(2, 32, 32, 3\).*C=1, H=W=32"):
        model.predict(np.zeros((2, SIZE, SIZE, 3), np.float32))
    with pytest.raises(ImageError, match="values in \\[2, 2\\]"):
        model.predict(np.full((1, SIZE, SIZE, 1), 2.0))
    with pytest.raises(CheckpointError, match="not a segmenter folder"):
        Segmenter.from_pretrained(tmp_path)


def test_pseudo_labels_are_the_segmenters_masks_under_the_images_names(segmenter_dir, phantoms, tmp_path):
    model = Segmenter.from_pretrained(segmenter_dir)
    _, images, _ = real_test_set(phantoms)
    files = sorted((phantoms / "img" / "test").iterdir())
    out = pseudo_label(model, files, tmp_path / "labels", batch_size=3)  # batches of 3 over 4 images
    assert sorted(p.name for p in out.iterdir()) == [f.name for f in files]
    found = np.stack([read_mask(out / f.name, K) for f in files])
    np.testing.assert_array_equal(found, model.predict(images))
    # read at twice the segmenter's size: masks of that size, the same anatomy where it is plain
    twice = pseudo_label(model, files, tmp_path / "labels64", size=2 * SIZE)
    big = read_mask(twice / files[0].name, K)
    assert big.shape == (2 * SIZE, 2 * SIZE) and set(np.unique(big)) <= set(range(K))
    assert (big[::2, ::2] == found[0]).mean() > 0.9
    # an image that does not decode is named, and no half-written folder is left
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataLayoutError, match="broken.png"):
        pseudo_label(model, [*files, tmp_path / "broken.png"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saving")]


# ---- quality of a (tiny, untrained) diffusion model ----------------------------------------------------


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=SIZE, in_channels=1 + K - 1, out_channels=1, **PRESETS["tiny"])
    card = ModelCard(
        num_classes=K, img_channels=1, img_size=SIZE, class_names=["bg", "breast", "vessels", "fgt"]
    )
    SegDiffPipeline(unet, DDIMScheduler(num_train_timesteps=1000), card).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_measure_quality_is_reproducible_and_json_ready(model_dir, segmenter_dir, phantoms):
    pipe = SegDiffPipeline.from_pretrained(model_dir)
    segmenter = Segmenter.from_pretrained(segmenter_dir)
    masks, images, baseline = real_test_set(phantoms)
    settings = dict(scheduler="ddim", num_inference_steps=2, precision="fp32", seed=3, progress=False)
    result = measure_quality(
        pipe, segmenter, masks, images, batch_size=4, baseline_images=baseline, **settings
    )
    json.dumps(result, allow_nan=False)
    assert set(result["dice"]) == {"breast", "vessels", "fgt"}
    assert set(result["omit"]) == {"breast", "vessels", "fgt"}  # every class is present in phantoms
    assert set(result["omit"]["vessels"]["dice"]) == {"breast", "fgt"}  # kept classes only
    assert result["settings"]["num_masks"] == len(masks)
    assert {"kid", "fd", "baseline_kid", "baseline_fd"} <= set(result["realism"])
    assert pipe.precision == "auto"  # the caller's settings come back
    # the noise belongs to the mask index, not the batch: batching differently changes nothing
    other = measure_quality(pipe, segmenter, masks, images, batch_size=3, omit_each=False, **settings)
    assert other["dice"] == result["dice"] and other["omit"] == {}


def test_measure_quality_runs_the_classifier_test_on_train_masks(model_dir, segmenter_dir, phantoms):
    pipe = SegDiffPipeline.from_pretrained(model_dir)
    segmenter = Segmenter.from_pretrained(segmenter_dir)
    masks, images, _ = real_test_set(phantoms)
    card = ModelCard(num_classes=K, img_channels=1, img_size=SIZE)
    train_masks, train_images = load_train_subset(phantoms / "img", phantoms / "mask", card, num_masks=8)
    assert train_masks.shape == (8, SIZE, SIZE) and train_images.shape == (8, 1, SIZE, SIZE)
    settings = dict(scheduler="ddim", num_inference_steps=2, precision="fp32", progress=False, omit_each=False)
    result = measure_quality(
        pipe, segmenter, masks, images, train_masks=train_masks, train_images=train_images, **settings
    )
    realism = result["realism"]
    # an untrained network draws noise: the classifier tells it from phantoms on the held-out images
    assert realism["classifier"] >= 0.75 and 0 <= realism["baseline_classifier"] <= 1
    assert "8 generated vs 8 real train images" in realism["classifier_measure"]
    assert "frd" not in realism  # FRD only on request
    assert "classifier accuracy, held out" in quality_table({"run": result})
    with pytest.raises(ImageError, match="3 real train images for 8 train masks"):
        measure_quality(
            pipe, segmenter, masks, images, train_masks=train_masks, train_images=train_images[:3], **settings
        )


def test_measure_quality_of_a_student_records_the_default_settings(model_dir, segmenter_dir, phantoms):
    teacher = SegDiffPipeline.from_pretrained(model_dir)
    segmenter = Segmenter.from_pretrained(segmenter_dir)
    masks, images, _ = real_test_set(phantoms)
    settings = dict(scheduler="student", precision="fp32", progress=False, omit_each=False)
    with pytest.raises(ArgumentError, match="the model has no distilled student"):
        measure_quality(teacher, segmenter, masks, images, **settings)
    card = dataclasses.replace(teacher.card, student={"steps": 2, "teacher_steps": 4})
    pipe = SegDiffPipeline(teacher.unet, teacher.scheduler, card, student=teacher.unet)
    result = measure_quality(pipe, segmenter, masks, images, **settings)
    assert run_label(result) == "student 2 fp32"
    with pytest.raises(ArgumentError, match="upscale_steps=4: the model draws in one stage"):
        measure_quality(pipe, segmenter, masks, images, upscale_steps=4, **settings)


def test_evaluate_cli_writes_the_card_and_reuses_its_segmenter(model_dir, segmenter_dir, phantoms, capsys):
    data = ["--img_dir", str(phantoms / "img"), "--seg_dir", str(phantoms / "mask")]
    fast = ["--scheduler", "ddim", "--steps", "2", "--no-omit"]
    main(
        [
            "evaluate",
            "--model",
            str(model_dir),
            *data,
            "--segmenter",
            str(segmenter_dir),
            *fast,
            "--write-card",
        ]
    )
    table = capsys.readouterr().out
    assert "mean Dice" in table and "KID" in table and "ddim 2 auto" in table

    card = ModelCard.load(model_dir)
    assert card.segmenter == "segmenter"
    assert (
        Segmenter.from_pretrained(model_dir / "segmenter").config
        == Segmenter.from_pretrained(segmenter_dir).config
    )
    assert card.quality["runs"]["ddim 2 auto"]["settings"]["num_inference_steps"] == 2
    # a second setting joins the first; the model's own segmenter is used when none is named
    main(
        [
            "evaluate",
            "--model",
            str(model_dir),
            *data,
            "--scheduler",
            "dpm++",
            "--steps",
            "2",
            "--no-omit",
            "--precision",
            "fp32",
            "--write-card",
        ]
    )
    assert set(ModelCard.load(model_dir).quality["runs"]) == {"ddim 2 auto", "dpm++ 2 fp32"}
    assert SegDiffPipeline.from_pretrained(model_dir).card.quality == ModelCard.load(model_dir).quality


def test_cli_errors_are_one_line_and_exit_2(model_dir, phantoms, capsys):
    data = ["--img_dir", str(phantoms / "img"), "--seg_dir", str(phantoms / "mask")]
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(model_dir), *data])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "pass --segmenter" in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train-segmenter",
                "--img_dir",
                str(phantoms / "nope"),
                "--seg_dir",
                str(phantoms / "mask"),
                "--num_classes",
                "4",
                "--img_size",
                str(SIZE),
                "--out",
                str(phantoms.parent / "x"),
            ]
        )
    assert exit_info.value.code == 2
    assert "nope" in capsys.readouterr().err
