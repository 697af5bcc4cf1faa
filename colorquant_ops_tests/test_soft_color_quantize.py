"""soft_color_quantize: forward and backward against the float64 oracle, layouts,
edge cases, opcheck, torch.compile and determinism."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import colorquant_ops.ops as cq
from colorquant_ops.ops import reference

from .helpers import (
    FLOAT_DTYPES,
    LAYOUTS_3D,
    LAYOUTS_4D,
    amax,
    assert_close64,
    check_output,
    check_soft_backward,
    check_soft_forward,
    dtype_id,
    f64,
    generator,
    mean_tol,
    rand,
    randn,
    soft_cases,
    soft_reference_grads,
    with_layout,
)

OP = torch.ops.colorquant.soft_color_quantize.default
BACKWARD_OP = torch.ops.colorquant.soft_color_quantize_backward.default


def check_forward(logits, image, temperature, eps, out=None):
    """Runs the op (unless out is given) and compares all three outputs with the oracle."""
    if out is None:
        out = cq.soft_color_quantize(logits, image, temperature, eps)
    B, K, H, W = logits.shape
    C = image.shape[1]
    dtype, device = logits.dtype, logits.device
    check_output(out.quantized, (B, C, H, W), dtype, device)
    check_output(out.palette, (B, K, C), dtype, device)
    check_output(out.probs, (B, K, H, W), dtype, device)
    check_soft_forward(out, logits, image, temperature, eps)
    return out


def upstream_grads(out, gen, layouts=("contiguous",) * 3):
    """Random nonzero gradients for (quantized, palette, probs), in the given layouts."""
    return tuple(
        with_layout(randn(o.shape, gen, 1.0, o.dtype, o.device), layout) for o, layout in zip(out, layouts)
    )


def check_backward(logits, image, temperature, eps, grads):
    out = cq.soft_color_quantize(logits, image, temperature, eps)
    got_l, got_x = torch.autograd.grad(out, (logits, image), grads)
    check_output(got_l, logits.shape, logits.dtype, logits.device)
    check_output(got_x, image.shape, image.dtype, image.device)
    check_soft_backward(got_l, got_x, logits, image, temperature, eps, grads)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@given(case=soft_cases())
def test_forward_matches_reference(device, dtype, case):
    logits, image = case.inputs(dtype, device)
    check_forward(logits, image, case.temperature, case.eps)


def test_returns_named_tuple(device):
    gen = generator(0)
    logits, image = randn((1, 3, 2, 2), gen, device=device), rand((1, 2, 2, 2), gen, device=device)
    out = cq.soft_color_quantize(logits, image)
    assert isinstance(out, cq.SoftQuantized)
    assert out.quantized is out[0] and out.palette is out[1] and out.probs is out[2]
    # defaults: temperature=1, eps=1e-8
    ref = cq.soft_color_quantize(logits, image, 1.0, 1e-8)
    for got, want in zip(out, ref):
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout", LAYOUTS_4D)
@pytest.mark.parametrize("which", ["logits", "image", "both"])
def test_layouts(device, layout, which):
    """Every layout of either input gives the result of the contiguous input, bit for bit."""
    gen = generator(1)
    logits = randn((2, 5, 7, 9), gen, 2.0, device=device)
    image = rand((2, 3, 7, 9), gen, device=device)
    lg = with_layout(logits, layout) if which in ("logits", "both") else logits
    im = with_layout(image, layout) if which in ("image", "both") else image
    got = check_forward(lg, im, 1.5, 1e-8)
    want = cq.soft_color_quantize(lg.contiguous(), im.contiguous(), 1.5, 1e-8)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_empty_batch(device, dtype):
    logits = torch.empty(0, 4, 3, 5, dtype=dtype, device=device)
    image = torch.empty(0, 2, 3, 5, dtype=dtype, device=device)
    out = check_forward(logits, image, 1.0, 1e-8)
    assert all(o.numel() == 0 for o in out)
    lg, im = logits.clone().requires_grad_(True), image.clone().requires_grad_(True)
    q, pal, probs = cq.soft_color_quantize(lg, im)
    (q.sum() + pal.sum() + probs.sum()).backward()
    assert lg.grad.shape == lg.shape and im.grad.shape == im.shape


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.25])
def test_single_colour(device, dtype, eps):
    """K=1: probs are exactly 1, the palette is the image mean (times P / (P + eps))."""
    gen = generator(2)
    B, C, H, W = 2, 3, 5, 7
    logits = randn((B, 1, H, W), gen, 100.0, dtype, device)
    image = rand((B, C, H, W), gen, 2.0, -1.0, dtype, device)
    q, pal, probs = check_forward(logits, image, 3.0, eps)
    assert torch.equal(probs, torch.ones_like(probs))
    want = f64(image).mean(dim=(2, 3)) * (H * W / (H * W + eps))  # [B,C]
    tol = mean_tol(dtype, xmax=amax(image), num_pixels=H * W)
    assert_close64(pal, want[:, None, :], what="palette", **tol.kw())
    assert_close64(q, want[:, :, None, None].expand(B, C, H, W), what="quantized", atol=2 * tol.atol, rtol=2 * tol.rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_max_colours(device, dtype):
    gen = generator(3)
    logits = randn((1, 256, 5, 6), gen, 3.0, dtype, device)
    image = rand((1, 3, 5, 6), gen, dtype=dtype, device=device)
    check_forward(logits, image, 0.7, 1e-8)
    lg, im = logits.requires_grad_(True), image.requires_grad_(True)
    out = cq.soft_color_quantize(lg, im, 0.7, 1e-8)
    check_backward(lg, im, 0.7, 1e-8, upstream_grads(out, gen))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gap", [1e4, 0.2], ids=["never-wins", "tiny-weight"])
def test_unused_colour(device, dtype, gap):
    """A colour far below the others at a large temperature: its total weight
    is 0 or tiny, yet palette and gradients stay finite and match the oracle."""
    gen = generator(4)
    logits = randn((2, 5, 7, 9), gen, 0.1, torch.float64)
    logits[:, 3] = logits.amax(dim=1) - gap
    logits = logits.to(dtype=dtype, device=device).requires_grad_(True)
    image = rand((2, 3, 7, 9), gen, dtype=dtype, device=device).requires_grad_(True)
    temperature = 100.0
    out = check_forward(logits, image, temperature, 1e-8)
    for o in out:
        assert torch.isfinite(o).all()
    grads = upstream_grads(out, gen)
    g_l, g_x = torch.autograd.grad(out, (logits, image), grads)
    assert torch.isfinite(g_l).all() and torch.isfinite(g_x).all()
    check_backward(logits, image, temperature, 1e-8, grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_large_image(device, dtype):
    """More pixels than one CPU work chunk (8192): the per-chunk partial sums
    are combined correctly, forward and backward."""
    gen = generator(40)
    logits = randn((2, 5, 97, 101), gen, 2.0, dtype, device).requires_grad_(True)
    image = rand((2, 3, 97, 101), gen, dtype=dtype, device=device).requires_grad_(True)
    out = check_forward(logits, image, 1.7, 1e-8)
    check_backward(logits, image, 1.7, 1e-8, upstream_grads(out, gen))


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("temperature", [0.3, 1.0, 7.0])
@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.5])
def test_gradcheck(device, temperature, eps):
    """float64 gradcheck of all three outputs w.r.t. logits and image (gradcheck
    contracts every output with its own upstream gradient)."""
    gen = generator(5)
    logits = randn((2, 4, 3, 2), gen, 1.0, torch.float64, device).requires_grad_(True)
    image = rand((2, 3, 3, 2), gen, 1.0, -0.5, torch.float64, device).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda lg, im: tuple(cq.soft_color_quantize(lg, im, temperature, eps)),
        (logits, image),
        eps=1e-6,
        atol=1e-7,
        rtol=1e-5,
    )


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "reversed"])
def test_gradcheck_layouts(device, layout):
    gen = generator(6)
    logits = with_layout(randn((2, 3, 2, 3), gen, 1.0, torch.float64, device), layout).requires_grad_(True)
    image = with_layout(rand((2, 2, 2, 3), gen, 1.0, 0.0, torch.float64, device), layout).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda lg, im: tuple(cq.soft_color_quantize(lg, im, 1.3, 1e-6)), (logits, image), atol=1e-7, rtol=1e-5
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@given(
    case=soft_cases(),
    grad_layouts=st.tuples(st.sampled_from(LAYOUTS_4D), st.sampled_from(LAYOUTS_3D), st.sampled_from(LAYOUTS_4D)),
)
def test_backward_matches_reference(device, dtype, case, grad_layouts):
    """Upstream gradients on all three outputs, in any layout; float16/bfloat16:
    the backward only sees the probabilities and palette rounded to the dtype,
    which the error bounds account for."""
    logits, image = case.inputs(dtype, device, requires_grad=True)
    out = cq.soft_color_quantize(logits, image, case.temperature, case.eps)
    grads = upstream_grads(out, generator(case.seed + 1), grad_layouts)
    check_backward(logits, image, case.temperature, case.eps, grads)


@pytest.mark.parametrize("used", ["quantized", "palette", "probs"])
@pytest.mark.parametrize("grad_of", ["logits", "image", "both"])
def test_backward_partial(device, used, grad_of):
    """Only one output used (the others get no gradient) and only some inputs
    requiring grad; .sum() gives an expanded (stride 0) upstream gradient."""
    gen = generator(7)
    logits = randn((2, 4, 5, 3), gen, 1.0, torch.float64, device).requires_grad_(grad_of in ("logits", "both"))
    image = rand((2, 3, 5, 3), gen, 1.0, 0.0, torch.float64, device).requires_grad_(grad_of in ("image", "both"))
    out = cq.soft_color_quantize(logits, image, 0.8, 1e-8)
    idx = ("quantized", "palette", "probs").index(used)
    (out[idx] ** 2).sum().backward()
    grads = [torch.zeros_like(o) for o in out]
    grads[idx] = 2 * out[idx].detach()
    ref_l, ref_x = soft_reference_grads(logits, image, 0.8, 1e-8, grads)
    if logits.requires_grad:
        torch.testing.assert_close(f64(logits.grad), ref_l, atol=1e-12, rtol=1e-9)
    else:
        assert logits.grad is None
    if image.requires_grad:
        torch.testing.assert_close(f64(image.grad), ref_x, atol=1e-12, rtol=1e-9)
    else:
        assert image.grad is None




def test_double_backward_raises_instead_of_being_silently_wrong(device):
    """Second derivatives through the op are not supported: differentiating the
    gradient (create_graph=True) raises, instead of returning zeros."""
    gen = generator(14)
    logits = randn((1, 3, 2, 2), gen, 1.0, torch.float64, device).requires_grad_(True)
    image = rand((1, 2, 2, 2), gen, 1.0, 0.0, torch.float64, device)
    q, pal, probs = cq.soft_color_quantize(logits, image, 1.0, 1e-8)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(q.sum() + (pal**2).sum() + (probs**2).sum(), logits, create_graph=True)
    # A plain backward of the same graph still works.
    (g,) = torch.autograd.grad(q.sum() + (pal**2).sum() + (probs**2).sum(), logits)
    assert torch.isfinite(g).all()


# --------------------------------------------------------------------------- opcheck / compile


def _opcheck_samples(device):
    gen = generator(8)
    for dtype in (torch.float32, torch.float64):
        yield randn((2, 4, 3, 5), gen, 1.0, dtype, device), rand((2, 3, 3, 5), gen, dtype=dtype, device=device), 1.0, 1e-8
        yield (
            with_layout(randn((1, 7, 4, 3), gen, 5.0, dtype, device), "channels_last"),
            with_layout(rand((1, 2, 4, 3), gen, dtype=dtype, device=device), "sliced"),
            0.2,
            0.0,
        )
        yield randn((3, 1, 1, 1), gen, 1.0, dtype, device), rand((3, 1, 1, 1), gen, dtype=dtype, device=device), 9.0, 0.5
    yield (
        randn((2, 3, 2, 2), gen, 1.0, torch.bfloat16, device),
        rand((2, 2, 2, 2), gen, dtype=torch.bfloat16, device=device),
        1.0,
        1e-8,
    )


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    for logits, image, temperature, eps in _opcheck_samples(device):
        logits.requires_grad_(requires_grad)
        image.requires_grad_(requires_grad)
        torch.library.opcheck(OP, (logits, image, temperature, eps))


def test_opcheck_backward_op(device):
    for logits, image, temperature, eps in _opcheck_samples(device):
        out = OP(logits, image, temperature, eps)
        grads = upstream_grads(out, generator(9))
        quantized, palette, probs = out
        torch.library.opcheck(BACKWARD_OP, (*grads, probs, image, palette, temperature, eps))
        # Absent (None) upstream gradients.
        torch.library.opcheck(BACKWARD_OP, (grads[0], None, None, probs, image, palette, temperature, eps))
        torch.library.opcheck(BACKWARD_OP, (None, None, grads[2], probs, image, palette, temperature, eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("C", [3, 2])
def test_backward_op_absent_grads_are_zeros(device, dtype, C):
    """None for an upstream gradient (what autograd passes for an unused output,
    instead of a materialized zero tensor) gives exactly the result of zeros."""
    gen = generator(14)
    logits = randn((2, 5, 6, 7), gen, 2.0, dtype, device)
    image = rand((2, C, 6, 7), gen, dtype=dtype, device=device)
    quantized, palette, probs = out = OP(logits, image, 1.3, 1e-8)
    grads = upstream_grads(out, gen)
    for absent in itertools.product([False, True], repeat=3):
        given = [None if a else g for a, g in zip(absent, grads)]
        zeros = [torch.zeros_like(g) if a else g for a, g in zip(absent, grads)]
        got = BACKWARD_OP(*given, probs, image, palette, 1.3, 1e-8)
        want = BACKWARD_OP(*zeros, probs, image, palette, 1.3, 1e-8)
        for g, w in zip(got, want):
            assert torch.equal(g, w), f"absent={absent}"


def _loss_and_outputs(logits, image, g_q, g_pal, g_probs):
    q, pal, probs = cq.soft_color_quantize(logits, image, 0.7, 1e-6)
    return (q * g_q).sum() + (pal * g_pal).sum() + (probs * g_probs).sum(), q, pal, probs


def _run(fn, shape, device, seed):
    B, K, C, H, W = shape
    gen = generator(seed)
    logits = randn((B, K, H, W), gen, 2.0, device=device).requires_grad_(True)
    image = rand((B, C, H, W), gen, device=device).requires_grad_(True)
    gs = [randn(s, gen, device=device) for s in ((B, C, H, W), (B, K, C), (B, K, H, W))]
    loss, *outs = fn(logits, image, *gs)
    loss.backward()
    return [o.detach() for o in outs] + [logits.grad, image.grad]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile(device, backend, fresh_dynamo):
    compiled = torch.compile(_loss_and_outputs, backend=backend, fullgraph=True)
    shape = (2, 5, 3, 6, 7)
    for got, want in zip(_run(compiled, shape, device, 10), _run(_loss_and_outputs, shape, device, 10)):
        torch.testing.assert_close(got, want)


def test_compile_dynamic_shapes(device, fresh_dynamo):
    """dynamic=True: one graph serves several shapes (the fake impl is symbolic)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_loss_and_outputs, backend=counter, fullgraph=True, dynamic=True)
    for i, shape in enumerate([(2, 5, 3, 6, 7), (3, 4, 2, 5, 9), (2, 9, 4, 3, 3)]):
        for got, want in zip(_run(compiled, shape, device, i), _run(_loss_and_outputs, shape, device, i)):
            torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


