"""What the classifier looks at: Grad-CAM of the frozen classifier on original and quantized images.

The seed paper (Hou et al., CVPR 2020, Figures 1 and 3) shows class activation maps of the frozen
classifier on an image and on its few-colour versions: ColorCNN keeps the structure the classifier
attends to, the traditional quantizers often lose it. This module has

* :func:`grad_cam` -- Grad-CAM (Selvaraju et al., ICCV 2017) of any CNN classifier: the gradients
  of the target class score (the logit) w.r.t. a convolutional layer's activations ``A`` are
  averaged over space, one weight ``alpha_k`` per channel; the map is
  ``ReLU(sum_k alpha_k A_k)``, upsampled bilinearly to the image size and divided by its maximum
  per image (so it lies in ``[0, 1]``; an all-zero map stays zero). It also returns the softmax
  probability of the target class and the predicted class;
* ``colorquant gradcam`` (:data:`COMMAND`) -- the picture sheet: one row per image and K, columns
  the original and each method's quantized image, each cell the image with its Grad-CAM blended
  50/50 as a jet heat map, captioned with the classifier's probability of the true class.

The command, in order:

* Images are read as RGB (as ``colorquant quantize`` reads them; a directory stands for the image
  files directly inside it). The classifier sees images of the size its checkpoint records
  (``image_size``, 32 for the bundled airbench93): an image of another size is resized (shorter
  side to that size, bilinear with antialiasing, then centre-cropped to a square), with a note on
  stderr; ``--no-resize`` makes that an error instead.
* The true class is the name of the image's folder when it is one of the classifier's classes
  (ImageFolder layout, e.g. ``colorquant_ops/assets/cifar10-sample/test/bird/0047.jpg``); otherwise
  the classifier's prediction on the original image stands in for it (the caption says "pred.").
  Class names come from the dataset the checkpoint records (CIFAR-10, STL-10); others are numbers.
* Each method quantizes the ``[0, 1]`` images with :class:`~colorquant_ops.transforms.ColorQuantize`
  (as ``colorquant evaluate`` does); ColorCNN runs each ``--colorcnn`` network at its own K (a
  bundled name such as ``cifar10-k4`` or a checkpoint path), ColorCNN+ its one ``--colorcnn-plus``
  network at every K (default: the bundled ``cifar10-plus``). The classifier then sees them
  normalized as in its training: the checkpoint's ``input_normalization``, else its ``dataset``'s,
  else ``--dataset``'s.
* Grad-CAM targets the true class in every column, so the maps compare where the classifier finds
  evidence for the same class. The default layer is the network's last ``Conv2d`` (for the bundled
  airbench93 ``groups.2.conv2``, a 3x3 map before its BatchNorm and GELU; for the CIFAR AlexNet
  ``features.10``, 4x4), ``--layer NAME`` any module by its ``named_modules`` name (e.g.
  ``groups.1.conv2``, airbench93's 7x7 map).
* Writes ``OUT/gradcam-sheet.png`` and ``OUT/gradcam.md`` (per image, K and method: the true class's
  probability and the prediction) and prints the table.

Bad arguments, unreadable images and checkpoints raise ``ValueError`` / ``OSError`` before anything
is written (``colorquant`` prints one error line and exits with status 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from ..models.classifiers import load_classifier
from ..models.pretrained import (PRETRAINED_CLASSIFIERS, PRETRAINED_COLORCNN, PRETRAINED_COLORCNN_PLUS,
                                 pretrained_path)
from ..normalization import NORMALIZATION_BEFORE_RECORDING
from ..quantizers.reference import count_colors
from ..transforms import METHODS, ColorQuantize
from . import data
from .arguments import integer, load_colorcnn_plus_for, load_colorcnns, load_one_line
from .commands import Command
from .quantize_files import _read_rgb, image_files
from .sheets import fit_to_cell, labelled_sheet

__all__ = ["COMMAND", "GradCamResult", "default_layer", "grad_cam", "overlay_heatmap", "run_gradcam"]


# --- Grad-CAM -------------------------------------------------------------------------------


class GradCamResult(NamedTuple):
    """What :func:`grad_cam` returns for a batch of B images."""

    cam: Tensor  #: ``[B, H, W]`` float in ``[0, 1]``, the class activation map at the output size
    probability: Tensor  #: ``[B]``: softmax probability of each image's target class
    prediction: Tensor  #: ``[B]`` int64: the classifier's predicted class (argmax of the logits)


def default_layer(model: nn.Module) -> nn.Module:
    """The last ``nn.Conv2d`` of ``model`` in ``model.modules()`` order (registration order, which
    is the order of the forward pass for ``Sequential`` networks and torchvision's models)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer; pass layer= explicitly")
    return convs[-1]


def _resolve_layer(model: nn.Module, layer) -> nn.Module:
    if layer is None:
        return default_layer(model)
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules or layer == "":
            convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
            raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__}; "
                             f"its Conv2d layers: {', '.join(convs) or 'none'}")
        return modules[layer]
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError("layer is not a submodule of the classifier")
        return layer
    raise TypeError(f"layer must be None, a module name or an nn.Module, got {type(layer).__name__}")


