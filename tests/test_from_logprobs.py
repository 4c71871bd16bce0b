"""`sspo_loss_from_logprobs` (the segment step on log-probs a framework computed) and on-policy calls
(`old_logprobs=None`) of every entry point, against the float64 reference; on the CPU, and a subset on
CUDA (marked gpu: both layouts, every granularity and aggregation mode, both backends)."""

from __future__ import annotations

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import make_batch, pack
from _devices import BACKENDS, TRITON, grid, on, on_dict

import reference
from sspo_kernels import METRIC_NAMES, SSPOLossFromLogprobs, sspo_loss, sspo_loss_from_hidden, sspo_loss_from_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

GRANULARITIES = ["token", "sequence", "subsentence", "segments"]
AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "none"]
CLIP = dict(eps_low=0.1, eps_high=0.15, entropy_gamma=1.0)


def _upstream(loss: torch.Tensor) -> torch.Tensor:
    if loss.dim() == 0:
        return torch.tensor(1.7, dtype=loss.dtype, device=loss.device)
    gen = torch.Generator().manual_seed(5)
    return torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.device, loss.dtype)


def _token_stats(logits: torch.Tensor, tokens: torch.Tensor):
    """Per-token log-probs (differentiable) and detached entropies of logits, as a framework would."""
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, tokens.clamp(min=0)[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy.detach()


def _compare_outputs(out, ref, *, tol: float = 1e-5) -> None:
    assert_close("loss", out.loss, ref.loss, atol=tol)
    assert_close("logprobs", out.logprobs, ref.logprobs, atol=tol)
    assert_close("entropy", out.entropy, ref.entropy, atol=tol)
    for name in METRIC_NAMES:
        assert_close(f"metrics[{name}]", out.metrics[name], ref.metrics[name], atol=tol)


# Triton's fused step compiles once per (granularity, mode, layout) on CUDA: padded once; packed, each
# granularity with one scalar mode (every mode once) and with the composed step (mode "none").
TRITON_CUDA = {("padded", "subsentence", "token-mean"), ("packed", "token", "seq-mean-token-sum-norm"),
               ("packed", "sequence", "seq-mean-token-mean"), ("packed", "segments", "token-mean"),
               ("packed", "subsentence", "seq-mean-token-mean")}  # fmt: skip


def _on_cuda(p) -> bool:
    """torch (no compile): packed, every granularity at token-mean and every mode at subsentence."""
    if p.backend == "torch":
        return p.layout == "packed" and (p.granularity == "subsentence" or p.mode == "token-mean")
    return (p.layout, p.granularity, p.mode) in TRITON_CUDA or (p.layout == "packed" and p.mode == "none")


@grid(
    ("backend", BACKENDS), ("layout", ["padded", "packed"]), ("granularity", GRANULARITIES), ("mode", AGG_MODES),
    cuda=_on_cuda,
)  # fmt: skip
def test_matches_reference(device, backend, layout, granularity, mode):
    """Loss, outputs, metrics and the gradient reaching the logits through the caller's log-probs."""
    batch = make_batch(11, [6, 0, 4, 1, 7], vocab=23, hole_p=0.2)
    batch = pack(batch) if layout == "packed" else batch
    args, kwargs = batch.inputs(granularity)
    kwargs.update(loss_agg_mode=mode, norm_len=7, **CLIP)
    ref = reference.sspo_loss(*args, **kwargs)
    (ref.loss * _upstream(ref.loss)).sum().backward()

    logits = batch.fresh_logits()
    _, tokens, old, adv, mask = on(device, *args)
    logp, entropy = _token_stats(logits.float().to(device), tokens)
    kwargs = on_dict(device, kwargs)
    out = sspo_loss_from_logprobs(logp, entropy, tokens, old.float(), adv.float(), mask, backend=backend, **kwargs)
    (out.loss * _upstream(out.loss).float()).sum().backward()
    _compare_outputs(out, ref)
    assert_rel_norm("dlogits", logits.grad, batch.logits.grad, tol=1e-5)


@grid(("dtype", {"fp32": torch.float32, "bf16": torch.bfloat16}))
def test_gradient_in_the_logprobs_dtype_and_entropy_bonus(device, dtype):
    """The gradient comes back in the log-probs' dtype; with the entropy bonus, a differentiable
    entropy receives -coef * w_t. (The default backend: torch on the CPU, Triton on CUDA.)"""
    batch = make_batch(4, [5, 3], vocab=11)
    logp = batch.old_logprobs.to(device, dtype).clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    entropy = torch.rand(logp.shape, dtype=dtype, generator=gen).to(device).requires_grad_(True)
    out = sspo_loss_from_logprobs(
        logp, entropy, *on(device, batch.tokens, batch.old_logprobs.float(), batch.advantages.float(), batch.mask),
        granularity="token", entropy_coef=0.1,
    )  # fmt: skip
    out.loss.backward()
    assert logp.grad.dtype == dtype and entropy.grad.dtype == dtype
    count = batch.mask.sum()
    rtol = 2**-8 if dtype == torch.bfloat16 else 1e-6  # one rounding to the dtype
    assert_close("dentropy", entropy.grad.float(), torch.where(batch.mask, -0.1 / count, 0.0), rtol=rtol)


def test_module_form():
    batch = make_batch(2, [4, 6], vocab=13)
    logp, entropy = _token_stats(batch.logits.detach(), batch.tokens)
    module = SSPOLossFromLogprobs("subsentence", boundary=batch.boundary, **CLIP)
    a = module(logp, entropy, batch.tokens, batch.old_logprobs, batch.advantages, batch.mask)
    b = sspo_loss_from_logprobs(
        logp, entropy, batch.tokens, batch.old_logprobs, batch.advantages, batch.mask, boundary=batch.boundary,
        **CLIP,
    )  # fmt: skip
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(temperature=0.7), ValueError, "^temperature"),
        (dict(entropy=None), ValueError, "^entropy"),
        (dict(logprobs=torch.zeros(2, 6, dtype=torch.int64)), TypeError, "^logprobs"),
        (dict(entropy=torch.zeros(2, 5)), ValueError, "^entropy"),
        (dict(tokens=torch.full((2, 6), 13)), ValueError, "^tokens"),
    ],
    ids=["temperature", "entropy-missing-with-adaptation", "logprobs-int", "entropy-shape", "tokens-past-boundary"],
)
def test_bad_input(change, error, pattern):
    batch = make_batch(2, [6, 6], vocab=13)
    call = dict(
        logprobs=batch.old_logprobs, entropy=torch.ones(2, 6), tokens=batch.tokens, old_logprobs=batch.old_logprobs,
        advantages=batch.advantages, mask=batch.mask, boundary=batch.boundary, granularity="subsentence",
    )  # fmt: skip
    call.update(change)
    names = ("logprobs", "entropy", "tokens", "old_logprobs", "advantages", "mask")
    with pytest.raises(error, match=pattern):
        sspo_loss_from_logprobs(*[call.pop(n) for n in names], **call)


