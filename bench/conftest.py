"""pytest-benchmark suites over the harness's cases (not part of CI: CI runs ``pytest tests``).

    python -m pytest bench --benchmark-only --benchmark-group-by=group
    python -m pytest bench/test_bench_conv.py --flora-device cpu --flora-shapes quick \\
        --flora-providers 'base,flora-reference-*,lora,paper-formula' --flora-modes full

Options select the same shapes, providers and modes as ``flora-bench`` (names and presets in
``flora-bench --list``). Each case is built and checked against the float64 reference by
``flora_bench.harness.build_case`` before pytest-benchmark times it.
"""

from __future__ import annotations

import fnmatch

import pytest
import torch

from flora_bench.counts import MODES
from flora_bench.providers import default_providers
from flora_bench.shapes import resolve_shapes


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("flora", "flora_kernels benchmark cases")
    g.addoption("--flora-device", default=None, help="cpu or cuda (default: cuda if available)")
    g.addoption(
        "--flora-shapes",
        default=None,
        help="presets or shape names, comma-separated (default: quick on cpu, gpu on cuda)",
    )
    g.addoption(
        "--flora-providers",
        default="base,flora-*,lora,paper-formula",
        help="provider names or fnmatch patterns, comma-separated (compile-reference: name it)",
    )
    g.addoption("--flora-modes", default=",".join(MODES), help="modes, comma-separated")
    g.addoption("--flora-rounds", type=int, default=None, help="timed rounds per case (default: 10 cpu, 50 cuda)")


def _device(config: pytest.Config) -> str:
    return config.getoption("--flora-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case_spec" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    device = _device(cfg)
    op = metafunc.module.OP
    spec = cfg.getoption("--flora-shapes")
    shapes = [s for s in resolve_shapes(spec, device, quick=spec is None and device == "cpu") if s.op == op]
    pats = [p.strip() for p in cfg.getoption("--flora-providers").split(",") if p.strip()]
    provs = [p.name for p in default_providers() if any(fnmatch.fnmatchcase(p.name, pat) for pat in pats)]
    modes = [m.strip() for m in cfg.getoption("--flora-modes").split(",") if m.strip()]
    params = [(s, p, m) for s in shapes for m in modes for p in provs]
    metafunc.parametrize("case_spec", params, ids=[f"{s.name}-{m}-{p}" for s, p, m in params])


@pytest.fixture
def flora_device(request: pytest.FixtureRequest) -> str:
    return _device(request.config)


@pytest.fixture
def flora_rounds(request: pytest.FixtureRequest, flora_device: str) -> int:
    return request.config.getoption("--flora-rounds") or (10 if flora_device == "cpu" else 50)
