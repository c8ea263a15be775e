"""Model-level operations: target selection, the one install path, named adapters, merge,
mixed batches, save/load (PEFT's folder layout), parameter summary.

Module names: a FLoRA layer keeps the module it wraps as ``base_layer``, so a module nested
inside a wrapped one (``attn.out_proj`` inside a wrapped MultiheadAttention) has the real path
``attn.base_layer.out_proj``. Target patterns match the *logical* name (``attn.out_proj``, the
name in the model before injection); saved files use real paths, as PEFT does.

Model state kept on the model object: ``model.flora_configs`` ({adapter: FLoRAConfig}),
``model.flora_active`` (the active adapters) and ``model.flora_config`` (the first adapter's
config, for single-adapter code).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import ALL_LINEAR, FLoRAConfig, name_matches
from .layers import SUPPORTED, FLoRALayer, flora_layers, layer_class_for, wrap
from .layers.embedding import FLoRAEmbedding
from .layers.linear import FLoRALinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 2
PEFT_TYPE = "FLORA"
KEY_PREFIX = "base_model.model."
DEFAULT_ADAPTER = "default"
# Saved module types that load into any Linear (quantized or not): a QLoRA adapter trained on a
# 4-bit base loads into the full-precision model, and the other way round.
LINEAR_TYPE_NAMES = frozenset({"Linear", "Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt"})

# --------------------------------------------------------------------------- names


def logical_name(real: str) -> str:
    """A module's name in the model before injection (``base_layer`` components dropped)."""
    return ".".join(p for p in real.split(".") if p != "base_layer")


def resolve_name(model: nn.Module, logical: str) -> str:
    """The real path of the module called ``logical`` before injection."""
    real: list[str] = []
    cur = model
    for part in logical.split("."):
        while isinstance(cur, FLoRALayer) and part not in cur._modules:
            cur = cur.base_layer
            real.append("base_layer")
        if part not in cur._modules:
            raise ValueError(f"module {logical!r} not found in the model")
        cur = cur._modules[part]
        real.append(part)
    return ".".join(real)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _candidates(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(logical name, real name, module) of every submodule; a FLoRA layer stands for the
    module it wraps (which is not listed itself)."""
    wrapped = {id(m.base_layer) for _, m in flora_layers(model)}
    return [(logical_name(n), n, m) for n, m in model.named_modules() if n and id(m) not in wrapped]


def shared_weight_users(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> the names of every module holding it (ties show as several names)."""
    users: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, FLoRALayer):
            continue
        for p in m._parameters.values():
            if p is not None:
                users.setdefault(id(p), []).append(logical_name(name))
    return users


def _tied_with(base: nn.Module, name: str, users: dict[int, list[str]], weight_name: str) -> tuple[str, ...]:
    p = base._parameters.get(weight_name)
    if p is None:
        return ()
    return tuple(sorted({u for u in users.get(id(p), []) if u != name}))


# --------------------------------------------------------------------------- targets


def _layer_kwargs(cfg: FLoRAConfig, name: str) -> dict[str, Any]:
    return {
        "rank": cfg.rank_for(name), "kernel_rank": cfg.kernel_rank, "scale": cfg.scale_for(name), "dropout": cfg.dropout,
        "strategy": cfg.strategy, "backend": cfg.backend, "lean_memory": cfg.lean_memory,
    }


def _saved_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    return [lg for lg, _, _ in _candidates(model) if patterns and name_matches(lg, patterns)]


def select_targets(model: nn.Module, cfg: FLoRAConfig) -> dict[str, dict[str, Any]]:
    """The modules ``cfg`` adapts: {logical name: layer kwargs} (rank/scale patterns applied).

    Defaults (``target_modules=None`` / ``"all-linear"``) leave out modules whose weight is
    shared with another module (tied output heads) and, for "all-linear", the model's
    ``get_output_embeddings()``. A module a pattern matches that FLoRA cannot adapt is skipped
    with a warning naming it and its type.
    """
    tm = cfg.target_modules
    default = tm is None or tm == ALL_LINEAR
    users = shared_weight_users(model)
    saved = _saved_names(model, cfg.modules_to_save)
    heads = set()
    if tm == ALL_LINEAR and callable(getattr(model, "get_output_embeddings", None)):
        head = model.get_output_embeddings()
        if head is not None:
            heads.add(id(head.base_layer if isinstance(head, FLoRALayer) else head))
    targets: dict[str, dict[str, Any]] = {}
    adaptable: list[str] = []
    for name, _, m in _candidates(model):
        if any(name == s or name.startswith(s + ".") for s in saved):
            continue
        base = m.base_layer if isinstance(m, FLoRALayer) else m
        cls = layer_class_for(base)
        inside = any(name.startswith(a + ".") for a in adaptable)
        if cls is not None:
            adaptable.append(name)
        if not default and not name_matches(name, tm):
            continue
        if cfg.exclude_modules is not None and name_matches(name, cfg.exclude_modules):
            continue
        if cls is None:
            own = [p for p in base._parameters.values() if p is not None]
            leaf = not base._modules
            if own and not inside and (not default or (leaf and any(p.dim() >= 2 for p in own))):
                warnings.warn(
                    f"FLoRA: module {name!r} ({type(base).__name__}) matches target_modules={tm!r} but cannot be "
                    f"adapted (supported: {SUPPORTED}); it is left as it is",
                    stacklevel=3,
                )
            continue
        if default:
            if cls is FLoRAEmbedding or (tm == ALL_LINEAR and not issubclass(cls, FLoRALinear)):
                continue
            if id(base) in heads or _tied_with(base, name, users, cls.weight_name):
                continue
        targets[name] = _layer_kwargs(cfg, name)
    return targets


