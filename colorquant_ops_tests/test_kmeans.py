"""kmeans_palette: agreement with a plain NumPy/PyTorch k-means with the same
seeding, inertia against PIL's k-means palette, determinism (seed, threads,
devices), edge cases (K > pixels, empty), low precision, errors, opcheck and
torch.compile."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import colorquant_ops.ops as cq
from colorquant_ops.quantizers import pil_quantize
from colorquant_ops.quantizers.reference import kmeans_inertia

from .helpers import (
    CUDA_SKIP_REASON,
    FLOAT_DTYPES,
    LAYOUTS_4D,
    LOW_PRECISION,
    check_output,
    dtype_id,
    f64,
    generator,
    rand,
    with_layout,
)

OP = torch.ops.colorquant.kmeans_palette.default
CHUNK = 1024  # kKMeansChunk of csrc/common/palette_math.h
MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------- plain reference


def _splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _uniform(seed, step):
    """kmeans_uniform of palette_math.h: a hash of (seed, step) -> [0, 1)."""
    h = _splitmix64(seed & MASK64)
    h = _splitmix64(h ^ step)
    return (h >> 11) * 2.0**-53


def _kmeanspp_draw(d2, u):
    """Inverse CDF over the prefix sum of d2 in pixel order (chunk totals first, as the kernels)."""
    P = len(d2)
    chunks = [np.cumsum(d2[p0 : p0 + CHUNK]) for p0 in range(0, P, CHUNK)]
    total = 0.0
    for c in chunks:
        total += float(c[-1])
    if not (0.0 < total < float("inf")):
        return min(int(u * P), P - 1)
    target = u * total
    offset = 0.0
    for j, c in enumerate(chunks):
        if offset + float(c[-1]) > target:
            return j * CHUNK + int(np.argmax(offset + c > target))
        offset += float(c[-1])
    return int(np.flatnonzero(d2 > 0)[-1])


def _squared_distances(points, centres):
    """[P, K] squared distances of points [P, C] to centres [K, C], channels added in order (as the kernels)."""
    d = 0.0
    for c in range(points.shape[1]):
        d = d + (points[:, c : c + 1] - centres[None, :, c]) ** 2
    return d


def _ordered_cluster_sums(pts, assign, K):
    """[K, C] sums of the points [P, C] of each cluster, as the kernels add them:
    in pixel order within each chunk of CHUNK pixels (np.cumsum adds in order),
    then the chunk totals in chunk order."""
    sums = np.zeros((K, pts.shape[1]), dtype=pts.dtype)
    for k in range(K):
        for p0 in range(0, len(pts), CHUNK):
            members = pts[p0 : p0 + CHUNK][assign[p0 : p0 + CHUNK] == k]
            if len(members):
                sums[k] += np.cumsum(members, axis=0)[-1]
    return sums


def plain_kmeans(image, K, iters, seed):
    """k-means++ seeding with the kernels' random draws (D^2 in float64), then
    plain Lloyd iterations in NumPy: argmin assignment, cluster sums in the
    kernels' order. In float32 and float64 (the image's dtype) it does the
    kernels' arithmetic operation for operation, so the results are equal."""
    dtype = {torch.float32: np.float32}.get(image.dtype, np.float64)
    x = image.detach().cpu().numpy().astype(dtype)
    B, C, H, W = x.shape
    pixels = x.reshape(B, C, H * W)
    palettes, index_maps = [], []
    for b in range(B):
        pts = np.ascontiguousarray(pixels[b].T)  # [P, C]
        centres = [pts[min(int(_uniform(seed, 0) * H * W), H * W - 1)]]
        d2 = _squared_distances(pts, centres[0][None])[:, 0].astype(np.float64)
        for j in range(1, K):
            centres.append(pts[_kmeanspp_draw(d2, _uniform(seed, j))])
            d2 = np.minimum(d2, _squared_distances(pts, centres[-1][None])[:, 0].astype(np.float64))
        centre = np.stack(centres)  # [K, C]
        for _ in range(iters):
            assign = _squared_distances(pts, centre).argmin(axis=1)
            sums = _ordered_cluster_sums(pts, assign, K)
            counts = np.bincount(assign, minlength=K)[:, None]
            centre = np.where(counts > 0, sums / np.maximum(counts, 1).astype(dtype), centre)
        palettes.append(torch.from_numpy(centre))
        index_maps.append(torch.from_numpy(_squared_distances(pts, centre).argmin(axis=1).reshape(H, W)))
    return torch.stack(index_maps), torch.stack(palettes)


