"""Benchmark shapes: docs/ARCHITECTURE.md, Performance targets on GPU, scaled-down fp32 versions on CPU.

A ``Shape`` describes one adapted layer: the frozen base op (Linear or Conv2d), the input,
the adapter ranks, the dtype and the memory format. Presets:

- ``gpu``: the docs/ARCHITECTURE.md, Performance targets shapes (bf16; convs channels_last) plus an LLM-style MLP
  linear.
- ``cpu``: the same families scaled down to fp32 on a small CPU (the sizes docs/ARCHITECTURE.md, Performance targets
  quotes measurements for) plus a ViT-style qkv linear.
- ``quick``: even smaller CPU shapes for ``flora-bench --quick`` (a few minutes on 2 cores).
- ``tiny``: seconds; used by the CI test of the harness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class Shape:
    """One benchmark case's layer and input.

    Linear: ``tokens`` rows of width ``in_ch`` -> ``out_ch``; ``x`` is (tokens, in_ch).
    Conv2d: ``x`` is (batch, in_ch, hw, hw), kernel ``kernel`` x ``kernel``, 'same' padding
    (kernel // 2), ``stride``, ``groups``; depthwise when groups == in_ch == out_ch.
    ``rank`` is the channel-mode rank (r_out = r_in, each clamped to its mode size);
    ``kernel_rank`` the spatial-mode rank (None = the full kernel size).
    """

    name: str
    op: str  # "linear" | "conv"
    in_ch: int
    out_ch: int
    tokens: int = 0  # linear only
    batch: int = 0  # conv only
    hw: int = 0
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    rank: int = 16
    kernel_rank: int | None = None
    dtype: str = "fp32"
    channels_last: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        if self.op not in ("linear", "conv"):
            raise ValueError(f"op: expected 'linear' or 'conv', got {self.op!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.op == "linear" and self.tokens <= 0:
            raise ValueError(f"{self.name}: a linear shape needs tokens > 0, got {self.tokens}")
        if self.op == "conv" and (self.batch <= 0 or self.hw <= 0):
            raise ValueError(f"{self.name}: a conv shape needs batch > 0 and hw > 0")
        if self.in_ch % self.groups or self.out_ch % self.groups:
            raise ValueError(f"{self.name}: channels {self.in_ch}->{self.out_ch} not divisible by groups={self.groups}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.op == "linear":
            return (self.out_ch, self.in_ch)
        return (self.out_ch, self.in_ch // self.groups, self.kernel, self.kernel)

    @property
    def x_shape(self) -> tuple[int, ...]:
        if self.op == "linear":
            return (self.tokens, self.in_ch)
        return (self.batch, self.in_ch, self.hw, self.hw)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The adapter ranks after clamping to the weight's mode sizes (docs/ARCHITECTURE.md, Conventions)."""
        w = self.weight_shape
        req = (self.rank, self.rank)
        if self.op == "conv":
            kr = self.kernel if self.kernel_rank is None else self.kernel_rank
            req += (kr, kr)
        return tuple(min(r, i) for r, i in zip(req, w))

    def describe(self) -> str:
        if self.op == "linear":
            s = f"Linear {self.in_ch}->{self.out_ch}, T={self.tokens}"
        else:
            kind = "depthwise " if self.groups > 1 and self.groups == self.in_ch else ""
            g = f", groups={self.groups}" if self.groups > 1 and not kind else ""
            s = (
                f"{kind}Conv2d {self.in_ch}->{self.out_ch} {self.kernel}x{self.kernel}{g}, "
                f"N={self.batch}, {self.hw}x{self.hw}" + (f", stride {self.stride}" if self.stride > 1 else "")
            )
        mf = ", channels_last" if self.channels_last else ""
        return f"{s}, ranks {self.ranks}, {self.dtype}{mf}"

    def numel_x(self) -> int:
        return math.prod(self.x_shape)


def _conv(name: str, c: int, hw: int, n: int, k: int = 3, groups: int = 1, **kw) -> Shape:
    return Shape(name, "conv", c, c, batch=n, hw=hw, kernel=k, groups=groups, **kw)


def _lin(name: str, i: int, o: int, t: int, **kw) -> Shape:
    return Shape(name, "linear", i, o, tokens=t, **kw)


PRESETS: dict[str, tuple[Shape, ...]] = {
    "gpu": (
        _lin("linear-4096-t8192", 4096, 4096, 8192, dtype="bf16", note="benchmark shape: Linear 4096x4096, T=8192"),
        _conv(
            "conv3x3-c256-56-n64",
            256,
            56,
            64,
            dtype="bf16",
            channels_last=True,
            note="benchmark shape: Conv2d N=64 C=256 56x56 3x3, ranks (16,16,3,3)",
        ),
        _conv(
            "dwconv7x7-c96-56-n64",
            96,
            56,
            64,
            k=7,
            groups=96,
            dtype="bf16",
            channels_last=True,
            note="benchmark shape: ConvNeXt-T stage-1 depthwise 7x7",
        ),
        _lin("llm-mlp-4096x11008-t4096", 4096, 11008, 4096, dtype="bf16", note="LLaMA-7B MLP up-projection"),
    ),
    "cpu": (
        _conv("conv3x3-c64-28-n8", 64, 28, 8, note="CPU target shape: 3x3 conv C=64 28x28 N=8"),
        _lin("linear-1024-t2048", 1024, 1024, 2048, note="CPU target shape: 1024x1024 linear, T=2048"),
        _conv("dwconv7x7-c96-28-n8", 96, 28, 8, k=7, groups=96, note="CPU target shape: depthwise 7x7 C=96 28x28 N=8"),
        _lin("vit-qkv-768x2304-t788", 768, 2304, 788, note="ViT-B/16 qkv projection, 4 images x 197 tokens"),
    ),
    "quick": (
        _conv("conv3x3-c64-14-n4", 64, 14, 4, note="quick: 3x3 conv C=64 14x14 N=4"),
        _lin("linear-512-t512", 512, 512, 512, note="quick: 512x512 linear, T=512"),
        _conv("dwconv7x7-c96-14-n4", 96, 14, 4, k=7, groups=96, note="quick: depthwise 7x7 C=96 14x14 N=4"),
        _lin("vit-qkv-384x1152-t394", 384, 1152, 394, note="quick: ViT-S/16 qkv, 2 images x 197 tokens"),
    ),
    "tiny": (
        _conv("tiny-conv3x3-c8-6-n2", 8, 6, 2, rank=4, kernel_rank=2, note="CI: tiny conv"),
        _lin("tiny-linear-24x20-t10", 24, 20, 10, rank=4, note="CI: tiny linear"),
        _conv("tiny-dwconv3x3-c6-5-n2", 6, 5, 2, groups=6, rank=4, note="CI: tiny depthwise"),
    ),
}

ALL_SHAPES: dict[str, Shape] = {s.name: s for preset in PRESETS.values() for s in preset}


def default_preset(device: str, quick: bool) -> str:
    """The preset ``flora-bench`` runs when ``--shapes`` is not given."""
    if device == "cpu":
        return "quick" if quick else "cpu"
    return "gpu"


def resolve_shapes(spec: str | None, device: str, quick: bool) -> list[Shape]:
    """Comma-separated preset or shape names (``None``: the device's default preset).

    Raises ``ValueError`` naming the known presets and shapes for an unknown name.
    """
    names = [s.strip() for s in (spec or default_preset(device, quick)).split(",") if s.strip()]
    out: list[Shape] = []
    for n in names:
        if n in PRESETS:
            out.extend(PRESETS[n])
        elif n in ALL_SHAPES:
            out.append(ALL_SHAPES[n])
        else:
            raise ValueError(
                f"unknown shape {n!r}: expected a preset ({', '.join(PRESETS)}) or a shape name "
                f"({', '.join(ALL_SHAPES)})"
            )
    seen: set[str] = set()
    return [s for s in out if not (s.name in seen or seen.add(s.name))]
