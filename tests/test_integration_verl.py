"""`sspo_kernels.integrations.verl` against verl's own `ppo_loss`, with the real library on the CPU.

The batch is built the way verl's trainer builds it: a left/right-padded `TensorDict` turned into nested tensors
by verl's `left_right_2_no_padding`, the global batch info assigned as its FSDP engine does, and model outputs
(log-probs, entropies) as nested tensors over prompt + response, from a logits tensor that stands in for the
model. verl's engines need a GPU and Ray, so the loss function is called directly, as the engine calls it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

verl_spec = importlib.util.find_spec("verl")
if verl_spec is None:
    pytest.skip("needs verl (extra 'verl')", allow_module_level=True)

from _assert import assert_close, assert_rel_norm  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers import config as verl_config  # noqa: E402
from verl.workers.utils import losses as verl_losses  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

# Fails loudly: verl swallows plugin import errors, so the module is also imported directly here.
import sspo_kernels.integrations.verl as plugin  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VERL_PPO_LOSS = plugin._ORIGINAL_PPO_LOSS
# fp32 relative tolerances; the loss's is relative to its size without cancellation (verl's loss with |A|)
LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-5
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
V = 97


def make_batch(seed: int = 0, B: int = 6, P: int = 5, R: int = 9):
    """(data, logits): verl's no-padding TensorDict and the (total_nnz, V) leaf the log-probs come from."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, P + 1, (B,), generator=g)
    resp_lens = torch.randint(1, R + 1, (B,), generator=g)
    resp_lens[0] = R  # one full-length response
    prompts = torch.zeros(B, P, dtype=torch.long)
    responses = torch.zeros(B, R, dtype=torch.long)
    attention = torch.zeros(B, P + R, dtype=torch.long)
    for b in range(B):
        prompts[b, P - prompt_lens[b] :] = torch.randint(1, V, (int(prompt_lens[b]),), generator=g)
        responses[b, : resp_lens[b]] = torch.randint(1, V, (int(resp_lens[b]),), generator=g)
        attention[b, P - prompt_lens[b] : P + resp_lens[b]] = 1
    response_mask = attention[:, P:].clone()
    response_mask[1, 0] = 0  # a masked-out token inside a response
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)
    old = -torch.rand(B, R, generator=g) * 3 - 1.0
    data = TensorDict(
        {
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": attention,
            "response_mask": response_mask,
            "position_ids": position_ids,
            "old_log_probs": old,
            "advantages": torch.randn(B, R, generator=g),  # varies inside a response
            "ref_log_prob": old + 0.1 * torch.randn(B, R, generator=g),
        },
        batch_size=[B],
    )
    data = left_right_2_no_padding(data)
    total = data["input_ids"].values().shape[0]
    logits = (torch.randn(total, V, generator=g) * 2).requires_grad_(True)
    return data, logits


def model_output(data: TensorDict, logits: torch.Tensor, entropy: bool) -> dict:
    """What verl's engine hands the loss: nested log-probs of the rolled ids (and entropies) per sequence."""
    ids = data["input_ids"]
    offsets = ids.offsets()
    rolled = torch.roll(ids.values(), shifts=-1, dims=0)
    logp_all = torch.log_softmax(logits, dim=-1)
    out = {"log_probs": torch.nested.nested_tensor_from_jagged(logp_all.gather(1, rolled[:, None])[:, 0], offsets)}
    if entropy:
        ent = -(logp_all.exp() * logp_all).sum(-1)
        out["entropy"] = torch.nested.nested_tensor_from_jagged(ent, offsets)
    return out


def with_batch_info(data: TensorDict, dp_size: int) -> TensorDict:
    """The global counts of verl's FSDP engine, as if `dp_size - 1` other ranks held batches like this one."""
    data = data.clone()
    tokens = int(data["response_mask"].sum())
    tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=tokens * dp_size + 3 * (dp_size - 1))
    tu.assign_non_tensor(data, global_batch_size=data.batch_size[0] * dp_size)
    return data


def actor(loss_mode: str, agg: str, policy_loss=None, **kw) -> verl_config.ActorConfig:
    policy_loss = policy_loss or verl_config.PolicyLossConfig(loss_mode=loss_mode)
    base = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=agg)
    return verl_config.ActorConfig(**{**base, "policy_loss": policy_loss, **kw})


