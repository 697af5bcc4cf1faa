"""The ColorCNN training objective (Hou, Zheng, Gould, CVPR 2020).

ColorCNN is trained end to end through a frozen classifier ``f``::

    loss = CE(f(quantized), y)
         + alpha * color_usage_loss(probs)                  # paper's R, default 1
         + beta  * color_variance_loss(image, probs)        # code only, default 0
         + gamma * MSE(quantized, image)                    # code only, default 0
         + boundary * boundary_loss(probs)                  # this library's, default 0
         + distill * distillation_loss(f(quantized), f(image))   # this library's, default 0

as in the authors' code (github.com/hou-yz/color_distillation,
``color_distillation/trainer.py``, ``CNNTrainer.train``; defaults
``--alpha 1 --beta 0 --gamma 0`` in ``color_cnn_downsample.py``). The boundary term
(:func:`boundary_loss`, not in the papers) trades a little detail for smaller palette PNGs; the
distillation term (:func:`distillation_loss`, not in the papers either) asks the classifier to say
on the quantized image what it says on the original, not only to name the label.
"""

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_float as _check_float
from .models.colorcnn import ColorCNNOutput
from .ops import palette_distance

__all__ = ["BOUNDARY_SCHEDULES", "ColorCNNLoss", "ColorCNNPlusLoss", "boundary_loss", "cluster_imitation_loss",
           "color_usage_loss", "color_variance_loss", "distillation_loss", "soft_palette"]


#: How :class:`ColorCNNPlusLoss`'s boundary weight depends on K.
BOUNDARY_SCHEDULES = ("constant", "log2", "inverse-log2", "inverse")


