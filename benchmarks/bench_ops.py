"""The fused ops against the paper's, the eager and the compiled formulations.

``soft_color_quantize`` forward and forward + backward, ``hard_color_quantize``
and ``render_index_map`` forward, ``palette_distance`` forward and forward +
backward, at CIFAR (B=128, 32x32, K in {2, 8, 64}) and
ImageNet (B=32, 224x224, K in {2, 16, 256}) sizes: median time, peak memory and,
on CUDA, the achieved bandwidth of the fused op against the device's copy
bandwidth. Every formulation's first result is checked against the fused op's.
"""

import dataclasses
from typing import Dict, List, Optional

import torch

from .common import (
    NotRun,
    TimingPolicy,
    available_memory_bytes,
    fmt_mib,
    fmt_ms,
    fmt_ratio,
    is_out_of_memory,
    peak_memory,
    ratio,
    release_memory,
    rotated_buffer_count,
    time_calls,
)
from .formulations import FORMULATIONS, OPS, formulation, has_formulation

#: size name -> (B, H, W, Ks)
SIZES = {
    "cifar": (128, 32, 32, (2, 8, 64)),
    "imagenet": (32, 224, 224, (2, 16, 256)),
}
#: (op, pass) pairs measured at every shape
OP_PASSES = (("soft", "fwd"), ("soft", "fwd+bwd"), ("hard", "fwd"), ("render", "fwd"),
             ("distance", "fwd"), ("distance", "fwd+bwd"))
CHANNELS = 3


@dataclasses.dataclass(frozen=True)
class OpCase:
    op: str  #: "soft", "hard", "render" or "distance"
    mode: str  #: "fwd" or "fwd+bwd"
    B: int
    K: int
    H: int
    W: int
    dtype: torch.dtype
    C: int = CHANNELS

    @property
    def shape(self) -> str:
        return f"{self.B}x{self.K}x{self.H}x{self.W}"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def label(self) -> str:
        return f"{self.op} {self.mode} {self.shape} {self.dtype_name}"

    def min_bytes(self) -> int:
        """The fewest bytes the op must move: each input read once, each output written once."""
        s = torch.empty((), dtype=self.dtype).element_size()
        BKP, BCP, BKC, BP = self.B * self.K * self.H * self.W, self.B * self.C * self.H * self.W, \
            self.B * self.K * self.C, self.B * self.H * self.W
        index = 8 * BP  # int64 index map
        if self.op == "distance" and self.mode == "fwd":
            return s * (BCP + BKC + BKP)  # image, palette -> distances
        if self.op == "distance":
            return s * (2 * BCP + 2 * BKC + 2 * BKP)  # image, palette, upstream grad -> out, 2 grads
        if self.op == "soft" and self.mode == "fwd":
            return s * (2 * BKP + 2 * BCP + BKC)  # logits, image -> probs, quantized, palette
        if self.op == "soft":
            # logits, image, 3 upstream grads -> 3 outputs, grad_logits, grad_image
            return s * (4 * BKP + 4 * BCP + 2 * BKC)
        if self.op == "hard":
            return s * (BKP + 2 * BCP + BKC) + index  # logits, image -> quantized, index_map, palette
        return s * (BKC + BCP) + index  # index_map, palette -> image


@dataclasses.dataclass
class OpResult:
    case: OpCase
    seconds: Dict[str, object] = dataclasses.field(default_factory=dict)  # float or NotRun
    peak_bytes: Dict[str, object] = dataclasses.field(default_factory=dict)
    mismatches: List[str] = dataclasses.field(default_factory=list)
    copy_bandwidth: Optional[float] = None  # bytes/s, CUDA only

    @property
    def bandwidth(self) -> Optional[float]:
        """Achieved bandwidth of the fused op (bytes/s) from :meth:`OpCase.min_bytes`."""
        t = self.seconds.get("fused")
        if isinstance(t, NotRun) or t is None:
            return None
        return self.case.min_bytes() / t

    @property
    def bandwidth_fraction(self) -> Optional[float]:
        if self.bandwidth is None or not self.copy_bandwidth:
            return None
        return self.bandwidth / self.copy_bandwidth


def plan(sizes, dtypes, ops=OPS) -> List[OpCase]:
    cases = []
    for size in sizes:
        B, H, W, Ks = SIZES[size]
        for K in Ks:
            for dtype in dtypes:
                cases += [OpCase(op, mode, B, K, H, W, dtype) for op, mode in OP_PASSES if op in ops]
    return cases


