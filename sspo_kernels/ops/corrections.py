"""The off-policy corrections of the composed segment step (docs/loss.md "Off-policy corrections"): the
rollout importance weight, the off-policy sequence mask and the entropy mask, on `(N,)` tensors.

Each is a small function of per-token inputs and the backend's segmented sum, with no host sync. The
fused Triton step (`objective_triton.py`) computes the same quantities inside its walks; the entropy
mask's sorted entropies come from `sorted_entropies` here for both.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from sspo_kernels._types import FlatBatch, LossConfig

LOG_WEIGHT_CLAMP = 20.0  # |log w_u| <= 20: the rollout weight stays within e^+-20


def _masked(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def unit_sum(values: torch.Tensor, ids: torch.Tensor, segment_sum) -> torch.Tensor:
    """(N,) per-token sum of `values` over the unit (segment ids `ids`, -1 masked out) of each token."""
    sums = segment_sum(values.unsqueeze(1), ids)[:, 0]
    return sums[ids.clamp(min=0)]


def rollout_weight(
    batch: FlatBatch, cfg: LossConfig, old: torch.Tensor, unit: torch.Tensor | None, segment_sum
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W^is_t, outside_t): the rollout importance weight of every token and whether "mask" mode
    zeroed it. `unit`: (N,) ids of the rollout_is unit of each token, or None for the token itself."""
    mask = batch.mask
    v = batch.rollout_logprobs.float()
    delta = _masked(mask & ~torch.isnan(v), old - v)  # a token the sampler could not score adds 0
    total = delta if unit is None else unit_sum(delta, unit, segment_sum)
    log_w = total.clamp(-LOG_WEIGHT_CLAMP, LOG_WEIGHT_CLAMP)
    w = log_w.exp()
    low = -math.inf if cfg.rollout_is_min is None else cfg.rollout_is_min
    high = math.inf if cfg.rollout_is_max is None else cfg.rollout_is_max
    if cfg.rollout_is_mode == "truncate":
        return w.clamp(low, high), torch.zeros_like(mask)
    outside = (w < low) | (w > high)
    return torch.where(outside, torch.zeros_like(w), w), outside & mask


def off_policy_keep(
    batch: FlatBatch, cfg: LossConfig, logp: torch.Tensor, old: torch.Tensor, rseg: torch.Tensor, segment_sum
) -> torch.Tensor:
    """M^off_t (bool): keep the policy term unless A_t < 0 and the response's mean of
    (v or q) - sg[l] is above `off_policy_mask`. `rseg`: dense response ids (-1 masked out)."""
    mask = batch.mask
    sampled = old if batch.rollout_logprobs is None else batch.rollout_logprobs.float()
    x = sampled - logp.detach()
    x = _masked(mask & ~torch.isnan(x), x)
    sums = segment_sum(torch.stack([x, mask.float()], dim=1), rseg)
    mean = sums[:, 0] / sums[:, 1].clamp(min=1)
    drift = mean[rseg.clamp(min=0)]
    return ~((batch.advantages.float() < 0) & (drift > cfg.off_policy_mask))


def sorted_entropies(entropy: torch.Tensor, mask: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The masked-in entropies of the call (of every rank of `group`, gathered), sorted ascending, after
    -inf for every masked-out or padding slot: (M,) fp32, the last n entries the n masked-in values.

    With a group the ranks' token counts are exchanged first and read back to the host (to size the
    gather): the one host sync of the loss, documented with `entropy_mask_group`."""
    keyed = torch.where(mask, entropy.detach().float(), -torch.inf)
    if group is not None:
        sizes = [torch.zeros(1, dtype=torch.int64, device=keyed.device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, torch.tensor([keyed.numel()], device=keyed.device), group=group)
        longest = int(max(int(s) for s in sizes))
        padded = torch.full((longest,), -torch.inf, device=keyed.device)
        padded[: keyed.numel()] = keyed
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        keyed = torch.cat(parts)
    return keyed.sort().values


def quantile_of_sorted(sorted_values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x, q) (linear interpolation, fp32) of the finite tail of `sorted_entropies`'
    output, without reading its length back: 0-d fp32 (+inf when nothing is masked in: every token
    is then dropped, and none counts)."""
    m = sorted_values.shape[0]
    n = torch.isfinite(sorted_values).sum()
    rank = (n - 1).clamp(min=0).float() * torch.tensor(q, dtype=torch.float32)
    below = rank.floor()
    weight = rank - below
    first = m - n  # the masked-in values start here
    if m == 0:
        return torch.full((), torch.inf, device=sorted_values.device)
    # gathers at device-side positions (an index tensor, never a Python int: no host read, traceable)
    low = sorted_values.gather(0, (first + below.long()).clamp(max=m - 1).reshape(1))[0]
    high = sorted_values.gather(0, (first + rank.ceil().long()).clamp(max=m - 1).reshape(1))[0]
    value = torch.lerp(low, high, weight)
    return torch.where(n > 0, value, torch.full_like(value, torch.inf))


def entropy_keep(entropy: torch.Tensor, batch: FlatBatch, cfg: LossConfig) -> torch.Tensor:
    """M^ent_t (bool): H_t >= the (1 - rho) quantile of the masked-in entropies (docs/loss.md)."""
    threshold = quantile_of_sorted(
        sorted_entropies(entropy, batch.mask, batch.entropy_mask_group), 1.0 - cfg.entropy_mask_quantile
    )
    return entropy.detach() >= threshold
