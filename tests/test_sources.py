"""Corpora in the field's formats: JSONL/JSON, Parquet, gzip/zstd, globs, hf: data sets, a separate
validation file (--val-data), and their one-line errors."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pytest
from conftest import cli_fails, shared_file

from slmkit.config import DataConfig
from slmkit.data import prepare
from slmkit.errors import UserError

pa = pytest.importorskip("pyarrow", reason="Parquet and zstd need pyarrow (the corpora extra)")
pq = pytest.importorskip("pyarrow.parquet")

DOCS = [f"Document {i}: the {['cat', 'dog', 'fox'][i % 3]} sat on the mat {i % 5} times." for i in range(120)]


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def tokens(data) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(data.tokens("train")), np.asarray(data.tokens("val"))


def test_every_format_gives_the_same_documents_and_tokens(tmp_path):
    """The same 120 documents as JSONL, gzip JSONL, zstd JSONL, a JSON array, Parquet and a glob over two
    Parquet halves prepare to identical token files: one document per record, each ending in end-of-text."""
    recs = [{"text": d, "id": i} for i, d in enumerate(DOCS)]
    write_jsonl(tmp_path / "c.jsonl", recs)
    write_jsonl(tmp_path / "c.jsonl.gz", recs, gzip.open)
    with pa.output_stream(str(tmp_path / "c.jsonl.zst"), compression="zstd") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs).encode())
    (tmp_path / "c.json").write_text(json.dumps(recs), encoding="utf-8")
    pq.write_table(pa.table({"text": DOCS, "id": list(range(120))}), tmp_path / "c.parquet")
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"text": DOCS[:60]}), tmp_path / "shards" / "part-000.parquet")
    pq.write_table(pa.table({"text": DOCS[60:]}), tmp_path / "shards" / "part-001.parquet")
    got = {}
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.json", "c.parquet", "shards/*.parquet"):
        data = prepare(DataConfig(dataset=str(tmp_path / name), tokenizer="bpe", bpe_vocab_size=300),
                       out_dir=tmp_path / f"p-{len(got)}")
        assert data.meta["documents"] == 120
        got[name] = tokens(data)
    first = got["c.jsonl"]
    eot = prepare(DataConfig(dataset=str(tmp_path / "c.jsonl"), tokenizer="bpe", bpe_vocab_size=300))
    eot = eot.tokenizer.special["eot"]
    # 120 documents, each followed by end-of-text: 120 in all (the one the split cuts ends in val).
    assert int((first[0] == eot).sum() + (first[1] == eot).sum()) == 120
    for name, (train, val) in got.items():
        assert np.array_equal(train, first[0]) and np.array_equal(val, first[1]), name


def test_text_field_and_skipped_bad_lines(tmp_path, capsys):
    recs = [{"body": d} for d in DOCS] + ["{not json", json.dumps(["a list"]), json.dumps({"body": 3})]
    path = write_jsonl(tmp_path / "b.jsonl", recs)
    data = prepare(DataConfig(dataset=str(path), text_field="body"), out_dir=tmp_path / "p")
    assert data.meta["documents"] == 120
    err = capsys.readouterr().err
    assert "skipped 3 of 123 records of" in err and "b.jsonl:121: not JSON" in err


def test_separate_validation_file(tmp_path):
    """--val-data: all of the corpus trains; the validation split is exactly the other file's text."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in DOCS[:100]])
    val = tmp_path / "val.txt"
    val.write_text("\n".join(DOCS[100:]), encoding="utf-8")
    data = prepare(DataConfig(dataset=str(train), val_data=str(val), tokenizer="char"), out_dir=tmp_path / "p")
    tok = data.tokenizer
    assert tok.decode(np.asarray(data.tokens("val")).tolist()) == val.read_text(encoding="utf-8")
    assert data.meta["chars"]["train"] == sum(len(d) for d in DOCS[:100]) + 2 * 99  # joined by blank lines
    assert data.meta["val_source"] == str(val)
    # A different validation file is a different dataset (another cache entry, other tokens).
    val.write_text("\n".join(DOCS[90:]), encoding="utf-8")
    other = prepare(DataConfig(dataset=str(train), val_data=str(val), tokenizer="char"))
    assert other.meta["key"] != data.meta["key"] and other.meta["tokens"]["val"] > data.meta["tokens"]["val"]


