"""Cost model behind ``strategy="auto"``: factorized (input path) or merged (weight path).

Both paths share the base op (``op(x, W)`` or ``op(x, W + dW)`` cost the same), so only the
*extra* work of each is compared. Every extra op is costed on a roofline with a per-device
profile:

    t(op) = max(flops / (peak * eff), bytes / bandwidth) + launch,  eff = min(1, m / m_full)

where ``m`` is the op's smallest matrix dimension (a rank, or channels per group): skinny ops
run far below peak, on CPUs especially (docs/ARCHITECTURE.md, Performance targets measured rank-16 ops at several
times their FLOP share). Counted per call, for the actual input shape:

factorized, forward: shrink x -> S (T x r_in), [core conv], expand + accumulate into y;
  backward (when the adapter or x needs grads): each op's grad-input and grad-weight.
merged, forward: reconstruct dW and add it to W (about 4 weight-sized passes);
  backward: the full weight-gradient op dW_eff = dy^T x (same FLOPs as the forward op),
  then its projection onto the factors. With active dropout the merged path needs a second
  full op, since op(x, W) + op(dropout(x), dW) cannot fold.

The profile depends on the device and, on CPU, on torch's thread count. The choice is
inspectable: ``plan_call``/``plan_linear``/``plan_conv`` return a ``Plan`` with both costs, and
every layer exposes ``layer.plan(x)``. It is what ``strategy="auto"`` runs when nothing was
measured (see ``flora_kernels.backends.autotune``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .backends.base import Call
from .convspec import ConvSpec


@dataclass(frozen=True)
class DeviceProfile:
    """Roofline constants of one device class (seconds, FLOP/s, B/s)."""

    peak_flops: float
    bandwidth: float
    launch: float
    m_full: int


# CPU profiles per torch thread count (torch.get_num_threads()) on a 2-core x86 CPU, fp32;
# more threads than the largest calibrated count scale its FLOP rate linearly. Effective
# constants, not hardware peaks: fitted by tools/calibrate_cost_model.py to the measured
# training-step time of both strategies on every distinct layer call of resnet18, vit_tiny and
# convnext_atto at 64x64 and 96x96 (67 calls per thread count;
# bench/results/cpu-2core-2026-12-01-costmodel-t{1,2}.json), minimising the time lost by the
# strategy the model picks: 0.1% of the best strategies' total at 1 and at 2 threads (the
# previous profiles, fitted to two layers: 2.7% and 2.2%). At these sizes a call is dominated by
# per-op overhead (the 60 us launch: torch dispatch, autograd and Python per op on this CPU),
# and skinny rank-r ops run near the rate of big ones (m_full 4).
CPU_PROFILES: dict[int, DeviceProfile] = {
    1: DeviceProfile(peak_flops=1.2e11, bandwidth=1e10, launch=6e-5, m_full=4),
    2: DeviceProfile(peak_flops=1.2e11, bandwidth=1e10, launch=6e-5, m_full=4),
}
# H100, bf16 tensor cores (measured ~800 TFLOP/s dense), ~3 TB/s copy, ~5 us launch.
CUDA_PROFILE = DeviceProfile(peak_flops=6e14, bandwidth=2.8e12, launch=5e-6, m_full=16)


def profile(device: str, threads: int = 1) -> DeviceProfile:
    """The roofline constants for ``device`` ("cpu" or a GPU type) with ``threads`` torch threads."""
    if device != "cpu":
        return CUDA_PROFILE
    top = max(CPU_PROFILES)
    if threads <= top:
        return CPU_PROFILES[max(k for k in CPU_PROFILES if k <= max(threads, 1))]
    p = CPU_PROFILES[top]
    return DeviceProfile(p.peak_flops * threads / top, p.bandwidth, p.launch, p.m_full)


@dataclass(frozen=True)
class Plan:
    """The cost model's verdict for one call."""

    strategy: str
    factorized_s: float
    merged_s: float
    device: str

    def __str__(self) -> str:
        return (
            f"Plan({self.strategy}: factorized ~{self.factorized_s * 1e6:.1f} us, "
            f"merged ~{self.merged_s * 1e6:.1f} us extra on {self.device})"
        )


