"""verl adapter: `policy_loss.loss_mode="sspo"` in verl's actor, through `sspo_loss_from_logprobs`.

verl's registered policy losses see log-probs only (no token ids, no entropies), so this module wraps the actor's
whole loss function, `verl.workers.utils.losses.ppo_loss(config, model_output, data, dp_group)`: `sspo_ppo_loss`
handles `loss_mode == "sspo"` and hands every other mode to verl's own `ppo_loss`. Importing this module installs
it (verl imports it in every worker through the `verl.plugins` entry point `sspo`); `install()` is idempotent.

Options live in the actor's `policy_loss` node, typed by `SSPOPolicyLossConfig` (select it with
`actor_rollout_ref.actor.policy_loss._target_=sspo_kernels.integrations.verl.SSPOPolicyLossConfig`; its keys and
their mapping onto the package's options are in `verl_options.py`): the granularity, the objective (clip, cispo,
sapo, gmpo, vespo, reinforce) and its parameters. The normalisers come from verl's global batch info
(`batch_num_tokens`, `global_batch_size`, `dp_size`, `loss_scale_factor`), verl's rollout-correction weights
(`rollout_is_weights`) are the loss's `policy_weights`, and the entropy bonus and KL loss are verl's own code,
applied as verl applies them. verl's bypass mode (`algorithm.rollout_correction.bypass_mode`) is refused in the
driver, by verl's `validate_config` and `apply_bypass_mode` (wrapped here), and in the workers.

Fused forward: with `SSPO_VERL_FUSED=1` in the workers' environment (read when this module is imported), or after
`install_fused()`, verl's fused-kernel forward (`actor_rollout_ref.model.use_fused_kernels=True` with
`fused_kernel_options.impl_backend=triton` on FSDP; Megatron's fused forward) calls `linear_cross_entropy` below,
backed by `sspo_kernels.token_logprobs_from_hidden`, instead of verl's own kernel: the actor, old-log-prob and
reference passes then run this package's kernels, and every `loss_mode` sees their log-probs and entropies.

Written against verl 0.9.1.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import Any

import torch
import verl.trainer.ppo.rollout_corr_helper as _verl_rollout_corr
import verl.utils.config as _verl_config
import verl.workers.utils.losses as _verl_losses
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, agg_loss, kl_penalty, register_policy_loss
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

from sspo_kernels import sspo_loss_from_logprobs, token_logprobs_from_hidden
from sspo_kernels.integrations.verl_options import (
    BYPASS_SETTING,
    LOSS_MODE,
    SSPOPolicyLossConfig,
    aggregation,
    needs_entropy,
    policy_options,
    policy_weights,
    refuse_bypass,
    refuse_bypass_in_trainer_config,
)

__all__ = [
    "FUSED_ENV",
    "LOSS_MODE",
    "SSPOPolicyLossConfig",
    "install",
    "install_fused",
    "linear_cross_entropy",
    "sspo_ppo_loss",
]

# Modules that bind `ppo_loss` by name at import (`from verl.workers.utils.losses import ppo_loss`).
_BINDERS = ("verl.workers.engine_workers", "verl.trainer.distillation.losses")
# Modules that bind verl's `validate_config` by name at import (the trainers' entry points).
_VALIDATE_BINDERS = ("verl.utils", "verl.trainer.main_ppo", "verl.trainer.main_ppo_v0",
                     "verl.experimental.one_step_off_policy.main_ppo")  # fmt: skip
# The switch of the fused forward, and where verl defines and binds its `linear_cross_entropy`: the FSDP forwards
# (`verl/models/transformers/*.py`) import it from `_KERNEL_MODULE` at call time, Megatron's at import.
FUSED_ENV = "SSPO_VERL_FUSED"
_KERNEL_MODULE = "verl.utils.kernel.linear_cross_entropy"
_FUSED_BINDERS = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")
# Metrics logged under verl's names (pg_clipfrac_lower: verl's dual-clip fraction), then under actor/sspo/.
_VERL_METRICS = {
    "actor/pg_clipfrac": "clip_frac",
    "actor/ppo_kl": "approx_kl",
    "actor/pg_clipfrac_lower": "dual_clip_frac",
}
_SSPO_METRICS = ("clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_min", "ratio_max", "num_segments",
                 "mean_segment_len")  # fmt: skip
_OBJECTIVE_METRICS = {"cispo": ("cispo_clip_frac",), "vespo": ("vespo_phi_mean",)}


def _padded_tokens(data: Any, shape: torch.Size) -> torch.Tensor:
    """(B, T) response token ids aligned with the padded log-probs (pad ids where the response has ended)."""
    responses = data["responses"]
    if responses.is_nested:
        responses = responses.to_padded_tensor(0)
    tokens = responses[:, : shape[1]]
    if tokens.shape[1] < shape[1]:
        tokens = torch.nn.functional.pad(tokens, (0, shape[1] - tokens.shape[1]))
    return tokens.long()


def sspo_ppo_loss(config: Any, model_output: dict, data: Any, dp_group: Any = None) -> tuple[torch.Tensor, dict]:
    """Drop-in for verl's `ppo_loss`: the sspo policy loss when `config.policy_loss.loss_mode == "sspo"`, verl's
    own `ppo_loss` otherwise. Returns (loss 0-d fp32, metrics dict) as verl's does."""
    if config.policy_loss.get("loss_mode", "vanilla") != LOSS_MODE:
        return _ORIGINAL_PPO_LOSS(config, model_output, data, dp_group)

    log_prob = no_padding_2_padding(model_output["log_probs"], data)  # (B, T), differentiable
    entropy = model_output.get("entropy", None)
    if entropy is not None:
        entropy = no_padding_2_padding(entropy, data)
    tokens = _padded_tokens(data, log_prob.shape)

    info = config.global_batch_info
    info["dp_size"] = data["dp_size"]
    info["batch_num_tokens"] = data["batch_num_tokens"]
    info["global_batch_size"] = data["global_batch_size"]
    info["loss_scale_factor"] = config.loss_scale_factor
    global_norm = (
        data["dp_size"] > 1
        or data["batch_num_tokens"] is not None
        or data["global_batch_size"] is not None
        or config.loss_scale_factor is not None
    )
    metric_aggregation = AggregationType.SUM if global_norm else AggregationType.MEAN
    agg, factor = aggregation(config, data, log_prob.shape[1])

    # verl's rollout correction (decoupled mode): its IS weights arrive as `rollout_is_weights` (token- or
    # sequence-level, broadcast per token and zero where masked out), its rejection mask inside `response_mask`
    fields = ["response_mask", "old_log_probs", "advantages"]
    fields += [name for name in ("rollout_is_weights", "ref_log_prob") if name in data]
    batch = data.select(*fields).to_padded_tensor()
    mask = batch["response_mask"].to(torch.bool)

    opts = policy_options(config)
    if needs_entropy(opts) and entropy is None:
        raise ValueError(
            "loss_mode='sspo' with entropy adaptation needs the entropies: set actor.calculate_entropy=True "
            "(or policy_loss.entropy_gamma=0)"
        )
    weights = policy_weights(opts["objective"], batch.get("rollout_is_weights", None), mask)
    out = sspo_loss_from_logprobs(
        log_prob,
        None if entropy is None else entropy.detach(),
        tokens,
        batch["old_log_probs"],
        batch["advantages"],
        mask,
        policy_weights=weights,
        **opts,
        **agg,
    )
    pg_loss = out.loss * factor if factor != 1.0 else out.loss
    metrics: dict[str, Any] = Metric.from_dict(_metric_values(out.metrics, opts["objective"]), AggregationType.MEAN)
    metrics["actor/pg_loss"] = Metric(value=pg_loss, aggregation=metric_aggregation)
    loss = pg_loss

    if entropy is not None:  # verl's entropy bonus, exactly as its ppo_loss applies it
        entropy_loss = agg_loss(loss_mat=entropy, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **info)
        loss = loss - config.entropy_coeff * entropy_loss
        metrics["actor/entropy_loss"] = Metric(value=entropy_loss, aggregation=metric_aggregation)
    if config.use_kl_loss:  # verl's KL loss, exactly as its ppo_loss applies it
        kld = kl_penalty(logprob=log_prob, ref_logprob=batch["ref_log_prob"], kl_penalty=config.kl_loss_type)
        kl_loss = agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **info)
        loss = loss + kl_loss * config.kl_loss_coef
        metrics["kl_loss"] = Metric(value=kl_loss, aggregation=metric_aggregation)
        metrics["kl_coef"] = config.kl_loss_coef
    return loss, metrics


