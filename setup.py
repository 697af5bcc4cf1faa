"""Build of colorquant_ops and its C++/CUDA extension ``colorquant_ops._C``.

The CUDA kernels are compiled whenever nvcc is found (CUDA_HOME), even on a
machine without a GPU, so that every build proves the ``.cu`` files compile and
link. Environment switches:

* ``COLORQUANT_CPU_ONLY=1``  build the CPU kernels only;
* ``TORCH_CUDA_ARCH_LIST``   CUDA architectures (default ``8.0;9.0``);
* ``COLORQUANT_DEBUG=1``     -O0 -g, for gdb / compute-sanitizer line info.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def extension():
    debug = _flag("COLORQUANT_DEBUG")
    use_cuda = not _flag("COLORQUANT_CPU_ONLY") and cpp_extension.CUDA_HOME is not None
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    # The C++ standard is left to torch (C++17 up to torch 2.x, C++20 since 2.14).
    # -fopenmp: at::parallel_for is header code; without it the CPU kernels run on one thread.
    # -fno-trapping-math: lets gcc vectorize the float->int step of shifted_exp (no FP traps are used).
    # -ffp-contract=off: no fused multiply-adds, so the k-means/dither kernels agree bit for bit with
    # their CUDA twins (which round with __fmul_rn etc.).
    cxx = opt + ["-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    extra = {"cxx": cxx}
    ext_cls = cpp_extension.CppExtension
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        extra["nvcc"] = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        ext_cls = cpp_extension.CUDAExtension
    return ext_cls(
        name="colorquant_ops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=[("WITH_CUDA", None)] if use_cuda else [],
    )


setup(
    # colorquant_ops.assets (no __init__.py: data only) is listed so that setuptools ships it as package data
    packages=find_packages(include=["colorquant_ops", "colorquant_ops.*"]) + ["colorquant_ops.assets"],
    # the bundled weights (colorquant_ops.models.pretrained) and the demo's CIFAR-10 test sample
    package_data={"colorquant_ops.assets": ["weights/*.pt", "cifar10-sample/test/*/*.jpg"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
