"""hard_color_quantize: argmax index map (lowest k wins a tie), mean palette
(zeros for unused colours), quantized == render_index_map(index_map, palette)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import colorquant_ops.ops as cq
from colorquant_ops.ops import reference

from .helpers import (
    FLOAT_DTYPES,
    LAYOUTS_4D,
    amax,
    assert_close64,
    check_output,
    dtype_id,
    f64,
    generator,
    log_uniform,
    mean_tol,
    odd_sizes,
    rand,
    randn,
    with_layout,
)

OP = torch.ops.colorquant.hard_color_quantize.default


def check_hard(logits, image):
    """Runs the op and checks it against the oracle: exact index map, palette
    within summation error, quantized exactly the palette gathered by the map."""
    out = cq.hard_color_quantize(logits, image)
    B, K, H, W = logits.shape
    C = image.shape[1]
    dtype, device = image.dtype, image.device
    check_output(out.quantized, (B, C, H, W), dtype, device)
    check_output(out.index_map, (B, H, W), torch.long, device)
    check_output(out.palette, (B, K, C), dtype, device)
    ref_q, ref_idx, ref_pal = reference.hard_color_quantize(f64(logits), f64(image))
    assert torch.equal(out.index_map.cpu(), ref_idx), "index_map differs from argmax (first maximum)"
    assert_close64(out.palette, ref_pal, what="palette", **mean_tol(dtype, xmax=amax(image), num_pixels=H * W).kw())
    # unused colours: exactly zero
    used = torch.zeros(B, K, dtype=torch.bool)
    if out.index_map.numel():
        used.scatter_(1, out.index_map.cpu().reshape(B, -1), True)
    assert (out.palette.cpu()[~used] == 0).all(), "an unused colour has a nonzero palette entry"
    # quantized is the stored palette gathered by the map, bit for bit
    assert torch.equal(out.quantized, cq.render_index_map(out.index_map, out.palette))
    assert torch.equal(f64(out.quantized), reference.render_index_map(ref_idx, f64(out.palette)))
    return out


@st.composite
def hard_cases(draw):
    return dict(
        B=draw(st.integers(0, 3)),
        K=draw(st.integers(1, 64)),
        C=draw(st.integers(1, 4)),
        H=draw(odd_sizes),
        W=draw(odd_sizes),
        logit_scale=draw(log_uniform(1e-3, 1e4)),
        image_scale=draw(log_uniform(1e-2, 1e2)),
        seed=draw(st.integers(0, 2**31 - 1)),
        logits_layout=draw(st.sampled_from(LAYOUTS_4D)),
        image_layout=draw(st.sampled_from(LAYOUTS_4D)),
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@given(case=hard_cases())
def test_matches_reference(device, dtype, case):
    """Random logits: no ties in float32/64; float16/bfloat16 rounding makes
    some, which the oracle resolves the same way (first maximum)."""
    gen = generator(case["seed"])
    B, K, C, H, W = (case[k] for k in "BKCHW")
    logits = with_layout(randn((B, K, H, W), gen, case["logit_scale"], dtype, device), case["logits_layout"])
    image = with_layout(rand((B, C, H, W), gen, case["image_scale"], -0.5, dtype, device), case["image_layout"])
    check_hard(logits, image)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_ties_lowest_colour_wins(device, dtype):
    gen = generator(20)
    # small integers: many ties per pixel
    logits = torch.randint(0, 3, (3, 9, 11, 13), generator=gen).to(dtype=dtype, device=device)
    image = rand((3, 2, 11, 13), gen, dtype=dtype, device=device)
    out = check_hard(logits, image)
    first_max = (logits == logits.amax(dim=1, keepdim=True)).long().argmax(dim=1)
    assert torch.equal(out.index_map, first_max)
    # an explicit tie between colours 2 and 5 at every pixel
    logits = torch.zeros(2, 7, 3, 4, dtype=dtype, device=device)
    logits[:, 2] = 1.0
    logits[:, 5] = 1.0
    out = check_hard(logits, rand((2, 3, 3, 4), gen, dtype=dtype, device=device))
    assert (out.index_map == 2).all()


def test_all_equal_logits(device):
    """All K logits equal (stride 0 over K): every pixel takes colour 0, the other colours are unused."""
    gen = generator(21)
    logits = randn((2, 1, 5, 6), gen, device=device).expand(2, 6, 5, 6)
    image = rand((2, 3, 5, 6), gen, device=device)
    out = check_hard(logits, image)
    assert (out.index_map == 0).all()
    assert (out.palette[:, 1:] == 0).all()
    torch.testing.assert_close(out.palette[:, 0], image.mean(dim=(2, 3)))


def test_non_finite_logits_follow_torch_argmax(device):
    """+inf wins, -inf never wins, NaN counts as the largest (common/color_math.h), as torch.argmax."""
    logits = torch.zeros(1, 4, 1, 5, device=device)
    logits[0, 2, 0, 0] = float("inf")
    logits[0, :, 0, 1] = float("-inf")
    logits[0, 1, 0, 1] = -1e30
    logits[0, 3, 0, 2] = float("nan")
    logits[0, 1, 0, 3] = float("nan")
    logits[0, 2, 0, 3] = float("nan")
    logits[0, 0, 0, 4] = float("-inf")
    image = torch.arange(5.0, device=device).reshape(1, 1, 1, 5)
    out = cq.hard_color_quantize(logits, image)
    assert out.index_map.tolist() == [[[2, 1, 3, 1, 1]]]
    assert torch.equal(out.index_map, logits.argmax(dim=1))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_single_colour(device, dtype):
    gen = generator(22)
    logits = randn((2, 1, 7, 5), gen, dtype=dtype, device=device)
    image = rand((2, 3, 7, 5), gen, dtype=dtype, device=device)
    out = check_hard(logits, image)
    assert (out.index_map == 0).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_empty_batch(device, dtype):
    logits = torch.empty(0, 5, 3, 4, dtype=dtype, device=device)
    image = torch.empty(0, 2, 3, 4, dtype=dtype, device=device)
    out = check_hard(logits, image)
    assert all(o.numel() == 0 for o in out)


def test_max_colours(device):
    gen = generator(23)
    logits = randn((2, 256, 9, 11), gen, device=device)
    logits[:, 255, 0, 0] = 100.0  # colour 255 used at least once
    check_hard(logits, rand((2, 3, 9, 11), gen, device=device))


def test_large_image(device):
    """More pixels than one CPU work chunk (8192): partial sums combined correctly."""
    gen = generator(41)
    check_hard(randn((2, 7, 97, 101), gen, device=device), rand((2, 3, 97, 101), gen, device=device))


@pytest.mark.parametrize("layout", LAYOUTS_4D)
def test_layouts(device, layout):
    gen = generator(24)
    logits = randn((2, 6, 7, 9), gen, device=device)
    image = rand((2, 3, 7, 9), gen, device=device)
    got = check_hard(with_layout(logits, layout), with_layout(image, layout))
    want = cq.hard_color_quantize(with_layout(logits, layout).contiguous(), with_layout(image, layout).contiguous())
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_outputs_do_not_require_grad(device):
    gen = generator(25)
    logits = randn((2, 4, 3, 3), gen, device=device).requires_grad_(True)
    image = rand((2, 3, 3, 3), gen, device=device).requires_grad_(True)
    out = cq.hard_color_quantize(logits * 2, image)
    for o in out:
        assert not o.requires_grad and o.grad_fn is None
    want = cq.hard_color_quantize((logits * 2).detach(), image.detach())
    for g, w in zip(out, want):
        assert torch.equal(g, w)


def test_opcheck(device):
    gen = generator(26)
    samples = [
        (randn((2, 4, 3, 5), gen, device=device), rand((2, 3, 3, 5), gen, device=device)),
        (
            with_layout(randn((1, 7, 4, 3), gen, dtype=torch.float64, device=device), "channels_last"),
            with_layout(rand((1, 2, 4, 3), gen, dtype=torch.float64, device=device), "sliced"),
        ),
        (randn((3, 1, 1, 1), gen, device=device), rand((3, 1, 1, 1), gen, device=device)),
        (randn((2, 3, 2, 2), gen, dtype=torch.float16, device=device), rand((2, 2, 2, 2), gen, dtype=torch.float16, device=device)),
    ]
    for logits, image in samples:
        torch.library.opcheck(OP, (logits, image))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile(device, dynamic, fresh_dynamo):
    def fn(logits, image):
        q, idx, pal = cq.hard_color_quantize(logits, image)
        return q * 2, idx, pal

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    gen = generator(27)
    for B, K, C, H, W in [(2, 5, 3, 6, 7), (3, 4, 2, 5, 9)]:
        logits, image = randn((B, K, H, W), gen, device=device), rand((B, C, H, W), gen, device=device)
        for got, want in zip(compiled(logits, image), fn(logits, image)):
            assert torch.equal(got, want)


def test_deterministic(device):
    gen = generator(28)
    logits, image = randn((2, 16, 67, 71), gen, device=device), rand((2, 3, 67, 71), gen, device=device)
    for a, b in zip(cq.hard_color_quantize(logits, image), cq.hard_color_quantize(logits, image)):
        assert torch.equal(a, b)


def test_independent_of_num_threads(restore_num_threads):
    """CPU only: bit-identical for 1 and 2 threads (several parallel chunks per image)."""
    gen = generator(29)
    logits, image = randn((3, 8, 120, 150), gen), rand((3, 3, 120, 150), gen)
    torch.set_num_threads(1)
    one = cq.hard_color_quantize(logits, image)
    torch.set_num_threads(2)
    two = cq.hard_color_quantize(logits, image)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_nan_pixel_stays_in_its_colour(device):
    # one NaN pixel makes its own colour's mean NaN and no other (the oracle scatters, as the kernel sums)
    logits = torch.zeros(1, 3, 4, 4, dtype=torch.float64, device=device)
    logits[0, 1, :2] = 1.0
    logits[0, 2, 2:] = 1.0
    image = torch.rand(1, 3, 4, 4, dtype=torch.float64, device=device)
    image[0, :, 0, 0] = float("nan")  # a colour-1 pixel
    for quantized, index_map, palette in (cq.hard_color_quantize(logits, image),
                                          reference.hard_color_quantize(logits, image)):
        assert bool(palette[0, 1].isnan().all()) and bool(palette[0, 2].isfinite().all())
        assert bool(quantized[0, :, 2:].isfinite().all())
    torch.testing.assert_close(cq.hard_color_quantize(logits, image).palette,
                               reference.hard_color_quantize(logits, image)[2], equal_nan=True)
