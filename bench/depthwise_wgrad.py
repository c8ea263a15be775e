"""Depthwise conv2d weight gradient on CPU: flora::depthwise_conv2d_weight_grad vs ATen's
(aten.convolution_backward, weight only), at ConvNeXt-style shapes. One torch thread, CPU time
of this thread (robust to other load), median of --runs; checks the two agree.

    python bench/depthwise_wgrad.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flora_kernels.backends.ext import load_extension

SHAPES = [  # N, C, H (= W), k: convnext_atto at 64x64 (stages 0-3), at 224 (stage 0), and a 3x3
    (8, 40, 16, 7), (8, 80, 8, 7), (8, 160, 4, 7), (8, 320, 2, 7), (8, 96, 56, 7), (32, 64, 28, 3),
]


def _time(fn, runs: int) -> float:
    ts = []
    for _ in range(runs + 2):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return statistics.median(ts[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    if (reason := load_extension()) is not None:
        raise SystemExit(f"extension not built: {reason}")
    torch.set_num_threads(1)
    print("| N | C | H=W | k | ATen ms | flora NCHW ms | flora NHWC ms | ATen / flora NCHW | rel. diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        print(_row(*shape, runs=args.runs))


def _row(n: int, c: int, h: int, k: int, runs: int) -> str:
    """One table row: ATen's and the extension's weight gradient of an N x C x H x H depthwise conv."""
    p = k // 2
    x, dy = torch.randn(n, c, h, h), torch.randn(n, c, h, h)
    w = torch.empty(c, 1, k, k)
    xl, dyl = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))

    def aten():
        return torch.ops.aten.convolution_backward(dy, x, w, None, [1, 1], [p, p], [1, 1], False, [0, 0], c,
                                                   [False, True, False])[1]

    def ours(a=x, b=dy):
        return torch.ops.flora.depthwise_conv2d_weight_grad(a, b, [k, k], [1, 1], [p, p], [1, 1])

    want = aten()
    diff = float((ours() - want).norm() / want.norm())
    ta, tn, tl = _time(aten, runs), _time(ours, runs), _time(lambda: ours(xl, dyl), runs)
    return f"| {n} | {c} | {h} | {k} | {ta * 1e3:.3f} | {tn * 1e3:.3f} | {tl * 1e3:.3f} | {ta / tn:.1f}x | {diff:.1e} |"

if __name__ == "__main__":
    main()
