"""The compiled extension's ops (``torch.ops.flora``): their list, their fake (meta)
implementations, and the autograd Functions over them.

Schemas: csrc/flora_ops.cpp; semantics: docs/kernels/cuda.md. Channel views: an activation
(N, groups * C, *spatial) is read as (N * groups, C, prod(spatial)), each group using the same factor.

    tucker_reconstruct(core (r0, r1, T), u0, u1, scale, base?) -> (I0, I1, T)
    tucker_reconstruct_backward(grad, core, u0, u1, scale) -> (dcore, du0, du1)
    adapter_shrink(x, u_in, groups, p, seed) / adapter_expand_(y!, z, u_out, groups, scale)
    adapter_expand(z, u_out, groups, scale, bias?) -> bias + scale * u_out . z (a new tensor)
    adapter_expand_grad_input / adapter_shrink_grad_input(_) / adapter_factor_grad / dropout_mask
    adapter_linear_grad(dy, s, b) -> (dy b, dy^T s): a Linear's dS and dB from one read of dy
    adapter_conv_expand_(y!, z, k, u_out, stride, padding, dilation, scale) -> u = conv(z, k); y += scale u_out . u
    adapter_conv_shrink_grad_input_(dx!, du, k, u_in, stride, padding, dilation, p, seed)
        -> dz = conv_transpose(du, k); dx += mask * (u_in . dz)
    input_fold(core, u_in, kernel) -> A = core x_1 u_in x_2 kernel[0] ... (CPU; tucker.input_fold; its
        autograd is a C++ node, csrc/flora_cpu_fold.cpp)
    input_fold_backward(grad, core, u_in, kernel) -> [dcore, du_in, *dkernel]
    conv_folded(x, xa?, weight, bias?, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups)
        -> conv(x, weight) + bias + scale u_out . conv(xa or x, input_fold(...)) (CPU; its autograd is one
        C++ node over conv_folded_forward -> (out, A, h) and conv_folded_backward, csrc/flora_cpu_fold.cpp)
    conv_merged(x, weight, bias?, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups)
        -> conv(x, weight + scale u_out . input_fold(...)) + bias (CPU; the merged strategy; its autograd is one
        C++ node over conv_merged_forward -> (out, A, W_eff) and conv_merged_backward, csrc/flora_cpu_fold.cpp)
    linear_factorized(x (..., in), weight, bias?, core, u_out, u_in, scale, p, seed)
        -> x W^T + bias + (dropout(x) U_in) (scale U_out core)^T (CPU and CUDA; its autograd is one C++ node
        over linear_factorized_forward -> (y, S) and linear_factorized_backward, csrc/flora_linear.cpp)

The fakes are declared here with ``oplib.fake`` and registered by ``build.load_extension`` once
the library is loaded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ...convspec import ConvSpec, conv_nd, conv_nd_backward
from ..oplib import fake

OPS = (
    "tucker_reconstruct", "tucker_reconstruct_backward", "adapter_shrink", "adapter_expand_", "adapter_expand",
    "adapter_expand_grad_input", "adapter_shrink_grad_input", "adapter_shrink_grad_input_",
    "adapter_factor_grad", "adapter_linear_grad", "dropout_mask", "depthwise_conv2d_weight_grad",
    "adapter_conv_expand_", "adapter_conv_shrink_grad_input_", "input_fold", "input_fold_backward", "conv_folded",
    "conv_folded_forward", "conv_folded_backward", "conv_merged", "conv_merged_forward", "conv_merged_backward",
    "linear_factorized", "linear_factorized_forward", "linear_factorized_backward",
)


def flora():
    """``torch.ops.flora`` (the ops exist once ``build.load_extension()`` succeeded)."""
    return torch.ops.flora


# ---- fake (meta) implementations -----------------------------------------------------------------
def _same_device(*ts: Tensor | None) -> None:
    devs = {t.device for t in ts if t is not None}
    torch._check(len(devs) <= 1, lambda: f"expected every tensor on one device, got {sorted(map(str, devs))}")


def layout_of(t: Tensor) -> torch.memory_format:
    """The memory format the ops give a new activation computed from t (csrc/flora_checks.h layout_of):
    channels_last (_3d) when t is in that layout and not also contiguous, else contiguous."""
    if not t.is_contiguous():
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def _with_channels(t: Tensor, c: int) -> Tensor:
    """A new tensor of t's batch and spatial sizes with c channels (dim 1), in layout_of(t)."""
    return torch.empty((t.shape[0], c, *t.shape[2:]), dtype=t.dtype, device=t.device, memory_format=layout_of(t))


