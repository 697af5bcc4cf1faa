"""ColorCNN+: one learned quantizer for every number of colours, K chosen at call time.

After Hou, Gould, Zheng, "Scalable Deep Color Quantization: a Cluster Imitation Approach" (TIP
2024; the TPAMI "Learning to Structure an Image with Few Colors and Beyond" line of work): a network
that serves several colour-space sizes with one set of weights and learns, through a *cluster
imitation* loss, to assign colours the way a clustering quantizer does, so that it keeps ColorCNN's
strength at one or two bits without falling apart at five or six. The papers' text gives the aims,
not the architecture; this model is this library's own design for them (RESULTS.md says what was
taken and what was invented):

* **k-means in a learned colour space.** A U-Net (ColorCNN's backbone), told K through one extra
  input plane (``log2(K) / 8``), predicts a per-pixel offset ``delta`` (its last layer starts at
  zero) that moves each pixel in colour space: ``features = image + delta``. The palette's centres
  are k-means on the features (:func:`~colorquant_ops.ops.kmeans_palette`, deterministic, not
  differentiated) refined by ``refine_steps`` differentiable soft-k-means steps, and every pixel
  scores each colour by its distance, ``logits = -beta(K) * |features - centre_k|^2``
  (:func:`~colorquant_ops.ops.palette_distance`), with a learned inverse temperature
  ``beta(K) = exp(a + b (log2 K - 1))``. So K is just an argument: the same weights serve 2 or 256
  colours, and untrained (``delta = 0``) the model *is* k-means, the strongest traditional
  quantizer at large K; training moves pixels across cluster boundaries where the classifier needs
  structure (edges at one bit) and leaves them where it does not.
* The recolouring is ColorCNN's: training uses the softmax of the logits and the probability-
  weighted mean of the *input* pixels (:func:`~colorquant_ops.ops.soft_color_quantize`); evaluation
  the argmax index map and the mean input colour of each index
  (:func:`~colorquant_ops.ops.hard_color_quantize`). The palette is always made of the image's own
  colours; the features only decide who goes with whom.
* The cluster-imitation term (:func:`colorquant_ops.losses.cluster_imitation_loss`) asks each
  pixel's assignment to be that of a clustering step: the palette colour nearest to the pixel's own
  colour.
* **Smoothing at inference** (``smoothing=s``, not in the papers): in evaluation mode the argmax
  takes ``(1 - s) * logits + s * mean3x3(logits)`` (:func:`smooth_logits`), which reassigns pixels
  whose own preference is weak and whose neighbours disagree with it: fewer isolated pixels, longer
  runs, smaller palette PNGs, at no measured cost in accuracy for small ``s`` (RESULTS.md,
  session 17). Training never sees it. For these distance logits the 3x3 mean has a closed form
  that filters the C + 1 feature planes instead of the K logit planes (:func:`_smooth_distance_logits`).
"""

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checkpoint import build_checked
from .._validation import check_float as _check_float
from .._validation import check_int as _check_int
from ..ops import hard_color_quantize, kmeans_palette, palette_distance, soft_color_quantize
from .backbones import DnCNN, UNet
from .colorcnn import (KEEP_NORMALIZATION, ColorCNNOutput, _check_normalization, add_gumbel_noise, check_image_input,
                       normalization_tensors, read_model_checkpoint, write_model_checkpoint)
from .pretrained import pretrained_path

__all__ = ["ColorCNNPlus", "load_colorcnn_plus", "load_colorcnn_plus_checkpoint", "save_colorcnn_plus", "smooth_logits"]

#: Tag of the checkpoint format written by :func:`save_colorcnn_plus`.
CHECKPOINT_FORMAT = "colorquant_ops.ColorCNNPlus/1"

_BACKBONES = {"unet": UNet, "dncnn": DnCNN}

#: Hidden channels of the 1x1-conv offset head.
HEAD_CHANNELS = 64

#: Initial inverse temperature at K = 2 and its growth per doubling of K. Measured on CIFAR-10 test
#: images in the normalized space ``colorquant train`` works in, k-means at K = 2, 4, ..., 64: the
#: mean squared distance of a pixel to its nearest centre is 0.70, 0.23, 0.096, 0.045, 0.023, 0.012,
#: about 2.2x less per doubling; these make it about 3 logits at every K (beta(2) = 4, beta(64) = 210).
INITIAL_LOG_BETA = math.log(4.0)
INITIAL_LOG_BETA_SLOPE = math.log(2.2)


