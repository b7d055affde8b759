"""Issue 11: one config mechanism for every command. Each settings dataclass field is one flag with its
help, one default and its choices; the CLI and the API share each default; --device is declared once;
aliases (--out, --lr) work; importing the CLI does not import torch; eval and evaluate refuse each
other's kind of model with a hint."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import asdict, fields

import pytest
from conftest import REPO, cli_fails, tiny_config

from slmkit.cli import build_parser, config_flags, main
from slmkit.cli.finetune_cmds import finetune_config
from slmkit.cli.flags import field_help, flag_names, given, is_flag, runtime_field, subcommands
from slmkit.cli.generate_cmds import generation_config
from slmkit.config import DataConfig, ModelConfig, TrainConfig
from slmkit.errors import UserError
from slmkit.finetune import FinetuneConfig
from slmkit.generate import GenerationConfig

GENERATE = ["generate", "--run", "r"]
FINETUNE = ["finetune", "--from", "r", "--task", "sst2", "--train", "a", "--dev", "b"]


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args([str(a) for a in argv])


def option_actions(command: str) -> dict[str, argparse.Action]:
    """Each flag name of a command -> its action."""
    parser = subcommands(build_parser())[command]
    return {name: a for a in parser._actions for name in a.option_strings}


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


def help_entry(command: str, flag: str, capsys) -> str:
    """The --help entry of one flag: its line and the indented continuation lines, joined."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", text)]
    found = [e for e in entries if e.startswith(flag + " ") or e.startswith(flag + ",")]
    assert len(found) == 1, (flag, found)
    return found[0]


# ----------------------------------------------------------------------------- every field is one flag


@pytest.mark.parametrize("command, cls", [
    ("train", ModelConfig), ("train", DataConfig), ("train", TrainConfig), ("info", ModelConfig),
    ("prepare", DataConfig), ("generate", GenerationConfig), ("finetune", FinetuneConfig), ("sweep", TrainConfig),
])
def test_every_field_is_a_flag_from_the_mechanism(command, cls):
    actions = option_actions(command)
    for f in fields(cls):
        if not is_flag(f):
            continue
        names = flag_names(f)
        action = actions.get(names[0])
        assert action is not None, f"{command}: no flag for {cls.__name__}.{f.name}"
        assert set(names) <= set(action.option_strings)
        # A runtime field (device, dtype, weights) is the one declaration every command shares.
        owner = runtime_field(f.name) if f.metadata.get("runtime") else f
        assert action.help == field_help(owner)
        assert action.choices == owner.metadata.get("choices") or action.choices is None


def test_sweep_options_are_flags_too():
    from slmkit.sweep import SweepOptions

    actions = option_actions("sweep")
    for f in fields(SweepOptions):
        assert actions[flag_names(f)[0]].help == field_help(f)


@pytest.mark.parametrize("command, cls", [("generate", GenerationConfig), ("finetune", FinetuneConfig)])
def test_help_shows_each_field_with_its_help_and_one_default(command, cls, capsys):
    for f in fields(cls):
        if not is_flag(f):
            continue
        owner = runtime_field(f.name) if f.metadata.get("runtime") else f
        entry = help_entry(command, flag_names(f)[0], capsys)
        assert squeeze(owner.metadata["help"].replace("%%", "%")) in squeeze(entry), entry
        shown = [] if owner.default in (None, "", ()) else [f"(default: {owner.default})"]
        assert re.findall(r"\(default: [^)]*\)", entry) == shown, entry


# ----------------------------------------------------------------------------- one default


def test_generation_defaults_are_the_apis():
    assert generation_config(parse(GENERATE)) == GenerationConfig()
    d = GenerationConfig()
    assert (d.top_k, d.max_new_tokens, d.temperature) == (200, 500, 0.8)  # README: `slm generate` defaults


def test_generation_flags_reach_the_config():
    gen = generation_config(parse([*GENERATE, "--top-k", "5", "--top-p", "0.9", "--stop", "\\n\\n", "--stop", "x",
                                   "--no-eot-stop", "--no-cache", "--seed", "3", "--max-new-tokens", "7"]))
    assert gen == GenerationConfig(top_k=5, top_p=0.9, stop=("\n\n", "x"), stop_at_eot=False, use_cache=False,
                                   seed=3, max_new_tokens=7)


def test_generation_flags_are_checked_before_the_model_loads(tmp_path, capsys):
    cli_fails(["generate", "--run", tmp_path / "missing", "--top-k", "-1"], capsys, "--top-k must be between")


def test_finetune_defaults_are_the_apis():
    assert finetune_config(parse(FINETUNE)) == FinetuneConfig()


def test_sweep_defaults_are_the_apis():
    from slmkit.sweep import SweepOptions

    assert SweepOptions(**given(parse(["sweep"]), "sweep")) == SweepOptions()


