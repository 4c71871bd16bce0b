"""`token_logprobs`, `token_logprobs_from_hidden`: per-token log-probs and entropies as a differentiable op.

What every trainer computes outside its loss (old-policy and reference passes, verl's actor forward, TRL's
fused head): l_t = log softmax(z_t)[y_t] and H_t = -sum_v p_t,v log p_t,v with z_t = x_t / tau, in fp32,
from logits x_t or from the last hidden states and the output projection, x_t = W h_t + b, without ever
holding the `(N, V)` logits (docs/loss.md "Token quantities"). The kernels are the loss's vocabulary
passes (`ops/vocab/`, through a `Backend` or the tensor-parallel `ShardedVocab`); this module holds the
two autograd Functions and the two public functions.

Gradients: for upstream G_t = dLoss/dl_t and E_t = dLoss/dH_t (either may be None), the backward is the
vocabulary pass's, dLoss/dx_t,v = (1/tau) (G_t ([v = y_t] - p_v) - E_t p_v (log p_v + H_t)), then, from
hidden states, dh = dx W, dW = sum_t dx_t h_t^T and db = sum_t dx_t (fp32 accumulators). Token id -100
marks an ignored position (frameworks pad labels with it): its outputs are 0 and it gets no gradient.

Schedules: under `torch.no_grad()` (or when no input requires grad) nothing is saved; the logits are read
once, and from hidden states each chunk costs one GEMM and one vocabulary pass. With grad, the forward
keeps O(N) fp32 statistics; from hidden states the backward recomputes each chunk's logits (4 GEMMs in
all, as verl's and TRL's fused heads do), writes dlogits over them in place and turns them into the
three gradients. No host sync on CUDA: chunk bounds come from shapes and token checks run on the device.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sspo_kernels._options import check_temperature, finite_number, flag
from sspo_kernels._parallel import reduce_hidden, sharded_vocab
from sspo_kernels._types import VocabStats
from sspo_kernels._utils import device_guard, new_empty, on_ctx_device, on_input_device
from sspo_kernels._validate import _token_tensor, device_check, hidden_layout, logits_layout
from sspo_kernels.backend import get_backend, resolve_backend_name
from sspo_kernels.ops.linear import LinearGrads, chunk_logits, chunk_rows, linear_chunk_tokens, logits_buffer
from sspo_kernels.ops.vocab.sharded import ShardedVocab

__all__ = ["IGNORE_INDEX", "token_logprobs", "token_logprobs_from_hidden"]

IGNORE_INDEX = -100  # a token id that marks an ignored position: outputs 0, no gradient


def _flat_tokens(tokens: object, token_shape: tuple[int, ...], device: torch.device, bound: int | None):
    """(N,) int64 tokens and the (N,) bool mask `tokens != -100`; every other id must lie in [0, bound)
    (checked on the device; under tensor parallelism, bound None, the merge's owner count checks it)."""
    flat = _token_tensor("tokens", tokens, torch.Size(token_shape), device, "int").long()
    mask = flat != IGNORE_INDEX
    if bound is not None:
        ok = ((flat >= 0) & (flat < bound)) | ~mask
        device_check(ok.all(), f"tokens must lie in [0, {bound}) or be {IGNORE_INDEX} (an ignored position)")
    return flat, mask


def _wants_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _upstream(grad_logp: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """dLoss/dl_t as (N,) fp32 (zeros when only the entropy has a gradient)."""
    if grad_logp is None:
        return torch.zeros(n, dtype=torch.float32, device=device)
    return grad_logp.reshape(-1).float()


def _stats_from_hidden(hidden, weight, bias, tokens, mask, tau: float, transform, bounds, vocab, *, keep_rows: bool):
    """The per-token statistics of z = (hidden @ weight.T + bias) / tau, one chunk of rows at a time in one
    reused logits buffer: a `VocabStats` from a `Backend`, or the merged `ShardedStats` of a `ShardedVocab`
    (its partial statistics of every chunk, then the 2 collectives once for the whole batch)."""
    n, device = tokens.shape[0], hidden.device
    sharded = isinstance(vocab, ShardedVocab)
    if sharded:
        partial = new_empty((n, 5), torch.float32, device)
    else:
        stats = VocabStats(*(new_empty((n,), torch.float32, device) for _ in range(3)))
    buffer = logits_buffer(chunk_rows(bounds), hidden, weight)
    for s, e in bounds:
        logits = chunk_logits(hidden[s:e], weight, bias, buffer)
        if sharded:
            partial[s:e] = vocab.partial(logits, tokens[s:e], mask[s:e], tau)
            continue
        chunk = vocab.vocab_fwd(logits, tokens[s:e], mask[s:e], tau, **transform)
        if keep_rows and chunk.rows is not None and stats.rows is None:  # the torch pass's row statistics
            stats = stats._replace(rows=chunk.rows.new_empty((*chunk.rows.shape[:-1], n)))
        for out, value in zip(stats, chunk):
            if out is not None and value is not None:
                out[..., s:e] = value
    del buffer
    return vocab.merge(partial, mask) if sharded else stats


# ---------------------------------------------------------------- autograd Functions


class TokenLogprobsFunction(torch.autograd.Function):
    """(logp, entropy) (N,) fp32 of logits (N, V) or (B, T, V); differentiable in logits only.
    `vocab`: a `Backend` or a tensor-parallel `ShardedVocab` (logits then hold this rank's columns)."""

    @staticmethod
    @on_input_device
    def forward(ctx, logits, tokens, mask, temperature: float, transform: dict, vocab, inplace: bool):
        stats = vocab.vocab_fwd(logits, tokens, mask, temperature, **transform)
        ctx.save_for_backward(logits, tokens, mask, *stats)
        ctx.temperature, ctx.vocab, ctx.inplace, ctx.stats_type = temperature, vocab, inplace, type(stats)
        ctx.transform = transform
        ctx.set_materialize_grads(False)  # an output without a gradient arrives as None
        return stats.logp, stats.entropy

    @staticmethod
    @on_ctx_device
    def backward(ctx, grad_logp, grad_entropy):
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        logits, tokens, mask, *stats = ctx.saved_tensors
        g = _upstream(grad_logp, tokens.shape[0], logits.device)
        e = None if grad_entropy is None else grad_entropy.reshape(-1)
        grad = ctx.vocab.vocab_bwd(
            logits, tokens, mask, ctx.stats_type(*stats), g, e, ctx.temperature, inplace=ctx.inplace, **ctx.transform
        )
        return grad, None, None, None, None, None, None


class TokenLogprobsFromHiddenFunction(torch.autograd.Function):
    """(logp, entropy) (N,) fp32 of z = (hidden @ weight.T + bias) / tau, chunk by chunk; differentiable in
    hidden (N, H), weight (V, H) and bias (V,). Backward: recompute each chunk's logits, dlogits in place,
    the three gradients (weight and bias summed in fp32). `vocab`: a `Backend` or a `ShardedVocab` (weight
    and bias are then this rank's rows; `reduce_group` SUMs the hidden gradient over it when given)."""

    @staticmethod
    @on_input_device
    def forward(ctx, hidden, weight, bias, tokens, mask, temperature: float, transform, bounds, vocab, reduce_group):
        stats = _stats_from_hidden(
            hidden, weight, bias, tokens, mask, temperature, transform, bounds, vocab, keep_rows=True
        )
        ctx.save_for_backward(hidden, weight, bias, tokens, mask, *stats)
        ctx.temperature, ctx.bounds, ctx.vocab, ctx.reduce_group = temperature, bounds, vocab, reduce_group
        ctx.transform = transform
        ctx.stats_type = type(stats)
        ctx.set_materialize_grads(False)
        return stats.logp, stats.entropy

    @staticmethod
    @on_ctx_device
    def backward(ctx, grad_logp, grad_entropy):
        none = (None,) * 7
        if grad_logp is None and grad_entropy is None:
            return (None, None, None, *none)
        hidden, weight, bias, tokens, mask, *stats = ctx.saved_tensors
        g = _upstream(grad_logp, tokens.shape[0], hidden.device)
        e = None if grad_entropy is None else grad_entropy.reshape(-1)
        grads = LinearGrads.empty(hidden, weight, bias, tuple(bool(x) for x in ctx.needs_input_grad[:3]))
        buffer = logits_buffer(chunk_rows(ctx.bounds), hidden, weight)
        for s, end in ctx.bounds:
            logits = chunk_logits(hidden[s:end], weight, bias, buffer)
            rows = ctx.stats_type(*(None if t is None else t[..., s:end] for t in stats))
            dlogits = ctx.vocab.vocab_bwd(
                logits, tokens[s:end], mask[s:end], rows, g[s:end], None if e is None else e[s:end],
                ctx.temperature, inplace=True, **ctx.transform,
            )  # fmt: skip
            grads.add_chunk(dlogits, hidden[s:end], mask[s:end], weight, s, end)
            del logits, dlogits
        del buffer
        if ctx.reduce_group is not None:  # reduce_hidden_grad=True: the full hidden gradient on every rank
            reduce_hidden(grads.hidden, ctx.reduce_group)
        return (*grads.finish(None, hidden, weight, bias), *none)


# ---------------------------------------------------------------- public API


def _tp_vocab(
    tp_group: Any, vocab_start: int | None, v_local: int, device: torch.device, backend: str, rows, transform
):
    """The tensor-parallel vocabulary pass (None without `tp_group`); a logit transform is refused there."""
    opts = {"tp_group": tp_group, "vocab_start": vocab_start, "chunk_size": rows}
    opts.update(logit_scale=transform["scale"], logit_softcap=transform["softcap"])
    return sharded_vocab(opts, v_local, device, resolve_backend_name(backend, device), None)


def _transform(scale: object, softcap: object) -> dict:
    """The vocabulary pass's logit transform keywords, checked (a finite scale, a soft-cap > 0 or None)."""
    return {
        "scale": finite_number("logit_scale", scale),
        "softcap": None if softcap is None else finite_number("logit_softcap", softcap, positive=True),
    }


def _outputs(logp: torch.Tensor, ent: torch.Tensor, shape: tuple[int, ...], entropy: bool):
    return logp.reshape(shape), ent.reshape(shape) if entropy else None


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = True,
    inplace_backward: bool = False,
    backend: str = "auto",
    tp_group: Any = None,
    vocab_start: int | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-prob l_t = log softmax(z_t)[tokens_t] and entropy H_t, in fp32, with z_t = logits_t /
    temperature (after `logit_scale` and the `logit_softcap` s * tanh(. / s): docs/loss.md "Token quantities").

    logits: (N, V) or (B, T, V), bf16 / fp16 / fp32 (fp64 is read and computed in fp32), any strides
        (a last stride other than 1 costs a copy). tokens: integer ids shaped like logits without V;
        -100 marks an ignored position (outputs 0, zero gradient); any other id outside [0, V) is a
        ValueError on the CPU, a device-side assert on CUDA.
    Returns (logprobs, entropy): fp32, shaped like tokens; entropy is None with `entropy=False`. Both are
    differentiable in logits, with any upstream gradients (either may be None). Under torch.no_grad()
    nothing is saved and the logits are read once.
    inplace_backward: the backward writes dLoss/dlogits over the logits buffer (do not reuse the logits).
    backend: "triton" (fused kernels), "torch" (chunked PyTorch), "auto" (Triton for CUDA tensors).
    tp_group, vocab_start: logits are this rank's vocabulary columns [vocab_start, vocab_start + V_local)
        (default rank * V_local) and tokens global ids; every rank gets the full-vocabulary outputs, the
        backward the gradient of its own columns. 2 collectives in the forward, none in the backward.
    """
    tau = check_temperature(temperature)
    transform = _transform(logit_scale, logit_softcap)
    want_entropy = flag("entropy", entropy)
    inplace = flag("inplace_backward", inplace_backward)
    logits, layout = logits_layout(logits)
    if tp_group is None and vocab_start is not None:
        raise ValueError("vocab_start is given without tp_group")
    vocab = get_backend(backend, layout.device)
    if tp_group is not None:
        vocab = _tp_vocab(tp_group, vocab_start, layout.vocab_size, layout.device, backend, None, transform)
    flat, mask = _flat_tokens(tokens, layout.token_shape, layout.device, None if tp_group else layout.vocab_size)
    if _wants_graph(logits):
        logp, ent = TokenLogprobsFunction.apply(logits, flat, mask, tau, transform, vocab, inplace)
    else:
        with device_guard(layout.device):
            stats = vocab.vocab_fwd(logits.detach(), flat, mask, tau, **transform)
        logp, ent = stats.logp, stats.entropy
    return _outputs(logp, ent, layout.token_shape, want_entropy)


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    entropy: bool = True,
    tp_group: Any = None,
    vocab_start: int | None = None,
    reduce_hidden_grad: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` of the logits z_t = weight @ hidden_t + bias, without building them for all tokens.

    hidden: (N, H) or (B, T, H), bf16 / fp16 / fp32; weight (V, H) and bias (V,) in hidden's dtype and
    device; tokens shaped like hidden without H (-100: an ignored position). Returns (logprobs, entropy),
    fp32, shaped like tokens (entropy None with `entropy=False`), differentiable in hidden, weight and bias
    for any upstream gradients (the parameter gradients are summed in fp32 and returned in their dtype; a
    NaN hidden state at an ignored position reaches none of them).
    chunk_size: tokens per chunk (default `linear_chunk_tokens(V_local, device, dtype)`: 32 MiB of fp32
    logits on the CPU); peak extra memory is one
    chunk's logits plus the gradients, never anything (N, V). Under torch.no_grad() nothing is saved and
    each chunk costs one GEMM and one vocabulary pass; with grad the backward recomputes each chunk's
    logits (one more GEMM) before the two gradient GEMMs.
    tp_group, vocab_start: weight and bias are this rank's rows [vocab_start, vocab_start + V_local)
    (Megatron's vocab-parallel head; tokens are global ids); 2 collectives in the forward for the whole
    batch. weight.grad and bias.grad are those of the local rows; hidden.grad is this rank's partial sum
    (what verl's and Megatron's `linear_cross_entropy` return), or its SUM over the group with
    `reduce_hidden_grad=True` (one N x H all-reduce in the backward).
    backend: as in `token_logprobs`.
    """
    tau = check_temperature(temperature)
    transform = _transform(logit_scale, logit_softcap)
    want_entropy = flag("entropy", entropy)
    layout = hidden_layout(hidden, weight, bias, None)
    reduce = flag("reduce_hidden_grad", reduce_hidden_grad)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if tp_group is None and (vocab_start is not None or reduce):
        raise ValueError(f"{'vocab_start' if vocab_start is not None else 'reduce_hidden_grad=True'} needs tp_group")
    n = math.prod(layout.token_shape)
    # chunks are sized by this process's rows of the weight (its vocabulary slice under tensor parallelism)
    chunk = chunk_size or linear_chunk_tokens(weight.shape[0], layout.device, hidden.dtype)
    bounds = tuple((s, min(s + chunk, n)) for s in range(0, n, chunk)) or ((0, 0),)
    # rows per step of the torch vocabulary pass: the whole chunk on a GPU, its own cache-sized steps on the CPU
    rows = chunk_rows(bounds) if layout.device.type == "cuda" else None
    vocab = get_backend(backend, layout.device, chunk_size=rows)
    if tp_group is not None:
        vocab = _tp_vocab(tp_group, vocab_start, layout.vocab_size, layout.device, backend, rows, transform)
    flat, mask = _flat_tokens(tokens, layout.token_shape, layout.device, None if tp_group else layout.vocab_size)
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    if _wants_graph(hidden, weight, bias):
        group = tp_group if reduce else None
        logp, ent = TokenLogprobsFromHiddenFunction.apply(
            hidden2, weight, bias, flat, mask, tau, transform, bounds, vocab, group
        )
    else:
        with device_guard(layout.device), torch.no_grad():
            stats = _stats_from_hidden(
                hidden2, weight, bias, flat, mask, tau, transform, bounds, vocab, keep_rows=False
            )
        logp, ent = stats.logp, stats.entropy
    return _outputs(logp, ent, layout.token_shape, want_entropy)
