"""Segment ids from tokens on the device, and the spans of the segments.

Segments are contiguous runs of masked-in tokens (docs/loss.md "Segments"), numbered 0, 1, ... in token
order, so every per-segment array is sized by N (the most segments there can be) and nothing is
read back to the host. Masked-out tokens carry id -1 and never break a segment.

The segmented sum over these ids has one implementation per backend, side by side in this
folder: `triton.py` (one program per segment, fixed order) and `torch.py` (`index_add_`).
"""

from __future__ import annotations

import torch

from sspo_kernels._types import FlatBatch


def segment_bounds(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last token index of every segment slot 0..N-1 (both N for unused slots).

    A segment's span may contain masked-out tokens (id -1); they are skipped when summing.
    """
    n = seg.shape[0]
    filled = seg.cummax(0).values  # non-decreasing: masked-out tokens take the previous segment's id
    slots = torch.arange(n, device=seg.device, dtype=seg.dtype)
    return torch.searchsorted(filled, slots), torch.searchsorted(filled, slots, right=True)


def compute_segment_ids(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    response_ids: torch.Tensor,
    granularity: str,
    *,
    boundary: torch.Tensor | None = None,
    given_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Segment id of every token, -1 where masked out, with vectorised ops and no host sync.

    tokens, mask, response_ids: (N,). A masked-in token opens a new segment when it is the first
    masked-in token of its response, or when the previous masked-in token of the response was a
    boundary token (subsentence / sentence), carried another id (segments), or always (token).
    Returns (N,) int64.
    """
    n = tokens.shape[0]
    pos = torch.arange(n, device=tokens.device)
    last_in = torch.where(mask, pos, -1).cummax(0).values  # last masked-in index at or before t
    prev = torch.cat([last_in.new_full((min(n, 1),), -1), last_in[:-1]])
    prev_safe = prev.clamp(min=0)
    same_response = (prev >= 0) & (response_ids[prev_safe] == response_ids)

    if granularity == "token":
        opens = mask
    elif granularity == "sequence":
        opens = mask & ~same_response
    elif granularity in ("subsentence", "sentence"):
        prev_token = tokens[prev_safe].clamp(0, boundary.shape[0] - 1)
        opens = mask & (~same_response | boundary[prev_token])
    elif granularity == "segments":
        opens = mask & (~same_response | (given_ids[prev_safe] != given_ids))
    else:
        raise ValueError(f"unknown granularity {granularity!r}")
    return torch.where(mask, opens.long().cumsum(0) - 1, -1)


def batch_segment_ids(batch: FlatBatch, granularity: str) -> torch.Tensor:
    """`compute_segment_ids` of a validated batch: (N,) int64, -1 where masked out."""
    return compute_segment_ids(
        batch.tokens, batch.mask, batch.response_ids, granularity, boundary=batch.boundary, given_ids=batch.segment_ids
    )
