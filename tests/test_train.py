"""Pre-training: learning, run directory contents, exact resume, accumulation, DDP, checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_config

from slmkit.checkpoint import BEST, LAST, load_checkpoint, load_model, save_checkpoint
from slmkit.errors import UserError
from slmkit.train import lr_at, read_metrics, train


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def test_overfits_a_tiny_corpus_and_writes_a_complete_run_directory(tiny_corpus, tmp_path):
    cfg = tiny_config(tiny_corpus, max_iters=150, eval_interval=50, learning_rate=1e-2)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.final_val_loss is not None and result.final_val_loss < 1.0  # from ln(vocab) ~ 3.3
    run = tmp_path / "run"
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "loss.png", LAST, BEST, "samples.txt"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    records = read_metrics(run)
    assert {"step", "loss", "lr", "tokens_per_s", "elapsed"} <= set(records[0])
    assert sum("val_loss" in r for r in records) == 3
    assert json.loads((run / "config.json").read_text())["model"]["n_layer"] == 2


def test_resume_continues_exactly(tiny_corpus, tmp_path):
    cfg = tiny_config(tiny_corpus, max_iters=12, eval_interval=4)
    cfg.model.dropout = 0.1  # the dropout RNG must be restored too
    train(cfg, tmp_path / "full", progress=False)
    cut_cfg = tiny_config(tiny_corpus, max_iters=12, eval_interval=4)
    cut_cfg.model.dropout = 0.1
    train(cut_cfg, tmp_path / "cut", progress=False, stop_after_step=8)
    assert load_checkpoint(tmp_path / "cut" / LAST).state["step"] == 8
    resumed_cfg = load_checkpoint(tmp_path / "cut" / LAST).config
    train(resumed_cfg, tmp_path / "cut", resume=True, progress=False)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    a = load_checkpoint(tmp_path / "full" / LAST).model_state()
    b = load_checkpoint(tmp_path / "cut" / LAST).model_state()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_equals_a_bigger_batch(tiny_corpus, tmp_path):
    big = tiny_config(tiny_corpus, max_iters=5, batch_size=8, grad_accum=1)
    acc = tiny_config(tiny_corpus, max_iters=5, batch_size=4, grad_accum=2)
    train(big, tmp_path / "big", progress=False)
    train(acc, tmp_path / "acc", progress=False)
    for (s1, l1), (s2, l2) in zip(losses(tmp_path / "big"), losses(tmp_path / "acc"), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = tiny_config(Path("x"), max_iters=100, warmup_iters=10, learning_rate=1.0, min_lr=0.1).train
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0
    assert max(lrs) == pytest.approx(lrs[10]) and all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(100, cfg) == pytest.approx(0.1) and lrs[-1] > 0.1


def test_existing_run_is_not_silently_overwritten(tiny_corpus, tmp_path):
    cfg = tiny_config(tiny_corpus, max_iters=2, eval_interval=2, sample_tokens=0)
    train(cfg, tmp_path / "r", progress=False)
    with pytest.raises(UserError, match="--resume"):
        train(cfg, tmp_path / "r", progress=False)
    train(cfg, tmp_path / "r", progress=False, overwrite=True)


def test_a_start_over_a_start_killed_before_its_first_checkpoint_logs_each_step_once(tiny_corpus, tmp_path):
    cfg = tiny_config(tiny_corpus, max_iters=4, eval_interval=2, sample_tokens=0)
    train(cfg, tmp_path / "ref", progress=False)
    train(cfg, tmp_path / "r", progress=False)
    for name in (LAST, BEST):  # what a kill -9 after the first logged steps and before a checkpoint leaves
        (tmp_path / "r" / name).unlink()
    train(cfg, tmp_path / "r", progress=False)
    assert losses(tmp_path / "r") == losses(tmp_path / "ref")


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_corpus, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no ckpt_last"):
        train(tiny_config(tiny_corpus), tmp_path / "empty", resume=True, progress=False)


def test_resume_with_another_tokenizer_is_refused(tiny_corpus, tmp_path):
    cfg = tiny_config(tiny_corpus, max_iters=2, eval_interval=2, sample_tokens=0)
    train(cfg, tmp_path / "r", progress=False)
    other = tmp_path / "other.txt"
    other.write_text("completely different alphabet: QXZ!? " * 300)
    cfg2 = tiny_config(other, max_iters=4, eval_interval=2, sample_tokens=0)
    with pytest.raises(UserError, match="cannot change: dataset"):
        train(cfg2, tmp_path / "r", resume=True, progress=False)


def test_too_short_corpus_is_a_clear_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 5)
    with pytest.raises(UserError, match="block_size"):
        train(tiny_config(short), tmp_path / "r", progress=False)


@pytest.fixture
def trained(tiny_corpus, tmp_path):
    cfg = tiny_config(tiny_corpus, max_iters=4, eval_interval=2, sample_tokens=0)
    train(cfg, tmp_path / "run", progress=False)
    return tmp_path / "run"


def test_truncated_checkpoint_is_detected_and_named(trained):
    path = trained / LAST
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"{LAST}.*(corrupted|truncated)"):
        load_checkpoint(path)


def test_bit_flipped_checkpoint_fails_its_checksum(trained):
    path = trained / BEST
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted"):
        load_checkpoint(path)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(trained, monkeypatch):
    import errno

    import slmkit.checkpoint as ck

    before = (trained / LAST).read_bytes()
    model, tok, ckpt = load_model(trained, which="last")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", no_space)
    with pytest.raises(UserError, match="(?i)no space left"):
        save_checkpoint(trained / LAST, model, ckpt.config, tok, {"step": 99})
    assert (trained / LAST).read_bytes() == before
    assert not [p for p in trained.iterdir() if "tmp" in p.name]


def test_saved_weights_have_no_compile_or_ddp_prefixes(trained):
    names = load_checkpoint(trained / LAST).model_state().keys()
    assert all(n.startswith(("transformer.", "lm_head")) for n in names)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tiny_corpus, tmp_path):
    common = ["--dataset", str(tiny_corpus), "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
              "--block-size", "32", "--max-iters", "6", "--eval-interval", "3", "--eval-iters", "2",
              "--log-interval", "1", "--device", "cpu", "--dtype", "float32", "--sample-tokens", "0",
              "--learning-rate", "3e-3", "--warmup-iters", "1", "--quiet", "--dropout", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    one = subprocess.run([sys.executable, "-m", "slmkit", "train", *common, "--batch-size", "8",
                          "--out-dir", str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "slmkit", "train", *common, "--batch-size", "4",
                          "--out-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == 6 and [s for s, _ in a] == [s for s, _ in b]
    for (_, la), (_, lb) in zip(a, b, strict=True):
        assert la == pytest.approx(lb, abs=1e-4)
    va = [r["val_loss"] for r in read_metrics(tmp_path / "one") if "val_loss" in r]
    vb = [r["val_loss"] for r in read_metrics(tmp_path / "two") if "val_loss" in r]
    assert va == pytest.approx(vb, abs=1e-4)


def test_compiled_model_saves_plain_parameter_names(tmp_path):
    from slmkit.checkpoint import model_tensors
    from slmkit.config import ModelConfig
    from slmkit.model import GPT

    model = GPT(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=8))
    compiled = torch.compile(model)  # compilation is lazy: wrapping alone costs nothing
    names = set(model_tensors(compiled))
    assert names == set(model_tensors(model)) and not any("_orig_mod" in n for n in names)
