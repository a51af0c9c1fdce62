"""The studio's models by name (`Models`): each opened into a `Studio` on first use and kept open."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ..errors import CheckpointError
from ..model.pipeline import SegDiffPipeline
from ..resolve import model_folder
from .actions import Recipe, Studio, model_name
from .batching import Lanes


class Models:
    """The studio's models by name. Each opens on first use and stays open: a click costs a dict lookup.

    folders: name -> model folder, in the picker's order; default: the name a request without one gets;
    examples: a folder holding `<name>/` folders of example masks; num_classes: for folders that cannot say;
    lanes: where every model's network calls are drawn, batched (default: batches of up to 32 images).
    """

    def __init__(
        self,
        folders: dict[str, Path],
        default: str,
        examples: Path | None = None,
        num_classes: dict[str, int] | None = None,
        lanes: Lanes | None = None,
    ):
        if default not in folders:
            raise CheckpointError(f"default model {default!r}: expected one of {list(folders)}")
        self.folders, self.default, self.examples_root = dict(folders), default, examples
        self.num_classes = num_classes or {}
        # The lanes' calls find their model by name: on ZeroGPU they run in a worker forked from this process,
        # which opens a model the fork did not hold.
        self.lanes = (lanes or Lanes()).serve(self.draw_batch)
        self._open: dict[str, tuple[Studio, list[str]]] = {}
        self._lock = threading.Lock()  # two first requests for one model load it once

    @classmethod
    def discover(
        cls,
        root: str | os.PathLike,
        preferred: str,
        examples: Path | None = None,
        model: str | os.PathLike | None = None,
        num_classes: int | None = None,
        lanes: Lanes | None = None,
    ) -> Models:
        """Every model folder in `root`, sorted, plus `model` (a folder, or a Hub id fetched now). The default
        is `model` when given, else `preferred` when present, else the first folder found."""
        root = Path(root)
        found = (
            sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if root.is_dir()
            else []
        )
        folders = {p.name: p for p in found}
        if model is not None:
            folders[model_name(model)] = model_folder(model)
        if not folders:
            raise CheckpointError(f"{root}: no model folder inside, and no model given by path")
        default = (
            model_name(model)
            if model is not None
            else preferred
            if preferred in folders
            else next(iter(folders))
        )
        return cls(folders, default, examples, {default: num_classes} if num_classes else None, lanes)

    @classmethod
    def of(cls, studio: Studio, examples: Path | None = None) -> Models:
        """A registry of one model already opened (a benchmark's own precision, a test's tiny model)."""
        models = cls({studio.name: studio.folder}, studio.name, examples, lanes=studio.lanes)
        models._open[studio.name] = (studio, models._examples_of(studio))
        return models

    def draw_batch(self, recipe: Recipe, items: list, progress) -> list:
        """One network call of the lanes (`Studio.draw_batch`), by the model the recipe names."""
        return self.get(recipe.model).draw_batch(recipe, items, progress)

    @property
    def names(self) -> list[str]:
        return list(self.folders)

    def get(self, name: str | None = None) -> Studio:
        """The studio of model `name` (None or "": the default), opening it on first use."""
        return self._entry(name)[0]

    def examples(self, name: str | None = None) -> list[str]:
        """The model's example masks (`<examples>/<name>/*.png|npy`) as previews it reads exactly."""
        return self._entry(name)[1]

    def _entry(self, name: str | None) -> tuple[Studio, list[str]]:
        name = self.default if name is None or name == "" else name
        if not isinstance(name, str) or name not in self.folders:
            raise CheckpointError(f"model {name!r}: not one of this studio's models {self.names}")
        if name in self._open:  # the common case takes no lock: a click never waits on another model's load
            return self._open[name]
        with self._lock:
            if name not in self._open:
                pipe = SegDiffPipeline.from_pretrained(
                    self.folders[name], num_classes=self.num_classes.get(name)
                )
                studio = Studio(pipe, self.folders[name], name, self.lanes)
                self._open[name] = (studio, self._examples_of(studio))
            return self._open[name]

    def _examples_of(self, studio: Studio) -> list[str]:
        return studio.example_masks(self.examples_root / studio.name) if self.examples_root else []
