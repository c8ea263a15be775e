"""The contract every backend implements: the typed call description, the registry, selection.

A ``Call`` describes one call by metadata only (op, every tensor's shape/dtype/device/layout
class/grad flag, conv geometry, strategy, dropout, grad mode, torch's thread count), so it is
hashable: it is what backends answer questions about and what measured dispatch caches on.

A backend is a set of *differentiable* op implementations, one method per op it serves
(``reconstruct``, ``project``, ``linear`` and ``conv`` on the factorized path; an op with no
method is unsupported), plus the questions the dispatcher (``backends.autotune``) asks; a
backend times nothing itself:

- ``unavailable_reason()``: why it cannot run on this machine at all (None if it can);
- ``unsupported_reason(call)``: why it cannot serve this call (None if it can);
- ``auto_reason(call)``: why ``backend="auto"`` should not pick it (defaults to unsupported_reason;
  e.g. Triton serves explicit requests under the CPU interpreter that auto must not take);
- ``variants(call)``: its kernel variants for the call (strategy concrete), default first; ()
  for one implementation. ``variant_reason(call, variant, auto)`` says why one cannot serve (or,
  ``auto``, why the dispatcher should not choose it), and ``with_variant(v)`` is the backend
  bound to one (its op methods run that variant).

A call whose base weight is not a plain floating tensor (a quantized tensor subclass, packed
integer data; ``TensorSpec.layout == "opaque"``) or is missing (``weight=None``: base computed
elsewhere) never reaches the merged strategy nor a backend with ``reads_weight_memory`` (its
kernels read the weight's storage): see ``call_reason``.

The merged strategy (reconstruct ``W + dW``, then the plain torch op) is composed once above
the backends (``flora_kernels.backends.merged``): a backend serves ``(linear|conv, merged)``
exactly when it serves the reconstruct that call needs.

The registry (``register``) is the one source of backend names and of auto's order (its
``auto_rank``, lowest first). An explicit request for a backend that cannot serve the call
raises ``BackendUnavailable`` with its reason and how to get it.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from ..convspec import ConvSpec, canonical_weight, conv_nd

STRATEGIES = ("factorized", "merged")
# Ops with a strategy (factorized: the backend's own method; merged: composed over its reconstruct).
STRATEGY_OPS = ("linear", "conv")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve the call."""


def _opaque(t: Tensor) -> bool:
    """Whether ``t``'s storage is not a plain floating tensor a kernel could read: packed integer
    data or a tensor subclass (e.g. a quantized weight; torch's own tracing tensors excepted)."""
    if not t.is_floating_point():
        return True
    if type(t) in (Tensor, torch.nn.Parameter):
        return False
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return not isinstance(t, (FakeTensor, FunctionalTensor))


def _layout(t: Tensor) -> str:
    if _opaque(t):
        return "opaque"
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return "strided"


