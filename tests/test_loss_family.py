"""The objectives and the off-policy corrections (docs/loss.md "Off-policy corrections", "Objectives") on
every fast path against the float64 reference: both backends (Triton in the interpreter), the three
entry points, every granularity, padded and packed, per-token and per-response advantages and policy
weights, NaN sampler log-probs, weights exactly at the rollout bounds; loss, per-token outputs, every
metric and the gradients. The reference's own tests are tests/test_reference_corrections.py and
tests/test_reference_objectives.py; the peers' equivalences tests/test_peers_*.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import Batch, make_batch, pack
from _family_cases import AGG_MODES, BOUNDED, CORRECTIONS, OBJECTIVES, build_options

import reference
from bench.launches import count_call, make_call
from sspo_kernels import METRIC_NAMES, sspo_loss, sspo_loss_from_hidden, sspo_loss_from_logprobs
from sspo_kernels._utils import POISON_ENV

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["torch", "triton"]


def _float(x):
    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _upstream(loss: torch.Tensor):
    if loss.dim() == 0:
        return 1.7
    return torch.randn(loss.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _assert_outputs(out, ref, tol: float = 1e-5) -> None:
    assert_close("loss", out.loss, ref.loss, atol=tol, rtol=tol)
    assert_close("logprobs", out.logprobs, ref.logprobs, atol=tol)
    assert_close("entropy", out.entropy, ref.entropy, atol=tol)
    assert set(out.metrics) == set(ref.metrics) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert_close(f"metrics[{name}]", out.metrics[name], ref.metrics[name], atol=tol, rtol=tol)


def _reference(batch: Batch, granularity: str, opts: dict):
    args, kwargs = batch.inputs(granularity)
    kwargs.update(opts)
    ref = reference.sspo_loss(*args, **kwargs)
    up = _upstream(ref.loss)
    (ref.loss * up).sum().backward()
    return args, kwargs, ref, up


def _cases():
    """(objective, granularity, correction, layout, per_token_adv, mode): each objective at each of three
    granularities, each correction at least twice per backend, aggregation modes rotating."""
    grans = ["token", "subsentence", "sequence"]
    corrections = itertools.cycle(CORRECTIONS)
    modes = itertools.cycle(AGG_MODES)
    out = []
    for i, (objective, granularity) in enumerate(itertools.product(OBJECTIVES, grans)):
        out.append(
            (objective, granularity, next(corrections), "packed" if i % 2 else "padded", i % 3 == 0, next(modes))
        )
    out += [("clip", "segments", "everything", "padded", True, "token-mean"), ("gmpo", "sentence", "everything",
            "packed", False, "none")]  # fmt: skip
    return out


CASES = _cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "objective,granularity,correction,layout,per_token_adv,mode", CASES, ids=["-".join(map(str, c)) for c in CASES]
)
def test_sspo_loss_matches_reference(backend, objective, granularity, correction, layout, per_token_adv, mode):
    seed = CASES.index((objective, granularity, correction, layout, per_token_adv, mode))
    batch = make_batch(seed, [6, 0, 9, 1, 5], seq_len=9, vocab=31, hole_p=0.2, per_token_adv=per_token_adv)
    batch = pack(batch) if layout == "packed" else batch
    opts = build_options(batch, objective, correction, seed)
    opts.update(loss_agg_mode=mode, norm_len=9)
    if opts.get("dual_clip") is None and objective == "clip" and seed % 3 == 1:
        opts["dual_clip"] = 2.0
    if objective in BOUNDED and seed % 4 == 2:
        opts["ratio_grad"] = "token"
    args, kwargs, ref, up = _reference(batch, granularity, opts)
    logits = batch.logits.detach().float().requires_grad_(True)
    out = sspo_loss(logits, *map(_float, args[1:]), backend=backend, **{k: _float(v) for k, v in kwargs.items()})
    (out.loss * (up.float() if isinstance(up, torch.Tensor) else up)).sum().backward()
    _assert_outputs(out, ref)
    assert_rel_norm("dlogits", logits.grad, args[0].grad, tol=1e-5)


FROM_CASES = [
    ("cispo", "subsentence", "rollout-sequence-mask"),
    ("sapo", "token", "policy-response"),
    ("gmpo", "sequence", "off-policy-rollout"),
    ("vespo", "subsentence", "rollout-token-mask"),
    ("reinforce", "segments", "entropy-mask"),
    ("clip", "subsentence", "everything"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective,granularity,correction", FROM_CASES)
def test_from_logprobs_matches_reference(backend, objective, granularity, correction):
    seed = 40 + FROM_CASES.index((objective, granularity, correction))
    batch = pack(make_batch(seed, [7, 3, 0, 8], vocab=29, hole_p=0.15))
    opts = build_options(batch, objective, correction, seed)
    args, kwargs, ref, up = _reference(batch, granularity, opts)
    logits = batch.logits.detach().float().requires_grad_(True)
    log_p = torch.log_softmax(logits, -1)
    logp = log_p.gather(-1, batch.tokens.clamp(min=0)[:, None])[:, 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    out = sspo_loss_from_logprobs(
        logp, entropy, *map(_float, args[1:]), backend=backend, **{k: _float(v) for k, v in kwargs.items()}
    )
    (out.loss * up).backward()
    _assert_outputs(out, ref)
    assert_rel_norm("dlogits through the log-probs", logits.grad, args[0].grad, tol=1e-5)


@pytest.mark.parametrize("objective,granularity,correction", FROM_CASES)
@pytest.mark.parametrize("single_pass", [None, False])
def test_from_hidden_matches_reference(objective, granularity, correction, single_pass):
    seed = 60 + FROM_CASES.index((objective, granularity, correction))
    batch = make_batch(seed, [7, 3, 0, 8], seq_len=8, vocab=29, hole_p=0.15)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*batch.tokens.shape, 10, generator=gen, dtype=torch.float64)
    weight = torch.randn(29, 10, generator=gen, dtype=torch.float64) * 0.5
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    batch.logits = (hidden @ weight.T).requires_grad_(True)
    opts = build_options(batch, objective, correction, seed)
    if "entropy_mask_quantile" not in opts and opts.get("entropy_gamma"):
        opts["entropy_ref"] = 1.7  # a fixed reference keeps the single-pass schedule possible
    args, kwargs = batch.inputs(granularity)
    kwargs.update(opts)
    ref = reference.sspo_loss(leaves[0] @ leaves[1].T, *args[1:], **kwargs)
    (ref.loss * 1.7).backward()
    h, w = (t.float().requires_grad_(True) for t in (hidden, weight))
    out = sspo_loss_from_hidden(
        h, w, *map(_float, args[1:]), chunk_size=16, single_pass=single_pass,
        **{k: _float(v) for k, v in kwargs.items()},
    )  # fmt: skip
    (out.loss * 1.7).backward()
    _assert_outputs(out, ref)
    assert_rel_norm("dhidden", h.grad, leaves[0].grad, tol=1e-5)
    assert_rel_norm("dweight", w.grad, leaves[1].grad, tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_policy_weights_at_masked_in_tokens(backend):
    batch = make_batch(70, [5, 4], vocab=13)
    args, kwargs = batch.inputs("token")
    weights = torch.ones(batch.tokens.shape)
    inside = batch.mask.nonzero()[0].tolist()
    for bad in (-0.5, float("nan"), float("inf")):
        w = weights.clone()
        w[tuple(inside)] = bad
        with pytest.raises(ValueError, match="policy_weights"):
            sspo_loss(batch.logits.detach().float(), *args[1:], backend=backend, policy_weights=w, **kwargs)
    w = weights.clone()
    w[~batch.mask] = float("nan")  # anything is allowed where masked out
    out = sspo_loss(batch.logits.detach().float(), *args[1:], backend=backend, policy_weights=w, **kwargs)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.triton
def test_launch_budget_with_every_option(monkeypatch, objective):
    """Every correction and the objective in the fused step: the budget of the default options holds
    (forward <= 12 device ops and launches, backward <= 3)."""
    monkeypatch.delenv(POISON_ENV, raising=False)
    args, kwargs = make_call(packed=False, device="cpu")
    tokens = args[1]
    gen = torch.Generator().manual_seed(0)
    kw = dict(
        kwargs, objective=objective, policy_weights=torch.rand(tokens.shape, generator=gen),
        rollout_logprobs=args[2] + 0.1 * torch.randn(tokens.shape, generator=gen),
        rollout_is="token" if objective == "vespo" else "sequence", off_policy_mask=0.01, entropy_mask_quantile=0.5,
        beta=0.1, kl_ratio_weight=True, entropy_coef=0.01,
    )  # fmt: skip
    fwd, bwd = count_call(sspo_loss, *args, granularity="subsentence", backend="triton", **kw)
    assert fwd.launches == {"logprob_entropy_fwd_kernel": 1, "segment_step_fwd_kernel": 1}, fwd.launches
    assert fwd.total <= 12, f"forward: {fwd.total}: {fwd.ops}"
    assert bwd.total <= 3, f"backward: {bwd.total}: {bwd.ops}"


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("granularity", ["token", "sequence", "subsentence", "sentence", "segments"])
def test_every_objective_granularity_and_aggregation_torch(objective, granularity):
    """The full product on the torch backend (the Triton backend runs the rotation above): every
    aggregation mode, padded and packed, per-token advantages, A = 0 tokens, ratios far outside."""
    seed = (
        100
        + OBJECTIVES.index(objective) * 5
        + ["token", "sequence", "subsentence", "sentence", "segments"].index(granularity)
    )
    for i, mode in enumerate(AGG_MODES):
        batch = make_batch(seed + 17 * i, [6, 0, 8, 1], seq_len=8, vocab=23, hole_p=0.2, per_token_adv=i % 2 == 1,
                           log_ratio_scale=1.5 if i % 3 == 0 else 0.3)  # fmt: skip
        batch.advantages[..., 0] = 0.0  # some A = 0 tokens (or responses)
        batch = pack(batch) if i % 2 else batch
        opts = build_options(batch, objective, "none", seed + i)
        opts.update(loss_agg_mode=mode, norm_len=8)
        args, kwargs, ref, up = _reference(batch, granularity, opts)
        logits = batch.logits.detach().float().requires_grad_(True)
        out = sspo_loss(logits, *map(_float, args[1:]), backend="torch", **{k: _float(v) for k, v in kwargs.items()})
        (out.loss * (up.float() if isinstance(up, torch.Tensor) else up)).sum().backward()
        _assert_outputs(out, ref)
        assert_rel_norm(f"dlogits ({mode})", logits.grad, args[0].grad, tol=1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph_with_every_correction():
    """No host sync and no data-dependent shape in the corrections and objectives either: the torch
    backend's loss with all of them on traces into one graph and matches eager (~30 s of compile)."""
    batch = pack(make_batch(80, [6, 9, 4], vocab=29, hole_p=0.2))
    opts = build_options(batch, "gmpo", "everything", 80)
    args, kwargs = batch.inputs("subsentence")
    kwargs.update(opts)
    rest = [_float(a) for a in args[1:]]
    kw = {k: _float(v) for k, v in kwargs.items()}

    def loss_and_metrics(logits, *tensors):
        out = sspo_loss(logits, *tensors, backend="torch", **kw)
        return out.loss, out.metrics["is_weight_mean"], out.metrics["entropy_masked_frac"]

    eager_logits = batch.logits.detach().float().requires_grad_(True)
    compiled_logits = eager_logits.detach().clone().requires_grad_(True)
    eager = loss_and_metrics(eager_logits, *rest)
    eager[0].backward()
    compiled = torch.compile(loss_and_metrics, fullgraph=True)(compiled_logits, *rest)
    compiled[0].backward()
    for name, c, e in zip(("loss", "is_weight_mean", "entropy_masked_frac"), compiled, eager):
        assert_close(name, c, e, atol=1e-6)
    assert_rel_norm("dlogits", compiled_logits.grad, eager_logits.grad, tol=1e-6)
