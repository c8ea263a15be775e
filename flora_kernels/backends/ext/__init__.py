"""The compiled extension's backends: ``cpp`` (CPU kernels) and ``cuda`` (CUDA kernels).

By role, top to bottom:

- ``flags.py``: the build flags (sources, compiler flags, -gencode list) of setup.py and the JIT build;
- ``build.py``: ``load_extension()`` / ``build_extension()`` (import or JIT-build ``flora_kernels._C``,
  which registers ``torch.ops.flora``), ``BUILD_HINT``;
- ``ops.py``: the op list, the ops' fake (meta) implementations, the autograd Functions over them;
- ``backend.py``: ``ExtBackend``, the ``Backend`` contract both backends share;
- ``cpp.py`` / ``cuda.py``: ``CppBackend`` / ``CudaBackend``, each with its device's choices.
"""

from __future__ import annotations

from .build import BUILD_HINT, build_extension, load_extension
from .cpp import CppBackend
from .cuda import CudaBackend

__all__ = ["BUILD_HINT", "CppBackend", "CudaBackend", "build_extension", "load_extension"]
