"""Shared helpers of the tests of the float64 reference (`reference.sspo_loss`) against docs/loss.md.

Every expected value in those tests is written independently of the reference's Python loops: the textbook
PPO-clip (GRPO/DAPO) and verl-style GSPO formulas on whole tensors, per-mode aggregation formulas,
and `spec_terms`, a vectorised restatement of the docs/loss.md (segments from `_cases.segment_labels`,
segment sums by `index_add`) used for the metrics, the adaptive bounds and the random sweeps.

The tests are split by theme: test_reference_equivalences.py, test_reference_gradcheck.py,
test_reference_options.py, test_reference_inputs.py, test_reference_corrections.py and
test_reference_objectives.py. Each runs with one intra-op thread (the `one_thread` fixture of conftest.py).
The last section serves test_peers_*.py: our implementations (the reference and both backends) on the
fp32 inputs a peer takes, and the comparison with the peer's loss and gradients.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from types import SimpleNamespace

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import Batch, segment_labels

import sspo_kernels
from reference import sspo_loss
from sspo_kernels import METRIC_NAMES as METRICS
from sspo_kernels._options import AGG_MODES as AGG_MODES  # re-exported for the test_reference_* files

F64 = torch.float64
EXACT = 1e-12  # two float64 computations of the same formula agree to rounding
ADAPTIVE = dict(eps_low=0.05, eps_high=0.08, entropy_gamma=0.5, k_min=0.5, k_max=2.0)
BASE = dict(eps_low=0.1, eps_high=0.15, entropy_gamma=0.0)


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
# A vectorised restatement of docs/loss.md
# --------------------------------------------------------------------------------------------------


SPEC_DEFAULTS = {
    "k_min": 0.5, "k_max": 2.0, "entropy_ref": "batch", "adapt_low": True, "adapt_high": True,
    "dual_clip": None, "beta": 0.0, "entropy_coef": 0.0, "temperature": 1.0,
    "loss_agg_mode": "token-mean", "normalizer": None, "norm_len": None,
    "log_ratio_clamp": 20.0, "ratio_grad": "exact", "objective": "clip",
    "sapo_tau_pos": 1.0, "sapo_tau_neg": 1.05,
    "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0,
    "policy_weights": None, "rollout_logprobs": None, "rollout_is": "sequence", "rollout_is_mode": "mask",
    "rollout_is_min": None, "rollout_is_max": 3.0, "off_policy_mask": None, "entropy_mask_quantile": None,
    "kl_ratio_weight": False,
}  # fmt: skip
LN_1E8 = math.log(1e-8)


def _segment_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros(size, dtype=F64).index_add(0, index, values)


def _by_sign(cond: torch.Tensor, yes: float, no: float) -> torch.Tensor:
    return torch.full(cond.shape, no, dtype=F64).masked_fill(cond, yes)


def spec_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q quantile with linear interpolation: sorted e_0 <= ... <= e_{n-1}, position q * (n - 1)."""
    e = values.sort().values
    pos = q * (e.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, e.numel() - 1)
    return e[lo] + (pos - lo) * (e[hi] - e[lo])


def spec_corrections(batch: Batch, o: dict, sel, seg, resp, l_in, q_in, a_in, h_in) -> SimpleNamespace:
    """W^pol, W^is (and whether "mask" dropped it), M^off and M^ent of the masked-in tokens, vectorised."""
    n_in = sel.numel()
    pw = o["policy_weights"]
    if pw is None:
        w_pol = torch.ones(n_in, dtype=F64)
    else:
        w_pol = (pw.reshape(-1)[sel] if pw.shape == batch.tokens.shape else pw[resp]).double()
    w_is = torch.ones(n_in, dtype=F64)
    is_masked = torch.zeros(n_in, dtype=torch.bool)
    v = None if o["rollout_logprobs"] is None else o["rollout_logprobs"].reshape(-1)[sel].double()
    if v is not None and o["rollout_is"] is not None:
        delta = torch.where(v.isnan(), torch.zeros_like(v), q_in.detach() - v)
        unit = {"token": torch.arange(n_in), "segment": seg, "sequence": resp}[o["rollout_is"]]
        w = _segment_sum(delta, unit, int(unit.max()) + 1 if n_in else 0).clamp(-20.0, 20.0).exp()[unit]
        lo, hi = o["rollout_is_min"], o["rollout_is_max"]
        if o["rollout_is_mode"] == "truncate":
            w_is = w if lo is None and hi is None else w.clamp(min=lo, max=hi)
        else:
            inside = torch.ones(n_in, dtype=torch.bool)
            if lo is not None:
                inside &= w >= lo
            if hi is not None:
                inside &= w <= hi
            w_is, is_masked = torch.where(inside, w, torch.zeros_like(w)), ~inside
    off = torch.zeros(n_in, dtype=torch.bool)
    if o["off_policy_mask"] is not None:
        x = (q_in if v is None else v) - l_in.detach()
        x = torch.where(x.isnan(), torch.zeros_like(x), x)
        n_b = torch.bincount(resp, minlength=batch.num_responses).clamp(min=1).double()
        drift = _segment_sum(x, resp, batch.num_responses) / n_b
        off = (a_in < 0) & (drift[resp] > o["off_policy_mask"])
    ent = torch.zeros(n_in, dtype=torch.bool)
    if o["entropy_mask_quantile"] is not None and n_in:
        ent = h_in.detach() < spec_quantile(h_in.detach(), 1 - o["entropy_mask_quantile"])
    return SimpleNamespace(w_pol=w_pol, w_is=w_is, is_masked=is_masked, off=off, ent=ent, has_rollout=v is not None)


