"""Few-step students: progressive distillation (Salimans & Ho, 2022, *Progressive Distillation for Fast
Sampling of Diffusion Models*) in one round.

The student starts as a copy of its teacher and learns to take, in one deterministic DDIM step from t to s,
the image the teacher reaches in k DDIM steps between the same two times: the target is the clean image x~
for which the student's DDIM step lands where the teacher's k steps do. Salimans & Ho halve the steps
round by round (k = 2); one round with k = teacher_steps / student_steps trains each student step on the
teacher's whole segment, so a 2-step student from a 12-step teacher costs one training run, not three.

Both run on the "trailing" grid (t = T-1 first, the last step landing on x0 exactly): the student only ever
sees the timesteps it samples at, which is what lets it learn so few of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import CheckpointError
from ..model.card import Student
from ..model.pipeline import student_scheduler


def segments(schedule, student: Student) -> torch.Tensor:
    """The timesteps of each student step and of the teacher's steps inside it. -> (steps, k + 1) int64.

    Row i runs from the student's i-th timestep to where its DDIM step goes (-1: the clean image), through
    k = teacher_steps / steps evenly spaced teacher timesteps.
    """
    sampler = student_scheduler(schedule)
    sampler.set_timesteps(student.steps)
    starts = sampler.timesteps.long()
    # As DDIMScheduler.step computes the previous timestep, so training and sampling meet the same times.
    ends = (starts - schedule.config.num_train_timesteps // student.steps).clamp(min=-1)
    k = student.teacher_steps // student.steps
    fractions = torch.arange(k + 1, dtype=torch.float64) / k
    return (starts[:, None] + (ends - starts)[:, None] * fractions).round().long()


class Trajectory:
    """alpha_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t) of a noise schedule, t = -1 the clean image,
    and the conversions between a model's output, its clean-image estimate and its noise estimate."""

    def __init__(self, schedule, device: torch.device):
        alpha_bar = torch.cat([torch.ones(1), schedule.alphas_cumprod.float()]).to(device)  # index t + 1
        self.alpha, self.sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        self.prediction_type = schedule.config.prediction_type

    def at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) timesteps -> alpha_t, sigma_t shaped (B, 1, 1, 1)."""
        return self.alpha[t + 1][:, None, None, None], self.sigma[t + 1][:, None, None, None]

    def estimates(self, output, z, t) -> tuple[torch.Tensor, torch.Tensor]:
        """A model's output at noisy images z, timesteps t -> (x0, noise), as DDIM reads them."""
        a, s = self.at(t)
        if self.prediction_type == "v_prediction":
            return a * z - s * output, s * z + a * output
        if self.prediction_type == "epsilon":
            return (z - s * output) / a, output
        if self.prediction_type == "sample":
            return output, (z - a * output) / s
        raise CheckpointError(
            f"prediction_type {self.prediction_type!r}: expected epsilon, v_prediction or sample"
        )

    def output_for(self, x0, z, t) -> torch.Tensor:
        """The model output whose clean-image estimate at (z, t) is x0: the inverse of `estimates`."""
        a, s = self.at(t)
        if self.prediction_type == "v_prediction":
            return (a * z - x0) / s
        if self.prediction_type == "epsilon":
            return (z - a * x0) / s
        return x0

    def ddim_step(self, output, z, t, s) -> torch.Tensor:
        """One deterministic DDIM step from t to s (B,), x0 clipped to [-1, 1] as the samplers clip it."""
        x0, noise = self.estimates(output, z, t)
        a, sigma = self.at(s)
        return a * x0.clamp(-1, 1) + sigma * noise


def distill_loss(
    student,
    teacher,
    trajectory: Trajectory,
    grid: torch.Tensor,
    images: torch.Tensor,
    judge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The student's loss on real `images` (B, C, H, W) in [-1, 1]; `student` and `teacher` map a noisy batch
    and its timesteps (x, t) to the network's output, the condition bound in (`segdiff.model.unet.denoise`).

    Each example takes a random student step (a row of `grid`, from `segments`), is noised to its start, and
    is carried to its end by the teacher's k DDIM steps; the student is regressed, in its own parametrisation
    (v-prediction: the SNR+1 weighting on x0), onto the output whose single DDIM step lands there too.
    `judge(images, estimates)`, when given, adds its term on the student's clean-image estimates
    (`segdiff.train.adversarial`).
    """
    path = grid.to(images.device)[torch.randint(0, grid.shape[0], (images.shape[0],), device=images.device)]
    start, end = path[:, 0], path[:, -1]
    a, s = trajectory.at(start)
    z = a * images + s * torch.randn_like(images)
    with torch.no_grad():
        target = z
        for j in range(path.shape[1] - 1):
            output = teacher(target, path[:, j]).float()
            target = trajectory.ddim_step(output, target, path[:, j], path[:, j + 1])
        # The x0 whose DDIM step start -> end lands on the teacher's image:
        # target = a_end x0 + s_end (z - a x0) / s  =>  x0 = (target - (s_end / s) z) / (a_end - (s_end / s) a)
        a_end, s_end = trajectory.at(end)
        ratio = s_end / s
        x0 = (target - ratio * z) / (a_end - ratio * a)
        wanted = trajectory.output_for(x0, z, start)
    prediction = student(z, start).float()
    loss = torch.nn.functional.mse_loss(prediction, wanted)
    if judge is None:
        return loss
    return loss + judge(images, trajectory.estimates(prediction, z, start)[0])
