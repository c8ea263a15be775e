"""What a training step keeps for backward: the extension's factorized Linear keeps what PEFT's
LoRA keeps (the layer input for U_in's gradient, and S = x U_in), not B = s U_out G, and not x
where nothing needs it (U_in and W frozen: ``lean_memory``)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import flora_kernels as fk

pytestmark = pytest.mark.skipif(fk.available_backends().get("cpp") != "ok", reason="cpp backend not built")


def saved_storages(fn, exclude: list[Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs, ``exclude`` left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


@pytest.mark.parametrize("train_u_in", [True, False])
def test_cpp_factorized_linear_saves_x_and_s_only(train_u_in: bool) -> None:
    t, d_in, d_out, r = 37, 24, 40, 5
    layer = fk.FLoRALinear(torch.nn.Linear(d_in, d_out), rank=r, strategy="factorized", backend="cpp")
    layer.flora_u1["default"].requires_grad_(train_u_in)
    x = torch.randn(t, d_in)
    params = list(layer.parameters()) + list(layer.base_layer.parameters())
    got = saved_storages(lambda: layer(x), params)
    want = (t * d_in * 4 if train_u_in else 0) + t * r * 4  # x (U_in's gradient), S = x U_in
    assert got == want


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("stride", [1, 2])
def test_factorized_conv_saves_x_and_one_rank_sized_activation(backend: str, stride: int) -> None:
    """Like LoRA's two convs: the layer input (U_in's gradient) and the r_out-channel activation;
    the rest (the folded kernel, the factors' views) is weight-sized and tiny here."""
    n, c_in, c_out, hw, r = 2, 6, 10, 33, 4
    base = torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
    layer = fk.FLoRAConv2d(base, rank=r, strategy="factorized", backend=backend)
    x = torch.randn(n, c_in, hw, hw)
    params = list(layer.parameters()) + list(layer.base_layer.parameters())
    got = saved_storages(lambda: layer(x), params)
    out_hw = (hw - 1) // stride + 1
    want = x.numel() * 4 + n * r * out_hw * out_hw * 4
    small = 8 * c_out * c_in * 9 * 4  # folded kernels and factor views, a few weight-sized tensors at most
    assert want <= got <= want + small, (got, want)
    # the estimate the dispatcher's memory rule uses agrees
    from flora_kernels.backends.base import Call
    from flora_kernels.plan import saved_bytes

    core, factors = layer.tensors("default")
    call = Call.describe("conv", x=x, weight=base.weight, core=core, factors=factors, conv=layer.spec,
                         strategy="factorized")
    assert saved_bytes(call) == want
