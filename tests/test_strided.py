"""Strided views of every input give exactly the results of their contiguous copies (issue: the fused
segment step once indexed per-token inputs as contiguous and computed a wrong loss from a strided view).

Each per-token and side tensor is handed in as a view of another layout (every other element of a
wider buffer, a slice of a longer row, a transposed copy, an expanded per-response value), on both
backends and the three entry points, padded and packed. The contiguous call is itself checked
against the float64 reference elsewhere (tests/test_loss.py), so bitwise equality with it is the
whole requirement here.
"""

from __future__ import annotations

import pytest
import torch
from _assert import assert_close
from _cases import Batch, make_batch, pack

import reference
from sspo_kernels import METRIC_NAMES, sspo_loss, sspo_loss_from_hidden, sspo_loss_from_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["torch", "triton"]
LAYOUTS = ["stride2", "offset-stride3", "sliced", "transposed"]
CLIP = dict(eps_low=0.1, eps_high=0.15, entropy_gamma=1.0, beta=0.05)


def strided(x: torch.Tensor, how: str) -> torch.Tensor:
    """A view holding x's values in another memory layout (never contiguous unless x is a scalar)."""
    if how == "stride2":  # every other element of a (..., 2) buffer
        return torch.stack([x, torch.zeros_like(x)], -1)[..., 0]
    if how == "offset-stride3":  # every third element, starting one in
        buf = torch.zeros(x.numel() * 3 + 1, dtype=x.dtype)
        buf[1::3] = x.reshape(-1)
        return buf[1::3].view(x.shape) if x.dim() == 1 else buf[1::3].as_strided(x.shape, (x.shape[1] * 3, 3), 1)
    if how == "sliced":  # the last columns of a longer row, or a tail of a longer vector
        pad = torch.zeros(*x.shape[:-1], 3, dtype=x.dtype)
        return torch.cat([pad, x], -1)[..., 3:]
    if how == "transposed":  # a (T, B) tensor's transpose; vectors fall back to stride 2
        return x.t().contiguous().t() if x.dim() == 2 else strided(x, "stride2")
    raise ValueError(how)


