"""TRL 1.16's loss metrics and entropy bonus, as `GRPOTrainer._compute_loss` defines them (used by `trl.py`).

Citations are `trl/trainer/grpo_trainer.py` of trl 1.16.0: the metrics 3253-3289, the entropy bonus and its
adaptive controller 3189-3245 (its state, `entropy_coef` and `_last_world_entropy`, is what TRL's own
`_save_checkpoint` / `_load_optimizer_and_scheduler` write and read back: 3384-3405), the aux loss 3248-3251.
The values come from the detached log-probs and entropies of the package's loss, so at token and sequence
granularity they are TRL's numbers; the package's own metrics are logged under `sspo/*`.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from sspo_kernels import METRIC_NAMES
from sspo_kernels.integrations.trl_options import CLIP_LOSS_TYPES, Settings, unit_ratio

# ---------------------------------------------------------------- entropy bonus


def bonus_coef(trainer: Any) -> float:
    """The coefficient this micro-batch's bonus uses: the adaptive controller's gate is the entropy measured
    at the end of the previous optimizer step (:3204-3209)."""
    if not trainer._entropy_bonus_enabled:
        return 0.0
    if trainer.use_adaptive_entropy and trainer._last_world_entropy > trainer.args.entropy_target:
        return 0.0
    return trainer.entropy_coef


def entropy_bonus(entropies: torch.Tensor, keep: torch.Tensor, accum: float) -> torch.Tensor:
    """TRL's bonus term: the token mean of the (differentiable) entropies over the kept tokens, divided by the
    gradient-accumulation steps, whatever the loss type (:3196-3202)."""
    keep = keep.to(entropies.dtype)
    return (entropies * keep).sum() / keep.sum().clamp(min=1.0) / accum


def after_bonus(trainer: Any, mode: str, policy_loss: torch.Tensor, entropies: torch.Tensor, keep: torch.Tensor):
    """TRL's bookkeeping when the bonus is on: `policy_loss`, the adaptive controller's window and update at an
    optimizer-step boundary, `entropy_coef` (:3214-3245). `entropies` detached, `keep` the bonus's token mask."""
    acc = trainer.accelerator
    trainer._metrics[mode]["policy_loss"].append(acc.gather(policy_loss.detach()).nanmean().item())
    if trainer.use_adaptive_entropy and mode == "train":
        keep = keep.to(torch.float32)
        stats = torch.stack([(entropies.float() * keep).sum(), keep.sum()]).detach()
        window = trainer._entropy_window_stats
        trainer._entropy_window_stats = stats if window is None else window + stats
        if acc.sync_gradients:
            totals = acc.reduce(trainer._entropy_window_stats, reduction="sum")
            world = (totals[0] / totals[1].clamp(min=1.0)).item()
            args = trainer.args
            if world <= args.entropy_target:
                trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
            else:
                trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
            trainer._last_world_entropy = world
            trainer._entropy_window_stats = None
    if mode == "train" and acc.sync_gradients:
        trainer._metrics[mode]["entropy_coef"].append(trainer.entropy_coef)


# ---------------------------------------------------------------- metrics


def _sum_count(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The local (sum, count) of TRL's `global_masked_mean` (:3259-3266): one value per row for a (B, 1) tensor,
    token-weighted over the mask for a (B, T) one."""
    x = x.float()
    if x.shape[1] == 1:
        return x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
    return (x * mask).sum(), mask.sum().float()


def _row_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's `masked_seq_mean` (:3254-3257): per row, NaN for an empty row at token level."""
    x = x.float()
    return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)


def log_metrics(trainer: Any, s: Settings, mode: str, *, logps: torch.Tensor, entropies: torch.Tensor,
                inputs: dict[str, Any], mask: torch.Tensor, core: dict[str, torch.Tensor]) -> None:  # fmt: skip
    """Log `entropy`, `kl`, `clip_ratio/*` (or `cispo_clip_ratio`, `vespo/phi_seq_mean`) as TRL does, reduced over
    every process in one collective (plus one gather for the per-sequence extremes), and `sspo/*`.

    At (sub)sentence granularity the ratio is a segment's, so `clip_ratio/{low,high,region}_mean` are the
    package's token fractions and `kl` is the plain k3 token mean."""
    metrics = trainer._metrics[mode]
    acc = trainer.accelerator
    advantages = inputs["advantages"]
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = inputs.get("old_per_token_logps")
    old = logps.detach() if old is None else old
    mask = mask.float()
    means: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    extremes: dict[str, torch.Tensor] = {}
    ratio = unit_ratio(logps, old, mask, s.level) if s.follow_trl else None
    if s.beta != 0.0:
        d = inputs["ref_per_token_logps"] - logps.detach()
        kl = torch.exp(d) - d - 1
        means["kl"] = _sum_count(kl * ratio if s.bias_kl and ratio is not None else kl, mask)
    means["entropy"] = _sum_count(entropies.detach(), mask)
    if not s.follow_trl:
        count = mask.sum()
        for name, key in (("low", "clip_frac_low"), ("high", "clip_frac_high"), ("region", "clip_frac")):
            means[f"clip_ratio/{name}_mean"] = (core[key].float() * count, count)
    elif s.loss_type in CLIP_LOSS_TYPES:
        clipped = ratio if s.delta is None else ratio.clamp(max=s.delta)  # TRL's metrics see the delta clamp
        low = ((clipped < 1 - s.epsilon_low) & (advantages < 0)).float()
        high = ((clipped > 1 + s.epsilon_high) & (advantages > 0)).float()
        means["clip_ratio/low_mean"] = _sum_count(low, mask)
        means["clip_ratio/high_mean"] = _sum_count(high, mask)
        means["clip_ratio/region_mean"] = _sum_count(torch.maximum(low, high), mask)
        extremes = {"clip_ratio/low_min": _row_mean(low, mask), "clip_ratio/high_max": _row_mean(high, mask)}
    elif s.loss_type == "cispo":
        means["cispo_clip_ratio"] = _sum_count(((ratio > s.cispo_cap) & (advantages > 0)).float(), mask)
    elif s.loss_type == "vespo":
        args = trainer.args
        phi = GRPOTrainer.get_gamma_weights(
            advantages, logps.detach() - old, mask, inputs.get("importance_sampling_ratio"),
            args.vespo_k_pos, args.vespo_lambda_pos, args.vespo_k_neg, args.vespo_lambda_neg,
        )  # fmt: skip
        means["vespo/phi_seq_mean"] = _sum_count(phi, mask)
    names = list(means)
    totals = acc.reduce(torch.stack([torch.stack(means[n]) for n in names]), reduction="sum")
    for name, (total, count) in zip(names, totals.tolist()):
        metrics[name].append(total / max(count, 1.0))
    if extremes:
        gathered = acc.gather(torch.stack([extremes["clip_ratio/low_min"], extremes["clip_ratio/high_max"]], 1))
        metrics["clip_ratio/low_min"].append(nanmin(gathered[:, 0]).item())
        metrics["clip_ratio/high_max"].append(nanmax(gathered[:, 1]).item())
    own = torch.stack([core[name].detach().float().reshape(()) for name in METRIC_NAMES])
    for name, value in zip(METRIC_NAMES, acc.gather(own.unsqueeze(0)).mean(0).tolist()):
        metrics[f"sspo/{name}"].append(value)
