"""The off-policy corrections of the fused segment step (docs/loss.md "Off-policy corrections"), as
`@triton.jit` functions on blocks of tokens; the twins of `corrections.py`.

The unit sums they need (of q - v per token, segment or response, and of the off-policy drift per
response) are running sums of `objective_triton.segment_step_fwd_kernel`'s first walk.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sspo_kernels.ops.objectives_triton import clamp_nan

ROLLOUT_LEVELS = {None: 0, "token": 1, "segment": 2, "sequence": 3}


@triton.jit
def rollout_weight(total, is_min, is_max, MASK_MODE: tl.constexpr):
    """(W^is, zeroed by "mask" mode) from the unit's sum of q - v: w = exp(clamp(total, +-20)), then
    clamped to [is_min, is_max] ("truncate") or zeroed outside it ("mask"); the bounds may be -+inf."""
    w = tl.exp(clamp_nan(total, -20.0, 20.0))
    if MASK_MODE:
        outside = (w < is_min) | (w > is_max)
        return tl.where(outside, 0.0, w), outside
    else:
        return clamp_nan(w, is_min, is_max), (w < 0.0) & (w > 0.0)


@triton.jit
def unscored_to_zero(x, m):
    """x at masked-in tokens, 0 elsewhere and where x is NaN (a token the sampler could not score)."""
    return tl.where(m & (x == x), x, 0.0)


@triton.jit
def entropy_threshold(sorted_ptr, count, M, q):
    """torch.quantile(values, q) with linear interpolation, of the `count` masked-in entropies that end
    the ascending (M,) array at sorted_ptr (`corrections.sorted_entropies`); +inf when count is 0."""
    rank = tl.maximum(count - 1.0, 0.0) * q
    below = tl.floor(rank)
    weight = rank - below
    first = M - count.to(tl.int32)
    some = count > 0
    low = tl.load(sorted_ptr + tl.minimum(first + below.to(tl.int32), M - 1), mask=some, other=0.0)
    high = tl.load(sorted_ptr + tl.minimum(first + tl.ceil(rank).to(tl.int32), M - 1), mask=some, other=0.0)
    # torch.lerp: from the nearer end
    value = tl.where(weight < 0.5, low + weight * (high - low), high - (high - low) * (1.0 - weight))
    return tl.where(some, value, float("inf"))
