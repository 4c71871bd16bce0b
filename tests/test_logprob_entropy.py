"""The Triton log-prob / entropy kernels against the float64 reference (docs/loss.md "Token quantities").

On the CPU the kernels run under the Triton interpreter (conftest), so shapes stay small; the heuristic
picks a large BLOCK_V there, and the cases that pass an explicit `config` exercise the multi-block
path (online max rescaling, masked tail) with GPU-sized blocks. Output buffers are NaN-poisoned, so
an element a kernel forgets to write fails the comparison. Every comparison also runs compiled on
CUDA (`device="cuda"`, marked gpu; one seed of the random forward cases); inputs are built on the CPU,
the reference runs there, and the kernels get device copies.
"""

from __future__ import annotations

import math

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _devices import DEVICES, TRITON, grid, on

from reference import naive_logprob_entropy
from sspo_kernels.ops.vocab.triton import logprob_entropy_bwd, logprob_entropy_fwd

pytestmark = TRITON
IGNORE = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS32 = torch.finfo(torch.float32).eps
# Tolerances of docs/loss.md for l_t and H_t: max abs error 1e-5 (fp32 logits), relative 1e-4 (bf16 / fp16 logits)
FWD_TOL = {torch.float32: dict(atol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=1e-4)}
FWD_TOL[torch.float16] = FWD_TOL[torch.bfloat16]
# docs/loss.md "Tolerances": relative-norm error of an fp32 gradient
GRAD_TOL_FP32 = 1e-5


def make_case(n: int, v: int, dtype: torch.dtype, seed: int, *, scale: float = 3.0, drop: float = 0.25):
    """Random logits (rounded to dtype), targets, and a mask with about `drop` rows masked out (token -100)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
    tokens = torch.randint(0, v, (n,), generator=gen)
    mask = torch.rand(n, generator=gen) >= drop
    mask[0] = True  # at least one kept row
    tokens[~mask] = IGNORE
    return logits, tokens, mask


def reference_fwd(logits, tokens, mask, tau):
    """logp, entropy, lse in float64, zero at masked-out rows."""
    logp, entropy = naive_logprob_entropy(logits, tokens, tau)
    lse = torch.logsumexp(logits.double() / tau, dim=-1)
    keep = mask.reshape(logp.shape)
    return tuple(torch.where(keep, t, 0.0).reshape(-1) for t in (logp, entropy, lse))


def reference_grad(logits, tokens, mask, g, e, tau):
    """Autograd of L = sum_t g_t * l_t + e_t * H_t in float64 (g, e zero at masked-out rows)."""
    x = logits.detach().double().requires_grad_(True)
    v = x.shape[-1]
    logp, entropy = naive_logprob_entropy(x.reshape(-1, v), tokens.reshape(-1), tau)
    keep = mask.reshape(-1)
    loss = torch.where(keep, g.double() * logp + e.double() * entropy, 0.0).sum()
    loss.backward()
    return x.grad


def upstream(n: int, mask: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1000)
    g = torch.randn(n, generator=gen) * mask
    e = torch.randn(n, generator=gen) * mask
    return g, e


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |x| (subnormal spacing below the smallest normal), in float64."""
    info = torch.finfo(dtype)
    mantissa_bits = round(-math.log2(info.eps))
    min_exp = round(math.log2(info.tiny))
    _, exp = torch.frexp(x.double().abs())
    return torch.pow(2.0, (exp - 1).clamp(min=min_exp) - mantissa_bits)


def assert_grad_within_ulps(name, actual, logits, tokens, mask, g, e, tau, *, ulps: float = 2.0):
    """Half-precision gradient check: each element within `ulps` of the fp64 value (the interpreter
    truncates f32 -> bf16 instead of rounding, hence 2), plus a bound on the error of its fp32 evaluation
    (16 eps32 times the sum of the magnitudes of its terms, which covers cancellation inside a row)."""
    expected = reference_grad(logits, tokens, mask, g, e, tau)
    v = logits.shape[-1]
    z = logits.double().reshape(-1, v) / tau
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    h = -(p * log_p).sum(-1, keepdim=True)
    g64, e64 = g.double()[:, None], e.double()[:, None]
    onehot = torch.zeros_like(p)
    rows = torch.nonzero(mask.reshape(-1)).squeeze(1)
    onehot[rows, tokens.reshape(-1)[rows]] = 1.0
    terms = g64.abs() * (p + onehot) + e64.abs() * p * (log_p.abs() + h)
    bound = ulps * ulp(expected, actual.dtype) + 16 * EPS32 * terms.reshape(expected.shape) / tau
    assert_close(f"{name} (in units of its bound)", actual.double() / bound, expected / bound, atol=1.0)


