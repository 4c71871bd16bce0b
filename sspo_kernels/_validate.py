"""One validation layer for every entry point: it checks a call's tensors against a `Layout` (the
per-token shape, the vocabulary size and the device) and flattens the per-token ones into a
`FlatBatch` of `(N,)` tensors.

The layout comes from the tensor that carries the vocabulary: `logits_layout`, `hidden_layout` (hidden
states and the output projection) or `logprobs_layout` (per-token log-probs computed elsewhere). Every
error names the offending argument; a wrong Python or tensor type (including a dtype) is a TypeError,
a wrong shape, value or device a ValueError. Nothing here reads a value back from a CUDA device:
checks that depend on tensor contents run there as device-side asserts (`device_check`).
"""

from __future__ import annotations

import math

import torch

from sspo_kernels._options import finite_number
from sspo_kernels._types import FlatBatch, Layout, LossConfig

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def side_table(name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small side input (boundary table, cu_seqlens, a normaliser or entropy reference tensor): on the
    logits' device, or on the CPU and copied there without a host sync (tables are built on the host
    once); any other device is an error. Contiguous: the fused kernels index it as a flat array."""
    if t.device != device and t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}; keep it on the CPU or that device")
    return t.to(device, non_blocking=True).contiguous()


def _same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}; move it to the same device")


def _token_tensor(name: str, value: object, shape: torch.Size, device: torch.device, kind: str) -> torch.Tensor:
    t = _tensor(name, value)
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (the per-token shape), got {tuple(t.shape)}")
    _same_device(name, t, device)
    if kind == "float" and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if kind == "int" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return flat(t)


def entropy_ref_on(cfg: LossConfig, device: torch.device) -> torch.Tensor:
    """A tensor `entropy_ref` (0-d fp32) on `device`: copied there from the CPU without a host sync."""
    return side_table("entropy_ref", cfg.entropy_ref, device)


def flat(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous (numel,) tensor: a view when it already is one, else a copy. The fused kernels
    index per-token inputs as flat arrays, so a strided view (a slice of a (B, T, 2) buffer, an
    expanded or transposed tensor) must never reach them as it is."""
    return t.reshape(-1).contiguous()


def device_check(ok: torch.Tensor, message: str) -> None:
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
    token_shape: torch.Size | tuple[int, ...],
    cu_seqlens: torch.Tensor | None,
    device: torch.device,
    *,
    with_ids: bool = True,
) -> tuple[int, int | None, torch.Tensor | None]:
    """(number of responses, padded length T or None when packed, (N,) int64 response id of each token,
    or None without `with_ids`).

    Responses are the rows of a padded `(B, T)` batch, the `cu_seqlens` spans of a packed `(total,)`
    one, or a single response for a flat `(N,)` batch without `cu_seqlens`.
    """
    n = math.prod(token_shape)
    if cu_seqlens is not None:
        cu = _tensor("cu_seqlens", cu_seqlens)
        if len(token_shape) != 1:
            raise ValueError("cu_seqlens describes a packed batch: inputs must then be (total, ...), tokens (total,)")
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with B + 1 >= 2 offsets, got shape {tuple(cu.shape)}")
        if cu.is_floating_point() or cu.dtype == torch.bool:
            raise TypeError(f"cu_seqlens must be an integer tensor, got {cu.dtype}")
        cu = side_table("cu_seqlens", cu, device).long()
        if with_ids:  # without ids (a lean batch) the fused segment step checks it, in the same launch
            ok = (cu[0] == 0) & (cu[-1] == n) & (cu[1:] >= cu[:-1]).all()
            device_check(ok, f"cu_seqlens must start at 0, be non-decreasing and end at the token count {n}")
        ids = torch.searchsorted(cu[1:], torch.arange(n, device=device), right=True) if with_ids else None
        return cu.numel() - 1, None, ids
    if len(token_shape) == 2:
        batch, seq_len = token_shape
        return batch, seq_len, torch.arange(n, device=device) // max(seq_len, 1) if with_ids else None
    return 1, n, torch.zeros(n, dtype=torch.int64, device=device) if with_ids else None


