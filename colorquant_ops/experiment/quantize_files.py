"""``colorquant quantize``: image files to palette PNGs, a table and a side-by-side sheet.

For every input image, every ``--method`` (x ``--dither``) and every K, the image is quantized and
written as a real palette PNG (``codecs.encode_palette_png``: K palette entries at the smallest bit
depth for K, 1/2/4/8 bits), ``OUT/<image-stem>-<method>[-dither]-k<K>.png``. A table gives, per
file, the colours actually used, the PNG size in bytes and bits per pixel, and the PSNR against the
input; ``OUT/sheet.png`` shows the images as rows and the original plus every output as columns.

* Inputs: image files PIL can read, converted to RGB (an alpha channel is dropped, with a note;
  16-bit grey is scaled to 8 bits, 32-bit integer or float grey is refused);
  a directory stands for the image files directly inside it (sorted, by PIL-known extension,
  not recursive). Two inputs with the same file stem are an error (their outputs would collide).
* ``median_cut``, ``octree``, ``kmeans``: :class:`~colorquant_ops.transforms.ColorQuantize` on the
  uint8 image, at each ``--num-colors`` K; ``--dither`` (``on``, ``off``, ``both``; a bare
  ``--dither`` is ``on``) maps the image onto the method's palette with Floyd-Steinberg.
* ``colorcnn``: each ``--colorcnn`` checkpoint (from ``colorquant train`` / ``save_colorcnn``) runs
  its argmax path: the network sees the image normalized as in training (the checkpoint's
  ``input_normalization``, else ``--dataset``'s mean and std), as in ``colorquant evaluate``, and
  the palette is the mean of the image's own pixels. K is the checkpoint's ``num_colors``: a checkpoint whose K is
  not among an explicit ``--num-colors`` is an error, a K without a checkpoint just has no colorcnn
  output (a note says so), and without ``--num-colors`` the classical methods use the checkpoints'
  Ks. ColorCNN's own index map is its output, so ``--dither`` does not apply to it (as in evaluate).
* PSNR is computed on the PNG's pixels (uint8 palette) against the RGB input, both scaled to [0, 1].

Bad arguments, unreadable images and checkpoints raise ``ValueError`` / ``OSError`` before anything
is written (``colorquant`` turns them into one error line and exit status 2); only an image whose
data turns out corrupt while decoding stops the run where it is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import PIL.Image
import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from .. import codecs
from ..models.colorcnn import load_colorcnn_checkpoint
from ..normalization import DATASET_NORMALIZATION
from ..quantizers.reference import count_colors, psnr
from ..transforms import METHODS, ColorQuantize
from . import data
from .arguments import integer, load_one_line, single_process_device
from .commands import Command
from .sheets import fit_to_cell, labelled_sheet

__all__ = ["COMMAND", "add_quantize_arguments", "comparison_sheet", "image_files", "markdown_table", "output_name",
           "quantize_images"]

_DITHER_CHOICES = {"off": [False], "on": [True], "both": [False, True]}


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (any format PIL reads) or directories of them (not recursive)")
    p.add_argument("--method", "--methods", dest="methods", nargs="+", default=None, metavar="METHOD",
                   help=f"quantization methods, of {', '.join(METHODS)} (default: median_cut octree kmeans, "
                        "plus colorcnn when --colorcnn is given)")
    p.add_argument("--num-colors", nargs="+", type=integer, default=None, metavar="K",
                   help="numbers of colours K, each in 2..256 (default: the Ks of the --colorcnn checkpoints)")
    p.add_argument("--dither", nargs="?", const="on", default="off", metavar="on|off|both",
                   help="Floyd-Steinberg dithering for median_cut, octree, kmeans: on, off or both "
                        "(default: off; a bare --dither is on)")
    p.add_argument("--colorcnn", nargs="+", default=[], metavar="CKPT",
                   help="ColorCNN checkpoints (from train); each gives the colorcnn output at its num_colors")
    p.add_argument("--dataset", default=None,
                   help="normalization (mean/std) ColorCNN inputs get, for checkpoints that do not record "
                        f"their dataset; one of {', '.join(data.DATASETS)}")
    p.add_argument("--kmeans-iters", type=int, default=10, help="Lloyd iterations of kmeans (default: 10)")
    p.add_argument("-o", "--out-dir", default=None, help="output directory (default: runs/quantize-<timestamp>)")
    p.add_argument("--sheet", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUT/sheet.png (default: on)")
    p.add_argument("--cell-size", type=integer, default=256,
                   help="longest side of each picture on the sheet, in pixels; smaller images are enlarged "
                        "by an integer factor, nearest neighbour (default: 256)")
    p.add_argument("--device", default=None, help="device ColorCNN runs on: cpu or cuda (default: cpu)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bar over the images, when there are several (default: on)")


# --- inputs ---------------------------------------------------------------------------------


def image_files(paths) -> list[Path]:
    """The image files named by ``paths``: files as given, directories expanded to the files
    directly inside them whose extension PIL knows (sorted). Checks that each file opens as an
    image with at most 16 bits per channel and that no two share a stem."""
    extensions = {ext.lower() for ext in PIL.Image.registered_extensions()}
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                raise ValueError(f"{path}: directory holds no image files")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"image not found: {path}")
    for path in files:
        try:
            with PIL.Image.open(path) as image:
                mode = image.mode
        except PIL.UnidentifiedImageError:
            raise ValueError(f"{path}: not an image file PIL can read") from None
        if mode in ("I", "F"):
            raise ValueError(f"{path}: PIL mode {mode} (32-bit grey) has no defined 8-bit range; "
                             "convert the image to 8-bit RGB first")
    stems = {}
    for path in files:
        if path.stem in stems:
            raise ValueError(f"two inputs have the stem {path.stem!r} ({stems[path.stem]} and {path}); "
                             "their outputs would have the same names")
        stems[path.stem] = path
    return files


def _read_rgb(path: Path) -> tuple[Tensor, Optional[str]]:
    """uint8 ``[3,H,W]`` of an image file, and a note if its alpha channel was dropped."""
    try:
        with PIL.Image.open(path) as image:
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            if image.mode.startswith("I;16"):
                # PIL's convert("RGB") clips 16-bit grey at 255 instead of scaling it
                grey = np.asarray(image, dtype=np.float64) / 257
                rgb = PIL.Image.fromarray(np.round(grey).astype(np.uint8)).convert("RGB")
            else:
                rgb = image.convert("RGB")
    except OSError as exc:  # truncated or corrupt data shows only on decoding
        raise ValueError(f"{path}: cannot decode the image ({exc})") from None
    note = f"{path}: alpha channel dropped (converted to RGB)" if has_alpha else None
    return TF.pil_to_tensor(rgb), note


# --- quantizers -----------------------------------------------------------------------------


class _Job(NamedTuple):
    method: str
    dither: bool
    k: int
    quantizer: ColorQuantize

    @property
    def label(self) -> str:
        return f"{self.method}{' dither' if self.dither else ''} k{self.k}"

    def run(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """``(index_map [H,W] int64, palette [K,3] uint8)`` of a uint8 ``[3,H,W]`` image."""
        result = self.quantizer.quantize(image[None])
        return result.index_map[0], result.palette[0]


#: Columns of :func:`comparison_sheet`: (method, dither, label).
COMPARISON_COLUMNS = (("colorcnn", False, "ColorCNN"), ("median_cut", False, "median cut"),
                      ("median_cut", True, "median cut + dither"), ("octree", False, "octree"),
                      ("kmeans", False, "k-means"))


def comparison_sheet(images: Tensor, colorcnn_checkpoints: dict, ks, cell_size: int = 96, kmeans_iters: int = 10):
    """The seed paper's comparison figure: one row per image and K, columns original, ColorCNN, median
    cut, median cut + dither, octree, k-means (:data:`COMPARISON_COLUMNS`); captions give K and the
    colours used. ``images``: uint8 ``[N,3,H,W]``; ``colorcnn_checkpoints``: ``{K: path}`` (a K without
    one gets an empty ColorCNN cell). Returns the PIL image."""
    models = _load_colorcnns(list(colorcnn_checkpoints.values()), None, torch.device("cpu"))
    rows, captions = [], []
    for image in images:
        for k in ks:
            row, caps = [image], [f"K={k} ({np.log2(k):g} bit)"]
            for method, dither, _ in COMPARISON_COLUMNS:
                if method == "colorcnn":
                    if k not in models:
                        row.append(torch.full_like(image, 255))
                        caps.append("no checkpoint")
                        continue
                    job = _Job(method, False, k, ColorQuantize(k, "colorcnn", model=models[k][1]))
                else:
                    job = _Job(method, dither, k, ColorQuantize(k, method, dither=dither, kmeans_iters=kmeans_iters))
                index_map, palette = job.run(image)
                quantized = palette[index_map].permute(2, 0, 1)
                row.append(quantized)
                used = int(count_colors(quantized[None])[0])
                caps.append(f"{used} colour{'' if used == 1 else 's'}")
            rows.append(row)
            captions.append(caps)
    sheet, _ = labelled_sheet(rows, ["original"] + [label for *_, label in COMPARISON_COLUMNS], captions, cell_size)
    return sheet


def output_name(stem: str, method: str, dither: bool, k: int) -> str:
    """``<stem>-<method>[-dither]-k<K>.png``."""
    return f"{stem}-{method}{'-dither' if dither else ''}-k{k}.png"


def _load_colorcnns(paths, dataset: Optional[str], device: torch.device) -> dict:
    """``{K: (path, model)}`` for the ``--colorcnn`` checkpoints; each model takes [0, 1] images (a
    checkpoint that records no input normalization gets ``dataset``'s)."""
    models = {}
    for path in paths:
        model, extra = load_one_line(load_colorcnn_checkpoint, path)
        recorded = extra.get("dataset")
        if recorded is not None and dataset is not None and recorded != dataset:
            raise ValueError(f"--colorcnn {path} was trained on {recorded} images, not --dataset {dataset}")
        if model.input_normalization is None:
            if dataset is None:
                raise ValueError(f"--colorcnn {path} does not record the normalization it expects; "
                                 f"pass --dataset (one of {', '.join(data.DATASETS)})")
            model.input_normalization = DATASET_NORMALIZATION[dataset]
        if model.num_colors in models:
            raise ValueError(f"--colorcnn: two checkpoints quantize to {model.num_colors} colours "
                             f"({models[model.num_colors][0]} and {path})")
        models[model.num_colors] = (path, model.eval().requires_grad_(False).to(device))
    return models


def _jobs(args: argparse.Namespace, notes: list) -> list[_Job]:
    """The quantizers in output order (method, K, dither), after checking the arguments."""
    if args.dither not in _DITHER_CHOICES:
        raise ValueError(f"--dither: expected on, off or both, got {args.dither!r}")
    if args.dataset is not None and args.dataset not in data.DATASETS:
        raise ValueError(f"--dataset: expected one of {', '.join(data.DATASETS)}, got {args.dataset!r}")
    if args.kmeans_iters < 0:
        raise ValueError(f"--kmeans-iters must be >= 0, got {args.kmeans_iters}")
    if args.cell_size < 1:
        raise ValueError(f"--cell-size must be >= 1, got {args.cell_size}")
    methods = args.methods or ["median_cut", "octree", "kmeans"] + (["colorcnn"] if args.colorcnn else [])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--method: unknown method {unknown[0]!r}; use any of {', '.join(METHODS)}")
    methods = list(dict.fromkeys(methods))
    if args.num_colors is not None:
        bad = [k for k in args.num_colors if not 2 <= k <= 256]
        if bad:
            raise ValueError(f"--num-colors: K must be in 2..256, got {bad[0]}")
    if "colorcnn" in methods and not args.colorcnn:
        raise ValueError("--method colorcnn needs --colorcnn CKPT (a checkpoint from colorquant train)")
    if args.colorcnn and "colorcnn" not in methods:
        raise ValueError("--colorcnn is given but colorcnn is not among --method")

    colorcnns = _load_colorcnns(args.colorcnn, args.dataset, single_process_device(args.device or "cpu"))
    if args.num_colors is None:
        if not colorcnns:
            raise ValueError("--num-colors is required (no --colorcnn checkpoint to take K from)")
        ks = sorted(colorcnns)
    else:
        ks = list(dict.fromkeys(args.num_colors))
        for k, (path, _) in colorcnns.items():
            if k not in ks:
                raise ValueError(f"--colorcnn {path} quantizes to {k} colours, which is not among --num-colors "
                                 f"{' '.join(map(str, ks))}")
    dithers = _DITHER_CHOICES[args.dither]
    jobs = []
    for method in methods:
        for k in ks:
            if method != "colorcnn":
                jobs += [_Job(method, d, k, ColorQuantize(k, method, dither=d, kmeans_iters=args.kmeans_iters))
                         for d in dithers]
            elif k in colorcnns:
                jobs.append(_Job(method, False, k, ColorQuantize(k, "colorcnn", model=colorcnns[k][1])))
            else:
                notes.append(f"colorcnn has no K={k} output: no --colorcnn checkpoint quantizes to {k} colours")
    if "colorcnn" in methods and True in dithers:
        notes.append("--dither does not apply to colorcnn (its index map is the network's output): not dithered")
    return jobs


# --- table ----------------------------------------------------------------------------------


def markdown_table(records: list[dict]) -> str:
    lines = ["| image | method | dither | K | colours used | PNG bytes | bpp | PSNR (dB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['image']} | {r['method']} | {r['dither']} | {r['num_colors']} | {r['colors']} | "
                     f"{r['png_bytes']} | {r['bpp']:.3f} | {r['psnr']:.2f} |")
    return "\n".join(lines)


# --- command --------------------------------------------------------------------------------


@torch.no_grad()
def quantize_images(args: argparse.Namespace) -> list[dict]:
    """Run ``colorquant quantize`` (see the module docstring); returns the table's rows as dicts."""
    notes: list[str] = []
    jobs = _jobs(args, notes)
    files = image_files(args.images)
    out = Path(args.out_dir or Path("runs") / f"quantize-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    records, sheet_rows, captions = [], [], []
    for path in tqdm(files, desc="quantize", unit="image", disable=not args.progress or len(files) < 2,
                     dynamic_ncols=True):
        image, note = _read_rgb(path)
        if note:
            tqdm.write(f"note: {note}", file=sys.stderr)
        H, W = image.shape[-2:]
        original = image.float() / 255
        row, row_captions = [fit_to_cell(image, args.cell_size)], [f"{path.name}\n{W}x{H}"]
        for job in jobs:
            index_map, palette = job.run(image)
            png = codecs.encode_palette_png(index_map, palette)
            name = output_name(path.stem, job.method, job.dither, job.k)
            (out / name).write_bytes(png)
            quantized = palette[index_map].permute(2, 0, 1)  # the PNG's pixels, [3,H,W] uint8
            record = {
                "image": str(path), "method": job.method, "dither": "on" if job.dither else "off",
                "num_colors": job.k, "colors": int(count_colors(quantized[None])[0]), "png_bytes": len(png),
                "bpp": float(codecs.bits_per_pixel(len(png), H, W)), "psnr": psnr(quantized.float() / 255, original),
                "file": str(out / name),
            }
            records.append(record)
            row.append(fit_to_cell(quantized, args.cell_size))
            row_captions.append(f"{record['colors']} colours, {record['bpp']:.2f} bpp\n{record['psnr']:.1f} dB PSNR")
        sheet_rows.append(row)
        captions.append(row_captions)

    print(markdown_table(records))
    print(f"{len(records)} palette PNGs in {out}")
    if args.sheet:
        sheet, _ = labelled_sheet(sheet_rows, ["original"] + [job.label for job in jobs], captions,
                                  cell_size=args.cell_size)
        sheet.save(out / "sheet.png")
        print(f"sheet (rows: images; columns: original, {', '.join(job.label for job in jobs)}): {out / 'sheet.png'}")
    return records


COMMAND = Command(
    "quantize", help="image files to palette PNGs; a table and a side-by-side sheet",
    description="Quantize image files with each method and K into palette PNGs "
                "(OUT/<stem>-<method>[-dither]-k<K>.png), print colours used, PNG bytes, "
                "bits per pixel and PSNR, and draw OUT/sheet.png.",
    add_arguments=add_quantize_arguments, run=quantize_images)
