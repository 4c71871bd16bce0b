"""Segmented running sums over blocks of tokens, `@triton.jit` helpers of the fused segment step
(`ops/objective_triton.py`): a scan restarted at every segment (or response) start and carried from
block to block, and the totals stored where the next segment opens (no write conflicts)."""

from __future__ import annotations

import triton
import triton.language as tl

OPENS = tl.constexpr(1)  # bits of the per-token flags: the token opens a segment
RESPONSE_OPENS = tl.constexpr(2)  # it opens its response (its first masked-in token)


@triton.jit
def _segmented_sum(fa, xa, fb, xb):
    return fa | fb, tl.where(fb != 0, xb, xa + xb)


@triton.jit
def maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def running_sum(flag, x, carry):
    """Inclusive sums of x restarted where flag != 0, continuing `carry` before the first restart."""
    _, run = tl.associative_scan((flag, x), 0, _segmented_sum)
    return run + tl.where(tl.cumsum(flag, 0) == 0, carry, 0.0)


@triton.jit
def last(x, o, end):
    """The value of the block's last valid lane (lane index end - 1)."""
    return tl.sum(tl.where(o == end - 1, x, 0), 0)


@triton.jit
def closing(flags_ptr, prev_ptr, seg_ptr, o, m_o):
    """Per token of the block o: its flags, the token before it (prev), its segment, and whether it
    closes the previous segment (it opens a segment after the first: that one's totals are stored)."""
    flags = tl.load(flags_ptr + o, mask=m_o, other=0)
    prev = tl.load(prev_ptr + o, mask=m_o, other=-1)
    seg = tl.load(seg_ptr + o, mask=m_o, other=-1)
    return flags, prev, seg, m_o & ((flags & OPENS) != 0) & (seg >= 1)


@triton.jit
def store_closed(tot_ptr, run_ptr, seg, prev, closes):
    """The closed segments' totals: segment seg - 1 ends at token prev, whose running sum is its total."""
    tl.store(tot_ptr + seg - 1, tl.load(run_ptr + prev, mask=closes, other=0.0), mask=closes)


@triton.jit
def store_response_closed(tot_ptr, run_ptr, rid_prev, prev, r_closes):
    """The closed responses' totals: response rid_prev ends at token prev."""
    tl.store(tot_ptr + rid_prev, tl.load(run_ptr + prev, mask=r_closes, other=0.0), mask=r_closes)


@triton.jit
def store_all_closed(tot_ptr, run_ptr, flags_ptr, prev_ptr, seg_ptr, N, BLOCK_T: tl.constexpr):
    """`store_closed` over all tokens for one running sum (the totals walk does several at once)."""
    for start in range(0, N, BLOCK_T):
        o = start + tl.arange(0, BLOCK_T)
        _, prev, seg, closes = closing(flags_ptr, prev_ptr, seg_ptr, o, o < N)
        store_closed(tot_ptr, run_ptr, seg, prev, closes)
