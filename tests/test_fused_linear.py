"""`sspo_loss_from_hidden` against the fp64 reference run on logits = hidden @ weight.T + bias.

The reference gets float64 copies of the same (rounded) hidden, weight and bias and takes gradients
through the fp64 matmul with autograd. For bf16 inputs it is fed the very bf16 logits the fused path
computes (a bf16 `addmm` of a chunk of rows equals the same rows of the whole product, checked in
`test_bf16_chunk_matmul_is_row_local`), so only the fused path's own rounding is measured.

The comparisons also run on CUDA (marked gpu), with the Triton backend (`backend_for`): the inputs
are built on the CPU and copied there, the side tables (boundary, cu_seqlens) stay on the CPU, as
single-pass planning of a packed batch needs them there, and the reference runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import IGNORE, Batch, make_batch, pack
from _devices import DEVICES, TRITON, grid, on, on_dict

import reference
from bench.memory import peak_extra_bytes
from sspo_kernels._options import make_config
from sspo_kernels.fused_linear import (
    SSPOLossFromHidden,
    linear_chunk_tokens,
    plan_chunks,
    sspo_loss_from_hidden,
)
from sspo_kernels.ops.linear import LinearGrads

HIDDEN = 8
VOCAB = 37
# Responses of 5, 0 (empty), 3, 6, 1 and 4 tokens: T = 6 when padded, 19 tokens when packed.
LENGTHS = [5, 0, 3, 6, 1, 4]
# Chunk sizes that still allow the single-pass schedule with several chunks: one token (token
# granularity), two padded rows of 6, and whole packed responses of up to 7 tokens.
MANY = {"token": 4, "padded": 12, "packed": 7}
ONE = 1000  # every case in one chunk
UPSTREAM = 1.7  # d(objective)/d(loss): checks that the single-pass gradients get scaled in backward

# Tolerances of docs/loss.md for fp32: max abs error 1e-5 on values, relative norm 1e-5 on gradients.
FP32_ATOL = 1e-5
FP32_GRAD = 1e-5
# bf16: the reference sees the same bf16 logits, so values only carry fp32 arithmetic error (docs/loss.md:
# 1e-4 relative). Gradients are rounded to bf16 twice: dlogits (the backward launcher returns the
# logits' dtype) and then the matmul output (grad_hidden; grad_weight and grad_bias are summed in
# fp32 and rounded once at the end). Each rounding is at most 2^-9 relative per element, so the
# relative norm error stays below 2 * 2^-9 ~ 3.9e-3; 8e-3 leaves room for the cancellations in
# dlogits @ W (p - onehot rows sum to 0).
BF16_VALUE_RTOL = 1e-4
BF16_GRAD = 8e-3

SEGMENT_OPTIONS = {
    # A float entropy reference keeps the single-pass schedule possible while the clip bounds adapt.
    "entropy_ref": 1.5,
    "entropy_gamma": 1.0,
    "eps_low": 0.1,
    "eps_high": 0.15,
}


@dataclass
class LinearCase:
    batch: Batch  # tokens, mask, advantages, segments, boundary, cu_seqlens (its logits are unused)
    hidden: torch.Tensor  # (B, T, H) or (total, H)
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor  # (V,)
    old_logprobs: torch.Tensor  # true log-probs of the sampled tokens, shifted: ratios straddle the bounds

    @property
    def layout(self) -> str:
        return "packed" if self.batch.cu_seqlens is not None else "padded"


def make_case(
    seed: int,
    *,
    packed: bool = False,
    dtype: torch.dtype = torch.float32,
    lengths: list[int] = LENGTHS,
    vocab: int = VOCAB,
    per_token_adv: bool = False,
) -> LinearCase:
    batch = make_batch(seed, lengths, vocab=vocab, hole_p=0.25, per_token_adv=per_token_adv)
    if packed:
        batch = pack(batch)
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(*batch.tokens.shape, HIDDEN, generator=gen).to(dtype)
    weight = (torch.randn(vocab, HIDDEN, generator=gen) * 0.7).to(dtype)
    bias = (torch.randn(vocab, generator=gen) * 0.5).to(dtype)
    with torch.no_grad():
        logits = hidden.double() @ weight.double().T + bias.double()
        true = torch.log_softmax(logits, -1).gather(-1, batch.tokens.clamp(min=0)[..., None])[..., 0]
        shift = 0.1 * torch.randn(batch.tokens.shape, generator=gen, dtype=torch.float64)
        old = torch.where(batch.tokens != IGNORE, true - shift, 0.0).float()
        ref = torch.where(batch.tokens != IGNORE, true + 0.3 * torch.randn(true.shape, generator=gen), 0.0)
    batch.ref_logprobs = ref.float()  # near the policy, so the KL term stays of order 1
    return LinearCase(batch, hidden, weight, bias, old)


def backend_for(device: str) -> str:
    """The backend a comparison runs: the cheap torch one on the CPU, the Triton kernels compiled on CUDA."""
    return "torch" if device == "cpu" else "triton"


def _kwargs(case: LinearCase, granularity: str, options: dict) -> dict:
    kw = {"granularity": granularity, "ref_logprobs": case.batch.ref_logprobs, **options}
    if granularity in ("subsentence", "sentence"):
        kw["boundary"] = case.batch.boundary
    if granularity == "segments":
        kw["segment_ids"] = case.batch.segment_ids
    if case.batch.cu_seqlens is not None:
        kw["cu_seqlens"] = case.batch.cu_seqlens
    return kw


def _upstream(loss: torch.Tensor, seed: int = 7) -> torch.Tensor:
    if loss.dim() == 0:
        return torch.tensor(UPSTREAM, dtype=loss.dtype)
    return torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(loss.dtype)


def run_reference(case: LinearCase, granularity: str, options: dict, device: str = "cpu"):
    """Loss, logprobs, entropy, metrics and (hidden, weight, bias) gradients in float64."""
    h, w, b = (t.detach().double().requires_grad_(True) for t in (case.hidden, case.weight, case.bias))
    logits = h @ w.T + b
    if case.hidden.dtype != torch.float32:  # the same rounded logits the fused path sees (on its device)
        bias, hidden, weight = on(device, case.bias, case.hidden.reshape(-1, HIDDEN), case.weight)
        rounded = torch.addmm(bias, hidden, weight.T).cpu().reshape(logits.shape)
        logits = logits + (rounded.double() - logits).detach()
    b_ = case.batch
    out = reference.sspo_loss(
        logits, b_.tokens, case.old_logprobs.double(), b_.advantages.double(), b_.mask,
        **_kwargs(case, granularity, options) | {"ref_logprobs": b_.ref_logprobs.double()},
    )  # fmt: skip
    (out.loss * _upstream(out.loss)).sum().backward()
    return out, (h.grad, w.grad, b.grad)


def run_fused(case: LinearCase, granularity: str, options: dict, device: str = "cpu", **fused_options):
    h, w, b = (t.detach().to(device, copy=True).requires_grad_(True) for t in (case.hidden, case.weight, case.bias))
    b_ = case.batch
    kwargs = _kwargs(case, granularity, options)
    # the per-token tensors on the device; the side tables (boundary, cu_seqlens) stay on the CPU
    kwargs.update(on_dict(device, {k: v for k, v in kwargs.items() if k in ("ref_logprobs", "segment_ids")}))
    out = sspo_loss_from_hidden(
        h, w, *on(device, b_.tokens, case.old_logprobs, b_.advantages.float(), b_.mask), bias=b,
        **kwargs, **fused_options,
    )  # fmt: skip
    (out.loss * _upstream(out.loss).to(out.loss.device, out.loss.dtype)).sum().backward()
    return out, (h.grad, w.grad, b.grad)


def compare(case: LinearCase, granularity: str, options: dict, device: str = "cpu", **fused_options) -> None:
    expected, expected_grads = run_reference(case, granularity, options, device)
    actual, grads = run_fused(case, granularity, options, device, **fused_options)
    if case.hidden.dtype == torch.float32:
        atol, rtol, grad_tol = FP32_ATOL, 0.0, FP32_GRAD
    else:
        atol, rtol, grad_tol = 1e-6, BF16_VALUE_RTOL, BF16_GRAD
    assert_close("loss", actual.loss, expected.loss, atol=atol, rtol=rtol)
    assert_close("logprobs", actual.logprobs, expected.logprobs, atol=atol, rtol=rtol)
    assert_close("entropy", actual.entropy, expected.entropy, atol=atol, rtol=rtol)
    for name, value in expected.metrics.items():
        assert_close(f"metrics[{name!r}]", actual.metrics[name], value, atol=atol, rtol=rtol)
    for name, g, e, param in zip(("grad hidden", "grad weight", "grad bias"), grads, expected_grads, (
        case.hidden, case.weight, case.bias,
    )):  # fmt: skip
        assert g.dtype == param.dtype and g.shape == param.shape, f"{name}: {g.dtype} {tuple(g.shape)}"
        assert_rel_norm(name, g, e, tol=grad_tol)


def _chunk(case: LinearCase, granularity: str, chunks: str) -> int:
    if chunks == "one-chunk":
        return ONE
    return MANY["token" if granularity == "token" else case.layout]


GRANULARITIES = ("token", "sequence", "subsentence", "sentence", "segments")
SCHEDULES = {"single-pass": True, "two-phase": False}


# ---------------------------------------------------------------- against the reference


# on CUDA: every granularity and layout with several chunks, subsentence in one chunk too
@grid(
    ("granularity", GRANULARITIES), ("layout", ["padded", "packed"]), ("schedule", list(SCHEDULES)),
    ("chunks", ["many-chunks", "one-chunk"]),
    cuda=lambda p: p.chunks == "many-chunks" or p.granularity == "subsentence",
)  # fmt: skip
def test_matches_reference(device, granularity, layout, schedule, chunks):
    case = make_case(1, packed=layout == "packed")
    chunk = _chunk(case, granularity, chunks)
    compare(case, granularity, SEGMENT_OPTIONS, device, backend=backend_for(device), chunk_size=chunk,
            single_pass=SCHEDULES[schedule])  # fmt: skip


@grid(("chunk_size", {f"chunk{c}": c for c in (1, 2, 5, 7, 18)}))
def test_two_phase_chunk_edges(device, chunk_size):
    """Chunk boundaries at every offset: inside segments, at their ends, at response ends (two-phase)."""
    case = make_case(2, packed=True)
    compare(case, "subsentence", SEGMENT_OPTIONS, device, backend=backend_for(device), chunk_size=chunk_size,
            single_pass=False)  # fmt: skip


@grid(
    ("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "sum"]),
    ("schedule", list(SCHEDULES)),
)  # fmt: skip
def test_aggregation_modes(device, mode, schedule):
    case = make_case(3, per_token_adv=True)
    options = {**SEGMENT_OPTIONS, "loss_agg_mode": mode}
    compare(case, "subsentence", options, device, backend=backend_for(device), chunk_size=MANY["padded"],
            single_pass=SCHEDULES[schedule])  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_per_token_loss_two_phase(device):
    """loss_agg_mode="none": a per-token upstream gradient, so only the two-phase schedule applies."""
    case = make_case(4, packed=True, per_token_adv=True)
    options = {**SEGMENT_OPTIONS, "loss_agg_mode": "none"}
    compare(case, "sentence", options, device, backend=backend_for(device), chunk_size=5)
    with pytest.raises(ValueError, match='loss_agg_mode="none"'):
        run_fused(case, "sentence", options, device, backend=backend_for(device), single_pass=True)


@grid(("schedule", list(SCHEDULES)))
def test_all_options(device, schedule):
    """KL term, entropy bonus, dual clip, temperature, the token-form ratio gradient and a binding clamp."""
    case = make_case(5, per_token_adv=True)
    options = {
        **SEGMENT_OPTIONS, "beta": 0.1, "entropy_coef": 0.01, "dual_clip": 1.5, "temperature": 0.7,
        "ratio_grad": "token", "log_ratio_clamp": 0.15, "normalizer": 9.0, "k_min": 0.8, "k_max": 1.3,
    }  # fmt: skip
    compare(case, "subsentence", options, device, backend=backend_for(device), chunk_size=MANY["padded"],
            single_pass=SCHEDULES[schedule])  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_batch_entropy_reference_runs_two_phase(device):
    """entropy_ref="batch" with adaptation on: the automatic choice is two-phase, and it is exact."""
    case = make_case(6, packed=True)
    options = {**SEGMENT_OPTIONS, "entropy_ref": "batch"}
    compare(case, "subsentence", options, device, backend=backend_for(device), chunk_size=4)


@grid(("granularity", ["token", "subsentence"]), ("schedule", list(SCHEDULES)))
def test_bf16(device, granularity, schedule):
    case = make_case(7, dtype=torch.bfloat16)
    chunk = _chunk(case, granularity, "many-chunks")
    compare(case, granularity, SEGMENT_OPTIONS, device, backend=backend_for(device), chunk_size=chunk,
            single_pass=SCHEDULES[schedule])  # fmt: skip


@TRITON
@grid(("granularity", ["token", "segments"]), ("schedule", list(SCHEDULES)))
def test_triton_backend(device, granularity, schedule):
    """The Triton launchers (interpreted on the CPU): 19 packed tokens, V = 37, several chunks."""
    pytest.importorskip("triton")
    case = make_case(8, packed=True)
    chunk = _chunk(case, granularity, "many-chunks")
    compare(case, granularity, SEGMENT_OPTIONS, device, backend="triton", chunk_size=chunk,
            single_pass=SCHEDULES[schedule])  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_chunk_matmul_is_row_local(device):
    """What the bf16 comparisons rely on: a chunk's bf16 logits equal the same rows of the whole product."""
    case = make_case(9, packed=True, dtype=torch.bfloat16)
    h, weight, bias = on(device, case.hidden, case.weight, case.bias)
    full = torch.addmm(bias, h, weight.T)
    for s in range(0, h.shape[0], 4):
        assert torch.equal(torch.addmm(bias, h[s : s + 4], weight.T), full[s : s + 4])


