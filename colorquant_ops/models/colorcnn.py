"""ColorCNN: learning to structure an image with few colours.

Hou, Zheng, Gould, "Learning to Structure an Image with Few Colors", CVPR 2020.
A backbone (U-Net or DnCNN) and a 1x1-conv head predict, for every pixel, a
score for each of K colours. Training recolours the image with the softmax of
these scores (differentiable, :func:`~colorquant_ops.ops.soft_color_quantize`);
evaluation assigns every pixel its argmax colour, the mean of its pixels
(:func:`~colorquant_ops.ops.hard_color_quantize`).
"""

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from .._checkpoint import build_checked, read_checkpoint
from .._io import save_atomic
from .._validation import check_float as _check_float
from .._validation import check_int as _check_int
from ..normalization import NORMALIZATION_BEFORE_RECORDING
from ..ops import hard_color_quantize, soft_color_quantize
from .backbones import DnCNN, UNet
from .pretrained import pretrained_path

__all__ = ["ColorCNN", "ColorCNNOutput", "load_colorcnn", "load_colorcnn_checkpoint", "save_colorcnn"]

#: Tag of the checkpoint format written by :func:`save_colorcnn`.
CHECKPOINT_FORMAT = "colorquant_ops.ColorCNN/1"

_BACKBONES = {"unet": UNet, "dncnn": DnCNN}

#: Channels of the hidden 1x1 convolution of the colour head (paper: 256).
HEAD_CHANNELS = 256


class ColorCNNOutput(NamedTuple):
    """Result of :meth:`ColorCNN.forward`."""

    #: ``[B, C, H, W]`` recoloured image, in the input's value space and dtype.
    quantized: Tensor
    #: ``[B, K, H, W]`` softmax of ``temperature * logits`` (in the input's dtype).
    probs: Tensor
    #: ``[B, K, C]`` colours used for recolouring (training: after ``color_norm``
    #: and ``color_jitter``; evaluation: mean colour of each index, zeros if unused).
    palette: Tensor
    #: ``[B, H, W]`` int64 argmax colour index in evaluation mode, ``None`` in training.
    index_map: Optional[Tensor]


# torch.export needs a serialized name for every namedtuple an exported program returns.
pytree._register_namedtuple(ColorCNNOutput, serialized_type_name="colorquant_ops.models.colorcnn.ColorCNNOutput")


def _check_normalization(value, channels: int):
    """``None`` or ``(mean, std)``: two sequences of ``channels`` finite floats, std > 0."""
    if value is None:
        return None
    try:
        mean, std = value
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except (TypeError, ValueError):
        raise TypeError(f"input_normalization must be None or (mean, std) sequences, got {value!r}") from None
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"input_normalization needs {channels} means and stds (in_channels), got {value!r}")
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ValueError(f"input_normalization: means must be finite and stds finite and > 0, got {value!r}")
    return mean, std


def normalization_tensors(normalization, x: Tensor):
    """``normalization`` (``None`` or ``(mean, std)``) as two ``[1, C, 1, 1]`` tensors like ``x``, or None."""
    if normalization is None:
        return None
    mean, std = normalization
    return (torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1),
            torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1))


