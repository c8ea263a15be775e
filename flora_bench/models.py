"""Whole-model benchmark cases: the training step of a small vision model, per provider.

Models (timm's, when ``import timm`` works; else the equivalent definitions below, same layer
types, shapes and order of ops): ``resnet18``, ``vit_tiny`` (vit_tiny_patch16), ``convnext_atto``.

Providers, each a copy of one randomly initialised model (same weights):

- ``frozen``: the base model, every parameter frozen; the step's backward computes the input
  gradient through every layer (what any adapter must pay at least). Every ratio is to it.
- ``flora-auto``: every Linear/ConvNd adapted by ``fk.inject_flora`` at ``rank``,
  backend and strategy "auto" (measured dispatch as configured).
- ``flora-planned``: like flora-auto with measured dispatch off (the cost model and auto's
  backend order decide), to weigh measuring's first-step cost against its gain.
- ``flora-<strategy>``: the same with the strategy fixed (backend auto).
- ``flora-<backend>-<strategy>``: both fixed (e.g. flora-reference-auto, flora-cpp-auto).
- ``lora``: PEFT LoRA at the same rank on every Linear and ungrouped Conv2d (peft's conv LoRA
  needs the rank divisible by the groups, which depthwise convs are not); where peft does not
  import, the same layer written here (``LoRA``), which ``impl`` says.
- ``full``: full fine-tuning: every parameter trainable.
- ``flora-lean``: flora-auto with ``fk.FLoRAConfig``'s lean-memory option on, where it has one.

``build(..., targets="linear")`` adapts every Linear only (PEFT's "all-linear"); the memory,
host-path and compile cases build their providers here too.

One step: forward, ``y.backward(dy)`` with a fixed dy, then the gradients are dropped (no
optimizer). Rounds are interleaved (each round runs every provider once, rotating the order) and
each provider's time is divided by the frozen step of the same round; the median over rounds is
reported with its 20/80 quantiles. ``clock="cpu"`` times by the process's CPU time instead of
wall time: with one torch thread that is the step's cost undistorted by other load on the
machine (with several threads it adds up every thread's busy time, spin-waits included).

Before timing, every FLoRA provider's output and input gradient are checked against
``flora-reference-factorized`` run in float64 on the same (non-zero) adapter values:
``flora_kernels.testing``'s float64 rule (within 4x the float32 reference path's own error, at
least the float32 tolerance, 1e-3). (On timm's resnet18, whose blocks end in a
zero-initialised BatchNorm, the float32 factorized path's input gradient is 6e-3 off float64: one
ReLU input in layer4.0 is exactly 0 in float64 and 6e-8 in float32, and the gradient through it
is switched on; the merged path's rounding happens not to flip it.)
Its first step (which includes measured dispatch, when on) is timed on its own. Memory per
provider: the tensors one step's forward saves for backward (parameters excluded) and, on a GPU,
the peak (``flora_bench.memory``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flora_kernels import FLoRAConfig, inject_flora
from flora_kernels.backends.base import STRATEGIES, backend_names
from flora_kernels.testing import rel_err, tolerance, within_reference_error

from .memory import fmt_mib, mib, peak_bytes, saved_bytes
from .timing import CLOCKS, interleaved, quantile

MODELS = ("resnet18", "vit_tiny", "convnext_atto")
TIMM_NAMES = {"resnet18": "resnet18", "vit_tiny": "vit_tiny_patch16_224", "convnext_atto": "convnext_atto"}
DEFAULT_PROVIDERS = ("frozen", "flora-auto", "flora-factorized", "flora-merged", "lora", "full")


# ---- the equivalent definitions ---------------------------------------------------------------
class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision/timm resnet18: 7x7/2 stem, max-pool, 4 stages of 2 basic blocks, fc."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        chans, layers, cin = (64, 128, 256, 512), [], 64
        for i, c in enumerate(chans):
            layers.append(nn.Sequential(_Basic(cin, c, 1 if i == 0 else 2), _Basic(c, c, 1)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTTiny(nn.Module):
    """timm vit_tiny_patch16: 16x16 patch conv, class token, 12 blocks of width 192, 3 heads."""

    def __init__(self, image_size: int = 224, num_classes: int = 1000, dim: int = 192, depth: int = 12) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 16, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // 16) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_ViTBlock(dim, 3) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class _LayerNorm2d(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtAtto(nn.Module):
    """timm convnext_atto: 4x4/4 stem, stages (40, 80, 160, 320) x (2, 2, 6, 2) blocks of a depthwise
    7x7 conv, LayerNorm and a 4x Linear MLP; LayerNorm + 2x2/2 conv between stages."""

    def __init__(self, num_classes: int = 1000, dims: Sequence[int] = (40, 80, 160, 320),
                 depths: Sequence[int] = (2, 2, 6, 2)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), _LayerNorm2d(dims[0], eps=1e-6))
        stages = []
        for i, (d, n) in enumerate(zip(dims, depths)):
            down = nn.Identity() if i == 0 else nn.Sequential(_LayerNorm2d(dims[i - 1], eps=1e-6),
                                                              nn.Conv2d(dims[i - 1], d, 2, 2))
            stages.append(nn.Sequential(down, *[_ConvNeXtBlock(d) for _ in range(n)]))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.stages(self.stem(x)).mean((2, 3))))


@functools.cache
def timm_reason() -> str | None:
    """Why timm's models are not used here (None: they are); asked once per process."""
    try:
        import timm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - e.g. a torchvision wheel whose C ops do not load
        return f"timm not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def make_model(name: str, image_size: int) -> tuple[nn.Module, str]:
    """The model (random init, eval-mode norms) and where it comes from."""
    if name not in MODELS:
        raise ValueError(f"model: expected one of {MODELS}, got {name!r}")
    why = timm_reason()
    if why is None:
        import timm

        kw = {"img_size": image_size} if name == "vit_tiny" else {}
        m = timm.create_model(TIMM_NAMES[name], pretrained=False, **kw)
        src = f"timm {timm.__version__} {TIMM_NAMES[name]}"
    else:
        m = {"resnet18": ResNet18, "vit_tiny": lambda: ViTTiny(image_size), "convnext_atto": ConvNeXtAtto}[name]()
        src = f"flora_bench.models.{type(m).__name__} ({why})"
    return m.eval(), src  # eval: BatchNorm uses running stats, the same in every provider


