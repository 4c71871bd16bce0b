"""The whole segment step in one Triton launch (docs/loss.md "Segments" to "Outputs").

One program walks the tokens in blocks of `BLOCK_T`, in order, a few times: segment ids and the running
per-segment sums (a segmented scan restarted at every segment start, carried from block to block),
then each segment's totals, then per token the ratio, the adaptive bounds, the clipped objective, the
aggregation weight, the loss and the metric sums, and last the per-token gradient coefficients
dLoss/dl_t for a unit upstream gradient. Everything is summed in a fixed order (bitwise deterministic,
no float atomics) and nothing is read back to the host. One program is enough: the step is O(N)
work on a few floats a token, microseconds at the N of an RL batch, against the several kernel
launches per op of the PyTorch form.

Segment totals are taken without write conflicts: a token that opens a segment stores the running sums
of the token before it (the previous segment's last masked-in token) as that segment's totals; the
last segment's come from the carry after the walk.

Used by the Triton backend for a scalar loss; `loss_agg_mode="none"` (a per-token upstream gradient,
known only in backward) keeps the PyTorch form (`ops/objective.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sspo_kernels._types import FlatBatch, LossConfig
from sspo_kernels._utils import new_empty
from sspo_kernels._validate import device_check, entropy_ref_on, token_range_message

# One block of tokens per step: 1024 tokens over 16 warps is 2 per thread, which keeps the walks' dozen
# per-token arrays in registers (4 or 8 per thread spilled a few bytes in the AOT compile for sm_90);
# an RL batch of 8192 tokens takes 8 steps per walk.
STEP_BLOCK_T = 1024
STEP_NUM_WARPS = 16
GRANULARITY_IDS = {"token": 0, "sequence": 1, "subsentence": 2, "sentence": 2, "segments": 3}
AGG_IDS = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3, "sum": 4}
NUM_SCALARS = 11  # loss, the metrics of METRIC_NAMES but num_segments (int64, apart), the bad-token count
OPENS = tl.constexpr(1)  # bits of the per-token flags
RESPONSE_OPENS = tl.constexpr(2)


@triton.jit
def _segmented_sum(fa, xa, fb, xb):
    return fa | fb, tl.where(fb != 0, xb, xa + xb)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _max_nan(a, b):
    """max that propagates NaN, as torch.maximum / clamp do (tl.maximum's default drops it)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _running_sum(flag, x, carry):
    """Inclusive sums of x restarted where flag != 0, continuing `carry` before the first restart."""
    _, run = tl.associative_scan((flag, x), 0, _segmented_sum)
    return run + tl.where(tl.cumsum(flag, 0) == 0, carry, 0.0)


@triton.jit
def _last(x, o, end):
    """The value of the block's last valid lane (lane index end - 1)."""
    return tl.sum(tl.where(o == end - 1, x, 0), 0)


@triton.jit
def _closing(flags_ptr, prev_ptr, seg_ptr, o, m_o):
    """Per token of the block o: its flags, the token before it (prev), its segment, and whether it
    closes the previous segment (it opens a segment after the first: that one's totals are stored)."""
    flags = tl.load(flags_ptr + o, mask=m_o, other=0)
    prev = tl.load(prev_ptr + o, mask=m_o, other=-1)
    seg = tl.load(seg_ptr + o, mask=m_o, other=-1)
    return flags, prev, seg, m_o & ((flags & OPENS) != 0) & (seg >= 1)


@triton.jit
def _store_closed(tot_ptr, run_ptr, seg, prev, closes):
    """The closed segments' totals: segment seg - 1 ends at token prev, whose running sum is its total."""
    tl.store(tot_ptr + seg - 1, tl.load(run_ptr + prev, mask=closes, other=0.0), mask=closes)


@triton.jit
def _store_all_closed(tot_ptr, run_ptr, flags_ptr, prev_ptr, seg_ptr, N, BLOCK_T: tl.constexpr):
    """`_store_closed` over all tokens for one running sum (the totals walk does three sums at once)."""
    for start in range(0, N, BLOCK_T):
        o = start + tl.arange(0, BLOCK_T)
        _, prev, seg, closes = _closing(flags_ptr, prev_ptr, seg_ptr, o, o < N)
        _store_closed(tot_ptr, run_ptr, seg, prev, closes)


@triton.jit
def segment_step_fwd_kernel(
    logp_ptr, entropy_ptr, old_ptr, adv_ptr, ref_ptr, mask_ptr, tokens_ptr, boundary_ptr, given_ptr, cu_ptr,
    norm_ptr, h_ref_ptr, iws_ptr, fws_ptr, grad_logp_ptr, grad_entropy_ptr, out_ptr, nseg_ptr,
    N, T, B, V, clamp_c, eps_low, eps_high, gamma, k_min, k_max, h_ref_num, dual_clip, beta, ent_coef, norm_len,
    GRANULARITY: tl.constexpr, AGG: tl.constexpr, RATIO_EXACT: tl.constexpr, ON_POLICY: tl.constexpr,
    ADV_PER_RESPONSE: tl.constexpr, CHECK_TOKENS: tl.constexpr, PACKED: tl.constexpr, HAS_KL: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    HAS_NORMALIZER: tl.constexpr, ENTROPY_REF: tl.constexpr, ADAPTS: tl.constexpr, ADAPT_LOW: tl.constexpr,
    ADAPT_HIGH: tl.constexpr, HAS_ENT_COEF: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    # int32 workspace: seg | prev | flags | rid ; fp32 workspace: 3 running sums | response counts running |
    # 3 segment totals | response totals | running weighted slope | segment slope totals | sensitivity
    seg_ptr = iws_ptr
    prev_ptr = iws_ptr + N
    flags_ptr = iws_ptr + 2 * N
    rid_ptr = iws_ptr + 3 * N
    run_d_ptr = fws_ptr
    run_h_ptr = fws_ptr + N
    run_n_ptr = fws_ptr + 2 * N
    run_r_ptr = fws_ptr + 3 * N
    tot_d_ptr = fws_ptr + 4 * N
    tot_h_ptr = fws_ptr + 5 * N
    tot_n_ptr = fws_ptr + 6 * N
    tot_r_ptr = fws_ptr + 10 * N  # B slots, one per response (B may exceed N)
    run_a_ptr = fws_ptr + 8 * N
    tot_a_ptr = fws_ptr + 9 * N
    sens_ptr = fws_ptr + 7 * N

    # ---- response id of every token: padded rows (T) or the spans of cu_seqlens (B + 1 offsets)
    if PACKED:
        for start in range(0, N, BLOCK_T):
            o = start + tl.arange(0, BLOCK_T)
            tl.store(rid_ptr + o, tl.full([BLOCK_T], -1, tl.int32), mask=o < N)
        tl.debug_barrier()
        for start in range(0, B, BLOCK_T):
            o_b = start + tl.arange(0, BLOCK_T)
            first = tl.load(cu_ptr + o_b, mask=o_b < B, other=N)
            # the response that owns a start position is the last one starting there (earlier ones are empty)
            tl.atomic_max(rid_ptr + first, o_b.to(tl.int32), mask=(o_b < B) & (first < N))
        tl.debug_barrier()
        carry_rid = tl.full([], 0, tl.int32)
        for start in range(0, N, BLOCK_T):
            o = start + tl.arange(0, BLOCK_T)
            m_o = o < N
            r = tl.maximum(tl.associative_scan(tl.load(rid_ptr + o, mask=m_o, other=-1), 0, _maximum), carry_rid)
            tl.store(rid_ptr + o, r, mask=m_o)
            carry_rid = tl.max(tl.where(m_o, r, 0), 0)
        tl.debug_barrier()

    # ---- walk 1: segment ids, running sums, batch counts
    carry_last = tl.full([], -1, tl.int32)  # index of the last masked-in token so far
    carry_seg = tl.full([], 0, tl.int32)  # segments opened so far
    carry_d = tl.zeros([], dtype=tl.float32)
    carry_h = tl.zeros([], dtype=tl.float32)
    carry_n = tl.zeros([], dtype=tl.float32)
    carry_r = tl.zeros([], dtype=tl.float32)
    n_tok = tl.zeros([], dtype=tl.float32)
    h_sum = tl.zeros([], dtype=tl.float32)
    kl_sum = tl.zeros([], dtype=tl.float32)
    n_resp = tl.zeros([], dtype=tl.float32)
    n_bad = tl.zeros([], dtype=tl.float32)  # masked-in tokens outside [0, V)
    for start in range(0, N, BLOCK_T):
        o = start + tl.arange(0, BLOCK_T)
        m_o = o < N
        end = tl.minimum(start + BLOCK_T, N) - start
        lane = tl.arange(0, BLOCK_T)
        m = (tl.load(mask_ptr + o, mask=m_o, other=0) != 0) & m_o
        if CHECK_TOKENS:
            tok = tl.load(tokens_ptr + o, mask=m, other=0)
            n_bad += tl.sum(tl.where(m & ((tok < 0) | (tok >= V)), 1.0, 0.0), 0)
        if PACKED:
            rid = tl.load(rid_ptr + o, mask=m_o, other=0)
        else:
            rid = (o // T).to(tl.int32)
            tl.store(rid_ptr + o, rid, mask=m_o)
        # the previous masked-in token: a max-scan of (t - 1 where token t - 1 is masked in)
        m_before = (tl.load(mask_ptr + o - 1, mask=m_o & (o >= 1), other=0) != 0) & (o >= 1)
        prev = tl.maximum(tl.associative_scan(tl.where(m_before, o - 1, -1).to(tl.int32), 0, _maximum), carry_last)
        has_prev = m & (prev >= 0)
        if PACKED:
            rid_prev = tl.load(rid_ptr + prev, mask=has_prev, other=-1)
        else:
            rid_prev = tl.where(has_prev, prev // T, -1).to(tl.int32)
        same = has_prev & (rid_prev == rid)
        if GRANULARITY == 0:
            opens = m
        elif GRANULARITY == 1:
            opens = m & ~same
        elif GRANULARITY == 2:
            tok_prev = tl.load(tokens_ptr + prev, mask=has_prev, other=0)
            ends_prev = tl.load(boundary_ptr + tl.minimum(tl.maximum(tok_prev, 0), V - 1), mask=has_prev, other=0)
            opens = m & (~same | (ends_prev != 0))
        else:
            given = tl.load(given_ptr + o, mask=m, other=0)
            given_prev = tl.load(given_ptr + prev, mask=has_prev, other=0)
            opens = m & (~same | (given_prev != given))
        r_opens = m & ~same
        f_open = opens.to(tl.int32)
        seg = carry_seg + tl.cumsum(f_open, 0) - 1
        tl.store(seg_ptr + o, tl.where(m, seg, -1), mask=m_o)
        tl.store(prev_ptr + o, prev, mask=m_o)
        tl.store(flags_ptr + o, f_open * OPENS + r_opens.to(tl.int32) * RESPONSE_OPENS, mask=m_o)

        lp = tl.load(logp_ptr + o, mask=m, other=0.0)
        if ON_POLICY:
            old = lp
        else:
            old = tl.load(old_ptr + o, mask=m, other=0.0).to(tl.float32)
        x_d = tl.where(m, lp - old, 0.0)
        x_h = tl.where(m, tl.load(entropy_ptr + o, mask=m, other=0.0), 0.0)
        x_n = m.to(tl.float32)
        r_d = _running_sum(f_open, x_d, carry_d)
        r_h = _running_sum(f_open, x_h, carry_h)
        r_n = _running_sum(f_open, x_n, carry_n)
        r_r = _running_sum(r_opens.to(tl.int32), x_n, carry_r)
        tl.store(run_d_ptr + o, r_d, mask=m_o)
        tl.store(run_h_ptr + o, r_h, mask=m_o)
        tl.store(run_n_ptr + o, r_n, mask=m_o)
        tl.store(run_r_ptr + o, r_r, mask=m_o)
        carry_d = _last(r_d, lane, end)
        carry_h = _last(r_h, lane, end)
        carry_n = _last(r_n, lane, end)
        carry_r = _last(r_r, lane, end)
        carry_seg += tl.sum(f_open, 0)
        carry_last = tl.maximum(carry_last, tl.max(tl.where(m, o, -1).to(tl.int32), 0))
        n_tok += tl.sum(x_n, 0)
        h_sum += tl.sum(x_h, 0)
        kl_sum += tl.sum(tl.where(m, old - lp, 0.0), 0)
        n_resp += tl.sum(r_opens.to(tl.float32), 0)
    tl.debug_barrier()

    # ---- segment and response totals: an opening token stores the previous segment's running sums
    for start in range(0, N, BLOCK_T):
        o = start + tl.arange(0, BLOCK_T)
        m_o = o < N
        flags, prev, seg, closes = _closing(flags_ptr, prev_ptr, seg_ptr, o, m_o)
        _store_closed(tot_d_ptr, run_d_ptr, seg, prev, closes)
        _store_closed(tot_h_ptr, run_h_ptr, seg, prev, closes)
        _store_closed(tot_n_ptr, run_n_ptr, seg, prev, closes)
        r_closes = m_o & ((flags & RESPONSE_OPENS) != 0) & (prev >= 0)
        rid_prev = tl.load(rid_ptr + prev, mask=r_closes, other=0)
        tl.store(tot_r_ptr + rid_prev, tl.load(run_r_ptr + prev, mask=r_closes, other=0.0), mask=r_closes)
    if carry_last >= 0:
        s_last = carry_seg - 1
        tl.store(tot_d_ptr + s_last, carry_d)
        tl.store(tot_h_ptr + s_last, carry_h)
        tl.store(tot_n_ptr + s_last, carry_n)
        tl.store(tot_r_ptr + tl.load(rid_ptr + carry_last), carry_r)
    tl.debug_barrier()

    # ---- walk 2: per token objective, weights, loss, metric sums, gradient pieces
    if ENTROPY_REF == 0:  # "batch": the mean entropy of the masked-in tokens
        h_ref = h_sum / tl.maximum(n_tok, 1.0)
    elif ENTROPY_REF == 1:  # a number
        h_ref = h_ref_num
    else:  # a 0-d device tensor (e.g. distributed.global_entropy_mean)
        h_ref = tl.load(h_ref_ptr)
    if HAS_NORMALIZER:
        given_norm = tl.load(norm_ptr)
    else:
        given_norm = 1.0
    if AGG == 0:
        if HAS_NORMALIZER:
            denom = given_norm
        else:
            denom = tl.maximum(n_tok, 1.0)
    else:
        if HAS_NORMALIZER:
            denom = given_norm
        else:
            denom = tl.maximum(n_resp, 1.0)
        if AGG == 3:
            denom = denom * norm_len
    loss_sum = tl.zeros([], dtype=tl.float32)
    clip_low = tl.zeros([], dtype=tl.float32)
    clip_high = tl.zeros([], dtype=tl.float32)
    ratio_sum = tl.zeros([], dtype=tl.float32)
    ratio_min = tl.full([], float("inf"), tl.float32)
    ratio_max = tl.full([], float("-inf"), tl.float32)
    carry_a = tl.zeros([], dtype=tl.float32)
    for start in range(0, N, BLOCK_T):
        o = start + tl.arange(0, BLOCK_T)
        m_o = o < N
        end = tl.minimum(start + BLOCK_T, N) - start
        lane = tl.arange(0, BLOCK_T)
        seg = tl.load(seg_ptr + o, mask=m_o, other=-1)
        m = seg >= 0
        f_open = (tl.load(flags_ptr + o, mask=m_o, other=0) & OPENS) != 0
        slot = tl.maximum(seg, 0)
        n_s = tl.maximum(tl.load(tot_n_ptr + slot, mask=m, other=1.0), 1.0)
        d_raw = tl.load(tot_d_ptr + slot, mask=m, other=0.0) / n_s
        rho = tl.exp(_min_nan(_max_nan(d_raw, -clamp_c), clamp_c))
        in_clamp = (d_raw >= -clamp_c) & (d_raw <= clamp_c)
        if ADAPTS:
            h_bar = tl.load(tot_h_ptr + slot, mask=m, other=0.0) / n_s
            k_raw = tl.exp2(gamma * tl.log2(h_bar / h_ref))
            k = tl.where(h_ref == 0, 1.0, _min_nan(_max_nan(k_raw, k_min), k_max))
        else:
            k = tl.full([BLOCK_T], 1.0, tl.float32)
        if ADAPT_LOW:
            lo = 1 - eps_low * k
        else:
            lo = 1 - eps_low + 0 * k
        if ADAPT_HIGH:
            hi = 1 + eps_high * k
        else:
            hi = 1 + eps_high + 0 * k
        if ADV_PER_RESPONSE:
            adv = tl.load(adv_ptr + tl.load(rid_ptr + o, mask=m, other=0), mask=m, other=0.0).to(tl.float32)
        else:
            adv = tl.load(adv_ptr + o, mask=m, other=0.0).to(tl.float32)
        unclipped = -adv * rho
        clipped = -adv * _min_nan(_max_nan(rho, lo), hi)
        loss_t = _max_nan(unclipped, clipped)
        slope = tl.where(unclipped >= clipped, -adv, 0.0)  # dL_t / drho
        if HAS_DUAL:
            floor = -adv * dual_clip
            use_floor = adv < 0
            keep = tl.where(use_floor & (loss_t > floor), 0.0, tl.where(use_floor & (loss_t == floor), 0.5, 1.0))
            slope = slope * keep
            loss_t = tl.where(use_floor, _min_nan(loss_t, floor), loss_t)
        if AGG == 1:
            rid_w = tl.load(rid_ptr + o, mask=m, other=0)
            w = 1.0 / (tl.maximum(tl.load(tot_r_ptr + rid_w, mask=m, other=1.0), 1.0) * denom)
        elif AGG == 4:
            w = tl.full([BLOCK_T], 1.0, tl.float32)
        else:
            w = 1.0 / denom + 0 * rho
        lp = tl.load(logp_ptr + o, mask=m, other=0.0)
        direct = tl.zeros([BLOCK_T], dtype=tl.float32)
        if HAS_KL:
            diff = tl.where(m, tl.load(ref_ptr + o, mask=m, other=0.0).to(tl.float32) - lp, 0.0)
            loss_t += beta * (tl.exp(diff) - diff - 1)
            direct = beta * (1 - tl.exp(diff))
        if HAS_ENT_COEF:
            loss_t -= ent_coef * tl.load(entropy_ptr + o, mask=m, other=0.0)
            tl.store(grad_entropy_ptr + o, tl.where(m, -ent_coef * w, 0.0), mask=m_o)
        loss_sum += tl.sum(tl.where(m, loss_t * w, 0.0), 0)
        clip_low += tl.sum(tl.where(m & (adv < 0) & (rho < lo), 1.0, 0.0), 0)
        clip_high += tl.sum(tl.where(m & (adv > 0) & (rho > hi), 1.0, 0.0), 0)
        ratio_sum += tl.sum(tl.where(f_open, rho, 0.0), 0)
        ratio_min = _min_nan(ratio_min, tl.reduce(tl.where(f_open, rho, float("inf")), 0, _min_nan))
        ratio_max = _max_nan(ratio_max, tl.reduce(tl.where(f_open, rho, float("-inf")), 0, _max_nan))
        weighted_slope = tl.where(m, w * slope, 0.0)
        direct = tl.where(m, w * direct, 0.0)
        if RATIO_EXACT:
            sens = tl.where(in_clamp, rho, 0.0) / n_s
            r_a = _running_sum(f_open.to(tl.int32), weighted_slope, carry_a)
            tl.store(run_a_ptr + o, r_a, mask=m_o)
            carry_a = _last(r_a, lane, end)
            tl.store(sens_ptr + o, sens, mask=m_o)
            tl.store(grad_logp_ptr + o, direct, mask=m_o)  # the ratio's share is added in walk 3
        else:
            through = tl.where(in_clamp, rho, 0.0) * weighted_slope
            tl.store(grad_logp_ptr + o, tl.where(m, through + direct, 0.0), mask=m_o)

    if RATIO_EXACT:
        # ---- walk 3: dLoss/dl_t = (rho_s / n_s) * sum over the segment of w * dL/drho, plus the direct terms
        tl.debug_barrier()
        _store_all_closed(tot_a_ptr, run_a_ptr, flags_ptr, prev_ptr, seg_ptr, N, BLOCK_T)
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

    # ---- scalars: the loss and the finished metrics
    tokens = tl.maximum(n_tok, 1.0)
    n_seg = carry_seg.to(tl.float32)
    any_seg = carry_seg > 0
    tl.store(out_ptr + 0, loss_sum)
    tl.store(out_ptr + 1, clip_low / tokens)
    tl.store(out_ptr + 2, clip_high / tokens)
    tl.store(out_ptr + 3, (clip_low + clip_high) / tokens)
    tl.store(out_ptr + 4, ratio_sum / tl.maximum(n_seg, 1.0))
    tl.store(out_ptr + 5, tl.where(any_seg, ratio_min, 0.0))
    tl.store(out_ptr + 6, tl.where(any_seg, ratio_max, 0.0))
    tl.store(out_ptr + 7, h_sum / tokens)
    tl.store(out_ptr + 8, kl_sum / tokens)
    tl.store(out_ptr + 9, n_tok / tl.maximum(n_seg, 1.0))
    tl.store(out_ptr + 10, n_bad)
    tl.store(nseg_ptr, carry_seg.to(tl.int64))


def segment_step_fwd(
    logp: torch.Tensor, entropy: torch.Tensor, batch: FlatBatch, cfg: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """(loss 0-d, dLoss/dl_t (N,), dLoss/dH_t (N,) or None, metrics in METRIC_NAMES order), fp32 but
    `num_segments` (int64), for a unit upstream gradient; one launch, for every `loss_agg_mode` but "none".

    logp, entropy: (N,) fp32 from the vocabulary pass, 0 where masked out.
    """
    if cfg.loss_agg_mode not in AGG_IDS:
        raise ValueError(f"the fused segment step has no per-token loss (loss_agg_mode={cfg.loss_agg_mode!r})")
    n, device = logp.shape[0], logp.device
    f32 = torch.float32
    iws = new_empty((4 * max(n, 1),), torch.int32, device)
    fws = new_empty((10 * n + max(batch.num_responses, 1),), f32, device)
    grad_logp = new_empty((n,), f32, device)
    grad_entropy = new_empty((n if cfg.entropy_coef > 0 else 0,), f32, device)
    out = new_empty((NUM_SCALARS,), f32, device)
    nseg = new_empty((), torch.int64, device)
    ref = cfg.entropy_ref
    # a lean batch leaves the token check to this kernel; otherwise V only bounds the table lookups
    check_tokens = batch.lean and batch.token_bound is not None
    table_len = batch.token_bound or 1
    entropy_ref = 0 if isinstance(ref, str) else 2 if isinstance(ref, torch.Tensor) else 1

    def ptr(t: torch.Tensor | None) -> torch.Tensor:  # a valid pointer for an input the variant never reads
        return logp if t is None else t

    segment_step_fwd_kernel[(1,)](
        logp, entropy, ptr(batch.old_logprobs), batch.advantages, ptr(batch.ref_logprobs), batch.mask,
        batch.tokens, ptr(batch.boundary), ptr(batch.segment_ids), ptr(batch.cu_seqlens), ptr(batch.normalizer),
        entropy_ref_on(cfg, device) if entropy_ref == 2 else logp, iws, fws, grad_logp, grad_entropy, out, nseg,
        n, max(batch.seq_len or 1, 1), batch.num_responses, table_len, cfg.log_ratio_clamp, cfg.eps_low,
        cfg.eps_high, cfg.entropy_gamma, cfg.k_min, cfg.k_max, ref if entropy_ref == 1 else 0.0,
        cfg.dual_clip or 0.0, cfg.beta, cfg.entropy_coef, batch.norm_len or 1.0,
        GRANULARITY=GRANULARITY_IDS[cfg.granularity], AGG=AGG_IDS[cfg.loss_agg_mode],
        RATIO_EXACT=cfg.ratio_grad == "exact", ON_POLICY=batch.old_logprobs is None,
        ADV_PER_RESPONSE=batch.advantages.shape[0] != n, CHECK_TOKENS=check_tokens,
        PACKED=batch.cu_seqlens is not None, HAS_KL=cfg.beta > 0, HAS_DUAL=cfg.dual_clip is not None,
        HAS_NORMALIZER=batch.normalizer is not None, ENTROPY_REF=entropy_ref,
        ADAPTS=cfg.entropy_gamma != 0, ADAPT_LOW=cfg.adapt_low, ADAPT_HIGH=cfg.adapt_high,
        HAS_ENT_COEF=cfg.entropy_coef > 0, BLOCK_T=STEP_BLOCK_T, num_warps=STEP_NUM_WARPS,
    )  # fmt: skip
    if check_tokens:  # one fused assert, no host sync on CUDA
        device_check(out[10] == 0, token_range_message(batch.token_bound))
    metrics = (*out[1:9], nseg, out[9])
    return out[0], grad_logp, grad_entropy if cfg.entropy_coef > 0 else None, metrics
