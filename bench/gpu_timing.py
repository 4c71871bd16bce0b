"""Timing and counting helpers of the GPU results (`bench/gpu_results.py`).

- `time_ms`: median / p20 / p80 of repeated calls, CUDA events on a GPU (the host's launch overhead
  included, as an eager training step sees it), `time.perf_counter` on the CPU;
- `graph_ms`: the same calls captured once in a CUDA graph and replayed, so only GPU time counts
  (CUDA only; None elsewhere);
- `kernel_counts`: the GPU kernels (and memcpy / memset) one call puts on the device, from
  `torch.profiler`'s CUDA activity;
- `debug_log`: the DEBUG records of the "sspo_kernels" logger during a call (the fused-linear path
  logs the schedule it picked and its weight-gradient path there).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator

import torch

from bench.measure import percentile, time_call


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(times: list[float]) -> dict:
    return {
        "ms": percentile(times, 50),
        "p20_ms": percentile(times, 20),
        "p80_ms": percentile(times, 80),
        "reps": len(times),
    }


def time_ms(
    fn: Callable[[], object], device: torch.device, reps: int, before: Callable[[], None] | None = None, warmup: int = 1
) -> dict:
    """`fn()` timed `reps` times after `warmup` untimed calls; `before()` runs untimed before each call."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    times = []
    for _ in range(reps):
        if before:
            before()
        times.append(time_call(fn, device.type))
    return _stats(times)


def graph_ms(
    fn: Callable[[], object], device: torch.device, reps: int, before: Callable[[], None] | None = None
) -> dict | None:
    """`fn()` captured in a CUDA graph (after two warm-up calls on a side stream) and replayed `reps`
    times, each replay timed with CUDA events; None off CUDA."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            if before:
                before()
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if before:
        before()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(reps):
        if before:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return _stats(times)


def kernel_counts(fn: Callable[[], object], device: torch.device) -> dict:
    """{"kernels": n, "memops": n, "names": {kernel: count}} of the device work `fn()` launches, from
    torch.profiler's CUDA activity (on the CPU nothing runs on a device: zero counts, noted)."""
    from torch.profiler import ProfilerActivity, profile

    from bench.measure import _quiet_stderr

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with _quiet_stderr(), profile(activities=activities) as prof:
        fn()
        sync(device)
    names: Counter[str] = Counter()
    memops = 0
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if event.name.startswith(("Memcpy", "Memset")):
            memops += 1
        else:
            names[event.name] += 1
    out = {"kernels": sum(names.values()), "memops": memops, "names": dict(names.most_common())}
    if device.type != "cuda":
        out["note"] = "no CUDA activity on the CPU"
    return out


@contextlib.contextmanager
def debug_log(name: str = "sspo_kernels") -> Iterator[list[str]]:
    """The messages the `name` logger emits at DEBUG level inside the block."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger(name)
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
