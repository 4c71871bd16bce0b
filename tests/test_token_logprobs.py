"""`token_logprobs` (from logits) against the float64 reference, in both backends (docs/loss.md "Token quantities").

Values at docs/loss.md's tolerances (1e-5 absolute for fp32 logits, 1e-4 relative for bf16 / fp16); the logits'
gradient for random upstream gradients of both outputs (and with either one None) at 1e-5 relative norm in fp32
and within 2 ulps in bf16 / fp16. Token id -100 is an ignored position: outputs 0, zero gradient. The Triton
backend runs in the interpreter on the CPU (tens of rows, V of a few thousand at most).
"""

from __future__ import annotations

import math

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from test_logprob_entropy import assert_grad_within_ulps

from bench.launches import DeviceWork
from reference import naive_logprob_entropy
from sspo_kernels import token_logprobs
from sspo_kernels._utils import POISON_ENV

pytestmark = pytest.mark.usefixtures("one_thread")

IGNORE = -100
BACKENDS = ("torch", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP32_ATOL, LOW_RTOL, GRAD_FP32 = 1e-5, 1e-4, 1e-5


def make_logits(shape: tuple[int, ...], v: int, dtype: torch.dtype, seed: int, *, scale: float = 3.0, drop=0.25):
    """Random logits (rounded to dtype) and tokens with about `drop` of them -100."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
    tokens = torch.randint(0, v, shape, generator=gen)
    tokens[torch.rand(shape, generator=gen) < drop] = IGNORE
    return logits, tokens


def upstream(shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 99)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def reference(logits, tokens, tau: float, g=None, e=None):
    """(logp, entropy) in float64, 0 at -100, and the logits' gradient of sum(g * logp + e * entropy)."""
    x = logits.detach().double().requires_grad_(True)
    logp, ent = naive_logprob_entropy(x, tokens, tau)
    keep = tokens != IGNORE
    logp, ent = torch.where(keep, logp, 0.0), torch.where(keep, ent, 0.0)
    grad = None
    if g is not None or e is not None:
        total = sum((u.double() * t).sum() for u, t in ((g, logp), (e, ent)) if u is not None)
        (grad,) = torch.autograd.grad(total, x)
    return logp.detach(), ent.detach(), grad


def check_values(logp, ent, ref_logp, ref_ent, dtype):
    tol = dict(atol=FP32_ATOL) if dtype == torch.float32 else dict(atol=1e-6, rtol=LOW_RTOL)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert_close("logprobs", logp, ref_logp, **tol)
    assert_close("entropy", ent, ref_ent, **tol)


def check_grad(grad, logits, tokens, tau, g, e):
    _, _, want = reference(logits, tokens, tau, g, e)
    if logits.dtype == torch.float32:
        assert_rel_norm("dlogits", grad, want, tol=GRAD_FP32)
    else:
        v = logits.shape[-1]
        zero = torch.zeros(tokens.numel())
        flat_g = zero if g is None else g.reshape(-1) * (tokens.reshape(-1) != IGNORE)
        flat_e = zero if e is None else e.reshape(-1) * (tokens.reshape(-1) != IGNORE)
        keep = tokens.reshape(-1) != IGNORE
        assert_grad_within_ulps(
            "dlogits", grad.reshape(-1, v), logits.reshape(-1, v), tokens.reshape(-1), keep, flat_g, flat_e, tau
        )


# ---------------------------------------------------------------- values and gradients

CASES = {  # name: (token shape, V)
    "padded": ((3, 7), 41),
    "flat": ((19,), 1003),
    "one-row": ((1,), 5),
    "uneven": ((2, 5), 2053),
}


# every layout once, every upstream form (both, or one of them None) for every backend and dtype
UPSTREAMS = {"padded": "both", "flat": "logp-only", "one-row": "both", "uneven": "entropy-only"}


@pytest.mark.parametrize(("case", "upstreams"), UPSTREAMS.items(), ids=[f"{c}-{u}" for c, u in UPSTREAMS.items()])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_gradients(backend, dtype, case, upstreams):
    shape, v = CASES[case]
    seed = hash((case, upstreams)) % 1000
    for tau in (1.0, 0.7):
        logits, tokens = make_logits(shape, v, dtype, seed)
        before = logits.clone()
        x = logits.clone().requires_grad_(True)
        logp, ent = token_logprobs(x, tokens, temperature=tau, backend=backend)
        assert logp.shape == tokens.shape and ent.shape == tokens.shape
        ref_logp, ref_ent, _ = reference(logits, tokens, tau)
        check_values(logp, ent, ref_logp, ref_ent, dtype)
        assert (logp[tokens == IGNORE] == 0).all() and (ent[tokens == IGNORE] == 0).all()
        g, e = upstream(shape, seed)
        g = None if upstreams == "entropy-only" else g
        e = None if upstreams == "logp-only" else e
        outs = [(o, u) for o, u in ((logp, g), (ent, e)) if u is not None]
        torch.autograd.backward([o for o, _ in outs], [u for _, u in outs])
        check_grad(x.grad, logits, tokens, tau, g, e)
        assert (x.grad[tokens == IGNORE] == 0).all(), "an ignored position got a gradient"
        assert torch.equal(x.detach(), before), "the logits were modified"


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend):
    """logits[:, :-1] of a longer batch (rows not viewable as one matrix), a last stride other than 1
    (copied), and strided tokens: the same numbers as contiguous copies."""
    full, tokens_full = make_logits((3, 9), 301, torch.float32, seed=5)
    column_major = full.transpose(0, 2).contiguous().transpose(0, 2)  # last stride 27
    views = {
        "shifted": (full[:, :-1], tokens_full[:, 1:]),
        "column-major": (column_major[:, ::2], tokens_full.t().contiguous().t()[:, ::2]),
    }
    for name, (logits, tokens) in views.items():
        x = logits.detach().requires_grad_(True)
        logp, ent = token_logprobs(x, tokens, temperature=0.9, backend=backend)
        g, e = upstream(tokens.shape, 3)
        torch.autograd.backward([logp, ent], [g, e])
        ref_logp, ref_ent, want = reference(logits.contiguous(), tokens.contiguous(), 0.9, g, e)
        assert_close(f"{name} logprobs", logp, ref_logp, atol=FP32_ATOL)
        assert_close(f"{name} entropy", ent, ref_ent, atol=FP32_ATOL)
        assert_rel_norm(f"{name} dlogits", x.grad, want, tol=GRAD_FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_into_logits(backend):
    logits, tokens = make_logits((4, 6), 97, torch.float32, seed=2)
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0  # not a leaf: autograd hands the buffer on
    logp, ent = token_logprobs(x, tokens, backend=backend, inplace_backward=True)
    g, e = upstream(tokens.shape, 4)
    torch.autograd.backward([logp, ent], [g, e])
    assert_rel_norm("dlogits", leaf.grad, reference(logits, tokens, 1.0, g, e)[2], tol=GRAD_FP32)
    assert torch.equal(x.detach(), leaf.grad), "the gradient is not the logits buffer"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_entropy_false(backend):
    """Under no_grad nothing is recorded (no graph, the same numbers); entropy=False returns None."""
    logits, tokens = make_logits((2, 5), 53, torch.float32, seed=8)
    x = logits.clone().requires_grad_(True)
    with torch.no_grad():
        logp, ent = token_logprobs(x, tokens, backend=backend)
    assert logp.grad_fn is None and ent.grad_fn is None and not logp.requires_grad
    with_grad = token_logprobs(x, tokens, backend=backend)
    assert torch.equal(logp, with_grad[0].detach()) and torch.equal(ent, with_grad[1].detach())
    only, none = token_logprobs(x, tokens, backend=backend, entropy=False)
    assert none is None and torch.equal(only.detach(), logp)
    only.sum().backward()
    assert_rel_norm("dlogits", x.grad, reference(logits, tokens, 1.0, torch.ones(2, 5))[2], tol=GRAD_FP32)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_all_ignored_and_nan(backend):
    x = torch.randn(0, 11, requires_grad=True)
    logp, ent = token_logprobs(x, torch.zeros(0, dtype=torch.long), backend=backend)
    assert logp.shape == (0,) and ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert x.grad.shape == (0, 11)
    y = torch.full((2, 3, 11), float("nan"), requires_grad=True)  # NaN at ignored positions stays invisible
    logp, ent = token_logprobs(y, torch.full((2, 3), IGNORE), backend=backend)
    assert (logp == 0).all() and (ent == 0).all()
    (logp.sum() + ent.sum()).backward()
    assert (y.grad == 0).all()
    z = torch.randn(3, 11)  # a NaN or +inf logit at a position that counts propagates, never becomes a number
    z[0, 4], z[1, 7] = float("nan"), float("inf")
    logp, ent = token_logprobs(z, torch.tensor([1, 2, 3]), backend=backend)
    assert logp[:2].isnan().all() and ent[:2].isnan().all() and torch.isfinite(logp[2]) and torch.isfinite(ent[2])


# ---------------------------------------------------------------- precision at the edges


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_near_uniform_and_inf_logits(backend):
    """Confident targets (1 - p_y down to 5e-9), near-uniform rows with an entropy gradient, and -inf logits
    (a -inf target gives l_t = -inf, finite entropy and gradient; elsewhere probability exactly 0)."""
    confident = torch.zeros(3, 6)
    confident[:, 0] = torch.tensor([12.0, 17.0, 20.0])
    uniform = 2e-3 * torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    inf = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    inf[0, 2], inf[1, 4], inf[2, :5] = -math.inf, -math.inf, -math.inf
    logits = torch.cat([confident, uniform, inf])
    tokens = torch.tensor([0, 0, 0, 1, 2, 3, 2, 1, 5])
    x = logits.clone().requires_grad_(True)
    logp, ent = token_logprobs(x, tokens, backend=backend)
    g, e = upstream((9,), 0)
    torch.autograd.backward([logp, ent], [g, e])
    ref_logp, ref_ent, want = reference(logits, tokens, 1.0, g, e)
    assert logp[6] == -math.inf and torch.isfinite(ent).all() and torch.isfinite(x.grad).all()
    assert_close("logprobs", logp, ref_logp, atol=FP32_ATOL)
    assert_close("entropy", ent, ref_ent, atol=FP32_ATOL)
    for row in range(9):  # each row on its own: the confident rows' gradients are ~1e-8
        if row != 6:
            assert_rel_norm(f"dlogits row {row}", x.grad[row], want[row], tol=GRAD_FP32)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        (dict(tokens=torch.tensor([[1, 60]])), ValueError, "tokens must lie in"),
        (dict(tokens=torch.tensor([[1, -1]])), ValueError, "tokens must lie in"),
        (dict(tokens=torch.tensor([[1.0, 2.0]])), TypeError, "tokens"),
        (dict(tokens=torch.tensor([1, 2])), ValueError, "tokens must have shape"),
        (dict(logits=torch.zeros(1, 2, 50, dtype=torch.int32)), TypeError, "logits"),
        (dict(logits=torch.zeros(2, 50)), ValueError, "tokens must have shape"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(entropy=1), TypeError, "entropy"),
        (dict(inplace_backward=None), TypeError, "inplace_backward"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(vocab_start=0), ValueError, "vocab_start"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, needle):
    args = dict(logits=torch.zeros(1, 2, 50), tokens=torch.tensor([[1, 2]]))
    args.update(kwargs)
    with pytest.raises(error, match=needle):
        token_logprobs(args.pop("logits"), args.pop("tokens"), **args)


# ---------------------------------------------------------------- what a call puts on the device


@pytest.mark.triton
def test_triton_launch_counts(monkeypatch):
    """Forward: one vocabulary kernel and the token check (a few ops); backward: one kernel. No graph under
    no_grad, the same one launch."""
    monkeypatch.delenv(POISON_ENV, raising=False)
    logits, tokens = make_logits((4, 16), 300, torch.float32, seed=1)
    x = logits.requires_grad_(True)
    with DeviceWork() as fwd:
        logp, ent = token_logprobs(x, tokens, backend="triton")
    g, e = upstream(tokens.shape, 1)
    with DeviceWork() as bwd:
        torch.autograd.grad([logp, ent], [x], [g, e])
    with torch.no_grad(), DeviceWork() as frozen:
        token_logprobs(x, tokens, backend="triton")
    assert dict(fwd.launches) == {"logprob_entropy_fwd_kernel": 1} and fwd.total <= 10, fwd.ops
    assert dict(bwd.launches) == {"logprob_entropy_bwd_kernel": 1} and bwd.total <= 3, bwd.ops
    assert dict(frozen.launches) == dict(fwd.launches) and frozen.total == fwd.total


# ---------------------------------------------------------------- CUDA: graphs and torch.compile


@pytest.mark.gpu
def test_gpu_cuda_graph_and_compile():
    """No host sync: the Triton path captures into a CUDA graph (forward and backward) whose replays match eager
    calls, and traces into one graph under torch.compile(fullgraph=True)."""
    logits, tokens = make_logits((4, 33), 3001, torch.float32, seed=21)
    tokens, static = tokens.cuda(), logits.cuda().requires_grad_(True)
    g, e = (u.cuda() for u in upstream(tokens.shape, 21))

    def step(x):
        logp, ent = token_logprobs(x, tokens, temperature=0.8, backend="triton")
        torch.autograd.backward([logp, ent], [g, e])
        return logp, ent

    def eager(values):
        x = values.clone().requires_grad_(True)
        logp, ent = step(x)
        return logp, ent, x.grad

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) off the capture
        for _ in range(2):
            static.grad = None
            step(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static.grad = None
    with torch.cuda.graph(graph):
        captured = step(static)
    for replay in range(2):
        new = torch.randn(static.shape, device="cuda") * (2 + replay)
        with torch.no_grad():
            static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        for name, a, b in zip(("logprobs", "entropy", "dlogits"), (*captured, static.grad), eager(new)):
            assert torch.equal(a, b), f"{name}, replay {replay}"

    def both(x):
        return token_logprobs(x, tokens, temperature=0.8, backend="triton")

    x = logits.cuda().requires_grad_(True)
    compiled = torch.compile(both, fullgraph=True)(x)
    torch.autograd.backward(list(compiled), [g, e])
    want = eager(logits.cuda())
    assert_close("compiled logprobs", compiled[0], want[0], atol=1e-6)
    assert_close("compiled entropy", compiled[1], want[1], atol=1e-6)
    assert_rel_norm("compiled dlogits", x.grad, want[2], tol=1e-6)
