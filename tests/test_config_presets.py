"""Issue 10: the BPE size's own name, final_eval and epochs as settings, the gpt1 preset as the paper
trained, --help that states each default once, and `slm info` vocabularies that are read, not invented."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import shared_file, tiny_config

from slmkit.cli import build_parser, config_flags, main
from slmkit.config import RunConfig, load_config_file, preset_config, resolve_config
from slmkit.errors import UserError
from slmkit.model import GPT
from slmkit.train import lr_at, read_metrics, resume_config, train

GPT1_VOCAB_ERROR = "error: the gpt1 tokenizer needs --vocab-dir with encoder_bpe_40000.json and vocab_40000.bpe\n"


def cli(args, capsys):
    main([str(a) for a in args])
    return capsys.readouterr()


# ----------------------------------------------------------------------------- 1. bpe_vocab_size


@pytest.mark.parametrize("name, text", [("c.toml", "vocab_size = 4096\nbpe_vocab_size = 300\n"),
                                        ("c.yaml", "vocab_size: 4096\nbpe_vocab_size: 300\n")])
def test_flat_vocab_size_is_the_models_and_bpe_vocab_size_the_tokenizers(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert load_config_file(tmp_path / name) == {"model": {"vocab_size": 4096}, "data": {"bpe_vocab_size": 300}}
    cfg = resolve_config(None, str(tmp_path / name), {})
    assert (cfg.model.vocab_size, cfg.data.bpe_vocab_size) == (4096, 300)


@pytest.mark.parametrize("flag", ["--bpe-vocab-size", "--vocab-size"])
def test_bpe_size_flag_and_its_alias(flag):
    args = build_parser().parse_args(["train", flag, "300"])
    assert config_flags(args) == {"data": {"bpe_vocab_size": 300}}


def test_configs_saved_before_the_rename_still_load():
    old = RunConfig().to_dict()
    old["data"]["vocab_size"] = old["data"].pop("bpe_vocab_size") and 300
    cfg = RunConfig.from_dict(old)
    assert cfg.data.bpe_vocab_size == 300 and cfg.model.vocab_size == 0
    assert "vocab_size" not in cfg.to_dict()["data"]


# ----------------------------------------------------------------------------- 2, 3. final_eval and epochs


def test_final_eval_is_a_setting(tmp_path, tiny_corpus):
    assert config_flags(build_parser().parse_args(["train", "--no-final-eval"])) == {"train": {"final_eval": False}}
    cfg = tiny_config(tiny_corpus, max_iters=4, eval_interval=4, sample_tokens=0, final_eval=False)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.final_val_loss is None
    assert not any("final_val_loss" in r for r in read_metrics(tmp_path / "run"))
    cfg.train.final_eval = True
    assert train(cfg, tmp_path / "run2", progress=False).final_val_loss is not None


def test_epochs_set_max_iters_and_a_resume_keeps_them(tmp_path, tiny_corpus, capsys):
    cfg = tiny_config(tiny_corpus, max_iters=10**6, epochs=1.5, eval_interval=3, checkpoint_interval=3,
                      sample_tokens=0, final_eval=False)
    train(cfg, tmp_path / "run", stop_after_step=3)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    train_tokens = json.loads((tmp_path / "run" / "data.json").read_text())["tokens"]["train"]
    steps = math.ceil(1.5 * train_tokens / (8 * 32))  # batch 8 x block 32
    assert saved["train"]["max_iters"] == steps and saved["train"]["epochs"] == 1.5
    assert f"epochs 1.5 = {steps:,} steps" in capsys.readouterr().err
    resumed = resume_config(tmp_path / "run", {})
    assert train(resumed, tmp_path / "run", resume=True, progress=False).step == steps


@pytest.mark.parametrize("value, message", [("-1", "epochs must be from 0"), ("2e6", "epochs must be from 0"),
                                            ("nan", "finite")])
def test_bad_epochs_are_one_line(value, message, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--epochs", value, "--dataset", "nowhere.txt"])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


# ----------------------------------------------------------------------------- 4. the gpt1 preset


def test_gpt1_preset_follows_the_paper():
    cfg = preset_config("gpt1")
    m, d, t = cfg.model, cfg.data, cfg.train
    assert (m.n_layer, m.n_head, m.n_embd, m.mlp_width, m.block_size, m.ln, m.gelu) == (12, 12, 768, 3072, 512,
                                                                                      "post", "tanh")
    assert m.dropout == m.attention_dropout == 0.1 and not m.scaled_residual_init
    assert (d.tokenizer, m.vocab_size) == ("gpt1", 40478 + 3)
    assert (t.batch_size * t.grad_accum, t.epochs, t.learning_rate, t.warmup_iters) == (64, 100, 2.5e-4, 2000)
    assert (t.beta1, t.beta2, t.weight_decay, t.floor_lr) == (0.9, 0.999, 0.01, 0.0)
    t.max_iters = 10_000
    assert lr_at(1999, t) == pytest.approx(2.5e-4 * 2000 / 2001) and lr_at(2000, t) == pytest.approx(2.5e-4)
    assert lr_at(9999, t) < 1e-10 and lr_at(10_000, t) == 0.0  # annealed to 0


@pytest.mark.parametrize("scaled", [True, False])
def test_residual_projection_init(scaled):
    cfg = preset_config("gpt1").model
    cfg.n_layer, cfg.scaled_residual_init = 8, scaled
    torch.manual_seed(0)
    model = GPT(cfg)
    proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert fc == pytest.approx(0.02, rel=0.02)
    assert proj == pytest.approx(0.02 / math.sqrt(2 * 8) if scaled else 0.02, rel=0.02)


def test_gpt1_without_vocab_dir_is_one_line(tmp_path, tiny_corpus, capsys):
    for command in (["train", "--out-dir", tmp_path / "run"], ["prepare"]):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in [*command, "--preset", "gpt1", "--dataset", tiny_corpus]])
        assert exc.value.code == 1 and capsys.readouterr().err == GPT1_VOCAB_ERROR
    assert not (tmp_path / "run").exists()


def test_gpt1_tokenizer_trains_from_the_command_line(tmp_path, tiny_corpus, capsys):
    vocab = shared_file("vocab", "gpt1", "encoder_bpe_40000.json").parent
    cli(["train", "--tokenizer", "gpt1", "--vocab-dir", vocab, "--dataset", tiny_corpus, "--n-layer", "1",
         "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4", "--max-iters", "3",
         "--eval-interval", "3", "--eval-iters", "1", "--device", "cpu", "--dtype", "float32",
         "--sample-tokens", "0", "--quiet", "--out-dir", tmp_path / "run"], capsys)
    tok = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert tok["kind"] == "gpt1" and len(tok["encoder"]) == 40478
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == 3


# ----------------------------------------------------------------------------- 5. --help and --version


def help_entries(command: str, capsys) -> tuple[str, list[str]]:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    # One entry per option: its line and the indented continuation lines, joined.
    return text, [" ".join(e.split()) for e in re.split(r"\n(?=  -)", text)]


@pytest.mark.parametrize("command", ["train", "generate", "sweep"])
def test_help_states_each_default_once(command, capsys):
    text, entries = help_entries(command, capsys)
    assert "(default: )" not in text and "(default: None)" not in text
    assert [e for e in entries if e.count("(default:") > 1] == []


def test_help_lists_choices_and_no_stray_positional(capsys):
    text, entries = help_entries("train", capsys)
    for choices in ("--ln {pre,post}", "--gelu {tanh,exact}", "--dtype {auto,float32,bfloat16,float16}",
                    "--compile {auto,on,off}", "--tokenizer {char,bpe,gpt2,gpt1}"):
        assert f"[{choices}]" in text  # in the usage line
    assert any(e.startswith("--bpe-vocab-size BPE_VOCAB_SIZE, --vocab-size") for e in entries)
    assert any(e.startswith("--epochs EPOCHS") for e in entries)
    text, _ = help_entries("sweep", capsys)
    assert "positional arguments" not in text and "report ..." not in text
    assert "slm sweep report DIR" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == "slm 0.1.0\n"


# ----------------------------------------------------------------------------- 6. slm info reads vocabularies


def info(args, capsys) -> dict:
    return json.loads(cli(["info", *args, "--json"], capsys).out)


def test_info_counts_the_characters_of_the_configured_corpus(tmp_path, capsys):
    from slmkit.data import read_corpus

    text, source = read_corpus(preset_config("shakespeare-char").data)
    got = info(["--preset", "shakespeare-char"], capsys)
    assert got["model"]["vocab_size"] == len(set(text)) == 78 and source in got["tokenizer"]
    (tmp_path / "abc.txt").write_text("abcabc cab\n")
    assert info(["--preset", "cpu-tiny", "--dataset", tmp_path / "abc.txt"], capsys)["model"]["vocab_size"] == 5
    tiny = shared_file("tinyshakespeare", "input.txt")
    got = info(["--preset", "shakespeare-char", "--dataset", "tinyshakespeare", "--data-path", tiny], capsys)
    assert got["model"]["vocab_size"] == 65 and "tinyshakespeare" in got["tokenizer"]


def test_info_vocabularies_of_bpe_and_published_tokenizers(capsys):
    assert info(["--tokenizer", "bpe", "--vocab-size", "300"], capsys)["model"]["vocab_size"] == 300
    got = info(["--tokenizer", "gpt2"], capsys)
    assert got["model"]["vocab_size"] == 50257 and "published" in got["tokenizer"]
    got = info(["--preset", "gpt1"], capsys)
    assert got["model"]["vocab_size"] == 40481 and "published" in got["tokenizer"]
    vocab = shared_file("vocab", "gpt2", "encoder.json").parent
    got = info(["--tokenizer", "gpt2", "--vocab-dir", vocab], capsys)
    assert got["model"]["vocab_size"] == 50257 and f"read from {vocab}" in got["tokenizer"]


def test_resolve_config_needs_the_vocab_dir_unless_describing():
    with pytest.raises(UserError, match="needs --vocab-dir with encoder.json and vocab.bpe"):
        resolve_config("gpt2-124m", None, {})
    assert resolve_config("gpt2-124m", None, {}, need_vocab_dir=False).data.tokenizer == "gpt2"
