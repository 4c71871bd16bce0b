"""The benchmark runner: `python -m bench.run [options]` (README.md explains every column).

For every case (shape) and path (implementation) it measures, in one process and one run:
forward and forward+backward time (median and p20/p80 over repeats after warmup), the first call
separately, the peak extra memory, an effective bandwidth (or TFLOPS from hidden states) against
a device-to-device copy measured in the same run, the ratios to the baseline of the same case,
and a correctness check against that baseline. It prints a table and writes results.csv,
results.json, table.txt and PNG plots into the output folder, plus the AOT register report.

The measuring is in bench/measure.py; the table, CSV, summaries and plots in bench/report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path as FsPath

import torch

from bench.launches import launch_report
from bench.measure import MIB, REPO, Settings, _quiet_stderr, copy_bandwidth, machine_info, run_case
from bench.registry import DEFAULT_PATHS, DTYPES, PATHS, SUITES, Case
from bench.report import (
    aot_summary,
    format_table,
    headline,
    launches_summary,
    machine_line,
    peers_summary,
    plot_sweeps,
    write_csv,
)

DEFAULT_OUT = REPO / "bench" / "out"


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


# Liger-Kernel's fused-linear GRPO loss against ours, through bench/liger_compare.py. The default is
# the case of the CPU target (our peak memory <= Liger's while >= 1.2x faster): N=2048, H=1024,
# V=32000 fp32, token level, ours on a packed batch with a CPU cu_seqlens, no bias (~1.5 min).
PEER_SIZES = {
    "default": dict(n=2048, hidden=1024, vocab=32000, batch=8, repeats=5, packed=True, bias=False,
                    ours=("sspo auto", "sspo two-phase")),
    "quick": dict(n=128, hidden=64, vocab=1000, batch=2, repeats=1, packed=True, bias=False),
}  # fmt: skip


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
        "--packed", action="store_true",
        help="custom shapes as one packed (N,) batch of whole responses with cu_seqlens instead of a padded (B, T) one",
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
    p.add_argument(
        "--launches", choices=["auto", "off"], default="auto",
        help="auto: device ops and Triton launches of one call per option set (bench/launches.py), not with --quick",
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
        Case(n, v, dtype, gran, hidden, args.packed)
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
    if args.launches == "auto" and not args.quick:
        log("launch counts (bench/launches.py)")
        launches = launch_report()
    else:
        why = "--launches off" if args.launches == "off" else "--quick"
        launches = {"status": "off", "note": f"{why}; `python -m bench.launches` for the table"}
    elapsed = time.perf_counter() - start
    table = format_table(rows, copy_gbps)
    summary = f"{peers_summary(peers)}\n\n{launches_summary(launches)}\n\n{aot_summary(aot)}"
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
        "launches": {k: v for k, v in launches.items() if k != "table"},
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