def run(loss_fn, config, data, entropy: bool):
    """Loss, metrics and d loss / d logits of one call of a verl-style loss function."""
    _, logits = make_batch(SEED)
    loss, metrics = loss_fn(config=config, model_output=model_output(data, logits, entropy), data=data)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), metrics, grad


SEED = 3
CASES = [
    # (verl loss_mode, our options, dp_size, entropy bonus + KL loss)
    ("vanilla", {"granularity": "token"}, 1, False),
    ("vanilla", {"granularity": "token"}, 2, True),
    ("gspo", {"granularity": "sequence", "ratio_grad": "token", "log_ratio_clamp": 10.0, "dual_clip": False}, 1, True),
    ("gspo", {"granularity": "sequence", "ratio_grad": "token", "log_ratio_clamp": 10.0, "dual_clip": False}, 2, False),
]


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize(
    ("peer_mode", "ours", "dp_size", "extras"), CASES, ids=[f"{c[0]}-dp{c[2]}-{c[3]}" for c in CASES]
)
def test_equals_verl_ppo_loss(agg, peer_mode, ours, dp_size, extras):
    data, _ = make_batch(SEED)
    data = with_batch_info(data, dp_size)
    common = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5)
    if extras:
        common.update(entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type="low_var_kl")
    peer_cfg = actor(peer_mode, agg, **common)
    our_cfg = actor("sspo", agg, plugin.SSPOPolicyLossConfig(loss_mode="sspo", **ours), **common)
    peer_loss, peer_metrics, peer_grad = run(VERL_PPO_LOSS, peer_cfg, data, entropy=extras)
    our_loss, our_metrics, our_grad = run(plugin.sspo_ppo_loss, our_cfg, data, entropy=extras)
    # the loss's size without the cancellation of zero-mean advantages: verl's loss with |advantages|
    positive = data.clone()
    positive["advantages"] = data["advantages"].abs()
    scale = max(float(run(VERL_PPO_LOSS, peer_cfg, positive, entropy=extras)[0].abs()), float(peer_loss.abs()))
    loss_err = float((our_loss - peer_loss).abs()) / scale
    grad_err = float((our_grad - peer_grad).norm() / peer_grad.norm())
    print(
        f"\n{peer_mode} {agg} dp={dp_size} extras={extras}: loss err/scale {loss_err:.2e}, "
        f"loss err/|loss| {float((our_loss - peer_loss).abs() / peer_loss.abs()):.2e}, grad rel {grad_err:.2e}"
    )
    assert_close("loss", our_loss, peer_loss, atol=LOSS_RTOL * scale)
    assert_rel_norm("d loss / d logits", our_grad, peer_grad, tol=GRAD_RTOL)
    assert peer_grad.abs().sum() > 0
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl") + (("kl_loss", "actor/entropy_loss") * extras):
        mine, theirs = our_metrics[key].values[0], peer_metrics[key].values[0]
        assert abs(float(mine) - float(theirs)) <= 1e-5 * max(1.0, abs(float(theirs))), key
    if peer_mode == "vanilla":
        assert 0 < peer_metrics["actor/pg_clipfrac"].values[0] < 1, "the clip must be active in the comparison"


def test_other_modes_go_to_verl():
    data, logits = make_batch(1)
    data = with_batch_info(data, 1)
    config = actor("gpg", "token-mean")
    out = model_output(data, logits, entropy=False)
    mine, _ = plugin.sspo_ppo_loss(config=config, model_output=out, data=data)
    theirs, _ = VERL_PPO_LOSS(config=config, model_output=out, data=data)
    assert torch.equal(mine, theirs)


