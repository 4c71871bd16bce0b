"""The matmuls around the vocabulary pass when the logits come from hidden states, z = W h + b: chunk
sizes, the chunk's logits, and the gradients of hidden, weight and bias (docs/loss.md "Gradient forms").

Every entry point that starts from hidden states (`sspo_loss_from_hidden`, `token_logprobs_from_hidden`)
goes through these, so the chunk size and the accumulation path are decided in one place.

The fp32 weight gradient grad_W += dlogits^T @ hidden is the one product whose inputs (bf16 / fp16) and
accumulator (fp32) differ in dtype. `weight_grad_path` probes once per device and dtype which form
the torch build accepts, fastest first, and a slow form is never taken silently.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

logger = logging.getLogger("sspo_kernels")

# Chunk sizes. Every chunk streams the weight (V x H) twice and the fp32 weight-gradient accumulator
# once, at 2 * rows FLOPs per element, so the rows set how matmul-bound a chunk is; its memory is one
# (rows, V) logits buffer in the input dtype, reused by every chunk.
# - CPU: 32 MiB counted in fp32 (262 rows at V=32000): the peak stays below Liger's fused GRPO loss
#   while faster than it (bench/RESULTS.md); the torch pass works on cache-sized steps of the chunk.
# - GPU: the Triton pass reads the buffer in its own dtype and makes no fp32 copy, so chunks are sized
#   in the input dtype: GPU_CHUNK_BYTES of logits, and at least GPU_MIN_ROWS rows (the M of the
#   weight-gradient GEMM, which is memory-bound on its fp32 read-modify-write below ~2000 rows) unless
#   that buffer would pass GPU_MAX_CHUNK_BYTES. bf16 at V=151,936: 2048 rows (622 MB); at V=32000: 8388.
CPU_CHUNK_BYTES = 1 << 25
GPU_CHUNK_BYTES = 1 << 29
GPU_MIN_ROWS = 2048
GPU_MAX_CHUNK_BYTES = 1 << 31


def linear_chunk_tokens(vocab_size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> int:
    """Tokens per chunk of logits (at least 1) for a vocabulary of `vocab_size` on `device`, for hidden
    states of `dtype` (see the constants above)."""
    v = max(int(vocab_size), 1)
    if torch.device(device).type != "cuda":
        return max(1, CPU_CHUNK_BYTES // (4 * v))
    row_bytes = torch.empty((), dtype=dtype).element_size() * v
    floor = min(GPU_MIN_ROWS, GPU_MAX_CHUNK_BYTES // row_bytes)
    return max(1, GPU_CHUNK_BYTES // row_bytes, floor)


def chunk_rows(bounds: tuple[tuple[int, int], ...]) -> int:
    """The largest chunk of `bounds` ([start, end) token ranges): the rows of the logits buffer."""
    return max(1, *(e - s for s, e in bounds))


def logits_buffer(rows: int, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One (rows, V) buffer in the input dtype for every chunk's logits: allocated and faulted in once."""
    return torch.empty(rows, weight.shape[0], dtype=hidden.dtype, device=hidden.device)


def chunk_logits(
    hidden_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffer: torch.Tensor
) -> torch.Tensor:
    """(rows, V) logits hidden_c @ weight.T (+ bias) in the input dtype (fp32 accumulation inside the
    matmul), written into the first rows of `buffer` (the backward overwrites them)."""
    out = buffer[: hidden_c.shape[0]]
    if bias is None:
        return torch.mm(hidden_c, weight.t(), out=out)
    return torch.addmm(bias, hidden_c, weight.t(), out=out)


# ---------------------------------------------------------------- the fp32 weight-gradient product

# The forms of acc (fp32) += a @ b for bf16 / fp16 a and b, fastest first:
#   "addmm-fp32-out": one cuBLAS GEMM with bf16 inputs and the fp32 accumulator as its C and output;
#   "mm-fp32-out":    fp32-output GEMMs on slices of the rows of acc, each added to acc (a temporary of
#                     SLICE_ROWS rows);
#   "fp32-copies":    fp32 copies of a and b and an fp32 GEMM (several times slower on a GPU: it runs on
#                     the fp32 units and copies the chunk); a warning says so once per process.
# fp32 inputs always take "fp32" (acc.addmm_), and the CPU always "fp32-copies" (torch's CPU GEMMs have
# no fp32-output form for 16-bit inputs; the CPU path is measured in fp32).
WEIGHT_GRAD_PATHS = ("fp32", "addmm-fp32-out", "mm-fp32-out", "fp32-copies")
SLICE_ROWS = 8192
_PATHS: dict[tuple[str, int | None, torch.dtype], str] = {}


def _refused(error: BaseException) -> bool:
    """Whether a GEMM call failed because the form is not supported (not for lack of memory)."""
    return isinstance(error, (TypeError, NotImplementedError)) or (
        isinstance(error, RuntimeError) and not isinstance(error, torch.OutOfMemoryError)
    )


