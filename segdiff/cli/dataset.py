"""python -m segdiff.dataset synthesize MODEL OUT --masks MASK_DIR [...]: new image-mask pairs
(`segdiff.synth.pairs`); `merge` finishes a run drawn in shards (`--shard I/N`).

Under torchrun, spell the number of pairs `--num_pairs N`: torchrun reads every `--n...` it is given, even
after the module's name, as an abbreviation of its own options (`--nnodes`, `--nproc_per_node`) and stops.
`accelerate launch` passes `--n` through.
"""

from __future__ import annotations

from ..choices import DEFAULT_SAMPLER, DEFAULT_STEPS, MAX_SEED, MAX_STEPS, SAMPLERS, STUDENT
from ..data.masks import DEFORM_LEVELS
from ..synth import pairs
from ..synth.pairs import MAX_ATTEMPTS, synthesize
from ..synth.settings import DEFAULTS, LAYOUTS, MAX_BATCH, Settings, parse_shard
from .common import Parser, command_line, defaults

CARD = "the model card's recommendation, else"  # where a setting comes from when no flag gives it


def parser() -> Parser:
    parser = Parser(prog="python -m segdiff.dataset", description=pairs.__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synthesize", help="new image-mask pairs from a model and deformed masks")
    add_settings(synth)
    synth.add_argument(
        "--shard", help="I/N: draw only the I-th of N shares of the pairs (0 <= I < N), as one task of a "
        "cluster's array job, each into the same OUT; then `merge` (or this command without --shard)",
    )  # fmt: skip
    merge = commands.add_parser(
        "merge", help="after every --shard run: check that all the pairs are there, then write manifest.json "
        "and the layout's files; the same arguments as those runs, without --shard",
    )  # fmt: skip
    add_settings(merge)
    return parser


def add_settings(command: Parser) -> None:
    """The arguments that fix what a run draws (`Settings`)."""
    default = defaults(Settings)
    command.add_argument("model", help="a segmentation-guided model folder")
    command.add_argument(
        "out", help="the folder to write (new, empty, or an earlier run of the same arguments)"
    )
    command.add_argument("--masks", required=True, help="a folder of mask PNGs, e.g. DATA/mask/all/train")
    command.add_argument(
        "--n", "--num_pairs", type=int, help="pairs to write (default: one per mask); under torchrun "
        "spell it --num_pairs",
    )  # fmt: skip
    command.add_argument(
        "--deform", help=f"one of {', '.join(DEFORM_LEVELS)} (default: {CARD} {DEFAULTS['deform']})"
    )
    command.add_argument(
        "--layout", default=default["layout"], help=f"one of {', '.join(LAYOUTS)} (default: %(default)s)"
    )
    command.add_argument(
        "--seed", type=int, default=default["seed"],
        help=f"0..{MAX_SEED}; pair i depends only on (seed, i) (default: %(default)s)",
    )  # fmt: skip
    command.add_argument(
        "--batch_size", type=int, default=default["batch_size"],
        help=f"images drawn at once, 1..{MAX_BATCH}; part of what fixes the files (default: %(default)s)",
    )  # fmt: skip
    command.add_argument(
        "--steps", type=int, help=f"sampling steps, 1..{MAX_STEPS} (default: {CARD} the model's defaults: "
        f"its few-step student where it has one, else {DEFAULT_SAMPLER} {DEFAULT_STEPS})",
    )  # fmt: skip
    command.add_argument(
        "--scheduler", "--sampler", help=f"one of {', '.join(SAMPLERS)}, or {STUDENT}: the model's "
        f"distilled student, in its own steps (default: {CARD} the model's defaults)",
    )  # fmt: skip
    command.add_argument(
        "--guidance_scale", type=float, help="mask guidance: above 1, images follow their masks more "
        f"closely, at twice the cost per step (default: {CARD} {DEFAULTS['guidance_scale']:g}, none)",
    )  # fmt: skip
    command.add_argument(
        "--min_dice", type=float, help="quality control: redraw (new noise, up to "
        f"{MAX_ATTEMPTS} draws) each pair whose image the segmenter reads back at a mean Dice below this, "
        "leaving out pairs no draw brings to it; each pair's check goes into the manifest",
    )  # fmt: skip
    command.add_argument(
        "--segmenter",
        help="with --min_dice: a segmenter folder to read the images (default: the model's own)",
    )


def command(args) -> None:
    settings = Settings(
        model=str(args.model), masks=str(args.masks), n=args.n, deform=args.deform, layout=args.layout,
        seed=args.seed, batch_size=args.batch_size, steps=args.steps, scheduler=args.scheduler,
        guidance_scale=args.guidance_scale, min_dice=args.min_dice, segmenter=args.segmenter,
    )  # fmt: skip
    shard = parse_shard(args.shard) if getattr(args, "shard", None) else None
    result = synthesize(settings, args.out, progress=True, shard=shard, draw_missing=args.command != "merge")
    if result is None:  # another process of a launch: the main one reports
        return
    rate = result["drawn"] / result["seconds"] if result["drawn"] else float("nan")
    left_out = f"; {result['dropped']} left out: no draw read back at --min_dice" if result["dropped"] else ""
    processes = f" x {result['processes']} processes" if result["processes"] > 1 else ""
    print(
        f"{f'shard {args.shard}: ' if shard else ''}wrote {result['written']} pairs to {result['folder']} "
        f"({result['there']} already there{left_out}) in {result['seconds']:.1f} s: {rate:.2f} pairs/s on "
        f"{result['device']}, {result['threads']} thread(s){processes}"
    )
    if shard:
        print("once every shard is done: python -m segdiff.dataset merge, the same arguments but --shard")


main = command_line(parser, command)
