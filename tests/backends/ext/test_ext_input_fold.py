"""``flora::input_fold`` (the conv adapter's input fold as one CPU op each way) and
``flora::conv_folded`` (the cpp backend's whole folded conv as one op, one C++ autograd node):
values and every gradient against the reference run by autograd in float64, over odd shapes, 1-3
kernel dims, groups, stride, dilation, dropout's separate input, a trained or frozen base,
contiguous and channels-innermost layouts, fp32/fp16; fp64 gradcheck; opcheck; bad input raising
clean errors; the backend switching to its projection form above ``SMALL_FOLD``."""

from __future__ import annotations

import pytest
import torch

import flora_kernels as fk
from flora_kernels.testing import assert_close
from flora_kernels.tucker import input_fold

pytestmark = pytest.mark.skipif(fk.available_backends().get("cpp") != "ok", reason="cpp backend not built")

SHAPES = [  # (r_out, r_in, kernel ranks), (I_1, kernel sizes)
    ((3, 2, (2,)), (5, (3,))),
    ((4, 3, (2, 3)), (7, (3, 5))),
    ((2, 5, (1, 2)), (6, (1, 3))),
    ((3, 2, (2, 2, 3)), (4, (3, 2, 3))),
    ((1, 1, (3, 3)), (1, (3, 3))),
]


