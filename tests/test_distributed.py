"""The tensor-, sequence- and data-parallel forms (docs/distributed.md), run for real: several gloo
processes on the CPU, every rank's outputs and gradients against the fp64 reference on the gathered
inputs. The cases live in `_distributed_cases.py`.

One `torch.multiprocessing.spawn` per world size for the whole module (start-up costs 4-9 s on two
cores): every rank runs every case of its world size, catches each case's failure (the traceback)
and writes them to a file; one pytest test per (world size, case) then fails with the ranks' messages.
After each case the ranks agree on success with one all-reduce, so a failure cannot leave them out
of step; the process group has a timeout, and the parent a deadline, so nothing hangs.

Run alone with `pytest -m distributed`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import pytest
import torch
from _collectives import spawn_ranks

pytestmark = pytest.mark.distributed

WORLDS = (2, 4)
DEADLINE_S = {2: 240, 4: 300}  # the whole run of one world size, start-up included


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    # before sspo_kernels is imported: the Triton kernels run under the interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SSPO_KERNELS_POISON", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=90)
    )
    import _distributed_cases as cases

    ctx = cases.Context(rank, world)
    results: dict[str, str | None] = {}
    timings: dict[str, float] = {}
    for name, fn in cases.cases_for(world):
        start = time.perf_counter()
        try:
            fn(ctx)
            results[name] = None
        except Exception as exc:  # reported by the pytest test of this case
            import traceback

            results[name] = f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            print(f"[{name}] {results[name]}", file=sys.stderr, flush=True)  # shown if the run crashes
        timings[name] = round(time.perf_counter() - start, 3)
        ctx.counter.uninstall()
        ok = torch.tensor([0.0 if results[name] is None else 1.0])
        dist.all_reduce(ok, group=ctx.world_group)  # keeps the ranks in step
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"results": results, "timings": timings, "worst": cases.WORST}, f)
    dist.destroy_process_group()


def _launch(world: int) -> list[dict]:
    return spawn_ranks(
        _worker, world, DEADLINE_S[world], f"sspo-dist{world}-", lambda tmp: (world, os.path.join(tmp, "init"), tmp)
    )


@pytest.fixture(scope="module")
def runs():
    cache: dict[int, list[dict] | BaseException] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            try:
                cache[world] = _launch(world)
            except BaseException as exc:  # every case of this world size reports the crash
                cache[world] = exc
        if isinstance(cache[world], BaseException):
            raise cache[world]
        return cache[world]

    return get


def _case_ids() -> list[tuple[int, str]]:
    import _distributed_cases as cases

    return [(world, name) for world in WORLDS for name, _ in cases.cases_for(world)]


@pytest.mark.parametrize(("world", "name"), _case_ids(), ids=[f"w{w}-{n}" for w, n in _case_ids()])
def test_case(runs, world, name):
    ranks = runs(world)
    errors = [r["results"][name] for r in ranks if r["results"][name]]
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
