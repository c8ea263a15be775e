"""FLoRA as a PEFT method: ``import flora_kernels.peft`` registers peft_type "FLORA".

    import flora_kernels.peft                      # registers FLoRA with peft
    from flora_kernels.peft import FloraConfig
    from peft import PeftModel, get_peft_model

    model = get_peft_model(model, FloraConfig(r=8, target_modules=["query", "value"]))
    model.print_trainable_parameters()
    model.save_pretrained("out")                   # the same files as fk.save_flora writes
    model = PeftModel.from_pretrained(base, "out")  # in any process that imported this module

The PEFT-facing layers are the library's own layers (``flora_kernels.layers``): at install
their class becomes a subclass that adds PEFT's ``BaseTunerLayer`` (``Peft<Class>``, e.g.
``PeftFLoRALinear``), so forward, merge, strategies and backends are the library's. Targets
are chosen by ``flora_kernels.model.select_targets`` and installed by
``flora_kernels.model.install_adapters``, the same path ``fk.inject_flora`` takes.

PEFT's ``register_peft_method`` only accepts names that are already ``PeftType`` members, so
this module fills the registries it would fill (plain dicts keyed by the type string) itself.
It checks the installed PEFT (version and the internals used here) at import and raises an
ImportError naming what differs. The rest of flora_kernels never imports peft.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

try:
    import peft
    from packaging.version import Version
    from peft import PeftConfig
    from peft import mapping as _peft_mapping
    from peft.tuners import tuners_utils as _tuners_utils
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils import hotswap as _peft_hotswap
    from peft.utils.other import AuxiliaryTrainingWrapper
    from peft.utils.peft_types import PeftType
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        f"flora_kernels.peft needs the peft package (pip install 'peft>=0.21,<0.22'): {e}"
    ) from e

from . import hotswap as _fk_hotswap
from .config import FLoRAConfig, name_matches
from .layers import FLoRALayer, flora_layers
from .model import (
    FORMAT_VERSION,
    adapter_batch,
    adapter_layer_info,
    cast_adapter,
    config_from_peft_dict,
    config_to_peft_dict,
    install_adapters,
    logical_name,
    native_fastpath,
    select_targets,
    set_mixed,
    set_state,
    targets_from_layer_info,
)
from .model import delete_adapter as _fk_delete_adapter

__all__ = ["PEFT_TYPE", "FloraConfig", "FloraModel", "FloraTunerLayer", "check_peft"]

#: PEFT versions this module was written against (inclusive lower, exclusive upper bound).
PEFT_VERSION_RANGE = ("0.21", "0.22")
PREFIX = "flora_"


class FloraPeftType(str, enum.Enum):
    """The peft_type of FLoRA adapters; compares and hashes as the string "FLORA" (like
    ``peft.PeftType`` members)."""

    FLORA = "FLORA"


PEFT_TYPE = FloraPeftType.FLORA

# --------------------------------------------------------------------------- import-time checks

# BaseTuner / BaseTunerLayer / AuxiliaryTrainingWrapper methods this module overrides or calls,
# with the parameters (self excluded) it relies on.
_EXPECTED_SIGNATURES = {
    (BaseTuner, "inject_adapter"): ("model", "adapter_name", "autocast_adapter_dtype", "low_cpu_mem_usage", "state_dict"),
    (BaseTuner, "_prepare_model"): ("peft_config", "model"),
    (BaseTuner, "_prepare_adapter_config"): ("peft_config", "model_config"),
    (BaseTuner, "_check_target_module_exists"): ("peft_config", "key"),
    (BaseTuner, "_create_and_replace"): (
        "peft_config", "adapter_name", "target", "target_name", "parent", "current_key", "parameter_name",
    ),
    (BaseTuner, "_replace_module"): ("parent", "child_name", "new_module", "child"),
    (BaseTuner, "_cast_adapter_dtype"): ("adapter_name", "autocast_adapter_dtype"),
    (BaseTuner, "_unload_and_optionally_merge"): ("merge", "progressbar", "safe_merge", "adapter_names"),
    (BaseTuner, "set_adapter"): ("adapter_name", "inference_mode"),
    (BaseTuner, "delete_adapter"): ("adapter_name",),
    (BaseTunerLayer, "merge"): ("safe_merge", "adapter_names"),
    (BaseTunerLayer, "set_adapter"): ("adapter_names", "inference_mode"),
    (BaseTunerLayer, "set_requires_grad"): ("adapter_names", "requires_grad"),
    (BaseTunerLayer, "delete_adapter"): ("adapter_name",),
    (BaseTunerLayer, "_get_available_adapters"): (),
    (BaseTunerLayer, "_move_adapter_to_device_of_base_layer"): ("adapter_name", "device"),
    (AuxiliaryTrainingWrapper, "delete_adapter"): ("adapter_name", "new_active_adapters"),
}
_REGISTRIES = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")
# peft.utils.hotswap helpers that its entry points look up at call time (wrapped for FLORA below)
_HOTSWAP_HOOKS = {
    "_convert_scalings_to_tensor": ("model",),
    "_pad_lora_weights": ("model", "target_rank"),
    "check_hotswap_configs_compatible": ("config0", "config1"),
    "hotswap_adapter_from_state_dict": ("model", "state_dict", "adapter_name", "config", "parameter_prefix"),
}


def _params(fn: Any) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(fn).parameters if p != "self")


def check_peft(version: str | None = None) -> None:
    """Raise ``ImportError`` naming every difference between the installed peft and what
    this module relies on: the version range, the registries, the hook signatures, and the
    checkpoint key rule (``<module>.flora_core.<adapter>`` saved as ``<module>.flora_core``)."""
    version = peft.__version__ if version is None else version
    lo, hi = PEFT_VERSION_RANGE
    problems = []
    if not Version(lo) <= Version(version) < Version(hi):
        problems.append(f"peft version: expected >={lo},<{hi}, got {version}")
    for name in _REGISTRIES:
        reg = getattr(_peft_mapping, name, None)
        if not isinstance(reg, dict):
            problems.append(f"peft.mapping.{name}: expected a dict, got {type(reg).__name__}")
        elif (other := reg.get(PEFT_TYPE)) is not None and getattr(other, "__module__", __name__) != __name__:
            problems.append(f"peft.mapping.{name}: 'FLORA' is taken already by {other!r}")
    prefixes = getattr(_peft_mapping, "PEFT_TYPE_TO_PREFIX_MAPPING", {})
    if isinstance(prefixes, dict) and any(v == PREFIX and k != PEFT_TYPE for k, v in prefixes.items()):
        problems.append(f"peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING: the prefix {PREFIX!r} is taken already")
    if "FLORA" in PeftType.__members__:
        problems.append("peft.PeftType: has a FLORA member now (a FLoRA method of peft's own would clash)")
    for (owner, meth), expected in _EXPECTED_SIGNATURES.items():
        fn = getattr(owner, meth, None)
        got = None if fn is None else _params(fn)
        if got != expected:
            problems.append(f"{owner.__module__}.{owner.__name__}.{meth}: expected parameters {expected}, got {got}")
    for hook, expected in _HOTSWAP_HOOKS.items():
        fn = getattr(_peft_hotswap, hook, None)
        got = None if fn is None else _params(getattr(fn, "__wrapped__", fn))
        if got != expected:
            problems.append(f"peft.utils.hotswap.{hook}: expected parameters {expected}, got {got}")
    if not hasattr(_tuners_utils, "_ExcludedModule"):
        problems.append("peft.tuners.tuners_utils._ExcludedModule: missing")
    remove = getattr(BaseTuner, "_remove_adapter_name_from_key", None)
    key = None if remove is None else remove("m.flora_core.default", "default")
    if key != "m.flora_core":
        problems.append(f"BaseTuner._remove_adapter_name_from_key: expected 'm.flora_core', got {key!r}")
    if problems:
        raise ImportError(
            "flora_kernels.peft does not support the installed peft:\n  " + "\n  ".join(problems)
            + f"\n(tested with peft >={lo},<{hi}; fk.save_flora / fk.load_flora work without peft)"
        )


check_peft()

# --------------------------------------------------------------------------- config


@dataclass
class FloraConfig(PeftConfig):
    """PEFT config of a FLoRA adapter (``peft_type == "FLORA"``); the fields mirror
    ``fk.FLoRAConfig`` under PEFT's names and the saved adapter_config.json of
    ``fk.save_flora`` loads as one.

    Attributes:
        r: channel ranks: an int or (r_out, r_in) (``FLoRAConfig.rank``).
        kernel_r: spatial ranks of conv kernels (None: the full kernel).
        scale: s in dW = s * G x_0 U_0 ... x_{N-1} U_{N-1}.
        flora_dropout: dropout on the adapter's input (training only).
        target_modules: exact names / suffixes (list), a full-match regex (str), "all-linear",
            or None (every supported layer, tied heads left out).
        exclude_modules: modules never adapted (same rules).
        modules_to_save: modules trained fully and saved with the adapter (PEFT's
            ModulesToSaveWrapper; classification tasks add their head here).
        rank_pattern / scale_pattern: per-module ranks / scales, ``{pattern: value}``; a pattern
            matches a name when ``re.fullmatch(rf"(.*\\.)?(?:{pattern})", name)``.
        strategy: "auto", "factorized" or "merged". backend: "auto", "reference", "triton",
            "cuda" or "cpp".
        lean_memory: the input factor stays frozen (``FLoRAConfig.lean_memory``).
        init_weights: True: the paper's init (core = 0, dW = 0); False: a random core as well.
        layer_info: {module: {type, weight_shape, ranks, scale}} of the installed adapter,
            filled at injection; when given, it fixes the targets and ranks (so a saved adapter
            loads exactly).
    """

    r: int | list[int] = field(default=16, metadata={"help": "Channel ranks: int or (r_out, r_in)."})
    kernel_r: int | list[int] | None = field(
        default=None, metadata={"help": "Spatial ranks of conv kernels; None keeps the full kernel."}
    )
    scale: float = field(default=1.0, metadata={"help": "s in dW = s * G x_n U_n."})
    flora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names/suffixes, a full-match regex, 'all-linear', or None (all supported)."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never adapted (same rules as target_modules)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter."}
    )
    rank_pattern: dict[str, Any] = field(default_factory=dict, metadata={"help": "{pattern: rank} per module."})
    scale_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "{pattern: scale} per module."})
    strategy: str = field(default="auto", metadata={"help": "'auto', 'factorized' or 'merged'."})
    backend: str = field(default="auto", metadata={"help": "'auto', 'reference', 'triton', 'cuda' or 'cpp'."})
    lean_memory: bool = field(
        default=False, metadata={"help": "Freeze the input factor U_in (LoRA-FA style): backward keeps x U_in, not x."}
    )
    layer_info: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "Per-module type, weight shape, ranks and scale (filled at injection)."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: the paper's init (dW = 0); False: a random core too (dW != 0)."}
    )
    flora_format_version: int = field(default=FORMAT_VERSION, metadata={"help": "flora_kernels file format."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self.to_flora_config()  # validates every field, errors name the field

    def to_flora_config(self) -> tuple[FLoRAConfig, dict[str, dict[str, Any]]]:
        """(the equivalent ``fk.FLoRAConfig``, layer_info)."""
        return config_from_peft_dict(self.to_dict())

    @classmethod
    def from_flora_config(
        cls, cfg: FLoRAConfig, layer_info: dict[str, dict[str, Any]] | None = None, **peft_kwargs: Any
    ) -> FloraConfig:
        """The FloraConfig of ``cfg``; ``peft_kwargs`` sets PEFT's own fields (task_type, ...)."""
        d = config_to_peft_dict(cfg, layer_info or {})
        own = {f for f in cls.__dataclass_fields__ if f not in PeftConfig.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in own}, **peft_kwargs)


