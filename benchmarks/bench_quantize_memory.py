"""Peak memory of ``colorquant quantize`` on a large, highly compressible image (issue 16, point 5).

A PNG of ``side x side`` pixels (flat colour bands with a few hundred colours: about 100 KB for
6000 x 6000) goes through ``colorquant quantize`` in a fresh process per method; the peak resident
set size of that process (``ru_maxrss`` of the waited-for child) is the measurement, next to that of
a process that only imports colorquant_ops (the baseline). Run alone with
``python -m benchmarks.bench_quantize_memory [--sides 3000,6000]`` or as the ``quantize-memory``
section of ``python -m benchmarks --only quantize-memory``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIDES = (3000, 6000)
METHODS = ("median_cut", "octree", "kmeans")
K = 16

_MEASURE = ("import resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t)\n"
            "sys.stderr.write(r.stderr[-2000:])\n")


@dataclasses.dataclass
class MemoryResult:
    side: int
    method: str
    png_bytes: int
    peak_mib: Optional[float]
    seconds: Optional[float]
    status: str


def compressible_png(path: Path, side: int) -> Path:
    """Horizontal bands of 256 colours, each band a few rows: compresses to about 3 bytes a row."""
    from PIL import Image

    rows = np.arange(side) // max(1, side // 256)
    band = np.stack([(rows * 37) % 256, (rows * 91) % 256, (rows * 53) % 256], axis=1).astype(np.uint8)
    Image.fromarray(np.broadcast_to(band[:, None, :], (side, side, 3))).save(path, optimize=True)
    return path


def _measure(argv: List[str]) -> tuple:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    status, kib, seconds = out.stdout.split()
    return int(status), int(kib) / 1024, float(seconds), out.stderr.strip()


def run(sides=SIDES, methods=METHODS, log=print) -> List[MemoryResult]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-quantize-memory-") as tmp:
        _, base, seconds, _ = _measure([sys.executable, "-c", "import colorquant_ops.experiment.cli"])
        results.append(MemoryResult(0, "(import only)", 0, base, seconds, "ok"))
        for side in sides:
            image = compressible_png(Path(tmp) / f"bands-{side}.png", side)
            for method in methods:
                argv = [sys.executable, "-m", "colorquant_ops", "quantize", str(image), "--method", method,
                        "--num-colors", str(K), "-o", str(Path(tmp) / f"out-{side}-{method}"), "--no-progress"]
                status, peak, seconds, err = _measure(argv)
                ok = status == 0
                results.append(MemoryResult(side, method, image.stat().st_size, peak, seconds,
                                            "ok" if ok else f"exit {status}: {err.splitlines()[-1] if err else ''}"))
                log(f"{side}x{side} {method}: peak {peak:.0f} MiB in {seconds:.1f} s ({results[-1].status})")
    return results


def table(results: List[MemoryResult]) -> tuple:
    header = ["image", "PNG bytes", "method", f"K", "peak RSS (MiB)", "seconds", "status"]
    rows = []
    for r in results:
        rows.append([f"{r.side}×{r.side}" if r.side else "—", f"{r.png_bytes:,}" if r.png_bytes else "—",
                     r.method, str(K) if r.side else "—", f"{r.peak_mib:.0f}" if r.peak_mib is not None else "—",
                     f"{r.seconds:.1f}" if r.seconds is not None else "—", r.status])
    return header, rows


def main(argv=None) -> int:
    from .common import markdown_table

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_quantize_memory", description=__doc__)
    p.add_argument("--sides", default=",".join(map(str, SIDES)), help="image sides (default: 3000,6000)")
    p.add_argument("--methods", default=",".join(METHODS), help="methods (default: median_cut,octree,kmeans)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    results = run([int(s) for s in args.sides.split(",")], args.methods.split(","))
    print(markdown_table(*table(results)))
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
