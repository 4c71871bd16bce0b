"""Tensor-parallel `token_logprobs` / `token_logprobs_from_hidden`, run for real on 2 and 4 gloo processes.

Every rank builds the same inputs from a seed, computes the float64 reference on the full vocabulary, runs the op
on its own vocabulary slice (uneven splits, explicit `vocab_start`) and checks its outputs (the full-vocabulary
log-probs and entropies), the gradient of its own columns / rows, the hidden gradient (this rank's partial sum,
or the full one with `reduce_hidden_grad=True`) and the collectives: 2 in the forward, none in the backward (one
N x H SUM with `reduce_hidden_grad=True`); and verl's `linear_cross_entropy` contract under Megatron's tensor
parallelism (its body in tests/test_integration_verl_fused.py). One spawn per world size runs every case
(`spawn_cases`); a case's failure is reported by its own pytest test.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from _collectives import spawn_ranks

pytestmark = pytest.mark.distributed

IGNORE = -100
V, H = 37, 10
SPLITS = {2: [0, 11, V], 4: [0, 6, 19, 20, V]}  # uneven, one rank with a single column
CASES: list[tuple[str, Callable, tuple[int, ...]]] = []


def case(*worlds: int):
    def register(fn):
        CASES.append((fn.__name__, fn, worlds))
        return fn

    return register


def cases_for(world: int) -> list[tuple[str, Callable]]:
    return [(name, fn) for name, fn, worlds in CASES if world in worlds]


# ---------------------------------------------------------------- the spawn (shared with the verl tests)


def _worker(rank: int, world: int, init_file: str, out_dir: str, module_name: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before sspo_kernels is imported
    os.environ.setdefault("SSPO_KERNELS_POISON", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    module = importlib.import_module(module_name)
    group = dist.new_group(list(range(world)))  # never the default group
    results: dict[str, str | None] = {}
    for name, fn in module.cases_for(world):
        try:
            fn(rank, world, group)
            results[name] = None
        except Exception as exc:  # reported by the pytest test of this case
            results[name] = f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            print(f"[{name}] {results[name]}", file=sys.stderr, flush=True)
        ok = torch.tensor([0.0 if results[name] is None else 1.0])
        dist.all_reduce(ok, group=group)  # keeps the ranks in step after a failure
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def spawn_cases(world: int, module_name: str, deadline_s: float = 180) -> list[dict[str, str | None]]:
    """Run every case of `module_name` (its `cases_for(world)`) in `world` gloo processes; each rank's
    {case: None or its error}."""
    make_args = lambda tmp: (world, os.path.join(tmp, "init"), tmp, module_name)
    return spawn_ranks(_worker, world, deadline_s, f"sspo-tl{world}-", make_args)


# ---------------------------------------------------------------- cases


def _inputs(seed: int, shape=(3, 5)):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.7
    bias = torch.randn(V, generator=gen) * 0.3
    tokens = torch.randint(0, V, shape, generator=gen)
    tokens[0, 1] = IGNORE
    g, e = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return hidden, weight, bias, tokens, g, e


def _reference(logits, tokens, g, e, tau):
    from reference import naive_logprob_entropy

    x = logits.detach().double().requires_grad_(True)
    logp, ent = naive_logprob_entropy(x, tokens, tau)
    keep = tokens != IGNORE
    logp, ent = torch.where(keep, logp, 0.0), torch.where(keep, ent, 0.0)
    ((g.double() * logp).sum() + (e.double() * ent).sum()).backward()
    return logp.detach(), ent.detach(), x


@contextlib.contextmanager
def _counted():
    """Yields a list that holds, on exit, the names of the collectives issued inside."""
    from _collectives import Counter

    names: list[str] = []
    counter = Counter().install()
    try:
        yield names
    finally:
        counter.uninstall()
        names.extend(c[0] for c in counter.calls)


@case(2, 4)
def logits_tp(rank, world, group):
    from _assert import assert_close, assert_rel_norm

    from sspo_kernels import token_logprobs

    *_, tokens, g, e = _inputs(1)
    logits = torch.randn(3, 5, V, generator=torch.Generator().manual_seed(2)) * 2
    start, end = SPLITS[world][rank], SPLITS[world][rank + 1]
    local = logits[..., start:end].clone().requires_grad_(True)
    with _counted() as fwd:
        logp, ent = token_logprobs(local, tokens, temperature=0.8, tp_group=group, vocab_start=start)
    with _counted() as bwd:
        torch.autograd.backward([logp, ent], [g, e])
    ref_logp, ref_ent, x = _reference(logits, tokens, g, e, 0.8)
    assert fwd == ["all_reduce", "all_reduce"] and bwd == [], (fwd, bwd)
    assert_close("logprobs", logp, ref_logp, atol=1e-5)
    assert_close("entropy", ent, ref_ent, atol=1e-5)
    assert_rel_norm("dlogits (local columns)", local.grad, x.grad[..., start:end], tol=1e-5)


@case(2, 4)
def hidden_tp(rank, world, group):
    from _assert import assert_close, assert_rel_norm

    from sspo_kernels import token_logprobs_from_hidden

    hidden, weight, bias, tokens, g, e = _inputs(3)
    start, end = SPLITS[world][rank], SPLITS[world][rank + 1]
    for reduce in (False, True):
        h = hidden.clone().requires_grad_(True)
        w = weight[start:end].clone().requires_grad_(True)
        b = bias[start:end].clone().requires_grad_(True)
        with _counted() as fwd:
            logp, ent = token_logprobs_from_hidden(
                h, w, tokens, bias=b, temperature=1.3, tp_group=group, vocab_start=start, chunk_size=4,
                reduce_hidden_grad=reduce,
            )  # fmt: skip
        with _counted() as bwd:
            torch.autograd.backward([logp, ent], [g, e])
        assert fwd == ["all_reduce", "all_reduce"] and bwd == (["all_reduce"] if reduce else []), (fwd, bwd)
        hd, wd, bd = (t.detach().double().requires_grad_(True) for t in (hidden, weight, bias))
        ref_logp, ref_ent, x = _reference(hd @ wd.T + bd, tokens, g, e, 1.3)
        ((x.grad * (hd @ wd.T + bd)).sum()).backward()  # the chain rule to hidden, weight, bias
        assert_close("logprobs", logp, ref_logp, atol=1e-5)
        assert_close("entropy", ent, ref_ent, atol=1e-5)
        assert_rel_norm("dweight (local rows)", w.grad, wd.grad[start:end], tol=1e-5)
        assert_rel_norm("dbias (local rows)", b.grad, bd.grad[start:end], tol=1e-5)
        dh = h.grad.clone()
        if not reduce:
            dist.all_reduce(dh, group=group)  # the partial sums add up to the full gradient
        assert_rel_norm("dhidden", dh, hd.grad, tol=1e-5)
    with torch.no_grad(), _counted() as calls:
        frozen, _ = token_logprobs_from_hidden(hidden, weight[start:end], tokens, tp_group=group, vocab_start=start)
    assert calls == ["all_reduce", "all_reduce"] and frozen.grad_fn is None


@case(2)
def token_owned_by_no_rank(rank, world, group):
    """An id past the last shard is an error on every rank (the merge's owner count), -100 is not."""
    from sspo_kernels import token_logprobs

    start, end = SPLITS[world][rank], SPLITS[world][rank + 1]
    logits = torch.randn(2, 4, V)[..., start:end]
    tokens = torch.tensor([[1, 2, IGNORE, 4], [5, V + 3, 7, 8]])
    try:
        token_logprobs(logits, tokens, tp_group=group, vocab_start=start)
    except ValueError as exc:
        assert "exactly one rank's vocabulary range" in str(exc), exc
    else:
        raise AssertionError("no error for a token id outside every shard")


@case(2)
def verl_linear_cross_entropy_tp(rank, world, group):
    """verl's `linear_cross_entropy` contract under Megatron's tensor parallelism (tests/test_integration_verl_fused.py
    holds the body); nothing to check without verl installed."""
    if importlib.util.find_spec("verl") is None:
        return
    from test_integration_verl_fused import megatron_tp

    megatron_tp(rank, world, group)


# ---------------------------------------------------------------- pytest


@pytest.fixture(scope="module")
def runs():
    cache: dict[int, list | BaseException] = {}

    def get(world: int):
        if world not in cache:
            try:
                cache[world] = spawn_cases(world, __name__)
            except BaseException as exc:  # every case of this world size reports the crash
                cache[world] = exc
        if isinstance(cache[world], BaseException):
            raise cache[world]
        return cache[world]

    return get


IDS = [(w, name) for w in (2, 4) for name, _ in cases_for(w)]


@pytest.mark.parametrize(("world", "name"), IDS, ids=[f"w{w}-{n}" for w, n in IDS])
def test_case(runs, world, name):
    errors = [r[name] for r in runs(world) if r[name]]
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
