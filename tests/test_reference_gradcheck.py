"""The float64 reference against docs/loss.md: gradcheck through every option.

Helpers shared with the other test_reference_*.py files live in `_reference_helpers`.
"""

from __future__ import annotations

import pytest
import torch
from _cases import Batch, make_batch, pack
from _reference_helpers import (
    AGG_MODES,
    BASE,
    run,
    spec_terms,
)

# --------------------------------------------------------------------------------------------------
# gradcheck through every option
# --------------------------------------------------------------------------------------------------

MARGIN = 1e-3  # no ratio, log-ratio or entropy weight this close to a kink of the piecewise loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _screen(batch: Batch, opts: dict) -> set[str] | None:
    """What the case exercises, or None when some quantity sits near a kink.

    Besides the usual kinks (clip bounds, log-ratio clamp, dual clip, k_min / k_max), a token on the
    clipped branch of an adapted bound whose k is not saturated is rejected too: its loss moves with
    Hbar, which finite differences see but the contract's detached gradient rightly does not.
    """
    t = spec_terms(batch, batch.logits.detach(), opts)
    seg, adv = t.seg, t.adv
    rho, lo, hi = t.rho[seg], t.lo[seg], t.hi[seg]
    near = lambda x, y: bool(((x - y).abs() < MARGIN).any())
    if near(rho, lo) or near(rho, hi) or near(t.d.abs(), opts.get("log_ratio_clamp", 20.0)):
        return None
    if opts.get("dual_clip") is not None and near(rho[adv < 0], opts["dual_clip"]):
        return None
    adaptive = opts["entropy_gamma"] != 0 and t.h_ref != 0
    if adaptive:
        k_raw = t.k_raw[seg]
        if near(k_raw, opts.get("k_min", 0.5)) or near(k_raw, opts.get("k_max", 2.0)):
            return None
        moving = (k_raw > opts.get("k_min", 0.5)) & (k_raw < opts.get("k_max", 2.0))
        moving_low = t.clip_low & moving & opts.get("adapt_low", True)
        moving_high = t.clip_high & moving & opts.get("adapt_high", True)
        if (moving_low | moving_high).any():
            return None
    seen = set()
    clipped = t.clip_low | t.clip_high
    if clipped.any():
        seen.add("clip")
    if (~clipped).any():
        seen.add("unclipped")
    if bool((t.d.abs() > opts.get("log_ratio_clamp", 20.0)).any()):
        seen.add("clamp")
    if opts.get("dual_clip") is not None and bool(((adv < 0) & (rho > opts["dual_clip"])).any()):
        seen.add("dual")
    if adaptive:
        plain_low = (adv < 0) & (rho < 1 - opts["eps_low"])
        plain_high = (adv > 0) & (rho > 1 + opts["eps_high"])
        if bool(((plain_low | plain_high) != clipped).any()):
            seen.add("adapt")  # some clip decision differs from the one with k = 1
    return seen


GRADCHECK_CASES = [
    # (id, make_batch keywords, sspo_loss keywords, what the inputs must exercise)
    ("token", {}, dict(granularity="token", **BASE), {"clip", "unclipped"}),
    ("sequence", {}, dict(granularity="sequence", **BASE), {"clip", "unclipped"}),
    ("subsentence", {}, dict(granularity="subsentence", **BASE), {"clip", "unclipped"}),
    ("sentence", {}, dict(granularity="sentence", **BASE), {"clip", "unclipped"}),
    ("segments", {}, dict(granularity="segments", **BASE), {"clip", "unclipped"}),
    *[
        (f"agg_{mode}", {"hole_p": 0.2}, dict(granularity="subsentence", loss_agg_mode=mode, **BASE), {"clip"})
        for mode in AGG_MODES
    ],
    ("temperature0.7", {}, dict(granularity="subsentence", temperature=0.7, **BASE), {"clip"}),
    ("kl_beta0.2", {}, dict(granularity="subsentence", beta=0.2, **BASE), {"clip"}),
    ("entropy_coef0.05", {}, dict(granularity="subsentence", entropy_coef=0.05, **BASE), {"clip"}),
    ("dual_clip1.3", {"log_ratio_scale": 0.5}, dict(granularity="token", dual_clip=1.3, **BASE), {"dual"}),
    ("clamp_binds-exact", {"log_ratio_scale": 0.5},
     dict(granularity="sequence", log_ratio_clamp=0.3, **BASE), {"clamp", "unclipped"}),
    ("clamp_binds-ratio_grad_token", {"log_ratio_scale": 0.5},
     dict(granularity="sequence", log_ratio_clamp=0.3, ratio_grad="token", **BASE), {"clamp", "unclipped"}),
    ("ratio_grad_exact-adv_per_token", {"per_token_adv": True},
     dict(granularity="subsentence", ratio_grad="exact", **BASE), {"clip", "unclipped"}),
    # the stop-gradient form is the true gradient only when A is constant inside each segment
    ("ratio_grad_token-adv_per_response", {},
     dict(granularity="subsentence", ratio_grad="token", **BASE), {"clip", "unclipped"}),
    ("gamma1-adapt_both", {"logit_scale": 2.0},
     dict(granularity="subsentence", eps_low=0.1, eps_high=0.15, entropy_gamma=1.0), {"adapt"}),
    ("gamma1-adapt_low_only", {"logit_scale": 2.0},
     dict(granularity="subsentence", eps_low=0.1, eps_high=0.15, entropy_gamma=1.0, adapt_high=False), {"adapt"}),
    ("gamma1-adapt_high_only", {"logit_scale": 2.0},
     dict(granularity="subsentence", eps_low=0.1, eps_high=0.15, entropy_gamma=1.0, adapt_low=False), {"adapt"}),
    ("gamma2-entropy_ref1.2", {"logit_scale": 2.0},
     dict(granularity="sequence", eps_low=0.1, eps_high=0.15, entropy_gamma=2.0, entropy_ref=1.2), {"adapt"}),
    ("normalizer7", {}, dict(granularity="subsentence", normalizer=7.0, **BASE), {"clip"}),
    ("normalizer_tensor-seq_mean_token_mean", {},
     dict(granularity="subsentence", normalizer=torch.tensor(5.0), loss_agg_mode="seq-mean-token-mean", **BASE),
     {"clip"}),
    ("packed", {"packed": True}, dict(granularity="subsentence", **BASE), {"clip", "unclipped"}),
    ("packed-sum_norm", {"packed": True},
     dict(granularity="sequence", loss_agg_mode="seq-mean-token-sum-norm", norm_len=6, **BASE), {"clip"}),
]  # fmt: skip


@pytest.mark.parametrize(("batch_kw", "opts", "needs"), [pytest.param(b, o, n, id=i) for i, b, o, n in GRADCHECK_CASES])
def test_gradcheck(batch_kw, opts, needs):
    batch_kw = dict(batch_kw)
    packed = batch_kw.pop("packed", False)
    lengths = [4, 0, 1, 5] if packed else [5, 3, 4]
    for seed in range(400):
        batch = make_batch(100 + seed, lengths, vocab=6, **batch_kw)
        batch = pack(batch) if packed else batch
        seen = _screen(batch, opts)
        if seen is not None and needs <= seen:
            break
    else:
        pytest.fail(f"no kink-free seed exercises {needs}")

    def loss_of(logits):
        return run(batch, logits, **dict(opts))[1].loss

    assert torch.autograd.gradcheck(loss_of, (batch.fresh_logits(),), eps=1e-6, atol=1e-7, rtol=1e-5)
