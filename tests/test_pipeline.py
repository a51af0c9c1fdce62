"""SegDiffPipeline against the original sampling loop, on every folder kind it must open."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from segdiff import SegDiffPipeline
from segdiff.errors import ArgumentError, CheckpointError, MaskError
from segdiff.model import pipeline as pipeline_module
from segdiff.model.card import ModelCard
from segdiff.model.pipeline import autocast_dtype
from segdiff.model.unet import PRESETS, build_unet

SIZE, K = 32, 4


def square_masks(batch=2):
    masks = np.zeros((batch, SIZE, SIZE), np.int64)
    masks[:, 4:28, 4:28] = 1
    masks[:, 8:14, 8:24] = 2
    masks[:, 18:24, 10:20] = 3
    return masks


def tiny_unet(in_channels, out_channels=1, seed=0):
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=SIZE, in_channels=in_channels, out_channels=out_channels, **PRESETS["tiny"]
    )
    # Random init leaves the output conv at zero; give every weight a value so the mask matters.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return unet.eval()


def write_original_run(folder, unet, class_name="SegGuidedDDIMPipeline"):
    """A run folder as the original code's `pipeline.save_pretrained` leaves it."""
    unet.save_pretrained(folder / "unet")
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": class_name,
        "_diffusers_version": "0.21.4",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    if class_name.startswith("SegGuided"):
        index |= {"eval_dataloader": [None, None], "external_config": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def original_ddim_loop(unet, masks, generator, steps=50, eta=0.0):
    """SegGuidedDDIMPipeline.__call__, as upstream-behaviour.md describes it."""
    seg = torch.from_numpy(masks.astype(np.uint8)).float().div(255)[:, None]  # ToTensor of the "L" mask
    shape = (masks.shape[0], unet.config.in_channels - 1, SIZE, SIZE)
    image = randn_tensor(shape, generator=generator, dtype=unet.dtype)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_output = unet(torch.cat((image, seg), dim=1), t).sample
        image = scheduler.step(model_output, t, image, eta=eta, generator=generator).prev_sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def original_unet():
    return tiny_unet(in_channels=2)


@pytest.fixture
def segdiff_pipe():
    card = ModelCard(num_classes=K, img_channels=1, img_size=SIZE, class_names=["bg", "a", "b", "c"])
    pipe = SegDiffPipeline(tiny_unet(in_channels=1 + K - 1), DDPMScheduler(num_train_timesteps=1000), card)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, masks, seed=0, **kwargs):
    return pipe(masks, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


@pytest.mark.parametrize("layout", ["run_folder", "bare_unet"])
def test_original_checkpoints_sample_like_the_original_pipeline(tmp_path, original_unet, layout):
    if layout == "run_folder":
        folder = write_original_run(tmp_path / "ddim-breast_mri-32-segguided", original_unet)
    else:
        folder = tmp_path / "released"
        original_unet.save_pretrained(folder / "unet")
    # The original settings: fp32 in the default memory layout. (channels-last alone changes rounding in
    # the 6th digit, which this untrained, chaotic network amplifies over 50 steps.)
    pipe = SegDiffPipeline.from_pretrained(folder, num_classes=K, precision="fp32", channels_last=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.card.encoding == "original" and pipe.card.num_classes == K

    masks = square_masks()
    ours = sample(pipe, masks, seed=3, scheduler="ddim", num_inference_steps=50)
    with torch.no_grad():
        theirs = original_ddim_loop(original_unet, masks, torch.Generator().manual_seed(3))
    assert ours.shape == theirs.shape == (2, SIZE, SIZE, 1)
    assert np.abs(ours - theirs).max() < 1e-5
    other_seed = sample(pipe, masks, seed=4, scheduler="ddim", num_inference_steps=50)
    assert np.abs(other_seed - theirs).max() > 0.1  # the comparison can fail


def test_guided_original_folder_needs_num_classes(tmp_path, original_unet):
    folder = write_original_run(tmp_path / "run", original_unet)
    with pytest.raises(CheckpointError, match="pass num_classes=K"):
        SegDiffPipeline.from_pretrained(folder)


def test_a_segdiff_folder_without_its_card_is_named_as_such(tmp_path, tiny_model_dir):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (folder / "segdiff_card.json").unlink()
    with pytest.raises(CheckpointError, match="model: a segdiff model without its segdiff_card.json"):
        SegDiffPipeline.from_pretrained(folder)


def test_unconditional_original_folder_opens_without_masks(tmp_path):
    folder = write_original_run(tmp_path / "ddim-x-32", tiny_unet(in_channels=1), class_name="DDIMPipeline")
    pipe = SegDiffPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert not pipe.card.guided
    images = sample(pipe, None, batch_size=3, num_inference_steps=4)
    assert images.shape == (3, SIZE, SIZE, 1)


def test_pickle_weights_are_refused(tmp_path, original_unet):
    folder = write_original_run(tmp_path / "run", original_unet)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(
        folder / "unet" / "diffusion_pytorch_model.bin"
    )
    with pytest.raises(CheckpointError, match="pickle files are not loaded"):
        SegDiffPipeline.from_pretrained(folder, num_classes=K)


def test_save_and_reopen_gives_the_same_images(tmp_path, segdiff_pipe):
    masks = square_masks()
    before = {
        name: sample(segdiff_pipe, masks, scheduler=name, num_inference_steps=6) for name in ("dpm++", "ddim")
    }
    segdiff_pipe.save_pretrained(tmp_path / "model")
    segdiff_pipe.save_pretrained(tmp_path / "model")  # a second save swaps the first out whole
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "README.md",  # the Hub model card, rendered from segdiff_card.json
        "model_index.json",
        "scheduler",
        "segdiff_card.json",
        "unet",
    ]
    # The same memory layout as before the save: channels-last alone changes rounding, which this
    # untrained network amplifies over the steps.
    reopened = SegDiffPipeline.from_pretrained(tmp_path / "model", precision="fp32", channels_last=False)
    reopened.set_progress_bar_config(disable=True)
    assert reopened.card == segdiff_pipe.card
    for name, images in before.items():
        assert np.abs(sample(reopened, masks, scheduler=name, num_inference_steps=6) - images).max() < 1e-4


def test_same_seed_same_image_and_omission_changes_it(segdiff_pipe):
    masks = square_masks(1)
    first = sample(segdiff_pipe, masks, seed=7, num_inference_steps=5)
    assert np.array_equal(first, sample(segdiff_pipe, masks, seed=7, num_inference_steps=5))
    omitted = sample(segdiff_pipe, masks, seed=7, num_inference_steps=5, omit=[2])
    assert np.abs(omitted - first).max() > 1e-3
    by_hand = masks.copy()
    by_hand[by_hand == 2] = 0
    assert np.array_equal(omitted, sample(segdiff_pipe, by_hand, seed=7, num_inference_steps=5))


@pytest.mark.parametrize("scheduler", ["dpm++", "unipc", "ddim", "ddpm"])
def test_every_sampler_runs_and_reports_progress(segdiff_pipe, scheduler):
    steps = []
    images = sample(
        segdiff_pipe,
        square_masks(1),
        num_inference_steps=4,
        scheduler=scheduler,
        callback=lambda i, n: steps.append((i, n)),
    )
    assert images.shape == (1, SIZE, SIZE, 1) and images.min() >= 0 and images.max() <= 1
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_masks_in_every_accepted_form(segdiff_pipe):
    import PIL.Image

    mask = square_masks(1)[0]
    forms = [mask, torch.from_numpy(mask), PIL.Image.fromarray(mask.astype(np.uint8)), [mask, mask]]
    for form in forms:
        out = segdiff_pipe.prepare_masks(form)
        assert out.dtype == torch.int64 and tuple(out.shape[1:]) == (SIZE, SIZE)
        assert torch.equal(out[0], torch.from_numpy(mask))
    assert segdiff_pipe.prepare_masks(mask, batch_size=3).shape == (3, SIZE, SIZE)


def test_start_from_an_image_keeps_its_look(segdiff_pipe):
    masks = square_masks(1)
    start = torch.full((1, 1, SIZE, SIZE), 0.8)
    near = sample(segdiff_pipe, masks, num_inference_steps=10, image=start, strength=0.1)
    far = sample(segdiff_pipe, masks, num_inference_steps=10, image=start, strength=1.0)
    assert np.abs(near - 0.8).mean() < np.abs(far - 0.8).mean()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"masks": np.full((SIZE, SIZE), 4)}, MaskError, r"pixel value 4, expected class ids 0..3"),
        ({"masks": np.zeros((SIZE, 20), int)}, MaskError, r"mask shape \(1, 32, 20\), expected"),
        ({"omit": [4]}, MaskError, r"omit=\[4\]: class 4 is not a class id 1..3"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps=0, expected an integer >= 1"),
        ({"scheduler": "euler-ish"}, ValueError, r"scheduler='euler-ish', expected one of"),
        ({"strength": 0.0, "image": torch.zeros(1, 1, SIZE, SIZE)}, ValueError, r"strength=0.0"),
        ({"masks": None}, MaskError, "pass masks"),
    ],
)
def test_bad_arguments_name_the_value(segdiff_pipe, kwargs, error, message):
    call = {"masks": square_masks(1), "num_inference_steps": 2} | kwargs
    with pytest.raises(error, match=message):
        segdiff_pipe(**call)


