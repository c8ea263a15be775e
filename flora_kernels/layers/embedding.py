"""FLoRAEmbedding: an adapter on an ``nn.Embedding`` table (num_embeddings, dim).

The factorized path gathers the rows of U_0 for the ids and never builds dW:

    y = base(ids) + ((U_0[ids] (s G)) U_1^T)        (..., dim)

The merged path looks the ids up in dW. The base part always runs through the base module, so
``max_norm``, ``scale_grad_by_freq`` and ``sparse`` act on the base weight as they do without
the adapter (``scale_grad_by_freq`` scales the U_0 row gradients as well). The adapter's rows
are zero at ``padding_idx`` (its dW row is kept at zero, so merge is exact and the padding
embedding stays the base's). Dropout acts on the adapter's output rows. ``strategy="auto"``
takes the factorized path when the batch has fewer ids than the table has rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from .base import FLoRALayer


class FLoRAEmbedding(FLoRALayer):
    """ids (...) integer -> (..., dim). Adapter tensors: core (r_0, r_1); factors
    (num_embeddings, r_0), (dim, r_1)."""

    base_types = (nn.Embedding,)
    input_mode = None  # the input is indices: no factor multiplies it (lean_memory changes nothing)
    backends = ("reference",)
    binds = True

    @property
    def in_features(self) -> int:
        """PEFT's name for ``num_embeddings``."""
        return self.base_layer.num_embeddings

    @property
    def out_features(self) -> int:
        """PEFT's name for ``embedding_dim``."""
        return self.base_layer.embedding_dim

    def _forward_fused(self, ids: Tensor, name: str, dropout_p: float, *args, **kwargs) -> Tensor:
        core, factors, scale = self.adapter_terms(name)
        s, base = self.flora_settings[name], self.base_layer
        strategy = s.strategy
        if strategy == "auto":
            strategy = "factorized" if ids.numel() < base.num_embeddings else "merged"
        y = self._base_forward(ids)
        if strategy == "factorized":
            rows = reference.embedding_factorized(
                ids, core, factors, scale, base.padding_idx, base.scale_grad_by_freq, y.dtype
            )
        else:
            rows = self._delta_forward(ids, self.delta_weight(name).to(y.dtype))
        if dropout_p > 0:
            rows = F.dropout(rows, dropout_p, training=True)
        return y + rows

    def _delta_term(self, ids: Tensor, name: str, *args, **kwargs) -> Tensor:
        rows = self._delta_forward(ids, self.delta_weight(name).to(self.base_weight().dtype))
        p = self._dropout_p(name)
        return F.dropout(rows, p, training=True) if p > 0 else rows

    def _delta_forward(self, ids: Tensor, delta: Tensor, *args, **kwargs) -> Tensor:
        return F.embedding(ids, delta, self.base_layer.padding_idx, None, 2.0, self.base_layer.scale_grad_by_freq)

    def _mask_delta(self, delta: Tensor) -> Tensor:
        pad = self.base_layer.padding_idx
        if pad is None:
            return delta
        return delta.index_fill(0, torch.tensor([pad], device=delta.device), 0.0)

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        if self.base_layer.max_norm is not None:
            raise ValueError(
                "cannot merge into an nn.Embedding with max_norm: its renorm of the merged rows would change "
                "the function; use the adapter unmerged"
            )
        super().merge(adapter_names, safe_merge)

