"""Studio latency: click-to-gallery time through gradio_client, default settings against the original ones.

Two studios are launched in this process on the same weights: one as `python app.py` opens it (automatic
precision and memory layout, DPM++ at the default step count), one with the original code's settings (fp32,
contiguous memory, DDIM 50 steps). Each request goes through the named `generate` endpoint exactly as a
user's would: the mask file is uploaded, sampled into 4 images, written as PNGs with their settings and a
zip, and the gallery images are downloaded. Prints the median of each, and their ratio.

    python benchmarks/studio_latency.py                  # the bundled demo model
    python benchmarks/studio_latency.py --model PATH --repeats 5
    python benchmarks/studio_latency.py --model assets/models/psfhs-ultrasound-256 \
        --versus assets/models/psfhs-ultrasound-64        # what 256 px costs against 64 px, same run

With --versus, the second model's default settings are timed in the same run too, through the studio and as
bare pipeline calls (4 images, no files), and the ratios of the first to the second are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMScheduler
from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
from segdiff import SegDiffPipeline  # noqa: E402
from segdiff.data.layout import read_mask  # noqa: E402
from segdiff.model.card import ModelCard  # noqa: E402
from segdiff.model.pipeline import DEFAULT_SCHEDULER, DEFAULT_STEPS  # noqa: E402
from segdiff.model.unet import build_unet  # noqa: E402
from segdiff.studio.actions import Studio  # noqa: E402
from segdiff.studio.registry import Models  # noqa: E402

NUM_IMAGES = 4


def stand_in_model(folder: Path, preset: str) -> Path:
    """When the demo model is absent: random weights of its architecture (64 px, 4 classes)."""
    card = ModelCard(num_classes=4, img_channels=1, img_size=64, preset=preset)
    unet = build_unet(preset, 64, 1, card.cond_channels)
    SegDiffPipeline(unet, DDPMScheduler(num_train_timesteps=1000), card).save_pretrained(folder)
    return folder


def mask_file(model: str, folder: Path, size: int) -> Path:
    """A bundled example mask of `model` when one exists, else nested squares of classes 1..3 in `folder`."""
    examples = sorted((app.EXAMPLES / model).glob("*.png"))
    if examples:
        return examples[0]
    mask = np.zeros((size, size), np.uint8)
    for c in (1, 2, 3):
        mask[c * size // 8 : size - c * size // 8, c * size // 8 : size - c * size // 8] = c
    path = folder / "mask.png"
    PIL.Image.fromarray(mask).save(path)
    return path


def click_to_gallery(url: str, mask: Path, repeats: int, **settings) -> float:
    """Median seconds from request to downloaded gallery, after one warm-up request."""
    client = Client(url, verbose=False)
    call = lambda: client.predict(  # noqa: E731
        mask=handle_file(str(mask)), omit=[], seed=0, num_images=NUM_IMAGES, api_name="/generate", **settings
    )
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gallery, _, _ = call()
        for item in gallery:  # the client has fetched them; reading them is what a user's browser does
            PIL.Image.open(item["image"]).load()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pipeline_seconds(pipe: SegDiffPipeline, mask: Path, repeats: int) -> float:
    """Median seconds of one default call drawing NUM_IMAGES images for `mask`, after a warm-up call."""
    card = pipe.card
    labels = read_mask(mask, card.num_classes, card.palette, size=card.img_size)
    pipe.set_progress_bar_config(disable=True)
    call = lambda: pipe(labels, batch_size=NUM_IMAGES, output_type="np")  # noqa: E731
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def versus(model: Path, other: Path, repeats: int) -> None:
    """Time `model` and `other` at their defaults in this run: studio click to gallery and bare pipeline."""
    rows = {}
    for folder in (model, other):
        pipe = SegDiffPipeline.from_pretrained(folder)
        demo = app.build_demo(Models.of(Studio(pipe, folder)))
        app.launch(demo, host="127.0.0.1", prevent_thread_lock=True, quiet=True)
        with tempfile.TemporaryDirectory() as tmp:
            mask = mask_file(folder.name, Path(tmp), pipe.card.img_size)
            try:
                studio = click_to_gallery(
                    demo.local_url, mask, repeats, steps=DEFAULT_STEPS, sampler=DEFAULT_SCHEDULER
                )
            finally:
                demo.close()
            rows[folder.name] = (pipe.card.img_size, studio, pipeline_seconds(pipe, mask, repeats))
    print(f"\n{NUM_IMAGES} images at each model's defaults, median of {repeats}:")
    for name, (size, studio, bare) in rows.items():
        print(f"  {name:<28} {size:>4} px  studio {studio:6.2f} s   pipeline {bare:6.2f} s")
    (a, b) = rows.values()
    print(f"  ratio {model.name} / {other.name}: studio {a[1] / b[1]:.2f}x, pipeline {a[2] / b[2]:.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the studio's default model")
    parser.add_argument("--preset", default="small", help="stand-in architecture when --model is absent")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--versus", type=Path, help="another model to time at its defaults in the same run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            bundled = Models.discover(app.MODELS, app.DEFAULT_MODEL)
            model = bundled.folders[bundled.default]
        if not model.is_dir():
            print(f"{model} is absent: timing random weights of the {args.preset!r} preset instead")
            model = stand_in_model(Path(tmp) / f"random-{args.preset}", args.preset)
        fast = SegDiffPipeline.from_pretrained(model)
        original = SegDiffPipeline.from_pretrained(model, precision="fp32", channels_last=False)
        demos = [app.build_demo(Models.of(Studio(pipe, model))) for pipe in (fast, original)]
        for demo in demos:
            app.launch(demo, host="127.0.0.1", prevent_thread_lock=True, quiet=True)
        mask = mask_file(model.name, Path(tmp), fast.card.img_size)
        try:
            default = click_to_gallery(
                demos[0].local_url, mask, args.repeats, steps=DEFAULT_STEPS, sampler=DEFAULT_SCHEDULER
            )
            baseline = click_to_gallery(demos[1].local_url, mask, args.repeats, steps=50, sampler="ddim")
        finally:
            for demo in demos:
                demo.close()

    device = f"{fast.device.type} ({torch.get_num_threads()} threads)" if fast.device.type == "cpu" else "cuda"
    print(f"model {model.name}, {fast.card.img_size} px, {NUM_IMAGES} images, {device}, median of {args.repeats}")
    for label, seconds in (
        (f"default  (precision {fast.precision}, {DEFAULT_SCHEDULER} {DEFAULT_STEPS} steps):", default),
        ("original (fp32, contiguous, ddim 50 steps):", baseline),
    ):
        print(f"  {label:<48} {seconds:6.2f} s click to gallery")
    print(f"  speed-up: {baseline / default:.2f}x")
    if args.versus:
        versus(model, args.versus, args.repeats)


if __name__ == "__main__":
    main()
