"""The vocabulary pass over a vocabulary split across the ranks of a tensor-parallel group.

Rank r holds the columns [vocab_start, vocab_start + V_r) of every row. One local pass gives per row,
with z = logits / tau and m_r the local max (floored, so an all -inf shard stays finite):

    s_r = sum e^(z - m_r),   t_r = sum e^(z - m_r) (z - m_r),   d_y = z_y - m_r on the rank owning y

where the owner leaves the target's terms out of s_r and t_r (they are added back after the merge, so
log S = log1p(S_other) keeps its digits when the target is the argmax, as in the one-process passes).
The merge issues two collectives on the group: a MAX of m_r (M, the row max of the full vocabulary),
then one packed SUM of (e^(m_r - M) s_r, e^(m_r - M) (t_r + (m_r - M) s_r), z_y - M, owner count).
From them every rank forms the same

    log S, lse = M + log S, logp = (z_y - M) - log S, mu = E_p[z - M], H = log S - mu, 1 - p_y.

The backward needs no collective: p_v = exp(z_v - M - log S) from the merged statistics, the entropy
term -p_v (log p_v + H) = -p_v (z_v - M - mu), and the one-hot entry g (1 - p_y) only on the owner.

The MAX buffer starts with the row count, so ranks whose batches disagree in size are told so (on the
rank with the shorter buffer; the others then see the collective fail). The owner count checks on the
device that every masked-in target lies in exactly one shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from sspo_kernels._utils import new_empty
from sspo_kernels._validate import device_check
from sspo_kernels.ops.vocab.torch import _chunks, _row_pieces, vocab_chunk_rows

# floor of a shard's row max: an all -inf shard gets m = FLOOR, so m - M is finite and e^(m - M) = 0
FLOOR = -1e30
# the partial statistics' columns
PARTIAL_COLUMNS = ("max", "sum_exp", "sum_exp_shift", "target_shift", "owner")
_SPLIT = float(1 << 20)  # the row count travels as two fp32-exact halves


class ShardedStats(NamedTuple):
    """What the sharded forward keeps for its backward: (N,) fp32 each, 0 where masked out."""

    logp: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor
    shift: torch.Tensor  # M, the row max of z over the whole vocabulary
    log_sum: torch.Tensor  # log S, S = sum_v e^(z_v - M)
    mean: torch.Tensor  # mu = E_p[z - M]
    one_minus_p: torch.Tensor  # 1 - p_y, without cancellation as p_y -> 1


def _local_targets(tokens: torch.Tensor, mask: torch.Tensor, vocab_start: int, v_local: int):
    y = tokens.reshape(-1).long() - vocab_start
    own = mask.reshape(-1) & (y >= 0) & (y < v_local)
    return torch.where(own, y, 0), own


# ---------------------------------------------------------------- torch implementation


def partial_stats_torch(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    vocab_start: int,
    temperature: float,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """(N, 5) fp32 partial statistics (`PARTIAL_COLUMNS`) of this shard, a chunk of rows at a time.
    Masked-out rows hold (FLOOR, 0, 0, 0, 0) whatever their logits."""
    v = logits.shape[-1]
    n = logits.shape[:-1].numel()
    col, own = _local_targets(tokens, mask, vocab_start, v)
    mask = mask.reshape(-1)
    out = new_empty((n, 5), torch.float32, logits.device)
    chunk = chunk_size or vocab_chunk_rows(v, logits.dtype)
    tau = float(temperature)
    empty = torch.tensor([FLOOR, 0.0, 0.0, 0.0, 0.0], device=logits.device)
    for r0, r1, x in _chunks(_row_pieces(logits), chunk):
        z = x.float() if tau == 1.0 else x.float() / tau
        m = z.amax(-1).clamp(min=FLOOR)
        d = z.sub_(m[:, None]) if z is not x else z - m[:, None]
        c, o = col[r0:r1, None], own[r0:r1]
        d_y = d.gather(1, c).squeeze(1)
        e = torch.exp(d)
        # the owner leaves its target out of the sums (added back after the merge)
        e.scatter_(1, c, torch.where(o, 0.0, e.gather(1, c).squeeze(1))[:, None])
        s = e.sum(-1)
        t = e.mul_(d.clamp_(min=FLOOR)).sum(-1)  # 0 * -inf would be NaN
        rows = torch.stack([m, s, t, torch.where(o, d_y, 0.0), o.float()], 1)
        torch.where(mask[r0:r1, None], rows, empty, out=out[r0:r1])
    return out


def sharded_bwd_torch(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    stats: ShardedStats,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    vocab_start: int,
    temperature: float,
    *,
    inplace: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """dLoss/dlogits of this shard, shaped like logits in their dtype (the logits buffer when `inplace`)."""
    v = logits.shape[-1]
    n = logits.shape[:-1].numel()
    col, own = _local_targets(tokens, mask, vocab_start, v)
    mask = mask.reshape(-1)
    tau = float(temperature)
    g = torch.where(mask, grad_logp.reshape(-1).float(), 0.0)
    e = None if grad_entropy is None else torch.where(mask, grad_entropy.reshape(-1).float(), 0.0)
    grad = logits if inplace else new_empty(logits.shape, logits.dtype, logits.device)
    grad_rows = None if inplace else grad.view(n, v)
    chunk = chunk_size or vocab_chunk_rows(v, logits.dtype)
    for r0, r1, x in _chunks(_row_pieces(logits), chunk):
        m = mask[r0:r1, None]
        d = torch.where(m, x.float() / tau, 0.0).sub_(stats.shift[r0:r1, None])  # z - M
        p = torch.exp(d - stats.log_sum[r0:r1, None])
        g_c, c, o = g[r0:r1], col[r0:r1, None], own[r0:r1]
        target = g_c * stats.one_minus_p[r0:r1]  # g (1 - p_y)
        if e is None:
            dz = p.mul_(-g_c[:, None])
        else:
            e_c, mu = e[r0:r1], stats.mean[r0:r1]
            d.clamp_(min=FLOOR)
            target = target - e_c * p.gather(1, c).squeeze(1) * (d.gather(1, c).squeeze(1) - mu)
            # -p (g + e (log p + H)) with log p + H = z - M - mu
            dz = p.mul_(d.sub_(mu[:, None]).mul_(e_c[:, None]).add_(g_c[:, None])).neg_()
        dz.scatter_(1, c, torch.where(o, target, dz.gather(1, c).squeeze(1))[:, None])
        if tau != 1.0:
            dz.div_(tau)
        (x if inplace else grad_rows[r0:r1]).copy_(dz)
    return grad


# ---------------------------------------------------------------- the merge


def _row_count_header(n: int, device: torch.device) -> torch.Tensor:
    hi, lo = divmod(float(n), _SPLIT)
    return torch.tensor([hi, lo, -hi, -lo], dtype=torch.float32, device=device)


def merge_partial_stats(part: torch.Tensor, mask: torch.Tensor, group: Any) -> ShardedStats:
    """The full-vocabulary statistics from every rank's partial ones: 2 collectives on `group`."""
    n = part.shape[0]
    mask = mask.reshape(-1)
    buf = torch.cat([_row_count_header(n, part.device), part[:, 0]])
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    header, big_m = buf[:4], buf[4:]
    device_check(
        (header[0] == -header[2]) & (header[1] == -header[3]),
        f"the ranks of tp_group hold different numbers of rows (this one {n}): every rank passes the same tokens",
    )
    m, s, t, d_y, own = part.unbind(1)
    shift = m - big_m  # <= 0, finite (m is floored)
    a = torch.exp(shift)
    packed = torch.stack([a * s, a * (t + shift * s), torch.where(own > 0, d_y + shift, 0.0), own], 1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    s_other, w_other, z_y, owners = packed.unbind(1)
    device_check(
        ((owners == 1) | ~mask).all(),
        "every masked-in token id must lie in exactly one rank's vocabulary range [vocab_start, vocab_start + V_local)",
    )
    e_y = torch.exp(z_y)
    total = s_other + e_y
    log_sum = torch.where(z_y == 0, torch.log1p(s_other), torch.log(total))
    mean = (w_other + e_y * z_y.clamp(min=FLOOR)) / total
    zero = torch.zeros((), device=part.device)
    values = (z_y - log_sum, log_sum - mean, big_m + log_sum, big_m, log_sum, mean, s_other / total)
    return ShardedStats(*(torch.where(mask, x, zero) for x in values))


# ---------------------------------------------------------------- the pass object


@dataclass(frozen=True)
class ShardedVocab:
    """The vocabulary pass of one tensor-parallel rank: `vocab_fwd` / `vocab_bwd` as a `Backend`'s, plus
    the partial statistics and the merge apart (the fused-linear path merges all chunks at once).

    The partial statistics and the backward run in chunked PyTorch whatever the call's backend (no
    Triton kernels for the sharded pass yet); `backend` names the call's, whose segmented sum the
    segment step still uses."""

    group: Any
    vocab_start: int
    backend: str  # the call's resolved backend, "torch" or "triton"
    chunk_size: int | None = None

    def partial(self, logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, temperature: float):
        return partial_stats_torch(logits, tokens, mask, self.vocab_start, temperature, chunk_size=self.chunk_size)

    def merge(self, part: torch.Tensor, mask: torch.Tensor) -> ShardedStats:
        return merge_partial_stats(part, mask, self.group)

    def vocab_fwd(self, logits, tokens, mask, temperature: float, *, scale=1.0, softcap=None) -> ShardedStats:
        _no_transform(scale, softcap)
        return self.merge(self.partial(logits, tokens, mask, temperature), mask)

    def vocab_bwd(
        self, logits, tokens, mask, stats, grad_logp, grad_entropy, temperature, *, inplace: bool, scale=1.0,
        softcap=None,
    ):  # fmt: skip
        _no_transform(scale, softcap)
        return sharded_bwd_torch(
            logits, tokens, mask, stats, grad_logp, grad_entropy, self.vocab_start, temperature,
            inplace=inplace, chunk_size=self.chunk_size,
        )  # fmt: skip


def _no_transform(scale: float, softcap: float | None) -> None:
    """The vocabulary-parallel pass has no logit transform (refused earlier, in `_parallel.sharded_vocab`)."""
    if scale != 1.0 or softcap is not None:
        raise ValueError("logit_scale / logit_softcap with tp_group: the vocabulary-parallel pass has no transform")
