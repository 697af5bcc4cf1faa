"""``colorquant evaluate``: a frozen classifier on colour-quantized and JPEG-compressed test images.

One pass over the test split (``data.test_transform(name, normalize=False)``, values in [0,1]) fills
one table with, per row:

* ``method`` / ``dither`` / ``K``: each of ``--methods`` x ``--dither`` x ``--num-colors``. The
  classical methods (:class:`~colorquant_ops.transforms.ColorQuantize`) quantize the [0,1] image, which is
  then normalized for the classifier: ``median_cut``, ``octree`` and ``pil_kmeans`` are the paper's
  baselines (PIL; ``pil_kmeans`` is the paper's k-means, ``Image.quantize(K, kmeans=2)``: median cut
  refined by PIL's k-means), ``kmeans`` this library's k-means op (k-means++ seeding, ``--kmeans-iters``
  Lloyd iterations), another and stronger algorithm than the paper's, so reported under its own name. ``colorcnn`` runs the
  ``--colorcnn`` checkpoint whose ``num_colors`` is K (argmax path) the same way: the network sees
  the image normalized as in training (the checkpoint's ``input_normalization``; ``--dataset``'s
  for checkpoints that record none) and recolours the [0,1] image; dithering does not apply to it
  (one row, dither ``off``); a K without a checkpoint is skipped with a note. Several checkpoints may
  share a K (e.g. ``cifar10-k2`` and the smaller-file ``cifar10-k2-compact``): each gets a row, the
  first given plain, the others with a ``variant`` (:func:`~.arguments.checkpoint_label`) that keeps
  them apart in the tables and plots. ``colorcnn+`` runs the one
  ``--colorcnn-plus`` checkpoint (:class:`~colorquant_ops.models.ColorCNNPlus`) at every K, likewise (with
  the checkpoint's logit smoothing, or ``--plus-smoothing``'s; a non-zero one is named in the note). Dithered rows of the
  paper's baselines use the authors' dithering (each value clamped to [0, 1] before the nearest-colour
  search: ``ColorQuantize(dither_clamp=True)``); ``kmeans`` + dither the plain error diffusion.
* ``accuracy``: top-1 accuracy of the classifier (eval mode);
* ``colors``: mean number of colours actually used per image (``count_colors``);
* ``bpp``: mean size of the palette PNG (index map + palette, ``palette_png_sizes``) in bits per pixel.

plus a ``full colour`` row (bpp ``-``) and one ``jpeg`` row per ``--jpeg-qualities`` entry (accuracy on
the JPEG round-tripped images, mean JPEG bits per pixel).

The run directory gets ``settings.json``, ``log.txt``, ``results.csv``, ``results.json``,
``results.md`` (the printed markdown table), ``accuracy_vs_bits.png`` (accuracy vs log2 K per method)
and ``accuracy_vs_bpp.png`` (accuracy vs bits per pixel, with the JPEG curve).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm.auto import tqdm

from .. import codecs
from .._io import atomic_write, atomic_write_text
from ..models.classifiers import load_classifier
from ..quantizers.reference import count_colors
from ..transforms import METHODS, ColorQuantize
from . import data
from .arguments import (checkpoint_label, integer, load_colorcnn_list, load_colorcnn_plus_for, load_one_line,
                        positive_int, single_process_device)
from .commands import Command
from .rundir import RunDir

__all__ = ["COMMAND", "add_evaluate_arguments", "evaluate", "markdown_table", "merge_rows", "pivot_tables",
           "plot_results"]

_DITHERED = ("median_cut", "octree", "kmeans", "pil_kmeans")
#: The paper's traditional baselines (its comparison tables and "best traditional").
PAPER_BASELINES = ("median_cut", "octree", "pil_kmeans")
_FIELDS = ("method", "variant", "dither", "num_colors", "bits", "accuracy", "colors", "bpp", "images", "note")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classifier", required=True, help="frozen classifier checkpoint (from train-classifier)")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help=f"quantization methods, of {', '.join(METHODS)} (default: all)")
    p.add_argument("--dither", default="both", help="on, off or both: Floyd-Steinberg for median_cut, octree, "
                   "kmeans, pil_kmeans (default: both)")
    p.add_argument("--num-colors", nargs="+", type=integer, default=[2, 4, 8, 16, 32, 64],
                   help="numbers of colours K, each in 2..256 (default: 2 4 8 16 32 64)")
    p.add_argument("--colorcnn", nargs="+", default=[], help="ColorCNN checkpoints (from train), matched to K "
                   "by their num_colors; several at one K get a row each")
    p.add_argument("--colorcnn-plus", default=None, metavar="CHECKPOINT",
                   help="a ColorCNN+ checkpoint (from train --model colorcnn+): the colorcnn+ rows, every K")
    p.add_argument("--plus-smoothing", type=float, default=None, metavar="S",
                   help="ColorCNN+'s 3x3 logit smoothing before the argmax, in [0, 1] (default: the "
                        "checkpoint's; 0: none)")
    p.add_argument("--jpeg-qualities", nargs="*", type=integer, default=[5, 10, 20, 40, 80],
                   help="JPEG qualities for the comparison rows (default: 5 10 20 40 80; none: no JPEG rows)")
    p.add_argument("--kmeans-iters", type=int, default=10,
                   help="Lloyd iterations of kmeans, the library's k-means++ (default: 10; pil_kmeans, the "
                        "paper's, runs PIL's until at most one pixel moves)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=data.DATASETS, help="dataset name (default: cifar10)")
    g.add_argument("--data-root", default=None,
                   help="dataset directory (default: for cifar10 the project's extracted JPEG copy, else ./data)")
    g.add_argument("--test-subset", type=positive_int, default=None, help="evaluate on N test images only")
    g.add_argument("--cache-dir", default=None,
                   help="decoded-tensor cache of fixed-size datasets (default: <repo>/.cache/tensors; 'none': off)")
    g.add_argument("--batch-size", type=positive_int, default=128, help="(default: 128)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--out-dir", default=None, help="run directory (default: runs/evaluate-<timestamp>)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bar (default: on)")


# --------------------------------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> list[bool]:
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown method {unknown[0]!r}; use any of {', '.join(METHODS)}")
    bad = [k for k in args.num_colors if not 2 <= k <= 256]
    if bad:
        raise ValueError(f"--num-colors: K must be in 2..256, got {bad[0]}")
    choices = {"on": [True], "off": [False], "both": [False, True]}
    if args.dither not in choices:
        raise ValueError(f"--dither: expected on, off or both, got {args.dither!r}")
    bad = [q for q in args.jpeg_qualities if not 1 <= q <= 100]
    if bad:
        raise ValueError(f"--jpeg-qualities: quality must be in 1..100, got {bad[0]}")
    if args.kmeans_iters < 0:
        raise ValueError(f"--kmeans-iters must be >= 0, got {args.kmeans_iters}")
    if args.plus_smoothing is not None and not 0 <= args.plus_smoothing <= 1:
        raise ValueError(f"--plus-smoothing must be in [0, 1], got {args.plus_smoothing}")
    return choices[args.dither]


def _test_set(args: argparse.Namespace):
    root, cache = data.data_locations(args)
    transform = data.test_transform(args.dataset, normalize=False)
    return data.build_dataset(args.dataset, root, "test", transform, subset=args.test_subset, cache_dir=cache), root


class _Row:
    def __init__(self, method, dither, k, note="", variant=""):
        self.method, self.dither, self.k, self.note, self.variant = method, dither, k, note, variant
        self.correct = 0
        self.seen = 0
        self.colors = 0.0
        self.bpp = 0.0
        self.has_colors = self.has_bpp = False

    def add(self, logits: Tensor, labels: Tensor, colors=None, bpp=None) -> None:
        self.correct += int((logits.argmax(1) == labels).sum())
        self.seen += labels.shape[0]
        if colors is not None:
            self.colors += float(colors.double().sum())
            self.has_colors = True
        if bpp is not None:
            self.bpp += float(bpp.double().sum())
            self.has_bpp = True

    def record(self) -> dict:
        n = self.seen
        return {
            "method": self.method,
            "variant": self.variant,
            "dither": self.dither,
            "num_colors": self.k,
            "bits": math.log2(self.k) if isinstance(self.k, int) else None,
            "accuracy": self.correct / n if n else None,
            "colors": self.colors / n if n and self.has_colors else None,
            "bpp": self.bpp / n if n and self.has_bpp else None,
            "images": n,
            "note": self.note,
        }


def _fmt(value, spec: str) -> str:
    return "-" if value is None or value == "" else format(value, spec)


def _method_label(r: dict) -> str:
    """The row's method, with its variant (a second checkpoint at the same K) when it has one."""
    return f"{r['method']} ({r['variant']})" if r.get("variant") else r["method"]


