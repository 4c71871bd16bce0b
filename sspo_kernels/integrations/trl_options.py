"""How the settings of TRL 1.16's `GRPOTrainer` map onto the options of sspo_kernels (used by `trl.py`).

Facts about TRL cite `trl/trainer/grpo_trainer.py` of trl 1.16.0 (`_compute_loss` is lines 3020-3290, the vLLM
importance-sampling ratio 2660-2708, the off-policy mask 2945-2969, the entropy mask 1380-1416). Nothing here
imports TRL: `Settings` reads the trainer's (or a `GRPOConfig`'s) attributes by the names TRL's loss reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # TRL's PPO-clip objective (:3112-3120)
LOSS_TYPES = (*CLIP_LOSS_TYPES, "cispo", "sapo", "vespo")
ROLLOUT_IS_LEVELS = ("token", "segment", "sequence")  # SSPOGRPOConfig.sspo_rollout_is
LOSS_PATHS = ("auto", "fused", "logprobs")  # SSPOGRPOConfig.sspo_loss_path
# vllm_importance_sampling_mode -> (the weight's unit, truncate or mask) (:2668-2700)
IS_MODES = {
    "token_truncate": ("token", "truncate"),
    "token_mask": ("token", "mask"),
    "sequence_truncate": ("sequence", "truncate"),
    "sequence_mask": ("sequence", "mask"),
}
# The package options with a meaning only for objectives with clip bounds (SSPOGRPOConfig field -> option).
BOUND_FIELDS = {"sspo_eps_low": "eps_low", "sspo_eps_high": "eps_high", "entropy_gamma": "entropy_gamma",
                "k_min": "k_min", "k_max": "k_max"}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """The TRL settings the loss depends on, read where TRL's `_compute_loss` reads them."""

    loss_type: str
    level: str  # importance_sampling_level
    granularity: str  # the package's: `level`, or SSPOGRPOConfig.granularity
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    beta: float
    bias_kl: bool  # use_bias_correction_kl
    vllm_is: bool  # use_vllm and vllm_importance_sampling_correction
    is_mode: str
    is_min: float | None
    is_max: float | None
    top_entropy_quantile: float
    off_policy_threshold: float | None
    sspo_rollout_is: str | None

    @property
    def follow_trl(self) -> bool:
        """Token or sequence granularity: TRL's own objective, bounds and metrics."""
        return self.granularity in ("token", "sequence")

    @property
    def cispo_cap(self) -> float:
        """TRL's cispo caps the ratio at epsilon_high, an absolute value (:3109-3111)."""
        return self.epsilon_high

    @classmethod
    def of_args(cls, args: Any) -> Settings:
        high = args.epsilon_high if args.epsilon_high is not None else args.epsilon  # TRL's rule (:945-946)
        return cls._make(args, args, epsilon_low=args.epsilon, epsilon_high=high)

    @classmethod
    def of_trainer(cls, trainer: Any) -> Settings:
        return cls._make(trainer, trainer.args, epsilon_low=trainer.epsilon_low, epsilon_high=trainer.epsilon_high)

    @classmethod
    def _make(cls, src: Any, args: Any, **eps: float) -> Settings:
        granularity = getattr(args, "granularity", None) or src.importance_sampling_level
        level = granularity if granularity in ("token", "sequence") else src.importance_sampling_level
        return cls(
            loss_type=src.loss_type,
            level=level,  # a token / sequence granularity the user set is the level of TRL's maths
            granularity=granularity,
            delta=args.delta,
            beta=src.beta,
            bias_kl=bool(args.use_bias_correction_kl),
            vllm_is=bool(src.use_vllm and src.vllm_importance_sampling_correction),
            is_mode=src.vllm_importance_sampling_mode,
            is_min=src.vllm_importance_sampling_clip_min,
            is_max=src.vllm_importance_sampling_clip_max,
            top_entropy_quantile=src.top_entropy_quantile,
            off_policy_threshold=src.off_policy_mask_threshold,
            sspo_rollout_is=getattr(args, "sspo_rollout_is", None),
            **eps,
        )


