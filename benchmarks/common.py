"""Timing and reporting helpers shared by the benchmarks."""

import platform
import re
import statistics
import sys
import time

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{device.type}-{device_name(device)}".lower()).strip("-")


def command_line() -> str:
    args = sys.argv[1:]
    prog = "python -m benchmarks" if sys.argv[0].endswith("__main__.py") else f"python {sys.argv[0]}"
    return " ".join([prog] + args)


def machine_header(device: torch.device) -> str:
    return (
        f"device: {device_name(device)}; torch {torch.__version__}; python {platform.python_version()}; "
        f"command: `{command_line()}`"
    )


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_ms(fn, inputs, device, warmup=2, repeats=10):
    """Median wall time of fn(*inputs[i % len(inputs)]) in milliseconds.

    Several input buffers are rotated so that caches do not flatter repeated
    calls on the same memory.
    """
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    _sync(device)
    times = []
    for i in range(repeats):
        args = inputs[i % len(inputs)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