# --------------------------------------------------------------------------- determinism


def _forward_backward(logits, image):
    lg, im = logits.detach().requires_grad_(True), image.detach().requires_grad_(True)
    out = cq.soft_color_quantize(lg, im, 2.0, 1e-8)
    grads = upstream_grads(out, generator(11))
    g_l, g_x = torch.autograd.grad(out, (lg, im), grads)
    return [o.detach() for o in out] + [g_l, g_x]


def test_deterministic(device):
    gen = generator(12)
    logits = randn((2, 12, 33, 41), gen, 3.0, device=device)
    image = rand((2, 3, 33, 41), gen, device=device)
    first, second = _forward_backward(logits, image), _forward_backward(logits, image)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_independent_of_num_threads(dtype, restore_num_threads):
    """CPU only: results are bit-identical for 1 and 2 threads (several
    parallel chunks per image)."""
    gen = generator(13)
    logits = randn((3, 8, 120, 150), gen, 3.0, dtype)
    image = rand((3, 3, 120, 150), gen, dtype=dtype)
    torch.set_num_threads(1)
    one = _forward_backward(logits, image)
    torch.set_num_threads(2)
    two = _forward_backward(logits, image)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=dtype_id)
def test_palette_counts_probabilities_that_underflow_in_storage(device, dtype):
    """The palette is summed from the accumulation-type probabilities, not from
    probs as stored: logits [0, -20], one pixel 0.25, eps 1e-8 give colour 1 the
    entry 0.25 p / (p + eps) = 0.0427 (p = 2.06e-9, 0 in float16) on every device."""
    logits = torch.tensor([0.0, -20.0], dtype=dtype).reshape(1, 2, 1, 1).to(device)
    image = torch.full((1, 1, 1, 1), 0.25, dtype=dtype).to(device)
    out = check_forward(logits, image, 1.0, 1e-8)
    want = reference.soft_color_quantize(f64(logits), f64(image), 1.0, 1e-8)[1]
    assert abs(float(want[0, 1, 0]) - 0.0427) < 1e-4
    assert abs(float(out.palette[0, 1, 0]) - float(want[0, 1, 0])) < 4e-3 * float(want[0, 1, 0])
    if dtype == torch.float16:
        assert float(out.probs[0, 1, 0, 0]) == 0.0  # the stored probability did underflow
