"""Training engine: the full-colour classifier and ColorCNN against it (Hou, Zheng, Gould, CVPR 2020).

Two trainers share one epoch loop (:func:`fit`) and one checkpoint format:

* :func:`train_classifier` -- a classifier on full-colour images (the paper's code, ``grid_downsample.py
  --train``: SGD weight decay 5e-4, batch 128 (STL-10: 32), 60 epochs, ``OneCycleLR`` to max lr 0.1 stepped
  per batch with the momentum cycled 0.95 -> 0.85 -> 0.95: ``--schedule onecycle``, the default); ``--schedule
  step`` is the plain step schedule (lr x0.1 after the ``--lr-steps`` epochs, fixed ``--momentum``);
* :func:`train_colorcnn` -- ColorCNN through a frozen classifier with :class:`~colorquant_ops.losses.ColorCNNLoss`
  (paper: SGD lr 0.01, momentum 0.5, weight decay 5e-4, batch 128 (STL-10: 32), cosine annealing with
  warm restarts every 20 epochs stepped per batch, 60 epochs; palette divisor colour_norm 4, except 1 for
  AlexNet off CIFAR). ColorCNN takes the normalized image; its quantized
  output stays in that space and goes straight into the classifier.

Each run writes into a :class:`~colorquant_ops.experiment.rundir.RunDir`: ``settings.json`` (the arguments), ``log.txt`` (what is printed),
``metrics.jsonl`` (one JSON object per epoch), ``last.pt`` (everything ``--resume`` needs to continue
exactly: model, optimizer, scheduler, epoch, step and the torch/numpy/python RNG states), ``best.pt``
(best test accuracy) and ``final.pt`` (last epoch), the latter two in the library's model formats
(:func:`~colorquant_ops.models.classifiers.load_classifier`, :func:`~colorquant_ops.models.colorcnn.load_colorcnn`).

Both trainers take an ``argparse.Namespace`` as built by ``colorquant train-classifier`` / ``colorquant train``
(:func:`add_common_arguments`, :func:`add_classifier_arguments`, :func:`add_colorcnn_arguments`).

Multi-process training: launched by ``torchrun --nproc-per-node N -m colorquant_ops train ...``, each
process trains a DistributedDataParallel replica (:mod:`colorquant_ops.experiment.distributed`; gloo on CPU, nccl
on ``cuda:LOCAL_RANK``). ``--batch-size`` is the *global* batch (each process takes 1/N of it, so the
paper's settings hold for any N; it must divide by N); a DistributedSampler shuffles (seeded with
``--seed`` and the epoch) and shards the training set; rank r draws its augmentations from
``--seed + r``; the test set is split between the ranks and the counts summed, so the metrics are
those of the whole set. Only rank 0 writes the run directory and shows progress bars; the checkpoints
hold the plain module's weights (loadable in one process); ``last.pt`` holds every rank's RNG states,
so ``--resume`` (all ranks read ``last.pt``) continues exactly with the same N. ``--sync-bn``
computes BatchNorm statistics over the global batch. Without torchrun everything runs in one process
as before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ..losses import BOUNDARY_SCHEDULES, ColorCNNLoss, ColorCNNPlusLoss
from ..normalization import NORMALIZATION_BEFORE_RECORDING
from ..models.classifiers import CifarAlexNet, build_classifier, load_classifier, save_classifier
from ..models.colorcnn import ColorCNN, load_colorcnn_checkpoint, save_colorcnn
from ..models.colorcnn_plus import ColorCNNPlus, load_colorcnn_plus_checkpoint, save_colorcnn_plus
from . import airbench, data, distributed
from .arguments import positive_int
from .commands import Command
from .rundir import RunDir, rng_state, seed_everything, set_rng_state

__all__ = [
    "CLASSIFIER_COMMAND",
    "COLORCNN_COMMAND",
    "add_classifier_arguments",
    "add_colorcnn_arguments",
    "add_common_arguments",
    "classifier_scheduler",
    "fit",
    "train_classifier",
    "train_colorcnn",
]

_CIFAR = ("cifar10", "cifar100")

#: ``train-classifier --schedule``: ``onecycle`` (the paper's code) or ``step`` (lr x0.1 at ``--lr-steps``).
SCHEDULES = ("onecycle", "step")
_DEFAULT_LR_STEPS = [20, 40]
#: ``train --model``: the paper's ColorCNN (one K) or ColorCNN+ (every K).
MODELS = ("colorcnn", "colorcnn+")
#: ``train --model colorcnn+`` defaults: the K range trained and its share at powers of two, the K evaluated
#: each epoch, imitation weight, k-means iterations.
_PLUS_DEFAULTS = {"train_colors": [2, 256], "power_of_two_fraction": 0.0, "eval_colors": [2, 8, 64], "imitation": 1.0,
                  "kmeans_iters": 10}
#: The paper's code forces batch 32 on STL-10 (``grid_downsample.py``, ``color_cnn_downsample.py``).
_DATASET_BATCH = {"stl10": 32}


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def _lr_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 20,40, got {text!r}") from None
    if any(s < 1 for s in steps):
        raise argparse.ArgumentTypeError(f"lr steps must be epochs >= 1, got {text!r}")
    return steps


def add_common_arguments(p: argparse.ArgumentParser, *, epochs: int, lr: float, batch_size: int) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=data.DATASETS, help="dataset name (default: cifar10)")
    g.add_argument("--data-root", default=None,
                   help="dataset directory (default: for cifar10 the project's extracted JPEG copy, else ./data)")
    g.add_argument("--subset", type=positive_int, default=None, help="train on N class-balanced images only")
    g.add_argument("--test-subset", type=positive_int, default=None, help="evaluate on N test images only")
    g.add_argument("--cache-dir", default=None,
                   help="decoded-tensor cache of fixed-size datasets (default: <repo>/.cache/tensors; 'none': off)")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"global batch: under torchrun each of the N processes takes 1/N of it (default: {batch_size}; "
                        "on stl10 32, as the paper's code)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=positive_int, default=epochs, help=f"(default: {epochs})")
    g.add_argument("--lr", type=float, default=lr, help=f"SGD learning rate (default: {lr})")
    g.add_argument("--momentum", type=float, default=0.5,
                   help="(default: 0.5; train-classifier's onecycle schedule cycles it 0.95 -> 0.85 -> 0.95 instead)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="(default: 5e-4)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of torch, numpy and random (default: 0)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA; on CPU worthwhile where the CPU has native bf16, e.g. AVX512-BF16 or AMX)")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the trained model")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)")
    g.add_argument("--out-dir", default=None, help="run directory (default: runs/<command>-<timestamp>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last.pt")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bars (default: on)")


def add_classifier_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="alexnet", help="alexnet, vgg16, resnet18, airbench94, airbench93 or a torchvision model (default: alexnet)")
    add_common_arguments(p, epochs=60, lr=0.1, batch_size=128)
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="onecycle: the paper's code's torch.optim.lr_scheduler.OneCycleLR, stepped per batch, lr "
                        "from --lr/25 up to --lr over 30%% of the steps (cosine), then down to --lr/25e4, momentum "
                        "cycled 0.95 -> 0.85 -> 0.95 (replacing --momentum); step: --lr x0.1 after each of "
                        "--lr-steps epochs with a fixed --momentum (default: onecycle; with --resume the run's own, "
                        "step for runs from before this option)")
    p.add_argument("--lr-steps", type=_lr_steps, default=None,
                   help="--schedule step only: epochs after which the lr is multiplied by 0.1 (default: 20,40)")
    airbench.add_arguments(p)  # --arch airbench94 / airbench93: the recipe's defaults and options


def add_colorcnn_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classifier", required=True, help="frozen classifier checkpoint (from train-classifier)")
    p.add_argument("--model", choices=MODELS, default="colorcnn",
                   help="colorcnn: the paper's network, one K (--num-colors); colorcnn+: one network for every K "
                        "(--train-colors, --eval-colors, --imitation; default: colorcnn)")
    p.add_argument("--num-colors", type=int, default=None, help="colorcnn: number of colours K, 2..256 (default: 2)")
    p.add_argument("--backbone", default="unet", choices=("unet", "dncnn"), help="(default: unet)")
    p.add_argument("--width", type=positive_int, default=64, help="backbone width (default: 64, the paper's)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature factor (default: 1)")
    p.add_argument("--color-norm", type=float, default=None,
                   help="palette divisor (default: 4, but 1 with an AlexNet classifier off CIFAR, as the paper's code)")
    p.add_argument("--color-jitter", type=float, default=1.0, help="palette shift std (default: 1)")
    p.add_argument("--straight-through", action="store_true",
                   help="train on the argmax image, with the soft image's gradient (not in the paper)")
    p.add_argument("--logit-noise", type=float, default=0.0, metavar="SCALE",
                   help="training-only Gumbel noise of this scale on the logits (the Gumbel-softmax at 1): "
                        "pushes the colour probabilities towards one-hot, as the argmax image is; both models; "
                        "not in the paper; default: 0")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from the weights of this ColorCNN checkpoint (same K, backbone and width), "
                        "e.g. to fine-tune a run with --straight-through, or with --model colorcnn+ of this "
                        "ColorCNN+ checkpoint (same backbone and width), e.g. against another classifier; "
                        "optimizer and schedule start afresh")
    p.add_argument("--alpha", type=float, default=None,
                   help="colour-usage loss weight (default: 1; colorcnn+: 0, its k-means centres use every colour)")
    p.add_argument("--beta", type=float, default=0.0, help="colour-variance loss weight (default: 0)")
    p.add_argument("--gamma", type=float, default=0.0, help="reconstruction loss weight (default: 0)")
    p.add_argument("--boundary", type=float, default=0.0,
                   help="weight of the colour-boundary term (losses.boundary_loss: smaller palette PNGs; not in "
                        "the paper; default: 0)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of the distillation term (losses.distillation_loss: the classifier's class "
                        "distribution on the original image as a target besides the label; not in the paper; "
                        "default: 0)")
    p.add_argument("--distill-temperature", type=float, default=1.0,
                   help="temperature of the distillation term (default: 1)")
    add_common_arguments(p, epochs=60, lr=0.01, batch_size=128)
    p.add_argument("--restart-epochs", type=positive_int, default=20,
                   help="period of the cosine warm restarts in epochs (default: 20)")
    g = p.add_argument_group("colorcnn+ (--model colorcnn+)")
    g.add_argument("--train-colors", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="each batch trains at one K drawn with log2(K) uniform in [log2 MIN, log2 MAX], a function "
                        "of --seed and the step (default: 2 256; MAX is the model's max_colors)")
    g.add_argument("--power-of-two-fraction", type=float, default=None, metavar="F",
                   help="the fraction of batches that train at a power of two K in --train-colors (2, 4, 8, ...: "
                        "the sizes that fill a PNG palette's bits), its exponent uniform; the rest as "
                        "--train-colors says (default: 0)")
    g.add_argument("--eval-colors", type=int, nargs="+", default=None, metavar="K",
                   help="the K evaluated after every epoch; test_acc is their mean (default: 2 8 64)")
    g.add_argument("--imitation", type=float, default=None,
                   help="weight of the cluster-imitation term at K=256 (x log2(K)/8 at K; default: 1; 0: off)")
    g.add_argument("--boundary-schedule", choices=BOUNDARY_SCHEDULES, default=None,
                   help="the --boundary weight at K: constant, log2 (x log2(K)/8), inverse-log2 (/ log2(K)) or "
                        "inverse (x 2/K) "
                        "(default: constant)")
    g.add_argument("--kmeans-iters", type=int, default=None,
                   help="Lloyd iterations of the k-means placing the initial centres (default: 10)")


def _resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the options whose default depends on the dataset or on the run being resumed (left at None by
    the parser): ``--batch-size`` (32 on STL-10, else 128), for ``train-classifier`` ``--schedule`` (onecycle)
    and ``--lr-steps`` (20,40 with step), for ``train`` ``--color-norm`` when resuming (the fresh default needs
    the classifier: :func:`_color_norm`). A resumed run takes what its ``settings.json`` recorded, and
    for what a run from before these defaults did not record, what it then ran with (batch 128, the step
    schedule, colour_norm 4 on CIFAR else 1): so ``--resume`` continues every run as it started."""
    old = {}
    if args.resume and args.out_dir is not None:
        path = Path(args.out_dir) / "settings.json"
        if path.is_file():
            old = json.loads(path.read_text())

    def fill(key, legacy, fresh):
        if getattr(args, key, None) is not None:
            return
        if old:
            value = old.get(key)
            setattr(args, key, legacy if value is None else value)
        else:
            setattr(args, key, fresh)

    fill("batch_size", 128, _DATASET_BATCH.get(args.dataset, 128))
    if hasattr(args, "schedule"):
        fill("schedule", "step", "onecycle")
        if args.schedule == "step":
            fill("lr_steps", list(_DEFAULT_LR_STEPS), list(_DEFAULT_LR_STEPS))
        elif args.lr_steps is not None:
            raise ValueError("--lr-steps is for --schedule step (onecycle has no steps)")
        if args.schedule == "onecycle" and old and old.get("epochs") not in (None, args.epochs):
            raise ValueError(f"--epochs {args.epochs}: the run in {args.out_dir} runs a one-cycle schedule over "
                             f"{old['epochs']} epochs; resume it with --epochs {old['epochs']}")
    if hasattr(args, "color_norm") and old.get("color_norm") is not None:
        fill("color_norm", None, None)  # the run's (a run that recorded none: _train_colorcnn)


