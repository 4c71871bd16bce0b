"""The segment step: from per-token log-probs and entropies to the loss, the metrics, and the
per-token gradient coefficients dLoss/dl_t and dLoss/dH_t (docs/loss.md "Segment quantities" to
"Outputs").

Everything here is O(N) work on `(N,)` tensors, shared by every backend; only the segmented sum
is the backend's (`ops/segment/`). Arrays indexed by segment are sized N, the most segments there can be,
so nothing depends on a count read back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sspo_kernels._types import METRIC_NAMES, FlatBatch, LossConfig, SSPOOutput
from sspo_kernels._validate import entropy_ref_on
from sspo_kernels.backend import Backend
from sspo_kernels.ops.corrections import entropy_keep, off_policy_keep, rollout_weight, unit_sum
from sspo_kernels.ops.objectives_torch import (
    OBJECTIVES,
    VESPO_LOG_W_MAX,
    VESPO_LOG_W_MIN,
    Terms,
    gmpo_log_ratio,
    vespo_log_weight,
)
from sspo_kernels.ops.segment.ids import batch_segment_ids


@dataclass
class StepOutput:
    loss: torch.Tensor  # 0-d fp32, or (N,) fp32 for loss_agg_mode="none"
    metric_sums: dict[str, torch.Tensor]  # partial sums: `finalize_metrics` turns them into the metrics
    saved: tuple[torch.Tensor, ...]  # what `objective_bwd` needs, saved by the autograd Function


def _masked(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x where mask, else exactly 0 (even where x is NaN)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def token_weights(batch: FlatBatch, cfg: LossConfig) -> torch.Tensor:
    """Aggregation weight w_t of each token (docs/loss.md "Aggregation"), fp32, 0 where masked out."""
    mask = batch.mask
    ones = mask.float()
    n_tokens = ones.sum()
    mode = cfg.loss_agg_mode
    if mode in ("sum", "none"):
        return ones
    if mode == "token-mean":
        denom = batch.normalizer if batch.normalizer is not None else n_tokens.clamp(min=1)
        return ones / denom
    per_response = torch.zeros(batch.num_responses, dtype=torch.int64, device=mask.device)
    per_response.index_add_(0, batch.response_ids, mask.long())  # integer adds: deterministic
    responses = batch.normalizer if batch.normalizer is not None else (per_response > 0).sum().float().clamp(min=1)
    if mode == "seq-mean-token-sum":
        return ones / responses
    if mode == "seq-mean-token-sum-norm":
        return ones / (responses * batch.norm_len)
    return ones / (per_response[batch.response_ids].clamp(min=1).float() * responses)


def objective_fwd(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    seg: torch.Tensor,
    batch: FlatBatch,
    cfg: LossConfig,
    *,
    backend: Backend,
    weights: torch.Tensor | None = None,
) -> StepOutput:
    """logp, entropy: (N,) fp32 (0 where masked out); seg: (N,) int64 segment ids (-1 masked out).

    `weights` (N,) overrides the aggregation weights computed from `batch`: a caller that runs the
    step on chunks of whole segments passes the slice of `token_weights` of the whole batch, and
    `entropy_ref` must then be a number (cfg), since the batch mean is not known chunk by chunk.
    """
    mask = batch.mask
    n = mask.shape[0]
    old = logp if batch.old_logprobs is None else batch.old_logprobs.float()  # None: on-policy, ratio 1
    adv = batch.advantages.float()
    n_tokens = mask.sum().float()
    slot = seg.clamp(min=0)  # gather index; rows of masked-out tokens are discarded by _masked
    x = _masked(mask, logp - old)  # the token log-ratio l_t - q_t

    # Per-segment sums of (l - q), H and the token count, in one deterministic pass.
    sums = backend.segment_sum(torch.stack([x, entropy, mask.float()], dim=1), seg)
    n_seg = sums[:, 2].clamp(min=1)
    k = _entropy_factor(sums[:, 1] / n_seg, entropy, n_tokens, cfg)
    ones = torch.ones_like(k)
    width_low = cfg.eps_low * (k if cfg.adapt_low else ones)  # per segment slot
    width_high = cfg.eps_high * (k if cfg.adapt_high else ones)
    lo, hi = 1 - width_low, 1 + width_high

    # The off-policy corrections: W_t on the policy term (docs/loss.md "Off-policy corrections").
    rollout, outside, rseg = None, None, None
    if cfg.off_policy_mask is not None or (batch.rollout_logprobs is not None and cfg.rollout_is == "sequence"):
        rseg = seg if cfg.granularity == "sequence" else batch_segment_ids(batch, "sequence")
    if batch.rollout_logprobs is not None and cfg.rollout_is is not None:
        unit = {"token": None, "segment": seg, "sequence": rseg}[cfg.rollout_is]
        rollout, outside = rollout_weight(batch, cfg, old, unit, backend.segment_sum)
    keep_off = None
    if cfg.off_policy_mask is not None:
        keep_off = off_policy_keep(batch, cfg, logp, old, rseg, backend.segment_sum)
    keep_ent = None if cfg.entropy_mask_quantile is None else entropy_keep(entropy, batch, cfg)
    policy_weight = _policy_weight(batch, cfg, rollout, keep_off, keep_ent)

    # The unit's ratio: the mean log-ratio (gmpo: of the clipped token log-ratios), clamped.
    gamma = None
    clip_flags = None
    if cfg.objective == "gmpo":
        x, gamma, *clip_flags = gmpo_log_ratio(x, adv, -width_low[slot], width_high[slot])
        x = _masked(mask, x)
        unit_log_ratio = backend.segment_sum(x.unsqueeze(1), seg)[:, 0] / n_seg
    else:
        unit_log_ratio = sums[:, 0] / n_seg
    c = cfg.log_ratio_clamp
    rho = unit_log_ratio.clamp(-c, c).exp()
    in_clamp = (unit_log_ratio >= -c) & (unit_log_ratio <= c)  # torch.clamp passes the gradient on the closed interval
    log_w = None
    if cfg.objective == "vespo":
        share = _masked(mask, vespo_log_weight(x, rollout))
        log_w = unit_sum(share, seg, backend.segment_sum).clamp(VESPO_LOG_W_MIN, VESPO_LOG_W_MAX)

    # Per token: the objective's value, its slopes through the ratio (a_t) and in l_t (b_t).
    rho_t = rho[slot]
    policy = OBJECTIVES[cfg.objective](Terms(rho_t, lo[slot], hi[slot], adv, logp, log_w, cfg))
    if clip_flags is not None:
        policy.clipped_low, policy.clipped_high = clip_flags

    if weights is None:
        weights = token_weights(batch, cfg)
    loss_t = policy.value if policy_weight is None else policy_weight * policy.value
    ratio_slope = policy.ratio_slope if policy_weight is None else policy_weight * policy.ratio_slope
    direct = policy.direct_slope if policy_weight is None else policy_weight * policy.direct_slope
    if cfg.beta > 0:
        diff = _masked(mask, batch.ref_logprobs.float() - logp)
        kl = diff.exp() - diff - 1
        if cfg.kl_ratio_weight:  # beta R_t KL_t: KL_t flows through the ratio, R_t through l_t
            loss_t = loss_t + cfg.beta * rho_t * kl
            ratio_slope = ratio_slope + cfg.beta * kl
            direct = direct + cfg.beta * rho_t * (1 - diff.exp())
        else:
            loss_t = loss_t + cfg.beta * kl
            direct = direct + cfg.beta * (1 - diff.exp())
    if cfg.entropy_coef > 0:
        loss_t = loss_t - cfg.entropy_coef * entropy
    loss_t = _masked(mask, loss_t * weights)
    loss = loss_t if cfg.loss_agg_mode == "none" else loss_t.sum()

    # Gradient pieces, for a unit upstream gradient: the weighted ratio slope s_t, the ratio's
    # sensitivity rho_s / n_s to each of its tokens (rho_s for the token form; times gmpo's gamma_t),
    # and the direct terms.
    weighted_a = _masked(mask, weights * ratio_slope)
    sensitivity = (rho * in_clamp / (n_seg if cfg.ratio_grad == "exact" else 1.0))[slot]
    if gamma is not None:
        sensitivity = sensitivity * gamma
    direct = _masked(mask, weights * direct)
    grad_entropy = _masked(mask, weights * -cfg.entropy_coef) if cfg.entropy_coef > 0 else None

    s_count = (seg.max() + 1).clamp(min=0) if n else torch.zeros((), dtype=torch.int64, device=mask.device)
    opens = mask & (torch.cat([seg.new_full((min(n, 1),), -1), seg.cummax(0).values[:-1]]) != seg)
    metric_sums = metric_sums_of(
        mask, rho, s_count, logp, old, entropy, n_tokens, policy, opens, rollout, outside, keep_off, keep_ent, cfg
    )
    pieces = (weighted_a, sensitivity, direct, grad_entropy, seg)
    if cfg.loss_agg_mode == "none":
        saved = pieces  # the upstream gradient varies per token: combine in backward
    else:  # a scalar loss: keep only the coefficients for a unit upstream gradient (8 bytes a token)
        saved = _coefficients(pieces, torch.ones(1, device=mask.device), cfg, backend)
    return StepOutput(loss=loss, metric_sums=metric_sums, saved=saved)


def _entropy_factor(h_bar: torch.Tensor, entropy: torch.Tensor, n_tokens: torch.Tensor, cfg: LossConfig):
    """k_s per segment slot (docs/loss.md "Entropy-adaptive clip bounds"); ones without adaptation."""
    if cfg.entropy_gamma == 0:
        return torch.ones_like(h_bar)
    if cfg.entropy_ref == "batch":
        h_ref = entropy.sum() / n_tokens.clamp(min=1)  # detached: the kernels' entropy carries no graph
    elif isinstance(cfg.entropy_ref, torch.Tensor):  # 0-d, e.g. distributed.global_entropy_mean: no sync
        h_ref = entropy_ref_on(cfg, h_bar.device)
    else:
        h_ref = torch.full((), cfg.entropy_ref, device=h_bar.device)  # a fill: no host copy, capturable
    k_raw = (h_bar / h_ref).pow(cfg.entropy_gamma).clamp(cfg.k_min, cfg.k_max)
    return torch.where(h_ref == 0, torch.ones_like(k_raw), k_raw)


def _policy_weight(batch: FlatBatch, cfg: LossConfig, rollout, keep_off, keep_ent) -> torch.Tensor | None:
    """W_t (N,) fp32, or None when every factor is 1 (vespo folds the rollout weight into its own)."""
    factors = [] if batch.policy_weights is None else [batch.policy_weights.float()]
    if rollout is not None and cfg.objective != "vespo":
        factors.append(rollout)
    factors += [keep.float() for keep in (keep_off, keep_ent) if keep is not None]
    if not factors:
        return None
    weight = factors[0]
    for factor in factors[1:]:
        weight = weight * factor
    return _masked(batch.mask, weight)


def segment_step(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    seg: torch.Tensor | None,
    batch: FlatBatch,
    cfg: LossConfig,
    backend: Backend,
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...], tuple[torch.Tensor, ...]]:
    """(loss, what `objective_bwd` needs, metrics in METRIC_NAMES order): the backend's fused step
    (`Backend.segment_step`, one kernel) when `seg` is None, else the step composed here."""
    if seg is None:
        loss, grad_logp, grad_entropy, metrics = backend.segment_step(logp, entropy, batch, cfg)
        return loss, (grad_logp, grad_entropy), metrics
    step = objective_fwd(logp, entropy, seg, batch, cfg, backend=backend)
    return step.loss, step.saved, tuple(finalize_metrics(step.metric_sums).values())


def objective_bwd(
    saved: tuple[torch.Tensor | None, ...], grad_loss: torch.Tensor, cfg: LossConfig, backend: Backend
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dLoss/dl_t and dLoss/dH_t, (N,) fp32, for the upstream gradient `grad_loss` (0-d, or (N,) for
    "none"); dLoss/dH_t is None when the loss has no entropy term."""
    upstream = grad_loss.float().reshape(-1)  # (1,) for a scalar loss, (N,) for "none"
    if cfg.loss_agg_mode == "none":
        return _coefficients(saved, upstream, cfg, backend)
    grad_logp, grad_entropy = saved  # computed in forward for a unit upstream gradient
    return upstream * grad_logp, _scaled(upstream, grad_entropy)


