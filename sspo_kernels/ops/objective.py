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

    # Per-segment sums of (l - q), H and the token count, in one deterministic pass.
    sums = backend.segment_sum(torch.stack([_masked(mask, logp - old), entropy, mask.float()], dim=1), seg)
    n_seg = sums[:, 2].clamp(min=1)
    d_raw = sums[:, 0] / n_seg  # [N] per segment slot
    c = cfg.log_ratio_clamp
    rho = d_raw.clamp(-c, c).exp()
    in_clamp = (d_raw >= -c) & (d_raw <= c)  # torch.clamp passes the gradient on the closed interval

    if cfg.entropy_gamma == 0:
        k = torch.ones_like(rho)
    else:
        if cfg.entropy_ref == "batch":
            h_ref = entropy.sum() / n_tokens.clamp(min=1)  # detached: the kernels' entropy carries no graph
        elif isinstance(cfg.entropy_ref, torch.Tensor):  # 0-d, e.g. distributed.global_entropy_mean: no sync
            h_ref = entropy_ref_on(cfg, rho.device)
        else:
            h_ref = torch.full((), cfg.entropy_ref, device=rho.device)  # a fill: no host copy, capturable
        k_raw = ((sums[:, 1] / n_seg) / h_ref).pow(cfg.entropy_gamma).clamp(cfg.k_min, cfg.k_max)
        k = torch.where(h_ref == 0, torch.ones_like(k_raw), k_raw)
    ones = torch.ones_like(k)
    lo = 1 - cfg.eps_low * (k if cfg.adapt_low else ones)
    hi = 1 + cfg.eps_high * (k if cfg.adapt_high else ones)

    # Per token: the clipped objective and its derivative a_t = dL_t/drho (docs/loss.md "Per-token objective").
    rho_t, lo_t, hi_t = rho[slot], lo[slot], hi[slot]
    unclipped = -adv * rho_t
    clipped = -adv * torch.minimum(torch.maximum(rho_t, lo_t), hi_t)
    loss_t = torch.maximum(unclipped, clipped)
    # torch.maximum sends the gradient to the larger branch (half to each on a tie); the clipped
    # branch carries gradient only inside [lo, hi], where it ties with the unclipped one.
    dloss_drho = torch.where(unclipped >= clipped, -adv, torch.zeros_like(adv))
    if cfg.dual_clip is not None:
        floor = -adv * cfg.dual_clip
        use_floor = adv < 0
        tie = use_floor & (loss_t == floor)
        keep = torch.where(use_floor & (loss_t > floor), 0.0, torch.where(tie, 0.5, 1.0))
        dloss_drho = dloss_drho * keep
        loss_t = torch.where(use_floor, torch.minimum(loss_t, floor), loss_t)

    if weights is None:
        weights = token_weights(batch, cfg)
    direct = torch.zeros_like(logp)  # dL_t/dl_t through the KL term
    if cfg.beta > 0:
        diff = _masked(mask, batch.ref_logprobs.float() - logp)
        loss_t = loss_t + cfg.beta * (diff.exp() - diff - 1)
        direct = cfg.beta * (1 - diff.exp())
    if cfg.entropy_coef > 0:
        loss_t = loss_t - cfg.entropy_coef * entropy
    loss_t = _masked(mask, loss_t * weights)
    loss = loss_t if cfg.loss_agg_mode == "none" else loss_t.sum()

    # Gradient pieces, for a unit upstream gradient: weighted a_t, the ratio's sensitivity
    # rho_s / n_s to each of its tokens (rho_s for the token form), and the direct terms.
    weighted_a = _masked(mask, weights * dloss_drho)
    sensitivity = rho * in_clamp / (n_seg if cfg.ratio_grad == "exact" else 1.0)
    direct = _masked(mask, weights * direct)
    grad_entropy = _masked(mask, weights * -cfg.entropy_coef) if cfg.entropy_coef > 0 else None

    s_count = (seg.max() + 1).clamp(min=0) if n else torch.zeros((), dtype=torch.int64, device=mask.device)
    metric_sums = _metric_sums(mask, adv, rho, rho_t, lo_t, hi_t, logp, old, entropy, n_tokens, s_count)
    pieces = (weighted_a, sensitivity[slot], direct, grad_entropy, seg)
    if cfg.loss_agg_mode == "none":
        saved = pieces  # the upstream gradient varies per token: combine in backward
    else:  # a scalar loss: keep only the coefficients for a unit upstream gradient (8 bytes a token)
        saved = _coefficients(pieces, torch.ones(1, device=mask.device), cfg, backend)
    return StepOutput(loss=loss, metric_sums=metric_sums, saved=saved)


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


def _metric_sums(mask, adv, rho, rho_t, lo_t, hi_t, logp, old, entropy, n_tokens, s_count):
    """Additive partial sums of the metrics (min / max combine by min / max), so chunks can be merged."""
    used = torch.arange(rho.shape[0], device=rho.device) < s_count
    inf = torch.full((1,), float("inf"), device=rho.device)  # keeps min / max defined when N = 0
    return {
        "clip_low": (mask & (adv < 0) & (rho_t < lo_t)).sum().float(),
        "clip_high": (mask & (adv > 0) & (rho_t > hi_t)).sum().float(),
        "ratio_sum": torch.where(used, rho, 0.0).sum(),
        "ratio_min": torch.cat([torch.where(used, rho, inf), inf]).min(),
        "ratio_max": torch.cat([torch.where(used, rho, -inf), -inf]).max(),
        "entropy_sum": entropy.sum(),
        "kl_sum": _masked(mask, old - logp).sum(),
        "tokens": n_tokens,
        "segments": s_count,
    }


def merge_metric_sums(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Combine the partial sums of disjoint chunks of tokens (whole segments each)."""
    merged = {k: torch.stack([p[k] for p in parts]).sum() for k in parts[0]}
    merged["ratio_min"] = torch.stack([p["ratio_min"] for p in parts]).min()
    merged["ratio_max"] = torch.stack([p["ratio_max"] for p in parts]).max()
    return merged


def finalize_metrics(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The metrics of docs/loss.md "Outputs" as detached device tensors; every metric is 0 when nothing is masked in."""
    tokens = sums["tokens"].clamp(min=1)
    segments = sums["segments"]
    any_seg = segments > 0
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
