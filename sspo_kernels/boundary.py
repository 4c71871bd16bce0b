"""Boundary tables: which vocabulary ids end a subsentence or a sentence (docs/loss.md "Segments").

A boundary token is one whose decoded text contains a boundary character. `boundary_table`
decides that once per tokenizer, on the host, and returns a `(V,)` bool tensor; the loss then
looks tokens up in it on the device.

How a token's text is found, per kind of input:

- a plain sequence of strings is taken as already-decoded text, one entry per id;
- a `tokenizers.Tokenizer` or a Hugging Face tokenizer is read as token strings
  (`id_to_token` / `convert_ids_to_tokens`), and each string is turned into text by itself:
  - byte-level BPE vocabularies (GPT-2, Qwen, Llama 3) spell raw bytes with GPT-2's
    byte-to-unicode map ('Ġ' is a space, 'Ċ' a newline). The string is mapped back to its
    bytes and decoded as UTF-8 with invalid bytes dropped. A token that holds only part of a
    multi-byte character, e.g. the first two of the three bytes of '。', therefore has no text
    and is never a boundary, even where the byte sequence it starts ends in a boundary character;
  - other vocabularies (SentencePiece, WordPiece) have '▁' turned into a space and byte-fallback
    pieces such as '<0x0A>' turned into their byte (the same UTF-8 rule applies, so '<0x0A>' is a
    newline and '<0xE3>' is nothing). A WordPiece '##' prefix is kept as written;
  - added and special tokens are taken as their literal content.

A tokenizer is treated as byte-level when its vocabulary holds the single-character tokens for
newline, space or tab in the byte-level spelling ('Ċ', 'Ġ', 'ĉ') and its own `decode` turns one of
them into that raw character; without a `decode`, when it holds all 68 remapped characters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

SUBSENTENCE_CHARS: frozenset[str] = frozenset(".,;:!?\n。，、；：！？")
COMMA_CHARS: frozenset[str] = frozenset(",，、")
SENTENCE_CHARS: frozenset[str] = SUBSENTENCE_CHARS - COMMA_CHARS

__all__ = ["COMMA_CHARS", "SENTENCE_CHARS", "SUBSENTENCE_CHARS", "boundary_table"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    The 188 bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves.
    The other 68 (controls, space, DEL, NBSP, soft hyphen) take the code points 256, 257, ... in
    increasing byte order, so 0x20 (space) becomes U+0120 'Ġ' and 0x0A (newline) U+010A 'Ċ'.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    remapped = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(remapped)})
    return table


_BYTE_TO_CHAR: dict[int, str] = _bytes_to_unicode()
_CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in _BYTE_TO_CHAR.items()}
_REMAPPED_CHARS: frozenset[str] = frozenset(c for b, c in _BYTE_TO_CHAR.items() if chr(b) != c)
# raw character -> its byte-level spelling, for the tokens probed by _is_byte_level
_PROBES: tuple[tuple[str, str], ...] = tuple((ch, _BYTE_TO_CHAR[ord(ch)]) for ch in "\n \t")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_text(piece: str) -> str:
    """A byte-level token string back to text; characters outside the map are kept as UTF-8."""
    raw = bytearray()
    for ch in piece:
        b = _CHAR_TO_BYTE.get(ch)
        if b is None:
            raw += ch.encode("utf-8")
        else:
            raw.append(b)
    return raw.decode("utf-8", errors="ignore")


def _piece_text(piece: str) -> str:
    """A SentencePiece / WordPiece token string to text."""
    m = _BYTE_FALLBACK.fullmatch(piece)
    if m is not None:
        return bytes([int(m.group(1), 16)]).decode("utf-8", errors="ignore")
    return piece.replace("▁", " ")


def _is_byte_level(pieces: Sequence[str | None], decode: Callable[[list[int]], str] | None) -> bool:
    single = {p: i for i, p in enumerate(pieces) if p is not None and len(p) == 1}
    probes = [(single[spelled], raw) for raw, spelled in _PROBES if spelled in single]
    if not probes:
        return False
    if decode is not None:
        return any(decode([i]) == raw for i, raw in probes)
    return _REMAPPED_CHARS.issubset(single)


def _texts_from_pieces(
    pieces: Sequence[str | None],
    added: Mapping[int, str],
    decode: Callable[[list[int]], str] | None,
) -> list[str]:
    """Text of each id from its token string; `added` holds the literal text of added tokens."""
    convert = _byte_level_text if _is_byte_level(pieces, decode) else _piece_text
    texts = []
    for i, piece in enumerate(pieces):
        if i in added:
            texts.append(added[i])
        elif piece is None:
            # a hole in the vocabulary: no token has this id
            texts.append("")
        else:
            texts.append(convert(piece))
    return texts


def _added_contents(added_decoder: Mapping[int, object]) -> dict[int, str]:
    return {int(i): str(getattr(t, "content", t)) for i, t in added_decoder.items()}


def _texts_from_tokenizers(tok) -> list[str]:
    """`tokenizers.Tokenizer` (or anything with its `get_vocab_size` / `id_to_token`)."""
    added = _added_contents(tok.get_added_tokens_decoder()) if hasattr(tok, "get_added_tokens_decoder") else {}
    n = max(tok.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
    pieces = [tok.id_to_token(i) for i in range(n)]
    return _texts_from_pieces(pieces, added, getattr(tok, "decode", None))


def _texts_from_hf(tok) -> list[str]:
    """A Hugging Face tokenizer, slow or fast, or a duck-typed stand-in."""
    if hasattr(tok, "__len__"):
        n = len(tok)
    elif isinstance(getattr(tok, "vocab_size", None), int):
        n = tok.vocab_size
    else:
        raise TypeError("tokenizer_or_tokens: a Hugging Face tokenizer needs len(tokenizer) or a vocab_size attribute")
    added = _added_contents(getattr(tok, "added_tokens_decoder", None) or {})
    n = max(n, max(added, default=-1) + 1)
    decode = getattr(tok, "decode", None)
    if not hasattr(tok, "convert_ids_to_tokens"):
        # only decode: the tokenizer's own text, one id at a time
        return [added[i] if i in added else decode([i]) for i in range(n)]
    pieces = list(tok.convert_ids_to_tokens(list(range(n))))
    if len(pieces) != n:
        raise ValueError(f"tokenizer_or_tokens: convert_ids_to_tokens returned {len(pieces)} tokens for {n} ids")
    return _texts_from_pieces(pieces, added, decode)


def _texts_from_list(tokens: Sequence[object]) -> list[str]:
    texts = []
    for i, t in enumerate(tokens):
        if t is None:
            texts.append("")
        elif isinstance(t, str):
            texts.append(t)
        else:
            raise TypeError(
                f"tokenizer_or_tokens[{i}] must be a str (or None for an unused id), got {type(t).__name__}"
            )
    return texts


def _token_texts(source: object) -> list[str]:
    if isinstance(source, (str, bytes)):
        raise TypeError(
            "tokenizer_or_tokens must be a tokenizer or a sequence of token strings, not a single "
            f"{type(source).__name__}"
        )
    if hasattr(source, "get_vocab_size") and hasattr(source, "id_to_token"):
        return _texts_from_tokenizers(source)
    if hasattr(source, "convert_ids_to_tokens") or hasattr(source, "decode"):
        return _texts_from_hf(source)
    if isinstance(source, Sequence):
        return _texts_from_list(source)
    raise TypeError(
        "tokenizer_or_tokens must be a Hugging Face tokenizer, a tokenizers.Tokenizer or a sequence of "
        f"token strings, got {type(source).__name__}"
    )


def _check_chars(chars: object) -> frozenset[str]:
    if chars is None or not isinstance(chars, Iterable):
        raise TypeError(f"chars must be an iterable of single characters, got {type(chars).__name__}")
    out = set()
    for c in chars:
        if not isinstance(c, str):
            raise TypeError(f"chars must hold single-character strings, got a {type(c).__name__}: {c!r}")
        if len(c) != 1:
            raise ValueError(f"chars must hold single-character strings, got {c!r} of length {len(c)}")
        out.add(c)
    if not out:
        raise ValueError('chars is empty: no token would be a boundary (use granularity="sequence" for that)')
    return frozenset(out)


def _check_vocab_size(vocab_size: object, tokenizer_size: int) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < tokenizer_size:
        raise ValueError(
            f"vocab_size ({vocab_size}) is smaller than the tokenizer's {tokenizer_size} ids; it should be "
            "the model's logits width, which is at least the tokenizer's size"
        )
    return vocab_size


def boundary_table(
    tokenizer_or_tokens,
    chars: Iterable[str] = SUBSENTENCE_CHARS,
    *,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(V,) bool: True for token ids whose decoded text contains a boundary character.

    Args:
        tokenizer_or_tokens (tokenizer or Sequence[str | None]):
            A Hugging Face tokenizer, a `tokenizers.Tokenizer`, or the decoded text of every id in
            order (None for an unused id). See the module docstring for how token text is found.
        chars (Iterable[str], Optional):
            The boundary characters, each a one-character string.
            Default: `SUBSENTENCE_CHARS`; pass `SENTENCE_CHARS` for `granularity="sentence"`.
        vocab_size (int, Optional):
            Length of the table, the model's logits width when it is larger than the tokenizer
            (ids past the tokenizer's are not boundaries). Must not be smaller than the tokenizer.
            Default: the tokenizer's size, added tokens included.
        device (torch.device | str, Optional):
            Where to put the table. Default: the CPU.

    Returns:
        A `(V,)` bool tensor, V = `vocab_size` or the tokenizer's size.

    Examples::
        >>> boundary_table(["Hello", ",", " world", ".\\n"])
        tensor([False,  True, False,  True])
        >>> boundary_table(["Hello", ",", " world", ".\\n"], SENTENCE_CHARS, vocab_size=6)
        tensor([False, False, False,  True, False, False])
    """
    charset = _check_chars(chars)
    texts = _token_texts(tokenizer_or_tokens)
    size = len(texts) if vocab_size is None else _check_vocab_size(vocab_size, len(texts))
    table = torch.zeros(size, dtype=torch.bool)
    table[: len(texts)] = torch.tensor([not charset.isdisjoint(t) for t in texts], dtype=torch.bool)
    return table if device is None else table.to(device)
