"""The implicit-GEMM variant of the Triton factorized Conv2d (conv_igemm.py) vs the reference path:
output and every gradient on odd shapes (stride, asymmetric padding, dilation, 1x1 / 3x3 / 5x3 /
2x2 kernels, ragged tiles), fp32 and fp16, channels_last and contiguous inputs; the dropout mask;
opcheck; torch.compile; how the variant is chosen."""

from __future__ import annotations

import pytest
import torch
from test_triton_helpers import DEVICE, assert_bounded, compare, needs_triton
from torch.library import opcheck

import flora_kernels as fk
from flora_kernels import reference as ref
from flora_kernels.convspec import ConvSpec, conv_nd

pytestmark = [needs_triton, pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]

# (kernel, stride, padding, dilation, ranks (r_out, r_in, rk1, rk2), bias, dtype, channels_last)
CASES = [
    ((3, 3), 1, 1, 1, (3, 2, 3, 2), True, torch.float32, True),
    ((3, 3), 2, 1, 1, (4, 5, 2, 3), True, torch.float32, True),
    ((1, 1), 1, 0, 1, (6, 4, 1, 1), False, torch.float32, True),
    ((1, 1), 2, 0, 1, (2, 3, 1, 1), True, torch.float32, False),
    ((5, 3), 1, (2, 1), 1, (5, 2, 4, 3), True, torch.float32, False),
    ((3, 3), 1, 2, 2, (2, 6, 3, 3), False, torch.float32, True),
    ((5, 3), 2, (1, 0), (1, 2), (3, 3, 2, 2), True, torch.float32, True),
    ((2, 2), 1, "same", 1, (3, 2, 2, 2), True, torch.float32, True),  # asymmetric pads (0, 1)
    ((3, 3), 1, 1, 1, (4, 3, 3, 3), True, torch.float16, True),
    ((5, 3), 2, (2, 1), 1, (3, 4, 3, 2), False, torch.float16, False),
]
IDS = [f"k{k[0]}x{k[1]}-s{s}-p{p}-d{d}-{'fp16' if dt == torch.float16 else 'fp32'}-{'cl' if cl else 'nchw'}"
       for k, s, p, d, _r, _b, dt, cl in CASES]


@pytest.fixture
def igemm(monkeypatch):
    """Forces the igemm variant and counts its forward launches."""
    from flora_kernels.backends.triton import conv as C

    calls = []
    real = C.ig.conv_igemm_fwd
    monkeypatch.setattr(C.ig, "conv_igemm_fwd", lambda *a: calls.append(1) or real(*a))
    C.set_conv_variant("igemm")
    yield calls
    C.set_conv_variant(None)


def _setup(kernel, ranks, bias, channels_last, n=2, c_in=5, c_out=7, hw=(9, 7)):
    x = torch.randn(n, c_in, *hw, device=DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, *kernel, device=DEVICE) / (c_in * kernel[0] * kernel[1]) ** 0.5
    b = torch.randn(c_out, device=DEVICE).requires_grad_() if bias else None
    core = torch.randn(ranks, device=DEVICE, requires_grad=True)
    fs = [(torch.randn(m, r, device=DEVICE) / r**0.5).requires_grad_() for m, r in zip((c_out, c_in, *kernel), ranks)]
    return [x.requires_grad_(), w, b, core, *fs]


@pytest.mark.parametrize("kernel,stride,padding,dilation,ranks,bias,dtype,channels_last", CASES, ids=IDS)
def test_igemm_vs_reference(igemm, kernel, stride, padding, dilation, ranks, bias, dtype, channels_last):
    inputs = _setup(kernel, ranks, bias, channels_last)
    kw = {"stride": stride, "padding": padding, "dilation": dilation}
    spec = ConvSpec.make(kernel, **kw)

    def kern(x, w, b, core, *fs):
        return fk.flora_conv(x, w, b, core, fs, 0.8, strategy="factorized", backend="triton", **kw)

    def oracle(x, w, b, core, *fs):
        return ref.conv_factorized(x, w, b, core, fs, 0.8, spec)

    compare(kern, oracle, inputs, dtype, ["x", "weight", "bias", "core"] + [f"factors[{i}]" for i in range(4)])
    assert igemm, "the igemm variant did not run"
    x, w, b = inputs[:3]
    assert kern(*inputs).stride() == conv_nd(x, w, b, spec).stride()  # the layout torch's conv gives


