"""Quantized bases through PEFT (get_peft_model / save_pretrained / PeftModel.from_pretrained /
merge_and_unload), and flora_kernels without bitsandbytes and torchao installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from quant_common import IN, OUT, make_base, packed_copy, packed_equal, randomize_adapter_
from torch import nn

from flora_kernels.layers import FLoRAQuantLinear, QuantizedMergeWarning
from flora_kernels.testing import rel_err

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Net(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.proj = base
        self.head = nn.Linear(OUT, 2)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)))


@pytest.mark.parametrize("base", ["bnb-nf4", "bnb-int8", "torchao-int8wo"])
def test_peft_get_model_save_load_merge(base, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    import flora_kernels.peft  # noqa: F401  (registers FLORA)
    from flora_kernels.peft import FloraConfig

    quantized = make_base(base)
    packed = packed_copy(quantized)
    model = get_peft_model(Net(quantized), FloraConfig(r=4, target_modules=["proj"]))
    layer = model.base_model.model.proj
    assert isinstance(layer, FLoRAQuantLinear) and isinstance(layer, BaseTunerLayer)
    randomize_adapter_(layer)
    x = torch.randn(6, IN)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    assert layer.core.grad is not None and packed_equal(packed, packed_copy(layer))
    model.eval()  # from_pretrained returns an eval model (bitsandbytes has its own CPU eval kernel)
    with torch.no_grad():
        y = model(x)
    model.save_pretrained(tmp_path)
    fresh = Net(quantized)
    fresh.head.load_state_dict(model.base_model.model.head.state_dict())
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert isinstance(loaded.base_model.model.proj, FLoRAQuantLinear)
    with torch.no_grad():
        assert torch.allclose(loaded(x), y, atol=1e-5, rtol=1e-4)
    with pytest.warns(QuantizedMergeWarning):
        merged = loaded.merge_and_unload()
    assert type(merged.proj) is type(quantized) and type(merged.proj.weight) is type(quantized.weight)
    with torch.no_grad():
        assert rel_err(merged(x), y) < 0.5  # requantized: the warning gives the weight's rounding


def test_import_and_plain_layers_without_bitsandbytes_and_torchao():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["bitsandbytes"] = None  # import fails
        sys.modules["torchao"] = None
        import torch, flora_kernels as fk
        from flora_kernels.layers import layer_class_for, FLoRALinear
        m = torch.nn.Sequential(torch.nn.Linear(8, 4))
        fk.inject_flora(m, fk.FLoRAConfig(rank=2, target_modules="all-linear"))
        assert type(m[0]) is FLoRALinear, type(m[0])
        m(torch.randn(3, 8)).sum().backward()
        assert "bitsandbytes" not in [k for k, v in sys.modules.items() if v is not None]
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
