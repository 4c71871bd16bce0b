"""How much one `sspo_loss` call puts on the device, counted exactly (`bench/launches.py`).

Each PyTorch op and each Triton launch is a kernel launch on a GPU (~3-5 us of host time each), so
these counts decide whether the loss is launch-bound. The Triton backend's budget with default
options on a padded (4, 64, 1000) batch: forward <= 12, backward <= 3, input validation included.
"""

from __future__ import annotations

import pytest
import torch

from bench.launches import DeviceWork, count_call, count_rows, make_call
from sspo_kernels import sspo_loss
from sspo_kernels._utils import POISON_ENV

FORWARD_BUDGET, BACKWARD_BUDGET = 12, 3


@pytest.fixture(autouse=True)
def _no_poison(monkeypatch):
    """Count what users run: without the tests' NaN fill of fresh buffers (one op each)."""
    monkeypatch.delenv(POISON_ENV, raising=False)


@pytest.mark.parametrize("granularity", ["token", "sequence", "subsentence"])
@pytest.mark.triton
def test_triton_backend_launch_budget(granularity):
    args, kwargs = make_call(packed=False, device="cpu")
    kwargs.pop("ref_logprobs")
    fwd, bwd = count_call(sspo_loss, *args, granularity=granularity, backend="triton", **kwargs)
    assert fwd.launches == {"logprob_entropy_fwd_kernel": 1, "segment_step_fwd_kernel": 1}, fwd.launches
    assert fwd.total <= FORWARD_BUDGET, f"forward: {fwd.total} > {FORWARD_BUDGET}: {fwd.ops}"
    assert bwd.launches == {"logprob_entropy_bwd_kernel": 1}, bwd.launches
    assert bwd.total <= BACKWARD_BUDGET, f"backward: {bwd.total} > {BACKWARD_BUDGET}: {bwd.ops}"


@pytest.mark.triton
def test_every_option_set_is_counted():
    """The benchmark's table: the fused step wherever the loss is a scalar; the per-token loss and
    the torch backend compose the step from many ops (the counter sees them)."""
    rows = {(r["options"], r["backend"]): r for r in count_rows("cpu", ("triton", "torch"), seq_len=8, vocab=50)}
    for (options, backend), row in rows.items():
        if backend == "triton" and "none" not in options:
            assert row["fwd_launches"] == 2 and row["bwd_total"] <= BACKWARD_BUDGET, row
        else:
            assert row["fwd_total"] > 50, row
    assert rows[("subsentence-packed", "triton")]["fwd_total"] <= FORWARD_BUDGET


def test_counter_skips_views_and_counts_ops():
    x = torch.zeros(4)
    with DeviceWork() as work:
        x.view(2, 2)
        x.add(1)
    assert dict(work.ops) == {"aten.add.Tensor": 1} and not work.launches
