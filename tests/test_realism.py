"""Realism as the field measures it: the classifier two-sample test and the FRD wrapper, on images drawn here."""

import sys

import numpy as np
import pytest
import torch

from segdiff.errors import ArgumentError, ImageError, MissingPackageError
from segdiff.measure.realism import classifier_floor, classifier_test, frd, halves

SIZE = 24


def scans(n: int, seed: int) -> torch.Tensor:
    """(n, 1, SIZE, SIZE) in [0, 1]: a bright disc of random place and radius on a dark, speckled field."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = []
    for _ in range(n):
        cx, cy, radius = *rng.uniform(7, SIZE - 7, 2), rng.uniform(3, 6)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < radius**2
        out.append(np.clip(0.15 + 0.6 * disc + rng.normal(0, 0.05, (SIZE, SIZE)), 0, 1))
    return torch.tensor(np.stack(out)[:, None], dtype=torch.float32)


def test_the_classifier_tells_noise_from_images_and_not_one_set_from_itself():
    images, held_out = scans(96, seed=0), scans(96, seed=1)
    g = torch.Generator().manual_seed(0)
    noise, noise_held_out = (torch.rand(48, 1, SIZE, SIZE, generator=g) for _ in range(2))
    settings = dict(epochs=4, seed=0)
    assert classifier_test(noise, images[:48], noise_held_out, held_out[:48], **settings) >= 0.95
    # two halves of one set: about chance, give or take sqrt(0.25 / 96) = 0.05 on 96 held-out images
    floor = classifier_floor(images, held_out, **settings)
    assert abs(floor - 0.5) <= 0.2
    assert classifier_floor(images, held_out, **settings) == floor  # the seed fixes the answer


def test_the_classifier_reads_numpy_images_and_one_size():
    images, other = scans(16, seed=2), scans(16, seed=3)
    as_numpy = images.permute(0, 2, 3, 1).numpy()  # the pipeline's output_type="np" layout
    assert classifier_test(as_numpy, other, as_numpy, other, epochs=1) == classifier_test(
        images, other, images, other, epochs=1
    )
    larger = torch.nn.functional.interpolate(other, scale_factor=2)
    with pytest.raises(ImageError, match="one channel count and size"):
        classifier_test(images, larger, images, other, epochs=1)
    assert 0 <= classifier_test(images, larger, images, other, epochs=1, size=16) <= 1  # read at one size
    with pytest.raises(ArgumentError, match="epochs=0"):
        classifier_test(images, other, images, other, epochs=0)


def test_halves_are_disjoint_and_cover_the_set():
    images = torch.arange(7.0)[:, None, None, None].expand(7, 1, 2, 2) / 10
    a, b = halves(images, seed=4)
    seen = sorted([*a[:, 0, 0, 0].tolist(), *b[:, 0, 0, 0].tolist()])
    assert len(a) == len(b) == 3 and len(set(seen)) == 6 and set(seen) <= set(images[:, 0, 0, 0].tolist())


def test_frd_ranks_noise_farther_than_images_of_the_same_kind():
    pytest.importorskip("frd_score", reason="FRD needs frd-score and pyradiomics (requirements-test.txt)")
    pytest.importorskip("radiomics", reason="FRD needs pyradiomics: pip install pyradiomics-bhklab")
    reference, same_kind = scans(8, seed=5), scans(8, seed=6)
    noise = torch.rand(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    close, far = frd(same_kind, reference), frd(noise, reference)
    assert np.isfinite(close) and close < far
    with pytest.raises(ImageError, match="at least 2 images"):
        frd(same_kind[:1], reference)


def test_frd_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "frd_score", None)  # as if not installed: importing it fails
    with pytest.raises(MissingPackageError, match="pip install frd-score pyradiomics-bhklab"):
        frd(scans(2, seed=7), scans(2, seed=8))
