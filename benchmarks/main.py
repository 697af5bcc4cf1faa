"""colorquant_ops benchmarks (``python -m benchmarks``, ``make bench``).

Sections (``--only``):
  ops         soft_color_quantize forward and forward + backward, hard_color_quantize and
              render_index_map forward, palette_distance forward and forward + backward,
              fused vs the paper's formulation, the eager reference and torch.compile of it
              (palette_distance: also the matrix-product expansion): time, peak memory,
              bandwidth (CUDA)
  quantizers  PIL median cut / octree / k-means per image vs the batched k-means and
              dithering ops, and the pure-Python dithering loop: images per second
  colorcnn    a ColorCNN training step with the fused op vs the paper's formulation
  quantize-memory
              peak memory of `colorquant quantize` on large compressible PNGs (not run
              unless named: --only quantize-memory)

The report (markdown tables, then the issue's targets as met / missed) is
printed last and written to benchmarks/results/<device>.md
(<device>-quick.md with --quick, which git ignores).
"""

import argparse
import dataclasses
import os
import sys
from typing import List, Optional

import torch

from . import bench_colorcnn, bench_ops, bench_quantize_memory, bench_quantizers
from .common import (
    CPU_MEMORY_METHOD,
    CUDA_MEMORY_METHOD,
    TimingPolicy,
    copy_bandwidth,
    device_slug,
    machine_header,
    markdown_table,
    ratio,
)

SECTIONS = ("ops", "quantizers", "colorcnn", "quantize-memory")
DEFAULT_SECTIONS = ("ops", "quantizers", "colorcnn")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

FULL_POLICY = TimingPolicy(max_repeats=20, min_repeats=3, budget_s=2.0, warmup_s=1.0, warmup_calls=40)
QUICK_POLICY = TimingPolicy(max_repeats=3, min_repeats=1, budget_s=0.3)
QUICK_COLORCNN_WIDTH = 16


def _csv(choices):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}, got {text!r}")
        return items
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda where available)")
    p.add_argument("--only", type=_csv(SECTIONS), default=list(DEFAULT_SECTIONS),
                   help=f"comma-separated sections to run, of {','.join(SECTIONS)} "
                        f"(default: {','.join(DEFAULT_SECTIONS)})")
    p.add_argument("--ops", type=_csv(bench_ops.OPS), default=list(bench_ops.OPS),
                   help=f"ops of the op benchmark (default: {','.join(bench_ops.OPS)})")
    p.add_argument("--dtypes", type=_csv(tuple(DTYPES)), default=["float32", "bfloat16"],
                   help="dtypes of the op benchmark (default: float32,bfloat16); the quantizers and "
                        "ColorCNN run in float32")
    p.add_argument("--sizes", type=_csv(tuple(bench_ops.SIZES)), default=list(bench_ops.SIZES),
                   help="cifar (B=128, 32x32, K 2/8/64) and/or imagenet (B=32, 224x224, K 2/16/256); "
                        "ColorCNN steps at 224x224 run on CUDA only (default: both)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"most timed calls per measurement (default {FULL_POLICY.max_repeats}, "
                        f"--quick {QUICK_POLICY.max_repeats}); slow calls get fewer")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_POLICY.max_repeats} timed calls at most, ColorCNN width "
                        f"{QUICK_COLORCNN_WIDTH}; writes <device>-quick.md")
    p.add_argument("--colorcnn-width", type=int, default=None,
                   help=f"U-Net width of the ColorCNN step (default {bench_colorcnn.DEFAULT_WIDTH}, the paper's)")
    p.add_argument("--data-root", default=None,
                   help="CIFAR-10 location for the quantizers (default: the project's shared JPEG copy)")
    p.add_argument("--out", default=None, help="report path (default: benchmarks/results/<device>[-quick].md)")
    p.add_argument("--no-save", action="store_true", help="print the report only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.device = torch.device(args.device)
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device}")
    if args.device.type == "cuda":
        from colorquant_ops import ops

        if not torch.cuda.is_available():
            p.error("--device cuda: CUDA is not available on this machine")
        if not ops.cuda_kernels_compiled():
            p.error("--device cuda: colorquant_ops was built without its CUDA kernels (rebuild with nvcc on PATH)")
        if args.device.index is None:
            args.device = torch.device("cuda", torch.cuda.current_device())
    args.dtypes = list(dict.fromkeys(DTYPES[d] for d in args.dtypes))
    policy = QUICK_POLICY if args.quick else FULL_POLICY
    if args.repeats is not None:
        policy = dataclasses.replace(policy, max_repeats=args.repeats, min_repeats=min(policy.min_repeats, args.repeats))
    args.policy = policy
    if args.colorcnn_width is None:
        args.colorcnn_width = QUICK_COLORCNN_WIDTH if args.quick else bench_colorcnn.DEFAULT_WIDTH
    return args


