"""Take README's screenshots from the real studio: `python app.py` on its default model, in headless Chromium.

    python docs/screenshots.py          # writes docs/studio.png and docs/sweep.png

Loads the model's first example mask (assets/examples/<model>/), waits for its live preview, generates four
images at the default settings, then runs the ablation sweep.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"app.py exited with status {server.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    sys.exit(f"app.py did not open port {port} in {seconds:.0f} s")


def main() -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT)
    try:
        wait_for(port, server)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}")
            page.locator("#mask-examples img").first.click()
            page.wait_for_timeout(6000)  # the example reaches the canvas (slower for a 256 px model)
            page.locator("#preview img").wait_for()  # its preview, drawn without a click
            results = page.locator("#results img")

            page.get_by_role("button", name="Generate", exact=True).click()
            results.nth(3).wait_for()
            page.get_by_text("· Dice").nth(3).wait_for()  # the finished images, not the progress previews
            page.wait_for_timeout(800)
            page.screenshot(path=str(ROOT / "docs" / "studio.png"), full_page=True)

            page.get_by_role("button", name="Ablation sweep").click()
            page.get_by_text("without ").first.wait_for()  # the sweep's captions: "without <class>"
            page.wait_for_timeout(800)
            page.locator("#results").screenshot(path=str(ROOT / "docs" / "sweep.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait()
    print("wrote docs/studio.png and docs/sweep.png")


if __name__ == "__main__":
    main()
