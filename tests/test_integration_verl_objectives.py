"""`loss_mode=sspo` against verl 0.9.1's rollout correction and other policy losses, the real library on the CPU.

- verl's rollout-correction weights (decoupled mode) computed by verl's own helper,
  `compute_rollout_correction_and_add_to_batch`, from sampler log-probs at token and sequence level (TIS and IcePop
  thresholds, one case with a rejection mask): the plugin at token granularity against verl's `ppo_loss`
  (`vanilla`) with `rollout_is_weights` in the batch, `actor/pg_clipfrac_lower` included.
- `policy_loss.objective` against verl's `cispo`, `sapo`, `geo_mean` and `gpg` modes through `ppo_loss`, with and
  without rollout weights, under the normaliser each mode uses (sapo: seq-mean-token-mean whatever loss_agg_mode
  says; geo_mean: a plain mean over the local rows, our seq-mean-token-mean with global_batch_size = the rows).
- Every objective at token, sequence and subsentence granularity against `sspo_loss_from_logprobs` with the
  documented mapping of verl's settings (the plumbing); the option errors.
- Bypass mode refused: verl's `validate_config` and `apply_bypass_mode` in the driver, the actor's own
  `policy_loss.rollout_correction` in the workers.

fp32; the loss within 1e-6 of its size (verl's loss with |advantages|), gradients 1e-5 relative in norm. The worst
measured differences are printed (`-s`).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")

from _assert import assert_close, assert_rel_norm
from omegaconf import OmegaConf
from test_integration_verl import (
    GRAD_RTOL,
    LOSS_RTOL,
    VERL_PPO_LOSS,
    V,
    actor,
    make_batch,
    model_output,
    with_batch_info,
)
from verl.protocol import DataProto
from verl.trainer.config.algorithm import RolloutCorrectionConfig
from verl.trainer.ppo import rollout_corr_helper
from verl.utils import config as verl_config_utils
from verl.workers import config as verl_config

import sspo_kernels.integrations.verl as plugin
from sspo_kernels import sspo_loss_from_logprobs
from sspo_kernels.integrations import verl_options

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5)
EXTRAS = dict(entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type="low_var_kl")
WORST: dict[str, tuple[float, float]] = {}  # per case kind: (loss error / scale, gradient relative error)


@pytest.fixture(scope="module", autouse=True)
def _print_worst():
    yield
    print("\nworst differences against verl (loss err / scale, grad rel norm):")
    for name, (loss_err, grad_err) in sorted(WORST.items()):
        print(f"  {name}: {loss_err:.2e}, {grad_err:.2e}")


def with_rollout_correction(data, seed: int, **correction):
    """verl's decoupled-mode correction, as its trainer applies it: IS weights and the rejection mask from verl's
    `compute_rollout_correction_and_add_to_batch`, on sampler log-probs a few tenths off the old ones."""
    gen = torch.Generator().manual_seed(seed)
    old, mask = data["old_log_probs"], data["response_mask"]
    rollout = old + 0.3 * torch.randn(old.shape, generator=gen)
    proto = DataProto.from_dict(tensors={"old_log_probs": old, "rollout_log_probs": rollout, "response_mask": mask})
    proto, _ = rollout_corr_helper.compute_rollout_correction_and_add_to_batch(
        proto, RolloutCorrectionConfig(**correction)
    )
    data = data.clone()
    data["response_mask"] = proto.batch["response_mask"]
    if "rollout_is_weights" in proto.batch.keys():
        data["rollout_is_weights"] = proto.batch["rollout_is_weights"]
    return data


def call(loss_fn, config, data, logits, entropy: bool):
    logits = logits.detach().clone().requires_grad_(True)
    loss, metrics = loss_fn(config=config, model_output=model_output(data, logits, entropy), data=data)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), metrics, grad


def compare(kind: str, peer_cfg, our_cfg, data, logits, entropy: bool, metric_keys=()):
    """Our plugin against verl's `ppo_loss` on one batch: loss, d loss / d logits, the named metrics."""
    peer_loss, peer_metrics, peer_grad = call(VERL_PPO_LOSS, peer_cfg, data, logits, entropy)
    our_loss, our_metrics, our_grad = call(plugin.sspo_ppo_loss, our_cfg, data, logits, entropy)
    positive = data.clone()
    positive["advantages"] = data["advantages"].abs()
    scale = max(float(call(VERL_PPO_LOSS, peer_cfg, positive, logits, entropy)[0].abs()), float(peer_loss.abs()))
    loss_err = float((our_loss - peer_loss).abs()) / scale
    grad_err = float((our_grad - peer_grad).norm() / peer_grad.norm())
    prev = WORST.get(kind, (0.0, 0.0))
    WORST[kind] = (max(prev[0], loss_err), max(prev[1], grad_err))
    assert_close("loss", our_loss, peer_loss, atol=LOSS_RTOL * scale)
    assert_rel_norm("d loss / d logits", our_grad, peer_grad, tol=GRAD_RTOL)
    assert peer_grad.abs().sum() > 0
    keys = ("actor/pg_loss", *metric_keys) + (("kl_loss", "actor/entropy_loss") if entropy else ())
    for key in keys:
        mine, theirs = float(our_metrics[key].values[0]), float(peer_metrics[key].values[0])
        assert abs(mine - theirs) <= 1e-5 * max(1.0, abs(theirs)), f"{key}: ours {mine}, verl {theirs}"
    return peer_metrics, our_metrics


