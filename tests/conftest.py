"""Test setup: Triton's CPU interpreter (set before any @triton.jit is imported), markers, seeds."""

from __future__ import annotations

import os

if not os.environ.get("FLORA_TEST_GPU"):
    # Without a GPU, Triton kernels run on CPU tensors through the interpreter. It must be set
    # before triton.jit decorators run, i.e. before flora_kernels.backends.triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import torchvision_shim  # noqa: F401  (before anything imports timm / transformers / torchvision)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run by bench/device_check.sh)")
    config.addinivalue_line("markers", "slow: longer CPU test")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
