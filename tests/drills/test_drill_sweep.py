"""Drills on `slm sweep` and `slm sweep report` with bad input: storage URLs holding passwords,
read-only output folders, damaged sweep folders, absurd flags. Each refusal is one `error:` line,
never a traceback, and never shows a password.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from conftest import cli_fails  # noqa: E402

from slmkit.cli import main  # noqa: E402
from slmkit.errors import UserError  # noqa: E402
from slmkit.sweep.runner import SPEC_FILE, TRIALS_DIR, load_spec, load_study, redact_text, redact_url  # noqa: E402

SECRET = "s3cret"
PG_URL = f"postgresql://u:{SECRET}@127.0.0.1:1/db"
TINY = ["--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--block-size", "8", "--batch-size", "4",
        "--max-iters", "2", "--eval-interval", "1", "--eval-iters", "1", "--sample-tokens", "0",
        "--device", "cpu", "--dtype", "float32"]


fails = cli_fails



def sweep_args(corpus: Path, out: Path, *extra) -> list:
    return ["sweep", "--dataset", corpus, *TINY, "--grid", "n_layer=1,2", "--out", out, "--no-report", *extra]


@pytest.fixture
def created(tmp_path, tiny_corpus) -> Path:
    """A sweep folder with its study and one failed trial, made without training anything."""
    from conftest import tiny_config

    from slmkit import sweep

    cfg = tiny_config(tiny_corpus, max_iters=2, eval_interval=1, sample_tokens=0)
    d = tmp_path / "sw"
    spec = sweep.create(d, cfg, grid=["n_layer=1,2"], log=lambda _: None)
    study = load_study(spec)
    trial = study.ask()
    trial.set_user_attr("error", f"OperationalError: could not connect to {PG_URL}")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return d


# ----------------------------------------------------------------------------- passwords


@pytest.mark.parametrize("url, shown", [
    (PG_URL, "postgresql://u:***@127.0.0.1:1/db"),
    ("postgresql+psycopg2://user:p@ss:w0rd@db.example:5432/optuna?sslmode=require",
     "postgresql+psycopg2://user:***@db.example:5432/optuna?sslmode=require"),
    ("mysql://root:p%40ss@localhost/optuna", "mysql://root:***@localhost/optuna"),
    ("postgresql://host/db?user=u&password=hunter2", "postgresql://host/db?user=u&password=***"),
    ("postgresql://u@host/db", "postgresql://u@host/db"),
    ("sqlite:////tmp/sweep/study.db", "sqlite:////tmp/sweep/study.db"),
])
def test_redact_url_hides_only_the_password(url, shown):
    assert redact_url(url) == shown
    assert redact_url(shown) == shown  # idempotent: safe to apply twice


def test_redact_text_hides_a_password_a_driver_echoes_on_its_own():
    url = "postgresql://u:p%40ss@h/db"
    text = redact_text(f"cannot connect to {url}: password 'p@ss' rejected; also p%40ss", url)
    assert "p@ss" not in text and "p%40ss" not in text and "postgresql://u:***@h/db" in text


def test_an_unreachable_postgres_storage_is_one_line_without_the_password(tiny_corpus, tmp_path, capsys):
    line = fails(sweep_args(tiny_corpus, tmp_path / "sw", "--storage", PG_URL), capsys,
                 r"cannot open the study storage postgresql://u:\*\*\*@127\.0\.0\.1:1/db")
    assert SECRET not in line
    assert not (tmp_path / "sw" / SPEC_FILE).exists() and not (tmp_path / "sw" / TRIALS_DIR).exists()


def test_a_storage_url_that_cannot_be_parsed_is_one_line_without_the_password(tiny_corpus, tmp_path, capsys):
    line = fails(sweep_args(tiny_corpus, tmp_path / "sw", "--storage", f"postgresql://u:{SECRET}@host:notaport/db"),
                 capsys, "cannot open the study storage")
    assert SECRET not in line


def test_report_and_results_never_show_a_password_from_a_trial_error(created, capsys):
    main(["sweep", "report", str(created), "--sample-tokens", "0"])
    capsys.readouterr()
    report = (created / "report.md").read_text()
    results = (created / "results.csv").read_text()
    assert "failed" in report and "postgresql://u:***@127.0.0.1:1/db" in report
    assert SECRET not in report and SECRET not in results


def test_a_spec_holding_a_password_is_readable_by_its_owner_only(created):
    from slmkit.sweep.runner import write_spec

    spec = load_spec(created)
    spec.storage = PG_URL  # --resume needs the real URL, so sweep.json keeps it, privately
    write_spec(spec, created)
    assert (created / SPEC_FILE).stat().st_mode & 0o777 == 0o600
    assert load_spec(created).storage == PG_URL


# ----------------------------------------------------------------------------- read-only --out


def _ro_tmpfs_works(tmp_path: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = f"mount -t tmpfs -o ro tmpfs {probe} && ! touch {probe}/x 2>/dev/null"
    ok = subprocess.run(["unshare", "-r", "-m", "sh", "-c", cmd], capture_output=True).returncode == 0
    probe.rmdir()
    return ok


def test_out_on_a_read_only_filesystem_is_one_line(tiny_corpus, tmp_path):
    """The real thing: a read-only tmpfs in a private mount namespace (as root, chmod does not stop writes)."""
    if not _ro_tmpfs_works(tmp_path):
        pytest.skip("cannot mount a read-only tmpfs here (needs unshare -r -m: user and mount namespaces)")
    ro = tmp_path / "ro"
    ro.mkdir()
    argv = " ".join(f"'{a}'" for a in map(str, sweep_args(tiny_corpus, ro / "sw")))
    cmd = f"mount -t tmpfs -o ro tmpfs {ro} && exec '{sys.executable}' -m slmkit {argv}"
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Read-only file system" in lines[0], proc.stderr


def test_report_into_a_read_only_sweep_folder_is_one_line(created, tmp_path):
    if not _ro_tmpfs_works(tmp_path):
        pytest.skip("cannot make a read-only mount here (needs unshare -r -m: user and mount namespaces)")
    cmd = (f"mount --bind {created} {created} && mount -o remount,ro,bind {created} && "
           f"exec '{sys.executable}' -m slmkit sweep report '{created}' --sample-tokens 0")
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Read-only file system" in lines[0], proc.stderr
    assert not (created / "report.md").exists()


@pytest.mark.parametrize("failure", ["mkdir", "write"])
def test_an_unwritable_out_is_one_line(failure, tiny_corpus, tmp_path, capsys, monkeypatch):
    """Runs everywhere: the OS refusal is simulated where slmkit meets it (creating or writing into --out)."""
    import errno
    import pathlib
    import tempfile

    out = tmp_path / "sw"
    if failure == "mkdir":
        real = pathlib.Path.mkdir

        def mkdir(self, *a, **kw):
            if self == out:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real(self, *a, **kw)

        monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    else:
        def mkstemp(*a, **kw):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    line = fails(sweep_args(tiny_corpus, out), capsys, "Read-only file system|Permission denied")
    assert str(out) in line
    assert not (out / SPEC_FILE).exists()


# ----------------------------------------------------------------------------- damaged or foreign folders


def test_out_holding_the_users_files_is_refused_and_left_alone(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    fails(sweep_args(tiny_corpus, out), capsys, "not empty and was not written by slmkit")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_out_that_is_a_file_is_one_line(tiny_corpus, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    fails(sweep_args(tiny_corpus, tmp_path / "f"), capsys, "not a directory")


def test_missing_sweep_folder_is_one_line(tmp_path, capsys):
    fails(["sweep", "report", tmp_path / "nope"], capsys, "not a sweep directory")
    fails(["sweep", "--resume", tmp_path / "nope"], capsys, "not a sweep directory")


def _spec(d: Path) -> dict:
    return json.loads((d / SPEC_FILE).read_text())


CORRUPTIONS = [
    ("truncated", lambda s: json.dumps(s)[:40], "not valid JSON"),
    ("not utf-8", lambda s: b"\xff\xfe" + json.dumps(s).encode(), "not UTF-8"),
    ("a list", lambda s: "[1, 2]", "expected a JSON object"),
    ("deeply nested", lambda s: "[" * 100_000, "nested too deeply"),
    ("no params", lambda s: {k: v for k, v in s.items() if k != "params"}, "missing field 'params'"),
    ("extra field", lambda s: {**s, "colour": 1}, "unknown field 'colour'"),
    ("mode", lambda s: {**s, "mode": "genetic"}, "mode must be one of"),
    ("n_trials", lambda s: {**s, "n_trials": "four"}, "n_trials must be an integer"),
    ("seeds", lambda s: {**s, "seeds": 0}, "seeds must be an integer"),
    ("trial_seconds", lambda s: {**s, "trial_seconds": -5}, "trial_seconds must be a positive number"),
    ("storage", lambda s: {**s, "storage": 5}, "storage must be a non-empty string"),
    ("base", lambda s: {**s, "base": [1]}, "saved configuration must be a mapping"),
    ("base value", lambda s: {**s, "base": {"model": {"n_layer": "many"}}}, "n_layer: expected int"),
    ("params item", lambda s: {**s, "params": [3]}, "a parameter must be a JSON object"),
    ("params kind", lambda s: {**s, "params": [{**s["params"][0], "kind": "int"}]}, "needs numbers low < high"),
    ("params name", lambda s: {**s, "params": [{**s["params"][0], "name": "n_layers"}]}, "unknown hyperparameter"),
    ("params values", lambda s: {**s, "params": [{**s["params"][0], "values": [[1]]}]}, "values must be"),
]


@pytest.mark.parametrize("name, corrupt, match", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_a_corrupted_sweep_spec_is_one_line(name, corrupt, match, created, capsys):
    bad = corrupt(_spec(created))
    path = created / SPEC_FILE
    if isinstance(bad, bytes):
        path.write_bytes(bad)
    else:
        path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    for argv in (["sweep", "report", created, "--sample-tokens", "0"], ["sweep", "--resume", created]):
        line = fails(argv, capsys, match)
        assert SPEC_FILE in line


def test_a_deleted_study_database_is_one_line(created, capsys):
    (created / "study.db").unlink()
    fails(["sweep", "report", created], capsys, "holds no study named")
    with pytest.raises(UserError, match="holds no study named"):
        load_spec(created) and load_study(load_spec(created))


def test_a_study_database_that_is_not_a_database_is_one_line(created, capsys):
    (created / "study.db").write_bytes(b"this is not sqlite" * 100)
    fails(["sweep", "report", created], capsys, "study storage")


# ----------------------------------------------------------------------------- absurd flags


@pytest.mark.parametrize("extra, match", [
    (["--trial-seconds", "nan"], "--trial-seconds must be a positive number"),
    (["--trial-seconds", "inf"], "--trial-seconds must be a positive number"),
    (["--trial-seconds", "0"], "--trial-seconds must be a positive number"),
    (["--seeds", "0"], "--seeds must be an integer from 1"),
    (["--seeds", "100000"], "--seeds must be an integer from 1"),
    (["--sampler-seed", "-1"], "--sampler-seed must be an integer from 0"),
    (["--sampler-seed", str(2**40)], "--sampler-seed must be an integer from 0"),
    (["--grid", "learning_rate=nan,1e-3"], "learning_rate: expected a finite number"),
    (["--grid", "n_embd=" + ",".join(str(8 * i) for i in range(1, 400)),
      "--grid", "block_size=" + ",".join(str(i) for i in range(8, 408))], "the grid has 319,200 cells"),
])
def test_absurd_sweep_flags_are_one_line(extra, match, tiny_corpus, tmp_path, capsys):
    fails(sweep_args(tiny_corpus, tmp_path / "sw", *extra), capsys, match)
    assert not (tmp_path / "sw").exists()


def test_absurd_search_sizes_are_one_line(tiny_corpus, tmp_path, capsys):
    argv = ["sweep", "--dataset", tiny_corpus, *TINY, "--param", "learning_rate=log:1e-4:1e-2", "--out", tmp_path / "s"]
    fails([*argv, "--random", str(10**9)], capsys, "--trials must be an integer from 1 to 100,000")
    fails([*argv, "--param", "dropout=0:nan", "--random", "2"], capsys, "dropout: expected a finite number")


def test_report_refuses_a_negative_sample_length(created, capsys):
    fails(["sweep", "report", created, "--sample-tokens", "-5"], capsys, "--sample-tokens must be an integer")
