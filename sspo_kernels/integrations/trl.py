"""TRL adapter: `SSPOGRPOTrainer`, a `trl.GRPOTrainer` whose loss is `sspo_loss_from_hidden`.

Swap `GRPOTrainer` / `GRPOConfig` for `SSPOGRPOTrainer` / `SSPOGRPOConfig`; nothing else changes. The loss is
computed from the backbone's last hidden states and the output embedding, so no `(B, T, V)` logits are built, and
it is called inside the wrapped model's forward (TRL's forward redirection) so DDP / FSDP / ZeRO-3 hooks fire.

With `granularity=None` (follow TRL's `importance_sampling_level`) and no entropy adaptation the loss and
gradients are TRL's own for the loss types whose maths the package covers: `grpo`, `bnpo`, `dr_grpo`, `dapo`,
`luspo`. Settings the package cannot reproduce are refused when the trainer is built.

The no-grad passes (old-policy and reference log-probs) run `token_logprobs_from_hidden` on the backbone's last
hidden states and the output layer instead of TRL's fused head (same numbers within fp32 rounding), so every pass
of a step runs the package's kernels; TRL's own path serves the cases the adapter cannot reproduce (VLM inputs,
the MoE aux loss, soft-capped or scaled logits, an adapter on the head).

Written against trl 1.16 (`GRPOTrainer._compute_loss(model, inputs)`,
`GRPOTrainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, ...)`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import maybe_gather_lm_head_ctx

from sspo_kernels import sspo_loss_from_hidden, token_logprobs_from_hidden
from sspo_kernels.integrations._common import build_boundary, check_options, drop_none, text_tokenizer

__all__ = ["SUPPORTED_LOSS_TYPES", "SSPOGRPOConfig", "SSPOGRPOTrainer"]

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# Attributes of a model config that change the logits after the LM head (the package applies only 1/temperature).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier")


@dataclass
class SSPOGRPOConfig(GRPOConfig):
    """`GRPOConfig` plus the sspo_kernels options. Every `None` keeps TRL's (or the package's) choice.

    - `granularity`: None follows `importance_sampling_level` ("token" / "sequence"); "subsentence" or "sentence"
      builds a boundary table from the trainer's tokenizer (`boundary_chars` overrides the characters).
    - `sspo_eps_low` / `sspo_eps_high`: clip widths. None = `epsilon` / `epsilon_high` at token and sequence
      granularity, the package's defaults at (sub)sentence granularity (TRL's 0.2 is far too wide for a
      length-normalised segment ratio).
    - `entropy_gamma`, `k_min`, `k_max`, `adapt_low`, `adapt_high`: entropy-adaptive clip; `entropy_ref` a
      number fixes H_ref (None = the micro-batch's mean entropy; ZeRO-3 needs a number or gamma 0).
    - `log_ratio_clamp`, `sspo_backend` ("auto" | "torch" | "triton"), `sspo_chunk_size`: package settings.
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
    log_ratio_clamp: float = field(default=20.0, metadata={"help": "clamp of the segment log-ratio"})
    sspo_backend: str = field(default="auto", metadata={"help": "auto | torch | triton"})
    sspo_chunk_size: int | None = field(default=None, metadata={"help": "tokens per chunk of the fused head"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_options("SSPOGRPOConfig", _sspo_fields(self))
        if self.sspo_chunk_size is not None and (not isinstance(self.sspo_chunk_size, int) or self.sspo_chunk_size < 1):
            raise ValueError(f"SSPOGRPOConfig.sspo_chunk_size must be a positive int, got {self.sspo_chunk_size!r}")


def _sspo_fields(args: Any) -> dict[str, Any]:
    """The package options held by `args` (a plain `GRPOConfig` has none: all defaults)."""
    get = lambda name, default=None: getattr(args, name, default)
    return {
        "granularity": get("granularity"),
        "boundary_chars": get("boundary_chars"),
        "eps_low": get("sspo_eps_low"),
        "eps_high": get("sspo_eps_high"),
        "entropy_gamma": get("entropy_gamma"),
        "k_min": get("k_min"),
        "k_max": get("k_max"),
        "entropy_ref": get("entropy_ref"),
        "adapt_low": get("adapt_low", True),
        "adapt_high": get("adapt_high", True),
        "log_ratio_clamp": get("log_ratio_clamp", 20.0),
        "backend": get("sspo_backend", "auto"),
    }


def _plain_text_head(lm: torch.nn.Module) -> bool:
    """Whether the package's head reproduces `lm`'s log-probs: a text-only model whose logits are its output
    layer's (no soft-capping or scaling) and whose output layer is a plain one (no PEFT adapter on it)."""
    config = getattr(lm, "config", None)
    if config is None or not hasattr(config, "get_text_config") or config.get_text_config() is not config:
        return False
    if any(getattr(config, name, None) not in (None, 1.0) for name in (*_LOGIT_TRANSFORMS, "logits_scaling")):
        return False
    head = lm.get_output_embeddings()
    return head is not None and hasattr(head, "weight") and not hasattr(head, "base_layer")


def _refuse_unsupported(args: GRPOConfig) -> None:
    """Settings of TRL whose loss the package does not compute: a clear error instead of a different loss."""
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(
            f"SSPOGRPOTrainer supports loss_type in {SUPPORTED_LOSS_TYPES}; got loss_type={args.loss_type!r}. "
            "Use trl.GRPOTrainer for it."
        )
    if args.use_vllm and args.vllm_importance_sampling_correction:
        raise ValueError(
            "SSPOGRPOTrainer cannot apply vLLM's per-token importance weights: set "
            "vllm_importance_sampling_correction=False (or use trl.GRPOTrainer)."
        )
    refused = {
        "delta": args.delta is not None,
        "top_entropy_quantile": args.top_entropy_quantile < 1.0,
        "off_policy_mask_threshold": args.off_policy_mask_threshold is not None,
        "use_adaptive_entropy": args.use_adaptive_entropy,
    }
    for name, bad in refused.items():
        if bad:
            raise ValueError(
                f"SSPOGRPOTrainer does not support {name}={getattr(args, name)!r}; leave it at its default"
            )
    if args.beta != 0.0 and args.use_bias_correction_kl:
        raise ValueError(
            "SSPOGRPOTrainer computes TRL's k3 KL term without the ratio weighting of use_bias_correction_kl: "
            f"set use_bias_correction_kl=False with beta={args.beta} (or beta=0)."
        )
    if args.entropy_coef != 0.0 and args.loss_type != "bnpo":
        raise ValueError(
            f"SSPOGRPOTrainer applies entropy_coef with the loss's own aggregation, which equals TRL's token-mean "
            f"entropy bonus only for loss_type='bnpo'; got entropy_coef={args.entropy_coef} with "
            f"loss_type={args.loss_type!r}."
        )
    g = getattr(args, "granularity", None)
    if g in ("subsentence", "sentence") and args.loss_type == "luspo":
        raise ValueError("loss_type='luspo' is a sequence-level loss; use granularity='sequence' or None with it")


class SSPOGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with the policy loss of sspo_kernels; same constructor, `args` an `SSPOGRPOConfig`
    (a plain `GRPOConfig` means all package options at their defaults)."""

    def __init__(self, *a: Any, args: GRPOConfig | None = None, **kw: Any) -> None:
        if args is not None:
            if not isinstance(args, GRPOConfig):
                raise TypeError(f"args must be an SSPOGRPOConfig (or GRPOConfig), got {type(args).__name__}")
            check_options("SSPOGRPOConfig", _sspo_fields(args))
            _refuse_unsupported(args)
        super().__init__(*a, args=args, **kw)
        if args is None:
            _refuse_unsupported(self.args)
        self._check_model()
        self._sspo_redirect = _ForwardRedirection()
        self._sspo_boundary: torch.Tensor | None = None
        granularity = self._sspo_granularity()
        if granularity in ("subsentence", "sentence"):
            vocab = self._sspo_lm().get_output_embeddings().weight.shape[0]
            chars = getattr(self.args, "boundary_chars", None)
            self._sspo_boundary = build_boundary(text_tokenizer(self.processing_class), granularity, chars, vocab)

    # ------------------------------------------------------------------ setup

    def _sspo_lm(self) -> torch.nn.Module:
        """The causal LM under PEFT / accelerate wrappers (the module with the backbone and the output layer)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if is_peft_model(model) else model

    def _check_model(self) -> None:
        lm = self._sspo_lm()
        config = lm.config
        text_config = config.get_text_config()
        if text_config is not config:
            raise ValueError("SSPOGRPOTrainer supports text-only causal LMs, not vision-language models")
        if self.aux_loss_enabled:
            raise ValueError("SSPOGRPOTrainer does not add the MoE router aux loss: set router_aux_loss_coef=0")
        for name in _LOGIT_TRANSFORMS:
            value = getattr(text_config, name, None)
            if value is not None and value != 1.0:
                raise ValueError(f"SSPOGRPOTrainer cannot reproduce the model's {name}={value} on its logits")
        if getattr(text_config, "logits_scaling", None) not in (None, 1.0):
            raise ValueError("SSPOGRPOTrainer cannot reproduce the model's logits_scaling on its logits")
        if getattr(lm, "peft_config", None) and any(
            getattr(c, "is_prompt_learning", False) for c in lm.peft_config.values()
        ):
            raise ValueError("SSPOGRPOTrainer does not support prompt-learning PEFT adapters")
        head = lm.get_output_embeddings()
        if head is None or not hasattr(head, "weight") or hasattr(head, "base_layer"):
            raise ValueError("SSPOGRPOTrainer needs a plain output layer (no PEFT adapter on lm_head)")
        zero3 = getattr(self.accelerator.state, "deepspeed_plugin", None) is not None and (
            self.accelerator.state.deepspeed_plugin.zero_stage == 3
        )
        opts = self._sspo_options(granularity_only=True)
        adaptive = opts["granularity"] not in ("token", "sequence") and opts.get("entropy_gamma", 0.5) != 0
        if zero3 and adaptive and opts.get("entropy_ref") is None:
            raise ValueError(
                "with DeepSpeed ZeRO-3 the loss must run in one pass: set SSPOGRPOConfig.entropy_ref to a number "
                "or entropy_gamma=0"
            )

    def _sspo_granularity(self) -> str:
        return getattr(self.args, "granularity", None) or self.importance_sampling_level

    def _sspo_options(self, granularity_only: bool = False) -> dict[str, Any]:
        """Keyword options of `sspo_loss_from_hidden` that do not depend on the batch."""
        fields = _sspo_fields(self.args)
        g = self._sspo_granularity()
        follow_trl = g in ("token", "sequence")
        opts = {
            "granularity": g,
            "eps_low": fields["eps_low"] if fields["eps_low"] is not None or not follow_trl else self.epsilon_low,
            "eps_high": fields["eps_high"] if fields["eps_high"] is not None or not follow_trl else self.epsilon_high,
            "entropy_gamma": fields["entropy_gamma"],
            "k_min": fields["k_min"],
            "k_max": fields["k_max"],
            "entropy_ref": fields["entropy_ref"],
            "adapt_low": fields["adapt_low"],
            "adapt_high": fields["adapt_high"],
            "log_ratio_clamp": fields["log_ratio_clamp"],
            "backend": fields["backend"],
        }
        if granularity_only:
            return drop_none(opts)
        opts.update(temperature=self.temperature, chunk_size=getattr(self.args, "sspo_chunk_size", None))
        if self._sspo_boundary is not None:
            opts["boundary"] = self._sspo_boundary
        return drop_none(opts)

    def _sspo_aggregation(self, inputs: dict[str, Any], batch: int, train: bool) -> tuple[dict[str, Any], float]:
        """(aggregation options, divisor of the loss) that reproduce TRL's normalisation of `self.loss_type`."""
        accum = self.current_gradient_accumulation_steps if train else 1
        if self.loss_type == "dapo":
            # the global token count of the generation batch, rescaled to one process and one accumulation window
            norm = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:
                norm = norm * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return {"loss_agg_mode": "token-mean", "normalizer": norm}, 1.0
        if self.loss_type == "bnpo":
            return {"loss_agg_mode": "token-mean"}, accum
        # the remaining modes average over all rows, counting the empty (e.g. truncated, masked) ones
        if self.loss_type == "grpo":
            return {"loss_agg_mode": "seq-mean-token-mean", "normalizer": batch}, accum
        if self.loss_type == "dr_grpo":
            mode = {"loss_agg_mode": "seq-mean-token-sum-norm", "norm_len": self.max_completion_length}
            return {**mode, "normalizer": batch}, accum
        return {"loss_agg_mode": "seq-mean-token-sum", "normalizer": batch}, accum  # luspo

    # ------------------------------------------------------------------ loss

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
        hidden = hidden.to(device=weight.device, dtype=weight.dtype)
        with torch.autocast(hidden.device.type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
            return sspo_loss_from_hidden(hidden, weight, completion_ids, bias=bias, **loss_kw)

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
        if torch.is_grad_enabled() or compute_aux_loss or multimodal or not _plain_text_head(lm):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra,
            )  # fmt: skip
        batch_size = batch_size or input_ids.size(0)
        head = functools.partial(self._sspo_logps_inner, lm, logits_to_keep, compute_entropy)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            with self.accelerator.autocast():
                logp, entropy = self._sspo_redirect(model, unwrapped, head, input_ids[rows], attention_mask[rows])
            logps.append(logp)
            entropies.append(entropy)
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

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
        # TRL's head: fp32 with cast_lm_head_to_fp32, else the autocast dtype when autocast is on, else hidden's
        if getattr(self.args, "cast_lm_head_to_fp32", False):
            dtype = torch.float32
        elif torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = hidden.dtype
        with torch.autocast(device.type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
            return token_logprobs_from_hidden(
                hidden.to(device=device, dtype=dtype), weight.to(dtype), tokens.to(device),
                bias=None if bias is None else bias.to(dtype), temperature=self.temperature, entropy=compute_entropy,
                chunk_size=getattr(self.args, "sspo_chunk_size", None), backend=_sspo_fields(self.args)["backend"],
            )  # fmt: skip

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Same signature and `inputs` as `GRPOTrainer._compute_loss`; returns the scalar loss to backpropagate."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        train = self.model.training
        agg, divisor = self._sspo_aggregation(inputs, completion_ids.size(0), train)
        loss_kw = {
            **self._sspo_options(),
            **agg,
            "old_logprobs": inputs.get("old_per_token_logps"),  # None: on-policy (ratio 1, gradient A * grad l)
            "advantages": inputs["advantages"],
            "mask": mask,
        }
        if self.beta != 0.0:
            loss_kw.update(beta=self.beta, ref_logprobs=inputs["ref_per_token_logps"])
        if self.entropy_coef != 0.0:
            loss_kw["entropy_coef"] = self.entropy_coef
        unwrapped = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():
            out = self._sspo_redirect(
                model, unwrapped, self._sspo_inner, input_ids, attention_mask, completion_ids, **loss_kw
            )
        self._sspo_log(out, mask, inputs, train)
        return out.loss / divisor

    # ------------------------------------------------------------------ metrics

    def _sspo_log(self, out: Any, mask: torch.Tensor, inputs: dict[str, Any], train: bool) -> None:
        """The package's metrics under TRL's names (token-weighted means over all processes) plus `sspo/*`."""
        mode = "train" if train else "eval"
        m = out.metrics
        count = mask.sum().to(torch.float32)
        names = {
            "entropy": "entropy_mean",
            "clip_ratio/low_mean": "clip_frac_low",
            "clip_ratio/high_mean": "clip_frac_high",
            "clip_ratio/region_mean": "clip_frac",
        }
        sums = [m[key].to(torch.float32) * count for key in names.values()]
        if self.beta != 0.0:
            d = inputs["ref_per_token_logps"] - out.logprobs
            sums.append(((torch.exp(d) - d - 1) * mask).sum().to(torch.float32))
        totals = self.accelerator.reduce(torch.stack([*sums, count]), reduction="sum")
        means = (totals[:-1] / totals[-1].clamp(min=1.0)).tolist()
        for name, value in zip([*names, "kl"], means):
            self._metrics[mode][name].append(value)
        for key in ("ratio_mean", "ratio_min", "ratio_max", "approx_kl", "num_segments", "mean_segment_len"):
            value = self.accelerator.gather(m[key].detach().to(torch.float32).reshape(1)).mean().item()
            self._metrics[mode][f"sspo/{key}"].append(value)
        if self.entropy_coef != 0.0:
            policy = out.loss.detach() + self.entropy_coef * m["entropy_mean"]
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
            if train and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
