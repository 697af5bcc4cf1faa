"""``colorquant reproduce --preset NAME``: a whole experiment (classifier, ColorCNN per K, evaluate) in one command.

A preset is a list of stages, each an ordinary ``colorquant`` command line (``train-classifier``,
``train``, ``evaluate``) with ``{out}`` standing for the preset's output directory. The stages run
in order, in this process, through the same parser a user's command goes through, so a preset is
exactly the commands it prints (``--dry-run`` prints them without running anything):

* a stage whose run directory holds ``final.pt`` (trainers) or ``results.json`` (evaluate) that
  reads back (a checkpoint of the right format, JSON with rows) is done and skipped;
* a stage whose run directory holds ``last.pt`` was interrupted and continues with ``--resume``.

So re-running an interrupted ``reproduce`` picks up where it stopped. When every stage is done,
:func:`write_report` gathers the evaluate stages into ``{out}/report``: the paper's comparison, one
method x K table of ColorCNN and the paper's baselines (median cut, octree, and its k-means
``pil_kmeans``: PIL's ``quantize(kmeans=2)``), then, apart and marked as not the paper's, this
library's k-means++ (``kmeans``), and the JPEG and full-colour rows (``results.md``; every row in
``results.json``), the accuracy-vs-bits and accuracy-vs-bits-per-pixel plots, and a picture sheet at 1,
2 and 3 bits (what RESULTS.md shows).

Without ``--data-root`` the stages read CIFAR-10 from the project's JPEG copy (when it is there): JPEG-
compressed images, not the original CIFAR-10 the paper reports on. ``reproduce`` says so in its first
line and at the head of ``results.md`` and ``results.json`` (``"data_warning"``).
Presets:

* ``cifar10-paper`` -- the seed paper's CIFAR-10 configuration (CIFAR AlexNet 60 epochs with the
  authors' one-cycle schedule, ``--schedule onecycle``; ColorCNN U-Net width 64, 60 epochs, cosine
  restarts every 20; K = 2..64); meant for a GPU;
* ``cifar10-cpu`` -- the run the bundled demo weights come from: what a 2-core CPU with native
  bfloat16 (AVX512-BF16 / AMX) does in four to five hours (from its stages' measured epoch times):
  the airbench93 classifier, 12 epochs (88 % full colour in 7.5 min on such a CPU); ColorCNN U-Net
  width 16 in bfloat16 autocast, channels-last, without colour_norm / colour_jitter, 6 epochs at
  K = 2, 3 at K = 4..64 (one cosine cycle each);
  then more epochs with Gumbel noise on the logits (``--logit-noise 1``, lr 0.005), 12 at K = 2 and 6
  at K = 4, 8 (``colorcnn-k{2,4,8}-gumbel``: the bundled networks, 8 to 11 points above the stages they
  start from); a second ColorCNN K = 2, ``colorcnn-k2-compact``, trained with the boundary term
  (``--boundary 2``) for 12 epochs, for palette PNGs under k-means' size, then six epochs with the noise
  and ``--boundary 5`` (``colorcnn-k2-compact-gumbel``); ColorCNN+ U-Net width 16 in bfloat16,
  channels-last, 4 epochs at lr 0.03 at K drawn from 2..256, then four with the noise at lr 0.015
  (``colorcnn-plus-gumbel``); the ``-gumbel`` stages are the bundled networks;
* ``cifar10-cpu-alexnet`` -- the same experiment as ``cifar10-cpu`` ran until session 10: the CIFAR
  AlexNet, 15 epochs (``--schedule step``: lr x0.1 at 8 and 12); ColorCNN 8 epochs at K = 2, 4 at
  K = 4, 3 at K = 8..64, float32 channels-first ColorCNN+ at lr 0.01 (RESULTS.md's first tables);
* ``smoke`` -- a tiny run of every stage (step schedule) (a few hundred images, one epoch, width 4) to check a setup
  in a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import torch

from .._checkpoint import read_checkpoint
from .._io import atomic_write_text, save_atomic
from ..models import classifiers, colorcnn, colorcnn_plus
from . import data, evaluate, train
from .commands import Command, build_parser, run_command
from .quantize_files import comparison_sheet

__all__ = ["COMMAND", "COMPACT_STAGE", "GUMBEL_KS", "PLUS_STAGE", "PRESETS", "Preset", "Stage",
           "add_reproduce_arguments", "data_warning", "final_run", "gumbel_stage", "reproduce", "sheet_images",
           "write_report"]

_KS = (2, 4, 8, 16, 32, 64)

#: The commands a preset's stages run (parsed and run as ``colorquant`` would).
STAGE_COMMANDS = (train.CLASSIFIER_COMMAND, train.COLORCNN_COMMAND, evaluate.COMMAND)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One ``colorquant`` command of a preset; ``name`` is its run directory under the output directory."""

    name: str
    argv: tuple[str, ...]

    def command(self, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
        """The stage's command line with ``{out}`` filled in, ``--out-dir`` and ``extra`` appended."""
        return [a.format(out=out) for a in self.argv] + ["--out-dir", str(out / self.name), *extra]

    def done_marker(self) -> str:
        return "results.json" if self.argv[0] == "evaluate" else "final.pt"


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    stages: tuple[Stage, ...]


def _colorcnn(k: int, *options: str, name: Optional[str] = None) -> Stage:
    return Stage(name or f"colorcnn-k{k}", ("train", "--classifier", "{out}/classifier/final.pt",
                                            "--num-colors", str(k), *options))


#: The run directory of a preset's second, smaller-file ColorCNN K = 2 (``--boundary 2``).
COMPACT_STAGE = "colorcnn-k2-compact"


#: The K at which the ``cifar10-cpu`` preset fine-tunes its ColorCNN with Gumbel noise (the bundled K).
GUMBEL_KS = (2, 4, 8)


def gumbel_stage(run: str) -> str:
    """The run directory of a preset's Gumbel-noise fine-tune of its stage ``run`` (e.g. ``colorcnn-k2``)."""
    return f"{run}-gumbel"


def final_run(run: str, names) -> str:
    """The run a preset's stage ``run`` ends in: its :func:`gumbel_stage` fine-tune where ``names`` (the
    preset's stage names) has one, else ``run`` itself."""
    return gumbel_stage(run) if gumbel_stage(run) in names else run


def _evaluate(ks, *options: str, plus: Optional[str] = None, compact=(), gumbel=()) -> tuple[Stage, Stage]:
    """Two evaluate stages: the traditional quantizers (with JPEG and full colour; they do not need
    ColorCNN, so they can run while it trains) and ColorCNN per K (``gumbel``: at these K the
    :func:`gumbel_stage` network, the stage it started from as a second row; ``compact``: more K = 2
    runs, rows of their own; ``plus``: and this ColorCNN+ run at every K). Each row of ``colorquant
    evaluate`` is computed independently, so the two tables are the one table of a single run, split."""
    runs = [gumbel_stage(f"colorcnn-k{k}") if k in gumbel else f"colorcnn-k{k}" for k in ks]
    runs += [f"colorcnn-k{k}" for k in ks if k in gumbel] + list(compact)
    ckpts = [f"{{out}}/{run}/final.pt" for run in runs]
    plus_methods = ("colorcnn+",) if plus else ()
    plus_args = ("--colorcnn-plus", f"{{out}}/{plus}/final.pt") if plus else ()
    common = ("--classifier", "{out}/classifier/final.pt", "--num-colors", *map(str, ks))
    return (Stage("evaluate-traditional", ("evaluate", *common, "--methods", "median_cut", "octree", "pil_kmeans",
                                           "kmeans", "--dither", "both", *options)),
            Stage("evaluate-colorcnn", ("evaluate", *common, "--methods", "colorcnn", *plus_methods, "--colorcnn",
                                        *ckpts, *plus_args, "--jpeg-qualities", *options)))


#: The run directory of a preset's ColorCNN+ stage.
PLUS_STAGE = "colorcnn-plus"


def _cpu_colorcnn_plus(*options: str) -> Stage:
    # one network for K = 2..256 (the default --train-colors); without the imitation term, which cost
    # 0.3-1.2 points in 4 epochs (RESULTS.md's ablation); with the boundary term at 0.9 / log2(K), which
    # brought the palette PNGs below k-means' from K = 8 up at no cost in accuracy (session 13's
    # ablation); per-epoch checks on 2000 test images at K = 2, 8, 64 (the evaluate stage measures
    # every K on the whole split)
    return Stage(PLUS_STAGE, ("train", "--model", "colorcnn+", "--classifier", "{out}/classifier/final.pt",
                              "--width", "16", "--epochs", "4", "--restart-epochs", "4", "--imitation", "0",
                              "--boundary", "0.9", "--boundary-schedule", "inverse-log2",
                              "--eval-colors", "2", "8", "64", "--test-subset", "2000", "--seed", "0", *options))


def _cpu_colorcnn(k: int, epochs: dict, *options: str, name: Optional[str] = None) -> Stage:
    # Without the paper's colour_norm 4 / colour_jitter 1: in a few epochs they cost K=2 about
    # 10 points of test accuracy (the ablation in RESULTS.md). Most of the budget where the paper's
    # headline is (K = 2); 3 epochs where ``epochs`` says nothing (one epoch left K = 16..64 using too
    # few of their colours).
    common = ("--width", "16", "--amp", "--color-norm", "1", "--color-jitter", "0", "--seed", "0", *options)
    n = str(epochs.get(k, 3))
    return _colorcnn(k, *common, "--epochs", n, "--restart-epochs", n, name=name)


def _with_options(argv, options: dict) -> tuple[str, ...]:
    """``argv`` with each ``--flag: value`` of ``options`` set: its value replaced where ``argv`` has
    the flag, else appended."""
    argv = list(argv)
    for flag, value in options.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return tuple(argv)


def _gumbel(stage: Stage, lr: str, epochs: str = "6", **options: str) -> Stage:
    # More epochs (one cosine cycle) of a stage's network with Gumbel noise on its logits, at half its
    # lr (``lr``): the noise makes colour probabilities near 1/2 unreliable, so the soft image the
    # network trains on moves towards the argmax image it is scored on (ColorCNN K = 2: +6 points in 2
    # epochs, RESULTS.md session 19; +8.6 in 6 and +11.1 in 12, session 21; ColorCNN+, 4 epochs: +0.6 to
    # +1.1 at K = 2..64, session 20, where 4 epochs without the noise moved it by -1.6 to +0.4, session
    # 21). ``options``: more flags to set (``boundary="5"`` is ``--boundary 5``).
    options = {"--init-from": f"{{out}}/{stage.name}/final.pt", "--logit-noise": "1", "--lr": lr, "--epochs": epochs,
               "--restart-epochs": epochs, **{f"--{key}": value for key, value in options.items()}}
    return Stage(gumbel_stage(stage.name), _with_options(stage.argv, options))


def _cpu_stages() -> tuple[Stage, ...]:
    colorcnn = {k: _cpu_colorcnn(k, {2: 6}, "--channels-last", "--test-subset", "2000") for k in _KS}
    # K = 2 again with the boundary term, 12 epochs: palette PNGs under k-means' size, a smaller lead
    # (RESULTS.md, sessions 14 and 18): the library's K = 2 model for small files; its Gumbel fine-tune
    # takes a heavier boundary term (5), as the noise alone makes the index maps busier (session 20)
    compact = _cpu_colorcnn(2, {2: 12}, "--channels-last", "--test-subset", "2000", "--boundary", "2",
                            name=COMPACT_STAGE)
    plus = _cpu_colorcnn_plus("--amp", "--channels-last", "--lr", "0.03")
    return (Stage("classifier", ("train-classifier", "--arch", "airbench93", "--epochs", "12", "--seed", "0")),
            *colorcnn.values(),
            *(_gumbel(colorcnn[k], "0.005", epochs={2: "12"}.get(k, "6")) for k in GUMBEL_KS),
            compact, _gumbel(compact, "0.005", boundary="5"), plus, _gumbel(plus, "0.015", epochs="4"),
            *_evaluate(_KS, plus=gumbel_stage(PLUS_STAGE), compact=(gumbel_stage(COMPACT_STAGE), COMPACT_STAGE),
                       gumbel=GUMBEL_KS))


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "cifar10-paper",
            "the paper's CIFAR-10 configuration: AlexNet 60 epochs (one-cycle lr), ColorCNN width 64, 60 epochs, K=2..64 (GPU)",
            (
                Stage("classifier", ("train-classifier", "--arch", "alexnet", "--epochs", "60",
                                     "--schedule", "onecycle", "--seed", "0")),
                *(_colorcnn(k, "--width", "64", "--epochs", "60", "--restart-epochs", "20", "--seed", "0")
                  for k in _KS),
                *_evaluate(_KS),
            ),
        ),
        Preset(
            "cifar10-cpu",
            "a 2-core bf16 CPU's configuration: airbench93 12 epochs, ColorCNN width 16 (bf16, no colour "
            "norm/jitter), 6/3 epochs, K=2..64, +12/6/6 epochs with Gumbel noise at K=2,4,8; a compact K=2 "
            "(boundary term) +6 epochs with the noise; ColorCNN+ 4 epochs, +4 with the noise",
            _cpu_stages(),
        ),
        Preset(
            "cifar10-cpu-alexnet",
            "cifar10-cpu until session 10: AlexNet 15 epochs, ColorCNN width 16 (bf16, no colour norm/jitter), "
            "8/4/3 epochs, K=2..64, ColorCNN+ (float32) 4 epochs",
            (
                Stage("classifier", ("train-classifier", "--arch", "alexnet", "--epochs", "15",
                                     "--schedule", "step", "--lr-steps", "8,12", "--seed", "0")),
                *(_cpu_colorcnn(k, {2: 8, 4: 4}) for k in _KS),
                _cpu_colorcnn_plus(),
                *_evaluate(_KS, plus=PLUS_STAGE),
            ),
        ),
        Preset(
            "smoke",
            "every stage on a few hundred images, one epoch, width 4: checks a setup in about a minute",
            (
                Stage("classifier", ("train-classifier", "--subset", "256", "--test-subset", "128",
                                     "--epochs", "1", "--batch-size", "64", "--schedule", "step")),
                *(_colorcnn(k, "--width", "4", "--subset", "256", "--test-subset", "128", "--epochs", "1",
                            "--batch-size", "64") for k in (2, 4)),
                *_evaluate((2, 4), "--test-subset", "128"),
            ),
        ),
    )
}


