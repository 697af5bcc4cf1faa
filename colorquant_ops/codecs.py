"""PNG / JPEG size accounting (the seed paper's compression experiment).

A colour-quantized image is stored as a palette ("P", colour type 3) PNG whose
bit depth is the smallest one that holds ``K`` colours (``K <= 2``: 1 bit,
``<= 4``: 2, ``<= 16``: 4, else 8), which is where few colours pay off. JPEG at
a chosen quality gives the comparison curve.

Two PNG writers produce the same pixels, palette and bit depth:

* ``backend="zlib"`` (default): a minimal self-written encoder -- IHDR, PLTE,
  one IDAT (filter type 0 on every row, as the PNG specification recommends for
  palette images, compressed by ``zlib`` level 9), IEND. Deterministic and
  independent of the Pillow version.
* ``backend="pil"``: PIL's PNG plugin (``optimize=True``, ``compress_level=9``).
  At 8 bits it writes the very same bytes as the zlib encoder; at 1, 2 and 4
  bits it applies adaptive row filters to the packed bytes, which makes files
  some 5-35 % larger than filter type 0 (e.g. a 128x128 gradient quantized to 16
  colours: 2211 bytes at 4 bits, more than the 1987 bytes of 17 colours at 8
  bits; 1969 bytes with the zlib encoder). Its output is checked to carry the
  expected bit depth; if it does not (an old Pillow), the zlib encoder is used.

Palettes are ``[K,C]`` with ``C = 3`` (RGB) or ``C = 1`` (grey, stored as RGB
entries with equal channels), uint8 or floating point in ``[0, 1]`` (stored as
``round(clamp(x, 0, 1) * 255)``).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "bits_per_pixel",
    "decode_palette_png",
    "encode_palette_png",
    "jpeg_roundtrip",
    "jpeg_sizes",
    "palette_bit_depth",
    "palette_png_sizes",
    "png_bit_depth",
]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BACKENDS = ("pil", "zlib")


def palette_bit_depth(num_colors: int) -> int:
    """Smallest PNG palette bit depth that holds ``num_colors`` (1 to 256) entries."""
    if not 1 <= num_colors <= 256:
        raise ValueError(f"a PNG palette holds 1 to 256 colours, got {num_colors}")
    for bits in (1, 2, 4):
        if num_colors <= 1 << bits:
            return bits
    return 8


# --- conversions -------------------------------------------------------------


def _to_numpy(x):
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _float_to_uint8(x: np.ndarray, name: str) -> np.ndarray:
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def _palette_to_rgb_uint8(palette) -> np.ndarray:
    """``[K,C]`` (C in {1, 3}) uint8 or float in [0,1] -> ``[K,3]`` uint8."""
    if isinstance(palette, Tensor) and palette.dtype == torch.bfloat16:
        palette = palette.float()
    pal = _to_numpy(palette)
    if pal.ndim != 2:
        raise ValueError(f"palette must be [K,C], got shape {pal.shape}")
    K, C = pal.shape
    if not 1 <= K <= 256:
        raise ValueError(f"palette must have 1 to 256 colours (K), got K={K}")
    if C not in (1, 3):
        raise ValueError(f"palette must have 1 (grey) or 3 (RGB) channels, got {C} channels")
    if pal.dtype == np.uint8:
        out = pal
    elif np.issubdtype(pal.dtype, np.floating):
        out = _float_to_uint8(pal, "palette")
    else:
        raise TypeError(f"palette must be uint8 or floating point, got {pal.dtype}")
    if C == 1:
        out = np.repeat(out, 3, axis=1)
    return np.ascontiguousarray(out, dtype=np.uint8)


def _index_map_to_uint8(index_map, num_colors: int) -> np.ndarray:
    idx = _to_numpy(index_map)
    if idx.ndim != 2:
        raise ValueError(f"index_map must be [H,W], got shape {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"index_map must be an integer array, got {idx.dtype}")
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= num_colors:
            raise ValueError(f"index_map values must be in [0, {num_colors}), got [{lo}, {hi}]")
    return np.ascontiguousarray(idx, dtype=np.uint8)


# --- PNG ---------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _pack_rows(idx: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``[H,W]`` uint8 indices into ``[H, ceil(W*bits/8)]`` bytes, most significant bits first."""
    H, W = idx.shape
    if bits == 8:
        return idx
    per_byte = 8 // bits
    n_bytes = -(-W // per_byte)
    padded = np.zeros((H, n_bytes * per_byte), dtype=np.uint8)
    padded[:, :W] = idx
    groups = padded.reshape(H, n_bytes, per_byte).astype(np.uint16)
    shifts = (8 - bits * (np.arange(per_byte) + 1)).astype(np.uint16)
    return (groups << shifts).sum(axis=2).astype(np.uint8)


def _encode_zlib(idx: np.ndarray, pal: np.ndarray, bits: int) -> bytes:
    H, W = idx.shape
    rows = _pack_rows(idx, bits)
    raw = np.concatenate([np.zeros((H, 1), dtype=np.uint8), rows], axis=1).tobytes()  # filter type 0
    header = struct.pack(">IIBBBBB", W, H, bits, 3, 0, 0, 0)  # colour type 3: palette
    return b"".join(
        [
            _PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"PLTE", pal.tobytes()),
            _chunk(b"IDAT", zlib.compress(raw, 9)),
            _chunk(b"IEND", b""),
        ]
    )


