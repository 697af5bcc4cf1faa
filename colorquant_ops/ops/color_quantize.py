"""Public wrappers of the fused colour-quantization ops (``torch.ops.colorquant``),
with their fake (meta) implementations for ``torch.compile`` and their autograd.

Argument validation lives in the C++ kernels (``csrc/common/checks.h``) so that
direct ``torch.ops.colorquant`` calls get the same clear errors.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _extension  # noqa: F401  (loads the kernels or says how to build them)
from . import fake_checks

_ops = torch.ops.colorquant


class SoftQuantized(NamedTuple):
    """Result of :func:`soft_color_quantize`."""

    quantized: Tensor  #: ``[B,C,H,W]`` soft recolouring, dtype of ``image``
    palette: Tensor  #: ``[B,K,C]`` probability-weighted mean colours
    probs: Tensor  #: ``[B,K,H,W]`` softmax over the K colours, dtype of ``logits``


class HardQuantized(NamedTuple):
    """Result of :func:`hard_color_quantize`."""

    quantized: Tensor  #: ``[B,C,H,W]`` = ``render_index_map(index_map, palette)``
    index_map: Tensor  #: ``[B,H,W]`` int64 colour index of each pixel
    palette: Tensor  #: ``[B,K,C]`` mean colour of each index, zeros if unused


def _require_tensor(x, name):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _require_number(x, name):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(x).__name__}")
    return float(x)


# --- index maps known to be valid: render_index_map skips its range check (a
# device-to-host sync on CUDA) for them.
#
# An index map returned by hard_color_quantize, kmeans_palette or
# floyd_steinberg_dither holds indices in [0, K) by construction. The wrapper
# records (K, version counter) on the tensor; as long as nobody writes to it
# in place (which bumps the version counter), render_index_map with a palette
# of at least K colours needs no check. Anything else -- another tensor, a
# view, a copy, .to(device), an inference-mode tensor (no version counter) or
# code being traced by torch.compile -- is checked as usual. (Writes that
# bypass the version counter, through ``.data`` or raw pointers, are not seen;
# on CUDA such an index then renders as zeros, it is never read out of bounds.)
_VALID_MARK = "_colorquant_valid_below"


def _mark_valid(index_map: Tensor, num_colors: int) -> Tensor:
    if not torch.compiler.is_compiling() and not index_map.is_inference():
        setattr(index_map, _VALID_MARK, (int(num_colors), index_map._version))
    return index_map


def _known_valid(index_map: Tensor, palette: Tensor) -> bool:
    if torch.compiler.is_compiling() or index_map.is_inference() or palette.dim() != 3:
        return False
    mark = getattr(index_map, _VALID_MARK, None)
    return mark is not None and mark[0] <= palette.shape[1] and mark[1] == index_map._version


def soft_color_quantize(logits: Tensor, image: Tensor, temperature: float = 1.0, eps: float = 1e-8) -> SoftQuantized:
    r"""Differentiable colour quantization (the training path of ColorCNN), fused.

    .. math::
        \text{probs} = \operatorname{softmax}_k(\text{temperature}\cdot\text{logits}),\quad
        \text{palette}_{bkc} = \frac{\sum_p \text{probs}_{bkp}\,\text{image}_{bcp}}{\sum_p \text{probs}_{bkp} + \varepsilon},\quad
        \text{quantized}_{bcp} = \sum_k \text{probs}_{bkp}\,\text{palette}_{bkc}

    Args:
        logits: ``[B,K,H,W]`` colour scores, ``1 <= K <= 256``.
        image: ``[B,C,H,W]`` image, same dtype and device as ``logits``.
        temperature: factor applied to the logits before the softmax (> 0).
        eps: added to each colour's total probability (>= 0).

    Returns:
        :class:`SoftQuantized` ``(quantized, palette, probs)``; gradients flow to
        ``logits`` and ``image``.
    """
    _require_tensor(logits, "logits")
    _require_tensor(image, "image")
    temperature = _require_number(temperature, "temperature")
    eps = _require_number(eps, "eps")
    return SoftQuantized(*_ops.soft_color_quantize(logits, image, temperature, eps))


def hard_color_quantize(logits: Tensor, image: Tensor) -> HardQuantized:
    """Inference-time colour quantization: argmax index map and mean palette.

    ``index_map[b,h,w] = argmax_k logits[b,k,h,w]`` (the lowest k wins a tie),
    ``palette[b,k]`` is the mean of the image over the pixels of index ``k``
    (zeros for an unused colour) and ``quantized`` is the palette gathered by
    the index map. Not differentiable: the outputs never require grad.
    """
    _require_tensor(logits, "logits")
    _require_tensor(image, "image")
    quantized, index_map, palette = _ops.hard_color_quantize(logits.detach(), image.detach())
    return HardQuantized(quantized, _mark_valid(index_map, logits.shape[1]), palette)


def render_index_map(index_map: Tensor, palette: Tensor, *, check_indices: bool | None = None) -> Tensor:
    """Decode an (index map, palette) pair: ``image[b,c,h,w] = palette[b, index_map[b,h,w], c]``.

    ``index_map`` is int64 ``[B,H,W]`` with values in ``[0, K)``, ``palette`` is
    ``[B,K,C]``. Differentiable w.r.t. ``palette``.

    Args:
        check_indices: raise IndexError for an index outside ``[0, K)``. On
            CUDA the check waits for the GPU (a device-to-host copy), so the
            default ``None`` checks only index maps that are not known to be
            valid: those returned by :func:`hard_color_quantize`,
            :func:`kmeans_palette` or :func:`floyd_steinberg_dither` and not
            modified in place since are not checked again. ``False`` never
            checks (then an out-of-range index renders zeros on CUDA and gets
            no gradient; the CPU checks anyway, at no cost). Under CUDA graph
            capture the check is always skipped, as a sync cannot be captured.
            The backward never checks again.
    """
    _require_tensor(index_map, "index_map")
    _require_tensor(palette, "palette")
    if check_indices is None:
        check_indices = not _known_valid(index_map, palette)
    return _ops.render_index_map(index_map, palette, bool(check_indices))


def palette_distance(image: Tensor, palette: Tensor) -> Tensor:
    r"""Squared Euclidean distance of every pixel to every palette colour, fused.

    .. math::
        \text{out}_{bkhw} = \sum_c (\text{image}_{bchw} - \text{palette}_{bkc})^2

    The distance-to-palette softmax of ColorCNN+ (``logits = -beta * out``) and
    its nearest-colour target (``out.argmin(1)``) are built from it. Computed
    without the ``[B,K,C,H,W]`` difference tensor, in float32 for float16 /
    bfloat16 inputs (float64 for float64), deterministic.

    Args:
        image: ``[B,C,H,W]`` floating-point image, ``C >= 1``.
        palette: ``[B,K,C]`` palette, ``1 <= K <= 256``, same dtype and device as ``image``.

    Returns:
        ``[B,K,H,W]`` distances, dtype of ``image``. Differentiable w.r.t. both
        inputs (closed-form backward kernels), twice as well:
        ``grad_image[b,c,p] = 2 sum_k grad[b,k,p] (image[b,c,p] - palette[b,k,c])``,
        ``grad_palette[b,k,c] = -2 sum_p grad[b,k,p] (image[b,c,p] - palette[b,k,c])``.
    """
    _require_tensor(image, "image")
    _require_tensor(palette, "palette")
    return _ops.palette_distance(image, palette)


# --- fake (meta) implementations: output shapes only, so torch.compile traces
# the ops without graph breaks (outputs are always contiguous, like the kernels').


@torch.library.register_fake("colorquant::soft_color_quantize")
def _soft_fake(logits, image, temperature=1.0, eps=1e-8):
    fake_checks.check_logits_image(logits, image)
    fake_checks.check_temperature_eps(temperature, eps)
    B, K, H, W = logits.shape
    C = image.shape[1]
    return image.new_empty(B, C, H, W), image.new_empty(B, K, C), logits.new_empty(B, K, H, W)


@torch.library.register_fake("colorquant::soft_color_quantize_backward")
def _soft_backward_fake(grad_quantized, grad_palette, grad_probs, probs, image, palette, temperature, eps):
    fake_checks.check_soft_backward(grad_quantized, grad_palette, grad_probs, probs, image, palette, temperature, eps)
    return torch.empty_like(probs, memory_format=torch.contiguous_format), torch.empty_like(
        image, memory_format=torch.contiguous_format
    )


@torch.library.register_fake("colorquant::hard_color_quantize")
def _hard_fake(logits, image):
    fake_checks.check_logits_image(logits, image)
    B, K, H, W = logits.shape
    C = image.shape[1]
    return image.new_empty(B, C, H, W), logits.new_empty(B, H, W, dtype=torch.long), image.new_empty(B, K, C)


@torch.library.register_fake("colorquant::render_index_map")
def _render_fake(index_map, palette, check_indices=True):
    fake_checks.check_index_palette(index_map, palette)  # the index range needs the values: kernels only
    B, H, W = index_map.shape
    return palette.new_empty(B, palette.shape[2], H, W)


@torch.library.register_fake("colorquant::render_index_map_backward")
def _render_backward_fake(grad_image, index_map, palette, check_indices=True):
    fake_checks.check_render_backward(grad_image, index_map, palette)
    return torch.empty_like(palette, memory_format=torch.contiguous_format)


@torch.library.register_fake("colorquant::palette_distance")
def _distance_fake(image, palette):
    fake_checks.check_image_palette(image, palette)
    B, _, H, W = image.shape
    return image.new_empty(B, palette.shape[1], H, W)


@torch.library.register_fake("colorquant::palette_distance_backward")
def _distance_backward_fake(grad, image, palette):
    fake_checks.check_palette_distance_backward(grad, image, palette)
    return torch.empty_like(image, memory_format=torch.contiguous_format), torch.empty_like(
        palette, memory_format=torch.contiguous_format
    )


# --- autograd: closed-form backward kernels (see csrc/common/color_math.h).


def _soft_setup_context(ctx, inputs, output):
    _, image, temperature, eps = inputs
    _, palette, probs = output
    ctx.save_for_backward(probs, image, palette)
    ctx.temperature = temperature
    ctx.eps = eps
    # The gradient of an unused output arrives as None, not as zeros: the
    # backward op takes None for zeros, so no [B,K,H,W] zero tensor is made.
    ctx.set_materialize_grads(False)


def _soft_backward(ctx, grad_quantized, grad_palette, grad_probs):
    probs, image, palette = ctx.saved_tensors
    # Grad mode is on in a backward only under create_graph=True. The closed-form
    # backward kernel is not itself differentiable: refuse rather than let second
    # derivatives through this op silently come out as zeros.
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (grad_quantized, grad_palette, grad_probs, probs, image, palette)
    ):
        raise RuntimeError(
            "soft_color_quantize does not support double backward (create_graph=True through it); "
            "use colorquant_ops.ops.reference.soft_color_quantize where second derivatives are needed"
        )
    grad_logits, grad_image = _ops.soft_color_quantize_backward(
        grad_quantized, grad_palette, grad_probs, probs, image, palette, ctx.temperature, ctx.eps
    )
    return (
        grad_logits if ctx.needs_input_grad[0] else None,
        grad_image if ctx.needs_input_grad[1] else None,
        None,
        None,
    )


torch.library.register_autograd(
    "colorquant::soft_color_quantize", _soft_backward, setup_context=_soft_setup_context
)


def _render_setup_context(ctx, inputs, output):
    index_map, palette = inputs[:2]
    ctx.save_for_backward(index_map, palette)


# No second range check (no host sync) in the backward: the forward checked if
# asked to, and an unchecked out-of-range index, rendered as zeros, has no
# palette entry to receive a gradient.
def _render_backward(ctx, grad_image):
    index_map, palette = ctx.saved_tensors
    grad_palette = None
    if ctx.needs_input_grad[1]:
        grad_palette = _ops.render_index_map_backward(grad_image, index_map, palette, False)
    return None, grad_palette, None


torch.library.register_autograd("colorquant::render_index_map", _render_backward, setup_context=_render_setup_context)


# render_index_map_backward is linear in grad_image (a per-index sum, the adjoint
# of the gather), so its own gradient is the gather again: double backward works.
def _render_backward_setup_context(ctx, inputs, output):
    index_map = inputs[1]
    ctx.save_for_backward(index_map)


def _render_backward_backward(ctx, grad_grad_palette):
    (index_map,) = ctx.saved_tensors
    grad_grad_image = None
    if ctx.needs_input_grad[0]:
        grad_grad_image = _ops.render_index_map(index_map, grad_grad_palette, False)
    return grad_grad_image, None, None, None


torch.library.register_autograd(
    "colorquant::render_index_map_backward", _render_backward_backward, setup_context=_render_backward_setup_context
)


# palette_distance: closed-form backward kernel (csrc/common/palette_math.h).
def _distance_setup_context(ctx, inputs, output):
    image, palette = inputs
    ctx.save_for_backward(image, palette)


def _distance_backward(ctx, grad):
    image, palette = ctx.saved_tensors
    if not any(ctx.needs_input_grad):
        return None, None
    grad_image, grad_palette = _ops.palette_distance_backward(grad, image, palette)
    return (
        grad_image if ctx.needs_input_grad[0] else None,
        grad_palette if ctx.needs_input_grad[1] else None,
    )


torch.library.register_autograd(
    "colorquant::palette_distance", _distance_backward, setup_context=_distance_setup_context
)


# Double backward: palette_distance_backward is linear in grad and bilinear in
# (image, palette) differences, so its own gradient is a few contractions in
# plain torch ops (themselves differentiable). With u = the gradient of grad_image
# [B,C,H,W], w = that of grad_palette [B,K,C] and d[b,k,c,p] = image[b,c,p] - palette[b,k,c]:
#   d/dgrad[b,k,p]     = 2 sum_c (u[b,c,p] - w[b,k,c]) d[b,k,c,p]
#   d/dimage[b,c,p]    = 2 (u[b,c,p] sum_k grad[b,k,p] - sum_k grad[b,k,p] w[b,k,c])
#   d/dpalette[b,k,c]  = 2 (w[b,k,c] sum_p grad[b,k,p] - sum_p grad[b,k,p] u[b,c,p])
# (einsums over c, k or p: no [B,K,C,H,W] tensor).
def _distance_backward_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _distance_backward_backward(ctx, gg_image, gg_palette):
    grad, image, palette = ctx.saved_tensors
    need_grad, need_image, need_palette = ctx.needs_input_grad
    u = torch.zeros_like(image) if gg_image is None else gg_image
    w = torch.zeros_like(palette) if gg_palette is None else gg_palette
    d_grad = d_image = d_palette = None
    if need_grad:
        d_grad = 2 * (
            torch.einsum("bchw,bchw->bhw", u, image)[:, None]
            - torch.einsum("bchw,bkc->bkhw", u, palette)
            - torch.einsum("bkc,bchw->bkhw", w, image)
            + (w * palette).sum(-1)[:, :, None, None]
        )
    if need_image:
        d_image = 2 * (u * grad.sum(1, keepdim=True) - torch.einsum("bkhw,bkc->bchw", grad, w))
    if need_palette:
        d_palette = 2 * (w * grad.sum((2, 3))[..., None] - torch.einsum("bkhw,bchw->bkc", grad, u))
    return d_grad, d_image, d_palette


torch.library.register_autograd(
    "colorquant::palette_distance_backward",
    _distance_backward_backward,
    setup_context=_distance_backward_setup_context,
)