#: The report's picture sheet: the first test image of each of these classes, at these K.
SHEET_CLASSES = ("airplane", "bird", "deer", "frog", "ship")
SHEET_KS = (2, 4, 8)


def data_warning(data_root=None) -> Optional[str]:
    """The warning ``reproduce`` gives when, without ``--data-root``, its stages read CIFAR-10 from the
    project's JPEG copy (extracted, or its archive found); None with a ``--data-root`` (or without the copy:
    then the stages read ./data)."""
    if data_root is not None:
        return None
    if not ((data.default_cache_dir() / "cifar10-jpeg" / ".extracted").is_file()
            or data.find_shared_cifar10_archive() is not None):
        return None
    return ("WARNING: no --data-root: CIFAR-10 comes from the project's JPEG copy (JPEG-compressed images), not "
            "the original CIFAR-10 the paper reports on; the accuracies are not the paper's setting. Pass "
            "--data-root with the original CIFAR-10 (torchvision's cifar-10-batches-py) to reproduce it.")


def sheet_images(data_root=None) -> torch.Tensor:
    """The picture sheet's images: the first CIFAR-10 test image of each of :data:`SHEET_CLASSES`, uint8
    ``[N,3,32,32]`` (the project's JPEG copy unless ``data_root``)."""
    root, cache = data.data_locations(argparse.Namespace(data_root=data_root, dataset="cifar10", cache_dir=None))
    test_set = data.build_dataset("cifar10", root, "test", data.test_transform("cifar10", normalize=False),
                                  cache_dir=cache)
    picks = [test_set.targets.index(test_set.classes.index(name)) for name in SHEET_CLASSES]
    return (torch.stack([test_set[i][0] for i in picks]) * 255).round().to(torch.uint8)


