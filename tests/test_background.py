"""The constant background outside the field of view: found in drawn images, set exactly, anatomy untouched."""

import dataclasses
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from segdiff import CheckpointError, SegDiffPipeline
from segdiff.cli.quality import main
from segdiff.model.background import Background, background_value
from segdiff.model.card import ModelCard


def scan(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 64 px ultrasound-like image in [0, 1] and its mask: a bright disc (the field of view) on a grainy
    dark field, a dark hole inside the disc, and a dark class-1 blob reaching from the disc to the border."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    image = rng.uniform(0, 10 / 255, (64, 64))  # the field: grain a few grey levels deep
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 < 20**2
    image[disc] = rng.uniform(0.4, 0.8, disc.sum())
    hole = (yy - 32) ** 2 + (xx - 32) ** 2 < 5**2  # dark tissue enclosed by bright tissue
    image[hole] = 2 / 255
    mask = np.zeros((64, 64), np.int64)
    mask[28:36, 40:64] = 1  # a class drawn dark, touching the border
    image[28:36, 52:64] = 3 / 255
    return image, mask


def test_the_field_is_set_exactly_and_nothing_else_is_touched():
    image, mask = scan()
    background = Background(value=1 / 255, below=16 / 255, smooth=1.0, guard=2)
    out = background.apply(torch.from_numpy(image)[None, None].float(), torch.from_numpy(mask)[None])[0, 0].numpy()
    changed = out != image.astype(np.float32)
    assert (out[:4] == np.float32(1 / 255)).all() and (out[:, :4][mask[:, :4] == 0] == np.float32(1 / 255)).all()
    yy, xx = np.mgrid[:64, :64]
    inside = (yy - 32) ** 2 + (xx - 32) ** 2 < 19**2
    assert not changed[inside].any(), "the field of view, its enclosed dark hole included, is untouched"
    near_class = np.zeros_like(mask, bool)
    near_class[26:38, 38:64] = True
    assert not changed[near_class].any(), "the mask's classes and their guard band keep their pixels"
    assert changed.mean() > 0.5


def test_without_a_mask_only_the_border_connected_dark_field_changes():
    image, _ = scan(1)
    out = Background(value=0.0, below=16 / 255, smooth=1.0, guard=2).apply(torch.from_numpy(image)[None, None])
    out = out[0, 0].numpy()
    assert out[0, 0] == 0 and out[32, 32] == image[32, 32]  # the hole is dark but enclosed
    assert (out[28:36, 60:64] == 0).all()  # the dark blob reaches the border: with no mask it is field


def test_every_channel_and_every_image_of_a_batch_gets_its_own_field():
    a, _ = scan(2)
    b = np.full((64, 64), 0.5)  # no field at all
    images = torch.from_numpy(np.stack([a, b]))[:, None].expand(2, 3, 64, 64).float()
    out = Background(value=0.0).apply(images)
    assert (out[0, :, 0, 0] == 0).all() and torch.equal(out[1], images[1])


def test_the_value_is_the_most_common_border_intensity():
    images = np.full((3, 16, 16), 200, np.uint8)
    images[:, :, :3] = 1
    images[:, :3] = 1
    assert background_value(images) == pytest.approx(1 / 255)


@pytest.mark.parametrize(
    "record", [{"value": 2.0}, {"below": -0.1}, {"smooth": -1}, {"guard": -2}, {"threshold": 0.1}]
)
def test_a_damaged_record_is_refused_when_the_card_is_read(record):
    with pytest.raises(CheckpointError, match="background"):
        ModelCard(num_classes=3, img_channels=1, img_size=32, background=record)


def test_the_pipeline_draws_the_cards_background_unless_asked_not_to(tmp_path, small_model_dir):
    pipe = SegDiffPipeline.from_pretrained(small_model_dir)
    mask = np.zeros((32, 32), np.int64)
    mask[10:20, 10:20] = 2

    def draw(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return pipe(mask, num_inference_steps=2, generator=generator, output_type="pt", **kwargs).images

    raw = draw()
    # a record whose threshold takes every pixel darker than the image's brightest as possible field
    pipe.card = dataclasses.replace(pipe.card, background={"value": 0.0, "below": 1.0, "smooth": 0, "guard": 1})
    pipe.save_pretrained(tmp_path / "with-background")
    reopened = SegDiffPipeline.from_pretrained(tmp_path / "with-background")
    assert reopened.card.backdrop == Background(0.0, 1.0, 0, 1)
    pipe = reopened
    cleaned, kept = draw(), draw(exact_background=False)
    assert torch.equal(kept, raw)
    guard = np.zeros((32, 32), bool)
    guard[9:21, 9:21] = True
    assert (cleaned[0, 0][torch.from_numpy(~guard)] == 0).all()
    assert torch.equal(cleaned[0, 0][torch.from_numpy(guard)], raw[0, 0][torch.from_numpy(guard)])


def train_images(img_dir, n: int = 3, size: int = 40):
    """IMG_DIR/train/ of `n` PNGs: bright grain inside a 6 px frame of grey level 1, as a scanner's field."""
    rng = np.random.default_rng(0)
    (img_dir / "train").mkdir(parents=True)
    for i in range(n):
        image = np.full((size, size), 1, np.uint8)
        image[6:-6, 6:-6] = rng.integers(100, 200, (size - 12, size - 12))
        PIL.Image.fromarray(image).save(img_dir / "train" / f"case_{i}.png")
    return img_dir


def test_the_background_command_records_the_scans_value_and_off_removes_it(tmp_path, small_model_dir, capsys):
    model = shutil.copytree(small_model_dir, tmp_path / "model")  # the session's folder stays as it is
    img_dir = train_images(tmp_path / "img")
    main(["background", "--model", str(model), "--img_dir", str(img_dir), "--below", "20", "--smooth", "1.5",
          "--guard", "3"])  # fmt: skip
    said = capsys.readouterr().out
    assert "value 1/255" in said and "exact_background=False" in said
    assert ModelCard.load(model).backdrop == Background(1 / 255, 20 / 255, 1.5, 3)
    assert SegDiffPipeline.from_pretrained(model).card.backdrop == Background(1 / 255, 20 / 255, 1.5, 3)
    main(["background", "--model", str(model), "--off"])
    assert ModelCard.load(model).background == {} and "removed" in capsys.readouterr().out


def test_a_cascades_background_goes_into_its_upscalers_card_only(tmp_path, small_model_dir):
    top = tmp_path / "cascade"
    shutil.copytree(small_model_dir, top / "base")
    upscale = {"base": "base", "low_res_size": 32}
    ModelCard(num_classes=3, img_channels=1, img_size=64, upscale=upscale).save(top)  # the card is all it reads
    main(["background", "--model", str(top), "--img_dir", str(train_images(tmp_path / "img", size=80))])
    assert ModelCard.load(top).backdrop == Background(value=1 / 255)  # the flags' defaults are the record's
    assert ModelCard.load(top / "base").background == {}


@pytest.mark.parametrize("damage", ["no images", "empty", "not a model", "no model"])
def test_the_background_command_fails_in_one_line_naming_the_folder(tmp_path, small_model_dir, capsys, damage):
    model = shutil.copytree(small_model_dir, tmp_path / "model")
    img_dir = tmp_path / "img"
    if damage == "empty":
        (img_dir / "train").mkdir(parents=True)
    elif damage != "no images":
        train_images(img_dir)
    if damage == "not a model":
        (model / "segdiff_card.json").unlink()
    elif damage == "no model":
        model = tmp_path / "nothing"
    with pytest.raises(SystemExit) as ended:
        main(["background", "--model", str(model), "--img_dir", str(img_dir)])
    err = capsys.readouterr().err.strip()
    assert ended.value.code == 2 and err.startswith("error: ") and "\n" not in err
    assert str(model if damage in ("not a model", "no model") else img_dir / "train") in err
    if damage in ("no images", "empty"):
        assert ModelCard.load(model).background == {}  # nothing written
