"""`sspo_loss` (both backends) against the float64 reference: loss, per-token outputs, metrics, gradients.

The Triton backend runs under the interpreter on the CPU (conftest sets TRITON_INTERPRET=1), so its
cases use small shapes; the torch backend is cheap and gets more random cases. Every comparison runs
on the CPU, and a subset covering each dtype, layout, granularity, aggregation mode and option set
also on CUDA (`_devices.grid`, marked gpu). The GPU-only checks are in test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import Batch, make_batch, pack
from _devices import BACKENDS, DEVICES, TRITON, grid, on, on_dict
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from sspo_kernels import METRIC_NAMES, SSPOLoss, sspo_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRANULARITIES = ["subsentence", "sentence", "sequence", "token", "segments"]
AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "sum", "none"]
# Clip widths large enough that some segments clip and some do not for log-ratios of scale 0.3.
CLIP = dict(eps_low=0.2, eps_high=0.25)


def _ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def compare(
    batch: Batch,
    granularity: str,
    *,
    backend: str,
    dtype: torch.dtype = torch.float32,
    inplace=False,
    device: str = "cpu",
    **options,
):
    """Run the reference (float64 on the CPU, on the dtype-rounded logits) and sspo_loss on `device`;
    compare everything."""
    args, kwargs = batch.inputs(granularity)
    kwargs.update(options)
    fast_only = {k: kwargs.pop(k) for k in ("compile_chunks", "chunk_size") if k in kwargs}
    rounded = batch.logits.detach().to(dtype)
    ref_logits = rounded.double().requires_grad_(True)
    ref = reference.sspo_loss(ref_logits, *args[1:], **kwargs)
    kwargs.update(fast_only)

    leaf = rounded.to(device).requires_grad_(True)
    logits = leaf * 1 if inplace else leaf  # in place needs a non-leaf buffer to overwrite
    rest = list(on(device, *args[1:]))
    kwargs = on_dict(device, kwargs)
    inputs_before = [a.clone() for a in rest] + [logits.detach().clone()]
    out = sspo_loss(logits, *rest, backend=backend, inplace_backward=inplace, **kwargs)
    for before, after in zip(inputs_before, [*rest, logits.detach()]):
        assert torch.allclose(before, after, rtol=0, atol=0, equal_nan=True), "an input was modified"

    # upstream gradient: a random weight per token for "none", a non-unit scalar otherwise
    gen = torch.Generator().manual_seed(7)
    upstream = torch.randn(ref.loss.shape, generator=gen, dtype=torch.float64) if ref.loss.dim() else 1.7
    (ref.loss * upstream).sum().backward()
    up = upstream.float().to(device) if isinstance(upstream, torch.Tensor) else upstream
    (out.loss * up).sum().backward()

    low = dtype != torch.float32
    tol = dict(atol=1e-6, rtol=1e-4) if low else dict(atol=1e-5)
    assert out.loss.dtype == torch.float32 and out.logprobs.dtype == torch.float32
    assert_close("loss", out.loss, ref.loss, **tol)
    assert_close("logprobs", out.logprobs, ref.logprobs, **tol)
    assert_close("entropy", out.entropy, ref.entropy, **tol)
    assert set(out.metrics) == set(ref.metrics) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert not out.metrics[name].requires_grad, name
        assert_close(f"metrics[{name}]", out.metrics[name], ref.metrics[name], atol=1e-5)

    grad, grad_ref = leaf.grad, ref_logits.grad
    assert grad.dtype == dtype and grad.shape == grad_ref.shape
    if low:
        # within a couple of ulps of the correctly rounded float64 gradient (the interpreter truncates),
        # subnormal ulps included (fp16's are 6e-8: an entry of 7.5e-6 has 3 significant bits)
        scale = grad_ref.abs().max().item() if grad_ref.numel() else 0.0
        subnormal_ulp = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
        assert_close("dlogits", grad, grad_ref, rtol=2 * _ulp(dtype), atol=1e-6 * scale + 2 * subnormal_ulp)
    else:
        assert_rel_norm("dlogits", grad, grad_ref, tol=1e-5)
    return out


# Each (granularity, scalar mode) pair is a compile of the fused step on CUDA: Triton takes every
# granularity and every mode once, paired along the diagonal; the torch backend compiles nothing and
# takes every granularity at token-mean and every mode at subsentence.
DIAGONAL = {*zip(GRANULARITIES, AGG_MODES[:5]), ("subsentence", "none")}


@grid(
    ("backend", BACKENDS), ("granularity", GRANULARITIES), ("mode", AGG_MODES),
    cuda=lambda p: (p.granularity, p.mode) in DIAGONAL if p.backend == "triton"
    else p.granularity == "subsentence" or p.mode == "token-mean",
)  # fmt: skip
def test_every_granularity_and_aggregation(device, backend, granularity, mode):
    batch = make_batch(3, [5, 0, 9, 1], seq_len=10, vocab=37, hole_p=0.2)
    compare(batch, granularity, backend=backend, loss_agg_mode=mode, entropy_gamma=1.0, device=device, **CLIP)


@grid(("backend", BACKENDS), ("dtype", DTYPES), ("seed", [0, 1]), cuda=lambda p: p.seed == 0)
def test_dtypes_padded_and_packed(device, backend, dtype, seed):
    batch = make_batch(seed, [7, 3, 11], seq_len=12, vocab=53, hole_p=0.15, logit_scale=3.0)
    compare(batch, "subsentence", backend=backend, dtype=dtype, device=device, **CLIP)
    compare(pack(batch), "subsentence", backend=backend, dtype=dtype, device=device, **CLIP)


OPTION_SETS = {
    "kl-entropy-dualclip-temperature": dict(beta=0.1, entropy_coef=0.01, dual_clip=3.0, temperature=0.7),
    "ratio-grad-token": dict(ratio_grad="token"),
    "clamp-binds": dict(log_ratio_clamp=0.15),
    "fixed-entropy-ref-low-only": dict(entropy_ref=1.3, entropy_gamma=2.0, adapt_high=False),
    "entropy-ref-zero": dict(entropy_ref=0.0, entropy_gamma=1.0),
    "entropy-ref-tensor": dict(entropy_ref=torch.tensor([1.7]), entropy_gamma=1.5),
    "caller-normalizer": dict(normalizer=17.0),
    "normalizer-tensor-seq-mean": dict(normalizer=torch.tensor(5.0), loss_agg_mode="seq-mean-token-mean"),
    "norm-len": dict(loss_agg_mode="seq-mean-token-sum-norm", norm_len=64),
}


ADV_LAYOUTS = {"adv-per-response": False, "adv-per-token": True}


# on CUDA: every option set with per-response advantages (per-token ones: test_gpu.py's fused-step cases)
@grid(
    ("backend", BACKENDS), ("options", OPTION_SETS), ("per_token_adv", ADV_LAYOUTS), cuda=lambda p: not p.per_token_adv
)
def test_options(device, backend, options, per_token_adv):
    batch = make_batch(11, [6, 9, 4], seq_len=9, vocab=29, hole_p=0.2, per_token_adv=per_token_adv)
    compare(batch, "subsentence", backend=backend, device=device, **{**CLIP, **options})


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 13), min_size=1, max_size=5),
    vocab=st.integers(2, 70),
    hole_p=st.sampled_from([0.0, 0.2, 0.7]),
    boundary_p=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
    granularity=st.sampled_from(GRANULARITIES),
    mode=st.sampled_from(AGG_MODES),
    dtype=st.sampled_from(list(DTYPES.values())),
    per_token_adv=st.booleans(),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_torch_backend_on_random_batches(
    lengths, vocab, hole_p, boundary_p, granularity, mode, dtype, per_token_adv, packed, seed
):
    batch = make_batch(seed, lengths, vocab=vocab, hole_p=hole_p, boundary_p=boundary_p, per_token_adv=per_token_adv)
    options = dict(loss_agg_mode=mode, entropy_gamma=1.0, **CLIP)
    if packed:
        batch = pack(batch)
        if mode == "seq-mean-token-sum-norm":
            options["norm_len"] = 16
    compare(batch, granularity, backend="torch", dtype=dtype, **options)


@grid(("backend", BACKENDS), ("dtype", DTYPES))
def test_inplace_backward(device, backend, dtype):
    batch = make_batch(5, [8, 6], seq_len=8, vocab=41, hole_p=0.2)
    compare(batch, "subsentence", backend=backend, dtype=dtype, inplace=True, device=device, **CLIP)


@grid(("backend", BACKENDS))
def test_inplace_backward_overwrites_the_logits_buffer(device, backend):
    batch = make_batch(6, [5, 7], vocab=23)
    args, kwargs = batch.inputs("sequence")
    buf = batch.logits.detach().float().to(device).requires_grad_(True)
    logits = buf * 1
    ptr = logits.data_ptr()
    out = sspo_loss(logits, *on(device, *args[1:]), backend=backend, inplace_backward=True, **on_dict(device, kwargs))
    out.loss.backward()
    assert logits.data_ptr() == ptr
    assert_close("dlogits written in place", logits.detach(), buf.grad, atol=0)


@grid(("backend", BACKENDS), ("dtype", DTYPES))
def test_strided_view_of_a_bigger_tensor(device, backend, dtype):
    """A (B, T, V) slice of a bigger buffer is read through its strides and equals its contiguous copy."""
    batch = make_batch(8, [6, 4, 7], seq_len=7, vocab=31)
    args, kwargs = batch.inputs("subsentence")
    args, kwargs = on(device, *args), on_dict(device, kwargs)
    big = torch.randn(3, 9, 40, dtype=torch.float64)
    big[:, 1:-1, :31] = batch.logits.detach()
    big = big.to(device, dtype).requires_grad_(True)
    view = big[:, 1:-1, :31]
    assert not view.is_contiguous() and view.stride(-1) == 1
    contiguous = view.detach().clone().requires_grad_(True)
    a = sspo_loss(view, *args[1:], backend=backend, **kwargs, **CLIP)
    b = sspo_loss(contiguous, *args[1:], backend=backend, **kwargs, **CLIP)
    a.loss.backward()
    b.loss.backward()
    assert_close("loss", a.loss, b.loss, atol=0)
    assert_close("logprobs", a.logprobs, b.logprobs, atol=0)
    assert_close("dlogits", big.grad[:, 1:-1, :31], contiguous.grad, atol=0)
    outside = big.grad.clone()
    outside[:, 1:-1, :31] = 0
    assert not outside.any(), "gradient written outside the view"


DEGENERATE = {
    "all-masked": dict(lengths=[0, 0, 0]),
    "one-token-responses": dict(lengths=[1, 1, 1]),
    "empty-and-full": dict(lengths=[0, 8, 0]),
}


# on CUDA: every case and mode in Triton, every case at token-mean in torch
@grid(
    ("backend", BACKENDS), ("case", DEGENERATE), ("mode", ["token-mean", "seq-mean-token-mean", "none"]),
    cuda=lambda p: p.backend == "triton" or p.mode == "token-mean",
)  # fmt: skip
def test_degenerate_batches_are_finite(device, backend, case, mode):
    batch = make_batch(9, case["lengths"], seq_len=8, vocab=19)
    out = compare(batch, "subsentence", backend=backend, loss_agg_mode=mode, device=device, **CLIP)
    assert torch.isfinite(out.loss).all()


@grid(("backend", BACKENDS), cuda=False)  # the kernels' variants here compile for this test alone
def test_boundary_after_every_token_is_token_granularity(device, backend):
    batch = make_batch(4, [6, 9], vocab=17)
    batch.boundary = torch.ones_like(batch.boundary)
    sub = compare(batch, "subsentence", backend=backend, entropy_gamma=0.0, device=device, **CLIP)
    tok = compare(batch, "token", backend=backend, entropy_gamma=0.0, device=device, **CLIP)
    assert_close("loss", sub.loss, tok.loss, atol=0)
    assert int(sub.metrics["num_segments"]) == int(batch.mask.sum())


@grid(("backend", BACKENDS))
def test_nan_logits_propagate(device, backend):
    batch = make_batch(2, [5, 5], vocab=13)
    logits = batch.logits.detach().float().clone()
    row = int(torch.nonzero(batch.mask.reshape(-1))[0])
    logits.reshape(-1, 13)[row, 3] = float("nan")
    args, kwargs = batch.inputs("subsentence", logits=logits)
    out = sspo_loss(*on(device, *args), backend=backend, **on_dict(device, kwargs), **CLIP)
    assert torch.isnan(out.loss) and torch.isnan(out.logprobs.reshape(-1)[row])


@grid(("backend", BACKENDS))
def test_large_magnitude_logits(device, backend):
    batch = make_batch(12, [9, 7], vocab=61, logit_scale=1e3, log_ratio_scale=0.01)
    # sampled tokens are the likely ones: l_t near 0 keeps the contract's absolute tolerance meaningful in fp32
    # (an fp32 log-prob of -2000 has an ulp of 2.4e-4)
    top2 = batch.logits.detach().topk(2, dim=-1).indices
    batch.tokens = torch.where(batch.tokens >= 0, top2[..., 0], batch.tokens)
    batch.tokens[0, 1] = top2[0, 1, 1]  # one runner-up token, a few units of log-prob below the top
    batch.old_logprobs = reference.naive_logprob_entropy(batch.logits.detach(), batch.tokens)[0] - 0.01
    compare(batch, "sequence", backend=backend, eps_low=0.005, eps_high=0.005, device=device)


def test_module_form_matches_function():
    batch = make_batch(1, [6, 4], vocab=11)
    args, kwargs = batch.inputs("subsentence")
    module = SSPOLoss("subsentence", boundary=kwargs.pop("boundary"), backend="torch", **CLIP)
    kwargs.pop("granularity")
    a = module(*args, **kwargs)
    b = sspo_loss(*args, granularity="subsentence", boundary=batch.boundary, backend="torch", **kwargs, **CLIP)
    assert_close("loss", a.loss, b.loss, atol=0)
    assert "granularity='subsentence'" in repr(module)
    with pytest.raises(TypeError, match="eps_lo"):
        SSPOLoss(eps_lo=0.1)


def test_bad_backend_and_flags():
    batch = make_batch(1, [3], vocab=5)
    args, kwargs = batch.inputs("token")
    with pytest.raises(ValueError, match="backend"):
        sspo_loss(*args, backend="cuda", **kwargs)
    with pytest.raises(TypeError, match="inplace_backward"):
        sspo_loss(*args, inplace_backward=1, **kwargs)
    with pytest.raises(ValueError, match="chunk_size"):
        sspo_loss(*args, chunk_size=0, **kwargs)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    """The whole loss traces into one graph (no host sync, no data-dependent shape); ~30 s of compile."""
    batch = make_batch(0, [6, 9, 4], seq_len=9, vocab=29, hole_p=0.2)
    args, kwargs = batch.inputs("subsentence")

    def loss_and_metric(logits, *rest):
        out = sspo_loss(logits, *rest, backend="torch", **kwargs)
        return out.loss, out.metrics["clip_frac"]

    eager_logits = batch.logits.detach().float().requires_grad_(True)
    compiled_logits = eager_logits.detach().clone().requires_grad_(True)
    eager = loss_and_metric(eager_logits, *args[1:])
    eager[0].backward()
    compiled = torch.compile(loss_and_metric, fullgraph=True)(compiled_logits, *args[1:])
    compiled[0].backward()
    assert_close("loss", compiled[0], eager[0], atol=1e-6)
    assert_close("clip_frac", compiled[1], eager[1], atol=0)
    assert_rel_norm("dlogits", compiled_logits.grad, eager_logits.grad, tol=1e-6)


@grid(("backend", BACKENDS))
def test_minus_inf_logits_are_zero_probability(device, backend):
    """A vocabulary entry masked to -inf by the caller has p = 0 exactly: finite loss, entropy, gradient."""
    batch = make_batch(13, [6, 5], vocab=23, hole_p=0.2)
    banned = torch.tensor([2, 9, 22])
    batch.tokens = torch.where(torch.isin(batch.tokens, banned), 0, batch.tokens)
    logits = batch.logits.detach().clone()
    logits[..., banned] = float("-inf")
    batch.logits = logits
    out = compare(batch, "subsentence", backend=backend, entropy_coef=0.01, device=device, **CLIP)
    assert torch.isfinite(out.loss) and torch.isfinite(out.entropy).all()


@pytest.mark.slow
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
def test_torch_backend_with_compiled_chunks(inplace):
    """compile_chunks=True runs each chunk's maths through torch.compile (a few seconds of compile)."""
    batch = make_batch(14, [7, 3, 9], seq_len=9, vocab=37, hole_p=0.2)
    compare(batch, "subsentence", backend="torch", inplace=inplace, compile_chunks=True, **CLIP)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 1000])
