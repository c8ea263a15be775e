"""The fused core-conv ops (``adapter_conv_expand_``, ``adapter_conv_shrink_grad_input_``) on CPU and
the factorized conv of the ``cpp`` backend that runs through them (``ConvFused``): op semantics
against F.conv + einsum, opcheck, bad input, outputs and every gradient against the reference
backend (odd shapes, stride, dilation, asymmetric pads, 1-D, channels_last in place), the dropout
mask against the unfused composition, torch.compile, and a real model (timm ResNet).

Skipped when the extension is not built.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flora_kernels as fk
from flora_kernels.backends.ext import backend as ext_backend
from flora_kernels.backends.ext import load_extension
from flora_kernels.backends.ext.ops import ConvFused
from flora_kernels.convspec import ConvSpec
from flora_kernels.testing import assert_close

_REASON = load_extension()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"extension not built: {_REASON}")


@pytest.fixture(autouse=True)
def projection_form(monkeypatch):
    """Every conv of the cpp backend in its projection form (``ConvFused`` and the unfused ops), as
    on CUDA: small folds would otherwise take the folded form (tests/backends/ext/test_ext_input_fold.py)."""
    from flora_kernels.backends.ext import cpp

    monkeypatch.setattr(cpp, "SMALL_FOLD", -1)



def ops():
    return torch.ops.flora


def _cl(t: torch.Tensor) -> torch.Tensor:
    """t with its channel dim innermost in memory (channels_last for 4-D, (N, L, C) for 3-D)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def _flat(pads):
    return [p for lo_hi in pads for p in lo_hi]


def _ref_conv(z, k, stride, pads, dilation):
    """conv(z, k) with (lo, hi) zero pads per dim (F.pad takes the last dim first)."""
    zp = F.pad(z, [p for lo_hi in reversed(pads) for p in lo_hi])
    conv = F.conv1d if z.dim() == 3 else F.conv2d
    return conv(zp, k, None, stride, 0, dilation)


# (N, C_in, C_out, spatial, kernel, stride, pads, dilation, r_in, r_out)
OP_CASES = [
    (2, 13, 19, (7, 9), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 3, 8),
    (2, 24, 40, (9, 7), (3, 2), (2, 1), ((0, 2), (1, 0)), (1, 2), 8, 3),
    (1, 6, 5, (11,), (4,), (2,), ((2, 1),), (2,), 5, 16),
    (3, 5, 7, (6, 5), (1, 1), (1, 2), ((0, 0), (0, 0)), (1, 1), 2, 2),
]


def _op_id(c):
    return f"{len(c[3])}d-n{c[0]}-ci{c[1]}-co{c[2]}-k{'x'.join(map(str, c[4]))}-s{c[5][0]}-r{c[8]}x{c[9]}"


@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", OP_CASES, ids=_op_id)
def test_ops_match_formulas(case, dtype, cl):
    n, ci, co, sp, ks, stride, pads, dil, ri, ro = case
    lay = _cl if cl else (lambda t: t)
    z = lay(torch.randn(n, ri, *sp, dtype=dtype))
    k = torch.randn(ro, ri, *ks, dtype=dtype)
    u_out, u_in = torch.randn(co, ro, dtype=dtype), torch.randn(ci, ri, dtype=dtype)
    u_ref = _ref_conv(z, k, stride, pads, dil)
    y0 = lay(torch.randn(n, co, *u_ref.shape[2:], dtype=dtype))
    y = y0.clone()
    u = ops().adapter_conv_expand_(y, z, k, u_out, list(stride), _flat(pads), list(dil), 0.7)
    assert_close(u, u_ref, dtype, msg="u")
    assert_close(y, y0 + 0.7 * torch.einsum("or,nr...->no...", u_out, u_ref), dtype, msg="y")
    assert y.stride() == y0.stride() and u.stride() == torch.empty_like(u_ref, memory_format=(
        torch.channels_last if cl and z.dim() == 4 else torch.contiguous_format)).stride()
    # the backward op: dz = the conv's input gradient, dx += mask * (u_in . dz)
    p, seed = 0.3, 17
    du = lay(torch.randn_like(u_ref))
    zz = z.detach().clone().requires_grad_(True)
    (_ref_conv(zz, k, stride, pads, dil) * du).sum().backward()
    dx0 = lay(torch.randn(n, ci, *sp, dtype=dtype))
    dx = dx0.clone()
    dz = ops().adapter_conv_shrink_grad_input_(dx, du, k, u_in, list(stride), _flat(pads), list(dil), p, seed)
    assert_close(dz, zz.grad, dtype, msg="dz")
    mask = ops().dropout_mask(dx0.contiguous(), p, seed)
    assert_close(dx, dx0 + mask * torch.einsum("cr,nr...->nc...", u_in, zz.grad), dtype, msg="dx")
    assert dx.stride() == dx0.stride()
    # the same mask and values as the unfused op on the same dz
    dx2 = dx0.clone()
    ops().adapter_shrink_grad_input_(dx2, dz, u_in, 1, p, seed)
    torch.testing.assert_close(dx, dx2, rtol=0, atol=0)


