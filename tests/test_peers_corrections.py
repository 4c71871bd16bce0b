"""The off-policy corrections (docs/loss.md "Off-policy corrections") against the peers' real code, installed in the
venv: TRL 1.16's vLLM importance-sampling ratio (its four modes), off-policy sequence mask, high-entropy mask and
bias-corrected KL, through TRL's own `GRPOTrainer._compute_loss`; Liger 0.8.5's `vllm_is_ratio`; verl 0.9.1's
rollout-correction weights (TIS and IcePop, token and sequence) in its `vanilla` policy loss.

Each test is parametrised over our implementation (`impl`): the float64 reference, and the torch and Triton
backends of the fast paths (fp32; Triton in the interpreter, a few cases). fp32 tolerances: the loss within 1e-6
relative to the peer's loss without cancellation (with |advantages|), gradients within 1e-5 in relative norm.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from _assert import assert_close
from _reference_helpers import (
    assert_peer,
    impl_params,
    ours_on_hidden,
    ours_on_logits,
    peer_batch,
    torch_logp_entropy,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------------------------------
# TRL 1.16: GRPOTrainer._compute_loss on a stub trainer
# --------------------------------------------------------------------------------------------------


class _OneProcess:
    """What GRPOTrainer asks of its accelerator, for a single process: gathers and reductions are identities."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def grpo_trainer():
    return pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer


def trl_trainer(logp: torch.Tensor, entropy: torch.Tensor, args: dict | None = None, **attrs):
    """A `GRPOTrainer` without its __init__ (no model, no data): the attributes `_compute_loss` reads, and a model
    pass that returns the given per-token log-probs and entropies."""
    trainer = object.__new__(grpo_trainer())
    trainer_args = dict(use_bias_correction_kl=False, delta=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                        vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                        steps_per_generation=1)  # fmt: skip
    trainer_args.update(args or {})
    defaults = dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, beta=0.0, importance_sampling_level="token",
                    top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
                    vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False, aux_loss_enabled=False,
                    current_gradient_accumulation_steps=1, model=SimpleNamespace(training=True),
                    accelerator=_OneProcess(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                    args=SimpleNamespace(**trainer_args))  # fmt: skip
    for name, value in {**defaults, **attrs}.items():
        setattr(trainer, name, value)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropy, None)
    return trainer


def trl_inputs(pb, advantages: torch.Tensor, **extra) -> dict:
    """The batch dict `_compute_loss` reads (no prompt: the log-probs come from the stub's model pass)."""
    B = pb.B
    return dict(prompt_ids=torch.zeros(B, 0, dtype=torch.long), prompt_mask=torch.zeros(B, 0, dtype=torch.long),
                completion_ids=pb.tokens, completion_mask=pb.mask.long(), advantages=advantages,
                old_per_token_logps=pb.old, num_items_in_batch=pb.mask.sum(), **extra)  # fmt: skip


def trl_loss(pb, advantages=None, inputs: dict | None = None, args: dict | None = None, **attrs):
    """TRL's loss and d loss / d logits on `pb.logits` (and, with |advantages|, the loss's scale)."""
    out = []
    for adv in (pb.advantages if advantages is None else advantages, None):
        logits = pb.logits.detach().clone().requires_grad_(True)
        logp, entropy = torch_logp_entropy(logits, pb.tokens)
        adv = out[0][3].abs() if adv is None else adv
        trainer = trl_trainer(logp, entropy.detach(), args, **attrs)
        loss = trainer._compute_loss(None, trl_inputs(pb, adv, **(inputs or {})))
        out.append((loss.detach(), torch.autograd.grad(loss, logits), trainer, adv))
    (loss, grads, trainer, _), (scale, *_) = out
    return loss, grads, scale, trainer


