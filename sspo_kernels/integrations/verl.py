"""verl adapter: `policy_loss.loss_mode="sspo"` in verl's actor, through `sspo_loss_from_logprobs`.

verl's registered policy losses see log-probs only (no token ids, no entropies), so this module wraps the actor's
whole loss function, `verl.workers.utils.losses.ppo_loss(config, model_output, data, dp_group)`: `sspo_ppo_loss`
handles `loss_mode == "sspo"` and hands every other mode to verl's own `ppo_loss`. Importing this module installs
it (verl imports it in every worker through the `verl.plugins` entry point `sspo`); `install()` is idempotent.

Options live in the actor's `policy_loss` node, typed by `SSPOPolicyLossConfig` (select it with
`actor_rollout_ref.actor.policy_loss._target_=sspo_kernels.integrations.verl.SSPOPolicyLossConfig`). The
normalisers come from verl's global batch info (`batch_num_tokens`, `global_batch_size`, `dp_size`,
`loss_scale_factor`), and the entropy bonus and KL loss are verl's own code, applied as verl applies them.

Fused forward: with `SSPO_VERL_FUSED=1` in the workers' environment (read when this module is imported), or after
`install_fused()`, verl's fused-kernel forward (`actor_rollout_ref.model.use_fused_kernels=True` with
`fused_kernel_options.impl_backend=triton` on FSDP; Megatron's fused forward) calls `linear_cross_entropy` below,
backed by `sspo_kernels.token_logprobs_from_hidden`, instead of verl's own kernel: the actor, old-log-prob and
reference passes then run this package's kernels, and every `loss_mode` sees their log-probs and entropies.

Written against verl 0.9.1.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import verl.workers.utils.losses as _verl_losses
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, agg_loss, kl_penalty, register_policy_loss
from verl.utils.metric import AggregationType, Metric
from verl.workers.config import PolicyLossConfig
from verl.workers.utils.padding import no_padding_2_padding

from sspo_kernels import sspo_loss_from_logprobs, token_logprobs_from_hidden
from sspo_kernels.integrations._common import build_boundary, check_options, drop_none, text_tokenizer

__all__ = [
    "FUSED_ENV",
    "LOSS_MODE",
    "SSPOPolicyLossConfig",
    "install",
    "install_fused",
    "linear_cross_entropy",
    "sspo_ppo_loss",
]

LOSS_MODE = "sspo"
# Modules that bind `ppo_loss` by name at import (`from verl.workers.utils.losses import ppo_loss`).
_BINDERS = ("verl.workers.engine_workers", "verl.trainer.distillation.losses")
# The switch of the fused forward, and where verl defines and binds its `linear_cross_entropy`: the FSDP forwards
# (`verl/models/transformers/*.py`) import it from `_KERNEL_MODULE` at call time, Megatron's at import.
FUSED_ENV = "SSPO_VERL_FUSED"
_KERNEL_MODULE = "verl.utils.kernel.linear_cross_entropy"
_FUSED_BINDERS = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")


@dataclass
class SSPOPolicyLossConfig(PolicyLossConfig):
    """verl's `PolicyLossConfig` plus the sspo_kernels options (used when `loss_mode == "sspo"`).

    - `granularity`: "subsentence" (default), "sentence" (boundary table from the actor's tokenizer;
      `boundary_chars` overrides the characters), "sequence" or "token".
    - `eps_low` / `eps_high`: clip widths; None = the actor's `clip_ratio_low` / `clip_ratio_high` at token and
      sequence granularity, the package's defaults at (sub)sentence granularity.
    - `dual_clip`: apply the actor's `clip_ratio_c` for negative advantages (as verl's `vanilla` does).
    - `entropy_gamma`, `k_min`, `k_max`, `entropy_ref` (None = the micro-batch's mean entropy), `adapt_low`,
      `adapt_high`: entropy-adaptive clip; it needs `actor.calculate_entropy=True`.
    - `log_ratio_clamp`, `ratio_grad` ("exact" | "token": verl's `gspo` form), `backend`: package settings.
    """

    granularity: str = "subsentence"
    boundary_chars: str | None = None
    eps_low: float | None = None
    eps_high: float | None = None
    dual_clip: bool = True
    entropy_gamma: float | None = None
    k_min: float | None = None
    k_max: float | None = None
    entropy_ref: float | None = None
    adapt_low: bool = True
    adapt_high: bool = True
    log_ratio_clamp: float = 20.0
    ratio_grad: str = "exact"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.granularity is None:
            raise ValueError("policy_loss.granularity must be set (subsentence, sentence, sequence or token)")
        check_options("policy_loss", _fields(self))
        if not isinstance(self.dual_clip, bool):
            raise TypeError(f"policy_loss.dual_clip must be a bool, got {self.dual_clip!r}")


_OPTION_NAMES = (
    "granularity",
    "boundary_chars",
    "eps_low",
    "eps_high",
    "entropy_gamma",
    "k_min",
    "k_max",
    "entropy_ref",
    "adapt_low",
    "adapt_high",
    "log_ratio_clamp",
    "ratio_grad",
    "backend",
)


def _fields(policy_loss: Any) -> dict[str, Any]:
    """The sspo options of a policy-loss config node; a plain `PolicyLossConfig` gives the defaults."""
    defaults = SSPOPolicyLossConfig.__dataclass_fields__
    return {name: policy_loss.get(name, defaults[name].default) for name in _OPTION_NAMES}


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


def _aggregation(config: Any, data: Any, horizon: int) -> tuple[dict[str, Any], float]:
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


def _policy_options(config: Any) -> dict[str, Any]:
    """Options of `sspo_loss_from_logprobs` from the actor config (clip widths, dual clip, package settings)."""
    fields = _fields(config.policy_loss)
    check_options("policy_loss", fields)
    g = fields["granularity"]
    follow_verl = g in ("token", "sequence")
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    opts = {
        name: fields[name]
        for name in _OPTION_NAMES
        if name not in ("boundary_chars", "eps_low", "eps_high") and fields[name] is not None
    }
    opts["eps_low"] = fields["eps_low"] if fields["eps_low"] is not None or not follow_verl else low
    opts["eps_high"] = fields["eps_high"] if fields["eps_high"] is not None or not follow_verl else high
    if config.policy_loss.get("dual_clip", True):
        opts["dual_clip"] = config.get("clip_ratio_c", 3.0)
    if g in ("subsentence", "sentence"):
        opts["boundary"] = _boundary(config, g, fields["boundary_chars"])
    return drop_none(opts)


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
    aggregation = AggregationType.SUM if global_norm else AggregationType.MEAN
    agg, factor = _aggregation(config, data, log_prob.shape[1])

    if "rollout_is_weights" in data:
        raise ValueError("loss_mode='sspo' does not apply rollout-correction weights; turn rollout_correction off")
    fields = ["response_mask", "old_log_probs", "advantages"] + (["ref_log_prob"] if "ref_log_prob" in data else [])
    batch = data.select(*fields).to_padded_tensor()
    mask = batch["response_mask"].to(torch.bool)

    opts = _policy_options(config)
    gamma = opts.get("entropy_gamma")
    adaptive = gamma != 0 if gamma is not None else opts["granularity"] in ("subsentence", "sentence")
    if adaptive and entropy is None:
        raise ValueError(
            "loss_mode='sspo' with entropy adaptation needs the entropies: set actor.calculate_entropy=True "
            "(or policy_loss.entropy_gamma=0)"
        )
    out = sspo_loss_from_logprobs(
        log_prob,
        None if entropy is None else entropy.detach(),
        tokens,
        batch["old_log_probs"],
        batch["advantages"],
        mask,
        **opts,
        **agg,
    )
    pg_loss = out.loss * factor if factor != 1.0 else out.loss
    m = out.metrics
    metrics: dict[str, Any] = Metric.from_dict(
        {
            "actor/pg_clipfrac": m["clip_frac"].item(),
            "actor/ppo_kl": m["approx_kl"].item(),
            **{f"actor/sspo/{k}": m[k].float().item() for k in ("ratio_mean", "ratio_min", "ratio_max")},
            **{f"actor/sspo/{k}": m[k].float().item() for k in ("num_segments", "mean_segment_len")},
        },
        aggregation=AggregationType.MEAN,
    )
    metrics["actor/pg_loss"] = Metric(value=pg_loss, aggregation=aggregation)
    loss = pg_loss

    if entropy is not None:  # verl's entropy bonus, exactly as its ppo_loss applies it
        entropy_loss = agg_loss(loss_mat=entropy, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **info)
        loss = loss - config.entropy_coeff * entropy_loss
        metrics["actor/entropy_loss"] = Metric(value=entropy_loss, aggregation=aggregation)
    if config.use_kl_loss:  # verl's KL loss, exactly as its ppo_loss applies it
        kld = kl_penalty(logprob=log_prob, ref_logprob=batch["ref_log_prob"], kl_penalty=config.kl_loss_type)
        kl_loss = agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **info)
        loss = loss + kl_loss * config.kl_loss_coef
        metrics["kl_loss"] = Metric(value=kl_loss, aggregation=aggregation)
        metrics["kl_coef"] = config.kl_loss_coef
    return loss, metrics


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


def install() -> None:
    """Make verl's actor use `sspo_ppo_loss` (idempotent): replace `ppo_loss` in verl's losses module and in the
    modules already imported that bound it by name, and register `loss_mode="sspo"` in verl's registry. With
    `SSPO_VERL_FUSED=1` in the environment, also `install_fused()`."""
    if LOSS_MODE not in POLICY_LOSS_REGISTRY:
        register_policy_loss(LOSS_MODE)(_registered_placeholder)
    _verl_losses.ppo_loss = sspo_ppo_loss
    for name in _BINDERS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "ppo_loss", None) is _ORIGINAL_PPO_LOSS:
            module.ppo_loss = sspo_ppo_loss
    if _fused_requested():
        install_fused()


install()
