"""Builds pyformer and its extension pyformer._C with torch.utils.cpp_extension.

The C++ sources (csrc/*.cpp, csrc/host/*.cpp, csrc/cpu/*.cpp) are always built, the CPU kernels
for baseline x86-64. On x86-64 the CPU kernels (csrc/cpu/*.cpp) are built a second time with AVX2,
FMA and F16C into pyformer/_cpu_avx2*.so, which pyformer._C loads when the CPU it runs on has them
(csrc/kernels.h), so a wheel runs on any x86-64 CPU and uses AVX2 where there is one. The CUDA
sources (csrc/cuda/*.cu) are added when the installed torch was built with CUDA (torch.version.cuda)
and nvcc is found.

Environment:
  PYFORMER_CUDA=0          force a CPU-only build (=1: fail if CUDA cannot be built)
  TORCH_CUDA_ARCH_LIST     CUDA architectures; default "8.0;9.0" when no GPU is visible
  PYFORMER_CPU_VEC         avx2 | none (default: avx2 on x86-64; none: baseline CPU kernels only)
  MAX_JOBS                 parallel compile jobs (ninja)

The objects are kept in build/temp.<platform>-<python>/<extension>/ in the source tree, editable installs
included (pip's editable install would otherwise compile in a fresh temporary folder each time),
so a second install, or one after an edit, recompiles only what changed (ninja's incremental
build; without ninja every install compiles everything). Delete build/ to start from scratch.
"""

import glob
import os
import platform
import shutil
import sys
import sysconfig

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("PYFORMER_CUDA", "").strip()
    nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    possible = torch.version.cuda is not None and (nvcc or shutil.which("nvcc") is not None)
    if flag == "0":
        return False
    if flag == "1" and not possible:
        raise RuntimeError(
            "PYFORMER_CUDA=1 but CUDA cannot be built: torch.version.cuda="
            f"{torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
        )
    return possible


def _cpu_vec() -> str:
    want = os.environ.get("PYFORMER_CPU_VEC", "avx2").strip().lower()
    if want not in ("avx2", "none"):
        raise RuntimeError(f"PYFORMER_CPU_VEC must be avx2 or none, got {want!r}")
    if want == "avx2" and platform.machine().lower() not in ("x86_64", "amd64"):
        return "none"
    return want


def extensions():
    cuda = _want_cuda()
    vec = _cpu_vec()
    sources = sorted(
        glob.glob(os.path.join("csrc", "*.cpp"))
        + glob.glob(os.path.join("csrc", "host", "*.cpp"))
        + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    )
    # -fopenmp: at::parallel_for is a header template that runs serially unless the extension
    # itself is compiled with OpenMP; at run time the libgomp.so.1 that torch loads is shared.
    # -ffp-contract=off: arithmetic as written (fused multiply-adds only where the kernels ask for
    # them), so e.g. layer norm's dx is exactly 0 where it must be, as in the reference.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    link = ["-fopenmp"]
    cpu_libs = []
    if vec == "avx2":
        # The same kernel files with at::vec's AVX2 specializations (Vectorized<float> in ymm
        # registers), in a library of their own with hidden visibility: none of its AVX2 code can
        # be linked in place of _C's baseline code.
        avx2 = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
        hidden = ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
        cpu_libs.append(
            CppExtension(
                "pyformer._cpu_avx2",
                sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
                + [os.path.join("csrc", "cpu_lib", "export.cpp")],
                extra_compile_args={"cxx": cxx + avx2 + hidden + ["-DPYFORMER_CPU_KERNEL_LIB"]},
                extra_link_args=link,
            )
        )
    if not cuda:
        return [
            CppExtension(
                "pyformer._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
            )
        ] + cpu_libs
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    defs = ["-DPYFORMER_WITH_CUDA", f'-DPYFORMER_CUDA_ARCHS="{archs}"']
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + defs
    if "+cpu" in torch.__version__ or not os.path.exists(
        os.path.join(
            os.path.dirname(torch.__file__), "include", "c10", "cuda", "impl", "cuda_cmake_macros.h"
        )
    ):
        nvcc.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return [
        CUDAExtension(
            "pyformer._C",
            sources,
            extra_compile_args={"cxx": cxx + defs, "nvcc": nvcc},
            extra_link_args=link,
        )
    ] + cpu_libs


class PersistentBuildExtension(BuildExtension):
    """torch's BuildExtension, with the objects (and ninja's build files) in one folder of the
    source tree that outlives the install: build/temp.<platform>-<python>/<extension>/ (one per
    extension, as csrc/cpu/*.cpp is compiled into two of them with different flags)."""

    def build_extension(self, ext):
        tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        self.build_temp = os.path.join(ROOT, "build", f"temp.{tag}", ext.name)
        super().build_extension(ext)


setup(
    ext_modules=extensions(),
    cmdclass={
        "build_ext": PersistentBuildExtension.with_options(
            use_ninja=shutil.which("ninja") is not None
        )
    },
)