# --------------------------------------------------------------------------- layers


class FloraTunerLayer(BaseTunerLayer):
    """What PEFT sees of a FLoRA layer: every installed layer's class becomes
    ``Peft<Class>(_PeftLayerMixin, <Class>, FloraTunerLayer)``, so ``isinstance(layer,
    BaseTunerLayer)`` holds and the library's forward/merge stay in charge."""


class _PeftLayerMixin:
    """BaseTunerLayer behaviour in PEFT's vocabulary, on top of ``FLoRALayer``: names that a
    layer does not hold are ignored (PEFT broadcasts every call to every layer)."""

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if adapter_names is not None:
            adapter_names = [a for a in adapter_names if a in self.flora_settings]
        super().merge(adapter_names, safe_merge=safe_merge)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._requested = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's view: the names last set active, including those this layer does not hold
        (they have no effect here)."""
        return self._active + [a for a in getattr(self, "_requested", ()) if a not in self.flora_settings]

    @property
    def active_adapter(self) -> list[str]:
        return self.active_adapters

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        super().unmerge()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name in names & set(self.flora_settings):
            self.set_trainable(name, requires_grad)  # the layer's rule (lean_memory keeps U_in frozen)
        self._changed()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.flora_settings:
            super().delete_adapter(adapter_name)
        self._requested = [a for a in getattr(self, "_requested", ()) if a != adapter_name]

    def _get_available_adapters(self) -> set[str]:
        return set(self.flora_settings)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move the adapter to the base weight's device, keeping its dtype (fp32 adapters)."""
        target = torch.device(device) if device is not None else self.base_weight().device
        if target.type == "meta" or adapter_name not in self.flora_settings:
            return
        core, factors = self.tensors(adapter_name)
        for p in (core, *factors):
            if p.device.type != "meta":
                p.data = p.data.to(target)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """The plain module (its nested FLoRA layers unloaded too), adapters merged if ``merge``."""
        layers = flora_layers(self)
        if merge:
            for _, layer in layers:
                layer.merge(layer.active_adapters if adapter_names is None else adapter_names, safe_merge=safe_merge)
        for real, layer in sorted(layers, key=lambda t: t[0].count("."), reverse=True):
            if real:
                parent, _, child = real.rpartition(".")
                setattr(self.get_submodule(parent), child, layer.unload())
        return self.unload()