def test_card_must_match_the_unet():
    card = ModelCard(num_classes=6, img_channels=1, img_size=SIZE)
    with pytest.raises(CheckpointError, match="takes 4 input channels"):
        SegDiffPipeline(tiny_unet(in_channels=4), DDPMScheduler(), card)


def test_presets_build_the_expected_networks():
    paper = build_unet("paper", 256, 1, 1)
    assert paper.config.block_out_channels == (128, 128, 256, 256, 512, 512)
    assert (
        paper.config.down_block_types[4] == "AttnDownBlock2D"
        and paper.config.up_block_types[1] == "AttnUpBlock2D"
    )
    assert 110e6 < sum(p.numel() for p in paper.parameters()) < 118e6
    small, medium = build_unet("small", 64, 1, 3), build_unet("medium", 64, 1, 3)
    assert medium.config.block_out_channels == tuple(2 * w for w in small.config.block_out_channels)
    assert medium.config.down_block_types == small.config.down_block_types  # the same shape, twice as wide
    assert 10e6 < sum(p.numel() for p in medium.parameters()) < 11.5e6
    with pytest.raises(CheckpointError, match="unknown preset 'huge'"):
        build_unet("huge", 64, 1, 1)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_precision_on_a_cpu_uses_bf16_only_where_native(monkeypatch, segdiff_pipe, native_bf16):
    monkeypatch.setattr(pipeline_module, "cpu_has_fast_bf16", lambda: native_bf16)
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto") == (torch.bfloat16 if native_bf16 else None)
    assert autocast_dtype(cpu, "fp32") is None and autocast_dtype(cpu, "bf16") == torch.bfloat16
    masks = square_masks()
    auto = sample(segdiff_pipe.set_speed(precision="auto", channels_last=False), masks, num_inference_steps=3)
    fp32 = sample(segdiff_pipe.set_speed(precision="fp32", channels_last=False), masks, num_inference_steps=3)
    # Without native bf16 "auto" falls back to exactly the fp32 arithmetic; with it, the images differ.
    assert np.array_equal(auto, fp32) != native_bf16


