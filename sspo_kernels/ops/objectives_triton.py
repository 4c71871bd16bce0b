"""The policy objectives of the fused segment step, one `@triton.jit` function each (docs/loss.md
"Objectives"); the twins of `objectives_torch.py`, called per block of tokens by
`objective_triton.segment_step_fwd_kernel` through `policy_term`.

Every objective maps (the unit's ratio rho, its bounds lo / hi, the advantage A, the log-prob l, vespo's
log w) to the policy term P_t, its slope through the ratio a_t, its direct slope b_t, the flags of the
clip fractions, the dual clip's cap flag and vespo's phi. Blocks are fp32; NaN propagates as in torch
(`max_nan` / `min_nan`).
"""

from __future__ import annotations

import triton
import triton.language as tl

OBJECTIVE_IDS = {"clip": 0, "cispo": 1, "sapo": 2, "gmpo": 3, "vespo": 4, "reinforce": 5}


@triton.jit
def max_nan(a, b):
    """max that propagates NaN, as torch.maximum / clamp do (tl.maximum's default drops it)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def clamp_nan(x, lo, hi):
    return min_nan(max_nan(x, lo), hi)


@triton.jit
def _never(adv):
    """An all-False block shaped like adv (also where adv is NaN)."""
    return (adv < 0) & (adv > 0)


@triton.jit
def _objective_clip(rho, lo, hi, adv, dual_clip, HAS_DUAL: tl.constexpr):
    """PPO-clip: P = max(-A rho, -A clamp(rho, lo, hi)), then the dual clip for A < 0."""
    unclipped = -adv * rho
    clipped = -adv * clamp_nan(rho, lo, hi)
    value = max_nan(unclipped, clipped)
    slope = tl.where(unclipped >= clipped, -adv, 0.0)  # dP / drho; half to each branch on a tie
    capped = _never(adv)
    if HAS_DUAL:
        floor = -adv * dual_clip
        negative = adv < 0
        capped = negative & (value > floor)
        slope = slope * tl.where(capped, 0.0, tl.where(negative & (value == floor), 0.5, 1.0))
        value = tl.where(negative, min_nan(value, floor), value)
    return value, slope, tl.zeros_like(adv), (adv < 0) & (rho < lo), (adv > 0) & (rho > hi), capped


@triton.jit
def _objective_cispo(rho, lo, hi, adv, lp):
    """CISPO: P = -sg[clamp(rho, lo, hi)] A l."""
    weight = clamp_nan(rho, lo, hi)
    low, high = (adv < 0) & (rho < lo), (adv > 0) & (rho > hi)
    return -weight * adv * lp, tl.zeros_like(adv), -weight * adv, low, high, _never(adv)


@triton.jit
def _objective_sapo(rho, adv, tau_pos, tau_neg):
    """SAPO: P = -A sigmoid(tau (rho - 1)) 4 / tau, tau by the sign of A; dP/drho = -A 4 s (1 - s)."""
    tau = tl.where(adv > 0, tau_pos, tau_neg)
    gate = tl.sigmoid(tau * (rho - 1.0))
    other = tl.sigmoid(tau * (1.0 - rho))  # 1 - gate without cancelling far from rho = 1
    return (
        -adv * gate * 4.0 / tau,
        -adv * 4.0 * gate * other,
        tl.zeros_like(adv),
        _never(adv),
        _never(adv),
        _never(adv),
    )


@triton.jit
def _objective_gmpo(rho, adv):
    """GMPO: P = -A R, R the geometric mean of the clipped token ratios (their clip: `gmpo_log_ratio`)."""
    return -adv * rho, -adv, tl.zeros_like(adv), _never(adv), _never(adv), _never(adv)


@triton.jit
def vespo_phi(adv, log_w, k_pos, lam_pos, k_neg, lam_neg):
    """phi = exp(lam + k log w - lam w), (k, lam) by the sign of A (A >= 0: the positive pair)."""
    positive = adv >= 0
    k = tl.where(positive, k_pos, k_neg)
    lam = tl.where(positive, lam_pos, lam_neg)
    return tl.exp(lam + k * log_w - lam * tl.exp(log_w))


@triton.jit
def _objective_vespo(adv, lp, phi):
    """VESPO: P = -sg[phi] A l."""
    return -phi * adv * lp, tl.zeros_like(adv), -phi * adv, _never(adv), _never(adv), _never(adv)


@triton.jit
def _objective_reinforce(adv, lp):
    """REINFORCE: P = -A l."""
    return -adv * lp, tl.zeros_like(adv), -adv, _never(adv), _never(adv), _never(adv)


@triton.jit
def policy_term(
    rho, lo, hi, adv, lp, phi, dual_clip, tau_pos, tau_neg,
    OBJECTIVE: tl.constexpr, HAS_DUAL: tl.constexpr,
):  # fmt: skip
    """(P_t, a_t, b_t, clip-low flag, clip-high flag, dual-cap flag) of the objective OBJECTIVE
    (`OBJECTIVE_IDS`); phi is vespo's weight (`vespo_phi`), unused by the others."""
    if OBJECTIVE == 0:
        return _objective_clip(rho, lo, hi, adv, dual_clip, HAS_DUAL)
    elif OBJECTIVE == 1:
        return _objective_cispo(rho, lo, hi, adv, lp)
    elif OBJECTIVE == 2:
        return _objective_sapo(rho, adv, tau_pos, tau_neg)
    elif OBJECTIVE == 3:
        return _objective_gmpo(rho, adv)
    elif OBJECTIVE == 4:
        return _objective_vespo(adv, lp, phi)
    else:
        return _objective_reinforce(adv, lp)


@triton.jit
def gmpo_log_ratio(x, adv, low_bound, high_bound):
    """GMPO's per-token log-ratio before the unit mean: (c_t, gamma_t = dc/dx, clip-low, clip-high).
    x = l - q; the log-space bounds -eps_low k, eps_high k (k where the bound adapts); c = 0 where A = 0."""
    bounded = clamp_nan(x, low_bound, high_bound)
    positive = adv > 0
    negative = adv < 0
    c = tl.where(positive, min_nan(x, bounded), tl.where(negative, max_nan(x, bounded), 0.0))
    slope = tl.where(positive, x <= high_bound, tl.where(negative, x >= low_bound, False)).to(tl.float32)
    return c, slope, negative & (x < low_bound), positive & (x > high_bound)


@triton.jit
def clip_widths(k, eps_low, eps_high, ADAPT_LOW: tl.constexpr, ADAPT_HIGH: tl.constexpr):
    """(eps_low k, eps_high k), with k = 1 for a bound that does not adapt: lo = 1 - first, hi = 1 + second."""
    if ADAPT_LOW:
        low = eps_low * k
    else:
        low = eps_low + 0 * k
    if ADAPT_HIGH:
        high = eps_high * k
    else:
        high = eps_high + 0 * k
    return low, high


@triton.jit
def vespo_log_weight(x, rollout, HAS_ROLLOUT: tl.constexpr):
    """VESPO's per-token share of log w_s: clamp(x, +-20) (+ clamp(log W^is, ln 1e-8, 20))."""
    share = clamp_nan(x, -20.0, 20.0)
    if HAS_ROLLOUT:
        share += clamp_nan(tl.log(tl.maximum(rollout, 1e-8)), -18.420680743952367, 20.0)
    return share