def _color_norm(args: argparse.Namespace, classifier: nn.Module) -> float:
    """``train --color-norm`` left unset: the paper's code (``color_cnn_downsample.py``) divides the palette
    by 4, except with AlexNet off CIFAR (``if args.arch == 'alexnet': if 'cifar' not in args.dataset:
    args.color_norm = 1``). A resumed run whose settings.json recorded none (from before this default)
    continues with what it ran with then: 4 on CIFAR, else 1."""
    if args.resume:
        return 4.0 if args.dataset in _CIFAR else 1.0
    alexnet = isinstance(classifier, (CifarAlexNet, torchvision.models.AlexNet))
    return 1.0 if alexnet and args.dataset not in _CIFAR else 4.0


def classifier_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """``(scheduler, per_batch)`` of ``train-classifier --schedule``.

    ``onecycle`` is the paper's code (``grid_downsample.py``: ``OneCycleLR(optimizer, max_lr=args.lr,
    steps_per_epoch=len(loader), epochs=args.epochs)`` with torch's defaults, stepped after every batch by
    ``trainer.py``), its settings spelled out here: 30% of the steps up from ``lr/25`` to ``lr``, cosine,
    down to ``lr/25/1e4``; momentum 0.95 -> 0.85 -> 0.95 (which replaces the optimizer's). ``step``:
    ``MultiStepLR(milestones=args.lr_steps, gamma=0.1)`` stepped per epoch.
    """
    if args.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.3,
            anneal_strategy="cos", cycle_momentum=True, base_momentum=0.85, max_momentum=0.95, div_factor=25.0,
            final_div_factor=1e4, three_phase=False)
        return scheduler, True
    if args.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_steps, gamma=0.1), False
    raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {args.schedule!r}")


