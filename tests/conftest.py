"""Test setup: Triton's CPU interpreter (set before any @triton.jit is imported), markers, the
two tiers, seeds.

Tiers: ``python -m pytest -q tests`` runs the fast tier (a few minutes on 2 cores);
``python -m pytest -q tests --full`` (what CI runs) adds the slow tier: the folders and files in
``SLOW`` (real models built from configs, the Triton interpreter, PEFT's own suite, compiled
hotswap, the benchmark cases, distributed runs) and every test marked ``slow``.
"""

from __future__ import annotations

import os
from pathlib import Path

if not os.environ.get("FLORA_TEST_GPU"):
    # Without a GPU, Triton kernels run on CPU tensors through the interpreter. It must be set
    # before triton.jit decorators run, i.e. before flora_kernels.backends.triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import flora_bench.torchvision_compat  # noqa: F401  (before anything imports timm / transformers / torchvision)


# Paths under tests/ whose tests form the slow tier.
SLOW = (
    "models/",
    "backends/triton/",
    "bench/",
    "hotswap/",
    "peft/test_peft_suite.py",
    "test_distributed.py",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="run the slow tier too (CI does)")


def _slow(item: pytest.Item) -> bool:
    root = Path(__file__).parent
    rel = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
    return "slow" in item.keywords or rel.startswith(SLOW)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run by bench/device_check.sh)")
    config.addinivalue_line("markers", "slow: longer CPU test")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--full") and not config.option.markexpr:
        slow = [item for item in items if _slow(item)]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not _slow(item)]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _autotune_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Measured dispatch writes its cache under a per-session temp dir, never the user's."""
    os.environ["FLORA_CACHE_DIR"] = str(tmp_path_factory.mktemp("flora_cache"))
