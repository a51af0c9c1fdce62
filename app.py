"""segdiff studio: paint or upload an anatomy mask, choose the classes the model must keep, and sample.

    python app.py [--model PATH|org/name] [--num_classes K] [--host 127.0.0.1] [--port 7860]

Layout and wiring only: every action is one call into `segdiff.studio`. The picker offers every bundled model
(and the one given by --model); each loads once, on first use, and stays loaded (`segdiff.studio.registry`). A
preview redraws after each stroke; the API's `/generate`, `/sweep` and `/preview` take a mask file.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import functools
import logging
import random
import signal
from pathlib import Path

import gradio as gr
import numpy as np
import pydantic
from gradio.context import LocalContext
from gradio.exceptions import InvalidPathError
from gradio_client.utils import is_http_url_like

from segdiff import ConfigError, SegdiffError
from segdiff.choices import DEFAULT_STEPS, SAMPLERS
from segdiff.errors import DataLayoutError, check_integer
from segdiff.resolve import is_hub_id
from segdiff.studio.actions import MAX_IMAGES, MAX_SEED, MAX_STEPS, STUDENT, Settings, Studio
from segdiff.studio.batching import Lane, Lanes
from segdiff.studio.registry import Models
from segdiff.studio.runs import Run

try:  # on a ZeroGPU Space each batched network call borrows a GPU, in a worker process (no progress bar)
    import spaces

    gpu = spaces.GPU(duration=60)
    gpu_briefly = spaces.GPU(duration=10)  # a preview: a shorter claim waits less in ZeroGPU's queue
except ImportError:  # elsewhere each call runs in this process, with its progress bar
    gpu = gpu_briefly = None


HERE = Path(__file__).resolve().parent
MODELS = HERE / "assets" / "models"  # the picker offers every folder in here
EXAMPLES = HERE / "assets" / "examples"  # <model name>/ holds that model's example masks
# The model the studio opens on: the real-anatomy one; the first folder found stands in while it is absent.
DEFAULT_MODEL = "psfhs-ultrasound-256"
MAX_UPLOAD = "5mb"
MAX_BATCH = 32  # previews, or images of Generate and sweeps, drawn in one network call
EDITOR_HEIGHT = 572  # pixels on screen, the toolbar included; the editor zooms its canvas to fit
GUIDANCE_SLIDER_MAX = 8  # mask guidance past this saturates images; the API takes up to MAX_GUIDANCE
KEEP_PAINTED = 256  # canvases a browser sent ahead of an event, held per editor (tens of KB each)
SAMPLER_LABELS = {
    STUDENT: "Student (the model's own few-step network: fastest)",
    "dpm++": "DPM++ 2M (fast)",
    "unipc": "UniPC (fast)",
    "ddim": "DDIM (original)",
    "ddpm": "DDPM (stochastic: the most scan-like texture, from ~20 steps)",
}
THEME = gr.themes.Soft(primary_hue="teal", secondary_hue="slate", neutral_hue="slate")
CSS = """
#results img, #mask-examples img, #preview img { image-rendering: pixelated; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 14px; font-size: 0.9em; }
.legend span.swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px;
                      vertical-align: -2px; margin-right: 6px; border: 1px solid var(--border-color-primary); }