# --------------------------------------------------------------------------------------------
# Targets of issue 5
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Verdict:
    target: str
    measured: str
    met: Optional[bool]  # None: not measured in this run

    @property
    def status(self) -> str:
        return {True: "met", False: "MISSED", None: "not measured"}[self.met]


def _fmt_x(r):
    return f"{r:.2f}x"


def _min_over(rows, value, describe):
    """(smallest value, where) over rows whose value was measured; (None, reason) if none."""
    found = [(value(r), describe(r)) for r in rows]
    found = [(v, d) for v, d in found if v is not None]
    if not found:
        return None, "no measurement"
    return min(found, key=lambda x: x[0])


def _where(r: bench_ops.OpResult) -> str:
    return f"{r.case.op} {r.case.mode} {r.case.shape} {r.case.dtype_name}"


def _ratio_target(target, rows, other, threshold, device_ok):
    if not device_ok:
        return []
    if not rows:
        return [Verdict(target, "shape not in this run", None)]
    v, where = _min_over(rows, lambda r: ratio(r.seconds.get(other), r.seconds.get("fused")), _where)
    if v is None:
        return [Verdict(target, where, None)]
    return [Verdict(target, f"{_fmt_x(v)} (smallest, {where})", v >= threshold)]


#: the (op, pass) pairs that issue 5's bandwidth and memory targets are about (palette_distance
#: came later and has no paper formulation to compare memory with)
ISSUE5_PASSES = tuple(p for p in bench_ops.OP_PASSES if p[0] in ("soft", "hard", "render"))


def op_verdicts(results: List[bench_ops.OpResult], device: torch.device) -> List[Verdict]:
    cpu, cuda = device.type == "cpu", device.type == "cuda"
    soft_fb = [r for r in results if r.case.op == "soft" and r.case.mode == "fwd+bwd"]
    soft_f = [r for r in results if r.case.op == "soft" and r.case.mode == "fwd"]
    cifar64 = [r for r in soft_fb if (r.case.B, r.case.K, r.case.H) == (128, 64, 32)]
    out = []
    out += _ratio_target("CPU soft fwd+bwd, CIFAR K=64: >= 10x paper", cifar64, "paper", 10, cpu)
    out += _ratio_target("CPU soft fwd+bwd, CIFAR K=64: >= 2x eager bmm", cifar64, "eager", 2, cpu)
    for rows, what in ((soft_fb, "fwd+bwd"), (soft_f, "fwd")):
        for other in ("paper", "eager"):
            out += _ratio_target(f"CPU soft {what}: never slower than {other}, every shape", rows, other, 1, cpu)
    out += _ratio_target("CUDA soft fwd+bwd: >= 5x paper, every shape", soft_fb, "paper", 5, cuda)
    out += _ratio_target("CUDA soft fwd+bwd: >= 1.5x torch.compile, every shape", soft_fb, "compiled", 1.5, cuda)
    if cuda:
        for op, mode in ISSUE5_PASSES:
            rows = [r for r in results if (r.case.op, r.case.mode) == (op, mode) and r.case.H == 224]
            target = f"CUDA {op} {mode}, 224x224: >= 60% of copy bandwidth"
            if not rows:
                out.append(Verdict(target, "shape not in this run", None))
                continue
            v, where = _min_over(rows, lambda r: r.bandwidth_fraction, _where)
            out.append(Verdict(target, where if v is None else f"{100 * v:.0f}% (smallest, {where})",
                               None if v is None else v >= 0.6))
        for op, mode in ISSUE5_PASSES:
            rows = [r for r in results if (r.case.op, r.case.mode) == (op, mode) and r.case.K >= 16]
            target = f"CUDA {op} {mode}, K >= 16: peak memory <= 1/4 of paper"
            if not rows:
                out.append(Verdict(target, "shape not in this run", None))
                continue
            fractions = [(ratio(r.peak_bytes.get("fused"), r.peak_bytes.get("paper")), _where(r)) for r in rows]
            fractions = [(f, w) for f, w in fractions if f is not None]
            if not fractions:
                out.append(Verdict(target, "no measurement", None))
                continue
            f, where = max(fractions, key=lambda x: x[0])
            out.append(Verdict(target, f"{f:.3f} of paper (largest, {where})", f <= 0.25))
    mismatched = [m for r in results for m in r.mismatches]
    out.append(Verdict("every formulation agrees with the fused op (first image, float tolerance)",
                       f"{len(mismatched)} mismatches" + (f": {mismatched[0]}" if mismatched else ""),
                       not mismatched))
    return out


