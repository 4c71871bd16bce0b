"""Argument validation and flattening shared by every path (and by the slow reference).

`make_config` turns the keyword options into a frozen `LossConfig` with the per-granularity defaults
filled in; `prepare_inputs` checks the tensors and flattens them into a `FlatBatch` of `(N,)` token
tensors. Every error names the offending argument. Nothing here reads a value back from the device:
checks that depend on tensor contents run on the device (`torch._assert_async`) for CUDA tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

GRANULARITIES = ("subsentence", "sentence", "sequence", "token", "segments")
AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "sum",
    "none",
)
RATIO_GRADS = ("exact", "token")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

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


@dataclass(frozen=True)
class LossConfig:
    """Every scalar option of the loss, with the defaults resolved (see SPEC.md)."""

    granularity: str
    eps_low: float
    eps_high: float
    entropy_gamma: float
    k_min: float
    k_max: float
    entropy_ref: str | float
    adapt_low: bool
    adapt_high: bool
    dual_clip: float | None
    beta: float
    entropy_coef: float
    temperature: float
    loss_agg_mode: str
    log_ratio_clamp: float
    ratio_grad: str


def _finite_number(name: str, value: object, *, positive: bool = False, nonneg: bool = False) -> float:
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


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value  # type: ignore[return-value]


def make_config(
    granularity: str = "subsentence",
    *,
    eps_low: float | None = None,
    eps_high: float | None = None,
    entropy_gamma: float | None = None,
    k_min: float | None = None,
    k_max: float | None = None,
    entropy_ref: str | float = "batch",
    adapt_low: bool = True,
    adapt_high: bool = True,
    dual_clip: float | None = None,
    beta: float = 0.0,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg_mode: str = "token-mean",
    log_ratio_clamp: float = 20.0,
    ratio_grad: str = "exact",
) -> LossConfig:
    """Validate the scalar options and fill the per-granularity defaults."""
    granularity = _choice("granularity", granularity, GRANULARITIES)
    d = _DEFAULTS[granularity]
    eps_low = _finite_number("eps_low", d["eps_low"] if eps_low is None else eps_low, nonneg=True)
    eps_high = _finite_number("eps_high", d["eps_high"] if eps_high is None else eps_high, nonneg=True)
    gamma = d["entropy_gamma"] if entropy_gamma is None else entropy_gamma
    gamma = _finite_number("entropy_gamma", gamma)
    k_min = _finite_number("k_min", d["k_min"] if k_min is None else k_min, nonneg=True)
    k_max = _finite_number("k_max", d["k_max"] if k_max is None else k_max, nonneg=True)
    if k_min > k_max:
        raise ValueError(f"k_min ({k_min}) must be <= k_max ({k_max})")
    if isinstance(entropy_ref, str):
        _choice("entropy_ref", entropy_ref, ("batch",))
    else:
        entropy_ref = _finite_number("entropy_ref", entropy_ref, nonneg=True)
    if dual_clip is not None:
        dual_clip = _finite_number("dual_clip", dual_clip)
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (verl's clip_ratio_c), got {dual_clip}")
    for name, flag in (("adapt_low", adapt_low), ("adapt_high", adapt_high)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    return LossConfig(
        granularity=granularity,
        eps_low=eps_low,
        eps_high=eps_high,
        entropy_gamma=gamma,
        k_min=k_min,
        k_max=k_max,
        entropy_ref=entropy_ref,
        adapt_low=adapt_low,
        adapt_high=adapt_high,
        dual_clip=dual_clip,
        beta=_finite_number("beta", beta, nonneg=True),
        entropy_coef=_finite_number("entropy_coef", entropy_coef, nonneg=True),
        temperature=_finite_number("temperature", temperature, positive=True),
        loss_agg_mode=_choice("loss_agg_mode", loss_agg_mode, AGG_MODES),
        log_ratio_clamp=_finite_number("log_ratio_clamp", log_ratio_clamp, positive=True),
        ratio_grad=_choice("ratio_grad", ratio_grad, RATIO_GRADS),
    )


class SSPOOutput(NamedTuple):
    """What every path returns (SPEC "Outputs")."""

    loss: torch.Tensor  # 0-d, or per token (shaped like tokens) for loss_agg_mode="none"
    logprobs: torch.Tensor  # per-token l_t, detached, zero where masked out
    entropy: torch.Tensor  # per-token H_t, detached, zero where masked out
    metrics: dict[str, torch.Tensor]  # detached device tensors, never Python floats


def config_from(options: dict[str, object]) -> LossConfig:
    """`make_config` from a mapping holding every LossConfig field by name, e.g. a public function's
    `locals()` (whose keyword arguments mirror the fields)."""
    return make_config(**{name: options[name] for name in LossConfig.__dataclass_fields__})


@dataclass
class FlatBatch:
    """The per-token inputs flattened to `(N,)`, on the logits' device, in the dtypes given.

    `logits` keeps the caller's layout, `(N, V)` or `(B, T, V)` with a unit last stride, so kernels
    can read rows through strides without a copy; `logits_2d` is the `(N, V)` view (or copy when
    the strides do not allow a view).
    """

    logits: torch.Tensor
    tokens: torch.Tensor  # (N,) int64, -100 allowed where masked out
    mask: torch.Tensor  # (N,) bool
    old_logprobs: torch.Tensor  # (N,) floating
    advantages: torch.Tensor  # (N,) floating, broadcast from per-response values when needed
    ref_logprobs: torch.Tensor | None  # (N,) floating
    response_ids: torch.Tensor  # (N,) int64 response index of each token
    segment_ids: torch.Tensor | None  # (N,) int64, caller-given ids for granularity "segments"
    boundary: torch.Tensor | None  # (V,) bool
    num_responses: int
    seq_len: int | None  # T of a padded batch (the default norm_len), None for a packed one
    token_shape: tuple[int, ...]  # shape of the per-token outputs: (B, T) or (N,)
    normalizer: torch.Tensor | None  # 0-d float32 caller-given normaliser, or None
    norm_len: float | None

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[-1]

    @property
    def logits_2d(self) -> torch.Tensor:
        return self.logits.reshape(-1, self.logits.shape[-1])


def _tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _side_table(name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small side input (boundary table, cu_seqlens, normaliser): on the logits' device, or on the
    CPU and copied there (tables are built on the host once); any other device is an error."""
    if t.device != device and t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device} but logits are on {device}; keep it on the CPU or that device")
    return t.to(device, non_blocking=True)