def test_igemm_multi_tile(igemm):
    """More rows and columns than one interpreter tile (64 x 32), channels over two K blocks."""
    inputs = _setup((3, 3), (5, 4, 2, 3), True, True, n=1, c_in=19, c_out=37, hw=(11, 9))
    spec = ConvSpec.make((3, 3), padding=1)

    def kern(x, w, b, core, *fs):
        return fk.flora_conv(x, w, b, core, fs, 1.3, padding=1, strategy="factorized", backend="triton")

    compare(kern, lambda x, w, b, core, *fs: ref.conv_factorized(x, w, b, core, fs, 1.3, spec), inputs, torch.float32,
            ["x", "weight", "bias", "core"] + [f"factors[{i}]" for i in range(4)])
    assert igemm, "the igemm variant did not run"


def test_igemm_dropout_mask_consistent(igemm, monkeypatch):
    """p > 0: output and gradients equal the reference computed with the kernel's own mask
    (recovered by projecting ones by the identity with the same seed), dx's extension masked alike."""
    from flora_kernels.backends.triton import channel_gemm as cgemm
    from flora_kernels.backends.triton import conv as C

    monkeypatch.setattr(C, "new_seed", lambda: 99)
    p = 0.4
    x = torch.randn(2, 6, 9, 7, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(5, 6, 3, 3, device=DEVICE)
    core = torch.randn(3, 2, 2, 3, device=DEVICE, requires_grad=True)
    fs = [torch.randn(n, r, device=DEVICE, requires_grad=True) for n, r in zip(w.shape, core.shape)]
    spec = ConvSpec.make((3, 3), stride=2, padding=1)
    drop = cgemm.project(torch.ones_like(x), torch.eye(6, device=DEVICE), 1, torch.empty_like(x), True, p, 99)
    assert abs((drop != 0).float().mean().item() - (1 - p)) < 0.08
    y = fk.flora_conv(x, w, None, core, fs, 0.5, stride=2, padding=1, dropout_p=p, strategy="factorized", backend="triton")
    y_ref = conv_nd(x, w, None, spec) + conv_nd(x * drop, fk.tucker_reconstruct(core, fs, 0.5), None, spec)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, [x, core, *fs], dy)
    g_ref = torch.autograd.grad(y_ref, [x, core, *fs], dy)
    assert igemm
    assert_bounded(y, y_ref, y_ref, torch.float32, "output")
    for i, (a, r) in enumerate(zip(g, g_ref)):
        assert_bounded(a, r, r, torch.float32, f"grad {i}")


def test_opcheck_igemm_ops():
    from flora_kernels.backends.triton import conv_igemm as ig

    def rq(*s, cl=False):
        t = torch.randn(*s, device=DEVICE)
        return (t.to(memory_format=torch.channels_last) if cl else t).requires_grad_()

    x, w = rq(1, 3, 5, 4, cl=True), torch.randn(4, 3, 3, 2, device=DEVICE)
    geometry = ([2, 1], [1, 1, 0, 1], [1, 1])
    opcheck(ig.conv_igemm_fwd, (x, w, rq(4), rq(3, 2), rq(3, 2, 3, 2), rq(4, 3), *geometry, 0.2, 5))
    y, z, u, bits = ig.conv_igemm_fwd(x.detach(), w, None, torch.randn(3, 2), torch.randn(3, 2, 3, 2), torch.randn(4, 3),
                                      *geometry, 0.2, 5)
    args = (torch.randn_like(y), x.detach(), w, torch.randn(3, 2), torch.randn(3, 2, 3, 2), torch.randn(4, 3), z, u, bits,
            *geometry, 0.2, True, True, True, True, True)
    opcheck(ig.conv_igemm_bwd, args)


