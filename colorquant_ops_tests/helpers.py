"""Shared helpers of the colorquant_ops tests: input generators, memory layouts,
hypothesis strategies, and the error bounds each output is checked against.

Every comparison is against the float64 oracle :mod:`colorquant_ops.ops.reference`
evaluated on exactly the values the kernel saw (inputs already rounded to the
tested dtype), so the allowed error only has to cover the kernel's own rounding:

* soft op: elementwise first-order error bounds derived from the oracle's own
  intermediate values (:func:`check_soft_forward`, :func:`check_soft_backward`):
  rounding of ``temperature * logits`` (grows with ``|z|``), of ``exp``, of the
  sums over pixels and colours (``8 sqrt(n) u``) and of float16 / bfloat16
  storage, propagated through the weighted means and the closed-form backward.
  A palette entry is a weighted mean of the image, so its error is bounded by
  the error of the weights times ``|image - palette|`` however little the
  colour is used. The bounds are applied with a safety factor of 2 and
  observed errors stay below a quarter of them (float16 subnormals: half).
* hard palette / render backward: sums of up to ``n`` terms, worst case
  ``(n - 1) u`` times the sum of their magnitudes (:func:`mean_tol`,
  :func:`check_render_backward`).

``u`` is the unit roundoff of the accumulation type: float32 for float32,
float16 and bfloat16 inputs, float64 for float64 inputs.
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


@dataclasses.dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float

    def kw(self):
        return {"atol": self.atol, "rtol": self.rtol}


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str):
    """|actual - expected| <= bound elementwise (NaN fails); expected and bound float64 CPU."""
    got = f64(actual)
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    err = (got - expected).abs()
    bad = ~(err <= bound)
    if bad.any():
        flat = int(torch.nonzero(bad.flatten())[0])
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), got.shape))
        ratio = float((err / bound.clamp_min(1e-300)).nan_to_num(float("inf")).max())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {got.numel()} elements outside the error bound "
            f"(max error/bound {ratio:.3g}); first at {idx}: got {got[idx].item()!r}, "
            f"expected {expected[idx].item()!r}, bound {bound[idx].item():.3g}"
        )


def storage_floor(dtype: torch.dtype) -> float:
    """Largest rounding error of a subnormal of a low-precision output (float16
    stores values below 6e-5 with an absolute error up to 3e-8); 0 for float32/64."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps if dtype in LOW_PRECISION else 0.0


def accumulation_floor(dtype: torch.dtype) -> float:
    """Absolute error allowed on any value computed in the accumulation type
    (underflow: the CPU float exp clamps its argument at -87)."""
    return 1e-300 if dtype == torch.float64 else 1e-30


def stored(value_abs, bound, dtype):
    """Error bound of a value with error `bound` after rounding to dtype: a
    relative eps, or for a subnormal at most min(|value|, subnormal spacing)."""
    return bound + storage_eps(dtype) * value_abs + (value_abs + bound).clamp_max(storage_floor(dtype))


SAFETY = 2.0  # on top of the first-order error bounds below


def _soft_bound_terms(logits, image, temperature, eps, dtype):
    """Oracle outputs and first-order error bounds of the soft forward.

    Per probability: the kernel rounds z = temperature * logits (and the
    temperature) in the accumulation type, so exp(z_k - max z) has a relative
    error up to expm1(delta_k), delta_k = 2u (|z_k| + |max z|) + u |z_k - max z| + 8u
    (the +8u: exp itself). After normalisation probs_k has the error
    probs_k (d_k (1 - probs_k) + sum_{j != k} probs_j d_j), plus the rounding of
    the normaliser (a sum over K). The palette (a weighted mean of the image,
    computed from the probabilities in the accumulation type) and quantized (a
    sum over K of the probabilities as stored) inherit these; float16/bfloat16
    outputs add their rounding (:func:`stored`).
    """
    u = unit_roundoff(accumulation_dtype(dtype))
    tiny = accumulation_floor(dtype)
    l64, x64 = f64(logits), f64(image)
    B, K, H, W = l64.shape
    C = x64.shape[1]
    n = H * W
    q, pal, probs = reference.soft_color_quantize(l64, x64, temperature, eps)
    P = probs.reshape(B, K, n)
    x = x64.reshape(B, C, n)
    z = temperature * l64.reshape(B, K, n)
    zmax = z.amax(dim=1, keepdim=True) if K else z
    delta = torch.expm1((2 * u * (z.abs() + zmax.abs()) + u * (z - zmax).abs() + 8 * u).clamp_max(50))
    D = (P * delta).sum(dim=1, keepdim=True)
    sum_k = 8 * math.sqrt(K) * u
    sum_p = 8 * math.sqrt(n) * u
    b_probs_acc = P * (delta * (1 - P) + (D - P * delta).clamp_min(0) + sum_k + 2 * u) + tiny
    b_probs = stored(P, b_probs_acc, dtype)
    weight = P.sum(dim=2)  # [B,K]
    # palette = sum_p P x / (W + eps):  d palette = sum_p dP (x - palette) / (W + eps)
    dev = (x[:, None, :, :] - pal[:, :, :, None]).abs()  # [B,K,C,n]
    num = (b_probs_acc[:, :, None, :] * dev).sum(-1) + sum_p * (
        torch.einsum("bkp,bcp->bkc", P, x.abs()) + pal.abs() * weight[..., None]
    )
    b_pal_acc = num / (weight[..., None] + eps) + 2 * u * pal.abs() + tiny
    b_pal = stored(pal.abs(), b_pal_acc, dtype)
    # quantized = sum_k P palette (stored probabilities, palette in the accumulation type)
    b_q = (
        torch.einsum("bkp,bkc->bcp", b_probs, pal.abs())
        + torch.einsum("bkp,bkc->bcp", P, b_pal_acc)
        + sum_k * torch.einsum("bkp,bkc->bcp", P, pal.abs())
        + 2 * u * q.reshape(B, C, n).abs()
        + tiny
    )
    b_q = stored(q.reshape(B, C, n).abs(), b_q, dtype)
    return dict(
        q=q, pal=pal, probs=probs, P=P, x=x, weight=weight, b_probs=b_probs, b_pal=b_pal, b_q=b_q,
        u=u, tiny=tiny, sum_k=sum_k, sum_p=sum_p, shape=(B, K, C, H, W),
    )


