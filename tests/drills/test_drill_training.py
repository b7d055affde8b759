"""Drills on pre-training runs: kills and signals at random moments, two writers, planted symlinks,
a full disk, absurd sizes. Each drill runs the real `slm` in a subprocess, as a user would.

A resumed run must end bit-identical to an uninterrupted one (weights and every logged loss),
whatever moment the interruption hit: mid-step, mid-evaluation, or inside a checkpoint write.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import one_error_line

from slmkit.checkpoint import LAST, load_checkpoint
from slmkit.fileio import LOCK, MARKER

TRIALS = int(os.environ.get("SLMKIT_DRILL_TRIALS", "10"))
# Dropout on, a checkpoint every step (most of the wall time is spent inside checkpoint writes, so
# random kills land there too), an evaluation every 25 steps.
TRAIN_FLAGS = [
    "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--dropout", "0.1",
    "--batch-size", "8", "--max-iters", "120", "--eval-interval", "25", "--eval-iters", "2",
    "--log-interval", "1", "--checkpoint-interval", "1", "--sample-tokens", "0", "--warmup-iters", "2",
    "--device", "cpu", "--dtype", "float32", "--quiet",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def slm(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmkit", *args], capture_output=True, text=True, env=ENV,
                          timeout=300, **kw)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slmkit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def losses(run: Path) -> list[tuple]:
    """Every logged number that does not depend on timing, in order."""
    keys = ("step", "loss", "lr", "val_loss", "train_eval_loss", "final_val_loss")
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [tuple(r.get(k) for k in keys) for r in records]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / LAST).model_state()


def assert_identical(run: Path, reference: Path) -> None:
    got, want = weights(run), weights(reference)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "resumed weights differ from the uninterrupted run"
    assert losses(run) == losses(reference), "resumed metrics differ from the uninterrupted run"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    lines = [f"the {['cat', 'dog', 'bird', 'fox'][i % 4]} sat on the {['mat', 'log', 'hat'][i % 3]} number {i % 7}."
             for i in range(400)]
    p = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    r = slm("train", "--dataset", str(corpus), "--out-dir", str(run), *TRAIN_FLAGS)
    assert r.returncode == 0, r.stderr
    return run


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def finish(run: Path, corpus: Path) -> None:
    """Bring an interrupted run to its end the way a user would."""
    if (run / LAST).is_file():
        r = slm("train", "--resume", str(run))
    else:  # killed before its first checkpoint: start again
        r = slm("train", "--dataset", str(corpus), "--out-dir", str(run), *TRAIN_FLAGS)
    assert r.returncode == 0, r.stderr


def kill_trial(seed: int, corpus: Path, reference: Path, tmp_path: Path) -> None:
    rng = random.Random(seed)
    run = tmp_path / "run"
    for _ in range(2):  # two kills in one run: the second one hits a resumed process
        proc = start("train", "--resume", str(run)) if (run / LAST).is_file() else \
            start("train", "--dataset", str(corpus), "--out-dir", str(run), *TRAIN_FLAGS)
        time.sleep(rng.uniform(1.5, 4.0))  # start-up (imports) takes ~1.5 s, the run ~2-3 s more
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finish(run, corpus)
    assert_identical(run, reference)
    assert not [p.name for p in run.iterdir() if "tmp" in p.name], "a killed write left a temp file behind"
    assert not (run / LOCK).exists()


@pytest.mark.parametrize("trial", range(3))
def test_kill_9_at_random_moments_resumes_bit_identical(trial, corpus, reference, tmp_path):
    kill_trial(trial, corpus, reference, tmp_path)


@pytest.mark.long
@pytest.mark.parametrize("trial", range(3, 3 + TRIALS))
def test_kill_9_many_trials(trial, corpus, reference, tmp_path):
    kill_trial(trial, corpus, reference, tmp_path)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("delay", [0.05, 0.6])
def test_sigint_and_sigterm_mid_step_save_and_resume_exactly(sig, code, delay, corpus, reference, tmp_path):
    run = tmp_path / "run"
    proc = start("train", "--dataset", str(corpus), "--out-dir", str(run), *TRAIN_FLAGS)
    wait_for(run / LAST)  # training is under way
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal (a very fast machine)")
    assert proc.returncode == code, err
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith("error:") and "stopped and saved at step" in last and "Traceback" not in err, err
    step = load_checkpoint(run / LAST).state["step"]
    assert f"step {step};" in last
    finish(run, corpus)
    assert_identical(run, reference)


def test_ctrl_c_during_start_up_is_one_line(corpus, tmp_path):
    proc = start("train", "--dataset", str(corpus), "--out-dir", str(tmp_path / "run"), *TRAIN_FLAGS)
    time.sleep(0.4)  # still importing torch
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.strip()]) == 1, err


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(corpus, tmp_path):
    run = tmp_path / "run"
    first = start("train", "--dataset", str(corpus), "--out-dir", str(run), *TRAIN_FLAGS[:-1],
                  "--max-iters", "100000")
    try:
        wait_for(run / LAST)
        second = slm("train", "--resume", str(run))
        assert second.returncode == 1
        line = one_error_line(second.stderr)
        assert f"PID {first.pid}" in line and "in use" in line
        other = slm("train", "--dataset", str(corpus), "--out-dir", str(run), "--overwrite", *TRAIN_FLAGS)
        assert other.returncode == 1 and "in use" in one_error_line(other.stderr)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The killed writer's lock is stale: the next run takes it over.
    assert (run / LOCK).exists()
    r = slm("train", "--dataset", str(corpus), "--out-dir", str(run), "--overwrite", *TRAIN_FLAGS)
    assert r.returncode == 0, r.stderr
    assert not (run / LOCK).exists()


def test_a_folder_with_user_files_is_never_touched(corpus, tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "samples.txt").write_text("my poem")
    for extra in ([], ["--overwrite"]):
        r = slm("train", "--dataset", str(corpus), "--out-dir", str(mine), *TRAIN_FLAGS, *extra)
        assert r.returncode == 1
        assert "not written by slmkit" in one_error_line(r.stderr)
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "samples.txt"]
    assert (mine / "config.json").read_text() == '{"my": "settings"}'


def test_overwrite_keeps_the_users_files_in_a_run_folder(reference, corpus, tmp_path):
    run = tmp_path / "run"
    r = slm("train", "--dataset", str(corpus), "--out-dir", str(run), *TRAIN_FLAGS, "--max-iters", "5")
    assert r.returncode == 0, r.stderr
    (run / "my_notes.md").write_text("keep me")
    r = slm("train", "--dataset", str(corpus), "--out-dir", str(run), *TRAIN_FLAGS)
    assert r.returncode == 1 and "already holds a trained run" in one_error_line(r.stderr)
    r = slm("train", "--dataset", str(corpus), "--out-dir", str(run), *TRAIN_FLAGS, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (run / "my_notes.md").read_text() == "keep me"
    assert_identical(run, reference)


def test_planted_symlinks_never_redirect_a_write(corpus, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text(json.dumps({"kind": "run", "files": []}))
    # The temporary names older versions used, and names an attacker might guess.
    for name in (".loss.png.tmp.png", ".ckpt_last.safetensors.tmp", ".config.json.tmp", ".metrics.jsonl.tmp"):
        (run / name).symlink_to(victim)
    r = slm("train", "--dataset", str(corpus), "--out-dir", str(run), *TRAIN_FLAGS, "--max-iters", "30")
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious"
    # A link in place of a file the run appends to is refused, and its target is left alone.
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    r = slm("train", "--resume", str(run))
    assert r.returncode == 1 and "symbolic link" in one_error_line(r.stderr)
    assert victim.read_text() == "precious"


def test_orphan_temp_files_are_swept_and_bad_metrics_lines_skipped(corpus, tmp_path):
    run = tmp_path / "run"
    r = slm("train", "--dataset", str(corpus), "--out-dir", str(run), *TRAIN_FLAGS, "--max-iters", "60")
    assert r.returncode == 0, r.stderr
    orphan = run / ".ckpt_last.safetensors.abc123.slmkit-tmp"
    orphan.write_bytes(b"half a checkpoint")
    with open(run / "metrics.jsonl", "a") as f:
        f.write("this is not json\n")
    r = slm("train", "--resume", str(run), "--max-iters", "120")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "malformed" in r.stderr
    assert not orphan.exists()
    assert load_checkpoint(run / LAST).state["step"] == 120


def test_absurd_sizes_are_refused_before_allocating(corpus, tmp_path):
    r = slm("train", "--dataset", str(corpus), "--out-dir", str(tmp_path / "a"), *TRAIN_FLAGS,
            "--n-layer", "200", "--n-embd", "8192", "--n-head", "64")
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert "GiB" in line and "--force" in line
    assert not (tmp_path / "a").exists()  # refused before any folder was made
    cfg = tmp_path / "huge.toml"
    cfg.write_text("n_layer = 1e30\n")
    r = slm("train", "--dataset", str(corpus), "--out-dir", str(tmp_path / "b"), "--config", str(cfg),
            "--device", "cpu", "--max-iters", "1")
    assert r.returncode == 1
    one_error_line(r.stderr)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    except FileNotFoundError:
        return False
    return r.returncode == 0


def test_full_disk_keeps_the_last_checkpoint_and_resume_works_once_freed(corpus, reference, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        run = disk / "run"
        r = slm("train", "--dataset", str(corpus), "--out-dir", str(run), *TRAIN_FLAGS, "--max-iters", "50")
        assert r.returncode == 0, r.stderr
        good = (run / LAST).read_bytes()
        # Fill the disk to within 120 KB: config and metrics still fit, the next checkpoint does not.
        filler = disk / "filler"
        st = os.statvfs(disk)
        filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - 120_000))
        r = slm("train", "--resume", str(run), "--max-iters", "120", "--quiet")
        assert r.returncode == 1 and "Traceback" not in r.stderr
        last = r.stderr.strip().splitlines()[-1]  # after the note on the learning-rate schedule
        assert last.startswith("error:") and "no space left" in last.lower()
        assert (run / LAST).read_bytes() == good  # the last good checkpoint survived
        assert not [p for p in run.iterdir() if "tmp" in p.name]
        filler.unlink()
        r = slm("train", "--resume", str(run), "--max-iters", "120")
        assert r.returncode == 0, r.stderr
        assert load_checkpoint(run / LAST).state["step"] == 120
        steps = [r[0] for r in losses(run)]
        assert steps == sorted(steps) and len(steps) == len(set(steps)) + 1  # one final_val_loss record
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
