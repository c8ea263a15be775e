"""Exact conversion between FLoRA adapters and PEFT's LoRA format (no ``peft`` import needed).

PEFT's LoRA layer computes ``base(x) + scaling * lora_B(lora_A(dropout(x)))`` with
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` under ``use_rslora``):

- Linear: ``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r). The same for transformers'
  ``Conv1D`` (GPT-2), which stores its weight (in, out): PEFT's ``fan_in_fan_out`` transposes
  only the merged delta, the lora tensors keep the Linear layout (FLoRA's mode order (out, in)).
- MultiheadAttention (packed q/k/v): ``<m>.lora_A.weight`` (r, E) / ``<m>.lora_B.weight`` (3E, r)
  on ``in_proj_weight`` and ``<m>.base_layer.out_proj.lora_A/B.weight`` (r, E) / (E, r) on
  ``out_proj``; one r and alpha for both (the attention module's), no dropout (PEFT merges both
  around the base forward).
- ConvNd: ``lora_A`` is a dense ConvNd(in_channels -> r) with the base kernel size, stride and
  padding (but dilation 1 and zero padding, whatever the base uses); ``lora_B`` is a 1x1
  ConvNd(r -> out) with the base ``groups``. Weights (r, in_channels, *k) and
  (out, r / groups, 1...).

A FLoRA adapter is ``dW = s * G x_0 U_out x_1 U_in x_2 U_k1 ...`` (docs/ARCHITECTURE.md, Conventions), added
as a weight delta of the base layer with its full geometry.

Export (``export_peft`` / ``to_peft``), folding the core into the factors:

- Linear, r = min(r_out, r_in): ``A = U_in^T``, ``B = U_out G`` (or ``A = G U_in^T``,
  ``B = U_out`` when r_out < r_in).
- Conv, groups = 1: with ``K = G x_2 U_k1 ...`` (r_out, r_in, *k), ``B = U_out`` and
  ``A[a, i, k...] = sum_b K[a, b, k...] U_in[i, b]`` (r = r_out); when r_out exceeds
  m = r_in * prod(kernel ranks), the other side is folded instead: ``B = U_out G_(0)``
  (out, m) and ``A`` the Kronecker product of U_in and the kernel factors (r = m).
- Conv, groups = g > 1: PEFT's lora_A mixes all input channels, its lora_B is grouped. The
  grouped delta is written exactly with r = g * r_g: rank block j of ``A`` is non-zero only on
  the input channels of group j and holds the per-group ``A`` above; ``B`` is as above. PEFT
  cannot *merge* grouped conv adapters (its own limit); the unmerged forward is exact.
- Size: PEFT's dense grouped lora_A is g^2 times a per-group A (EfficientNet-B0 at rank 4:
  gigabytes against a sub-MiB FLoRA adapter). Each module's size is estimated first
  (``peft_size``); modules above ``max_size_ratio`` times their FLoRA adapter are refused unless
  ``oversized="write"`` or ``"skip"`` (left out, listed in ``exclude_modules``).
- MultiheadAttention: in_proj and out_proj as Linear, at the larger of their two ranks (the
  other zero-padded); a part FLoRA does not adapt is written as zeros; unequal scales are folded
  into B (alpha = r).
- Not expressible (raise): a dilated conv with kernel > 1 (PEFT's lora_A drops the dilation),
  a non-zero padding mode with non-zero padding (lora_A pads with zeros), merged adapters.

The scale goes into ``lora_alpha = s * r`` when ``(s * r) / r == s`` in floating point (PEFT
then reproduces s exactly), else into ``B`` with ``lora_alpha = r`` (scaling 1). Per-module
r/alpha differing from the most common pair are written to ``rank_pattern``/``alpha_pattern``
keyed by the anchored, escaped module name; ``target_modules`` is a full-match regex of the
adapted names; ``modules_to_save`` the resolved names of the config's modules_to_save.

Import (``import_peft``), exact, ranks growing where needed:

- Linear, transformers Conv1D, MultiheadAttention in_proj (3E, E) and out_proj: ``U_out = B``,
  ``U_in = A^T``, ``G = I_r``, ``s = scaling`` (FLoRALinear / FLoRAMultiheadAttention layers).
- Conv, groups = 1: ``U_out = B``, ``G = A`` (r, in, *k), ``U_in = I_in``, ``U_k = I_k``,
  ``s = scaling``: the input rank grows to the full in-channels and the kernel rank to the
  full kernel.
- Conv, groups = g: only adapters whose lora_A is block-diagonal over the groups (rank block j
  reads only the input channels of group j: e.g. what ``export_peft`` writes) are weight
  deltas of a grouped conv; others raise. ``U_out`` is the block-expanded B (out, r) and
  ``G`` the per-group A blocks (r, in / g, *k).
- A rank above what a mode allows (PEFT and LyCORIS accept r = 8 on a 3-output head or a
  3-channel ``conv_out``): the same delta is re-decomposed exactly at the largest ranks the
  layer allows, in the factors' span (``fit_ranks``: QR of the factors, no dense delta).
- Embedding adapters (``lora_embedding_A`` (r, num), ``lora_embedding_B`` (dim, r)) map to
  ``U_0 = A^T``, ``U_1 = B``, ``G = I_r`` on the (num, dim) weight of a FLoRAEmbedding.
- Full base tensors PEFT saves (``<m>.base_layer.weight``, embedding layers under
  ``save_embedding_layers``) are loaded into the base modules and stay frozen.
- The model's embedding getters are optional (transformers' ``get_input_embeddings`` raises
  NotImplementedError on e.g. Wav2Vec2Model): the import only asks them where they are implemented.
- Raise: DoRA, lora biases, other layer types, dilated convs (k > 1), non-zero padding modes,
  unknown keys, mismatched shapes (naming the key and both shapes). Everything is validated
  before the model is touched.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import FLoRAConfig, name_matches
from ..convspec import ConvSpec
from ..decompose import tucker_rerank
from ..layers import (
    FLoRAConv1d,
    FLoRAConv2d,
    FLoRAConv3d,
    FLoRAEmbedding,
    FLoRALayer,
    FLoRALinear,
    FLoRAMultiheadAttention,
    flora_layers,
)
from ..layers.base import adapter_dtype
from ..layers.linear import is_hf_conv1d
from ..model import DEFAULT_ADAPTER, install_adapters, logical_name
from ..reference import core_kernel

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_BIN_NAME = "adapter_model.bin"

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<param>weight|bias)$")
_EMB_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])$")


# ----------------------------------------------------------------------------- shared helpers


@dataclass
class AdapterSpec:
    """One adapter to install: module name, Tucker tensors in our convention, scale."""

    name: str
    core: Tensor
    factors: list[Tensor]
    scale: float
    dropout: float | None = None  # None: the imported config's


@dataclass
class ImportPlan:
    """Everything an importer validated, ready to install without further checks.

    ``saved``: modules_to_save tensors (loaded, stay trainable); ``base``: replacement tensors of
    base modules (e.g. PEFT's saved, resized embeddings; loaded, stay frozen).
    """

    adapters: list[AdapterSpec]
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module -> {param: tensor}
    base: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module -> {param: tensor}


SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _supported(module: nn.Module) -> bool:
    """Whether the converters can put a FLoRA adapter on ``module`` (subclasses included)."""
    return isinstance(module, SUPPORTED_TYPES)


def _supported_names() -> str:
    return ", ".join(t.__name__ for t in SUPPORTED_TYPES) + " (or subclasses)"


def _shape(t: Any) -> tuple[int, ...] | str:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def check_float_tensor(key: str, t: Any) -> Tensor:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{key}: expected a floating-point tensor, got {got}")
    return t


def check_shape(key: str, t: Tensor, expected: tuple[int, ...], why: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{key}: expected shape {tuple(expected)}{why}, got {tuple(t.shape)}")


def fit_ranks(spec: AdapterSpec, weight_shape: tuple[int, ...]) -> AdapterSpec:
    """``spec`` unchanged when every core mode fits its weight mode; else the same delta re-decomposed
    exactly at the largest ranks the layer allows (``tucker_rerank`` in the factors' span: QR of
    the factors, never the dense delta). E.g. LoRA rank 8 on a 3-output head -> ranks (3, 3)."""
    if all(r <= i for r, i in zip(spec.core.shape, weight_shape, strict=True)):
        return spec
    core, factors = tucker_rerank(spec.core.double(), [f.double() for f in spec.factors])
    return AdapterSpec(spec.name, core, factors, spec.scale, spec.dropout)


def check_geometry_exact(name: str, base: nn.Module, fmt: str, what: str) -> None:
    """Raise unless ``fmt``'s adapter conv (no dilation, zero padding) equals a weight delta."""
    if not isinstance(base, nn.modules.conv._ConvNd):
        return
    spec = ConvSpec.of(base)
    if any(d != 1 for d in spec.dilation) and any(k != 1 for k in base.kernel_size):
        raise ValueError(
            f"{name}: {fmt}'s {what} is not dilated, but the base {type(base).__name__} has dilation "
            f"{spec.dilation} with kernel {tuple(base.kernel_size)}: not expressible exactly"
        )
    if spec.padding_mode != "zeros" and any(p for lo_hi in spec.pads for p in lo_hi):
        raise ValueError(
            f"{name}: {fmt}'s {what} pads with zeros, but the base {type(base).__name__} uses "
            f"padding_mode={spec.padding_mode!r} with padding {spec.pads}: not expressible exactly"
        )


def identity(n: int) -> Tensor:
    return torch.eye(n, dtype=torch.float64)


@torch.no_grad()
def install(model: nn.Module, plan: ImportPlan, cfg: FLoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Load ``plan.base`` and ``plan.saved`` into their modules, then install the planned
    adapters through ``model.install_adapters`` (the one install path: wrap, copy, freeze;
    ``cfg.modules_to_save`` stay trainable)."""
    for name, tensors in {**plan.base, **plan.saved}.items():
        state = model.get_submodule(name).state_dict(keep_vars=True)
        for pname, t in tensors.items():
            state[pname].copy_(t)
    targets = {
        a.name: {"rank": tuple(a.core.shape), "scale": a.scale, "dropout": cfg.dropout if a.dropout is None else a.dropout,
                 "strategy": cfg.strategy, "backend": cfg.backend}
        for a in plan.adapters
    }
    tensors = {a.name: (a.core, a.factors) for a in plan.adapters}
    layers = install_adapters(model, targets, adapter_name, cfg, tensors=tensors)
    for a in plan.adapters:  # validated before; guards a future change of clamping
        if layers[a.name].flora_settings[adapter_name].ranks != tuple(a.core.shape):
            raise AssertionError(f"{a.name}: layer ranks differ from the planned {tuple(a.core.shape)}")
    return model


def check_no_flora(model: nn.Module, who: str) -> None:
    if flora_layers(model):
        raise ValueError(f"{who}: the model already has FLoRA layers; import into a model without adapters")


def imported_config(plan: ImportPlan, dropout: float, strategy: str, backend: str) -> FLoRAConfig:
    """A FLoRAConfig describing imported adapters (the ranks per module live in the layers)."""
    names = [a.name for a in plan.adapters]
    ranks = Counter((int(a.core.shape[0]), int(a.core.shape[1])) for a in plan.adapters)
    rank = ranks.most_common(1)[0][0] if ranks else 16
    return FLoRAConfig(
        rank=rank, scale=plan.adapters[0].scale if plan.adapters else 1.0, dropout=float(dropout),
        target_modules="(?:" + "|".join(re.escape(n) for n in names) + ")",
        modules_to_save=tuple(plan.saved), strategy=strategy, backend=backend,
    )


def saved_module_names(model: nn.Module) -> list[str]:
    cfg = getattr(model, "flora_config", None)  # the first adapter's config
    if cfg is None or not cfg.modules_to_save:
        return []
    return [n for n, _ in model.named_modules() if n and name_matches(n, cfg.modules_to_save)]


# ----------------------------------------------------------------------------- export


def _fold_linear(layer: FLoRALayer) -> tuple[Tensor, Tensor]:
    """(A (r, in), B (out, r)) in float64 with B A = G-folded dW / s."""
    core = layer.core.detach().double()
    u_out, u_in = (f.detach().double() for f in layer.factors)
    if core.shape[1] <= core.shape[0]:
        return u_in.t(), u_out @ core
    return core @ u_in.t(), u_out


def _fold_conv_group(layer: FLoRALayer) -> tuple[Tensor, Tensor]:
    """Per-group (A (r, in/g, *k), B (out, r)) in float64 with B A = dW / s (matricized)."""
    core = layer.core.detach().double()
    fs = [f.detach().double() for f in layer.factors]
    r_out = core.shape[0]
    m = math.prod(core.shape[1:])
    if r_out <= m:
        k = core_kernel(core, fs)  # (r_out, r_in, *k)
        a = torch.einsum("ab...,ib->ai...", k, fs[1])
        return a, fs[0]
    # Fold the core into B; A is the Kronecker product of U_in and the kernel factors.
    a = fs[1].t()  # (r_in, in/g)
    for f in fs[2:]:  # append one (rk, k) mode at a time
        a = torch.einsum("r...,ck->rc...k", a, f.t()).reshape(-1, *a.shape[1:], f.shape[0])
    return a, fs[0] @ core.reshape(r_out, m)


def _alpha_for(scale: float, r: int) -> tuple[float, bool]:
    """(lora_alpha, fold_scale_into_B): alpha = s * r when PEFT's alpha / r gives s back."""
    alpha = float(scale) * r
    if alpha / r == float(scale):
        return alpha, False
    return float(r), True


def _anchored(name: str) -> str:
    return "^" + re.escape(name)


OVERSIZED_CHOICES = ("raise", "write", "skip")
MAX_SIZE_RATIO = 64.0


@dataclass(frozen=True)
class PeftSize:
    """Estimated size of one module's PEFT export against its FLoRA adapter (element counts)."""

    peft: int
    flora: int
    lora_a: tuple[int, ...]
    lora_b: tuple[int, ...]

    @property
    def ratio(self) -> float:
        return self.peft / max(self.flora, 1)


def _mib(numel: int, dtype: torch.dtype) -> str:
    return f"{numel * torch.empty((), dtype=dtype).element_size() / 2**20:.3g} MiB"


def export_kind(name: str, layer: FLoRALayer, fmt: str) -> str:
    """How ``layer`` is written in format ``fmt`` ("PEFT" or "LyCORIS"): "linear" (Linear and
    transformers Conv1D), "conv", and for PEFT "embedding" and "mha" (a MultiheadAttention with
    its out_proj); raises for what it cannot express."""
    if isinstance(layer, FLoRALinear) and not (fmt == "LyCORIS" and is_hf_conv1d(layer.base_layer)):
        return "linear"
    if isinstance(layer, (FLoRAConv1d, FLoRAConv2d, FLoRAConv3d)):
        return "conv"
    if fmt == "PEFT" and isinstance(layer, FLoRAEmbedding):
        return "embedding"
    if fmt == "PEFT" and isinstance(layer, FLoRAMultiheadAttention):
        return "mha"
    raise ValueError(
        f"{fmt} export: module {name!r} is a {type(layer).__name__} (on a {type(layer.base_layer).__name__}), which "
        f"{fmt}'s LoRA format cannot express; keep it in FLoRA's own format (fk.save_flora) or leave it out of the "
        "export (adapt it under another adapter name)"
    )


MHA_OUT = ".base_layer.out_proj"  # where PEFT (and FLoRA) keep a wrapped MultiheadAttention's out_proj


def _mha_out_proj(layer: FLoRALayer) -> FLoRALayer | None:
    """The FLoRA layer on a FLoRAMultiheadAttention's out_proj, if any."""
    out = layer.base_layer.out_proj
    return out if isinstance(out, FLoRALayer) else None


def _mha_matrices(layer: FLoRALayer) -> list[FLoRALayer | None]:
    """[in_proj, out_proj] of a FLoRAMultiheadAttention: the layers holding an adapter, else None."""
    return [m if m is not None and m.adapter_names else None for m in (layer, _mha_out_proj(layer))]


def _adapter_numel(layer: FLoRALayer | None) -> int:
    return 0 if layer is None else layer.core.numel() + sum(f.numel() for f in layer.factors)


def peft_size(layer: FLoRALayer) -> PeftSize:
    """The shapes ``to_peft`` writes for ``layer`` and their size, from the ranks alone.

    Linear: r = min(r_out, r_in). Conv: per group r_g = r_out (or r_in * prod(kernel ranks)
    when smaller); a grouped conv's lora_A is dense over all input channels with r = g * r_g,
    g^2 times a per-group A: what makes depthwise convs explode. MultiheadAttention: in_proj
    and out_proj at one rank (the larger of the two), the shapes given are in_proj's.
    """
    if isinstance(layer, FLoRAMultiheadAttention):
        parts = _mha_matrices(layer)
        r = max(min(m.ranks) for m in parts if m is not None)
        e = layer.base_layer.embed_dim
        peft = r * (e + 3 * e) + r * (e + e)
        return PeftSize(peft, sum(_adapter_numel(m) for m in parts), (r, e), (3 * e, r))
    base, ranks = layer.base, layer.ranks
    w = tuple(layer.weight_modes().shape)
    if isinstance(layer, (FLoRALinear, FLoRAEmbedding)):
        r = min(ranks[0], ranks[1])
        a, b = ((r, w[1]), (w[0], r)) if isinstance(layer, FLoRALinear) else ((r, w[0]), (w[1], r))
    else:
        r_g = min(ranks[0], math.prod(ranks[1:]))
        a, b = (base.groups * r_g, base.in_channels, *w[2:]), (w[0], r_g, *(1,) * (len(w) - 2))
    return PeftSize(math.prod(a) + math.prod(b), _adapter_numel(layer), a, b)


def _oversized_error(big: dict[str, PeftSize], layers: dict[str, FLoRALayer], ratio: float) -> ValueError:
    lines = []
    dt = adapter_dtype(next(iter(layers.values())).weight_modes())
    for name, sz in sorted(big.items(), key=lambda kv: -kv[1].peft):
        base = layers[name].base
        groups = f", groups={base.groups}" if getattr(base, "groups", 1) > 1 else ""
        lines.append(
            f"  {name} ({type(base).__name__} {tuple(layers[name].weight_modes().shape)}{groups}): PEFT lora_A "
            f"{sz.lora_a} + lora_B {sz.lora_b} = {_mib(sz.peft, dt)}, FLoRA {_mib(sz.flora, dt)} ({sz.ratio:.0f}x)"
        )
    total = sum(sz.peft for sz in big.values())
    return ValueError(
        f"export_peft: {len(big)} module(s) would be more than {ratio:g}x their FLoRA adapter in PEFT's format "
        f"({_mib(total, dt)} together; PEFT's lora_A cannot be grouped, so a "
        f"grouped conv is written densely):\n" + "\n".join(lines) + "\nAlternatives: fk.save_flora (FLoRA's own "
        "format, exact and compact), fk.convert.export_lycoris (kohya/LyCORIS keys, grouped convs stay compact), "
        "or export_peft(..., oversized='skip') to leave these modules out (listed in the config's exclude_modules) "
        "or oversized='write' to write them anyway (max_size_ratio sets the threshold)."
    )


@dataclass
class _PeftEntry:
    """One module's PEFT tensors (full keys) with its r and lora_alpha."""

    tensors: dict[str, Tensor]
    r: int
    alpha: float


def _export_embedding(name: str, layer: FLoRALayer) -> _PeftEntry:
    """PEFT adds (B A)^T * scaling on the (num, dim) table: A = (U_0 ..)^T, B = (.. U_1)."""
    dt = layer.core.dtype
    a_l, b_l = _fold_linear(layer)  # b_l a_l = dW / s, (num, r) (r, dim)
    if layer.base.padding_idx is not None:  # FLoRA keeps the padding row of dW at zero
        b_l = b_l.index_fill(0, torch.tensor([layer.base.padding_idx]), 0.0)
    r = a_l.shape[0]
    alpha, fold = _alpha_for(layer.scale, r)
    return _PeftEntry({
        f"{PEFT_PREFIX}{name}.lora_embedding_A": b_l.t().to(dt).contiguous(),
        f"{PEFT_PREFIX}{name}.lora_embedding_B": (a_l.t() * (layer.scale if fold else 1.0)).to(dt).contiguous(),
    }, r, alpha)


def _lora_pair(prefix: str, a: Tensor, b: Tensor, dt: torch.dtype) -> dict[str, Tensor]:
    return {f"{prefix}.lora_A.weight": a.to(dt).contiguous(), f"{prefix}.lora_B.weight": b.to(dt).contiguous()}


def _export_conv_ab(name: str, layer: FLoRALayer) -> tuple[Tensor, Tensor]:
    """(A (g r_g, in, *k), B (out, r_g, 1...)) of a conv, A block-diagonal over the groups."""
    base = layer.base
    check_geometry_exact(name, base, "PEFT", "lora_A conv")
    a_g, b = _fold_conv_group(layer)
    r_g, g = a_g.shape[0], base.groups
    a = a_g
    if g > 1:
        cg = a_g.shape[1]
        a = a_g.new_zeros(g * r_g, g * cg, *a_g.shape[2:])
        for j in range(g):
            a[j * r_g:(j + 1) * r_g, j * cg:(j + 1) * cg] = a_g
    return a, b.reshape(b.shape[0], r_g, *(1,) * (base.weight.dim() - 2))


def _export_lora(name: str, layer: FLoRALayer, kind: str) -> _PeftEntry:
    a, b = _fold_linear(layer) if kind == "linear" else _export_conv_ab(name, layer)
    r = a.shape[0]
    alpha, fold = _alpha_for(layer.scale, r)
    return _PeftEntry(_lora_pair(PEFT_PREFIX + name, a, b * layer.scale if fold else b, layer.core.dtype), r, alpha)


def _export_mha(name: str, layer: FLoRALayer) -> _PeftEntry:
    """PEFT's LoRA on a MultiheadAttention: ``<m>.lora_A/B`` on in_proj_weight (3E, E) and
    ``<m>.base_layer.out_proj.lora_A/B`` on out_proj, one r and alpha for both. A part FLoRA does
    not adapt is written as zeros; the smaller rank is zero-padded; unequal scales go into B."""
    parts = _mha_matrices(layer)
    e = layer.base_layer.embed_dim
    held = [m for m in parts if m is not None]
    dt = held[0].core.dtype
    folded = [_fold_linear(m) if m is not None else None for m in parts]
    r = max(ab[0].shape[0] for ab in folded if ab is not None)
    scales = {m.scale for m in held}
    alpha, fold = _alpha_for(held[0].scale, r) if len(scales) == 1 else (float(r), True)
    tensors = {}
    for prefix, shape, m, ab in zip((name, name + MHA_OUT), ((3 * e, e), (e, e)), parts, folded):
        a = torch.zeros(r, shape[1], dtype=torch.float64, device=held[0].core.device)
        b = torch.zeros(shape[0], r, dtype=torch.float64, device=held[0].core.device)
        if ab is not None:
            a[: ab[0].shape[0]] = ab[0]
            b[:, : ab[1].shape[1]] = ab[1] * (m.scale if fold else 1.0)
        tensors.update(_lora_pair(PEFT_PREFIX + prefix, a, b, dt))
    return _PeftEntry(tensors, r, alpha)


def _export_entry(name: str, layer: FLoRALayer, kind: str) -> _PeftEntry:
    held = _mha_matrices(layer) if kind == "mha" else [layer]
    if any(m is not None and m.merged for m in held):
        raise ValueError(f"{name}: the adapter is merged into the base weight; call unmerge_flora first")
    if kind == "embedding":
        return _export_embedding(name, layer)
    if kind == "mha":
        return _export_mha(name, layer)
    return _export_lora(name, layer, kind)


def _export_layers(
    model: nn.Module, oversized: str, max_size_ratio: float
) -> tuple[dict[str, FLoRALayer], dict[str, str], list[str]]:
    """(layers to write {name: layer}, their export kinds, names skipped as oversized). A
    MultiheadAttention's out_proj layer is written with its attention module, not on its own."""
    if oversized not in OVERSIZED_CHOICES:
        raise ValueError(f"oversized: expected one of {OVERSIZED_CHOICES}, got {oversized!r}")
    found = dict(flora_layers(model))
    if not found:
        raise ValueError("export_peft: the model has no FLoRA layers (call inject_flora first)")
    inner = {n + MHA_OUT for n, layer in found.items() if isinstance(layer, FLoRAMultiheadAttention)}
    all_layers = {n: layer for n, layer in found.items() if n not in inner}
    kinds = {name: export_kind(name, layer, "PEFT") for name, layer in all_layers.items()}
    sizes = {name: peft_size(layer) for name, layer in all_layers.items()}
    big = {name: sz for name, sz in sizes.items() if sz.peft > max_size_ratio * sz.flora}
    if big and oversized == "raise":
        raise _oversized_error(big, all_layers, max_size_ratio)
    skipped = sorted(big) if oversized == "skip" else []
    layers = {n: layer for n, layer in all_layers.items() if n not in skipped}
    if not layers:
        raise ValueError(f"export_peft: oversized='skip' leaves no module to export (skipped {skipped})")
    return layers, kinds, skipped


def _peft_config(entries: dict[str, _PeftEntry], kinds: dict[str, str], layers: dict[str, FLoRALayer],
                 dropouts: set[float], saved: list[str], skipped: list[str]) -> dict[str, Any]:
    """adapter_config.json of the export: the most common (r, alpha) pair, the others as patterns."""
    (r0, alpha0), _ = Counter((e.r, e.alpha) for e in entries.values()).most_common(1)[0]
    if len(dropouts) > 1:
        logger.warning("FLoRA layers use different dropouts %s; PEFT has one, writing the largest", sorted(dropouts))
    linear = [n for n in entries if kinds[n] == "linear"]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": alpha0,
        "lora_dropout": max(dropouts, default=0.0),
        "target_modules": "(?:" + "|".join(re.escape(n) for n in entries) + ")",
        "rank_pattern": {_anchored(n): e.r for n, e in entries.items() if e.r != r0},
        "alpha_pattern": {_anchored(n): e.alpha for n, e in entries.items() if e.alpha != alpha0},
        "modules_to_save": saved or None,
        "bias": "none",
        # transformers Conv1D stores (in, out); PEFT flips this per layer where it does not fit
        "fan_in_fan_out": bool(linear) and all(is_hf_conv1d(layers[n].base_layer) for n in linear),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "exclude_modules": skipped or None,
    }


def to_peft(
    model: nn.Module, *, oversized: str = "raise", max_size_ratio: float = MAX_SIZE_RATIO
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PEFT LoRA ``(adapter_config dict, state dict)`` equal in function to ``model``'s FLoRA
    adapters (see the module docstring for the construction and its limits).

    Every module's PEFT size is estimated first (``peft_size``). A module larger than
    ``max_size_ratio`` times its FLoRA adapter (grouped/depthwise convs) is refused by default
    (``oversized="raise"``, naming the modules, their sizes and the alternatives); ``"write"``
    writes it anyway, ``"skip"`` leaves it out and lists it in the config's ``exclude_modules``.

    Raises:
        ValueError: no FLoRA layers, a merged adapter, a conv geometry PEFT cannot express, or
        oversized modules under ``oversized="raise"``.
    """
    layers, kinds, skipped = _export_layers(model, oversized, max_size_ratio)
    entries = {name: _export_entry(name, layer, kinds[name]) for name, layer in layers.items()}
    tensors = {k: t for e in entries.values() for k, t in e.tensors.items()}
    saved = saved_module_names(model)
    for name in saved:
        for pname, t in model.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{pname}"] = t.detach().contiguous()
    dropouts = {layer.dropout for n, layer in layers.items() if kinds[n] != "mha"}  # PEFT's MHA runs merged
    config = _peft_config(entries, kinds, layers, dropouts, saved, skipped)
    return config, {k: v.cpu() for k, v in tensors.items()}


def export_peft(
    model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None, *,
    oversized: str = "raise", max_size_ratio: float = MAX_SIZE_RATIO,
) -> dict[str, Any]:
    """Write ``model``'s FLoRA adapters as a PEFT LoRA adapter directory (``adapter_config.json``
    + ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight`` /
    ``lora_B.weight``), loadable with ``PeftModel.from_pretrained(base_model, path)`` on the
    same base model. Returns the config written (modules left out by ``oversized="skip"`` are
    its ``exclude_modules``). See ``to_peft`` for ``oversized`` and the errors; nothing is
    written when it raises.
    """
    config, tensors = to_peft(model, oversized=oversized, max_size_ratio=max_size_ratio)
    config["base_model_name_or_path"] = base_model_name_or_path
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, PEFT_CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(path, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    return config


# ----------------------------------------------------------------------------- import


def _read_peft(path_or_state: Any, config: Any) -> tuple[dict[str, Any], Mapping[str, Tensor]]:
    if isinstance(path_or_state, (str, os.PathLike)):
        path = os.fspath(path_or_state)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: expected a PEFT adapter directory")
        if config is None:
            with open(os.path.join(path, PEFT_CONFIG_NAME)) as f:
                config = json.load(f)
        st, pt = os.path.join(path, PEFT_WEIGHTS_NAME), os.path.join(path, PEFT_BIN_NAME)
        if os.path.exists(st):
            state = load_file(st)
        elif os.path.exists(pt):
            state = torch.load(pt, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{path}: expected {PEFT_WEIGHTS_NAME} or {PEFT_BIN_NAME}")
    elif isinstance(path_or_state, Mapping):
        state = path_or_state
        if config is None:
            raise ValueError("import_peft: a state dict needs its LoRA config (config=dict or peft.LoraConfig)")
    else:
        raise TypeError(f"path_or_state: expected a directory path or a state dict, got {type(path_or_state).__name__}")
    if not isinstance(config, Mapping):
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        else:
            raise TypeError(f"config: expected a dict or a peft.LoraConfig, got {type(config).__name__}")
    return dict(config), state


def _pattern_value(patterns: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching ``(.*\\.)?(key)$``."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


def _check_lora_config(cfg: Mapping[str, Any]) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).split(".")[-1].upper()
    if peft_type != "LORA":
        raise ValueError(f"adapter_config: expected peft_type 'LORA', got {cfg.get('peft_type')!r}")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
        if cfg.get(flag):
            raise ValueError(f"adapter_config: {flag}=True ({what}) has no FLoRA equivalent")
    if cfg.get("bias", "none") not in ("none", None):
        raise ValueError(f"adapter_config: bias={cfg.get('bias')!r} trains base biases; only 'none' is supported")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ValueError(f"adapter_config: missing {key!r}")


def _plan_conv_grouped(key: str, a: Tensor, b: Tensor, base: nn.Module) -> tuple[Tensor, Tensor]:
    """(U_out, core) of a grouped PEFT conv adapter; raises unless lora_A is block-diagonal."""
    g = base.groups
    out, cg = base.out_channels, base.in_channels // g
    r = a.shape[0]
    r_g, cg_out = r // g, out // g
    core = a.new_zeros(r, cg, *a.shape[2:])
    u_out = b.new_zeros(out, r)
    mask = torch.ones_like(a, dtype=torch.bool)
    for j in range(g):
        rows, cols = slice(j * r_g, (j + 1) * r_g), slice(j * cg, (j + 1) * cg)
        core[rows] = a[rows, cols]
        mask[rows, cols] = False
        u_out[j * cg_out:(j + 1) * cg_out, rows] = b[j * cg_out:(j + 1) * cg_out]
    if bool(a[mask].ne(0).any()):
        raise ValueError(
            f"{key}: lora_A of shape {tuple(a.shape)} mixes input channels across the {g} groups of the base "
            f"{type(base).__name__} (rank block j must read only the channels of group j); such a PEFT adapter is "
            f"not a weight delta of the grouped conv and has no exact FLoRA form"
        )
    return u_out, core


def _peft_scale(cfg: Mapping[str, Any], name: str) -> tuple[int, float]:
    """(r, scaling) of module ``name``: rank/alpha patterns and rsLoRA honoured."""
    r = int(_pattern_value(cfg.get("rank_pattern"), name, cfg["r"]))
    alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"]))
    return r, alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def embedding_spec(name: str, a: tuple[str, Tensor], b: tuple[str, Tensor], module: nn.Module, r: int,
                   scale: float) -> AdapterSpec:
    """A PEFT embedding adapter as a Tucker delta of the (num_embeddings, dim) weight.

    ``lora_embedding_A`` (r, num_embeddings), ``lora_embedding_B`` (dim, r); PEFT adds
    ``scaling * (B A)^T``, so U_0 = A^T, U_1 = B, G = I_r.
    """
    (key_a, ta), (key_b, tb) = a, b
    num, dim = module.weight.shape
    check_shape(key_a, ta, (r, num), f" (r={r} from the config, num_embeddings={num})")
    check_shape(key_b, tb, (dim, r), f" (embedding_dim={dim}, r={r})")
    return AdapterSpec(name, identity(r), [ta.double().t(), tb.double()], scale)


def _model_embeddings(model: nn.Module) -> list[nn.Module]:
    """The model's input/output embedding modules where its getters are implemented (transformers'
    ``get_input_embeddings`` raises NotImplementedError on models without token embeddings, e.g.
    Wav2Vec2Model: such a model simply has none)."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            m = fn() if callable(fn) else None
        except NotImplementedError:
            m = None
        if isinstance(m, nn.Module):
            found.append(m)
    return found


