"""Pure-PyTorch reference implementations of the fused ops.

They state the maths of ``colorquant_ops.ops`` in plain tensor operations and
serve as the oracle of the tests (run in float64) and as the baselines of the
benchmarks. They are never used as a fallback for a missing build.

Shapes: logits ``[B,K,H,W]``, image ``[B,C,H,W]``, palette ``[B,K,C]``,
index_map ``[B,H,W]``; ``p`` runs over the ``H*W`` pixels.
"""

import torch


def soft_color_quantize(logits, image, temperature=1.0, eps=1e-8):
    """The fused soft op's maths as batched matrix products.

    probs = softmax(temperature * logits, dim=1)
    palette[b,k,c] = sum_p probs[b,k,p] image[b,c,p] / (sum_p probs[b,k,p] + eps)
    quantized[b,c,p] = sum_k probs[b,k,p] palette[b,k,c]
    """
    B, K, H, W = logits.shape
    C = image.shape[1]
    probs = torch.softmax(temperature * logits, dim=1)
    p = probs.reshape(B, K, H * W)
    x = image.reshape(B, C, H * W)
    weight = p.sum(dim=2, keepdim=True)  # [B,K,1]
    palette = torch.bmm(p, x.transpose(1, 2)) / (weight + eps)  # [B,K,C]
    quantized = torch.bmm(palette.transpose(1, 2), p).reshape(B, C, H, W)
    return quantized, palette, probs


def soft_color_quantize_paper(logits, image, temperature=1.0, eps=1e-8):
    """The seed paper's released formulation (broadcast to ``[B,C,K,H,W]``).

    Same result as :func:`soft_color_quantize`; kept as the benchmark baseline
    because it materializes the ``B x C x K x H x W`` product.
    """
    probs = torch.softmax(temperature * logits, dim=1)
    m = probs.unsqueeze(1)  # [B,1,K,H,W]
    palette = (image.unsqueeze(2) * m).sum(dim=(3, 4), keepdim=True) / (m.sum(dim=(3, 4), keepdim=True) + eps)
    quantized = (m * palette).sum(dim=2)
    return quantized, palette.squeeze(-1).squeeze(-1).transpose(1, 2), probs


def render_index_map(index_map, palette):
    """image[b,c,h,w] = palette[b, index_map[b,h,w], c]."""
    B, H, W = index_map.shape
    C = palette.shape[2]
    idx = index_map.reshape(B, H * W, 1).expand(B, H * W, C)
    return palette.gather(1, idx).transpose(1, 2).reshape(B, C, H, W)


def hard_color_quantize(logits, image):
    """Argmax index map (first maximum wins), per-colour mean palette (zeros
    for an unused colour), and the image rendered from the two.

    Each pixel is added to its own colour only (a scatter, not a one-hot
    product: 0 * NaN would spread one NaN pixel into every colour)."""
    B, K, H, W = logits.shape
    C = image.shape[1]
    index_map = logits.argmax(dim=1)
    flat = index_map.reshape(B, H * W)
    counts = torch.zeros(B, K, 1, dtype=image.dtype, device=image.device)
    counts.scatter_add_(1, flat.unsqueeze(-1), torch.ones(B, H * W, 1, dtype=image.dtype, device=image.device))
    sums = torch.zeros(B, K, C, dtype=image.dtype, device=image.device)
    sums.scatter_add_(1, flat.unsqueeze(-1).expand(B, H * W, C), image.reshape(B, C, H * W).transpose(1, 2))
    palette = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return render_index_map(index_map, palette), index_map, palette


def palette_distance(image, palette):
    """out[b,k,h,w] = sum_c (image[b,c,h,w] - palette[b,k,c])^2, by broadcasting to ``[B,K,C,H,W]``."""
    return ((image[:, None] - palette[..., None, None]) ** 2).sum(2)
