"""The toy RL demo (examples/toy_rl, `bash ci/demo.sh`) on tiny sizes: a few seconds on 2 cores.

Checks the structure the demo exists to show (whole responses lose their gradient most often under
GSPO's response ratio, least under GRPO's token ratio), that the loss's metrics agree with what the
loop measures by itself (clip counts, segment ratio range and KL recomputed from the returned
log-probs; zero gradients read off the hidden states), the JSON's keys, and determinism for a seed.
"""

from __future__ import annotations

import json

import pytest
import torch
from _assert import assert_close

from examples.toy_rl.report import CURVE_KEYS, SUMMARY_KEYS
from examples.toy_rl.run import main

ITERATIONS = 4
TINY = [
    "--min-len", "2", "--max-len", "3", "--embed", "16", "--hidden", "32",
    "--warmup-steps", "100", "--warmup-batch", "32", "--warmup-lr", "2e-2",
    "--iterations", str(ITERATIONS), "--prompts", "8", "--group", "4", "--epochs", "2", "--minibatches", "2",
    "--eval-prompts", "32", "--seeds", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(payload returned by main, the JSON it wrote, the output folder) of one tiny run."""
    out = tmp_path_factory.mktemp("toy_rl")
    threads = torch.get_num_threads()
    try:
        payload = main([*TINY, "--keep-updates", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return payload, json.loads((out / "toy_rl.json").read_text()), out


def test_outputs_have_the_documented_keys(demo):
    _, written, out = demo
    assert (out / "toy_rl.png").stat().st_size > 0
    assert set(written["methods"]) == {"GRPO", "GSPO", "SSPO"}
    for name, method in written["methods"].items():
        missing = [k for k in SUMMARY_KEYS if k not in method]
        assert not missing, f"{name}: missing {missing}"
        for key in CURVE_KEYS:
            assert len(method["curves"][key]) == ITERATIONS, f"{name}: curve {key}"
        assert method["seconds"] > 0
        assert 0 <= method["fully_clipped"] <= 1 and 0 <= method["clip_frac"] <= 1
        assert method["ratio_min"] <= 1 <= method["ratio_max"]
    assert written["methods"]["GSPO"]["granularity"] == "sequence"
    assert written["config"]["rl"]["iterations"] == ITERATIONS


def test_fully_clipped_share_orders_the_granularities(demo):
    methods = demo[0]["methods"]
    for name, method in methods.items():
        assert method["seeds"][0]["active_responses"] > 0, f"{name}: no response with A != 0, nothing measured"
    token, subsentence, sequence = (methods[n]["fully_clipped"] for n in ("GRPO", "SSPO", "GSPO"))
    assert sequence > subsentence >= token, (token, subsentence, sequence)
    assert sequence > token
    # the same order for the share of clipped tokens
    assert methods["GSPO"]["clip_frac"] > methods["SSPO"]["clip_frac"] > methods["GRPO"]["clip_frac"]


@pytest.mark.parametrize("name", ["GRPO", "GSPO", "SSPO"])
def test_loss_metrics_match_the_loops_measurements(demo, name):
    updates = demo[0]["methods"][name]["seeds"][0]["updates"]
    assert len(updates) == ITERATIONS * 2 * 2
    for i, u in enumerate(updates):
        mine = u["recomputed"]
        # at an fp32 tie with a bound (margin < 1e-6) a segment may be counted on the other side
        tie = u["bound_margin"] < 1e-6
        off_by = abs(u["clipped_tokens_recomputed"] - u["clipped_tokens_reported"]) / u["tokens"] if tie else 0.0
        for key in ("clip_frac_low", "clip_frac_high", "clip_frac"):
            assert_close(f"{name} update {i} {key}", torch.tensor(u[key]), torch.tensor(mine[key]), atol=1e-6 + off_by)
        kl, kl_mine = torch.tensor(u["approx_kl"]), torch.tensor(mine["approx_kl"])
        assert_close(f"{name} update {i} approx_kl", kl, kl_mine, atol=1e-6)
        for key in ("ratio_min", "ratio_max"):
            assert_close(f"{name} update {i} {key}", torch.tensor(u[key]), torch.tensor(mine[key]), rtol=1e-5)
        # a token's gradient is exactly zero iff the loss reported it clipped (A != 0 tokens only)
        assert u["zero_grad_tokens"] == u["clipped_tokens_reported"], (name, i, u)
        # the float64 recomputation counts the same, unless a segment's ratio ties its bound in fp32
        assert u["clipped_tokens_recomputed"] == u["clipped_tokens_reported"] or u["bound_margin"] < 1e-6, (name, i, u)
        assert u["fully_clipped"] == u["fully_clipped_predicted"] or tie, (name, i, u)
    # something was clipped at all, so the comparisons above are not all of zeros
    if name != "GRPO":
        assert sum(u["clipped_tokens_reported"] for u in updates) > 0
    # the rollout's old log-probs (returned by the loss) match the sampler's own
    assert max(u.get("old_logprob_gap", 0.0) for u in updates) < 1e-4


def test_summary_agrees_with_updates(demo):
    for name, method in demo[0]["methods"].items():
        updates = method["seeds"][0]["updates"]
        active = sum(u["active"] for u in updates)
        assert method["fully_clipped"] == pytest.approx(sum(u["fully_clipped"] for u in updates) / active), name
        assert method["ratio_max"] == max(u["ratio_max"] for u in updates), name


def test_deterministic_for_a_seed(tmp_path):
    quick = [*TINY, "--warmup-steps", "20", "--iterations", "1", "--methods", "SSPO", "--no-plot"]
    threads = torch.get_num_threads()
    try:
        runs = [main([*quick, "--out", str(tmp_path / str(k))])["methods"]["SSPO"] for k in range(2)]
    finally:
        torch.set_num_threads(threads)
    for run in runs:
        del run["seconds"]
        for seed_run in run["seeds"]:
            del seed_run["seconds"]
    assert runs[0] == runs[1]
