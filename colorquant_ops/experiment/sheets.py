"""Labelled picture sheets: a grid of images with column headers and per-cell captions.

Every image is shown at a size that fits a ``cell_size`` square with nearest-neighbour
resampling, so that quantized colours stay exact: a small image (e.g. 32x32 CIFAR) is
enlarged by the largest integer factor that fits, a large one is reduced.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["fit_to_cell", "labelled_sheet"]

_MARGIN = 8  # pixels around and between cells
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)

ImageLike = Union[Image.Image, Tensor]


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        what = (f"{image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, Tensor)
                else type(image).__name__)
        raise TypeError(f"sheet images must be PIL images or uint8 [3,H,W] tensors, got a {what}")
    return Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()))


def fit_to_cell(image: ImageLike, cell_size: int) -> Image.Image:
    """``image`` resized (nearest neighbour) so its longer side fits ``cell_size``: enlarged by the
    largest integer factor that fits, or reduced to exactly ``cell_size``. Idempotent."""
    if cell_size < 1:
        raise ValueError(f"cell_size must be >= 1, got {cell_size}")
    image = _to_pil(image)
    w, h = image.size
    longer = max(w, h)
    if longer <= cell_size:
        factor = cell_size // longer
        size = (w * factor, h * factor)
    else:
        size = (max(1, round(w * cell_size / longer)), max(1, round(h * cell_size / longer)))
    return image if size == image.size else image.resize(size, Image.Resampling.NEAREST)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right, bottom  # from the origin, so that offsets of the first line count


def labelled_sheet(
    rows: Sequence[Sequence[ImageLike]],
    column_labels: Sequence[str],
    captions: Optional[Sequence[Sequence[str]]] = None,
    cell_size: int = 256,
    font_size: int = 12,
):
    """Draw ``rows`` of images as one sheet.

    Args:
        rows: one sequence of images per row, each as long as ``column_labels``; PIL images or
            uint8 ``[3,H,W]`` tensors, shown via :func:`fit_to_cell`.
        column_labels: header text of each column.
        captions: optional text under each image (same nesting as ``rows``; may hold newlines).
        cell_size: longest side of a shown image, in pixels.
        font_size: text size in pixels (PIL's bundled font; its bitmap font without FreeType).

    Returns:
        ``(sheet, boxes)``: the RGB PIL image and, per row and column, the ``(left, top, right,
        bottom)`` box where the fitted image was pasted.
    """
    n_cols = len(column_labels)
    if any(len(row) != n_cols for row in rows):
        raise ValueError(f"every row needs {n_cols} images (one per column label), got {[len(r) for r in rows]}")
    if captions is not None and (len(captions) != len(rows) or any(len(c) != n_cols for c in captions)):
        raise ValueError("captions must have the nesting of rows")
    cells = [[fit_to_cell(image, cell_size) for image in row] for row in rows]
    font = ImageFont.load_default(size=font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_sizes = [_text_size(measure, label, font) for label in column_labels]
    caption_sizes = [[_text_size(measure, text, font) for text in row] for row in captions] if captions else None

    col_widths = [label_sizes[j][0] for j in range(n_cols)]
    row_heights = []
    for i, row in enumerate(cells):
        image_h = max((c.height for c in row), default=0)
        caption_h = max((s[1] for s in caption_sizes[i]), default=0) if caption_sizes else 0
        row_heights.append(image_h + (caption_h + _MARGIN // 2 if caption_h else 0))
        for j, cell in enumerate(row):
            col_widths[j] = max(col_widths[j], cell.width, caption_sizes[i][j][0] if caption_sizes else 0)
    header_h = max((s[1] for s in label_sizes), default=0)

    width = _MARGIN + sum(w + _MARGIN for w in col_widths)
    height = _MARGIN + header_h + _MARGIN + sum(h + _MARGIN for h in row_heights)
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    lefts = [_MARGIN + sum(w + _MARGIN for w in col_widths[:j]) for j in range(n_cols)]
    for j, label in enumerate(column_labels):
        draw.text((lefts[j], _MARGIN), label, fill=_TEXT, font=font)
    boxes = []
    top = _MARGIN + header_h + _MARGIN
    for i, row in enumerate(cells):
        row_boxes = []
        image_h = max((c.height for c in row), default=0)
        for j, cell in enumerate(row):
            left = lefts[j] + (col_widths[j] - cell.width) // 2
            sheet.paste(cell, (left, top))
            row_boxes.append((left, top, left + cell.width, top + cell.height))
            if captions and captions[i][j]:
                draw.multiline_text((lefts[j], top + image_h + _MARGIN // 2), captions[i][j], fill=_TEXT, font=font)
        boxes.append(row_boxes)
        top += row_heights[i] + _MARGIN
    return sheet, boxes
