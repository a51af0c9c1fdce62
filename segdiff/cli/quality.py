"""python -m segdiff.quality train-segmenter|evaluate|background ...: the Dice segmenter, a model's measured
quality (`segdiff.measure`), and the constant background its pipeline draws exactly (`segdiff.model.background`)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..choices import MAX_SEED, PRECISION_ALIASES, PRECISIONS, check_seed
from ..data.layout import find_cases, read_image
from ..errors import CheckpointError, ConfigError, check_range
from ..measure import quality
from ..measure.quality import (
    STUDENT,
    load_test_set,
    load_train_subset,
    measure_quality,
    quality_table,
    run_label,
    write_to_card,
)
from ..measure.segmenter import Segmenter, train_segmenter
from ..model.background import Background, background_value
from ..model.card import CARD_FILE, ModelCard
from ..model.pipeline import DEFAULT_SCHEDULER, DEFAULT_STEPS, SegDiffPipeline
from .common import Parser, command_line, defaults

# The first training images (sorted) read to measure a background: a few hundred borders settle the most common
# value, and reading them takes seconds.
BACKGROUND_IMAGES = 512


def parser() -> Parser:
    parser = Parser(prog="python -m segdiff.quality", description=quality.__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train-segmenter", help="train a segmenter on real images and masks")
    evaluate = commands.add_parser("evaluate", help="Dice and KID of a diffusion model's samples")
    for sub in (train, evaluate):
        sub.add_argument("--img_dir", required=True, help="IMG_DIR/{train,val,test}/")
        sub.add_argument("--seg_dir", required=True, help="SEG_DIR/<segtype>/{train,val,test}/")
        sub.add_argument("--seed", type=int, default=0, help=f"0..{MAX_SEED} (default: 0)")
        sub.add_argument("--batch_size", type=int, default=None)
    train.add_argument("--num_classes", type=int, required=True, help="K, background included")
    train.add_argument("--img_size", type=int, required=True)
    train.add_argument("--img_channels", type=int, default=1)
    train.add_argument("--out", required=True, help="folder to write the segmenter to")
    train.add_argument("--steps", type=int, default=2000)
    evaluate.add_argument("--model", required=True, help="a model folder SegDiffPipeline opens")
    evaluate.add_argument("--segmenter", help="a segmenter folder (default: the model's own)")
    evaluate.add_argument("--num_classes", type=int, help="K, for models of the original code")
    evaluate.add_argument(
        "--scheduler",
        "--sampler",
        default=DEFAULT_SCHEDULER,
        help=f"a sampler, or {STUDENT!r}: a distilled model's student",
    )
    evaluate.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    evaluate.add_argument(
        "--guidance_scale", type=float, default=1.0, help="mask guidance (default: 1, none)"
    )
    evaluate.add_argument(
        "--precision", default="auto", choices=(*PRECISIONS, *PRECISION_ALIASES), help="no is fp32"
    )
    evaluate.add_argument("--num_masks", type=int, help="use the first N test masks (default: all)")
    evaluate.add_argument("--no-omit", action="store_true", help="skip the one-class-omitted runs")
    evaluate.add_argument(
        "--realism",
        action="store_true",
        help="also FRD (needs frd-score) and the classifier test (draws images for 512 train masks more)",
    )
    evaluate.add_argument(
        "--write-card",
        action="store_true",
        help="store the results in the model card and copy the segmenter into MODEL/segmenter/",
    )
    add_background(commands)
    return parser


def add_background(commands) -> None:
    """The `background` sub-command's flags, defaults from `Background`'s fields."""
    default = defaults(Background)
    sub = commands.add_parser(
        "background",
        help="record in a model's card the constant background its scans hold outside the field of view, "
        "which the pipeline then draws exactly",
    )
    sub.add_argument("--model", required=True, help="a segdiff model folder (a cascade: its top folder)")
    sub.add_argument(
        "--img_dir",
        help=f"IMG_DIR/train/: the model's training images; the value is the most common intensity on the "
        f"borders of the first {BACKGROUND_IMAGES} (sorted)",
    )
    sub.add_argument(
        "--below", type=float, default=round(default["below"] * 255),
        help="grey level 0..255 under which a smoothed pixel may be background (default: %(default)s)",
    )  # fmt: skip
    sub.add_argument(
        "--smooth", type=float, default=default["smooth"],
        help="Gaussian sigma in pixels of the model's images (default: %(default)s)",
    )  # fmt: skip
    sub.add_argument(
        "--guard", type=int, default=default["guard"],
        help="pixels kept clear around every mask class (default: %(default)s)",
    )  # fmt: skip
    sub.add_argument("--off", action="store_true", help="remove the model's background record")


def background(args) -> None:
    """Measure the background of IMG_DIR/train and store it in the card of MODEL, or remove it (--off)."""
    folder = Path(args.model)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    if not (folder / CARD_FILE).is_file():
        raise CheckpointError(
            f"{folder}: not a segdiff model folder (no {CARD_FILE}); the background is recorded in a segdiff "
            "model's card"
        )
    card = ModelCard.load(folder)  # a cascade's top folder: the upscaler, whose images the pipeline returns
    if args.off:
        if args.img_dir is not None:
            raise ConfigError("background --off takes no --img_dir: it removes the record")
        if not card.background:
            print(f"{folder / CARD_FILE} records no background; nothing to remove")
            return
        card.background = {}
        card.save(folder)
        print(f"removed the background from {folder / CARD_FILE}; the pipeline draws the network's pixels")
        return
    if args.img_dir is None:
        raise ConfigError("background: pass --img_dir IMG_DIR (its train/ images are measured), or --off")
    check_range("--below", args.below, 0, 255)
    check_range("--smooth", args.smooth, 0, card.img_size)
    check_range("--guard", args.guard, 0, card.img_size)
    cases = find_cases(args.img_dir, None, "train")[:BACKGROUND_IMAGES]
    grey = np.stack([_grey(read_image(case.image, card.img_channels, card.img_size)) for case in cases])
    record = Background(background_value(grey), args.below / 255, args.smooth, args.guard)
    card.background = asdict(record)
    card.save(folder)
    print(
        f"wrote the background to {folder / CARD_FILE}: value {record.value * 255:g}/255 (measured on "
        f"{len(cases)} images of {Path(args.img_dir) / 'train'}), below {args.below:g}/255, smooth "
        f"{args.smooth:g} px, guard {args.guard} px; the pipeline now draws it (exact_background=False turns "
        "it off per call)"
    )


def _grey(image: np.ndarray) -> np.ndarray:
    """A `read_image` result, (C, H, W) uint8 or float32 in [0, 1] -> (H, W) uint8 grey levels, channels
    averaged as `Background.apply` averages them."""
    scale = 1 if image.dtype == np.uint8 else 255
    return np.rint(image.mean(0) * scale).astype(np.uint8)


def command(args) -> None:
    if args.command == "background":
        return background(args)
    check_seed(args.seed)  # before a model or data set is read
    if args.command == "train-segmenter":
        model = train_segmenter(
            args.img_dir,
            args.seg_dir,
            args.num_classes,
            args.img_size,
            args.img_channels,
            args.out,
            steps=args.steps,
            batch_size=args.batch_size or 16,
            seed=args.seed,
        )
        print(
            f"saved the segmenter to {args.out}; validation Dice {model.config.training.get('val_dice')}"
        )
        return
    pipe = SegDiffPipeline.from_pretrained(args.model, num_classes=args.num_classes)
    if args.segmenter is None and pipe.card.segmenter is None:
        raise CheckpointError(f"{args.model}: the model has no segmenter; pass --segmenter DIR")
    segmenter = Segmenter.from_pretrained(args.segmenter or Path(args.model) / pipe.card.segmenter)
    masks, images, baseline = load_test_set(
        args.img_dir, args.seg_dir, pipe.card, args.num_masks, args.seed
    )
    train = (
        load_train_subset(args.img_dir, args.seg_dir, pipe.card, seed=args.seed)
        if args.realism
        else (None, None)
    )
    result = measure_quality(
        pipe,
        segmenter,
        masks,
        images,
        scheduler=args.scheduler,
        num_inference_steps=args.steps,
        precision=args.precision,
        seed=args.seed,
        batch_size=args.batch_size or 16,
        omit_each=not args.no_omit,
        baseline_images=baseline,
        train_masks=train[0],
        train_images=train[1],
        radiomics=args.realism,
        guidance_scale=args.guidance_scale,
    )
    print(quality_table({run_label(result): result}))
    if args.write_card:
        write_to_card(args.model, segmenter, result)
        print(f"wrote the results to {Path(args.model) / CARD_FILE}")


main = command_line(parser, command)