# ---- providers ---------------------------------------------------------------------------------
@dataclass
class ModelCase:
    """One provider's model; ``autotune``: measured dispatch on/off while it runs (None: as set)."""

    name: str
    model: nn.Module
    impl: str
    autotune: bool | None = None


# Which modules the providers adapt: "all" every Linear/ConvNd (``target_modules=None``), "linear"
# every Linear ("all-linear"); both leave out tied output heads and, for "linear", the model's
# output embeddings (flora_kernels.model.select_targets). PEFT LoRA adapts the same modules where
# it can (Linear, ungrouped Conv2d).
TARGETS = {"all": None, "linear": "all-linear"}


def _target_config(targets: str, **kw) -> FLoRAConfig:
    if targets not in TARGETS:
        raise ValueError(f"targets: expected one of {tuple(TARGETS)}, got {targets!r}")
    return FLoRAConfig(target_modules=TARGETS[targets], **kw)


def lean_option() -> str | None:
    """The name of ``FLoRAConfig``'s lean-memory switch (a bool field whose name holds "lean"),
    or None while it has none."""
    for f in dataclasses.fields(FLoRAConfig):
        if "lean" in f.name and (f.type in (bool, "bool") or isinstance(f.default, bool)):
            return f.name
    return None


def _flora(base: nn.Module, rank: int, strategy: str, backend: str, seed: int, targets: str = "all",
           **options) -> nn.Module:
    from flora_kernels.layers import flora_layers

    cfg = _target_config(targets, rank=rank, strategy=strategy, backend=backend, **options)
    m = inject_flora(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the same non-zero adapter in every copy (the paper's zero core makes dW = 0)
        for _, layer in flora_layers(m):
            layer.core.copy_(torch.randn(layer.core.shape, generator=g) * 0.1)
            for f in layer.factors:
                f.copy_(torch.randn(f.shape, generator=g) / math.sqrt(2 * f.shape[1]))
    return m


class LoRA(nn.Module):
    """PEFT's LoRA layer, written here for when peft is not importable: ``base(x) + B(A(x))``;
    Linear: A (r, in), B (out, r); Conv2d: A a conv with the base geometry to r channels, B 1x1."""

    def __init__(self, base: nn.Module, r: int) -> None:
        super().__init__()
        self.base = base
        if isinstance(base, nn.Linear):
            self.lora_A, self.lora_B = nn.Linear(base.in_features, r, bias=False), nn.Linear(r, base.out_features, bias=False)
        else:
            self.lora_A = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                                    bias=False)
            self.lora_B = nn.Conv2d(r, base.out_channels, 1, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.02)  # non-zero, like a trained adapter

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


@functools.cache
def _peft_reason() -> str | None:
    """Why peft is not used (None: it is); asked once per process."""
    try:
        import peft  # noqa: F401
    except Exception as e:  # noqa: BLE001 - e.g. transformers failing to import torchvision
        return f"peft not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def lora_targets(base: nn.Module, targets: str = "all") -> list[str]:
    """The modules FLoRA adapts under ``targets`` that PEFT's LoRA supports (Linear, ungrouped
    Conv2d: peft's conv LoRA needs the rank divisible by the groups)."""
    from flora_kernels.model import select_targets

    names = select_targets(base, _target_config(targets))
    return [n for n in names if type(m := base.get_submodule(n)) is nn.Linear
            or (type(m) is nn.Conv2d and m.groups == 1)]


def _lora(base: nn.Module, rank: int, targets: str = "all") -> tuple[nn.Module, str]:
    names = lora_targets(base, targets)
    where = f"r={rank} on {len(names)} Linear/ungrouped Conv2d"
    m = copy.deepcopy(base)
    why = _peft_reason()
    if why is not None:
        for n in names:
            parent, _, child = n.rpartition(".")
            owner = m.get_submodule(parent) if parent else m
            setattr(owner, child, LoRA(getattr(owner, child), rank))
        m.requires_grad_(False)
        for mod in m.modules():
            if isinstance(mod, LoRA):
                mod.lora_A.requires_grad_(True)
                mod.lora_B.requires_grad_(True)
        return m, f"LoRA written here ({why}), {where}"
    import peft
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=names, bias="none")
    return get_peft_model(m, cfg), f"peft {peft.__version__} LoRA, {where}"