def _tensors(shape, dtype, seed=0):
    (r_out, r_in, rk), (i1, ks) = shape
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, *rk, generator=g, dtype=torch.float64)
    u_in = torch.randn(i1, r_in, generator=g, dtype=torch.float64)
    kernel = [torch.randn(k, r, generator=g, dtype=torch.float64) for k, r in zip(ks, rk)]
    return [t.to(dtype).requires_grad_() for t in (core, u_in, *kernel)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_fold_matches_reference_output_and_grads(shape, dtype):
    ts = _tensors(shape, dtype)
    ref = [t.detach().double().requires_grad_() for t in ts]
    want = input_fold(ref[0], [torch.eye(ref[0].shape[0], dtype=torch.float64), *ref[1:]])
    got = torch.ops.flora.input_fold(ts[0], ts[1], ts[2:])
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    assert_close(got, want, dtype)
    dy = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for g_got, g_want in zip(torch.autograd.grad(got, ts, dy.to(dtype)), torch.autograd.grad(want, ref, dy)):
        assert_close(g_got, g_want, dtype)


@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_input_fold_gradcheck(shape):
    assert torch.autograd.gradcheck(lambda c, u, *k: torch.ops.flora.input_fold(c, u, list(k)),
                                     _tensors(shape, torch.float64), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("call,match", [
    (lambda o: o.input_fold(torch.randn(2, 3, 2), torch.randn(4, 2), [torch.randn(3, 2)]), "u_in: expected shape"),
    (lambda o: o.input_fold(torch.randn(2, 3, 2), torch.randn(4, 3), [torch.randn(3, 2), torch.randn(3, 2)]),
     "core: expected 4 dims"),
    (lambda o: o.input_fold(torch.randn(2, 3, 2), torch.randn(4, 3), [torch.randn(3, 3)]), "kernel factor 0"),
    (lambda o: o.input_fold(torch.randn(2, 3, 2), torch.randn(4, 3).double(), [torch.randn(3, 2)]), "dtype"),
    (lambda o: o.input_fold_backward(torch.randn(2, 5, 3), torch.randn(2, 3, 2), torch.randn(4, 3),
                                     [torch.randn(3, 2)]), "grad: expected shape"),
])
def test_input_fold_bad_input_raises(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(torch.ops.flora)


@pytest.mark.parametrize("c_in,rank,hw,folded", [
    (6, 3, (9, 7), True),  # small fold, few pixels: folded form
    (96, 16, (9, 7), False),  # a big fold: projection form
    (24, 3, (160, 150), False),  # a small fold on many pixels: the folded form's extra arithmetic decides
])
@pytest.mark.parametrize("groups", [1, 2])
def test_cpp_conv_both_forms_match_reference(c_in, rank, hw, folded, groups):
    from flora_kernels.backends.ext.cpp import folded_form

    torch.manual_seed(0)
    base = torch.nn.Conv2d(c_in, 8 * groups, 3, stride=2, padding=1, groups=groups)
    layers = {b: fk.FLoRAConv2d(base, rank=rank, strategy="factorized", backend=b) for b in ("cpp", "reference")}
    with torch.no_grad():
        for t in layers["cpp"].parameters():
            if t.requires_grad:
                t.normal_()
    layers["reference"].load_state_dict(layers["cpp"].state_dict())
    core, _ = layers["cpp"].tensors("default")
    x = torch.randn(2, c_in, *hw)
    assert folded_form(x, base.weight, core, groups) == folded
    outs = {}
    for b, layer in layers.items():
        xr = x.clone().requires_grad_()
        y = layer(xr)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
        grads = torch.autograd.grad(y, [xr, core if b == "cpp" else layer.tensors("default")[0]], dy)
        outs[b] = (y, *grads)
    for got, want in zip(outs["cpp"], outs["reference"]):
        assert_close(got, want, torch.float32)


# ---- flora::conv_folded: the whole folded conv as one op (one C++ autograd node) -------------------------------
FOLDED_CASES = [  # x shape, C_out, kernel, groups, stride, padding, dilation, (r_out, r_in, kernel ranks)
    ((1, 6, 9, 7), 8, (3, 3), 1, (1, 1), (1, 1), (1, 1), (3, 2, (2, 3))),
    ((3, 6, 9, 7), 8, (3, 3), 1, (2, 1), (1, 0), (1, 2), (3, 4, (2, 2))),
    ((2, 6, 8, 5), 9, (3, 1), 3, (1, 1), (2, 0), (2, 1), (2, 2, (3, 1))),
    ((1, 4, 7, 6), 4, (2, 3), 2, (2, 2), (0, 1), (1, 1), (3, 1, (1, 2))),
    ((2, 5, 11), 7, (3,), 1, (2,), (1,), (1,), (2, 3, (2,))),
    ((1, 4, 5, 4, 6), 6, (3, 1, 2), 2, (1, 1, 2), (1, 0, 1), (1, 1, 1), (2, 2, (2, 1, 2))),
]


def _folded_tensors(case, dtype, seed=0):
    xs, c_out, k, g, _, _, _, (r_out, r_in, rk) = case
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype)

    return {"x": r(*xs), "xa": r(*xs), "weight": r(c_out, xs[1] // g, *k, s=0.3), "bias": r(c_out),
            "core": r(r_out, r_in, *rk), "u_out": r(c_out, r_out), "u_in": r(xs[1] // g, r_in),
            "kernel": [r(n, q) for n, q in zip(k, rk)]}


def _folded_reference(t, case, scale, dropout):
    """conv(x, W) + b + s U_out . conv(xa, A) in float64 (the reference path's folded form)."""
    from flora_kernels.convspec import ConvSpec
    from flora_kernels.reference import conv_folded

    _, _, k, g, stride, padding, dilation, _ = case
    spec = ConvSpec.make(k, stride, padding, dilation, g)
    a = input_fold(t["core"], [t["u_out"], t["u_in"], *t["kernel"]])
    return conv_folded(t["x"], t["xa"] if dropout else t["x"], t["weight"], t["bias"], a, t["u_out"], scale, spec)


def _run_folded(t, case, scale, dropout):
    _, _, _, g, stride, padding, dilation, _ = case
    return torch.ops.flora.conv_folded(t["x"], t["xa"] if dropout else None, t["weight"], t["bias"], t["core"],
                                       t["u_out"], t["u_in"], t["kernel"], scale, list(stride), list(padding),
                                       list(dilation), g)


def _leaves(t, trained, dropout):
    names = ["x", *(["xa"] if dropout else []), "core", "u_out", "u_in", *(["weight", "bias"] if trained else [])]
    return [t[n] for n in names] + (t["kernel"] if "core" in names else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dropout", [False, True], ids=["x", "xa"])
@pytest.mark.parametrize("trained", [False, True], ids=["frozen", "trained-base"])
@pytest.mark.parametrize("case", FOLDED_CASES, ids=lambda c: f"x{'x'.join(map(str, c[0]))}-g{c[3]}")
def test_conv_folded_matches_reference_output_and_grads(case, trained, dropout, layout, dtype):
    """Output and every gradient (x, xa, core, u_out, u_in, kernel factors; weight and bias when the
    base trains) against the float64 reference, contiguous and channels-innermost."""
    t = _folded_tensors(case, dtype)
    if layout == "channels_last":  # channels innermost in memory, x and the weight
        for n in ("x", "xa", "weight"):
            t[n] = t[n].movedim(1, -1).contiguous().movedim(-1, 1)
    ref = {n: ([k.double().requires_grad_() for k in v] if n == "kernel" else v.double().requires_grad_())
           for n, v in t.items()}
    for v in _leaves(t, trained, dropout):
        v.requires_grad_()
    got, want = _run_folded(t, case, 0.7, dropout), _folded_reference(ref, case, 0.7, dropout)
    assert got.dtype == dtype and got.shape == want.shape
    # channels innermost when x has them so (torch's rule for a conv output), else contiguous
    assert got.movedim(1, -1).is_contiguous() if layout == "channels_last" else got.is_contiguous()
    assert_close(got, want, dtype)
    dy = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    leaves = _leaves(t, trained, dropout)
    grads = torch.autograd.grad(got, leaves, dy.to(dtype))
    wants = torch.autograd.grad(want, _leaves(ref, trained, dropout), dy)
    for g_got, g_want, leaf in zip(grads, wants, leaves):
        assert g_got.shape == leaf.shape and g_got.dtype == dtype
        assert_close(g_got, g_want, dtype)


@pytest.mark.parametrize("dropout", [False, True], ids=["x", "xa"])
@pytest.mark.parametrize("case", FOLDED_CASES[1:4], ids=lambda c: f"x{'x'.join(map(str, c[0]))}-g{c[3]}")
def test_conv_folded_gradcheck(case, dropout):
    t = _folded_tensors(case, torch.float64)
    names = ["x", "weight", "bias", "core", "u_out", "u_in"] + (["xa"] if dropout else [])
    d = len(case[2])

    def fn(*vs):
        s = dict(t, **dict(zip(names, vs[:len(names)])), kernel=list(vs[len(names):]))
        return _run_folded(s, case, 0.7, dropout)

    inputs = [t[n].requires_grad_() for n in names] + [k.requires_grad_() for k in t["kernel"]]
    assert len(inputs) == len(names) + d
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_conv_folded_opcheck():
    for case in (FOLDED_CASES[0], FOLDED_CASES[2]):
        for dropout in (False, True):
            t = _folded_tensors(case, torch.float32)
            _, _, _, g, stride, padding, dilation, _ = case
            geo = (list(stride), list(padding), list(dilation), g)
            args = (t["x"], t["xa"] if dropout else None, t["weight"], t["bias"], t["core"], t["u_out"], t["u_in"],
                    t["kernel"], 0.7, *geo)
            # the forward and backward ops are the autograd node's halves (no autograd of their own)
            torch.library.opcheck(torch.ops.flora.conv_folded_forward, args)
            out, a, h = torch.ops.flora.conv_folded_forward(*args)
            back = (torch.randn_like(out), t["x"], t["xa"] if dropout else None, t["weight"], t["core"], t["u_out"],
                    t["u_in"], t["kernel"], a.detach(), h.detach(), 0.7, *geo)
            for mask in ([True, dropout, False, True, True, True], [False, False, True, False, False, True]):
                torch.library.opcheck(torch.ops.flora.conv_folded_backward, (*back, mask))
            for v in (t["x"], t["core"], t["u_out"], t["u_in"], *t["kernel"]):
                v.requires_grad_()
            torch.library.opcheck(torch.ops.flora.conv_folded, args)


@pytest.mark.parametrize("change,match", [
    ({"weight": torch.randn(8, 5, 3, 3)}, "x: expected 5 channels"),
    ({"u_out": torch.randn(8, 2)}, "u_out: expected shape"),
    ({"u_in": torch.randn(5, 2)}, "u_in: expected shape"),
    ({"kernel": [torch.randn(3, 2), torch.randn(2, 3)]}, "kernel factor 1"),
    ({"bias": torch.randn(7)}, "bias: expected shape"),
    ({"xa": torch.randn(1, 6, 9, 6)}, "xa: expected the shape"),
    ({"x": torch.randn(1, 6, 9, 7).double()}, "dtype"),
    ({"groups": 3}, "groups: expected an int >= 1 dividing"),
])
def test_conv_folded_bad_input_raises(change, match):
    t = _folded_tensors(FOLDED_CASES[0], torch.float32)
    t.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flora.conv_folded(t["x"], t.get("xa"), t["weight"], t["bias"], t["core"], t["u_out"], t["u_in"],
                                    t["kernel"], 1.0, [1, 1], [1, 1], [1, 1], t.get("groups", 1))
