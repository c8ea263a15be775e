"""One set of checks run on every real model of the suite (test_timm, test_transformers, ...).

A ``Case`` says how to build a tiny model from its config (random weights, no download), what
to feed it and how to configure the adapter. Each ``check_*`` builds its own fresh model, so
the checks are independent and each test id names one (model, check) pair:

- ``inject``: the named modules become the named FLoRA layers (the tied heads are left alone),
  every wrapper reads its base module's attributes through, the zero-core adapter leaves the
  output unchanged, and the randomized one changes it by a few percent.
- ``train_step``: one AdamW step changes every adapter tensor (and modules_to_save), and no
  base parameter changes by a single bit.
- ``merge``: merged output == unmerged; unmerge restores the base weights; tied weights stay tied
  and an embedding that is not adapted is bit-identical after merge.
- ``unload``: merge_and_unload leaves plain torch modules of the original types, the original
  state_dict keys, and the same output.
- ``save_load``: save_flora -> load_flora into a freshly built model (plain or injected) gives
  identical adapter tensors and outputs.
- ``disable``: inside ``disable_adapter`` the output is the base model's (unmerged and merged).
- ``compile``: torch.compile(backend="aot_eager") forward and backward equal eager.
- ``bf16``: CPU bf16 autocast forward and backward are finite and close to fp32.
- ``merged_training``: a training step on a merged model raises telling the user to unmerge.
- ``peft``: the same through PEFT (FloraConfig): train, merge, disable (merged), save_pretrained
  -> from_pretrained, merge_and_unload.
- ``tied`` (cases with tied heads): adapting only the tied head changes the model through that
  head only; the embedding is never written.

The adapter core is initialized to zero (dW = 0), so the checks randomize every core with a
std calibrated per case so that the adapters change the output by about ``TARGET_CHANGE``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import flora_kernels as fk
import flora_kernels.layers as fl
from flora_kernels.layers import flora_layers

SEED = 0
RANK = 4
TARGET_CHANGE = 0.03  # relative output change the randomized adapters are calibrated to
PROBE_STD = 1e-2  # core std of the calibration probe
MERGE_RTOL = 1e-4  # merged vs unmerged (fp32, norm-relative)
EXACT_RTOL = 1e-5  # paths that must agree up to summation order
BF16_RTOL = 0.1  # bf16 autocast vs fp32, norm-relative

# Attributes model code reads from the modules the suite wraps; a wrapper must expose each one
# its base module has. ("dropout" is left out: it is the adapter's own dropout on a FLoRA layer.)
READ_THROUGH = (
    "in_features", "out_features", "nf", "nx",
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
    "padding_mode", "output_padding", "transposed",
    "num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse",
    "embed_dim", "num_heads", "head_dim", "batch_first", "kdim", "vdim",
    "weight", "bias", "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
)

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class Case:
    """A tiny real model and how the suite adapts it.

    Attributes:
        id: test id.
        build: constructs the model from its config (called under ``torch.manual_seed(SEED)``).
        inputs: (args, kwargs) for the forward (called under a fixed seed, cached).
        config: FLoRAConfig keyword arguments besides ``rank``.
        adapted: module name -> name of the flora_kernels.layers class it must become.
        untouched: module names that must not be adapted with this config (tied output heads).
        tied: (head, embedding) module pairs whose ``weight`` is one shared tensor.
    """

    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Inputs]
    config: dict[str, Any] = field(default_factory=dict)
    adapted: dict[str, str] = field(default_factory=dict)
    untouched: tuple[str, ...] = ()
    tied: tuple[tuple[str, str], ...] = ()

    def cfg(self, **override: Any) -> fk.FLoRAConfig:
        return fk.FLoRAConfig(**{"rank": RANK, **self.config, **override})


# ----------------------------------------------------------------------------- plumbing


def build(case: Case) -> nn.Module:
    """The case's model with its seeded random weights, in eval mode."""
    torch.manual_seed(SEED)
    return case.build().eval()


_INPUTS: dict[str, Inputs] = {}


def inputs(case: Case) -> Inputs:
    if case.id not in _INPUTS:
        torch.manual_seed(SEED + 1)
        _INPUTS[case.id] = case.inputs()
    return _INPUTS[case.id]


