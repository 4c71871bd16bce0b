"""The GPU benchmark of `bench/gpu_suite.sh`: the numbers the README quotes, on one card, in one table.

    python -m bench.gpu_results --out OUTDIR [--pytest-xml FILE] [--sections ...]
    python -m bench.gpu_results --dry-run --out DIR     # the same code on the CPU, tiny shapes (CI)

Sections (each row records its error and the run goes on; OUTDIR/results.json is rewritten after
every section, so a timeout still leaves what was measured):

- env: device name, capability, torch / triton / CUDA versions, git revision, liger-kernel;
- copy: the copy bandwidth, `torch.empty_like(x).copy_(x)` of a 1 GiB buffer (read + write counted);
- headline: `sspo_loss`, Triton backend, default options, subsentence granularity with a boundary
  table, bf16, N = 8192 (16 x 512), V = 151,936: forward and forward+backward, eager (CUDA events,
  median) and as a CUDA-graph replay, GB/s of the least traffic (the logits read forward, read and
  written backward: 3 N V 2 bytes) against the copy bandwidth; the in-place backward; token
  granularity; Liger-Kernel's `triton_grpo_loss` on the same tokens when it is importable;
- linear: `sspo_loss_from_hidden`, bf16, N = 8192, H = 4096, V = 151,936, the schedule it picks with
  default options and single-pass forced by a fixed entropy reference; TFLOPS of the useful 2NHV
  (forward) and 6NHV (forward+backward) FLOPs; the schedule and weight-gradient path that ran (from
  the package's DEBUG log, or `weight_grad_path`); Liger's `LigerFusedLinearGRPOLoss` (compiled=False);
- step: the segment step alone (per-token log-probs and entropies in, no logits) at N = 8192,
  65,536 and 262,144: the fused one-program kernel (`segment_step_fwd`) and the step composed of
  torch ops (`objective_fwd` after `batch_segment_ids`, with the Triton and with the torch segmented
  sum), each as a CUDA-graph replay (no host launch overhead) and eager;
- launches: device kernels per call, forward and backward, from `torch.profiler` (CUDA activity),
  next to the dispatch-level count of `bench.launches` (ATen ops + Triton launches);
- pytest: the totals of `pytest -m gpu` read from its JUnit XML, when given.

Nothing here is a hard-coded result: every number is measured by the run that writes it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.gpu_report import format_table, pytest_totals
from bench.gpu_timing import debug_log, graph_ms, kernel_counts, sync, time_ms

SECTIONS = ("env", "copy", "headline", "linear", "step", "launches", "pytest")
# reps: timed calls of a fast measurement (slow_reps: fused linear); warmup: untimed calls before them
GPU_SIZES = dict(
    b=16, t=512, v=151_936, hidden=4096, step_n=(8192, 65_536, 262_144), copy_mib=1024, reps=20, slow_reps=5,
    warmup=1, backend="triton",
)  # fmt: skip
# The dry run takes the torch backend for the loss rows (interpreted, one Triton call costs seconds); the
# fused segment step has no torch form, so it runs interpreted, once, at one size.
DRY_SIZES = dict(b=2, t=32, v=512, hidden=32, step_n=(64,), copy_mib=16, reps=1, slow_reps=1, warmup=0, backend="torch")
CLIP = dict(eps_low=0.2, eps_high=0.2)  # Liger's default epsilon, used by both sides of a Liger comparison


def _free(device: torch.device, full: bool = False) -> None:
    gc.collect(2 if full else 1)  # a full collection costs ~0.4 s once torch is loaded: between sections only
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error(exc: BaseException) -> dict:
    kind = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return {"status": "error", "note": f"{kind}: {first}"}


def run_row(name: str, fn: Callable[[], dict], device: torch.device, log) -> dict:
    """One row: `fn()`'s fields with status ok, or the error; memory released either way."""
    t0 = time.perf_counter()
    try:
        row = {"name": name, "status": "ok", **fn()}
    except Exception as exc:  # one row failing (OOM included) must not stop the others
        row = {"name": name, **_error(exc)}
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    log(f"  {name}: {row['status']} ({row['wall_s']} s){' ' + row['note'] if 'note' in row else ''}")
    _free(device)
    return row