_TUNER_CLASSES: dict[type, type] = {}


def _as_tuner_layer(layer: FLoRALayer) -> None:
    """Give ``layer`` its PEFT class (``Peft<Class>``, created once per class, importable
    from this module so that pickling works)."""
    cls = type(layer)
    if issubclass(cls, FloraTunerLayer):
        return
    if cls not in _TUNER_CLASSES:
        name = f"Peft{cls.__name__}"
        tuner_cls = type(name, (_PeftLayerMixin, cls, FloraTunerLayer), {"__module__": __name__, "__qualname__": name})
        _TUNER_CLASSES[cls] = globals()[name] = tuner_cls
    layer.__class__ = _TUNER_CLASSES[cls]


def _holds(module: nn.Module, adapter_name: str) -> bool:
    """Whether ``module`` is a FLoRA layer with ``adapter_name`` on it or on a nested layer."""
    return isinstance(module, FLoRALayer) and any(adapter_name in m.flora_settings for _, m in flora_layers(module))


# --------------------------------------------------------------------------- tuner


class FloraModel(BaseTuner):
    """PEFT tuner of FLoRA adapters (``PeftModel.base_model`` of a FloraConfig model).

    Injection: ``select_targets`` (or the config's ``layer_info``) picks the modules and
    ``install_adapters`` installs the adapter on all of them in one call, before PEFT's
    matching loop; the loop then matches exactly the installed layers. PEFT keeps charge of
    ``modules_to_save`` (ModulesToSaveWrapper), trainability and saving; saved keys are
    ``base_model.model.<module>.flora_core`` / ``.flora_u<n>``, as ``fk.save_flora`` writes.
    """

    prefix = PREFIX
    tuner_layer_cls = FloraTunerLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}
    _injecting: str | None = None  # the adapter being injected
    _low_cpu_mem_usage = False  # of the injection under way

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        target_modules = config.target_modules  # PEFT rewrites "all-linear" and long lists in place
        existed = adapter_name in getattr(model, "flora_configs", {})
        self._injecting, self._low_cpu_mem_usage = adapter_name, low_cpu_mem_usage
        try:
            super().inject_adapter(
                model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
            )
        except Exception:  # leave the model as it was (PeftModel.add_adapter drops the config)
            if not existed and adapter_name in getattr(model, "flora_configs", {}):
                _fk_delete_adapter(model, adapter_name)
            raise
        finally:
            self._injecting, self._low_cpu_mem_usage = None, False
            config.target_modules = target_modules
        config.layer_info = adapter_layer_info(model, adapter_name)

    def _prepare_adapter_config(self, peft_config: FloraConfig, model_config: dict) -> FloraConfig:
        return peft_config  # target_modules=None means every supported layer (FLoRAConfig's rule)

    def _prepare_model(self, peft_config: FloraConfig, model: nn.Module) -> None:
        """Install adapter ``self._injecting`` on every target (one install_adapters call)."""
        cfg, info = peft_config.to_flora_config()
        targets = targets_from_layer_info(cfg, info) if info else select_targets(model, cfg)
        if targets:  # else PEFT's matching loop raises its "not found" error
            first = not getattr(model, "flora_configs", None)
            # PEFT wraps modules_to_save itself; the library's state records the adapter alone
            install_adapters(
                model, targets, self._injecting, replace(cfg, modules_to_save=()), activate=first,
                inference_mode=peft_config.inference_mode, low_cpu_mem_usage=self._low_cpu_mem_usage,
            )
        for _, layer in flora_layers(model):
            _as_tuner_layer(layer)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's rule: adapters are fp32 (fp64 on an fp64 base) with ``autocast_adapter_dtype``,
        else in their base weight's dtype."""
        if not autocast_adapter_dtype:
            cast_adapter(self.model, adapter_name)

    def _adapter_of(self, peft_config: FloraConfig) -> str | None:
        if self._injecting is not None:
            return self._injecting
        return next((n for n, c in self.peft_config.items() if c is peft_config), None)

    def _check_target_module_exists(self, peft_config: FloraConfig, key: str):
        """True for the layers holding the adapter; PEFT's excluded marker for modules that
        exclude_modules or modules_to_save name (PEFT's warnings count them)."""
        if _holds(self.model.get_submodule(key), self._adapter_of(peft_config)):
            return True
        name = logical_name(key)
        for patterns in (peft_config.exclude_modules, peft_config.modules_to_save):
            if patterns and name_matches(name, patterns):
                return _tuners_utils._ExcludedModule()
        return False

    def _create_and_replace(
        self,
        peft_config: FloraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        """Nothing left to do: ``_prepare_model`` installed every target; only a module named
        by a state_dict but not targeted by the config gets here without an adapter."""
        if not _holds(target, adapter_name):
            raise ValueError(
                f"module {current_key!r}: the state_dict has FLoRA tensors for it but the FloraConfig does not "
                f"target it (target_modules={peft_config.target_modules!r}, layer_info has "
                f"{sorted(peft_config.layer_info)})"
            )

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)  # unload: the base module keeps its device and weights

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        native_fastpath(model, enable=True)  # every FLoRA layer is gone
        set_state(model, {}, [])
        return model

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        configs = getattr(self.model, "flora_configs", {})
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        set_state(self.model, configs, [n for n in names if n in configs])

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter (``fk.delete_adapter``: a merged one raises, the others keep their
        merge state; if it was the only active one, the first remaining adapter by name becomes
        active, with PEFT's warning)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        configs = getattr(self.model, "flora_configs", {})
        if adapter_name in configs:
            _fk_delete_adapter(self.model, adapter_name)
        del self.peft_config[adapter_name]
        active = list(getattr(self.model, "flora_active", []))
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                module.delete_adapter(adapter_name, new_active_adapters=active or None)
        self.active_adapter = active

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT's mixed batches (``model(x, adapter_names=[...])``, ``generate`` too) on
        ``fk.adapter_batch``: sample i uses adapter ``adapter_names[i]`` ("__base__": none)."""
        names = kwargs.pop("adapter_names", None)
        if names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        unknown = {n for n in names if n != "__base__"} - set(getattr(self.model, "flora_configs", {}))
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        if any(layer.merged for _, layer in flora_layers(self.model)):
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        names = [None if n == "__base__" else n for n in names]
        # generate's beam search repeats every sample num_beams times, except in the encoder
        beams = kwargs.get("num_beams")
        repeated, encoder_layers = names, []
        if isinstance(beams, int) and beams > 1:
            repeated = [n for n in names for _ in range(beams)]
            get_encoder = getattr(self.model, "get_encoder", None)
            encoder = get_encoder() if callable(get_encoder) else None  # transformers 5: the model itself if none
            if isinstance(encoder, nn.Module) and encoder is not self.model:
                encoder_layers = [m for _, m in flora_layers(encoder)]
        inside = {id(m) for m in encoder_layers}
        handles = []
        try:
            for _, layer in flora_layers(self.model):
                n = len(names) if id(layer) in inside else len(repeated)
                handles.append(layer.register_forward_pre_hook(partial(_check_batch, n=n), with_kwargs=True))
            saved_names = ["__base__" if n is None else n for n in repeated]
            for module in self.model.modules():
                if isinstance(module, AuxiliaryTrainingWrapper):
                    hook = partial(_pass_names, names=saved_names)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            with adapter_batch(self.model, repeated):
                for layer in encoder_layers:
                    set_mixed(layer, names)
                yield
        finally:
            for h in handles:
                h.remove()


def _check_batch(layer: FLoRALayer, args: tuple, kwargs: dict, n: int) -> None:
    """Forward pre-hook: PEFT's error when a layer's batch has another size than ``adapter_names``."""
    x = args[0] if args else next(iter(kwargs.values()))
    size = x.shape[layer.batch_dim(x)]
    if size != n:
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{n} and {size} respectively."
        )


def _pass_names(module: nn.Module, args: tuple, kwargs: dict, names: list[str]) -> tuple[tuple, dict]:
    """Forward pre-hook: hand ``adapter_names`` to a ModulesToSaveWrapper (PEFT's own mixed batches)."""
    return args, {**kwargs, "adapter_names": names}


# --------------------------------------------------------------------------- registration

_peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE.value] = FloraConfig
_peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE.value] = FloraModel
_peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE.value] = PREFIX


