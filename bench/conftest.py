"""Fixtures of the pytest-benchmark suite (`pytest bench/ --benchmark-only`).

Inputs are built once per case and shared by every path and mode. Cases are small on the CPU (a
few seconds per benchmark, one thread unless BENCH_THREADS says otherwise) and the sizes of the
issues on a CUDA device. Unlike tests/conftest.py, nothing here turns on the Triton interpreter or
output poisoning: those would distort the timings.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.registry import Case, Inputs, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # one thread unless asked, as `python -m bench.run` (README "How time is measured")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

if DEVICE == "cuda":
    CASES = (
        Case(8192, 151936, "bf16"),
        Case(4096, 32000),
        Case(8192, 151936, "bf16", hidden=4096),
    )
else:
    CASES = (
        Case(256, 32000),
        Case(256, 32000, "bf16"),
        Case(128, 32000, hidden=512),
    )


@pytest.fixture(scope="session")
def case_inputs():
    """case -> Inputs, built on first use; only the latest case is kept, to bound memory."""
    cache: dict[Case, Inputs] = {}

    def get(case: Case) -> Inputs:
        if case not in cache:
            cache.clear()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            cache[case] = make_inputs(case, DEVICE)
        return cache[case]

    return get
