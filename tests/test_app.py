"""The studio's named API endpoints through gradio_client, against the app launched in this process."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import CLASS_NAMES, SMALL_CLASS_NAMES
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from test_studio import at_the_defaults, save_recorded, save_student, truncate, with_segmenter

import app
from segdiff import SegDiffPipeline
from segdiff.data.masks import Palette
from segdiff.studio.actions import MAX_IMAGE_SIDE, Studio
from segdiff.studio.batching import Lane, Lanes
from segdiff.studio.registry import Models

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
    assert settings["guidance_scale"] == 1.0  # the model's own: its card records none
    _, guided, _ = generate(client, mask_png, seed=5, guidance=2.5)
    assert guided["guidance_scale"] == 2.5
    with pytest.raises(AppError, match=r"guidance_scale 40: expected a value from 1 \(none\) to 20"):
        generate(client, mask_png, guidance=40)


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


@pytest.mark.parametrize("model, size", [("tiny-breast", 64), ("tiny-small", 32)])
def test_preview_returns_one_image_of_the_model_size(client, tmp_path, model, size):
    mask = np.zeros((size, size), np.uint8)
    mask[4:-4, 4:-4] = 1
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    preview = lambda **kw: client.predict(  # noqa: E731
        mask=handle_file(str(tmp_path / "mask.png")), model=model, api_name="/preview", **{"seed": 3, **kw}
    )
    image = np.asarray(PIL.Image.open(preview()))
    assert image.shape == (size, size)
    assert np.array_equal(np.asarray(PIL.Image.open(preview())), image)  # the preview seed fixes it
    assert not np.array_equal(np.asarray(PIL.Image.open(preview(seed=4))), image)
    with pytest.raises(AppError, match=r"omit: 'tumour' is not a class"):
        preview(omit=["tumour"])


def test_live_preview_of_a_blank_or_unreadable_canvas_is_quiet(client, tmp_path, caplog):
    index = private_endpoint(client, "on_paint")
    blank = client.predict("tiny-breast", {"background": None, "layers": [], "composite": None}, CLASS_NAMES[1:], 1,
                           fn_index=index)
    assert blank is None  # nothing painted: no preview
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (512, 512, 4), dtype=np.uint8)).save(tmp_path / "noise.png")
    caplog.clear()
    noise = {"background": None, "layers": [], "composite": handle_file(str(tmp_path / "noise.png"))}
    with caplog.at_level(logging.INFO, logger="segdiff.studio"):
        kept = client.predict("tiny-breast", noise, CLASS_NAMES[1:], 1, fn_index=index)  # no error raised
    assert "value" not in kept  # an update that sets nothing: the last preview stays
    assert any("no preview: painted mask" in r.getMessage() for r in caplog.records)


def test_painted_canvases_are_held_newest_first_and_a_lost_one_is_said(client):
    editor = gr.ImageEditor()  # the browser sends each stroke's canvas; most are never asked for
    editor.blob_storage.update({str(i): i for i in range(app.KEEP_PAINTED + 10)})
    assert list(app.painted(editor)) == [str(i) for i in range(10, app.KEEP_PAINTED + 10)]
    lost = {"id": "gone", "background": None, "layers": [], "composite": None}
    with pytest.raises(AppError, match=r"canvas: the painting sent with this request is no longer on the server"):
        client.predict("tiny-breast", lost, CLASS_NAMES[1:], 1, 1, 1, "dpm++", 1, None, 1.0, False,
                       fn_index=private_endpoint(client, "on_generate"))


# ---- the model picker ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, size, names", [("tiny-breast", 64, CLASS_NAMES), ("tiny-small", 32, SMALL_CLASS_NAMES)])
def test_each_model_samples_at_its_size_and_reads_masks_in_its_palette(client, tmp_path, model, size, names):
    mask = np.zeros((size, size), np.int64)
    mask[4:-4, 4:-4] = 1
    mask[size // 2 :, size // 2 :] = len(names) - 1
    PIL.Image.fromarray(Palette.default(len(names), names).to_rgb(mask)).save(tmp_path / "coloured.png")
    gallery, settings, archive = generate(client, tmp_path / "coloured.png", model=model, omit=names[1])
    assert all(image.shape == (size, size) for image in images_of(gallery))
    assert settings["model"] == model and settings["classes"] == names and settings["omit"] == [names[1]]
    with zipfile.ZipFile(archive) as z:
        assert np.array_equal(np.asarray(PIL.Image.open(z.open("mask.png"))), mask)  # the colours read as ids


def test_an_unknown_model_is_a_clear_error_and_the_server_goes_on(client, mask_png):
    with pytest.raises(AppError, match=r"model 'tiny-huge': not one of this studio's models \['tiny-breast', 'tiny-small'\]"):
        generate(client, mask_png, model="tiny-huge")
    assert len(images_of(generate(client, mask_png)[0])) == 2  # no model named: the launch default


def test_switching_model_brings_its_canvas_palette_classes_and_examples(client):
    updates = client.predict("tiny-small", fn_index=private_endpoint(client, "switch"))
    editor, legend, keep, examples = updates[:4]
    assert editor["brush"]["colors"] == [Palette.default(3).hex(i) for i in range(3)]
    assert editor["canvas_size"] == [256, 256] and editor["brush"]["default_size"] == 3 * 8
    assert all(name in legend for name in SMALL_CLASS_NAMES)
    assert [c[0] for c in keep["choices"]] == SMALL_CLASS_NAMES[1:] and keep["value"] == SMALL_CLASS_NAMES[1:]
    assert len(examples["samples"]) == 1
    loaded = client.predict("tiny-small", 0, fn_index=private_endpoint(client, "load_example"))
    layer = np.asarray(PIL.Image.open(loaded["value"]["layers"][0]))  # the client fetched it: a local path
    assert layer.shape == (256, 256, 4) and layer[128, 128, 3] == 255  # the 32 px square, 8 x 8 per pixel
    with pytest.raises(AppError, match=r"example 1: expected a value in 0\.\.0"):
        client.predict("tiny-small", 1, fn_index=private_endpoint(client, "load_example"))


def test_the_default_model_is_the_named_one_else_the_first_found(tmp_path, tiny_model_dir, small_model_dir):
    root = tmp_path / "models"
    root.mkdir()
    (root / "b-model").symlink_to(tiny_model_dir)
    assert Models.discover(root, "psfhs-ultrasound-64").default == "b-model"
    (root / "a-model").symlink_to(small_model_dir)
    assert Models.discover(root, "psfhs-ultrasound-64").default == "a-model"
    assert Models.discover(root, "b-model").default == "b-model"
    by_path = Models.discover(root, "b-model", model=small_model_dir)
    assert by_path.default == "tiny-small" and by_path.names == ["a-model", "b-model", "tiny-small"]
    # The studio opens on the bundled 256 px cascade; the 64 px models stay in the picker.
    assert app.DEFAULT_MODEL == "psfhs-ultrasound-256" and (app.MODELS / app.DEFAULT_MODEL).is_dir()
    bundled = Models.discover(app.MODELS, app.DEFAULT_MODEL)
    assert {"psfhs-ultrasound-256", "psfhs-ultrasound-64", "phantom-breast-64"} <= set(bundled.names)


def test_wrong_size_mask_is_resized_with_a_notice(client, tmp_path, mask):
    PIL.Image.fromarray(np.kron(mask, np.ones((3, 3), np.int64)).astype(np.uint8)).save(tmp_path / "big.png")
    gallery, settings, archive = generate(client, tmp_path / "big.png", num_images=1)
    assert len(gallery) == 1
    assert any("big.png: 192x192 px resized (nearest)" in n for n in settings["notices"])
    with zipfile.ZipFile(archive) as written:  # the downloaded settings are the API's, notices included
        assert json.loads(written.read("settings.json")) == settings


def test_missing_model_fails_at_start_with_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "no model folder at" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--max_batch", "0"])
    assert exit_info.value.code == 2
    assert "batch of 0 images: expected at least 1 image per network call" in capsys.readouterr().err


# ---- hostile and careless requests -------------------------------------------------------------------


def private_endpoint(client, name):
    """The queue serves the page's private events to any client; gradio_client merely hides them."""
    index = next(d["id"] for d in client.config["dependencies"] if d["api_name"] == name)
    client.endpoints[index].is_valid = True
    return index