def _samples():
    f = torch.randn
    z, k, uo = f(2, 3, 8, 6), f(4, 3, 3, 2), f(5, 4)
    y = f(2, 5, 4, 5)  # stride (2, 1), pads ((1, 0), (0, 0)), dilation (1, 1): out (4, 5)
    du, ui, dx = f(2, 4, 4, 5), f(6, 3), f(2, 6, 8, 6)
    z1, k1, y1 = f(2, 3, 9), f(4, 3, 2), f(2, 5, 5)  # 1-D, stride 2, pads (1, 1), dilation 2: out 5
    geo, geo1 = ([2, 1], [1, 0, 0, 0], [1, 1]), ([2], [1, 1], [2])
    return {
        "adapter_conv_expand_": [(y.clone(), z, k, uo, *geo, 0.5), (_cl(y), _cl(z), k, uo, *geo, 0.5),
                                 (y1.clone(), z1, k1, uo, *geo1, 1.5)],
        "adapter_conv_shrink_grad_input_": [(dx.clone(), du, k, ui, *geo, 0.0, 0),
                                            (_cl(dx), _cl(du), k, ui, *geo, 0.3, 9),
                                            (f(2, 6, 9), f(2, 4, 5), k1, ui, *geo1, 0.2, 4)],
    }


@pytest.mark.parametrize("name", list(_samples()), ids=str)
def test_opcheck(name):
    for args in _samples()[name]:
        torch.library.opcheck(getattr(ops(), name), args)


def _bad_calls():
    f = torch.randn
    z, k, uo, y = f(2, 3, 7, 6), f(4, 3, 3, 3), f(5, 4), f(2, 5, 5, 4)
    du, ui, dx = f(2, 4, 5, 4), f(6, 3), f(2, 6, 7, 6)
    g = ([1, 1], [0, 0, 0, 0], [1, 1])
    e, sg = ops().adapter_conv_expand_, ops().adapter_conv_shrink_grad_input_
    return {
        "expand-y-shape": lambda: e(f(2, 5, 5, 5), z, k, uo, *g, 1.0),
        "expand-k-rin": lambda: e(y, z, f(4, 2, 3, 3), uo, *g, 1.0),
        "expand-k-dims": lambda: e(y, z, f(4, 3, 3), uo, *g, 1.0),
        "expand-uout-rank": lambda: e(y, z, k, f(5, 3), *g, 1.0),
        "expand-3d-conv": lambda: e(f(2, 5, 3, 3, 3), f(2, 3, 5, 5, 5), f(4, 3, 3, 3, 3), uo, [1] * 3, [0] * 6,
                                    [1] * 3, 1.0),
        "expand-padding-len": lambda: e(y, z, k, uo, [1, 1], [0, 0], [1, 1], 1.0),
        "expand-stride-zero": lambda: e(y, z, k, uo, [0, 1], [0, 0, 0, 0], [1, 1], 1.0),
        "expand-kernel-too-big": lambda: e(y, f(2, 3, 2, 2), k, uo, *g, 1.0),
        "expand-dtype": lambda: e(y.double(), z, k, uo, *g, 1.0),
        "expand-strided-y": lambda: e(f(2, 5, 5, 8)[..., ::2], z, k, uo, *g, 1.0),
        "grad-du-shape": lambda: sg(dx, f(2, 4, 5, 5), k, ui, *g, 0.0, 0),
        "grad-uin-shape": lambda: sg(dx, du, k, f(6, 2), *g, 0.0, 0),
        "grad-dx-batch": lambda: sg(f(3, 6, 7, 6), du, k, ui, *g, 0.0, 0),
        "grad-p": lambda: sg(dx, du, k, ui, *g, 1.0, 0),
        "grad-dtype": lambda: sg(dx, du, k.double(), ui, *g, 0.0, 0),
    }


