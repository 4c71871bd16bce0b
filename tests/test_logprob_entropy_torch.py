"""The chunked PyTorch vocabulary pass against the float64 reference (docs/loss.md "Token quantities").

Masked-out rows carry token -100 and NaN logits in every case, so a row that leaks into an output
shows up as a NaN. Output buffers are NaN-poisoned (conftest), so an element that a chunk forgets to
write fails too. Chunk sizes are chosen not to divide N.
"""

from __future__ import annotations

import math

import pytest
import torch
from _assert import assert_close, assert_rel_norm, ulps
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.memory import peak_extra_bytes
from reference import naive_logprob_entropy
from sspo_kernels.ops.vocab.torch import (
    logprob_entropy_bwd,
    logprob_entropy_fwd,
    vocab_chunk_rows,
)

IGNORE = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# docs/loss.md "Tolerances": l_t and H_t within 1e-5 absolute for fp32 logits, 1e-4 relative for bf16 / fp16 logits.
FWD_TOL = {
    torch.float32: dict(atol=1e-5),
    torch.bfloat16: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=1e-5, rtol=1e-4),
}
LSE_TOL = dict(atol=1e-5, rtol=torch.finfo(torch.float32).eps)  # lse itself is rounded to fp32
GRAD_REL_FP32 = 1e-5  # docs/loss.md "Tolerances": relative-norm error of an fp32 gradient
pytestmark = pytest.mark.usefixtures("one_thread")
GRAD_ULPS = 2  # bf16 / fp16 gradients: distance to the correctly rounded float64 gradient


def make_case(n: int, v: int, dtype: torch.dtype, seed: int, *, scale: float = 3.0, drop: float = 0.3):
    """Logits in `dtype`, targets and mask; masked-out rows get token -100 and NaN logits."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
    tokens = torch.randint(0, v, (n,), generator=gen)
    mask = torch.rand(n, generator=gen) >= drop
    mask[:1] = True
    tokens[~mask] = IGNORE
    logits[~mask] = float("nan")
    g = torch.randn(n, generator=gen, dtype=torch.float64).float()
    e = torch.randn(n, generator=gen, dtype=torch.float64).float()
    return logits, tokens, mask, g, e


def clean(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The logits with masked-out rows zeroed, for the reference (which sees every row)."""
    return torch.where(mask.reshape(*logits.shape[:-1], 1), logits, 0)


def reference_fwd(logits, tokens, mask, tau):
    """logp, entropy, lse in float64, (N,), zero at masked-out rows."""
    x = clean(logits, mask).reshape(-1, logits.shape[-1])
    logp, entropy = naive_logprob_entropy(x, tokens.reshape(-1), tau)
    lse = torch.logsumexp(x.double() / tau, dim=-1)
    keep = mask.reshape(-1)
    return tuple(torch.where(keep, t, 0.0) for t in (logp, entropy, lse))


def reference_grad(logits, tokens, mask, g, e, tau):
    """Autograd of L = sum over masked-in t of g_t * l_t + e_t * H_t, in float64."""
    x = clean(logits, mask).double().requires_grad_(True)
    logp, entropy = naive_logprob_entropy(x.reshape(-1, x.shape[-1]), tokens.reshape(-1), tau)
    loss = torch.where(mask.reshape(-1), g.double() * logp + e.double() * entropy, 0.0).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaN included."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def check_fwd(out, logits, tokens, mask, tau):
    tols = (FWD_TOL[logits.dtype], FWD_TOL[logits.dtype], LSE_TOL)
    for name, got, want, tol in zip(("logp", "entropy", "lse"), out, reference_fwd(logits, tokens, mask, tau), tols):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert_close(name, got, want, **tol)
        assert (got[~mask.reshape(-1)] == 0).all(), f"{name}: masked-out rows must be exactly 0"


