"""The policy objectives of the composed segment step, one function each (docs/loss.md "Objectives").

Each takes the per-token `Terms` of the step (the unit's ratio value, bounds, advantage, log-prob) and
returns the policy term P_t, its two slopes (through the ratio, a_t, and direct in l_t, b_t) and the
flags its metrics count. Their twins in the fused Triton step are the `_objective_*` functions of
`objectives_triton.py`; the float64 reference writes them out literally. Adding an objective: a
function here, its twin there, a line in `OBJECTIVES`, and docs/loss.md first (CONTRIBUTING.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sspo_kernels._types import LossConfig


@dataclass
class Terms:
    """Per-token inputs of an objective, (N,) fp32 (garbage where masked out; the step masks)."""

    rho: torch.Tensor  # the unit's ratio value rho_s (gmpo: exp(clamp(G_s)))
    lo: torch.Tensor  # clip bounds of the unit (ones when the objective has none)
    hi: torch.Tensor
    adv: torch.Tensor  # A_t
    logp: torch.Tensor  # l_t
    log_w: torch.Tensor | None  # vespo: the unit's log w_s
    cfg: LossConfig


@dataclass
class Policy:
    """What an objective gives the step, (N,) each."""

    value: torch.Tensor  # P_t
    ratio_slope: torch.Tensor  # a_t = dP_t / dR at R = rho_s
    direct_slope: torch.Tensor  # b_t = dP_t / dl_t at fixed ratio
    clipped_low: torch.Tensor  # bool: counted by clip_frac_low
    clipped_high: torch.Tensor  # bool: counted by clip_frac_high
    capped: torch.Tensor | None = None  # bool: the dual clip's cap taken (dual_clip_frac)
    phi: torch.Tensor | None = None  # vespo's phi_t (vespo_phi_mean)


def _zeros_bool(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x, dtype=torch.bool)


def clip(t: Terms) -> Policy:
    """PPO-clip: P = max(-A rho, -A clamp(rho, lo, hi)), then the dual clip for A < 0."""
    adv, rho = t.adv, t.rho
    unclipped = -adv * rho
    clipped = -adv * torch.minimum(torch.maximum(rho, t.lo), t.hi)
    value = torch.maximum(unclipped, clipped)
    # torch.maximum sends the gradient to the larger branch (half to each on a tie); the clipped
    # branch carries gradient only inside [lo, hi], where it ties with the unclipped one.
    slope = torch.where(unclipped >= clipped, -adv, torch.zeros_like(adv))
    capped = None
    if t.cfg.dual_clip is not None:
        floor = -adv * t.cfg.dual_clip
        negative = adv < 0
        capped = negative & (value > floor)
        tie = negative & (value == floor)
        slope = slope * torch.where(capped, 0.0, torch.where(tie, 0.5, 1.0))
        value = torch.where(negative, torch.minimum(value, floor), value)
    low, high = (adv < 0) & (rho < t.lo), (adv > 0) & (rho > t.hi)
    return Policy(value, slope, torch.zeros_like(adv), low, high, capped=capped)


def cispo(t: Terms) -> Policy:
    """CISPO: P = -sg[clamp(rho, lo, hi)] A l; the gradient is the clipped weight times -A."""
    weight = torch.minimum(torch.maximum(t.rho, t.lo), t.hi)
    low, high = (t.adv < 0) & (t.rho < t.lo), (t.adv > 0) & (t.rho > t.hi)
    return Policy(-weight * t.adv * t.logp, torch.zeros_like(t.adv), -weight * t.adv, low, high)


def sapo(t: Terms) -> Policy:
    """SAPO: P = -A f(rho), f(x) = sigmoid(tau (x - 1)) 4 / tau, tau by the sign of A."""
    tau = torch.where(t.adv > 0, t.cfg.sapo_tau_pos, t.cfg.sapo_tau_neg)
    gate = torch.sigmoid(tau * (t.rho - 1))
    slope = -t.adv * 4 * gate * torch.sigmoid(tau * (1 - t.rho))  # 1 - gate without cancelling far from 1
    none = _zeros_bool(t.adv)
    return Policy(-t.adv * gate * 4 / tau, slope, torch.zeros_like(t.adv), none, none)


def gmpo(t: Terms) -> Policy:
    """GMPO: P = -A R with R the geometric mean of the clipped token ratios (its clip in `gmpo_log_ratio`)."""
    none = _zeros_bool(t.adv)
    return Policy(-t.adv * t.rho, -t.adv, torch.zeros_like(t.adv), none, none)


def vespo(t: Terms) -> Policy:
    """VESPO: P = -sg[phi] A l, phi = exp(lam + k log w - lam w) with (k, lam) by the sign of A."""
    cfg = t.cfg
    positive = t.adv >= 0
    k = torch.where(positive, cfg.vespo_k_pos, cfg.vespo_k_neg)
    lam = torch.where(positive, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg)
    phi = torch.exp(lam + k * t.log_w - lam * t.log_w.exp())
    none = _zeros_bool(t.adv)
    return Policy(-phi * t.adv * t.logp, torch.zeros_like(t.adv), -phi * t.adv, none, none, phi=phi)


def reinforce(t: Terms) -> Policy:
    """REINFORCE: P = -A l."""
    none = _zeros_bool(t.adv)
    return Policy(-t.adv * t.logp, torch.zeros_like(t.adv), -t.adv, none, none)


OBJECTIVES = {"clip": clip, "cispo": cispo, "sapo": sapo, "gmpo": gmpo, "vespo": vespo, "reinforce": reinforce}


def gmpo_log_ratio(
    x: torch.Tensor, adv: torch.Tensor, low_bound: torch.Tensor, high_bound: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GMPO's per-token log-ratio before the unit mean: (c_t, its slope gamma_t = dc/dx, and the
    clip-fraction flags low, high). x: l_t - q_t; the log-space bounds -eps_low k, eps_high k (k where
    the bound adapts, else 1)."""
    bounded = torch.minimum(torch.maximum(x, low_bound), high_bound)
    positive, negative = adv > 0, adv < 0
    c = torch.where(positive, torch.minimum(x, bounded), torch.where(negative, torch.maximum(x, bounded), 0.0))
    slope = torch.where(positive, x <= high_bound, torch.where(negative, x >= low_bound, False)).float()
    return c, slope, negative & (x < low_bound), positive & (x > high_bound)


def vespo_log_weight(x: torch.Tensor, rollout: torch.Tensor | None) -> torch.Tensor:
    """VESPO's per-token share of log w_s: clamp(l - q, +-20) (+ clamp(log W^is, ln 1e-8, 20))."""
    share = x.clamp(-20.0, 20.0)
    if rollout is not None:
        share = share + torch.log(rollout.clamp(min=1e-8)).clamp(math.log(1e-8), 20.0)
    return share


VESPO_LOG_W_MIN = math.log(1e-8)
VESPO_LOG_W_MAX = 20.0