@fake("flora::tucker_reconstruct")
def _(core, u0, u1, scale, base):
    _same_device(core, u0, u1, base)
    torch._check(core.dim() == 3 and u0.dim() == 2 and u1.dim() == 2,
                 lambda: "tucker_reconstruct: expected core (r0, r1, T), u0 (I0, r0), u1 (I1, r1)")
    dtype = base.dtype if base is not None else core.dtype
    return core.new_empty((u0.shape[0], u1.shape[0], core.shape[2]), dtype=dtype)


@fake("flora::tucker_reconstruct_backward")
def _(grad, core, u0, u1, scale):
    _same_device(grad, core, u0, u1)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (core, u0, u1))


@fake("flora::adapter_shrink")
def _(x, u_in, groups, p, seed):
    _same_device(x, u_in)
    return _with_channels(x, groups * u_in.shape[1])


@fake("flora::adapter_expand_")
def _(y, z, u_out, groups, scale):
    _same_device(y, z, u_out)


@fake("flora::adapter_expand")
def _(z, u_out, groups, scale, bias):
    _same_device(z, u_out, bias)
    return _with_channels(z, u_out.shape[0])


@fake("flora::adapter_expand_grad_input")
def _(dy, u_out, groups, scale):
    _same_device(dy, u_out)
    return _with_channels(dy, groups * u_out.shape[1])


@fake("flora::adapter_shrink_grad_input")
def _(dz, u_in, groups, p, seed):
    _same_device(dz, u_in)
    return _with_channels(dz, groups * u_in.shape[0])


@fake("flora::adapter_shrink_grad_input_")
def _(dx, dz, u_in, groups, p, seed):
    _same_device(dx, dz, u_in)