@pytest.mark.parametrize("case", list(_bad_calls()), ids=str)
def test_bad_input_raises(case):
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        _bad_calls()[case]()
    assert "expected" in str(info.value).lower(), str(info.value)


# ---- the backend ----------------------------------------------------------------------------------
class _Spy:
    """Counts ConvFused.apply calls (the fused path is taken, not the unfused composition)."""

    def __init__(self):
        self.calls = 0

    def apply(self, *args):
        self.calls += 1
        return ConvFused.apply(*args)


@pytest.fixture
def spy(monkeypatch):
    s = _Spy()
    monkeypatch.setattr(ext_backend, "ConvFused", s)
    return s


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _run(backend, inputs, geo, scale, p=0.0, seed=None):
    leaves = _leaves(*inputs)
    x, w, b, core, *fs = leaves
    if seed is not None:
        torch.manual_seed(seed)
    y = fk.flora_conv(x, w, b, core, fs, scale, strategy="factorized", backend=backend, dropout_p=p, **geo)
    gen = torch.Generator().manual_seed(5)
    y.backward(torch.randn(y.shape, generator=gen, dtype=y.dtype).contiguous(memory_format=(
        torch.channels_last if y.dim() == 4 and y.stride(1) == 1 else torch.contiguous_format)))
    return y, [t.grad for t in leaves]


def _compare(a, b, dtype):
    (ya, ga), (yb, gb) = a, b
    for name, s, t in zip(["out", "x", "w", "b", "core", "u_out", "u_in", "u_k0", "u_k1"], [ya, *ga], [yb, *gb]):
        assert s is not None and t is not None, name
        assert_close(s, t, dtype, msg=name)


# (x shape, C_out, kernel, geometry, ranks)
CONV_CASES = [
    ((2, 13, 7, 9), 19, (3, 3), {"padding": 1}, (3, 8, 2, 3)),
    ((2, 24, 9, 7), 40, (3, 3), {"stride": 2, "dilation": (2, 1), "padding": (2, 0)}, (16, 3, 3, 2)),
    ((2, 5, 8, 7), 6, (4, 2), {"padding": "same"}, (4, 5, 3, 2)),  # asymmetric pads (1, 2), (0, 1)
    ((3, 7, 12), 9, (4,), {"stride": 2, "padding": "valid", "dilation": 2}, (5, 4, 3)),
    ((2, 6, 11), 5, (3,), {"padding": "same"}, (2, 6, 3)),
]


def _case_id(c):
    return f"{len(c[0]) - 2}d-x{'x'.join(map(str, c[0]))}-co{c[1]}-" + "-".join(f"{k}{v}" for k, v in c[3].items())


def _inputs(case, dtype, cl):
    xs, co, ks, geo, ranks = case
    x = torch.randn(*xs, dtype=dtype)
    w = torch.randn(co, xs[1], *ks, dtype=dtype) / 3
    shape = (co, xs[1], *ks)
    core = torch.randn(*ranks, dtype=dtype)
    fs = [torch.randn(i, r, dtype=dtype) / r**0.5 for i, r in zip(shape, ranks)]
    if cl:
        x, w = _cl(x), _cl(w)
    return [x, w, torch.randn(co, dtype=dtype), core, *fs], geo


@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_fused_conv_matches_reference(case, dtype, cl, spy):
    """Output and every gradient (x, weight, bias, core, every factor incl. the spatial ones)."""
    inputs, geo = _inputs(case, dtype, cl)
    got, ref = _run("cpp", inputs, geo, 0.6), _run("reference", inputs, geo, 0.6)
    assert spy.calls == 1
    _compare(got, ref, dtype)
    assert got[0].stride() == ref[0].stride()  # y: torch's conv output, the adapter added in place
    assert got[1][0].stride() == inputs[0].stride()  # dx in x's layout (the adapter added in place)


@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
def test_fused_conv_dropout_matches_unfused(cl, spy, monkeypatch):
    """With dropout the fused path gives the unfused composition's output and gradients (same mask)."""
    inputs, geo = _inputs(CONV_CASES[1], torch.float64, cl)
    fused = _run("cpp", inputs, geo, 0.8, p=0.3, seed=4)
    assert spy.calls == 1
    monkeypatch.setattr(ext_backend, "fused_conv_reason", lambda *a: "forced off")
    unfused = _run("cpp", inputs, geo, 0.8, p=0.3, seed=4)
    assert spy.calls == 1
    _compare(fused, unfused, torch.float64)
    no_drop = _run("cpp", inputs, geo, 0.8)
    assert (fused[0] - no_drop[0]).abs().max() > 1e-3  # the mask did something


