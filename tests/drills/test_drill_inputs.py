"""Drills on bad input through the real `slm` entry point: absurd or non-finite hyperparameters,
malformed tokenizer and config files, and generation options that used to crash or print NaN.

Every refusal must be exactly one `error: ...` line on stderr and a non-zero exit, and a refused
`slm train` must not have created its run directory (the value is caught before any work).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_fails, tiny_config

from slmkit.cli import main
from slmkit.errors import UserError

TINY = ["--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--block-size", "8", "--max-iters", "1",
        "--device", "cpu", "--dtype", "float32", "--quiet"]


fails = cli_fails



def succeeds(argv: list, capsys) -> str:
    main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return out.out


# ----------------------------------------------------------------------------- slm train / slm info flags

BAD_TRAIN_FLAGS = [
    (["--learning-rate", "nan"], "learning_rate"),
    (["--learning-rate", "inf"], "learning_rate"),
    (["--grad-clip", "nan"], "grad_clip"),
    (["--dropout", "nan"], "dropout"),
    (["--min-lr", "nan"], "min_lr"),
    (["--weight-decay=-inf"], "weight_decay"),
    (["--beta1", "nan"], "beta1"),
    (["--beta2", "inf"], "beta2"),
    (["--val-fraction", "nan"], "val_fraction"),
    (["--seed", "-1"], "seed"),
    (["--seed", str(2**63)], "seed"),
    (["--lr-decay-iters", "-10"], "lr_decay_iters"),
    (["--checkpoint-interval", "-3"], "checkpoint_interval"),
    (["--warmup-iters", "-1"], "warmup_iters"),
    (["--eval-iters", "0"], "eval_iters"),
    (["--eval-iters", "1000000000"], "eval_iters"),
    (["--sample-tokens", "-1"], "sample_tokens"),
    (["--max-iters", str(10**13)], "max_iters"),
    (["--batch-size", "0"], "batch_size"),
    (["--n-layer", "100000"], "n_layer"),
    (["--block-size", str(2**21)], "block_size"),
]


@pytest.mark.parametrize("flags, name", BAD_TRAIN_FLAGS, ids=[" ".join(f) for f, _ in BAD_TRAIN_FLAGS])
def test_train_refuses_a_bad_value_before_any_work(flags, name, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    line = fails(["train", "--dataset", tiny_corpus, *TINY, "--out-dir", out, *flags], capsys, name)
    assert "nan" not in line.lower() or "finite" in line  # NaN is named as what it is, never accepted
    assert not out.exists()


BAD_INFO_FLAGS = [
    (["--n-layer", "0"], "n_layer must be a positive integer"),
    (["--n-layer", "5000"], "n_layer .*4,096"),
    (["--n-head", "-1"], "n_head"),
    (["--n-embd", str(2**40)], "n_embd"),
    (["--n-inner", "-1"], "n_inner"),
    (["--block-size", str(10**30)], "block_size"),
    (["--vocab-size", "0"], "vocab_size"),
    (["--dropout", "inf"], "dropout"),
    (["--attn-dropout", "nan"], "attn_dropout"),
]


@pytest.mark.parametrize("flags, match", BAD_INFO_FLAGS, ids=[" ".join(f) for f, _ in BAD_INFO_FLAGS])
def test_info_refuses_absurd_model_sizes(flags, match, capsys):
    fails(["info", *flags], capsys, match)


def test_info_accepts_the_largest_allowed_depth_without_allocating(capsys):
    # At the cap the model is still only counted (meta device), so this is instant.
    out = succeeds(["info", "--n-layer", "4096", "--n-embd", "64", "--n-head", "4", "--json"], capsys)
    assert json.loads(out)["model"]["n_layer"] == 4096


# ----------------------------------------------------------------------------- config files

BAD_CONFIGS = [
    ("c.toml", 'n_layer = "abc"\n', "n_layer: expected int, got 'abc'"),
    ("c.toml", "n_layer = [1, 2]\n", "n_layer: expected int"),
    ("c.toml", "n_layer = 1e30\n", "n_layer: 1e\\+30 is out of range"),
    ("c.toml", "n_layer = 2.5\n", "n_layer: expected int, got 2.5"),
    ("c.toml", "learning_rate = nan\n", "learning_rate: expected a finite number"),
    ("c.toml", "[train]\nseed = -1\n", "seed must be a non-negative integer"),
    ("c.toml", "bias = 3\n", "bias: expected true/false"),
    ("c.toml", "n_layer = true\n", "n_layer: expected int, got True"),
    ("c.toml", "dataset = 5\n", "dataset: expected a string"),
    ("c.toml", "tokenizer = \"words\"\n", "tokenizer must be one of char, bpe, gpt2"),
    ("c.toml", "model = 3\n", r"\[model\] must be a table"),
    ("c.toml", "n_layer = \n", "cannot parse config file"),
    ("c.yaml", "n_layer: .inf\n", "n_layer: expected int, got inf"),
    ("c.yaml", "dropout: .nan\n", "dropout: expected a finite number"),
    ("c.yaml", "n_embd: 1" + "0" * 4000 + "\n", r"n_embd must be a positive integer .*got 1000.*\.\.\.$"),
    ("c.yaml", "n_embd: 1" + "0" * 5000 + "\n", "cannot parse config file .*4300 digits"),
    ("c.yaml", "n_head: {a: 1}\n", "n_head: expected int"),
    ("c.yaml", "preset: [1]\n", "preset must be a preset name"),
    ("c.yaml", "- 1\n- 2\n", "must hold a mapping"),
    ("c.yaml", "grad_clip: 2024-01-01\n", "grad_clip: expected float"),
    ("c.yaml", "n_layer: [unclosed\n", "cannot parse config file"),
]


@pytest.mark.parametrize("name, text, match", BAD_CONFIGS, ids=[t.strip()[:30] for _, t, _ in BAD_CONFIGS])
def test_a_bad_config_file_value_is_one_line(name, text, match, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    fails(["info", "--config", path], capsys, match)


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_bytes(b"n_layer = 2\n# caf\xe9\n")
    fails(["info", "--config", path], capsys, "not UTF-8")


# ----------------------------------------------------------------------------- tokenizer files

BAD_TOKENIZERS = [
    ({"kind": "char"}, "missing field 'chars'"),
    ({"kind": "char", "chars": 7}, "'chars' must be a list"),
    ({"kind": "char", "chars": ["a", 1]}, r"chars\[1\] must be a single character"),
    ({"kind": "char", "chars": ["a", "bc"]}, r"chars\[1\] must be a single character"),
    ({"kind": "char", "chars": ["a", "a"]}, "more than once"),
    ({"kind": "char", "chars": []}, "empty"),
    ({"kind": "klingon"}, "unknown tokenizer kind 'klingon'"),
    ({"kind": ["char"]}, "unknown tokenizer kind"),
    ([1, 2, 3], "not a tokenizer"),
    ({"kind": "bpe"}, "missing field 'hf'"),
    ({"kind": "bpe", "hf": {"model": {}}}, "HF tokenizers refuses"),
    ({"kind": "bpe", "hf": {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}}, "HF tokenizers refuses"),
    ({"kind": "gpt2"}, "missing field 'encoder'"),
    ({"kind": "gpt2", "encoder": {"a": 0}, "merges": []}, "single-byte tokens are missing"),
    ({"kind": "gpt2", "encoder": {"a": "zero"}, "merges": []}, "must be an integer"),
]


def _tokenize_run(tmp_path: Path, content: bytes) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_bytes(content)
    return run


@pytest.mark.parametrize("payload, match", BAD_TOKENIZERS, ids=[json.dumps(p)[:40] for p, _ in BAD_TOKENIZERS])
def test_a_malformed_tokenizer_file_is_one_line_naming_the_file(payload, match, tmp_path, capsys):
    run = _tokenize_run(tmp_path, json.dumps(payload).encode())
    line = fails(["tokenize", "--run", run, "--text", "abc"], capsys, match)
    assert str(run / "tokenizer.json") in line


@pytest.mark.parametrize("content, match", [
    (b'{"kind": "char", "chars": ["a", "b"', "corrupted: not valid JSON"),
    (b'{"kind": "char", "chars": ["\xff"]}', "not UTF-8"),
    (b'{"kind": "char", "chars": ["\\ud800"]}', "lone surrogate"),
    (b"[" * 50_000, "nested too deeply"),
    (b"", "not valid JSON"),
])
def test_a_damaged_tokenizer_file_is_one_line(content, match, tmp_path, capsys):
    run = _tokenize_run(tmp_path, content)
    line = fails(["tokenize", "--run", run, "--text", "abc"], capsys, match)
    assert "tokenizer.json" in line


def test_gpt2_vocab_dir_with_missing_or_broken_files_is_one_line(tmp_path, capsys):
    fails(["tokenize", "--tokenizer", "gpt2", "--vocab-dir", tmp_path / "nowhere", "--text", "a"], capsys,
          "encoder.json")
    (tmp_path / "encoder.json").write_text("[1, 2]")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    fails(["tokenize", "--tokenizer", "gpt2", "--vocab-dir", tmp_path, "--text", "a"], capsys,
          "must map tokens to ids")
    (tmp_path / "encoder.json").write_text('{"a": 0}')
    (tmp_path / "vocab.bpe").write_bytes(b"#version: 0.2\n\xff\xfe\n")
    fails(["tokenize", "--tokenizer", "gpt2", "--vocab-dir", tmp_path, "--text", "a"], capsys, "not UTF-8")


# ----------------------------------------------------------------------------- slm generate


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from slmkit.train import train

    tmp = tmp_path_factory.mktemp("gen")
    corpus = tmp / "tiny.txt"
    corpus.write_text("".join(f"the cat sat on the mat number {i % 7}.\n" for i in range(300)), encoding="utf-8")
    cfg = tiny_config(corpus, max_iters=4, eval_interval=2, sample_tokens=0)
    cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size = 1, 16, 16
    train(cfg, tmp / "run", progress=False)
    return tmp / "run"


BAD_GENERATE_FLAGS = [
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--temperature", "-0.5"], "temperature must not be negative"),
    (["--top-p", "nan"], "top-p"),
    (["--top-p", "0"], r"top-p must be in \(0, 1\]"),
    (["--top-p", "1.5"], r"top-p must be in \(0, 1\]"),
    (["--top-k", "-1"], "top-k"),
    (["--max-new-tokens", "-1"], "max-new-tokens"),
    (["--max-new-tokens", str(10**12)], "max-new-tokens"),
    (["--num-samples", "0"], "num-samples"),
    (["--seed", "-1"], "seed"),
    (["--seed", str(2**64)], "seed"),
    (["--stop", ""], "a stop string must not be empty"),
    (["--stop", "the", "--stop", ""], "a stop string must not be empty"),
]


@pytest.mark.parametrize("flags, match", BAD_GENERATE_FLAGS, ids=[" ".join(f) for f, _ in BAD_GENERATE_FLAGS])
def test_generate_refuses_bad_sampling_options(flags, match, run_dir, capsys):
    fails(["generate", "--run", run_dir, "--prompt", "the", "--max-new-tokens", "5", *flags], capsys, match)


def test_a_vanishing_temperature_is_greedy_not_nan(run_dir, capsys):
    args = ["generate", "--run", run_dir, "--prompt", "the cat", "--max-new-tokens", "20", "--device", "cpu"]
    greedy = succeeds([*args, "--temperature", "0"], capsys)
    for tiny in ("1e-45", "5e-324", "1e-6"):
        assert succeeds([*args, "--temperature", tiny, "--seed", "3"], capsys) == greedy
    assert greedy.startswith("the cat") and len(greedy) == len("the cat") + 20 + 1


def test_a_huge_temperature_still_samples_real_tokens(run_dir):
    from slmkit.api import load

    lm = load(run_dir, device="cpu", dtype="float32")
    text = lm.generate("the", max_new_tokens=30, temperature=1e300, seed=1)[0]
    assert len(text) == 30 and set(text) <= set(lm.tokenizer.chars)


def test_api_checks_options_when_called(run_dir):
    from slmkit.api import load

    lm = load(run_dir, device="cpu", dtype="float32")
    with pytest.raises(UserError, match="unknown generation option 'tempreature'"):
        lm.generate("the", tempreature=0.5)
    with pytest.raises(UserError, match="temperature"):
        lm.generate_stream("the", temperature=float("nan"))  # before the first token is asked for
    with pytest.raises(UserError, match="stop string must not be empty"):
        lm.generate("the", stop=[""])
    # A single stop string is one string, not a list of its characters: "<first char>\x01" never
    # occurs, so nothing stops (read as characters, the sample would stop at once).
    full = lm.generate("the", max_new_tokens=30, temperature=0)[0]
    assert lm.generate("the", max_new_tokens=30, temperature=0, stop=full[0] + "\x01")[0] == full
    assert lm.generate("the", max_new_tokens=30, temperature=0, stop=full[:2])[0] == ""


def test_api_score_and_evaluate_refuse_nothing_to_score_and_bad_batches(run_dir):
    import numpy as np

    from slmkit.api import load

    lm = load(run_dir, device="cpu", dtype="float32")
    with pytest.raises(UserError, match="empty"):
        lm.score("")
    with pytest.raises(UserError, match="fewer than 2 tokens"):
        lm.score("t")
    with pytest.raises(UserError, match="batch-size"):
        lm.evaluate_tokens(np.arange(10) % 5, 10, batch_size=0)
    with pytest.raises(UserError, match="outside this vocabulary"):
        lm.score_ids([1, 2, 10**6], chars=3)
    assert lm.score("the cat").tokens == len("the cat") - 1
