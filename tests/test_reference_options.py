"""The float64 reference against docs/loss.md: aggregation, layouts, the individual options, adaptive bounds, metrics.

Helpers shared with the other test_reference_*.py files live in `_reference_helpers`.
"""

from __future__ import annotations

import math

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import Batch, make_batch, pack, segment_labels
from _reference_helpers import (
    ADAPTIVE,
    AGG_MODES,
    BASE,
    EXACT,
    F64,
    METRICS,
    assert_matches_spec,
    grad_of,
    ppo_clip,
    run,
    token_logp_entropy,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GRANULARITIES = ("token", "sequence", "subsentence", "sentence", "segments")
SWEEP = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------
# Aggregation, layouts and the individual options
# --------------------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


def _agg_expected(mode: str, loss_t, m, *, normalizer=None, norm_len=None):
    """Each aggregation mode on (B, T) per-token losses (zero where masked out)."""
    rows_n = m.sum(-1)
    nonempty = rows_n > 0
    n_resp = normalizer if normalizer is not None else nonempty.sum()
    if mode == "token-mean":
        return loss_t.sum() / (normalizer if normalizer is not None else m.sum())
    if mode == "seq-mean-token-mean":
        return (loss_t.sum(-1)[nonempty] / rows_n[nonempty]).sum() / n_resp
    if mode == "seq-mean-token-sum":
        return loss_t.sum(-1)[nonempty].sum() / n_resp
    if mode == "seq-mean-token-sum-norm":
        return loss_t.sum() / (n_resp * (norm_len if norm_len is not None else m.shape[-1]))
    if mode == "sum":
        return loss_t.sum()
    return loss_t


@pytest.mark.parametrize(
    ("mode", "extra"),
    [pytest.param(mode, {}, id=mode) for mode in AGG_MODES]
    + [
        pytest.param("token-mean", {"normalizer": 20.0}, id="token-mean-normalizer20"),
        pytest.param("seq-mean-token-mean", {"normalizer": 8.0}, id="seq-mean-token-mean-normalizer8"),
        pytest.param("seq-mean-token-sum", {"normalizer": torch.tensor(8.0)}, id="seq-mean-token-sum-normalizer8"),
        pytest.param("seq-mean-token-sum-norm", {"normalizer": 8.0}, id="seq-mean-token-sum-norm-normalizer8"),
        pytest.param("seq-mean-token-sum-norm", {"norm_len": 10}, id="seq-mean-token-sum-norm-norm_len10"),
    ],
)
def test_aggregation_modes(mode, extra):
    # response 1 is empty: the seq-mean modes must count only the three non-empty ones
    batch = make_batch(8, [4, 0, 3, 5], seq_len=6, per_token_adv=True, hole_p=0.2)
    eps_low, eps_high = 0.2, 0.28
    logits, out = run(
        batch, granularity="token", eps_low=eps_low, eps_high=eps_high, entropy_gamma=0.0, loss_agg_mode=mode, **extra
    )
    want_logits = batch.fresh_logits()
    logp, _ = token_logp_entropy(batch, want_logits)
    m = batch.mask.double()
    loss_t = ppo_clip(batch.advantages, torch.exp(logp - batch.old_logprobs), eps_low, eps_high) * m
    normalizer = extra.get("normalizer")
    normalizer = None if normalizer is None else float(normalizer)
    want = _agg_expected(mode, loss_t, m, normalizer=normalizer, norm_len=extra.get("norm_len"))
    assert_close("loss", out.loss, want, atol=EXACT, rtol=EXACT)
    assert_rel_norm("dlogits", grad_of(out.loss, logits), grad_of(want, want_logits), tol=1e-10)


def _layout_options(draw) -> dict:
    granularity = draw(st.sampled_from(GRANULARITIES))
    opts = dict(
        granularity=granularity,
        eps_low=draw(st.sampled_from([0.02, 0.2])),
        eps_high=draw(st.sampled_from([0.03, 0.28])),
        entropy_gamma=draw(st.sampled_from([0.0, 0.5, 1.5])),
        loss_agg_mode=draw(st.sampled_from(AGG_MODES)),
        ratio_grad=draw(st.sampled_from(["exact", "token"])),
    )
    if draw(st.booleans()):
        opts.update(
            k_min=draw(st.sampled_from([0.0, 0.8])),
            k_max=draw(st.sampled_from([1.2, 5.0])),
            entropy_ref=draw(st.sampled_from(["batch", 1.1, 0.0])),
            adapt_low=draw(st.booleans()),
            adapt_high=draw(st.booleans()),
            dual_clip=draw(st.sampled_from([None, 1.3])),
            beta=draw(st.sampled_from([0.0, 0.2])),
            entropy_coef=draw(st.sampled_from([0.0, 0.05])),
            temperature=draw(st.sampled_from([1.0, 0.6])),
            log_ratio_clamp=draw(st.sampled_from([20.0, 0.4])),
        )
    if draw(st.booleans()) and opts["loss_agg_mode"] not in ("sum", "none"):
        opts["normalizer"] = draw(st.sampled_from([3.0, 11.0]))
    return opts


@st.composite
def sweep_cases(draw):
    lengths = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))
    batch = make_batch(
        draw(st.integers(0, 10_000)),
        lengths,
        seq_len=max(max(lengths), 1) + draw(st.integers(0, 2)),
        vocab=draw(st.sampled_from([3, 8])),
        per_token_adv=draw(st.booleans()),
        hole_p=draw(st.sampled_from([0.0, 0.3])),
        log_ratio_scale=draw(st.sampled_from([0.05, 0.4])),
        logit_scale=draw(st.sampled_from([0.5, 2.0])),
    )
    return batch, _layout_options(draw)


