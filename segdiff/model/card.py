"""The model card that travels with every segdiff model folder, and the Hub README rendered from it.

`segdiff_card.json` holds what a model needs to be used well: its classes and colours, input format, mask
encoding, training record, data credit and measured quality, and the records of its stages (`Upscaling`) and
its few-step student (`Student`). The Hugging Face Hub shows README.md as the model's page and reads its YAML
front matter (licence, library, tags, task, data sets, base model) for search and filters. `ModelCard.save`
writes both every time, so the two never disagree: edit the segdiff card, not the README.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath

from huggingface_hub import ModelCardData

from .. import files
from ..choices import MAX_GUIDANCE, MAX_STEPS, SAMPLERS, STUDENT, is_guidance
from ..data.masks import ENCODINGS, Encoding, Palette, encoding_channels
from ..errors import CheckpointError
from .background import Background

CARD_FILE = "segdiff_card.json"


def check_subfolder(record: str, name) -> None:
    """Refuse a card's sub-folder name that leads out of its model folder (absolute, `..`, or the folder
    itself): a downloaded card must not make the pipeline open, or a save write, any other path on disk."""
    parts = PurePosixPath(name).parts if isinstance(name, str) and "\\" not in name else ()
    if not parts or parts[0] == "/" or ".." in parts:
        raise CheckpointError(
            f"model card: {record} {name!r}; expected a sub-folder of the model folder (a relative path "
            "without '..')"
        )


@dataclass(frozen=True)
class Upscaling:
    """How a cascade's upscaler reads its base model's images; recorded in the upscaler's card."""

    base: str = "base"  # the sub-folder holding the base model
    low_res_size: int = 64  # the base's img_size
    unshuffle: int = 2  # the UNet runs at img_size / unshuffle, on unshuffle^2 x the channels
    # Noise-conditioning augmentation (Ho et al., 2021): training noises the enlarged low-resolution image to
    # a level drawn from 0..max_noise_level, which the UNet is told, so that at sampling time, told
    # `noise_level`, it treats the base's image as a noisy hint, not as detail to copy, errors included.
    max_noise_level: int = 250
    noise_level: int = 100
    steps: int = 4  # the upscaler's sampling steps at the model's default settings
    scheduler: str = "dpm++"  # and its sampler, whatever the base's (benchmarks/upscaler_sampling.py)

    def __post_init__(self):
        check_subfolder("upscale base", self.base)
        if self.unshuffle < 1 or self.low_res_size < 1:
            raise CheckpointError(f"upscaling {self}: expected a positive low_res_size and unshuffle")
        if not 0 <= self.noise_level <= self.max_noise_level < 1000:
            raise CheckpointError(f"upscaling {self}: expected 0 <= noise_level <= max_noise_level < 1000")


@dataclass(frozen=True)
class Student:
    """A few-step student distilled from a model (`segdiff.train.distillation`); recorded in the teacher's card.

    The student's UNet, in `folder`/ beside the teacher's unet/, draws in `steps` DDIM steps on the "trailing"
    grid what the teacher draws in `teacher_steps` DDIM steps on the same grid.
    """

    steps: int = 2
    teacher_steps: int = 12
    folder: str = "student"
    method: str = "progressive distillation"  # Salimans & Ho, 2022; one round of teacher_steps / steps
    training: dict = field(default_factory=dict)  # command, steps, time, hardware

    def __post_init__(self):
        check_subfolder("student folder", self.folder)
        if not 1 <= self.steps <= self.teacher_steps or self.teacher_steps % self.steps:
            raise CheckpointError(
                f"student {self.steps} steps for a teacher's {self.teacher_steps}: expected a divisor of it"
            )


@dataclass(frozen=True)
class Sampling:
    """The settings whose images measured best (`quality evaluate --realism`: most like real scans, most
    faithful to the mask) at a cost the studio affords; recorded in the card, where the studio's Generate and
    sweep start. `sampler` is one of SAMPLERS, or STUDENT: the model's few-step student, in its own `steps`.
    Previews draw with the student, at this mask guidance; `SegDiffPipeline()` keeps its own defaults (the
    student, no guidance), so a call names what it draws."""

    sampler: str
    steps: int
    guidance_scale: float = 1.0  # mask guidance; 1 = none
    measured: dict = field(default_factory=dict)  # what chose it: the measures at these and other settings

    def __post_init__(self):
        whole = isinstance(self.steps, int) and not isinstance(self.steps, bool)
        if self.sampler not in (*SAMPLERS, STUDENT) or not (whole and 1 <= self.steps <= MAX_STEPS):
            raise CheckpointError(
                f"sampling {self.sampler!r} at {self.steps!r} steps: expected one of {[*SAMPLERS, STUDENT]} at 1 "
                f"to {MAX_STEPS} steps"
            )
        scale = self.guidance_scale
        if not is_guidance(scale):
            raise CheckpointError(
                f"sampling at mask guidance {scale!r}: expected a number from 1 (none) to {MAX_GUIDANCE:g}"
            )

    def call(self) -> str:
        """The pipeline call that draws at these settings, as a README shows it."""
        asked = [] if self.sampler == STUDENT else [f'sampler="{self.sampler}"', f"num_inference_steps={self.steps}"]
        if self.guidance_scale != 1:
            asked.append(f"guidance_scale={self.guidance_scale:g}")
        return f"pipe({', '.join(['mask', *asked])})"


