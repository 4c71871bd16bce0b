"""Tensor-parallel `sspo_loss` on the CPU: W gloo processes, each with V / W of the vocabulary, against one
process with all of it.

    python -m bench.distributed [--tokens 1024] [--vocab 32000] [--worlds 2 4] [--repeats 5] [--backend torch]

Every rank times forward and forward+backward (median over repeats after one warm-up, the slowest rank
counts), and counts the torch.distributed calls of one forward and one backward with the bytes they
carry (the payload each rank hands to the collective, per token). On a GPU the same command with NCCL
is the later step (the shapes are the same); on the CPU the ranks share the cores, so the ratio mostly
shows the collectives' and the partial statistics' overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor")


def _inputs(n: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=gen) * 2
    tokens = torch.randint(0, vocab, (n,), generator=gen)
    old = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0] + 0.1 * torch.randn(n, generator=gen)
    cu = torch.tensor([0, n // 4, n // 2, 3 * n // 4, n])
    return logits, tokens, old, torch.randn(4, generator=gen), torch.ones(n, dtype=torch.bool), cu


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median ms of forward and of forward+backward."""
    fwd, both = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        out[0].backward()
        t2 = time.perf_counter()
        if i:  # the first call warms up
            fwd.append((t1 - t0) * 1e3)
            both.append((t2 - t0) * 1e3)
    return statistics.median(fwd), statistics.median(both)


class _Count:
    """Collective calls and payload bytes while installed (the names in COLLECTIVES)."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self.saved = {name: getattr(dist, name) for name in COLLECTIVES}
        for name, fn in self.saved.items():

            def wrapper(*args, _name=name, _fn=fn, **kwargs):
                t = args[0] if args and isinstance(args[0], torch.Tensor) else None
                self.calls.append((_name, 0 if t is None else t.numel() * t.element_size()))
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapper)

    def take(self) -> list[tuple[str, int]]:
        calls, self.calls = self.calls, []
        return calls

    def close(self) -> None:
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _run(logits, tokens, old, adv, mask, cu, backend: str, **tp):
    from sspo_kernels import sspo_loss

    leaf = logits.detach().requires_grad_(True)
    out = sspo_loss(leaf, tokens, old, adv, mask, cu_seqlens=cu, granularity="sequence", backend=backend, **tp)
    return out.loss, leaf


def _worker(rank: int, world: int, init: str, args, queue) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    logits, *rest = _inputs(args.tokens, args.vocab)
    start, end = args.vocab * rank // world, args.vocab * (rank + 1) // world
    local = logits[:, start:end].contiguous()
    tp = dict(tp_group=group, vocab_start=start)
    count = _Count()
    loss, _ = _run(local, *rest, args.backend, **tp)
    fwd_calls = count.take()
    loss.backward()
    bwd_calls = count.take()
    count.close()
    dist.barrier(group)
    fwd_ms, both_ms = _time(lambda: _run(local, *rest, args.backend, **tp), args.repeats)
    times = torch.tensor([fwd_ms, both_ms], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)  # the slowest rank sets the pace
    if rank == 0:
        queue.put((world, *times.tolist(), fwd_calls, bwd_calls))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="torch", choices=("torch", "triton"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    one_fwd, one_both = _time(lambda: _run(*_inputs(args.tokens, args.vocab), args.backend), args.repeats)
    print(f"TP sspo_loss, N={args.tokens} tokens, V={args.vocab}, fp32, backend={args.backend}, gloo on the CPU,")
    print("one thread per rank; times: median ms (slowest rank); ratio = W ranks / 1 process")
    print(
        f"{'ranks':>5} {'fwd ms':>9} {'fwd+bwd ms':>11} {'ratio':>6}  {'collectives fwd / bwd':>22}  bytes/token/rank"
    )
    print(f"{1:>5} {one_fwd:>9.1f} {one_both:>11.1f} {1.0:>6.2f}  {'0 / 0':>22}  0")
    context = mp.get_context("spawn")
    for world in args.worlds:
        queue = context.SimpleQueue()
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), args, queue), nprocs=world)
        _, fwd_ms, both_ms, fwd_calls, bwd_calls = queue.get()
        per_token = sum(b for _, b in fwd_calls + bwd_calls) / args.tokens
        names = "+".join(name for name, _ in fwd_calls) or "none"
        counts = f"{len(fwd_calls)} ({names}) / {len(bwd_calls)}"
        print(f"{world:>5} {fwd_ms:>9.1f} {both_ms:>11.1f} {both_ms / one_both:>6.2f}  {counts:>22}  {per_token:.1f}")


if __name__ == "__main__":
    main()
