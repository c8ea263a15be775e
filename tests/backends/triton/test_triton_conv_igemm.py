"""The implicit-GEMM variant of the Triton factorized ConvNd (conv_igemm.py) vs the reference path:
output and every gradient on odd shapes (stride, asymmetric padding, dilation, 1x1 / 3x3 / 5x3 /
2x2 kernels, ragged tiles; 1-D and 3-D, groups, reflect / replicate / circular padding), fp32
and fp16, channels_last and contiguous inputs; the dropout mask (the cudnn variant's, per seed);
opcheck; torch.compile; a real model's grouped Conv1d; how the variant is chosen."""

from __future__ import annotations

import math

import pytest
import torch
from triton_helpers import DEVICE, assert_bounded, assert_compiles_like_eager, compare, needs_triton
from torch.library import opcheck

import flora_kernels as fk
from flora_kernels import reference as ref
from flora_kernels.convspec import ConvSpec, conv_nd

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
pytestmark = [needs_triton, pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]

# (kernel, stride, padding, dilation, ranks (r_out, r_in, rk1, rk2), bias, dtype, channels_last)
CASES = [
    ((3, 3), 1, 1, 1, (3, 2, 3, 2), True, torch.float32, True),
    ((1, 1), 1, 0, 1, (6, 4, 1, 1), False, torch.float32, True),
    ((5, 3), 1, (2, 1), 1, (5, 2, 4, 3), True, torch.float32, False),
    ((3, 3), 1, 2, 2, (2, 6, 3, 3), False, torch.float32, True),
    ((5, 3), 2, (1, 0), (1, 2), (3, 3, 2, 2), True, torch.float32, True),
    ((2, 2), 1, "same", 1, (3, 2, 2, 2), True, torch.float32, True),  # asymmetric pads (0, 1)
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
    fk.force_dispatch("triton/factorized/igemm")
    yield calls
    fk.force_dispatch(None)


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

    # (x, weight, u_in, k, u_out, geometry (stride, pads, dilation, groups, padding_mode), p)
    cases = [
        (rq(1, 3, 5, 4, cl=True), torch.randn(4, 3, 3, 2, device=DEVICE), rq(3, 2), rq(3, 2, 3, 2), rq(4, 3),
         ([2, 1], [1, 1, 0, 1], [1, 1], 1, "zeros"), 0.2),  # packed mask bits
        (rq(1, 6, 7), torch.randn(4, 3, 3, device=DEVICE), rq(3, 2), rq(3, 2, 3), rq(4, 3),
         ([2], [2, 1], [1], 2, "reflect"), 0.3),  # 1-D, grouped, Philox mask
    ]
    # the grouped 1-D case skips the AOT-dispatch check (test_torch_compile_igemm_grouped_1d traces it)
    for (x, w, u_in, k, u_out, geometry, p), utils in zip(cases, (OPCHECK_UTILS, OPCHECK_UTILS[:-1])):
        opcheck(ig.conv_igemm_fwd, (x, w, rq(w.shape[0]), u_in, k, u_out, *geometry, p, 5), test_utils=utils)
        y, z, u, bits = ig.conv_igemm_fwd(x.detach(), w, None, u_in.detach(), k.detach(), u_out.detach(), *geometry, p, 5)
        args = (torch.randn_like(y), x.detach(), w, u_in.detach(), k.detach(), u_out.detach(), z, u, bits,
                *geometry, p, 5, True, True, True, True, True)
        opcheck(ig.conv_igemm_bwd, args, test_utils=utils)


def test_torch_compile_igemm(igemm):
    """The igemm variant traces under torch.compile (aot_eager, fullgraph) and matches eager."""
    torch._dynamo.reset()
    x, w, b, core, *fs = _setup((3, 3), (3, 2, 2, 3), True, True)

    def fn(x, b, core, f0, f1, f2, f3):
        return fk.flora_conv(x, w, b, core, [f0, f1, f2, f3], 0.5, stride=2, padding=1, strategy="factorized", backend="triton")

    inputs = [x, b, core, *fs]
    assert_compiles_like_eager(fn, inputs)


def test_variant_choice(monkeypatch):
    """Off CUDA auto takes 'cudnn' without measuring; a forced igemm (FLORA_BACKEND or force_dispatch)
    runs it; forcing igemm on a spec it cannot run names the reason."""
    from flora_kernels.backends.triton import conv as C

    calls = []
    real = C.ig.conv_igemm_fwd
    monkeypatch.setattr(C.ig, "conv_igemm_fwd", lambda *a: calls.append(1) or real(*a))
    x, w, b, core, *fs = _setup((3, 3), (2, 2, 2, 2), True, True)
    with fk.record_dispatch() as rep:
        fk.flora_conv(x, w, b, core, fs, 0.5, padding=1, strategy="factorized", backend="triton")
    assert not calls and rep[""][0].label == "triton/factorized/cudnn"
    monkeypatch.setenv("FLORA_BACKEND", "auto/auto/igemm")
    fk.flora_conv(x, w, b, core, fs, 0.5, padding=1, strategy="factorized", backend="triton")
    assert calls
    monkeypatch.setenv("FLORA_BACKEND", "triton/sideways")
    with pytest.raises(ValueError, match="FLORA_BACKEND: expected a strategy"):
        fk.flora_conv(x, w, b, core, fs, 0.5, padding=1, strategy="factorized", backend="triton")
    monkeypatch.delenv("FLORA_BACKEND")
    fk.force_dispatch("triton/factorized/igemm")
    try:
        with pytest.raises(fk.BackendUnavailable, match="does not serve depthwise convs"):
            fk.flora_conv(x.detach(), torch.randn(5, 1, 3, 3, device=DEVICE), None, torch.randn(2, 1, 2, 2, device=DEVICE),
                          [torch.randn(5, 2, device=DEVICE), torch.randn(1, 1, device=DEVICE), *fs[2:]], 0.5, groups=5,
                          strategy="factorized", backend="triton")
    finally:
        fk.force_dispatch(None)
    assert C.ig.unsupported_reason(4, ConvSpec.make((3,), padding=1), 3) is not None  # 1-D spec, 2-D input
    assert C.ig.unsupported_reason(3, ConvSpec.make((3,), padding=1, groups=2), 3) is None


def test_variant_measured(monkeypatch):
    """Where auto measures the variants (CUDA; here allowed on the interpreter): both checked against
    the reference and timed once per signature by the dispatcher; a variant that disagrees with the
    reference is dropped."""
    from flora_kernels.backends import autotune
    from flora_kernels.backends.triton import TritonBackend
    from flora_kernels.backends.triton import conv as C

    monkeypatch.setattr(TritonBackend, "variant_reason", lambda self, call, v, auto=False: None)
    monkeypatch.setenv("FLORA_AUTOTUNE_BUDGET_MS", "0")
    autotune.clear_autotune_cache(disk=True)
    x, w, b, core, *fs = _setup((3, 3), (2, 2, 2, 2), True, True, n=1, c_in=3, c_out=4, hw=(5, 4))
    spec = ConvSpec.make((3, 3), padding=1)
    y = fk.flora_conv(x, w, b, core, fs, 0.5, padding=1, strategy="factorized", backend="triton")
    assert_bounded(y, ref.conv_factorized(x, w, b, core, fs, 0.5, spec), ref.conv_factorized(x, w, b, core, fs, 0.5, spec),
                   torch.float32, "output")
    (d,) = fk.dispatch_report()
    assert d.source == "measured" and d.variant in C.CONV_VARIANTS and not d.dropped
    assert {k for k, _ in d.times_s} == {"triton/factorized/cudnn", "triton/factorized/igemm"}
    fk.flora_conv(x, w, b, core, fs, 0.5, padding=1, strategy="factorized", backend="triton")
    assert len(fk.dispatch_report()) == 1  # decided once per signature

    real = C.ig.conv_igemm_fwd
    monkeypatch.setattr(C.ig, "conv_igemm_fwd", lambda *a: tuple(t * 2 if i == 0 else t for i, t in enumerate(real(*a))))
    autotune.clear_autotune_cache(disk=True)  # the first decision was written to disk: measure again
    with pytest.warns(autotune.AutotuneWarning, match="triton/factorized/igemm"):
        fk.flora_conv(x, w, b, core, fs, 0.5, padding=1, strategy="factorized", backend="triton")
    (d,) = fk.dispatch_report()
    assert d.variant == "cudnn" and "triton/factorized/igemm" in dict(d.dropped)
    autotune.clear_autotune_cache(disk=True)


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


# ----------------------------------------------------------------------------- 1-D, 3-D, groups, padding modes

# (kernel, stride, padding, dilation, groups, padding_mode, (c_in, c_out), spatial, bias, dtype, layout)
GEOMETRIES = [
    ((3,), 2, 1, 1, 1, "zeros", (5, 7), (11,), True, torch.float32, "contiguous"),
    ((5,), 1, 2, 2, 3, "reflect", (6, 9), (13,), False, torch.float16, "contiguous"),
    ((4,), 1, "same", 1, 2, "circular", (4, 6), (9,), True, torch.float32, "contiguous"),  # pads (1, 2)
    ((3, 2), 2, (1, 1), 1, 3, "circular", (9, 6), (8, 7), True, torch.float16, "channels_last"),
    ((3, 3), 1, (2, 1), (2, 1), 1, "reflect", (3, 5), (8, 7), True, torch.float32, "channels_last"),
    ((2, 2, 2), (1, 2, 1), 1, 1, 2, "replicate", (4, 6), (3, 4, 3), True, torch.float32, "channels_last"),
    ((2, 3, 1), 1, "same", 1, 1, "zeros", (3, 5), (3, 4, 5), False, torch.float16, "contiguous"),
]
GEOMETRY_IDS = [f"{len(k)}d-k{'x'.join(map(str, k))}-s{s}-p{p}-g{g}-{m}-{'fp16' if dt == torch.float16 else 'fp32'}-{lay}"
                for k, s, p, _d, g, m, _c, _sp, _b, dt, lay in GEOMETRIES]


def _setup_nd(kernel, groups, channels, spatial, bias, layout, n=2):
    (c_in, c_out), d = channels, len(kernel)
    x = torch.randn(n, c_in, *spatial, device=DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if d == 2 else torch.channels_last_3d)
    w = torch.randn(c_out, c_in // groups, *kernel, device=DEVICE) / (c_in // groups * math.prod(kernel)) ** 0.5
    b = torch.randn(c_out, device=DEVICE).requires_grad_() if bias else None
    ranks = (3, 2, *(min(2, k) for k in kernel))
    core = torch.randn(ranks, device=DEVICE, requires_grad=True)
    fs = [(torch.randn(m, r, device=DEVICE) / r**0.5).requires_grad_()
          for m, r in zip((c_out, c_in // groups, *kernel), ranks)]
    return [x.requires_grad_(), w, b, core, *fs]


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups,mode,channels,spatial,bias,dtype,layout", GEOMETRIES,
                         ids=GEOMETRY_IDS)
def test_igemm_geometry_vs_reference(igemm, kernel, stride, padding, dilation, groups, mode, channels, spatial, bias,
                                     dtype, layout):
    inputs = _setup_nd(kernel, groups, channels, spatial, bias, layout)
    kw = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups, "padding_mode": mode}
    spec = ConvSpec.make(kernel, **kw)

    def kern(x, w, b, core, *fs):
        return fk.flora_conv(x, w, b, core, fs, 0.8, strategy="factorized", backend="triton", **kw)

    def oracle(x, w, b, core, *fs):
        return ref.conv_factorized(x, w, b, core, fs, 0.8, spec)

    compare(kern, oracle, inputs, dtype, ["x", "weight", "bias", "core"] + [f"factors[{i}]" for i in range(len(inputs) - 4)])
    assert igemm, "the igemm variant did not run"
    if mode == "zeros":
        x, w, b = inputs[:3]
        assert kern(*inputs).stride() == conv_nd(x, w, b, spec).stride()  # the layout torch's conv gives


def test_igemm_grouped_multi_tile(igemm):
    """Groups with more channels than one K block (16) and more output channels than one column tile (32)."""
    inputs = _setup_nd((3,), 2, (38, 70), (9,), True, "contiguous", n=1)
    spec = ConvSpec.make((3,), padding=1, groups=2)

    def kern(x, w, b, core, *fs):
        return fk.flora_conv(x, w, b, core, fs, 1.3, padding=1, groups=2, strategy="factorized", backend="triton")

    compare(kern, lambda x, w, b, core, *fs: ref.conv_factorized(x, w, b, core, fs, 1.3, spec), inputs, torch.float32,
            ["x", "weight", "bias", "core", "factors[0]", "factors[1]", "factors[2]"])
    assert igemm, "the igemm variant did not run"


@pytest.mark.parametrize("kernel,groups,mode,layout", [
    ((3,), 3, "zeros", "contiguous"),  # the packed mask from mask_bits
    ((3, 3), 2, "reflect", "channels_last"),  # the mask redrawn by the expansion
], ids=["1d-g3-zeros", "2d-g2-reflect"])
def test_igemm_dropout_matches_cudnn_variant(monkeypatch, kernel, groups, mode, layout):
    """p > 0, one seed: the igemm variant's output and every gradient equal the cudnn variant's (same mask)."""
    from flora_kernels.backends.triton import conv as C

    monkeypatch.setattr(C, "new_seed", lambda: 1234)
    inputs = _setup_nd(kernel, groups, (3 * groups, 2 * groups + 1 if groups == 1 else 2 * groups), (4,) * len(kernel),
                       True, layout)
    kw = {"padding": 1, "groups": groups, "padding_mode": mode, "dropout_p": 0.35}
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    out = {}
    for variant in C.CONV_VARIANTS:
        fk.force_dispatch(f"triton/factorized/{variant}")
        try:
            x, w, b, core, *fs = inputs
            y = fk.flora_conv(x, w, b, core, fs, 0.7, strategy="factorized", backend="triton", **kw)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
            out[variant] = [y, *torch.autograd.grad(y, leaves, dy)]
        finally:
            fk.force_dispatch(None)
    y0 = ref.conv_factorized(*inputs[:4], inputs[4:], 0.7, ConvSpec.make(kernel, padding=1, groups=groups, padding_mode=mode))
    assert (out["igemm"][0] - y0).abs().max() > 1e-3  # the dropout is active
    for i, (a, r) in enumerate(zip(out["igemm"], out["cudnn"])):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"tensor {i}: {m}")


def test_mask_bits_equal_the_projections():
    """``mask_bits`` packs the draws the projection makes (and packs itself for one group), any channel count."""
    from flora_kernels.backends.triton import channel_gemm as cgemm
    from flora_kernels.backends.triton import conv_igemm as ig

    def keep(b, c):  # (N, L, words) -> (N, L, C) bits; the last word's bits past C are never read
        return ((b.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=DEVICE)) & 1).flatten(-2)[..., :c]

    for c in (5, 37, 70):
        x = torch.randn(2, c, 3, 5, device=DEVICE)
        bits = torch.empty((2, 15, -(-c // 32)), dtype=torch.int32, device=DEVICE)
        cgemm.project(x, torch.randn(c, 2, device=DEVICE), 1, torch.empty(2, 2, 3, 5, device=DEVICE), True, 0.3, 77, bits)
        assert torch.equal(keep(ig.mask_bits(x, 0.3, 77), c), keep(bits, c))
        assert 0.6 < keep(bits, c).float().mean().item() < 0.8


def test_torch_compile_igemm_grouped_1d(igemm):
    """1-D, grouped, reflect padding: traces under torch.compile (aot_eager, fullgraph), matches eager."""
    torch._dynamo.reset()
    x, w, b, core, *fs = _setup_nd((3,), 2, (4, 6), (9,), True, "contiguous")

    def fn(x, b, core, f0, f1, f2):
        return fk.flora_conv(x, w, b, core, [f0, f1, f2], 0.5, stride=2, padding=1, groups=2, padding_mode="reflect",
                             strategy="factorized", backend="triton")

    inputs = [x, b, core, *fs]
    assert_compiles_like_eager(fn, inputs)


def test_igemm_wav2vec2_conv1d(igemm):
    """A tiny wav2vec2 whose grouped, padded positional Conv1d (groups 4, kernel 8, padding 4) is
    adapted with backend="triton", the conv forced to igemm: output and adapter gradients equal the
    reference backend's."""
    transformers = pytest.importorskip("transformers")
    import copy

    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
        mask_time_prob=0.0)).to(DEVICE).eval()
    targets = ["pos_conv_embed.conv"]
    models = {}
    for backend in ("triton", "reference"):
        m = copy.deepcopy(model)
        fk.inject_flora(m, fk.FLoRAConfig(rank=4, target_modules=targets, strategy="factorized", backend=backend))
        models[backend] = m
    with torch.no_grad():
        for name, p in models["triton"].named_parameters():
            if ".flora_core." in name:
                p.normal_(0, 0.3)
    models["reference"].load_state_dict(models["triton"].state_dict())
    assert sum(".flora_core." in n for n, _ in models["triton"].named_parameters()) == 1
    wave = torch.randn(1, 160, device=DEVICE)
    res = {}
    for backend, m in models.items():
        y = m(wave).last_hidden_state
        params = [p for _, p in sorted(m.named_parameters()) if p.requires_grad]
        res[backend] = [y, *torch.autograd.grad(y.square().sum(), params)]
    assert igemm, "the igemm variant did not run"
    for i, (a, r) in enumerate(zip(res["triton"], res["reference"], strict=True)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"tensor {i}: {m}")