# ---------------------------------------------------------------- degenerate inputs and plumbing


@grid(("schedule", list(SCHEDULES)))
def test_everything_masked_out(device, schedule):
    case = make_case(10)
    case.batch.mask[:] = False
    out, grads = run_fused(case, "subsentence", SEGMENT_OPTIONS, device, backend=backend_for(device), chunk_size=12,
                           single_pass=SCHEDULES[schedule])  # fmt: skip
    assert out.loss.item() == 0.0
    assert not out.logprobs.any() and not out.entropy.any()
    for g in grads:
        assert torch.isfinite(g).all() and not g.any()
    assert out.metrics["num_segments"].item() == 0


@grid(("schedule", list(SCHEDULES)))
def test_frozen_weight_no_bias_noncontiguous_hidden(device, schedule):
    """Only hidden needs a gradient; hidden is a transposed view; the inputs are left untouched."""
    case = make_case(11)
    case.bias = torch.zeros_like(case.bias)
    expected, (g_ref, _, _) = run_reference(case, "token", SEGMENT_OPTIONS)
    hidden = case.hidden.to(device).transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    assert not hidden.is_contiguous()
    weight = case.weight.to(device, copy=True)
    b_ = case.batch
    out = sspo_loss_from_hidden(
        hidden, weight, *on(device, b_.tokens, case.old_logprobs, b_.advantages.float(), b_.mask), granularity="token",
        backend=backend_for(device), chunk_size=3, single_pass=SCHEDULES[schedule], **SEGMENT_OPTIONS,
    )  # fmt: skip
    (out.loss * UPSTREAM).backward()
    assert_close("loss", out.loss, expected.loss, atol=FP32_ATOL)
    assert_rel_norm("grad hidden", hidden.grad, g_ref, tol=FP32_GRAD)
    assert torch.equal(weight.cpu(), case.weight) and torch.equal(hidden.detach().cpu(), case.hidden)