def check_soft_forward(out, logits, image, temperature, eps):
    """Compares (quantized, palette, probs) with the oracle within their error bounds."""
    t = _soft_bound_terms(logits, image, temperature, eps, logits.dtype)
    B, K, C, H, W = t["shape"]
    assert_within(out[0], t["q"], SAFETY * t["b_q"].reshape(B, C, H, W), "quantized")
    assert_within(out[1], t["pal"], SAFETY * t["b_pal"], "palette")
    assert_within(out[2], t["probs"], SAFETY * t["b_probs"].reshape(B, K, H, W), "probs")


def check_soft_backward(got_logits_grad, got_image_grad, logits, image, temperature, eps, grads):
    """Compares (grad_logits, grad_image) for the upstream grads of (quantized,
    palette, probs) with autograd through the oracle, within first-order bounds.

    With A[k,c] = (grad_palette + sum_p P grad_quantized) / (W + eps) and
    G[k,p] = grad_probs + sum_c grad_quantized palette + sum_c A (x - palette):
    grad_logits = temperature P (G - sum_k P G), grad_image = sum_k P A.
    Errors: those of P and palette (forward bounds), of W and the sums in A, G.
    """
    t = _soft_bound_terms(logits, image, temperature, eps, logits.dtype)
    B, K, C, H, W = t["shape"]
    n = H * W
    P, x, pal, weight, bp, bpal = t["P"], t["x"], t["pal"], t["weight"], t["b_probs"], t["b_pal"]
    u, tiny, sum_k, sum_p = t["u"], t["tiny"], t["sum_k"], t["sum_p"]
    dtype = logits.dtype
    sum_c = 8 * math.sqrt(C) * u
    gq = f64(grads[0]).reshape(B, C, n)
    gpal = f64(grads[1])
    gpr = f64(grads[2]).reshape(B, K, n)
    ref_l, ref_x = soft_reference_grads(logits, image, temperature, eps, grads)

    den = weight[..., None] + eps  # [B,K,1]
    A = (gpal + torch.einsum("bkp,bcp->bkc", P, gq)) / den
    A_abs = (gpal.abs() + torch.einsum("bkp,bcp->bkc", P, gq.abs())) / den
    G = gpr + torch.einsum("bkc,bcp->bkp", pal, gq) + torch.einsum("bkc,bcp->bkp", A, x) - (A * pal).sum(-1, keepdim=True)
    G_abs = (
        gpr.abs()
        + torch.einsum("bkc,bcp->bkp", pal.abs(), gq.abs())
        + torch.einsum("bkc,bcp->bkp", A_abs, x.abs())
        + (A_abs * pal.abs()).sum(-1, keepdim=True)
    )
    dot = (P * G).sum(dim=1, keepdim=True)
    # absolute error of A: (dN - A dW) / (W + eps) plus the rounding of the sums
    e_A = (
        torch.einsum("bkp,bcp->bkc", bp, gq.abs())
        + A_abs * bp.sum(-1, keepdim=True)
        + sum_p * (gpal.abs() + torch.einsum("bkp,bcp->bkc", P, gq.abs()) + A_abs * weight[..., None])
    ) / den
    e_G = (
        torch.einsum("bkc,bcp->bkp", bpal, gq.abs())
        + torch.einsum("bkc,bcp->bkp", e_A, x.abs())
        + (e_A * pal.abs() + A_abs * bpal).sum(-1, keepdim=True)
        + sum_c * G_abs
    )
    e_dot = (bp * G.abs() + P * e_G).sum(dim=1, keepdim=True) + sum_k * (P * G_abs).sum(dim=1, keepdim=True)
    b_l = temperature * (bp * (G - dot).abs() + P * (e_G + e_dot)) + 2 * u * ref_l.reshape(B, K, n).abs() + tiny
    b_l = stored(ref_l.reshape(B, K, n).abs(), b_l, dtype)
    b_x = (
        torch.einsum("bkp,bkc->bcp", bp, A.abs())
        + torch.einsum("bkp,bkc->bcp", P, e_A)
        + sum_k * torch.einsum("bkp,bkc->bcp", P, A_abs)
        + 2 * u * ref_x.reshape(B, C, n).abs()
        + tiny
    )
    b_x = stored(ref_x.reshape(B, C, n).abs(), b_x, dtype)
    assert_within(got_logits_grad, ref_l, SAFETY * b_l.reshape(B, K, H, W), "grad_logits")
    assert_within(got_image_grad, ref_x, SAFETY * b_x.reshape(B, C, H, W), "grad_image")


