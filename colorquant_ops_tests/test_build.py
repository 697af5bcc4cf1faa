"""The compiled extension: loaded, kernels registered, CUDA kernels compiled
whenever the build could compile them (this is how CI proves on a GPU-less
machine that the .cu files compile and link), and a clear error without a build."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import colorquant_ops
import colorquant_ops.ops as cq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = [
    "soft_color_quantize",
    "soft_color_quantize_backward",
    "hard_color_quantize",
    "render_index_map",
    "render_index_map_backward",
    "palette_distance",
    "palette_distance_backward",
]


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def test_extension_loaded():
    assert "colorquant_ops._C" in sys.modules
    assert sys.modules["colorquant_ops._C"].__file__.startswith(os.path.join(os.path.dirname(colorquant_ops.__file__), "_C"))
    for name in OPS:
        assert hasattr(torch.ops.colorquant, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"colorquant::{name}", "CPU"), f"no CPU kernel for {name}"


def test_cuda_kernels_compiled_when_nvcc_available():
    cpu_only = _flag("COLORQUANT_CPU_ONLY")
    nvcc = shutil.which("nvcc") or os.environ.get("CUDA_HOME")
    compiled = cq.cuda_kernels_compiled()
    if cpu_only:
        assert not compiled, "COLORQUANT_CPU_ONLY is set but the extension has CUDA kernels: stale build?"
    elif nvcc:
        assert compiled, (
            f"nvcc is available ({nvcc}) and COLORQUANT_CPU_ONLY is not set, but the extension was built "
            "without its CUDA kernels: rebuild with `make build` (or set COLORQUANT_CPU_ONLY=1 for a CPU-only build)"
        )
    else:
        pytest.skip("no nvcc / CUDA_HOME on this machine: the CUDA kernels cannot have been compiled")
    if compiled:
        for name in OPS:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"colorquant::{name}", "CUDA"), f"no CUDA kernel for {name}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available (no GPU on this machine)")
def test_gpu_machine_has_cuda_kernels():
    assert cq.cuda_kernels_compiled(), "a GPU is available but the extension was built without CUDA kernels"


def test_missing_build_says_how_to_build():
    """Without an importable colorquant_ops._C, importing the package raises an
    ImportError that names the build command and the original cause."""
    script = textwrap.dedent(
        """
        import sys

        class NoExtension:
            def find_spec(self, name, path=None, target=None):
                if name == "colorquant_ops._C":
                    raise ImportError("simulated: no compiled extension")
                return None

        sys.meta_path.insert(0, NoExtension())
        try:
            import colorquant_ops
        except ImportError as exc:
            print(exc)
            sys.exit(0)
        print("imported without the extension")
        sys.exit(1)
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"import did not fail:\n{proc.stdout}\n{proc.stderr}"
    message = proc.stdout
    assert "colorquant_ops._C" in message
    assert "not built" in message
    assert "make build" in message
    assert "simulated: no compiled extension" in message  # the original cause is kept


def test_uninitialized_memory_is_poisoned():
    """The autouse fixture of conftest.py is active: an output element a kernel
    forgets to write reads as NaN / INT64_MAX and fails the comparisons."""
    assert torch.isnan(torch.empty(5)).all()
    assert torch.isnan(torch.empty(5, dtype=torch.float16)).all()
    assert (torch.empty(5, dtype=torch.long) == torch.iinfo(torch.long).max).all()
