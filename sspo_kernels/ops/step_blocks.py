"""Pieces of the fused segment step (`objective_triton.segment_step_fwd_kernel`) as `@triton.jit`
functions: the per-block loads of its inputs and the walks that only some variants run (the response
ids of a packed batch, gmpo's clipped segment sums, the exact ratio gradient)."""

from __future__ import annotations

import triton
import triton.language as tl

from sspo_kernels.ops.objectives_triton import clamp_nan, clip_widths, gmpo_log_ratio
from sspo_kernels.ops.segment.scan import (
    OPENS,
    RESPONSE_OPENS,
    closing,
    last,
    maximum,
    running_sum,
    store_all_closed,
    store_closed,
    store_response_closed,
)

# The fp32 workspace of the step, in units of N: running sums and totals per segment slot, then three
# (B,) response arrays (totals of the token count, of q - v and of the off-policy drift).
RUN_D, RUN_H, RUN_N, RUN_R, TOT_D, TOT_H, TOT_N, SENS, RUN_A, TOT_A, RUN_X, TOT_X, RUN_RV, RUN_RO = (
    tl.constexpr(i) for i in range(14)
)
FWS_PER_TOKEN = tl.constexpr(14)


@triton.jit
def advantage_of(adv_ptr, rid_ptr, o, m, ADV_PER_RESPONSE: tl.constexpr):
    """A_t of the block o (0 where masked out): per token, or per response through the response ids."""
    if ADV_PER_RESPONSE:
        return tl.load(adv_ptr + tl.load(rid_ptr + o, mask=m, other=0), mask=m, other=0.0).to(tl.float32)
    else:
        return tl.load(adv_ptr + o, mask=m, other=0.0).to(tl.float32)


@triton.jit
def old_of(logp_ptr, old_ptr, o, m, ON_POLICY: tl.constexpr):
    """q_t of the block o: the old log-prob, or l_t on-policy."""
    if ON_POLICY:
        return tl.load(logp_ptr + o, mask=m, other=0.0)
    else:
        return tl.load(old_ptr + o, mask=m, other=0.0).to(tl.float32)


@triton.jit
def log_ratio_of(logp_ptr, old_ptr, o, m, ON_POLICY: tl.constexpr):
    """x_t = l_t - q_t of the block o, 0 where masked out."""
    return tl.where(m, tl.load(logp_ptr + o, mask=m, other=0.0) - old_of(logp_ptr, old_ptr, o, m, ON_POLICY), 0.0)


@triton.jit
def entropy_factor(tot_h_ptr, slot, m, n_s, h_ref, gamma, k_min, k_max, ADAPTS: tl.constexpr):
    """k_s of each token's segment (docs/loss.md "Entropy-adaptive clip bounds"); 1 without adaptation."""
    if ADAPTS:
        h_bar = tl.load(tot_h_ptr + slot, mask=m, other=0.0) / n_s
        k_raw = tl.exp2(gamma * tl.log2(h_bar / h_ref))
        return tl.where(h_ref == 0, 1.0, clamp_nan(k_raw, k_min, k_max))
    else:
        return tl.full(slot.shape, 1.0, tl.float32)


