"""The benchmark's own checks: its baseline computes docs/loss.md's loss, and the runners work end to end.

The runner tests are smoke tests on tiny shapes (`python -m bench.run --quick` and
`python -m bench.gpu_results --dry-run`, a few seconds each): they check that every output file is
written and every row is complete, never how fast anything is.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import make_batch
from _devices import TRITON

import reference
from bench import gpu_results
from bench.baseline import baseline_loss_from_hidden, baseline_sspo_loss
from bench.run import main

CORE_METRICS = (
    "clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "entropy_mean",
    "approx_kl", "num_segments", "mean_segment_len",
)  # fmt: skip


@pytest.mark.parametrize("granularity", ["subsentence", "sentence", "sequence", "token"])
@pytest.mark.parametrize("seed", [0, 1])
def test_baseline_matches_reference(granularity, seed):
    # small log-ratios, so that some segments are inside their clip bounds and carry gradient
    batch = make_batch(seed, [7, 12, 1, 9], seq_len=13, vocab=17, hole_p=0.2, log_ratio_scale=0.005)
    args, kwargs = batch.inputs(granularity)
    kwargs.pop("ref_logprobs")
    logits_ref = batch.fresh_logits()
    expected = reference.sspo_loss(logits_ref, *args[1:], **kwargs)
    (grad_ref,) = torch.autograd.grad(expected.loss, logits_ref)

    logits = batch.logits.detach().float().requires_grad_(True)
    loss, logp, entropy, metrics = baseline_sspo_loss(
        logits, *args[1:], granularity=granularity, boundary=kwargs.get("boundary")
    )
    (grad,) = torch.autograd.grad(loss, logits)
    assert_close("loss", loss, expected.loss, atol=1e-6)
    assert_close("logp", logp, expected.logprobs, atol=1e-5)
    assert_close("entropy", entropy, expected.entropy, atol=1e-5)
    assert_rel_norm("dlogits", grad, grad_ref, tol=1e-5)
    # the baseline reports the ten core metrics of docs/loss.md (not those of the off-policy corrections)
    assert set(metrics) == set(CORE_METRICS)
    for name, value in metrics.items():
        assert_close(name, value, expected.metrics[name], atol=1e-5)


def test_baseline_flat_and_from_hidden():
    gen = torch.Generator().manual_seed(0)
    n, h, v = 11, 5, 13
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, v, (n,), generator=gen)
    mask = torch.rand(n, generator=gen) > 0.2
    old = torch.randn(n, generator=gen, dtype=torch.float64) * 0.01 - 2.5
    adv = torch.randn(n, generator=gen, dtype=torch.float64)  # per token
    boundary = torch.rand(v, generator=gen) < 0.3
    opts = dict(granularity="subsentence", boundary=boundary)
    expected = reference.sspo_loss(hidden @ weight.T, tokens, old, adv, mask, **opts)
    loss, *_ = baseline_loss_from_hidden(hidden, weight, tokens, old, adv, mask, **opts)
    assert_close("loss", loss, expected.loss, atol=1e-6)


def test_runner_quick(tmp_path, capsys):
    status = main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    for name in ("results.csv", "results.json", "table.txt"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    ran = {r["path"] for r in rows if r["status"] == "ok"}
    assert {"baseline", "reference", "torch", "torch-inplace", "baseline-linear"} <= ran
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok":
            assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["peak_mib"] >= 0, r
            assert r.get("check", "ok") == "ok", r
    assert results["peers"]["status"] in ("ok", "skipped"), results["peers"]
    assert "speedup" in printed and str(tmp_path) in printed
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert sorted(p.name[:5] for p in tmp_path.glob("*.png")) == ["vs_N_", "vs_V_"]


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="7" time="12.5"><testcase classname="tests.test_gpu" name="test_a" time="1"/>
<testcase classname="tests.test_gpu" name="test_b" time="1"><failure message="boom"/></testcase>
</testsuite></testsuites>"""


@TRITON  # the fused segment step row runs interpreted: on a CUDA machine the real run covers it
def test_gpu_results_dry_run(tmp_path, capsys):
    """bench/gpu_suite.sh's benchmark, every section, on the CPU at tiny shapes (the loss rows with the
    torch backend, the fused segment step interpreted, Liger's Triton loss skipped)."""
    xml = tmp_path / "pytest_gpu.xml"
    xml.write_text(JUNIT)
    assert gpu_results.main(["--dry-run", "--out", str(tmp_path), "--pytest-xml", str(xml)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "table.txt").read_text().strip() in printed
    assert results["dry_run"] and set(results["sections"]) == set(gpu_results.SECTIONS)
    assert results["env"]["torch"] == torch.__version__ and results["env"]["git"]
    assert results["copy"]["status"] == "ok" and results["copy"]["gbps"] > 0

    rows = {r["name"]: r for section in ("headline", "linear", "step", "launches") for r in results[section]}
    for name, row in rows.items():
        assert row["status"] in ("ok", "skipped"), (name, row)
    assert rows["liger triton_grpo_loss"]["status"] == "skipped"
    for row in results["headline"][:3]:
        assert row["status"] == "ok", row
        for key in ("fwd", "fwdbwd"):
            assert row[key]["ms"] > 0 and row[key]["gbps"] > 0 and row[key]["pct_copy"] > 0, (row["name"], key)
        assert row["fwdbwd_graph"] is None  # CUDA only
    default, fixed = results["linear"][:2]
    assert (default["schedule"], fixed["schedule"]) == ("two-phase", "single-pass"), (default, fixed)
    for row in (default, fixed):
        assert row["weight_grad_path"] != "unknown" and row["fwdbwd"]["tflops"] > 0
    step = results["step"][0]
    for form in ("fused", "composed_triton_segsum", "composed_torch_segsum"):
        assert step[form]["eager"]["ms"] > 0, (form, step[form])
    for row in results["launches"]:
        assert row["fwd_dispatch"] > 0 and row["bwd_dispatch"] > 0 and row["fwd_kernels"] == 0, row
    assert results["pytest"] | {"failed_tests": None} == {
        "tests": 7, "failures": 1, "errors": 0, "skipped": 2, "passed": 4, "seconds": 12.5, "failed_tests": None,
    }  # fmt: skip
    assert results["pytest"]["failed_tests"] == ["tests.test_gpu::test_b"]
    for block in ("headline:", "fused linear:", "segment step alone", "launches per call", "pytest -m gpu: 4 passed"):
        assert block in printed, block
