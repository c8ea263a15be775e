"""flora_bench: the benchmark of flora_kernels (``flora-bench``, ``python -m flora_bench``), a
top-level package next to the runtime one, installed by the same distribution; users of the
library never import it. The harness is shared by ``flora-bench`` and the pytest-benchmark
suites in bench/.

- ``shapes``: benchmark shapes and presets (gpu, cpu, quick, tiny).
- ``providers``: what is compared (base, FLoRA per backend x strategy, LoRA, the paper's
  formula, torch.compile of the reference path), each built from one set of FLoRA values.
- ``counts``: the FLOP and byte counts behind TFLOP/s and GB/s.
- ``harness``: correctness check against the float64 reference, interleaved timing, memory.
- ``report``: stdout table, JSON, CSV, Markdown, plot, target verdicts.
- ``models``: whole-model training steps (``--models``).
- ``timing``, ``memory``: interleaved rounds, clocks, quantiles; bytes saved for backward, peaks.
"""

from . import torchvision_compat  # noqa: F401  (first: timm, transformers and peft import torchvision)
from .counts import MODES
from .harness import BenchConfig, CorrectnessError, build_case, run
from .shapes import PRESETS, Shape, resolve_shapes

__all__ = ["MODES", "PRESETS", "BenchConfig", "CorrectnessError", "Shape", "build_case", "resolve_shapes", "run"]