# (rollout_is level, threshold: a float = TIS, "lo_hi" = IcePop, rejection sampling or None)
CORRECTIONS = [
    ("token", 1.2, None),
    ("token", "0.8_1.25", None),
    ("sequence", 1.5, None),
    ("sequence", "0.5_2.0", ("token_k1", "0.7_1.4")),
]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize(
    ("level", "threshold", "rs"), CORRECTIONS, ids=[f"{c[0]}-{c[1]}-rs{bool(c[2])}" for c in CORRECTIONS]
)
def test_rollout_is_weights_equal_verl_ppo_loss(level, threshold, rs, agg):
    """verl's rollout_is_weights reach the loss as policy_weights, as verl's vanilla applies them."""
    seed = 11
    data, logits = make_batch(seed)
    dp_size = 2 if agg == "token-mean" else 1
    rejection = dict(rollout_rs=rs[0], rollout_rs_threshold=rs[1]) if rs else {}
    corrected = with_rollout_correction(
        with_batch_info(data, dp_size), seed, rollout_is=level, rollout_is_threshold=threshold, **rejection
    )
    weights, mask = corrected["rollout_is_weights"], corrected["response_mask"].bool()
    if isinstance(threshold, str):  # IcePop: some units zeroed
        assert (weights[mask] == 0).any() and (weights[mask] > 0).any()
    else:  # TIS: some weights truncated at the threshold, the others spread
        assert (weights[mask] == threshold).any() and weights[mask].std() > 0.01
    if rs:
        assert mask.sum() < data["response_mask"].sum(), "the rejection mask must remove tokens"
    extras = dict(EXTRAS) if level == "sequence" else {}
    peer_cfg = actor("vanilla", agg, **CLIP, **extras)
    our_cfg = actor("sspo", agg, plugin.SSPOPolicyLossConfig(loss_mode="sspo", granularity="token"), **CLIP, **extras)
    keys = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")
    peer, _ = compare(f"vanilla + rollout_is={level}", peer_cfg, our_cfg, corrected, logits, bool(extras), keys)
    # the weights change verl's loss (else the comparison above proves nothing about them)
    unweighted = corrected.clone()
    del unweighted["rollout_is_weights"]
    plain = call(VERL_PPO_LOSS, peer_cfg, unweighted, logits, bool(extras))[0]
    assert float((plain - call(VERL_PPO_LOSS, peer_cfg, corrected, logits, bool(extras))[0]).abs()) > 1e-4
    assert peer["actor/pg_clipfrac_lower"].values[0] > 0, "the dual clip must be active in the comparison"