def check_grad(grad, logits, tokens, mask, g, e, tau):
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    want = reference_grad(logits, tokens, mask, g, e, tau)
    if logits.dtype == torch.float32:
        assert_rel_norm("dlogits", grad, want, tol=GRAD_REL_FP32)
    else:
        assert_close("dlogits (ulps)", ulps(grad, want), torch.zeros_like(want), atol=GRAD_ULPS)
    dropped = grad.reshape(-1, grad.shape[-1])[~mask.reshape(-1)]
    assert (dropped == 0).all(), "dlogits: masked-out rows must be exactly 0"


def run_both(logits, tokens, mask, g, e, tau, **kw):
    """Forward, then the backward from its lse and entropy; checks both against the reference."""
    logp, entropy, lse, _ = logprob_entropy_fwd(logits, tokens, mask, tau, **kw)
    check_fwd((logp, entropy, lse), logits, tokens, mask, tau)
    grad = logprob_entropy_bwd(logits, tokens, mask, lse, entropy, g, e, tau, **kw)
    check_grad(grad, logits, tokens, mask, g, e, tau)
    return logp, entropy, lse, grad


# (N, V, chunk_size): chunk sizes that do not divide N, and the default heuristic
SHAPES = [
    (1, 1, None),
    (1, 17, None),
    (7, 1, 3),
    (7, 17, 3),
    (33, 1000, 5),
    (33, 5003, None),
    (100, 17, 7),
    (100, 1000, None),
    (100, 5003, 16),
]


