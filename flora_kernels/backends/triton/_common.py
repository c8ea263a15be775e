"""Shared helpers for the Triton kernels: interpreter detection, block sizes, dropout masks
(Philox from a seed, and the packed 1-bit-per-element form the Linear kernels share)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

#: True when Triton runs kernels through its CPU interpreter (must be set before import).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Largest channel-mode rank the kernels hold in registers (padded to a power of two >= 16).
MAX_RANK = 128


def rank_pad(r: int) -> int:
    """A rank padded to a power of two >= 16 (``tl.dot``'s smallest operand side)."""
    return max(16, triton.next_power_of_2(int(r)))


def block(n: int, hi: int) -> int:
    """A block side for a dimension of size ``n``: a power of two in [16, hi]."""
    return max(16, min(hi, triton.next_power_of_2(max(int(n), 1))))


def tile_cap(dtype: torch.dtype, hi: int = 64) -> int:
    """The largest tile side of the skinny kernels: ``hi``, halved for fp32 (exact fp32 dots run on
    FMA units and hold both operands in registers; larger fp32 tiles spill), 32 under the interpreter."""
    if INTERPRET:
        return 32
    return hi // 2 if dtype == torch.float32 else hi


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs (like torch's default
    matmul, no TF32), TF32 for the fp32 second-stage products of half-precision inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_programs_target(device: torch.device) -> int:
    """About two waves of programs on the device (one program under the interpreter)."""
    if INTERPRET or device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def fills_device(programs: int, device: torch.device) -> bool:
    """Whether ``programs`` programs make about two waves on the device (always under the interpreter)."""
    return programs >= num_programs_target(device)


def split_for(work_items: int, programs: int, device: torch.device) -> int:
    """How many ways to split a reduction loop of ``work_items`` so that ``programs`` programs
    per split fill the device; partial results are summed afterwards."""
    want = -(-num_programs_target(device) // max(programs, 1))
    return max(1, min(want, work_items))


def alloc_like(shape: Sequence[int], ref: torch.Tensor) -> torch.Tensor:
    """An empty tensor of ``shape`` in ref's dtype, device and memory format (channels_last kept)."""
    if ref.dim() == 4 and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    elif ref.dim() == 5 and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last_3d):
        fmt = torch.channels_last_3d
    else:
        fmt = torch.contiguous_format
    return torch.empty(tuple(shape), dtype=ref.dtype, device=ref.device, memory_format=fmt)


def new_seed() -> int:
    """A dropout seed drawn from torch's default CPU generator (so torch.manual_seed applies)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


@triton.jit
def keep_mask(seed, offsets, p):
    """Dropout keep mask: True where the uniform draw at the int64 ``offsets`` is >= p.

    ``offsets`` is the element's logical index ``(n * C + c) * L + l`` in the (N, C, L) view of
    the input, so every kernel that touches an element recomputes the same mask.
    """
    return tl.rand(seed, offsets) >= p


#: Channels per word of a packed dropout bitmask (int32 words).
BITS_PER_WORD = 32


def mask_words(c: int) -> int:
    """int32 words per token row of a packed dropout bitmask over ``c`` channels."""
    return -(-int(c) // BITS_PER_WORD)


@triton.jit
def pack_bits(keep, BL: tl.constexpr, BC: tl.constexpr):
    """A (BL, BC) boolean tile -> (BL, BC // 32) int32 words, bit j of word w = keep[:, 32 w + j].

    The bits are disjoint, so their (wrapping) int32 sum is their bitwise or."""
    shift = tl.arange(0, BC) % 32
    bits = keep.to(tl.int32) << shift[None, :]
    return tl.sum(tl.reshape(bits, (BL, BC // 32, 32)), axis=2)


@triton.jit
def unpack_bits(bits_ptr, rows, cols, stride_row, mask):
    """Keep mask at (rows[:, None], cols[None, :]) from int32 words ``bits[row, col // 32]`` (bit col % 32)."""
    w = tl.load(bits_ptr + rows[:, None] * stride_row + (cols // 32)[None, :], mask=mask, other=0)
    return ((w >> (cols % 32).to(tl.int32)[None, :]) & 1) != 0


@triton.jit
def last_to_arrive(count_ptr, n):
    """True in the one program, of the ``n`` that call this on the int32 counter at ``count_ptr``,
    that arrives last; the global stores every program made before arriving are visible to it
    (a CTA barrier, then an acq_rel atomic at GPU scope; read them with ``cache_modifier=".cg"``).

    The counter must be 0 before the first arrival: a preceding launch on the stream zeroes it
    (``zero_counters``). The arrival order decides only which program reduces, never the order
    it sums in, so a reduction behind this is deterministic."""
    tl.debug_barrier()
    return tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == n - 1


@triton.jit
def zero_counters(count_ptr, n):
    """Stores 0 into the ``n`` int32 counters at ``count_ptr`` (for the next launches' ``last_to_arrive``)."""
    for c0 in range(0, n, 32):
        offs = c0 + tl.arange(0, 32)
        tl.store(count_ptr + offs, tl.zeros((32,), dtype=tl.int32), mask=offs < n)
