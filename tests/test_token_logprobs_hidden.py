"""`token_logprobs_from_hidden` against the float64 reference on logits = hidden @ weight.T + bias.

The reference takes float64 copies of the same (rounded) inputs and differentiates through the fp64 matmul;
for bf16 inputs it is fed the bf16 logits the chunks compute (a chunk's `addmm` rows equal the whole
product's), so only the op's own rounding is measured (docs/loss.md "Tolerances": fp32 values 1e-5, gradients
1e-5 relative norm; bf16 values 1e-4 relative, gradients 8e-3). Several chunks, padded and flat layouts,
strided hidden states, bias or none, -100 ids (with NaN hidden states there), both backends.
"""

from __future__ import annotations

import pytest
import torch
from _assert import assert_close, assert_rel_norm

from bench.launches import DeviceWork
from bench.memory import peak_extra_bytes
from reference import naive_logprob_entropy
from sspo_kernels import token_logprobs_from_hidden
from sspo_kernels._utils import POISON_ENV

pytestmark = pytest.mark.usefixtures("one_thread")

IGNORE = -100
BACKENDS = ("torch", "triton")
H, V = 12, 203


def make_case(shape, dtype, seed, *, bias=True, v=V, h=H):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.6).to(dtype)
    b = (torch.randn(v, generator=gen) * 0.5).to(dtype) if bias else None
    tokens = torch.randint(0, v, shape, generator=gen)
    tokens[torch.rand(shape, generator=gen) < 0.25] = IGNORE
    return hidden, weight, b, tokens


