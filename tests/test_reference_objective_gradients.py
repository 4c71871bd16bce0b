"""The float64 reference against docs/loss.md "Gradient forms": its gradient equals the contract's closed form
(the slopes a_t and b_t of every objective, gmpo's gamma_t, the clamp gate g_s, both ratio forms, the ratio-weighted
KL and the policy weight W_t), and gradcheck where the contract's gradient is the true derivative.

The objectives' values, metrics and equivalences are in test_reference_objectives.py.
"""

from __future__ import annotations

import pytest
import torch
from _assert import assert_rel_norm
from _cases import Batch, make_batch
from _reference_helpers import (
    F64,
    SPEC_DEFAULTS,
    grad_of,
    rollout_for,
    run,
    spec_terms,
    token_logp_entropy,
    weights_for,
    with_zero_advantages,
)
from test_reference_objectives import OBJECTIVES, OWN, _batch, _segment_sum

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# The closed-form gradient of docs/loss.md "Gradient forms"
# --------------------------------------------------------------------------------------------------


def doc_dlogits(batch: Batch, logits: torch.Tensor, opts: dict) -> torch.Tensor:
    """dLoss/dx_t,v = G_t ([v == y_t] - p_t,v) - E_t p_t,v (log p_t,v + H_t), with G_t from the slopes a_t, b_t, the
    clamp gate g_s, gmpo's gamma_t and the ratio form (temperature 1; token-mean, sum or seq-mean-token-mean)."""
    o = {**SPEC_DEFAULTS, **opts}
    spec = spec_terms(batch, logits.detach(), opts)  # data only: segments, weights W_t, bounds, phi
    logp, entropy = token_logp_entropy(batch, logits.detach())
    mask = batch.mask.reshape(-1)
    sel = torch.nonzero(mask).squeeze(1)
    seg, num_seg = spec.seg, int(spec.seg.max()) + 1 if sel.numel() else 0
    n_s = torch.bincount(seg, minlength=num_seg).double()
    l_in = logp.reshape(-1)[sel]
    q_in = l_in if batch.old_logprobs is None else batch.old_logprobs.reshape(-1)[sel]
    a_in = spec.adv
    c = o["log_ratio_clamp"]
    objective = o["objective"]
    if objective == "gmpo":
        x = l_in - q_in
        low = -o["eps_low"] * (spec.k if o["adapt_low"] else torch.ones_like(spec.k))[seg]
        high = o["eps_high"] * (spec.k if o["adapt_high"] else torch.ones_like(spec.k))[seg]
        c_t = torch.where(a_in > 0, torch.minimum(x, x.clamp(low, high)), torch.maximum(x, x.clamp(low, high)))
        mean = _segment_sum(torch.where(a_in == 0, 0.0, c_t), seg, num_seg) / n_s
        gamma = torch.where(a_in > 0, x <= high, x >= low).double() * (a_in != 0)
    else:
        mean = spec.d
        gamma = torch.ones_like(a_in)
    rho = mean.clamp(-c, c).exp()[seg]
    gate = (mean.abs() <= c).double()[seg]

    lo, hi = spec.lo[seg], spec.hi[seg]
    zero = torch.zeros_like(a_in)
    a_t, b_t = zero, zero
    if objective == "clip":
        u, clipped = -a_in * rho, -a_in * rho.clamp(lo, hi)
        a_t = torch.where(u >= clipped, -a_in, 0.0)
        if o["dual_clip"] is not None:
            a_t = torch.where((a_in < 0) & (torch.maximum(u, clipped) > -a_in * o["dual_clip"]), 0.0, a_t)
    elif objective == "cispo":
        b_t = -rho.clamp(lo, hi) * a_in
    elif objective == "sapo":
        tau = torch.full_like(a_in, o["sapo_tau_neg"]).masked_fill(a_in > 0, o["sapo_tau_pos"])
        sig = torch.sigmoid(tau * (rho - 1))
        a_t = -a_in * 4 * sig * (1 - sig)
    elif objective == "gmpo":
        a_t = -a_in
    elif objective == "vespo":
        b_t = -spec.policy.phi * a_in
    else:
        b_t = -a_in

    resp = batch.response_ids()[sel]
    n_b = torch.bincount(resp, minlength=batch.num_responses).double()
    mode = o["loss_agg_mode"]
    if mode == "token-mean":
        omega = torch.full_like(a_in, 1 / max(sel.numel(), 1))
    elif mode == "sum":
        omega = torch.ones_like(a_in)
    else:
        assert mode == "seq-mean-token-mean"
        omega = 1 / (n_b[resp] * max(int((n_b > 0).sum()), 1))
    w = spec.weight
    kl = torch.zeros_like(a_in)
    k_prime = torch.zeros_like(a_in)
    if o["beta"] > 0:
        r = batch.ref_logprobs.reshape(-1)[sel]
        kl = (r - l_in).exp() - (r - l_in) - 1
        k_prime = 1 - (r - l_in).exp()
        if o["kl_ratio_weight"]:
            k_prime = rho * k_prime
    s = omega * (w * a_t + (o["beta"] * kl if o["kl_ratio_weight"] else 0.0))
    direct = omega * (w * b_t + o["beta"] * k_prime)
    if o["ratio_grad"] == "exact":
        g_t = gate * rho / n_s[seg] * gamma * _segment_sum(s, seg, num_seg)[seg] + direct
    else:
        g_t = gate * rho * gamma * s + direct
    e_t = -o["entropy_coef"] * omega

    log_p = torch.log_softmax(logits.detach(), -1).reshape(-1, logits.shape[-1])[sel]
    p = log_p.exp()
    onehot = torch.nn.functional.one_hot(batch.tokens.reshape(-1)[sel], logits.shape[-1]).double()
    rows = g_t[:, None] * (onehot - p) - e_t[:, None] * p * (log_p + entropy.reshape(-1)[sel][:, None])
    return torch.zeros(mask.numel(), logits.shape[-1], dtype=F64).index_put((sel,), rows).reshape(logits.shape)