def test_no_gradient_work_without_grad_mode(monkeypatch):
    """Under torch.no_grad the single-pass schedule computes the statistics and the loss only."""
    calls = []
    monkeypatch.setattr(LinearGrads, "add_chunk", lambda *args: calls.append(args))
    case = make_case(16)
    expected, _ = run_reference(case, "token", SEGMENT_OPTIONS)
    b_ = case.batch
    with torch.no_grad():
        out = sspo_loss_from_hidden(
            case.hidden.requires_grad_(True), case.weight, b_.tokens, case.old_logprobs, b_.advantages.float(),
            b_.mask, bias=case.bias, granularity="token", backend="torch", chunk_size=4, single_pass=True,
            **SEGMENT_OPTIONS,
        )  # fmt: skip
    assert not calls
    assert_close("loss", out.loss, expected.loss, atol=FP32_ATOL)


def test_module_form_matches_function():
    case = make_case(12, packed=True)
    b_ = case.batch
    module = SSPOLossFromHidden("subsentence", boundary=b_.boundary, backend="torch", chunk_size=7, **SEGMENT_OPTIONS)
    args = (case.hidden, case.weight, b_.tokens, case.old_logprobs, b_.advantages.float(), b_.mask)
    got = module(*args, bias=case.bias, cu_seqlens=b_.cu_seqlens)
    want = sspo_loss_from_hidden(
        *args, bias=case.bias, cu_seqlens=b_.cu_seqlens, granularity="subsentence", boundary=b_.boundary,
        backend="torch", chunk_size=7, **SEGMENT_OPTIONS,
    )  # fmt: skip
    assert torch.equal(got.loss, want.loss) and torch.equal(got.logprobs, want.logprobs)
    assert "granularity='subsentence'" in repr(module)
    with pytest.raises(TypeError, match="inplace_backward"):
        SSPOLossFromHidden("token", inplace_backward=True)


