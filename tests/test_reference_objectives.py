"""The float64 reference against docs/loss.md "Objectives" and "Gradient forms": clip, cispo, sapo, gmpo, vespo,
reinforce, their metrics, the contract's closed-form gradient (the slopes a_t, b_t, gamma_t, g_s and the two
ratio forms), the equivalences between objectives, and bad options.

Expected values come from `spec_terms` (a vectorised restatement in `_reference_helpers`), from
`doc_dlogits` below (the "Gradient forms" section written out) and from the equivalences.
"""

from __future__ import annotations

import math

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import Batch, make_batch, pack, segment_labels
from _reference_helpers import (
    AGG_MODES,
    BASE,
    EXACT,
    F64,
    assert_matches_spec,
    grad_of,
    rollout_for,
    run,
    spec_terms,
    token_logp_entropy,
    weights_for,
    with_zero_advantages,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import sspo_loss

pytestmark = pytest.mark.usefixtures("one_thread")

OBJECTIVES = ("clip", "cispo", "sapo", "gmpo", "vespo", "reinforce")
GRANULARITIES = ("token", "sequence", "subsentence", "sentence", "segments")
# each objective's own options in these tests (wide enough that some tokens clip and some do not)
OWN = {
    "clip": dict(eps_low=0.1, eps_high=0.15, entropy_gamma=0.0, dual_clip=1.3),
    "cispo": dict(eps_low=0.1, eps_high=0.15, entropy_gamma=0.0),
    "sapo": dict(sapo_tau_pos=1.3, sapo_tau_neg=0.8),
    "gmpo": dict(eps_low=0.1, eps_high=0.15, entropy_gamma=0.0),
    "vespo": dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5),
    "reinforce": {},
}
LENGTHS = [6, 0, 3, 5, 4]


def _batch(seed: int, packed: bool = False, **kw) -> Batch:
    batch = with_zero_advantages(make_batch(seed, LENGTHS, seq_len=7, hole_p=0.2, **kw), seed)
    return pack(batch) if packed else batch


def _segment_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros(size, dtype=F64).index_add(0, index, values)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objectives_match_the_vectorised_spec(objective, granularity, packed):
    batch = _batch(10 + GRANULARITIES.index(granularity), packed, log_ratio_scale=0.4)
    opts = dict(granularity=granularity, objective=objective, **OWN[objective])
    if objective in ("clip", "cispo", "gmpo") and granularity == "subsentence":
        opts["entropy_gamma"] = 0.7  # the entropy adaptation scales every objective's bounds
        want = spec_terms(batch, batch.logits.detach(), opts).metrics
        assert 0 < want["clip_frac"] < 1, "case must clip some tokens, not all"
    assert_matches_spec(batch, opts)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ratios_far_outside_the_bounds(objective):
    batch = _batch(20, log_ratio_scale=6.0)
    opts = dict(granularity="subsentence", objective=objective, log_ratio_clamp=9.0, **OWN[objective])
    logits, out = run(batch, **opts)
    g = grad_of(out.loss, logits)
    assert torch.isfinite(out.loss) and torch.isfinite(g).all()
    assert out.metrics["ratio_max"] > 1e3 * out.metrics["ratio_min"]
    assert_matches_spec(batch, opts)


