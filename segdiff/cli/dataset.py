"""python -m segdiff.dataset synthesize MODEL OUT --masks MASK_DIR [...]: new image-mask pairs
(`segdiff.synth.pairs`)."""

from __future__ import annotations

from ..data.masks import DEFORM_LEVELS
from ..model.pipeline import DEFAULT_SCHEDULER, DEFAULT_STEPS
from ..synth import pairs
from ..synth.pairs import LAYOUTS, MAX_ATTEMPTS, Settings, synthesize
from .common import Parser, run


def parser() -> Parser:
    parser = Parser(prog="python -m segdiff.dataset", description=pairs.__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synthesize", help="new image-mask pairs from a model and deformed masks")
    synth.add_argument("model", help="a segmentation-guided model folder")
    synth.add_argument(
        "out", help="the folder to write (new, empty, or an earlier run of the same arguments)"
    )
    synth.add_argument("--masks", required=True, help="a folder of mask PNGs, e.g. DATA/mask/all/train")
    synth.add_argument("--n", type=int, help="pairs to write (default: one per mask)")
    synth.add_argument("--deform", default="mild", help=f"one of {', '.join(DEFORM_LEVELS)} (default: mild)")
    synth.add_argument(
        "--layout", default="original", help=f"one of {', '.join(LAYOUTS)} (default: original)"
    )
    synth.add_argument("--seed", type=int, default=0, help="pair i depends only on (seed, i) (default: 0)")
    synth.add_argument("--batch_size", type=int, default=16, help="images drawn at once (default: 16)")
    synth.add_argument(
        "--steps", type=int, help=f"sampling steps (default: the model's defaults: its few-step student "
        f"where it has one, else {DEFAULT_SCHEDULER} {DEFAULT_STEPS})",
    )  # fmt: skip
    synth.add_argument(
        "--guidance_scale", type=float, default=1.0, help="mask guidance: above 1, images follow their masks "
        "more closely, at twice the cost per step (default: 1, none)",
    )  # fmt: skip
    synth.add_argument(
        "--min_dice", type=float, help="quality control: redraw (new noise, up to "
        f"{MAX_ATTEMPTS} draws) each pair whose image the segmenter reads back at a mean Dice below this, "
        "leaving out pairs no draw brings to it; each pair's check goes into the manifest",
    )  # fmt: skip
    synth.add_argument(
        "--segmenter",
        help="with --min_dice: a segmenter folder to read the images (default: the model's own)",
    )
    return parser


def command(args) -> None:
    settings = Settings(
        model=str(args.model), masks=str(args.masks), n=args.n, deform=args.deform, layout=args.layout,
        seed=args.seed, batch_size=args.batch_size, steps=args.steps, guidance_scale=args.guidance_scale,
        min_dice=args.min_dice, segmenter=args.segmenter,
    )  # fmt: skip
    result = synthesize(settings, args.out, progress=True)
    rate = result["drawn"] / result["seconds"] if result["drawn"] else float("nan")
    print(
        f"wrote {result['drawn']} pairs to {result['folder']} ({result['skipped']} already there) in "
        f"{result['seconds']:.1f} s: {rate:.2f} pairs/s on {result['device']}, {result['threads']} thread(s)"
    )
    if result["dropped"]:
        print(f"{result['dropped']} of them left out: no draw read back at --min_dice {args.min_dice:g}")



def main(argv: list[str] | None = None) -> None:
    run(parser(), command, argv)


if __name__ == "__main__":
    main()