def _same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits are on {device}; move it to the same device")


def _token_tensor(name: str, value: object, shape: torch.Size, device: torch.device, kind: str) -> torch.Tensor:
    t = _tensor(name, value)
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (logits without the vocab dim), got {tuple(t.shape)}")
    _same_device(name, t, device)
    if kind == "float" and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if kind == "int" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return t.reshape(-1)


def _device_check(ok: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless the 0-d bool `ok` holds, without a host sync on CUDA.

    On the CPU in eager mode reading `ok` costs nothing, so the error is raised at once; on other
    devices and under torch.compile the check runs as a device-side assert instead.
    """
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def response_layout(
    token_shape: torch.Size | tuple[int, ...], cu_seqlens: torch.Tensor | None, device: torch.device
) -> tuple[int, int | None, torch.Tensor]:
    """(number of responses, padded length T or None when packed, (N,) int64 response id of each token).

    Responses are the rows of a padded `(B, T)` batch, the `cu_seqlens` spans of a packed `(total,)`
    one, or a single response for a flat `(N,)` batch without `cu_seqlens`.
    """
    n = math.prod(token_shape)
    if cu_seqlens is not None:
        cu = _tensor("cu_seqlens", cu_seqlens)
        if len(token_shape) != 1:
            raise ValueError("cu_seqlens describes a packed batch: logits must then be (total, V), tokens (total,)")
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with B + 1 >= 2 offsets, got shape {tuple(cu.shape)}")
        if cu.is_floating_point() or cu.dtype == torch.bool:
            raise TypeError(f"cu_seqlens must be an integer tensor, got {cu.dtype}")
        cu = _side_table("cu_seqlens", cu, device).long()
        ok = (cu[0] == 0) & (cu[-1] == n) & (cu[1:] >= cu[:-1]).all()
        _device_check(ok, f"cu_seqlens must start at 0, be non-decreasing and end at the token count {n}")
        return cu.numel() - 1, None, torch.searchsorted(cu[1:], torch.arange(n, device=device), right=True)
    if len(token_shape) == 2:
        batch, seq_len = token_shape
        return batch, seq_len, torch.arange(n, device=device) // max(seq_len, 1)
    return 1, n, torch.zeros(n, dtype=torch.int64, device=device)


def prepare_inputs(
    cfg: LossConfig,
    logits: torch.Tensor,
    tokens: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    boundary: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    norm_len: int | float | None = None,
) -> FlatBatch:
    """Check every tensor argument against the logits and flatten the per-token ones to `(N,)`."""
    logits = _tensor("logits", logits)
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (N, V) or (B, T, V), got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    device = logits.device
    token_shape = logits.shape[:-1]
    n = math.prod(token_shape)
    vocab = logits.shape[-1]

    tokens_f = _token_tensor("tokens", tokens, token_shape, device, "int").long()
    old_f = _token_tensor("old_logprobs", old_logprobs, token_shape, device, "float")
    mask = _tensor("mask", mask)
    if mask.shape != token_shape:
        raise ValueError(f"mask must have shape {tuple(token_shape)}, got {tuple(mask.shape)}")
    _same_device("mask", mask, device)
    if mask.is_complex():
        raise TypeError(f"mask must be bool or 0/1 numbers, got {mask.dtype}")
    mask_f = mask.reshape(-1) != 0

    num_responses, seq_len, response_ids = response_layout(token_shape, cu_seqlens, device)

    adv = _tensor("advantages", advantages)
    _same_device("advantages", adv, device)
    if not adv.is_floating_point():
        raise TypeError(f"advantages must be a floating-point tensor, got {adv.dtype}")
    # Shaped like tokens means per token, also in the ambiguous case of a packed batch with N == B.
    if adv.shape == token_shape:
        adv_f = adv.reshape(-1)
    elif adv.shape == (num_responses,):
        adv_f = adv[response_ids.clamp(max=max(num_responses - 1, 0))] if n else adv[:0]
    else:
        raise ValueError(
            f"advantages must be per response {(num_responses,)} or per token {tuple(token_shape)}, "
            f"got {tuple(adv.shape)}"
        )

    ref_f = None
    if cfg.beta > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0 (the KL term needs the reference policy)")
    if ref_logprobs is not None:
        ref_f = _token_tensor("ref_logprobs", ref_logprobs, token_shape, device, "float")

    seg_f = None
    if cfg.granularity == "segments":
        if segment_ids is None:
            raise ValueError('granularity="segments" needs segment_ids, an integer tensor shaped like tokens')
        seg_f = _token_tensor("segment_ids", segment_ids, token_shape, device, "int").long()
    elif segment_ids is not None:
        raise ValueError(f'segment_ids is only used with granularity="segments", not {cfg.granularity!r}')

    if cfg.granularity in ("subsentence", "sentence"):
        if boundary is None:
            raise ValueError(
                f"granularity={cfg.granularity!r} needs boundary, a (V,) bool table of boundary tokens: "
                "build it once with sspo_kernels.boundary_table(tokenizer)"
                + (" (or boundary_table(tokenizer, chars=SENTENCE_CHARS))" if cfg.granularity == "sentence" else "")
            )
        boundary = _tensor("boundary", boundary)
        if boundary.shape != (vocab,):
            raise ValueError(
                f"boundary must have shape ({vocab},) (one entry per vocab id), got {tuple(boundary.shape)}"
            )
        if boundary.dtype != torch.bool:
            raise TypeError(f"boundary must be a bool tensor, got {boundary.dtype}")
        boundary = _side_table("boundary", boundary, device)
    else:
        boundary = None

    in_range = (tokens_f >= 0) & (tokens_f < vocab)
    _device_check(
        (in_range | ~mask_f).all(),
        f"tokens must lie in [0, {vocab}) at masked-in positions (ids outside are allowed only where mask is 0)",
    )

    norm_t = None
    if normalizer is not None:
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(
                    f"normalizer must be a number or a one-element tensor, got shape {tuple(normalizer.shape)}"
                )
            norm_t = _side_table("normalizer", normalizer, device).reshape(()).float()
            # a global count of 0 (every rank empty) must give a zero loss, not 0 / 0
            norm_t = torch.where(norm_t > 0, norm_t, torch.ones_like(norm_t))
        else:
            norm_t = torch.full((), _finite_number("normalizer", normalizer, positive=True), device=device)
    if cfg.loss_agg_mode == "seq-mean-token-sum-norm":
        if norm_len is None and seq_len is None:
            raise ValueError('loss_agg_mode="seq-mean-token-sum-norm" on a packed batch needs norm_len')
        norm_len = float(seq_len if norm_len is None else _finite_number("norm_len", norm_len, positive=True))
    elif norm_len is not None:
        norm_len = _finite_number("norm_len", norm_len, positive=True)

    return FlatBatch(
        logits=logits,
        tokens=tokens_f,
        mask=mask_f,
        old_logprobs=old_f,
        advantages=adv_f,
        ref_logprobs=ref_f,
        response_ids=response_ids,
        segment_ids=seg_f,
        boundary=boundary,
        num_responses=num_responses,
        seq_len=seq_len,
        token_shape=tuple(token_shape),
        normalizer=norm_t,
        norm_len=norm_len,
    )
