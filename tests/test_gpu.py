"""Checks that only mean something on a GPU (all marked gpu; skipped without CUDA).

- the in-place backward against the out-of-place one, bitwise, at the headline size and in a loop
  (warps of one program must all read x_y before any of them overwrites the row);
- bitwise determinism over 3 runs: both backends, the hidden-state and log-prob entry points;
- CUDA graph capture and replay, and `torch.compile(fullgraph=True)`, equal to eager calls;
- side tables (boundary, cu_seqlens, normaliser, entropy reference) given on the CPU;
- inputs on cuda:1 while the current device is 0 (two GPUs only);
- the fused one-program segment step against the composed torch step on packed batches up to
  65,536 tokens, and sspo_loss against the reference at GPU block sizes.

The device-parametrised comparisons of the other test files cover dtypes, layouts and options on
small shapes; these use the sizes where a compiled kernel can go wrong.
"""

from __future__ import annotations

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import make_batch, pack
from _devices import on, on_dict
from test_loss import CLIP, DTYPES, compare

from sspo_kernels import METRIC_NAMES, sspo_loss, sspo_loss_from_hidden, sspo_loss_from_logprobs

pytestmark = pytest.mark.gpu
CUDA = "cuda"


def _outputs(out) -> list[tuple[str, torch.Tensor]]:
    return [("loss", out.loss.detach()), ("logprobs", out.logprobs), ("entropy", out.entropy)] + [
        (f"metrics[{name}]", out.metrics[name]) for name in METRIC_NAMES
    ]


def assert_bitwise(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
    if not bool(same.all()):
        bad = (~same).nonzero()
        raise AssertionError(f"{name}: {bad.shape[0]}/{a.numel()} elements differ, first at {bad[0].tolist()}")


# ---------------------------------------------------------------- in place against out of place


@pytest.mark.parametrize("with_logp", [False, True], ids=["lse-only", "with-logp"])
def test_inplace_backward_kernel_bitwise_at_scale(with_logp):
    """(8192, 151936) bf16, targets < 8192 (in the first block, whose store comes first) with large
    logits there; 10 in-place runs each equal to the out-of-place gradient, bit for bit."""
    from sspo_kernels.ops.vocab.triton import logprob_entropy_bwd, logprob_entropy_fwd

    n, v = 8192, 151_936
    gen = torch.Generator(device=CUDA).manual_seed(0)
    logits = torch.randn(n, v, generator=gen, device=CUDA, dtype=torch.bfloat16).mul_(4)
    tokens = torch.randint(0, 8192, (n,), generator=gen, device=CUDA)
    logits[torch.arange(n, device=CUDA), tokens] += 12  # confident targets: p_y near 1, x_y ~ 12-25
    mask = torch.ones(n, dtype=torch.bool, device=CUDA)
    g = torch.randn(n, generator=gen, device=CUDA) / n
    logp, _, lse = logprob_entropy_fwd(logits, tokens, mask, 1.0)
    extra = {"logp": logp} if with_logp else {}
    expected = logprob_entropy_bwd(logits, tokens, mask, lse, None, g, None, 1.0, **extra)
    work = torch.empty_like(logits)
    for run in range(10):
        work.copy_(logits)
        got = logprob_entropy_bwd(work, tokens, mask, lse, None, g, None, 1.0, inplace=True, **extra)
        assert got.data_ptr() == work.data_ptr()
        assert_bitwise(f"in-place gradient, run {run}", work, expected)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01], ids=["no-entropy-bonus", "entropy-bonus"])
