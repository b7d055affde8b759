"""Tokenizers: round trips, clear errors, saved forms, and GPT-2 parity with independent encoders."""

import json

import pytest
from conftest import shared_file

from slmkit.errors import UserError
from slmkit.tokenizers import (
    CharTokenizer,
    GPT2Tokenizer,
    HFByteLevelTokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_dict,
)


def test_char_round_trip_and_vocabulary_from_corpus():
    tok = CharTokenizer.train("hello world\n")
    assert tok.vocab_size == len(set("hello world\n"))
    ids = tok.encode("hold world")
    assert tok.decode(ids) == "hold world"


def test_char_unknown_character_names_it():
    tok = CharTokenizer.train("abc")
    with pytest.raises(UserError, match=r"'é' \(U\+00E9\)"):
        tok.encode("abé")


def test_bpe_trains_round_trips_and_reserves_fine_tuning_tokens():
    text = "the quick brown fox jumps over the lazy dog. " * 200 + "naïve café — ünïcödé ✓\n"
    tok = HFByteLevelTokenizer.train(iter([text]), vocab_size=300)
    assert set(tok.special) == {"eot", "start", "delim", "extract"}
    assert tok.vocab_size <= 300
    for sample in ["the lazy fox", "naïve café — ✓", "unseen wörds 123"]:
        assert tok.decode(tok.encode(sample)) == sample
    # The saved form reproduces the same encodings.
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.encode(text[:500]) == tok.encode(text[:500])
    assert again.fingerprint() == tok.fingerprint()


def test_save_and_load(tmp_path):
    tok = CharTokenizer.train("abc\n")
    save_tokenizer(tok, tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json").fingerprint() == tok.fingerprint()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupted"):
        load_tokenizer(tmp_path / "bad.json")


def test_stream_decoder_holds_back_partial_multibyte_characters():
    text = "héllo ✓ 日本"
    tok = HFByteLevelTokenizer.train(iter(["plain ascii only " * 50]), vocab_size=270)
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several byte tokens
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer.from_files(shared_file("vocab", "gpt2"))


def _gutenberg_lines(limit=None):
    lines = shared_file("corpus", "gutenberg", "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    return lines[:limit] if limit else lines


def test_gpt2_encoding_equals_hf_tokenizers_built_from_the_same_files(gpt2):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab_dir = shared_file("vocab", "gpt2")
    hf = Tokenizer(models.BPE.from_file(str(vocab_dir / "encoder.json"), str(vocab_dir / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    lines = _gutenberg_lines()
    ours = gpt2.encode_batch(lines)
    theirs = [e.ids for e in hf.encode_batch(lines)]
    mismatches = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    assert not mismatches, f"line {mismatches[0]}: {lines[mismatches[0]]!r}"


def test_gpt2_encoding_equals_tiktokens_own_loader(gpt2):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from slmkit.tokenizers import GPT2_PATTERN

    vocab_dir = shared_file("vocab", "gpt2")
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_dir / "vocab.bpe"), str(vocab_dir / "encoder.json"))
    ref = tiktoken.Encoding("ref", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    text = "".join(_gutenberg_lines())
    ids = gpt2.encode(text)
    assert ids == ref.encode_ordinary(text)
    assert gpt2.decode(ids) == text
    assert gpt2.vocab_size == 50257 and gpt2.special["eot"] == 50256


def test_gpt2_missing_files_are_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="encoder.json"):
        GPT2Tokenizer.from_files(tmp_path)
