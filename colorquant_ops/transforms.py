"""Drop-in colour quantization for torchvision pipelines and in front of classifiers.

:class:`ColorQuantize` is a ``torchvision.transforms.v2`` transform and an
``nn.Module``::

    from torchvision.transforms import v2
    from colorquant_ops.transforms import ColorQuantize

    pipeline = v2.Compose([v2.RandomCrop(32, padding=4), ColorQuantize(4, "median_cut"), v2.ToImage(),
                           v2.ToDtype(torch.float32, scale=True)])
    bundled = ColorQuantize(2, "colorcnn", model="cifar10-k2")      # bundled weights, by name
    plus = ColorCNNPlus.from_pretrained("cifar10-plus")             # one network, any K:
    q4, q16 = ColorQuantize(4, "colorcnn+", model=plus), ColorQuantize(16, "colorcnn+", model=plus)
    model = nn.Sequential(ColorQuantize(2, "colorcnn", model=colorcnn), classifier)
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, NamedTuple, Optional

import PIL.Image
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2._utils import is_pure_tensor

from . import ops
from ._validation import check_int as _check_int
from .models import ColorCNN, ColorCNNPlus, load_colorcnn, load_colorcnn_plus
from .models.pretrained import PRETRAINED_COLORCNN, PRETRAINED_COLORCNN_PLUS
from .quantizers import pil_quantize

__all__ = ["METHODS", "ColorQuantize", "QuantizeResult"]

#: Methods of :class:`ColorQuantize`.
METHODS = ("median_cut", "octree", "kmeans", "pil_kmeans", "colorcnn", "colorcnn+")
#: The learned methods: method -> (model class, bundled names, checkpoint loader).
_LEARNED = {"colorcnn": (ColorCNN, PRETRAINED_COLORCNN, load_colorcnn),
            "colorcnn+": (ColorCNNPlus, PRETRAINED_COLORCNN_PLUS, load_colorcnn_plus)}
_PIL_METHODS = ("median_cut", "octree", "pil_kmeans")
# ColorQuantize method -> pil_quantize method
_PIL_NAMES = {"median_cut": "median_cut", "octree": "octree", "pil_kmeans": "kmeans"}


class QuantizeResult(NamedTuple):
    """Result of :meth:`ColorQuantize.quantize` for a batch ``[B,C,H,W]``."""

    quantized: Tensor  #: ``[B,C,H,W]``, dtype of the input
    index_map: Optional[Tensor]  #: ``[B,H,W]`` int64 (``None`` for ColorCNN's soft training path)
    palette: Tensor  #: ``[B,K,C']``; uint8 for uint8 input, else the input's float dtype (RGBA: ``C' = 3``)


@contextlib.contextmanager
def _running_in_mode(model: torch.nn.Module, training: bool):
    """Run ``model`` in ``training`` mode inside the block; every submodule's flag is restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


