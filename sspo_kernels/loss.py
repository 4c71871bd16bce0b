"""`sspo_loss`: the SSPO / GSPO / GRPO policy loss from logits, with fused vocabulary passes.

Three steps, each O(1) passes over the `(N, V)` logits and nothing `(N, V)`-sized in fp32:
  1. the vocabulary pass (`ops/logprob_entropy*.py`): per-token log p, entropy and lse in fp32;
  2. the segment step (`ops/objective.py`): segment ratios, adaptive clip bounds, the loss, the
     metrics and per-token gradient coefficients, all O(N);
  3. in backward, one more vocabulary pass that writes dLoss/dlogits (into the logits buffer
     itself with `inplace_backward=True`).
"""

from __future__ import annotations

import functools
import os

import torch

from sspo_kernels._checks import (
    FlatBatch,
    LossConfig,
    SSPOOutput,
    config_from,
    make_config,
    prepare_inputs,
    response_layout,
)
from sspo_kernels.ops.objective import finalize_metrics, objective_bwd, objective_fwd
from sspo_kernels.ops.segment import compute_segment_ids

BACKENDS = ("auto", "triton", "torch")
METRIC_NAMES = (
    "clip_frac_low",
    "clip_frac_high",
    "clip_frac",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "entropy_mean",
    "approx_kl",
    "num_segments",
    "mean_segment_len",
)


def resolve_backend(backend: str, device: torch.device) -> bool:
    """True when the Triton kernels run: CUDA tensors under "auto", or "triton" explicitly."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                'backend="triton" needs CUDA tensors; on the CPU set TRITON_INTERPRET=1 before importing '
                'sspo_kernels to run the kernels in Triton\'s interpreter, or use backend="torch"'
            )
        return True
    return device.type == "cuda" and _triton_available()


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def vocab_pass(use_triton: bool, chunk_size: int | None = None, compile_chunks: bool = False):
    """The (forward, backward) vocabulary-pass launchers of the chosen backend; `chunk_size` and
    `compile_chunks` (torch.compile of each chunk's maths) concern the torch backend only."""
    if use_triton:
        from sspo_kernels.ops import logprob_entropy as impl

        return impl.logprob_entropy_fwd, impl.logprob_entropy_bwd
    from sspo_kernels.ops import logprob_entropy_torch as impl

    fwd = functools.partial(impl.logprob_entropy_fwd, chunk_size=chunk_size, use_compile=compile_chunks)
    bwd = functools.partial(impl.logprob_entropy_bwd, chunk_size=chunk_size, use_compile=compile_chunks)
    return fwd, bwd


class SSPOLossFunction(torch.autograd.Function):
    """Differentiable in `logits` only; every other input is data."""

    @staticmethod
    def forward(ctx, logits, batch: FlatBatch, seg, cfg: LossConfig, use_triton, inplace, chunking):
        fwd, _ = vocab_pass(use_triton, *chunking)
        logp, entropy, lse = fwd(batch.logits, batch.tokens, batch.mask, cfg.temperature)
        step = objective_fwd(logp, entropy, seg, batch, cfg, use_triton=use_triton)
        ctx.save_for_backward(batch.logits, batch.tokens, batch.mask, lse, entropy, logp, *step.saved)
        ctx.cfg, ctx.use_triton, ctx.inplace, ctx.chunking = cfg, use_triton, inplace, chunking
        finished = finalize_metrics(step.metric_sums)
        metrics = tuple(finished[name] for name in METRIC_NAMES)
        ctx.mark_non_differentiable(logp, entropy, *metrics)
        return (step.loss, logp, entropy, *metrics)

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        logits, tokens, mask, lse, entropy, logp, *saved = ctx.saved_tensors
        grad_logp, grad_entropy = objective_bwd(saved, grad_loss, ctx.cfg, use_triton=ctx.use_triton)
        _, bwd = vocab_pass(ctx.use_triton, *ctx.chunking)
        # the forward's logp lets the Triton pass take p relative to the target logit (exact for large
        # logits); no entropy term at all when the entropy bonus is off
        grad = bwd(
            logits, tokens, mask, lse, entropy, grad_logp, grad_entropy if ctx.cfg.entropy_coef > 0 else None,
            ctx.cfg.temperature, inplace=ctx.inplace, logp=logp,
        )  # fmt: skip
        return grad, None, None, None, None, None, None


def sspo_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    granularity: str = "subsentence",
    boundary: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    eps_low: float | None = None,
    eps_high: float | None = None,
    entropy_gamma: float | None = None,
    k_min: float | None = None,
    k_max: float | None = None,
    entropy_ref: str | float = "batch",
    adapt_low: bool = True,
    adapt_high: bool = True,
    dual_clip: float | None = None,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg_mode: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    norm_len: int | float | None = None,
    log_ratio_clamp: float = 20.0,
    ratio_grad: str = "exact",
    inplace_backward: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    compile_chunks: bool = False,
) -> SSPOOutput:
    """The policy loss of SPEC.md from logits, differentiable in `logits`.

    logits: (B, T, V) padded, (N, V) one response, or (total, V) packed with `cu_seqlens` (B + 1,);
    bf16 / fp16 / fp32. tokens, old_logprobs, mask (and ref_logprobs, segment_ids) are shaped like
    logits without V; advantages per response (B,) or per token. Returns
    `SSPOOutput(loss, logprobs, entropy, metrics)`: the loss is a 0-d fp32 tensor (per-token for
    loss_agg_mode="none"); logprobs and entropy are fp32, detached, zero where masked out; metrics are
    detached device tensors. With `inplace_backward=True` the backward writes the gradient into the
    logits buffer (do not reuse the logits afterwards). `backend`: "triton", "torch" (chunked
    PyTorch; `chunk_size` rows per chunk, `compile_chunks=True` runs each chunk's maths through
    torch.compile) or "auto" (Triton for CUDA tensors, else torch).
    See the README for every option and its default.
    """
    cfg = config_from(locals())
    batch = prepare_inputs(
        cfg, logits, tokens, old_logprobs, advantages, mask, boundary=boundary, segment_ids=segment_ids,
        cu_seqlens=cu_seqlens, ref_logprobs=ref_logprobs, normalizer=normalizer, norm_len=norm_len,
    )  # fmt: skip
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(compile_chunks, bool):
        raise TypeError(f"compile_chunks must be a bool, got {type(compile_chunks).__name__}")
    use_triton = resolve_backend(backend, batch.logits.device)
    seg = compute_segment_ids(
        batch.tokens, batch.mask, batch.response_ids, cfg.granularity,
        boundary=batch.boundary, given_ids=batch.segment_ids,
    )  # fmt: skip
    loss, logp, entropy, *metrics = SSPOLossFunction.apply(
        logits, batch, seg, cfg, use_triton, inplace_backward, (chunk_size, compile_chunks)
    )
    shape = batch.token_shape
    if cfg.loss_agg_mode == "none":
        loss = loss.reshape(shape)
    return SSPOOutput(loss, logp.reshape(shape), entropy.reshape(shape), dict(zip(METRIC_NAMES, metrics)))


