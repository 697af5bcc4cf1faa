"""PIL baselines (colorquant_ops.quantizers.pil) and the plain references
(colorquant_ops.quantizers.reference)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from colorquant_ops.ops.reference import render_index_map
from colorquant_ops.quantizers import (
    METHODS,
    count_colors,
    floyd_steinberg_reference,
    kmeans_inertia,
    pil_quantize,
    pil_quantize_image,
)
from colorquant_ops.quantizers.reference import floyd_steinberg_batch_reference

KS = (2, 3, 4, 16, 64, 256)


def _gradient(h=32, w=32, dtype=torch.float32):
    """Smooth synthetic RGB image [1,3,H,W] in [0,1]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(6 * xx + 4 * yy)])[None].to(dtype)


def _random_uint8(b=2, h=24, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def _few_colours(n=5, seed=1):
    """uint8 [2,3,20,20] images using exactly n colours (none black)."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(1, 256, (n, 3), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, n, (2, 20, 20), generator=g)
    labels[:, 0, :n] = torch.arange(n)
    return colours[labels].permute(0, 3, 1, 2).contiguous()


# --- pil_quantize -----------------------------------------------------------


@pytest.mark.parametrize("dither", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_at_most_k_colours_and_valid_indices(method, dither):
    images = [_random_uint8(), _gradient(24, 24).expand(2, 3, 24, 24).contiguous()]
    for image in images:
        B, _, H, W = image.shape
        for K in KS:
            index_map, palette = pil_quantize(image, K, method=method, dither=dither)
            assert index_map.dtype == torch.int64 and index_map.shape == (B, H, W)
            assert palette.shape == (B, K, 3) and palette.dtype == image.dtype
            assert int(index_map.min()) >= 0 and int(index_map.max()) < K
            rendered = render_index_map(index_map, palette)
            assert (count_colors(rendered) <= K).all(), (method, dither, K)
            # every rendered pixel is a row of its image's palette
            for b in range(B):
                pixels = rendered[b].reshape(3, -1).T  # [P,3]
                assert (pixels[:, None, :] == palette[b][None]).all(-1).any(-1).all()


@pytest.mark.parametrize("method", METHODS)
def test_dithering_diffuses_the_error(method):
    # Same palette, different index map, and a better local mean (what error
    # diffusion is for).
    image = _gradient(32, 32, torch.float64)
    for K in (2, 4, 16):
        plain_idx, plain_pal = pil_quantize(image, K, method=method)
        dith_idx, dith_pal = pil_quantize(image, K, method=method, dither=True)
        assert torch.equal(plain_pal, dith_pal)
        assert not torch.equal(plain_idx, dith_idx)
        plain = render_index_map(plain_idx, plain_pal)
        dith = render_index_map(dith_idx, dith_pal)
        block_err = [(F.avg_pool2d(q, 4) - F.avg_pool2d(image, 4)).abs().mean() for q in (plain, dith)]
        assert block_err[1] < block_err[0], (K, block_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_float_input_quantizes_its_uint8_rendering(dtype):
    u8 = _random_uint8(seed=3)
    x = (u8.double() / 255).to(dtype)
    for method in METHODS:
        idx_u8, pal_u8 = pil_quantize(u8, 8, method=method)
        idx_f, pal_f = pil_quantize(x, 8, method=method)
        assert pal_u8.dtype == torch.uint8 and pal_f.dtype == dtype
        assert torch.equal(idx_f, idx_u8)
        assert torch.equal(pal_f, (pal_u8.double() / 255).to(dtype))


def test_fewer_colours_than_k_are_kept_exactly_and_padded_with_zeros():
    image = _few_colours(5)
    for method in METHODS:
        for dither in (False, True):
            index_map, palette = pil_quantize(image, 16, method=method, dither=dither)
            assert torch.equal(render_index_map(index_map, palette), image), (method, dither)
            assert torch.equal((palette != 0).any(-1).sum(-1), torch.tensor([5, 5]))
            assert int(index_map.max()) < 5


def test_kmeans_refinement_lowers_inertia():
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    median = kmeans_inertia(images, *pil_quantize(images, 16, "median_cut"))
    kmeans = kmeans_inertia(images, *pil_quantize(images, 16, "kmeans"))
    assert (kmeans < median).all(), (kmeans, median)


def test_pil_image_helper_matches_tensor_path():
    u8 = _random_uint8(b=1, h=17, w=23, seed=5)
    pil_image = Image.fromarray(u8[0].permute(1, 2, 0).numpy())
    for method in METHODS:
        for dither in (False, True):
            idx, pal = pil_quantize_image(pil_image, 7, method=method, dither=dither)
            idx_t, pal_t = pil_quantize(u8, 7, method=method, dither=dither)
            assert idx.shape == (17, 23) and pal.shape == (7, 3)
            assert torch.equal(idx, idx_t[0]) and torch.equal(pal, pal_t[0])
    # non-RGB modes are converted to RGB first
    idx, pal = pil_quantize_image(pil_image.convert("L"), 4)
    assert pal.shape == (4, 3) and bool((pal[:, 0] == pal[:, 1]).all())


def test_empty_batch():
    index_map, palette = pil_quantize(torch.zeros(0, 3, 8, 8), 4)
    assert index_map.shape == (0, 8, 8) and palette.shape == (0, 4, 3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_colors": 0}, ValueError, r"num_colors must be in \[1, 256\]"),
        ({"num_colors": 257}, ValueError, r"num_colors must be in \[1, 256\]"),
        ({"num_colors": 4.0}, TypeError, "num_colors must be an int"),
        ({"method": "popularity"}, ValueError, "method must be one of"),
        ({"images": torch.zeros(1, 2, 8, 8)}, ValueError, "3 channels"),
        ({"images": torch.zeros(3, 8, 8)}, ValueError, "4-D"),
        ({"images": torch.zeros(1, 3, 8, 8, dtype=torch.int32)}, TypeError, "uint8 or floating point"),
        ({"images": torch.full((1, 3, 8, 8), float("nan"))}, ValueError, "NaN"),
        ({"images": np.zeros((1, 3, 8, 8), np.uint8)}, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"images": torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "num_colors": 4}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        pil_quantize(**args)


def test_bad_input_pil_image_helper():
    with pytest.raises(ValueError, match=r"num_colors must be in \[1, 256\]"):
        pil_quantize_image(Image.new("RGB", (4, 4)), 300)
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        pil_quantize_image(torch.zeros(3, 4, 4), 4)


# --- floyd_steinberg_reference ---------------------------------------------


def test_floyd_steinberg_exact_palette_gives_zero_error():
    g = torch.Generator().manual_seed(0)
    palette = torch.rand(6, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (13, 11), generator=g)
    image = palette[labels].permute(2, 0, 1)  # [C,H,W]
    for img, pal in ((image, palette), (image.numpy(), palette.numpy())):
        index_map = floyd_steinberg_reference(img, pal)
        assert index_map.dtype == torch.int64 and index_map.shape == (13, 11)
        assert torch.equal(index_map, labels)


def test_floyd_steinberg_flat_grey_half_and_half():
    for channels in (1, 3):
        image = np.full((channels, 16, 16), 0.5)
        palette = np.stack([np.zeros(channels), np.ones(channels)])
        index_map = floyd_steinberg_reference(image, palette)
        assert set(index_map.unique().tolist()) == {0, 1}
        assert abs(index_map.double().mean().item() - 0.5) < 0.05
        # the error is diffused, not accumulated: every 4x4 block is half white
        blocks = F.avg_pool2d(index_map[None, None].double(), 4)
        assert ((blocks - 0.5).abs() <= 0.25).all()


def test_floyd_steinberg_hand_computed_weights():
    # Grey 2x2, palette {0, 1}. Pixel (0,0)=0.6 -> 1, error -0.4 (7/16 right,
    # 5/16 down, 1/16 down-right); (0,1)=0.7-0.175 -> 1, error -0.475 (3/16
    # down-left, 5/16 down); (1,0)=0.7-0.125-0.0890625 -> 0, error 0.4859375
    # (7/16 right); (1,1)=0.7-0.025-0.1484375+0.2125977 -> 1.
    image = np.array([[[0.6, 0.7], [0.7, 0.7]]])
    index_map = floyd_steinberg_reference(image, np.array([[0.0], [1.0]]))
    assert index_map.tolist() == [[1, 1], [0, 1]]
    # Without the 3/16 down-left weight pixel (1,0) would be 0.575 -> 1.
    # No clamping: (0,1) = 0.0 - 0.175 = -0.175 -> 0 with error -0.175, so
    # (0,2) = 0.55 - 0.0765625 -> 0 (clamping (0,1) to 0 would give 0.55 -> 1).
    index_map = floyd_steinberg_reference(np.array([[[0.6, 0.0, 0.55]]]), np.array([[0.0], [1.0]]))
    assert index_map.tolist() == [[1, 0, 0]]


def test_floyd_steinberg_ties_go_to_lowest_index():
    image = np.full((3, 4, 5), 0.25)
    palette = np.array([[1.0, 1.0, 1.0], [0.25, 0.25, 0.25], [0.25, 0.25, 0.25]])
    assert (floyd_steinberg_reference(image, palette) == 1).all()


def test_floyd_steinberg_batch_matches_single():
    g = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 7, 9, generator=g, dtype=torch.float64)
    palettes = torch.rand(3, 4, 3, generator=g, dtype=torch.float64)
    batch = floyd_steinberg_batch_reference(images, palettes)
    assert batch.shape == (3, 7, 9)
    for b in range(3):
        assert torch.equal(batch[b], floyd_steinberg_reference(images[b], palettes[b]))


def test_floyd_steinberg_bad_shapes():
    with pytest.raises(ValueError, match=r"image must be \[C,H,W\]"):
        floyd_steinberg_reference(np.zeros((4, 4)), np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"palette must be \[K,C\]"):
        floyd_steinberg_reference(np.zeros((3, 4, 4)), np.zeros((2, 1)))


# --- kmeans_inertia, count_colors ------------------------------------------


def test_kmeans_inertia():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 5, 6, generator=g, dtype=torch.float64)
    index_map = torch.randint(0, 4, (2, 5, 6), generator=g)
    palette = torch.rand(2, 4, 3, generator=g, dtype=torch.float64)
    expected = torch.stack(
        [
            sum(
                ((image[b, :, y, x] - palette[b, index_map[b, y, x]]) ** 2).sum()
                for y in range(5)
                for x in range(6)
            )
            for b in range(2)
        ]
    )
    torch.testing.assert_close(kmeans_inertia(image, index_map, palette), expected)
    exact = palette.gather(1, index_map.reshape(2, -1, 1).expand(2, 30, 3)).transpose(1, 2).reshape(2, 3, 5, 6)
    assert (kmeans_inertia(exact, index_map, palette) == 0).all()
    # uint8 image and palette: exact integers in float64
    u8 = torch.tensor([[[[0, 10]]]], dtype=torch.uint8)
    out = kmeans_inertia(u8, torch.zeros(1, 1, 2, dtype=torch.int64), torch.tensor([[[4]]], dtype=torch.uint8))
    assert out.dtype == torch.float64 and out.tolist() == [16.0 + 36.0]


def test_count_colors():
    image = _few_colours(5)
    image[1, :, :4, :4] = torch.tensor([0, 0, 0], dtype=torch.uint8)[:, None, None]  # a 6th colour
    assert count_colors(image).tolist() == [5, 6]
    assert count_colors(image.double() / 255).tolist() == [5, 6]
    assert count_colors(torch.zeros(3, 1, 4, 4)).tolist() == [1, 1, 1]
    u8 = _random_uint8(b=1, h=8, w=8)
    expected = len({tuple(p) for p in u8[0].reshape(3, -1).T.tolist()})
    assert count_colors(u8).tolist() == [expected]