class TensorSpec(NamedTuple):
    """One tensor argument's metadata. ``layout``: contiguous, channels_last(_3d), strided, or
    opaque (not a plain floating tensor: packed / quantized data a kernel cannot read).

    (A NamedTuple: built for every tensor of every call, it must be cheap.)
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    layout: str
    requires_grad: bool

    @staticmethod
    def of(t: Tensor) -> TensorSpec:
        return TensorSpec(tuple(t.shape), t.dtype, str(t.device), _layout(t), t.requires_grad)

    @property
    def device_type(self) -> str:
        return self.device.split(":", 1)[0]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def dim(self) -> int:
        return len(self.shape)

    def short(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        lay = "" if self.layout == "contiguous" else f",{self.layout}"
        return f"{tuple(self.shape)}:{dt}{lay}{'*' if self.requires_grad else ''}"


@torch.compiler.assume_constant_result
def _num_threads() -> int:
    return torch.get_num_threads()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype if autocast is on for this device type, else None (also for device
    types autocast does not know, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


@dataclass(frozen=True)
class Call:
    """What one functional call asks for, by metadata.

    ``x``: the input (x of linear/conv, t of project; None for reconstruct). ``base``: the
    tensor reconstruct adds to. ``strategy``: "auto", "factorized" or "merged" for linear/conv,
    None for ops without one. ``options``: op-specific hashable extras (name, value) pairs.
    """

    op: str
    x: TensorSpec | None = None
    weight: TensorSpec | None = None
    bias: TensorSpec | None = None
    core: TensorSpec | None = None
    factors: tuple[TensorSpec, ...] = ()
    base: TensorSpec | None = None
    conv: ConvSpec | None = None
    strategy: str | None = None
    dropout: bool = False
    grad_enabled: bool = False
    threads: int = 1
    options: tuple[tuple[str, object], ...] = ()
    autocast: torch.dtype | None = None

    @staticmethod
    def describe(
        op: str, *, x: Tensor | None = None, weight: Tensor | None = None, bias: Tensor | None = None,
        core: Tensor | None = None, factors: Sequence[Tensor] = (), base: Tensor | None = None,
        conv: ConvSpec | None = None, strategy: str | None = None, dropout_p: float = 0.0,
        options: tuple[tuple[str, object], ...] = (),
    ) -> Call:
        """The description of a call with these tensors, in the current grad mode and threads."""

        def spec(t: Tensor | None) -> TensorSpec | None:
            return None if t is None else TensorSpec.of(t)

        lead = x if x is not None else core
        return Call(
            op, spec(x), spec(weight), spec(bias), spec(core), tuple(TensorSpec.of(f) for f in factors), spec(base),
            conv, strategy, dropout_p > 0, torch.is_grad_enabled(), _num_threads(), options,
            None if lead is None else autocast_dtype(lead.device.type),
        )

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the call computes in: the autocast dtype when autocast is on, else x's (or the core's)."""
        if self.autocast is not None:
            return self.autocast
        lead = self.x if self.x is not None else self.core
        return torch.float32 if lead is None else lead.dtype

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in (self.x, self.weight, self.bias, self.core, *self.factors, self.base) if t is not None)

    @property
    def device(self) -> str:
        ts = self.tensors
        return ts[0].device if ts else "cpu"

    @property
    def device_type(self) -> str:
        return self.device.split(":", 1)[0]

    @property
    def adapter_needs_grad(self) -> bool:
        adapter = [t for t in (self.core, *self.factors) if t is not None]
        return self.grad_enabled and any(t.requires_grad for t in adapter)

    @property
    def weight_readable(self) -> bool:
        """Whether the base weight is given as a plain floating tensor (not opaque, not None)."""
        return self.weight is not None and self.weight.layout != "opaque"

    @property
    def x_needs_grad(self) -> bool:
        return self.grad_enabled and self.x is not None and self.x.requires_grad

    @property
    def needs_grad(self) -> bool:
        return self.grad_enabled and any(t.requires_grad for t in self.tensors)

    def with_strategy(self, strategy: str) -> Call:
        return replace(self, strategy=strategy)

    def reconstruct_call(self) -> Call:
        """The reconstruct the merged strategy runs for this linear/conv call (W + s dW)."""
        return Call(
            "reconstruct", core=self.core, factors=self.factors, base=self.weight,
            grad_enabled=self.grad_enabled, threads=self.threads, autocast=self.autocast,
        )

    def __str__(self) -> str:
        parts = [self.op]
        for name in ("x", "weight", "core"):
            t = getattr(self, name)
            if t is not None:
                parts.append(f"{name}={t.short()}")
        if self.conv is not None:
            c = self.conv
            parts.append(f"stride={c.stride} pads={c.pads} dil={c.dilation} groups={c.groups} {c.padding_mode}")
        if self.strategy is not None:
            parts.append(f"strategy={self.strategy}")
        if self.autocast is not None:
            parts.append(f"autocast={str(self.autocast).replace('torch.', '')}")
        parts.append(("grad" if self.needs_grad else "no-grad") + (" dropout" if self.dropout else ""))
        parts.append(f"{self.threads} thread{'s' if self.threads != 1 else ''} on {self.device}")
        return " ".join(parts)


