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
from sspo_kernels._validate import device_check, entropy_ref_on, policy_weights_message, token_range_message
from sspo_kernels.ops.corrections import sorted_entropies
from sspo_kernels.ops.corrections_triton import ROLLOUT_LEVELS, entropy_threshold, rollout_weight, unscored_to_zero
from sspo_kernels.ops.objectives_triton import (
    OBJECTIVE_IDS,
    clamp_nan,
    clip_widths,
    gmpo_log_ratio,
    max_nan,
    min_nan,
    policy_term,
    vespo_log_weight,
    vespo_phi,
)
from sspo_kernels.ops.segment.scan import (
    OPENS,
    RESPONSE_OPENS,
    last,
    maximum,
    running_sum,
)
from sspo_kernels.ops.step_blocks import (
    FWS_PER_TOKEN,
    RUN_A,
    RUN_D,
    RUN_H,
    RUN_N,
    RUN_R,
    RUN_RO,
    RUN_RV,
    RUN_X,
    SENS,
    TOT_A,
    TOT_D,
    TOT_H,
    TOT_N,
    TOT_X,
    advantage_of,
    entropy_factor,
    exact_ratio_gradient,
    gmpo_segment_sums,
    log_ratio_of,
    old_of,
    packed_response_ids,
    store_totals,
)

# One block of tokens per step: 1024 tokens over 16 warps is 2 per thread, which keeps the walks' dozen
# per-token arrays in registers (4 or 8 per thread spilled a few bytes in the AOT compile for sm_90);
# an RL batch of 8192 tokens takes 8 steps per walk.
STEP_BLOCK_T = 1024
STEP_NUM_WARPS = 16
# With an off-policy correction or another objective, walk 2 keeps more per-token values: 2 per thread
# spilled on sm_90 (the 128-register cap of 16 warps), 1 per thread does not (AOT check).
HEAVY_STEP_BLOCK_T = 512
_HEAVY = ("POLICY_WEIGHTS", "ROLLOUT", "OFF_POLICY", "ENT_MASK", "KL_RATIO", "OBJECTIVE")


def step_block_t(constexprs: dict) -> int:
    """BLOCK_T of the step kernel for a variant (its constexpr flags): smaller when it is heavy."""
    return HEAVY_STEP_BLOCK_T if any(constexprs.get(flag) for flag in _HEAVY) else STEP_BLOCK_T


GRANULARITY_IDS = {"token": 0, "sequence": 1, "subsentence": 2, "sentence": 2, "segments": 3}
AGG_IDS = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3, "sum": 4}
# out: the loss, the metrics of METRIC_NAMES but num_segments (int64, apart), and two bad-input counts
NUM_SCALARS = 22
BAD_COUNTS = slice(19, 22)  # masked-in tokens outside [0, V), bad policy weights, cu_seqlens violations


