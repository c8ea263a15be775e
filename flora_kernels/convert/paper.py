"""Import adapters saved by the paper's public reference code into flora_kernels layers.

The public reference implementation of FLoRA (Si et al., arXiv 2405.14739) keeps, per
adapted layer, a sub-module ``flora_layer`` with

    param_G                 the core, shape (r_0, ..., r_{N-1})
    param_n, n = 0..N-1     the factor of mode n, shape (I_n, r_n)

in ITS mode order (in, out, k_1, ..., k_d): I_0 = in_features / in_channels,
I_1 = out_features / out_channels, I_{2+j} = kernel_size[j]. Its adapter weight is

    D      = G x_0 P_0 x_1 P_1 ... x_{N-1} P_{N-1}     shape (in, out, k...)
    dW_pap = s * D.transpose(0, 1)                     shape (out, in, k...)

(the contractions run mode 0 first, each consuming the leading rank mode of the running
tensor and appending the new full-size mode, which is the plain Tucker product above; the
transpose of the first two modes and the float scale ``s`` come last) and the layer computes
``base(x) + op(dropout(x), dW_pap)``. ``s`` is a hyper-parameter of its config and is not
stored in the state dict.

Transposing modes 0 and 1 of a Tucker tensor swaps the first two modes of the core and the
first two factors, so the exact map onto this package's convention (docs/ARCHITECTURE.md, Conventions:
modes (out, in, k...), ``factors[n]: (I_n, r_n)``) is

    core       = param_G.transpose(0, 1)      (r_out, r_in, rk...)
    factors[0] = param_1                      (out, r_out)
    factors[1] = param_0                      (in, r_in)
    factors[n] = param_n, n >= 2              (k_{n-2}, rk_{n-2})
    scale      = s

and ``tucker_reconstruct(core, factors, s) == dW_pap`` exactly (up to summation order).

Usage (paper ranks r = [r_in, r_out, rk...] become ``rank=(r_out, r_in)``, ``kernel_rank=rk``):

    model = fk.inject_flora(model, fk.FLoRAConfig(rank=(r[1], r[0]), kernel_rank=tuple(r[2:]) or None,
                                                  target_modules=[...]))
    load_paper_reference(model, torch.load("paper_checkpoint.pth"), scale=paper_cfg["scale"])

Limits of the source format: it has no Conv1d (the map above is generic in N and accepts one
anyway); for grouped convs it sizes ``param_0`` by ``in_channels`` instead of
``in_channels / groups``, so its grouped adapters do not fit the conv weight and are rejected
here with a message saying so; its 1-mode Embedding adapters have no counterpart; it does not
clamp ranks to the mode sizes (flora_kernels does), so an adapter with a rank above its mode's
size is rejected as a shape mismatch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..layers import FLoRALayer, flora_layers

PAPER_CORE = "param_G"
PAPER_FACTOR = "param_{}"
PAPER_SUBMODULE = "flora_layer"
PAPER_ROOT = "model"  # the paper's wrapper keeps the adapted model as ``.model``

_FACTOR_RE = re.compile(r"param_(\d+)$")


def paper_to_ours(core: Tensor, factors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Map the paper's (param_G, [param_0, ...]) (modes in, out, k...) onto (core, factors)
    in this package's mode order (out, in, k...). Pure reordering, no copy of data."""
    if core.dim() < 2 or len(factors) != core.dim():
        raise ValueError(
            f"expected a core with >= 2 modes and one factor per mode, got core shape {tuple(core.shape)} "
            f"and {len(factors)} factors"
        )
    return core.transpose(0, 1), [factors[1], factors[0], *factors[2:]]


def _paper_shapes(layer: FLoRALayer) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
    """The shapes the paper's tensors must have to fit ``layer``: core and factors, paper order."""
    w = layer.base.weight.shape
    r = layer.ranks
    core = (r[1], r[0], *r[2:])
    factors = [(w[1], r[1]), (w[0], r[0])] + [(w[n], r[n]) for n in range(2, len(w))]
    return core, factors


def _grouped_hint(layer: FLoRALayer, key: str, got: tuple[int, ...]) -> str:
    groups = getattr(layer.base, "groups", 1)
    if groups > 1 and key.endswith("param_0") and got and got[0] == layer.base.weight.shape[1] * groups:
        return (
            f"; the paper's code sizes param_0 by in_channels ({got[0]}) instead of in_channels/groups "
            f"({layer.base.weight.shape[1]}) for grouped convs (groups={groups}), so its grouped adapters "
            f"cannot be imported"
        )
    return ""


def _gather(
    layer: FLoRALayer, state: Mapping[str, Tensor], prefix: str
) -> tuple[Tensor, list[Tensor]]:
    """Validate the paper tensors under ``prefix`` against ``layer``; return them in OUR order."""
    if not isinstance(layer, FLoRALayer):
        raise TypeError(f"layer: expected a FLoRALayer (inject_flora first), got {type(layer).__name__}")
    want_core, want_factors = _paper_shapes(layer)
    n = len(want_core)
    where = f"{type(layer).__name__} with weight {tuple(layer.base.weight.shape)} and ranks {layer.ranks}"
    keys = [prefix + PAPER_CORE] + [prefix + PAPER_FACTOR.format(i) for i in range(n)]
    shapes = [want_core, *want_factors]
    tensors = []
    for key, shape in zip(keys, shapes):
        if key not in state:
            raise KeyError(f"{key}: missing from the state dict (expected shape {shape} for the {where})")
        t = state[key]
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{key}: expected a floating-point tensor, got {got}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{key}: expected shape {shape} (paper mode order (in, out, k...)) for the {where}, "
                f"got {tuple(t.shape)}{_grouped_hint(layer, key, tuple(t.shape))}"
            )
        tensors.append(t)
    extra = sorted(
        k for k in state
        if k.startswith(prefix) and (m := _FACTOR_RE.fullmatch(k[len(prefix):])) and int(m.group(1)) >= n
    )
    if extra:
        raise ValueError(f"unexpected paper factors {extra}: the {where} has {n} modes (param_0..param_{n - 1})")
    return paper_to_ours(tensors[0], tensors[1:])


