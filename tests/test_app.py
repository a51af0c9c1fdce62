"""The studio's named API endpoints through gradio_client, against the app launched in this process."""

import numpy as np
import PIL.Image
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import app

FAST = dict(steps=3, num_images=2)
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def client(studio_url):
    return Client(studio_url, verbose=False)


@pytest.fixture
def mask_png(tmp_path, mask):
    path = tmp_path / "mask.png"
    PIL.Image.fromarray(mask.astype(np.uint8)).save(path)
    return path


def images_of(gallery):
    return [np.asarray(PIL.Image.open(item["image"])) for item in gallery]


def generate(client, path, **settings):
    return client.predict(mask=handle_file(str(path)), **{**FAST, "seed": 1, **settings}, api_name="/generate")


def test_generate_returns_images_with_their_settings(client, mask_png):
    gallery, settings, archive = generate(client, mask_png, seed=5, omit=["vessels"])
    images = images_of(gallery)
    assert len(images) == 2 and images[0].shape == (64, 64)
    assert [item["caption"] for item in gallery] == ["seed 5", "seed 6"]
    assert settings["omit"] == ["vessels"] and settings["seeds"] == [5, 6] and settings["model"] == "tiny-breast"
    assert archive.endswith(".zip")


def test_same_seed_same_image_and_omission_changes_it(client, mask_png):
    first = images_of(generate(client, mask_png, seed=9)[0])
    again = images_of(generate(client, mask_png, seed=9)[0])
    omitted = images_of(generate(client, mask_png, seed=9, omit=["breast"])[0])
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], omitted[0])


def test_sweep_returns_the_labelled_grid(client, mask_png):
    gallery, settings, _ = client.predict(
        mask=handle_file(str(mask_png)), seed=2, steps=3, api_name="/sweep"
    )
    captions = [item["caption"] for item in gallery]
    assert captions == ["all classes kept", "without breast", "without vessels", "without fibroglandular tissue"]
    images = images_of(gallery)
    assert not np.array_equal(images[0], images[2])
    assert settings["kind"] == "sweep" and settings["variants"][2] == ["vessels"]


def test_bad_upload_is_an_error_naming_it_and_the_server_keeps_serving(client, mask_png, tmp_path, mask):
    PIL.Image.fromarray((mask * 60).astype(np.uint8)).save(tmp_path / "scan.png")  # a grey image, not ids
    with pytest.raises(AppError, match=r"scan\.png: pixel value 60, expected class ids 0\.\.3"):
        generate(client, tmp_path / "scan.png")
    (tmp_path / "broken.npy").write_bytes(b"not an array")
    with pytest.raises(AppError, match=r"broken\.npy: cannot read"):
        generate(client, tmp_path / "broken.npy")
    with pytest.raises(AppError, match=r"500.*100"):  # the slider refuses it before the studio does
        generate(client, mask_png, steps=500)
    gallery, _, _ = generate(client, mask_png)
    assert len(images_of(gallery)) == 2


def test_wrong_size_mask_is_resized_with_a_notice(client, tmp_path, mask):
    PIL.Image.fromarray(np.kron(mask, np.ones((3, 3), np.int64)).astype(np.uint8)).save(tmp_path / "big.png")
    gallery, settings, _ = generate(client, tmp_path / "big.png", num_images=1)
    assert len(gallery) == 1
    assert any("big.png: 192x192 px resized (nearest)" in n for n in settings["notices"])


def test_missing_model_fails_at_start_with_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "no model folder at" in capsys.readouterr().err