def main_output(result: Any) -> Tensor:
    """The tensor a model returns: itself, ``.logits`` / ``.sample`` / ``.last_hidden_state``, or the first item."""
    if isinstance(result, Tensor):
        return result
    for key in ("logits", "sample", "last_hidden_state"):
        value = getattr(result, key, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(result, (tuple, list)) and result:
        return main_output(result[0])
    raise TypeError(f"no output tensor in a {type(result).__name__}")


def forward(model: nn.Module, case: Case) -> Tensor:
    args, kwargs = inputs(case)
    return main_output(model(*args, **kwargs))


def loss_of(out: Tensor) -> Tensor:
    """A scalar that depends on every output element: <out, fixed random tensor> / numel."""
    g = torch.Generator().manual_seed(SEED + 3)
    return (out.float() * torch.randn(out.shape, generator=g)).mean()


def rel(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected||, in fp64."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(actual: Tensor, expected: Tensor, rtol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel(actual, expected)
    mabs = (actual.detach().double() - expected.detach().double()).abs().max().item()
    assert err <= rtol, f"{what}: norm-relative error {err:.3e} > {rtol:g} (max abs error {mabs:.3e})"


def logical(name: str) -> str:
    """A FLoRA layer's name as the module had it before injection (nested wrappers drop ``base_layer``)."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def plain(module: nn.Module) -> nn.Module:
    """The torch module behind a FLoRA wrapper (the module itself otherwise)."""
    return module.base_layer if isinstance(module, fk.FLoRALayer) else module


def randomize(model: nn.Module, std: float) -> None:
    """Every adapter core ~ N(0, std^2), from a fixed generator (same draws for the same model)."""
    g = torch.Generator().manual_seed(SEED + 2)
    for _, layer in flora_layers(model):
        torch.nn.init.normal_(layer.core, std=std, generator=g)


_STD: dict[str, float] = {}


def randomize_calibrated(model: nn.Module, case: Case, base_out: Tensor, key: str) -> float:
    """Randomize the cores with the std that changes the output by about TARGET_CHANGE; returns the change."""
    if key not in _STD:
        randomize(model, PROBE_STD)
        with torch.no_grad():
            change = rel(forward(model, case), base_out)
        assert change > 0, f"{case.id}: randomized adapters (core std {PROBE_STD}) leave the output unchanged"
        _STD[key] = PROBE_STD * TARGET_CHANGE / change
    randomize(model, _STD[key])
    with torch.no_grad():
        return rel(forward(model, case), base_out)


@dataclass
class Adapted:
    """A freshly built, injected and randomized model with what the checks compare against."""

    model: nn.Module
    base_out: Tensor  # output before injection
    types: dict[str, type]  # module name -> type, before injection
    state_keys: set[str]  # state_dict keys before injection
    change: float  # relative output change from the randomized adapters


def adapted(case: Case) -> Adapted:
    model = build(case)
    types = {n: type(m) for n, m in model.named_modules()}
    state_keys = set(model.state_dict())
    with torch.no_grad():
        base_out = forward(model, case)
    fk.inject_flora(model, case.cfg())
    change = randomize_calibrated(model, case, base_out, case.id)
    return Adapted(model, base_out, types, state_keys, change)


def partition(model: nn.Module, case: Case) -> tuple[dict[str, nn.Parameter], ...]:
    """(adapter, modules_to_save, base) parameters by name."""
    ids = {}
    for name, layer in flora_layers(model):
        ids[id(layer.core)] = f"{name}.core"
        for i, f in enumerate(layer.factors):
            ids[id(f)] = f"{name}.factors.{i}"
    saved_modules = [
        n for n, _ in model.named_modules()
        if n and any(n == s or n.endswith("." + s) for s in case.config.get("modules_to_save", ()))
    ]
    adapter, saved, base = {}, {}, {}
    for name, p in model.named_parameters():
        if id(p) in ids:
            adapter[name] = p
        elif any(name.startswith(s + ".") for s in saved_modules):
            saved[name] = p
        else:
            base[name] = p
    return adapter, saved, base


def adapter_grads(model: nn.Module) -> dict[str, Tensor]:
    out = {}
    for name, layer in flora_layers(model):
        for pname, p in [("core", layer.core), *((f"factors.{i}", f) for i, f in enumerate(layer.factors))]:
            assert p.grad is not None, f"{name}.{pname}: no gradient"
            out[f"{name}.{pname}"] = p.grad.detach().clone()
    return out


def forward_backward(model: nn.Module, case: Case, runner: nn.Module | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Output and adapter gradients of one forward + backward (``runner``: e.g. the compiled model)."""
    model.zero_grad(set_to_none=True)
    out = forward(model if runner is None else runner, case)
    loss_of(out).backward()
    grads = adapter_grads(model)
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def head_input(model: nn.Module, case: Case, head: str) -> tuple[Tensor, Tensor]:
    """(model output, the input tensor of module ``head``) of one no-grad forward."""
    seen: list[Tensor] = []
    handle = model.get_submodule(head).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            out = forward(model, case)
    finally:
        handle.remove()
    assert len(seen) == 1, f"{head}: expected one call per forward, got {len(seen)}"
    return out, seen[0]


# ----------------------------------------------------------------------------- checks


def check_read_through(name: str, layer: nn.Module) -> None:
    base = layer.base_layer
    for attr in READ_THROUGH:
        if not hasattr(base, attr):
            continue
        assert hasattr(layer, attr), f"{name} ({type(layer).__name__}): no attribute {attr!r} of its {type(base).__name__}"
        got, want = getattr(layer, attr), getattr(base, attr)
        if attr in base._parameters or attr in base._buffers:
            assert got is want, f"{name}.{attr}: not the base module's tensor (a copy?)"
        elif isinstance(want, Tensor):
            assert isinstance(got, Tensor) and torch.equal(got, want), f"{name}.{attr}: differs from the base module's"
        else:
            assert got == want, f"{name}.{attr}: {got!r}, base module has {want!r}"


def check_inject(case: Case, tmp_path: Path) -> None:
    model = build(case)
    types = {n: type(m) for n, m in model.named_modules()}
    for head, emb in case.tied:
        assert model.get_submodule(head).weight is model.get_submodule(emb).weight, f"case error: {head} not tied"
    with torch.no_grad():
        base_out = forward(model, case)
    fk.inject_flora(model, case.cfg())
    layers = {logical(n): layer for n, layer in flora_layers(model)}
    for name, cls_name in case.adapted.items():
        assert name in layers, f"{name} not adapted; adapted: {sorted(layers)}"
        cls = getattr(fl, cls_name)
        assert isinstance(layers[name], cls), f"{name}: a {type(layers[name]).__name__}, expected a {cls_name}"
    for name in case.untouched:
        assert name not in layers, f"{name} must not be adapted with {case.config}"
        assert not isinstance(model.get_submodule(name), fk.FLoRALayer)
    for head, emb in case.tied:
        assert plain(model.get_submodule(head)).weight is model.get_submodule(emb).weight, f"{head}: tie broken by inject"
    for name, layer in layers.items():
        assert type(layer.base_layer) is types[name], f"{name}: base_layer is a {type(layer.base_layer).__name__}"
        check_read_through(name, layer)
    with torch.no_grad():
        assert_close(forward(model, case), base_out, EXACT_RTOL, "freshly injected (core = 0) vs base model")
    change = randomize_calibrated(model, case, base_out, case.id)
    assert TARGET_CHANGE / 10 < change < TARGET_CHANGE * 10, f"randomized adapters change the output by {change:.3e}"


def check_train_step(case: Case, tmp_path: Path) -> None:
    a = adapted(case)
    model = a.model
    adapter, saved, base = partition(model, case)
    assert adapter, "no adapter parameters"
    frozen_wrong = [n for n, p in base.items() if p.requires_grad]
    trainable_wrong = [n for n, p in {**adapter, **saved}.items() if not p.requires_grad]
    assert not frozen_wrong, f"base parameters left trainable: {frozen_wrong[:8]}"
    assert not trainable_wrong, f"adapter / modules_to_save parameters frozen: {trainable_wrong[:8]}"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_of(forward(model, case)).backward()
    dead = [n for n, layer in flora_layers(model) if layer.core.grad is None or not layer.core.grad.any()]
    assert not dead, f"adapters with no gradient on their core: {dead}"
    assert all(torch.isfinite(p.grad).all() for p in {**adapter, **saved}.values() if p.grad is not None)
    opt.step()
    changed = [n for n in base if not torch.equal(model.get_parameter(n), before[n])]
    assert not changed, f"base parameters changed by the step: {changed[:8]}"
    unchanged = [n for n, p in adapter.items() if torch.equal(p, before[n])]
    assert not unchanged, f"adapter tensors unchanged by the step: {unchanged[:8]}"
    saved_unchanged = [n for n, p in saved.items() if p.grad is not None and torch.equal(p, before[n])]
    assert not saved_unchanged, f"modules_to_save parameters unchanged by the step: {saved_unchanged[:8]}"
    if case.config.get("modules_to_save"):
        assert saved, f"modules_to_save={case.config['modules_to_save']} matched no parameter"


def check_merge(case: Case, tmp_path: Path) -> None:
    a = adapted(case)
    model = a.model
    _, _, base = partition(model, case)
    layers = {logical(n) for n, _ in flora_layers(model)}
    with torch.no_grad():
        out = forward(model, case)
    snap = {n: p.detach().clone() for n, p in base.items()}
    emb_snap = {emb: model.get_submodule(emb).weight.detach().clone() for _, emb in case.tied if emb not in layers}
    fk.merge_flora(model)
    with torch.no_grad():
        assert_close(forward(model, case), out, MERGE_RTOL, "merged vs unmerged")
    for emb, w in emb_snap.items():
        assert torch.equal(model.get_submodule(emb).weight, w), f"{emb}: embedding (not adapted) written by merge_flora"
    fk.unmerge_flora(model)
    for n, w in snap.items():
        err = (model.get_parameter(n).detach() - w).abs().max().item()
        assert err <= 1e-5, f"{n}: not restored by unmerge_flora (max abs error {err:.3e})"
    for head, emb in case.tied:
        assert plain(model.get_submodule(head)).weight is model.get_submodule(emb).weight, f"{head}: tie not restored"
    with torch.no_grad():
        assert_close(forward(model, case), out, MERGE_RTOL, "after unmerge vs before merge")


def check_unload(case: Case, tmp_path: Path) -> None:
    a = adapted(case)
    names = [logical(n) for n, _ in flora_layers(a.model)]
    with torch.no_grad():
        out = forward(a.model, case)
    model = fk.merge_and_unload(a.model)
    assert not flora_layers(model), "FLoRA layers left after merge_and_unload"
    leftover = [n for n, m in model.named_modules() if type(m).__module__.startswith("flora_kernels")]
    assert not leftover, f"flora_kernels modules left after merge_and_unload: {leftover[:8]}"
    wrong = {n: type(model.get_submodule(n)).__name__ for n in names if type(model.get_submodule(n)) is not a.types[n]}
    assert not wrong, f"modules not restored to their original types: {wrong}"
    keys = set(model.state_dict())
    assert keys == a.state_keys, f"state_dict keys differ from the original model's: {sorted(keys ^ a.state_keys)[:8]}"
    with torch.no_grad():
        assert_close(forward(model, case), out, MERGE_RTOL, "merge_and_unload vs adapted")


def check_save_load(case: Case, tmp_path: Path) -> None:
    a = adapted(case)
    model = a.model
    _, saved, _ = partition(model, case)
    g = torch.Generator().manual_seed(SEED + 4)
    with torch.no_grad():
        for p in saved.values():  # make modules_to_save differ from a fresh model's
            p.add_(0.1 * p.std().nan_to_num(1.0) * torch.randn(p.shape, generator=g))
        out = forward(model, case)
    fk.save_flora(model, tmp_path / "adapter")
    layers = dict(flora_layers(model))
    for variant in ("plain", "injected"):
        fresh = build(case)
        if variant == "injected":
            fk.inject_flora(fresh, case.cfg())
        fk.load_flora(fresh, tmp_path / "adapter")
        loaded = dict(flora_layers(fresh))
        assert set(loaded) == set(layers), f"{variant}: loaded layers differ: {sorted(set(loaded) ^ set(layers))}"
        for name, layer in loaded.items():
            assert layer.ranks == layers[name].ranks, f"{variant}: {name} ranks {layer.ranks} != {layers[name].ranks}"
            assert torch.equal(layer.core, layers[name].core), f"{variant}: {name}.core differs"
            for i, (f, f0) in enumerate(zip(layer.factors, layers[name].factors)):
                assert torch.equal(f, f0), f"{variant}: {name}.factors.{i} differs"
        with torch.no_grad():
            assert_close(forward(fresh, case), out, 1e-6, f"loaded into a fresh {variant} model vs saved")


def check_disable(case: Case, tmp_path: Path) -> None:
    a = adapted(case)
    model = a.model
    with torch.no_grad():
        out = forward(model, case)
        with fk.disable_adapter(model):
            assert_close(forward(model, case), a.base_out, EXACT_RTOL, "disable_adapter vs base model")
        assert_close(forward(model, case), out, EXACT_RTOL, "after disable_adapter vs before")
        fk.merge_flora(model)
        with fk.disable_adapter(model):
            assert_close(forward(model, case), a.base_out, MERGE_RTOL, "disable_adapter (merged) vs base model")
        assert_close(forward(model, case), out, MERGE_RTOL, "after disable_adapter (merged) vs before")


def check_compile(case: Case, tmp_path: Path) -> None:
    torch._dynamo.reset()
    model = adapted(case).model
    out, grads = forward_backward(model, case)
    out_c, grads_c = forward_backward(model, case, torch.compile(model, backend="aot_eager"))
    assert_close(out_c, out, MERGE_RTOL, "compiled vs eager output")
    for name, g in grads.items():
        assert_close(grads_c[name], g, MERGE_RTOL, f"compiled vs eager grad of {name}")


def check_bf16(case: Case, tmp_path: Path) -> None:
    model = adapted(case).model
    out, grads = forward_backward(model, case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_b = forward(model, case)
        loss = loss_of(out_b)
    loss.backward()
    grads_b = adapter_grads(model)
    assert torch.isfinite(out_b).all(), "bf16 autocast output not finite"
    assert_close(out_b.float(), out, BF16_RTOL, "bf16 autocast vs fp32 output")
    for name, g in grads_b.items():
        assert g.dtype == grads[name].dtype, f"{name}: grad dtype {g.dtype}, fp32 run gives {grads[name].dtype}"
        assert torch.isfinite(g).all(), f"{name}: bf16 autocast grad not finite"
    cores = [n for n in grads if n.endswith(".core")]
    flat, flat_b = torch.cat([grads[n].flatten() for n in cores]), torch.cat([grads_b[n].flatten() for n in cores])
    assert_close(flat_b, flat, 3 * BF16_RTOL, "bf16 autocast vs fp32 core gradients (all layers)")


def check_merged_training(case: Case, tmp_path: Path) -> None:
    model = adapted(case).model
    fk.merge_flora(model)
    model.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        loss_of(forward(model, case)).backward()


def check_tied(case: Case, tmp_path: Path) -> None:
    for head, emb in case.tied:
        model = build(case)
        base_out, x_base = head_input(model, case, head)
        emb_w = model.get_submodule(emb).weight.detach().clone()
        fk.inject_flora(model, fk.FLoRAConfig(rank=RANK, target_modules=[head]))
        assert [n for n, _ in flora_layers(model)] == [head]
        assert plain(model.get_submodule(head)).weight is model.get_submodule(emb).weight, f"{head}: tie broken by inject"
        change = randomize_calibrated(model, case, base_out, f"{case.id}:tied:{head}")
        assert change > 0
        out, x = head_input(model, case, head)
        assert torch.equal(x, x_base), f"adapting {head} only changed its input"
        fk.merge_flora(model)
        assert torch.equal(model.get_submodule(emb).weight, emb_w), f"merge_flora on {head} wrote into {emb}"
        out_m, x_m = head_input(model, case, head)
        assert torch.equal(x_m, x_base), f"merge_flora on {head} changed the model upstream of it"
        assert_close(out_m, out, MERGE_RTOL, f"merged vs unmerged, adapter on tied {head} only")
        fk.unmerge_flora(model)
        assert torch.equal(model.get_submodule(emb).weight, emb_w), f"unmerge_flora on {head} wrote into {emb}"
        assert plain(model.get_submodule(head)).weight is model.get_submodule(emb).weight, f"{head}: tie not restored"
        out_u, _ = head_input(model, case, head)
        assert_close(out_u, out, MERGE_RTOL, f"after unmerge vs before merge, adapter on tied {head} only")
        head_type = type(plain(model.get_submodule(head)))
        model = fk.merge_and_unload(model)
        assert type(model.get_submodule(head)) is head_type
        assert torch.equal(model.get_submodule(emb).weight, emb_w), f"merge_and_unload on {head} wrote into {emb}"
        out_p, x_p = head_input(model, case, head)
        assert torch.equal(x_p, x_base), f"merge_and_unload on {head} changed the model upstream of it"
        assert_close(out_p, out, MERGE_RTOL, f"merge_and_unload vs adapted, adapter on tied {head} only")


def check_peft(case: Case, tmp_path: Path) -> None:
    """The same adapter through PEFT (``get_peft_model`` with the case's FloraConfig): a training
    step moves only adapter / modules_to_save tensors; merged == unmerged; ``disable_adapter``
    gives the base output, merged too; ``save_pretrained`` -> ``PeftModel.from_pretrained`` into
    a fresh model reproduces the output; ``merge_and_unload`` leaves the original module types."""
    fkp = pytest.importorskip("flora_kernels.peft")
    from peft import PeftModel, get_peft_model

    model = build(case)
    types = {n: type(m).__name__ for n, m in model.named_modules()}
    with torch.no_grad():
        base_out = forward(model, case)
    pm = get_peft_model(model, fkp.FloraConfig.from_flora_config(case.cfg()))
    randomize_calibrated(pm, case, base_out, case.id)
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    wrong = [n for n in trainable if "flora_" not in n and "modules_to_save" not in n]
    assert trainable and not wrong, f"trainable parameters that are neither adapter nor modules_to_save: {wrong[:8]}"
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    pm.train()
    for m in pm.modules():  # running statistics are base-model state, never saved with an adapter
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-3)
    loss_of(forward(pm, case)).backward()
    opt.step()
    pm.eval()
    moved = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert moved <= set(trainable), f"frozen parameters changed by the step: {sorted(moved - set(trainable))[:8]}"
    stuck = [n for n in trainable if "flora_" in n and n not in moved]
    assert not stuck, f"adapter tensors unchanged by the step: {stuck[:8]}"
    with torch.no_grad():
        out = forward(pm, case)
        pm.merge_adapter()
        assert_close(forward(pm, case), out, MERGE_RTOL, "PEFT: merged vs unmerged")
        with pm.disable_adapter():
            assert_close(forward(pm, case), base_out, MERGE_RTOL, "PEFT: disable_adapter (merged) vs base model")
        assert_close(forward(pm, case), out, MERGE_RTOL, "PEFT: after disable_adapter vs before")
        pm.save_pretrained(tmp_path / "peft")
        fresh = PeftModel.from_pretrained(build(case), tmp_path / "peft")
        assert_close(forward(fresh, case), out, MERGE_RTOL, "PEFT: from_pretrained into a fresh model vs saved")
        unloaded = fresh.merge_and_unload()
        assert not flora_layers(unloaded), "FLoRA layers left after PEFT's merge_and_unload"
        # by name: a parametrized module's class is made per instance
        wrong_types = {
            n: type(m).__name__ for n, m in unloaded.named_modules() if n in types and type(m).__name__ != types[n]
        }
        assert not wrong_types, f"modules not restored to their original types: {wrong_types}"
        assert_close(forward(unloaded, case), out, MERGE_RTOL, "PEFT: merge_and_unload vs adapted")


CHECKS: dict[str, Callable[[Case, Path], None]] = {
    "inject": check_inject,
    "train_step": check_train_step,
    "merge": check_merge,
    "unload": check_unload,
    "save_load": check_save_load,
    "disable": check_disable,
    "compile": check_compile,
    "bf16": check_bf16,
    "merged_training": check_merged_training,
    "peft": check_peft,
}


# torch.compile traces every FLoRA layer's Python dispatch (about 1 s per adapted layer on 2 cores),
# so the compile check runs on one model per layer type and family; the others share those types.
COMPILED = {
    "gpt2", "bert", "whisper", "wav2vec2", "vit_tiny_patch16_224", "convnext_atto", "unet2d_condition",
    "transformer_encoder_layer", "conv_transpose2d", "embedding", "legacy_weight_norm",
}


def parametrize_cases(cases: list[Case]) -> list[Any]:
    """pytest params (case, check) for every case x check (compile: the COMPILED cases), plus
    ``tied`` for cases with tied heads."""
    params = [
        pytest.param(c, check, id=f"{c.id}-{check}")
        for c in cases for check in CHECKS if check != "compile" or c.id in COMPILED
    ]
    params += [pytest.param(c, "tied", id=f"{c.id}-tied") for c in cases if c.tied]
    return params


def run_check(case: Case, check: str, tmp_path: Path) -> None:
    (check_tied if check == "tied" else CHECKS[check])(case, tmp_path)
