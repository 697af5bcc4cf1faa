"""PNG / JPEG size accounting (colorquant_ops.codecs)."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from colorquant_ops.codecs import (
    bits_per_pixel,
    decode_palette_png,
    encode_palette_png,
    jpeg_roundtrip,
    jpeg_sizes,
    palette_bit_depth,
    palette_png_sizes,
    png_bit_depth,
)
from colorquant_ops.quantizers import pil_quantize

BACKENDS = ("zlib", "pil")
K_DEPTH = [(1, 1), (2, 1), (3, 2), (4, 2), (5, 4), (16, 4), (17, 8), (256, 8)]


def _pair(K, h=17, w=19, seed=0):
    """Index map [H,W] using all K colours if H*W >= K (odd width: partial last bytes) and a uint8 palette [K,3]."""
    g = torch.Generator().manual_seed(seed)
    index_map = torch.randint(0, K, (h, w), generator=g)
    n = min(K, h * w)
    index_map.view(-1)[:n] = torch.arange(n)
    palette = torch.randint(0, 256, (K, 3), generator=g, dtype=torch.uint8)
    return index_map, palette


def _natural(b=1, h=64, w=64, seed=0):
    """Natural-ish float image: smooth shading, edges and a little texture."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(6 * xx + 4 * yy)])
    base = base + 0.3 * ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.05).float()  # a disc
    g = torch.Generator().manual_seed(seed)
    return (base[None] + 0.04 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)


def _chunks(data):
    """[(type, payload, crc_ok)] of a PNG."""
    out, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        kind, payload = data[i + 4 : i + 8], data[i + 8 : i + 8 + n]
        (crc,) = struct.unpack(">I", data[i + 8 + n : i + 12 + n])
        out.append((kind, payload, crc == zlib.crc32(kind + payload) & 0xFFFFFFFF))
        i += 12 + n
    return out


# --- palette PNG -------------------------------------------------------------


