"""The README's library snippet runs as written, from the checkout, on a bundled model and example mask."""

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def library_snippet() -> str:
    """The first python block under README.md's "## The library" heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## The library\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert blocks, "README.md: no python block under '## The library'"
    return blocks[0]


def test_the_readme_library_snippet_runs_on_a_bundled_example(monkeypatch):
    monkeypatch.chdir(ROOT)  # its paths are the checkout's, as the README says
    names: dict = {}
    exec(compile(library_snippet(), "README.md (## The library)", "exec"), names)
    pipe, mask, out = names["pipe"], names["mask"], names["out"]
    size = pipe.card.img_size
    # The palette-coloured example reads as class ids, every class of the model present.
    assert mask.shape == (size, size) and set(np.unique(mask)) == set(range(pipe.card.num_classes))
    assert len(out.images) == 1 and out.images[0].size == (size, size)