@pytest.mark.parametrize("extras", ["plain", "kl_ratio_weight", "corrections"])
@pytest.mark.parametrize("ratio_grad", ["exact", "token"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradient_is_the_closed_form_of_the_contract(objective, ratio_grad, extras):
    index = OBJECTIVES.index(objective)
    batch = _batch(30 + index, packed=index % 2 == 1, log_ratio_scale=0.4)
    opts = dict(granularity="subsentence", objective=objective, ratio_grad=ratio_grad, **OWN[objective],
                loss_agg_mode=("token-mean", "sum", "seq-mean-token-mean")[index % 3], beta=0.2, entropy_coef=0.05,
                log_ratio_clamp=0.45)  # fmt: skip
    if objective in ("clip", "cispo", "gmpo"):
        opts["entropy_gamma"] = 0.5
    if extras == "kl_ratio_weight":
        opts["kl_ratio_weight"] = True
    if extras == "corrections":
        opts.update(
            policy_weights=weights_for(batch, 3), rollout_logprobs=rollout_for(batch, 4), entropy_mask_quantile=0.8
        )
        opts.update(rollout_is="token" if objective == "vespo" else "segment", rollout_is_mode="truncate")
    logits, out = run(batch, **opts)
    spec = spec_terms(batch, batch.logits.detach(), opts)
    binds = spec.d.abs() > 0.45
    assert binds.any() and not binds.all(), "the log-ratio clamp must bind for some segments, not all"
    assert_rel_norm("dlogits", grad_of(out.loss, logits), doc_dlogits(batch, batch.logits.detach(), opts), tol=1e-10)


# --------------------------------------------------------------------------------------------------
# gradcheck (the objectives whose gradient is the true derivative: cispo and vespo stop it on purpose)
# --------------------------------------------------------------------------------------------------

MARGIN = 1e-3
GRADCHECK = [
    ("sapo-sequence", dict(granularity="sequence", objective="sapo", **OWN["sapo"])),
    ("sapo-token_form-token", dict(granularity="token", objective="sapo", ratio_grad="token", beta=0.2,
                                   kl_ratio_weight=True)),
    ("gmpo-subsentence", dict(granularity="subsentence", objective="gmpo", **OWN["gmpo"], beta=0.2,
                              kl_ratio_weight=True)),
    ("gmpo-token_form-token", dict(granularity="token", objective="gmpo", ratio_grad="token", **OWN["gmpo"])),
    ("reinforce-segments", dict(granularity="segments", objective="reinforce", beta=0.3, kl_ratio_weight=True)),
    ("clip-dual-rollout", dict(granularity="sentence", **OWN["clip"], rollout_is="token", rollout_is_max=1.2)),
]  # fmt: skip


def _kink_free(batch: Batch, opts: dict) -> bool:
    spec = spec_terms(batch, batch.logits.detach(), opts)
    seg, rho = spec.seg, spec.rho[spec.seg]
    near = lambda x, y: bool(((x - y).abs() < MARGIN).any())
    if opts.get("objective") == "gmpo":
        logp, _ = token_logp_entropy(batch, batch.logits.detach())
        x = (logp - batch.old_logprobs)[batch.mask]
        if near(x, -OWN["gmpo"]["eps_low"]) or near(x, OWN["gmpo"]["eps_high"]):
            return False
        return bool(0 < (spec.clip_low | spec.clip_high).double().mean() < 1)
    if opts.get("objective", "clip") == "clip":
        if near(rho, spec.lo[seg]) or near(rho, spec.hi[seg]) or near(rho[spec.adv < 0], opts["dual_clip"]):
            return False
        return bool(0 < (spec.clip_low | spec.clip_high).double().mean() < 1)
    return True


@pytest.mark.parametrize("opts", [pytest.param(o, id=i) for i, o in GRADCHECK])
def test_gradcheck(opts):
    for seed in range(200):
        batch = with_zero_advantages(make_batch(500 + seed, [4, 3, 4], vocab=5, per_token_adv=True), seed)
        full = dict(opts)
        if "rollout_is" in full:
            full["rollout_logprobs"] = rollout_for(batch, seed)
        if _kink_free(batch, full):
            break
    else:
        pytest.fail("no kink-free seed")

    def loss_of(logits):
        return run(batch, logits, **dict(full))[1].loss

    assert torch.autograd.gradcheck(loss_of, (batch.fresh_logits(),), eps=1e-6, atol=1e-7, rtol=1e-5)