@dataclass
class ModelCard:
    """What a model needs to be used well: its classes, input format, encoding, training and quality.

    Written as `segdiff_card.json` beside `unet/`, with the Hub's README.md rendered from it (`render`);
    original checkpoints get one built from their config.
    """

    num_classes: int  # including background 0; 0 for unconditional models
    img_channels: int
    img_size: int
    encoding: Encoding = "onehot"
    class_names: list[str] = field(default_factory=list)
    colors: list[list[int]] = field(default_factory=list)
    preset: str | None = None
    training: dict = field(default_factory=dict)  # command, steps, time, hardware
    # Where the training images came from, for the credit their licence asks: name, source, licence,
    # citation, the changes made. Shown by the studio and kept with every copy of the model.
    dataset: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)  # measured Dice and realism, from segdiff.model.sampling
    segmenter: str | None = None  # sub-folder holding the Dice segmenter, when the model has one
    upscale: dict = field(default_factory=dict)  # an upscaler's `Upscaling`; {} for one-stage models
    student: dict = field(default_factory=dict)  # its few-step `Student`; {} for models without one
    # The `dataset synthesize` settings whose pairs trained segmenters best (deform, steps, scheduler,
    # guidance_scale; checked by `segdiff.synth.pairs`), used wherever a run's flags leave them open.
    synthesis: dict = field(default_factory=dict)
    # Its scans' constant `Background` outside their field of view, which the pipeline draws exactly; {} for
    # models whose images have none.
    background: dict = field(default_factory=dict)
    # Its `Sampling`: the settings the studio generates at by default; {} for the pipeline's defaults.
    sampling: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise CheckpointError(f"model card: encoding {self.encoding!r}, expected one of {ENCODINGS}")
        if self.num_classes and not self.class_names:
            palette = Palette.default(self.num_classes)
            self.class_names, self.colors = list(palette.names), [list(c) for c in palette.colors]
        if self.num_classes and not self.colors:
            self.colors = [list(c) for c in Palette.default(self.num_classes).colors]
        if self.segmenter is not None:
            check_subfolder("segmenter", self.segmenter)
        for name, record in (("upscale", "upscaling"), ("student", "distilled"), ("background", "backdrop"),
                             ("sampling", "generation")):
            try:
                getattr(self, record)  # refuses a damaged record now, not mid-sampling
            except TypeError as e:
                raise CheckpointError(
                    f"model card: {name} {getattr(self, name)} is not a valid record ({e})"
                ) from e
        if self.generation is not None and self.generation.sampler == STUDENT and not self.student:
            raise CheckpointError(f"model card: sampling {self.sampling} names the student, and the model has none")

    @property
    def guided(self) -> bool:
        return self.encoding != "none"

    @property
    def upscaling(self) -> Upscaling | None:
        return Upscaling(**self.upscale) if self.upscale else None

    @property
    def distilled(self) -> Student | None:
        return Student(**self.student) if self.student else None

    @property
    def backdrop(self) -> Background | None:
        return Background(**self.background) if self.background else None

    @property
    def generation(self) -> Sampling | None:
        return Sampling(**self.sampling) if self.sampling else None

    @property
    def last_training(self) -> dict:
        """The record of the model's last training run: its student's distillation, when it has one."""
        return self.student.setdefault("training", {}) if self.student else self.training

    @property
    def cond_channels(self) -> int:
        """Input channels beside the noisy image: the encoded mask, and an upscaler's low-resolution image."""
        low_res = self.img_channels if self.upscale else 0
        return low_res + encoding_channels(self.encoding, self.num_classes)

    @property
    def palette(self) -> Palette:
        return Palette(tuple(self.class_names), tuple(tuple(c) for c in self.colors))

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        text = json.dumps(asdict(self), indent=2)
        write_readme(folder, self)  # README.md, the model's page on the Hub, from the same facts
        files.write_text(folder / CARD_FILE, text)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ModelCard:
        path = Path(folder) / CARD_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read the model card ({e})") from e
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (CheckpointError, TypeError) as e:  # a record refused, or a field missing
            raise CheckpointError(f"{path}: {str(e).removeprefix('model card: ')}") from e