def _embedding_ids(model: nn.Module) -> set[int]:
    """ids of the embedding modules whose full tensors PEFT may save (``save_embedding_layers``)."""
    return {id(m) for m in model.modules() if isinstance(m, nn.Embedding)} | {id(m) for m in _model_embeddings(model)}


def _base_tensor(key: str, t: Tensor, module: nn.Module, owner: str, pname: str) -> Tensor:
    own = module.state_dict()
    if pname not in own:
        raise ValueError(f"{key}: module {owner!r} has no tensor {pname!r} (it has {sorted(own)})")
    why = f" (the model's {owner}.{pname}; resize the model's embeddings first if the vocabulary grew)"
    check_shape(key, t, tuple(own[pname].shape), why)
    return check_float_tensor(key, t)


Pair = dict[str, tuple[str, Tensor]]  # "A" / "B" -> (key, tensor)


@dataclass
class _PeftKeys:
    """A PEFT state dict sorted by role (``plan_peft``'s first step)."""

    lora: dict[str, Pair] = field(default_factory=dict)  # module -> lora_A/B weights
    embedding: dict[str, Pair] = field(default_factory=dict)  # module -> lora_embedding_A/B
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # modules_to_save tensors
    base: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # full base tensors


class _KeySorter:
    """Puts each key of a PEFT state dict in its ``_PeftKeys`` slot, validating it."""

    def __init__(self, model: nn.Module, cfg: Mapping[str, Any]) -> None:
        mts = cfg.get("modules_to_save") or []
        self.mts = [mts] if isinstance(mts, str) else list(mts)
        self.modules = dict(model.named_modules())
        self.saved_names = {n for n in self.modules if n and any(n == p or n.endswith("." + p) for p in self.mts)}
        self.embeddings = _embedding_ids(model)
        self.keys = _PeftKeys()

    def module_name(self, peft_name: str) -> str:
        """The model's name of a module PEFT wrapped: ``attn.base_layer.out_proj`` (PEFT's
        MultiheadAttention keeps out_proj inside its base layer) is ``attn.out_proj``."""
        return peft_name if peft_name in self.modules else logical_name(peft_name)

    def add(self, key: str, t: Any) -> None:
        rel = key.removeprefix(PEFT_PREFIX)
        m = _LORA_KEY.match(rel)
        if m and m.group("param") == "weight":
            self.keys.lora.setdefault(self.module_name(m.group("module")), {})[m.group("ab")] = (
                key, check_float_tensor(key, t))
        elif m:
            raise ValueError(f"{key}: LoRA biases (shape {_shape(t)}) have no FLoRA equivalent")
        elif m := _EMB_KEY.match(rel):
            self.keys.embedding.setdefault(m.group("module"), {})[m.group("ab")] = (key, check_float_tensor(key, t))
        elif not self.add_saved(key, rel, t):
            self.add_base(key, rel, t)

    def add_saved(self, key: str, rel: str, t: Any) -> bool:
        """A modules_to_save tensor (``<m>.<p>`` or ``<m>.modules_to_save.<p>``; PEFT's
        ``<m>.original_module.*`` copy is ignored): True when ``key`` is one."""
        owner = next((n for n in sorted(self.saved_names, key=len, reverse=True) if rel.startswith(n + ".")), None)
        if owner is None:
            return False
        pname = rel[len(owner) + 1:]
        if pname.startswith("original_module."):
            return True
        pname = pname.removeprefix("modules_to_save.")
        own = self.modules[owner].state_dict()
        if pname not in own:
            raise ValueError(f"{key}: module {owner!r} has no tensor {pname!r} (it has {sorted(own)})")
        check_shape(key, t, tuple(own[pname].shape), f" (the model's {owner}.{pname})")
        self.keys.saved.setdefault(owner, {})[pname] = t
        return True

    def add_base(self, key: str, rel: str, t: Any) -> None:
        """``<m>.base_layer.<p>`` or an embedding layer's tensor: a full base tensor; else unknown."""
        mod_name, sep, pname = rel.partition(".base_layer.")
        if not sep:
            mod_name, _, pname = rel.rpartition(".")
            if id(self.modules.get(mod_name)) not in self.embeddings:
                raise ValueError(
                    f"{key}: unknown key (shape {_shape(t)}); expected <module>.lora_A.weight / lora_B.weight, "
                    f"<module>.lora_embedding_A / _B, <module>.base_layer.<tensor>, an embedding layer's tensor or "
                    f"a parameter of modules_to_save {self.mts}"
                )
        if mod_name not in self.modules:
            raise ValueError(f"{key}: the model has no module {mod_name!r} (shape {_shape(t)})")
        self.keys.base.setdefault(mod_name, {})[pname] = _base_tensor(key, t, self.modules[mod_name], mod_name, pname)

    def result(self) -> _PeftKeys:
        for owner, tensors in self.keys.saved.items():
            missing = sorted(set(self.modules[owner].state_dict()) - set(tensors))
            if missing:
                raise ValueError(f"modules_to_save {owner!r}: the adapter lacks {missing}")
        if not self.keys.lora and not self.keys.embedding:
            raise ValueError("import_peft: the adapter holds no lora_A/lora_B weights")
        return self.keys