def make_inputs(case: OpCase, device: torch.device, n_buffers: Optional[int] = None, seed: int = 0):
    """Rotated random input buffers (never zeros) for ``case``'s runner."""
    gen = torch.Generator(device=device).manual_seed(seed)
    B, K, C, H, W, dtype = case.B, case.K, case.C, case.H, case.W, case.dtype

    def one():
        if case.op == "render":
            index_map = torch.randint(0, K, (B, H, W), generator=gen, device=device)
            return (index_map, torch.rand(B, K, C, generator=gen, device=device, dtype=dtype))
        grad = case.mode == "fwd+bwd"
        if case.op == "distance":
            image = torch.rand(B, C, H, W, generator=gen, device=device, dtype=dtype).requires_grad_(grad)
            palette = torch.rand(B, K, C, generator=gen, device=device, dtype=dtype).requires_grad_(grad)
            if not grad:
                return (image, palette)
            return (image, palette, torch.randn(B, K, H, W, generator=gen, device=device, dtype=dtype))
        logits = (2 * torch.randn(B, K, H, W, generator=gen, device=device, dtype=dtype)).requires_grad_(grad)
        image = torch.rand(B, C, H, W, generator=gen, device=device, dtype=dtype).requires_grad_(grad)
        if not grad:
            return (logits, image)
        upstream = [torch.randn(shape, generator=gen, device=device, dtype=dtype)
                    for shape in ((B, C, H, W), (B, K, C), (B, K, H, W))]
        return (logits, image, *upstream)

    first = one()
    if n_buffers is None:
        n_buffers = rotated_buffer_count(sum(t.nbytes for t in first))
    return [first] + [one() for _ in range(n_buffers - 1)]


def runner(fn, mode: str):
    """The measured call: the forward alone (no autograd graph), or the forward and
    the backward from random dense upstream gradients of all outputs (soft: the
    three outputs w.r.t. logits and image; distance: the distances w.r.t. image
    and palette)."""
    if mode == "fwd":
        def forward(*args):
            with torch.no_grad():
                return fn(*args)
        return forward

    def forward_backward(first, second, *upstream):
        outputs = fn(first, second)
        return torch.autograd.grad(outputs, (first, second), upstream)

    return forward_backward


def _first_image(result):
    return tuple(t[:1].detach().clone() for t in result) if isinstance(result, (tuple, list)) else (result[:1].detach().clone(),)


#: largest error relative to the largest magnitude of the fused result accepted in the check
_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2, torch.float64: 1e-9}


#: names of the two gradients of each op's fwd+bwd
_GRAD_NAMES = {"soft": ("grad_logits", "grad_image"), "distance": ("grad_image", "grad_palette")}


def _compare(name: str, got, expected, dtype, op: str = "soft") -> Optional[str]:
    names = _GRAD_NAMES[op] if len(expected) == 2 else [f"output {i}" for i in range(len(expected))]
    for what, a, b in zip(names, got, expected):
        if a.shape != b.shape:
            return f"{name}: {what} has shape {tuple(a.shape)}, fused {tuple(b.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"{name}: {what} differs from fused at {int((a != b).sum())} of {a.numel()} elements"
            continue
        err = (a.double() - b.double()).abs().max().item()
        scale = b.double().abs().max().item()
        if not err <= _CHECK_TOLERANCE[dtype] * max(scale, 1e-30):
            return f"{name}: {what} differs from fused by {err:.3g} (largest |fused| {scale:.3g})"
    return None


def paper_bytes_estimate(case: OpCase) -> int:
    """Estimate of the paper formulation's peak memory, used on the CPU only to skip a
    case rather than have the kernel's OOM killer end the run: its ``B x C x K x H x W``
    products (measured on the CPU at B=1, 224x224, K=256: two live at once in the hard
    forward and in the soft forward + backward) and per-pixel tensors, plus 10%."""
    s = torch.empty((), dtype=case.dtype).element_size()
    bckp = case.B * case.C * case.K * case.H * case.W * s
    bkp = case.B * case.K * case.H * case.W * s
    return int(1.1 * (2 * bckp + (2 if case.mode == "fwd+bwd" else 1) * bkp))