# (verl loss_mode, our policy_loss, actor.loss_agg_mode, dp_size, entropy bonus + KL loss, metrics verl defines alike)
MODES = [
    ("cispo", {"objective": "cispo", "granularity": "token"}, "token-mean", 2, True, ("actor/ppo_kl",)),
    ("cispo", {"objective": "cispo", "granularity": "token"}, "seq-mean-token-sum", 1, False, ("actor/ppo_kl",)),
    ("sapo", {"objective": "sapo", "granularity": "token"}, "seq-mean-token-mean", 2, True,
     ("actor/ppo_kl", "actor/pg_clipfrac", "actor/pg_clipfrac_lower")),
    ("geo_mean", {"objective": "gmpo", "granularity": "sequence"}, "seq-mean-token-mean", 1, True, ("actor/ppo_kl",)),
    ("gpg", {"objective": "reinforce", "granularity": "token"}, "token-mean", 2, False, ()),
    ("gpg", {"objective": "reinforce", "granularity": "sequence"}, "seq-mean-token-sum-norm", 1, True, ()),
]  # fmt: skip


@pytest.mark.parametrize("weights", [None, "token", "sequence"])
@pytest.mark.parametrize(
    ("mode", "ours", "agg", "dp_size", "extras", "keys"), MODES, ids=[f"{m[0]}-{m[2]}-dp{m[3]}" for m in MODES]
)
def test_objectives_equal_verl_modes(mode, ours, agg, dp_size, extras, keys, weights):
    seed = 21
    data, logits = make_batch(seed)
    data = with_batch_info(data, dp_size)
    if weights is not None:
        data = with_rollout_correction(data, seed, rollout_is=weights, rollout_is_threshold=1.5)
    common = dict(**CLIP, tau_pos=1.2, tau_neg=1.6, **(EXTRAS if extras else {}))  # sapo's taus: verl's own keys
    peer_cfg = actor(mode, agg, **common)
    our_cfg = actor("sspo", agg, plugin.SSPOPolicyLossConfig(loss_mode="sspo", **ours), **common)
    peer, mine = compare(f"{mode} rollout_is={weights}", peer_cfg, our_cfg, data, logits, extras, keys)
    if mode in ("cispo", "geo_mean"):
        assert 0 < peer["actor/pg_clipfrac"].values[0] < 1, "the bounds must be active in the comparison"
    if mode == "cispo":
        assert "actor/sspo/cispo_clip_frac" in mine


def expected_options(objective: str, granularity: str) -> dict:
    """The documented mapping of verl's actor settings (CLIP, tau_pos / tau_neg) for each objective."""
    bounded = objective in ("clip", "cispo", "gmpo")
    opts = {"objective": objective, "granularity": granularity}
    if bounded and granularity in ("token", "sequence"):
        opts.update(eps_low=CLIP["clip_ratio_low"], eps_high=CLIP["clip_ratio_high"])
    if objective == "clip":
        opts["dual_clip"] = CLIP["clip_ratio_c"]
    if objective == "sapo":
        opts.update(sapo_tau_pos=1.2, sapo_tau_neg=1.6)
    if objective == "vespo":
        opts.update(vespo_k_pos=1.5)
    return opts


class ModelConfig:  # verl's HFModelConfig carries the tokenizer; a token list stands in for it
    def __init__(self):
        self.tokenizer = [f"t{i}." if i % 4 == 0 else f"t{i}" for i in range(V)]  # every 4th ends a subsentence
        self.hf_config = None