def _encode_pil(idx: np.ndarray, pal: np.ndarray, bits: int) -> bytes:
    H, W = idx.shape
    image = Image.frombytes("P", (W, H), idx.tobytes())
    image.putpalette(pal.tobytes(), "RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", bits=bits, optimize=True, compress_level=9)
    return buf.getvalue()


def encode_palette_png(index_map, palette, backend: str = "zlib") -> bytes:
    """Encode an ``(index_map [H,W], palette [K,C])`` pair as a palette PNG.

    The PNG has exactly ``K`` palette entries and bit depth
    :func:`palette_bit_depth` ``(K)``; ``index_map`` values must lie in ``[0, K)``.
    ``backend`` is ``"zlib"`` (the self-written encoder, filter type 0) or
    ``"pil"`` (PIL's writer, falling back to ``"zlib"`` if its output has
    another bit depth); see the module docstring.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    pal = _palette_to_rgb_uint8(palette)
    idx = _index_map_to_uint8(index_map, pal.shape[0])
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"a PNG needs at least one pixel, got index_map shape {idx.shape}")
    bits = palette_bit_depth(pal.shape[0])
    if backend == "pil":
        data = _encode_pil(idx, pal, bits)
        if png_bit_depth(data) == bits:
            return data
    return _encode_zlib(idx, pal, bits)


def _check_png(data: bytes) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if bytes(data[:8]) != _PNG_SIGNATURE or len(data) < 33 or bytes(data[12:16]) != b"IHDR":
        raise ValueError("data is not a PNG (bad signature or no IHDR chunk first)")


def png_bit_depth(data: bytes) -> int:
    """Bit depth field of a PNG's IHDR chunk (byte 24 of the file)."""
    _check_png(data)
    return data[24]