# --------------------------------------------------------------------------------------------
# Setup shared by both trainers
# --------------------------------------------------------------------------------------------


class _Setup:
    """Processes, device, precision, memory format, data loaders and run directory of one run.

    Construction checks the arguments and seeds the RNGs; the run directory is written from
    :meth:`start` on, once the trainer has built its models and data (which check the rest).
    """

    def __init__(self, args: argparse.Namespace, command: str, ctx: distributed.DistributedContext,
                 device: torch.device) -> None:
        if args.resume and args.out_dir is None:
            raise ValueError("--resume needs the --out-dir of the run to continue")
        self.args, self.command, self.ctx, self.device = args, command, ctx, device
        self.amp = bool(args.amp)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run = RunDir(args.out_dir or Path("runs") / f"{command}-{stamp}", resume=args.resume,
                          main=ctx.is_main)
        if args.resume:
            self.run.check_resume_settings(args)
        self._notes: list[str] = []
        # rank r draws augmentations (and dropout, ColorCNN's palette jitter) from seed + r; the
        # models start from rank 0's weights whatever each rank draws for them (DDP broadcasts them)
        seed_everything(args.seed + ctx.rank)

    def start(self) -> None:
        """Write ``settings.json`` and the first log lines."""
        args, ctx = self.args, self.ctx
        self.run.write_settings(args, world_size=ctx.world_size)
        options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "command")
        self.run.log(f"colorquant {self.command} {options}")
        if ctx.active:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            self.run.log(f"torchrun: {ctx.world_size} processes ({backend}), {args.batch_size // ctx.world_size} "
                         f"images of each batch of {args.batch_size} per process")
        elif args.sync_bn:
            self.run.log("note: --sync-bn is for multi-process runs (torchrun); one process normalizes over "
                         "the whole batch anyway")
        for note in self._notes:
            self.run.log(note)

    @property
    def progress(self) -> bool:
        return self.args.progress and self.ctx.is_main

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def to_device(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True)

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device, memory_format=self.memory_format)

    def parallel(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """``(train_net, eval_net)`` for ``model`` (on the device already): under torchrun the
        training net is a DDP replica (``--sync-bn``: with SyncBatchNorm) and evaluation runs the
        plain module, which has no collectives, on each rank's shard; ``--compile``d both."""
        train_net = distributed.wrap_model(model, self.ctx, self.device, sync_bn=self.args.sync_bn)
        if not self.args.compile:
            return train_net, model
        compiled = torch.compile(train_net)
        return compiled, (compiled if train_net is model else torch.compile(model))

    def loaders(self, normalization=None) -> tuple[DataLoader, DataLoader, list]:
        """Train and test loaders, the images normalized with ``normalization`` (``(mean, std)``;
        default: the dataset's), and the class names."""
        args, ctx = self.args, self.ctx
        root, cache = data.data_locations(args)
        stats = data.DATASET_STATS[args.dataset]
        mean, std = normalization or (stats.mean, stats.std)
        norm = v2.Normalize(mean=list(mean), std=list(std))

        def build(split, subset, transform):
            # the subset order is seeded with 0, not --seed: the same images whatever the run's seed
            return data.build_dataset(args.dataset, root, split, transform, subset=subset, cache_dir=cache)

        # rank 0 extracts / caches the data once; the others then read it
        train_set, test_set = distributed.main_first(lambda: (
            build("train", args.subset, v2.Compose([data.train_transform(args.dataset, normalize=False), norm])),
            build("test", args.test_subset, v2.Compose([data.test_transform(args.dataset, normalize=False), norm]))),
            ctx)
        self._notes.append(f"data: {args.dataset} in {root}: {len(train_set)} train, {len(test_set)} test images")
        pin = self.device.type == "cuda"
        batch = args.batch_size // ctx.world_size
        # Shuffling draws from a generator seeded per epoch (set_epoch), so a resumed run sees the
        # same order; augmentation draws from the global RNG, which last.pt saves (workers=0), or in
        # DataLoader workers from a base seed drawn from the same per-epoch generator (workers>0).
        # Under torchrun the DistributedSampler shuffles (seeded with --seed and the epoch) and shards.
        self._shuffle = torch.Generator()
        self._sampler = None
        if ctx.active:
            self._sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed)
        train = DataLoader(train_set, batch, shuffle=self._sampler is None, sampler=self._sampler,
                           num_workers=args.workers, pin_memory=pin, drop_last=False, generator=self._shuffle,
                           persistent_workers=False)
        test = DataLoader(distributed.shard(test_set, ctx), batch, shuffle=False, num_workers=args.workers,
                          pin_memory=pin, generator=torch.Generator().manual_seed(0))
        return train, test, list(train_set.classes)

    def set_epoch(self, epoch: int) -> None:
        # rank r > 0 offsets its seed so its DataLoader workers draw other augmentations than rank 0's
        self._shuffle.manual_seed(self.args.seed * 1_000_003 + epoch + self.ctx.rank * 2**40)
        if self._sampler is not None:
            self._sampler.set_epoch(epoch)

    def rng_states(self) -> dict:
        """This run's RNG states for ``last.pt`` (a collective under torchrun): ``rng`` (this
        process's, rank 0's under torchrun), ``rng_ranks`` (every rank's; torchrun only) and
        ``world_size`` (None without torchrun)."""
        if not self.ctx.active:
            return {"rng": rng_state(), "world_size": None}
        states = distributed.all_gather_objects(rng_state(), self.ctx)
        return {"rng": states[0], "rng_ranks": states, "world_size": self.ctx.world_size}

    def restore_rng(self, state: dict, epoch: int) -> None:
        """Restore the RNG states ``last.pt`` holds for this process. A run continued with another
        number of processes (or with / without torchrun) cannot continue exactly: the data order and
        the random draws differ; each rank is then seeded afresh from --seed, its rank and the epoch."""
        saved = state.get("world_size")
        current = self.ctx.world_size if self.ctx.active else None
        if saved == current:
            set_rng_state(state["rng_ranks"][self.ctx.rank] if self.ctx.active else state["rng"])
            return
        describe = lambda n: f"{n} processes (torchrun)" if n else "one process without torchrun"  # noqa: E731
        self.run.log(f"note: the run in {self.run.path} ran as {describe(saved)}, it continues as "
                     f"{describe(current)}: not exactly as it would have")
        seed_everything(self.args.seed + self.ctx.rank + 1_000_003 * epoch)