@pytest.mark.parametrize("granularity", ["token", "sequence", "subsentence"])
@pytest.mark.parametrize("objective", ["clip", "cispo", "sapo", "gmpo", "vespo", "reinforce"])
def test_objective_reaches_the_loss_at_any_granularity(objective, granularity):
    data, logits = make_batch(31)
    data = with_rollout_correction(with_batch_info(data, 1), 31, rollout_is="token", rollout_is_threshold=1.5)
    own = {"vespo_k_pos": 1.5} if objective == "vespo" else {}
    policy = plugin.SSPOPolicyLossConfig(loss_mode="sspo", objective=objective, granularity=granularity, **own)
    config = actor("sspo", "token-mean", policy, **CLIP, tau_pos=1.2, tau_neg=1.6, model_config=ModelConfig())
    loss, metrics, grad = call(plugin.sspo_ppo_loss, config, data, logits, entropy=True)
    # the same loss from the package directly, with the documented options
    out = model_output(data, logits.detach(), entropy=True)
    logp = plugin.no_padding_2_padding(out["log_probs"], data)
    entropy = plugin.no_padding_2_padding(out["entropy"], data)
    batch = data.select("response_mask", "old_log_probs", "advantages", "rollout_is_weights").to_padded_tensor()
    mask = batch["response_mask"].bool()
    opts = expected_options(objective, granularity)
    if granularity == "subsentence":
        opts["boundary"] = torch.tensor([i % 4 == 0 for i in range(V)])
    weights = batch["rollout_is_weights"]
    if objective == "gmpo":  # verl's geo_mean: the geometric mean of a response's token weights
        weights = torch.exp((weights + 1e-10).log().where(mask, 0).sum(-1) / mask.sum(-1).clamp(min=1))
    direct = sspo_loss_from_logprobs(
        logp, entropy, plugin._padded_tokens(data, logp.shape), batch["old_log_probs"], batch["advantages"], mask,
        policy_weights=weights, normalizer=float(data["batch_num_tokens"]), **opts,
    )  # fmt: skip
    assert_close("loss", loss, direct.loss, atol=1e-6 * max(1.0, float(direct.loss.abs())))
    assert grad.abs().sum() > 0
    assert metrics["actor/pg_clipfrac_lower"].values[0] == pytest.approx(float(direct.metrics["dual_clip_frac"]))
    assert metrics["actor/sspo/num_segments"].values[0] == float(direct.metrics["num_segments"])
    if objective == "vespo":
        assert metrics["actor/sspo/vespo_phi_mean"].values[0] == pytest.approx(float(direct.metrics["vespo_phi_mean"]))


@pytest.mark.parametrize(
    ("options", "needle", "error"),
    [
        ({"objective": "ppo"}, "objective", ValueError),
        ({"objective": "sapo", "eps_low": 0.1}, "eps_low", ValueError),
        ({"objective": "reinforce", "k_max": 2.0}, "k_max", ValueError),
        ({"objective": "cispo", "sapo_tau_pos": 1.0}, "sapo_tau_pos", ValueError),
        ({"objective": "sapo", "sapo_tau_neg": 0.0}, "sapo_tau_neg", ValueError),
        ({"objective": "vespo", "vespo_k_pos": -1.0}, "vespo_k_pos", ValueError),
        ({"objective": "vespo", "vespo_lambda_neg": "2"}, "vespo_lambda_neg", TypeError),
        ({"objective": "cispo", "dual_clip": True}, "dual_clip", ValueError),
        ({"dual_clip": "yes"}, "dual_clip", TypeError),
        ({"objective": "clip", "eps_low": 1.0}, "eps_low", ValueError),
        ({"objective": "cispo", "eps_low": -0.5}, "eps_low", ValueError),
    ],
)
def test_bad_objective_options_raise_at_construction(options, needle, error):
    with pytest.raises(error, match=needle):
        plugin.SSPOPolicyLossConfig(loss_mode="sspo", **options)


def test_cispo_without_lower_bound_is_accepted():
    """cispo's eps_low = 1 (lo = 0) is TRL's form; the clip objective's eps_low < 1 rule does not apply."""
    config = actor("sspo", "token-mean", plugin.SSPOPolicyLossConfig(loss_mode="sspo", objective="cispo",
                                                                     granularity="token", eps_low=1.0))  # fmt: skip
    assert verl_options.policy_options(config)["eps_low"] == 1.0