def decode_palette_png(data: bytes, channels: int = 3):
    """Decode a palette PNG to ``(index_map [H,W] int64, palette [K, channels] uint8)``.

    ``K`` is the number of PLTE entries. ``channels=1`` returns a grey palette
    and requires every entry to have equal R, G and B (as written for a
    ``C = 1`` palette by :func:`encode_palette_png`).
    """
    _check_png(data)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    with Image.open(io.BytesIO(bytes(data))) as image:
        if image.mode != "P":
            raise ValueError(f"not a palette PNG: PIL opened it in mode {image.mode!r}")
        index_map = np.asarray(image, dtype=np.int64).copy()
        pal = np.asarray(image.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
    if channels == 1:
        if not ((pal[:, 0] == pal[:, 1]) & (pal[:, 1] == pal[:, 2])).all():
            raise ValueError("channels=1 requested but the palette has non-grey entries")
        pal = pal[:, :1]
    return torch.from_numpy(index_map), torch.from_numpy(np.ascontiguousarray(pal))


def palette_png_sizes(index_map: Tensor, palette: Tensor, backend: str = "zlib") -> Tensor:
    """Byte size of the palette PNG of each image: index_map ``[B,H,W]``,
    palette ``[B,K,C]`` -> int64 ``[B]`` (see :func:`encode_palette_png`)."""
    if index_map.dim() != 3 or palette.dim() != 3:
        raise ValueError(
            f"expected index_map [B,H,W] and palette [B,K,C], got shapes "
            f"{tuple(index_map.shape)} and {tuple(palette.shape)}"
        )
    if index_map.shape[0] != palette.shape[0]:
        raise ValueError(
            f"index_map and palette must have the same batch size, got {index_map.shape[0]} and {palette.shape[0]}"
        )
    sizes = [len(encode_palette_png(idx, pal, backend=backend)) for idx, pal in zip(index_map, palette)]
    return torch.tensor(sizes, dtype=torch.int64)


def bits_per_pixel(sizes, height: int, width: int) -> Tensor:
    """File sizes in bytes -> bits per pixel, ``8 * sizes / (height * width)`` (float64)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height} and {width}")
    return torch.as_tensor(sizes, dtype=torch.float64) * 8 / (height * width)


# --- JPEG --------------------------------------------------------------------


def _images_to_hwc_uint8(images: Tensor) -> np.ndarray:
    """``[B,C,H,W]`` (C in {1, 3}) uint8 or float in [0,1] -> ``[B,H,W,C]`` uint8."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be a 4-D [B,C,H,W] tensor, got {images.dim()}-D shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels, got {images.shape[1]} channels")
    x = images.detach()
    if x.dtype == torch.uint8:
        pass
    elif x.is_floating_point():
        if not bool(torch.isfinite(x).all()):
            raise ValueError("images contain NaN or infinite values")
        x = (x.double().clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return x.cpu().permute(0, 2, 3, 1).contiguous().numpy()


def _jpeg_bytes(hwc: np.ndarray, quality: int, subsampling, optimize: bool) -> bytes:
    image = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)  # mode "L" or "RGB"
    options = {"quality": quality, "optimize": optimize}
    if subsampling is not None:
        options["subsampling"] = subsampling
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **options)
    return buf.getvalue()


def _check_quality(quality):
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an int in [1, 100], got {quality!r}")
    return int(quality)


def _jpeg_encode_all(images, quality, subsampling, optimize):
    quality = _check_quality(quality)
    hwc = _images_to_hwc_uint8(images)
    return hwc, [_jpeg_bytes(img, quality, subsampling, optimize) for img in hwc]


def jpeg_sizes(images: Tensor, quality: int = 75, subsampling=None, optimize: bool = False) -> Tensor:
    """Byte size of each image saved by PIL as a JPEG: int64 ``[B]``.

    Args:
        images: ``[B,C,H,W]``, ``C`` in {1, 3}, uint8 or float in ``[0, 1]``
            (float images are encoded as ``round(clamp(x, 0, 1) * 255)``).
        quality: JPEG quality in ``[1, 100]``.
        subsampling: PIL's chroma subsampling option (``None``: PIL's default,
            4:2:0), e.g. ``0`` for 4:4:4.
        optimize: PIL's Huffman-table optimization.
    """
    _, data = _jpeg_encode_all(images, quality, subsampling, optimize)
    return torch.tensor([len(d) for d in data], dtype=torch.int64)


def jpeg_roundtrip(
    images: Tensor, quality: int = 75, subsampling=None, optimize: bool = False, return_sizes: bool = False
):
    """Encode each image as a JPEG (see :func:`jpeg_sizes`) and decode it again.

    Returns the decoded images with the shape, dtype and device of ``images``
    (float images as ``uint8 / 255``), and with ``return_sizes=True`` also the
    int64 ``[B]`` byte sizes.
    """
    hwc, data = _jpeg_encode_all(images, quality, subsampling, optimize)
    decoded = np.empty_like(hwc)
    for b, d in enumerate(data):
        with Image.open(io.BytesIO(d)) as image:
            arr = np.asarray(image.convert("L" if hwc.shape[3] == 1 else "RGB"), dtype=np.uint8)
        decoded[b] = arr.reshape(hwc.shape[1:])
    out = torch.from_numpy(decoded).permute(0, 3, 1, 2).contiguous()
    if images.dtype != torch.uint8:
        out = (out.to(torch.float64) / 255).to(images.dtype)
    out = out.to(images.device)
    if return_sizes:
        return out, torch.tensor([len(d) for d in data], dtype=torch.int64)
    return out