def fwd(device, logits, tokens, mask, tau, **launch):
    """The forward launcher on device copies of the inputs; (logp, entropy, lse) back on the CPU."""
    return tuple(t.cpu() for t in logprob_entropy_fwd(*on(device, logits, tokens, mask), tau, **launch))


def bwd(device, logits, tokens, mask, lse, entropy, g, e, tau, **launch):
    """The backward launcher on device copies of the inputs; the gradient back on the CPU."""
    args = on(device, logits, tokens, mask, lse, entropy, g, e)
    extra = dict(zip(launch, on(device, *launch.values())))
    return logprob_entropy_bwd(*args, tau, **extra).cpu()


def check_fwd(logits, tokens, mask, tau, device="cpu", **launch):
    logp, entropy, lse = fwd(device, logits, tokens, mask, tau, **launch)
    logits, tokens, mask = on("cpu", logits, tokens, mask)
    ref = reference_fwd(logits, tokens, mask, tau)
    tol = FWD_TOL[logits.dtype]
    assert_close("logp", logp, ref[0], **tol)
    assert_close("entropy", entropy, ref[1], **tol)
    assert_close("lse", lse, ref[2], atol=1e-5, rtol=1e-6)
    keep = mask.reshape(-1)
    for name, out in (("logp", logp), ("entropy", entropy), ("lse", lse)):
        assert out.dtype == torch.float32 and out.shape == (keep.numel(),)
        assert (out[~keep] == 0).all(), f"{name} is not exactly 0 at masked-out rows"
    return logp, entropy, lse


# ---------------------------------------------------------------- forward

SHAPES = [(1, 1), (7, 17), (33, 1000), (7, 5003)]


SHAPE_IDS = {f"N{n}-V{v}": (n, v) for n, v in SHAPES}
TAUS = {"tau1.0": 1.0, "tau0.7": 0.7}


@grid(("dtype", DTYPES), ("n,v", SHAPE_IDS), ("tau", TAUS), ("seed", [0, 1]), cuda=lambda p: p.seed == 0)
def test_fwd_matches_reference(device, dtype, n, v, tau, seed):
    logits, tokens, mask = make_case(n, v, dtype, seed)
    check_fwd(logits, tokens, mask, tau, device)


BLOCKS = [(256, 1), (1024, 2)]
BLOCK_IDS = {f"BLOCK_V{b}": (b, w) for b, w in BLOCKS}


@grid(("dtype", DTYPES), ("config", BLOCK_IDS), ("scale", {"scale3": 3.0, "scale1e3": 1e3}))
def test_fwd_multi_block(device, dtype, config, scale):
    """V=5003 in several blocks and a masked tail; rows whose max rises block after block, and falls."""
    logits, tokens, mask = make_case(6, 5003, dtype, seed=7, scale=scale)
    ramp = torch.linspace(-scale, scale, 5003).to(dtype)
    logits[1], logits[2] = ramp, ramp.flip(0)
    mask[1:4] = True
    # targets at the row max: l_t is O(1) while lse ~ 1e3, so z_y - lse in fp32 would be off by ~ulp(1e3)
    tokens[1:4] = torch.tensor([5002, 0, int(logits[3].argmax())])
    if scale == 1e3:
        # with tau = 1, z = x is exact; l_t is checked to 1e-5 plus 4 eps32 of its own size (an fp32
        # number near -4000 is only good to 2.4e-4), H_t and the O(1) l_t to 1e-5
        logp, entropy, lse = fwd(device, logits, tokens, mask, 1.0, config=config)
        ref = reference_fwd(logits, tokens, mask, 1.0)
        assert_close("logp", logp, ref[0], atol=1e-5, rtol=4 * EPS32)
        assert_close("entropy", entropy, ref[1], atol=1e-5)
        assert_close("lse", lse, ref[2], rtol=4 * EPS32)
    else:
        check_fwd(logits, tokens, mask, 0.7, device, config=config)


