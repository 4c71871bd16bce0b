"""`sspo_loss`: the SSPO / GSPO / GRPO policy loss from logits, with fused vocabulary passes.

Three steps, each O(1) passes over the `(N, V)` logits and nothing `(N, V)`-sized in fp32:
  1. the backend's vocabulary pass (`ops/vocab/`): per-token log p, entropy and lse in fp32;
  2. the segment step (`ops/objective.py`): segment ratios, adaptive clip bounds, the loss, the
     metrics and per-token gradient coefficients, all O(N);
  3. in backward, one more vocabulary pass that writes dLoss/dlogits (into the logits buffer
     itself with `inplace_backward=True`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from sspo_kernels._options import (
    CONFIG_FIELDS,
    DISTRIBUTED_OPTIONS,
    LOGITS_OPTIONS,
    LOSS_OPTIONS,
    OptionSet,
    config_of,
    flag,
    make_config,
)
from sspo_kernels._parallel import is_parallel, parallel_logits_layout
from sspo_kernels._types import METRIC_NAMES, FlatBatch, Layout, LossConfig, SSPOOutput
from sspo_kernels._utils import on_ctx_device, on_input_device
from sspo_kernels._validate import logits_layout, prepare_inputs
from sspo_kernels.backend import Backend, get_backend
from sspo_kernels.ops.objective import make_output, objective_bwd, segment_step
from sspo_kernels.ops.segment.ids import batch_segment_ids

# The per-call tensors every entry point passes to `prepare_inputs` by name.
INPUT_NAMES = (
    "boundary", "segment_ids", "cu_seqlens", "ref_logprobs", "normalizer", "norm_len", "policy_weights",
    "rollout_logprobs", "entropy_mask_group",
)  # fmt: skip
SSPO_LOSS_OPTIONS = OptionSet(LOSS_OPTIONS, LOGITS_OPTIONS, DISTRIBUTED_OPTIONS)


class SSPOLossFunction(torch.autograd.Function):
    """Differentiable in `logits` only; every other input is data.

    `parallel` (multi-process forms, docs/distributed.md): its `vocab` replaces the backend's vocabulary
    pass by the tensor-parallel one, its `seq` gathers the local rows' statistics into the whole batch
    before the segment step and takes the local rows' coefficients back in backward (no collective)."""

    @staticmethod
    @on_input_device
    def forward(ctx, logits, batch: FlatBatch, seg, cfg: LossConfig, backend: Backend, inplace: bool, parallel=None):
        vocab = backend if parallel is None or parallel.vocab is None else parallel.vocab
        sp = None if parallel is None else parallel.seq
        tokens, mask = (batch.tokens, batch.mask) if sp is None else (sp.rows(batch.tokens), sp.rows(batch.mask))
        stats = vocab.vocab_fwd(logits, tokens, mask, cfg.temperature, **cfg.logit_transform)
        logp, entropy = (stats.logp, stats.entropy) if sp is None else sp.gather(stats.logp, stats.entropy)
        loss, saved, metrics = segment_step(logp, entropy, seg, batch, cfg, backend)  # seg None: fused
        ctx.save_for_backward(logits, tokens, mask, *stats, *saved)
        ctx.cfg, ctx.backend, ctx.inplace = cfg, backend, inplace
        ctx.vocab, ctx.sp, ctx.stats_type = vocab, sp, type(stats)
        ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
        ctx.mark_non_differentiable(logp, entropy, *metrics)
        return (loss, logp, entropy, *metrics)

    @staticmethod
    @on_ctx_device
    def backward(ctx, grad_loss, *_unused):
        logits, tokens, mask, *rest = ctx.saved_tensors
        n_stats = len(ctx.stats_type._fields)
        stats, saved = ctx.stats_type(*rest[:n_stats]), rest[n_stats:]
        grad_logp, grad_entropy = objective_bwd(saved, grad_loss, ctx.cfg, ctx.backend)
        if ctx.sp is not None:  # this rank's rows
            grad_logp, grad_entropy = ctx.sp.local(grad_logp), ctx.sp.local(grad_entropy)
        grad = ctx.vocab.vocab_bwd(
            logits,
            tokens,
            mask,
            stats,
            grad_logp,
            grad_entropy,
            ctx.cfg.temperature,
            inplace=ctx.inplace,
            **ctx.cfg.logit_transform,
        )
        return grad, None, None, None, None, None, None


def batch_and_segments(
    cfg: LossConfig, layout: Layout, backend: Backend, opts: dict, tokens, old_logprobs, advantages, mask
) -> tuple[FlatBatch, torch.Tensor | None]:
    """The checked flat batch and its (N,) segment ids; no ids (None) and a lean batch when the
    backend's fused segment step numbers the segments and checks the token ids itself."""
    fused = backend.fuses_step(cfg.loss_agg_mode, math.prod(layout.token_shape))
    inputs = {k: opts[k] for k in INPUT_NAMES}
    batch = prepare_inputs(cfg, layout, tokens, old_logprobs, advantages, mask, **inputs, lean=fused)
    return batch, None if fused else batch_segment_ids(batch, cfg.granularity)


