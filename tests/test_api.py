"""The public surface: signatures derived from the one options table, what the wheel ships, and the
one call shape of the vocabulary backward that every entry point uses."""

from __future__ import annotations

import inspect
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from _cases import make_batch, pack

import reference
import sspo_kernels
from sspo_kernels import backend as backend_module
from sspo_kernels._options import CONFIG_FIELDS, LOSS_OPTIONS
from sspo_kernels._types import LossConfig

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {
    "sspo_loss": sspo_kernels.sspo_loss,
    "sspo_loss_from_hidden": sspo_kernels.sspo_loss_from_hidden,
    "sspo_loss_from_logprobs": sspo_kernels.sspo_loss_from_logprobs,
    "reference.sspo_loss": reference.sspo_loss,
}


def _keywords(fn) -> dict[str, object]:
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_signatures_share_the_loss_options(name):
    """Every entry point shows every loss option with the same default, in the table's order."""
    keywords = _keywords(ENTRY_POINTS[name])
    loss_part = {k: v for k, v in keywords.items() if k in {o.name for o in LOSS_OPTIONS}}
    assert list(loss_part.items()) == [(o.name, o.default) for o in LOSS_OPTIONS]


def test_config_fields_are_loss_options():
    assert set(CONFIG_FIELDS) == set(LossConfig.__dataclass_fields__)
    assert set(CONFIG_FIELDS) <= {o.name for o in LOSS_OPTIONS}


@pytest.mark.parametrize("name", ["sspo_loss", "sspo_loss_from_hidden", "sspo_loss_from_logprobs"])
def test_unknown_keyword_is_a_type_error(name):
    fn = ENTRY_POINTS[name]
    positional = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    with pytest.raises(TypeError, match=f"{name}\\(\\) got an unexpected keyword argument 'eps_lo'"):
        fn(*[None] * len(positional), eps_lo=0.1)


def test_module_forms_take_the_same_options():
    for module in (sspo_kernels.SSPOLoss, sspo_kernels.SSPOLossFromHidden, sspo_kernels.SSPOLossFromLogprobs):
        with pytest.raises(TypeError, match="unexpected options: eps_lo"):
            module(eps_lo=0.1)
        assert module.OPTIONS.defaults.keys() == _keywords(module.LOSS).keys() - {"bias"}


@pytest.mark.slow
def test_wheel_ships_only_the_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        check=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"sspo_kernels"}


# ---------------------------------------------------------------- one backward call shape


def _spy_backward(monkeypatch) -> list[dict]:
    """Record the keyword arguments every vocabulary backward receives (Triton launcher)."""
    from sspo_kernels.ops.vocab import triton as vocab_triton

    calls, real = [], vocab_triton.logprob_entropy_bwd

    def spy(logits, tokens, mask, lse, entropy, grad_logp, grad_entropy, temperature, **kw):
        calls.append({"grad_entropy": grad_entropy, "logp": kw.get("logp"), "lse": lse})
        return real(logits, tokens, mask, lse, entropy, grad_logp, grad_entropy, temperature, **kw)

    monkeypatch.setattr(vocab_triton, "logprob_entropy_bwd", spy)
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    return calls


@pytest.mark.triton
@pytest.mark.parametrize("single_pass", [True, False], ids=["single-pass", "two-phase"])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01], ids=["no-bonus", "bonus"])
def test_fused_linear_backward_gets_forward_logp_and_no_entropy_term_without_bonus(
    monkeypatch, single_pass, entropy_coef
):
    """The fused-linear Triton path hands the backward the forward's log-probs, and grad_entropy=None
    when the entropy bonus is off (so the kernel compiles the entropy term out)."""
    pytest.importorskip("triton")
    calls = _spy_backward(monkeypatch)
    batch = pack(make_batch(3, [4, 5], vocab=19))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch.tokens.shape[0], 6, generator=gen, requires_grad=True)
    weight = torch.randn(19, 6, generator=gen, requires_grad=True)
    out = sspo_kernels.sspo_loss_from_hidden(
        hidden, weight, batch.tokens, batch.old_logprobs.float(), batch.advantages.float(), batch.mask,
        granularity="token", cu_seqlens=batch.cu_seqlens, backend="triton", single_pass=single_pass,
        entropy_coef=entropy_coef, chunk_size=4,
    )  # fmt: skip
    out.loss.backward()
    assert calls, "the Triton backward never ran"
    for call in calls:
        assert call["logp"] is not None and not torch.equal(call["logp"], call["lse"])
        assert (call["grad_entropy"] is None) == (entropy_coef == 0)


@pytest.mark.triton
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01], ids=["no-bonus", "bonus"])
def test_loss_backward_gets_forward_logp_and_no_entropy_term_without_bonus(monkeypatch, entropy_coef):
    pytest.importorskip("triton")
    calls = _spy_backward(monkeypatch)
    batch = make_batch(3, [4, 5], vocab=19)
    logits = batch.logits.detach().float().requires_grad_(True)
    out = sspo_kernels.sspo_loss(
        logits, batch.tokens, batch.old_logprobs.float(), batch.advantages.float(), batch.mask,
        granularity="token", backend="triton", entropy_coef=entropy_coef,
    )  # fmt: skip
    out.loss.backward()
    (call,) = calls
    assert torch.equal(call["logp"], out.logprobs.reshape(-1))
    assert (call["grad_entropy"] is None) == (entropy_coef == 0)


@pytest.mark.triton
@pytest.mark.parametrize("entropy_grad", [False, True], ids=["dlogp-only", "dlogp-dH"])
@pytest.mark.parametrize("entry", ["token_logprobs", "token_logprobs_from_hidden"])
def test_token_logprobs_backward_gets_forward_logp_and_no_entropy_term_without_its_gradient(
    monkeypatch, entry, entropy_grad
):
    """The per-token op hands the backward the forward's log-probs, and grad_entropy=None when the entropy has no
    upstream gradient (the kernel compiles the entropy term out)."""
    pytest.importorskip("triton")
    calls = _spy_backward(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 19, (2, 5), generator=gen)
    if entry == "token_logprobs":
        leaves = [torch.randn(2, 5, 19, generator=gen, requires_grad=True)]
        logp, ent = sspo_kernels.token_logprobs(leaves[0], tokens, backend="triton")
    else:
        leaves = [torch.randn(2, 5, 6, generator=gen, requires_grad=True), torch.randn(19, 6, requires_grad=True)]
        logp, ent = sspo_kernels.token_logprobs_from_hidden(*leaves, tokens, backend="triton", chunk_size=4)
    (logp.sum() + (ent.sum() if entropy_grad else 0)).backward()
    assert calls, "the Triton backward never ran"
    offset = 0
    for call in calls:
        rows = call["lse"].shape[0]
        assert torch.equal(call["logp"], logp.detach().reshape(-1)[offset : offset + rows])
        assert (call["grad_entropy"] is None) == (not entropy_grad)
        offset += rows
