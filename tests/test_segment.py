"""Segment ids on the device against the reference's token walk; the segmented sum's two implementations.

Both also run on CUDA (marked gpu). The fused segment step against the composed one on large packed
batches is in test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from _assert import assert_close
from _cases import make_batch, pack
from _devices import TRITON, grid, on
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from sspo_kernels import segment_ids
from sspo_kernels._options import make_config
from sspo_kernels._validate import logits_layout, prepare_inputs
from sspo_kernels.ops.segment import torch as segment_torch
from sspo_kernels.ops.segment import triton as segment_triton
from sspo_kernels.ops.segment.ids import segment_bounds

GRANULARITIES = ["subsentence", "sentence", "sequence", "token", "segments"]


def reference_ids(batch, granularity):
    args, kwargs = batch.inputs(granularity)
    kwargs.pop("granularity")
    kwargs.pop("ref_logprobs")
    _, layout = logits_layout(args[0])
    flat = prepare_inputs(make_config(granularity), layout, *args[1:], **kwargs)
    return reference.naive_segment_ids(flat, granularity)


def device_ids(batch, granularity, device="cpu"):
    extra = {}
    if granularity in ("subsentence", "sentence"):
        extra["boundary"] = batch.boundary
    if granularity == "segments":
        extra["segment_ids"] = batch.segment_ids.to(device)
    tokens, mask = on(device, batch.tokens, batch.mask)
    ids = segment_ids(tokens, mask, granularity=granularity, cu_seqlens=batch.cu_seqlens, **extra)
    assert ids.dtype == torch.int32 and ids.shape == batch.tokens.shape and ids.device == tokens.device
    return ids.reshape(-1).long().cpu()


@grid()
@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    hole_p=st.sampled_from([0.0, 0.3, 0.9]),
    boundary_p=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
    packed=st.booleans(),
    granularity=st.sampled_from(GRANULARITIES),
)
def test_segment_ids_match_the_reference_walk(device, lengths, hole_p, boundary_p, seed, packed, granularity):
    batch = make_batch(seed, lengths, vocab=9, hole_p=hole_p, boundary_p=boundary_p)
    if packed:
        batch = pack(batch)
    expected = reference_ids(batch, granularity)
    assert torch.equal(device_ids(batch, granularity, device), expected)


def test_masked_out_tokens_do_not_break_a_segment():
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    mask = torch.tensor([[1, 0, 1, 0, 1]], dtype=torch.bool)
    boundary = torch.zeros(6, dtype=torch.bool)
    boundary[2] = True  # a boundary token, but masked out: it neither ends nor belongs to a segment
    ids = segment_ids(tokens, mask, granularity="subsentence", boundary=boundary)
    assert ids.tolist() == [[0, -1, 0, -1, 0]]
    boundary[3] = True
    ids = segment_ids(tokens, mask, granularity="subsentence", boundary=boundary)
    assert ids.tolist() == [[0, -1, 0, -1, 1]]


def test_segment_ids_errors_name_the_argument():
    tokens = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="boundary"):
        segment_ids(tokens, mask, granularity="subsentence")
    with pytest.raises(ValueError, match="segment_ids"):
        segment_ids(tokens, mask, granularity="segments")
    with pytest.raises(ValueError, match="mask"):
        segment_ids(tokens, mask[:1], granularity="token")
    with pytest.raises(ValueError, match="granularity"):
        segment_ids(tokens, mask, granularity="paragraph")


LAYOUTS = {
    "one-segment": [0, 0, 0, 0, 0, 0, 0],
    "all-singletons": [0, 1, 2, 3, 4, 5, 6],
    "holes-and-runs": [-1, 0, 0, -1, 1, -1, -1, 2, 2, 2, -1],
    "all-masked": [-1, -1, -1],
    "long-run": [0] * 300 + [1] * 5,
}


@TRITON
@grid(("k", [1, 3]), ("layout", LAYOUTS))
def test_segment_sum_triton_matches_index_add(device, layout, k):
    seg = torch.tensor(layout, dtype=torch.int64)
    values = torch.randn(seg.shape[0], k, generator=torch.Generator().manual_seed(len(layout)))
    values[seg < 0] = float("nan")  # masked-out rows must never be read
    expected = torch.zeros(seg.shape[0], k, dtype=torch.float64)
    for t, s in enumerate(layout):
        if s >= 0:
            expected[s] += values[t].double()
    for impl in (segment_torch, segment_triton):
        got = impl.segment_sum(*on(device, values, seg))
        assert_close(f"{impl.__name__}.segment_sum", got, expected, atol=1e-5)


def test_segment_bounds_cover_each_segment_span():
    seg = torch.tensor([-1, 0, 0, -1, 1, -1, -1, 2])
    start, end = segment_bounds(seg)
    assert start[:3].tolist() == [1, 4, 7] and end[:3].tolist() == [4, 7, 8]
    assert (start[3:] == 8).all() and (end[3:] == 8).all()