def test_train_and_eval_from_jsonl_with_val_data_via_cli(tmp_path, capsys):
    from slmkit.cli import main

    train = write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in DOCS * 3])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": d} for d in DOCS[:40]])
    run = tmp_path / "run"
    main([str(a) for a in ["train", "--dataset", train, "--val-data", val, "--tokenizer", "bpe", "--bpe-vocab-size",
                           300, "--n-layer", 1, "--n-head", 2, "--n-embd", 32, "--block-size", 32, "--batch-size", 8,
                           "--max-iters", 4, "--eval-interval", 4, "--eval-iters", 2, "--device", "cpu", "--dtype",
                           "float32", "--sample-tokens", 0, "--out-dir", run, "--quiet"]])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["val_data"] == str(val) and cfg["data"]["text_field"] == "text"
    capsys.readouterr()
    main(["eval", "--run", str(run), "--split", "val", "--json", "--dtype", "float32"])
    out = json.loads(capsys.readouterr().out)
    done = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "final_val_loss" in x][0]
    assert out["loss"] == pytest.approx(done["final_val_loss"], abs=1e-5)


@pytest.mark.parametrize("setup, args, match", [
    (lambda p: pq.write_table(pa.table({"body": ["x"]}), p / "a.parquet"), ["--dataset", "{p}/a.parquet"],
     "has no column 'text' (columns: body); choose one with --text-field"),
    (lambda p: None, ["--dataset", "{p}/none-*.jsonl"], "matches no file"),
    (lambda p: write_jsonl(p / "bad.jsonl", ["nope", "{", json.dumps({"text": "ok"})]), ["--dataset", "{p}/bad.jsonl"],
     "2 of 3 records have no usable text; first: "),
    (lambda p: (p / "x.parquet").write_bytes(b"not parquet at all"), ["--dataset", "{p}/x.parquet"],
     "cannot read"),
    (lambda p: (p / "x.jsonl.gz").write_bytes(b"not gzip"), ["--dataset", "{p}/x.jsonl.gz"], "cannot read"),
    (lambda p: (p / "d.txt").write_text("hello " * 200), ["--dataset", "{p}/d.txt", "--val-data", "{p}/v.jsonl"],
     "v.jsonl does not exist"),
    (lambda p: (p / "m.csv").write_text("x"), ["--dataset", "{p}/*.csv"], "is not a corpus file"),
])
def test_bad_corpora_are_one_line_and_write_nothing(tmp_path, capsys, setup, args, match):
    setup(tmp_path)
    out = tmp_path / "out"
    cli_fails(["prepare", *[a.format(p=tmp_path) for a in args], "--out-dir", str(out)], capsys, re.escape(match))
    assert not out.exists()


def test_hub_dataset_offline_is_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("datasets", reason="hf: data sets need HF datasets (the corpora extra)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cli_fails(["prepare", "--dataset", "hf:slmkit-test/not-a-dataset", "--out-dir", str(tmp_path / "o")], capsys,
              "cannot load hf:slmkit-test/not-a-dataset from the Hugging Face Hub")


def test_shared_gutenberg_with_its_own_validation_file():
    train = shared_file("corpus", "gutenberg", "train.txt")
    valid = [p for p in train.parent.iterdir() if p.name.startswith(("valid", "val"))]
    if not valid:
        pytest.skip("the shared Gutenberg corpus has no validation file")
    data = prepare(DataConfig(dataset=str(train), val_data=str(valid[0]), tokenizer="char"))
    assert data.meta["chars"]["train"] == len(train.read_text(encoding="utf-8"))
    assert data.meta["chars"]["val"] == len(valid[0].read_text(encoding="utf-8"))


def test_a_prepared_folder_cannot_take_val_data(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("hello world " * 300, encoding="utf-8")
    prepare(DataConfig(dataset=str(path)), out_dir=tmp_path / "p")
    with pytest.raises(UserError, match="prepared folder"):
        prepare(DataConfig(dataset=str(tmp_path / "p"), val_data=str(path)))
