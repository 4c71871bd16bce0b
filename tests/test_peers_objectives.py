"""The objectives (docs/loss.md "Objectives") against the peers' real code, installed in the venv: Liger 0.8.5's
`LigerFusedLinearGRPOLoss(loss_type="cispo" | "sapo" | "vespo")` against `sspo_loss_from_hidden`; verl 0.9.1's
registered `cispo`, `sapo`, `geo_mean` and `gpg` policy losses against `sspo_loss_from_logprobs`; TRL 1.16's cispo,
sapo and vespo (its `_compute_loss` on a stub trainer, and `get_gamma_weights`) at token and sequence level.

Parameter mappings (docs/loss.md "Equivalences"):

- TRL's and Liger's cispo cap the ratio at the absolute `epsilon_high` = eps_max (no lower bound): ours with
  `eps_low=1` (lo = 0), `eps_high=eps_max - 1`. verl's cispo is two-sided and relative: its `clip_ratio_low` /
  `clip_ratio_high` are our `eps_low` / `eps_high` as they are.
- sapo's temperatures (TRL and Liger `sapo_temperature_pos/neg`, verl `tau_pos/neg`) are `sapo_tau_pos/neg`.
- vespo's `vespo_k_pos`, `vespo_lambda_pos`, `vespo_k_neg`, `vespo_lambda_neg` keep their names. TRL and Liger
  take one phi per *response* even at `importance_sampling_level="token"` (the sum of log-ratios runs over the
  row), so they equal our `granularity="sequence"`; their token-level IS ratio (`vllm_is_ratio` /
  `importance_sampling_ratio`, token_* modes) is our `rollout_is="token"` weight, folded into phi.
- verl's geo_mean is gmpo at `sequence` granularity with log-space bounds `clip_ratio_low/high`; it averages the
  rows (empty ones too): `seq-mean-token-mean` with `normalizer=B`. verl's sapo aggregates with
  seq-mean-token-mean whatever `loss_agg_mode` says. verl's gpg is `reinforce`.

Each test runs our reference (float64) and both fast backends (fp32; Triton in the interpreter, a few cases).
fp32 tolerances: loss 1e-6 relative to the peer's loss with |advantages|, gradients 1e-5 in relative norm.
"""

from __future__ import annotations

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
from test_peers_corrections import (
    TRL_EPS,
    grpo_trainer,
    liger_loss,
    trl_importance_sampling_ratio,
    trl_loss,
    verl_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VESPO = dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5)


# --------------------------------------------------------------------------------------------------
# Liger 0.8.5: LigerFusedLinearGRPOLoss(loss_type=...) against sspo_loss_from_hidden
# --------------------------------------------------------------------------------------------------

