"""Issue 14: the streaming, sharded `slm prepare` (--workers, --shard-tokens): the same tokens as the
in-memory path, shards read as one array, training and exact resume on shards, damaged shards as one
error line, crash safety and resume of a preparation, JSON Lines read as a stream."""

import gzip
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import cli_fails, shared_file, tiny_config

import slmkit.data as data_mod
import slmkit.sources as sources
from slmkit.config import DataConfig
from slmkit.data import Piece as MemPiece
from slmkit.data import chunk_text, gather, open_prepared, prepare, split_pieces
from slmkit.errors import UserError
from slmkit.shards import ShardedTokens, ShardWriter, chunk_stream, document_pieces, split_stream

SHARD = 1000  # tokens per shard in these tests: a 20 KB corpus makes about twenty


def tokens_of(prepared, split):
    return np.asarray(prepared.tokens(split))


def same_tokens(a, b):
    for split in ("train", "val"):
        x, y = tokens_of(a, split), tokens_of(b, split)
        assert x.dtype == y.dtype and np.array_equal(x, y), split
    assert a.meta["chars"] == b.meta["chars"] and a.meta["documents"] == b.meta["documents"]
    assert a.tokenizer.fingerprint() == b.tokenizer.fingerprint()
    assert a.meta["key"] == b.meta["key"]  # one cache entry, whichever path made it


def snapshot(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture
def docs_folder(tmp_path):
    """Several documents (a bpe corpus with end-of-text tokens), one with CR LF line ends, one empty."""
    rng = random.Random(1)
    words = "the cat dog sat on a mat and ran far away under old trees".split()
    folder = tmp_path / "docs"
    folder.mkdir()
    for k in range(6):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(80)]
        nl = "\r\n" if k == 2 else "\n"
        (folder / f"doc{k}.txt").write_bytes((nl.join(lines) + nl).encode())
    (folder / "empty.txt").write_text("")
    return folder


# ----------------------------------------------------------------------------- the streaming pieces


def test_chunk_stream_cuts_exactly_where_chunk_text_cuts():
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\n", "\n\n", "  ", "x\n", "\t", "é"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))
        size = rng.randint(1, 12)
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        fragments = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert list(chunk_stream(fragments, size)) == chunk_text(text, size)


