"""Shared helpers of the colorquant_ops tests: input generators, memory layouts,
hypothesis strategies and the error tolerances of each dtype.

Every comparison is against the float64 oracle :mod:`colorquant_ops.ops.reference`,
evaluated on exactly the values the kernel saw (inputs already rounded to the
tested dtype), so the tolerances below only have to cover the kernels' own
rounding. They are derived from first-order error bounds, not tuned:

* ``u``: unit roundoff of the accumulation type (float32 for float32, float16
  and bfloat16 inputs; float64 for float64 inputs).
* ``rho``: relative error of one probability. ``z = temperature * logits`` is
  rounded, so the shifted softmax argument has an absolute error up to about
  ``2 u |z|max``, i.e. a relative error of ``exp`` of ``2 u |z|max`` per term and
  twice that after normalisation; plus the error of ``exp`` itself.
* sums over ``n`` pixels: ``8 sqrt(n) u`` relative to the magnitude of the terms
  (the kernels sum in fixed-size chunks; worst case grows like ``n u``, the
  observed error like ``sqrt(n) u``).
* outputs rounded to float16 / bfloat16 (and probabilities saved in that
  dtype) add a few ``finfo(dtype).eps``.

Absolute tolerances scale with the magnitude of the data (``max |image|``),
because a palette entry is a weighted mean of the image: its error is bounded
by the relative error of the weights times ``max |image|``, however little a
colour is used (``probs / (sum probs + eps) <= 1``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from hypothesis import strategies as st

from colorquant_ops.ops import reference

CUDA_SKIP_REASON = "CUDA not available (no GPU on this machine)"

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
MAX_COLORS = 256

LAYOUTS_4D = ("contiguous", "channels_last", "reversed", "sliced", "expanded")
LAYOUTS_3D = ("contiguous", "reversed", "sliced", "expanded")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- layouts


def _poison(dtype: torch.dtype):
    """Fill value of the gaps of a sliced view: a kernel that ignores the
    strides reads it and gets NaN (floats) or an invalid colour index (int64)."""
    return float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor with the values of ``t`` (except for "expanded") in the given memory layout.

    * contiguous     - row-major.
    * channels_last  - NHWC strides (4-D only).
    * reversed       - all dimensions in reverse memory order (column-major).
    * sliced         - a strided view with a storage offset into a larger
                       buffer whose gaps hold NaN / an invalid index.
    * expanded       - stride 0 in the batch and the last dimension: the values
                       of ``t[:1, ..., :1]`` broadcast to ``t.shape`` (the values
                       change; tests compute the reference from the tensor returned).
    """
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        assert t.dim() == 4, "channels_last needs a 4-D tensor"
        out = t.contiguous(memory_format=torch.channels_last)
        return out
    if layout == "reversed":
        dims = list(range(t.dim()))[::-1]
        return t.permute(dims).contiguous().permute(dims)
    if layout == "sliced":
        big_shape = [s + 1 for s in t.shape[:-1]] + [2 * t.shape[-1] + 1]
        big = torch.full(big_shape, _poison(t.dtype), dtype=t.dtype, device=t.device)
        index = tuple(slice(1, None) for _ in t.shape[:-1]) + (slice(1, None, 2),)
        big[index] = t
        view = big[index]
        assert view.shape == t.shape
        return view
    if layout == "expanded":
        index = (slice(0, 1),) + (slice(None),) * (t.dim() - 2) + (slice(0, 1),)
        return t[index].expand(t.shape)
    raise ValueError(f"unknown layout {layout!r}")


# --------------------------------------------------------------------------- inputs


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, gen, scale=1.0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Normal values (drawn in float64 on the CPU, so identical on every device), rounded to dtype."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def rand(shape, gen, scale=1.0, offset=0.0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Uniform values in [offset, offset + scale), rounded to dtype."""
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype=dtype, device=device)


def random_index_map(shape, num_colors, gen, device="cpu") -> torch.Tensor:
    return torch.randint(0, num_colors, shape, generator=gen, dtype=torch.long).to(device)


def f64(t: torch.Tensor) -> torch.Tensor:
    """The exact values of t, as a float64 (or int64) CPU tensor, detached."""
    t = t.detach().cpu()
    return t if not t.dtype.is_floating_point else t.double()