def _flora_model(model: nn.Module) -> nn.Module:
    """The model holding the FLoRA layers of a (compiled) PeftModel, or ``model``."""
    model = _fk_hotswap.unwrap_compiled(model)
    tuner = getattr(model, "base_model", None)
    return tuner.model if isinstance(tuner, FloraModel) else model


def _record_layer_info(model: nn.Module) -> None:
    """Refresh the FloraConfigs' layer_info (ranks, scales) from the layers, so that
    ``save_pretrained`` after a hot-swap preparation or a swap writes what the model holds."""
    for name, config in getattr(_fk_hotswap.unwrap_compiled(model), "peft_config", {}).items():
        if isinstance(config, FloraConfig):
            config.layer_info = adapter_layer_info(_flora_model(model), name)


def _hook_hotswap() -> None:
    """Make ``peft.utils.hotswap`` (``prepare_model_for_compiled_hotswap``, ``hotswap_adapter``)
    serve FLORA: the helpers they look up at call time are wrapped to run ``flora_kernels.hotswap``
    on FLoRA models and PEFT's own code on everything else."""
    if getattr(_peft_hotswap.hotswap_adapter_from_state_dict, "__wrapped__", None) is not None:
        return  # this module was imported (reloaded) before
    convert, pad = _peft_hotswap._convert_scalings_to_tensor, _peft_hotswap._pad_lora_weights
    check, swap = _peft_hotswap.check_hotswap_configs_compatible, _peft_hotswap.hotswap_adapter_from_state_dict

    def _convert_scalings_to_tensor(model):
        found = _fk_hotswap.prepare_layers(model) > 0
        return convert(model) or found

    def _pad_lora_weights(model, target_rank):
        found = _fk_hotswap.prepare_layers(model, target_rank) > 0
        _record_layer_info(model)
        return pad(model, target_rank) or found

    def check_hotswap_configs_compatible(config0, config1):
        if PEFT_TYPE not in (config0.peft_type, config1.peft_type):
            return check(config0, config1)
        if config0.peft_type != config1.peft_type:
            raise ValueError(f"Incompatible PEFT types found: {config0.peft_type} and {config1.peft_type}")
        for key in ("flora_dropout", "strategy", "backend"):  # what the swapped tensors do not carry
            if getattr(config0, key) != getattr(config1, key):
                raise ValueError(f"Configs are incompatible: for {key}, {getattr(config0, key)} != {getattr(config1, key)}")
        return None

    def hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config, parameter_prefix="lora_"):
        if getattr(config, "peft_type", None) != PEFT_TYPE:
            return swap(model, state_dict, adapter_name, config, parameter_prefix)
        _fk_hotswap.hotswap_adapter(_flora_model(model), state_dict, adapter_name, layer_info=config.layer_info)
        _record_layer_info(model)
        return None

    for fn, orig in ((_convert_scalings_to_tensor, convert), (_pad_lora_weights, pad),
                     (check_hotswap_configs_compatible, check), (hotswap_adapter_from_state_dict, swap)):
        fn.__wrapped__ = orig
        setattr(_peft_hotswap, orig.__name__, fn)


_hook_hotswap()