def build(name: str, base: nn.Module, rank: int, seed: int, targets: str = "all") -> ModelCase:
    """Provider ``name`` over a copy of ``base``; raises ValueError for an unknown name and
    ``SkipCase`` for one this installation cannot build (e.g. flora-lean without the option)."""
    if name == "frozen":
        m = copy.deepcopy(base).requires_grad_(False)
        return ModelCase(name, m, "the base model, frozen (input gradient only)")
    if name == "full":
        m = copy.deepcopy(base).requires_grad_(True)
        return ModelCase(name, m, "full fine-tuning (every parameter trainable)")
    if name == "lora":
        m, impl = _lora(base, rank, targets)
        return ModelCase(name, m, impl)
    if name == "flora-planned":
        m = _flora(base, rank, "auto", "auto", seed, targets)
        return ModelCase(name, m, f"fk.inject_flora(rank={rank}), measured dispatch off", autotune=False)
    if name == "flora-lean":
        opt = lean_option()
        if opt is None:
            raise SkipCase("fk.FLoRAConfig has no lean-memory option (a bool field named *lean*) in this version")
        m = _flora(base, rank, "auto", "auto", seed, targets, **{opt: True})
        return ModelCase(name, m, f"fk.inject_flora(rank={rank}, {opt}=True)")
    parts = name.split("-")
    strategies = STRATEGIES + ("auto",)
    if parts[0] == "flora" and len(parts) == 2 and parts[1] in strategies:
        backend, strategy = "auto", parts[1]
    elif parts[0] == "flora" and len(parts) == 3 and parts[1] in backend_names() and parts[2] in strategies:
        backend, strategy = parts[1], parts[2]
    else:
        raise ValueError(f"unknown model provider {name!r}: expected frozen, full, lora, flora-lean, "
                         f"flora-<strategy> or flora-<backend>-<strategy> (strategies {strategies}, backends "
                         f"{backend_names()})")
    m = _flora(base, rank, strategy, backend, seed, targets)
    return ModelCase(name, m, f"fk.inject_flora(rank={rank}, backend={backend}, strategy={strategy})")


