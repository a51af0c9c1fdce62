"""UNet presets and the model card that travels with every segdiff model folder."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from diffusers import UNet2DModel

from . import hubcard
from .errors import CheckpointError
from .masks import ENCODINGS, Encoding, Palette, encoding_channels

CARD_FILE = "segdiff_card.json"

# UNet2DModel settings by name. `paper` is the original code's network, unchanged, so that its
# checkpoints load; the smaller ones trade capacity for speed on a laptop CPU.
PRESETS: dict[str, dict] = {
    "paper": dict(  # about 114 M parameters
        layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    ),
    "base": dict(  # about 26 M: for 128-256 px on one GPU
        layers_per_block=2,
        block_out_channels=(64, 64, 128, 256, 256),
        down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 3,
    ),
    "small": dict(  # about 2.7 M: 64 px demo models, 4 images x 12 steps in under a second on two CPU cores
        layers_per_block=1,
        block_out_channels=(16, 32, 64, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
    "tiny": dict(  # tests only
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
}


def build_unet(preset: str, img_size: int, img_channels: int, cond_channels: int) -> UNet2DModel:
    """A fresh UNet taking `img_channels + cond_channels` inputs and predicting `img_channels` of noise."""
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}, expected one of {sorted(PRESETS)}")
    return UNet2DModel(
        sample_size=img_size,
        in_channels=img_channels + cond_channels,
        out_channels=img_channels,
        **PRESETS[preset],
    )


@dataclass
class ModelCard:
    """What a model needs to be used well: its classes, input format, encoding, training and quality.

    Written as `segdiff_card.json` beside `unet/`, with the Hub's README.md rendered from it (`hubcard`);
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
    quality: dict = field(default_factory=dict)  # measured Dice and realism, from segdiff.evaluation
    segmenter: str | None = None  # sub-folder holding the Dice segmenter, when the model has one

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise CheckpointError(f"model card: encoding {self.encoding!r}, expected one of {ENCODINGS}")
        if self.num_classes and not self.class_names:
            palette = Palette.default(self.num_classes)
            self.class_names, self.colors = list(palette.names), [list(c) for c in palette.colors]
        if self.num_classes and not self.colors:
            self.colors = [list(c) for c in Palette.default(self.num_classes).colors]

    @property
    def guided(self) -> bool:
        return self.encoding != "none"

    @property
    def cond_channels(self) -> int:
        return encoding_channels(self.encoding, self.num_classes)

    @property
    def palette(self) -> Palette:
        return Palette(tuple(self.class_names), tuple(tuple(c) for c in self.colors))

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        tmp = folder / f".{CARD_FILE}.{os.getpid()}.tmp"  # open() keeps the umask's permissions; mkstemp's are 0600
        tmp.write_text(json.dumps(asdict(self), indent=2))
        hubcard.write(folder, self)  # README.md, the model's page on the Hub, from the same facts
        os.replace(tmp, folder / CARD_FILE)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ModelCard:
        path = Path(folder) / CARD_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read the model card ({e})") from e
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
