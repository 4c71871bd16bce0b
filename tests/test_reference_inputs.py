"""The float64 reference against docs/loss.md: degenerate inputs, bad inputs and the outputs.

Helpers shared with the other test_reference_*.py files live in `_reference_helpers`.
"""

from __future__ import annotations

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import IGNORE, Batch, make_batch, pack
from _reference_helpers import (
    ADAPTIVE,
    AGG_MODES,
    EXACT,
    F64,
    METRICS,
    assert_matches_spec,
    grad_of,
    run,
    token_logp_entropy,
)

from reference import sspo_loss

# --------------------------------------------------------------------------------------------------
# Degenerate inputs
# --------------------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


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
