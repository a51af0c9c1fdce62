"""segdiff.studio, .runs, .registry: canvas and file masks in, reproducible results and their files out."""

import contextvars
import copy
import dataclasses
import json
import logging
import pickle
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import segdiff.studio.runs
from segdiff import SegDiffPipeline
from segdiff.errors import ArgumentError, CheckpointError, ConfigError, DataLayoutError, ImageError, MaskError
from segdiff.measure.segmenter import Segmenter, SegmenterConfig
from segdiff.model.card import ModelCard
from segdiff.studio import actions
from segdiff.studio.actions import MAX_IMAGE_SIDE, Settings, Studio
from segdiff.studio.batching import Lane, Lanes
from segdiff.studio.registry import Models
from segdiff.studio.runs import settings_of

FAST = dict(steps=3, num_images=2)
BUNDLED_256 = Path(__file__).resolve().parent.parent / "assets" / "models" / "psfhs-ultrasound-256"


@pytest.fixture(scope="module")
def studio(tiny_model_dir):
    return Studio(SegDiffPipeline.from_pretrained(tiny_model_dir), tiny_model_dir)


def opaque(rgb):
    return np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=-1)


def test_painted_canvas_reads_back_at_model_size(studio, mask):
    canvas = opaque(studio.canvas(mask))
    assert canvas.shape == (64 * studio.canvas_scale,) * 2 + (4,)
    assert np.array_equal(studio.mask_from_canvas(canvas), mask)


