"""The functional API on the reference path: factorized == merged == an independent oracle for
every conv option, fp64 gradcheck, gradients of both strategies, input validation, backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flora_kernels as fk
from flora_kernels import reference as ref
from flora_kernels.convspec import ConvSpec
from helpers import (
    CONV_CASES,
    CONV_IDS,
    assert_rel_close,
    conv_size,
    einsum_reconstruct,
    make_conv,
    module_with_weight,
)

STRATS = ["factorized", "merged"]


def _adapter(weight_shape, ranks, dtype=torch.float32, grad=False):
    core = torch.randn(ranks, dtype=dtype, requires_grad=grad)
    factors = [(torch.randn(i, r, dtype=dtype) / r**0.5).requires_grad_(grad) for i, r in zip(weight_shape, ranks)]
    return core, factors


def _conv_ranks(base, rank, krank):
    r = (rank, rank) if isinstance(rank, int) else rank
    d = base.weight.dim() - 2
    if krank is None:
        k = tuple(base.weight.shape[2:])
    else:
        k = (krank,) * d if isinstance(krank, int) else krank
    return tuple(min(a, b) for a, b in zip(r + k, base.weight.shape))


def _conv_kwargs(base):
    return dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups,
                padding_mode=base.padding_mode)


LINEAR_CASES = [
    ("3d-x-bias", (2, 3, 7), 5, (2, 3), True),
    ("2d-x-nobias", (4, 6), 9, (3, 2), False),
    ("1d-x-rank1", (5,), 3, (1, 1), True),
    ("full-rank", (3, 4), 4, (4, 4), True),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_linear_strategies_match_oracle(case):
    _, xshape, out, ranks, has_bias = case
    x = torch.randn(xshape)
    w = torch.randn(out, xshape[-1])
    b = torch.randn(out) if has_bias else None
    core, factors = _adapter(w.shape, ranks)
    want = F.linear(x.double(), w.double() + einsum_reconstruct(core.double(), [f.double() for f in factors], 0.6),
                    None if b is None else b.double())
    outs = {s: fk.flora_linear(x, w, b, core, factors, 0.6, strategy=s, backend="reference") for s in STRATS}
    for s, y in outs.items():
        assert y.shape == want.shape and y.dtype == torch.float32
        assert_rel_close(y, want, 1e-5, msg=f"{s} vs oracle")
    assert_rel_close(outs["factorized"], outs["merged"], 1e-5, msg="factorized vs merged")


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_strategies_match_oracle(case):
    base, rank, krank = make_conv(case)
    ranks = _conv_ranks(base, rank, krank)
    core, factors = _adapter(base.weight.shape, ranks)
    x = torch.randn(2, base.in_channels, *([conv_size(case[1])] * case[1]))
    dw = einsum_reconstruct(core.double(), [f.double() for f in factors], 0.8)
    # Oracle: torch's own nn.ConvNd (its padding-mode code) with weight W + dW, in fp64.
    oracle = module_with_weight(base.double(), base.weight.double() + dw, bias=True)
    want = oracle(x.double())
    base.float()
    w, b = base.weight.detach(), None if base.bias is None else base.bias.detach()
    outs = {
        s: fk.flora_conv(x, w, b, core, factors, 0.8, strategy=s, backend="reference", **_conv_kwargs(base))
        for s in STRATS
    }
    for s, y in outs.items():
        assert y.shape == want.shape, (s, y.shape, want.shape)
        assert_rel_close(y, want, 1e-5, msg=f"{s} vs oracle")
    assert_rel_close(outs["factorized"], outs["merged"], 1e-5, msg="factorized vs merged")


@pytest.mark.parametrize("strategy", STRATS)
def test_conv_unbatched_input(strategy):
    base = torch.nn.Conv2d(4, 5, 3, padding=1, groups=1)
    core, factors = _adapter(base.weight.shape, (2, 3, 2, 3))
    x = torch.randn(4, 8, 7)
    y = fk.flora_conv(x, base.weight.detach(), base.bias.detach(), core, factors, 1.3, padding=1, strategy=strategy,
                      backend="reference")
    batched = fk.flora_conv(x[None], base.weight.detach(), base.bias.detach(), core, factors, 1.3, padding=1,
                            strategy=strategy, backend="reference")
    assert y.shape == (5, 8, 7)
    assert_rel_close(y, batched[0], 1e-6)


GRAD_CONV = ["1d-s2-d2-reflect-nobias", "2d-groups2-tuples", "2d-depthwise-same", "3d-groups2-circular"]


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[0] in GRAD_CONV], ids=GRAD_CONV)
def test_conv_gradients_agree_between_strategies(case):
    """Both strategies give the same gradients for x, core and every factor (fp32)."""
    base, rank, krank = make_conv(case)
    ranks = _conv_ranks(base, rank, krank)
    core, factors = _adapter(base.weight.shape, ranks, grad=True)
    x0 = torch.randn(2, base.in_channels, *([conv_size(case[1])] * case[1]))
    dy = None
    grads = {}
    for s in STRATS:
        x = x0.clone().requires_grad_(True)
        y = fk.flora_conv(x, base.weight, base.bias, core, factors, 0.9, strategy=s, backend="reference",
                          **_conv_kwargs(base))
        dy = torch.randn_like(y) if dy is None else dy
        grads[s] = torch.autograd.grad(y, [x, core, *factors], dy)
    for i, (a, b) in enumerate(zip(grads["factorized"], grads["merged"])):
        assert_rel_close(a, b, 1e-5, msg=f"grad {i}")


@pytest.mark.parametrize("strategy", STRATS)
def test_gradcheck_functional_linear_and_grouped_conv(strategy):
    dt = torch.float64
    x = torch.randn(3, 5, dtype=dt, requires_grad=True)
    w, b = torch.randn(4, 5, dtype=dt), torch.randn(4, dtype=dt)
    core, factors = _adapter((4, 5), (2, 3), dt, grad=True)
    assert torch.autograd.gradcheck(
        lambda x, c, *fs: fk.flora_linear(x, w, b, c, fs, 0.7, strategy=strategy, backend="reference"),
        (x, core, *factors),
        fast_mode=True,
    )
    xc = torch.randn(1, 4, 5, 4, dtype=dt, requires_grad=True)
    wc = torch.randn(6, 2, 3, 2, dtype=dt)
    core, factors = _adapter(wc.shape, (2, 2, 2, 1), dt, grad=True)
    assert torch.autograd.gradcheck(
        lambda x, c, *fs: fk.flora_conv(x, wc, None, c, fs, 0.5, stride=(2, 1), padding=1, groups=2,
                                        padding_mode="reflect", strategy=strategy,
                                        backend="reference"),
        (xc, core, *factors),
        fast_mode=True,
    )


def test_dropout_reference_paths():
    """With dropout, both reference paths add op(dropout(x), dW) to an undropped base op."""
    x = torch.randn(64, 16)
    w = torch.randn(8, 16)
    core, factors = _adapter(w.shape, (3, 3))
    for fn in (ref.linear_merged, ref.linear_factorized):
        torch.manual_seed(3)
        y = fn(x, w, None, core, factors, 1.0, 0.5)
        torch.manual_seed(3)
        xd = F.dropout(x, 0.5, training=True)
        want = F.linear(x, w) + F.linear(xd, einsum_reconstruct(core, factors))
        assert_rel_close(y, want, 1e-5, msg=fn.__name__)
    zero = torch.zeros_like(core)
    for fn in (ref.linear_merged, ref.linear_factorized):
        assert torch.equal(fn(x, w, None, zero, factors, 1.0, 0.5), F.linear(x, w))


# --- validation messages -----------------------------------------------------------------------


def test_flora_linear_bad_shapes():
    x, w = torch.randn(3, 5), torch.randn(4, 5)
    core, factors = _adapter((4, 5), (2, 3))
    with pytest.raises(ValueError, match=r"factors\[1\]: expected shape \(5, 3\).*got \(6, 3\)"):
        fk.flora_linear(x, w, None, core, [factors[0], torch.randn(6, 3)])
    with pytest.raises(ValueError, match=r"factors\[0\]: expected shape \(I_0, 2\).*got \(4, 3\)"):
        fk.flora_linear(x, w, None, core, [torch.randn(4, 3), factors[1]])
    with pytest.raises(ValueError, match=r"core: expected 2 modes.*got shape \(2, 3, 1\)"):
        fk.flora_linear(x, w, None, core[..., None], factors + [torch.randn(1, 1)])
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 5\), got \(3, 6\)"):
        fk.flora_linear(torch.randn(3, 6), w, None, core, factors)
    with pytest.raises(ValueError, match=r"bias: expected shape \(4,\), got \(5,\)"):
        fk.flora_linear(x, w, torch.randn(5), core, factors)
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor, got dtype torch.int64"):
        fk.flora_linear(x.long(), w, None, core, factors)
    with pytest.raises(ValueError, match=r"dropout_p: expected a probability in \[0, 1\), got 1.0"):
        fk.flora_linear(x, w, None, core, factors, dropout_p=1.0)


def test_flora_conv_bad_shapes():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3)
    core, factors = _adapter(w.shape, (2, 2, 3, 3))
    with pytest.raises(ValueError, match=r"factors\[1\]: expected shape \(2, 2\).*got \(4, 2\)"):
        fk.flora_conv(x, w, None, core, [factors[0], torch.randn(4, 2), *factors[2:]], groups=2)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 4, 2 spatial dims\).*got \(2, 3, 6, 6\)"):
        fk.flora_conv(torch.randn(2, 3, 6, 6), w, None, core, factors, groups=2)
    with pytest.raises(ValueError, match=r"core: expected 4 modes to match the weight of shape \(6, 2, 3, 3\), got "
                       r"shape \(2, 2, 3\)"):
        fk.flora_conv(x, w, None, core[..., 0], factors[:3], groups=2)
    with pytest.raises(ValueError, match=r"factors\[3\]: expected shape \(3, 3\).*got \(2, 3\)"):
        fk.flora_conv(x, w, None, core, [*factors[:3], torch.randn(2, 3)], groups=2)
    with pytest.raises(ValueError, match=r"padding_mode: expected one of .*got 'mirror'"):
        fk.flora_conv(x, w, None, core, factors, groups=2, padding_mode="mirror")
    with pytest.raises(ValueError, match=r"padding: expected an int, a tuple, 'same' or 'valid', got 'full'"):
        fk.flora_conv(x, w, None, core, factors, groups=2, padding="full")
    with pytest.raises(ValueError, match=r"padding='same' needs stride 1, got stride=\(2, 2\)"):
        fk.flora_conv(x, w, None, core, factors, groups=2, padding="same", stride=2)
    with pytest.raises(ValueError, match=r"stride: expected an int or 2 ints for a 2-D conv, got \(1, 1, 1\)"):
        fk.flora_conv(x, w, None, core, factors, groups=2, stride=(1, 1, 1))


@pytest.mark.parametrize("fn", ["linear", "conv"])
def test_bad_strategy_and_backend_names(fn):
    if fn == "linear":
        x, w = torch.randn(3, 5), torch.randn(4, 5)
        core, factors = _adapter((4, 5), (2, 2))
        call = lambda **kw: fk.flora_linear(x, w, None, core, factors, **kw)  # noqa: E731
    else:
        x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
        core, factors = _adapter(w.shape, (2, 2, 3, 3))
        call = lambda **kw: fk.flora_conv(x, w, None, core, factors, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"strategy: expected one of \('auto', 'factorized', 'merged'\), got 'fast'"):
        call(strategy="fast")
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'reference', .*got 'tpu'"):
        call(backend="tpu")


@pytest.mark.parametrize("name", ["triton", "cuda", "cpp"])
def test_unavailable_backend_raises_with_reason(name):
    reason = fk.available_backends()[name]
    if reason == "ok":
        pytest.skip(f"backend {name} is available here")
    x, w = torch.randn(3, 5), torch.randn(4, 5)
    core, factors = _adapter((4, 5), (2, 2))
    for call, op in [
        (lambda: fk.flora_linear(x, w, None, core, factors, backend=name), "linear"),
        (lambda: fk.tucker_reconstruct(core, factors, backend=name), "reconstruct"),
        (lambda: fk.tucker_project(w, factors, backend=name), "project"),
    ]:
        with pytest.raises(fk.BackendUnavailable) as e:
            call()
        msg = str(e.value)
        assert repr(name) in msg and op in msg and reason.rstrip(".") in msg, msg


@pytest.mark.parametrize("name", ["triton", "cuda", "cpp"])
def test_forced_unavailable_backend(monkeypatch, name):
    """Whatever this machine has: a backend that failed to load is refused with its reason,
    and auto falls back to another one silently."""
    from flora_kernels.backends import base as backends_base

    monkeypatch.setitem(backends_base._INSTANCES, name, "failed to load: ImportError: no module (test)")
    assert fk.available_backends()[name] == "failed to load: ImportError: no module (test)"
    x, w = torch.randn(3, 5), torch.randn(4, 5)
    core, factors = _adapter((4, 5), (2, 2))
    with pytest.raises(fk.BackendUnavailable, match=rf"backend '{name}' cannot run linear: failed to load: .*\(test\)"):
        fk.flora_linear(x, w, None, core, factors, backend=name)
    y = fk.flora_linear(x, w, None, core, factors, backend="auto")
    assert_rel_close(y, F.linear(x, w + einsum_reconstruct(core, factors)), 1e-5)


def test_env_backend_default(monkeypatch):
    x, w = torch.randn(3, 5), torch.randn(4, 5)
    core, factors = _adapter((4, 5), (2, 2))
    monkeypatch.setenv("FLORA_BACKEND", "reference")
    y = fk.flora_linear(x, w, None, core, factors)
    assert_rel_close(y, F.linear(x, w + einsum_reconstruct(core, factors)), 1e-5)
    monkeypatch.setenv("FLORA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="got 'nonsense'"):
        fk.flora_linear(x, w, None, core, factors)


def test_available_backends_shape():
    info = fk.available_backends()
    assert set(info) == {"reference", "triton", "cuda", "cpp"}
    assert info["reference"] == "ok"
    assert all(isinstance(v, str) and v for v in info.values())


def test_convspec_resolves_same_padding():
    s = ConvSpec.make((4, 3), padding="same", dilation=(1, 2))
    assert s.pads == ((1, 2), (2, 2))
    assert s.symmetric_zero_padding is None
    assert ConvSpec.make((3, 3), padding=1).symmetric_zero_padding == (1, 1)
