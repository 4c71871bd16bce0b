"""Counting the torch.distributed collectives a piece of code issues (tests/test_distributed.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


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