def _check_tensor(x, name: str, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def color_usage_loss(probs: Tensor) -> Tensor:
    """The paper's regularizer that keeps every colour in use.

    ``log2(K) * (1 - mean_{b,k} max_{h,w} probs[b, k, h, w])``: each of the K
    colours should reach a high probability at some pixel of every image; a
    colour that no pixel picks lowers its maximum. It is 0 when every colour
    reaches probability 1 somewhere and ``log2(K) * (1 - 1/K)`` for uniform
    probabilities. The authors' code computes exactly this
    (``prob.view(B, K, -1).max(dim=2)[0].mean()`` and the factor
    ``np.log2(num_colors)``); the maximum is taken per image and colour over
    the pixels, then averaged over images and colours.

    Args:
        probs: ``[B, K, H, W]`` per-pixel colour probabilities (softmax over K).

    Returns:
        A scalar in ``probs``' dtype (0 for K = 1).
    """
    _check_tensor(probs, "probs", 4)
    num_colors = probs.shape[1]
    return math.log2(num_colors) * (1 - probs.amax(dim=(2, 3)).mean())


def boundary_loss(probs: Tensor) -> Tensor:
    """The expected fraction of colour boundaries in the index map: what a palette PNG pays for.

    If every pixel drew its colour index from its probabilities, two neighbouring pixels ``p, q``
    would get different indices with probability ``1 - sum_k probs[k, p] * probs[k, q]``; this is
    its mean over the horizontally and over the vertically neighbouring pairs, averaged over the two
    directions (a direction without pairs, ``W = 1`` or ``H = 1``, is left out; 0 for a single
    pixel). On one-hot probabilities it is the index map's boundary fraction, the quantity deflate's
    match lengths and therefore the PNG's size follow; minimizing it merges small regions and
    straightens edges.

    Args:
        probs: ``[B, K, H, W]`` per-pixel colour probabilities (softmax over K).

    Returns:
        A scalar in ``[0, 1]``, differentiable w.r.t. ``probs``.
    """
    _check_tensor(probs, "probs", 4)
    terms = []
    if probs.shape[3] > 1:
        terms.append(1 - (probs[..., 1:] * probs[..., :-1]).sum(dim=1).mean())
    if probs.shape[2] > 1:
        terms.append(1 - (probs[:, :, 1:] * probs[:, :, :-1]).sum(dim=1).mean())
    return torch.stack(terms).mean() if terms else probs.sum() * 0


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Knowledge distillation (Hinton et al., 2015) from the classifier on the original image.

    ``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch: the frozen
    classifier's whole class distribution on the full-colour image is the target of its distribution
    on the quantized one (the ``T**2`` keeps the gradient's scale roughly independent of ``T``). The teacher
    is a constant (no gradient reaches it). 0 when the two distributions agree.

    Args:
        student_logits: ``[B, N]`` the classifier's logits on the quantized images.
        teacher_logits: ``[B, N]`` its logits on the original images.
        temperature: ``T > 0``, softens both distributions.

    Returns:
        A scalar, differentiable w.r.t. ``student_logits``.
    """
    temperature = _check_float(temperature, "temperature", positive=True)
    for x, name in ((student_logits, "student_logits"), (teacher_logits, "teacher_logits")):
        _check_tensor(x, name, 2)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bfloat16 logits under autocast: float32
    student = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
    return temperature ** 2 * F.kl_div(student, teacher, reduction="batchmean", log_target=True)


def _distillation_term(weight: float, temperature: float, logits_cls: Tensor, teacher_logits: Optional[Tensor]):
    """The ``("distillation", weight, compute)`` entry of :func:`_weighted_total`; a weight above 0 needs
    the teacher's logits, and without them (weight 0) the logged value is 0."""
    if teacher_logits is None:
        if weight != 0.0:
            raise ValueError("distill > 0 needs teacher_logits: the classifier's logits on the original images")
        return "distillation", 0.0, lambda: logits_cls.new_zeros(())
    return "distillation", weight, lambda: distillation_loss(logits_cls, teacher_logits, temperature)


def soft_palette(image: Tensor, probs: Tensor, eps: float = 1e-8) -> Tensor:
    """``[B, K, C]`` probability-weighted mean colour of each index:
    ``sum_p probs[b,k,p] * image[b,c,p] / (sum_p probs[b,k,p] + eps)`` -- the
    palette ColorCNN recolours with in training, before ``color_norm`` and
    ``color_jitter``. Differentiable w.r.t. both inputs."""
    _check_tensor(image, "image", 4)
    _check_tensor(probs, "probs", 4)
    _check_pair(image, probs)
    B, K = probs.shape[:2]
    p = probs.reshape(B, K, -1)
    num = torch.bmm(p, image.reshape(B, image.shape[1], -1).transpose(1, 2))  # [B, K, C]
    return num / (p.sum(dim=2, keepdim=True) + eps)


def _check_pair(image: Tensor, probs: Tensor) -> None:
    if image.shape[0] != probs.shape[0] or image.shape[2:] != probs.shape[2:]:
        raise ValueError(
            f"image [B, C, H, W] and probs [B, K, H, W] must agree in B, H and W, "
            f"got {tuple(image.shape)} and {tuple(probs.shape)}"
        )


def color_variance_loss(image: Tensor, probs: Tensor, palette: Optional[Tensor] = None) -> Tensor:
    """Probability-weighted spread of the pixels around their colours.

    ``mean_{b,c,p} sum_k probs[b,k,p] * (image[b,c,p] - palette[b,k,c])**2``:
    the expected squared error, per pixel and channel, of recolouring a pixel
    with a colour drawn from its probabilities (the soft k-means distortion).
    It is 0 when every pixel equals its palette colour under one-hot
    probabilities.

    Normalization: per pixel (every pixel weighs the same). The authors' code
    (``color_var`` in ``trainer.py``, the ``beta`` term, off by default) instead
    normalizes per colour -- ``sum_p probs * (.)**2 / (sum_p probs + 1e-8)``,
    averaged over b, c, k, so a colour covering few pixels weighs as much as
    one covering many -- and squares ``image * probs - palette`` rather than
    ``image - palette``, which looks unintended; neither is reproduced here.

    Args:
        image: ``[B, C, H, W]`` image the colours come from.
        probs: ``[B, K, H, W]`` per-pixel colour probabilities.
        palette: ``[B, K, C]`` colours; ``None`` (the default) uses
            :func:`soft_palette` ``(image, probs)``.

    Returns:
        A scalar, differentiable w.r.t. all inputs.
    """
    _check_tensor(image, "image", 4)
    _check_tensor(probs, "probs", 4)
    _check_pair(image, probs)
    B, C = image.shape[:2]
    K = probs.shape[1]
    if palette is None:
        palette = soft_palette(image, probs)
    _check_tensor(palette, "palette", 3)
    if tuple(palette.shape) != (B, K, C):
        raise ValueError(f"palette must have shape [B, K, C] = {(B, K, C)}, got {tuple(palette.shape)}")
    # sum_k p (x - c)^2 = x^2 sum_k p - 2 x sum_k p c + sum_k p c^2 would avoid the
    # [B, K, C, H, W] difference but cancels badly; K * C is small, so expand.
    diff = image.unsqueeze(1) - palette.unsqueeze(-1).unsqueeze(-1)  # [B, K, C, H, W]
    sq = (probs.unsqueeze(2) * diff.square()).sum(dim=1)  # [B, C, H, W]
    return sq.mean()


def _weighted_total(cross_entropy: Tensor, terms) -> Tuple[Tensor, Dict[str, float]]:
    """``cross_entropy + sum weight * term`` over ``terms`` (``(name, weight, compute)``) and the log dict
    ``{"total", "cross_entropy", name...}`` of unweighted values. A term with weight 0 is computed for
    the log without gradient and not added, so with every weight 0 the total is the cross-entropy."""
    total, values = cross_entropy, [cross_entropy]
    for _, weight, compute in terms:
        if weight != 0.0:
            term = compute()
            total = total + weight * term
        else:
            with torch.no_grad():
                term = compute()
        values.append(term)
    floats = torch.stack([t.detach().float() for t in (total, *values)]).tolist()  # one device sync
    return total, dict(zip(("total", "cross_entropy", *(name for name, _, _ in terms)), floats))


class ColorCNNLoss(nn.Module):
    """The objective of ColorCNN against a frozen classifier.

    ``total = CE(logits_cls, target) + alpha * color_usage_loss(probs)
    + beta * color_variance_loss(image, probs) + gamma * MSE(quantized, image)
    + boundary * boundary_loss(probs) + distill * distillation_loss(logits_cls, teacher_logits)``
    with the paper's defaults ``alpha=1, beta=0, gamma=0`` (and ``boundary=0, distill=0``).

    * The colour-variance term measures the pixels against :func:`soft_palette`
      ``(image, probs)``, not ``output.palette``: in training the latter is
      divided by ``color_norm`` and shifted by the random ``color_jitter``,
      which would make the term noisy and scale-dependent.
    * The reconstruction term uses ``output.quantized`` as it is (in training
      with ``color_norm`` and ``color_jitter`` applied), like the authors' code.
    * Terms with a zero coefficient are still computed for the log, without
      gradient, and are not added: with ``alpha = beta = gamma = 0`` the total
      is exactly the cross-entropy.

    Works on training-mode and evaluation-mode outputs of
    :class:`~colorquant_ops.ColorCNN` alike (only ``quantized`` and ``probs``
    are used).

    Args:
        alpha: weight of the colour-usage term, >= 0.
        beta: weight of the colour-variance term, >= 0.
        gamma: weight of the reconstruction MSE, >= 0.
        boundary: weight of :func:`boundary_loss`, >= 0 (not in the paper: smaller palette PNGs).
        label_smoothing: passed to :func:`torch.nn.functional.cross_entropy`.
        distill: weight of :func:`distillation_loss`, >= 0 (not in the paper); above 0 the forward
            needs ``teacher_logits``, the classifier's logits on the original images.
        distill_temperature: its temperature, > 0.

    Returns (forward):
        ``(total, terms)``: ``total`` a differentiable scalar; ``terms`` a dict
        of Python floats ``{"total", "cross_entropy", "color_usage",
        "color_variance", "reconstruction", "boundary", "distillation"}`` (unweighted terms) for
        logging.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.0, gamma: float = 0.0, label_smoothing: float = 0.0,
                 boundary: float = 0.0, distill: float = 0.0, distill_temperature: float = 1.0) -> None:
        super().__init__()
        self.alpha = _check_float(alpha, "alpha", positive=False)
        self.beta = _check_float(beta, "beta", positive=False)
        self.gamma = _check_float(gamma, "gamma", positive=False)
        self.boundary = _check_float(boundary, "boundary", positive=False)
        self.distill = _check_float(distill, "distill", positive=False)
        self.distill_temperature = _check_float(distill_temperature, "distill_temperature", positive=True)
        self.label_smoothing = _check_float(label_smoothing, "label_smoothing", positive=False)
        if self.label_smoothing > 1:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, label_smoothing={self.label_smoothing}, "
                f"boundary={self.boundary}, distill={self.distill}, distill_temperature={self.distill_temperature}")

    def forward(
        self, logits_cls: Tensor, target: Tensor, output: ColorCNNOutput, image: Tensor,
        teacher_logits: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Dict[str, float]]:
        if not isinstance(output, ColorCNNOutput):
            raise TypeError(f"output must be a ColorCNNOutput, got {type(output).__name__}")
        _check_tensor(image, "image", 4)
        if output.quantized.shape != image.shape:
            raise ValueError(
                f"output.quantized {tuple(output.quantized.shape)} and image {tuple(image.shape)} "
                "must have the same shape"
            )
        ce = F.cross_entropy(logits_cls, target, label_smoothing=self.label_smoothing)
        return _weighted_total(ce, (
            ("color_usage", self.alpha, lambda: color_usage_loss(output.probs)),
            ("color_variance", self.beta, lambda: color_variance_loss(image, output.probs)),
            ("reconstruction", self.gamma, lambda: F.mse_loss(output.quantized, image)),
            ("boundary", self.boundary, lambda: boundary_loss(output.probs)),
            _distillation_term(self.distill, self.distill_temperature, logits_cls, teacher_logits),
        ))


def cluster_imitation_loss(logits: Tensor, image: Tensor, palette: Tensor) -> Tensor:
    """ColorCNN+'s cluster-imitation term: the assignment should be a clustering step's.

    The target of pixel ``p`` is the index of the palette colour nearest to its own colour,
    ``argmin_k |image[b,:,p] - palette[b,k]|^2`` -- the assignment step of k-means, the one thing
    every clustering quantizer does -- and the loss is the cross-entropy of the assignment logits
    against it, averaged over pixels. The target is a constant (no gradient through ``image`` or
    ``palette``), so the term only teaches the network's assignment to imitate it; with the palette
    made of the pixels' own mean colours, a network that met it everywhere would be at a fixed point
    of Lloyd's algorithm. (A permutation-free target: no matching between the network's colours and
    another quantizer's is needed.)

    Args:
        logits: ``[B, K, H, W]`` assignment logits (e.g. ``ColorCNNPlus(..., return_logits=True)``).
        image: ``[B, C, H, W]`` the pixels' colours.
        palette: ``[B, K, C]`` the colours the pixels are recoloured with.

    Returns:
        A scalar, differentiable w.r.t. ``logits``.
    """
    _check_tensor(logits, "logits", 4)
    _check_tensor(image, "image", 4)
    _check_tensor(palette, "palette", 3)
    _check_pair(image, logits)
    B, K = logits.shape[:2]
    if tuple(palette.shape) != (B, K, image.shape[1]):
        raise ValueError(f"palette must have shape [B, K, C] = {(B, K, image.shape[1])}, got {tuple(palette.shape)}")
    with torch.no_grad():
        target = palette_distance(image.detach(), palette.detach().to(image.dtype)).argmin(dim=1)
    return F.cross_entropy(logits.float(), target)


class ColorCNNPlusLoss(nn.Module):
    """The objective of :class:`~colorquant_ops.models.ColorCNNPlus` against a frozen classifier.

    ``total = CE(logits_cls, target) + imitation * log2(K) / 8 * cluster_imitation_loss(logits, image,
    palette) + alpha * color_usage_loss(probs) + boundary_weight(K) * boundary_loss(probs)
    + distill * distillation_loss(logits_cls, teacher_logits)``. The
    imitation weight grows with the number of colours, from ``imitation / 8`` at K = 2 to
    ``imitation`` at K = 256: at one bit the classifier's signal should decide the structure, at many
    colours the image's own colours (the aims of the ColorCNN+ paper: network supervision in small
    colour spaces, clustering in large ones).

    Args:
        imitation: weight of the cluster-imitation term at K = 256, >= 0 (0: no imitation, the
            ablation of RESULTS.md).
        alpha: weight of ColorCNN's colour-usage term, >= 0 (default 0: the k-means centres already
            use every colour).
        label_smoothing: passed to :func:`torch.nn.functional.cross_entropy`.
        boundary: weight of :func:`boundary_loss`, >= 0 (default 0; it makes the index maps cheaper
            to store, see RESULTS.md).
        boundary_schedule: how the boundary weight depends on K (:data:`BOUNDARY_SCHEDULES`):
            ``"constant"`` (``boundary`` at every K), ``"log2"`` (``boundary * log2(K) / 8``, the
            full weight at K = 256), ``"inverse-log2"`` (``boundary / log2(K)``, the full weight at
            K = 2) or ``"inverse"`` (``boundary * 2 / K``, the full weight at K = 2, halved with each
            bit). Measured (RESULTS.md): a constant weight that brings the PNGs to k-means' size
            at two or four colours removes far more boundaries than needed at 64.
        distill, distill_temperature: as :class:`ColorCNNLoss`'s.

    Returns (forward):
        ``(total, terms)``: the differentiable total and a dict of Python floats ``{"total",
        "cross_entropy", "imitation", "color_usage", "boundary", "distillation"}`` (unweighted terms).
    """

    def __init__(self, imitation: float = 1.0, alpha: float = 0.0, label_smoothing: float = 0.0,
                 boundary: float = 0.0, boundary_schedule: str = "constant", distill: float = 0.0,
                 distill_temperature: float = 1.0) -> None:
        super().__init__()
        self.imitation = _check_float(imitation, "imitation", positive=False)
        self.alpha = _check_float(alpha, "alpha", positive=False)
        self.boundary = _check_float(boundary, "boundary", positive=False)
        self.distill = _check_float(distill, "distill", positive=False)
        self.distill_temperature = _check_float(distill_temperature, "distill_temperature", positive=True)
        if boundary_schedule not in BOUNDARY_SCHEDULES:
            raise ValueError(f"boundary_schedule must be one of {', '.join(BOUNDARY_SCHEDULES)}, "
                             f"got {boundary_schedule!r}")
        self.boundary_schedule = boundary_schedule
        self.label_smoothing = _check_float(label_smoothing, "label_smoothing", positive=False)
        if self.label_smoothing > 1:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")

    def extra_repr(self) -> str:
        return (f"imitation={self.imitation}, alpha={self.alpha}, label_smoothing={self.label_smoothing}, "
                f"boundary={self.boundary}, boundary_schedule={self.boundary_schedule!r}, distill={self.distill}, "
                f"distill_temperature={self.distill_temperature}")

    def imitation_weight(self, num_colors: int) -> float:
        """The weight of the imitation term at ``num_colors`` colours: ``imitation * log2(K) / 8``."""
        return self.imitation * math.log2(num_colors) / 8

    def boundary_weight(self, num_colors: int) -> float:
        """The weight of the boundary term at ``num_colors`` colours (see ``boundary_schedule``)."""
        bits = math.log2(num_colors)
        scale = {"constant": 1.0, "log2": bits / 8, "inverse-log2": 1 / bits, "inverse": 2 / num_colors}
        return self.boundary * scale[self.boundary_schedule]

    def forward(self, logits_cls: Tensor, target: Tensor, output: ColorCNNOutput, image: Tensor,
                logits: Tensor, teacher_logits: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, float]]:
        if not isinstance(output, ColorCNNOutput):
            raise TypeError(f"output must be a ColorCNNOutput, got {type(output).__name__}")
        _check_tensor(logits, "logits", 4)
        ce = F.cross_entropy(logits_cls, target, label_smoothing=self.label_smoothing)
        return _weighted_total(ce, (
            ("imitation", self.imitation_weight(logits.shape[1]),
             lambda: cluster_imitation_loss(logits, image, output.palette)),
            ("color_usage", self.alpha, lambda: color_usage_loss(output.probs)),
            ("boundary", self.boundary_weight(logits.shape[1]), lambda: boundary_loss(output.probs)),
            _distillation_term(self.distill, self.distill_temperature, logits_cls, teacher_logits),
        ))