def test_inplace_backward_loss_bitwise(entropy_coef):
    """sspo_loss(inplace_backward=True) against False, (16, 512, 151936) bf16, 5 runs."""
    gen = torch.Generator(device=CUDA).manual_seed(1)
    b, t, v = 16, 512, 151_936
    base = torch.randn(b, t, v, generator=gen, device=CUDA, dtype=torch.bfloat16).mul_(3)
    tokens = torch.randint(0, 8192, (b, t), generator=gen, device=CUDA)
    old = torch.randn(b, t, generator=gen, device=CUDA) * 0.1 - 9
    adv = torch.randn(b, generator=gen, device=CUDA)
    mask = torch.rand(b, t, generator=gen, device=CUDA) > 0.1
    kw = dict(granularity="sequence", entropy_coef=entropy_coef)
    ref_leaf = base.clone().requires_grad_(True)
    ref = sspo_loss(ref_leaf, tokens, old, adv, mask, backend="triton", **kw)
    ref.loss.backward()
    for run in range(5):
        leaf = base.clone().requires_grad_(True)
        out = sspo_loss(leaf * 1, tokens, old, adv, mask, backend="triton", inplace_backward=True, **kw)
        out.loss.backward()
        assert_bitwise(f"loss, run {run}", out.loss, ref.loss)
        assert_bitwise(f"dlogits, run {run}", leaf.grad, ref_leaf.grad)


# ---------------------------------------------------------------- determinism


def _logits_call(backend: str):
    gen = torch.Generator(device=CUDA).manual_seed(2)
    b, t, v = 8, 512, 32_000
    logits = torch.randn(b, t, v, generator=gen, device=CUDA, dtype=torch.bfloat16).mul_(2)
    tokens = torch.randint(0, v, (b, t), generator=gen, device=CUDA)
    old = torch.randn(b, t, generator=gen, device=CUDA) * 0.05 - 10
    adv = torch.randn(b, generator=gen, device=CUDA)
    mask = torch.rand(b, t, generator=gen, device=CUDA) > 0.1
    boundary = torch.rand(v, generator=gen, device=CUDA) < 0.05

    def run():
        leaf = logits.clone().requires_grad_(True)
        out = sspo_loss(leaf, tokens, old, adv, mask, boundary=boundary, backend=backend, entropy_coef=0.01, beta=0.05,
                        ref_logprobs=old + 0.1)  # fmt: skip
        out.loss.backward()
        return [*_outputs(out), ("dlogits", leaf.grad)]

    return run


def _hidden_call(single_pass: bool):
    gen = torch.Generator(device=CUDA).manual_seed(3)
    n, h, v = 2048, 1024, 32_000
    hidden = torch.randn(n, h, generator=gen, device=CUDA, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, generator=gen, device=CUDA) * h**-0.5).to(torch.bfloat16)
    tokens = torch.randint(0, v, (n,), generator=gen, device=CUDA)
    old = torch.randn(n, generator=gen, device=CUDA) * 0.05 - 10
    adv = torch.randn(n, generator=gen, device=CUDA)
    mask = torch.rand(n, generator=gen, device=CUDA) > 0.1
    cu = torch.arange(0, n + 1, 256)  # on the CPU: single-pass plans chunks of whole responses from it

    def run():
        leaves = [x.clone().requires_grad_(True) for x in (hidden, weight)]
        out = sspo_loss_from_hidden(*leaves, tokens, old, adv, mask, cu_seqlens=cu, granularity="sequence",
                                    entropy_ref=1.5, single_pass=single_pass, chunk_size=512)  # fmt: skip
        out.loss.backward()
        return [*_outputs(out), ("hidden.grad", leaves[0].grad), ("weight.grad", leaves[1].grad)]

    return run


def _logprobs_call():
    gen = torch.Generator(device=CUDA).manual_seed(4)
    n = 65_536
    logp = torch.rand(n, generator=gen, device=CUDA).log()
    entropy = torch.rand(n, generator=gen, device=CUDA) * 3
    tokens = torch.randint(0, 1000, (n,), generator=gen, device=CUDA)
    old = logp + torch.randn(n, generator=gen, device=CUDA) * 0.2
    adv = torch.randn(64, generator=gen, device=CUDA)
    mask = torch.rand(n, generator=gen, device=CUDA) > 0.1
    boundary = torch.rand(1000, generator=gen, device=CUDA) < 0.05
    cu = torch.arange(0, n + 1, 1024, device=CUDA)

    def run():
        leaf = logp.clone().requires_grad_(True)
        out = sspo_loss_from_logprobs(leaf, entropy, tokens, old, adv, mask, boundary=boundary, cu_seqlens=cu)
        out.loss.backward()
        return [*_outputs(out), ("dlogprobs", leaf.grad)]

    return run


