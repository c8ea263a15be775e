"""Building and loading the compiled extension (``torch.ops.flora``).

``load_extension()`` imports ``flora_kernels._C`` (built by setup.py), which registers the ops;
where it is missing and a GPU is present (or ``FLORA_JIT=1``), it builds csrc/ just in time with
ninja (the CUDA sources too when torch has CUDA; the architectures from ``TORCH_CUDA_ARCH_LIST``,
else the current GPU's, e.g. 9.0 on an H100), with the flags of ``flags.py`` that setup.py uses.
Then it registers the ops' fakes (``ops.py``), so ``torch.compile`` traces them. It never
raises: a failure becomes the backends' ``unavailable_reason()``, logged once as a warning.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from .. import oplib
from . import flags
from .ops import OPS

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]
CSRC = ROOT / "csrc"
BUILD_HINT = (
    "build the extension: pip install --no-build-isolation -e . (torch first; FLORA_SKIP_EXT must be unset), "
    "or set FLORA_JIT=1 to compile csrc/ at first use (needs ninja and a C++ compiler; nvcc for CUDA)"
)


def _ops_registered() -> bool:
    try:
        return all(hasattr(torch.ops.flora, name) for name in OPS)
    except (AttributeError, RuntimeError):
        return False


def has_kernel(op: str, key: str) -> bool:
    """Whether ``flora::op`` has a kernel for dispatch key ``key`` (e.g. "CUDA")."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"flora::{op}", key))
    except RuntimeError:
        return False


def _jit_build() -> None:
    """Compile csrc/ with torch.utils.cpp_extension.load (ninja) and load it as a library."""
    from torch.utils.cpp_extension import load

    with_cuda = torch.version.cuda is not None and torch.cuda.is_available() and os.environ.get("FLORA_SKIP_CUDA") != "1"
    archs: tuple[str, ...] = ()
    if with_cuda:
        env = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not env:
            major, minor = torch.cuda.get_device_capability()
            env = f"{major}.{minor}"
        archs = flags.parse_archs(env)
    logger.warning("flora_kernels: compiling the C++%s extension just in time (once; cached)",
                   f"/CUDA ({', '.join(archs)})" if with_cuda else "")
    build_dir = os.environ.get("FLORA_JIT_BUILD_DIR") or None
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
    load(
        name="flora_kernels_jit" + ("_cuda" if with_cuda else "_cpu"),
        sources=[str(ROOT / s) for s in flags.sources(with_cuda)],
        extra_include_paths=[str(ROOT / d) for d in flags.INCLUDE_DIRS],
        extra_cflags=flags.cxx_flags(with_cuda),
        extra_cuda_cflags=flags.nvcc_flags(archs) if with_cuda else None,
        build_directory=build_dir,
        is_python_module=False,
        with_cuda=with_cuda,
        verbose=os.environ.get("FLORA_JIT_VERBOSE") == "1",
    )


_LOADED: list[str | None] = []  # [reason] once load_extension() ran (a plain global: torch.compile reads it)


@torch.compiler.assume_constant_result
def load_extension() -> str | None:
    """Make ``torch.ops.flora`` available; None on success, else why not (never raises, runs once).

    Under torch.compile the call runs eagerly at trace time and its result is a constant.
    """
    if not _LOADED:
        _LOADED.append(_load_extension())
    return _LOADED[0]


def build_extension(verbose: bool = False) -> str | None:
    """JIT-compile csrc/ now (the CUDA sources too where torch has CUDA and sees a GPU) and load it.

    For machines that got the source tree without a built extension (e.g. the GPU machine of
    bench/device_check.sh). Returns None on success, else why not; the build is cached by torch.
    """
    os.environ["FLORA_JIT"] = "1"
    if verbose:
        os.environ["FLORA_JIT_VERBOSE"] = "1"
    _LOADED.clear()
    return load_extension()


def _load_extension() -> str | None:
    reason = None
    if not _ops_registered():
        try:
            import flora_kernels._C  # noqa: F401  (registers torch.ops.flora)
        except (ImportError, OSError) as e:  # missing, or built against another torch
            reason = f"the compiled extension flora_kernels._C is not built ({e})"
    if not _ops_registered():
        jit = os.environ.get("FLORA_JIT", "")
        want_jit = jit == "1" or (jit != "0" and torch.cuda.is_available())
        if want_jit and (CSRC / "flora_ops.cpp").exists() and shutil.which("ninja"):
            try:
                _jit_build()
                reason = None
            except Exception as e:  # noqa: BLE001 - a failed build makes the backend unavailable
                reason = f"{reason or 'extension not built'}; the JIT build failed: {type(e).__name__}: {e}"
    if not _ops_registered():
        reason = reason or "the flora ops are not registered"
        logger.warning("flora_kernels: C++/CUDA extension unavailable (%s); using the other backends", reason)
        return reason
    oplib.register_pending("flora")
    return None


@torch.compiler.assume_constant_result
def cuda_reason() -> str | None:
    """Why the CUDA kernels cannot run here (None if they can); a trace-time constant under compile."""
    reason = load_extension()
    if reason is not None:
        return reason
    if not has_kernel("adapter_shrink", "CUDA"):
        return "the extension was built without CUDA (torch without CUDA or nvcc not found at build time)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return None
