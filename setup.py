"""Builds pyformer and its extension pyformer._C with torch.utils.cpp_extension.

The C++ sources (csrc/*.cpp, csrc/host/*.cpp, csrc/cpu/*.cpp) are always built. The CUDA sources (csrc/cuda/*.cu)
are added when the installed torch was built with CUDA (torch.version.cuda) and nvcc is found.

Environment:
  PYFORMER_CUDA=0          force a CPU-only build (=1: fail if CUDA cannot be built)
  TORCH_CUDA_ARCH_LIST     CUDA architectures; default "8.0;9.0" when no GPU is visible
  PYFORMER_CPU_VEC         avx2 | none | auto (default: avx2 when this machine's CPU has AVX2+FMA)
  MAX_JOBS                 parallel compile jobs (ninja)

The objects are kept in build/temp.<platform>-<python>/ in the source tree, editable installs
included (pip's editable install would otherwise compile in a fresh temporary folder each time),
so a second install, or one after an edit, recompiles only what changed (ninja's incremental
build; without ninja every install compiles everything). Delete build/ to start from scratch.
"""

import glob
import os
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


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _cpu_vec() -> str:
    want = os.environ.get("PYFORMER_CPU_VEC", "auto").strip().lower()
    if want not in ("auto", "avx2", "none"):
        raise RuntimeError(f"PYFORMER_CPU_VEC must be auto, avx2 or none, got {want!r}")
    if want == "auto":
        return "avx2" if _cpu_has_avx2() else "none"
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
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", f'-DPYFORMER_CPU_VEC="{vec}"']
    link = ["-fopenmp"]
    if vec == "avx2":
        # at::vec's AVX2 specializations (the CPU kernels' Vectorized<float> is 8 wide). The
        # extension is built for the machine that builds it, like -march builds.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if not cuda:
        return [
            CppExtension(
                "pyformer._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
            )
        ]
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
    ]


class PersistentBuildExtension(BuildExtension):
    """torch's BuildExtension, with the objects (and ninja's build files) in one folder of the
    source tree that outlives the install: build/temp.<platform>-<python>/."""

    def finalize_options(self):
        super().finalize_options()
        tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        self.build_temp = os.path.join(ROOT, "build", f"temp.{tag}")


setup(
    ext_modules=extensions(),
    cmdclass={
        "build_ext": PersistentBuildExtension.with_options(
            use_ninja=shutil.which("ninja") is not None
        )
    },
)
