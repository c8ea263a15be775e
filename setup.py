"""Build script: the pure-Python package plus the optional compiled extension ``flora_kernels._C``.

- The CPU extension (csrc/flora_cpu.cpp: op schemas + CPU kernels) is built by default with
  ``torch.utils.cpp_extension.CppExtension``.
- The CUDA sources (csrc/*.cu + csrc/flora_cuda_binding.cpp) are added, as a CUDAExtension,
  only where the installed torch has CUDA and nvcc is found.
- ``FLORA_SKIP_EXT=1`` skips the extension entirely (the package then runs on the reference
  and Triton backends). ``FLORA_SKIP_CUDA=1`` builds the CPU extension only.
- ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` are honoured (read by torch's BuildExtension).

Install with ``pip install --no-build-isolation -e ".[dev]"`` after installing torch: the
extension builds against the torch already installed (torch is not in build-system.requires).
Every skip prints its reason.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _say(msg: str) -> None:
    print(f"flora_kernels setup: {msg}", file=sys.stderr)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def get_extensions() -> tuple[list, dict]:
    if _truthy("FLORA_SKIP_EXT"):
        _say("FLORA_SKIP_EXT is set: not building the C++/CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        _say(f"torch is not importable ({e}): not building the extension; install torch first and "
             "use pip install --no-build-isolation")
        return [], {}

    cxx = ["-O3", "-std=c++20"]
    sources = [str(p.relative_to(ROOT)) for p in [CSRC / "flora_cpu.cpp", CSRC / "flora_cpu_depthwise.cpp"]]
    with_cuda = False
    if _truthy("FLORA_SKIP_CUDA"):
        _say("FLORA_SKIP_CUDA is set: CPU extension only")
    elif torch.version.cuda is None:
        _say(f"torch {torch.__version__} has no CUDA: building the CPU extension only")
    elif CUDA_HOME is None or shutil.which("nvcc") is None and not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        _say("nvcc not found (CUDA_HOME unset and no nvcc on PATH): building the CPU extension only")
    else:
        with_cuda = True
        sources += ["csrc/flora_cuda.cu", "csrc/flora_cuda_binding.cpp"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            _say("TORCH_CUDA_ARCH_LIST unset: torch picks the visible GPUs' archs (set e.g. '8.0;9.0')")
    common = {"include_dirs": [str(CSRC)], "py_limited_api": False}
    if with_cuda:
        ext = CUDAExtension(
            "flora_kernels._C", sources,
            extra_compile_args={"cxx": cxx + ["-DFLORA_WITH_CUDA"],
                                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            **common,
        )
    else:
        ext = CppExtension("flora_kernels._C", sources, extra_compile_args={"cxx": cxx}, **common)
    _say(f"building flora_kernels._C ({'CPU + CUDA' if with_cuda else 'CPU'}): {', '.join(sources)}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = get_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