@contextlib.contextmanager
def _session(args: argparse.Namespace, command: str) -> Iterator[_Setup]:
    """The run's :class:`_Setup`, inside torchrun's process group when there is one (left at the end,
    also on error)."""
    ctx = distributed.context_from_env()
    device = distributed.resolve_device(args.device, ctx)
    if args.batch_size % ctx.world_size:  # before joining the process group: no collective waits for it
        raise ValueError(f"--batch-size {args.batch_size} is the global batch: it must divide by the number "
                         f"of processes ({ctx.world_size})")
    with distributed.process_group(ctx, device):
        yield _Setup(args, command, ctx, device)


# --------------------------------------------------------------------------------------------
# The shared epoch loop
# --------------------------------------------------------------------------------------------


def fit(
    setup: _Setup,
    model: nn.Module,
    train_step: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    evaluate: Callable[[], dict],
    optimizer: torch.optim.Optimizer,
    scheduler,
    per_batch: bool,
    save_model: Callable[..., None],
    train_loader: DataLoader,
    state_extra: Optional[dict] = None,
) -> dict:
    """Train ``model`` for ``args.epochs`` epochs (continuing from ``last.pt`` with ``--resume``).

    ``model`` is the plain module (what ``last.pt`` and ``save_model`` hold, also under torchrun);
    ``train_step(images, labels) -> (loss, logits)`` runs the forward pass of its training net (under
    autocast); ``evaluate() -> {"test_acc": ..., ...}`` the evaluation (the same numbers on every
    rank); ``scheduler`` is stepped after every batch (``per_batch``) or every epoch;
    ``save_model(path, **extra)`` writes the library-format model checkpoint (``best.pt``,
    ``final.pt``). Under torchrun the training loss and accuracy are summed over the ranks and only
    rank 0 writes; ``state_extra`` goes into ``last.pt`` as well. Returns the last epoch's metrics.
    """
    args, run, ctx = setup.args, setup.run, setup.ctx
    start_epoch, step, best = 0, 0, -1.0
    if args.resume:
        state = run.load_state()  # every rank reads it
        if args.epochs < state["epoch"]:
            raise ValueError(f"--epochs {args.epochs}: the run in {run.path} has done {state['epoch']} epochs already")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, best = state["epoch"], state["step"], state["best_acc"]
        setup.restore_rng(state, start_epoch)
        run.log(f"resumed from {run.last} at epoch {start_epoch} (step {step})")
    record = {}
    for epoch in range(start_epoch, args.epochs):
        started = time.perf_counter()
        setup.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=setup.device)
        correct = torch.zeros((), dtype=torch.int64, device=setup.device)
        seen = 0
        lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", leave=False,
                   disable=not setup.progress, dynamic_ncols=True)
        for images, labels in bar:
            images, labels = setup.to_device(images, labels)
            setup.step = step  # the global step, for trainers whose step depends on it (ColorCNN+'s K)
            with setup.autocast():
                loss, logits = train_step(images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if per_batch:
                scheduler.step()
            step += 1
            loss_sum += loss.detach().float() * labels.shape[0]
            correct += (logits.argmax(1) == labels).sum()
            seen += labels.shape[0]
        if not per_batch:
            scheduler.step()
        loss_total, correct_total, seen = distributed.all_reduce_sum(
            [loss_sum.item(), correct.item(), seen], ctx, setup.device)
        if not math.isfinite(loss_total):  # checked once an epoch: a check per batch would sync the GPU
            raise FloatingPointError(f"the training loss of epoch {epoch + 1} is not finite ({loss_total})")
        train_seconds = time.perf_counter() - started
        metrics = evaluate()
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_total / seen,
            "train_acc": correct_total / seen,
            **metrics,
            "lr": lr,
            "train_seconds": round(train_seconds, 3),
            "seconds": round(time.perf_counter() - started, 3),
        }
        run.log(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        if metrics["test_acc"] > best:
            best = metrics["test_acc"]
            if ctx.is_main:
                save_model(run.path / "best.pt", epoch=epoch + 1, test_acc=best)
        run.append_metrics(record)  # before last.pt: a resume drops a line ahead of last.pt, never lacks one
        rng = setup.rng_states()  # a collective under torchrun: every rank takes part
        run.save_state({
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1,
            "step": step,
            "best_acc": best,
            **(state_extra or {}),
            **rng,
        })
    if ctx.is_main:
        save_model(run.path / "final.pt", epoch=args.epochs, test_acc=record.get("test_acc", best))
    run.log(f"done: best test_acc {best:.4f}; checkpoints in {run.path}")
    return record


@torch.no_grad()
def _evaluate(setup: _Setup, loader: DataLoader, model: nn.Module, predict) -> dict:
    """Top-1 accuracy of ``predict(images) -> (logits, extra)``; ``extra``: per-image values to average
    (e.g. colours used), or None. Under torchrun each rank predicts its shard of the test set (with
    rank 0's buffers) and the counts are summed."""
    model.eval()
    distributed.broadcast_buffers(model, setup.ctx)
    correct, seen, extra_sum = 0, 0, 0.0
    extra = None
    for images, labels in tqdm(loader, desc="test", unit="batch", leave=False, disable=not setup.progress,
                               dynamic_ncols=True):
        images, labels = setup.to_device(images, labels)
        with setup.autocast():
            logits, extra = predict(images)
        correct += int((logits.argmax(1) == labels).sum())
        seen += labels.shape[0]
        if extra is not None:
            extra_sum += float(extra.float().sum())
    if setup.ctx.active:
        correct, seen, extra_sum = distributed.all_reduce_sum([correct, seen, extra_sum], setup.ctx, setup.device)
    return {"test_acc": correct / seen, **({"test_colors": extra_sum / seen} if extra is not None else {})}


def _sgd(args, params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


# --------------------------------------------------------------------------------------------
# Trainers
# --------------------------------------------------------------------------------------------


def train_classifier(args: argparse.Namespace) -> dict:
    """Train a full-colour classifier (see the module docstring); returns the last epoch's metrics."""
    if args.arch in airbench.AIRBENCH_ARCHS:  # its own recipe: colorquant_ops.experiment.airbench
        return airbench.train_airbench(args)
    airbench.plain_defaults(args)  # the recipe's default markers stay out of the checkpoints
    _resolve_defaults(args)
    with _session(args, "train-classifier") as setup:
        return _train_classifier(setup)


def _train_classifier(setup: _Setup) -> dict:
    args = setup.args
    stats = data.DATASET_STATS[args.dataset]
    normalization = (stats.mean, stats.std)
    if args.resume and "input_normalization" not in setup.run.load_state():
        # a run from before last.pt recorded it continues with the normalization it started with
        normalization = NORMALIZATION_BEFORE_RECORDING[args.dataset]
    train_loader, test_loader, classes = setup.loaders(normalization)
    num_classes = stats.num_classes or len(classes)
    model = setup.prepare(build_classifier(args.arch, num_classes, stats.image_size))
    net, eval_net = setup.parallel(model)

    def train_step(images, labels):
        logits = net(images)
        return F.cross_entropy(logits, labels), logits

    def save_model(path, **extra):
        save_classifier(model, path, args.arch, num_classes, stats.image_size, dataset=args.dataset,
                        input_normalization=[list(normalization[0]), list(normalization[1])], **extra)

    optimizer = _sgd(args, model.parameters())
    scheduler, per_batch = classifier_scheduler(args, optimizer, len(train_loader))
    evaluate = lambda: _evaluate(setup, test_loader, model, lambda x: (eval_net(x), None))  # noqa: E731
    setup.start()
    return fit(setup, model, train_step, evaluate, optimizer, scheduler, per_batch, save_model, train_loader,
               {"input_normalization": [list(normalization[0]), list(normalization[1])]})


def train_colorcnn(args: argparse.Namespace) -> dict:
    """Train ColorCNN (``--model colorcnn``) or ColorCNN+ (``--model colorcnn+``) against the frozen
    ``--classifier`` (see the module docstring); returns the last epoch's metrics (``test_acc``: the
    classifier's top-1 on the quantized test images, ``test_colors``: mean number of colours used per
    image; for ColorCNN+ their means over ``--eval-colors``, and per K ``test_acc_k{K}``, ``test_colors_k{K}``)."""
    _check_model_options(args)
    _resolve_defaults(args)
    with _session(args, "train") as setup:
        return _train_colorcnn_plus(setup) if args.model == "colorcnn+" else _train_colorcnn(setup)


def _check_model_options(args: argparse.Namespace) -> None:
    """Options of the other model are an error (not silently ignored); fill the chosen model's defaults."""
    model = getattr(args, "model", "colorcnn")
    for key, positive in (("boundary", False), ("distill", False), ("distill_temperature", True),
                          ("logit_noise", False)):
        value = getattr(args, key)
        if value < 0 or (positive and value == 0) or not math.isfinite(value):
            raise ValueError(f"--{key.replace('_', '-')} must be a finite number {'> 0' if positive else '>= 0'}, "
                             f"got {value}")
    if model == "colorcnn+":
        given = [name for name, set_ in (("--num-colors", args.num_colors is not None),
                                          ("--temperature", args.temperature != 1.0),
                                          ("--color-norm", args.color_norm is not None),
                                          ("--straight-through", args.straight_through),
                                          ("--beta", args.beta != 0.0), ("--gamma", args.gamma != 0.0)) if set_]
        if given:
            raise ValueError(f"{', '.join(given)}: not an option of --model colorcnn+ (it serves every K: "
                             "--train-colors, --eval-colors)")
        for key, value in {**_PLUS_DEFAULTS, "alpha": 0.0}.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        low, high = args.train_colors
        if not 2 <= low <= high <= 256:
            raise ValueError(f"--train-colors {low} {high}: need 2 <= MIN <= MAX <= 256")
        bad = [k for k in args.eval_colors if not 2 <= k <= high]
        if bad:
            raise ValueError(f"--eval-colors: K must be in 2..{high} (the --train-colors MAX), got {bad[0]}")
        if args.imitation < 0 or not math.isfinite(args.imitation):
            raise ValueError(f"--imitation must be a finite number >= 0, got {args.imitation}")
        if not 0.0 <= args.power_of_two_fraction <= 1.0:
            raise ValueError(f"--power-of-two-fraction must be in [0, 1], got {args.power_of_two_fraction}")
        if args.kmeans_iters < 0:
            raise ValueError(f"--kmeans-iters must be >= 0, got {args.kmeans_iters}")
        return
    given = [f"--{key.replace('_', '-')}" for key in _PLUS_DEFAULTS if getattr(args, key, None) is not None]
    given += ["--boundary-schedule"] if getattr(args, "boundary_schedule", None) is not None else []
    if given:
        raise ValueError(f"{', '.join(given)}: options of --model colorcnn+, not of ColorCNN")
    if args.num_colors is None:
        args.num_colors = 2
    if args.alpha is None:
        args.alpha = 1.0


def sample_train_colors(seed: int, step: int, low: int, high: int, power_of_two_fraction: float = 0.0) -> int:
    """ColorCNN+'s K at training step ``step``: ``round(2 ** u)``, ``u`` uniform in ``[log2 low, log2 high]``;
    with probability ``power_of_two_fraction`` instead a power of two in ``[low, high]``, its exponent drawn
    uniformly (the sizes that fill a palette's bits). A function of ``(seed, step)`` only, so that
    ``--resume`` continues with the same sequence; fraction 0 draws exactly what runs from before the option
    drew."""
    rng = random.Random(seed * 1_000_003 + step)
    u = rng.uniform(math.log2(low), math.log2(high))
    if power_of_two_fraction > 0 and rng.random() < power_of_two_fraction:
        powers = [1 << b for b in range(high.bit_length()) if 1 << b >= low]
        if powers:
            return rng.choice(powers)
    return min(high, max(low, round(2.0 ** u)))


def _load_initial_weights(model: nn.Module, path, dataset: str) -> None:
    """``--init-from``: copy the weights of another run's checkpoint (ColorCNN into a ColorCNN, ColorCNN+
    into a ColorCNN+) into ``model``. The architecture (ColorCNN: K, backbone, width; ColorCNN+: backbone,
    width) and the dataset (its normalization) must match; the training options (temperature, palette
    tricks, straight-through; ColorCNN+'s K range and k-means iterations) may differ: that is what
    fine-tuning changes."""
    plus = isinstance(model, ColorCNNPlus)
    source, extra = (load_colorcnn_plus_checkpoint if plus else load_colorcnn_checkpoint)(path)
    theirs, ours = source.config(), model.config()
    keys = ("backbone", "width", "in_channels") if plus else ("num_colors", "backbone", "width", "in_channels")
    differ = [f"{k} {theirs[k]} (this run: {ours[k]})" for k in keys if theirs[k] != ours[k]]
    if extra.get("dataset", dataset) != dataset:
        differ.append(f"dataset {extra['dataset']} (this run: {dataset})")
    if differ:
        raise ValueError(f"--init-from {path}: the checkpoint does not fit this run: {', '.join(differ)}")
    model.load_state_dict(source.state_dict())


def _quantizer_run(setup: _Setup, classifier: nn.Module, model: nn.Module):
    """What ColorCNN's and ColorCNN+'s trainers share: the loaders, normalized as the frozen classifier
    expects (STL-10 classifiers from before it was recorded: STL-10's statistics), the check that the
    classifier predicts the dataset's classes, both models on the device and the training / evaluation
    nets. Returns ``(classifier, model, net, eval_net, normalization, train_loader, test_loader)``."""
    args = setup.args
    stats = data.DATASET_STATS[args.dataset]
    normalization = data.classifier_normalization(args.classifier, args.dataset)
    train_loader, test_loader, classes = setup.loaders(normalization)
    num_classes = stats.num_classes or len(classes)
    with torch.no_grad():
        out_features = classifier(torch.zeros(1, 3, stats.image_size, stats.image_size)).shape[1]
    if out_features != num_classes:
        raise ValueError(f"--classifier {args.classifier} predicts {out_features} classes; {args.dataset} has {num_classes}")
    classifier = setup.prepare(classifier)
    model = setup.prepare(model)
    net, eval_net = setup.parallel(model)
    return classifier, model, net, eval_net, normalization, train_loader, test_loader


def _distill_options(args: argparse.Namespace) -> dict:
    """The objectives' distillation arguments."""
    return {"distill": args.distill, "distill_temperature": args.distill_temperature}


def _teacher_logits(args: argparse.Namespace, classifier: nn.Module, images: Tensor) -> Optional[Tensor]:
    """The frozen classifier on the original images, for ``--distill`` (None without it)."""
    if not args.distill:
        return None
    with torch.no_grad():
        return classifier(images)


def _colors_used(index_map: Tensor, num_colors: int) -> Tensor:
    """Per image, how many of the ``num_colors`` indices the ``[B, H, W]`` index map uses."""
    return F.one_hot(index_map.flatten(1), num_colors).amax(1).sum(1)


def _cosine_restarts(args: argparse.Namespace, optimizer, train_loader):
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=args.restart_epochs * len(train_loader))


def _train_colorcnn(setup: _Setup) -> dict:
    args = setup.args
    classifier = load_classifier(args.classifier).eval().requires_grad_(False)
    color_norm = args.color_norm if args.color_norm is not None else _color_norm(args, classifier)
    if not args.resume:
        args.color_norm = color_norm  # settings.json records it
    model = ColorCNN(args.num_colors, args.backbone, args.width, temperature=args.temperature,
                     color_norm=color_norm, color_jitter=args.color_jitter,
                     straight_through=args.straight_through, logit_noise=args.logit_noise)
    if args.init_from is not None:
        _load_initial_weights(model, args.init_from, args.dataset)
    criterion = ColorCNNLoss(args.alpha, args.beta, args.gamma, boundary=args.boundary, **_distill_options(args))
    classifier, model, net, eval_net, normalization, train_loader, test_loader = _quantizer_run(
        setup, classifier, model)

    def train_step(images, labels):
        out = net(images)
        logits = classifier(out.quantized)
        loss, _ = criterion(logits, labels, out, images, _teacher_logits(args, classifier, images))
        return loss, logits

    def predict(images):
        out = eval_net(images)
        return classifier(out.quantized), _colors_used(out.index_map, model.num_colors)

    def save_model(path, **extra):
        # trained on normalized images: the checkpoint says so, and a loaded model takes [0, 1] images
        save_colorcnn(model, path, input_normalization=normalization, dataset=args.dataset,
                      classifier=str(args.classifier), **extra)

    optimizer = _sgd(args, model.parameters())
    scheduler = _cosine_restarts(args, optimizer, train_loader)
    evaluate = lambda: _evaluate(setup, test_loader, model, predict)  # noqa: E731
    setup.start()
    return fit(setup, model, train_step, evaluate, optimizer, scheduler, True, save_model, train_loader)


def _train_colorcnn_plus(setup: _Setup) -> dict:
    args = setup.args
    classifier = load_classifier(args.classifier).eval().requires_grad_(False)
    low, high = args.train_colors
    model = ColorCNNPlus(args.backbone, args.width, max_colors=high, kmeans_iters=args.kmeans_iters, seed=args.seed,
                         logit_noise=args.logit_noise)
    if args.init_from is not None:
        _load_initial_weights(model, args.init_from, args.dataset)
    criterion = ColorCNNPlusLoss(args.imitation, args.alpha, boundary=args.boundary,
                                 boundary_schedule=args.boundary_schedule or "constant", **_distill_options(args))
    classifier, model, net, eval_net, normalization, train_loader, test_loader = _quantizer_run(
        setup, classifier, model)

    def train_step(images, labels):
        k = sample_train_colors(args.seed, setup.step, low, high, args.power_of_two_fraction)
        out, logits = net(images, k, return_logits=True)
        cls_logits = classifier(out.quantized)
        loss, _ = criterion(cls_logits, labels, out, images, logits, _teacher_logits(args, classifier, images))
        return loss, cls_logits

    def evaluate():
        metrics = {}
        for k in args.eval_colors:
            def predict(images, k=k):
                out = eval_net(images, k)
                return classifier(out.quantized), _colors_used(out.index_map, k)
            result = _evaluate(setup, test_loader, model, predict)
            metrics[f"test_acc_k{k}"], metrics[f"test_colors_k{k}"] = result["test_acc"], result["test_colors"]
        accs = [metrics[f"test_acc_k{k}"] for k in args.eval_colors]
        return {"test_acc": sum(accs) / len(accs), **metrics}

    def save_model(path, **extra):
        save_colorcnn_plus(model, path, input_normalization=normalization, dataset=args.dataset,
                           classifier=str(args.classifier), **extra)

    optimizer = _sgd(args, model.parameters())
    scheduler = _cosine_restarts(args, optimizer, train_loader)
    setup.start()
    return fit(setup, model, train_step, evaluate, optimizer, scheduler, True, save_model, train_loader)


CLASSIFIER_COMMAND = Command(
    "train-classifier", help="train the full-colour classifier (paper: SGD 0.1, 60 epochs)",
    description="Train a full-colour classifier; writes a run directory (see colorquant_ops.experiment.train).",
    add_arguments=add_classifier_arguments, run=train_classifier)
COLORCNN_COMMAND = Command(
    "train", help="train ColorCNN against a frozen classifier checkpoint",
    description="Train ColorCNN through a frozen classifier; writes a run directory.",
    add_arguments=add_colorcnn_arguments, run=train_colorcnn)