def test_subsentence_with_tokenizer_and_entropy():
    """The SSPO path proper: boundary table from the actor's tokenizer, entropy-adaptive clip bounds."""

    class ModelConfig:  # verl's HFModelConfig carries the tokenizer; a token list stands in for it
        def __init__(self):
            self.tokenizer = [f"t{i}," if i % 5 == 0 else f"t{i}" for i in range(V)]  # every 5th ends a subsentence
            self.hf_config = None

    data, logits = make_batch(5)
    data = with_batch_info(data, 1)
    policy = plugin.SSPOPolicyLossConfig(loss_mode="sspo", granularity="subsentence", entropy_gamma=1.0)
    config = actor("sspo", "seq-mean-token-mean", policy, model_config=ModelConfig())
    loss, metrics = plugin.sspo_ppo_loss(config=config, model_output=model_output(data, logits, True), data=data)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() > 0
    n_seg = metrics["actor/sspo/num_segments"].values[0]
    assert data.batch_size[0] < n_seg < int(data["response_mask"].sum())
    with pytest.raises(ValueError, match="calculate_entropy"):
        plugin.sspo_ppo_loss(config=config, model_output=model_output(data, logits, False), data=data)
    config = actor("sspo", "token-mean", plugin.SSPOPolicyLossConfig(loss_mode="sspo"))
    with pytest.raises(ValueError, match="tokenizer"):
        plugin.sspo_ppo_loss(config=config, model_output=model_output(data, logits, True), data=data)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"granularity": "segments"}, "granularity"),
        ({"eps_low": 1.5}, "eps_low"),
        ({"entropy_gamma": -1.0}, "entropy_gamma"),
        ({"k_min": 3.0, "k_max": 2.0}, "k_min"),
        ({"ratio_grad": "segment"}, "ratio_grad"),
        ({"backend": "cuda"}, "backend"),
        ({"entropy_ref": "mean"}, "entropy_ref"),
    ],
)
def test_bad_options_raise_at_construction(options, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        plugin.SSPOPolicyLossConfig(loss_mode="sspo", **options)


def test_hydra_override_example_builds_the_config():
    """The README's Hydra overrides, composed with verl's own trainer config and instantiated as verl does."""
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    config_dir = Path(verl_spec.submodule_search_locations[0]) / "trainer" / "config"
    overrides = [
        "actor_rollout_ref.actor.policy_loss._target_=sspo_kernels.integrations.verl.SSPOPolicyLossConfig",
        "actor_rollout_ref.actor.policy_loss.loss_mode=sspo",
        "+actor_rollout_ref.actor.policy_loss.granularity=subsentence",
        "+actor_rollout_ref.actor.policy_loss.entropy_gamma=0.5",
        "actor_rollout_ref.actor.calculate_entropy=True",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    ]
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    actor_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor_cfg.policy_loss, plugin.SSPOPolicyLossConfig)
    assert actor_cfg.policy_loss.granularity == "subsentence" and actor_cfg.policy_loss.entropy_gamma == 0.5
    assert actor_cfg.calculate_entropy is True


def test_plugin_loads_through_verl_entry_point(tmp_path):
    """`import verl` in a fresh process loads the `verl.plugins` entry point and installs the loss (and the driver's
    bypass-mode guards); a plugin that failed to import would only be logged by verl, so the child prints verl's log
    and the test asserts."""
    dist = tmp_path / "sspo_entry-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sspo-entry\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[verl.plugins]\nsspo = sspo_kernels.integrations.verl\n")
    child = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(name)s: %(message)s")
        import verl
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
        import verl.workers.utils.losses as losses
        assert "sspo" in POLICY_LOSS_REGISTRY, "plugin not registered"
        assert losses.ppo_loss.__module__ == "sspo_kernels.integrations.verl", losses.ppo_loss
        # the driver's bypass-mode guards, bound as main_ppo binds validate_config after `import verl`
        from verl.utils.config import validate_config
        from verl.trainer.ppo import rollout_corr_helper
        assert hasattr(validate_config, "__sspo_original__"), validate_config
        assert hasattr(rollout_corr_helper.apply_bypass_mode, "__sspo_original__")
        print("PLUGIN-OK")
        """
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120)
    log = "\n".join(line for line in proc.stdout.splitlines() if "plugin" in line.lower() or "sspo" in line.lower())
    assert proc.returncode == 0 and "PLUGIN-OK" in proc.stdout, f"plugin failed:\n{log}\n{proc.stderr[-3000:]}"


def test_installed_entry_point_names_this_module():
    """Once the package is installed with its entry point, it points here (skipped before `pip install -e .`)."""
    eps = [ep for ep in importlib.metadata.entry_points(group="verl.plugins") if ep.name == "sspo"]
    if not eps:
        pytest.skip("sspo-kernels is not installed with its verl.plugins entry point")
    assert eps[0].value == "sspo_kernels.integrations.verl"


def test_install_is_idempotent_and_registered():
    plugin.install()
    plugin.install()
    assert verl_losses.ppo_loss is plugin.sspo_ppo_loss
    assert plugin.sspo_ppo_loss.__sspo_original__ is VERL_PPO_LOSS
    assert "sspo" in POLICY_LOSS_REGISTRY
    with pytest.raises(ValueError, match="ppo_loss"):
        POLICY_LOSS_REGISTRY["sspo"](old_log_prob=None)