@SWEEP
@given(case=sweep_cases())
def test_padded_and_packed_agree(case):
    batch, opts = case
    packed = pack(batch)
    packed_opts = dict(opts)
    if opts["loss_agg_mode"] == "seq-mean-token-sum-norm":
        packed_opts["norm_len"] = batch.tokens.shape[1]
    logits_p, pad = run(batch, **opts)
    logits_k, pk = run(packed, **packed_opts)
    keep = torch.arange(batch.tokens.shape[1])[None, :] < torch.tensor(batch.lengths)[:, None]
    if opts["loss_agg_mode"] == "none":
        assert_close("per-token loss", pad.loss[keep], pk.loss, atol=EXACT)
        assert_close("per-token loss at padding", pad.loss[~keep], torch.zeros(int((~keep).sum())))
    else:
        assert_close("loss", pad.loss, pk.loss, atol=EXACT, rtol=1e-10)
    assert_close("logprobs", pad.logprobs[keep], pk.logprobs, atol=EXACT)
    assert_close("entropy", pad.entropy[keep], pk.entropy, atol=EXACT)
    for name in METRICS:
        assert_close(name, pad.metrics[name], pk.metrics[name], atol=EXACT, rtol=1e-10)
    if pad.loss.requires_grad:
        g_pad, g_pk = grad_of(pad.loss, logits_p), grad_of(pk.loss, logits_k)
        assert_close("dlogits (kept rows)", g_pad[keep], g_pk, atol=1e-12, rtol=1e-10)
        assert_close("dlogits (padding rows)", g_pad[~keep], torch.zeros_like(g_pad[~keep]))


@SWEEP
@given(case=sweep_cases(), packed=st.booleans())
def test_random_options_match_the_vectorised_spec(case, packed):
    batch, opts = case
    if packed:
        batch = pack(batch)
        if opts["loss_agg_mode"] == "seq-mean-token-sum-norm":
            opts["norm_len"] = 7
    assert_matches_spec(batch, opts)


def test_kl_term_value():
    batch = make_batch(9, [5, 4, 6], hole_p=0.2)
    beta = 0.3
    opts = dict(granularity="subsentence", **ADAPTIVE)
    logits_0, base = run(batch, **opts)
    logits_1, with_kl = run(batch, beta=beta, **opts)
    want_logits = batch.fresh_logits()
    logp, _ = token_logp_entropy(batch, want_logits)
    x = batch.ref_logprobs - logp
    m = batch.mask.double()
    kl_mean = ((x.exp() - x - 1) * m).sum() / m.sum()
    assert_close("loss(beta) - loss(0)", with_kl.loss - base.loss, beta * kl_mean, atol=EXACT)
    got = grad_of(with_kl.loss, logits_1) - grad_of(base.loss, logits_0)
    assert_rel_norm("dlogits of the KL term", got, grad_of(beta * kl_mean, want_logits), tol=1e-10)


def test_entropy_bonus_value_and_gradient():
    batch = make_batch(10, [5, 4, 6], hole_p=0.2)
    alpha = 0.05
    opts = dict(granularity="subsentence", loss_agg_mode="seq-mean-token-mean", **ADAPTIVE)
    logits_0, base = run(batch, **opts)
    logits_1, with_h = run(batch, entropy_coef=alpha, **opts)
    want_logits = batch.fresh_logits()
    _, entropy = token_logp_entropy(batch, want_logits)
    m = batch.mask.double()
    bonus = -alpha * ((entropy * m).sum(-1) / m.sum(-1)).mean()
    assert_close("loss(alpha) - loss(0)", with_h.loss - base.loss, bonus, atol=EXACT)
    got = grad_of(with_h.loss, logits_1) - grad_of(base.loss, logits_0)
    # H_t is not detached in the bonus: the gradient is the full entropy gradient
    assert_rel_norm("dlogits of the entropy bonus", got, grad_of(bonus, want_logits), tol=1e-10)


