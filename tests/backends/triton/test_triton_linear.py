"""Triton FLoRA Linear (factorized and merged) vs the reference path: output and every gradient,
dropout mask consistency, opcheck of the linear ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_helpers import (
    DEVICE,
    DTYPE_IDS,
    DTYPES,
    assert_bounded,
    assert_compiles_like_eager,
    compare,
    needs_triton,
)
from torch.library import opcheck

import flora_kernels as fk
from flora_kernels import reference as ref

pytestmark = [needs_triton, pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]

# (id, x shape, out, ranks, bias, strided x): rank 1, full rank, batch 1, ragged tails, 3-D x
CASES = [
    ("3d-x-bias", (2, 3, 37), 29, (5, 3), True, False),
    ("rank1-nobias", (45, 20), 33, (1, 1), False, False),
    ("batch1-full", (1, 16), 16, (16, 16), True, False),
    ("strided-x", (21, 19), 7, (3, 4), True, True),
    ("ragged-70x9", (70, 9), 40, (2, 5), False, False),
]
CASE_IDS = [c[0] for c in CASES]


def _inputs(case):
    _, xs, out, ranks, bias, strided = case
    in_f = xs[-1]
    x = torch.randn(*xs[:-1], in_f * (2 if strided else 1), device=DEVICE, requires_grad=True)
    w = torch.randn(out, in_f, device=DEVICE) / in_f**0.5
    b = torch.randn(out, device=DEVICE, requires_grad=True) if bias else None
    core = torch.randn(ranks, device=DEVICE, requires_grad=True)
    fs = [(torch.randn(n, r, device=DEVICE) / r**0.5).requires_grad_() for n, r in zip((out, in_f), ranks)]
    return [x, w, b, core, *fs], strided


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("strategy", ["factorized", "merged"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_linear(case, strategy, dtype):
    inputs, strided = _inputs(case)

    def prep(x):
        return x[..., ::2] if strided else x

    def kern(x, w, b, core, u_out, u_in):
        return fk.flora_linear(prep(x), w, b, core, [u_out, u_in], 0.6, strategy=strategy, backend="triton")

    def oracle(x, w, b, core, u_out, u_in):
        return ref.linear_factorized(prep(x), w, b, core, [u_out, u_in], 0.6)

    compare(kern, oracle, inputs, dtype, ["x", "weight", "bias", "core", "factors[0]", "factors[1]"])


def _dropout_setup(monkeypatch, seed=1234):
    from flora_kernels.backends.triton import linear as L

    monkeypatch.setattr(L, "new_seed", lambda: seed)
    return L


@pytest.mark.parametrize("p", [0.3, 0.75])
def test_linear_dropout_mask_consistent(monkeypatch, p):
    """p > 0: output and every gradient equal the reference computed with the kernel's own mask
    (recovered by shrinking ones by the identity with the same seed); the keep rate is 1 - p."""
    L = _dropout_setup(monkeypatch)
    t, in_f, out, ranks = 64, 40, 24, (4, 3)
    x = torch.randn(t, in_f, device=DEVICE, requires_grad=True)
    w = torch.randn(out, in_f, device=DEVICE) / in_f**0.5
    b = torch.randn(out, device=DEVICE)
    core = torch.randn(ranks, device=DEVICE, requires_grad=True)
    fs = [torch.randn(n, r, device=DEVICE, requires_grad=True) for n, r in zip((out, in_f), ranks)]
    drop = L.shrink(torch.ones(t, in_f, device=DEVICE), torch.eye(in_f, device=DEVICE), p, 1234)  # mask / (1 - p)
    keep = drop != 0
    assert torch.allclose(drop[keep], torch.full_like(drop[keep], 1 / (1 - p)))
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    y = fk.flora_linear(x, w, b, core, fs, 0.5, dropout_p=p, strategy="factorized", backend="triton")
    y_ref = F.linear(x, w, b) + ((x * drop) @ fs[1]) @ (0.5 * fs[0] @ core).t()
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, [x, core, *fs], dy)
    g_ref = torch.autograd.grad(y_ref, [x, core, *fs], dy)
    assert_bounded(y, y_ref, y_ref, torch.float32, "output")
    for name, a, r in zip(["x", "core", "U_out", "U_in"], g, g_ref):
        assert_bounded(a, r, r, torch.float32, f"grad {name}")


def test_linear_dropout_p0_exact():
    """p = 0 draws no mask: the result does not depend on the seed, bit for bit."""
    from flora_kernels.backends.triton import linear as L

    x, w = torch.randn(33, 20, device=DEVICE), torch.randn(17, 20, device=DEVICE)
    u_in, core, u_out = torch.randn(20, 3, device=DEVICE), torch.randn(2, 3, device=DEVICE), torch.randn(17, 2, device=DEVICE)
    y1, s1, _ = L.linear_fwd(x, w, None, u_in, core, u_out, 0.5, 0.0, 1, "tiled")
    y2, s2, _ = L.linear_fwd(x, w, None, u_in, core, u_out, 0.5, 0.0, 2, "tiled")
    assert torch.equal(y1, y2) and torch.equal(s1, s2)


def test_linear_merged_dropout_matches_reference():
    """Merged with p > 0 uses torch's dropout: same RNG state, same result as the reference."""
    x = torch.randn(9, 12, device=DEVICE)
    w = torch.randn(10, 12, device=DEVICE)
    core, fs = torch.randn(3, 2, device=DEVICE), [torch.randn(10, 3, device=DEVICE), torch.randn(12, 2, device=DEVICE)]
    torch.manual_seed(7)
    y = fk.flora_linear(x, w, None, core, fs, 0.5, dropout_p=0.4, strategy="merged", backend="triton")
    torch.manual_seed(7)
    y_ref = ref.linear_merged(x, w, None, core, fs, 0.5, 0.4)
    assert_bounded(y, y_ref, y_ref, torch.float32, "merged dropout")


