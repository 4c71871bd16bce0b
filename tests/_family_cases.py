"""Options of the objective family and the off-policy corrections for the tests (docs/loss.md
"Off-policy corrections", "Objectives"): each objective with its bounds, and each correction with
random weights and sampler log-probs (NaN at some tokens) for a batch."""

from __future__ import annotations

import torch
from _cases import Batch

OBJECTIVES = ["clip", "cispo", "sapo", "gmpo", "vespo", "reinforce"]
BOUNDED = {"clip", "cispo", "gmpo"}
AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "sum", "none"]
# every correction, one at a time or together; the cases below rotate through them
CORRECTIONS = {
    "none": {},
    "policy-token": dict(policy="token"),
    "policy-response": dict(policy="response"),
    "rollout-token-mask": dict(rollout="token", rollout_is_min=0.7, rollout_is_max=1.4),
    "rollout-segment-truncate": dict(rollout="segment", rollout_is_mode="truncate", rollout_is_max=1.2),
    "rollout-sequence-mask": dict(rollout="sequence", rollout_is_min=0.3, rollout_is_max=3.0),
    "off-policy-old": dict(off_policy_mask=0.02),
    "off-policy-rollout": dict(off_policy_mask=0.0, rollout=None),
    "entropy-mask": dict(entropy_mask_quantile=0.6),
    "kl-ratio": dict(beta=0.2, kl_ratio_weight=True),
    "everything": dict(policy="token", rollout="token", off_policy_mask=0.05, entropy_mask_quantile=0.8, beta=0.1,
                       kl_ratio_weight=True, entropy_coef=0.01),
}  # fmt: skip


def build_options(batch: Batch, objective: str, correction: str, seed: int) -> dict:
    """sspo_loss keywords for this objective and correction on `batch` (random weights and sampler
    log-probs near the old ones, with NaN at some masked-in and masked-out tokens)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    spec = dict(CORRECTIONS[correction])
    opts: dict = {"objective": objective}
    if objective in BOUNDED:
        opts.update(eps_low=0.1, eps_high=0.15, entropy_gamma=1.0)
    policy = spec.pop("policy", None)
    if policy == "token":
        opts["policy_weights"] = torch.rand(batch.tokens.shape, generator=gen, dtype=torch.float64) * 2
    elif policy == "response":
        opts["policy_weights"] = torch.rand(batch.num_responses, generator=gen, dtype=torch.float64) * 2
    level = spec.pop("rollout", "absent")
    if level != "absent":
        v = batch.old_logprobs + 0.2 * torch.randn(batch.tokens.shape, generator=gen, dtype=torch.float64)
        v[torch.rand(batch.tokens.shape, generator=gen) < 0.15] = float("nan")  # unscored tokens, in and out
        opts["rollout_logprobs"] = v
        opts["rollout_is"] = "token" if objective == "vespo" and level is not None else level
        if objective == "vespo" and "rollout_is_mode" in spec:  # vespo's weights are token-level
            spec.pop("rollout_is_mode")
    else:
        spec = {k: v for k, v in spec.items() if not k.startswith("rollout_is")}
    opts.update(spec)
    return opts


__all__ = ["AGG_MODES", "BOUNDED", "CORRECTIONS", "OBJECTIVES", "build_options"]