LIGER_CASES = [
    # (id, Liger's keywords, vllm IS mode (None: no ratio), our options)
    ("cispo", dict(loss_type="cispo", epsilon_high=1.2), None,
     dict(granularity="token", objective="cispo", eps_low=1.0, eps_high=1.2 - 1, loss_agg_mode="token-mean")),
    ("cispo-vllm_is_ratio", dict(loss_type="cispo", epsilon_high=1.2), "token_mask",
     dict(granularity="token", objective="cispo", eps_low=1.0, eps_high=1.2 - 1, loss_agg_mode="token-mean")),
    ("sapo", dict(loss_type="sapo", sapo_temperature_pos=1.3, sapo_temperature_neg=0.8), None,
     dict(granularity="token", objective="sapo", sapo_tau_pos=1.3, sapo_tau_neg=0.8,
          loss_agg_mode="seq-mean-token-mean", normalizer=5)),
    ("vespo", dict(loss_type="vespo", **VESPO), None,
     dict(granularity="sequence", objective="vespo", **VESPO, loss_agg_mode="token-mean")),
    ("vespo-vllm_is_ratio", dict(loss_type="vespo", **VESPO), "token_truncate",
     dict(granularity="sequence", objective="vespo", **VESPO, loss_agg_mode="token-mean")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("impl", "liger", "is_mode", "ours"), impl_params(LIGER_CASES, {"cispo", "vespo-vllm_is_ratio"})
)
def test_liger_objectives(impl, liger, is_mode, ours):
    pb = peer_batch(19, H=8, log_ratio_scale=0.4)
    assert pb.B == ours.get("normalizer", pb.B)
    ratio, rollout = None, {}
    if is_mode is not None:
        ratio = trl_importance_sampling_ratio(pb.old, pb.rollout, pb.mask, is_mode, 0.8, 1.25)
        rollout = dict(rollout_logprobs=pb.rollout, rollout_is="token", rollout_is_mode=is_mode.split("_")[1],
                       rollout_is_min=0.8, rollout_is_max=1.25)  # fmt: skip
    loss, grads, scale = liger_loss(pb, ratio, **liger)
    got = ours_on_hidden(impl, pb, **ours, **rollout)
    assert_peer(f"liger-{liger['loss_type']}{'-is' if ratio is not None else ''}-{impl}", got, loss, grads, scale)
    if liger["loss_type"] == "cispo":
        logp, _ = torch_logp_entropy((pb.hidden @ pb.weight.T + pb.bias).detach(), pb.tokens)
        capped = ((logp - pb.old).exp() > 1.2) & (pb.advantages[:, None] > 0)
        assert 0 < capped[pb.mask].double().mean() < 1, "the case must cap some tokens, not all"
        assert_close("cispo_clip_frac", got.metrics["cispo_clip_frac"], capped[pb.mask].double().mean(), atol=1e-7)


# --------------------------------------------------------------------------------------------------
# verl 0.9.1: compute_policy_loss_{cispo, sapo, geo_mean, gpg} against sspo_loss_from_logprobs
# --------------------------------------------------------------------------------------------------

VERL_CASES = [
    # (id, verl loss_mode, verl loss_agg_mode, verl actor keywords, per-response rollout_is_weights, our options)
    ("cispo-token_mean", "cispo", "token-mean", dict(clip_ratio_low=0.15, clip_ratio_high=0.2), False,
     dict(granularity="token", objective="cispo", eps_low=0.15, eps_high=0.2, loss_agg_mode="token-mean")),
    ("cispo-seq_mean_token_sum-weights", "cispo", "seq-mean-token-sum", dict(clip_ratio_low=0.15, clip_ratio_high=0.2),
     True, dict(granularity="token", objective="cispo", eps_low=0.15, eps_high=0.2,
                loss_agg_mode="seq-mean-token-sum")),
    ("sapo", "sapo", "token-mean", dict(tau_pos=1.3, tau_neg=0.8), False,
     dict(granularity="token", objective="sapo", sapo_tau_pos=1.3, sapo_tau_neg=0.8,
          loss_agg_mode="seq-mean-token-mean")),
    ("geo_mean", "geo_mean", "token-mean", dict(clip_ratio_low=0.1, clip_ratio_high=0.15), False,
     dict(granularity="sequence", objective="gmpo", eps_low=0.1, eps_high=0.15, loss_agg_mode="seq-mean-token-mean",
          normalizer=5)),
    ("geo_mean-weights", "geo_mean", "token-mean", dict(clip_ratio_low=0.1, clip_ratio_high=0.15), True,
     dict(granularity="sequence", objective="gmpo", eps_low=0.1, eps_high=0.15, loss_agg_mode="seq-mean-token-mean",
          normalizer=5)),
    ("gpg-seq_mean_token_mean", "gpg", "seq-mean-token-mean", {}, False,
     dict(granularity="token", objective="reinforce", loss_agg_mode="seq-mean-token-mean")),
    ("gpg-seq_mean_token_sum_norm-weights", "gpg", "seq-mean-token-sum-norm", {}, True,
     dict(granularity="token", objective="reinforce", loss_agg_mode="seq-mean-token-sum-norm")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("impl", "mode", "agg", "actor", "weighted", "ours"), impl_params(VERL_CASES, {"geo_mean-weights", "sapo"})
)
def test_verl_objectives(impl, mode, agg, actor, weighted, ours):
    pb = peer_batch(12, log_ratio_scale=0.25)
    weights = None
    if weighted:  # per response: verl's geo_mean takes their geometric mean over the row, the others multiply
        weights = (0.5 + torch.rand(pb.B, generator=torch.Generator().manual_seed(13)))[:, None].expand(pb.B, pb.T)
    loss, grads, scale = verl_loss(pb, mode, agg, weights, **actor)
    extra = {} if weights is None else dict(policy_weights=weights[:, 0].contiguous())
    got = ours_on_logits(impl, pb, entry="logprobs", **ours, **extra)
    assert_peer(f"verl-{mode}-{agg}{'-weights' if weighted else ''}-{impl}", got, loss, grads, scale)
    if mode == "geo_mean":
        logp, _ = torch_logp_entropy(pb.logits.detach(), pb.tokens)
        x = (logp - pb.old)[pb.mask]
        assert ((x > 0.15) | (x < -0.1)).any() and ((x < 0.15) & (x > -0.1)).any(), "some tokens must clip, not all"


# --------------------------------------------------------------------------------------------------
# TRL 1.16: cispo, sapo, vespo in GRPOTrainer._compute_loss, and get_gamma_weights
# --------------------------------------------------------------------------------------------------

TRL_CASES = [
    # (id, TRL loss_type, importance_sampling_level (our granularity), TRL trainer attributes, our options)
    ("cispo-token", "cispo", "token", dict(epsilon_high=1.2),
     dict(objective="cispo", eps_low=1.0, eps_high=1.2 - 1, loss_agg_mode="token-mean")),
    ("cispo-sequence", "cispo", "sequence", dict(epsilon_high=1.05),
     dict(objective="cispo", eps_low=1.0, eps_high=1.05 - 1, loss_agg_mode="token-mean")),
    ("sapo-token", "sapo", "token", {},
     dict(objective="sapo", loss_agg_mode="seq-mean-token-mean", normalizer=5)),
    ("sapo-sequence", "sapo", "sequence", {},
     dict(objective="sapo", loss_agg_mode="seq-mean-token-mean", normalizer=5)),
    ("vespo", "vespo", "token", dict(args=VESPO),
     dict(objective="vespo", **VESPO, loss_agg_mode="token-mean")),
]  # fmt: skip


@pytest.mark.parametrize(("impl", "loss_type", "level", "trl", "ours"), impl_params(TRL_CASES, {"sapo-sequence"}))
def test_trl_objectives(impl, loss_type, level, trl, ours):
    pb = peer_batch(14, log_ratio_scale=0.3)
    loss, grads, scale, _ = trl_loss(pb, loss_type=loss_type, importance_sampling_level=level, **trl)
    granularity = "sequence" if loss_type == "vespo" else level  # TRL's vespo weighs whole responses
    got = ours_on_logits(impl, pb, entry="logits", granularity=granularity, **ours)
    assert_peer(f"trl-{loss_type}-{level}-{impl}", got, loss, grads, scale)


@pytest.mark.parametrize(
    ("impl", "is_mode"), impl_params([("no_rollout", None), ("token_mask", "token_mask")], {"token_mask"})
)
def test_trl_vespo_gamma_weights_and_rollout_fold(impl, is_mode):
    pb = peer_batch(15, log_ratio_scale=0.3)
    pb.advantages[3] = 0.0  # A = 0 takes the (k, lambda) of A >= 0: it shows in phi, not in the loss
    ratio = None
    rollout = {}
    if is_mode is not None:
        ratio = trl_importance_sampling_ratio(pb.old, pb.rollout, pb.mask, is_mode, 0.8, 1.25)
        assert (ratio[pb.mask] == 0).any()
        rollout = dict(rollout_logprobs=pb.rollout, rollout_is="token", rollout_is_min=0.8, rollout_is_max=1.25)
    inputs = {} if ratio is None else dict(importance_sampling_ratio=ratio)
    loss, grads, scale, _ = trl_loss(pb, inputs=inputs, loss_type="vespo", args=VESPO)
    got = ours_on_logits(impl, pb, entry="logprobs", granularity="sequence", objective="vespo", **VESPO, **rollout)
    assert_peer(f"trl-vespo-{is_mode}-{impl}", got, loss, grads, scale)
    logp, _ = torch_logp_entropy(pb.logits.detach(), pb.tokens)
    params = {name.removeprefix("vespo_"): value for name, value in VESPO.items()}
    phi = grpo_trainer().get_gamma_weights(pb.advantages[:, None], logp - pb.old, pb.mask.float(), ratio, **params)
    assert_close("vespo_phi_mean", got.metrics["vespo_phi_mean"], phi.mean(), rtol=1e-5)


@pytest.mark.parametrize(("impl",), impl_params([("token",)], set()))
def test_trl_delta_is_dual_clip(impl):
    # INTELLECT-2's delta > 1 + epsilon_high caps the unclipped branch: our dual clip (docs/loss.md, TRL mapping)
    pb = peer_batch(16, log_ratio_scale=0.5)
    loss, grads, scale, _ = trl_loss(pb, args=dict(delta=1.4))
    got = ours_on_logits(impl, pb, entry="logits", granularity="token", **TRL_EPS, dual_clip=1.4)
    assert_peer(f"trl-delta-{impl}", got, loss, grads, scale)
    assert got.metrics["dual_clip_frac"] > 0


@pytest.mark.parametrize(("impl",), impl_params([("token",)], set()))
def test_trl_gamma_weights_of_single_tokens_are_vespo_at_token_granularity(impl):
    # TRL weighs whole rows; with every token its own row, its get_gamma_weights gives our per-token phi
    pb = peer_batch(17, log_ratio_scale=0.4)
    logits = pb.logits.detach().clone().requires_grad_(True)
    logp, _ = torch_logp_entropy(logits, pb.tokens)
    params = {name.removeprefix("vespo_"): value for name, value in VESPO.items()}
    adv = pb.advantages[:, None].expand(pb.B, pb.T).reshape(-1, 1)
    gamma = grpo_trainer().get_gamma_weights
    phi = gamma(adv, (logp - pb.old).reshape(-1, 1), pb.mask.reshape(-1, 1).float(), None, **params)
    m = pb.mask.reshape(-1).float()
    per_token = -phi[:, 0] * adv[:, 0] * logp.reshape(-1)  # TRL's vespo term (grpo_trainer.py:3125-3136)
    loss = (per_token * m).sum() / m.sum()
    scale = (phi[:, 0] * adv[:, 0].abs() * logp.reshape(-1).abs() * m).sum() / m.sum()
    got = ours_on_logits(impl, pb, entry="logprobs", granularity="token", objective="vespo", **VESPO)
    assert_peer(f"trl-gamma-weights-per-token-{impl}", got, loss.detach(), torch.autograd.grad(loss, logits), scale)
    assert_close("vespo_phi_mean", got.metrics["vespo_phi_mean"], phi[m.bool()].mean(), rtol=1e-5)