def amax(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


# --------------------------------------------------------------------------- checks


def check_output(t: torch.Tensor, shape, dtype, device):
    """Shape, dtype and device of an output, which must be contiguous."""
    assert tuple(t.shape) == tuple(shape), f"shape {tuple(t.shape)}, expected {tuple(shape)}"
    assert t.dtype == dtype, f"dtype {t.dtype}, expected {dtype}"
    assert t.device.type == torch.device(device).type, f"device {t.device}, expected {device}"
    assert t.is_contiguous(), f"output of shape {tuple(t.shape)} has strides {t.stride()}, expected contiguous"


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str):
    """Compares an output (any dtype, any device) with a float64 reference."""
    torch.testing.assert_close(
        f64(actual), f64(expected), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


# --------------------------------------------------------------------------- tolerances


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def storage_eps(dtype: torch.dtype) -> float:
    """Rounding of the values stored in a low-precision output (0 for float32/64:
    their storage rounding is part of the accumulation error)."""
    return torch.finfo(dtype).eps if dtype in LOW_PRECISION else 0.0


def prob_rel_error(dtype: torch.dtype, zmax: float) -> float:
    """rho: relative error bound of one probability (see module docstring)."""
    u = unit_roundoff(accumulation_dtype(dtype))
    return 4 * u * zmax + 8 * u


def sum_rel_error(dtype: torch.dtype, n: int) -> float:
    u = unit_roundoff(accumulation_dtype(dtype))
    return 8 * math.sqrt(max(n, 1)) * u


@dataclasses.dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float

    def kw(self):
        return {"atol": self.atol, "rtol": self.rtol}


def soft_forward_tols(dtype, *, zmax: float, xmax: float, num_pixels: int, num_colors: int):
    """Tolerances of (quantized, palette, probs) of soft_color_quantize."""
    rho = prob_rel_error(dtype, zmax)
    summ = sum_rel_error(dtype, num_pixels + num_colors)
    s = storage_eps(dtype)
    tiny = 1e-300 if dtype == torch.float64 else 1e-30
    probs = Tol(atol=rho + s + tiny, rtol=s)
    palette = Tol(atol=xmax * (3 * rho + 2 * summ + 2 * s) + tiny, rtol=s)
    quantized = Tol(atol=xmax * (4 * rho + 3 * summ + 4 * s) + tiny, rtol=s)
    return quantized, palette, probs


def soft_backward_tols(
    dtype, *, zmax: float, xmax: float, temperature: float, num_pixels: int, num_colors: int, gq: float, gpal: float, gprobs: float
):
    """Tolerances of (grad_logits, grad_image) of soft_color_quantize.

    With A[k,c] = (grad_palette + sum_p probs grad_quantized) / (sum_p probs + eps):
    grad_image[c,p] = sum_k probs[k,p] A[k,c] is bounded by G_x = gq + K gpal, and
    grad_logits = temperature probs (G - sum probs G) with
    |G| <= xmax (3 gq + 2 K gpal) + 2 gprobs =: G_l (since probs[k,p] / sum_p probs[k] <= 1).
    """
    rho = prob_rel_error(dtype, zmax)
    summ = sum_rel_error(dtype, num_pixels + num_colors)
    s = storage_eps(dtype)
    rel = 8 * (rho + summ) + 16 * s
    tiny = 1e-300 if dtype == torch.float64 else 1e-30
    g_x = gq + num_colors * gpal
    g_l = temperature * (xmax * (3 * gq + 2 * num_colors * gpal) + 2 * gprobs)
    return Tol(atol=g_l * rel + tiny, rtol=s), Tol(atol=g_x * rel + tiny, rtol=s)


def mean_tol(dtype, *, xmax: float, num_pixels: int) -> Tol:
    """Per-colour means / sums over up to num_pixels pixels (hard palette)."""
    u = unit_roundoff(accumulation_dtype(dtype))
    return Tol(atol=xmax * (num_pixels * 2 * u + 4 * u) + 1e-300, rtol=storage_eps(dtype) + 2 * u)


def index_sum_tol(dtype, *, gmax: float, num_pixels: int) -> Tol:
    """Sums of up to num_pixels terms bounded by gmax (render backward)."""
    u = unit_roundoff(accumulation_dtype(dtype))
    return Tol(atol=gmax * num_pixels * 2 * u + 1e-300, rtol=storage_eps(dtype))


# --------------------------------------------------------------------------- soft op cases


@dataclasses.dataclass(frozen=True)
class SoftCase:
    B: int
    K: int
    C: int
    H: int
    W: int
    temperature: float
    eps: float
    logit_scale: float
    image_scale: float
    image_offset: float
    seed: int
    logits_layout: str
    image_layout: str

    def inputs(self, dtype, device, requires_grad=False):
        """(logits, image) in the case's layouts; values rounded to dtype."""
        gen = generator(self.seed)
        logits = randn((self.B, self.K, self.H, self.W), gen, self.logit_scale, dtype, device)
        image = rand((self.B, self.C, self.H, self.W), gen, self.image_scale, self.image_offset, dtype, device)
        logits = with_layout(logits, self.logits_layout)
        image = with_layout(image, self.image_layout)
        if requires_grad:
            logits.requires_grad_(True)
            image.requires_grad_(True)
        return logits, image


odd_sizes = st.integers(0, 6).map(lambda i: 2 * i + 1)  # 1, 3, ..., 13


def log_uniform(lo: float, hi: float):
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0**e)


@st.composite
def soft_cases(
    draw,
    max_batch=3,
    max_colors=64,
    max_channels=4,
    temperature=(0.05, 100.0),
    logit_scale=(1e-3, 1e4),
    eps=(1e-8, 1e-6, 1e-3, 0.5),
):
    return SoftCase(
        B=draw(st.integers(0, max_batch)),
        K=draw(st.integers(1, max_colors)),
        C=draw(st.integers(1, max_channels)),
        H=draw(odd_sizes),
        W=draw(odd_sizes),
        temperature=draw(log_uniform(*temperature)),
        eps=draw(st.sampled_from(eps)),
        logit_scale=draw(log_uniform(*logit_scale)),
        image_scale=draw(log_uniform(1e-2, 1e2)),
        image_offset=draw(st.sampled_from((0.0, -0.5, 3.0))),
        seed=draw(st.integers(0, 2**31 - 1)),
        logits_layout=draw(st.sampled_from(LAYOUTS_4D)),
        image_layout=draw(st.sampled_from(LAYOUTS_4D)),
    )


def soft_reference(logits, image, temperature, eps):
    """The float64 oracle on the exact input values."""
    return reference.soft_color_quantize(f64(logits), f64(image), temperature, eps)


def soft_reference_grads(logits, image, temperature, eps, grads):
    """(grad_logits, grad_image) of sum(out * g) over the three outputs, by autograd through the float64 oracle."""
    l64 = f64(logits).requires_grad_(True)
    x64 = f64(image).requires_grad_(True)
    outs = reference.soft_color_quantize(l64, x64, temperature, eps)
    loss = sum((o * f64(g)).sum() for o, g in zip(outs, grads))
    return torch.autograd.grad(loss, (l64, x64))