def check_supported(s: Settings, fields: dict[str, Any]) -> None:
    """A ValueError naming the setting, for the few TRL accepts and the package does not reproduce.
    `fields`: the SSPOGRPOConfig fields the user set (None = not set)."""
    if s.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} (TRL 1.16's), got {s.loss_type!r}")
    if s.loss_type == "luspo" and not s.follow_trl:
        raise ValueError("loss_type='luspo' is a sequence-level loss; use granularity='sequence' or None with it")
    if s.delta is not None and s.loss_type in CLIP_LOSS_TYPES:
        hi = 1.0 + s.epsilon_high
        if not s.follow_trl and s.delta <= 1.0:
            raise ValueError(f"delta={s.delta} is the dual clip at (sub)sentence granularity and must be > 1")
        if s.follow_trl and (s.delta < 1.0 or (s.delta <= hi and s.epsilon_high <= 0)):
            raise ValueError(
                f"delta={s.delta} with epsilon_high={s.epsilon_high} caps the ratio of positive-advantage tokens "
                "below 1 (or at exactly 1): not reproduced; use delta > 1 + epsilon_high (INTELLECT-2's two-sided "
                "clip) or delta >= 1 with epsilon_high > 0"
            )
    if s.loss_type == "vespo" and s.vllm_is:
        if s.is_mode not in ("token_truncate", "token_mask"):
            raise ValueError(  # TRL refuses it at construction (:936-941)
                f"loss_type='vespo' needs vllm_importance_sampling_mode 'token_truncate' or 'token_mask', got "
                f"{s.is_mode!r}"
            )
        if s.sspo_rollout_is not in (None, "token"):
            raise ValueError(f"loss_type='vespo' folds token-level weights only: sspo_rollout_is={s.sspo_rollout_is!r}")
        low = -math.inf if s.is_min is None else s.is_min
        high = math.inf if s.is_max is None else s.is_max
        if not low <= 1.0 <= high:
            # TRL sums log(weight) over every position, padding included (:3001-3004): there each weight is
            # the bounds' image of 1, a per-row constant the package's segment sum cannot add
            raise ValueError(
                "loss_type='vespo' with vllm_importance_sampling_clip_min > 1 or vllm_importance_sampling_clip_max "
                f"< 1 (got {s.is_min}, {s.is_max}) weights padding positions in TRL's sum: not reproduced"
            )
    if s.sspo_rollout_is is not None:
        if s.sspo_rollout_is not in ROLLOUT_IS_LEVELS:
            raise ValueError(f"sspo_rollout_is must be one of {ROLLOUT_IS_LEVELS} or None, got {s.sspo_rollout_is!r}")
        if not s.vllm_is:
            raise ValueError(
                "sspo_rollout_is needs the vLLM importance-sampling correction (use_vllm=True and "
                "vllm_importance_sampling_correction=True): it reweights with vLLM's sampling log-probs"
            )
    if s.loss_type in ("sapo", "vespo"):
        given = [name for name in BOUND_FIELDS if fields.get(name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: loss_type={s.loss_type!r} has no clip bounds")


def objective_options(s: Settings, fields: dict[str, Any], args: Any) -> dict[str, Any]:
    """The objective, its bounds or parameters and the granularity, for `sspo_loss*` (None = package default).
    `fields`: the package options of the SSPOGRPOConfig (`_sspo_fields`)."""
    bounds = {option: fields[name] for name, option in BOUND_FIELDS.items()}
    opts: dict[str, Any] = {"granularity": s.granularity}
    if s.loss_type in CLIP_LOSS_TYPES:
        opts.update(bounds, objective="clip")
        if s.follow_trl:
            opts.update(eps_low=bounds["eps_low"], eps_high=bounds["eps_high"])
            if opts["eps_low"] is None:
                opts["eps_low"] = s.epsilon_low
            if opts["eps_high"] is None:
                opts["eps_high"] = s.epsilon_high
        if s.delta is not None:
            opts.update(delta_options(s, opts["eps_high"]))
    elif s.loss_type == "cispo":
        opts.update(bounds, objective="cispo")
        if s.follow_trl:
            if s.cispo_cap >= 1.0:  # -sg[min(r, cap)] A l  =  cispo with lo = 0, hi = cap
                opts.update(eps_low=1.0, eps_high=s.cispo_cap - 1.0, entropy_gamma=0.0)
            else:  # a cap below 1: -sg[w] A l with w = min(r, cap) as a policy weight (the log-probs path)
                opts = {"granularity": s.granularity, "objective": "reinforce"}
    elif s.loss_type == "sapo":
        opts.update(objective="sapo", sapo_tau_pos=args.sapo_temperature_pos, sapo_tau_neg=args.sapo_temperature_neg)
    else:  # vespo: one weight per response from its summed log-ratio (:2972-3017), whatever the IS level
        opts.update(objective="vespo", vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos,
                    vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg)  # fmt: skip
        if s.follow_trl:
            opts["granularity"] = "sequence"
    return opts


def delta_options(s: Settings, eps_high: float | None) -> dict[str, Any]:
    """TRL's `delta` (:3115-3116): P = -min(min(r, delta) A, clip(r) A). Above the upper bound hi it is the dual
    clip at delta; at 1 <= delta <= hi the positive side is clipped at delta and the negative one capped at hi."""
    if not s.follow_trl:
        return {"dual_clip": s.delta}
    hi = 1.0 + eps_high
    if s.delta > hi:
        return {"dual_clip": s.delta}
    return {"eps_high": s.delta - 1.0, "dual_clip": hi}


def aggregation(loss_type: str, trainer: Any, inputs: dict[str, Any], rows: int, train: bool):
    """(aggregation options, divisor of the loss): TRL's normaliser of `loss_type` (:3153-3186)."""
    accum = trainer.current_gradient_accumulation_steps if train else 1
    if loss_type in ("dapo", "cispo", "vespo"):
        # the global token count of the generation batch, rescaled to one process and one accumulation window
        norm = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if train:
            norm = norm * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
        return {"loss_agg_mode": "token-mean", "normalizer": norm}, 1.0
    if loss_type == "bnpo":
        return {"loss_agg_mode": "token-mean"}, accum
    # the remaining modes average over all rows, counting the empty (e.g. truncated, masked) ones
    if loss_type in ("grpo", "sapo"):
        return {"loss_agg_mode": "seq-mean-token-mean", "normalizer": rows}, accum
    if loss_type == "dr_grpo":
        mode = {"loss_agg_mode": "seq-mean-token-sum-norm", "norm_len": trainer.max_completion_length}
        return {**mode, "normalizer": rows}, accum
    return {"loss_agg_mode": "seq-mean-token-sum", "normalizer": rows}, accum  # luspo


def rollout_options(s: Settings, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
    """(the rollout-weight options, TRL's weight to use as a policy weight or None), for the vLLM correction.

    TRL multiplies the policy term by `importance_sampling_ratio` (:3146-3147), except for vespo, which folds
    token weights into its own (:3125-3136): there, and for `sspo_rollout_is`, the package computes the weight
    from `sampling_per_token_logps` with TRL's mode and bounds (the same formula: :2660-2700)."""
    if not s.vllm_is:
        return {}, None
    how = IS_MODES[s.is_mode][1]
    level = s.sspo_rollout_is or ("token" if s.loss_type == "vespo" else None)
    if level is None:
        ratio = inputs["importance_sampling_ratio"]
        return {}, ratio.squeeze(1) if ratio.dim() == 2 and ratio.size(1) == 1 else ratio
    low = None if s.is_min is None or s.is_min <= 0 else s.is_min  # weights are > 0: a bound <= 0 binds nothing
    opts = {
        "rollout_logprobs": inputs["sampling_per_token_logps"],
        "rollout_is": level,
        "rollout_is_mode": how,
        "rollout_is_min": low,
        "rollout_is_max": s.is_max,
    }
    return opts, None


def combine_weights(*weights: torch.Tensor | None) -> torch.Tensor | None:
    """The product of per-token (B, T), per-row (B,) or (B, 1) weights, broadcast: (B, T), (B,) or None."""
    out = None
    for w in weights:
        if w is None:
            continue
        w = w.detach().float()
        if out is None:
            out = w
            continue
        if out.dim() == 1:
            out = out.unsqueeze(1)
        if w.dim() == 1:
            w = w.unsqueeze(1)
        out = out * w
    if out is not None and out.dim() == 2 and out.size(1) == 1:
        out = out.squeeze(1)
    return out


def unit_ratio(logps: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """TRL's `coef_1` (:3082-3095), detached: exp(l - q) per token (B, T), or of the masked mean per row (B, 1)."""
    log_ratio = logps.detach() - old
    if level == "token":
        return torch.exp(log_ratio)
    mean = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return torch.exp(mean).unsqueeze(-1)
