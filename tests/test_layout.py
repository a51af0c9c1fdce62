"""The package map is the architecture: imports run down the layers, and no modules import each other."""

import ast
from pathlib import Path

import segdiff

ROOT = Path(segdiff.__file__).parent
# Lower layers never import higher ones; the ground floor is every top-level module but the command names.
LAYERS = {"data": 1, "model": 2, "measure": 3, "train": 3, "synth": 4, "studio": 5, "hub": 5, "cli": 6}
COMMANDS = {"dataset", "phantoms", "quality", "volumes"}  # two-line modules over segdiff.cli


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    if parts[1] in COMMANDS:
        return 7
    return LAYERS.get(parts[1], 0)


def imports(path: Path) -> set[str]:
    """The segdiff modules `path` imports, at the top or inside functions."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            for alias in node.names:  # `from . import files` imports a module, `from .x import f` a name
                candidate = f"{target}.{alias.name}"
                found.add(candidate if (ROOT.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                          else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] == "segdiff"}


GRAPH = {module_name(p): imports(p) for p in ROOT.rglob("*.py") if p.name != "__main__.py"}


def test_imports_run_down_the_layers():
    upward = [(m, i) for m, deps in GRAPH.items() for i in deps
              if layer(i) > layer(m) and not (m == "segdiff" or i.startswith(f"{m}."))]
    assert upward == []


def test_no_import_loops():
    def reaches(start, goal, seen):
        for nxt in GRAPH.get(start, ()):
            if nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)):
                return True
        return False

    loops = [m for m in GRAPH if m != "segdiff" and reaches(m, m, set())]
    assert loops == []
