"""PEFT's own custom-model tests, run with FloraConfig cases.

At collection time the peft source distribution matching the installed peft is fetched once
(``pip download --no-deps --no-binary :all: peft==<version>``) into
``$FLORA_CACHE_DIR/peft-sdist`` (default ``~/.cache/flora_kernels/peft-sdist``), and
``tests/test_custom_models.py``, ``testing_common.py`` and ``testing_utils.py`` are extracted
unchanged. Their tester functions parametrized over PEFT configs are re-parametrized with the
FloraConfig cases below (PEFT's test models plus a ConvTranspose2d model); the rest of those
files is not collected. Offline (no cached copy and no index): the module is skipped, saying so.

    python -m pytest tests/peft/test_peft_suite.py          # ~? s on 2 CPU cores
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.slow

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("diffusers")  # testing_common imports it
pytest.importorskip("accelerate")  # testing_utils imports it

import flora_kernels.peft  # noqa: F401  (registers FLORA)
from flora_kernels.peft import FloraConfig

SDIST_FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py")
PACKAGE = "_peft_sdist_tests"


def _cache_dir() -> Path:
    root = os.environ.get("FLORA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "flora_kernels")
    return Path(root) / "peft-sdist" / f"peft-{peft.__version__}"


def _fetch_suite() -> Path:
    """The folder holding package ``_peft_sdist_tests`` (the three files, unchanged); skips
    the module when they are not cached and cannot be downloaded."""
    root = _cache_dir()
    pkg = root / PACKAGE
    if all((pkg / f).is_file() for f in SDIST_FILES):
        return root
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
               "-d", tmp, f"peft=={peft.__version__}"]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
            error = proc.stderr.strip()[-300:] if proc.returncode else ""
        except subprocess.TimeoutExpired:
            error = "timed out after 300 s"
        archives = list(Path(tmp).glob("peft-*.tar.gz"))
        if error or not archives:
            pytest.skip(
                f"PEFT's test suite: cannot download the peft {peft.__version__} sdist (offline?): "
                f"{' '.join(cmd)}: {error or 'no archive'}",
                allow_module_level=True,
            )
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root.parent))
        (staging / PACKAGE).mkdir()
        with tarfile.open(archives[0]) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if Path(m.name).parent.name == "tests"}
            for f in SDIST_FILES:
                (staging / PACKAGE / f).write_bytes(tar.extractfile(members[f]).read())
        (staging / PACKAGE / "__init__.py").write_text("")
        if root.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            staging.rename(root)
    return root


def _import_suite() -> types.ModuleType:
    root = _fetch_suite()
    if importlib.util.find_spec("datasets") is None:
        # testing_utils imports datasets.load_dataset at module level; no test run here loads a dataset
        stub = types.ModuleType("datasets")

        def load_dataset(*args, **kwargs):
            raise RuntimeError("datasets is not installed")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(f"{PACKAGE}.test_custom_models")
    finally:
        sys.path.remove(str(root))


suite = _import_suite()


class ModelConvTranspose2D(nn.Module):
    """A layer type FLoRA adds (ConvTranspose2d, grouped), in the style of PEFT's test models."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_t = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(6 * 7 * 7, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = X[:, :8].reshape(-1, 4, 3, 3)
        X = self.conv_t(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        return self.sm(X)


class FloraModels(suite.MockTransformerWrapper):
    """PEFT's test models and the ones added here, by model id."""

    @classmethod
    def from_pretrained(cls, model_id, dtype=None):
        if model_id == "ConvTranspose2d":
            torch.manual_seed(0)
            return ModelConvTranspose2D().to(dtype or torch.float32)
        return super().from_pretrained(model_id, dtype=dtype)


# (id, model id, config class, config kwargs): every PEFT test model type FLoRA adapts, once.
FLORA_CASES = [
    ("MLP FLoRA", "MLP", FloraConfig, {"target_modules": ["lin0", "lin1"], "r": 4}),
    ("MLP FLoRA dropout modules_to_save", "MLP", FloraConfig,
     {"target_modules": ["lin0"], "r": [3, 2], "flora_dropout": 0.1, "modules_to_save": ["lin1"]}),
    # scale 8: with the paper's init (core = 0) the factors start to move in the second step, by
    # an amount proportional to s^2; test_only_params_are_updated trains 3 SGD steps (tol 1e-4)
    # and this model's gradients reaching the embedding are small
    ("EmbConv1D FLoRA", "EmbConv1D", FloraConfig, {"target_modules": ["emb", "conv1d"], "r": 3, "scale": 8.0}),
    ("Conv1d FLoRA", "Conv1d", FloraConfig, {"target_modules": ["conv1d"]}),
    ("Conv1dGroups FLoRA", "Conv1dGroups", FloraConfig, {"target_modules": ["conv1d"], "r": 2}),
    ("Conv2d FLoRA kernel_r", "Conv2d", FloraConfig, {"target_modules": ["conv2d"], "r": 4, "kernel_r": 2}),
    ("Conv2dGroups FLoRA", "Conv2dGroups", FloraConfig, {"target_modules": ["conv2d", "lin0"], "r": 4}),
    ("Conv3d FLoRA", "Conv3d", FloraConfig, {"target_modules": ["conv3d"], "r": 4}),
    ("MHA FLoRA", "MHA", FloraConfig, {"target_modules": ["mha"], "r": 4}),
    ("MHA out_proj FLoRA dropout", "MHA", FloraConfig,
     {"target_modules": ["mha", "mha.out_proj"], "r": 4, "flora_dropout": 0.1}),
    ("ConvTranspose2d FLoRA", "ConvTranspose2d", FloraConfig, {"target_modules": ["conv_t"], "r": 2}),
]
CASE_ARGS = "test_name, model_id, config_cls, config_kwargs"
MULTI_ARGS = "test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2"
MULTI_CASES = [  # TestMultipleActiveAdapters: "flora" resolves to PEFT's MLP
    ("FLoRA Same", "flora", FloraConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin0"], "r": 3, "init_weights": False}),
    ("FLoRA Different", "flora", FloraConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin1"], "init_weights": False}),
]

# Tester functions left out, with the reason (LoRA internals, LoRA-only options, or a LoRA
# limitation that FLoRA does not have).
LEFT_OUT: dict[str, str] = {
    "test_mixed_adapter_batches_mha_raises": "checks that LoRA's MultiheadAttention rejects mixed batches "
    "('lora.MultiheadAttention does not support mixed adapter batches'); FLoRA's supports them",
    "test_mixed_adapter_batches_lora_opt_timing": "a timing check on facebook/opt-125m from the Hub, GPU only "
    "(@require_non_cpu)",
}


def _as_flora(cfg: peft.PeftConfig) -> FloraConfig | None:
    """The FloraConfig standing for one of PEFT's LoraConfig test configs (None: not a LoRA one)."""
    if not isinstance(cfg, peft.LoraConfig) or cfg.target_parameters:
        return None
    tm = cfg.target_modules
    return FloraConfig(
        r=cfg.r, target_modules=sorted(tm) if isinstance(tm, (set, list)) else tm, init_weights=False,
        modules_to_save=cfg.modules_to_save, task_type=cfg.task_type,
    )


def _translated(rows: list) -> list:
    """PEFT's rows of config objects (test_name, config, ...) with their LoRA configs as FloraConfigs."""
    out = []
    for name, *rest in rows:
        cfgs = [_as_flora(c) if isinstance(c, peft.PeftConfig) else c for c in rest]
        if all(c is not None for c in cfgs):
            out.append((name.replace("LoRA", "FLoRA"), *cfgs))
    return out


def _reparametrized(fn: types.FunctionType, argnames: str, cases: list) -> types.FunctionType:
    """A copy of test function ``fn`` whose parametrization over ``argnames`` is ``cases``."""
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__dict__.update(fn.__dict__)
    new.__qualname__ = fn.__qualname__
    new.pytestmark = [m for m in getattr(fn, "pytestmark", []) if not (m.name == "parametrize" and m.args[0] == argnames)]
    ids = [c[0] if isinstance(c, tuple) and isinstance(c[0], str) else getattr(c, "__name__", str(c)) for c in cases]
    return pytest.mark.parametrize(argnames, cases, ids=ids)(new)


def _flora_cases(argnames: str, rows: list) -> list | None:
    """The FLoRA cases replacing PEFT's parametrization ``rows`` over ``argnames`` (None: a
    parametrization that does not name the PEFT method)."""
    if argnames == CASE_ARGS:
        return FLORA_CASES
    if argnames == MULTI_ARGS:
        return MULTI_CASES
    if argnames == "config_cls":
        return [FloraConfig]
    names = [a.strip() for a in argnames.split(",")]
    if names[0] == "test_name" and any(n.startswith("config") for n in names[1:]):
        return _translated(rows)
    return None


def _flora_class(base: type, **attrs) -> type:
    """``Flora<base>``: PEFT test class ``base`` holding only its tests parametrized over PEFT
    methods, re-parametrized with FLoRA cases; its other tests are hidden from collection."""
    ns: dict = dict(attrs)
    for cls in base.__mro__:
        for attr, fn in vars(cls).items():
            if not attr.startswith("test_") or attr in ns:
                continue
            ns[attr] = None  # hidden unless re-parametrized below
            if attr in LEFT_OUT:
                continue
            for m in getattr(fn, "pytestmark", []):
                cases = _flora_cases(m.args[0], list(m.args[1])) if m.name == "parametrize" else None
                if cases:
                    ns[attr] = _reparametrized(fn, m.args[0], cases)
                    break
    name = base.__name__.replace("TestPeft", "Test").replace("Test", "TestFlora", 1)
    return type(name, (base,), ns)


class _MultipleActiveAdapters(suite.TestMultipleActiveAdapters):
    def resolve_model_cls(self, tuner_method):
        return suite.MLP(bias=True) if tuner_method == "flora" else super().resolve_model_cls(tuner_method)


TestFloraCustomModel = _flora_class(suite.TestPeftCustomModel, transformers_class=FloraModels)
TestFloraMultipleActiveAdapters = _flora_class(_MultipleActiveAdapters)
TestFloraMixedAdapterBatches = _flora_class(suite.TestMixedAdapterBatches)
