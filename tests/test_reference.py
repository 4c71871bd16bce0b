"""Credentials of the float64 reference (`reference.sspo_loss`) against SPEC.md.

Every expected value here is written independently of the reference's Python loops: the textbook
PPO-clip (GRPO/DAPO) and verl-style GSPO formulas on whole tensors, per-mode aggregation formulas,
and `spec_terms`, a vectorised restatement of the SPEC (segments from `_cases.segment_labels`,
segment sums by `index_add`) used for the metrics, the adaptive bounds and the random sweeps.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import IGNORE, Batch, make_batch, pack, segment_labels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import sspo_loss

F64 = torch.float64
EXACT = 1e-12  # two float64 computations of the same formula agree to rounding
GRANULARITIES = ("token", "sequence", "subsentence", "sentence", "segments")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "sum", "none")
METRICS = (
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
)
SWEEP = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: intra-op threads only add fork/join cost (large on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(batch: Batch, logits: torch.Tensor | None = None, **opts):
    """Call the reference on `batch` (a fresh logits leaf unless one is given)."""
    logits = batch.fresh_logits() if logits is None else logits
    args, kwargs = batch.inputs(opts.pop("granularity"), logits)
    return logits, sspo_loss(*args, **kwargs, **opts)


def grad_of(loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss.sum(), logits)[0]


def token_logp_entropy(batch: Batch, logits: torch.Tensor, temperature: float = 1.0):
    """l_t and H_t shaped like tokens, from one log_softmax over the whole batch."""
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    logp = log_p.gather(-1, batch.tokens.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return logp, -(log_p.exp() * log_p).sum(-1)


def ppo_clip(adv, ratio, eps_low, eps_high):
    """L = max(-A r, -A clamp(r, 1 - eps_low, 1 + eps_high))."""
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))


# --------------------------------------------------------------------------------------------------
# A vectorised restatement of SPEC.md
# --------------------------------------------------------------------------------------------------


def spec_terms(batch: Batch, logits: torch.Tensor, opts: dict) -> SimpleNamespace:
    """Loss, per-token terms, segment terms and metrics of SPEC.md, computed on whole tensors.

    `opts` holds sspo_loss keywords; eps_low, eps_high and entropy_gamma must be given (the
    per-granularity defaults are the reference's business, not the SPEC's).
    """
    o = {
        "k_min": 0.5, "k_max": 2.0, "entropy_ref": "batch", "adapt_low": True, "adapt_high": True,
        "dual_clip": None, "beta": 0.0, "entropy_coef": 0.0, "temperature": 1.0,
        "loss_agg_mode": "token-mean", "normalizer": None, "norm_len": None,
        "log_ratio_clamp": 20.0, "ratio_grad": "exact", **opts,
    }  # fmt: skip
    logp, entropy = token_logp_entropy(batch, logits, o["temperature"])
    logp, entropy = logp.reshape(-1), entropy.reshape(-1)
    mask = batch.mask.reshape(-1)
    sel = torch.nonzero(mask).squeeze(1)
    labels = segment_labels(batch, o["granularity"])
    seg = labels[sel]
    num_seg = int(labels.max()) + 1 if sel.numel() else 0
    l_in, h_in = logp[sel], entropy[sel]
    q_in = batch.old_logprobs.reshape(-1)[sel].double()
    a_in = batch.token_advantages()[sel].double()

    n_s = torch.bincount(seg, minlength=num_seg).double()
    d = torch.zeros(num_seg, dtype=F64).index_add(0, seg, l_in - q_in) / n_s
    h_bar = torch.zeros(num_seg, dtype=F64).index_add(0, seg, h_in.detach()) / n_s
    c = o["log_ratio_clamp"]
    rho = d.clamp(-c, c).exp()
    if o["entropy_ref"] == "batch":
        h_ref = float(h_in.detach().mean()) if sel.numel() else 0.0
    else:
        h_ref = float(o["entropy_ref"])
    gamma = o["entropy_gamma"]
    k_raw = (h_bar / h_ref) ** gamma if h_ref != 0 else torch.ones_like(h_bar)
    k = torch.ones_like(h_bar) if gamma == 0 or h_ref == 0 else k_raw.clamp(o["k_min"], o["k_max"])
    lo = 1 - o["eps_low"] * (k if o["adapt_low"] else torch.ones_like(k))
    hi = 1 + o["eps_high"] * (k if o["adapt_high"] else torch.ones_like(k))

    if o["ratio_grad"] == "token":
        ratio = (d.detach()[seg] + l_in - l_in.detach()).clamp(-c, c).exp()
    else:
        ratio = rho[seg]
    loss_in = torch.maximum(-a_in * ratio, -a_in * torch.clamp(ratio, lo[seg], hi[seg]))
    if o["dual_clip"] is not None:
        loss_in = torch.where(a_in < 0, torch.minimum(loss_in, -a_in * o["dual_clip"]), loss_in)
    if o["beta"] > 0:
        x = batch.ref_logprobs.reshape(-1)[sel].double() - l_in
        loss_in = loss_in + o["beta"] * (x.exp() - x - 1)
    if o["entropy_coef"] > 0:
        loss_in = loss_in - o["entropy_coef"] * h_in

    resp = batch.response_ids()[sel]
    per_resp_n = torch.bincount(resp, minlength=batch.num_responses).double()
    resp_sum = torch.zeros(batch.num_responses, dtype=F64).index_add(0, resp, loss_in)
    given = None if o["normalizer"] is None else float(o["normalizer"])
    n_resp = given if given is not None else max(int((per_resp_n > 0).sum()), 1)
    mode = o["loss_agg_mode"]
    per_token = torch.zeros(mask.shape, dtype=F64).index_put((sel,), loss_in)
    if mode == "token-mean":
        loss = loss_in.sum() / (given if given is not None else max(sel.numel(), 1))
    elif mode == "seq-mean-token-mean":
        loss = (resp_sum / per_resp_n.clamp(min=1)).sum() / n_resp
    elif mode == "seq-mean-token-sum":
        loss = resp_sum.sum() / n_resp
    elif mode == "seq-mean-token-sum-norm":
        norm_len = o["norm_len"] if o["norm_len"] is not None else batch.tokens.shape[-1]
        loss = loss_in.sum() / (n_resp * norm_len)
    elif mode == "sum":
        loss = loss_in.sum()
    else:
        loss = per_token.reshape(batch.tokens.shape)

    clip_low = (a_in < 0) & (rho[seg] < lo[seg])
    clip_high = (a_in > 0) & (rho[seg] > hi[seg])
    n_in = max(sel.numel(), 1)
    none = torch.zeros((), dtype=F64)
    rho_d = rho.detach()
    metrics = {
        "clip_frac_low": clip_low.sum().double() / n_in,
        "clip_frac_high": clip_high.sum().double() / n_in,
        "clip_frac": (clip_low.sum() + clip_high.sum()).double() / n_in,
        "ratio_mean": rho_d.mean() if num_seg else none,
        "ratio_min": rho_d.min() if num_seg else none,
        "ratio_max": rho_d.max() if num_seg else none,
        "entropy_mean": h_in.detach().sum() / n_in,
        "approx_kl": (q_in - l_in.detach()).sum() / n_in,
        "num_segments": torch.tensor(num_seg),
        "mean_segment_len": torch.tensor(sel.numel() / max(num_seg, 1), dtype=F64),
    }
    return SimpleNamespace(
        loss=loss, per_token=per_token, seg=seg, d=d.detach(), rho=rho_d, k=k, k_raw=k_raw, h_ref=h_ref,
        lo=lo, hi=hi, adv=a_in, clip_low=clip_low, clip_high=clip_high, metrics=metrics,
    )  # fmt: skip


def assert_matches_spec(batch: Batch, opts: dict, *, check_grad: bool = True) -> None:
    """Loss, gradient, per-token outputs and every metric of the reference against spec_terms."""
    logits, out = run(batch, **opts)
    want_logits = batch.fresh_logits()
    want = spec_terms(batch, want_logits, opts)
    assert_close("loss", out.loss, want.loss, atol=EXACT, rtol=EXACT)
    for name in METRICS:
        got = out.metrics[name]
        assert isinstance(got, torch.Tensor) and not got.requires_grad and got.grad_fn is None, name
        assert_close(name, got, want.metrics[name], atol=EXACT, rtol=EXACT)
    logp, entropy = token_logp_entropy(batch, want_logits.detach(), opts.get("temperature", 1.0))
    assert_close("logprobs", out.logprobs, torch.where(batch.mask, logp, 0.0), atol=EXACT)
    assert_close("entropy", out.entropy, torch.where(batch.mask, entropy, 0.0), atol=EXACT)
    if check_grad and out.loss.requires_grad:
        assert_rel_norm("dlogits", grad_of(out.loss, logits), grad_of(want.loss, want_logits), tol=1e-10)


# --------------------------------------------------------------------------------------------------
# The SPEC's equivalences
# --------------------------------------------------------------------------------------------------


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


ADAPTIVE = dict(eps_low=0.05, eps_high=0.08, entropy_gamma=0.5, k_min=0.5, k_max=2.0)


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


# --------------------------------------------------------------------------------------------------
# gradcheck through every option
# --------------------------------------------------------------------------------------------------

MARGIN = 1e-3  # no ratio, log-ratio or entropy weight this close to a kink of the piecewise loss


def _screen(batch: Batch, opts: dict) -> set[str] | None:
    """What the case exercises, or None when some quantity sits near a kink.

    Besides the usual kinks (clip bounds, log-ratio clamp, dual clip, k_min / k_max), a token on the
    clipped branch of an adapted bound whose k is not saturated is rejected too: its loss moves with
    Hbar, which finite differences see but the SPEC's detached gradient rightly does not.
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


