"""A DICOM series converts to the same slices as its NIfTI twin: the largest difference, in grey levels.

    python benchmarks/dicom_roundtrip.py [--image ct.nii.gz] [--labels labels.nii.gz] [--names label_names.json]

Writes the CT volume as a DICOM series (one uncompressed file per slice, file names in shuffled order,
unsigned 16-bit pixels with a rescale intercept; `segdiff.data.dicom.write_series`), then runs
`python -m segdiff.volumes convert` twice, once on the NIfTI and once on the series folder, with the same
labels, and compares every written image and mask. Prints the count of slices, the largest absolute
difference in grey levels and the number of differing pixels, under a CT window and under percentile
normalisation. The default data is the TotalSegmentator example beside the repository (../shared/data).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not
from segdiff.data.dicom import write_series  # noqa: E402

EXAMPLE = ROOT.parent / "shared" / "data" / "totalseg-example"


def convert(out: Path, images: Path, labels: Path, names: Path, *normalize: str) -> None:
    command = [sys.executable, "-m", "segdiff.volumes", "convert", str(out), "--images", str(images),
               "--labels", str(labels), "--label-names", str(names), "--keep-empty", "--split", "1,0,0", *normalize]  # fmt: skip
    print("$ python", " ".join(command[1:]).replace(str(out.parent), "$TMP"))
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def compare(a: Path, b: Path) -> tuple[int, int, int]:
    """(files, largest |difference|, differing pixels) over the same-named PNGs below `a` and `b`."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    if files != sorted(p.relative_to(b) for p in b.rglob("*.png")):
        raise SystemExit(f"{a} and {b} hold different slice names")
    largest = differing = 0
    for name in files:
        diff = np.abs(np.asarray(Image.open(a / name), int) - np.asarray(Image.open(b / name), int))
        largest, differing = max(largest, int(diff.max())), differing + int((diff > 0).sum())
    return len(files), largest, differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=EXAMPLE / "ct.nii.gz")
    parser.add_argument("--labels", type=Path, default=EXAMPLE / "labels.nii.gz")
    parser.add_argument("--names", type=Path, default=EXAMPLE / "label_names.json")
    args = parser.parse_args()
    ct = nib.load(args.image)
    intercept = min(-1024.0, float(np.floor(np.min(ct.dataobj))))  # the scanners' usual -1024, or lower
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_series(ct, tmp / "ct", intercept=intercept, seed=0)
        print(
            f"wrote {len(files)} DICOM files (uint16, RescaleIntercept {intercept:g}, shuffled names) from {args.image}"
        )
        for normalize in (["--window", "abdomen"], []):
            label = " ".join(normalize) or "percentile (default)"
            convert(tmp / "from-nifti", args.image, args.labels, args.names, *normalize)
            convert(tmp / "from-dicom", tmp / "ct", args.labels, args.names, *normalize)
            for kind in ("img", "mask"):
                count, largest, differing = compare(tmp / "from-nifti" / kind, tmp / "from-dicom" / kind)
                print(f"{label}, {kind}: {count} slices, largest |DICOM - NIfTI| {largest} grey level(s), "
                      f"{differing} pixel(s) differ")  # fmt: skip
            for out in ("from-nifti", "from-dicom"):
                shutil.rmtree(tmp / out)


if __name__ == "__main__":
    main()
