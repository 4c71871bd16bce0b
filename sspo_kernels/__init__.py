"""Fused kernels for GRPO / GSPO / SSPO policy losses. See README.md and docs/loss.md.

Importing this package touches no device and reads no environment variable.
"""

from sspo_kernels._types import METRIC_NAMES, SSPOOutput
from sspo_kernels._utils import empty_cache
from sspo_kernels.boundary import SENTENCE_CHARS, SUBSENTENCE_CHARS, boundary_table
from sspo_kernels.from_logprobs import SSPOLossFromLogprobs, sspo_loss_from_logprobs
from sspo_kernels.fused_linear import SSPOLossFromHidden, sspo_loss_from_hidden
from sspo_kernels.loss import SSPOLoss, segment_ids, sspo_loss
from sspo_kernels.token_logprobs import token_logprobs, token_logprobs_from_hidden

__all__ = [
    "METRIC_NAMES",
    "SENTENCE_CHARS",
    "SUBSENTENCE_CHARS",
    "SSPOLoss",
    "SSPOLossFromHidden",
    "SSPOLossFromLogprobs",
    "SSPOOutput",
    "boundary_table",
    "empty_cache",
    "segment_ids",
    "sspo_loss",
    "sspo_loss_from_hidden",
    "sspo_loss_from_logprobs",
    "token_logprobs",
    "token_logprobs_from_hidden",
]
__version__ = "0.1.0"
