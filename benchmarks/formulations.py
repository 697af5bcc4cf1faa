"""The formulations each op is timed in, side by side (same maths, see
:mod:`colorquant_ops.ops.reference`):

* ``fused``: this library's op (``torch.ops.colorquant``).
* ``paper``: the seed paper's released formulation in eager PyTorch, which
  broadcasts the image against the per-pixel colour weights to a
  ``B x C x K x H x W`` tensor and sums it (Hou et al.'s ``ColorCNN.forward``;
  its evaluation path feeds the one-hot of the argmax through the same
  broadcast).
* ``eager``: the reference in eager PyTorch: batched matrix products for the
  soft and hard ops, a gather for ``render_index_map``.
* ``compiled``: ``torch.compile`` of ``eager`` (static shapes).
* ``expanded``: ``palette_distance`` only, the matrix-product expansion
  ``|x|^2 - 2 x.c + |c|^2`` (an einsum over the channels, no ``B x K x C x H x W``
  tensor; it loses precision to cancellation where a pixel is close to a colour).

``palette_distance`` has no paper formulation (the seed paper has no such op);
its ``eager`` formulation is the broadcast
``((image[:, None] - palette[..., None, None]) ** 2).sum(2)``. A formulation an op
does not have is reported as not applicable.
"""

import torch

from colorquant_ops import ops
from colorquant_ops.ops import reference

FORMULATIONS = ("fused", "paper", "eager", "compiled", "expanded")
OPS = ("soft", "hard", "render", "distance")


def hard_color_quantize_paper(logits, image):
    """The paper's evaluation path: the one-hot of the argmax through the broadcast formulation."""
    index_map = logits.argmax(dim=1)
    onehot = torch.zeros_like(logits).scatter_(1, index_map.unsqueeze(1), 1)
    # softmax(log(onehot)) is the one-hot itself (exp(-inf) = 0), so the paper's soft
    # formulation, which takes the softmax of its input, applies unchanged (the paper's
    # code, too, takes a softmax over the K scores before the argmax).
    quantized, palette, _ = reference.soft_color_quantize_paper(onehot.log(), image)
    return quantized, index_map, palette


def render_index_map_paper(index_map, palette):
    """The paper's recolouring ``sum_k onehot[b,k,p] * palette[b,k,c]`` as a ``B x C x K x H x W`` broadcast."""
    B, H, W = index_map.shape
    K = palette.shape[1]
    onehot = palette.new_zeros(B, K, H, W).scatter_(1, index_map.unsqueeze(1), 1)
    return (onehot.unsqueeze(1) * palette.transpose(1, 2)[:, :, :, None, None]).sum(dim=2)


def palette_distance_expanded(image, palette):
    """``|x|^2 - 2 x.c + |c|^2``: the squared distances through one batched matrix product."""
    x2 = (image * image).sum(1, keepdim=True)  # [B,1,H,W]
    c2 = (palette * palette).sum(2)[..., None, None]  # [B,K,1,1]
    return x2 - 2 * torch.einsum("bchw,bkc->bkhw", image, palette) + c2


_EAGER = {
    "soft": {"fused": ops.soft_color_quantize, "paper": reference.soft_color_quantize_paper,
             "eager": reference.soft_color_quantize},
    "hard": {"fused": ops.hard_color_quantize, "paper": hard_color_quantize_paper,
             "eager": reference.hard_color_quantize},
    "render": {"fused": ops.render_index_map, "paper": render_index_map_paper,
               "eager": reference.render_index_map},
    "distance": {"fused": ops.palette_distance, "eager": reference.palette_distance,
                 "expanded": palette_distance_expanded},
}


def has_formulation(op: str, name: str) -> bool:
    """Whether ``op`` is timed in formulation ``name`` (``compiled`` wherever there is an ``eager``)."""
    table = _EAGER.get(op, {})
    return name in table or (name == "compiled" and "eager" in table)


def formulation(op: str, name: str):
    """The function computing ``op`` in formulation ``name``. ``compiled`` is a
    fresh ``torch.compile`` (dynamo's caches cleared: every shape compiles
    anew, never falling back to eager at the recompile limit)."""
    if op not in _EAGER:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if name == "compiled":
        torch._dynamo.reset()
        return torch.compile(_EAGER[op]["eager"], dynamic=False)
    if name not in _EAGER[op]:
        raise ValueError(f"formulation of {op} must be one of "
                         f"{tuple(n for n in FORMULATIONS if has_formulation(op, n))}, got {name!r}")
    return _EAGER[op][name]


def soft_color_quantize_paper(logits, image, temperature=1.0, eps=1e-8):
    """The paper's soft formulation with the fused op's result type (for ColorCNN)."""
    return ops.SoftQuantized(*reference.soft_color_quantize_paper(logits, image, temperature, eps))
