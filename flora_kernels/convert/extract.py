"""FLoRA adapters from full fine-tunes (``extract_flora``) and re-ranking of adapters (``rerank_flora``).

Extraction: for each targeted Linear/ConvNd, ``dW = W_tuned - W_base`` (in the weight's own mode
order, (out, in[/groups], *k)) is Tucker-decomposed by ``tucker_decompose`` (HOOI from an
HOSVD start) and installed as a FLoRA layer with scale 1, so ``base + adapter ~= tuned`` on
those weights. Ranks per layer: ``(rank, rank, kernel ranks)`` (``kernel_rank=None``: the full
kernel), clamped to what the weight allows; with ``energy``, per mode the smallest rank keeping
that fraction of ``||dW||^2`` (the ranks above are then the caps). Tensors FLoRA cannot hold
(biases, norms, untargeted weights) that differ are listed in the report, not copied.

Re-ranking (``rerank_flora``): every FLoRA layer of a model is re-decomposed at smaller ranks
(or energy) in its factors' span (``tucker_rerank``: no dense delta). Adapters in PEFT or
LyCORIS format are re-ranked after ``import_peft`` / ``import_lycoris``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import Rank, name_matches
from ..decompose import exact_ranks, tucker_decompose, tucker_rerank
from ..layers import flora_layers
from ..layers.base import expand_rank
from ..model import delete_adapter, logical_name
from ..tucker import tucker_reconstruct
from .peft import (
    AdapterSpec,
    ImportPlan,
    _supported,
    _supported_names,
    check_no_flora,
    imported_config,
    install,
)


@dataclass(frozen=True)
class LayerReport:
    """One adapted layer: ranks chosen, ||dW - dW_hat|| / ||dW||, ||dW_hat||^2 / ||dW||^2, size."""

    name: str
    weight_shape: tuple[int, ...]
    ranks: tuple[int, ...]
    rel_error: float
    energy: float
    params: int


@dataclass
class ExtractionReport:
    """Per-layer results, plus what was not turned into an adapter."""

    layers: list[LayerReport] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # targeted layers whose weight did not change
    not_captured: dict[str, float] = field(default_factory=dict)  # other differing tensors: relative change

    def __str__(self) -> str:
        rows = [f"{'layer':<40} {'weight':<20} {'ranks':<18} {'rel.err':>8} {'energy':>8} {'params':>10}"]
        for r in self.layers:
            rows.append(
                f"{r.name:<40} {r.weight_shape!s:<20} {r.ranks!s:<18} {r.rel_error:8.2e} {r.energy:8.4f} "
                f"{r.params:>10,}"
            )
        rows.append(f"{len(self.layers)} adapters, {sum(r.params for r in self.layers):,} parameters")
        if self.unchanged:
            rows.append(f"unchanged (no adapter): {', '.join(self.unchanged)}")
        if self.not_captured:
            shown = ", ".join(f"{k} ({v:.2e})" for k, v in list(self.not_captured.items())[:20])
            more = f" and {len(self.not_captured) - 20} more" if len(self.not_captured) > 20 else ""
            rows.append(f"changed but not captured (relative change): {shown}{more}")
        return "\n".join(rows)


def _expand(value: Rank | None, n: int, name: str) -> tuple[int | None, ...]:
    return (None,) * n if value is None else expand_rank(value, n, name)


def layer_ranks(weight_shape: Sequence[int], rank: Rank | None, kernel_rank: Rank | None) -> tuple[int, ...]:
    """Requested ranks for a weight: channels from ``rank`` (None: no cap), kernel modes from
    ``kernel_rank`` (None: full), clamped to ``exact_ranks(weight_shape)``."""
    k = len(weight_shape) - 2
    req = _expand(rank, 2, "rank") + _expand(kernel_rank, k, "kernel_rank")
    return tuple(b if r is None else min(r, b) for r, b in zip(req, exact_ranks(weight_shape), strict=True))


def _state(tuned: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(tuned, nn.Module):
        if flora_layers(tuned):
            raise ValueError("tuned: expected a fully fine-tuned model without FLoRA layers (merge_and_unload it)")
        return tuned.state_dict()
    if isinstance(tuned, Mapping):
        return tuned
    raise TypeError(f"tuned: expected a model or a state dict, got {type(tuned).__name__}")


def _rel(a: Tensor, b: Tensor) -> float:
    num, den = float((a.double() - b.double()).norm()), float(b.double().norm())
    return num / den if den else num


@torch.no_grad()
def extract_flora(
    base_model: nn.Module,
    tuned: nn.Module | Mapping[str, Tensor],
    rank: Rank | None = 16,
    kernel_rank: Rank | None = None,
    energy: float | None = None,
    target_modules: str | Sequence[str] | None = None,
    *,
    method: str = "hooi",
    progress: bool = True,
    strategy: str = "auto",
    backend: str = "auto",
) -> nn.Module:
    """Put on ``base_model`` (in place) FLoRA adapters approximating ``W_tuned - W_base``.

    Args:
        base_model: the model before fine-tuning, without FLoRA layers.
        tuned: the fine-tuned model, or its state dict (keys ``<module>.weight``).
        rank: channel rank (int or (r_out, r_in)); the cap when ``energy`` is given (None: no cap).
        kernel_rank: conv kernel ranks (None: the full kernel, or no cap with ``energy``).
        energy: in (0, 1]: per mode, the smallest rank keeping this fraction of ``||dW||^2``.
        target_modules: as ``FLoRAConfig.target_modules`` (None: every Linear/ConvNd whose
            weight changed).
        method: "hooi" or "hosvd". progress: show a progress bar.
        strategy, backend: for the created layers.

    Returns:
        ``base_model``, with ``base_model.flora_extraction`` an ``ExtractionReport`` (ranks,
        relative error and kept energy per layer).

    Raises:
        ValueError / TypeError: a targeted module missing from ``tuned``, mismatched shapes,
        unsupported targets, nothing to extract; before anything is changed.
    """
    check_no_flora(base_model, "extract_flora")
    if rank is None and energy is None:
        raise ValueError("extract_flora: give rank, energy or both")
    layer_ranks((1, 1, 1), rank, None)  # validate the rank arguments early
    state = _state(tuned)
    modules = dict(base_model.named_modules())
    targets = []
    for name, m in modules.items():
        if not name or not name_matches(name, target_modules):
            continue
        if _supported(m):
            targets.append(name)
        elif isinstance(target_modules, (str, list, tuple)) and isinstance(getattr(m, "weight", None), Tensor):
            raise TypeError(f"target module {name!r}: a {type(m).__name__}; expected one of {_supported_names()}")
    for name in targets:
        key, w = f"{name}.weight", modules[name].weight
        if key not in state:
            raise ValueError(f"tuned: missing {key!r} (shape {tuple(w.shape)}) of the targeted module {name!r}")
        if tuple(state[key].shape) != tuple(w.shape):
            raise ValueError(f"tuned: {key!r} has shape {tuple(state[key].shape)}, the base model's is {tuple(w.shape)}")

    report = ExtractionReport()
    adapters = []
    for name in tqdm(targets, desc="extract_flora", unit="layer", disable=not progress):
        w = modules[name].weight
        dt = torch.float64 if w.dtype == torch.float64 else torch.float32
        delta = state[f"{name}.weight"].to(w.device, dt) - w.detach().to(dt)
        if not bool(delta.any()):
            report.unchanged.append(name)
            continue
        ranks = layer_ranks(tuple(w.shape), rank, kernel_rank)
        core, factors = tucker_decompose(delta, ranks, method, energy=energy)
        approx = tucker_reconstruct(core, factors)
        kept = float(core.double().square().sum() / delta.double().square().sum())
        report.layers.append(LayerReport(
            name, tuple(w.shape), tuple(core.shape), _rel(approx, delta), kept,
            core.numel() + sum(f.numel() for f in factors),
        ))
        adapters.append(AdapterSpec(name, core, factors, 1.0))
    if not adapters:
        raise ValueError(
            f"extract_flora: no targeted weight differs between the models (targets: {targets[:12]}"
            f"{', ...' if len(targets) > 12 else ''})"
        )
    adapted = {f"{a.name}.weight" for a in adapters} | {f"{n}.weight" for n in report.unchanged}
    base_state = base_model.state_dict()
    for key, t in state.items():
        b = base_state.get(key)
        if key in adapted or b is None or b.shape != t.shape or not t.is_floating_point():
            continue
        if not torch.equal(b, t.to(b.device, b.dtype)):
            report.not_captured[key] = _rel(t.to(b.device), b)
    plan = ImportPlan(adapters)
    install(base_model, plan, imported_config(plan, 0.0, strategy, backend))
    base_model.flora_extraction = report
    return base_model


@torch.no_grad()
def rerank_flora(
    model: nn.Module,
    rank: Rank | None = None,
    kernel_rank: Rank | None = None,
    energy: float | None = None,
    *,
    method: str = "hooi",
) -> nn.Module:
    """Re-decompose every FLoRA layer of ``model`` (in place) at ranks no larger than now.

    Args:
        rank, kernel_rank: new caps for the channel and kernel modes (None: keep the current one).
        energy: per mode, the smallest rank keeping this fraction of the adapter's ``||dW||^2``.
        method: "hooi" or "hosvd".

    Works in the factors' span (QR of the factors, ``tucker_rerank``): no dense delta is built.
    Scales, modules_to_save and the rest of the model are kept. Adapters in PEFT or LyCORIS
    format: ``rerank_flora(import_peft(base, path), rank=4)``. Returns ``model``.
    """
    layers = flora_layers(model)
    if not layers:
        raise ValueError("rerank_flora: the model has no FLoRA layers")
    if rank is None and kernel_rank is None and energy is None:
        raise ValueError("rerank_flora: give rank, kernel_rank or energy")
    active = getattr(model, "flora_active", [])
    if len(active) != 1:
        raise ValueError(f"rerank_flora: expected one active adapter, got {active}; fk.set_adapter one first")
    adapter = active[0]
    adapters = []
    for name, layer in layers:
        if adapter not in layer.flora_settings:
            continue
        if layer.merged:
            raise ValueError(f"{name}: the adapter is merged into the base weight; call unmerge_flora first")
        core, factors = layer.tensors(adapter)
        settings = layer.flora_settings[adapter]
        caps = layer_ranks(tuple(layer.weight_modes().shape), rank, kernel_rank)
        ranks = tuple(min(c, r) for c, r in zip(caps, settings.ranks))
        core, factors = tucker_rerank(core, list(factors), ranks, method, energy=energy)
        adapters.append(AdapterSpec(logical_name(name), core, factors, settings.scale))
    cfg = model.flora_configs[adapter]
    delete_adapter(model, adapter)
    return install(model, ImportPlan(adapters), cfg, adapter_name=adapter)


def skeleton_from_state_dicts(
    base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], target_modules: str | Sequence[str] | None = None
) -> nn.Module:
    """A stand-in model built from weight shapes alone (no model class): one module per floating
    ``<name>.weight`` of 2 to 5 dims present in both state dicts with the same shape: 2-D ->
    ``nn.Linear`` (out, in), 3/4/5-D -> ``nn.Conv1d/2d/3d`` (out, in, *k), holding the base tensor.
    Adapters extracted on it follow the weight's own mode order, so they load onto the real
    model wherever its module has that type (see docs/interop.md for 2-D weights that are not
    Linear)."""
    root = nn.Module()
    conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
    count = 0
    for key in sorted(base, key=lambda k: k.count(".")):
        t = base[key]
        if not key.endswith(".weight") or not isinstance(t, Tensor) or not t.is_floating_point():
            continue
        name = key[: -len(".weight")]
        other = tuned.get(key)
        if not 2 <= t.dim() <= 5 or other is None or other.shape != t.shape or not name_matches(name, target_modules):
            continue
        if t.dim() == 2:
            m: nn.Module = nn.Linear(t.shape[1], t.shape[0], bias=False, device="meta")
        else:
            m = conv[t.dim()](t.shape[1], t.shape[0], tuple(t.shape[2:]), bias=False, device="meta")
        m.weight = nn.Parameter(t, requires_grad=False)
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        if hasattr(parent, leaf):
            raise ValueError(f"{key}: module path {name!r} is both a container and a weight in the state dict")
        parent.add_module(leaf, m)
        count += 1
    if not count:
        raise ValueError("no 2- to 5-D floating '<module>.weight' tensor is in both state dicts with the same shape")
    return root


__all__ = [
    "ExtractionReport",
    "LayerReport",
    "extract_flora",
    "layer_ranks",
    "rerank_flora",
    "skeleton_from_state_dicts",
]
