"""FLoRAConfig: what to adapt and how, validated at construction."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .backends.base import backend_names
from .functional import STRATEGY_CHOICES

Rank = int | tuple[int, ...]


def check_rank(value: Any, name: str, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive int or a tuple of positive ints."""
    if value is None and allow_none:
        return
    vals = value if isinstance(value, (tuple, list)) else (value,)
    if not vals or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals):
        raise ValueError(f"{name}: expected a positive int or a tuple of positive ints, got {value!r}")


@dataclass(frozen=True)
class FLoRAConfig:
    r"""Adapter configuration.

    Attributes:
        rank: rank of the channel modes: an int, or (r_out, r_in).
        kernel_rank: rank of each spatial mode of a conv kernel: an int, a per-dim tuple, or
            None for the full kernel size (no reduction). Ranks are clamped to the mode size.
        scale: s in dW = s * G x_n U_n.
        dropout: adapter dropout probability on the adapter's input (training only).
        target_modules: which modules to adapt. A string is a regular expression that must
            match the whole module name; a list holds exact names or name suffixes (".fc"
            style: "fc" matches "head.fc"). None adapts every Linear (and subclass, and
            transformers Conv1D), ConvNd, ConvTransposeNd and MultiheadAttention; "all-linear"
            every Linear and Conv1D. Both leave out an output head whose weight is tied to
            another module (an embedding) and the model's ``get_output_embeddings()``, as PEFT's
            "all-linear" does; name such a module explicitly to adapt it.
        exclude_modules: modules never adapted (same matching rules as ``target_modules``).
        rank_pattern: per-module ranks, ``{pattern: rank}``; ``rank`` as for ``rank`` or one int
            per mode (kernel modes included). A pattern matches a module name when
            ``re.fullmatch(rf"(.*\.)?(?:{pattern})", name)`` (PEFT's rule: a suffix, or a regular
            expression; "^a\.b" anchors it). The first matching pattern wins.
        scale_pattern: per-module scales, ``{pattern: scale}``, same matching rule.
        modules_to_save: modules (same matching rules as ``target_modules``) that stay fully
            trainable and are saved with the adapter, e.g. a new classifier head.
        strategy: "auto" (cost model), "factorized" or "merged".
        backend: "auto", "reference", "triton", "cuda" or "cpp".
        lean_memory: keep less for backward: the input factor U_in stays frozen at its random
            init (LoRA-FA style) and a Linear computes its adapter term as a separate
            ``(x U_in) (s G^T) U_out^T``, so autograd keeps S = x U_in (T x r_in) instead of
            the layer input x (T x in). The core and the other factors train with their exact
            gradients; what is lost is U_in's training (docs/memory.md gives the measured
            memory and accuracy). Settable per layer: ``layer.set_lean_memory(True, name)``.
        init_weights: True: the paper's init (core = 0, so dW = 0 at step 0); False: a random
            normal core as well, scaled so that dW's entries have std 1 / (2 sqrt(fan_in)) (the
            new adapter changes the output: tests, PEFT's ``init_weights=False``).
    """

    rank: Rank = 16
    kernel_rank: Rank | None = None
    scale: float = 1.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] = field(default_factory=tuple)
    exclude_modules: str | tuple[str, ...] | None = None
    rank_pattern: dict[str, Rank] = field(default_factory=dict)
    scale_pattern: dict[str, float] = field(default_factory=dict)
    strategy: str = "auto"
    backend: str = "auto"
    lean_memory: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("target_modules", "modules_to_save", "exclude_modules"):
            v = getattr(self, name)
            if isinstance(v, (list, set, frozenset)):
                object.__setattr__(self, name, tuple(sorted(v)) if not isinstance(v, list) else tuple(v))
        if self.modules_to_save is None:
            object.__setattr__(self, "modules_to_save", ())
        for name in ("rank", "kernel_rank"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        check_rank(self.rank, "rank")
        if isinstance(self.rank, tuple) and len(self.rank) != 2:
            raise ValueError(f"rank: expected an int or (r_out, r_in), got {self.rank!r}")
        check_rank(self.kernel_rank, "kernel_rank", allow_none=True)
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool):
            raise ValueError(f"scale: expected a float, got {self.scale!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        if not isinstance(self.lean_memory, bool):
            raise ValueError(f"lean_memory: expected a bool, got {self.lean_memory!r}")
        if self.strategy not in STRATEGY_CHOICES:
            raise ValueError(f"strategy: expected one of {STRATEGY_CHOICES}, got {self.strategy!r}")
        if self.backend != "auto" and self.backend not in backend_names():
            raise ValueError(f"backend: expected one of {('auto',) + backend_names()}, got {self.backend!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights: expected a bool, got {self.init_weights!r}")
        for name in ("target_modules", "exclude_modules"):
            tm = getattr(self, name)
            if tm is not None and not isinstance(tm, (str, tuple)):
                raise ValueError(f"{name}: expected a regex string, a list of names or None, got {tm!r}")
            if isinstance(tm, str) and tm != ALL_LINEAR:
                _check_regex(name, tm)
            for v in tm if isinstance(tm, tuple) else ():
                if not isinstance(v, str) or not v:
                    raise ValueError(f"{name}: module names: expected non-empty strings, got {v!r}")
        for v in self.modules_to_save:
            if not isinstance(v, str) or not v:
                raise ValueError(f"modules_to_save: module names: expected non-empty strings, got {v!r}")
        for name in ("rank_pattern", "scale_pattern"):
            d = getattr(self, name)
            if not isinstance(d, dict):
                raise ValueError(f"{name}: expected a dict {{pattern: value}}, got {d!r}")
            fixed = {}
            for k, v in d.items():
                if not isinstance(k, str) or not k:
                    raise ValueError(f"{name}: expected non-empty string patterns, got {k!r}")
                _check_regex(f"{name} key", k)
                if name == "rank_pattern":
                    v = tuple(v) if isinstance(v, list) else v
                    check_rank(v, f"rank_pattern[{k!r}]")
                elif not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise ValueError(f"scale_pattern[{k!r}]: expected a float, got {v!r}")
                fixed[k] = v
            object.__setattr__(self, name, fixed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict (tuples become lists)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FLoRAConfig:
        """Inverse of ``to_dict``; unknown keys raise, naming them and the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"FLoRAConfig: unknown keys {unknown}; expected keys from {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def matches(self, name: str) -> bool:
        """Whether ``target_modules`` names the module called ``name`` (None: every module;
        "all-linear" is a type rule, see ``flora_kernels.model.select_targets``)."""
        if self.target_modules == ALL_LINEAR:
            return True
        return name_matches(name, self.target_modules)

    def rank_for(self, name: str) -> Rank:
        """``rank_pattern``'s rank for module ``name``, else ``rank``."""
        return pattern_value(self.rank_pattern, name, self.rank)

    def scale_for(self, name: str) -> float:
        """``scale_pattern``'s scale for module ``name``, else ``scale``."""
        return float(pattern_value(self.scale_pattern, name, self.scale))


ALL_LINEAR = "all-linear"


def _check_regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what}: expected a valid regular expression, got {pattern!r} ({e})") from e


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    r"""The value of the first pattern matching ``name`` (PEFT's rule: ``(.*\.)?(?:pattern)``)."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return value
    return default


def name_matches(name: str, patterns: str | Sequence[str] | None) -> bool:
    """PEFT-style matching: a string is a full-match regex; a list holds exact names or suffixes."""
    if patterns is None:
        return True
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)
