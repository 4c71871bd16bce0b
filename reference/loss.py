"""The slow, obviously-correct reference of the loss defined in docs/loss.md.

Everything is computed in float64 with plain PyTorch autograd; segments and responses are walked
with Python loops so the code reads like docs/loss.md. It is the oracle every fast path is tested
against, so clarity wins over speed everywhere here. The kernels never import this package.
"""

from __future__ import annotations

from typing import Any

import torch

from sspo_kernels._options import LOSS_OPTIONS, OptionSet, config_of
from sspo_kernels._types import FlatBatch, LossConfig, SSPOOutput
from sspo_kernels._validate import logits_layout, prepare_inputs

REFERENCE_OPTIONS = OptionSet(LOSS_OPTIONS)


def naive_logprob_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """l_t = log softmax(z_t / tau)[y_t] and H_t = -sum_v p log p, in float64 (docs/loss.md "Token quantities").

    logits (..., V) any float dtype; tokens (...) int (ids outside [0, V) give l_t = 0 there).
    """
    z = logits.double() / temperature
    log_p = torch.log_softmax(z, dim=-1)
    valid = (tokens >= 0) & (tokens < z.shape[-1])
    safe = torch.where(valid, tokens, torch.zeros_like(tokens)).long()
    logp = log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid
    # a -inf logit is a probability of exactly 0: its term 0 * log 0 is 0, not NaN
    entropy = -(log_p.exp() * torch.where(log_p == -torch.inf, 0.0, log_p)).sum(-1)
    return logp, entropy


def naive_segments(batch: FlatBatch, granularity: str) -> list[list[int]]:
    """The segments as lists of token indices, by walking each response token by token (docs/loss.md "Segments")."""
    mask = batch.mask.tolist()
    responses = batch.response_ids.tolist()
    tokens = batch.tokens.tolist()
    ids = batch.segment_ids.tolist() if batch.segment_ids is not None else None
    is_boundary = batch.boundary.tolist() if batch.boundary is not None else None

    segments: list[list[int]] = []
    current: list[int] = []
    prev_response = None
    for t in range(len(mask)):
        if not mask[t]:
            continue  # masked-out tokens belong to no segment and do not break one
        starts_new = (
            not current
            or responses[t] != prev_response
            or granularity == "token"
            or (granularity in ("subsentence", "sentence") and is_boundary[tokens[current[-1]]])
            or (granularity == "segments" and ids[t] != ids[current[-1]])
        )
        if starts_new and current:
            segments.append(current)
            current = []
        current.append(t)
        prev_response = responses[t]
    if current:
        segments.append(current)
    return segments


def naive_segment_ids(batch: FlatBatch, granularity: str) -> torch.Tensor:
    """Segment index of each token (0, 1, ... in token order), -1 where masked out."""
    ids = torch.full((batch.num_tokens,), -1, dtype=torch.int64)
    for s, members in enumerate(naive_segments(batch, granularity)):
        ids[members] = s
    return ids


def _token_weights(batch: FlatBatch, cfg: LossConfig) -> torch.Tensor:
    """Aggregation weight w_t of every token (docs/loss.md "Aggregation"); 0 where masked out."""
    mask = batch.mask.double()
    n_tokens = mask.sum()
    per_response = torch.zeros(batch.num_responses, dtype=torch.float64)
    for t in range(batch.num_tokens):
        per_response[batch.response_ids[t]] += mask[t]
    nonempty = (per_response > 0).sum().double()
    given = None if batch.normalizer is None else batch.normalizer.double().cpu()

    mode = cfg.loss_agg_mode
    if mode == "token-mean":
        denom = given if given is not None else n_tokens.clamp(min=1)
        return mask / denom
    if mode in ("sum", "none"):
        return mask.clone()
    responses = given if given is not None else nonempty.clamp(min=1)
    if mode == "seq-mean-token-sum":
        return mask / responses
    if mode == "seq-mean-token-sum-norm":
        return mask / (responses * batch.norm_len)
    # seq-mean-token-mean: each non-empty response's token-mean, averaged over responses
    n_of_token = per_response[batch.response_ids].clamp(min=1)
    return mask / (n_of_token * responses)


