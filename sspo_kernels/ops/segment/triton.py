"""Deterministic segmented sum, Triton: one program per segment slot adds its tokens in a fixed order
(bitwise reproducible, no atomics). The torch implementation of the same contract is in `torch.py`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sspo_kernels._utils import new_empty
from sspo_kernels.ops.segment.ids import segment_bounds

# 128 tokens a step over 4 warps: one token per thread, so the [BLOCK_T, BLOCK_K] accumulator is a
# few registers per thread; a segment of n tokens takes ceil(n / 128) steps of one program.
SEGMENT_BLOCK_T = 128
SEGMENT_NUM_WARPS = 4


@triton.jit
def segment_sum_kernel(
    values_ptr,  # [N, K] fp32, rows of masked-out tokens are never read
    seg_ptr,  # [N] int64 segment id, -1 where masked out
    start_ptr,  # [N] int64 first token index of each segment slot (N when the slot is unused)
    end_ptr,  # [N] int64 one past the last token index of each slot
    out_ptr,  # [N, K] fp32
    K,
    stride_v,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i_s = tl.program_id(0).to(tl.int64)
    start = tl.load(start_ptr + i_s)
    end = tl.load(end_ptr + i_s)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    b_acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for off in range(start, end, BLOCK_T):
        o_t = off + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        m_t = o_t < end
        b_seg = tl.load(seg_ptr + o_t, mask=m_t, other=-1)
        m_t = m_t & (b_seg == i_s)
        p_v = values_ptr + o_t[:, None] * stride_v + o_k[None, :]
        b_acc += tl.load(p_v, mask=m_t[:, None] & m_k[None, :], other=0.0)
    tl.store(out_ptr + i_s * K + o_k, tl.sum(b_acc, axis=0), mask=m_k)


def segment_sum(values: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Per-segment sums of the rows of `values`.

    values (N, K) fp32, seg (N,) int64 with ids 0..S-1 in token order and -1 where masked out.
    Returns (N, K) fp32: row s holds segment s's sum for s < S, zeros after.
    """
    n, k = values.shape
    out = new_empty((n, k), torch.float32, values.device)
    if n == 0:
        return out
    values = values.contiguous()
    start, end = segment_bounds(seg)
    segment_sum_kernel[(n,)](
        values, seg, start, end, out, k, values.stride(0),
        BLOCK_T=SEGMENT_BLOCK_T, BLOCK_K=triton.next_power_of_2(k), num_warps=SEGMENT_NUM_WARPS,
    )  # fmt: skip
    return out
