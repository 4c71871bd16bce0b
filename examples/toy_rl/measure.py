"""What the loop measures by itself, to set beside the loss's own metrics.

Two independent measurements of a loss call on a padded batch (B responses, R columns):
- `recompute_metrics`: the clip counts, segment ratio range and KL, recomputed in float64 from the
  log-probs the loss returned, the old log-probs, the entropies and segments found here from the
  token strings (not from the package);
- `gradient_counts`: which tokens and responses got exactly zero gradient, read from the gradient
  the loss's backward actually wrote into the hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClipRule:
    """The clip bounds of one method: lo = 1 - eps_low * k, hi = 1 + eps_high * k with the entropy
    factor k = clamp((Hbar_s / H_ref) ** entropy_gamma, k_min, k_max) (k = 1 when gamma is 0)."""

    granularity: str
    eps_low: float
    eps_high: float
    entropy_gamma: float = 0.0
    k_min: float = 0.5
    k_max: float = 2.0
    log_ratio_clamp: float = 20.0


def segment_index(tokens: torch.Tensor, mask: torch.Tensor, granularity: str, boundary: torch.Tensor) -> torch.Tensor:
    """(B, R) int64 segment number of every token, numbered through the batch; -1 where masked out.

    mask must be a prefix of each row. A segment starts at a response's first token and, for
    "subsentence", after every boundary token; "token" makes every token a segment.
    """
    if granularity not in ("token", "sequence", "subsentence"):
        raise ValueError(f"granularity must be token, sequence or subsentence, got {granularity!r}")
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("mask must be a prefix of every row")
    first = torch.zeros_like(mask)
    first[:, 0] = True
    if granularity == "token":
        starts = mask.clone()
    elif granularity == "sequence":
        starts = mask & first
    else:
        after_boundary = torch.zeros_like(mask)
        after_boundary[:, 1:] = boundary[tokens[:, :-1]]
        starts = mask & (first | after_boundary)
    ids = starts.reshape(-1).long().cumsum(0).reshape(mask.shape) - 1
    return torch.where(mask, ids, -1)


def recompute_metrics(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    segments: torch.Tensor,
    advantages: torch.Tensor,
    rule: ClipRule,
) -> dict[str, float | torch.Tensor]:
    """Clip statistics of one call, in float64. Inputs (B, R); advantages (B,) per response.

    Returns the loss's metric names (clip_frac_low / high, clip_frac, ratio_min / max, approx_kl) as
    floats, the count of clipped tokens `clipped_tokens`, `bound_margin` (the smallest relative gap
    |rho_s - bound_s| / bound_s of a segment to its clip bounds: below ~1e-6 the fp32 loss and this
    float64 recomputation may disagree about that segment), and `predicted_fully_clipped` (B,) bool:
    responses with A != 0 whose every token lies in a segment clipped on the side that stops its
    gradient (A > 0 above hi, A < 0 below lo).
    """
    lp, old, ent = (t.double() for t in (logprobs, old_logprobs, entropy))
    sel = segments[mask]
    count = torch.bincount(sel).double()
    mean_log_ratio = torch.bincount(sel, weights=(lp - old)[mask]) / count
    c = rule.log_ratio_clamp
    rho = mean_log_ratio.clamp(-c, c).exp()
    if rule.entropy_gamma:
        h_ref = ent[mask].mean()
        seg_entropy = torch.bincount(sel, weights=ent[mask]) / count
        k = (seg_entropy / h_ref).pow(rule.entropy_gamma).clamp(rule.k_min, rule.k_max)
    else:
        k = torch.ones_like(rho)
    lo, hi = 1 - rule.eps_low * k, 1 + rule.eps_high * k
    slot = segments.clamp(min=0)
    adv = advantages.double()[:, None].expand_as(lp)
    low = mask & (adv < 0) & (rho[slot] < lo[slot])
    high = mask & (adv > 0) & (rho[slot] > hi[slot])
    n = mask.sum().double()
    clipped = low | high
    return {
        "clip_frac_low": float(low.sum() / n),
        "clip_frac_high": float(high.sum() / n),
        "clip_frac": float(clipped.sum() / n),
        "ratio_min": float(rho.min()),
        "ratio_max": float(rho.max()),
        "approx_kl": float((old - lp)[mask].mean()),
        "clipped_tokens": int(clipped.sum()),
        "bound_margin": float(torch.minimum((rho - lo).abs() / lo, (rho - hi).abs() / hi).min()),
        "predicted_fully_clipped": (advantages != 0) & (clipped | ~mask).all(dim=1),
    }


def gradient_counts(grad_hidden: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    """Read zero gradients off dLoss/dhidden (B, R, H).

    Returns `zero_grad_tokens` (masked-in tokens of responses with A != 0 whose hidden-state gradient
    is exactly 0, a count), `active` (B,) bool (A != 0) and `fully_clipped` (B,) bool (A != 0 and
    every masked-in token's gradient exactly 0).
    """
    active = advantages != 0
    zero = (grad_hidden == 0).all(dim=-1) & mask
    return {
        "zero_grad_tokens": (zero & active[:, None]).sum(),
        "active": active,
        "fully_clipped": active & (zero | ~mask).all(dim=1),
    }
