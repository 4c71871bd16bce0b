"""Segments: ids from tokens on the device, and deterministic segmented sums.

Segments are contiguous runs of masked-in tokens (SPEC "Segments"), numbered 0, 1, ... in token
order, so every per-segment array is sized by N (the most segments there can be) and nothing is
read back to the host. Masked-out tokens carry id -1 and never break a segment.

The segmented sum has two implementations of one contract: a Triton kernel
(`segment_kernels.py`) with one program per segment that adds its tokens in a fixed order
(bitwise deterministic, no atomics), used by the Triton backend; and `index_add_` for the
portable backend (deterministic on the CPU; it uses atomics on a GPU).
"""

from __future__ import annotations

import torch

from sspo_kernels._utils import new_empty

# 128 tokens a step over 4 warps: one token per thread, so the [BLOCK_T, BLOCK_K] accumulator is a
# few registers per thread; a segment of n tokens takes ceil(n / 128) steps of one program.
SEGMENT_BLOCK_T = 128
SEGMENT_NUM_WARPS = 4


def segment_bounds(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last token index of every segment slot 0..N-1 (both N for unused slots).

    A segment's span may contain masked-out tokens (id -1); they are skipped when summing.
    """
    n = seg.shape[0]
    filled = seg.cummax(0).values  # non-decreasing: masked-out tokens take the previous segment's id
    slots = torch.arange(n, device=seg.device, dtype=seg.dtype)
    return torch.searchsorted(filled, slots), torch.searchsorted(filled, slots, right=True)


def segment_sum(values: torch.Tensor, seg: torch.Tensor, *, use_triton: bool) -> torch.Tensor:
    """Per-segment sums of the rows of `values`.

    values (N, K) fp32, seg (N,) int64 with ids 0..S-1 in token order and -1 where masked out.
    Returns (N, K) fp32: row s holds segment s's sum for s < S, zeros after.
    """
    n, k = values.shape
    if not use_triton:
        out = torch.zeros(n + 1, k, dtype=values.dtype, device=values.device)
        out.index_add_(0, torch.where(seg >= 0, seg, n), values)  # row n collects masked-out rows
        return out[:n]
    import triton  # only the Triton backend needs it, so the portable path works without it

    from sspo_kernels.ops.segment_kernels import segment_sum_kernel

    out = new_empty((n, k), torch.float32, values.device)
    if n == 0:
        return out
    values = values.contiguous()
    start, end = segment_bounds(seg)
    segment_sum_kernel[(n,)](
        values, seg, start, end, out, k, values.stride(0),
        BLOCK_T=SEGMENT_BLOCK_T, BLOCK_K=triton.next_power_of_2(k), num_warps=SEGMENT_NUM_WARPS,
    )  # fmt: skip
    return out


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