@grid(("dtype", DTYPES))
def test_fwd_large_magnitude_with_temperature(device, dtype):
    """|z| ~ 1.4e3: l_t within a few fp32 ulps of |l_t| (z itself is rounded), H_t at the 1e-5 level."""
    logits, tokens, mask = make_case(7, 1000, dtype, seed=3, scale=1e3)
    logp, entropy, lse = fwd(device, logits, tokens, mask, 0.7, config=(256, 1))
    ref = reference_fwd(logits, tokens, mask, 0.7)
    assert_close("logp", logp, ref[0], atol=1e-5, rtol=8 * EPS32)
    assert_close("entropy", entropy, ref[1], atol=1e-5)
    assert_close("lse", lse, ref[2], rtol=8 * EPS32)


@pytest.mark.parametrize("device", DEVICES)
def test_fwd_vocab_152064(device):
    logits, tokens, mask = make_case(2, 152064, torch.bfloat16, seed=5, drop=0.0)
    check_fwd(logits, tokens, mask, 0.7, device)


@grid(("dtype", DTYPES))
def test_fwd_strided_3d_view(device, dtype):
    """A (B, T, V) slice of a bigger tensor is read in place through its row strides."""
    v = 1000
    big = torch.randn(3, 8, v + 5, dtype=torch.float64).mul(3).to(device, dtype)
    logits = big[:, 1:-1, :v]
    assert not logits.is_contiguous()
    _, tokens, mask = make_case(18, v, dtype, seed=11)
    check_fwd(logits, tokens.view(3, 6), mask.view(3, 6), 0.7, device)


@pytest.mark.parametrize("device", DEVICES)
def test_fwd_nan_propagates_only_in_its_row(device):
    logits, tokens, mask = make_case(5, 300, torch.float32, seed=2, drop=0.0)
    mask[3] = False
    logits[1, 7] = float("nan")  # kept row: every output NaN
    logits[3, 7] = float("nan")  # masked-out row: outputs 0
    logp, entropy, lse = fwd(device, logits, tokens, mask, 1.0, config=(128, 1))
    for name, out in (("logp", logp), ("entropy", entropy), ("lse", lse)):
        assert torch.isnan(out[1]), f"{name} hides a NaN logit"
        assert out[3] == 0
        assert torch.isfinite(out[[0, 2, 4]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_fwd_neg_inf_logits(device):
    """-inf logits (a masked vocabulary) weigh nothing, even filling a whole first block."""
    logits, tokens, mask = make_case(4, 700, torch.float32, seed=4, drop=0.0)
    logits[0, :300] = float("-inf")
    logits[1, ::3] = float("-inf")
    tokens[:2] = torch.tensor([450, 1])
    logp, entropy, lse = fwd(device, logits, tokens, mask, 0.7, config=(128, 1))
    finite = logits.double().masked_fill(torch.isinf(logits), -1e30)
    ref = reference_fwd(finite, tokens, mask, 0.7)
    assert_close("logp", logp, ref[0], atol=1e-5)
    assert_close("entropy", entropy, ref[1], atol=1e-5)
    assert_close("lse", lse, ref[2], atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_fwd_out_of_range_target_gives_nan(device):
    logits, tokens, mask = make_case(3, 50, torch.float32, seed=6, drop=0.0)
    tokens[1] = 50
    tokens[2] = 1 << 40
    logp, entropy, _ = fwd(device, logits, tokens, mask, 1.0)
    assert torch.isnan(logp[1:]).all() and torch.isfinite(logp[0])
    assert torch.isfinite(entropy).all()


@pytest.mark.parametrize("device", DEVICES)
def test_fwd_row_subset(device):
    logits, tokens, mask = make_case(7, 333, torch.float32, seed=8)
    full = fwd(device, logits, tokens, mask, 0.7)
    part = fwd(device, logits, tokens, mask, 0.7, row_start=2, num_rows=3)
    for a, b in zip(full, part):
        assert torch.equal(a[2:5], b[2:5])
        assert torch.isnan(b[:2]).all() and torch.isnan(b[5:]).all()  # poisoned, never written


@pytest.mark.parametrize("device", DEVICES)
def test_fwd_fp64_logits_computed_in_fp32(device):
    logits, tokens, mask = make_case(5, 777, torch.float64, seed=9)
    logp, entropy, _ = fwd(device, logits, tokens, mask, 0.7)
    ref = reference_fwd(logits, tokens, mask, 0.7)
    assert_close("logp", logp, ref[0], atol=1e-5)
    assert_close("entropy", entropy, ref[1], atol=1e-5)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "temperature": 0.0}, "temperature"),
        (lambda a: {**a, "tokens": a["tokens"][:-1]}, "tokens"),
        (lambda a: {**a, "mask": a["mask"][:-1]}, "mask"),
        (lambda a: {**a, "logits": a["logits"][None, None]}, "logits"),
    ],
    ids=["zero-temperature", "short-tokens", "short-mask", "4d-logits"],
)
def test_fwd_rejects_bad_arguments(change, message):
    logits, tokens, mask = make_case(4, 10, torch.float32, seed=0)
    args = change({"logits": logits, "tokens": tokens, "mask": mask, "temperature": 1.0})
    with pytest.raises(ValueError, match=message):
        logprob_entropy_fwd(**args)