.model-line { opacity: 0.8; font-size: 0.9em; }
#preview img { width: 100%; height: 100%; object-fit: contain; padding: 36px 6px 6px; box-sizing: border-box; }
#reroll { align-self: flex-end; margin-bottom: 8px; }
.tips { font-size: 0.88em; opacity: 0.85; }
"""
# The live preview reads the painted canvas in the page itself. When an event listens to gradio's editor, the
# editor spends about a second after each stroke in headless Chromium (software WebGL on a busy 2-core CPU)
# extracting background, layer and composite as PNGs and uploading them before its `change` fires. No event
# listens to it here, so it does none of that; HEAD watches the page for edits instead (a stroke released on the
# canvas, a click on the editor's buttons: Undo, Redo, Clear canvas), reads the canvas's composite as one PNG
# through the editor's own Pixi renderer, exactly as the editor extracts it for Generate, and, when it differs
# from the one last sent, clicks the hidden `#stroke-done` button. The preview event's READ_CANVAS then sends
# it, a data URL of a few KB, in place of the hidden `canvas` box's value. The editor's Pixi application is
# caught as Pixi announces it to its devtools (`__PIXI_APP_INIT__`), which HEAD sets before the editor starts.
HEAD = """<script>
(() => {
  const apps = [];
  const announced = globalThis.__PIXI_APP_INIT__;
  globalThis.__PIXI_APP_INIT__ = (app, version) => { apps.push(app); announced?.(app, version); };
  const editorApp = () =>
    apps.filter(a => a.canvas?.isConnected && a.canvas.closest("#mask-editor .pixi-target")).pop();

  // The editor's composite (background and layers), as its own export for Generate reads it: a PNG data URL,
  // or null while the editor is not drawn.
  const read = () => {
    try {
      return extract(editorApp());
    } catch (e) {  // an editor whose insides have moved (see "private Gradio workarounds" in app.py)
      console.warn("segdiff: cannot read the canvas", e);
      return null;
    }
  };
  const extract = app => {
    const image = app?.stage.children.find(c => c.sortableChildren);  // background (zIndex -1) and layers
    const background = image?.children.find(c => c.zIndex === -1);
    if (!background) return null;
    const bounds = background.getLocalBounds();
    const frame = new app.screen.constructor(0, 0, Math.round(bounds.width), Math.round(bounds.height));
    const {pixels, width, height} = app.renderer.extract.pixels({target: image, resolution: 1, frame});
    if (app.renderer.name === "webgl") {  // WebGL reads premultiplied alpha: undo it, as the editor does
      for (let i = 0; i < pixels.length; i += 4) {
        const a = pixels[i + 3];
        if (a > 0 && a < 255) for (let c = 0; c < 3; c++) pixels[i + c] = pixels[i + c] * 255 / a;
      }
    }
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    const data = context.createImageData(width, height);
    data.data.set(pixels);
    context.putImageData(data, 0, 0);
    return canvas.toDataURL("image/png");
  };

  // What the preview event sends (READ_CANVAS): the canvas as an edit left it, else as it is now.
  let edited = null, sent = null;
  window.segdiffCanvas = () => {
    sent = edited ?? read();
    edited = null;
    return sent;
  };
  let armed = false;  // a pointer went down on the canvas: a stroke is being drawn
  const check = () => {  // after an edit: a preview, unless the canvas is as last sent (a pan, a tool chosen)
    if (armed) return;  // mid-stroke: its release looks
    const now = read();
    if (now === null || now === sent) return;
    edited = now;
    document.querySelector("#stroke-done")?.click();
  };

  // A stroke ends where the pointer is released after going down on the canvas. Pixi's own handler, which
  // commits the stroke to its layer, listens on window as the event descends; this one as it rises back.
  document.addEventListener("pointerdown", e => {
    armed = !!e.target.closest?.("#mask-editor canvas");
    // The editor's one filter, the light theme's soft shadow around the canvas (the dark theme has none),
    // costs as much as the rest of a software-rendered frame together.
    for (const part of armed ? editorApp()?.stage.children ?? [] : []) {
      for (const child of part.children) child.filters = null;
    }
  }, true);
  window.addEventListener("pointerup", () => {
    if (!armed) return;
    armed = false;
    check();
    // The editor renders frames for half a second after any pointer event; in software WebGL each one holds
    // the page for a fifth of a second, and the preview's requests would wait behind them. One frame shows the
    // committed stroke, then the loop rests until the next pointer event wakes it.
    const app = editorApp();
    app?.ticker.addOnce(() => app.ticker.stop(), null, -50);  // after that frame's render (priority -25)
  });
  // The editor's buttons stop their clicks from rising: catch them descending, and look once the button has
  // acted, and again later for what it does asynchronously (Clear canvas).
  document.addEventListener("click", e => {
    if (!e.target.closest?.("#mask-editor button")) return;
    setTimeout(check, 0);
    setTimeout(check, 300);
  }, true);
})();
</script>"""
# The preview event's inputs as the page sends them: the canvas in place of the hidden `canvas` box's value.
READ_CANVAS = "(model, canvas, keep, seed) => [model, window.segdiffCanvas?.() ?? null, keep, seed]"
MAX_PAINTED = 2_000_000  # characters of a canvas's data URL (a 2048 px canvas of a few colours is far less)


# How events run. The page's own events are private: any client can reach them, none is documented. Inputs
# come raw (preprocess=False): gradio would decode every image at whatever size a request claims and round
# numbers; the studio checks and reads each value itself. Sampling and previews each have a lane
# (`segdiff.studio.batching`): one network call at a time, drawing together the requests that waited for it, so
# the queue lets in as many requests as a call may draw (`build_demo`). Previews have their own lane, so
# Generate never waits behind one and a stroke never waits for Generate; while a page's preview is drawn, only
# its newest stroke since is drawn next (always_last). Gradio's own batched events (batch=True) were not used:
# one bad request would fail its whole batch, and a batch gets one progress bar.
PRIVATE = dict(api_visibility="private")
RAW = dict(preprocess=False)

log = logging.getLogger("segdiff.studio")


# ---- private Gradio workarounds: written against gradio 6.x (tested on 6.31.0, the Space's sdk_version) ----
# Each reaches into gradio internals that a minor release may move; check them first when gradio is upgraded.
# - `refuse_foreign_files` wraps `Blocks.preprocess_data`, which refuses a file no upload created (InvalidPathError,
#   or pydantic's ValidationError for a malformed one) before any handler runs; the client would see `{"error": null}`.
#   It downloads a file whose `path` is a URL (gradio's `_move_to_cache`): the wrapper refuses those first.
# - `painted` reads `ImageEditor.blob_storage`: a browser's painting reaches the server as PNG blobs ahead of the
#   event, whose raw value names them by `id`; once an event has updated the editor, the session holds its own
#   copy of the component (`LocalContext.blocks_config`). While an event listens to the editor, the browser
#   sends each stroke's blobs, and most are never named by a value: gradio keeps them all, we keep the newest.
#   The studio's page no longer has such an event (HEAD), so its Generate uploads the canvas's files instead;
#   a client that sends blobs the editor's way is still read.
# - `path_of` reads a raw (preprocess=False) file value: gradio's FileData as a dict.
# - HEAD reads the editor's canvas through its Pixi application (Pixi 8's `__PIXI_APP_INIT__` devtools hook): the
#   application whose canvas is in `#mask-editor .pixi-target`, its stage child that sorts its children (the
#   editor's image container: background at zIndex -1, then the layers), extracted as the editor's `get_blobs`
#   does; it stops the editor's render loop (`app.ticker`), which the editor restarts at the next pointer event.


def refuse_foreign_files(demo: gr.Blocks) -> None:
    """Say in words why gradio refuses a request's file before any handler runs, and refuse a URL given as a
    file before gradio fetches it: the server downloads nothing a request names."""
    preprocess = demo.preprocess_data

    @functools.wraps(preprocess)
    async def checked(block_fn, inputs, *args, **kwargs):
        for url in urls_in(inputs):
            raise refusal(f"{url[:100]}: a URL, not a file; the server fetches nothing, so upload the file "
                          "first (gradio_client: handle_file(path))", block_fn.name)
        try:
            return await preprocess(block_fn, inputs, *args, **kwargs)
        except InvalidPathError as e:  # a path on the server that no upload created
            raise refusal("only files uploaded to this server are accepted, not paths on it; "
                          "upload the file first (gradio_client: handle_file(path))", block_fn.name) from e
        except pydantic.ValidationError as e:
            raise refusal("a file input holds something else; expected an uploaded file "
                          "(gradio_client: handle_file(path))", block_fn.name) from e

    demo.preprocess_data = checked


def urls_in(value):
    """The URLs given as a file's `path` anywhere in a request's raw inputs (gradio would download them)."""
    if isinstance(value, dict):
        if isinstance(value.get("path"), str) and is_http_url_like(value["path"]):
            yield value["path"]
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from urls_in(item)


def painted(editor: gr.ImageEditor) -> dict:
    """This session's PNG blobs of painted canvases by id, trimmed to the newest KEEP_PAINTED."""
    session = LocalContext.blocks_config.get(None)
    blobs = (session.blocks.get(editor._id, editor) if session else editor).blob_storage
    for stale in list(blobs)[:-KEEP_PAINTED]:  # oldest first: the dict holds them in the order they came
        blobs.pop(stale, None)
    return blobs


