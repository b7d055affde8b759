"""Every command end to end on a tiny run, and every user mistake as one line + non-zero exit."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, shared_file

from slmkit.cli import main
from slmkit.inference import can_quantize_int8

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--eval-iters", "2", "--device", "cpu", "--dtype", "float32", "--learning-rate", "3e-3",
        "--warmup-iters", "2", "--log-interval", "5"]


def run_cli(args, capsys):
    main([str(a) for a in args])
    return capsys.readouterr()


def fails(args, capsys, match):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err
    return err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"ROMEO:\nthe night is {w}, my love.\n\n" for w in ["dark", "long", "kind"] * 150))
    out = root / "run"
    main(["train", "--dataset", str(corpus), *TINY, "--max-iters", "30", "--eval-interval", "10",
          "--out-dir", str(out), "--sample-tokens", "20", "--quiet", "--cache-dir", str(root / "cache")])
    return out


def test_train_writes_the_run(run_dir):
    assert (run_dir / "ckpt_last.safetensors").is_file() and (run_dir / "loss.png").is_file()


def test_generate_streams_a_continuation(run_dir, capsys):
    out = run_cli(["generate", "--run", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "30", "--seed", "1",
                   "--num-samples", "2", "--top-p", "0.9"], capsys).out
    assert out.count("--- sample") == 2 and out.count("ROMEO:") >= 2


def test_generate_greedy_is_deterministic_and_reads_prompt_files(run_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("the night")
    a = run_cli(["generate", "--run", run_dir, "--prompt-file", tmp_path / "p.txt", "--temperature", "0",
                 "--max-new-tokens", "25"], capsys).out
    b = run_cli(["generate", "--run", run_dir, "--prompt", "the night", "--temperature", "0",
                 "--max-new-tokens", "25", "--no-cache"], capsys).out
    assert a == b and a.startswith("the night")


def test_eval_json_is_deterministic(run_dir, capsys):
    a = json.loads(run_cli(["eval", "--run", run_dir, "--json"], capsys).out)
    b = json.loads(run_cli(["eval", "--run", run_dir, "--json"], capsys).out)
    assert a == b and a["split"] == "val" and a["loss"] > 0
    assert a["perplexity"] == pytest.approx(2.718281828 ** a["loss"], rel=1e-6)


@pytest.mark.skipif(not can_quantize_int8(torch.device("cpu")), reason="this torch has no int8 weight kernel")
def test_int8_weights_for_eval_score_and_generate(run_dir, capsys):
    exact = json.loads(run_cli(["eval", "--run", run_dir, "--json", "--dtype", "float32"], capsys).out)
    int8 = json.loads(run_cli(["eval", "--run", run_dir, "--json", "--weights", "int8"], capsys).out)
    assert int8["loss"] != exact["loss"] and abs(int8["loss"] - exact["loss"]) < 0.05
    score = json.loads(run_cli(["score", "--run", run_dir, "--json", "--weights", "int8", "--text", "the night"],
                               capsys).out)
    assert score["tokens"] > 0 and score["loss"] > 0
    out = run_cli(["generate", "--run", run_dir, "--prompt", "the night", "--temperature", "0",
                   "--max-new-tokens", "25", "--weights", "int8"], capsys).out
    assert out.startswith("the night") and len(out) == len("the night") + 25 + 1


def test_score_reports_totals_and_per_token_logprobs(run_dir, capsys):
    res = json.loads(run_cli(["score", "--run", run_dir, "--text", "the night is long", "--json"], capsys).out)
    detail = res["tokens_detail"]
    assert res["tokens"] == len(detail) == len("the night is long") - 1  # char model: first char is context
    assert sum(d["logprob"] for d in detail) == pytest.approx(res["log_likelihood"], abs=1e-6)
    human = run_cli(["score", "--run", run_dir, "--text", "the night"], capsys).out
    assert "perplexity" in human


def test_info_for_runs_and_presets(run_dir, capsys):
    info = json.loads(run_cli(["info", "--run", run_dir, "--json"], capsys).out)
    assert info["model"]["n_layer"] == 2 and info["params"]["head"] == 0
    human = run_cli(["info", "--preset", "shakespeare-char"], capsys).out
    assert "10.7" in human.splitlines()[0] and "tied" in human


def test_tokenize_and_decode(run_dir, capsys):
    res = json.loads(run_cli(["tokenize", "--run", run_dir, "--text", "the night", "--json"], capsys).out)
    assert res["count"] == 9 and res["tokens"][0] == "t"
    back = run_cli(["tokenize", "--run", run_dir, "--decode", " ".join(map(str, res["ids"]))], capsys).out
    assert back.strip() == "the night"


def test_tokenize_with_named_gpt2(capsys):
    vocab = shared_file("vocab", "gpt2")
    res = json.loads(run_cli(["tokenize", "--tokenizer", "gpt2", "--vocab-dir", vocab, "--text", "Hello world",
                              "--json"], capsys).out)
    assert res["ids"] == [15496, 995]


def test_prepare_to_a_folder(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text to prepare. " * 100)
    out = run_cli(["prepare", "--dataset", corpus, "--tokenizer", "bpe", "--vocab-size", "300", "--out",
                   tmp_path / "prep"], capsys).out
    assert "prepared" in out and (tmp_path / "prep" / "train.bin").is_file()


def test_config_file_and_flag_precedence(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('preset = "cpu-tiny"\nn_layer = 3\n[train]\nlearning_rate = 0.01\n')
    info = json.loads(run_cli(["info", "--config", tmp_path / "c.toml", "--n-embd", "64", "--json"], capsys).out)
    assert info["model"]["n_layer"] == 3 and info["model"]["n_embd"] == 64 and info["model"]["block_size"] == 64
    (tmp_path / "c.yaml").write_text("model:\n  n_head: 8\n")
    info = json.loads(run_cli(["info", "--config", tmp_path / "c.yaml", "--json"], capsys).out)
    assert info["model"]["n_head"] == 8


# ------------------------------------------------------------------------------ bad input


def test_missing_dataset(tmp_path, capsys):
    fails(["train", "--dataset", tmp_path / "nope.txt", "--out-dir", tmp_path / "r"], capsys, "neither a file")


def test_unknown_preset(capsys):
    fails(["info", "--preset", "gpt9"], capsys, "unknown preset")


def test_invalid_hyperparameters(tmp_path, capsys):
    fails(["info", "--n-embd", "100", "--n-head", "3"], capsys, "divisible")
    fails(["info", "--n-layer", "0"], capsys, "positive")
    fails(["train", "--dataset", tmp_path, "--learning-rate", "-1", "--out-dir", tmp_path / "r"], capsys,
          "learning_rate")


def test_unknown_key_in_config_file(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("n_layers = 3\n")
    fails(["info", "--config", tmp_path / "c.toml"], capsys, "unknown hyperparameter 'n_layers'")


def test_prompt_outside_the_char_vocabulary(run_dir, capsys):
    fails(["generate", "--run", run_dir, "--prompt", "Zürich"], capsys, "not in this model's character vocabulary")


def test_resume_on_a_directory_without_checkpoint(tmp_path, capsys):
    fails(["train", "--resume", tmp_path], capsys, "no ckpt_last")


def test_corrupted_checkpoint_is_named(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((run_dir / "ckpt_best.safetensors").read_bytes()[:1000])
    fails(["generate", "--run", bad], capsys, "bad.safetensors")


def test_missing_run(tmp_path, capsys):
    fails(["eval", "--run", tmp_path / "nothing"], capsys, "no such run")


def test_bad_token_ids_for_decode(run_dir, capsys):
    fails(["tokenize", "--run", run_dir, "--decode", "1 2 99999"], capsys, "outside this vocabulary")
    fails(["tokenize", "--run", run_dir, "--decode", "one two"], capsys, "integers")


def test_errors_in_a_real_process_are_one_line_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "slmkit", "generate", "--run", str(tmp_path / "missing")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_every_command_has_help(capsys):
    for cmd in ["prepare", "train", "generate", "eval", "score", "info", "tokenize"]:
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "--" in capsys.readouterr().out