# ---------------------------------------------------------------- backward


def run_bwd(logits, tokens, mask, tau, g, e, device="cpu", **launch):
    """Forward then backward on `device`; the gradient back on the CPU."""
    _, entropy, lse = fwd(device, logits, tokens, mask, tau, config=launch.get("config"))
    return bwd(device, logits, tokens, mask, lse, entropy, g, e, tau, **launch)


BWD_SHAPES = [(1, 1), (7, 17), (33, 1000), (7, 5003)]
BWD_SHAPE_IDS = {f"N{n}-V{v}": (n, v) for n, v in BWD_SHAPES}


@grid(("dtype", DTYPES), ("n,v", BWD_SHAPE_IDS), ("tau", TAUS))
def test_bwd_matches_autograd(device, dtype, n, v, tau):
    logits, tokens, mask = make_case(n, v, dtype, seed=n + v)
    g, e = upstream(n, mask, seed=n)
    grad = run_bwd(logits, tokens, mask, tau, g, e, device)
    assert grad.dtype == dtype and grad.shape == logits.shape and grad.is_contiguous()
    assert (grad[~mask] == 0).all()
    if dtype == torch.float32:
        expected = reference_grad(logits, tokens, mask, g, e, tau)
        assert_rel_norm("grad_logits", grad, expected, tol=GRAD_TOL_FP32)
    else:
        assert_grad_within_ulps("grad_logits", grad, logits, tokens, mask, g, e, tau)


WITH_LOGP = {"lse-only": False, "with-logp": True}


@grid(("dtype", DTYPES), ("config", BLOCK_IDS), ("with_logp", WITH_LOGP))
def test_bwd_multi_block(device, dtype, config, with_logp):
    logits, tokens, mask = make_case(5, 5003, dtype, seed=12)
    g, e = upstream(5, mask, seed=12)
    logp, entropy, lse = fwd(device, logits, tokens, mask, 0.7, config=config)
    extra = {"logp": logp} if with_logp else {}
    grad = bwd(device, logits, tokens, mask, lse, entropy, g, e, 0.7, config=config, **extra)
    if dtype == torch.float32:
        assert_rel_norm("grad_logits", grad, reference_grad(logits, tokens, mask, g, e, 0.7), tol=GRAD_TOL_FP32)
    else:
        assert_grad_within_ulps("grad_logits", grad, logits, tokens, mask, g, e, 0.7)


