"""`SSPOGRPOTrainer._compute_loss` against TRL 1.16's own `GRPOTrainer._compute_loss`, over its loss settings.

A trainer on a tiny random Qwen2 (`test_integration_trl_models.py` runs the same comparison on the models only
TRL's head covers). Its `inputs` come from TRL's own generation step (`_generate_and_score_completions`): once
without vLLM (on-policy, no old log-probs) and once per `vllm_importance_sampling_mode` with a stand-in sampler
whose log-probs are the policy's plus noise (one NaN), so `importance_sampling_ratio` and
`sampling_per_token_logps` are TRL's own. The model is then perturbed, so the current policy is off the old one.
Each case sets the trainer's attributes as a config would (TRL's loss reads them at every call) and compares, on
the same model and inputs, TRL's loss, every parameter gradient, the logged metrics and the adaptive entropy
controller's state with ours (fp32).

The grid: every loss type x importance-sampling level x (vLLM off, on, on), the 4 modes cycling so that each loss
type meets each; beta / bias correction, delta, the off-policy mask, the entropy mask, the entropy bonus (static,
adaptive), gradient accumulation, tool masks, on-/off-policy and the forced log-probs path chosen (greedily, a
fixed seed) so that every value meets every loss type and every pair of values of two settings occurs.
Truncated completions are masked out (empty rows) in every case.
"""

from __future__ import annotations

import functools
import itertools
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from _assert import assert_close, assert_rel_norm  # noqa: E402
from test_integration_trl import (  # noqa: E402
    config_kwargs,
    gpt2_tokenizer,
    prompt_dataset,
    reward_len,
    tiny_qwen2,
)
from trl import GRPOTrainer  # noqa: E402

from sspo_kernels.integrations.trl import SUPPORTED_LOSS_TYPES, SSPOGRPOConfig, SSPOGRPOTrainer  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

LOSS_RTOL = 1e-6  # of the loss's size without the cancellation of zero-mean advantages (TRL's loss on |A|)
# vespo's weight is exp(lambda + k log w - lambda w) of a sum of log-ratios over the response: it amplifies the
# heads' fp32 rounding of the log-probs (~1 ulp of |l| ~ 10 each, two summation orders) ~10 times. Its loss is
# held to 1e-5 against TRL, and to LOSS_RTOL against TRL's loss computed on the package head's log-probs.
VESPO_LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5
METRIC_ATOL = 1e-5
MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# clip bounds per mode, chosen so that some weights are clipped / masked by the stand-in sampler's noise
IS_BOUNDS = {"token_truncate": (0.9, 1.1), "token_mask": (0.85, 1.2), "sequence_truncate": (0.6, 1.5),
             "sequence_mask": (None, 1.5)}  # fmt: skip
ROWS = [{"prompt": "The cat sat"}] * 4 + [{"prompt": "Once upon a time,"}] * 4
WORST: dict[str, list[float]] = {}


# ---------------------------------------------------------------- one comparison


def _state(trainer):
    return (trainer.entropy_coef, trainer._last_world_entropy, trainer._entropy_window_stats)


def _set_state(trainer, state):
    trainer.entropy_coef, trainer._last_world_entropy, trainer._entropy_window_stats = state


def _call(fn, trainer, inputs, params, *, grad=True):
    """(loss, grads, metrics logged by the call) of `fn(trainer, model, inputs)`."""
    logged = trainer._metrics["train"]
    before = {k: len(v) for k, v in logged.items()}
    if grad:
        loss = fn(trainer, trainer.model, inputs)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    else:
        with torch.no_grad():
            loss, grads = fn(trainer, trainer.model, inputs), None
    new = {k: v[before.get(k, 0) :] for k, v in logged.items() if len(v) > before.get(k, 0)}
    for k in new:
        del logged[k][before.get(k, 0) :]
    return loss.detach(), grads, new


def _package_head(trainer, model, input_ids, attention_mask, keep, **kw):
    logps, entropies = trainer._sspo_package_head(model, input_ids, attention_mask, keep, True)
    return logps, entropies, None