def trl_importance_sampling_ratio(old, sampling, mask, mode: str, clip_min, clip_max) -> torch.Tensor:
    """TRL 1.16's vLLM importance-sampling ratio, transcribed from `GRPOTrainer._generate_and_score_completions`
    (trl/trainer/grpo_trainer.py:2660-2708), where it is computed inline after generation: the log-prob
    differences (q - v) masked, NaN made 0, summed over the sequence for the sequence_* modes, exponentiated,
    then clamped to [clip_min, clip_max] (*_truncate) or zeroed outside it (*_mask)."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


TRL_EPS = dict(eps_low=0.2, eps_high=0.28, entropy_gamma=0.0)  # TRL's epsilon / epsilon_high of trl_trainer
TRL_IS_CASES = [
    # (id, TRL mode, TRL importance_sampling_level = our granularity, clip_min, clip_max)
    ("token_truncate", "token_truncate", "token", 0.8, 1.25),
    ("token_mask", "token_mask", "sequence", 0.8, 1.25),
    ("sequence_truncate", "sequence_truncate", "token", 0.5, 2.0),
    ("sequence_mask", "sequence_mask", "sequence", None, 3.0),
]


@pytest.mark.parametrize(
    ("impl", "mode", "level", "clip_min", "clip_max"), impl_params(TRL_IS_CASES, {"sequence_mask"})
)
def test_trl_vllm_importance_sampling_is_rollout_is(impl, mode, level, clip_min, clip_max):
    pb = peer_batch(1, log_ratio_scale=0.5)
    sampling = pb.rollout.clone()
    sampling[0, 2] = torch.nan  # a token the sampler could not score, masked in
    sampling[2, -1] = torch.nan  # and one masked out
    assert pb.mask[0, 2] and not pb.mask[2, -1]
    ratio = trl_importance_sampling_ratio(pb.old, sampling, pb.mask, mode, clip_min, clip_max)
    expanded = ratio.expand(pb.B, pb.T)[pb.mask]
    assert ((expanded == 0) | (expanded == clip_max)).any() and ((expanded != 0) & (expanded != clip_max)).any()
    vllm = dict(use_vllm=True, vllm_importance_sampling_correction=True, importance_sampling_level=level)
    loss, grads, scale, _ = trl_loss(pb, inputs=dict(importance_sampling_ratio=ratio), **vllm)
    unit, how = mode.split("_")
    rollout = dict(rollout_logprobs=sampling, rollout_is=unit, rollout_is_mode=how, rollout_is_min=clip_min,
                   rollout_is_max=clip_max)  # fmt: skip
    ours = ours_on_logits(impl, pb, entry="logits", granularity=level, **TRL_EPS, **rollout)
    assert_peer(f"trl-is-{mode}-{impl}", ours, loss, grads, scale)
    m = ours.metrics
    assert_close("is_weight_mean", m["is_weight_mean"], expanded.mean(), rtol=1e-6)
    assert_close("is_weight_min", m["is_weight_min"], expanded.min(), rtol=1e-6)
    assert_close("is_weight_max", m["is_weight_max"], expanded.max(), rtol=1e-6)
    if mode.endswith("mask"):
        dropped = (expanded == 0).double().mean()
        assert_close("is_masked_frac", m["is_masked_frac"], dropped, atol=1e-7)


@pytest.mark.parametrize(("impl", "with_sampler"), impl_params([("sampler", True), ("old", False)], {"sampler"}))
def test_trl_off_policy_mask_is_off_policy_mask(impl, with_sampler):
    pb = peer_batch(2, log_ratio_scale=0.3)
    delta = 0.05
    sampling = pb.rollout + 0.15  # drift x = v - l on both sides of delta
    inputs = dict(sampling_per_token_logps=sampling) if with_sampler else {}
    loss, grads, scale, _ = trl_loss(pb, inputs=inputs, off_policy_mask_threshold=delta, beta=0.0)
    extra = dict(rollout_logprobs=sampling, rollout_is=None) if with_sampler else {}
    ours = ours_on_logits(impl, pb, entry="logits", granularity="token", **TRL_EPS, off_policy_mask=delta,
                          **extra)  # fmt: skip
    assert_peer(f"trl-opsm-{'sampler' if with_sampler else 'old'}-{impl}", ours, loss, grads, scale)
    logp, _ = torch_logp_entropy(pb.logits.detach(), pb.tokens)
    keep = grpo_trainer().get_off_policy_mask(
        pb.advantages[:, None], logp, sampling if with_sampler else pb.old, pb.mask.float(), delta
    )
    dropped = (keep.expand(pb.B, pb.T) == 0)[pb.mask].double().mean()
    assert 0 < dropped < 1, "the case must drop some responses, not all"
    assert_close("off_policy_masked_frac", ours.metrics["off_policy_masked_frac"], dropped, atol=1e-7)


@pytest.mark.parametrize(("impl", "rho"), impl_params([("rho0.2", 0.2), ("rho0.65", 0.65)], {"rho0.2"}))
def test_trl_high_entropy_mask_is_entropy_mask_quantile(impl, rho):
    pb = peer_batch(3)
    loss, grads, scale, trainer = trl_loss(pb, top_entropy_quantile=rho)
    ours = ours_on_logits(impl, pb, entry="logprobs", granularity="token", **TRL_EPS,
                          entropy_mask_quantile=rho)  # fmt: skip
    assert_peer(f"trl-entropy-mask-{rho}-{impl}", ours, loss, grads, scale)
    _, entropy = torch_logp_entropy(pb.logits.detach(), pb.tokens)
    kept = grpo_trainer().get_high_entropy_mask(trainer, entropy, pb.mask.long(), 1 - rho)
    dropped = (~kept)[pb.mask].double().mean()
    assert_close("entropy_masked_frac", ours.metrics["entropy_masked_frac"], dropped, atol=1e-7)


@pytest.mark.parametrize(("impl", "level"), impl_params([("token", "token"), ("sequence", "sequence")], {"token"}))
def test_trl_bias_corrected_kl_is_kl_ratio_weight(impl, level):
    pb = peer_batch(4)
    beta = 0.2
    trl = dict(beta=beta, importance_sampling_level=level, args=dict(use_bias_correction_kl=True))
    loss, grads, scale, _ = trl_loss(pb, inputs=dict(ref_per_token_logps=pb.ref), **trl)
    ours = ours_on_logits(impl, pb, entry="logprobs", granularity=level, **TRL_EPS, beta=beta, ref_logprobs=pb.ref,
                          kl_ratio_weight=True)  # fmt: skip
    assert_peer(f"trl-bias-corrected-kl-{level}-{impl}", ours, loss, grads, scale)


# --------------------------------------------------------------------------------------------------
# Liger 0.8.5: LigerFusedLinearGRPOLoss(vllm_is_ratio=...)
# --------------------------------------------------------------------------------------------------


def liger_loss(pb, vllm_is_ratio=None, **kw):
    """Liger's loss and its gradients in (hidden, weight, bias), and the loss with |advantages| (the scale)."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    fn = chunked.LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, **kw)
    out = []
    for adv in (pb.advantages, pb.advantages.abs()):
        leaves = [t.detach().clone().requires_grad_(True) for t in (pb.hidden, pb.weight, pb.bias)]
        loss, _ = fn(leaves[0], leaves[1], pb.tokens, pb.mask.float(), adv, bias=leaves[2],
                     old_per_token_logps=pb.old, vllm_is_ratio=vllm_is_ratio)  # fmt: skip
        out.append((loss.detach(), torch.autograd.grad(loss, leaves)))
    return out[0][0], out[0][1], out[1][0]


