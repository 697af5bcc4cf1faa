"""The airbench training recipe, CPU-first: ``colorquant train-classifier --arch airbench94`` (or ``airbench93``).

Written for this project from the published recipe of Keller Jordan's airbench (arXiv 2404.00498) for
the network :class:`~colorquant_ops.models.airbench.AirbenchNet`:

* the whole training set as one uint8 tensor (the project's tensor cache), batched augmentation in
  torch: a left-right flip that alternates (each image is flipped on every other epoch, starting
  from a random half) and a random translation by up to 2 pixels (reflect padding);
* the whitening filters computed from 5,000 training images (a random sample seeded with ``--seed``:
  the cached training set is in class order) before training; the
  whitening bias trains for the first 3 epochs (``--whiten-bias-epochs``), the filters never;
* Nesterov SGD at batch 1024 with decoupled hyperparameters: ``--lr`` (11.5) and ``--weight-decay``
  (0.0153) are per 1024 images, the loss is *summed* over the batch (cross-entropy with label
  smoothing 0.2), PyTorch's lr is ``lr / (1024 (1 + 1 / (1 - momentum)))`` with momentum 0.85, the
  BatchNorm biases take 64 times that lr (not more decay); the lr follows a triangle per step
  (0.2 -> 1 at 23 % of the steps -> 0.07);
* lookahead: every 5 steps the weights (and BatchNorm statistics) move into an exponential average
  with decay ``0.95**5 * (step / total steps)**3`` and are replaced by it; after the last step the
  network takes the average (as the reference does: until session 18 it took it at the end of every
  epoch from the fourth, which discarded the steps since the last multiple of 5, 12 of 480 in 10
  epochs; the bundled classifier was trained so);
* bfloat16 autocast (``--float32`` turns it off) and channels-last on every device;
* test accuracy without test-time augmentation every epoch, and with it (``--tta-level``, default 2:
  mirror + 1-pixel translations, :func:`~colorquant_ops.models.airbench.tta_logits`) after the last.

The options ``--epochs``, ``--batch-size``, ``--lr``, ``--momentum`` and ``--weight-decay`` left at
``train-classifier``'s defaults take the recipe's (:data:`RECIPE_DEFAULTS`); given explicitly they
are used as given. ``settings.json`` records the values used.

The run directory is the standard one (:class:`~colorquant_ops.experiment.rundir.RunDir`):
``settings.json``, ``log.txt``, ``metrics.jsonl`` (per epoch: ``train_loss``, ``train_acc``,
``test_loss``, ``test_acc``, after the last epoch ``test_acc_tta``, timings), ``best.pt`` (best
``test_acc``) and ``final.pt`` in the library's classifier format
(:func:`~colorquant_ops.models.classifiers.load_classifier`), and ``last.pt`` (model, optimizer,
lookahead average, epoch, step), from which ``--resume`` continues exactly: the data order and the
augmentations of each epoch are drawn from generators seeded with ``--seed`` and the epoch. The lr and
lookahead schedules span ``--epochs``: a run resumed with more epochs than it began with continues
on the longer schedule, not as a run of that length would have. One process only (no torchrun).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models.airbench import AIRBENCH_ARCHS, AirbenchNet, tta_logits
from ..models.classifiers import build_classifier, save_classifier
from . import data, distributed
from .rundir import RunDir, seed_everything

__all__ = ["AIRBENCH_ARCHS", "RECIPE", "RECIPE_DEFAULTS", "add_arguments", "alternating_flip", "augment_batch",
           "lr_factor", "plain_defaults", "train_airbench"]

#: The recipe's values of the generic optimization options (used when those are left at their defaults).
RECIPE_DEFAULTS = {"epochs": 10, "batch_size": 1024, "lr": 11.5, "momentum": 0.85, "weight_decay": 0.0153}

#: The rest of the recipe (fixed).
RECIPE = {
    "label_smoothing": 0.2,
    "bias_lr_scale": 64.0,      # BatchNorm biases: lr x 64, the same decay
    "lr_start": 0.2, "lr_peak_at": 0.23, "lr_end": 0.07,  # triangle of lr factors over the steps
    "translate": 2,             # pixels
    "whiten_images": 5000,      # training images the whitening filters are computed from
    "whiten_eps": 5e-4,
    "ema_every": 5, "ema_decay_base": 0.95, "ema_decay_pow": 3.0,
    "whiten_bias_epochs": 3, "tta_level": 2,  # defaults of --whiten-bias-epochs, --tta-level
    "eval_batch": 1000,
}


class _DefaultFloat(float):
    """A generic option's default, marked so that the recipe can tell it from a value given."""


