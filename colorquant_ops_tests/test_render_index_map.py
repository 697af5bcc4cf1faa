"""render_index_map: image[b,c,h,w] = palette[b, index_map[b,h,w], c], its
gradient w.r.t. the palette, out-of-range indices, layouts, opcheck, compile."""

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
    check_output,
    check_render_backward,
    dtype_id,
    f64,
    generator,
    odd_sizes,
    randn,
    random_index_map,
    with_layout,
)

OP = torch.ops.colorquant.render_index_map.default
BACKWARD_OP = torch.ops.colorquant.render_index_map_backward.default


@st.composite
def render_cases(draw):
    return dict(
        B=draw(st.integers(0, 3)),
        K=draw(st.integers(1, 256)),
        C=draw(st.integers(1, 4)),
        H=draw(odd_sizes),
        W=draw(odd_sizes),
        seed=draw(st.integers(0, 2**31 - 1)),
        index_layout=draw(st.sampled_from(LAYOUTS_3D)),
        palette_layout=draw(st.sampled_from(LAYOUTS_3D)),
        grad_layout=draw(st.sampled_from(LAYOUTS_4D)),
    )


def make_inputs(case, dtype, device):
    gen = generator(case["seed"])
    B, K, C, H, W = (case[k] for k in "BKCHW")
    index_map = with_layout(random_index_map((B, H, W), K, gen, device), case["index_layout"])
    palette = with_layout(randn((B, K, C), gen, 10.0, dtype, device), case["palette_layout"])
    return index_map, palette, gen


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@given(case=render_cases())
def test_matches_reference(device, dtype, case):
    """Forward: an exact gather. Backward: per-colour sums of the upstream gradient."""
    index_map, palette, gen = make_inputs(case, dtype, device)
    palette.requires_grad_(True)
    out = cq.render_index_map(index_map, palette)
    B, H, W = index_map.shape
    K, C = palette.shape[1:]
    check_output(out, (B, C, H, W), dtype, device)
    assert torch.equal(f64(out), reference.render_index_map(f64(index_map), f64(palette)))

    grad = with_layout(randn(out.shape, gen, 1.0, dtype, device), case["grad_layout"])
    (got,) = torch.autograd.grad(out, palette, grad)
    check_output(got, (B, K, C), dtype, device)
    check_render_backward(got, index_map, palette, grad)


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("K", [1, 2, 16, 17, 32, 33, 64, 65])
def test_copies_palette_bits(device, dtype, K):
    """The gather moves bits: NaN payloads, -0, infinities and subnormals come
    out unchanged, at the palette sizes where the CPU's lookup changes (one
    or two halves of a register table up to 64 colours, memory above) and at
    image sizes around its 16-pixel steps."""
    gen = generator(33)
    bits = _BITS[dtype]
    info = torch.iinfo(bits)
    for pixels in (1, 15, 16, 17, 47):
        index_map = random_index_map((3, 1, pixels), K, gen, device)
        raw = torch.randint(info.min, info.max, (3, K, 3), generator=gen, dtype=torch.int64).to(bits)
        raw[:, 0, 0] = torch.tensor(-0.0, dtype=dtype).view(bits)  # and random NaN payloads, above
        palette = raw.view(dtype).to(device)
        out = cq.render_index_map(index_map, palette)
        want = reference.render_index_map(index_map.cpu(), raw)  # the same gather on integers
        assert torch.equal(out.cpu().view(bits), want)


@pytest.mark.parametrize("layout", LAYOUTS_3D)
def test_gradcheck(device, layout):
    gen = generator(30)
    index_map = with_layout(random_index_map((2, 4, 5), 6, gen, device), layout)
    # gradcheck rejects stride-0 inputs: an expanded layout applies to the index map only
    palette_layout = "contiguous" if layout == "expanded" else layout
    palette = with_layout(randn((2, 6, 3), gen, 1.0, torch.float64, device), palette_layout).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: cq.render_index_map(index_map, p), (palette,), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("bad", [-1, "K", 2**40, -(2**62)])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("K", [6, 40])
def test_out_of_range_index(device, bad, where, K):
    """Indices outside [0, K) raise IndexError (never read out of bounds), also
    in the second image of the batch and through a non-contiguous index map.
    On the CPU, the first and middle pixels go through the 16-pixel AVX-512
    steps (one or two palette halves: K = 6, 40), the last through the tail."""
    gen = generator(31)
    index_map = random_index_map((2, 5, 7), K, gen, device)
    index_map[{"first": (0, 0, 0), "middle": (1, 2, 3), "last": (1, 4, 6)}[where]] = K if bad == "K" else bad
    palette = randn((2, K, 3), gen, device=device)
    for idx in (index_map, with_layout(index_map, "reversed")):
        with pytest.raises(IndexError, match=r"index"):
            cq.render_index_map(idx, palette)
        with pytest.raises(IndexError, match=r"index"):
            BACKWARD_OP(torch.ones(2, 3, 5, 7, device=device), idx, palette)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_empty_batch(device, dtype):
    index_map = torch.empty(0, 3, 4, dtype=torch.long, device=device)
    palette = torch.empty(0, 5, 2, dtype=dtype, device=device, requires_grad=True)
    out = cq.render_index_map(index_map, palette)
    check_output(out, (0, 2, 3, 4), dtype, device)
    out.sum().backward()
    assert palette.grad.shape == palette.shape


