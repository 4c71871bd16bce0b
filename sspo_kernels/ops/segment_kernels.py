"""Triton kernel of the deterministic segmented sum (launched by `segment.segment_sum`)."""

import triton
import triton.language as tl


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