class _DefaultInt(int):
    """A generic option's default, marked so that the recipe can tell it from a value given."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe's options on ``train-classifier``'s parser (after the generic ones): marks the
    defaults of the options in :data:`RECIPE_DEFAULTS` (same values, so nothing changes for the other
    architectures) and adds an option group; the new options default to None / False, so runs
    written before them resume unchanged."""
    for name in RECIPE_DEFAULTS:
        value = p.get_default(name)
        if value is not None:
            p.set_defaults(**{name: (_DefaultInt if isinstance(value, int) else _DefaultFloat)(value)})
    g = p.add_argument_group(
        f"airbench recipe (--arch {' / '.join(AIRBENCH_ARCHS)})",
        "options left at their defaults take the recipe's: " + ", ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in RECIPE_DEFAULTS.items())
        + " (--lr and --weight-decay per 1024 images, decoupled; the loss is summed over the batch); "
          "bfloat16 autocast and channels-last are on; --lr-steps, --workers, --compile, --sync-bn are not used")
    g.add_argument("--tta-level", type=int, choices=(0, 1, 2), default=None,
                   help="test-time augmentation of the final accuracy: 0 none, 1 mirror, 2 mirror + translate "
                        f"(default: {RECIPE['tta_level']})")
    g.add_argument("--whiten-bias-epochs", type=int, default=None,
                   help=f"epochs the whitening bias trains (default: {RECIPE['whiten_bias_epochs']})")
    g.add_argument("--float32", action="store_true", help="train in float32 (default: bfloat16 autocast)")


def plain_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Replace the marked defaults in ``args`` (in place) by plain numbers of the same value, for the
    other architectures: a marked number would reach the optimizer's state dict, and ``last.pt`` must
    load with ``torch.load(weights_only=True)``. Returns ``args``."""
    for name in RECIPE_DEFAULTS:
        value = getattr(args, name, None)
        if isinstance(value, _DefaultFloat):
            setattr(args, name, float(value))
        elif isinstance(value, _DefaultInt):
            setattr(args, name, int(value))
    return args


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with the recipe's values in place of the generic defaults."""
    args = argparse.Namespace(**vars(args))
    for name, value in RECIPE_DEFAULTS.items():
        current = getattr(args, name, None)
        if current is None or isinstance(current, (_DefaultFloat, _DefaultInt)):  # None: a dataset-dependent default
            setattr(args, name, value)
    for name in ("epochs", "batch_size"):  # plain numbers from here on (also in settings.json)
        setattr(args, name, int(getattr(args, name)))
    for name in ("lr", "momentum", "weight_decay"):
        setattr(args, name, float(getattr(args, name)))
    if getattr(args, "tta_level", None) is None:
        args.tta_level = RECIPE["tta_level"]
    if getattr(args, "whiten_bias_epochs", None) is None:
        args.whiten_bias_epochs = RECIPE["whiten_bias_epochs"]
    args.float32 = bool(getattr(args, "float32", False))
    if not 0 <= args.momentum < 1:
        raise ValueError(f"--momentum must be in [0, 1) for the airbench recipe, got {args.momentum}")
    if args.lr <= 0 or args.weight_decay < 0:
        raise ValueError(f"--lr must be > 0 and --weight-decay >= 0, got {args.lr} and {args.weight_decay}")
    return args


# --------------------------------------------------------------------------------------------
# Schedules and augmentation
# --------------------------------------------------------------------------------------------