def _sort_peft_keys(model: nn.Module, state: Mapping[str, Tensor], cfg: Mapping[str, Any]) -> _PeftKeys:
    sorter = _KeySorter(model, cfg)
    for key, t in state.items():
        sorter.add(key, t)
    return sorter.result()


def _pair(name: str, ab: Pair, kind: str) -> tuple[tuple[str, Tensor], tuple[str, Tensor]]:
    """(A, B) of a lora pair; raises naming the missing side."""
    for side in "AB":
        if side not in ab:
            other_key = ab["B" if side == "A" else "A"][0]
            missing = f"{PEFT_PREFIX}{name}.lora_embedding_{side}" if kind == "embedding" else (
                f"{other_key[: -len('B.weight')]}{side}.weight")
            raise ValueError(f"{missing}: missing (its lora pair is present)")
    return ab["A"], ab["B"]


LORA_TYPES = "Linear, transformers Conv1D, Conv1d/2d/3d or MultiheadAttention (or subclasses)"


def _lora_kind(module: nn.Module | None) -> str | None:
    """How a PEFT LoRA adapter on ``module`` is read: "linear" (Linear subclasses and transformers
    Conv1D, whose lora_A/B are a Linear's whatever ``fan_in_fan_out`` says), "conv" or "mha"."""
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    return None