def reference(hidden, weight, bias, tokens, tau, g=None, e=None):
    """(logp, entropy) in float64 (0 at -100) and the gradients of sum(g * logp + e * entropy) w.r.t.
    hidden, weight, bias."""
    params = [t.detach().double().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    h, w, b = params
    logits = h @ w.T + (b if b is not None else 0.0)
    if hidden.dtype != torch.float32:  # the same rounded logits the chunks compute
        flat = hidden.reshape(-1, hidden.shape[-1])
        rounded = torch.mm(flat, weight.T) if bias is None else torch.addmm(bias, flat, weight.T)
        logits = logits + (rounded.reshape(logits.shape).double() - logits).detach()
    logp, ent = naive_logprob_entropy(logits, tokens, tau)
    keep = tokens != IGNORE
    logp, ent = torch.where(keep, logp, 0.0), torch.where(keep, ent, 0.0)
    grads = (None, None, None)
    if g is not None or e is not None:
        total = sum((u.double() * t).sum() for u, t in ((g, logp), (e, ent)) if u is not None)
        grads = torch.autograd.grad(total, [p for p in params if p is not None])
        grads = (*grads, None) if bias is None else grads
    return logp.detach(), ent.detach(), grads


def run(hidden, weight, bias, tokens, tau, g, e, **options):
    params = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    logp, ent = token_logprobs_from_hidden(params[0], params[1], tokens, bias=params[2], temperature=tau, **options)
    outs = [(o, u) for o, u in ((logp, g), (ent, e)) if u is not None]
    torch.autograd.backward([o for o, _ in outs], [u for _, u in outs])
    return logp, ent, [None if p is None else p.grad for p in params]


def compare(hidden, weight, bias, tokens, tau, g, e, **options):
    logp, ent, grads = run(hidden, weight, bias, tokens, tau, g, e, **options)
    ref_logp, ref_ent, ref_grads = reference(hidden, weight, bias, tokens, tau, g, e)
    fp32 = hidden.dtype == torch.float32
    tol = dict(atol=1e-5) if fp32 else dict(atol=1e-6, rtol=1e-4)
    assert logp.shape == tokens.shape and logp.dtype == torch.float32
    assert_close("logprobs", logp, ref_logp, **tol)
    assert_close("entropy", ent, ref_ent, **tol)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        if want is not None:
            assert got.dtype == hidden.dtype
            assert_rel_norm(f"d{name}", got, want, tol=1e-5 if fp32 else 8e-3)
    return grads


def upstream(shape, seed, which="both"):
    gen = torch.Generator().manual_seed(seed + 50)
    g, e = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return (None if which == "entropy-only" else g), (None if which == "logp-only" else e)


CASES = {  # name: (token shape, chunk_size, bias, upstreams)
    "padded-3chunks": ((3, 7), 8, True, "both"),
    "flat-1chunk": ((11,), None, False, "logp-only"),
    "padded-rowchunks": ((2, 5), 1, True, "entropy-only"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_gradients(backend, dtype, case):
    shape, chunk, bias, which = CASES[case]
    seed = sum(map(ord, case))
    hidden, weight, b, tokens = make_case(shape, dtype, seed, bias=bias)
    inputs = [t.clone() for t in (hidden, weight) + ((b,) if bias else ())]
    g, e = upstream(shape, seed, which)
    compare(hidden, weight, b, tokens, 0.8, g, e, chunk_size=chunk, backend=backend)
    assert all(torch.equal(a, x) for a, x in zip(inputs, (hidden, weight, b))), "an input was modified"


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_hidden_and_nan_at_ignored_positions(backend):
    """hidden[:, :-1] of a longer batch (a copy when flattened), strided tokens, and NaN hidden states at
    ignored positions: finite gradients everywhere, the values of the contiguous inputs."""
    full, weight, bias, tokens_full = make_case((3, 8), torch.float32, seed=4)
    hidden, tokens = full[:, :-1], tokens_full.t().contiguous().t()[:, 1:]
    hidden = hidden.clone()
    hidden[tokens == IGNORE] = float("nan")
    assert (tokens == IGNORE).any()
    g, e = upstream(tokens.shape, 2)
    grads = compare(hidden.nan_to_num(), weight, bias, tokens, 1.0, g, e, chunk_size=5, backend=backend)
    nan_logp, nan_ent, nan_grads = run(hidden, weight, bias, tokens, 1.0, g, e, chunk_size=5, backend=backend)
    assert torch.isfinite(nan_logp).all() and torch.isfinite(nan_ent).all()
    for name, a, b in zip(("weight", "bias"), nan_grads[1:], grads[1:]):
        assert torch.equal(a, b), f"d{name}: a NaN hidden state at an ignored position reached it"
    assert (nan_grads[0][tokens == IGNORE] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_one_gemm_and_one_pass_per_chunk(backend, monkeypatch):
    """Under no_grad: nothing recorded, one matmul and one vocabulary pass per chunk, the grad-mode numbers."""
    monkeypatch.delenv(POISON_ENV, raising=False)
    hidden, weight, bias, tokens = make_case((2, 9), torch.float32, seed=3)
    hidden.requires_grad_(True)
    with torch.no_grad(), DeviceWork() as work:
        logp, ent = token_logprobs_from_hidden(hidden, weight, tokens, bias=bias, chunk_size=5, backend=backend)
    assert logp.grad_fn is None and ent.grad_fn is None
    chunks = 4  # 18 tokens in chunks of 5
    assert work.ops["aten.addmm.out"] == chunks and work.ops.get("aten.mm.out", 0) == 0, work.ops
    if backend == "triton":
        assert dict(work.launches) == {"logprob_entropy_fwd_kernel": chunks}
    graph = token_logprobs_from_hidden(hidden, weight, tokens, bias=bias, chunk_size=5, backend=backend)
    assert torch.equal(logp, graph[0].detach()) and torch.equal(ent, graph[1].detach())


@pytest.mark.triton
def test_triton_launch_counts_with_grad(monkeypatch):
    """With grad: forward one GEMM and one kernel per chunk; backward recomputes the chunk's logits (one GEMM),
    one kernel, and the hidden / weight / bias gradient products per chunk."""
    monkeypatch.delenv(POISON_ENV, raising=False)
    hidden, weight, bias, tokens = make_case((2, 9), torch.float32, seed=6)
    params = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    with DeviceWork() as fwd:
        logp, ent = token_logprobs_from_hidden(hidden, weight, tokens, bias=bias, chunk_size=9, backend="triton")
    g, e = upstream(tokens.shape, 6)
    with DeviceWork() as bwd:
        torch.autograd.grad([logp, ent], params, [g, e])
    assert dict(fwd.launches) == {"logprob_entropy_fwd_kernel": 2} and fwd.ops["aten.addmm.out"] == 2, fwd.ops
    assert dict(bwd.launches) == {"logprob_entropy_bwd_kernel": 2}
    assert bwd.ops["aten.addmm.out"] == 2 and bwd.ops["aten.mm.out"] == 2 and bwd.ops["aten.addmm_.default"] == 2


def test_peak_memory_holds_no_fp32_logits():
    """N = 600 tokens, V = 4000 in chunks of 40: the peak extra memory of forward + backward stays far below
    one (N, V) fp32 logits tensor (9.2 MiB): one chunk's logits, the gradients and O(N) statistics."""
    hidden, weight, bias, tokens = make_case((600,), torch.float32, seed=9, v=4000, h=16)
    params = [t.requires_grad_(True) for t in (hidden, weight, bias)]

    def step():
        logp, ent = token_logprobs_from_hidden(hidden, weight, tokens, bias=bias, chunk_size=40, backend="torch")
        torch.autograd.grad([logp, ent], params, [torch.ones(600), torch.ones(600)])

    full = 600 * 4000 * 4
    grads = sum(p.numel() * 4 for p in params)
    peak = peak_extra_bytes(step)
    assert peak < grads + full / 4, f"peak {peak / 2**20:.2f} MiB, one (N, V) fp32 tensor {full / 2**20:.2f} MiB"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_all_ignored(backend):
    hidden, weight, bias, _ = make_case((0,), torch.float32, seed=1)
    params = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    logp, ent = token_logprobs_from_hidden(hidden, weight, torch.zeros(0, dtype=torch.long), bias=bias, backend=backend)
    assert logp.shape == (0,)
    grads = torch.autograd.grad([logp, ent], params, [torch.ones(0), torch.ones(0)])
    assert grads[0].shape == (0, H) and (grads[1] == 0).all() and (grads[2] == 0).all()
    hidden, weight, bias, _ = make_case((2, 3), torch.float32, seed=2)
    logp, ent = token_logprobs_from_hidden(hidden, weight, torch.full((2, 3), IGNORE), bias=bias, backend=backend)
    assert (logp == 0).all() and (ent == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        (dict(weight=torch.zeros(V, H, dtype=torch.bfloat16)), TypeError, "weight has dtype"),
        (dict(weight=torch.zeros(V, H + 1)), ValueError, "weight must be"),
        (dict(bias=torch.zeros(V + 1)), ValueError, "bias"),
        (dict(tokens=torch.tensor([[1, V]])), ValueError, "tokens must lie in"),
        (dict(tokens=torch.tensor([1, 2])), ValueError, "tokens must have shape"),
        (dict(hidden=torch.zeros(1, 2, H, dtype=torch.float64)), TypeError, "hidden"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(reduce_hidden_grad=True), ValueError, "needs tp_group"),
        (dict(vocab_start=3), ValueError, "needs tp_group"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, needle):
    args = dict(hidden=torch.zeros(1, 2, H), weight=torch.zeros(V, H), tokens=torch.tensor([[1, 2]]))
    args.update(kwargs)
    with pytest.raises(error, match=needle):
        token_logprobs_from_hidden(args.pop("hidden"), args.pop("weight"), args.pop("tokens"), **args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_against_reference_and_cuda_graph(dtype):
    """On CUDA (Triton pass, GPU-sized chunks and the fp32-output weight-gradient GEMM): the reference's numbers,
    and the no-grad pass (old-policy / reference) captured in a CUDA graph replays like eager calls."""
    hidden, weight, bias, tokens = make_case((3, 70), dtype, seed=31, v=3001, h=64)
    g, e = upstream(tokens.shape, 31)
    moved = [t.cuda() for t in (hidden, weight, bias, tokens, g, e)]
    compare(*moved[:4], 0.9, *moved[4:], chunk_size=96)
    h, w, b, y = moved[:4]
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                token_logprobs_from_hidden(h, w, y, bias=b, chunk_size=96)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = token_logprobs_from_hidden(h, w, y, bias=b, chunk_size=96)
        new = torch.randn(h.shape, device="cuda").to(dtype)
        h.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        want = token_logprobs_from_hidden(new, w, y, bias=b, chunk_size=96)
    assert torch.equal(captured[0], want[0]) and torch.equal(captured[1], want[1])
