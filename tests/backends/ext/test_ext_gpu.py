"""The ``cuda`` backend (compiled CUDA kernels) on a GPU, in fp32/fp16/bf16.

Each output and gradient is compared with the fp64 reference computed on the GPU; the error must
stay within a small multiple of the error PyTorch's own reference path makes in the same dtype
(plus a floor per dtype). Marked ``gpu`` (skipped without a GPU by tests/conftest.py) and skipped
when the extension lacks CUDA kernels. Nothing touches the GPU at import.
"""

from __future__ import annotations

import pytest
import torch

import flora_kernels as fk

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FACTOR = 3.0


@pytest.fixture(scope="module")
def cuda_ok():
    from flora_kernels.backends.ext import CudaBackend

    reason = CudaBackend().unavailable_reason()
    if reason is not None:
        pytest.skip(f"extension not built with CUDA: {reason}")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 ground truth for the fp32 comparison
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _run(fn, inputs, backend, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    out = fn(backend, *leaves)
    gen = torch.Generator(device="cuda").manual_seed(3)
    g = torch.randn(out.shape, device="cuda", generator=gen, dtype=torch.float64)
    out.backward(g.to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def _check(fn, inputs, dtype):
    truth = _run(fn, inputs, "reference", torch.float64)
    ours = _run(fn, inputs, "cuda", dtype)
    theirs = _run(fn, inputs, "reference", dtype)
    names = ["out"] + [f"grad[{i}]" for i in range(len(inputs))]
    for name, t, o, r in zip(names, truth, ours, theirs, strict=True):
        scale = t.abs().max().item() or 1.0
        err_ours = (o - t).abs().max().item()
        err_torch = (r - t).abs().max().item()
        bound = max(FACTOR * err_torch, FLOOR[dtype] * scale)
        assert err_ours <= bound, f"{name} ({dtype}): error {err_ours:.3g} > bound {bound:.3g} (torch's {err_torch:.3g})"


def _tucker(shape, ranks):
    core = torch.randn(*ranks, device="cuda", dtype=torch.float64)
    fs = [torch.randn(i, r, device="cuda", dtype=torch.float64) / r**0.5 for i, r in zip(shape, ranks)]
    return core, fs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", ["factorized", "merged"])
def test_cuda_linear(cuda_ok, strategy, dtype):
    x = torch.randn(3, 67, 96, device="cuda", dtype=torch.float64)
    w = torch.randn(80, 96, device="cuda", dtype=torch.float64) / 10
    b = torch.randn(80, device="cuda", dtype=torch.float64)
    core, fs = _tucker((80, 96), (8, 5))

    def fn(backend, x, w, b, core, f0, f1):
        return fk.flora_linear(x, w, b, core, [f0, f1], 0.5, strategy=strategy, backend=backend)

    _check(fn, [x, w, b, core, *fs], dtype)


CONV = [
    ((2, 6, 33), 8, (3,), 1, {"padding": 1}),
    ((2, 8, 14, 13), 12, (3, 3), 2, {"stride": 2, "padding": 1}),
    ((1, 8, 9, 9), 8, (3, 3), 8, {"padding": "same", "padding_mode": "reflect"}),
    ((1, 4, 5, 6, 7), 6, (3, 3, 3), 1, {"padding": 1, "dilation": (1, 2, 1)}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", ["factorized", "merged"])
@pytest.mark.parametrize("case", CONV, ids=lambda c: f"{len(c[0]) - 2}d-g{c[3]}")
def test_cuda_conv(cuda_ok, case, strategy, dtype):
    xs, cout, k, g, geo = case
    x = torch.randn(*xs, device="cuda", dtype=torch.float64)
    w = torch.randn(cout, xs[1] // g, *k, device="cuda", dtype=torch.float64) / 5
    ranks = (min(4, cout), min(3, xs[1] // g)) + tuple(min(2, kk) for kk in k)
    core, fs = _tucker(tuple(w.shape), ranks)

    def fn(backend, x, core, *f):
        return fk.flora_conv(x, w.to(x.dtype), None, core, list(f), 0.7, groups=g, strategy=strategy, backend=backend,
                             **geo)

    _check(fn, [x, core, *fs], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV + [((2, 64, 28, 28), 64, (3, 3), 1, {"padding": 1})],
                         ids=lambda c: f"{len(c[0]) - 2}d-c{c[0][1]}-g{c[3]}")
def test_cuda_conv_channels_last(cuda_ok, case, dtype):
    """Channels-innermost x: shrink reads x in place, the adapter goes into cuDNN's y and its dx in
    place (no copies); output and every gradient against the fp64 reference."""
    xs, cout, k, g, geo = case
    x = torch.randn(*xs, device="cuda", dtype=torch.float64).movedim(1, -1).contiguous().movedim(-1, 1)
    w = torch.randn(cout, xs[1] // g, *k, device="cuda", dtype=torch.float64) / 5
    ranks = (min(16, cout), min(16, xs[1] // g)) + tuple(min(3, kk) for kk in k)
    core, fs = _tucker(tuple(w.shape), ranks)

    def fn(backend, x, core, *f):
        return fk.flora_conv(x, w.to(x.dtype), None, core, list(f), 0.7, groups=g, strategy="factorized",
                             backend=backend, **geo)

    _check(fn, [x, core, *fs], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ranks", [((64, 48), (8, 3)), ((32, 16, 3, 3), (4, 5, 2, 3)),
                                         ((8, 6, 3, 2, 3), (2, 3, 1, 2, 3))], ids=["N2", "N4", "N5"])
def test_cuda_reconstruct(cuda_ok, shape, ranks, dtype):
    core, fs = _tucker(shape, ranks)
    base = torch.randn(*shape, device="cuda", dtype=torch.float64)

    def fn(backend, core, *rest):
        return fk.tucker_reconstruct(core, list(rest[:-1]), 0.9, rest[-1], backend=backend)

    _check(fn, [core, *fs, base], dtype)


def test_cuda_dropout_mask_matches_cpu(cuda_ok):
    x = torch.randn(37, 129)
    cpu = torch.ops.flora.dropout_mask(x, 0.35, 99)
    gpu = torch.ops.flora.dropout_mask(x.cuda(), 0.35, 99)
    assert torch.equal(cpu, gpu.cpu())


def test_cuda_bad_input_raises(cuda_ok):
    x = torch.randn(2, 6, 5, device="cuda")
    with pytest.raises(RuntimeError, match="expected"):
        torch.ops.flora.adapter_shrink(x, torch.randn(4, 2, device="cuda"), 2, 0.0, 0)
    with pytest.raises(RuntimeError, match="expected"):
        torch.ops.flora.adapter_shrink(x, torch.randn(3, 2), 2, 0.0, 0)
    with pytest.raises(RuntimeError, match="expected"):
        torch.ops.flora.tucker_reconstruct(torch.randn(2, 3, 0, device="cuda"), torch.randn(4, 2, device="cuda"),
                                           torch.randn(5, 3, device="cuda"), 1.0, None)


# ---- op level: each CUDA op against the CPU op on the same (rounded) inputs ---------------------------
_OP_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _close_op(name, got, want, dtype):
    got, want = got.double().cpu(), want.double()
    err = (got - want).abs().max().item()
    assert err <= _OP_TOL[dtype] * max(1.0, want.abs().max().item()), f"{name} ({dtype}): max error {err:.3g}"


def _op_cases(dtype, device, channels_last):
    """(name, thunk(device, channels_last)) for every op on Linear- and conv-shaped inputs."""
    ops = torch.ops.flora
    gen = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    def lay(t):
        t = t.to(device)
        return t.to(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    cases = []
    for n, g, c, r, sp, o in [(300, 1, 72, 16, (), 40), (4, 2, 16, 4, (9, 8), 8), (3, 1, 7, 3, (5, 3), 5)]:
        x, z, dy = rnd(n, g * c, *sp), rnd(n, g * r, *sp), rnd(n, g * o, *sp)
        u_in, u_out, bias = rnd(c, r), rnd(g * o, r), rnd(g * o)
        y = rnd(n, g * o, *sp)
        tag = f"N{n}-g{g}-C{c}-sp{len(sp)}"

        def expand_(x=x, z=z, y=y, u_out=u_out, g=g):
            yy = lay(y)  # updated in place through its strides (channels_last: as cuDNN's output)
            ops.adapter_expand_(yy, lay(z), u_out.to(device), g, 0.5)
            return yy

        def shrink_grad_input_(x=x, z=z, u_in=u_in, g=g):
            dx = lay(x)  # accumulated in place (channels_last: as cuDNN's input gradient)
            ops.adapter_shrink_grad_input_(dx, lay(z), u_in.to(device), g, 0.3, 7)
            return dx

        cases += [
            (f"shrink-{tag}", lambda x=x, u_in=u_in, g=g: ops.adapter_shrink(lay(x), u_in.to(device), g, 0.3, 7)),
            (f"expand_-{tag}", expand_),
            (f"shrink_grad_input_-{tag}", shrink_grad_input_),
            (f"expand-{tag}", lambda z=z, u_out=u_out, bias=bias, g=g:
                ops.adapter_expand(lay(z), u_out.to(device), g, 0.5, bias.to(device))),
            (f"expand_grad_input-{tag}", lambda dy=dy, u_out=u_out, g=g:
                ops.adapter_expand_grad_input(lay(dy), u_out.to(device), g, 0.5)),
            (f"shrink_grad_input-{tag}", lambda z=z, u_in=u_in, g=g:
                ops.adapter_shrink_grad_input(lay(z), u_in.to(device), g, 0.3, 7)),
            (f"factor_grad-{tag}", lambda x=x, z=z, g=g: ops.adapter_factor_grad(lay(x), lay(z), g, False, 1.0, 0.3, 7)),
            (f"factor_grad_per_group-{tag}", lambda dy=dy, z=z, g=g:
                ops.adapter_factor_grad(lay(dy), lay(z), g, True, 0.5, 0.0, 0)),
        ]
    dy, s, b = rnd(3000, 264), rnd(3000, 16), rnd(264, 16)
    cases += [(f"linear_grad[{k}]", lambda k=k: ops.adapter_linear_grad(dy.to(device), s.to(device), b.to(device))[k])
              for k in range(2)]
    lin = [rnd(*sh) for sh in ((3, 700, 96), (130, 96), (130,), (8, 6), (130, 8), (96, 6), (3, 700, 130))]

    def linear_factorized(k, device=device):
        x, w, bias, core, u_out, u_in, g = (t.to(device) for t in lin)
        y, s = ops.linear_factorized_forward(x, w, bias, core, u_out, u_in, 0.5, 0.3, 7)
        if k < 0:
            return y
        return ops.linear_factorized_backward(g, x, w, s, core, u_out, u_in, 0.5, 0.3, 7, [True] * 6)[k]

    cases += [(f"linear_factorized[{k}]", lambda k=k: linear_factorized(k)) for k in range(-1, 6)]
    for r0, r1, t, i0, i1 in [(16, 16, 1, 700, 520), (4, 5, 9, 24, 16)]:
        core, u0, u1, base = rnd(r0, r1, t), rnd(i0, r0), rnd(i1, r1), rnd(i0, i1, t)
        grad = rnd(i0, i1, t)
        cases += [
            (f"reconstruct-{i0}x{i1}x{t}", lambda core=core, u0=u0, u1=u1, base=base:
                ops.tucker_reconstruct(core.to(device), u0.to(device), u1.to(device), 0.7, base.to(device))),
        ] + [
            (f"reconstruct_backward[{k}]-{i0}x{i1}x{t}", lambda k=k, core=core, u0=u0, u1=u1, grad=grad:
                ops.tucker_reconstruct_backward(grad.to(device), core.to(device), u0.to(device), u1.to(device),
                                                0.7)[k])
            for k in range(3)
        ]
    return cases


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_ops_match_cpu_ops(cuda_ok, dtype, channels_last):
    """Every op on CUDA (channels_last inputs read in place) against the CPU op on the same inputs."""
    for name, fn in _op_cases(dtype, "cuda", channels_last):
        got = fn()
        want = dict(_op_cases(dtype, "cpu", False))[name]()
        _close_op(name, got, want, dtype)


def test_cuda_opcheck(cuda_ok):
    """The op contracts (schema, fake impls, strides) on CUDA tensors."""
    ops = torch.ops.flora
    x, z, y = (torch.randn(2, c, 5, device="cuda") for c in (6, 4, 8))
    u_in, u_out = torch.randn(3, 2, device="cuda"), torch.randn(8, 2, device="cuda")
    core, u0, u1 = (torch.randn(*s, device="cuda") for s in ((2, 3, 4), (5, 2), (6, 3)))
    samples = {
        ops.tucker_reconstruct: (core, u0, u1, 0.5, None),
        ops.tucker_reconstruct_backward: (torch.randn(5, 6, 4, device="cuda"), core, u0, u1, 0.5),
        ops.adapter_shrink: (x, u_in, 2, 0.5, 3),
        ops.adapter_expand_: (y.clone(), z, u_out, 2, 0.5),
        ops.adapter_expand: (z, u_out, 2, 0.5, torch.randn(8, device="cuda")),
        ops.adapter_expand_grad_input: (y, u_out, 2, 0.5),
        ops.adapter_shrink_grad_input: (z, u_in, 2, 0.2, 5),
        ops.adapter_shrink_grad_input_: (x.clone(), z, u_in, 2, 0.2, 5),
        ops.adapter_factor_grad: (x, z, 2, False, 1.0, 0.2, 5),
        ops.adapter_linear_grad: (torch.randn(7, 8, device="cuda"), torch.randn(7, 3, device="cuda"),
                                  torch.randn(8, 3, device="cuda")),
        ops.dropout_mask: (x, 0.3, 11),
        ops.linear_factorized_forward: (torch.randn(2, 3, 6, device="cuda"), torch.randn(8, 6, device="cuda"), None,
                                        torch.randn(2, 3, device="cuda"), u_out, u_in.new_empty(6, 3).normal_(), 0.5,
                                        0.2, 5),
    }
    for op, args in samples.items():
        torch.library.opcheck(op, args)
    # channels_last activations: fakes give new outputs the input's layout, in-place targets keep theirs
    x4, z4, y4 = (torch.randn(2, c, 3, 5, device="cuda").to(memory_format=torch.channels_last) for c in (6, 4, 8))
    for op, args in {
        ops.adapter_shrink: (x4, u_in, 2, 0.5, 3),
        ops.adapter_expand_: (y4.clone(), z4, u_out, 2, 0.5),
        ops.adapter_expand_grad_input: (y4, u_out, 2, 0.5),
        ops.adapter_shrink_grad_input_: (x4.clone(), z4, u_in, 2, 0.2, 5),
    }.items():
        torch.library.opcheck(op, args)
