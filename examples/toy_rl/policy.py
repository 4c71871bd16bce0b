"""The policy: a small character-level GRU with a linear output layer, and its supervised warm-up.

The RL loss never sees logits: it takes the GRU's hidden states and the output layer's weight and
bias (`sspo_loss_from_hidden`). Logits are formed here only to sample and in the warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from examples.toy_rl.task import PAD, STOP, VOCAB, SortTask, corrupt


class GRUPolicy(nn.Module):
    """Embedding -> `layers`-layer GRU -> linear head over the vocabulary."""

    def __init__(self, embed_dim: int = 64, hidden_dim: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), embed_dim)
        self.gru = nn.GRU(embed_dim, hidden_dim, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden_dim, len(VOCAB))

    def response_hidden(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """(B, R, H) hidden states from which each response token is predicted.

        prompts (B, P), responses (B, R): the state after prompt token P-1 predicts response token 0,
        the state after response token t predicts token t + 1.
        """
        inputs = torch.cat([prompts, responses[:, :-1]], dim=1)
        states, _ = self.gru(self.embed(inputs))
        return states[:, prompts.shape[1] - 1 :]

    @torch.no_grad()
    def sample(
        self, prompts: torch.Tensor, length: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample up to `length` tokens per prompt (P columns), stopping after '.'.

        Returns tokens (B, R) (PAD after the '.'), mask (B, R) bool (True up to and including the
        '.', or everywhere when no '.' came) and the sampling log-probs (B, R) fp32 (0 where masked out).
        """
        batch = prompts.shape[0]
        tokens = torch.full((batch, length), PAD, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.bool)
        logprobs = torch.zeros(batch, length)
        states, carry = self.gru(self.embed(prompts))
        last = states[:, -1]
        alive = torch.ones(batch, dtype=torch.bool)
        for t in range(length):
            logp = F.log_softmax(self.head(last), dim=-1)
            token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
            tokens[:, t] = torch.where(alive, token, PAD)
            mask[:, t] = alive
            logprobs[:, t] = torch.where(alive, logp.gather(1, token[:, None]).squeeze(1), 0.0)
            alive = alive & (token != STOP)
            if not alive.any() or t == length - 1:
                break
            out, carry = self.gru(self.embed(tokens[:, t : t + 1]), carry)
            last = out[:, 0]
        return tokens, mask, logprobs


@dataclass(frozen=True)
class WarmupConfig:
    """Supervised warm-up on noisy targets: `noise` of the answers carry one mistake."""

    steps: int = 600
    batch: int = 64
    lr: float = 3e-3
    noise: float = 0.5


def warm_up(policy: GRUPolicy, task: SortTask, cfg: WarmupConfig, generator: torch.Generator) -> list[float]:
    """Teacher-forced cross-entropy on the response tokens; returns the loss of every step."""
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    losses = []
    for _ in range(cfg.steps):
        problems = task.sample(cfg.batch, generator)
        noisy = torch.rand(cfg.batch, generator=generator) < cfg.noise
        answers = [corrupt(p, generator) if bad else sorted(p) for p, bad in zip(problems, noisy.tolist())]
        prompts = task.encode_prompts(problems)
        targets, mask = task.encode_responses(answers)
        logits = policy.head(policy.response_hidden(prompts, targets))
        loss = F.cross_entropy(logits[mask], targets[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
