"""TRL adapter: `SSPOGRPOTrainer`, a `trl.GRPOTrainer` whose loss is sspo_kernels'.

Swap `GRPOTrainer` / `GRPOConfig` for `SSPOGRPOTrainer` / `SSPOGRPOConfig`; nothing else changes. With
`granularity=None` (follow TRL's `importance_sampling_level`) the loss, its gradients and its metrics are TRL's
own for every setting of TRL 1.16's loss (`trl_options.py` maps them; the few it refuses raise when the trainer is
built). The loss runs inside the wrapped model's forward (TRL's forward redirection), so DDP / FSDP / ZeRO-3 hooks
fire. Two paths, picked per call (`SSPOGRPOConfig.sspo_loss_path` forces one):

- **fused** (`sspo_loss_from_hidden`): the backbone's last hidden states and the output layer go straight into
  the loss; no `(B, T, V)` logits, one vocabulary pass. For text models, soft-capped and scaled logits
  included (the model's `final_logit_softcapping` and logit scale go to the vocabulary pass).
- **log-probs** (`sspo_loss_from_logprobs` on differentiable per-token log-probs and entropies): from the
  package's head (`token_logprobs_from_hidden`) on a plain text model when the fused call cannot express a
  setting (TRL's entropy bonus under a loss type other than `bnpo` or with the entropy mask, a cispo cap below
  1, ...); from TRL's own fused head (`GRPOTrainer._get_per_token_logps_and_entropies`) for the models it alone
  covers: vision-language inputs, the MoE router aux loss, prompt-learning PEFT.

The no-grad passes (old-policy and reference log-probs) run `token_logprobs_from_hidden` on plain text models and
TRL's head otherwise. Written against trl 1.16 (`GRPOTrainer._compute_loss(model, inputs)`,
`GRPOTrainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, ...)`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import maybe_gather_lm_head_ctx

from sspo_kernels import sspo_loss_from_hidden, sspo_loss_from_logprobs, token_logprobs_from_hidden
from sspo_kernels.integrations import trl_metrics
from sspo_kernels.integrations._common import build_boundary, check_options, drop_none, text_tokenizer
from sspo_kernels.integrations.trl_options import (
    LOSS_PATHS,
    LOSS_TYPES,
    Settings,
    aggregation,
    check_supported,
    combine_weights,
    objective_options,
    rollout_options,
    unit_ratio,
)

__all__ = ["SUPPORTED_LOSS_TYPES", "SSPOGRPOConfig", "SSPOGRPOTrainer"]

SUPPORTED_LOSS_TYPES = LOSS_TYPES
# TRL exponentiates log-ratios unclamped; the largest argument whose exp stays finite in fp32 (e^88.7 overflows).
TRL_LOG_RATIO_CLAMP = 87.0
# The multimodal keyword arguments of TRL's head, after `compute_aux_loss` in its signature.
_HEAD_PARAMS = tuple(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)
MULTIMODAL_KEYS = _HEAD_PARAMS[_HEAD_PARAMS.index("compute_aux_loss") + 1 :]


@dataclass
class SSPOGRPOConfig(GRPOConfig):
    """`GRPOConfig` plus the sspo_kernels options. Every `None` keeps TRL's (or the package's) choice.

    - `granularity`: None follows `importance_sampling_level` ("token" / "sequence"); "subsentence" or "sentence"
      builds a boundary table from the trainer's tokenizer (`boundary_chars` overrides the characters).
    - `sspo_eps_low` / `sspo_eps_high`: clip widths. None = TRL's at token and sequence granularity, the
      package's defaults at (sub)sentence granularity.
    - `entropy_gamma`, `k_min`, `k_max`, `adapt_low`, `adapt_high`: entropy-adaptive clip; `entropy_ref` a
      number fixes H_ref (None = the micro-batch's mean entropy).
    - `sspo_rollout_is`: None weighs by TRL's `importance_sampling_ratio`; "token" / "segment" / "sequence"
      compute vLLM's weight per unit from `sampling_per_token_logps` with TRL's mode and clip bounds ("segment":
      one weight per subsentence).
    - `sspo_loss_path`: "auto" (default), "fused" or "logprobs" (see the module's docstring).
    - `log_ratio_clamp`: None = 87 at token and sequence granularity (TRL clamps no ratio: the bias-corrected KL's
      R * KL stays moderate while R alone leaves e^-20; 87 keeps exp finite in fp32), the package's 20 otherwise.
    - `sspo_backend` ("auto" | "torch" | "triton"), `sspo_chunk_size`: package settings.
    """

    granularity: str | None = field(default=None, metadata={"help": "token | sequence | subsentence | sentence"})
    boundary_chars: str | None = field(default=None, metadata={"help": "characters ending a segment"})
    sspo_eps_low: float | None = field(default=None, metadata={"help": "lower clip width of the segment ratio"})
    sspo_eps_high: float | None = field(default=None, metadata={"help": "upper clip width of the segment ratio"})
    entropy_gamma: float | None = field(default=None, metadata={"help": "entropy-adaptation exponent (0 = off)"})
    k_min: float | None = field(default=None, metadata={"help": "lower bound of the entropy factor"})
    k_max: float | None = field(default=None, metadata={"help": "upper bound of the entropy factor"})
    entropy_ref: float | None = field(default=None, metadata={"help": "fixed entropy reference (None = batch)"})
    adapt_low: bool = field(default=True, metadata={"help": "entropy factor scales the lower clip bound"})
    adapt_high: bool = field(default=True, metadata={"help": "entropy factor scales the upper clip bound"})
    sspo_rollout_is: str | None = field(default=None, metadata={"help": "None (TRL's ratio) | token | segment"})
    sspo_loss_path: str = field(default="auto", metadata={"help": "auto | fused | logprobs"})
    log_ratio_clamp: float | None = field(default=None, metadata={"help": "clamp of the segment log-ratio"})
    sspo_backend: str = field(default="auto", metadata={"help": "auto | torch | triton"})
    sspo_chunk_size: int | None = field(default=None, metadata={"help": "tokens per chunk of the fused head"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fields(self)


def _check_fields(args: Any) -> None:
    check_options("SSPOGRPOConfig", _sspo_fields(args))
    chunk = getattr(args, "sspo_chunk_size", None)
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"SSPOGRPOConfig.sspo_chunk_size must be a positive int, got {chunk!r}")
    if getattr(args, "sspo_loss_path", "auto") not in LOSS_PATHS:
        raise ValueError(f"SSPOGRPOConfig.sspo_loss_path must be one of {LOSS_PATHS}, got {args.sspo_loss_path!r}")
    check_supported(Settings.of_args(args), vars(args))


def _sspo_fields(args: Any) -> dict[str, Any]:
    """The package options held by `args` (a plain `GRPOConfig` has none: all defaults)."""
    get = lambda name, default=None: getattr(args, name, default)
    return {
        "granularity": get("granularity"),
        "boundary_chars": get("boundary_chars"),
        "eps_low": get("sspo_eps_low"),
        "eps_high": get("sspo_eps_high"),
        "sspo_eps_low": get("sspo_eps_low"),
        "sspo_eps_high": get("sspo_eps_high"),
        "entropy_gamma": get("entropy_gamma"),
        "k_min": get("k_min"),
        "k_max": get("k_max"),
        "entropy_ref": get("entropy_ref"),
        "adapt_low": get("adapt_low", True),
        "adapt_high": get("adapt_high", True),
        "log_ratio_clamp": get("log_ratio_clamp"),
        "backend": get("sspo_backend", "auto"),
    }


def logit_transform(lm: torch.nn.Module) -> dict:
    """`lm`'s logit scale and soft-cap as the package's `logit_scale` / `logit_softcap`, read as TRL's fused
    head reads them (trl/trainer/utils.py:1577-1590): `final_logit_softcapping`; `logit_scale`, else
    `output_multiplier`, else `lm_head_multiplier`, else 1 / `logits_scaling` (times it for HyperCLOVA X)."""
    config = lm.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None) if scale is None else scale
    scaling = getattr(config, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if config.model_type == "hyperclovax" else 1 / scaling
    return {"logit_scale": 1.0 if scale is None else float(scale),
            "logit_softcap": getattr(config, "final_logit_softcapping", None)}  # fmt: skip


def package_head_ok(lm: torch.nn.Module) -> bool:
    """Whether the package's head reproduces `lm`'s log-probs: a text-only model (its logit scale and
    soft-cap go to the vocabulary pass, `logit_transform`), with a plain output layer and no
    prompt-learning adapter."""
    config = getattr(lm, "config", None)
    if config is None or not hasattr(config, "get_text_config") or config.get_text_config() is not config:
        return False
    if any(getattr(c, "is_prompt_learning", False) for c in (getattr(lm, "peft_config", None) or {}).values()):
        return False
    head = lm.get_output_embeddings()
    return head is not None and hasattr(head, "weight") and not hasattr(head, "base_layer")


class SSPOGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with the policy loss of sspo_kernels; same constructor, `args` an `SSPOGRPOConfig`
    (a plain `GRPOConfig` means all package options at their defaults)."""

    def __init__(self, *a: Any, args: GRPOConfig | None = None, **kw: Any) -> None:
        if args is not None:
            if not isinstance(args, GRPOConfig):
                raise TypeError(f"args must be an SSPOGRPOConfig (or GRPOConfig), got {type(args).__name__}")
            _check_fields(args)
        super().__init__(*a, args=args, **kw)
        check_supported(Settings.of_trainer(self), vars(self.args))
        self._sspo_redirect = _ForwardRedirection()
        self._sspo_boundary: torch.Tensor | None = None
        granularity = getattr(self.args, "granularity", None)
        if granularity in ("subsentence", "sentence"):
            vocab = self._sspo_lm().get_output_embeddings().weight.shape[0]
            chars = getattr(self.args, "boundary_chars", None)
            self._sspo_boundary = build_boundary(text_tokenizer(self.processing_class), granularity, chars, vocab)
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        self._sspo_zero3 = plugin is not None and plugin.zero_stage == 3

    # ------------------------------------------------------------------ setup

    def _sspo_lm(self) -> torch.nn.Module:
        """The causal LM under PEFT / accelerate wrappers (the module with the backbone and the output layer)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if is_peft_model(model) else model

    def _sspo_package_options(self) -> dict[str, Any]:
        """Options of the package that do not come from TRL's settings."""
        fields = _sspo_fields(self.args)
        opts = {name: fields[name] for name in ("entropy_ref", "adapt_low", "adapt_high", "log_ratio_clamp")}
        if opts["log_ratio_clamp"] is None and Settings.of_trainer(self).follow_trl:
            opts["log_ratio_clamp"] = TRL_LOG_RATIO_CLAMP
        opts["backend"] = fields["backend"]
        if self._sspo_boundary is not None:
            opts["boundary"] = self._sspo_boundary
        return drop_none(opts)

    def _sspo_route(self, s: Settings, inputs: dict[str, Any]) -> str:
        """ "fused", "package" (the package's head, then the log-probs loss) or "trl" (TRL's head, then the same)."""
        forced = getattr(self.args, "sspo_loss_path", "auto")
        multimodal = [key for key in MULTIMODAL_KEYS if inputs.get(key) is not None]
        trl_only = "multimodal inputs" if multimodal else ""
        if self.aux_loss_enabled:
            trl_only = "the MoE router aux loss"
        elif not package_head_ok(self._sspo_lm()):
            trl_only = "the model's logits (a multimodal model, or an adapted head)"
        reason = trl_only or self._sspo_fused_blocker(s)
        if forced == "fused" and reason:
            raise ValueError(f"sspo_loss_path='fused' cannot compute TRL's loss here: {reason}")
        if trl_only:
            return "trl"
        if forced == "logprobs" or reason:
            # the package head's backward recomputes logits outside ZeRO-3's gather of the head; TRL's re-gathers
            return "trl" if self._sspo_zero3 else "package"
        return "fused"

    def _sspo_fused_blocker(self, s: Settings) -> str:
        """Why a single `sspo_loss_from_hidden` call cannot give TRL's loss ("" when it can)."""
        coef = trl_metrics.bonus_coef(self)
        if self._entropy_bonus_enabled and (s.loss_type != "bnpo" or s.top_entropy_quantile < 1.0 or coef < 0):
            return "TRL's entropy bonus is a token mean over the entropy-masked tokens, not the loss's aggregation"
        if s.follow_trl and s.loss_type == "cispo" and s.cispo_cap < 1.0:
            return f"a cispo cap epsilon_high={s.cispo_cap} below 1"
        if s.follow_trl and s.loss_type == "vespo" and s.level == "token" and s.beta != 0.0 and s.bias_kl:
            return "vespo's KL weighted by the token ratio while its weight is per sequence"
        if s.off_policy_threshold is not None and s.off_policy_threshold < 0:
            return f"a negative off_policy_mask_threshold={s.off_policy_threshold}"
        if s.top_entropy_quantile <= 0:
            return f"top_entropy_quantile={s.top_entropy_quantile} <= 0"
        adapts = not s.follow_trl and getattr(self.args, "entropy_gamma", None) != 0
        batch_ref = getattr(self.args, "entropy_ref", None) is None
        if self._sspo_zero3 and (s.top_entropy_quantile < 1.0 or (adapts and batch_ref)):
            return "DeepSpeed ZeRO-3 needs the single-pass schedule (no entropy mask, a fixed entropy_ref)"
        return ""

    # ------------------------------------------------------------------ heads

    def _sspo_inner(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_ids: torch.Tensor, **loss_kw: Any
    ):
        """Runs inside the wrapped model's forward: backbone, then the fused loss on the completion positions."""
        lm = self._sspo_lm()
        out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        n = completion_ids.size(1)
        hidden = out.last_hidden_state[:, -n - 1 : -1]  # (B, n, H): position t predicts completion token t
        head = lm.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor shards
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        dtype = self._sspo_head_dtype(hidden, weight.device)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(weight.device.type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
            hidden = hidden.to(device=weight.device, dtype=dtype)
            return sspo_loss_from_hidden(
                hidden, weight.to(dtype), completion_ids, bias=bias, **loss_kw, **logit_transform(lm)
            )

    def _sspo_head_dtype(self, hidden: torch.Tensor, device: torch.device) -> torch.dtype:
        """TRL's head dtype (so every pass of a step rounds alike): fp32 with cast_lm_head_to_fp32, else the
        autocast dtype when autocast is on, else the hidden states'."""
        if getattr(self.args, "cast_lm_head_to_fp32", False):
            return torch.float32
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return hidden.dtype

    def _get_per_token_logps_and_entropies(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **extra: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """TRL's signature and outputs ((B, logits_to_keep) fp32 log-probs, entropies or None, aux loss None).
        Without grad (the old-policy and reference passes) on a plain text model: `token_logprobs_from_hidden`
        on the backbone's hidden states, rows in groups of `batch_size` as TRL does; otherwise TRL's own."""
        unwrapped = self.accelerator.unwrap_model(model)
        lm = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        multimodal = any(value is not None for value in extra.values())
        if torch.is_grad_enabled() or compute_aux_loss or multimodal or not package_head_ok(lm):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra,
            )  # fmt: skip
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            logp, entropy = self._sspo_package_head(model, input_ids[rows], attention_mask[rows], logits_to_keep,
                                                    compute_entropy)  # fmt: skip
            logps.append(logp)
            entropies.append(entropy)
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _sspo_package_head(self, model, input_ids, attention_mask, logits_to_keep: int, compute_entropy: bool):
        """(log-probs, entropies) of the last `logits_to_keep` tokens from the package's head, inside the wrapped
        model's forward (differentiable when grad is on)."""
        unwrapped = self.accelerator.unwrap_model(model)
        lm = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        head = functools.partial(self._sspo_logps_inner, lm, logits_to_keep, compute_entropy)
        with self.accelerator.autocast():
            return self._sspo_redirect(model, unwrapped, head, input_ids, attention_mask)

    def _sspo_logps_inner(
        self, lm: torch.nn.Module, logits_to_keep: int, compute_entropy: bool, input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Runs inside the wrapped model's forward: backbone, then the package's head on the last
        `logits_to_keep` tokens (-100 where the attention mask is 0, as TRL's labels), in TRL's head dtype."""
        out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state[:, -logits_to_keep - 1 : -1]  # position t predicts token t + 1
        tokens = input_ids[:, -logits_to_keep:].masked_fill(attention_mask[:, -logits_to_keep:] == 0, -100)
        head = lm.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor shards
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        device = weight.device
        dtype = self._sspo_head_dtype(hidden, device)
        with torch.autocast(device.type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
            return token_logprobs_from_hidden(
                hidden.to(device=device, dtype=dtype), weight.to(dtype), tokens.to(device),
                bias=None if bias is None else bias.to(dtype), temperature=self.temperature, entropy=compute_entropy,
                chunk_size=getattr(self.args, "sspo_chunk_size", None), backend=_sspo_fields(self.args)["backend"],
                **logit_transform(lm),
            )  # fmt: skip

    # ------------------------------------------------------------------ loss

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Same signature and `inputs` as `GRPOTrainer._compute_loss`; returns the scalar loss to backpropagate."""
        s = Settings.of_trainer(self)
        check_supported(s, vars(self.args))  # the trainer's attributes may have changed since it was built
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        train = self.model.training
        mode = "train" if train else "eval"
        accum = self.current_gradient_accumulation_steps if train else 1
        agg, divisor = aggregation(s.loss_type, self, inputs, completion_ids.size(0), train)
        rollout, is_weight = rollout_options(s, inputs)
        opts = {
            **drop_none(objective_options(s, _sspo_fields(self.args), self.args)),
            **self._sspo_package_options(),
            **agg,
            **rollout,
            "old_logprobs": inputs.get("old_per_token_logps"),  # None: on-policy (ratio 1, gradient A * grad l)
            "advantages": inputs["advantages"],
            "mask": mask,
        }
        if s.beta != 0.0:
            opts.update(beta=s.beta, ref_logprobs=inputs["ref_per_token_logps"], kl_ratio_weight=s.bias_kl)
        coef = trl_metrics.bonus_coef(self)
        route = self._sspo_route(s, inputs)
        if route == "fused":
            out, keep = self._sspo_fused(model, s, inputs, opts, is_weight, coef, input_ids, attention_mask)
            entropies = out.entropy
            policy_loss = out.loss.detach() + coef * out.metrics["entropy_mean"]
            loss = out.loss / divisor
        else:
            logps, entropies, aux = self._sspo_head(model, route, inputs, input_ids, attention_mask)
            out, keep, loss = self._sspo_from_logprobs(s, inputs, opts, is_weight, logps, entropies, mask)
            policy_loss = loss.detach()
            loss = loss / divisor
            if self._entropy_bonus_enabled:
                loss = loss - coef * trl_metrics.entropy_bonus(entropies, keep, accum)
            if aux is not None:
                loss = loss + self.router_aux_loss_coef * aux / accum
                self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux).mean().item())
        if self._entropy_bonus_enabled:
            trl_metrics.after_bonus(self, mode, policy_loss, entropies.detach(), keep)
        trl_metrics.log_metrics(
            self, s, mode, logps=out.logprobs, entropies=entropies, inputs=inputs, mask=mask, core=out.metrics
        )
        return loss

    def _sspo_fused(self, model, s: Settings, inputs, opts, is_weight, coef, input_ids, attention_mask):
        """(output, the bonus's token mask) of one `sspo_loss_from_hidden` call."""
        if s.off_policy_threshold is not None:
            opts["off_policy_mask"] = s.off_policy_threshold
            if "rollout_logprobs" not in opts and inputs.get("sampling_per_token_logps") is not None:
                opts.update(rollout_logprobs=inputs["sampling_per_token_logps"], rollout_is=None)  # TRL: :3068-3073
        if s.top_entropy_quantile < 1.0:
            opts["entropy_mask_quantile"] = s.top_entropy_quantile
            if self.accelerator.num_processes > 1:  # TRL's quantile is over every process's entropies
                opts["entropy_mask_group"] = torch.distributed.group.WORLD
        if coef != 0.0:  # bnpo: the loss's token mean is TRL's bonus
            opts["entropy_coef"] = coef
        if is_weight is not None:
            opts["policy_weights"] = is_weight
        opts.update(temperature=self.temperature, chunk_size=getattr(self.args, "sspo_chunk_size", None))
        if self._sspo_zero3:
            opts["single_pass"] = True
        unwrapped = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():
            out = self._sspo_redirect(
                model, unwrapped, self._sspo_inner, input_ids, attention_mask, inputs["completion_ids"], **opts
            )  # fmt: skip
        return out, opts["mask"]

    def _sspo_head(self, model, route: str, inputs, input_ids, attention_mask):
        """Differentiable (log-probs, entropies, aux loss or None) of the completion tokens."""
        keep = inputs["completion_ids"].size(1)
        if route == "package":
            logps, entropies = self._sspo_package_head(model, input_ids, attention_mask, keep, True)
            return logps, entropies, None
        extra = {key: inputs.get(key) for key in MULTIMODAL_KEYS}
        return GRPOTrainer._get_per_token_logps_and_entropies(
            self, model, input_ids, attention_mask, keep, compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **extra,
        )  # fmt: skip

    def _sspo_from_logprobs(self, s: Settings, inputs, opts, is_weight, logps, entropies, mask):
        """(output, the bonus's token mask, the loss before the divisor) of `sspo_loss_from_logprobs`, with TRL's
        own entropy and off-policy masks (`get_high_entropy_mask`, `get_off_policy_mask`) as policy weights."""
        old = inputs.get("old_per_token_logps")
        keep = mask
        ent_mask = opsm = cap = None
        if s.top_entropy_quantile < 1.0:
            ent_mask = self.get_high_entropy_mask(entropies.detach(), mask, 1 - s.top_entropy_quantile)
            keep = mask * ent_mask
        if s.off_policy_threshold is not None:
            advantages = inputs["advantages"]
            sampled = inputs.get("sampling_per_token_logps", logps.detach() if old is None else old)
            opsm = GRPOTrainer.get_off_policy_mask(
                advantages.unsqueeze(1) if advantages.dim() == 1 else advantages, logps, sampled, mask,
                s.off_policy_threshold,
            )  # fmt: skip
        if opts["objective"] == "reinforce":  # a cispo cap below 1: the capped ratio as a weight
            ratio = unit_ratio(logps, logps.detach() if old is None else old, mask.float(), s.level)
            cap = ratio.clamp(max=s.cispo_cap)
        weights = combine_weights(is_weight, opsm, ent_mask, cap)
        if weights is not None:
            opts["policy_weights"] = weights
        kl_loss = 0.0
        if s.follow_trl and s.loss_type == "vespo" and s.level == "token" and s.beta != 0.0 and s.bias_kl:
            # TRL weights the KL by the token ratio; vespo's unit is the sequence: the KL in a call of its own
            kl_opts = {k: opts[k] for k in ("old_logprobs", "advantages", "mask", "beta", "ref_logprobs")}
            kl_opts.update({k: v for k, v in opts.items() if k in ("loss_agg_mode", "normalizer", "norm_len",
                                                                     "log_ratio_clamp")})  # fmt: skip
            zero = torch.zeros(mask.size(0), device=mask.device)
            kl_loss = sspo_loss_from_logprobs(
                logps, None, inputs["completion_ids"], granularity="token", objective="reinforce",
                policy_weights=zero, kl_ratio_weight=True, backend=opts["backend"], **kl_opts,
            ).loss  # fmt: skip
            opts.update(beta=0.0, ref_logprobs=None, kl_ratio_weight=False)
        old_, adv, msk = opts.pop("old_logprobs"), opts.pop("advantages"), opts.pop("mask")
        out = sspo_loss_from_logprobs(logps, entropies.detach(), inputs["completion_ids"], old_, adv, msk, **opts)
        return out, keep, out.loss + kl_loss
