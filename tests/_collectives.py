"""Multi-process tests: counting the torch.distributed collectives a piece of code issues, and running a
worker in several spawned processes (tests/test_distributed.py, test_token_logprobs_tp.py,
test_integration_trl_dist.py)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn_ranks(
    worker: Callable, world: int, deadline_s: float, prefix: str, make_args: Callable[[str], tuple]
) -> list[dict]:
    """Run `worker(rank, *make_args(tmp))` in `world` spawned processes (each writes `tmp/rank{r}.json`)
    and return what every rank wrote; a TimeoutError, the processes killed, past `deadline_s`."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        context = mp.spawn(worker, args=make_args(tmp), nprocs=world, join=False)
        deadline = time.monotonic() + deadline_s
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                for p in context.processes:
                    p.kill()
                raise TimeoutError(f"the {world}-process run passed its {deadline_s:.0f} s deadline")
        out = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                out.append(json.load(f))
        return out


class Counter:
    """Counts the torch.distributed collectives issued while installed: (name, group ranks, bytes)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor",
             "all_to_all_single", "barrier", "reduce", "gather", "scatter")  # fmt: skip

    def __init__(self):
        self.calls: list[tuple[str, tuple[int, ...], int]] = []
        self._saved: dict[str, Callable] = {}

    def install(self) -> Counter:
        self.calls.clear()
        for name in self.NAMES:
            original = getattr(dist, name)
            self._saved[name] = original

            def wrapper(*args, _name=name, _fn=original, **kwargs):
                group = kwargs.get("group")
                ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else ("default",)
                tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
                nbytes = tensor.numel() * tensor.element_size() if tensor is not None else 0
                self.calls.append((_name, ranks, nbytes))
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def uninstall(self) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()

    def take(self) -> list[tuple[str, tuple[int, ...], int]]:
        calls, self.calls = list(self.calls), []
        return calls