def test_opcheck_linear_ops():
    from flora_kernels.backends.triton import linear as L

    def rq(*s):
        return torch.randn(*s, device=DEVICE, requires_grad=True)

    w = torch.randn(7, 9, device=DEVICE)
    opcheck(L.linear_fwd, (rq(11, 9), w, rq(7), rq(9, 3), rq(2, 3), rq(7, 2), 0.5, 0.0, 0, "cublas"))
    opcheck(L.linear_fwd, (rq(11, 9), w, None, rq(9, 3), rq(4, 3), rq(7, 4), 1.5, 0.3, 5, "tiled"))
    x, u_in = torch.randn(11, 9, device=DEVICE), torch.randn(9, 3, device=DEVICE)
    core, u_out = torch.randn(2, 3, device=DEVICE), torch.randn(7, 2, device=DEVICE)
    dy, s = torch.randn(11, 7, device=DEVICE), torch.randn(11, 3, device=DEVICE)
    bits = L.linear_fwd(x, w, None, u_in, core, u_out, 0.5, 0.2, 3, "tiled")[2]
    opcheck(L.linear_bwd, (dy, x, w, u_in, core, u_out, 0.5, s, bits, 0.2, True, True, True, True, torch.float32, "tiled"))
    opcheck(L.linear_bwd, (dy, x, w, u_in, core, u_out, 0.5, s, bits.new_empty(0), 0.0, False, True, True, False, None, "cublas"))


