"""``flora::conv_merged`` (the cpp backend's merged conv as one op, one C++ autograd node): output and
every gradient against the float64 reference (conv by W + s dW, dW the full reconstruct), over odd
shapes, 1-3 kernel dims, groups, depthwise convs with a channel multiplier (the extension's weight
gradient), stride, dilation, a trained or frozen base, contiguous and channels-innermost layouts,
fp32/fp16; fp64 gradcheck; opcheck; bad input; the FLoRA layer on the cpp merged path against the
reference path, its explicit-padding convs, and torch.compile holding the op alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flora_kernels as fk
from flora_kernels.testing import assert_close
from flora_kernels.tucker import tucker_reconstruct

pytestmark = pytest.mark.skipif(fk.available_backends().get("cpp") != "ok", reason="cpp backend not built")

CASES = [  # x shape, C_out, kernel, groups, stride, padding, dilation, (r_out, r_in, kernel ranks)
    ((1, 6, 9, 7), 8, (3, 3), 1, (1, 1), (1, 1), (1, 1), (3, 2, (2, 3))),
    ((3, 6, 9, 7), 8, (3, 3), 1, (2, 1), (1, 0), (1, 2), (3, 4, (2, 2))),
    ((2, 6, 8, 5), 9, (3, 1), 3, (1, 1), (2, 0), (2, 1), (2, 2, (3, 1))),
    ((2, 5, 9, 8), 5, (7, 7), 5, (1, 1), (3, 3), (1, 1), (3, 1, (3, 2))),  # depthwise
    ((2, 4, 7, 6), 8, (3, 2), 4, (2, 1), (1, 0), (1, 2), (2, 1, (2, 2))),  # depthwise, multiplier 2
    ((2, 5, 11), 7, (3,), 1, (2,), (1,), (1,), (2, 3, (2,))),
    ((1, 4, 5, 4, 6), 6, (3, 1, 2), 2, (1, 1, 2), (1, 0, 1), (1, 1, 1), (2, 2, (2, 1, 2))),
    ((2, 8, 5, 5), 12, (1, 1), 1, (1, 1), (0, 0), (1, 1), (4, 3, (1, 1))),  # pointwise
]


def _case_id(c) -> str:
    return f"x{'x'.join(map(str, c[0]))}-k{'x'.join(map(str, c[2]))}-g{c[3]}"


def _tensors(case, dtype, seed=0):
    xs, c_out, k, g, _, _, _, (r_out, r_in, rk) = case
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype)

    return {"x": r(*xs), "weight": r(c_out, xs[1] // g, *k, s=0.3), "bias": r(c_out), "core": r(r_out, r_in, *rk),
            "u_out": r(c_out, r_out), "u_in": r(xs[1] // g, r_in), "kernel": [r(n, q) for n, q in zip(k, rk)]}


def _geometry(case):
    _, _, _, g, stride, padding, dilation, _ = case
    return list(stride), list(padding), list(dilation), g


def _run(t, case, scale):
    return torch.ops.flora.conv_merged(t["x"], t["weight"], t["bias"], t["core"], t["u_out"], t["u_in"], t["kernel"],
                                       scale, *_geometry(case))


def _reference(t, case, scale):
    """conv(x, W + s dW) + b in the tensors' dtype, dW the full Tucker reconstruct."""
    stride, padding, dilation, g = _geometry(case)
    delta = tucker_reconstruct(t["core"], [t["u_out"], t["u_in"], *t["kernel"]])
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[len(stride) - 1]
    return conv(t["x"], t["weight"] + scale * delta, t["bias"], stride, padding, dilation, g)


