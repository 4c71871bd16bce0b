"""Small helpers shared by the launchers."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Callable

import torch

# The one environment variable the package reads (at call time, never at import): when set to 1,
# fresh output buffers are filled with NaN (floats) or -1 (ints) instead of left uninitialised,
# so a kernel that forgets to write an element is caught by the tests. Debug only; costs a fill.
POISON_ENV = "SSPO_KERNELS_POISON"


def _poisoned(out: torch.Tensor) -> torch.Tensor:
    if os.environ.get(POISON_ENV) == "1":
        out.fill_(float("nan") if out.dtype.is_floating_point else -1)
    return out


def new_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a poisoned buffer when SSPO_KERNELS_POISON=1."""
    return _poisoned(torch.empty(shape, dtype=dtype, device=device))


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` the current CUDA device for the launches inside: Triton launches on the current
    device and its current stream, not on the tensors' device. A no-op for other devices and while
    torch.compile traces (the compiled graph guards its own device)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def on_input_device(forward: Callable) -> Callable:
    """Decorate an autograd Function's `forward(ctx, first_tensor, ...)`: it runs under
    `device_guard(first_tensor.device)`, and `ctx.launch_device` keeps that device for `on_ctx_device`."""

    @functools.wraps(forward)
    def guarded(ctx, first: torch.Tensor, *args):
        ctx.launch_device = first.device
        with device_guard(first.device):
            return forward(ctx, first, *args)

    return guarded


def on_ctx_device(backward: Callable) -> Callable:
    """Decorate an autograd Function's `backward(ctx, ...)` to run under `device_guard(ctx.launch_device)`."""

    @functools.wraps(backward)
    def guarded(ctx, *grads):
        with device_guard(ctx.launch_device):
            return backward(ctx, *grads)

    return guarded


# ---------------------------------------------------------------- the kept CPU gradient buffer

# On the CPU, a fresh (N, V) gradient costs more to fault in than to compute: the kernel maps and
# zeroes every page on first touch (filling a fresh 125 MiB buffer took 47 ms on the 2-core
# reference machine, refilling it 15 ms; bench/RESULTS.md). glibc unmaps blocks that large when freed, so
# each call pays again. CUDA's caching allocator keeps freed blocks; this keeps one block per (CPU
# device, dtype), the largest gradient asked for so far, and hands it out again once nothing
# references it. `empty_cache()` releases it.
_KEPT: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, int]] = {}
_KEPT_LOCK = threading.Lock()


def _storage_refs(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def reusable_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`new_empty` for an output the caller drops before the next call (the logits' gradient): on the
    CPU, the memory of an earlier such buffer when no tensor still references it (a view of the same
    storage, a `.grad`, a NumPy array, ... all do), else a new buffer that is kept in its place.
    Elsewhere, and while torch.compile traces, plain `new_empty`."""
    device = torch.device(device)
    if device.type != "cpu" or torch.compiler.is_compiling():
        return new_empty(shape, dtype, device)
    numel, key = math.prod(shape), (device, dtype)
    with _KEPT_LOCK:
        kept = _KEPT.pop(key, None)
        if kept is not None and kept[0].numel() >= numel and _storage_refs(kept[0]) == kept[1]:
            flat = kept[0]
        else:
            del kept  # freed before the new one is allocated
            flat = torch.empty(max(numel, 1), dtype=dtype, device=device)
        _KEPT[key] = (flat, _storage_refs(flat))  # the count while only the kept tensor holds it
        return _poisoned(flat[:numel].view(shape))


def empty_cache() -> None:
    """Release the gradient buffers the torch backend keeps between calls on the CPU (README, the
    edge cases of `sspo_loss`); the next call allocates afresh. Tensors handed out earlier stay valid."""
    with _KEPT_LOCK:
        _KEPT.clear()
