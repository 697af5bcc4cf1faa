"""Timing, memory and reporting helpers shared by the benchmarks.

* :func:`time_calls`: median wall time over repeats after warm-up, input buffers
  rotated; CUDA calls are timed with CUDA events.
* :func:`peak_memory`: extra memory a call needs at its peak (CUDA: the caching
  allocator's ``max_memory_allocated``; CPU: the process's peak resident set).
* :func:`copy_bandwidth`: the device's measured device-to-device copy bandwidth.
* :class:`NotRun`: a measurement that could not be taken (out of memory, ...),
  recorded in the tables instead of crashing the run.
"""

import ctypes
import ctypes.util
import dataclasses
import gc
import math
import platform
import re
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch

MiB = 1 << 20
GiB = 1 << 30


# --------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------


def cpu_name() -> str:
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{device.type}-{device_name(device)}".lower()).strip("-")


def command_line() -> str:
    args = sys.argv[1:]
    prog = "python -m benchmarks" if sys.argv[0].endswith("__main__.py") else f"python {sys.argv[0]}"
    return " ".join([prog] + args)


def machine_header(device: torch.device) -> str:
    lines = [
        f"- device: {device_name(device)}",
        f"- torch {torch.__version__}, python {platform.python_version()}",
        f"- command: `{command_line()}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
    ]
    if device.type == "cuda":
        lines.insert(1, f"- host CPU: {cpu_name()} ({torch.get_num_threads()} threads); CUDA {torch.version.cuda}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Results that could not be measured
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NotRun:
    """A measurement that was not taken, with the reason shown in the tables."""

    reason: str  #: short, e.g. "OOM", "skipped", "compile error"
    detail: str = ""

    def __str__(self) -> str:
        return self.reason


_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def release_memory(device: torch.device, collect: bool = False) -> None:
    """Return freed memory to the device / the OS. ``collect``: run the garbage
    collector first (slow, ~0.1 s; needed after an exception, whose traceback
    keeps the frames' tensors alive)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """Free memory for a new allocation: CUDA free + cached, or Linux MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TimingPolicy:
    """How many warm-up calls and repeats a measurement gets.

    After the warm-up, a measurement gets ``budget_s / (time of one call)``
    repeats, clamped to ``[min_repeats, max_repeats]``: small cases get many
    repeats, huge ones (seconds per call) only ``min_repeats``.
    """

    max_repeats: int = 20
    min_repeats: int = 3
    budget_s: float = 2.0
    #: a first call slower than this is the only warm-up (compiled functions always get two)
    slow_call_s: float = 1.0
    #: otherwise warm-up calls go on for this long and this many calls: on the CPU benchmark
    #: machine (a VM) the first few dozen calls of a process that allocate large outputs spend
    #: most of their time in the kernel's page allocator, which a steady training loop does not
    warmup_s: float = 0.0
    warmup_calls: int = 1

    def describe(self) -> str:
        warmup = (f"warm-up (at least {self.warmup_s:g} s and {self.warmup_calls} calls, unless one call takes "
                  f"over {self.slow_call_s:g} s)" if self.warmup_s > 0 else "warm-up")
        if self.budget_s <= 0 or self.min_repeats == self.max_repeats:
            return f"median of {self.min_repeats}-{self.max_repeats} timed calls after {warmup}"
        return (
            f"median of up to {self.max_repeats} timed calls after {warmup} "
            f"(fewer, at least {self.min_repeats}, where a call takes over "
            f"{self.budget_s / self.max_repeats * 1e3:.0f} ms: about {self.budget_s:g} s per measurement)"
        )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn, args, device) -> float:
    """Seconds one call takes, the device synchronized before and after."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def time_calls(
    fn: Callable,
    inputs: Sequence[tuple],
    device: torch.device,
    policy: TimingPolicy,
    *,
    compiled: bool = False,
    first_result: Optional[Callable] = None,
) -> float:
    """Median seconds of ``fn(*inputs[i % len(inputs)])`` over repeats after warm-up.

    Several input buffers are rotated so that caches do not flatter repeated
    calls on the same memory. ``first_result``, if given, receives the result of
    the first (warm-up) call on ``inputs[0]``, e.g. to check it.
    """
    sync(device)
    t0 = time.perf_counter()
    result = fn(*inputs[0])
    sync(device)
    last = time.perf_counter() - t0
    if first_result is not None:
        first_result(result)
    del result
    # The first call may have paid for compilation or lazy initialisation: unless it
    # was slow already (huge cases), time one more warm-up call to size the repeats.
    if compiled or last < policy.slow_call_s:
        warmed, i = 0.0, 1
        while True:
            last = _timed_call(fn, inputs[i % len(inputs)], device)
            warmed, i = warmed + last, i + 1
            if warmed >= policy.warmup_s and i > policy.warmup_calls:
                break
    repeats = int(policy.budget_s / max(last, 1e-9))
    repeats = max(policy.min_repeats, min(policy.max_repeats, repeats))
    times = [_timed_call(fn, inputs[(2 + i) % len(inputs)], device) for i in range(repeats)]
    return statistics.median(times)


def rotated_buffer_count(bytes_per_buffer: int, target_bytes: int = 256 * MiB, most: int = 8) -> int:
    """How many input buffers to rotate: enough to total ``target_bytes`` (more
    than the last-level caches hold), at least 2, at most ``most``; one buffer
    alone for inputs larger than the target (no cache holds them)."""
    if bytes_per_buffer >= target_bytes:
        return 1
    return max(2, min(most, math.ceil(target_bytes / max(bytes_per_buffer, 1))))


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def _malloc_trim() -> None:
    # glibc: hand every free heap page back to the kernel, so that memory the next
    # call reuses is faulted in again and shows in its peak resident set.
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def cpu_peak_rss_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


CPU_MEMORY_METHOD = (
    "CPU peak memory: Linux peak resident set of the process during one call minus the resident set "
    "before it (`malloc_trim(0)`, then \"5\" written to /proc/self/clear_refs to reset VmHWM, then VmHWM "
    "read from /proc/self/status after the call); it includes the call's outputs and any scratch memory, "
    "at page granularity"
)
CUDA_MEMORY_METHOD = (
    "CUDA peak memory: `torch.cuda.max_memory_allocated()` during one call (after "
    "`reset_peak_memory_stats()`) minus `memory_allocated()` before it; it includes the call's outputs"
)


def peak_memory(fn: Callable, args: tuple, device: torch.device):
    """Bytes the call ``fn(*args)`` needs at its peak beyond what was allocated
    before it (outputs included), or :class:`NotRun` where it cannot be measured."""
    release_memory(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn(*args)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    if not cpu_peak_rss_supported():
        return NotRun("n/a", "no /proc/self/clear_refs (Linux only)")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    result = fn(*args)
    peak = (_status_kib("VmHWM") - before) * 1024
    del result
    return max(peak, 0)


# --------------------------------------------------------------------------------------------
# Bandwidth
# --------------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int = GiB, policy: Optional[TimingPolicy] = None) -> float:
    """Measured device-to-device copy bandwidth in bytes/s: ``dst.copy_(src)`` of
    ``nbytes`` (far larger than any cache) moves ``2 * nbytes`` (one read, one write)."""
    policy = policy or TimingPolicy(max_repeats=20, min_repeats=5, budget_s=1.0)
    src = torch.empty(nbytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_calls(lambda: dst.copy_(src), [()], device, policy)
    del src, dst
    release_memory(device)
    return 2 * nbytes / seconds


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def fmt_ms(seconds) -> str:
    if isinstance(seconds, NotRun):
        return str(seconds)
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_mib(nbytes) -> str:
    if isinstance(nbytes, NotRun):
        return str(nbytes)
    mib = nbytes / MiB
    return f"{mib:.3g}" if mib < 100 else f"{mib:.0f}"


def ratio(a, b) -> Optional[float]:
    """``a / b`` where both were measured, else None."""
    if isinstance(a, NotRun) or isinstance(b, NotRun) or a is None or b is None or b <= 0:
        return None
    return a / b


def fmt_ratio(r: Optional[float]) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
