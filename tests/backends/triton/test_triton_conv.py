"""Triton FLoRA ConvNd (factorized and merged) vs the reference path over every conv option
(tests/helpers.CONV_CASES: groups, depthwise, stride, dilation, padding modes, 'same', 1d/2d/3d,
rank 1), channels_last and strided inputs, batch 1; dropout mask consistency; opcheck."""

from __future__ import annotations

import pytest
import torch
from helpers import CONV_CASES, CONV_IDS, conv_size, make_conv
from triton_helpers import DEVICE, DTYPE_IDS, DTYPES, assert_bounded, compare, needs_triton
from torch.library import opcheck

import flora_kernels as fk
from flora_kernels import reference as ref
from flora_kernels.convspec import ConvSpec, conv_nd

pytestmark = [needs_triton, pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]

# The merged path is the reconstruct kernel (tested for N = 3..5 on its own) plus torch's conv:
# a subset of cases covers its wiring; the factorized kernels run every case.
MERGED_CASES = ["1d-s2-d2-reflect-nobias", "2d-groups2-tuples", "2d-depthwise-same", "3d-groups2-circular"]
FP16_CASES = [("2d-groups2-tuples", "factorized"), ("1d-s2-d2-reflect-nobias", "factorized"),
              ("2d-circular", "factorized"), ("3d-s121", "merged")]


def _case(case_id):
    return CONV_CASES[CONV_IDS.index(case_id)]


def _ranks(base, rank, krank):
    r = (rank, rank) if isinstance(rank, int) else rank
    d = base.weight.dim() - 2
    k = tuple(base.weight.shape[2:]) if krank is None else ((krank,) * d if isinstance(krank, int) else krank)
    return tuple(min(a, b) for a, b in zip(r + k, base.weight.shape))


def _setup(case, batch=2, layout="contiguous"):
    base, rank, krank = make_conv(case)
    d = base.weight.dim() - 2
    size = conv_size(d)
    x = torch.randn(batch, base.in_channels, *([size] * d), device=DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if d == 2 else torch.channels_last_3d)
    x.requires_grad_()
    w = base.weight.detach().to(DEVICE)
    b = base.bias.detach().to(DEVICE).requires_grad_() if base.bias is not None else None
    ranks = _ranks(base, rank, krank)
    core = torch.randn(ranks, device=DEVICE, requires_grad=True)
    fs = [(torch.randn(n, r, device=DEVICE) / r**0.5).requires_grad_() for n, r in zip(w.shape, ranks)]
    kw = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation, "groups": base.groups,
          "padding_mode": base.padding_mode}
    spec = ConvSpec.make(tuple(w.shape[2:]), **kw)
    return [x, w, b, core, *fs], kw, spec


def _check(inputs, kw, spec, strategy, dtype, prep=lambda x: x):
    n = len(inputs) - 3

    def kern(x, w, b, core, *fs):
        return fk.flora_conv(prep(x), w, b, core, fs, 0.8, strategy=strategy, backend="triton", **kw)

    def oracle(x, w, b, core, *fs):
        return ref.conv_factorized(prep(x), w, b, core, fs, 0.8, spec)

    compare(kern, oracle, inputs, dtype, ["x", "weight", "bias", "core"] + [f"factors[{i}]" for i in range(n)])


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_factorized_fp32(case):
    inputs, kw, spec = _setup(case)
    _check(inputs, kw, spec, "factorized", torch.float32)


@pytest.mark.parametrize("case_id", MERGED_CASES)
def test_conv_merged_fp32(case_id):
    inputs, kw, spec = _setup(_case(case_id))
    _check(inputs, kw, spec, "merged", torch.float32)