LIGER_IS_CASES = [
    # (id, Liger loss_type, our loss_agg_mode, per token or per response ratio)
    ("dapo-per_token", "dapo", "token-mean", True),
    ("grpo-per_response", "grpo", "seq-mean-token-mean", False),
]


@pytest.mark.parametrize(("impl", "loss_type", "agg", "per_token"), impl_params(LIGER_IS_CASES, {"dapo-per_token"}))
def test_liger_vllm_is_ratio_is_policy_weights(impl, loss_type, agg, per_token):
    pb = peer_batch(5, H=8)
    gen = torch.Generator().manual_seed(6)
    shape = (pb.B, pb.T) if per_token else (pb.B, 1)
    ratio = 2 * torch.rand(shape, generator=gen)
    ratio[0, 0] = 0.0
    loss, grads, scale = liger_loss(pb, ratio, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28)
    weights = ratio if per_token else ratio[:, 0]
    ours = ours_on_hidden(impl, pb, granularity="token", eps_low=0.2, eps_high=0.28, loss_agg_mode=agg,
                          normalizer=pb.B if agg != "token-mean" else None, policy_weights=weights)  # fmt: skip
    assert_peer(f"liger-vllm_is_ratio-{loss_type}-{impl}", ours, loss, grads, scale)


# --------------------------------------------------------------------------------------------------
# verl 0.9.1: rollout_corr_helper.compute_rollout_correction_weights in the vanilla policy loss
# --------------------------------------------------------------------------------------------------