# --------------------------------------------------------------------------- install


def _state(model: nn.Module) -> tuple[dict[str, FLoRAConfig], list[str]]:
    return getattr(model, "flora_configs", {}), getattr(model, "flora_active", [])


def set_state(model: nn.Module, configs: dict[str, FLoRAConfig], active: list[str]) -> None:
    if not configs:
        for attr in ("flora_configs", "flora_active", "flora_config"):
            if hasattr(model, attr):
                delattr(model, attr)
        return
    model.flora_configs = configs
    model.flora_active = active
    model.flora_config = configs[next(iter(configs))]


def activate_adapters(model: nn.Module, active: list[str], inference_mode: bool = False) -> None:
    """PEFT's set_adapter rule: ``active`` become the active adapters on every layer and only
    they train (none of them with ``inference_mode``); the modules_to_save of the active
    adapters train, those of the others are frozen. Other parameters keep their state."""
    configs, _ = _state(model)
    set_state(model, configs, active)
    for _, layer in flora_layers(model):
        layer.set_adapter(active, inference_mode=inference_mode)
    saved = {n: False for c in configs.values() for n in _saved_names(model, c.modules_to_save)}
    saved.update({n: not inference_mode for a in active for n in _saved_names(model, configs[a].modules_to_save)})
    for name, train in saved.items():
        for p in model.get_submodule(resolve_name(model, name)).parameters():
            p.requires_grad_(train)


@torch.no_grad()
def install_adapters(
    model: nn.Module,
    targets: dict[str, dict[str, Any]],
    adapter_name: str,
    cfg: FLoRAConfig,
    tensors: dict[str, tuple[Tensor, Sequence[Tensor]]] | None = None,
    activate: bool = True,
    inference_mode: bool = False,
    low_cpu_mem_usage: bool = False,
) -> dict[str, FLoRALayer]:
    """The one install path: add adapter ``adapter_name`` to every target (wrapping modules
    that have no FLoRA layer yet, deepest first), copy ``tensors`` {logical name: (core,
    factors)} in (else ``cfg.init_weights`` decides the init), record ``cfg``.

    Trainability follows PEFT: the first adapter of a model freezes every other parameter and
    trains (unless ``inference_mode``) with its modules_to_save; a later one is added frozen
    and every parameter present before keeps its ``requires_grad``. ``activate`` makes it an
    active adapter. ``low_cpu_mem_usage``: the new adapter tensors are created on the meta
    device and ``tensors`` become them without a copy (without ``tensors`` they stay on meta,
    for a state dict loaded with ``assign=True``).

    A targeted ``out_proj`` of an ``nn.MultiheadAttention`` makes the attention module a FLoRA
    layer too (without an adapter of its own unless it is targeted), since the attention reads
    ``out_proj.weight`` directly. Returns {logical name: layer}.
    """
    configs, active = _state(model)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it first or pick another name")
    first = not configs
    before = {} if first else {id(p): p.requires_grad for p in model.parameters()}
    users = shared_weight_users(model)
    targets = _fit_strategies(model, targets)
    layers: dict[str, FLoRALayer] = {}
    for name in sorted(targets, key=lambda n: n.count("."), reverse=True):
        real = resolve_name(model, name)
        m = model.get_submodule(real)
        if isinstance(m, FLoRALayer):
            layer = m
        else:
            layer = wrap(m, adapter_name=None)
            layer.shared_with = _tied_with(m, name, users, layer.weight_name)
            _set_submodule(model, real, layer)
        layer.add_adapter(adapter_name, **targets[name], device="meta" if low_cpu_mem_usage else None)
        dst_core, dst_factors = layer.tensors(adapter_name)
        if tensors is not None and name in tensors:
            core, factors = tensors[name]
            if low_cpu_mem_usage:
                _assign(layer, adapter_name, [core, *factors])
            else:
                dst_core.copy_(core)
                for d, s in zip(dst_factors, factors, strict=True):
                    d.copy_(s)
        elif not cfg.init_weights and not low_cpu_mem_usage:
            # each factor has entries of variance 1/(2 r_n): dW's entries get std 1/(2 sqrt(fan_in))
            w = layer.weight_modes()
            nn.init.normal_(dst_core, std=2 ** (w.dim() / 2) / (2 * math.sqrt(w[0].numel())))
        layers[name] = layer
        parent_name, _, child = name.rpartition(".")
        if child == "out_proj" and parent_name:
            parent_real = resolve_name(model, parent_name)
            parent = model.get_submodule(parent_real)
            if isinstance(parent, nn.MultiheadAttention):
                _set_submodule(model, parent_real, wrap(parent, adapter_name=None))
    if not layers:
        raise ValueError("install_adapters: no targets")
    native_fastpath(model, enable=False)
    set_state(model, {**configs, adapter_name: cfg}, active)
    if first:
        for p in model.parameters():
            p.requires_grad_(False)
    activate_adapters(model, (active + [adapter_name]) if activate else active, inference_mode)
    for p in model.parameters():
        if id(p) in before:
            p.requires_grad_(before[id(p)])
    return layers


