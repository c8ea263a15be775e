"""Make torchvision's Python parts importable on a CPU-only torch (imported first by flora_bench and by
tests/conftest.py).

The torchvision wheel on PyPI is a CUDA build. With the CPU torch its C extension does not
load, and ``import torchvision`` (hence ``import timm``, and transformers' model classes, which
import it) dies in torchvision/_meta_registrations.py: it registers fake kernels for
``torchvision::nms`` / ``torchvision::qnms``, ops that only the extension defines. Defining
the two schemas first (the ones torchvision's csrc declares) lets the import finish; no
torchvision op is ever called here. A working extension is loaded instead when there is one.
This workaround lives in the benchmark and the tests, never in the library (flora_kernels).
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _has_op(qualname: str) -> bool:
    try:
        torch._C._get_schema(qualname, "")
    except RuntimeError:
        return False
    return True


def _extension_loads(package_dir: str) -> bool:
    for lib in glob.glob(os.path.join(package_dir, "_C*.so")):
        try:
            torch.ops.load_library(lib)
        except OSError:
            return False
        return True
    return False


def _define_torchvision_schemas() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return  # not installed: the modules that need it skip themselves
    if all(_has_op(f"torchvision::{n}") for n in _SCHEMAS) or _extension_loads(spec.submodule_search_locations[0]):
        return
    for name, schema in _SCHEMAS.items():
        if not _has_op(f"torchvision::{name}"):
            torch.library.define(f"torchvision::{name}", schema)


_define_torchvision_schemas()