@triton.jit
def packed_response_ids(rid_ptr, cu_ptr, N, B, BLOCK_T: tl.constexpr):
    """rid[t] = the response whose cu_seqlens span holds token t (int32), by a max-scan of the starts.
    Returns the number of violations of cu_seqlens' form (start 0, non-decreasing, end N), as fp32;
    a malformed start is never written through."""
    n_bad = tl.where(tl.load(cu_ptr) != 0, 1.0, 0.0) + tl.where(tl.load(cu_ptr + B) != N, 1.0, 0.0)
    for start in range(0, N, BLOCK_T):
        o = start + tl.arange(0, BLOCK_T)
        tl.store(rid_ptr + o, tl.full([BLOCK_T], -1, tl.int32), mask=o < N)
    tl.debug_barrier()
    for start in range(0, B, BLOCK_T):
        o_b = start + tl.arange(0, BLOCK_T)
        first = tl.load(cu_ptr + o_b, mask=o_b < B, other=N)
        following = tl.load(cu_ptr + o_b + 1, mask=o_b < B, other=N)
        n_bad += tl.sum(tl.where((o_b < B) & (following < first), 1.0, 0.0), 0)
        # the response that owns a start position is the last one starting there (earlier ones are empty)
        tl.atomic_max(rid_ptr + first, o_b.to(tl.int32), mask=(o_b < B) & (first >= 0) & (first < N))
    tl.debug_barrier()
    carry_rid = tl.full([], 0, tl.int32)
    for start in range(0, N, BLOCK_T):
        o = start + tl.arange(0, BLOCK_T)
        m_o = o < N
        r = tl.maximum(tl.associative_scan(tl.load(rid_ptr + o, mask=m_o, other=-1), 0, maximum), carry_rid)
        tl.store(rid_ptr + o, r, mask=m_o)
        carry_rid = tl.max(tl.where(m_o, r, 0), 0)
    tl.debug_barrier()
    return n_bad