def test_single_pass_refuses_a_second_backward():
    case = make_case(13)
    h = case.hidden.clone().requires_grad_(True)
    b_ = case.batch
    out = sspo_loss_from_hidden(h, case.weight, b_.tokens, case.old_logprobs, b_.advantages.float(), b_.mask,
                                granularity="token", backend="torch", single_pass=True)  # fmt: skip
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda c: {"weight": c["weight"][:, :-1]}, ValueError, "weight must be"),
        (lambda c: {"bias": c["bias"][:-1]}, ValueError, "bias must be"),
        (lambda c: {"weight": c["weight"].double()}, TypeError, "weight has dtype"),
        (
            lambda c: {"hidden": c["hidden"].reshape(-1, HIDDEN), "cu_seqlens": torch.tensor([0, 36])},
            ValueError,
            "tokens",
        ),
        (lambda c: {"chunk_size": 0}, ValueError, "chunk_size"),
    ],
    ids=["weight-hidden-size", "bias-length", "weight-dtype", "hidden-tokens-shape", "chunk-size-zero"],
)
def test_bad_arguments(change, error, message):
    case = make_case(14)
    b_ = case.batch
    args = {"hidden": case.hidden, "weight": case.weight, "bias": case.bias}
    args |= change(args)
    with pytest.raises(error, match=message):
        sspo_loss_from_hidden(
            args.pop("hidden"), args.pop("weight"), b_.tokens, case.old_logprobs, b_.advantages.float(), b_.mask,
            granularity="token", backend="torch", **args,
        )  # fmt: skip


