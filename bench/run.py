"""The benchmark runner: `python -m bench.run [options]` (README.md explains every column).

For every case (shape) and path (implementation) it measures, in one process and one run:
forward and forward+backward time (median and p20/p80 over repeats after warmup), the first call
separately, the peak extra memory, an effective bandwidth (or TFLOPS from hidden states) against
a device-to-device copy measured in the same run, the ratios to the baseline of the same case,
and a correctness check against that baseline. It prints a table and writes results.csv,
results.json, table.txt and PNG plots into the output folder, plus the AOT register report.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path as FsPath

import torch

from bench.registry import (
    DEFAULT_PATHS,
    DTYPES,
    HEADLINE,
    PATHS,
    SUITES,
    Case,
    Inputs,
    Path,
    baseline_of,
    make_inputs,
)

REPO = FsPath(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "out"
MIB = 2**20

# Agreement with the baseline that counts as "ok": the loss in absolute terms, the gradient as
# ||g - g_base|| / ||g_base||. Low-precision gradients differ by rounding (a few ulps of bf16).
CHECK_TOL = {"fp32": (1e-5, 1e-4), "bf16": (1e-4, 2e-2), "fp16": (1e-4, 5e-3)}

CSV_COLUMNS = (
    "case", "kind", "n", "v", "hidden", "dtype", "granularity", "path", "status", "note",
    "fwd_ms", "fwd_p20_ms", "fwd_p80_ms", "fwdbwd_ms", "fwdbwd_p20_ms", "fwdbwd_p80_ms", "reps_fwd", "reps_fwdbwd",
    "first_call_ms", "speedup_fwd", "speedup_fwdbwd", "peak_mib", "peak_fwd_mib", "saved_mib",
    "peak_bytes_per_token", "mem_vs_baseline", "gbps_fwd", "gbps_fwdbwd", "pct_copy_fwd", "pct_copy_fwdbwd",
    "tflops_fwd", "tflops_fwdbwd", "loss", "loss_err", "grad_rel_err", "check",
)  # fmt: skip


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
    statistics (memory_allocated, max_memory_allocated).
    """
    if device == "cuda":
        result = {}
        for name, fn in phases.items():
            between()
            result[name] = _cuda_alloc(fn)
        return result
    from torch.profiler import ProfilerActivity, profile, record_function

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for name, fn in phases.items():
            between()
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


def machine_line(info: dict) -> str:
    if info["device"] == "cuda":
        where = f"{info['gpu']} (CUDA {info['cuda']})"
    else:
        threads = f"{info['threads']} thread" + ("s" if info["threads"] != 1 else "")
        where = f"{info['cpu_count']} vCPU {info['cpu']}, {threads}"
    return f"{where}, torch {info['torch']}, triton {info['triton']}"


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


# ---------------------------------------------------------------- reporting