def write_report(preset: Preset, out: Path, data_root=None) -> list[Path]:
    """Gather a finished preset run's evaluate stages into ``out/report`` (see the module docstring);
    ``data_root`` as the stages' ``--data-root``. Returns the files written."""
    rows = evaluate.merge_rows(out / stage.name for stage in preset.stages if stage.argv[0] == "evaluate")
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    written = [report / "results.md", report / "results.json"]
    warning = data_warning(data_root)
    paper = [r for r in rows if r["method"] in ("full colour", "colorcnn", "colorcnn+", *evaluate.PAPER_BASELINES)]
    library = [r for r in rows if r["method"] == "kmeans"]
    parts = [f"**{warning}**"] if warning else []
    parts.append("ColorCNN (and ColorCNN+, not in the seed paper) and the paper's baselines (median cut, octree, "
                 "its k-means pil_kmeans = PIL quantize(kmeans=2)):\n\n" + evaluate.pivot_tables(paper))
    if library:
        parts.append("Not in the paper: kmeans, this library's k-means++ op (a stronger k-means than the "
                     "paper's):\n\n" + evaluate.pivot_tables(library))
    parts.append(evaluate.markdown_table([r for r in rows if r["method"] in ("full colour", "jpeg")]))
    atomic_write_text(written[0], "\n\n".join(parts) + "\n")
    atomic_write_text(written[1], json.dumps({"preset": preset.name, "data_warning": warning, "rows": rows},
                                             indent=2) + "\n")
    written += evaluate.plot_results(rows, report)

    names = {stage.name for stage in preset.stages}
    ks = [k for k in SHEET_KS if f"colorcnn-k{k}" in names]
    plus = out / final_run(PLUS_STAGE, names) / "final.pt" if PLUS_STAGE in names else None
    sheet = comparison_sheet(sheet_images(data_root),
                             {k: out / final_run(f"colorcnn-k{k}", names) / "final.pt" for k in ks}, ks,
                             plus_checkpoint=plus)
    written.append(report / "sheet-1-2-3-bits.png")
    save_atomic(sheet, written[-1], lambda image, f: image.save(f, format="PNG"))
    return written