@grid(("with_logp", WITH_LOGP))
def test_bwd_large_magnitude(device, with_logp):
    """|z| ~ 1e3 with likely targets (the top logit or the runner-up, as sampled tokens are). From lse
    alone, p carries the rounding of the fp32 lse (~ulp(1e3) = 6e-5), so the gradient is good to a few
    eps32 * max|z|; with the forward's logp, p is taken relative to the target and meets the contract's 1e-5."""
    logits, tokens, mask = make_case(7, 1000, torch.float32, seed=13, scale=1e3)
    top2 = logits.topk(2, dim=-1).indices
    tokens = torch.where(mask, top2[:, 0], tokens)
    tokens[0] = top2[0, 1]
    g, e = upstream(7, mask, seed=13)
    logp, entropy, lse = fwd(device, logits, tokens, mask, 1.0, config=(256, 1))
    extra = {"logp": logp} if with_logp else {}
    grad = bwd(device, logits, tokens, mask, lse, entropy, g, e, 1.0, config=(256, 1), **extra)
    expected = reference_grad(logits, tokens, mask, g, e, 1.0)
    tol = GRAD_TOL_FP32 if with_logp else 4 * EPS32 * logits.abs().max().item()
    assert_rel_norm("grad_logits", grad, expected, tol=tol)


@grid(("dtype", {"bf16": torch.bfloat16, "fp16": torch.float16}))
def test_bwd_target_entry_when_p_near_one(device, dtype):
    """p_y = 0.999: the target entry g * (1 - p) = 1e-3 g is formed in fp32, not from a rounded p."""
    v, n = 1000, 3
    logits = torch.zeros(n, v, dtype=dtype)
    tokens = torch.tensor([5, 600, 999])
    logits[torch.arange(n), tokens] = math.log(0.999 / 0.001 * (v - 1))
    mask = torch.ones(n, dtype=torch.bool)
    g = torch.tensor([1.0, -2.0, 0.5])
    e = torch.zeros(n)
    grad = run_bwd(logits, tokens, mask, 1.0, g, e, device)
    p_y = torch.softmax(logits.double(), -1)[torch.arange(n), tokens]
    assert ((p_y - 0.999).abs() < 2e-3).all()
    target = grad[torch.arange(n), tokens]
    assert_close("target entry", target, g.double() * (1 - p_y), rtol=2 * torch.finfo(dtype).eps)
    assert_grad_within_ulps("grad_logits", grad, logits, tokens, mask, g, e, 1.0)


@grid(("dtype", DTYPES))
def test_bwd_inplace_matches_out_of_place(device, dtype):
    logits, tokens, mask = make_case(9, 1000, dtype, seed=14)
    g, e = upstream(9, mask, seed=14)
    logits, tokens, mask, g, e = on(device, logits, tokens, mask, g, e)
    before = logits.clone()
    _, entropy, lse = logprob_entropy_fwd(logits, tokens, mask, 0.7)
    out_of_place = logprob_entropy_bwd(logits, tokens, mask, lse, entropy, g, e, 0.7)
    assert torch.equal(logits, before), "the out-of-place backward modified its input"
    ptr = logits.data_ptr()
    inplace = logprob_entropy_bwd(logits, tokens, mask, lse, entropy, g, e, 0.7, inplace=True)
    assert inplace.data_ptr() == ptr and logits.data_ptr() == ptr
    assert torch.equal(inplace, out_of_place)
    assert torch.equal(logits, out_of_place)


@grid(("inplace", {"out-of-place": False, "inplace": True}))
def test_bwd_strided_3d_view(device, inplace):
    """(B, T, V) slice of a bigger buffer: read through its strides; in place, nothing outside the view
    is touched; out of place, a contiguous gradient."""
    v = 1000
    big = torch.randn(3, 8, v + 5, dtype=torch.float64).mul(3).to(device, torch.bfloat16)
    logits = big[:, 1:-1, :v]
    _, tokens, mask = make_case(18, v, torch.bfloat16, seed=15)
    g, e = upstream(18, mask, seed=15)
    tokens, mask, g, e = on(device, tokens.view(3, 6), mask.view(3, 6), g, e)
    outside = big.clone()
    outside[:, 1:-1, :v] = 0
    reference_logits = logits.clone()
    _, entropy, lse = logprob_entropy_fwd(logits, tokens, mask, 0.7)
    grad = logprob_entropy_bwd(logits, tokens, mask, lse, entropy, g, e, 0.7, inplace=inplace)
    assert grad.shape == (3, 6, v)
    if inplace:
        assert grad is logits
        rest = big.clone()
        rest[:, 1:-1, :v] = 0
        assert torch.equal(rest, outside), "the in-place backward wrote outside the view"
    else:
        assert grad.is_contiguous() and torch.equal(logits, reference_logits)
    cpu = on("cpu", reference_logits, tokens, mask, g, e)
    assert_grad_within_ulps("grad_logits", grad.cpu(), *cpu, 0.7)


