"""What a run of `python -m segdiff.dataset synthesize` draws (`Settings`), and where each setting comes from.

Settings a run leaves open (deform, steps, scheduler, guidance_scale) are the model card's recommendation
(`ModelCard.synthesis`: the settings whose pairs trained segmenters best), else DEFAULTS; the manifest records
the settings used and, for these, whether a flag, the card or the default gave each (`recommended`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

from ..choices import MAX_GUIDANCE, MAX_STEPS, SAMPLERS, STUDENT, check_seed, is_guidance
from ..data.masks import DEFORM_LEVELS
from ..errors import CheckpointError, ConfigError, check_integer
from ..model.card import CARD_FILE, ModelCard

LAYOUTS = ("original", "nnunet")
MAX_PAIRS = 2**24  # pair i's draw a has the noise of index i + a * MAX_PAIRS
MAX_BATCH = 1024  # images drawn at once: memory runs out long before more would draw faster
# What a run draws where neither its settings nor the model card's recommendation say.
DEFAULTS = {"deform": "mild", "steps": None, "scheduler": None, "guidance_scale": 1.0}


@dataclass(frozen=True)
class Settings:
    """What a run draws; a rerun continues a folder only when every one of these is the same.

    Those named in DEFAULTS, left None, are taken from the model card or DEFAULTS when the model is opened
    (`recommended`); the others are as given.
    """

    model: str
    masks: str
    n: int | None = None  # None: one pair per mask
    deform: str | None = None
    layout: str = "original"
    seed: int = 0
    batch_size: int = 16
    steps: int | None = None  # None with scheduler None: the model's defaults (its student, if it has one)
    scheduler: str | None = None  # a sampler, or STUDENT: the model's distilled student, in its own steps
    guidance_scale: float | None = None  # mask guidance; 1 = none
    min_dice: float | None = None  # redraw pairs the segmenter reads back below this
    segmenter: str | None = None  # None: the model's own

    def __post_init__(self):
        # One folder whatever the spelling: `masks/` and `./masks` are `masks`.
        object.__setattr__(self, "model", os.path.normpath(self.model))
        object.__setattr__(self, "masks", os.path.normpath(self.masks))
        if self.n is not None and not 1 <= self.n < MAX_PAIRS:
            raise ConfigError(f"--n {self.n}: expected a number of pairs from 1 to {MAX_PAIRS - 1}")
        check_seed(self.seed)
        check_integer("--batch_size", self.batch_size, 1, MAX_BATCH)
        if self.steps is not None:  # typed: a card's JSON may hold 12.0
            object.__setattr__(self, "steps", check_integer("--steps", self.steps, 1, MAX_STEPS))
        if self.deform is not None and self.deform not in DEFORM_LEVELS:
            raise ConfigError(f"--deform {self.deform}: expected one of {', '.join(DEFORM_LEVELS)}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"--layout {self.layout}: expected one of {', '.join(LAYOUTS)}")
        if self.scheduler is not None and self.scheduler not in (*SAMPLERS, STUDENT):
            raise ConfigError(
                f"--scheduler {self.scheduler}: expected one of {', '.join(SAMPLERS)}, or {STUDENT} (the "
                "model's distilled student)"
            )
        if self.scheduler == STUDENT and self.steps is not None:
            raise ConfigError(
                f"--steps {self.steps} with --scheduler {STUDENT}: the student draws in the steps it was "
                "distilled for; drop one of them"
            )
        if self.guidance_scale is not None and not is_guidance(self.guidance_scale):
            raise ConfigError(
                f"--guidance_scale {self.guidance_scale}: expected 1 (none) to {MAX_GUIDANCE:g}"
            )
        if self.min_dice is not None and not 0 < self.min_dice < 1:
            raise ConfigError(f"--min_dice {self.min_dice}: expected a Dice between 0 and 1")
        if self.segmenter is not None and self.min_dice is None:
            raise ConfigError("--segmenter: it reads the images back for --min_dice; give --min_dice too")


def recommended(settings: Settings, card: ModelCard) -> tuple[Settings, dict[str, str]]:
    """`settings` with each of DEFAULTS it leaves None taken from the card's recommendation
    (`card.synthesis`), else from DEFAULTS -> (those settings, where each came from: "flag", "card" or
    "default")."""
    advice = card.synthesis
    where = f"{settings.model}/{CARD_FILE}: synthesis {advice}"
    if not isinstance(advice, dict) or set(advice) - set(DEFAULTS):
        raise CheckpointError(f"{where}: expected settings among {', '.join(DEFAULTS)}")
    chosen, source = {}, {}
    for key, default in DEFAULTS.items():
        given = getattr(settings, key)
        if given is not None:
            chosen[key], source[key] = given, "flag"
        elif key in advice:
            chosen[key], source[key] = advice[key], "card"
        else:
            chosen[key], source[key] = default, "default"
    if chosen["scheduler"] == STUDENT and chosen["steps"] is not None:
        # Steps and the student exclude each other: one asked by a flag outranks the other from the card.
        for key in ("steps", "scheduler"):
            if source[key] == "card":
                chosen[key], source[key] = DEFAULTS[key], "default"
                break
    try:
        settings = replace(settings, **chosen)
    except (ConfigError, TypeError) as e:
        if "card" not in source.values():
            raise
        raise CheckpointError(f"{where}: {e}") from e
    if settings.scheduler == STUDENT and card.distilled is None:
        asked = "--scheduler" if source["scheduler"] == "flag" else where + ": scheduler"
        raise ConfigError(f"{asked} {STUDENT}: {settings.model} has no distilled student")
    return settings, source


def differences(before: dict, now: dict) -> list[str]:
    """The settings of `now` unlike those of `before` (an earlier run's), as "name old -> new"."""
    defaults = {f.name: f.default for f in fields(Settings)} | DEFAULTS  # of settings added since that run

    def same(key: str, old, new) -> bool:  # a folder by any spelling (relative, absolute, `/` at the end)
        if key in ("model", "masks", "segmenter") and isinstance(old, str) and isinstance(new, str):
            return os.path.realpath(old) == os.path.realpath(new)
        return old == new

    return [
        f"{k} {before.get(k, defaults.get(k))!r} -> {v!r}"
        for k, v in now.items()
        if not same(k, before.get(k, defaults.get(k)), v)
    ]


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard I/N` -> (I, N): the shard of a run split N ways that this one draws, 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index = count = -1
    if not 0 <= index < count:
        raise ConfigError(f"--shard {text}: expected I/N with 0 <= I < N, such as 0/4 for the first of four")
    return index, count
