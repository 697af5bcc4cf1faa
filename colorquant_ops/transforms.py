"""Drop-in colour quantization for torchvision pipelines and in front of classifiers.

:class:`ColorQuantize` is a ``torchvision.transforms.v2`` transform and an
``nn.Module``::

    from torchvision.transforms import v2
    from colorquant_ops.transforms import ColorQuantize

    pipeline = v2.Compose([v2.RandomCrop(32, padding=4), ColorQuantize(4, "median_cut"), v2.ToImage(),
                           v2.ToDtype(torch.float32, scale=True)])
    model = nn.Sequential(ColorQuantize(2, "colorcnn", model=colorcnn), classifier)
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import PIL.Image
import torch
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2._utils import is_pure_tensor

from . import ops
from ._validation import check_int as _check_int
from .models import ColorCNN, load_colorcnn
from .quantizers import pil_quantize

__all__ = ["METHODS", "ColorQuantize", "QuantizeResult"]

#: Methods of :class:`ColorQuantize`.
METHODS = ("median_cut", "octree", "kmeans", "colorcnn")


class QuantizeResult(NamedTuple):
    """Result of :meth:`ColorQuantize.quantize` for a batch ``[B,C,H,W]``."""

    quantized: Tensor  #: ``[B,C,H,W]``, dtype of the input
    index_map: Optional[Tensor]  #: ``[B,H,W]`` int64 (``None`` for ColorCNN's soft training path)
    palette: Tensor  #: ``[B,K,C]``; uint8 for uint8 input, else the input's float dtype


class ColorQuantize(Transform):
    """Quantize images to at most ``num_colors`` colours.

    Args:
        num_colors: number of colours K, in ``[2, 256]``.
        method: ``"median_cut"``, ``"octree"`` (PIL, the seed paper's baselines),
            ``"kmeans"`` (this library's batched k-means op: k-means++ seeding
            and ``kmeans_iters`` Lloyd iterations) or ``"colorcnn"`` (a learned
            :class:`~colorquant_ops.ColorCNN`).
        dither: map the image onto the method's palette with Floyd–Steinberg
            error diffusion (this library's batched op) instead of using the
            method's own index map.
        model: for ``method="colorcnn"``, a :class:`~colorquant_ops.ColorCNN`
            with ``num_colors`` colours or the path of a checkpoint written by
            :func:`~colorquant_ops.models.save_colorcnn`.
        kmeans_iters: Lloyd iterations of ``method="kmeans"``.
        seed: seed of the k-means++ seeding (results are deterministic given it).

    Inputs: PIL images (RGB), ``tv_tensors.Image`` or plain tensors ``[..., C, H, W]``,
    uint8 or floating point (PIL methods, k-means and dithering expect values in
    ``[0, 1]`` for floats). The output has the input's type, dtype and shape;
    other inputs of a sample (labels, boxes, masks) pass through unchanged.

    Modes: the transform starts in eval mode, where every method outputs at most
    K colours per image (ColorCNN runs its argmax path on the model's device). In
    training mode (e.g. ``nn.Sequential(ColorQuantize(..., model=m), classifier).train()``)
    the ``"colorcnn"`` method runs ColorCNN's soft, differentiable recolouring on
    float tensors, so gradients reach the model's parameters; the other methods
    do not depend on the mode.
    """

    _transformed_types = (PIL.Image.Image, tv_tensors.Image, is_pure_tensor)

    def __init__(
        self,
        num_colors: int,
        method: str = "median_cut",
        dither: bool = False,
        model: ColorCNN | str | os.PathLike | None = None,
        kmeans_iters: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_colors = _check_int(num_colors, "num_colors", 2, 256)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.dither = bool(dither)
        self.kmeans_iters = _check_int(kmeans_iters, "kmeans_iters", 0)
        self.seed = _check_int(seed, "seed", 0)
        self.model: Optional[ColorCNN] = None
        if method == "colorcnn":
            if model is None:
                raise ValueError('method="colorcnn" needs model=: a ColorCNN or the path of a ColorCNN checkpoint')
            if isinstance(model, (str, os.PathLike)):
                model = load_colorcnn(model)
            if not isinstance(model, ColorCNN):
                raise TypeError(f"model must be a ColorCNN or a checkpoint path, got {type(model).__name__}")
            if model.num_colors != self.num_colors:
                raise ValueError(f"model quantizes to {model.num_colors} colours but num_colors={self.num_colors}")
            self.model = model
        elif model is not None:
            raise ValueError(f"model= is only used by method='colorcnn', not {method!r}")
        self.train(False)

    def extra_repr(self) -> str:
        return f"num_colors={self.num_colors}, method={self.method!r}, dither={self.dither}"

    # --- batched core -----------------------------------------------------------------

    def quantize(self, images: Tensor) -> QuantizeResult:
        """Quantize a batch ``[B,C,H,W]`` (uint8 or float); also returns the index map and palette.

        ``render_index_map(index_map, palette)`` reproduces ``quantized`` (after a
        float conversion for uint8), so the pair can be stored, e.g. as a palette PNG.
        """
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must be 4-D [B, C, H, W], got shape {tuple(images.shape)}")
        is_uint8 = images.dtype == torch.uint8
        if not (is_uint8 or images.is_floating_point()):
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        x = images.float() / 255 if is_uint8 else images

        if self.method == "colorcnn" and self.training and not is_uint8:
            out = self._run_model(x)  # soft, differentiable path
            return QuantizeResult(out.quantized, None, out.palette)

        if self.method == "colorcnn":
            with torch.no_grad():
                out = self._run_model(x)
            index_map, palette = out.index_map, out.palette
        elif self.method == "kmeans":
            index_map, palette = ops.kmeans_palette(x, self.num_colors, self.kmeans_iters, self.seed)
        else:
            index_map, palette = pil_quantize(x, self.num_colors, self.method)
        palette = palette.to(x.dtype)
        if is_uint8:
            # Round the palette first so the output's colours are exactly its entries.
            palette = palette.mul(255).round_().clamp_(0, 255)
        if self.dither:
            index_map = ops.floyd_steinberg_dither(x * 255 if is_uint8 else x, palette)
        quantized = ops.render_index_map(index_map, palette)
        if is_uint8:
            return QuantizeResult(quantized.to(torch.uint8), index_map, palette.to(torch.uint8))
        return QuantizeResult(quantized, index_map, palette)

    def _run_model(self, x: Tensor):
        device = next(self.model.parameters()).device
        out = self.model(x.to(device))
        if device == x.device:
            return out
        return type(out)(*(t.to(x.device) if t is not None else None for t in out))

    # --- torchvision v2 plumbing --------------------------------------------------------

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, PIL.Image.Image):
            if inpt.mode != "RGB":
                raise ValueError(
                    f"ColorQuantize needs RGB PIL images, got mode {inpt.mode!r}; convert with image.convert('RGB')"
                )
            out = self.quantize(TF.pil_to_tensor(inpt)[None]).quantized[0]
            return TF.to_pil_image(out)
        if inpt.dim() < 3:
            raise ValueError(f"ColorQuantize needs images [..., C, H, W], got shape {tuple(inpt.shape)}")
        batch = inpt.reshape(-1, *inpt.shape[-3:])
        out = self.quantize(batch.as_subclass(Tensor)).quantized.reshape(inpt.shape)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out