def quantizer_verdicts(results: List[bench_quantizers.QuantizerResult]) -> List[Verdict]:
    out = []
    for K in bench_ops.SIZES["cifar"][3]:
        rows = [r for r in results if r.case.size == "cifar" and r.case.K == K and r.case.dither]
        ours = [r for r in rows if r.case.method == "kmeans" and r.case.device == "cpu"]
        pil = [r for r in rows if r.case.method.startswith("pil:") and r.images_per_second is not None]
        if not ours or not pil:
            continue
        ips = ours[0].images_per_second
        same = [r for r in pil if r.case.method == "pil:kmeans"]
        fastest = max(pil, key=lambda r: r.images_per_second)
        for base, what in ((same[0] if same else None, "PIL k-means + dither (same job)"),
                           (fastest, "fastest PIL method + dither")):
            if base is None:
                continue
            target = f"CPU batched k-means + dither op, CIFAR batch of 128, K={K}: >= 20x {what}"
            r = ratio(ips, base.images_per_second)
            out.append(Verdict(target, "not measured" if r is None else
                               f"{_fmt_x(r)} ({ips:.0f} vs {base.images_per_second:.0f} images/s, {base.case.label})",
                               None if r is None else r >= 20))
    if not out:
        out.append(Verdict("CPU batched k-means + dither, CIFAR batch: >= 20x PIL", "not in this run", None))
    return out


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _progress(total, disable):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of colorquant_ops
        return None, print
    bar = tqdm(total=total, desc="benchmarks", unit="meas", disable=disable, dynamic_ncols=True)
    return bar, tqdm.write


