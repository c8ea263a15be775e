"""Exact import of LyCORIS LoRA/LoCon adapters (optionally Tucker-decomposed) as FLoRA layers.

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

That is a FLoRA adapter (DESIGN.md section 2) exactly:

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
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..convspec import ConvSpec
from .peft import (
    AdapterSpec,
    ImportPlan,
    check_float_tensor,
    check_no_flora,
    check_shape,
    identity,
    imported_config,
    install,
    _supported,
    _supported_names,
    fit_ranks,
)

LYCORIS_PREFIX = "lycoris"
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
        spec = ConvSpec.of(base)
        if spec.padding_mode != "zeros" and any(x for lo_hi in spec.pads for x in lo_hi):
            raise ValueError(
                f"{name}: LyCORIS's delta conv pads with zeros, but the base {type(base).__name__} uses "
                f"padding_mode={spec.padding_mode!r} with padding {spec.pads}: not expressible exactly"
            )
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


__all__ = ["LYCORIS_PREFIX", "import_lycoris", "plan_lycoris"]
