"""The Hub model card: a model folder's README.md, rendered from its segdiff card.

The Hugging Face Hub shows README.md as the model's page and reads its YAML front matter (licence, library,
tags, task, data sets, base model) for search and filters. `ModelCard.save` writes it beside
`segdiff_card.json` every time, so the two never disagree: edit the segdiff card, not the README.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import ModelCardData

from . import files

if TYPE_CHECKING:  # the card's module writes this one; importing it back would make a cycle
    from .models import ModelCard

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
    model = model_id or "path/to/model-folder"  # `segdiff.hub.push` writes the Hub id here
    what = f"{card.img_size} x {card.img_size} px, {card.img_channels} channel{'s' * (card.img_channels > 1)}"
    sections = [
        f"---\n{front_matter(card).to_yaml()}\n---",
        "<!-- Written by segdiff from segdiff_card.json whenever the card is saved: edit the card, not this file. -->",
        f"# Segmentation-guided diffusion model ({what})",
        _summary(card),
        _use(card, model),
        _classes(card),
        _training(card),
        _data(card),
        _quality(card),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def write(folder: str | os.PathLike, card: ModelCard, model_id: str | None = None) -> Path:
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
    return (
        "## Use\n\nWith segdiff installed:\n\n"
        f'```python\nfrom segdiff import SegDiffPipeline\n\npipe = SegDiffPipeline.from_pretrained("{model}")\n'
        f"images = {call}\n```\n\n"
        f"or paint masks in the studio: `python app.py --model {model}`."
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
    facts = [
        f"{training['steps']} steps" if training.get("steps") else "",
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


def _quality(card: ModelCard) -> str:
    runs = card.quality.get("runs", {})
    if not runs:
        return ""
    names = card.class_names[1:]
    head = ["sampling", "masks", "mean Dice", *names, "Dice on real images", "KID", "FD", "FD real vs real"]
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
        ])  # fmt: skip
    table = "\n".join(
        "| " + " | ".join(str(v) for v in row) + " |" for row in [head, ["---"] * len(head), *rows]
    )
    return (
        "## Measured quality\n\n"
        "Dice of the model's own segmenter on images drawn from held-out test masks, against those masks "
        "(how closely the images follow the mask), beside its Dice on the real test images; realism as KID "
        "and Frechet distance (FD) on the segmenter's pooled features, lower is closer to the real images. "
        "Measured by `python -m segdiff.quality`.\n\n" + table
    )