@pytest.mark.parametrize("scheduler", ["dpm++", "unipc"])
def test_x0_clipping_gives_the_images_of_diffusers_thresholding(monkeypatch, segdiff_pipe, scheduler):
    masks = square_masks()
    ours = sample(segdiff_pipe, masks, num_inference_steps=6, scheduler=scheduler)
    subclass, overrides = pipeline_module.SCHEDULERS[scheduler]
    library_class = subclass.__mro__[2]  # the diffusers scheduler behind the clipping mixin
    monkeypatch.setitem(pipeline_module.SCHEDULERS, scheduler, (library_class, overrides))
    theirs = sample(segdiff_pipe, masks, num_inference_steps=6, scheduler=scheduler)
    assert np.array_equal(ours, theirs)


def test_device_lookups_do_not_grow_with_the_steps(monkeypatch, segdiff_pipe):
    """`pipe.device` walks every module (10% of a CPU step of the demo model when it ran per step)."""
    lookups = []
    for name in ("device", "_execution_device"):
        original = getattr(SegDiffPipeline, name)
        counted = property(lambda self, original=original: lookups.append(1) or original.fget(self))
        monkeypatch.setattr(SegDiffPipeline, name, counted)
    segdiff_pipe.precision = "auto"
    counts = []
    for steps in (2, 8):
        lookups.clear()
        sample(segdiff_pipe, square_masks(1), num_inference_steps=steps)
        counts.append(len(lookups))
    assert counts[0] == counts[1]


