"""CPU side-by-side: `sspo_loss_from_hidden` against Liger-Kernel's `LigerFusedLinearGRPOLoss`.

Both compute the same loss at token granularity: per-token PPO-clip with one eps on both sides, no
KL term (beta = 0), averaged over the masked-in tokens (our "token-mean" is Liger's "dapo" / "bnpo"
normaliser on one process; `--loss-type grpo` is our "seq-mean-token-mean"). Ours also returns the
per-token entropy and log-probs and supports segments; Liger runs with `compiled=False` (its
torch.compile path is for GPUs). Liger always gets the padded `(B, T, H)` batch; with `--packed` ours
gets the same rows flattened to `(B*T, H)` with a CPU `cu_seqlens` (every response spans its T rows,
padding masked out), so both do the same FLOPs; `--no-bias` drops the output projection's bias.

For each implementation: agreement with Liger (loss and the hidden / weight / bias gradients, from the
timed runs themselves), the median wall time of forward + backward over `repeats` interleaved runs
after one warm-up, and the peak extra memory of one forward + backward, measured by replaying the
torch profiler's allocation events (gradients included, the inputs not).

    python -m bench.liger_compare                    # N=2048, H=1024, V=32000, fp32 (about 5 min on 2 cores)
    python -m bench.liger_compare --packed --no-bias --threads 1 --repeats 9   # issue 11's target case
    python -m bench.liger_compare --quick --json out.json

`compare(...)` returns the rows (dicts) for a benchmark runner; it returns [] when liger-kernel is
not installed (`liger_unavailable()` says why), and `main` then prints the reason and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from bench.memory import peak_extra_bytes

if __package__ in (None, ""):  # run as `python bench/liger_compare.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sspo_kernels.fused_linear import sspo_loss_from_hidden

EPS = 0.2  # Liger's default epsilon_low = epsilon_high
LOG_RATIO_SCALE = 0.1  # old log-probs = current ones + N(0, 0.1^2): some tokens clip at 1 +- 0.2
# Liger's loss_type -> our loss_agg_mode for the same loss on one process
LOSS_TYPES = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean"}


def liger_unavailable() -> str | None:
    """None when liger-kernel's fused GRPO loss imports, else the reason."""
    try:
        importlib.import_module("liger_kernel.chunked_loss")
    except ImportError as exc:
        return f"liger-kernel not installed ({exc}); pip install liger-kernel --no-deps"
    return None


def make_inputs(
    n: int, hidden: int, vocab: int, batch: int, dtype: torch.dtype, seed: int = 0, bias: bool = True,
    packed: bool = False, loss_type: str = "dapo",
) -> dict:  # fmt: skip
    """A padded (batch, n // batch) problem: responses of 3/4 to all of T tokens, valid ids everywhere.
    `packed`: ours reads it as (n, H) rows with a CPU cu_seqlens of `batch` responses of T rows."""
    gen = torch.Generator().manual_seed(seed)
    t = n // batch
    lengths = torch.randint(3 * t // 4, t + 1, (batch,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    inputs = {
        "hidden": torch.randn(batch, t, hidden, generator=gen).to(dtype).requires_grad_(True),
        "weight": (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).to(dtype).requires_grad_(True),
        "bias": (0.1 * torch.randn(vocab, generator=gen)).to(dtype).requires_grad_(True),
        "tokens": torch.randint(0, vocab, (batch, t), generator=gen),
        "mask": mask,
        "advantages": torch.randn(batch, generator=gen),
        "cu_seqlens": torch.arange(0, batch * t + 1, t) if packed else None,
        "loss_type": loss_type,
    }
    if not bias:
        inputs["bias"] = None
    with torch.no_grad():
        current = _ours(inputs, old=torch.zeros(batch, t))().logprobs.reshape(batch, t)
    noise = LOG_RATIO_SCALE * torch.randn(batch, t, generator=gen)
    inputs["old_logprobs"] = torch.where(mask, current + noise, 0.0)
    return inputs


