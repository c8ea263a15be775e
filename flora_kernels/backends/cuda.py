"""The compiled extension's backends: ``cpp`` (CPU kernels) and ``cuda`` (CUDA kernels).

Three layers, top to bottom:

- ``load_extension()``: imports ``flora_kernels._C`` (built by setup.py), which registers the
  ``torch.ops.flora`` ops; where it is missing and a GPU is present (or ``FLORA_JIT=1``), builds
  csrc/ just in time with ninja (CUDA sources too when torch has CUDA; ``TORCH_CUDA_ARCH_LIST``
  defaults to the current GPU, e.g. 9.0 on an H100). Then registers a fake (meta)
  implementation for every op, so ``torch.compile`` traces them. Never raises: a failure becomes
  the backends' ``unavailable_reason()``, logged once as a warning.
- autograd Functions over the ops (``_Reconstruct``, ``_Project``, ``_LinearFactorized``,
  ``_Shrink``, ``_Expand``).
- ``CppBackend`` / ``CudaBackend``: the ``Backend`` contract (``reconstruct``, ``project``,
  ``linear``, ``conv`` on the factorized path; merged is composed over ``reconstruct`` in
  ``backends.merged``) with per-call ``unsupported_reason``.

The ops (schemas in csrc/flora_cpu.cpp, semantics in docs/kernels/cuda.md):

    tucker_reconstruct(core (r0,r1,T), u0, u1, scale, base?) -> (I0, I1, T)
    tucker_reconstruct_backward(grad, core, u0, u1, scale) -> (dcore, du0, du1)
    adapter_shrink(x, u_in, groups, p, seed) / adapter_expand_(y!, z, u_out, groups, scale)
    adapter_expand(z, u_out, groups, scale, bias?) -> bias + scale * u_out . z (a new tensor)
    adapter_expand_grad_input / adapter_shrink_grad_input(_) / adapter_factor_grad / dropout_mask
    adapter_linear_grad(dy, s, b) -> (dy b, dy^T s): a Linear's dS and dB from one read of dy
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..convspec import ConvSpec, conv_nd
from ..tucker import mode_n_product
from . import depthwise as _depthwise
from .base import Backend, Call, TensorSpec

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_OPS = (
    "tucker_reconstruct", "tucker_reconstruct_backward", "adapter_shrink", "adapter_expand_", "adapter_expand",
    "adapter_expand_grad_input", "adapter_shrink_grad_input", "adapter_shrink_grad_input_",
    "adapter_factor_grad", "adapter_linear_grad", "dropout_mask", "depthwise_conv2d_weight_grad",
)
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The limit of the first CUDA reconstruct kernel (r_1 * taps in 48 KiB of shared memory); the tiled
# GEMM kernels that replaced it have none, so CudaBackend._reconstruct_reason is now only conservative.
_CUDA_MAX_ROW = {torch.float64: 48 * 1024 // 8}
_CUDA_MAX_ROW_DEFAULT = 48 * 1024 // 4
BUILD_HINT = (
    "build the extension: pip install --no-build-isolation -e . (torch first; FLORA_SKIP_EXT must be unset), "
    "or set FLORA_JIT=1 to compile csrc/ at first use (needs ninja and a C++ compiler; nvcc for CUDA)"
)


def _ops_registered() -> bool:
    try:
        return all(hasattr(torch.ops.flora, name) for name in _OPS)
    except (AttributeError, RuntimeError):
        return False


def _has_kernel(op: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"flora::{op}", key))
    except RuntimeError:
        return False


def _jit_build() -> None:
    """Compile csrc/ with torch.utils.cpp_extension.load (ninja) and load it as a library."""
    from torch.utils.cpp_extension import load

    sources = [str(_CSRC / "flora_cpu.cpp"), str(_CSRC / "flora_cpu_depthwise.cpp")]
    cflags = ["-O3", "-std=c++20"]
    with_cuda = torch.version.cuda is not None and torch.cuda.is_available() and os.environ.get("FLORA_SKIP_CUDA") != "1"
    if with_cuda:
        sources += [str(_CSRC / "flora_cuda.cu"), str(_CSRC / "flora_cuda_binding.cpp")]
        cflags.append("-DFLORA_WITH_CUDA")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    logger.warning("flora_kernels: compiling the C++%s extension just in time (once; cached)",
                   "/CUDA" if with_cuda else "")
    build_dir = os.environ.get("FLORA_JIT_BUILD_DIR") or None
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
    load(
        name="flora_kernels_jit" + ("_cuda" if with_cuda else "_cpu"),
        sources=sources,
        extra_include_paths=[str(_CSRC)],
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        build_directory=build_dir,
        is_python_module=False,
        with_cuda=with_cuda,
        verbose=os.environ.get("FLORA_JIT_VERBOSE") == "1",
    )


_LOADED: list[str | None] = []  # [reason] once load_extension() ran (a plain global: torch.compile reads it)


@torch.compiler.assume_constant_result
def load_extension() -> str | None:
    """Make ``torch.ops.flora`` available; None on success, else why not (never raises, runs once).

    Under torch.compile the call runs eagerly at trace time and its result is a constant.
    """
    if not _LOADED:
        _LOADED.append(_load_extension())
    return _LOADED[0]


def build_extension(verbose: bool = False) -> str | None:
    """JIT-compile csrc/ now (the CUDA sources too where torch has CUDA and sees a GPU) and load it.

    For machines that got the source tree without a built extension (e.g. the GPU machine of
    bench/device_check.sh). Returns None on success, else why not; the build is cached by torch.
    """
    os.environ["FLORA_JIT"] = "1"
    if verbose:
        os.environ["FLORA_JIT_VERBOSE"] = "1"
    _LOADED.clear()
    return load_extension()


def _load_extension() -> str | None:
    reason = None
    if not _ops_registered():
        try:
            import flora_kernels._C  # noqa: F401  (registers torch.ops.flora)
        except (ImportError, OSError) as e:  # missing, or built against another torch
            reason = f"the compiled extension flora_kernels._C is not built ({e})"
    if not _ops_registered():
        jit = os.environ.get("FLORA_JIT", "")
        want_jit = jit == "1" or (jit != "0" and torch.cuda.is_available())
        if want_jit and (_CSRC / "flora_cpu.cpp").exists() and shutil.which("ninja"):
            try:
                _jit_build()
                reason = None
            except Exception as e:  # noqa: BLE001 - a failed build makes the backend unavailable
                reason = f"{reason or 'extension not built'}; the JIT build failed: {type(e).__name__}: {e}"
    if not _ops_registered():
        reason = reason or "the flora ops are not registered"
        logger.warning("flora_kernels: C++/CUDA extension unavailable (%s); using the other backends", reason)
        return reason
    _register_fakes()
    return None


# ---- fake (meta) implementations -----------------------------------------------------------------
def _same_device(*ts: Tensor | None) -> None:
    devs = {t.device for t in ts if t is not None}
    torch._check(len(devs) <= 1, lambda: f"expected every tensor on one device, got {sorted(map(str, devs))}")


@functools.cache
def _register_fakes() -> None:
    lib = torch.library

    @lib.register_fake("flora::tucker_reconstruct")
    def _(core, u0, u1, scale, base):
        _same_device(core, u0, u1, base)
        torch._check(core.dim() == 3 and u0.dim() == 2 and u1.dim() == 2,
                     lambda: "tucker_reconstruct: expected core (r0, r1, T), u0 (I0, r0), u1 (I1, r1)")
        dtype = base.dtype if base is not None else core.dtype
        return core.new_empty((u0.shape[0], u1.shape[0], core.shape[2]), dtype=dtype)

    @lib.register_fake("flora::tucker_reconstruct_backward")
    def _(grad, core, u0, u1, scale):
        _same_device(grad, core, u0, u1)
        return torch.empty_like(core, memory_format=torch.contiguous_format), \
            torch.empty_like(u0, memory_format=torch.contiguous_format), \
            torch.empty_like(u1, memory_format=torch.contiguous_format)

    def with_channels(t: Tensor, c) -> Tensor:
        return t.new_empty((t.shape[0], c, *t.shape[2:]))

    @lib.register_fake("flora::adapter_shrink")
    def _(x, u_in, groups, p, seed):
        _same_device(x, u_in)
        return with_channels(x, groups * u_in.shape[1])

    @lib.register_fake("flora::adapter_expand_")
    def _(y, z, u_out, groups, scale):
        _same_device(y, z, u_out)

    @lib.register_fake("flora::adapter_expand")
    def _(z, u_out, groups, scale, bias):
        _same_device(z, u_out, bias)
        return with_channels(z, u_out.shape[0])

    @lib.register_fake("flora::adapter_expand_grad_input")
    def _(dy, u_out, groups, scale):
        _same_device(dy, u_out)
        return with_channels(dy, groups * u_out.shape[1])

    @lib.register_fake("flora::adapter_shrink_grad_input")
    def _(dz, u_in, groups, p, seed):
        _same_device(dz, u_in)
        return with_channels(dz, groups * u_in.shape[0])

    @lib.register_fake("flora::adapter_shrink_grad_input_")
    def _(dx, dz, u_in, groups, p, seed):
        _same_device(dx, dz, u_in)

    @lib.register_fake("flora::adapter_factor_grad")
    def _(a, b, groups, per_group, scale, p, seed):
        _same_device(a, b)
        return a.new_empty(((groups if per_group else 1) * (a.shape[1] // groups), b.shape[1] // groups))

    @lib.register_fake("flora::adapter_linear_grad")
    def _(dy, s, b):
        _same_device(dy, s, b)
        return dy.new_empty((dy.shape[0], s.shape[1])), dy.new_empty((dy.shape[1], s.shape[1]))

    @lib.register_fake("flora::dropout_mask")
    def _(x, p, seed):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @lib.register_fake("flora::depthwise_conv2d_weight_grad")
    def _(x, dy, kernel, stride, padding, dilation):
        _same_device(x, dy)
        return x.new_empty((dy.shape[1], 1, *kernel))


@torch.compiler.assume_constant_result
def _cuda_reason() -> str | None:
    """Why the CUDA kernels cannot run here (None if they can); a trace-time constant under compile."""
    reason = load_extension()
    if reason is not None:
        return reason
    if not _has_kernel("adapter_shrink", "CUDA"):
        return "the extension was built without CUDA (torch without CUDA or nvcc not found at build time)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return None


def _ops():
    return torch.ops.flora


def _new_seed(p: float) -> int:
    """A dropout seed from torch's CPU generator (so torch.manual_seed reproduces masks)."""
    if p <= 0:
        return 0
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


