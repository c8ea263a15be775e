"""``flora::input_fold`` (the conv adapter's input fold as one CPU op each way) and the cpp
backend's folded conv: values and every gradient against ``tucker.input_fold`` run by autograd
in float64, over odd shapes and 1-3 kernel dims; fp64 gradcheck; bad input raising clean errors;
the backend switching to its projection form above ``SMALL_FOLD``."""

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
