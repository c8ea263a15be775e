"""Benchmark providers: each one builds, for one shape, a layer computing the same function.

Every provider is initialised from one set of FLoRA parameters (``Materials``: core,
factors, scale) through a differentiable map ``phi`` from FLoRA's parameters to its own, so
that (1) all providers compute the same output, and (2) each provider's parameter gradients
map back to FLoRA's (core, factors) by the chain rule (a vector-Jacobian product through
``phi``) and are checked against the reference path's.

Providers (names are what ``--providers`` matches, fnmatch patterns allowed):

- ``base``: the frozen base layer alone, the floor every ratio is taken against.
- ``flora-<backend>-<strategy>``: ``FLoRALinear``/``FLoRAConv2d`` with that backend
  (reference, triton, cuda, cpp) and strategy (factorized, merged, auto).
- ``lora``: PEFT-style LoRA at the same rank: ``peft.tuners.lora`` layers (through
  ``get_peft_model`` on a one-layer wrapper) when peft is importable and supports the layer,
  else an equivalent written here (``TorchLoRA``); ``Built.impl`` says which.
- ``paper-formula``: the public reference formula re-implemented from the paper: the
  parameters in the paper's mode order (in, out, k...), dW materialized at full size by one
  einsum on every call, then a second full op added to the base output.
- ``compile-reference``: ``torch.compile`` of the FLoRA layer on the reference backend,
  strategy auto.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flora_kernels.backends import BackendUnavailable, Call, available_backends, backend_names
from flora_kernels.backends.autotune import candidates
from flora_kernels.backends.base import STRATEGIES
from flora_kernels.convspec import ConvSpec
from flora_kernels.layers import FLoRAConv2d, FLoRALayer, FLoRALinear
from flora_kernels.tucker import init_tucker_, mode_n_product, tucker_reconstruct

from .shapes import Shape


@dataclass
class Materials:
    """Everything one shape's providers share, on the benchmark device.

    base: the frozen base module in the shape's dtype (channels_last for such shapes).
    core, factors: the FLoRA adapter values in float64 (the truth every provider copies);
    scale: s. x: the input (shape's dtype/format). dy: the output gradient used everywhere.
    """

    shape: Shape
    device: torch.device
    base: nn.Module
    core: Tensor
    factors: list[Tensor]
    scale: float
    x: Tensor
    dy: Tensor

    @property
    def flora_params(self) -> list[Tensor]:
        return [self.core, *self.factors]


def make_base(shape: Shape, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """The frozen base layer of ``shape`` (weights from the current RNG state)."""
    if shape.op == "linear":
        m: nn.Module = nn.Linear(shape.in_ch, shape.out_ch, bias=True)
    else:
        m = nn.Conv2d(
            shape.in_ch, shape.out_ch, shape.kernel, shape.stride, shape.padding, groups=shape.groups, bias=True
        )
    m = m.to(device=device, dtype=dtype or shape.torch_dtype)
    if shape.channels_last and shape.op == "conv":
        m = m.to(memory_format=torch.channels_last)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def make_materials(shape: Shape, device: torch.device | str, seed: int = 0) -> Materials:
    """Random, non-zero inputs and adapter for ``shape``.

    The core is drawn N(0, 1) (not the paper's zero init: a zero adapter would make every
    check pass trivially) and ``scale`` is set so that ||s dW|| = 0.5 ||W||: the adapter's
    share of the output is large enough for its errors to show.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = make_base(shape, device)
    ranks = shape.ranks
    factors = [torch.empty(i, r, dtype=torch.float64) for i, r in zip(shape.weight_shape, ranks)]
    init_tucker_(torch.empty(ranks, dtype=torch.float64), factors, generator=g)  # the paper's factor init
    core = torch.randn(ranks, generator=g, dtype=torch.float64)
    dw = tucker_reconstruct(core, factors, 1.0)
    scale = float(0.5 * base.weight.detach().double().norm().cpu() / dw.norm().clamp_min(1e-30))
    x = torch.randn(shape.x_shape, generator=g, dtype=torch.float64)
    dy = torch.randn(output_shape(shape), generator=g, dtype=torch.float64)
    x = x.to(device=device, dtype=shape.torch_dtype)
    dy = dy.to(device=device, dtype=shape.torch_dtype)
    if shape.channels_last and shape.op == "conv":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    return Materials(shape, device, base, core.to(device), [f.to(device) for f in factors], scale, x, dy)


def output_shape(shape: Shape) -> tuple[int, ...]:
    if shape.op == "linear":
        return (shape.tokens, shape.out_ch)
    return (shape.batch, shape.out_ch, shape.out_hw, shape.out_hw)


def base_op(shape: Shape, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The base layer's op with an arbitrary weight (same geometry)."""
    if shape.op == "linear":
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, shape.stride, shape.padding, 1, shape.groups)


def merged_base(mat: Materials, delta: Tensor) -> nn.Module:
    """A copy of the base module whose weight is W + delta (merged inference: one plain module
    call, like the base itself)."""
    m = copy.deepcopy(mat.base)
    with torch.no_grad():
        m.weight.add_(delta.to(m.weight.dtype))
    return m


# --------------------------------------------------------------------------------------
# Built providers


@dataclass
class Built:
    """One provider instantiated for one shape.

    forward: x -> y (adapter unmerged; autograd per the caller's grad mode).
    params: the provider's trainable leaves, in its own parameterization.
    to_flora: maps the provider's parameter gradients to gradients of FLoRA's
        (core, *factors) in float64; None when the provider has no adapter (the base).
    merged_forward: x -> y with merged weights precomputed (None: ``merged_skip`` says why).
    """

    name: str
    impl: str
    forward: Callable[[Tensor], Tensor]
    params: list[Tensor]
    to_flora: Callable[[Sequence[Tensor | None]], list[Tensor]] | None
    merged_forward: Callable[[Tensor], Tensor] | None
    merged_skip: str | None = None
    adapted: bool = True
    exception_is_skip: bool = False  # a failure at first use means "skip" (torch.compile)
    notes: list[str] = field(default_factory=list)


def vjp_map(phi: Callable[[list[Tensor]], list[Tensor]], flora: Sequence[Tensor]) -> Callable:
    """Gradients of the provider's parameters ``phi(flora)`` -> gradients of ``flora`` (fp64)."""

    def to_flora(own_grads: Sequence[Tensor | None]) -> list[Tensor]:
        leaves = [t.detach().double().clone().requires_grad_(True) for t in flora]
        with torch.enable_grad():
            outs = phi(leaves)
            pairs = [(o, g.to(o.dtype).reshape(o.shape)) for o, g in zip(outs, own_grads) if g is not None]
            if not pairs:
                return [torch.zeros_like(t) for t in leaves]
            grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]

    return to_flora


