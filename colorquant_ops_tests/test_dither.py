"""floyd_steinberg_dither: exact agreement with the raster-order loop
(colorquant_ops.quantizers.reference), palette-only output, exact reproduction,
dtypes, layouts, edge cases, errors, opcheck and torch.compile."""

import pytest
import torch

import colorquant_ops.ops as cq
from colorquant_ops.quantizers.reference import floyd_steinberg_batch_reference

from .helpers import (
    CUDA_SKIP_REASON,
    FLOAT_DTYPES,
    LAYOUTS_3D,
    LAYOUTS_4D,
    check_output,
    dtype_id,
    f64,
    generator,
    rand,
    with_layout,
)

OP = torch.ops.colorquant.floyd_steinberg_dither.default


def random_case(B, C, H, W, K, seed, device, dtype=torch.float64, palette_range=(-0.1, 1.2)):
    """Image uniform in [0, 1); palette uniform in palette_range (a palette that
    does not cover the image makes the errors grow: they are never clamped)."""
    gen = generator(seed)
    image = rand((B, C, H, W), gen, dtype=dtype, device=device)
    lo, hi = palette_range
    palette = rand((B, K, C), gen, scale=hi - lo, offset=lo, dtype=dtype, device=device)
    return image, palette


# --------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("K", [1, 2, 16, 33])
@pytest.mark.parametrize("H,W", [(1, 1), (1, 13), (11, 1), (7, 9), (16, 5), (5, 16), (2, 2)])
def test_matches_loop(device, K, H, W):
    image, palette = random_case(2, 3, H, W, K, seed=1000 * K + 10 * H + W, device=device)
    got = cq.floyd_steinberg_dither(image, palette)
    check_output(got, (2, H, W), torch.long, device)
    assert torch.equal(got.cpu(), floyd_steinberg_batch_reference(image, palette))


@pytest.mark.parametrize("C", [1, 2, 4, 5])
@pytest.mark.parametrize("palette_range", [(-0.1, 1.2), (0.0, 0.3), (-5.0, 5.0)], ids=["covering", "dark", "wide"])
def test_matches_loop_channels(device, C, palette_range):
    """Every channel count (the CUDA kernel specializes C = 1, 3, 4) and
    palettes whose errors grow large (no clamping)."""
    image, palette = random_case(2, C, 9, 12, 7, seed=C, device=device, palette_range=palette_range)
    got = cq.floyd_steinberg_dither(image, palette)
    assert torch.equal(got.cpu(), floyd_steinberg_batch_reference(image, palette))


@pytest.mark.parametrize("H,W", [(1100, 2), (3, 700)], ids=["tall", "wide"])
def test_matches_loop_large(device, H, W):
    """More rows than one CUDA block has threads (several wavefront passes), and a wide image."""
    image, palette = random_case(1, 3, H, W, 5, seed=H + W, device=device)
    got = cq.floyd_steinberg_dither(image, palette)
    assert torch.equal(got.cpu(), floyd_steinberg_batch_reference(image, palette))


@pytest.mark.parametrize("distinct", [4, 16])
def test_ties_go_to_lowest_index(device, distinct):
    """A palette with repeated colours: the first copy always wins (K = 12 and
    K = 48: the CPU kernel searches palettes of 16 colours or more with vector instructions)."""
    image, palette = random_case(2, 3, 6, 7, distinct, seed=5, device=device)
    palette = torch.cat([palette, palette.flip(1), palette], dim=1)  # every colour three times
    got = cq.floyd_steinberg_dither(image, palette)
    assert int(got.max()) < distinct
    assert torch.equal(got.cpu(), floyd_steinberg_batch_reference(image, palette))


