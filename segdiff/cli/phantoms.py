"""python -m segdiff.phantoms OUT_DIR [--family breast|ct] [--size 64] [--n_train N] [--n_val N] [--n_test N]
[--seed S]: a synthetic phantom data set in the original layout (`segdiff.data.phantoms`)."""

from __future__ import annotations

from pathlib import Path

from ..choices import MAX_SEED
from ..data.phantoms import FAMILIES, MAX_SIZE, MIN_SIZE, write_dataset
from ..errors import ArgumentError
from .common import Parser, command_line


def parser() -> Parser:
    parser = Parser(prog="python -m segdiff.phantoms",
                    description="Write a synthetic phantom data set in the original layout.")
    parser.add_argument("out_dir", type=Path, help="new or empty folder for img/, mask/all/ and classes.json")
    parser.add_argument("--family", default="breast", help=f"one of {', '.join(FAMILIES)} (default: breast)")
    parser.add_argument("--size", type=int, default=64, help="image side in px (default: 64)")
    parser.add_argument("--n_train", type=int, default=800, help="training cases (default: 800)")
    parser.add_argument("--n_val", type=int, default=64, help="validation cases (default: 64)")
    parser.add_argument("--n_test", type=int, default=64, help="test cases (default: 64)")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"0..{MAX_SEED}: case i depends only on (seed, i) (default: 0)")
    return parser


def command(args) -> None:
    if args.family not in FAMILIES:
        raise ArgumentError(f"--family {args.family!r}: expected one of {', '.join(FAMILIES)}")
    if not MIN_SIZE <= args.size <= MAX_SIZE:
        raise ArgumentError(f"--size {args.size}: expected {MIN_SIZE}..{MAX_SIZE} px")
    for flag in ("n_train", "n_val", "n_test"):
        if getattr(args, flag) < 0:
            raise ArgumentError(f"--{flag} {getattr(args, flag)}: expected a count >= 0")
    if args.n_train + args.n_val + args.n_test == 0:
        raise ArgumentError("--n_train, --n_val and --n_test are all 0: nothing to write")
    try:
        out = write_dataset(args.out_dir, family=args.family, size=args.size, n_train=args.n_train,
                            n_val=args.n_val, n_test=args.n_test, seed=args.seed, progress=True)
    except FileExistsError as error:
        raise ArgumentError(str(error)) from error
    print(f"wrote {args.n_train} train, {args.n_val} val, {args.n_test} test {args.family} phantoms "
          f"({args.size}x{args.size} px, seed {args.seed}) to {out}")


main = command_line(parser, command)
