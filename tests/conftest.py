"""Shared fixtures: a tiny 4-class model folder, and the studio launched on it (gradio_client, browser)."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from segdiff import SegDiffPipeline
from segdiff.models import ModelCard, build_unet

CLASS_NAMES = ["background", "breast", "vessels", "fibroglandular tissue"]


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved segdiff model folder: `tiny` UNet, 64 px, 1 channel, 4 classes, random weights."""
    folder = tmp_path_factory.mktemp("models") / "tiny-breast"
    card = ModelCard(num_classes=4, img_channels=1, img_size=64, class_names=CLASS_NAMES)
    torch.manual_seed(0)
    unet = build_unet("tiny", 64, 1, card.cond_channels)
    with torch.no_grad():  # the output conv starts at zero; give every weight a value so masks matter
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    SegDiffPipeline(unet, DDPMScheduler(num_train_timesteps=1000), card).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def studio_url(tiny_model_dir):
    """The studio app launched in this process on a free local port; its URL."""
    import app

    demo = app.build_demo(SegDiffPipeline.from_pretrained(tiny_model_dir), tiny_model_dir)
    app.launch(demo, host="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield demo.local_url
    demo.close()
