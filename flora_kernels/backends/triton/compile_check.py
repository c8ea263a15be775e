"""Compile every Triton kernel of this backend for a CUDA target, without a GPU.

    python -m flora_kernels.backends.triton.compile_check [--arch 90] [--dtypes bf16 fp16 fp32]

The CPU interpreter accepts programs that the GPU compiler rejects (dot shapes, mixed-type
loops, dtype mismatches); this runs the real front end, the TTGIR passes and ptxas (bundled with
triton) for each kernel at representative block sizes, so a GPU-less machine catches them.
TRITON_INTERPRET must be unset (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

_SCALARS_FP32 = {"scale", "p"}


def _cases() -> list[tuple[str, Any, dict[str, Any]]]:
    from . import channel_gemm as cg
    from . import core_conv as cc
    from . import linear as lin
    from . import reconstruct as rec

    return [
        ("tucker2_fwd", rec._tucker2_fwd_kernel, {"HAS_BASE": True, "R0P": 16, "R1P": 32, "BM": 128, "BN": 64}),
        ("tucker2_adj_rows", rec._tucker2_adj_rows_kernel,
         {"NEED_DU0": True, "NEED_DK": True, "R0P": 16, "R1P": 16, "BM": 64, "BN": 64}),
        ("tucker2_adj_cols", rec._tucker2_adj_cols_kernel, {"R0P": 16, "R1P": 16, "BM": 64, "BN": 64}),
        ("project", cg._project_kernel, {"DROPOUT": True, "RP": 16, "BL": 64, "BC": 64}),
        ("expand", cg._expand_kernel, {"HAS_BASE": True, "DROPOUT": True, "RP": 16, "BL": 64, "BO": 64}),
        ("reduce_shared", cg._reduce_kernel, {"SHARED": True, "DROPOUT": True, "RP": 16, "BL": 64, "BC": 64}),
        ("reduce_per_channel", cg._reduce_kernel, {"SHARED": False, "DROPOUT": False, "RP": 32, "BL": 64, "BC": 64}),
        ("gemm_ext", lin._gemm_ext_kernel,
         {"HAS_BIAS": True, "DROPOUT": True, "RP": 16, "BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}),
        ("core_conv_fwd", cc._core_conv_fwd_kernel, {"RIP": 16, "ROP": 16, "BL": 64}),
        ("core_conv_dz", cc._core_conv_dz_kernel, {"RIP": 16, "ROP": 16, "BL": 64}),
        ("core_conv_dk", cc._core_conv_dk_kernel, {"RIP": 16, "ROP": 16, "BL": 64}),
    ]


def compile_kernel(kernel: Any, dtype: str, constexprs: dict[str, Any], arch: int) -> None:
    """Compile one @triton.jit (or autotuned) kernel: pointers in ``dtype`` (fp32 for partial sums),
    ints as i32, ``scale``/``p`` as fp32, the given constexprs (PREC added from the dtype)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    const = {"PREC": "ieee" if dtype == "fp32" else "tf32", **constexprs}
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if "part" in name else f"*{dtype}"
        else:
            sig[name] = "fp32" if name in _SCALARS_FP32 else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    triton.compile(src, target=GPUTarget("cuda", arch, 32))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    failed = 0
    for dtype in args.dtypes:
        for name, kernel, const in _cases():
            t0 = time.perf_counter()
            try:
                compile_kernel(kernel, dtype, const, args.arch)
                print(f"ok    sm_{args.arch} {dtype:5s} {name} ({time.perf_counter() - t0:.1f}s)", flush=True)
            except Exception as e:  # noqa: BLE001 - report every kernel, fail at the end
                failed += 1
                print(f"FAIL  sm_{args.arch} {dtype:5s} {name}: {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