def test_dual_clip_caps_the_loss_of_negative_advantages():
    batch = make_batch(11, [6, 6, 6], per_token_adv=True, log_ratio_scale=0.6)
    eps_low, eps_high, c3 = 0.2, 0.28, 1.5
    opts = dict(granularity="token", eps_low=eps_low, eps_high=eps_high, entropy_gamma=0.0, dual_clip=c3)
    logits, out = run(batch, loss_agg_mode="none", **opts)
    want_logits = batch.fresh_logits()
    logp, _ = token_logp_entropy(batch, want_logits)
    ratio = torch.exp(logp - batch.old_logprobs)
    adv = batch.advantages
    loss_t = ppo_clip(adv, ratio, eps_low, eps_high)
    capped = torch.where(adv < 0, torch.minimum(loss_t, -adv * c3), loss_t) * batch.mask
    binds = (adv < 0) & (ratio > c3) & batch.mask
    assert binds.any(), "the dual clip must bind somewhere"
    assert_close("per-token loss", out.loss, capped, atol=EXACT)
    assert_close("capped value", out.loss[binds], (-adv * c3)[binds], atol=EXACT)
    g = grad_of(out.loss, logits)
    assert_rel_norm("dlogits", g, grad_of(capped, want_logits), tol=1e-10)
    assert_close("dlogits where the dual clip binds", g[binds], torch.zeros_like(g[binds]))


@pytest.mark.parametrize("ratio_grad", ["exact", "token"])
def test_log_ratio_clamp(ratio_grad):
    batch = make_batch(12, [4, 3, 5], per_token_adv=True)
    logp, _ = token_logp_entropy(batch, batch.logits.detach())
    shift = torch.tensor([[1.0], [-1.0], [0.1]], dtype=F64)  # d_s of each response, two beyond c
    batch.old_logprobs = torch.where(batch.mask, logp - shift, 0.0)
    c = 0.5
    # clip bounds wide enough never to bind, so the loss shows the clamped ratio itself
    opts = dict(
        granularity="sequence", eps_low=0.9, eps_high=10.0, entropy_gamma=0.0, log_ratio_clamp=c, ratio_grad=ratio_grad
    )
    logits, out = run(batch, loss_agg_mode="none", **opts)
    rho = shift.clamp(-c, c).exp()
    assert_close("per-token loss", out.loss, -batch.advantages * rho * batch.mask, atol=EXACT)
    _, agg = run(batch, **opts)
    assert_close("ratio_max", agg.metrics["ratio_max"], torch.tensor(math.exp(c), dtype=F64), atol=EXACT)
    assert_close("ratio_min", agg.metrics["ratio_min"], torch.tensor(math.exp(-c), dtype=F64), atol=EXACT)
    g = grad_of(out.loss, logits)
    assert_close("dlogits where the clamp binds", g[:2], torch.zeros_like(g[:2]))
    assert g[2].abs().sum() > 0