@REFERENCE_OPTIONS.signature
def sspo_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    **options: Any,
) -> SSPOOutput:
    """The SSPO/GSPO/GRPO policy loss of docs/loss.md, in float64 with autograd. The options are
    `sspo_kernels.sspo_loss`'s loss options (README "API")."""
    opts = REFERENCE_OPTIONS.parse("reference.sspo_loss", options)
    cfg = config_of(opts)
    logits, layout = logits_layout(logits)
    batch = prepare_inputs(
        cfg, layout, tokens, old_logprobs, advantages, mask,
        **{k: opts[k] for k in ("boundary", "segment_ids", "cu_seqlens", "ref_logprobs", "normalizer", "norm_len")},
    )  # fmt: skip
    device = layout.device
    logits = logits.cpu().reshape(-1, logits.shape[-1])
    batch = _to_cpu(batch)

    logp, entropy = naive_logprob_entropy(logits, batch.tokens, cfg.temperature)
    mask = batch.mask
    zero = torch.zeros((), dtype=torch.float64)

    def masked(x: torch.Tensor) -> torch.Tensor:  # zero where masked out, whatever x holds there
        return torch.where(mask, x, zero)

    old = logp.detach() if batch.old_logprobs is None else batch.old_logprobs.double()  # None: on-policy
    adv = batch.advantages.double()
    c = cfg.log_ratio_clamp
    n_tokens = int(mask.sum())

    if isinstance(cfg.entropy_ref, float):
        h_ref = torch.tensor(cfg.entropy_ref, dtype=torch.float64)
    elif isinstance(cfg.entropy_ref, torch.Tensor):  # a shared value, e.g. distributed.global_entropy_mean
        h_ref = cfg.entropy_ref.detach().double().reshape(())
    else:
        h_ref = masked(entropy.detach()).sum() / max(n_tokens, 1)

    per_token = masked(logp) * 0.0  # zeros still attached to the graph, so an empty batch has a gradient
    clipped_low = torch.zeros(batch.num_tokens, dtype=torch.bool)
    clipped_high = torch.zeros(batch.num_tokens, dtype=torch.bool)
    ratios = []
    segments = naive_segments(batch, cfg.granularity)
    for members in segments:
        idx = torch.tensor(members)
        d_raw = (logp[idx] - old[idx]).mean()  # length-normalised log-ratio
        rho = d_raw.clamp(-c, c).exp()
        ratios.append(rho.detach())

        h_bar = entropy[idx].detach().mean()
        if cfg.entropy_gamma == 0 or h_ref == 0:
            k = torch.tensor(1.0, dtype=torch.float64)
        else:
            k = ((h_bar / h_ref) ** cfg.entropy_gamma).clamp(cfg.k_min, cfg.k_max)
        lo = 1 - cfg.eps_low * (k if cfg.adapt_low else 1.0)
        hi = 1 + cfg.eps_high * (k if cfg.adapt_high else 1.0)

        if cfg.ratio_grad == "token":
            # GSPO-token: value rho_s, gradient rho_s * dl_t, zero where the clamp binds
            ratio = (d_raw.detach() + logp[idx] - logp[idx].detach()).clamp(-c, c).exp()
        else:
            ratio = rho.expand(len(members))
        a = adv[idx]
        loss_t = torch.maximum(-a * ratio, -a * ratio.clamp(lo, hi))
        if cfg.dual_clip is not None:
            loss_t = torch.where(a < 0, torch.minimum(loss_t, -a * cfg.dual_clip), loss_t)
        per_token = per_token.index_put((idx,), loss_t)
        clipped_low[idx] = (a < 0) & (rho.detach() < lo)
        clipped_high[idx] = (a > 0) & (rho.detach() > hi)

    if cfg.beta > 0:
        diff = masked(batch.ref_logprobs.double() - logp)  # masked before exp: no 0 * inf where masked out
        per_token = per_token + cfg.beta * masked(diff.exp() - diff - 1)
    if cfg.entropy_coef > 0:
        per_token = per_token - cfg.entropy_coef * masked(entropy)

    weights = _token_weights(batch, cfg)
    if cfg.loss_agg_mode == "none":
        loss = (per_token * weights).reshape(batch.token_shape)
    else:
        loss = (per_token * weights).sum()

    denom = max(n_tokens, 1)
    num_segments = len(segments)
    ratio_t = torch.stack(ratios) if ratios else torch.zeros(0, dtype=torch.float64)
    metrics = {
        "clip_frac_low": clipped_low.sum().double() / denom,
        "clip_frac_high": clipped_high.sum().double() / denom,
        "clip_frac": (clipped_low.sum() + clipped_high.sum()).double() / denom,
        "ratio_mean": ratio_t.mean() if num_segments else torch.tensor(0.0, dtype=torch.float64),
        "ratio_min": ratio_t.min() if num_segments else torch.tensor(0.0, dtype=torch.float64),
        "ratio_max": ratio_t.max() if num_segments else torch.tensor(0.0, dtype=torch.float64),
        "entropy_mean": masked(entropy.detach()).sum() / denom,
        "approx_kl": masked(old - logp.detach()).sum() / denom,
        "num_segments": torch.tensor(num_segments, dtype=torch.int64),
        "mean_segment_len": torch.tensor(n_tokens / max(num_segments, 1), dtype=torch.float64),
    }
    shape = batch.token_shape
    return SSPOOutput(
        loss=loss.to(device),
        logprobs=masked(logp.detach()).reshape(shape).to(device),
        entropy=masked(entropy.detach()).reshape(shape).to(device),
        metrics={k: v.detach().to(device) for k, v in metrics.items()},
    )


def _to_cpu(batch: FlatBatch) -> FlatBatch:
    """The reference runs on the CPU; gradients still flow back to the caller's logits."""
    moved = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
    return FlatBatch(**moved)
