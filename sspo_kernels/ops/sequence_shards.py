"""Sequence parallelism: the rows of a batch spread over the ranks of a group, the segment step on all.

Each rank computes the per-token statistics of its own rows (flat indices `index` into the whole
batch); `gather` scatters them into zeros of the full batch's size and sums over the group, ONE
collective, exact (every row is one rank's value plus zeros). A count column rides along, so the
same collective checks on the device that the ranks' indices partition the rows (each row held by
exactly one rank); a header row carries the row count and the number of out-of-range indices. The
segment step then runs on the whole batch on every rank, so segments that straddle ranks are one
segment; the backward takes the local rows of its per-token coefficients, with no collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sspo_kernels._validate import device_check


@dataclass(frozen=True)
class SequenceShards:
    group: Any
    index: torch.Tensor  # (N_local,) int64 flat row indices in [0, num_tokens), on the device
    num_tokens: int  # N of the whole batch

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The local rows of a whole-batch (N,) tensor (indices clamped: a bad one is reported by `gather`)."""
        return t.reshape(-1)[self.index.clamp(0, max(self.num_tokens - 1, 0))]

    def local(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else self.rows(t)

    def gather(self, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Whole-batch (N,) fp32 tensors from the local (N_local,) ones: one SUM on the group."""
        n, idx = self.num_tokens, self.index
        device = idx.device
        bad = (idx < 0) | (idx >= n)
        # row 0: header (row count, bad indices); rows 1..N: the batch; row N + 1: where bad indices go
        buf = torch.zeros(n + 2, len(columns) + 1, dtype=torch.float32, device=device)
        buf[0, 0] = float(n)
        buf[0, 1] = bad.sum()
        dest = torch.where(bad, n + 1, idx + 1)
        values = torch.stack([*(c.reshape(-1).float() for c in columns), torch.ones_like(columns[0].float())], 1)
        buf.index_add_(0, dest, values)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        world = dist.get_world_size(self.group)
        device_check(
            buf[0, 0] == float(world * n),
            f"the ranks of sp_group describe batches of different sizes (this one {n} tokens): "
            "tokens, mask, old_logprobs, advantages are the WHOLE batch on every rank",
        )
        device_check(buf[0, 1] == 0, f"sp_index must lie in [0, {n}) (the flat row index in the whole batch)")
        device_check(
            (buf[1 : n + 1, -1] == 1).all(),
            "sp_index of the ranks of sp_group must partition the rows: every row on exactly one rank "
            "(a row is missing or duplicated)",
        )
        return tuple(buf[1 : n + 1, k] for k in range(len(columns)))
