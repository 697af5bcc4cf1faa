"""Training engine: the full-colour classifier and ColorCNN against it (Hou, Zheng, Gould, CVPR 2020).

Two trainers share one epoch loop (:func:`fit`) and one checkpoint format:

* :func:`train_classifier` -- a classifier on full-colour images (paper: SGD lr 0.1, momentum 0.5,
  weight decay 5e-4, 60 epochs, lr x0.1 at epochs 20 and 40);
* :func:`train_colorcnn` -- ColorCNN through a frozen classifier with :class:`~colorquant_ops.losses.ColorCNNLoss`
  (paper: SGD lr 0.01, momentum 0.5, weight decay 5e-4, batch 128, cosine annealing with warm restarts
  every 20 epochs stepped per batch, 60 epochs). ColorCNN takes the normalized image; its quantized
  output stays in that space and goes straight into the classifier.

Each run writes into a :class:`RunDir`: ``settings.json`` (the arguments), ``log.txt`` (what is printed),
``metrics.jsonl`` (one JSON object per epoch), ``last.pt`` (everything ``--resume`` needs to continue
exactly: model, optimizer, scheduler, epoch, step and the torch/numpy/python RNG states), ``best.pt``
(best test accuracy) and ``final.pt`` (last epoch), the latter two in the library's model formats
(:func:`~colorquant_ops.classifiers.load_classifier`, :func:`~colorquant_ops.models.colorcnn.load_colorcnn`).

Both trainers take an ``argparse.Namespace`` as built by ``colorquant train-classifier`` / ``colorquant train``
(:func:`add_common_arguments`, :func:`add_classifier_arguments`, :func:`add_colorcnn_arguments`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import data
from .classifiers import build_classifier, load_classifier, save_classifier
from .losses import ColorCNNLoss
from .models.colorcnn import ColorCNN, save_colorcnn

__all__ = [
    "RunDir",
    "add_classifier_arguments",
    "add_colorcnn_arguments",
    "add_common_arguments",
    "fit",
    "train_classifier",
    "train_colorcnn",
]

_CIFAR = ("cifar10", "cifar100")

def data_locations(args: argparse.Namespace):
    """(data root, tensor-cache dir or None) from --data-root / --cache-dir.

    Without --data-root, CIFAR-10 comes from the shared JPEG copy (extracted once
    into .cache/) when it is present, anything else from ./data.
    """
    root = args.data_root
    if root is None:
        root = "data"
        if args.dataset == "cifar10":
            try:
                root = data.extract_cifar10_jpeg()
            except data.DatasetNotFoundError:
                pass
    cache = args.cache_dir
    if cache is None and args.dataset != "imagefolder":
        cache = data.default_cache_dir() / "tensors"
    if isinstance(cache, str) and cache.lower() == "none":
        cache = None
    return root, cache


#: Settings a resumed run may change (where the data lives, how it runs, how long).
_RESUME_FREE = frozenset({"epochs", "resume", "progress", "workers", "device", "compile", "out_dir",
                          "data_root", "cache_dir", "classifier"})


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_common_arguments(p: argparse.ArgumentParser, *, epochs: int, lr: float, batch_size: int) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=data.DATASETS, help="dataset name (default: cifar10)")
    g.add_argument("--data-root", default=None,
                   help="dataset directory (default: for cifar10 the project's extracted JPEG copy, else ./data)")
    g.add_argument("--subset", type=_positive_int, default=None, help="train on N class-balanced images only")
    g.add_argument("--test-subset", type=_positive_int, default=None, help="evaluate on N test images only")
    g.add_argument("--cache-dir", default=None,
                   help="decoded-tensor cache of fixed-size datasets (default: <repo>/.cache/tensors; 'none': off)")
    g.add_argument("--batch-size", type=_positive_int, default=batch_size, help=f"(default: {batch_size})")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=_positive_int, default=epochs, help=f"(default: {epochs})")
    g.add_argument("--lr", type=float, default=lr, help=f"SGD learning rate (default: {lr})")
    g.add_argument("--momentum", type=float, default=0.5, help="(default: 0.5)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="(default: 5e-4)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of torch, numpy and random (default: 0)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA; on CPU worthwhile where the CPU has native bf16, e.g. AVX512-BF16 or AMX)")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the trained model")
    g.add_argument("--out-dir", default=None, help="run directory (default: runs/<command>-<timestamp>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last.pt")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bars (default: on)")


def add_classifier_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="alexnet", help="alexnet, vgg16, resnet18 or a torchvision model (default: alexnet)")
    add_common_arguments(p, epochs=60, lr=0.1, batch_size=128)
    p.add_argument("--lr-steps", type=_lr_steps, default=[20, 40],
                   help="epochs after which the lr is multiplied by 0.1 (default: 20,40)")


def add_colorcnn_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classifier", required=True, help="frozen classifier checkpoint (from train-classifier)")
    p.add_argument("--num-colors", type=int, default=2, help="number of colours K, 2..256 (default: 2)")
    p.add_argument("--backbone", default="unet", choices=("unet", "dncnn"), help="(default: unet)")
    p.add_argument("--width", type=_positive_int, default=64, help="backbone width (default: 64, the paper's)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature factor (default: 1)")
    p.add_argument("--color-norm", type=float, default=None, help="palette divisor (default: 4 on CIFAR, else 1)")
    p.add_argument("--color-jitter", type=float, default=1.0, help="palette shift std (default: 1)")
    p.add_argument("--alpha", type=float, default=1.0, help="colour-usage loss weight (default: 1)")
    p.add_argument("--beta", type=float, default=0.0, help="colour-variance loss weight (default: 0)")
    p.add_argument("--gamma", type=float, default=0.0, help="reconstruction loss weight (default: 0)")
    add_common_arguments(p, epochs=60, lr=0.01, batch_size=128)
    p.add_argument("--restart-epochs", type=_positive_int, default=20,
                   help="period of the cosine warm restarts in epochs (default: 20)")


# --------------------------------------------------------------------------------------------
# Run directory and checkpoints
# --------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunDir:
    """A run's directory: ``settings.json``, ``log.txt``, ``metrics.jsonl``, ``last.pt``, ``best.pt``, ``final.pt``."""

    def __init__(self, path, resume: bool = False) -> None:
        self.path = Path(path)
        if resume and not self.last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {self.last}")
        if not resume and self.last.is_file():
            raise ValueError(f"{self.path} holds a run already (last.pt): pass --resume or another --out-dir")
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    def log(self, message: str) -> None:
        tqdm.write(message)
        with open(self.path / "log.txt", "a") as f:
            f.write(message + "\n")

    def write_settings(self, args: argparse.Namespace) -> None:
        (self.path / "settings.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")

    def check_resume_settings(self, args: argparse.Namespace) -> None:
        """``--resume`` continues exactly only with the same settings, except those in :data:`_RESUME_FREE`."""
        path = self.path / "settings.json"
        if not path.is_file():
            return
        old = json.loads(path.read_text())
        new = json.loads(json.dumps(vars(args), default=str))
        changed = [f"--{k.replace('_', '-')} {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new))
                   if k not in _RESUME_FREE and old.get(k) != new.get(k)]
        if changed:
            raise ValueError(f"--resume with other settings than {path}: {', '.join(changed)}")

    def append_metrics(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_state(self, state: dict) -> None:
        """Write ``last.pt`` atomically (the RNG states are added here)."""
        tmp = self.last.with_suffix(".pt.tmp")
        torch.save({**state, "rng": _rng_state()}, tmp)
        os.replace(tmp, self.last)

    def load_state(self) -> dict:
        """Read ``last.pt`` (onto the CPU; ``load_state_dict`` moves it) and restore the RNG states it
        holds; returns the rest."""
        try:
            state = torch.load(self.last, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read the resume checkpoint {self.last}: {exc}") from exc
        _set_rng_state(state.pop("rng"))
        return state


# --------------------------------------------------------------------------------------------
# Setup shared by both trainers
# --------------------------------------------------------------------------------------------


class _Setup:
    """Device, precision, memory format, data loaders and run directory of one run."""

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        if args.resume and args.out_dir is None:
            raise ValueError("--resume needs the --out-dir of the run to continue")
        self.args = args
        try:
            self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            raise ValueError(f"--device: expected cpu or cuda, got {args.device!r}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")
        self.amp = bool(args.amp)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run = RunDir(args.out_dir or Path("runs") / f"{command}-{stamp}", resume=args.resume)
        if args.resume:
            self.run.check_resume_settings(args)
        self.run.write_settings(args)
        options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "command")
        self.run.log(f"colorquant {command} {options}")
        _seed_everything(args.seed)

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def to_device(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True)

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device, memory_format=self.memory_format)

    def loaders(self) -> tuple[DataLoader, DataLoader, list]:
        args = self.args
        root, cache = data_locations(args)

        def build(split, subset, transform):
            # the subset order is seeded with 0, not --seed: the same images whatever the run's seed
            return data.build_dataset(args.dataset, root, split, transform, subset=subset, cache_dir=cache)

        train_set = build("train", args.subset, data.train_transform(args.dataset))
        test_set = build("test", args.test_subset, data.test_transform(args.dataset))
        self.run.log(f"data: {args.dataset} in {root}: {len(train_set)} train, {len(test_set)} test images")
        pin = self.device.type == "cuda"
        # Shuffling draws from a generator seeded per epoch (set_epoch), so a resumed run sees the
        # same order; augmentation draws from the global RNG, which last.pt saves (workers=0).
        self._shuffle = torch.Generator()
        train = DataLoader(train_set, args.batch_size, shuffle=True, num_workers=args.workers,
                           pin_memory=pin, drop_last=False, generator=self._shuffle,
                           persistent_workers=False)
        test = DataLoader(test_set, args.batch_size, shuffle=False, num_workers=args.workers, pin_memory=pin,
                          generator=torch.Generator().manual_seed(0))
        return train, test, list(train_set.classes)

    def set_epoch(self, epoch: int) -> None:
        self._shuffle.manual_seed(self.args.seed * 1_000_003 + epoch)


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
) -> dict:
    """Train ``model`` for ``args.epochs`` epochs (continuing from ``last.pt`` with ``--resume``).

    ``train_step(images, labels) -> (loss, logits)`` runs the forward pass (under autocast);
    ``evaluate() -> {"test_acc": ..., ...}`` the evaluation; ``scheduler`` is stepped after every
    batch (``per_batch``) or every epoch; ``save_model(path, **extra)`` writes the library-format
    model checkpoint (``best.pt``, ``final.pt``). Returns the last epoch's metrics.
    """
    args, run = setup.args, setup.run
    start_epoch, step, best = 0, 0, -1.0
    if args.resume:
        state = run.load_state()
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, best = state["epoch"], state["step"], state["best_acc"]
        if args.epochs < start_epoch:
            raise ValueError(f"--epochs {args.epochs}: the run in {run.path} has done {start_epoch} epochs already")
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
                   disable=not args.progress, dynamic_ncols=True)
        for images, labels in bar:
            images, labels = setup.to_device(images, labels)
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
        if not torch.isfinite(loss_sum):  # checked once an epoch: a check per batch would sync the GPU
            raise FloatingPointError(f"the training loss of epoch {epoch + 1} is not finite ({loss_sum.item()})")
        train_seconds = time.perf_counter() - started
        metrics = evaluate()
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum.item() / seen,
            "train_acc": correct.item() / seen,
            **metrics,
            "lr": lr,
            "train_seconds": round(train_seconds, 3),
            "seconds": round(time.perf_counter() - started, 3),
        }
        run.log(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        if metrics["test_acc"] > best:
            best = metrics["test_acc"]
            save_model(run.path / "best.pt", epoch=epoch + 1, test_acc=best)
        run.save_state({
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1,
            "step": step,
            "best_acc": best,
        })
        run.append_metrics(record)
    save_model(run.path / "final.pt", epoch=args.epochs, test_acc=record.get("test_acc", best))
    run.log(f"done: best test_acc {best:.4f}; checkpoints in {run.path}")
    return record


@torch.no_grad()
def _evaluate(setup: _Setup, loader: DataLoader, model: nn.Module, predict) -> dict:
    """Top-1 accuracy of ``predict(images) -> (logits, extra)``; ``extra``: per-image values to average
    (e.g. colours used), or None."""
    model.eval()
    correct, seen, extra_sum = 0, 0, 0.0
    for images, labels in tqdm(loader, desc="test", unit="batch", leave=False, disable=not setup.args.progress,
                               dynamic_ncols=True):
        images, labels = setup.to_device(images, labels)
        with setup.autocast():
            logits, extra = predict(images)
        correct += int((logits.argmax(1) == labels).sum())
        seen += labels.shape[0]
        if extra is not None:
            extra_sum += float(extra.float().sum())
    return {"test_acc": correct / seen, **({"test_colors": extra_sum / seen} if extra is not None else {})}


def _sgd(args, params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


# --------------------------------------------------------------------------------------------
# Trainers
# --------------------------------------------------------------------------------------------


def train_classifier(args: argparse.Namespace) -> dict:
    """Train a full-colour classifier (see the module docstring); returns the last epoch's metrics."""
    setup = _Setup(args, "train-classifier")
    stats = data.DATASET_STATS[args.dataset]
    train_loader, test_loader, classes = setup.loaders()
    num_classes = stats.num_classes or len(classes)
    model = setup.prepare(build_classifier(args.arch, num_classes, stats.image_size))
    net = torch.compile(model) if args.compile else model

    def train_step(images, labels):
        logits = net(images)
        return F.cross_entropy(logits, labels), logits

    def save_model(path, **extra):
        save_classifier(model, path, args.arch, num_classes, stats.image_size, dataset=args.dataset, **extra)

    optimizer = _sgd(args, model.parameters())
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_steps, gamma=0.1)
    evaluate = lambda: _evaluate(setup, test_loader, model, lambda x: (net(x), None))  # noqa: E731
    return fit(setup, model, train_step, evaluate, optimizer, scheduler, False, save_model, train_loader)


def train_colorcnn(args: argparse.Namespace) -> dict:
    """Train ColorCNN against the frozen ``--classifier`` (see the module docstring); returns the last
    epoch's metrics (``test_acc``: the classifier's top-1 on the quantized test images, ``test_colors``:
    mean number of colours used per image)."""
    setup = _Setup(args, "train")
    classifier = load_classifier(args.classifier).eval().requires_grad_(False)
    stats = data.DATASET_STATS[args.dataset]
    color_norm = args.color_norm if args.color_norm is not None else (4.0 if args.dataset in _CIFAR else 1.0)
    model = ColorCNN(args.num_colors, args.backbone, args.width, temperature=args.temperature,
                     color_norm=color_norm, color_jitter=args.color_jitter)
    criterion = ColorCNNLoss(args.alpha, args.beta, args.gamma)
    train_loader, test_loader, classes = setup.loaders()
    num_classes = stats.num_classes or len(classes)
    with torch.no_grad():
        out_features = classifier(torch.zeros(1, 3, stats.image_size, stats.image_size)).shape[1]
    if out_features != num_classes:
        raise ValueError(f"--classifier {args.classifier} predicts {out_features} classes; {args.dataset} has {num_classes}")
    classifier = setup.prepare(classifier)
    model = setup.prepare(model)
    net = torch.compile(model) if args.compile else model

    def train_step(images, labels):
        out = net(images)
        logits = classifier(out.quantized)
        loss, _ = criterion(logits, labels, out, images)
        return loss, logits

    def predict(images):
        out = net(images)
        used = F.one_hot(out.index_map.flatten(1), model.num_colors).amax(1).sum(1)
        return classifier(out.quantized), used

    def save_model(path, **extra):
        save_colorcnn(model, path, dataset=args.dataset, classifier=str(args.classifier), **extra)

    optimizer = _sgd(args, model.parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=args.restart_epochs * len(train_loader))
    evaluate = lambda: _evaluate(setup, test_loader, model, predict)  # noqa: E731
    return fit(setup, model, train_step, evaluate, optimizer, scheduler, True, save_model, train_loader)