def test_split_stream_lays_out_pieces_as_split_pieces():
    rng = random.Random(2)
    for _ in range(1500):
        docs = ["".join(rng.choice("ab \n") for _ in range(rng.randint(0, 15))) for _ in range(rng.randint(1, 5))]
        if not "".join(docs):
            continue
        eot, fraction = rng.random() < 0.5, rng.choice([0.1, 0.3, 0.5, 0.9])
        pieces = [MemPiece(d, True, 0) for d in docs if d] if eot else [MemPiece("\n\n".join(docs), False, 0)]
        train, val = split_pieces(pieces, fraction)
        cut = int(sum(len(p.text) for p in pieces) * (1 - fraction))
        streamed = ((f"d{i}", iter([d[: len(d) // 2], d[len(d) // 2:]])) for i, d in enumerate(docs))
        pieces_out = split_stream(document_pieces(streamed, "\n\n", eot), cut)
        got = [(p.split, "".join(p.fragments), p.eot) for p in pieces_out]
        assert got == [("train", p.text, p.eot) for p in train] + [("val", p.text, p.eot) for p in val]


def test_sharded_tokens_slice_like_one_array_across_boundaries():
    rng = np.random.default_rng(0)
    whole = rng.integers(0, 50000, size=1000).astype(np.uint16)
    view = ShardedTokens([whole[:300], whole[300:301], whole[301:301], whole[301:]])
    assert len(view) == 1000 and view.dtype == np.uint16 and view.shape == (1000,)
    for a, b in [(0, 1000), (290, 310), (299, 302), (300, 301), (500, 400), (-20, None), (990, 2000)]:
        assert np.array_equal(view[a:b], whole[a:b]), (a, b)
    assert view[300] == whole[300] and view[-1] == whole[-1] and np.array_equal(view[10:700:7], whole[10:700:7])
    assert np.array_equal(view[[5, 299, 300, 301, 999]], whole[[5, 299, 300, 301, 999]])
    assert np.array_equal(np.asarray(view), whole)
    offsets = np.array([0, 280, 295, 299, 300, 968])
    for got, want in zip(gather(view, offsets, 31), gather(whole, offsets, 31), strict=True):
        assert np.array_equal(got, want)
    with pytest.raises(IndexError):
        view[1000]


# ----------------------------------------------------------------------------- same tokens both ways


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_sharded_preparation_gives_the_in_memory_tokens(docs_folder, tmp_path, tokenizer):
    cfg = DataConfig(dataset=str(docs_folder), tokenizer=tokenizer, bpe_vocab_size=300)
    flat = prepare(cfg, out_dir=tmp_path / "flat", progress=False)
    sharded = prepare(cfg, out_dir=tmp_path / "sharded", progress=False, workers=1, shard_tokens=SHARD)
    same_tokens(flat, sharded)
    assert "shards" not in flat.meta and sharded.meta["shard_tokens"] == SHARD
    train_shards = sharded.meta["shards"]["train"]
    assert len(train_shards) >= 3 and all(e["tokens"] == SHARD for e in train_shards[:-1])
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir() if not p.name.startswith("."))
    assert files == sorted([e["file"] for e in train_shards + sharded.meta["shards"]["val"]]
                           + ["meta.json", "tokenizer.json"])
    assert not list(tmp_path.glob(".*partial*"))  # the work folder became the dataset


def test_gpt2_tokens_are_the_same_both_ways(docs_folder, tmp_path):
    vocab = shared_file("vocab", "gpt2")
    cfg = DataConfig(dataset=str(docs_folder), tokenizer="gpt2", vocab_dir=str(vocab))
    flat = prepare(cfg, out_dir=tmp_path / "flat", progress=False)
    sharded = prepare(cfg, out_dir=tmp_path / "sharded", progress=False, workers=2, shard_tokens=SHARD)
    same_tokens(flat, sharded)
    assert sharded.meta["end_of_text"] == 50256 and int((tokens_of(sharded, "train") == 50256).sum()) >= 4


def test_two_workers_give_the_tokens_of_one(docs_folder, tmp_path):
    cfg = DataConfig(dataset=str(docs_folder), tokenizer="bpe", bpe_vocab_size=300)
    one = prepare(cfg, out_dir=tmp_path / "one", progress=False, workers=1, shard_tokens=SHARD)
    two = prepare(cfg, out_dir=tmp_path / "two", progress=False, workers=2, shard_tokens=SHARD)
    same_tokens(one, two)
    assert one.meta["shards"] == two.meta["shards"]  # byte for byte: the same hashes


def test_val_data_streams_too(docs_folder, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text("a separate validation text, with a cat and a dog.\n" * 40)
    cfg = DataConfig(dataset=str(docs_folder), val_data=str(val), tokenizer="bpe", bpe_vocab_size=300)
    flat = prepare(cfg, out_dir=tmp_path / "flat", progress=False)
    sharded = prepare(cfg, out_dir=tmp_path / "sharded", progress=False, workers=1, shard_tokens=SHARD)
    same_tokens(flat, sharded)


def test_jsonl_streams_line_by_line(tmp_path, monkeypatch, capsys):
    rng = random.Random(3)
    lines = [json.dumps({"text": f"record {i}: " + " ".join(rng.choice(["cat", "dog", "\n", "sat"])
                                                              for _ in range(rng.randint(1, 30)))})
             for i in range(300)]
    lines[7], lines[50] = "not json", json.dumps({"other": 1})
    corpus = tmp_path / "c.jsonl.gz"
    with gzip.open(corpus, "wb") as f:
        f.write(("\r\n".join(lines[:150]) + "\n" + "\n".join(lines[150:]) + "\n").encode())
    monkeypatch.setattr(sources, "FRAGMENT_BYTES", 512)  # many pieces, lines cut across them
    assert len(list(sources.read_text_pieces(corpus, "gzip"))) > 20
    cfg = DataConfig(dataset=str(corpus), tokenizer="bpe", bpe_vocab_size=300)
    flat = prepare(cfg, out_dir=tmp_path / "flat", progress=False)
    capsys.readouterr()
    sharded = prepare(cfg, out_dir=tmp_path / "sharded", progress=False, workers=1, shard_tokens=SHARD)
    same_tokens(flat, sharded)
    assert sharded.meta["documents"] == 298
    assert "skipped 2 of 300 records" in capsys.readouterr().err


def test_a_large_corpus_takes_the_sharded_path_by_itself(docs_folder, monkeypatch):
    monkeypatch.setattr(data_mod, "STREAM_BYTES", 1000)
    cfg = DataConfig(dataset=str(docs_folder))
    data = prepare(cfg, progress=False)
    assert data.meta["shard_tokens"] == data_mod.SHARD_TOKENS and len(data.meta["shards"]["train"]) == 1
    mtime = (data.dir / "train_000.bin").stat().st_mtime_ns
    again = prepare(cfg, progress=False, verify=True)  # reused from the cache, hashes checked
    assert again.dir == data.dir and (again.dir / "train_000.bin").stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------------- training on shards


def test_training_on_shards_matches_one_file_and_resumes_exactly(tiny_corpus, tmp_path):
    from slmkit.checkpoint import LAST, load_checkpoint
    from slmkit.train import read_metrics, train

    cfg = DataConfig(dataset=str(tiny_corpus))
    prepare(cfg, out_dir=tmp_path / "flat", progress=False)
    sharded = prepare(cfg, out_dir=tmp_path / "sh", progress=False, workers=1, shard_tokens=SHARD)
    assert len(sharded.meta["shards"]["train"]) > 10 and len(sharded.meta["shards"]["val"]) >= 2

    def run(folder, out, **kw):
        c = tiny_config(tmp_path / folder, max_iters=12, eval_interval=4, sample_tokens=0)
        c.model.dropout = 0.1
        return train(c, tmp_path / out, progress=False, **kw)

    def losses(out):
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(tmp_path / out)
                if "loss" in r or "val_loss" in r]

    flat = run("flat", "r_flat")
    full = run("sh", "r_full")
    assert losses("r_full") == losses("r_flat")  # the same tokens, the same (seed, step) batches
    assert full.final_val_loss == pytest.approx(flat.final_val_loss, abs=1e-6)  # the whole val split, across shards
    run("sh", "r_cut", stop_after_step=8)
    train(load_checkpoint(tmp_path / "r_cut" / LAST).config, tmp_path / "r_cut", resume=True, progress=False)
    assert losses("r_cut") == losses("r_full")


# ----------------------------------------------------------------------------- damaged shards


def test_a_damaged_shard_is_one_error_line_naming_it(tiny_corpus, tmp_path, capsys):
    folder = tmp_path / "sh"
    prepare(DataConfig(dataset=str(tiny_corpus)), out_dir=folder, progress=False, workers=1, shard_tokens=SHARD)
    shard = folder / "train_001.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 1  # same size, other bytes: only the hash sees it
    shard.write_bytes(bytes(raw))
    before = snapshot(folder)
    line = cli_fails(["prepare", "--dataset", str(folder)], capsys, match="train_001.bin")
    assert "sha256" in line
    open_prepared(folder)  # training checks sizes only (hashing GBs at every start is too slow)
    shard.write_bytes(bytes(raw[:-2]))
    line = cli_fails(["info", "--dataset", str(folder)], capsys, match="train_001.bin")
    assert "truncated" in line
    shard.write_bytes(bytes(raw))
    (folder / "val_000.bin").unlink()
    with pytest.raises(UserError, match="val_000.bin is missing"):
        open_prepared(folder)
    after = snapshot(folder)
    del before["val_000.bin"], before["train_001.bin"], after["train_001.bin"]
    assert after == before  # nothing written


def test_a_damaged_shard_in_a_reused_folder_is_prepared_again(tiny_corpus, tmp_path, capsys):
    cfg = DataConfig(dataset=str(tiny_corpus))
    folder = tmp_path / "sh"
    want = tokens_of(prepare(cfg, out_dir=folder, progress=False, workers=1, shard_tokens=SHARD), "train")
    raw = bytearray((folder / "train_002.bin").read_bytes())
    raw[0] ^= 1
    (folder / "train_002.bin").write_bytes(bytes(raw))
    capsys.readouterr()
    again = prepare(cfg, out_dir=folder, progress=False, workers=1, shard_tokens=SHARD, verify=True)
    assert "train_002.bin does not match" in capsys.readouterr().err
    assert np.array_equal(tokens_of(again, "train"), want)


# ----------------------------------------------------------------------------- crashes and resume


def test_a_crash_mid_prepare_leaves_no_dataset_and_a_rerun_resumes(docs_folder, tmp_path, monkeypatch, capsys):
    cfg = DataConfig(dataset=str(docs_folder), tokenizer="bpe", bpe_vocab_size=300)
    want = prepare(cfg, out_dir=tmp_path / "ref", progress=False, workers=1, shard_tokens=SHARD)
    real = ShardWriter._close
    closed = []

    def crash(self, next_pos):
        real(self, next_pos)
        closed.append(next_pos)
        if len(closed) == 3:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(ShardWriter, "_close", crash)
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated"):
        prepare(cfg, out_dir=target, progress=False, workers=1, shard_tokens=SHARD)
    assert not target.exists()  # nothing that looks like a dataset
    partial = tmp_path / ".out.partial.slmkit-tmp"
    assert sorted(p.name for p in partial.iterdir() if not p.name.startswith(".")) == [
        "progress.json", "tokenizer.json", "train_000.bin", "train_001.bin", "train_002.bin"]
    monkeypatch.setattr(ShardWriter, "_close", real)
    capsys.readouterr()
    got = prepare(cfg, out_dir=target, progress=False, workers=1, shard_tokens=SHARD)
    assert "3 whole shards" in capsys.readouterr().err
    same_tokens(got, want)
    assert got.meta["shards"] == want.meta["shards"] and not partial.exists()


KILL_SCRIPT = """
import os, signal, sys
from slmkit.config import DataConfig
from slmkit.data import prepare
from slmkit.shards import ShardWriter

real, closed = ShardWriter._close, []
def close(self, next_pos):
    closed.append(1)
    if len(closed) == 2:  # the second shard is written to its temporary file, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, next_pos)
ShardWriter._close = close
prepare(DataConfig(dataset=sys.argv[1]), out_dir=sys.argv[2], progress=False, workers=1, shard_tokens=1000)
"""


def test_a_killed_prepare_leaves_no_half_shard_and_a_rerun_finishes(tiny_corpus, tmp_path, capsys):
    target = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tiny_corpus), str(target)], capture_output=True,
                       text=True, timeout=120, env={**os.environ})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not target.exists()
    partial = tmp_path / ".out.partial.slmkit-tmp"
    names = sorted(p.name for p in partial.iterdir())
    assert "train_000.bin" in names and "train_001.bin" not in names
    assert any(n.startswith(".train_001.bin.") for n in names)  # the half shard, under a temporary name
    capsys.readouterr()
    got = prepare(DataConfig(dataset=str(tiny_corpus)), out_dir=target, progress=False, workers=1, shard_tokens=SHARD)
    assert "1 whole shard " in capsys.readouterr().err
    want = prepare(DataConfig(dataset=str(tiny_corpus)), out_dir=tmp_path / "ref", progress=False)
    same_tokens(got, want)
    assert not partial.exists()


def test_a_changed_shard_in_the_work_folder_is_written_again(docs_folder, tmp_path, monkeypatch):
    cfg = DataConfig(dataset=str(docs_folder), tokenizer="char")
    real = ShardWriter._close
    closed = []

    def crash(self, next_pos):
        real(self, next_pos)
        closed.append(1)
        if len(closed) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "_close", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, out_dir=tmp_path / "out", progress=False, workers=1, shard_tokens=SHARD)
    monkeypatch.setattr(ShardWriter, "_close", real)
    shard = tmp_path / ".out.partial.slmkit-tmp" / "train_001.bin"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    got = prepare(cfg, out_dir=tmp_path / "out", progress=False, workers=1, shard_tokens=SHARD)
    same_tokens(got, prepare(cfg, out_dir=tmp_path / "ref", progress=False))