def test_fused_conv_partial_grads(spy):
    """Frozen base and a subset of adapter tensors requiring grad: the Function's branches."""
    inputs, geo = _inputs(CONV_CASES[0], torch.float64, True)
    x, w, b, core, *fs = inputs
    for need in ("core", "u_in", "x"):
        leaves = {"core": core.clone().requires_grad_(need == "core"),
                  "u_in": fs[1].clone().requires_grad_(need == "u_in"),
                  "x": x.clone().requires_grad_(need == "x")}
        fl = [fs[0], leaves["u_in"], *fs[2:]]
        y = fk.flora_conv(leaves["x"], w, b, leaves["core"], fl, 0.6, strategy="factorized", backend="cpp", **geo)
        yr = fk.flora_conv(leaves["x"], w, b, leaves["core"], fl, 0.6, strategy="factorized", backend="reference",
                           **geo)
        g = torch.randn_like(y)
        (got,) = torch.autograd.grad(y, leaves[need], g)
        (ref,) = torch.autograd.grad(yr, leaves[need], g)
        torch.testing.assert_close(got, ref)
    assert spy.calls == 3


def test_ineligible_convs_keep_the_composition(spy):
    assert ext_backend.fused_conv_reason(torch.empty(2, 4, 5, 5), torch.empty(3, 2, 3, 3),
                                         ConvSpec.make((3, 3), groups=2)) is not None
    assert ext_backend.fused_conv_reason(torch.empty(2, 4, 5, 5, 5), torch.empty(3, 2, 3, 3, 3),
                                         ConvSpec.make((3, 3, 3))) is not None
    assert ext_backend.fused_conv_reason(torch.empty(2, 4, 5, 5), torch.empty(3, 33, 3, 3),
                                         ConvSpec.make((3, 3))) is not None
    assert ext_backend.fused_conv_reason(torch.empty(2, 4, 5, 5), torch.empty(3, 2, 3, 3),
                                         ConvSpec.make((3, 3), padding=1, padding_mode="reflect")) is not None
    inputs, _ = _inputs(CONV_CASES[0], torch.float64, False)
    _compare(_run("cpp", inputs, {"padding": 1, "padding_mode": "circular"}, 0.6),
             _run("reference", inputs, {"padding": 1, "padding_mode": "circular"}, 0.6), torch.float64)
    assert spy.calls == 0


def test_torch_compile_fullgraph(spy):
    torch._dynamo.reset()
    inputs, geo = _inputs(CONV_CASES[2], torch.float32, True)
    x, w, b, core, *fs = inputs

    def f(x, core, *fs):
        return fk.flora_conv(x, w, b, core, list(fs), 0.5, strategy="factorized", backend="cpp", **geo).sin().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager, comp = _leaves(x, core, *fs), _leaves(x, core, *fs)
    ref = f(*eager)
    out = compiled(*comp)
    torch.testing.assert_close(out, ref)
    ref.backward()
    out.backward()
    for a, b_ in zip(comp, eager, strict=True):
        torch.testing.assert_close(a.grad, b_.grad)
    assert spy.calls >= 2


def test_real_model_timm_resnet(spy):
    """A tiny timm ResNet (strided 3x3 convs, 1x1 projections) adapted on the cpp backend: output
    and every adapter gradient against the same model on the reference backend."""
    timm = pytest.importorskip("timm")

    def build(backend):
        torch.manual_seed(0)
        m = timm.create_model("resnet18", num_classes=5, layers=(1, 1, 1, 1), channels=(8, 16, 16, 16),
                              stem_width=8, zero_init_last=False).double()
        fk.inject_flora(m, fk.FLoRAConfig(rank=4, target_modules=r".*conv\d|.*downsample\.0", strategy="factorized",
                                          backend=backend))
        torch.manual_seed(1)
        for name, prm in m.named_parameters():
            if "flora" in name and prm.requires_grad:
                prm.data.normal_(0, 0.3)
        return m

    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    results = []
    for backend in ("cpp", "reference"):
        m = build(backend)
        y = m(x)
        y.square().sum().backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        results.append((y.detach(), grads))
    assert spy.calls > 5
    (y, g), (yr, gr) = results
    torch.testing.assert_close(y, yr, rtol=1e-9, atol=1e-9)
    assert g.keys() == gr.keys() and any("flora" in n for n in g)
    for n in g:
        torch.testing.assert_close(g[n], gr[n], rtol=1e-8, atol=1e-8, msg=lambda m, n=n: f"{n}: {m}")


