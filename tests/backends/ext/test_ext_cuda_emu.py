"""The CUDA kernels of csrc/flora_cuda.cu run on the CPU through a host emulation of the CUDA
execution model (csrc/emu/), compared with the extension's CPU ops (themselves checked against
einsum in test_ext_ops.py). This checks the kernels' index math (the separable index maps and
their magic-number division, 16-byte and scalar load/store paths, tile edges, split-k partials),
shared-memory staging, the mma.sync fragment layout (emulated lane by lane) and fused dropout
where no GPU is available; it does not check timing or memory-model subtleties.

Slow (every block runs 128 OS threads): opt in with FLORA_TEST_CUDA_EMU=1. Needs the CUDA
toolkit headers and a C++20 compiler; skipped otherwise, and when the extension is not built.
"""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from flora_kernels.backends.ext import load_extension
from flora_kernels.backends.ext.build import CSRC

_REASON = load_extension()
pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=f"extension not built: {_REASON}"),
    pytest.mark.skipif(not os.environ.get("FLORA_TEST_CUDA_EMU"), reason="slow host emulation; FLORA_TEST_CUDA_EMU=1"),
    pytest.mark.slow,
]

DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 4e-3, torch.bfloat16: 2e-2}
L, D = ctypes.c_long, ctypes.c_double
# bf16/fp16 run the mma.sync path, fp32/fp64 the CUDA-core path.
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_host_emu", CSRC / "emu" / "build_host_emu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if mod.cuda_include() is None:
        pytest.skip("CUDA toolkit headers not found")
    lib = ctypes.CDLL(str(mod.build(tmp_path_factory.mktemp("cuda_emu"))))
    lib.h_reconstruct_ws.restype = ctypes.c_long
    lib.h_corr_ws.restype = ctypes.c_long
    lib.h_reconstruct_backward_ws.restype = ctypes.c_long
    lib.h_linear_grad_ws.restype = ctypes.c_long
    return lib