def mean_tol(dtype, *, xmax: float, num_pixels: int) -> Tol:
    """Per-colour means / sums over up to num_pixels pixels (hard palette)."""
    u = unit_roundoff(accumulation_dtype(dtype))
    return Tol(atol=xmax * (num_pixels * 2 * u + 4 * u) + (storage_floor(dtype) + accumulation_floor(dtype)), rtol=storage_eps(dtype) + 2 * u)


def check_render_backward(got, index_map, palette, grad):
    """grad_palette of render_index_map vs autograd through the oracle. Each
    entry is a sum over the pixels of one colour: naive summation of m terms
    errs by at most (m - 1) u sum |terms| (plus the float16/bfloat16 rounding)."""
    dtype = palette.dtype
    u = unit_roundoff(accumulation_dtype(dtype))
    idx = f64(index_map)
    p64 = f64(palette).requires_grad_(True)
    (want,) = torch.autograd.grad(reference.render_index_map(idx, p64), p64, f64(grad))
    (sum_abs,) = torch.autograd.grad(reference.render_index_map(idx, p64), p64, f64(grad).abs())
    B, H, W = idx.shape
    counts = torch.zeros(B, palette.shape[1], dtype=torch.float64)
    if idx.numel():
        counts.scatter_add_(1, idx.reshape(B, -1), torch.ones(B, H * W, dtype=torch.float64))
    bound = (counts[..., None] + 1) * u * sum_abs + accumulation_floor(dtype)
    bound = stored(want.abs(), bound, dtype)
    assert_within(got, want, SAFETY * bound, "grad_palette")


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


def soft_reference_grads(logits, image, temperature, eps, grads):
    """(grad_logits, grad_image) of sum(out * g) over the three outputs, by autograd through the float64 oracle."""
    l64 = f64(logits).requires_grad_(True)
    x64 = f64(image).requires_grad_(True)
    outs = reference.soft_color_quantize(l64, x64, temperature, eps)
    loss = sum((o * f64(g)).sum() for o, g in zip(outs, grads))
    return torch.autograd.grad(loss, (l64, x64))


def generated_images(size: int = 64, seed: int = 0) -> torch.Tensor:
    """Four RGB test images in [0, 1], ``[4,3,size,size]``: a colour ramp, discs, stripes, smooth noise."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    ramp = torch.stack([x, y, 1 - x * y])
    r = ((x - 0.35) ** 2 + (y - 0.4) ** 2).sqrt()
    discs = torch.stack([(r < 0.25).float(), ((x - 0.7) ** 2 + (y - 0.7) ** 2 < 0.04).float() * 0.8, 0.3 + 0.4 * y])
    stripes = torch.stack([0.5 + 0.5 * torch.sin(12 * x), 0.5 + 0.5 * torch.cos(9 * y), (x + y) / 2])
    noise = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=size, mode="bicubic")[0]
    return torch.stack([ramp, discs, stripes, noise]).clamp(0, 1)


_SAME_SIZE_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def assert_same_bits_or_both_nan(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor"):
    """Bit identity as claimed between devices: equal shapes and dtypes, every
    non-NaN element with the same bits (so -0.0 != 0.0), NaN exactly where the
    other is NaN -- with any sign and payload: NaN bits are not covered by the
    claims (bfloat16 NaN is 0x7FC0 on the CPU, 0x7FFF from CUDA's conversion)."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert a.shape == e.shape and a.dtype == e.dtype, f"{what}: {a.dtype}{tuple(a.shape)} vs {e.dtype}{tuple(e.shape)}"
    if not a.dtype.is_floating_point:
        assert torch.equal(a, e), f"{what}: values differ"
        return
    nan_a, nan_e = a.isnan(), e.isnan()
    assert torch.equal(nan_a, nan_e), f"{what}: NaN at different elements"
    int_t = _SAME_SIZE_INT[a.element_size()]
    bits_a, bits_e = a.contiguous().view(int_t)[~nan_a], e.contiguous().view(int_t)[~nan_e]
    assert torch.equal(bits_a, bits_e), f"{what}: bits differ at {int((bits_a != bits_e).sum())} non-NaN elements"
