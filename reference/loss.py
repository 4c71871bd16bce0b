"""The slow, obviously-correct reference of the loss defined in docs/loss.md.

Everything is computed in float64 with plain PyTorch autograd; segments and responses are walked
with Python loops so the code reads like docs/loss.md. It is the oracle every fast path is tested
against, so clarity wins over speed everywhere here. The kernels never import this package.
"""

from __future__ import annotations

from typing import Any

import torch

from reference.corrections import Corrections, corrections
from reference.objectives import OBJECTIVES, Segment
from sspo_kernels._options import LOSS_OPTIONS, OptionSet, config_of
from sspo_kernels._types import FlatBatch, LossConfig, SSPOOutput
from sspo_kernels._validate import logits_layout, prepare_inputs

REFERENCE_OPTIONS = OptionSet(LOSS_OPTIONS)


def naive_logprob_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """l_t = log softmax(z_t)[y_t] and H_t = -sum_v p log p, in float64 (docs/loss.md "Token quantities"),
    with z = scale * logits, soft-capped to s * tanh(z / s) when `softcap` = s is given, then / tau.

    logits (..., V) any float dtype; tokens (...) int (ids outside [0, V) give l_t = 0 there).
    """
    u = logits.double() * scale
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    z = u / temperature
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
        **{k: opts[k] for k in ("boundary", "segment_ids", "cu_seqlens", "ref_logprobs", "normalizer", "norm_len",
                                "policy_weights", "rollout_logprobs", "entropy_mask_group")},
    )  # fmt: skip
    device = layout.device
    logits = logits.cpu().reshape(-1, logits.shape[-1])
    batch = _to_cpu(batch)

    logp, entropy = naive_logprob_entropy(logits, batch.tokens, cfg.temperature, cfg.logit_scale, cfg.logit_softcap)
    mask = batch.mask
    zero = torch.zeros((), dtype=torch.float64)

    def masked(x: torch.Tensor) -> torch.Tensor:  # zero where masked out, whatever x holds there
        return torch.where(mask, x, zero)

    old = logp.detach() if batch.old_logprobs is None else batch.old_logprobs.double()  # None: on-policy
    adv = batch.advantages.double()
    n_tokens = int(mask.sum())

    if isinstance(cfg.entropy_ref, float):
        h_ref = torch.tensor(cfg.entropy_ref, dtype=torch.float64)
    elif isinstance(cfg.entropy_ref, torch.Tensor):  # a shared value, e.g. distributed.global_entropy_mean
        h_ref = cfg.entropy_ref.detach().double().reshape(())
    else:
        h_ref = masked(entropy.detach()).sum() / max(n_tokens, 1)

    segments = naive_segments(batch, cfg.granularity)
    corr = corrections(batch, cfg, segments, logp, old, adv, entropy)  # W_t and the masks, all data
    objective = OBJECTIVES[cfg.objective]

    per_token = masked(logp) * 0.0  # zeros still attached to the graph, so an empty batch has a gradient
    kl_ratio = torch.ones(batch.num_tokens, dtype=torch.float64)  # R_t, for kl_ratio_weight
    flags = {name: torch.zeros(batch.num_tokens, dtype=torch.bool) for name in ("low", "high", "dual")}
    ratios, phis = [], []
    for members in segments:
        idx = torch.tensor(members)
        h_bar = entropy[idx].detach().mean()
        if cfg.entropy_gamma == 0 or h_ref == 0:
            k = torch.tensor(1.0, dtype=torch.float64)
        else:
            k = ((h_bar / h_ref) ** cfg.entropy_gamma).clamp(cfg.k_min, cfg.k_max)
        lo = 1 - cfg.eps_low * (k if cfg.adapt_low else 1.0)
        hi = 1 + cfg.eps_high * (k if cfg.adapt_high else 1.0)
        log_is = None if corr.log_is is None else corr.log_is[idx]
        terms = objective(Segment(logp[idx], old[idx], adv[idx], k, lo, hi, log_is), cfg)

        per_token = per_token.index_put((idx,), corr.weight[idx] * terms.policy)
        kl_ratio = kl_ratio.index_put((idx,), terms.ratio)
        ratios.append(terms.ratio_value)
        flags["low"][idx] = terms.clipped_low
        flags["high"][idx] = terms.clipped_high
        if terms.dual_clipped is not None:
            flags["dual"][idx] = terms.dual_clipped
        if terms.phi is not None:
            phis.append(terms.phi[0])  # phi at the segment's first masked-in token

    if cfg.beta > 0:
        diff = masked(batch.ref_logprobs.double() - logp)  # masked before exp: no 0 * inf where masked out
        kl = masked(diff.exp() - diff - 1)
        per_token = per_token + cfg.beta * (masked(kl_ratio * kl) if cfg.kl_ratio_weight else kl)
    if cfg.entropy_coef > 0:
        per_token = per_token - cfg.entropy_coef * masked(entropy)

    weights = _token_weights(batch, cfg)
    if cfg.loss_agg_mode == "none":
        loss = (per_token * weights).reshape(batch.token_shape)
    else:
        loss = (per_token * weights).sum()

    metrics = _metrics(batch, cfg, logp, old, entropy, ratios, phis, flags, corr)
    shape = batch.token_shape
    return SSPOOutput(
        loss=loss.to(device),
        logprobs=masked(logp.detach()).reshape(shape).to(device),
        entropy=masked(entropy.detach()).reshape(shape).to(device),
        metrics={k: v.detach().to(device) for k, v in metrics.items()},
    )


