"""The benchmark's own checks: its baseline computes docs/loss.md's loss, and the runner works end to end.

The runner test is a smoke test on tiny shapes (`python -m bench.run --quick`, a few seconds): it
checks that every output file is written and every row is complete, never how fast anything is.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from _assert import assert_close, assert_rel_norm
from _cases import make_batch

import reference
from bench.baseline import baseline_loss_from_hidden, baseline_sspo_loss
from bench.run import main


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
    for name, value in expected.metrics.items():
        assert_close(name, metrics[name], value, atol=1e-5)


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
