"""ColorCNN end to end: one training step with the fused soft op and with the paper's formulation.

A step is what ``colorquant train`` does per batch: ColorCNN (U-Net backbone)
forward in training mode, the frozen classifier on the quantized images,
:class:`~colorquant_ops.losses.ColorCNNLoss` (the paper's defaults), backward
and an SGD step. The quantization's share of the step is the time of the soft
op alone, forward + backward from random upstream gradients at the same shape
(as in the op benchmark), divided by the step time.

ColorCNN calls :func:`colorquant_ops.ops.soft_color_quantize` and has no
argument to swap it, so the paper's formulation is put in by replacing the
name in :mod:`colorquant_ops.models.colorcnn` for the duration of the timing
(:func:`soft_quantizer`).
"""

import contextlib
import dataclasses
from typing import List

import torch

from colorquant_ops.models.classifiers import build_classifier
from colorquant_ops.losses import ColorCNNLoss
from colorquant_ops.models import ColorCNN
from colorquant_ops.models import colorcnn as colorcnn_module

from . import bench_ops
from .common import NotRun, TimingPolicy, fmt_ms, fmt_ratio, is_out_of_memory, ratio, release_memory, time_calls
from .formulations import formulation, soft_color_quantize_paper

#: size name -> (classifier arch, number of classes, ColorCNN color_norm); shapes from bench_ops.SIZES
SETUPS = {"cifar": ("alexnet", 10, 4.0), "imagenet": ("alexnet", 1000, 1.0)}
STEP_FORMULATIONS = ("fused", "paper")
#: the paper's U-Net width
DEFAULT_WIDTH = 64


@dataclasses.dataclass(frozen=True)
class ColorCNNCase:
    size: str
    B: int
    H: int
    K: int
    width: int

    @property
    def label(self) -> str:
        return f"ColorCNN step {self.size} B={self.B} K={self.K} width={self.width}"


@dataclasses.dataclass
class ColorCNNResult:
    case: ColorCNNCase
    step_seconds: dict = dataclasses.field(default_factory=dict)  # formulation -> float or NotRun
    quant_seconds: dict = dataclasses.field(default_factory=dict)


def plan(sizes, width: int) -> List[ColorCNNCase]:
    cases = []
    for size in sizes:
        B, H, _, Ks = bench_ops.SIZES[size]
        cases += [ColorCNNCase(size, B, H, K, width) for K in Ks]
    return cases


#: measurements per case (for the progress bar): a step and the op alone, per formulation
MEASUREMENTS_PER_CASE = 2 * len(STEP_FORMULATIONS)


@contextlib.contextmanager
def soft_quantizer(fn):
    """Make ColorCNN's training path call ``fn`` instead of the fused soft op; yields a
    list that counts the calls (proof that the replacement took effect)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    saved = colorcnn_module.soft_color_quantize
    colorcnn_module.soft_color_quantize = counted
    try:
        yield calls
    finally:
        colorcnn_module.soft_color_quantize = saved


def _training_step(case: ColorCNNCase, device: torch.device):
    arch, num_classes, color_norm = SETUPS[case.size]
    torch.manual_seed(0)
    model = ColorCNN(case.K, width=case.width, color_norm=color_norm).to(device).train()
    classifier = build_classifier(arch, num_classes, case.H).to(device).eval().requires_grad_(False)
    criterion = ColorCNNLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        out = model(images)
        loss, _ = criterion(classifier(out.quantized), labels, out, images)
        loss.backward()
        optimizer.step()

    gen = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.rand(case.B, 3, case.H, case.H, generator=gen, device=device),
                torch.randint(0, num_classes, (case.B,), generator=gen, device=device)) for _ in range(2)]
    return step, batches


def _measure(what, fn, log, label, device):
    try:
        return fn()
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        log(f"{label}: {what} out of memory ({str(exc).splitlines()[0][:200]})")
        reason = NotRun("OOM", str(exc))
    release_memory(device, collect=True)
    return reason


def run_case(case: ColorCNNCase, device: torch.device, policy: TimingPolicy, progress=None, log=print):
    result = ColorCNNResult(case)
    step, batches = _training_step(case, device)
    for name in STEP_FORMULATIONS:
        if name == "fused":
            result.step_seconds[name] = _measure(
                "fused step", lambda: time_calls(step, batches, device, policy), log, case.label, device)
        else:
            with soft_quantizer(soft_color_quantize_paper) as calls:
                result.step_seconds[name] = _measure(
                    "paper step", lambda: time_calls(step, batches, device, policy), log, case.label, device)
            if not calls and not isinstance(result.step_seconds[name], NotRun):
                raise RuntimeError("ColorCNN did not call the replaced soft_color_quantize: the paper step "
                                   "timed the fused op (colorquant_ops.models.colorcnn changed?)")
        release_memory(device)
        if progress is not None:
            progress.update(1)
    del step, batches
    release_memory(device)

    op_case = bench_ops.OpCase("soft", "fwd+bwd", case.B, case.K, case.H, case.H, torch.float32)
    inputs = bench_ops.make_inputs(op_case, device)
    for name in STEP_FORMULATIONS:
        fn = bench_ops.runner(formulation("soft", name), "fwd+bwd")
        result.quant_seconds[name] = _measure(
            f"{name} op", lambda: time_calls(fn, inputs, device, policy), log, case.label, device)
        release_memory(device)
        if progress is not None:
            progress.update(1)
    del inputs
    release_memory(device)
    return result


def table(results: List[ColorCNNResult]):
    header = ["images", "K", "U-Net width", "classifier", "fused step ms", "paper step ms", "step speed-up",
              "fused op ms", "fused op share", "paper op ms", "paper op share"]
    rows = []
    for r in results:
        c = r.case
        arch, num_classes, _ = SETUPS[c.size]
        s, q = r.step_seconds, r.quant_seconds
        share = {n: ratio(q.get(n), s.get(n)) for n in STEP_FORMULATIONS}
        rows.append([
            f"{c.B}x{c.H}x{c.H}", c.K, c.width, f"{arch} ({num_classes} classes, frozen)",
            fmt_ms(s["fused"]), fmt_ms(s["paper"]), fmt_ratio(ratio(s["paper"], s["fused"])),
            fmt_ms(q["fused"]), "-" if share["fused"] is None else f"{100 * share['fused']:.0f}%",
            fmt_ms(q["paper"]), "-" if share["paper"] is None else f"{100 * share['paper']:.0f}%",
        ])
    return header, rows
