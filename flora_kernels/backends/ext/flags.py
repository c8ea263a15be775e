"""The one set of build flags of the compiled extension, used by setup.py, the JIT build
(``build.py``) and csrc/check_cuda_compile.sh.

Pure Python, no torch and no package imports: setup.py loads this file by its path.
``python flags.py nvcc`` prints the nvcc flags (without -gencode), ``python flags.py archs`` the
default architectures as "80 90" (for the compile check).
"""

from __future__ import annotations

import sys

# Paths relative to the repository root.
# op schemas + module; CPU kernels
CPU_SOURCES = ("csrc/flora_ops.cpp", "csrc/flora_cpu.cpp", "csrc/flora_cpu_depthwise.cpp", "csrc/flora_cpu_fold.cpp",
               "csrc/flora_linear.cpp")
CUDA_SOURCES = ("csrc/flora_cuda.cu", "csrc/flora_cuda_binding.cpp")  # CUDA kernels; their torch binding
INCLUDE_DIRS = ("csrc",)
CXX_FLAGS = ("-O3", "-std=c++20")
CUDA_DEFINES = ("-DFLORA_WITH_CUDA",)  # host compiler, CUDA builds only
# The last four: what torch's BuildExtension / load() add to every nvcc command (no implicit
# half/bfloat16 conversions or operators); listed so the compile check builds the .cu as they do.
NVCC_FLAGS = ("-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")
# The kernels use mma.sync (sm_80+); 9.0 is the H100/H200 the benchmarks target.
DEFAULT_ARCHS = ("8.0", "9.0")


def parse_archs(spec: str | None) -> tuple[str, ...]:
    """'8.0;9.0+PTX' or '8.0 9.0' (TORCH_CUDA_ARCH_LIST's syntax) -> ('8.0', '9.0+PTX'); empty -> the default."""
    archs = tuple(a for a in (spec or "").replace(";", " ").split() if a)
    for a in archs:
        num = a.removesuffix("+PTX")
        major, dot, minor = num.partition(".")
        if not (dot and major.isdigit() and minor.isdigit()):
            raise ValueError(f"CUDA arch: expected e.g. '9.0' or '9.0+PTX', got {a!r}")
    return archs or DEFAULT_ARCHS


def gencode(archs: tuple[str, ...]) -> list[str]:
    """nvcc -gencode flags: SASS for each arch, plus PTX for those marked '+PTX'."""
    out = []
    for a in archs:
        num = a.removesuffix("+PTX").replace(".", "")
        out.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if a.endswith("+PTX"):
            out.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return out


def cxx_flags(with_cuda: bool) -> list[str]:
    return [*CXX_FLAGS, *(CUDA_DEFINES if with_cuda else ())]


def nvcc_flags(archs: tuple[str, ...]) -> list[str]:
    """The nvcc flags with the -gencode list (torch adds none of its own when these are given)."""
    return [*NVCC_FLAGS, *gencode(archs)]


def sources(with_cuda: bool) -> list[str]:
    return [*CPU_SOURCES, *(CUDA_SOURCES if with_cuda else ())]


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "nvcc":
        print(" ".join(NVCC_FLAGS))
    elif what == "archs":
        print(" ".join(a.replace(".", "") for a in DEFAULT_ARCHS))
    else:
        raise SystemExit(f"usage: python flags.py nvcc|archs (expected one of nvcc, archs, got {what!r})")