def spec_policy(o: dict, seg, num_seg, n_s, l_in, q_in, a_in, k, lo, hi, corr) -> SimpleNamespace:
    """The objective's P_t, the ratio R_t (its gradient form), the segment ratio values and the clip flags."""
    c = o["log_ratio_clamp"]
    objective = o["objective"]
    none = torch.zeros(a_in.shape, dtype=torch.bool)
    out = SimpleNamespace(phi=None, dual=none, clip_low=none, clip_high=none)

    def ratio_of(mean, own):
        if o["ratio_grad"] == "token":
            return (mean.detach()[seg] + own - own.detach()).clamp(-c, c).exp()
        return mean.clamp(-c, c).exp()[seg]

    d = _segment_sum(l_in - q_in, seg, num_seg) / n_s
    rho = d.clamp(-c, c).exp()
    out.d, out.rho, out.value = d.detach(), rho.detach(), rho.detach()
    if objective == "gmpo":
        x = l_in - q_in
        low = -o["eps_low"] * (k if o["adapt_low"] else torch.ones_like(k))[seg]
        high = o["eps_high"] * (k if o["adapt_high"] else torch.ones_like(k))[seg]
        sign = torch.sign(a_in)  # min on the side that limits the update, as verl's geo_mean writes it
        clipped = sign * torch.minimum(sign * x, sign * torch.clamp(x, low, high))
        g = _segment_sum(clipped, seg, num_seg) / n_s
        out.ratio = ratio_of(g, clipped)
        out.value = g.detach().clamp(-c, c).exp()
        out.policy = -a_in * out.ratio
        out.clip_low, out.clip_high = (a_in < 0) & (x.detach() < low), (a_in > 0) & (x.detach() > high)
        return out
    ratio = ratio_of(d, l_in)
    out.ratio = ratio
    if objective in ("clip", "cispo"):
        out.clip_low = (a_in < 0) & (rho.detach()[seg] < lo[seg])
        out.clip_high = (a_in > 0) & (rho.detach()[seg] > hi[seg])
    if objective == "clip":
        policy = torch.maximum(-a_in * ratio, -a_in * torch.clamp(ratio, lo[seg], hi[seg]))
        if o["dual_clip"] is not None:
            cap = -a_in * o["dual_clip"]
            out.dual = (a_in < 0) & (policy.detach() > cap)
            policy = torch.where(a_in < 0, torch.minimum(policy, cap), policy)
    elif objective == "cispo":
        policy = -torch.clamp(rho[seg], lo[seg], hi[seg]).detach() * a_in * l_in
    elif objective == "sapo":
        tau = _by_sign(a_in > 0, o["sapo_tau_pos"], o["sapo_tau_neg"])
        policy = -a_in * torch.sigmoid(tau * (ratio - 1)) * 4 / tau
    elif objective == "vespo":
        total = _segment_sum((l_in - q_in).clamp(-20.0, 20.0), seg, num_seg)
        if corr.has_rollout:
            total = total + _segment_sum(corr.w_is.log().clamp(LN_1E8, 20.0), seg, num_seg)
        log_w = total.clamp(LN_1E8, 20.0)[seg]
        pos = a_in >= 0
        k_t = _by_sign(pos, o["vespo_k_pos"], o["vespo_k_neg"])
        lam = _by_sign(pos, o["vespo_lambda_pos"], o["vespo_lambda_neg"])
        out.phi = (lam + k_t * log_w - lam * log_w.exp()).exp().detach()
        policy = -out.phi * a_in * l_in
    else:  # reinforce
        policy = -a_in * l_in
    out.policy = policy
    return out


