"""What the loop measures by itself, to set beside the loss's own metrics.

Two independent measurements of a loss call on a padded batch (B responses, R columns):
- `recompute_metrics`: the clip counts, segment ratio range and KL, recomputed in float64 from the
  log-probs the loss returned, the old log-probs, the entropies and segments found here from the
  token strings (not from the package); and which tokens the objective gives a zero gradient, from
  float64 autograd through this file's own transcription of docs/loss.md "Objectives";
- `gradient_counts`: which tokens and responses got exactly zero gradient, read from the gradient
  the loss's backward actually wrote into the hidden states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OBJECTIVES = ("clip", "cispo", "sapo", "gmpo", "vespo", "reinforce")
BOUNDED = ("clip", "cispo", "gmpo")  # objectives with clip bounds (eps_low, eps_high, entropy adaptation)
HARD_CLIP = ("clip", "gmpo")  # objectives whose clipping stops a token's gradient
VESPO_LOG_MIN, LOG_W_MAX = math.log(1e-8), 20.0  # vespo's clamp of log w_s (docs/loss.md "Objectives")
# A float64 gradient dP_t/dl_t smaller than this times |A_t| * max(rho_s, 1) is beyond fp32's reach: the fp32
# loss may give exactly 0 there (fp32 resolves 6e-8 relative, so sapo's 4 s (1 - s) is 0 once s rounds to 1,
# near a ratio of 18; vespo's phi falls below fp32's smallest number, 1e-45, far from a ratio of 1).
NEGLIGIBLE = 1e-6


@dataclass(frozen=True)
class LossRule:
    """The policy term of one method: its objective at a granularity, with the clip bounds
    lo = 1 - eps_low * k, hi = 1 + eps_high * k (gmpo: -eps_low * k, eps_high * k on each token's
    log-ratio) and the entropy factor k = clamp((Hbar_s / H_ref) ** entropy_gamma, k_min, k_max)
    (k = 1 when gamma is 0); `params` are the objective's own parameters (sapo's tau, vespo's k and
    lambda) as (name, value) pairs."""

    granularity: str
    objective: str = "clip"
    eps_low: float = 0.0
    eps_high: float = 0.0
    entropy_gamma: float = 0.0
    k_min: float = 0.5
    k_max: float = 2.0
    log_ratio_clamp: float = 20.0
    params: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective not in BOUNDED and (self.eps_low or self.eps_high or self.entropy_gamma):
            raise ValueError(f"objective {self.objective!r} has no clip bounds")

    def param(self, name: str) -> float:
        return dict(self.params)[name]


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


def _by_sign(cond: torch.Tensor, yes: float, no: float) -> torch.Tensor:
    return torch.where(cond, torch.tensor(yes, dtype=torch.float64), torch.tensor(no, dtype=torch.float64))


def _policy_terms(x, lp, adv, sel, count, k, rule):
    """(P_t, segment ratio values, clipped low, clipped high, phi per token or None, bound gaps) of the
    masked-in tokens, flattened in token order; x = l_t - q_t and lp = l_t carry the autograd graph."""
    n_seg, c = len(count), rule.log_ratio_clamp
    seg_sum = lambda v: torch.zeros(n_seg, dtype=torch.float64).index_add(0, sel, v)
    k_t = k[sel]
    no = torch.zeros_like(adv, dtype=torch.bool)
    obj = rule.objective
    if obj == "gmpo":  # each token's log-ratio clipped in log space on the side that limits the update
        low, high = -rule.eps_low * k_t, rule.eps_high * k_t
        e = torch.clamp(x, low, high)
        c_t = torch.where(adv > 0, torch.minimum(x, e), torch.where(adv < 0, torch.maximum(x, e), 0.0 * x))
        ratio = (seg_sum(c_t) / count).clamp(-c, c).exp()
        x_d = x.detach()
        gaps = torch.cat([(x_d - low).abs(), (x_d - high).abs()]) / torch.cat([low.abs(), high]).clamp(min=1.0)
        return -adv * ratio[sel], ratio.detach(), (adv < 0) & (x_d < low), (adv > 0) & (x_d > high), None, gaps
    rho = (seg_sum(x) / count).clamp(-c, c).exp()
    r_t, rho_d = rho[sel], rho.detach()
    lo, hi = 1 - rule.eps_low * k, 1 + rule.eps_high * k
    low_flag, high_flag = (adv < 0) & (rho_d[sel] < lo[sel]), (adv > 0) & (rho_d[sel] > hi[sel])
    gaps = torch.cat([(rho_d - lo).abs() / lo.abs().clamp(min=1.0), (rho_d - hi).abs() / hi])
    phi = None
    if obj == "clip":
        policy = torch.maximum(-adv * r_t, -adv * torch.clamp(r_t, lo[sel], hi[sel]))
    elif obj == "cispo":
        policy = -torch.clamp(r_t, lo[sel], hi[sel]).detach() * adv * lp
    elif obj == "sapo":
        tau = _by_sign(adv > 0, rule.param("sapo_tau_pos"), rule.param("sapo_tau_neg"))
        policy = -adv * torch.sigmoid(tau * (r_t - 1)) * 4 / tau
    elif obj == "vespo":
        log_w = seg_sum(x.clamp(-LOG_W_MAX, LOG_W_MAX)).clamp(VESPO_LOG_MIN, LOG_W_MAX)[sel]
        nonneg = adv >= 0
        kk = _by_sign(nonneg, rule.param("vespo_k_pos"), rule.param("vespo_k_neg"))
        lam = _by_sign(nonneg, rule.param("vespo_lambda_pos"), rule.param("vespo_lambda_neg"))
        phi = torch.exp(lam + kk * log_w - lam * torch.exp(log_w)).detach()
        policy = -phi * adv * lp
    else:  # reinforce
        policy = -adv * lp
    if obj not in BOUNDED:
        low_flag, high_flag, gaps = no, no.clone(), torch.zeros(0, dtype=torch.float64)
    return policy, rho_d, low_flag, high_flag, phi, gaps


def recompute_metrics(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    segments: torch.Tensor,
    advantages: torch.Tensor,
    rule: LossRule,
) -> dict[str, float | int | torch.Tensor | None]:
    """Clip statistics of one call, in float64. Inputs (B, R); advantages (B,) per response.

    Returns the loss's metric names (clip_frac_low / high, clip_frac, ratio_min / max, approx_kl,
    vespo_phi_mean) as floats; `clipped_tokens`; `bound_margin`, the smallest gap of a clipped
    quantity (a segment's ratio; gmpo: a token's log-ratio) to one of its bounds, relative to
    max(|bound|, 1) (below ~1e-6 the fp32 loss and this float64 recomputation may disagree about it;
    None without bounds); `predicted_zero_grad` (B, R) bool: masked-in tokens whose float64 gradient
    dP_t/dl_t of the objective is exactly 0; `negligible` (B, R) bool: masked-in tokens whose float64
    gradient is not 0 but below NEGLIGIBLE * |A_t| * max(rho_s, 1) (the fp32 loss may round it to 0, so either answer is
    right there); and `predicted_fully_clipped` (B,) bool: responses with
    A != 0 whose every masked-in token is predicted to get a zero gradient.
    """
    sel = segments[mask]
    count = torch.bincount(sel).double()
    lp = logprobs.double()[mask].requires_grad_(True)
    old, ent = old_logprobs.double()[mask], entropy.double()[mask]
    adv = advantages.double()[:, None].expand_as(mask)[mask]
    if rule.entropy_gamma:
        h_ref = ent.mean()
        seg_entropy = torch.bincount(sel, weights=ent) / count
        k = (seg_entropy / h_ref).pow(rule.entropy_gamma).clamp(rule.k_min, rule.k_max)
    else:
        k = torch.ones_like(count)
    policy, ratio, low, high, phi, gaps = _policy_terms(lp - old, lp, adv, sel, count, k, rule)
    (grad,) = torch.autograd.grad(policy.sum(), lp)
    zero_grad, negligible = torch.zeros_like(mask), torch.zeros_like(mask)
    zero_grad[mask] = grad == 0
    negligible[mask] = (grad != 0) & (grad.abs() < NEGLIGIBLE * adv.abs() * ratio[sel].clamp(min=1.0))
    first = torch.ones_like(sel, dtype=torch.bool)
    first[1:] = sel[1:] != sel[:-1]
    n = mask.sum().double()
    clipped = low | high
    active = advantages != 0
    return {
        "clip_frac_low": float(low.sum() / n),
        "clip_frac_high": float(high.sum() / n),
        "clip_frac": float(clipped.sum() / n),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
        "approx_kl": float((old - lp.detach()).mean()),
        "vespo_phi_mean": float(phi[first].mean()) if phi is not None else 0.0,
        "clipped_tokens": int(clipped.sum()),
        "bound_margin": float(gaps.min()) if len(gaps) else None,
        "predicted_zero_grad": zero_grad,
        "negligible": negligible,
        "predicted_fully_clipped": active & (zero_grad | ~mask).all(dim=1),
    }


def gradient_counts(grad_hidden: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    """Read zero gradients off dLoss/dhidden (B, R, H).

    Returns `zero_grad` (B, R) bool (masked-in tokens of responses with A != 0 whose hidden-state
    gradient is exactly 0), `zero_grad_tokens` (their count), `active` (B,) bool (A != 0),
    `active_tokens` (the masked-in tokens of those responses) and `fully_clipped` (B,) bool (A != 0
    and every masked-in token's gradient exactly 0).
    """
    active = advantages != 0
    zero = (grad_hidden == 0).all(dim=-1) & mask
    return {
        "zero_grad": zero & active[:, None],
        "zero_grad_tokens": (zero & active[:, None]).sum(),
        "active": active,
        "active_tokens": (mask & active[:, None]).sum(),
        "fully_clipped": active & (zero | ~mask).all(dim=1),
    }
