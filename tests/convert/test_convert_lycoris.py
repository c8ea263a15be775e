"""LyCORIS LoRA/LoCon (Tucker and plain) -> FLoRA import.

Proven two ways: against the ``lycoris-lora`` package's own LoCon modules (skipped where it is
not installed), and against the delta formula written here from LyCORIS's definition
(dW = scale * up @ down, or scale * mid x_0 up x_1 down^T with a Tucker mid; scale = alpha / r),
which needs nothing but torch.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from flora_kernels.convert.lycoris import import_lycoris, plan_lycoris
from flora_kernels.layers import flora_layers

ATOL = RTOL = 2e-5
HAS_LYCORIS = importlib.util.find_spec("lycoris") is not None


class Net(nn.Module):
    """Strided conv, dilated depthwise conv (in/groups = 1), grouped conv, Conv1d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.gconv(torch.tanh(self.dw(self.conv(x)))))
        return self.fc(torch.tanh(self.c1(x.flatten(2)).mean(-1)))


@pytest.fixture
def base() -> Net:
    return Net().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8)


def snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()}, repr(model))


def assert_unchanged(model: nn.Module, snap) -> None:
    state, grads, text = snap
    assert not flora_layers(model) and not hasattr(model, "flora_config")
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert repr(model) == text


# ----------------------------------------------------------------------------- against lycoris-lora


@pytest.fixture(scope="module")
def lycoris():
    if not HAS_LYCORIS:
        pytest.skip("lycoris-lora is not installed (pip install lycoris-lora)")
    import logging

    import lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    return lycoris


@pytest.mark.parametrize("tucker", [True, False], ids=["tucker", "plain"])
def test_import_matches_lycoris_modules(lycoris, base, x, tmp_path, tucker):
    model = copy.deepcopy(base)
    net = lycoris.create_lycoris(
        model, 1.0, linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=3.0, algo="lora", use_tucker=tucker,
    )
    net.apply_to()
    with torch.no_grad():
        for lora in net.loras:
            lora.lora_up.weight.normal_(0.0, 0.3)  # LyCORIS initializes up to zero
    path = tmp_path / "lyco.safetensors"
    net.save_weights(str(path), torch.float32, None)
    ours = import_lycoris(copy.deepcopy(base), path, backend="reference").eval()
    layers = dict(flora_layers(ours))
    assert set(layers) == {"conv", "dw", "gconv", "c1", "fc"}
    for lora in net.loras:
        name = lora.lora_name[len("lycoris_"):]
        if tucker and name != "fc":
            assert lora.tucker
        # The layer's delta equals LyCORIS's own (scale included).
        torch.testing.assert_close(layers[name].delta_weight(), lora.get_diff_weight()[0], atol=ATOL, rtol=RTOL)
    if tucker:
        assert layers["conv"].ranks == (4, 4, 3, 3)  # U_in = down^T, kernel factors identity
        assert layers["dw"].ranks == (4, 1, 3, 3)  # r > in/groups: down folded into the core
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), atol=ATOL, rtol=RTOL)


class Heads(nn.Module):
    """A 3-output head, a 3-channel conv_out and 1x1 conv: LyCORIS accepts rank 8 on them."""

    def __init__(self, linear: type[nn.Linear] = nn.Linear) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 16, 3, padding=1)
        self.conv_out = nn.Conv2d(16, 3, 3, padding=1)
        self.pw_out = nn.Conv2d(16, 3, 1)
        self.classifier = linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv_in(x))
        return self.conv_out(h).mean((2, 3)) + self.pw_out(h).mean((2, 3)) + self.classifier(h.mean((2, 3)))


def lycoris_file(lycoris, base: nn.Module, path, tucker: bool, dim: int = 8) -> object:
    net = lycoris.create_lycoris(
        copy.deepcopy(base), 1.0, linear_dim=dim, linear_alpha=4.0, conv_dim=dim, conv_alpha=2.0, algo="lora",
        use_tucker=tucker,
    )
    net.apply_to()
    with torch.no_grad():
        for lora in net.loras:
            lora.lora_up.weight.normal_(0.0, 0.3)
    net.save_weights(str(path), torch.float32, None)
    return net


