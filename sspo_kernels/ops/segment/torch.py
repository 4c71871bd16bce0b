"""Segmented sum, PyTorch: `index_add_` (deterministic on the CPU; it uses atomics on a GPU, where the
Triton implementation in `triton.py` is the default)."""

from __future__ import annotations

import torch


def segment_sum(values: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Per-segment sums of the rows of `values`: the contract of `triton.segment_sum`.

    values (N, K) fp32, seg (N,) int64 with ids 0..S-1 in token order and -1 where masked out.
    Returns (N, K) fp32: row s holds segment s's sum for s < S, zeros after.
    """
    n, k = values.shape
    out = torch.zeros(n + 1, k, dtype=values.dtype, device=values.device)
    out.index_add_(0, torch.where(seg >= 0, seg, n), values)  # row n collects masked-out rows
    return out[:n]
