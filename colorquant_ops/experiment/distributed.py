"""Multi-process training with PyTorch's DistributedDataParallel, as ``torchrun`` launches it.

``torchrun --nproc-per-node N -m colorquant_ops train ...`` starts N copies of the command; each finds
its rank in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, set by torchrun), joins one
process group (gloo on CPU, nccl on CUDA with device ``cuda:LOCAL_RANK``) and trains a DDP replica
on its shard of every batch. Without torchrun nothing here does anything (:data:`SINGLE`).

The training engine (:mod:`colorquant_ops.experiment.train`) uses these pieces; they are public so that tests
(and other training loops) can build the same setup with their own process group.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

__all__ = [
    "SINGLE",
    "CPUSyncBatchNorm",
    "DistributedContext",
    "all_gather_objects",
    "all_reduce_sum",
    "broadcast_buffers",
    "context_from_env",
    "main_first",
    "process_group",
    "resolve_device",
    "shard",
    "wrap_model",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` processes (``local_rank`` on its node);
    ``active``: launched by torchrun, so collectives run (also with one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0


#: A plain single-process run.
SINGLE = DistributedContext()


def _launched() -> bool:
    # torchrun sets TORCHELASTIC_RUN_ID; other launchers (e.g. a job script) set the env:// variables.
    return dist.is_torchelastic_launched() or all(
        k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def context_from_env() -> DistributedContext:
    """The context torchrun's environment describes (:data:`SINGLE` without torchrun); no process
    group is created yet, so arguments can be checked first (:func:`process_group` joins it)."""
    if not _launched():
        return SINGLE
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"launched by torchrun but RANK / WORLD_SIZE / LOCAL_RANK are unusable: {exc}") from None
    return DistributedContext(rank, world_size, local_rank, active=True)


def resolve_device(name: Optional[str], ctx: DistributedContext) -> torch.device:
    """``--device`` (cpu, cuda; default cuda if available) for this process: under torchrun, ``cuda``
    means ``cuda:LOCAL_RANK``."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: expected cpu or cuda, got {name!r}") from None
    if device.type not in ("cpu", "cuda") and not ctx.active:  # meta holds no data; mps, xpu, ...: unsupported
        raise ValueError(f"--device {name}: expected cpu or cuda (optionally cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPUs")
    if ctx.active and device.type == "cuda":
        if device.index is not None and ctx.world_size > 1:
            raise ValueError(f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda")
        if device.index is None:
            if ctx.local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {ctx.local_rank}: this machine has {torch.cuda.device_count()} GPUs")
            device = torch.device("cuda", ctx.local_rank)
    elif ctx.active and device.type != "cpu":
        raise ValueError(f"--device {name}: multi-process training runs on cpu (gloo) or cuda (nccl)")
    return device


@contextlib.contextmanager
def process_group(ctx: DistributedContext, device: torch.device) -> Iterator[DistributedContext]:
    """Join torchrun's process group for the block (gloo on CPU, nccl on CUDA) and leave it at the end,
    also on error. Does nothing for an inactive context."""
    if not ctx.active:
        yield ctx
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        if (dist.get_rank(), dist.get_world_size()) != (ctx.rank, ctx.world_size):
            raise RuntimeError(f"process group is rank {dist.get_rank()} of {dist.get_world_size()}, "
                               f"the environment said {ctx.rank} of {ctx.world_size}")
        yield ctx
    finally:
        dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks. Its backward sums the gradients too: every rank's loss depends on every
    rank's input through the sum (as in PyTorch's SyncBatchNorm, whose backward sums ``dy`` terms)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of CPU (gloo) processes: :class:`~torch.nn.SyncBatchNorm`
    for the CPU, which PyTorch's version (and DDP, for it) refuses.

    In training mode with more than one process the input is normalized with the mean and (biased)
    variance of the global batch, computed with two differentiable all-reduces (sum, then the sum of
    squared deviations: no cancellation); the running statistics get the unbiased variance, as in
    :func:`torch.nn.functional.batch_norm`. Otherwise it is plain batch norm. Any input ``[N, C, ...]``;
    same parameters, buffers and state_dict keys as ``BatchNorm{1,2,3}d``.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input [N, C, ...], got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        if not (self.training and group is not None and dist.get_world_size(group) > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = input.new_full((1,), input.numel() // input.shape[1])
        sums = _AllReduceSum.apply(torch.cat([input.sum(dims), count]), group)
        n = sums[-1]
        mean = sums[:-1] / n
        centred = input - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims), group) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            with torch.no_grad():
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * (n / (n - 1)), factor)
        return out

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace the BatchNorm layers below ``module`` in place (keeping their parameters and buffers,
        as :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` does); returns ``module``."""
        for name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, (cls, nn.SyncBatchNorm)):
                new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                if child.affine:
                    new.weight, new.bias = child.weight, child.bias
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
                new.train(child.training)
                setattr(module, name, new)
            else:
                cls.convert(child)
        return module


def wrap_model(model: nn.Module, ctx: DistributedContext, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """``model`` for training: a :class:`~torch.nn.parallel.DistributedDataParallel` replica under an
    active context (its parameters and buffers start as rank 0's), else ``model`` itself.

    ``sync_bn`` converts ``model``'s BatchNorm layers *in place* to :class:`~torch.nn.SyncBatchNorm`
    (:class:`CPUSyncBatchNorm` on CPU): batch statistics over the global batch. The parameters,
    buffers and state_dict keys stay the same, so ``model.state_dict()`` still loads into the plain
    model. ``model`` must be on ``device``.
    """
    if not ctx.active:
        return model
    if sync_bn:
        if isinstance(model, nn.modules.batchnorm._BatchNorm):
            raise TypeError("wrap_model(sync_bn=True) converts the batch-norm layers inside a model, not the model itself")
        if device.type == "cpu":
            CPUSyncBatchNorm.convert(model)
        else:
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the children, returns model itself
    device_ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def broadcast_buffers(model: nn.Module, ctx: DistributedContext) -> None:
    """Copy rank 0's buffers (e.g. BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of each training forward, so after the last step every
    replica holds running statistics updated by its own shard; evaluating or saving needs one copy.
    """
    if ctx.active and ctx.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_sum(values: list[float], ctx: DistributedContext, device: torch.device) -> list[float]:
    """Sums over all ranks of ``values`` (float64 on ``device``: nccl reduces CUDA tensors only)."""
    if not ctx.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj, ctx: DistributedContext) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` for a single process)."""
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def shard(dataset: Dataset, ctx: DistributedContext) -> Dataset:
    """This rank's images ``rank, rank + world_size, ...`` of ``dataset``: the shards cover every
    image exactly once (unlike ``DistributedSampler``, which pads with repeats), so sums of counts
    over the ranks are exact."""
    if not ctx.active or ctx.world_size == 1:
        return dataset
    return Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))


def main_first(fn: Callable[[], T], ctx: DistributedContext) -> T:
    """``fn()`` on rank 0, then on the other ranks (e.g. extracting or caching a dataset once).

    If it fails on rank 0 the others raise the same error type with its message instead of waiting or
    each failing their own way, so every process ends with the same clear error.
    """
    if not ctx.active or ctx.world_size == 1:
        return fn()
    error = None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the others have been told
            error = exc
    # the error travels as its kind and text (exception objects need not pickle); the CLI reports
    # ValueError and OSError as one-line errors
    kinds = {"ValueError": ValueError, "OSError": OSError, "RuntimeError": RuntimeError}
    message = [None if error is None else
               (next((n for n, k in kinds.items() if isinstance(error, k)), "RuntimeError"), str(error))]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        name, text = message[0]
        raise kinds[name](text)
    return result if ctx.is_main else fn()
