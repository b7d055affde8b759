"""What a user sees around training: defaults that suit the machine, the start banner and ETA,
logs on stderr and results on stdout, file modes, and the learning rate after a longer resume."""

from __future__ import annotations

import json
import os
import stat

import pytest
from conftest import tiny_config

from slmkit.cli import main
from slmkit.train import lr_at, read_metrics, resume_config, train

TINY = ["--n-layer", "1", "--n-head", "1", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "1", "--device", "cpu", "--dtype", "float32", "--sample-tokens", "0"]


def run_cli(capsys, *argv: str) -> tuple[str, str]:
    main(list(argv))
    out = capsys.readouterr()
    return out.out, out.err


def test_plain_train_on_a_cpu_uses_the_cpu_recipe_and_says_so(tiny_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, err = run_cli(capsys, "train", "--dataset", str(tiny_corpus), "--max-iters", "4", "--eval-interval", "2",
                       "--device", "cpu")
    assert "cpu-fast preset" in err
    cfg = json.loads((tmp_path / "runs" / "cpu-fast" / "config.json").read_text())
    assert cfg["preset"] == "cpu-fast" and cfg["model"]["n_embd"] == 64
    assert cfg["resolved"]["device"] == "cpu" and cfg["resolved"]["dtype"].startswith("torch.")
    # Progress and logs on stderr; the one result line on stdout.
    assert out.count("\n") == 1 and out.startswith("done: 4 steps")
    assert "training for 4 steps" in err and "tokens per step" in err and "step 2 " in err
    assert "train " in err and "val " in err  # the fixed-subset train loss beside the val loss


def test_run_files_follow_the_umask(tiny_corpus, tmp_path):
    old = os.umask(0o022)
    try:
        train(tiny_config(tiny_corpus, max_iters=2, eval_interval=2), tmp_path / "run", progress=False)
    finally:
        os.umask(old)
    run = tmp_path / "run"
    assert stat.S_IMODE(run.stat().st_mode) == 0o755
    for name in ("config.json", "tokenizer.json", "ckpt_last.safetensors", "ckpt_best.safetensors", "loss.png",
                 "metrics.jsonl", "samples.txt"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name


def test_a_longer_resume_keeps_the_schedule_and_runs_the_tail_at_the_floor(tiny_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny_config(tiny_corpus, max_iters=10, eval_interval=5, warmup_iters=2, learning_rate=1e-2)
    train(cfg, run, progress=False)
    resumed = resume_config(run, {"train": {"max_iters": 16}})
    assert "original length (10 steps)" in capsys.readouterr().err
    train(resumed, run, resume=True, progress=False)
    lrs = {r["step"]: r["lr"] for r in read_metrics(run) if "lr" in r}
    floor = cfg.train.floor_lr
    # The cosine still ends at step 10 as first planned, and never rises again after it.
    assert lrs[10] == pytest.approx(lr_at(9, cfg.train))
    assert all(lrs[s] == pytest.approx(floor) for s in range(11, 17))
    assert all(lrs[s] >= lrs[s + 1] - 1e-12 for s in range(3, 16))


def test_an_explicit_decay_length_on_resume_is_honoured(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_corpus, max_iters=10, eval_interval=5), run, progress=False)
    resumed = resume_config(run, {"train": {"max_iters": 20, "lr_decay_iters": 20}})
    assert resumed.train.lr_decay_iters == 20


def test_resume_refuses_changes_to_the_model(tiny_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(tiny_corpus, max_iters=2, eval_interval=2), run, progress=False)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--resume", str(run), "--n-layer", "3"])
    assert exc.value.code == 1
    assert "cannot change: n_layer" in capsys.readouterr().err


# -- continued pre-training (--init-from) -------------------------------------------------------------------


def other_text(tmp_path):
    """New text in the tiny corpus's alphabet (its char tokenizer must encode it)."""
    p = tmp_path / "other.txt"
    p.write_text("\n".join(f"the fox sat on the hat number {i % 5}." for i in range(300)) + "\n", encoding="utf-8")
    return p


def test_init_from_starts_from_the_runs_weights_with_a_fresh_schedule(tiny_corpus, tmp_path, capsys):
    from slmkit.checkpoint import load_checkpoint

    base = tmp_path / "base"
    train(tiny_config(tiny_corpus, max_iters=6, eval_interval=3, logger="csv"), base, progress=False)
    out, _ = run_cli(capsys, "train", "--init-from", str(base), "--dataset", str(other_text(tmp_path)),
                     "--max-iters", "2", "--eval-interval", "2", "--warmup-iters", "0", "--lr", "1e-9",
                     "--dropout", "0.1", "--out-dir", str(tmp_path / "more"))
    assert out.startswith("done: 2 steps")  # its own step count, not the base run's 6 + 2
    cfg = json.loads((tmp_path / "more" / "config.json").read_text())
    assert cfg["train"]["init_from"] == str(base) and cfg["model"]["n_embd"] == 32 and cfg["model"]["dropout"] == 0.1
    assert cfg["data"]["dataset"].endswith("other.txt") and cfg["data"]["val_data"] == ""
    assert cfg["train"]["logger"] == "" and not (tmp_path / "more" / "metrics.csv").exists()  # trackers: opt in
    assert (tmp_path / "more" / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    # At a learning rate of 1e-9 two steps leave the base run's weights as they were.
    old = load_checkpoint(base / "ckpt_best.safetensors")
    new = load_checkpoint(tmp_path / "more" / "ckpt_last.safetensors")
    for name, tensor in old.model_state().items():
        assert (new.model_state()[name] - tensor).abs().max() < 1e-5, name
    assert new.state["step"] == 2
    steps = [r["step"] for r in read_metrics(tmp_path / "more") if "loss" in r]
    assert steps and min(steps) == 1


def test_init_from_beats_random_weights_on_the_same_steps(tiny_corpus, tmp_path):
    base = tmp_path / "base"
    train(tiny_config(tiny_corpus, max_iters=40, eval_interval=40), base, progress=False)
    text = other_text(tmp_path)
    fresh = tiny_config(text, max_iters=3, eval_interval=3, sample_tokens=0)
    fresh.data.tokenizer = "char"
    scratch = train(fresh, tmp_path / "scratch", progress=False)
    cont = tiny_config(text, max_iters=3, eval_interval=3, sample_tokens=0, init_from=str(base))
    continued = train(cont, tmp_path / "continued", progress=False)
    assert continued.best_val_loss < scratch.best_val_loss - 0.5


@pytest.mark.parametrize("argv, match", [
    (["--n-layer", "3"], "cannot change: n_layer"),
    (["--tokenizer", "bpe"], "cannot change: tokenizer"),
    (["--preset", "cpu-tiny"], "not --preset or --config"),
    (["--resume", "RUN"], "drop --init-from"),
])
def test_init_from_refuses_what_the_weights_cannot_take(tiny_corpus, tmp_path, capsys, argv, match):
    from conftest import cli_fails

    base = tmp_path / "base"
    train(tiny_config(tiny_corpus, max_iters=2, eval_interval=2), base, progress=False)
    argv = [str(base) if a == "RUN" else a for a in argv]
    cli_fails(["train", "--init-from", base, "--out-dir", tmp_path / "x", *argv], capsys, match)
    assert not (tmp_path / "x").exists()


def test_init_from_refuses_a_missing_run_and_another_architecture(tiny_corpus, tmp_path, capsys):
    from conftest import cli_fails

    from slmkit.errors import UserError

    cli_fails(["train", "--init-from", tmp_path / "nowhere", "--out-dir", tmp_path / "x"], capsys,
              "no such run directory")
    base = tmp_path / "base"
    train(tiny_config(tiny_corpus, max_iters=2, eval_interval=2), base, progress=False)
    wider = tiny_config(tiny_corpus, max_iters=2, init_from=str(base))
    wider.model.n_embd = 64
    with pytest.raises(UserError, match="whose n_embd is 32, not 64"):
        train(wider, tmp_path / "wider", progress=False)
    assert not (tmp_path / "wider").exists()
