from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from segdiff.data.layout import SegDataset, find_cases, read_image, read_mask, segtypes
from segdiff.data.masks import Palette
from segdiff.errors import DataLayoutError, MaskError


def write_layout(root: Path, names=("a.png", "b.png", "c.png"), size=16, segtype="all", channels=1):
    """A small data set in the original layout; the mask of case i is a square of class (i % 3) + 1."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        (root / "img" / split).mkdir(parents=True, exist_ok=True)
        (root / "seg" / segtype / split).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            pixels = rng.integers(0, 256, (size, size) if channels == 1 else (size, size, 3), dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(root / "img" / split / name)
            mask = np.zeros((size, size), np.uint8)
            mask[2:8, 2:8] = i % 3 + 1
            PIL.Image.fromarray(mask).save(root / "seg" / segtype / split / name)
    return root / "img", root / "seg"


def test_dataset_pairs_images_and_masks(tmp_path):
    img_dir, seg_dir = write_layout(tmp_path)
    data = SegDataset(img_dir, seg_dir, "train", img_size=16, num_classes=4)
    assert len(data) == 3
    item = data[1]
    assert item["name"] == "b.png"
    assert item["image"].shape == (1, 16, 16) and item["image"].min() >= -1 and item["image"].max() <= 1
    source = np.asarray(PIL.Image.open(img_dir / "train" / "b.png"), np.float32)
    assert np.allclose(item["image"][0].numpy(), source / 127.5 - 1, atol=1e-6)
    assert item["mask"].dtype.is_floating_point is False and set(item["mask"].unique().tolist()) == {0, 2}


def test_dataset_resizes_images_bilinear_and_masks_nearest(tmp_path):
    img_dir, seg_dir = write_layout(tmp_path, size=16, channels=3)
    data = SegDataset(img_dir, seg_dir, "val", img_size=8, img_channels=3, num_classes=4)
    assert data[0]["image"].shape == (3, 8, 8)
    assert set(data[0]["mask"].unique().tolist()) == {0, 1}  # nearest: no blended ids


def test_segtypes_merge_in_sorted_order_first_nonzero_wins(tmp_path):
    img_dir, seg_dir = write_layout(tmp_path, segtype="b_vessels")
    write_layout(tmp_path, segtype="a_breast")
    for name in ("a.png", "b.png", "c.png"):
        full = np.full((16, 16), 3, np.uint8)
        PIL.Image.fromarray(full).save(seg_dir / "a_breast" / "train" / name)
    assert segtypes(seg_dir) == ["a_breast", "b_vessels"]
    data = SegDataset(img_dir, seg_dir, "train", img_size=16, num_classes=4)
    assert (data[0]["mask"] == 3).all()  # a_breast comes first and is non-zero everywhere


def test_unmatched_names_are_listed(tmp_path):
    img_dir, seg_dir = write_layout(tmp_path)
    for extra in ("x1.png", "x2.png"):
        PIL.Image.new("L", (16, 16)).save(img_dir / "train" / extra)
    with pytest.raises(DataLayoutError, match=r"2 file\(s\) in .*img/train have no match .*x1.png, x2.png"):
        find_cases(img_dir, seg_dir, "train")


def test_missing_and_empty_folders(tmp_path):
    img_dir, seg_dir = write_layout(tmp_path)
    with pytest.raises(DataLayoutError, match="nowhere.*no such mask folder"):
        find_cases(img_dir, tmp_path / "nowhere", "train")
    for f in (img_dir / "test").iterdir():
        f.unlink()
    with pytest.raises(DataLayoutError, match="img/test: the image folder is empty"):
        find_cases(img_dir, seg_dir, "test")
    (seg_dir / "all" / "val").rename(seg_dir / "all" / "validation")
    with pytest.raises(DataLayoutError, match="all/val: missing mask folder"):
        find_cases(img_dir, seg_dir, "val")


def test_mask_values_out_of_range_name_file_and_value(tmp_path):
    img_dir, seg_dir = write_layout(tmp_path)
    bad = np.zeros((16, 16), np.uint8)
    bad[0, 0] = 9
    PIL.Image.fromarray(bad).save(seg_dir / "all" / "train" / "c.png")
    with pytest.raises(MaskError, match=r"all/train/c.png: pixel value 9, expected class ids 0..3"):
        SegDataset(img_dir, seg_dir, "train", img_size=16, num_classes=4)


def test_corrupt_files_are_named(tmp_path):
    img_dir, seg_dir = write_layout(tmp_path)
    (img_dir / "train" / "b.png").write_bytes(b"not a png at all")
    with pytest.raises(DataLayoutError, match=r"img/train/b.png: cannot read the image"):
        SegDataset(img_dir, seg_dir, "train", img_size=16, num_classes=4)


def test_file_manager_litter_is_not_a_case(tmp_path):
    img_dir, seg_dir = write_layout(tmp_path)
    for litter in ("Thumbs.db", "desktop.ini", ".DS_Store"):
        (img_dir / "train" / litter).write_bytes(b"\0")
    assert [case.name for case in find_cases(img_dir, seg_dir, "train")] == ["a.png", "b.png", "c.png"]


def test_a_mask_of_another_shape_than_its_image_is_refused_and_a_scaled_copy_is_not(tmp_path):
    img_dir, seg_dir = write_layout(tmp_path, size=16)
    half = np.zeros((8, 8), np.uint8)
    half[1:4, 1:4] = 1
    PIL.Image.fromarray(half).save(seg_dir / "all" / "train" / "a.png")  # a scaled copy: lines up
    assert SegDataset(img_dir, seg_dir, "train", img_size=16, num_classes=4)[0]["mask"].sum() > 0
    PIL.Image.fromarray(np.zeros((16, 12), np.uint8)).save(seg_dir / "all" / "train" / "b.png")
    with pytest.raises(DataLayoutError, match=r"all/train/b.png: 12x16 pixels, but its image .*b.png is 16x16"):
        SegDataset(img_dir, seg_dir, "train", img_size=16, num_classes=4)


def test_deep_greyscale_images_read_where_8_bits_hold_them_and_are_refused_where_they_would_clip(tmp_path):
    low = np.arange(256, dtype=np.uint16).reshape(16, 16)  # 16-bit PNG, values 0..255: exact in 8 bits
    PIL.Image.fromarray(low).save(tmp_path / "low.png")
    assert PIL.Image.open(tmp_path / "low.png").mode.startswith("I;16")
    assert np.array_equal(read_image(tmp_path / "low.png", channels=1, size=16)[0], low.astype(np.uint8))
    PIL.Image.fromarray(low * 16).save(tmp_path / "ct.png")  # 12-bit values: would turn white
    clipped = r"ct.png: I;16\S* pixels with values 0..4080, expected 0..255: .*Window the image"
    with pytest.raises(DataLayoutError, match=clipped):
        read_image(tmp_path / "ct.png", channels=1, size=16)
    PIL.Image.fromarray(low.astype(np.float32) / 255).save(tmp_path / "float.tiff")  # floats in [0, 1], as .npy
    assert np.array_equal(read_image(tmp_path / "float.tiff", channels=1, size=16)[0], low.astype(np.uint8))
    PIL.Image.fromarray(low.astype(np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(DataLayoutError, match=r"float.tiff: F pixels with values 0..255, expected \[0, 1\]"):
        read_image(tmp_path / "float.tiff", channels=1, size=16)


def test_npy_images_need_the_declared_channels(tmp_path):
    np.save(tmp_path / "five.npy", np.random.default_rng(0).random((5, 12, 12), dtype=np.float32))
    image = read_image(tmp_path / "five.npy", channels=5, size=6)
    assert image.shape == (5, 6, 6) and image.dtype == np.float32
    with pytest.raises(
        DataLayoutError, match=r"five.npy: array of shape \(5, 12, 12\), expected \(3, H, W\)"
    ):
        read_image(tmp_path / "five.npy", channels=3, size=6)
    np.save(tmp_path / "hot.npy", np.full((5, 4, 4), 40.0, np.float32))
    with pytest.raises(DataLayoutError, match="expected uint8 or floats in"):
        read_image(tmp_path / "hot.npy", channels=5, size=4)


def test_read_mask_accepts_integer_palette_and_npy(tmp_path):
    palette = Palette.default(4)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 1:4], mask[2:6, 5:7] = 1, 3
    PIL.Image.fromarray(mask).save(tmp_path / "ids.png")
    PIL.Image.fromarray(palette.to_rgb(mask)).save(tmp_path / "colours.png")
    indexed = PIL.Image.fromarray(mask, mode="L").convert("P")
    indexed.putdata(mask.flatten().tolist())
    indexed.save(tmp_path / "indexed.png")
    np.save(tmp_path / "ids.npy", mask.astype(np.int32))
    for name in ("ids.png", "colours.png", "indexed.png", "ids.npy"):
        assert np.array_equal(read_mask(tmp_path / name, 4, palette), mask), name
    assert read_mask(tmp_path / "ids.png", 4, size=16).shape == (16, 16)
    with pytest.raises(MaskError, match="ids.png: pixel value 3, expected class ids 0..2"):
        read_mask(tmp_path / "ids.png", 3)
