"""palette_distance: out[b,k,h,w] = sum_c (image[b,c,h,w] - palette[b,k,c])^2 and its
closed-form backward against the float64 oracle, first and second derivatives,
layouts, empty shapes, errors, opcheck, torch.compile, determinism, CUDA vs CPU."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import colorquant_ops
import colorquant_ops.ops as cq
from colorquant_ops.ops import reference

from .conftest import DEVICES
from .helpers import (
    CUDA_SKIP_REASON,
    FLOAT_DTYPES,
    LAYOUTS_3D,
    LAYOUTS_4D,
    SAFETY,
    accumulation_dtype,
    accumulation_floor,
    assert_same_bits_or_both_nan,
    assert_within,
    check_output,
    dtype_id,
    f64,
    generator,
    log_uniform,
    odd_sizes,
    rand,
    randn,
    stored,
    unit_roundoff,
    with_layout,
)

OP = torch.ops.colorquant.palette_distance.default
BACKWARD_OP = torch.ops.colorquant.palette_distance_backward.default


# --------------------------------------------------------------------------- cases and error bounds


@st.composite
def distance_cases(draw, max_colors=64, max_channels=5):
    return dict(
        B=draw(st.integers(0, 3)),
        K=draw(st.integers(1, max_colors)),
        C=draw(st.integers(1, max_channels)),
        H=draw(odd_sizes),
        W=draw(odd_sizes),
        scale=draw(log_uniform(1e-2, 1e2)),
        offset=draw(st.sampled_from((0.0, -0.5, 3.0))),
        seed=draw(st.integers(0, 2**31 - 1)),
        image_layout=draw(st.sampled_from(LAYOUTS_4D)),
        palette_layout=draw(st.sampled_from(LAYOUTS_3D)),
        grad_layout=draw(st.sampled_from(LAYOUTS_4D)),
    )


def make_inputs(case, dtype, device, requires_grad=False):
    """(image, palette, gen): image U(offset, offset + scale), palette from the same range."""
    gen = generator(case["seed"])
    B, K, C, H, W = (case[k] for k in "BKCHW")
    image = rand((B, C, H, W), gen, case["scale"], case["offset"], dtype, device)
    palette = rand((B, K, C), gen, case["scale"], case["offset"], dtype, device)
    image = with_layout(image, case["image_layout"]).requires_grad_(requires_grad)
    palette = with_layout(palette, case["palette_layout"]).requires_grad_(requires_grad)
    return image, palette, gen


def _diff(image, palette):
    """image[b,c,p] - palette[b,k,c] as [B,K,C,H,W], float64 CPU."""
    return f64(image)[:, None] - f64(palette)[..., None, None]


def check_forward(out, image, palette):
    """Every term d_c^2 is non-negative, so the kernel's result (C - 1 additions, a
    rounded difference and square per channel) errs by at most (C + 2) u relative;
    float16/bfloat16 add their storage rounding."""
    dtype = image.dtype
    C = image.shape[1]
    u = unit_roundoff(accumulation_dtype(dtype))
    want = reference.palette_distance(f64(image), f64(palette))
    bound = stored(want, (C + 3) * u * want + accumulation_floor(dtype), dtype)
    assert_within(out, want, SAFETY * bound, "distance")


def reference_grads(image, palette, grad):
    """(grad_image, grad_palette) by autograd through the float64 oracle."""
    x64 = f64(image).requires_grad_(True)
    p64 = f64(palette).requires_grad_(True)
    return torch.autograd.grad(reference.palette_distance(x64, p64), (x64, p64), f64(grad))


def check_backward(got_image, got_palette, image, palette, grad):
    """Each gradient entry is a sum of terms grad * (x - palette): per term a rounded
    difference and product (2u), summed over K colours (grad_image) or the H*W pixels
    (grad_palette), whose naive summation in any order errs by (n - 1) u sum |terms|."""
    dtype = image.dtype
    u = unit_roundoff(accumulation_dtype(dtype))
    tiny = accumulation_floor(dtype)
    want_x, want_p = reference_grads(image, palette, grad)
    B, K, H, W = grad.shape
    terms = (f64(grad)[:, :, None] * _diff(image, palette)).abs()  # [B,K,C,H,W]
    bound_x = 2 * (K + 2) * u * terms.sum(1) + tiny
    bound_p = 2 * (H * W + 2) * u * terms.sum((3, 4)) + tiny
    assert_within(got_image, want_x, SAFETY * stored(want_x.abs(), bound_x, dtype), "grad_image")
    assert_within(got_palette, want_p, SAFETY * stored(want_p.abs(), bound_p, dtype), "grad_palette")


def forward_backward(image, palette, grad):
    """(distance, grad_image, grad_palette) of the wrapper, by autograd."""
    x = image.detach().requires_grad_(True)
    p = palette.detach().requires_grad_(True)
    out = cq.palette_distance(x, p)
    g_x, g_p = torch.autograd.grad(out, (x, p), grad)
    return out.detach(), g_x, g_p


# --------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@given(case=distance_cases())
def test_forward_matches_reference(device, dtype, case):
    image, palette, _ = make_inputs(case, dtype, device)
    out = cq.palette_distance(image, palette)
    B, C, H, W = image.shape
    check_output(out, (B, palette.shape[1], H, W), dtype, device)
    check_forward(out, image, palette)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@given(case=distance_cases())
def test_backward_matches_reference(device, dtype, case):
    image, palette, gen = make_inputs(case, dtype, device, requires_grad=True)
    out = cq.palette_distance(image, palette)
    grad = with_layout(randn(out.shape, gen, 1.0, dtype, device), case["grad_layout"])
    g_x, g_p = torch.autograd.grad(out, (image, palette), grad)
    check_output(g_x, image.shape, dtype, device)
    check_output(g_p, palette.shape, dtype, device)
    check_backward(g_x, g_p, image, palette, grad)


def test_wrapper_is_exported():
    assert cq.palette_distance is colorquant_ops.palette_distance
    assert "palette_distance" in cq.__all__ and "palette_distance" in colorquant_ops.__all__
    assert reference.palette_distance is not None


def test_zero_distance_to_own_colour(device):
    """A palette made of pixels of the image: those pixels are exactly at distance 0."""
    gen = generator(20)
    image = rand((2, 3, 5, 7), gen, device=device)
    palette = image.flatten(2)[:, :, [0, 9, 34]].transpose(1, 2).contiguous()  # pixels 0, 9, 34
    out = cq.palette_distance(image, palette)
    flat = out.flatten(2)
    for k, p in enumerate((0, 9, 34)):
        assert torch.all(flat[:, k, p] == 0)
    check_forward(out, image, palette)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("C", [1, 3, 4, 7])
def test_max_colours_and_channels(device, dtype, C):
    """K = 256 and channel counts on both sides of the CPU's RGB specialization."""
    gen = generator(21)
    image = rand((2, C, 5, 6), gen, dtype=dtype, device=device).requires_grad_(True)
    palette = rand((2, 256, C), gen, dtype=dtype, device=device).requires_grad_(True)
    out = cq.palette_distance(image, palette)
    check_forward(out, image, palette)
    grad = randn(out.shape, gen, 1.0, dtype, device)
    check_backward(*torch.autograd.grad(out, (image, palette), grad), image, palette, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_large_image(device, dtype):
    """More pixels than one CPU work chunk (8192) and one CUDA tile (1024): the palette
    gradient's per-chunk partial sums are combined correctly."""
    gen = generator(22)
    image = rand((2, 3, 97, 101), gen, dtype=dtype, device=device).requires_grad_(True)
    palette = rand((2, 5, 3), gen, dtype=dtype, device=device).requires_grad_(True)
    out = cq.palette_distance(image, palette)
    check_forward(out, image, palette)
    grad = randn(out.shape, gen, 1.0, dtype, device)
    check_backward(*torch.autograd.grad(out, (image, palette), grad), image, palette, grad)


@pytest.mark.parametrize("layout", LAYOUTS_4D)
@pytest.mark.parametrize("which", ["image", "palette", "grad", "all"])
def test_layouts(device, layout, which):
    """Any strides in (channels_last, column-major, sliced views with NaN gaps, stride 0):
    the result of the contiguous inputs, bit for bit."""
    gen = generator(23)
    image = rand((2, 3, 7, 9), gen, device=device)
    palette = rand((2, 6, 3), gen, device=device)
    grad = randn((2, 6, 7, 9), gen, device=device)
    layout_3d = "contiguous" if layout == "channels_last" else layout
    im = with_layout(image, layout) if which in ("image", "all") else image
    pal = with_layout(palette, layout_3d) if which in ("palette", "all") else palette
    g = with_layout(grad, layout) if which in ("grad", "all") else grad
    got = forward_backward(im, pal, g)
    want = forward_backward(im.contiguous(), pal.contiguous(), g.contiguous())
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    check_forward(got[0], im, pal)
    check_backward(got[1], got[2], im, pal, g)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0), (0, 2, 0, 0)], ids=["B0", "H0", "W0", "all0"])
