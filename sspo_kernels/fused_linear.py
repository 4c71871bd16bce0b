"""`sspo_loss_from_hidden`: the loss of docs/loss.md from the last hidden states and the output projection,
z_t = W h_t + b, without ever holding the `(N, V)` logits.

Tokens are processed in chunks of rows. Per chunk: the logits `hidden_c @ weight.T (+ bias)` in the
input dtype (fp32 accumulation inside the matmul), the vocabulary pass of the backend (`backend.py`:
Triton on CUDA, chunked PyTorch on the CPU), and later the chunk's gradient, whose dLoss/dlogits is
written over the chunk's logits buffer (`inplace=True`) and turned into
    grad_hidden_c = dlogits_c @ W,   grad_W += dlogits_c^T @ hidden_c,   grad_b += sum_rows dlogits_c,
with grad_W and grad_b summed over chunks in fp32 buffers and returned in the parameters' dtype.

Two schedules, chosen by `plan_chunks`:
- two-phase (always valid): the forward keeps only O(N) fp32 per-token statistics (logp, entropy,
  lse); the segment step then runs on the whole batch; the backward recomputes each chunk's logits.
  Costs one extra matmul per chunk.
- single-pass: each chunk's statistics, segment step and gradient (for a unit upstream gradient) are
  produced while its logits are in memory; the forward keeps grad_hidden and the fp32 grad_W / grad_b
  and the backward only scales them by the upstream scalar. Needs every chunk to hold whole segments
  and nothing in a segment's objective to depend on other chunks (see `plan_chunks`).

No host syncs in either schedule: chunk bounds come from shapes (or from a CPU `cu_seqlens`), and the
chunk's segment ids are re-based with device arithmetic.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from sspo_kernels._options import HIDDEN_DISTRIBUTED_OPTIONS, HIDDEN_OPTIONS, LOSS_OPTIONS, OptionSet, config_of, flag
from sspo_kernels._parallel import reduce_hidden, sharded_vocab
from sspo_kernels._types import FlatBatch, LossConfig, SSPOOutput, VocabStats
from sspo_kernels._utils import on_ctx_device, on_input_device
from sspo_kernels._validate import hidden_layout, prepare_inputs
from sspo_kernels.backend import get_backend, resolve_backend_name
from sspo_kernels.loss import INPUT_NAMES, LossModule
from sspo_kernels.ops.linear import (
    LinearGrads,
    chunk_logits,
    chunk_rows,
    finish_grad,
    linear_chunk_tokens,
    logits_buffer,
    weight_grad_path,
)
from sspo_kernels.ops.objective import (
    finalize_metrics,
    make_output,
    merge_metric_sums,
    objective_bwd,
    objective_fwd,
    token_weights,
)
from sspo_kernels.ops.segment.ids import batch_segment_ids

SSPO_LOSS_FROM_HIDDEN_OPTIONS = OptionSet(LOSS_OPTIONS, HIDDEN_OPTIONS, HIDDEN_DISTRIBUTED_OPTIONS)
logger = logging.getLogger("sspo_kernels")

# ---------------------------------------------------------------- chunk planning


@dataclass(frozen=True)
class ChunkPlan:
    single_pass: bool
    bounds: tuple[tuple[int, int], ...]  # [start, end) token ranges covering 0..N in order
    reason: str  # why the single-pass schedule is not possible ("" when it is)


def _fixed_bounds(n: int, chunk: int) -> tuple[tuple[int, int], ...]:
    return tuple((s, min(s + chunk, n)) for s in range(0, n, chunk)) or ((0, 0),)


def _whole_response_bounds(
    token_shape: tuple[int, ...], cu_seqlens: torch.Tensor | None, chunk: int
) -> tuple[tuple[tuple[int, int], ...] | None, str]:
    """Chunks of whole responses of at most `chunk` tokens, planned on the host, or (None, why not)."""
    n = math.prod(token_shape)
    if cu_seqlens is None:
        seq_len = token_shape[1] if len(token_shape) == 2 else n
        if seq_len > chunk:
            return None, f"a response of {seq_len} tokens is longer than chunk_size={chunk}"
        rows = chunk // max(seq_len, 1)
        return _fixed_bounds(n, rows * max(seq_len, 1)), ""
    if cu_seqlens.device.type != "cpu":
        return None, "cu_seqlens is on the device: planning chunks of whole responses would read it back"
    offsets = [int(o) for o in cu_seqlens.tolist()]
    longest = max(b - a for a, b in itertools.pairwise(offsets))
    if longest > chunk:
        return None, f"a response of {longest} tokens is longer than chunk_size={chunk}"
    bounds, start, prev = [], 0, 0
    for end in offsets[1:]:
        if end - start > chunk:  # close the chunk before this response
            bounds.append((start, prev))
            start = prev
        prev = end
    bounds.append((start, prev))
    return tuple(bounds), ""


def plan_chunks(
    cfg: LossConfig,
    token_shape: tuple[int, ...],
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
    single_pass: bool | None = None,
    *,
    per_response: bool = False,
) -> ChunkPlan:
    """The schedule and the chunks of tokens (see `sspo_loss_from_hidden` for the rules). `per_response`:
    a correction needs whole responses in a chunk also at token granularity (a sequence-level rollout
    weight, the off-policy sequence mask)."""
    n = math.prod(token_shape)
    adapts = cfg.has_bounds and cfg.entropy_gamma != 0 and (cfg.adapt_low or cfg.adapt_high)
    bounds, reason = None, ""
    if cfg.loss_agg_mode == "none":
        reason = 'loss_agg_mode="none" has a per-token upstream gradient, known only in backward'
    elif adapts and cfg.entropy_ref == "batch":
        reason = 'entropy_ref="batch" needs the mean entropy of the whole batch before any clip bound'
    elif cfg.entropy_mask_quantile is not None:
        reason = "entropy_mask_quantile needs every entropy of the batch before any policy term"
    elif cfg.granularity == "token" and not per_response:
        bounds = _fixed_bounds(n, chunk_size)
    else:
        bounds, reason = _whole_response_bounds(token_shape, cu_seqlens, chunk_size)
    if single_pass is True and bounds is None:
        raise ValueError(f"single_pass=True is not possible here: {reason}")
    if single_pass is False or bounds is None:
        return ChunkPlan(False, _fixed_bounds(n, chunk_size), reason or "single_pass=False")
    return ChunkPlan(True, bounds, "")


# ---------------------------------------------------------------- per-chunk pieces


def _vocab_rows(bounds: tuple[tuple[int, int], ...], device: torch.device) -> int | None:
    """Rows per step of the torch vocabulary pass. On a GPU the whole chunk (few, large kernels). On the
    CPU None: the pass's own cache-sized steps (`vocab_chunk_rows`, 8 rows at V=32000 fp32), so its two
    fp32 workspaces cost 4 MiB rather than two more chunks of logits, and stay in cache."""
    return chunk_rows(bounds) if device.type == "cuda" else None


def _chunk_batch(batch: FlatBatch, s: int, e: int) -> FlatBatch:
    """The per-token fields of `batch` restricted to tokens [s, e)."""
    cut = lambda t: None if t is None else t[s:e]
    return replace(
        batch, tokens=batch.tokens[s:e], mask=batch.mask[s:e], old_logprobs=cut(batch.old_logprobs),
        advantages=batch.advantages[s:e], ref_logprobs=cut(batch.ref_logprobs),
        response_ids=batch.response_ids[s:e], segment_ids=cut(batch.segment_ids), token_shape=(e - s,),
        policy_weights=cut(batch.policy_weights), rollout_logprobs=cut(batch.rollout_logprobs),
    )  # fmt: skip


# ---------------------------------------------------------------- the two schedules


class TwoPhaseFunction(torch.autograd.Function):
    """Forward: per-token statistics chunk by chunk, then the segment step on the whole batch.
    Backward: recompute each chunk's logits and turn them into its gradients.
    Differentiable in hidden (N, H), weight (V, H) and bias (V,); every other input is data.

    Tensor parallel (`shard`, a `ShardedVocab`): weight and bias are this rank's vocabulary slice; the
    partial statistics of every chunk are merged once for the whole batch (2 collectives); the backward
    has none, but for the SUM of the hidden gradient over the group when `reduce_group` is given."""

    @staticmethod
    @on_input_device
    def forward(
        ctx, hidden, weight, bias, batch: FlatBatch, seg, cfg: LossConfig, plan: ChunkPlan, backend, grad_on,
        shard=None, reduce_group=None,
    ):  # fmt: skip
        n = batch.num_tokens
        vocab = backend if shard is None else shard
        if shard is None:
            stats = VocabStats(*(torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3)))
        else:
            partial = torch.empty(n, 5, dtype=torch.float32, device=hidden.device)
        buffer = logits_buffer(chunk_rows(plan.bounds), hidden, weight)
        for s, e in plan.bounds:
            logits = chunk_logits(hidden[s:e], weight, bias, buffer)
            if shard is None:
                chunk = backend.vocab_fwd(
                    logits, batch.tokens[s:e], batch.mask[s:e], cfg.temperature, **cfg.logit_transform
                )
                if chunk.rows is not None and stats.rows is None:  # the torch pass's row statistics
                    stats = stats._replace(rows=chunk.rows.new_empty((*chunk.rows.shape[:-1], n)))
                for out, value in zip(stats, chunk):
                    if value is not None:
                        out[..., s:e] = value
            else:
                partial[s:e] = shard.partial(logits, batch.tokens[s:e], batch.mask[s:e], cfg.temperature)
            del logits
        del buffer
        if shard is not None:
            stats = shard.merge(partial, batch.mask)
        step = objective_fwd(stats.logp, stats.entropy, seg, batch, cfg, backend=backend)
        ctx.save_for_backward(hidden, weight, bias, batch.tokens, batch.mask, *stats, *step.saved)
        ctx.cfg, ctx.plan, ctx.backend = cfg, plan, backend
        ctx.vocab, ctx.stats_type, ctx.reduce_group = vocab, type(stats), reduce_group
        ctx.needs = _needs(ctx, grad_on)
        metrics = tuple(finalize_metrics(step.metric_sums).values())
        ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
        ctx.mark_non_differentiable(stats.logp, stats.entropy, *metrics)
        return (step.loss, stats.logp, stats.entropy, *metrics)

    @staticmethod
    @on_ctx_device
    def backward(ctx, grad_loss, *_unused):
        hidden, weight, bias, tokens, mask, *rest = ctx.saved_tensors
        n_stats = len(ctx.stats_type._fields)
        stats, saved = ctx.stats_type(*rest[:n_stats]), rest[n_stats:]
        cfg, backend = ctx.cfg, ctx.backend
        grad_logp, grad_entropy = objective_bwd(saved, grad_loss, cfg, backend)
        grads = LinearGrads.empty(hidden, weight, bias, ctx.needs)
        buffer = logits_buffer(chunk_rows(ctx.plan.bounds), hidden, weight)
        for s, e in ctx.plan.bounds:
            logits = chunk_logits(hidden[s:e], weight, bias, buffer)
            dlogits = ctx.vocab.vocab_bwd(
                logits, tokens[s:e], mask[s:e], ctx.stats_type(*(_rows_of(t, s, e) for t in stats)), grad_logp[s:e],
                _rows_of(grad_entropy, s, e), cfg.temperature, inplace=True, **cfg.logit_transform,
            )  # fmt: skip
            grads.add_chunk(dlogits, hidden[s:e], mask[s:e], weight, s, e)
            del logits, dlogits
        del buffer
        if ctx.reduce_group is not None:  # reduce_hidden_grad=True: the full hidden gradient on every rank
            reduce_hidden(grads.hidden, ctx.reduce_group)
        return (*grads.finish(None, hidden, weight, bias), None, None, None, None, None, None, None, None)


class SinglePassFunction(torch.autograd.Function):
    """Forward: each chunk's statistics, segment step and gradients (for a unit upstream gradient) while
    its logits are in memory. Backward: scale the gradients by the upstream scalar.
    Differentiable in hidden (N, H), weight (V, H) and bias (V,); every other input is data."""

    @staticmethod
    @on_input_device
    def forward(ctx, hidden, weight, bias, batch: FlatBatch, seg, cfg: LossConfig, plan: ChunkPlan, backend, grad_on):
        needs = _needs(ctx, grad_on)
        n, device = batch.num_tokens, hidden.device
        weights = token_weights(batch, cfg)  # whole-batch normalisers, computed once
        # Segment ids are numbered in token order and chunks hold whole segments, so a chunk's first id is
        # one more than the largest id before it: a running max gives it without reading anything back.
        seen = seg.cummax(0).values if n else seg
        unit = torch.ones((), dtype=torch.float32, device=device)
        logp = torch.empty(n, dtype=torch.float32, device=device)
        entropy = torch.empty(n, dtype=torch.float32, device=device)
        grads = LinearGrads.empty(hidden, weight, bias, needs)
        buffer = logits_buffer(chunk_rows(plan.bounds), hidden, weight)
        losses, parts = [], []
        for s, e in plan.bounds:
            sub = _chunk_batch(batch, s, e)
            first = seen[s - 1] + 1 if s > 0 else 0
            seg_c = torch.where(seg[s:e] >= 0, seg[s:e] - first, -1)
            logits = chunk_logits(hidden[s:e], weight, bias, buffer)
            stats = backend.vocab_fwd(logits, sub.tokens, sub.mask, cfg.temperature, **cfg.logit_transform)
            step = objective_fwd(stats.logp, stats.entropy, seg_c, sub, cfg, backend=backend, weights=weights[s:e])
            losses.append(step.loss)
            parts.append(step.metric_sums)
            logp[s:e], entropy[s:e] = stats.logp, stats.entropy
            if any(needs):
                grad_logp, grad_entropy = objective_bwd(step.saved, unit, cfg, backend)
                dlogits = backend.vocab_bwd(
                    logits,
                    sub.tokens,
                    sub.mask,
                    stats,
                    grad_logp,
                    grad_entropy,
                    cfg.temperature,
                    inplace=True,
                    **cfg.logit_transform,
                )
                grads.add_chunk(dlogits, hidden[s:e], sub.mask, weight, s, e)
                del dlogits
            del logits
        del buffer
        # Saved (not stashed on ctx) so that a second backward through them is refused by autograd: the
        # first one scales them in place.
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        metrics = tuple(finalize_metrics(merge_metric_sums(parts)).values())
        ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
        ctx.mark_non_differentiable(logp, entropy, *metrics)
        return (torch.stack(losses).sum(), logp, entropy, *metrics)

    @staticmethod
    @on_ctx_device
    def backward(ctx, grad_loss, *_unused):
        grads = LinearGrads(*ctx.saved_tensors)
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        return (
            finish_grad(grads.hidden, grad_loss.float(), h_dtype),
            finish_grad(grads.weight, grad_loss.float(), w_dtype),
            finish_grad(grads.bias, grad_loss.float(), b_dtype),
            None, None, None, None, None, None,
        )  # fmt: skip


def _needs(ctx, grad_on: bool) -> tuple[bool, bool, bool]:
    """Which of hidden, weight, bias need a gradient: `needs_input_grad` ignores the caller's grad mode
    (forward itself runs without grad), which `grad_on` carries."""
    return tuple(grad_on and bool(n) for n in ctx.needs_input_grad[:3])


def _rows_of(t: torch.Tensor | None, s: int, e: int) -> torch.Tensor | None:
    """Tokens s:e of a per-token tensor (its last dimension), or None."""
    return None if t is None else t[..., s:e]


# ---------------------------------------------------------------- public API


@SSPO_LOSS_FROM_HIDDEN_OPTIONS.signature
def sspo_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    **options: Any,
) -> SSPOOutput:
    """`sspo_loss` on the logits z_t = weight @ hidden_t (+ bias), without building them for all tokens.

    hidden: (B, T, H) padded, (N, H) one response, or (total, H) packed with `cu_seqlens`; bf16 / fp16
    / fp32. weight (V, H) and bias (V,) in hidden's dtype. Every other argument and the returned
    `SSPOOutput(loss, logprobs, entropy, metrics)` are those of `sspo_loss`. Differentiable in hidden,
    weight and bias (the parameter gradients are summed in fp32 and returned in their dtype).

    chunk_size: tokens per chunk (default `linear_chunk_tokens(V, device, dtype)`: 32 MiB of fp32
    logits on the CPU; on a GPU 512 MiB of logits in the input dtype and at least 2048 rows, e.g. 2048
    rows at V = 151,936 bf16). Peak extra memory: one chunk's logits (one buffer for all chunks) and
    the vocabulary pass's temporaries (cache-sized on the CPU), plus the gradients (N x H, and V x H in
    fp32), never anything (N, V). The schedule, the chunks and the weight-gradient accumulation path
    (`sspo_kernels.ops.linear.weight_grad_path`) are logged at DEBUG level on the "sspo_kernels" logger.

    single_pass: None picks the schedule, True demands the single-pass one (ValueError when it is not
    possible, saying why), False forces the two-phase one. Single-pass runs when
      - the entropy reference is a fixed number: `entropy_ref` is a float, or `entropy_gamma == 0`, or
        `adapt_low` and `adapt_high` are both False; and `loss_agg_mode` is not "none"; and there is no
        entropy mask (`entropy_mask_quantile` needs every entropy of the batch first); and
      - chunks can hold whole segments without reading anything back from the device:
        `granularity="token"` (chunks of `chunk_size` tokens; whole responses with a sequence-level
        rollout weight or the off-policy mask), or a padded (B, T, H) batch (chunks of
        whole rows), or a flat (N, H) batch of at most `chunk_size` tokens (one chunk), or a packed
        batch whose `cu_seqlens` is a CPU tensor (chunks of whole responses, planned on the host);
        and no response is longer than `chunk_size`.
    Otherwise the two-phase schedule runs (one more matmul per chunk, in the backward).

    Tensor parallel (docs/distributed.md): with `tp_group`, weight (and bias) are this rank's rows
    [vocab_start, vocab_start + V_local) of the output projection (vocab_start defaults to
    rank * V_local) and tokens are global ids; the two-phase schedule runs, with two collectives in the
    forward for the whole batch. The weight and bias gradients are those of the local slice; the
    hidden gradient is this rank's partial sum, or with `reduce_hidden_grad=True` its SUM over the
    group (one all-reduce of N x H in the backward). With the
    single-pass schedule the gradients are computed during the forward whenever an input requires
    grad and grad mode is on, and a second backward through the same graph is refused.
    """
    opts = SSPO_LOSS_FROM_HIDDEN_OPTIONS.parse("sspo_loss_from_hidden", options)
    cfg = config_of(opts)
    layout = hidden_layout(hidden, weight, bias, opts["cu_seqlens"])
    shard, reduce_group = None, None
    if opts["tp_group"] is None and flag("reduce_hidden_grad", opts["reduce_hidden_grad"]):
        raise ValueError("reduce_hidden_grad=True needs tp_group (it sums the hidden gradient over that group)")
    if opts["tp_group"] is not None or opts["vocab_start"] is not None:
        full = opts["boundary"].shape[0] if isinstance(opts["boundary"], torch.Tensor) else None
        shard = sharded_vocab(
            opts, layout.vocab_size, layout.device, resolve_backend_name(opts["backend"], layout.device), full
        )
        reduce_group = opts["tp_group"] if flag("reduce_hidden_grad", opts["reduce_hidden_grad"]) else None
        layout = replace(layout, vocab_size=full)  # tokens are global ids; the owner count checks them
        if opts["single_pass"] is True:
            raise ValueError("single_pass=True is not possible with tp_group: the statistics are merged over the group")
    batch = prepare_inputs(cfg, layout, tokens, old_logprobs, advantages, mask, **{k: opts[k] for k in INPUT_NAMES})
    chunk_size, single_pass = opts["chunk_size"], opts["single_pass"]
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if single_pass is not None and not isinstance(single_pass, bool):
        raise TypeError(f"single_pass must be a bool or None, got {type(single_pass).__name__}")
    # chunks are sized by this process's rows of the weight (its vocabulary slice under tensor parallelism)
    chunk = chunk_size or linear_chunk_tokens(weight.shape[0], layout.device, hidden.dtype)
    per_response = cfg.off_policy_mask is not None or (
        opts["rollout_logprobs"] is not None and cfg.rollout_is == "sequence"
    )
    plan = plan_chunks(
        cfg, layout.token_shape, opts["cu_seqlens"], chunk, False if shard else single_pass, per_response=per_response
    )
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "sspo_loss_from_hidden: %s schedule%s, %d chunks of up to %d rows, weight gradient: %s",
            "single-pass" if plan.single_pass else "two-phase", "" if plan.single_pass else f" ({plan.reason})",
            len(plan.bounds), chunk_rows(plan.bounds), weight_grad_path(layout.device, weight.dtype),
        )  # fmt: skip
    backend = get_backend(opts["backend"], layout.device, chunk_size=_vocab_rows(plan.bounds, layout.device))
    seg = batch_segment_ids(batch, cfg.granularity)
    args = (hidden.reshape(-1, hidden.shape[-1]), weight, bias, batch, seg, cfg, plan, backend, torch.is_grad_enabled())
    if shard is not None:
        loss, logp, entropy, *metrics = TwoPhaseFunction.apply(
            *args, replace(shard, chunk_size=_vocab_rows(plan.bounds, layout.device)), reduce_group
        )
    else:
        function = SinglePassFunction if plan.single_pass else TwoPhaseFunction
        loss, logp, entropy, *metrics = function.apply(*args)
    return make_output(cfg, batch, loss, logp, entropy, metrics)


class SSPOLossFromHidden(LossModule):
    """`sspo_loss_from_hidden` with its options held by the module.

    `SSPOLossFromHidden(granularity="subsentence", boundary=table, eps_low=..., ...)(hidden, weight,
    tokens, old_logprobs, advantages, mask, bias=lm_head.bias, cu_seqlens=...)`: per-call tensors and
    normalisers go to `forward`, every other option to the constructor.
    """

    LOSS = sspo_loss_from_hidden
    OPTIONS = SSPO_LOSS_FROM_HIDDEN_OPTIONS
