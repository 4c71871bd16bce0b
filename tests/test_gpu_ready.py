"""Launch-side defects a first GPU run would meet, checked where the CPU can show them (and on CUDA
where it cannot): the temperature floor, the composed segment step above the fused step's token limit,
the fused-linear chunk sizes and weight-gradient path, overlapping logits in place, a CPU tensor
`entropy_ref`, and no host synchronisation on CUDA."""

from __future__ import annotations

import logging

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import make_batch, pack

import reference
from sspo_kernels import METRIC_NAMES, backend, sspo_loss, sspo_loss_from_hidden, sspo_loss_from_logprobs
from sspo_kernels._options import MIN_TEMPERATURE, make_config
from sspo_kernels._validate import side_table
from sspo_kernels.ops import linear
from sspo_kernels.ops.vocab import torch as vocab_torch
from sspo_kernels.ops.vocab import triton as vocab_triton

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP = dict(eps_low=0.1, eps_high=0.15, entropy_gamma=1.0)


def _outputs_close(out, ref, tol: float = 1e-5) -> None:
    for name in ("loss", "logprobs", "entropy"):
        assert_close(name, getattr(out, name), getattr(ref, name), atol=tol)
    for name in METRIC_NAMES:
        assert_close(f"metrics[{name}]", out.metrics[name], ref.metrics[name], atol=tol)


# ---------------------------------------------------------------- temperature


@pytest.mark.parametrize("tau", [0.0, 1e-9, 9.9e-7, -1.0, float("nan"), float("inf")])
def test_temperature_below_the_floor_is_refused(tau):
    with pytest.raises(ValueError, match="temperature"):
        make_config("token", temperature=tau)
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match="temperature"):
        vocab_triton.logprob_entropy_fwd(logits, torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool), tau)


