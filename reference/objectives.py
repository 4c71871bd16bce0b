"""The policy terms P_t of docs/loss.md ("Objectives"), one function per objective, for one segment at a time.

Each takes a `Segment` (its tokens' l_t, differentiable, and the data around them) and returns its `Terms`: the
per-token P_t and the segment's ratio R_t in the configured gradient form (for the ratio-weighted KL), plus what
the metrics count. Gradients come from autograd; `.detach()` stands exactly where docs/loss.md writes sg[].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from reference.corrections import IS_LOG_CLAMP, VESPO_LOG_MIN
from sspo_kernels._types import LossConfig


@dataclass
class Segment:
    """One segment's tokens (all masked-in, in token order)."""

    logp: torch.Tensor  # l_t, differentiable
    old: torch.Tensor  # q_t (sg[l_t] on-policy)
    adv: torch.Tensor  # A_t
    k: torch.Tensor  # the entropy factor k_s (0-d, no gradient)
    lo: torch.Tensor | float  # lo_s
    hi: torch.Tensor | float  # hi_s
    log_is: torch.Tensor | None  # clamp(log W^is_t, ln 1e-8, 20) (vespo); None without rollout_logprobs


@dataclass
class Terms:
    policy: torch.Tensor  # P_t
    ratio: torch.Tensor  # R_t with its gradient form; its value is `ratio_value`
    ratio_value: torch.Tensor  # 0-d, detached: what the ratio metrics average
    clipped_low: torch.Tensor  # bool per token (clip_frac_low)
    clipped_high: torch.Tensor  # bool per token (clip_frac_high)
    dual_clipped: torch.Tensor | None = None  # bool per token (dual_clip_frac)
    phi: torch.Tensor | None = None  # vespo's phi_t


def segment_ratio(mean: torch.Tensor, own: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_t per token, exp(clamp(mean, -c, c))) for a segment's mean log-ratio `mean` (D_s, or gmpo's G_s) and each
    token's own differentiable term `own` (l_t, or gmpo's c_t): "exact" differentiates through the mean, "token"
    uses exp(clamp(sg[mean] + own - sg[own], -c, c))."""
    c = cfg.log_ratio_clamp
    rho = mean.clamp(-c, c).exp()
    if cfg.ratio_grad == "token":
        return (mean.detach() + own - own.detach()).clamp(-c, c).exp(), rho
    return rho.expand(len(own)), rho


def _plain_ratio(seg: Segment, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """R_t and rho_s from D_s = (1/n_s) sum (l_t - q_t)."""
    return segment_ratio((seg.logp - seg.old).mean(), seg.logp, cfg)


def _bound_clip_flags(seg: Segment, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rho = rho.detach()
    return (seg.adv < 0) & (rho < seg.lo), (seg.adv > 0) & (rho > seg.hi)


def _by_sign(cond: torch.Tensor, yes: float, no: float) -> torch.Tensor:
    """Per token, `yes` where `cond` holds and `no` elsewhere, in float64."""
    return torch.where(cond, torch.tensor(yes, dtype=torch.float64), torch.tensor(no, dtype=torch.float64))


def _no_clip(seg: Segment) -> tuple[torch.Tensor, torch.Tensor]:
    none = torch.zeros(len(seg.adv), dtype=torch.bool)
    return none, none.clone()


def clip(seg: Segment, cfg: LossConfig) -> Terms:
    """PPO's pessimistic clip, with the dual clip for A_t < 0 when set."""
    ratio, rho = _plain_ratio(seg, cfg)
    a = seg.adv
    loss_t = torch.maximum(-a * ratio, -a * ratio.clamp(seg.lo, seg.hi))
    dual = torch.zeros(len(a), dtype=torch.bool)
    if cfg.dual_clip is not None:
        dual = (a < 0) & (loss_t.detach() > -a * cfg.dual_clip)
        loss_t = torch.where(a < 0, torch.minimum(loss_t, -a * cfg.dual_clip), loss_t)
    low, high = _bound_clip_flags(seg, rho)
    return Terms(loss_t, ratio, rho.detach(), low, high, dual_clipped=dual)


def cispo(seg: Segment, cfg: LossConfig) -> Terms:
    """P_t = -sg[clamp(rho_s, lo_s, hi_s)] * A_t * l_t."""
    ratio, rho = _plain_ratio(seg, cfg)
    policy = -rho.clamp(seg.lo, seg.hi).detach() * seg.adv * seg.logp
    low, high = _bound_clip_flags(seg, rho)
    return Terms(policy, ratio, rho.detach(), low, high)


def sapo(seg: Segment, cfg: LossConfig) -> Terms:
    """P_t = -A_t * sigmoid(tau * (R_t - 1)) * 4 / tau, tau by the sign of A_t."""
    ratio, rho = _plain_ratio(seg, cfg)
    a = seg.adv
    tau = _by_sign(a > 0, cfg.sapo_tau_pos, cfg.sapo_tau_neg)
    policy = -a * (torch.sigmoid(tau * (ratio - 1)) * 4 / tau)
    return Terms(policy, ratio, rho.detach(), *_no_clip(seg))


def gmpo(seg: Segment, cfg: LossConfig) -> Terms:
    """Each token's log-ratio clipped in log space on the side that limits the update, then the segment mean."""
    x = seg.logp - seg.old
    low = -cfg.eps_low * (seg.k if cfg.adapt_low else 1.0)
    high = cfg.eps_high * (seg.k if cfg.adapt_high else 1.0)
    low, high = torch.as_tensor(low, dtype=x.dtype), torch.as_tensor(high, dtype=x.dtype)
    e = x.clamp(low, high)
    a = seg.adv
    c_t = torch.where(a > 0, torch.minimum(x, e), torch.where(a < 0, torch.maximum(x, e), torch.zeros_like(x)))
    ratio, value = segment_ratio(c_t.mean(), c_t, cfg)
    x_d = x.detach()
    return Terms(-a * ratio, ratio, value.detach(), (a < 0) & (x_d < low), (a > 0) & (x_d > high))


def vespo(seg: Segment, cfg: LossConfig) -> Terms:
    """P_t = -sg[phi_t] * A_t * l_t, phi a gamma function of the segment's product of token ratios (its sum of
    clamped log-ratios, plus the token rollout weights' logs)."""
    ratio, rho = _plain_ratio(seg, cfg)
    total = (seg.logp - seg.old).clamp(-IS_LOG_CLAMP, IS_LOG_CLAMP).sum()
    if seg.log_is is not None:
        total = total + seg.log_is.sum()
    log_w = total.clamp(VESPO_LOG_MIN, IS_LOG_CLAMP)
    a = seg.adv
    nonneg = a >= 0
    k = _by_sign(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg)
    lam = _by_sign(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    policy = -phi.detach() * a * seg.logp
    return Terms(policy, ratio, rho.detach(), *_no_clip(seg), phi=phi.detach())


def reinforce(seg: Segment, cfg: LossConfig) -> Terms:
    """P_t = -A_t * l_t."""
    ratio, rho = _plain_ratio(seg, cfg)
    return Terms(-seg.adv * seg.logp, ratio, rho.detach(), *_no_clip(seg))


OBJECTIVES: dict[str, Callable[[Segment, LossConfig], Terms]] = {
    "clip": clip,
    "cispo": cispo,
    "sapo": sapo,
    "gmpo": gmpo,
    "vespo": vespo,
    "reinforce": reinforce,
}
