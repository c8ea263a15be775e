"""pytest-benchmark: Conv2d shapes (the 3x3 conv and the depthwise 7x7 ConvNeXt conv of
docs/ARCHITECTURE.md, Performance targets), every provider x mode selected by the --flora-* options (bench/conftest.py)."""

from _common import run_case

OP = "conv"


def test_conv(benchmark, case_spec, flora_device, flora_rounds):
    run_case(benchmark, case_spec, flora_device, flora_rounds)