# ---- autograd Functions ----------------------------------------------------------------------------
class _Reconstruct(torch.autograd.Function):
    """(core (r0, r1, T), u0, u1, scale, base?) -> base + scale * u0 core_t u1^T per tap."""

    @staticmethod
    def forward(ctx, core, u0, u1, scale, base):
        ctx.scale = scale
        ctx.save_for_backward(core, u0, u1)
        return _ops().tucker_reconstruct(core, u0, u1, scale, base)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        core, u0, u1 = ctx.saved_tensors
        dcore = du0 = du1 = dbase = None
        if any(ctx.needs_input_grad[:3]):
            dcore, du0, du1 = _ops().tucker_reconstruct_backward(grad, core, u0, u1, ctx.scale)
        if ctx.needs_input_grad[4]:
            dbase = grad
        return dcore, du0, du1, None, dbase


class _Project(torch.autograd.Function):
    """(t (I0, I1, T), u0, u1) -> u0^T t_t u1 per tap: the adjoint of ``_Reconstruct``."""

    @staticmethod
    def forward(ctx, t, u0, u1):
        ctx.save_for_backward(t, u0, u1)
        if t.device.type == "cpu":
            # u0^T t_k u1 is a reconstruct with t as the core and the transposed factors: two GEMMs,
            # no wasted du0 / du1 work. (On CUDA that reconstruct's second GEMM would be one tile
            # with a reduction over I1, run by one block: CUDA keeps the backward op with a zero
            # core, whose reductions over the weight's rows are split across blocks.)
            return _ops().tucker_reconstruct(t, u0.t(), u1.t(), 1.0, None)
        zero_core = t.new_zeros((u0.shape[1], u1.shape[1], t.shape[2]))
        return _ops().tucker_reconstruct_backward(t, zero_core, u0, u1, 1.0)[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        t, u0, u1 = ctx.saved_tensors
        dt = du0 = du1 = None
        if ctx.needs_input_grad[0]:
            dt = _ops().tucker_reconstruct(g, u0, u1, 1.0, None)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, du0, du1 = _ops().tucker_reconstruct_backward(t, g, u0, u1, 1.0)
        return dt, du0, du1


class _LinearFactorized(torch.autograd.Function):
    """y = x W^T + b + S B^T, S = dropout(x) U_in, B = scale * U_out G; x (M, in) contiguous.

    The adapter sits inside the base GEMM's accumulate: y = b + S B^T is written first (one pass
    over y, y never read), then the base GEMM adds x W^T into it with beta = 1 (``addmm_``: cuBLAS
    on CUDA, BLAS on CPU); the backward likewise writes dx = mask * (dS U_in^T) first and adds dy W.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, core, u_out, u_in, scale, p, seed):
        b = (u_out @ core) * scale
        s = _ops().adapter_shrink(x, u_in, 1, p, seed)
        y = _ops().adapter_expand(s, b, 1, 1.0, bias)
        y.addmm_(x, weight.t())
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        ctx.save_for_backward(x, weight, s, b, core, u_out, u_in)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, s, b, core, u_out, u_in = ctx.saved_tensors
        need_x, need_w, need_b, need_core, need_uo, need_ui = ctx.needs_input_grad[:6]
        ops = _ops()
        dy = dy.contiguous()
        dx = dw = dbias = dcore = du_out = du_in = None
        need_ds, need_db = need_x or need_ui, need_core or need_uo
        if need_ds and need_db:
            ds, db = ops.adapter_linear_grad(dy, s, b)  # dS = dy B, dB = dy^T S: one read of dy
        else:
            ds = ops.adapter_expand_grad_input(dy, b, 1, 1.0) if need_ds else None
            db = ops.adapter_factor_grad(dy, s, 1, False, 1.0, 0.0, 0) if need_db else None  # (out, r_in)
        if need_x:
            dx = ops.adapter_shrink_grad_input(ds, u_in, 1, ctx.p, ctx.seed)
            dx.addmm_(dy, weight)
        if need_w:
            dw = dy.t() @ x
        if need_b:
            dbias = dy.sum(0)
        if need_db:
            if need_core:
                dcore = (u_out.t() @ db) * ctx.scale
            if need_uo:
                du_out = (db @ core.t()) * ctx.scale
        if need_ui:
            du_in = ops.adapter_factor_grad(x, ds, 1, False, 1.0, ctx.p, ctx.seed)
        return dx, dw, dbias, dcore, du_out, du_in, None, None, None


class _Shrink(torch.autograd.Function):
    """z = grouped 1x1 conv of dropout(x) by U_in^T: x (N, g*C, *sp) -> (N, g*r, *sp)."""

    @staticmethod
    def forward(ctx, x, u_in, groups, p, seed):
        ctx.groups, ctx.p, ctx.seed = groups, p, seed
        ctx.save_for_backward(x, u_in)
        return _ops().adapter_shrink(x, u_in, groups, p, seed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz):
        x, u_in = ctx.saved_tensors
        dx = du_in = None
        if ctx.needs_input_grad[0]:
            dx = _ops().adapter_shrink_grad_input(dz, u_in, ctx.groups, ctx.p, ctx.seed)
        if ctx.needs_input_grad[1]:
            du_in = _ops().adapter_factor_grad(x, dz, ctx.groups, False, 1.0, ctx.p, ctx.seed)
        return dx, du_in, None, None, None


class _Expand(torch.autograd.Function):
    """y += scale * grouped 1x1 conv of u by U_out, in place on y (contiguous)."""

    @staticmethod
    def forward(ctx, y, u, u_out, groups, scale):
        _ops().adapter_expand_(y, u, u_out, groups, scale)
        ctx.mark_dirty(y)
        ctx.groups, ctx.scale = groups, scale
        ctx.save_for_backward(u, u_out)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        u, u_out = ctx.saved_tensors
        du = du_out = None
        if ctx.needs_input_grad[1]:
            du = _ops().adapter_expand_grad_input(dy, u_out, ctx.groups, ctx.scale)
        if ctx.needs_input_grad[2]:
            du_out = _ops().adapter_factor_grad(dy, u, ctx.groups, True, ctx.scale, 0.0, 0)
        return dy, du, du_out, None, None


# ---- the backends ------------------------------------------------------------------------------------
def _fold_core(core: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """K = core x_2 U_2 ... x_{N-1} U_{N-1}, reshaped to (r0, r1, taps) (differentiable, tiny)."""
    k = core
    for n in range(2, core.dim()):
        k = mode_n_product(k, factors[n], n)
    return k.reshape(core.shape[0], core.shape[1], -1)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype if autocast is on for this device type, else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _ExtBackend(Backend):
    device_type = "cpu"

    def __init__(self) -> None:
        self._reason: list[str | None] = []  # computed once; a plain attribute torch.compile can read

    def unavailable_reason(self) -> str | None:
        if not self._reason:
            self._reason.append(self._compute_reason())
        return self._reason[0]

    def _compute_reason(self) -> str | None:
        return load_extension()

    def _device_reason(self, tensors: Sequence[TensorSpec]) -> str | None:
        for t in tensors:
            if t.device_type != self.device_type:
                return f"expected {self.device_type} tensors, got one on {t.device}"
            if t.dtype not in _FLOATS:
                return f"expected float32/float64/float16/bfloat16 tensors, got {t.dtype}"
            if t.numel == 0:
                return f"empty tensor of shape {tuple(t.shape)}"
        return None

    def unsupported_reason(self, call: Call) -> str | None:
        reason = self._device_reason(call.tensors)
        if reason is not None:
            return reason
        if call.op == "reconstruct":
            if any(f.dtype != call.core.dtype for f in call.factors):
                return f"expected the factors in the dtype of the core ({call.core.dtype})"
            return self._reconstruct_reason(call.core, call.factors)
        if call.op == "project":
            if any(f.dtype != call.x.dtype for f in call.factors):
                return f"expected the factors in the dtype of t ({call.x.dtype})"
            return None
        if call.weight.dtype != call.x.dtype:
            return f"expected the weight in the dtype of x ({call.x.dtype}), got {call.weight.dtype}"
        return None

    def _reconstruct_reason(self, core: TensorSpec, factors: Sequence[TensorSpec]) -> str | None:
        return None

    # -- ops --
    def reconstruct(self, core: Tensor, factors: Sequence[Tensor], scale: float, base: Tensor | None) -> Tensor:
        if _autocast_dtype(core.device.type) is not None:
            with torch.autocast(core.device.type, enabled=False):
                return self.reconstruct(core, factors, scale, base)
        shape = tuple(f.shape[0] for f in factors)
        k = _fold_core(core, factors)
        b3 = base.reshape(shape[0], shape[1], -1) if base is not None else None
        return _Reconstruct.apply(k, factors[0], factors[1], float(scale), b3).reshape(shape)

    def project(self, t: Tensor, factors: Sequence[Tensor]) -> Tensor:
        if _autocast_dtype(t.device.type) is not None:
            with torch.autocast(t.device.type, enabled=False):
                return self.project(t, factors)
        if t.device.type != "cpu":
            for n in range(t.dim() - 1, 1, -1):
                t = mode_n_product(t, factors[n].t(), n)
            ranks = tuple(f.shape[1] for f in factors)
            t3 = t.reshape(t.shape[0], t.shape[1], -1)
            return _Project.apply(t3, factors[0], factors[1]).reshape(ranks)
        # CPU: project modes 0 and 1 first (the op reads the big tensor once, as GEMMs), then the
        # spatial modes on the small (r0, r1, *spatial) result.
        spatial = tuple(t.shape[2:])
        t3 = t.reshape(t.shape[0], t.shape[1], -1)
        p = _Project.apply(t3, factors[0], factors[1]).reshape(factors[0].shape[1], factors[1].shape[1], *spatial)
        for n in range(p.dim() - 1, 1, -1):
            p = mode_n_product(p, factors[n].t(), n)
        return p

    # Under autocast the ops would see mixed dtypes: cast the layer's inputs to the autocast dtype
    # (what autocast does to the base op) and run with autocast off; adapter parameters keep their
    # dtype and receive grads in it.
    def linear(self, x, weight, bias, core, factors, scale, dropout_p):  # type: ignore[override]
        ac = _autocast_dtype(x.device.type)
        if ac is not None:
            with torch.autocast(x.device.type, enabled=False):
                return self.linear(x.to(ac), weight.to(ac), None if bias is None else bias.to(ac), core, factors,
                                   scale, dropout_p)
        dt = x.dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = _LinearFactorized.apply(
            x2, weight, bias, core.to(dt), factors[0].to(dt), factors[1].to(dt), float(scale), float(dropout_p),
            _new_seed(dropout_p),
        )
        return y.reshape(*lead, weight.shape[0])

    def conv(self, x, weight, bias, core, factors, scale, spec: ConvSpec, dropout_p):  # type: ignore[override]
        ac = _autocast_dtype(x.device.type)
        if ac is not None:
            with torch.autocast(x.device.type, enabled=False):
                return self.conv(x.to(ac), weight.to(ac), None if bias is None else bias.to(ac), core, factors, scale,
                                 spec, dropout_p)
        dt, g = x.dtype, spec.groups
        fs = [f.to(dt) for f in factors]
        k = core.to(dt)
        for n in range(2, k.dim()):
            k = mode_n_product(k, fs[n], n)
        if g > 1:
            k = k.repeat(g, *(1,) * (k.dim() - 1))
        z = _Shrink.apply(x, fs[1], g, float(dropout_p), _new_seed(dropout_p))
        u = conv_nd(z, k, None, spec)
        y = conv_nd(x, weight, bias, spec).contiguous()
        return _Expand.apply(y, u.contiguous(), fs[0], g, float(scale))


class CppBackend(_ExtBackend):
    """The extension's CPU kernels (at::parallel_for), on CPU tensors."""

    name = "cpp"
    how_to_get = BUILD_HINT
    device_type = "cpu"

    def merged_conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, spec: ConvSpec) -> Tensor:
        return _depthwise.conv(x, weight, bias, spec)


class CudaBackend(_ExtBackend):
    """The extension's CUDA kernels, on CUDA tensors."""

    name = "cuda"
    how_to_get = BUILD_HINT + "; the CUDA kernels need a CUDA build of torch, nvcc and a GPU"
    device_type = "cuda"

    def _compute_reason(self) -> str | None:
        return _cuda_reason()

    def _reconstruct_reason(self, core: TensorSpec, factors: Sequence[TensorSpec]) -> str | None:
        row = core.shape[1] * math.prod(f.shape[0] for f in factors[2:])
        limit = _CUDA_MAX_ROW.get(core.dtype, _CUDA_MAX_ROW_DEFAULT)
        if row > limit:
            return f"reconstruct kernel keeps r_1 * taps <= {limit} in shared memory, got {row}"
        return None