# ---------------------------------------------------------------- the schedule choice


def _plan(granularity="subsentence", shape=(4, 6), cu=None, chunk=12, single_pass=None, **options):
    return plan_chunks(make_config(granularity, **options), shape, cu, chunk, single_pass)


@pytest.mark.parametrize(
    "kwargs, single, bounds",
    [
        (dict(granularity="token", entropy_ref=1.0, chunk=10), True, ((0, 10), (10, 20), (20, 24))),
        (dict(entropy_ref=1.0, chunk=13), True, ((0, 12), (12, 24))),
        (dict(entropy_gamma=0.0), True, ((0, 12), (12, 24))),
        (dict(adapt_low=False, adapt_high=False), True, ((0, 12), (12, 24))),
        (dict(shape=(19,), cu=torch.tensor([0, 5, 5, 8, 14, 15, 19]), chunk=7, entropy_ref=1.0), True,
         ((0, 5), (5, 8), (8, 15), (15, 19))),
        (dict(shape=(5,), chunk=5, entropy_ref=1.0), True, ((0, 5),)),
        (dict(), False, ((0, 12), (12, 24))),
        (dict(entropy_ref=1.0, loss_agg_mode="none"), False, ((0, 12), (12, 24))),
        (dict(entropy_ref=1.0, chunk=5), False, ((0, 5), (5, 10), (10, 15), (15, 20), (20, 24))),
        (dict(shape=(9,), cu=torch.tensor([0, 2, 9]), chunk=6, entropy_ref=1.0), False, ((0, 6), (6, 9))),
        (dict(entropy_ref=1.0, single_pass=False), False, ((0, 12), (12, 24))),
    ],
    ids=[
        "token-any-chunks", "padded-whole-rows", "gamma-zero", "no-adaptation", "packed-cpu-cu-seqlens",
        "flat-one-chunk", "batch-entropy-ref", "per-token-loss", "row-longer-than-chunk",
        "response-longer-than-chunk", "forced-two-phase",
    ],
)  # fmt: skip
def test_plan(kwargs, single, bounds):
    plan = _plan(**kwargs)
    assert (plan.single_pass, plan.bounds) == (single, bounds)
    assert plan.single_pass or plan.reason


