"""``colorquant demo``: quantize a few generated images through the fused ops
and the traditional quantizers.

Each image gets colour logits from its distance to K seed colours (picked
from the image itself); ``hard_color_quantize`` turns them into an index map
and a palette, ``soft_color_quantize`` into the differentiable recolouring.
Then ``ColorQuantize`` runs median cut, octree and k-means (with and without
Floyd-Steinberg dithering) on the same images, with palette-PNG sizes.
Prints tables and writes picture sheets.
"""

import os
import time

import torch

from . import ops


def generated_images(size: int = 64, seed: int = 0) -> torch.Tensor:
    """Four RGB test images in [0, 1]: a colour ramp, discs, stripes, and smooth noise."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    ramp = torch.stack([x, y, 1 - x * y])
    r = ((x - 0.35) ** 2 + (y - 0.4) ** 2).sqrt()
    discs = torch.stack([(r < 0.25).float(), ((x - 0.7) ** 2 + (y - 0.7) ** 2 < 0.04).float() * 0.8, 0.3 + 0.4 * y])
    stripes = torch.stack([0.5 + 0.5 * torch.sin(12 * x), 0.5 + 0.5 * torch.cos(9 * y), (x + y) / 2])
    noise = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=size, mode="bicubic")[0]
    return torch.stack([ramp, discs, stripes, noise]).clamp(0, 1)


def distance_logits(images: torch.Tensor, num_colors: int, seed: int = 0) -> torch.Tensor:
    """Logits [B,K,H,W] = minus the squared distance of each pixel to K seed colours of its image."""
    B, C, H, W = images.shape
    g = torch.Generator().manual_seed(seed)
    pixels = images.flatten(2)  # [B,C,P]
    picks = torch.stack([torch.randperm(H * W, generator=g)[:num_colors] for _ in range(B)])  # [B,K]
    seeds = pixels.gather(2, picks[:, None].expand(B, C, num_colors))  # [B,C,K]
    dist = (pixels[:, :, None] - seeds[..., None]).square().sum(1)  # [B,K,P]
    return (-dist).reshape(B, num_colors, H, W)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).square().mean().clamp_min(1e-12)
    return float(10 * torch.log10(1 / mse))


def main(out_dir: str = "runs/demo", colors=(2, 4, 8, 16)) -> str:
    from torchvision.utils import save_image

    images = generated_images()
    rows, sheet = [], [images]
    print(f"{len(images)} generated images {tuple(images.shape[1:])}, fused ops on CPU")
    print(f"{'K':>4} {'colours used (max)':>19} {'PSNR hard':>10} {'PSNR soft':>10} {'ms hard+soft':>13}")
    for k in colors:
        logits = distance_logits(images, k) * 50.0
        t0 = time.perf_counter()
        hard = ops.hard_color_quantize(logits, images)
        soft = ops.soft_color_quantize(logits, images)
        ms = (time.perf_counter() - t0) * 1e3
        used = max(int(torch.unique(hard.index_map[i]).numel()) for i in range(len(images)))
        rows.append((k, used, psnr(hard.quantized, images), psnr(soft.quantized, images), ms))
        print(f"{k:>4} {used:>19} {rows[-1][2]:>10.2f} {rows[-1][3]:>10.2f} {ms:>13.1f}")
        sheet.append(hard.quantized)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "ops_demo.png")
    # One row per image: original, then K = 2, 4, 8, 16.
    grid = torch.stack(sheet, dim=1).flatten(0, 1)
    save_image(grid, path, nrow=len(sheet), padding=2, pad_value=1.0)
    print(f"picture sheet (rows: images; columns: original, K = {', '.join(map(str, colors))}): {path}")
    compare_quantizers(images, out_dir, colors)
    return path


def compare_quantizers(images: torch.Tensor, out_dir: str, colors) -> str:
    """Median cut, octree and k-means, each with and without dithering: PSNR and palette-PNG bits per pixel."""
    from torchvision.utils import save_image

    from .codecs import bits_per_pixel, palette_png_sizes
    from .transforms import ColorQuantize

    H, W = images.shape[-2:]
    methods = [(m, d) for m in ("median_cut", "octree", "kmeans") for d in (False, True)]
    print(f"\n{'method':<20}" + "".join(f"{f'K={k} PSNR/bpp':>18}" for k in colors))
    sheet = [images]
    for method, dither in methods:
        cells = []
        for k in colors:
            res = ColorQuantize(k, method, dither=dither).quantize(images)
            bpp = float(bits_per_pixel(palette_png_sizes(res.index_map, res.palette), H, W).mean())
            cells.append(f"{psnr(res.quantized, images):6.2f} / {bpp:5.2f}")
            if k == colors[1]:
                sheet.append(res.quantized)
        print(f"{method + (' + dither' if dither else ''):<20}" + "".join(f"{c:>18}" for c in cells))
    path = os.path.join(out_dir, "quantizers_demo.png")
    save_image(torch.stack(sheet, dim=1).flatten(0, 1), path, nrow=len(sheet), padding=2, pad_value=1.0)
    names = ", ".join(m + (" + dither" if d else "") for m, d in methods)
    print(f"picture sheet at K = {colors[1]} (columns: original, {names}): {path}")
    return path