README = "README.md"
TAGS = ["segdiff", "diffusers", "medical-imaging", "segmentation-guided-diffusion"]
# Hub licence ids of the licences data sets are usually published under, by their names as people write
# them (lower case, punctuation as spaces); the longest name the card's licence text starts with wins.
LICENSES = {
    "cc by 4.0": "cc-by-4.0",
    "cc by sa 4.0": "cc-by-sa-4.0",
    "cc by nc 4.0": "cc-by-nc-4.0",
    "cc by nc sa 4.0": "cc-by-nc-sa-4.0",
    "cc by nc nd 4.0": "cc-by-nc-nd-4.0",
    "cc by nd 4.0": "cc-by-nd-4.0",
    "cc0": "cc0-1.0",
    "apache 2.0": "apache-2.0",
    "mit": "mit",
}


def hub_license(text: str | None) -> str:
    """The Hub licence id for a licence as the card's data credit names it; "other" when none matches."""
    words = re.sub(r"[^a-z0-9.]+", " ", (text or "").lower()).strip()
    matches = [name for name in LICENSES if words == name or words.startswith(f"{name} ")]
    return LICENSES[max(matches, key=len)] if matches else "other"


def front_matter(card: ModelCard) -> ModelCardData:
    """The README's YAML metadata: licence of the training data, segdiff as the library, the task."""
    return ModelCardData(
        license=hub_license(card.dataset.get("license")),
        library_name="segdiff",
        tags=TAGS,
        pipeline_tag="image-to-image" if card.guided else "unconditional-image-generation",
        datasets=[card.dataset["hub_id"]] if card.dataset.get("hub_id") else None,
        base_model=card.training.get("base_model"),
    )