def _series_label(r: dict) -> str:
    """One line of the pivot tables: method, variant and dither."""
    return _method_label(r) + (" + dither" if r["dither"] == "on" else "")


def markdown_table(records: list[dict]) -> str:
    lines = ["| method | dither | K | accuracy | colours used | bpp | note |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {_method_label(r)} | {r['dither'] or '-'} | {_fmt(r['num_colors'], 'd')} | "
                     f"{_fmt(r['accuracy'], '.4f')} | {_fmt(r['colors'], '.2f')} | {_fmt(r['bpp'], '.3f')} | "
                     f"{r['note'] or ''} |")
    return "\n".join(lines)


def merge_rows(run_dirs) -> list[dict]:
    """The rows of several evaluate run directories' ``results.json``, in order, each (method, variant,
    dither, K, note) once: the first run's row wins (e.g. the full-colour row, which every run measures)."""
    rows, seen = [], set()
    for run_dir in run_dirs:
        for row in json.loads((Path(run_dir) / "results.json").read_text())["rows"]:
            key = (row["method"], row.get("variant", ""), row["dither"], row["num_colors"], row["note"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def pivot_tables(records: list[dict]) -> str:
    """Markdown tables with one row per method (and dither) and one column per K: top-1 accuracy (%),
    mean colours used, palette-PNG bits per pixel. The full-colour accuracy heads the first table."""
    quant = [r for r in records if r["method"] in METHODS]
    ks = sorted({r["num_colors"] for r in quant})
    labels = list(dict.fromkeys(_series_label(r) for r in quant))
    cell = {(_series_label(r), r["num_colors"]): r for r in quant}
    full = next((r for r in records if r["method"] == "full colour"), None)
    parts = []
    for title, key, scale, spec in (("top-1 accuracy (%)", "accuracy", 100, ".1f"),
                                    ("mean colours used per image", "colors", 1, ".2f"),
                                    ("palette PNG, bits per pixel", "bpp", 1, ".3f")):
        lines = [f"| {title} | " + " | ".join(f"K={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        if key == "accuracy" and full is not None and full["accuracy"] is not None:
            lines.append(f"| full colour | {100 * full['accuracy']:.1f} |" + " |" * (len(ks) - 1))
        for label in labels:
            values = [cell.get((label, k), {}).get(key) for k in ks]
            lines.append(f"| {label} | " + " | ".join(_fmt(None if v is None else v * scale, spec)
                                                       for v in values) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot_results(records: list[dict], out: Path) -> list[Path]:
    """``out/accuracy_vs_bits.png`` and ``out/accuracy_vs_bpp.png`` (with the JPEG curve) from evaluate's rows."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    quant = [r for r in records if r["method"] in METHODS and r["accuracy"] is not None]
    full = next((r for r in records if r["method"] == "full colour"), None)
    jpeg = sorted((r for r in records if r["method"] == "jpeg"), key=lambda r: r["bpp"])
    series = {}
    for r in quant:
        series.setdefault(f"{r['method']} (dither {r['dither']})" if r["method"] in _DITHERED else _method_label(r),
                          []).append(r)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["bits"])
        ax.plot([r["bits"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=label)
    paths.append(_finish_plot(plt, fig, ax, full, "colour space size, bits (log2 K)", "accuracy vs colours",
                              out / "accuracy_vs_bits.png"))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, rows in series.items():
        rows = sorted((r for r in rows if r["bpp"] is not None), key=lambda r: r["bpp"])
        ax.plot([r["bpp"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=label)
    if jpeg:
        ax.plot([r["bpp"] for r in jpeg], [r["accuracy"] for r in jpeg], marker="s", color="k", label="JPEG")
    paths.append(_finish_plot(plt, fig, ax, full, "bits per pixel (palette PNG / JPEG)", "accuracy vs file size",
                              out / "accuracy_vs_bpp.png"))
    return paths


def _finish_plot(plt, fig, ax, full, xlabel: str, title: str, path: Path) -> Path:
    """Full-colour reference line, labels, legend; save to path and close."""
    if full is not None:
        ax.axhline(full["accuracy"], color="k", linestyle="--", label="full colour")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def evaluate(args: argparse.Namespace) -> list[dict]:
    """Run ``colorquant evaluate`` (see the module docstring); returns the table's rows as dicts."""
    dithers = _check_args(args)
    device = single_process_device(args.device)
    classifier = load_one_line(load_classifier, args.classifier).eval().requires_grad_(False).to(device)
    colorcnns = {}  # K -> [(path, model)], in --colorcnn's order
    for path, model in load_colorcnn_list(args.colorcnn, args.dataset, device):
        colorcnns.setdefault(model.num_colors, []).append((path, model))
    plus = None if args.colorcnn_plus is None else load_colorcnn_plus_for(args.colorcnn_plus, args.num_colors, device)
    if plus is not None and args.plus_smoothing is not None:
        plus.smoothing = args.plus_smoothing

    test_set, root = _test_set(args)
    stats = data.DATASET_STATS[args.dataset]
    num_classes = stats.num_classes or len(test_set.classes)
    out_features = classifier(torch.zeros(1, 3, stats.image_size, stats.image_size, device=device)).shape[1]
    if out_features != num_classes:
        raise ValueError(f"--classifier {args.classifier} predicts {out_features} classes; "
                         f"{args.dataset} has {num_classes}")

    # written only now that the arguments, checkpoints and data have been checked
    run = RunDir(args.out_dir or Path("runs") / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}")
    run.write_settings(args)
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "command")
    run.log(f"colorquant evaluate {options}")
    run.log(f"data: {args.dataset} in {root}: {len(test_set)} test images")
    # the classifier's input normalization (what it records; STL-10 ones from before: STL-10's statistics)
    mean, std = data.classifier_normalization(args.classifier, args.dataset)
    normalize = v2.Normalize(mean=list(mean), std=list(std))

    # rows in table order; jobs: (row, kind, quantizer or model)
    rows, jobs = [], []
    full = _Row("full colour", "", None)
    rows.append(full)
    ks = list(dict.fromkeys(args.num_colors))
    for method in dict.fromkeys(args.methods):
        for k in ks:
            if method == "colorcnn":
                if k not in colorcnns:
                    rows.append(_Row(method, "off", k, note="skipped: no --colorcnn checkpoint for this K"))
                    run.log(f"note: colorcnn K={k} skipped: no --colorcnn checkpoint with num_colors={k}")
                    continue
                variants = []
                for path, model in colorcnns[k]:
                    variant = checkpoint_label(path) if variants else ""
                    variant = str(path) if variant in variants else variant  # two files of one name
                    variants.append(variant)
                    row = _Row(method, "off", k, variant=variant)
                    rows.append(row)
                    jobs.append((row, ColorQuantize(k, "colorcnn", model=model)))
                continue
            if method == "colorcnn+":
                if plus is None:
                    rows.append(_Row(method, "off", k, note="skipped: no --colorcnn-plus checkpoint"))
                    continue
                row = _Row(method, "off", k, note=f"smoothing {plus.smoothing:g}" if plus.smoothing else "")
                rows.append(row)
                jobs.append((row, ColorQuantize(k, "colorcnn+", model=plus)))
                continue
            for dither in dithers:
                row = _Row(method, "on" if dither else "off", k)
                rows.append(row)
                # the paper's baselines dither as the authors' code does (each value clamped to [0, 1])
                jobs.append((row, ColorQuantize(k, method, dither=dither, kmeans_iters=args.kmeans_iters,
                                                dither_clamp=dither and method in PAPER_BASELINES)))
    if "colorcnn+" in args.methods and plus is None:
        run.log("note: colorcnn+ skipped: no --colorcnn-plus checkpoint")
    for k in sorted(colorcnns):
        if "colorcnn" in args.methods and k not in ks:
            for path, _ in colorcnns[k]:
                run.log(f"note: --colorcnn {path} (K={k}) unused: K={k} is not in --num-colors")
    jpeg_rows = []
    for q in dict.fromkeys(args.jpeg_qualities):
        row = _Row("jpeg", "", None, note=f"quality {q}")
        row.quality = q
        rows.append(row)
        jpeg_rows.append(row)

    loader = DataLoader(test_set, args.batch_size, shuffle=False, num_workers=args.workers)
    started = time.perf_counter()
    for images, labels in tqdm(loader, desc="evaluate", unit="batch", disable=not args.progress,
                               dynamic_ncols=True):
        images, labels = images.to(device), labels.to(device)
        H, W = images.shape[-2:]
        full.add(classifier(normalize(images)), labels)
        for row, q in jobs:
            quantized, index_map, palette = q.quantize(images)
            bpp = codecs.bits_per_pixel(codecs.palette_png_sizes(index_map.cpu(), palette.clamp(0, 1).cpu()), H, W)
            row.add(classifier(normalize(quantized)), labels, count_colors(quantized), bpp)
        for row in jpeg_rows:
            decoded, sizes = codecs.jpeg_roundtrip(images, row.quality, return_sizes=True)
            row.add(classifier(normalize(decoded)), labels, None, codecs.bits_per_pixel(sizes, H, W))
    seconds = time.perf_counter() - started

    records = [r.record() for r in rows]
    table = markdown_table(records) + "\n\n" + pivot_tables(records)
    run.log(table)
    # atomically, results.json (what reproduce takes as done) last, after the plots
    atomic_write_text(run.path / "results.md", table + "\n")
    with atomic_write(run.path / "results.csv", text=True) as f:
        writer = csv.DictWriter(f, fieldnames=_FIELDS)
        writer.writeheader()
        for r in records:
            writer.writerow({k: "" if r[k] is None else r[k] for k in _FIELDS})
    plots = plot_results(records, run.path)
    atomic_write_text(run.path / "results.json", json.dumps(
        {"dataset": args.dataset, "classifier": str(args.classifier), "images": len(test_set),
         "seconds": round(seconds, 3), "rows": records}, indent=2) + "\n")
    run.log(f"done in {seconds:.1f} s: results.csv, results.json, results.md, "
            f"{', '.join(p.name for p in plots)} in {run.path}")
    return records


COMMAND = Command(
    "evaluate", help="a frozen classifier on quantized (and JPEG) test images; one table",
    description="Evaluate colour quantization methods and JPEG through a frozen classifier; "
                "writes results.csv/.json/.md and plots into a run directory.",
    add_arguments=add_evaluate_arguments, run=evaluate)
