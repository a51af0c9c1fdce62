"""Quality of a segmentation-guided model: faithfulness (Dice) and realism, measured by a `Segmenter`.

Faithfulness, as the paper measures it (Konz et al., MICCAI 2024): a segmentation network trained on REAL
images and masks segments each generated image, and the Dice between what it finds and the conditioning
mask says how closely the image follows the mask. With classes omitted, only the kept classes are scored.
The same network's Dice on the real test images is the ceiling: no generator can score above its ruler.

Realism: two distances between generated and real test images on the segmenter's pooled features (Inception
knows nothing of 64 px greyscale MRI), each beside its real-vs-real baseline: a subset of the real TRAIN
images, as many as the test images, against the same real test images. The Kernel Inception Distance
(Binkowski et al., 2018) is unbiased, so its baseline sits at 0 +- its spread: read the generated KID against
that spread. The Frechet distance (as in FID) is biased upwards by small samples, so its baseline is the floor
a perfect generator would reach with this many images, and "within 2x of the baseline" means something.
Generated images share their test images' masks while the baseline's do not: the comparison, if anything,
favours the generated side. On request, realism as the field measures it (`realism`): FRD against the real
test images beside the same baseline's, and a classifier two-sample test beside its floor on real halves.

    python -m segdiff.quality train-segmenter --img_dir D/img --seg_dir D/mask --num_classes 4 --img_size 64 --out S
    python -m segdiff.quality evaluate --model M --img_dir D/img --seg_dir D/mask --segmenter S --write-card
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..choices import STUDENT, check_seed, precision_of
from ..data.layout import SegDataset, find_cases, read_image
from ..errors import ArgumentError, ImageError, MaskError
from ..model.card import CARD_FILE, ModelCard
from ..model.pipeline import DEFAULT_SCHEDULER, DEFAULT_STEPS, Precision, SegDiffPipeline, autocast_dtype
from ..model.sampling import noise_generator
from .realism import classifier_floor, classifier_test, frd
from .segmenter import Segmenter, dice, labels, mean_dice, round_score


def faithfulness(segmenter: Segmenter, images, masks, kept_classes: Sequence[int]) -> list[float]:
    """Per-image mean Dice over the kept classes present in that image's mask (NaN where none is).

    images as `Segmenter.predict` takes them; masks (B, H, W) class ids, the FULL masks the images were
    asked to follow; kept_classes: the classes the model had to obey (background is never scored).
    """
    pred, masks = segmenter.predict(images), labels(masks, "masks")
    if masks.ndim == 2:
        masks = masks[None]
    if masks.shape != pred.shape:
        raise MaskError(
            f"{masks.shape[0]} masks of shape {masks.shape[1:]} for images segmented to {pred.shape}"
        )
    k = segmenter.config.num_classes
    scores = []
    for p, t in zip(pred, masks, strict=True):
        present = [c for c in kept_classes if c != 0 and (t == c).any()]
        scores.append(mean_dice(p, t, k, present) if present else math.nan)
    return scores


def kid(
    features_a, features_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance between two feature sets (N, D) and (M, D) -> (mean, std) over subsets.

    Each subset draws m = min(subset_size, N, M) rows of each set without replacement and computes the
    unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3 (Binkowski et al., 2018).
    Unbiased: the estimate of two samples of the same distribution averages 0 and can be negative.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ArgumentError(f"features of shapes {a.shape} and {b.shape}, expected (N, D) and (M, D)")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ArgumentError(f"KID needs at least 2 samples in each set, got {len(a)} and {len(b)}")
    d, rng = a.shape[1], np.random.default_rng(seed)
    estimates = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off_diagonal = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        estimates.append(off_diagonal - 2 * kxy.mean())
    return float(np.mean(estimates)), float(np.std(estimates))


def frechet_distance(features_a, features_b) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to (N, D) and (M, D).

    FID's formula (Heusel et al., 2017). tr((S_a S_b)^(1/2)) is computed as the sum of the square roots of
    the eigenvalues of S_a^(1/2) S_b S_a^(1/2), a symmetric matrix, which stays stable when N < D.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ArgumentError(
            f"features of shapes {a.shape} and {b.shape}, expected (N, D) and (M, D), N, M >= 2"
        )
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(0))) @ vectors.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(0)).sum()
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def spectral_shares(images, edges: Sequence[float]) -> list[float]:
    """Each radial frequency band's share of the images' spectral energy, averaged over the images.

    images: (N, H, W, C) numpy or (N, C, H, W) torch floats, square; the first channel is measured. edges:
    band limits in cycles per image width, ascending (the last may be inf). The mean (DC) is left out of the
    total, so the shares say how the images' contrast is spread over scales, whatever their brightness.
    """
    x = (
        images.detach().cpu().numpy()[:, 0]
        if isinstance(images, torch.Tensor)
        else np.asarray(images)[..., 0]
    )
    x = x.astype(np.float64)
    power = np.abs(np.fft.fft2(x - x.mean(axis=(1, 2), keepdims=True))) ** 2  # (N, H, W)
    f = np.fft.fftfreq(x.shape[-1]) * x.shape[-1]  # cycles per image width
    radius = np.hypot(f[:, None], f[None, :])
    total = power.sum(axis=(1, 2))
    shares = [
        (power[:, (radius >= low) & (radius < high)].sum(axis=1) / total).mean()
        for low, high in itertools.pairwise(edges)
    ]
    return [float(f"{v:.4g}") for v in shares]


def detail_bands(low_res_size: int) -> list[float]:
    """Band edges above a `low_res_size` image's Nyquist frequency, an octave each: the detail an upscaler
    from that size must draw, in cycles per image width."""
    nyquist = low_res_size / 2
    return [nyquist, 2 * nyquist, 4 * nyquist, math.inf]


def detail(generated, real, low_res_size: int) -> dict:
    """Spectral shares of generated and real images in the bands above `low_res_size`'s Nyquist frequency,
    and their ratio: about 1 where the detail is drawn, well below 1 for a blurred enlargement."""
    edges = detail_bands(low_res_size)
    ours, theirs = spectral_shares(generated, edges), spectral_shares(real, edges)
    return {
        "bands": [f"{a:g}-{b:g}" for a, b in itertools.pairwise(edges)],
        "unit": "cycles per image width",
        "generated": ours,
        "real": theirs,
        "ratio": [float(f"{a / b:.3g}") for a, b in zip(ours, theirs, strict=True)],
    }


# ---- quality of a diffusion model ----------------------------------------------------------------------




def measure_quality(
    pipe: SegDiffPipeline,
    segmenter: Segmenter,
    masks,
    real_images,
    *,
    scheduler: str = DEFAULT_SCHEDULER,
    num_inference_steps: int = DEFAULT_STEPS,
    precision: Precision = "auto",
    seed: int = 0,
    batch_size: int = 16,
    omit_each: bool = True,
    baseline_images=None,
    progress: bool = True,
    upscale_steps: int | None = None,
    guidance_scale: float = 1.0,
    train_masks=None,
    train_images=None,
    radiomics: bool = False,
) -> dict:
    """Faithfulness and realism of `pipe` on test masks, as a JSON-ready dict for `ModelCard.quality`.

    masks: (N, H, W) class ids; real_images: the N real images of those masks, as `Segmenter.predict`
    takes them; baseline_images: other real images (a train subset) for the real-vs-real KID baseline.
    Image i is drawn from its own generator for (seed, i), the one `segdiff.model.sampling` samples with: every
    setting starts from the same noise, whatever the batching. Reported: per-class and mean Dice against the
    masks; with `omit_each`, for each class c present, the Dice of the kept classes (not c,
    not background) when c is omitted; the segmenter's Dice on the real images (the ceiling); KID of the
    generated images against the real ones, beside KID(baseline_images, real_images). Dice values are
    rounded to 4 digits, undefined ones stored as null. `guidance_scale`: the pipeline's mask guidance.
    With `train_masks` (M, H, W) and their real `train_images`, M more images are drawn (from the generators
    for indices N..N+M-1) and the classifier two-sample test runs (`realism.classifier_test`): a CNN learns
    to tell them from the real train images, judged on the N generated vs the N real test images, beside its
    floor on halves of the real images. `radiomics`: also FRD (`realism.frd`, needs frd-score) of the
    generated and of the baseline images against the real test images.
    """
    card = pipe.card
    student = scheduler == STUDENT
    if student and card.distilled is None:
        raise ArgumentError(f"scheduler={STUDENT!r}: the model has no distilled student")
    if upscale_steps and not card.upscaling:
        raise ArgumentError(f"upscale_steps={upscale_steps}: the model draws in one stage, without an upscaler")
    upscaler = card.upscaling and (card.upscaling.scheduler, upscale_steps or card.upscaling.steps)
    if student:  # the model's default settings: its student, and a cascade's base's student where it has one
        first = pipe.base.card if pipe.base is not None else card
        scheduler, num_inference_steps = (
            (STUDENT, first.distilled.steps) if first.distilled else (DEFAULT_SCHEDULER, DEFAULT_STEPS)
        )
        if not upscale_steps:  # with upscale_steps the upscaler itself draws the detail, as the pipeline does
            upscaler = card.upscaling and (STUDENT, card.distilled.steps)
    segmenter.check_reads(card.num_classes, card.img_channels, card.img_size)
    precision, seed = precision_of(precision), check_seed(seed, "seed")
    masks = pipe.prepare_masks(masks)  # (N, H, W) int64, validated
    n, k = masks.shape[0], card.num_classes
    real_pred = segmenter.predict(real_images)
    if real_pred.shape[0] != n:
        raise ImageError(f"{real_pred.shape[0]} real images for {n} masks, expected one real image per mask")
    omitted = [c for c in range(1, k) if (masks == c).any()] if omit_each else []
    if train_masks is not None:
        train_masks = pipe.prepare_masks(train_masks)
    bar = tqdm(
        total=n * (1 + len(omitted)) + (0 if train_masks is None else len(train_masks)),
        desc=f"quality {scheduler} {num_inference_steps}",
        disable=not progress,
    )

    def sample(omit: tuple[int, ...], drawn: torch.Tensor = masks, first: int = 0) -> np.ndarray:
        out = []
        for start in range(0, len(drawn), batch_size):
            batch = slice(start, start + batch_size)
            out.append(
                pipe(
                    drawn[batch],
                    omit=omit,
                    num_inference_steps=None if student else num_inference_steps,
                    scheduler=None if student else scheduler,
                    generator=[noise_generator(seed, first + i) for i in range(len(drawn))[batch]],
                    output_type="np",
                    upscale_steps=upscale_steps,
                    guidance_scale=guidance_scale,
                ).images
            )
            bar.update(len(out[-1]))
        return np.concatenate(out)  # (N, H, W, C) float in [0, 1]

    names = card.class_names
    previous_precision, previous_bar = pipe.precision, dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.precision = precision
    pipe.set_progress_bar_config(disable=True)
    try:
        generated = sample(())
        pred = segmenter.predict(generated)
        result = {
            "settings": {
                "scheduler": scheduler,
                "num_inference_steps": num_inference_steps,
                "precision": precision,
                "dtype": str(autocast_dtype(pipe.device, precision) or torch.float32).removeprefix("torch."),
                "device": pipe.device.type,
                "seed": seed,
                "num_masks": n,
                **({"upscale_sampler": upscaler[0], "upscale_steps": upscaler[1]} if upscaler else {}),
                **({"guidance_scale": guidance_scale} if guidance_scale != 1 else {}),
            },
            **_dice_record(pred, masks, names),
            "omit": {},
        }
        for c in omitted:
            kept = [j for j in range(1, k) if j != c]
            result["omit"][names[c]] = _dice_record(segmenter.predict(sample((c,))), masks, names, kept)
        train_generated = None if train_masks is None else sample((), train_masks, n)
    finally:
        pipe.precision = previous_precision
        pipe.set_progress_bar_config(**previous_bar)
        bar.close()
    if card.upscaling is not None:
        result["detail"] = detail(generated, real_images, card.upscaling.low_res_size)
    result["real"] = _dice_record(real_pred, masks, names)
    result["realism"] = _realism(segmenter, generated, real_images, baseline_images, seed, radiomics)
    if train_masks is not None:
        result["realism"].update(
            _classifier_tests(train_generated, train_images, generated, real_images, card, seed)
        )
    return result


def _dice_record(pred, masks, names: Sequence[str], classes: Sequence[int] | None = None) -> dict:
    """Per-class and mean Dice of predicted masks against `masks` (over `classes`; default every
    non-background class), by class name."""
    return {
        "dice": _named(dice(pred, masks, len(names), classes), names),
        "mean_dice": round_score(mean_dice(pred, masks, len(names), classes)),
    }


def _realism(segmenter: Segmenter, generated, real_images, baseline_images, seed: int, radiomics: bool) -> dict:
    """KID and Frechet distance of the generated (and baseline) images to the real ones on the segmenter's
    features; with `radiomics`, FRD too."""
    # Half-size subsets: with subsets as large as the sets, every subset would be the whole set (std 0).
    real_features, subset = segmenter.features(real_images), max(2, len(real_images) // 2)

    def distances(features: np.ndarray, prefix: str = "") -> dict:
        return {
            f"{prefix}kid": _pair(kid(features, real_features, subset_size=subset, seed=seed)),
            f"{prefix}fd": float(f"{frechet_distance(features, real_features):.4g}"),
        }

    realism = {
        "measure": f"on the segmenter's pooled features: KID (100 subsets of {subset}), Frechet distance",
        **distances(segmenter.features(generated)),
    }
    if baseline_images is not None:
        realism["baseline"] = "real train subset vs real test images"
        realism.update(distances(segmenter.features(baseline_images), "baseline_"))
    if radiomics:
        realism["frd"] = float(f"{frd(generated, real_images):.4g}")
        if baseline_images is not None:
            realism["baseline_frd"] = float(f"{frd(baseline_images, real_images):.4g}")
    return realism


CLASSIFIER_SIZE = 128  # the largest size the classifier test reads images at: larger ones are shrunk to it


def _classifier_tests(train_generated, train_images, generated, real_images, card: ModelCard, seed: int):
    """The classifier test of generated vs real images and its real-vs-real floor, as realism entries."""
    size, m = min(card.img_size, CLASSIFIER_SIZE), len(train_generated)
    if len(train_images) != m:
        raise ImageError(f"{len(train_images)} real train images for {m} train masks, expected one per mask")
    accuracy = classifier_test(train_generated, train_images, generated, real_images, size=size, seed=seed)
    return {
        "classifier_measure": (
            f"held-out accuracy of a CNN at {size} px trained on {m} generated vs {m} real train images; "
            "baseline: the same test on halves of the real images"
        ),
        "classifier": round_score(accuracy),
        "baseline_classifier": round_score(classifier_floor(train_images, real_images, size=size, seed=seed)),
    }


def _named(scores: dict[int, float], names: Sequence[str]) -> dict[str, float | None]:
    return {names[c]: round_score(v) for c, v in scores.items()}


def _pair(mean_std: tuple[float, float]) -> dict[str, float]:
    return {"mean": float(f"{mean_std[0]:.4g}"), "std": float(f"{mean_std[1]:.4g}")}


def run_label(result: dict) -> str:
    """The key of one `measure_quality` result in `card.quality["runs"]`, e.g. "dpm++ 20 auto" (a cascade's
    "dpm++ 12 + ddim 8 auto": the base's sampler and steps, then the upscaler's; "dpm++ 12 auto guided 3"
    with mask guidance)."""
    s = result["settings"]
    upscaler = f" + {s['upscale_sampler']} {s['upscale_steps']}" if "upscale_steps" in s else ""
    guided = f" guided {s['guidance_scale']:g}" if "guidance_scale" in s else ""
    return f"{s['scheduler']} {s['num_inference_steps']}{upscaler} {s['precision']}{guided}"


def quality_table(runs: dict[str, dict]) -> str:
    """`measure_quality` results by label -> a text table: Dice per class, mean, per omitted class, KID.

    The first column is the real test images: the segmenter's ceiling for Dice, the real-vs-real
    baseline for KID. KID is shown x 1000, as mean +- std over subsets.
    """
    first = next(iter(runs.values()))
    labels = ["real (ceiling)", *runs]
    rows: list[tuple[str, list[str]]] = []

    def cell(value):
        return "-" if value is None else f"{value:.4f}"

    for name in first["dice"]:
        rows.append(
            (
                f"Dice {name}",
                [cell(first["real"]["dice"][name])] + [cell(r["dice"][name]) for r in runs.values()],
            )
        )
    rows.append(
        ("mean Dice", [cell(first["real"]["mean_dice"])] + [cell(r["mean_dice"]) for r in runs.values()])
    )
    for name in first["omit"]:
        values = [cell(r["omit"].get(name, {}).get("mean_dice")) for r in runs.values()]
        rows.append((f"kept-class Dice, {name} omitted", ["", *values]))

    def kid_cell(pair):
        return "-" if pair is None else f"{1000 * pair['mean']:.2f} +- {1000 * pair['std']:.2f}"

    baseline = first["realism"]
    rows.append(
        (
            "KID x1000 vs real test images",
            [kid_cell(baseline.get("baseline_kid"))] + [kid_cell(r["realism"]["kid"]) for r in runs.values()],
        )
    )
    for key, name in (
        ("fd", "Frechet distance vs real test images"),
        ("frd", "FRD vs real test images"),
        ("classifier", "classifier accuracy, held out"),
    ):
        if any(key in r["realism"] for r in runs.values()):  # FRD and the classifier are measured on request
            values = [baseline.get(f"baseline_{key}")] + [r["realism"].get(key) for r in runs.values()]
            rows.append((name, ["-" if v is None else f"{v:.4g}" for v in values]))
    head = max(len(r[0]) for r in rows)
    widths = [max(len(label), *(len(r[1][i]) for r in rows)) for i, label in enumerate(labels)]
    lines = ["  ".join([" " * head, *(label.rjust(w) for label, w in zip(labels, widths, strict=True))])]
    lines += [
        "  ".join([name.ljust(head), *(v.rjust(w) for v, w in zip(values, widths, strict=True))])
        for name, values in rows
    ]
    lines.append(
        "(real column: the segmenter on the real test images; distances of a real train subset; "
        "the classifier on halves of the real images)"
    )
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------------------


def load_test_set(img_dir, seg_dir, card: ModelCard, num_masks: int | None = None, seed: int = 0):
    """The real data `measure_quality` needs, read in the model's size, channels and palette.

    -> (test masks (N, H, W) int64, test images (N, C, H, W) float32 in [0, 1], a random subset of N real
    train images for the baseline, same layout, or None without a train split). N = the test split's size,
    or its first `num_masks`.
    """
    check_seed(seed, "seed")
    test = SegDataset(
        img_dir, seg_dir, "test", card.img_size, card.img_channels, card.num_classes, card.palette
    )
    n = len(test) if num_masks is None else min(num_masks, len(test))
    images = torch.stack([test[i]["image"] for i in range(n)]) / 2 + 0.5
    masks = torch.from_numpy(test.masks[:n].astype(np.int64))
    if not (Path(img_dir) / "train").is_dir():
        return masks, images, None
    train = [case.image for case in find_cases(img_dir, None, "train")]
    pick = np.random.default_rng(seed).choice(len(train), min(n, len(train)), replace=False)
    baseline = [read_image(train[i], card.img_channels, card.img_size) for i in sorted(pick)]
    baseline = torch.stack(
        [torch.from_numpy(b).float() / (255 if b.dtype == np.uint8 else 1) for b in baseline]
    )
    return masks, images, baseline


CLASSIFIER_MASKS = 512  # train masks whose images the classifier test learns from, on each side


def load_train_subset(img_dir, seg_dir, card: ModelCard, num_masks: int = CLASSIFIER_MASKS, seed: int = 0):
    """A random subset of the train split for the classifier test, read as `load_test_set` reads the test.

    -> (masks (M, H, W) int64, images (M, C, H, W) float32 in [0, 1]), M = min(num_masks, the split's size).
    """
    check_seed(seed, "seed")
    train = SegDataset(
        img_dir, seg_dir, "train", card.img_size, card.img_channels, card.num_classes, card.palette
    )
    pick = sorted(np.random.default_rng(seed).choice(len(train), min(num_masks, len(train)), replace=False))
    images = torch.stack([train[i]["image"] for i in pick]) / 2 + 0.5
    return torch.from_numpy(train.masks[pick].astype(np.int64)), images


def write_to_card(model_dir: str | Path, segmenter: Segmenter, result: dict) -> ModelCard:
    """Copy the segmenter into MODEL_DIR/segmenter/ and store `result` under card.quality["runs"][label]."""
    model_dir = Path(model_dir)
    segmenter.save_pretrained(model_dir / "segmenter")
    card = ModelCard.load(model_dir) if (model_dir / CARD_FILE).is_file() else None
    if card is None:  # an original-code folder: its card is built when it is opened
        card = SegDiffPipeline.from_pretrained(model_dir, num_classes=segmenter.config.num_classes).card
    card.segmenter = "segmenter"
    card.quality.setdefault("runs", {})[run_label(result)] = result
    card.save(model_dir)
    return card
