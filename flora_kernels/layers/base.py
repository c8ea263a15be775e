"""FLoRALayer: named Tucker adapters around a frozen module, and the weight-write rules of merge.

A layer wraps ``base_layer`` (never copied; its parameters are frozen) and holds any number of
named adapters. Adapter ``a`` of a weight with N modes is ``core`` (ranks) and N factors
``(I_n, r_n)``, stored as ``flora_core[a]`` and ``flora_u{n}[a]`` (``nn.ParameterDict``), so its
state_dict keys are ``<module>.flora_core.<a>`` and ``<module>.flora_u<n>.<a>``. The active
adapters are summed:

    y = base(x) + sum_a op(dropout_a(x), s_a * G_a x_0 U_a0 ... x_{N-1} U_a{N-1})

Subclasses say how the weight is laid out (``weight_modes``: the adapted weight in its mode
order), how the fused forward runs (``_forward_fused``) and what the layer's op is
(``_delta_forward``: the op applied to a weight delta, no bias).

``forward(x)`` is bound per input signature (``_signature``): the first call of a signature
takes the live adapters, the dispatch decision and the weight reader once (``_bind``); later
calls look the op up and run it. ``_changed()`` (every state change) drops the bound ops; under
torch.compile the traced forward holds only the ops it runs (``_forward_traced``).
docs/ARCHITECTURE.md ("Bound calls") lists the events.

Merge writes ``W + sum_a s_a dW_a`` into the weight the base layer actually uses:

- a plain parameter owned by this module alone: in place (unmerge subtracts, within rounding);
- a parameter shared with another module (tied embeddings): into a new parameter of this module
  alone; unmerge puts the shared one back (the tie is restored bit for bit). Costs one copy of
  the weight while merged;
- a weight computed from others (``torch.nn.utils.weight_norm``'s hook, or a parametrization
  such as ``parametrizations.weight_norm``): the sources are set so that they produce the merged
  weight exactly, and restored bit for bit on unmerge (one copy of the sources while merged).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

from ..backends import autotune
from ..backends.base import (
    Backend,
    BackendUnavailable,
    TensorSpec,
    autocast_dtype,
    backend_names,
    load_backend,
    resolve_backend_name,
)
from ..config import Rank, check_rank
from ..functional import tucker_reconstruct
from ..tucker import clamp_ranks, init_tucker_

MAX_MODES = 5
SCALE_BUFFER = "flora_scale_"  # + adapter name: the scale as a tensor (hold_scale_as_tensor)


@dataclass(frozen=True)
class AdapterSettings:
    """One adapter's hyper-parameters: full per-mode ``ranks`` (already clamped), scale s,
    dropout on the adapter's input, the strategy/backend its forward asks for, and
    ``lean_memory`` (its input factor stays frozen; see ``FLoRALayer.trainable_tensors``)."""

    ranks: tuple[int, ...]
    scale: float = 1.0
    dropout: float = 0.0
    strategy: str = "auto"
    backend: str = "auto"
    lean_memory: bool = False


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapter parameters live in fp32 unless the base is fp64 (low-precision bases included)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def expand_rank(value: Rank, n: int, name: str) -> tuple[int, ...]:
    """An int or an n-tuple of positive ints -> an n-tuple."""
    check_rank(value, name)
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"{name}: expected an int or {n} ints, got {value!r}")
    return tuple(value)


class _MergedGuard(torch.autograd.Function):
    """Identity whose backward raises: a merged adapter gets no gradient (train unmerged).
    Applied only in training mode with gradients on, where it costs one copy of the output."""

    @staticmethod
    def forward(ctx, y: Tensor, anchor: Tensor) -> Tensor:
        return y.clone()  # not a view: model code may modify it in place (inplace activations)

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise RuntimeError(
            "backward through a merged FLoRA layer: its adapter is folded into the base weight and gets no "
            "gradient; call fk.unmerge_flora(model) (or layer.unmerge()) before training"
        )


class FLoRALayer(nn.Module):
    """Common machinery of every FLoRA layer (see the module docstring)."""

    base_types: tuple[type[nn.Module], ...] = ()
    #: strategies this layer type implements besides "auto"
    strategies: tuple[str, ...] = ("factorized", "merged")
    #: backends with kernels for this layer type's op; None: every registered backend ("auto" is always accepted)
    backends: tuple[str, ...] | None = None
    other_param_names = ("flora_settings",)
    #: the mode whose factor multiplies the layer input (U_in), frozen by ``lean_memory``; None: none does
    input_mode: int | None = 1

    def __init__(
        self,
        base_layer: nn.Module,
        rank: Rank = 16,
        kernel_rank: Rank | None = None,
        scale: float = 1.0,
        dropout: float = 0.0,
        strategy: str = "auto",
        backend: str = "auto",
        adapter_name: str | None = "default",
        lean_memory: bool = False,
    ) -> None:
        super().__init__()
        if not self.accepts(base_layer):
            raise TypeError(
                f"{type(self).__name__}: expected a {' or '.join(t.__name__ for t in self.base_types)} "
                f"module (or a subclass), got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.flora_core = nn.ParameterDict()
        for n in range(self.weight_modes().dim()):
            setattr(self, f"flora_u{n}", nn.ParameterDict())
        self.flora_settings: dict[str, AdapterSettings] = {}
        self._active: list[str] = []
        self.merged_adapters: list[str] = []
        self._adapters_disabled = False
        self._merge_saved: dict[str, Tensor] | None = None  # what unmerge restores (see module docstring)
        self._mixed: tuple[Tensor, list[str]] | None = None
        self.mixed_batch_dim = 0
        self.shared_with: tuple[str, ...] = ()  # other modules holding this weight (set by inject)
        self._bound = _Bindings(self._plan_traced)  # input signature -> bound op (see forward)
        if adapter_name is not None:
            self.add_adapter(adapter_name, rank, kernel_rank, scale, dropout, strategy, backend, lean_memory=lean_memory)

    # ------------------------------------------------------------------ type hooks

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        """Whether this class adapts ``module`` (its type or a subclass of it)."""
        return isinstance(module, cls.base_types)

    def base_weight(self) -> Tensor:
        """The weight the base layer computes with, in its stored layout (weight norm applied)."""
        hook = _legacy_weight_norm(self.base_layer, self.weight_name)
        if hook is not None:
            return hook.compute_weight(self.base_layer)
        return getattr(self.base_layer, self.weight_name)

    weight_name = "weight"

    @classmethod
    def weight_shape_of(cls, module: nn.Module) -> tuple[int, ...]:
        """The mode-order shape of the weight this class would adapt on ``module``."""
        return tuple(getattr(module, cls.weight_name).shape)

    def weight_modes(self, w: Tensor | None = None) -> Tensor:
        """The adapted weight in its mode order (a view of the stored layout; default: identity)."""
        return self.base_weight() if w is None else w

    def _modes_to_stored(self, delta: Tensor) -> Tensor:
        """Inverse of ``weight_modes``'s layout change, for a delta in mode order."""
        return delta

    def _forward_fused(self, x: Tensor, name: str, dropout_p: float, *args, **kwargs) -> Tensor:
        """base(x) + adapter ``name``'s term, by the layer's functional op."""
        raise NotImplementedError

    def _delta_forward(self, x: Tensor, delta: Tensor, *args, **kwargs) -> Tensor:
        """The layer's op applied to a weight delta in mode order, without bias."""
        raise NotImplementedError

    def _mask_delta(self, delta: Tensor) -> Tensor:
        """Entries of dW the layer type keeps at zero (an embedding's padding row)."""
        return delta

    def _kernel_modes(self) -> tuple[int, ...]:
        """Sizes of the spatial modes (ranked by ``kernel_rank``); none for 2-D weights."""
        return tuple(self.weight_modes().shape[2:])

    # ------------------------------------------------------------------ read-through

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "base_layer" not in modules or name == "base_layer":
                raise
            return getattr(modules["base_layer"], name)

    @property
    def adapter_layer_names(self) -> tuple[str, ...]:
        """The adapter containers (PEFT's name): ``flora_core`` and ``flora_u<n>`` per weight mode."""
        return ("flora_core",) + tuple(f"flora_u{n}" for n in range(self.flora_core_modes()))

    def flora_core_modes(self) -> int:
        return sum(1 for n in range(MAX_MODES) if f"flora_u{n}" in self._modules)

    @property
    def base(self) -> nn.Module:
        """Alias of ``base_layer``."""
        return self.base_layer

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    # ------------------------------------------------------------------ change events

    def _changed(self) -> None:
        """Adapters, their settings, the active/merged/disabled state or the base weight changed.

        Every method that changes any of them calls this once, after the change: prepared
        per-call state (bound calls, weight views) is dropped and rebuilt on the next forward.
        ``.to()`` / dtype / device moves (``_apply``) and ``load_state_dict`` call it too; a
        base weight or bias replaced by another tensor is noticed by the bound call itself.
        Under torch.compile the traced forward reads ``_bound``'s identity, so a change
        recompiles.
        """
        self._bound = _Bindings(self._plan_traced)

    def __getstate__(self) -> dict:  # copy / pickle: bound ops hold this layer's tensors, never copied
        state = self.__dict__.copy()
        state.pop("_bound", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._bound = _Bindings(self._plan_traced)

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda(), ...: new tensors
        out = super()._apply(fn, recurse)
        self._changed()
        return out

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # load_state_dict(assign=True) swaps tensors
        super()._load_from_state_dict(*args, **kwargs)
        self._changed()

    # ------------------------------------------------------------------ adapters

    def add_adapter(
        self,
        name: str,
        rank: Rank = 16,
        kernel_rank: Rank | None = None,
        scale: float = 1.0,
        dropout: float = 0.0,
        strategy: str = "auto",
        backend: str = "auto",
        init: bool = True,
        lean_memory: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        """Create adapter ``name`` (paper init: dW = 0) and make it active alongside the others.

        ``rank`` is the channel ranks (int or (r_out, r_in)) or every mode's rank; ``kernel_rank``
        the spatial ones (default: the full kernel). Ranks are clamped to the mode sizes.
        ``device``: where the tensors are created (default: the base weight's); on "meta" they
        are left uninitialized, to be assigned (PEFT's ``low_cpu_mem_usage``).
        """
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name: expected a non-empty string without dots, got {name!r}")
        if name in self.flora_settings:
            raise ValueError(f"adapter {name!r} already exists on {type(self).__name__}; delete it first")
        if not isinstance(lean_memory, bool):
            raise TypeError(f"lean_memory: expected a bool, got {lean_memory!r}")
        settings = replace(self.make_settings(rank, kernel_rank, scale, dropout, strategy, backend), lean_memory=lean_memory)
        w = self.weight_modes()
        dt = adapter_dtype(w)
        dev = w.device if device is None else torch.device(device)
        core = nn.Parameter(torch.empty(settings.ranks, dtype=dt, device=dev))
        factors = [nn.Parameter(torch.empty(i, r, dtype=dt, device=dev)) for i, r in zip(w.shape, settings.ranks)]
        if init and dev.type != "meta":
            init_tucker_(core, factors)
        self.flora_core[name] = core
        for n, f in enumerate(factors):
            getattr(self, f"flora_u{n}")[name] = f
        self.flora_settings[name] = settings
        self._active.append(name)
        self.set_trainable(name, True)
        self._changed()

    def make_settings(
        self, rank: Rank, kernel_rank: Rank | None, scale: float, dropout: float, strategy: str, backend: str
    ) -> AdapterSettings:
        """Validated settings for this layer's weight, ranks clamped to its mode sizes."""
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        if strategy not in ("auto",) + self.strategies:
            raise ValueError(
                f"strategy: expected one of {('auto',) + self.strategies} for {type(self).__name__}, got {strategy!r}"
            )
        resolve_backend_name(backend)
        if backend != "auto" and backend not in self.served_backends():
            raise BackendUnavailable(
                f"backend {backend!r} has no kernel for {type(self).__name__}; {self.served_backends()} serve it "
                "(backend='auto' picks one)"
            )
        shape = tuple(self.weight_modes().shape)
        kernel = shape[2:]
        if isinstance(rank, (tuple, list)) and len(rank) == len(shape) and len(shape) > 2:
            requested = expand_rank(tuple(rank), len(shape), "rank")
        else:
            requested = expand_rank(rank, 2, "rank")
            if kernel and kernel_rank is not None:
                requested += expand_rank(kernel_rank, len(kernel), "kernel_rank")
            else:  # full kernel rank; a 2-D weight has no spatial mode and ignores kernel_rank
                requested += kernel
        return AdapterSettings(clamp_ranks(shape, requested), float(scale), float(dropout), strategy, backend)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; the other adapters keep their merge state.

        Raises:
            ValueError: ``name`` is merged (as PEFT: unmerge it first).
        """
        self._check_names([name])
        if name in self.merged_adapters:
            raise ValueError(f"Cannot delete adapter(s) [{name!r}] while they are merged. Please unmerge them first.")
        del self.flora_core[name]
        for n in range(self.weight_modes().dim()):
            del getattr(self, f"flora_u{n}")[name]
        del self.flora_settings[name]
        self._buffers.pop(SCALE_BUFFER + name, None)
        if name in self._active:
            self._active.remove(name)
        self._changed()

    def set_adapter(self, names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make ``names`` the active set (names absent here are ignored): only their
        ``trainable_tensors`` require grad, and not even they with ``inference_mode`` (PEFT's rule)."""
        names = [names] if isinstance(names, str) else list(names)
        self._active = [n for n in names if n in self.flora_settings]
        for n in self.flora_settings:
            self.set_trainable(n, n in self._active and not inference_mode)
        self._changed()

    def trainable_tensors(self, name: str) -> list[nn.Parameter]:
        """The one rule of which tensors of adapter ``name`` train while it is active: all of
        them, except the input factor (mode ``input_mode``) of a ``lean_memory`` adapter, which
        stays at its init (LoRA-FA style), so that backward needs S = x U_in, not x."""
        tensors = self._tensors_of(name)
        if self.flora_settings[name].lean_memory and self.input_mode is not None:
            frozen = tensors[1 + self.input_mode]
            return [p for p in tensors if p is not frozen]
        return tensors

    def set_trainable(self, name: str, trainable: bool) -> None:
        """``requires_grad`` of adapter ``name``'s tensors: its ``trainable_tensors`` follow
        ``trainable``, the others are frozen. The caller signals ``_changed`` once after it."""
        train = {id(p) for p in self.trainable_tensors(name)} if trainable else set()
        for p in self._tensors_of(name):
            p.requires_grad_(id(p) in train)

    def set_lean_memory(self, value: bool, name: str | None = None) -> None:
        """Turn ``lean_memory`` on or off for adapter ``name`` (default: every adapter); an active
        adapter's trainability follows (``trainable_tensors``)."""
        names = self.adapter_names if name is None else [name]
        self._check_names(names)
        if not isinstance(value, bool):
            raise TypeError(f"lean_memory: expected a bool, got {value!r}")
        for n in names:
            self.flora_settings[n] = replace(self.flora_settings[n], lean_memory=value)
            if n in self._active:
                self.set_trainable(n, True)
        self._changed()

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> list[str]:
        return list(self._active)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.flora_settings)

    def _check_names(self, names: Iterable[str]) -> None:
        for n in names:
            if n not in self.flora_settings:
                raise KeyError(f"adapter {n!r} not found; this layer has {self.adapter_names}")

    def _tensors_of(self, name: str) -> list[nn.Parameter]:
        # the containers' parameter dicts read directly: what ParameterDict's ``[name]`` returns, and
        # much less for Dynamo to trace on every traced forward
        mods = self._modules
        core = mods["flora_core"]._parameters[name]
        return [core] + [mods[f"flora_u{n}"]._parameters[name] for n in range(core.dim())]

    def tensors(self, name: str) -> tuple[nn.Parameter, list[nn.Parameter]]:
        """(core, factors) of adapter ``name``."""
        self._check_names([name])
        core, *factors = self._tensors_of(name)
        return core, factors

    @property
    def disable_adapters(self) -> bool:
        return self._adapters_disabled

    def enable_adapters(self, enabled: bool) -> None:
        """Use (True) or bypass (False) the adapters, as PEFT does: disabling unmerges merged
        adapters (the layer then computes the base output) and freezes every adapter tensor;
        enabling makes the active adapters trainable again."""
        self._adapters_disabled = not enabled
        if enabled:
            self.set_adapter(self._active)  # signals the change
            return
        if self.merged_adapters:
            self.unmerge()
        for n in self.flora_settings:
            self.set_trainable(n, False)
        self._changed()

    @property
    def adapter_enabled(self) -> bool:
        return not self._adapters_disabled

    @adapter_enabled.setter
    def adapter_enabled(self, value: bool) -> None:
        self._adapters_disabled = not value
        self._changed()

    # single-adapter conveniences ----------------------------------------------------

    def _sole(self) -> str:
        names = self._active if self._active else self.adapter_names
        if len(names) != 1:
            raise ValueError(
                f"{type(self).__name__} has {len(names)} active adapters {names}; name one (layer.tensors(name), "
                "layer.flora_settings[name])"
            )
        return names[0]

    @property
    def core(self) -> nn.Parameter:
        return self.flora_core[self._sole()]

    @property
    def factors(self) -> list[nn.Parameter]:
        return self.tensors(self._sole())[1]

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.flora_settings[self._sole()].ranks

    @property
    def scale(self) -> float:
        return self.flora_settings[self._sole()].scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.set_scale(value, self._sole())

    def _update_sole(self, **changes) -> None:
        name = self._sole()
        s = replace(self.flora_settings[name], **changes)
        self.make_settings(s.ranks, None, s.scale, s.dropout, s.strategy, s.backend)  # validates
        self.flora_settings[name] = s
        self._changed()

    strategy = property(lambda self: self._sole_setting("strategy"), lambda self, v: self._update_sole(strategy=v))
    backend = property(lambda self: self._sole_setting("backend"), lambda self, v: self._update_sole(backend=v))
    dropout = property(lambda self: self._sole_setting("dropout"), lambda self, v: self._update_sole(dropout=float(v)))
    lean_memory = property(lambda self: self._sole_setting("lean_memory"), lambda self, v: self.set_lean_memory(v, self._sole()))

    def _sole_setting(self, field: str):
        return getattr(self.flora_settings[self._sole()], field)

    def set_scale(self, scale: float, name: str | None = None) -> None:
        """Set s of adapter ``name`` (default: every adapter); merged adapters are re-merged."""
        names = self.adapter_names if name is None else [name]
        self._check_names(names)
        merged = list(self.merged_adapters)
        self.unmerge()
        for n in names:
            self.flora_settings[n] = replace(self.flora_settings[n], scale=float(scale))
            held = self.scale_tensor(n)
            if held is not None:
                held.fill_(float(scale))
        if merged:
            self.merge(merged)
        if any(self.scale_tensor(n) is None for n in names):
            self._changed()  # a held scale is read per call: a new value needs no event (hotswap)

    def scale_tensor(self, name: str) -> Tensor | None:
        """Adapter ``name``'s scale as a 0-d tensor, where ``hold_scale_as_tensor`` made one."""
        return self._buffers.get(SCALE_BUFFER + name)

    def hold_scale_as_tensor(self, name: str) -> Tensor:
        """Keep adapter ``name``'s scale also as a 0-d buffer (adapter dtype and device, not
        saved in state_dict) that the forward multiplies into the core; ``set_scale`` writes it
        in place. A compiled model then sees a new scale as a new value of the same tensor, not
        as a new constant (no recompile). Returns the buffer."""
        self._check_names([name])
        held = self.scale_tensor(name)
        if held is None:
            core = self.flora_core[name]
            held = torch.tensor(self.flora_settings[name].scale, dtype=core.dtype, device=core.device)
            self.register_buffer(SCALE_BUFFER + name, held, persistent=False)
            self._changed()
        return held

    def adapter_terms(self, name: str) -> tuple[Tensor, list[Tensor], float]:
        """(core, factors, scale) adapter ``name`` computes with: its parameters and settings'
        scale, or, with a scale tensor (``hold_scale_as_tensor``), core * that tensor and 1.0."""
        core, factors = self.tensors(name)
        held = self.scale_tensor(name)
        if held is None:
            return core, factors, self.flora_settings[name].scale
        return core * held, factors, 1.0

    # ------------------------------------------------------------------ forward

    def _live(self) -> list[str]:
        """Adapters to compute on the fly: active, enabled and not merged."""
        if self._adapters_disabled:
            return []
        return [a for a in self._active if a not in self.merged_adapters]

    def _dropout_p(self, name: str) -> float:
        return self.flora_settings[name].dropout if self.training else 0.0

    def delta_weight(self, name: str | None = None) -> Tensor:
        """s * dW of adapter ``name`` (default: the sum over the active adapters), in mode order."""
        names = self._active if name is None else [name]
        self._check_names(names)
        w = self.weight_modes()
        total = None
        for n in names:
            core, factors, scale = self.adapter_terms(n)
            d = tucker_reconstruct(core, factors, scale, backend=self._reconstruct_backend(n))
            total = d if total is None else total + d
        if total is None:
            return torch.zeros(w.shape, dtype=adapter_dtype(w), device=w.device)
        return self._mask_delta(total)

    @classmethod
    def served_backends(cls) -> tuple[str, ...]:
        """The backends with kernels for this layer type (the live registry when not restricted)."""
        return backend_names() if cls.backends is None else cls.backends

    def _reconstruct_backend(self, name: str) -> str:
        b = self.flora_settings[name].backend
        return b if b in self.served_backends() else "auto"

    def _delta_term(self, x: Tensor, name: str, *args, **kwargs) -> Tensor:
        """The layer's op on adapter ``name``'s delta (merged form, its dropout included)."""
        p = self._dropout_p(name)
        xd = F.dropout(x, p, training=True) if p > 0 else x
        return self._delta_forward(xd, self.delta_weight(name).to(self.base_weight().dtype), *args, **kwargs)

    def effective_weight(self) -> Tensor:
        """The base weight plus the live adapters' deltas, stored layout, differentiable."""
        w = self.base_weight()
        live = self._live()
        if not live:
            return w
        return w + self._modes_to_stored(sum(self.delta_weight(a) for a in live)).to(w.dtype)

    def _base_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.base_layer(x, *args, **kwargs)

    def _forward_adapters(self, x: Tensor, live: list[str], *args, **kwargs) -> Tensor:
        """base(x) + the live adapters: the first by the fused op, the others as delta terms."""
        first, *rest = live
        y = self._forward_fused(x, first, self._dropout_p(first), *args, **kwargs)
        for a in rest:
            y = y + self._delta_term(x, a, *args, **kwargs)
        return y

    def _guard_merged(self, y: Tensor) -> Tensor:
        anchor = self._merged_anchor()
        return y if anchor is None else _MergedGuard.apply(y, anchor)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self._mixed is not None:
            return self.forward_mixed(x, *self._mixed, *args, **kwargs)
        if self.binds and not args and not kwargs and not autotune.is_recording():
            if torch.compiler.is_compiling():
                return self._forward_traced(x)
            op = self._bound.ops.get(self._signature(x))
            if op is None:
                op = self._bind(x)
            return op(x)
        live = self._live()
        y = self._forward_adapters(x, live, *args, **kwargs) if live else self._base_forward(x, *args, **kwargs)
        return self._guard_merged(y)

    # bound calls ------------------------------------------------------------------------
    #
    # A type that sets ``binds`` runs ``forward(x)`` as one lookup in ``_bound`` (keyed by
    # ``_signature(x)``) and the op bound there: ``_bind`` validated nothing per call, it took the
    # live adapters, their settings, the dispatch decision (``_fused_op``) and the weight reader
    # once. ``_changed`` empties ``_bound``.

    #: whether this type binds ``forward(x)`` per input signature (``_fused_op`` implemented)
    binds = False

    def _signature(self, x: Tensor) -> tuple:
        """Everything a bound op depends on besides the layer's own state (which ``_changed``
        covers): x's shape, strides, dtype, device and grad flag; grad mode; train/eval (dropout,
        merged guard); torch's thread count and the autocast dtype (they change the dispatch)."""
        return (
            x.shape, x.stride(), x.dtype, x.device, x.requires_grad, torch.is_grad_enabled(), self.training,
            torch.get_num_threads(), torch._C._is_any_autocast_enabled() and autocast_dtype(x.device.type),
        )

    def _bind(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """Prepare and remember the op computing ``forward(x)`` for every input of x's signature."""
        op = self._unguarded_op(x)
        anchor = self._merged_anchor()
        if anchor is not None:
            inner = op

            def op(x: Tensor) -> Tensor:
                return _MergedGuard.apply(inner(x), anchor)

        self._bound.ops[self._signature(x)] = op
        return op

    def _unguarded_op(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        live = self._live()
        if not live:
            return self._base_forward
        first, *rest = live
        fused = self._fused_op(x, first, self._dropout_p(first))
        if not rest:
            return fused

        def op(x: Tensor) -> Tensor:
            y = fused(x)
            for a in rest:
                y = y + self._delta_term(x, a)
            return y

        return op

    def _fused_op(self, x: Tensor, name: str, dropout_p: float) -> Callable[[Tensor], Tensor]:
        """The bound form of ``_forward_fused(x, name, dropout_p)`` for inputs of x's signature: what
        a type can take once (dispatch decision, settings, weight reader) it takes here. Default:
        ``_forward_fused`` per call (a type plugs in by defining that alone, e.g. ``base(x)`` from
        the base module's own forward plus its adapter's term)."""
        return lambda x: self._forward_fused(x, name, dropout_p)

    def _rebind(self, x: Tensor) -> Tensor:
        """A bound op found a tensor it was bound to replaced: drop the bound ops, run afresh."""
        self._changed()
        return self.forward(x)

    def _weight_reader(self, name: str) -> tuple[Callable[[], bool], Callable[[], Tensor]]:
        """(fresh, weight) for a bound op of adapter ``name``: ``fresh()`` says the base layer still
        holds the weight and bias, and the adapter the core, it held at binding (cheap identity
        checks: a tensor replaced without an event rebinds); ``weight()`` gives the mode-order
        weight: the stored parameter (or its view), or computed per call for a weight-normed /
        parametrized one."""
        params, wn, cores = self.base_layer._parameters, self.weight_name, self.flora_core._parameters
        w0, b0, c0 = params.get(wn), params.get("bias"), cores.get(name)

        def fresh() -> bool:
            return params.get(wn) is w0 and params.get("bias") is b0 and cores.get(name) is c0

        access = self._weight_access()
        if access == "computed":
            return fresh, self.weight_modes
        if access == "param":
            return fresh, lambda: w0
        return fresh, lambda: self.weight_modes(w0)

    def _weight_access(self) -> str:
        """How the mode-order weight is read: "param" (the stored parameter), "t" (a view of it,
        e.g. Conv1D's transpose) or "computed" (weight norm, parametrizations: per call)."""
        w = self.base_layer._parameters.get(self.weight_name)
        if w is None or _legacy_weight_norm(self.base_layer, self.weight_name) is not None:
            return "computed"
        return "param" if self.weight_modes(w) is w else "t"

    def _merged_anchor_name(self, training: bool, grad: bool) -> str | None:
        """The merged adapter whose core ``_MergedGuard`` hangs on, when a forward in this mode
        needs the guard (merged adapters that train), else None."""
        if self.merged_adapters and training and grad and not self._adapters_disabled:
            return next((a for a in self.merged_adapters if self.flora_core[a].requires_grad), None)
        return None

    def _merged_anchor(self) -> Tensor | None:
        """The tensor ``_MergedGuard`` hangs on in the current mode, or None."""
        name = self._merged_anchor_name(self.training, torch.is_grad_enabled())
        return None if name is None else self.flora_core[name]

    def _forward_traced(self, x: Tensor) -> Tensor:
        """``forward(x)`` under torch.compile. What to run comes from ``decide_traced`` as constants
        of the traced code (see ``_plan_traced``), so Dynamo traces the ops and little else."""
        plan = decide_traced(self._bound, (*traced_key(x), torch.is_grad_enabled(), self.training))
        first, rest, anchor = plan[0], plan[-2], plan[-1]
        y = self._base_forward(x) if first is None else self._traced_fused(x, plan)
        for a in rest:
            y = y + self._delta_term(x, a)
        return y if anchor is None else _MergedGuard.apply(y, self.flora_core[anchor])

    def _plan_traced(self, key: tuple) -> tuple:
        """The constants of a traced forward for ``key`` (``traced_key`` + grad mode + training):
        (first live adapter or None, its dropout p, its scale, weight access ("param", "t" for a
        transposed view, "computed"), backend name, strategy, the other live adapters, the merged
        adapter the guard hangs on or None). Valid until ``_changed`` (the traced code guards on
        the identity of ``_bound``)."""
        grad, training = key[-2:]
        live = self._live()
        anchor = self._merged_anchor_name(training, grad)
        if not live:
            return (None, 0.0, 1.0, "computed", None, None, (), anchor)
        first = live[0]
        s = self.flora_settings[first]
        p = s.dropout if training else 0.0
        hit = self._bound.decisions.get(key)
        b, strategy = hit if hit is not None else self._decide_traced(key, first, p)
        return (first, p, s.scale, self._weight_access(), b, strategy, tuple(live[1:]), anchor)

    def _traced_terms(self, name: str, scale: float) -> tuple[Tensor, list[Tensor], float]:
        """(core, factors, scale) of adapter ``name`` in traced code: with a held scale tensor,
        core * that tensor and 1.0 (a new scale is a new value, not a recompile)."""
        core, *factors = self._tensors_of(name)
        held = self.scale_tensor(name)
        return (core, factors, scale) if held is None else (core * held, factors, 1.0)

    def _traced_weight(self, access: str) -> Tensor:
        """The mode-order weight in traced code, by the plan's access ("param" and "t" read the
        base layer's parameter dict: a registered parameter, ``_weight_access`` checked)."""
        if access == "param":
            return self._modules["base_layer"]._parameters[self.weight_name]
        if access == "t":
            return self._modules["base_layer"]._parameters[self.weight_name].t()
        return self.weight_modes()

    def _traced_fused(self, x: Tensor, plan: tuple) -> Tensor:
        """``_forward_fused`` in traced code, by the plan (default: ``_forward_fused`` itself)."""
        return self._forward_fused(x, plan[0], plan[1])

    def _decide_traced(self, key: tuple, name: str, dropout_p: float) -> tuple[tuple[str, str | None] | None, str | None]:
        """((backend name, variant), strategy) of adapter ``name`` for a traced input, outside Dynamo's
        tracing (types whose ``_traced_fused`` dispatches); default (None, None)."""
        return None, None

    def batch_dim(self, x: Tensor) -> int:
        """The sample dimension of this layer's input (``adapter_batch``'s ``batch_dim``)."""
        return self.mixed_batch_dim

    def _group_layers(self) -> list[FLoRALayer]:
        """The layers whose active set follows the sample groups in ``forward_mixed``."""
        return [self]

    def forward_mixed(self, x: Tensor, index: Tensor, names: Sequence[str], *args, **kwargs) -> Tensor:
        """Each sample with its own adapter: ``index[i]`` is sample i's position in ``names``
        (-1: the base layer alone). Samples are grouped by adapter (one call per adapter used).

        x: this layer's input with ``index.numel()`` samples on ``batch_dim(x)``. Returns the
        layer's output, samples in the input order.
        """
        dim = self.batch_dim(x)
        return self.run_grouped(index, names, [x], [dim], dim, lambda xs: self.forward(xs[0], *args, **kwargs))

    def run_grouped(
        self, index: Tensor, names: Sequence[str], inputs: Sequence[Tensor], dims: Sequence[int], out_dim: int,
        fn: Callable[[list[Tensor]], Tensor],
    ) -> Tensor:
        """Sort the samples of ``inputs`` (batch dims ``dims``) by adapter, run ``fn`` on each
        group with that adapter alone active (in every layer of ``_group_layers``), and put the
        outputs (batch dim ``out_dim``) back in sample order."""
        self._check_names(names)
        if any(m.merged_adapters for m in self._group_layers()):
            raise RuntimeError("adapter_batch: unmerge the model's adapters first (fk.unmerge_flora)")
        n = inputs[0].shape[dims[0]]
        if index.numel() != n:
            raise ValueError(f"adapter_batch: {index.numel()} adapter names for a batch of {n} samples")
        index = index.to(inputs[0].device)
        order = torch.argsort(index, stable=True)
        counts = torch.bincount(index + 1, minlength=len(names) + 1).tolist()
        groups = [torch.split(t.index_select(d, order), counts, d) for t, d in zip(inputs, dims)]
        layers = self._group_layers()
        saved = [(m._active, m._mixed) for m in layers]
        outs = []
        try:
            for m in layers:
                m._mixed = None
            for pos, count in enumerate(counts):
                if count == 0:
                    continue
                for m in layers:
                    m._active = [] if pos == 0 else [a for a in [names[pos - 1]] if a in m.flora_settings]
                    m._changed()
                outs.append(fn([g[pos] for g in groups]))
        finally:
            for m, (active, mixed) in zip(layers, saved):
                m._active, m._mixed = active, mixed
                m._changed()
        return torch.cat(outs, out_dim).index_select(out_dim, torch.argsort(order))

    # ------------------------------------------------------------------ merge

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @torch.no_grad()
    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold ``adapter_names`` (default: the active ones) into the base weight. Adapters
        merged already are skipped with PEFT's warnings ("All adapters are already merged,
        nothing to do." / "Already following adapters were merged ...").

        ``safe_merge`` checks the merged weight for NaN/inf before writing it (ValueError
        "NaNs detected in the merged weights ...", the weight untouched).
        """
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names: expected a list of strings, got {adapter_names!r}")
        names = list(self._active if adapter_names is None else adapter_names)
        self._check_names(names)
        if self.merged_adapters:
            done = set(self.merged_adapters)
            names = [a for a in names if a not in done]
            if names:
                warnings.warn(
                    f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                    f"You are now additionally merging {','.join(names)}."
                )
            else:
                warnings.warn("All adapters are already merged, nothing to do.")
        if not names:
            return
        w = self.base_weight()
        delta = sum(self._modes_to_stored(self.delta_weight(a)) for a in names)
        new = (w.to(delta.dtype) + delta).to(w.dtype)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {', '.join(names)} seems to be broken"
            )
        self._write_weight(new, first=not self.merged_adapters)
        self.merged_adapters.extend(names)
        self._changed()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge: shared and weight-normed weights bit for bit, others within rounding."""
        if not self.merged_adapters:
            return
        if self._merge_saved is not None:
            self._restore_weight()
        else:
            w = self.base_weight()
            delta = sum(self._modes_to_stored(self.delta_weight(a)) for a in self.merged_adapters)
            w.copy_((w.to(delta.dtype) - delta).to(w.dtype))
        self.merged_adapters = []
        self._changed()

    def _write_weight(self, new: Tensor, first: bool) -> None:
        """Make the base layer compute with ``new`` (stored layout); see the module docstring."""
        base, name = self.base_layer, self.weight_name
        hook = _legacy_weight_norm(base, name)
        if hook is not None:
            g, v = getattr(base, name + "_g"), getattr(base, name + "_v")
            if first:
                self._merge_saved = {"g": g.detach().clone(), "v": v.detach().clone()}
            v.copy_(new)
            g.copy_(torch.norm_except_dim(new, 2, hook.dim).reshape(g.shape))
            setattr(base, name, hook.compute_weight(base))
            return
        if parametrize.is_parametrized(base, name):
            plist = base.parametrizations[name]
            if first:
                self._merge_saved = {k: t.detach().clone() for k, t in plist.named_parameters()}
            try:
                setattr(base, name, new)  # right_inverse: the sources that give `new`
            except NotImplementedError as e:
                raise ValueError(
                    f"cannot merge into the parametrized {type(base).__name__}.{name}: its parametrization has no "
                    "right_inverse; use the adapter unmerged"
                ) from e
            return
        if self.shared_with:
            if first:
                self._merge_saved = {"shared": base._parameters[name]}
            base._parameters[name] = nn.Parameter(new.clone(), requires_grad=False)
            return
        getattr(base, name).copy_(new)

    def _restore_weight(self) -> None:
        base, name, saved = self.base_layer, self.weight_name, self._merge_saved
        assert saved is not None
        hook = _legacy_weight_norm(base, name)
        if hook is not None:
            getattr(base, name + "_g").copy_(saved["g"])
            getattr(base, name + "_v").copy_(saved["v"])
            setattr(base, name, hook.compute_weight(base))
        elif parametrize.is_parametrized(base, name):
            for k, t in base.parametrizations[name].named_parameters():
                t.copy_(saved[k])
        else:
            base._parameters[name] = saved["shared"]
        self._merge_saved = None

    def unload(self) -> nn.Module:
        """The base layer with the merged adapters in its weight (its own, if it was shared)."""
        return self.base_layer

    # ------------------------------------------------------------------ repr

    def extra_repr(self) -> str:
        parts = []
        for a, s in self.flora_settings.items():
            state = "merged" if a in self.merged_adapters else ("active" if a in self._active else "inactive")
            parts.append(
                f"{a}: ranks={s.ranks}, scale={s.scale:g}, dropout={s.dropout:g}, strategy={s.strategy}, "
                f"backend={s.backend}{', lean_memory' if s.lean_memory else ''}, {state}"
            )
        if self._adapters_disabled:
            parts.append("adapters disabled")
        return "; ".join(parts) or "no adapters"


def _legacy_weight_norm(module: nn.Module, name: str) -> WeightNorm | None:
    """The ``torch.nn.utils.weight_norm`` pre-hook of ``module.<name>``, if any."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return hook
    return None


class _Bindings:
    """A layer's bound ops by input signature (``ops``), and the plan for a signature seen by
    torch.compile's tracing (``decide``). Replaced as a whole by ``_changed``, so that the
    compiled forward, which guards on its identity, recompiles after a change."""

    __slots__ = ("decide", "decisions", "ops")

    def __init__(self, decide: Callable[[tuple], tuple]) -> None:
        self.ops: dict[tuple, Callable[[Tensor], Tensor]] = {}
        # eager dispatch decisions, by traced_key + (grad mode, training)
        self.decisions: dict[tuple, tuple[str, str | None]] = {}
        self.decide = decide


@torch.compiler.assume_constant_result
def decide_traced(bindings: _Bindings, key: tuple) -> tuple:
    """The plan of a traced forward (``FLoRALayer._plan_traced``): run by Dynamo once per trace,
    outside the graph; its result is a constant of the traced code."""
    return bindings.decide(key)


def x_spec(key: tuple) -> TensorSpec:
    """The ``TensorSpec`` of the input a ``traced_key`` describes."""
    shape, stride, dtype, device, requires_grad = key[:5]
    meta = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    return TensorSpec.of(meta)._replace(device=device, requires_grad=requires_grad)


def traced_backend(ref: tuple[str, str | None]) -> Backend:
    """The backend, bound to its variant, that a traced plan names as (name, variant): lookups only
    (the decision made the variant's instance)."""
    b = load_backend(ref[0])
    return b.made_variant(ref[1])  # type: ignore[union-attr]


def traced_key(x: Tensor) -> tuple:
    """x's shape, strides, dtype, device and grad flag: constants of a trace with static sizes.
    (With dynamic sizes Dynamo cannot hand them to ``decide_traced``: a graph break per layer.)"""
    return (tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), x.requires_grad)