def inertia(image, result):
    return kmeans_inertia(f64(image), result[0].cpu(), f64(result[1]))


def smooth_image(B, C, H, W, seed, dtype=torch.float64, device="cpu", levels=None):
    """Random smooth images in [0, 1]: coarse noise upsampled bilinearly (optionally on a grid of `levels` values)."""
    gen = generator(seed)
    coarse = torch.rand((B, C, 4, 5), generator=gen, dtype=torch.float64)
    x = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=True)
    if levels is not None:
        x = (x * (levels - 1)).round() / (levels - 1)
    return x.to(dtype=dtype, device=device)


def nearest_distance_gap(image, result):
    """Per pixel: distance to the assigned colour minus the distance to the nearest colour (float64, >= 0)."""
    x = f64(image)
    B, C, H, W = x.shape
    pal = f64(result.palette)
    d = ((x.reshape(B, C, H * W, 1) - pal.transpose(1, 2).unsqueeze(2)) ** 2).sum(1)  # [B, P, K]
    chosen = d.gather(2, result.index_map.cpu().reshape(B, H * W, 1)).squeeze(2)
    return chosen - d.min(dim=2).values


# --------------------------------------------------------------------------- against plain k-means and PIL


@pytest.mark.parametrize("K,iters", [(1, 3), (5, 0), (8, 4), (16, 10)])
def test_matches_plain_kmeans(device, K, iters):
    """Same seeding draws, same Lloyd steps: the same palette (up to summation
    order) and index map, and an inertia at most the plain implementation's."""
    image = smooth_image(2, 3, 37, 41, seed=K + iters, device=device)  # 1517 pixels: two chunks
    result = cq.kmeans_palette(image, K, iters, seed=3)
    check_output(result.index_map, (2, 37, 41), torch.long, device)
    check_output(result.palette, (2, K, 3), torch.float64, device)
    ref = plain_kmeans(image, K, iters, seed=3)
    assert torch.equal(result.palette.cpu(), ref[1])
    assert torch.equal(result.index_map.cpu(), ref[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("levels", [None, 5], ids=["smooth", "5-levels"])
@pytest.mark.parametrize("K,iters", [(64, 20), (24, 12), (2, 6)])
def test_matches_plain_kmeans_exactly(device, dtype, levels, K, iters):
    """Bit for bit, in float32 and float64, over many iterations: the assignment
    skips the search for pixels whose colour provably stays the nearest, which
    must not change a single index. Images on a grid of 5 levels put many
    pixels at equal distances from two colours (ties go to the lower index)."""
    image = smooth_image(3, 3, 40, 29, seed=K + iters, dtype=dtype, device=device, levels=levels)
    result = cq.kmeans_palette(image, K, iters, seed=5)
    ref = plain_kmeans(image, K, iters, seed=5)
    assert torch.equal(result.palette.cpu(), ref[1])
    assert torch.equal(result.index_map.cpu(), ref[0])


def test_batch_sizes_and_threads_match_plain_kmeans(restore_num_threads):
    """CPU only: the seeding runs image groups of 8 without synchronization when
    there are enough groups for the threads, else step by step; both give the
    plain result (20 images: two groups of 8 and 4 single images)."""
    image = smooth_image(20, 3, 16, 16, seed=12, dtype=torch.float32)
    ref = plain_kmeans(image, 10, 4, seed=8)
    for threads in (1, 2, 8):
        torch.set_num_threads(threads)
        result = cq.kmeans_palette(image, 10, 4, seed=8)
        assert torch.equal(result.palette, ref[1]), threads
        assert torch.equal(result.index_map, ref[0]), threads


@pytest.mark.parametrize("K", [4, 16])
def test_against_pil_palettes(device, K):
    """On random smooth 8-bit images: inertia below that of PIL's median cut
    palette on every image, and on par with PIL's median cut refined by k-means
    to convergence (quantize(K, MEDIANCUT, kmeans=2)). One k-means++ run is not
    always below the latter (a different local minimum: measured ratios 0.93 to
    1.11 per image), so the bound is 1.15 per image and 1.05 on the batch."""
    image = smooth_image(4, 3, 24, 32, seed=K, levels=256, device=device)
    ours = inertia(image, cq.kmeans_palette(image, K, iters=30, seed=0))
    median_cut = inertia(image, pil_quantize(image, K, method="median_cut"))
    pil_kmeans = inertia(image, pil_quantize(image, K, method="kmeans"))
    assert bool((ours < median_cut).all()), (ours, median_cut)
    assert bool((ours <= 1.15 * pil_kmeans).all()), (ours, pil_kmeans)
    assert float(ours.sum()) <= 1.05 * float(pil_kmeans.sum()), (ours, pil_kmeans)


def test_inertia_non_increasing_with_iterations(device):
    image = smooth_image(3, 3, 30, 30, seed=1, device=device)
    values = [inertia(image, cq.kmeans_palette(image, 12, it, seed=5)) for it in range(8)]
    for before, after in zip(values, values[1:]):
        assert bool((after <= before * (1 + 1e-12)).all()), (before, after)
    assert bool((values[-1] < values[0]).all())


def test_index_map_is_nearest_colour_of_palette(device):
    image = rand((2, 4, 19, 23), generator(2), dtype=torch.float64, device=device)
    result = cq.kmeans_palette(image, 9, 3, seed=1)
    assert float(nearest_distance_gap(image, result).max()) <= 1e-15


@pytest.mark.parametrize("layout", LAYOUTS_4D)
def test_layouts(device, layout):
    image = with_layout(smooth_image(2, 3, 9, 11, seed=3, device=device), layout)
    got = cq.kmeans_palette(image, 6, 5, seed=2)
    want = cq.kmeans_palette(image.contiguous(), 6, 5, seed=2)
    assert torch.equal(got.index_map, want.index_map) and torch.equal(got.palette, want.palette)


# --------------------------------------------------------------------------- determinism


def test_deterministic_for_a_seed(device):
    image = smooth_image(2, 3, 40, 50, seed=4, device=device, dtype=torch.float32)
    first = cq.kmeans_palette(image, 16, 6, seed=11)
    second = cq.kmeans_palette(image, 16, 6, seed=11)
    assert torch.equal(first.index_map, second.index_map) and torch.equal(first.palette, second.palette)


def test_seeds_differ(device):
    image = rand((1, 3, 20, 20), generator(5), device=device)
    palettes = [cq.kmeans_palette(image, 8, 2, seed=s).palette for s in (0, 1, 2, -7, 2**62)]
    assert len({tuple(p.flatten().tolist()) for p in palettes}) > 1


def test_batch_items_independent(device):
    """An image's palette depends on that image and the seed only: not on the other images of its
    batch, nor on its position in the batch (a per-sample transform batched or not)."""
    image = smooth_image(3, 3, 12, 13, seed=6, device=device)
    full = cq.kmeans_palette(image, 7, 4, seed=1)
    other = image.clone()
    other[0] = 0.5
    other[2] = 1.0 - other[2]
    mixed = cq.kmeans_palette(other, 7, 4, seed=1)
    assert torch.equal(full.palette[1], mixed.palette[1]) and torch.equal(full.index_map[1], mixed.index_map[1])
    for b in range(3):
        alone = cq.kmeans_palette(image[b:b + 1], 7, 4, seed=1)
        assert torch.equal(alone.palette[0], full.palette[b]) and torch.equal(alone.index_map[0], full.index_map[b])
    flipped = cq.kmeans_palette(image.flip(0), 7, 4, seed=1)
    assert torch.equal(flipped.palette, full.palette.flip(0)) and torch.equal(flipped.index_map, full.index_map.flip(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_independent_of_num_threads(dtype, restore_num_threads):
    """CPU only: bit-identical for 1 and 2 threads (several chunks per image, several images)."""
    image = smooth_image(3, 3, 40, 60, seed=7, dtype=dtype)
    torch.set_num_threads(1)
    one = cq.kmeans_palette(image, 12, 5, seed=9)
    torch.set_num_threads(2)
    two = cq.kmeans_palette(image, 12, 5, seed=9)
    assert torch.equal(one.index_map, two.index_map) and torch.equal(one.palette, two.palette)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_cuda_matches_cpu(dtype):
    """Same draws, same arithmetic, same summation order on both devices."""
    for B, C, H, W, K, iters in [(2, 3, 37, 41, 16, 8), (3, 1, 5, 7, 40, 3), (1, 5, 64, 48, 256, 2)]:
        image = smooth_image(B, C, H, W, seed=B + K, dtype=dtype)
        want = cq.kmeans_palette(image, K, iters, seed=4)
        got = cq.kmeans_palette(image.cuda(), K, iters, seed=4)
        assert torch.equal(got.index_map.cpu(), want.index_map)
        assert torch.equal(got.palette.cpu(), want.palette)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_are_an_error(device, bad):
    """The quantizers' one rule for NaN / inf pixels: a ValueError (before, one NaN pixel made the
    whole image NaN), as median cut and octree do."""
    image = smooth_image(2, 3, 40, 50, seed=11).to(device)
    image[1, 1, 30, 7] = bad
    with pytest.raises(ValueError, match="image contains NaN or infinite values"):
        cq.kmeans_palette(image, 4)
    with pytest.raises(ValueError, match="image contains NaN or infinite values"):
        torch.ops.colorquant.kmeans_palette(image, 4, 10, 0)


@pytest.mark.parametrize("name, value", [("iters", 2**63), ("seed", 2**63), ("seed", -(2**63) - 1)])
def test_int64_arguments(name, value):
    with pytest.raises(ValueError, match=f"{name} must fit in a 64-bit signed integer"):
        cq.kmeans_palette(torch.rand(1, 3, 4, 4), 2, **{name: value})


# --------------------------------------------------------------------------- special inputs


def test_recovers_separated_blobs(device):
    """K well-separated colours plus small noise: the palette is the K blob means
    and the index map the blobs, up to a permutation."""
    gen = generator(8)
    K, H, W = 6, 24, 30
    colours = torch.tensor(
        [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.float64
    ).unsqueeze(0)
    labels = F.interpolate(torch.randint(0, K, (1, 1, 4, 5), generator=gen).double(), size=(H, W)).long()[:, 0]
    labels[0, 0, :K] = torch.arange(K)  # every colour is present
    image = cq.render_index_map(labels, colours) + 1e-3 * torch.randn((1, 3, H, W), generator=gen, dtype=torch.float64)
    result = cq.kmeans_palette(image.to(device), K, 10, seed=0)
    index_map, palette = result.index_map.cpu(), result.palette.cpu()
    perm = torch.cdist(colours[0], palette[0]).argmin(dim=1)  # blob colour -> palette index
    assert sorted(perm.tolist()) == list(range(K))
    assert torch.equal(index_map, perm[labels])
    for k in range(K):
        blob_mean = image[0].reshape(3, -1)[:, labels.flatten() == k].mean(dim=1)
        torch.testing.assert_close(palette[0, perm[k]], blob_mean, rtol=0, atol=1e-12)


def test_more_colours_than_pixels(device):
    """K > H*W: every pixel colour is in the palette (the rest are duplicates) and the inertia is 0."""
    image = rand((2, 3, 2, 3), generator(9), dtype=torch.float64, device=device)
    result = cq.kmeans_palette(image, 10, 3, seed=1)
    check_output(result.palette, (2, 10, 3), torch.float64, device)
    pixels = image.permute(0, 2, 3, 1).reshape(2, 6, 1, 3)
    is_pixel = (result.palette.unsqueeze(1) == pixels).all(-1)  # [B, P, K]
    assert bool(is_pixel.any(1).all()), "every palette colour is a pixel colour"
    assert bool(is_pixel.any(2).all()), "every pixel colour is in the palette"
    assert float(inertia(image, result).max()) == 0.0


def test_fewer_distinct_colours_than_k(device):
    """Two distinct colours, K = 4: both are in the palette, the other entries
    duplicate them. (Dyadic colours, so that the cluster means are exact.)"""
    colours = torch.tensor([[[0.25, 0.75, 0.125], [0.5, 0.5, 0.5]]], dtype=torch.float64, device=device)
    labels = torch.zeros(1, 5, 4, dtype=torch.long, device=device)
    labels[:, :, 2:] = 1
    image = cq.render_index_map(labels, colours)
    result = cq.kmeans_palette(image, 4, 5, seed=0)
    is_colour = (result.palette.unsqueeze(2) == colours.unsqueeze(1)).all(-1)  # [1, K, 2]
    assert bool(is_colour.any(2).all()) and bool(is_colour.any(1).all())
    assert torch.equal(result.palette.gather(1, result.index_map.view(1, 20, 1).expand(1, 20, 3)),
                       image.permute(0, 2, 3, 1).reshape(1, 20, 3))


def test_single_colour(device):
    image = smooth_image(2, 3, 8, 9, seed=10, device=device)
    result = cq.kmeans_palette(image, 1, 3, seed=0)
    assert int(result.index_map.max()) == 0
    torch.testing.assert_close(result.palette[:, 0], image.mean(dim=(2, 3)), rtol=0, atol=1e-14)


@pytest.mark.parametrize("B,H,W", [(0, 4, 5), (2, 0, 5), (2, 3, 0)])
def test_empty(device, B, H, W):
    image = torch.ones(B, 3, H, W, device=device)
    result = cq.kmeans_palette(image, 5)
    check_output(result.index_map, (B, H, W), torch.long, device)
    check_output(result.palette, (B, 5, 3), torch.float32, device)
    assert bool((result.palette == 0).all())


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_low_precision(device, dtype):
    """float16/bfloat16 run with float32 sums: the index map is the nearest-colour
    map of the returned (rounded) palette and the inertia is close to float32's."""
    image = smooth_image(2, 3, 20, 24, seed=11, dtype=dtype, device=device)
    result = cq.kmeans_palette(image, 8, 6, seed=2)
    check_output(result.palette, (2, 8, 3), dtype, device)
    assert float(nearest_distance_gap(image, result).max()) <= 1e-5
    full = inertia(image, cq.kmeans_palette(image.float(), 8, 6, seed=2))
    assert bool((inertia(image, result) <= 1.5 * full + 1e-3).all())


def test_no_grad(device):
    image = smooth_image(1, 3, 5, 6, seed=12, device=device).requires_grad_(True)
    result = cq.kmeans_palette(image, 3)
    assert not result.palette.requires_grad and not result.index_map.requires_grad


# --------------------------------------------------------------------------- errors


OPS = {"wrapper": cq.kmeans_palette, "raw": torch.ops.colorquant.kmeans_palette}


@pytest.fixture(params=list(OPS), ids=list(OPS))
def kmeans_op(request):
    return OPS[request.param]


def test_bad_arguments(device, kmeans_op):
    image = torch.ones(1, 3, 4, 5, device=device)
    for k in (0, 257, -1):
        with pytest.raises(ValueError, match=r"num_colors\) must be in \[1, 256\]"):
            kmeans_op(image, k, 2, 0)
    with pytest.raises(ValueError, match=r"iters must be >= 0"):
        kmeans_op(image, 4, -1, 0)
    with pytest.raises(ValueError, match=r"image must be 4-D"):
        kmeans_op(torch.ones(3, 4, 5, device=device), 4, 2, 0)
    with pytest.raises(ValueError, match=r"image must have at least one channel"):
        kmeans_op(torch.ones(1, 0, 4, 5, device=device), 4, 2, 0)
    with pytest.raises(TypeError, match=r"image must be a floating-point tensor.*convert it first"):
        kmeans_op(torch.ones(1, 3, 4, 5, dtype=torch.uint8, device=device), 4, 2, 0)


def test_bad_python_types():
    image = torch.ones(1, 3, 4, 5)
    with pytest.raises(TypeError, match=r"image must be a torch.Tensor, got ndarray"):
        cq.kmeans_palette(image.numpy(), 4)
    with pytest.raises(TypeError, match=r"num_colors must be an int, got float"):
        cq.kmeans_palette(image, 4.0)
    with pytest.raises(TypeError, match=r"iters must be an int, got bool"):
        cq.kmeans_palette(image, 4, iters=True)
    with pytest.raises(TypeError, match=r"seed must be an int, got str"):
        cq.kmeans_palette(image, 4, seed="0")
    assert cq.kmeans_palette(image, np.int64(2), iters=np.int32(1)).palette.shape == (1, 2, 3)


# --------------------------------------------------------------------------- opcheck / compile


def test_opcheck(device):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        image = smooth_image(2, 3, 6, 7, seed=13, dtype=dtype, device=device)
        torch.library.opcheck(OP, (image, 4, 3, 1))
        torch.library.opcheck(OP, (with_layout(image, "channels_last"), 50, 0, 2))
    torch.library.opcheck(OP, (torch.ones(0, 2, 3, 3, device=device), 3, 1, 0))


def _quantize_and_dither(image):
    index_map, palette = cq.kmeans_palette(image, 6, 3, 1)
    dithered = cq.floyd_steinberg_dither(image, palette)
    return index_map, palette, cq.render_index_map(dithered, palette) + 1


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile(device, dynamic, fresh_dynamo):
    compiled = torch.compile(_quantize_and_dither, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for shape in [(2, 3, 7, 9), (1, 3, 5, 6)]:
        image = smooth_image(*shape, seed=14, dtype=torch.float32, device=device)
        for got, want in zip(compiled(image), _quantize_and_dither(image)):
            assert torch.equal(got, want)
