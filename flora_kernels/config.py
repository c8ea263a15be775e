"""FLoRAConfig: what to adapt and how, validated at construction."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .backends.base import BACKEND_NAMES
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
    """Adapter configuration.

    Attributes:
        rank: rank of the channel modes: an int, or (r_out, r_in).
        kernel_rank: rank of each spatial mode of a conv kernel: an int, a per-dim tuple, or
            None for the full kernel size (no reduction). Ranks are clamped to the mode size.
        scale: s in dW = s * G x_n U_n.
        dropout: adapter dropout probability on the adapter's input (training only).
        target_modules: which modules to adapt. A string is a regular expression that must
            match the whole module name; a list holds exact names or name suffixes (".fc"
            style: "fc" matches "head.fc"). None adapts every Linear/Conv1d/2d/3d.
        modules_to_save: modules (same matching rules) that stay fully trainable and are saved
            with the adapter, e.g. a new classifier head.
        strategy: "auto" (cost model), "factorized" or "merged".
        backend: "auto", "reference", "triton", "cuda" or "cpp".
    """

    rank: Rank = 16
    kernel_rank: Rank | None = None
    scale: float = 1.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] = field(default_factory=tuple)
    strategy: str = "auto"
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("target_modules", "modules_to_save"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
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
        if self.strategy not in STRATEGY_CHOICES:
            raise ValueError(f"strategy: expected one of {STRATEGY_CHOICES}, got {self.strategy!r}")
        if self.backend not in ("auto",) + BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {('auto',) + BACKEND_NAMES}, got {self.backend!r}")
        tm = self.target_modules
        if tm is not None and not isinstance(tm, (str, tuple)):
            raise ValueError(f"target_modules: expected a regex string, a list of names or None, got {tm!r}")
        if isinstance(tm, str):
            try:
                re.compile(tm)
            except re.error as e:
                raise ValueError(f"target_modules: expected a valid regular expression, got {tm!r} ({e})") from e
        for v in (tm if isinstance(tm, tuple) else ()) + self.modules_to_save:
            if not isinstance(v, str) or not v:
                raise ValueError(f"module names: expected non-empty strings, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FLoRAConfig":
        """Inverse of ``to_dict``; unknown keys raise, naming them and the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"FLoRAConfig: unknown keys {unknown}; expected keys from {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` is a target."""
        return name_matches(name, self.target_modules)


def name_matches(name: str, patterns: str | Sequence[str] | None) -> bool:
    """PEFT-style matching: a string is a full-match regex; a list holds exact names or suffixes."""
    if patterns is None:
        return True
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)