def _lora_module(modules: Mapping[str, nn.Module], name: str, key: str) -> tuple[nn.Module, str]:
    """(module ``name``, its ``_lora_kind``); raises naming ``key``."""
    m = modules.get(name) if name else None
    kind = _lora_kind(m)
    if m is None:
        cands = [n for n, mm in modules.items() if n and _lora_kind(mm)]
        shown = ", ".join(cands[:12]) + (", ..." if len(cands) > 12 else "")
        raise ValueError(f"{key}: the model has no module {name!r} (adaptable modules: {shown})")
    if kind is None:
        raise TypeError(f"{key}: module {name!r} is a {type(m).__name__}; expected a {LORA_TYPES}")
    if kind == "mha" and not m._qkv_same_embed_dim:
        raise TypeError(
            f"{key}: module {name!r} is a MultiheadAttention with kdim={m.kdim}, vdim={m.vdim} != "
            f"embed_dim={m.embed_dim}; expected packed q/k/v projections (as PEFT's LoRA requires)"
        )
    return m, kind


def _plan_matrix(name: str, a: tuple[str, Tensor], b: tuple[str, Tensor], w: tuple[int, ...], r: int,
                 scale: float) -> AdapterSpec:
    """A LoRA pair on a (out, in) matrix in mode order: U_out = B, U_in = A^T, G = I_r."""
    (key_a, ta), (key_b, tb) = a, b
    check_shape(key_a, ta, (r, w[1]), f" (r={r} from the config, in_features={w[1]})")
    check_shape(key_b, tb, (w[0], r), f" (out_features={w[0]}, r={r})")
    return AdapterSpec(name, identity(r), [tb.double(), ta.double().t()], scale)


