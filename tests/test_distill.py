"""Few-step students: a tiny teacher distilled for a few dozen steps saves its student beside it, reopens, is
drawn at the defaults and skipped when steps are asked for, lands nearer its teacher than the teacher's own
few steps do, keeps omit and SDEdit, resumes exactly, and bad settings are refused in one line."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from conftest import sdedit_distance
from safetensors.torch import load_file
from test_training import config, steps_logged, write_data

import train_cli
from segdiff import CheckpointError, ConfigError, SegDiffPipeline
from segdiff.train.adversarial import Adversary, Critic, critic_optimizer
from segdiff.train.loop import train

LEARN = dict(train_batch_size=8, learning_rate=3e-3, lr_warmup_steps=5, checkpointing_steps=1000)
DISTILL = dict(student_steps=2, teacher_steps=4, train_batch_size=8, learning_rate=1e-3, lr_warmup_steps=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), size=32, counts=(16, 4, 4))


@pytest.fixture(scope="module")
def models(tmp_path_factory, data):
    """(teacher folder, folder of the teacher with its 2-step student): 32 px, briefly trained and distilled."""
    root = tmp_path_factory.mktemp("distill")
    teacher, student = root / "teacher", root / "teacher-student"
    train(config(teacher, data, max_train_steps=60, ablate=True, **LEARN))
    train(
        config(
            student, data, distill_from=str(teacher), max_train_steps=40, checkpointing_steps=1000, **DISTILL
        )
    )
    return teacher, student


def mask32() -> np.ndarray:
    mask = np.zeros((32, 32), np.int64)
    mask[4:28, 4:14] = 1
    mask[8:24, 18:30] = 2
    return mask


def draw(pipe, **kwargs) -> np.ndarray:
    steps = []
    images = pipe(
        mask32(),
        batch_size=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        callback=lambda i, n: steps.append(n),
        **kwargs,
    ).images
    return images, steps[-1]


def test_the_student_lives_with_its_teacher_and_draws_at_the_defaults(models):
    teacher_dir, folder = models
    card = SegDiffPipeline.from_pretrained(folder, device="cpu").card
    assert (card.distilled.steps, card.distilled.teacher_steps) == (2, 4)
    assert card.distilled.method == "progressive distillation"
    assert card.student["training"]["teacher"] == str(teacher_dir) and card.student["training"]["finished"]
    assert (folder / "student" / "diffusion_pytorch_model.safetensors").is_file()
    # The teacher is copied as it was: its weights and its own training record.
    ours, theirs = (
        load_file(f / "unet" / "diffusion_pytorch_model.safetensors") for f in (folder, teacher_dir)
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert card.training["steps"] == 60

    pipe = SegDiffPipeline.from_pretrained(folder, device="cpu")
    assert pipe.student is not None
    student_images, student_steps = draw(pipe)
    teacher_images, teacher_steps = draw(pipe, num_inference_steps=12)
    assert (student_steps, teacher_steps) == (2, 12)  # asking for steps (or a sampler) uses the teacher
    assert draw(pipe, sampler="dpm++")[1] == 12
    teacher_only = SegDiffPipeline.from_pretrained(teacher_dir, device="cpu")
    np.testing.assert_array_equal(teacher_images, draw(teacher_only, num_inference_steps=12)[0])
    assert not np.array_equal(student_images, draw(teacher_only)[0])


def test_the_student_lands_nearer_its_teachers_many_steps_than_the_teachers_few(models):
    """What distillation is for: the student's 2 steps approximate the teacher's 4 on the same grid better
    than 2 of the teacher's own steps do."""
    pipe = SegDiffPipeline.from_pretrained(models[1], device="cpu")

    def teacher_on_the_students_grid(steps: int) -> np.ndarray:
        card = dataclasses.replace(pipe.card, student={"steps": steps, "teacher_steps": 4})
        return draw(SegDiffPipeline(pipe.unet, pipe.scheduler, card, student=pipe.unet))[0]

    target = teacher_on_the_students_grid(4)
    student = draw(pipe)[0]
    assert np.abs(student - target).mean() < np.abs(teacher_on_the_students_grid(2) - target).mean()


def test_omit_and_sdedit_work_with_the_student(models):
    pipe = SegDiffPipeline.from_pretrained(models[1], device="cpu")
    mask = mask32()
    kwargs = dict(batch_size=2, output_type="np")
    omitted = pipe(mask, omit=[2], generator=torch.Generator().manual_seed(1), **kwargs).images
    without = pipe(np.where(mask == 2, 0, mask), generator=torch.Generator().manual_seed(1), **kwargs).images
    np.testing.assert_array_equal(omitted, without)

    start = torch.zeros(1, 1, 32, 32)
    start[..., 16:] = 1.0

    assert sdedit_distance(pipe, mask, start, 0.5) < sdedit_distance(pipe, mask, start, 1.0)


