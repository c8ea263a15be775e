"""Hot-swapping: another adapter's weights into a model, in place, without recompiling it.

    fk.prepare_hotswap(model, target_rank=16)         # after the first adapter, before torch.compile
    model = torch.compile(model)
    y_a = model(x)
    fk.hotswap_adapter(model, "adapter_b")            # a save_flora folder or a state dict
    y_b = model(x)                                    # no recompile

``prepare_hotswap`` pads every adapter's core and factors with zeros to fixed ranks: the added
core entries are zero, so dW = s * G x_0 U_0 ... is unchanged exactly, and every layer type
(Linear, Conv1D, ConvNd, ConvTransposeNd, Embedding, MultiheadAttention) pads the same way. It
also makes each adapter hold its scale as a tensor (``FLoRALayer.hold_scale_as_tensor``), which
the forward multiplies into the core, so a new scale is a new value of the same tensor.
``hotswap_adapter`` then copies a new adapter's tensors (zero-padded to the prepared ranks) and
scales into the existing parameters and buffers: same tensors, same shapes, no new constants, so
a compiled model runs the new adapter without recompiling. Its targets must be the same modules
and its ranks at most the prepared ones; everything is checked before anything changes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .config import Rank
from .layers import FLoRALayer, flora_layers
from .model import CONFIG_NAME, KEY_PREFIX, logical_name, read_adapter_folder

_KEY = re.compile(r"^(?P<module>.+)\.flora_(?:core|u(?P<mode>\d+))(?:\.(?P<adapter>[^.]+))?$")


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its ``_orig_mod``), or ``model`` itself."""
    return getattr(model, "_orig_mod", model)


