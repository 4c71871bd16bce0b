"""The multi-process options of the entry points (docs/distributed.md), checked on the host.

`parallel_logits_layout` turns `tp_group`, `vocab_start`, `sp_group` and `sp_index` into the layout
of the per-token inputs (the WHOLE batch under sequence parallelism, the full vocabulary under tensor
parallelism) and a `Parallel` plan; with all of them None nothing here runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sspo_kernels._types import Layout
from sspo_kernels._validate import logits_layout
from sspo_kernels.backend import resolve_backend_name
from sspo_kernels.ops.sequence_shards import SequenceShards
from sspo_kernels.ops.vocab.sharded import ShardedVocab

# process-group backends that run collectives on tensors of each device type
COLLECTIVE_BACKENDS = {"cpu": ("gloo", "mpi", "ucc"), "cuda": ("nccl", "gloo", "mpi", "ucc")}


def check_group(name: str, group: Any, device: torch.device) -> tuple[int, int]:
    """(rank, world size) of this process in `group`, or a clear error."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{name} is given but torch.distributed is not initialised (init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    if not torch.compiler.is_compiling():
        backend = str(dist.get_backend(group)).lower()
        if not any(b in backend for b in COLLECTIVE_BACKENDS.get(device.type, ())):
            raise ValueError(
                f"{name} has the {backend!r} process-group backend, which cannot run collectives on "
                f"{device.type} tensors (use {' or '.join(COLLECTIVE_BACKENDS.get(device.type, ('another',)))})"
            )
    return dist.get_rank(group), dist.get_world_size(group)


def is_parallel(opts: dict[str, Any]) -> bool:
    return any(opts.get(k) is not None for k in ("tp_group", "vocab_start", "sp_group", "sp_index"))


def _full_vocab(boundary: object) -> int | None:
    return boundary.shape[0] if isinstance(boundary, torch.Tensor) and boundary.dim() == 1 else None


def sharded_vocab(
    opts: dict[str, Any], v_local: int, device: torch.device, backend: str, full_vocab: int | None
) -> ShardedVocab | None:
    """The tensor-parallel vocabulary pass of `opts` (None without `tp_group`)."""
    group, start = opts["tp_group"], opts["vocab_start"]
    if group is None:
        if start is not None:
            raise ValueError("vocab_start is given without tp_group")
        return None
    if opts.get("logit_scale", 1.0) != 1.0 or opts.get("logit_softcap") is not None:
        raise ValueError("logit_scale / logit_softcap with tp_group: the vocabulary-parallel pass has no transform")
    rank, _ = check_group("tp_group", group, device)
    if start is None:
        start = rank * v_local
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {start!r}")
    if full_vocab is not None and start + v_local > full_vocab:
        raise ValueError(
            f"vocab_start + V_local = {start} + {v_local} exceeds the vocabulary size {full_vocab} (boundary's length)"
        )
    return ShardedVocab(group, start, backend, opts.get("chunk_size"))


@dataclass(frozen=True)
class Parallel:
    vocab: ShardedVocab | None  # tensor parallel: this rank's vocabulary slice
    seq: SequenceShards | None  # sequence parallel: this rank's rows


def parallel_logits_layout(
    opts: dict[str, Any], logits: object, tokens: object, backend: str
) -> tuple[torch.Tensor, Layout, Parallel]:
    """The logits (flattened to (N_local, V_local) under sequence parallelism), the layout of the
    per-token inputs, and the plan. `backend`: the call's backend option."""
    logits, local = logits_layout(logits)
    backend = resolve_backend_name(backend, local.device)
    full_vocab = _full_vocab(opts["boundary"])
    vocab = sharded_vocab(opts, local.vocab_size, local.device, backend, full_vocab)
    if vocab is None and full_vocab is None:
        full_vocab = local.vocab_size
    group, index = opts["sp_group"], opts["sp_index"]
    if group is None and index is None:
        return logits, Layout(local.token_shape, full_vocab, local.device), Parallel(vocab, None)
    if group is None or index is None:
        raise ValueError("sequence parallelism needs both sp_group and sp_index")
    check_group("sp_group", group, local.device)
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"sp_index must be a torch.Tensor, got {type(index).__name__}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"sp_index must be an integer tensor, got {index.dtype}")
    if tuple(index.shape) != tuple(local.token_shape):
        raise ValueError(f"sp_index must have one entry per local row of logits {local.token_shape}, got {index.shape}")
    if index.device != local.device:
        raise ValueError(f"sp_index is on {index.device} but logits are on {local.device}")
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    seq = SequenceShards(group, index.reshape(-1).long(), tokens.numel())
    layout = Layout(tuple(tokens.shape), full_vocab, local.device)
    return logits.reshape(-1, logits.shape[-1]), layout, Parallel(vocab, seq)


def reduce_hidden(grad: torch.Tensor | None, group: Any) -> None:
    """SUM the hidden gradient over the tensor-parallel group, in place (reduce_hidden_grad=True)."""
    if grad is not None:
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)


__all__ = ["Parallel", "check_group", "is_parallel", "parallel_logits_layout", "reduce_hidden", "sharded_vocab"]
