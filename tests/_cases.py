"""Small random batches for the loss tests, in both layouts, and an independent segment labelling.

`make_batch` builds a padded `(B, T, V)` batch whose responses have given lengths (positions past a
response's length are padding: masked out, token -100); `pack` drops that padding and returns the
same data as a packed `(total, V)` batch with `cu_seqlens`. `segment_labels` numbers the segments
of docs/loss.md "Segments" with vectorised torch, independently of the reference's token walk.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

IGNORE = -100  # the token id frameworks put at padding; allowed wherever the mask is 0


@dataclass
class Batch:
    """One call's worth of inputs; `logits` is a float64 leaf so tests can take gradients."""

    logits: torch.Tensor  # (B, T, V) padded or (total, V) packed
    tokens: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor  # (B,) per response or shaped like tokens
    mask: torch.Tensor  # bool, shaped like tokens
    ref_logprobs: torch.Tensor
    segment_ids: torch.Tensor  # small ints with repeats, used only by granularity="segments"
    boundary: torch.Tensor  # (V,) bool
    lengths: list[int]  # tokens of each response, padding excluded
    cu_seqlens: torch.Tensor | None = None  # set for the packed layout

    @property
    def num_responses(self) -> int:
        return len(self.lengths)

    @property
    def vocab(self) -> int:
        return self.logits.shape[-1]

    def response_ids(self) -> torch.Tensor:
        """(N,) response index of every flattened token."""
        if self.cu_seqlens is None:
            seq_len = self.tokens.shape[-1]
            return torch.arange(self.tokens.numel()) // seq_len
        return torch.repeat_interleave(torch.arange(self.num_responses), torch.tensor(self.lengths))

    def token_advantages(self) -> torch.Tensor:
        """(N,) advantage of every flattened token, broadcast from per-response values if needed."""
        if self.advantages.shape == self.tokens.shape:
            return self.advantages.reshape(-1)
        return self.advantages[self.response_ids()]

    def inputs(self, granularity: str, logits: torch.Tensor | None = None) -> tuple[tuple, dict]:
        """Positional and keyword arguments of `sspo_loss` for this batch and granularity."""
        args = (self.logits if logits is None else logits, self.tokens, self.old_logprobs, self.advantages, self.mask)
        kwargs: dict = {"granularity": granularity, "ref_logprobs": self.ref_logprobs}
        if granularity in ("subsentence", "sentence"):
            kwargs["boundary"] = self.boundary
        if granularity == "segments":
            kwargs["segment_ids"] = self.segment_ids
        if self.cu_seqlens is not None:
            kwargs["cu_seqlens"] = self.cu_seqlens
        return args, kwargs

    def fresh_logits(self) -> torch.Tensor:
        """A new float64 leaf holding the same logits (gradients of one call do not mix with another's)."""
        return self.logits.detach().clone().requires_grad_(True)


def make_batch(
    seed: int,
    lengths: list[int],
    *,
    seq_len: int | None = None,
    vocab: int = 7,
    per_token_adv: bool = False,
    hole_p: float = 0.0,
    log_ratio_scale: float = 0.3,
    logit_scale: float = 1.0,
    boundary_p: float = 0.3,
) -> Batch:
    """A padded batch: response b holds `lengths[b]` tokens, `hole_p` of them masked out at random.

    old_logprobs are the true log-probs shifted by a per-response offset plus per-token noise (both
    of scale `log_ratio_scale`), so segment ratios land on both sides of typical clip bounds.
    """
    gen = torch.Generator().manual_seed(seed)
    num = len(lengths)
    seq_len = max([*lengths, 1]) if seq_len is None else seq_len
    assert all(0 <= n <= seq_len for n in lengths)
    shape = (num, seq_len)
    logits = torch.randn(*shape, vocab, generator=gen, dtype=torch.float64) * logit_scale
    tokens = torch.randint(0, vocab, shape, generator=gen)
    inside = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]
    mask = inside & (torch.rand(shape, generator=gen) >= hole_p)
    tokens = torch.where(inside, tokens, torch.full_like(tokens, IGNORE))

    true_logp = torch.log_softmax(logits, -1).gather(-1, tokens.clamp(min=0)[..., None])[..., 0]
    offset = torch.randn(num, 1, generator=gen, dtype=torch.float64) * log_ratio_scale
    noise = torch.randn(shape, generator=gen, dtype=torch.float64) * log_ratio_scale
    old = torch.where(inside, true_logp - offset - noise, torch.zeros(()))
    ref = torch.where(inside, true_logp + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64), 0.0)
    adv_shape = shape if per_token_adv else (num,)
    advantages = torch.randn(adv_shape, generator=gen, dtype=torch.float64)
    segment_ids = torch.randint(0, 3, shape, generator=gen)
    boundary = torch.rand(vocab, generator=gen) < boundary_p
    return Batch(
        logits=logits.requires_grad_(True),
        tokens=tokens,
        old_logprobs=old,
        advantages=advantages,
        mask=mask,
        ref_logprobs=ref,
        segment_ids=segment_ids,
        boundary=boundary,
        lengths=list(lengths),
    )


def pack(batch: Batch) -> Batch:
    """The same responses as a packed `(total, V)` batch with `cu_seqlens`: padding dropped."""
    assert batch.cu_seqlens is None, "already packed"
    keep = torch.arange(batch.tokens.shape[1])[None, :] < torch.tensor(batch.lengths)[:, None]

    def take(x: torch.Tensor) -> torch.Tensor:
        return x[keep]

    advantages = take(batch.advantages) if batch.advantages.shape == batch.tokens.shape else batch.advantages
    cu = torch.zeros(batch.num_responses + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor(batch.lengths), 0)
    return replace(
        batch,
        logits=take(batch.logits.detach()).requires_grad_(True),
        tokens=take(batch.tokens),
        old_logprobs=take(batch.old_logprobs),
        advantages=advantages,
        mask=take(batch.mask),
        ref_logprobs=take(batch.ref_logprobs),
        segment_ids=take(batch.segment_ids),
        cu_seqlens=cu,
    )


def segment_labels(batch: Batch, granularity: str) -> torch.Tensor:
    """(N,) segment index of every token, 0, 1, ... in token order; -1 where masked out.

    A masked-in token continues the segment of the previous masked-in token when both lie in the
    same response and the granularity's rule does not cut between them.
    """
    mask = batch.mask.reshape(-1)
    labels = torch.full(mask.shape, -1, dtype=torch.int64)
    idx = torch.nonzero(mask).squeeze(1)
    if idx.numel() == 0:
        return labels
    prev, cur = idx[:-1], idx[1:]
    resp = batch.response_ids()
    same = resp[cur] == resp[prev]
    tokens = batch.tokens.reshape(-1)
    if granularity == "token":
        cont = torch.zeros_like(same)
    elif granularity == "sequence":
        cont = same
    elif granularity in ("subsentence", "sentence"):
        cont = same & ~batch.boundary[tokens[prev]]
    elif granularity == "segments":
        ids = batch.segment_ids.reshape(-1)
        cont = same & (ids[cur] == ids[prev])
    else:
        raise ValueError(granularity)
    starts = torch.ones(idx.shape, dtype=torch.int64)
    starts[1:] = (~cont).long()
    labels[idx] = torch.cumsum(starts, 0) - 1
    return labels