def test_torch_backend_chunk_sizes(chunk_size):
    batch = make_batch(15, [7, 3, 9], seq_len=9, vocab=37, hole_p=0.2)
    compare(batch, "subsentence", backend="torch", chunk_size=chunk_size, **CLIP)


# ---------------------------------------------------------------- the fused segment step (Triton backend)
# Every Triton case above with a scalar loss runs `ops/objective_triton.py`; these add the shapes its
# block walks and response numbering must get right.


STEP_SHAPES = {
    "several-blocks-empty-responses": [700, 0, 650, 1],
    "one-response-past-a-block": [1030],
    "more-responses-than-tokens": [0, 0, 3, 0, 1],
}


@TRITON
@grid(
    ("lengths", STEP_SHAPES), ("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]),
    cuda=lambda p: p.mode == "token-mean" or p.lengths is STEP_SHAPES["several-blocks-empty-responses"],
)  # fmt: skip
def test_fused_step_shapes(device, lengths, mode):
    batch = pack(make_batch(31, lengths, vocab=11, hole_p=0.2))
    options = dict(loss_agg_mode=mode, norm_len=16) if mode.endswith("norm") else dict(loss_agg_mode=mode)
    compare(batch, "subsentence", backend="triton", entropy_gamma=1.0, device=device, **options, **CLIP)


@TRITON
@pytest.mark.parametrize("device", DEVICES)
def test_fused_step_packed_advantages_shaped_like_tokens_when_n_equals_b(device):
    """A packed batch with as many tokens as responses: advantages shaped like tokens are per token."""
    batch = make_batch(32, [1, 0, 2, 1, 0, 2], vocab=9)
    batch = pack(batch)
    batch.advantages = torch.randn(batch.tokens.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert batch.advantages.shape[0] == len(batch.lengths)
    compare(batch, "sequence", backend="triton", loss_agg_mode="seq-mean-token-mean", device=device, **CLIP)


# CPU only: on CUDA the check is a device-side assert, which leaves the CUDA context unusable
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_token_is_an_error(backend):
    batch = make_batch(33, [4, 3], vocab=7)
    args, kwargs = batch.inputs("token")
    tokens = args[1].clone()
    tokens[0, 1] = 7
    with pytest.raises(ValueError, match=r"^tokens must lie in"):
        sspo_loss(batch.logits.detach().float(), tokens, *args[2:], backend=backend, **kwargs)


@TRITON
def test_fused_step_is_deterministic():
    batch = make_batch(34, [9, 12, 5], vocab=13, hole_p=0.2)
    args, kwargs = batch.inputs("subsentence")
    runs = []
    for _ in range(2):
        logits = batch.logits.detach().float().requires_grad_(True)
        out = sspo_loss(logits, *args[1:], backend="triton", **kwargs, **CLIP)
        out.loss.backward()
        runs.append((out.loss, logits.grad, *out.metrics.values()))
    for a, b in zip(*runs):
        assert torch.equal(a, b), "two identical runs differ"
