"""Build script: the pure-Python package plus the optional compiled extension ``flora_kernels._C``.

- The CPU extension (csrc/flora_ops.cpp: op schemas; csrc/flora_cpu.cpp: CPU kernels) is built
  by default with ``torch.utils.cpp_extension.CppExtension``.
- The CUDA sources (csrc/flora_cuda.cu + csrc/flora_cuda_binding.cpp) are added, as a CUDAExtension,
  only where the installed torch has CUDA and nvcc is found.
- Sources and flags come from flora_kernels/backends/ext/flags.py (loaded by path: no package
  import), which the JIT build uses too.
- ``FLORA_SKIP_EXT=1`` skips the extension entirely (the package then runs on the reference
  and Triton backends). ``FLORA_SKIP_CUDA=1`` builds the CPU extension only.
- ``TORCH_CUDA_ARCH_LIST`` (default: flags.DEFAULT_ARCHS, sm_80 and sm_90) sets the -gencode list;
  ``MAX_JOBS`` is read by torch's BuildExtension.

Install with ``pip install --no-build-isolation -e ".[dev]"`` after installing torch: the
extension builds against the torch already installed (torch is not in build-system.requires).
Every skip prints its reason.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_flags():
    spec = importlib.util.spec_from_file_location("flora_ext_flags", ROOT / "flora_kernels/backends/ext/flags.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FLAGS = _load_flags()


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

    with_cuda = False
    if _truthy("FLORA_SKIP_CUDA"):
        _say("FLORA_SKIP_CUDA is set: CPU extension only")
    elif torch.version.cuda is None:
        _say(f"torch {torch.__version__} has no CUDA: building the CPU extension only")
    elif CUDA_HOME is None or shutil.which("nvcc") is None and not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        _say("nvcc not found (CUDA_HOME unset and no nvcc on PATH): building the CPU extension only")
    else:
        with_cuda = True
    sources = FLAGS.sources(with_cuda)
    common = {"include_dirs": [str(ROOT / d) for d in FLAGS.INCLUDE_DIRS], "py_limited_api": False}
    if with_cuda:
        archs = FLAGS.parse_archs(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        _say(f"CUDA archs: {', '.join(archs)} (TORCH_CUDA_ARCH_LIST to change)")
        ext = CUDAExtension(
            "flora_kernels._C", sources,
            extra_compile_args={"cxx": FLAGS.cxx_flags(True), "nvcc": FLAGS.nvcc_flags(archs)},
            **common,
        )
    else:
        ext = CppExtension("flora_kernels._C", sources, extra_compile_args={"cxx": FLAGS.cxx_flags(False)}, **common)
    _say(f"building flora_kernels._C ({'CPU + CUDA' if with_cuda else 'CPU'}): {', '.join(sources)}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = get_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
