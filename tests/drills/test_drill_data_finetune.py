"""Drills for issue 9: `slm prepare --out`, corpus edge cases, fine-tuning run folders and
prediction files never delete or overwrite what slmkit did not write, and every failure is one line."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from slmkit.checkpoint import BEST, load_checkpoint, save_checkpoint
from slmkit.cli import main
from slmkit.config import DataConfig, RunConfig
from slmkit.data import open_prepared, prepare
from slmkit.errors import UserError
from slmkit.fileio import LOCK, MARKER, TMP_SUFFIX, FolderLock, read_marker
from slmkit.model import GPT
from slmkit.tokenizers import CharTokenizer

ALPHABET = list(" abcdefghijklmnopqrstuvwxyz.!?,'")
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `slm ARGV`: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def no_temp_left(parent: Path) -> bool:
    return not [p for p in parent.rglob("*") if p.name.endswith(TMP_SUFFIX)]


def write_corpus(path: Path, word: str, n: int = 200) -> Path:
    path.write_text(" ".join(f"{word} {i % 9}." for i in range(n)) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- slm prepare --out


def test_prepare_out_refuses_a_users_folder_and_touches_nothing(tiny_corpus, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "train.bin").write_bytes(b"my own binary")
    before = snapshot(mine)
    line = one_line_error(*cli(["prepare", "--dataset", tiny_corpus, "--out", mine], capsys)[::2])
    assert "not written by slmkit" in line and str(mine) in line
    assert snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["notes.txt", "train.bin"]
    assert no_temp_left(tmp_path)


def test_prepare_out_on_a_file_is_one_line(tiny_corpus, tmp_path, capsys):
    f = tmp_path / "data.bin"
    f.write_text("keep")
    assert "not a directory" in one_line_error(*cli(["prepare", "--dataset", tiny_corpus, "--out", f], capsys)[::2])
    assert f.read_text() == "keep"


def test_prepare_out_replaces_our_own_dataset_and_keeps_the_users_files(tmp_path, capsys):
    a, b = write_corpus(tmp_path / "a.txt", "alpha"), write_corpus(tmp_path / "b.txt", "beta gamma")
    out = tmp_path / "prep"
    code, stdout, _ = cli(["prepare", "--dataset", a, "--out", out], capsys)
    assert code == 0 and "prepared" in stdout
    assert read_marker(out)["kind"] == "prepared"
    (out / "README.txt").write_text("my description of this dataset")
    first = open_prepared(out).meta
    mtime = (out / "train.bin").stat().st_mtime_ns
    assert cli(["prepare", "--dataset", a, "--out", out], capsys)[0] == 0  # same corpus: reused
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    assert cli(["prepare", "--dataset", b, "--out", out], capsys)[0] == 0  # new corpus: replaced
    second = open_prepared(out)
    assert second.meta["key"] != first["key"] and second.meta["source"] == str(b)
    assert second.tokenizer.decode(second.tokens("train")[:10].tolist()) == b.read_text()[:10]
    assert (out / "README.txt").read_text() == "my description of this dataset"
    assert set(read_marker(out)["files"]) == {"meta.json", "tokenizer.json", "train.bin", "val.bin"}
    assert no_temp_left(tmp_path)


def test_prepared_folder_from_before_markers_still_opens_and_is_replaced(tmp_path, capsys):
    a, b = write_corpus(tmp_path / "a.txt", "alpha"), write_corpus(tmp_path / "b.txt", "beta")
    out = tmp_path / "old"
    prepare(DataConfig(dataset=str(a)), out_dir=out)
    (out / MARKER).unlink()  # as written by slmkit before ownership markers
    (out / "mine.txt").write_text("user file")
    assert open_prepared(out).meta["source"] == str(a)
    assert cli(["prepare", "--dataset", b, "--out", out], capsys)[0] == 0
    assert open_prepared(out).meta["source"] == str(b) and (out / "mine.txt").read_text() == "user file"


def test_full_disk_mid_prepare_leaves_no_complete_looking_dataset(tmp_path, capsys, monkeypatch):
    import slmkit.data as data_mod

    real = data_mod._write_durably

    def full_at_val(path, write):
        if path.name == "val.bin":
            path.write_bytes(b"\0" * 7)  # part of the file reached the disk, then the disk was full
            raise ENOSPC
        real(path, write)

    a, b = write_corpus(tmp_path / "a.txt", "alpha"), write_corpus(tmp_path / "b.txt", "beta")
    monkeypatch.setattr(data_mod, "_write_durably", full_at_val)
    new = tmp_path / "new"
    line = one_line_error(*cli(["prepare", "--dataset", a, "--out", new], capsys)[::2])
    assert "no space left" in line
    assert not new.exists() and no_temp_left(tmp_path)
    # An existing dataset of ours survives a failed re-prepare whole.
    monkeypatch.setattr(data_mod, "_write_durably", real)
    old = tmp_path / "old"
    assert cli(["prepare", "--dataset", a, "--out", old], capsys)[0] == 0
    before = snapshot(old)
    monkeypatch.setattr(data_mod, "_write_durably", full_at_val)
    assert "no space left" in one_line_error(*cli(["prepare", "--dataset", b, "--out", old], capsys)[::2])
    assert snapshot(old) == before and open_prepared(old).meta["source"] == str(a)
    assert no_temp_left(tmp_path)


# ----------------------------------------------------------------------------- corpus edge cases


def test_one_character_corpus_says_how_much_text_is_needed(tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("a")
    line = one_line_error(*cli(["prepare", "--dataset", one], capsys)[::2])
    assert "1 character" in line and "at least 11 characters" in line  # val_fraction 0.1: 9 + 2


def test_splits_shorter_than_the_block_say_how_much_text_is_needed(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("abcdefghij" * 10)  # 90 train and 10 validation characters
    data = prepare(DataConfig(dataset=str(small)), out_dir=tmp_path / "p")
    data.check_block_size(8)  # 10 validation tokens hold a window of 9
    with pytest.raises(UserError) as err:
        data.check_block_size(32)
    msg = str(err.value)
    assert "\n" not in msg and "validation split has 10 tokens" in msg and "330 characters" in msg


def test_corpus_edge_cases_are_one_line_each(tmp_path, capsys, monkeypatch):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café au lait ".encode("latin-1") * 20)
    assert "UTF-8" in one_line_error(*cli(["prepare", "--dataset", latin], capsys)[::2])
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    (empty_dir / "notes.md").write_text("not a .txt")
    assert "no .txt files" in one_line_error(*cli(["prepare", "--dataset", empty_dir], capsys)[::2])
    missing = tmp_path / "missing.txt"
    assert "neither a file" in one_line_error(*cli(["prepare", "--dataset", missing], capsys)[::2])
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n")
    assert "empty" in one_line_error(*cli(["prepare", "--dataset", blank], capsys)[::2])
    locked = write_corpus(tmp_path / "locked.txt", "secret")
    real_read = Path.read_text

    def unreadable(self, *a, **k):  # tests run as root here: chmod 000 would not stop the read
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_read(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert "cannot read" in one_line_error(*cli(["prepare", "--dataset", locked], capsys)[::2])


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("tokens"),
    lambda m: m.update(tokens={"train": "many", "val": 3}),
    lambda m: m.update(dtype="float64"),
    lambda m: m.update(chars=[1, 2]),
    lambda m: m.pop("source"),
])
def test_malformed_meta_json_is_one_line_and_re_prepared(tiny_corpus, tmp_path, edit):
    out = tmp_path / "p"
    prepare(DataConfig(dataset=str(tiny_corpus)), out_dir=out)
    meta = json.loads((out / "meta.json").read_text())
    edit(meta)
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="malformed") as err:
        open_prepared(out)
    assert "\n" not in str(err.value)
    assert prepare(DataConfig(dataset=str(tiny_corpus)), out_dir=out).meta["tokens"]["train"] > 0


def test_meta_json_that_is_not_an_object_is_one_line(tiny_corpus, tmp_path):
    out = tmp_path / "p"
    prepare(DataConfig(dataset=str(tiny_corpus)), out_dir=out)
    (out / "meta.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        open_prepared(out)


# ----------------------------------------------------------------------------- fine-tuning run folders


def _rows(n: int, seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        letters = list("abcdef" if i % 2 else "stuvwxyz")
        out.append((" ".join("".join(rng.choice(letters, size=3)) for _ in range(2)), i % 2))
    return out


@pytest.fixture
def toy(tmp_path):
    """A tiny random-init char GPT checkpoint and a separable two-label TSV task."""
    base = CharTokenizer(ALPHABET)
    cfg = RunConfig()
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.vocab_size = 1, 2, 16, 16, 0.0, base.vocab_size
    torch.manual_seed(0)
    ckpt = tmp_path / "base.safetensors"
    save_checkpoint(ckpt, GPT(m), cfg, base, {"step": 0})
    files = {}
    for split, n, seed in (("train", 32, 0), ("dev", 16, 1)):
        files[split] = tmp_path / f"{split}.tsv"
        files[split].write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in _rows(n, seed)))
    return ckpt, files


def ft_args(toy, out: Path, *extra: str) -> list[str]:
    ckpt, files = toy
    return ["finetune", "--from", ckpt, "--task", "toy", "--family", "classification", "--format", "tsv",
            "--columns", "text", "--label-column", "label", "--labels", "0,1", "--train", files["train"],
            "--dev", files["dev"], "--out-dir", out, "--epochs", "1", "--batch-size", "16", "--lr", "3e-3",
            "--max-len", "12", "--quiet", "--device", "cpu", "--dtype", "float32", *extra]


def test_finetune_into_a_users_folder_is_refused(toy, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    line = one_line_error(*cli(ft_args(toy, out), capsys)[::2])
    assert "not written by slmkit" in line
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]  # no marker, no lock, no log
    line = one_line_error(*cli(ft_args(toy, out, "--overwrite"), capsys)[::2])
    assert "not written by slmkit" in line and (out / "thesis.tex").read_text() == "years of work"


def test_finetune_refuses_a_finished_run_and_overwrite_keeps_the_users_files(toy, tmp_path, capsys):
    out = tmp_path / "ft"
    code, stdout, _ = cli(ft_args(toy, out), capsys)
    assert code == 0 and "best dev" in stdout
    assert read_marker(out)["kind"] == "finetune" and not (out / LOCK).exists()
    assert {"ckpt_best.safetensors", "metrics.jsonl", "finetune.png", "log.txt", "finetune.json"} <= set(
        read_marker(out)["files"])
    (out / "my-notes.txt").write_text("notes on this run")
    best = (out / BEST).read_bytes()
    line = one_line_error(*cli(ft_args(toy, out), capsys)[::2])
    assert "already holds a fine-tuned run" in line and "--overwrite" in line
    assert (out / BEST).read_bytes() == best
    assert cli(ft_args(toy, out, "--overwrite", "--seed", "1"), capsys)[0] == 0
    assert (out / "my-notes.txt").read_text() == "notes on this run"
    assert (out / BEST).read_bytes() != best
    assert len([ln for ln in (out / "metrics.jsonl").read_text().splitlines() if "dev_accuracy" in ln]) == 1


def test_finetune_from_before_markers_is_recognised(toy, tmp_path, capsys):
    out = tmp_path / "ft"
    assert cli(ft_args(toy, out), capsys)[0] == 0
    (out / MARKER).unlink()  # as written before ownership markers
    (out / "mine.txt").write_text("keep")
    assert "already holds a fine-tuned run" in one_line_error(*cli(ft_args(toy, out), capsys)[::2])
    assert cli(ft_args(toy, out, "--overwrite"), capsys)[0] == 0
    assert (out / "mine.txt").read_text() == "keep" and read_marker(out)["kind"] == "finetune"


def test_second_finetune_is_refused_while_the_first_holds_the_lock(toy, tmp_path, capsys):
    out = tmp_path / "ft"
    out.mkdir()
    lock = FolderLock(out).acquire()  # the first fine-tune, still running
    try:
        line = one_line_error(*cli(ft_args(toy, out), capsys)[::2])
        assert "in use by another slmkit process" in line and f"PID {os.getpid()}" in line
        assert not (out / BEST).exists()
    finally:
        lock.release()
    # A lock whose holder is another live process (here our parent) refuses too.
    (out / LOCK).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": "now"}))
    assert f"PID {os.getppid()}" in one_line_error(*cli(ft_args(toy, out), capsys)[::2])
    (out / LOCK).unlink()
    assert cli(ft_args(toy, out), capsys)[0] == 0


def test_a_stale_lock_from_a_dead_process_is_taken_over(toy, tmp_path, capsys):
    out = tmp_path / "ft"
    out.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (out / LOCK).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "since": "earlier"}))
    code, stdout, _ = cli(ft_args(toy, out), capsys)
    assert code == 0 and "best dev" in stdout
    assert (out / BEST).is_file() and not (out / LOCK).exists()


def test_planted_symlinks_never_redirect_finetune_writes(toy, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "ft"
    assert cli(ft_args(toy, out), capsys)[0] == 0
    # The plot's old predictable temporary name, and the metrics file, both pointing at the victim.
    (out / ".finetune.png.tmp.png").symlink_to(victim)
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(victim)
    (out / "finetune.png").unlink()
    (out / "finetune.png").symlink_to(victim)
    assert cli(ft_args(toy, out, "--overwrite"), capsys)[0] == 0
    assert victim.read_text() == "precious"
    assert not (out / "metrics.jsonl").is_symlink() and not (out / "finetune.png").is_symlink()
    assert (out / "finetune.png").read_bytes()[:4] == b"\x89PNG"
    # A link under one of our names in a folder where slmkit never wrote that file: refused.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "log.txt").symlink_to(victim)
    assert one_line_error(*cli(ft_args(toy, fresh), capsys)[::2])
    assert victim.read_text() == "precious"


def test_full_disk_during_finetune_keeps_the_previous_checkpoint(toy, tmp_path, capsys, monkeypatch):
    import slmkit.checkpoint as ckpt_mod
    import slmkit.finetune.loop as loop

    epochs = iter([0.5, 0.75, 0.9])  # dev improves every epoch: every epoch saves a checkpoint
    monkeypatch.setattr(loop, "score", lambda spec, outs, exs: {m: next(epochs) for m in spec.metrics})
    real_save, calls = ckpt_mod.save_file, []

    def disk_fills(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            Path(args[1]).write_bytes(b"half a checkpoint")
            raise ENOSPC
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_file", disk_fills)
    out = tmp_path / "ft"
    argv = ft_args(toy, out)
    argv[argv.index("--epochs") + 1] = "3"
    line = one_line_error(*cli(argv, capsys)[::2])
    assert "no space left" in line and BEST in line
    assert load_checkpoint(out / BEST).state["epoch"] == 1  # the epoch-1 checkpoint, whole
    assert not (out / LOCK).exists() and no_temp_left(out)


# ----------------------------------------------------------------------------- prediction files


def test_predict_output_never_overwrites_a_file_silently(toy, tmp_path, capsys):
    out = tmp_path / "ft"
    assert cli(ft_args(toy, out), capsys)[0] == 0
    _, files = toy
    pred = tmp_path / "predictions.jsonl"
    pred.write_text("the user's own file")
    predict = ["predict", "--run", out, "--input", files["dev"], "--output", pred, "--device", "cpu"]
    line = one_line_error(*cli(predict, capsys)[::2])
    assert "already exists" in line and "--overwrite" in line and pred.read_text() == "the user's own file"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    pred.unlink()
    pred.symlink_to(victim)
    assert cli([*predict, "--overwrite"], capsys)[0] == 0
    assert victim.read_text() == "precious" and not pred.is_symlink()
    rows = [json.loads(ln) for ln in pred.read_text().splitlines()]
    assert len(rows) == 16 and {r["label"] for r in rows} <= {"0", "1"}
    assert "is a directory" in one_line_error(*cli([*predict[:-2], "--output", tmp_path], capsys)[::2])
