"""Fused soft_color_quantize against the reference formulations, side by side.

Formulations (same maths, see colorquant_ops.ops.reference):
  fused  - colorquant::soft_color_quantize (this library's kernels)
  paper  - the seed paper's broadcast to a B x C x K x H x W tensor
  bmm    - batched matrix products in eager PyTorch
"""

import argparse
import os

import torch

from colorquant_ops import ops
from colorquant_ops.ops import reference

from .common import device_slug, machine_header, markdown_table, median_time_ms

FORMULATIONS = {
    "fused": ops.soft_color_quantize,
    "paper": reference.soft_color_quantize_paper,
    "bmm": reference.soft_color_quantize,
}

CPU_SHAPES = [(128, 2, 32, 32), (128, 8, 32, 32), (128, 64, 32, 32)]


def _inputs(B, K, H, W, dtype, device, n_buffers, requires_grad):
    gen = torch.Generator().manual_seed(0)
    bufs = []
    for _ in range(n_buffers):
        logits = (torch.randn(B, K, H, W, generator=gen) * 2).to(device, dtype).requires_grad_(requires_grad)
        image = torch.rand(B, 3, H, W, generator=gen).to(device, dtype).requires_grad_(requires_grad)
        bufs.append((logits, image))
    return bufs


def _forward(fn):
    def run(logits, image):
        with torch.no_grad():
            return fn(logits, image)

    return run


def _forward_backward(fn):
    def run(logits, image):
        quantized, palette, probs = fn(logits, image)
        # A loss touching all three outputs, as ColorCNN's objective does.
        (quantized.sum() + palette.square().sum() + probs.amax(dim=(2, 3)).sum()).backward()

    return run


def run(shapes, dtype, device, repeats):
    rows = []
    for B, K, H, W in shapes:
        for mode, wrap, grad in (("fwd", _forward, False), ("fwd+bwd", _forward_backward, True)):
            inputs = _inputs(B, K, H, W, dtype, device, 3, grad)
            ms = {name: median_time_ms(wrap(fn), inputs, device, repeats=repeats) for name, fn in FORMULATIONS.items()}
            rows.append(
                [f"{B}x{K}x{H}x{W}", str(dtype).replace("torch.", ""), mode]
                + [f"{ms[n]:.2f}" for n in FORMULATIONS]
                + [f"{ms['paper'] / ms['fused']:.1f}x", f"{ms['bmm'] / ms['fused']:.1f}x"]
            )
            print(" ".join(rows[-1]), flush=True)
    header = ["B x K x H x W", "dtype", "pass"] + [f"{n} ms" for n in FORMULATIONS] + ["vs paper", "vs bmm"]
    return markdown_table(header, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/<device>.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    header = machine_header(device)
    print(header)
    table = run(CPU_SHAPES, dtype, device, args.repeats)
    report = f"# soft_color_quantize: fused vs reference formulations\n\n{header}\n\nMedian wall time over {args.repeats} repeats after warm-up, 3 rotated random input buffers.\n\n{table}\n"
    print("\n" + table)
    if not args.no_save:
        path = os.path.join(os.path.dirname(__file__), "results", f"{device_slug(device)}.md")
        with open(path, "w") as f:
            f.write(report)
        print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