def test_torch_compile_igemm(igemm):
    """The igemm variant traces under torch.compile (aot_eager, fullgraph) and matches eager."""
    torch._dynamo.reset()
    x, w, b, core, *fs = _setup((3, 3), (3, 2, 2, 3), True, True)

    def fn(x, b, core, f0, f1, f2, f3):
        return fk.flora_conv(x, w, b, core, [f0, f1, f2, f3], 0.5, stride=2, padding=1, strategy="factorized", backend="triton")

    inputs = [x, b, core, *fs]
    y_c = torch.compile(fn, backend="aot_eager", fullgraph=True)(*inputs)
    y_e = fn(*inputs)
    dy = torch.randn_like(y_e)
    for a, r in zip([y_c, *torch.autograd.grad(y_c, inputs, dy)], [y_e, *torch.autograd.grad(y_e, inputs, dy)]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_variant_choice(monkeypatch):
    """'auto' where it does not measure (CPU): 'cudnn'; forcing igemm on a spec it cannot run names the
    reason; bad names are refused."""
    from flora_kernels.backends.triton import conv as C

    monkeypatch.setattr(C, "_measures", lambda device: False)
    calls = []
    real = C.ig.conv_igemm_fwd
    monkeypatch.setattr(C.ig, "conv_igemm_fwd", lambda *a: calls.append(1) or real(*a))
    x, w, b, core, *fs = _setup((3, 3), (2, 2, 2, 2), True, True)
    fk.flora_conv(x, w, b, core, fs, 0.5, padding=1, strategy="factorized", backend="triton")
    assert not calls
    monkeypatch.setenv("FLORA_TRITON_CONV", "igemm")
    fk.flora_conv(x, w, b, core, fs, 0.5, padding=1, strategy="factorized", backend="triton")
    assert calls
    monkeypatch.setenv("FLORA_TRITON_CONV", "fast")
    with pytest.raises(ValueError, match="FLORA_TRITON_CONV: expected one of"):
        fk.flora_conv(x, w, b, core, fs, 0.5, padding=1, strategy="factorized", backend="triton")
    monkeypatch.delenv("FLORA_TRITON_CONV")
    with pytest.raises(ValueError, match="expected one of"):
        C.set_conv_variant("winograd")
    C.set_conv_variant("igemm")
    try:
        w2 = torch.randn(4, 5, 3, device=DEVICE)
        core2 = torch.randn(2, 2, 2, device=DEVICE)
        fs2 = [torch.randn(4, 2, device=DEVICE), torch.randn(5, 2, device=DEVICE), torch.randn(3, 2, device=DEVICE)]
        with pytest.raises(ValueError, match="2-D only"):
            fk.flora_conv(torch.randn(1, 5, 8, device=DEVICE), w2, None, core2, fs2, 1.0, strategy="factorized", backend="triton")
        with pytest.raises(ValueError, match="groups = 1, got 5"):
            fk.flora_conv(x.detach(), torch.randn(5, 1, 3, 3, device=DEVICE), None, torch.randn(2, 1, 2, 2, device=DEVICE),
                          [torch.randn(5, 2, device=DEVICE), torch.randn(1, 1, device=DEVICE), *fs[2:]], 0.5, groups=5,
                          strategy="factorized", backend="triton")
    finally:
        C.set_conv_variant(None)


def test_variant_measured(monkeypatch):
    """'auto' where it measures (CUDA; here forced on the interpreter): both variants checked against
    the reference and timed once per signature by the autotune measurement; a variant that
    disagrees with the reference is dropped."""
    from flora_kernels.backends import autotune
    from flora_kernels.backends.triton import conv as C

    monkeypatch.setattr(C, "_measures", lambda device: True)
    monkeypatch.setattr(C, "_DECISIONS", {})
    monkeypatch.setenv("FLORA_AUTOTUNE_BUDGET_MS", "0")
    x, w, b, core, *fs = _setup((3, 3), (2, 2, 2, 2), True, True, n=1, c_in=3, c_out=4, hw=(5, 4))
    spec = ConvSpec.make((3, 3), padding=1)
    y = fk.flora_conv(x, w, b, core, fs, 0.5, padding=1, strategy="factorized", backend="triton")
    assert_bounded(y, ref.conv_factorized(x, w, b, core, fs, 0.5, spec), ref.conv_factorized(x, w, b, core, fs, 0.5, spec),
                   torch.float32, "output")
    (d,) = C.conv_variant_report()
    assert d.source == "measured" and d.strategy in C.CONV_VARIANTS and not d.dropped
    assert {k for k, _ in d.times_s} == {"triton/cudnn", "triton/igemm"}
    fk.flora_conv(x, w, b, core, fs, 0.5, padding=1, strategy="factorized", backend="triton")
    assert len(C.conv_variant_report()) == 1  # decided once per signature

    real = C.ig.conv_igemm_fwd
    monkeypatch.setattr(C.ig, "conv_igemm_fwd", lambda *a: tuple(t * 2 if i == 0 else t for i, t in enumerate(real(*a))))
    monkeypatch.setattr(C, "_DECISIONS", {})
    with pytest.warns(autotune.AutotuneWarning, match="triton/igemm"):
        fk.flora_conv(x, w, b, core, fs, 0.5, padding=1, strategy="factorized", backend="triton")
    (d,) = C.conv_variant_report()
    assert d.strategy == "cudnn" and "triton/igemm" in dict(d.dropped)


@pytest.mark.gpu
@pytest.mark.parametrize("stride", [1, 2])
def test_gpu_igemm_bf16_benchmark_shape(igemm, stride):
    """bf16 at the benchmark conv shape (N = 8, C = 64, 28 x 28, 3 x 3, ranks (16, 16, 3, 3)),
    channels_last: igemm output and every gradient within 3x torch bf16's error of the fp32 reference."""
    from test_triton_backend import _bf16_bound

    x = torch.randn(8, 64, 28, 28, device="cuda").to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(64, 64, 3, 3, device="cuda") / 24
    bias = torch.randn(64, device="cuda", requires_grad=True)
    core = torch.randn(16, 16, 3, 3, device="cuda", requires_grad=True)
    fs = [(torch.randn(n, r, device="cuda") / r**0.5).requires_grad_() for n, r in zip(w.shape, core.shape)]
    spec = ConvSpec.make((3, 3), stride=stride, padding=1)
    leaves = [x, bias, core, *fs]
    y32 = ref.conv_factorized(x, w, bias, core, fs, 0.5, spec)
    dy = torch.randn_like(y32)
    g32 = torch.autograd.grad(y32, leaves, dy)
    lo = [v.detach().bfloat16().requires_grad_() for v in leaves]
    yk = fk.flora_conv(lo[0], w.bfloat16(), lo[1], lo[2], lo[3:], 0.5, stride=stride, padding=1, strategy="factorized",
                       backend="triton")
    gk = torch.autograd.grad(yk, lo, dy.bfloat16())
    yt = ref.conv_factorized(lo[0], w.bfloat16(), lo[1], lo[2], lo[3:], 0.5, spec)
    gt = torch.autograd.grad(yt, lo, dy.bfloat16())
    assert igemm
    _bf16_bound(yk, yt, y32, "igemm y")
    for i, (a, b, c) in enumerate(zip(gk, gt, g32)):
        _bf16_bound(a, b, c, f"igemm grad {i}")