class SkipCase(Exception):
    """A provider this installation cannot build (the message says why)."""


# ---- the run -----------------------------------------------------------------------------------
def _step(c: ModelCase, x: Tensor, dy: Tensor) -> None:
    """One training step of ``c`` (forward, ``backward(dy)``), its gradients dropped after."""
    from flora_kernels.backends.autotune import use_autotune

    with use_autotune(c.autotune):
        c.model(x).backward(dy)
    _step_clear(c, [x])


def _step_clear(c: ModelCase, inputs: Sequence[Tensor]) -> None:
    for p in c.model.parameters():
        p.grad = None
    for t in inputs:
        t.grad = None


def _output_and_dx(model: nn.Module, x: Tensor, dy: Tensor) -> list[Tensor]:
    xx = x.detach().requires_grad_(True)
    y = model(xx)
    (dx,) = torch.autograd.grad(y, xx, dy)
    return [y.detach(), dx]


def _model_inputs(base: nn.Module, batch: int, image_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """x (batch, 3, image_size, image_size), requiring grad, and a fixed dy like the output."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, image_size, image_size, generator=g).requires_grad_(True)
    with torch.no_grad():
        y0 = base(x)
    return x, torch.randn(y0.shape, generator=g)


def build_cases(names: Sequence[str], base: nn.Module, rank: int, seed: int,
                targets: str = "all") -> tuple[list[ModelCase], dict[str, str]]:
    """The providers (frozen first) and {name: why skipped} for those that cannot be built."""
    cases, skipped = [], {}
    for n in ["frozen"] + [p for p in names if p != "frozen"]:
        try:
            cases.append(build(n, base, rank, seed, targets))
        except (ImportError, SkipCase) as e:
            skipped[n] = str(e) if isinstance(e, SkipCase) else f"{type(e).__name__}: {e}"
    return cases, skipped


def check_flora(name: str, cases: Sequence[ModelCase], base: nn.Module, rank: int, seed: int, x: Tensor,
                dy: Tensor) -> dict[str, float]:
    """Each FLoRA provider's output and input gradient against the reference path run in float64
    (``flora_kernels.testing``'s float64 rule: within 4x the float32 reference path's own error, at
    least the float32 tolerance). Returns {provider: worst relative error}; raises AssertionError."""
    flora = [c for c in cases if c.name.startswith("flora")]
    if not flora:
        return {}
    ref = _flora(base, rank, "factorized", "reference", seed)
    exact = _output_and_dx(copy.deepcopy(ref).double(), x.double(), dy.double())
    ref_errs = [rel_err(t, e) for t, e in zip(_output_and_dx(ref, x, dy), exact)]
    del ref
    checks = {}
    for c in flora:
        errs = [rel_err(t, e) for t, e in zip(_output_and_dx(c.model, x, dy), exact)]
        ok, worst, bound = within_reference_error(errs, ref_errs, tolerance(x.dtype, x.device.type))
        checks[c.name] = max(errs)
        if not ok:
            raise AssertionError(f"{name}: provider {c.name} disagrees with the reference path run in float64 "
                                 f"(relative error {worst:.2e} > {bound:.1e})")
    return checks


def step_memory(c: ModelCase, inputs: Sequence[Tensor], dy: Tensor) -> dict[str, float | None]:
    """``saved_mib``: what one training step's forward saves for backward (each storage once, the
    model's parameters left out); ``peak_mib``: the device's peak during one step (None on a CPU)."""
    saved = saved_bytes(lambda: c.model(*inputs), list(c.model.parameters()))
    peak = peak_bytes(lambda: _step(c, inputs[0], dy), inputs[0].device)
    _step_clear(c, inputs)
    return {"saved_mib": mib(saved), "peak_mib": mib(peak)}


def run_model(name: str, providers: Sequence[str] = DEFAULT_PROVIDERS, batch: int = 8, image_size: int = 96,
              rank: int = 8, rounds: int = 7, seed: int = 0, log: Callable[[str], None] | None = None,
              clock: str = "wall") -> dict:
    """Time ``providers`` on model ``name``; returns {model, impl, rows: [...], ...} (see module doc)."""
    from flora_kernels.backends.autotune import clear_autotune_cache

    if clock not in CLOCKS:
        raise ValueError(f"clock: expected one of {tuple(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    clear_autotune_cache()  # decisions in memory from an earlier model must not count as this one's
    torch.manual_seed(seed)
    base, src = make_model(name, image_size)
    base.requires_grad_(False)
    x, dy = _model_inputs(base, batch, image_size, seed)
    cases, skipped = build_cases(providers, base, rank, seed)
    first = {}  # first step (measured dispatch happens here for flora-auto), then the checks, then the rounds
    for c in cases:
        t0 = now()
        _step(c, x, dy)
        first[c.name] = now() - t0
    checks = check_flora(name, cases, base, rank, seed, x, dy)  # decisions are made by now (first step)
    memory = {c.name: step_memory(c, [x], dy) for c in cases}
    times = interleaved({c.name: functools.partial(_step, c, x, dy) for c in cases}, rounds, clock)
    if log:
        for r in range(rounds):
            log(f"{name} round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[r] * 1e3:.0f} ms" for n, t in times.items()))
    rows = []
    for c in cases:
        ts = times[c.name]
        rs = [t / f for t, f in zip(ts, times["frozen"])]
        med = quantile(ts, 0.5)
        rows.append({
            "provider": c.name, "impl": c.impl, "median_ms": med * 1e3, "ratio": quantile(rs, 0.5),
            "ratio_q20": quantile(rs, 0.2), "ratio_q80": quantile(rs, 0.8),
            "first_step_ms": first[c.name] * 1e3, "first_extra_ms": (first[c.name] - med) * 1e3,
            "check_rel_err": checks.get(c.name), **memory[c.name],
        })
    return {"model": name, "impl": src, "batch": batch, "image_size": image_size, "rank": rank, "rounds": rounds,
            "threads": torch.get_num_threads(), "clock": clock, "rows": rows, "skipped": skipped,
            "dispatch": _dispatch_summary(cases, x, dy)}


def dispatch_counts(model: nn.Module, step: Callable[[], None]) -> dict[str, int]:
    """How many adapted calls of one ``step()`` of ``model`` ran each backend/strategy [source]."""
    from flora_kernels.backends.autotune import record_dispatch

    with record_dispatch(model) as rep:
        step()
    counts: dict[str, int] = {}
    for ds in rep.values():
        for d in ds:
            k = f"{d.label} [{d.source}]"
            counts[k] = counts.get(k, 0) + 1
    return counts


def _dispatch_summary(cases: Sequence[ModelCase], x: Tensor, dy: Tensor) -> dict[str, dict[str, int]]:
    """Per FLoRA provider: ``dispatch_counts`` of one step."""
    return {c.name: dispatch_counts(c.model, functools.partial(_step, c, x, dy))
            for c in cases if c.name.startswith("flora")}


def markdown(results: Sequence[dict]) -> str:
    """The results as Markdown tables, one per model and thread count."""
    lines = []
    for res in results:
        lines.append(f"### {res['model']}, {res['threads']} thread(s), batch {res['batch']}, "
                     f"{res['image_size']}x{res['image_size']}, rank {res['rank']}, median of {res['rounds']}, {res.get('clock', 'wall')} clock")
        lines.append("")
        lines.append(f"Model: {res['impl']}.")
        lines.append("")
        lines.append("| provider | step ms | ratio to frozen | q20-q80 | first step extra ms | check "
                     "| saved for backward MiB | peak MiB |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in res["rows"]:
            chk = "" if r["check_rel_err"] is None else f"{r['check_rel_err']:.1e}"
            lines.append(f"| {r['provider']} | {r['median_ms']:.1f} | {r['ratio']:.2f}x | {r['ratio_q20']:.2f}-"
                         f"{r['ratio_q80']:.2f} | {r['first_extra_ms']:.0f} | {chk} | {fmt_mib(r.get('saved_mib'))} "
                         f"| {fmt_mib(r.get('peak_mib'))} |")
        for n, why in res["skipped"].items():
            lines.append(f"| {n} | skipped: {why} | | | | | | |")
        lines.append("")
        for n, counts in res.get("dispatch", {}).items():
            lines.append(f"- {n} dispatch: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        lines.append("")
    return "\n".join(lines)