def add_reproduce_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="which experiment to run")
    p.add_argument("--out-dir", default=None, help="output directory, one run directory per stage "
                   "(default: runs/<preset>)")
    p.add_argument("--dry-run", action="store_true", help="print the stages' commands and their state, run nothing")
    p.add_argument("--device", default=None, help="passed to every stage (default: cuda if available)")
    p.add_argument("--data-root", default=None, help="passed to every stage")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bars (default: on)")


def _done(stage: Stage, run: Path) -> bool:
    """The stage's output is there and reads: ``final.pt`` loads as its trainer's checkpoint format,
    ``results.json`` parses and holds rows (a file cut short by a kill is not done)."""
    path = run / stage.done_marker()
    if not path.is_file():
        return False
    try:
        if stage.argv[0] == "evaluate":
            return isinstance(json.loads(path.read_text()).get("rows"), list)
        if stage.argv[0] == "train-classifier":
            read_checkpoint(path, classifiers.CHECKPOINT_FORMAT, "classifier")
        elif "colorcnn+" in stage.argv:
            read_checkpoint(path, colorcnn_plus.CHECKPOINT_FORMAT, "ColorCNN+")
        else:
            read_checkpoint(path, colorcnn.CHECKPOINT_FORMAT, "ColorCNN")
        return True
    except (OSError, ValueError, AttributeError):
        return False