def _mean3x3(planes: Tensor) -> Tensor:
    """Each pixel's mean over its 3x3 neighbourhood, plane by plane (at the border: the neighbours that exist)."""
    return F.avg_pool2d(planes, 3, 1, 1, count_include_pad=False)


def smooth_logits(logits: Tensor, strength: float) -> Tensor:
    """``(1 - strength) * logits + strength * mean3x3(logits)`` for ``[B, K, H, W]`` logits: each
    pixel's scores pulled towards the mean over its 3x3 neighbourhood (at the border, over the
    neighbours that exist), every image and colour on its own; ``strength`` in ``[0, 1]``, 0 returns
    ``logits`` itself."""
    strength = _check_strength(strength, "strength")
    if strength == 0.0:
        return logits
    return torch.lerp(logits, _mean3x3(logits), strength)


def _smooth_distance_logits(logits: Tensor, features: Tensor, centres: Tensor, beta: Tensor, strength: float) -> Tensor:
    """:func:`smooth_logits` of ``logits = -beta * |features - centre_k|^2``, without box-filtering K planes:
    the 3x3 mean of those logits is ``-beta * (|mean3x3(features) - centre_k|^2 + v)`` with
    ``v = mean3x3(|features|^2) - |mean3x3(features)|^2`` the same for every colour, so only C + 1 planes
    are filtered (at K = 64 the K-plane filter took a third of the eval forward on a CPU thread)."""
    planes = torch.cat([features, features.square().sum(1, keepdim=True)], dim=1)
    box = _mean3x3(planes)
    mean_features, mean_square = box[:, :-1], box[:, -1:]
    spread = mean_square - mean_features.square().sum(1, keepdim=True)
    mean_logits = palette_distance(mean_features, centres).add_(spread).mul_(-beta)  # in place: K planes
    return mean_logits.lerp_(logits, 1.0 - strength)  # = lerp(logits, mean_logits, strength)


def _check_strength(value, name: str) -> float:
    value = _check_float(value, name, positive=False)
    if value > 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


