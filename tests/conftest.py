"""Shared fixtures: tiny model folders (64 px 4 classes, 32 px 3 classes), and the studio launched on both."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler

from segdiff import SegDiffPipeline
from segdiff.model.card import ModelCard
from segdiff.model.unet import build_unet

CLASS_NAMES = ["background", "breast", "vessels", "fibroglandular tissue"]
SMALL_CLASS_NAMES = ["background", "pubic symphysis", "fetal head"]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mask():
    """A 64 px breast-like mask holding every class: body, a vessel band and a tissue blob."""
    mask = np.zeros((64, 64), np.int64)
    mask[8:56, 8:56] = 1
    mask[21:27, 10:54] = 2
    mask[36:48, 16:32] = 3
    return mask


def save_tiny_model(folder, size: int, class_names: list[str]):
    """A saved segdiff model folder: `tiny` UNet, 1 channel, random weights."""
    card = ModelCard(num_classes=len(class_names), img_channels=1, img_size=size, class_names=class_names)
    torch.manual_seed(0)
    unet = build_unet("tiny", size, 1, card.cond_channels)
    with torch.no_grad():  # the output conv starts at zero; give every weight a value so masks matter
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    SegDiffPipeline(unet, DDPMScheduler(num_train_timesteps=1000), card).save_pretrained(folder)
    return folder


def sdedit_distance(pipe, mask, start: torch.Tensor, strength: float) -> float:
    """Mean absolute distance from `start` of the image `pipe` draws from it at `strength` (seed 0)."""
    out = pipe(mask, image=start, strength=strength, generator=torch.Generator().manual_seed(0), output_type="pt")
    return float((out.images - start).abs().mean())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """64 px, 4 classes: the studio's default model in the tests."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-breast", 64, CLASS_NAMES)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory):
    """32 px, 3 classes: the second model the studio's picker offers."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-small", 32, SMALL_CLASS_NAMES)


@pytest.fixture(scope="session")
def studio_url(tiny_model_dir, small_model_dir, tmp_path_factory):
    """The studio app launched in this process on a free local port over both tiny models; its URL.

    Each model has one example mask in `<examples>/<name>/`; the 64 px model is the default.
    """
    import app
    from segdiff.studio.registry import Models

    examples = tmp_path_factory.mktemp("examples")
    for folder, size in ((tiny_model_dir, 64), (small_model_dir, 32)):
        (examples / folder.name).mkdir()
        square = np.zeros((size, size), np.uint8)
        square[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
        PIL.Image.fromarray(square).save(examples / folder.name / "square.png")
    folders = {tiny_model_dir.name: tiny_model_dir, small_model_dir.name: small_model_dir}
    demo = app.build_demo(Models(folders, tiny_model_dir.name, examples))
    app.launch(demo, host="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield demo.local_url
    demo.close()
