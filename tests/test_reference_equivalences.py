"""The float64 reference against docs/loss.md: the contract's equivalences (PPO-clip, verl GSPO, subsentence limits).

Helpers shared with the other test_reference_*.py files live in `_reference_helpers`.
"""

from __future__ import annotations

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import Batch, make_batch, pack
from _reference_helpers import (
    ADAPTIVE,
    EXACT,
    METRICS,
    grad_of,
    ppo_clip,
    run,
    token_logp_entropy,
)

# --------------------------------------------------------------------------------------------------
# The contract's equivalences
# --------------------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("per_token_adv", [False, True], ids=["adv_per_response", "adv_per_token"])
@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=lambda t: f"tau{t}")
def test_token_granularity_is_ppo_clip(temperature, per_token_adv, packed):
    batch = make_batch(1, [5, 3, 6], per_token_adv=per_token_adv, hole_p=0.2, log_ratio_scale=0.3)
    batch = pack(batch) if packed else batch
    eps_low, eps_high = 0.2, 0.28
    opts = dict(granularity="token", eps_low=eps_low, eps_high=eps_high, entropy_gamma=0.0, temperature=temperature)
    logits, out = run(batch, **opts)
    _, per_tok = run(batch, loss_agg_mode="none", **opts)

    want_logits = batch.fresh_logits()
    logp, entropy = token_logp_entropy(batch, want_logits, temperature)
    adv = batch.token_advantages().reshape(batch.tokens.shape)
    ratio = torch.exp(logp - batch.old_logprobs)
    m = batch.mask.double()
    loss_t = ppo_clip(adv, ratio, eps_low, eps_high) * m
    want = loss_t.sum() / m.sum()
    clipped = (ratio < 1 - eps_low) | (ratio > 1 + eps_high)
    assert clipped[batch.mask].any() and (~clipped)[batch.mask].any(), "case must clip some tokens, not all"

    assert_close("loss", out.loss, want, atol=EXACT, rtol=EXACT)
    assert_rel_norm("dlogits", grad_of(out.loss, logits), grad_of(want, want_logits), tol=1e-10)
    assert_close("per-token loss", per_tok.loss, loss_t, atol=EXACT)
    assert_close("logprobs", out.logprobs, logp * m, atol=EXACT)
    assert_close("entropy", out.entropy, entropy * m, atol=EXACT)


def gspo_verl_style(batch: Batch, logits: torch.Tensor, eps_low: float, eps_high: float, stop_grad: bool):
    """verl's GSPO on a padded batch, aggregated seq-mean-token-mean.

    Sequence log-ratio = masked mean of (l - q) per response. With stop_grad (verl's form) each
    token's log-ratio is l - sg(l) + sg(seq log-ratio), clamped above at 10; without it every token
    carries the sequence log-ratio itself (the plain chain rule through the mean).
    """
    logp, _ = token_logp_entropy(batch, logits)
    m = batch.mask.double()
    n = m.sum(-1).clamp(min=1)
    seq_log_ratio = ((logp - batch.old_logprobs) * m).sum(-1) / n
    if stop_grad:
        log_ratio = logp - logp.detach() + seq_log_ratio.detach().unsqueeze(-1)
    else:
        log_ratio = seq_log_ratio.unsqueeze(-1).expand_as(logp)
    ratio = log_ratio.clamp(max=10.0).exp()
    adv = batch.token_advantages().reshape(batch.tokens.shape)
    losses = ppo_clip(adv, ratio, eps_low, eps_high)
    return ((losses * m).sum(-1) / n).mean(), ratio


@pytest.mark.parametrize(
    ("ratio_grad", "per_token_adv", "stop_grad"),
    [
        pytest.param("token", False, True, id="ratio_grad_token-adv_per_response-vs-verl_gspo"),
        pytest.param("token", True, True, id="ratio_grad_token-adv_per_token-vs-verl_gspo"),
        pytest.param("exact", False, True, id="ratio_grad_exact-adv_per_response-vs-verl_gspo"),
        pytest.param("exact", True, False, id="ratio_grad_exact-adv_per_token-vs-chain_rule"),
    ],
)
def test_sequence_granularity_is_gspo(ratio_grad, per_token_adv, stop_grad):
    batch = make_batch(3, [5, 3, 6, 4], per_token_adv=per_token_adv, hole_p=0.2, log_ratio_scale=0.3)
    assert (batch.mask.sum(-1) > 0).all(), "verl's seq-mean-token-mean needs non-empty responses"
    eps_low, eps_high = 0.05, 0.08
    opts = dict(
        granularity="sequence",
        eps_low=eps_low,
        eps_high=eps_high,
        entropy_gamma=0.0,
        loss_agg_mode="seq-mean-token-mean",
        log_ratio_clamp=10.0,
        ratio_grad=ratio_grad,
    )
    logits, out = run(batch, **opts)
    want_logits = batch.fresh_logits()
    want, ratio = gspo_verl_style(batch, want_logits, eps_low, eps_high, stop_grad)
    row_ratio = ratio.detach()[:, 0]
    clipped = (row_ratio < 1 - eps_low) | (row_ratio > 1 + eps_high)
    assert clipped.any() and (~clipped).any(), "case must clip some responses, not all"

    assert_close("loss", out.loss, want, atol=EXACT, rtol=EXACT)
    assert_rel_norm("dlogits", grad_of(out.loss, logits), grad_of(want, want_logits), tol=1e-10)
    assert_close("ratio_max", out.metrics["ratio_max"], row_ratio.max(), atol=EXACT, rtol=EXACT)


