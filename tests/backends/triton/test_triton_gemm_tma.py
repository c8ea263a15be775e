"""The persistent TMA GEMM (gemm_tma) and the gemm_ext variants (tiled / tma / cublas) vs an fp64
oracle: both operand layouts, bias, the dropout bits, a persistent grid with fewer programs than
tiles, the full Linear (output and every gradient) on the TMA kernel, the fallback of operands
TMA cannot address, and the measured choice."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import DEVICE, DTYPE_IDS, DTYPES, assert_bounded, compare, needs_triton
from torch.library import opcheck

import flora_kernels as fk
from flora_kernels import reference as ref

pytestmark = [needs_triton, pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]
ON_CUDA = DEVICE == "cuda"
needs_tma = pytest.mark.skipif(ON_CUDA and torch.cuda.get_device_capability()[0] < 9, reason="TMA needs sm_90+")


def _mods():
    from flora_kernels.backends.triton import gemm_tma as G
    from flora_kernels.backends.triton import linear as L

    return L, G


def _unpack(bits: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return ((bits[:, :, None] >> shifts) & 1).flatten(1)[:, :n] != 0


def _operands(m, k, n, r, dtype, kmajor, bias, p):
    """fp64 masters of a (M, K), b (K, N) (a view of W (N, K) when kmajor, else contiguous),
    a2 (M, R), b2 (R, N) as a view of (N, R), bias (N,), random bits (M, ceil(N / 32))."""
    a = torch.randn(m, k, device=DEVICE, dtype=torch.float64)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.float64) / k**0.5
    a2 = torch.randn(m, r, device=DEVICE, dtype=torch.float64)
    b2 = torch.randn(n, r, device=DEVICE, dtype=torch.float64)
    bvec = torch.randn(n, device=DEVICE, dtype=torch.float64) if bias else None
    bits = torch.randint(-(2**31), 2**31 - 1, (m, -(-n // 32)), dtype=torch.int32, device=DEVICE) if p > 0 else None

    def cast(dt):
        b = w.to(dt).t() if kmajor else w.t().contiguous().to(dt)
        return a.to(dt), b, a2.to(dt), b2.to(dt).t(), None if bvec is None else bvec.to(dt)

    def oracle(dt):
        a_, b_, a2_, b2_, bias_ = cast(dt)
        rank = a2_ @ b2_
        if p > 0:
            rank = torch.where(_unpack(bits, n), rank / (1 - p), torch.zeros_like(rank))
        y = a_ @ b_ + rank
        return y + bias_ if bias_ is not None else y

    return cast(dtype), bits, oracle


# (M, K, N, R): tails in every dimension (32-tiles under the interpreter), more tiles than programs
SHAPES = [(37, 40, 56, 3), (70, 72, 24, 5), (9, 24, 40, 16)]


@needs_tma
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kmajor", [True, False], ids=["b-kmajor", "b-nmajor"])
@pytest.mark.parametrize(("bias", "p"), [(True, 0.0), (False, 0.0), (False, 0.4), (True, 0.3)],
                         ids=["bias", "nobias", "dropout", "bias-dropout"])
@pytest.mark.parametrize("shape", SHAPES, ids=["37x40x56-r3", "70x72x24-r5", "9x24x40-r16"])
def test_gemm_tma_matches_oracle(shape, bias, p, kmajor, dtype):
    """y = a b + mask / (1 - p) * (a2 b2) + bias from the persistent kernel with 2 programs (and
    the default grid), both B layouts, against fp64, bounded by torch's own error in dtype."""
    L, G = _mods()
    m, k, n, r = shape
    (a, b, a2, b2, bvec), bits, oracle = _operands(m, k, n, r, dtype, kmajor, bias, p)
    assert G.unsupported_reason(a, b, n) is None
    hi, lo = oracle(torch.float64), oracle(dtype)
    for programs in (2, None):
        y = G.gemm_tma(a, b, a2, b2, bvec, p, bits, L.token_bucket(m), L.rank_pad(r), L.dot_precision(dtype), programs)
        assert y.dtype == dtype
        assert_bounded(y, lo, hi, dtype, f"gemm_tma programs={programs}")