def test_distillation_resumes_exactly(tmp_path, data, models):
    settings = dict(
        distill_from=str(models[0]), checkpointing_steps=3, checkpoints_total_limit=None, ema=True
    )
    settings.update(DISTILL, max_train_steps=5, train_batch_size=4)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(config(full, data, **settings))
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    train(config(resumed, data, resume=True, **settings))
    assert steps_logged(resumed) == [4, 5]
    for name in ("checkpoint-5/model.safetensors", "student/diffusion_pytorch_model.safetensors"):
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_bad_distillation_settings_are_refused(tmp_path, data, models, capsys):
    teacher = str(models[0])
    with pytest.raises(ConfigError, match=r"--student_steps 3: .* a divisor of --teacher_steps 4"):
        train(config(tmp_path / "a", data, distill_from=teacher, student_steps=3, teacher_steps=4))
    with pytest.raises(
        ConfigError, match=r"segmentation-guided model; distilling it needs --segmentation_guided"
    ):
        train(config(tmp_path / "b", data, distill_from=teacher, seg_dir=None, num_classes=0))
    with pytest.raises(CheckpointError, match=r"num_classes=4, but its card says 3"):
        train(config(tmp_path / "c", data, distill_from=teacher, num_classes=4))
    with pytest.raises(CheckpointError, match="no such model folder"):
        train(config(tmp_path / "d", data, distill_from=str(tmp_path / "nowhere")))

    img_dir, seg_dir = data
    code = train_cli.main([
        "--mode", "distill", "--model_dir", teacher, "--img_dir", str(img_dir), "--seg_dir", str(seg_dir),
        "--segmentation_guided", "--num_segmentation_classes", "3", "--student_steps", "5",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err == "error: --student_steps 5: each student step stands for a whole number of teacher steps; " \
        "expected a divisor of --teacher_steps 12"  # fmt: skip


def test_the_cli_writes_the_student_beside_a_copy_of_its_teacher(tmp_path, data, models):
    teacher = tmp_path / "run"
    shutil.copytree(models[0], teacher, ignore=shutil.ignore_patterns("checkpoint-*"))
    img_dir, seg_dir = data
    code = train_cli.main([
        "--mode", "distill", "--model_dir", str(teacher), "--img_dir", str(img_dir), "--seg_dir", str(seg_dir),
        "--segmentation_guided", "--num_segmentation_classes", "3", "--teacher_steps", "4",
        "--max_train_steps", "2", "--train_batch_size", "4", "--save_image_epochs", "1",
        "--adversarial_weight", "0.5",
    ])  # fmt: skip
    assert code == 0
    out = tmp_path / "run-student"
    pipe = SegDiffPipeline.from_pretrained(out, device="cpu")
    assert pipe.card.distilled.steps == 2 and (out / "samples").is_dir()
    assert pipe.card.distilled.method == "progressive distillation with a patch critic"
    assert not (teacher / "student").exists()  # the teacher's own folder is left as it was


def snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def distill_flags(teacher, out, data, *flags) -> list[str]:
    img_dir, seg_dir = data
    return [
        "--mode", "distill", "--model_dir", str(teacher), "--output_dir", str(out), "--img_dir", str(img_dir),
        "--seg_dir", str(seg_dir), "--segmentation_guided", "--num_segmentation_classes", "3",
        "--teacher_steps", "4", "--max_train_steps", "2", "--train_batch_size", "4", *flags,
    ]  # fmt: skip


def test_a_distillation_never_writes_into_a_model_folder(tmp_path, data, models, capsys):
    """Not the teacher's own folder (bundled models have no checkpoints), not a distilled model re-distilled into
    itself, not any other model: each refused in one line, with --resume too, and every file left as it was."""
    teacher, student = models
    no_checkpoints = shutil.ignore_patterns("checkpoint-*")
    bare = shutil.copytree(teacher, tmp_path / "bare", ignore=no_checkpoints)  # as the bundled models are
    trained = shutil.copytree(teacher, tmp_path / "trained")  # with its training checkpoint
    distilled = shutil.copytree(student, tmp_path / "distilled", ignore=no_checkpoints)
    before = {folder: snapshot(folder) for folder in (bare, trained, distilled)}
    own = "the teacher's own folder (--model_dir {model}); a distillation writes a copy of its teacher"
    cases = [
        (bare, bare, [], own),
        (bare, bare, ["--resume"], own),
        (trained, trained, ["--resume"], own),  # its checkpoints are healthy, not "damaged"
        (distilled, distilled, [], own),
        (bare, bare / "student", [], "inside the teacher's folder (--model_dir {model})"),
        (bare, trained, ["--resume"], "holds a model, which distilling {model} there would replace"),
        (bare, distilled, [], f"holds a model (the student of {teacher}), which distilling {{model}} there"),
        (teacher, distilled, [], "holds a finished student of {model} and no checkpoint to continue it from"),
    ]
    for model, out, flags, message in cases:
        code = train_cli.main(distill_flags(model, out, data, *flags))
        err = capsys.readouterr().err
        expected = f"error: --output_dir {out}: {message.format(model=model)}"
        assert code == 2 and err.startswith(expected) and err.count("\n") == 1, err
    assert {folder: snapshot(folder) for folder in before} == before
    assert not (bare / "student").exists()


def test_a_checkpoint_of_another_kind_is_named_not_called_damaged(tmp_path, data, models, capsys):
    """A distillation resumed over a training run's checkpoints, and a training run over a distillation."""
    teacher, student = models
    killed = tmp_path / "killed"  # a training run stopped before it first saved its model
    shutil.copytree(teacher / "checkpoint-60", killed / "checkpoint-60")
    assert train_cli.main(distill_flags(teacher, killed, data, "--resume")) == 2
    assert capsys.readouterr().err == (
        f"error: {killed / 'checkpoint-60'}: holds a model without a student, and this run distills a student; "
        "choose another --output_dir\n"
    )
    distilled = shutil.copytree(
        student, tmp_path / "distilled", ignore=shutil.ignore_patterns("checkpoint-*")
    )
    with pytest.raises(CheckpointError, match=r"distilled: holds a model with its distilled student, and this "
                                              "run trains a model"):  # fmt: skip
        train(config(distilled, data, max_train_steps=2))
    assert not list(distilled.glob("checkpoint-*")) and (distilled / "student").is_dir()


def test_a_critic_beside_the_distillation_changes_the_student_and_resumes_exactly(tmp_path, data, models):
    settings = dict(distill_from=str(models[0]), checkpointing_steps=3, checkpoints_total_limit=None)
    settings.update(DISTILL, max_train_steps=5, train_batch_size=4)
    plain, full, resumed = tmp_path / "plain", tmp_path / "full", tmp_path / "resumed"
    train(config(plain, data, **settings))
    train(config(full, data, adversarial_weight=1.0, **settings))
    weights = "student/diffusion_pytorch_model.safetensors"
    a, b = load_file(plain / weights), load_file(full / weights)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the critic's term moved the student
    card = SegDiffPipeline.from_pretrained(full, device="cpu").card
    assert card.distilled.method == "progressive distillation with a patch critic"
    assert card.distilled.training["flags"]["adversarial_weight"] == 1.0
    # The critic and its optimiser are part of the checkpoint: a resumed run ends where the whole one did.
    assert (full / "checkpoint-3" / "model_1.safetensors").is_file()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    train(config(resumed, data, resume=True, adversarial_weight=1.0, **settings))
    assert steps_logged(resumed) == [4, 5]
    for name in ("checkpoint-5/model_1.safetensors", weights):
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(ConfigError, match=r"trained with --adversarial_weight 1, this one asks 0"):
        train(config(resumed, data, resume=True, **{**settings, "max_train_steps": 6}))


def test_the_critic_learns_to_tell_texture_from_its_average():
    """Real images with speckle against the same images smoothed: a few dozen critic steps separate them, and
    the student's term pulls its estimates toward the texture (its gradient on a smooth image is not zero)."""
    torch.manual_seed(0)
    speckled = (torch.rand(64, 1, 24, 24) * 2 - 1) * 0.5
    smooth = torch.nn.functional.avg_pool2d(speckled, 5, stride=1, padding=2)
    cond = torch.zeros(64, 2, 24, 24)
    critic = Critic(1, 2, width=8)
    adversary = Adversary(critic, critic_optimizer(critic, 2e-3), weight=1.0)
    for _ in range(60):
        drawn = smooth.clone().requires_grad_()
        term = adversary(speckled, drawn, cond)
    real_score, drawn_score = adversary.scores.tolist()
    assert real_score > drawn_score + 0.5
    term.backward()
    assert drawn.grad.abs().sum() > 0


def test_an_adversarial_weight_is_refused_outside_distillation(tmp_path, data):
    with pytest.raises(ConfigError, match=r"--adversarial_weight 0.5: a term of distillation"):
        train(config(tmp_path / "a", data, adversarial_weight=0.5))
    with pytest.raises(ConfigError, match=r"--adversarial_weight -1.0: expected a value in 0..100"):
        train(config(tmp_path / "b", data, distill_from="x", adversarial_weight=-1.0))