# ---------------------------------------------------------------- bypass mode: refused


def trainer_config(loss_mode: str, bypass: bool, *policy_keys: str):
    """verl's own trainer config composed with Hydra overrides, as `python -m verl.trainer.main_ppo` composes it."""
    from hydra import compose, initialize_config_dir

    config_dir = verl_config_utils.__file__.rsplit("/utils/", 1)[0] + "/trainer/config"
    overrides = [
        "actor_rollout_ref.actor.policy_loss._target_=sspo_kernels.integrations.verl.SSPOPolicyLossConfig",
        f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}",
        f"algorithm.rollout_correction.bypass_mode={bypass}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        *(f"+actor_rollout_ref.actor.policy_loss.{key}" for key in policy_keys),
    ]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def test_objective_keys_through_hydra():
    """The keys as Hydra overrides, instantiated as verl does (the driver's validate_config and every worker)."""
    cfg = trainer_config("sspo", False, "objective=sapo", "granularity=sequence", "sapo_tau_neg=1.3")
    policy = verl_config_utils.omega_conf_to_dataclass(cfg.actor_rollout_ref.actor).policy_loss
    assert isinstance(policy, plugin.SSPOPolicyLossConfig)
    assert (policy.objective, policy.granularity, policy.sapo_tau_neg) == ("sapo", "sequence", 1.3)
    from hydra.errors import InstantiationException

    cfg = trainer_config("sspo", False, "objective=sapo", "eps_high=0.3")
    with pytest.raises(InstantiationException, match=r"policy_loss\.eps_high"):  # Hydra wraps the ValueError
        verl_config_utils.omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def test_bypass_mode_refused_by_validate_config():
    """The trainers' start-up check (main_ppo calls verl.utils.config.validate_config before any worker starts)."""
    assert verl_config_utils.validate_config is plugin._validate_config
    with pytest.raises(ValueError, match=r"algorithm\.rollout_correction\.bypass_mode"):
        verl_config_utils.validate_config(trainer_config("sspo", True), use_reference_policy=False, use_critic=False)
    verl_options.refuse_bypass_in_trainer_config(trainer_config("sspo", False))  # decoupled mode: accepted
    verl_options.refuse_bypass_in_trainer_config(trainer_config("vanilla", True))  # verl's own modes: untouched


def test_bypass_mode_refused_by_apply_bypass_mode():
    """The legacy trainer's per-step switch; verl's own modes still go through it."""
    assert rollout_corr_helper.apply_bypass_mode is plugin._apply_bypass_mode
    logp = -torch.rand(2, 3)
    batch = DataProto.from_dict(tensors={"rollout_log_probs": logp, "old_log_probs": logp - 0.1})
    correction = RolloutCorrectionConfig(bypass_mode=True)
    with pytest.raises(ValueError, match="bypass_mode"):
        rollout_corr_helper.apply_bypass_mode(batch, correction, OmegaConf.create({"loss_mode": "sspo"}))
    theirs = OmegaConf.create({"loss_mode": "vanilla"})
    rollout_corr_helper.apply_bypass_mode(batch, correction, theirs)
    assert theirs.loss_mode == "bypass_mode" and torch.equal(batch.batch["old_log_probs"], logp)


def test_bypass_mode_in_the_actor_config_refused():
    correction = RolloutCorrectionConfig(bypass_mode=True)
    with pytest.raises(ValueError, match="bypass_mode"):
        plugin.SSPOPolicyLossConfig(loss_mode="sspo", granularity="token", rollout_correction=correction)
    plugin.SSPOPolicyLossConfig(loss_mode="gspo", rollout_correction=correction)  # another mode: not ours to refuse
    data, logits = make_batch(41)
    data = with_batch_info(data, 1)
    config = actor("sspo", "token-mean", verl_config.PolicyLossConfig(loss_mode="sspo", rollout_correction=correction))
    with pytest.raises(ValueError, match="bypass_mode"):
        plugin.sspo_ppo_loss(config=config, model_output=model_output(data, logits, False), data=data)
