"""The vocabulary pass in plain PyTorch, a chunk of rows at a time (docs/loss.md "Token quantities").

Same launcher interface as the Triton version in `triton.py`; this is what CPU users get,
and the fallback on a GPU without Triton. Per token t, with z = logits / tau in fp32:

    lse_t = logsumexp(z_t)    l_t = z_t[y_t] - lse_t    H_t = -sum_v p_v log p_v

and the backward returns dLoss/dlogits for upstream g_t = dLoss/dl_t, e_t = dLoss/dH_t:

    (1/tau) * ( g_t * (onehot(y_t) - p) - e_t * p * (log p + H_t) )

Rows are processed `chunk_size` at a time (`vocab_chunk_rows`: a few MB per chunk) in at most
two fp32 workspaces allocated once per call, so nothing (N, V)-sized in fp32 ever exists. The only
(N, V) allocation is the gradient itself, made once and filled chunk by chunk (or none:
`inplace=True` writes into the logits buffer). Every pass over a chunk then runs from cache.

Cost on a CPU: each (C, V) op runs from cache, while the first read of the logits and the first
write of the gradient buffer run at memory speed. A fresh buffer is slower still, as the kernel
faults in and zeroes its pages: on the CPU the gradient buffer is therefore kept between calls and
handed out again once the caller has dropped it (`_utils.reusable_empty`; huge-page advice was
tried instead and dropped: it made some calls several times slower; bench/RESULTS.md). The passes
over a chunk are few: 6 in the forward; 4 in the backward without the entropy term (grad_entropy
None, as in SSPO where the entropy is used detached), which takes softmax(z) from the forward's row
max and sums (3 on the CPU when no row is masked out); 11 with it. The forward's per-row maths runs
once over all rows after the loop, and exp is torch.exp (exp2 needs one more multiply).

Numerics:
- Everything works on values shifted by the row max, s = z - max(z), never on z itself, so
  |z| ~ 1e4 loses nothing: H = log S - sum(e^s s) / S with S = sum e^s adds two non-negative
  terms, and l_t = s[y] - log S never subtracts two numbers of size |z|.
- The sums over a row leave the target out and add its term last: when y is the argmax (s_y = 0),
  log S = log1p(sum_{v != y} e^s) and 1 - p_y = sum_{v != y} p_v keep their digits as p_y -> 1,
  where fl(S) = 1 + tiny or 1 - fl(p_y) would cancel (a logit gap of 17 made 1 - p_y exactly 0).
- The backward never uses the forward's rounded lse and H. Without the entropy term it takes the
  forward's fp32 row max and sums (p = e^s / S, 1 - p_y = sum_{v != y} e^s / S), the numbers a
  recompute would give; with it, it recomputes the chunk's statistics from its logits: the entropy
  term -p (log p + H) is formed as -p (s - E_p[s]), one quantity, where log p and H are each
  ~log V and their fp32 sum would keep only ~ulp(log V) of it.
- Masked-out rows never reach an output: the forward selects with `torch.where` on the per-row
  results; the backward makes each chunk finite (`nan_to_num`) and then zeroes those rows by a
  product with 0 (their mask, or their per-row factor): half the time of a `torch.where` over the
  chunk (0.3 against 0.6 ns per element). NaN or garbage logits there therefore stay invisible,
  while NaN at a masked-in row propagates to that row through its max or its S (in 1 / S) to every
  entry.
  NaN and +inf logits give NaN; a -inf logit (a vocabulary entry masked out by the caller) is a
  probability of exactly 0 and contributes 0 * log 0 = 0, as in the reference and the kernels.
  At the target it is l_t = -inf, p_y = 0: the gradient stays finite (g_t at the target column).

No host syncs: row ranges come from shapes only, masked rows are handled by selection, never by
boolean indexing, so the code also runs on a GPU without waiting for it. The one read of a value,
whether the mask holds any masked-out row, is made on the CPU only and not under torch.compile.

torch.compile is opt-in (`use_compile=True`), off by default. Measured on the 2-core reference CPU
at N=1024, V=32000 fp32 (one thread): it makes the forward 1.45x faster (23 against 33 ms) but
forward+backward only 1.2x (120 against 148 ms), which is dominated by faulting in and writing the
fresh gradient buffer; the first call pays 7-15 s of compilation per (V, dtype, temperature), it
needs a C++ compiler, and on a GPU it needs Triton, which is exactly what this fallback lacks.
"""

