"""Test setup: Triton's CPU interpreter (set before any @triton.jit is imported), markers, seeds."""

from __future__ import annotations

import os

if not os.environ.get("FLORA_TEST_GPU"):
    # Without a GPU, Triton kernels run on CPU tensors through the interpreter. It must be set
    # before triton.jit decorators run, i.e. before flora_kernels.backends.triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util

import pytest
import torch


def _define_torchvision_schemas() -> torch.library.Library | None:
    """The installed torchvision wheel is a CUDA build whose C++ ops do not load on this CPU torch;
    its Python side then fails registering fakes for ``torchvision::nms``/``qnms``, and every
    import of timm, transformers' image utils or peft with it. Declaring the two schemas (no
    kernels) lets those imports succeed; nothing in the tests calls the ops."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        torch.ops.torchvision.nms  # noqa: B018 (probe)
        return None
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return lib


_TORCHVISION_LIB = _define_torchvision_schemas()  # kept alive: the schemas die with the Library


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
