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
