"""Helpers for data parallelism (DDP / FSDP): normalisers and entropy references shared by the ranks.

DDP and FSDP average the ranks' gradients. For that average to be the gradient of the loss of the
whole global batch, every rank divides its local sum by the same global count, times the number of
ranks R the gradients are averaged over: pass `normalizer=global_normalizer(mask, mode, group=dp)`.
`global_entropy_mean` gives the masked mean entropy over the group, for `entropy_ref=` (a 0-d device
tensor: no host sync, and the fused-linear single-pass schedule stays available).

Each is ONE all-reduce on `group` (None: the default group, as in torch.distributed; one process
without torch.distributed initialised: no collective), and the result stays on the device. The
tensor-, sequence-parallel forms of the loss are options of `sspo_loss` (docs/distributed.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from sspo_kernels._options import AGG_MODES, choice
from sspo_kernels._validate import response_layout

_NORMALISED = tuple(m for m in AGG_MODES if m not in ("sum", "none"))


def _sum_over(group: Any, values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """values summed over the group (in place) and the group's size."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a group is given but torch.distributed is not initialised")
        return values, 1
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values, dist.get_world_size(group)


def global_normalizer(
    mask: torch.Tensor, loss_agg_mode: str, *, group: Any = None, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """The `normalizer=` of every data-parallel rank: a 0-d fp32 tensor on mask's device.

    token-mean: the masked-in tokens of all ranks / R; seq-mean-* modes: the non-empty responses of all
    ranks / R (R = the group's size). mask: this rank's (B, T) padded, (N,) one response, or packed
    (total,) with `cu_seqlens`. For gradient accumulation, pass the mask of the whole optimiser step
    (all micro-batches) and the same normaliser to each micro-batch: their summed gradients are then
    those of the global batch.
    """
    choice("loss_agg_mode", loss_agg_mode, _NORMALISED)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    kept = mask.reshape(-1) != 0
    if loss_agg_mode == "token-mean":
        count = kept.sum(dtype=torch.float64)
    else:
        num, _, response = response_layout(tuple(mask.shape), cu_seqlens, mask.device)
        per_response = torch.zeros(num, dtype=torch.int64, device=mask.device).index_add_(0, response, kept.long())
        count = (per_response > 0).sum(dtype=torch.float64)
    total, world = _sum_over(group, count.reshape(1))
    return (total[0] / world).float()


def global_entropy_mean(entropy: torch.Tensor, mask: torch.Tensor, *, group: Any = None) -> torch.Tensor:
    """The masked mean of `entropy` over the ranks of `group`: one 2-float all-reduce, a 0-d fp32
    tensor on the device (0 when no rank has a masked-in token), for `entropy_ref=`."""
    if not isinstance(entropy, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError("entropy and mask must be torch.Tensors")
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and mask {tuple(mask.shape)} must have one shape")
    kept = mask != 0
    ent = torch.where(kept, entropy.detach().double(), 0.0)
    sums, _ = _sum_over(group, torch.stack([ent.sum(), kept.sum(dtype=torch.float64)]))
    return (sums[0] / sums[1].clamp(min=1)).float()


__all__ = ["global_entropy_mean", "global_normalizer"]
