"""Importer for the paper's public reference parameters (param_G, param_0..N-1).

The oracle below is the paper's formula written from its definition, independent of the
importer's mapping: modes (in, out, k...), D = G x_0 P_0 ... x_{N-1} P_{N-1}, then
dW = s * D with its first two modes swapped, added to W, and the layer's own op run.
"""

from __future__ import annotations

import copy
import string

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flora_kernels as fk
from flora_kernels.convert import from_paper_reference, load_paper_reference, paper_to_ours
from flora_kernels.layers import flora_layers, wrap
from helpers import assert_rel_close, einsum_reconstruct

STRATS = ["factorized", "merged"]


def paper_state(base: nn.Module, ranks_paper: tuple[int, ...], prefix: str = "") -> dict[str, torch.Tensor]:
    """Random paper-format tensors for ``base``: dims (in, out, k...), param_n (dims[n], r_n).

    in = in_channels as the paper's code takes it (for groups=1 equal to weight.shape[1]).
    """
    w = base.weight
    dims = [w.shape[1] * getattr(base, "groups", 1), w.shape[0], *w.shape[2:]]
    state = {f"{prefix}param_G": torch.randn(ranks_paper)}
    for n, (i, r) in enumerate(zip(dims, ranks_paper)):
        state[f"{prefix}param_{n}"] = torch.randn(i, r) / r**0.5
    return state


def paper_delta(state: dict[str, torch.Tensor], scale: float, prefix: str = "") -> torch.Tensor:
    """The paper's dW from its definition (fp64): Tucker product in (in, out, k...) order,
    then swap the first two modes and scale."""
    g = state[f"{prefix}param_G"].double()
    n = g.dim()
    r, i = string.ascii_lowercase[:n], string.ascii_uppercase[:n]
    spec = r + "," + ",".join(i[k] + r[k] for k in range(n)) + "->" + i
    d = torch.einsum(spec, g, *[state[f"{prefix}param_{k}"].double() for k in range(n)])
    return scale * d.transpose(0, 1)


def paper_forward(base: nn.Module, x: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """base(x) + op(x, dW) with the base's geometry, as the paper's layers compute it (fp64)."""
    b = base.double()
    x = x.double()
    if isinstance(b, nn.Linear):
        return b(x) + F.linear(x, dw)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dw.dim() - 2]
    return b(x) + conv(x, dw, None, b.stride, b.padding, b.dilation, b.groups)


CASES = [
    ("linear", lambda: nn.Linear(7, 5), (3, 2), (4, 7)),
    ("conv2d", lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2)), (3, 2, 2, 1), (2, 4, 9, 8)),
    ("conv2d-fullrank-kernel", lambda: nn.Conv2d(3, 5, 3, padding=1, bias=False), (2, 4, 3, 3), (1, 3, 6, 6)),
    ("conv3d", lambda: nn.Conv3d(3, 4, (2, 3, 2), padding=(1, 1, 0)), (2, 3, 1, 2, 2), (1, 3, 4, 5, 4)),
    ("conv1d", lambda: nn.Conv1d(5, 3, 3, stride=2), (4, 2, 2), (2, 5, 11)),
]


def _our_layer(base: nn.Module, ranks_paper: tuple[int, ...], strategy: str, scale: float = 1.0):
    ours = (ranks_paper[1], ranks_paper[0], *ranks_paper[2:])
    kr = ours[2:] or None
    return wrap(copy.deepcopy(base), rank=ours[:2], kernel_rank=kr, scale=scale, strategy=strategy,
                backend="reference")


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("name,make,ranks_paper,xshape", CASES, ids=[c[0] for c in CASES])
def test_import_matches_paper_formula(name, make, ranks_paper, xshape, strategy):
    base = make()
    state = paper_state(base, ranks_paper)
    layer = _our_layer(base, ranks_paper, strategy)
    out = from_paper_reference(layer, state, scale=0.37)
    assert out is layer and layer.scale == 0.37
    x = torch.randn(xshape)
    want = paper_forward(base, x, paper_delta(state, 0.37))
    with torch.no_grad():
        assert_rel_close(layer(x), want, 1e-5, msg=name)
        assert_rel_close(layer.delta_weight(), paper_delta(state, 0.37), 1e-6, msg="dW")


