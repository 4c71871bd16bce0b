"""verl adapter, the options: the `policy_loss` keys of `loss_mode="sspo"` and their mapping onto the package's options
(objective, clip widths, objective parameters, aggregation under verl's global batch info), and the refusal of verl's
rollout-correction bypass mode. `sspo_kernels.integrations.verl` (the plugin) uses them. Written against verl 0.9.1;
file:line citations are of its installed sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from verl.workers.config import PolicyLossConfig

from sspo_kernels._types import BOUNDED_OBJECTIVES, OBJECTIVES
from sspo_kernels.integrations._common import build_boundary, check_options, drop_none, text_tokenizer

LOSS_MODE = "sspo"
# verl's loss_mode for each objective it also has (docs/loss.md, "verl 0.9.1"), for the error messages.
VERL_EQUIVALENTS = {"clip": "vanilla", "cispo": "cispo", "sapo": "sapo", "gmpo": "geo_mean", "reinforce": "gpg"}
BYPASS_SETTING = "algorithm.rollout_correction.bypass_mode"
ACTOR_BYPASS_SETTING = "actor_rollout_ref.actor.policy_loss.rollout_correction.bypass_mode"


@dataclass
class SSPOPolicyLossConfig(PolicyLossConfig):
    """verl's `PolicyLossConfig` plus the sspo_kernels options (used when `loss_mode == "sspo"`).

    - `granularity`: "subsentence" (default), "sentence" (boundary table from the actor's tokenizer;
      `boundary_chars` overrides the characters), "sequence" or "token".
    - `objective`: "clip" (default; verl's `vanilla`), "cispo", "sapo", "gmpo" (verl's `geo_mean`), "vespo",
      "reinforce" (verl's `gpg`), at any granularity.
    - `eps_low` / `eps_high` (clip, cispo, gmpo): widths; None = the actor's `clip_ratio_low` / `clip_ratio_high`
      at token and sequence granularity (relative bounds for clip and cispo, log-space bounds for gmpo, as verl's
      modes read them), the package's defaults at (sub)sentence granularity.
    - `dual_clip` (clip only): None or True = the actor's `clip_ratio_c` for negative advantages (as `vanilla`).
    - `sapo_tau_pos` / `sapo_tau_neg`: None = the actor's `tau_pos` / `tau_neg`; `vespo_k_pos`,
      `vespo_lambda_pos`, `vespo_k_neg`, `vespo_lambda_neg`: None = the package's defaults.
    - `entropy_gamma`, `k_min`, `k_max`, `entropy_ref` (None = the micro-batch's mean entropy), `adapt_low`,
      `adapt_high`: entropy-adaptive bounds (clip, cispo, gmpo); they need `actor.calculate_entropy=True`.
    - `log_ratio_clamp`, `ratio_grad` ("exact" | "token": verl's `gspo` form), `backend`: package settings.
    """

    granularity: str = "subsentence"
    boundary_chars: str | None = None
    objective: str = "clip"
    eps_low: float | None = None
    eps_high: float | None = None
    dual_clip: bool | None = None
    entropy_gamma: float | None = None
    k_min: float | None = None
    k_max: float | None = None
    entropy_ref: float | None = None
    adapt_low: bool = True
    adapt_high: bool = True
    sapo_tau_pos: float | None = None
    sapo_tau_neg: float | None = None
    vespo_k_pos: float | None = None
    vespo_lambda_pos: float | None = None
    vespo_k_neg: float | None = None
    vespo_lambda_neg: float | None = None
    log_ratio_clamp: float = 20.0
    ratio_grad: str = "exact"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.granularity is None:
            raise ValueError("policy_loss.granularity must be set (subsentence, sentence, sequence or token)")
        check_policy_options(option_fields(self))
        if self.loss_mode == LOSS_MODE:
            refuse_bypass(ACTOR_BYPASS_SETTING, self.rollout_correction)


# Options passed to the loss as they are (when set); the others are mapped below.
_PLAIN = ("granularity", "objective", "entropy_gamma", "k_min", "k_max", "entropy_ref", "adapt_low", "adapt_high",
          "log_ratio_clamp", "ratio_grad", "backend")  # fmt: skip
_BOUNDS = ("eps_low", "eps_high", "entropy_gamma", "k_min", "k_max")
_OBJECTIVE_PARAMS = {
    "sapo": ("sapo_tau_pos", "sapo_tau_neg"),
    "vespo": ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
}
OPTION_NAMES = (*_PLAIN, "boundary_chars", "eps_low", "eps_high", "dual_clip",
                *(name for params in _OBJECTIVE_PARAMS.values() for name in params))  # fmt: skip


def option_fields(policy_loss: Any) -> dict[str, Any]:
    """The sspo options of a policy-loss config node; a plain `PolicyLossConfig` gives the defaults."""
    defaults = SSPOPolicyLossConfig.__dataclass_fields__
    return {name: policy_loss.get(name, defaults[name].default) for name in OPTION_NAMES}


def check_policy_options(fields: dict[str, Any]) -> None:
    """Raise ValueError / TypeError naming the first bad `policy_loss` option."""
    objective = fields["objective"]
    if objective not in OBJECTIVES:
        verl = ", ".join(f"{v} -> {k}" for k, v in VERL_EQUIVALENTS.items())
        raise ValueError(f"policy_loss.objective must be one of {OBJECTIVES} (verl's modes: {verl}), got {objective!r}")
    if objective not in BOUNDED_OBJECTIVES:
        given = [name for name in _BOUNDS if fields[name] is not None]
        if given:
            raise ValueError(f"policy_loss.{given[0]}: objective={objective!r} has no clip bounds (unset it)")
    for other, params in _OBJECTIVE_PARAMS.items():
        for name in params:
            value = fields[name]
            if value is None:
                continue
            if other != objective:
                raise ValueError(f"policy_loss.{name} belongs to objective={other!r}, not {objective!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"policy_loss.{name} must be a finite number, got {value!r}")
            if value < 0 or (value == 0 and "_k_" not in name):
                raise ValueError(f"policy_loss.{name} must be {'>=' if '_k_' in name else '>'} 0, got {value!r}")
    dual = fields["dual_clip"]
    if dual is not None and not isinstance(dual, bool):
        raise TypeError(f"policy_loss.dual_clip must be a bool (it applies the actor's clip_ratio_c), got {dual!r}")
    if dual and objective != "clip":
        raise ValueError(f"policy_loss.dual_clip caps the clip objective only, not objective={objective!r}")
    shared = dict(fields)
    if objective in ("cispo", "gmpo"):  # eps_low >= 1 is meaningful there (cispo: no lower bound; gmpo: log space)
        low = shared.pop("eps_low")
        if low is not None and (isinstance(low, bool) or not isinstance(low, (int, float)) or not math.isfinite(low)):
            raise TypeError(f"policy_loss.eps_low must be a finite number, got {low!r}")
        if low is not None and low < 0:
            raise ValueError(f"policy_loss.eps_low must be >= 0, got {low!r}")
    check_options("policy_loss", shared)


def policy_options(config: Any) -> dict[str, Any]:
    """Options of `sspo_loss_from_logprobs` from the actor config: objective, widths, parameters, dual clip,
    boundary table, package settings (None left out: the package's default)."""
    policy = config.policy_loss
    refuse_bypass(ACTOR_BYPASS_SETTING, policy.get("rollout_correction", None))
    fields = option_fields(policy)
    check_policy_options(fields)
    g, objective = fields["granularity"], fields["objective"]
    opts = {name: fields[name] for name in _PLAIN}
    opts.update({name: fields[name] for name in _OBJECTIVE_PARAMS.get(objective, ())})
    if objective in BOUNDED_OBJECTIVES:
        follow_verl = g in ("token", "sequence")  # verl's clip_ratio_* as each of its modes reads them
        low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
        high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
        opts["eps_low"] = fields["eps_low"] if fields["eps_low"] is not None or not follow_verl else low
        opts["eps_high"] = fields["eps_high"] if fields["eps_high"] is not None or not follow_verl else high
    if objective == "sapo":  # verl's own sapo temperatures (ActorConfig.tau_pos / tau_neg)
        for ours, verls in (("sapo_tau_pos", "tau_pos"), ("sapo_tau_neg", "tau_neg")):
            if opts[ours] is None:
                opts[ours] = config.get(verls, None)
    if objective == "clip" and fields["dual_clip"] is not False:
        opts["dual_clip"] = config.get("clip_ratio_c", 3.0)
    if g in ("subsentence", "sentence"):
        opts["boundary"] = _boundary(config, g, fields["boundary_chars"])
    return drop_none(opts)


def needs_entropy(opts: dict[str, Any]) -> bool:
    """Whether the options adapt clip bounds to the entropy (which the loss then needs)."""
    if opts["objective"] not in BOUNDED_OBJECTIVES or not (opts["adapt_low"] or opts["adapt_high"]):
        return False
    gamma = opts.get("entropy_gamma")
    return gamma != 0 if gamma is not None else opts["granularity"] in ("subsentence", "sentence")


def policy_weights(objective: str, weights: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """verl's `rollout_is_weights` (B, T) as the loss's `policy_weights`, applied as verl's modes apply them: per
    token (every mode multiplies its per-token loss, core_algos.py:1365, 1685, 1735, 2091),
    except gmpo, weighed per response by the geometric mean of its tokens' weights, floored at 1e-10, as verl's
    geo_mean (core_algos.py:1992-1998); sequence-level weights are one value per response, so both agree there."""
    if weights is None or objective != "gmpo":
        return weights
    log_w = torch.where(mask, (weights.float() + 1e-10).log(), torch.zeros((), device=weights.device))
    return (log_w.sum(-1) / mask.sum(-1).clamp(min=1)).exp()


def aggregation(config: Any, data: Any, horizon: int) -> tuple[dict[str, Any], float]:
    """(aggregation options, factor on the loss) equal to verl's `agg_loss` with the global batch info."""
    mode = config.loss_agg_mode
    dp_size = data["dp_size"]
    num_tokens = data["batch_num_tokens"]
    num_seqs = data["global_batch_size"]
    if mode == "token-sum":
        return {"loss_agg_mode": "sum"}, float(dp_size)
    if mode == "token-mean":
        count, what = num_tokens, "batch_num_tokens"
        opts = {"loss_agg_mode": "token-mean"}
    elif mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        count, what = num_seqs, "global_batch_size"
        opts = {"loss_agg_mode": mode}
        if mode == "seq-mean-token-sum-norm":
            opts["norm_len"] = config.loss_scale_factor if config.loss_scale_factor is not None else horizon
    else:
        raise ValueError(f"actor.loss_agg_mode={mode!r} is not supported by loss_mode='sspo'")
    if count is None:
        if dp_size > 1:
            raise ValueError(f"loss_mode='sspo' needs the global {what} when dp_size > 1")
    else:
        # verl divides by the global count and multiplies by dp_size: a local normaliser of count / dp_size
        opts["normalizer"] = count / dp_size
    return opts, 1.0


_BOUNDARY_CACHE: dict[tuple[int, str, str | None, int], torch.Tensor] = {}


def _boundary(config: Any, granularity: str, chars: str | None) -> torch.Tensor:
    """The actor tokenizer's boundary table, built once per (tokenizer, granularity, characters)."""
    model_config = config.get("model_config")
    tokenizer = getattr(model_config, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"policy_loss.granularity={granularity!r} needs the actor's tokenizer (actor.model_config.tokenizer); "
            "use granularity='sequence' or 'token' where no tokenizer is loaded"
        )
    tokenizer = text_tokenizer(tokenizer)
    hf_config = getattr(model_config, "hf_config", None)
    vocab = max(len(tokenizer), int(getattr(hf_config, "vocab_size", 0) or 0))
    key = (id(tokenizer), granularity, chars, vocab)
    if key not in _BOUNDARY_CACHE:
        _BOUNDARY_CACHE[key] = build_boundary(tokenizer, granularity, chars, vocab)
    return _BOUNDARY_CACHE[key]


# ---------------------------------------------------------------- bypass mode: refused


def refuse_bypass(setting: str, rollout_correction: Any) -> None:
    """Raise when a rollout-correction config node turns bypass mode on (with loss_mode="sspo").

    In verl 0.9.1 bypass mode never reaches the actor's loss: the v1 trainer (the default, `trainer.use_v1=True`)
    only copies `rollout_log_probs` into `old_log_probs` and skips the rollout correction (trainer_base.py:1641-1648,
    1765-1770); the legacy trainer's `apply_bypass_mode` rewrites `policy_loss.loss_mode` in the driver's config
    (rollout_corr_helper.py:1140-1144) after the workers have bound theirs (engine_workers.py:593, 643). So the
    loss would run against the rollout policy with no rejection-sampling mask and no IS weights at all."""
    if rollout_correction is None or not rollout_correction.get("bypass_mode", False):
        return
    raise ValueError(
        f"loss_mode='sspo' does not support {setting}=True: verl 0.9.1's bypass mode only replaces old_log_probs by "
        "the rollout's log-probs, and neither its rejection sampling nor its bypass loss reaches the actor workers "
        f"(it would train without any rollout correction). Set {BYPASS_SETTING}=False (decoupled mode: verl's "
        "rollout_is weights and rollout_rs masks then reach loss_mode='sspo')"
    )


def _get(node: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if node is None:
            return None
        node = node.get(key, None) if hasattr(node, "get") else getattr(node, key, None)
    return node


def refuse_bypass_in_trainer_config(config: Any) -> None:
    """The driver-side check of a whole trainer config (what verl's `validate_config` receives)."""
    if _get(config, "actor_rollout_ref.actor.policy_loss.loss_mode") == LOSS_MODE:
        refuse_bypass(BYPASS_SETTING, _get(config, "algorithm.rollout_correction"))
