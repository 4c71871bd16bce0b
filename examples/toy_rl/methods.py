"""The methods the demo and the tournament train: an objective at a granularity, with the package's
default widths and parameters for that pair (docs/loss.md, the tables at the top), passed explicitly
so the loop's own recomputation (measure.py) uses the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from examples.toy_rl.measure import BOUNDED, LossRule

SAPO = (("sapo_tau_pos", 1.0), ("sapo_tau_neg", 1.05))
VESPO = (("vespo_k_pos", 2.0), ("vespo_lambda_pos", 3.0), ("vespo_k_neg", 3.0), ("vespo_lambda_neg", 2.0))


@dataclass(frozen=True)
class Method:
    """A named objective at a granularity (`rule`)."""

    name: str
    rule: LossRule

    def loss_options(self, boundary: torch.Tensor) -> dict:
        """The keyword arguments of `sspo_loss_from_hidden` for this method."""
        r = self.rule
        options = dict(granularity=r.granularity, objective=r.objective, backend="torch")
        if r.objective in BOUNDED:
            options.update(eps_low=r.eps_low, eps_high=r.eps_high)
            options.update(entropy_gamma=r.entropy_gamma, k_min=r.k_min, k_max=r.k_max)
        options.update(r.params)
        options.update(log_ratio_clamp=r.log_ratio_clamp, entropy_ref="batch")
        if r.granularity == "subsentence":
            options["boundary"] = boundary
        return options

    def settings(self) -> dict:
        """What the JSON records about the method."""
        r = self.rule
        out = {"granularity": r.granularity, "objective": r.objective}
        if r.objective in BOUNDED:
            out.update(eps_low=r.eps_low, eps_high=r.eps_high, entropy_gamma=r.entropy_gamma)
        out.update(r.params)
        return out


def _rule(granularity: str, objective: str, widths: tuple[float, float] | None = None, **kw) -> LossRule:
    gamma = 0.5 if granularity == "subsentence" and widths is not None else 0.0  # adaptation: subsentence only
    low, high = widths or (0.0, 0.0)
    return LossRule(granularity, objective, low, high, entropy_gamma=gamma, **kw)


CLIP_WIDTHS = {"token": (0.2, 0.28), "sequence": (3e-4, 4e-4), "subsentence": (8e-3, 1.1e-2)}

# The demo's three: PPO-clip at each granularity.
DEFAULT_METHODS: tuple[Method, ...] = (
    Method("GRPO", _rule("token", "clip", CLIP_WIDTHS["token"])),
    Method("GSPO", _rule("sequence", "clip", CLIP_WIDTHS["sequence"])),
    Method("SSPO", _rule("subsentence", "clip", CLIP_WIDTHS["subsentence"])),
)

# The tournament: every objective at the granularities where it is meaningful. CISPO and SAPO come
# from token-level losses (their subsentence form is SSPO's unit); GMPO and VESPO from sequence-level
# ones (their subsentence form likewise); REINFORCE takes no ratio, so its granularity does not matter.
TOURNAMENT_METHODS: tuple[Method, ...] = (
    *DEFAULT_METHODS,
    Method("CISPO-token", _rule("token", "cispo", (1.0, 4.0))),
    Method("CISPO-subsentence", _rule("subsentence", "cispo", (1.0, 4.0))),
    Method("SAPO-token", _rule("token", "sapo", params=SAPO)),
    Method("SAPO-subsentence", _rule("subsentence", "sapo", params=SAPO)),
    Method("GMPO-sequence", _rule("sequence", "gmpo", (0.4, 0.4))),
    Method("GMPO-subsentence", _rule("subsentence", "gmpo", (0.4, 0.4))),
    Method("VESPO-sequence", _rule("sequence", "vespo", params=VESPO)),
    Method("VESPO-subsentence", _rule("subsentence", "vespo", params=VESPO)),
    Method("REINFORCE", _rule("token", "reinforce")),
)