def _ours(inputs: dict, old: torch.Tensor | None = None, **options) -> Callable:
    def run():
        hidden, tokens, mask = inputs["hidden"], inputs["tokens"], inputs["mask"]
        old_logprobs = inputs["old_logprobs"] if old is None else old
        if inputs["cu_seqlens"] is not None:  # the same rows as a packed batch (a view: no copy)
            hidden, tokens, mask = hidden.flatten(0, 1), tokens.flatten(), mask.flatten()
            old_logprobs = old_logprobs.flatten()
        return sspo_loss_from_hidden(
            hidden, inputs["weight"], tokens, old_logprobs, inputs["advantages"], mask,
            bias=inputs["bias"], cu_seqlens=inputs["cu_seqlens"], granularity="token", eps_low=EPS,
            eps_high=EPS, entropy_gamma=0.0, loss_agg_mode=LOSS_TYPES[inputs["loss_type"]], backend="torch",
            **options,
        )  # fmt: skip

    return run


def _liger(inputs: dict) -> Callable:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(
        beta=0.0, compiled=False, use_ref_model=False, epsilon_low=EPS, epsilon_high=EPS,
        loss_type=inputs["loss_type"],
    )  # fmt: skip
    mask = inputs["mask"].float()
    return lambda: loss_fn(
        inputs["hidden"], inputs["weight"], inputs["tokens"], mask, inputs["advantages"], bias=inputs["bias"],
        old_per_token_logps=inputs["old_logprobs"],
    )[0]  # fmt: skip


OURS = ("sspo single-pass", "sspo two-phase", "sspo auto")