def test_a_finetune_record_with_the_short_name_lr_still_loads():
    assert FinetuneConfig.from_dict({"lr": 1e-4, "epochs": 2}) == FinetuneConfig(learning_rate=1e-4, epochs=2)
    assert FinetuneConfig.from_dict(asdict(FinetuneConfig())) == FinetuneConfig()
    with pytest.raises(UserError, match="unknown fine-tuning setting 'nope'"):
        FinetuneConfig.from_dict({"nope": 1})


# ----------------------------------------------------------------------------- aliases


@pytest.mark.parametrize("argv", [
    ["prepare"], ["train"], ["sweep"], ["import", "--format", "hf", "--src", "s"], ["export", "--run", "r"], FINETUNE,
])
@pytest.mark.parametrize("flag", ["--out-dir", "--out"])
def test_out_and_out_dir_are_one_flag(argv, flag):
    assert parse([*argv, flag, "d"]).out_dir == "d"


@pytest.mark.parametrize("flag", ["--learning-rate", "--lr"])
def test_lr_and_learning_rate_are_one_flag(flag):
    assert finetune_config(parse([*FINETUNE, flag, "1e-4"])).learning_rate == 1e-4
    for command in ("train", "sweep"):
        assert config_flags(parse([command, flag, "0.01"])) == {"train": {"learning_rate": 0.01}}


# ----------------------------------------------------------------------------- --device once


def test_device_and_dtype_are_declared_once():
    parsers = subcommands(build_parser())
    for name in ("device", "dtype"):
        # `slm export --dtype` is the weight type of a GGUF file it writes, not a runtime setting.
        helps = {cmd: a.help for cmd, p in parsers.items() for a in p._actions
                 if f"--{name}" in a.option_strings and cmd != "export"}
        assert set(helps) >= {"train", "generate", "eval", "score", "finetune", "predict", "evaluate", "sweep"}
        assert set(helps.values()) == {field_help(runtime_field(name))}
        assert runtime_field(name) in fields(TrainConfig)


def test_weights_is_declared_once():
    parsers = subcommands(build_parser())
    helps = {cmd: a.help for cmd, p in parsers.items() for a in p._actions if "--weights" in a.option_strings}
    assert set(helps) == {"generate", "chat", "serve", "eval", "score"}
    assert set(helps.values()) == {field_help(runtime_field("weights"))}


# ----------------------------------------------------------------------------- start-up


def test_importing_the_cli_and_top_level_help_do_not_import_torch():
    code = ("import sys, slmkit.cli as c; p = c.build_parser(); p.format_help(); "
            "c.build_parser().parse_args(['train', '--max-iters', '3']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "False"


# ----------------------------------------------------------------------------- eval vs evaluate


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pre-training run, and a checkpoint marked as fine-tuned (the kind is all these tests read)."""
    from slmkit.checkpoint import load_model, save_checkpoint
    from slmkit.finetune.loop import META_KEY
    from slmkit.train import train

    root = tmp_path_factory.mktemp("kinds")
    corpus = root / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n" * 200)
    cfg = tiny_config(corpus, max_iters=2, eval_interval=2, sample_tokens=0, final_eval=False)
    train(cfg, root / "pre", progress=False)
    model, tok, ckpt = load_model(root / "pre")
    save_checkpoint(root / "ft.safetensors", model, ckpt.config, tok, ckpt.state, extra_meta={META_KEY: "{}"})
    return root / "pre", root / "ft.safetensors"


def test_evaluate_on_a_pretrained_run_points_to_eval(runs, tmp_path, capsys):
    pre, _ = runs
    line = cli_fails(["evaluate", "--run", pre, "--data", tmp_path / "dev.tsv"], capsys, "not a fine-tuned checkpoint")
    assert "pre-trained language model" in line and "slm eval" in line
    line = cli_fails(["predict", "--run", pre, "--input", tmp_path / "dev.tsv"], capsys, "not a fine-tuned")
    assert "slm finetune" in line


def test_eval_on_a_finetuned_model_points_to_evaluate(runs, capsys):
    _, ft = runs
    line = cli_fails(["eval", "--run", ft], capsys, "is a fine-tuned model")
    assert "slm evaluate" in line


def test_each_help_says_what_it_measures_first(capsys):
    for command, first in (("eval", "A language model's loss"), ("evaluate", "A fine-tuned model's task metrics")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        description = capsys.readouterr().out.split("\n\n")[1]
        assert description.startswith(first)


def test_resuming_a_sweep_refuses_the_flags_it_would_ignore(tmp_path, capsys):
    cli_fails(["sweep", "--resume", tmp_path, "--seeds", "2", "--out", tmp_path], capsys, "drop --out-dir, --seeds")
