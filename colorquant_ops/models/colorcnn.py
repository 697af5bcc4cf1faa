"""ColorCNN: learning to structure an image with few colours.

Hou, Zheng, Gould, "Learning to Structure an Image with Few Colors", CVPR 2020.
A backbone (U-Net or DnCNN) and a 1x1-conv head predict, for every pixel, a
score for each of K colours. Training recolours the image with the softmax of
these scores (differentiable, :func:`~colorquant_ops.ops.soft_color_quantize`);
evaluation assigns every pixel its argmax colour, the mean of its pixels
(:func:`~colorquant_ops.ops.hard_color_quantize`).
"""

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .._checkpoint import read_checkpoint
from .._validation import check_float as _check_float
from .._validation import check_int as _check_int
from ..ops import hard_color_quantize, soft_color_quantize
from .backbones import DnCNN, UNet

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

    The quantized image lives in the input's value space (e.g. a normalized
    tensor in, a normalized tensor out) and has the input's dtype: under
    autocast, the logits are cast to the input's dtype before quantization.

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
        )

    def extra_repr(self) -> str:
        return (
            f"num_colors={self.num_colors}, backbone={self.backbone_name!r}, width={self.width}, "
            f"in_channels={self.in_channels}, temperature={self.temperature}, "
            f"color_norm={self.color_norm}, color_jitter={self.color_jitter}, eps={self.eps}, "
            f"straight_through={self.straight_through}"
        )

    def _check_input(self, x) -> None:
        # Checked here because the first convolution's errors would not name the cause.
        if not isinstance(x, Tensor):
            raise TypeError(f"ColorCNN input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"ColorCNN input must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"ColorCNN input must have in_channels={self.in_channels} channels, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"ColorCNN input must be a floating-point tensor, got {x.dtype}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"ColorCNN input must be non-empty in B, H and W, got shape {tuple(x.shape)}")

    def logits(self, x: Tensor) -> Tensor:
        """Raw colour scores, before the temperature and the softmax.

        Args:
            x: ``[B, C, H, W]`` image.

        Returns:
            ``[B, K, H, W]`` logits, in the dtype the head computes in (e.g.
            bfloat16 under CPU autocast).
        """
        self._check_input(x)
        return self.head(self.backbone(x))

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
        logits = self.logits(x)
        # The fused ops need one dtype; quantize in the image's (fp32 under autocast).
        if logits.dtype != x.dtype:
            logits = logits.to(x.dtype)

        if not self.training:
            hard = hard_color_quantize(logits, x)
            probs = torch.softmax(self.temperature * logits, dim=1)
            return ColorCNNOutput(hard.quantized, probs, hard.palette, hard.index_map)

        soft = soft_color_quantize(logits, x, self.temperature, self.eps)
        quantized, palette = soft.quantized, soft.palette
        if self.straight_through:
            # Value of the argmax recolouring, gradient of the soft one.
            hard = hard_color_quantize(logits.detach(), x.detach())
            quantized = quantized + (hard.quantized - quantized).detach()
            palette = palette + (hard.palette.to(palette.dtype) - palette).detach()
        # probs sum to 1 over k, so recolouring with palette / color_norm + j is
        # exactly quantized / color_norm + j: no second pass over the pixels.
        if self.color_norm != 1.0:
            quantized = quantized / self.color_norm
            palette = palette / self.color_norm
        if self.color_jitter != 0.0:
            # One scalar per call, drawn in float32 whatever the dtype so that a
            # seed gives the same shift in every precision.
            jitter = torch.randn((), device=x.device) * self.color_jitter
            quantized = quantized + jitter
            palette = palette + jitter
        return ColorCNNOutput(quantized, soft.probs, palette, None)


def save_colorcnn(model: ColorCNN, path, **extra) -> None:
    """Write ``model`` (its config and weights, plus any ``extra`` entries) to ``path``."""
    torch.save({"format": CHECKPOINT_FORMAT, "config": model.config(), "state_dict": model.state_dict(), **extra}, path)


def load_colorcnn(path, map_location="cpu") -> ColorCNN:
    """Rebuild a :class:`ColorCNN` from a checkpoint written by :func:`save_colorcnn`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable ColorCNN checkpoint.
    """
    return load_colorcnn_checkpoint(path, map_location)[0]


def load_colorcnn_checkpoint(path, map_location="cpu") -> Tuple[ColorCNN, dict]:
    """:func:`load_colorcnn`, plus the ``extra`` entries :func:`save_colorcnn` stored
    (e.g. ``dataset``, whose normalization the model expects, from ``colorquant train``)."""
    ckpt = read_checkpoint(path, CHECKPOINT_FORMAT, "ColorCNN", map_location)
    model = ColorCNN(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    extra = {k: v for k, v in ckpt.items() if k not in ("format", "config", "state_dict")}
    return model, extra