@st.composite
def _cases(draw):
    objective = draw(st.sampled_from(OBJECTIVES))
    lengths = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))
    batch = make_batch(
        draw(st.integers(0, 10_000)),
        lengths,
        seq_len=max(max(lengths), 1) + draw(st.integers(0, 2)),
        vocab=draw(st.sampled_from([3, 8])),
        per_token_adv=draw(st.booleans()),
        hole_p=draw(st.sampled_from([0.0, 0.3])),
        log_ratio_scale=draw(st.sampled_from([0.05, 0.4, 2.0])),
    )
    if draw(st.booleans()):
        batch = with_zero_advantages(batch, draw(st.integers(0, 99)))
    packed = draw(st.booleans())
    if packed:
        batch = pack(batch)
    if draw(st.booleans()):
        batch.old_logprobs = None
    opts = dict(
        granularity=draw(st.sampled_from(GRANULARITIES)),
        objective=objective,
        **OWN[objective],
        loss_agg_mode=draw(st.sampled_from(AGG_MODES)),
        ratio_grad=draw(st.sampled_from(["exact", "token"])),
        beta=draw(st.sampled_from([0.0, 0.3])),
        entropy_coef=draw(st.sampled_from([0.0, 0.05])),
        log_ratio_clamp=draw(st.sampled_from([20.0, 0.5])),
    )
    opts["kl_ratio_weight"] = opts["beta"] > 0 and draw(st.booleans())
    if objective in ("clip", "cispo", "gmpo"):
        opts["entropy_gamma"] = draw(st.sampled_from([0.0, 0.5]))
        opts["adapt_low"] = draw(st.booleans())
    if draw(st.booleans()):
        opts["policy_weights"] = weights_for(batch, 1, per_response=draw(st.booleans()))
    if draw(st.booleans()):
        opts["rollout_logprobs"] = rollout_for(batch, 2, nan_in=draw(st.integers(0, min(1, int(batch.mask.sum())))))
        levels = ["token", None] if objective == "vespo" else ["token", "segment", "sequence", None]
        opts["rollout_is"] = draw(st.sampled_from(levels))
        opts["rollout_is_mode"] = draw(st.sampled_from(["mask", "truncate"]))
        opts["rollout_is_min"] = draw(st.sampled_from([None, 0.8]))
        opts["rollout_is_max"] = draw(st.sampled_from([None, 1.3, 3.0]))
    opts["off_policy_mask"] = draw(st.sampled_from([None, 0.0, 0.1]))
    opts["entropy_mask_quantile"] = draw(st.sampled_from([None, 0.5, 1.0]))
    if packed and opts["loss_agg_mode"] == "seq-mean-token-sum-norm":
        opts["norm_len"] = 7
    return batch, opts


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases())
def test_random_objectives_and_corrections_match_the_vectorised_spec(case):
    batch, opts = case
    assert_matches_spec(batch, opts)


# --------------------------------------------------------------------------------------------------
# Equivalences between objectives
# --------------------------------------------------------------------------------------------------


def _both(batch, opts_a: dict, opts_b: dict):
    la, a = run(batch, **opts_a)
    lb, b = run(batch, **opts_b)
    return a, b, grad_of(a.loss, la), grad_of(b.loss, lb)


@pytest.mark.parametrize(
    ("granularity", "ratio_grad", "per_token_adv"),
    [("token", "exact", True), ("subsentence", "token", True), ("sequence", "exact", False)],
)
@pytest.mark.parametrize("other", ["clip", "sapo"])
def test_reinforce_has_clip_and_sapos_on_policy_gradient(other, granularity, ratio_grad, per_token_adv):
    batch = make_batch(40, LENGTHS, per_token_adv=per_token_adv, hole_p=0.2)
    batch.old_logprobs = None  # rho = 1, inside any bounds
    common = dict(granularity=granularity, ratio_grad=ratio_grad, loss_agg_mode="seq-mean-token-mean", beta=0.1)
    own = {**BASE, "dual_clip": 2.0} if other == "clip" else OWN["sapo"]
    _, _, g_other, g_reinforce = _both(
        batch, {**common, "objective": other, **own}, {**common, "objective": "reinforce"}
    )
    assert_rel_norm("dlogits", g_other, g_reinforce, tol=1e-12)


@pytest.mark.parametrize("granularity", ["token", "subsentence"])
def test_cispo_with_huge_bounds_is_reinforce_weighted_by_the_ratio(granularity):
    batch = _batch(41, log_ratio_scale=0.5)
    logp, _ = token_logp_entropy(batch, batch.logits.detach())
    labels = segment_labels(batch, granularity)
    sel = labels >= 0
    x = (logp - batch.old_logprobs).reshape(-1)[sel]
    n_s = torch.bincount(labels[sel]).double()
    rho = (_segment_sum(x, labels[sel], n_s.numel()) / n_s).exp()
    ratio = torch.ones(labels.shape, dtype=F64).masked_scatter(sel, rho[labels[sel]]).reshape(batch.tokens.shape)
    common = dict(granularity=granularity, beta=0.2, entropy_coef=0.03)
    a, b, ga, gb = _both(
        batch,
        {**common, "objective": "cispo", "eps_low": 1.0, "eps_high": 1e12},
        {**common, "objective": "reinforce", "policy_weights": ratio},
    )
    assert_close("loss", a.loss, b.loss, atol=EXACT, rtol=1e-12)
    assert_rel_norm("dlogits", ga, gb, tol=1e-12)
    assert a.metrics["clip_frac"] == 0 and a.metrics["cispo_clip_frac"] == 0


