"""QLoRA-style training on a quantized frozen base: ``prepare_model_for_kbit_training``.

    import flora_kernels as fk
    model = fk.prepare_model_for_kbit_training(model)         # model holds bnb / torchao Linears
    fk.inject_flora(model, fk.FLoRAConfig(rank=16, target_modules="all-linear"))

What it does (PEFT's recipe of the same name):

1. freezes every parameter;
2. casts the parameters that are not quantized and are stored in fp16 / bf16 (norms,
   embeddings, biases, an unquantized head) to fp32, so that the trainable parts and the
   small ops around them run in full precision; quantized weights (bitsandbytes ``Params4bit``
   / ``Int8Params``, torchao tensor subclasses) are left as they are;
3. with ``use_gradient_checkpointing``: makes the input embeddings' output require grad (so a
   checkpointed block whose inputs are all frozen still gets a graph back to its adapters)
   and turns on the model's gradient checkpointing (transformers'
   ``gradient_checkpointing_enable``; ``gradient_checkpointing_kwargs`` default
   ``{"use_reentrant": True}``, as PEFT).

Nothing here imports bitsandbytes or torchao.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

LOW_PRECISION = (torch.float16, torch.bfloat16)


def is_quantized_tensor(t: Tensor) -> bool:
    """Whether ``t`` is a quantized weight (bitsandbytes Params4bit / Int8Params, a torchao tensor)."""
    cls = type(t)
    return cls.__name__ in ("Params4bit", "Int8Params") or cls.__module__.startswith("torchao.")


def _require_grad_hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
    output.requires_grad_(True)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Prepare a model with quantized Linear layers for adapter training (see the module
    docstring). Call it before ``inject_flora`` / ``get_peft_model``. Returns ``model``.

    Raises:
        TypeError: ``use_gradient_checkpointing`` on a model without
            ``gradient_checkpointing_enable`` (a plain ``nn.Module``; use
            ``torch.utils.checkpoint`` in its forward instead).
    """
    if use_gradient_checkpointing and not callable(getattr(model, "gradient_checkpointing_enable", None)):
        raise TypeError(
            f"use_gradient_checkpointing: expected a model with gradient_checkpointing_enable() (a transformers "
            f"model), got {type(model).__name__}; pass use_gradient_checkpointing=False"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        if p.dtype in LOW_PRECISION and not is_quantized_tensor(p):
            p.data = p.data.to(torch.float32)
    if not use_gradient_checkpointing:
        return model
    if callable(getattr(model, "enable_input_require_grads", None)):
        model.enable_input_require_grads()
    elif callable(getattr(model, "get_input_embeddings", None)):
        model.get_input_embeddings().register_forward_hook(_require_grad_hook)
    kwargs = {"use_reentrant": True} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