def _addmm_fp32_out(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def _mm_fp32_out(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    for r in range(0, acc.shape[0], SLICE_ROWS):
        acc[r : r + SLICE_ROWS].add_(torch.mm(a[r : r + SLICE_ROWS], b, out_dtype=torch.float32))


def _fp32_copies(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    acc.addmm_(a.float(), b.float())


_FORMS = {"addmm-fp32-out": _addmm_fp32_out, "mm-fp32-out": _mm_fp32_out, "fp32-copies": _fp32_copies}


def weight_grad_path(device: torch.device | str, dtype: torch.dtype) -> str:
    """Which form of `WEIGHT_GRAD_PATHS` accumulates the fp32 weight gradient for inputs of `dtype` on
    `device`. Found once per (device, dtype) by trying the forms on a tiny product (a refusal is raised
    on the host: no sync), then cached; the slow "fp32-copies" on a GPU is announced with a warning."""
    device = torch.device(device)
    if dtype == torch.float32:
        return "fp32"
    if device.type != "cuda":
        return "fp32-copies"
    key = (device.type, device.index, dtype)
    if key not in _PATHS:
        if torch.compiler.is_compiling():  # no probing inside a traced graph
            return "addmm-fp32-out"
        _PATHS[key] = _probe(device, dtype)
        if _PATHS[key] == "fp32-copies":
            warnings.warn(
                f"this torch build refuses fp32-output GEMMs of {dtype} inputs on {device}: the weight gradient "
                "of the hidden-state entry points is accumulated through fp32 copies and an fp32 GEMM, several "
                "times slower than one bf16 GEMM (sspo_kernels.ops.linear.weight_grad_path)",
                RuntimeWarning,
                stacklevel=3,
            )
        logger.debug("weight gradient of %s inputs on %s: %s", dtype, device, _PATHS[key])
    return _PATHS[key]


def _probe(device: torch.device, dtype: torch.dtype) -> str:
    """The first fp32-output form this torch build accepts, else "fp32-copies"."""
    a = torch.zeros(2, 3, device=device, dtype=dtype)
    b = torch.zeros(3, 2, device=device, dtype=dtype)
    for name in ("addmm-fp32-out", "mm-fp32-out"):
        try:
            _FORMS[name](torch.zeros(2, 2, device=device), a, b)
        except Exception as error:
            if not _refused(error):
                raise
            continue
        return name
    return "fp32-copies"


def add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, accumulated in fp32 whatever the dtype of a and b (`weight_grad_path`)."""
    path = weight_grad_path(a.device, a.dtype)
    if path == "fp32":
        acc.addmm_(a, b)
    else:
        _FORMS[path](acc, a, b)


# ---------------------------------------------------------------- gradients of hidden, weight, bias


@dataclass
class LinearGrads:
    """Gradient buffers of the parameters that need one (None otherwise)."""

    hidden: torch.Tensor | None  # (N, H) in hidden's dtype
    weight: torch.Tensor | None  # (V, H) fp32
    bias: torch.Tensor | None  # (V,) fp32

    @classmethod
    def empty(cls, hidden, weight, bias, needs: tuple[bool, bool, bool]) -> LinearGrads:
        """Buffers for the needed gradients: hidden (N, H) uninitialised (every chunk writes its rows),
        weight and bias zero-filled fp32 accumulators."""
        return cls(
            hidden=torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if needs[0] else None,
            weight=torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None,
            bias=torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs[2] else None,
        )

    def add_chunk(
        self, dlogits: torch.Tensor, hidden_c: torch.Tensor, mask_c: torch.Tensor, weight: torch.Tensor, s: int, e: int
    ) -> None:
        """Add one chunk's share: dlogits (rows, V), hidden_c (rows, H), mask_c (rows,) bool; rows s:e."""
        if self.hidden is not None:
            torch.mm(dlogits, weight, out=self.hidden[s:e])
        if self.weight is not None:
            # a masked-out row has zero dlogits, but 0 * NaN (a NaN hidden state at padding) is NaN:
            # such rows must not reach the weight gradient, so their hidden rows are zeroed first
            hidden_in = torch.where(mask_c[:, None], hidden_c, hidden_c.new_zeros(()))
            add_product_fp32(self.weight, dlogits.t(), hidden_in)
        if self.bias is not None:
            self.bias.add_(dlogits.sum(0, dtype=torch.float32))

    def finish(self, scale, hidden, weight, bias) -> tuple[torch.Tensor | None, ...]:
        """The three gradients in their parameters' dtypes (times the upstream `scale` when given)."""
        return (
            finish_grad(self.hidden, scale, hidden.dtype),
            finish_grad(self.weight, scale, weight.dtype),
            None if bias is None else finish_grad(self.bias, scale, bias.dtype),
        )


def finish_grad(grad: torch.Tensor | None, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """grad (times the upstream `scale`, if given) in `dtype`; in place where the dtypes allow."""
    if grad is None:
        return None
    if scale is None:
        return grad.to(dtype)
    if grad.dtype == torch.float32:
        return grad.mul_(scale).to(dtype)
    return grad.copy_(grad.float().mul_(scale))  # 16-bit hidden gradient: scale in fp32, round once
