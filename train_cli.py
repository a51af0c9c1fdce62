#!/usr/bin/env python3
"""Train and sample segmentation-guided diffusion models with the original code's command line.

Every flag of the original `main.py` keeps its name, default and meaning, so its commands run unchanged
with `python3 train_cli.py` in place of `python3 main.py`, and `accelerate launch train_cli.py ...` trains
on many GPUs or nodes. This file parses flags; `segdiff.train.loop` and `segdiff.model.sampling` do the work.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import fields, replace
from typing import get_args

from accelerate import PartialState

from segdiff import ConfigError, SegdiffError
from segdiff.choices import DEFAULT_STEPS, MAX_SEED, PRECISION_ALIASES, PRECISIONS, SAMPLERS
from segdiff.cli.common import defaults
from segdiff.data.layout import data_info
from segdiff.hub.publish import check_push, push
from segdiff.model.sampling import EvalConfig, evaluate, sample_many
from segdiff.model.unet import PRESETS
from segdiff.resolve import is_hub_id
from segdiff.train.loop import TrainConfig, run_name, train
from segdiff.train.recipes import RECIPES, BetaSchedule, Prediction, Weighting


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show defaults that say something: not None, not a flag's False
        return (
            action.help
            if action.default is None or action.default is False
            else super()._get_help_string(action)
        )


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # argparse takes `-1e-3` for a flag (its pattern of negative numbers has no exponent), so
        # `--learning_rate -1e-3` would fail as "expected one argument" instead of naming the bad value.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):  # one line naming the flag, not the whole usage
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="train_cli.py",
        description=__doc__.split("\n\n")[0],
        epilog="Runs on a CPU, one GPU, or many GPUs and nodes with `accelerate launch train_cli.py ...`, and as "
        "N CPU processes with `torchrun --standalone --nproc_per_node N train_cli.py ...`. "
        "Bad input exits with status 2 and one line saying what is wrong.",
        formatter_class=_Help,
    )
    _original_flags(parser.add_argument_group("the original main.py flags (same names, defaults and meanings)"))
    _model_flags(parser.add_argument_group("the model and its folders (segdiff)"))
    _recipe_flags(parser.add_argument_group("how the model learns (segdiff)"))
    _run_flags(parser.add_argument_group("the training run (segdiff)"))
    _sampling_flags(parser.add_argument_group("sampling and few-step students (segdiff)"))
    _hub_flags(parser.add_argument_group("the Hugging Face Hub (segdiff)"))
    return parser


def _original_flags(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add(
        "--mode",
        default="train",
        choices=("train", "eval", "eval_many", "distill"),
        help="train a model; eval: one grid of samples beside their masks (OUTPUT_DIR/samples/eval_grid.png); "
        "eval_many: --eval_sample_size samples saved one file each in OUTPUT_DIR/samples_many_{N}/; "
        "distill (segdiff): train a few-step student of the model in --model_dir (see --student_steps)",
    )
    add(
        "--img_size",
        type=int,
        default=TRAIN_DEFAULTS["img_size"],
        help="square image size; images resize bilinearly, masks by nearest",
    )
    add(
        "--num_img_channels",
        type=int,
        default=TRAIN_DEFAULTS["img_channels"],
        help="1 = greyscale, 3 = RGB; any other count reads images as .npy (C, H, W) arrays",
    )
    add("--dataset", default="breast_mri", help="a name for the data; only names the run folder")
    add("--img_dir", help="IMG_DIR/{train,val,test}/<file>; needed to train")
    add(
        "--seg_dir",
        help="SEG_DIR/<segtype>/{train,val,test}/<file>, file names as the images; several "
        "segtypes merge into one mask (sorted order, first non-zero id wins)",
    )
    add(
        "--model_type",
        default=TRAIN_DEFAULTS["model_type"],
        choices=("DDPM", "DDIM"),
        help="the noise scheduler stored with the model and the sampler used to evaluate it "
        "(DDIM: 50 steps, DDPM: 1000 steps, unless --scheduler/--num_inference_steps say otherwise); "
        "also the run folder's prefix",
    )
    add("--segmentation_guided", action="store_true", help="condition on the masks of --seg_dir")
    add(
        "--segmentation_channel_mode",
        default="single",
        choices=("single", "multi"),
        help="single: all classes of all segtypes in one mask; multi (one channel per segtype) was never "
        "implemented by the original code and is refused: --mask_encoding onehot already gives every "
        "class its own channel",
    )
    add(
        "--num_segmentation_classes",
        type=int,
        help="K, the number of mask classes INCLUDING background 0; needed with --segmentation_guided",
    )
    add(
        "--train_batch_size",
        type=int,
        default=TRAIN_DEFAULTS["train_batch_size"],
        help="images per training step (per process)",
    )
    add(
        "--eval_batch_size",
        type=int,
        default=TRAIN_DEFAULTS["eval_batch_size"],
        help="images per sampling batch, and the grids' width",
    )
    add("--num_epochs", type=int, default=TRAIN_DEFAULTS["num_epochs"], help="passes over the training set")
    add(
        "--resume_epoch",
        type=int,
        help="the original's resume: reload OUTPUT_DIR/unet/ weights and count on from this epoch (the LR "
        "schedule continues from there; optimizer state is not kept). Prefer --resume",
    )
    add(
        "--use_ablated_segmentations",
        action="store_true",
        help="mask-ablated training: each non-background class is removed with probability 0.5, drawn per "
        "example (the original drew one set per batch); adds -ablated to the run folder",
    )
    add(
        "--eval_noshuffle_dataloader",
        action="store_true",
        help="take test masks in file-name order instead of a seeded shuffle",
    )
    add(
        "--eval_mask_removal",
        action="store_true",
        help="eval: also sample with the classes removed one after another, cumulatively, the same noise "
        "along each row (OUTPUT_DIR/samples/eval_mask_removal.png, colours from the model card); adds "
        "-ablated to the run folder as in the original",
    )
    add(
        "--eval_blank_mask",
        action="store_true",
        help="eval: also sample on all-background masks (OUTPUT_DIR/samples/eval_blank_mask.png); adds -ablated",
    )
    add(
        "--eval_sample_size",
        type=int,
        default=EVAL_DEFAULTS["eval_sample_size"],
        help="eval_many: number of samples; guided models draw one per test mask, at most this many",
    )


def _model_flags(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add(
        "--output_dir",
        help="run folder; default: the original's name {model_type}-{dataset}-{img_size}[-segguided][-ablated] "
        "in the working directory",
    )
    add(
        "--model_dir",
        help="eval/eval_many/distill: the model to sample from or distill, default the run folder; also opens "
        "an original run "
        "folder or a released NAME/unet/ checkpoint (pass --num_segmentation_classes for those), or a Hugging "
        "Face Hub id org/name",
    )
    add(
        "--preset",
        choices=sorted(PRESETS),
        help="UNet size (default: paper, the original 114 M-parameter network; with --upscale_from: upscaler)",
    )
    add(
        "--upscale_from",
        metavar="BASE_MODEL_DIR",
        help="train the second stage of a cascade: an upscaler that draws --img_size images from the base "
        "model in BASE_MODEL_DIR (a smaller size, same classes) and the full-size mask. It trains on random "
        "crops (--crop_size) at about the cost of the base's training; the run folder then holds the whole "
        "cascade (the base in base/), which every mode and the studio open as one model",
    )
    add(
        "--crop_size",
        type=int,
        help="with --upscale_from: the training crops' size (default: --img_size / 2)",
    )
    add(
        "--mask_encoding",
        default=TRAIN_DEFAULTS["encoding"],
        choices=("onehot", "original"),
        help="how masks enter the UNet. onehot: one 0/1 channel per class; the original's single channel "
        "of class_id/255 separates classes by 0.004, and small models were seen to ignore thin classes "
        "after thousands of steps. original: train models the original code can open too. The encoding "
        "is stored with the model and picked up when it is loaded",
    )
    add(
        "--class_names",
        nargs="+",
        metavar="NAME",
        help="K class names, background first, for the model card (default: background, class 1, ...)",
    )
    add(
        "--unlabelled_dir",
        metavar="DIR",
        help="train/distill: images without masks, in DIR/train/ (DIR/val/ and DIR/test/ are not read) or in "
        "DIR itself, as the images of --img_dir: the same stored size and channels, no file name of theirs. "
        "They train with every class removed (the all-background mask, which mask-ablated training teaches "
        "as 'any anatomy'; guided runs need --use_ablated_segmentations), so they teach what the images look "
        "like and the labelled ones how masks lay them out. The card counts both",
    )
    add(
        "--labelled_fraction",
        type=float,
        default=TRAIN_DEFAULTS["labelled_fraction"],
        help="with --unlabelled_dir: each epoch repeats the labelled images (a whole number of times) to "
        "make about this share of it, so that a few labels among many images still teach the masks; 0: "
        "every image once per epoch",
    )


def _recipe_flags(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add(
        "--recipe",
        default=TRAIN_DEFAULTS["recipe"],
        choices=sorted(RECIPES),
        help="how the model learns: fast (v-prediction, min-SNR-5 loss weighting, cosine noise schedule, a "
        "learning rate fit to --preset with 100 warm-up steps, EMA), measured by benchmarks/convergence.py "
        "to follow the masks in a fraction of the steps; original: the original code's (epsilon, uniform "
        "MSE, linear betas, 1e-4 after 500 warm-up steps, no EMA). The flags below override single parts",
    )
    add(
        "--prediction_type",
        choices=get_args(Prediction),
        help="what the UNet predicts (default: the recipe's)",
    )
    add(
        "--loss_weighting",
        choices=get_args(Weighting),
        help="uniform MSE, or min_snr: weights capped at --snr_gamma / SNR (Hang et al., 2023)",
    )
    add("--snr_gamma", type=float, help="the cap of --loss_weighting min_snr (default 5)")
    add(
        "--beta_schedule",
        choices=get_args(BetaSchedule),
        help="linear (the original) or squaredcos_cap_v2 (cosine, Nichol & Dhariwal 2021)",
    )
    add(
        "--zero_terminal_snr",
        action=argparse.BooleanOptionalAction,
        help="rescale the betas so the last timestep is pure noise (Lin et al., 2024); needs v_prediction or sample",
    )
    add("--learning_rate", type=float, help="AdamW peak learning rate (default: the recipe's, by --preset)")
    add(
        "--lr_warmup_steps",
        type=int,
        help="linear warm-up steps before the cosine decay (default: the recipe's)",
    )
    add(
        "--ema",
        action=argparse.BooleanOptionalAction,
        help="keep an exponential moving average of the weights (diffusers EMAModel) and save it as the model "
        "(default: the recipe's)",
    )


def _run_flags(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add(
        "--mixed_precision",
        choices=(*PRECISIONS, *PRECISION_ALIASES),
        default=TRAIN_DEFAULTS["mixed_precision"],
        help="numeric precision; no is fp32, as accelerate says. auto: in training, accelerate's configuration, "
        "else fp32 as the original (bf16 is fastest on recent GPUs); in eval, bf16/fp16 on GPUs, fp32 on CPUs "
        "without native bf16",
    )
    add(
        "--checkpointing_steps",
        type=int,
        default=TRAIN_DEFAULTS["checkpointing_steps"],
        help="save the full training state to OUTPUT_DIR/checkpoint-<step>/ every this many steps; each is "
        "also a model folder that eval can open with --model_dir",
    )
    add(
        "--checkpoints_total_limit",
        type=int,
        default=TRAIN_DEFAULTS["checkpoints_total_limit"],
        help="keep this many newest checkpoints; older ones go once a newer one is complete",
    )
    add(
        "--resume",
        action="store_true",
        help="continue from the latest complete checkpoint (weights, EMA, optimizer, LR schedule, RNG, step) "
        "to the same final step; without one, start at step 0. The batch size, learning rate and warm-up must be "
        "the run's (else refused, naming both values); a larger --max_train_steps extends it, its LR decay then "
        "ending at the new last step. One run at a time per --output_dir",
    )
    add("--max_train_steps", type=int, help="stop after this many optimizer steps (overrides --num_epochs)")
    add(
        "--gradient_accumulation_steps",
        type=int,
        default=TRAIN_DEFAULTS["gradient_accumulation_steps"],
        help="batches summed per optimizer step",
    )
    add(
        "--dataloader_num_workers",
        type=int,
        default=TRAIN_DEFAULTS["dataloader_num_workers"],
        help="loader processes; 0 suffices as images are decoded once, up front",
    )
    add(
        "--compile",
        action="store_true",
        help="train: torch.compile the UNet; the first steps compile (about 1.5 minutes for the paper network), "
        "then each step runs 1.55x faster on an H200 at 256 px; checkpoints and saved models stay plain",
    )
    add(
        "--seed",
        type=int,
        default=TRAIN_DEFAULTS["seed"],
        help=f"seeds training, the progress grids and every sample's noise: 0..{MAX_SEED}",
    )
    add(
        "--save_image_epochs",
        type=int,
        default=TRAIN_DEFAULTS["save_image_epochs"],
        help="write a progress grid (masks, samples, real images) to OUTPUT_DIR/samples/{epoch:04d}.png "
        "every this many epochs; successive grids cycle through the validation masks",
    )
    add(
        "--save_model_epochs",
        type=int,
        default=TRAIN_DEFAULTS["save_model_epochs"],
        help="save the model to OUTPUT_DIR every this many epochs, and at the end",
    )


def _sampling_flags(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add(
        "--scheduler",
        "--sampler",
        dest="sampler",
        choices=sorted(SAMPLERS),
        help="sampler for grids and eval (default: the original's for --model_type; dpm++ with its default "
        f"{DEFAULT_STEPS} steps gives similar images far faster)",
    )
    add(
        "--num_inference_steps",
        type=int,
        help=f"sampling steps (default: 50 for ddim, 1000 for ddpm, {DEFAULT_STEPS} for dpm++ and unipc)",
    )
    add(
        "--guidance_scale",
        type=float,
        default=EVAL_DEFAULTS["guidance_scale"],
        help="eval/eval_many (segdiff): mask guidance, 1 for none. Above 1, each step also predicts for the blank "
        "mask and steps away from it, so samples follow their masks more closely at twice the cost per step; "
        "meant for models trained with --use_ablated_segmentations",
    )
    add(
        "--eval_ablated_masks",
        action="store_true",
        help="eval/eval_many: remove random classes from each mask before sampling, as the original did for "
        "models trained with --use_ablated_segmentations (it redrew them at every denoising step). Off by "
        "default: the samples then follow the full mask that names their file",
    )
    add(
        "--student_steps",
        type=int,
        default=TRAIN_DEFAULTS["student_steps"],
        help="distill: the student's sampling steps. The run trains them on the training data to land where "
        "the teacher's --teacher_steps DDIM steps do (progressive distillation in one round), and writes the "
        "teacher with its student in student/ to --output_dir (default: the teacher's folder + '-student'). "
        "The student then draws at the model's default settings; asking for a sampler or steps uses the "
        "teacher. For a cascade it distills the upscaler; distill its base model first",
    )
    add(
        "--teacher_steps",
        type=int,
        help="distill: the teacher's DDIM steps the student learns from (default: 12; an upscaler's recorded "
        "steps), a multiple of --student_steps",
    )
    add(
        "--adversarial_weight",
        type=float,
        default=TRAIN_DEFAULTS["adversarial_weight"],
        help="distill: the weight of a patch critic's term beside the distillation loss (a critic trained "
        "beside the student to tell real images from its estimates, which the student learns to pass: texture "
        "that mean squared error averages away). Default 0: none",
    )


def _hub_flags(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add(
        "--push_to_hub",
        action="store_true",
        help="train: upload the finished model (without checkpoints) to the Hugging Face Hub, its card as "
        "README.md; log in first with `hf auth login` or set HF_TOKEN",
    )
    add("--hub_model_id", help="the Hub repository to push to, org/name (default: the run folder's name, yours)")
    add("--hub_private_repo", action="store_true", help="create the Hub repository private")


# TrainConfig's fields that the original flags set under other names; the other fields share their flag's
# name, and those in _NOT_FLAGS are worked out here (or keep TrainConfig's default).
_FLAG_OF = {
    "img_channels": "num_img_channels",
    "encoding": "mask_encoding",
    "ablate": "use_ablated_segmentations",
}
_NOT_FLAGS = {"output_dir", "seg_dir", "num_classes", "class_names", "channels_last", "log_every", "command",
              "extra_card", "distill_from"}  # fmt: skip
# The defaults the flags share with the configs, read from them rather than written twice.
TRAIN_DEFAULTS = defaults(TrainConfig)
EVAL_DEFAULTS = defaults(EvalConfig)


def train_config(args: argparse.Namespace, output_dir: str, command: str) -> TrainConfig:
    # classes.json above the data (phantoms, converted volumes): class names and conversion settings
    seg_dir = args.seg_dir if args.segmentation_guided else None
    data = data_info(args.img_dir, seg_dir, args.num_segmentation_classes if seg_dir else None)
    flags = {
        f.name: getattr(args, _FLAG_OF.get(f.name, f.name))
        for f in fields(TrainConfig)
        if f.name not in _NOT_FLAGS
    }
    return TrainConfig(
        output_dir=output_dir,
        seg_dir=seg_dir,
        num_classes=args.num_segmentation_classes or 0,
        class_names=tuple(args.class_names or data.get("class_names", ())),
        command=command,
        extra_card={"data": data} if data else {},
        **flags,
    )


def eval_config(args: argparse.Namespace, output_dir: str) -> EvalConfig:
    return EvalConfig(
        model_dir=args.model_dir or output_dir,
        output_dir=output_dir,
        seg_dir=args.seg_dir if args.segmentation_guided else None,
        img_dir=args.img_dir,
        num_classes=args.num_segmentation_classes,
        img_size=args.img_size,
        img_channels=args.num_img_channels,
        model_type=args.model_type,
        eval_batch_size=args.eval_batch_size,
        eval_sample_size=args.eval_sample_size,
        sampler=args.sampler,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        shuffle=not args.eval_noshuffle_dataloader,
        ablated_masks=args.eval_ablated_masks,
        mask_removal=args.eval_mask_removal,
        blank_mask=args.eval_blank_mask,
        seed=args.seed,
        precision=args.mixed_precision,
    )


def run(args: argparse.Namespace, command: str) -> None:
    if args.segmentation_channel_mode == "multi":
        raise ConfigError(
            "--segmentation_channel_mode multi: not implemented (the original raised NotImplementedError too); "
            "use single, where --mask_encoding onehot already gives every class its own input channel"
        )
    if args.segmentation_guided and not args.seg_dir:
        raise ConfigError(
            "--segmentation_guided needs --seg_dir SEG_DIR (holding SEG_DIR/<segtype>/{train,val,test}/)"
        )
    output_dir = args.output_dir or run_name(
        args.model_type,
        args.dataset,
        args.img_size,
        args.segmentation_guided,
        args.use_ablated_segmentations,
        args.eval_mask_removal,
        args.eval_blank_mask,
    )
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"--output_dir {output_dir}: a file, not a folder; expected a folder (new, or a run to resume)")
    if args.push_to_hub and args.mode not in ("train", "distill"):
        raise ConfigError(f"--push_to_hub with --mode {args.mode}: pushing uploads a trained model; use --mode train or distill, "
                          "or python -m segdiff.hub push MODEL_DIR org/name")  # fmt: skip
    if args.push_to_hub:  # the id, the token and the Hub checked now, not after hours of training
        hub_id = check_push(args.hub_model_id or os.path.basename(os.path.abspath(output_dir)))
    if args.mode in ("train", "distill"):
        if args.mode == "train":
            folder = train(train_config(args, output_dir, command))
            print(f"model saved to {folder}")
        else:
            teacher = args.model_dir or output_dir
            student_dir = args.output_dir if args.model_dir and args.output_dir else f"{teacher.rstrip('/')}-student"
            if is_hub_id(teacher) and not (args.model_dir and args.output_dir):
                student_dir = f"{teacher.split('/')[-1]}-student"
            folder = train(replace(train_config(args, student_dir, command), distill_from=teacher))
            print(f"model and its {args.student_steps}-step student saved to {folder}")
        if args.push_to_hub and PartialState().is_main_process:
            print(f"uploaded to the Hub: {push(folder, hub_id, private=args.hub_private_repo)}")
    elif args.mode == "eval":
        for path in evaluate(eval_config(args, output_dir)):
            print(f"wrote {path}")
    else:
        folder, written, skipped = sample_many(eval_config(args, output_dir))
        note = f" ({skipped} already there, kept)" if skipped else ""
        if written + skipped < args.eval_sample_size:
            note += f" (one per test mask: only {written + skipped} masks)"
        print(f"wrote {written} samples to {folder}{note}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        run(args, shlex.join(["train_cli.py", *argv]))
    except SegdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished checkpoints and samples are kept: rerun with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