BASE = dict(eps_low=0.1, eps_high=0.15, entropy_gamma=0.0)
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


# --------------------------------------------------------------------------------------------------
# Aggregation, layouts and the individual options
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Degenerate inputs
# --------------------------------------------------------------------------------------------------


def _all_masked(packed: bool) -> Batch:
    batch = make_batch(17, [4, 2, 3])
    batch.mask = torch.zeros_like(batch.mask)
    return pack(batch) if packed else batch


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_all_masked_batch_gives_zero_loss_and_finite_metrics(agg, packed):
    batch = _all_masked(packed)
    extra = {"norm_len": 4} if packed and agg == "seq-mean-token-sum-norm" else {}
    _, out = run(batch, granularity="subsentence", loss_agg_mode=agg, **extra)
    assert_close("loss", out.loss, torch.zeros_like(out.loss))
    assert_close("logprobs", out.logprobs, torch.zeros_like(out.logprobs))
    assert_close("entropy", out.entropy, torch.zeros_like(out.entropy))
    for name in METRICS:
        assert torch.isfinite(out.metrics[name]).all(), name
    assert out.metrics["num_segments"] == 0


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="plain"),
        pytest.param({"beta": 0.1, "entropy_coef": 0.01}, id="kl_and_entropy_terms"),
    ],
)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_all_masked_batch_gets_zero_gradient(packed, extra):
    batch = _all_masked(packed)
    logits, out = run(batch, granularity="sequence", **extra)
    out.loss.backward()
    assert_close("dlogits", logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_all_masked_batch_with_zero_global_normalizer(agg):
    batch = _all_masked(packed=False)
    logits, out = run(batch, granularity="token", loss_agg_mode=agg, normalizer=torch.tensor(0.0))
    out.loss.backward()
    assert_close("loss", out.loss, torch.zeros_like(out.loss))
    assert_close("dlogits", logits.grad, torch.zeros_like(logits))


def test_zero_token_batch():
    batch = make_batch(18, [0, 0])
    batch = pack(batch)
    assert batch.tokens.numel() == 0
    _, out = run(batch, granularity="token")
    assert out.loss.item() == 0.0
    assert out.logprobs.shape == (0,) and out.entropy.shape == (0,)
    for name in METRICS:
        assert torch.isfinite(out.metrics[name]).all(), name


@pytest.mark.parametrize("agg", [m for m in AGG_MODES if m != "none"])
@pytest.mark.parametrize("granularity", ["token", "sequence", "subsentence"])
def test_empty_response_contributes_nothing(granularity, agg):
    full = make_batch(19, [5, 4, 6], seq_len=6, hole_p=0.1)
    with_empty = make_batch(19, [5, 4, 6], seq_len=6, hole_p=0.1)
    with_empty.mask = with_empty.mask.clone()
    with_empty.mask[1] = False
    without = make_batch(19, [5, 4, 6], seq_len=6, hole_p=0.1)
    rows = torch.tensor([0, 2])
    without.logits = full.logits.detach()[rows].requires_grad_(True)
    for name in ("tokens", "old_logprobs", "advantages", "mask", "ref_logprobs", "segment_ids"):
        setattr(without, name, getattr(full, name)[rows])
    without.lengths = [5, 6]
    opts = dict(granularity=granularity, loss_agg_mode=agg, **ADAPTIVE)
    logits_a, a = run(with_empty, **opts)
    logits_b, b = run(without, **opts)
    assert_close("loss", a.loss, b.loss, atol=EXACT, rtol=EXACT)
    g = grad_of(a.loss, logits_a)
    assert_close("dlogits of the empty response", g[1], torch.zeros_like(g[1]))
    assert_close("dlogits of the others", g[rows], grad_of(b.loss, logits_b), atol=1e-14, rtol=1e-12)


def test_one_token_segments():
    # one-token responses: the sequence ratio is the token ratio
    batch = pack(make_batch(20, [1, 1, 0, 1], per_token_adv=True))
    opts = dict(eps_low=0.1, eps_high=0.15, entropy_gamma=0.0)
    logits_a, seq = run(batch, granularity="sequence", **opts)
    logits_b, tok = run(batch, granularity="token", **opts)
    assert_close("loss", seq.loss, tok.loss, atol=EXACT, rtol=EXACT)
    assert_rel_norm("dlogits", grad_of(seq.loss, logits_a), grad_of(tok.loss, logits_b), tol=1e-12)
    assert seq.metrics["num_segments"] == 3 and seq.metrics["mean_segment_len"] == 1.0
    # a lone one-token segment between boundaries inside a longer response
    long = make_batch(21, [6], vocab=5)
    long.boundary = torch.zeros(5, dtype=torch.bool)
    long.boundary[0] = True
    long.tokens = torch.tensor([[2, 0, 0, 3, 4, 1]])
    long.old_logprobs = token_logp_entropy(long, long.logits.detach())[0] - 0.05
    assert_matches_spec(long, dict(granularity="subsentence", **ADAPTIVE))
    _, out = run(long, granularity="subsentence", **ADAPTIVE)
    assert out.metrics["num_segments"] == 3  # [2 0] [0] [3 4 1]


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------

META = "meta"  # a device no other tensor is on: stands in for a CUDA / CPU mismatch


def _bad(**changes):
    """(positional overrides, keyword overrides) applied to a valid subsentence call."""
    return changes


BAD_INPUTS = [
    # (id, changes to the call, exception, pattern the message must contain)
    ("logits-not_a_tensor", _bad(logits=[[0.0]]), TypeError, "logits"),
    ("logits-int_dtype", _bad(logits=torch.zeros(2, 3, 5, dtype=torch.int64)), TypeError, "logits"),
    ("logits-1d", _bad(logits=torch.zeros(5)), ValueError, "logits"),
    ("logits-empty_vocab", _bad(logits=torch.zeros(2, 3, 0)), ValueError, "logits"),
    ("tokens-wrong_shape", _bad(tokens=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "^tokens"),
    ("tokens-float", _bad(tokens=torch.zeros(2, 3)), TypeError, "^tokens"),
    ("tokens-other_device", _bad(tokens=torch.zeros(2, 3, dtype=torch.int64, device=META)), ValueError, "^tokens"),
    ("tokens-out_of_range_masked_in", _bad(tokens=torch.full((2, 3), 5)), ValueError, "^tokens"),
    ("tokens-minus100_masked_in", _bad(tokens=torch.full((2, 3), IGNORE)), ValueError, "^tokens"),
    ("old_logprobs-wrong_shape", _bad(old_logprobs=torch.zeros(2, 4)), ValueError, "^old_logprobs"),
    ("old_logprobs-int", _bad(old_logprobs=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "^old_logprobs"),
    ("old_logprobs-other_device", _bad(old_logprobs=torch.zeros(2, 3, device=META)), ValueError, "^old_logprobs"),
    ("advantages-wrong_shape", _bad(advantages=torch.zeros(3)), ValueError, "^advantages"),
    ("advantages-int", _bad(advantages=torch.zeros(2, dtype=torch.int64)), TypeError, "^advantages"),
    ("advantages-other_device", _bad(advantages=torch.zeros(2, device=META)), ValueError, "^advantages"),
    ("mask-wrong_shape", _bad(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "^mask"),
    ("mask-other_device", _bad(mask=torch.ones(2, 3, dtype=torch.bool, device=META)), ValueError, "^mask"),
    ("mask-complex", _bad(mask=torch.ones(2, 3, dtype=torch.complex64)), TypeError, "^mask"),
    ("ref_logprobs-missing_with_beta", _bad(ref_logprobs=None, beta=0.1), ValueError, "^ref_logprobs"),
    ("ref_logprobs-wrong_shape", _bad(ref_logprobs=torch.zeros(3, 2)), ValueError, "^ref_logprobs"),
    ("ref_logprobs-other_device", _bad(ref_logprobs=torch.zeros(2, 3, device=META)), ValueError, "^ref_logprobs"),
    ("boundary-missing", _bad(boundary=None), ValueError, r"needs boundary.*boundary_table\(tokenizer\)"),
    ("boundary-missing-sentence", _bad(boundary=None, granularity="sentence"), ValueError,
     r"boundary_table\(tokenizer, chars=SENTENCE_CHARS\)"),
    ("boundary-wrong_shape", _bad(boundary=torch.zeros(4, dtype=torch.bool)), ValueError, "^boundary"),
    ("boundary-int", _bad(boundary=torch.zeros(5, dtype=torch.int64)), TypeError, "^boundary"),
    ("segment_ids-missing", _bad(granularity="segments"), ValueError, "segment_ids"),
    ("segment_ids-float", _bad(granularity="segments", segment_ids=torch.zeros(2, 3)), TypeError, "^segment_ids"),
    ("segment_ids-wrong_shape", _bad(granularity="segments", segment_ids=torch.zeros(6, dtype=torch.int64)),
     ValueError, "^segment_ids"),
    ("segment_ids-other_device", _bad(granularity="segments", segment_ids=torch.zeros(2, 3, dtype=torch.int64,
     device=META)), ValueError, "^segment_ids"),
    ("segment_ids-with_other_granularity", _bad(segment_ids=torch.zeros(2, 3, dtype=torch.int64)), ValueError,
     "^segment_ids"),
    ("cu_seqlens-with_3d_logits", _bad(cu_seqlens=torch.tensor([0, 3, 6])), ValueError, "^cu_seqlens"),
    ("normalizer-zero", _bad(normalizer=0.0), ValueError, "^normalizer"),
    ("normalizer-negative", _bad(normalizer=-2), ValueError, "^normalizer"),
    ("normalizer-two_elements", _bad(normalizer=torch.ones(2)), ValueError, "^normalizer"),
    ("normalizer-string", _bad(normalizer="6"), TypeError, "^normalizer"),
    ("norm_len-negative", _bad(norm_len=-1), ValueError, "^norm_len"),
    ("granularity-unknown", _bad(granularity="word"), ValueError, "^granularity"),
    ("loss_agg_mode-unknown", _bad(loss_agg_mode="mean"), ValueError, "^loss_agg_mode"),
    ("ratio_grad-unknown", _bad(ratio_grad="approx"), ValueError, "^ratio_grad"),
    ("temperature-negative", _bad(temperature=-1.0), ValueError, "^temperature"),
    ("temperature-zero", _bad(temperature=0.0), ValueError, "^temperature"),
    ("temperature-nan", _bad(temperature=float("nan")), ValueError, "^temperature"),
    ("eps_low-negative", _bad(eps_low=-0.1), ValueError, "^eps_low"),
    ("eps_high-string", _bad(eps_high="0.2"), TypeError, "^eps_high"),
    ("entropy_gamma-inf", _bad(entropy_gamma=float("inf")), ValueError, "^entropy_gamma"),
    ("k_min-above-k_max", _bad(k_min=3.0, k_max=2.0), ValueError, "^k_min"),
    ("k_min-negative", _bad(k_min=-1.0), ValueError, "^k_min"),
    ("entropy_ref-unknown", _bad(entropy_ref="global"), ValueError, "^entropy_ref"),
    ("entropy_ref-negative", _bad(entropy_ref=-1.0), ValueError, "^entropy_ref"),
    ("dual_clip-not_above_1", _bad(dual_clip=0.9), ValueError, "^dual_clip"),
    ("beta-negative", _bad(beta=-0.1), ValueError, "^beta"),
    ("entropy_coef-negative", _bad(entropy_coef=-0.1), ValueError, "^entropy_coef"),
    ("log_ratio_clamp-zero", _bad(log_ratio_clamp=0.0), ValueError, "^log_ratio_clamp"),
    ("adapt_low-int", _bad(adapt_low=1), TypeError, "^adapt_low"),
    ("adapt_high-string", _bad(adapt_high="yes"), TypeError, "^adapt_high"),
    ("beta-bool", _bad(beta=True), TypeError, "^beta"),
]  # fmt: skip

PACKED_BAD_INPUTS = [
    ("cu_seqlens-wrong_total", _bad(cu_seqlens=torch.tensor([0, 2, 5])), ValueError, "^cu_seqlens"),
    ("cu_seqlens-decreasing", _bad(cu_seqlens=torch.tensor([0, 4, 2, 6])), ValueError, "^cu_seqlens"),
    ("cu_seqlens-2d", _bad(cu_seqlens=torch.tensor([[0, 6]])), ValueError, "^cu_seqlens"),
    ("cu_seqlens-float", _bad(cu_seqlens=torch.tensor([0.0, 6.0])), TypeError, "^cu_seqlens"),
    ("norm_len-missing_when_packed", _bad(loss_agg_mode="seq-mean-token-sum-norm"), ValueError, "norm_len"),
]


def _valid_call(packed: bool) -> dict:
    vocab = 5
    shape = (6,) if packed else (2, 3)
    call = dict(
        logits=torch.zeros(*shape, vocab),
        tokens=torch.ones(shape, dtype=torch.int64),
        old_logprobs=torch.zeros(shape),
        advantages=torch.zeros(2),
        mask=torch.ones(shape, dtype=torch.bool),
        granularity="subsentence",
        boundary=torch.zeros(vocab, dtype=torch.bool),
    )
    if packed:
        call["cu_seqlens"] = torch.tensor([0, 3, 6])
    return call


def _call(call: dict):
    args = [call.pop(n) for n in ("logits", "tokens", "old_logprobs", "advantages", "mask")]
    return sspo_loss(*args, **call)


@pytest.mark.parametrize(
    ("packed", "changes", "error", "pattern"),
    [pytest.param(False, c, e, p, id=i) for i, c, e, p in BAD_INPUTS]
    + [pytest.param(True, c, e, p, id=i) for i, c, e, p in PACKED_BAD_INPUTS],
)
def test_bad_input_names_the_argument(packed, changes, error, pattern):
    call = _valid_call(packed)
    _call(dict(call))  # the unchanged call is valid
    with pytest.raises(error, match=pattern):
        _call({**call, **changes})


@pytest.mark.parametrize(
    ("packed", "name", "value"),
    [
        pytest.param(False, "boundary", torch.zeros(5, dtype=torch.bool, device=META), id="boundary"),
        pytest.param(True, "cu_seqlens", torch.tensor([0, 3, 6], device=META), id="cu_seqlens"),
        pytest.param(False, "normalizer", torch.tensor(4.0, device=META), id="normalizer"),
    ],
)
def test_device_mismatch_of_the_side_tables_names_the_argument(packed, name, value):
    with pytest.raises(ValueError, match=f"^{name}"):
        _call({**_valid_call(packed), name: value})


def test_ignore_index_is_allowed_where_masked_out():
    batch = make_batch(22, [5, 2, 4], seq_len=6, hole_p=0.3)
    tokens = torch.where(batch.mask, batch.tokens, torch.full_like(batch.tokens, IGNORE))
    assert (tokens == IGNORE).any()
    batch.tokens = tokens
    assert_matches_spec(batch, dict(granularity="subsentence", **ADAPTIVE))
    batch.tokens = torch.where(batch.mask, tokens, torch.full_like(tokens, 10_000))  # any id, masked out
    assert_matches_spec(batch, dict(granularity="subsentence", **ADAPTIVE))


@pytest.mark.parametrize(
    "field",
    [
        "old_logprobs",
        "advantages",
        "ref_logprobs",
    ],
)
def test_non_finite_values_where_masked_out_are_ignored(field):
    clean = make_batch(27, [5, 3, 6], seq_len=6, per_token_adv=True, hole_p=0.3)
    opts = dict(granularity="subsentence", beta=0.2, entropy_coef=0.01, **ADAPTIVE)
    logits_a, want = run(clean, **opts)
    dirty = make_batch(27, [5, 3, 6], seq_len=6, per_token_adv=True, hole_p=0.3)
    setattr(dirty, field, torch.where(dirty.mask, getattr(dirty, field), float("nan")))
    logits_b, got = run(dirty, **opts)
    assert_close("loss", got.loss, want.loss, atol=EXACT, rtol=EXACT)
    for name in METRICS:
        assert_close(name, got.metrics[name], want.metrics[name], atol=EXACT)
    assert_rel_norm("dlogits", grad_of(got.loss, logits_b), grad_of(want.loss, logits_a), tol=1e-12)


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_per_token_outputs_are_zero_where_masked_out(packed):
    batch = make_batch(23, [6, 3, 5], seq_len=7, hole_p=0.3)
    batch = pack(batch) if packed else batch
    _, out = run(batch, granularity="subsentence", loss_agg_mode="none", **ADAPTIVE)
    for name, value in (("logprobs", out.logprobs), ("entropy", out.entropy), ("per-token loss", out.loss)):
        assert value.shape == batch.tokens.shape, name
        assert_close(f"{name} where masked out", value[~batch.mask], torch.zeros(int((~batch.mask).sum())))
    assert not out.logprobs.requires_grad and not out.entropy.requires_grad
    assert (out.entropy[batch.mask] > 0).all() and (out.logprobs[batch.mask] < 0).all()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_inputs_are_not_modified(packed):
    batch = make_batch(24, [5, 4, 6], per_token_adv=True, hole_p=0.2)
    batch = pack(batch) if packed else batch
    before = {k: v.detach().clone() for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    _, out = run(batch, batch.logits, granularity="subsentence", beta=0.1, entropy_coef=0.01, **ADAPTIVE)
    out.loss.backward()
    for name, value in before.items():
        assert torch.equal(getattr(batch, name).detach(), value), f"{name} was modified"


def test_noncontiguous_inputs_give_the_same_result():
    batch = make_batch(25, [5, 4, 6], per_token_adv=True, hole_p=0.2)
    opts = dict(granularity="subsentence", **ADAPTIVE)
    logits_a, want = run(batch, **opts)
    strided = make_batch(25, [5, 4, 6], per_token_adv=True, hole_p=0.2)
    # same values, every per-token tensor and the logits viewed through a transpose
    logits_b = batch.logits.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    for name in ("tokens", "old_logprobs", "advantages", "mask", "ref_logprobs"):
        setattr(strided, name, getattr(batch, name).t().contiguous().t())
        assert not getattr(strided, name).is_contiguous()
    assert not logits_b.is_contiguous()
    _, got = run(strided, logits_b, **opts)
    assert_close("loss", got.loss, want.loss, atol=EXACT, rtol=EXACT)
    assert_rel_norm("dlogits", grad_of(got.loss, logits_b), grad_of(want.loss, logits_a), tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_low_precision_logits_are_upcast(dtype):
    # the reference sees exactly the rounded values, in float64; the gradient comes back rounded once
    batch = make_batch(28, [5, 4], hole_p=0.2)
    low = batch.logits.detach().to(dtype).requires_grad_(True)
    high = low.detach().double().requires_grad_(True)
    opts = dict(granularity="subsentence", **ADAPTIVE)
    _, got = run(batch, low, **opts)
    _, want = run(batch, high, **opts)
    assert got.loss.dtype == F64 and got.logprobs.dtype == F64
    assert_close("loss", got.loss, want.loss)
    assert_close("logprobs", got.logprobs, want.logprobs)
    g_low = grad_of(got.loss, low)
    assert g_low.dtype == dtype
    assert_close("dlogits", g_low, grad_of(want.loss, high).to(dtype))


def test_nan_logits_propagate_to_the_loss():
    batch = make_batch(26, [4, 3])
    logits = batch.logits.detach().clone()
    logits[1, 0, 2] = float("nan")
    _, out = run(batch, logits.requires_grad_(True), granularity="token")
    assert torch.isnan(out.loss)
