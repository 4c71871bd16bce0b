"""The float64 reference against docs/loss.md "Off-policy corrections": policy weights, the rollout importance
weight, the off-policy sequence mask, the entropy mask and the ratio-weighted KL.

Expected values come from `spec_terms` (a vectorised restatement in `_reference_helpers`), from hand-built cases
and from the contract's equivalences. The objectives have their own file, test_reference_objectives.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import make_batch, pack
from _reference_helpers import (
    BASE,
    EXACT,
    METRICS,
    assert_matches_spec,
    grad_of,
    rollout_for,
    run,
    spec_quantile,
    spec_terms,
    token_logp_entropy,
    weights_for,
    with_zero_advantages,
)

import reference.corrections
from reference import sspo_loss

pytestmark = pytest.mark.usefixtures("one_thread")

GRANULARITIES = ("token", "sequence", "subsentence", "segments")
LENGTHS = [5, 0, 3, 6, 4]  # an empty response; not powers of two


def _f64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _batch(seed: int, packed: bool, per_token_adv: bool = False, **kw):
    batch = make_batch(seed, LENGTHS, seq_len=7, per_token_adv=per_token_adv, hole_p=0.2, **kw)
    return pack(batch) if packed else batch


# Each case: (id, options given the batch, what the spec's metrics must show: the case exercises its option).
CASES = [
    ("policy_weights-per_token", lambda b: dict(policy_weights=weights_for(b, 1)), None),
    ("policy_weights-per_response", lambda b: dict(policy_weights=weights_for(b, 2, per_response=True)), None),
    ("rollout_token-mask-min0.8", lambda b: dict(rollout_logprobs=rollout_for(b, 3), rollout_is="token",
                                                 rollout_is_min=0.8, rollout_is_max=1.25), "masks"),
    ("rollout_token-truncate", lambda b: dict(rollout_logprobs=rollout_for(b, 4), rollout_is="token",
                                              rollout_is_mode="truncate", rollout_is_min=0.8, rollout_is_max=1.2),
     "truncates"),
    ("rollout_segment-mask", lambda b: dict(rollout_logprobs=rollout_for(b, 5), rollout_is="segment",
                                            rollout_is_max=1.3), "masks"),
    ("rollout_segment-truncate-max_only", lambda b: dict(rollout_logprobs=rollout_for(b, 6), rollout_is="segment",
                                                         rollout_is_mode="truncate", rollout_is_max=1.3), "truncates"),
    ("rollout_sequence-defaults", lambda b: dict(rollout_logprobs=rollout_for(b, 7, scale=1.2)), "masks"),
    ("rollout_sequence-truncate-no_bounds",
     lambda b: dict(rollout_logprobs=rollout_for(b, 8), rollout_is_mode="truncate", rollout_is_max=None), None),
    ("rollout_off", lambda b: dict(rollout_logprobs=rollout_for(b, 9), rollout_is=None), None),
    ("off_policy_mask-from_rollout", lambda b: dict(rollout_logprobs=rollout_for(b, 10) + 0.4, rollout_is=None,
                                                    off_policy_mask=0.0), "off"),
    ("off_policy_mask-from_old", lambda b: dict(off_policy_mask=0.05), "off"),
    ("entropy_mask0.4", lambda b: dict(entropy_mask_quantile=0.4), "ent"),
    ("entropy_mask1", lambda b: dict(entropy_mask_quantile=1.0), None),
    ("kl_ratio_weight", lambda b: dict(kl_ratio_weight=True, beta=0.3), None),
    ("kl_ratio_weight-ratio_grad_token", lambda b: dict(kl_ratio_weight=True, beta=0.3, ratio_grad="token"), None),
    ("everything", lambda b: dict(policy_weights=weights_for(b, 11), rollout_logprobs=rollout_for(b, 12, nan_in=1),
                                  rollout_is="segment", rollout_is_min=0.7, off_policy_mask=0.02,
                                  entropy_mask_quantile=0.7, kl_ratio_weight=True, beta=0.2, entropy_coef=0.05), None),
]  # fmt: skip


def _exercised(batch, opts, needs) -> None:
    m = spec_terms(batch, batch.logits.detach(), opts).metrics
    if needs == "masks":
        assert 0 < m["is_masked_frac"] < 1, "case must drop some rollout weights, not all"
    elif needs == "truncates":
        w = spec_terms(batch, batch.logits.detach(), opts).corr.w_is
        assert (w == opts["rollout_is_max"]).any(), "case must truncate some weights"
    elif needs == "off":
        assert 0 < m["off_policy_masked_frac"] < 1, "case must drop some responses, not all"
    elif needs == "ent":
        assert 0 < m["entropy_masked_frac"] < 1


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize(("make_opts", "needs"), [pytest.param(m, n, id=i) for i, m, n in CASES])
def test_corrections_match_the_vectorised_spec(make_opts, needs, granularity, packed):
    seed = GRANULARITIES.index(granularity)
    batch = _batch(20 + seed, packed, per_token_adv=seed % 2 == 1)
    opts = dict(granularity=granularity, **BASE, **make_opts(batch))
    if needs is not None and granularity == "subsentence":
        _exercised(batch, opts, needs)
    assert_matches_spec(batch, opts)


def test_on_policy_corrections_match_the_spec():
    # old_logprobs=None: q_t = sg[l_t] in the rollout weight and the off-policy drift
    batch = _batch(30, packed=False, per_token_adv=True)
    batch.old_logprobs = None
    v = rollout_for(batch, 31, scale=0.4, nan_in=1, nan_out=1)
    opts = dict(granularity="subsentence", **BASE, rollout_logprobs=v, rollout_is="segment", off_policy_mask=0.05)
    _exercised(batch, opts, "off")
    assert_matches_spec(batch, opts)
    _, out = run(batch, **opts)
    assert out.metrics["is_weight_min"] < 1 < out.metrics["is_weight_max"]


# --------------------------------------------------------------------------------------------------
# NaN sampler log-probs, weights at the bounds, and the equivalences
# --------------------------------------------------------------------------------------------------


def _outputs_equal(a, b, ga, gb, *, exact: bool) -> None:
    if exact:
        assert torch.equal(a.loss, b.loss), (a.loss, b.loss)
        assert torch.equal(ga, gb)
        for name in METRICS:
            assert torch.equal(a.metrics[name], b.metrics[name]), name
        return
    assert_close("loss", a.loss, b.loss, atol=EXACT, rtol=EXACT)
    assert_rel_norm("dlogits", ga, gb, tol=1e-12)
    for name in METRICS:
        assert_close(name, a.metrics[name], b.metrics[name], atol=EXACT, rtol=EXACT)


def _both(batch, opts_a: dict, opts_b: dict):
    la, a = run(batch, **opts_a)
    lb, b = run(batch, **opts_b)
    return a, b, grad_of(a.loss, la), grad_of(b.loss, lb)


@pytest.mark.parametrize("level", ["token", "segment", "sequence"])
def test_nan_rollout_logprob_at_a_masked_in_token_adds_zero(level):
    batch = _batch(40, packed=False)
    v = rollout_for(batch, 41, nan_in=2)
    nan = torch.isnan(v) & batch.mask
    assert int(nan.sum()) == 2
    common = dict(granularity="subsentence", **BASE, rollout_is=level, rollout_is_max=1.2, rollout_is_min=0.9)
    # Delta_t = 0 there: the same as a sampler that agreed with q_t
    same = torch.where(nan, batch.old_logprobs, v)
    _outputs_equal(*_both(batch, {**common, "rollout_logprobs": v}, {**common, "rollout_logprobs": same}), exact=False)
    # the off-policy drift x_t = 0 there: the same as a sampler that agreed with the current l_t
    logp, _ = token_logp_entropy(batch, batch.logits.detach())
    common = dict(granularity="subsentence", **BASE, rollout_is=None, off_policy_mask=0.0)
    _outputs_equal(
        *_both(batch, {**common, "rollout_logprobs": v}, {**common, "rollout_logprobs": torch.where(nan, logp, v)}),
        exact=False,
    )


def test_nan_rollout_logprob_at_a_masked_out_token_is_ignored():
    batch = _batch(42, packed=False, per_token_adv=True)
    v = rollout_for(batch, 43, nan_out=3)
    assert torch.isnan(v).any() and not (torch.isnan(v) & batch.mask).any()
    common = dict(granularity="sequence", **BASE, rollout_is_min=0.5, off_policy_mask=0.01)
    finite = torch.where(batch.mask, v, -3.0)
    a, b, ga, gb = _both(batch, {**common, "rollout_logprobs": v}, {**common, "rollout_logprobs": finite})
    assert torch.isfinite(a.loss) and torch.isfinite(ga).all()
    _outputs_equal(a, b, ga, gb, exact=True)


@pytest.mark.parametrize("mode", ["mask", "truncate"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_weights_exactly_at_the_bounds_are_kept(level, mode):
    batch = _batch(44, packed=False, log_ratio_scale=0.2)
    v = rollout_for(batch, 45, scale=0.3)
    common = dict(granularity="token", **BASE, rollout_logprobs=v, rollout_is=level)
    _, free = run(batch, **common, rollout_is_mode="truncate", rollout_is_max=None)
    lo, hi = float(free.metrics["is_weight_min"]), float(free.metrics["is_weight_max"])  # the extreme w_u
    _, out = run(batch, **common, rollout_is_mode=mode, rollout_is_min=lo, rollout_is_max=hi)
    assert out.metrics["is_masked_frac"] == 0, "weights on a bound are inside [lo, hi]"
    assert out.metrics["is_weight_min"] == lo and out.metrics["is_weight_max"] == hi
    assert out.metrics["is_weight_mean"] == free.metrics["is_weight_mean"]
    # just inside the extremes: "mask" drops them (and only them), "truncate" clamps them
    inner_lo, inner_hi = math.nextafter(lo, math.inf), math.nextafter(hi, -math.inf)
    _, out = run(batch, **common, rollout_is_mode=mode, rollout_is_min=inner_lo, rollout_is_max=inner_hi)
    m = batch.mask
    delta = (batch.old_logprobs - v).masked_fill(~m, 0.0)
    w = delta.exp() if level == "token" else delta.sum(-1, keepdim=True).exp().expand_as(delta)
    n_extreme = int((((w - lo).abs() < 1e-12 * lo) | ((w - hi).abs() < 1e-12 * hi))[m].sum())
    assert 0 < n_extreme < int(m.sum())
    if mode == "mask":
        assert_close(
            "is_masked_frac",
            out.metrics["is_masked_frac"],
            _f64(n_extreme / int(m.sum())),
            atol=EXACT,
        )
        assert out.metrics["is_weight_min"] == 0
    else:
        assert out.metrics["is_masked_frac"] == 0
        assert out.metrics["is_weight_min"] == inner_lo and out.metrics["is_weight_max"] == inner_hi


@pytest.mark.parametrize("level", ["token", "segment", "sequence"])
def test_rollout_log_weight_is_clamped_at_20(level):
    batch = _batch(57, packed=True)
    v = rollout_for(batch, 58, scale=40.0)
    opts = dict(granularity="subsentence", **BASE, rollout_logprobs=v, rollout_is=level,
                rollout_is_mode="truncate", rollout_is_max=None)  # fmt: skip
    _, out = run(batch, **opts)
    bound = _f64(20.0)
    assert out.metrics["is_weight_max"] == bound.exp() and out.metrics["is_weight_min"] == (-bound).exp()
    assert_matches_spec(batch, opts)


@pytest.mark.parametrize(("granularity", "same_as"), [("token", "token"), ("sequence", "sequence")])
def test_segment_level_rollout_weight_reduces_to_token_and_sequence(granularity, same_as):
    batch = _batch(46, packed=True, per_token_adv=True)
    opts = dict(granularity=granularity, **BASE, rollout_logprobs=rollout_for(batch, 47), rollout_is_min=0.8,
                rollout_is_max=1.3)  # fmt: skip
    a, b, ga, gb = _both(batch, {**opts, "rollout_is": "segment"}, {**opts, "rollout_is": same_as})
    assert 0 < b.metrics["is_masked_frac"] < 1
    _outputs_equal(a, b, ga, gb, exact=True)


@pytest.mark.parametrize("per_response", [False, True], ids=["per_token", "per_response"])
def test_policy_weights_of_ones_are_the_identity(per_response):
    batch = _batch(48, packed=False, per_token_adv=True)
    shape = (batch.num_responses,) if per_response else batch.tokens.shape
    opts = dict(granularity="subsentence", **BASE, beta=0.1, entropy_coef=0.02)
    _outputs_equal(*_both(batch, opts, {**opts, "policy_weights": torch.ones(shape, dtype=torch.float64)}), exact=True)


def test_per_response_policy_weights_are_broadcast():
    batch = _batch(49, packed=True)
    w = weights_for(batch, 50, per_response=True)
    per_token = w[batch.response_ids()]
    opts = dict(granularity="sequence", **BASE)
    _outputs_equal(*_both(batch, {**opts, "policy_weights": w}, {**opts, "policy_weights": per_token}), exact=True)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_neutral_corrections_are_bitwise_the_plain_loss(granularity):
    # all ones: the policy weight, a sampler that agrees with q (w = 1 inside [0, 3]), a drift threshold no
    # response reaches and the quantile that keeps every token
    batch = _batch(51, packed=granularity == "segments", per_token_adv=True)
    opts = dict(granularity=granularity, **BASE, beta=0.2, entropy_coef=0.03, dual_clip=1.5)
    neutral = dict(policy_weights=torch.ones_like(batch.old_logprobs), rollout_logprobs=batch.old_logprobs.clone(),
                   off_policy_mask=1e6, entropy_mask_quantile=1.0, objective="clip")  # fmt: skip
    a, b, ga, gb = _both(batch, opts, {**opts, **neutral})
    assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb)
    for name in METRICS:
        assert torch.equal(a.metrics[name], b.metrics[name]), name


def test_off_policy_mask_keeps_zero_advantage_tokens():
    batch = with_zero_advantages(make_batch(59, [5, 6, 4], per_token_adv=True), 60, share=0.4)
    opts = dict(granularity="subsentence", **BASE, rollout_logprobs=rollout_for(batch, 61) + 1.0, rollout_is=None,
                off_policy_mask=0.0)  # fmt: skip
    spec = spec_terms(batch, batch.logits.detach(), opts)
    assert ((spec.adv == 0) & (spec.corr.off == 0)).any() and spec.corr.off.any()
    assert_matches_spec(batch, opts)


def test_off_policy_mask_by_hand():
    # two responses with the same drift; only the one with A < 0 is dropped, and its KL term stays
    batch = make_batch(52, [4, 4, 3], per_token_adv=False)
    batch.advantages = torch.tensor([-1.0, 0.7, -0.4], dtype=torch.float64)
    logp, _ = token_logp_entropy(batch, batch.logits.detach())
    drift = torch.tensor([[0.3], [0.3], [0.01]], dtype=torch.float64)  # mean of v - l over each response
    v = torch.where(batch.mask, logp + drift, torch.nan)
    opts = dict(granularity="token", **BASE, rollout_logprobs=v, rollout_is=None, off_policy_mask=0.1, beta=0.5,
                loss_agg_mode="none")  # fmt: skip
    _, out = run(batch, **opts)
    _, plain = run(batch, **{k: x for k, x in opts.items() if k not in ("rollout_logprobs", "rollout_is")})
    x = batch.ref_logprobs - logp
    kl = torch.where(batch.mask, 0.5 * (x.exp() - x - 1), 0.0)
    assert_close("response 0: KL only", out.loss[0], kl[0], atol=EXACT)
    assert_close("responses 1-2 untouched", out.loss[1:], plain.loss[1:], atol=EXACT)
    assert_close(
        "off_policy_masked_frac",
        out.metrics["off_policy_masked_frac"],
        _f64(4 / 11),
        atol=EXACT,
    )


# --------------------------------------------------------------------------------------------------
# The entropy mask
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.2, 0.25, 0.5, 0.8, 1.0])
def test_entropy_mask_keeps_the_top_quantile(rho):
    batch = _batch(53, packed=True)
    _, entropy = token_logp_entropy(batch, batch.logits.detach())
    h = entropy[batch.mask]
    tau = spec_quantile(h, 1 - rho)
    assert_close("spec_quantile is torch.quantile's", tau, torch.quantile(h, 1 - rho), atol=1e-15)
    opts = dict(granularity="token", **BASE, entropy_mask_quantile=rho, loss_agg_mode="none")
    _, out = run(batch, **opts)
    _, plain = run(batch, **{**opts, "entropy_mask_quantile": None})
    kept = batch.mask & (entropy >= tau)
    assert_close("kept tokens", out.loss[kept], plain.loss[kept])
    assert_close("dropped tokens", out.loss[batch.mask & ~kept], torch.zeros(int((batch.mask & ~kept).sum())))
    assert_close(
        "entropy_masked_frac",
        out.metrics["entropy_masked_frac"],
        1 - kept.sum().double() / batch.mask.sum(),
        atol=EXACT,
    )


def test_entropy_mask_quantile_on_a_value_keeps_it():
    # 5 tokens, rho = 0.25: position 0.75 * 4 = 3 lands exactly on the 4th smallest entropy, which is kept
    batch = make_batch(54, [5], vocab=9, logit_scale=2.0)
    _, out = run(batch, granularity="token", **BASE, entropy_mask_quantile=0.25)
    assert_close("entropy_masked_frac", out.metrics["entropy_masked_frac"], _f64(3 / 5), atol=EXACT)


def test_entropy_mask_group_takes_the_quantile_over_every_rank(monkeypatch):
    batch = _batch(55, packed=False)
    _, entropy = token_logp_entropy(batch, batch.logits.detach())
    local = entropy[batch.mask]
    other = torch.linspace(float(local.min()), float(local.max()) * 1.5, 17, dtype=torch.float64)  # rank 1's

    def all_gather_object(out, obj, group=None):
        assert group == "group" and obj == local.tolist()
        out[0], out[1] = obj, other.tolist()

    monkeypatch.setattr(reference.corrections.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(reference.corrections.dist, "all_gather_object", all_gather_object)
    opts = dict(granularity="token", **BASE, entropy_mask_quantile=0.3)
    _, grouped = run(batch, **opts, entropy_mask_group="group")
    _, alone = run(batch, **opts)
    tau = torch.quantile(torch.cat([local, other]), 0.7)
    want = (local < tau).double().mean()
    assert_close("entropy_masked_frac (group)", grouped.metrics["entropy_masked_frac"], want, atol=EXACT)
    assert grouped.metrics["entropy_masked_frac"] != alone.metrics["entropy_masked_frac"]


# --------------------------------------------------------------------------------------------------
# The ratio-weighted KL
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio_grad", ["exact", "token"])
def test_kl_ratio_weight_on_policy_changes_the_gradient_only(ratio_grad):
    # R_t = 1 in value on-policy, but d R_t / d l_t = 1 / n_s (exact) or 1 (token) adds beta * KL to the gradient
    batch = make_batch(56, [5, 4], per_token_adv=True)
    batch.old_logprobs = None
    beta = 0.4
    opts = dict(granularity="sequence", **BASE, beta=beta, ratio_grad=ratio_grad, loss_agg_mode="sum")
    la, weighted = run(batch, **opts, kl_ratio_weight=True)
    lb, plain = run(batch, **opts)
    assert_close("loss", weighted.loss, plain.loss, atol=EXACT)
    logits = batch.fresh_logits()
    logp, _ = token_logp_entropy(batch, logits)
    x = (batch.ref_logprobs - logp).detach()
    kl = torch.where(batch.mask, x.exp() - x - 1, 0.0)
    n = batch.mask.sum(-1, keepdim=True).double()
    # the extra gradient per token: beta * sum_{t' in s} KL_t' / n_s (exact) or beta * KL_t (token), times dl/dx
    coef = beta * (kl.sum(-1, keepdim=True) / n).expand_as(kl) if ratio_grad == "exact" else beta * kl
    extra = grad_of((torch.where(batch.mask, coef * logp, 0.0)).sum(), logits)
    assert_rel_norm("extra dlogits", grad_of(weighted.loss, la) - grad_of(plain.loss, lb), extra, tol=1e-10)


# --------------------------------------------------------------------------------------------------
# gradcheck
# --------------------------------------------------------------------------------------------------

MARGIN = 1e-3
GRADCHECK = [
    ("weights-rollout-masks", "subsentence",
     lambda b: dict(policy_weights=weights_for(b, 60), rollout_logprobs=rollout_for(b, 61, nan_in=1),
                    rollout_is="segment", rollout_is_max=1.3, off_policy_mask=0.05, entropy_mask_quantile=0.6)),
    ("kl_ratio_weight-exact", "sequence", lambda b: dict(beta=0.3, kl_ratio_weight=True)),
    ("kl_ratio_weight-token_form-token", "token", lambda b: dict(beta=0.3, kl_ratio_weight=True, ratio_grad="token")),
    ("kl_ratio_weight-rollout_token-per_token_adv", "subsentence",
     lambda b: dict(beta=0.3, kl_ratio_weight=True, rollout_logprobs=rollout_for(b, 62), rollout_is="token")),
]  # fmt: skip


def _kink_free(batch, opts) -> bool:
    t = spec_terms(batch, batch.logits.detach(), opts)
    rho, seg = t.rho[t.seg], t.seg
    near = lambda x, y: bool(((x - y).abs() < MARGIN).any())
    if near(rho, t.lo[seg]) or near(rho, t.hi[seg]):
        return False
    if opts.get("entropy_mask_quantile") is not None:
        _, h = token_logp_entropy(batch, batch.logits.detach())
        gap = (h[batch.mask] - spec_quantile(h[batch.mask], 1 - opts["entropy_mask_quantile"])).abs()
        if ((gap > 0) & (gap < MARGIN)).any():  # a token on the quantile itself moves with it: no kink
            return False
    if opts.get("off_policy_mask") is not None:
        logp, _ = token_logp_entropy(batch, batch.logits.detach())
        src = opts["rollout_logprobs"] if opts.get("rollout_logprobs") is not None else batch.old_logprobs
        x = torch.where(torch.isnan(src), 0.0, src - logp).masked_fill(~batch.mask, 0.0)
        drift = x.sum(-1) / batch.mask.sum(-1).clamp(min=1)
        if near(drift, opts["off_policy_mask"]):
            return False
        if not 0 < t.metrics["off_policy_masked_frac"]:
            return False
    return bool(0 < (t.clip_low | t.clip_high).double().mean() < 1)


@pytest.mark.parametrize(("granularity", "make_opts"), [pytest.param(g, m, id=i) for i, g, m in GRADCHECK])
def test_gradcheck(granularity, make_opts):
    for seed in range(200):
        batch = make_batch(300 + seed, [4, 3, 4], vocab=5, per_token_adv=True, hole_p=0.1)
        opts = dict(granularity=granularity, **BASE, **make_opts(batch))
        if _kink_free(batch, opts):
            break
    else:
        pytest.fail("no kink-free seed")

    def loss_of(logits):
        return run(batch, logits, **dict(opts))[1].loss

    assert torch.autograd.gradcheck(loss_of, (batch.fresh_logits(),), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def _call(batch, **opts):
    args, kwargs = batch.inputs(opts.pop("granularity", "token"))
    return sspo_loss(*args, **{**kwargs, **BASE, **opts})


@pytest.mark.parametrize(
    ("opts", "error", "match"),
    [
        (lambda b: dict(policy_weights=torch.ones(3, 4, dtype=torch.float64)), ValueError, "policy_weights"),
        (lambda b: dict(policy_weights=torch.ones(b.num_responses + 1)), ValueError, "policy_weights"),
        (lambda b: dict(policy_weights=torch.ones(b.tokens.shape, device="meta")), ValueError, "policy_weights"),
        (lambda b: dict(policy_weights=torch.ones(b.tokens.shape, dtype=torch.int64)), TypeError, "policy_weights"),
        (lambda b: dict(policy_weights=[1.0, 2.0]), TypeError, "policy_weights"),
        (lambda b: dict(policy_weights=torch.where(b.mask, -0.5, 1.0)), ValueError, "policy_weights"),
        (lambda b: dict(policy_weights=torch.where(b.mask, torch.nan, 1.0)), ValueError, "policy_weights"),
        (lambda b: dict(policy_weights=torch.where(b.mask, torch.inf, 1.0)), ValueError, "policy_weights"),
        (lambda b: dict(policy_weights=torch.full((b.num_responses,), -1.0)), ValueError, "policy_weights"),
        (lambda b: dict(rollout_logprobs=torch.zeros(b.num_responses)), ValueError, "rollout_logprobs"),
        (lambda b: dict(rollout_logprobs=torch.zeros(b.tokens.shape, device="meta")), ValueError, "rollout_logprobs"),
        (
            lambda b: dict(rollout_logprobs=torch.zeros(b.tokens.shape, dtype=torch.int32)),
            TypeError,
            "rollout_logprobs",
        ),
        (
            lambda b: dict(rollout_logprobs=b.old_logprobs, rollout_is_min=2.0, rollout_is_max=1.0),
            ValueError,
            "rollout_is_min",
        ),
        (lambda b: dict(rollout_logprobs=b.old_logprobs, rollout_is_min=-0.1), ValueError, "rollout_is_min"),
        (lambda b: dict(rollout_logprobs=b.old_logprobs, rollout_is="segments"), ValueError, "rollout_is"),
        (lambda b: dict(rollout_logprobs=b.old_logprobs, rollout_is_mode="clip"), ValueError, "rollout_is_mode"),
        (lambda b: dict(rollout_is="token"), ValueError, "rollout_logprobs"),
        (lambda b: dict(rollout_is=None), ValueError, "rollout_logprobs"),
        (lambda b: dict(rollout_is_mode="truncate"), ValueError, "rollout_logprobs"),
        (lambda b: dict(rollout_is_min=0.5), ValueError, "rollout_logprobs"),
        (lambda b: dict(rollout_is_max=2.0), ValueError, "rollout_logprobs"),
        (lambda b: dict(entropy_mask_quantile=0.0), ValueError, "entropy_mask_quantile"),
        (lambda b: dict(entropy_mask_quantile=1.5), ValueError, "entropy_mask_quantile"),
        (lambda b: dict(entropy_mask_quantile=-0.2), ValueError, "entropy_mask_quantile"),
        (lambda b: dict(entropy_mask_quantile=math.nan), ValueError, "entropy_mask_quantile"),
        (lambda b: dict(entropy_mask_group=object()), ValueError, "entropy_mask_group"),
        (lambda b: dict(off_policy_mask=-1.0), ValueError, "off_policy_mask"),
        (lambda b: dict(kl_ratio_weight=1), TypeError, "kl_ratio_weight"),
    ],
    ids=lambda x: None,
)
def test_bad_input_names_the_argument(opts, error, match):
    batch = make_batch(70, [4, 3], hole_p=0.3)
    with pytest.raises(error, match=match):
        _call(batch, **opts(batch))


def test_anything_is_allowed_at_masked_out_tokens():
    batch = make_batch(71, [4, 2], seq_len=5)
    pw = torch.where(batch.mask, 0.5, torch.nan)
    v = torch.where(batch.mask, batch.old_logprobs, -torch.inf)
    out = _call(batch, policy_weights=pw, rollout_logprobs=v, off_policy_mask=0.1, entropy_mask_quantile=0.5)
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(x).all() for x in out.metrics.values())