def _padded(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``t`` in the leading corner of a zero tensor of ``shape``."""
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _prepared_ranks(layer: FLoRALayer, name: str, target_rank: Rank | None,
                    target_kernel_rank: Rank | None) -> tuple[int, ...]:
    """The ranks adapter ``name`` is padded to: ``target_rank`` for the channel modes,
    ``target_kernel_rank`` (default: the full kernel) for the spatial ones, clamped to the mode
    sizes; the adapter's own ranks when ``target_rank`` is None."""
    s = layer.flora_settings[name]
    if target_rank is None:
        return s.ranks
    ranks = layer.make_settings(target_rank, target_kernel_rank, s.scale, s.dropout, s.strategy, s.backend).ranks
    if any(r < have for r, have in zip(ranks, s.ranks)):
        raise ValueError(
            f"prepare_hotswap: adapter {name!r} has ranks {s.ranks} on a {type(layer).__name__}, above the target "
            f"ranks {ranks}; expected target_rank (and target_kernel_rank) at least the adapters' ranks"
        )
    return ranks


@torch.no_grad()
def _pad_adapter(layer: FLoRALayer, name: str, ranks: tuple[int, ...]) -> None:
    """Adapter ``name`` zero-padded to ``ranks`` (new parameters), its scale held as a tensor."""
    core, factors = layer.tensors(name)
    padded = tuple(core.shape) != ranks
    if padded:
        layer.flora_core[name] = nn.Parameter(_padded(core.detach(), ranks), requires_grad=core.requires_grad)
        for n, (f, r) in enumerate(zip(factors, ranks)):
            getattr(layer, f"flora_u{n}")[name] = nn.Parameter(_padded(f.detach(), (f.shape[0], r)),
                                                             requires_grad=f.requires_grad)
        layer.flora_settings[name] = replace(layer.flora_settings[name], ranks=ranks)
    if layer.scale_tensor(name) is None:
        layer.hold_scale_as_tensor(name)  # the change event, after the padding too
    elif padded:
        layer._changed()


def prepare_layers(model: nn.Module, target_rank: Rank | None = None, target_kernel_rank: Rank | None = None) -> int:
    """``prepare_hotswap`` without its checks on the model: returns the number of adapters prepared."""
    plan = [
        (layer, name, _prepared_ranks(layer, name, target_rank, target_kernel_rank))
        for _, layer in flora_layers(unwrap_compiled(model)) for name in layer.adapter_names
    ]  # every target checked before any layer changes
    for layer, name, ranks in plan:
        _pad_adapter(layer, name, ranks)
    return len(plan)


def prepare_hotswap(model: nn.Module, target_rank: Rank | None = None, target_kernel_rank: Rank | None = None) -> None:
    """Make ``model``'s adapters hot-swappable without recompiling: pad every adapter's core and
    factors with zeros to ``target_rank`` (int or (r_out, r_in), the channel modes) and
    ``target_kernel_rank`` (default: the full kernel), clamped to each mode's size, so dW is
    unchanged exactly; hold every scale as a tensor. ``target_rank=None`` keeps the ranks
    (then only adapters of at most the current ranks can be swapped in).

    Call it after the first adapter is loaded and before ``torch.compile`` (and before building
    an optimizer: padded adapters are new parameters).

    Raises:
        ValueError: the model is compiled already, has no FLoRA adapters, or an adapter's ranks
            exceed the targets.
    """
    if unwrap_compiled(model) is not model:
        raise ValueError("prepare_hotswap: expected a model that is not compiled yet; call it before torch.compile")
    if prepare_layers(model, target_rank, target_kernel_rank) == 0:
        raise ValueError("prepare_hotswap: the model has no FLoRA adapters; load the first adapter, then prepare")


# --------------------------------------------------------------------------- hotswap


def _read_source(source: Any, layer_info: Mapping[str, Any] | None) -> tuple[Mapping[str, Tensor], Mapping[str, Any]]:
    """(state dict, layer_info) of a save_flora folder, or of a state dict (+ its layer_info)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise FileNotFoundError(f"{path}: expected an adapter folder with {CONFIG_NAME} (as fk.save_flora writes)")
        _, info, tensors = read_adapter_folder(path)
        return tensors, info
    if isinstance(source, Mapping):
        return source, layer_info or {}
    raise TypeError(f"path_or_state_dict: expected an adapter folder or a state dict, got {type(source).__name__}")


def _sort_tensors(state: Mapping[str, Tensor]) -> dict[str, dict[int | None, tuple[str, Tensor]]]:
    """{logical module: {None: core, n: factor n}} of FLoRA keys ``[base_model.model.]<m>.flora_core``
    / ``.flora_u<n>`` (optionally ``.<adapter>`` after them, as in a model's state_dict)."""
    out: dict[str, dict[int | None, tuple[str, Tensor]]] = {}
    suffixes = set()
    for key, t in state.items():
        m = _KEY.match(key.removeprefix(KEY_PREFIX))
        if m is None:
            raise ValueError(
                f"hotswap: unexpected key {key!r}; expected adapter tensors <module>.flora_core / <module>.flora_u<n> "
                "(hotswap swaps adapter tensors only, not modules_to_save)"
            )
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{key}: expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        suffixes.add(m.group("adapter"))
        mode = None if m.group("mode") is None else int(m.group("mode"))
        out.setdefault(logical_name(m.group("module")), {})[mode] = (key, t)
    if len(suffixes) > 1:
        raise ValueError(f"hotswap: the state dict holds several adapters {sorted(map(str, suffixes))}; pass one")
    return out


def _check_adapter(module: str, layer: FLoRALayer, name: str, parts: dict[int | None, tuple[str, Tensor]]) -> None:
    """Raise unless ``parts`` is a FLoRA adapter of ``layer`` that fits its (prepared) ranks."""
    shape = tuple(layer.weight_modes().shape)
    have = layer.flora_settings[name].ranks
    if None not in parts:
        raise ValueError(f"hotswap: module {module!r}: the new adapter lacks its flora_core")
    key, core = parts[None]
    if core.dim() != len(shape) or sorted(k for k in parts if k is not None) != list(range(len(shape))):
        raise ValueError(
            f"{key}: expected a core of {len(shape)} modes and factors flora_u0..flora_u{len(shape) - 1} for the "
            f"{type(layer).__name__}'s weight {shape}, got a core of shape {tuple(core.shape)} and factors "
            f"{sorted(k for k in parts if k is not None)}"
        )
    for n, (size, r, prepared) in enumerate(zip(shape, core.shape, have)):
        fkey, f = parts[n]
        if tuple(f.shape) != (size, r):
            raise ValueError(f"{fkey}: expected shape {(size, r)} (mode size, the core's rank), got {tuple(f.shape)}")
        if r > prepared:
            raise ValueError(
                f"{key}: rank {r} of mode {n} exceeds the {prepared} this layer holds (ranks {have}); call "
                "fk.prepare_hotswap(model, target_rank=...) with ranks at least the largest adapter's, before "
                "compiling"
            )


def _check_targets(model: nn.Module, adapter_name: str, tensors: Mapping[str, Any]) -> dict[str, FLoRALayer]:
    layers = {logical_name(r): layer for r, layer in flora_layers(model) if adapter_name in layer.flora_settings}
    if not layers:
        raise KeyError(f"hotswap: the model has no adapter {adapter_name!r}")
    missing, extra = sorted(set(layers) - set(tensors)), sorted(set(tensors) - set(layers))
    if missing or extra:
        raise ValueError(
            f"hotswap: the new adapter's targets differ from adapter {adapter_name!r}'s: it lacks {missing} and adds "
            f"{extra}; hotswap needs the same modules (load it with fk.load_flora under another name instead)"
        )
    merged = sorted(n for n, layer in layers.items() if adapter_name in layer.merged_adapters)
    if merged:
        raise ValueError(f"hotswap: adapter {adapter_name!r} is merged in {merged}; call fk.unmerge_flora first")
    return layers


def _scales(layer_info: Mapping[str, Any], layers: Mapping[str, FLoRALayer]) -> dict[str, float]:
    """{logical module: scale} from a layer_info ({real name: {"scale": s, ...}})."""
    scales = {}
    for real, meta in layer_info.items():
        module = logical_name(real)
        if module not in layers:
            raise ValueError(f"hotswap: layer_info names module {module!r}, which the new adapter's tensors do not")
        s = meta.get("scale") if isinstance(meta, Mapping) else None
        if not isinstance(s, (int, float)) or isinstance(s, bool):
            raise TypeError(f"hotswap: layer_info[{real!r}]['scale']: expected a float, got {s!r}")
        scales[module] = float(s)
    return scales


@torch.no_grad()
def hotswap_adapter(
    model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Tensor], adapter_name: str = "default",
    *, layer_info: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Replace adapter ``adapter_name``'s tensors and scales by another adapter's, in place.

    Args:
        model: a model (or ``torch.compile`` of one) holding adapter ``adapter_name``; prepared
            with ``prepare_hotswap`` for swaps without recompiling.
        path_or_state_dict: a folder written by ``fk.save_flora`` / PEFT's ``save_pretrained``
            for FLoRA (its scales come from its adapter_config.json), or a state dict with keys
            ``[base_model.model.]<module>.flora_core`` / ``.flora_u<n>`` (optionally followed by
            ``.<adapter>``, as in a model's state_dict).
        adapter_name: the adapter replaced; its name stays.
        layer_info: for a state dict, ``{module: {"scale": s}}`` (adapter_config.json's
            ``layer_info``); without it the scales stay as they are.

    Each new core and factor is copied into the existing parameters, zero-padded to their ranks
    (exact). Dropout, strategy and backend stay the adapter's. Returns ``model``.

    Raises:
        KeyError: no adapter ``adapter_name``.
        ValueError: the new adapter targets other modules, a tensor has the wrong shape, a rank
            exceeds the prepared one, or the adapter is merged; nothing is changed then.
    """
    inner = unwrap_compiled(model)
    state, info = _read_source(path_or_state_dict, layer_info)
    tensors = _sort_tensors(state)
    layers = _check_targets(inner, adapter_name, tensors)
    for module, parts in tensors.items():
        _check_adapter(module, layers[module], adapter_name, parts)
    scales = _scales(info, layers)
    for module, parts in tensors.items():
        layer = layers[module]
        core, factors = layer.tensors(adapter_name)
        for dst, (_, src) in zip([core, *factors], [parts[None], *(parts[n] for n in range(len(factors)))]):
            dst.zero_()
            dst[tuple(slice(0, n) for n in src.shape)].copy_(src)
        if module in scales:
            layer.set_scale(scales[module], adapter_name)  # fills the held scale tensor: no change event
    return model


__all__ = ["hotswap_adapter", "prepare_hotswap"]
