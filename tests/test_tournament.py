"""The tournament (`bash ci/demo.sh --tournament`, examples/toy_rl/tournament.py) on tiny sizes: 2 methods x
2 seeds x 2 settings x a few iterations (seconds). Checks the JSON's schema, that its intervals and paired
differences are the arithmetic of the per-seed numbers, that utilisation is read from the gradients, that
the runs do not depend on how many processes ran them, and the interval arithmetic on fixed numbers.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from examples.toy_rl.run import main
from examples.toy_rl.stats import mean_ci, paired_ci, t_quantile_975

ITERATIONS = 2
TINY = [
    "--tournament", "--methods", "GSPO", "CISPO-token", "--seeds", "0", "1",
    "--min-len", "2", "--max-len", "3", "--embed", "16", "--hidden", "32",
    "--warmup-steps", "100", "--warmup-batch", "32", "--warmup-lr", "2e-2",
    "--iterations", str(ITERATIONS), "--prompts", "8", "--group", "4", "--epochs", "2", "--minibatches", "2",
    "--off-policy-scale", "2", "--eval-prompts", "64",
]  # fmt: skip
SETTINGS = ("default", "off-policy")


def _run(out, *extra):
    threads = torch.get_num_threads()
    try:
        return main([*TINY, *extra, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tournament(tmp_path_factory):
    """(payload returned by main, the JSON it wrote, the output folder) of one tiny run on 2 processes."""
    out = tmp_path_factory.mktemp("tournament")
    payload = _run(out, "--workers", "2")
    return payload, json.loads((out / "tournament.json").read_text()), out


def _interval(x):
    assert set(x) >= {"mean", "ci95"}, x
    lo, hi = x["ci95"]
    assert lo <= x["mean"] <= hi, x
    return lo, hi


def test_json_schema_and_outputs(tournament):
    _, written, out = tournament
    assert (out / "tournament.png").stat().st_size > 0
    assert (out / "tournament.md").read_text().count("| GSPO |") == 3  # a row per setting, one in the short table
    cfg = written["config"]
    assert cfg["seeds"] == [0, 1] and set(cfg["settings"]) == set(SETTINGS)
    assert cfg["settings"]["off-policy"]["minibatches"] == 2 * cfg["settings"]["default"]["minibatches"]
    assert cfg["settings"]["default"]["iterations"] == ITERATIONS
    assert list(written["methods"]) == ["GSPO", "CISPO-token"]
    assert written["methods"]["GSPO"]["granularity"] == "sequence"
    assert written["methods"]["CISPO-token"]["objective"] == "cispo"
    for name, method in written["methods"].items():
        assert set(method["settings"]) == set(SETTINGS), name
        for setting, e in method["settings"].items():
            for key in ("reward_gain", "fully_clipped", "utilisation", "token_utilisation", "clip_frac_low",
                        "clip_frac_high", "approx_kl"):  # fmt: skip
                _interval(e[key])
            assert e["ratio_min"] <= e["ratio_max"]
            assert [r["seed"] for r in e["seeds"]] == [0, 1], (name, setting)
            assert all(len(r["curves"]["reward"]) == ITERATIONS for r in e["seeds"])
            assert e["checks_failed"] == {}, (name, setting, e["checks_failed"])


def test_intervals_are_the_arithmetic_of_the_seeds(tournament):
    methods = tournament[1]["methods"]
    for name, method in methods.items():
        for setting, e in method["settings"].items():
            gains = [r["reward_end"] - r["reward_start"] for r in e["seeds"]]
            fully = [r["fully_clipped"] for r in e["seeds"]]
            for key, values, bounds in (("reward_gain", gains, None), ("fully_clipped", fully, (0.0, 1.0))):
                expected = mean_ci(values, bounds)
                assert e[key]["mean"] == pytest.approx(expected["mean"]), (name, setting, key)
                assert e[key]["ci95"] == pytest.approx(expected["ci95"]), (name, setting, key)
            # two seeds: half-width t(0.975, 1) * |a - b| / 2
            lo, hi = e["reward_gain"]["ci95"]
            assert (hi - lo) / 2 == pytest.approx(12.7062 * abs(gains[0] - gains[1]) / 2)
    for setting in SETTINGS:
        base, other = (methods[n]["settings"][setting]["seeds"] for n in ("GSPO", "CISPO-token"))
        diffs = [
            (o["reward_end"] - o["reward_start"]) - (b["reward_end"] - b["reward_start"]) for o, b in zip(other, base)
        ]
        paired = methods["CISPO-token"]["settings"][setting]["reward_gain_vs_GSPO"]
        assert paired["mean"] == pytest.approx(sum(diffs) / 2)
        assert "reward_gain_vs_GSPO" not in methods["GSPO"]["settings"][setting]  # GRPO absent: the first is the base


def test_utilisation_is_read_from_the_gradients(tournament):
    methods = tournament[1]["methods"]
    for setting in SETTINGS:
        for name in methods:
            for r in methods[name]["settings"][setting]["seeds"]:
                assert r["utilisation"] == pytest.approx(1 - r["fully_clipped"])
                assert 0 <= r["token_utilisation"] <= 1
        # CISPO never zeroes a gradient; GSPO's response ratio leaves its trust region at once
        assert methods["CISPO-token"]["settings"][setting]["fully_clipped"]["mean"] == 0
        assert methods["CISPO-token"]["settings"][setting]["token_utilisation"]["mean"] == 1
        assert methods["GSPO"]["settings"][setting]["fully_clipped"]["mean"] > 0


def test_results_do_not_depend_on_the_workers(tournament, tmp_path):
    inline = _run(tmp_path, "--workers", "1", "--no-plot")
    for name, method in tournament[0]["methods"].items():
        for setting, e in method["settings"].items():
            for a, b in zip(e["seeds"], inline["methods"][name]["settings"][setting]["seeds"]):
                assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_interval_arithmetic_on_fixed_numbers():
    x = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764 * math.sqrt(2.5) / math.sqrt(5)
    assert x["mean"] == 3.0 and x["sd"] == pytest.approx(math.sqrt(2.5))
    assert x["ci95"] == pytest.approx([3.0 - half, 3.0 + half])
    assert x["ci95"] == pytest.approx([1.0368, 4.9632], abs=1e-4)
    assert mean_ci([0.25]) == {"mean": 0.25, "ci95": [0.25, 0.25], "sd": 0.0, "n": 1}
    # a share's interval is cut to [0, 1]
    assert mean_ci([0.0, 0.0, 0.03], (0.0, 1.0))["ci95"] == pytest.approx([0.0, 0.01 + 4.3027 * 0.03 / 3])
    with pytest.raises(ValueError):
        mean_ci([])
    # paired: the interval of the differences, here 0.1 +- 0 -> significant
    p = paired_ci([0.3, 0.4, 0.5], [0.2, 0.3, 0.4])
    assert p["mean"] == pytest.approx(0.1) and p["ci95"] == pytest.approx([0.1, 0.1]) and p["significant"]
    q = paired_ci([0.1, 0.3], [0.2, 0.2])  # differences -0.1, 0.1: mean 0, half-width 12.7062 * 0.1
    assert q["ci95"] == pytest.approx([-1.27062, 1.27062]) and not q["significant"]
    with pytest.raises(ValueError):
        paired_ci([1.0], [1.0, 2.0])
    # Student t quantiles: the table and the expansion beyond it (reference values to 4 digits)
    for df, t in ((1, 12.7062), (4, 2.7764), (10, 2.2281), (30, 2.0423), (40, 2.0211), (60, 2.0003), (120, 1.9799)):
        assert t_quantile_975(df) == pytest.approx(t, abs=2e-3), df
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_report_from_a_saved_json_recomputes_the_same_summaries(tournament, tmp_path):
    _, written, out = tournament
    again = main(["--report-from", str(out / "tournament.json"), "--out", str(tmp_path), "--no-plot"])
    assert json.loads(json.dumps(again["methods"])) == written["methods"]
    assert (tmp_path / "tournament.md").read_text() == (out / "tournament.md").read_text()