@pytest.mark.parametrize("case_id,strategy", FP16_CASES, ids=[f"{c}-{s}" for c, s in FP16_CASES])
def test_conv_fp16(case_id, strategy):
    inputs, kw, spec = _setup(_case(case_id))
    _check(inputs, kw, spec, strategy, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case_id", ["2d-groups2-tuples", "3d-s121"])
def test_conv_channels_last_batch1(case_id, dtype):
    """channels_last input, batch 1: output keeps the base conv's layout; values and grads as the reference."""
    inputs, kw, spec = _setup(_case(case_id), batch=1, layout="channels_last")
    _check(inputs, kw, spec, "factorized", dtype)
    x, w, b, core, *fs = inputs
    y = fk.flora_conv(x, w, b, core, fs, 0.8, strategy="factorized", backend="triton", **kw)
    assert y.stride() == conv_nd(x, w, b, spec).stride()


def test_conv_strided_input():
    """A non-contiguous input whose spatial dims cannot be flattened (strided slice)."""
    inputs, kw, spec = _setup(_case("2d-pad1"))
    _check(inputs, kw, spec, "factorized", torch.float32, prep=lambda x: x[:, :, ::2, 1:])


def test_conv_unbatched():
    (x, w, b, core, *fs), kw, spec = _setup(_case("1d-pad1-bias"), batch=1)
    y = fk.flora_conv(x[0], w, b, core, fs, 0.8, strategy="factorized", backend="triton", **kw)
    y_ref = ref.conv_factorized(x, w, b, core, fs, 0.8, spec)[0]
    assert_bounded(y, y_ref, y_ref, torch.float32, "unbatched")


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_dropout_mask_consistent(monkeypatch, groups):
    """p > 0: output and gradients equal the reference computed with the kernel's own mask,
    recovered by projecting ones by the identity with the same seed."""
    from flora_kernels.backends.triton import channel_gemm as cgemm
    from flora_kernels.backends.triton import conv as C

    monkeypatch.setattr(C, "new_seed", lambda: 99)
    p = 0.4
    x = torch.randn(2, 6, 9, 9, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 6 // groups, 3, 3, device=DEVICE)
    core = torch.randn(3, 2, 2, 3, device=DEVICE, requires_grad=True)
    fs = [torch.randn(n, r, device=DEVICE, requires_grad=True) for n, r in zip(w.shape, core.shape)]
    spec = ConvSpec.make((3, 3), padding=1, groups=groups)
    cg = 6 // groups
    drop = cgemm.project(torch.ones_like(x), torch.eye(cg, device=DEVICE), groups, torch.empty_like(x), True, p, 99)
    assert torch.allclose(drop[drop != 0], torch.full_like(drop[drop != 0], 1 / (1 - p)))  # mask / (1 - p)
    keep = drop != 0
    assert abs(keep.float().mean().item() - (1 - p)) < 0.06
    y = fk.flora_conv(x, w, None, core, fs, 0.5, padding=1, groups=groups, dropout_p=p, strategy="factorized", backend="triton")
    delta = fk.tucker_reconstruct(core, fs, 0.5)
    y_ref = conv_nd(x, w, None, spec) + conv_nd(x * drop, delta, None, spec)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, [x, core, *fs], dy)
    g_ref = torch.autograd.grad(y_ref, [x, core, *fs], dy)
    assert_bounded(y, y_ref, y_ref, torch.float32, "output")
    for i, (a, r) in enumerate(zip(g, g_ref)):
        assert_bounded(a, r, r, torch.float32, f"grad {i}")


def test_opcheck_conv_ops():
    from flora_kernels.backends.triton import conv as C

    def rq(*s, cl=False):
        t = torch.randn(*s, device=DEVICE)
        return (t.to(memory_format=torch.channels_last) if cl else t).requires_grad_()

    w = torch.randn(4, 2, 3, 3, device=DEVICE)
    geometry = ([1, 1], [1, 1, 0, 2], [1, 1], 2, "reflect")
    opcheck(C.conv_base_project, (rq(1, 4, 5, 5, cl=True), w, rq(4), rq(2, 2), *geometry, 0.2, 3))
    opcheck(C.conv_expand, (rq(1, 4, 3, 3, cl=True), rq(1, 4, 3, 3), rq(4, 2), 2))
    x, dz, dy = (torch.randn(1, 4, 5, device=DEVICE) for _ in range(3))
    opcheck(C.conv_base_project_bwd, (dy, dz, x, torch.randn(4, 2, 1, device=DEVICE), torch.randn(2, 2, device=DEVICE),
                                      [1], [0, 0], [1], 2, "zeros", 0.3, 1, True, True))
    dy, u = torch.randn(1, 4, 5, device=DEVICE), torch.randn(1, 4, 5, device=DEVICE)
    opcheck(C.conv_expand_bwd, (dy, u, torch.randn(4, 2, device=DEVICE), 2, True, True))


@pytest.mark.parametrize(
    "d,groups,stride,pads,dilation,size,ksize,split",
    [(1, 3, [2], [2, 1], [2], 9, 3, None), (2, 2, [2, 1], [1, 0, 0, 2], [1, 2], 7, 3, 3),
     (3, 2, [1, 2, 1], [1, 1, 0, 1, 1, 0], [1, 1, 1], 4, 2, 2)],
    ids=["1d-g3-s2-d2", "2d-g2-asym-split3", "3d-g2-s121-split2"],
)
def test_core_conv_kernels(d, groups, stride, pads, dilation, size, ksize, split):
    """The direct core-conv kernels (forward, dz, split dK; 16-position blocks with ragged tails) vs
    torch's grouped conv with the repeated K."""
    from flora_kernels.backends.triton import core_conv as CC

    ri, ro = 3, 5
    z = torch.randn(2, groups * ri, *([size] * d), device=DEVICE)
    k = torch.randn(ro, ri, *([ksize] * d), device=DEVICE)
    spec = ConvSpec(tuple(stride), tuple(zip(pads[::2], pads[1::2])), tuple(dilation), groups, "zeros")
    zl, kl = z.clone().requires_grad_(), k.clone().requires_grad_()
    u_ref = conv_nd(zl, kl.repeat(groups, *(1,) * (d + 1)), None, spec)
    du = torch.randn_like(u_ref)
    dz_ref, dk_ref = torch.autograd.grad(u_ref, [zl, kl], du)
    u = CC.core_conv_forward(z, k, stride, pads, dilation, groups, torch.empty_like(u_ref), block=16)
    dz, dk = CC.core_conv_backward(du, z, k, stride, pads, dilation, groups, torch.empty_like(z), True, split, block=16)
    for name, a, r in [("u", u, u_ref), ("dz", dz, dz_ref), ("dK", dk, dk_ref)]:
        assert_bounded(a, r, r, torch.float32, name)


def test_opcheck_core_conv():
    from flora_kernels.backends.triton import core_conv as CC

    z = torch.randn(1, 4, 5, 5, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    k = torch.randn(3, 2, 3, 3, device=DEVICE, requires_grad=True)
    opcheck(CC.core_conv, (z, k, [2, 1], [1, 1, 0, 1], [1, 1], 2))
    du = torch.randn(1, 6, 3, 4, device=DEVICE)
    opcheck(CC.core_conv_bwd, (du, z.detach(), k.detach(), [2, 1], [1, 1, 0, 1], [1, 1], 2, True, True))
