"""The reporting of the benchmark runner (`python -m bench.run`; bench/run.py is the CLI).

The printed table, the headline, results.csv, the peer and AOT summaries, and the PNG plots of the
sweeps over N or V.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path as FsPath

import torch

from bench.measure import MIB
from bench.registry import DTYPES, HEADLINE

CSV_COLUMNS = (
    "case", "kind", "n", "v", "hidden", "dtype", "granularity", "path", "status", "note",
    "fwd_ms", "fwd_p20_ms", "fwd_p80_ms", "fwdbwd_ms", "fwdbwd_p20_ms", "fwdbwd_p80_ms", "reps_fwd", "reps_fwdbwd",
    "first_call_ms", "speedup_fwd", "speedup_fwdbwd", "peak_mib", "peak_fwd_mib", "saved_mib",
    "peak_bytes_per_token", "mem_vs_baseline", "gbps_fwd", "gbps_fwdbwd", "pct_copy_fwd", "pct_copy_fwdbwd",
    "tflops_fwd", "tflops_fwdbwd", "loss", "loss_err", "grad_rel_err", "check",
)  # fmt: skip


def machine_line(info: dict) -> str:
    if info["device"] == "cuda":
        where = f"{info['gpu']} (CUDA {info['cuda']})"
    else:
        threads = f"{info['threads']} thread" + ("s" if info["threads"] != 1 else "")
        where = f"{info['cpu_count']} vCPU {info['cpu']}, {threads}"
    return f"{where}, torch {info['torch']}, triton {info['triton']}"


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


def peers_summary(peers: dict) -> str:
    if peers.get("status") != "ok":
        return f"Peers (Liger-Kernel): {peers.get('status')}: {peers.get('note', '')}"
    size = peers["size"]
    layout = "ours packed with a CPU cu_seqlens" if size.get("packed") else "padded"
    bias = "no bias" if size.get("bias") is False else "bias"
    title = (
        f"Peers: Liger-Kernel LigerFusedLinearGRPOLoss vs sspo_loss_from_hidden, token level, eps 0.2, "
        f"N={size['n']} H={size['hidden']} V={size['vocab']} fp32, {layout}, {bias} "
        f"(bench/liger_compare.py; forward+backward)"
    )
    return f"{title}\n{peers['table']}"


def launches_summary(launches: dict) -> str:
    if launches.get("status") != "ok":
        return f"Launch counts: {launches.get('status')}: {launches.get('note', '')}"
    title = "Launch counts of one call (device ops + Triton launches; bench/launches.py):"
    return f"{title}\n{launches['table']}"


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
