"""How a cascade's upscaler should sample: detail bands for each sampler, step count and noise level.

    python benchmarks/upscaler_sampling.py --model assets/models/psfhs-ultrasound-256 --data ../shared/data/psfhs-256

For the first N test masks, with the noise `segdiff.model.sampling` gives each mask, the cascade draws at its
default base settings and each upscaler setting: the base draws the same images every time. Printed per setting: the
share of spectral energy in each octave band above the base's Nyquist frequency, as a ratio to the real test
images' share (1 = the real images' detail; well below 1 = blurred; well above = noise). The model card's
`upscale` record takes the chosen setting (`scheduler`, `steps`, `noise_level`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from segdiff import SegDiffPipeline
from segdiff.measure.quality import detail, load_test_set
from segdiff.model.sampling import noise_generator

SETTINGS = [  # (sampler, steps, noise level of the low-resolution input)
    ("dpm++", 4, 100),
    ("dpm++", 8, 100),
    ("ddpm", 4, 100),
    ("ddpm", 6, 100),
    ("ddim", 4, 100),
    ("ddim", 6, 100),
    ("ddim", 8, 100),
    ("ddim", 8, 200),
    ("ddim", 10, 250),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("assets/models/psfhs-ultrasound-256"))
    parser.add_argument("--data", type=Path, required=True, help="a folder holding img/ and mask/")
    parser.add_argument("--num_masks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pipe = SegDiffPipeline.from_pretrained(args.model, precision="fp32")
    if pipe.card.upscaling is None:
        sys.exit(f"error: {args.model} is not a cascade (its card has no upscale record)")
    pipe.set_progress_bar_config(disable=True)
    masks, images, _ = load_test_set(
        args.data / "img", args.data / "mask", pipe.card, args.num_masks, args.seed
    )
    print(
        f"{args.model}: {len(masks)} test masks, detail ratio to the real images by band (cycles per image width)"
    )
    for sampler, steps, level in SETTINGS:
        # The same noise for every setting: the base draws the same images, the upscaler starts alike.
        pipe.card.upscale.update(scheduler=sampler, steps=steps, noise_level=level)
        generators = [noise_generator(args.seed, i) for i in range(len(masks))]
        drawn = pipe(masks, generator=generators, output_type="pt").images
        result = detail(drawn, images, pipe.card.upscaling.low_res_size)
        bands = "  ".join(f"{b}: {r:.2f}x" for b, r in zip(result["bands"], result["ratio"], strict=True))
        print(f"  {sampler:>5} {steps:>2} steps, noise level {level:>3}:  {bands}", flush=True)


if __name__ == "__main__":
    main()