def render(card: ModelCard, model_id: str | None = None) -> str:
    """README.md text: front matter, then use, classes, training, data credit and measured quality.

    `model_id` (a Hub id or a folder) is what the usage example opens; a placeholder when None.
    """
    model = model_id or "path/to/model-folder"  # `segdiff.hub.publish.push` writes the Hub id here
    what = f"{card.img_size} x {card.img_size} px, {card.img_channels} channel{'s' * (card.img_channels > 1)}"
    sections = [
        f"---\n{front_matter(card).to_yaml()}\n---",
        "<!-- Written by segdiff from segdiff_card.json whenever the card is saved: edit the card, not this file. -->",
        f"# Segmentation-guided diffusion model ({what})",
        _summary(card),
        _use(card, model),
        _synthesis(card, model),
        _classes(card),
        _training(card),
        _data(card),
        _quality(card),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def write_readme(folder: str | os.PathLike, card: ModelCard, model_id: str | None = None) -> Path:
    """Write `folder/README.md` for `card` through a temporary file; returns its path."""
    return files.write_text(Path(folder) / README, render(card, model_id))


def _summary(card: ModelCard) -> str:
    if not card.guided:
        return "An unconditional pixel-space diffusion model, opened and sampled with segdiff."
    kept = ", ".join(card.class_names[1:])
    return (
        f"A pixel-space diffusion model that draws images following a {card.num_classes}-class mask "
        f"({kept}; class 0 is background), pixel for pixel, in the manner of Konz et al., MICCAI 2024. "
        f"Any class may be omitted at sampling time: the model then invents that tissue. Masks enter the UNet "
        f"with the `{card.encoding}` encoding."
    )


def _use(card: ModelCard, model: str) -> str:
    call = (
        f"pipe(mask, omit=[]).images  # mask: ({card.img_size}, {card.img_size}) class ids 0..{card.num_classes - 1}"
        if card.guided
        else "pipe(batch_size=4).images"
    )
    chosen = card.generation
    realistic = (
        f"\n\nThe call above draws at the defaults, the fastest. The images that measured best came from "
        f"`{chosen.call()}`, where the studio's Generate starts."
        if chosen and card.guided
        else ""
    )
    return (
        "## Use\n\nWith segdiff installed:\n\n"
        f'```python\nfrom segdiff import SegDiffPipeline\n\npipe = SegDiffPipeline.from_pretrained("{model}")\n'
        f"images = {call}\n```\n\n"
        f"or paint masks in the studio: `python app.py --model {model}`.{realistic}"
    )


def _synthesis(card: ModelCard, model: str) -> str:
    if not card.synthesis:
        return ""
    flags = " ".join(f"--{key} {value:g}" if isinstance(value, float) else f"--{key} {value}"
                     for key, value in card.synthesis.items())  # fmt: skip
    command = f"python -m segdiff.dataset synthesize {model} OUT --masks MASK_DIR --n 512"
    return (
        "## Synthetic pairs\n\nImage-mask pairs for training segmenters, an image drawn for each of your "
        f"masks (bent into new anatomy, or as they are):\n\n```bash\n{command}\n```\n\n"
        f"draws them at the settings whose pairs trained segmenters best, `{flags}`; flags override them."
    )


def _classes(card: ModelCard) -> str:
    if not card.guided:
        return ""
    palette = card.palette
    rows = [f"| {i} | {name} | `{palette.hex(i)}` |" for i, name in enumerate(card.class_names)]
    return "## Classes\n\n| id | class | colour |\n|---|---|---|\n" + "\n".join(rows)


def _training(card: ModelCard) -> str:
    training = card.training
    lines = []
    if training.get("command"):
        lines.append(f"```bash\n{training['command']}\n```")
    if training.get("source"):
        lines.append(f"Trained by {training['source']}.")
    images = training.get("images") if isinstance(training.get("images"), dict) else {}
    facts = [
        f"{training['steps']} steps" if training.get("steps") else "",
        f"on {images['labelled']} labelled and {images['unlabelled']} unlabelled images"
        if images.get("labelled") and images.get("unlabelled")
        else "",
        f"{training['seconds'] / 3600:.2f} h" if training.get("seconds") else "",
        f"on {training['hardware']}" if training.get("hardware") else "",
        f"recipe {training['recipe']['name']}" if isinstance(training.get("recipe"), dict) else "",
        f"mixed precision {training['mixed_precision']}" if training.get("mixed_precision") else "",
    ]
    if any(facts):
        sentence = ", ".join(f for f in facts if f)
        lines.append(sentence[0].upper() + sentence[1:] + ".")
    if isinstance(training.get("data"), str):
        lines.append(f"Data: {training['data']}")
    if card.preset:
        lines.append(f"UNet preset `{card.preset}`.")
    return "## Training\n\n" + "\n\n".join(lines) if lines else ""


def _data(card: ModelCard) -> str:
    credit = card.dataset
    if not credit:
        return "## Training data\n\nThe card records no data credit; ask the model's author for the data's terms."
    labels = {"name": "Data set", "source": "Source", "license": "Licence", "citation": "Cite",
              "changes": "Changes made"}  # fmt: skip
    lines = [f"- **{label}**: {credit[key]}" for key, label in labels.items() if credit.get(key)]
    return "## Training data\n\n" + "\n".join(lines)


_FIELD_MEASURES = {"frd": "FRD (real vs real)", "classifier": "classifier accuracy (real vs real)"}


def _quality(card: ModelCard) -> str:
    runs = card.quality.get("runs", {})
    if not runs:
        return ""
    names = card.class_names[1:]
    head = ["sampling", "masks", "mean Dice", *names, "Dice on real images", "KID", "FD", "FD real vs real"]
    # FRD and the classifier test, where any run measured them, each beside its real-vs-real floor
    measured = [m for m in _FIELD_MEASURES if any(m in r.get("realism", {}) for r in runs.values())]
    head += [_FIELD_MEASURES[m] for m in measured]
    rows = []
    for label, run in runs.items():
        dice, real, realism = run.get("dice", {}), run.get("real", {}), run.get("realism", {})
        rows.append([
            label,
            run.get("settings", {}).get("num_masks", ""),
            run.get("mean_dice", ""),
            *(dice.get(name, "") for name in names),
            real.get("mean_dice", ""),
            realism.get("kid", {}).get("mean", ""),
            realism.get("fd", ""),
            realism.get("baseline_fd", ""),
            *(f"{realism[m]} ({realism.get(f'baseline_{m}', '?')})" if m in realism else "" for m in measured),
        ])  # fmt: skip
    table = "\n".join(
        "| " + " | ".join(str(v) for v in row) + " |" for row in [head, ["---"] * len(head), *rows]
    )
    return (
        "## Measured quality\n\n"
        "Dice of the model's own segmenter on images drawn from held-out test masks, against those masks "
        "(how closely the images follow the mask), beside its Dice on the real test images; realism as KID "
        "and Frechet distance (FD) on the segmenter's pooled features, lower is closer to the real images"
        + (
            "; FRD, the Frechet radiomics distance (`frd-score`), and the held-out accuracy of a small CNN "
            "trained to tell generated from real images (0.5: it cannot), each beside the same measure on "
            "real images alone"
            if measured
            else ""
        )
        + ". Measured by `python -m segdiff.quality`.\n\n"
        + table
    )
