"""Shared helpers of the tests of the float64 reference (`reference.sspo_loss`) against docs/loss.md.

Every expected value in those tests is written independently of the reference's Python loops: the textbook
PPO-clip (GRPO/DAPO) and verl-style GSPO formulas on whole tensors, per-mode aggregation formulas,
and `spec_terms`, a vectorised restatement of the docs/loss.md (segments from `_cases.segment_labels`,
segment sums by `index_add`) used for the metrics, the adaptive bounds and the random sweeps.

The tests are split by theme: test_reference_equivalences.py, test_reference_gradcheck.py,
test_reference_options.py and test_reference_inputs.py. Each runs with one intra-op thread
(the `one_thread` fixture of conftest.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from _assert import assert_close, assert_rel_norm
from _cases import Batch, segment_labels

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


def spec_terms(batch: Batch, logits: torch.Tensor, opts: dict) -> SimpleNamespace:
    """Loss, per-token terms, segment terms and metrics of docs/loss.md, computed on whole tensors.

    `opts` holds sspo_loss keywords; eps_low, eps_high and entropy_gamma must be given (the
    per-granularity defaults are the reference's business, not the contract's).
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
