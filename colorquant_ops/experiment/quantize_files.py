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
* ``colorcnn+``: the ``--colorcnn-plus`` checkpoint (one :class:`~colorquant_ops.models.ColorCNNPlus`
  for every K) at each ``--num-colors`` K, likewise not dithered.
* PSNR is computed on the PNG's pixels (uint8 palette) against the RGB input, both scaled to [0, 1].

Bad arguments and unreadable checkpoints raise ``ValueError`` / ``OSError`` before anything is
written (``colorquant`` turns them into one error line and exit status 2). Inputs are untrusted: an
input that is not a regular file (a FIFO, a device), not an image PIL reads, larger than
``--max-pixels`` (decompression bombs: the size is read from the header, before decoding), 32-bit
grey, or whose data turn out corrupt while decoding is skipped with a line naming it and the cause;
the other inputs are processed, and the command then ends with exit status 2. Outputs are written
atomically and replace a symbolic link in ``-o DIR`` instead of writing through it; an output that
would replace one of the inputs is an error before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import stat
import sys
import warnings
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
from .._io import atomic_write_bytes
from ..models.colorcnn_plus import load_colorcnn_plus
from ..quantizers.reference import count_colors
from ..transforms import METHODS, ColorQuantize
from . import data
from .arguments import integer, load_colorcnns, load_one_line, single_process_device
from .commands import Command
from .sheets import fit_to_cell, labelled_sheet

__all__ = ["COMMAND", "add_quantize_arguments", "comparison_sheet", "image_files", "markdown_table", "output_name",
           "quantize_images"]

_DITHER_CHOICES = {"off": [False], "on": [True], "both": [False, True]}

