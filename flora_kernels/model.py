"""Model-level operations: inject, merge/unmerge/unload, save/load, parameter summary."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import FLoRAConfig, name_matches
from .layers import LAYER_FOR, FLoRALayer, flora_layers, wrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _layer_kwargs(cfg: FLoRAConfig) -> dict:
    return dict(
        rank=cfg.rank, kernel_rank=cfg.kernel_rank, scale=cfg.scale, dropout=cfg.dropout,
        strategy=cfg.strategy, backend=cfg.backend,
    )


def inject_flora(model: nn.Module, cfg: FLoRAConfig) -> nn.Module:
    """Wrap every targeted Linear/Conv1d/2d/3d of ``model`` in place and freeze the rest.

    Adapter parameters and the parameters of ``cfg.modules_to_save`` stay trainable. The
    config is kept as ``model.flora_config``. Returns ``model``.

    Raises:
        ValueError: nothing matched (the message lists the candidate module names).
        TypeError: a target module of an unsupported type (named explicitly).
    """
    if not isinstance(cfg, FLoRAConfig):
        raise TypeError(f"cfg: expected a FLoRAConfig, got {type(cfg).__name__}")
    if flora_layers(model):
        raise ValueError("model already has FLoRA layers; merge_and_unload it or load into it instead")
    saved = _saved_names(model, cfg)
    targets = []
    for name, module in model.named_modules():
        if not name or not cfg.matches(name) or any(name == s or name.startswith(s + ".") for s in saved):
            continue
        if type(module) in LAYER_FOR:
            targets.append(name)
        elif cfg.target_modules is not None:
            raise TypeError(
                f"target module {name!r}: unsupported module type {type(module).__name__}; expected one of "
                f"{', '.join(t.__name__ for t in LAYER_FOR)}"
            )
    if not targets:
        if type(model) in LAYER_FOR:
            raise ValueError(
                f"the model itself is a {type(model).__name__}: wrap it directly (e.g. fk.FLoRALinear(module)), "
                "inject_flora only replaces submodules"
            )
        candidates = [n for n, m in model.named_modules() if type(m) in LAYER_FOR]
        raise ValueError(
            f"target_modules={cfg.target_modules!r} matched no supported module; candidates: {candidates}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        _set_submodule(model, name, wrap(model.get_submodule(name), **_layer_kwargs(cfg)))
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.flora_config = cfg
    return model


def _saved_names(model: nn.Module, cfg: FLoRAConfig) -> list[str]:
    return [n for n, _ in model.named_modules() if n and name_matches(n, cfg.modules_to_save)]


def _trainable_state(model: nn.Module, cfg: FLoRAConfig | None = None) -> dict[str, Tensor]:
    """Adapter tensors (core, factors) and modules_to_save tensors, keyed by module path.

    ``cfg`` (default: ``model.flora_config``) says which modules are saved whole.
    """
    out: dict[str, Tensor] = {}
    for name, layer in flora_layers(model):
        out[f"{name}.core"] = layer.core
        for i, f in enumerate(layer.factors):
            out[f"{name}.factors.{i}"] = f
    cfg = cfg or getattr(model, "flora_config", None)
    if cfg is not None:
        for name in _saved_names(model, cfg):
            for pname, p in model.get_submodule(name).state_dict(keep_vars=True).items():
                out[f"{name}.{pname}"] = p
    return out


@dataclass(frozen=True)
class ParamSummary:
    trainable: int
    total: int
    adapter: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable params: {self.trainable:,} of {self.total:,} ({pct:.3f}%); adapter params: {self.adapter:,}"


def param_summary(model: nn.Module) -> ParamSummary:
    """Trainable vs total parameter counts (adapter parameters counted separately too)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = sum(p.numel() for _, layer in flora_layers(model) for p in [layer.core, *layer.factors])
    return ParamSummary(trainable, total, adapter)


def merge_flora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (outputs unchanged)."""
    for _, layer in flora_layers(model):
        layer.merge()
    return model


def unmerge_flora(model: nn.Module) -> nn.Module:
    """Undo ``merge_flora``: base weights restored within rounding."""
    for _, layer in flora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace every FLoRA layer by its (now merged) plain torch module."""
    for name, layer in flora_layers(model):
        layer.merge()
        _set_submodule(model, name, layer.base)
    if hasattr(model, "flora_config"):
        del model.flora_config
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block (e.g. the reference model in preference tuning).

    Unmerged adapters are bypassed; merged ones are unmerged for the block and merged again
    after it. The previous state is restored even if the block raises.
    """
    layers = [layer for _, layer in flora_layers(model)]
    state = [(layer.adapter_enabled, layer.merged) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.adapter_enabled = False
        yield model
    finally:
        for layer, (enabled, merged) in zip(layers, state):
            layer.adapter_enabled = enabled
            if merged:
                layer.merge()


def set_adapter_scale(model: nn.Module, scale: float) -> nn.Module:
    """Set s on every FLoRA layer (merged layers are re-merged with the new scale)."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    for _, layer in flora_layers(model):
        merged = layer.merged
        layer.unmerge()
        layer.scale = float(scale)
        if merged:
            layer.merge()
    return model