def test_empty(device, dtype, shape):
    """No pixels or no images: empty outputs, and a zero palette gradient (an empty sum)."""
    B, C, H, W = shape
    image = torch.empty(shape, dtype=dtype, device=device).requires_grad_(True)
    palette = torch.ones(B, 4, C, dtype=dtype, device=device).requires_grad_(True)
    out = cq.palette_distance(image, palette)
    check_output(out, (B, 4, H, W), dtype, device)
    g_x, g_p = torch.autograd.grad(out, (image, palette), torch.ones_like(out))
    check_output(g_x, shape, dtype, device)
    check_output(g_p, (B, 4, C), dtype, device)
    assert torch.equal(g_p, torch.zeros_like(g_p))


def test_only_one_input_requires_grad(device):
    gen = generator(24)
    image = rand((1, 3, 4, 5), gen, dtype=torch.float64, device=device)
    palette = rand((1, 3, 3), gen, dtype=torch.float64, device=device)
    grad = randn((1, 3, 4, 5), gen, dtype=torch.float64, device=device)
    want_x, want_p = reference_grads(image, palette, grad)
    for x_grad, p_grad in ((True, False), (False, True)):
        x = image.clone().requires_grad_(x_grad)
        p = palette.clone().requires_grad_(p_grad)
        cq.palette_distance(x, p).backward(grad)
        assert (x.grad is None) != x_grad and (p.grad is None) != p_grad
        if x_grad:
            torch.testing.assert_close(f64(x.grad), want_x)
        else:
            torch.testing.assert_close(f64(p.grad), want_p)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("C", [1, 3, 5])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_gradcheck(device, C, layout):
    gen = generator(25)
    image = with_layout(randn((2, C, 3, 4), gen, 1.0, torch.float64, device), layout).requires_grad_(True)
    palette = randn((2, 5, C), gen, 1.0, torch.float64, device).requires_grad_(True)
    assert torch.autograd.gradcheck(cq.palette_distance, (image, palette), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("C", [1, 3, 5])
def test_gradgradcheck(device, C):
    gen = generator(26)
    image = randn((2, C, 3, 4), gen, 1.0, torch.float64, device).requires_grad_(True)
    palette = randn((2, 5, C), gen, 1.0, torch.float64, device).requires_grad_(True)
    assert torch.autograd.gradgradcheck(cq.palette_distance, (image, palette), atol=1e-8, rtol=1e-6)


def test_gradcheck_backward_op(device):
    """The backward op alone, differentiated in all three inputs (its own backward: plain torch ops)."""
    gen = generator(27)
    grad = randn((2, 4, 3, 2), gen, 1.0, torch.float64, device).requires_grad_(True)
    image = randn((2, 3, 3, 2), gen, 1.0, torch.float64, device).requires_grad_(True)
    palette = randn((2, 4, 3), gen, 1.0, torch.float64, device).requires_grad_(True)
    assert torch.autograd.gradcheck(BACKWARD_OP, (grad, image, palette), atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(BACKWARD_OP, (grad, image, palette), atol=1e-8, rtol=1e-6)


def test_double_backward_matches_reference(device):
    """A gradient penalty through the op equals the same through the reference."""
    gen = generator(28)

    def second_order(fn, x, p):
        g_x, g_p = torch.autograd.grad((fn(x, p).sin()).sum(), (x, p), create_graph=True)
        return torch.autograd.grad((g_x**2).sum() + (g_p**3).sum(), (x, p))

    image = randn((2, 3, 4, 5), gen, 1.0, torch.float64, device)
    palette = randn((2, 6, 3), gen, 1.0, torch.float64, device)
    got = second_order(cq.palette_distance, image.clone().requires_grad_(True), palette.clone().requires_grad_(True))
    want = second_order(reference.palette_distance, image.clone().requires_grad_(True),
                        palette.clone().requires_grad_(True))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# --------------------------------------------------------------------------- opcheck / compile


def _opcheck_samples(device):
    gen = generator(29)
    for dtype in (torch.float32, torch.float64):
        yield rand((2, 3, 3, 5), gen, dtype=dtype, device=device), rand((2, 4, 3), gen, dtype=dtype, device=device)
        yield (
            with_layout(rand((1, 2, 4, 3), gen, dtype=dtype, device=device), "channels_last"),
            with_layout(rand((1, 7, 2), gen, dtype=dtype, device=device), "sliced"),
        )
        yield rand((3, 1, 1, 1), gen, dtype=dtype, device=device), rand((3, 1, 1), gen, dtype=dtype, device=device)
    yield (rand((2, 5, 2, 2), gen, dtype=torch.bfloat16, device=device),
           rand((2, 3, 5), gen, dtype=torch.bfloat16, device=device))
    yield (rand((2, 3, 2, 3), gen, dtype=torch.float16, device=device),
           rand((2, 2, 3), gen, dtype=torch.float16, device=device))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    for image, palette in _opcheck_samples(device):
        torch.library.opcheck(OP, (image.requires_grad_(requires_grad), palette.requires_grad_(requires_grad)))


def test_opcheck_backward_op(device):
    gen = generator(30)
    for image, palette in _opcheck_samples(device):
        B, _, H, W = image.shape
        grad = randn((B, palette.shape[1], H, W), gen, 1.0, image.dtype, device)
        for requires_grad in (False, True):
            torch.library.opcheck(
                BACKWARD_OP,
                (grad.clone().requires_grad_(requires_grad), image.clone().requires_grad_(requires_grad), palette),
            )


def _loss(image, palette, weight):
    """ColorCNN+'s use: a distance softmax, weighted, plus the nearest colour's distance."""
    d = cq.palette_distance(image, palette)
    probs = torch.softmax(-3.0 * d, dim=1)
    nearest = d.gather(1, d.argmin(1, keepdim=True))
    return (probs * weight).sum() + nearest.sum(), d


def _run_loss(fn, shape, device, seed):
    B, K, C, H, W = shape
    gen = generator(seed)
    image = rand((B, C, H, W), gen, device=device).requires_grad_(True)
    palette = rand((B, K, C), gen, device=device).requires_grad_(True)
    weight = randn((B, K, H, W), gen, device=device)
    loss, d = fn(image, palette, weight)
    loss.backward()
    return loss.detach(), d.detach(), image.grad, palette.grad


@pytest.mark.parametrize("backend,dynamic", [("aot_eager", True), ("inductor", False)])
def test_compile(device, backend, dynamic, fresh_dynamo):
    compiled = torch.compile(_loss, backend=backend, fullgraph=True, dynamic=dynamic)
    for i, shape in enumerate([(2, 5, 3, 6, 7), (3, 4, 2, 5, 9)]):
        for got, want in zip(_run_loss(compiled, shape, device, i), _run_loss(_loss, shape, device, i)):
            torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- determinism


def _determinism_inputs(dtype=torch.float32, device="cpu"):
    gen = generator(32)
    image = rand((3, 3, 120, 150), gen, dtype=dtype, device=device)  # 18000 pixels: 3 CPU chunks
    palette = rand((3, 16, 3), gen, dtype=dtype, device=device)
    grad = randn((3, 16, 120, 150), gen, dtype=dtype, device=device)
    return image, palette, grad


def test_deterministic(device):
    args = _determinism_inputs(device=device)
    first, second = forward_backward(*args), forward_backward(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("C", [3, 2])
def test_independent_of_num_threads(dtype, C, restore_num_threads):
    """CPU only: bit-identical results for 1 and 2 threads (several chunks per image)."""
    image, palette, grad = _determinism_inputs(dtype)
    image, palette = image[:, :C].contiguous(), palette[..., :C].contiguous()
    torch.set_num_threads(1)
    one = forward_backward(image, palette, grad)
    torch.set_num_threads(2)
    two = forward_backward(image, palette, grad)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- errors


# Every case also runs on meta tensors: the fake implementation must reject a call exactly as the kernels do.
@pytest.fixture(params=[*DEVICES, pytest.param("meta", id="meta")], scope="module")
def any_device(request):
    return request.param


CALLS = {"wrapper": cq.palette_distance, "raw": torch.ops.colorquant.palette_distance}


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(shape, dtype=dtype, device=device)


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize(
    "image_shape,palette_shape,exc,match",
    [
        ((3, 4, 5), (1, 4, 3), ValueError, r"image must be 4-D \[B, C, H, W\], got shape \[3, 4, 5\]"),
        ((1, 3, 4, 5, 1), (1, 4, 3), ValueError, r"image must be 4-D"),
        ((1, 3, 4, 5), (4, 3), ValueError, r"palette must be 3-D \[B, K, C\], got shape \[4, 3\]"),
        ((1, 3, 4, 5), (1, 4, 3, 1), ValueError, r"palette must be 3-D"),
        ((2, 3, 4, 5), (1, 4, 3), ValueError, r"palette \[B, K, C\] and image \[B, C, H, W\] must agree in B and C"),
        ((1, 3, 4, 5), (1, 4, 2), ValueError, r"must agree in B and C, got \[1, 4, 2\] and \[1, 3, 4, 5\]"),
        ((1, 3, 4, 5), (1, 0, 3), ValueError, r"number of colours K \(palette.shape\[1\]\) must be in \[1, 256\], got 0"),
        ((1, 3, 4, 5), (1, 257, 3), ValueError, r"number of colours K .* got 257"),
        ((1, 0, 4, 5), (1, 4, 0), ValueError, r"image must have at least one channel"),
    ],
    ids=["image-3d", "image-5d", "palette-2d", "palette-4d", "B", "C", "K0", "K257", "C0"],
)
def test_bad_shapes(any_device, call, image_shape, palette_shape, exc, match):
    with pytest.raises(exc, match=match):
        CALLS[call](t(*image_shape, device=any_device), t(*palette_shape, device=any_device))


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float8_e5m2],
                         ids=["int64", "uint8", "bool", "complex64", "float8"])
@pytest.mark.parametrize("name", ["image", "palette"])
def test_non_floating(any_device, call, dtype, name):
    image = t(1, 3, 2, 2, device=any_device)
    palette = t(1, 4, 3, device=any_device)
    if name == "image":
        image = image.to(dtype)
    else:
        palette = palette.to(dtype)
    with pytest.raises(TypeError, match=rf"{name} must be a floating-point tensor \(float32, float16, bfloat16 or "
                                        rf"float64\), got"):
        CALLS[call](image, palette)


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.float16, torch.bfloat16)])
def test_mixed_dtypes(any_device, call, dtypes):
    with pytest.raises(TypeError, match=r"image and palette must have the same dtype"):
        CALLS[call](t(1, 3, 2, 2, dtype=dtypes[0], device=any_device), t(1, 4, 3, dtype=dtypes[1], device=any_device))