def _state(stage: Stage, out: Path) -> str:
    run = out / stage.name
    if _done(stage, run):
        return "done"
    if (run / "last.pt").is_file():
        return "resume"
    return "todo"


def reproduce(args: argparse.Namespace) -> list[dict]:
    """Run (or with ``--dry-run`` list) a preset's stages; returns ``{"stage", "state", "command"}`` per stage
    (``state``: done, resume or todo before this call; ``seconds`` for stages run)."""
    preset = PRESETS[args.preset]
    out = Path(args.out_dir or Path("runs") / preset.name)
    extra = []
    for flag, value in (("--device", args.device), ("--data-root", args.data_root)):
        if value is not None:
            extra += [flag, str(value)]
    if not args.progress:
        extra.append("--no-progress")
    parser = build_parser(STAGE_COMMANDS)
    plan = []
    for stage in preset.stages:
        state = _state(stage, out)
        argv = stage.command(out, tuple(extra)) + (["--resume"] if state == "resume" else [])
        plan.append({"stage": stage.name, "state": state, "command": argv})
    warning = data_warning(args.data_root)
    if warning:
        print(warning, flush=True)
    print(f"colorquant reproduce --preset {preset.name}: {preset.description}; output in {out}")
    for step in plan:
        print(f"  [{step['state']:>6}] colorquant {' '.join(step['command'])}")
    if args.dry_run:
        return plan
    for step in plan:
        if step["state"] == "done":
            continue
        print(f"\n== {step['stage']}: colorquant {' '.join(step['command'])}", flush=True)
        started = time.perf_counter()
        run_command(parser.parse_args(step["command"]), STAGE_COMMANDS)
        step["seconds"] = round(time.perf_counter() - started, 1)
        print(f"== {step['stage']} finished in {step['seconds']:.0f} s", flush=True)
    written = write_report(preset, out, args.data_root)
    print(f"\nreport: {', '.join(str(p) for p in written)}")
    if warning:
        print(warning, flush=True)
    return plan


COMMAND = Command(
    "reproduce", help="run a named preset: classifier, ColorCNN per K, evaluate",
    description="Run a whole experiment (train-classifier, train per K, evaluate) from a "
                "named preset; done stages are skipped, interrupted ones resumed.",
    add_arguments=add_reproduce_arguments, run=reproduce)
