"""Peak extra memory of a CPU call, from the torch profiler's allocation events (see bench/README.md)."""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile

from sspo_kernels import empty_cache


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak of live torch CPU allocator bytes while fn runs, relative to its start (outputs included).

    The profiler's `[memory]` events (allocations > 0, frees < 0) are replayed in time order; the
    public `prof.events()` folds allocations into their ops, hence the kineto results. The gradient
    buffer the package keeps between CPU calls is released first, so that fn's is counted.
    """
    empty_cache()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