def _split(inputs, half: int):
    """The rows of one of two micro-batches (every per-row tensor sliced, the batch scalars kept)."""
    rows = inputs["completion_ids"].size(0)
    part = slice(0, rows // 2) if half == 0 else slice(rows // 2, rows)
    return {k: v[part] if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == rows else v for k, v in inputs.items()}


def compare(trainer, inputs, name: str, micro_batches: int = 1) -> dict[str, float]:
    """TRL's loss, gradients, metrics and entropy-controller state against ours, on the same model and inputs
    (split into `micro_batches` successive calls, the last at an optimizer-step boundary). Returns the worst
    (loss error / loss scale, gradient relative norm, metric error). Every call (and collective) runs before
    the first failure is raised, so processes stay in step."""
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    gradient_state = trainer.accelerator.gradient_state
    sync = gradient_state.sync_gradients
    parts = [inputs] if micro_batches == 1 else [_split(inputs, 0), _split(inputs, 1)]
    start = _state(trainer)
    peer_state = ours_state = start
    worst = {"loss": 0.0, "grad": 0.0, "metric": 0.0}
    failures: list[str] = []

    def check(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except AssertionError as exc:
            failures.append(str(exc))

    for i, part in enumerate(parts):
        if micro_batches > 1:
            gradient_state._set_sync_gradients(i == len(parts) - 1)
        _set_state(trainer, peer_state)
        peer, g_peer, m_peer = _call(GRPOTrainer._compute_loss, trainer, part, params)
        peer_state = _state(trainer)
        _set_state(trainer, ours_state)
        ours, g_ours, m_ours = _call(SSPOGRPOTrainer._compute_loss, trainer, part, params)
        ours_state = _state(trainer)
        # the sizes without the cancellation of zero-mean advantages: TRL's loss (and gradient) on |A|
        _set_state(trainer, start)
        absolute = {**part, "advantages": part["advantages"].abs()}
        scale = max(_call(GRPOTrainer._compute_loss, trainer, absolute, params, grad=False)[0].abs().item(), 1e-30)
        vespo = trainer.loss_type == "vespo" and trainer._sspo_route(_settings(trainer), part) != "trl"
        same_head = None
        if vespo:  # the loss's maths alone: TRL's on the package head's log-probs (TRL's head: the same already)
            _set_state(trainer, start)
            trainer._get_per_token_logps_and_entropies = functools.partial(_package_head, trainer)
            try:
                same_head = _call(GRPOTrainer._compute_loss, trainer, part, params, grad=False)[0]
            finally:
                del trainer._get_per_token_logps_and_entropies
        used = [(a, b) for a, b in zip(g_ours, g_peer) if b is not None]
        flat_ours = torch.cat([a.flatten() for a, _ in used])
        flat_peer = torch.cat([b.flatten() for _, b in used])
        rel = float((flat_ours - flat_peer).norm() / flat_peer.norm().clamp(min=1e-30))
        worst["grad"] = max(worst["grad"], rel)
        grad_size = flat_peer.norm()
        if trainer.accelerator.reduce(torch.tensor(float(rel > GRAD_RTOL)), reduction="sum") > 0:
            _set_state(trainer, start)  # every process takes this call when one needs it
            g_abs = _call(GRPOTrainer._compute_loss, trainer, absolute, params)[1]
            grad_size = max(grad_size, torch.cat([g.flatten() for g in g_abs if g is not None]).norm())
        _set_state(trainer, start)
        if not (torch.isfinite(peer) and torch.isfinite(ours)):
            failures.append(f"{name}: a non-finite loss, TRL's {peer}, ours {ours}")
        check(assert_close, f"loss {name}", ours, peer, atol=(VESPO_LOSS_RTOL if vespo else LOSS_RTOL) * scale)
        worst["loss"] = max(worst["loss"], float((ours - peer).abs()) / scale)
        if same_head is not None:
            check(assert_close, f"loss {name} (TRL on the package's head)", ours, same_head, atol=LOSS_RTOL * scale)
        if len(used) != sum(g is not None for g in g_ours):
            failures.append(f"{name}: other parameters get a gradient")
        # relative to the gradient's size without cancellation, when that is larger
        shrink = flat_peer.norm() / grad_size if grad_size > 0 else 1.0
        worst["grad_vs_size"] = max(worst.get("grad_vs_size", 0.0), rel * float(shrink))
        check(assert_rel_norm, f"grads {name}", flat_peer + (flat_ours - flat_peer) * shrink, flat_peer, tol=GRAD_RTOL)
        missing = set(m_peer) - set(m_ours)
        if missing:
            failures.append(f"{name}: TRL logs {sorted(missing)}, the adapter does not")
        for key, values in m_peer.items():
            if key in m_ours:
                tol = METRIC_ATOL * (scale if key == "policy_loss" else max(1.0, abs(values[0])))
                check(assert_close, f"metric {key} {name}", torch.tensor(m_ours[key]), torch.tensor(values), atol=tol)
                worst["metric"] = max(worst["metric"], abs(m_ours[key][0] - values[0]))
    gradient_state._set_sync_gradients(sync)
    if ours_state[:2] != pytest.approx(peer_state[:2], rel=1e-6) or (ours_state[2] is None) != (peer_state[2] is None):
        failures.append(f"{name}: entropy controller state {ours_state} != TRL's {peer_state}")
    _set_state(trainer, start)
    if failures:
        raise AssertionError("\n".join(failures))
    return worst


# ---------------------------------------------------------------- the world: a trainer and TRL-made inputs


def _stand_in_sampler(trainer, cache, noise):
    """`_generate_single_turn` for use_vllm=True: the completions of the first (real) generation, with sampler
    log-probs = the policy's + noise (one NaN: a token vLLM could not score), as vLLM would return them."""

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        rows = []
        for i, ids in enumerate(cache["completion_ids"]):
            q = cache["logps"][i, : len(ids)]
            rows.append([float(x) for x in q + noise[i, : len(ids)]])
        rows[0][1] = float("nan")
        return cache["completion_ids"], rows

    return generate


def _far_token(inputs):
    """(row, column) of the masked-in token whose old log-prob is nearest -2: far from certain (the gradient there
    is not the tiny 1 - p of a confident token, which TRL's head rounds to ~1e-3 relative), and small enough that
    e^(ref - l) rounds like its exponent."""
    distance = (inputs["old_per_token_logps"] + 2).abs().masked_fill(inputs["completion_mask"] == 0, float("inf"))
    distance[:, :4] = float("inf")  # outside the tool output of the tool-mask cases
    flat = int(distance.argmin())
    return flat // distance.size(1), flat % distance.size(1)


def build_world(trainer, seed: int = 3, perturb: float = 0.2, rows=ROWS):
    """{"off": on-policy inputs, "off_old": with old log-probs, "off_far": with a far token (below), mode: inputs
    with TRL's vLLM weights}, from TRL's generation step on the dataset `rows`."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    cache: dict = {}
    real = trainer._generate_single_turn

    def record(*args, **kwargs):
        cache["completion_ids"], logprobs = real(*args, **kwargs)
        return cache["completion_ids"], logprobs

    trainer._generate_single_turn = record
    world = {"off": trainer._generate_and_score_completions(rows)}
    ids = torch.cat([world["off"]["prompt_ids"], world["off"]["completion_ids"]], 1)
    keep = world["off"]["completion_ids"].size(1)
    full_mask = torch.zeros_like(world["off"]["completion_ids"])
    for i, c in enumerate(cache["completion_ids"]):
        full_mask[i, : len(c)] = 1
    attention = torch.cat([world["off"]["prompt_mask"], full_mask], 1)
    with torch.no_grad():
        cache["logps"] = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, attention, keep)[0]
    gen = torch.Generator().manual_seed(seed)
    noise = 0.12 * torch.randn(cache["logps"].shape, generator=gen)
    trainer._generate_single_turn = _stand_in_sampler(trainer, cache, noise)
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    for mode in MODES:
        trainer.vllm_importance_sampling_mode = mode
        trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = IS_BOUNDS[mode]
        world[mode] = trainer._generate_and_score_completions(rows)
    trainer.use_vllm = False
    trainer._generate_single_turn = real
    world["off_old"] = {k: v for k, v in world[MODES[0]].items()
                        if k not in ("importance_sampling_ratio", "sampling_per_token_logps")}  # fmt: skip
    # for the bias-corrected KL: one token the update made far less likely than both the old and the reference
    # policy (log-ratio -30, as after an aggressive step): TRL's ratio x KL ~ e^-30 e^30 stays moderate
    row, col = _far_token(world["off_old"])
    world["off_far"] = dict(world["off_old"])
    for key in ("old_per_token_logps", "ref_per_token_logps"):
        world["off_far"][key] = world["off_old"][key].clone()
        world["off_far"][key][row, col] += 30.0
    torch.manual_seed(seed)
    with torch.no_grad():  # the policy moves away from the one that sampled: ratios != 1, some clipped
        for p in trainer.model.parameters():
            p.add_(perturb * p.abs().mean() * torch.randn_like(p))
    trainer._metrics["train"].clear()
    world["entropy_q"] = _untied_quantile(trainer, world["off"])
    return world


def _untied_quantile(trainer, inputs, candidates=(0.6, 0.55, 0.65, 0.5, 0.7, 0.45, 0.75)) -> float:
    """A `top_entropy_quantile` whose threshold, over every process's entropies (TRL's head), is at least 1e-4
    from every entropy: the two heads round entropies ~10.8 a few ulps apart (and distinct tokens' entropies
    crowd ln V in the tiny random model), so a tie at the threshold would test that rounding, not the mask."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        _, entropies, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, attention, inputs["completion_ids"].size(1), compute_entropy=True
        )
    local = entropies[inputs["completion_mask"].bool()].float()
    padded = trainer.accelerator.pad_across_processes(local, dim=0, pad_index=-1.0)
    values = trainer.accelerator.gather(padded)
    values = values[values >= 0]
    for q in candidates:
        if (values - torch.quantile(values, 1 - q)).abs().min() > 1e-4:  # between two values, near neither
            return q
    raise AssertionError("every candidate quantile has a near-tie: change the world's seed")