def lr_factor(step: int, total_steps: int) -> float:
    """The lr factor of step ``step`` (0-based) of ``total_steps``: linear from ``lr_start`` to 1 at
    ``int(lr_peak_at * total_steps)``, then linear to ``lr_end`` at ``total_steps``."""
    start, end, peak = RECIPE["lr_start"], RECIPE["lr_end"], int(RECIPE["lr_peak_at"] * total_steps)
    if step < peak:
        return start + (1.0 - start) * step / peak
    return 1.0 + (end - 1.0) * (step - peak) / max(total_steps - peak, 1)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)


def alternating_flip(n: int, epoch: int, seed: int) -> Tensor:
    """Which of ``n`` images are flipped at ``epoch``: a random half (seeded with ``seed``) on even
    epochs, the other half on odd ones."""
    first = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    return first ^ bool(epoch % 2)


def _reflect_index(size: int, shift: int) -> Tensor:
    idx = torch.arange(size) + shift
    idx = torch.where(idx < 0, -idx, idx)
    return torch.where(idx > size - 1, 2 * (size - 1) - idx, idx)


def augment_batch(images: Tensor, flip: Tensor, shifts: Tensor) -> Tensor:
    """``images`` ``[B, C, H, W]`` (any dtype) mirrored left-right where ``flip`` (bool ``[B]``), then
    translated by ``shifts`` (int ``[B, 2]``: rows, columns; output pixel ``(i, j)`` is input pixel
    ``(i + dy, j + dx)``) with reflect padding -- the same as ``F.pad(..., mode="reflect")`` and a crop."""
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    out = torch.empty_like(images)
    h, w = images.shape[-2:]
    for dy in shifts[:, 0].unique().tolist():
        rows = _reflect_index(h, dy)
        for dx in shifts[:, 1].unique().tolist():
            mask = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            if mask.any():
                out[mask] = images[mask][:, :, rows][:, :, :, _reflect_index(w, dx)]
    return out