@pytest.mark.parametrize("device", DEVICES)
def test_bwd_without_entropy_grad_equals_zero_entropy_grad(device):
    logits, tokens, mask = make_case(7, 1000, torch.float32, seed=16)
    g, _ = upstream(7, mask, seed=16)
    _, entropy, lse = fwd(device, logits, tokens, mask, 0.7)
    without = bwd(device, logits, tokens, mask, lse, None, g, None, 0.7)
    zeros = bwd(device, logits, tokens, mask, lse, entropy, g, torch.zeros(7), 0.7)
    assert torch.equal(without, zeros)
    expected = reference_grad(logits, tokens, mask, g, torch.zeros(7), 0.7)
    assert_rel_norm("grad_logits", without, expected, tol=GRAD_TOL_FP32)


@pytest.mark.parametrize("device", DEVICES)
def test_bwd_nan_and_neg_inf_logits(device):
    """A NaN logit in a kept row makes that row's gradient NaN; in a masked-out row, zeros.
    -inf logits get exactly zero gradient and leave the rest exact."""
    logits, tokens, mask = make_case(4, 700, torch.float32, seed=17, drop=0.0)
    mask[2] = False
    logits[0, :300] = float("-inf")
    tokens[0] = 450
    logits[1, 9] = float("nan")
    logits[2, 9] = float("nan")
    g, e = upstream(4, mask, seed=17)
    grad = run_bwd(logits, tokens, mask, 0.7, g, e, device, config=(128, 1))
    assert torch.isnan(grad[1]).all()
    assert (grad[2] == 0).all()
    assert (grad[0, :300] == 0).all()
    keep = torch.tensor([0, 3])
    finite = logits[keep].double().masked_fill(torch.isinf(logits[keep]), -1e30)
    expected = reference_grad(finite, tokens[keep], mask[keep], g[keep], e[keep], 0.7)
    assert_rel_norm("grad_logits", grad[keep], expected, tol=GRAD_TOL_FP32)


@pytest.mark.parametrize("device", DEVICES)
def test_bwd_row_subset_inplace(device):
    logits, tokens, mask = make_case(6, 400, torch.float32, seed=18, drop=0.0)
    g, e = upstream(6, mask, seed=18)
    logits, tokens, mask, g, e = on(device, logits, tokens, mask, g, e)
    _, entropy, lse = logprob_entropy_fwd(logits, tokens, mask, 1.0)
    full = logprob_entropy_bwd(logits, tokens, mask, lse, entropy, g, e, 1.0)
    before = logits.clone()
    logprob_entropy_bwd(logits, tokens, mask, lse, entropy, g, e, 1.0, inplace=True, row_start=4, num_rows=2)
    assert torch.equal(logits[:4], before[:4])
    assert torch.equal(logits[4:], full[4:])


@pytest.mark.parametrize("device", DEVICES)
def test_non_unit_last_stride_is_copied_and_refused_in_place(device):
    base = torch.randn(300, 6, dtype=torch.float64).mul(3).float()
    _, tokens, mask = make_case(6, 300, torch.float32, seed=19)
    g, e = upstream(6, mask, seed=19)
    cpu_logits = base.t()  # (6, 300) with last stride 6
    logits = base.to(device).t()
    check_fwd(logits, tokens, mask, 0.7, device)
    grad = run_bwd(logits, tokens, mask, 0.7, g, e, device)
    assert_rel_norm("grad_logits", grad, reference_grad(cpu_logits, tokens, mask, g, e, 0.7), tol=GRAD_TOL_FP32)
    _, entropy, lse = logprob_entropy_fwd(*on(device, logits, tokens, mask), 0.7)
    with pytest.raises(ValueError, match="inplace"):
        logprob_entropy_bwd(*on(device, logits, tokens, mask), lse, entropy, *on(device, g, e), 0.7, inplace=True)