@pytest.mark.parametrize(
    ("granularity", "per_token_adv", "zero_adv"), [("token", True, True), ("sequence", False, False)]
)
def test_gmpo_with_huge_bounds_is_clip_with_huge_bounds(granularity, per_token_adv, zero_adv):
    # per token (or with one nonzero advantage per response) the clipped log-ratios are the log-ratios
    batch = make_batch(42, LENGTHS, per_token_adv=per_token_adv, hole_p=0.2, log_ratio_scale=0.5)
    batch = with_zero_advantages(batch, 43) if zero_adv else batch
    assert zero_adv or (batch.advantages != 0).all()
    # (a ratio-weighted KL would differ at A = 0 tokens, where gmpo's ratio is exp(0) = 1)
    common = dict(granularity=granularity, loss_agg_mode="seq-mean-token-sum", beta=0.2, kl_ratio_weight=not zero_adv)
    huge = dict(eps_low=1.0, eps_high=1e12)
    a, b, ga, gb = _both(batch, {**common, "objective": "gmpo", **huge}, {**common, "objective": "clip", **huge})
    assert_close("loss", a.loss, b.loss, atol=EXACT, rtol=1e-12)
    assert_rel_norm("dlogits", ga, gb, tol=1e-12)
    for name in ("clip_frac",) if zero_adv else ("ratio_mean", "ratio_min", "ratio_max", "clip_frac"):
        assert_close(name, a.metrics[name], b.metrics[name], atol=EXACT, rtol=1e-12)


@pytest.mark.parametrize("granularity", ["token", "subsentence", "sequence"])
def test_vespo_on_policy_is_reinforce(granularity):
    # log w_s = 0 on-policy, so phi = e^(lambda - lambda) = 1 whatever k and lambda are
    batch = _batch(44)
    batch.old_logprobs = None
    common = dict(granularity=granularity, beta=0.2, kl_ratio_weight=True, ratio_grad="token")
    a, b, ga, gb = _both(batch, {**common, "objective": "vespo", **OWN["vespo"]}, {**common, "objective": "reinforce"})
    assert_close("loss", a.loss, b.loss, atol=EXACT, rtol=1e-12)
    assert_rel_norm("dlogits", ga, gb, tol=1e-12)
    assert a.metrics["vespo_phi_mean"] == 1.0


def test_vespo_folds_token_rollout_weights_into_its_ratio():
    # sum (l - q) + sum log e^(q - v) = sum (l - v): the same phi as with old_logprobs = v
    batch = _batch(45, log_ratio_scale=0.1)
    v = rollout_for(batch, 46, scale=0.1)
    opts = dict(granularity="subsentence", objective="vespo")
    folded = dict(rollout_logprobs=v, rollout_is="token", rollout_is_mode="truncate", rollout_is_max=None)
    la, a = run(batch, **opts, **folded)
    shifted = Batch(**{**vars(batch), "old_logprobs": torch.where(batch.mask, v, 0.0)})
    lb, b = run(shifted, **opts)
    assert_close("loss", a.loss, b.loss, atol=EXACT, rtol=1e-12)
    assert_close("vespo_phi_mean", a.metrics["vespo_phi_mean"], b.metrics["vespo_phi_mean"], rtol=1e-12)
    assert_rel_norm("dlogits", grad_of(a.loss, la), grad_of(b.loss, lb), tol=1e-12)
    # the weights are not multiplied in as well: without the fold, phi (and the loss) differ
    _, c = run(batch, **opts, rollout_logprobs=v, rollout_is=None)
    assert not torch.allclose(c.loss, a.loss, rtol=1e-6)


def test_gmpo_tokens_with_zero_advantage_add_nothing_to_the_mean():
    batch = with_zero_advantages(make_batch(47, LENGTHS, per_token_adv=True, hole_p=0.2), 48, share=0.4)
    zero = (batch.advantages == 0) & batch.mask
    assert zero.any()
    moved = Batch(**{**vars(batch), "old_logprobs": torch.where(zero, batch.old_logprobs - 5.0, batch.old_logprobs)})
    opts = dict(granularity="sequence", objective="gmpo", **OWN["gmpo"])
    la, a = run(batch, **opts)
    lb, b = run(moved, **opts)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(grad_of(a.loss, la), grad_of(b.loss, lb))