@pytest.mark.parametrize("K", [6, 40])
def test_nan_colours(device, K):
    """A NaN distance never wins against an earlier colour: a NaN colour after
    the first is never chosen (the result is that of the palette without it),
    and a NaN first colour wins every pixel (nearest_colour's rule, both searches)."""
    image, palette = random_case(2, 3, 7, 9, K, seed=K, device=device)
    nan_rows = [3, K - 1]
    with_nan = palette.clone()
    with_nan[:, nan_rows] = float("nan")
    keep = [k for k in range(K) if k not in nan_rows]
    got = cq.floyd_steinberg_dither(image, with_nan).cpu()
    want = torch.tensor(keep)[cq.floyd_steinberg_dither(image, palette[:, keep]).cpu()]
    assert torch.equal(got, want)
    with_nan[:, 0] = float("nan")
    assert not cq.floyd_steinberg_dither(image, with_nan).any()


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_uses_only_palette_colours(device, dtype):
    image, palette = random_case(3, 3, 13, 17, 6, seed=7, device=device, dtype=dtype)
    index_map = cq.floyd_steinberg_dither(image, palette)
    check_output(index_map, (3, 13, 17), torch.long, device)
    assert int(index_map.min()) >= 0 and int(index_map.max()) < 6
    rendered = cq.render_index_map(index_map, palette)  # [B,C,H,W]
    pixels = rendered.permute(0, 2, 3, 1).reshape(3, -1, 1, 3)
    assert bool((pixels == palette.unsqueeze(1)).all(-1).any(-1).all())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_palette_of_all_pixel_colours_reproduces_image(device, dtype):
    """Every pixel is a palette colour: all errors are zero and dithering is the identity."""
    gen = generator(8)
    B, K, C, H, W = 2, 9, 3, 10, 14
    palette = rand((B, K, C), gen, dtype=dtype, device=device)
    labels = torch.randint(0, K, (B, H, W), generator=gen).to(device)
    image = cq.render_index_map(labels, palette)
    got = cq.floyd_steinberg_dither(image, palette)
    assert torch.equal(got, labels)
    assert torch.equal(cq.render_index_map(got, palette), image)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_low_precision_close_to_loop(device, dtype):
    """Errors in float32 (float64 in the loop): the indices diverge at most
    after a near tie, so nearly all agree on a small image."""
    image, palette = random_case(2, 3, 8, 8, 8, seed=9, device=device, dtype=dtype)
    got = cq.floyd_steinberg_dither(image, palette)
    want = floyd_steinberg_batch_reference(f64(image), f64(palette))
    assert (got.cpu() == want).double().mean() > 0.9


@pytest.mark.parametrize("layout", LAYOUTS_4D)
@pytest.mark.parametrize("palette_layout", LAYOUTS_3D)
def test_layouts(device, layout, palette_layout):
    image, palette = random_case(2, 3, 5, 6, 4, seed=10, device=device)
    image = with_layout(image, layout)
    palette = with_layout(palette, palette_layout)
    got = cq.floyd_steinberg_dither(image, palette)
    assert torch.equal(got.cpu(), floyd_steinberg_batch_reference(image, palette))


def test_batch_items_independent(device):
    image, palette = random_case(4, 3, 9, 11, 5, seed=11, device=device)
    batched = cq.floyd_steinberg_dither(image, palette)
    for b in range(4):
        assert torch.equal(batched[b : b + 1], cq.floyd_steinberg_dither(image[b : b + 1], palette[b : b + 1]))


@pytest.mark.parametrize("B,H,W", [(0, 4, 5), (2, 0, 5), (2, 4, 0)])
def test_empty(device, B, H, W):
    image, palette = random_case(B, 3, H, W, 3, seed=12, device=device)
    check_output(cq.floyd_steinberg_dither(image, palette), (B, H, W), torch.long, device)


def test_no_grad(device):
    image, palette = random_case(1, 3, 4, 5, 3, seed=13, device=device)
    out = cq.floyd_steinberg_dither(image.requires_grad_(True), palette.requires_grad_(True))
    assert not out.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("C", [1, 3, 4, 6])
def test_cuda_matches_cpu(dtype, C):
    """Same arithmetic on both devices (common/palette_math.h): identical indices,
    including several wavefront passes (H > 1024) and a large batch."""
    for B, H, W, K in [(3, 17, 23, 16), (1, 1030, 7, 4), (300, 5, 6, 3)]:
        image, palette = random_case(B, C, H, W, K, seed=B + H + C, device="cpu", dtype=dtype)
        want = cq.floyd_steinberg_dither(image, palette)
        got = cq.floyd_steinberg_dither(image.cuda(), palette.cuda())
        assert torch.equal(got.cpu(), want)


# --------------------------------------------------------------------------- errors


OPS = {"wrapper": cq.floyd_steinberg_dither, "raw": torch.ops.colorquant.floyd_steinberg_dither}


@pytest.fixture(params=list(OPS), ids=list(OPS))
def dither_op(request):
    return OPS[request.param]


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(shape, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "image_shape,palette_shape,exc,match",
    [
        ((2, 3, 4), (2, 5, 3), ValueError, r"image must be 4-D"),
        ((2, 0, 4, 5), (2, 5, 0), ValueError, r"image must have at least one channel"),
        ((2, 3, 4, 5), (2, 15), ValueError, r"palette must be 3-D"),
        ((2, 3, 4, 5), (3, 5, 3), ValueError, r"must agree in B and C"),
        ((2, 3, 4, 5), (2, 5, 4), ValueError, r"must agree in B and C"),
        ((2, 3, 4, 5), (2, 0, 3), ValueError, r"must be in \[1, 256\]"),
        ((2, 3, 4, 5), (2, 257, 3), ValueError, r"must be in \[1, 256\]"),
    ],
)
def test_bad_shapes(device, dither_op, image_shape, palette_shape, exc, match):
    with pytest.raises(exc, match=match):
        dither_op(_t(*image_shape, device=device), _t(*palette_shape, device=device))