def _metric_values(m: dict[str, torch.Tensor], objective: str) -> dict[str, float]:
    """The loss's metrics as Python floats under verl's names and actor/sspo/..., read in one host sync."""
    ours = (*_SSPO_METRICS, *_OBJECTIVE_METRICS.get(objective, ()))
    names = {**_VERL_METRICS, **{f"actor/sspo/{k}": k for k in ours}}
    values = torch.stack([m[k].float() for k in names.values()]).tolist()
    return dict(zip(names, values))


def _registered_placeholder(**kwargs: Any) -> tuple[torch.Tensor, dict]:
    raise ValueError(
        "loss_mode='sspo' needs token ids and entropies, which verl's registered policy losses do not receive: it "
        "runs only through the actor's ppo_loss, replaced by sspo_kernels.integrations.verl (installed by the "
        "verl.plugins entry point, or by importing sspo_kernels.integrations.verl in every worker)"
    )


# ---------------------------------------------------------------- the fused forward's kernel


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's `linear_cross_entropy` contract on `token_logprobs_from_hidden`: (log-probs, entropies) fp32 of
    softmax((hidden @ weight.T) / temperature) at `labels`, differentiable in hidden and weight.

    hidden: (N, H), (1, N, H), (B, T, H) or Megatron's (S, 1, H); labels: N int ids in any shape ((N,), (1, N),
    (B, T)); weight: (V, H), or this rank's (V / tp, H) rows with `dist_process_group` (labels are global ids;
    2 collectives in the forward; the hidden gradient is this rank's partial sum, as verl's). Returns two
    tensors shaped like labels (verl's kernel returns them flat: every verl caller reshapes or squeezes them).
    Under autocast the product runs in the autocast dtype, as verl's torch path does. Unlike verl's kernel: any
    hidden size (no multiple of 128), and label -100 gives 0 and no gradient. Only reduction="none".
    """
    if reduction != "none":
        raise ValueError(f"linear_cross_entropy supports reduction='none' only, got {reduction!r}")
    if not isinstance(hidden, torch.Tensor) or not isinstance(labels, torch.Tensor) or hidden.dim() < 1:
        raise TypeError("hidden and labels must be tensors")
    size = hidden.shape[-1]
    if hidden.numel() != labels.numel() * size:
        raise ValueError(f"hidden {tuple(hidden.shape)} must hold one row per label {tuple(labels.shape)}")
    device = hidden.device
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else weight.dtype
    with torch.autocast(device.type, enabled=False):
        logp, entropy = token_logprobs_from_hidden(
            hidden.reshape(-1, size).to(dtype), weight.to(dtype), labels.reshape(-1), temperature=temperature,
            tp_group=dist_process_group,
        )  # fmt: skip
    return logp.reshape(labels.shape), entropy.reshape(labels.shape)


def install_fused() -> None:
    """Route verl's fused forward to `linear_cross_entropy` (idempotent): replace verl's function in its module
    (the FSDP forwards import it from there at call time; Megatron's forwards imported later bind ours) and in
    Megatron's forward modules already imported."""
    kernel_module = importlib.import_module(_KERNEL_MODULE)
    original = kernel_module.linear_cross_entropy
    kernel_module.linear_cross_entropy = linear_cross_entropy
    for name in _FUSED_BINDERS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "linear_cross_entropy", None) is original:
            module.linear_cross_entropy = linear_cross_entropy


def _fused_requested() -> bool:
    return os.environ.get(FUSED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------- installation


_ORIGINAL_PPO_LOSS = getattr(_verl_losses.ppo_loss, "__sspo_original__", _verl_losses.ppo_loss)
sspo_ppo_loss.__sspo_original__ = _ORIGINAL_PPO_LOSS  # type: ignore[attr-defined]
_ORIGINAL_VALIDATE = getattr(_verl_config.validate_config, "__sspo_original__", _verl_config.validate_config)
_ORIGINAL_BYPASS = getattr(
    _verl_rollout_corr.apply_bypass_mode, "__sspo_original__", _verl_rollout_corr.apply_bypass_mode
)


@functools.wraps(_ORIGINAL_VALIDATE)
def _validate_config(config: Any, *args: Any, **kwargs: Any) -> Any:
    """verl's `validate_config` (the trainers' start-up check, in the driver), refusing bypass mode with sspo."""
    refuse_bypass_in_trainer_config(config)
    return _ORIGINAL_VALIDATE(config, *args, **kwargs)


@functools.wraps(_ORIGINAL_BYPASS)
def _apply_bypass_mode(batch: Any, rollout_corr_config: Any = None, policy_loss_config: Any = None) -> Any:
    """verl's `apply_bypass_mode` (the legacy trainer's per-step switch, in the driver), refusing loss_mode=sspo."""
    if policy_loss_config is not None and policy_loss_config.get("loss_mode", None) == LOSS_MODE:
        refuse_bypass(BYPASS_SETTING, {"bypass_mode": True})
    return _ORIGINAL_BYPASS(batch, rollout_corr_config, policy_loss_config)


_validate_config.__sspo_original__ = _ORIGINAL_VALIDATE  # type: ignore[attr-defined]
_apply_bypass_mode.__sspo_original__ = _ORIGINAL_BYPASS  # type: ignore[attr-defined]


def install() -> None:
    """Make verl's actor use `sspo_ppo_loss` (idempotent): replace `ppo_loss` in verl's losses module and in the
    modules already imported that bound it by name, and register `loss_mode="sspo"` in verl's registry. For the
    driver, wrap verl's `validate_config` and `apply_bypass_mode`, which then refuse bypass mode
    (`algorithm.rollout_correction.bypass_mode`) with loss_mode="sspo". With `SSPO_VERL_FUSED=1` in the environment,
    also `install_fused()`."""
    if LOSS_MODE not in POLICY_LOSS_REGISTRY:
        register_policy_loss(LOSS_MODE)(_registered_placeholder)
    _verl_losses.ppo_loss = sspo_ppo_loss
    _rebind(_BINDERS, "ppo_loss", _ORIGINAL_PPO_LOSS, sspo_ppo_loss)
    _verl_config.validate_config = _validate_config
    _rebind(_VALIDATE_BINDERS, "validate_config", _ORIGINAL_VALIDATE, _validate_config)
    _verl_rollout_corr.apply_bypass_mode = _apply_bypass_mode  # the trainers import it at call time
    if _fused_requested():
        install_fused()


def _rebind(modules: tuple[str, ...], name: str, original: Any, replacement: Any) -> None:
    """Point `module.name` at `replacement` in the modules already imported that bound `original` by name."""
    for module_name in modules:
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, name, None) is original:
            setattr(module, name, replacement)


install()