# ---- on a GPU (marked gpu: skipped without one) ---------------------------------------------------
GPU_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture
def cuda_ok():
    from flora_kernels.backends.ext import CudaBackend

    reason = CudaBackend().unavailable_reason()
    if reason is not None:
        pytest.skip(f"extension not built with CUDA: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", list(GPU_TOL), ids=str)
@pytest.mark.parametrize("case", OP_CASES, ids=_op_id)
def test_cuda_ops_match_cpu(case, dtype, cl, cuda_ok):
    """The CUDA kernel (conv_mix_kernel) of both ops against the CPU ops in fp64, and opcheck on CUDA."""
    n, ci, co, sp, ks, stride, pads, dil, ri, ro = case
    lay = _cl if cl else (lambda t: t)
    geo = (list(stride), _flat(pads), list(dil))
    z = lay(torch.randn(n, ri, *sp, dtype=torch.float64))
    k = torch.randn(ro, ri, *ks, dtype=torch.float64) / (ri * len(ks)) ** 0.5
    u_out, u_in = torch.randn(co, ro, dtype=torch.float64), torch.randn(ci, ri, dtype=torch.float64)
    out = _ref_conv(z, k, stride, pads, dil).shape[2:]
    y, du = lay(torch.randn(n, co, *out, dtype=torch.float64)), lay(torch.randn(n, ro, *out, dtype=torch.float64))
    dx = lay(torch.randn(n, ci, *sp, dtype=torch.float64))

    def run(dev, dt):
        t = [a.to(dev, dt) for a in (y, z, k, u_out, dx, du, u_in)]
        u = ops().adapter_conv_expand_(t[0], t[1], t[2], t[3], *geo, 0.7)
        dz = ops().adapter_conv_shrink_grad_input_(t[4], t[5], t[2], t[6], *geo, 0.3, 8)
        return [r.cpu().double() for r in (u, t[0], dz, t[4])], [r.stride() for r in (u, t[0], dz, t[4])]

    (want, wst), (got, gst) = run("cpu", torch.float64), run("cuda", dtype)
    for name, a, b in zip(("u", "y", "dz", "dx"), got, want):
        err = (a - b).abs().max().item()
        assert err <= GPU_TOL[dtype] * max(1.0, b.abs().max().item()), f"{name}: max error {err:.3g}"
    assert gst == wst
    if dtype == torch.float32:
        for name, args in _samples().items():
            for a in args:
                torch.library.opcheck(getattr(ops(), name), [v.cuda() if torch.is_tensor(v) else v for v in a])


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[3]], ids=_case_id)
def test_single_dy_pass_matches_two_ops(case, monkeypatch):
    """A channel-minor dy (channels_last 4-D, (N, L, C) memory for 1-D) takes one adapter_linear_grad
    pass for du and dU_out; a contiguous dy the two ops; same gradients."""
    from flora_kernels.backends.ext import ops as ext_ops

    inputs, geo = _inputs(case, torch.float64, False)
    x, w, b, core, *fs = inputs
    spec = ConvSpec.make(tuple(w.shape[2:]), **geo)
    calls = []
    real = ext_ops.flora

    class Counting:
        def __getattr__(self, name):
            if name == "adapter_linear_grad":
                calls.append(name)
            return getattr(real(), name)

    monkeypatch.setattr(ext_ops, "flora", Counting)
    grads = []
    for layout in (_cl, lambda t: t.contiguous()):
        leaves = _leaves(x, core, *fs)
        k = ext_backend.conv_core(leaves[1], leaves[2:], 1)
        y = ConvFused.apply(leaves[0], w, b, k, leaves[2], leaves[3], spec, 0.7, 0.0, 0)
        dy = layout(torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype))
        assert (ext_ops.channel_minor_tokens(dy) is not None) == (layout is _cl)
        y.backward(dy)
        grads.append([t.grad for t in leaves])
    assert calls == ["adapter_linear_grad"]
    for a, b_ in zip(*grads):
        torch.testing.assert_close(a, b_)