CALLS = {
    "sspo_loss-triton": lambda: _logits_call("triton"),
    # index_add_ (the torch backend's segmented sum) uses atomics on CUDA unless torch's deterministic mode
    # is on, which is what a user who wants bitwise reproducible runs of this backend sets
    "sspo_loss-torch-deterministic-mode": lambda: _logits_call("torch"),
    "from_hidden-single-pass": lambda: _hidden_call(True),
    "from_hidden-two-phase": lambda: _hidden_call(False),
    "from_logprobs": _logprobs_call,
}


@pytest.mark.parametrize("call", list(CALLS))
def test_bitwise_deterministic_over_3_runs(call):
    run = CALLS[call]()
    deterministic = call.endswith("deterministic-mode")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic or previous)
    try:
        runs = [run() for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for i in (1, 2):
        for (name, a), (_, b) in zip(runs[0], runs[i]):
            assert_bitwise(f"{name}, run {i} vs run 0", b, a)


# ---------------------------------------------------------------- CUDA graphs, torch.compile


def _moved_batch(seed: int, granularity: str):
    batch = make_batch(seed, [50, 80, 10], seq_len=96, vocab=3001)
    args, kwargs = batch.inputs(granularity)
    return batch, on(CUDA, *args[1:]), on_dict(CUDA, kwargs)


def test_cuda_graph_capture_and_replay_match_eager():
    """Forward + backward captured once, replayed on new logits copied into the static input, equal
    (bitwise) to eager calls on the same logits."""
    batch, moved, kw = _moved_batch(22, "subsentence")
    static = batch.logits.detach().to(CUDA, torch.bfloat16).requires_grad_(True)

    def eager(logits: torch.Tensor):
        x = logits.detach().clone().requires_grad_(True)
        out = sspo_loss(x, *moved, **kw, **CLIP)
        out.loss.backward()
        return [*_outputs(out), ("dlogits", x.grad)]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles) off the capture
        for _ in range(2):
            static.grad = None
            sspo_loss(static, *moved, **kw, **CLIP).loss.backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static.grad = None
    with torch.cuda.graph(graph):
        captured = sspo_loss(static, *moved, **kw, **CLIP)
        captured.loss.backward()
    gen = torch.Generator(device=CUDA).manual_seed(5)
    for replay in range(3):
        new = torch.randn(static.shape, generator=gen, device=CUDA).mul_(1 + replay).to(torch.bfloat16)
        with torch.no_grad():
            static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        got = [*_outputs(captured), ("dlogits", static.grad)]
        for (name, a), (_, b) in zip(got, eager(new)):
            assert_bitwise(f"{name}, replay {replay}", a, b)


def test_torch_compile_fullgraph_triton():
    """The Triton backend, fused segment step included, traces into one graph and matches eager."""
    batch, moved, kw = _moved_batch(23, "subsentence")

    def loss_and_metric(logits, *rest):
        out = sspo_loss(logits, *rest, backend="triton", **kw, **CLIP)
        return out.loss, out.metrics["clip_frac"]

    eager_logits = batch.logits.detach().to(CUDA, torch.float32).requires_grad_(True)
    compiled_logits = eager_logits.detach().clone().requires_grad_(True)
    eager = loss_and_metric(eager_logits, *moved)
    eager[0].backward()
    compiled = torch.compile(loss_and_metric, fullgraph=True)(compiled_logits, *moved)
    compiled[0].backward()
    assert_close("loss", compiled[0], eager[0], atol=1e-6)
    assert_close("clip_frac", compiled[1], eager[1], atol=0)
    assert_rel_norm("dlogits", compiled_logits.grad, eager_logits.grad, tol=1e-6)