class LossModule(torch.nn.Module):
    """Base of the module forms: holds and validates the options of a loss function.

    Subclasses list in `EXTRA_OPTIONS` the keyword options they take beyond the `LossConfig` fields.
    """

    EXTRA_OPTIONS: frozenset[str] = frozenset()

    def __init__(self, granularity: str = "subsentence", *, boundary: torch.Tensor | None = None, **options):
        super().__init__()
        fields = LossConfig.__dataclass_fields__
        make_config(granularity, **{k: v for k, v in options.items() if k in fields})
        unknown = set(options) - set(fields) - self.EXTRA_OPTIONS
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected options: {', '.join(sorted(unknown))}")
        self.granularity = granularity
        self.options = options
        self.register_buffer("boundary", boundary, persistent=False)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"granularity={self.granularity!r}" + (f", {opts}" if opts else "")


class SSPOLoss(LossModule):
    """`sspo_loss` with its options held by the module.

    `SSPOLoss(granularity="subsentence", boundary=table, eps_low=..., ...)(logits, tokens,
    old_logprobs, advantages, mask, cu_seqlens=..., ref_logprobs=...)`; per-call tensors and
    normalisers go to `forward`, every other option to the constructor.
    """

    EXTRA_OPTIONS = frozenset({"inplace_backward", "backend", "chunk_size", "compile_chunks"})

    def forward(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        **per_call,
    ) -> SSPOOutput:
        return sspo_loss(
            logits, tokens, old_logprobs, advantages, mask,
            granularity=self.granularity, boundary=self.boundary, **self.options, **per_call,
        )  # fmt: skip


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
    if not isinstance(tokens, torch.Tensor) or tokens.dim() not in (1, 2) or tokens.is_floating_point():
        raise ValueError("tokens must be a (B, T) or (N,) integer tensor")
    if not isinstance(mask, torch.Tensor) or mask.shape != tokens.shape:
        raise ValueError(f"mask must be a tensor shaped like tokens {tuple(tokens.shape)}")
    if cfg.granularity in ("subsentence", "sentence"):
        if not isinstance(boundary, torch.Tensor) or boundary.dim() != 1 or boundary.dtype != torch.bool:
            raise ValueError(f"granularity={granularity!r} needs boundary, a (V,) bool table from boundary_table()")
        boundary = boundary.to(tokens.device)
    if cfg.granularity == "segments":
        if not isinstance(segment_ids, torch.Tensor) or segment_ids.shape != tokens.shape:
            raise ValueError('granularity="segments" needs segment_ids shaped like tokens')
        segment_ids = segment_ids.reshape(-1)
    _, _, response_ids = response_layout(tokens.shape, cu_seqlens, tokens.device)
    seg = compute_segment_ids(
        tokens.reshape(-1).long(), mask.reshape(-1) != 0, response_ids, cfg.granularity,
        boundary=boundary, given_ids=segment_ids,
    )  # fmt: skip
    return seg.to(torch.int32).reshape(tokens.shape)
