"""python -m segdiff.quality train-segmenter|evaluate ...: the Dice segmenter, and a model's measured quality
(`segdiff.measure`)."""

from __future__ import annotations

from pathlib import Path

from ..choices import MAX_SEED, PRECISION_ALIASES, PRECISIONS, check_seed
from ..errors import CheckpointError
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
from ..model.card import CARD_FILE
from ..model.pipeline import DEFAULT_SCHEDULER, DEFAULT_STEPS, SegDiffPipeline
from .common import Parser, command_line


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
    return parser


def command(args) -> None:
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
