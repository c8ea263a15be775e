"""The CUDA kernels of csrc/flora_cuda.cu run on the CPU through a host emulation of the CUDA
execution model (csrc/emu/), compared with the extension's CPU ops (themselves checked against
einsum in test_ext_ops.py). This checks the CUDA index math, shared-memory reductions and warp
shuffles where no GPU is available; it does not check timing or memory-model subtleties.

Slow (every block runs 256 OS threads): opt in with FLORA_TEST_CUDA_EMU=1. Needs the CUDA
toolkit headers and a C++20 compiler; skipped otherwise, and when the extension is not built.
"""

from __future__ import annotations

import ctypes
import math
import os

import pytest
import torch

from flora_kernels.backends.cuda import _CSRC, load_extension

_REASON = load_extension()
pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=f"extension not built: {_REASON}"),
    pytest.mark.skipif(not os.environ.get("FLORA_TEST_CUDA_EMU"), reason="slow host emulation; FLORA_TEST_CUDA_EMU=1"),
    pytest.mark.slow,
]

DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 4e-3, torch.bfloat16: 2e-2}
L, D = ctypes.c_long, ctypes.c_double


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_host_emu", _CSRC / "emu" / "build_host_emu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if mod.cuda_include() is None:
        pytest.skip("CUDA toolkit headers not found")
    return ctypes.CDLL(str(mod.build(tmp_path_factory.mktemp("cuda_emu"))))


def _p(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _close(name, a, b, tol):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(1.0, b.double().abs().max().item()), f"{name}: max error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dims", [(2, 3, 4, 3, 5), (1, 1, 1, 2, 300), (2, 30, 9, 2, 3)], ids=str)
def test_emulated_reconstruct(emu, dims, dtype):
    r0, r1, t, i0, i1 = dims
    ops, tol = torch.ops.flora, TOL[dtype]
    core, u0, u1 = torch.randn(r0, r1, t, dtype=dtype), torch.randn(i0, r0, dtype=dtype), torch.randn(i1, r1, dtype=dtype)
    for base in (None, torch.randn(i0, i1, t, dtype=torch.float16)):
        out = torch.empty(i0, i1, t, dtype=dtype if base is None else base.dtype)
        assert emu.h_reconstruct(DT[dtype], DT[out.dtype], _p(core), _p(u0), _p(u1), _p(base), _p(out), L(r0), L(r1),
                                 L(t), L(i0), L(i1), D(0.7)) == 0
        _close("reconstruct", out, ops.tucker_reconstruct(core, u0, u1, 0.7, base), max(tol, TOL[out.dtype]))
    g = torch.randn(i0, i1, t, dtype=dtype)
    grads = [torch.empty_like(core), torch.empty_like(u0), torch.empty_like(u1)]
    wq, wr = torch.empty(i0 * r1 * t), torch.empty(i1 * r0 * t)
    assert emu.h_reconstruct_backward(DT[dtype], _p(g), _p(core), _p(u0), _p(u1), *map(_p, grads), _p(wq), _p(wr),
                                      L(r0), L(r1), L(t), L(i0), L(i1), D(0.7)) == 0
    for name, a, b in zip(("dcore", "du0", "du1"), grads, ops.tucker_reconstruct_backward(g, core, u0, u1, 0.7)):
        _close(name, a, b, 4 * tol)


# (N, groups, C per group, rank, spatial, out per group)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 1, 7, 5, (), 4), (2, 3, 4, 2, (5,), 3), (1, 2, 5, 17, (3, 2), 2)], ids=str)
def test_emulated_adapter_kernels(emu, shape, dtype):
    n, g, c, r, sp, o = shape
    ops, tol, p, seed = torch.ops.flora, TOL[dtype], 0.3, 77
    R, P = n * g, math.prod(sp)
    x, u_in, u_out = torch.randn(n, g * c, *sp, dtype=dtype), torch.randn(c, r, dtype=dtype), torch.randn(g * o, r, dtype=dtype)
    z = torch.empty(n, g * r, *sp, dtype=dtype)  # shrink, as the CUDA binding launches it
    emu.h_mix(DT[dtype], _p(x), _p(u_in), L(g), L(0), L(1), L(r), _p(z), L(R), L(c), L(r), L(P), D(1.0), 0, D(p), L(seed), D(0), L(0))
    _close("shrink", z, ops.adapter_shrink(x, u_in, g, p, seed), tol)
    y = torch.randn(n, g * o, *sp, dtype=dtype)
    y_ref = y.clone()
    emu.h_mix(DT[dtype], _p(z), _p(u_out), L(g), L(o * r), L(r), L(1), _p(y), L(R), L(r), L(o), L(P), D(0.5), 1, D(0), L(0), D(0), L(0))
    ops.adapter_expand_(y_ref, z, u_out, g, 0.5)
    _close("expand_", y, y_ref, tol)
    dy, dz = torch.randn_like(y), torch.empty_like(z)
    emu.h_mix(DT[dtype], _p(dy), _p(u_out), L(g), L(o * r), L(1), L(r), _p(dz), L(R), L(o), L(r), L(P), D(0.5), 0, D(0), L(0), D(0), L(0))
    _close("expand_grad_input", dz, ops.adapter_expand_grad_input(dy, u_out, g, 0.5), tol)
    dx = torch.randn_like(x)
    dx_ref = dx.clone()
    emu.h_mix(DT[dtype], _p(dz), _p(u_in), L(g), L(0), L(r), L(1), _p(dx), L(R), L(r), L(c), L(P), D(1.0), 1, D(0), L(0), D(p), L(seed))
    ops.adapter_shrink_grad_input_(dx_ref, dz, u_in, g, p, seed)
    _close("shrink_grad_input_", dx, dx_ref, tol)
    for per_group, a, b, C, K, pp, alpha in [(False, x, dz, c, r, p, 1.0), (True, dy, z, o, r, 0.0, 0.5)]:
        out = torch.empty((g if per_group else 1) * C, K, dtype=dtype)
        assert emu.h_corr(DT[dtype], _p(a), _p(b), _p(out), L(R), L(C), L(K), L(P), L(g), int(per_group), D(alpha),
                          D(pp), L(seed)) == 0
        _close(f"factor_grad(per_group={per_group})", out, ops.adapter_factor_grad(a, b, g, per_group, alpha, pp, seed), 4 * tol)
    m = torch.empty_like(x)
    emu.h_mask(DT[dtype], _p(m), L(m.numel()), D(p), L(seed))
    assert torch.equal(m, ops.dropout_mask(x, p, seed))