def _fit_strategies(model: nn.Module, targets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A config's strategy that a layer type lacks (``"factorized"`` on a MultiheadAttention,
    which has only the merged path) becomes ``"auto"`` for that type, with one warning naming
    the layers. (A layer built directly with such a strategy still raises.)"""
    fitted, fell_back = {}, []
    for name, kw in targets.items():
        m = model.get_submodule(resolve_name(model, name))
        cls = type(m) if isinstance(m, FLoRALayer) else layer_class_for(m)
        strategy = kw.get("strategy", "auto")
        if cls is not None and strategy != "auto" and strategy not in cls.strategies:
            fell_back.append(f"{name} ({cls.__name__}: {strategy!r} asked, it has {', '.join(cls.strategies)})")
            kw = {**kw, "strategy": "auto"}
        fitted[name] = kw
    if fell_back:
        warnings.warn(
            "FLoRA: the config's strategy is not implemented by every targeted layer type; these layers use "
            "strategy='auto' instead: " + "; ".join(fell_back),
            stacklevel=4,
        )
    return fitted


@torch.no_grad()
def cast_adapter(model: nn.Module, name: str) -> None:
    """Cast adapter ``name``'s tensors to the dtype of each layer's base weight (floating bases
    only): PEFT's ``autocast_adapter_dtype=False``. By default adapters are fp32 (fp64 on fp64)."""
    for _, layer in flora_layers(model):
        dtype = layer.base_weight().dtype
        if name not in layer.flora_settings or not dtype.is_floating_point:
            continue
        for container in layer.adapter_layer_names:
            d = getattr(layer, container)
            p = d[name]
            if p.dtype != dtype:
                d[name] = nn.Parameter(p.to(dtype), requires_grad=p.requires_grad)
        layer._changed()


def _assign(layer: FLoRALayer, name: str, tensors: Sequence[Tensor]) -> None:
    """Make ``tensors`` ([core, *factors]) adapter ``name``'s parameters on ``layer`` (cast to
    its adapter dtype, on the base weight's device; no copy when they match)."""
    device = layer.base_weight().device
    for container, t in zip(layer.adapter_layer_names, tensors, strict=True):
        d = getattr(layer, container)
        old = d[name]
        d[name] = nn.Parameter(t.detach().to(device=device, dtype=old.dtype), requires_grad=old.requires_grad)
    layer._changed()


_FASTPATH_FLAG = "_flora_fastpath_off"


def native_fastpath(model: nn.Module, enable: bool) -> None:
    """``nn.TransformerEncoderLayer``'s inference fast path reads its children's weights
    directly (bypassing a FLoRA layer's forward): turn it off while it holds FLoRA layers,
    back on once they are unloaded. Its ``activation_relu_or_gelu`` flag gates only that path."""
    for m in model.modules():
        if not isinstance(m, nn.TransformerEncoderLayer):
            continue
        if not enable and m.activation_relu_or_gelu and flora_layers(m):
            setattr(m, _FASTPATH_FLAG, m.activation_relu_or_gelu)  # 1: relu, 2: gelu
            m.activation_relu_or_gelu = False
        elif enable and hasattr(m, _FASTPATH_FLAG) and not flora_layers(m):
            m.activation_relu_or_gelu = getattr(m, _FASTPATH_FLAG)
            delattr(m, _FASTPATH_FLAG)