# ---------------------------------------------------------------- env and copy bandwidth


def env_info(device: torch.device) -> dict:
    info: dict = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))  # fmt: skip
    else:
        info["gpu"] = "none (CPU dry run: Triton interpreted, tiny shapes; no timing here means anything)"
    for module in ("triton", "liger_kernel"):
        try:
            from importlib.metadata import version

            __import__(module)
            info[module] = version(module.replace("_", "-"))
        except Exception as exc:
            info[module] = f"not installed ({type(exc).__name__})"
    root = Path(__file__).resolve().parent.parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(root), "describe", "--always", "--dirty"]
        info["git"] = subprocess.run(git, capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    return info


def copy_bandwidth(device: torch.device, mib: int, reps: int) -> dict:
    x = torch.ones(mib * 2**20 // 4, device=device)
    timing = time_ms(lambda: torch.empty_like(x).copy_(x), device, reps)
    return {"bytes": 2 * x.numel() * 4, "gbps": 2 * x.numel() * 4 / (timing["ms"] / 1e3) / 1e9, **timing}


# ---------------------------------------------------------------- headline: sspo_loss from logits


def _logits_inputs(device: torch.device, b: int, t: int, v: int, granularity: str = "subsentence"):
    from bench.registry import Case, make_inputs

    return make_inputs(Case(b * t, v, "bf16", granularity), device)


def _sspo_rows(inp, device: torch.device, sizes: dict, copy_gbps: float | None, log) -> list[dict]:
    from sspo_kernels import sspo_loss

    logits, backend = inp.logits, sizes["backend"]
    nbytes = logits.numel() * logits.element_size()
    pristine = logits.detach().clone()

    def restore():
        with torch.no_grad():
            logits.copy_(pristine)

    def rows_for(granularity: str, inplace: bool) -> dict:
        opts = {**inp.options(), "granularity": granularity}
        if granularity not in ("subsentence", "sentence"):
            opts.pop("boundary", None)
        args = (logits, inp.tokens, inp.old_logprobs, inp.advantages, inp.mask)
        fwd = lambda: sspo_loss(*args, backend=backend, inplace_backward=inplace, **opts).loss
        fwdbwd = lambda: torch.autograd.grad(fwd(), [logits])
        before = restore if inplace else None
        t0 = time.perf_counter()
        restore()
        fwdbwd()
        sync(device)
        out = {"granularity": granularity, "inplace_backward": inplace, "backend": backend,
               "logits_shape": list(logits.shape), "first_call_ms": (time.perf_counter() - t0) * 1e3}  # fmt: skip
        out["fwd"] = time_ms(fwd, device, sizes["reps"], warmup=sizes["warmup"])
        out["fwdbwd"] = time_ms(fwdbwd, device, sizes["reps"], before, sizes["warmup"])
        out["fwdbwd_graph"] = _graph(fwdbwd, device, sizes["reps"], before, out)
        _bandwidth(out, nbytes, copy_gbps)
        restore()
        return out

    rows = [
        run_row(f"sspo_loss {backend}", lambda: rows_for("subsentence", False), device, log),
        run_row(f"sspo_loss {backend}, inplace_backward", lambda: rows_for("subsentence", True), device, log),
        run_row(f"sspo_loss {backend}, token granularity", lambda: rows_for("token", False), device, log),
        run_row("liger triton_grpo_loss", lambda: _liger_grpo(inp, device, sizes, nbytes, copy_gbps), device, log),
    ]
    restore()
    return rows


def _graph(fn: Callable, device: torch.device, reps: int, before, row: dict) -> dict | None:
    """`graph_ms`, or None with the reason in row["graph_error"] (a failed capture must not lose the
    eager numbers of the row)."""
    try:
        return graph_ms(fn, device, reps, before)
    except Exception as exc:
        row["graph_error"] = _error(exc)["note"]
        with contextlib.suppress(Exception):
            sync(device)
        return None


def _bandwidth(row: dict, nbytes: int, copy_gbps: float | None) -> None:
    """GB/s of the least traffic: nbytes forward, 3 * nbytes forward+backward (default options)."""
    row["logits_bytes"] = nbytes
    for key, traffic in (("fwd", nbytes), ("fwdbwd", 3 * nbytes), ("fwdbwd_graph", 3 * nbytes)):
        if row.get(key):
            row[key]["gbps"] = traffic / (row[key]["ms"] / 1e3) / 1e9
            if copy_gbps:
                row[key]["pct_copy"] = 100 * row[key]["gbps"] / copy_gbps


def _liger_grpo(inp, device: torch.device, sizes: dict, nbytes: int, copy_gbps: float | None) -> dict:
    """Liger-Kernel's token-level GRPO loss from logits on the same tokens: it takes (B, T+1, V) logits
    (the last position is dropped) and writes its gradient into them (inplace=True, its default)."""
    if device.type != "cuda":
        return {"status": "skipped", "note": "needs CUDA (Liger's Triton kernels do not run in the interpreter)"}
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception as exc:
        return {"status": "skipped", "note": f"liger-kernel not installed ({type(exc).__name__}: {exc})"}
    b, t, v = inp.logits.shape
    logits = torch.empty(b, t + 1, v, device=device, dtype=inp.logits.dtype)
    pristine = inp.logits.detach()
    ids, mask = inp.tokens.clamp(min=0), inp.mask

    def restore():
        with torch.no_grad():
            logits[:, :t].copy_(pristine)
            logits[:, t].zero_()

    logits.requires_grad_(True)

    def fwd():
        return triton_grpo_loss(
            logits, inp.old_logprobs, None, ids, inp.advantages, mask, temperature=1.0, beta=0.0,
            eps_low=CLIP["eps_low"], eps_high=CLIP["eps_high"], loss_type="dapo", reduce=True,
        )[0]  # fmt: skip

    fwdbwd = lambda: torch.autograd.grad(fwd(), [logits])
    out = {"granularity": "token (Liger: per-token ratio, dapo normalisation, beta=0)", "inplace_backward": True}
    out["fwd"] = time_ms(fwd, device, sizes["reps"], restore, sizes["warmup"])
    out["fwdbwd"] = time_ms(fwdbwd, device, sizes["reps"], restore, sizes["warmup"])
    out["fwdbwd_graph"] = _graph(fwdbwd, device, sizes["reps"], restore, out)
    _bandwidth(out, nbytes, copy_gbps)
    return out


# ---------------------------------------------------------------- fused linear


def _linear_rows(device: torch.device, sizes: dict, log) -> list[dict]:
    from bench.registry import Case, make_inputs

    n = sizes["b"] * sizes["t"]
    inp = make_inputs(Case(n, sizes["v"], "bf16", hidden=sizes["hidden"]), device)
    flops = n * sizes["hidden"] * sizes["v"]
    variants = {"default options": {}, "entropy_ref=1.5": {"entropy_ref": 1.5}}  # the second allows single-pass
    rows = [
        run_row(f"sspo_loss_from_hidden, {name}", lambda o=o: _fused_linear(inp, device, sizes, flops, o), device, log)
        for name, o in variants.items()
    ]
    rows.append(
        run_row("liger LigerFusedLinearGRPOLoss", lambda: _liger_linear(inp, device, sizes, flops), device, log)
    )
    rows.append(run_row("token_logprobs_from_hidden", lambda: _logprobs_head(inp, device, sizes, flops), device, log))
    return rows


def _logprobs_head(inp, device: torch.device, sizes: dict, flops: int) -> dict:
    """The public log-prob + entropy head (the old / reference passes and verl's fused forward): no-grad
    forward (2NHV) and forward + backward with an upstream gradient on both outputs (6NHV + recompute)."""
    from sspo_kernels import token_logprobs_from_hidden

    tokens = torch.where(inp.mask, inp.tokens, -100)

    def no_grad():
        with torch.no_grad():
            return token_logprobs_from_hidden(inp.hidden, inp.weight, tokens)

    def fwdbwd():
        logp, entropy = token_logprobs_from_hidden(inp.hidden, inp.weight, tokens)
        return torch.autograd.grad((logp.sum() + 0.01 * entropy.sum()), [inp.hidden, inp.weight])

    out: dict = {"options": "entropy=True, -100 at masked-out tokens"}
    out["fwd"] = time_ms(no_grad, device, sizes["slow_reps"], warmup=sizes["warmup"])
    out["fwdbwd"] = time_ms(fwdbwd, device, sizes["slow_reps"], warmup=sizes["warmup"])
    _tflops(out, flops)
    return out


def _weight_grad_path(device: torch.device, dtype: torch.dtype) -> str:
    for module in ("sspo_kernels.fused_linear", "sspo_kernels.ops.linear"):
        with contextlib.suppress(ImportError):
            fn = getattr(__import__(module, fromlist=["_"]), "weight_grad_path", None)
            if fn is not None:
                return fn(device, dtype)
    return "unknown"


def _fused_linear(inp, device: torch.device, sizes: dict, flops: int, extra: dict) -> dict:
    from sspo_kernels import sspo_loss_from_hidden

    args = (inp.hidden, inp.weight, inp.tokens, inp.old_logprobs, inp.advantages, inp.mask)
    fwd = lambda: sspo_loss_from_hidden(*args, **inp.options(), **extra).loss
    fwdbwd = lambda: torch.autograd.grad(fwd(), [inp.hidden, inp.weight])
    t0 = time.perf_counter()
    with debug_log() as messages:
        fwdbwd()
        sync(device)
    out: dict = {"first_call_ms": (time.perf_counter() - t0) * 1e3, "options": extra or "defaults"}
    plan = next((m for m in messages if "schedule" in m), "")
    out["schedule"] = "single-pass" if "single-pass" in plan else "two-phase" if "two-phase" in plan else "unknown"
    out["plan_log"] = plan or "no DEBUG record from sspo_kernels"
    out["weight_grad_path"] = _weight_grad_path(device, inp.weight.dtype)
    out["fwd"] = time_ms(fwd, device, sizes["slow_reps"], warmup=sizes["warmup"])
    out["fwdbwd"] = time_ms(fwdbwd, device, sizes["slow_reps"], warmup=sizes["warmup"])
    _tflops(out, flops)
    return out


def _tflops(row: dict, nhv: int) -> None:
    """Useful FLOPs of the lm_head GEMMs: 2NHV forward, 6NHV forward+backward (a recompute is not credited)."""
    row["nhv"] = nhv
    for key, work in (("fwd", 2 * nhv), ("fwdbwd", 6 * nhv)):
        if row.get(key):
            row[key]["tflops"] = work / (row[key]["ms"] / 1e3) / 1e12


def _liger_linear(inp, device: torch.device, sizes: dict, flops: int) -> dict:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as exc:
        return {"status": "skipped", "note": f"liger-kernel not installed ({type(exc).__name__}: {exc})"}
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, epsilon_low=CLIP["eps_low"],
                                       epsilon_high=CLIP["eps_high"], loss_type="dapo")  # fmt: skip
    ids, mask = inp.tokens.clamp(min=0), inp.mask.float()
    fwd = lambda: loss_fn(inp.hidden, inp.weight, ids, mask, inp.advantages, old_per_token_logps=inp.old_logprobs)[0]
    fwdbwd = lambda: torch.autograd.grad(fwd(), [inp.hidden, inp.weight])
    out: dict = {"options": "token-level PPO clip (eps 0.2), beta=0, dapo, compiled=False"}
    reps = max(sizes["slow_reps"] // 2, 1)
    out["fwd"] = time_ms(fwd, device, reps, warmup=sizes["warmup"])
    out["fwdbwd"] = time_ms(fwdbwd, device, reps, warmup=sizes["warmup"])
    _tflops(out, flops)
    return out


# ---------------------------------------------------------------- the segment step alone


def _step_rows(device: torch.device, sizes: dict, log) -> list[dict]:
    return [run_row(f"segment step N={n}", lambda n=n: _step(device, n, sizes), device, log) for n in sizes["step_n"]]


def _step(device: torch.device, n: int, sizes: dict) -> dict:
    """Per-token log-probs and entropies of a padded (n / T, T) batch, subsentence granularity."""
    from sspo_kernels._options import make_config
    from sspo_kernels._types import Layout
    from sspo_kernels._validate import prepare_inputs
    from sspo_kernels.backend import get_backend
    from sspo_kernels.ops.objective import finalize_metrics, objective_fwd
    from sspo_kernels.ops.objective_triton import segment_step_fwd
    from sspo_kernels.ops.segment.ids import batch_segment_ids

    t = min(sizes["t"], n)
    b = n // t
    gen = torch.Generator(device=device).manual_seed(n)
    v = 1000
    tokens = torch.randint(0, v, (b, t), generator=gen, device=device)
    mask = torch.rand(b, t, generator=gen, device=device) > 0.1
    logp = torch.rand(b * t, generator=gen, device=device).log()
    entropy = 3 * torch.rand(b * t, generator=gen, device=device)
    old = logp.reshape(b, t) + 0.05 * torch.randn(b, t, generator=gen, device=device)
    adv = torch.randn(b, generator=gen, device=device)
    boundary = torch.rand(v, generator=gen, device=device) < 0.05
    cfg = make_config("subsentence")
    layout = Layout((b, t), v, device)
    lean = prepare_inputs(cfg, layout, tokens, old, adv, mask, boundary=boundary, lean=True)
    full = prepare_inputs(cfg, layout, tokens, old, adv, mask, boundary=boundary)

    def composed(backend):
        def run():
            seg = batch_segment_ids(full, cfg.granularity)
            return finalize_metrics(objective_fwd(logp, entropy, seg, full, cfg, backend=backend).metric_sums)

        return run

    forms = {
        "fused": lambda: segment_step_fwd(logp, entropy, lean, cfg),
        "composed_triton_segsum": composed(get_backend("triton", device)),
        "composed_torch_segsum": composed(get_backend("torch", device)),
    }
    out: dict = {"tokens": n, "batch": [b, t]}
    for name, fn in forms.items():
        try:
            eager = time_ms(fn, device, sizes["reps"], warmup=sizes["warmup"])
            out[name] = {"eager": eager}
            out[name]["graph"] = _graph(fn, device, sizes["reps"], None, out[name])
        except Exception as exc:
            out[name] = _error(exc)
    return out


# ---------------------------------------------------------------- launches per call


def _launch_rows(device: torch.device, sizes: dict, log) -> list[dict]:
    from sspo_kernels import sspo_loss, sspo_loss_from_hidden, sspo_loss_from_logprobs

    b, t = sizes["b"], sizes["t"]
    inp = _logits_inputs(device, b, t, sizes["v"])
    rest = (inp.tokens, inp.old_logprobs, inp.advantages, inp.mask)
    logp = inp.old_logprobs.detach().clone().requires_grad_(True)  # stands for a framework's log-probs
    entropy = torch.rand(inp.tokens.shape, device=device)
    hidden = torch.randn(*inp.tokens.shape, 64, device=device, dtype=torch.bfloat16).requires_grad_(True)
    weight = (0.1 * torch.randn(sizes["v"], 64, device=device)).to(torch.bfloat16).requires_grad_(True)
    opts, backend = inp.options(), sizes["backend"]  # the torch backend's row below is a duplicate in a dry run
    calls = {
        f"sspo_loss {backend}, subsentence": (
            lambda: sspo_loss(inp.logits, *rest, backend=backend, **opts), [inp.logits],
        ),
        f"sspo_loss {backend}, token": (
            lambda: sspo_loss(inp.logits, *rest, backend=backend, granularity="token"), [inp.logits],
        ),
        "sspo_loss torch, subsentence": (lambda: sspo_loss(inp.logits, *rest, backend="torch", **opts), [inp.logits]),
        "sspo_loss_from_logprobs, subsentence": (lambda: sspo_loss_from_logprobs(logp, entropy, *rest, **opts), [logp]),
        "sspo_loss_from_hidden (H=64), subsentence": (
            lambda: sspo_loss_from_hidden(hidden, weight, *rest, **opts), [hidden, weight],
        ),
    }  # fmt: skip
    return [run_row(f"launches: {name}", lambda c=c: _count(*c, device), device, log) for name, c in calls.items()]


def _count(call: Callable, leaves: list[torch.Tensor], device: torch.device) -> dict:
    """Device kernels (profiler) and dispatched ops + Triton launches (bench.launches) of one forward
    and one backward, after a warm-up call."""
    from bench.launches import DeviceWork

    torch.autograd.grad(call().loss, leaves)  # warm-up: compiles, caches
    sync(device)
    holder: dict = {}
    fwd = kernel_counts(lambda: holder.update(out=call()), device)
    seed = torch.ones_like(holder["out"].loss)
    bwd = kernel_counts(lambda: torch.autograd.grad(holder["out"].loss, leaves, seed), device)
    with DeviceWork() as fwd_work:
        out = call()
    with DeviceWork() as bwd_work:
        torch.autograd.grad(out.loss, leaves, seed)
    return {
        "fwd_kernels": fwd["kernels"], "fwd_memops": fwd["memops"], "bwd_kernels": bwd["kernels"],
        "bwd_memops": bwd["memops"], "fwd_dispatch": fwd_work.total, "bwd_dispatch": bwd_work.total,
        "fwd_kernel_names": fwd["names"], "bwd_kernel_names": bwd["names"],
        **({"note": fwd["note"]} if "note" in fwd else {}),
    }  # fmt: skip


# ---------------------------------------------------------------- driver


def collect(
    device: torch.device, sizes: dict, sections: tuple[str, ...], out_dir: Path | None, pytest_xml, log
) -> dict:
    results: dict = {"sizes": {k: v for k, v in sizes.items() if k not in ("reps", "slow_reps")}, "sections": {}}
    results["dry_run"] = device.type != "cuda"

    def save():
        if out_dir is not None:
            (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))

    copy_gbps = None
    for section in sections:
        log(f"[{section}]")
        t0 = time.perf_counter()
        if section == "env":
            results["env"] = env_info(device)
        elif section == "copy":
            results["copy"] = run_row(
                "copy", lambda: copy_bandwidth(device, sizes["copy_mib"], sizes["reps"]), device, log
            )
            copy_gbps = results["copy"].get("gbps")
        elif section == "headline":
            inp = _logits_inputs(device, sizes["b"], sizes["t"], sizes["v"])
            results["headline"] = _sspo_rows(inp, device, sizes, copy_gbps, log)
            del inp
        elif section == "linear":
            results["linear"] = _linear_rows(device, sizes, log)
        elif section == "step":
            results["step"] = _step_rows(device, sizes, log)
        elif section == "launches":
            results["launches"] = _launch_rows(device, sizes, log)
        elif section == "pytest":
            path = Path(pytest_xml) if pytest_xml else None
            results["pytest"] = (
                pytest_totals(path) if path and path.exists() else {"status": "skipped", "note": "no JUnit XML"}
            )
        results["sections"][section] = round(time.perf_counter() - t0, 1)
        _free(device, full=True)
        save()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write results.json and table.txt here")
    p.add_argument(
        "--dry-run", action="store_true", help="the same code on the CPU with tiny shapes (Triton interpreted)"
    )
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--pytest-xml", help="JUnit XML of pytest -m gpu, summarised in the results")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("no CUDA device: nothing to measure (use --dry-run to check the code path on the CPU)")
        return 2
    if args.dry_run and not cuda and os.environ.get("TRITON_INTERPRET") != "1":  # the Triton rows need the interpreter
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call([sys.executable, "-m", "bench.gpu_results", *(argv or sys.argv[1:])], env=env)
    device = torch.device("cuda" if cuda and not args.dry_run else "cpu")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)
    results = collect(
        device, DRY_SIZES if args.dry_run else GPU_SIZES, tuple(args.sections), args.out, args.pytest_xml, log
    )
    table = format_table(results)
    print(table)
    if args.out:
        (args.out / "table.txt").write_text(table + "\n")
        print(f"written: {args.out / 'results.json'}, {args.out / 'table.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
