"""Feature extractors (backbones) of :class:`~colorquant_ops.models.ColorCNN`.

Both follow the code of the ColorCNN paper (Hou, Zheng, Gould, "Learning to
Structure an Image with Few Colors", CVPR 2020): the U-Net is the classic
milesial Pytorch-UNet "bilinear" variant without its output convolution, the
DnCNN is Zhang et al.'s 17-layer denoiser whose last convolution outputs
features instead of an image. Every channel count scales with ``width``
(64 is the paper's).
"""

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DnCNN", "DoubleConv", "Down", "UNet", "Up"]


class DoubleConv(nn.Sequential):
    """``(3x3 conv -> BatchNorm -> ReLU) x 2``, the U-Net's building block.

    Args:
        in_channels: input channels.
        out_channels: output channels (also the width of the middle layer).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """``2x2 max-pool -> DoubleConv``: one down-sampling stage of the U-Net.

    Args:
        in_channels: input channels.
        out_channels: output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Bilinear x2 up-sampling, concatenation with the skip, ``DoubleConv``.

    Args:
        in_channels: channels of the concatenation ``[skip, upsampled]``.
        out_channels: output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)
        # As in milesial's code: zero-pad to the skip's size when a floor-ing
        # max-pool lost a row/column (never the case inside UNet, which pads its
        # input to a multiple of 16, but keeps this block usable on its own).
        dy = skip.shape[-2] - x.shape[-2]
        dx = skip.shape[-1] - x.shape[-1]
        if dy or dx:
            x = F.pad(x, (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2))
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net auto-encoder (milesial Pytorch-UNet, bilinear variant, no output conv).

    Channels ``w, 2w, 4w, 8w, 8w`` down and ``4w, 2w, w, w`` up, with
    ``w = width`` (the paper's ``64, 128, 256, 512, 512``).

    The four 2x2 max-pools need a size divisible by 16, so the input is padded
    (replicate, about evenly on both sides) to the next multiple of 16 and the
    output cropped back: any ``H, W >= 1`` works and the output has the input's
    size. In training mode, if the 1/16-scale bottleneck would hold a single
    value per channel (batch of one image no larger than 16x16), BatchNorm could
    not compute batch statistics, so the height is padded by 16 more rows.

    Args:
        in_channels: channels of the input image.
        width: channels of the first stage and of the output (64 in the paper).

    Shape:
        - Input: ``[B, in_channels, H, W]``
        - Output: ``[B, width, H, W]``
    """

    #: Total down-sampling factor of the four max-pools.
    size_multiple = 16

    def __init__(self, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        w = width
        self.inc = DoubleConv(in_channels, w)
        self.down1 = Down(w, 2 * w)
        self.down2 = Down(2 * w, 4 * w)
        self.down3 = Down(4 * w, 8 * w)
        self.down4 = Down(8 * w, 8 * w)
        self.up1 = Up(16 * w, 4 * w)
        self.up2 = Up(8 * w, 2 * w)
        self.up3 = Up(4 * w, w)
        self.up4 = Up(2 * w, w)
        self.out_channels = w

    def _padding(self, x: Tensor) -> List[int]:
        b, _, h, w = x.shape
        m = self.size_multiple
        hp, wp = -(-h // m) * m, -(-w // m) * m
        if self.training and b * (hp // m) * (wp // m) == 1:
            hp += m
        top, left = (hp - h) // 2, (wp - w) // 2
        return [left, wp - w - left, top, hp - h - top]

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        pad = self._padding(x)
        if any(pad):
            # Replicate (not reflect): valid for any pad width, even on a 1-pixel image.
            x = F.pad(x, pad, mode="replicate")
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        if any(pad):
            left, _, top, _ = pad
            x = x[..., top : top + h, left : left + w]
        return x


class DnCNN(nn.Sequential):
    """DnCNN feature extractor: ``conv+ReLU``, ``(depth-2) x (conv+BN+ReLU)``, ``conv``.

    All convolutions are 3x3, bias-free, with ``width`` output channels; the
    last one outputs the feature map (not a residual image as in the denoiser).

    Args:
        in_channels: channels of the input image.
        width: features of every layer (64 in the paper).
        depth: number of convolution layers (17 in the paper), at least 2.

    Shape:
        - Input: ``[B, in_channels, H, W]``
        - Output: ``[B, width, H, W]``
    """

    def __init__(self, in_channels: int = 3, width: int = 64, depth: int = 17) -> None:
        if depth < 2:
            raise ValueError(f"DnCNN depth must be >= 2, got {depth}")
        layers: List[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(width, width, 3, padding=1, bias=False))
        super().__init__(*layers)
        self.out_channels = width