@triton.jit
def gmpo_segment_sums(
    logp_ptr, old_ptr, adv_ptr, seg_ptr, flags_ptr, prev_ptr, rid_ptr, tot_h_ptr, tot_n_ptr, run_d_ptr, tot_d_ptr,
    N, carry_seg, carry_last, h_ref, gamma, k_min, k_max, eps_low, eps_high,
    ADAPTS: tl.constexpr, ADAPT_LOW: tl.constexpr, ADAPT_HIGH: tl.constexpr, ADV_PER_RESPONSE: tl.constexpr,
    ON_POLICY: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """gmpo: each token's log-ratio clipped with its segment's entropy factor, then the segments' sums of
    the clipped values written over the running sums and totals of the raw ones (run_d, tot_d)."""
    carry_c = tl.zeros([], dtype=tl.float32)
    for start in range(0, N, BLOCK_T):
        o = start + tl.arange(0, BLOCK_T)
        m_o = o < N
        end = tl.minimum(start + BLOCK_T, N) - start
        seg = tl.load(seg_ptr + o, mask=m_o, other=-1)
        m = seg >= 0
        f_open = ((tl.load(flags_ptr + o, mask=m_o, other=0) & OPENS) != 0).to(tl.int32)
        slot = tl.maximum(seg, 0)
        n_s = tl.maximum(tl.load(tot_n_ptr + slot, mask=m, other=1.0), 1.0)
        k = entropy_factor(tot_h_ptr, slot, m, n_s, h_ref, gamma, k_min, k_max, ADAPTS)
        adv = advantage_of(adv_ptr, rid_ptr, o, m, ADV_PER_RESPONSE)
        width_low, width_high = clip_widths(k, eps_low, eps_high, ADAPT_LOW, ADAPT_HIGH)
        c, _, _, _ = gmpo_log_ratio(log_ratio_of(logp_ptr, old_ptr, o, m, ON_POLICY), adv, -width_low, width_high)
        r_c = running_sum(f_open, tl.where(m, c, 0.0), carry_c)
        tl.store(run_d_ptr + o, r_c, mask=m_o)
        carry_c = last(r_c, tl.arange(0, BLOCK_T), end)
    tl.debug_barrier()
    store_all_closed(tot_d_ptr, run_d_ptr, flags_ptr, prev_ptr, seg_ptr, N, BLOCK_T)
    if carry_last >= 0:
        tl.store(tot_d_ptr + carry_seg - 1, carry_c)
    tl.debug_barrier()


@triton.jit
def exact_ratio_gradient(
    grad_logp_ptr, sens_ptr, run_a_ptr, tot_a_ptr, flags_ptr, prev_ptr, seg_ptr, N, carry_seg, carry_last, carry_a,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """dLoss/dl_t = sens_t * (the segment's total of the weighted ratio slopes) + the direct terms already
    in grad_logp (`ratio_grad="exact"`)."""
    tl.debug_barrier()
    store_all_closed(tot_a_ptr, run_a_ptr, flags_ptr, prev_ptr, seg_ptr, N, BLOCK_T)
    if carry_last >= 0:
        tl.store(tot_a_ptr + carry_seg - 1, carry_a)
    tl.debug_barrier()
    for start in range(0, N, BLOCK_T):
        o = start + tl.arange(0, BLOCK_T)
        m_o = o < N
        seg = tl.load(seg_ptr + o, mask=m_o, other=-1)
        m = seg >= 0
        total = tl.load(tot_a_ptr + tl.maximum(seg, 0), mask=m, other=0.0)
        sens = tl.load(sens_ptr + o, mask=m, other=0.0)
        direct = tl.load(grad_logp_ptr + o, mask=m_o, other=0.0)
        tl.store(grad_logp_ptr + o, tl.where(m, sens * total + direct, 0.0), mask=m_o)


@triton.jit
def store_totals(
    fws_ptr, iws_ptr, N, B, carry_seg, carry_last, carry_d, carry_h, carry_n, carry_r, carry_x, carry_rv, carry_ro,
    EXTRA_SUM: tl.constexpr, RESPONSE_IS: tl.constexpr, OFF_POLICY: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Each segment's and response's totals of walk 1's running sums: a token that opens a segment (a
    response) stores the running sums of the token before it; the last ones come from the carries."""
    seg_ptr = iws_ptr
    prev_ptr = iws_ptr + N
    flags_ptr = iws_ptr + 2 * N
    rid_ptr = iws_ptr + 3 * N
    tot_r_ptr = fws_ptr + FWS_PER_TOKEN * N
    for start in range(0, N, BLOCK_T):
        o = start + tl.arange(0, BLOCK_T)
        m_o = o < N
        flags, prev, seg, closes = closing(flags_ptr, prev_ptr, seg_ptr, o, m_o)
        store_closed(fws_ptr + TOT_D * N, fws_ptr + RUN_D * N, seg, prev, closes)
        store_closed(fws_ptr + TOT_H * N, fws_ptr + RUN_H * N, seg, prev, closes)
        store_closed(fws_ptr + TOT_N * N, fws_ptr + RUN_N * N, seg, prev, closes)
        if EXTRA_SUM:
            store_closed(fws_ptr + TOT_X * N, fws_ptr + RUN_X * N, seg, prev, closes)
        r_closes = m_o & ((flags & RESPONSE_OPENS) != 0) & (prev >= 0)
        rid_prev = tl.load(rid_ptr + prev, mask=r_closes, other=0)
        store_response_closed(tot_r_ptr, fws_ptr + RUN_R * N, rid_prev, prev, r_closes)
        if RESPONSE_IS:
            store_response_closed(tot_r_ptr + B, fws_ptr + RUN_RV * N, rid_prev, prev, r_closes)
        if OFF_POLICY:
            store_response_closed(tot_r_ptr + 2 * B, fws_ptr + RUN_RO * N, rid_prev, prev, r_closes)
    if carry_last >= 0:
        s_last = carry_seg - 1
        r_last = tl.load(rid_ptr + carry_last)
        tl.store(fws_ptr + TOT_D * N + s_last, carry_d)
        tl.store(fws_ptr + TOT_H * N + s_last, carry_h)
        tl.store(fws_ptr + TOT_N * N + s_last, carry_n)
        tl.store(tot_r_ptr + r_last, carry_r)
        if EXTRA_SUM:
            tl.store(fws_ptr + TOT_X * N + s_last, carry_x)
        if RESPONSE_IS:
            tl.store(tot_r_ptr + B + r_last, carry_rv)
        if OFF_POLICY:
            tl.store(tot_r_ptr + 2 * B + r_last, carry_ro)
    tl.debug_barrier()