@pytest.mark.parametrize("tucker", [True, False], ids=["tucker", "plain"])
def test_import_rank_above_layer_max_is_exact(lycoris, tmp_path, tucker):
    base = Heads().eval()
    path = tmp_path / "lyco.safetensors"
    net = lycoris_file(lycoris, base, path, tucker)
    ours = import_lycoris(copy.deepcopy(base), path, backend="reference").eval()
    layers = dict(flora_layers(ours))
    assert set(layers) == {"conv_in", "conv_out", "pw_out", "classifier"}
    assert layers["classifier"].ranks == (3, 3)  # was: "LoRA rank 8 ... larger than the layer allows"
    assert layers["conv_out"].ranks[0] == 3 and layers["pw_out"].ranks == (3, 3, 1, 1)
    for lora in net.loras:
        name = lora.lora_name[len("lycoris_"):]
        torch.testing.assert_close(layers[name].delta_weight(), lora.get_diff_weight()[0], atol=ATOL, rtol=RTOL)
    x = torch.randn(2, 4, 6, 6)
    expected = copy.deepcopy(base)
    with torch.no_grad():
        for lora in net.loras:
            m = expected.get_submodule(lora.lora_name[len("lycoris_"):])
            m.weight.add_(lora.get_diff_weight()[0])
        torch.testing.assert_close(ours(x), expected(x), atol=ATOL, rtol=RTOL)