def test_antialiased_edges_snap_to_the_classes_either_side(studio, mask):
    canvas = studio.canvas(mask).astype(np.float32)
    # A 3-pixel box blur stands in for the canvas's anti-aliasing: every class edge becomes a blend.
    blurred = sum(np.roll(canvas, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    labels = studio.mask_from_canvas(opaque(blurred.round().astype(np.uint8)))
    assert np.array_equal(labels, mask)


def test_mask_loaded_into_a_layer_reads_back_from_background_and_layers(studio, mask):
    layer = studio.layer(mask)
    assert layer[0, 0, 3] == 0 and layer[layer.shape[0] // 2, layer.shape[1] // 2, 3] == 255
    stroke = np.zeros_like(layer)
    stroke[: studio.canvas_scale, :, :] = (*studio.palette.colors[3], 255)  # painted over one model row
    expected = mask.copy()
    expected[:1] = 3
    assert np.array_equal(studio.mask_from_canvas(opaque(studio.canvas()), [layer, stroke]), expected)


def flat_png(path, side):
    """A PNG of side x side px that costs little to make: 1 bit per pixel, all zero, a few KB on disk."""
    PIL.Image.new("1", (side, side)).save(path)
    return path


def test_canvas_files_are_checked_from_their_header_and_read_at_canvas_size(studio, mask, tmp_path):
    side = 64 * studio.canvas_scale
    big = PIL.Image.fromarray(opaque(studio.canvas(mask))).resize((2 * side, 2 * side), PIL.Image.NEAREST)
    big.save(tmp_path / "big.png")
    assert studio.read_canvas(tmp_path / "big.png").shape == (side, side, 4)
    assert np.array_equal(studio.mask_from_editor(composite=tmp_path / "big.png"), mask)
    png = (tmp_path / "big.png").read_bytes()  # the browser's paint arrives as PNG bytes
    assert np.array_equal(studio.mask_from_editor(background=png, layers=[None]), mask)

    huge = flat_png(tmp_path / "huge.png", MAX_IMAGE_SIDE + 1)
    size = f"{MAX_IMAGE_SIDE + 1} x {MAX_IMAGE_SIDE + 1} px"
    with pytest.raises(ImageError, match=rf"^canvas composite: {size}, expected at most {MAX_IMAGE_SIDE} px"):
        studio.mask_from_editor(composite=huge)
    with pytest.raises(ImageError, match=rf"^canvas layer 0: {size}"):
        studio.mask_from_editor(background=png, layers=[huge.read_bytes()])
    with pytest.raises(ImageError, match=rf"^huge\.png: {size}"):
        studio.start_image(huge)
    with pytest.raises(ImageError, match=rf"^huge\.png: {size}"):
        studio.mask_from_file(huge)


def test_never_painted_canvas_is_an_empty_mask(studio):
    assert not studio.mask_from_canvas(None).any()


@pytest.mark.parametrize("form", ["integer png", "palette-coloured png", "palette-mode png", "npy"])
def test_mask_files_of_every_kind_read_the_same(studio, mask, tmp_path, form):
    path = tmp_path / ("mask.npy" if form == "npy" else "mask.png")
    if form == "integer png":
        PIL.Image.fromarray(mask.astype(np.uint8)).save(path)
    elif form == "palette-coloured png":
        PIL.Image.fromarray(studio.palette.to_rgb(mask)).save(path)
    elif form == "palette-mode png":
        image = PIL.Image.fromarray(mask.astype(np.uint8), mode="P")
        image.putpalette([v for color in studio.palette.colors for v in color])
        image.save(path)
    else:
        np.save(path, mask)
    read, notices = studio.mask_from_file(path)
    assert np.array_equal(read, mask) and notices == []


def test_wrong_size_mask_is_resized_nearest_with_a_notice(studio, mask, tmp_path):
    big = np.kron(mask, np.ones((2, 2), np.int64))  # 128 x 128
    PIL.Image.fromarray(big.astype(np.uint8)).save(tmp_path / "big.png")
    read, notices = studio.mask_from_file(tmp_path / "big.png")
    assert np.array_equal(read, mask)
    assert len(notices) == 1 and "big.png" in notices[0] and "128x128" in notices[0]


def test_bad_mask_files_are_refused_by_name(studio, mask, tmp_path):
    values = mask.astype(np.uint8) * 3  # ids up to 9 for a 4-class model
    PIL.Image.fromarray(values).save(tmp_path / "too_many.png")
    with pytest.raises(MaskError, match=r"^too_many\.png: pixel value 6, expected class ids 0\.\.3"):
        studio.mask_from_file(tmp_path / "too_many.png")

    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    with pytest.raises(MaskError, match=r"^photo\.png: .* far from every class colour"):
        studio.mask_from_file(tmp_path / "photo.png")

    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataLayoutError, match=r"^corrupt\.png: cannot read"):
        studio.mask_from_file(tmp_path / "corrupt.png")

    np.save(tmp_path / "huge.npy", np.zeros((1, MAX_IMAGE_SIDE + 1), np.uint8))
    with pytest.raises(ImageError, match=rf"^huge\.npy: {MAX_IMAGE_SIDE + 1} x 1 px, expected at most {MAX_IMAGE_SIDE}"):
        studio.mask_from_file(tmp_path / "huge.npy")


def test_same_seed_same_images_and_each_image_has_its_own_seed(studio, mask):
    first = studio.generate(mask, Settings(seed=7, **FAST))
    again = studio.generate(mask, Settings(seed=7, **FAST))
    assert all(np.array_equal(a, b) for a, b in zip(first.images, again.images, strict=True))
    assert not np.array_equal(first.images[0], first.images[1])
    second_alone = studio.generate(mask, Settings(seed=8, steps=3, num_images=1))
    assert np.array_equal(second_alone.images[0], first.images[1])
    assert first.settings["seeds"] == [7, 8] and first.captions == ["seed 7", "seed 8"]


def test_omitting_a_class_changes_the_image_and_the_mask_it_saw(studio, mask):
    kept = studio.generate(mask, Settings(seed=3, **FAST))
    omitted = studio.generate(mask, Settings(seed=3, omit=(2,), **FAST))
    assert not np.array_equal(kept.images[0], omitted.images[0])
    assert not (omitted.masks[0] == 2).any() and (kept.masks[0] == 2).any()
    assert omitted.settings["omit"] == ["vessels"]


def test_sweep_renders_one_noise_with_each_present_class_omitted(studio, mask):
    mask[mask == 3] = 1  # no fibroglandular tissue: nothing to sweep for it
    sweep = studio.sweep(mask, Settings(seed=5, steps=3))
    assert sweep.captions == ["all classes kept", "without breast", "without vessels"]
    assert any("fibroglandular tissue" in n for n in sweep.notices)
    alone = studio.generate(mask, Settings(seed=5, steps=3, num_images=1))
    assert np.array_equal(sweep.images[0], alone.images[0])
    assert not np.array_equal(sweep.images[0], sweep.images[2])
    assert sweep.settings["variants"] == [[], ["breast"], ["vessels"]]


def test_preview_is_one_image_at_the_model_defaults_fixed_by_its_seed(studio, mask, monkeypatch):
    calls, written = [], set(studio.results.iterdir())
    pipe = studio.pipe
    monkeypatch.setattr(studio, "pipe", lambda *a, **kw: calls.append(kw) or pipe(*a, **kw))
    first = studio.preview(mask, seed=4)
    assert isinstance(first, PIL.Image.Image) and first.size == (64, 64)
    assert np.array_equal(np.asarray(studio.preview(mask, seed=4)), np.asarray(first))
    assert not np.array_equal(np.asarray(studio.preview(mask, omit=(2,), seed=4)), np.asarray(first))
    assert not np.array_equal(np.asarray(studio.preview(mask, seed=5)), np.asarray(first))
    # The model's own defaults: a model with a few-step student draws the preview with it.
    assert all("num_inference_steps" not in kw and "sampler" not in kw and "scheduler" not in kw for kw in calls)
    assert set(studio.results.iterdir()) == written  # a preview writes nothing


def test_preview_checks_the_mask_and_settings_as_generate_does(studio, mask):
    with pytest.raises(MaskError, match=r"omit=\[4\]: 4 is not a class id 1\.\.3"):
        studio.preview(mask, omit=(4,))
    with pytest.raises(ConfigError, match=r"^seed 1\.5: expected an integer"):
        studio.preview(mask, seed=1.5)
    with pytest.raises(MaskError, match=r"expected class ids 0\.\.3"):
        studio.preview(mask * 2)


def test_start_image_pulls_the_result_towards_it(studio, mask):
    image = torch.zeros(1, 1, 64, 64)
    image[..., 32:, :] = 1.0
    plain = studio.generate(mask, Settings(seed=1, steps=4, num_images=1))
    near = studio.generate(mask, Settings(seed=1, steps=4, num_images=1, strength=0.25), image=image)
    target = (image[0, 0].numpy() * 255)
    assert np.abs(near.images[0][..., 0] - target).mean() < np.abs(plain.images[0][..., 0] - target).mean()
    assert near.settings["start_image_strength"] == 0.25


def test_mask_guidance_changes_the_images_and_is_recorded(studio, mask):
    plain = studio.generate(mask, Settings(seed=4, steps=3, num_images=1))
    guided = studio.generate(mask, Settings(seed=4, steps=3, num_images=1, guidance_scale=3))
    assert not np.array_equal(plain.images[0], guided.images[0])
    assert plain.settings["guidance_scale"] == 1.0 and settings_of(guided.files[0])["guidance_scale"] == 3.0


def test_results_carry_their_settings_in_png_zip_and_json(studio, mask):
    run = studio.generate(mask, Settings(seed=11, omit=(3,), **FAST))
    meta = settings_of(run.files[1])
    assert meta["seed"] == 12 and meta["omit"] == ["fibroglandular tissue"] and meta["model"] == "tiny-breast"
    assert meta["steps"] == 3 and meta["sampler"] == "dpm++"
    with zipfile.ZipFile(run.archive) as archive:
        names = set(archive.namelist())
        assert {p.name for p in run.files} | {"mask.png", "settings.json"} == names
        assert json.loads(archive.read("settings.json"))["seeds"] == [11, 12]
        archive.extract("mask.png", run.folder / "check")
    assert np.array_equal(np.asarray(PIL.Image.open(run.folder / "check" / "mask.png")), mask)


def test_gallery_outlines_are_drawn_at_display_size(studio, mask):
    run = studio.generate(mask, Settings(seed=2, **FAST))
    plain = studio.gallery(run, contours=False)
    outlined = studio.gallery(run, contours=True)
    assert [c for _, c in plain] == [c for _, c in outlined] == run.captions
    image = outlined[0][0]
    assert image.shape == (64 * studio.display_scale, 64 * studio.display_scale, 3)
    vessel = np.asarray(studio.palette.colors[2], np.uint8)
    assert (image == vessel).all(-1).any()  # the vessel band's outline, in its class colour


@pytest.mark.parametrize(
    "values, match",
    [
        (dict(steps=101), r"steps 101: expected a value in 1\.\.100"),
        (dict(num_images=9), r"num_images 9: expected a value in 1\.\.8"),
        (dict(sampler="euler"), r"sampler 'euler'"),
        (dict(seed=-1), r"seed -1"),
        (dict(omit=(0,)), r"omit=\[0\]: 0 is not a class id 1\.\.3"),
    ],
)
def test_settings_out_of_range_are_refused_by_value(studio, mask, values, match):
    with pytest.raises(ValueError, match=match):
        studio.generate(mask, Settings(**values))


def test_omit_names_and_ids(studio):
    assert studio.omit_ids(["vessels", "1"]) == (1, 2)
    assert studio.omit_ids("vessels") == (2,)  # one name alone, not its letters
    with pytest.raises(MaskError, match="'background' is not a class"):
        studio.omit_ids(["background"])
    with pytest.raises(MaskError, match=r"omit \{'vessels': 1\}: expected a list of class names"):
        studio.omit_ids({"vessels": 1})


@pytest.mark.parametrize(
    "raw, match",
    [
        (dict(seed="abc"), r"^seed 'abc': expected an integer in 0\.\.4294967295"),
        (dict(seed=1.5), r"^seed 1\.5: expected an integer"),
        (dict(seed=True), r"^seed True: expected an integer"),
        (dict(steps="x"), r"^steps 'x': expected an integer in 1\.\.100"),
        (dict(steps=2.9), r"^steps 2\.9: expected an integer"),
        (dict(num_images=None), r"^num_images empty: expected an integer in 1\.\.8"),
        (dict(num_images=2.9), r"^num_images 2\.9: expected an integer"),
        (dict(strength="x"), r"^strength 'x': expected a value in \(0, 1\]"),
        (dict(strength=float("nan")), r"^strength nan"),
        (dict(guidance_scale="x"), r"^guidance_scale 'x': expected a value from 1 \(none\) to 20"),
        (dict(guidance_scale=0.5), r"^guidance_scale 0\.5: expected a value from 1"),
        (dict(guidance_scale=float("nan")), r"^guidance_scale nan"),
        (dict(sampler=["ddim"]), r"^sampler \['ddim'\]: expected one of"),
        (dict(keep="fat"), r"^keep: 'fat' is not a class"),
    ],
)
def test_raw_request_values_are_refused_by_name_never_rounded(studio, raw, match):
    with pytest.raises(ConfigError if "keep" not in raw else MaskError, match=match):
        studio.settings(**raw)


def test_raw_request_values_that_mean_one_thing_are_taken(studio):
    settings = studio.settings(seed=7.0, steps=3, num_images=2.0, keep=["breast"], strength=1)
    assert (settings.seed, settings.steps, settings.num_images, settings.omit) == (7, 3, 2, (2, 3))
    assert isinstance(settings.seed, int) and isinstance(settings.num_images, int)
    assert studio.settings(steps=None).steps == 12  # no steps, like no sampler: the model's own


def test_result_folders_are_bounded_and_the_previews_stay(studio, mask, monkeypatch):
    monkeypatch.setattr(segdiff.studio.runs, "KEEP_RUNS", 2)
    preview = studio.write_preview(mask, "example")
    runs = [studio.generate(mask, Settings(seed=s, steps=1, num_images=1)) for s in range(4)]
    left = {p for p in studio.results.iterdir() if p.name != "previews"}
    assert left == {runs[2].folder, runs[3].folder}
    assert np.array_equal(np.asarray(PIL.Image.open(preview)), studio.palette.to_rgb(mask))


def test_dice_per_image_when_the_card_names_a_segmenter(tiny_model_dir, tmp_path, mask):
    pipe = SegDiffPipeline.from_pretrained(tiny_model_dir)
    assert Studio(pipe, tiny_model_dir).segmenter is None
    Segmenter(SegmenterConfig(num_classes=4, img_size=64, widths=(4, 8))).save_pretrained(tmp_path / "seg")
    pipe.card.segmenter = "seg"
    studio = Studio(pipe, tmp_path)
    run = studio.generate(mask, Settings(seed=0, steps=2, num_images=2, omit=(1, 2)))
    dice = run.settings["dice_kept"]
    assert len(dice) == 2 and all(0 <= d <= 1 for d in dice)
    assert [c.split(" · ")[1] for c in run.captions] == [f"Dice {d:.2f}" for d in dice]


def test_models_open_once_on_first_use_and_stay_open(tiny_model_dir, small_model_dir, monkeypatch):
    opened = []
    from_pretrained = SegDiffPipeline.from_pretrained
    monkeypatch.setattr(SegDiffPipeline, "from_pretrained", lambda f, **kw: opened.append(f) or from_pretrained(f, **kw))
    models = Models({"breast": tiny_model_dir, "small": small_model_dir}, "breast")
    assert opened == []
    first = models.get()
    assert models.get("breast") is first and models.get("") is first and first.name == "breast"
    assert models.get("small").size == 32 and models.get("small") is models.get("small")
    assert opened == [tiny_model_dir, small_model_dir]
    with pytest.raises(CheckpointError, match=r"^model 'large': not one of this studio's models \['breast', 'small'\]"):
        models.get("large")
    with pytest.raises(CheckpointError, match=r"^model \['small'\]: not one of"):
        models.get(["small"])


def test_the_header_credits_the_training_data_when_the_card_names_it(tiny_model_dir):
    pipe = SegDiffPipeline.from_pretrained(tiny_model_dir)
    assert "trained on" not in Studio(pipe, tiny_model_dir).summary()
    pipe.card.dataset = {"name": "PSFHS ultrasound", "license": "CC BY 4.0"}
    assert Studio(pipe, tiny_model_dir).summary().endswith("trained on PSFHS ultrasound (CC BY 4.0)")


# ---- careless inputs (issue 34) ------------------------------------------------------------------------------


def tinted_ultrasound(side=64, seed=0):
    """A photo, not a mask: dark speckle in a fan, tinted brown; most of it lies near black."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] - np.array([0, side / 2])[:, None, None]
    fan = (np.hypot(y, x) < side) & (np.abs(x) < 0.9 * y)
    speckle = rng.rayleigh(25, (side, side)) * fan
    return np.clip(speckle[..., None] * (0.9, 0.6, 0.4), 0, 255).round().astype(np.uint8)


def test_a_tinted_photo_is_refused_though_most_of_it_snaps_to_background(studio, tmp_path):
    photo = tinted_ultrasound()
    snapped = studio.palette.to_labels(np.zeros_like(photo))  # what it would become: black snaps to 0
    assert not snapped.any()
    PIL.Image.fromarray(photo).save(tmp_path / "scan.png")
    with pytest.raises(MaskError, match=r"^scan\.png: \d+% of its pixels are far from every class colour"):
        studio.mask_from_file(tmp_path / "scan.png")


def with_segmenter(pipe, folder, damage=None):
    """`pipe` saved in `folder` with a tiny Dice segmenter in `folder/segmenter`, its weights then `damage`d."""
    Segmenter(SegmenterConfig(num_classes=4, img_size=64, widths=(4, 8))).save_pretrained(folder / "segmenter")
    pipe.card.segmenter = "segmenter"
    pipe.save_pretrained(folder)
    if damage:
        damage(folder / "segmenter" / "model.safetensors")
    return folder


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_damaged_segmenter_costs_the_dice_readout_not_the_model(tiny_model_dir, tmp_path, mask, caplog):
    folder = with_segmenter(SegDiffPipeline.from_pretrained(tiny_model_dir), tmp_path / "model", truncate)
    with caplog.at_level(logging.WARNING):
        studio = Models({"model": folder}, "model").get()
    assert studio.segmenter is None
    assert studio.summary().endswith("no Dice readout: the segmenter in segmenter/ cannot be read")
    assert any("model opens without its Dice readout" in r.getMessage() for r in caplog.records)
    run = studio.generate(mask, Settings(seed=0, steps=1, num_images=1))
    assert "dice_kept" not in run.settings and len(run.images) == 1


def test_drawing_on_an_empty_mask_says_so(studio, mask):
    empty = np.zeros_like(mask)
    run = studio.generate(empty, Settings(seed=0, steps=1, num_images=1))
    assert any(n.startswith("the mask is empty (all background)") for n in run.notices)
    assert run.notices == run.settings["notices"]
    all_omitted = studio.generate(mask, Settings(seed=0, steps=1, num_images=1, omit=(1, 2, 3)))
    assert all_omitted.notices == ["every class in the mask is omitted, so the images follow none of it"]
    assert studio.generate(mask, Settings(seed=0, steps=1, num_images=1)).notices == []
    sweep = studio.sweep(empty, Settings(seed=0, steps=1))
    assert [n[:18] for n in sweep.notices] == ["the mask is empty "]


# ---- batched serving (issue 36) -------------------------------------------------------------------------------


def together(*calls):
    """Run each call on its own thread, as gradio runs requests; their results (or errors) in order."""
    results = [None] * len(calls)

    def run(i):
        try:
            results[i] = calls[i]()
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_a_lane_draws_waiting_requests_in_one_call_and_a_fault_fails_alone():
    calls = []

    def draw(recipe, items, progress):
        calls.append(sorted(items))
        progress(1, 1)
        if "bad" in items:
            raise MaskError("bad: not a mask")
        return [getattr(item, recipe)() for item in items]

    heard = []
    who = contextvars.ContextVar("who")

    def ask(name, items):
        def call():
            who.set(name)  # each request's progress bar is reached through its own context, as gradio's are
            return lane.draw("key", items, "upper", lambda step, total: heard.append(who.get()))

        return call

    lane = Lane(max_items=5, wait=60)  # the leader waits until all five images have come
    lane.serve(draw)
    results = together(ask("a", ["a"]), ask("b", ["b", "b2"]), ask("bad", ["bad"]), ask("c", ["c"]))
    assert results[0] == ["A"] and results[1] == ["B", "B2"] and results[3] == ["C"]
    assert isinstance(results[2], MaskError) and str(results[2]) == "bad: not a mask"
    assert calls[0] == ["a", "b", "b2", "bad", "c"]  # one call for all, then each request alone
    assert sorted(map(tuple, calls[1:])) == [("a",), ("b", "b2"), ("bad",), ("c",)]
    assert sorted(set(heard)) == ["a", "b", "bad", "c"]
    with pytest.raises(ConfigError, match="batch of 0 images: expected at least 1"):
        Lane(0)


def test_requests_drawn_together_get_the_images_they_would_get_alone(tiny_model_dir, studio, mask):
    sizes = []

    def counted(draw):  # as ZeroGPU runs a call: its arguments pickled, to a process that has the models
        return lambda *args: sizes.append(len(args[1])) or draw(*pickle.loads(pickle.dumps(args)))

    lanes = Lanes(preview=Lane(3, wait=60, on_device=counted), sample=Lane(4, wait=60, on_device=counted))
    batched = Studio(studio.pipe, tiny_model_dir, lanes=lanes)
    other = mask.copy()
    other[30:40] = 2
    generates = [(mask, Settings(seed=1, steps=2, num_images=2)), (other, Settings(seed=7, steps=2, num_images=2))]
    previews = [(mask, (), 3), (other, (2,), 3), (mask, (1,), 11)]
    runs = together(*(lambda m=m, s=s: batched.generate(m, s) for m, s in generates))
    shown = together(*(lambda m=m, o=o, s=s: batched.preview(m, o, s) for m, o, s in previews))
    assert sizes == [4, 3]  # two generations in one call, three previews in another
    for run, (m, s) in zip(runs, generates, strict=True):
        alone = studio.generate(m, s)
        assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(run.images, alone.images, strict=True))
    for image, (m, o, s) in zip(shown, previews, strict=True):
        assert np.abs(np.asarray(image, int) - np.asarray(studio.preview(m, o, s))).max() <= 1


def test_on_a_cpu_a_call_holds_few_large_images_and_each_still_gets_its_own(tiny_model_dir, studio, mask, monkeypatch):
    sizes = []

    def counted(draw):
        return lambda *args: sizes.append(len(args[1])) or draw(*args)

    monkeypatch.setattr(actions, "CPU_CALL_PIXELS", 2 * studio.size**2 + 1)  # two images a call
    lanes = Lanes(preview=Lane(8, wait=60, on_device=counted), sample=Lane(8, wait=60, on_device=counted))
    batched = Studio(studio.pipe, tiny_model_dir, lanes=lanes)
    assert batched.per_call == 2
    previews = [(mask, (), 3), (mask, (1,), 5), (mask, (), 8)]
    shown = together(*(lambda m=m, o=o, s=s: batched.preview(m, o, s) for m, o, s in previews))
    assert sorted(sizes) == [1, 2]  # two in the first call, the third in the next
    for image, (m, o, s) in zip(shown, previews, strict=True):
        assert np.abs(np.asarray(image, int) - np.asarray(studio.preview(m, o, s))).max() <= 1
    sizes.clear()
    run = batched.generate(mask, Settings(seed=1, steps=2, num_images=3))  # a request bigger than that: alone
    assert sizes == [3] and len(run.images) == 3


# ---- the model's own student (issue 32) ----------------------------------------------------------------------


def save_student(teacher_dir, folder, steps: int = 2):
    """The model in `teacher_dir` saved in `folder` with a `steps`-step student beside it: a copy of its UNet,
    nudged so that the student draws images of its own."""
    teacher = SegDiffPipeline.from_pretrained(teacher_dir)
    student = copy.deepcopy(teacher.unet)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    card = dataclasses.replace(teacher.card, student={"steps": steps, "teacher_steps": 2 * steps})
    SegDiffPipeline(teacher.unet, teacher.scheduler, card, student=student).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def student_studio(tiny_model_dir, tmp_path_factory):
    folder = save_student(tiny_model_dir, tmp_path_factory.mktemp("models") / "tiny-student")
    return Studio(SegDiffPipeline.from_pretrained(folder), folder)


def at_the_defaults(pipe, masks, seeds, **asked) -> list[np.ndarray]:
    """What `pipe(masks, **asked)` draws at its defaults, image k from its own CPU generator seeded with seeds[k]
    (the studio's seeds), as (H, W, C) uint8."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(masks, generator=generators, output_type="np", **asked).images
    return list((out * 255).round().astype(np.uint8))


def test_generate_draws_with_the_models_student_by_default_exactly_as_the_pipelines_defaults(student_studio, mask):
    studio = student_studio
    assert studio.samplers[0] == "student" and studio.settings().sampler == "student"
    run = studio.generate(mask, studio.settings(seed=5, num_images=2))
    expected = at_the_defaults(studio.pipe, [mask, mask], [5, 6])
    assert all(np.array_equal(a, b) for a, b in zip(run.images, expected, strict=True))
    teacher = studio.generate(mask, studio.settings(seed=5, num_images=2, sampler="dpm++"))
    assert not np.array_equal(teacher.images[0], run.images[0])  # the student, not the model itself
    # Every record says what drew: the student in its own 2 steps, whatever steps were asked.
    assert (run.settings["sampler"], run.settings["steps"]) == ("student", 2) and "upscale_steps" not in run.settings
    assert settings_of(run.files[1])["sampler"] == "student" and settings_of(run.files[1])["steps"] == 2
    with zipfile.ZipFile(run.archive) as archive:
        written = json.loads(archive.read("settings.json"))
    assert (written["sampler"], written["steps"]) == ("student", 2)
    asked = studio.generate(mask, studio.settings(seed=5, num_images=2, steps=40))
    assert all(np.array_equal(a, b) for a, b in zip(asked.images, run.images, strict=True))
    assert asked.settings["steps"] == 2
    # An explicit sampler draws with the model itself, as before.
    assert (teacher.settings["sampler"], teacher.settings["steps"]) == ("dpm++", 12)


def test_a_sweep_with_the_student_renders_one_noise_as_generate_does(student_studio, mask):
    sweep = student_studio.sweep(mask, student_studio.settings(seed=3))
    alone = student_studio.generate(mask, student_studio.settings(seed=3, num_images=1))
    assert np.abs(sweep.images[0].astype(int) - alone.images[0]).max() <= 1  # a batch of 4 against 1: rounding
    assert (sweep.settings["sampler"], sweep.settings["steps"]) == ("student", 2)


def test_mask_guidance_works_with_the_student(student_studio, mask):
    plain = student_studio.generate(mask, student_studio.settings(seed=4, num_images=1))
    guided = student_studio.generate(mask, student_studio.settings(seed=4, num_images=1, guidance_scale=3))
    assert not np.array_equal(plain.images[0], guided.images[0])
    assert guided.settings["guidance_scale"] == 3.0 and guided.settings["sampler"] == "student"
    generator = [torch.Generator("cpu").manual_seed(4)]
    expected = student_studio.pipe(mask, generator=generator, output_type="np", guidance_scale=3).images[0]
    assert np.array_equal(guided.images[0], (expected * 255).round().astype(np.uint8))


def test_a_model_without_a_student_refuses_it_by_name_and_keeps_its_default(studio, mask):
    assert "student" not in studio.samplers and studio.settings().sampler == "dpm++"
    refusal = r"^sampler 'student': tiny-breast has no distilled student; expected one of \['dpm\+\+', 'unipc'"
    with pytest.raises(ConfigError, match=refusal):
        studio.settings(sampler="student")
    for action in (studio.generate, studio.sweep):
        with pytest.raises(ConfigError, match=refusal):
            action(mask, Settings(sampler="student"))
    with pytest.raises(ConfigError, match=r"^sampler 'teacher': expected one of \['dpm\+\+'.*'student'\]"):
        Settings(sampler="teacher")
    with pytest.raises(ArgumentError, match=r"scheduler='student'"):  # the studio's word, not the pipeline's
        studio.pipe(mask, sampler="student")


@pytest.mark.skipif(not BUNDLED_256.is_dir(), reason="the bundled 256 px cascade is not in this checkout")
def test_the_bundled_cascade_draws_and_records_both_students_by_default():
    """At its card's settings: both students, mask guidance 2 (Dice 0.957x the real images', issue 32)."""
    studio = Studio(SegDiffPipeline.from_pretrained(BUNDLED_256, device="cpu"), BUNDLED_256)
    studio.pipe.set_progress_bar_config(disable=True)
    settings = studio.settings(seed=0, num_images=1)
    assert (settings.sampler, settings.guidance_scale) == ("student", 2.0)
    assert studio.sampling("student", 12) == dict(sampler="student", steps=2, upscale_sampler="student", upscale_steps=2)
    upscaling = studio.card.upscaling
    assert studio.sampling("dpm++", 12) == dict(sampler="dpm++", steps=12, upscale_sampler=upscaling.scheduler,
                                                upscale_steps=upscaling.steps)  # fmt: skip
    mask = np.zeros((256, 256), np.int64)
    mask[150:230, 60:200] = 2
    mask[100:130, 110:150] = 1
    run = studio.generate(mask, settings)
    assert np.array_equal(run.images[0], at_the_defaults(studio.pipe, [mask], [0], guidance_scale=2)[0])
    assert settings_of(run.files[0])["upscale_steps"] == 2


def save_recorded(model_dir, folder, sampler: str, steps: int, guidance_scale: float = 1.0):
    """A copy of a model whose card records `sampler` at `steps` (and mask guidance) as its best sampling."""
    shutil.copytree(model_dir, folder)
    card = ModelCard.load(folder)
    card.sampling = {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale}
    card.save(folder)
    return folder


def test_generate_starts_at_the_sampling_its_card_records_and_a_request_still_picks(student_studio, mask, tmp_path):
    """A card's `sampling` (the most scan-like settings measured) is where Generate starts; previews keep the
    student, and a request's sampler or steps still win."""
    folder = save_recorded(student_studio.folder, tmp_path / "tiny-recorded", "ddpm", 7)
    card = ModelCard.load(folder)
    studio = Studio(SegDiffPipeline.from_pretrained(folder), folder)
    assert studio.samplers[:2] == ("ddpm", "student") and sorted(studio.samplers) == sorted(student_studio.samplers)
    default = studio.settings(seed=2, num_images=1)
    assert (default.sampler, default.steps) == ("ddpm", 7)
    run = studio.generate(mask, default)
    assert (run.settings["sampler"], run.settings["steps"]) == ("ddpm", 7)
    generator = [torch.Generator("cpu").manual_seed(2)]
    expected = studio.pipe(mask, sampler="ddpm", num_inference_steps=7, generator=generator, output_type="np")
    assert np.array_equal(run.images[0], (expected.images[0] * 255).round().astype(np.uint8))
    assert studio.settings(sampler="dpm++").steps == 12 and studio.settings(steps=3).steps == 3
    assert studio.settings(sampler="student").sampler == "student"
    preview = studio.preview(mask, seed=2)  # the live preview stays at the pipeline's defaults: the student
    assert np.array_equal(np.asarray(preview), np.asarray(student_studio.preview(mask, seed=2)))
    card.sampling = {"sampler": "ddpm", "steps": 0}
    with pytest.raises(CheckpointError, match=r"sampling 'ddpm' at 0 steps: expected one of .* at 1 to 100 steps"):
        card.save(folder)
        ModelCard.load(folder)


def test_a_recorded_mask_guidance_is_where_generate_and_previews_draw_unless_a_request_names_one(
    student_studio, mask, tmp_path
):
    """The 256 px model's card records its student at mask guidance 2 (faithful at no cost in realism): Generate
    and the live preview draw there, each image as `pipe(mask, guidance_scale=2)` draws it; a request's own
    guidance wins."""
    folder = save_recorded(student_studio.folder, tmp_path / "tiny-guided", "student", 2, guidance_scale=2.5)
    studio = Studio(SegDiffPipeline.from_pretrained(folder), folder)
    assert studio.samplers[0] == "student" and studio.guidance == 2.5 and student_studio.guidance == 1.0
    default = studio.settings(seed=4, num_images=2)
    assert (default.sampler, default.guidance_scale) == ("student", 2.5)
    assert studio.settings(guidance_scale=1).guidance_scale == 1.0
    run = studio.generate(mask, default)
    assert run.settings["guidance_scale"] == 2.5
    generators = [torch.Generator("cpu").manual_seed(s) for s in (4, 5)]
    guided = studio.pipe([mask, mask], generator=generators, output_type="np", guidance_scale=2.5).images
    for image, expected in zip(run.images, guided, strict=True):
        assert np.array_equal(image, (expected * 255).round().astype(np.uint8))
    preview = np.asarray(studio.preview(mask, seed=4), int)
    assert np.abs(preview - np.asarray(run.images[0], int)[..., 0]).max() <= 1  # the same drawing
    unguided = np.asarray(student_studio.preview(mask, seed=4), int)
    assert np.abs(preview - unguided).max() > 8  # guidance changed it