@pytest.mark.parametrize("variant", ["tiled", "tma", "cublas"])
@pytest.mark.parametrize("p", [0.0, 0.5], ids=["nodrop", "dropout"])
def test_gemm_ext_variants_agree(variant, p):
    """Every gemm_ext variant computes the same y (fp32, dx layout, dropout bits)."""
    L, _ = _mods()
    (a, b, a2, b2, _), bits, oracle = _operands(45, 32, 40, 5, torch.float32, False, False, p)
    hi, lo = oracle(torch.float64), oracle(torch.float32)
    assert_bounded(L.gemm_ext(a, b, a2, b2, None, p, bits, variant=variant), lo, hi, torch.float32, variant)


@pytest.mark.parametrize("variant", ["tiled", "tma", "cublas"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gemm_ext_variants_fold_core_and_sum_partials(variant, dtype):
    """The forward's rank part as every variant forms it: B2 = scale * core V per tile (r_out != r_in)
    and A2 summed from fp32 split-K partials, also written out rounded to a's dtype; the forward
    layout (W K-major), bias and dropout bits, odd shapes."""
    L, _ = _mods()
    m, k, n, (r, q), sc, p = 45, 40, 56, (5, 3), 0.7, 0.3
    a, w, bvec = (torch.randn(*s, device=DEVICE, dtype=torch.float64) for s in ((m, k), (n, k), (n,)))
    parts = torch.randn(3, m, r, device=DEVICE, dtype=torch.float64)
    core, v = torch.randn(r, q, device=DEVICE, dtype=torch.float64), torch.randn(n, q, device=DEVICE, dtype=torch.float64)
    bits = torch.randint(-(2**31), 2**31 - 1, (m, -(-n // 32)), dtype=torch.int32, device=DEVICE)
    keep = _unpack(bits, n)

    def oracle(dt):
        a2 = parts.sum(0).to(dt)
        rank = torch.where(keep, a2 @ (sc * core.to(dt) @ v.to(dt).t()) / (1 - p), torch.zeros((), dtype=dt))
        return a.to(dt) @ w.to(dt).t() + rank + bvec.to(dt), a2

    a2_out = torch.empty((m, r), device=DEVICE, dtype=dtype)
    y = L.gemm_ext(a.to(dtype), w.to(dtype).t(), parts.float(), v.to(dtype).t(), bvec.to(dtype), p, bits,
                   variant=variant, core=core.to(dtype), scale=sc, a2_out=a2_out)
    (y_lo, s_lo), (y_hi, s_hi) = oracle(dtype), oracle(torch.float64)
    assert_bounded(a2_out, s_lo, s_hi, dtype, f"{variant} A2")
    assert_bounded(y, y_lo, y_hi, dtype, variant)


def _count_variants(monkeypatch, L):
    used: list[str] = []
    for name, fn in list(L._GEMMS.items()):
        monkeypatch.setitem(L._GEMMS, name, lambda *a, _n=name, _f=fn: (used.append(_n), _f(*a))[1])
    return used


@needs_tma
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_on_tma_kernel(monkeypatch, bias, dtype):
    """The factorized Linear with FLORA_BACKEND=triton/factorized/tma: both GEMMs (forward, dx) run on
    the TMA kernel; output and every gradient (x, bias, core, factors) match the reference path."""
    L, _ = _mods()
    used = _count_variants(monkeypatch, L)
    monkeypatch.setenv("FLORA_BACKEND", "triton/factorized/tma")
    x = torch.randn(2, 19, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(56, 40, device=DEVICE) / 40**0.5
    b = torch.randn(56, device=DEVICE, requires_grad=True) if bias else None
    core = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    fs = [(torch.randn(n, r, device=DEVICE) / r**0.5).requires_grad_() for n, r in ((56, 3), (40, 5))]

    def kern(x, w, b, core, u_out, u_in):
        return fk.flora_linear(x, w, b, core, [u_out, u_in], 0.7, strategy="factorized", backend="triton")

    def oracle(x, w, b, core, u_out, u_in):
        return ref.linear_factorized(x, w, b, core, [u_out, u_in], 0.7)

    compare(kern, oracle, [x, w, b, core, *fs], dtype, ["x", "weight", "bias", "core", "factors[0]", "factors[1]"])
    assert used == ["tma", "tma"], used


@needs_tma
def test_linear_dropout_on_tma_kernel(monkeypatch):
    """p > 0 on the TMA kernel: output and every gradient equal the reference with the kernel's
    own mask (recovered by shrinking ones by the identity with the same seed)."""
    L, _ = _mods()
    monkeypatch.setattr(L, "new_seed", lambda: 4321)
    used = _count_variants(monkeypatch, L)
    t, in_f, out, ranks, p = 50, 40, 24, (4, 3), 0.3
    x = torch.randn(t, in_f, device=DEVICE, requires_grad=True)
    w = torch.randn(out, in_f, device=DEVICE) / in_f**0.5
    b = torch.randn(out, device=DEVICE, requires_grad=True)
    core = torch.randn(ranks, device=DEVICE, requires_grad=True)
    fs = [torch.randn(n, r, device=DEVICE, requires_grad=True) for n, r in zip((out, in_f), ranks)]
    drop = L.shrink(torch.ones(t, in_f, device=DEVICE), torch.eye(in_f, device=DEVICE), p, 4321)
    fk.force_dispatch("triton/factorized/tma")
    try:
        y = fk.flora_linear(x, w, b, core, fs, 0.5, dropout_p=p, strategy="factorized", backend="triton")
        dy = torch.randn_like(y)
        g = torch.autograd.grad(y, [x, b, core, *fs], dy)
    finally:
        fk.force_dispatch(None)
    y_ref = torch.nn.functional.linear(x, w, b) + ((x * drop) @ fs[1]) @ (0.5 * fs[0] @ core).t()
    g_ref = torch.autograd.grad(y_ref, [x, b, core, *fs], dy)
    assert used == ["tma", "tma"], used
    assert_bounded(y, y_ref, y_ref, torch.float32, "output")
    for name, a, r in zip(["x", "bias", "core", "U_out", "U_in"], g, g_ref):
        assert_bounded(a, r, r, torch.float32, f"grad {name}")


def test_tma_fallback_names_the_reason(monkeypatch):
    """Operands TMA cannot address (rows of 20 fp16 = 40 bytes; a column-strided x) run the tiled
    kernel with a warning giving the reason; gemm_tma itself refuses them."""
    L, G = _mods()
    used = _count_variants(monkeypatch, L)
    a, w = (torch.randn(*s, dtype=torch.float16, device=DEVICE) for s in ((33, 20), (16, 20)))
    a2, b2 = (torch.randn(*s, dtype=torch.float16, device=DEVICE) for s in ((33, 3), (3, 16)))
    why = G.unsupported_reason(a, w.t(), 16)
    assert why is not None and "16-byte" in why
    with pytest.warns(UserWarning, match="TMA kernel does not apply.*16-byte"):
        y = L.gemm_ext(a, w.t(), a2, b2, None, variant="tma")
    torch.testing.assert_close(y.float(), a.float() @ w.float().t() + a2.float() @ b2.float(), rtol=2e-2, atol=2e-2)
    assert used == ["tiled"]
    strided = torch.randn(8, 64, device=DEVICE)[:, ::2]
    assert "x/dy" in G.unsupported_reason(strided, torch.randn(32, 16, device=DEVICE), 16)
    with pytest.raises(ValueError, match="gemm_tma: .*16-byte"):
        G.gemm_tma(a, w.t(), a2, b2, None, 0.0, None, 64, 16, "tf32")


def test_gemm_variant_choice_rules(monkeypatch):
    """Unknown variants are refused by name; gemm_ext's default is the tiled kernel; off CUDA the
    dispatcher's auto takes "tiled" for the factorized Linear without measuring."""
    L, _ = _mods()
    a, b, a2, b2 = (torch.randn(*s, device=DEVICE) for s in ((5, 8), (8, 8), (5, 2), (2, 8)))
    with pytest.raises(ValueError, match="expected one of .*'tma'.*got 'wgmma'"):
        L.gemm_ext(a, b, a2, b2, None, variant="wgmma")
    used = _count_variants(monkeypatch, L)
    L.gemm_ext(a, b, a2, b2, None)
    assert used == ["tiled"]
    if not ON_CUDA:
        fk.clear_autotune_cache()
        fk.flora_linear(a, b, None, torch.randn(2, 2), [torch.randn(8, 2), torch.randn(8, 2)], strategy="factorized",
                        backend="triton")
        (d,) = fk.dispatch_report()
        assert d.label == "triton/factorized/tiled" and d.source == "single"


def test_measured_choice_drops_a_wrong_variant(monkeypatch):
    """The dispatcher checks each GEMM variant of the factorized Linear against the reference path
    before timing it: one that computes a wrong y is dropped with an AutotuneWarning and never chosen
    (variants allowed on the interpreter here; no assertion on the timings)."""
    from flora_kernels.backends.triton import TritonBackend

    L, _ = _mods()
    monkeypatch.setattr(TritonBackend, "variant_reason", lambda self, call, v, auto=False: None)
    monkeypatch.setenv("FLORA_AUTOTUNE_BUDGET_MS", "0")
    monkeypatch.setitem(L._GEMMS, "tma", lambda *args: L._gemm_tiled(*args) + 1.0)
    fk.clear_autotune_cache(disk=True)
    x, w = torch.randn(20, 16, device=DEVICE), torch.randn(24, 16, device=DEVICE)
    core, fs = torch.randn(3, 3, device=DEVICE), [torch.randn(24, 3, device=DEVICE), torch.randn(16, 3, device=DEVICE)]
    with pytest.warns(fk.AutotuneWarning, match="dropped triton/factorized/tma"):
        fk.flora_linear(x, w, None, core, fs, strategy="factorized", backend="triton")
    (d,) = fk.dispatch_report()
    assert d.variant in ("tiled", "cublas") and "triton/factorized/tma" in dict(d.dropped)
    fk.clear_autotune_cache(disk=True)


@pytest.mark.filterwarnings("ignore:gemm_ext. the TMA kernel does not apply")  # opcheck also passes 0-stride dy
def test_opcheck_linear_ops_on_tma():
    """The linear ops' registration holds with the TMA kernel behind them (fake, autograd, schema)."""
    L, _ = _mods()

    def rq(*s):
        return torch.randn(*s, device=DEVICE, requires_grad=True)

    w = torch.randn(8, 16, device=DEVICE)
    opcheck(L.linear_fwd, (rq(11, 16), w, rq(8), rq(16, 3), rq(2, 3), rq(8, 2), 0.5, 0.0, 0, "tma"))
    x, u_in = torch.randn(11, 16, device=DEVICE), torch.randn(16, 3, device=DEVICE)
    core, u_out = torch.randn(2, 3, device=DEVICE), torch.randn(8, 2, device=DEVICE)
    bits = L.linear_fwd(x, w, None, u_in, core, u_out, 0.5, 0.2, 3, "tma")[2]
    dy, s = torch.randn(11, 8, device=DEVICE), torch.randn(11, 3, device=DEVICE)
    opcheck(L.linear_bwd, (dy, x, w, u_in, core, u_out, 0.5, s, bits, 0.2, True, True, True, True, torch.float32, "tma"))


@pytest.mark.gpu
@needs_tma
def test_gpu_gemm_variants_bf16():
    """bf16 on a GPU (the interpreter computes bf16 wrongly): every variant, both layouts, dropout
    bits, ragged M."""
    L, _ = _mods()
    for kmajor, bias, p in ((True, True, 0.0), (False, False, 0.0), (False, False, 0.2)):
        (a, b, a2, b2, bvec), bits, oracle = _operands(1000, 512, 384, 16, torch.bfloat16, kmajor, bias, p)
        hi, lo = oracle(torch.float64), oracle(torch.bfloat16)
        for v in L.GEMM_VARIANTS:
            assert_bounded(L.gemm_ext(a, b, a2, b2, bvec, p, bits, variant=v), lo, hi, torch.bfloat16, f"{v} {kmajor} {p}")