def verl_actor(loss_mode: str, agg: str, **kw):
    config = pytest.importorskip("verl.workers.config")
    return config.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=agg,
                              policy_loss=config.PolicyLossConfig(loss_mode=loss_mode), **kw)  # fmt: skip


def verl_loss(pb, loss_mode: str, agg: str, rollout_is_weights=None, per_token_adv=True, **kw):
    """verl's registered policy loss `loss_mode` on torch's log-probs of `pb.logits`: loss, d loss / d logits, and
    the loss with |advantages|."""
    core = pytest.importorskip("verl.trainer.ppo.core_algos")
    fn = core.get_policy_loss_fn(loss_mode)
    config = verl_actor(loss_mode, agg, **kw)
    out = []
    for adv in (pb.advantages, pb.advantages.abs()):
        logits = pb.logits.detach().clone().requires_grad_(True)
        logp, _ = torch_logp_entropy(logits, pb.tokens)
        adv_t = adv[:, None].expand(pb.B, pb.T).contiguous() if per_token_adv else adv
        loss, _ = fn(pb.old, logp, adv_t, pb.mask.float(), agg, config, rollout_is_weights)
        out.append((loss.detach(), torch.autograd.grad(loss, logits)))
    return out[0][0], out[0][1], out[1][0]


VERL_IS_CASES = [
    # (id, verl rollout_is, rollout_is_threshold, our rollout_is_mode, rollout_is_min, rollout_is_max)
    ("token-tis", "token", 1.2, "truncate", None, 1.2),
    ("token-icepop", "token", "0.8_1.25", "mask", 0.8, 1.25),
    ("sequence-tis", "sequence", 2.0, "truncate", None, 2.0),
    ("sequence-icepop", "sequence", "0.5_2.0", "mask", 0.5, 2.0),
]


@pytest.mark.parametrize(
    ("impl", "level", "threshold", "mode", "low", "high"), impl_params(VERL_IS_CASES, {"sequence-icepop"})
)
def test_verl_rollout_is_weights_are_rollout_is(impl, level, threshold, mode, low, high):
    helper = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
    pb = peer_batch(7, log_ratio_scale=0.5)
    mask = pb.mask.float()
    weights, _ = helper.compute_rollout_correction_weights(pb.old - pb.rollout, mask, rollout_is=level,
                                                          rollout_is_threshold=threshold)  # fmt: skip
    w_in = weights[pb.mask]
    assert ((w_in == 0) | (w_in == high)).any() and ((w_in != 0) & (w_in != high)).any()
    clip = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    loss, grads, scale = verl_loss(pb, "vanilla", "token-mean", weights, **clip)
    ours = ours_on_logits(impl, pb, entry="logprobs", granularity="token", eps_low=0.2, eps_high=0.28,
                          dual_clip=3.0, rollout_logprobs=pb.rollout, rollout_is=level, rollout_is_mode=mode,
                          rollout_is_min=low, rollout_is_max=high)  # fmt: skip
    assert_peer(f"verl-rollout-is-{level}-{mode}-{impl}", ours, loss, grads, scale)
    assert_close("is_weight_mean", ours.metrics["is_weight_mean"], w_in.mean(), rtol=1e-6)
    assert_close("is_weight_min", ours.metrics["is_weight_min"], w_in.min(), rtol=1e-6)
    assert_close("is_weight_max", ours.metrics["is_weight_max"], w_in.max(), rtol=1e-6)