def _no_match_error(model: nn.Module, cfg: FLoRAConfig) -> ValueError:
    if layer_class_for(model) is not None:
        return ValueError(
            f"the model itself is a {type(model).__name__}: wrap it directly (e.g. fk.FLoRALinear(module)), "
            "inject_flora only replaces submodules"
        )
    candidates = [n for n, _, m in _candidates(model) if layer_class_for(getattr(m, "base_layer", m))]
    return ValueError(f"target_modules={cfg.target_modules!r} matched no supported module; candidates: {candidates}")


def inject_flora(model: nn.Module, cfg: FLoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Add adapter ``adapter_name`` on every module ``cfg`` targets, make it the active one,
    and freeze everything else (modules_to_save stay trainable). Returns ``model``.

    Raises:
        ValueError: nothing matched (the message lists the candidate module names), or the
            adapter name exists already.
    """
    add_adapter(model, adapter_name, cfg)
    set_adapter(model, adapter_name)
    return model


def add_adapter(model: nn.Module, name: str, cfg: FLoRAConfig) -> nn.Module:
    """Add adapter ``name`` with its own ranks, scale and targets (layers added where needed).
    As in PEFT, it is not made active (``set_adapter`` does that) and is added frozen, every
    other parameter keeping its ``requires_grad``, unless it is the model's first adapter: that
    one is active and trains (with its modules_to_save), everything else frozen."""
    if not isinstance(cfg, FLoRAConfig):
        raise TypeError(f"cfg: expected a FLoRAConfig, got {type(cfg).__name__}")
    targets = select_targets(model, cfg)
    if not targets:
        raise _no_match_error(model, cfg)
    first = not _state(model)[0]
    install_adapters(model, targets, name, cfg, activate=first)
    return model


def _check_adapter_names(model: nn.Module, names: Sequence[str]) -> None:
    configs, _ = _state(model)
    for n in names:
        if n not in configs:
            raise KeyError(f"adapter {n!r} not found; the model has {list(configs)}")


def set_adapter(model: nn.Module, name_or_list: str | Sequence[str], inference_mode: bool = False) -> nn.Module:
    """Make ``name_or_list`` the active adapters (several are summed); only they train, and not
    even they with ``inference_mode``. A merged model is unmerged first, with PEFT's warning."""
    names = [name_or_list] if isinstance(name_or_list, str) else list(name_or_list)
    _check_adapter_names(model, names)
    merged = [layer for _, layer in flora_layers(model) if layer.merged]
    if merged:
        warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
        for layer in merged:
            layer.unmerge()
    activate_adapters(model, names, inference_mode)
    return model


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapter names."""
    return list(_state(model)[1])


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` from every layer (layers left without adapters stay as shells);
    other adapters keep their merge state. If ``name`` was the only active adapter, the first
    remaining one (by name) becomes active, with PEFT's warning.

    Raises:
        ValueError: ``name`` is merged (unmerge it first), as in PEFT.
    """
    _check_adapter_names(model, [name])
    if any(name in layer.merged_adapters for _, layer in flora_layers(model)):
        raise ValueError(f"Cannot delete adapter(s) [{name!r}] while they are merged. Please unmerge them first.")
    for _, layer in flora_layers(model):
        if name in layer.flora_settings:
            layer.delete_adapter(name)
    configs, active = _state(model)
    configs = {k: v for k, v in configs.items() if k != name}
    new_active = [a for a in active if a != name]
    set_state(model, configs, new_active)
    if name in active and configs:
        if not new_active:
            new_active = [min(configs)]
            warnings.warn(
                f"Adapter {name} was active which is now deleted. Setting active adapter to {new_active[0]}.",
                stacklevel=2,
            )
        activate_adapters(model, new_active)
    return model


def _clamp_exact(core: Tensor, factors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Rewrite a Tucker term whose rank exceeds a mode's size exactly at the clamped rank:
    U = Q R (QR, Q square) gives G x_n U = (G x_n R) x_n Q."""
    from .tucker import mode_n_product

    out = []
    for n, f in enumerate(factors):
        if f.shape[1] > f.shape[0]:
            q, r = torch.linalg.qr(f, mode="complete")
            core = mode_n_product(core, r, n)
            f = q
        out.append(f)
    return core, out


@torch.no_grad()
def add_weighted_adapter(
    model: nn.Module, names: Sequence[str], weights: Sequence[float], new_name: str
) -> nn.Module:
    """Add ``new_name`` = sum_i weights[i] * adapter names[i], exactly: per layer the cores are
    placed block-diagonally (weight and scale folded in, scale 1) and the factors concatenated;
    where a concatenated rank exceeds its mode size the term is rewritten exactly at the
    clamped rank. Not made active."""
    names, weights = list(names), [float(w) for w in weights]
    if len(names) != len(weights) or not names:
        raise ValueError(f"add_weighted_adapter: expected one weight per adapter, got {names} and {weights}")
    _check_adapter_names(model, names)
    configs, _ = _state(model)
    targets, tensors = {}, {}
    for real, layer in flora_layers(model):
        present = [(n, w) for n, w in zip(names, weights) if n in layer.flora_settings]
        if not present:
            continue
        terms = [layer.tensors(n) for n, _ in present]
        ranks = [tuple(c.shape) for c, _ in terms]
        total = [sum(r[i] for r in ranks) for i in range(len(ranks[0]))]
        core = terms[0][0].new_zeros(total)
        offset = [0] * len(total)
        for (c, _), (n, w) in zip(terms, present):
            idx = tuple(slice(o, o + s) for o, s in zip(offset, c.shape))
            core[idx] = c * (w * layer.flora_settings[n].scale)
            offset = [o + s for o, s in zip(offset, c.shape)]
        factors = [torch.cat([fs[i] for _, fs in terms], dim=1) for i in range(len(total))]
        core, factors = _clamp_exact(core, factors)
        first = layer.flora_settings[present[0][0]]
        targets[logical_name(real)] = {
            "rank": tuple(core.shape), "scale": 1.0, "dropout": first.dropout,
            "strategy": first.strategy, "backend": first.backend,
        }
        tensors[logical_name(real)] = (core, factors)
    base_cfg = configs[names[0]]
    cfg = FLoRAConfig(
        rank=base_cfg.rank, kernel_rank=base_cfg.kernel_rank, scale=1.0, dropout=base_cfg.dropout,
        target_modules="(?:" + "|".join(re.escape(n) for n in targets) + ")",
        modules_to_save=base_cfg.modules_to_save, strategy=base_cfg.strategy, backend=base_cfg.backend,
        rank_pattern={"^" + re.escape(n) + "$": list(t["rank"]) for n, t in targets.items()},
    )
    install_adapters(model, targets, new_name, cfg, tensors=tensors, activate=False)
    return model


# --------------------------------------------------------------------------- merge


def _mark_shared(model: nn.Module) -> None:
    users = shared_weight_users(model)
    for real, layer in flora_layers(model):
        layer.shared_with = _tied_with(layer.base_layer, logical_name(real), users, layer.weight_name)


def merge_flora(model: nn.Module) -> nn.Module:
    """Fold the active adapters into their base weights (outputs unchanged). A weight shared
    with another module (a tied embedding) is merged into a copy of this module's own, so the
    other module is unchanged; unmerge restores the tie."""
    _mark_shared(model)
    for _, layer in flora_layers(model):
        layer.merge()
    return model


def unmerge_flora(model: nn.Module) -> nn.Module:
    """Undo ``merge_flora``: base weights restored (shared and weight-normed ones bit for bit).
    Nothing merged: PEFT's warning "Already unmerged. Nothing to do."."""
    merged = [layer for _, layer in flora_layers(model) if layer.merged]
    if not merged:
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
    for layer in merged:
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters, then replace every FLoRA layer by its plain module.

    A module whose weight was tied to another keeps a merged weight of its own (the tie cannot
    hold: the two now differ); a ``config.tie_word_embeddings`` flag is cleared so that a
    transformers ``save_pretrained``/``from_pretrained`` does not tie them again.
    """
    merge_flora(model)
    untied = []
    for real, layer in sorted(flora_layers(model), key=lambda t: t[0].count("."), reverse=True):
        if layer.shared_with and layer.merged:
            untied.append((logical_name(real), layer.shared_with))
        layer._merge_saved = None
        _set_submodule(model, real, layer.base_layer)
    native_fastpath(model, enable=True)
    if untied:
        config = getattr(model, "config", None)
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
        warnings.warn(
            "merge_and_unload: " + "; ".join(f"{n} no longer shares its weight with {', '.join(w)}" for n, w in untied)
            + " (each merged module owns its weight now)",
            stacklevel=2,
        )
    set_state(model, {}, [])
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block (e.g. the reference model in preference tuning).

    As in PEFT: disabling unmerges merged adapters (they stay unmerged after the block) and
    freezes the adapters; layers enabled before are enabled again after the block (their
    active adapters trainable), even if it raises. Nested blocks keep adapters disabled until
    the outer one ends.
    """
    layers = [layer for _, layer in flora_layers(model)]
    enabled = [layer.adapter_enabled for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer, was in zip(layers, enabled):
            if was:
                layer.enable_adapters(True)


def set_adapter_scale(model: nn.Module, scale: float, adapter_name: str | None = None) -> nn.Module:
    """Set s of every adapter (or of ``adapter_name``) on every layer; merged ones are re-merged."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    for _, layer in flora_layers(model):
        if adapter_name is None or adapter_name in layer.flora_settings:
            layer.set_scale(float(scale), adapter_name)
    return model


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str | None], batch_dim: int = 0) -> Iterator[nn.Module]:
    """Inside the block, sample i of each forward uses adapter ``names[i]`` alone (None: the
    base model). Every FLoRA layer groups its batch by adapter (one call per adapter present).
    ``batch_dim`` is the sample dimension of the layers' inputs (MultiheadAttention uses its
    own ``batch_first``)."""
    used = list(dict.fromkeys(n for n in names if n is not None))
    _check_adapter_names(model, used)
    layers = [layer for _, layer in flora_layers(model)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("adapter_batch: unmerge the model's adapters first (fk.unmerge_flora)")
    try:
        for layer in layers:
            set_mixed(layer, names, batch_dim)
        yield model
    finally:
        for layer in layers:
            layer._mixed = None


def set_mixed(layer: FLoRALayer, names: Sequence[str | None], batch_dim: int = 0) -> None:
    """Make ``layer`` run sample i with adapter ``names[i]`` (None, or an adapter the layer does
    not hold: its base module) until ``layer._mixed`` is reset to None."""
    held = {a for m in layer._group_layers() for a in m.flora_settings}
    here = list(dict.fromkeys(n for n in names if n in held))
    pos = {n: i for i, n in enumerate(here)}
    layer._mixed = (torch.tensor([pos.get(n, -1) for n in names], dtype=torch.long), here)
    layer.mixed_batch_dim = batch_dim


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class ParamSummary:
    trainable: int
    total: int
    adapter: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable params: {self.trainable:,} of {self.total:,} ({pct:.3f}%); adapter params: {self.adapter:,}"


def param_summary(model: nn.Module) -> ParamSummary:
    """Trainable vs total parameter counts (adapter parameters of every adapter counted too)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = sum(
        p.numel() for _, layer in flora_layers(model) for a in layer.adapter_names for p in layer._tensors_of(a)
    )
    return ParamSummary(trainable, total, adapter)


# --------------------------------------------------------------------------- save / load


def config_to_peft_dict(cfg: FLoRAConfig, layer_info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The adapter_config.json of one adapter (PEFT's schema, ``peft_type`` "FLORA")."""
    d = cfg.to_dict()
    return {
        "peft_type": PEFT_TYPE,
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": d["rank"],
        "kernel_r": d["kernel_rank"],
        "scale": d["scale"],
        "flora_dropout": d["dropout"],
        "target_modules": d["target_modules"],
        "exclude_modules": d["exclude_modules"],
        "modules_to_save": d["modules_to_save"],
        "rank_pattern": d["rank_pattern"],
        "scale_pattern": d["scale_pattern"],
        "strategy": d["strategy"],
        "backend": d["backend"],
        "lean_memory": d["lean_memory"],
        "init_weights": d["init_weights"],
        "layer_info": layer_info,
        "flora_format_version": FORMAT_VERSION,
    }


_PEFT_TO_CFG = {
    "r": "rank", "kernel_r": "kernel_rank", "scale": "scale", "flora_dropout": "dropout",
    "target_modules": "target_modules", "exclude_modules": "exclude_modules", "modules_to_save": "modules_to_save",
    "rank_pattern": "rank_pattern", "scale_pattern": "scale_pattern", "strategy": "strategy", "backend": "backend",
    "lean_memory": "lean_memory",
    "init_weights": "init_weights",
}


def config_from_peft_dict(d: dict[str, Any]) -> tuple[FLoRAConfig, dict[str, dict[str, Any]]]:
    """Inverse of ``config_to_peft_dict``: (FLoRAConfig, layer_info). PEFT bookkeeping keys are
    ignored; a file of another PEFT method raises."""
    if d.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{CONFIG_NAME}: expected peft_type {PEFT_TYPE!r}, got {d.get('peft_type')!r}")
    kw = {}
    for k, v in _PEFT_TO_CFG.items():
        if d.get(k) is not None:
            kw[v] = sorted(v_) if isinstance((v_ := d[k]), (set, frozenset)) else v_
    return FLoRAConfig.from_dict(kw), dict(d.get("layer_info") or {})


def _adapter_dirs(path: str | os.PathLike, adapter_name: str | None) -> dict[str, str]:
    """{adapter name: folder} found under ``path`` (PEFT's layout)."""
    path = os.fspath(path)
    if adapter_name is not None:
        sub = os.path.join(path, adapter_name)
        if adapter_name != DEFAULT_ADAPTER and os.path.isfile(os.path.join(sub, CONFIG_NAME)):
            return {adapter_name: sub}
        if os.path.isfile(os.path.join(path, CONFIG_NAME)):
            return {adapter_name: path}
        raise FileNotFoundError(f"no {CONFIG_NAME} for adapter {adapter_name!r} in {path} or {sub}")
    found = {}
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        found[DEFAULT_ADAPTER] = path
    if os.path.isdir(path):
        for entry in sorted(os.listdir(path)):
            if os.path.isfile(os.path.join(path, entry, CONFIG_NAME)):
                found[entry] = os.path.join(path, entry)
    if not found:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path} or its subfolders")
    return found


def adapter_layer_info(model: nn.Module, name: str) -> dict[str, dict[str, Any]]:
    return {
        real: {
            "type": type(layer.base_layer).__name__,
            "weight_shape": list(layer.weight_modes().shape),
            "ranks": list(layer.flora_settings[name].ranks),
            "scale": layer.flora_settings[name].scale,
        }
        for real, layer in flora_layers(model)
        if name in layer.flora_settings
    }


def adapter_state(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s tensors and the modules_to_save tensors, keyed as in the saved file."""
    configs, _ = _state(model)
    out: dict[str, Tensor] = {}
    for real, layer in flora_layers(model):
        if name in layer.flora_settings:
            core, factors = layer.tensors(name)
            out[f"{KEY_PREFIX}{real}.flora_core"] = core
            for n, f in enumerate(factors):
                out[f"{KEY_PREFIX}{real}.flora_u{n}"] = f
    for mod in _saved_names(model, configs[name].modules_to_save):
        for pname, p in model.get_submodule(resolve_name(model, mod)).state_dict(keep_vars=True).items():
            out[f"{KEY_PREFIX}{mod}.{pname}"] = p
    return out


def save_flora(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write adapter(s) in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``
    (adapter and modules_to_save tensors only); "default" at ``path``, any other adapter in
    ``path/<name>``. ``adapter_name=None`` saves every adapter."""
    configs, _ = _state(model)
    if not configs:
        raise ValueError("save_flora: the model has no FLoRA adapters (call inject_flora first)")
    names = list(configs) if adapter_name is None else [adapter_name]
    _check_adapter_names(model, names)
    for name in names:
        folder = os.fspath(path) if name == DEFAULT_ADAPTER else os.path.join(path, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(config_to_peft_dict(configs[name], adapter_layer_info(model, name)), f, indent=2)
        tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state(model, name).items()}
        save_file(tensors, os.path.join(folder, WEIGHTS_NAME))


def targets_from_layer_info(cfg: FLoRAConfig, info: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """install_adapters targets reproducing a saved adapter's modules, ranks and scales."""
    return {logical_name(real): _target_from_meta(cfg, meta) for real, meta in info.items()}


def _target_from_meta(cfg: FLoRAConfig, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "rank": tuple(meta["ranks"]), "scale": float(meta["scale"]), "dropout": cfg.dropout,
        "strategy": cfg.strategy, "backend": cfg.backend, "lean_memory": cfg.lean_memory,
    }


def _validate(
    model: nn.Module, name: str, cfg: FLoRAConfig, info: dict[str, dict[str, Any]], tensors: dict[str, Tensor]
) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[Tensor, list[Tensor]]]]:
    """Check a loaded adapter against the model; return (targets, tensors) for install (or
    for an in-place load when the model has adapter ``name`` already)."""
    configs, _ = _state(model)
    existing = name in configs
    if existing:
        have = {logical_name(r) for r, layer in flora_layers(model) if name in layer.flora_settings}
        saved = {logical_name(r) for r in info}
        if have != saved:
            raise ValueError(f"adapter {name!r}: modules differ: saved {sorted(saved)}, model has {sorted(have)}")
    if any(layer.merged for _, layer in flora_layers(model)):
        raise ValueError("load_flora: the model's adapters are merged; call unmerge_flora first")
    targets, adapters, expected = {}, {}, {}
    for real, meta in info.items():
        logical = logical_name(real)
        try:
            m = model.get_submodule(resolve_name(model, logical))
        except (ValueError, AttributeError):
            raise ValueError(f"adapter module {logical!r} not found in the model") from None
        base = m.base_layer if isinstance(m, FLoRALayer) else m
        cls = layer_class_for(base)
        if type(base).__name__ != meta["type"] and not (
            meta["type"] in LINEAR_TYPE_NAMES and cls is not None and issubclass(cls, FLoRALinear)
        ):
            raise ValueError(f"adapter module {logical!r}: expected a {meta['type']}, got {type(base).__name__}")
        if cls is None:
            raise ValueError(f"adapter module {logical!r}: {type(base).__name__} is not supported ({SUPPORTED})")
        shape = tuple(m.weight_modes().shape) if isinstance(m, FLoRALayer) else None
        if shape is None:
            shape = tuple(cls.weight_shape_of(base))
        if list(shape) != list(meta["weight_shape"]):
            raise ValueError(
                f"adapter module {logical!r}: saved for weight shape {tuple(meta['weight_shape'])}, the model's is {shape}"
            )
        ranks = tuple(meta["ranks"])
        if existing and m.flora_settings[name].ranks != ranks:
            raise ValueError(
                f"adapter module {logical!r}: saved ranks {ranks}, the model's layer has {m.flora_settings[name].ranks}"
            )
        key = f"{KEY_PREFIX}{real}"
        expected[f"{key}.flora_core"] = ranks
        for n, (dim, r) in enumerate(zip(meta["weight_shape"], ranks)):
            expected[f"{key}.flora_u{n}"] = (dim, r)
        targets[logical] = _target_from_meta(cfg, meta)
    for mod in _saved_names(model, cfg.modules_to_save):
        for pname, p in model.get_submodule(resolve_name(model, mod)).state_dict(keep_vars=True).items():
            expected[f"{KEY_PREFIX}{mod}.{pname}"] = tuple(p.shape)
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(f"{WEIGHTS_NAME}: missing tensor {key!r} (expected shape {shape})")
        if tuple(tensors[key].shape) != tuple(shape):
            raise ValueError(f"{key}: expected shape {tuple(shape)}, the file has {tuple(tensors[key].shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{WEIGHTS_NAME}: unexpected tensors {extra}")
    for real, meta in info.items():
        key = f"{KEY_PREFIX}{real}"
        adapters[logical_name(real)] = (
            tensors[f"{key}.flora_core"], [tensors[f"{key}.flora_u{n}"] for n in range(len(meta["ranks"]))]
        )
    return targets, adapters


def read_adapter_folder(folder: str | os.PathLike) -> tuple[FLoRAConfig, dict[str, Any], dict[str, Tensor]]:
    """(config, layer_info, tensors) of one adapter folder as ``save_flora`` writes it
    (adapter_config.json + adapter_model.safetensors)."""
    with open(os.path.join(folder, CONFIG_NAME)) as f:
        cfg, info = config_from_peft_dict(json.load(f))
    return cfg, info, load_file(os.path.join(folder, WEIGHTS_NAME))


def load_flora(
    model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, low_cpu_mem_usage: bool = False
) -> nn.Module:
    """Load adapters written by ``save_flora`` (or PEFT's ``save_pretrained`` for FLoRA) under
    their names, injecting where the model has no FLoRA layer yet. ``adapter_name=None`` loads
    every adapter found (root: "default", subfolders: their names). An adapter the model has
    already (same modules and ranks) gets the file's tensors and scales in place.

    Everything is checked before anything changes: a missing module, a wrong module type, or a
    tensor of the wrong shape raises ``ValueError`` naming it and leaves the model untouched.
    The first adapter loaded into a model without adapters becomes active.
    ``low_cpu_mem_usage`` (PEFT's option): new adapters are created on the meta device and take
    the file's tensors without an initialized copy first.
    """
    loaded = []
    for name, folder in _adapter_dirs(path, adapter_name).items():
        cfg, info, tensors = read_adapter_folder(folder)
        targets, adapters = _validate(model, name, cfg, info, tensors)
        loaded.append((name, cfg, targets, adapters, tensors))
    for name, cfg, targets, adapters, tensors in loaded:
        configs, active = _state(model)
        if name in configs:  # in place: same modules and ranks (checked), tensors and scales from the file
            with torch.no_grad():
                for logical, (core, factors) in adapters.items():
                    layer = model.get_submodule(resolve_name(model, logical))
                    dst_core, dst_factors = layer.tensors(name)
                    dst_core.copy_(core)
                    for d, src in zip(dst_factors, factors, strict=True):
                        d.copy_(src)
                    layer.set_scale(targets[logical]["scale"], name)
            set_state(model, {**configs, name: cfg}, active)
        else:
            install_adapters(
                model, targets, name, cfg, tensors=adapters, activate=not configs, low_cpu_mem_usage=low_cpu_mem_usage
            )
        with torch.no_grad():
            for mod in _saved_names(model, cfg.modules_to_save):
                state = model.get_submodule(resolve_name(model, mod)).state_dict(keep_vars=True)
                for pname, p in state.items():
                    p.copy_(tensors[f"{KEY_PREFIX}{mod}.{pname}"])
    return model