def _scaled(upstream: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else upstream * grad


def _coefficients(pieces, upstream: torch.Tensor, cfg: LossConfig, backend: Backend):
    """dLoss/dl_t and dLoss/dH_t from the per-token gradient pieces and the upstream gradient."""
    weighted_a, sensitivity_t, direct, grad_entropy, seg = pieces
    if cfg.ratio_grad == "exact":
        # dLoss/dl_t = (rho_s / n_s) * sum over the segment's tokens t' of upstream * w_t' * a_t'
        per_seg = backend.segment_sum((upstream * weighted_a).unsqueeze(1), seg)
        through_ratio = sensitivity_t * per_seg[seg.clamp(min=0), 0]
    else:
        through_ratio = sensitivity_t * upstream * weighted_a
    grad_logp = _masked(seg >= 0, through_ratio + upstream * direct)
    return grad_logp, _scaled(upstream, grad_entropy)


def metric_sums_of(mask, rho, s_count, logp, old, entropy, n_tokens, policy, opens, rollout, outside, keep_off,
                   keep_ent, cfg: LossConfig) -> dict[str, torch.Tensor]:  # fmt: skip
    """Additive partial sums of the metrics (min / max combine by min / max), so chunks can be merged.
    rho: (N,) per segment slot; s_count: the number of segments; the rest per token."""
    used = torch.arange(rho.shape[0], device=rho.device) < s_count
    inf = torch.full((1,), float("inf"), device=rho.device)  # keeps min / max defined when N = 0

    def count(flags: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros((), device=rho.device) if flags is None else (mask & flags).sum().float()

    if rollout is None:
        is_weight = torch.where(mask, 1.0, 0.0)
        is_low, is_high = torch.where(mask, 1.0, inf), torch.where(mask, 1.0, -inf)
    else:
        is_weight = _masked(mask, rollout)
        is_low, is_high = torch.where(mask, rollout, inf), torch.where(mask, rollout, -inf)
    phi = None if policy.phi is None else _masked(opens, policy.phi).sum()
    return {
        "clip_low": count(policy.clipped_low),
        "clip_high": count(policy.clipped_high),
        "ratio_sum": torch.where(used, rho, 0.0).sum(),
        "ratio_min": torch.cat([torch.where(used, rho, inf), inf]).min(),
        "ratio_max": torch.cat([torch.where(used, rho, -inf), -inf]).max(),
        "entropy_sum": entropy.sum(),
        "kl_sum": _masked(mask, old - logp).sum(),
        "tokens": n_tokens,
        "segments": s_count,
        "is_weight_sum": is_weight.sum(),
        "is_weight_min": torch.cat([is_low, inf]).min(),
        "is_weight_max": torch.cat([is_high, -inf]).max(),
        "is_masked": count(outside),
        "off_policy_masked": count(None if keep_off is None else ~keep_off),
        "entropy_masked": count(None if keep_ent is None else ~keep_ent),
        "dual_capped": count(policy.capped),
        "cispo_clipped": count(policy.clipped_high if cfg.objective == "cispo" else None),
        "phi_sum": torch.zeros((), device=rho.device) if phi is None else phi,
    }


_MIN_SUMS, _MAX_SUMS = ("ratio_min", "is_weight_min"), ("ratio_max", "is_weight_max")


def merge_metric_sums(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Combine the partial sums of disjoint chunks of tokens (whole segments each)."""
    merged = {k: torch.stack([p[k] for p in parts]).sum() for k in parts[0]}
    for name in _MIN_SUMS:
        merged[name] = torch.stack([p[name] for p in parts]).min()
    for name in _MAX_SUMS:
        merged[name] = torch.stack([p[name] for p in parts]).max()
    return merged


def finalize_metrics(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The metrics of docs/loss.md "Outputs" as detached device tensors; every metric is 0 when nothing is masked in."""
    tokens = sums["tokens"].clamp(min=1)
    segments = sums["segments"]
    any_seg = segments > 0
    any_token = sums["tokens"] > 0
    per_seg = segments.clamp(min=1).float()
    zero = torch.zeros((), device=tokens.device)
    metrics = {
        "clip_frac_low": sums["clip_low"] / tokens,
        "clip_frac_high": sums["clip_high"] / tokens,
        "clip_frac": (sums["clip_low"] + sums["clip_high"]) / tokens,
        "ratio_mean": sums["ratio_sum"] / per_seg,
        "ratio_min": torch.where(any_seg, sums["ratio_min"], zero),
        "ratio_max": torch.where(any_seg, sums["ratio_max"], zero),
        "entropy_mean": sums["entropy_sum"] / tokens,
        "approx_kl": sums["kl_sum"] / tokens,
        "num_segments": segments,
        "mean_segment_len": sums["tokens"] / per_seg,
        "is_weight_mean": sums["is_weight_sum"] / tokens,
        "is_weight_min": torch.where(any_token, sums["is_weight_min"], zero),
        "is_weight_max": torch.where(any_token, sums["is_weight_max"], zero),
        "is_masked_frac": sums["is_masked"] / tokens,
        "off_policy_masked_frac": sums["off_policy_masked"] / tokens,
        "entropy_masked_frac": sums["entropy_masked"] / tokens,
        "dual_clip_frac": sums["dual_capped"] / tokens,
        "cispo_clip_frac": sums["cispo_clipped"] / tokens,
        "vespo_phi_mean": sums["phi_sum"] / per_seg,
    }
    return {name: metrics[name] for name in METRIC_NAMES}


def make_output(
    cfg: LossConfig, batch: FlatBatch, loss: torch.Tensor, logp: torch.Tensor, entropy: torch.Tensor, metrics
) -> SSPOOutput:
    """The entry points' return value: per-token tensors shaped like the tokens, metrics by name."""
    shape = batch.token_shape
    if cfg.loss_agg_mode == "none":
        loss = loss.reshape(shape)
    return SSPOOutput(loss, logp.reshape(shape), entropy.reshape(shape), dict(zip(METRIC_NAMES, metrics)))
