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

from examples.toy_rl.methods import TOURNAMENT_METHODS
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
        # a token's gradient is exactly zero iff the loss reported it clipped (A != 0 tokens only), and where
        # the loop's float64 gradient of the objective is zero
        assert u["zero_grad_tokens"] == u["clipped_tokens_reported"], (name, i, u)
        assert u["zero_grad_mismatch"] == 0 or tie, (name, i, u)
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


def _batch(seed: int):
    """A small batch of the toy task's vocabulary: logits, tokens (numbers, ',' and a closing '.'), a prefix
    mask, old log-probs 0.3 nats of noise away (2 for odd seeds, so ratios reach CISPO's cap of 5), and
    per-response advantages (one of them 0)."""
    from examples.toy_rl.task import COMMA, STOP, VOCAB

    g = torch.Generator().manual_seed(seed)
    batch, length = 6, 10
    tokens = torch.randint(0, 10, (batch, length), generator=g)
    tokens[torch.rand(batch, length, generator=g) < 0.25] = COMMA
    lengths = torch.randint(3, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    tokens[torch.arange(batch), lengths - 1] = STOP
    logits = torch.randn(batch, length, len(VOCAB), generator=g, dtype=torch.float64) * 2
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    old = torch.where(
        mask, logp + (2.0 if seed % 2 else 0.3) * torch.randn(batch, length, generator=g, dtype=torch.float64), 0.0
    )
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    adv[0] = 0.0
    return logits, tokens, mask, old, adv


@pytest.mark.parametrize("name", [m.name for m in TOURNAMENT_METHODS])
def test_the_loops_recomputation_matches_the_reference(name):
    """measure.recompute_metrics (the demo's own float64 check of every objective) against the package's
    float64 oracle `reference.sspo_loss`: the clip fractions, ratio range, KL and vespo's phi, and which
    tokens get exactly zero gradient."""
    from examples.toy_rl.measure import recompute_metrics, segment_index
    from examples.toy_rl.task import VOCAB
    from reference import sspo_loss as reference_loss
    from sspo_kernels import boundary_table

    method = next(m for m in TOURNAMENT_METHODS if m.name == name)
    boundary = boundary_table(list(VOCAB))
    options = {k: v for k, v in method.loss_options(boundary).items() if k != "backend"}
    zero_grad_seen = clipped_seen = 0
    for seed in range(4):
        logits, tokens, mask, old, adv = _batch(seed)
        logits.requires_grad_(True)
        ref = reference_loss(logits, tokens, old, adv, mask, **options)
        ref.loss.backward()
        seg = segment_index(tokens, mask, method.rule.granularity, boundary)
        mine = recompute_metrics(ref.logprobs, old, ref.entropy, mask, seg, adv, method.rule)
        for key in ("clip_frac_low", "clip_frac_high", "clip_frac", "ratio_min", "ratio_max", "approx_kl",
                    "vespo_phi_mean"):  # fmt: skip
            assert mine[key] == pytest.approx(float(ref.metrics[key]), rel=1e-9, abs=1e-12), (name, seed, key)
        active = (adv != 0)[:, None] & mask
        zero = (logits.grad == 0).all(dim=-1)
        assert torch.equal(zero & active, mine["predicted_zero_grad"] & active), (name, seed)
        if seed % 2 == 0:  # (2 nats of noise saturate sapo's gate and vespo's phi even in float64)
            zero_grad_seen += int((zero & active).sum())
        clipped_seen += mine["clipped_tokens"]
    # the batches reach what each objective does: hard clips zero some gradients, the others none near rho = 1
    if method.rule.objective in ("clip", "gmpo"):
        assert zero_grad_seen > 0 and clipped_seen > 0, name
    else:
        assert zero_grad_seen == 0, name
    if method.rule.objective == "cispo":
        assert clipped_seen > 0, name


def test_methods_use_the_packages_defaults():
    """The widths and parameters the demo passes explicitly are the package's defaults for each objective at
    each granularity (docs/loss.md, the tables at the top)."""
    from examples.toy_rl.measure import BOUNDED
    from sspo_kernels._options import make_config

    for m in TOURNAMENT_METHODS:
        r = m.rule
        cfg = make_config(r.granularity, objective=r.objective)
        if r.objective in BOUNDED:
            got = (r.eps_low, r.eps_high, r.entropy_gamma, r.k_min, r.k_max)
            assert got == (cfg.eps_low, cfg.eps_high, cfg.entropy_gamma, cfg.k_min, cfg.k_max), m.name
        for key, value in r.params:
            assert getattr(cfg, key) == value, (m.name, key)
        assert r.log_ratio_clamp == cfg.log_ratio_clamp


def test_every_objective_passes_its_checks(tmp_path):
    """A tiny run of every method of the tournament: the loss's metrics and zero gradients agree with the
    loop's float64 recomputation, for every objective (what `bash ci/demo.sh --tournament` requires)."""
    from examples.toy_rl.tournament_report import checks_failed

    names = [m.name for m in TOURNAMENT_METHODS]
    quick = [*TINY, "--iterations", "2", "--methods", *names, "--no-plot", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    try:
        methods = main(quick)["methods"]
    finally:
        torch.set_num_threads(threads)
    for name in names:
        assert checks_failed(methods[name]["checks"]) == [], name
        assert methods[name]["objective"] in name.lower() or name in ("GRPO", "GSPO", "SSPO")
        fully = methods[name]["fully_clipped"]
        if methods[name]["objective"] in ("cispo", "reinforce"):  # they never zero a response's gradient
            assert fully == 0 and methods[name]["token_utilisation"] == 1, name