@pytest.mark.parametrize("fwd", [vocab_triton.logprob_entropy_fwd, vocab_torch.logprob_entropy_fwd])
@pytest.mark.triton
def test_smallest_temperature_gives_finite_entropy(fwd):
    """At the floor the fp32 shifts stay finite: the entropy is a number (about 0), never NaN."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 700, generator=gen) * 30
    logits[2, 5] = logits[2].max() + 1e-3  # a near tie, 1000 units of z apart at tau = 1e-6
    tokens = torch.randint(0, 700, (6,), generator=gen)
    mask = torch.ones(6, dtype=torch.bool)
    logp, entropy, *_ = fwd(logits, tokens, mask, MIN_TEMPERATURE)
    want_logp, want_entropy = reference.naive_logprob_entropy(logits, tokens, MIN_TEMPERATURE)
    assert torch.isfinite(entropy).all() and not torch.isnan(logp).any()
    assert_close("entropy", entropy, want_entropy, atol=1e-5)
    assert_close("logprobs", logp, want_logp, rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------- the segment step above the fused limit


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("granularity", ["subsentence", "sequence"])
@pytest.mark.triton
def test_composed_step_above_the_fused_limit(monkeypatch, granularity, mode):
    """With fewer tokens allowed than the call has, the Triton backend composes the step; its results
    match the fused step's and the reference's."""
    batch = pack(make_batch(8, [9, 0, 6, 11], vocab=29, hole_p=0.2))
    args, kwargs = batch.inputs(granularity)
    kwargs.update(loss_agg_mode=mode, **CLIP)
    ref = reference.sspo_loss(*args, **kwargs)
    ref_grad = torch.autograd.grad(ref.loss, args[0])[0]
    rest = [a.float() if a.is_floating_point() else a for a in args[1:]]
    outs = {}
    for limit in (1 << 16, 10):  # fused, then composed (26 tokens > 10)
        monkeypatch.setattr(backend, "FUSED_STEP_MAX_TOKENS", limit)
        logits = batch.logits.detach().float().requires_grad_(True)
        out = sspo_loss(logits, *rest, backend="triton", **kwargs)
        out.loss.backward()
        _outputs_close(out, ref)
        assert_rel_norm("dlogits", logits.grad, ref_grad, tol=1e-5)
        outs[limit] = out
    assert torch.equal(outs[10].metrics["num_segments"], outs[1 << 16].metrics["num_segments"])


@pytest.mark.triton
def test_fuses_step_by_token_count():
    triton_backend = backend.get_backend("triton", torch.device("cpu"))
    assert triton_backend.fuses_step("token-mean", backend.FUSED_STEP_MAX_TOKENS)
    assert not triton_backend.fuses_step("token-mean", backend.FUSED_STEP_MAX_TOKENS + 1)
    assert not triton_backend.fuses_step("none", 10)
    assert not backend.get_backend("torch", torch.device("cpu")).fuses_step("token-mean", 10)


# ---------------------------------------------------------------- fused linear on a GPU


def test_linear_chunk_tokens():
    linear_chunk_tokens = linear.linear_chunk_tokens
    assert linear_chunk_tokens(32000) == (1 << 25) // (4 * 32000)  # the CPU rule: 32 MiB of fp32
    assert linear_chunk_tokens(32000, "cpu", torch.bfloat16) == (1 << 25) // (4 * 32000)
    # a GPU: 512 MiB of logits in the input dtype, at least 2048 rows within 2 GiB
    assert linear_chunk_tokens(151936, "cuda", torch.bfloat16) == 2048
    assert linear_chunk_tokens(32000, "cuda", torch.bfloat16) == (1 << 29) // (2 * 32000)
    assert linear_chunk_tokens(151936, "cuda", torch.float32) == 2048
    assert linear_chunk_tokens(1 << 20, "cuda", torch.float32) == (1 << 31) // (4 << 20)
    assert linear_chunk_tokens(1 << 30) == 1


def test_weight_grad_path_on_the_cpu():
    assert linear.weight_grad_path("cpu", torch.float32) == "fp32"
    assert linear.weight_grad_path("cpu", torch.bfloat16) == "fp32-copies"
    acc = torch.zeros(3, 2)
    a, b = torch.randn(3, 4).bfloat16(), torch.randn(4, 2).bfloat16()
    linear.add_product_fp32(acc, a, b)
    assert_close("acc", acc, a.double() @ b.double(), atol=1e-5)


def test_schedule_is_logged(caplog):
    batch = make_batch(9, [4, 6], vocab=19)
    gen = torch.Generator().manual_seed(9)
    hidden, weight = torch.randn(*batch.tokens.shape, 8, generator=gen), torch.randn(19, 8, generator=gen)
    args, kwargs = batch.inputs("token")
    with caplog.at_level(logging.DEBUG, logger="sspo_kernels"):
        sspo_loss_from_hidden(hidden, weight, *args[1:], **kwargs)
        sspo_loss_from_hidden(hidden, weight, *args[1:], **{**kwargs, "granularity": "sequence"}, single_pass=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "sspo_kernels"]
    assert any("single-pass schedule" in m and "weight gradient: fp32" in m for m in lines), lines
    assert any("two-phase schedule (single_pass=False)" in m for m in lines), lines


# ---------------------------------------------------------------- in place, entropy_ref


def test_inplace_backward_refuses_overlapping_logits():
    batch = make_batch(10, [4, 5], vocab=13)
    args, kwargs = batch.inputs("token")
    row = torch.randn(1, 1, 13, requires_grad=True)
    shared = row.expand(2, 5, 13)  # every row is the same memory
    with pytest.raises(ValueError, match="inplace_backward"):
        sspo_loss(shared, *args[1:], inplace_backward=True, **kwargs)
    sspo_loss(shared, *args[1:], **kwargs).loss.backward()  # out of place is fine


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropy_ref_tensor_on_the_cpu(backend):
    batch = make_batch(12, [6, 4, 7], vocab=23, hole_p=0.1)
    args, kwargs = batch.inputs("subsentence")
    kwargs.update(entropy_ref=torch.tensor([1.3], dtype=torch.float64), **CLIP)
    ref = reference.sspo_loss(*args, **kwargs)
    rest = [a.float() if a.is_floating_point() else a for a in args[1:]]
    out = sspo_loss(batch.logits.detach().float(), *rest, backend=backend, **kwargs)
    _outputs_close(out, ref)


def test_side_tensors_on_another_device_are_refused():
    """A side tensor (here entropy_ref) on a device that is neither the inputs' nor the CPU."""
    with pytest.raises(ValueError, match="entropy_ref is on meta"):
        side_table("entropy_ref", torch.empty((), device="meta"), torch.device("cpu"))
    assert side_table("t", torch.arange(6)[::2], torch.device("cpu")).is_contiguous()