# ---------------------------------------------------------------- side tables, several GPUs


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_side_tables_on_the_cpu(backend):
    """boundary, cu_seqlens, a normaliser and an entropy reference given as CPU tensors with CUDA logits
    (copied without a host sync) give the same results as when they are on the device."""
    batch = pack(make_batch(24, [50, 80, 10], vocab=3001))
    args, kwargs = batch.inputs("subsentence")
    rest = on(CUDA, *args[1:])
    ref_logprobs = kwargs.pop("ref_logprobs").to(CUDA)
    side = dict(kwargs, normalizer=torch.tensor(150.0), entropy_ref=torch.tensor(1.3), entropy_gamma=1.0)
    results = []
    for tables in (side, on_dict(CUDA, side)):
        x = batch.logits.detach().to(CUDA, torch.float32).requires_grad_(True)
        out = sspo_loss(x, *rest, ref_logprobs=ref_logprobs, backend=backend, **tables, **CLIP)
        out.loss.backward()
        results.append([*_outputs(out), ("dlogits", x.grad)])
    for (name, a), (_, b) in zip(*results):
        assert_bitwise(name, a, b)


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
ENTRIES = ["sspo_loss-triton", "sspo_loss-torch", "from_hidden", "from_logprobs"]


def _entry(name: str, device: str):
    """Outputs and gradients of one small call of `name` with every input on `device`."""
    batch = make_batch(25, [50, 80, 10], seq_len=96, vocab=3001)
    args, kwargs = batch.inputs("subsentence")
    rest, kw = on(device, *args[1:]), on_dict(device, kwargs)
    logits = batch.logits.detach().to(device, torch.float32)
    if name.startswith("sspo_loss"):
        x = logits.requires_grad_(True)
        out = sspo_loss(x, *rest, backend=name.split("-")[1], **kw, **CLIP)
        leaves = [x]
    elif name == "from_hidden":
        gen = torch.Generator().manual_seed(6)
        hidden = torch.randn(*batch.tokens.shape, 64, generator=gen).to(device).requires_grad_(True)
        weight = torch.randn(batch.vocab, 64, generator=gen).mul(0.2).to(device).requires_grad_(True)
        out = sspo_loss_from_hidden(hidden, weight, *rest, **kw, **CLIP)
        leaves = [hidden, weight]
    else:
        logp = torch.log_softmax(logits, -1).gather(-1, batch.tokens.clamp(min=0).to(device)[..., None])[..., 0]
        logp = logp.detach().requires_grad_(True)
        entropy = torch.rand(logp.shape, generator=torch.Generator().manual_seed(7)).to(device)
        out = sspo_loss_from_logprobs(logp, entropy, *rest, **kw, **CLIP)
        leaves = [logp]
    out.loss.backward()
    return [*_outputs(out), *((f"grad {i}", leaf.grad) for i, leaf in enumerate(leaves))]


@TWO_GPUS
@pytest.mark.parametrize("entry", ENTRIES)
def test_inputs_on_the_second_gpu(entry):
    """Everything on cuda:1 while the current device is 0: the launches follow the tensors (a launch on
    device 0's stream would fail or race), and the results equal the same call on cuda:0."""
    torch.cuda.set_device(0)
    expected = _entry(entry, "cuda:0")
    got = _entry(entry, "cuda:1")
    torch.cuda.synchronize("cuda:1")
    assert torch.cuda.current_device() == 0
    same_card = torch.cuda.get_device_name(0) == torch.cuda.get_device_name(1)
    for (name, a), (_, b) in zip(got, expected):
        assert a.device == torch.device("cuda:1"), f"{name} on {a.device}"
        assert_close(name, a, b, atol=0 if same_card else 1e-5, rtol=0 if same_card else 1e-4)


# ---------------------------------------------------------------- the fused segment step, GPU block sizes