def _identity_to_flora(own_grads: Sequence[Tensor | None]) -> list[Tensor]:
    return [g.double() if g is not None else None for g in own_grads]  # type: ignore[misc]


def _copy_into(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for d, s in zip(dst, src):
            d.copy_(s.to(d.dtype))


def flora_layer(mat: Materials, strategy: str, backend: str) -> FLoRALayer:
    """A FLoRA layer over ``mat.base`` (shared, frozen) carrying ``mat``'s adapter values."""
    s = mat.shape
    cls = FLoRALinear if s.op == "linear" else FLoRAConv2d
    layer = cls(mat.base, rank=s.rank, kernel_rank=s.kernel_rank, scale=mat.scale, strategy=strategy, backend=backend)
    if tuple(layer.ranks) != tuple(s.ranks):
        raise AssertionError(f"{s.name}: layer ranks {layer.ranks} differ from the shape's {s.ranks}")
    _copy_into([layer.core, *layer.factors], mat.flora_params)
    return layer


def _merged_flora(layer: FLoRALayer) -> Callable[[Tensor], Tensor]:
    m = copy.deepcopy(layer)
    m.merge()
    m.requires_grad_(False)
    return m


class Provider:
    """Base class: a name, a reason to skip a shape (or None), and a builder."""

    name = ""
    family = ""

    def skip_reason(self, shape: Shape, device: torch.device, ctx: dict) -> str | None:
        return None

    def build(self, mat: Materials, ctx: dict) -> Built:
        raise NotImplementedError


class BaseProvider(Provider):
    name = "base"
    family = "base"

    def build(self, mat: Materials, ctx: dict) -> Built:
        return Built(
            self.name, f"torch.nn.{type(mat.base).__name__}, frozen", mat.base, [], None, mat.base, adapted=False
        )


class BaseAgainProvider(Provider):
    """The frozen base timed a second time, as its own provider: its ratio to ``base`` is the
    run's timing noise (two measurements of the same thing); differences smaller than its
    spread are noise."""

    name = "base-again"
    family = "base"

    def build(self, mat: Materials, ctx: dict) -> Built:
        return Built(self.name, "the frozen base again (noise gauge)", mat.base, [], None, mat.base, adapted=False)


class FLoRAProvider(Provider):
    family = "flora"

    def __init__(self, backend: str, strategy: str) -> None:
        self.backend, self.strategy = backend, strategy
        self.name = f"flora-{backend}-{strategy}"

    def skip_reason(self, shape: Shape, device: torch.device, ctx: dict) -> str | None:
        status = ctx["backends"].get(self.backend, "not registered")
        if status != "ok":
            return f"backend {self.backend!r} unavailable: {status}"
        if self.backend == "triton" and device.type == "cpu" and self.name not in ctx.get("explicit", ()):
            return (
                "Triton on CPU runs under the interpreter (correctness only, not a timing); "
                "name it in --providers to force"
            )
        return None

    def build(self, mat: Materials, ctx: dict) -> Built:
        layer = flora_layer(mat, self.strategy, self.backend)
        # Ask the dispatcher whether this backend serves this call with the layer's strategy
        # (auto: with at least one strategy).
        op = "linear" if mat.shape.op == "linear" else "conv"
        call = Call.describe(
            op, x=mat.x, weight=mat.base.weight, bias=mat.base.bias, core=layer.core, factors=list(layer.factors),
            conv=None if op == "linear" else ConvSpec.of(mat.base), strategy=self.strategy,
        )
        try:
            candidates(call, self.backend)
        except BackendUnavailable as e:
            raise SkipProvider(str(e)) from None
        impl = f"{type(layer).__name__}(backend={self.backend}, strategy={self.strategy})"
        if self.strategy == "auto":
            impl += " -> " + "/".join(f"{k}:{v}" for k, v in sorted(ctx["plans"][mat.shape.name].items()))
        return Built(self.name, impl, layer, [layer.core, *layer.factors], _identity_to_flora, _merged_flora(layer))


class SkipProvider(Exception):
    """Raised by a builder: this provider cannot serve this shape (the message says why)."""


# --------------------------------------------------------------------------------------
# LoRA


class TorchLoRA(nn.Module):
    """PEFT-style LoRA written here: ``base(x) + B(A(x)) * scaling`` (no dropout).

    Linear: A (r, in), B (out, r). Conv2d: A is a conv with the base geometry producing r
    channels per group (its (r, C_in/g, k, k) weight shared by every group, like FLoRA's
    factors), B a grouped 1x1 conv (out, r); for groups = 1 this is exactly peft's layer.
    """

    def __init__(self, base: nn.Module, shape: Shape, r: int) -> None:
        super().__init__()
        self.base, self.shape, self.scaling = base, shape, 1.0
        dt, dev = base.weight.dtype, base.weight.device
        if shape.op == "linear":
            self.lora_A = nn.Parameter(torch.empty(r, shape.in_ch, dtype=dt, device=dev))
            self.lora_B = nn.Parameter(torch.empty(shape.out_ch, r, dtype=dt, device=dev))
        else:
            k = shape.kernel
            self.lora_A = nn.Parameter(torch.empty(r, shape.in_ch // shape.groups, k, k, dtype=dt, device=dev))
            self.lora_B = nn.Parameter(torch.empty(shape.out_ch, r, 1, 1, dtype=dt, device=dev))

    def forward(self, x: Tensor) -> Tensor:
        s = self.shape
        y = self.base(x)
        if s.op == "linear":
            return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        a = self.lora_A if s.groups == 1 else self.lora_A.repeat(s.groups, 1, 1, 1)
        z = F.conv2d(x, a, None, s.stride, s.padding, 1, s.groups)
        return y + F.conv2d(z, self.lora_B, None, 1, 0, 1, s.groups) * self.scaling


def _lora_phi(shape: Shape, scale: float) -> Callable[[list[Tensor]], list[Tensor]]:
    """FLoRA (core, factors) -> LoRA (A, B) with B A = s * dW exactly.

    Linear: A = U_in^T (r_in x in), B = s U_out G (out x r_in): rank r_in.
    Conv: A = G x_1 U_in x_2 U_kh x_3 U_kw (r_out, c_in, k, k), B = s U_out: rank r_out.
    """

    def phi(p: list[Tensor]) -> list[Tensor]:
        core, *fs = p
        if shape.op == "linear":
            return [fs[1].t(), scale * fs[0] @ core]
        a = core
        for n in range(1, core.dim()):
            a = mode_n_product(a, fs[n], n)
        return [a, (scale * fs[0]).reshape(shape.out_ch, -1, 1, 1)]

    return phi


def _lora_delta(shape: Shape, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    if shape.op == "linear":
        return (b @ a) * scaling
    return torch.einsum("or,rikl->oikl", b.flatten(1), a) * scaling


class LoRAProvider(Provider):
    name = "lora"
    family = "lora"

    def __init__(self, prefer_peft: bool = True, name: str = "lora") -> None:
        self.prefer_peft, self.name = prefer_peft, name

    def _peft_reason(self, shape: Shape) -> str | None:
        if not self.prefer_peft:
            return "peft not requested"
        try:
            import peft  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"peft not importable ({type(e).__name__}: {e})"
        if shape.op == "conv" and shape.groups > 1:
            return (
                f"peft's grouped-conv LoRA needs the rank divisible by groups ({shape.ranks[0]} % {shape.groups}) "
                "and mixes all input channels in lora_A (a different function)"
            )
        return None

    def build(self, mat: Materials, ctx: dict) -> Built:
        s = mat.shape
        r = s.ranks[1] if s.op == "linear" else s.ranks[0]
        phi = _lora_phi(s, mat.scale)
        a_val, b_val = (t.detach() for t in phi(mat.flora_params))
        why_not_peft = self._peft_reason(s)
        if why_not_peft is None:
            import peft
            from peft import LoraConfig, get_peft_model

            wrapper = nn.Module()
            wrapper.layer = mat.base  # type: ignore[attr-defined]
            cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["layer"], bias="none")
            pm = get_peft_model(wrapper, cfg, autocast_adapter_dtype=False)
            layer = pm.base_model.model.layer
            a_p, b_p = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if float(layer.scaling["default"]) != 1.0:
                raise AssertionError(f"peft scaling {layer.scaling['default']} != 1")
            _copy_into([a_p, b_p], [a_val.reshape(a_p.shape), b_val.reshape(b_p.shape)])
            impl = f"peft {peft.__version__} {type(layer).__module__}.{type(layer).__name__} (r={r}, alpha={r})"
            params = [a_p, b_p]
        else:
            layer = TorchLoRA(mat.base, s, r)
            _copy_into([layer.lora_A, layer.lora_B], [a_val, b_val])
            impl = f"TorchLoRA written here (r={r}): {why_not_peft}"
            params = [layer.lora_A, layer.lora_B]
        with torch.no_grad():
            merged = merged_base(mat, _lora_delta(s, params[0], params[1], 1.0))
        return Built(self.name, impl, layer, params, vjp_map(phi, mat.flora_params), merged)


# --------------------------------------------------------------------------------------
# The paper's public reference formula


class PaperFormula(nn.Module):
    """FLoRA as the paper's public code computes it, re-implemented from the formula.

    Parameters in the paper's mode order: ``param_G`` (r_in, r_out, *r_k), ``param_0``
    (in, r_in), ``param_1`` (out, r_out), ``param_{2+j}`` (k_j, r_kj). Every call
    materializes dW = s * einsum(G, U_0, U_1, ...) at full size, transposes it to (out, in, k...)
    and runs a second full linear/conv, added to the base output. (The public code's wrong dW
    shape for grouped convs is not reproduced: dW here has the base weight's shape.)
    """

    def __init__(self, base: nn.Module, shape: Shape, scale: float, ranks: Sequence[int]) -> None:
        super().__init__()
        self.base, self.shape, self.scale = base, shape, scale
        dt, dev = base.weight.dtype, base.weight.device
        w = shape.weight_shape
        order = (1, 0) + tuple(range(2, len(w)))  # paper mode n <- our mode order[n]
        self.param_G = nn.Parameter(torch.empty(tuple(ranks[i] for i in order), dtype=dt, device=dev))
        self.params = nn.ParameterList(nn.Parameter(torch.empty(w[i], ranks[i], dtype=dt, device=dev)) for i in order)
        letters = "abcd"[: len(w)]
        outs = "iokl"[: len(w)]
        self.eq = f"{letters}," + ",".join(f"{o}{c}" for o, c in zip(outs, letters)) + f"->{outs}"

    def delta(self) -> Tensor:
        d = torch.einsum(self.eq, self.param_G, *self.params)  # (in, out, k...)
        return d.transpose(0, 1) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + base_op(self.shape, x, self.delta(), None)


def _paper_phi(p: list[Tensor]) -> list[Tensor]:
    core, *fs = p
    order = (1, 0) + tuple(range(2, core.dim()))
    return [core.permute(order)] + [fs[i] for i in order]


class PaperProvider(Provider):
    name = "paper-formula"
    family = "paper"

    def build(self, mat: Materials, ctx: dict) -> Built:
        s = mat.shape
        m = PaperFormula(mat.base, s, mat.scale, s.ranks)
        _copy_into([m.param_G, *m.params], _paper_phi(mat.flora_params))
        with torch.no_grad():
            merged = merged_base(mat, m.delta())
        impl = f"einsum '{m.eq}' materializes dW every call + second full {'linear' if s.op == 'linear' else 'conv2d'}"
        return Built(self.name, impl, m, [m.param_G, *m.params], vjp_map(_paper_phi, mat.flora_params), merged)


# --------------------------------------------------------------------------------------
# torch.compile of the reference path


class CompileProvider(Provider):
    name = "compile-reference"
    family = "compile"

    def skip_reason(self, shape: Shape, device: torch.device, ctx: dict) -> str | None:
        if ctx.get("quick") and device.type == "cpu" and self.name not in ctx.get("explicit", ()):
            return (
                "torch.compile on CPU takes tens of seconds per shape and grad mode (inductor C++ codegen): "
                "skipped in --quick; run without --quick or name it in --providers"
            )
        if not hasattr(torch, "compile"):
            return "torch.compile not available"
        return None

    def build(self, mat: Materials, ctx: dict) -> Built:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(int(dynamo.config.cache_size_limit), 64)
        layer = flora_layer(mat, "auto", "reference")
        compiled = torch.compile(layer, dynamic=False)
        return Built(
            self.name,
            "torch.compile(FLoRA layer, backend=reference, strategy=auto, dynamic=False)",
            compiled,
            [layer.core, *layer.factors],
            _identity_to_flora,
            None,
            merged_skip=(
                "merged inference is the plain base op; compiling it only measures torch.compile of F.linear/conv2d"
            ),
            exception_is_skip=True,
        )


def default_providers() -> list[Provider]:
    """Every provider, in table order."""
    out: list[Provider] = [BaseProvider(), BaseAgainProvider()]
    for b in backend_names():
        for st in STRATEGIES + ("auto",):
            out.append(FLoRAProvider(b, st))
    out += [LoRAProvider(), PaperProvider(), CompileProvider()]
    return out


def backends_status() -> dict[str, str]:
    """``fk.available_backends()``, never raising."""
    try:
        return dict(available_backends())
    except Exception as e:  # noqa: BLE001
        return {b: f"available_backends() failed: {type(e).__name__}: {e}" for b in backend_names()}


__all__ = [
    "BaseAgainProvider",
    "BaseProvider",
    "Built",
    "CompileProvider",
    "FLoRAProvider",
    "LoRAProvider",
    "Materials",
    "PaperFormula",
    "PaperProvider",
    "Provider",
    "SkipProvider",
    "TorchLoRA",
    "backends_status",
    "default_providers",
    "make_materials",
    "output_shape",
]
