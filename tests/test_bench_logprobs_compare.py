"""Smoke test of `python -m bench.logprobs_compare` on tiny shapes (a few seconds): every mode and every installed
implementation gets a complete row, the implementations agree, the table prints. Never how fast anything is."""

from __future__ import annotations

import json

import pytest

from bench.logprobs_compare import MODES, implementations, main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rows_are_complete_and_agree(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["--n", "48", "--hidden", "16", "--vocab", "300", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    impls = list(implementations())
    assert len(impls) == 3, f"verl and TRL are test dependencies: {impls}"
    assert [(r["mode"], r["impl"]) for r in rows] == [(m, i) for m in MODES for i in impls]
    for r in rows:
        assert r["time_median_s"] > 0 and r["peak_extra_mib"] > 0 and len(r["times_s"]) == 1
        assert r["max_abs_logp_vs_ours"] < 1e-5 and r["max_abs_entropy_vs_ours"] < 1e-5, r
        if r["mode"] != MODES[0]:
            assert r["rel_dhidden_vs_ours"] < 1e-5 and r["rel_dweight_vs_ours"] < 1e-5, r
    printed = capsys.readouterr().out
    assert "N=48 H=16 V=300" in printed and "TRL 1.16 chunked head" in printed
