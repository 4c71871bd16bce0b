"""Slow float64 reference of the SSPO / GSPO / GRPO loss (docs/loss.md). Tests and benchmarks import it;
the kernels in `sspo_kernels` never do."""

from reference.loss import (
    SSPOOutput,
    naive_logprob_entropy,
    naive_segment_ids,
    naive_segments,
    sspo_loss,
)

__all__ = ["SSPOOutput", "naive_logprob_entropy", "naive_segment_ids", "naive_segments", "sspo_loss"]