def test_meta_mixed_with_cpu_is_a_device_error():
    with pytest.raises(ValueError, match=r"image and palette must be on the same device, got cpu and meta"):
        OP(t(1, 3, 2, 2), t(1, 4, 3, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("first", ["cpu", "cuda"])
def test_different_devices(call, first):
    second = "cuda" if first == "cpu" else "cpu"
    with pytest.raises(ValueError, match=r"image and palette must be on the same device"):
        CALLS[call](t(1, 3, 2, 2, device=first), t(1, 4, 3, device=second))
    with pytest.raises(ValueError, match=r"grad and the forward tensors must be on the same device"):
        BACKWARD_OP(t(1, 4, 2, 2, device=second), t(1, 3, 2, 2, device=first), t(1, 4, 3, device=first))


@pytest.mark.parametrize("name", ["image", "palette"])
@pytest.mark.parametrize("value", [[[1.0]], 1.0, None, "x"], ids=["list", "float", "None", "str"])
def test_non_tensor_inputs(name, value):
    args = {"image": t(1, 1, 1, 1), "palette": t(1, 2, 1)}
    args[name] = value
    with pytest.raises(TypeError, match=rf"{name} must be a torch.Tensor, got {type(value).__name__}"):
        cq.palette_distance(**args)


@pytest.mark.parametrize(
    "grad_shape,dtype,exc,match",
    [
        ((1, 4, 2, 3), torch.float32, ValueError, r"grad must have shape \[1, 4, 2, 2\], got \[1, 4, 2, 3\]"),
        ((1, 3, 2, 2), torch.float32, ValueError, r"grad must have shape \[1, 4, 2, 2\]"),
        ((1, 4, 2, 2), torch.int64, TypeError, r"grad must be a floating-point tensor"),
    ],
    ids=["W", "K", "int"],
)
def test_backward_op_bad_grad(any_device, grad_shape, dtype, exc, match):
    with pytest.raises(exc, match=match):
        BACKWARD_OP(t(*grad_shape, dtype=dtype, device=any_device), t(1, 3, 2, 2, device=any_device),
                    t(1, 4, 3, device=any_device))
    with pytest.raises(ValueError, match=r"must agree in B and C"):  # the forward's checks come first
        BACKWARD_OP(t(1, 4, 2, 2, device=any_device), t(1, 3, 2, 2, device=any_device),
                    t(1, 4, 2, device=any_device))


def _failure(fn):
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    return type(info.value), str(info.value).split("\n")[0]


@pytest.mark.parametrize(
    "args",
    [
        lambda d: (t(1, 3, 2, 2, device=d), t(2, 4, 3, device=d)),
        lambda d: (t(1, 3, 2, 2, device=d), t(1, 300, 3, device=d)),
        lambda d: (t(1, 3, 2, 2, device=d), t(1, 4, 3, dtype=torch.float64, device=d)),
        lambda d: (t(1, 3, 2, 2, dtype=torch.int32, device=d), t(1, 4, 3, device=d)),
    ],
    ids=["B", "K", "dtype", "int"],
)
def test_meta_fails_like_the_kernels(args):
    kind, message = _failure(lambda: OP(*args("cpu")))
    assert _failure(lambda: OP(*args("meta"))) == (kind, message.replace("cpu", "meta"))
    grad = lambda d: t(1, 4, 2, 2, device=d)  # noqa: E731
    kind, message = _failure(lambda: BACKWARD_OP(grad("cpu"), *args("cpu")))
    assert _failure(lambda: BACKWARD_OP(grad("meta"), *args("meta"))) == (kind, message.replace("cpu", "meta"))


# --------------------------------------------------------------------------- CUDA vs CPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)


@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(2, 5, 3, 9, 11), (1, 256, 3, 4, 5), (2, 7, 6, 33, 35), (1, 3, 1, 40, 41)],
                         ids=["small", "K256", "C6-tiles", "C1-tiles"])
