"""The measuring of the benchmark runner (`python -m bench.run`; bench/run.py is the CLI).

Timing (median and percentiles over repeats, interleaved across paths), peak extra memory, the
device-to-device copy roofline, the machine description, the first call and the check against the
baseline, and `run_case`, which measures every path of one case.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path as FsPath

import torch

from bench.registry import PATHS, Case, Inputs, Path, baseline_of, make_inputs

REPO = FsPath(__file__).resolve().parent.parent
MIB = 2**20

# Agreement with the baseline that counts as "ok": the loss in absolute terms, the gradient as
# ||g - g_base|| / ||g_base||. Low-precision gradients differ by rounding (a few ulps of bf16).
CHECK_TOL = {"fp32": (1e-5, 1e-4), "bf16": (1e-4, 2e-2), "fp16": (1e-4, 5e-3)}


@dataclass
class Settings:
    device: str
    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 30
    budget_s: float = 1.0  # minimum time spent repeating one measurement
    memory: bool = True
    check: bool = True
    seed: int = 0


# ---------------------------------------------------------------- device helpers


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated q-th percentile (0..100) of a non-empty list."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_call(fn: Callable[[], object], device: str) -> float:
    """Milliseconds of one `fn()`: perf_counter around the call on the CPU, CUDA events on a GPU."""
    _sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def enough(times: list[float], settings: Settings) -> bool:
    """At least `min_reps` calls and `budget_s` seconds, or `max_reps` calls."""
    spent = sum(times) / 1e3
    return len(times) >= settings.max_reps or (len(times) >= settings.min_reps and spent >= settings.budget_s)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the C++ side's stderr (the profiler prints a USDT line per start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _cuda_alloc(fn: Callable[[], object]) -> tuple[int, int]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak, end = torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
    del out
    return peak, end


def alloc_profile(phases: dict[str, Callable[[], object]], device: str, between: Callable[[], None]) -> dict:
    """{phase: (peak, end)} bytes of live tensor memory while each phase's function runs, relative to
    its start; `end` is what the function's result still holds when it returns (for a forward: the
    tensors saved for backward and the outputs). `between()` runs before each phase, unmeasured.

    CPU: one torch.profiler(profile_memory=True) session; its allocation events are replayed
    between the start and end of each phase's record_function range. CUDA: the caching allocator's
    statistics (memory_allocated, max_memory_allocated). The gradient buffer that the package keeps
    between CPU calls is released before each phase, so a phase that needs one counts it.
    """
    if device == "cuda":
        result = {}
        for name, fn in phases.items():
            between()
            result[name] = _cuda_alloc(fn)
        return result
    from torch.profiler import ProfilerActivity, profile, record_function

    from sspo_kernels import empty_cache

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for name, fn in phases.items():
            between()
            empty_cache()
            with record_function(f"bench:{name}"):
                out = fn()
            del out
    events = prof.profiler.kineto_results.events()
    spans = {e.name(): (e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name().startswith("bench:")}
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    result = {}
    for name in phases:
        lo, hi = spans[f"bench:{name}"]
        cur = peak = 0
        for t, nbytes in memory:  # nbytes > 0 allocates, < 0 frees
            if lo <= t <= hi:
                cur += nbytes
                peak = max(peak, cur)
        result[name] = (peak, cur)
    return result


def copy_bandwidth(device: str, nbytes: int) -> float:
    """GB/s of a device-to-device copy of `nbytes` (read + write counted), median of several."""
    n = nbytes // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    settings = Settings(device=device, min_reps=5, max_reps=20, budget_s=0.3)
    dst.copy_(src)
    times: list[float] = []
    while not enough(times, settings):
        times.append(time_call(lambda: dst.copy_(src), device))
    ms = percentile(times, 50)
    return 2 * n * 4 / (ms / 1e3) / 1e9


def machine_info(device: str) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    with contextlib.suppress(OSError):
        info["load_avg"] = os.getloadavg()[0]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git"] = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------- one measurement


class PathRunner:
    """Closures over one (case, path): a forward, a forward+backward, and the input restore."""

    def __init__(self, path: Path, inputs: Inputs):
        self.path = path
        self.inputs = inputs
        self.loss_fn = path.build(inputs)
        self.pristine = inputs.logits.detach().clone() if path.overwrites_input else None

    def restore(self) -> None:
        if self.pristine is not None:
            with torch.no_grad():
                self.inputs.logits.copy_(self.pristine)

    def forward(self) -> torch.Tensor:
        return self.loss_fn()

    def forward_backward(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        loss = self.loss_fn()
        return loss.detach(), torch.autograd.grad(loss, self.inputs.differentiable)


def _rel_err(grads, ref) -> float:
    worst = 0.0
    for g, r in zip(grads, ref):
        denom = r.double().norm().item()
        diff = (g.double() - r.double()).norm().item()
        worst = max(worst, diff / denom if denom > 0 else diff)
    return worst


def first_call(run: PathRunner, settings: Settings, base: dict | None) -> tuple[dict, dict | None]:
    """The first forward+backward (timed apart), the check against the baseline, and the warmup calls.

    Returns the row's fields and, for a baseline path, its loss and gradients for the others' checks.
    """
    row: dict = {"status": "ok"}
    run.restore()
    _sync(settings.device)
    t0 = time.perf_counter()
    loss, grads = run.forward_backward()
    _sync(settings.device)
    row["first_call_ms"] = (time.perf_counter() - t0) * 1e3
    row["loss"] = loss.item()
    keep = None
    if not run.path.baseline:
        keep = {"loss": row["loss"], "grads": [g.detach().clone() for g in grads]}
    elif base is not None and settings.check:
        loss_tol, grad_tol = CHECK_TOL[run.inputs.case.dtype]
        row["loss_err"] = abs(row["loss"] - base["loss"])
        row["grad_rel_err"] = _rel_err(grads, base["grads"])
        ok = row["loss_err"] <= loss_tol * max(1.0, abs(base["loss"])) and row["grad_rel_err"] <= grad_tol
        row["check"] = "ok" if ok else "FAIL"
    del loss, grads
    for _ in range(settings.warmup):
        run.restore()
        run.forward_backward()
    return row, keep


def time_interleaved(runners: dict[str, PathRunner], rows: dict[str, dict], settings: Settings) -> None:
    """Forward, then forward+backward repeats, round-robin over the paths: one call of each path per
    round, so a change in machine load falls on every path alike. A path leaves the rotation once it
    has `enough` repeats; one that raises is marked as an error and dropped."""
    for mode in ("fwd", "fwdbwd"):
        times: dict[str, list[float]] = {name: [] for name in runners}
        active = list(runners)
        while active:
            for name in list(active):
                run = runners[name]
                fn = run.forward if mode == "fwd" else run.forward_backward
                try:
                    run.restore()
                    times[name].append(time_call(fn, settings.device))
                except Exception as exc:
                    _mark_error(rows[name], exc)
                    run.restore()
                    del runners[name]
                    active.remove(name)
                    continue
                if enough(times[name], settings):
                    active.remove(name)
        for name in runners:
            t = times[name]
            rows[name].update({
                f"{mode}_ms": percentile(t, 50), f"{mode}_p20_ms": percentile(t, 20),
                f"{mode}_p80_ms": percentile(t, 80), f"reps_{mode}": len(t),
            })  # fmt: skip


def measure_memory(run: PathRunner, row: dict, settings: Settings) -> None:
    mem = alloc_profile({"fwd": run.forward, "fwdbwd": run.forward_backward}, settings.device, run.restore)
    row["peak_fwd_mib"], row["saved_mib"] = (x / MIB for x in mem["fwd"])
    row["peak_mib"] = mem["fwdbwd"][0] / MIB
    row["peak_bytes_per_token"] = mem["fwdbwd"][0] / run.inputs.case.n


def _mark_error(row: dict, exc: BaseException) -> None:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    row.update(status="error", note=f"{type(exc).__name__}: {first_line}")


def derived(row: dict, case: Case, base_row: dict | None, copy_gbps: float | None) -> None:
    """Fill the columns computed from the timings: bandwidth, TFLOPS, ratios to the baseline."""
    if row.get("status") != "ok":
        return
    fwd_s, fwdbwd_s = row["fwd_ms"] / 1e3, row["fwdbwd_ms"] / 1e3
    if case.kind == "logits":
        # the least traffic the problem needs: read the logits once forward; read them again and
        # write the gradient backward
        row["gbps_fwd"] = case.logits_bytes / fwd_s / 1e9
        row["gbps_fwdbwd"] = 3 * case.logits_bytes / fwdbwd_s / 1e9
        if copy_gbps:
            row["pct_copy_fwd"] = 100 * row["gbps_fwd"] / copy_gbps
            row["pct_copy_fwdbwd"] = 100 * row["gbps_fwdbwd"] / copy_gbps
    else:
        # model FLOPs of the lm_head GEMMs: 2NHV forward, 2NHV for dH and 2NHV for dW backward
        nhv = case.n * case.hidden * case.v
        row["tflops_fwd"] = 2 * nhv / fwd_s / 1e12
        row["tflops_fwdbwd"] = 6 * nhv / fwdbwd_s / 1e12
    if base_row is not None and base_row.get("status") == "ok" and base_row is not row:
        row["speedup_fwd"] = base_row["fwd_ms"] / row["fwd_ms"]
        row["speedup_fwdbwd"] = base_row["fwdbwd_ms"] / row["fwdbwd_ms"]
        if row.get("peak_mib") is not None and base_row.get("peak_mib"):
            row["mem_vs_baseline"] = row["peak_mib"] / base_row["peak_mib"]


def _free(device: str) -> None:
    # tensors are freed by reference counting; a full collection costs ~0.4 s once torch is loaded
    gc.collect(1)
    if device == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, path_names: list[str], settings: Settings, copy_gbps: float | None, log) -> list[dict]:
    """Rows for every requested path of the case's kind, the baseline first.

    Per path: the first call, the check and the warmup; then the timed repeats of all paths,
    interleaved; then each path's memory. A path that fails is reported as an error and the
    others go on.
    """
    names = [n for n in path_names if PATHS[n].kind == case.kind]
    base_name = baseline_of(case.kind)
    names = [base_name] + [n for n in names if n != base_name]
    t0 = time.perf_counter()
    inputs = make_inputs(case, settings.device, settings.seed)
    rows: dict[str, dict] = {}
    runners: dict[str, PathRunner] = {}
    base = None
    for name in names:
        path = PATHS[name]
        rows[name] = row = {
            "case": case.label, "kind": case.kind, "n": case.n, "v": case.v, "hidden": case.hidden,
            "dtype": case.dtype, "granularity": case.granularity, "path": name,
        }  # fmt: skip
        reason = path.unavailable(inputs)
        if reason:
            row.update(status="skipped", note=reason)
            continue
        run = None
        try:
            run = PathRunner(path, inputs)
            result, keep = first_call(run, settings, base)
            row.update(result)
            runners[name] = run
            base = keep if keep is not None else base
        except Exception as exc:  # one path failing must not stop the others
            _mark_error(row, exc)
            if run is not None:
                run.restore()
        _free(settings.device)

    time_interleaved(runners, rows, settings)
    if settings.memory:
        for name, run in runners.items():
            try:
                measure_memory(run, rows[name], settings)
            except Exception as exc:
                _mark_error(rows[name], exc)
            finally:
                run.restore()
            _free(settings.device)

    for row in rows.values():
        derived(row, case, rows[base_name], copy_gbps)
    parts = [f"ok: {', '.join(n for n, r in rows.items() if r['status'] == 'ok')}"]
    others: dict[tuple[str, str], list[str]] = {}
    for n, r in rows.items():
        if r["status"] != "ok":
            others.setdefault((r["status"], r["note"]), []).append(n)
    parts += [f"{status}: {', '.join(ns)} ({note})" for (status, note), ns in others.items()]
    log(f"  {time.perf_counter() - t0:.1f} s; " + "; ".join(parts))
    del inputs, base, runners
    _free(settings.device)
    return list(rows.values())