#: Default ``--max-pixels``: the largest input image, in pixels (width x height).
DEFAULT_MAX_PIXELS = 40_000_000
#: Largest ``--cell-size``.
MAX_CELL_SIZE = 2048


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
    p.add_argument("--colorcnn-plus", default=None, metavar="CKPT",
                   help="a ColorCNN+ checkpoint (from train --model colorcnn+): the colorcnn+ output at every K")
    p.add_argument("--dataset", default=None,
                   help="normalization (mean/std) ColorCNN inputs get, for checkpoints that do not record "
                        f"their dataset; one of {', '.join(data.DATASETS)}")
    p.add_argument("--kmeans-iters", type=int, default=10, help="Lloyd iterations of kmeans (default: 10)")
    p.add_argument("-o", "--out-dir", default=None, help="output directory (default: runs/quantize-<timestamp>)")
    p.add_argument("--sheet", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUT/sheet.png (default: on)")
    p.add_argument("--cell-size", type=integer, default=256,
                   help="longest side of each picture on the sheet, in pixels; smaller images are enlarged "
                        f"by an integer factor, nearest neighbour (default: 256, at most {MAX_CELL_SIZE})")
    p.add_argument("--max-pixels", type=integer, default=DEFAULT_MAX_PIXELS,
                   help="skip input images with more pixels (width x height, read from the file's header "
                        f"before decoding; default: {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--device", default=None, help="device ColorCNN runs on: cpu or cuda (default: cpu)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bar over the images, when there are several (default: on)")


# --- inputs ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: int):
    """PIL's decompression-bomb limit at ``max_pixels`` for the block (its warning silenced: the
    caller checks the size itself; PIL raises DecompressionBombError above twice the limit)."""
    previous = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            yield
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = previous


def _check_image_file(path: Path, max_pixels: int) -> Optional[str]:
    """Why ``path`` cannot be quantized (None: it can), from its file type and image header."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        return f"not a regular file ({kind})" if kind != "not a regular file" else kind
    try:
        with _pil_pixel_limit(max_pixels), PIL.Image.open(path) as image:
            mode, (w, h) = image.mode, image.size
    except PIL.UnidentifiedImageError:
        return "not an image file PIL can read"
    except PIL.Image.DecompressionBombError:
        return f"more than --max-pixels {max_pixels:,} pixels (a decompression bomb?)"
    except (OSError, ValueError, SyntaxError) as exc:  # e.g. "Truncated File Read" in the header
        return f"cannot read the image header ({exc})"
    if w * h > max_pixels:
        return f"{w}x{h} = {w * h:,} pixels, more than --max-pixels {max_pixels:,}"
    if mode in ("I", "F"):
        return (f"PIL mode {mode} (32-bit grey) has no defined 8-bit range; "
                "convert the image to 8-bit RGB first")
    return None


def image_files(paths, max_pixels: int = DEFAULT_MAX_PIXELS, skipped: Optional[list] = None) -> list[Path]:
    """The image files named by ``paths``: files as given, directories expanded to the regular files
    directly inside them whose extension PIL knows (sorted). Checks that each file is a regular
    file that opens as an image of at most ``max_pixels`` pixels with at most 16 bits per channel,
    and that no two share a stem. A file that fails a check raises ValueError, or with a
    ``skipped`` list is left out and ``"PATH: why"`` appended to the list."""
    extensions = {ext.lower() for ext in PIL.Image.registered_extensions()}
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                raise ValueError(f"{path}: directory holds no image files")
            files += found
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            raise FileNotFoundError(f"image not found: {path}")
    good = []
    for path in files:
        problem = _check_image_file(path, max_pixels)
        if problem is None:
            good.append(path)
        elif skipped is None:
            raise ValueError(f"{path}: {problem}")
        else:
            skipped.append(f"{path}: {problem}")
    files = good
    stems = {}
    for path in files:
        if path.stem in stems:
            raise ValueError(f"two inputs have the stem {path.stem!r} ({stems[path.stem]} and {path}); "
                             "their outputs would have the same names")
        stems[path.stem] = path
    return files


def _read_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Tensor, Optional[str]]:
    """uint8 ``[3,H,W]`` of an image file, and a note if its alpha channel was dropped."""
    try:
        with _pil_pixel_limit(max_pixels), PIL.Image.open(path) as image:
            if image.size[0] * image.size[1] > max_pixels:  # the file changed since it was checked
                raise ValueError(f"{path}: more than --max-pixels {max_pixels:,} pixels")
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            if image.mode.startswith("I;16"):
                # PIL's convert("RGB") clips 16-bit grey at 255 instead of scaling it
                grey = np.asarray(image, dtype=np.float64) / 257
                rgb = PIL.Image.fromarray(np.round(grey).astype(np.uint8)).convert("RGB")
            else:
                rgb = image.convert("RGB")
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as exc:  # corrupt data shows on decoding
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


def comparison_sheet(images: Tensor, colorcnn_checkpoints: dict, ks, cell_size: int = 96, kmeans_iters: int = 10,
                     plus_checkpoint=None):
    """The seed paper's comparison figure: one row per image and K, columns original, ColorCNN, median
    cut, median cut + dither, octree, k-means (:data:`COMPARISON_COLUMNS`), and with ``plus_checkpoint``
    (a ColorCNN+ checkpoint) a ColorCNN+ column after ColorCNN's; captions give K and the colours used.
    ``images``: uint8 ``[N,3,H,W]``; ``colorcnn_checkpoints``: ``{K: path}`` (a K without one gets an
    empty ColorCNN cell). Returns the PIL image."""
    models = load_colorcnns(list(colorcnn_checkpoints.values()), None, torch.device("cpu"))
    plus = load_colorcnn_plus(plus_checkpoint).eval() if plus_checkpoint is not None else None
    columns = list(COMPARISON_COLUMNS)
    if plus is not None:
        columns.insert(1, ("colorcnn+", False, "ColorCNN+"))
    rows, captions = [], []
    for image in images:
        for k in ks:
            row, caps = [image], [f"K={k} ({np.log2(k):g} bit)"]
            for method, dither, _ in columns:
                if method == "colorcnn+":
                    job = _Job(method, False, k, ColorQuantize(k, "colorcnn+", model=plus))
                elif method == "colorcnn":
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
    sheet, _ = labelled_sheet(rows, ["original"] + [label for *_, label in columns], captions, cell_size)
    return sheet


def output_name(stem: str, method: str, dither: bool, k: int) -> str:
    """``<stem>-<method>[-dither]-k<K>.png``."""
    return f"{stem}-{method}{'-dither' if dither else ''}-k{k}.png"


def _jobs(args: argparse.Namespace, notes: list) -> list[_Job]:
    """The quantizers in output order (method, K, dither), after checking the arguments."""
    if args.dither not in _DITHER_CHOICES:
        raise ValueError(f"--dither: expected on, off or both, got {args.dither!r}")
    if args.dataset is not None and args.dataset not in data.DATASETS:
        raise ValueError(f"--dataset: expected one of {', '.join(data.DATASETS)}, got {args.dataset!r}")
    if args.kmeans_iters < 0:
        raise ValueError(f"--kmeans-iters must be >= 0, got {args.kmeans_iters}")
    if not 1 <= args.cell_size <= MAX_CELL_SIZE:
        raise ValueError(f"--cell-size must be in 1..{MAX_CELL_SIZE}, got {args.cell_size}")
    if args.max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    methods = args.methods or (["median_cut", "octree", "kmeans"] + (["colorcnn"] if args.colorcnn else [])
                               + (["colorcnn+"] if args.colorcnn_plus else []))
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
    if "colorcnn+" in methods and not args.colorcnn_plus:
        raise ValueError("--method colorcnn+ needs --colorcnn-plus CKPT (a checkpoint from colorquant train "
                         "--model colorcnn+)")
    if args.colorcnn_plus and "colorcnn+" not in methods:
        raise ValueError("--colorcnn-plus is given but colorcnn+ is not among --method")
    plus = load_one_line(load_colorcnn_plus, args.colorcnn_plus).eval() if args.colorcnn_plus else None

    colorcnns = load_colorcnns(args.colorcnn, args.dataset, single_process_device(args.device or "cpu"))
    if args.num_colors is None:
        if not colorcnns:
            raise ValueError("--num-colors is required (no --colorcnn checkpoint to take K from; "
                             "a --colorcnn-plus model serves any K)")
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
            if method == "colorcnn+":
                if k > plus.max_colors:
                    raise ValueError(f"--colorcnn-plus {args.colorcnn_plus} serves up to {plus.max_colors} "
                                     f"colours, not {k}")
                jobs.append(_Job(method, False, k, ColorQuantize(k, "colorcnn+", model=plus)))
            elif method != "colorcnn":
                jobs += [_Job(method, d, k, ColorQuantize(k, method, dither=d, kmeans_iters=args.kmeans_iters))
                         for d in dithers]
            elif k in colorcnns:
                jobs.append(_Job(method, False, k, ColorQuantize(k, "colorcnn", model=colorcnns[k][1])))
            else:
                notes.append(f"colorcnn has no K={k} output: no --colorcnn checkpoint quantizes to {k} colours")
    for learned in ("colorcnn", "colorcnn+"):
        if learned in methods and True in dithers:
            notes.append(f"--dither does not apply to {learned} (its index map is the network's output): "
                         "not dithered")
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


def _psnr_uint8(a: Tensor, b: Tensor, chunk: int = 1 << 22) -> float:
    """:func:`~colorquant_ops.quantizers.reference.psnr` of two uint8 images scaled to [0, 1], summed
    in chunks of exact integers (a few bytes per pixel of a chunk, whatever the image size)."""
    a, b = a.reshape(-1), b.reshape(-1)
    sse = 0
    for start in range(0, a.numel(), chunk):
        d = a[start:start + chunk].to(torch.int32) - b[start:start + chunk].to(torch.int32)
        sse += int((d * d).sum())
    mse = max(sse / (a.numel() * 255**2), 1e-12)
    return float(10 * np.log10(1 / mse))


def _input_paths(paths) -> set:
    """Every name the inputs go by (as given, with the directory resolved, and the link target
    resolved); a directory input stands for every entry in it."""
    named = []
    for path in map(Path, paths):
        named.append(path)
        if path.is_dir():
            named += list(path.iterdir())
    keys = set()
    for path in named:
        keys.add(os.path.join(os.path.realpath(path.parent), path.name))
        keys.add(os.path.realpath(path))
    return keys


def _check_outputs_spare_inputs(args, files, jobs, out: Path) -> None:
    inputs = _input_paths(args.images)
    base = os.path.realpath(out)
    names = [output_name(path.stem, job.method, job.dither, job.k) for path in files for job in jobs]
    if args.sheet:
        names.append("sheet.png")
    for name in names:
        target = os.path.join(base, name)
        if target in inputs:
            raise ValueError(f"{out / name} would overwrite an input image; pick another -o/--out-dir")


def _skipped_message(skipped: list, processed: int) -> str:
    if not processed and len(skipped) == 1:
        return skipped[0]
    return f"{len(skipped)} of {len(skipped) + processed} inputs skipped: {'; '.join(skipped)}"


@torch.no_grad()
def quantize_images(args: argparse.Namespace) -> list[dict]:
    """Run ``colorquant quantize`` (see the module docstring); returns the table's rows as dicts.

    Raises:
        ValueError: bad arguments (before anything is written), or inputs skipped (after the
            others were processed; the message names each with its cause).
    """
    notes: list[str] = []
    jobs = _jobs(args, notes)
    max_pixels = getattr(args, "max_pixels", DEFAULT_MAX_PIXELS)
    skipped: list[str] = []
    files = image_files(args.images, max_pixels, skipped)
    if not files:
        raise ValueError(_skipped_message(skipped, 0))
    out = Path(args.out_dir or Path("runs") / f"quantize-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_outputs_spare_inputs(args, files, jobs, out)
    out.mkdir(parents=True, exist_ok=True)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    records, sheet_rows, captions = [], [], []
    done = 0
    for path in tqdm(files, desc="quantize", unit="image", disable=not args.progress or len(files) < 2,
                     dynamic_ncols=True):
        try:
            image, note = _read_rgb(path, max_pixels)
        except ValueError as exc:  # corrupt data shows only on decoding: skip this image
            skipped.append(str(exc))
            continue
        done += 1
        if note:
            tqdm.write(f"note: {note}", file=sys.stderr)
        H, W = image.shape[-2:]
        row, row_captions = [fit_to_cell(image, args.cell_size) if args.sheet else None], [f"{path.name}\n{W}x{H}"]
        for job in jobs:
            index_map, palette = job.run(image)
            png = codecs.encode_palette_png(index_map, palette)
            name = output_name(path.stem, job.method, job.dither, job.k)
            atomic_write_bytes(out / name, png)  # replaces a link at out/name, never writes through it
            quantized = palette[index_map].permute(2, 0, 1)  # the PNG's pixels, [3,H,W] uint8
            del index_map
            record = {
                "image": str(path), "method": job.method, "dither": "on" if job.dither else "off",
                "num_colors": job.k, "colors": int(count_colors(quantized[None])[0]), "png_bytes": len(png),
                "bpp": float(codecs.bits_per_pixel(len(png), H, W)), "psnr": _psnr_uint8(quantized, image),
                "file": str(out / name),
            }
            records.append(record)
            if args.sheet:
                row.append(fit_to_cell(quantized, args.cell_size))
            del quantized
            row_captions.append(f"{record['colors']} colours, {record['bpp']:.2f} bpp\n{record['psnr']:.1f} dB PSNR")
        del image
        sheet_rows.append(row)
        captions.append(row_captions)

    print(markdown_table(records))
    print(f"{len(records)} palette PNGs in {out}")
    if args.sheet and sheet_rows:
        sheet, _ = labelled_sheet(sheet_rows, ["original"] + [job.label for job in jobs], captions,
                                  cell_size=args.cell_size)
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        atomic_write_bytes(out / "sheet.png", buffer.getvalue())
        print(f"sheet (rows: images; columns: original, {', '.join(job.label for job in jobs)}): {out / 'sheet.png'}")
    if skipped:
        raise ValueError(_skipped_message(skipped, done))
    return records


COMMAND = Command(
    "quantize", help="image files to palette PNGs; a table and a side-by-side sheet",
    description="Quantize image files with each method and K into palette PNGs "
                "(OUT/<stem>-<method>[-dither]-k<K>.png), print colours used, PNG bytes, "
                "bits per pixel and PSNR, and draw OUT/sheet.png.",
    add_arguments=add_quantize_arguments, run=quantize_images)