def _metrics(
    batch: FlatBatch,
    cfg: LossConfig,
    logp: torch.Tensor,
    old: torch.Tensor,
    entropy: torch.Tensor,
    ratios: list[torch.Tensor],
    phis: list[torch.Tensor],
    flags: dict[str, torch.Tensor],
    corr: Corrections,
) -> dict[str, torch.Tensor]:
    """Every metric of docs/loss.md "Outputs", in METRIC_NAMES order (all 0 without a masked-in token)."""
    mask = batch.mask
    n_tokens = int(mask.sum())
    denom = max(n_tokens, 1)
    zero = torch.tensor(0.0, dtype=torch.float64)
    num_segments = len(ratios)
    ratio_t = torch.stack(ratios) if ratios else torch.zeros(0, dtype=torch.float64)

    def frac(flag: torch.Tensor) -> torch.Tensor:  # share of the masked-in tokens
        return (flag & mask).sum().double() / denom

    is_in = corr.is_weight[mask]
    return {
        "clip_frac_low": frac(flags["low"]),
        "clip_frac_high": frac(flags["high"]),
        "clip_frac": ((flags["low"] & mask).sum() + (flags["high"] & mask).sum()).double() / denom,
        "ratio_mean": ratio_t.mean() if num_segments else zero,
        "ratio_min": ratio_t.min() if num_segments else zero,
        "ratio_max": ratio_t.max() if num_segments else zero,
        "entropy_mean": torch.where(mask, entropy.detach(), zero).sum() / denom,
        "approx_kl": torch.where(mask, old - logp.detach(), zero).sum() / denom,
        "num_segments": torch.tensor(num_segments, dtype=torch.int64),
        "mean_segment_len": torch.tensor(n_tokens / max(num_segments, 1), dtype=torch.float64),
        "is_weight_mean": is_in.sum() / denom,
        "is_weight_min": is_in.min() if n_tokens else zero,
        "is_weight_max": is_in.max() if n_tokens else zero,
        "is_masked_frac": frac(corr.is_masked),
        "off_policy_masked_frac": frac(corr.off_policy_masked),
        "entropy_masked_frac": frac(corr.entropy_masked),
        "dual_clip_frac": frac(flags["dual"]),
        "cispo_clip_frac": frac(flags["high"]) if cfg.objective == "cispo" else zero,
        "vespo_phi_mean": torch.stack(phis).mean() if phis else zero,
    }


def _to_cpu(batch: FlatBatch) -> FlatBatch:
    """The reference runs on the CPU; gradients still flow back to the caller's logits."""
    moved = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
    return FlatBatch(**moved)
