"""The extension's build flags (one set for setup.py, the JIT build and the compile check) and the
op-registration helper shared by the extension's ops and the Triton ops."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flora_kernels.backends import oplib
from flora_kernels.backends.ext import flags

ROOT = Path(__file__).resolve().parents[3]
FLAGS_PY = ROOT / "flora_kernels" / "backends" / "ext" / "flags.py"


def test_default_archs_include_sm90_and_sm80():
    codes = flags.nvcc_flags(flags.parse_archs(None))
    assert "-gencode=arch=compute_90,code=sm_90" in codes and "-gencode=arch=compute_80,code=sm_80" in codes
    assert not any("code=compute_" in c for c in codes)  # no PTX unless asked


def test_arch_list_syntax():
    assert flags.parse_archs("8.0;9.0+PTX") == ("8.0", "9.0+PTX")
    assert flags.gencode(("9.0+PTX",)) == ["-gencode=arch=compute_90,code=sm_90",
                                          "-gencode=arch=compute_90,code=compute_90"]
    with pytest.raises(ValueError, match="expected"):
        flags.parse_archs("sm_90")


def test_sources_exist_and_cuda_adds_its_own():
    assert all((ROOT / s).is_file() for s in flags.sources(True))
    assert flags.sources(False) == list(flags.CPU_SOURCES)
    assert "-DFLORA_WITH_CUDA" in flags.cxx_flags(True) and "-DFLORA_WITH_CUDA" not in flags.cxx_flags(False)


def test_flags_file_runs_without_torch_or_the_package():
    """setup.py and check_cuda_compile.sh run flags.py by path: it must import neither torch nor flora_kernels."""
    code = ("import runpy, sys; runpy.run_path(sys.argv[1]); "
            "assert 'torch' not in sys.modules and 'flora_kernels' not in sys.modules")
    subprocess.run([sys.executable, "-I", "-c", code, str(FLAGS_PY)], check=True)
    out = subprocess.run([sys.executable, "-I", str(FLAGS_PY), "nvcc"], check=True, capture_output=True, text=True)
    assert out.stdout.split() == list(flags.NVCC_FLAGS)


def test_oplib_fake_rejects_a_bad_name():
    with pytest.raises(ValueError, match="expected"):
        oplib.fake("no_namespace")(lambda x: x)


def test_oplib_fake_of_a_library_op_waits_for_the_op():
    """A fake declared by name before its op exists is registered by register_pending."""
    name = "flora_test_oplib"

    @oplib.fake(f"{name}::twice")
    def _(x):
        return torch.empty_like(x)

    lib = torch.library.Library(name, "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: 2 * x, "CPU")
    oplib.register_pending(name)
    x = torch.randn(3)
    torch.testing.assert_close(torch.ops.flora_test_oplib.twice(x), 2 * x)
    torch.library.opcheck(torch.ops.flora_test_oplib.twice, (x,))
