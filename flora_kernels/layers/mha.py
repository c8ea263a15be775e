"""FLoRAMultiheadAttention: an adapter on ``nn.MultiheadAttention``'s packed in-projection.

The adapted weight is ``in_proj_weight`` (3E, E), mode order (out, in) as for a Linear: one
Tucker adapter spans q, k and v (``rank`` = (r_out, r_in) of the packed matrix; r_out up to
3E). The output projection ``out_proj`` (a Linear subclass) is adapted as a FLoRALinear child
when it is targeted; this wrapper then computes with its effective weight too, since
``nn.MultiheadAttention`` reads ``out_proj.weight`` directly instead of calling it. The forward
runs the base module's own forward with the effective weights (merged path), so every option
of ``nn.MultiheadAttention`` (masks, ``need_weights``, ``batch_first``) behaves as the base
does. Separate q/k/v weights (kdim or vdim != embed_dim) are not supported; an adapter dropout is
accepted (with a warning) and not applied, as PEFT's LoRA does on this module.
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn
from torch.func import functional_call

from .base import FLoRALayer


class FLoRAMultiheadAttention(FLoRALayer):
    """(query, key, value, ...) -> the base module's outputs. Adapter tensors: core (r_out, r_in);
    factors (3E, r_out), (E, r_in)."""

    base_types = (nn.MultiheadAttention,)
    strategies = ("merged",)
    backends = ("reference",)
    weight_name = "in_proj_weight"

    def __init__(self, base_layer: nn.Module, *args, **kwargs) -> None:
        if isinstance(base_layer, nn.MultiheadAttention) and not base_layer._qkv_same_embed_dim:
            raise TypeError(
                "FLoRAMultiheadAttention: expected packed q/k/v projections (kdim == vdim == embed_dim), got "
                f"kdim={base_layer.kdim}, vdim={base_layer.vdim}, embed_dim={base_layer.embed_dim}"
            )
        super().__init__(base_layer, *args, **kwargs)

    def make_settings(self, rank, kernel_rank, scale, dropout, strategy, backend):
        if dropout:
            warnings.warn(
                f"FLoRAMultiheadAttention: adapter dropout={dropout!r} is not applied on a MultiheadAttention (its "
                "adapters act through the attention's effective weights, as PEFT's LoRA does there)",
                stacklevel=2,
            )
        return super().make_settings(rank, kernel_rank, scale, dropout, strategy, backend)

    @property
    def in_features(self) -> int:
        """PEFT's name: the embedding size E."""
        return self.base_layer.embed_dim

    @property
    def out_features(self) -> int:
        """PEFT's name: 3E (the packed q, k, v projection)."""
        return 3 * self.base_layer.embed_dim

    def _out_proj(self) -> FLoRALayer | None:
        out = self.base_layer.out_proj
        return out if isinstance(out, FLoRALayer) else None

    def _group_layers(self) -> list[FLoRALayer]:
        out = self._out_proj()
        return [self] + ([out] if out is not None else [])

    def batch_dim(self, x: Tensor) -> int:
        return 0 if (self.base_layer.batch_first or x.dim() == 2) else 1

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs):
        if self._mixed is not None:
            return self.forward_mixed(query, *self._mixed, key, value, *args, **kwargs)
        params = {}
        if self._live():
            params[self.weight_name] = self.effective_weight()
        out = self._out_proj()
        if out is not None and out._live():
            params["out_proj.base_layer.weight"] = out.effective_weight()
        if not params:
            return self.base_layer(query, key, value, *args, **kwargs)
        y = functional_call(self.base_layer, params, (query, key, value, *args), kwargs)
        return (self._guard_merged(y[0]), *y[1:])

    def forward_mixed(self, query: Tensor, index: Tensor, names, key: Tensor, value: Tensor, *args, **kwargs):
        """Per-sample adapters (see ``FLoRALayer.forward_mixed``): query, key, value and
        ``key_padding_mask`` are split by sample. Returns (attention output, None)."""
        if args or kwargs.pop("need_weights", False):
            raise ValueError("adapter_batch on MultiheadAttention: pass options by keyword; need_weights is not supported")
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.dim() == 3:
            raise ValueError("adapter_batch on MultiheadAttention: a per-sample (3-D) attn_mask is not supported")
        kpm = kwargs.pop("key_padding_mask", None)
        dim = self.batch_dim(query)
        inputs, dims = [query, key, value], [dim, dim, dim]
        if kpm is not None:
            inputs.append(kpm)
            dims.append(0)

        def run(ts: list[Tensor]) -> Tensor:
            m = ts[3] if len(ts) > 3 else None
            return self.forward(ts[0], ts[1], ts[2], key_padding_mask=m, need_weights=False, **kwargs)[0]

        return self.run_grouped(index, names, inputs, dims, dim, run), None