class ColorQuantize(Transform):
    """Quantize images to at most ``num_colors`` colours.

    Args:
        num_colors: number of colours K, in ``[1, 256]`` (``"colorcnn"``: the model's K;
            ``"colorcnn+"``: 2 to the model's ``max_colors``).
        method: ``"median_cut"``, ``"octree"``, ``"pil_kmeans"`` (PIL, the seed
            paper's baselines; ``pil_kmeans`` is its k-means: ``Image.quantize(K,
            kmeans=2)``, median cut refined by PIL's k-means until at most one
            pixel moves), ``"kmeans"`` (this library's batched k-means op:
            k-means++ seeding and ``kmeans_iters`` Lloyd iterations; another,
            stronger algorithm than the paper's k-means), ``"colorcnn"`` (a
            learned :class:`~colorquant_ops.ColorCNN`) or ``"colorcnn+"`` (a learned
            :class:`~colorquant_ops.models.ColorCNNPlus`, one network for every K).
        dither: map the image onto the method's palette with Floyd–Steinberg
            error diffusion (this library's batched op) instead of using the
            method's own index map.
        dither_clamp: clamp each pixel's value (pixel + received error) to the
            colour range, ``[0, 1]`` (``[0, 255]`` for uint8), as the seed paper's
            dithering does; default off (plain error diffusion).
        model: for ``method="colorcnn"``, a :class:`~colorquant_ops.ColorCNN`
            with ``num_colors`` colours, the name of a bundled network
            (:data:`colorquant_ops.models.PRETRAINED_COLORCNN`, e.g.
            ``"cifar10-k2"``; names take precedence over files) or the path of
            a checkpoint written by :func:`~colorquant_ops.models.save_colorcnn`;
            for ``method="colorcnn+"`` likewise a :class:`~colorquant_ops.models.ColorCNNPlus`,
            a name of :data:`~colorquant_ops.models.PRETRAINED_COLORCNN_PLUS` (e.g.
            ``"cifar10-plus"``) or a :func:`~colorquant_ops.models.save_colorcnn_plus` checkpoint;
            one model may serve several transforms of different K.
        kmeans_iters: Lloyd iterations of ``method="kmeans"``.
        seed: seed of the k-means++ seeding (results are deterministic given it).

    Inputs: PIL images, ``tv_tensors.Image``, ``tv_tensors.Video`` (every frame is
    quantized on its own) or plain tensors ``[..., C, H, W]``, uint8 or floating
    point. The output has the input's type, dtype and shape; other inputs of a
    sample (labels, boxes, masks) pass through unchanged.

    * Value range: float images are in ``[0, 1]`` (uint8 in ``[0, 255]``).
      Median cut and octree (PIL, 8-bit) raise a ``ValueError`` for float values
      outside ``[0, 1]`` (e.g. after ``v2.Normalize``: quantize before
      normalizing); k-means and dithering work exactly on any finite range. A
      ColorCNN with an ``input_normalization`` (every bundled or ``colorquant
      train`` network) takes ``[0, 1]`` images and normalizes them for its
      backbone itself; its palette is the mean of the input pixels, so the
      output stays in ``[0, 1]``.
    * Channels: RGB. Grayscale (1 channel, PIL mode ``"L"``) is quantized to K
      gray levels; RGBA (4 channels, PIL ``"RGBA"``) quantizes the RGB channels
      and passes alpha through unchanged (the palette then holds RGB). k-means
      and dithering also take any other number of channels as they are, and a
      ColorCNN its own ``in_channels``.
    * dtypes: the output (and palette) has the input's dtype; ColorCNN runs in
      its own parameters' dtype and on their device.

    Modes: the transform starts in eval mode, where every method outputs at most
    K colours per image. In training mode (e.g.
    ``nn.Sequential(ColorQuantize(..., model=m), classifier).train()``) the
    ``"colorcnn"`` method runs ColorCNN's soft, differentiable recolouring on
    float tensors, so gradients reach the model's parameters (uint8 and PIL
    input, which carry no gradient, always take the argmax path). The
    *transform's* mode decides, whatever the model's own: each call runs the
    model in that mode (soft path and batch statistics in training, argmax and
    running statistics in eval) and restores the model's own mode flags
    afterwards; ``ColorQuantize.train()`` / ``.eval()`` do not change them
    either, so a model shared with a training loop is never switched behind its
    owner's back. The other methods do not depend on the mode.
    """

    _transformed_types = (PIL.Image.Image, tv_tensors.Image, tv_tensors.Video, is_pure_tensor)

    def __init__(
        self,
        num_colors: int,
        method: str = "median_cut",
        dither: bool = False,
        model: ColorCNN | ColorCNNPlus | str | os.PathLike | None = None,
        kmeans_iters: int = 10,
        seed: int = 0,
        dither_clamp: bool = False,
    ) -> None:
        super().__init__()
        self.num_colors = _check_int(num_colors, "num_colors", 1, 256)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.dither = bool(dither)
        self.dither_clamp = bool(dither_clamp)
        if self.dither_clamp and not self.dither:
            raise ValueError("dither_clamp=True needs dither=True")
        self.kmeans_iters = _check_int(kmeans_iters, "kmeans_iters", 0)
        self.seed = _check_int(seed, "seed", 0)
        self.model: Optional[ColorCNN | ColorCNNPlus] = None
        if method in _LEARNED:
            cls, bundled, load = _LEARNED[method]
            if model is None:
                raise ValueError(f'method="{method}" needs model=: a {cls.__name__}, a bundled name '
                                 f"({', '.join(sorted(bundled))}) or a checkpoint path")
            if isinstance(model, str) and model in bundled:
                model = cls.from_pretrained(model)
            elif isinstance(model, (str, os.PathLike)):
                model = load(model)
            if not isinstance(model, cls):
                raise TypeError(f"model must be a {cls.__name__} for method={method!r}, a bundled name or a "
                                f"checkpoint path, got {type(model).__name__}")
            if method == "colorcnn" and model.num_colors != self.num_colors:
                raise ValueError(f"model quantizes to {model.num_colors} colours but num_colors={self.num_colors}")
            if method == "colorcnn+" and not 2 <= self.num_colors <= model.max_colors:
                raise ValueError(f"num_colors={self.num_colors}: the ColorCNNPlus model serves 2 to "
                                 f"{model.max_colors} colours")
            self.model = model
        elif model is not None:
            raise ValueError(f"model= is only used by the methods {tuple(_LEARNED)}, not {method!r}")
        self.training = False  # the transform's own flag only: the model's mode is its owner's

    def train(self, mode: bool = True) -> "ColorQuantize":
        """Set the transform's mode (soft vs argmax ColorCNN path); the model's own flags are left alone."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        return self

    def extra_repr(self) -> str:
        text = (f"num_colors={self.num_colors}, method={self.method!r}, dither={self.dither}, "
                + ("dither_clamp=True, " if self.dither_clamp else "")
                + f"kmeans_iters={self.kmeans_iters}, seed={self.seed}")
        if isinstance(self.model, ColorCNN):
            m = self.model
            text += f", model=ColorCNN(num_colors={m.num_colors}, backbone={m.backbone_name!r}, width={m.width})"
        elif self.model is not None:
            m = self.model
            text += (f", model=ColorCNNPlus(max_colors={m.max_colors}, backbone={m.backbone_name!r}, width={m.width}"
                     + (f", smoothing={m.smoothing}" if m.smoothing else "") + ")")
        return text

    def __repr__(self) -> str:  # one line: the model is summarized, not printed layer by layer
        return f"{type(self).__name__}({self.extra_repr()})"

    # --- batched core -----------------------------------------------------------------

    def quantize(self, images: Tensor) -> QuantizeResult:
        """Quantize a batch ``[B,C,H,W]`` (uint8 or float); also returns the index map and palette.

        ``render_index_map(index_map, palette)`` reproduces ``quantized`` (after a
        float conversion for uint8; for RGBA, its RGB channels), so the pair can be
        stored, e.g. as a palette PNG.
        """
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must be 4-D [B, C, H, W], got shape {tuple(images.shape)}")
        if not (images.dtype == torch.uint8 or images.is_floating_point()):
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        channels = images.shape[1]
        native = self._native_channels(channels)
        if channels == 4 and not native:  # RGBA: quantize RGB, alpha passes through
            result = self._quantize(images[:, :3])
            return result._replace(quantized=torch.cat([result.quantized, images[:, 3:]], dim=1))
        if channels == 1 and not native:  # grayscale through an RGB quantizer: gray in, gray levels out
            result = self._quantize(images.expand(-1, 3, -1, -1))
            return QuantizeResult(result.quantized[:, :1], result.index_map, result.palette[..., :1])
        if not native and channels != 3:
            raise ValueError(f"{self.method} quantizes RGB, grayscale (1 channel) or RGBA (4 channels) images, "
                             f"got {channels} channels")
        return self._quantize(images)

    def _native_channels(self, channels: int) -> bool:
        """Whether the method takes ``channels`` channels as they are (else: RGB with gray/alpha handling)."""
        if self.method in _LEARNED:
            return channels == self.model.in_channels
        if self.method == "kmeans":
            return channels != 4  # RGBA keeps its alpha out of the clustering
        return channels == 3

    def _quantize(self, images: Tensor) -> QuantizeResult:
        is_uint8 = images.dtype == torch.uint8
        x = images.float() / 255 if is_uint8 else images
        if self.method in _PIL_METHODS and not is_uint8:
            self._check_unit_range(x)

        if self.method in _LEARNED and self.training and not is_uint8:
            out = self._run_model(x, soft=True)  # soft, differentiable path
            return QuantizeResult(out.quantized, None, out.palette)

        if self.method in _LEARNED:
            with torch.no_grad():
                out = self._run_model(x, soft=False)
            index_map, palette = out.index_map, out.palette
        elif self.method == "kmeans":
            index_map, palette = ops.kmeans_palette(x, self.num_colors, self.kmeans_iters, self.seed)
        else:
            index_map, palette = pil_quantize(x, self.num_colors, _PIL_NAMES[self.method])
        palette = palette.to(x.dtype)
        if is_uint8:
            # Round the palette first so the output's colours are exactly its entries.
            palette = palette.mul(255).round_().clamp_(0, 255)
        if self.dither:
            clamp = ((0.0, 255.0) if is_uint8 else (0.0, 1.0)) if self.dither_clamp else None
            index_map = ops.floyd_steinberg_dither(x * 255 if is_uint8 else x, palette, clamp=clamp)
        quantized = ops.render_index_map(index_map, palette)
        if is_uint8:
            return QuantizeResult(quantized.to(torch.uint8), index_map, palette.to(torch.uint8))
        return QuantizeResult(quantized, index_map, palette)

    def _check_unit_range(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        low, high = torch.aminmax(x.detach())
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("image contains NaN or infinite values: the quantizers need finite pixels "
                             "(replace them first, e.g. torch.nan_to_num)")
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(
                f"{self.method} quantizes 8-bit colours and needs float images in [0, 1], got values in "
                f"[{low:.4g}, {high:.4g}]: quantize before v2.Normalize (or use method='kmeans', exact on any range)"
            )

    def _run_model(self, x: Tensor, soft: bool):
        """The model on ``x`` in its own device and dtype, in the transform's mode; outputs like ``x``."""
        param = next(self.model.parameters())
        args = (self.num_colors,) if self.method == "colorcnn+" else ()
        with _running_in_mode(self.model, soft):
            out = self.model(x.to(device=param.device, dtype=param.dtype), *args)
        return type(out)(*(t.to(device=x.device, dtype=x.dtype if t.is_floating_point() else t.dtype)
                           if t is not None else None for t in out))

    # --- torchvision v2 plumbing --------------------------------------------------------

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, PIL.Image.Image):
            if inpt.mode not in ("RGB", "L", "RGBA"):
                raise ValueError(f"ColorQuantize needs RGB, L (gray) or RGBA PIL images, got mode {inpt.mode!r}; "
                                 "convert with image.convert('RGB')")
            out = self.quantize(TF.pil_to_tensor(inpt)[None]).quantized[0]
            return TF.to_pil_image(out, mode=inpt.mode)
        if inpt.dim() < 3:
            raise ValueError(f"ColorQuantize needs images [..., C, H, W], got shape {tuple(inpt.shape)}")
        batch = inpt.reshape(-1, *inpt.shape[-3:])
        out = self.quantize(batch.as_subclass(Tensor)).quantized.reshape(inpt.shape)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, (tv_tensors.Image, tv_tensors.Video)) else out