def _assert_same(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    assert a.shape == b.shape, name
    assert torch.equal(a, b) or (torch.isnan(a).any() and torch.equal(a.nan_to_num(), b.nan_to_num())), (
        f"{name}: a strided input changed the result (max diff {(a.double() - b.double()).abs().max().item():.3g})"
    )


def _assert_outputs_same(out, want) -> None:
    _assert_same(out.loss, want.loss, "loss")
    _assert_same(out.logprobs, want.logprobs, "logprobs")
    _assert_same(out.entropy, want.entropy, "entropy")
    for name in METRIC_NAMES:
        _assert_same(out.metrics[name], want.metrics[name], f"metrics[{name}]")


def _views(batch: Batch, granularity: str, how: str, per_token_adv: bool) -> tuple[tuple, dict]:
    """sspo_loss's arguments with every tensor but the logits replaced by a strided view."""
    args, kwargs = batch.inputs(granularity)
    _, tokens, old, adv, mask = args
    gen = torch.Generator().manual_seed(len(how))
    kwargs["policy_weights"] = torch.rand(tokens.shape, generator=gen)  # the correction inputs too
    kwargs["rollout_logprobs"] = old.float() + 0.1 * torch.randn(tokens.shape, generator=gen)
    kwargs["rollout_is"] = "segment" if granularity != "token" else "token"
    adv = adv.float()
    if per_token_adv and adv.dim() == 1 and batch.cu_seqlens is None:
        adv = adv[:, None].expand(tokens.shape)  # per-response values broadcast: stride 0 per token
    elif adv.shape == tokens.shape or adv.dim() == 1:
        adv = strided(adv, how)
    views = (strided(tokens, how), strided(old.float(), how), adv, strided(mask, how))
    kw = {k: strided(v, how) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    for v in (*views, *(v for v in kw.values() if isinstance(v, torch.Tensor))):
        assert v.numel() <= 1 or not v.is_contiguous() or v.storage_offset() > 0
    return views, kw


def _contiguous(views: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return tuple(v.contiguous() for v in views), {
        k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
    }


# Every layout on the packed batch (its vectors take the offset and slice views as they are); stride 2
# and transposes on the other cases (a slice of a longer (B, T) row is copied by the flattening anyway).
LOSS_CASES = [
    *(("subsentence", True, False, how) for how in LAYOUTS),
    *((g, False, adv, how) for g, adv in (("token", False), ("subsentence", True), ("segments", False))
      for how in ("stride2", "transposed")),
]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity,packed,per_token_adv,how", LOSS_CASES)
def test_sspo_loss(backend, granularity, packed, per_token_adv, how):
    batch = make_batch(3, [7, 0, 9, 1], seq_len=10, vocab=37, hole_p=0.2, per_token_adv=per_token_adv and packed)
    batch = pack(batch) if packed else batch
    views, kwargs = _views(batch, granularity, how, per_token_adv)
    results = []
    for tensors, kw in ((views, kwargs), _contiguous(views, kwargs)):
        logits = batch.logits.detach().float().requires_grad_(True)
        out = sspo_loss(logits, *tensors, backend=backend, **kw, **CLIP)
        out.loss.backward()
        results.append((out, logits.grad))
    (out, grad), (want, want_grad) = results
    _assert_outputs_same(out, want)
    _assert_same(grad, want_grad, "dlogits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sspo_loss_strided_logits_and_reference(backend):
    """Logits as a transposed (T, B, V) buffer and as columns of a wider one, against the reference."""
    batch = make_batch(4, [6, 3, 8], seq_len=8, vocab=29, hole_p=0.1)
    args, kwargs = batch.inputs("subsentence")
    ref = reference.sspo_loss(*args, **kwargs, **CLIP)
    ref_grad = torch.autograd.grad(ref.loss, args[0])[0]
    base = batch.logits.detach().float()
    for view in (base.transpose(0, 1).contiguous().transpose(0, 1), torch.cat([base, base[..., :5]], -1)[..., :29]):
        assert not view.is_contiguous()
        logits = view.detach().requires_grad_(True)
        out = sspo_loss(logits, *[a.float() if a.is_floating_point() else a for a in args[1:]],
                        backend=backend, **kwargs, **CLIP)  # fmt: skip
        out.loss.backward()
        assert_close("loss", out.loss, ref.loss, atol=1e-5)
        assert_close("dlogits", logits.grad, ref_grad, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["offset-stride3", "transposed"])
@pytest.mark.parametrize("packed", [False, True])
def test_sspo_loss_from_logprobs(backend, how, packed):
    batch = make_batch(5, [6, 0, 4, 9], seq_len=9, vocab=23, hole_p=0.2)
    batch = pack(batch) if packed else batch
    views, kwargs = _views(batch, "subsentence", how, False)
    logp_all = torch.log_softmax(batch.logits.detach().float(), -1)
    logp = logp_all.gather(-1, batch.tokens.clamp(min=0)[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    results = []
    for (tensors, kw), lp_view in (((views, kwargs), strided(logp, how)), (_contiguous(views, kwargs), logp)):
        lp = lp_view.detach().requires_grad_(True)
        ent = strided(entropy, how) if lp_view is not logp else entropy
        out = sspo_loss_from_logprobs(lp, ent, *tensors, backend=backend, **kw, **CLIP)
        out.loss.backward()
        results.append((out, lp.grad))
    (out, grad), (want, want_grad) = results
    _assert_outputs_same(out, want)
    _assert_same(grad, want_grad, "dlogprobs")


@pytest.mark.parametrize("how", ["stride2", "offset-stride3"])
@pytest.mark.parametrize("packed", [False, True])
def test_sspo_loss_from_hidden(how, packed):
    batch = make_batch(6, [5, 0, 7, 3], seq_len=7, vocab=31, hole_p=0.2)
    batch = pack(batch) if packed else batch
    views, kwargs = _views(batch, "subsentence", how, False)
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(*batch.tokens.shape, 12, generator=gen)
    weight = torch.randn(31, 12, generator=gen) * 0.5
    bias = torch.randn(31, generator=gen) * 0.1
    strided_params = (
        torch.stack([hidden, hidden], -1)[..., 0],  # every other element
        weight.t().contiguous().t(),  # (V, H) as the transpose of an (H, V) buffer
        torch.stack([bias, bias], -1)[..., 1],
    )
    results = []
    for (tensors, kw), params in (
        ((views, kwargs), strided_params),
        (_contiguous(views, kwargs), (hidden, weight, bias)),
    ):
        h, w, b = (p.detach().requires_grad_(True) for p in params)
        out = sspo_loss_from_hidden(h, w, *tensors, bias=b, **kw, **CLIP)
        out.loss.backward()
        results.append((out, (h.grad, w.grad, b.grad)))
    (out, grads), (want, want_grads) = results
    _assert_outputs_same(out, want)
    for name, g, wg in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert_close(f"d{name}", g, wg, atol=1e-6, rtol=1e-5)  # matmuls of other strides may round differently
