"""The printed table of the GPU results (`bench/gpu_results.py`), one block per section, and the totals
of a pytest JUnit XML."""

from __future__ import annotations

from pathlib import Path


def _ms(timing: dict | None) -> str:
    if not timing:
        return "-"
    ms = timing["ms"]
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _num(x, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def _status(row: dict) -> str:
    return "" if row.get("status") == "ok" else f"{row.get('status')}: {row.get('note', '')}"


def format_table(results: dict) -> str:
    env = results.get("env", {})
    lines = [
        f"device: {env.get('gpu', '?')} (capability {env.get('capability', '-')}, {env.get('sms', '-')} SMs); "
        f"torch {env.get('torch', '?')} (CUDA {env.get('cuda', '-')}), triton {env.get('triton', '?')}, "
        f"liger-kernel {env.get('liger_kernel', '?')}; git {env.get('git', '?')}"
    ]
    copy = results.get("copy")
    copy_gbps = copy.get("gbps") if copy else None
    if copy:
        moved = copy.get("bytes", 0) >> 20
        lines.append(
            f"copy bandwidth: {_num(copy_gbps)} GB/s (empty_like(x).copy_(x), {moved} MiB moved) {_status(copy)}"
        )
    sizes = results.get("sizes", {})
    if "headline" in results:
        n = sizes.get("b", 0) * sizes.get("t", 0)
        lines += [
            "",
            f"headline: bf16, N={n} ({sizes.get('b')} x {sizes.get('t')}), V={sizes.get('v')}, default options",
        ]
        lines.append(
            f"  {'path':<40} {'fwd ms':>8} {'f+b ms':>8} {'f+b graph':>9} {'GB/s f':>7} {'GB/s f+b':>8} "
            f"{'%copy f':>7} {'%copy f+b':>9}"
        )
        for row in results["headline"]:
            fwd, fb, graph = row.get("fwd"), row.get("fwdbwd"), row.get("fwdbwd_graph")
            best = graph or fb
            lines.append(
                f"  {row['name']:<40} {_ms(fwd):>8} {_ms(fb):>8} {_ms(graph):>9} {_num(fwd and fwd.get('gbps')):>7} "
                f"{_num(best and best.get('gbps')):>8} {_num(fwd and fwd.get('pct_copy')):>7} "
                f"{_num(best and best.get('pct_copy')):>9} {_status(row)}"
            )
        lines.append("  (GB/s f+b and %copy f+b: of the graph replay when there is one; traffic 3 x logits bytes)")
    if "linear" in results:
        n = sizes.get("b", 0) * sizes.get("t", 0)
        lines += ["", f"fused linear: bf16, N={n}, H={sizes.get('hidden')}, V={sizes.get('v')} (TFLOPS of 2NHV / 6NHV)"]
        lines.append(
            f"  {'path':<40} {'schedule':<12} {'weight grad':<15} {'fwd ms':>8} {'f+b ms':>8} {'TF f':>6} {'TF f+b':>6}"
        )
        for row in results["linear"]:
            fwd, fb = row.get("fwd"), row.get("fwdbwd")
            lines.append(
                f"  {row['name']:<40} {row.get('schedule', '-'):<12} {row.get('weight_grad_path', '-'):<15} "
                f"{_ms(fwd):>8} {_ms(fb):>8} {_num(fwd and fwd.get('tflops'), '.0f'):>6} "
                f"{_num(fb and fb.get('tflops'), '.0f'):>6} {_status(row)}"
            )
    if "step" in results:
        lines += ["", "segment step alone (subsentence; graph replay ms / eager ms)"]
        lines.append(f"  {'tokens':>8} {'fused':>17} {'composed, triton segsum':>24} {'composed, torch segsum':>23}")
        for row in results["step"]:
            cells = []
            for form in ("fused", "composed_triton_segsum", "composed_torch_segsum"):
                cell = row.get(form) or {}
                cells.append(f"{_ms(cell.get('graph'))} / {_ms(cell.get('eager'))}" if "eager" in cell else "error")
            lines.append(f"  {row.get('tokens', '-'):>8} {cells[0]:>17} {cells[1]:>24} {cells[2]:>23} {_status(row)}")
    if "launches" in results:
        lines += [
            "",
            "launches per call: GPU kernels from torch.profiler (+ memcpy/memset) | dispatched ops + Triton launches",
        ]
        lines.append(f"  {'call':<52} {'fwd':>9} {'bwd':>9} {'fwd disp':>8} {'bwd disp':>8}")
        for row in results["launches"]:
            fwd = f"{row.get('fwd_kernels', '-')}+{row.get('fwd_memops', '-')}"
            bwd = f"{row.get('bwd_kernels', '-')}+{row.get('bwd_memops', '-')}"
            lines.append(f"  {row['name'][10:]:<52} {fwd:>9} {bwd:>9} {row.get('fwd_dispatch', '-'):>8} "
                         f"{row.get('bwd_dispatch', '-'):>8} {_status(row)}")  # fmt: skip
    if "pytest" in results:
        p = results["pytest"]
        if "tests" in p:
            lines += ["", f"pytest -m gpu: {p['passed']} passed, {p['failures']} failed, {p['errors']} errors, "
                      f"{p['skipped']} skipped in {p['seconds']:.0f} s"]  # fmt: skip
            lines += [f"  FAILED {name}" for name in p["failed_tests"]]
        else:
            lines += ["", f"pytest -m gpu: {_status(p)}"]
    lines += ["", "section seconds: " + ", ".join(f"{k} {v}" for k, v in results.get("sections", {}).items())]
    return "\n".join(lines)


def pytest_totals(xml_path: Path) -> dict:
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    out = {k: int(suite.get(k, 0)) for k in keys}
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["seconds"] = float(suite.get("time", 0.0))
    out["failed_tests"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ][:50]
    return out
