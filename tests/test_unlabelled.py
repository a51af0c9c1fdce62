"""Images without masks: they load with all-background masks, train beside the labelled ones (the labelled set
repeated to its share of each epoch), resume exactly, are counted in the card, reach cascades and students,
and bad folders are refused in words."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_cli import FAST_SAMPLING, TINY, guided
from test_multiprocess import TORCHRUN, TWO, launch, ranks, summary
from test_training import config, steps_logged, write_data

import train_cli
from segdiff import SegDiffPipeline
from segdiff.data.layout import UnlabelledDataset, read_image
from segdiff.errors import DataLayoutError
from segdiff.train import loop
from segdiff.train.loop import train


def write_unlabelled(folder, n, size=32, mode="L", seed=1, prefix="u"):
    """`n` noise images named {prefix}_NNN.png in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{prefix}_{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 labelled training images (and val/test); 8 unlabelled in DIR/train/ beside an ignored DIR/val/."""
    root = tmp_path_factory.mktemp("data")
    img_dir, seg_dir = write_data(root, counts=(4, 2, 2))
    write_unlabelled(root / "unlabelled" / "train", 8)
    write_unlabelled(root / "unlabelled" / "val", 3, prefix="v")
    return img_dir, seg_dir, root / "unlabelled"


def semi(out, data, **overrides):
    img_dir, seg_dir, unlabelled = data
    settings = dict(unlabelled_dir=str(unlabelled), ablate=True, checkpointing_steps=3)
    return config(out, (img_dir, seg_dir), **{**settings, **overrides})


# ---- the data -------------------------------------------------------------------------------------------


def test_unlabelled_images_load_with_all_background_masks_from_train_or_flat(data, tmp_path):
    img_dir, _, unlabelled = data
    nested = UnlabelledDataset(unlabelled, img_dir, 16)
    assert nested.names == [f"u_{i:03d}.png" for i in range(8)]  # val/ is not read
    item = nested[3]
    expected = read_image(unlabelled / "train" / "u_003.png", 1, 16)
    assert torch.equal(item["mask"], torch.zeros(16, 16, dtype=torch.int64))
    assert torch.allclose(item["image"], torch.from_numpy(expected).float() / 127.5 - 1)
    flat = UnlabelledDataset(shutil.copytree(unlabelled / "train", tmp_path / "flat"), img_dir, 16)
    assert flat.names == nested.names and torch.equal(flat[5]["image"], nested[5]["image"])


def clash(folder, img_dir):
    shutil.copy(img_dir / "test" / "test_001.png", folder / "test_001.png")


def empty(folder, img_dir):
    shutil.rmtree(folder)
    folder.mkdir()


def larger(folder, img_dir):
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(folder / "u_002.png")


def coloured(folder, img_dir):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "u_004.png")


def corrupt(folder, img_dir):
    (folder / "u_005.png").write_bytes((folder / "u_005.png").read_bytes()[:80])  # a cut-off download


REFUSED = [
    (clash, r"test_001.png: the same file name as the labelled image .*img/test/test_001.png"),
    (empty, r"unlabelled.*: the unlabelled image folder is empty"),
    (larger, r"u_002.png: 40x40 pixels, expected the size of the labelled images in .*img/train \(32x32\)"),
    (coloured, r"u_004.png: 3 channel\(s\), expected 1 as the labelled images"),
    (corrupt, r"u_005.png: cannot read the image"),
]


@pytest.mark.parametrize(("damage", "message"), REFUSED, ids=[r[0].__name__ for r in REFUSED])
def test_bad_unlabelled_folders_are_refused_naming_the_file(data, tmp_path, damage, message):
    img_dir = data[0]
    folder = shutil.copytree(data[2] / "train", tmp_path / "unlabelled")
    damage(folder, img_dir)
    with pytest.raises(DataLayoutError, match=message):
        UnlabelledDataset(folder, img_dir, 32)


def test_the_cli_refuses_them_in_one_line_and_guided_runs_need_ablation(data, tmp_path, capsys):
    img_dir, seg_dir, unlabelled = data
    folder = shutil.copytree(unlabelled / "train", tmp_path / "unlabelled")
    clash(folder, img_dir)
    flags = [
        *guided([img_dir, seg_dir]),
        "--img_size",
        "32",
        "--preset",
        "tiny",
        "--output_dir",
        tmp_path / "run",
    ]
    for extra, message in (
        (["--unlabelled_dir", folder, "--use_ablated_segmentations"], "test_001.png: the same file name"),
        (["--unlabelled_dir", unlabelled], "add --use_ablated_segmentations"),
        (["--unlabelled_dir", unlabelled, "--labelled_fraction", "1"], "--labelled_fraction 1.0: expected"),
    ):
        assert train_cli.main([*map(str, flags), *map(str, extra)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "run" / "unet").exists()


# ---- training -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data):
    """A run on 4 labelled and 8 unlabelled images, batch 4, 2 epochs: (folder, each batch's names and the
    masks its loss was computed with)."""
    out = tmp_path_factory.mktemp("semi") / "full"
    seen = []
    objective, encode = loop._objective, loop.encode

    def recording_objective(*args):
        inner = objective(*args)

        def recorded(unet, batch):
            seen.append([batch["name"]])
            return inner(unet, batch)

        return recorded

    def recording_encode(masks, *args):
        seen[-1].append(masks.clone())
        return encode(masks, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "_objective", recording_objective)
        patch.setattr(loop, "encode", recording_encode)
        train(semi(out, data, checkpoints_total_limit=None, ema=True))
    return out, seen


def test_unlabelled_images_reach_the_loss_with_all_background_masks(full_run):
    _, seen = full_run
    # labelled_fraction 0.5: the 4 labelled images twice an epoch, the 8 unlabelled once: 16 examples, 4 steps
    assert len(seen) == 8
    expected = {**{f"train_{i:03d}.png": 2 for i in range(4)}, **{f"u_{i:03d}.png": 1 for i in range(8)}}
    for epoch in (seen[:4], seen[4:]):
        assert Counter(name for names, _ in epoch for name in names) == expected
    examples = [(name, mask) for names, masks in seen for name, mask in zip(names, masks, strict=True)]
    unlabelled = [mask for name, mask in examples if name.startswith("u_")]
    labelled = [mask for name, mask in examples if name.startswith("train_")]
    assert len(unlabelled) == 16 and all(not mask.any() for mask in unlabelled)
    kept = sum(bool(mask.any()) for mask in labelled)
    assert kept > len(labelled) // 2  # ablation keeps some classes of most


def test_the_card_counts_labelled_and_unlabelled_images(full_run, data):
    card = SegDiffPipeline.from_pretrained(full_run[0], device="cpu").card
    assert card.training["images"] == {"labelled": 4, "unlabelled": 8, "labelled_repeats": 2}
    assert card.training["flags"]["unlabelled_dir"] == str(data[2])
    assert "on 4 labelled and 8 unlabelled images" in (full_run[0] / "README.md").read_text()


def test_a_run_with_unlabelled_images_resumes_exactly(full_run, data):
    full = full_run[0]
    resumed = full.parent / "resumed"
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    train(semi(resumed, data, checkpoints_total_limit=None, ema=True, resume=True))
    assert steps_logged(resumed) == [4, 5, 6, 7, 8]
    for name in ("checkpoint-8/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):  # raw, EMA
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_plain_concatenation_and_unconditional_runs_count_every_image_once(data, tmp_path):
    train(semi(tmp_path / "plain", data, labelled_fraction=0, max_train_steps=1))
    card = SegDiffPipeline.from_pretrained(tmp_path / "plain", device="cpu").card
    assert card.training["images"] == {"labelled": 4, "unlabelled": 8, "labelled_repeats": 1}
    plain = dict(seg_dir=None, num_classes=0, ablate=False, max_train_steps=1)
    train(semi(tmp_path / "unconditional", data, **plain))
    card = SegDiffPipeline.from_pretrained(tmp_path / "unconditional", device="cpu").card
    assert card.training["images"] == {"labelled": 0, "unlabelled": 12, "labelled_repeats": 1}


def test_a_student_and_an_upscaler_train_with_unlabelled_images(full_run, data, tmp_path):
    student = tmp_path / "student"
    train(semi(student, data, distill_from=str(full_run[0]), ablate=False, student_steps=2, teacher_steps=4,
               max_train_steps=2))  # fmt: skip
    card = SegDiffPipeline.from_pretrained(student, device="cpu").card
    assert card.distilled.training["images"] == {"labelled": 4, "unlabelled": 8, "labelled_repeats": 2}
    assert card.training["images"] == {"labelled": 4, "unlabelled": 8, "labelled_repeats": 2}  # the teacher's

    img_dir, seg_dir = write_data(tmp_path / "data64", size=64, counts=(4, 2, 2))
    unlabelled = write_unlabelled(tmp_path / "unlabelled64", 4, size=64)
    base, cascade = tmp_path / "base", tmp_path / "cascade"
    train(semi(base, (img_dir, seg_dir, unlabelled), max_train_steps=1))
    train(semi(cascade, (img_dir, seg_dir, unlabelled), img_size=64, upscale_from=str(base), crop_size=32,
               max_train_steps=2))  # fmt: skip
    pipe = SegDiffPipeline.from_pretrained(cascade, device="cpu")
    assert pipe.card.training["images"] == {"labelled": 4, "unlabelled": 4, "labelled_repeats": 1}
    image = pipe(np.zeros((64, 64), np.int64), num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 1) and np.isfinite(image).all()


def test_two_processes_train_on_unlabelled_images_as_one_process_does(data, tmp_path):
    img_dir, seg_dir, unlabelled = data
    flags = ["--mode", "train", *TINY, *FAST_SAMPLING, *guided([img_dir, seg_dir]), "--num_epochs", "2",
             "--use_ablated_segmentations", "--unlabelled_dir", unlabelled,
             "--checkpointing_steps", "3"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_cli.main([*map(str, flags), "--output_dir", str(one)]) == 0  # a global batch of 4
    launched = launch(TORCHRUN, *flags, "--train_batch_size", 2, "--output_dir", two, cwd=tmp_path)
    assert ranks(launched.stdout).keys() == TWO
    one_summary, two_summary = summary(one), summary(two)
    assert one_summary.pop("RNG states") == {1} and two_summary.pop("RNG states") == {2}
    assert two_summary == one_summary and one_summary["card"] == (8, 2, True)  # 16 examples an epoch
    counts = [SegDiffPipeline.from_pretrained(r, device="cpu").card.training["images"] for r in (one, two)]
    assert counts[0] == counts[1] == {"labelled": 4, "unlabelled": 8, "labelled_repeats": 2}