# ---------------------------------------------------------------- CUDA only


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_gpu_no_host_sync_with_cpu_side_inputs(backend_name):
    """boundary, cu_seqlens, a normaliser and entropy_ref given as CPU tensors: every entry point's
    forward and backward run with CUDA's sync debug mode set to raise on a synchronising call."""
    batch = pack(make_batch(14, [40, 0, 25, 61], vocab=3001, hole_p=0.1))
    args, kwargs = batch.inputs("subsentence")
    kwargs.update(entropy_ref=torch.tensor(1.2), normalizer=torch.tensor(90.0), **CLIP)
    cuda = [a.float().cuda() if a.is_floating_point() else a.cuda() for a in args]
    gen = torch.Generator().manual_seed(14)
    hidden = torch.randn(cuda[1].shape[0], 64, generator=gen).cuda().requires_grad_(True)
    weight = (torch.randn(3001, 64, generator=gen) * 0.1).cuda().requires_grad_(True)
    logits = cuda[0].detach().requires_grad_(True)
    logp = torch.log_softmax(logits.detach(), -1).gather(-1, cuda[1].clamp(min=0)[:, None])[:, 0].requires_grad_(True)
    for call in (  # a first call compiles the kernels (that may synchronise); the second must not
        lambda: sspo_loss(logits, *cuda[1:], backend=backend_name, **kwargs).loss.backward(),
        lambda: sspo_loss_from_hidden(hidden, weight, *cuda[1:], backend=backend_name, **kwargs).loss.backward(),
        lambda: sspo_loss_from_logprobs(
            logp, torch.rand_like(logp) + 0.5, *cuda[1:], backend=backend_name, **kwargs
        ).loss.backward(),
    ):
        call()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_weight_gradient_takes_a_fast_path(dtype):
    """The fp32 weight gradient of 16-bit inputs is never accumulated through fp32 copies on a GPU."""
    path = linear.weight_grad_path(torch.device("cuda"), dtype)
    assert path in ("addmm-fp32-out", "mm-fp32-out"), path
    acc = torch.randn(37, 16, device="cuda")
    a, b = torch.randn(37, 50, device="cuda", dtype=dtype), torch.randn(50, 16, device="cuda", dtype=dtype)
    want = acc.double() + a.double() @ b.double()
    linear.add_product_fp32(acc, a, b)
    assert_close("acc", acc, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("entry", ["logits", "hidden", "logprobs"])
def test_every_function_runs_under_the_device_guard(monkeypatch, entry):
    """Forward and backward of each entry point's autograd Function enter `device_guard` with the
    inputs' device (on CUDA: `torch.cuda.device(that device)`, so launches follow the tensors)."""
    from sspo_kernels import _utils

    entered = []
    real = _utils.device_guard
    monkeypatch.setattr(_utils, "device_guard", lambda device: entered.append(device) or real(device))
    batch = make_batch(15, [4, 6], vocab=17)
    args, kwargs = batch.inputs("token")
    rest = [a.float() if a.is_floating_point() else a for a in args[1:]]
    if entry == "logits":
        leaf = batch.logits.detach().float().requires_grad_(True)
        out = sspo_loss(leaf, *rest, **kwargs)
    elif entry == "hidden":
        leaf = torch.randn(*batch.tokens.shape, 8, requires_grad=True)
        out = sspo_loss_from_hidden(leaf, torch.randn(17, 8), *rest, **kwargs)
    else:
        leaf = torch.randn(batch.tokens.shape, requires_grad=True)
        out = sspo_loss_from_logprobs(leaf, None, *rest, **{**kwargs, "entropy_gamma": 0.0})
    assert entered == [torch.device("cpu")]
    out.loss.backward()
    assert entered == [torch.device("cpu")] * 2
    guard = real(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cu", [[0, 4, 9], [0, 6, 4, 10], [1, 5, 10], [0, 5, 10, 10, 12]], ids=str)
def test_malformed_cu_seqlens_is_an_error(backend, cu):
    """The fused step checks cu_seqlens itself (one check with the token and weight counts): the
    same ValueError naming cu_seqlens as the validation layer's on the CPU."""
    batch = pack(make_batch(16, [4, 6], vocab=11, per_token_adv=True))  # 10 tokens, advantages per token
    args, kwargs = batch.inputs("subsentence")
    kwargs["cu_seqlens"] = torch.tensor(cu)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0, be non-decreasing and end at the token count"):
        sspo_loss(batch.logits.detach().float(), *args[1:], backend=backend, **kwargs)
    kwargs["cu_seqlens"] = torch.tensor([0, 4, 4, 10])  # an empty response is fine
    sspo_loss(batch.logits.detach().float(), *args[1:], backend=backend, **kwargs)
