"""Owned folders and locks: what slmkit may delete, replace or take over, and what it must not."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import tiny_config

from slmkit.errors import UserError
from slmkit.fileio import LOCK, FolderLock, claim_folder, record_files, remove_owned, staged_folder


def test_a_name_slmkit_no_longer_has_stops_being_its_own(tmp_path):
    folder = claim_folder(tmp_path / "out", "x", overwrite=False)
    (folder / "f1").write_text("ours")
    record_files(folder, "x", ["f1"])
    assert remove_owned(folder) == ["f1"]
    (folder / "f1").write_text("the user's, made later")
    claim_folder(folder, "x", overwrite=True)
    assert (folder / "f1").read_text() == "the user's, made later"


def test_a_staged_output_never_replaces_a_users_file_of_the_same_name(tmp_path):
    target = tmp_path / "export"
    with staged_folder(target, "export", overwrite=False) as stage:
        (stage / "model.bin").write_text("v1")
    (target / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt, which slmkit did not write"):
        with staged_folder(target, "export", overwrite=True) as stage:
            (stage / "model.bin").write_text("v2")
            (stage / "notes.txt").write_text("generated")
    assert (target / "notes.txt").read_text() == "mine" and (target / "model.bin").read_text() == "v1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the stage is gone
    with staged_folder(target, "export", overwrite=True) as stage:  # a name dropped from the output
        (stage / "weights.bin").write_text("v3")
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) == ["notes.txt", "weights.bin"]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_two_processes_never_both_take_over_one_stale_lock(tmp_path, monkeypatch):
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead_pid(), "host": __import__("socket").gethostname()}))
    a, b = FolderLock(tmp_path), FolderLock(tmp_path)
    real_holder = FolderLock._holder

    def holder_then_a_takes_over(self):
        seen = real_holder(self)
        if self is b and not a.held:
            a.acquire()  # A takes the stale lock over between B's look and B's take-over
        return seen

    monkeypatch.setattr(FolderLock, "_holder", holder_then_a_takes_over)
    with pytest.raises(UserError, match="in use by another slmkit process"):
        b.acquire()
    assert a.held and not b.held
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == __import__("os").getpid()
    a.release()
    assert not (tmp_path / LOCK).exists()


def test_a_failed_start_leaves_no_folders_behind(tmp_path):
    from slmkit.train import train

    cfg = tiny_config(tmp_path / "missing.txt")
    with pytest.raises(UserError):
        train(cfg, tmp_path / "a" / "b" / "run", progress=False)
    with pytest.raises(UserError, match="holds no ckpt_last"):
        train(cfg, tmp_path / "c" / "run", resume=True, progress=False)
    assert list(tmp_path.iterdir()) == []