def _fmt(x, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def format_table(rows: list[dict], copy_gbps: float | None) -> str:
    """One block per case: a line per path with times, ratios, memory and bandwidth."""
    header = (
        "path", "fwd ms", "[p20-p80]", "f+b ms", "[p20-p80]", "speedup f/f+b", "peak MiB", "mem/base",
        "GB/s f/f+b", "%copy f/f+b", "1st call ms", "check",
    )  # fmt: skip
    out = []
    cases = list(dict.fromkeys(r["case"] for r in rows))
    for label in cases:
        block = [r for r in rows if r["case"] == label]
        first = block[0]
        size = first["n"] * first["v"] * torch.empty((), dtype=DTYPES[first["dtype"]]).element_size() / MIB
        what = f"logits {size:.1f} MiB" if first["kind"] == "logits" else "from hidden states; TFLOPS instead of GB/s"
        out.append(f"\n{label}  ({what})")
        lines = [list(header)]
        notes = []
        for r in block:
            if r["status"] != "ok":
                notes.append(f"  {r['path']}: {r['status']}: {r.get('note', '')}")
                continue
            if r["kind"] == "logits":
                rate = f"{_fmt(r.get('gbps_fwd'))}/{_fmt(r.get('gbps_fwdbwd'))}"
                pct = f"{_fmt(r.get('pct_copy_fwd'), '.0f')}/{_fmt(r.get('pct_copy_fwdbwd'), '.0f')}"
            else:
                rate = f"{_fmt(r.get('tflops_fwd'))}/{_fmt(r.get('tflops_fwdbwd'))} TF"
                pct = "-"
            speed = "-" if r.get("speedup_fwd") is None else f"{r['speedup_fwd']:.2f}x/{r['speedup_fwdbwd']:.2f}x"
            lines.append([
                r["path"], _ms(r["fwd_ms"]), f"[{_ms(r['fwd_p20_ms'])}-{_ms(r['fwd_p80_ms'])}]",
                _ms(r["fwdbwd_ms"]), f"[{_ms(r['fwdbwd_p20_ms'])}-{_ms(r['fwdbwd_p80_ms'])}]", speed,
                _fmt(r.get("peak_mib"), ".1f"), _fmt(r.get("mem_vs_baseline"), ".2f"), rate, pct,
                _ms(r.get("first_call_ms")), r.get("check", "-"),
            ])  # fmt: skip
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out += ["  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
        out += notes
    if copy_gbps:
        out.append(f"\ncopy roofline (device-to-device copy, read + write): {copy_gbps:.1f} GB/s")
    return "\n".join(out)


def headline(rows: list[dict]) -> str:
    """One line per fast path at the HEADLINE shape: its speed and memory against the baseline."""
    block = [r for r in rows if r["case"] == HEADLINE.label and r["status"] == "ok"]
    base = next((r for r in block if r["path"] == "baseline"), None)
    lines = []
    for r in block:
        if r is base or base is None or r.get("speedup_fwdbwd") is None:
            continue
        mem = ""
        if r.get("peak_mib") is not None and base.get("peak_mib"):
            mem = f"; peak extra memory {r['peak_mib']:.1f} MiB vs {base['peak_mib']:.1f} MiB"
            mem += f" ({r['mem_vs_baseline']:.2f}x)"
        lines.append(
            f"  {r['path']}: forward+backward {r['fwdbwd_ms']:.0f} ms vs {base['fwdbwd_ms']:.0f} ms "
            f"({r['speedup_fwdbwd']:.2f}x the baseline's speed), forward {r['speedup_fwd']:.2f}x{mem}"
        )
    return f"Headline, {HEADLINE.label}:\n" + "\n".join(lines) if lines else ""


def write_csv(rows: list[dict], path: FsPath) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def run_aot(out_dir: FsPath, timeout_s: float, log) -> dict:
    """`sspo_kernels.aot`'s register and spill report, in a subprocess (it sets Triton's environment)."""
    try:
        import sspo_kernels.aot  # noqa: F401
    except ImportError as exc:
        note = f"sspo_kernels.aot not available ({exc}); no register report"
        log(note)
        return {"status": "skipped", "note": note}
    json_path = out_dir / "aot.json"
    code = (
        "import json, sys\n"
        "from sspo_kernels import aot\n"
        "if hasattr(aot, 'aot_report'):\n"
        "    rows = aot.aot_report()\n"
        "    json.dump(rows, open(sys.argv[1], 'w'), indent=1)\n"
        "    print(aot.format_report(rows) if hasattr(aot, 'format_report') else rows)\n"
        "else:\n"
        "    sys.exit(aot.main())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(json_path)], capture_output=True, text=True, timeout=timeout_s, env=env
        )
    except subprocess.TimeoutExpired:
        note = f"sspo_kernels.aot did not finish in {timeout_s:.0f} s"
        log(note)
        return {"status": "error", "note": note}
    text = proc.stdout + (f"\n[stderr]\n{proc.stderr}" if proc.returncode and proc.stderr else "")
    (out_dir / "aot.txt").write_text(text)
    rows = json.loads(json_path.read_text()) if json_path.exists() else None
    status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    return {"status": status, "seconds": round(time.perf_counter() - t0, 1), "rows": rows, "text": proc.stdout}


# Liger-Kernel's fused-linear GRPO loss against ours, through bench/liger_compare.py. The default
# size is the default suite's case from hidden states, so the two tables can be read side by side.
PEER_SIZES = {
    "default": dict(n=1024, hidden=256, vocab=32000, batch=4, repeats=3),
    "quick": dict(n=128, hidden=64, vocab=1000, batch=2, repeats=1),
}


def run_peers(quick: bool, device: str, log) -> dict:
    """bench.liger_compare.compare() rows, or why there are none (never raises)."""
    if device == "cuda":
        return {"status": "skipped", "note": "bench/liger_compare.py measures on the CPU; run it on a CPU machine"}
    try:
        from bench import liger_compare
    except ImportError as exc:
        return {"status": "skipped", "note": f"bench/liger_compare.py not importable ({exc})"}
    reason = liger_compare.liger_unavailable()
    if reason:
        return {"status": "skipped", "note": reason}
    size = PEER_SIZES["quick" if quick else "default"]
    t0 = time.perf_counter()
    try:
        with _quiet_stderr():
            rows = liger_compare.compare(**size)
        table = liger_compare.format_table(rows)
    except Exception as exc:  # a peer failing must not lose the rest of the report
        return {"status": "error", "note": f"{type(exc).__name__}: {exc}", "size": size}
    log(f"  liger comparison  ok {time.perf_counter() - t0:6.1f} s")
    return {"status": "ok", "size": size, "rows": rows, "table": table}


def peers_summary(peers: dict) -> str:
    if peers.get("status") != "ok":
        return f"Peers (Liger-Kernel): {peers.get('status')}: {peers.get('note', '')}"
    size = peers["size"]
    title = (
        f"Peers: Liger-Kernel LigerFusedLinearGRPOLoss vs sspo_loss_from_hidden, token level, eps 0.2, "
        f"N={size['n']} H={size['hidden']} V={size['vocab']} fp32 (bench/liger_compare.py; forward+backward)"
    )
    return f"{title}\n{peers['table']}"


def aot_summary(aot: dict) -> str:
    if aot.get("status") == "skipped" or not aot.get("rows"):
        return f"AOT register report: {aot.get('status')}: {aot.get('note', 'see aot.txt')}"
    rows = aot["rows"]
    spills = [r for r in rows if r.get("error") or (r.get("spill_stores") or 0) > 0 or (r.get("spill_loads") or 0) > 0]
    regs = [r["regs"] for r in rows if r.get("regs") is not None]
    regs_part = f"registers {min(regs)}-{max(regs)}" if regs else "no register counts"
    return (
        f"AOT register report ({aot['seconds']} s): {len(rows)} kernel configurations x targets, {regs_part}, "
        f"{len(spills)} with a spill or compile error (aot.txt, aot.json)"
    )


# ---------------------------------------------------------------- plots

PLOT_METRICS = (
    ("fwd_ms", "fwd_p20_ms", "fwd_p80_ms", "forward time (ms)"),
    ("fwdbwd_ms", "fwdbwd_p20_ms", "fwdbwd_p80_ms", "forward + backward time (ms)"),
    ("peak_mib", None, None, "peak extra memory, fwd + bwd (MiB)"),
)


def sweeps(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """(axis "n" or "v", title, rows) for every group of ok rows that varies N (or V) with the rest fixed."""
    ok = [r for r in rows if r["status"] == "ok"]
    found = []
    for axis, other in (("n", "v"), ("v", "n")):
        groups: dict[tuple, list[dict]] = {}
        for r in ok:
            groups.setdefault((r["kind"], r["dtype"], r["granularity"], r["hidden"], r[other]), []).append(r)
        for (kind, dtype, gran, hidden, fixed), group in groups.items():
            if len({r[axis] for r in group}) < 2:
                continue
            h = f", H={hidden}" if hidden else ""
            what = "SSPO loss from hidden states" if kind == "hidden" else "SSPO loss"
            title = f"{what}: {dtype}, {gran}, {other.upper()}={fixed}{h}"
            found.append((axis, title, group))
    return found


def plot_sweeps(rows: list[dict], info: dict, out_dir: FsPath) -> list[FsPath]:
    """One PNG per sweep: forward time, forward+backward time and peak memory against N or V, log-log,
    a line per path with p20-p80 error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    written = []
    for axis, title, group in sweeps(rows):
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
        paths = list(dict.fromkeys(r["path"] for r in group))
        for ax, (key, lo, hi, ylabel) in zip(axes, PLOT_METRICS):
            for i, name in enumerate(paths):
                pts = sorted((r for r in group if r["path"] == name and r.get(key) is not None), key=lambda r: r[axis])
                if not pts:
                    continue
                xs = [r[axis] for r in pts]
                ys = [r[key] for r in pts]
                style = {"marker": "os^Dv<>p"[i % 8], "label": name, "linestyle": "--" if "baseline" in name else "-"}
                if lo:
                    err = [[y - r[lo] for y, r in zip(ys, pts)], [r[hi] - y for y, r in zip(ys, pts)]]
                    ax.errorbar(xs, ys, yerr=err, capsize=3, **style)
                else:
                    ax.plot(xs, ys, **style)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tokens N" if axis == "n" else "vocabulary size V")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            xs = sorted({r[axis] for r in group})
            ax.set_xticks(xs, [f"{x:,}" for x in xs])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_locator(NullLocator())
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{title}\n{machine_line(info)}; median, bars p20-p80", fontsize=10)
        stem = title.split(": ", 1)[1].replace(", ", "_").replace("=", "")
        name = f"vs_{axis.upper()}_{'hidden_' if group[0]['kind'] == 'hidden' else ''}{stem}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    return written


# ---------------------------------------------------------------- CLI


def parse_shape(text: str) -> tuple[int, int | None, int]:
    """'NxV' or 'NxHxV' -> (N, H or None, V)."""
    parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    if len(parts) == 2:
        return parts[0], None, parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise argparse.ArgumentTypeError(f"shape {text!r} is not NxV or NxHxV")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark the SSPO loss paths against the eager baseline (see bench/README.md).",
    )
    p.add_argument("--suite", choices=sorted(SUITES), default="default", help="preset list of shapes")
    p.add_argument("--quick", action="store_true", help="the tiny CI smoke suite, few repeats, no AOT")
    p.add_argument(
        "--shape", action="append", type=parse_shape, metavar="NxV|NxHxV",
        help="custom shape instead of the suite (repeatable); NxHxV benchmarks the paths from hidden states",
    )  # fmt: skip
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32"], help="dtypes of custom shapes")
    p.add_argument(
        "--granularity", nargs="+", default=["subsentence"],
        choices=["subsentence", "sentence", "sequence", "token"], help="granularities of custom shapes",
    )  # fmt: skip
    p.add_argument(
        "--paths", nargs="+", choices=[*PATHS, "all"], help=f"paths to run (default: {' '.join(DEFAULT_PATHS)})"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--out", type=FsPath, default=DEFAULT_OUT, help="output folder (default bench/out)")
    p.add_argument(
        "--warmup", type=int, help="untimed calls after the first call (reported apart); default 1 on CUDA, 0 on CPU"
    )
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=30)
    p.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement, at least")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the baseline")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--aot", choices=["auto", "on", "off"], default="auto",
        help="include the sspo_kernels.aot register report (auto: when the module exists, not with --quick)",
    )  # fmt: skip
    p.add_argument("--aot-timeout", type=float, default=300)
    p.add_argument(
        "--peers", choices=["auto", "off"], default="auto",
        help="auto: the Liger-Kernel comparison of bench/liger_compare.py when Liger-Kernel is installed (CPU)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default on the CPU: 1, see README 'How time is measured')"
    )
    return p


def cases_from_args(args: argparse.Namespace) -> list[Case]:
    if not args.shape:
        return list(SUITES["quick" if args.quick else args.suite])
    return [
        Case(n, v, dtype, gran, hidden)
        for n, hidden, v in args.shape
        for dtype in args.dtype
        for gran in args.granularity
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    warmup = (1 if device == "cuda" else 0) if args.warmup is None else args.warmup
    settings = Settings(
        device=device, warmup=warmup, min_reps=args.min_reps, max_reps=args.max_reps, budget_s=args.budget,
        memory=not args.no_memory, check=not args.no_check, seed=args.seed,
    )  # fmt: skip
    if args.quick:
        settings.warmup, settings.min_reps, settings.max_reps, settings.budget_s = 0, 2, 3, 0.0
    if args.paths is None:
        path_names = list(DEFAULT_PATHS)
    elif "all" in args.paths:
        path_names = list(PATHS)
    else:
        path_names = list(dict.fromkeys(args.paths))
    # One thread on the CPU unless asked: on a small shared machine, intra-op threads wait on each other
    # whenever another process holds a core, and code made of many small ops (the chunked paths) then
    # measures the machine's load instead of itself. Both the baseline and the paths get the same count.
    threads = args.threads or (1 if device == "cpu" else None)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _main(args, device, settings, path_names)
    finally:
        torch.set_num_threads(saved_threads)


def _main(args: argparse.Namespace, device: str, settings: Settings, path_names: list[str]) -> int:
    cases = cases_from_args(args)
    out_dir: FsPath = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    start = time.perf_counter()
    info = machine_info(device)
    log(f"machine: {machine_line(info)}")
    copy_bytes = (1 << 30) if device == "cuda" else (64 << 20 if args.quick else 256 << 20)
    copy_gbps = copy_bandwidth(device, copy_bytes)
    log(f"copy bandwidth: {copy_gbps:.1f} GB/s ({copy_bytes // MIB} MiB device-to-device copy)")

    rows: list[dict] = []
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {case.label}")
        rows += run_case(case, path_names, settings, copy_gbps, log)

    if args.peers == "auto":
        log("peers")
        peers = run_peers(args.quick, device, log)
    else:
        peers = {"status": "off", "note": "--peers off"}
    if args.aot == "on" or (args.aot == "auto" and not args.quick):
        log("AOT register report (sspo_kernels.aot)")
        aot = run_aot(out_dir, args.aot_timeout, log)
    else:
        why = "--aot off" if args.aot == "off" else "--quick"
        aot = {"status": "off", "note": f"{why}; `--aot on` or `python -m sspo_kernels.aot` for the report"}
    elapsed = time.perf_counter() - start
    table = format_table(rows, copy_gbps)
    summary = f"{peers_summary(peers)}\n\n{aot_summary(aot)}"
    if headline(rows):
        summary = f"{headline(rows)}\n\n{summary}"
    report = f"{machine_line(info)}\n{table}\n\n{summary}\n"
    if aot.get("text"):
        report += f"\npython -m sspo_kernels.aot:\n{aot['text']}"

    results = {
        "machine": info,
        "settings": asdict(settings),
        "cases": [asdict(c) for c in cases],
        "paths": {n: PATHS[n].summary for n in path_names},
        "copy_gbps": copy_gbps,
        "rows": rows,
        "peers": {k: v for k, v in peers.items() if k != "table"},
        "aot": {k: v for k, v in aot.items() if k != "text"},
        "elapsed_s": elapsed,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    write_csv(rows, out_dir / "results.csv")
    (out_dir / "table.txt").write_text(report)
    plots: list[FsPath] = []
    if not args.no_plots:
        try:
            plots = plot_sweeps(rows, info, out_dir)
        except ImportError as exc:
            log(f"no plots: {exc}")

    print(table)
    print(f"\n{summary}")
    written = ["results.csv", "results.json", "table.txt", *(p.name for p in plots)]
    print(f"\nwrote {out_dir}/: {', '.join(written)}")
    print(f"total {elapsed:.0f} s")
    failed = [r for r in rows if r["status"] == "error" or r.get("check") == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