def test_unknown_keyword_arguments_are_refused_and_torch_dtype_is_read_as_precision(tiny_model_dir):
    with pytest.raises(ArgumentError, match=r"unknown keyword argument\(s\) num_clases"):
        SegDiffPipeline.from_pretrained(tiny_model_dir, device="cpu", num_clases=4)
    pipe = SegDiffPipeline.from_pretrained(tiny_model_dir, device="cpu", torch_dtype=torch.float32)
    assert pipe.precision == "fp32" and pipe.unet.dtype == torch.float32
    with pytest.raises(ArgumentError, match="give one of them"):
        SegDiffPipeline.from_pretrained(tiny_model_dir, device="cpu", torch_dtype=torch.float16, precision="bf16")


# ---- mask guidance -------------------------------------------------------------------------------------


def first_predictions(monkeypatch, pipe, masks, **kwargs) -> torch.Tensor:
    """The prediction the sampler steps with first (the same starting noise in every call: seed 0)."""
    seen, step = [], DDIMScheduler.step

    def spy(self, model_output, *args, **kw):
        seen.append(model_output.clone())
        return step(self, model_output, *args, **kw)

    monkeypatch.setattr(DDIMScheduler, "step", spy)
    sample(pipe, masks, scheduler="ddim", num_inference_steps=3, **kwargs)
    return seen[0]


def test_mask_guidance_extrapolates_from_the_blank_mask(monkeypatch, segdiff_pipe):
    masks, blank = square_masks(1), np.zeros((1, SIZE, SIZE), np.int64)
    conditional = first_predictions(monkeypatch, segdiff_pipe, masks)
    unconditional = first_predictions(monkeypatch, segdiff_pipe, blank)
    guided = first_predictions(monkeypatch, segdiff_pipe, masks, guidance_scale=3.0)
    assert (conditional - unconditional).abs().max() > 1e-4  # the mask matters to this network
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5, rtol=1e-4)
    # Scale 1 is no guidance, and guiding a blank mask away from itself changes nothing.
    assert np.array_equal(sample(segdiff_pipe, masks, guidance_scale=1), sample(segdiff_pipe, masks))
    np.testing.assert_allclose(
        sample(segdiff_pipe, blank, num_inference_steps=4, guidance_scale=4.0),
        sample(segdiff_pipe, blank, num_inference_steps=4),
        atol=1e-3,  # a batch of two runs other convolution kernels than a batch of one
    )


@pytest.mark.parametrize("scale", [0.5, 0, 21, float("nan"), True, "3"])
def test_mask_guidance_out_of_range_is_refused(segdiff_pipe, scale):
    with pytest.raises(ArgumentError, match=r"guidance_scale=.*expected a number from 1 \(no guidance\) to 20"):
        segdiff_pipe(square_masks(1), num_inference_steps=2, guidance_scale=scale)


def test_an_unconditional_model_cannot_be_mask_guided():
    pipe = SegDiffPipeline(tiny_unet(in_channels=1), DDPMScheduler(num_train_timesteps=1000))
    with pytest.raises(ArgumentError, match="an unconditional model has no mask to be guided by"):
        pipe(batch_size=1, num_inference_steps=2, guidance_scale=2.0)