def _plan_conv(name: str, a: tuple[str, Tensor], b: tuple[str, Tensor], base: nn.Module, r: int,
               scale: float) -> AdapterSpec:
    """A LoRA pair on a ConvNd: U_out = B, G = A, U_in and kernel factors the identity (grouped:
    block-diagonal A required, see ``_plan_conv_grouped``)."""
    (key_a, ta), (key_b, tb) = a, b
    w = tuple(base.weight.shape)
    g, ones, ks = base.groups, (1,) * (len(w) - 2), tuple(w[2:])
    in_ch = base.in_channels
    check_shape(key_a, ta, (r, in_ch, *ks), f" (r={r} from the config, in_channels={in_ch}, kernel {ks})")
    if r % g:
        raise ValueError(f"{key_a}: rank {r} is not divisible by groups={g} of {name!r}")
    check_shape(key_b, tb, (w[0], r // g, *ones), f" (out_channels={w[0]}, r/groups={r // g})")
    check_geometry_exact(name, base, "PEFT", "lora_A conv")
    a64, b64 = ta.double(), tb.double().reshape(w[0], r // g)
    u_out, core = (b64, a64) if g == 1 else _plan_conv_grouped(key_a, a64, b64, base)
    return AdapterSpec(name, core, [u_out, identity(w[1])] + [identity(k) for k in ks], scale)


def _plan_lora(modules: Mapping[str, nn.Module], name: str, ab: Pair, cfg: Mapping[str, Any]) -> AdapterSpec:
    """The exact FLoRA adapter of module ``name``'s lora_A/lora_B pair."""
    a, b = _pair(name, ab, "lora")
    base, kind = _lora_module(modules, name, a[0])
    attn = _attention_of(modules, name)
    r, scale = _peft_scale(cfg, attn or name)  # an out_proj takes its attention module's r and alpha
    if kind == "conv":
        spec = _plan_conv(name, a, b, base, r, scale)
    else:  # Linear (mode order (out, in)); Conv1D's stored (in, out) is transposed; MHA's in_proj (3E, E)
        w = FLoRAMultiheadAttention.weight_shape_of(base) if kind == "mha" else FLoRALinear.weight_shape_of(base)
        spec = _plan_matrix(name, a, b, w, r, scale)
        spec.dropout = None if attn is None else 0.0  # PEFT runs MHA merged: no dropout there
    return fit_ranks(spec, _mode_shape(base, kind))


def _attention_of(modules: Mapping[str, nn.Module], name: str) -> str | None:
    """The MultiheadAttention module ``name`` is (or is the out_proj of), else None. PEFT adapts
    in_proj and out_proj with the attention module's config entry (r, alpha) and runs both merged."""
    if isinstance(modules.get(name), nn.MultiheadAttention):
        return name
    parent, _, child = name.rpartition(".")
    if child == "out_proj" and isinstance(modules.get(parent), nn.MultiheadAttention):
        return parent
    return None


def _mode_shape(module: nn.Module, kind: str) -> tuple[int, ...]:
    if kind == "mha":
        return FLoRAMultiheadAttention.weight_shape_of(module)
    if kind == "linear":
        return FLoRALinear.weight_shape_of(module)
    return tuple(module.weight.shape)


def _plan_embedding(modules: Mapping[str, nn.Module], name: str, ab: Pair, cfg: Mapping[str, Any]) -> AdapterSpec:
    a, b = _pair(name, ab, "embedding")
    module = modules.get(name)
    if not isinstance(module, nn.Embedding):
        got = "no such module" if module is None else f"a {type(module).__name__}"
        raise TypeError(f"{a[0]}: expected module {name!r} to be an nn.Embedding, the model has {got}")
    r, scale = _peft_scale(cfg, name)
    return fit_ranks(embedding_spec(name, a, b, module, r, scale), tuple(module.weight.shape))


def plan_peft(model: nn.Module, path_or_state: Any, config: Any = None) -> tuple[ImportPlan, dict[str, Any]]:
    """Validate a PEFT LoRA adapter against ``model`` and compute the exact FLoRA tensors.

    Keys understood (after the optional ``base_model.model.`` prefix): ``<m>.lora_A.weight`` /
    ``lora_B.weight`` (``<attn>.base_layer.out_proj.lora_*`` for a MultiheadAttention's out_proj);
    ``<m>.lora_embedding_A`` / ``_B``; ``<m>.base_layer.<param>`` (the full base tensor PEFT saves
    for an adapted, e.g. resized, embedding or head: loaded into the base module, frozen); the
    tensors of embedding layers (``save_embedding_layers``: loaded, frozen); modules_to_save
    tensors (``<m>.<param>`` or ``<m>.modules_to_save.<param>``; PEFT's ``<m>.original_module.*``
    copy of the untrained module is ignored). Touches nothing. Returns the plan and the LoRA
    config dict.
    """
    cfg, state = _read_peft(path_or_state, config)
    _check_lora_config(cfg)
    keys = _sort_peft_keys(model, state, cfg)
    modules = dict(model.named_modules())
    adapters = [_plan_embedding(modules, n, ab, cfg) for n, ab in sorted(keys.embedding.items())]
    adapters += [_plan_lora(modules, n, ab, cfg) for n, ab in sorted(keys.lora.items())]
    return ImportPlan(adapters, keys.saved, keys.base), cfg


def import_peft(
    model: nn.Module, path_or_state: str | os.PathLike | Mapping[str, Tensor], config: Any = None, *,
    strategy: str = "auto", backend: str = "auto",
) -> nn.Module:
    """Import a PEFT LoRA adapter into ``model`` (its base model, without adapters) as FLoRA layers.

    Args:
        model: the base model the LoRA adapter was trained on; modified in place.
        path_or_state: a PEFT adapter directory (``adapter_config.json`` +
            ``adapter_model.safetensors`` or ``.bin``), or a state dict with PEFT's saved key names
            (``base_model.model.<module>.lora_A.weight``; the prefix is optional).
        config: the LoRA config (dict or ``peft.LoraConfig``); read from the directory when None.
        strategy, backend: for the created layers.

    The result computes the same function as PEFT's unmerged LoRA model (exactly, up to float
    rounding). The FLoRA ranks follow the module docstring: Linear (r, r); conv (r, in/groups,
    *kernel), i.e. the input and kernel ranks grow to full size. Layers get ``scale`` = PEFT's
    scaling and ``dropout`` = ``lora_dropout``; ``modules_to_save`` tensors are loaded and stay
    trainable; every other parameter is frozen, as after ``inject_flora``.

    Raises:
        ValueError / TypeError: naming the key and both shapes, before anything is changed.
    """
    check_no_flora(model, "import_peft")
    plan, cfg = plan_peft(model, path_or_state, config)
    fcfg = imported_config(plan, float(cfg.get("lora_dropout") or 0.0), strategy, backend)
    return install(model, plan, fcfg)


__all__ = ["export_peft", "import_peft", "plan_peft", "to_peft"]