def test_cli_prepare_workers_and_shard_tokens(tiny_corpus, tmp_path, capsys):
    from slmkit.cli import main

    main(["prepare", "--dataset", str(tiny_corpus), "--workers", "1", "--shard-tokens", "5000",
          "--out-dir", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert "in 4 shards" in out and (tmp_path / "p" / "train_002.bin").is_file()  # 3 train + 1 val
    main(["prepare", "--dataset", str(tmp_path / "p")])  # a prepared folder as the dataset: verified
    assert "every shard matches its sha256" in capsys.readouterr().out
    cli_fails(["prepare", "--dataset", str(tiny_corpus), "--workers", "0"], capsys, match="--workers")


HOLD_SCRIPT = """
import sys, time
from pathlib import Path
from slmkit.fileio import FolderLock
stage = Path(sys.argv[1])
stage.mkdir(parents=True)
with FolderLock(stage):
    print("locked", flush=True)
    time.sleep(1.5)
"""


def test_a_second_preparation_of_the_same_target_waits_for_the_first(tiny_corpus, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(tmp_path / ".out.partial.slmkit-tmp")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        got = prepare(DataConfig(dataset=str(tiny_corpus)), out_dir=tmp_path / "out", progress=False, workers=1,
                      shard_tokens=SHARD)
    finally:
        holder.wait(timeout=60)
    assert "another slmkit process is preparing" in capsys.readouterr().err
    same_tokens(got, prepare(DataConfig(dataset=str(tiny_corpus)), out_dir=tmp_path / "ref", progress=False))
