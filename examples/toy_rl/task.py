"""The toy task: sort a few numbers, one character per token.

Prompt `^34,7,81,12>`, response `7,12,34,81.`. The vocabulary has 15 symbols: the ten digits, the
separators ',' and '.', the start marker '^', the end-of-prompt marker '>' and a padding '_'.
Every number of a response is one subsentence: `boundary_table` marks ',' and '.'.

Layouts (all int64 token ids):
- prompts: (B, P) left-padded with PAD so every prompt ends at column P - 1 with '>';
- responses: (B, R) right-padded with PAD after the closing '.', mask (B, R) bool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VOCAB: tuple[str, ...] = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ",", ".", "^", ">", "_")
ID = {symbol: i for i, symbol in enumerate(VOCAB)}
COMMA, STOP, START, PROMPT_END, PAD = ID[","], ID["."], ID["^"], ID[">"], ID["_"]
MAX_VALUE = 99  # numbers are drawn from 0..MAX_VALUE (one or two digits)


@dataclass(frozen=True)
class SortTask:
    """Sort `min_len`..`max_len` numbers in 0..99."""

    min_len: int = 3
    max_len: int = 5

    def __post_init__(self) -> None:
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}..{self.max_len}")

    @property
    def prompt_len(self) -> int:
        """P: '^', max_len two-digit numbers with commas between them, '>'."""
        return 3 * self.max_len + 1

    @property
    def response_len(self) -> int:
        """R: room for the longest answer (3 * max_len tokens with its '.') plus two tokens of slack."""
        return 3 * self.max_len + 2

    def sample(self, n: int, generator: torch.Generator) -> list[list[int]]:
        """n problems, each a list of numbers."""
        lengths = torch.randint(self.min_len, self.max_len + 1, (n,), generator=generator).tolist()
        return [torch.randint(0, MAX_VALUE + 1, (k,), generator=generator).tolist() for k in lengths]

    def encode_prompts(self, problems: list[list[int]]) -> torch.Tensor:
        """(B, P) left-padded prompt ids."""
        rows = [encode("^" + ",".join(map(str, numbers)) + ">") for numbers in problems]
        return torch.tensor([[PAD] * (self.prompt_len - len(r)) + r for r in rows], dtype=torch.long)

    def encode_responses(self, answers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R) ids and (B, R) bool mask of the answers written out with their closing '.'."""
        rows = [encode(",".join(map(str, numbers)) + ".")[: self.response_len] for numbers in answers]
        tokens = torch.tensor([r + [PAD] * (self.response_len - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[True] * len(r) + [False] * (self.response_len - len(r)) for r in rows])
        return tokens, mask

    def rewards(self, problems: list[list[int]], responses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) fp32 reward of each response (see `reward`)."""
        texts = [decode(row[: int(n)]) for row, n in zip(responses.tolist(), mask.sum(1).tolist())]
        return torch.tensor([reward(p, t) for p, t in zip(problems, texts)], dtype=torch.float32)


def encode(text: str) -> list[int]:
    return [ID[c] for c in text]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def _parse_number(field: str) -> int | None:
    """A one- or two-digit number without a leading zero, else None."""
    if field.isdigit() and len(field) <= 2 and (field == "0" or not field.startswith("0")):
        return int(field)
    return None


def reward(numbers: list[int], text: str) -> float:
    """Share of positions that hold the right number, over max(answer length, problem length).

    0 unless the text contains the closing '.'; what follows the first '.' is ignored. A field that
    is not a well-formed number occupies its position and matches nothing.
    """
    if "." not in text:
        return 0.0
    fields = text.split(".", 1)[0].split(",")
    predicted = [_parse_number(f) for f in fields]
    target = sorted(numbers)
    hits = sum(p == t for p, t in zip(predicted, target))
    return hits / max(len(predicted), len(target))


def corrupt(numbers: list[int], generator: torch.Generator) -> list[int]:
    """The sorted list with one mistake: two neighbours swapped, one number replaced, dropped or repeated."""
    answer = sorted(numbers)
    kind = int(torch.randint(0, 4, (), generator=generator))
    i = int(torch.randint(0, len(answer), (), generator=generator))
    if kind == 0 and len(answer) > 1:
        j = min(i + 1, len(answer) - 1) if i + 1 < len(answer) else i - 1
        answer[i], answer[j] = answer[j], answer[i]
    elif kind == 1:
        answer[i] = int(torch.randint(0, MAX_VALUE + 1, (), generator=generator))
    elif kind == 2 and len(answer) > 1:
        del answer[i]
    else:
        answer.insert(i, answer[i])
    return answer