def save_flora(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter tensors only)."""
    layers = flora_layers(model)
    if not layers:
        raise ValueError("save_flora: the model has no FLoRA layers (call inject_flora first)")
    cfg = getattr(model, "flora_config", None) or FLoRAConfig()
    os.makedirs(path, exist_ok=True)
    meta = {
        "format": "flora_kernels",
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "modules": {
            name: {
                "type": type(layer.base).__name__,
                "weight_shape": list(layer.base.weight.shape),
                "ranks": list(layer.ranks),
                "scale": layer.scale,
            }
            for name, layer in layers
        },
    }
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)
    tensors = {k: v.detach().contiguous().cpu() for k, v in _trainable_state(model).items()}
    save_file(tensors, os.path.join(path, WEIGHTS_NAME))


def load_flora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by ``save_flora``; injects it first if ``model`` has none.

    Everything is checked before anything is changed: a missing module, a wrong module type,
    or a tensor of the wrong shape raises ``ValueError`` naming the key and both shapes, and
    leaves the model untouched.
    """
    with open(os.path.join(path, CONFIG_NAME)) as f:
        meta = json.load(f)
    if meta.get("format") != "flora_kernels":
        raise ValueError(f"{CONFIG_NAME}: expected format 'flora_kernels', got {meta.get('format')!r}")
    cfg = FLoRAConfig.from_dict(meta["config"])
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    present = dict(flora_layers(model))
    if any(layer.merged for layer in present.values()):
        raise ValueError("load_flora: the model's adapters are merged; call unmerge_flora first")
    modules = dict(model.named_modules())
    expected: dict[str, tuple[int, ...]] = {}
    for name, info in meta["modules"].items():
        m = present.get(name) or modules.get(name)
        if m is None:
            raise ValueError(f"adapter module {name!r} not found in the model")
        base = m.base if isinstance(m, FLoRALayer) else m
        if type(base).__name__ != info["type"]:
            raise ValueError(f"adapter module {name!r}: expected a {info['type']}, got {type(base).__name__}")
        if list(base.weight.shape) != info["weight_shape"]:
            raise ValueError(
                f"adapter module {name!r}: saved for weight shape {tuple(info['weight_shape'])}, "
                f"the model's is {tuple(base.weight.shape)}"
            )
        ranks = tuple(info["ranks"])
        if isinstance(m, FLoRALayer) and m.ranks != ranks:
            raise ValueError(f"adapter module {name!r}: saved ranks {ranks}, the model's layer has {m.ranks}")
        expected[f"{name}.core"] = ranks
        for i, (dim, r) in enumerate(zip(info["weight_shape"], ranks)):
            expected[f"{name}.factors.{i}"] = (dim, r)
    if present and set(present) != set(meta["modules"]):
        raise ValueError(
            f"adapter modules differ: saved {sorted(meta['modules'])}, model has {sorted(present)}"
        )
    for name in _saved_names(model, cfg):
        for pname, p in model.get_submodule(name).state_dict(keep_vars=True).items():
            expected[f"{name}.{pname}"] = tuple(p.shape)
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(f"{WEIGHTS_NAME}: missing tensor {key!r} (expected shape {shape})")
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{key}: expected shape {shape}, the file has {tuple(tensors[key].shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{WEIGHTS_NAME}: unexpected tensors {extra}")

    if not present:
        for name, info in meta["modules"].items():
            ranks = info["ranks"]
            kwargs = {**_layer_kwargs(cfg), "rank": tuple(ranks[:2]), "kernel_rank": tuple(ranks[2:]) or None}
            layer = wrap(modules[name], **{**kwargs, "scale": float(info["scale"])})
            _set_submodule(model, name, layer)
        for p in model.parameters():
            p.requires_grad_(False)
        for _, layer in flora_layers(model):
            for p in [layer.core, *layer.factors]:
                p.requires_grad_(True)
    else:
        for name, info in meta["modules"].items():
            present[name].scale = float(info["scale"])
    for name in _saved_names(model, cfg):
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.flora_config = cfg
    state = _trainable_state(model, cfg)  # the file's cfg: its keys are the ones validated above
    with torch.no_grad():
        for key, t in tensors.items():
            state[key].copy_(t)
    return model
