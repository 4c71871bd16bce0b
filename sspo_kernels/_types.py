"""The package's core types: the resolved options, the flattened inputs, what every path returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

# The policy objectives (docs/loss.md "Objectives"), the ones with clip bounds first.
BOUNDED_OBJECTIVES = ("clip", "cispo", "gmpo")
OBJECTIVES = (*BOUNDED_OBJECTIVES, "sapo", "vespo", "reinforce")

# The metrics every path returns, in this order (docs/loss.md "Outputs").
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
    "is_weight_mean",
    "is_weight_min",
    "is_weight_max",
    "is_masked_frac",
    "off_policy_masked_frac",
    "entropy_masked_frac",
    "dual_clip_frac",
    "cispo_clip_frac",
    "vespo_phi_mean",
)


@dataclass(frozen=True)
class LossConfig:
    """Every scalar option of the loss, validated, with the per-granularity defaults filled in
    (`sspo_kernels._options.make_config` builds it; docs/loss.md defines each)."""

    granularity: str
    eps_low: float
    eps_high: float
    entropy_gamma: float
    k_min: float
    k_max: float
    entropy_ref: str | float | torch.Tensor  # a 0-d fp32 tensor stays on its device
    adapt_low: bool
    adapt_high: bool
    dual_clip: float | None
    beta: float
    entropy_coef: float
    temperature: float
    loss_agg_mode: str
    log_ratio_clamp: float
    ratio_grad: str
    # the policy objective and its own parameters (docs/loss.md "Objectives")
    objective: str = "clip"
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    # off-policy corrections (docs/loss.md "Off-policy corrections"); they act only on the inputs they need
    rollout_is: str | None = "sequence"  # with rollout_logprobs: the unit of the importance weight
    rollout_is_mode: str = "mask"
    rollout_is_min: float | None = None
    rollout_is_max: float | None = 3.0
    off_policy_mask: float | None = None
    entropy_mask_quantile: float | None = None
    kl_ratio_weight: bool = False
    # the logits' transform before the temperature (docs/loss.md "Token quantities")
    logit_scale: float = 1.0
    logit_softcap: float | None = None

    @property
    def logit_transform(self) -> dict:
        """The vocabulary pass's keywords for the transform: scale, softcap."""
        return {"scale": self.logit_scale, "softcap": self.logit_softcap}

    @property
    def has_bounds(self) -> bool:
        """Whether the objective uses the clip bounds lo_s, hi_s (and so the entropy adaptation)."""
        return self.objective in BOUNDED_OBJECTIVES

    @property
    def ratio_slope(self) -> bool:
        """Whether the policy term's gradient flows through the unit's ratio (else through l_t directly)."""
        return self.objective in ("clip", "sapo", "gmpo")


class SSPOOutput(NamedTuple):
    """What every path returns (docs/loss.md "Outputs")."""

    loss: torch.Tensor  # 0-d, or per token (shaped like tokens) for loss_agg_mode="none"
    logprobs: torch.Tensor  # per-token l_t, detached, zero where masked out
    entropy: torch.Tensor  # per-token H_t, detached, zero where masked out
    metrics: dict[str, torch.Tensor]  # detached device tensors, never Python floats


class VocabStats(NamedTuple):
    """What a vocabulary pass's forward returns and its backward takes back: (N,) fp32 each, 0 where
    masked out, and the row statistics (..., N) that one backward reuses (None for the others)."""

    logp: torch.Tensor  # l_t = log p_t[y_t]
    entropy: torch.Tensor  # H_t
    lse: torch.Tensor  # logsumexp of z_t / tau
    rows: torch.Tensor | None = None  # the torch pass's (5, N) fp32 row max and sums


@dataclass(frozen=True)
class Layout:
    """Shape, vocabulary and device of a call's per-token inputs, read from the tensor that carries the
    vocabulary (logits, or hidden states with the output weight, or per-token log-probs)."""

    token_shape: tuple[int, ...]  # (B, T) padded, (N,) flat or packed
    vocab_size: int | None  # None when no tensor has the vocabulary (log-probs given directly)
    device: torch.device


@dataclass
class FlatBatch:
    """The per-token inputs flattened to `(N,)`, on the layout's device, in the dtypes given."""

    tokens: torch.Tensor  # (N,) int64, -100 allowed where masked out
    mask: torch.Tensor  # (N,) bool
    old_logprobs: torch.Tensor | None  # (N,) floating; None: on-policy (the rollout policy is the current one)
    advantages: torch.Tensor  # (N,) floating, broadcast from per-response values (B,) unless `lean`
    ref_logprobs: torch.Tensor | None  # (N,) floating
    response_ids: torch.Tensor | None  # (N,) int64 response index of each token; None when `lean`
    segment_ids: torch.Tensor | None  # (N,) int64, caller-given ids for granularity "segments"
    boundary: torch.Tensor | None  # (V,) bool
    num_responses: int
    seq_len: int | None  # T of a padded batch (the default norm_len), None for a packed one
    token_shape: tuple[int, ...]  # shape of the per-token outputs: (B, T) or (N,)
    normalizer: torch.Tensor | None  # 0-d float32 caller-given normaliser, or None
    norm_len: float | None
    cu_seqlens: torch.Tensor | None = None  # (B + 1,) int64 on the device, for a packed batch
    # (N,) any float (or (B,) per response when `lean`), detached: w_t multiplying the policy term
    policy_weights: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None  # (N,) any float: v_t, the sampler's log-probs
    entropy_mask_group: object | None = None  # the process group whose entropies set the entropy-mask quantile
    # lean: for a fused segment step that numbers the responses and bounds the token ids itself
    # (`ops/objective_triton.py`): response_ids is None, advantages may stay (B,) per response, and
    # token_bound (V) is still to be checked at masked-in tokens
    lean: bool = False
    token_bound: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]
