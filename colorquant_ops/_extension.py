"""Loads the compiled extension ``colorquant_ops._C``.

There is deliberately no fallback to the pure-PyTorch reference: a missing
build is an error that says how to build, never a silent slow path.
"""

import torch

try:
    from . import _C  # noqa: F401  (importing registers the kernels)
except ImportError as exc:  # pragma: no cover - exercised only without a build
    raise ImportError(
        "colorquant_ops: the C++/CUDA extension colorquant_ops._C is not built "
        f"or failed to load ({exc}). Build it from the repository root with "
        "`make build` (or `pip install --no-build-isolation -e .`)."
    ) from exc


def cuda_kernels_compiled() -> bool:
    """True if this build of the extension contains the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("colorquant::soft_color_quantize", "CUDA")