@fake("flora::adapter_factor_grad")
def _(a, b, groups, per_group, scale, p, seed):
    _same_device(a, b)
    return a.new_empty(((groups if per_group else 1) * (a.shape[1] // groups), b.shape[1] // groups))


@fake("flora::adapter_linear_grad")
def _(dy, s, b):
    _same_device(dy, s, b)
    return dy.new_empty((dy.shape[0], s.shape[1])), dy.new_empty((dy.shape[1], s.shape[1]))


@fake("flora::dropout_mask")
def _(x, p, seed):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@fake("flora::adapter_conv_expand_")
def _(y, z, k, u_out, stride, padding, dilation, scale):
    _same_device(y, z, k, u_out)
    return torch.empty((z.shape[0], k.shape[0], *y.shape[2:]), dtype=z.dtype, device=z.device,
                       memory_format=layout_of(z))


@fake("flora::adapter_conv_shrink_grad_input_")
def _(dx, du, k, u_in, stride, padding, dilation, p, seed):
    _same_device(dx, du, k, u_in)
    return torch.empty((du.shape[0], k.shape[1], *dx.shape[2:]), dtype=du.dtype, device=du.device,
                       memory_format=layout_of(du))


@fake("flora::input_fold")
def _(core, u_in, kernel):
    _same_device(core, u_in, *kernel)
    torch._check(core.dim() == 2 + len(kernel), lambda: "input_fold: expected core (r0, r1, *kernel ranks)")
    return core.new_empty((core.shape[0], u_in.shape[0], *(k.shape[0] for k in kernel)))


@fake("flora::input_fold_backward")
def _(grad, core, u_in, kernel):
    _same_device(grad, core, u_in, *kernel)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (core, u_in, *kernel)]


def _memory_format(x: Tensor) -> torch.memory_format:
    """x.suggest_memory_format() (channels_last / _3d for such a layout, else contiguous)."""
    return torch._prims_common.suggest_memory_format(x)


def _channels_inner(t: Tensor) -> bool:
    """csrc/flora_cpu_fold.cpp channels_inner: t's channels (dim 1) innermost in memory."""
    return t.dim() > 2 and t.stride(1) == 1 and not t.is_contiguous()


def _folded_out(x, weight, core, stride, padding, dilation, groups) -> tuple[Tensor, Tensor, Tensor]:
    """Fakes of conv_folded_forward's (out, A, h): the conv's output size, channels innermost when x or
    the weight has them so, else contiguous."""
    _same_device(x, weight, core)
    d, r = weight.dim() - 2, core.shape[0]
    torch._check(x.dim() == d + 2, lambda: f"conv_folded: expected x with {d + 2} dims, got {x.dim()}")
    sp = [(n + 2 * p - dl * (k - 1) - 1) // s + 1
          for n, k, s, p, dl in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
    inner = _channels_inner(x) or _channels_inner(weight)

    def act(c: int) -> Tensor:
        if inner:
            return x.new_empty((x.shape[0], *sp, c)).movedim(-1, 1)
        return x.new_empty((x.shape[0], c, *sp))

    return act(weight.shape[0]), weight.new_empty((r, *weight.shape[1:])), act(groups * r)


@fake("flora::conv_folded")
def _(x, xa, weight, bias, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups):
    return _folded_out(x, weight, core, stride, padding, dilation, groups)[0]


@fake("flora::conv_folded_forward")
def _(x, xa, weight, bias, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups):
    return _folded_out(x, weight, core, stride, padding, dilation, groups)


@fake("flora::conv_folded_backward")
def _(grad, x, xa, weight, core, u_out, u_in, kernel, a, h, scale, stride, padding, dilation, groups, mask):
    _same_device(grad, x, xa, weight, core)
    fmt = _memory_format(x)
    dx, dxa = (torch.empty_like(t, memory_format=fmt) if t is not None and m else None
               for t, m in ((x, mask[0]), (xa, mask[1])))
    dw, du = (torch.empty_like(t, memory_format=torch.contiguous_format) if m else None
              for t, m in ((weight, mask[2]), (u_out, mask[4])))
    db = weight.new_empty((weight.shape[0],)) if mask[3] else None
    dfold = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (core, u_in, *kernel)] if mask[5] else []
    return dx, dxa, dw, db, du, dfold


@fake("flora::conv_merged")
def _(x, weight, bias, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups):
    return _folded_out(x, weight, core, stride, padding, dilation, groups)[0]


@fake("flora::conv_merged_forward")
def _(x, weight, bias, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups):
    out, a, _ = _folded_out(x, weight, core, stride, padding, dilation, groups)
    return out, a, torch.empty_like(weight, memory_format=torch.contiguous_format)


@fake("flora::conv_merged_backward")
def _(grad, x, weight, core, u_out, u_in, kernel, a, scale, stride, padding, dilation, groups, mask):
    _same_device(grad, x, weight, core)
    dx = torch.empty_like(x, memory_format=_memory_format(x)) if mask[0] else None
    dw, du = (torch.empty_like(t, memory_format=torch.contiguous_format) if m else None
              for t, m in ((weight, mask[1]), (u_out, mask[3])))
    db = weight.new_empty((weight.shape[0],)) if mask[2] else None
    dfold = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (core, u_in, *kernel)] if mask[4] else []
    return dx, dw, db, du, dfold


def _linear_out(x, weight, core, u_out, u_in) -> tuple[Tensor, Tensor]:
    """Fakes of linear_factorized_forward's (y (..., out), S (M, r_in)), both contiguous."""
    _same_device(x, weight, core, u_out, u_in)
    torch._check(x.dim() >= 1 and weight.dim() == 2 and x.shape[-1] == weight.shape[1],
                 lambda: f"linear_factorized: expected x (..., {weight.shape[1]}), got {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((x.numel() // x.shape[-1], u_in.shape[1]))


@fake("flora::linear_factorized")
def _(x, weight, bias, core, u_out, u_in, scale, p, seed):
    return _linear_out(x, weight, core, u_out, u_in)[0]


@fake("flora::linear_factorized_forward")
def _(x, weight, bias, core, u_out, u_in, scale, p, seed):
    return _linear_out(x, weight, core, u_out, u_in)


@fake("flora::linear_factorized_backward")
def _(grad, x, weight, s, core, u_out, u_in, scale, p, seed, mask):
    _same_device(grad, x, weight, s, core)
    dx = grad.new_empty((*grad.shape[:-1], weight.shape[1])) if mask[0] else None
    db = weight.new_empty((weight.shape[0],)) if mask[2] else None
    dw, dcore, du_out, du_in = (torch.empty_like(t, memory_format=torch.contiguous_format) if m else None
                                for t, m in ((weight, mask[1]), (core, mask[3]), (u_out, mask[4]), (u_in, mask[5])))
    return dx, dw, db, dcore, du_out, du_in


@fake("flora::depthwise_conv2d_weight_grad")
def _(x, dy, kernel, stride, padding, dilation):
    _same_device(x, dy)
    return x.new_empty((dy.shape[1], 1, *kernel))


# ---- autograd Functions ----------------------------------------------------------------------------
class Reconstruct(torch.autograd.Function):
    """(core (r0, r1, T), u0, u1, scale, base?) -> base + scale * u0 core_t u1^T per tap."""

    @staticmethod
    def forward(ctx, core, u0, u1, scale, base):
        ctx.scale = scale
        ctx.save_for_backward(core, u0, u1)
        return flora().tucker_reconstruct(core, u0, u1, scale, base)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        core, u0, u1 = ctx.saved_tensors
        dcore = du0 = du1 = dbase = None
        if any(ctx.needs_input_grad[:3]):
            dcore, du0, du1 = flora().tucker_reconstruct_backward(grad, core, u0, u1, ctx.scale)
        if ctx.needs_input_grad[4]:
            dbase = grad
        return dcore, du0, du1, None, dbase


class Project(torch.autograd.Function):
    """(t (I0, I1, T), u0, u1) -> u0^T t_t u1 per tap: the adjoint of ``Reconstruct``.

    ``project2(t, u0, u1)`` computes the forward: each backend passes the ops order that suits its
    device (``CppBackend.project2`` / ``CudaBackend.project2``).
    """

    @staticmethod
    def forward(ctx, t, u0, u1, project2: Callable[[Tensor, Tensor, Tensor], Tensor]):
        ctx.save_for_backward(t, u0, u1)
        return project2(t, u0, u1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        t, u0, u1 = ctx.saved_tensors
        dt = du0 = du1 = None
        if ctx.needs_input_grad[0]:
            dt = flora().tucker_reconstruct(g, u0, u1, 1.0, None)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, du0, du1 = flora().tucker_reconstruct_backward(t, g, u0, u1, 1.0)
        return dt, du0, du1, None


class BaseConvShrink(torch.autograd.Function):
    """(y, z) = (conv(x, W) + b, grouped 1x1 conv of dropout(x) by U_in^T): the frozen base conv
    (torch: cuDNN on CUDA) and the adapter's shrink, x read once in its own layout (contiguous or
    channels_last; z takes that layout). One Function so that the backward writes dx once: dx = the
    base conv's input gradient, then the adapter's mask * (U_in . dz) accumulated into it in place.
    x (N, g*C, *sp), weight (O, C, *k), u_in (C, r) -> y (N, O, *out), z (N, g*r, *sp)."""

    @staticmethod
    def forward(ctx, x, weight, bias, u_in, spec: ConvSpec, p, seed):
        ctx.spec, ctx.p, ctx.seed = spec, p, seed
        ctx.save_for_backward(x, weight, u_in)
        y = conv_nd(x, weight, bias, spec)
        return y, flora().adapter_shrink(x, u_in, spec.groups, p, seed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dz):
        x, weight, u_in = ctx.saved_tensors
        need_x, need_w, need_b, need_u = ctx.needs_input_grad[:4]
        g = ctx.spec.groups
        dx = dw = db = du = None
        if need_x or need_w:
            dx, dw = conv_nd_backward(dy, x, weight, ctx.spec, need_x, need_w)
        if need_x:
            flora().adapter_shrink_grad_input_(dx, dz, u_in, g, ctx.p, ctx.seed)
        if need_b:
            db = dy.sum([0, *range(2, dy.dim())])
        if need_u:
            du = flora().adapter_factor_grad(x, dz, g, False, 1.0, ctx.p, ctx.seed)
        return dx, dw, db, du, None, None, None


class Expand(torch.autograd.Function):
    """y += scale * grouped 1x1 conv of u by U_out, in place on y (any dense layout whose spatial
    dims collapse: contiguous, channels_last), u read in place."""

    @staticmethod
    def forward(ctx, y, u, u_out, groups, scale):
        flora().adapter_expand_(y, u, u_out, groups, scale)
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
            du = flora().adapter_expand_grad_input(dy, u_out, ctx.groups, ctx.scale)
        if ctx.needs_input_grad[2]:
            du_out = flora().adapter_factor_grad(dy, u, ctx.groups, True, ctx.scale, 0.0, 0)
        return dy, du, du_out, None, None


def core_conv_args(spec: ConvSpec) -> tuple[list[int], list[int], list[int]]:
    """(stride, padding, dilation) of the fused core-conv ops: padding is (lo, hi) per dim, flattened."""
    return list(spec.stride), [p for lo_hi in spec.pads for p in lo_hi], list(spec.dilation)


def channel_minor_tokens(t: Tensor) -> Tensor | None:
    """t (N, C, *sp) as its (N * prod(sp), C) token matrix, a view, when the channel dim is the
    innermost one in dense memory (channels_last, a conv1d's (N, L, C) layout); else None."""
    tm = t.movedim(1, -1)
    return tm.view(-1, t.shape[1]) if tm.is_contiguous() else None


class ConvFused(torch.autograd.Function):
    """y = conv(x, W) + b + scale * U_out . conv(U_in^T drop(x), k) for a 1-D / 2-D conv with one
    group and zero padding; x (N, C_in, *sp), weight (C_out, C_in, *kw), k (r_out, r_in, *kw),
    u_out (C_out, r_out), u_in (C_in, r_in).

    Forward: the base conv (torch: cuDNN on CUDA), z = ``adapter_shrink(x)``, then
    ``adapter_conv_expand_``: the core conv and the expansion in one op, accumulated into the base
    conv's output in place (u = conv(z, k) is returned for the backward). Backward: du = scale
    U_out^T dy and dU_out = scale dy u^T from one read of dy where dy is channel-minor dense
    (``adapter_linear_grad`` on its token matrix), dk = torch's weight gradient of the small core
    conv, dx = the base conv's input gradient plus, in place, ``adapter_conv_shrink_grad_input_``
    (the core conv's transposed conv of du and the shrink's adjoint, mask fused), dU_in = x^T dz.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, k, u_out, u_in, spec: ConvSpec, scale, p, seed):
        ctx.spec, ctx.scale, ctx.p, ctx.seed = spec, scale, p, seed
        y = conv_nd(x, weight, bias, spec)
        z = flora().adapter_shrink(x, u_in, 1, p, seed)
        u = flora().adapter_conv_expand_(y, z, k, u_out, *core_conv_args(spec), scale)
        ctx.save_for_backward(x, weight, k, u_out, u_in, u)  # z is recomputed from x: one rank-sized save
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, k, u_out, u_in, u = ctx.saved_tensors
        need_x, need_w, need_b, need_k, need_uo, need_ui = ctx.needs_input_grad[:6]
        ops, spec, scale = flora(), ctx.spec, ctx.scale
        dx = dw = db = dk = du_out = du_in = None
        need_du = need_x or need_k or need_ui
        dy_t = channel_minor_tokens(dy) if need_du and need_uo else None
        if dy_t is not None:  # du and dU_out from one read of dy
            u_t = u.movedim(1, -1).reshape(-1, u.shape[1])
            du_t, db_t = ops.adapter_linear_grad(dy_t, u_t, u_out * scale)
            du = du_t.view(dy.shape[0], *dy.shape[2:], u.shape[1]).movedim(-1, 1)
            du_out = db_t * scale
        else:
            du = ops.adapter_expand_grad_input(dy, u_out, 1, scale) if need_du else None
            du_out = ops.adapter_factor_grad(dy, u, 1, True, scale, 0.0, 0) if need_uo else None
        dz = None
        if need_k or (need_ui and not need_x):  # the core conv's dk (and dz when dx is not asked) in one call
            z = ops.adapter_shrink(x, u_in, 1, ctx.p, ctx.seed)  # the forward's z, same dropout mask
            dz, dk = conv_nd_backward(du, z, k, spec, need_ui and not need_x, need_k)
        if need_x or need_w:
            dx, dw = conv_nd_backward(dy, x, weight, spec, need_x, need_w)
        if need_x:
            dz = ops.adapter_conv_shrink_grad_input_(dx, du, k, u_in, *core_conv_args(spec), ctx.p, ctx.seed)
        if need_b:
            db = dy.sum([0, *range(2, dy.dim())])
        if need_ui:
            du_in = ops.adapter_factor_grad(x, dz, 1, False, 1.0, ctx.p, ctx.seed)
        return dx, dw, db, dk, du_out, du_in, None, None, None, None