@pytest.mark.parametrize("objective", ["cispo", "vespo", "reinforce"])
def test_ratio_grad_matters_for_direct_objectives_only_through_a_ratio_weighted_kl(objective):
    batch = _batch(49, log_ratio_scale=0.3)
    opts = dict(granularity="sequence", objective=objective, **OWN[objective], beta=0.3)
    *_, ga, gb = _both(batch, {**opts, "ratio_grad": "exact"}, {**opts, "ratio_grad": "token"})
    assert torch.equal(ga, gb)
    *_, ga, gb = _both(batch, {**opts, "ratio_grad": "exact", "kl_ratio_weight": True},
                       {**opts, "ratio_grad": "token", "kl_ratio_weight": True})  # fmt: skip
    assert (ga - gb).abs().max() > 1e-6


def test_metrics_of_other_objectives_and_options_are_zero():
    batch = _batch(50, log_ratio_scale=0.8)
    for objective in OBJECTIVES:
        own = {k: v for k, v in OWN[objective].items() if k != "dual_clip"}
        _, out = run(batch, granularity="token", objective=objective, **own)
        m = out.metrics
        assert m["dual_clip_frac"] == 0 and m["off_policy_masked_frac"] == 0 and m["entropy_masked_frac"] == 0
        assert m["is_weight_mean"] == m["is_weight_min"] == m["is_weight_max"] == 1 and m["is_masked_frac"] == 0
        assert (m["cispo_clip_frac"] > 0) == (objective == "cispo")
        assert (m["vespo_phi_mean"] > 0) == (objective == "vespo")
        assert (m["clip_frac"] > 0) == (objective in ("clip", "cispo", "gmpo")), objective


# --------------------------------------------------------------------------------------------------
# Bad options
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (dict(objective="ppo"), "objective"),
        (dict(objective="sapo", eps_low=0.2), "eps_low"),
        (dict(objective="vespo", eps_high=0.2), "eps_high"),
        (dict(objective="reinforce", entropy_gamma=0.5), "entropy_gamma"),
        (dict(objective="sapo", k_min=0.1), "k_min"),
        (dict(objective="reinforce", k_max=3.0), "k_max"),
        (dict(sapo_tau_pos=1.0), "sapo_tau_pos"),
        (dict(objective="gmpo", vespo_k_pos=1.0), "vespo_k_pos"),
        (dict(objective="vespo", sapo_tau_neg=1.0), "sapo_tau_neg"),
        (dict(objective="cispo", vespo_lambda_neg=1.0), "vespo_lambda_neg"),
        (dict(objective="cispo", dual_clip=3.0), "dual_clip"),
        (dict(objective="gmpo", dual_clip=3.0), "dual_clip"),
        (dict(objective="sapo", sapo_tau_pos=0.0), "sapo_tau_pos"),
        (dict(objective="sapo", sapo_tau_neg=-1.0), "sapo_tau_neg"),
        (dict(objective="vespo", vespo_lambda_pos=0.0), "vespo_lambda_pos"),
        (dict(objective="vespo", vespo_lambda_neg=-2.0), "vespo_lambda_neg"),
        (dict(objective="vespo", vespo_k_pos=-1.0), "vespo_k_pos"),
        (dict(objective="vespo", vespo_k_neg=math.inf), "vespo_k_neg"),
        (dict(objective="vespo", rollout_is="sequence"), "rollout_is"),
        (dict(objective="vespo", rollout_is="segment"), "rollout_is"),
    ],
    ids=lambda x: None,
)
def test_bad_options_name_the_argument(opts, match):
    batch = make_batch(60, [4, 3])
    args, kwargs = batch.inputs("token")
    if "rollout_is" in opts:
        kwargs["rollout_logprobs"] = batch.old_logprobs
    with pytest.raises(ValueError, match=match):
        sspo_loss(*args, **kwargs, **opts)


def test_objective_of_the_wrong_type_is_an_error():
    batch = make_batch(61, [4])
    args, kwargs = batch.inputs("token")
    with pytest.raises((TypeError, ValueError), match="objective"):
        sspo_loss(*args, **kwargs, objective=3)


def test_vespo_accepts_a_token_rollout_weight_and_none():
    batch = make_batch(62, [4, 3])
    args, kwargs = batch.inputs("token")
    for level in ("token", None):
        out = sspo_loss(*args, **kwargs, objective="vespo", rollout_logprobs=batch.old_logprobs, rollout_is=level)
        assert torch.isfinite(out.loss)


