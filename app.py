"""segdiff studio: paint or upload an anatomy mask, choose the classes the model must keep, and sample.

    python app.py [--model PATH|org/name] [--num_classes K] [--host 127.0.0.1] [--port 7860]

UI only: every action is one call into `segdiff.studio`. The picker offers every bundled model (and the one
given by --model); each loads once, on first use, and stays loaded (`segdiff.registry`).
"""

from __future__ import annotations

import argparse
import functools
import logging
import random
import signal
from pathlib import Path

import gradio as gr
import pydantic
from gradio.context import LocalContext
from gradio.exceptions import InvalidPathError

from segdiff import ConfigError, SegdiffError
from segdiff.choices import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from segdiff.errors import check_integer
from segdiff.hub import is_hub_id
from segdiff.registry import Models
from segdiff.runs import Run
from segdiff.studio import MAX_IMAGES, MAX_SEED, MAX_STEPS, Studio

try:  # on a ZeroGPU Space each sampling call borrows a GPU; elsewhere the decorator changes nothing
    import spaces

    gpu = spaces.GPU(duration=60)
except ImportError:

    def gpu(fn):
        return fn


HERE = Path(__file__).resolve().parent
MODELS = HERE / "assets" / "models"  # the picker offers every folder in here
EXAMPLES = HERE / "assets" / "examples"  # <model name>/ holds that model's example masks
# The model the studio opens on: the real-anatomy one; the first folder found stands in while it is absent.
DEFAULT_MODEL = "psfhs-ultrasound-256"
MAX_UPLOAD = "5mb"
SAMPLER_LABELS = {
    "dpm++": "DPM++ 2M (fast)",
    "unipc": "UniPC (fast)",
    "ddim": "DDIM (original)",
    "ddpm": "DDPM (stochastic, needs ~1000 steps)",
}
THEME = gr.themes.Soft(primary_hue="teal", secondary_hue="slate", neutral_hue="slate")
CSS = """
#results img, #mask-examples img { image-rendering: pixelated; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 14px; font-size: 0.9em; }
.legend span.swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px;
                      vertical-align: -2px; margin-right: 6px; border: 1px solid var(--border-color-primary); }
.model-line { opacity: 0.8; font-size: 0.9em; }
#reroll { align-self: flex-end; margin-bottom: 8px; }
.tips { font-size: 0.88em; opacity: 0.85; }
"""


log = logging.getLogger("segdiff.studio")


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


# ---- private Gradio workarounds: written against gradio 6.x (the Space runs sdk_version 6.31.0) ---------
# Both reach into gradio internals; check them first when gradio is upgraded.


def refuse_foreign_files(demo: gr.Blocks) -> None:
    """Say in words why gradio refuses a request's file before any handler runs (else: `{"error": null}`)."""
    preprocess = demo.preprocess_data

    @functools.wraps(preprocess)
    async def checked(block_fn, *args, **kwargs):
        try:
            return await preprocess(block_fn, *args, **kwargs)
        except InvalidPathError as e:  # a path on the server that no upload created
            raise refusal("only files uploaded to this server are accepted, not paths on it; "
                          "upload the file first (gradio_client: handle_file(path))", block_fn.name) from e
        except pydantic.ValidationError as e:
            raise refusal("a file input holds something else; expected an uploaded file "
                          "(gradio_client: handle_file(path))", block_fn.name) from e

    demo.preprocess_data = checked


def painted_blobs(editor: gr.ImageEditor, value_id: str):
    """The PNG blobs a browser's painting sent ahead of the editor's value, popped from this session's
    editor (once the picker has updated it, the session holds its own copy of the component); None if gone."""
    session = LocalContext.blocks_config.get(None)
    holder = session.blocks.get(editor._id, editor) if session else editor
    return holder.blob_storage.pop(value_id, None)


# ---- the page -------------------------------------------------------------------------------------------


def legend_html(studio: Studio) -> str:
    items = "".join(
        f'<div><span class="swatch" style="background:{studio.palette.hex(i)}"></span>{name}</div>'
        for i, name in enumerate(studio.class_names)
    )
    return f'<div class="legend">{items}</div>'


def tips(studio: Studio) -> str:
    side, scale = studio.size * studio.canvas_scale, studio.canvas_scale
    return (
        f"**Painting.** Pick a class colour from the brush's palette; black paints background and the eraser "
        f"takes paint off. The canvas is {side} px: each {scale} x {scale} block becomes one of the model's "
        f"{studio.size} x {studio.size} pixels, the class covering most of it.\n\n"
        "**Omitting** a class hands its pixels to the model, which may draw that tissue anywhere or nowhere. "
        "**Ablation sweep** renders one noise with all classes kept, then each one omitted in turn. Every PNG "
        "carries its seed, steps, sampler, omitted classes and model in its metadata."
    )