def run(args) -> tuple:
    """Runs the selected sections; returns ``(report markdown, number of formulation mismatches)``."""
    device, policy = args.device, args.policy
    colorcnn_sizes = [s for s in args.sizes if device.type == "cuda" or s == "cifar"]
    op_cases = bench_ops.plan(args.sizes, args.dtypes, args.ops) if "ops" in args.only else []
    q_cases = bench_quantizers.plan(args.sizes, device) if "quantizers" in args.only else []
    c_cases = bench_colorcnn.plan(colorcnn_sizes, args.colorcnn_width) if "colorcnn" in args.only else []
    total = len(op_cases) * len(bench_ops.FORMULATIONS) + len(q_cases) + \
        len(c_cases) * bench_colorcnn.MEASUREMENTS_PER_CASE
    bar, log = _progress(total, args.no_progress)
    log(machine_header(device).replace("\n", "; ").replace("- ", ""))

    notes = [f"- times: {policy.describe()}; CUDA calls timed with CUDA events, CPU calls with "
             "`time.perf_counter`, the device synchronized around each call"]
    sections, verdicts, mismatches = [], [], 0

    if op_cases:
        bandwidth = None
        if device.type == "cuda":
            bandwidth = copy_bandwidth(device)
            log(f"device-to-device copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
            notes.append(f"- copy bandwidth of this device, measured in this run: {bandwidth / 1e9:.0f} GB/s "
                         "(`dst.copy_(src)` of 1 GiB, 2 GiB moved); an op's achieved bandwidth counts the fewest "
                         "bytes it must move (each input read once, each output written once; fwd+bwd: the "
                         "logits, image and three upstream gradients in, three outputs and two gradients out)")
        results = []
        for case in op_cases:
            if bar is not None:
                bar.set_postfix_str(case.label)
            results.append(bench_ops.run_case(case, device, policy, bandwidth, bar, log))
        mismatches = sum(len(r.mismatches) for r in results)
        header, rows = bench_ops.table(results, device)
        sections.append("## Ops\n\n"
                        "Formulations: `fused` this library's op; `paper` the seed paper's released formulation "
                        "(a B×C×K×H×W broadcast; for hard/render the paper's evaluation path, the one-hot of the "
                        "argmax through the same broadcast); `eager` colorquant_ops.ops.reference (batched "
                        "matrix products; a gather for render; for distance the broadcast "
                        "`((image[:, None] - palette[..., None, None]) ** 2).sum(2)`); `compiled` "
                        "torch.compile(eager, dynamic=False); `expanded` distance only, "
                        "`|x|² − 2 x·c + |c|²` by einsum (n/a: the op has no such formulation; distance has no "
                        "paper formulation). "
                        "`vs X` = X time / fused time. fwd: under no_grad; fwd+bwd: forward, then "
                        "`torch.autograd.grad` of the three outputs (distance: of the distances, w.r.t. image and "
                        "palette) with random dense upstream gradients. "
                        "Inputs: logits 2·N(0,1), image U(0,1), index map uniform in [0,K), "
                        "palette U(0,1); several buffers rotated (about 256 MiB in all, up to 8; one buffer "
                        "when it alone is larger). OOM / skipped: the case could not run. Every "
                        "formulation's first result is checked against the fused op's.\n\n"
                        + markdown_table(header, rows))
        verdicts += op_verdicts(results, device)
        notes.append("- " + (CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD))
        if device.type == "cuda":
            notes.append("- PyTorch defaults: TF32 off for float32 matrix products")

    if q_cases:
        from colorquant_ops.experiment.data import DatasetNotFoundError

        try:
            batches = bench_quantizers.load_images(sorted({c.size for c in q_cases}), args.data_root)
        except DatasetNotFoundError as exc:
            log(f"quantizers not run: {exc}")
            sections.append(f"## Quantizers\n\nNot run: CIFAR-10 not found.\n\n```\n{exc}\n```")
            verdicts += [Verdict("CPU batched k-means + dither, CIFAR batch: >= 20x PIL", "CIFAR-10 not found", None)]
            if bar is not None:
                bar.update(len(q_cases))
        else:
            results = []
            for case in q_cases:
                if bar is not None:
                    bar.set_postfix_str(f"{case.label} {case.size} K={case.K} {case.device}")
                results.append(bench_quantizers.run_case(case, batches, policy))
                if bar is not None:
                    bar.update(1)
            header, rows = bench_quantizers.table(results)
            sections.append("## Quantizers\n\n"
                            f"Real CIFAR-10 test images (the project's JPEG copy): batches of "
                            f"{bench_quantizers.BATCH['cifar']} at 32×32 and of {bench_quantizers.BATCH['imagenet']} "
                            f"resized to 224×224 (bicubic), {bench_quantizers.N_BATCHES} distinct batches rotated. "
                            "PIL: `colorquant_ops.quantizers.pil_quantize` (image by image, from uint8; k-means = "
                            "median cut refined by PIL's k-means, `kmeans=2`; dither = Floyd–Steinberg onto the "
                            f"method's palette). Batched ops: `kmeans_palette(iters={bench_quantizers.KMEANS_ITERS})` "
                            "(+ `floyd_steinberg_dither`) from float32 images on the device. Pure-Python dither: "
                            "`floyd_steinberg_batch_reference` onto the k-means op's palette (not timed), on "
                            f"{bench_quantizers.PYTHON_DITHER_IMAGES['cifar']} CIFAR / "
                            f"{bench_quantizers.PYTHON_DITHER_IMAGES['imagenet']} 224×224 image(s), one timed call.\n\n"
                            + markdown_table(header, rows))
            verdicts += quantizer_verdicts(results)

    if "colorcnn" in args.only:
        if c_cases:
            results = []
            for case in c_cases:
                if bar is not None:
                    bar.set_postfix_str(case.label)
                results.append(bench_colorcnn.run_case(case, device, policy, bar, log))
            header, rows = bench_colorcnn.table(results)
            skipped = [s for s in args.sizes if s not in colorcnn_sizes]
            sections.append("## ColorCNN training step\n\n"
                            "One step of `colorquant train`: ColorCNN (U-Net) forward in training mode, the frozen "
                            "classifier (eval mode, no parameter gradients) on the quantized images, "
                            "`ColorCNNLoss()` (the paper's defaults), backward, SGD step; random float32 images. "
                            "`paper`: ColorCNN's soft op replaced by the paper's formulation. Op share: the soft "
                            "op alone (forward + backward from random upstream gradients, same shape) over the "
                            "step time."
                            + (f" Not run at {', '.join(skipped)} size on the CPU (minutes per step)." if skipped else "")
                            + "\n\n" + markdown_table(header, rows))
        else:
            sections.append("## ColorCNN training step\n\nNot run: 224×224 steps run on CUDA only.")

    if "quantize-memory" in args.only:
        header, rows = bench_quantize_memory.table(bench_quantize_memory.run(log=log))
        sections.append("## Peak memory of `colorquant quantize`\n\n"
                        "Each method in a fresh process on a PNG of flat colour bands (highly compressible), "
                        f"K={bench_quantize_memory.K}; peak resident set size of that process (`ru_maxrss`), "
                        "next to a process that only imports the command.\n\n" + markdown_table(header, rows))

    if bar is not None:
        bar.close()
    verdict_table = markdown_table(["target (issue 5)", "measured", "verdict"],
                                   [[v.target, v.measured, v.status] for v in verdicts])
    report = "\n\n".join(
        ["# colorquant_ops benchmarks" + (" (--quick: smoke-test repeats, not for quoting)" if args.quick else ""),
         machine_header(device), "\n".join(notes), *sections, "## Targets\n\n" + verdict_table]
    ) + "\n"
    return report, mismatches


def main(argv=None) -> int:
    args = parse_args(argv)
    report, mismatches = run(args)
    print("\n" + report)
    if not args.no_save:
        path = args.out or os.path.join(RESULTS_DIR, device_slug(args.device) + ("-quick" if args.quick else "") + ".md")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(report)
        print(f"written to {path}")
    if mismatches:
        print(f"{mismatches} formulation mismatch(es): see the MISMATCH rows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
