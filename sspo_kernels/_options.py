"""The loss's keyword options, defined once.

Each entry point takes its per-token tensors positionally and every option as a keyword. The options
are listed here, in the order the signatures show them; `OptionSet.signature` gives a function the
explicit signature that `help()` and IDEs show, and `OptionSet.parse` checks and fills a call's
keywords. `make_config` validates the scalar ones (the fields of `LossConfig`) and fills the
per-granularity defaults.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch

from sspo_kernels._types import BOUNDED_OBJECTIVES, OBJECTIVES, LossConfig

GRANULARITIES = ("subsentence", "sentence", "sequence", "token", "segments")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "sum", "none")
RATIO_GRADS = ("exact", "token")
ROLLOUT_IS_LEVELS = ("token", "segment", "sequence")
ROLLOUT_IS_MODES = ("truncate", "mask")
BACKENDS = ("auto", "triton", "torch")


class Option(NamedTuple):
    name: str
    default: Any
    annotation: str


_TENSOR = "torch.Tensor | None"
# The options of the loss itself, common to every entry point: the LossConfig fields and the per-call
# side inputs (tensors, normalisers), interleaved in the order the README documents them.
LOSS_OPTIONS = (
    Option("granularity", "subsentence", "str"),
    Option("boundary", None, _TENSOR),
    Option("segment_ids", None, _TENSOR),
    Option("cu_seqlens", None, _TENSOR),
    Option("eps_low", None, "float | None"),
    Option("eps_high", None, "float | None"),
    Option("entropy_gamma", None, "float | None"),
    Option("k_min", None, "float | None"),
    Option("k_max", None, "float | None"),
    Option("entropy_ref", "batch", "str | float | torch.Tensor"),
    Option("adapt_low", True, "bool"),
    Option("adapt_high", True, "bool"),
    Option("dual_clip", None, "float | None"),
    Option("beta", 0.0, "float"),
    Option("ref_logprobs", None, _TENSOR),
    Option("entropy_coef", 0.0, "float"),
    Option("temperature", 1.0, "float"),
    Option("logit_scale", 1.0, "float"),
    Option("logit_softcap", None, "float | None"),
    Option("loss_agg_mode", "token-mean", "str"),
    Option("normalizer", None, "float | torch.Tensor | None"),
    Option("norm_len", None, "int | float | None"),
    Option("log_ratio_clamp", 20.0, "float"),
    Option("ratio_grad", "exact", "str"),
    # the objective (docs/loss.md "Objectives"); its own parameters default to None: the objective's values
    Option("objective", "clip", "str"),
    Option("sapo_tau_pos", None, "float | None"),
    Option("sapo_tau_neg", None, "float | None"),
    Option("vespo_k_pos", None, "float | None"),
    Option("vespo_lambda_pos", None, "float | None"),
    Option("vespo_k_neg", None, "float | None"),
    Option("vespo_lambda_neg", None, "float | None"),
    # off-policy corrections (docs/loss.md "Off-policy corrections")
    Option("policy_weights", None, _TENSOR),
    Option("rollout_logprobs", None, _TENSOR),
    Option("rollout_is", "sequence", "str | None"),
    Option("rollout_is_mode", "mask", "str"),
    Option("rollout_is_min", None, "float | None"),
    Option("rollout_is_max", 3.0, "float | None"),
    Option("off_policy_mask", None, "float | None"),
    Option("entropy_mask_quantile", None, "float | None"),
    Option("entropy_mask_group", None, "torch.distributed.ProcessGroup | None"),
    Option("kl_ratio_weight", False, "bool"),
)
# Options that only mean something with `rollout_logprobs` (an error when given without it).
ROLLOUT_IS_OPTIONS = ("rollout_is", "rollout_is_mode", "rollout_is_min", "rollout_is_max")
# Options of one entry point's implementation.
LOGITS_OPTIONS = (
    Option("inplace_backward", False, "bool"),
    Option("backend", "auto", "str"),
    Option("chunk_size", None, "int | None"),
    Option("compile_chunks", False, "bool"),
)
HIDDEN_OPTIONS = (
    Option("backend", "auto", "str"),
    Option("chunk_size", None, "int | None"),
    Option("single_pass", None, "bool | None"),
)
LOGPROBS_OPTIONS = (Option("backend", "auto", "str"),)
# Multi-process forms (docs/distributed.md); all None: one process, no collective.
_GROUP = "torch.distributed.ProcessGroup | None"
DISTRIBUTED_OPTIONS = (
    Option("tp_group", None, _GROUP),
    Option("vocab_start", None, "int | None"),
    Option("sp_group", None, _GROUP),
    Option("sp_index", None, _TENSOR),
)
HIDDEN_DISTRIBUTED_OPTIONS = (
    Option("tp_group", None, _GROUP),
    Option("vocab_start", None, "int | None"),
    Option("reduce_hidden_grad", False, "bool"),
)

CONFIG_FIELDS = tuple(LossConfig.__dataclass_fields__)

F = TypeVar("F", bound=Callable[..., Any])


class OptionSet:
    """The keyword options of one entry point."""

    def __init__(self, *groups: tuple[Option, ...]):
        self.options = tuple(o for group in groups for o in group)
        self.defaults = {o.name: o.default for o in self.options}

    def signature(self, fn: F) -> F:
        """Give `fn(*tensors, **options)` the signature with every option spelled out (keyword-only)."""
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default, annotation=o.annotation)
                   for o in self.options]  # fmt: skip
        fn.__signature__ = sig.replace(parameters=params)
        return fn

    def parse(self, where: str, given: dict[str, Any]) -> dict[str, Any]:
        """The call's keywords with the defaults filled in; an unknown keyword is a TypeError, as Python's.
        The rollout importance-sampling options given without `rollout_logprobs` are a ValueError."""
        for name in given:
            if name not in self.defaults:
                raise TypeError(f"{where}() got an unexpected keyword argument {name!r}")
        stray = [name for name in ROLLOUT_IS_OPTIONS if name in given]
        if stray and given.get("rollout_logprobs") is None and "rollout_logprobs" in self.defaults:
            raise ValueError(
                f"{', '.join(stray)} given without rollout_logprobs: the rollout importance weight needs the "
                "sampler's log-probs (rollout_logprobs, shaped like tokens)"
            )
        return {**self.defaults, **given}


# ---------------------------------------------------------------- validation of the scalar options

# Clip widths and entropy adaptation per granularity. These are the project's choices, not the
# SSPO paper's (its constants are not available to us); README "Defaults" gives the reasons.
#   token:    DAPO's clip-higher widths (0.2 / 0.28), no entropy adaptation (plain GRPO/DAPO).
#   sequence: GSPO's widths for length-normalised response ratios (3e-4 / 4e-4), no adaptation.
#   subsentence, sentence, segments: the geometric midpoint of the two (sqrt(0.2 * 3e-4) ~ 8e-3,
#   sqrt(0.28 * 4e-4) ~ 1.1e-2), with a gentle entropy adaptation: k = (Hbar / H_ref) ** 0.5,
#   bounded to [0.5, 2] so a segment's clip range at most halves or doubles.
_DEFAULTS = {
    "token": dict(eps_low=0.2, eps_high=0.28, entropy_gamma=0.0, k_min=0.5, k_max=2.0),
    "sequence": dict(eps_low=3e-4, eps_high=4e-4, entropy_gamma=0.0, k_min=0.5, k_max=2.0),
    "subsentence": dict(eps_low=8e-3, eps_high=1.1e-2, entropy_gamma=0.5, k_min=0.5, k_max=2.0),
}
_DEFAULTS["sentence"] = _DEFAULTS["subsentence"]
_DEFAULTS["segments"] = _DEFAULTS["subsentence"]
# Other objectives with bounds change the widths at every granularity (README "Objectives" says why):
#   cispo: no lower bound (eps_low = 1: lo = 0) and an upper cap of 5 on the unit's ratio, TRL's
#          recommended epsilon_high for its cispo; the entropy factor scales the cap where it adapts.
#   gmpo:  log-space bounds +-0.4 on each token's log-ratio, the GMPO paper's and verl's geo_mean values.
_OBJECTIVE_WIDTHS = {"cispo": dict(eps_low=1.0, eps_high=4.0), "gmpo": dict(eps_low=0.4, eps_high=0.4)}
# Objectives without bounds take none of the bound options.
_BOUND_OPTIONS = ("eps_low", "eps_high", "entropy_gamma", "k_min", "k_max")
# Each objective's own parameters and their defaults (TRL 1.16's and verl 0.9.1's).
_OBJECTIVE_PARAMS = {
    "sapo": dict(sapo_tau_pos=1.0, sapo_tau_neg=1.05),
    "vespo": dict(vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0),
}


def finite_number(name: str, value: object, *, positive: bool = False, nonneg: bool = False) -> float:
    """`value` as a float; TypeError unless a real number, ValueError unless finite (and > 0 / >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonneg and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


# The smallest sampling temperature accepted. Below it the kernels' fp32 shift of the running max,
# scaled by 1/tau, can overflow to -inf (about 3e-9) and turn an entropy into NaN; no sampler runs there.
MIN_TEMPERATURE = 1e-6


def check_temperature(value: object) -> float:
    """The temperature as a float: a finite number >= MIN_TEMPERATURE, else a TypeError / ValueError."""
    tau = finite_number("temperature", value, positive=True)
    if tau < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE:g} (fp32 range of z = x / tau), got {tau:g}")
    return tau


def choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value  # type: ignore[return-value]


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def make_config(granularity: str = "subsentence", **options: Any) -> LossConfig:
    """Validate the scalar options (any subset of the LossConfig fields; the rest take their
    defaults) and fill the per-granularity defaults."""
    unknown = set(options) - set(CONFIG_FIELDS)
    if unknown:
        raise TypeError(f"make_config() got unexpected options: {', '.join(sorted(unknown))}")
    o = {**{k: LOSS_DEFAULTS[k] for k in CONFIG_FIELDS}, **options}
    granularity = choice("granularity", granularity, GRANULARITIES)
    objective = choice("objective", o["objective"], OBJECTIVES)
    if objective not in BOUNDED_OBJECTIVES:
        given = [k for k in _BOUND_OPTIONS if o[k] is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: objective={objective!r} has no clip bounds")
    d = {**_DEFAULTS[granularity], **_OBJECTIVE_WIDTHS.get(objective, {})}
    if objective not in BOUNDED_OBJECTIVES:  # unused: no bounds, no adaptation
        d = {**d, "eps_low": 0.0, "eps_high": 0.0, "entropy_gamma": 0.0}
    filled = {k: d[k] if o[k] is None else o[k] for k in d}
    params = _objective_params(objective, o)
    eps_low = finite_number("eps_low", filled["eps_low"], nonneg=True)
    eps_high = finite_number("eps_high", filled["eps_high"], nonneg=True)
    gamma = finite_number("entropy_gamma", filled["entropy_gamma"])
    k_min = finite_number("k_min", filled["k_min"], nonneg=True)
    k_max = finite_number("k_max", filled["k_max"], nonneg=True)
    if k_min > k_max:
        raise ValueError(f"k_min ({k_min}) must be <= k_max ({k_max})")
    entropy_ref = o["entropy_ref"]
    if isinstance(entropy_ref, str):
        choice("entropy_ref", entropy_ref, ("batch",))
    elif isinstance(entropy_ref, torch.Tensor):
        entropy_ref = _tensor_entropy_ref(entropy_ref)
    else:
        entropy_ref = finite_number("entropy_ref", entropy_ref, nonneg=True)
    dual_clip = o["dual_clip"]
    if dual_clip is not None:
        dual_clip = finite_number("dual_clip", dual_clip)
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (verl's clip_ratio_c), got {dual_clip}")
        if objective != "clip":
            raise ValueError(f"dual_clip caps the PPO-clip objective only, not objective={objective!r}")
    return LossConfig(
        granularity=granularity,
        eps_low=eps_low,
        eps_high=eps_high,
        entropy_gamma=gamma,
        k_min=k_min,
        k_max=k_max,
        entropy_ref=entropy_ref,
        adapt_low=flag("adapt_low", o["adapt_low"]),
        adapt_high=flag("adapt_high", o["adapt_high"]),
        dual_clip=dual_clip,
        beta=finite_number("beta", o["beta"], nonneg=True),
        entropy_coef=finite_number("entropy_coef", o["entropy_coef"], nonneg=True),
        temperature=check_temperature(o["temperature"]),
        logit_scale=finite_number("logit_scale", o["logit_scale"]),
        logit_softcap=_optional_number("logit_softcap", o["logit_softcap"], positive=True),
        loss_agg_mode=choice("loss_agg_mode", o["loss_agg_mode"], AGG_MODES),
        log_ratio_clamp=finite_number("log_ratio_clamp", o["log_ratio_clamp"], positive=True),
        ratio_grad=choice("ratio_grad", o["ratio_grad"], RATIO_GRADS),
        objective=objective,
        **params,
        **_correction_options(o),
    )


def _objective_params(objective: str, o: dict[str, Any]) -> dict[str, float]:
    """The objective's own parameters (others' given is a ValueError), defaults filled in."""
    own = _OBJECTIVE_PARAMS.get(objective, {})
    for other, params in _OBJECTIVE_PARAMS.items():
        given = [k for k in params if other != objective and o[k] is not None]
        if given:
            raise ValueError(f"{', '.join(given)} belong to objective={other!r}, not {objective!r}")
    out = {}
    for name, default in own.items():
        value = default if o[name] is None else o[name]
        if "tau" in name or "lambda" in name:  # temperatures and rates
            out[name] = finite_number(name, value, positive=True)
        else:
            out[name] = finite_number(name, value, nonneg=True)
    return out


def _optional_number(name: str, value: object, **checks: bool) -> float | None:
    return None if value is None else finite_number(name, value, **checks)


def _correction_options(o: dict[str, Any]) -> dict[str, Any]:
    """The off-policy correction options, checked (docs/loss.md "Off-policy corrections")."""
    rollout_is = o["rollout_is"]
    if rollout_is is not None:
        rollout_is = choice("rollout_is", rollout_is, ROLLOUT_IS_LEVELS)
    low = _optional_number("rollout_is_min", o["rollout_is_min"], nonneg=True)
    high = _optional_number("rollout_is_max", o["rollout_is_max"], nonneg=True)
    if low is not None and high is not None and low > high:
        raise ValueError(f"rollout_is_min ({low}) must be <= rollout_is_max ({high})")
    quantile = _optional_number("entropy_mask_quantile", o["entropy_mask_quantile"])
    if quantile is not None and not 0 < quantile <= 1:
        raise ValueError(f"entropy_mask_quantile must be in (0, 1] (the share of tokens kept), got {quantile}")
    return dict(
        rollout_is=rollout_is,
        rollout_is_mode=choice("rollout_is_mode", o["rollout_is_mode"], ROLLOUT_IS_MODES),
        rollout_is_min=low,
        rollout_is_max=high,
        off_policy_mask=_optional_number("off_policy_mask", o["off_policy_mask"], nonneg=True),
        entropy_mask_quantile=quantile,
        kl_ratio_weight=flag("kl_ratio_weight", o["kl_ratio_weight"]),
    )


def _tensor_entropy_ref(value: torch.Tensor) -> torch.Tensor:
    """A one-element floating tensor (kept on its device, no `.item()`), as a 0-d fp32 tensor; its
    value is checked on the device (finite, >= 0)."""
    if value.numel() != 1 or not value.is_floating_point():
        raise ValueError(f"entropy_ref as a tensor must be one floating-point element, got {value.dtype} {value.shape}")
    from sspo_kernels._validate import device_check  # _validate imports this module

    value = value.detach().reshape(()).float()
    device_check(value.isfinite() & (value >= 0), "entropy_ref must be finite and >= 0")
    return value


LOSS_DEFAULTS = {o.name: o.default for o in LOSS_OPTIONS}


def config_of(options: dict[str, Any]) -> LossConfig:
    """`make_config` from a parsed option dict (which holds every LossConfig field by name)."""
    return make_config(**{name: options[name] for name in CONFIG_FIELDS})