class _Costs:
    def __init__(self, device: str, threads: int) -> None:
        self.p = profile(device, threads)
        self.total = 0.0

    def op(self, flops: float, nbytes: float, m: int) -> None:
        eff = min(1.0, max(m, 1) / self.p.m_full)
        self.total += max(flops / (self.p.peak_flops * eff), nbytes / self.p.bandwidth) + self.p.launch


def _pick(fact: _Costs, merged: _Costs, device: str) -> Plan:
    strategy = "factorized" if fact.total <= merged.total else "merged"
    return Plan(strategy, fact.total, merged.total, device)


def plan_linear(
    tokens: int, in_features: int, out_features: int, ranks: tuple[int, int], elt: int,
    device: str, needs_grad: bool, x_needs_grad: bool, dropout: bool, threads: int = 1,
) -> Plan:
    """Costs for a Linear adapter on ``tokens`` rows of width ``in_features``."""
    t, i, o = tokens, in_features, out_features
    r_out, r_in = ranks
    f, m = _Costs(device, threads), _Costs(device, threads)
    f.op(2 * t * i * r_in, elt * t * (i + r_in), r_in)  # S = x U_in
    f.op(2 * t * r_in * o, elt * t * (r_in + 2 * o), r_in)  # y += S B^T
    if needs_grad:
        f.op(2 * t * o * r_in, elt * t * (o + r_in), r_in)  # dS = dy B
        f.op(2 * t * o * r_in, elt * t * (o + r_in), r_in)  # dB = dy^T S
        f.op(2 * t * i * r_in, elt * t * (i + r_in), r_in)  # dU_in = x^T dS
        if x_needs_grad:
            f.op(2 * t * r_in * i, elt * t * (r_in + 2 * i), r_in)  # dx += dS U_in^T
    m.op(2 * o * i * r_out, 4 * elt * o * i, min(r_out, r_in))  # W + s dW
    if dropout:
        m.op(2 * t * i * o, elt * (t * (i + 2 * o) + o * i), min(i, o))
    if needs_grad:
        m.op(2 * t * o * i, elt * (t * (o + i) + o * i), min(i, o))  # dW_eff = dy^T x
        m.op(4 * o * i * max(r_out, r_in), 2 * elt * o * i, min(r_out, r_in))  # project
        if dropout and x_needs_grad:
            m.op(2 * t * o * i, elt * (t * (o + 2 * i) + o * i), min(i, o))
    return _pick(f, m, device)


def plan_conv(
    x_shape: tuple[int, ...], weight_shape: tuple[int, ...], ranks: tuple[int, ...],
    spec: ConvSpec, elt: int, device: str, needs_grad: bool, x_needs_grad: bool, dropout: bool,
    threads: int = 1,
) -> Plan:
    """Costs for a ConvNd adapter; ``x_shape`` is (N, C_in, *spatial)."""
    g = spec.groups
    c_out, cg_in, *kernel = weight_shape
    c_in = cg_in * g
    r_out, r_in = ranks[0], ranks[1]
    kk = math.prod(kernel)
    t_in = x_shape[0] * math.prod(x_shape[2:])
    t_out = x_shape[0] * math.prod(spec.output_size(x_shape[2:], kernel))
    cg_out = c_out // g
    f, m = _Costs(device, threads), _Costs(device, threads)
    passes = 3 if needs_grad else 1  # forward, grad-input, grad-weight
    for _ in range(passes):
        f.op(2 * t_in * c_in * r_in, elt * t_in * (c_in + g * r_in), min(r_in, cg_in))  # projection
        f.op(2 * t_out * g * r_out * r_in * kk, elt * (t_in * g * r_in + t_out * g * r_out), min(r_in * kk, r_out))
        f.op(2 * t_out * c_out * r_out, elt * t_out * (g * r_out + 2 * c_out), min(r_out, cg_out))  # expansion
    w_numel = c_out * cg_in * kk
    m.op(2 * w_numel * max(ranks), 4 * elt * w_numel, min(ranks))  # W + s dW
    full_flops = 2 * t_out * c_out * cg_in * kk
    full_bytes = elt * (t_in * c_in + t_out * c_out + w_numel)
    m_full = min(cg_in * kk, cg_out)
    if dropout:
        m.op(full_flops, full_bytes + elt * t_out * c_out, m_full)
    if needs_grad:
        m.op(full_flops, full_bytes, m_full)  # dW_eff
        m.op(4 * w_numel * max(ranks), 2 * elt * w_numel, min(ranks))  # project
        if dropout and x_needs_grad:
            m.op(full_flops, full_bytes + elt * t_in * c_in, m_full)
    return _pick(f, m, device)


