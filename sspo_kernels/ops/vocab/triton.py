"""Per-token log-probability and entropy of softmax(logits / temperature), and their gradient.

One program per token row on a 1-D grid over the flattened tokens (2^31 - 1 programs at most); row
offsets are formed in int64, so rows past 2^31 elements are addressed right. With K kept rows, V
entries of s bytes each:

Forward: one pass over the vocabulary per kept row; reads the logits once (K * V * s bytes, plus the
target entry, a cache hit) and writes 3 floats per row. It keeps the running max m of the raw logits
(tau > 0, so the max commutes with the scaling) and, with d_v = (x_v - m) / tau <= 0, the sums
s = sum e^d and t = sum e^d * d over v != y (the target's terms are added at the end). When the max
grows by delta (in units of z = x / tau): s <- a*s and t <- a*(t - delta*s), a = e^-delta. Then
lse = m/tau + log S, logp = d_y - log S and entropy = log S - t/S (S, t with the target's terms):
entropy never subtracts two numbers of the size of lse, and x - m is exact for nearby logits, so
|z| ~ 1e4 stays accurate. Keeping the target out of s gives log S = log1p(s) when y is the argmax,
so logp keeps its digits as p_y -> 1 (fl(S) = 1 + tiny would lose them).

Backward: one pass per row without an entropy term, two with one; reads the logits once per pass
and writes the gradient once (N * V * s written: masked-out rows only write zeros), with p recomputed
from the forward's lse, or from its logp relative to the target logit when that is the more precise
(large logits). 1 - p_y is -expm1(logp_y). The entropy term -p (log p + H) is formed as
-p (d - E_p[d]); E_p[d] is not among the forward's outputs (H and lse each carry ~ulp(log V), which
is the whole of log p + H on a near-uniform row), so a first pass recomputes it. In place, the
gradient overwrites the logits it was computed from, element by element within one program, so the
loss needs no (N, V) buffer of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sspo_kernels._options import check_temperature
from sspo_kernels._utils import new_empty
from sspo_kernels.ops.vocab.blocks import VocabBlockConfig, interpreting, transform_block_config, vocab_block_config

LOG2E = tl.constexpr(1.4426950408889634)
# start value of the running max: below every finite logit, yet x - m never becomes inf - inf
NEG_FLT_MAX = tl.constexpr(-3.4028234663852886e38)
# floor of the raw-logit shift of the running max: exp of it is 0 for any tau > 1e-8, and
# scaling it by 1/tau does not overflow to -inf (which would turn 0 * shift into NaN)
MIN_SHIFT = tl.constexpr(-1e30)


@triton.jit
def _log1p(u):
    """log(1 + u) to a few ulps also for tiny u (libdevice's log1p is not available to the interpreter):
    with w = fl(1 + u), log(w) * u / (w - 1) cancels the rounding of w."""
    w = 1.0 + u
    exact = w == 1.0
    return tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _one_minus_exp(u):
    """1 - e^u for u <= 0 without cancellation as u -> 0 (Kahan's expm1: (w - 1) * u / log w)."""
    w = tl.exp(u)
    direct = (w < 0.5) | (w == 1.0)  # no cancellation, or none to correct
    kahan = (1.0 - w) * (u / tl.log(tl.where(direct, 0.5, w)))
    return tl.where(w == 1.0, -u, tl.where(w < 0.5, 1.0 - w, kahan))


@triton.jit
def _transform(x, scale, softcap, TRANSFORM: tl.constexpr):
    """The logits' transform before the temperature (fp32 x): x (0), scale * x (1), or softcap *
    tanh(scale * x / softcap) (2); tanh from Kahan's 1 - e^u, accurate near 0 (no libdevice)."""
    if TRANSFORM == 0:
        return x
    u = x * scale
    if TRANSFORM == 1:
        return u
    a = tl.abs(u / softcap)
    t = _one_minus_exp(-2.0 * a) / (1.0 + tl.exp(-2.0 * a))
    return softcap * tl.where(u < 0, -t, t)


@triton.jit
def _transform_slope(x, scale, softcap, TRANSFORM: tl.constexpr):
    """d transform / dx: scale, times 1 - tanh^2 = 4 e / (1 + e)^2 (e = exp(-2 |u|)) with the soft-cap."""
    if TRANSFORM == 2:
        e = tl.exp(-2.0 * tl.abs(x * scale / softcap))
        return scale * (4.0 * e / ((1.0 + e) * (1.0 + e)))
    else:
        return tl.zeros_like(x) + scale  # also where x is -inf: no 0 * inf


@triton.jit
def _row_stats(p_row, i_y32, b_xy, V, inv_tau, scale, softcap, BLOCK_V: tl.constexpr, TRANSFORM: tl.constexpr):
    """One pass over a row: the max m of its raw logits and, with d_v = (x_v - m) / tau,

        d_y, log S (S = sum_v e^d) and mu = E_p[d] = sum_v e^d d / S.

    The sums run over v != y and the target's term is added at the end: when y is the argmax (d_y = 0),
    log S = log1p(sum_{v != y} e^d) keeps every digit of log p_y = -log S as p_y -> 1, where
    fl(S) = 1 + tiny would not. i_y32 = -1 for a target outside [0, V) (its b_xy is NaN and adds nothing)."""
    b_m = tl.full([], NEG_FLT_MAX, tl.float32)
    b_s = tl.zeros([], dtype=tl.float32)
    b_t = tl.zeros([], dtype=tl.float32)
    for i_v in range(0, V, BLOCK_V):
        o_v = i_v + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        # [BLOCK_V]
        b_x = tl.load(p_row + o_v, mask=m_v, other=float("-inf")).to(tl.float32)
        if TRANSFORM > 0:  # the masked lanes stay -inf
            b_x = tl.where(m_v, _transform(b_x, scale, softcap, TRANSFORM), float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_x, 0))
        b_shift = tl.maximum(b_m - b_m_new, MIN_SHIFT) * inv_tau
        b_a = tl.exp2(b_shift * LOG2E)
        # [BLOCK_V]
        b_d = (b_x - b_m_new) * inv_tau
        b_e = tl.where(o_v == i_y32, 0.0, tl.exp2(b_d * LOG2E))
        # e * d -> 0 where e underflows or d is -inf (masked lanes); a NaN logit keeps e = NaN
        b_t = b_a * b_t + (b_a * b_shift) * b_s + tl.sum(b_e * tl.where(b_e > 0, b_d, 0.0), 0)
        b_s = b_a * b_s + tl.sum(b_e, 0)
        b_m = b_m_new
    b_dy = (b_xy - b_m) * inv_tau
    b_ey = tl.where(i_y32 >= 0, tl.exp2(b_dy * LOG2E), 0.0)
    b_total = b_s + b_ey
    b_log_s = tl.where((b_dy == 0.0) & (i_y32 >= 0), _log1p(b_s), tl.log(b_total))
    b_mu = (b_t + b_ey * tl.where(b_ey > 0, b_dy, 0.0)) / b_total
    return b_m, b_dy, b_log_s, b_mu


@triton.jit
def logprob_entropy_fwd_kernel(
    logits_ptr,
    tokens_ptr,
    mask_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    row_start,
    V,
    T,
    stride_b,
    stride_t,
    inv_tau,
    scale,
    softcap,
    BLOCK_V: tl.constexpr,
    TRANSFORM: tl.constexpr,
):
    i_r = tl.program_id(0).to(tl.int64) + row_start
    p_row = logits_ptr + (i_r // T) * stride_b + (i_r % T) * stride_t
    if tl.load(mask_ptr + i_r):
        i_y = tl.load(tokens_ptr + i_r)
        m_y = (i_y >= 0) & (i_y < V)
        # an out-of-range target is never read: its logp comes out NaN
        b_xy = _transform(tl.load(p_row + i_y, mask=m_y, other=float("nan")).to(tl.float32), scale, softcap, TRANSFORM)
        i_y32 = tl.where(m_y, i_y, -1).to(tl.int32)
        b_m, b_dy, b_log_s, b_mu = _row_stats(p_row, i_y32, b_xy, V, inv_tau, scale, softcap, BLOCK_V, TRANSFORM)
        tl.store(logp_ptr + i_r, b_dy - b_log_s)
        tl.store(entropy_ptr + i_r, b_log_s - b_mu)
        tl.store(lse_ptr + i_r, b_m * inv_tau + b_log_s)
    else:
        tl.store(logp_ptr + i_r, 0.0)
        tl.store(entropy_ptr + i_r, 0.0)
        tl.store(lse_ptr + i_r, 0.0)


@triton.jit
def logprob_entropy_bwd_kernel(
    logits_ptr,
    tokens_ptr,
    mask_ptr,
    lse_ptr,
    logp_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_logits_ptr,
    row_start,
    V,
    T,
    stride_b,
    stride_t,
    stride_gb,
    stride_gt,
    inv_tau,
    scale,
    softcap,
    BLOCK_V: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    TRANSFORM: tl.constexpr,
):
    i_r = tl.program_id(0).to(tl.int64) + row_start
    i_b = i_r // T
    i_t = i_r % T
    p_row = logits_ptr + i_b * stride_b + i_t * stride_t
    p_grad = grad_logits_ptr + i_b * stride_gb + i_t * stride_gt
    if tl.load(mask_ptr + i_r):
        i_y = tl.load(tokens_ptr + i_r)
        m_y = (i_y >= 0) & (i_y < V)
        i_y32 = tl.where(m_y, i_y, -1).to(tl.int32)
        b_xy = _transform(tl.load(p_row + i_y, mask=m_y, other=0.0).to(tl.float32), scale, softcap, TRANSFORM)
        # In place, the loop below overwrites this row, x_y included, while other warps of this program
        # may not have loaded x_y yet: every warp must hold it before any store (one bar.sync per row).
        tl.debug_barrier()
        # an out-of-range target has no one-hot entry: the whole row comes out NaN, like its logp
        b_g = tl.where(m_y, tl.load(grad_logp_ptr + i_r), float("nan"))
        # log p = (x - x_ref) / tau + c, from the target (c = logp_y) when |logp_y| < |lse|, as for a likely
        # target among logits ~ 1e3: x - x_y is exact there while fp32 lse is off by ~ulp(1e3); else from
        # the origin (c = -lse). Without a forward logp, logp_ptr is lse and the origin is always chosen.
        b_lse = tl.load(lse_ptr + i_r)
        b_logp_y = tl.load(logp_ptr + i_r)
        m_ref = m_y & (tl.abs(b_logp_y) < tl.abs(b_lse))
        b_xref = tl.where(m_ref, b_xy, 0.0)
        b_c = tl.where(m_ref, b_logp_y, -b_lse)
        # 1 - p_y without cancelling as p_y -> 1 (the forward's logp_y keeps its digits there)
        b_q = _one_minus_exp((b_xy - b_xref) * inv_tau + b_c)
        if HAS_GRAD_ENTROPY:
            # dH/dz_v = -p_v (log p_v + H) = -p_v (d_v - E_p[d]) for any shift d = z - const, which
            # removes the two terms of size log V. E_p[d] is not among the forward's statistics (H and
            # lse are each off by ~ulp(log V)), so a first pass over the row recomputes it, shifted by
            # the row max m: d - E_p[d] is then accurate on near-uniform rows and at the argmax.
            b_ge = tl.load(grad_entropy_ptr + i_r)
            b_m, _, _, b_mu = _row_stats(p_row, i_y32, b_xy, V, inv_tau, scale, softcap, BLOCK_V, TRANSFORM)
        for i_v in range(0, V, BLOCK_V):
            o_v = i_v + tl.arange(0, BLOCK_V)
            m_v = o_v < V
            # [BLOCK_V]
            b_x = tl.load(p_row + o_v, mask=m_v, other=float("-inf")).to(tl.float32)
            if TRANSFORM > 0:  # dLoss/dx = dLoss/du * du/dx, the slope from the raw logit
                b_slope = _transform_slope(b_x, scale, softcap, TRANSFORM)
                b_x = tl.where(m_v, _transform(b_x, scale, softcap, TRANSFORM), float("-inf"))
            b_p = tl.exp2(((b_x - b_xref) * inv_tau + b_c) * LOG2E)
            # the target entry g * (1 - p) is formed in fp32, before the single rounding at the store
            b_grad = tl.where(o_v == i_y32, b_g * b_q, -b_g * b_p)
            if HAS_GRAD_ENTROPY:
                # p (log p + H) -> 0 where p underflows or the logit is -inf
                b_grad -= b_ge * b_p * tl.where(b_p > 0, (b_x - b_m) * inv_tau - b_mu, 0.0)
            if TRANSFORM > 0:
                b_grad = b_grad * b_slope
            tl.store(p_grad + o_v, (b_grad * inv_tau).to(grad_logits_ptr.dtype.element_ty), mask=m_v)
    else:
        for i_v in range(0, V, BLOCK_V):
            o_v = i_v + tl.arange(0, BLOCK_V)
            tl.store(p_grad + o_v, tl.zeros([BLOCK_V], dtype=grad_logits_ptr.dtype.element_ty), mask=o_v < V)


_LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _row_layout(logits: torch.Tensor) -> tuple[int, int, int, int]:
    """(N, T, stride_b, stride_t): row r of the flattened tokens starts at (r // T) * stride_b + (r % T) * stride_t."""
    if logits.dim() == 2:
        n = logits.shape[0]
        return n, max(n, 1), 0, logits.stride(0)
    b, t = logits.shape[:2]
    return b * t, max(t, 1), logits.stride(0), logits.stride(1)


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (N, V) or (B, T, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be bf16, fp16, fp32 or fp64, got {logits.dtype}")
    if logits.shape[-1] < 1:
        raise ValueError("logits has an empty vocabulary dimension")


def transform_id(scale: float, softcap: float | None) -> int:
    """The kernels' TRANSFORM constexpr: 0 none, 1 a scale, 2 a scale and a soft-cap."""
    return 2 if softcap is not None else 0 if float(scale) == 1.0 else 1


def _per_row(name: str, x: torch.Tensor, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """x as a contiguous (n,) tensor of the given dtype (a copy only when needed)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.numel() != n:
        raise ValueError(f"{name} must have one entry per row of logits ({n}), got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, logits on {device}")
    if dtype == torch.bool and x.dtype != torch.bool:
        x = x != 0
    elif dtype == torch.int64 and x.dtype.is_floating_point:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    return x.reshape(n).to(dtype).contiguous()


def _row_range(n: int, row_start: int, num_rows: int | None) -> int:
    if num_rows is None:
        num_rows = n - row_start
    if not (0 <= row_start <= n and 0 <= num_rows <= n - row_start):
        raise ValueError(f"rows [{row_start}, {row_start} + {num_rows}) are not inside the {n} rows of logits")
    return num_rows


def _launch_config(v: int, dtype: torch.dtype, config: tuple[int, int] | None, transform: int = 0) -> VocabBlockConfig:
    if config is None:
        block = vocab_block_config(v, dtype)
        return transform_block_config(block) if transform and not interpreting() else block
    block_v, num_warps = config
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"config block_v must be a power of 2, got {block_v}")
    return VocabBlockConfig(block_v, num_warps)


def logprob_entropy_fwd(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    *,
    scale: float = 1.0,
    softcap: float | None = None,
    row_start: int = 0,
    num_rows: int | None = None,
    config: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row log p(y), entropy and logsumexp of z = transform(logits) / temperature, the transform
    `scale * x`, soft-capped to `softcap * tanh(. / softcap)` when `softcap` is given.

    logits: (N, V) or (B, T, V), bf16 / fp16 / fp32 (fp64 is read and computed in fp32); any row
        strides are read in place; a last stride other than 1 costs a copy.
    tokens: (N,) integer ids (anything at masked-out rows); mask: (N,) bool.
    row_start, num_rows: compute only rows [row_start, row_start + num_rows) (default: all); the other
        output entries are left unwritten.
    config: (BLOCK_V, num_warps) instead of the heuristic's choice (tests, benchmarks).

    Returns logp, entropy, lse: (N,) float32 each, exactly 0 at masked-out rows. A target id outside
    [0, V) at a kept row gives a NaN logp; NaN logits give NaN outputs.
    """
    _check_logits(logits)
    inv_tau = 1.0 / check_temperature(temperature)
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        logits = logits.contiguous()
    n, t, stride_b, stride_t = _row_layout(logits)
    v, device = logits.shape[-1], logits.device
    tokens = _per_row("tokens", tokens, n, device, torch.int64)
    mask = _per_row("mask", mask, n, device, torch.bool)
    num_rows = _row_range(n, row_start, num_rows)

    logp = new_empty((n,), torch.float32, device)
    entropy = new_empty((n,), torch.float32, device)
    lse = new_empty((n,), torch.float32, device)
    if num_rows == 0:
        return logp, entropy, lse
    block_v, num_warps = _launch_config(v, logits.dtype, config, transform_id(scale, softcap))
    logprob_entropy_fwd_kernel[(num_rows,)](
        logits,
        tokens,
        mask,
        logp,
        entropy,
        lse,
        row_start,
        v,
        t,
        stride_b,
        stride_t,
        inv_tau,
        scale,
        softcap or 1.0,
        BLOCK_V=block_v,
        TRANSFORM=transform_id(scale, softcap),
        num_warps=num_warps,
    )
    return logp, entropy, lse


def logprob_entropy_bwd(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    *,
    scale: float = 1.0,
    softcap: float | None = None,
    inplace: bool = False,
    logp: torch.Tensor | None = None,
    rows: None = None,
    row_start: int = 0,
    num_rows: int | None = None,
    config: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Gradient of sum_t grad_logp[t] * logp[t] + grad_entropy[t] * entropy[t] with respect to logits.

    grad_logits = (1/tau) * (g * (onehot(y) - p) - e * p * (log p + H)), computed in fp32 and rounded
    once to logits' dtype; exactly 0 at masked-out rows. lse is the forward's output; entropy is
    accepted for the common signature and not read (log p + H is recomputed as z - E_p[z], in a first
    pass over the row). grad_entropy=None means all zero: the entropy term and that pass are compiled out.
    logp: the forward's logp, optional. With it, p is taken relative to the target logit wherever
        |logp| < |lse|, which keeps the gradient at fp32 accuracy for large logits (|z| ~ 1e3) and
        likely targets, and 1 - p_y = -expm1(logp_y) keeps its digits as p_y -> 1; without it,
        p = exp(z - lse) carries the rounding of the fp32 lse, a relative error of ~eps32 * |lse|
        (4e-5 at lse ~ 1e3, 4e-6 at lse ~ 30), and 1 - p_y the same absolute error.
    rows: the torch pass's row statistics, accepted for the common signature; this forward has none.
    scale, softcap: the forward's logit transform; the gradient is taken through it.
    inplace: write the gradient over the logits buffer and return logits itself (needs a unit last
        stride); otherwise return a new contiguous tensor shaped like logits.
    row_start, num_rows, config: as in `logprob_entropy_fwd`; rows outside the range are not written.
    """
    _check_logits(logits)
    inv_tau = 1.0 / check_temperature(temperature)
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        if inplace:
            raise ValueError("inplace=True needs logits with a unit last stride")
        logits = logits.contiguous()
    n, t, stride_b, stride_t = _row_layout(logits)
    v, device = logits.shape[-1], logits.device
    tokens = _per_row("tokens", tokens, n, device, torch.int64)
    mask = _per_row("mask", mask, n, device, torch.bool)
    lse = _per_row("lse", lse, n, device, torch.float32)
    logp = lse if logp is None else _per_row("logp", logp, n, device, torch.float32)
    grad_logp = _per_row("grad_logp", grad_logp, n, device, torch.float32)
    has_grad_entropy = grad_entropy is not None
    # never read by the kernel (see above); a valid pointer all the same
    entropy = lse
    if has_grad_entropy:
        grad_entropy = _per_row("grad_entropy", grad_entropy, n, device, torch.float32)
    else:
        # never read: the HAS_GRAD_ENTROPY=False kernel compiles the entropy term out
        grad_entropy = lse
    num_rows = _row_range(n, row_start, num_rows)

    if inplace:
        grad_logits = logits
        stride_gb, stride_gt = stride_b, stride_t
    else:
        grad_logits = new_empty(logits.shape, logits.dtype, device)
        stride_gb = grad_logits.stride(0) if logits.dim() == 3 else 0
        stride_gt = grad_logits.stride(-2)
    if num_rows == 0:
        return grad_logits
    block_v, num_warps = _launch_config(v, logits.dtype, config, transform_id(scale, softcap))
    logprob_entropy_bwd_kernel[(num_rows,)](
        logits, tokens, mask, lse, logp, entropy, grad_logp, grad_entropy, grad_logits,
        row_start, v, t, stride_b, stride_t, stride_gb, stride_gt, inv_tau, scale, softcap or 1.0,
        BLOCK_V=block_v, HAS_GRAD_ENTROPY=has_grad_entropy, TRANSFORM=transform_id(scale, softcap),
        num_warps=num_warps,
    )  # fmt: skip
    return grad_logits