def path_of(file) -> str | None:
    return file["path"] if isinstance(file, dict) else None


def png_of(data_url: str) -> bytes:
    """The PNG bytes of a canvas the page read itself (READ_CANVAS): a `data:image/png;base64,` URL."""
    head, _, body = data_url.partition(",")
    if head != "data:image/png;base64" or len(data_url) > MAX_PAINTED:
        raise DataLayoutError(f"canvas: expected a PNG data URL of at most {MAX_PAINTED} characters, got "
                              f"{data_url[:30]!r}... ({len(data_url)} characters)")
    try:
        return base64.b64decode(body, validate=True)
    except binascii.Error as e:
        raise DataLayoutError(f"canvas: the PNG data URL is not base64 ({e})") from e


# ---- errors -------------------------------------------------------------------------------------------------


def refusal(message: str, action: str) -> gr.Error:
    """A user's mistake: one line in the server log, the message on the page; tracebacks are for our faults."""
    log.warning("segdiff studio refused %s: %s", action, message)
    return gr.Error(message, print_exception=False)


def user_errors(fn):
    """Show segdiff's messages (a bad mask, a setting out of range) as a gr.Error; the server goes on.

    Anything else is a fault of ours: its traceback goes to the server log, the page says so in one line.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SegdiffError as e:
            raise refusal(str(e), fn.__name__) from e
        except gr.Error:
            raise
        except Exception as e:
            log.exception("segdiff studio: internal error in %s", fn.__name__)
            raise gr.Error(f"internal error ({type(e).__name__}); the server log has the details",
                           print_exception=False) from e

    return wrapper


# ---- what the page shows ------------------------------------------------------------------------------------


def legend_html(studio: Studio) -> str:
    items = "".join(
        f'<div><span class="swatch" style="background:{studio.palette.hex(i)}"></span>{name}</div>'
        for i, name in enumerate(studio.class_names)
    )
    return f'<div class="legend">{items}</div>'


def tips(studio: Studio) -> str:
    side, scale = studio.size * studio.canvas_scale, studio.canvas_scale
    canvas = (
        f"The canvas is {side} px: each {scale} x {scale} block becomes one of the model's {studio.size} x "
        f"{studio.size} pixels, the class covering most of it." if scale > 1
        else f"The canvas is the model's {side} x {side} pixels."
    )  # fmt: skip
    return (
        f"**Painting.** Pick a class colour from the brush's palette; black paints background and the eraser "
        f"takes paint off. {canvas} The preview redraws after each stroke at the "
        "seed shown, at the model's default settings (its few-step student, where it has one).\n\n"
        "**Omitting** a class hands its pixels to the model, which may draw that tissue anywhere or nowhere. "
        "**Ablation sweep** renders one noise with all classes kept, then each one omitted in turn. Every PNG "
        "carries its seed, steps, sampler, omitted classes and model in its metadata."
    )


def editor_of(studio: Studio, mask=None) -> dict:
    """What the mask editor shows for a model: its canvas size, brush palette, and `mask` (None: blank).

    A mask goes on the layer, over a black background, so the eraser takes it back to background. A blank
    canvas has its layer too, transparent: the editor skips its first `change`, which is then the layer's
    loading rather than the first stroke (the live preview follows `change`).
    """
    side, scale = studio.size * studio.canvas_scale, studio.canvas_scale
    blank = np.zeros((studio.size, studio.size), np.int64)
    return dict(
        value={"background": studio.canvas(), "layers": [studio.layer(blank if mask is None else mask)],
               "composite": None},
        canvas_size=(side, side),
        brush=gr.Brush(
            colors=[studio.palette.hex(i) for i in range(len(studio.class_names))],
            default_color=studio.palette.hex(1),
            color_mode="fixed",
            default_size=3 * scale,
        ),
        eraser=gr.Eraser(default_size=3 * scale),
        height=EDITOR_HEIGHT,
    )


def sampler_menu(studio: Studio) -> dict:
    """The sampler dropdown of a model: the samplers it draws with, its default chosen."""
    return dict(choices=[(SAMPLER_LABELS[s], s) for s in studio.samplers], value=studio.samplers[0])


def steps_info(studio: Studio) -> str:
    """What the Steps slider sets for a model: the student draws in its own steps, whatever the slider says."""
    chosen = studio.card.generation
    if chosen is not None:
        return (f"Denoising steps of the sampler; this model's images measured most like real scans at "
                f"{SAMPLER_LABELS[chosen.sampler].split(' (')[0]}, {chosen.steps} steps.")
    if STUDENT not in studio.samplers:
        return "Denoising steps of the sampler."
    drawn = studio.sampling(STUDENT, DEFAULT_STEPS)
    own = (f"{drawn['steps']} + {drawn['upscale_steps']} (base, then upscaler)" if "upscale_steps" in drawn
           else drawn["steps"])  # fmt: skip
    return f"Not used by the student, which draws in its own {own} steps; sets the other samplers' steps."


def progress_to(progress: gr.Progress):
    return lambda step, total: progress((step, total), desc="denoising", unit="steps")


# ---- handlers -----------------------------------------------------------------------------------------------


class Handlers:
    """The page's events and the API's endpoints over a registry of models.

    Each request is read one way (`request`): the model by name, raw settings checked once into typed
    `Settings`, and the mask, whether the API's uploaded file or the page's editor value. Page and API differ
    only in what they take and give back: the page paints, ticks the classes to keep, may bring a start image,
    and shows a gallery it can redraw; the API uploads a mask file, names the classes to omit, and gets plain
    values (gradio_client would hand component updates back as they are).
    """

    def __init__(self, models: Models, editor: gr.ImageEditor):
        self.models, self.editor = models, editor

    # ---- reading a request ----

    def request(self, model, mask, **raw) -> tuple[Studio, np.ndarray, list[str], Settings]:
        """(the studio, the mask's class ids, notices for the user, typed settings) of one request."""
        studio = self.models.get(model)
        settings = studio.settings(**raw)
        labels, notices = self.mask_of(studio, mask)
        return studio, labels, notices, settings

    def mask_of(self, studio: Studio, value) -> tuple[np.ndarray, list[str]]:
        """The API's uploaded file, the editor's raw value, the canvas the page read itself or a mask the page
        loaded -> (class ids, notices); images stay undecoded until the studio has checked them."""
        if isinstance(value, str):  # the page's own reading of its canvas after a stroke (READ_CANVAS)
            return studio.mask_from_editor(composite=png_of(value)), []
        if isinstance(value, np.ndarray):  # a mask file just loaded into the editor, held by the session
            return value, []
        if value is None or "path" in value:
            if path_of(value) is None:
                raise ConfigError("mask: no file given; expected an integer-label PNG, a palette PNG or a .npy")
            return studio.mask_from_file(path_of(value))
        held = painted(self.editor)
        if value.get("id") is not None:  # a browser's painting arrives first as PNG blobs the editor holds
            blobs = held.pop(value["id"], None)
            if blobs is None:
                raise DataLayoutError("canvas: the painting sent with this request is no longer on the server "
                                      "(the request waited too long); paint a stroke and try again")
            files = (blobs.background, blobs.layers, blobs.composite)
        else:
            layers = [path_of(f) for f in value.get("layers") or ()]
            files = (path_of(value.get("background")), layers, path_of(value.get("composite")))
        return studio.mask_from_editor(*files), []

    def run(self, kind: str, model, mask, image, progress: gr.Progress, **raw) -> Run:
        """`kind` ("generate" or "sweep") of one request, its results complete and written."""
        studio, labels, notices, settings = self.request(model, mask, **raw)
        start = studio.start_image(path_of(image)) if path_of(image) else None
        return getattr(studio, kind)(labels, settings, start, progress_to(progress), notices)

    def gallery_of(self, run: Run, contours: bool) -> gr.Gallery:
        # Up to 4 results as a 2 x 2 grid of large images; more as rows of 4.
        items = self.models.get(run.settings["model"]).gallery(run, contours)
        return gr.Gallery(items, columns=2 if len(run.images) <= 4 else 4)

    def shown(self, run: Run, contours: bool) -> tuple:
        """The page's outputs of a run: gallery, settings, download button, the run kept for redrawing."""
        for notice in run.notices:
            gr.Info(notice)
        return self.gallery_of(run, contours), run.settings, gr.DownloadButton(value=str(run.archive), visible=True), run

    def returned(self, run: Run) -> tuple:
        """The API's outputs of a run: (image files with captions, settings, zip), plain values."""
        return self.models.get(run.settings["model"]).gallery(run), run.settings, str(run.archive)

    # ---- the page ----

    @user_errors
    def switch(self, model):
        studio = self.models.get(model)
        names, examples = studio.class_names, self.models.examples(model)
        return (
            gr.ImageEditor(**editor_of(studio)),
            legend_html(studio),
            gr.CheckboxGroup(names[1:], value=names[1:]),
            gr.Dataset(samples=[[p] for p in examples], visible=bool(examples)),
            studio.summary(),
            tips(studio),
            gr.Image(value=None, image_mode="L" if studio.card.img_channels == 1 else "RGB"),
            gr.Dropdown(**sampler_menu(studio)),
            gr.Slider(value=studio.steps_for(studio.samplers[0]), info=steps_info(studio)),
            gr.Slider(value=studio.guidance),
            None,
            gr.Gallery(value=None),
            None,
            gr.DownloadButton(visible=False),
            None,
        )

    @user_errors
    def sampler_steps(self, model, sampler, steps):
        """The Steps slider once a sampler is picked by hand: that sampler's own steps (`Studio.steps_for`:
        DDPM's 20 where the card records them), unless the slider holds steps the painter chose."""
        studio = self.models.get(model)
        own = {studio.steps_for(s) for s in studio.samplers}
        return studio.steps_for(sampler) if steps in own else steps

    def loaded(self, studio: Studio, path) -> tuple[gr.ImageEditor, np.ndarray]:
        """The editor showing a mask file, and the mask, which the preview then draws."""
        mask, notices = studio.mask_from_file(path)
        for notice in notices:
            gr.Warning(notice)
        return gr.ImageEditor(**editor_of(studio, mask)), mask

    @user_errors
    def load_mask(self, model, file):
        return self.loaded(self.models.get(model), path_of(file)) if path_of(file) else (gr.skip(), gr.skip())

    @user_errors
    def load_example(self, model, index):
        examples = self.models.examples(model)
        index = check_integer("example", index, 0, len(examples) - 1)
        return self.loaded(self.models.get(model), examples[index])

    @user_errors
    def on_generate(self, model, editor, keep, seed, steps, num_images, sampler, guidance, image, strength, contours,
                    progress=gr.Progress()):  # noqa: B008
        run = self.run("generate", model, editor, image, progress, keep=keep or [], seed=seed, steps=steps,
                       num_images=num_images, sampler=sampler, guidance_scale=guidance, strength=strength)
        return self.shown(run, contours)

    @user_errors
    def on_sweep(self, model, editor, seed, steps, sampler, guidance, image, strength, contours,
                 progress=gr.Progress()):  # noqa: B008
        run = self.run("sweep", model, editor, image, progress, seed=seed, steps=steps, sampler=sampler,
                       guidance_scale=guidance, strength=strength)
        return self.shown(run, contours)

    def on_paint(self, model, painted, keep, seed):
        """The live preview after a stroke (or a change of the kept classes or the seed, or a mask loaded),
        quietly: a blank canvas shows none, and a mask or setting that cannot be read keeps the last one, without
        a message at every stroke (Generate says what is wrong). `painted`: the canvas as the page read it
        (READ_CANVAS), or the mask just loaded."""
        try:
            studio, labels, _, settings = self.request(model, painted, keep=keep or [], seed=seed)
            return studio.preview(labels, settings.omit, settings.seed) if labels.any() else None
        except SegdiffError as e:
            log.info("segdiff studio: no preview: %s", e)
        except Exception:
            log.exception("segdiff studio: internal error in the preview")
        return gr.skip()

    def redraw(self, run, contours):
        return self.gallery_of(run, contours) if run is not None else gr.skip()

    # ---- the API ----
    # `sampler=None`: gradio lets a client leave out a parameter whose component has no value when its argument
    # defaults to None, and sends None (the model's default); the defaults after it only satisfy Python, since
    # their components' values are what gradio sends.

    @user_errors
    def generate(self, mask, omit, seed, steps=None, num_images=Settings.num_images, sampler=None, guidance=None,
                 model=None, progress=gr.Progress()):  # noqa: B008
        return self.returned(self.run("generate", model, mask, None, progress, omit=omit, seed=seed, steps=steps,
                                      num_images=num_images, sampler=sampler, guidance_scale=guidance))

    @user_errors
    def sweep(self, mask, seed, steps=None, sampler=None, guidance=None, model=None,
              progress=gr.Progress()):  # noqa: B008
        return self.returned(self.run("sweep", model, mask, None, progress, seed=seed, steps=steps, sampler=sampler,
                                      guidance_scale=guidance))

    @user_errors
    def preview(self, mask, omit, seed, model):
        studio, labels, _, settings = self.request(model, mask, omit=omit, seed=seed)
        return studio.preview(labels, settings.omit, settings.seed)


# ---- the page -----------------------------------------------------------------------------------------------


def build_demo(models: Models) -> gr.Blocks:
    """The studio's page and API over a registry of models; the picker switches between them."""
    first = models.get()
    with gr.Blocks(title="segdiff studio", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(
            "# segdiff studio\n"
            "Paint an anatomy mask, choose which classes the model must follow and which it may invent, "
            "and sample images that follow it pixel for pixel."
        )
        with gr.Row(equal_height=False):
            picker = gr.Dropdown(models.names, value=models.default, label="Model", scale=1, min_width=200,
                                 visible=len(models.names) > 1, elem_id="model-picker")
            model_line = gr.Markdown(first.summary(), elem_classes="model-line")
        run_state = gr.State(None)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=380):
                editor = gr.ImageEditor(
                    label="Mask",
                    type="numpy",
                    image_mode="RGBA",
                    format="png",
                    fixed_canvas=True,
                    sources=[],
                    transforms=[],
                    layers=False,
                    elem_id="mask-editor",
                    **editor_of(first),
                )
                legend = gr.HTML(legend_html(first))
                mask_file = gr.File(
                    label="Upload a mask (PNG of class ids or colours, .npy)",
                    file_types=[".png", ".npy"],
                    height=120,
                )
                first_examples = models.examples()
                examples = gr.Dataset(
                    components=["image"], samples=[[p] for p in first_examples], type="index",
                    label="Example masks (held-out test cases)", elem_id="mask-examples",
                    samples_per_page=12, visible=bool(first_examples),
                )
                painting_tips = gr.Markdown(tips(first), elem_classes="tips")
            with gr.Column(scale=6, min_width=380):
                names = first.class_names
                with gr.Row(equal_height=False):
                    preview = gr.Image(label="Preview", height=260, format="png", interactive=False,
                                       buttons=[], elem_id="preview", scale=1, min_width=180)
                    keep = gr.CheckboxGroup(
                        names[1:], value=names[1:], label="Keep", scale=1, min_width=180,
                        info="Ticked classes are followed exactly; unticked ones are omitted, and the model may "
                             "invent them.",
                    )
                with gr.Row():
                    num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images")
                    steps = gr.Slider(1, MAX_STEPS, value=first.steps_for(first.samplers[0]), step=1, label="Steps",
                                      info=steps_info(first))
                with gr.Row():
                    sampler = gr.Dropdown(**sampler_menu(first), label="Sampler")
                    seed = gr.Number(value=42, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                    reroll = gr.Button("Random seed", size="md", min_width=80, elem_id="reroll")
                guidance = gr.Slider(
                    1, GUIDANCE_SLIDER_MAX, value=first.guidance, step=0.5, label="Mask guidance",
                    info="Above 1, images follow the kept classes more closely (each step costs two passes); "
                         "for models trained with mask ablation. 1: none.",
                )
                with gr.Accordion("Start from a real image (anatomical similarity)", open=False):
                    start_image = gr.Image(
                        type="filepath", label="Real image", sources=["upload"], height=180,
                        image_mode="L" if first.card.img_channels == 1 else "RGB",
                    )
                    strength = gr.Slider(
                        0.05, 1.0, value=0.6, step=0.05, label="Strength",
                        info="Share of the schedule run from the noised image: lower stays closer to it.",
                    )
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", scale=2)
                    sweep_btn = gr.Button("Ablation sweep", variant="secondary", scale=1)
                gallery = gr.Gallery(
                    label="Results", columns=2, height=680, object_fit="contain", format="png",
                    elem_id="results", buttons=["download", "fullscreen"], preview=False,
                )
                with gr.Row():
                    contours = gr.Checkbox(value=True, label="Outline kept classes", scale=2)
                    download = gr.DownloadButton("Download PNGs, mask and settings", visible=False,
                                                 size="sm", scale=2)
                with gr.Accordion("Settings of these results", open=False):
                    settings_json = gr.JSON(label="Settings", show_label=False)

        on = Handlers(models, editor)
        outputs = [gallery, settings_json, download, run_state]
        picker.change(
            on.switch, picker,
            [editor, legend, keep, examples, model_line, painting_tips, start_image, sampler, steps, guidance, preview,
             *outputs],
            **PRIVATE, **RAW,
        )
        sampler.input(on.sampler_steps, [picker, sampler, steps], steps, **PRIVATE, queue=False)
        sampling, previews = lanes_of(models.lanes)
        generate_btn.click(
            on.on_generate,
            [picker, editor, keep, seed, steps, num_images, sampler, guidance, start_image, strength, contours],
            outputs, **PRIVATE, **sampling,
        )
        sweep_btn.click(
            on.on_sweep, [picker, editor, seed, steps, sampler, guidance, start_image, strength, contours],
            outputs, **PRIVATE, **sampling,
        )
        # No event listens to the editor (HEAD says why): a stroke clicks `stroke_done`, and the page reads the
        # canvas into `canvas` (READ_CANVAS). A mask loaded into the editor is previewed from the file read.
        stroke_done = gr.Button(visible="hidden", elem_id="stroke-done")
        canvas, loaded = gr.Textbox(visible=False), gr.State(None)
        live = dict(outputs=preview, trigger_mode="always_last", show_progress="hidden", **PRIVATE, **previews)
        gr.on([stroke_done.click, keep.change, seed.change], on.on_paint, [picker, canvas, keep, seed],
              js=READ_CANVAS, **live)
        contours.change(on.redraw, [run_state, contours], gallery, **PRIVATE, queue=False)
        reroll.click(lambda: random.randint(0, MAX_SEED), None, seed, **PRIVATE, queue=False)
        for load in (mask_file.upload(on.load_mask, [picker, mask_file], [editor, loaded], **PRIVATE, **RAW),
                     examples.click(on.load_example, [picker, examples], [editor, loaded], **PRIVATE, **RAW)):
            load.success(on.on_paint, [picker, loaded, keep, seed], **live)
        add_api(on, picker, seed, num_images, sampling, previews)
    demo.queue(default_concurrency_limit=1, max_size=32)
    refuse_foreign_files(demo)
    return demo


def lanes_of(lanes: Lanes) -> tuple[dict, dict]:
    """The event settings of sampling and of previews: each lane's requests wait in it together, as many as one
    of its network calls may draw, and are drawn one call at a time."""
    return (
        dict(concurrency_id="model", concurrency_limit=lanes.sample.max_items, **RAW),
        dict(concurrency_id="preview", concurrency_limit=lanes.preview.max_items, **RAW),
    )


def add_api(on: Handlers, picker, seed, num_images, sampling, previews) -> None:
    """The named endpoints `/generate`, `/sweep` and `/preview`, in the page being built.

    They take a mask file instead of the canvas and class names to omit; the page's widgets give the other
    inputs their defaults, and the model is the picker's value, so a request that names none gets the launch
    default. The sampler, steps and mask guidance have none: left out, they are the model's own
    (`Studio.samplers`, `Studio.steps_for`, `Studio.guidance`), whichever model the request names.
    """
    steps = gr.Number(value=None, precision=0, label="steps", visible=False)
    guidance = gr.Number(value=None, label="guidance", visible=False)
    mask = gr.File(label="mask", visible=False)
    sampler = gr.Dropdown([*SAMPLERS, STUDENT], value=None, label="sampler", visible=False)
    omit = gr.Dropdown([], multiselect=True, allow_custom_value=True, value=[], label="omit", visible=False)
    results = [
        gr.Gallery(label="images", visible=False, format="png"),
        gr.JSON(label="settings", visible=False),
        gr.File(label="archive", visible=False),
    ]
    image = gr.Image(label="image", visible=False, format="png")
    gr.Button(visible=False).click(
        on.generate, [mask, omit, seed, steps, num_images, sampler, guidance, picker], results, api_name="generate",
        **sampling,
    )
    gr.Button(visible=False).click(
        on.sweep, [mask, seed, steps, sampler, guidance, picker], results, api_name="sweep", **sampling
    )
    gr.Button(visible=False).click(on.preview, [mask, omit, seed, picker], image, api_name="preview", **previews)


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, **kwargs):
    """Start the server; host and port fall back to GRADIO_SERVER_NAME/PORT, then 127.0.0.1:7860."""
    return demo.launch(
        server_name=host, server_port=port, max_file_size=MAX_UPLOAD, theme=THEME, css=CSS, head=HEAD, **kwargs
    )


def main(argv: list[str] | None = None) -> gr.Blocks:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help=f"a model folder SegDiffPipeline opens, or a Hugging Face Hub id org/name, offered beside "
                             f"the bundled ones and opened first (default: the bundled {DEFAULT_MODEL}, or the first "
                             "bundled model)")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="classes including background, for original checkpoints whose folder cannot say")
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1, or GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, or GRADIO_SERVER_PORT)")
    parser.add_argument("--max_batch", type=int, default=MAX_BATCH,
                        help=f"previews, or images of Generate and sweeps, that requests arriving together share in "
                             f"one network call (default {MAX_BATCH}; 1: each request drawn alone, in turn)")
    args = parser.parse_args(argv)
    if args.model is not None and not (Path(args.model).is_dir() or is_hub_id(args.model)):
        parser.exit(2, f"segdiff studio: no model folder at {args.model}; pass --model PATH to a segdiff model "
                       "folder, an original run folder or a released NAME/unet/ checkpoint, or a Hub id org/name\n")
    try:
        lanes = Lanes(Lane(args.max_batch, on_device=gpu_briefly), Lane(args.max_batch, on_device=gpu))
        models = Models.discover(MODELS, DEFAULT_MODEL, EXAMPLES, args.model, args.num_classes, lanes)
        demo = build_demo(models)
    except SegdiffError as e:
        parser.exit(2, f"segdiff studio: {e}\n")
    # SIGTERM closes the server as Ctrl-C does, so the results folders are removed with it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        launch(demo, args.host, args.port)
    except KeyboardInterrupt:  # before launch() settled into waiting: gradio's own handler is not there yet
        pass
    finally:
        demo.close()
    return demo


if __name__ == "__main__":
    main()