def saved_bytes(call: Call) -> int:
    """Estimated bytes a linear/conv call with a concrete strategy saves for backward beyond its
    parameters (0 when nothing needs gradients), with elt the compute dtype's size:

    - X = x.numel * (elt + 1 if dropout else elt) when the adapter needs gradients: x (or
      dropout(x) and its mask) for the input factor's / dW_eff's gradient (both strategies);
    - factorized: X + one rank-sized activation: S = x U_in (T r_in) for linear; for conv the
      r_out-channel activation (N G r_out * spatial_out: the reference's conv(x, A), the extension's
      core-conv output u; the Triton conv also keeps its projection z, N G r_in * spatial_in, not
      counted here);
    - merged: X + the dense effective weight W + dW (weight.numel * elt), kept for dx.

    Kernel variants of one strategy save the same.
    """
    if call.op not in ("linear", "conv") or call.x is None or call.core is None or not call.needs_grad:
        return 0
    x, core = call.x, call.core
    elt = call.compute_dtype.itemsize
    out = x.numel * (elt + int(call.dropout)) if call.adapter_needs_grad else 0
    if call.strategy == "merged":
        w = call.weight
        return out + (w.numel if w is not None else core.shape[0] * core.shape[1]) * elt
    r_out, r_in = core.shape[0], core.shape[1]
    if call.op == "linear":
        return out + (x.numel // max(x.shape[-1], 1)) * r_in * elt
    kernel = call.weight.shape[2:] if call.weight is not None else core.shape[2:]
    spatial_out = math.prod(call.conv.output_size(x.shape[2:], kernel))
    return out + x.shape[0] * call.conv.groups * r_out * spatial_out * elt


def memory_reason(call: Call, strategy: str, policy: str) -> str | None:
    """Why the "memory-aware" ``policy`` keeps auto from taking ``strategy`` for this training call:
    it would save more bytes for backward than factorized (None: it may). No allowance: auto in training
    never keeps more than the factorized path, which keeps what PEFT's LoRA keeps."""
    if strategy != "merged" or policy != "memory-aware" or not call.adapter_needs_grad:
        return None
    mine, fact = saved_bytes(call.with_strategy("merged")), saved_bytes(call.with_strategy("factorized"))
    if mine <= fact:
        return None
    return (f"saves {mine / 2**20:.2f} MiB for backward vs {fact / 2**20:.2f} MiB factorized (memory-aware "
            "policy; set_dispatch_policy('speed') allows it)")


def plan_call(call: Call, policy: str | None = None) -> Plan:
    """The cost model's verdict for a linear or conv ``Call`` (its strategy is ignored). A base
    weight that is missing or opaque (quantized) cannot be merged; under the "memory-aware"
    ``policy`` (None: the dispatcher's, ``autotune.dispatch_policy()``) a training call whose
    merged path would save materially more for backward (``memory_reason``) is factorized
    whatever the costs (both are still reported)."""
    device = "cpu" if call.device_type == "cpu" else "cuda"
    if call.op in ("linear", "conv") and not call.weight_readable:
        return Plan("factorized", 0.0, math.inf, device)
    p = _plan_costs(call, device)
    if policy is None:
        from .backends.autotune import dispatch_policy

        policy = dispatch_policy()
    if p.strategy == "merged" and memory_reason(call, "merged", policy) is not None:
        return Plan("factorized", p.factorized_s, p.merged_s, device)
    return p


def _plan_costs(call: Call, device: str) -> Plan:
    x, w, core = call.x, call.weight, call.core
    elt = x.dtype.itemsize
    needs_grad = call.adapter_needs_grad or call.x_needs_grad
    if call.op == "linear":
        tokens = x.numel // max(x.shape[-1], 1)
        return plan_linear(
            tokens, w.shape[1], w.shape[0], (core.shape[0], core.shape[1]), elt, device, needs_grad,
            call.x_needs_grad, call.dropout, call.threads,
        )
    if call.op == "conv":
        return plan_conv(
            x.shape, w.shape, core.shape, call.conv, elt, device, needs_grad, call.x_needs_grad, call.dropout,
            call.threads,
        )
    raise ValueError(f"plan_call: expected a linear or conv call, got op {call.op!r}")
