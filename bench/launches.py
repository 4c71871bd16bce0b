"""What one loss call puts on the device: PyTorch ops and Triton launches, per option set.

    python -m bench.launches [--out DIR] [--time]

Each PyTorch op and each Triton launch is one kernel launch on a GPU (~3-5 us of host time), so
these counts decide whether the loss is launch-bound. Counted (`DeviceWork`): every ATen op that
touches tensor data; not counted: views (they alias their input), allocations without a fill
(`empty`: no kernel), and the host-side ops Triton's interpreter runs to emulate a kernel (a
launch counts once). On a machine without CUDA the Triton rows run under the interpreter (this
command re-runs itself with TRITON_INTERPRET=1). `--time` (CUDA only) also times the segment step
alone (fused kernel against the composed PyTorch form) and a CUDA-graph replay of forward +
backward against eager calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATIONS = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default"}
# option sets of the table: (granularity, options, packed)
OPTION_SETS: dict[str, tuple[str, dict, bool]] = {
    "token": ("token", {}, False),
    "sequence": ("sequence", {}, False),
    "subsentence": ("subsentence", {}, False),
    "subsentence-packed": ("subsentence", {}, True),
    "kl-entropy-dualclip": ("subsentence", dict(beta=0.1, entropy_coef=0.01, dual_clip=3.0), False),
    "seq-mean-token-mean": ("subsentence", dict(loss_agg_mode="seq-mean-token-mean"), False),
    "fixed-entropy-ref": ("subsentence", dict(entropy_ref=1.5), False),
    "on-policy": ("subsentence", dict(old_logprobs=None), False),
    "per-token-loss (none)": ("subsentence", dict(loss_agg_mode="none"), False),
    # every off-policy correction with another objective (tensors made for the batch in `count_rows`)
    "cispo + every correction": ("subsentence", dict(objective="cispo", with_corrections=True), False),
}


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class DeviceWork(TorchDispatchMode):
    """`with DeviceWork() as w: ...` then `w.ops` (a Counter of ATen op names) and `w.launches` (of
    Triton kernel names), interpreted or compiled."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.launches: Counter[str] = Counter()
        self._in_kernel = 0

    @property
    def total(self) -> int:
        return sum(self.ops.values()) + sum(self.launches.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not self._in_kernel and name not in ALLOCATIONS and not _is_view(func):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._patch = _count_triton_launches(self)
        self._patch.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patch.__exit__(*exc)


@contextlib.contextmanager
def _count_triton_launches(work: DeviceWork) -> Iterator[None]:
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield
        return
    originals = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}

    def counted(original):
        def run(self, *args, **kwargs):
            work.launches[self.fn.__name__ if isinstance(self, InterpretedFunction) else self.__name__] += 1
            work._in_kernel += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                work._in_kernel -= 1

        return run

    for cls, original in originals.items():
        cls.run = counted(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.run = original


def count_call(fn: Callable, *args, **kwargs) -> tuple[DeviceWork, DeviceWork]:
    """(forward work, backward work) of `fn(*args, **kwargs).loss` and its backward (a unit upstream
    gradient, seeded outside the count) to the tensor arguments that require grad."""
    with DeviceWork() as fwd:
        out = fn(*args, **kwargs)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    seed = torch.ones_like(out.loss)  # what .backward() makes; counted by neither pass
    with DeviceWork() as bwd:
        torch.autograd.grad(out.loss, leaves, seed)
    return fwd, bwd


def make_call(packed: bool, device: str, n_resp: int = 4, seq_len: int = 64, vocab: int = 1000, seed: int = 0):
    """(positional args, keyword args) of an `sspo_loss` call on a (4, 64, 1000) batch."""
    gen = torch.Generator().manual_seed(seed)
    b, t, v = n_resp, seq_len, vocab
    logits = torch.randn(b, t, v, generator=gen)
    tokens = torch.randint(0, v, (b, t), generator=gen)
    old = torch.randn(b, t, generator=gen) * 0.1 - 3
    mask = torch.rand(b, t, generator=gen) > 0.1
    kwargs: dict = dict(boundary=torch.rand(v, generator=gen) < 0.1, ref_logprobs=old + 0.05)
    if packed:
        logits, tokens, old, mask = logits.reshape(b * t, v), tokens.reshape(-1), old.reshape(-1), mask.reshape(-1)
        kwargs.update(cu_seqlens=torch.arange(0, b * t + 1, t), ref_logprobs=old + 0.05)
    args = [logits.to(device).requires_grad_(True), tokens, old, torch.randn(b, generator=gen), mask]
    args[1:] = [a.to(device) for a in args[1:]]
    return args, {k: x.to(device) for k, x in kwargs.items()}


def count_rows(device: str, backends: tuple[str, ...], **size: int) -> list[dict]:
    """One row per (option set, backend): forward / backward ops and launches of one warm call;
    `size`: `make_call`'s n_resp, seq_len, vocab (the counts do not depend on them)."""
    from sspo_kernels import sspo_loss
    from sspo_kernels._utils import POISON_ENV

    os.environ.pop(POISON_ENV, None)  # count what users run, not the tests' NaN fills
    rows = []
    for name, (granularity, options, packed) in OPTION_SETS.items():
        args, kwargs = make_call(packed, device, **size)
        options = dict(options)
        if "old_logprobs" in options:
            args[2] = options.pop("old_logprobs")
        if options.pop("with_corrections", False):
            gen = torch.Generator().manual_seed(1)
            options.update(
                policy_weights=torch.rand(args[1].shape, generator=gen).to(device), off_policy_mask=0.01,
                rollout_logprobs=args[2] + 0.1 * torch.randn(args[1].shape, generator=gen).to(device),
                entropy_mask_quantile=0.5, beta=0.1, kl_ratio_weight=True,
            )  # fmt: skip
        for backend in backends:
            call = dict(granularity=granularity, backend=backend, **kwargs, **options)
            count_call(sspo_loss, *args, **call)  # warm: first calls may compile or cache
            fwd, bwd = count_call(sspo_loss, *args, **call)
            rows.append(dict(
                options=name, backend=backend,
                fwd_ops=sum(fwd.ops.values()), fwd_launches=sum(fwd.launches.values()), fwd_total=fwd.total,
                bwd_ops=sum(bwd.ops.values()), bwd_launches=sum(bwd.launches.values()), bwd_total=bwd.total,
            ))  # fmt: skip
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'options':<26} {'backend':<8} {'fwd ops+launches':>18} {'bwd ops+launches':>18}"
    lines = [head]
    for r in rows:
        fwd = f"{r['fwd_ops']}+{r['fwd_launches']}={r['fwd_total']}"
        bwd = f"{r['bwd_ops']}+{r['bwd_launches']}={r['bwd_total']}"
        lines.append(f"{r['options']:<26} {r['backend']:<8} {fwd:>18} {bwd:>18}")
    return "\n".join(lines)


