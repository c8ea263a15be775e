"""Micro-benchmarks of the Triton kernels at the benchmark shapes, on a CUDA GPU, in bf16.

    python -m tools.microbench [--out FILE.json] [--dry-run]

Each GEMM variant (tiled, persistent TMA, cuBLAS + addmm; ``gemm_ext(..., variant=...)``) is
timed against F.linear / torch.matmul of the same shape (the ratio that matters: gemm_ext
replaces cuBLAS), and every other kernel against its floor
max(FLOPs / peak, bytes / bandwidth) for the device (H100 / H200 figures, else H100's).
``--dry-run`` (no GPU needed) prints the cases with their FLOPs, bytes and floors only.
Times are medians of ``triton.testing.do_bench`` (warm-up 25 ms, 100 ms of repetitions).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: (bytes/s, bf16 dense FLOP/s) by device-name fragment; the first match wins.
DEVICE_PEAKS = {"H200": (4.3e12, 790e12), "H100": (3.0e12, 800e12)}
T, D_IN, D_OUT, R = 8192, 4096, 4096, 16
T_SMALL = 512  # the shrink's split-K regime (32 token blocks of 16 on 132 SMs without it)
CONV_N, CONV_C, CONV_HW, CONV_R = 64, 256, 56, 16
_B = 2  # bytes per bf16 element


@dataclass
class Case:
    name: str
    flops: float
    bytes: float
    baseline: str | None  # a torch case the kernel is compared with (GEMMs), else None: vs its floor
    make: Callable[[], Callable[[], object]]  # builds the inputs on the GPU, returns the timed call


def floor_us(c: Case, bw: float, peak: float) -> float:
    return max(c.flops / peak, c.bytes / bw) * 1e6


def cases() -> list[Case]:
    """The timed cases (inputs are built only when a case runs)."""
    import torch.nn.functional as F

    from flora_kernels.backends.triton import channel_gemm as cg
    from flora_kernels.backends.triton import linear as lin
    from flora_kernels.backends.triton.core_conv import core_conv
    from flora_kernels.backends.triton.linear import GEMM_VARIANTS  # below sm_90 "tma" runs the tiled kernel (warns)
    from flora_kernels.backends.triton.reconstruct import tucker2, tucker2_adjoint_op

    dev, dt = "cuda", torch.bfloat16

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dt)

    def linear_ref() -> Callable[[], object]:
        x, w, b = rnd(T, D_IN), rnd(D_OUT, D_IN), rnd(D_OUT)
        return lambda: F.linear(x, w, b)

    def matmul_dx() -> Callable[[], object]:
        dy, w = rnd(T, D_OUT), rnd(D_OUT, D_IN)
        return lambda: dy @ w

    def gemm_fwd(variant: str) -> Callable[[], Callable[[], object]]:
        def make() -> Callable[[], object]:
            x, w, b, s, u_out, core = rnd(T, D_IN), rnd(D_OUT, D_IN), rnd(D_OUT), rnd(T, R), rnd(D_OUT, R), rnd(R, R)
            return lambda: lin.gemm_ext(x, w.t(), s, u_out.t(), b, variant=variant, core=core.t(), scale=2.0)

        return make

    def gemm_dx(p: float, variant: str) -> Callable[[], Callable[[], object]]:
        def make() -> Callable[[], object]:
            dy, w, ds, u = rnd(T, D_OUT), rnd(D_OUT, D_IN), rnd(T, R), rnd(D_IN, R)
            bits = None
            if p > 0:
                bits = torch.empty((T, -(-D_IN // 32)), dtype=torch.int32, device=dev)
                lin.shrink(rnd(T, D_IN), u, p, 1, bits)
            return lambda: lin.gemm_ext(dy, w, ds, u.t(), None, p, bits, variant=variant)

        return make

    def shrink(p: float) -> Callable[[], Callable[[], object]]:
        def make() -> Callable[[], object]:
            x, u = rnd(T, D_IN), rnd(D_IN, R)
            bits = torch.empty((T, -(-D_IN // 32)), dtype=torch.int32, device=dev) if p > 0 else None
            return lambda: lin.shrink(x, u, p, 1, bits)

        return make

    def ds_db(dbias: bool) -> Callable[[], Callable[[], object]]:
        def make() -> Callable[[], object]:
            dy, s, u_out, core = rnd(T, D_OUT), rnd(T, R), rnd(D_OUT, R), rnd(R, R)
            return lambda: lin.ds_db(dy, s, u_out, core, 2.0, True, dt if dbias else None)

        return make

    def shrink_small_t() -> Callable[[], object]:
        x, u = rnd(T_SMALL, D_IN), rnd(D_IN, R)
        return lambda: lin.shrink(x, u, partials=True)

    def du_in() -> Callable[[], object]:
        x, ds = rnd(T, D_IN), rnd(T, R)
        return lambda: cg.reduce(x.t().unsqueeze(0), ds.t().unsqueeze(0), 1, True)

    def recon() -> Callable[[], object]:
        u0, k, u1, base = rnd(D_OUT, R), rnd(R, R, 1), rnd(D_IN, R), rnd(D_OUT, D_IN, 1)
        return lambda: tucker2(u0, k, u1, base, 0.5)

    def adjoint() -> Callable[[], object]:
        g, u0, k, u1 = rnd(D_OUT, D_IN, 1), rnd(D_OUT, R), rnd(R, R, 1), rnd(D_IN, R)
        return lambda: tucker2_adjoint_op(g, u0, k, u1, 0.5, True, True, True)

    cl = torch.channels_last
    x_conv = (CONV_N, CONV_C, CONV_HW, CONV_HW)

    def conv_project() -> Callable[[], object]:
        x, u = rnd(*x_conv).to(memory_format=cl), rnd(CONV_C, CONV_R)
        z = torch.empty((CONV_N, CONV_R, CONV_HW, CONV_HW), device=dev, dtype=dt, memory_format=cl)
        return lambda: cg.project(x, u, 1, z, True)

    def conv_core() -> Callable[[], object]:
        z, k = rnd(CONV_N, CONV_R, CONV_HW, CONV_HW).to(memory_format=cl), rnd(CONV_R, CONV_R, 3, 3)
        return lambda: core_conv(z, k, [1, 1], [1, 1, 1, 1], [1, 1], 1)

    def conv_expand() -> Callable[[], object]:
        u, w = rnd(CONV_N, CONV_R, CONV_HW, CONV_HW).to(memory_format=cl), rnd(CONV_C, CONV_R)
        base = rnd(*x_conv).to(memory_format=cl)
        return lambda: cg.expand(u, w, 1, torch.empty_like(base), base, False)

    x_b, w_b, y_b = T * D_IN * _B, D_OUT * D_IN * _B, T * D_OUT * _B
    bits_b = T * -(-D_IN // 32) * 4
    gemm_flops = 2 * T * D_OUT * (D_IN + R)
    l_conv = CONV_N * CONV_HW * CONV_HW
    act, small = l_conv * CONV_C * _B, l_conv * CONV_R * _B
    ds_db_part = (16 * T * R + 17 * D_OUT * (R + 1)) * 4 * 2  # fp32 partials written and summed (finish launch)
    return [
        Case("F.linear (base forward)", 2 * T * D_OUT * D_IN, x_b + w_b + y_b, None, linear_ref),
        Case("torch.matmul dy W (base dx)", 2 * T * D_OUT * D_IN, x_b + w_b + y_b, None, matmul_dx),
        *(Case(f"gemm_ext forward [{v}]", gemm_flops, x_b + w_b + y_b, "F.linear (base forward)", gemm_fwd(v))
          for v in GEMM_VARIANTS),
        *(Case(f"gemm_ext dx [{v}]", gemm_flops, x_b + w_b + y_b, "torch.matmul dy W (base dx)", gemm_dx(0.0, v))
          for v in GEMM_VARIANTS),
        *(Case(f"gemm_ext dx + dropout bits [{v}]", gemm_flops, x_b + w_b + y_b + bits_b, "torch.matmul dy W (base dx)",
               gemm_dx(0.1, v)) for v in GEMM_VARIANTS),
        Case("shrink S = x U_in", 2 * T * D_IN * R, x_b + T * R * _B, None, shrink(0.0)),
        Case("shrink + dropout (writes bits)", 2 * T * D_IN * R, x_b + T * R * _B + bits_b, None, shrink(0.1)),
        Case(f"shrink at T = {T_SMALL} (split-K partials)", 2 * T_SMALL * D_IN * R, T_SMALL * D_IN * _B, None,
             shrink_small_t),
        Case("ds_db + finish (dS, dU_out, dG)", 4 * T * D_OUT * R, y_b + ds_db_part, None, ds_db(False)),
        Case("ds_db + finish (dS, dU_out, dG, dbias)", 2 * T * D_OUT * (2 * R + 1), y_b + ds_db_part, None, ds_db(True)),
        Case("reduce dU_in", 2 * T * D_IN * R, x_b + T * R * _B, None, du_in),
        Case("reconstruct W + s dW", 2 * R * D_OUT * D_IN, 2 * w_b, None, recon),
        Case("reconstruct adjoint", 4 * R * D_OUT * D_IN, 2 * w_b, None, adjoint),
        Case("conv projection x -> z", 2 * l_conv * CONV_C * CONV_R, act + small, None, conv_project),
        Case("core conv 3x3 (16 -> 16)", 2 * l_conv * CONV_R * CONV_R * 9, 2 * small, None, conv_core),
        Case("conv_expand y_base + u U_out^T", 2 * l_conv * CONV_C * CONV_R, 2 * act + small, None, conv_expand),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON")
    ap.add_argument("--dry-run", action="store_true", help="list the cases and their floors; time nothing")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU: use --dry-run", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if not args.dry_run else "H100 (dry run)"
    bw, peak = next((v for k, v in DEVICE_PEAKS.items() if k in name), DEVICE_PEAKS["H100"])
    print(f"# {name}: floors at {bw / 1e12:.1f} TB/s, {peak / 1e12:.0f} TFLOP/s bf16")
    rows: list[dict] = []
    timed: dict[str, float] = {}
    for c in cases():
        row = {"name": c.name, "gflop": c.flops / 1e9, "mb": c.bytes / 1e6, "floor_us": floor_us(c, bw, peak)}
        if not args.dry_run:
            import triton.testing

            fn = c.make()
            fn()
            torch.cuda.synchronize()
            row["us"] = 1e3 * float(triton.testing.do_bench(fn, warmup=25, rep=100))
            timed[c.name] = row["us"]
            if c.baseline is not None:
                row["vs"] = c.baseline
                row["ratio_vs_baseline"] = row["us"] / timed[c.baseline]
            row["ratio_vs_floor"] = row["us"] / row["floor_us"]
            del fn
            torch.cuda.empty_cache()
        rows.append(row)
        measured = f"  {row['us']:9.1f} us  {row['ratio_vs_floor']:5.2f}x floor" if "us" in row else ""
        versus = f"  {row['ratio_vs_baseline']:5.2f}x {c.baseline}" if "ratio_vs_baseline" in row else ""
        print(f"{c.name:38s} {row['gflop']:8.2f} GFLOP {row['mb']:8.1f} MB  floor {row['floor_us']:7.1f} us"
              f"{measured}{versus}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