def spec_terms(batch: Batch, logits: torch.Tensor, opts: dict) -> SimpleNamespace:
    """Loss, per-token terms, segment terms and metrics of docs/loss.md, computed on whole tensors.

    `opts` holds sspo_loss keywords; eps_low, eps_high and entropy_gamma must be given for the objectives with
    bounds (the per-granularity defaults are the reference's business, not the contract's).
    """
    o = {**SPEC_DEFAULTS, "eps_low": 0.0, "eps_high": 0.0, "entropy_gamma": 0.0, **opts}
    logp, entropy = token_logp_entropy(batch, logits, o["temperature"])
    logp, entropy = logp.reshape(-1), entropy.reshape(-1)
    mask = batch.mask.reshape(-1)
    sel = torch.nonzero(mask).squeeze(1)
    labels = segment_labels(batch, o["granularity"])
    seg = labels[sel]
    num_seg = int(labels.max()) + 1 if sel.numel() else 0
    l_in, h_in = logp[sel], entropy[sel]
    q_in = l_in.detach() if batch.old_logprobs is None else batch.old_logprobs.reshape(-1)[sel].double()
    a_in = batch.token_advantages()[sel].double()
    resp = batch.response_ids()[sel]

    n_s = torch.bincount(seg, minlength=num_seg).double()
    h_bar = _segment_sum(h_in.detach(), seg, num_seg) / n_s
    if o["entropy_ref"] == "batch":
        h_ref = float(h_in.detach().mean()) if sel.numel() else 0.0
    else:
        h_ref = float(o["entropy_ref"])
    gamma = o["entropy_gamma"]
    k_raw = (h_bar / h_ref) ** gamma if h_ref != 0 else torch.ones_like(h_bar)
    k = torch.ones_like(h_bar) if gamma == 0 or h_ref == 0 else k_raw.clamp(o["k_min"], o["k_max"])
    lo = 1 - o["eps_low"] * (k if o["adapt_low"] else torch.ones_like(k))
    hi = 1 + o["eps_high"] * (k if o["adapt_high"] else torch.ones_like(k))

    corr = spec_corrections(batch, o, sel, seg, resp, l_in, q_in, a_in, h_in)
    pol = spec_policy(o, seg, num_seg, n_s, l_in, q_in, a_in, k, lo, hi, corr)
    weight = corr.w_pol * (~corr.off).double() * (~corr.ent).double()
    if o["objective"] != "vespo":
        weight = weight * corr.w_is
    loss_in = weight * pol.policy
    if o["beta"] > 0:
        x = batch.ref_logprobs.reshape(-1)[sel].double() - l_in
        kl = x.exp() - x - 1
        loss_in = loss_in + o["beta"] * (pol.ratio * kl if o["kl_ratio_weight"] else kl)
    if o["entropy_coef"] > 0:
        loss_in = loss_in - o["entropy_coef"] * h_in

    per_resp_n = torch.bincount(resp, minlength=batch.num_responses).double()
    resp_sum = _segment_sum(loss_in, resp, batch.num_responses)
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

    n_in = max(sel.numel(), 1)
    none = torch.zeros((), dtype=F64)
    value = pol.value
    frac = lambda flags: flags.sum().double() / n_in
    first = torch.ones(seg.shape, dtype=torch.bool)
    first[1:] = seg[1:] != seg[:-1]  # each segment's first masked-in token (segments are in token order)
    metrics = {
        "clip_frac_low": frac(pol.clip_low),
        "clip_frac_high": frac(pol.clip_high),
        "clip_frac": frac(pol.clip_low) + frac(pol.clip_high),
        "ratio_mean": value.mean() if num_seg else none,
        "ratio_min": value.min() if num_seg else none,
        "ratio_max": value.max() if num_seg else none,
        "entropy_mean": h_in.detach().sum() / n_in,
        "approx_kl": (q_in - l_in.detach()).sum() / n_in,
        "num_segments": torch.tensor(num_seg),
        "mean_segment_len": torch.tensor(sel.numel() / max(num_seg, 1), dtype=F64),
        "is_weight_mean": corr.w_is.sum() / n_in,
        "is_weight_min": corr.w_is.min() if sel.numel() else none,
        "is_weight_max": corr.w_is.max() if sel.numel() else none,
        "is_masked_frac": frac(corr.is_masked),
        "off_policy_masked_frac": frac(corr.off),
        "entropy_masked_frac": frac(corr.ent),
        "dual_clip_frac": frac(pol.dual),
        "cispo_clip_frac": frac(pol.clip_high) if o["objective"] == "cispo" else none,
        "vespo_phi_mean": pol.phi[first].mean() if pol.phi is not None and num_seg else none,
    }
    return SimpleNamespace(
        loss=loss, per_token=per_token, seg=seg, d=pol.d, rho=pol.rho, k=k, k_raw=k_raw, h_ref=h_ref,
        lo=lo, hi=hi, adv=a_in, clip_low=pol.clip_low, clip_high=pol.clip_high, metrics=metrics,
        weight=weight, corr=corr, policy=pol,
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
# Inputs of the off-policy corrections and the objectives
# --------------------------------------------------------------------------------------------------


def rollout_for(batch: Batch, seed: int, scale: float = 0.3, nan_in: int = 0, nan_out: int = 0) -> torch.Tensor:
    """Sampler log-probs v_t shaped like tokens: q_t (the current l_t on-policy) minus N(0, scale^2) noise, NaN at
    `nan_in` masked-in and `nan_out` masked-out positions (chosen at random), garbage elsewhere masked out."""
    gen = torch.Generator().manual_seed(seed)
    base = batch.old_logprobs
    if base is None:
        base, _ = token_logp_entropy(batch, batch.logits.detach())
    v = base - scale * torch.randn(base.shape, generator=gen, dtype=F64)
    v = torch.where(batch.mask, v, 7.0)  # any value is allowed where masked out
    flat = v.reshape(-1)
    for want, where in ((nan_in, batch.mask.reshape(-1)), (nan_out, ~batch.mask.reshape(-1))):
        idx = torch.nonzero(where).squeeze(1)
        assert idx.numel() >= want, "not enough positions for the NaNs asked"
        flat[idx[torch.randperm(idx.numel(), generator=gen)[:want]]] = torch.nan
    return v


def weights_for(batch: Batch, seed: int, per_response: bool = False) -> torch.Tensor:
    """Policy weights in [0, 2), some exactly 0: per token (NaN and negative where masked out, which is allowed) or
    per response (B,)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch.num_responses,) if per_response else batch.tokens.shape
    w = 2 * torch.rand(shape, generator=gen, dtype=F64)
    w = torch.where(torch.rand(shape, generator=gen) < 0.15, 0.0, w)
    if not per_response:
        w = torch.where(batch.mask, w, torch.where(torch.rand(shape, generator=gen) < 0.5, torch.nan, -1.0))
    return w


def with_zero_advantages(batch: Batch, seed: int, share: float = 0.25) -> Batch:
    """The batch with per-token advantages, `share` of them exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    adv = batch.token_advantages().reshape(batch.tokens.shape).clone()
    adv = torch.where(torch.rand(adv.shape, generator=gen) < share, 0.0, adv)
    return replace(batch, advantages=adv)


# --------------------------------------------------------------------------------------------------
# The peers' tests (test_peers_*.py): our implementations on fp32 inputs, and the comparison
# --------------------------------------------------------------------------------------------------

IMPLS = ("reference", "torch", "triton")
PEER_LOSS_RTOL, PEER_GRAD_RTOL = 1e-6, 1e-5  # fp32, the issues' tolerances


def impl_params(cases: list[tuple], triton: set[str]) -> list:
    """pytest params (impl, *case) for cases (id, *values): every case with "reference" and "torch", the ids in
    `triton` with "triton" too (each Triton call runs in the interpreter on the CPU: a few, small)."""
    out = []
    for case_id, *values in cases:
        for impl in IMPLS:
            if impl != "triton" or case_id in triton:
                marks = [pytest.mark.triton] if impl == "triton" else []
                out.append(pytest.param(impl, *values, marks=marks, id=f"{impl}-{case_id}"))
    return out


def peer_batch(seed: int, B: int = 5, T: int = 7, V: int = 11, H: int | None = None, log_ratio_scale: float = 0.3):
    """fp32 inputs in the padded (B, T) layout every peer takes: token ids valid everywhere (the peers score every
    position), responses of varied lengths with a hole, old / reference log-probs around the current ones, the
    sampler's around the old ones. With H, hidden (B, T, H), weight (V, H) and bias (V,) leaves make the logits."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=gen)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[1, 0] = False
    tokens = torch.randint(0, V, (B, T), generator=gen)
    if H is None:
        hidden = weight = bias = None
        logits = (2 * torch.randn(B, T, V, generator=gen)).requires_grad_(True)
    else:
        hidden = torch.randn(B, T, H, generator=gen).requires_grad_(True)
        weight = (torch.randn(V, H, generator=gen) * H**-0.5 * 2).requires_grad_(True)
        bias = (0.3 * torch.randn(V, generator=gen)).requires_grad_(True)
        logits = hidden @ weight.T + bias
    with torch.no_grad():
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    old = logp - log_ratio_scale * torch.randn(B, T, generator=gen)
    return SimpleNamespace(
        B=B, T=T, V=V, mask=mask, tokens=tokens, logits=logits, hidden=hidden, weight=weight, bias=bias,
        old=old, ref=logp + 0.3 * torch.randn(B, T, generator=gen),
        rollout=old - log_ratio_scale * torch.randn(B, T, generator=gen),
        advantages=torch.randn(B, generator=gen),
    )  # fmt: skip


def torch_logp_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 l_t (differentiable) and H_t, computed by torch as a framework would."""
    log_p = torch.log_softmax(logits, -1)
    return log_p.gather(-1, tokens[..., None])[..., 0], -(log_p.exp() * log_p).sum(-1)


@dataclass
class Ours:
    loss: torch.Tensor
    grads: tuple[torch.Tensor, ...]
    metrics: dict[str, torch.Tensor]


def ours_on_logits(impl: str, pb, entry: str = "logprobs", **opts) -> Ours:
    """Our loss on `pb.logits` and d loss / d logits: the float64 reference on the same values, or, with
    backend=impl, `sspo_loss` on the logits (entry "logits") or `sspo_loss_from_logprobs` on torch's fp32 log-probs
    and entropies of them (entry "logprobs")."""
    args = (pb.tokens, pb.old, pb.advantages, pb.mask)
    if impl == "reference":
        x = pb.logits.detach().double().requires_grad_(True)
        out = sspo_loss(x, *args, **opts)
    else:
        x = pb.logits.detach().clone().requires_grad_(True)
        if entry == "logits":
            out = sspo_kernels.sspo_loss(x, *args, backend=impl, **opts)
        else:
            logp, entropy = torch_logp_entropy(x, pb.tokens)
            out = sspo_kernels.sspo_loss_from_logprobs(logp, entropy.detach(), *args, backend=impl, **opts)
    return Ours(out.loss.detach(), torch.autograd.grad(out.loss, x), out.metrics)


def ours_on_hidden(impl: str, pb, **opts) -> Ours:
    """Our loss on the logits hidden @ weight.T + bias and its gradients in (hidden, weight, bias): the float64
    reference through those logits, or `sspo_loss_from_hidden` with backend=impl."""
    args = (pb.tokens, pb.old, pb.advantages, pb.mask)
    if impl == "reference":
        leaves = [t.detach().double().requires_grad_(True) for t in (pb.hidden, pb.weight, pb.bias)]
        out = sspo_loss(leaves[0] @ leaves[1].T + leaves[2], *args, **opts)
    else:
        leaves = [t.detach().clone().requires_grad_(True) for t in (pb.hidden, pb.weight, pb.bias)]
        out = sspo_kernels.sspo_loss_from_hidden(leaves[0], leaves[1], *args, bias=leaves[2], backend=impl, **opts)
    return Ours(out.loss.detach(), torch.autograd.grad(out.loss, leaves), out.metrics)


def assert_peer(name: str, ours: Ours, loss: torch.Tensor, grads, scale: torch.Tensor | float) -> None:
    """Our loss within PEER_LOSS_RTOL of the peer's, relative to `scale` (the peer's loss without cancellation, e.g.
    with |advantages|), and each gradient within PEER_GRAD_RTOL in relative norm. With SSPO_PEER_REPORT set, the
    measured differences are appended to that file (one JSON line per comparison)."""
    scale = float(abs(scale))
    loss_rel = abs(float(ours.loss) - float(loss)) / scale
    grad_rel = [
        float((o.double() - p.double()).norm() / p.double().norm()) for o, p in zip(ours.grads, grads, strict=True)
    ]
    if os.environ.get("SSPO_PEER_REPORT"):
        with open(os.environ["SSPO_PEER_REPORT"], "a") as f:
            f.write(json.dumps({"case": name, "loss_rel": loss_rel, "grad_rel": max(grad_rel)}) + "\n")
    assert loss_rel <= PEER_LOSS_RTOL, f"{name}: loss {float(ours.loss):.9g} vs peer {float(loss):.9g}: {loss_rel:.3g}"
    for i, (o, p) in enumerate(zip(ours.grads, grads)):
        assert_rel_norm(f"{name}: gradient {i}", o, p, tol=PEER_GRAD_RTOL)
