"""The studio in headless Debian Chromium: paint two classes, untick one, generate, find the images."""

import json
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WAIT_MS = 300_000  # a shared 2-core machine renders the canvas slowly; a hang still ends at the test timeout

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent: apt-get install chromium"),
]


@pytest.mark.timeout(900)
def test_paint_two_classes_untick_one_generate(studio_url, tmp_path):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(WAIT_MS)
        page.goto(studio_url)
        editor = page.locator("#mask-editor")
        canvas = editor.locator("canvas").first
        canvas.wait_for()
        box = canvas.bounding_box()
        # The image sits centred in the canvas element, shown at about 95% of its 512 px.
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2

        def pick(rgb):
            editor.locator("button[aria-label='Color']").click()
            editor.locator(f"menu.swatch button.color[style*='rgb({rgb})']").click()
            editor.locator("button[aria-label='Brush']").click()  # closes the swatch menu over the canvas

        def stroke(x0, y0, x1, y1):
            page.mouse.move(cx + x0, cy + y0)
            page.mouse.down()
            page.mouse.move(cx + x1, cy + y1, steps=4)  # each move redraws the canvas: slow on a busy CPU
            page.mouse.up()

        pick("230, 25, 75")  # breast
        for dy in (-60, -30, 0, 30, 60):
            stroke(-140, dy, 140, dy)
        pick("60, 180, 75")  # vessels
        stroke(-110, -90, 110, 90)

        page.get_by_label("vessels", exact=True).uncheck()
        page.get_by_role("button", name="Generate", exact=True).click()
        images = page.locator("#results img")
        images.nth(3).wait_for()  # four images at the default settings
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "browser-studio.png"), full_page=True)
        assert images.count() == 4
        assert all(images.nth(i).evaluate("img => img.naturalWidth") > 0 for i in range(4))

        with page.expect_download() as download_info:
            page.get_by_role("button", name="Download PNGs, mask and settings").click()
        archive = tmp_path / "results.zip"
        download_info.value.save_as(archive)
        browser.close()

    with zipfile.ZipFile(archive) as z:
        settings = json.loads(z.read("settings.json"))
        z.extract("mask.png", tmp_path)
    mask = np.asarray(PIL.Image.open(tmp_path / "mask.png"))
    assert set(np.unique(mask)) == {0, 1, 2}  # both painted colours arrived as their classes
    assert (mask == 2).sum() > 20 and (mask == 1).sum() > (mask == 2).sum()
    assert settings["omit"] == ["vessels"] and len(settings["seeds"]) == 4
