"""The off-policy corrections of docs/loss.md ("Off-policy corrections"), in float64, token by token.

Each function returns per-token tensors of length N (the flattened tokens); only the entries of masked-in tokens
mean anything, and the caller reads nothing else. None of them carries a gradient: every weight and mask here
is data (docs/loss.md: "no gradient flows through a weight or a mask").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sspo_kernels._types import FlatBatch, LossConfig

F64 = torch.float64
IS_LOG_CLAMP = 20.0  # log w_u = clamp(sum of Delta_t, -20, 20)
VESPO_LOG_MIN = math.log(1e-8)  # vespo clamps log W^is_t to [ln 1e-8, 20]


@dataclass
class Corrections:
    """Per-token (N,) results of the corrections; entries at masked-out tokens are meaningless."""

    weight: torch.Tensor  # W_t, the policy term's weight (vespo: without W^is)
    is_weight: torch.Tensor  # W^is_t (1 without a rollout weight)
    is_masked: torch.Tensor  # bool: "mask" mode and w_u(t) outside [lo, hi]
    off_policy_masked: torch.Tensor  # bool: M^off_t = 0
    entropy_masked: torch.Tensor  # bool: M^ent_t = 0
    log_is: torch.Tensor | None  # clamp(log W^is_t, ln 1e-8, 20) for vespo; None without rollout_logprobs


def responses(batch: FlatBatch) -> list[list[int]]:
    """The masked-in tokens of each non-empty response, in token order."""
    members: dict[int, list[int]] = {}
    for t, (m, b) in enumerate(zip(batch.mask.tolist(), batch.response_ids.tolist())):
        if m:
            members.setdefault(b, []).append(t)
    return [members[b] for b in sorted(members)]


def rollout_units(batch: FlatBatch, cfg: LossConfig, segments: list[list[int]]) -> list[list[int]]:
    """The units u of the rollout importance weight: tokens, the call's segments or responses."""
    if cfg.rollout_is == "token":
        return [[t] for t in range(batch.num_tokens) if batch.mask[t]]
    if cfg.rollout_is == "segment":
        return segments
    return responses(batch)


def rollout_is_weights(
    batch: FlatBatch, cfg: LossConfig, segments: list[list[int]], old: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W^is_t, is_masked_t) per token. `old` is q_t (sg[l_t] on-policy)."""
    n = batch.num_tokens
    weight = torch.ones(n, dtype=F64)
    outside = torch.zeros(n, dtype=torch.bool)
    if batch.rollout_logprobs is None or cfg.rollout_is is None:
        return weight, outside
    v = batch.rollout_logprobs.double()
    delta = torch.where(torch.isnan(v), 0.0, old.detach() - v)  # Delta_t = q_t - v_t; 0 where v_t is NaN
    lo, hi = cfg.rollout_is_min, cfg.rollout_is_max
    for unit in rollout_units(batch, cfg, segments):
        idx = torch.tensor(unit)
        log_w = delta[idx].sum().clamp(-IS_LOG_CLAMP, IS_LOG_CLAMP)
        w = log_w.exp()
        if cfg.rollout_is_mode == "truncate":
            weight[idx] = w if lo is None and hi is None else w.clamp(min=lo, max=hi)
        else:  # "mask": the real weight, or 0 outside [lo, hi]
            inside = (lo is None or bool(lo <= w)) and (hi is None or bool(w <= hi))
            weight[idx] = w if inside else torch.zeros((), dtype=F64)
            outside[idx] = not inside
    return weight, outside


def off_policy_masked(
    batch: FlatBatch, cfg: LossConfig, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor
) -> torch.Tensor:
    """M^off_t = 0 (True here) where A_t < 0 and the response's mean drift D_b exceeds delta."""
    dropped = torch.zeros(batch.num_tokens, dtype=torch.bool)
    if cfg.off_policy_mask is None:
        return dropped
    source = old if batch.rollout_logprobs is None else batch.rollout_logprobs.double()
    x = source.detach() - logp.detach()
    x = torch.where(torch.isnan(x), 0.0, x)
    for members in responses(batch):
        idx = torch.tensor(members)
        d_b = x[idx].sum() / len(members)
        dropped[idx] = (adv[idx] < 0) & (d_b > cfg.off_policy_mask)
    return dropped


def entropy_threshold(batch: FlatBatch, cfg: LossConfig, entropy: torch.Tensor) -> torch.Tensor | None:
    """tau_H, the (1 - rho) quantile (torch.quantile, linear) of the masked-in sg[H_t] of the call, or of every
    rank of `entropy_mask_group`; None when there is no masked-in token anywhere."""
    local = entropy.detach()[batch.mask]
    values = local
    if batch.entropy_mask_group is not None:
        group = batch.entropy_mask_group
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local.tolist(), group=group)
        values = torch.tensor([h for rank in gathered for h in rank], dtype=F64)
    if values.numel() == 0:
        return None
    return torch.quantile(values, 1 - cfg.entropy_mask_quantile)


def entropy_masked(batch: FlatBatch, cfg: LossConfig, entropy: torch.Tensor) -> torch.Tensor:
    """M^ent_t = 0 (True here) where H_t < tau_H."""
    if cfg.entropy_mask_quantile is None:
        return torch.zeros(batch.num_tokens, dtype=torch.bool)
    tau = entropy_threshold(batch, cfg, entropy)
    if tau is None:
        return torch.zeros(batch.num_tokens, dtype=torch.bool)
    return ~(entropy.detach() >= tau)


def corrections(
    batch: FlatBatch,
    cfg: LossConfig,
    segments: list[list[int]],
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    entropy: torch.Tensor,
) -> Corrections:
    """Every correction, and the policy term's weight W_t = W^pol_t * W^is_t * M^off_t * M^ent_t (vespo folds
    W^is into its own weight instead)."""
    w_pol = torch.ones(batch.num_tokens, dtype=F64) if batch.policy_weights is None else batch.policy_weights.double()
    w_is, is_masked = rollout_is_weights(batch, cfg, segments, old)
    off = off_policy_masked(batch, cfg, logp, old, adv)
    ent = entropy_masked(batch, cfg, entropy)
    keep_off, keep_ent = (~off).double(), (~ent).double()
    if cfg.objective == "vespo":
        weight = w_pol * keep_off * keep_ent
    else:
        weight = w_pol * w_is * keep_off * keep_ent
    log_is = None
    if batch.rollout_logprobs is not None:
        log_is = torch.log(w_is).clamp(VESPO_LOG_MIN, IS_LOG_CLAMP)
    return Corrections(
        weight=weight.detach(),
        is_weight=w_is,
        is_masked=is_masked,
        off_policy_masked=off,
        entropy_masked=ent,
        log_is=log_is,
    )
