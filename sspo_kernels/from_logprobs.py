"""`sspo_loss_from_logprobs`: the segment step alone, on per-token log-probs a framework already
computed (its own vocabulary pass, e.g. verl's or TRL's fused log-prob heads).

The same options, outputs and definition as `sspo_loss`; the gradient flows to `logprobs` (and to
`entropy` when the entropy bonus is on and `entropy` requires grad).
"""

from __future__ import annotations

from typing import Any

import torch

from sspo_kernels._options import LOGPROBS_OPTIONS, LOSS_OPTIONS, OptionSet, config_of
from sspo_kernels._types import FlatBatch, LossConfig, SSPOOutput
from sspo_kernels._utils import on_ctx_device, on_input_device
from sspo_kernels._validate import logprobs_layout
from sspo_kernels.backend import Backend, get_backend
from sspo_kernels.loss import LossModule, batch_and_segments
from sspo_kernels.ops.objective import make_output, objective_bwd, segment_step

SSPO_LOSS_FROM_LOGPROBS_OPTIONS = OptionSet(LOSS_OPTIONS, LOGPROBS_OPTIONS)


class LogprobsLossFunction(torch.autograd.Function):
    """Differentiable in logprobs (N,) and entropy (N,); every other input is data."""

    @staticmethod
    @on_input_device
    def forward(ctx, logprobs, entropy, batch: FlatBatch, seg, cfg: LossConfig, backend: Backend):
        mask = batch.mask
        zero = torch.zeros((), dtype=torch.float32, device=mask.device)
        logp = torch.where(mask, logprobs.float(), zero)
        ent = torch.where(mask, entropy.float(), zero) if entropy is not None else torch.zeros_like(logp)
        loss, saved, metrics = segment_step(logp, ent, seg, batch, cfg, backend)  # seg None: fused
        ctx.save_for_backward(*saved)
        ctx.cfg, ctx.backend = cfg, backend
        ctx.dtypes = (logprobs.dtype, None if entropy is None else entropy.dtype)
        ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
        ctx.mark_non_differentiable(logp, ent, *metrics)
        return (loss, logp, ent, *metrics)

    @staticmethod
    @on_ctx_device
    def backward(ctx, grad_loss, *_unused):
        grad_logp, grad_entropy = objective_bwd(ctx.saved_tensors, grad_loss, ctx.cfg, ctx.backend)
        logp_dtype, entropy_dtype = ctx.dtypes
        if entropy_dtype is None or not ctx.needs_input_grad[1]:
            grad_entropy = None
        elif grad_entropy is None:
            grad_entropy = torch.zeros_like(grad_logp, dtype=entropy_dtype)
        else:
            grad_entropy = grad_entropy.to(entropy_dtype)
        return grad_logp.to(logp_dtype), grad_entropy, None, None, None, None


@SSPO_LOSS_FROM_LOGPROBS_OPTIONS.signature
def sspo_loss_from_logprobs(
    logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    tokens: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    **options: Any,
) -> SSPOOutput:
    """The loss of docs/loss.md from per-token log-probs l_t (differentiable) and entropies H_t.

    logprobs, entropy: (B, T) padded or (N,) flat / packed with `cu_seqlens`, any float dtype, at the
    sampling temperature already (so `temperature` must stay 1). `entropy` may be None when nothing
    needs it (no entropy adaptation of the clip bounds and no entropy bonus); it is needed for the
    adaptive clip as data and, with `entropy_coef > 0`, receives the bonus's gradient if it requires
    grad. Every other argument, option and the returned `SSPOOutput` are those of `sspo_loss`
    (`backend` picks the segment step's implementation; `boundary` bounds the token ids).
    """
    opts = SSPO_LOSS_FROM_LOGPROBS_OPTIONS.parse("sspo_loss_from_logprobs", options)
    cfg = config_of(opts)
    if cfg.temperature != 1.0:
        raise ValueError("temperature must be 1 here: the log-probs given are already at the sampling temperature")
    if cfg.logit_scale != 1.0 or cfg.logit_softcap is not None:
        raise ValueError("logit_scale and logit_softcap must keep their defaults here: the log-probs carry them")
    adapts = cfg.has_bounds and cfg.entropy_gamma != 0 and (cfg.adapt_low or cfg.adapt_high)
    if entropy is None and (adapts or cfg.entropy_coef > 0 or cfg.entropy_mask_quantile is not None):
        raise ValueError(
            "entropy is needed for the entropy-adaptive clip bounds, the entropy bonus and the entropy mask"
        )
    layout = logprobs_layout(logprobs, entropy)
    backend = get_backend(opts["backend"], layout.device)
    batch, seg = batch_and_segments(cfg, layout, backend, opts, tokens, old_logprobs, advantages, mask)
    flat = lambda t: None if t is None else t.reshape(-1)
    loss, logp, ent, *metrics = LogprobsLossFunction.apply(flat(logprobs), flat(entropy), batch, seg, cfg, backend)
    return make_output(cfg, batch, loss, logp, ent, metrics)


class SSPOLossFromLogprobs(LossModule):
    """`sspo_loss_from_logprobs` with its options held by the module (per-call tensors go to `forward`)."""

    LOSS = sspo_loss_from_logprobs
    OPTIONS = SSPO_LOSS_FROM_LOGPROBS_OPTIONS
