"""NIfTI volumes in and out: volumes to slices in the original layout, label volumes to synthetic scans.
An image volume may also be a DICOM series: a folder of its slice files, read by `segdiff.data.dicom`.

    python -m segdiff.volumes convert OUT_DIR --images IMG --labels LAB [--classes ...] [--window ...]
    python -m segdiff.volumes synthesize MODEL LABELS.nii.gz OUT.nii.gz [--seed S] [--steps N]

This module is the command line only: `segdiff.data.volumes` converts, and `segdiff.synth.volumes` draws them
(imported by `synthesize` alone, as it brings torch and the model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..choices import DEFAULT_STEPS, MAX_SEED, SPLITS
from ..data.volumes import AXES, WINDOWS, convert, parse_window
from ..errors import VolumeError
from .common import Parser, command_line


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three fractions, e.g. 0.8,0.1,0.1") from e


def parser() -> Parser:
    parser = Parser(prog="python -m segdiff.volumes", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="volumes -> slices in the original layout")
    conv.add_argument("out_dir", type=Path, help="new or empty folder for img/, mask/all/, classes.json, split.json")
    conv.add_argument("--images", required=True, help="an image volume or DICOM series folder, or a folder of "
                      "them (imagesTr/, or one series folder per case named as its label file)")
    conv.add_argument("--labels", required=True, help="its label volume, or a folder of them (labelsTr/)")
    conv.add_argument("--axis", default="axial", choices=list(AXES), help="slice direction (default: axial)")
    conv.add_argument("--window", help=f"CT window: {', '.join(WINDOWS)} or LEVEL,WIDTH in HU")
    conv.add_argument("--normalize", choices=["percentile"],
                      help="0.5-99.5 percentile range per volume (MR); the default without --window")
    conv.add_argument("--size", type=int, default=256, help="square slice size in px (default: 256)")
    conv.add_argument("--keep-empty", action="store_true", help="keep slices without any kept class")
    conv.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1),
                      help="train,val,test fractions of the cases (default: 0.8,0.1,0.1)")
    conv.add_argument("--seed", type=int, default=0,
                      help=f"0..{MAX_SEED}: shuffles the cases before the split (default: 0)")
    synth = commands.add_parser("synthesize", help="draw a volume over a label volume with a model")
    synth.add_argument("model", help="a model folder trained on converted slices, or its Hub id org/name")
    synth.add_argument("labels", help="the label volume (.nii or .nii.gz)")
    synth.add_argument("out", help="the synthetic volume to write (.nii or .nii.gz)")
    synth.add_argument("--data", help="the converted folder, when the model card lacks its settings")
    synth.add_argument("--seed", type=int, default=0, help=f"0..{MAX_SEED} (default: 0)")
    synth.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default: {DEFAULT_STEPS})")
    synth.add_argument("--batch_size", type=int, default=8, help="slices drawn at once (default: 8)")
    synth.add_argument("--independent-noise", action="store_true",
                       help="fresh noise per slice (default: neighbouring slices share noise, no flicker)")
    for sub in (conv, synth):
        sub.add_argument("--classes", help="kept classes by name or id, in order; + merges, NAME= names: "
                         "liver,spleen,kidneys=kidney_left+kidney_right (default: the recorded or named ones)")
        sub.add_argument("--label-names", help="JSON of label id -> name (default: a dataset.json beside)")
    return parser


def command(args) -> None:
    if args.command == "convert":
        if args.window and args.normalize:
            raise VolumeError("--window and --normalize: choose one (a window for CT, percentile for MR)")
        record = convert(args.out_dir, args.images, args.labels, classes=args.classes,
                         names_file=args.label_names, axis=args.axis,
                         window=parse_window(args.window) if args.window else None, size=args.size,
                         keep_empty=args.keep_empty, split=args.split, seed=args.seed, progress=True)
        counts = ", ".join(f"{s} {record['slices'][s]} slices ({len(record['cases'][s])} case(s))" for s in SPLITS)
        print(f"wrote {counts} to {args.out_dir}; classes: {', '.join(record['class_names'])}")
    else:
        from ..synth.volumes import synthesize  # here, not at the top: it imports torch and diffusers

        info = synthesize(args.model, args.labels, args.out, classes=args.classes,
                          names_file=args.label_names, data=args.data, seed=args.seed, steps=args.steps,
                          batch_size=args.batch_size, independent_noise=args.independent_noise,
                          progress=True)
        unit = "HU" if info["window"] else "(the training volumes' median percentile range)"
        print(f"wrote {info['path']}: shape {info['shape']}, {info['drawn']} of {info['slices']} slices drawn, "
              f"intensities {info['intensity_range'][0]:g}..{info['intensity_range'][1]:g} {unit}")


main = command_line(parser, command)
