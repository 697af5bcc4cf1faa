"""Calls every CUDA kernel of colorquant_ops once or twice on odd shapes, for
compute-sanitizer (memcheck, racecheck, synccheck, initcheck; see
benchmarks/gpu_check.py). Small on purpose: the sanitizers slow kernels down
by one to two orders of magnitude. Prints "gpu_sanitizer_driver: done" last.

Shapes: 1x1 images, odd sizes, a tile boundary (1025 pixels), several dither
passes (H > 1024 rows), C = 1, 3, 5 (register chunk and the generic dither),
K = 1, 7, 256, palettes too large for shared memory (K = 256, C = 64), empty
batches and images, every floating dtype, out-of-range indices unchecked;
palette_distance forward and backward on the same shapes and a few of its own.
"""

import sys

import torch

import colorquant_ops.ops as cq


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_sanitizer_driver: no CUDA GPU")
        return 1
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g, device=dev, dtype=torch.float32).to(dtype)

    def ru(*shape, dtype=torch.float32):
        return torch.rand(shape, generator=g, device=dev, dtype=torch.float32).to(dtype)

    shapes = [(1, 1, 1, 1, 1), (2, 7, 3, 5, 9), (1, 256, 3, 3, 7), (2, 5, 5, 25, 41), (1, 3, 1, 1, 1025)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for B, K, C, H, W in shapes:
            logits = rn(B, K, H, W, dtype=dtype).requires_grad_(True)
            image = ru(B, C, H, W, dtype=dtype).requires_grad_(True)
            out = cq.soft_color_quantize(logits, image, 0.5, 1e-6)
            grads = [rn(*o.shape, dtype=dtype) for o in out]
            torch.autograd.grad(out, (logits, image), grads)
            # only some upstream gradients (None = zeros)
            out = cq.soft_color_quantize(logits, image)
            torch.autograd.grad(out.quantized.sum(), (logits, image))
            hard = cq.hard_color_quantize(logits, image)
            palette = rn(B, K, C, dtype=dtype).requires_grad_(True)
            r = cq.render_index_map(hard.index_map, palette)
            torch.autograd.grad(r, palette, rn(*r.shape, dtype=dtype))
            d = cq.palette_distance(image, palette)
            torch.autograd.grad(d, (image, palette), rn(*d.shape, dtype=dtype))
        km = cq.kmeans_palette(ru(2, 3, 17, 19, dtype=dtype), 9, 3, seed=1)
        cq.floyd_steinberg_dither(ru(2, 3, 17, 19, dtype=dtype), km.palette)
        cq.floyd_steinberg_dither(ru(2, 3, 17, 19, dtype=dtype), km.palette, clamp=(0.0, 1.0))

    # k-means: K > pixels, C above the chunk, several chunks, large palettes (global memory)
    cq.kmeans_palette(ru(1, 3, 2, 3), 16, 2)
    cq.kmeans_palette(ru(2, 5, 33, 35), 7, 3)
    cq.kmeans_palette(ru(1, 64, 8, 40), 256, 1)
    cq.kmeans_palette(ru(0, 3, 4, 4), 4, 1)
    cq.kmeans_palette(ru(2, 3, 0, 4), 4, 1)
    # dither: several wavefront passes, generic channel count, palettes in global memory
    for C, H, W, K in [(1, 1030, 3, 4), (3, 1, 1, 1), (5, 9, 11, 6), (4, 33, 2, 3), (64, 5, 7, 256)]:
        image = ru(2, C, H, W)
        cq.floyd_steinberg_dither(image, ru(2, K, C))
    cq.floyd_steinberg_dither(ru(0, 3, 4, 4), ru(0, 2, 3))
    # render: user index maps (checked), out-of-range indices unchecked, empty
    idx = torch.randint(0, 7, (2, 9, 11), generator=g, device=dev)
    pal = ru(2, 7, 3).requires_grad_(True)
    torch.autograd.grad(cq.render_index_map(idx, pal).sum(), pal)
    bad = idx.clone()
    bad[0, 0, 0], bad[1, 2, 3] = -1, 7
    torch.autograd.grad(cq.render_index_map(bad, pal, check_indices=False).sum(), pal)
    cq.render_index_map(idx[:0], pal[:0])
    cq.render_index_map(idx[:, :0], pal)
    torch.ops.colorquant.render_index_map_backward(ru(2, 3, 9, 11), idx, pal.detach(), True)
    # palette_distance: C above the register chunk, many tiles (warp finish), non-contiguous input
    for B, K, C, H, W in [(1, 3, 6, 7, 5), (1, 5, 2, 200, 180), (3, 256, 1, 3, 3)]:
        image, pal = ru(B, C, H, W).requires_grad_(True), ru(B, K, C).requires_grad_(True)
        d = cq.palette_distance(image.transpose(2, 3), pal)
        torch.autograd.grad(d, (image, pal), rn(*d.shape))
    # soft / hard / distance with no pixels, and with an empty batch
    for B, H, W in [(2, 0, 3), (0, 3, 3)]:
        cq.soft_color_quantize(rn(B, 4, H, W), ru(B, 3, H, W))
        cq.hard_color_quantize(rn(B, 4, H, W), ru(B, 3, H, W))
        image, pal = ru(B, 3, H, W).requires_grad_(True), ru(B, 4, 3).requires_grad_(True)
        torch.autograd.grad(cq.palette_distance(image, pal).sum(), (image, pal))
    torch.cuda.synchronize()
    print("gpu_sanitizer_driver: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
