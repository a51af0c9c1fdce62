"""Serving many painters: preview latency and throughput with batching off and on, in the same run.

`python app.py` is started twice on the default model (or --model): once with `--max_batch 1` (each preview
drawn alone, one after another: the studio before batched serving), once at its default (previews that wait
together are drawn in one network call). Against each, 1, 10 and 20 painters preview at once through
gradio_client, each painter with its own client, mask and seeds, sending its next preview as soon as the last
has come back (a painter stroking without pause). Prints p50 and p95 seconds from request to image downloaded,
previews per second, and the ratio of 20 painters' p95 to one painter's p50 against the same server. First,
the network alone, in this process: 20 previews drawn one after another, on 20 threads at once (what raising
the queue's concurrency alone would do), and in one batched call.

    python benchmarks/serving.py                         # the bundled default model, psfhs-ultrasound-256
    python benchmarks/serving.py --model assets/models/psfhs-ultrasound-64 --rounds 4

Targets (issue 36, 2-core CPU): with 20 painters, p95 <= 6x one preview alone and >= 10 previews/s.
The load average is printed before and after: numbers taken while other jobs use the CPU are slower.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import certifi
import httpx
import numpy as np
import PIL.Image
from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
from segdiff.studio.actions import Recipe, Studio  # noqa: E402
from segdiff.studio.registry import Models  # noqa: E402

PAINTERS = (1, 10, 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    """`python app.py --model MODEL --max_batch N` on a free port, once it answers; (process, URL)."""
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--model", str(model), "--port", str(port),
               "--max_batch", str(max_batch)]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        try:
            httpx.get(url, timeout=2)
            return server, url
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"serving: app.py did not start on {url}")


def masks(model: str, folder: Path, size: int, count: int) -> list[Path]:
    """The model's example masks, or nested squares, as `count` files that differ (each painter its own)."""
    examples = sorted((app.EXAMPLES / model).glob("*.png"))
    base = (
        np.asarray(PIL.Image.open(examples[0]))
        if examples
        else np.kron(np.array([[0, 1], [2, 1]], np.uint8), np.ones((size // 2, size // 2), np.uint8))
    )
    paths = []
    for k in range(count):
        path = folder / f"painter{k}.png"
        PIL.Image.fromarray(np.roll(base, 2 * k, axis=1)).save(path)
        paths.append(path)
    return paths


def painters(url: str, files: list[Path], rounds: int, fresh_tls: bool = False) -> tuple[list[float], float]:
    """len(files) painters previewing at once for `rounds` previews each, after one warm-up preview each:
    (every preview's seconds from request to image downloaded, previews per second over the timed rounds).

    The painters share one TLS context, as a browser keeps one. gradio_client's default (`fresh_tls`) has httpx
    load the CA bundle for each of a preview's four HTTP calls, which cost the 20 painters more of the shared
    2 cores than the server's own work. The server speaks plain HTTP either way; nothing is verified otherwise.
    """
    context = True if fresh_tls else ssl.create_default_context(cafile=certifi.where())
    clients = [Client(url, verbose=False, ssl_verify=context) for _ in files]
    times: list[float] = []
    lock, ready = threading.Lock(), threading.Barrier(len(files) + 1)

    def paint(k: int) -> None:
        def preview(seed: int) -> float:
            began = time.perf_counter()
            mask = handle_file(str(files[k]))
            PIL.Image.open(clients[k].predict(mask=mask, omit=[], seed=seed, api_name="/preview")).load()
            return time.perf_counter() - began

        preview(10_000 + k)
        ready.wait()
        for r in range(rounds):
            seconds = preview(k * rounds + r)
            with lock:
                times.append(seconds)

    threads = [threading.Thread(target=paint, args=(k,)) for k in range(len(files))]
    for thread in threads:
        thread.start()
    ready.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    for client in clients:
        client.close()
    return times, len(times) / wall


def network_alone(studio: Studio, files: list[Path]) -> dict[str, float]:
    """Seconds to draw one preview of each file: one after another, all on threads at once, in one call."""
    items = [(studio.mask_from_file(f)[0], k) for k, f in enumerate(files)]
    # On a worker thread, as gradio runs handlers: beside another busy process the main thread's OpenMP pool
    # was seen to sample several times slower than a worker thread's.
    worker = ThreadPoolExecutor(1)
    here = lambda batch: studio.draw_batch(Recipe(studio.name), batch, None)  # noqa: E731
    draw = lambda batch: worker.submit(here, batch).result()  # noqa: E731
    draw(items[:2])  # warm-up
    ways = {
        "one after another": lambda: [draw([item]) for item in items],
        "on threads at once": lambda: list(ThreadPoolExecutor(len(items)).map(here, [[i] for i in items])),
        "in one batched call": lambda: draw(items),
    }
    seconds = {}
    for way, run in ways.items():
        began = time.perf_counter()
        run()
        seconds[way] = time.perf_counter() - began
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="default: the studio's default model")
    parser.add_argument("--rounds", type=int, default=6, help="previews each painter sends, timed")
    parser.add_argument(
        "--fresh_tls", action="store_true",
        help="each client HTTP call loads the CA bundle (gradio_client's default; this benchmark before 2026-12-07)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        bundled = Models.discover(app.MODELS, app.DEFAULT_MODEL)
        model = bundled.folders[bundled.default]
    studio = Models.discover(app.MODELS, app.DEFAULT_MODEL, model=model).get()
    studio.pipe.set_progress_bar_config(disable=True)
    size = studio.size
    load_before = os.getloadavg()[0]

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = masks(model.name, Path(tmp), size, max(PAINTERS))
        alone = network_alone(studio, files)
        for label, max_batch in (("batching off (--max_batch 1)", 1), ("batched (default)", app.MAX_BATCH)):
            server, url = start(model, max_batch)
            try:
                rows[label] = {n: painters(url, files[:n], args.rounds, args.fresh_tls) for n in PAINTERS}
            finally:
                server.terminate()
                server.wait(timeout=60)

    print(f"model {model.name}, {size} px, {os.cpu_count()} CPUs, load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; {args.rounds} previews per painter; clients "
          f"{'load the CA bundle per call' if args.fresh_tls else 'share one TLS context'}")
    print(f"  the network alone, {max(PAINTERS)} previews: " + ", ".join(
        f"{way} {seconds:.2f} s" for way, seconds in alone.items()))
    print(f"  {'':<30}" + "".join(f"{f'{n} painters':>28}" for n in PAINTERS) + "   20 p95 / 1 p50")
    print(f"  {'':<30}" + "".join(f"{'p50 s':>9}{'p95 s':>9}{'/s':>10}" for _ in PAINTERS))
    for label, row in rows.items():
        cells = ""
        for n in PAINTERS:
            times, rate = row[n]
            p50, p95 = np.percentile(times, [50, 95])
            cells += f"{p50:9.2f}{p95:9.2f}{rate:10.1f}"
        one = np.percentile(row[1][0], 50)
        print(f"  {label:<30}{cells}   {np.percentile(row[max(PAINTERS)][0], 95) / one:6.1f}x")
    print("  targets with 20 painters: p95 <= 6x one preview alone, >= 10 previews/s")


if __name__ == "__main__":
    main()