def make_trainer(model, tok, data, tmp_path, **overrides):
    kw = config_kwargs(tmp_path, per_device_train_batch_size=8, beta=0.04, mask_truncated_completions=True,
                       epsilon_high=0.28, **overrides)  # fmt: skip
    return SSPOGRPOTrainer(model=model, reward_funcs=reward_len, args=SSPOGRPOConfig(**kw), train_dataset=data,
                           processing_class=tok)  # fmt: skip


def configure(trainer, case: dict, world: dict) -> tuple[dict, int]:
    """Set the trainer's attributes for `case` (as a GRPOConfig would); returns (inputs, micro-batches)."""
    t, args = trainer, trainer.args
    t.loss_type, t.importance_sampling_level = case["loss_type"], case["level"]
    # DAPO's widths at token level, GSPO's (3e-4, 4e-4) at sequence level, where response ratios then clip too
    t.epsilon_low, t.epsilon_high = (0.2, 0.28) if case["level"] == "token" else (3e-4, 4e-4)
    if case["loss_type"] == "cispo":
        t.epsilon_high = case.get("cispo_cap", 5.0)
    t.beta, args.use_bias_correction_kl = case["beta"]
    args.delta = case["delta"]
    t.off_policy_mask_threshold = case["opsm"]
    t.top_entropy_quantile = world["entropy_q"] if case["entropy_q"] < 1 else 1.0
    bonus = case["bonus"]
    t.use_adaptive_entropy = bonus == "adaptive"
    t.entropy_coef = 0.0 if bonus == "off" else 0.01
    t._entropy_bonus_enabled = bonus != "off"
    t._last_world_entropy = 0.0 if bonus == "adaptive" else float("inf")  # the bonus applies this step
    t._entropy_window_stats = None
    args.entropy_target = 9.0  # near the tiny model's entropy: the controller moves either way
    t.current_gradient_accumulation_steps = case["ga"]
    args.sspo_loss_path = case.get("path", "auto")
    mode = case["vllm"]
    t.use_vllm = t.vllm_importance_sampling_correction = mode != "off"
    if mode != "off":
        t.vllm_importance_sampling_mode = mode
        t.vllm_importance_sampling_clip_min, t.vllm_importance_sampling_clip_max = IS_BOUNDS[mode]
        inputs = world[mode]
    else:
        # the bias-corrected KL at token level: a token at log-ratio -30 (the plain KL, or the sequence ratio's
        # e^(-30 / n), would meet the token's KL e^30 without its compensating ratio)
        far = case["beta"] == (0.04, True) and case["level"] == "token"
        inputs = world[("off_far" if far else "off_old") if case["old"] else "off"]
    if case.get("tool_mask"):
        tool = torch.ones_like(inputs["completion_mask"])
        tool[:, 2:4] = 0  # a tool's output inside every completion
        inputs = {**inputs, "tool_mask": tool}
    micro = 2 if bonus == "adaptive" and case["ga"] == 2 else 1
    return inputs, micro