def test_plan_forced_single_pass_says_why():
    with pytest.raises(ValueError, match=r"single_pass=True is not possible here: .*entropy_ref"):
        _plan(single_pass=True)
    with pytest.raises(ValueError, match="longer than chunk_size=5"):
        _plan(entropy_ref=1.0, chunk=5, single_pass=True)


def test_linear_chunk_tokens():
    """The CPU rule (the GPU one, in the input dtype: test_gpu_ready.py)."""
    assert linear_chunk_tokens(32000) == (1 << 25) // (4 * 32000)
    assert linear_chunk_tokens(1 << 30) == 1


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_no_full_logits_allocated(schedule):
    """N = 1024, V = 4096: the fp32 logits would be 16 MiB; forward + backward must stay under half of it
    (one 1 MiB chunk of logits, two fp32 temporaries of its size and the gradients: about 3.5 MiB)."""
    n, h, v, chunk = 1024, 16, 4096, 64
    gen = torch.Generator().manual_seed(15)
    hidden = torch.randn(n, h, generator=gen).requires_grad_(True)
    weight = (torch.randn(v, h, generator=gen) * 0.3).requires_grad_(True)
    bias = torch.zeros(v, requires_grad=True)
    tokens = torch.randint(0, v, (n,), generator=gen)
    mask = torch.rand(n, generator=gen) > 0.1
    old = torch.full((n,), -8.0)
    adv = torch.randn(n, generator=gen)
    cu = torch.arange(0, n + 1, 32)

    def step():
        out = sspo_loss_from_hidden(
            hidden, weight, tokens, old, adv, mask, bias=bias, cu_seqlens=cu, granularity="sequence",
            backend="torch", chunk_size=chunk, single_pass=SCHEDULES[schedule],
        )  # fmt: skip
        out.loss.backward()

    step()  # warm up lazy allocations (profiler, autograd engine)
    hidden.grad = weight.grad = bias.grad = None
    peak = peak_extra_bytes(step)
    logits_bytes = n * v * 4
    assert peak < logits_bytes // 2, f"peak {peak / 2**20:.2f} MiB vs full logits {logits_bytes / 2**20:.0f} MiB"