class Backend:
    """Base class: subclasses set ``name``/``how_to_get`` and define one method per op they serve.

    ``reads_weight_memory``: its linear/conv kernels read the base weight's storage directly, so a
    call with an opaque (e.g. quantized) or missing weight never reaches it. ``variant``: the kernel
    variant this instance runs (None: the backend's default; see ``with_variant``).
    """

    name: str = ""
    how_to_get: str = ""
    reads_weight_memory: bool = True
    variant: str | None = None

    def unavailable_reason(self) -> str | None:
        return None

    def unsupported_reason(self, call: Call) -> str | None:
        return None

    def auto_reason(self, call: Call) -> str | None:
        """Why ``auto`` should not pick this backend for the call (defaults to unsupported_reason)."""
        return self.unsupported_reason(call)

    def variants(self, call: Call) -> tuple[str, ...]:
        """Its kernel variants for ``call`` (strategy concrete), the default first; () for one implementation."""
        return ()

    def variant_reason(self, call: Call, variant: str, auto: bool = False) -> str | None:
        """Why ``variant`` cannot serve ``call`` (``auto``: or why the dispatcher should not choose it)."""
        return None if variant in self.variants(call) else f"expected one of {self.variants(call)}, got {variant!r}"

    def with_variant(self, variant: str | None) -> Backend:
        """This backend bound to ``variant`` (one instance per variant; None: this one)."""
        if variant is None or variant == self.variant:
            return self
        bound = self.__dict__.setdefault("_bound", {})
        if variant not in bound:
            b = copy.copy(self)
            b.__dict__.pop("_bound", None)
            b.variant = variant
            bound[variant] = b
        return bound[variant]

    def made_variant(self, variant: str | None) -> Backend:
        """The instance ``with_variant(variant)`` returned earlier: a lookup only, so traced code
        (torch.compile) can take the variant a decision named."""
        return self if variant is None or variant == self.variant else self._bound[variant]

    def conv_op(
        self, x: Tensor, weight: Tensor, core: Tensor, factors: Sequence[Tensor], scale: float, spec: ConvSpec,
        dropout_p: float,
    ) -> Callable[[Tensor, Tensor, Tensor | None, Tensor, Sequence[Tensor]], Tensor]:
        """Its factorized ``conv`` for every input of x's signature (shape, strides, dtype, grad mode,
        autocast) with these settings, as ``op(x, weight, bias, core, factors)``: a layer binds it
        once, so what depends only on the signature is decided here, not per call. Default: ``conv``."""
        return lambda x, w, b, c, fs: self.conv(x, w, b, c, fs, scale, spec, dropout_p)  # type: ignore[attr-defined]

    def merged_conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
                    scale: float, spec: ConvSpec) -> Tensor:
        """The merged strategy's conv without dropout, ``conv(x, W + s dW) + b``: x (N, C_in, *sp),
        weight (C_out, C_in/g, *k) -> (N, C_out, *out). Default: its differentiable ``reconstruct``,
        then torch's conv (a backend may run the whole as one op)."""
        w = self.reconstruct(core, factors, scale, weight)  # type: ignore[attr-defined]
        return conv_nd(x, canonical_weight(w), bias, spec)


@dataclass(frozen=True)
class _Entry:
    loader: Callable[[], Backend]
    auto_rank: int | None


_REGISTRY: dict[str, _Entry] = {}
_INSTANCES: dict[str, Backend | str] = {}


def register(name: str, loader: Callable[[], Backend] | str, auto_rank: int | None) -> None:
    """Register a backend, loaded at first use (so import stays cheap).

    ``loader``: a callable returning the backend, or "module:Class" (relative to this package).
    ``auto_rank``: its place in auto's order, lowest first; None: auto never picks it.
    """
    if isinstance(loader, str):
        module, _, cls = loader.partition(":")

        def load(module: str = module, cls: str = cls) -> Backend:
            return getattr(importlib.import_module(module, __package__), cls)()

        loader = load
    _REGISTRY[name] = _Entry(loader, auto_rank)
    _INSTANCES.pop(name, None)


def unregister(name: str) -> None:
    """Remove a backend registered with ``register`` (tests use this)."""
    _REGISTRY.pop(name, None)
    _INSTANCES.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """Every registered backend, in registration order."""
    return tuple(_REGISTRY)