@SSPO_LOSS_OPTIONS.signature
def sspo_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    **options: Any,
) -> SSPOOutput:
    """The policy loss of docs/loss.md from logits, differentiable in `logits`.

    logits: (B, T, V) padded, (N, V) one response, or (total, V) packed with `cu_seqlens` (B + 1,);
    bf16 / fp16 / fp32. tokens, old_logprobs, mask (and ref_logprobs, segment_ids) are shaped like
    logits without V; `old_logprobs=None` means on-policy (the rollout policy is the current one:
    ratio 1, gradient A * dl). advantages per response (B,) or per token. Returns
    `SSPOOutput(loss, logprobs, entropy, metrics)`: the loss is a 0-d fp32 tensor (per-token for
    loss_agg_mode="none"); logprobs and entropy are fp32, detached, zero where masked out; metrics are
    detached device tensors. With `inplace_backward=True` the backward writes the gradient into the
    logits buffer (do not reuse the logits afterwards). `backend`: "triton", "torch" (chunked
    PyTorch; `chunk_size` rows per chunk, `compile_chunks=True` runs each chunk's maths through
    torch.compile) or "auto" (Triton for CUDA tensors, else torch).
    Multi-process forms (docs/distributed.md): `tp_group` (+ `vocab_start`) when logits are this rank's
    vocabulary slice, `sp_group` + `sp_index` when they are this rank's rows of the whole batch.
    See the README for every option and its default.
    """
    opts = SSPO_LOSS_OPTIONS.parse("sspo_loss", options)
    cfg = config_of(opts)
    parallel = None
    if is_parallel(opts):
        logits, layout, parallel = parallel_logits_layout(opts, logits, tokens, opts["backend"])
    else:
        logits, layout = logits_layout(logits)
    inplace = flag("inplace_backward", opts["inplace_backward"])
    if inplace and torch._debug_has_internal_overlap(logits) == 1:  # e.g. expanded: rows share memory
        raise ValueError("inplace_backward=True needs logits whose rows do not share memory (not an expanded view)")
    backend = get_backend(
        opts["backend"], layout.device, chunk_size=opts["chunk_size"], compile_chunks=opts["compile_chunks"]
    )
    batch, seg = batch_and_segments(cfg, layout, backend, opts, tokens, old_logprobs, advantages, mask)
    loss, logp, entropy, *metrics = SSPOLossFunction.apply(logits, batch, seg, cfg, backend, inplace, parallel)
    return make_output(cfg, batch, loss, logp, entropy, metrics)


class LossModule(torch.nn.Module):
    """Base of the module forms: holds and validates the construction-time options of an entry point
    (every option but the per-call tensors and normalisers, which go to `forward`).

    `forward(*tensors, **per_call)` calls `LOSS(*tensors, **options, **per_call)`: the tensors are
    the entry point's positional ones, per-call keywords are the tensors and normalisers of one batch.
    """

    LOSS: Callable[..., SSPOOutput]
    OPTIONS: OptionSet
    PER_CALL = (frozenset(INPUT_NAMES) - {"boundary", "entropy_mask_group"}) | {"sp_index"}

    def __init__(self, granularity: str = "subsentence", *, boundary: torch.Tensor | None = None, **options):
        super().__init__()
        allowed = set(self.OPTIONS.defaults) - self.PER_CALL - {"granularity", "boundary"}
        unknown = set(options) - allowed
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected options: {', '.join(sorted(unknown))}")
        make_config(granularity, **{k: v for k, v in options.items() if k in CONFIG_FIELDS})
        self.granularity = granularity
        self.options = options
        self.register_buffer("boundary", boundary, persistent=False)

    def forward(self, *tensors: torch.Tensor | None, **per_call: Any) -> SSPOOutput:
        loss = type(self).LOSS
        return loss(*tensors, granularity=self.granularity, boundary=self.boundary, **self.options, **per_call)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"granularity={self.granularity!r}" + (f", {opts}" if opts else "")


class SSPOLoss(LossModule):
    """`sspo_loss` with its options held by the module.

    `SSPOLoss(granularity="subsentence", boundary=table, eps_low=..., ...)(logits, tokens,
    old_logprobs, advantages, mask, cu_seqlens=..., ref_logprobs=...)`; per-call tensors and
    normalisers go to `forward`, every other option to the constructor.
    """

    LOSS = sspo_loss
    OPTIONS = SSPO_LOSS_OPTIONS


def segment_ids(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    *,
    granularity: str = "subsentence",
    boundary: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Segment id of every token, shaped like `tokens`, int32: 0, 1, ... in token order, -1 where masked out.

    tokens, mask: (B, T) padded or (N,) flat / packed with `cu_seqlens`. Computed on the tokens'
    device with vectorised ops and no host sync (what `sspo_loss` uses internally).
    """
    cfg = make_config(granularity)
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() not in (1, 2):
        raise ValueError(f"tokens must be (B, T) or (N,), got shape {tuple(tokens.shape)}")
    vocab = boundary.shape[0] if isinstance(boundary, torch.Tensor) and boundary.dim() == 1 else None
    layout = Layout(tuple(tokens.shape), vocab, tokens.device)
    batch = prepare_inputs(
        cfg, layout, tokens, None, None, mask, boundary=boundary, segment_ids=segment_ids, cu_seqlens=cu_seqlens
    )
    seg = batch_segment_ids(batch, cfg.granularity)
    return seg.to(torch.int32).reshape(tokens.shape)


__all__ = ["METRIC_NAMES", "SSPOLoss", "segment_ids", "sspo_loss"]