def test_palette_bit_depth():
    assert [palette_bit_depth(k) for k, _ in K_DEPTH] == [d for _, d in K_DEPTH]
    for bad in (0, 257):
        with pytest.raises(ValueError, match="1 to 256 colours"):
            palette_bit_depth(bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K, depth", K_DEPTH)
def test_png_round_trip_and_bit_depth(K, depth, backend):
    index_map, palette = _pair(K)
    data = encode_palette_png(index_map, palette, backend=backend)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_bit_depth(data) == depth
    decoded_map, decoded_palette = decode_palette_png(data)
    assert decoded_map.dtype == torch.int64 and torch.equal(decoded_map, index_map)
    assert decoded_palette.dtype == torch.uint8 and torch.equal(decoded_palette, palette)
    # what PIL itself reads back
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "P" and image.size == (19, 17)
        assert np.array_equal(np.asarray(image), index_map.numpy())


@pytest.mark.parametrize("K", [2, 3, 5, 16, 200])
def test_zlib_encoder_writes_a_minimal_valid_png(K):
    index_map, palette = _pair(K, h=9, w=13)
    data = encode_palette_png(index_map, palette, backend="zlib")
    chunks = _chunks(data)
    assert [c[0] for c in chunks] == [b"IHDR", b"PLTE", b"IDAT", b"IEND"]
    assert all(c[2] for c in chunks)  # CRCs
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (width, height, depth, colour_type, interlace) == (13, 9, palette_bit_depth(K), 3, 0)
    assert chunks[1][1] == palette.numpy().tobytes()  # exactly K entries
    raw = zlib.decompress(chunks[2][1])
    row = 1 + (13 * depth + 7) // 8
    assert len(raw) == 9 * row and set(raw[::row]) == {0}  # filter type 0 on every row


def test_backends_agree_on_content_and_size_ordering():
    index_map, palette = pil_quantize(_natural(), 16, "median_cut")
    a = encode_palette_png(index_map[0], palette[0], backend="zlib")
    b = encode_palette_png(index_map[0], palette[0], backend="pil")
    for x, y in zip(decode_palette_png(a), decode_palette_png(b)):
        assert torch.equal(x, y)
    # PIL filters sub-byte rows adaptively, never better than filter 0 here
    assert len(a) <= len(b)


def test_float_and_grey_palettes():
    index_map, palette = _pair(6)
    as_float = palette.double() / 255
    _, decoded = decode_palette_png(encode_palette_png(index_map, as_float))
    assert torch.equal(decoded, palette)
    # values off the uint8 grid are rounded, out-of-range ones clamped
    odd = torch.tensor([[0.1, 0.5, 1.2], [-0.3, 0.999, 0.0]], dtype=torch.float32)
    _, decoded = decode_palette_png(encode_palette_png(torch.tensor([[0, 1]]), odd))
    assert decoded.tolist() == [[26, 128, 255], [0, 255, 0]]
    # grey C=1 palette: stored as equal RGB entries
    grey = palette[:, :1]
    data = encode_palette_png(index_map, grey)
    decoded_map, decoded_rgb = decode_palette_png(data)
    assert torch.equal(decoded_map, index_map) and torch.equal(decoded_rgb, grey.expand(6, 3))
    assert torch.equal(decode_palette_png(data, channels=1)[1], grey)
    with pytest.raises(ValueError, match="non-grey"):
        decode_palette_png(encode_palette_png(index_map, palette), channels=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_sizes_equal_per_image_sizes(backend):
    images = _natural(b=3, h=32, w=24)
    for K in (2, 4, 16, 64):
        index_map, palette = pil_quantize(images, K, "kmeans", dither=K == 4)
        sizes = palette_png_sizes(index_map, palette, backend=backend)
        assert sizes.dtype == torch.int64 and sizes.shape == (3,)
        expected = [len(encode_palette_png(i, p, backend=backend)) for i, p in zip(index_map, palette)]
        assert sizes.tolist() == expected
        assert (sizes > 0).all()
        torch.testing.assert_close(bits_per_pixel(sizes, 32, 24), sizes.double() * 8 / (32 * 24))


def test_bits_per_pixel():
    assert bits_per_pixel([96, 48], 8, 12).tolist() == [8.0, 4.0]
    assert bits_per_pixel(torch.tensor([1]), 2, 2).dtype == torch.float64
    with pytest.raises(ValueError, match="positive"):
        bits_per_pixel([10], 0, 4)


def test_fewer_colours_give_smaller_pngs():
    image = _natural(h=48, w=48)
    sizes = [int(palette_png_sizes(*pil_quantize(image, K, "median_cut"))[0]) for K in (2, 4, 16, 256)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4, sizes


def test_png_bad_input():
    index_map, palette = _pair(4)
    with pytest.raises(ValueError, match=r"index_map values must be in \[0, 3\)"):
        encode_palette_png(index_map, palette[:3])
    with pytest.raises(ValueError, match=r"index_map must be \[H,W\]"):
        encode_palette_png(index_map[None], palette)
    with pytest.raises(ValueError, match="1 to 256 colours"):
        encode_palette_png(index_map, torch.zeros(257, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 .grey. or 3 .RGB. channels"):
        encode_palette_png(index_map, torch.zeros(4, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="backend must be one of"):
        encode_palette_png(index_map, palette, backend="cv2")
    with pytest.raises(ValueError, match="not a PNG"):
        png_bit_depth(b"GIF89a" + bytes(40))
    with pytest.raises(ValueError, match="not a PNG"):
        decode_palette_png(b"\x89PNG")
    rgb_png = io.BytesIO()
    Image.new("RGB", (3, 3)).save(rgb_png, format="PNG")
    with pytest.raises(ValueError, match="not a palette PNG"):
        decode_palette_png(rgb_png.getvalue())
    with pytest.raises(ValueError, match=r"expected index_map \[B,H,W\]"):
        palette_png_sizes(index_map, palette)


# --- JPEG --------------------------------------------------------------------


def test_jpeg_sizes_decrease_with_quality():
    images = _natural(b=2)
    qualities = (95, 75, 50, 25, 10)
    sizes = torch.stack([jpeg_sizes(images, quality=q) for q in qualities])  # [Q,B]
    assert sizes.dtype == torch.int64 and (sizes > 0).all()
    assert (sizes[1:] < sizes[:-1]).all(), sizes
    # uint8 input of the same pixels gives the same files
    u8 = (images * 255).round().to(torch.uint8)
    assert torch.equal(jpeg_sizes(u8, quality=50), sizes[2])


def test_jpeg_roundtrip():
    images = _natural(b=2, h=32, w=40)
    errors = []
    for q in (95, 50, 10):
        decoded, sizes = jpeg_roundtrip(images, quality=q, return_sizes=True)
        assert decoded.shape == images.shape and decoded.dtype == images.dtype
        assert decoded.min() >= 0 and decoded.max() <= 1
        assert torch.equal(sizes, jpeg_sizes(images, quality=q))
        errors.append((decoded - images).abs().mean().item())
    assert errors[0] < 0.03 and errors[0] < errors[1] < errors[2], errors
    u8 = (images * 255).round().to(torch.uint8)
    decoded = jpeg_roundtrip(u8, quality=50)
    assert decoded.dtype == torch.uint8
    assert torch.equal(decoded, (jpeg_roundtrip(images, quality=50) * 255).round().to(torch.uint8))
    grey = images[:, :1]
    decoded = jpeg_roundtrip(grey, quality=90)
    assert decoded.shape == grey.shape and (decoded - grey).abs().mean() < 0.03
    assert (jpeg_sizes(grey, quality=90) < jpeg_sizes(images, quality=90)).all()


def test_jpeg_bad_input():
    images = _natural()
    for q in (0, 101, 50.0):
        with pytest.raises(ValueError, match=r"quality must be an int in \[1, 100\]"):
            jpeg_sizes(images, quality=q)
    with pytest.raises(ValueError, match="1 .grey. or 3 .RGB. channels"):
        jpeg_sizes(images[:, :2])
    with pytest.raises(ValueError, match="4-D"):
        jpeg_roundtrip(images[0])

