import os

import pytest

from support.tokenizer import ByteTokenizer, get_tokenizer


def test_gpt2_bpe_matches_known_ids():
    if not os.path.isdir(os.environ.get("TIKTOKEN_CACHE_DIR", "")):
        pytest.skip("needs ../shared/tiktoken_cache for offline BPE files")
    tok = get_tokenizer("gpt2")
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = [
        15496,
        11,
        466,
        345,
        588,
        8887,
        30,
        220,
        50256,
        554,
        262,
        4252,
        18250,
        8812,
        2114,
        286,
        617,
        34680,
        27271,
        13,
    ]
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.eot_token) == (50257, 50256)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain ascii",
        "héllo wörld — “quotes”",
        "日本語のテキスト",
        "emoji 🎉🧪 and\ttabs\nnewlines",
        "a<|endoftext|>b",
        "\x00\x7f\U0010ffff",
    ],
)
def test_byte_tokenizer_round_trips_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_special_token_and_invalid_bytes():
    tok = ByteTokenizer()
    assert tok.encode("a<|endoftext|>") == [97, 256]
    assert tok.decode([0xFF, 97]) == "\ufffda"  # not UTF-8: replaced, not an exception


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="'bytes' or 'gpt2'"):
        get_tokenizer("llama")
