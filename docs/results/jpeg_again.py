"""What one JPEG pass costs: a copy of an ImageFolder dataset with every image JPEG-encoded once more.

The project's CIFAR-10 is a JPEG re-encoding (quality 75, 4:2:0 chroma) of the original images,
which are not on the machine, so the cost of that first pass cannot be measured directly. This
writes a second pass of the same kind: each image is reflect-padded by ``--shift`` pixels at the
top and left, so that JPEG's 8x8 blocks and 2x2 chroma cells fall on another grid than the first
pass's (encoding on the same grid again changes little), encoded at ``--quality`` with 4:2:0 chroma,
decoded, and cropped back; it is stored as PNG, so no third lossy pass happens. Training and testing
a classifier on the copy, against the same command on the original, measures what one more pass
costs (RESULTS.md, "What the JPEG copy costs"):

    python docs/results/jpeg_again.py .cache/cifar10-jpeg .cache/cifar10-jpeg-again
    colorquant train-classifier --arch airbench93 --epochs 12 --data-root .cache/cifar10-jpeg-again ...
"""

import argparse
import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm


def encode_again(image: Image.Image, quality: int, shift: int) -> Image.Image:
    """``image`` after one more JPEG pass (``quality``, 4:2:0) on a grid moved by ``shift`` pixels."""
    pixels = np.asarray(image.convert("RGB"))
    padded = Image.fromarray(np.pad(pixels, ((shift, 0), (shift, 0), (0, 0)), mode="reflect"))
    buffer = io.BytesIO()
    padded.save(buffer, format="JPEG", quality=quality, subsampling=2)  # 2: 4:2:0 chroma
    decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return decoded.crop((shift, shift, shift + image.width, shift + image.height))


def _convert(job) -> None:
    source, target, quality, shift = job
    with Image.open(source) as image:
        encode_again(image, quality, shift).save(target)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="ImageFolder root (train/<class>/*, test/<class>/*)")
    parser.add_argument("target", type=Path, help="where to write the copy (PNG files)")
    parser.add_argument("--quality", type=int, default=75)
    parser.add_argument("--shift", type=int, default=3, help="grid offset in pixels, 1..7 (default: 3)")
    parser.add_argument("--workers", type=int, default=2, help="processes (default: 2; 1: this one)")
    args = parser.parse_args(argv)
    if not 1 <= args.shift <= 7:
        parser.error(f"--shift must be in 1..7, got {args.shift}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    sources = sorted(p for p in args.source.glob("*/*/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not sources:
        parser.error(f"{args.source} holds no <split>/<class>/<image> files")
    jobs = []
    for source in sources:
        target = (args.target / source.relative_to(args.source)).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((source, target, args.quality, args.shift))
    if args.workers == 1:
        for job in tqdm(jobs, desc="re-encoding"):
            _convert(job)
        return
    with ProcessPoolExecutor(args.workers) as pool:
        for _ in tqdm(pool.map(_convert, jobs, chunksize=256), total=len(jobs), desc="re-encoding"):
            pass


if __name__ == "__main__":
    main()
