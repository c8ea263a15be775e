"""Exact import of LyCORIS LoRA/LoCon adapters (optionally Tucker-decomposed) as FLoRA layers,
and export of FLoRA adapters in that (kohya/LyCORIS) format.

LyCORIS (package ``lycoris-lora``) saves one flat state dict. Each adapted module ``name`` is
keyed ``{prefix}_{name with "." -> "_"}`` (prefix ``lycoris`` by default; kohya-style files
use e.g. ``lora_unet``), followed by

    .lora_down.weight   Linear (r, in); Conv (r, in/groups, *k), or (r, in/groups, 1...) with Tucker
    .lora_mid.weight    Tucker only: (r, r, *k)
    .lora_up.weight     Linear (out, r); Conv (out, r, 1...)
    .alpha              scalar; scale = alpha / r (alpha missing or 0 means alpha = r)

and its LoCon layer adds the weight delta with the base op's own stride/padding/dilation/groups:

    dW = scale * up @ down                                 (no mid; down flattened to (r, -1))
    dW[o, i, k...] = scale * sum_ab up[o, a] mid[a, b, k...] down[b, i]      (Tucker)

That is a FLoRA adapter (docs/ARCHITECTURE.md, Conventions) exactly:

- Tucker: ``U_out = up``, ``U_in = down^T``, ``G = mid``, kernel factors ``I_k``, ``s = scale``
  (when r > in/groups, e.g. depthwise convs, ``fit_ranks`` below brings the input rank to
  in/groups).
- plain LoCon conv: ``U_out = up``, ``G = down`` (r, in/groups, *k), ``U_in = I``, ``U_k = I``
  (the input and kernel ranks grow to full size).
- Linear: ``U_out = up``, ``U_in = down^T``, ``G = I_r``.

A rank above what a mode allows (r = 8 on a 3-output head) is re-decomposed exactly at the
largest ranks the layer allows, in the factors' span (``fit_ranks``). Linear and ConvNd
subclasses (e.g. timm's ``Linear``) are accepted like their base classes.

Not supported (raise, naming the key): other LyCORIS algorithms (LoHa ``hada_*``, LoKr
``lokr_*``, ...), DoRA (``dora_scale``), norms, a conv with a non-zero padding mode and padding (LyCORIS's
delta conv pads with zeros). LyCORIS's ``bypass_mode`` forward is the same function except
for dilated and grouped convs, where it is not a weight delta; the import follows the default
(weight-delta) forward, which is also what LyCORIS merges.

Export (``export_lycoris`` / ``to_lycoris``), exact, scale folded into ``up`` (alpha = r):

- Conv with a kernel larger than 1 (``mid=True``): ``mid = G x_2 U_k1 ...`` (r_out, r_in, *k)
  zero-padded to (r, r, *k) with r = max(r_out, r_in), its first index pairing with ``up``;
  ``up = s * U_out`` (out, r, 1...), ``down = U_in^T`` (r, in/groups, 1...), zero-padded.
  Read by lycoris-lora and, for Conv2d, A1111 and ComfyUI; not by diffusers.
- Linear, 1x1 convs, and every conv with ``mid=False``: plain LoRA/LoCon with the core folded
  in (``up`` (out, r[, 1...]), ``down`` (r, in[/groups, *k])), r = min(r_out, r_in * prod of
  the kernel ranks); readable by every tool (diffusers included).
- Refused: merged adapters, non-zero padding modes with padding (the delta conv pads with
  zeros), key collisions between module names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..convspec import ConvSpec
from ..layers import FLoRALayer, FLoRALinear, flora_layers
from ..reference import core_kernel
from .peft import (
    AdapterSpec,
    ImportPlan,
    _fold_conv_group,
    _fold_linear,
    _supported,
    _supported_names,
    check_float_tensor,
    check_no_flora,
    check_shape,
    export_kind,
    fit_ranks,
    identity,
    imported_config,
    install,
)

LYCORIS_PREFIX = "lycoris"
KOHYA_PREFIXES = ("lycoris", "lora_unet", "lora_te", "lora_te1", "lora_te2")
_PARAMS = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha")
_OTHER_ALGOS = {
    "hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA (weight decomposition)", "oft_": "OFT",
    "w_norm": "norm adapters", "b_norm": "norm adapters", "on_input": "(IA)^3", "weight": "full fine-tuning",
    "lora_A": "GLoRA", "boft_": "BOFT", "diff": "full fine-tuning",
}


def _lycoris_name(prefix: str, name: str) -> str:
    return (f"{prefix}_{name}" if prefix else name).replace(".", "_")


def _read(path_or_state: str | os.PathLike | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(path_or_state, Mapping):
        return path_or_state
    if not isinstance(path_or_state, (str, os.PathLike)):
        raise TypeError(f"path_or_state: expected a file path or a state dict, got {type(path_or_state).__name__}")
    path = os.fspath(path_or_state)
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _unsupported(key: str, t: object) -> ValueError:
    param = key.split(".", 1)[1] if "." in key else key
    algo = next((v for k, v in _OTHER_ALGOS.items() if param.startswith(k)), None)
    shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
    what = f"a LyCORIS {algo} tensor" if algo else "an unknown key"
    return ValueError(
        f"{key}: {what} (shape {shape}); only LoRA/LoCon keys {list(_PARAMS)} (Tucker optional) can be imported"
    )


def _check_zero_padding(name: str, base: nn.Module) -> None:
    spec = ConvSpec.of(base)
    if spec.padding_mode != "zeros" and any(x for lo_hi in spec.pads for x in lo_hi):
        raise ValueError(
            f"{name}: LyCORIS's delta conv pads with zeros, but the base {type(base).__name__} uses "
            f"padding_mode={spec.padding_mode!r} with padding {spec.pads}: not expressible exactly"
        )


def plan_lycoris(
    model: nn.Module, path_or_state: str | os.PathLike | Mapping[str, Tensor], prefix: str = LYCORIS_PREFIX
) -> ImportPlan:
    """Validate a LyCORIS LoRA/LoCon state dict against ``model`` and compute the exact FLoRA
    tensors (see the module docstring). Touches nothing."""
    state = _read(path_or_state)
    by_lyco: dict[str, list[str]] = {}
    for n, m in model.named_modules():
        if n:
            by_lyco.setdefault(_lycoris_name(prefix, n), []).append(n)
    groups: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key, t in state.items():
        lyco, _, param = key.partition(".")
        if param not in _PARAMS:
            raise _unsupported(key, t)
        names = by_lyco.get(lyco)
        if not names:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"{key}: unknown key (shape {shape}): no module of the model is called {lyco!r} with prefix "
                f"{prefix!r} (LyCORIS names are '<prefix>_<module path with _ for .>')"
            )
        if len(names) > 1:
            raise ValueError(f"{key}: {lyco!r} is ambiguous, it names the modules {names}")
        groups.setdefault(names[0], {})[param] = (key, check_float_tensor(key, t))
    if not groups:
        raise ValueError("import_lycoris: the state dict holds no LyCORIS adapter")

    modules = dict(model.named_modules())
    adapters = []
    for name, p in sorted(groups.items()):
        lyco = _lycoris_name(prefix, name)
        for need in ("lora_down.weight", "lora_up.weight"):
            if need not in p:
                raise ValueError(f"{lyco}.{need}: missing (the module has {sorted(p)})")
        key_d, down = p["lora_down.weight"]
        key_u, up = p["lora_up.weight"]
        mid_kt = p.get("lora_mid.weight")
        base = modules[name]
        if not _supported(base):
            raise TypeError(f"{key_d}: module {name!r} is a {type(base).__name__}; expected one of {_supported_names()}")
        w = tuple(base.weight.shape)
        if down.dim() < 2:
            raise ValueError(f"{key_d}: expected shape (r, {w[1]}, ...), got {tuple(down.shape)}")
        r = down.shape[0]
        if "alpha" in p:
            key_a, alpha_t = p["alpha"]
            if alpha_t.numel() != 1:
                raise ValueError(f"{key_a}: expected a scalar, got shape {tuple(alpha_t.shape)}")
            alpha = float(alpha_t)
        else:
            alpha = 0.0
        scale = (alpha if alpha else float(r)) / r
        if isinstance(base, nn.Linear):
            check_shape(key_d, down, (r, w[1]), f" (r={r}, in_features={w[1]})")
            check_shape(key_u, up, (w[0], r), f" (out_features={w[0]}, r={r})")
            if mid_kt is not None:
                raise ValueError(f"{mid_kt[0]}: a Linear adapter has no mid (shape {tuple(mid_kt[1].shape)})")
            adapters.append(fit_ranks(AdapterSpec(name, identity(r), [up.double(), down.double().t()], scale), w))
            continue
        _check_zero_padding(name, base)
        ks, ones, cg = tuple(w[2:]), (1,) * (len(w) - 2), w[1]
        check_shape(key_u, up, (w[0], r, *ones), f" (out_channels={w[0]}, r={r})")
        u_out = up.double().reshape(w[0], r)
        kernel_eye = [identity(k) for k in ks]
        if mid_kt is None:
            check_shape(key_d, down, (r, cg, *ks), f" (r={r}, in_channels/groups={cg}, kernel {ks})")
            adapters.append(fit_ranks(AdapterSpec(name, down.double(), [u_out, identity(cg), *kernel_eye], scale), w))
            continue
        key_m, mid = mid_kt
        check_shape(key_d, down, (r, cg, *ones), f" (r={r}, in_channels/groups={cg}, Tucker 1x1 down)")
        check_shape(key_m, mid, (r, r, *ks), f" (r={r}, kernel {ks})")
        d = down.double().reshape(r, cg)
        adapters.append(fit_ranks(AdapterSpec(name, mid.double(), [u_out, d.t(), *kernel_eye], scale), w))
    return ImportPlan(adapters)


def import_lycoris(
    model: nn.Module, path_or_state: str | os.PathLike | Mapping[str, Tensor], *, prefix: str = LYCORIS_PREFIX,
    dropout: float = 0.0, strategy: str = "auto", backend: str = "auto",
) -> nn.Module:
    """Import a LyCORIS LoRA/LoCon adapter (``.safetensors``/``.pt`` file or state dict) into
    ``model`` (the base model it was trained on, without adapters) as FLoRA layers.

    Args:
        prefix: the LyCORIS name prefix (``lycoris``; ``""`` for bare module names).
        dropout, strategy, backend: for the created layers.

    The result computes LyCORIS's (weight-delta) function exactly, up to float rounding; the
    ranks per layer are given in the module docstring. Every other parameter is frozen, as after
    ``inject_flora``.

    Raises:
        ValueError / TypeError: naming the key and both shapes, before anything is changed.
    """
    check_no_flora(model, "import_lycoris")
    plan = plan_lycoris(model, path_or_state, prefix)
    return install(model, plan, imported_config(plan, dropout, strategy, backend))


# ----------------------------------------------------------------------------- export


def _lycoris_tensors(layer: FLoRALayer, mid: bool) -> dict[str, Tensor]:
    """{"lora_up.weight", "lora_down.weight"[, "lora_mid.weight"], "alpha"} for one layer (float64)."""
    w = tuple(layer.weight_modes().shape)
    ones = (1,) * (len(w) - 2)
    s = layer.scale
    if isinstance(layer, FLoRALinear):
        down, up = _fold_linear(layer)
        return {"lora_up.weight": s * up, "lora_down.weight": down, "alpha": torch.tensor(float(down.shape[0]))}
    if not mid or math.prod(w[2:]) == 1:
        down, up = _fold_conv_group(layer)
        r = down.shape[0]
        return {"lora_up.weight": (s * up).reshape(w[0], r, *ones), "lora_down.weight": down,
                "alpha": torch.tensor(float(r))}
    core = layer.core.detach().double()
    fs = [f.detach().double() for f in layer.factors]
    r_out, r_in = core.shape[:2]
    r = max(r_out, r_in)
    k = core_kernel(core, fs)  # (r_out, r_in, *k)
    m = k.new_zeros(r, r, *k.shape[2:])
    m[:r_out, :r_in] = k
    up = fs[0].new_zeros(w[0], r)
    up[:, :r_out] = s * fs[0]
    down = fs[1].new_zeros(r, w[1])
    down[:r_in] = fs[1].t()
    return {"lora_up.weight": up.reshape(w[0], r, *ones), "lora_down.weight": down.reshape(r, w[1], *ones),
            "lora_mid.weight": m, "alpha": torch.tensor(float(r))}


def to_lycoris(
    model: nn.Module | Mapping[str, nn.Module], prefix: str = LYCORIS_PREFIX, *, mid: bool = True,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """The kohya/LyCORIS state dict of the FLoRA adapters of ``model`` (see the module docstring).

    Args:
        model: a model with FLoRA layers, or ``{prefix: model}`` for one file covering several
            models (e.g. ``{"lora_unet": unet, "lora_te1": te1, "lora_te2": te2}``).
        prefix: key prefix (``lycoris``, ``lora_unet``, ``lora_te``, ``lora_te1``, ``lora_te2``
            are what the tools use) when ``model`` is one module.
        mid: write ``lora_mid`` for kernels larger than 1 (compact); False writes plain LoCon.
        dtype: of the weights written (default: each adapter's dtype); ``alpha`` is float32.

    Returns:
        ``{"<prefix>_<module path, '.' -> '_'>.lora_up.weight": ..., ...}`` on the CPU.
    """
    models = dict(model) if isinstance(model, Mapping) else {prefix: model}
    out: dict[str, Tensor] = {}
    owner: dict[str, str] = {}
    for pre, m in models.items():
        if not isinstance(pre, str) or not isinstance(m, nn.Module):
            raise TypeError(f"model: expected a module or a {{prefix: module}} mapping, got {pre!r}: {type(m).__name__}")
        layers = flora_layers(m)
        if not layers:
            raise ValueError(f"export_lycoris: the model for prefix {pre!r} has no FLoRA layers (call inject_flora)")
        for name, layer in layers:
            if layer.merged:
                raise ValueError(f"{name}: the adapter is merged into the base weight; call unmerge_flora first")
            if export_kind(name, layer, "LyCORIS") == "conv":
                _check_zero_padding(name, layer.base)
            lyco = _lycoris_name(pre, name)
            if lyco in owner:
                raise ValueError(f"export_lycoris: modules {owner[lyco]!r} and {pre}:{name!r} both map to key {lyco!r}")
            owner[lyco] = f"{pre}:{name}"
            dt = dtype or layer.core.dtype
            for param, t in _lycoris_tensors(layer, mid).items():
                t = t.float() if param == "alpha" else t.to(dt)
                out[f"{lyco}.{param}"] = t.detach().contiguous().cpu()
    return out


def export_lycoris(
    model: nn.Module | Mapping[str, nn.Module], path: str | os.PathLike, prefix: str = LYCORIS_PREFIX, *,
    mid: bool = True, dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Write ``to_lycoris(model, prefix, mid=mid, dtype=dtype)`` as one ``.safetensors`` file, loadable by
    lycoris-lora (``create_lycoris_from_weights``), kohya sd-scripts, A1111 and ComfyUI (see the
    module docstring for who reads ``lora_mid``) and by ``import_lycoris``. Returns the tensors."""
    tensors = to_lycoris(model, prefix, mid=mid, dtype=dtype)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


__all__ = ["KOHYA_PREFIXES", "LYCORIS_PREFIX", "export_lycoris", "import_lycoris", "plan_lycoris", "to_lycoris"]