from __future__ import annotations

import functools

import torch

from sspo_kernels._utils import new_empty, reusable_empty

# Bytes of one chunk's working set: two fp32 temporaries plus its logits and gradient rows, sized to
# stay in a core's L2 (2 MiB on the reference machine; 4 rows at V=32000 fp32): 2 to 4 rows measured
# fastest there, 6 to 8 rows 5-7% slower, 16 and 32 rows 14% slower as the chunk leaves the cache
# (bench/RESULTS.md, "rows per chunk").
_CHUNK_BYTES = 2 * 2**20
_FP32_TEMPS = 2


def vocab_chunk_rows(vocab_size: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that one chunk's working set (fp32 temporaries + its logits and gradient
    rows in `dtype`) is about `_CHUNK_BYTES`, small enough to stay in cache; at least 1 row."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    row_bytes = max(vocab_size, 1) * (4 * _FP32_TEMPS + 2 * itemsize)
    return max(1, _CHUNK_BYTES // row_bytes)


def _row_pieces(t: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(first flat row, (rows, V) view) pieces that cover a (N, V) or (B, T, V) tensor, no copy.

    A (B, T, V) tensor whose rows cannot be viewed as one (N, V) matrix (for example the
    `logits[:, :-1]` slice of a longer batch) is split per batch item.
    """
    if t.dim() == 2:
        return [(0, t)]
    b, n_t, v = t.shape
    if b == 1 or n_t == 1 or t.stride(0) == n_t * t.stride(1):
        return [(0, t.view(b * n_t, v))]
    return [(i * n_t, t[i]) for i in range(b)]


def _chunks(pieces: list[tuple[int, torch.Tensor]], chunk: int):
    """Yield (r0, r1, rows view) over every piece, at most `chunk` rows at a time.

    A 1-row tail borrows a row from the chunk before it: torch.compile specialises size-1 dims,
    so a lone row would cost a second compile of the same graph."""
    for row0, piece in pieces:
        n = piece.shape[0]
        starts = list(range(0, n, chunk))
        if chunk > 2 and len(starts) > 1 and n - starts[-1] == 1:
            starts[-1] -= 1
        for c0, c1 in zip(starts, [*starts[1:], n]):
            yield row0 + c0, row0 + c1, piece[c0:c1]


def _workspace(count: int, rows: int, vocab: int, device: torch.device) -> list[torch.Tensor]:
    """fp32 (rows, V) buffers reused by every chunk of a call: allocating per chunk lets glibc hand
    multi-MB blocks back to the OS and fault them in again (measured 3-4x slower past ~3 MB)."""
    return [torch.empty(rows, vocab, dtype=torch.float32, device=device) for _ in range(count)]


def _check(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, chunk_size: int | None):
    """Flat (targets, bool mask); targets point at column 0 where masked out. Shapes only: the
    caller (`sspo_kernels._validate`) has validated token ranges, dtypes and devices."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (N, V) or (B, T, V), got shape {tuple(logits.shape)}")
    n = logits.shape[:-1].numel()
    tokens, mask = tokens.reshape(-1).long(), mask.reshape(-1)
    if tokens.shape[0] != n or mask.shape[0] != n:
        raise ValueError(f"tokens and mask must have {n} entries (one per logits row)")
    mask = mask if mask.dtype == torch.bool else mask != 0
    return torch.where(mask, tokens, 0), mask


# ---------------------------------------------------------------- per-chunk maths, rows independent


# where a logit is -inf, p = 0 and log p = -inf; the shifted logit is raised to this finite floor
# after p is taken so that p * log p is 0 * -1e30 = 0 rather than NaN (exp(-1e30) is 0 anyway)
_NO_PROB = -1e30


def _load(x: torch.Tensor, s: torch.Tensor, tau: float) -> None:
    """s <- x / tau in fp32, without the hidden fp32 copy of x that a dtype-promoting op makes."""
    if x.dtype == torch.float32 and tau != 1.0:
        torch.div(x, tau, out=s)
        return
    s.copy_(x)
    if tau != 1.0:
        s.div_(tau)


def _transformed(x: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """The logits' transform before the temperature, a new fp32 tensor: scale * x, soft-capped to
    softcap * tanh(. / softcap) when given (docs/loss.md "Token quantities")."""
    u = x.float() * scale
    return u if softcap is None else torch.tanh(u.div_(softcap)).mul_(softcap)


def _transform_slope(x: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """d transform / dx (fp32): scale, times 1 - tanh^2 = 1 / cosh^2 with the soft-cap (0 at +-inf)."""
    if softcap is None:
        return torch.full_like(x, scale, dtype=torch.float32)
    return torch.cosh(x.float() * (scale / softcap)).pow_(-2).mul_(scale)


def _log_sum(s_y: torch.Tensor, sum_other: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """log S from S = sum_{v != y} e^s + e^{s_y} (s shifted by the row max): log1p of the other terms
    when y is the argmax (s_y = 0), where fl(S) = 1 + tiny would lose them as p_y -> 1."""
    return torch.where(s_y == 0, torch.log1p(sum_other), total.log())


def _fwd_chunk(x: torch.Tensor, col: torch.Tensor, tau: float, s: torch.Tensor, e: torch.Tensor, m, sum_other, t):
    """Row statistics of the rows x (C, V) for targets col (C, 1) in range, written into the fp32 views
    m (C, 1) max(z), sum_other (C,) sum_{v != y} e^s and t (C,) sum_{v != y} e^s s, with s = z - max(z)
    (see `_fwd_finish`). s, e: (C, V) fp32 workspaces."""
    if x.dtype == torch.float32 and tau == 1.0:
        torch.amax(x, -1, keepdim=True, out=m)
        torch.sub(x, m, out=s)  # one pass
    else:
        _load(x, s, tau)
        torch.amax(s, -1, keepdim=True, out=m)  # max(x) / tau, as rounding is monotone
        s.sub_(m)
    torch.exp(s, out=e)
    e.scatter_(1, col, 0.0)  # the sums run over v != y; the target's terms are added back in _fwd_finish
    torch.sum(e, -1, out=sum_other)
    # e * s is NaN where s = -inf (p = 0: a term 0, which nansum drops) or where the row holds a NaN
    # or +inf logit (its sum_other is NaN, so the row's entropy is NaN whatever t is): no clamp pass
    torch.nansum(e.mul_(s), -1, out=t)


def _target_logits(
    pieces: list[tuple[int, torch.Tensor]], y: torch.Tensor, tau: float, out: torch.Tensor, transform=None
) -> None:
    """out (N,) fp32 <- z at each row's target, rounded as `_load` rounds it: one gather per piece
    (`transform`: (scale, softcap) of the logits, or None)."""
    for row0, piece in pieces:
        rows = slice(row0, row0 + piece.shape[0])
        target = torch.gather(piece, 1, y[rows, None])[:, 0]
        out[rows] = target if transform is None else _transformed(target, *transform)
    if tau != 1.0:
        out.div_(tau)


def _fwd_finish(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lse, entropy, logp (N,) from the (5, N) statistics, all rows at once: rows 0, 3, 4 from
    `_fwd_chunk`, row 1 z_y from `_target_logits`, turned here into s_y = z_y - max(z); row 2 <- e^{s_y}."""
    m, s_y, e_y, sum_other, t = stats
    s_y.sub_(m)  # the value the chunk's s has at the target
    torch.exp(s_y, out=e_y)
    total = sum_other + e_y
    log_sum = _log_sum(s_y, sum_other, total)
    t = t + e_y * s_y.clamp(min=_NO_PROB)
    entropy = log_sum - t / total  # both terms >= 0: no cancellation
    return m + log_sum, entropy, s_y - log_sum


def _bwd_chunk_logp(x, col, shift, scale, target, tau: float, s, out, all_kept: bool) -> None:
    """`_bwd_chunk` without the entropy term, from the forward's row statistics: out <- (g / tau)
    (onehot(y) - softmax(z)), in place when out is x.

    col: (C, 1) targets; shift: (C, 1) the forward's max(z); scale: (C, 1) -g / (tau S) with S the
    forward's sum of e^{z - max z}; target: (C, 1) g (1 - p_y) / tau; scale and target are zero where
    masked out. s: (C, V) fp32 workspace, used when x or out is not fp32 or tau != 1. all_kept: no
    row of the batch is masked out."""
    src = x
    if x.dtype != torch.float32 or tau != 1.0:
        _load(x, s, tau)
        src = s
    dst = out if out.dtype == torch.float32 else s
    torch.sub(src, shift, out=dst).exp_()
    # Only a masked-out row's garbage can leave e^{z - max z} non-finite where it matters: a masked-in
    # row with NaN / +inf has a NaN S in the forward, hence a NaN scale and a NaN row. Made finite, the
    # garbage is then zeroed by its row's scale.
    if not all_kept:
        dst.nan_to_num_(0.0, 0.0, 0.0)
    dst.mul_(scale).scatter_(1, col, target)
    if dst is not out:
        out.copy_(dst)


def _bwd_chunk(x, y, mask, g, e, tau: float, s, p, out) -> None:
    """Write the gradient of the rows x (C, V) into out (C, V) (may be x itself).

    g, e: (C,) upstream gradients of logp and entropy, zero at masked-out rows (without the entropy
    term: `_bwd_chunk_logp`); s, p: (C, V) fp32 workspaces. Masked-out rows come out exactly 0."""
    keep = mask[:, None]
    m = x.amax(-1, keepdim=True).float()  # NaN / +inf of a masked-in row stay in its max
    # s finite from here (-inf to the _NO_PROB floor), so a product hides masked-out garbage: the
    # two passes cost half of one torch.where over the chunk
    if x.dtype == torch.float32:
        torch.nan_to_num(x, 0.0, 0.0, _NO_PROB, out=s)
    else:
        s.copy_(x).nan_to_num_(0.0, 0.0, _NO_PROB)
    s.mul_(keep)
    if tau != 1.0:
        m = m / tau
        s.div_(tau)
    s.sub_(torch.where(keep, m, 0.0))
    col = y[:, None]
    s_y = s.gather(1, col).squeeze(1)
    torch.exp(s, out=p)
    p_y = p.gather(1, col).squeeze(1)
    p.scatter_(1, col, 0.0)
    sum_other = p.sum(-1)
    k = 1.0 / (tau * (sum_other + p_y))  # p / S is the softmax
    target = g * sum_other  # g (1 - p_y) S, with 1 - p_y = sum_{v != y} p_v / S
    # fp32 output: the products go straight into out (s is not read again); otherwise into s, and
    # round once, on the copy (a scatter_ into bf16 would copy the whole chunk)
    dst = out if out.dtype == torch.float32 else s
    # log p_v + H = s_v - E_p[s]: one quantity, no two terms of size log V to cancel
    mean = (torch.mul(p, s, out=dst).sum(-1) + p_y * s_y) * (tau * k)
    target = target - e * p_y * (s_y - mean)
    # p_v (c2 s_v + c1) = -p_v k (g + e (s_v - mean)), as c2 (p s)_v + c1 p_v from the p s above
    dst.mul_((-e * k)[:, None]).add_(p.mul_(((e * mean - g) * k)[:, None]))
    dst.scatter_(1, col, (target * k)[:, None])
    if dst is not out:
        out.copy_(dst)


# ---------------------------------------------------------------- torch.compile variants


def _fwd_chunk_fused(x: torch.Tensor, y: torch.Tensor, tau: float, scale: float = 1.0, softcap=None):
    """`_fwd_chunk` in functional form, for inductor to fuse into a couple of loops."""
    z = _transformed(x, scale, softcap) / tau
    m = z.amax(-1, keepdim=True)
    s = z - m
    onehot = torch.arange(x.shape[1], device=x.device) == y[:, None]
    s_y = s.gather(1, y[:, None]).squeeze(1)
    e = torch.exp(s)
    e_y = torch.exp(s_y)
    e_other = torch.where(onehot, 0.0, e)
    sum_other = e_other.sum(-1)
    total = sum_other + e_y
    log_sum = _log_sum(s_y, sum_other, total)
    t = (e_other * s.clamp(min=_NO_PROB)).sum(-1) + e_y * s_y.clamp(min=_NO_PROB)
    return m.squeeze(1) + log_sum, log_sum - t / total, s_y - log_sum


def _bwd_chunk_fused(x, y, mask, g, e, tau: float, out: torch.Tensor, scale: float = 1.0, softcap=None) -> None:
    """`_bwd_chunk` in functional form, writing into out (inductor fuses the store)."""
    z = torch.where(mask[:, None], _transformed(x, scale, softcap) / tau, 0.0)
    s = (z - z.amax(-1, keepdim=True)).clamp(min=_NO_PROB)
    onehot = torch.arange(x.shape[1], device=x.device) == y[:, None]
    s_y = s.gather(1, y[:, None]).squeeze(1)
    p = torch.where(onehot, 0.0, torch.exp(s))
    p_y = torch.exp(s_y)
    sum_other = p.sum(-1)
    k = 1.0 / (tau * (sum_other + p_y))
    target = g * sum_other
    if e is None:
        grad = p * (-g * k)[:, None]
    else:
        mean = ((p * s).sum(-1) + p_y * s_y) * (tau * k)
        target = target - e * p_y * (s_y - mean)
        grad = -p * (k[:, None] * (g[:, None] + e[:, None] * (s - mean[:, None])))
    grad = torch.where(onehot, (target * k)[:, None], grad)
    if scale != 1.0 or softcap is not None:
        grad = grad * torch.where(mask[:, None], _transform_slope(x, scale, softcap), 0.0)
    out.copy_(grad)


@functools.cache
def _compiled(fn):
    return torch.compile(fn)


def _rows_dynamic(*tensors: torch.Tensor) -> None:
    """Row counts vary (the batch size, the last chunk): a dynamic row dimension from the first
    call keeps one graph per (V, dtype, temperature) instead of one per row count."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


# ---------------------------------------------------------------- forward launcher


def logprob_entropy_fwd(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    *,
    scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    use_compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token log p[y], entropy and lse of z = logits / temperature, in fp32, and the row
    statistics the backward reuses.

    logits (N, V) or (B, T, V) with any strides, bf16 / fp16 / fp32 / fp64; tokens (N,) int, any
    value where masked out; mask (N,) bool. Returns logp, entropy, lse: (N,) float32, exactly 0 at
    masked-out rows, and rows: (5, N) float32 (`_fwd_chunk`'s statistics, garbage where masked out;
    None with `use_compile`). `chunk_size` rows at a time (default `vocab_chunk_rows`).
    `use_compile` runs each chunk through `torch.compile` (off by default: see the module docstring).
    scale, softcap: the logits' transform before the temperature (`_transformed`; a (C, V) fp32 copy
    of each chunk when set).
    """
    y, mask = _check(logits, tokens, mask, chunk_size)
    transform = None if scale == 1.0 and softcap is None else (float(scale), softcap)
    n, vocab = y.shape[0], logits.shape[-1]
    device = logits.device
    chunk = chunk_size or vocab_chunk_rows(vocab, logits.dtype)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    tau = float(temperature)
    if use_compile:
        outs = [new_empty((n,), torch.float32, device) for _ in range(3)]  # lse, entropy, logp
        for r0, r1, x in _chunks(_row_pieces(logits), chunk):
            args = (x, y[r0:r1])
            _rows_dynamic(*args)
            for out, value in zip(outs, _compiled(_fwd_chunk_fused)(*args, tau, *(transform or (1.0, None)))):
                torch.where(mask[r0:r1], value, zero, out=out[r0:r1])
        stats = None
    else:
        # per-chunk work is the (C, V) passes only; the per-row maths runs once over all rows
        stats = new_empty((5, n), torch.float32, device)
        pieces = _row_pieces(logits)
        _target_logits(pieces, y, tau, stats[1], transform)
        work = _workspace(2, min(chunk, n), vocab, device)
        y_col, m_col, sum_other, t = y[:, None], stats[0][:, None], stats[3], stats[4]
        for r0, r1, x in _chunks(pieces, chunk):
            ws = work if r1 - r0 == chunk else [w[: r1 - r0] for w in work]
            if transform is not None:  # the chunk's transformed logits, fp32
                x = _transformed(x, *transform)
            _fwd_chunk(x, y_col[r0:r1], tau, *ws, m_col[r0:r1], sum_other[r0:r1], t[r0:r1])
        outs = [torch.where(mask, value, zero) for value in _fwd_finish(stats)]
    lse, entropy, logp = outs
    return logp, entropy, lse, stats


# ---------------------------------------------------------------- backward launcher


def logprob_entropy_bwd(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    _lse: torch.Tensor,
    _entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    *,
    scale: float = 1.0,
    softcap: float | None = None,
    inplace: bool = False,
    logp: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    chunk_size: int | None = None,
    use_compile: bool = False,
) -> torch.Tensor:
    """dLoss/dlogits from the upstream grad_logp, grad_entropy (N,) fp32 (None: no entropy term).

    Without the entropy term, softmax(z) comes from the forward's fp32 row max and sums (`rows`, the
    forward's fourth output; recomputed by one more forward pass when not given): the same numbers a
    recompute gives, and 1 - p_y is the sum of the other probabilities over S. With it, each chunk's
    statistics are recomputed from its logits, as log p + H = s - E_p[s] needs every s. _lse, _entropy
    and logp are accepted for the launchers' common signature and not read: the rounded fp32 lse and H
    do not give these to full precision. Returns a tensor shaped like logits in its dtype, zero at
    masked-out rows; with `inplace=True` it is the logits buffer itself, overwritten. `chunk_size`,
    `use_compile`, `scale` and `softcap` as in `logprob_entropy_fwd`: with a transform, each chunk's
    gradient is taken with respect to the transformed logits, then times the transform's slope.
    """
    del _lse, _entropy, logp
    y, mask = _check(logits, tokens, mask, chunk_size)
    transform = None if scale == 1.0 and softcap is None else (float(scale), softcap)
    n, vocab = y.shape[0], logits.shape[-1]
    tau = float(temperature)
    # Per-row factors, zero where masked out (whatever the caller stored there).
    factors = [None if t is None else torch.where(mask, t.reshape(-1).float(), 0.0) for t in (grad_logp, grad_entropy)]
    chunk = chunk_size or vocab_chunk_rows(vocab, logits.dtype)
    no_entropy = factors[1] is None and not use_compile
    if no_entropy:  # (N, 1) columns, sliced per chunk; one workspace only to load non-fp32 or z / tau
        if rows is None:
            rows = logprob_entropy_fwd(logits, tokens, mask, tau, scale=scale, softcap=softcap, chunk_size=chunk_size)[
                3
            ]
        shift, _, e_y, sum_other, _ = rows
        g_over_s = factors[0] / (tau * (sum_other + e_y))
        row_scale = torch.where(mask, -g_over_s, 0.0)[:, None]
        target = torch.where(mask, g_over_s * sum_other, 0.0)[:, None]  # g (1 - p_y) / tau
        y_col, shift = y[:, None], shift[:, None]
        # one host read of the mask, on the CPU only (free there; a sync on a GPU, a graph break
        # under torch.compile): a batch without padding skips a pass per chunk
        all_kept = mask.device.type == "cpu" and not torch.compiler.is_compiling() and bool(mask.all())
        count = 0 if logits.dtype == torch.float32 and tau == 1.0 and transform is None else 1
    else:
        count = 0 if use_compile else 2
    grad = logits if inplace else reusable_empty(logits.shape, logits.dtype, logits.device)
    grad_rows = None if inplace else grad.view(n, vocab)  # a new or kept buffer is contiguous
    work = _workspace(count, min(chunk, n), vocab, logits.device)
    for r0, r1, x in _chunks(_row_pieces(logits), chunk):
        out = x if inplace else grad_rows[r0:r1]
        final, slope = out, None
        if transform is not None and not use_compile:
            # the gradient with respect to the transformed logits, in their own fp32 buffer, then the slope
            # (a masked-out row's garbage must not turn its zero gradient into 0 * NaN)
            slope = torch.where(mask[r0:r1, None], _transform_slope(x, *transform), 0.0)
            x = out = _transformed(x, *transform)
        if no_entropy:
            cols = (y_col[r0:r1], shift[r0:r1], row_scale[r0:r1], target[r0:r1])
            _bwd_chunk_logp(x, *cols, tau, work[0][: r1 - r0] if work else None, out, all_kept)
        else:
            args = (x, y[r0:r1], mask[r0:r1], *(None if t is None else t[r0:r1] for t in factors), tau)
            if use_compile:
                _rows_dynamic(*(a for a in args[:-1] if a is not None), out)
                _compiled(_bwd_chunk_fused)(*args, out, *(transform or (1.0, None)))
            else:
                _bwd_chunk(*args, *(w[: r1 - r0] for w in work), out)
        if slope is not None:
            final.copy_(out.mul_(slope))
    return grad