def _packed_logprobs(n: int, seed: int, per_token_adv: bool):
    """A random packed batch of n tokens: responses of 0 to 2047 tokens, per-token log-probs and
    entropies as a vocabulary pass returns them, old log-probs around them."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < n:
        lengths.append(min(int(torch.randint(0, 2048, (1,), generator=gen)), n - sum(lengths)))
    lengths[1:1] = [0]  # an empty response
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    b = len(lengths)
    logp = -5 * torch.rand(n, generator=gen)
    offset = torch.repeat_interleave(torch.randn(b, generator=gen) * 0.2, torch.tensor(lengths))
    batch = dict(
        logprobs=logp, entropy=3 * torch.rand(n, generator=gen), tokens=torch.randint(0, 1000, (n,), generator=gen),
        old_logprobs=logp + offset + 0.2 * torch.randn(n, generator=gen),
        advantages=torch.randn(n if per_token_adv else b, generator=gen), mask=torch.rand(n, generator=gen) > 0.1,
    )  # fmt: skip
    side = dict(
        cu_seqlens=cu, boundary=torch.rand(1000, generator=gen) < 0.05,
        segment_ids=torch.randint(0, 3, (n,), generator=gen), ref_logprobs=logp + 0.3 * torch.randn(n, generator=gen),
    )  # fmt: skip
    return on_dict(CUDA, batch), on_dict(CUDA, side)


# (tokens, per-token advantages, options): every granularity, the scalar aggregation modes, the options' variants
STEP_CASES = {
    "subsentence-token-mean-N65536": (65_536, False, dict(granularity="subsentence")),
    "sequence-seq-mean-token-mean-N65536": (
        65_536, True, dict(granularity="sequence", loss_agg_mode="seq-mean-token-mean"),
    ),
    "token-norm-kl-dual-bonus-N8192": (
        8192, False, dict(granularity="token", loss_agg_mode="seq-mean-token-sum-norm", norm_len=2048, beta=0.1,
                          dual_clip=3.0, entropy_coef=0.01),
    ),
    "segments-sum-N30001": (30_001, True, dict(granularity="segments", loss_agg_mode="sum", entropy_ref=1.4)),
    "sentence-seq-mean-token-sum-ratio-token-N4097": (
        4097, False, dict(granularity="sentence", loss_agg_mode="seq-mean-token-sum", ratio_grad="token"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_fused_step_matches_composed_step(case):
    """`sspo_loss_from_logprobs` with the Triton backend (one program walks every token) against the
    torch backend (the step composed of torch ops): num_segments bitwise, the rest to fp32 rounding."""
    n, per_token_adv, options = STEP_CASES[case]
    batch, side = _packed_logprobs(n, seed=n, per_token_adv=per_token_adv)
    if options["granularity"] not in ("subsentence", "sentence"):
        side.pop("boundary")
    if options["granularity"] != "segments":
        side.pop("segment_ids")
    results = {}
    for backend in ("triton", "torch"):
        leaves = {k: batch[k].clone().requires_grad_(True) for k in ("logprobs", "entropy")}
        out = sspo_loss_from_logprobs(**{**batch, **leaves}, backend=backend, **side, **options)
        out.loss.backward()
        grads = [("dlogprobs", leaves["logprobs"].grad)]
        if options.get("entropy_coef"):
            grads.append(("dentropy", leaves["entropy"].grad))
        results[backend] = dict([*_outputs(out), *grads])
    fused, composed = results["triton"], results["torch"]
    assert_bitwise("metrics[num_segments]", fused["metrics[num_segments]"], composed["metrics[num_segments]"])
    for name, value in composed.items():
        scale = value.abs().max().item() if value.numel() else 0.0
        assert_close(name, fused[name], value, atol=1e-6 * max(scale, 1.0), rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_matches_reference_at_gpu_block_sizes(dtype):
    """V = 5003: two vocabulary blocks in fp32 and one with a masked tail in bf16 / fp16 (the CPU cases
    run V < 64); 512 tokens, one empty response; in place and not."""
    batch = make_batch(21, [37, 120, 0, 64], seq_len=128, vocab=5003, hole_p=0.1)
    for inplace in (False, True):
        compare(batch, "subsentence", backend="triton", dtype=dtype, device=CUDA, inplace=inplace, **CLIP)