def test_bad_dtypes(device, dither_op):
    with pytest.raises(TypeError, match=r"image must be a floating-point tensor.*convert it first"):
        dither_op(_t(1, 3, 4, 5, dtype=torch.uint8, device=device), _t(1, 2, 3, device=device))
    with pytest.raises(TypeError, match=r"palette must be a floating-point tensor"):
        dither_op(_t(1, 3, 4, 5, device=device), _t(1, 2, 3, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match=r"must have the same dtype"):
        dither_op(_t(1, 3, 4, 5, device=device), _t(1, 2, 3, dtype=torch.float64, device=device))


def test_not_tensors():
    with pytest.raises(TypeError, match=r"image must be a torch.Tensor, got list"):
        cq.floyd_steinberg_dither([[0.0]], _t(1, 2, 1))
    with pytest.raises(TypeError, match=r"palette must be a torch.Tensor, got ndarray"):
        cq.floyd_steinberg_dither(_t(1, 1, 2, 2), _t(1, 2, 1).numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
def test_different_devices(dither_op):
    with pytest.raises(ValueError, match=r"must be on the same device"):
        dither_op(_t(1, 3, 4, 5), _t(1, 2, 3, device="cuda"))


# --------------------------------------------------------------------------- opcheck / compile


def test_opcheck(device):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        image, palette = random_case(2, 3, 5, 7, 4, seed=14, device=device, dtype=dtype)
        torch.library.opcheck(OP, (image, palette))
        torch.library.opcheck(OP, (with_layout(image, "channels_last"), with_layout(palette, "sliced")))
    image, palette = random_case(0, 2, 3, 3, 1, seed=15, device=device)
    torch.library.opcheck(OP, (image, palette))


def _dither_and_render(image, palette):
    index_map = cq.floyd_steinberg_dither(image, palette)
    return index_map, cq.render_index_map(index_map, palette) * 2


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile(device, dynamic, fresh_dynamo):
    compiled = torch.compile(_dither_and_render, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for shape in [(2, 3, 6, 7), (1, 3, 4, 9)]:
        image, palette = random_case(*shape, 5, seed=16, device=device, dtype=torch.float32)
        for got, want in zip(compiled(image, palette), _dither_and_render(image, palette)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("nan_at", [0, 1, 3])
def test_nan_palette_entry_reference_matches_kernel(nan_at):
    # the kernels' rule: a NaN distance never beats an earlier colour; at colour 0 it keeps colour 0
    g = torch.Generator().manual_seed(nan_at)
    image = torch.rand(1, 3, 6, 7, generator=g)
    palette = torch.rand(1, 4, 3, generator=g)
    palette[0, nan_at, 1] = float("nan")
    expected = floyd_steinberg_batch_reference(image, palette)
    assert torch.equal(cq.floyd_steinberg_dither(image, palette), expected)
    if nan_at == 0:
        assert bool((expected == 0).all())
    else:
        assert not bool((expected == nan_at).any())


def test_clamped_dither_matches_the_straightforward_loop(device):
    # the seed paper's dithering clamps each value (pixel + received error) to the colour range
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64) ** 3  # dark: errors push below 0
    palette = torch.tensor([[0.3, 0.3, 0.3], [0.9, 0.8, 0.7]], dtype=torch.float64).expand(2, 2, 3).contiguous()
    got = cq.floyd_steinberg_dither(image.to(device), palette.to(device), clamp=(0.0, 1.0)).cpu()
    assert torch.equal(got, floyd_steinberg_batch_reference(image, palette, clamp=(0.0, 1.0)))
    unclamped = floyd_steinberg_batch_reference(image, palette)
    assert not torch.equal(got, unclamped)  # the clamp changes the result here
    assert torch.equal(cq.floyd_steinberg_dither(image.to(device), palette.to(device)).cpu(), unclamped)
    one_sided = cq.floyd_steinberg_dither(image.to(device), palette.to(device), clamp=(0.0, None)).cpu()
    assert torch.equal(one_sided, floyd_steinberg_batch_reference(image, palette, clamp=(0.0, None)))


@pytest.mark.parametrize("clamp, error, match", [
    ((1.0, 0.0), ValueError, "clamp_min must be <= clamp_max"),
    ((float("nan"), 1.0), ValueError, "must not be NaN"),
    (1.0, TypeError, "clamp must be None or a \\(low, high\\) pair"),
    (("a", 1.0), TypeError, "clamp must be a Python number"),
])
def test_bad_clamp(clamp, error, match):
    with pytest.raises(error, match=match):
        cq.floyd_steinberg_dither(torch.rand(1, 3, 4, 4), torch.rand(1, 2, 3), clamp=clamp)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixels_are_an_error(device, bad):
    image = torch.rand(1, 3, 4, 4, device=device)
    image[0, 2, 1, 1] = bad
    with pytest.raises(ValueError, match="image contains NaN or infinite values"):
        cq.floyd_steinberg_dither(image, torch.rand(1, 2, 3, device=device))
