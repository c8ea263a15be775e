"""The Triton backend's contract: availability and per-call reasons, explicit requests it cannot
serve raise BackendUnavailable, auto never picks the interpreter, import without triton,
torch.compile tracing of the custom ops; and GPU-only bf16 / large-shape checks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from triton_helpers import DEVICE, INTERPRET, assert_bounded, needs_triton

import flora_kernels as fk
from flora_kernels import reference as ref
from flora_kernels.backends import Call
from flora_kernels.backends.autotune import resolve
from flora_kernels.tucker import tucker_project, tucker_reconstruct

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


def _linear(dtype=torch.float32, rank=(3, 2), device=DEVICE):
    x = torch.randn(5, 8, device=device, dtype=dtype)
    w = torch.randn(6, 8, device=device, dtype=dtype)
    core = torch.randn(rank, device=device, dtype=dtype)
    fs = [torch.randn(6, rank[0], device=device, dtype=dtype), torch.randn(8, rank[1], device=device, dtype=dtype)]
    return x, w, core, fs


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import flora_kernels as fk\n"
        "print(fk.available_backends()['triton'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "triton is not importable" in out.stdout


def test_unavailable_without_gpu_or_interpreter(monkeypatch):
    from flora_kernels.backends.triton import TritonBackend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, core, fs = _linear(device="cpu")
    assert "CPU tensors need the Triton interpreter" in TritonBackend().unsupported_reason(
        Call.describe("linear", x=x, weight=w, core=core, factors=fs, strategy="factorized"))
    if torch.cuda.is_available():
        return
    # decided when the backend loads, without importing its kernel modules (a model's first step would pay)
    code = ("import sys, torch, flora_kernels as fk\n"
            "x = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
            "fk.inject_flora(x, fk.FLoRAConfig(rank=2))\n"
            "x(torch.randn(2, 8)).sum().backward()\n"
            "print(fk.available_backends()['triton'], 'flora_kernels.backends.triton.linear' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("no CUDA GPU and TRITON_INTERPRET is not set False"), out.stdout


@needs_triton
def test_available_under_interpreter():
    assert fk.available_backends()["triton"] == "ok"


@needs_triton
@pytest.mark.parametrize(
    "what,call,reason",
    [
        ("float64", lambda: fk.tucker_reconstruct(*_linear(torch.float64)[2:], backend="triton"), "float64"),
        ("rank>128", lambda: fk.tucker_project(torch.randn(130, 130, device=DEVICE),
                                              [torch.randn(130, 129, device=DEVICE)] * 2, backend="triton"), "exceed"),
        ("x/weight dtypes", lambda: fk.flora_linear(_linear()[0].half(), *_linear()[1:2], None, *_linear()[2:],
                                                   strategy="factorized", backend="triton"), "one dtype"),
        ("frozen weight", lambda: fk.flora_linear(_linear()[0], _linear()[1].requires_grad_(), None, *_linear()[2:],
                                                 strategy="factorized", backend="triton"), "frozen"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_explicit_request_refused(what, call, reason):
    with pytest.raises(fk.BackendUnavailable, match=reason):
        call()


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's bf16 refusal")
@needs_triton
def test_bf16_refused_on_interpreter():
    x, w, core, fs = _linear(torch.bfloat16)
    with pytest.raises(fk.BackendUnavailable, match="bfloat16"):
        fk.flora_linear(x, w, None, core, fs, backend="triton")


@pytest.mark.skipif(not INTERPRET, reason="needs the interpreter to serve CPU tensors")
@needs_triton
def test_auto_never_picks_interpreter():
    x, w, core, fs = _linear(device="cpu")
    call = Call.describe("linear", x=x, weight=w, core=core, factors=fs, strategy="factorized")
    assert resolve(call, "auto")[0].name != "triton"
    assert resolve(call, "triton")[0].name == "triton"


@needs_triton
def test_merged_weight_grad_flows():
    """Merged linear composes reconstruct (with base) and torch's matmul: a trainable base weight
    gets its gradient too."""
    x, w, core, fs = _linear()
    w.requires_grad_()
    y = fk.flora_linear(x, w, None, core, fs, 0.5, strategy="merged", backend="triton")
    (gw,) = torch.autograd.grad(y.sum(), [w])
    w2 = w.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(ref.linear_merged(x, w2, None, core, fs, 0.5).sum(), [w2])
    assert_bounded(gw, gr, gr, torch.float32, "weight grad")


@needs_triton
def test_torch_compile_traces_custom_ops():
    """The custom ops trace under torch.compile (fake + autograd registrations, aot_eager)."""
    torch._dynamo.reset()
    x, w, core, fs = _linear()
    core.requires_grad_()
    fs = [f.requires_grad_() for f in fs]

    def fn(x, w, core, f0, f1):
        y = fk.flora_linear(x, w, None, core, [f0, f1], 0.5, strategy="factorized", backend="triton")
        r = fk.tucker_reconstruct(core, [f0, f1], 0.5, w, backend="triton")
        p = fk.tucker_project(r, [f0, f1], backend="triton")
        return y.sum() + r.sum() + p.sum()

    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, w, core, *fs)
    g = torch.autograd.grad(out, [core, *fs])
    out_e = fn(x, w, core, *fs)
    g_e = torch.autograd.grad(out_e, [core, *fs])
    assert torch.allclose(out, out_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_e):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@needs_triton
def test_torch_compile_traces_conv_ops():
    """Factorized (reflect padding: torch pad between custom ops) and merged conv under torch.compile."""
    torch._dynamo.reset()
    x = torch.randn(1, 4, 5, 5, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 2, 3, 3, device=DEVICE)
    core = torch.randn(3, 2, 2, 3, device=DEVICE, requires_grad=True)
    fs = [torch.randn(n, r, device=DEVICE, requires_grad=True) for n, r in zip(w.shape, core.shape)]

    def fn(x, core, *fs):
        a = fk.flora_conv(x, w, None, core, fs, 0.5, padding=1, groups=2, padding_mode="reflect",
                          strategy="factorized", backend="triton")
        b = fk.flora_conv(x, w, None, core, fs, 0.5, stride=2, groups=2, strategy="merged", backend="triton")
        return a.sum() + b.sum()

    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, core, *fs)
    g = torch.autograd.grad(out, [x, core, *fs])
    out_e = fn(x, core, *fs)
    g_e = torch.autograd.grad(out_e, [x, core, *fs])
    assert torch.allclose(out, out_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_e):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every kernel goes through the real GPU compiler (front end, TTGIR, ptxas) for sm_90 in bf16,
    the dtype the interpreter cannot check; no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "tools.compile_check", "--dtypes", "bf16"],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )
    if "ptxas" in out.stdout + out.stderr and "not found" in out.stdout + out.stderr:
        pytest.skip("ptxas not available to triton")
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------- GPU only


def _bf16_bound(kernel, torch_bf16, ref32, what, mult=3.0):
    """|kernel - fp32 ref| <= mult * |torch bf16 - fp32 ref| (norm-wise) + a small floor."""
    err_k = (kernel.float() - ref32).norm().item()
    err_t = (torch_bf16.float() - ref32).norm().item()
    assert err_k <= mult * err_t + 1e-3 * ref32.norm().item(), f"{what}: {err_k:.3e} vs torch bf16 {err_t:.3e}"


@pytest.mark.gpu
def test_gpu_linear_bf16_large():
    t, n, r = 4096, 2048, 16
    x = torch.randn(t, n, device="cuda", requires_grad=True)
    w = torch.randn(n, n, device="cuda") / n**0.5
    core = torch.randn(r, r, device="cuda", requires_grad=True)
    fs = [(torch.randn(n, r, device="cuda") / r**0.5).requires_grad_() for _ in range(2)]
    dy = torch.randn(t, n, device="cuda")
    leaves = [x, core, *fs]
    y32 = ref.linear_factorized(x, w, None, core, fs, 0.5)
    g32 = torch.autograd.grad(y32, leaves, dy)
    lo = [v.detach().bfloat16().requires_grad_() for v in leaves]
    w16 = w.bfloat16()
    for strategy in ("factorized", "merged"):
        yk = fk.flora_linear(lo[0], w16, None, lo[1], lo[2:], 0.5, strategy=strategy, backend="triton")
        gk = torch.autograd.grad(yk, lo, dy.bfloat16())
        yt = ref.linear_factorized(lo[0], w16, None, lo[1], lo[2:], 0.5)
        gt = torch.autograd.grad(yt, lo, dy.bfloat16())
        _bf16_bound(yk, yt, y32, f"{strategy} y")
        for i, (a, b, c) in enumerate(zip(gk, gt, g32)):
            _bf16_bound(a, b, c, f"{strategy} grad {i}")


@pytest.mark.gpu
def test_gpu_conv_bf16_channels_last():
    x = torch.randn(8, 64, 28, 28, device="cuda").to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(64, 64, 3, 3, device="cuda") / 24
    core = torch.randn(16, 16, 3, 3, device="cuda", requires_grad=True)
    fs = [(torch.randn(n, r, device="cuda") / r**0.5).requires_grad_() for n, r in zip(w.shape, core.shape)]
    spec = fk.ConvSpec.make((3, 3), padding=1)
    leaves = [x, core, *fs]
    y32 = ref.conv_factorized(x, w, None, core, fs, 0.5, spec)
    dy = torch.randn_like(y32)
    g32 = torch.autograd.grad(y32, leaves, dy)
    lo = [v.detach().bfloat16().requires_grad_() for v in leaves]
    for strategy in ("factorized", "merged"):
        yk = fk.flora_conv(lo[0], w.bfloat16(), None, lo[1], lo[2:], 0.5, padding=1, strategy=strategy, backend="triton")
        gk = torch.autograd.grad(yk, lo, dy.bfloat16())
        yt = ref.conv_factorized(lo[0], w.bfloat16(), None, lo[1], lo[2:], 0.5, spec)
        gt = torch.autograd.grad(yt, lo, dy.bfloat16())
        _bf16_bound(yk, yt, y32, f"{strategy} y")
        for i, (a, b, c) in enumerate(zip(gk, gt, g32)):
            _bf16_bound(a, b, c, f"{strategy} grad {i}")


@pytest.mark.gpu
def test_gpu_reconstruct_project_bf16_large():
    shape, ranks = (4096, 4096), (16, 16)
    core = torch.randn(ranks, device="cuda")
    fs = [torch.randn(i, r, device="cuda") / r**0.5 for i, r in zip(shape, ranks)]
    base = torch.randn(shape, device="cuda")
    r32 = tucker_reconstruct(core, fs, 0.5, base)
    lo = [core.bfloat16(), [f.bfloat16() for f in fs], base.bfloat16()]
    rk = fk.tucker_reconstruct(lo[0], lo[1], 0.5, lo[2], backend="triton")
    _bf16_bound(rk, tucker_reconstruct(lo[0], lo[1], 0.5, lo[2]), r32, "reconstruct")
    p32 = tucker_project(base, fs)
    pk = fk.tucker_project(lo[2], lo[1], backend="triton")
    _bf16_bound(pk, tucker_project(lo[2], lo[1]), p32, "project")