def _leaves(t, trained):
    return [t[n] for n in ("x", "core", "u_out", "u_in", *(("weight", "bias") if trained else ()))] + t["kernel"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("trained", [False, True], ids=["frozen", "trained-base"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference_output_and_grads(case, trained, layout, dtype):
    t = _tensors(case, dtype)
    if layout == "channels_last":  # channels innermost in memory, x and the weight
        for n in ("x", "weight"):
            t[n] = t[n].movedim(1, -1).contiguous().movedim(-1, 1)
    ref = {n: ([k.double().requires_grad_() for k in v] if n == "kernel" else v.double().requires_grad_())
           for n, v in t.items()}
    leaves = _leaves(t, trained)
    for v in leaves:
        v.requires_grad_()
    got, want = _run(t, case, 0.7), _reference(ref, case, 0.7)
    assert got.dtype == dtype and got.shape == want.shape
    assert got.movedim(1, -1).is_contiguous() if layout == "channels_last" else got.is_contiguous()
    assert_close(got, want, dtype)
    dy = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(got, leaves, dy.to(dtype))
    wants = torch.autograd.grad(want, _leaves(ref, trained), dy)
    for g_got, g_want, leaf in zip(grads, wants, leaves, strict=True):
        assert g_got.shape == leaf.shape and g_got.dtype == dtype
        assert_close(g_got, g_want, dtype)


def test_depthwise_backward_runs_the_extension_weight_grad():
    t = _tensors(CASES[3], torch.float32)
    for n in ("x", "core", "u_out"):
        t[n].requires_grad_()
    with torch.profiler.profile() as prof:
        _run(t, CASES[3], 0.5).sum().backward()
    names = {e.name for e in prof.events()}
    assert "flora::depthwise_conv2d_weight_grad" in names and "flora::conv_merged_backward" in names


def test_no_grad_runs_the_forward_alone():
    t = _tensors(CASES[1], torch.float64)
    with torch.no_grad():
        y = _run({**t, "core": t["core"].requires_grad_()}, CASES[1], 0.5)
    assert y.grad_fn is None
    assert_close(y, _reference(t, CASES[1], 0.5), torch.float64)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[5]], ids=_case_id)
def test_gradcheck(case):
    t = _tensors(case, torch.float64)
    names = ["x", "weight", "bias", "core", "u_out", "u_in"]

    def fn(*vs):
        s = dict(t, **dict(zip(names, vs[:len(names)])), kernel=list(vs[len(names):]))
        return _run(s, case, 0.7)

    inputs = [t[n].requires_grad_() for n in names] + [k.requires_grad_() for k in t["kernel"]]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_opcheck():
    for case in (CASES[0], CASES[3]):
        t = _tensors(case, torch.float32)
        args = (t["x"], t["weight"], t["bias"], t["core"], t["u_out"], t["u_in"], t["kernel"], 0.7, *_geometry(case))
        torch.library.opcheck(torch.ops.flora.conv_merged_forward, args)
        out, a, w = torch.ops.flora.conv_merged_forward(*args)
        back = (torch.randn_like(out), t["x"], w, t["core"], t["u_out"], t["u_in"], t["kernel"], a, 0.7,
                *_geometry(case))
        for mask in ([True, False, True, True, True], [False, True, False, False, True], [True] * 5):
            torch.library.opcheck(torch.ops.flora.conv_merged_backward, (*back, mask))
        for v in (t["x"], t["core"], t["u_out"], t["u_in"], *t["kernel"]):
            v.requires_grad_()
        torch.library.opcheck(torch.ops.flora.conv_merged, args)


@pytest.mark.parametrize("change,match", [
    ({"weight": torch.randn(8, 5, 3, 3)}, "x: expected 5 channels"),
    ({"u_out": torch.randn(8, 2)}, "u_out: expected shape"),
    ({"u_in": torch.randn(5, 2)}, "u_in: expected shape"),
    ({"kernel": [torch.randn(3, 2), torch.randn(2, 3)]}, "kernel factor 1"),
    ({"bias": torch.randn(7)}, "bias: expected shape"),
    ({"x": torch.randn(1, 6, 9, 7).double()}, "dtype"),
    ({"groups": 3}, "groups: expected an int >= 1 dividing"),
])
def test_bad_input_raises(change, match):
    t = _tensors(CASES[0], torch.float32)
    t.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flora.conv_merged(t["x"], t["weight"], t["bias"], t["core"], t["u_out"], t["u_in"], t["kernel"],
                                    1.0, [1, 1], [1, 1], [1, 1], t.get("groups", 1))


def test_backward_bad_fold_raises():
    t = _tensors(CASES[0], torch.float32)
    args = (t["x"], t["weight"], t["bias"], t["core"], t["u_out"], t["u_in"], t["kernel"], 0.7, *_geometry(CASES[0]))
    out, a, w = torch.ops.flora.conv_merged_forward(*args)
    with pytest.raises(RuntimeError, match="a: expected the forward's fold"):
        torch.ops.flora.conv_merged_backward(out, t["x"], w, t["core"], t["u_out"], t["u_in"], t["kernel"], a[:, :3],
                                             0.7, *_geometry(CASES[0]), [True] * 5)


# ---- the layer on the cpp merged path ---------------------------------------------------------------------------
def _layer(conv: nn.Module, strategy: str, backend: str) -> nn.Module:
    torch.manual_seed(3)
    layer = fk.FLoRAConv2d(conv, rank=(3, 1, 2, 3), scale=0.7, strategy=strategy, backend=backend) if isinstance(
        conv, nn.Conv2d) else fk.inject_flora(conv, fk.FLoRAConfig(rank=3, strategy=strategy, backend=backend))
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()
    return layer


@pytest.mark.parametrize("conv_kw,layout", [
    ({"groups": 6, "padding": 2}, "contiguous"),
    ({"groups": 6, "padding": 2, "stride": 2, "out_channels": 12}, "channels_last"),
    ({"groups": 6, "padding": 2, "dilation": 2}, "channels_last"),
    ({"groups": 2, "padding": "same", "padding_mode": "reflect"}, "contiguous"),  # explicit padding
    ({"groups": 1, "padding": (2, 0), "padding_mode": "circular"}, "channels_last"),
])
def test_layer_matches_reference(conv_kw, layout):
    """Output and every gradient (x, core, each factor) of the cpp merged path (which runs the op)
    against the reference factorized path, in float64."""
    kw = {"out_channels": 6, **conv_kw}
    torch.manual_seed(0)
    conv = nn.Conv2d(6, kernel_size=(5, 3), **kw).double().requires_grad_(False)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    results = []
    for strategy, backend in (("merged", "cpp"), ("factorized", "reference")):
        layer = _layer(conv, strategy, backend)
        xi = x.clone().requires_grad_()
        with torch.profiler.profile() as prof:
            y = layer(xi)
        if backend == "cpp":
            assert "flora::conv_merged" in {e.name for e in prof.events()}
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        params = [p for p in layer.parameters() if p.requires_grad]
        results.append((y, torch.autograd.grad(y, [xi, *params], dy)))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_layer_under_autocast_takes_the_composition():
    """Under CPU autocast the merged conv runs the default composition (reconstruct, torch's conv)
    and matches the fp32 result within bf16 rounding."""
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4).requires_grad_(False)
    layer = _layer(conv, "merged", "cpp")
    x = torch.randn(2, 4, 6, 6)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
        got = layer(x)
    assert "flora::conv_merged" not in {e.name for e in prof.events()}
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def test_compiled_layer_graph_is_the_op_alone():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    layer = _layer(nn.Conv2d(4, 4, 3, padding=1, groups=4).requires_grad_(False), "merged", "cpp")
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    eager = layer(x)
    (dx_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    y = compiled(x)
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, eager)
    torch.testing.assert_close(dx, dx_eager)
    for gm, op in zip(graphs, ("conv_merged_forward", "conv_merged_backward"), strict=True):
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert f"flora.{op}.default" in targets, targets
        assert not any("convolution" in t for t in targets), targets


@pytest.mark.parametrize("op", ["conv_merged", "conv_folded", "input_fold"])
def test_double_backward_raises_a_clear_error(op):
    """The C++ nodes' backward is first-order: create_graph=True raises instead of giving wrong second
    derivatives."""
    t = _tensors(CASES[0], torch.float64)
    for n in ("x", "core"):
        t[n].requires_grad_()
    if op == "conv_merged":
        y = _run(t, CASES[0], 0.5)
    elif op == "conv_folded":
        y = torch.ops.flora.conv_folded(t["x"], None, t["weight"], t["bias"], t["core"], t["u_out"], t["u_in"],
                                        t["kernel"], 0.5, *_geometry(CASES[0]))
    else:
        y = torch.ops.flora.input_fold(t["core"], t["u_in"], t["kernel"])
    with pytest.raises(RuntimeError, match=f"flora::{op}: expected a first-order backward"):
        torch.autograd.grad(y.pow(2).sum(), t["core"], create_graph=True)
