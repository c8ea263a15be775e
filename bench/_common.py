"""The one body every pytest-benchmark case runs: build + check through the harness, then time."""

from __future__ import annotations

import pytest

from flora_bench.counts import counted
from flora_bench.harness import build_case
from flora_bench.providers import SkipProvider


def run_case(benchmark, case_spec, device: str, rounds: int) -> None:
    shape, provider, mode = case_spec
    try:
        case = build_case(shape, provider, mode, device=device)
    except SkipProvider as e:
        pytest.skip(str(e))
    flops, nbytes = counted(shape, mode, case.built.adapted)
    benchmark.group = f"{shape.name}:{mode}"
    benchmark.extra_info.update(
        shape=shape.name,
        description=shape.describe(),
        provider=provider,
        mode=mode,
        impl=case.built.impl,
        flops=flops,
        bytes=nbytes,
        max_rel_error=case.check.get("max", 0.0),
    )
    benchmark.pedantic(case.run, setup=case.setup, rounds=rounds, warmup_rounds=2, iterations=1)
