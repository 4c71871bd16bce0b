"""The cases `test_distributed.py` runs inside every rank of a gloo group (see there).

Every rank builds the same batch from a seed, runs the fp64 reference on the whole of it, runs the
distributed form on its own shard (vocabulary columns, rows, or both) and compares its outputs and
the gradient of its shard with the reference's, at the tolerances of docs/loss.md.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.distributed as dist
from _assert import assert_close, assert_rel_norm
from _cases import Batch, make_batch, pack
from _collectives import Counter
from _family_cases import CORRECTIONS, OBJECTIVES, build_options

import reference
from sspo_kernels import METRIC_NAMES, sspo_loss

V = 37
GRANULARITIES = ("subsentence", "sentence", "sequence", "token", "segments")
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "sum", "none")
LENGTHS = [5, 0, 9, 3, 7]  # one empty response; 24 tokens packed, T = 9 padded
UPSTREAM = 1.7
_CASES: list[tuple[str, Callable, tuple[int, ...]]] = []
WORST: dict[str, float] = {}  # the largest error seen per quantity (reported by the worker)


def _note(name: str, err: float) -> None:
    WORST[name] = max(WORST.get(name, 0.0), err)


def case(*worlds: int):
    def register(fn):
        _CASES.append((fn.__name__, fn, worlds))
        return fn

    return register


def cases_for(world: int) -> list[tuple[str, Callable]]:
    return [(name, fn) for name, fn, worlds in _CASES if world in worlds]


class Context:
    """This rank, the groups every rank creates in the same order, and the collective counter."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.world_group = dist.new_group(list(range(world)))  # never the default group
        self.counter = Counter()
        self.tp_groups, self.sp_groups = [], []
        if world == 4:  # a 2 x 2 grid: tp over {0, 1} and {2, 3}, sp over {0, 2} and {1, 3}
            self.tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            self.sp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]

    def grid(self):
        """(tp group, tp rank, sp group, sp rank) of this rank in the 2 x 2 grid."""
        return self.tp_groups[self.rank // 2], self.rank % 2, self.sp_groups[self.rank % 2], self.rank // 2


# ---------------------------------------------------------------- helpers


def _batch(seed: int, packed: bool, **kw) -> Batch:
    b = make_batch(seed, LENGTHS, vocab=V, hole_p=0.2, **kw)
    return pack(b) if packed else b


def _old_near_current(b: Batch, seed: int) -> None:
    """old_logprobs = the current log-probs plus noise, after a test changed the logits."""
    logp, _ = reference.naive_logprob_entropy(b.logits.detach(), b.tokens)
    noise = 0.2 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    b.old_logprobs = torch.where(b.mask, logp + noise, 0.0)


def _splits(world: int, uneven: bool) -> list[tuple[int, int]]:
    cuts = {2: [0, 11, V], 4: [0, 6, 19, 20, V]}[world] if uneven else [V * r // world for r in range(world + 1)]
    return list(itertools.pairwise(cuts))


def _reference(batch: Batch, granularity: str, **opts):
    args, kw = batch.inputs(granularity)
    kw.update(opts)
    leaf = batch.fresh_logits()
    ref = reference.sspo_loss(leaf, *args[1:], **kw)
    upstream = torch.randn(ref.loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    up = upstream if ref.loss.dim() else UPSTREAM
    (ref.loss * up).sum().backward()
    return args, kw, ref, leaf.grad, up


def _compare(out, ref) -> None:
    for name in ("loss", "logprobs", "entropy"):
        assert_close(name, getattr(out, name), getattr(ref, name), atol=1e-5)
        _note(name, (getattr(out, name).double() - getattr(ref, name)).abs().max().item())
    for name in METRIC_NAMES:
        assert_close(f"metrics[{name}]", out.metrics[name], ref.metrics[name], atol=1e-5)


def _rel(a: torch.Tensor, e: torch.Tensor) -> float:
    return ((a.double() - e).norm() / e.norm().clamp(min=1e-300)).item()


def _backward(out, up) -> None:
    (out.loss * (up.float() if isinstance(up, torch.Tensor) else up)).sum().backward()


def _check_counts(calls, group, forward: bool) -> None:
    ranks = tuple(dist.get_process_group_ranks(group))
    on_group = [c for c in calls if c[1] == ranks]
    others = [c for c in calls if c[1] != ranks]
    if forward:
        assert len(on_group) <= 2, f"{len(on_group)} forward collectives on the TP group: {on_group}"
    else:
        assert not on_group, f"backward issued collectives on the TP group: {on_group}"
    assert not others, f"collectives on other groups: {others}"


def run_tp(ctx, batch, granularity, *, group=None, rank=None, world=None, uneven=False, backend="torch",
           dtype=torch.float32, count=True, **opts):  # fmt: skip
    """The reference on the whole batch against this rank's vocabulary slice."""
    group = group or ctx.world_group
    rank = ctx.rank if rank is None else rank
    world = world or ctx.world
    lo, hi = _splits(world, uneven)[rank]
    args, kw, ref, grad_ref, up = _reference(batch, granularity, **opts)
    leaf = batch.logits.detach()[..., lo:hi].to(dtype).requires_grad_(True)
    ctx.counter.install()
    out = sspo_loss(leaf, *args[1:], backend=backend, tp_group=group, vocab_start=lo, **kw)
    fwd = ctx.counter.take()
    _backward(out, up)
    bwd = ctx.counter.take()
    ctx.counter.uninstall()
    if count:
        _check_counts(fwd, group, forward=True)
        _check_counts(bwd, group, forward=False)
    _compare(out, ref)
    assert_rel_norm("dlogits (this rank's columns)", leaf.grad, grad_ref[..., lo:hi], tol=1e-5)
    _note("dlogits rel (TP)", _rel(leaf.grad, grad_ref[..., lo:hi]))
    return out


def _row_parts(n: int, world: int, kind: str, seed: int = 0) -> list[torch.Tensor]:
    """Flat row indices of every rank: contiguous uneven cuts, zigzag chunks, or a random partition."""
    if kind == "contiguous":
        cuts = [0, *sorted(torch.randperm(n - 1, generator=torch.Generator().manual_seed(seed))[: world - 1] + 1), n]
        return [torch.arange(int(a), int(b)) for a, b in itertools.pairwise(cuts)]
    if kind == "zigzag":  # Megatron CP: rank i holds chunks i and 2W - 1 - i
        chunks = torch.arange(n).tensor_split(2 * world)
        return [torch.cat([chunks[i], chunks[2 * world - 1 - i]]) for i in range(world)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[r::world] for r in range(world)]


def run_sp(ctx, batch, granularity, *, kind="contiguous", group=None, rank=None, world=None, tp=None, seed=0,
           **opts):  # fmt: skip
    """The reference on the whole batch against this rank's rows (and, with tp=(group, rank, world),
    its vocabulary slice of them)."""
    group = group or ctx.world_group
    rank = ctx.rank if rank is None else rank
    world = world or ctx.world
    args, kw, ref, grad_ref, up = _reference(batch, granularity, **opts)
    n = batch.tokens.numel()
    idx = _row_parts(n, world, kind, seed)[rank]
    lo, hi = (0, V) if tp is None else _splits(tp[2], True)[tp[1]]
    flat = batch.logits.detach().reshape(n, V)
    leaf = flat[idx][:, lo:hi].float().requires_grad_(True)
    tp_kw = {} if tp is None else {"tp_group": tp[0], "vocab_start": lo}
    ctx.counter.install()
    out = sspo_loss(leaf, *args[1:], backend="torch", sp_group=group, sp_index=idx, **tp_kw, **kw)
    fwd = ctx.counter.take()
    _backward(out, up)
    bwd = ctx.counter.take()
    ctx.counter.uninstall()
    sp_ranks = tuple(dist.get_process_group_ranks(group))
    assert [c[0] for c in fwd if c[1] == sp_ranks] == ["all_reduce"], f"SP forward collectives: {fwd}"
    assert not bwd, f"backward collectives: {bwd}"
    if tp is not None:
        _check_counts([c for c in fwd if c[1] != sp_ranks], tp[0], forward=True)
    _compare(out, ref)
    assert_rel_norm("dlogits (this rank's rows)", leaf.grad, grad_ref.reshape(n, V)[idx][:, lo:hi], tol=1e-5)
    _note("dlogits rel (SP)", _rel(leaf.grad, grad_ref.reshape(n, V)[idx][:, lo:hi]))
    return out


# ---------------------------------------------------------------- tensor parallel


@case(2, 4)
def tp_granularities(ctx):
    for i, g in enumerate(GRANULARITIES):
        run_tp(ctx, _batch(10 + i, packed=False), g)


@case(2, 4)
def tp_agg_modes_packed_uneven(ctx):
    for i, mode in enumerate(MODES):
        norm_len = {"norm_len": 12} if mode == "seq-mean-token-sum-norm" else {}
        run_tp(ctx, _batch(20 + i, packed=True), "subsentence", uneven=True, loss_agg_mode=mode, **norm_len)


@case(2, 4)
def tp_options(ctx):
    """Temperature, KL, entropy bonus, dual clip, the token ratio gradient, per-token advantages."""
    b = _batch(30, packed=False, per_token_adv=True)
    run_tp(ctx, b, "subsentence", uneven=True, temperature=0.7, beta=0.1, entropy_coef=0.01)
    run_tp(ctx, _batch(31, packed=True), "sequence", dual_clip=3.0, ratio_grad="token", loss_agg_mode="none")
    run_tp(ctx, _batch(32, packed=True), "subsentence", entropy_ref=1.5, eps_low=0.05, eps_high=0.05)
    run_tp(ctx, _batch(33, packed=True), "subsentence", backend="triton")  # its segmented sum, interpreted


@case(2, 4)
def tp_all_minus_inf_shard(ctx):
    """Rows whose whole slice on one rank is -inf (and whose targets lie elsewhere): no NaN."""
    b = _batch(40, packed=True, logit_scale=3.0)
    lo, hi = _splits(ctx.world, True)[1]
    rows = torch.arange(b.tokens.numel()) % 2 == 0
    with torch.no_grad():
        b.logits[rows, lo:hi] = float("-inf")
    b.tokens = torch.where(rows & (b.tokens >= lo) & (b.tokens < hi), b.tokens % lo, b.tokens)
    _old_near_current(b, 41)
    out = run_tp(ctx, b, "subsentence", uneven=True, entropy_coef=0.01)
    assert torch.isfinite(out.entropy).all() and torch.isfinite(out.loss)


@case(2)
def tp_low_precision_and_temperature(ctx):
    b = _batch(50, packed=False)
    b.logits = b.logits.detach().bfloat16().double().requires_grad_(True)  # exact in bf16
    args, kw, ref, grad_ref, up = _reference(b, "token", temperature=1.3)
    lo, hi = _splits(2, True)[ctx.rank]
    leaf = b.logits.detach()[..., lo:hi].bfloat16().requires_grad_(True)
    out = sspo_loss(leaf, *args[1:], backend="torch", tp_group=ctx.world_group, vocab_start=lo, **kw)
    _backward(out, up)
    for name in ("loss", "logprobs", "entropy"):
        assert_close(name, getattr(out, name), getattr(ref, name), atol=1e-6, rtol=1e-4)
    g_ref = grad_ref[..., lo:hi]
    assert_close("dlogits bf16", leaf.grad, g_ref, rtol=2 * 2**-8, atol=1e-6 * g_ref.abs().max().item())


@case(2)
def tp_default_vocab_start_and_errors(ctx):
    b = _batch(
        60,
        packed=False,
    )
    b.logits = b.logits.detach()[..., :36].requires_grad_(True)  # 36 = 2 x 18: the default split
    b.boundary = b.boundary[:36]
    b.tokens = torch.where(b.tokens >= 36, 35, b.tokens)
    run_tp(ctx, b, "subsentence")
    args, kw = b.inputs("subsentence")
    lo = 18 * ctx.rank
    out = sspo_loss(b.logits.detach()[..., lo : lo + 18].float(), *args[1:], tp_group=ctx.world_group, **kw)
    ref = reference.sspo_loss(*args, **kw)
    assert_close("loss, default vocab_start", out.loss, ref.loss, atol=1e-5)
    for bad, message in ((dict(vocab_start=30), "exceeds the vocabulary size"),
                         (dict(vocab_start=0), "exactly one rank's vocabulary range")):  # fmt: skip
        try:
            sspo_loss(b.logits.detach()[..., lo : lo + 18].float(), *args[1:], tp_group=ctx.world_group, **bad, **kw)
        except ValueError as exc:
            assert message in str(exc), str(exc)
        else:
            raise AssertionError(f"no error for {bad}")
    try:
        sspo_loss(b.logits.detach().float(), *args[1:], vocab_start=0, **kw)
    except ValueError as exc:
        assert "without tp_group" in str(exc)
    else:
        raise AssertionError("vocab_start without tp_group was accepted")


# ---------------------------------------------------------------- sequence parallel


@case(2, 4)
def sp_granularities_contiguous(ctx):
    for i, g in enumerate(GRANULARITIES):
        run_sp(ctx, _batch(100 + i, packed=True), g, seed=i)


@case(2, 4)
def sp_zigzag_and_random_partitions(ctx):
    """Zigzag chunks (Megatron CP) and an arbitrary partition; padded and packed; long segments
    (granularity "sequence") straddle 2 to 4 ranks."""
    for i, mode in enumerate(MODES):
        norm_len = {"norm_len": 12} if mode == "seq-mean-token-sum-norm" else {}
        kind = ("zigzag", "random")[i % 2]
        run_sp(ctx, _batch(110 + i, packed=i % 3 == 0), "sequence", kind=kind, seed=i, loss_agg_mode=mode, **norm_len)


@case(2, 4)
def sp_options(ctx):
    run_sp(ctx, _batch(120, packed=True, per_token_adv=True), "subsentence", temperature=0.7, beta=0.1,
           entropy_coef=0.01)  # fmt: skip
    run_sp(ctx, _batch(121, packed=False), "subsentence", kind="zigzag", loss_agg_mode="none", ratio_grad="token")


@case(2)
def sp_bad_index(ctx):
    b = _batch(130, packed=True)
    args, kw = b.inputs("subsentence")
    n = b.tokens.numel()
    duplicated = torch.arange(n - 1) if ctx.rank == 0 else torch.tensor([0])
    out_of_range = torch.arange(n // 2) + (n // 2) * ctx.rank + 100 * ctx.rank
    for idx, message in ((duplicated, "partition"), (out_of_range, "sp_index must lie in")):
        logits = b.logits.detach().reshape(n, V)[idx.clamp(max=n - 1)].float()
        try:
            sspo_loss(logits, *args[1:], sp_group=ctx.world_group, sp_index=idx, **kw)
        except ValueError as exc:
            assert message in str(exc), str(exc)
        else:
            raise AssertionError(f"no error for sp_index {idx.tolist()}")


@case(4)
def tp_x_sp_grid(ctx):
    """TP x SP on a 2 x 2 grid: logits (N_local, V_local)."""
    tp, tp_rank, sp, sp_rank = ctx.grid()
    for i, g in enumerate(("subsentence", "sequence", "token")):
        b = _batch(140 + i, packed=i != 1)
        run_sp(ctx, b, g, kind=("contiguous", "zigzag")[i % 2], group=sp, rank=sp_rank, world=2,
               tp=(tp, tp_rank, 2), seed=i, entropy_coef=0.01)  # fmt: skip


# ---------------------------------------------------------------- the objectives and corrections


@case(2, 4)
def tp_objectives_and_corrections(ctx):
    """Each objective with a rotating correction on a vocabulary split (the step sees the merged
    statistics: nothing of it is per shard)."""
    names = list(CORRECTIONS)
    for i, objective in enumerate(OBJECTIVES):
        b = _batch(150 + i, packed=i % 2 == 1, per_token_adv=i % 3 == 0)
        opts = build_options(b, objective, names[(i + 1) % len(names)], 150 + i)
        run_tp(ctx, b, ("token", "subsentence", "sequence")[i % 3], uneven=True, **opts)
    b = _batch(157, packed=True)
    run_tp(ctx, b, "subsentence", backend="triton", **build_options(b, "gmpo", "everything", 157))


@case(2, 4)
def sp_objectives_and_corrections(ctx):
    """Rows on every rank: the rollout weights, policy weights and sampler log-probs are the whole
    batch's per-token tensors; the step runs on the gathered statistics."""
    pairs = (("cispo", "rollout-sequence-mask"), ("vespo", "everything"), ("sapo", "entropy-mask"),
             ("clip", "off-policy-rollout"))  # fmt: skip
    for i, (objective, correction) in enumerate(pairs):
        b = _batch(160 + i, packed=i % 2 == 0)
        run_sp(ctx, b, "subsentence", kind=("zigzag", "random")[i % 2], seed=i,
               **build_options(b, objective, correction, 160 + i))  # fmt: skip


@case(2, 4)
def dp_entropy_mask_over_the_group(ctx):
    """entropy_mask_quantile with entropy_mask_group: the quantile of every rank's masked-in entropies
    (ranks with different batch sizes), on both backends and from hidden states; the reference gathers
    the same way."""
    from sspo_kernels import sspo_loss_from_hidden

    lengths = [LENGTHS, [3, 8], [6, 0, 7, 2], [9]][ctx.rank]
    b = make_batch(170 + ctx.rank, lengths, vocab=V, hole_p=0.2)
    b = pack(b) if ctx.rank % 2 else b
    opts = dict(entropy_mask_quantile=0.4, entropy_mask_group=ctx.world_group, objective="cispo")
    for backend in ("torch", "triton"):
        args, kw, ref, grad_ref, up = _reference(b, "subsentence", **opts)
        leaf = b.logits.detach().float().requires_grad_(True)
        out = sspo_loss(leaf, *args[1:], backend=backend, **kw)
        _backward(out, up)
        _compare(out, ref)
        assert_rel_norm("dlogits", leaf.grad, grad_ref, tol=1e-5)
        local = reference.sspo_loss(b.fresh_logits(), *args[1:], **{**kw, "entropy_mask_group": None})
        if ctx.rank == 0:  # the group's quantile is not this rank's own (this batch differs)
            assert not torch.equal(local.metrics["entropy_masked_frac"], ref.metrics["entropy_masked_frac"])
    gen = torch.Generator().manual_seed(171)
    hidden = torch.randn(*b.tokens.shape, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, 8, generator=gen, dtype=torch.float64) * 0.5
    b.logits = (hidden @ weight.T).requires_grad_(True)
    args, kw, ref, _, up = _reference(b, "subsentence", **opts)
    h = hidden.float().requires_grad_(True)
    out = sspo_loss_from_hidden(h, weight.float(), *args[1:], **kw)
    _backward(out, up)
    _compare(out, ref)


# ---------------------------------------------------------------- fused linear (tensor parallel)


@case(2, 4)
def tp_fused_linear(ctx):
    """weight / bias sliced by vocabulary; the hidden gradient is this rank's partial sum, or the
    full one with reduce_hidden_grad=True."""
    from sspo_kernels import sspo_loss_from_hidden

    for i, (reduce, packed, g) in enumerate(((False, True, "subsentence"), (True, False, "sequence"))):
        b = _batch(200 + i, packed=packed)
        gen = torch.Generator().manual_seed(200 + i)
        hidden = torch.randn(*b.tokens.shape, 8, generator=gen)
        weight, bias = torch.randn(V, 8, generator=gen) * 0.5, torch.randn(V, generator=gen) * 0.1
        ref_leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
        b.logits = (ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2]).detach().requires_grad_(True)
        _old_near_current(b, 200 + i)
        args, kw, ref, _, up = _reference(b, g, entropy_coef=0.01)
        ref_logits = ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2]
        ref2 = reference.sspo_loss(ref_logits, *args[1:], **kw)
        (ref2.loss * up).sum().backward()
        lo, hi = _splits(ctx.world, True)[ctx.rank]
        h = hidden.clone().requires_grad_(True)
        w = weight[lo:hi].clone().requires_grad_(True)
        bb = bias[lo:hi].clone().requires_grad_(True)
        ctx.counter.install()
        out = sspo_loss_from_hidden(h, w, *args[1:], bias=bb, backend="torch", chunk_size=7, tp_group=ctx.world_group,
                                    vocab_start=lo, reduce_hidden_grad=reduce, **kw)  # fmt: skip
        fwd = ctx.counter.take()
        _backward(out, up)
        bwd = ctx.counter.take()
        ctx.counter.uninstall()
        assert len(fwd) == 2, fwd
        assert len(bwd) == (1 if reduce else 0), bwd
        _compare(out, ref)
        assert_rel_norm("dweight (this rank's rows)", w.grad, ref_leaves[1].grad[lo:hi], tol=1e-5)
        assert_rel_norm("dbias (this rank's entries)", bb.grad, ref_leaves[2].grad[lo:hi], tol=1e-5)
        dh = h.grad.clone()
        if not reduce:  # a partial sum: the group's SUM is the gradient
            dist.all_reduce(dh, group=ctx.world_group)
        assert_rel_norm("dhidden", dh, ref_leaves[0].grad, tol=1e-5)


@case(2, 4)
def tp_fused_linear_every_granularity(ctx):
    """Every granularity with the default chunk size and vocab_start (an even split): token and
    sequence granularity have no boundary table, so the full vocabulary size is unknown to the call.
    Each with another objective and correction."""
    from sspo_kernels import sspo_loss_from_hidden

    vocab = 36  # splits evenly over 2 and 4 ranks
    for i, g in enumerate(GRANULARITIES):
        b = make_batch(230 + i, LENGTHS, vocab=vocab, hole_p=0.2)
        b = pack(b) if i % 2 else b
        gen = torch.Generator().manual_seed(230 + i)
        hidden = torch.randn(*b.tokens.shape, 8, generator=gen)
        weight = torch.randn(vocab, 8, generator=gen) * 0.5
        ref_leaves = [t.double().requires_grad_(True) for t in (hidden, weight)]
        b.logits = (ref_leaves[0] @ ref_leaves[1].T).detach().requires_grad_(True)
        _old_near_current(b, 230 + i)
        opts = build_options(b, OBJECTIVES[i], list(CORRECTIONS)[2 * i + 1], 230 + i)  # and an objective
        args, kw, ref, _, up = _reference(b, g, **opts)
        ref2 = reference.sspo_loss(ref_leaves[0] @ ref_leaves[1].T, *args[1:], **kw)
        (ref2.loss * up).sum().backward()
        share = vocab // ctx.world
        h = hidden.clone().requires_grad_(True)
        w = weight[ctx.rank * share : (ctx.rank + 1) * share].clone().requires_grad_(True)
        out = sspo_loss_from_hidden(h, w, *args[1:], tp_group=ctx.world_group, reduce_hidden_grad=True, **kw)
        _backward(out, up)
        _compare(out, ref)
        assert_rel_norm("dweight (this rank's rows)", w.grad, ref_leaves[1].grad[ctx.rank * share :][:share], tol=1e-5)
        assert_rel_norm("dhidden", h.grad, ref_leaves[0].grad, tol=1e-5)


# ---------------------------------------------------------------- data parallel


@case(2, 4)
def dp_normalisers(ctx):
    """Each rank holds some responses; with `normalizer=global_normalizer(...)` and
    `entropy_ref=global_entropy_mean(...)` the mean over ranks of the weight gradients (what DDP /
    FSDP compute) is the single-process gradient of the whole batch, and so is the mean loss."""
    from sspo_kernels import sspo_loss_from_hidden
    from sspo_kernels.distributed import global_entropy_mean, global_normalizer

    lengths = [5, 0, 9, 3, 7, 4, 8, 2]
    for i, mode in enumerate(("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")):
        b = make_batch(300 + i, lengths, vocab=V, hole_p=0.2)
        gen = torch.Generator().manual_seed(300 + i)
        hidden = torch.randn(*b.tokens.shape, 8, generator=gen, dtype=torch.float64)
        weight = (torch.randn(V, 8, generator=gen, dtype=torch.float64) * 0.5).requires_grad_(True)
        args, kw = b.inputs("subsentence")
        ref = reference.sspo_loss(hidden @ weight.T, *args[1:], loss_agg_mode=mode, **kw)
        ref.loss.backward()
        rows = torch.arange(ctx.rank, len(lengths), ctx.world)  # responses r, r + W, ...
        local = dict(kw, boundary=b.boundary)
        tokens, old, adv, mask = (t[rows] for t in args[1:])
        local["ref_logprobs"] = kw["ref_logprobs"][rows]
        norm = global_normalizer(mask, mode, group=ctx.world_group)
        w = weight.detach().float().requires_grad_(True)
        h32 = hidden[rows].float()
        ent = sspo_loss(h32 @ w.detach().T, tokens, old, adv, mask, **local).entropy
        h_ref = global_entropy_mean(ent, mask, group=ctx.world_group)
        assert h_ref.dim() == 0 and h_ref.dtype == torch.float32
        out = sspo_loss(h32 @ w.T, tokens, old, adv, mask, loss_agg_mode=mode, normalizer=norm, entropy_ref=h_ref,
                        **local)  # fmt: skip
        out.loss.backward()
        w2 = w.detach().clone().requires_grad_(True)  # the single-pass fused schedule takes the tensor entropy_ref
        out2 = sspo_loss_from_hidden(h32, w2, tokens, old, adv, mask, loss_agg_mode=mode, normalizer=norm,
                                     entropy_ref=h_ref, single_pass=True, backend="torch", **local)  # fmt: skip
        out2.loss.backward()
        for name, t in (("mean loss", out.loss.detach().clone()), ("dweight", w.grad), ("dweight fused", w2.grad)):
            dist.all_reduce(t, group=ctx.world_group)
            t /= ctx.world
            check = assert_close if t.dim() == 0 else lambda n, a, e: assert_rel_norm(n, a, e, tol=1e-5)
            check(name, t, ref.loss if t.dim() == 0 else weight.grad, **({"atol": 1e-5} if t.dim() == 0 else {}))


# ---------------------------------------------------------------- torch.compile, then a broken group


@case(2)
def tp_torch_compile_fullgraph(ctx):
    """A TP call traces into one graph with its two collectives (aot_eager: inductor adds ~30 s)."""
    b = _batch(400, packed=False)
    args, kw = b.inputs("subsentence")
    lo, hi = _splits(2, True)[ctx.rank]
    group = ctx.world_group

    def fn(logits):
        return sspo_loss(logits, *args[1:], backend="torch", tp_group=group, vocab_start=lo, **kw).loss

    eager_leaf = b.logits.detach()[..., lo:hi].float().requires_grad_(True)
    compiled_leaf = eager_leaf.detach().clone().requires_grad_(True)
    eager = fn(eager_leaf)
    eager.backward()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(compiled_leaf)
    compiled.backward()
    assert_close("compiled loss", compiled, eager, atol=1e-6)
    assert_rel_norm("compiled dlogits", compiled_leaf.grad, eager_leaf.grad, tol=1e-6)
