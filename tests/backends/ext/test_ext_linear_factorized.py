"""``flora::linear_factorized`` (the extension's factorized Linear as one op, one C++ autograd node):
output and every gradient against the reference run by autograd in float64, over odd shapes, leading
dims, bias, a trained or frozen base, x with or without a gradient, non-contiguous x, fp32/fp16;
dropout's seeded mask; fp64 gradcheck; opcheck; bad input raising clean errors; a compiled graph
holding the op alone, forward and backward."""

from __future__ import annotations

import pytest
import torch

import flora_kernels as fk
from flora_kernels.testing import assert_close

pytestmark = pytest.mark.skipif(fk.available_backends().get("cpp") != "ok", reason="cpp backend not built")

CASES = [  # (leading dims of x, in, out, (r_out, r_in))
    ((1,), 1, 1, (1, 1)),
    ((7,), 13, 11, (1, 3)),
    ((2, 5), 24, 17, (5, 4)),
    ((3, 1, 4), 9, 33, (7, 9)),
    ((), 6, 5, (2, 3)),
]


def _case_id(c) -> str:
    return f"x{'x'.join(map(str, c[0])) or '1d'}-{c[1]}to{c[2]}-r{c[3][0]}x{c[3][1]}"


def _tensors(case, seed=0):
    """float64 (x, weight, bias, core, u_out, u_in) for ``case``."""
    lead, fin, fout, (r_out, r_in) = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return rnd(*lead, fin), rnd(fout, fin) / fin**0.5, rnd(fout), rnd(r_out, r_in), rnd(fout, r_out), rnd(fin, r_in)