def test_paper_to_ours_is_the_transpose():
    g = torch.randn(2, 3, 2, 1, dtype=torch.float64)
    ps = [torch.randn(i, r, dtype=torch.float64) for i, r in zip((5, 4, 3, 2), g.shape)]
    core, factors = paper_to_ours(g, ps)
    assert core.shape == (3, 2, 2, 1) and factors[0] is ps[1] and factors[1] is ps[0]
    want = einsum_reconstruct(g, ps).transpose(0, 1)
    torch.testing.assert_close(einsum_reconstruct(core, factors), want)


def test_scale_none_keeps_layer_scale_and_prefix():
    base = nn.Linear(6, 4)
    state = paper_state(base, (2, 3), prefix="model.fc.flora_layer.")
    state["model.fc.base_layer.weight"] = torch.randn(4, 6)  # ignored
    layer = _our_layer(base, (2, 3), "factorized", scale=2.0)
    from_paper_reference(layer, state, prefix="model.fc.flora_layer.")
    assert layer.scale == 2.0
    x = torch.randn(3, 6)
    want = paper_forward(base, x, paper_delta(state, 2.0, prefix="model.fc.flora_layer."))
    assert_rel_close(layer(x), want, 1e-5)


def test_import_into_merged_layer():
    base = nn.Conv2d(3, 4, 3, padding=1)
    state = paper_state(base, (2, 3, 3, 3))
    layer = _our_layer(base, (2, 3, 3, 3), "merged")
    layer.merge()
    from_paper_reference(layer, state, scale=0.5)
    assert layer.merged
    torch.testing.assert_close(
        layer.base.weight.double(), base.weight.double() + paper_delta(state, 0.5), rtol=1e-5, atol=1e-5
    )
    x = torch.randn(2, 3, 5, 5)
    assert_rel_close(layer(x), paper_forward(base, x, paper_delta(state, 0.5)), 1e-5)


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _unchanged(m: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    now = m.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def test_shape_errors_name_key_and_shapes_and_change_nothing():
    base = nn.Conv2d(4, 6, 3)
    layer = _our_layer(base, (2, 3, 3, 1), "factorized")  # ours: (3, 2, 3, 1)
    snap = _snapshot(layer)
    good = paper_state(base, (2, 3, 3, 1))
    # our own mode order instead of the paper's: the core's first two modes swapped
    bad = dict(good, param_G=torch.randn(3, 2, 3, 1))
    with pytest.raises(ValueError, match=r"param_G: expected shape \(2, 3, 3, 1\).*got \(3, 2, 3, 1\)"):
        from_paper_reference(layer, bad, scale=9.0)
    bad = dict(good, param_3=torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"param_3: expected shape \(3, 1\).*got \(3, 3\)"):
        from_paper_reference(layer, bad)
    bad = dict(good, param_0=torch.randn(6, 2))  # out where in is expected
    with pytest.raises(ValueError, match=r"param_0: expected shape \(4, 2\).*got \(6, 2\)"):
        from_paper_reference(layer, bad)
    missing = {k: v for k, v in good.items() if k != "param_2"}
    with pytest.raises(KeyError, match=r"param_2: missing.*expected shape \(3, 3\)"):
        from_paper_reference(layer, missing)
    with pytest.raises(ValueError, match=r"unexpected paper factors \['param_4'\]"):
        from_paper_reference(layer, dict(good, param_4=torch.randn(2, 2)))
    with pytest.raises(TypeError, match=r"param_1: expected a floating-point tensor, got torch.int64"):
        from_paper_reference(layer, dict(good, param_1=torch.ones(6, 3, dtype=torch.long)))
    with pytest.raises(TypeError, match=r"scale: expected a float or None, got str"):
        from_paper_reference(layer, good, scale="1")
    assert _unchanged(layer, snap) and layer.scale == 1.0
    with pytest.raises(TypeError, match=r"layer: expected a FLoRALayer.*got Conv2d"):
        from_paper_reference(base, good)


def test_grouped_conv_paper_shapes_rejected_with_reason():
    """The paper sizes param_0 by in_channels for grouped convs; that cannot fit the weight."""
    base = nn.Conv2d(6, 4, 3, groups=2)
    layer = _our_layer(base, (2, 2, 3, 3), "factorized")
    snap = _snapshot(layer)
    state = paper_state(base, (2, 2, 3, 3))  # param_0: (6, 2)
    with pytest.raises(ValueError, match=r"param_0: expected shape \(3, 2\).*got \(6, 2\).*in_channels/groups"):
        from_paper_reference(layer, state)
    assert _unchanged(layer, snap)


@pytest.mark.parametrize("strategy", STRATS)
def test_grouped_conv_our_side(strategy):
    """Correctly sized (in/groups) paper-order tensors: same map, grouped conv with the mapped dW."""
    base = nn.Conv2d(6, 4, 3, padding=1, groups=2)
    layer = _our_layer(base, (3, 2, 2, 3), strategy)
    state = {"param_G": torch.randn(3, 2, 2, 3), "param_0": torch.randn(3, 3), "param_1": torch.randn(4, 2),
             "param_2": torch.randn(3, 2), "param_3": torch.randn(3, 3)}
    from_paper_reference(layer, state, scale=0.8)
    x = torch.randn(2, 6, 5, 5)
    assert_rel_close(layer(x), paper_forward(base, x, paper_delta(state, 0.8)), 1e-5)


# --- model level -------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.conv(x).mean((2, 3)))


PAPER_RANKS = {"conv": (2, 3, 3, 3), "blocks.0": (3, 2), "blocks.2": (2, 1)}


def _paper_model_state(orig: Net) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for name, r in PAPER_RANKS.items():
        m = orig.get_submodule(name)
        sd.update(paper_state(m, r, prefix=f"model.{name}.flora_layer."))
        sd[f"model.{name}.base_layer.weight"] = m.weight.detach().clone()
    return sd


def _paper_model_forward(orig: Net, sd: dict, scale: float, x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(orig).double()
    with torch.no_grad():
        for name in PAPER_RANKS:
            ref.get_submodule(name).weight += paper_delta(sd, scale, prefix=f"model.{name}.flora_layer.")
    return ref(x.double())


def _inject(orig: Net) -> Net:
    model = fk.inject_flora(copy.deepcopy(orig), fk.FLoRAConfig(rank=1, backend="reference"))
    for name, r in PAPER_RANKS.items():  # re-wrap with the paper's ranks
        layer = model.get_submodule(name)
        ours = (r[1], r[0], *r[2:])
        new = wrap(layer.base, rank=ours[:2], kernel_rank=ours[2:] or None, backend="reference")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def test_load_paper_reference_model():
    orig = Net()
    sd = _paper_model_state(orig)
    model = _inject(orig)
    mapping = load_paper_reference(model, sd, scale=0.6)
    assert mapping == {"model.blocks.0": "blocks.0", "model.blocks.2": "blocks.2", "model.conv": "conv"}
    assert all(layer.scale == 0.6 for _, layer in flora_layers(model))
    x = torch.randn(2, 3, 5, 5)
    assert_rel_close(model(x), _paper_model_forward(orig, sd, 0.6, x), 1e-5)


def test_load_paper_reference_module_map_and_errors():
    orig = Net()
    sd = _paper_model_state(orig)
    renamed = {k.replace("model.conv.", "model.stem."): v for k, v in sd.items()}
    model = _inject(orig)
    snap = _snapshot(model)
    msg = r"model\.stem\.flora_layer\.param_G: no FLoRA layer named 'model\.stem' or 'stem'"
    with pytest.raises(ValueError, match=msg):
        load_paper_reference(model, renamed)
    assert _unchanged(model, snap)
    load_paper_reference(model, renamed, module_map={"model.stem": "conv"}, scale=0.6)
    x = torch.randn(2, 3, 5, 5)
    assert_rel_close(model(x), _paper_model_forward(orig, sd, 0.6, x), 1e-5)

    model = _inject(orig)
    snap = _snapshot(model)
    partial = {k: v for k, v in sd.items() if not k.startswith("model.blocks.2.")}
    with pytest.raises(ValueError, match=r"FLoRA layers without a paper adapter in the state dict: \['blocks.2'\]"):
        load_paper_reference(model, partial)
    assert _unchanged(model, snap)
    load_paper_reference(model, partial, strict=False)
    assert not _unchanged(model, snap)

    model = _inject(orig)
    snap = _snapshot(model)
    bad = dict(sd)
    bad["model.blocks.2.flora_layer.param_1"] = torch.randn(3, 1)  # out is 2
    msg = r"model\.blocks\.2\.flora_layer\.param_1: expected shape \(2, 1\).*got \(3, 1\)"
    with pytest.raises(ValueError, match=msg):
        load_paper_reference(model, bad)
    assert _unchanged(model, snap), "the conv and blocks.0 adapters must not be written before validation"
    with pytest.raises(ValueError, match=r"no paper adapters in the state dict"):
        load_paper_reference(model, {"conv.weight": torch.randn(4, 3, 3, 3)})