ROTATE = {
    "beta": [(0.0, True), (0.04, True), (0.04, False)],
    "delta": [None, 1.5, 1.1],  # off; above 1 + epsilon_high (the dual clip); at most 1 + epsilon_high
    "opsm": [None, 0.02, -0.05],
    "entropy_q": [1.0, 0.6],
    "bonus": ["off", "static", "adaptive"],
    "ga": [1, 2],
    "old": [True, False],  # without vLLM: old log-probs given, or on-policy
    "tool_mask": [False, True],  # without vLLM (TRL computes its weights with the tool mask)
    "path": ["auto", "logprobs"],
    "cispo_cap": [5.0, 0.2, 1.2],  # cispo only
}
OFF_ONLY = ("old", "tool_mask")
PAIR_KEYS = ("level", "vllm_on", "beta", "delta", "opsm", "entropy_q", "bonus", "ga", "old", "tool_mask", "path")


def _pairs(case: dict) -> set:
    """The (setting, value) pairs a case covers (the vLLM-free settings only where vLLM is off)."""
    items = [(k, str(case[k])) for k in PAIR_KEYS if not (k in OFF_ONLY and case["vllm_on"])]
    return {(a, b) for i, a in enumerate(items) for b in items[i + 1 :]}


def grid(candidates: int = 300) -> list[dict]:
    """Every loss type x level x (vLLM off, on, on) (the on cases cycle through the modes); the other settings
    chosen greedily (a fixed seed) so that each loss type meets every value of every setting, and every pair of
    values of two settings occurs somewhere (pairwise coverage)."""
    rng = random.Random(0)
    cases, covered = [], set()
    for loss_type in SUPPORTED_LOSS_TYPES:
        seen: set = set()
        slots = [(level, vllm) for level in ("token", "sequence") for vllm in (False, True, True)]
        for level, vllm_on in slots:
            best, best_score = None, -1
            for _ in range(candidates):
                case = {"loss_type": loss_type, "level": level, "vllm_on": vllm_on}
                case.update({k: rng.choice(v) for k, v in ROTATE.items()})
                if vllm_on:
                    case.update(old=True, tool_mask=False)
                values = {(k, str(case[k])) for k in ROTATE if not (vllm_on and k in OFF_ONLY)}
                score = 100 * len(values - seen) + len(_pairs(case) - covered)
                if score > best_score:
                    best, best_score = case, score
            seen |= {(k, str(best[k])) for k in ROTATE if not (vllm_on and k in OFF_ONLY)}
            covered |= _pairs(best)
            on = sum(c["vllm_on"] for c in cases if c["loss_type"] == loss_type)
            best["vllm"] = (MODES[on % 2] if loss_type == "vespo" else MODES[on]) if vllm_on else "off"
            cases.append(best)
    return cases


