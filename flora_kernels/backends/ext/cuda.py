"""``CudaBackend``: the extension's CUDA kernels (csrc/flora_cuda.cu), on CUDA tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ...tucker import mode_n_product
from ..base import TensorSpec
from .backend import ExtBackend
from .build import BUILD_HINT, cuda_reason
from .ops import Project, flora

# The limit of the first CUDA reconstruct kernel (r_1 * taps in 48 KiB of shared memory); the tiled
# GEMM kernels that replaced it have none, so _reconstruct_reason is now only conservative.
_MAX_ROW = {torch.float64: 48 * 1024 // 8}
_MAX_ROW_DEFAULT = 48 * 1024 // 4


class CudaBackend(ExtBackend):
    """The extension's CUDA kernels, on CUDA tensors."""

    name = "cuda"
    how_to_get = BUILD_HINT + "; the CUDA kernels need a CUDA build of torch, nvcc and a GPU"
    device_type = "cuda"

    def _compute_reason(self) -> str | None:
        return cuda_reason()

    def _reconstruct_reason(self, core: TensorSpec, factors: Sequence[TensorSpec]) -> str | None:
        row = core.shape[1] * math.prod(f.shape[0] for f in factors[2:])
        limit = _MAX_ROW.get(core.dtype, _MAX_ROW_DEFAULT)
        if row > limit:
            return f"reconstruct kernel keeps r_1 * taps <= {limit} in shared memory, got {row}"
        return None

    @staticmethod
    def project2(t: Tensor, u0: Tensor, u1: Tensor) -> Tensor:
        """u0^T t_k u1 per tap through the backward op with a zero core: its reductions over the
        weight's rows are split across blocks (a reconstruct with t as the core would reduce over
        I1 in one tile, run by one block)."""
        zero_core = t.new_zeros((u0.shape[1], u1.shape[1], t.shape[2]))
        return flora().tucker_reconstruct_backward(t, zero_core, u0, u1, 1.0)[0]

    def _project(self, t: Tensor, factors: Sequence[Tensor]) -> Tensor:
        # The spatial modes first (small), then modes 0 and 1 in one op.
        for n in range(t.dim() - 1, 1, -1):
            t = mode_n_product(t, factors[n].t(), n)
        ranks = tuple(f.shape[1] for f in factors)
        t3 = t.reshape(t.shape[0], t.shape[1], -1)
        return Project.apply(t3, factors[0], factors[1], self.project2).reshape(ranks)
