import numpy as np
import pytest
import torch

from segdiff.data.masks import (
    Palette,
    ablate,
    check_mask,
    encode,
    encoding_channels,
    labels_from_array,
    omit_classes,
    overlay,
    tile,
)
from segdiff.errors import MaskError


@pytest.fixture
def palette():
    return Palette.default(4, ["background", "breast", "vessels", "dense"])


def stripes(num_classes=4, size=16):
    mask = np.zeros((size, size), np.int64)
    for c in range(1, num_classes):
        mask[:, c * size // num_classes : (c + 1) * size // num_classes] = c
    return mask


def test_default_palette_is_distinct_opaque_and_grows_with_k():
    for k in (2, 5, 21, 40):
        palette = Palette.default(k)
        assert palette.num_classes == k
        assert len(set(palette.colors)) == k
        assert palette.colors[0] == (0, 0, 0)
    with pytest.raises(MaskError, match="3 class names"):
        Palette.default(4, ["a", "b", "c"])


def test_colour_round_trip_survives_antialiasing_and_alpha(palette):
    mask = stripes()
    rgb = palette.to_rgb(mask).astype(np.float32)
    # A painting canvas blends each stroke edge a little towards its neighbour, and leaves alpha partial.
    blurred = rgb.copy()
    blurred[:, 1:] = 0.8 * rgb[:, 1:] + 0.2 * rgb[:, :-1]
    alpha = np.full((*mask.shape, 1), 255.0)
    alpha[0] = 40  # a faint row: below the threshold, so background
    rgba = np.concatenate([blurred, alpha], axis=-1).round().astype(np.uint8)
    labels = palette.to_labels(rgba)
    expected = mask.copy()
    expected[0] = 0
    assert np.array_equal(labels, expected)


def test_photo_is_not_a_mask(palette):
    photo = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with pytest.raises(MaskError, match="far from every class colour"):
        labels_from_array(photo, palette, source="holiday.jpg")


def test_integer_images_hold_ids_directly(palette):
    mask = stripes()
    assert np.array_equal(labels_from_array(mask.astype(np.uint8), palette), mask)
    grey_rgb = np.repeat(mask.astype(np.uint8)[..., None], 3, axis=-1)
    assert np.array_equal(labels_from_array(grey_rgb, palette), mask)
    with pytest.raises(MaskError, match="2-D label map"):
        labels_from_array(np.zeros((2, 3, 4, 5), np.uint8), palette)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array([["1", "2"], ["0", "1"]]), r"dtype <U1, expected integer class ids"),
        (np.zeros((4, 4), [("id", np.int64), ("w", np.float32)]), r"dtype \[\('id', '<i8'\), .*expected integer"),
        (np.zeros((0, 0)), r"shape \(0, 0\) holds no pixels"),
        (np.ones((4, 4), np.complex64) * (1 + 2j), r"dtype complex64, expected integer class ids"),
        (np.where(np.eye(4), np.inf, 1.0), r"infinite values at 4 pixel\(s\)"),
        (np.where(np.eye(4), np.nan, 1.0), r"NaN \(not a number\) at 4 pixel\(s\)"),
        (np.where(np.eye(4), 2.5, 1.0), r"fractional value 2\.5"),
        (np.full((4, 4), 1e30), r"pixel value 1e\+30, expected integer class ids"),
    ],
    ids=["strings", "records", "empty", "complex", "infinity", "nan", "fraction", "beyond int64"],
)
def test_arrays_that_hold_no_class_ids_are_refused_by_what_they_hold(palette, array, message):
    with pytest.raises(MaskError, match=rf"^scan\.npy: {message}"):
        labels_from_array(array, palette, source="scan.npy")


def test_whole_floats_are_class_ids(palette):
    assert np.array_equal(labels_from_array(stripes().astype(np.float32), palette), stripes())


def test_snapping_to_many_colours_picks_the_nearest(palette):
    many = Palette.default(40)
    mask = np.arange(40).repeat(3).reshape(10, 12) % 40
    noisy = many.to_rgb(mask).astype(np.int32) + np.random.default_rng(1).integers(-6, 7, (10, 12, 3))
    assert np.array_equal(many.to_labels(noisy.clip(0, 255).astype(np.uint8)), mask)


def test_check_mask_names_value_and_source():
    mask = stripes()
    check_mask(mask, 4)
    mask[3, 3] = 7
    with pytest.raises(
        MaskError, match=r"case_012.png: pixel value 7, expected class ids 0..3 \(num_classes=4\)"
    ):
        check_mask(mask, 4, source="case_012.png")


def test_omit_sets_only_the_named_classes_to_background():
    mask = stripes()
    for m in (mask, torch.from_numpy(mask)):
        out = np.asarray(omit_classes(m, [2]))
        assert not (out == 2).any()
        assert np.array_equal(out[mask != 2], mask[mask != 2])
        assert (out[mask == 2] == 0).all()


def test_ablation_is_per_example_and_never_removes_background():
    masks = torch.from_numpy(stripes(num_classes=6, size=12)).expand(64, -1, -1)
    generator = torch.Generator().manual_seed(0)
    out = ablate(masks, 6, generator=generator)
    kept = [set(o.unique().tolist()) for o in out]
    assert all(0 in k for k in kept)
    assert len({frozenset(k) for k in kept}) > 8  # examples drew different removals
    removal_rate = 1 - np.mean([len(k - {0}) / 5 for k in kept])
    assert 0.3 < removal_rate < 0.7
    batchwise = ablate(masks, 6, generator=generator, per_example=False)
    assert all(torch.equal(b, batchwise[0]) for b in batchwise)
    assert torch.equal(ablate(masks, 6, p=0.0), masks)
    assert (ablate(masks, 6, p=1.0) == 0).all()


def test_encodings():
    masks = torch.from_numpy(stripes())[None]
    original = encode(masks, "original", 4)
    assert original.shape == (1, 1, 16, 16)
    # Bit for bit what ToTensor makes of an 8-bit mask image.
    assert torch.equal(original, torch.from_numpy(stripes().astype(np.uint8)).float().div(255)[None, None])
    onehot = encode(masks, "onehot", 4)
    assert onehot.shape == (1, encoding_channels("onehot", 4), 16, 16) == (1, 3, 16, 16)
    assert (
        torch.equal(onehot.argmax(1) + 1, torch.where(masks > 0, masks, 1))
        and (onehot.sum(1) == (masks > 0)).all()
    )
    assert encode(masks, "none", 4).shape == (1, 0, 16, 16)


def test_overlay_draws_class_colours_and_keeps_the_rest(palette):
    mask = np.zeros((24, 24), np.int64)
    mask[6:18, 6:18] = 2
    image = np.full((24, 24), 100, np.uint8)
    contour = overlay(image, mask, palette)
    assert contour.shape == (24, 24, 3)
    assert (contour[6, 6:18] == palette.colors[2]).all()  # the outline
    assert (contour[12, 12] == 100).all() and (contour[0, 0] == 100).all()
    tint = overlay(image, mask, palette, style="tint")
    assert not (tint[12, 12] == 100).all() and (tint[0, 0] == 100).all()


def test_tile_places_images_row_by_row():
    images = [np.full((4, 4, 3), i, np.uint8) for i in range(5)]
    grid = tile(images, columns=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert (grid[1:5, 1:5] == 0).all() and (grid[6:10, 6:10] == 4).all()