@triton.jit
def segment_step_fwd_kernel(
    logp_ptr, entropy_ptr, old_ptr, adv_ptr, ref_ptr, mask_ptr, tokens_ptr, boundary_ptr, given_ptr, cu_ptr,
    norm_ptr, h_ref_ptr, weights_ptr, rollout_ptr, sorted_ptr, count_ptr, iws_ptr, fws_ptr, grad_logp_ptr,
    grad_entropy_ptr, out_ptr, nseg_ptr,
    N, T, B, V, M, clamp_c, eps_low, eps_high, gamma, k_min, k_max, h_ref_num, dual_clip, beta, ent_coef, norm_len,
    is_min, is_max, off_delta, ent_q, tau_pos, tau_neg, k_pos, lam_pos, k_neg, lam_neg,
    GRANULARITY: tl.constexpr, AGG: tl.constexpr, RATIO_EXACT: tl.constexpr, ON_POLICY: tl.constexpr,
    ADV_PER_RESPONSE: tl.constexpr, CHECK_TOKENS: tl.constexpr, PACKED: tl.constexpr, HAS_KL: tl.constexpr,
    HAS_DUAL: tl.constexpr, HAS_NORMALIZER: tl.constexpr, ENTROPY_REF: tl.constexpr, ADAPTS: tl.constexpr,
    ADAPT_LOW: tl.constexpr, ADAPT_HIGH: tl.constexpr, HAS_ENT_COEF: tl.constexpr, OBJECTIVE: tl.constexpr,
    POLICY_WEIGHTS: tl.constexpr, ROLLOUT: tl.constexpr, IS_MASK: tl.constexpr, OFF_POLICY: tl.constexpr,
    OFF_ROLLOUT: tl.constexpr, ENT_MASK: tl.constexpr, KL_RATIO: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    # int32 workspace: seg | prev | flags | rid ; fp32 workspace: see RUN_D ... above
    seg_ptr = iws_ptr
    prev_ptr = iws_ptr + N
    flags_ptr = iws_ptr + 2 * N
    rid_ptr = iws_ptr + 3 * N
    run_d_ptr = fws_ptr + RUN_D * N
    run_h_ptr = fws_ptr + RUN_H * N
    run_n_ptr = fws_ptr + RUN_N * N
    run_r_ptr = fws_ptr + RUN_R * N
    tot_d_ptr = fws_ptr + TOT_D * N
    tot_h_ptr = fws_ptr + TOT_H * N
    tot_n_ptr = fws_ptr + TOT_N * N
    sens_ptr = fws_ptr + SENS * N
    run_a_ptr = fws_ptr + RUN_A * N
    tot_a_ptr = fws_ptr + TOT_A * N
    run_x_ptr = fws_ptr + RUN_X * N  # the extra segment sum: q - v (segment rollout weight) or vespo's log w
    tot_x_ptr = fws_ptr + TOT_X * N
    run_rv_ptr = fws_ptr + RUN_RV * N  # per response: q - v (sequence rollout weight)
    run_ro_ptr = fws_ptr + RUN_RO * N  # per response: the off-policy drift (v or q) - l
    tot_r_ptr = fws_ptr + FWS_PER_TOKEN * N  # B slots each (B may exceed N)
    tot_rv_ptr = tot_r_ptr + B
    tot_ro_ptr = tot_rv_ptr + B
    EXTRA_SUM: tl.constexpr = (ROLLOUT == 2) | (OBJECTIVE == 4)

    # ---- response id of every token: padded rows (T, in walk 1) or the spans of cu_seqlens (B + 1 offsets)
    n_bad_cu = tl.zeros([], dtype=tl.float32)  # cu_seqlens not starting at 0, decreasing, or not ending at N
    if PACKED:
        n_bad_cu = packed_response_ids(rid_ptr, cu_ptr, N, B, BLOCK_T)

    # ---- walk 1: segment ids, running sums, batch counts
    carry_last = tl.full([], -1, tl.int32)  # index of the last masked-in token so far
    carry_seg = tl.full([], 0, tl.int32)  # segments opened so far
    carry_d = tl.zeros([], dtype=tl.float32)
    carry_h = tl.zeros([], dtype=tl.float32)
    carry_n = tl.zeros([], dtype=tl.float32)
    carry_r = tl.zeros([], dtype=tl.float32)
    carry_x = tl.zeros([], dtype=tl.float32)
    carry_rv = tl.zeros([], dtype=tl.float32)
    carry_ro = tl.zeros([], dtype=tl.float32)
    n_tok = tl.zeros([], dtype=tl.float32)
    h_sum = tl.zeros([], dtype=tl.float32)
    kl_sum = tl.zeros([], dtype=tl.float32)
    n_resp = tl.zeros([], dtype=tl.float32)
    n_bad = tl.zeros([], dtype=tl.float32)  # masked-in tokens outside [0, V)
    n_bad_w = tl.zeros([], dtype=tl.float32)  # masked-in policy weights that are negative, infinite or NaN
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
        prev = tl.maximum(tl.associative_scan(tl.where(m_before, o - 1, -1).to(tl.int32), 0, maximum), carry_last)
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
        r_opens = (m & ~same).to(tl.int32)
        f_open = opens.to(tl.int32)
        seg = carry_seg + tl.cumsum(f_open, 0) - 1
        tl.store(seg_ptr + o, tl.where(m, seg, -1), mask=m_o)
        tl.store(prev_ptr + o, prev, mask=m_o)
        tl.store(flags_ptr + o, f_open * OPENS + r_opens * RESPONSE_OPENS, mask=m_o)

        lp = tl.load(logp_ptr + o, mask=m, other=0.0)
        if ON_POLICY:
            old = lp
        else:
            old = tl.load(old_ptr + o, mask=m, other=0.0).to(tl.float32)
        x_d = tl.where(m, lp - old, 0.0)
        x_h = tl.where(m, tl.load(entropy_ptr + o, mask=m, other=0.0), 0.0)
        x_n = m.to(tl.float32)
        r_d = running_sum(f_open, x_d, carry_d)
        r_h = running_sum(f_open, x_h, carry_h)
        r_n = running_sum(f_open, x_n, carry_n)
        r_r = running_sum(r_opens, x_n, carry_r)
        tl.store(run_d_ptr + o, r_d, mask=m_o)
        tl.store(run_h_ptr + o, r_h, mask=m_o)
        tl.store(run_n_ptr + o, r_n, mask=m_o)
        tl.store(run_r_ptr + o, r_r, mask=m_o)
        carry_d = last(r_d, lane, end)
        carry_h = last(r_h, lane, end)
        carry_n = last(r_n, lane, end)
        carry_r = last(r_r, lane, end)
        if (ROLLOUT > 0) | OFF_ROLLOUT:
            v = tl.load(rollout_ptr + o, mask=m, other=0.0).to(tl.float32)
        if ROLLOUT > 0:
            q_minus_v = unscored_to_zero(old - v, m)
        if EXTRA_SUM:
            if OBJECTIVE == 4:  # vespo: clamp(l - q) + clamp(log W^is) (token-level rollout weights only)
                if ROLLOUT == 1:
                    w_is, _ = rollout_weight(q_minus_v, is_min, is_max, IS_MASK)
                    x_x = vespo_log_weight(x_d, w_is, True)
                else:
                    x_x = vespo_log_weight(x_d, x_d, False)
            else:
                x_x = q_minus_v
            r_x = running_sum(f_open, tl.where(m, x_x, 0.0), carry_x)
            tl.store(run_x_ptr + o, r_x, mask=m_o)
            carry_x = last(r_x, lane, end)
        if ROLLOUT == 3:
            r_rv = running_sum(r_opens, q_minus_v, carry_rv)
            tl.store(run_rv_ptr + o, r_rv, mask=m_o)
            carry_rv = last(r_rv, lane, end)
        if OFF_POLICY:
            if OFF_ROLLOUT:
                drift = unscored_to_zero(v - lp, m)
            else:
                drift = unscored_to_zero(old - lp, m)
            r_ro = running_sum(r_opens, drift, carry_ro)
            tl.store(run_ro_ptr + o, r_ro, mask=m_o)
            carry_ro = last(r_ro, lane, end)
        if POLICY_WEIGHTS == 1:
            w_pol = tl.load(weights_ptr + o, mask=m, other=0.0).to(tl.float32)
        elif POLICY_WEIGHTS == 2:
            w_pol = tl.load(weights_ptr + rid, mask=m, other=0.0).to(tl.float32)
        if POLICY_WEIGHTS > 0:
            n_bad_w += tl.sum(tl.where(m & ~((w_pol >= 0) & (w_pol < float("inf"))), 1.0, 0.0), 0)
        carry_seg += tl.sum(f_open, 0)
        carry_last = tl.maximum(carry_last, tl.max(tl.where(m, o, -1).to(tl.int32), 0))
        n_tok += tl.sum(x_n, 0)
        h_sum += tl.sum(x_h, 0)
        kl_sum += tl.sum(tl.where(m, old - lp, 0.0), 0)
        n_resp += tl.sum(r_opens.to(tl.float32), 0)
    tl.debug_barrier()

    # ---- segment and response totals: an opening token stores the previous segment's running sums
    store_totals(
        fws_ptr, iws_ptr, N, B, carry_seg, carry_last, carry_d, carry_h, carry_n, carry_r, carry_x, carry_rv, carry_ro,
        EXTRA_SUM, ROLLOUT == 3, OFF_POLICY, BLOCK_T,
    )  # fmt: skip

    if ENTROPY_REF == 0:  # "batch": the mean entropy of the masked-in tokens
        h_ref = h_sum / tl.maximum(n_tok, 1.0)
    elif ENTROPY_REF == 1:  # a number
        h_ref = h_ref_num
    else:  # a 0-d device tensor (e.g. distributed.global_entropy_mean)
        h_ref = tl.load(h_ref_ptr)
    if ENT_MASK == 1:  # the quantile of this call's entropies
        tau_h = entropy_threshold(sorted_ptr, n_tok, M, ent_q)
    elif ENT_MASK == 2:  # of the group's, gathered: their count comes with them
        tau_h = entropy_threshold(sorted_ptr, tl.load(count_ptr).to(tl.float32), M, ent_q)

    if OBJECTIVE == 3:  # gmpo: the segments' sums of the clipped token log-ratios replace those of the raw ones
        gmpo_segment_sums(
            logp_ptr, old_ptr, adv_ptr, seg_ptr, flags_ptr, prev_ptr, rid_ptr, tot_h_ptr, tot_n_ptr, run_d_ptr,
            tot_d_ptr, N, carry_seg, carry_last, h_ref, gamma, k_min, k_max, eps_low, eps_high,
            ADAPTS, ADAPT_LOW, ADAPT_HIGH, ADV_PER_RESPONSE, ON_POLICY, BLOCK_T,
        )  # fmt: skip

    # ---- walk 2: per token objective, weights, loss, metric sums, gradient pieces
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
    is_sum = tl.zeros([], dtype=tl.float32)
    is_min_seen = tl.full([], float("inf"), tl.float32)
    is_max_seen = tl.full([], float("-inf"), tl.float32)
    is_masked = tl.zeros([], dtype=tl.float32)
    off_masked = tl.zeros([], dtype=tl.float32)
    ent_masked = tl.zeros([], dtype=tl.float32)
    dual_capped = tl.zeros([], dtype=tl.float32)
    phi_sum = tl.zeros([], dtype=tl.float32)
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
        unit_log_ratio = tl.load(tot_d_ptr + slot, mask=m, other=0.0) / n_s  # gmpo: of the clipped ones
        rho = tl.exp(clamp_nan(unit_log_ratio, -clamp_c, clamp_c))
        in_clamp = (unit_log_ratio >= -clamp_c) & (unit_log_ratio <= clamp_c)
        k = entropy_factor(tot_h_ptr, slot, m, n_s, h_ref, gamma, k_min, k_max, ADAPTS)
        width_low, width_high = clip_widths(k, eps_low, eps_high, ADAPT_LOW, ADAPT_HIGH)
        lo = 1 - width_low
        hi = 1 + width_high
        adv = advantage_of(adv_ptr, rid_ptr, o, m, ADV_PER_RESPONSE)
        lp = tl.load(logp_ptr + o, mask=m, other=0.0)

        # the weight W_t of the policy term (docs/loss.md "Off-policy corrections")
        w_policy = tl.full([BLOCK_T], 1.0, tl.float32)
        if POLICY_WEIGHTS == 1:
            w_policy = tl.load(weights_ptr + o, mask=m, other=0.0).to(tl.float32)
        elif POLICY_WEIGHTS == 2:
            w_policy = tl.load(weights_ptr + tl.load(rid_ptr + o, mask=m, other=0), mask=m, other=0.0).to(tl.float32)
        if ROLLOUT > 0:
            if ROLLOUT == 1:
                v = tl.load(rollout_ptr + o, mask=m, other=0.0).to(tl.float32)
                total = unscored_to_zero(old_of(logp_ptr, old_ptr, o, m, ON_POLICY) - v, m)
            elif ROLLOUT == 2:
                total = tl.load(tot_x_ptr + slot, mask=m, other=0.0)
            else:
                total = tl.load(tot_rv_ptr + tl.load(rid_ptr + o, mask=m, other=0), mask=m, other=0.0)
            w_is, outside = rollout_weight(total, is_min, is_max, IS_MASK)
            is_sum += tl.sum(tl.where(m, w_is, 0.0), 0)
            is_min_seen = tl.minimum(is_min_seen, tl.min(tl.where(m, w_is, float("inf")), 0))
            is_max_seen = tl.maximum(is_max_seen, tl.max(tl.where(m, w_is, float("-inf")), 0))
            is_masked += tl.sum(tl.where(m & outside, 1.0, 0.0), 0)
            if OBJECTIVE != 4:  # vespo folded it into its own weight
                w_policy = w_policy * w_is
        if OFF_POLICY:
            rid_o = tl.load(rid_ptr + o, mask=m, other=0)
            count = tl.maximum(tl.load(tot_r_ptr + rid_o, mask=m, other=1.0), 1.0)
            drift = tl.load(tot_ro_ptr + rid_o, mask=m, other=0.0) / count
            dropped = (adv < 0) & (drift > off_delta)
            off_masked += tl.sum(tl.where(m & dropped, 1.0, 0.0), 0)
            w_policy = tl.where(dropped, 0.0, w_policy)
        if ENT_MASK > 0:
            dropped = tl.load(entropy_ptr + o, mask=m, other=0.0) < tau_h
            ent_masked += tl.sum(tl.where(m & dropped, 1.0, 0.0), 0)
            w_policy = tl.where(dropped, 0.0, w_policy)

        # the objective's value and slopes, a_t through the ratio and b_t direct
        phi = tl.zeros([BLOCK_T], dtype=tl.float32)
        if OBJECTIVE == 4:
            log_w = clamp_nan(tl.load(tot_x_ptr + slot, mask=m, other=0.0), -18.420680743952367, 20.0)
            phi = vespo_phi(adv, log_w, k_pos, lam_pos, k_neg, lam_neg)
            phi_sum += tl.sum(tl.where(m & f_open, phi, 0.0), 0)
        value, slope, direct, low, high, capped = policy_term(
            rho, lo, hi, adv, lp, phi, dual_clip, tau_pos, tau_neg, OBJECTIVE, HAS_DUAL
        )
        gamma_t = tl.full([BLOCK_T], 1.0, tl.float32)
        if OBJECTIVE == 3:
            x = log_ratio_of(logp_ptr, old_ptr, o, m, ON_POLICY)
            _, gamma_t, low, high = gmpo_log_ratio(x, adv, -width_low, width_high)
        loss_t = w_policy * value
        slope = w_policy * slope
        direct = w_policy * direct
        if HAS_KL:
            diff = tl.where(m, tl.load(ref_ptr + o, mask=m, other=0.0).to(tl.float32) - lp, 0.0)
            kl = tl.exp(diff) - diff - 1
            if KL_RATIO:  # beta R KL: KL flows through the ratio, R through l
                loss_t += beta * rho * kl
                slope += beta * kl
                direct += beta * rho * (1 - tl.exp(diff))
            else:
                loss_t += beta * kl
                direct += beta * (1 - tl.exp(diff))
        if AGG == 1:
            rid_w = tl.load(rid_ptr + o, mask=m, other=0)
            w = 1.0 / (tl.maximum(tl.load(tot_r_ptr + rid_w, mask=m, other=1.0), 1.0) * denom)
        elif AGG == 4:
            w = tl.full([BLOCK_T], 1.0, tl.float32)
        else:
            w = 1.0 / denom + 0 * rho
        if HAS_ENT_COEF:
            loss_t -= ent_coef * tl.load(entropy_ptr + o, mask=m, other=0.0)
            tl.store(grad_entropy_ptr + o, tl.where(m, -ent_coef * w, 0.0), mask=m_o)
        loss_sum += tl.sum(tl.where(m, loss_t * w, 0.0), 0)
        clip_low += tl.sum(tl.where(m & low, 1.0, 0.0), 0)
        clip_high += tl.sum(tl.where(m & high, 1.0, 0.0), 0)
        dual_capped += tl.sum(tl.where(m & capped, 1.0, 0.0), 0)
        ratio_sum += tl.sum(tl.where(f_open, rho, 0.0), 0)
        ratio_min = min_nan(ratio_min, tl.reduce(tl.where(f_open, rho, float("inf")), 0, min_nan))
        ratio_max = max_nan(ratio_max, tl.reduce(tl.where(f_open, rho, float("-inf")), 0, max_nan))
        weighted_slope = tl.where(m, w * slope, 0.0)
        direct = tl.where(m, w * direct, 0.0)
        sens = tl.where(in_clamp, rho, 0.0) * gamma_t
        if RATIO_EXACT:
            r_a = running_sum(f_open.to(tl.int32), weighted_slope, carry_a)
            tl.store(run_a_ptr + o, r_a, mask=m_o)
            carry_a = last(r_a, lane, end)
            tl.store(sens_ptr + o, sens / n_s, mask=m_o)
            tl.store(grad_logp_ptr + o, direct, mask=m_o)  # the ratio's share is added in walk 3
        else:
            tl.store(grad_logp_ptr + o, tl.where(m, sens * weighted_slope + direct, 0.0), mask=m_o)

    if RATIO_EXACT:  # walk 3: dLoss/dl_t = (rho_s / n_s) gamma_t * sum over the segment of s_t', plus the direct terms
        exact_ratio_gradient(
            grad_logp_ptr, sens_ptr, run_a_ptr, tot_a_ptr, flags_ptr, prev_ptr, seg_ptr, N, carry_seg, carry_last,
            carry_a, BLOCK_T,
        )  # fmt: skip

    # ---- scalars: the loss and the finished metrics
    tokens = tl.maximum(n_tok, 1.0)
    per_seg = tl.maximum(carry_seg.to(tl.float32), 1.0)
    any_seg = carry_seg > 0
    any_token = n_tok > 0
    if ROLLOUT == 0:  # no rollout weight: W^is = 1 at every masked-in token
        is_sum = n_tok
        is_min_seen = 1.0
        is_max_seen = 1.0
    tl.store(out_ptr + 0, loss_sum)
    tl.store(out_ptr + 1, clip_low / tokens)
    tl.store(out_ptr + 2, clip_high / tokens)
    tl.store(out_ptr + 3, (clip_low + clip_high) / tokens)
    tl.store(out_ptr + 4, ratio_sum / per_seg)
    tl.store(out_ptr + 5, tl.where(any_seg, ratio_min, 0.0))
    tl.store(out_ptr + 6, tl.where(any_seg, ratio_max, 0.0))
    tl.store(out_ptr + 7, h_sum / tokens)
    tl.store(out_ptr + 8, kl_sum / tokens)
    tl.store(out_ptr + 9, n_tok / per_seg)
    tl.store(out_ptr + 10, is_sum / tokens)
    tl.store(out_ptr + 11, tl.where(any_token, is_min_seen, 0.0))
    tl.store(out_ptr + 12, tl.where(any_token, is_max_seen, 0.0))
    tl.store(out_ptr + 13, is_masked / tokens)
    tl.store(out_ptr + 14, off_masked / tokens)
    tl.store(out_ptr + 15, ent_masked / tokens)
    tl.store(out_ptr + 16, dual_capped / tokens)
    if OBJECTIVE == 1:
        tl.store(out_ptr + 17, clip_high / tokens)
    else:
        tl.store(out_ptr + 17, 0.0)
    tl.store(out_ptr + 18, phi_sum / per_seg)
    tl.store(out_ptr + 19, n_bad)  # the bad-input counts, BAD_COUNTS
    tl.store(out_ptr + 20, n_bad_w)
    tl.store(out_ptr + 21, n_bad_cu)
    tl.store(nseg_ptr, carry_seg.to(tl.int64))


def segment_step_fwd(
    logp: torch.Tensor, entropy: torch.Tensor, batch: FlatBatch, cfg: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """(loss 0-d, dLoss/dl_t (N,), dLoss/dH_t (N,) or None, metrics in METRIC_NAMES order), fp32 but
    `num_segments` (int64), for a unit upstream gradient; one launch, for every `loss_agg_mode` but "none"
    (two more ops, a sort, with the entropy mask).

    logp, entropy: (N,) fp32 from the vocabulary pass, 0 where masked out.
    """
    if cfg.loss_agg_mode not in AGG_IDS:
        raise ValueError(f"the fused segment step has no per-token loss (loss_agg_mode={cfg.loss_agg_mode!r})")
    n, device = logp.shape[0], logp.device
    f32 = torch.float32
    responses = max(batch.num_responses, 1)
    iws = new_empty((4 * max(n, 1),), torch.int32, device)
    fws = new_empty((FWS_PER_TOKEN.value * n + 3 * responses,), f32, device)
    grad_logp = new_empty((n,), f32, device)
    grad_entropy = new_empty((n if cfg.entropy_coef > 0 else 0,), f32, device)
    out = new_empty((NUM_SCALARS,), f32, device)
    nseg = new_empty((), torch.int64, device)
    ref = cfg.entropy_ref
    # a lean batch leaves the token check to this kernel; otherwise V only bounds the table lookups
    check_tokens = batch.lean and batch.token_bound is not None
    table_len = batch.token_bound or 1
    entropy_ref = 0 if isinstance(ref, str) else 2 if isinstance(ref, torch.Tensor) else 1
    rollout = ROLLOUT_LEVELS[cfg.rollout_is] if batch.rollout_logprobs is not None else 0
    weights = batch.policy_weights
    policy_weights = 0 if weights is None else 1 if weights.shape[0] == n else 2  # per token, or (B,)
    sorted_h, count, ent_mask = None, None, 0
    if cfg.entropy_mask_quantile is not None:
        sorted_h = sorted_entropies(entropy, batch.mask, batch.entropy_mask_group)
        ent_mask = 1 if batch.entropy_mask_group is None else 2
        if ent_mask == 2:
            count = torch.isfinite(sorted_h).sum().to(torch.int32)

    def ptr(t: torch.Tensor | None) -> torch.Tensor:  # a valid pointer for an input the variant never reads
        return logp if t is None else t

    def bound(value: float | None, default: float) -> float:
        return default if value is None else value

    variant = dict(
        GRANULARITY=GRANULARITY_IDS[cfg.granularity], AGG=AGG_IDS[cfg.loss_agg_mode],
        RATIO_EXACT=cfg.ratio_grad == "exact", ON_POLICY=batch.old_logprobs is None,
        ADV_PER_RESPONSE=batch.advantages.shape[0] != n, CHECK_TOKENS=check_tokens,
        PACKED=batch.cu_seqlens is not None, HAS_KL=cfg.beta > 0, HAS_DUAL=cfg.dual_clip is not None,
        HAS_NORMALIZER=batch.normalizer is not None, ENTROPY_REF=entropy_ref,
        ADAPTS=cfg.has_bounds and cfg.entropy_gamma != 0, ADAPT_LOW=cfg.adapt_low, ADAPT_HIGH=cfg.adapt_high,
        HAS_ENT_COEF=cfg.entropy_coef > 0, OBJECTIVE=OBJECTIVE_IDS[cfg.objective], POLICY_WEIGHTS=policy_weights,
        ROLLOUT=rollout, IS_MASK=cfg.rollout_is_mode == "mask", OFF_POLICY=cfg.off_policy_mask is not None,
        OFF_ROLLOUT=cfg.off_policy_mask is not None and batch.rollout_logprobs is not None, ENT_MASK=ent_mask,
        KL_RATIO=cfg.kl_ratio_weight and cfg.beta > 0,
    )  # fmt: skip
    segment_step_fwd_kernel[(1,)](
        logp, entropy, ptr(batch.old_logprobs), batch.advantages, ptr(batch.ref_logprobs), batch.mask,
        batch.tokens, ptr(batch.boundary), ptr(batch.segment_ids), ptr(batch.cu_seqlens), ptr(batch.normalizer),
        entropy_ref_on(cfg, device) if entropy_ref == 2 else logp, ptr(weights), ptr(batch.rollout_logprobs),
        ptr(sorted_h), ptr(count), iws, fws, grad_logp, grad_entropy, out, nseg,
        n, max(batch.seq_len or 1, 1), batch.num_responses, table_len, 0 if sorted_h is None else sorted_h.shape[0],
        cfg.log_ratio_clamp, cfg.eps_low, cfg.eps_high, cfg.entropy_gamma, cfg.k_min, cfg.k_max,
        ref if entropy_ref == 1 else 0.0, cfg.dual_clip or 0.0, cfg.beta, cfg.entropy_coef, batch.norm_len or 1.0,
        bound(cfg.rollout_is_min, float("-inf")), bound(cfg.rollout_is_max, float("inf")),
        bound(cfg.off_policy_mask, 0.0), 1.0 - (cfg.entropy_mask_quantile or 1.0),
        cfg.sapo_tau_pos, cfg.sapo_tau_neg, cfg.vespo_k_pos, cfg.vespo_lambda_pos, cfg.vespo_k_neg,
        cfg.vespo_lambda_neg,
        **variant, BLOCK_T=step_block_t(variant), num_warps=STEP_NUM_WARPS,
    )  # fmt: skip
    if batch.lean:  # the checks this kernel made in place of the validation layer
        _check_counts(out[BAD_COUNTS], batch)
    metrics = (*out[1:9], nseg, out[9], *out[10:19])
    return out[0], grad_logp, grad_entropy if cfg.entropy_coef > 0 else None, metrics


def _check_counts(counts: torch.Tensor, batch: FlatBatch) -> None:
    """One check of the kernel's bad-input counts (tokens, policy weights, cu_seqlens), those it made:
    on the CPU the error names its input; on CUDA (and under torch.compile) one device-side assert,
    no host sync."""
    checks = [
        (batch.token_bound is not None, token_range_message(batch.token_bound or 0)),
        (batch.policy_weights is not None, policy_weights_message()),
        (batch.cu_seqlens is not None, "cu_seqlens must start at 0, be non-decreasing and end at the token count"),
    ]
    made = [i for i, (on, _) in enumerate(checks) if on]
    if not made:
        return
    if len(made) == 1:  # one count: one comparison (the others are 0)
        good = counts[made[0]] == 0
    else:
        good = (counts == 0).all()
    if counts.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(good):
            raise ValueError("; ".join(message for (_, message), c in zip(checks, counts.tolist()) if c != 0))
    else:
        device_check(good, " / ".join(message for on, message in checks if on))