def _case_id(c: dict) -> str:
    parts = [c["loss_type"], c["level"][:3], c["vllm"], f"b{c['beta'][0]}{'bc' if c['beta'][1] else ''}"]
    parts += [f"d{c['delta']}"] * (c["delta"] is not None) + [f"opsm{c['opsm']}"] * (c["opsm"] is not None)
    parts += [f"q{c['entropy_q']}"] * (c["entropy_q"] < 1) + [c["bonus"]] * (c["bonus"] != "off")
    parts += [f"ga{c['ga']}", "lp" if c["path"] == "logprobs" else "", "tool" if c["tool_mask"] else ""]
    return "-".join(p for p in parts if p)


GRID = grid()


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return prompt_dataset()


@pytest.fixture(scope="module")
def dense(tokenizer, dataset, tmp_path_factory):
    model_dir = tiny_qwen2(tokenizer, tmp_path_factory.mktemp("tiny_qwen2"))
    trainer = make_trainer(model_dir, tokenizer, dataset, tmp_path_factory.mktemp("grid"))
    world = build_world(trainer)
    yield trainer, world
    print("\nTRL grid, worst (loss err / loss scale, grad rel norm, metric abs err) per loss type:")
    for key, (loss, grad, metric) in sorted(WORST.items()):
        print(f"  {key:>28}: {loss:.2e} {grad:.2e} {metric:.2e}")


