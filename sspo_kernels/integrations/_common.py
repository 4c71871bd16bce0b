"""Checks and small helpers shared by the trainer adapters (no trainer library is imported here)."""

from __future__ import annotations

import math
from typing import Any

import torch

# Granularities a trainer adapter can set up on its own ("segments" needs caller-made ids).
GRANULARITIES = ("token", "sequence", "subsentence", "sentence")
BACKENDS = ("auto", "torch", "triton")
RATIO_GRADS = ("exact", "token")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_options(where: str, options: dict[str, Any]) -> None:
    """Raise ValueError/TypeError naming the first bad option in `options` (None means "package default").

    `where` prefixes the message (e.g. "SSPOGRPOConfig" or "policy_loss"), so the user sees which config holds it.
    """
    g = options.get("granularity")
    if g is not None and g not in GRANULARITIES:
        raise ValueError(f"{where}.granularity must be one of {GRANULARITIES} (or None), got {g!r}")
    for name in ("eps_low", "eps_high", "entropy_gamma", "k_min", "k_max", "entropy_ref", "log_ratio_clamp"):
        v = options.get(name)
        if v is None or (name == "entropy_ref" and v == "batch"):
            continue
        if not _is_number(v):
            raise TypeError(f"{where}.{name} must be a finite number, got {v!r}")
        if v < 0 or (name in ("k_min", "k_max", "log_ratio_clamp") and v == 0):
            raise ValueError(f"{where}.{name} must be {'>' if name in ('k_min', 'k_max') else '>='} 0, got {v!r}")
    if options.get("log_ratio_clamp") is not None and options["log_ratio_clamp"] <= 0:
        raise ValueError(f"{where}.log_ratio_clamp must be > 0, got {options['log_ratio_clamp']!r}")
    lo, hi = options.get("k_min"), options.get("k_max")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{where}.k_min ({lo}) must not exceed {where}.k_max ({hi})")
    if options.get("eps_low") is not None and options["eps_low"] >= 1:
        raise ValueError(f"{where}.eps_low must be < 1 (the lower clip bound is 1 - eps_low), got {options['eps_low']}")
    for name in ("adapt_low", "adapt_high"):
        if name in options and not isinstance(options[name], bool):
            raise TypeError(f"{where}.{name} must be a bool, got {options[name]!r}")
    if options.get("backend") is not None and options["backend"] not in BACKENDS:
        raise ValueError(f"{where}.backend must be one of {BACKENDS}, got {options['backend']!r}")
    if options.get("ratio_grad") is not None and options["ratio_grad"] not in RATIO_GRADS:
        raise ValueError(f"{where}.ratio_grad must be one of {RATIO_GRADS}, got {options['ratio_grad']!r}")
    chars = options.get("boundary_chars")
    if chars is not None and (not isinstance(chars, str) or not chars):
        raise ValueError(f"{where}.boundary_chars must be a non-empty string of characters, got {chars!r}")


def drop_none(options: dict[str, Any]) -> dict[str, Any]:
    """The options the caller set: a None leaves the package's per-granularity default in place."""
    return {k: v for k, v in options.items() if v is not None}


def text_tokenizer(processing_class: Any) -> Any:
    """The tokenizer inside a processor (multimodal) or the tokenizer itself."""
    return getattr(processing_class, "tokenizer", None) or processing_class


def build_boundary(tokenizer: Any, granularity: str, chars: str | None, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool boundary table of `tokenizer` for "subsentence" / "sentence" granularity (CPU)."""
    from sspo_kernels import SENTENCE_CHARS, SUBSENTENCE_CHARS, boundary_table

    if chars is None:
        chars = SENTENCE_CHARS if granularity == "sentence" else SUBSENTENCE_CHARS
    table = boundary_table(tokenizer, chars=chars, vocab_size=vocab_size)
    if table.shape[0] != vocab_size:
        raise ValueError(
            f"boundary table has {table.shape[0]} entries but the model's output layer has {vocab_size} rows"
        )
    return table