def _unpack(bits: torch.Tensor, c: int) -> torch.Tensor:
    """(T, ceil(c / 32)) int32 words -> (T, c) bool, bit j of word w = channel 32 w + j."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return ((bits[:, :, None] >> shifts) & 1).reshape(bits.shape[0], -1)[:, :c] != 0


@pytest.mark.parametrize("in_f", [40, 64, 7])
def test_shrink_bits_are_the_dropout_mask(in_f):
    """The packed mask the shrink writes (1 bit per element) is the mask it applied."""
    from flora_kernels.backends.triton import linear as L

    t, p = 37, 0.4
    bits = torch.full((t, -(-in_f // 32)), -1, dtype=torch.int32, device=DEVICE)
    drop = L.shrink(torch.ones(t, in_f, device=DEVICE), torch.eye(in_f, device=DEVICE), p, 99, bits)
    assert torch.equal(_unpack(bits, in_f), drop != 0)


@pytest.mark.parametrize(
    ("dtype", "splits", "need_dbias", "ranks"),
    [(torch.float32, (None, None), True, (3, 5)), (torch.float32, (3, 2), False, (7, 1)),
     (torch.float16, (3, 2), True, (3, 5)), (torch.float16, (1, 1), False, (1, 7)), (torch.float32, (1, 3), True, (5, 3)),
     (torch.float16, (4, 1), True, (2, 2))],
    ids=["fp32-default-dbias", "fp32-3x2", "fp16-3x2-dbias", "fp16-1x1", "fp32-1x3-dbias", "fp16-4x1-dbias"],
)
def test_ds_db_one_pass(dtype, splits, need_dbias, ranks):
    """dS = dy B, dU_out = s dB G^T, dG = s U_out^T dB (dB = dy^T S, B = s U_out G) and dbias = sum_t dy
    from one pass over dy plus the finish launch: split-K partials or (one split) written directly,
    odd shapes, r_out != r_in."""
    from flora_kernels.backends.triton import linear as L

    t, n, (q, r), sc = 101, 75, ranks, 0.7
    hi = [torch.randn(*shape, device=DEVICE, dtype=torch.float64) for shape in ((t, n), (t, r), (n, q), (q, r))]
    lo = [v.to(dtype) for v in hi]
    ds, du_out, dg, dbias = L.ds_db(*lo[:4], sc, True, dtype if need_dbias else None, *splits)

    def grads(dy, s, u_out, core):
        b = sc * u_out @ core
        db = dy.t() @ s
        return dy @ b, sc * db @ core.t(), sc * u_out.t() @ db, dy.sum(0)

    for name, k, a, c in zip(["dS", "dU_out", "dG", "dbias"], (ds, du_out, dg, dbias), grads(*lo), grads(*hi)):
        if name == "dbias" and not need_dbias:
            assert dbias is None
            continue
        assert k.dtype == dtype, name
        assert_bounded(k, a, c, dtype, name)


def test_gemm_autotune_buckets_tokens_and_layout(monkeypatch):
    """One tuning per (power-of-two token bucket, operand layout): token counts inside a bucket
    reuse the tuned config (no re-tune), a new bucket or a transposed operand tunes anew."""
    import triton

    from flora_kernels.backends.triton import linear as L

    kern = L._gemm_ext_kernel
    configs = [triton.Config({"BM": bm, "BN": 32, "BK": 32, "GROUP_M": 4}, num_warps=4) for bm in (32, 16)]
    benched: list[int] = []

    def bench(*args, config, **kwargs):
        benched.append(config.kwargs["BM"])
        return [float(config.kwargs["BM"])] * 3

    monkeypatch.setattr(kern, "configs", configs)
    monkeypatch.setattr(L, "gemm_configs", lambda dtype, arch: configs)  # what the pruning keeps
    monkeypatch.setattr(kern, "cache", {})
    monkeypatch.setattr(kern, "_bench", bench)
    k, n, r = 24, 40, 3
    w, u, v = torch.randn(n, k, device=DEVICE), torch.randn(40, r, device=DEVICE), torch.randn(r, n, device=DEVICE)
    w_t_contig = w.t().contiguous()  # the same (K, N) operand, N-contiguous instead of K-contiguous

    def run(m, b):
        a, a2 = torch.randn(m, k, device=DEVICE), torch.randn(m, r, device=DEVICE)
        y = L.gemm_ext(a, b, a2, v, None)
        torch.testing.assert_close(y, a @ b + a2 @ v, rtol=1e-4, atol=1e-4)
        return len(kern.cache)

    assert [run(m, w.t()) for m in (33, 40, 64)] == [1, 1, 1]  # one bucket (64): tuned once
    assert run(65, w.t()) == 2  # bucket 128
    assert run(50, w_t_contig) == 3  # same bucket as 33..64, other layout
    assert len(benched) == 3 * len(configs)
    assert L.token_bucket(1) == 16 and L.token_bucket(8192) == 8192 and L.token_bucket(8193) == 16384
    assert L.operand_layout(u, w.t()) == 3 and L.operand_layout(u, w_t_contig) == 2


def test_torch_compile_linear_dropout_bias(monkeypatch):
    """The dropout path (mask bits saved for the backward) and the one-pass dS/dB/dbias trace under
    torch.compile (aot_eager, fullgraph) and match eager, output and every gradient."""
    _dropout_setup(monkeypatch, seed=77)
    torch._dynamo.reset()
    x = torch.randn(2, 19, 33, device=DEVICE, requires_grad=True)
    w = torch.randn(21, 33, device=DEVICE) / 33**0.5
    bias = torch.randn(21, device=DEVICE, requires_grad=True)
    core = torch.randn(4, 3, device=DEVICE, requires_grad=True)
    fs = [torch.randn(n, r, device=DEVICE, requires_grad=True) for n, r in ((21, 4), (33, 3))]

    def fn(x, bias, core, f0, f1):
        return fk.flora_linear(x, w, bias, core, [f0, f1], 0.5, dropout_p=0.3, strategy="factorized", backend="triton")

    inputs = [x, bias, core, *fs]
    assert_compiles_like_eager(fn, inputs)


# (id, T, in, out, (r_out, r_in)): odd sizes; out = 75 makes 3 channel blocks of 32 (dG from partials)
STEP_CASES = [("37x45x29-r3x5", 37, 45, 29, (3, 5)), ("37x45x75-r1x7", 37, 45, 75, (1, 7))]


def _force_splits(monkeypatch, k=3):
    """Every split-K heuristic of the Linear step splits min(k, work) ways (the interpreter's own
    target is one split), so the partials and their in-kernel reductions run."""
    from flora_kernels.backends.triton import channel_gemm as cg
    from flora_kernels.backends.triton import linear as L

    monkeypatch.setattr(L, "split_for", lambda items, programs, device: min(k, items))
    monkeypatch.setattr(cg, "split_for", lambda items, programs, device: min(k, items))


@pytest.mark.parametrize(
    ("case", "dtype", "bias", "splits"),
    [(STEP_CASES[0], torch.float32, True, "one"), (STEP_CASES[0], torch.float16, False, "split"),
     (STEP_CASES[0], torch.float16, True, "split"), (STEP_CASES[1], torch.float32, False, "split"),
     (STEP_CASES[1], torch.float16, True, "one"), (STEP_CASES[1], torch.float32, True, "split")],
    ids=lambda v: v[0] if isinstance(v, tuple) else str(v).replace("torch.float", "fp"),
)
def test_linear_step_every_grad(monkeypatch, case, dtype, bias, splits):
    """The folded step (B = s U_out G formed in the kernels, dU_out and dG from the finish launch):
    output and the gradients of x, bias, core, U_out and U_in vs the reference path, r_out != r_in,
    with one split everywhere or forced split-K partials."""
    if splits == "split":
        _force_splits(monkeypatch)
    _, t, in_f, out, ranks = case
    x = torch.randn(t, in_f, device=DEVICE, requires_grad=True)
    w = torch.randn(out, in_f, device=DEVICE) / in_f**0.5
    b = torch.randn(out, device=DEVICE, requires_grad=True) if bias else None
    core = torch.randn(ranks, device=DEVICE, requires_grad=True)
    fs = [(torch.randn(n, r, device=DEVICE) / r**0.5).requires_grad_() for n, r in zip((out, in_f), ranks)]

    def kern(x, w, b, core, u_out, u_in):
        return fk.flora_linear(x, w, b, core, [u_out, u_in], 0.8, strategy="factorized", backend="triton")

    def oracle(x, w, b, core, u_out, u_in):
        return ref.linear_factorized(x, w, b, core, [u_out, u_in], 0.8)

    compare(kern, oracle, [x, w, b, core, *fs], dtype, ["x", "weight", "bias", "core", "factors[0]", "factors[1]"])


@pytest.mark.parametrize("splits", ["one", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_step_dropout_mask_from_bits(monkeypatch, dtype, splits):
    """p > 0: output and every gradient of the op equal the unfused math with the mask read back
    from the bits it saved (T = 37, in = 45, out = 75, ranks (3, 5))."""
    from flora_kernels.backends.triton import linear as L

    if splits == "split":
        _force_splits(monkeypatch)
    t, in_f, out, (q, r), p, sc = 37, 45, 75, (3, 5), 0.35, 0.8
    hi = [torch.randn(t, in_f, dtype=torch.float64), torch.randn(out, in_f, dtype=torch.float64) / in_f**0.5,
          torch.randn(out, dtype=torch.float64), torch.randn(in_f, r, dtype=torch.float64) / r**0.5,
          torch.randn(q, r, dtype=torch.float64), torch.randn(out, q, dtype=torch.float64) / q**0.5]
    x, w, b, u_in, core, u_out = (v.to(DEVICE, dtype).requires_grad_(i != 1) for i, v in enumerate(hi))
    y, _, bits = L.linear_fwd(x, w, b, u_in, core, u_out, sc, p, 2024, "tiled")
    keep = _unpack(bits, in_f)
    assert 0.5 < keep.float().mean().item() < 0.8

    def unfused(x, w, b, u_in, core, u_out):
        drop = torch.where(keep, x / (1 - p), torch.zeros_like(x))
        return F.linear(x, w, b) + (drop @ u_in) @ (sc * u_out @ core).t()

    dy = torch.randn(t, out, dtype=torch.float64)
    wrt = [0, 2, 3, 4, 5]
    g = torch.autograd.grad(y, [[x, w, b, u_in, core, u_out][i] for i in wrt], dy.to(dtype))
    lo_in = [v.detach().to(DEVICE, dtype).requires_grad_(i != 1) for i, v in enumerate(hi)]
    hi_in = [v.detach().clone().requires_grad_(i != 1) for i, v in enumerate(hi)]
    y_lo, y_hi = unfused(*lo_in), unfused(*hi_in)
    g_lo = torch.autograd.grad(y_lo, [lo_in[i] for i in wrt], dy.to(dtype))
    g_hi = torch.autograd.grad(y_hi, [hi_in[i] for i in wrt], dy)
    assert_bounded(y, y_lo, y_hi, dtype, "output")
    for name, a, lo, h in zip(["x", "bias", "U_in", "core", "U_out"], g, g_lo, g_hi):
        assert a.dtype == dtype, name
        assert_bounded(a, lo, h, dtype, f"grad {name}")


@pytest.mark.parametrize(("dtype", "p", "bias"), [(torch.float32, 0.0, False), (torch.float16, 0.3, True)],
                         ids=["fp32-p0", "fp16-dropout-bias"])
def test_linear_step_launches_and_no_torch_compute(monkeypatch, dtype, p, bias):
    """A training step (forward + every gradient) is exactly six Triton launches (shrink, GEMM;
    ds_db, its finish, dx GEMM, dU_in reduction), with split-K partials or without, and no aten
    compute op outside them (allocations and views only; with dropout the CPU seed draw)."""
    from triton_helpers import count_step_ops

    want = ["_project_kernel", "_gemm_ext_kernel", "_ds_db_kernel", "_ds_db_finish_kernel", "_gemm_ext_kernel",
            "_reduce_kernel"]
    t, in_f, out, ranks = 37, 45, 75, (3, 5)
    x = torch.randn(t, in_f, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(out, in_f, device=DEVICE, dtype=dtype)
    b = torch.randn(out, device=DEVICE, dtype=dtype, requires_grad=True) if bias else None
    core = torch.randn(ranks, device=DEVICE, dtype=dtype, requires_grad=True)
    fs = [torch.randn(n, r, device=DEVICE, dtype=dtype, requires_grad=True) for n, r in zip((out, in_f), ranks)]
    dy = torch.randn(t, out, device=DEVICE, dtype=dtype)
    wrt = [x, core, *fs, *([b] if bias else [])]

    def step():
        y = fk.flora_linear(x, w, b, core, fs, 0.5, dropout_p=p, strategy="factorized", backend="triton")
        torch.autograd.grad(y, wrt, dy)

    seed_ops = ["aten::randint", "aten::_local_scalar_dense"] if p > 0 else []  # new_seed: CPU generator, host only
    for forced in (False, True):
        if forced:
            _force_splits(monkeypatch)
        launches, ops = count_step_ops(step)
        assert launches == want, (forced, launches)
        assert ops == seed_ops, (forced, ops)


@pytest.mark.parametrize(("groups", "shared"), [(1, True), (3, True), (3, False)])
@pytest.mark.parametrize("split", [1, 4])
def test_reduce_in_kernel_split_sum(groups, shared, split):
    """channel_gemm.reduce: the split-K partials summed by the last program of each channel block
    (or written directly with one split) equal the fp64 token reduction, in the requested dtype."""
    from flora_kernels.backends.triton import channel_gemm as cg

    n, cgs, r, length = 2, 37, 3, 45
    x = torch.randn(n, groups * cgs, length, dtype=torch.float64)
    z = torch.randn(n, groups * r, length, dtype=torch.float64)
    xg, zg = x.view(n, groups, cgs, length), z.view(n, groups, r, length)
    want = torch.einsum("ngcl,ngal->gca", xg, zg)
    want = want.sum(0) if shared else want.reshape(groups * cgs, r)
    got = cg.reduce(x.float().to(DEVICE), z.float().to(DEVICE), groups, shared, split=split, dtype=torch.float16)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want.to(DEVICE), rtol=2e-3, atol=2e-3)


def test_shrink_split_k_partials_and_bits(monkeypatch):
    """At small T the shrink splits the input features: fp32 partials whose sum is drop(x) U_in, and
    every mask word written exactly once by the program of its channels (the same bits as unsplit)."""
    from flora_kernels.backends.triton import linear as L

    t, in_f, r, p = 37, 100, 5, 0.4
    x, u = torch.randn(t, in_f, device=DEVICE), torch.randn(in_f, r, device=DEVICE)
    bits1 = torch.full((t, -(-in_f // 32)), -1, dtype=torch.int32, device=DEVICE)
    s1 = L.shrink(x, u, p, 7, bits1, partials=True)  # the interpreter's target: no split
    assert s1.shape == (t, r)
    _force_splits(monkeypatch)
    bits2 = torch.full_like(bits1, -1)
    parts = L.shrink(x, u, p, 7, bits2, partials=True)
    assert parts.dim() == 3 and parts.shape[0] == 2 and parts.dtype == torch.float32  # 4 blocks of 32 -> 2 splits
    assert torch.equal(bits1, bits2)
    keep = _unpack(bits2, in_f)
    want = torch.where(keep, x.double() / (1 - p), 0.0) @ u.double()
    torch.testing.assert_close(parts.sum(0).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1.double(), want, rtol=1e-5, atol=1e-5)
