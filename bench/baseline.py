"""The baseline: the SSPO loss written the way TRL and verl users write a policy loss today.

Plain eager PyTorch in fp32 over the whole `(N, V)` logits at once: upcast, full `log_softmax`,
`gather` of the sampled token, the entropy from the same log-probabilities, then the segment
ratios with `index_add`. Same maths as docs/loss.md with the default options (subsentence, sequence or
token segments; entropy-adaptive bounds against the batch-mean entropy; token-mean aggregation),
so every fast path is compared with what a user would otherwise run. It is deliberately not tuned:
what it allocates is the point of the comparison. Two choices keep it from looking worse than it
is: the division by the temperature is skipped at 1.0 (TRL always divides, which costs one more
`(N, V)` fp32 copy), and the entropy is computed under `no_grad`, since SSPO uses it detached.

`baseline_loss_from_hidden` is the fused-linear path's baseline: `hidden @ weight.T` in the
input dtype, then the same loss.
"""

from __future__ import annotations

import torch

from sspo_kernels._options import make_config


def _segment_ids(tokens, mask, granularity, boundary, response=None):
    """(N,) segment slot of every token in [0, N + B): tokens that share a slot share a segment.

    tokens, mask: (B, T), or (1, N) with `response` (N,) the response id of each token of a packed
    batch. Within a response, the k-th segment holds the masked-in tokens preceded by exactly k
    masked-in boundary tokens, so padding inside a response never splits a segment. Masked-out
    tokens get some slot too; their contributions are multiplied by the mask.
    """
    b, t = tokens.shape
    rows = torch.arange(b, device=tokens.device)[:, None] * t
    if response is not None:
        rows = response[None]  # slot = boundaries before the token in the whole batch + its response id
    if granularity == "token":
        return torch.arange(b * t, device=tokens.device)
    if granularity == "sequence":
        return rows.expand(b, t).reshape(-1)
    ends = boundary[tokens.clamp(min=0)] & mask
    before = ends.long().cumsum(1) - ends.long()
    return (rows + before).reshape(-1)


def baseline_sspo_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    granularity: str = "subsentence",
    boundary: torch.Tensor | None = None,
    temperature: float = 1.0,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, logprobs, entropy, metrics) of docs/loss.md's default options, in eager fp32.

    logits (B, T, V), (N, V) (then one response) or (N, V) packed with `cu_seqlens` (B + 1,); tokens,
    old_logprobs, mask shaped like logits without V; advantages per response (B,) or per token.
    granularity: "subsentence" / "sentence" (needs `boundary`, a (V,) bool table), "sequence" or "token".
    """
    cfg = make_config(granularity, temperature=temperature)
    flat = logits.dim() == 2
    response = None
    if cu_seqlens is not None:
        n = tokens.shape[0]
        response = torch.searchsorted(cu_seqlens[1:], torch.arange(n, device=tokens.device), right=True)
        if advantages.shape != tokens.shape:
            advantages = advantages[response]
    if flat:
        if advantages.shape == tokens.shape:
            advantages = advantages[None]
        logits, tokens, old_logprobs, mask = logits[None], tokens[None], old_logprobs[None], mask[None]
    b, t, _ = logits.shape
    mask = mask.bool()
    if advantages.shape == (b,):
        advantages = advantages[:, None].expand(b, t)

    # The vocabulary part: three (N, V) fp32 tensors live at once, as in a typical trainer.
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    log_probs = torch.log_softmax(z, dim=-1)
    logp = log_probs.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)

    # The segment part: per-segment sums with index_add over N slots.
    seg = _segment_ids(tokens, mask, cfg.granularity, boundary, response)
    m = mask.reshape(-1).float()
    logp_f, ent_f = logp.reshape(-1), entropy.reshape(-1)
    old_f, adv_f = old_logprobs.reshape(-1).float(), advantages.reshape(-1).float()
    n = m.shape[0]
    n_tokens = m.sum().clamp(min=1)
    zeros = torch.zeros(n + (0 if cu_seqlens is None else cu_seqlens.shape[0] - 1), device=m.device)
    count = zeros.index_add(0, seg, m)
    n_seg = count.clamp(min=1)
    log_ratio = zeros.index_add(0, seg, (logp_f - old_f) * m) / n_seg
    c = cfg.log_ratio_clamp
    rho = torch.exp(log_ratio.clamp(-c, c))
    h_bar = zeros.index_add(0, seg, ent_f * m) / n_seg
    if cfg.entropy_gamma == 0:
        k = torch.ones_like(h_bar)
    else:
        h_ref = (ent_f * m).sum() / n_tokens
        k = (h_bar / h_ref).pow(cfg.entropy_gamma).clamp(cfg.k_min, cfg.k_max)
        k = torch.where(h_ref > 0, k, torch.ones_like(k))
    lo = 1 - cfg.eps_low * k
    hi = 1 + cfg.eps_high * k

    rho_t, lo_t, hi_t = rho[seg], lo[seg], hi[seg]
    per_token = torch.maximum(-adv_f * rho_t, -adv_f * torch.clamp(rho_t, lo_t, hi_t))
    loss = (per_token * m).sum() / n_tokens

    with torch.no_grad():
        used = count > 0
        clip_low = ((adv_f < 0) & (rho_t < lo_t)).float() * m
        clip_high = ((adv_f > 0) & (rho_t > hi_t)).float() * m
        num_segments = used.sum()
        metrics = {
            "clip_frac_low": clip_low.sum() / n_tokens,
            "clip_frac_high": clip_high.sum() / n_tokens,
            "clip_frac": (clip_low + clip_high).sum() / n_tokens,
            "ratio_mean": (rho * used).sum() / num_segments.clamp(min=1),
            "ratio_min": torch.where(used, rho, torch.inf).min(),
            "ratio_max": torch.where(used, rho, -torch.inf).max(),
            "entropy_mean": (ent_f * m).sum() / n_tokens,
            "approx_kl": ((old_f - logp_f) * m).sum() / n_tokens,
            "num_segments": num_segments,
            "mean_segment_len": m.sum() / num_segments.clamp(min=1),
        }
    shape = (t,) if flat else (b, t)
    return loss, (logp_f.detach() * m).reshape(shape), (ent_f * m).reshape(shape), metrics


def baseline_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The unfused path from hidden states: logits = hidden @ weight.T (+ bias), then `baseline_sspo_loss`.

    hidden (B, T, H) or (N, H); weight (V, H); bias (V,) or None.
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return baseline_sspo_loss(logits, tokens, old_logprobs, advantages, mask, **options)