def test_max_colours_and_unused_colours(device):
    """K=256 with index 255 present; unused colours get a zero gradient."""
    gen = generator(32)
    index_map = random_index_map((2, 6, 7), 200, gen, device)
    index_map[:, 0, 0] = 255
    palette = randn((2, 256, 3), gen, device=device).requires_grad_(True)
    out = cq.render_index_map(index_map, palette)
    assert torch.equal(out[:, :, 0, 0], palette[:, 255].detach())
    assert torch.equal(f64(out), reference.render_index_map(f64(index_map), f64(palette)))
    out.sum().backward()
    counts = torch.zeros(2, 256).scatter_add_(1, index_map.cpu().reshape(2, -1), torch.ones(2, 42))
    assert torch.equal(f64(palette.grad), counts[:, :, None].double().expand(2, 256, 3))


def test_large_image(device):
    """More pixels than one CPU work chunk (8192), an out-of-range index in the last chunk."""
    gen = generator(42)
    index_map = random_index_map((2, 97, 101), 9, gen, device)
    palette = randn((2, 9, 3), gen, device=device).requires_grad_(True)
    grad = randn((2, 3, 97, 101), gen, device=device)
    out = cq.render_index_map(index_map, palette)
    assert torch.equal(f64(out), reference.render_index_map(f64(index_map), f64(palette)))
    (got,) = torch.autograd.grad(out, palette, grad)
    check_render_backward(got, index_map, palette, grad)
    index_map[1, 96, 100] = 9
    with pytest.raises(IndexError, match=r"index"):
        cq.render_index_map(index_map, palette)


def test_double_backward_matches_reference(device):
    gen = generator(36)
    index_map = random_index_map((1, 3, 4), 5, gen, device)

    def second_order(render, p):
        (g,) = torch.autograd.grad((render(index_map, p) ** 2).sum(), p, create_graph=True)
        (gg,) = torch.autograd.grad((g**2).sum(), p, allow_unused=True)
        return gg

    palette = randn((1, 5, 2), gen, 1.0, torch.float64, device)
    got = second_order(cq.render_index_map, palette.clone().requires_grad_(True))
    want = second_order(reference.render_index_map, palette.clone().requires_grad_(True))
    assert got is not None
    torch.testing.assert_close(got, want)


def test_opcheck(device):
    gen = generator(33)
    samples = [
        (random_index_map((2, 3, 5), 4, gen, device), randn((2, 4, 3), gen, device=device)),
        (
            with_layout(random_index_map((1, 4, 3), 7, gen, device), "sliced"),
            with_layout(randn((1, 7, 2), gen, dtype=torch.float64, device=device), "reversed"),
        ),
        (random_index_map((3, 1, 1), 1, gen, device), randn((3, 1, 1), gen, dtype=torch.bfloat16, device=device)),
    ]
    for index_map, palette in samples:
        for requires_grad in (False, True):
            torch.library.opcheck(OP, (index_map, palette.detach().requires_grad_(requires_grad)))
        grad = randn((index_map.shape[0], palette.shape[2], *index_map.shape[1:]), gen, dtype=palette.dtype, device=device)
        torch.library.opcheck(BACKWARD_OP, (grad, index_map, palette))


@pytest.mark.parametrize("backend,dynamic", [("aot_eager", True), ("inductor", False)])
def test_compile(device, backend, dynamic, fresh_dynamo):
    def fn(index_map, palette, weight):
        return (cq.render_index_map(index_map, palette) * weight).sum()

    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)
    gen = generator(34)
    for B, K, C, H, W in [(2, 5, 3, 6, 7), (3, 4, 2, 5, 9)]:
        index_map = random_index_map((B, H, W), K, gen, device)
        palette = randn((B, K, C), gen, device=device)
        weight = randn((B, C, H, W), gen, device=device)
        results = []
        for f in (compiled, fn):
            p = palette.clone().requires_grad_(True)
            loss = f(index_map, p, weight)
            loss.backward()
            results.append((loss.detach(), p.grad))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want)


def test_independent_of_num_threads(restore_num_threads):
    """CPU only: the palette gradient is bit-identical for 1 and 2 threads."""
    gen = generator(35)
    index_map = random_index_map((3, 120, 150), 16, gen)
    palette = randn((3, 16, 3), gen)
    grad = randn((3, 3, 120, 150), gen)
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        p = palette.clone().requires_grad_(True)
        out = cq.render_index_map(index_map, p)
        out.backward(grad)
        results.append((out.detach(), p.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