def test_import_on_timm_linear_subclass(lycoris, tmp_path):
    from flora_kernels.layers import wrap

    timm_layers = pytest.importorskip("timm.layers")
    base = Heads(linear=timm_layers.Linear).eval()
    assert type(base.classifier) is not nn.Linear
    path = tmp_path / "lyco.safetensors"
    net = lycoris_file(lycoris, base, path, tucker=True, dim=2)
    assert any(lora.lora_name == "lycoris_classifier" for lora in net.loras)
    ours = import_lycoris(copy.deepcopy(base), path, backend="reference").eval()
    lora = next(lora for lora in net.loras if lora.lora_name == "lycoris_classifier")
    layer = dict(flora_layers(ours))["classifier"]
    torch.testing.assert_close(layer.delta_weight(), lora.get_diff_weight()[0], atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------- against the formula


def lycoris_state(base: Net, r: int = 3, tucker: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    s = {}
    for name in ("conv", "dw", "gconv", "c1", "fc"):
        m = base.get_submodule(name)
        w = m.weight.shape
        k, ones = tuple(w[2:]), (1,) * (len(w) - 2)
        pre = f"lycoris_{name}"
        if tucker and k:
            s[f"{pre}.lora_down.weight"] = torch.randn(r, w[1], *ones, generator=g)
            s[f"{pre}.lora_mid.weight"] = torch.randn(r, r, *k, generator=g)
        else:
            s[f"{pre}.lora_down.weight"] = torch.randn(r, *w[1:], generator=g)
        s[f"{pre}.lora_up.weight"] = torch.randn(w[0], r, *ones, generator=g) * 0.3
        s[f"{pre}.alpha"] = torch.tensor(float(r + 1))
    return s


def formula_delta(s: dict[str, torch.Tensor], name: str, shape) -> torch.Tensor:
    pre = f"lycoris_{name}"
    down, up = s[f"{pre}.lora_down.weight"].double(), s[f"{pre}.lora_up.weight"].double()
    r = down.shape[0]
    scale = float(s[f"{pre}.alpha"]) / r
    up = up.reshape(up.shape[0], r)
    if f"{pre}.lora_mid.weight" in s:
        mid = s[f"{pre}.lora_mid.weight"].double()
        dw = torch.einsum("ab...,oa,bi->oi...", mid, up, down.reshape(r, -1))
    else:
        dw = (up @ down.reshape(r, -1)).reshape(shape)
    return scale * dw


@pytest.mark.parametrize("tucker", [True, False], ids=["tucker", "plain"])
def test_import_matches_formula(base, x, tucker):
    state = lycoris_state(base, tucker=tucker)
    ours = import_lycoris(copy.deepcopy(base), state, backend="reference").eval()

    def patched(module: nn.Module, name: str):
        w = module.weight
        return w + formula_delta(state, name, w.shape).to(w.dtype)

    expected = copy.deepcopy(base)
    with torch.no_grad():
        for name in ("conv", "dw", "gconv", "c1", "fc"):
            m = expected.get_submodule(name)
            m.weight.copy_(patched(m, name))
        for name, layer in flora_layers(ours):
            torch.testing.assert_close(
                layer.delta_weight().double(), formula_delta(state, name, layer.base.weight.shape), atol=1e-5, rtol=1e-5
            )
        torch.testing.assert_close(ours(x), expected(x), atol=ATOL, rtol=RTOL)


def test_import_alpha_missing_or_zero_means_rank(base):
    state = {k: v for k, v in lycoris_state(base, tucker=False).items() if k.startswith("lycoris_fc.")}
    state["lycoris_fc.alpha"] = torch.tensor(0.0)
    a = dict(flora_layers(import_lycoris(copy.deepcopy(base), state)))["fc"]
    del state["lycoris_fc.alpha"]
    b = dict(flora_layers(import_lycoris(copy.deepcopy(base), state)))["fc"]
    assert a.scale == b.scale == 1.0


def test_import_prefix(base):
    state = {k.replace("lycoris_", "lora_unet_"): v for k, v in lycoris_state(base).items()}
    model = import_lycoris(copy.deepcopy(base), state, prefix="lora_unet")
    assert len(flora_layers(model)) == 5


# ----------------------------------------------------------------------------- errors


def _bad(base: Net, case: str):
    s = lycoris_state(base)
    if case == "loha":
        s["lycoris_fc.hada_w1_a"] = torch.randn(6, 2)
        return s, r"lycoris_fc\.hada_w1_a: a LyCORIS LoHa tensor \(shape \(6, 2\)\)"
    if case == "unknown module":
        s["lycoris_nope.lora_up.weight"] = torch.randn(6, 3)
        return s, r"lycoris_nope\.lora_up\.weight: unknown key \(shape \(6, 3\)\)"
    if case == "shape":
        s["lycoris_conv.lora_mid.weight"] = torch.randn(3, 3, 5, 5)
        return s, r"lycoris_conv\.lora_mid\.weight: expected shape \(3, 3, 3, 3\).*got \(3, 3, 5, 5\)"
    if case == "up shape":
        s["lycoris_fc.lora_up.weight"] = torch.randn(7, 3)
        return s, r"lycoris_fc\.lora_up\.weight: expected shape \(6, 3\).*got \(7, 3\)"
    if case == "missing up":
        del s["lycoris_gconv.lora_up.weight"]
        return s, r"lycoris_gconv\.lora_up\.weight: missing"
    if case == "dora":
        s["lycoris_fc.dora_scale"] = torch.randn(6, 1)
        return s, r"lycoris_fc\.dora_scale: a LyCORIS DoRA"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["loha", "unknown module", "shape", "up shape", "missing up", "dora"])
def test_import_errors_name_key_and_shapes_and_leave_model(base, case):
    state, pattern = _bad(base, case)
    target = copy.deepcopy(base)
    snap = snapshot(target)
    with pytest.raises(ValueError, match=pattern):
        import_lycoris(target, state)
    assert_unchanged(target, snap)


def test_import_refuses_reflect_padding():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    state = {"lycoris_0.lora_down.weight": torch.randn(2, 3, 3, 3), "lycoris_0.lora_up.weight": torch.randn(4, 2, 1, 1)}
    snap = snapshot(net)
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        import_lycoris(net, state)
    assert_unchanged(net, snap)


# ----------------------------------------------------------------------------- export (kohya/LyCORIS keys)


class ExportNet(Net):
    """Net plus a 1x1 conv (no lora_mid) and a Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv3d(2, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c3(x[:, :2].unsqueeze(2).expand(-1, -1, 3, -1, -1)).mean((1, 2, 3, 4))
        x = torch.tanh(self.gconv(torch.tanh(self.pw(torch.tanh(self.dw(self.conv(x)))))))
        return self.fc(torch.tanh(self.c1(x.flatten(2)).mean(-1))) + y[:, None]


EXPORTED = ["conv", "pw", "dw", "gconv", "c1", "c3", "fc"]


def flora_net(base: nn.Module, rank, scale: float = 0.7, targets=EXPORTED) -> nn.Module:
    import flora_kernels as fk

    model = fk.inject_flora(copy.deepcopy(base), fk.FLoRAConfig(
        rank=rank, kernel_rank=2, scale=scale, target_modules=targets, backend="reference"))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in flora_layers(model):
            layer.core.copy_(torch.randn(layer.core.shape, generator=gen))
            for f in layer.factors:
                f.copy_(torch.randn(f.shape, generator=gen) * 0.5)
    return model.eval()


@pytest.mark.parametrize("mid", [True, False], ids=["mid", "plain"])
@pytest.mark.parametrize("rank", [(3, 2), (2, 3)], ids=["rout>rin", "rout<rin"])
def test_export_loads_in_lycoris_with_same_outputs(lycoris, tmp_path, rank, mid):
    from flora_kernels.convert.lycoris import export_lycoris

    base = ExportNet().eval()
    model = flora_net(base, rank)
    path = tmp_path / "flora.safetensors"
    tensors = export_lycoris(model, path, mid=mid)
    r = max(rank)
    if mid:
        assert tensors["lycoris_conv.lora_mid.weight"].shape == (r, r, 3, 3)  # padded to max(r_out, r_in)
        assert tensors["lycoris_conv.lora_up.weight"].shape == (8, r, 1, 1)
        assert tensors["lycoris_conv.lora_down.weight"].shape == (r, 4, 1, 1)
        r3 = max(rank[0], min(rank[1], 2))  # in_channels 2 caps r_in
        assert tensors["lycoris_c3.lora_mid.weight"].shape == (r3, r3, 3, 3, 3)
    else:
        assert not any(k.endswith("lora_mid.weight") for k in tensors)
        assert tensors["lycoris_conv.lora_down.weight"].shape == (rank[0], 4, 3, 3)  # r_out <= r_in * 2 * 2
    assert "lycoris_pw.lora_mid.weight" not in tensors and tensors["lycoris_pw.lora_up.weight"].shape[2:] == (1, 1)
    assert tensors["lycoris_fc.lora_down.weight"].shape == (min(rank), 8)
    for key, t in tensors.items():
        if key.endswith(".alpha"):  # scale folded into up: alpha = r
            assert float(t) == tensors[key.replace("alpha", "lora_down.weight")].shape[0]

    target = copy.deepcopy(base)
    net, _ = lycoris.create_lycoris_from_weights(1.0, str(path), target)
    net.apply_to()
    assert sorted(lora.lora_name for lora in net.loras) == sorted(f"lycoris_{n}" for n in EXPORTED)
    assert all(lora.tucker == (mid and lora.lora_name not in ("lycoris_pw", "lycoris_fc")) for lora in net.loras)
    layers = dict(flora_layers(model))
    for lora in net.loras:
        layer = layers[lora.lora_name[len("lycoris_"):]]
        torch.testing.assert_close(lora.get_diff_weight()[0], layer.delta_weight(), atol=ATOL, rtol=RTOL)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(target(x), model(x), atol=ATOL, rtol=RTOL)


def test_export_kohya_prefixes_round_trip(tmp_path):
    from flora_kernels.convert.lycoris import KOHYA_PREFIXES, export_lycoris, to_lycoris

    base = ExportNet().eval()
    model = flora_net(base, (3, 2), scale=0.3)
    assert "lora_unet" in KOHYA_PREFIXES
    path = tmp_path / "sub" / "unet.safetensors"
    export_lycoris(model, path, prefix="lora_unet", dtype=torch.float64)
    back = import_lycoris(copy.deepcopy(base), path, prefix="lora_unet", backend="reference").eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-5)
    te = flora_net(nn.Sequential(nn.Linear(8, 6)).eval(), 2, targets=None)
    both = to_lycoris({"lora_unet": model, "lora_te1": te})
    assert {k.split(".")[0] for k in both} == {f"lora_unet_{n}" for n in EXPORTED} | {"lora_te1_0"}


def test_export_errors():
    import flora_kernels as fk
    from flora_kernels.convert.lycoris import to_lycoris

    with pytest.raises(ValueError, match="has no FLoRA layers"):
        to_lycoris(nn.Linear(2, 2))
    refl = fk.inject_flora(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), fk.FLoRAConfig(rank=2))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        to_lycoris(refl)
    lin = fk.merge_flora(fk.inject_flora(nn.Sequential(nn.Linear(3, 4)), fk.FLoRAConfig(rank=2)))
    with pytest.raises(ValueError, match="unmerge_flora"):
        to_lycoris(lin)
    clash = nn.Module()
    clash.a_b, clash.a = nn.Linear(2, 2), nn.Module()
    clash.a.b = nn.Linear(2, 2)
    fk.inject_flora(clash, fk.FLoRAConfig(rank=1))
    with pytest.raises(ValueError, match="both map to key 'lycoris_a_b'"):
        to_lycoris(clash)
