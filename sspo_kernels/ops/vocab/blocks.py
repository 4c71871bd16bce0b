"""Launch-configuration heuristics: one small function per kernel family, no autotuning.

Multi-config `@triton.autotune` crashes under the Triton interpreter, and a fixed table is easier to
check ahead of time: `python -m sspo_kernels.aot` compiles every configuration these functions can
return and fails on any register spill.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch


class VocabBlockConfig(NamedTuple):
    block_v: int  # vocabulary entries one program handles per loop iteration (a power of 2)
    num_warps: int


# Each thread holds this many vocabulary entries per iteration: for 2-byte logits that is two 16-byte
# vector loads, enough bytes in flight per SM to cover memory latency without raising register use.
ELEMENTS_PER_THREAD = 16
# The smallest block: one warp with 4 entries per thread; tiny vocabularies waste at most 127 lanes.
MIN_BLOCK_V = 128
# The largest block per element size: 16 KiB of logits per iteration; BLOCK_V=16384 at 4 warps spills
# on sm_80/sm_90, while 8192 with 16 warps (16 entries per thread) compiles to ~60 registers.
MAX_BLOCK_V = {2: 8192, 4: 4096, 8: 2048}
# 16 warps (512 threads) per row is the most that still leaves two rows resident per SM.
MAX_WARPS = 16
# Under the interpreter one loop iteration costs ~1-2 ms per row whatever BLOCK_V is, so a larger block
# keeps the tests fast; 8192 still leaves several iterations (and a masked tail) at V=152064.
INTERPRET_MAX_BLOCK_V = 8192

INTERPRET_ENV = "TRITON_INTERPRET"


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (read at call time, never at import)."""
    return os.environ.get(INTERPRET_ENV) == "1"


def vocab_block_config(vocab_size: int, dtype: torch.dtype, *, interpret: bool | None = None) -> VocabBlockConfig:
    """(BLOCK_V, num_warps) for the per-row vocabulary loops (log-prob/entropy forward and backward).

    interpret: pick for the Triton interpreter instead of a GPU; None reads TRITON_INTERPRET.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if interpret is None:
        interpret = interpreting()
    if interpret:
        # warps mean nothing to the interpreter; only the number of loop iterations costs time
        return VocabBlockConfig(min(_next_power_of_2(vocab_size), INTERPRET_MAX_BLOCK_V), 1)
    element_size = torch.empty((), dtype=dtype).element_size()
    # one iteration covers the whole row when it fits, else the largest block that does not spill
    block_v = min(max(_next_power_of_2(vocab_size), MIN_BLOCK_V), MAX_BLOCK_V[element_size])
    # as many warps as keep ELEMENTS_PER_THREAD entries per thread, within [1, MAX_WARPS]
    num_warps = min(max(block_v // (32 * ELEMENTS_PER_THREAD), 1), MAX_WARPS)
    return VocabBlockConfig(block_v, num_warps)


def all_vocab_block_configs(dtype: torch.dtype, max_vocab_size: int = 1 << 20) -> list[VocabBlockConfig]:
    """Every GPU configuration `vocab_block_config` can return for this dtype (for the AOT check).

    The choice depends on the vocabulary size only through its next power of 2, so walking the powers
    of 2 up to max_vocab_size finds them all.
    """
    configs = {vocab_block_config(1 << k, dtype, interpret=False) for k in range(max_vocab_size.bit_length())}
    return sorted(configs)


def transform_block_config(config: VocabBlockConfig) -> VocabBlockConfig:
    """The block for the kernels with a logit transform (a soft-cap's tanh and its slope keep more
    values live per element): a quarter of the entries per thread (4 instead of 16), the same warps
    (the full and the half block spilled a few bytes on sm_80 / sm_90 in the AOT check)."""
    block_v, num_warps = config
    return VocabBlockConfig(max(block_v // 4, 32 * num_warps), num_warps)