def _record(key: str, worst: dict[str, float]) -> None:
    prev = WORST.get(key, [0.0, 0.0, 0.0])
    WORST[key] = [max(prev[0], worst["loss"]), max(prev[1], worst["grad"]), max(prev[2], worst["metric"])]


@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
def test_compute_loss_equals_trl(dense, case):
    trainer, world = dense
    inputs, micro = configure(trainer, case, world)
    if case["vllm"] != "off":
        assert "importance_sampling_ratio" in inputs and "sampling_per_token_logps" in inputs
    worst = compare(trainer, inputs, _case_id(case), micro)
    _record(case["loss_type"], worst)
    for key in ("vllm", "delta", "opsm", "entropy_q", "bonus", "beta"):
        _record(f"{key}={case[key]}", worst)


@pytest.mark.parametrize("loss_type", SUPPORTED_LOSS_TYPES)
def test_bias_corrected_kl_at_a_far_token(dense, loss_type):
    """TRL's ratio is never clamped: at a token with log-ratio -30 (and KL e^30) its bias-corrected KL is ~1,
    where a ratio clamped at e^-20 would give e^10."""
    trainer, world = dense
    case = {"loss_type": loss_type, "level": "token", "vllm": "off", "old": True, "beta": (0.04, True),
            "delta": None, "opsm": None, "entropy_q": 1.0, "bonus": "off", "ga": 1}  # fmt: skip
    inputs, _ = configure(trainer, case, world)
    row, col = _far_token(world["off_old"])
    assert inputs["old_per_token_logps"][row, col] == world["off_old"]["old_per_token_logps"][row, col] + 30
    _record(f"far token ({loss_type})", compare(trainer, inputs, f"far token {loss_type}"))


def test_grid_covers_every_value_with_every_loss_type():
    """The design: each loss type meets every value of every setting and every vLLM mode it allows, and every
    pair of values of two settings occurs in some case."""
    for loss_type in SUPPORTED_LOSS_TYPES:
        cases = [c for c in GRID if c["loss_type"] == loss_type]
        for key, values in ROTATE.items():
            pool = [c for c in cases if not (key in OFF_ONLY and c["vllm_on"])]
            assert {str(c[key]) for c in pool} == {str(v) for v in values}, (loss_type, key)
        modes = {c["vllm"] for c in cases}
        assert modes == ({"off", *MODES[:2]} if loss_type == "vespo" else {"off", *MODES}), (loss_type, modes)
        assert {c["level"] for c in cases} == {"token", "sequence"}
    covered = set().union(*(_pairs(c) for c in GRID))
    values = {k: [str(v) for v in ROTATE.get(k, {"level": ["token", "sequence"], "vllm_on": [False, True]}.get(k))]
              for k in PAIR_KEYS}  # fmt: skip
    for a, b in itertools.combinations(PAIR_KEYS, 2):
        for va, vb in itertools.product(values[a], values[b]):
            if {a, b} & set(OFF_ONLY) and "vllm_on" in (a, b) and "True" in (va, vb):
                continue  # the vLLM-free settings are not varied with vLLM on
            assert ((a, va), (b, vb)) in covered, f"no case with {a}={va} and {b}={vb}"


