"""Preview latency: how soon the studio's preview follows a stroke, and what a preview costs against Generate.

The studio is launched in this process on one model. Through gradio_client, exactly as a client would:
`/preview` (upload the mask, one image at the model's defaults, download it) against a 4-image `/generate`
(written with their settings and a zip, downloaded) at the studio's defaults (the model's few-step student,
where it has one) and at DPM++ 12 steps (the teacher), all timed in the same run; the preview's ratio to the
teacher's Generate is printed. With --browser, headless Chromium paints strokes on the canvas and
times each from the mouse's release to the new preview image having loaded on the page, and splits that time
into phases from the page's own timings (the canvas frame being drawn at the release, the page reading the canvas
and sending it, the server, the image).

    python benchmarks/preview_latency.py                                        # the bundled 64 px model
    python benchmarks/preview_latency.py --model assets/models/psfhs-ultrasound-256 --browser

Targets: stroke to preview <= 0.5 s in headless Chromium on a 2-core CPU (issue 32; issue 19 asked 0.3 s at 64 px
and 1 s at 256 px); a default 4-image `/generate` of the 256 px model <= 3 s (issue 32); a `/preview` call
<= 0.3x a 4-image `/generate` at DPM++ 12 steps. The load average is printed before
and after: numbers taken while another job uses the CPU are slower than the machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import PIL.Image
import torch
from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studio_latency import NUM_IMAGES, mask_file  # noqa: E402  (beside this script)

import app  # noqa: E402
from segdiff import SegDiffPipeline  # noqa: E402
from segdiff.choices import DEFAULT_SAMPLER, DEFAULT_STEPS  # noqa: E402
from segdiff.studio.actions import Studio  # noqa: E402
from segdiff.studio.registry import Models  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip
# Records, in the page, each stroke's release, when the page got to handle it, and each preview image's load
# (performance.now() times).
WATCH = """() => {
  window.strokes = []; window.handled = []; window.loads = []; performance.setResourceTimingBufferSize(100000);
  document.addEventListener('pointerup', e => {
    window.strokes.push(e.timeStamp); window.handled.push(performance.now());
  }, true);
  document.querySelector('#preview').addEventListener(
    'load', e => window.loads.push({t: performance.now(), src: e.target.src}), true);
}"""
# Where a stroke's time goes, from the page's resource timings (same clock as the events above): the release
# waits for the canvas frame being drawn, the page reads the canvas and sends the event to the queue, the server
# samples and answers, the page fetches and shows the preview's file.
PHASES = """([released, handled, loaded]) => {
  const after = performance.getEntriesByType('resource')
    .filter(e => e.startTime > released && e.startTime < loaded);
  const joins = after.filter(e => e.name.includes('/queue/join'));
  const files = after.filter(e => e.name.includes('/file='));
  if (!joins.length || !files.length) return null;
  const sent = joins[0].startTime, file = files[files.length - 1];
  return {
    'mouse-up to the page handling it (the canvas frame being drawn)': handled - released,
    'handled to event sent (the page reads the canvas, sends it)': sent - handled,
    'event sent to preview file asked (queue, sampling, answer)': file.startTime - sent,
    'preview file fetched and shown': loaded - file.startTime,
  };
}"""


def median_seconds(call, repeats: int) -> float:
    """Median seconds of `call(k)` for k in 1..repeats, after one warm-up call (k = 0)."""
    call(0)
    times = []
    for k in range(1, repeats + 1):
        start = time.perf_counter()
        call(k)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def through_client(url: str, mask: Path, repeats: int) -> tuple[float, float, float]:
    """Median seconds of one `/preview`, of one 4-image `/generate` at the studio's defaults and of one at
    DPM++ 12 steps, each to the files downloaded."""
    client = Client(url, verbose=False)

    def preview(k):  # a new seed each time: no cache anywhere can answer it
        PIL.Image.open(client.predict(mask=handle_file(str(mask)), omit=[], seed=k, api_name="/preview")).load()

    def generate(k, **settings):  # no settings: the studio's defaults (the model's student, where it has one)
        gallery, _, _ = client.predict(
            mask=handle_file(str(mask)), omit=[], seed=k, num_images=NUM_IMAGES, api_name="/generate", **settings
        )
        for item in gallery:
            PIL.Image.open(item["image"]).load()

    teacher = functools.partial(generate, steps=DEFAULT_STEPS, sampler=DEFAULT_SAMPLER)
    return median_seconds(preview, repeats), median_seconds(generate, repeats), median_seconds(teacher, repeats)


def in_browser(url: str, strokes: int) -> tuple[list[float], dict[str, list[float]]]:
    """Seconds from each stroke's release to its new preview loaded on the page, one stroke at a time, and
    the seconds of each phase between (PHASES) for each stroke."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(300_000)
        page.goto(url)
        canvas = page.locator("#mask-editor canvas").first
        canvas.wait_for()
        page.wait_for_timeout(2000)  # the canvas settles
        page.evaluate(WATCH)
        box = canvas.bounding_box()
        left, right = box["x"] + 0.2 * box["width"], box["x"] + 0.8 * box["width"]
        latencies, phases = [], {}
        for k in range(strokes + 1):  # stroke 0 warms up
            y = box["y"] + box["height"] * (0.25 + 0.5 * k / max(strokes, 1))  # new rows: a new mask, a new image
            seen = page.evaluate("window.loads.length")
            page.mouse.move(left, y)
            page.mouse.down()
            page.mouse.move(right, y, steps=4)
            page.mouse.up()
            page.wait_for_function("seen => window.loads.length > seen", arg=seen)
            page.wait_for_timeout(1500)  # later loads of the same stroke's previews have arrived
            released, handled = page.evaluate("[window.strokes.at(-1), window.handled.at(-1)]")
            first = page.evaluate("released => window.loads.find(l => l.t > released).t", released)
            if k:
                latencies.append((first - released) / 1000)
                for phase, ms in (page.evaluate(PHASES, [released, handled, first]) or {}).items():
                    phases.setdefault(phase, []).append(ms / 1000)
        browser.close()
    return latencies, phases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=app.MODELS / "psfhs-ultrasound-64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--browser", action="store_true", help="also paint in headless Chromium")
    parser.add_argument("--strokes", type=int, default=5, help="strokes painted with --browser")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    pipe = SegDiffPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    studio = Studio(pipe, args.model)
    demo = app.build_demo(Models.of(studio))
    app.launch(demo, host="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            mask = mask_file(args.model.name, Path(tmp), pipe.card.img_size)
            labels, _ = studio.mask_from_file(mask)
            # On a worker thread, as gradio runs handlers: beside another busy process the main thread's
            # OpenMP pool was seen to sample 3x slower than a worker thread's.
            with ThreadPoolExecutor(1) as worker:
                bare = median_seconds(
                    lambda k: worker.submit(studio.preview, labels, (), k).result(), args.repeats
                )
            preview, generate, teacher = through_client(demo.local_url, mask, args.repeats)
        strokes, phases = in_browser(demo.local_url, args.strokes) if args.browser else ([], {})
    finally:
        demo.close()

    device = f"cpu ({torch.get_num_threads()} threads)" if pipe.device.type == "cpu" else pipe.device.type
    print(f"model {args.model.name}, {pipe.card.img_size} px, {device}, load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"  /preview (1 image at the model's defaults), median of {args.repeats}: {preview:6.3f} s"
          f"  (sampling alone, Studio.preview: {bare:.3f} s)")
    print(f"  /generate ({NUM_IMAGES} images, the studio's defaults), median of {args.repeats}: {generate:6.3f} s")
    print(f"  /generate ({NUM_IMAGES} images, {DEFAULT_SAMPLER} {DEFAULT_STEPS} steps), median of {args.repeats}: "
          f"{teacher:6.3f} s")
    print(f"  ratio /preview : /generate at {DEFAULT_SAMPLER} {DEFAULT_STEPS} = {preview / teacher:.3f}  (target <= 0.3)")
    if strokes:
        shown = " ".join(f"{s:.3f}" for s in strokes)
        print(f"  browser, stroke released to preview loaded: median {statistics.median(strokes):.3f} s, "
              f"max {max(strokes):.3f} s over {len(strokes)} strokes ({shown})")
        for phase, seconds in phases.items():
            print(f"    {phase:<66} median {statistics.median(seconds):.3f} s")


if __name__ == "__main__":
    main()