def _epoch_batches(n: int, batch_size: int, epoch: int, seed: int):
    """``(indices, flip, shifts)`` of each batch of an epoch: a seeded permutation cut into full
    batches (the last partial one dropped; one batch of all ``n`` if ``n < batch_size``)."""
    g = _epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=g)
    t = RECIPE["translate"]
    shifts = torch.randint(-t, t + 1, (n, 2), generator=g)
    flip = alternating_flip(n, epoch, seed)
    batch = min(batch_size, n)
    for i in range(n // batch):
        idx = order[i * batch:(i + 1) * batch]
        yield idx, flip[idx], shifts[idx]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // min(batch_size, n)


# --------------------------------------------------------------------------------------------
# Lookahead
# --------------------------------------------------------------------------------------------


class _Lookahead:
    """The exponential average of the model's floating-point state (weights and BatchNorm
    statistics); :meth:`update` moves it towards the model and copies it back."""

    def __init__(self, model: nn.Module, state: dict | None = None) -> None:
        source = state if state is not None else model.state_dict()
        self.average = {k: v.detach().clone() for k, v in source.items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        current = model.state_dict()
        for k, avg in self.average.items():
            avg.lerp_(current[k].to(avg.device), 1.0 - decay)
            current[k].copy_(avg)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _normalize(images: Tensor, mean: Tensor, std: Tensor, device, memory_format=torch.channels_last) -> Tensor:
    x = images.to(device, non_blocking=True).float().div_(255)
    return x.sub_(mean).div_(std).contiguous(memory_format=memory_format)


@torch.no_grad()
def _evaluate(model, images, labels, mean, std, device, autocast, tta_level=None, progress=False) -> dict:
    model.eval()
    correct = correct_tta = 0
    loss_sum = 0.0
    batches = zip(images.split(RECIPE["eval_batch"]), labels.split(RECIPE["eval_batch"]))
    for x, y in tqdm(batches, desc="test", unit="batch", leave=False, disable=not progress, dynamic_ncols=True,
                     total=math.ceil(len(labels) / RECIPE["eval_batch"])):
        x, y = _normalize(x, mean, std, device), y.to(device)
        with autocast():
            logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            if tta_level is not None:
                correct_tta += int((tta_logits(model, x, tta_level).float().argmax(1) == y).sum())
    n = len(labels)
    out = {"test_loss": loss_sum / n, "test_acc": correct / n}
    if tta_level is not None:
        out["test_acc_tta"] = correct_tta / n
    return out


def _load_data(args):
    root, cache = data.data_locations(args)
    if cache is None:
        raise ValueError("the airbench recipe reads the decoded-tensor cache: --cache-dir none is not supported")
    train_set = data.build_dataset(args.dataset, root, "train", None, subset=args.subset, cache_dir=cache)
    test_set = data.build_dataset(args.dataset, root, "test", None, subset=args.test_subset, cache_dir=cache)
    return root, train_set, test_set


def train_airbench(args: argparse.Namespace) -> dict:
    """Train ``args.arch`` (``airbench94`` / ``airbench93``) with the recipe (see the module
    docstring) from ``train-classifier``'s arguments; returns the last epoch's metrics."""
    if args.arch not in AIRBENCH_ARCHS:
        raise ValueError(f"the airbench recipe trains {' / '.join(AIRBENCH_ARCHS)}, not {args.arch!r}")
    ctx = distributed.context_from_env()
    if ctx.active:
        raise ValueError("the airbench recipe runs in one process: launch it without torchrun")
    if args.resume and args.out_dir is None:
        raise ValueError("--resume needs the --out-dir of the run to continue")
    args = _resolve(args)
    device = distributed.resolve_device(args.device, ctx)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = RunDir(args.out_dir or Path("runs") / f"train-classifier-{stamp}", resume=args.resume)
    if args.resume:
        run.check_resume_settings(args)
    seed_everything(args.seed)
    progress = bool(args.progress)

    stats = data.DATASET_STATS[args.dataset]
    root, train_set, test_set = _load_data(args)
    num_classes = stats.num_classes or len(train_set.classes)
    train_images, train_labels = train_set.images, train_set.labels
    test_images, test_labels = test_set.images, test_set.labels
    mean = torch.tensor(stats.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(stats.std, device=device).view(1, -1, 1, 1)
    image_size = train_images.shape[-1]

    model = build_classifier(args.arch, num_classes, image_size)
    assert isinstance(model, AirbenchNet)
    whiten_started = time.perf_counter()
    # a seeded random sample: the cached sets are in class order (ImageFolder), their first images one class
    sample = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed))
    model.init_whitening(_normalize(train_images[sample[:RECIPE["whiten_images"]]], mean.cpu(), std.cpu(), "cpu",
                                    torch.contiguous_format), RECIPE["whiten_eps"])
    whiten_seconds = time.perf_counter() - whiten_started
    model = model.to(device, memory_format=torch.channels_last)

    # decoupled hyperparameters -> PyTorch SGD's (the loss is a sum over the batch)
    scale = 1024 * (1 + 1 / (1 - args.momentum))
    lr = args.lr / scale
    decay = args.weight_decay * args.batch_size / scale
    bias_lr = lr * RECIPE["bias_lr_scale"]
    norm_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    others = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in norm_biases)]
    optimizer = torch.optim.SGD([dict(params=norm_biases, lr=bias_lr, weight_decay=decay / bias_lr),
                                 dict(params=others, lr=lr, weight_decay=decay / lr)],
                                momentum=args.momentum, nesterov=True)
    base_lrs = [group["lr"] for group in optimizer.param_groups]

    n = len(train_labels)
    per_epoch = steps_per_epoch(n, args.batch_size)
    total_steps = per_epoch * args.epochs
    start_epoch, step, best, train_seconds_total, saved_average = 0, 0, -1.0, 0.0, None
    if args.resume:
        state = run.load_state()
        if args.epochs < state["epoch"]:
            raise ValueError(f"--epochs {args.epochs}: the run in {run.path} has done {state['epoch']} epochs already")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("lookahead") is not None:  # None: a last.pt from before session 18, in the first epochs
            saved_average = {k: v.to(device) for k, v in state["lookahead"].items()}
        start_epoch, step, best = state["epoch"], state["step"], state["best_acc"]
        train_seconds_total = state.get("train_seconds", 0.0)
    else:
        run.write_settings(args, world_size=1)
    lookahead = _Lookahead(model, saved_average)  # a new run's: of the initial weights
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if not args.float32 else (
        lambda: torch.autocast(device.type, enabled=False))
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "command")
    run.log(f"colorquant train-classifier {options}")
    if args.resume:
        run.log(f"resumed from {run.last} at epoch {start_epoch} (step {step})")
    run.log(f"data: {args.dataset} in {root}: {n} train, {len(test_labels)} test images; "
            f"{per_epoch} steps of {min(args.batch_size, n)} images per epoch")
    run.log(f"airbench recipe: {sum(p.numel() for p in model.parameters())} parameters, "
            f"{'float32' if args.float32 else 'bfloat16 autocast'}, channels-last, {torch.get_num_threads()} threads, "
            f"whitening from {min(n, RECIPE['whiten_images'])} images in {whiten_seconds:.2f} s")

    record = {}
    for epoch in range(start_epoch, args.epochs):
        started = time.perf_counter()
        model.train()
        model.whiten.bias.requires_grad_(epoch < args.whiten_bias_epochs)
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = seen = 0
        bar = tqdm(_epoch_batches(n, args.batch_size, epoch, args.seed), total=per_epoch,
                   desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", leave=False, disable=not progress,
                   dynamic_ncols=True)
        for idx, flip, shifts in bar:
            x = _normalize(augment_batch(train_images[idx], flip, shifts), mean, std, device)
            y = train_labels[idx].to(device)
            factor = lr_factor(step, total_steps)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            with autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=RECIPE["label_smoothing"], reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % RECIPE["ema_every"] == 0:
                rho = RECIPE["ema_decay_base"] ** RECIPE["ema_every"] * (step / total_steps) ** RECIPE["ema_decay_pow"]
                lookahead.update(model, rho)
            if step == total_steps:
                lookahead.update(model, 1.0)  # the network takes the average
            loss_sum += loss.detach().double()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss.item() / len(y):.3f}", refresh=False)
        if not math.isfinite(float(loss_sum)):
            raise FloatingPointError(f"the training loss of epoch {epoch + 1} is not finite ({float(loss_sum)})")
        train_seconds = time.perf_counter() - started
        train_seconds_total += train_seconds
        last = epoch + 1 == args.epochs
        metrics = _evaluate(model, test_images, test_labels, mean, std, device, autocast,
                            args.tta_level if last else None, progress)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum) / seen,
            "train_acc": correct / seen,
            **metrics,
            "lr": base_lrs[1] * lr_factor(step - 1, total_steps),
            "train_seconds": round(train_seconds, 3),
            "step_seconds": round(train_seconds / per_epoch, 4),
            "seconds": round(time.perf_counter() - started, 3),
        }
        run.log(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

        def save(path, **extra):
            save_classifier(model, path, args.arch, num_classes, image_size, dataset=args.dataset, **extra)

        if metrics["test_acc"] > best:
            best = metrics["test_acc"]
            save(run.path / "best.pt", epoch=epoch + 1, test_acc=best)
        run.save_state({
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lookahead": lookahead.average,
            "epoch": epoch + 1,
            "step": step,
            "best_acc": best,
            "train_seconds": train_seconds_total,
        })
        run.append_metrics(record)
    extra = {k: record[k] for k in ("test_acc", "test_acc_tta") if k in record}
    save_classifier(model, run.path / "final.pt", args.arch, num_classes, image_size, dataset=args.dataset,
                    epoch=args.epochs, tta_level=args.tta_level, **extra)
    run.log(f"done: {args.epochs} epochs, {step} steps, training {train_seconds_total:.1f} s "
            f"({train_seconds_total / max(step, 1):.3f} s per step); final test_acc "
            f"{record.get('test_acc', float('nan')):.4f}, with TTA level {args.tta_level} "
            f"{record.get('test_acc_tta', float('nan')):.4f}; best test_acc {best:.4f}; checkpoints in {run.path}")
    return record
