"""The pytest-benchmark suite: every (case, path) pair, forward and forward+backward.

    pytest bench/ --benchmark-only [--benchmark-json out.json] [--benchmark-group-by=param:case]

The timed callables are the ones `python -m bench.run` times (`bench.measure.PathRunner`); this suite adds
pytest-benchmark's statistics, comparisons between saved runs and histogram output, while
`bench.run` adds memory, bandwidth, correctness checks and plots.
"""

from __future__ import annotations

import pytest
import torch

from bench.conftest import CASES, DEVICE
from bench.measure import PathRunner
from bench.registry import DEFAULT_PATHS, PATHS

PAIRS = [
    pytest.param(case, name, id=f"{case.label.replace(' ', '-')}-{name}")
    for case in CASES
    for name in DEFAULT_PATHS
    if PATHS[name].kind == case.kind
]


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize(("case", "path"), PAIRS)
def test_loss(benchmark, case_inputs, case, path, mode):
    inputs = case_inputs(case)
    p = PATHS[path]
    reason = p.unavailable(inputs)
    if reason:
        pytest.skip(reason)
    run = PathRunner(p, inputs)
    call = run.forward if mode == "fwd" else run.forward_backward

    def timed():
        out = call()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{case.label} {mode}"
    benchmark.extra_info.update(
        n=case.n, v=case.v, hidden=case.hidden, dtype=case.dtype, granularity=case.granularity, device=DEVICE
    )
    benchmark.pedantic(timed, setup=run.restore, rounds=5, warmup_rounds=1, iterations=1)