@pytest.mark.parametrize("seed,tau", [(0, 1.0), (1, 0.7)], ids=["seed0-tau1", "seed1-tau0.7"])
@pytest.mark.parametrize("n,v,chunk", SHAPES, ids=[f"N{n}-V{v}-chunk{c or 'auto'}" for n, v, c in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_matches_reference(dtype, n, v, chunk, seed, tau):
    run_both(*make_case(n, v, dtype, seed), tau, chunk_size=chunk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qwen_sized_vocab(dtype):
    """V = 152064 (Qwen2): a handful of rows per chunk by default, so 7 rows take several chunks."""
    assert vocab_chunk_rows(152064, dtype) < 7
    run_both(*make_case(7, 152064, dtype, seed=5), 0.7)


def test_float64_logits_are_computed_in_fp32():
    logits, tokens, mask, g, e = make_case(9, 300, torch.float64, seed=2)
    logp, entropy, lse, _ = logprob_entropy_fwd(logits, tokens, mask, 1.0, chunk_size=4)
    for name, got, want in zip(
        ("logp", "entropy", "lse"), (logp, entropy, lse), reference_fwd(logits, tokens, mask, 1.0)
    ):
        assert got.dtype == torch.float32
        assert_close(name, got, want, **(LSE_TOL if name == "lse" else FWD_TOL[torch.float32]))
    grad = logprob_entropy_bwd(logits, tokens, mask, lse, entropy, g, e, 1.0, chunk_size=4)
    assert grad.dtype == torch.float64
    assert_rel_norm("dlogits", grad, reference_grad(logits, tokens, mask, g, e, 1.0), tol=GRAD_REL_FP32)


def _strided(kind: str, dtype: torch.dtype) -> torch.Tensor:
    """A (B, T, V) = (3, 5, 40) view whose rows are not one (N, V) matrix, a plain one, or a (15, 40)
    matrix with a row stride longer than V."""
    gen = torch.Generator().manual_seed(11)
    if kind == "2d-padded-rows":
        return (torch.randn(15, 43, generator=gen) * 3).to(dtype)[:, :40]
    if kind == "shifted-slice":  # logits[:, :-1] of a longer batch, with padded vocab columns
        return (torch.randn(3, 6, 43, generator=gen) * 3).to(dtype)[:, :-1, :40]
    if kind == "batch-transposed":  # (T, B, V) storage seen as (B, T, V)
        return (torch.randn(5, 3, 40, generator=gen) * 3).to(dtype).transpose(0, 1)
    return (torch.randn(3, 5, 40, generator=gen) * 3).to(dtype)


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("kind", ["contiguous", "shifted-slice", "batch-transposed", "2d-padded-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batched_views(dtype, kind, inplace):
    logits = _strided(kind, dtype)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 40, (3, 5), generator=gen)
    mask = torch.rand(3, 5, generator=gen) > 0.3
    tokens[~mask] = IGNORE
    logits[~mask.reshape(logits.shape[:-1])] = float("nan")
    g, e = torch.randn(15, generator=gen), torch.randn(15, generator=gen)
    storage = logits._base if logits._base is not None else logits
    before = storage.clone()
    want = reference_grad(logits, tokens, mask, g, e, 0.7)

    logp, entropy, lse, _ = logprob_entropy_fwd(logits, tokens.reshape(-1), mask.reshape(-1), 0.7, chunk_size=4)
    check_fwd((logp, entropy, lse), logits, tokens, mask, 0.7)
    grad = logprob_entropy_bwd(
        logits, tokens.reshape(-1), mask.reshape(-1), lse, entropy, g, e, 0.7, inplace=inplace, chunk_size=4
    )
    assert grad.shape == logits.shape
    if dtype == torch.float32:
        assert_rel_norm("dlogits", grad, want, tol=GRAD_REL_FP32)
    else:
        assert_close("dlogits (ulps)", ulps(grad, want), torch.zeros_like(want), atol=GRAD_ULPS)
    outside = torch.ones_like(storage, dtype=torch.bool)  # storage elements that are not in the view
    outside.as_strided(logits.shape, logits.stride(), logits.storage_offset()).fill_(False)
    if inplace:
        assert grad.data_ptr() == logits.data_ptr()
    else:
        outside[...] = True
    assert same_bits(storage[outside], before[outside]), "the backward wrote where it must not"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_inplace_equals_out_of_place(dtype):
    logits, tokens, mask, g, e = make_case(37, 1000, dtype, seed=4)
    before = logits.clone()
    _, entropy, lse, _ = logprob_entropy_fwd(logits, tokens, mask, 0.7, chunk_size=6)
    fresh = logprob_entropy_bwd(logits, tokens, mask, lse, entropy, g, e, 0.7, chunk_size=6)
    assert same_bits(logits, before), "the out-of-place backward modified its input"
    assert fresh.data_ptr() != logits.data_ptr()
    ptr = logits.data_ptr()
    same = logprob_entropy_bwd(logits, tokens, mask, lse, entropy, g, e, 0.7, chunk_size=6, inplace=True)
    assert same.data_ptr() == ptr and same is logits
    assert same_bits(same, fresh)


def test_fully_masked_batch_gives_zeros():
    logits, tokens, mask, g, e = make_case(6, 50, torch.float32, seed=6)
    mask[:] = False
    tokens[:] = IGNORE
    logits[:] = float("nan")
    outs = logprob_entropy_fwd(logits, tokens, mask, 1.0, chunk_size=4)
    for t in outs[:3]:
        assert torch.equal(t, torch.zeros(6))
    grad = logprob_entropy_bwd(logits, tokens, mask, *outs[2:0:-1], g, e, 1.0, chunk_size=4)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_bad_chunk_size(chunk):
    logits, tokens, mask, _, _ = make_case(4, 10, torch.float32, seed=0)
    with pytest.raises(ValueError, match="chunk_size"):
        logprob_entropy_fwd(logits, tokens, mask, 1.0, chunk_size=chunk)


def test_empty_batch():
    logits = torch.randn(0, 11)
    tokens, mask = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
    logp, entropy, lse, _ = logprob_entropy_fwd(logits, tokens, mask, 1.0)
    assert logp.shape == entropy.shape == lse.shape == (0,)
    grad = logprob_entropy_bwd(logits, tokens, mask, lse, entropy, lse, lse, 1.0)
    assert grad.shape == (0, 11)


@pytest.mark.parametrize("offset", [1e4, -1e4], ids=["plus1e4", "minus1e4"])
def test_large_magnitude_logits(offset):
    """|z| ~ 1e4: lse - E[z] would lose ~1e-3 to cancellation; shifted values lose nothing."""
    logits, tokens, mask, g, e = make_case(20, 1000, torch.float32, seed=7)
    logits = logits + offset
    run_both(logits, tokens, mask, g, e, 1.0, chunk_size=6)


def test_dominant_logit_bf16_target_entry():
    """p_y = 0.999: the target entry g (1 - p_y) / tau must be formed in fp32, then rounded once."""
    n, v = 8, 1000
    logits, tokens, mask, g, e = make_case(n, v, torch.bfloat16, seed=8, scale=0.5, drop=0.0)
    rows = torch.arange(n)
    rest = torch.logsumexp(logits.double(), -1)  # ~ the lse of the other entries
    logits[rows, tokens] = (rest + math.log(999.0)).to(torch.bfloat16)
    logp, _, _, grad = run_both(logits, tokens, mask, g, e, 1.0, chunk_size=3)
    p_target = logp.exp()
    assert (p_target > 0.998).all() and (p_target < 0.9995).all()
    want = reference_grad(logits, tokens, mask, g, e, 1.0)
    got_t, want_t = grad[rows, tokens], want[rows, tokens]
    assert_close("dlogits at target (ulps)", ulps(got_t, want_t), torch.zeros(n, dtype=torch.float64), atol=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_logits_propagate(bad):
    logits, tokens, mask, g, e = make_case(10, 64, torch.float32, seed=9)
    hit = [1, 4]  # forced masked-in
    mask[hit] = True
    tokens[hit] = 3
    logits[hit] = torch.randn(2, 64)
    logits[hit, 17] = bad
    logp, entropy, lse, _ = logprob_entropy_fwd(logits, tokens, mask, 1.0, chunk_size=3)
    grad = logprob_entropy_bwd(logits, tokens, mask, lse, entropy, g, e, 1.0, chunk_size=3)
    others = [i for i in range(10) if i not in hit]
    for name, t in (("logp", logp), ("entropy", entropy), ("lse", lse)):
        assert torch.isnan(t[hit]).all(), f"{name}: a non-finite logit must give NaN"
        assert torch.isfinite(t[others]).all(), f"{name}: rows without one must stay finite"
    assert torch.isnan(grad[hit]).all(), "dlogits: every entry of the row must be NaN"
    keep = mask.clone()
    keep[hit] = False
    want = reference_grad(logits, tokens, keep, g, e, 1.0)
    assert_rel_norm("dlogits (finite rows)", grad[others], want[others], tol=GRAD_REL_FP32)


@pytest.mark.parametrize("drop", [0.3, 0.0], ids=["padded", "no-padding"])
@pytest.mark.parametrize("given_rows", [True, False], ids=["forward-rows", "rows-recomputed"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("tau", [1.0, 0.7], ids=["tau1", "tau0.7"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_without_entropy_term(dtype, tau, inplace, given_rows, drop):
    """grad_entropy=None (the entropy used detached) takes its own, shorter backward from the forward's
    row statistics (one pass fewer when no row is masked out): same gradient as e = 0, masked-out
    NaN rows exactly 0, a -inf logit (at a target too) finite."""
    logits, tokens, mask, g, _ = make_case(37, 1000, dtype, seed=12, drop=drop)
    assert bool(mask.all()) == (drop == 0.0)
    mask[1], tokens[1], logits[1] = True, 7, 3 * torch.randn(1000)
    logits[0, tokens[0]] = -math.inf
    logits[1, 5] = -math.inf
    _, entropy, lse, rows = logprob_entropy_fwd(logits, tokens, mask, tau, chunk_size=6)
    grad = logprob_entropy_bwd(
        logits.clone() if inplace else logits, tokens, mask, lse, entropy, g, None, tau, chunk_size=6,
        inplace=inplace, rows=rows if given_rows else None,
    )  # fmt: skip
    assert torch.isfinite(grad).all()
    check_grad(grad, logits, tokens, mask, g, torch.zeros_like(g), tau)


@pytest.mark.parametrize("drop", [0.3, 0.0], ids=["padded", "no-padding"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_logits_propagate_without_entropy_term(bad, drop):
    logits, tokens, mask, g, _ = make_case(10, 64, torch.float32, seed=9, drop=drop)
    hit = [1, 4]
    mask[hit], tokens[hit] = True, 3
    logits[hit] = torch.randn(2, 64)
    logits[hit, 17] = bad
    _, entropy, lse, rows = logprob_entropy_fwd(logits, tokens, mask, 1.0, chunk_size=3)
    grad = logprob_entropy_bwd(logits, tokens, mask, lse, entropy, g, None, 1.0, chunk_size=3, rows=rows)
    assert torch.isnan(grad[hit]).all(), "dlogits: every entry of the row must be NaN"
    others = [i for i in range(10) if i not in hit]
    keep = mask.clone()
    keep[hit] = False
    want = reference_grad(logits, tokens, keep, g, torch.zeros_like(g), 1.0)
    assert_rel_norm("dlogits (finite rows)", grad[others], want[others], tol=GRAD_REL_FP32)


def test_vocab_chunk_rows():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        sizes = [vocab_chunk_rows(v, dtype) for v in (1, 17, 1000, 32000, 152064, 10**7)]
        assert all(s >= 1 for s in sizes) and sizes == sorted(sizes, reverse=True)
        assert sizes[-1] == 1
        # the fp32 temporaries of one chunk (two (C, V) buffers) stay a few MB
        assert vocab_chunk_rows(32000, dtype) * 32000 * 4 * 2 <= 8 * 2**20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_peak_memory_is_two_chunk_buffers(dtype):
    """Peak extra memory (profiler replay): two fp32 (chunk, V) temporaries, plus the gradient buffer
    when not in place. Nothing (N, V)-sized in fp32 is ever alive."""
    n, v, chunk = 256, 4096, 16
    logits, tokens, mask, g, e = make_case(n, v, dtype, seed=10)
    chunk_buf = chunk * v * 4
    slack = 64 * 2**10  # the (N,) per-row vectors
    grad_bytes = logits.numel() * logits.element_size()
    _, entropy, lse, _ = logprob_entropy_fwd(logits, tokens, mask, 1.0, chunk_size=chunk)
    fwd = peak_extra_bytes(lambda: logprob_entropy_fwd(logits, tokens, mask, 1.0, chunk_size=chunk))
    assert fwd <= 2 * chunk_buf + slack, fwd
    bwd_args = (logits, tokens, mask, lse, entropy, g, e, 1.0)
    bwd = peak_extra_bytes(lambda: logprob_entropy_bwd(*bwd_args, chunk_size=chunk))
    assert bwd <= grad_bytes + 2 * chunk_buf + slack, bwd
    inplace = peak_extra_bytes(lambda: logprob_entropy_bwd(*bwd_args, chunk_size=chunk, inplace=True))
    assert inplace <= 2 * chunk_buf + slack, inplace


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.integers(0, 40),
    v=st.integers(1, 300),
    dtype=st.sampled_from(list(DTYPES.values())),
    chunk=st.one_of(st.none(), st.integers(1, 50)),
    drop=st.floats(0.0, 1.0),
    tau=st.sampled_from([0.5, 0.7, 1.0, 2.0]),
    batched=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(n, v, dtype, chunk, drop, tau, batched, seed):
    logits, tokens, mask, g, e = make_case(n, v, dtype, seed, drop=drop)
    if n and drop == 1.0:  # make_case keeps row 0; here let a batch be fully masked out
        mask[0], tokens[0], logits[0] = False, IGNORE, float("nan")
    if batched and n % 2 == 0:
        logits, tokens, mask = logits.reshape(2, n // 2, v), tokens.reshape(2, n // 2), mask.reshape(2, n // 2)
    run_both(logits, tokens.reshape(-1), mask.reshape(-1), g, e, tau, chunk_size=chunk)


def test_compiled_chunks_match_eager():
    """The torch.compile path (opt-in) agrees with the reference and with the eager path."""
    logits, tokens, mask, g, e = make_case(21, 300, torch.bfloat16, seed=12)
    eager = run_both(logits, tokens, mask, g, e, 0.7, chunk_size=8)
    compiled = run_both(logits, tokens, mask, g, e, 0.7, chunk_size=8, use_compile=True)
    for name, a, b in zip(("logp", "entropy", "lse"), compiled[:3], eager[:3]):
        assert_close(f"{name} compiled vs eager", a, b, atol=2e-6, rtol=1e-6)