def token_range_message(bound: int) -> str:
    return f"tokens must lie in [0, {bound}) at masked-in positions (ids outside are allowed only where mask is 0)"


def logits_layout(logits: object) -> tuple[torch.Tensor, Layout]:
    """The logits (a copy only when the last stride is not 1) and the layout they describe."""
    logits = _tensor("logits", logits)
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (N, V) or (B, T, V), got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits, Layout(tuple(logits.shape[:-1]), logits.shape[-1], logits.device)


def hidden_layout(hidden: object, weight: object, bias: object, cu_seqlens: object) -> Layout:
    """The layout of the logits z = hidden @ weight.T (+ bias), checked without building them."""
    hidden, weight = _tensor("hidden", hidden), _tensor("weight", weight)
    if hidden.dtype not in HIDDEN_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (N, H), (B, T, H) or packed (total, H), got shape {tuple(hidden.shape)}")
    if cu_seqlens is not None and hidden.dim() != 2:
        raise ValueError("cu_seqlens describes a packed batch: hidden must then be (total, H)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be (V, H) with H = {hidden.shape[-1]} and V >= 1, got {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"bias must be a ({weight.shape[0]},) tensor, got {getattr(bias, 'shape', bias)!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}; cast them to one dtype")
        _same_device(name, t, hidden.device)
    return Layout(tuple(hidden.shape[:-1]), weight.shape[0], hidden.device)


def logprobs_layout(logprobs: object, entropy: object) -> Layout:
    """The layout of per-token log-probs (and their entropies) computed by the caller."""
    logprobs = _tensor("logprobs", logprobs)
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be a floating-point tensor, got {logprobs.dtype}")
    if logprobs.dim() not in (1, 2):
        raise ValueError(f"logprobs must be (B, T) or (N,), got shape {tuple(logprobs.shape)}")
    if entropy is not None:
        _token_tensor("entropy", entropy, logprobs.shape, logprobs.device, "float")
    return Layout(tuple(logprobs.shape), None, logprobs.device)


def _per_token_or_response(
    name: str,
    value: object,
    token_shape: torch.Size,
    num_responses: int,
    response_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """(N,) values from per-token or per-response ones (advantages, policy weights); per-response ones
    stay (B,) without `response_ids` (a lean batch)."""
    t = _tensor(name, value)
    _same_device(name, t, device)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    n = math.prod(token_shape)
    # Shaped like tokens means per token, also in the ambiguous case of a packed batch with N == B.
    if t.shape == token_shape:
        return flat(t)
    elif t.shape == (num_responses,) and response_ids is None:
        return t.contiguous()
    elif t.shape == (num_responses,):
        return t[response_ids.clamp(max=max(num_responses - 1, 0))] if n else t[:0]
    else:
        raise ValueError(
            f"{name} must be per response {(num_responses,)} or per token {tuple(token_shape)}, got {tuple(t.shape)}"
        )


def policy_weights_message() -> str:
    return "policy_weights must be finite and >= 0 at masked-in tokens"


def prepare_inputs(
    cfg: LossConfig,
    layout: Layout,
    tokens: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    boundary: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    norm_len: int | float | None = None,
    policy_weights: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    entropy_mask_group: object | None = None,
    lean: bool = False,
) -> FlatBatch:
    """Check every tensor argument against the layout and flatten the per-token ones to `(N,)`.

    `old_logprobs=None` means on-policy: the rollout policy is the current one; `advantages=None` is
    for callers that only label segments (`sspo_kernels.segment_ids`). `lean=True` leaves to a fused
    segment step what it does itself (see `FlatBatch.lean`): fewer device ops."""
    device, token_shape = layout.device, torch.Size(layout.token_shape)
    vocab = layout.vocab_size

    tokens_f = _token_tensor("tokens", tokens, token_shape, device, "int").long()
    old_f = None
    if old_logprobs is not None:
        old_f = _token_tensor("old_logprobs", old_logprobs, token_shape, device, "float")
    mask = _tensor("mask", mask)
    if mask.shape != token_shape:
        raise ValueError(f"mask must have shape {tuple(token_shape)}, got {tuple(mask.shape)}")
    _same_device("mask", mask, device)
    if mask.is_complex():
        raise TypeError(f"mask must be bool or 0/1 numbers, got {mask.dtype}")
    mask_f = mask.reshape(-1) != 0  # a new, contiguous tensor

    num_responses, seq_len, response_ids = response_layout(token_shape, cu_seqlens, device, with_ids=not lean)

    adv_f = None
    if advantages is not None:
        adv_f = _per_token_or_response("advantages", advantages, token_shape, num_responses, response_ids, device)

    weights_f = None
    if policy_weights is not None:  # never differentiated: data, like the advantages
        weights_f = _per_token_or_response(
            "policy_weights", policy_weights, token_shape, num_responses, response_ids, device
        ).detach()
        if not lean:  # a lean batch leaves this check to the fused step
            w = weights_f if weights_f.shape[0] == math.prod(token_shape) else weights_f[:0]
            ok = (torch.isfinite(w) & (w >= 0)) | ~mask_f if w.numel() else torch.ones((), dtype=torch.bool)
            device_check(ok.all(), policy_weights_message())
    rollout_f = None
    if rollout_logprobs is not None:
        rollout_f = _token_tensor("rollout_logprobs", rollout_logprobs, token_shape, device, "float").detach()
        if cfg.objective == "vespo" and cfg.rollout_is not in ("token", None):
            raise ValueError(
                "objective='vespo' folds token-level rollout weights into its own weight: with rollout_logprobs, "
                f"rollout_is must be 'token' (or None), got {cfg.rollout_is!r}"
            )
    if entropy_mask_group is not None and cfg.entropy_mask_quantile is None:
        raise ValueError("entropy_mask_group is given without entropy_mask_quantile (the group sets its quantile)")

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
        if boundary.dim() != 1 or (vocab is not None and boundary.shape != (vocab,)):
            raise ValueError(
                f"boundary must have shape ({vocab or 'V'},) (one entry per vocab id), got {tuple(boundary.shape)}"
            )
        if boundary.dtype != torch.bool:
            raise TypeError(f"boundary must be a bool tensor, got {boundary.dtype}")
        boundary = side_table("boundary", boundary, device)
    else:
        boundary = None

    # with log-probs given directly only the boundary table bounds the ids (a lookup index)
    bound = vocab if vocab is not None else boundary.shape[0] if boundary is not None else None
    if bound is not None and not lean:
        in_range = (tokens_f >= 0) & (tokens_f < bound)
        device_check((in_range | ~mask_f).all(), token_range_message(bound))

    if isinstance(cfg.entropy_ref, torch.Tensor):
        entropy_ref_on(cfg, device)  # the device check only; the step moves it when it reads it

    norm_t = None
    if normalizer is not None:
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(
                    f"normalizer must be a number or a one-element tensor, got shape {tuple(normalizer.shape)}"
                )
            if not (normalizer.is_floating_point() or normalizer.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"normalizer must be a floating-point or integer tensor, got {normalizer.dtype}")
            norm_t = side_table("normalizer", normalizer, device).reshape(()).float()
            # never hide a NaN or a negative count; 0 means every rank is empty and gives a zero loss
            device_check(
                torch.isfinite(norm_t) & (norm_t >= 0), "normalizer must be finite and >= 0 (0: an empty batch)"
            )
            norm_t = torch.where(norm_t > 0, norm_t, torch.ones_like(norm_t))
        else:
            norm_t = torch.full((), finite_number("normalizer", normalizer, positive=True), device=device)
    if cfg.loss_agg_mode == "seq-mean-token-sum-norm":
        if norm_len is None and seq_len is None:
            raise ValueError('loss_agg_mode="seq-mean-token-sum-norm" on a packed batch needs norm_len')
        norm_len = float(seq_len if norm_len is None else finite_number("norm_len", norm_len, positive=True))
    elif norm_len is not None:
        norm_len = finite_number("norm_len", norm_len, positive=True)

    return FlatBatch(
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
        cu_seqlens=None if cu_seqlens is None else side_table("cu_seqlens", cu_seqlens, device).long(),
        lean=lean,
        token_bound=bound,
        policy_weights=weights_f,
        rollout_logprobs=rollout_f,
        entropy_mask_group=entropy_mask_group,
    )
