"""The RL loop: group-sampled rollouts, group-normalised advantages, PPO epochs on the package's loss.

Per iteration: `prompts` problems, `group` samples each; the rollout's old log-probs come from the
loss itself (a no-grad call on the rollout, whose returned `logprobs` are the rollout policy's; the
sampler's own log-probs are kept only to check them); then `epochs` passes of `minibatches` updates
each, every one a call of `sspo_loss_from_hidden` on the GRU's hidden states and the output layer,
with the loop's own measurements (`measure.py`) beside the loss's metrics.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from examples.toy_rl.measure import HARD_CLIP, gradient_counts, recompute_metrics, segment_index
from examples.toy_rl.methods import DEFAULT_METHODS, Method
from examples.toy_rl.policy import GRUPolicy
from examples.toy_rl.task import SortTask
from sspo_kernels import sspo_loss_from_hidden

# What the loss reports and the loop recomputes, per update (the curves average them per iteration).
CHECKED_METRICS = (
    "clip_frac_low", "clip_frac_high", "clip_frac", "ratio_min", "ratio_max", "approx_kl", "vespo_phi_mean",
)  # fmt: skip
__all__ = ["DEFAULT_METHODS", "Method", "RLConfig", "evaluate", "run_method", "summarise_run"]


@dataclass(frozen=True)
class RLConfig:
    iterations: int = 50
    prompts: int = 32
    group: int = 8
    epochs: int = 4
    minibatches: int = 4
    lr: float = 5e-4


@dataclass
class RunLog:
    """Per-update and per-iteration records of one method's run."""

    updates: list[dict] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def add_curve_point(self, name: str, value: float) -> None:
        self.curves.setdefault(name, []).append(value)


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(B,) rewards in consecutive groups -> (r - group mean) / group std; exactly 0 for a group of
    equal rewards (no learning signal)."""
    r = rewards.double().view(-1, group)
    std = r.std(dim=1, keepdim=True)
    adv = (r - r.mean(dim=1, keepdim=True)) / std.clamp(min=1e-6)
    return torch.where(std > 1e-9, adv, 0.0).view(-1).float()


def evaluate(policy: GRUPolicy, task: SortTask, problems: list[list[int]], seed: int) -> float:
    """Mean reward of one sample per problem, drawn with a fixed sampling seed."""
    generator = torch.Generator().manual_seed(seed)
    tokens, mask, _ = policy.sample(task.encode_prompts(problems), task.response_len, generator)
    return float(task.rewards(problems, tokens, mask).mean())


def _update(policy, opt, method, boundary, batch, old_logprobs) -> dict:
    """One PPO step on a minibatch; returns the loss's metrics and the loop's measurements."""
    prompts, tokens, mask, adv = batch
    hidden = policy.response_hidden(prompts, tokens)
    hidden.retain_grad()
    out = sspo_loss_from_hidden(
        hidden, policy.head.weight, tokens, old_logprobs, adv, mask, bias=policy.head.bias,
        **method.loss_options(boundary),
    )  # fmt: skip
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()

    reported = {k: float(out.metrics[k]) for k in CHECKED_METRICS}
    seg = segment_index(tokens, mask, method.rule.granularity, boundary)
    mine = recompute_metrics(out.logprobs, old_logprobs, out.entropy, mask, seg, adv, method.rule)
    grads = gradient_counts(hidden.grad, mask, adv)
    n_tokens = int(mask.sum())
    predicted = mine["predicted_zero_grad"] & grads["active"][:, None]
    negligible = mine["negligible"] & grads["active"][:, None]  # either answer is right there
    in_doubt = negligible.any(dim=1)
    return {
        **reported,
        "recomputed": {k: mine[k] for k in CHECKED_METRICS},
        "tokens": n_tokens,
        "clipped_tokens_reported": round(reported["clip_frac"] * n_tokens),
        "clipped_tokens_recomputed": mine["clipped_tokens"],
        "bound_margin": mine["bound_margin"],
        "zero_grad_tokens": int(grads["zero_grad_tokens"]),
        "zero_grad_predicted": int(predicted.sum()),
        "zero_grad_mismatch": int(((grads["zero_grad"] != predicted) & ~negligible).sum()),
        "negligible_tokens": int(negligible.sum()),
        "active": int(grads["active"].sum()),
        "active_tokens": int(grads["active_tokens"]),
        "fully_clipped": int(grads["fully_clipped"].sum()),
        "fully_clipped_predicted": int(mine["predicted_fully_clipped"].sum()),
        "fully_clipped_mismatch": int(((grads["fully_clipped"] != mine["predicted_fully_clipped"]) & ~in_doubt).sum()),
    }


def _iteration_summary(log: RunLog, updates: list[dict], reward: float) -> None:
    log.add_curve_point("reward", reward)
    for k in ("clip_frac_low", "clip_frac_high", "clip_frac", "approx_kl"):
        log.add_curve_point(k, sum(u[k] for u in updates) / len(updates))
    log.add_curve_point("ratio_min", min(u["ratio_min"] for u in updates))
    log.add_curve_point("ratio_max", max(u["ratio_max"] for u in updates))
    active = sum(u["active"] for u in updates)
    log.add_curve_point("fully_clipped", sum(u["fully_clipped"] for u in updates) / max(active, 1))


def run_method(
    policy: GRUPolicy,
    task: SortTask,
    method: Method,
    cfg: RLConfig,
    boundary: torch.Tensor,
    seed: int,
) -> RunLog:
    """Train `policy` in place with `method`; the data and sampling stream depend on `seed` only, so
    every method sees the same first rollout."""
    data_gen = torch.Generator().manual_seed(seed)
    sample_gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    log = RunLog()
    start = time.perf_counter()
    for _ in range(cfg.iterations):
        problems = task.sample(cfg.prompts, data_gen)
        problems = [p for p in problems for _ in range(cfg.group)]
        prompts = task.encode_prompts(problems)
        tokens, mask, sampling_logprobs = policy.sample(prompts, task.response_len, sample_gen)
        rewards = task.rewards(problems, tokens, mask)
        adv = group_advantages(rewards, cfg.group)
        with torch.no_grad():
            hidden = policy.response_hidden(prompts, tokens)
            rollout = sspo_loss_from_hidden(
                hidden, policy.head.weight, tokens, sampling_logprobs, adv, mask, bias=policy.head.bias,
                **method.loss_options(boundary),
            )  # fmt: skip
        old_logprobs = rollout.logprobs
        gap = float((old_logprobs - sampling_logprobs).abs().max())
        updates = []
        for _ in range(cfg.epochs):
            order = torch.randperm(len(problems), generator=sample_gen)
            for idx in order.chunk(cfg.minibatches):
                batch = (prompts[idx], tokens[idx], mask[idx], adv[idx])
                updates.append(_update(policy, opt, method, boundary, batch, old_logprobs[idx]))
        updates[0]["old_logprob_gap"] = gap
        log.updates.extend(updates)
        _iteration_summary(log, updates, float(rewards.mean()))
    log.seconds = time.perf_counter() - start
    return log


def summarise_run(log: RunLog, objective: str = "clip") -> dict:
    """Run-level numbers: clip fractions and KL averaged over updates, ratio range over all updates,
    fully clipped = fully clipped responses / responses with A != 0 over all updates, utilisation =
    1 - fully clipped (responses with A != 0 that got a non-zero gradient), token utilisation = the
    same share of their tokens; and `checks`, the largest gaps between the loss's metrics and the
    loop's measurements (`clipped_vs_zero_grad_tokens` only for objectives whose clip stops a gradient)."""
    ups = log.updates
    mean = lambda k: sum(u[k] for u in ups) / len(ups)
    total = lambda k: sum(u[k] for u in ups)
    active = total("active")
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)
    differing = [
        u for u in ups
        if u["clipped_tokens_reported"] != u["clipped_tokens_recomputed"] or u["zero_grad_mismatch"]
        or u["fully_clipped_mismatch"]
    ]  # fmt: skip
    # clip fractions: on the updates where the loss and the loop count the same tokens clipped (the others
    # are listed by `updates_with_a_difference` and the margin of their nearest tie)
    agreeing = [u for u in ups if u["clipped_tokens_reported"] == u["clipped_tokens_recomputed"]] or [ups[0]]
    checks = {
        f"max_abs_diff_{k}": max(abs(u[k] - u["recomputed"][k]) for u in agreeing)
        for k in ("clip_frac_low", "clip_frac_high", "clip_frac")
    }
    for k in ("approx_kl", "vespo_phi_mean"):
        checks[f"max_abs_diff_{k}"] = max(abs(u[k] - u["recomputed"][k]) for u in ups)
    checks["max_rel_diff_ratio_range"] = max(
        max(rel(u["ratio_min"], u["recomputed"]["ratio_min"]), rel(u["ratio_max"], u["recomputed"]["ratio_max"]))
        for u in ups
    )
    checks["zero_grad_vs_predicted_tokens"] = total("zero_grad_mismatch")
    if objective in HARD_CLIP:
        checks["clipped_vs_zero_grad_tokens"] = sum(
            abs(u["clipped_tokens_reported"] - u["zero_grad_tokens"]) for u in ups
        )
    checks["clipped_tokens_reported_vs_recomputed"] = sum(
        abs(u["clipped_tokens_reported"] - u["clipped_tokens_recomputed"]) for u in ups
    )
    checks["updates_with_a_difference"] = len(differing)
    margins = [u["bound_margin"] for u in differing]
    checks["max_bound_margin_where_counts_differ"] = max((1.0 if m is None else m for m in margins), default=0.0)
    checks["fully_clipped_vs_predicted"] = total("fully_clipped_mismatch")
    checks["negligible_grad_tokens"] = total("negligible_tokens")
    checks["max_old_logprob_gap"] = max(u.get("old_logprob_gap", 0.0) for u in ups)
    fully = total("fully_clipped") / max(active, 1)
    return {
        "clip_frac_low": mean("clip_frac_low"),
        "clip_frac_high": mean("clip_frac_high"),
        "clip_frac": mean("clip_frac"),
        "fully_clipped": fully,
        "utilisation": 1.0 - fully if active else 0.0,
        "token_utilisation": 1.0 - total("zero_grad_tokens") / max(total("active_tokens"), 1),
        "ratio_min": min(u["ratio_min"] for u in ups),
        "ratio_max": max(u["ratio_max"] for u in ups),
        "approx_kl": mean("approx_kl"),
        "num_updates": len(ups),
        "active_responses": active,
        "seconds": log.seconds,
        "checks": checks,
    }


def config_dict(cfg: RLConfig) -> dict:
    return asdict(cfg)