def editor_of(studio: Studio, mask=None) -> dict:
    """What the mask editor shows for a model: its canvas size, brush palette, and `mask` (None: blank).

    A mask goes on the layer, over a black background, so the eraser takes it back to background.
    """
    side, scale = studio.size * studio.canvas_scale, studio.canvas_scale
    layers = [] if mask is None else [studio.layer(mask)]
    return dict(
        value={"background": studio.canvas(), "layers": layers, "composite": None},
        canvas_size=(side, side),
        brush=gr.Brush(
            colors=[studio.palette.hex(i) for i in range(len(studio.class_names))],
            default_color=studio.palette.hex(1),
            color_mode="fixed",
            default_size=3 * scale,
        ),
        eraser=gr.Eraser(default_size=3 * scale),
        height=side + 60,
    )


def build_demo(models: Models) -> gr.Blocks:
    """The studio's page over a registry of models; the picker switches between them."""
    first = models.get()

    # The sampling events take their inputs raw (preprocess=False): gradio would decode every image at
    # whatever size a request claims and round numbers; the studio checks and reads each value itself.
    def path_of(file):
        return file["path"] if isinstance(file, dict) else None

    def mask_of(studio: Studio, value):
        """The editor's raw value -> class ids; its images still undecoded until the studio checks them."""
        if not value:
            return studio.mask_from_editor()
        if value.get("id") is not None:  # a browser's painting arrives first as PNG blobs the editor holds
            blobs = painted_blobs(editor, value["id"])
            if blobs is None:
                return studio.mask_from_editor()
            return studio.mask_from_editor(blobs.background, blobs.layers, blobs.composite)
        layers = [path_of(f) for f in value.get("layers") or ()]
        return studio.mask_from_editor(path_of(value.get("background")), layers, path_of(value.get("composite")))

    def start_of(studio: Studio, image):
        return studio.start_image(path_of(image)) if path_of(image) else None

    def progress_to(progress):
        return lambda step, total: progress((step, total), desc="denoising", unit="steps")

    def gallery_of(run: Run, contours: bool):
        # Up to 4 results as a 2 x 2 grid of large images; more as rows of 4.
        items = models.get(run.settings["model"]).gallery(run, contours)
        return gr.Gallery(items, columns=2 if len(run.images) <= 4 else 4)

    def shown(run: Run, contours: bool):
        for notice in run.notices:
            gr.Info(notice)
        return (
            gallery_of(run, contours),
            run.settings,
            gr.DownloadButton(value=str(run.archive), visible=True),
            run,
        )

    @user_errors
    def switch(name):
        studio = models.get(name)
        names, examples = studio.class_names, models.examples(name)
        return (
            gr.ImageEditor(**editor_of(studio)),
            legend_html(studio),
            gr.CheckboxGroup(names[1:], value=names[1:]),
            gr.Dataset(samples=[[p] for p in examples], visible=bool(examples)),
            studio.summary(),
            tips(studio),
            gr.Image(value=None, image_mode="L" if studio.card.img_channels == 1 else "RGB"),
            gr.Gallery(value=None),
            None,
            gr.DownloadButton(visible=False),
            None,
        )

    def loaded(studio: Studio, path):
        mask, notices = studio.mask_from_file(path)
        for notice in notices:
            gr.Warning(notice)
        return gr.ImageEditor(**editor_of(studio, mask))

    @user_errors
    def load_mask(name, file):
        return loaded(models.get(name), path_of(file)) if path_of(file) else gr.skip()

    @user_errors
    def load_example(name, index):
        examples = models.examples(name)
        index = check_integer("example", index, 0, len(examples) - 1)
        return loaded(models.get(name), examples[index])

    @gpu
    @user_errors
    def on_generate(name, value, keep, seed, steps, num_images, sampler, image, strength, contours,
                    progress=gr.Progress()):  # noqa: B008
        studio = models.get(name)
        settings = studio.settings(keep=keep or [], seed=seed, steps=steps, num_images=num_images,
                                   sampler=sampler, strength=strength)
        run = studio.generate(mask_of(studio, value), settings, start_of(studio, image), progress_to(progress))
        return shown(run, contours)

    @gpu
    @user_errors
    def on_sweep(name, value, seed, steps, sampler, image, strength, contours, progress=gr.Progress()):  # noqa: B008
        studio = models.get(name)
        settings = studio.settings(seed=seed, steps=steps, num_images=1, sampler=sampler, strength=strength)
        run = studio.sweep(mask_of(studio, value), settings, start_of(studio, image), progress_to(progress))
        return shown(run, contours)

    def redraw(run, contours):
        return gallery_of(run, contours) if run is not None else gr.skip()

    def api_run(kind, model, mask, omit, seed, steps, num_images, sampler, progress):
        studio = models.get(model)
        if path_of(mask) is None:
            raise ConfigError("mask: no file given; expected an integer-label PNG, a palette PNG or a .npy")
        settings = studio.settings(omit=omit, seed=seed, steps=steps, num_images=num_images, sampler=sampler)
        labels, notices = studio.mask_from_file(path_of(mask))
        run = getattr(studio, kind)(labels, settings, progress=progress_to(progress), notices=notices)
        return studio.gallery(run), run.settings, str(run.archive)

    @gpu
    @user_errors
    def generate(mask, omit, seed, steps, num_images, sampler, model, progress=gr.Progress()):  # noqa: B008
        return api_run("generate", model, mask, omit, seed, steps, num_images, sampler, progress)

    @gpu
    @user_errors
    def sweep(mask, seed, steps, sampler, model, progress=gr.Progress()):  # noqa: B008
        return api_run("sweep", model, mask, [], seed, steps, 1, sampler, progress)

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
                keep = gr.CheckboxGroup(
                    names[1:], value=names[1:], label="Keep",
                    info="Ticked classes are followed exactly; unticked ones are omitted, and the model may invent them.",
                )
                with gr.Row():
                    num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images")
                    steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Steps")
                with gr.Row():
                    choices = [(SAMPLER_LABELS[s], s) for s in SAMPLERS]
                    sampler = gr.Dropdown(choices, value=DEFAULT_SAMPLER, label="Sampler")
                    seed = gr.Number(value=42, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                    reroll = gr.Button("Random seed", size="md", min_width=80, elem_id="reroll")
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

        # API-only inputs and outputs: a mask file instead of a canvas, class names to omit; the model is
        # the picker's value, so a request that names none gets the launch default.
        api_mask = gr.File(label="mask", visible=False)
        api_omit = gr.Dropdown([], multiselect=True, allow_custom_value=True, value=[], label="omit", visible=False)
        api_gallery = gr.Gallery(label="images", visible=False, format="png")
        api_settings = gr.JSON(label="settings", visible=False)
        api_archive = gr.File(label="archive", visible=False)
        api_generate_btn = gr.Button(visible=False)
        api_sweep_btn = gr.Button(visible=False)

        outputs = [gallery, settings_json, download, run_state]
        private = dict(api_visibility="private")
        raw = dict(preprocess=False)
        model = dict(concurrency_id="model", **raw)
        picker.change(
            switch, picker,
            [editor, legend, keep, examples, model_line, painting_tips, start_image, *outputs], **private, **raw,
        )
        generate_btn.click(
            on_generate, [picker, editor, keep, seed, steps, num_images, sampler, start_image, strength, contours],
            outputs, **private, **model,
        )
        sweep_btn.click(
            on_sweep, [picker, editor, seed, steps, sampler, start_image, strength, contours], outputs,
            **private, **model,
        )
        contours.change(redraw, [run_state, contours], gallery, **private, queue=False)
        reroll.click(lambda: random.randint(0, MAX_SEED), None, seed, **private, queue=False)
        mask_file.upload(load_mask, [picker, mask_file], editor, **private, **raw)
        examples.click(load_example, [picker, examples], editor, **private, **raw)
        api_generate_btn.click(
            generate, [api_mask, api_omit, seed, steps, num_images, sampler, picker],
            [api_gallery, api_settings, api_archive], api_name="generate", **model,
        )
        api_sweep_btn.click(
            sweep, [api_mask, seed, steps, sampler, picker], [api_gallery, api_settings, api_archive],
            api_name="sweep", **model,
        )
    # One sampling job at a time: a second would only halve the speed of both on a small machine.
    demo.queue(default_concurrency_limit=1, max_size=32)
    refuse_foreign_files(demo)
    return demo


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, **kwargs):
    """Start the server; host and port fall back to GRADIO_SERVER_NAME/PORT, then 127.0.0.1:7860."""
    return demo.launch(
        server_name=host, server_port=port, max_file_size=MAX_UPLOAD, theme=THEME, css=CSS, **kwargs
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
    args = parser.parse_args(argv)
    if args.model is not None and not (Path(args.model).is_dir() or is_hub_id(args.model)):
        parser.exit(2, f"segdiff studio: no model folder at {args.model}; pass --model PATH to a segdiff model "
                       "folder, an original run folder or a released NAME/unet/ checkpoint, or a Hub id org/name\n")
    try:
        models = Models.discover(MODELS, DEFAULT_MODEL, EXAMPLES, args.model, args.num_classes)
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