def test_cuda_matches_cpu(dtype, shape):
    """Same per-pixel arithmetic (common/palette_math.h) and order: the distances and
    grad_image agree bit for bit; grad_palette (pixel sums, in tiles on CUDA, in chunks
    of lanes on the CPU) within its error bound, and deterministically."""
    B, K, C, H, W = shape
    gen = generator(33)
    image = rand((B, C, H, W), gen, dtype=dtype)
    palette = rand((B, K, C), gen, dtype=dtype)
    grad = randn((B, K, H, W), gen, dtype=dtype)
    cpu = forward_backward(image, palette, grad)
    cuda = forward_backward(image.cuda(), palette.cuda(), grad.cuda())
    assert_same_bits_or_both_nan(cuda[0], cpu[0], "distance")
    assert_same_bits_or_both_nan(cuda[1], cpu[1], "grad_image")
    check_backward(cuda[1], cuda[2], image, palette, grad)
    again = forward_backward(image.cuda(), palette.cuda(), grad.cuda())
    for a, b in zip(cuda, again):
        assert torch.equal(a, b)


@needs_cuda
def test_cuda_large_batch_and_many_tiles():
    """A batch above gridDim.y's 65535 and images of many tiles (the warp-per-entry finish)."""
    gen = generator(34)
    for B, K, C, H, W in [(65536 + 3, 2, 3, 1, 2), (1, 4, 3, 256, 160)]:
        image = rand((B, C, H, W), gen, device="cuda")
        palette = rand((B, K, C), gen, device="cuda")
        grad = randn((B, K, H, W), gen, device="cuda")
        out, g_x, g_p = forward_backward(image, palette, grad)
        check_forward(out, image, palette)
        check_backward(g_x, g_p, image, palette, grad)


@needs_cuda
def test_cuda_non_default_stream():
    gen = generator(35)
    image = rand((2, 3, 17, 19), gen, device="cuda")
    palette = rand((2, 6, 3), gen, device="cuda")
    grad = randn((2, 6, 17, 19), gen, device="cuda")
    want = forward_backward(image, palette, grad)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = forward_backward(image, palette, grad)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_no_nan_from_large_values(device):
    """Values near float32's range give inf distances, never NaN; float64 stays exact."""
    image = torch.tensor([3e19, -3e19], device=device).reshape(1, 2, 1, 1)
    palette = torch.tensor([[[-3e19, 3e19]]], device=device)
    out = cq.palette_distance(image, palette)
    assert torch.isinf(out).all() and not torch.isnan(out).any()
    x64, p64 = image.double(), palette.double()
    out64 = cq.palette_distance(x64, p64)
    want = float(((x64[0, :, 0, 0] - p64[0, 0]) ** 2).sum())  # 2 * (6e19)^2, of the float32-rounded values
    assert math.isclose(float(out64), want, rel_tol=4e-16) and math.isclose(want, 7.2e39, rel_tol=1e-6)