# --------------------------------------------------------------------------------------------------
# Clamps and strict inequalities, checked relatively (the quantities there are tiny or huge)
# --------------------------------------------------------------------------------------------------


def test_vespo_clamps_its_log_weight_and_the_log_of_each_rollout_weight():
    # one response per clamp: log-ratios summing below ln 1e-8, above 20, and a rollout weight dropped to 0
    batch = make_batch(63, [3, 3, 3], per_token_adv=True)
    _, first = run(batch, granularity="token")  # the exact l_t the reference sees
    logp = first.logprobs
    shift = torch.tensor([[9.0], [-12.0], [-1.0]], dtype=F64)  # q = l + shift
    batch.old_logprobs = logp + shift
    v = batch.old_logprobs.clone()
    v[2, 1] = batch.old_logprobs[2, 1] + 5.0  # w = e^-5, below rollout_is_min: masked to 0
    opts = dict(granularity="sequence", objective="vespo", rollout_logprobs=v, rollout_is="token", rollout_is_min=0.01,
                loss_agg_mode="none")  # fmt: skip
    _, out = run(batch, **opts)
    log_is = torch.zeros_like(v)
    log_is[2, 1] = math.log(1e-8)  # clamp(log 0, ln 1e-8, 20)
    total = ((logp - batch.old_logprobs).clamp(-20, 20) + log_is).sum(-1, keepdim=True)
    log_w = total.clamp(math.log(1e-8), 20.0)
    assert log_w[0] == math.log(1e-8) and log_w[1] == 20.0 and math.log(1e-8) < log_w[2] < 0
    adv = batch.advantages
    k = torch.where(adv >= 0, 2.0, 3.0).double()
    lam = torch.where(adv >= 0, 3.0, 2.0).double()
    phi = (lam + k * log_w - lam * log_w.exp()).exp()
    assert_close("per-token loss", out.loss, -phi * adv * logp, rtol=1e-12)
    first_phi = phi[:, 0]
    assert_close("vespo_phi_mean", out.metrics["vespo_phi_mean"], first_phi.mean(), rtol=1e-12)


def test_clip_fractions_and_the_dual_clip_count_strict_inequalities():
    # gmpo: a token whose log-ratio sits exactly on -eps_low; clip: a token whose ratio is exactly the dual clip
    batch = make_batch(68, [5, 4], per_token_adv=True, log_ratio_scale=0.5)
    _, first = run(batch, granularity="token")
    x = (first.logprobs - batch.old_logprobs).masked_fill(~batch.mask, 0.0)
    neg = batch.mask & (x < 0) & (batch.advantages < 0)
    assert neg.any() and (batch.mask & (x > 0.05)).any()
    t = tuple(int(i) for i in torch.nonzero(neg)[0])
    opts = dict(granularity="token", objective="gmpo", eps_low=-float(x[t]), eps_high=0.1)
    _, on = run(batch, **opts)
    _, below = run(batch, **{**opts, "eps_low": math.nextafter(-float(x[t]), 0.0)})
    one = 1 / int(batch.mask.sum())
    assert_close(
        "clip_frac_low",
        below.metrics["clip_frac_low"] - on.metrics["clip_frac_low"],
        torch.tensor(one, dtype=F64),
        atol=EXACT,
    )
    assert_matches_spec(batch, opts)

    ratio = x.exp()
    big = batch.mask & (ratio > 1.05)
    t = tuple(int(i) for i in torch.nonzero(big)[0])
    batch.advantages = batch.advantages.clone()
    batch.advantages[t] = -abs(float(batch.advantages[t])) - 0.1
    _, out = run(batch, granularity="token", **BASE)
    c3 = float(out.metrics["ratio_max"]) if float(ratio[t]) == float(out.metrics["ratio_max"]) else float(ratio[t])
    opts = dict(granularity="token", **BASE, dual_clip=c3)
    _, on = run(batch, **opts)
    _, below = run(batch, **{**opts, "dual_clip": c3 * (1 - 1e-12)})
    diff = below.metrics["dual_clip_frac"] - on.metrics["dual_clip_frac"]
    assert_close("dual_clip_frac", diff, torch.tensor(one, dtype=F64), atol=EXACT)
    assert_matches_spec(batch, opts)
