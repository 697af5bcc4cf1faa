"""``colorquant demo``: the paper's point on bundled CIFAR-10 test images with bundled trained weights.

Runs offline in a minute or two on a CPU: a frozen airbench93 classifier judges test images quantized by
ColorCNN, by ColorCNN+ (one network for every K) and by median cut, octree and k-means (with and
without Floyd-Steinberg dithering) at K = 2, 4, 8 colours, with JPEG as the comparison; prints the
table (``colorquant evaluate`` does the work, on the bundled sample) and, per K, the gap between the
best learned model (ColorCNN or ColorCNN+) and the best traditional method, and draws a picture
sheet. The k-means rows are two: the paper's (``pil_kmeans``, PIL's
``quantize(kmeans=2)``) and this library's k-means++ (``kmeans``); "best traditional" is the best of
every traditional row of the table (median cut, octree and both k-means, dithered or not), so the
margin is never taken against a weaker rival than one the table shows.

What is bundled (``colorquant_ops/assets/``, about 12 MB):

* ``cifar10-sample/test/<class>/*.jpg``: 500 CIFAR-10 test images, 50 per class, the same files as
  ``--test-subset 500`` picks from the project's CIFAR-10 JPEG copy (its class-balanced seeded order);
* ``weights/airbench93-cifar10.pt``: the classifier of ``colorquant reproduce --preset cifar10-cpu``
  (airbench93, 88 % full colour on the JPEG copy's test split);
* ``weights/colorcnn-k{2,4,8}.pt``: the ColorCNN (U-Net width 16) checkpoints of that preset, after
  its 12 (K = 2) and 6 epochs with Gumbel noise on the logits (``colorcnn-k{2,4,8}-gumbel``);
* ``weights/colorcnn-k2-compact.pt``: its second K = 2 ColorCNN, trained with the boundary term
  (``--boundary 2``, then six epochs with Gumbel noise and ``--boundary 5``:
  ``colorcnn-k2-compact-gumbel``) for palette PNGs under k-means' size (a smaller lead than
  ``colorcnn-k2.pt``'s: the table's ``colorcnn (colorcnn-k2-compact)`` row), against the bundled classifier;
* ``weights/colorcnn-plus.pt``: a ColorCNN+ (U-Net width 16, trained at K = 2..256) of that preset's
  recipe, trained against the bundled classifier (``colorcnn-plus-gumbel``: with four epochs of Gumbel
  noise at the end), with the logit smoothing :data:`PLUS_SMOOTHING` before its argmax (chosen on
  training-split images for the network before the noise, RESULTS.md session 17);

the classifier's and ColorCNN's weights stored in float16, ColorCNN+'s in float32 (all loaded into
float32 models: ColorCNN+ clusters its features with k-means, and its float16 copy scored 0.18
points less at K = 8 on the full test split, RESULTS.md).
:func:`rebuild_assets` (``colorquant demo
--rebuild-assets RUN_DIR``) regenerates them from a finished preset run.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import argparse

import torch

from .._io import save_atomic
from ..models.classifiers import load_classifier
from ..models.colorcnn import load_colorcnn_checkpoint
from ..models.colorcnn_plus import load_colorcnn_plus_checkpoint
from ..models.pretrained import PRETRAINED_CLASSIFIERS, PRETRAINED_COLORCNN, PRETRAINED_COLORCNN_PLUS, WEIGHTS
from . import data, evaluate
from .commands import Command, build_parser
from .presets import COMPACT_STAGE, PLUS_STAGE, gumbel_stage
from .quantize_files import comparison_sheet

__all__ = ["ASSETS", "COMMAND", "DEMO_KS", "PLUS_SMOOTHING", "main", "rebuild_assets"]

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SAMPLE_ROOT = ASSETS / "cifar10-sample"
CLASSIFIER = WEIGHTS / PRETRAINED_CLASSIFIERS["cifar10-airbench93"]
PLUS = WEIGHTS / PRETRAINED_COLORCNN_PLUS["cifar10-plus"]
COMPACT = WEIGHTS / PRETRAINED_COLORCNN["cifar10-k2-compact"]
DEMO_KS = (2, 4, 8)
#: ``smoothing`` of the bundled ColorCNN+: the strongest of 0, 0.05, ..., 0.3 whose accuracy on 5,000
#: training-split images stayed within 0.2 points of none's from K = 4 to 64 (RESULTS.md, session 17)
PLUS_SMOOTHING = 0.1
SAMPLE_SIZE = 500
_METHODS = ("median_cut", "octree", "pil_kmeans", "kmeans")  # the table's traditional rows


def _colorcnn_path(k: int) -> Path:
    return WEIGHTS / PRETRAINED_COLORCNN[f"cifar10-k{k}"]


def _half_state(ckpt: dict) -> dict:
    state = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    return {**ckpt, "state_dict": state}


def rebuild_assets(run_dir, data_root=None) -> list[Path]:
    """Regenerate the bundled sample and weights from a finished ``reproduce --preset cifar10-cpu``
    run directory (its ``classifier/final.pt``, ``colorcnn-k{2,4,8}-gumbel/final.pt``,
    ``colorcnn-k2-compact-gumbel/final.pt`` and ``colorcnn-plus-gumbel/final.pt``); ``data_root``:
    the CIFAR-10 copy to take the sample from (default: the project's extracted JPEG copy)."""
    run_dir = Path(run_dir)
    sources = {CLASSIFIER: run_dir / "classifier" / "final.pt"}
    sources.update({_colorcnn_path(k): run_dir / gumbel_stage(f"colorcnn-k{k}") / "final.pt" for k in DEMO_KS})
    sources[COMPACT] = run_dir / gumbel_stage(COMPACT_STAGE) / "final.pt"
    sources[PLUS] = run_dir / gumbel_stage(PLUS_STAGE) / "final.pt"
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--rebuild-assets {run_dir}: missing {', '.join(missing)}")
    checkpoints = {}
    for dest, src in sources.items():  # every checkpoint must load (one-line ValueError) before any is written
        {CLASSIFIER: load_classifier, PLUS: load_colorcnn_plus_checkpoint}.get(dest, load_colorcnn_checkpoint)(src)
        checkpoints[dest] = torch.load(src, map_location="cpu", weights_only=True)
    root = Path(data_root) if data_root is not None else data.extract_cifar10_jpeg()
    sample = data.build_dataset("cifar10", root, "test", subset=SAMPLE_SIZE)
    files = [sample.dataset.samples[i][0] for i in sample.indices]  # ImageFolder-layout copy: real files
    written = []
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    for dest, ckpt in checkpoints.items():
        if "classifier" in ckpt:  # ColorCNN / ColorCNN+ checkpoints name their classifier
            ckpt["classifier"] = CLASSIFIER.name
        if dest == PLUS:
            ckpt["config"] = {**ckpt["config"], "smoothing": PLUS_SMOOTHING}
        save_atomic(ckpt if dest == PLUS else _half_state(ckpt), dest)  # PLUS: see the module docstring
        written.append(dest)
    shutil.rmtree(SAMPLE_ROOT / "test", ignore_errors=True)
    for path in files:
        path = Path(path)
        dest = SAMPLE_ROOT / "test" / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        written.append(dest)
    return written


def _check_assets() -> None:
    needed = [CLASSIFIER, *(_colorcnn_path(k) for k in DEMO_KS), COMPACT, PLUS, SAMPLE_ROOT / "test"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"the demo's bundled assets are missing ({', '.join(missing)}); they come with the source tree, "
            "or regenerate them: colorquant reproduce --preset cifar10-cpu && "
            "colorquant demo --rebuild-assets runs/cifar10-cpu")


_LEARNED_NAMES = {"colorcnn": "ColorCNN", "colorcnn+": "ColorCNN+"}


def _learned_name(r: dict) -> str:
    return _LEARNED_NAMES[r["method"]] + (f" ({r['variant']})" if r.get("variant") else "")


def _summary(records: list[dict]) -> list[str]:
    """Per K: the best learned model's accuracy (ColorCNN, either K = 2 network, or ColorCNN+) against
    the best traditional row (any of :data:`_METHODS`, dithered or not); beneath it, of the learned
    models at or above that row, the one with the smallest palette PNGs against k-means' size."""
    lines = []
    full = next(r["accuracy"] for r in records if r["method"] == "full colour")
    for k in DEMO_KS:
        learned = [r for r in records if r["method"] in _LEARNED_NAMES and r["num_colors"] == k
                   and r["accuracy"] is not None]
        rivals = [r for r in records if r["method"] in _METHODS and r["num_colors"] == k]
        if not learned or not rivals:
            continue
        ours = max(learned, key=lambda r: r["accuracy"])  # a tie goes to ColorCNN, listed first
        best = max(rivals, key=lambda r: r["accuracy"])
        name = best["method"] + (" + dither" if best["dither"] == "on" else "")
        lines.append(f"K={k} ({math.log2(k):g} bit): {_learned_name(ours)} {100 * ours['accuracy']:.1f}% "
                     f"vs best traditional "
                     f"({name}) {100 * best['accuracy']:.1f}%: {100 * (ours['accuracy'] - best['accuracy']):+.1f} "
                     f"points; full colour {100 * full:.1f}%")
        kmeans = next((r for r in rivals if r["method"] == "kmeans" and r["dither"] == "off"), None)
        ahead = [r for r in learned if r["accuracy"] >= best["accuracy"] and r["bpp"] is not None]
        if kmeans is not None and ahead:
            small = min(ahead, key=lambda r: r["bpp"])
            lines.append(f"  palette PNG: {_learned_name(small)} {small['bpp']:.3f} bpp "
                         f"({100 * small['accuracy']:.1f}%) vs kmeans {kmeans['bpp']:.3f} bpp: "
                         f"{small['bpp'] - kmeans['bpp']:+.3f}")
    return lines


def main(out_dir="runs/demo", progress: bool = True, num_images: int = 5) -> list[dict]:
    """Run the demo (see the module docstring); returns ``colorquant evaluate``'s rows."""
    _check_assets()
    out = Path(out_dir)
    ckpts = [str(_colorcnn_path(k)) for k in DEMO_KS]
    argv = ["evaluate", "--classifier", str(CLASSIFIER), "--colorcnn", *ckpts, str(COMPACT),
            "--colorcnn-plus", str(PLUS),
            "--dataset", "cifar10", "--data-root", str(SAMPLE_ROOT), "--cache-dir", "none",
            "--methods", "colorcnn", "colorcnn+", *_METHODS,
            "--dither", "both", "--num-colors", *map(str, DEMO_KS), "--jpeg-qualities", "5", "10", "20", "40",
            "--device", "cpu", "--out-dir", str(out / "evaluate")]
    if not progress:
        argv.append("--no-progress")
    print("colorquant demo: a frozen airbench93 classifier on 500 bundled CIFAR-10 test images, quantized to K colours "
          "by ColorCNN (bundled weights, U-Net width 16, preset cifar10-cpu), by ColorCNN+ (one bundled network "
          "for every K) and by the traditional quantizers")
    records = evaluate.evaluate(build_parser([evaluate.COMMAND]).parse_args(argv))
    print("\n" + "\n".join(_summary(records)))

    test_set = data.build_dataset("cifar10", SAMPLE_ROOT, "test")
    per_class = len(test_set) // len(test_set.classes)
    picks = [i * per_class for i in range(min(num_images, len(test_set.classes)))]  # one image per class
    images = torch.stack([data.test_transform("cifar10", normalize=False)(test_set[i][0]) for i in picks])
    sheet = comparison_sheet((images * 255).round().to(torch.uint8), {k: Path(p) for k, p in zip(DEMO_KS, ckpts)},
                             DEMO_KS, plus_checkpoint=PLUS)
    sheet.save(out / "sheet.png")
    print(f"picture sheet (rows: image x K; columns: original, ColorCNN, ColorCNN+, median cut, median cut + dither, "
          f"octree, k-means): {out / 'sheet.png'}")
    return records


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default="runs/demo", help="where the table and sheet go (default: runs/demo)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bar (default: on)")
    p.add_argument("--rebuild-assets", metavar="RUN_DIR", default=None,
                   help="regenerate the bundled weights and image sample from a finished "
                        "'colorquant reproduce --preset cifar10-cpu' run directory, then stop")


def run(args: argparse.Namespace):
    """``colorquant demo``: the demo, or with ``--rebuild-assets`` the regeneration of its assets."""
    if args.rebuild_assets is not None:
        written = rebuild_assets(args.rebuild_assets)
        print(f"wrote {len(written)} files under {ASSETS}")
        return written
    return main(out_dir=args.out_dir, progress=args.progress)


COMMAND = Command(
    "demo", help="ColorCNN vs median cut / octree / k-means at K=2,4,8 on bundled CIFAR-10 "
                 "images with bundled weights: a table and a picture sheet (offline, CPU)",
    description="The paper's point on bundled CIFAR-10 test images with bundled trained weights.",
    add_arguments=add_demo_arguments, run=run)
