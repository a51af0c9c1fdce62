"""Phantom data sets: the original layout, every class in every case, images more than their masks."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segdiff.cli.phantoms import main
from segdiff.data.phantoms import FAMILIES, SPLITS, make_case, write_dataset

COUNTS = {"train": 5, "val": 2, "test": 2}


def _write(root, family="breast", seed=0, size=32):
    return write_dataset(root, family=family, size=size, n_train=COUNTS["train"], n_val=COUNTS["val"],
                         n_test=COUNTS["test"], seed=seed)


def _files(root):
    return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_writes_original_layout_with_every_class_in_every_case(tmp_path, family):
    root = _write(tmp_path / "data", family)
    num_classes = FAMILIES[family].num_classes
    info = json.loads((root / "classes.json").read_text())
    assert info == {"family": family, "class_names": list(FAMILIES[family].class_names),
                    "num_classes": num_classes}
    assert info["class_names"][0] == "background"

    seen = []
    for split in SPLITS:
        images = sorted(p.name for p in (root / "img" / split).iterdir())
        masks = sorted(p.name for p in (root / "mask" / "all" / split).iterdir())
        assert images == masks and len(images) == COUNTS[split]
        seen += images
        for name in images:
            with Image.open(root / "img" / split / name) as image, \
                    Image.open(root / "mask" / "all" / split / name) as mask:
                assert image.mode == mask.mode == "L" and image.size == mask.size == (32, 32)
                assert set(np.unique(np.asarray(mask))) == set(range(num_classes))
    assert len(set(seen)) == len(seen)  # names unique across splits
    assert not list(root.rglob("*.tmp"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_image_is_not_a_lookup_table_of_the_mask(family):
    rng = np.random.default_rng(0)
    (image_a, mask_a), (image_b, mask_b) = make_case(family, 64, rng), make_case(family, 64, rng)
    assert not np.array_equal(mask_a, mask_b) and not np.array_equal(image_a, image_b)
    for class_id in range(FAMILIES[family].num_classes):
        values = image_a[mask_a == class_id].astype(float)
        # texture, bias field and noise spread a class over many grey levels
        assert np.unique(values).size > 5 and values.std() > 2
    # and the same class sits at a different level in another case (patient and protocol vary)
    means_a = [image_a[mask_a == c].mean() for c in range(1, FAMILIES[family].num_classes)]
    means_b = [image_b[mask_b == c].mean() for c in range(1, FAMILIES[family].num_classes)]
    assert not np.allclose(means_a, means_b, atol=1)


def test_breast_contrast_vessels_brightest_dense_tissue_darker_than_breast():
    rng = np.random.default_rng(1)
    names = FAMILIES["breast"].class_names
    for _ in range(8):
        image, mask = make_case("breast", 64, rng)
        mean = {name: image[mask == i].mean() for i, name in enumerate(names)}
        assert mean["vessels"] > mean["breast"] > mean["background"]
        assert mean["fibroglandular"] < mean["breast"]
        assert mean["fibroglandular"] > mean["background"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("size", [16, 96])
def test_every_class_survives_small_and_odd_sizes(family, size):
    rng = np.random.default_rng(2)
    for _ in range(3):
        image, mask = make_case(family, size, rng)
        assert image.shape == mask.shape == (size, size) and image.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask)) == set(range(FAMILIES[family].num_classes))


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    first, again, other = (_files(_write(tmp_path / name, seed=seed))
                           for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[p] != other[p] for p in first if p.suffix == ".png")


def test_refuses_to_mix_with_an_earlier_data_set(tmp_path):
    root = _write(tmp_path / "data")
    before = _files(root)
    with pytest.raises(FileExistsError, match="img"):
        _write(root, seed=1)
    assert _files(root) == before


def test_cli_writes_and_reports(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--family", "ct", "--size", "32", "--n-train", "2", "--n-val", "1",
          "--n-test", "1", "--seed", "3"])
    assert str(tmp_path / "cli") in capsys.readouterr().out
    assert len(list((tmp_path / "cli" / "mask" / "all" / "train").iterdir())) == 2


@pytest.mark.parametrize("args, named", [
    (["--size", "8"], "8"),
    (["--size", "4096"], "4096"),
    (["--n-train", "-1"], "-1"),
    (["--family", "knee"], "knee"),
    (["--n-train", "0", "--n-val", "0", "--n-test", "0"], "nothing"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, args, named):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_module_entry_point_exits_2_on_bad_size(tmp_path):
    result = subprocess.run([sys.executable, "-m", "segdiff.phantoms", str(tmp_path / "out"), "--size", "8"],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert result.returncode == 2 and "--size 8" in result.stderr