def auto_order() -> tuple[str, ...]:
    """The backends auto may pick, fastest first."""
    ranked = [(e.auto_rank, n) for n, e in _REGISTRY.items() if e.auto_rank is not None]
    return tuple(n for _, n in sorted(ranked))


def load_backend(name: str) -> Backend | str:
    """The backend instance, or the reason it could not be loaded."""
    if name not in _INSTANCES:
        if name not in _REGISTRY:
            _INSTANCES[name] = "not registered"
        else:
            try:
                _INSTANCES[name] = _REGISTRY[name].loader()
            except Exception as e:  # noqa: BLE001 - a broken optional backend must not break import
                _INSTANCES[name] = f"failed to load: {type(e).__name__}: {e}"
    return _INSTANCES[name]


def available_backends() -> dict[str, str]:
    """Every known backend -> "ok" or the reason it is unavailable on this machine."""
    out = {}
    for name in backend_names():
        b = load_backend(name)
        out[name] = b if isinstance(b, str) else (b.unavailable_reason() or "ok")
    return out


def resolve_backend_name(requested: str) -> str:
    """Validate a backend name ("auto" or a registered one)."""
    if requested != "auto" and requested not in _REGISTRY:
        raise ValueError(f"backend: expected one of {('auto',) + backend_names()}, got {requested!r}")
    return requested


def call_reason(b: Backend | str, call: Call, auto: bool = False) -> str | None:
    """Why backend ``b`` (or its load failure) cannot serve ``call``; None if it can.

    ``call.strategy`` must be concrete for linear/conv. ``auto``: ask ``auto_reason``.
    """
    if isinstance(b, str):
        return b
    reason = b.unavailable_reason()
    if reason is not None:
        return reason
    ask = b.auto_reason if auto else b.unsupported_reason
    if call.op in STRATEGY_OPS and not call.weight_readable:
        what = "missing (base computed elsewhere)" if call.weight is None else "not a plain floating tensor (quantized?)"
        if call.strategy == "merged":
            return f"the merged strategy adds dW to the base weight, which is {what}"
        if b.reads_weight_memory:
            return f"its kernels read the base weight's memory, which is {what}"
    if call.op in STRATEGY_OPS and call.strategy == "merged":
        if not callable(getattr(b, "reconstruct", None)):
            return "merged strategy: it does not implement reconstruct"
        reason = ask(call.reconstruct_call())
        return None if reason is None else f"merged strategy (its reconstruct): {reason}"
    if not callable(getattr(b, call.op, None)):
        return f"it does not implement the op {call.op!r}"
    return ask(call)


def explicit_backend(name: str, call: Call) -> Backend:
    """Backend ``name`` if it serves ``call``, else ``BackendUnavailable`` saying why and how to get it."""
    b = load_backend(name)
    reason = call_reason(b, call)
    if reason is not None:
        how = "" if isinstance(b, str) else f" To get it: {b.how_to_get}"
        raise BackendUnavailable(f"backend {name!r} cannot run {call.op}: {reason}.{how}")
    return b  # type: ignore[return-value]


def auto_backends(call: Call) -> tuple[list[Backend], list[str]]:
    """The backends auto may pick for ``call`` in auto's order, and why each other one may not."""
    ok, reasons = [], []
    for name in auto_order():
        b = load_backend(name)
        reason = call_reason(b, call, auto=True)
        if reason is None:
            ok.append(b)  # type: ignore[arg-type]
        else:
            reasons.append(f"{name}: {reason}")
    return ok, reasons


# The built-in backends, in auto's order: Triton and CUDA on GPUs, the C++ kernels on CPU, the
# reference everywhere. (bench/results/ shows the measured order; measured dispatch refines it.)
register("reference", ".reference:ReferenceBackend", auto_rank=30)
register("triton", ".triton:TritonBackend", auto_rank=0)
register("cuda", ".ext.cuda:CudaBackend", auto_rank=10)
register("cpp", ".ext.cpp:CppBackend", auto_rank=20)