def distance_eager_bytes_estimate(case: OpCase) -> int:
    """The same for palette_distance's eager broadcast: its ``B x K x C x H x W`` difference
    and square (fwd+bwd: also the difference saved for the backward and its gradient)."""
    s = torch.empty((), dtype=case.dtype).element_size()
    bkcp = case.B * case.K * case.C * case.H * case.W * s
    return int(1.1 * (4 if case.mode == "fwd+bwd" else 2) * bkcp)


def _memory_estimate(case: OpCase, name: str) -> Optional[int]:
    if name == "paper" and case.op != "distance":
        return paper_bytes_estimate(case)
    if name == "eager" and case.op == "distance":
        return distance_eager_bytes_estimate(case)
    return None


class _Skipped(Exception):
    pass


def run_case(case: OpCase, device: torch.device, policy: TimingPolicy, copy_bandwidth=None,
             progress=None, log=print, formulations=None) -> OpResult:
    """Times ``case`` in each formulation (default :data:`FORMULATIONS`; ``fused`` first:
    the others are checked against it)."""
    result = OpResult(case, copy_bandwidth=copy_bandwidth)
    inputs = make_inputs(case, device)
    reference = None
    for name in formulations or FORMULATIONS:
        first = {}
        if not has_formulation(case.op, name):
            result.seconds[name] = result.peak_bytes[name] = NotRun("n/a", f"{case.op} has no {name} formulation")
            if progress is not None:
                progress.update(1)
            continue
        try:
            need = _memory_estimate(case, name) if device.type == "cpu" else None
            if need is not None:
                avail = available_memory_bytes(device)
                if avail is not None and need > 0.9 * avail:
                    raise _Skipped(f"needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available")
            try:
                fn = runner(formulation(case.op, name), case.mode)
                result.seconds[name] = time_calls(fn, inputs, device, policy, compiled=name == "compiled",
                                                  first_result=lambda r: first.setdefault("r", _first_image(r)))
            except Exception as exc:
                if name != "compiled" or is_out_of_memory(exc):
                    raise
                result.seconds[name] = NotRun("compile error", f"{type(exc).__name__}: {exc}")
                log(f"{case.label}: torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            else:
                result.peak_bytes[name] = peak_memory(fn, inputs[0], device)
        except _Skipped as exc:
            result.seconds[name] = result.peak_bytes[name] = NotRun("skipped", str(exc))
            log(f"{case.label}: {name} skipped: {exc}")
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            reason = NotRun("OOM", f"{type(exc).__name__}: {exc}")
            result.seconds[name] = reason
            result.peak_bytes[name] = reason
            log(f"{case.label}: {name} out of memory ({str(exc).splitlines()[0][:200]})")
            del exc
            release_memory(device, collect=True)
        if "r" in first:
            if name == "fused":
                reference = first["r"]
            elif reference is not None:
                problem = _compare(name, first["r"], reference, case.dtype, case.op)
                if problem:
                    result.mismatches.append(problem)
                    log(f"{case.label}: MISMATCH {problem}")
        del first
        release_memory(device)
        if progress is not None:
            progress.update(1)
    del inputs
    release_memory(device)
    return result


def table(results: List[OpResult], device: torch.device):
    header = ["op", "pass", "B×K×H×W", "dtype"]
    header += [f"{n} ms" for n in FORMULATIONS]
    header += [f"vs {n}" for n in FORMULATIONS[1:]]
    header += [f"{n} MiB" for n in FORMULATIONS]
    if device.type == "cuda":
        header += ["fused GB/s", "% copy BW"]
    rows = []
    for r in results:
        c = r.case
        t, m = r.seconds, r.peak_bytes
        row = [c.op, c.mode, c.shape, c.dtype_name]
        row += [fmt_ms(t.get(n, NotRun("-"))) for n in FORMULATIONS]
        row += [fmt_ratio(ratio(t.get(n), t.get("fused"))) for n in FORMULATIONS[1:]]
        row += [fmt_mib(m.get(n, NotRun("-"))) for n in FORMULATIONS]
        if device.type == "cuda":
            row += ["-" if r.bandwidth is None else f"{r.bandwidth / 1e9:.0f}",
                    "-" if r.bandwidth_fraction is None else f"{100 * r.bandwidth_fraction:.0f}%"]
        if r.mismatches:
            row[0] += " (MISMATCH)"
        rows.append(row)
    return header, rows