@pytest.mark.parametrize("granularity", ["sequence", "subsentence", "token"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_ratio_grad_forms(granularity, agg):
    opts = dict(granularity=granularity, loss_agg_mode=agg, **BASE)
    for per_token_adv in (False, True):
        batch = make_batch(13, [5, 6, 4], per_token_adv=per_token_adv, hole_p=0.1)
        logits_e, exact = run(batch, ratio_grad="exact", **opts)
        logits_t, token = run(batch, ratio_grad="token", **opts)
        assert_close("loss", exact.loss, token.loss, atol=EXACT, rtol=EXACT)
        g_exact, g_token = grad_of(exact.loss, logits_e), grad_of(token.loss, logits_t)
        if per_token_adv and granularity != "token":
            # a multi-token segment with varying A: the stop-gradient form is a different gradient
            rel = ((g_exact - g_token).norm() / g_exact.norm()).item()
            assert rel > 1e-3, f"exact and token gradients should differ, rel diff {rel:.3g}"
        else:
            assert_rel_norm("dlogits exact vs token", g_token, g_exact, tol=1e-12)


# --------------------------------------------------------------------------------------------------
# Entropy-adaptive bounds
# --------------------------------------------------------------------------------------------------


def _two_entropy_batch(adv_sign: float, shift: float) -> Batch:
    """Response 0 near-uniform (high entropy), response 1 peaked (low entropy); d_s = shift exactly."""
    batch = make_batch(14, [4, 5], vocab=6)
    scale = torch.tensor([0.1, 6.0], dtype=F64)[:, None, None]
    logits = batch.logits.detach() * scale
    batch.logits = logits.requires_grad_(True)
    logp, _ = token_logp_entropy(batch, logits.detach())
    batch.old_logprobs = torch.where(batch.mask, logp - shift, 0.0)
    batch.advantages = torch.full((2,), adv_sign, dtype=F64)
    return batch


def _expected_k(batch: Batch, gamma: float, entropy_ref, k_min: float, k_max: float) -> torch.Tensor:
    _, entropy = token_logp_entropy(batch, batch.logits.detach())
    m = batch.mask.double()
    h_bar = (entropy * m).sum(-1) / m.sum(-1)
    h_ref = (entropy * m).sum() / m.sum() if entropy_ref == "batch" else torch.tensor(entropy_ref, dtype=F64)
    return ((h_bar / h_ref) ** gamma).clamp(k_min, k_max)


@pytest.mark.parametrize("bound", ["high", "low"])
@pytest.mark.parametrize("adapt", [True, False], ids=["adapted", "not_adapted"])
@pytest.mark.parametrize(
    ("gamma", "entropy_ref", "k_min", "k_max"),
    [
        pytest.param(0.5, "batch", 0.5, 2.0, id="gamma0.5-ref_batch"),
        pytest.param(1.0, "batch", 0.0, 5.0, id="gamma1-ref_batch-wide_k"),
        pytest.param(2.0, 0.8, 0.5, 2.0, id="gamma2-ref0.8-saturates"),
        pytest.param(1.0, 1.0, 0.9, 1.1, id="gamma1-ref1-narrow_k"),
    ],
)
def test_clip_bound_scales_with_segment_entropy(gamma, entropy_ref, k_min, k_max, adapt, bound):
    # every segment is clipped on `bound`, so its per-token loss is -A * bound and reveals k_s
    eps = 0.1
    batch = _two_entropy_batch(adv_sign=1.0 if bound == "high" else -1.0, shift=1.0 if bound == "high" else -2.0)
    opts = dict(
        granularity="sequence",
        eps_low=eps,
        eps_high=eps,
        entropy_gamma=gamma,
        k_min=k_min,
        k_max=k_max,
        entropy_ref=entropy_ref,
        adapt_low=adapt or bound == "high",
        adapt_high=adapt or bound == "low",
        loss_agg_mode="none",
    )
    _, out = run(batch, **opts)
    k = _expected_k(batch, gamma, entropy_ref, k_min, k_max)
    assert k[0] > 1.0 > k[1] or k_max < 1.5, "the two segments should get different k"
    sign = 1.0 if bound == "high" else -1.0
    per_resp = out.loss[torch.arange(2), 0]  # first token of each response (all are masked in)
    recovered = (-per_resp / batch.advantages - 1) / (sign * eps)
    assert_close("k_s", recovered, k if adapt else torch.ones(2, dtype=F64), atol=1e-12)
    assert_close(f"clip_frac_{bound}", out.metrics[f"clip_frac_{bound}"], torch.tensor(1.0, dtype=F64))


@pytest.mark.parametrize("adapt_high", [True, False], ids=["adapted", "not_adapted"])
def test_entropy_decides_which_segment_is_clipped(adapt_high):
    eps, gamma = 0.1, 1.0
    probe = _two_entropy_batch(1.0, 0.0)
    k = _expected_k(probe, gamma, "batch", 0.5, 2.0)
    assert k[0] > 1.0 > k[1]
    # segment 0 (k > 1) sits between 1 + eps and 1 + eps * k: kept only thanks to its wider bound;
    # segment 1 (k < 1) sits between 1 + eps * k and 1 + eps: clipped only by its narrower bound
    target = 1 + eps * (1 + k) / 2
    batch = _two_entropy_batch(1.0, 0.0)
    logp, _ = token_logp_entropy(batch, batch.logits.detach())
    batch.old_logprobs = torch.where(batch.mask, logp - target.log()[:, None], 0.0)
    opts = dict(granularity="sequence", eps_low=eps, eps_high=eps, entropy_gamma=gamma, adapt_high=adapt_high)
    _, out = run(batch, loss_agg_mode="none", **opts)
    _, agg = run(batch, **opts)
    n = batch.mask.sum(-1).double()
    clipped_resp = 1 if adapt_high else 0
    want_frac = n[clipped_resp] / n.sum()
    assert_close("clip_frac_high", agg.metrics["clip_frac_high"], want_frac, atol=EXACT)
    assert_close("clip_frac_low", agg.metrics["clip_frac_low"], torch.tensor(0.0, dtype=F64))
    bound = 1 + eps * (k if adapt_high else torch.ones(2, dtype=F64))
    want = torch.where(torch.arange(2) == clipped_resp, bound, target)
    assert_close("per-token loss", out.loss[:, 0], -want, atol=EXACT)


@pytest.mark.parametrize(
    ("gamma", "entropy_ref", "k_min", "k_max"),
    [
        pytest.param(0.0, "batch", 1.5, 3.0, id="gamma0-k_min_above_1"),
        pytest.param(0.0, 0.3, 0.1, 0.5, id="gamma0-k_max_below_1"),
        pytest.param(1.0, 0.0, 1.5, 3.0, id="entropy_ref0"),
    ],
)
def test_adaptation_off_gives_k_equal_1(gamma, entropy_ref, k_min, k_max):
    eps = 0.1
    batch = _two_entropy_batch(1.0, 1.0)
    _, out = run(
        batch,
        granularity="sequence",
        eps_low=eps,
        eps_high=eps,
        entropy_gamma=gamma,
        k_min=k_min,
        k_max=k_max,
        entropy_ref=entropy_ref,
        loss_agg_mode="none",
    )
    assert_close("per-token loss", out.loss, -(1 + eps) * batch.mask.double(), atol=EXACT)


def test_batch_entropy_ref_equals_its_value_given_as_a_float():
    batch = make_batch(15, [5, 3, 6], hole_p=0.2, logit_scale=2.0)
    _, entropy = token_logp_entropy(batch, batch.logits.detach())
    h_ref = float(entropy[batch.mask].mean())
    opts = dict(granularity="subsentence", eps_low=0.05, eps_high=0.05, entropy_gamma=1.0, k_min=0.2, k_max=5.0)
    logits_a, as_batch = run(batch, entropy_ref="batch", **opts)
    logits_b, as_float = run(batch, entropy_ref=h_ref, **opts)
    assert_close("loss", as_batch.loss, as_float.loss, atol=EXACT, rtol=EXACT)
    assert_rel_norm("dlogits", grad_of(as_batch.loss, logits_a), grad_of(as_float.loss, logits_b), tol=1e-12)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_metrics_simple_case(granularity):
    batch = make_batch(16, [6, 3, 5], per_token_adv=True, hole_p=0.2, log_ratio_scale=0.4)
    opts = dict(granularity=granularity, eps_low=0.1, eps_high=0.15, entropy_gamma=0.5)
    _, out = run(batch, **opts)
    # by hand, from the labelled segments
    labels = segment_labels(batch, granularity)
    mask = batch.mask.reshape(-1)
    logp, entropy = token_logp_entropy(batch, batch.logits.detach())
    lp, h = logp.reshape(-1), entropy.reshape(-1)
    q, a = batch.old_logprobs.reshape(-1), batch.token_advantages()
    num = int(labels.max()) + 1
    h_ref = h[mask].mean()
    lows, highs, ratios = 0, 0, []
    for s in range(num):
        idx = labels == s
        rho = torch.exp((lp[idx] - q[idx]).mean())
        k = ((h[idx].mean() / h_ref) ** 0.5).clamp(0.5, 2.0)
        ratios.append(rho)
        lows += int(((a[idx] < 0) & (rho < 1 - 0.1 * k)).sum())
        highs += int(((a[idx] > 0) & (rho > 1 + 0.15 * k)).sum())
    n = int(mask.sum())
    ratios = torch.stack(ratios)
    want = {
        "clip_frac_low": lows / n,
        "clip_frac_high": highs / n,
        "clip_frac": (lows + highs) / n,
        "ratio_mean": ratios.mean(),
        "ratio_min": ratios.min(),
        "ratio_max": ratios.max(),
        "entropy_mean": h[mask].mean(),
        "approx_kl": (q - lp)[mask].mean(),
        "num_segments": num,
        "mean_segment_len": n / num,
    }
    assert lows + highs > 0
    for name, value in want.items():
        got = out.metrics[name]
        assert isinstance(got, torch.Tensor) and got.dim() == 0, name
        assert not got.requires_grad and got.grad_fn is None, f"{name} must be detached"
        assert_close(name, got, torch.as_tensor(value, dtype=got.dtype), atol=EXACT, rtol=EXACT)
