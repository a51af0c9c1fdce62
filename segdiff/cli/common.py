"""What every `python -m segdiff.X` command shares: one flag style, and one way to fail.

Flags are words joined by underscores, as the original code's (`--img_dir`, `--n_train`); each is also
accepted with dashes (`--n-train`), the spelling some of these commands used first. Flags are never
abbreviated: a launcher's own options (torchrun's `--nnodes`, say) cannot be mistaken for a prefix of ours.
A `SegdiffError` ends the command with its one-line message on stderr and exit status 2, as argparse ends
a malformed command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields

from ..errors import SegdiffError


class Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` (and its sub-command parsers) taking `--a_b` and `--a-b` alike."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: str, **kwargs):
        spellings = []
        for name in names:
            if name.startswith("--"):
                word = name[2:]
                spellings += [f"--{word.replace('-', '_')}", f"--{word.replace('_', '-')}"]
            else:
                spellings.append(name)
        return super().add_argument(*dict.fromkeys(spellings), **kwargs)


def defaults(config: type) -> dict:
    """A config dataclass's field defaults by name, for the flags that set its fields: each written once."""
    return {f.name: f.default for f in fields(config) if f.default is not MISSING}


def fail(error: Exception | str) -> None:
    """End the command: `error: <message>` on stderr, exit status 2."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def run(parser: argparse.ArgumentParser, command: Callable[[argparse.Namespace], None],
        argv: Sequence[str] | None = None) -> None:
    """Parse `argv` (default: sys.argv) and run `command` on the flags, failing in words on bad input."""
    args = parser.parse_args(argv)
    try:
        command(args)
    except SegdiffError as e:
        fail(e)


def command_line(
    parser: Callable[[], argparse.ArgumentParser], command: Callable[[argparse.Namespace], None]
) -> Callable[[Sequence[str] | None], None]:
    """A command's `main(argv=None)`: its `parser()`'s flags, then `command(args)` under `run`."""

    def main(argv: Sequence[str] | None = None) -> None:
        run(parser(), command, argv)

    return main