def _p(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _act(t: torch.Tensor, groups: int):
    """(n, groups, c, p, sn, sg, sc, sp) of t read in place, as the CUDA binding passes it."""
    p, sp = 1, 0
    for d in range(t.dim() - 1, 1, -1):
        if t.shape[d] == 1:
            continue
        if p == 1:
            sp = t.stride(d)
        else:
            assert t.stride(d) == sp * p, "spatial dims must collapse (the binding copies otherwise)"
        p *= t.shape[d]
    c = t.shape[1] // groups
    return (ctypes.c_long * 8)(t.shape[0], groups, c, p, t.stride(0), c * t.stride(1), t.stride(1), sp)


def _close(name, a, b, tol):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(1.0, b.double().abs().max().item()), f"{name}: max error {err:.3g}"


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t with its channel dim innermost in memory (channels_last, any rank), or t itself."""
    if not channels_last or t.dim() < 3:
        return t
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def test_fastdiv_matches_integer_division(emu):
    gen = torch.Generator().manual_seed(0)
    xs = torch.cat([torch.arange(0, 4096), torch.randint(0, 2**31 - 1, (4096,), generator=gen),
                    torch.tensor([2**31 - 1, 2**31 - 2, 2**30, 2**30 - 1])]).to(torch.int64)
    divisors = list(range(1, 300)) + [1000, 3136, 4095, 4096, 4097, 65535, 2**20 + 7, 2**30 - 1, 2**30, 2**31 - 1]
    x32 = xs.to(torch.int32)  # all < 2^31: same bits as uint32
    q = torch.empty_like(x32)
    for d in divisors:
        emu.h_fastdiv(L(d), _p(x32), _p(q), L(x32.numel()))
        assert torch.equal(q.to(torch.int64), xs // d), f"divisor {d}"


# (r0, r1, taps, I0, I1): tiny; a Linear-like tile edge (I0 > 64, I1 > 32, r not a multiple of 8);
# conv taps (T = 9, strided runs: scalar path); 16-byte path (I1 and r multiples of 8).
# I0 = 600: dcore's reduction over I0 split into partials (and Rm's at T = 1); I1 = 530: Q's.
RECON = [(2, 3, 1, 4, 5), (5, 7, 1, 70, 37), (3, 4, 9, 10, 6), (16, 8, 1, 40, 64), (4, 3, 2, 600, 9),
         (3, 5, 1, 600, 530)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", RECON, ids=str)
def test_emulated_reconstruct(emu, dims, dtype):
    r0, r1, t, i0, i1 = dims
    ops, tol = torch.ops.flora, TOL[dtype]
    core, u0, u1 = torch.randn(r0, r1, t, dtype=dtype), torch.randn(i0, r0, dtype=dtype), torch.randn(i1, r1, dtype=dtype)
    ws = torch.empty(emu.h_reconstruct_ws(DT[dtype], L(r0), L(r1), L(t), L(i0)), dtype=torch.uint8)
    bases = (None, torch.randn(i0, i1, t, dtype=torch.float16), torch.randn(i0, i1, t, dtype=dtype))
    for base in bases if i0 * i1 < 10**5 else bases[2:]:  # the big case (for the backward's splits): one base
        out = torch.empty(i0, i1, t, dtype=dtype if base is None else base.dtype)
        assert emu.h_reconstruct(DT[dtype], DT[out.dtype], _p(core), _p(u0), _p(u1), _p(base), _p(out), _p(ws),
                                 L(r0), L(r1), L(t), L(i0), L(i1), D(0.7)) == 0
        _close("reconstruct", out, ops.tucker_reconstruct(core, u0, u1, 0.7, base), max(tol, TOL[out.dtype]))
    g = torch.randn(i0, i1, t, dtype=dtype)
    grads = [torch.empty_like(core), torch.empty_like(u0), torch.empty_like(u1)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    wq, wr = torch.empty(i0 * r1 * t, dtype=acc), torch.empty(i1 * r0 * t, dtype=acc)
    wc = torch.empty(emu.h_reconstruct_backward_ws(DT[dtype], L(r0), L(r1), L(t), L(i0), L(i1)), dtype=torch.uint8)
    assert (wc.numel() > 0) == (max(i0, i1 if t == 1 else 0) >= 512)  # long reductions are split
    assert emu.h_reconstruct_backward(DT[dtype], _p(g), _p(core), _p(u0), _p(u1), *map(_p, grads), _p(wq), _p(wr),
                                      _p(wc) if wc.numel() else ctypes.c_void_p(0), L(r0), L(r1), L(t), L(i0),
                                      L(i1), D(0.7)) == 0
    for name, a, b in zip(("dcore", "du0", "du1"), grads, ops.tucker_reconstruct_backward(g, core, u0, u1, 0.7)):
        _close(name, a, b, 4 * tol)


# (N, groups, C per group, rank, spatial, out per group, channels_last): Linear (P = 1) with odd
# and 16-byte-aligned channel counts; grouped conv1d/2d with P a multiple of 8 (row runs) and odd
# P (scalar); channels_last inputs and outputs read and written in place (odd sizes with groups,
# a 3-D conv with 16-byte runs along the channels).
ADAPTER = [
    (70, 1, 40, 5, (), 37, False),
    (9, 1, 7, 17, (), 4, False),
    (2, 3, 4, 2, (5,), 3, False),
    (2, 2, 9, 8, (4, 4), 5, False),
    (2, 2, 16, 3, (3, 5), 2, True),
    (1, 1, 33, 16, (8, 9), 40, True),
    (3, 2, 5, 3, (3, 7), 6, True),
    (2, 1, 24, 8, (2, 3, 4), 16, True),
    (300, 1, 600, 5, (), 9, False),  # shrink / dS with a long reduction: split over k
]


# Outputs contiguous for every case, and in the input's channels_last layout where it has one.
ADAPTER_OUT = [(s, False) for s in ADAPTER] + [(s, True) for s in ADAPTER if s[-1]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,out_cl", ADAPTER_OUT, ids=lambda v: str(v) if isinstance(v, tuple) else f"out_cl={v}")
def test_emulated_adapter_kernels(emu, shape, dtype, out_cl):
    """Every mix launch of the binding, with its output contiguous or in the input's layout (the
    binding's choice for new tensors, and what an in-place y or dx of cuDNN's has)."""
    n, g, c, r, sp, o, cl = shape
    ops, tol, p, seed = torch.ops.flora, TOL[dtype], 0.3, 77
    x = _layout(torch.randn(n, g * c, *sp, dtype=dtype), cl)

    def new(*shape):  # an output of the launch, in the layout under test
        return _layout(torch.empty(*shape, dtype=dtype), out_cl)

    def mix(inp, w, w_gs, ws_o, ws_c, out, bias, alpha, acc, pin, sin, pout, sout, wsb):
        return emu.h_mix(DT[dtype], _p(inp), _act(inp, g), _p(w), L(w_gs), L(ws_o), L(ws_c), _p(out), _act(out, g),
                         _p(bias), D(alpha), acc, D(pin), L(sin), D(pout), L(sout), ctypes.byref(wsb))

    u_in, u_out = torch.randn(c, r, dtype=dtype), torch.randn(g * o, r, dtype=dtype)
    z = new(n, g * r, *sp)  # shrink, as the CUDA binding launches it
    wsb = ctypes.c_long(0)  # the split-k workspace the launch needed
    assert mix(x, u_in, 0, 1, r, z, None, 1.0, 0, p, seed, 0, 0, wsb) == 0
    _close("shrink", z, ops.adapter_shrink(x.contiguous(), u_in, g, p, seed), tol)
    assert (wsb.value > 0) == (not sp and g == 1 and c >= 512)
    zl = _layout(z.contiguous(), cl)
    y = _layout(torch.randn(n, g * o, *sp, dtype=dtype), out_cl)
    y_ref = y.contiguous()
    assert mix(zl, u_out, o * r, r, 1, y, None, 0.5, 1, 0, 0, 0, 0, wsb) == 0
    ops.adapter_expand_(y_ref, z.contiguous(), u_out, g, 0.5)
    _close("expand_", y, y_ref, tol)
    bias, y_new = torch.randn(g * o, dtype=dtype), new(*y.shape)  # y = bias + s U_out z (no read of y)
    assert mix(zl, u_out, o * r, r, 1, y_new, bias, 0.5, 0, 0, 0, 0, 0, wsb) == 0
    _close("expand(bias)", y_new, ops.adapter_expand(z.contiguous(), u_out, g, 0.5, bias), tol)
    dy = _layout(torch.randn(y.shape, dtype=dtype), cl)
    dz = new(*z.shape)
    assert mix(dy, u_out, o * r, 1, r, dz, None, 0.5, 0, 0, 0, 0, 0, wsb) == 0
    _close("expand_grad_input", dz, ops.adapter_expand_grad_input(dy.contiguous(), u_out, g, 0.5), tol)
    dx = _layout(torch.randn(x.shape, dtype=dtype), out_cl)
    dx_ref = dx.contiguous()
    dzl = _layout(dz.contiguous(), cl)
    # dx += mask * (U_in . dz): the output mask indexes dx's logical elements, whatever its strides
    assert mix(dzl, u_in, 0, r, 1, dx, None, 1.0, 1, 0, 0, p, seed, wsb) == 0
    ops.adapter_shrink_grad_input_(dx_ref, dz.contiguous(), u_in, g, p, seed)
    _close("shrink_grad_input_", dx, dx_ref, tol)


# Token reductions: (N, groups, C, K, spatial, channels_last); the larger ones split over tokens.
CORR = [(3, 1, 7, 5, (), False), (600, 1, 40, 16, (), False), (4, 3, 5, 2, (7,), False), (8, 2, 9, 16, (8, 8), True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CORR, ids=str)
def test_emulated_factor_grad(emu, shape, dtype):
    n, g, c, k, sp, cl = shape
    ops, tol, seed = torch.ops.flora, TOL[dtype], 5
    a = _layout(torch.randn(n, g * c, *sp, dtype=dtype), cl)
    b = _layout(torch.randn(n, g * k, *sp, dtype=dtype), cl)
    for per_group, p, alpha in [(False, 0.3, 1.0), (True, 0.0, 0.5), (True, 0.2, 1.5)]:
        av, bv = _act(a, g), _act(b, g)
        ws = torch.empty(emu.h_corr_ws(DT[dtype], av, bv, int(per_group)), dtype=torch.uint8)
        out = torch.empty((g if per_group else 1) * c, k, dtype=dtype)
        assert emu.h_corr(DT[dtype], _p(a), av, _p(b), bv, _p(out), int(per_group), D(alpha), D(p), L(seed),
                          _p(ws) if ws.numel() else ctypes.c_void_p(0)) == 0
        ref = ops.adapter_factor_grad(a.contiguous(), b.contiguous(), g, per_group, alpha, p, seed)
        _close(f"factor_grad(per_group={per_group}, p={p})", out, ref, 4 * tol)


def test_emulated_token_reduction_splits(emu):
    """The Linear-sized token reduction takes the split-k path (partials + reduce kernel)."""
    a, b = _act(torch.empty(600, 40), 1), _act(torch.empty(600, 16), 1)
    assert emu.h_corr_ws(DT[torch.float32], a, b, 0) > 0
    assert emu.h_corr_ws(DT[torch.float32], _act(torch.empty(3, 7), 1), _act(torch.empty(3, 5), 1), 0) == 0


# (tokens, out features, rank, chunk rows): one chunk; several chunks (the last one short), each split.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(70, 40, 16, 0), (1100, 24, 5, 520)], ids=str)
def test_emulated_linear_grad(emu, dims, dtype):
    m, o, r, chunk = dims
    dy, s, b = torch.randn(m, o, dtype=dtype), torch.randn(m, r, dtype=dtype), torch.randn(o, r, dtype=dtype)
    ds, db = torch.empty(m, r, dtype=dtype), torch.empty(o, r, dtype=dtype)
    ws = torch.empty(emu.h_linear_grad_ws(DT[dtype], L(m), L(o), L(r), L(chunk)), dtype=torch.uint8)
    assert (ws.numel() > 0) == (chunk > 0)
    assert emu.h_linear_grad(DT[dtype], _p(dy), _p(s), _p(b), _p(ds), _p(db), L(m), L(o), L(r), L(chunk),
                             _p(ws) if ws.numel() else ctypes.c_void_p(0)) == 0
    ds_ref, db_ref = torch.ops.flora.adapter_linear_grad(dy, s, b)
    _close("ds", ds, ds_ref, TOL[dtype])
    _close("db", db, db_ref, 4 * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 37, 1030])
def test_emulated_dropout_mask(emu, dtype, numel):
    x = torch.randn(numel, dtype=dtype)
    m = torch.empty_like(x)
    assert emu.h_mask(DT[dtype], _p(m), L(numel), D(0.3), L(11)) == 0
    assert torch.equal(m, torch.ops.flora.dropout_mask(x, 0.3, 11))


# The fused core conv + expansion (conv_mix_kernel): (N, C_in, C_out, spatial, kernel, stride, pads (lo, hi)
# per dim, dilation, r_in, r_out, channels_last). Tile edges (rows past 64, C_out past 32), odd channel
# counts and ranks (scalar gather), ranks of 8 / 16 with channels_last (16-byte runs), stride 2,
# dilation 2, asymmetric pads, 1-D (also channel-minor).
CONV_MIX = [
    (2, 13, 19, (7, 7), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 3, 8, False),
    (2, 24, 40, (9, 9), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), 8, 16, True),
    (2, 13, 19, (9, 7), (3, 2), (2, 1), ((0, 2), (1, 0)), (2, 1), 16, 3, True),
    (1, 40, 24, (9, 9), (2, 3), (1, 2), ((1, 0), (2, 2)), (2, 2), 16, 32, False),
    (2, 6, 9, (11,), (4,), (2,), ((2, 1),), (2,), 5, 16, False),
    (2, 16, 8, (13,), (3,), (1,), ((1, 1),), (1,), 8, 8, True),
]


def _act4(t):
    if t.dim() == 3:
        return (L * 5)(t.shape[1], t.stride(0), t.stride(1), 0, t.stride(2))
    return (L * 5)(t.shape[1], *t.stride())


def _conv_shape(n, sp, out, ks, stride, pads, dil):
    if len(sp) == 1:
        return (L * 13)(n, 1, sp[0], 1, out[0], 1, ks[0], 1, stride[0], 1, dil[0], 0, pads[0][0])
    return (L * 13)(n, *sp, *out, *ks, *stride, *dil, pads[0][0], pads[1][0])


def _conv_ref(z, k, stride, pads, dil):
    zp = torch.nn.functional.pad(z, [p for lo_hi in reversed(pads) for p in lo_hi])
    return (torch.nn.functional.conv1d if z.dim() == 3 else torch.nn.functional.conv2d)(zp, k, None, stride, 0, dil)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV_MIX, ids=str)
def test_emulated_conv_mix(emu, case, dtype):
    """u = conv(z, k) and y += s U_out . u (forward); dz = the transposed conv of du and dx += mask *
    (U_in . dz) (backward), against F.conv in fp64 and the expansion of the kernel's own rounded u / dz."""
    n, ci, co, sp, ks, stride, pads, dil, ri, ro, cl = case
    tol, p, seed = TOL[dtype], 0.3, 21
    z = _layout(torch.randn(n, ri, *sp, dtype=dtype), cl)
    k = torch.randn(ro, ri, *ks, dtype=dtype) / (ri * len(ks)) ** 0.5
    u_out, u_in = torch.randn(co, ro, dtype=dtype), torch.randn(ci, ri, dtype=dtype)
    u_ref = _conv_ref(z.double(), k.double(), stride, pads, dil)
    out = tuple(u_ref.shape[2:])
    shape = _conv_shape(n, sp, out, ks, stride, pads, dil)
    u = _layout(torch.empty(n, ro, *out, dtype=dtype), cl)
    y0 = _layout(torch.randn(n, co, *out, dtype=dtype), cl)
    y = y0.clone()
    perm = (0, *range(2, k.dim()), 1)
    assert emu.h_conv_mix(DT[dtype], 0, shape, _p(z), _act4(z), _p(k.permute(perm).contiguous()), _p(u), _act(u, 1),
                          _p(u_out), _p(y), _act(y, 1), D(0.7), D(0), L(0)) == 0
    _close("u", u, u_ref, tol)
    _close("y", y, y0.double() + 0.7 * torch.einsum("or,nr...->no...", u_out.double(), u.double()), tol)
    du = _layout(torch.randn(u.shape, dtype=dtype), cl)
    zz = z.double().requires_grad_(True)
    (_conv_ref(zz, k.double(), stride, pads, dil) * du.double()).sum().backward()
    dz = _layout(torch.empty(z.shape, dtype=dtype), cl)
    dx0 = _layout(torch.randn(n, ci, *sp, dtype=dtype), cl)
    dx = dx0.clone()
    perm_t = (1, *range(2, k.dim()), 0)
    assert emu.h_conv_mix(DT[dtype], 1, shape, _p(du), _act4(du), _p(k.permute(perm_t).contiguous()), _p(dz),
                          _act(dz, 1), _p(u_in), _p(dx), _act(dx, 1), D(1.0), D(p), L(seed)) == 0
    _close("dz", dz, zz.grad, tol)
    mask = torch.ops.flora.dropout_mask(dx0.contiguous(), p, seed).double()
    _close("dx", dx, dx0.double() + mask * torch.einsum("cr,nr...->nc...", u_in.double(), dz.double()), tol)
