"""Public wrappers of the palette ops (``torch.ops.colorquant``): batched k-means
palette extraction and Floyd-Steinberg dithering onto a palette, with their fake
(meta) implementations for ``torch.compile``.

Neither op is differentiable (their outputs are indices, or cluster means chosen
by a discrete search); the wrappers detach their inputs and the outputs never
require grad. Argument validation lives in the C++ kernels
(``csrc/common/checks.h``) so that direct ``torch.ops.colorquant`` calls get the
same clear errors; the wrappers add the Python-side type checks.
"""

import operator
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _extension  # noqa: F401  (loads the kernels or says how to build them)
from . import fake_checks
from .color_quantize import _mark_valid, _require_number, _require_tensor

_ops = torch.ops.colorquant


class KMeansPalette(NamedTuple):
    """Result of :func:`kmeans_palette`."""

    index_map: Tensor  #: ``[B,H,W]`` int64 index of each pixel's nearest palette colour
    palette: Tensor  #: ``[B,K,C]`` cluster centres, dtype of ``image``


def _require_int(x, name):
    """An int that fits the ops' int64 arguments (a ValueError naming ``name`` otherwise)."""
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(x).__name__}") from None
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must fit in a 64-bit signed integer, got {value}")
    return value


def kmeans_palette(image: Tensor, num_colors: int, iters: int = 10, seed: int = 0) -> KMeansPalette:
    """Batched k-means colour palette: each image's ``H*W`` pixels, points in ``R^C``, in ``num_colors`` clusters.

    Seeding is k-means++: the first centre is a pixel drawn uniformly, each next
    one a pixel drawn with probability proportional to its squared distance to
    the nearest centre so far (when every pixel already coincides with a centre
    -- fewer distinct colours than ``K``, or ``K > H*W`` -- a pixel is drawn
    uniformly, duplicating a colour). Then ``iters`` Lloyd iterations: assign each
    pixel to the nearest centre (a tie goes to the lowest index), move each centre
    to the mean of its pixels (an empty cluster keeps its centre). A final
    assignment makes ``index_map`` the nearest-colour map of the returned
    palette (as rounded to the image's dtype).

    The result is a deterministic function of ``(image, num_colors, iters,
    seed)``, image by image: the random draws are a counter-based hash of
    ``(seed, draw)`` -- not of the image's position in the batch, so an image
    gets the same palette alone or in any batch -- and every sum is taken in a
    fixed order, whatever the number of threads, and on the CPU and CUDA alike,
    bit for bit. Sums are accumulated in float32 for float16/bfloat16/float32
    images, float64 for float64 images.

    Args:
        image: ``[B,C,H,W]`` floating-point image (convert integer images
            first, e.g. ``image.float() / 255``), finite: NaN or inf pixels are
            a ValueError, as for every quantizer of the library (one pass over
            the image; on CUDA it waits for the GPU).
        num_colors: palette size ``K`` in ``[1, 256]``; may exceed ``H*W``.
        iters: number of Lloyd iterations (>= 0; 0 returns the seeding).
        seed: seed of the k-means++ draws.

    Returns:
        :class:`KMeansPalette` ``(index_map [B,H,W] int64, palette [B,K,C])``.
        An image with no pixels gets a palette of zeros.
    """
    _require_tensor(image, "image")
    num_colors = _require_int(num_colors, "num_colors")
    iters = _require_int(iters, "iters")
    seed = _require_int(seed, "seed")
    index_map, palette = _ops.kmeans_palette(image.detach(), num_colors, iters, seed)
    return KMeansPalette(_mark_valid(index_map, num_colors), palette)


def floyd_steinberg_dither(image: Tensor, palette: Tensor, *, clamp=None) -> Tensor:
    """Floyd-Steinberg error diffusion of each image onto its palette: ``[B,H,W]`` int64 indices.

    Pixels are visited in raster order; each takes ``value = pixel + accumulated
    error`` (clamped to ``clamp = (low, high)`` if given, as the seed paper's code
    clamps to [0, 255]), the nearest palette colour ``k`` by squared Euclidean
    distance (a tie goes to the lowest ``k``), and diffuses ``value - palette[k]``
    with the weights 7/16 to the right, 3/16 down-left, 5/16 down and 1/16
    down-right (weights falling outside the image are dropped). The result is
    that of the straightforward loop
    (:func:`colorquant_ops.quantizers.reference.floyd_steinberg_reference`),
    with the errors kept in float32 (float64 for float64 images).
    ``render_index_map(index_map, palette)`` is the dithered image.

    Args:
        image: ``[B,C,H,W]`` floating-point image, finite (NaN or inf pixels are a ValueError).
        palette: ``[B,K,C]`` palette, ``1 <= K <= 256``, same dtype and device as ``image``.
        clamp: ``None`` (no clamping, the default) or ``(low, high)``, e.g. ``(0, 1)`` for
            images in [0, 1]; either bound may be None.
    """
    _require_tensor(image, "image")
    _require_tensor(palette, "palette")
    low, high = _clamp_bounds(clamp)
    index_map = _ops.floyd_steinberg_dither(image.detach(), palette.detach(), low, high)
    return _mark_valid(index_map, palette.shape[1])


def _clamp_bounds(clamp):
    if clamp is None:
        return None, None
    try:
        low, high = clamp
    except (TypeError, ValueError):
        raise TypeError(f"clamp must be None or a (low, high) pair, got {clamp!r}") from None
    return tuple(None if v is None else _require_number(v, "clamp") for v in (low, high))


# --- fake (meta) implementations: output shapes only, so torch.compile traces
# the ops without graph breaks (outputs are always contiguous, like the kernels').


@torch.library.register_fake("colorquant::kmeans_palette")
def _kmeans_fake(image, num_colors, iters=10, seed=0):
    fake_checks.check_kmeans_args(image, num_colors, iters)  # NaN pixels need the values: kernels only
    B, C, H, W = image.shape
    return image.new_empty(B, H, W, dtype=torch.long), image.new_empty(B, num_colors, C)


@torch.library.register_fake("colorquant::floyd_steinberg_dither")
def _dither_fake(image, palette, clamp_min=None, clamp_max=None):
    fake_checks.check_image_palette(image, palette)
    fake_checks.check_clamp(clamp_min, clamp_max)
    B, _, H, W = image.shape
    return image.new_empty(B, H, W, dtype=torch.long)
