"""Side by side: `token_logprobs_from_hidden` against verl's and TRL's fused log-prob heads.

All three compute per-token log-probs and entropies of softmax(hidden @ weight.T / T) without the whole
logits, and differentiate both outputs:
- ours: `sspo_kernels.token_logprobs_from_hidden` (default chunks, default backend for the device);
- verl 0.9.1: `FusedLinearForPPO(chunk_size=512, impl_backend="torch")`, what verl's fused forward runs with
  `impl_backend=torch`;
- TRL 1.16: `ChunkedLogProbFunction` with the chunk sizes of its fused head (4096 tokens x 32768 vocabulary
  tiles, outputs log-probs and entropy), what `GRPOTrainer`'s head runs.

Three modes, each timed over `repeats` interleaved rounds after a warm-up (median and p20-p80) with its peak
extra memory (CPU: the torch profiler's allocation events, `bench/memory.py`; GPU: the caching allocator's
peak): the forward under no_grad (old-policy / reference passes), forward + backward with an upstream
gradient for the log-probs only (TRL's loss, the entropy detached), and with upstream gradients for both
(verl's actor, whose entropy term always reaches the backward). Hidden states and weight both require grad.
The agreement of every implementation with ours (outputs and gradients, from the timed runs) is printed too.

    python -m bench.logprobs_compare                       # N=2048, H=1024, V=32000 fp32 on the CPU (~5 min, 2 cores)
    python -m bench.logprobs_compare --device cuda --dtype bf16 --n 8192 --hidden 4096 --vocab 151936
    python -m bench.logprobs_compare --quick --json out.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

if __package__ in (None, ""):  # run as `python bench/logprobs_compare.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.memory import peak_extra_bytes
from sspo_kernels import token_logprobs_from_hidden

MODES = ("forward (no grad)", "fwd+bwd (dlogp)", "fwd+bwd (dlogp, dH)")
TEMPERATURE = 0.9
VERL_CHUNK = 512  # verl's FusedLinearForPPO default
TRL_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE (its token tile is 4096)


def make_inputs(n: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(n, hidden, generator=gen).to(device, dtype).requires_grad_(True),
        "weight": (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).to(device, dtype).requires_grad_(True),
        "tokens": torch.randint(0, vocab, (n,), generator=gen).to(device),
        "g": torch.randn(n, generator=gen).to(device),
        "e": torch.randn(n, generator=gen).to(device),
    }


def implementations() -> dict[str, Callable[[dict], tuple[torch.Tensor, torch.Tensor]]]:
    """name -> fn(inputs) -> (logprobs, entropy); verl's and TRL's only when installed."""

    def ours(x):
        return token_logprobs_from_hidden(x["hidden"], x["weight"], x["tokens"], temperature=TEMPERATURE)

    impls = {"sspo token_logprobs_from_hidden": ours}
    if importlib.util.find_spec("verl") is not None:
        from verl.utils.experimental.torch_functional import FusedLinearForPPO

        head = FusedLinearForPPO(chunk_size=VERL_CHUNK, impl_backend="torch")
        impls["verl FusedLinearForPPO (torch, 512)"] = lambda x: head(
            x["hidden"], x["weight"], x["tokens"], temperature=TEMPERATURE
        )
    if importlib.util.find_spec("trl") is not None:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        def trl(x):
            out = ChunkedLogProbFunction.apply(
                x["hidden"], x["weight"], None, x["tokens"], TEMPERATURE, TRL_VOCAB_TILE, None, 1.0,
                ("log_probs", "entropy"),
            )  # fmt: skip
            return out[0], out[1]

        impls["TRL 1.16 chunked head"] = trl
    return impls


def run(fn: Callable, x: dict, mode: str) -> tuple[torch.Tensor, ...]:
    """One call in `mode` from fresh gradients: (logprobs, entropy[, dhidden, dweight])."""
    _drop_grads(x)
    if mode == MODES[0]:
        with torch.no_grad():
            return fn(x)
    logp, ent = fn(x)
    if mode == MODES[1]:
        logp.backward(x["g"])
    else:
        torch.autograd.backward([logp, ent], [x["g"], x["e"]])
    return logp.detach(), ent.detach(), x["hidden"].grad, x["weight"].grad


def _drop_grads(x: dict) -> None:
    x["hidden"].grad = x["weight"].grad = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak(fn: Callable[[], object], device: str) -> int:
    if device != "cuda":
        return peak_extra_bytes(fn)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs, relative norm) of a - b."""
    d = a.detach().double() - b.detach().double()
    return float(d.abs().max()), float(d.norm() / b.detach().double().norm().clamp(min=1e-300))


def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "triton": triton_version, "gpu": gpu,
    }  # fmt: skip