def check_image_input(x, in_channels: int, model: str) -> None:
    """The input checks of the learned quantizers (``model`` names the class in the messages); checked
    up front because the first convolution's errors would not name the cause."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{model} input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{model} input must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{model} input must have in_channels={in_channels} channels, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{model} input must be a floating-point tensor, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{model} input must be non-empty in B, H and W, got shape {tuple(x.shape)}")


def read_model_checkpoint(path, fmt: str, what: str, config_keys, map_location="cpu") -> Tuple[dict, dict]:
    """A learned quantizer's checkpoint: ``(checkpoint, config)`` after the checks every such format
    shares (``config`` and ``state_dict`` entries, a dict config with only ``config_keys``)."""
    ckpt = read_checkpoint(path, fmt, what, map_location)
    missing = [k for k in ("config", "state_dict") if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict):
        raise ValueError(f"{path} is not a {what} checkpoint "
                         + (f"(missing entries {missing})" if missing else "(its config is not a dict)"))
    config = dict(ckpt["config"])
    unknown = sorted(str(k) for k in set(config) - set(config_keys))
    if unknown:
        raise ValueError(f"{path} is not a {what} checkpoint (unknown config entries {unknown})")
    return ckpt, config


class ColorCNN(nn.Module):
    """ColorCNN colour quantizer from `Learning to Structure an Image with Few Colors
    <https://arxiv.org/abs/2003.07848>`_.

    ``logits = head(backbone(x))`` with ``head = 1x1 conv(256) -> ReLU -> 1x1 conv(K,
    no bias)``. In training mode (``model.train()``) the image is recoloured
    softly and differentiably; the palette is divided by ``color_norm`` and
    shifted by one scalar ``color_jitter * N(0, 1)`` drawn per call (from the
    global RNG of the input's device, so ``torch.manual_seed`` reproduces it), the
    paper's tricks that keep the downstream classifier from relying on exact
    colours. In evaluation mode (``model.eval()``) every pixel takes the mean
    colour of its argmax index, with neither trick.

    ``straight_through=True`` (not in the paper) makes training see the
    evaluation-mode image: the forward value of ``quantized`` and ``palette``
    is the argmax recolouring (before ``color_norm`` and ``color_jitter``),
    their gradient that of the soft recolouring. The soft image can carry
    information in intermediate probabilities that argmax discards; this
    closes that train/test gap, though with a biased gradient (in the K = 2
    CIFAR-10 ablation of RESULTS.md it learned more slowly than the soft path).

    ``logit_noise=s > 0`` (not in the paper either) adds ``s`` times Gumbel noise
    to the logits in training mode, one draw per pixel and colour (the
    Gumbel-softmax relaxation, Jang et al. 2017, at ``s = 1``): a colour
    probability near 1/2 then flips from call to call, so the soft image can no
    longer carry information in intermediate probabilities reliably, and the
    network is pushed towards decisive ones, like the argmax image that
    evaluation uses, while keeping the soft path's gradient (the training output's
    ``probs`` are those of the noisy logits).

    The quantized image lives in the input's value space and has the input's
    dtype: under autocast, the logits are cast to the input's dtype before
    quantization. ``input_normalization=(mean, std)`` says the network was
    trained on ``(x - mean) / std``: it then takes images in ``[0, 1]``, the
    backbone sees them normalized, and the image is recoloured from the input
    pixels (the palette is the mean of the *input* pixels of each colour), so
    the output stays in ``[0, 1]``; the training-time palette tricks act in the
    normalized space, as in training (``colorquant train`` records its
    dataset's normalization in the checkpoints it writes). Without it
    (``None``) the network sees the input as it is.

    Args:
        num_colors: number of colours K, in ``[2, 256]``.
        backbone: ``"unet"`` (the paper's default) or ``"dncnn"``.
        width: channel width of the backbone, 64 in the paper; every backbone
            width scales by ``width / 64`` (16 or 32 suit CPU-sized runs).
        in_channels: channels C of the input image.
        temperature: factor applied to the logits before the softmax (the
            paper's "soften" factor), > 0.
        color_norm: training-only divisor of the palette, > 0 (paper: 4 on
            CIFAR, 1 elsewhere).
        color_jitter: training-only standard deviation of the scalar palette
            shift, >= 0 (paper: 1).
        eps: added to each colour's total probability in the soft palette, >= 0.
        straight_through: training-mode forward value from the argmax
            recolouring, gradient from the soft one (default: False, the paper's
            soft recolouring).
        logit_noise: training-only scale of the Gumbel noise added to the
            logits, >= 0 (default: 0, none).
        input_normalization: ``None`` or ``(mean, std)``, ``in_channels``
            values each: the normalization the backbone expects (see above).

    Shape:
        - Input: ``[B, C, H, W]``, any ``H, W >= 1``, floating point.
        - Output: :class:`ColorCNNOutput` with ``quantized [B, C, H, W]``,
          ``probs [B, K, H, W]``, ``palette [B, K, C]``, ``index_map [B, H, W]``
          (or ``None`` in training mode).
    """

    def __init__(
        self,
        num_colors: int,
        backbone: str = "unet",
        width: int = 64,
        in_channels: int = 3,
        temperature: float = 1.0,
        color_norm: float = 1.0,
        color_jitter: float = 1.0,
        eps: float = 1e-8,
        straight_through: bool = False,
        input_normalization: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
        logit_noise: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_colors = _check_int(num_colors, "num_colors", 2, 256)
        if backbone not in _BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(_BACKBONES)}, got {backbone!r}")
        self.width = _check_int(width, "width", 1)
        self.in_channels = _check_int(in_channels, "in_channels", 1)
        self.temperature = _check_float(temperature, "temperature", positive=True)
        self.color_norm = _check_float(color_norm, "color_norm", positive=True)
        self.color_jitter = _check_float(color_jitter, "color_jitter", positive=False)
        self.eps = _check_float(eps, "eps", positive=False)
        if not isinstance(straight_through, bool):
            raise TypeError(f"straight_through must be a bool, got {type(straight_through).__name__}")
        self.straight_through = straight_through
        self.logit_noise = _check_float(logit_noise, "logit_noise", positive=False)
        self.input_normalization = _check_normalization(input_normalization, self.in_channels)
        self.backbone_name = backbone

        self.backbone = _BACKBONES[backbone](in_channels=self.in_channels, width=self.width)
        self.head = nn.Sequential(
            nn.Conv2d(self.backbone.out_channels, HEAD_CHANNELS, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(HEAD_CHANNELS, self.num_colors, 1, bias=False),
        )

    def config(self) -> dict:
        """The constructor arguments, enough to rebuild the model (see :func:`save_colorcnn`)."""
        return dict(
            num_colors=self.num_colors,
            backbone=self.backbone_name,
            width=self.width,
            in_channels=self.in_channels,
            temperature=self.temperature,
            color_norm=self.color_norm,
            color_jitter=self.color_jitter,
            eps=self.eps,
            straight_through=self.straight_through,
            input_normalization=self.input_normalization,
            logit_noise=self.logit_noise,
        )

    @classmethod
    def from_pretrained(cls, name: str, map_location="cpu") -> "ColorCNN":
        """A bundled pretrained network by name (:data:`colorquant_ops.models.PRETRAINED_COLORCNN`,
        e.g. ``"cifar10-k2"``), in eval mode, with the input normalization it was trained with."""
        return load_colorcnn(pretrained_path(name, "colorcnn"), map_location).eval()

    def extra_repr(self) -> str:
        return (
            f"num_colors={self.num_colors}, backbone={self.backbone_name!r}, width={self.width}, "
            f"in_channels={self.in_channels}, temperature={self.temperature}, "
            f"color_norm={self.color_norm}, color_jitter={self.color_jitter}, eps={self.eps}, "
            f"straight_through={self.straight_through}"
            + (f", logit_noise={self.logit_noise}" if self.logit_noise else "")
            + (f", input_normalization={self.input_normalization}" if self.input_normalization else "")
        )

    def _normalization(self, x: Tensor):
        """``(mean, std)`` as ``[1, C, 1, 1]`` tensors like ``x``, or None."""
        return normalization_tensors(self.input_normalization, x)

    def _check_input(self, x) -> None:
        check_image_input(x, self.in_channels, "ColorCNN")

    def logits(self, x: Tensor) -> Tensor:
        """Raw colour scores, before the temperature and the softmax.

        Args:
            x: ``[B, C, H, W]`` image (in ``[0, 1]`` with ``input_normalization``).

        Returns:
            ``[B, K, H, W]`` logits, in the dtype the head computes in (e.g.
            bfloat16 under CPU autocast).
        """
        self._check_input(x)
        return self._logits(x, self._normalization(x))

    def _logits(self, x: Tensor, norm) -> Tensor:
        return self.head(self.backbone(x if norm is None else (x - norm[0]) / norm[1]))

    def forward(self, x: Tensor) -> ColorCNNOutput:
        """Quantize ``x`` to ``num_colors`` colours.

        Args:
            x: ``[B, C, H, W]`` floating-point image.

        Returns:
            :class:`ColorCNNOutput` ``(quantized, probs, palette, index_map)``.
            In training mode ``quantized``, ``probs`` and ``palette`` are
            differentiable w.r.t. the parameters and ``x``, and ``index_map`` is
            ``None``; in evaluation mode ``quantized``, ``palette`` and
            ``index_map`` carry no gradient.
        """
        self._check_input(x)
        norm = self._normalization(x)
        logits = self._logits(x, norm)
        # The fused ops need one dtype; quantize in the image's (fp32 under autocast).
        if logits.dtype != x.dtype:
            logits = logits.to(x.dtype)

        if not self.training:
            hard = hard_color_quantize(logits, x)
            probs = torch.softmax(self.temperature * logits, dim=1)
            return ColorCNNOutput(hard.quantized, probs, hard.palette, hard.index_map)

        logits = add_gumbel_noise(logits, self.logit_noise)
        soft = soft_color_quantize(logits, x, self.temperature, self.eps)
        quantized, palette = soft.quantized, soft.palette
        if self.straight_through:
            # Value of the argmax recolouring, gradient of the soft one.
            hard = hard_color_quantize(logits.detach(), x.detach())
            quantized = quantized + (hard.quantized - quantized).detach()
            palette = palette + (hard.palette.to(palette.dtype) - palette).detach()
        # probs sum to 1 over k, so recolouring with palette / color_norm + j is
        # exactly quantized / color_norm + j: no second pass over the pixels.
        # With an input normalization the tricks act in the normalized space the
        # network was trained in: mean + ((v - mean) / std / color_norm + j) * std.
        if self.color_norm != 1.0:
            if norm is None:
                quantized = quantized / self.color_norm
                palette = palette / self.color_norm
            else:
                mean, channel_mean = norm[0], norm[0].view(1, 1, -1)
                quantized = mean + (quantized - mean) / self.color_norm
                palette = channel_mean + (palette - channel_mean) / self.color_norm
        if self.color_jitter != 0.0:
            # One scalar per call, drawn in float32 whatever the dtype so that a
            # seed gives the same shift in every precision.
            jitter = torch.randn((), device=x.device) * self.color_jitter
            if norm is None:
                quantized = quantized + jitter
                palette = palette + jitter
            else:
                quantized = quantized + jitter * norm[1]
                palette = palette + jitter * norm[1].view(1, 1, -1)
        return ColorCNNOutput(quantized, soft.probs, palette, None)


def add_gumbel_noise(logits: Tensor, scale: float) -> Tensor:
    """``logits + scale * g`` with ``g`` Gumbel(0, 1), one draw per element from the global RNG of the
    logits' device (``logits`` itself when ``scale`` is 0): the training-time ``logit_noise`` of
    :class:`ColorCNN` and :class:`~colorquant_ops.models.ColorCNNPlus`."""
    if scale == 0.0:
        return logits
    # float32 uniforms whatever the dtype (a seed gives the same noise in every precision); the clamp
    # keeps log(-log(u)) finite.
    u = torch.rand(logits.shape, device=logits.device).clamp_(1e-10, 1 - 1e-7)
    return logits - scale * torch.log(-torch.log(u)).to(logits.dtype)


#: ``input_normalization`` default of the checkpoint writers: keep the model's own.
KEEP_NORMALIZATION = object()

#: The entries of :meth:`ColorCNN.config` (a checkpoint's ``config`` may hold only these).
_CONFIG_KEYS = ("num_colors", "backbone", "width", "in_channels", "temperature", "color_norm", "color_jitter",
                "eps", "straight_through", "input_normalization", "logit_noise")


def save_colorcnn(model: ColorCNN, path, *, input_normalization=KEEP_NORMALIZATION, **extra) -> None:
    """Write ``model`` (its config and weights, plus any ``extra`` entries) to ``path``.

    ``input_normalization``: record this ``(mean, std)`` in the checkpoint's config instead of the
    model's own, e.g. for a network trained on normalized images (``colorquant train``), so that the
    loaded model takes images in ``[0, 1]``.
    """
    write_model_checkpoint(model, CHECKPOINT_FORMAT, path, input_normalization, extra)


def write_model_checkpoint(model: nn.Module, fmt: str, path, input_normalization, extra: dict) -> None:
    """The checkpoint of a learned quantizer (its ``config()``, weights and ``extra`` entries, tagged
    ``fmt``); ``input_normalization`` replaces the config's unless it is ``KEEP_NORMALIZATION``."""
    config = model.config()
    if input_normalization is not KEEP_NORMALIZATION:
        config["input_normalization"] = _check_normalization(input_normalization, model.in_channels)
    save_atomic({"format": fmt, "config": config, "state_dict": model.state_dict(), **extra}, path)


def load_colorcnn(path, map_location="cpu") -> ColorCNN:
    """Rebuild a :class:`ColorCNN` from a checkpoint written by :func:`save_colorcnn`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable ColorCNN checkpoint.
    """
    return load_colorcnn_checkpoint(path, map_location)[0]


def load_colorcnn_checkpoint(path, map_location="cpu") -> Tuple[ColorCNN, dict]:
    """:func:`load_colorcnn`, plus the ``extra`` entries :func:`save_colorcnn` stored
    (e.g. ``dataset`` and ``classifier``, from ``colorquant train``).

    A checkpoint without an ``input_normalization`` that names its ``dataset`` (e.g. one written
    before ColorCNN recorded its normalization) gets that dataset's normalization of then
    (:data:`~colorquant_ops.normalization.NORMALIZATION_BEFORE_RECORDING`): ``colorquant train``
    always trained on normalized images.
    """
    ckpt, config = read_model_checkpoint(path, CHECKPOINT_FORMAT, "ColorCNN", _CONFIG_KEYS, map_location)
    dataset = ckpt.get("dataset")
    if (config.get("input_normalization") is None and isinstance(dataset, str)
            and dataset in NORMALIZATION_BEFORE_RECORDING):
        config["input_normalization"] = NORMALIZATION_BEFORE_RECORDING[dataset]
    # the config sizes the model (width, K): checked against the weights' shapes before building it
    model = build_checked(lambda: ColorCNN(**config), ckpt["state_dict"], path, "ColorCNN")
    extra = {k: v for k, v in ckpt.items() if k not in ("format", "config", "state_dict")}
    return model, extra
