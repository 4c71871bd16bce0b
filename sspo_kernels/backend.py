"""Backends: one implementation of each op the loss needs, chosen once per call.

A `Backend` bundles the vocabulary pass (forward: per-token log-prob, entropy and lse; backward: the
gradient with respect to the logits), the segmented sum and, on Triton, the whole segment step in
one kernel (`ops/objective_triton.py`). `get_backend("triton" | "torch" | "auto")`
builds one from the implementations that sit side by side in `ops/vocab/` and `ops/segment/`. Every
caller goes through the two methods below, so the backward always receives the forward's statistics
(the log-probs included) and `grad_entropy=None` whenever there is no entropy term.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sspo_kernels._options import BACKENDS, choice, flag
from sspo_kernels._types import VocabStats

# The fused segment step (`ops/objective_triton.py`) is one program walking the N tokens in order: a few
# microseconds per thousand tokens, against the ~100 launches of the composed PyTorch step, which run in
# parallel over N. Above this many tokens the composed step runs instead (same results within fp32
# rounding). The value is the crossover estimated in the GPU review (40-60 K tokens on an H100);
# `bash bench/gpu_suite.sh` times both steps at N = 8192 and 262,144 to calibrate it.
FUSED_STEP_MAX_TOKENS = 1 << 16


@dataclass(frozen=True)
class Backend:
    name: str
    vocab_fwd_impl: Callable  # (logits, tokens, mask, temperature) -> (logp, entropy, lse[, rows])
    vocab_bwd_impl: Callable  # the launchers' common backward signature (see `vocab_bwd`)
    segment_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (values (N, K), seg (N,)) -> (N, K)
    # the whole segment step of a scalar loss in one op, or None: `ops/objective.py` composes it
    segment_step: Callable | None = None  # (logp, entropy, batch, cfg) -> (loss, grad_logp, grad_entropy, metrics)

    def fuses_step(self, loss_agg_mode: str, num_tokens: int) -> bool:
        """Whether `segment_step` computes the step: every scalar `loss_agg_mode` ("none" is composed) of
        at most `FUSED_STEP_MAX_TOKENS` tokens (the one-program kernel is serial in N)."""
        return self.segment_step is not None and loss_agg_mode != "none" and num_tokens <= FUSED_STEP_MAX_TOKENS

    def vocab_fwd(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        temperature: float,
        *,
        scale: float = 1.0,
        softcap: float | None = None,
    ) -> VocabStats:
        """logits (N, V) or (B, T, V); tokens (N,) int64; mask (N,) bool. Returns (N,) fp32 statistics.
        scale, softcap: the logits' transform before the temperature (docs/loss.md "Token quantities")."""
        return VocabStats(*self.vocab_fwd_impl(logits, tokens, mask, temperature, scale=scale, softcap=softcap))

    def vocab_bwd(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        stats: VocabStats,
        grad_logp: torch.Tensor,
        grad_entropy: torch.Tensor | None,
        temperature: float,
        *,
        inplace: bool,
        scale: float = 1.0,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """dLoss/dlogits for dLoss/dl_t = grad_logp and dLoss/dH_t = grad_entropy ((N,) fp32; None: no
        entropy term), shaped like logits in their dtype (the logits buffer itself when `inplace`)."""
        return self.vocab_bwd_impl(
            logits, tokens, mask, stats.lse, stats.entropy, grad_logp, grad_entropy, temperature,
            inplace=inplace, logp=stats.logp, rows=stats.rows, scale=scale, softcap=softcap,
        )  # fmt: skip


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend_name(backend: str, device: torch.device) -> str:
    """ "triton" or "torch": "auto" takes Triton for CUDA tensors when it is installed."""
    choice("backend", backend, BACKENDS)
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError(
            'backend="triton" needs CUDA tensors; on the CPU set TRITON_INTERPRET=1 before importing '
            'sspo_kernels to run the kernels in Triton\'s interpreter, or use backend="torch"'
        )
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return backend


def get_backend(
    backend: str, device: torch.device, *, chunk_size: int | None = None, compile_chunks: bool = False
) -> Backend:
    """The backend for tensors on `device`; `chunk_size` (rows per chunk) and `compile_chunks`
    (torch.compile of each chunk's maths) concern the torch vocabulary pass only."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    flag("compile_chunks", compile_chunks)
    name = resolve_backend_name(backend, device)
    if name == "triton":
        from sspo_kernels.ops import objective_triton
        from sspo_kernels.ops.segment import triton as segment
        from sspo_kernels.ops.vocab import triton as vocab

        return Backend(
            "triton", vocab.logprob_entropy_fwd, vocab.logprob_entropy_bwd, segment.segment_sum,
            objective_triton.segment_step_fwd,
        )  # fmt: skip
    from sspo_kernels.ops.segment import torch as segment
    from sspo_kernels.ops.vocab import torch as vocab

    chunking = dict(chunk_size=chunk_size, use_compile=compile_chunks)
    return Backend(
        "torch",
        functools.partial(vocab.logprob_entropy_fwd, **chunking),
        functools.partial(vocab.logprob_entropy_bwd, **chunking),
        segment.segment_sum,
    )
