"""A fast CIFAR classifier after Keller Jordan's airbench ("94% on CIFAR-10 in 3.29 Seconds on a
Single GPU", arXiv 2404.00498), written for this project from the published recipe.

The network (:class:`AirbenchNet`, built by ``build_classifier("airbench94" | "airbench93", ...)``):

* a 2x2 *whitening* convolution without padding (``2 * 3 * 2 * 2 = 24`` channels: the eigenvectors
  of the training patches' second-moment matrix scaled by ``1 / sqrt(eigenvalue + eps)``, and their
  negatives), frozen -- only its bias trains, and only at the start of the recipe -- then GELU;
* three conv groups, each ``conv 3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv 3x3 -> BatchNorm ->
  GELU`` (widths 64/256/256 for ``airbench94``, 64/128/128 for ``airbench93``), the convolutions
  without bias and with an identity (Dirac) initialization of their first ``in_channels`` filters,
  the BatchNorm weights frozen at 1 (only the biases train), eps 1e-12, running-statistics momentum
  0.4 (PyTorch's convention; 0.6 in the recipe's);
* a global max-pool (on 32x32 inputs the recipe's 3x3 max-pool of the 3x3 map), a linear layer
  without bias, and the logits multiplied by 1/9.

Input: images normalized like the project's other CIFAR classifiers (mean (0.4914, 0.4822, 0.4465),
std (0.2023, 0.1994, 0.2010)), ``[B, 3, H, W]`` with ``H, W >= 9`` (three 2x2 pools after the
2x2 convolution). :meth:`AirbenchNet.init_whitening` computes the whitening filters from training
images given in that same normalization; :func:`build_classifier` leaves PyTorch's default
initialization in place (a checkpoint carries the computed filters in its state dict).

The forward pass is one plain pass in every mode -- ColorCNN trains through it -- and
:func:`tta_logits` is the recipe's test-time augmentation (mirror, and mirror + 1-pixel
translations) for reporting accuracy. The training recipe is
:mod:`colorquant_ops.experiment.airbench` (``colorquant train-classifier --arch airbench94``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AIRBENCH_ARCHS", "AIRBENCH_WIDTHS", "AirbenchNet", "patch_whitening", "tta_logits"]

#: Conv-group widths of the two published variants.
AIRBENCH_WIDTHS = {"airbench94": (64, 256, 256), "airbench93": (64, 128, 128)}

#: Names accepted by :func:`~colorquant_ops.models.classifiers.build_classifier`.
AIRBENCH_ARCHS = tuple(AIRBENCH_WIDTHS)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        # identity on the first in_channels filters: each group starts close to a residual pass-through
        nn.init.dirac_(conv.weight[: min(in_channels, out_channels)])
    return conv


def _batch_norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=momentum)
    norm.weight.requires_grad_(False)  # the scale stays 1; the bias trains
    return norm


class _ConvGroup(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.norm1 = _batch_norm(out_channels, bn_momentum)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.norm2 = _batch_norm(out_channels, bn_momentum)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


def patch_whitening(images: Tensor, kernel_size: int = 2, eps: float = 5e-4) -> Tensor:
    """Whitening filters of the ``kernel_size`` x ``kernel_size`` patches of ``images``.

    ``images``: float ``[N, C, H, W]`` (normalized). Returns ``[C*k*k, C, k, k]`` filters: the
    eigenvectors ``v`` of the patches' second-moment matrix ``E[p p^T]`` (largest eigenvalue first),
    each divided by ``sqrt(eigenvalue + eps)``, so that the filtered patches ``V p`` have a second
    moment close to the identity (exactly ``diag(l / (l + eps))``).
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    c, k = images.shape[1], kernel_size
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # [N, C, H', W', k, k]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
    moment = patches.T @ patches / patches.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    filters = eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]
    return filters.reshape(c * k * k, c, k, k).float()


class AirbenchNet(nn.Module):
    """The airbench CIFAR network (see the module docstring).

    Args:
        num_classes: number of logits.
        widths: output channels of the three conv groups (``(64, 256, 256)``: airbench94).
        in_channels: image channels.
        whiten_kernel: side of the whitening convolution.
        bn_momentum: BatchNorm running-statistics momentum (PyTorch's convention).
        logit_scale: factor of the logits.

    Shape:
        - Input: ``[B, in_channels, H, W]`` normalized images, ``H, W >= 9`` for the default kernel.
        - Output: ``[B, num_classes]`` logits.
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = AIRBENCH_WIDTHS["airbench94"],
                 in_channels: int = 3, whiten_kernel: int = 2, bn_momentum: float = 0.4,
                 logit_scale: float = 1 / 9) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive ints, got {widths}")
        whiten_width = 2 * in_channels * whiten_kernel**2
        self.whiten = nn.Conv2d(in_channels, whiten_width, kernel_size=whiten_kernel, padding=0, bias=True)
        nn.init.zeros_(self.whiten.bias)
        self.whiten.weight.requires_grad_(False)
        channels = (whiten_width, *widths)
        self.groups = nn.Sequential(*(_ConvGroup(channels[i], channels[i + 1], bn_momentum) for i in range(3)))
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = float(logit_scale)

    @torch.no_grad()
    def init_whitening(self, images: Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalized training images ``[N, C, H, W]`` (the recipe
        uses 5,000): the :func:`patch_whitening` filters and their negatives (so that GELU keeps
        both signs); the bias is set to zero."""
        filters = patch_whitening(images, self.whiten.kernel_size[0], eps)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))
        self.whiten.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        return self.head(torch.flatten(x.amax(dim=(2, 3)), 1)) * self.logit_scale


def _mirror(model: nn.Module, images: Tensor) -> Tensor:
    return 0.5 * model(images) + 0.5 * model(images.flip(-1))


def tta_logits(model: nn.Module, images: Tensor, level: int = 2) -> Tensor:
    """Logits of ``model`` under the airbench test-time augmentation; ``model`` should be in eval mode.

    * ``level=0``: ``model(images)``;
    * ``level=1``: the mean of the image and its left-right mirror;
    * ``level=2``: half of level 1, plus a quarter each of level 1 on the image translated by one
      pixel up-left and down-right (reflect padding): six views, weights 1/4, 1/4, 1/8 x 4.

    Works with any classifier taking ``[B, C, H, W]`` images.
    """
    if level not in (0, 1, 2):
        raise ValueError(f"level must be 0, 1 or 2, got {level!r}")
    if level == 0:
        return model(images)
    logits = _mirror(model, images)
    if level == 1:
        return logits
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = [_mirror(model, padded[..., :h, :w]), _mirror(model, padded[..., 2:, 2:])]
    return 0.5 * logits + 0.25 * (shifted[0] + shifted[1])