def launch_report(timeout_s: float = 300) -> dict:
    """The count table from a subprocess (so the CPU's Triton rows can use the interpreter), or why not."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "bench.launches", "--json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return {"status": "error", "note": f"bench.launches did not finish in {timeout_s:.0f} s"}
    if proc.returncode:
        return {"status": f"exit {proc.returncode}", "note": proc.stderr[-2000:]}
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"status": "ok", "rows": rows, "table": format_rows(rows)}


# ---------------------------------------------------------------- CUDA timings (--time)


def _median_ms(fn: Callable[[], object], reps: int = 50) -> float:
    from bench.measure import time_call

    fn()
    times = sorted(time_call(fn, "cuda") for _ in range(reps))
    return times[len(times) // 2]


def cuda_timings(n_resp: int = 16, seq_len: int = 512, vocab: int = 151_936) -> dict:
    """The segment step alone (fused vs composed) and forward + backward eager vs CUDA-graph replay,
    bf16 logits of N = n_resp * seq_len tokens (8192 by default), subsentence granularity."""
    from sspo_kernels import sspo_loss
    from sspo_kernels._options import make_config
    from sspo_kernels._types import Layout
    from sspo_kernels._validate import prepare_inputs
    from sspo_kernels.backend import get_backend
    from sspo_kernels.ops.objective import finalize_metrics, objective_fwd
    from sspo_kernels.ops.objective_triton import segment_step_fwd
    from sspo_kernels.ops.segment.ids import batch_segment_ids

    args, kwargs = make_call(False, "cuda", n_resp, seq_len, vocab)
    logits = args[0].detach().bfloat16().requires_grad_(True)
    cfg = make_config("subsentence")
    layout = Layout((n_resp, seq_len), vocab, torch.device("cuda"))
    backend = get_backend("triton", layout.device)
    logp = torch.randn(n_resp * seq_len, device="cuda") * 0.1 - 3
    entropy = torch.rand(n_resp * seq_len, device="cuda") * 3
    boundary = kwargs["boundary"]
    lean = prepare_inputs(cfg, layout, *args[1:], boundary=boundary, lean=True)
    full = prepare_inputs(cfg, layout, *args[1:], boundary=boundary)

    def composed():
        seg = batch_segment_ids(full, cfg.granularity)
        finalize_metrics(objective_fwd(logp, entropy, seg, full, cfg, backend=backend).metric_sums)

    def step():
        logits.grad = None
        sspo_loss(logits, *args[1:], boundary=boundary).loss.backward()

    out = {
        "tokens": n_resp * seq_len,
        "vocab": vocab,
        "segment_step_fused_ms": _median_ms(lambda: segment_step_fwd(logp, entropy, lean, cfg)),
        "segment_step_composed_ms": _median_ms(composed),
        "fwd_bwd_eager_ms": _median_ms(step),
    }
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    logits.grad = None
    with torch.cuda.graph(graph):
        sspo_loss(logits, *args[1:], boundary=boundary).loss.backward()
    out["fwd_bwd_graph_replay_ms"] = _median_ms(graph.replay)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write launches.json (and timings.json with --time) here")
    p.add_argument("--time", action="store_true", help="CUDA only: segment step and CUDA-graph timings")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line (for bench.run)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":  # the Triton rows need the interpreter
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call([sys.executable, "-m", "bench.launches", *(argv or sys.argv[1:])], env=env)
    rows = count_rows("cuda" if cuda else "cpu", ("triton", "torch"))
    if args.json:
        print(json.dumps(rows))
        return 0
    print(format_rows(rows))
    result: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreted)", "rows": rows}
    if args.time:
        if not cuda:
            print("--time needs CUDA; skipped")
        else:
            result["timings"] = cuda_timings()
            for key, value in result["timings"].items():
                print(f"{key:<28} {value:.4g}" if isinstance(value, float) else f"{key:<28} {value}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "launches.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
