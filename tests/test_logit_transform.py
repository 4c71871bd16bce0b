"""The logits' transform before the temperature (docs/loss.md "Token quantities"): `logit_scale` and the
`logit_softcap` s * tanh(. / s), as TRL's fused head applies them (Gemma-2-style soft-capping, Granite /
Falcon-H1 / MiniCPM3 scales). Each vocabulary pass, the loss's three entry points and the public
log-prob op against the float64 reference: values and gradients, both backends, every dtype, -inf
logits (a soft-cap makes them finite), in place and not."""

from __future__ import annotations

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import make_batch, pack

import reference
from sspo_kernels import (
    sspo_loss,
    sspo_loss_from_hidden,
    sspo_loss_from_logprobs,
    token_logprobs,
    token_logprobs_from_hidden,
)
from sspo_kernels.ops.vocab import torch as vocab_torch
from sspo_kernels.ops.vocab import triton as vocab_triton

pytestmark = pytest.mark.usefixtures("one_thread")

TRANSFORMS = {"scale": (0.7, None), "softcap": (1.0, 6.0), "scale-softcap": (-1.3, 4.0)}
PASSES = {"torch": vocab_torch, "triton": pytest.param(vocab_triton, marks=pytest.mark.triton)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("vocab", PASSES.values(), ids=PASSES.keys())
@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("entropy_grad", [True, False], ids=["dlogp-dH", "dlogp"])
def test_vocabulary_pass(vocab, transform, dtype, entropy_grad):
    scale, cap = transform
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(7, 1003, generator=gen) * 6).to(dtype)
    x[0, 11] = float("-inf")  # a -inf logit: probability 0, or -s after a soft-cap
    x[4] = float("nan")  # a masked-out row of garbage
    tokens = torch.randint(0, 1003, (7,), generator=gen)
    mask = torch.ones(7, dtype=torch.bool)
    mask[4] = False
    tau = 0.8
    logp, entropy, lse, *rows = vocab.logprob_entropy_fwd(x, tokens, mask, tau, scale=scale, softcap=cap)
    leaf = x.double().requires_grad_(True)
    want_logp, want_entropy = reference.naive_logprob_entropy(leaf, tokens, tau, scale, cap)
    want_logp, want_entropy = torch.where(mask, want_logp, 0.0), torch.where(mask, want_entropy, 0.0)
    assert_close("logprobs", logp, want_logp, atol=1e-5, rtol=1e-5)
    assert_close("entropy", entropy, want_entropy, atol=1e-5, rtol=1e-5)
    g = torch.randn(7, generator=gen)
    e = torch.randn(7, generator=gen) if entropy_grad else None
    ((want_logp * g.double()).sum() + (0 if e is None else (want_entropy * e.double()).sum())).backward()
    want = leaf.grad.nan_to_num()
    for inplace in (False, True):
        buffer = x.clone()
        grad = vocab.logprob_entropy_bwd(
            buffer, tokens, mask, lse, entropy, g, e, tau, scale=scale, softcap=cap, inplace=inplace, logp=logp,
            rows=rows[0] if rows else None,
        )  # fmt: skip
        assert torch.isfinite(grad).all()
        if dtype == torch.float32:
            assert_rel_norm("dlogits", grad, want, tol=1e-5)
        else:  # the bf16 output rounds each entry once
            assert_close("dlogits", grad, want, rtol=2 * torch.finfo(dtype).eps, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("granularity", ["token", "subsentence"])
def test_sspo_loss_with_a_transform(backend, granularity):
    batch = make_batch(3, [7, 0, 9, 4], seq_len=9, vocab=41, hole_p=0.2, logit_scale=4.0)
    batch = pack(batch) if granularity == "token" else batch
    args, kwargs = batch.inputs(granularity)
    kwargs.update(logit_scale=1.4, logit_softcap=5.0, temperature=0.9, eps_low=0.2, eps_high=0.25, entropy_coef=0.01)
    ref = reference.sspo_loss(*args, **kwargs)
    ref.loss.backward()
    logits = batch.logits.detach().float().requires_grad_(True)
    out = sspo_loss(logits, *args[1:], backend=backend, **kwargs)
    out.loss.backward()
    assert_close("loss", out.loss, ref.loss, atol=1e-5)
    assert_close("logprobs", out.logprobs, ref.logprobs, atol=1e-5)
    assert_close("entropy", out.entropy, ref.entropy, atol=1e-5)
    assert_rel_norm("dlogits", logits.grad, args[0].grad, tol=1e-5)


@pytest.mark.parametrize("single_pass", [True, False])
def test_sspo_loss_from_hidden_with_a_transform(single_pass):
    batch = make_batch(4, [6, 3, 8], seq_len=8, vocab=37, hole_p=0.1)
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(*batch.tokens.shape, 12, generator=gen, dtype=torch.float64)
    weight = torch.randn(37, 12, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    args, kwargs = batch.inputs("token")
    kwargs.update(logit_scale=0.8, logit_softcap=3.0)
    ref = reference.sspo_loss(leaves[0] @ leaves[1].T, *args[1:], **kwargs)
    ref.loss.backward()
    h, w = (t.float().requires_grad_(True) for t in (hidden, weight))
    out = sspo_loss_from_hidden(h, w, *args[1:], chunk_size=10, single_pass=single_pass, **kwargs)
    out.loss.backward()
    assert_close("loss", out.loss, ref.loss, atol=1e-5)
    assert_rel_norm("dhidden", h.grad, leaves[0].grad, tol=1e-5)
    assert_rel_norm("dweight", w.grad, leaves[1].grad, tol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_logprobs_with_a_transform(backend):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 5, 16, generator=gen)
    weight = torch.randn(53, 16, generator=gen)
    tokens = torch.randint(0, 53, (3, 5), generator=gen)
    tokens[1, 2] = -100
    transform = dict(logit_scale=1.5, logit_softcap=7.0, temperature=0.7)
    keep = tokens != -100
    leaves = [t.double().requires_grad_(True) for t in (hidden, weight)]
    want_logp, want_entropy = reference.naive_logprob_entropy(leaves[0] @ leaves[1].T, tokens, 0.7, 1.5, 7.0)
    want_logp, want_entropy = torch.where(keep, want_logp, 0.0), torch.where(keep, want_entropy, 0.0)
    (want_logp.sum() + 0.3 * want_entropy.sum()).backward()
    h, w = (t.clone().requires_grad_(True) for t in (hidden, weight))
    logp, entropy = token_logprobs_from_hidden(h, w, tokens, backend=backend, chunk_size=4, **transform)
    (logp.sum() + 0.3 * entropy.sum()).backward()
    assert_close("logprobs", logp, want_logp, atol=1e-5)
    assert_close("entropy", entropy, want_entropy, atol=1e-5)
    assert_rel_norm("dhidden", h.grad, leaves[0].grad, tol=1e-5)
    assert_rel_norm("dweight", w.grad, leaves[1].grad, tol=1e-5)
    logits = (hidden @ weight.T).requires_grad_(True)
    logp2, _ = token_logprobs(logits, tokens, backend=backend, **transform)
    assert_close("logprobs from logits", logp2, want_logp, atol=1e-5)


def test_bad_transforms_are_errors():
    batch = make_batch(6, [4, 5], vocab=13)
    args, kwargs = batch.inputs("token")
    logits = batch.logits.detach().float()
    for bad, error in ((dict(logit_softcap=0.0), ValueError), (dict(logit_softcap=-1.0), ValueError),
                       (dict(logit_scale=float("inf")), ValueError), (dict(logit_scale="2"), TypeError)):  # fmt: skip
        with pytest.raises(error, match="logit_"):
            sspo_loss(logits, *args[1:], **kwargs, **bad)
        with pytest.raises(error, match="logit_"):
            token_logprobs(logits, args[1].clamp(min=0), **bad)
    with pytest.raises(ValueError, match="logit_scale and logit_softcap"):
        sspo_loss_from_logprobs(torch.zeros(batch.tokens.shape), None, *args[1:], **kwargs, logit_softcap=5.0)
    with pytest.raises(ValueError, match="logit_scale / logit_softcap with tp_group"):
        sspo_loss(logits, *args[1:], **kwargs, logit_softcap=5.0, tp_group=object())