def compare(
    n: int = 2048, hidden: int = 1024, vocab: int = 32000, dtype: str = "fp32", device: str = "cpu", repeats: int = 5
) -> list[dict]:
    """One row per (mode, implementation): median time [p20-p80], peak extra memory, agreement with ours."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    x = make_inputs(n, hidden, vocab, torch_dtype, device)
    impls = implementations()
    ours = next(iter(impls))
    rows = []
    load_before = os.getloadavg()[0]
    for mode in MODES:
        results = {name: run(fn, x, mode) for name, fn in impls.items()}  # warm-up and the agreement check
        results = {k: tuple(t.clone() for t in v) for k, v in results.items()}
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(repeats):  # interleaved: a change in machine load hits every implementation alike
            for name, fn in impls.items():
                _sync(device)
                start = time.perf_counter()
                run(fn, x, mode)
                _sync(device)
                times[name].append(time.perf_counter() - start)
        for name, fn in impls.items():
            _drop_grads(x)  # freed before the measurement: the profiler cannot size blocks allocated before it
            gc.collect()
            peak = _peak(lambda fn=fn, mode=mode: run(fn, x, mode), device)
            diffs = [_diff(a, b) for a, b in zip(results[name], results[ours])]
            rows.append({
                "mode": mode, "impl": name, "n": n, "hidden": hidden, "vocab": vocab, "dtype": dtype,
                "device": device, "repeats": repeats, "times_s": times[name],
                "time_median_s": statistics.median(times[name]), "time_p20_s": _pct(times[name], 0.2),
                "time_p80_s": _pct(times[name], 0.8), "peak_extra_mib": peak / 2**20,
                "max_abs_logp_vs_ours": diffs[0][0], "max_abs_entropy_vs_ours": diffs[1][0],
                "rel_dhidden_vs_ours": diffs[2][1] if len(diffs) > 2 else None,
                "rel_dweight_vs_ours": diffs[3][1] if len(diffs) > 3 else None,
            })  # fmt: skip
        for row in rows[-len(impls) :]:
            base = next(r for r in rows[-len(impls) :] if r["impl"] == ours)
            paired = [t / t_ours for t, t_ours in zip(row["times_s"], base["times_s"])]  # same round, same load
            row["time_vs_ours"] = row["time_median_s"] / base["time_median_s"]
            row["paired_vs_ours_p20"], row["paired_vs_ours_p80"] = _pct(paired, 0.2), _pct(paired, 0.8)
            row["memory_vs_ours"] = row["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9)
    load = [load_before, os.getloadavg()[0]]
    for row in rows:
        row.update(machine(device), load_avg_1min=load)
    return rows


def format_table(rows: list[dict]) -> str:
    """time: median [p20-p80] seconds; x ours: their median / ours (> 1: ours faster) [p20-p80 of the same
    ratio within each interleaved round]; memory: their peak / ours."""
    head = (
        f"{'mode':20s} {'implementation':36s} {'median [p20-p80]':>24s} {'x ours [paired]':>19s} {'peak extra':>11s} "
        f"{'x ours':>7s} {'|dlogp|':>8s} {'|dH|':>8s} {'dh rel':>8s} {'dW rel':>8s}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        spread = f"{r['time_median_s']:.3f}s [{r['time_p20_s']:.3f}-{r['time_p80_s']:.3f}]"
        ratio = f"{r['time_vs_ours']:.2f}x [{r['paired_vs_ours_p20']:.2f}-{r['paired_vs_ours_p80']:.2f}]"
        grads = "".join(
            f" {r[k]:8.1e}" if r[k] is not None else f" {'-':>8s}"
            for k in ("rel_dhidden_vs_ours", "rel_dweight_vs_ours")
        )
        lines.append(
            f"{r['mode']:20s} {r['impl']:36s} {spread:>24s} {ratio:>19s} {r['peak_extra_mib']:8.1f}MiB "
            f"{r['memory_vs_ours']:6.2f}x {r['max_abs_logp_vs_ours']:8.1e} {r['max_abs_entropy_vs_ours']:8.1e}{grads}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2048, help="tokens")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="N=256, H=128, V=4000, 2 repeats")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = dict(n=256, hidden=128, vocab=4000, repeats=2) if args.quick else {}
    kwargs = dict(n=args.n, hidden=args.hidden, vocab=args.vocab, repeats=args.repeats) | size
    rows = compare(dtype=args.dtype, device=args.device, **kwargs)
    r = rows[0]
    where = r["gpu"] or f"{r['cpu']}, {r['cores']} cores, {r['torch_threads']} torch threads"
    print(
        f"N={r['n']} H={r['hidden']} V={r['vocab']} {r['dtype']} on {r['device']}, temperature {TEMPERATURE}, "
        f"{r['repeats']} repeats; {where}; torch {r['torch']}, triton {r['triton']}; "
        f"load average {r['load_avg_1min'][0]:.1f} -> {r['load_avg_1min'][1]:.1f}"
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
