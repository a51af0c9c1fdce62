"""Training recipes: the original recipe is the original loss to the bit, every prediction type trains,
saves, reopens and samples with every sampler, and contradictory settings are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from test_training import config, write_data

from segdiff import ConfigError, SegDiffPipeline
from segdiff.data.masks import encode
from segdiff.model.card import ModelCard
from segdiff.model.pipeline import SCHEDULERS
from segdiff.model.unet import build_unet
from segdiff.train.loop import TrainConfig, _objective, train
from segdiff.train.recipes import RECIPES, Recipe


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), size=16, counts=(8, 2, 2))


def batch(seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, 3, (4, size, size), generator=g)
    return {"image": torch.rand(4, 1, size, size, generator=g) * 2 - 1, "mask": masks}


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return build_unet("tiny", 16, 1, 2)


def test_original_recipe_is_the_original_loss_to_the_bit():
    recipe, card, b = RECIPES["original"], ModelCard(num_classes=3, img_channels=1, img_size=16), batch()
    scheduler = recipe.noise_scheduler("DDPM")
    assert dict(scheduler.config) == dict(DDPMScheduler(num_train_timesteps=1000).config)
    assert recipe.noise_scheduler("DDIM").config == DDIMScheduler(num_train_timesteps=1000).config
    assert (recipe.peak_learning_rate("small"), recipe.lr_warmup_steps, recipe.ema) == (1e-4, 500, False)
    unet = tiny_unet()
    torch.manual_seed(1)
    config = TrainConfig(output_dir="run", img_dir="img", seg_dir="mask", num_classes=3, img_size=16, preset="tiny")
    ours = _objective(config, card, recipe, scheduler, teacher=None)(unet, b)

    # The original training step, written out as the original code does it.
    torch.manual_seed(1)
    noise = torch.randn_like(b["image"])
    t = torch.randint(0, 1000, (4,))
    noisy = DDPMScheduler(num_train_timesteps=1000).add_noise(b["image"], noise, t)
    cond = encode(b["mask"], "onehot", 3)
    expected = F.mse_loss(unet(torch.cat([noisy, cond], 1), t).sample, noise)
    assert ours.item() == expected.item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_each_timestep_by_its_capped_snr(prediction_type):
    recipe = Recipe(prediction_type=prediction_type, loss_weighting="min_snr", snr_gamma=5.0)
    scheduler = recipe.noise_scheduler("DDPM")
    images, noise = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8)
    t = torch.tensor([5, 900])  # SNR far above gamma, and far below
    prediction = torch.zeros(2, 1, 8, 8)
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    assert snr[0] > 5 > snr[1]
    target = {
        "epsilon": noise,
        "v_prediction": alpha_bar.sqrt()[:, None, None, None] * noise
        - (1 - alpha_bar).sqrt()[:, None, None, None] * images,
        "sample": images,
    }[prediction_type]
    x0_weight = torch.minimum(snr, torch.tensor(5.0))  # min-SNR-gamma on the x0 error (Hang et al.)
    to_x0 = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones(2)}[prediction_type]
    expected = ((target**2).mean(dim=(1, 2, 3)) * x0_weight / to_x0).mean()
    got = recipe.loss(prediction, scheduler, images, noise, t)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-7)


class Oracle(UNet2DModel):
    """Predicts, for every noisy input, the exact target that leads to one known clean image."""

    def attach(self, scheduler, clean: torch.Tensor):
        self.alphas, self.clean = scheduler.alphas_cumprod, clean
        return self

    def forward(self, sample, timestep, **_):
        x_t = sample[:, :1]
        a = self.alphas[int(timestep)]
        eps = (x_t - a.sqrt() * self.clean) / (1 - a).sqrt()
        target = {
            "epsilon": eps,
            "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * self.clean,
            "sample": self.clean.expand_as(x_t),
        }[self.prediction_type]
        return type("Out", (), {"sample": target})()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
def test_every_sampler_reads_the_prediction_type_from_the_model(prediction_type, sampler, tmp_path):
    recipe = Recipe(prediction_type=prediction_type, beta_schedule="squaredcos_cap_v2")
    noise_scheduler = recipe.noise_scheduler("DDPM")
    card = ModelCard(num_classes=3, img_channels=1, img_size=16)
    oracle = Oracle(sample_size=16, in_channels=3, out_channels=1, **{"block_out_channels": (8, 8)},
                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)  # fmt: skip
    SegDiffPipeline(oracle, noise_scheduler, card).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == prediction_type and saved["beta_schedule"] == "squaredcos_cap_v2"

    pipe = SegDiffPipeline.from_pretrained(tmp_path, device="cpu", precision="fp32")
    clean = torch.linspace(-0.8, 0.8, 16).expand(1, 1, 16, 16)
    pipe.unet.__class__ = Oracle
    pipe.unet.prediction_type = prediction_type
    pipe.unet.attach(pipe.scheduler, clean)
    out = pipe(np.zeros((16, 16), np.int64), num_inference_steps=20 if sampler != "ddpm" else 100,
               scheduler=sampler, generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip
    torch.testing.assert_close(out.images, (clean + 1) / 2, atol=2e-3, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"recipe": "original"},
        {"recipe": "fast"},
        {"recipe": "fast", "prediction_type": "sample", "zero_terminal_snr": True},
        {"recipe": "original", "prediction_type": "epsilon", "loss_weighting": "min_snr", "ema": True},
    ],
    ids=["original", "fast", "sample-zsnr", "eps-minsnr-ema"],
)
def test_each_recipe_trains_saves_and_samples(overrides, data, tmp_path):
    out = train(config(tmp_path / "run", data, img_size=16, num_epochs=1, max_train_steps=3, **overrides))
    pipe = SegDiffPipeline.from_pretrained(out, device="cpu", precision="fp32")
    recipe = pipe.card.training["recipe"]
    assert recipe["name"] == overrides["recipe"]
    expected = RECIPES[overrides["recipe"]].with_overrides(**{k: v for k, v in overrides.items() if k != "recipe"})
    assert recipe["prediction_type"] == expected.prediction_type == pipe.scheduler.config.prediction_type
    assert recipe["loss_weighting"] == expected.loss_weighting and recipe["ema"] == expected.ema
    assert pipe.scheduler.config.rescale_betas_zero_snr == expected.zero_terminal_snr
    images = pipe(np.zeros((16, 16), np.int64), num_inference_steps=3, output_type="np").images
    assert np.isfinite(images).all() and images.shape == (1, 16, 16, 1)


def test_resume_refuses_another_recipe(data, tmp_path):
    train(config(tmp_path, data, img_size=16, max_train_steps=2, recipe="original"))
    with pytest.raises(ConfigError, match="prediction_type=epsilon.*--recipe original"):
        train(config(tmp_path, data, img_size=16, max_train_steps=4, recipe="fast", resume=True))
    train(config(tmp_path, data, img_size=16, max_train_steps=4, recipe="original", resume=True))


def test_contradictory_recipe_settings_are_refused(data, tmp_path):
    with pytest.raises(ConfigError, match="zero_terminal_snr.*epsilon"):
        config(tmp_path, data, prediction_type="epsilon", zero_terminal_snr=True)
    with pytest.raises(ConfigError, match="--recipe nonsense"):
        config(tmp_path, data, recipe="nonsense")
    with pytest.raises(ConfigError, match="--snr_gamma -1"):
        config(tmp_path, data, snr_gamma=-1.0)
    for weighting in ({"loss_weighting": "uniform"}, {"recipe": "original"}):  # a gamma nothing would use
        with pytest.raises(ConfigError, match="--snr_gamma 3: caps --loss_weighting min_snr only.*uniform"):
            config(tmp_path, data, snr_gamma=3.0, **weighting)