def implementations(
    inputs: dict, chunk_size: int | None = None, ours: tuple[str, ...] = OURS[:2]
) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> closure returning the scalar loss (with a graph); `ours` picks among `OURS` ("sspo auto":
    the schedule `sspo_loss_from_hidden` chooses by itself)."""
    schedules = dict(zip(OURS, (True, False, None)))
    impls = {
        name: lambda sp=schedules[name]: _ours(inputs, chunk_size=chunk_size, single_pass=sp)().loss for name in ours
    }
    if liger_unavailable() is None:
        impls["liger GRPO"] = _liger(inputs)
    return impls


def _params(inputs: dict) -> list[torch.Tensor]:
    return [p for p in (inputs["hidden"], inputs["weight"], inputs["bias"]) if p is not None]


def fwd_bwd(fn: Callable[[], torch.Tensor], inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward + backward from fresh gradients; returns the loss and the gradients."""
    for p in _params(inputs):
        p.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [p.grad for p in _params(inputs)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.double()
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-300)).item()


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def _pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, linearly interpolated."""
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def compare(
    n: int = 2048,
    hidden: int = 1024,
    vocab: int = 32000,
    batch: int = 8,
    dtype: str = "fp32",
    repeats: int = 5,
    chunk_size: int | None = None,
    seed: int = 0,
    bias: bool = True,
    packed: bool = False,
    loss_type: str = "dapo",
    ours: tuple[str, ...] = OURS[:2],
) -> list[dict]:
    """One row per implementation: agreement with Liger, median fwd+bwd time, peak extra memory."""
    if liger_unavailable() is not None:
        return []
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    inputs = make_inputs(n, hidden, vocab, batch, torch_dtype, seed, bias=bias, packed=packed, loss_type=loss_type)
    impls = implementations(inputs, chunk_size, ours)
    results = {name: fwd_bwd(fn, inputs) for name, fn in impls.items()}  # warm-up, and the agreement check
    times: dict[str, list[float]] = {name: [] for name in impls}
    load_before = os.getloadavg()[0]
    for _ in range(repeats):  # interleaved, so a change in machine load hits every implementation alike
        for name, fn in impls.items():
            start = time.perf_counter()
            fwd_bwd(fn, inputs)
            times[name].append(time.perf_counter() - start)
    peaks = {}
    for name, fn in impls.items():
        for p in _params(inputs):
            p.grad = None
        peaks[name] = peak_extra_bytes(lambda fn=fn: fwd_bwd(fn, inputs))
    load_after = os.getloadavg()[0]

    liger_loss, liger_grads = results["liger GRPO"]
    liger_time = statistics.median(times["liger GRPO"])
    rows = []
    for name in impls:
        loss, grads = results[name]
        median = statistics.median(times[name])
        paired = [t_liger / t for t_liger, t in zip(times["liger GRPO"], times[name])]  # same round, same load
        diffs = dict(zip(("hidden", "weight", "bias"), (_rel(g, g_liger) for g, g_liger in zip(grads, liger_grads))))
        rows.append({
            "impl": name, "n": n, "hidden": hidden, "vocab": vocab, "batch": batch, "dtype": dtype,
            "chunk_size": chunk_size, "repeats": repeats, "bias": bias, "packed": packed, "loss_type": loss_type,
            "loss": loss.item(), "loss_abs_diff_vs_liger": abs(loss.item() - liger_loss.item()),
            **{f"grad_{k}_rel_diff_vs_liger": diffs.get(k, float("nan")) for k in ("hidden", "weight", "bias")},
            "time_median_s": median, "time_p20_s": _pct(times[name], 0.2), "time_p80_s": _pct(times[name], 0.8),
            "times_s": times[name], "time_vs_liger": median / liger_time, "speedup_vs_liger": liger_time / median,
            "speedup_paired_p20": _pct(paired, 0.2), "speedup_paired_p80": _pct(paired, 0.8),
            "peak_extra_mib": peaks[name] / 2**20, "peak_vs_liger": peaks[name] / peaks["liger GRPO"],
            "load_avg_1min": [load_before, load_after], **machine(),
        })  # fmt: skip
    return rows


def format_table(rows: list[dict]) -> str:
    """time: median [p20-p80]; speedup: Liger's median / ours (> 1: faster) [p20-p80 of the same ratio
    within each interleaved round]; memory: ours / Liger's (< 1: less)."""
    head = (
        f"{'impl':18s} {'fwd+bwd median [p20-p80]':>26s} {'speedup [p20-p80]':>19s} {'peak extra':>11s} "
        f"{'mem/liger':>9s} "
        f"{'|dloss|':>9s} {'dgrad_h':>9s} {'dgrad_W':>9s} {'dgrad_b':>9s}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        spread = f"{r['time_median_s']:.3f}s [{r['time_p20_s']:.3f}-{r['time_p80_s']:.3f}]"
        speedup = f"{r['speedup_vs_liger']:.2f}x [{r['speedup_paired_p20']:.2f}-{r['speedup_paired_p80']:.2f}]"
        lines.append(
            f"{r['impl']:18s} {spread:>26s} {speedup:>19s} {r['peak_extra_mib']:8.1f}MiB "
            f"{r['peak_vs_liger']:8.2f}x {r['loss_abs_diff_vs_liger']:9.1e} {r['grad_hidden_rel_diff_vs_liger']:9.1e} "
            f"{r['grad_weight_rel_diff_vs_liger']:9.1e} "
            + (f"{r['grad_bias_rel_diff_vs_liger']:9.1e}" if r.get("bias", True) else f"{'-':>9s}")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2048, help="tokens (batch x T)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8, help="responses (Liger chunks by response)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=None, help="our tokens per chunk (default heuristic)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--packed", action="store_true", help="ours gets a packed (N, H) batch with CPU cu_seqlens")
    parser.add_argument("--no-bias", action="store_true", help="no output-projection bias")
    parser.add_argument("--loss-type", choices=sorted(LOSS_TYPES), default="dapo", help="Liger's loss_type")
    parser.add_argument("--ours", nargs="+", choices=OURS, default=list(OURS[:2]), help="our schedules to run")
    parser.add_argument("--quick", action="store_true", help="N=512, H=256, V=8000, 3 repeats")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    reason = liger_unavailable()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    size = dict(n=512, hidden=256, vocab=8000, repeats=3) if args.quick else {}
    kwargs = dict(n=args.n, hidden=args.hidden, vocab=args.vocab, repeats=args.repeats) | size
    rows = compare(
        batch=args.batch, dtype=args.dtype, chunk_size=args.chunk_size, bias=not args.no_bias, packed=args.packed,
        loss_type=args.loss_type, ours=tuple(args.ours), **kwargs,
    )  # fmt: skip
    r = rows[0]
    layout = "packed (N, H) with CPU cu_seqlens" if r["packed"] else "padded (B, T, H)"
    print(f"N={r['n']} H={r['hidden']} V={r['vocab']} {r['dtype']}, batch {r['batch']}, {layout}, "
          f"{'bias' if r['bias'] else 'no bias'}, loss_type {r['loss_type']}, {r['repeats']} repeats; {r['cpu']}, "
          f"{r['cores']} cores, {r['torch_threads']} torch threads, torch {r['torch']}; "
          f"load average {r['load_avg_1min'][0]:.1f} -> {r['load_avg_1min'][1]:.1f}")  # fmt: skip
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
