"""``flora::depthwise_conv2d_weight_grad`` (CPU) and the cpp backend's merged depthwise conv built
on it: the op against ATen's weight gradient over odd geometries, layouts and dtypes; bad input;
opcheck; the FLoRA layer's output and every gradient against the reference path; torch.compile.

Skipped when the extension is not built (``pip install --no-build-isolation -e .``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flora_kernels as fk
from flora_kernels.backends.ext import depthwise, load_extension
from flora_kernels.convspec import ConvSpec

_REASON = load_extension()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"extension not built: {_REASON}")

# (N, C, multiplier, H, W, kernel, stride, padding, dilation)
GEOMETRIES = [
    (2, 5, 1, 9, 7, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 5, 2, 9, 7, (5, 3), (2, 1), (2, 0), (1, 2)),
    (1, 3, 3, 5, 6, (2, 3), (1, 2), (0, 1), (2, 1)),
    (3, 70, 1, 6, 9, (7, 7), (1, 1), (3, 3), (1, 1)),  # more than one 64-channel block
    (2, 4, 1, 3, 3, (7, 7), (1, 1), (3, 3), (1, 1)),  # kernel larger than the image
]
IDS = [f"N{g[0]}-C{g[1]}x{g[2]}-{g[3]}x{g[4]}-k{g[5]}-s{g[6]}-p{g[7]}-d{g[8]}" for g in GEOMETRIES]


def _aten_weight_grad(x, dy, geom):
    _, c, m, _, _, k, s, p, d = geom
    weight = torch.empty(c * m, 1, *k, dtype=x.dtype)
    return torch.ops.aten.convolution_backward(dy, x, weight, None, list(s), list(p), list(d), False, [0, 0], c,
                                               [False, True, False])[1]


def _inputs(geom, dtype, layout):
    n, c, m, h, w, k, s, p, d = geom
    g = torch.Generator().manual_seed(7)
    ho = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    x = torch.randn(n, c, h, w + 1, generator=g, dtype=torch.float64)
    dy = torch.randn(n, c * m, ho, wo, generator=g, dtype=torch.float64)
    x = x[..., 1:]  # a strided view: the op must not assume contiguity
    if layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x.to(dtype), dy.to(dtype)


@pytest.mark.parametrize("layout", ["strided", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=IDS)
def test_weight_grad_matches_aten(geom, dtype, layout):
    x, dy = _inputs(geom, dtype, layout)
    _, c, m, _, _, k, s, p, d = geom
    got = torch.ops.flora.depthwise_conv2d_weight_grad(x, dy, list(k), list(s), list(p), list(d))
    want = _aten_weight_grad(x.double(), dy.double(), geom)
    assert got.dtype == dtype and got.shape == (c * m, 1, *k)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_weight_grad_bad_input():
    op = torch.ops.flora.depthwise_conv2d_weight_grad
    x, dy = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with pytest.raises(RuntimeError, match=r"expected dy's spatial dim 0 = 6"):
        op(x, dy, [3, 3], [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="multiple of 4"):
        op(x, torch.randn(2, 6, 8, 8), [3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="one dtype"):
        op(x, dy.double(), [3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="4-D"):
        op(x[0], dy, [3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="float32/float64"):
        op(x.int(), dy.int(), [3, 3], [1, 1], [1, 1], [1, 1])


def test_weight_grad_opcheck():
    x, dy = _inputs(GEOMETRIES[1], torch.float32, "strided")
    torch.library.opcheck(torch.ops.flora.depthwise_conv2d_weight_grad, (x, dy, [5, 3], [2, 1], [2, 0], [1, 2]))


def _layer(conv: nn.Conv2d, strategy: str, backend: str, seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    layer = fk.FLoRAConv2d(conv, rank=(3, 1, 2, 3), scale=0.7, strategy=strategy, backend=backend)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()
    return layer


@pytest.mark.parametrize("multiplier,stride,dilation,layout", [
    (1, 1, 1, "contiguous"), (2, 2, 1, "contiguous"), (1, 1, 2, "channels_last"), (1, 2, 1, "channels_last"),
])
def test_merged_depthwise_layer_matches_reference(multiplier, stride, dilation, layout, monkeypatch):
    """Output and every gradient (x, core, each factor) of the cpp merged path (which runs the op)
    against the reference factorized path, in float64."""
    seen = []
    real = depthwise.eligible
    monkeypatch.setattr(depthwise, "eligible", lambda *a: seen.append(real(*a)) or seen[-1])
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6 * multiplier, (5, 3), stride=stride, padding=2, dilation=dilation, groups=6).double()
    conv.weight.requires_grad_(False)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    results = []
    for strategy, backend in (("merged", "cpp"), ("factorized", "reference")):
        layer = _layer(conv, strategy, backend)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        params = [p for p in layer.parameters() if p.requires_grad]
        grads = torch.autograd.grad(y, [xi, *params], dy)
        results.append((y, grads))
    (y1, g1), (y2, g2) = results
    assert seen == [True]  # the cpp merged path ran the extension's weight gradient
    torch.testing.assert_close(y1, y2)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_depthwise_conv_gradcheck():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    spec = ConvSpec.make((3, 3), stride=(2, 1), padding=1, dilation=1, groups=3)
    assert depthwise.eligible(x, w, spec)
    torch.autograd.gradcheck(lambda x, w, b: depthwise.conv(x, w, b, spec), (x, w, b))


def test_not_eligible_falls_back_to_torch():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3, requires_grad=True)
    assert not depthwise.eligible(x, w, ConvSpec.make((3, 3), padding="same", groups=2))  # not depthwise
    assert not depthwise.eligible(x, w, ConvSpec.make((3, 3), padding=1, groups=4, padding_mode="reflect"))
    assert not depthwise.eligible(x, w.detach(), ConvSpec.make((3, 3), padding=1, groups=4))  # no weight grad


def test_merged_depthwise_compiles():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    conv.weight.requires_grad_(False)
    layer = _layer(conv, "merged", "cpp")
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    eager = layer(x)
    (dx_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, eager)
    torch.testing.assert_close(dx, dx_eager)