def _check_scale(scale: float | None) -> None:
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")


@torch.no_grad()
def _copy_into(layer: FLoRALayer, core: Tensor, factors: list[Tensor], scale: float | None) -> None:
    merged = layer.merged
    layer.unmerge()
    layer.core.copy_(core)
    for dst, src in zip(layer.factors, factors):
        dst.copy_(src)
    if scale is not None:
        layer.scale = float(scale)
    if merged:
        layer.merge()


def from_paper_reference(
    layer: FLoRALayer, state: Mapping[str, Tensor], scale: float | None = None, prefix: str = ""
) -> FLoRALayer:
    """Copy one paper-format adapter (``{prefix}param_G``, ``{prefix}param_0``, ...) into ``layer``.

    Args:
        layer: an existing FLoRA layer whose base module is the one the paper adapter was
            trained on; its ranks must equal the paper's (in their order (r_in, r_out, rk...)).
        state: a mapping holding the paper tensors (other keys are ignored).
        scale: the paper config's ``scale``; sets ``layer.scale`` when given (the paper does not
            store it), else the layer keeps its own.
        prefix: key prefix: ``"flora_layer."`` for the state dict of one paper layer module,
            ``"model.fc.flora_layer."`` for one layer of a paper-wrapped model, ``""`` for the
            state dict of the paper's inner ``FLoRALayer`` itself.

    Every tensor is checked before anything is written: a missing key, a wrong shape (the
    message names the key, the expected and the given shape) or an extra ``param_k`` raises and
    leaves the layer unchanged. A merged layer is unmerged, updated and merged again.

    Returns:
        ``layer``.
    """
    _check_scale(scale)
    core, factors = _gather(layer, state, prefix)
    _copy_into(layer, core, factors, scale)
    return layer


def _paper_prefixes(state: Mapping[str, Tensor]) -> list[str]:
    return sorted(k[: -len(PAPER_CORE)] for k in state if k == PAPER_CORE or k.endswith("." + PAPER_CORE))


def _module_candidates(prefix: str) -> list[str]:
    """Our module names a paper key prefix may refer to (most specific first)."""
    name = prefix.removesuffix(".")
    if name == PAPER_SUBMODULE:
        name = ""
    elif name.endswith("." + PAPER_SUBMODULE):
        name = name[: -len(PAPER_SUBMODULE) - 1]
    out = [name]
    if name.startswith(PAPER_ROOT + "."):
        out.append(name[len(PAPER_ROOT) + 1:])
    return out


def load_paper_reference(
    model: nn.Module, state_dict: Mapping[str, Tensor], module_map: Mapping[str, str] | None = None,
    scale: float | None = None, strict: bool = True,
) -> dict[str, str]:
    """Import every paper adapter of a state dict into the FLoRA layers of ``model``.

    Each ``<path>.flora_layer.param_G`` key marks one adapter. ``<path>`` names our module
    directly, or after dropping the paper wrapper's leading ``model.``; ``module_map`` maps
    ``<path>`` (the paper's name, without ``.flora_layer``) to our module name where they
    differ. The paper's ``base_layer.*`` tensors (the frozen base weights) are ignored:
    ``model`` already holds them. Inject FLoRA layers with matching ranks first.

    Everything is validated before anything is written (unknown module, shape mismatch, and,
    with ``strict``, FLoRA layers of ``model`` that the state dict does not cover); on error
    nothing changes.

    Returns:
        {paper module path: our module name} for every imported adapter.
    """
    _check_scale(scale)
    layers = dict(flora_layers(model))
    module_map = dict(module_map or {})
    prefixes = _paper_prefixes(state_dict)
    if not prefixes:
        raise ValueError(f"no paper adapters in the state dict: expected keys ending in {PAPER_CORE!r}")
    plan: list[tuple[str, str, Tensor, list[Tensor]]] = []
    for prefix in prefixes:
        cands = _module_candidates(prefix)
        mapped = next((module_map[c] for c in cands if c in module_map), None)
        if mapped is not None:
            cands = [mapped]
        ours = next((c for c in cands if c in layers), None)
        if ours is None:
            raise ValueError(
                f"{prefix}{PAPER_CORE}: no FLoRA layer named {' or '.join(repr(c) for c in cands)} in the model "
                f"(FLoRA layers: {sorted(layers)}); pass module_map or inject_flora first"
            )
        core, factors = _gather(layers[ours], state_dict, prefix)
        plan.append((_module_candidates(prefix)[0], ours, core, factors))
    targets = [ours for _, ours, _, _ in plan]
    dup = sorted({t for t in targets if targets.count(t) > 1})
    if dup:
        raise ValueError(f"several paper adapters map onto the same FLoRA layers {dup}")
    if strict:
        missing = sorted(set(layers) - set(targets))
        if missing:
            raise ValueError(f"FLoRA layers without a paper adapter in the state dict: {missing} (pass strict=False)")
    for _, ours, core, factors in plan:
        _copy_into(layers[ours], core, factors, scale)
    return {theirs: ours for theirs, ours, _, _ in plan}
