"""Training recipes: what the UNet predicts, how timesteps weigh in the loss, the noise schedule, the
learning rate and its warm-up, and the EMA.

`original` is the original code's recipe, unchanged: epsilon prediction, uniform MSE, linear betas, AdamW at
1e-4 after 500 warm-up steps, no EMA. `fast`, the default for new models, is what benchmarks/convergence.py
measured to draw faithful images in a fraction of the steps. Each choice can be set on its own over either.

The parts, with the literature they come from:
- prediction type: epsilon (Ho et al., 2020), v (Salimans & Ho, 2022) or the clean image x0 ("sample");
  the model's scheduler config records it, and every sampler reads it from there.
- loss weighting: uniform MSE on the prediction, or min-SNR-gamma (Hang et al., 2023), which caps the
  weight of the low-noise timesteps so the high-noise ones, where the anatomy is laid out, are learned first.
- noise schedule: linear betas (Ho et al.) or cosine (`squaredcos_cap_v2`, Nichol & Dhariwal, 2021), which
  destroys a small image's content less abruptly; optionally rescaled to zero terminal SNR (Lin et al., 2024).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel, compute_snr

from ..errors import ConfigError

Prediction = Literal["epsilon", "v_prediction", "sample"]
Weighting = Literal["uniform", "min_snr"]
BetaSchedule = Literal["linear", "squaredcos_cap_v2"]


@dataclass(frozen=True)
class Recipe:
    """How a model is trained, beyond its data and network. Recorded in the model card."""

    prediction_type: Prediction = "epsilon"
    loss_weighting: Weighting = "uniform"
    snr_gamma: float = 5.0  # Hang et al.'s default; only with min_snr
    beta_schedule: BetaSchedule = "linear"
    zero_terminal_snr: bool = False
    learning_rate: float | None = None  # None: the preset's, from FAST_LEARNING_RATES
    lr_warmup_steps: int = 500
    ema: bool = False
    # EMAModel's warm-up, decay = 1 - (1 + step)^-power, capped here: power 3/4 averages over about the last
    # 10% of a short run, so the EMA weights never trail far behind the trained ones.
    ema_power: float = 3 / 4
    ema_max_decay: float = 0.9999

    def __post_init__(self):
        for name, allowed in (
            ("prediction_type", get_args(Prediction)),
            ("loss_weighting", get_args(Weighting)),
            ("beta_schedule", get_args(BetaSchedule)),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} {getattr(self, name)}: expected one of {list(allowed)}")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ConfigError(
                "--zero_terminal_snr with --prediction_type epsilon: at zero SNR the noise IS the input, so "
                "the model learns nothing there; use v_prediction or sample (Lin et al., 2024)"
            )
        if not 0 < self.snr_gamma <= 1000:
            raise ConfigError(f"--snr_gamma {self.snr_gamma}: expected a value in (0, 1000]")

    def with_overrides(self, **overrides) -> Recipe:
        """This recipe with the given fields replaced; None values keep the recipe's own."""
        recipe = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        if overrides.get("snr_gamma") is not None and recipe.loss_weighting != "min_snr":
            raise ConfigError(
                f"--snr_gamma {recipe.snr_gamma:g}: caps --loss_weighting min_snr only, this run's weighting is "
                f"{recipe.loss_weighting}; drop --snr_gamma or add --loss_weighting min_snr"
            )
        return recipe

    def peak_learning_rate(self, preset: str) -> float:
        return self.learning_rate if self.learning_rate is not None else FAST_LEARNING_RATES[preset]

    def noise_scheduler(self, model_type: str) -> DDPMScheduler | DDIMScheduler:
        """The training schedule, saved with the model: samplers take prediction type and betas from it."""
        scheduler_cls = DDIMScheduler if model_type == "DDIM" else DDPMScheduler
        settings = {}
        if self.prediction_type != "epsilon":
            settings["prediction_type"] = self.prediction_type
        if self.beta_schedule != "linear":
            settings["beta_schedule"] = self.beta_schedule
        if self.zero_terminal_snr:
            settings["rescale_betas_zero_snr"] = True
        return scheduler_cls(num_train_timesteps=1000, **settings)

    def loss(self, prediction, scheduler, images, noise, timesteps) -> torch.Tensor:
        """MSE between the UNet's `prediction` (B, C, H, W) and this recipe's target, weighted by timestep."""
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = scheduler.get_velocity(images, noise, timesteps)
        else:
            target = images
        if self.loss_weighting == "uniform":
            return F.mse_loss(prediction.float(), target.float())  # the original's loss, to the bit
        snr = compute_snr(scheduler, timesteps)  # (B,)
        capped = torch.clamp(snr, max=self.snr_gamma)
        # min(SNR, gamma) is the weight on the x0 error; the same weight on each target's error (only the
        # chosen one is computed: with zero terminal SNR, capped / snr would be 0 / 0 there).
        if self.prediction_type == "epsilon":
            weight = capped / snr
        elif self.prediction_type == "v_prediction":
            weight = capped / (snr + 1)
        else:
            weight = capped
        per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_example * weight).mean()

    def ema_model(self, unet: UNet2DModel) -> EMAModel | None:
        if not self.ema:
            return None
        return EMAModel(
            unet.parameters(),
            decay=self.ema_max_decay,
            use_ema_warmup=True,
            power=self.ema_power,
            model_cls=UNet2DModel,
            model_config=unet.config,
        )

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Peak AdamW learning rates of the fast recipe by preset: smaller networks take larger steps. `small` and
# `tiny` were measured by benchmarks/convergence.py; `base` and `paper` follow the DDPM/ADM practice for
# networks of their size (2e-4 at 35 M parameters, 1e-4 above 100 M), and `medium` (11 M) lies between.
FAST_LEARNING_RATES = {
    "tiny": 1e-3,
    "small": 5e-4,
    "upscaler": 5e-4,
    "medium": 3e-4,
    "base": 2e-4,
    "paper": 1e-4,
}

RECIPES: dict[str, Recipe] = {
    "original": Recipe(learning_rate=1e-4, lr_warmup_steps=500),
    "fast": Recipe(
        prediction_type="v_prediction",
        loss_weighting="min_snr",
        beta_schedule="squaredcos_cap_v2",
        lr_warmup_steps=100,
        ema=True,
        ema_max_decay=0.999,
    ),
}
DEFAULT_RECIPE = "fast"