def _boundary_batch(seed: int, boundary_in_first: bool) -> Batch:
    """Three responses over V=7 where ids {0, 1} are boundaries; only response 0 may use them."""
    batch = make_batch(seed, [6, 5, 4], hole_p=0.15, log_ratio_scale=0.2)
    batch.boundary = torch.zeros(7, dtype=torch.bool)
    batch.boundary[:2] = True
    gen = torch.Generator().manual_seed(seed)
    no_boundary = torch.randint(2, 7, batch.tokens.shape, generator=gen)
    tokens = torch.where(batch.tokens >= 0, no_boundary, batch.tokens)
    if boundary_in_first:
        tokens[0, 1] = 0
        tokens[0, 3] = 1
    # keep old_logprobs tied to the new tokens so the ratios stay moderate
    logp, _ = token_logp_entropy(batch, batch.logits.detach())
    batch.old_logprobs = batch.old_logprobs - logp
    batch.tokens = tokens
    logp, _ = token_logp_entropy(batch, batch.logits.detach())
    batch.old_logprobs = torch.where(tokens >= 0, batch.old_logprobs + logp, 0.0)
    return batch


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_subsentence_without_boundaries_is_sequence(agg):
    batch = _boundary_batch(3, boundary_in_first=False)
    logits_a, sub = run(batch, granularity="subsentence", loss_agg_mode=agg, **ADAPTIVE)
    logits_b, seq = run(batch, granularity="sequence", loss_agg_mode=agg, **ADAPTIVE)
    assert_close("loss", sub.loss, seq.loss, atol=EXACT, rtol=EXACT)
    assert_rel_norm("dlogits", grad_of(sub.loss, logits_a), grad_of(seq.loss, logits_b), tol=1e-12)
    for name in METRICS:
        assert_close(name, sub.metrics[name], seq.metrics[name], atol=EXACT)


def test_subsentence_equals_sequence_on_a_response_without_boundary():
    batch = _boundary_batch(4, boundary_in_first=True)
    opts = dict(loss_agg_mode="none", **ADAPTIVE)
    logits_a, sub = run(batch, granularity="subsentence", **opts)
    logits_b, seq = run(batch, granularity="sequence", **opts)
    assert sub.metrics["num_segments"] > seq.metrics["num_segments"], "response 0 must be split"
    rows = slice(1, 3)  # responses without a boundary token
    assert_close("per-token loss", sub.loss[rows], seq.loss[rows], atol=EXACT)
    g_sub = grad_of(sub.loss[rows], logits_a)[rows]
    g_seq = grad_of(seq.loss[rows], logits_b)[rows]
    assert_rel_norm("dlogits of responses 1-2", g_sub, g_seq, tol=1e-12)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("per_token_adv", [False, True], ids=["adv_per_response", "adv_per_token"])
def test_subsentence_with_boundary_after_every_token_is_token(per_token_adv, agg):
    batch = make_batch(5, [6, 2, 5], per_token_adv=per_token_adv, hole_p=0.2)
    batch.boundary = torch.ones(batch.vocab, dtype=torch.bool)
    opts = dict(loss_agg_mode=agg, **ADAPTIVE)
    logits_a, sub = run(batch, granularity="subsentence", **opts)
    logits_b, tok = run(batch, granularity="token", **opts)
    assert_close("loss", sub.loss, tok.loss, atol=EXACT, rtol=EXACT)
    assert_rel_norm("dlogits", grad_of(sub.loss, logits_a), grad_of(tok.loss, logits_b), tol=1e-12)
    for name in METRICS:
        assert_close(name, sub.metrics[name], tok.metrics[name], atol=EXACT)


@pytest.mark.parametrize(
    ("ids", "same_as"),
    [
        pytest.param("constant", "sequence", id="constant_ids-is-sequence"),
        pytest.param("distinct", "token", id="distinct_ids-is-token"),
        pytest.param("boundary_runs", "subsentence", id="ids_cut_after_boundaries-is-subsentence"),
    ],
)
def test_segments_granularity_reduces_to_the_others(ids, same_as):
    batch = make_batch(6, [6, 4, 5], hole_p=0.2)
    if ids == "constant":
        batch.segment_ids = torch.zeros_like(batch.tokens)
    elif ids == "distinct":
        batch.segment_ids = torch.arange(batch.tokens.numel()).reshape(batch.tokens.shape)
    else:  # a new id after each masked-in boundary token, as the subsentence rule cuts
        cut = batch.boundary[batch.tokens.clamp(min=0)] & batch.mask
        batch.segment_ids = torch.cumsum(cut.long(), -1) - cut.long()
    logits_a, seg = run(batch, granularity="segments", **ADAPTIVE)
    logits_b, ref = run(batch, granularity=same_as, **ADAPTIVE)
    assert_close("loss", seg.loss, ref.loss, atol=EXACT, rtol=EXACT)
    assert_rel_norm("dlogits", grad_of(seg.loss, logits_a), grad_of(ref.loss, logits_b), tol=1e-12)
    assert_close("num_segments", seg.metrics["num_segments"], ref.metrics["num_segments"])


def test_sentence_follows_the_table_it_is_given():
    # "sentence" differs from "subsentence" only through the boundary table built for it
    batch = make_batch(7, [6, 5], hole_p=0.1)
    logits_a, sen = run(batch, granularity="sentence", **ADAPTIVE)
    logits_b, sub = run(batch, granularity="subsentence", **ADAPTIVE)
    assert_close("loss", sen.loss, sub.loss, atol=EXACT, rtol=EXACT)
    assert_rel_norm("dlogits", grad_of(sen.loss, logits_a), grad_of(sub.loss, logits_b), tol=1e-12)