def _reference(x, w, b, core, u_out, u_in, scale, mask=None):
    xa = x if mask is None else x * mask
    y = x @ w.t() + (xa @ u_in) @ (scale * u_out @ core).t()
    return y if b is None else y + b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("grads", ["all", "adapter", "adapter+x"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference_output_and_grads(case, bias, grads, dtype):
    ts = list(_tensors(case))
    if not bias:
        ts[2] = None
    train = {"all": (0, 1, 2, 3, 4, 5), "adapter": (3, 4, 5), "adapter+x": (0, 3, 4, 5)}[grads]
    got_in = [None if t is None else t.to(dtype).requires_grad_(i in train) for i, t in enumerate(ts)]
    ref_in = [None if t is None else t.detach().clone().requires_grad_(i in train) for i, t in enumerate(ts)]
    y = torch.ops.flora.linear_factorized(*got_in, 0.75, 0.0, 0)
    want = _reference(*ref_in, 0.75)
    assert y.shape == want.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y, want, dtype, msg="out")
    dy = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [i for i in train if ts[i] is not None]
    got_g = torch.autograd.grad(y, [got_in[i] for i in leaves], dy.to(dtype))
    want_g = torch.autograd.grad(want, [ref_in[i] for i in leaves], dy)
    for i, a, b in zip(leaves, got_g, want_g, strict=True):
        assert a.shape == b.shape and a.dtype == dtype, i
        assert_close(a, b, dtype, msg=f"grad[{i}]")


def test_non_contiguous_x_and_transposed_weight():
    """x a transposed view; the weight a (out, in) view of an (in, out) parameter (transformers' Conv1D)."""
    x, w, b, core, u_out, u_in = _tensors(((4, 3), 6, 5, (2, 3)))
    xt = x.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    wt = w.t().contiguous().requires_grad_()
    core.requires_grad_()
    y = torch.ops.flora.linear_factorized(xt, wt.t(), b, core, u_out, u_in, 1.0, 0.0, 0)
    ref_in = [t.detach().clone().requires_grad_() for t in (x, w, core)]
    want = _reference(ref_in[0], ref_in[1], b, ref_in[2], u_out, u_in, 1.0)
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(want)
    got_g = torch.autograd.grad(y, (xt, wt, core), dy)
    want_g = torch.autograd.grad(want, ref_in, dy)
    torch.testing.assert_close(got_g[0], want_g[0])
    torch.testing.assert_close(got_g[1], want_g[1].t())
    torch.testing.assert_close(got_g[2], want_g[2])


def test_no_grad_runs_the_forward_alone():
    ts = _tensors(CASES[2])
    with torch.no_grad():
        y = torch.ops.flora.linear_factorized(*(t.requires_grad_() for t in ts), 0.5, 0.0, 0)
    assert y.grad_fn is None
    assert_close(y, _reference(*(t.detach() for t in ts), 0.5), torch.float64)


def test_dropout_uses_the_seeded_mask():
    """p > 0: S = (mask * x) U_in with the extension's mask for (p, seed), on x's token matrix; the
    same mask in dx and dU_in."""
    p, seed = 0.4, 1234
    x, w, b, core, u_out, u_in = _tensors(((3, 6), 10, 7, (3, 4)))
    mask = torch.ops.flora.dropout_mask(x.reshape(-1, 10), p, seed).reshape(x.shape)
    assert 0 < int((mask == 0).sum()) < mask.numel()
    got_in = [t.clone().requires_grad_() for t in (x, core, u_out, u_in)]
    ref_in = [t.clone().requires_grad_() for t in (x, core, u_out, u_in)]
    y = torch.ops.flora.linear_factorized(got_in[0], w, b, *got_in[1:], 0.9, p, seed)
    want = _reference(ref_in[0], w, b, *ref_in[1:], 0.9, mask)
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(want)
    for a, b_ in zip(torch.autograd.grad(y, got_in, dy), torch.autograd.grad(want, ref_in, dy)):
        torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck(p):
    ts = [t.requires_grad_() for t in _tensors(((2, 3), 5, 4, (2, 3)), seed=3)]
    assert torch.autograd.gradcheck(lambda *a: torch.ops.flora.linear_factorized(*a, 0.6, p, 77), ts, eps=1e-6,
                                    atol=1e-7)


def test_opcheck():
    x, w, b, core, u_out, u_in = (t.float() for t in _tensors(((2, 3), 5, 4, (2, 3))))
    ops = torch.ops.flora
    for args in ((x, w, b, core, u_out, u_in, 0.5, 0.0, 0), (x, w, None, core, u_out, u_in, 1.0, 0.25, 9)):
        grad_args = tuple(t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args)
        torch.library.opcheck(ops.linear_factorized, grad_args)
        torch.library.opcheck(ops.linear_factorized_forward, args)
    y, s = ops.linear_factorized_forward(x, w, b, core, u_out, u_in, 0.5, 0.0, 0)
    dy = torch.randn_like(y)
    for mask, xs in (([True] * 6, x), ([False, False, False, True, True, False], None),
                     ([True, False, True, False, False, True], x)):
        torch.library.opcheck(ops.linear_factorized_backward, (dy, xs, w, s, core, u_out, u_in, 0.5, 0.0, 0, mask))


def _f(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("args,match", [
    ((_f(3, 5), _f(4, 6), None, _f(2, 3), _f(4, 2), _f(5, 3)), "weight: expected 5 columns"),
    ((_f(3, 5), _f(4, 5), None, _f(2, 3), _f(4, 2), _f(6, 3)), "u_in: expected 5 rows"),
    ((_f(3, 5), _f(4, 5), None, _f(2, 3), _f(3, 2), _f(5, 3)), "u_out: expected 4 rows"),
    ((_f(3, 5), _f(4, 5), None, _f(3, 3), _f(4, 2), _f(5, 3)), r"core: expected shape \(2, 3\)"),
    ((_f(3, 5), _f(4, 5), _f(5), _f(2, 3), _f(4, 2), _f(5, 3)), r"bias: expected shape \(4,\)"),
    ((_f(3, 5), _f(4, 5, dtype=torch.float64), None, _f(2, 3), _f(4, 2), _f(5, 3)), "weight: expected dtype"),
    ((_f(3, 5), _f(4, 5), None, _f(2, 3, 1), _f(4, 2), _f(5, 3)), "core: expected a 2-D tensor"),
    ((_f(0, 5), _f(4, 5), None, _f(2, 3), _f(4, 2), _f(5, 3)), "x: expected a non-empty tensor"),
    ((torch.ones(3, 5, dtype=torch.int32), _f(4, 5), None, _f(2, 3), _f(4, 2), _f(5, 3)), "x: expected dtype"),
], ids=["weight-cols", "u_in-rows", "u_out-rows", "core-shape", "bias-shape", "dtype", "core-dims", "empty", "int"])
def test_bad_input_raises_a_clear_error(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flora.linear_factorized(*args, 1.0, 0.0, 0)


def test_bad_dropout_and_missing_x_raise():
    x, w, b, core, u_out, u_in = (t.float() for t in _tensors(((2, 3), 5, 4, (2, 3))))
    with pytest.raises(RuntimeError, match=r"p: expected a dropout probability in \[0, 1\), got 1"):
        torch.ops.flora.linear_factorized(x, w, b, core, u_out, u_in, 1.0, 1.0, 0)
    y, s = torch.ops.flora.linear_factorized_forward(x, w, b, core, u_out, u_in, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="x: expected the forward's input"):
        torch.ops.flora.linear_factorized_backward(y, None, w, s, core, u_out, u_in, 1.0, 0.0, 0, [False, True] + [False] * 4)


def test_compiled_layer_graph_is_the_op_alone():
    """A FLoRALinear on the cpp backend under torch.compile: AOT autograd's forward graph calls
    linear_factorized_forward and no matmul, its backward graph linear_factorized_backward and no matmul."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    layer = fk.FLoRALinear(torch.nn.Linear(12, 9), rank=3, strategy="factorized", backend="cpp")
    x = torch.randn(2, 5, 12)
    eager = layer(x)
    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    assert len(graphs) == 2
    for gm, op in zip(graphs, ("linear_factorized_forward", "linear_factorized_backward")):
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert f"flora.{op}.default" in targets, targets
        assert not any(t.startswith(("aten.mm", "aten.addmm", "aten.bmm", "aten.matmul")) for t in targets), targets


def test_double_backward_raises_a_clear_error():
    """The backward is first-order: create_graph=True raises instead of giving wrong second derivatives."""
    x, w, b, core, u_out, u_in = (t.requires_grad_() for t in _tensors(((2, 3), 5, 4, (2, 3))))
    y = torch.ops.flora.linear_factorized(x, w, b, core, u_out, u_in, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="flora::linear_factorized: expected a first-order backward"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
