"""pytest-benchmark: Linear shapes (docs/ARCHITECTURE.md, Performance targets Linear, the LLM/ViT linears), every
provider x mode selected by the --flora-* options (see bench/conftest.py)."""

from _common import run_case

OP = "linear"


def test_linear(benchmark, case_spec, flora_device, flora_rounds):
    run_case(benchmark, case_spec, flora_device, flora_rounds)