def test_world_exercises_the_settings(dense):
    """The inputs are what the grid needs: empty (truncated) rows, TRL's weights clipped / masked, NaN sampler
    log-probs, ratios outside the clip range."""
    trainer, world = dense
    assert (world["off"]["completion_mask"].sum(1) == 0).any(), "a truncated completion masked out"
    assert "old_per_token_logps" not in world["off"] and "old_per_token_logps" in world["off_old"]
    for mode in MODES:
        ratio, mask = world[mode]["importance_sampling_ratio"], world[mode]["completion_mask"]
        low, high = IS_BOUNDS[mode]
        if mode.endswith("mask"):
            assert (ratio == 0).any(), mode
        else:
            assert ((ratio == low) | (ratio == high)).any(), mode
        assert torch.isnan(world[mode]["sampling_per_token_logps"][mask.bool()]).any()
    inputs = world["off_old"]
    with torch.no_grad():
        logps = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].size(1),
        )[0]  # fmt: skip
    ratio = torch.exp(logps - inputs["old_per_token_logps"])[inputs["completion_mask"].bool()]
    assert (ratio < 0.8).any() and (ratio > 1.28).any(), "the clip binds on both sides"


# ---------------------------------------------------------------- routes


def _settings(trainer):
    from sspo_kernels.integrations.trl_options import Settings

    return Settings.of_trainer(trainer)


def test_route_per_setting(dense):
    """The fused call where it gives TRL's loss; the package's head + log-probs loss where it cannot; TRL's head
    for multimodal inputs; sspo_loss_path forces a path, or says why it cannot."""
    trainer, world = dense
    base = {"loss_type": "dapo", "level": "token", "vllm": "off", "old": True, "beta": (0.04, True), "delta": None,
            "opsm": None, "entropy_q": 1.0, "bonus": "off", "ga": 1}  # fmt: skip
    expect = [
        ({}, "fused"),
        ({"vllm": "sequence_mask", "opsm": 0.02, "entropy_q": 0.6, "delta": 1.1}, "fused"),
        ({"loss_type": "bnpo", "bonus": "static"}, "fused"),  # the loss's token mean is TRL's bonus
        ({"loss_type": "vespo", "level": "sequence"}, "fused"),
        ({"bonus": "static"}, "package"),
        ({"loss_type": "bnpo", "bonus": "static", "entropy_q": 0.6}, "package"),
        ({"loss_type": "cispo", "cispo_cap": 0.2}, "package"),
        ({"loss_type": "vespo"}, "package"),  # the KL weighted by the token ratio
        ({"opsm": -0.05}, "package"),
        ({"path": "logprobs"}, "package"),
    ]
    for change, route in expect:
        inputs, _ = configure(trainer, {**base, **change}, world)
        assert trainer._sspo_route(_settings(trainer), inputs) == route, change
    inputs, _ = configure(trainer, base, world)
    assert trainer._sspo_route(_settings(trainer), {**inputs, "pixel_values": torch.zeros(1)}) == "trl"
    configure(trainer, {**base, "bonus": "static", "path": "fused"}, world)
    with pytest.raises(ValueError, match="entropy bonus"):
        trainer._sspo_route(_settings(trainer), inputs)
    trainer.args.sspo_loss_path = "auto"
    trainer._sspo_zero3 = True  # the package head's backward cannot re-gather a ZeRO-3 head: TRL's head instead
    try:
        for change, route in [({}, "fused"), ({"bonus": "static"}, "trl"), ({"entropy_q": 0.6}, "trl")]:
            inputs, _ = configure(trainer, {**base, **change}, world)
            assert trainer._sspo_route(_settings(trainer), inputs) == route, change
    finally:
        trainer._sspo_zero3 = False