def grad_cam(classifier: nn.Module, images: Tensor, target_classes=None,
             layer: Union[None, str, nn.Module] = None, size: Optional[Sequence[int]] = None) -> GradCamResult:
    """Grad-CAM of ``classifier`` at ``layer`` for each image's target class.

    Args:
        classifier: a CNN returning logits ``[B, num_classes]``. It runs in eval mode; every module's
            ``training`` flag and every parameter's ``requires_grad`` is as before afterwards, and no
            parameter's ``.grad`` is touched (the gradient is taken w.r.t. the activations only, with
            ``torch.autograd.grad``), so a frozen classifier works as it is.
        images: ``[B, C, H, W]`` float, normalized as the classifier expects.
        target_classes: an int (all images), a sequence or ``[B]`` tensor of class indices, or
            ``None`` for each image's predicted class.
        layer: the layer whose output activations are used: a module of ``classifier``, its name in
            ``classifier.named_modules()``, or ``None`` for :func:`default_layer` (the last Conv2d).
            The activations are the layer's output as it returned it (a copy is passed on, so that
            an in-place operation after the layer, e.g. ``ReLU(inplace=True)``, changes neither
            them nor their gradient).
        size: ``(h, w)`` of the maps (default: the images' ``(H, W)``).

    Returns:
        :class:`GradCamResult`: ``cam [B, h, w]`` in ``[0, 1]`` (``ReLU(sum_k alpha_k A_k)`` with
        ``alpha_k`` the spatial mean of ``d score / d A_k``, upsampled bilinearly, divided by its
        per-image maximum; an all-zero map stays zero), the target classes' softmax probabilities and
        the predicted classes. The hooks are removed also when the forward pass raises.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        what = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images)
        raise ValueError(f"images must be a float [B, C, H, W] tensor, got {what}")
    module = _resolve_layer(classifier, layer)
    batch = images.shape[0]
    size = tuple(images.shape[-2:]) if size is None else tuple(int(s) for s in size)
    captured = []

    def hook(_module, _inputs, output):
        if not isinstance(output, Tensor):
            raise TypeError(f"Grad-CAM layer {type(_module).__name__} returned {type(output).__name__}, not a tensor")
        captured.append(output)
        return output.clone()  # the rest of the network works on a copy: `output` stays as it was

    modes = {m: m.training for m in classifier.modules()}
    handle = module.register_forward_hook(hook)
    try:
        classifier.eval()
        with torch.enable_grad():
            # the graph reaches the activations through the input even when every parameter is frozen
            x = images.detach().requires_grad_(True)
            logits = classifier(x)
            if len(captured) != 1:
                raise ValueError(f"the Grad-CAM layer ran {len(captured)} times in one forward pass; "
                                 "pick a layer that runs once")
            activations = captured[0]
            if activations.dim() != 4 or activations.shape[0] != batch:
                raise ValueError(f"the Grad-CAM layer's output must be [B, C, h, w], got {tuple(activations.shape)}")
            if target_classes is None:
                targets = logits.argmax(1)
            else:
                targets = torch.as_tensor(target_classes, dtype=torch.int64, device=logits.device).reshape(-1)
                targets = targets.expand(batch) if targets.numel() == 1 else targets
                if targets.shape != (batch,):
                    raise ValueError(f"target_classes: expected one class per image ({batch}), got {targets.numel()}")
                if bool(((targets < 0) | (targets >= logits.shape[1])).any()):
                    raise ValueError(f"target_classes must be in 0..{logits.shape[1] - 1}")
            # each image's score depends on its own activations only (eval mode), so the gradient of
            # the sum gives every image the gradient of its own score
            score = logits.gather(1, targets[:, None]).sum()
            (gradients,) = torch.autograd.grad(score, activations)
    finally:
        handle.remove()
        for m, mode in modes.items():
            m.training = mode
    with torch.no_grad():
        weights = gradients.mean(dim=(2, 3), keepdim=True)  # alpha_k: global average of the gradients
        cam = torch.relu((weights * activations.detach()).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(1).clamp_min(torch.finfo(cam.dtype).tiny)
        cam = (cam / peak[:, None, None]).clamp_(0, 1)
        probs = logits.detach().softmax(1)
        probability = probs.gather(1, targets[:, None])[:, 0]
    return GradCamResult(cam, probability, logits.detach().argmax(1))


def overlay_heatmap(image: PIL.Image.Image, cam: Tensor, alpha: float = 0.5, colormap: str = "jet") -> PIL.Image.Image:
    """``image`` (RGB) blended with ``cam`` (``[h, w]`` in ``[0, 1]``, the image's size) drawn in a
    matplotlib colormap: ``(1 - alpha) * image + alpha * colormap(cam)``."""
    import matplotlib

    heat = matplotlib.colormaps[colormap](cam.detach().cpu().float().numpy())[..., :3]  # [h, w, 3] in [0, 1]
    base = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    if base.shape[:2] != heat.shape[:2]:
        raise ValueError(f"cam of size {heat.shape[:2]} does not fit the image's {base.shape[:2]}")
    blended = (1 - alpha) * base + alpha * heat
    return PIL.Image.fromarray(np.round(blended * 255).astype(np.uint8))


# --- command --------------------------------------------------------------------------------

_DEFAULT_COLORCNN = ["cifar10-k2", "cifar10-k4", "cifar10-k8"]
_DEFAULT_COLORCNN_PLUS = "cifar10-plus"
_DEFAULT_METHODS = ["colorcnn", "colorcnn+", "median_cut", "octree", "pil_kmeans", "kmeans"]
_LABELS = {"colorcnn": "ColorCNN", "colorcnn+": "ColorCNN+", "median_cut": "median cut", "octree": "octree",
           "pil_kmeans": "k-means (PIL)", "kmeans": "k-means++"}
_CLASS_NAMES = {"cifar10": data.CIFAR10_CLASSES, "stl10": data.STL10_CLASSES}


def add_gradcam_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files or directories of them (not recursive); the folder name gives the true "
                        "class (ImageFolder layout), e.g. colorquant_ops/assets/cifar10-sample/test/bird/0047.jpg")
    p.add_argument("--classifier", default="cifar10-airbench93", metavar="CKPT|NAME",
                   help="the frozen classifier: a checkpoint (from train-classifier) or a bundled name "
                        f"({', '.join(sorted(PRETRAINED_CLASSIFIERS))}; the default)")
    p.add_argument("--colorcnn", nargs="+", default=None, metavar="CKPT|NAME",
                   help="ColorCNN checkpoints or bundled names, one per K (default: "
                        f"{' '.join(_DEFAULT_COLORCNN)})")
    p.add_argument("--colorcnn-plus", default=None, metavar="CKPT|NAME",
                   help="the ColorCNN+ network of the colorcnn+ column (one network for every K): a checkpoint "
                        f"(from train --model colorcnn+) or a bundled name (default: {_DEFAULT_COLORCNN_PLUS})")
    p.add_argument("--num-colors", nargs="+", type=integer, default=None, metavar="K",
                   help="numbers of colours K, each in 2..256 (default: the Ks of the ColorCNN networks)")
    p.add_argument("--method", "--methods", dest="methods", nargs="+", default=None, metavar="METHOD",
                   help=f"columns after the original, of {', '.join(METHODS)} "
                        f"(default: {' '.join(_DEFAULT_METHODS)})")
    p.add_argument("--layer", default=None, metavar="NAME",
                   help="the classifier's module whose activations Grad-CAM uses, by its named_modules name "
                        "(default: the last Conv2d)")
    p.add_argument("--dataset", default=None,
                   help="normalization (mean/std) for checkpoints that record neither theirs nor their "
                        f"dataset; one of {', '.join(data.DATASETS)}")
    p.add_argument("--resize", action=argparse.BooleanOptionalAction, default=True,
                   help="resize images of another size than the classifier's (shorter side, then a centre "
                        "crop; a note says so); --no-resize makes them an error (default: resize)")
    p.add_argument("--kmeans-iters", type=int, default=10, help="Lloyd iterations of kmeans (default: 10)")
    p.add_argument("--cell-size", type=integer, default=96,
                   help="side of each picture on the sheet, in pixels (default: 96)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the heat map in the blend (default: 0.5)")
    p.add_argument("-o", "--out-dir", default=None, help="output directory (default: runs/gradcam-<timestamp>)")


def _resolve(name_or_path: str, table: dict, kind: str, flag: Optional[str] = None) -> Path:
    if name_or_path in table:
        return pretrained_path(name_or_path, kind)
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"--{flag or kind}: {name_or_path} is neither a file nor a bundled name "
                                f"({', '.join(sorted(table))})")
    return path


def _classifier_setup(path: Path, dataset: Optional[str]):
    """``(model, (mean, std), dataset name or None, image_size)`` of a classifier checkpoint."""
    model = load_one_line(load_classifier, path).eval().requires_grad_(False)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # readable: load_classifier read it
    recorded = ckpt.get("dataset")
    if ckpt.get("input_normalization") is None and recorded not in NORMALIZATION_BEFORE_RECORDING and dataset is None:
        raise ValueError(f"--classifier {path} records neither its input normalization nor its dataset; "
                         f"pass --dataset (one of {', '.join(data.DATASETS)})")
    # what the checkpoint records, else its dataset's, else --dataset's
    normalization = data.classifier_normalization(path, dataset or recorded)
    return model, normalization, recorded or dataset, int(ckpt["image_size"])


def _check(args: argparse.Namespace) -> list[str]:
    if args.dataset is not None and args.dataset not in data.DATASETS:
        raise ValueError(f"--dataset: expected one of {', '.join(data.DATASETS)}, got {args.dataset!r}")
    if args.kmeans_iters < 0:
        raise ValueError(f"--kmeans-iters must be >= 0, got {args.kmeans_iters}")
    if args.cell_size < 8:
        raise ValueError(f"--cell-size must be >= 8, got {args.cell_size}")
    if not 0 <= args.alpha <= 1:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    methods = list(dict.fromkeys(args.methods or _DEFAULT_METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--method: unknown method {unknown[0]!r}; use any of {', '.join(METHODS)}")
    if args.colorcnn is not None and "colorcnn" not in methods:
        raise ValueError("--colorcnn is given but colorcnn is not among --method")
    if args.colorcnn_plus is not None and "colorcnn+" not in methods:
        raise ValueError("--colorcnn-plus is given but colorcnn+ is not among --method")
    if args.num_colors is not None:
        bad = [k for k in args.num_colors if not 2 <= k <= 256]
        if bad:
            raise ValueError(f"--num-colors: K must be in 2..256, got {bad[0]}")
    return methods


def _load_images(files, image_size: int, resize: bool, notes: list) -> Tensor:
    images = []
    for path in files:
        image, note = _read_rgb(path)
        if note:
            notes.append(note)
        h, w = image.shape[-2:]
        if (h, w) != (image_size, image_size):
            if not resize:
                raise ValueError(f"{path}: {w}x{h} pixels, the classifier takes {image_size}x{image_size} "
                                 "(drop --no-resize to resize it)")
            image = TF.center_crop(TF.resize(image, image_size, antialias=True), [image_size, image_size])
            notes.append(f"{path}: {w}x{h} resized to {image_size}x{image_size} (shorter side, centre crop)")
        images.append(image)
    return torch.stack(images)


def _caption(prob: float, pred: int, target: int, names, known: bool) -> str:
    name = names(target)
    first = f"p({name})={prob:.2f}" if known else f"pred. {name} {prob:.2f}"
    return first if pred == target else f"{first}\n-> {names(pred)}"


def run_gradcam(args: argparse.Namespace) -> dict:
    """Run ``colorquant gradcam`` (see the module docstring). Returns ``{"sheet": path, "table": path,
    "rows": number of sheet rows, "columns": column labels, "boxes": each cell's box on the sheet,
    "records": [...]}``."""
    methods = _check(args)
    notes: list[str] = []
    classifier_path = _resolve(args.classifier, PRETRAINED_CLASSIFIERS, "classifier")
    classifier, (mean, std), dataset, image_size = _classifier_setup(classifier_path, args.dataset)
    probe = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad():
        num_classes = classifier(probe).shape[1]
    grad_cam(classifier, probe, 0, layer=args.layer)  # a bad --layer is an argument error, before anything runs
    class_names = _CLASS_NAMES.get(dataset) if dataset else None
    if class_names is not None and len(class_names) != num_classes:
        class_names = None

    colorcnns = {}
    if "colorcnn" in methods:
        sources = args.colorcnn if args.colorcnn is not None else _DEFAULT_COLORCNN
        paths = [_resolve(s, PRETRAINED_COLORCNN, "colorcnn") for s in sources]
        colorcnns = load_colorcnns(paths, args.dataset, torch.device("cpu"))
    if args.num_colors is not None:
        ks = list(dict.fromkeys(args.num_colors))
    elif colorcnns:
        ks = sorted(colorcnns)
    else:
        raise ValueError("--num-colors is required (no ColorCNN network to take K from)")
    for k in ks:
        if "colorcnn" in methods and k not in colorcnns:
            notes.append(f"colorcnn has no K={k} network: its cells stay empty")
    plus = None
    if "colorcnn+" in methods:
        plus_path = _resolve(args.colorcnn_plus or _DEFAULT_COLORCNN_PLUS, PRETRAINED_COLORCNN_PLUS, "colorcnn+",
                             "colorcnn-plus")
        plus = load_colorcnn_plus_for(plus_path, ks)

    files = image_files(args.images)  # the same checks as quantize: regular files, pixel limit, unique stems
    images = _load_images(files, image_size, args.resize, notes)
    out = Path(args.out_dir or Path("runs") / f"gradcam-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    def names(index: int) -> str:
        return class_names[index] if class_names else f"class {index}"

    def judge(batch: Tensor, targets=None) -> GradCamResult:
        normalized = TF.normalize(batch, list(mean), list(std))
        return grad_cam(classifier, normalized, targets, layer=args.layer, size=(args.cell_size, args.cell_size))

    def cell(batch_uint8: Tensor, i: int, cams: Tensor) -> PIL.Image.Image:
        shown = fit_to_cell(batch_uint8[i], args.cell_size).resize((args.cell_size, args.cell_size),
                                                                   PIL.Image.Resampling.NEAREST)
        return overlay_heatmap(shown, cams[i], args.alpha)

    originals = images.float() / 255
    # the true class: the image's folder, if it names one of the classifier's classes
    known = [bool(class_names) and f.parent.name in class_names for f in files]
    base = judge(originals)
    targets = torch.tensor([class_names.index(f.parent.name) if ok else int(p)
                            for f, ok, p in zip(files, known, base.prediction)])
    base = judge(originals, targets)

    records, rows, captions = [], [], []
    columns = ["original"] + [_LABELS[m] for m in methods]
    quantized = {}
    for k in ks:
        for method in methods:
            if method == "colorcnn" and k not in colorcnns:
                continue
            if method == "colorcnn":
                quantizer = ColorQuantize(k, "colorcnn", model=colorcnns[k][1])
            elif method == "colorcnn+":
                quantizer = ColorQuantize(k, "colorcnn+", model=plus)
            else:
                quantizer = ColorQuantize(k, method, kmeans_iters=args.kmeans_iters)
            with torch.no_grad():
                q = quantizer.quantize(originals).quantized.clamp(0, 1)
            quantized[k, method] = (q, judge(q, targets))
    for i, path in enumerate(files):
        for k in ks:
            row = [cell(images, i, base.cam)]
            caps = [f"{path.name} K={k}\n" + _caption(float(base.probability[i]), int(base.prediction[i]),
                                                        int(targets[i]), names, known[i])]
            for method in methods:
                if (k, method) not in quantized:
                    row.append(PIL.Image.new("RGB", (args.cell_size, args.cell_size), (255, 255, 255)))
                    caps.append("no network")
                    continue
                q, result = quantized[k, method]
                q8 = (q[i] * 255).round().to(torch.uint8)
                row.append(cell(q8[None], 0, result.cam[i:i + 1]))
                used = int(count_colors(q8[None])[0])
                prob, pred = float(result.probability[i]), int(result.prediction[i])
                caps.append(f"{used} colour{'' if used == 1 else 's'}\n"
                            + _caption(prob, pred, int(targets[i]), names, known[i]))
                records.append({"image": str(path), "true_class": names(int(targets[i])) if known[i] else "",
                                "num_colors": k, "method": method, "colors": used, "probability": prob,
                                "prediction": names(pred), "original_probability": float(base.probability[i])})
            rows.append(row)
            captions.append(caps)

    sheet, boxes = labelled_sheet(rows, columns, captions, cell_size=args.cell_size)
    sheet_path = out / "gradcam-sheet.png"
    sheet.save(sheet_path, optimize=True)
    lines = ["| image | class | K | method | colours | p(class) | original p | prediction |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['image']} | {r['true_class'] or '-'} | {r['num_colors']} | {r['method']} | {r['colors']} | "
                     f"{r['probability']:.3f} | {r['original_probability']:.3f} | {r['prediction']} |")
    table = "\n".join(lines)
    (out / "gradcam.md").write_text(table + "\n")
    print(table)
    print(f"Grad-CAM sheet (rows: image x K; columns: {', '.join(columns)}): {sheet_path}")
    return {"sheet": sheet_path, "table": out / "gradcam.md", "rows": len(rows), "columns": columns,
            "boxes": boxes, "records": records}


COMMAND = Command(
    "gradcam", help="what the classifier looks at: Grad-CAM on original and quantized images",
    description="Draw OUT/gradcam-sheet.png: per image and K, the original and each method's quantized "
                "image with the frozen classifier's Grad-CAM overlaid and the true class's probability "
                "(the seed paper's Figures 1 and 3); OUT/gradcam.md lists the probabilities.",
    add_arguments=add_gradcam_arguments, run=run_gradcam)