# ---------------------------------------------------------------- on-policy: old_logprobs=None


ENTRIES = [
    "logits-torch",
    pytest.param("logits-triton", marks=TRITON),
    "hidden-single-pass",
    "hidden-two-phase",
    "logprobs",
]


@grid(
    ("entry", ENTRIES),
    ("granularity", ["token", "sequence", "subsentence"]),
    cuda=lambda p: p.granularity == "subsentence",
)
def test_on_policy_is_old_logprobs_equal_to_the_current_ones(device, entry, granularity):
    """old_logprobs=None: ratio 1 in value, the gradient A * dl (through the segment ratio); the
    entries without a backend take the default one (torch on the CPU, Triton on CUDA)."""
    batch = pack(make_batch(8, [5, 3, 6], vocab=17, hole_p=0.2))
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(batch.tokens.shape[0], 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(17, 6, generator=gen, dtype=torch.float64)
    kw = dict(granularity=granularity, boundary=batch.boundary, cu_seqlens=batch.cu_seqlens, entropy_ref=1.0, **CLIP)
    z_ref = (hidden @ weight.T).requires_grad_(True)
    ref = reference.sspo_loss(z_ref, batch.tokens, None, batch.advantages, batch.mask, **kw)
    ref.loss.backward()
    assert_close("ratio_mean", ref.metrics["ratio_mean"], torch.tensor(1.0), atol=1e-12)

    # the side tables (boundary, cu_seqlens) stay on the CPU: single-pass plans its chunks from cu_seqlens
    h = hidden.float().to(device).requires_grad_(True)
    w = weight.float().to(device)
    z = (h @ w.T).detach().requires_grad_(True)
    adv, tokens, mask = on(device, batch.advantages.float(), batch.tokens, batch.mask)
    if entry.startswith("logits"):
        out = sspo_loss(z, tokens, None, adv, mask, backend=entry.split("-")[1], **kw)
        out.loss.backward()
        grad, grad_ref = z.grad, z_ref.grad
    elif entry.startswith("hidden"):
        single = entry == "hidden-single-pass"
        out = sspo_loss_from_hidden(h, w, tokens, None, adv, mask, single_pass=single, chunk_size=6, **kw)
        out.loss.backward()
        grad, grad_ref = h.grad, z_ref.grad @ weight
    else:
        logp, entropy = _token_stats(z, tokens)
        out = sspo_loss_from_logprobs(logp, entropy, tokens, None, adv, mask, **kw)
        out.loss.backward()
        grad, grad_ref = z.grad, z_ref.grad
    _compare_outputs(out, ref)
    assert_rel_norm("grad", grad, grad_ref, tol=1e-5)
