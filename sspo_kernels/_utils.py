"""Small helpers shared by the launchers."""

from __future__ import annotations

import os

import torch

# The one environment variable the package reads (at call time, never at import): when set to 1,
# fresh output buffers are filled with NaN (floats) or -1 (ints) instead of left uninitialised,
# so a kernel that forgets to write an element is caught by the tests. Debug only; costs a fill.
POISON_ENV = "SSPO_KERNELS_POISON"


def new_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a poisoned buffer when SSPO_KERNELS_POISON=1."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get(POISON_ENV) == "1":
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out
