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
    from flora_kernels.backends.cuda import CudaBackend

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
