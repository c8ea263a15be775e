"""``flora::depthwise_conv2d_weight_grad`` (CPU; the weight gradient ``flora::conv_merged`` takes for
depthwise convs, tested with it in test_ext_conv_merged.py): the op against ATen's weight gradient
over odd geometries, layouts and dtypes; bad input; opcheck.

Skipped when the extension is not built (``pip install --no-build-isolation -e .``).
"""

from __future__ import annotations

import pytest
import torch

from flora_kernels.backends.ext import load_extension

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