def memory(key: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, which runs the server too, in bytes."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
    return int(line.split()[1]) * 1024


def peak_growth(call) -> int:
    """How far the peak resident memory rises above the present one while `call` runs."""
    before = memory("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
    call()
    return memory("VmHWM") - before


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux's /proc")
def test_a_canvas_past_the_limit_is_refused_from_its_header_and_costs_no_memory(client, tmp_path):
    index = private_endpoint(client, "on_generate")

    def paint(path):
        editor = {"background": None, "layers": [], "composite": handle_file(str(path))}
        return client.predict("tiny-breast", editor, CLASS_NAMES[1:], 1, 1, 1, "dpm++", 1, None, 1.0, False,
                              fn_index=index)

    def canvas(name, side, mode="RGBA"):  # flat images: a few KB of PNG, however many pixels
        PIL.Image.new(mode, (side, side), (230, 25, 75, 255) if mode == "RGBA" else 0).save(tmp_path / name)
        return tmp_path / name

    paint(canvas("warm-up.png", 512))
    largest, huge = canvas("largest.png", MAX_IMAGE_SIDE), canvas("huge.png", 8000, mode="1")
    decoded = MAX_IMAGE_SIDE**2 * 4  # the largest accepted canvas, decoded once as RGBA uint8: 16 MiB
    assert peak_growth(lambda: paint(largest)) < 4 * decoded  # it was 30 times that (115 bytes per pixel)

    def refused():
        with pytest.raises(AppError, match=rf"canvas composite: 8000 x 8000 px, expected at most {MAX_IMAGE_SIDE}"):
            paint(huge)

    assert peak_growth(refused) < decoded  # it was +7.4 GB
    assert len(paint(largest)[0]["value"]) == 1  # and the server goes on


def test_an_uploaded_mask_past_the_limit_never_reaches_the_canvas(client, mask_png, tmp_path):
    index = private_endpoint(client, "load_mask")
    value = client.predict("tiny-breast", handle_file(str(mask_png)), fn_index=index)
    assert len(value["value"]["layers"]) == 1  # the mask, painted into the editor's layer
    PIL.Image.new("L", (MAX_IMAGE_SIDE + 1, 8)).save(tmp_path / "wide.png")
    with pytest.raises(AppError, match=rf"wide\.png: {MAX_IMAGE_SIDE + 1} x 8 px, expected at most {MAX_IMAGE_SIDE}"):
        client.predict("tiny-breast", handle_file(str(tmp_path / "wide.png")), fn_index=index)


@pytest.fixture
def npy(tmp_path):
    def save(name, array):
        np.save(tmp_path / name, array)
        return tmp_path / name

    return save


def test_refusals_name_the_value_in_one_log_line_without_a_traceback(client, mask_png, npy, capfd, caplog):
    cases = [
        (dict(seed="abc"), r"seed 'abc': expected an integer in 0\.\.4294967295"),
        (dict(seed=1.5), r"seed 1\.5: expected an integer"),
        (dict(steps="x"), r"steps 'x': expected an integer in 1\.\.100"),
        (dict(steps=2.9), r"steps 2\.9: expected an integer"),
        (dict(num_images=None), r"num_images empty: expected an integer"),
        (dict(num_images=2.9), r"num_images 2\.9: expected an integer"),
        (dict(mask=npy("words.npy", np.array([["a", "b"]]))), r"words\.npy: dtype <U1, expected integer class ids"),
        (dict(mask=npy("record.npy", np.zeros((8, 8), [("id", "i8")]))), r"record\.npy: dtype \[\('id'"),
        (dict(mask=npy("wave.npy", np.ones((8, 8), complex))), r"wave\.npy: dtype complex128"),
        (dict(mask=npy("empty.npy", np.zeros((0, 0)))), r"empty\.npy: shape \(0, 0\) holds no pixels"),
        (dict(mask=npy("inf.npy", np.full((8, 8), np.inf))), r"inf\.npy: infinite values at 64 pixel\(s\)"),
        (dict(mask=npy("nan.npy", np.full((8, 8), np.nan))), r"nan\.npy: NaN \(not a number\)"),
    ]
    capfd.readouterr()
    caplog.clear()
    for settings, message in cases:
        mask = settings.pop("mask", mask_png)
        with pytest.raises(AppError, match=message):
            generate(client, mask, **settings)
    lines = [r.getMessage() for r in caplog.records if r.name == "segdiff.studio"]
    assert len(lines) == len(cases) and all(line.startswith("segdiff studio refused generate: ") for line in lines)
    assert "Traceback" not in capfd.readouterr().err
    gallery, settings, _ = generate(client, mask_png, omit="vessels")  # one class named alone
    assert settings["omit"] == ["vessels"] and len(gallery) == 2
    _, settings, _ = generate(client, mask_png, steps=None)  # no steps, like no sampler: the model's own
    assert (settings["sampler"], settings["steps"]) == ("dpm++", 12)


def test_a_path_on_the_server_is_refused_in_words(studio_url, caplog):
    url = f"{studio_url.rstrip('/')}/gradio_api/call/generate"
    server_file = {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}
    event = httpx.post(url, json={"data": [server_file, [], 1, 1, 1, "dpm++", 1, "tiny-breast"]}).json()["event_id"]
    reply = httpx.get(f"{url}/{event}", timeout=120).text
    assert "event: error" in reply and "only files uploaded to this server are accepted" in reply
    assert any("refused generate: only files uploaded" in r.getMessage() for r in caplog.records)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_removes_the_results_and_the_uploads_with_the_server(tiny_model_dir, tmp_path, mask_png):
    port, uploads = free_port(), tmp_path / "uploads"
    env = {**os.environ, "TMPDIR": str(tmp_path), "GRADIO_TEMP_DIR": str(uploads), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, app.__file__, "--model", str(tiny_model_dir), "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and server.poll() is None:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        results = list(tmp_path.glob("segdiff-studio-*"))
        assert len(results) == 1 and server.poll() is None, server.stderr.read() if server.poll() else ""
        page = Client(f"http://127.0.0.1:{port}/", verbose=False)  # still connected at the end, as a tab
        with open(mask_png, "rb") as f:
            [uploaded] = httpx.post(f"http://127.0.0.1:{port}/gradio_api/upload", files={"files": f}).json()
        assert Path(uploaded).is_relative_to(uploads) and Path(uploaded).is_file()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert not results[0].exists() and not Path(uploaded).exists()
        page.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# ---- careless requests (issue 34) ----------------------------------------------------------------------------


def test_a_url_in_a_file_field_is_refused_in_words_and_never_fetched(studio_url, caplog):
    url = f"{studio_url.rstrip('/')}/gradio_api/call/preview"
    for link in ("https://example.com/mask.png", "http://127.0.0.1:9/mask.png"):
        value = {"path": link, "meta": {"_type": "gradio.FileData"}}
        event = httpx.post(url, json={"data": [value, [], 1, "tiny-breast"]}).json()["event_id"]
        reply = httpx.get(f"{url}/{event}", timeout=120).text
        assert "event: error" in reply and f"{link}: a URL, not a file; the server fetches nothing" in reply
    assert any("refused preview: http://127.0.0.1:9/mask.png: a URL" in r.getMessage() for r in caplog.records)


def test_generate_on_an_empty_canvas_or_mask_says_so(client, tmp_path):
    blank = {"background": None, "layers": [], "composite": None}  # what a refused upload leaves
    _, settings, *_ = client.predict("tiny-breast", blank, CLASS_NAMES[1:], 1, 1, 1, "dpm++", 1, None, 1.0, False,
                                     fn_index=private_endpoint(client, "on_generate"))
    assert settings["notices"][0].startswith("the mask is empty (all background)")
    PIL.Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "empty.png")
    _, settings, _ = generate(client, tmp_path / "empty.png")
    assert settings["notices"][0].startswith("the mask is empty (all background)")


def test_a_model_whose_segmenter_is_damaged_opens_without_the_dice_readout(tiny_model_dir, tmp_path, caplog):
    folder = with_segmenter(SegDiffPipeline.from_pretrained(tiny_model_dir), tmp_path / "damaged", truncate)
    demo = app.build_demo(Models.discover(tmp_path / "no-bundled-models", app.DEFAULT_MODEL, model=folder))
    shown = [str(c.get("props", {}).get("value")) for c in demo.config["components"]]
    assert any("damaged · 64 px" in v and "no Dice readout: the segmenter in segmenter/ cannot be read" in v
               for v in shown)
    assert any("damaged opens without its Dice readout" in r.getMessage() for r in caplog.records)


# ---- batched serving (issue 36) ------------------------------------------------------------------------------


def test_concurrent_previews_are_drawn_together_as_each_would_be_alone(client, tiny_model_dir, tmp_path, mask):
    sizes = []

    def counted(draw):  # where a ZeroGPU Space claims its GPU: once per batched call
        return lambda *args: sizes.append(len(args[1])) or draw(*args)

    lanes = Lanes(preview=Lane(4, wait=60, on_device=counted))  # the leader waits for all four
    studio = Studio(SegDiffPipeline.from_pretrained(tiny_model_dir), tiny_model_dir, lanes=lanes)
    demo = app.build_demo(Models.of(studio))
    app.launch(demo, host="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        requests = []
        for k in range(4):
            varied = mask.copy()
            varied[4 * k : 4 * k + 8] = k % 4
            PIL.Image.fromarray(varied.astype(np.uint8)).save(tmp_path / f"mask{k}.png")
            requests.append(dict(mask=tmp_path / f"mask{k}.png", omit=["vessels"] if k == 2 else [], seed=k))
        PIL.Image.fromarray((mask * 60).astype(np.uint8)).save(tmp_path / "scan.png")  # grey levels, not ids
        batched = Client(demo.local_url, verbose=False)
        ask = lambda on, r: on.submit(**{**r, "mask": handle_file(str(r["mask"]))}, api_name="/preview")  # noqa: E731
        jobs = [ask(batched, r) for r in requests[:2]] + [ask(batched, dict(mask=tmp_path / "scan.png", omit=[], seed=0))]
        jobs += [ask(batched, r) for r in requests[2:]]
        together = [np.asarray(PIL.Image.open(job.result(timeout=120)), int) for job in jobs[:2] + jobs[3:]]
        with pytest.raises(AppError, match=r"scan\.png: pixel value 60, expected class ids 0\.\.3"):
            jobs[2].result(timeout=120)
        assert sizes == [4]  # four previews, one network call; the bad one never joined it
        for image, request in zip(together, requests, strict=True):
            alone = np.asarray(PIL.Image.open(ask(client, request).result(timeout=120)), int)
            assert np.abs(image - alone).max() <= 1
        batched.close()
    finally:
        demo.close()


# ---- fast at the defaults: the model's own student (issue 32) ---------------------------------------------------


@pytest.fixture(scope="module")
def student_dir(tiny_model_dir, tmp_path_factory):
    return save_student(tiny_model_dir, tmp_path_factory.mktemp("models") / "tiny-student")


@pytest.fixture(scope="module")
def recorded_dir(student_dir, tmp_path_factory):
    """The student model, its card recording the sampling whose images measured most like scans: DDPM, 5 steps."""
    return save_recorded(student_dir, tmp_path_factory.mktemp("models") / "tiny-recorded", "ddpm", 5)


@pytest.fixture(scope="module")
def guided_dir(student_dir, tmp_path_factory):
    """The student model, its card recording its student at mask guidance 2 (as the 256 px model's does)."""
    return save_recorded(student_dir, tmp_path_factory.mktemp("models") / "tiny-guided", "student", 2, 2.0)


@pytest.fixture(scope="module")
def student_client(student_dir, tiny_model_dir, recorded_dir, guided_dir):
    """A client of the studio over a tiny model with a 2-step student (the default), one without (tiny-breast),
    and the student model with a recorded sampling (tiny-recorded) or mask guidance (tiny-guided)."""
    models = {"tiny-student": student_dir, "tiny-breast": tiny_model_dir, "tiny-recorded": recorded_dir,
              "tiny-guided": guided_dir}  # fmt: skip
    demo = app.build_demo(Models(models, "tiny-student"))
    app.launch(demo, host="127.0.0.1", prevent_thread_lock=True, quiet=True)
    client = Client(demo.local_url, verbose=False)
    yield client
    client.close()
    demo.close()


def test_generate_and_sweep_draw_with_the_student_unless_a_sampler_is_named(student_client, student_dir, mask_png,
                                                                             mask):  # fmt: skip
    client = student_client
    page = {c["props"].get("label"): c["props"] for c in client.config["components"]}
    assert page["Sampler"]["value"] == "student" and "student" in [v for _, v in page["Sampler"]["choices"]]
    assert "own 2 steps" in page["Steps"]["info"]
    gallery, settings, archive = client.predict(mask=handle_file(str(mask_png)), seed=3, num_images=2,
                                                api_name="/generate")  # no sampler, no steps  # fmt: skip
    assert (settings["sampler"], settings["steps"]) == ("student", 2)
    with zipfile.ZipFile(archive) as written:
        assert json.loads(written.read("settings.json"))["sampler"] == "student"
    expected = at_the_defaults(SegDiffPipeline.from_pretrained(student_dir), [mask, mask], [3, 4])
    for image, drawn in zip(images_of(gallery), expected, strict=True):  # what `pipe(masks)` draws
        assert np.abs(image.astype(int) - drawn[..., 0]).max() <= 1
    _, named, _ = generate(client, mask_png, sampler="ddim")
    assert (named["sampler"], named["steps"]) == ("ddim", 3)  # a named sampler at the steps asked, as before
    _, swept, _ = client.predict(mask=handle_file(str(mask_png)), seed=2, api_name="/sweep")
    assert (swept["sampler"], swept["steps"]) == ("student", 2)


def test_a_model_without_a_student_defaults_to_dpm_and_refuses_the_student_by_name(student_client, mask_png):
    _, settings, _ = generate(student_client, mask_png, model="tiny-breast")  # no sampler named
    assert (settings["sampler"], settings["steps"]) == ("dpm++", 3)
    with pytest.raises(AppError, match=r"sampler 'student': tiny-breast has no distilled student; expected one of "
                                       r"\['dpm\+\+', 'unipc', 'ddim', 'ddpm'\]"):  # fmt: skip
        generate(student_client, mask_png, model="tiny-breast", sampler="student")
    _, settings, _ = generate(student_client, mask_png)  # the server goes on
    assert settings["sampler"] == "student"


def test_switching_model_brings_its_samplers_and_default(student_client):
    switch = private_endpoint(student_client, "switch")
    sampler, steps = student_client.predict("tiny-breast", fn_index=switch)[7:9]
    assert [v for _, v in sampler["choices"]] == ["dpm++", "unipc", "ddim", "ddpm"] and sampler["value"] == "dpm++"
    assert "student" not in steps["info"]
    sampler, steps = student_client.predict("tiny-student", fn_index=switch)[7:9]
    assert [v for _, v in sampler["choices"]] == ["student", "dpm++", "unipc", "ddim", "ddpm"]
    assert sampler["value"] == "student"
    assert "own 2 steps" in steps["info"]


def test_picking_a_sampler_moves_the_steps_to_its_own_unless_the_painter_chose_them(student_client):
    picked = private_endpoint(student_client, "sampler_steps")
    assert student_client.predict("tiny-recorded", "dpm++", 5, fn_index=picked) == 12  # left from DDPM's 5
    assert student_client.predict("tiny-recorded", "ddpm", 12, fn_index=picked) == 5  # the card's DDPM steps
    assert student_client.predict("tiny-recorded", "ddim", 31, fn_index=picked) == 31  # chosen: kept
    assert student_client.predict("tiny-breast", "ddpm", 12, fn_index=picked) == 12  # no record: the default


def test_a_model_whose_card_records_its_sampling_generates_there_unless_asked(student_client, mask_png):
    _, settings, _ = generate(student_client, mask_png, model="tiny-recorded", steps=None)  # neither named
    assert (settings["sampler"], settings["steps"]) == ("ddpm", 5)
    _, settings, _ = generate(student_client, mask_png, model="tiny-recorded", sampler="dpm++", steps=None)
    assert (settings["sampler"], settings["steps"]) == ("dpm++", 12)
    _, settings, _ = generate(student_client, mask_png, model="tiny-recorded", sampler="student")
    assert (settings["sampler"], settings["steps"]) == ("student", 2)
    _, settings, _ = generate(student_client, mask_png, model="tiny-student", steps=None)  # no record: as before
    assert (settings["sampler"], settings["steps"]) == ("student", 2)


def test_a_model_whose_card_records_mask_guidance_draws_there_unless_asked(student_client, guided_dir, mask_png,
                                                                           mask):  # fmt: skip
    _, settings, _ = generate(student_client, mask_png, model="tiny-guided", steps=None)  # guidance not named
    assert (settings["sampler"], settings["guidance_scale"]) == ("student", 2.0)
    _, settings, _ = generate(student_client, mask_png, model="tiny-guided", guidance=1)
    assert settings["guidance_scale"] == 1.0
    _, settings, _ = generate(student_client, mask_png, model="tiny-student")  # no record: none
    assert settings["guidance_scale"] == 1.0
    shown = student_client.predict(mask=handle_file(str(mask_png)), omit=[], seed=6, model="tiny-guided",
                                   api_name="/preview")  # fmt: skip
    pipe = SegDiffPipeline.from_pretrained(guided_dir)
    expected = pipe(mask, generator=torch.Generator("cpu").manual_seed(6), guidance_scale=2, output_type="np")
    drawn = (expected.images[0][..., 0] * 255).round()
    assert np.abs(np.asarray(PIL.Image.open(shown), int) - drawn).max() <= 1
    switch = private_endpoint(student_client, "switch")
    assert student_client.predict("tiny-guided", fn_index=switch)[9]["value"] == 2.0  # the Mask guidance slider
    assert student_client.predict("tiny-student", fn_index=switch)[9]["value"] == 1.0