class ColorCNNPlus(nn.Module):
    """ColorCNN+: k-means in a learned colour space, one set of weights for every K in
    ``[2, max_colors]`` (see the module docstring for the design).

    ``model(x, num_colors)`` quantizes ``x`` to ``num_colors`` colours and returns a
    :class:`~colorquant_ops.models.ColorCNNOutput` like :class:`~colorquant_ops.ColorCNN`'s: in
    training mode the soft, differentiable recolouring (``index_map`` None), in evaluation mode the
    argmax index map (of the logits smoothed by ``smoothing``) and its mean-colour palette. ``input_normalization=(mean, std)`` works as for
    ColorCNN: the network sees ``(x - mean) / std`` (and clusters in that space), recolours from the
    input pixels, and takes images in ``[0, 1]``.

    Args:
        backbone: ``"unet"`` (default) or ``"dncnn"``.
        width: channel width of the backbone (64 as ColorCNN's paper; 16 or 32 suit CPU runs).
        in_channels: channels C of the input image.
        max_colors: the largest K the model accepts, in ``[2, 256]``.
        kmeans_iters: Lloyd iterations of the k-means that places the initial centres, >= 0.
        refine_steps: differentiable soft-k-means steps after it, >= 0.
        seed: seed of the k-means++ seeding (the model is a deterministic function of its input).
        eps: added to each colour's total probability in the soft palette, >= 0.
        input_normalization: ``None`` or ``(mean, std)``, ``in_channels`` values each.
        smoothing: strength in ``[0, 1]`` of the 3x3 smoothing of the logits before the evaluation-mode
            argmax (:func:`smooth_logits`; 0, the default: none). A plain attribute, saved in
            checkpoints; set ``model.smoothing`` to change it on a loaded model.
        logit_noise: training-only scale of Gumbel noise added to the distance logits, >= 0 (default: 0,
            none; not in the papers): as :class:`~colorquant_ops.ColorCNN`'s, it makes a pixel's colour
            probabilities near 1/2 unreliable in training, pushing them towards the one-hot assignment
            evaluation uses (the learned inverse temperature can grow to outweigh it).

    Shape:
        - Input: ``[B, C, H, W]`` floating point, any ``H, W >= 1``; ``num_colors`` an int.
        - Output: ``quantized [B, C, H, W]``, ``probs [B, K, H, W]``, ``palette [B, K, C]``,
          ``index_map [B, H, W]`` (``None`` in training mode).
    """

    def __init__(
        self,
        backbone: str = "unet",
        width: int = 64,
        in_channels: int = 3,
        max_colors: int = 256,
        kmeans_iters: int = 10,
        refine_steps: int = 1,
        seed: int = 0,
        eps: float = 1e-8,
        input_normalization: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
        smoothing: float = 0.0,
        logit_noise: float = 0.0,
    ) -> None:
        super().__init__()
        if backbone not in _BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(_BACKBONES)}, got {backbone!r}")
        self.backbone_name = backbone
        self.width = _check_int(width, "width", 1)
        self.in_channels = _check_int(in_channels, "in_channels", 1)
        self.max_colors = _check_int(max_colors, "max_colors", 2, 256)
        self.kmeans_iters = _check_int(kmeans_iters, "kmeans_iters", 0)
        self.refine_steps = _check_int(refine_steps, "refine_steps", 0)
        self.seed = _check_int(seed, "seed", 0)
        self.eps = _check_float(eps, "eps", positive=False)
        self.input_normalization = _check_normalization(input_normalization, self.in_channels)
        self.smoothing = _check_strength(smoothing, "smoothing")
        self.logit_noise = _check_float(logit_noise, "logit_noise", positive=False)

        # one more input plane: log2(K) / 8, so that the offsets can depend on K
        self.backbone = _BACKBONES[backbone](in_channels=self.in_channels + 1, width=self.width)
        self.head = nn.Sequential(
            nn.Conv2d(self.backbone.out_channels, HEAD_CHANNELS, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(HEAD_CHANNELS, self.in_channels, 1),
        )
        # zero offsets at the start: the untrained model is k-means (+ refine_steps soft steps)
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.log_beta = nn.Parameter(torch.tensor(INITIAL_LOG_BETA))
        self.log_beta_slope = nn.Parameter(torch.tensor(INITIAL_LOG_BETA_SLOPE))

    # --- configuration ------------------------------------------------------------------

    def config(self) -> dict:
        """The constructor arguments, enough to rebuild the model (see :func:`save_colorcnn_plus`)."""
        return dict(backbone=self.backbone_name, width=self.width, in_channels=self.in_channels,
                    max_colors=self.max_colors, kmeans_iters=self.kmeans_iters, refine_steps=self.refine_steps,
                    seed=self.seed, eps=self.eps, input_normalization=self.input_normalization,
                    smoothing=self.smoothing, logit_noise=self.logit_noise)

    @classmethod
    def from_pretrained(cls, name: str, map_location="cpu") -> "ColorCNNPlus":
        """A bundled pretrained network by name (:data:`colorquant_ops.models.PRETRAINED_COLORCNN_PLUS`,
        e.g. ``"cifar10-plus"``), in eval mode, with the input normalization it was trained with."""
        return load_colorcnn_plus(pretrained_path(name, "colorcnn+"), map_location).eval()

    def extra_repr(self) -> str:
        return (f"backbone={self.backbone_name!r}, width={self.width}, in_channels={self.in_channels}, "
                f"max_colors={self.max_colors}, kmeans_iters={self.kmeans_iters}, "
                f"refine_steps={self.refine_steps}, seed={self.seed}, eps={self.eps}"
                + (f", smoothing={self.smoothing}" if self.smoothing else "")
                + (f", logit_noise={self.logit_noise}" if self.logit_noise else "")
                + (f", input_normalization={self.input_normalization}" if self.input_normalization else ""))

    # --- the model ----------------------------------------------------------------------

    def inverse_temperature(self, num_colors: int) -> Tensor:
        """``beta(K) = exp(log_beta + log_beta_slope * (log2 K - 1))``, a 0-d tensor."""
        return torch.exp(self.log_beta + self.log_beta_slope * (math.log2(num_colors) - 1.0))

    def _check_input(self, x, num_colors) -> int:
        check_image_input(x, self.in_channels, "ColorCNNPlus")
        return _check_int(num_colors, "num_colors", 2, self.max_colors)

    def _normalized(self, x: Tensor) -> Tensor:
        norm = normalization_tensors(self.input_normalization, x)
        return x if norm is None else (x - norm[0]) / norm[1]

    def features(self, x: Tensor, num_colors: int) -> Tensor:
        """The pixels moved in colour space, ``normalized(x) + delta(x, K)``, ``[B, C, H, W]`` in x's dtype:
        the space the colours are clustered in."""
        num_colors = self._check_input(x, num_colors)
        return self._features(self._normalized(x), num_colors)

    def _features(self, xn: Tensor, num_colors: int) -> Tensor:
        plane = xn.new_full((xn.shape[0], 1, *xn.shape[2:]), math.log2(num_colors) / 8)
        delta = self.head(self.backbone(torch.cat([xn, plane], dim=1)))
        return xn + delta.to(xn.dtype)  # under autocast the head computes in bfloat16

    def forward(self, x: Tensor, num_colors: int, *, return_logits: bool = False
                ) -> Union[ColorCNNOutput, Tuple[ColorCNNOutput, Tensor]]:
        """Quantize ``x`` to ``num_colors`` colours.

        Returns:
            :class:`~colorquant_ops.models.ColorCNNOutput` ``(quantized, probs, palette, index_map)``,
            and with ``return_logits=True`` also the ``[B, K, H, W]`` logits (what the imitation
            loss takes; in training mode with ``logit_noise`` the noisy logits ``probs`` come from, in
            evaluation mode the smoothed logits the argmax and ``probs`` come from).
        """
        num_colors = self._check_input(x, num_colors)
        features = self._features(self._normalized(x), num_colors)
        beta = self.inverse_temperature(num_colors).to(x.dtype)
        centres = kmeans_palette(features, num_colors, self.kmeans_iters, self.seed).palette
        logits = palette_distance(features, centres) * -beta
        for _ in range(self.refine_steps):
            centres = soft_color_quantize(logits, features, 1.0, self.eps).palette
            logits = palette_distance(features, centres) * -beta
        if self.training:
            logits = add_gumbel_noise(logits, self.logit_noise)  # after the refinement: on the assignment only
            soft = soft_color_quantize(logits, x, 1.0, self.eps)
            out = ColorCNNOutput(soft.quantized, soft.probs, soft.palette, None)
        else:
            strength = _check_strength(self.smoothing, "smoothing")
            if strength:
                logits = _smooth_distance_logits(logits, features, centres, beta, strength)
            hard = hard_color_quantize(logits, x)
            out = ColorCNNOutput(hard.quantized, torch.softmax(logits, dim=1), hard.palette, hard.index_map)
        return (out, logits) if return_logits else out


# --- checkpoints ------------------------------------------------------------------------

_CONFIG_KEYS = ("backbone", "width", "in_channels", "max_colors", "kmeans_iters", "refine_steps", "seed", "eps",
                "input_normalization", "smoothing", "logit_noise")


def save_colorcnn_plus(model: ColorCNNPlus, path, *, input_normalization=KEEP_NORMALIZATION, **extra) -> None:
    """Write ``model`` (config, weights and any ``extra`` entries) to ``path``; ``input_normalization``
    as for :func:`~colorquant_ops.models.save_colorcnn`."""
    write_model_checkpoint(model, CHECKPOINT_FORMAT, path, input_normalization, extra)


def load_colorcnn_plus(path, map_location="cpu") -> ColorCNNPlus:
    """Rebuild a :class:`ColorCNNPlus` from a checkpoint written by :func:`save_colorcnn_plus`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable ColorCNN+ checkpoint.
    """
    return load_colorcnn_plus_checkpoint(path, map_location)[0]


def load_colorcnn_plus_checkpoint(path, map_location="cpu") -> Tuple[ColorCNNPlus, dict]:
    """:func:`load_colorcnn_plus`, plus the ``extra`` entries the checkpoint holds (``dataset``,
    ``classifier``, ... from ``colorquant train --model colorcnn+``)."""
    ckpt, config = read_model_checkpoint(path, CHECKPOINT_FORMAT, "ColorCNN+", _CONFIG_KEYS, map_location)
    model = build_checked(lambda: ColorCNNPlus(**config), ckpt["state_dict"], path, "ColorCNN+")
    extra = {k: v for k, v in ckpt.items() if k not in ("format", "config", "state_dict")}
    return model, extra
