"""Study storages: sweeps on a real PostgreSQL server (tests/pg_helpers.py starts a throwaway one),
the errors a sweep on a database server can meet (a closed port, a host that never answers, a wrong
password, a missing driver), and workers racing for the same stale trial on SQLite and PostgreSQL.
The three-worker kill drill is tests/drills/test_drill_sweep_workers.py.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import cli_fails, tiny_config

optuna = pytest.importorskip("optuna")

from pg_helpers import PASSWORD, start_postgres  # noqa: E402

from slmkit import sweep  # noqa: E402
from slmkit.errors import UserError  # noqa: E402
from slmkit.sweep import runner  # noqa: E402
from slmkit.sweep.report import collect_rows  # noqa: E402
from slmkit.sweep.runner import SPEC_FILE, counted_trials, load_spec, load_study  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--block-size", "8", "--batch-size", "4",
        "--max-iters", "2", "--eval-interval", "1", "--eval-iters", "1", "--sample-tokens", "0",
        "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def postgres():
    with start_postgres() as server:
        yield server


def base(corpus: Path):
    cfg = tiny_config(corpus, max_iters=8, eval_interval=4, sample_tokens=0, log_interval=4)
    cfg.model.n_embd, cfg.model.n_layer = 16, 1
    return cfg


def sweep_argv(corpus: Path, out: Path, storage: str) -> list:
    return ["sweep", "--dataset", corpus, *TINY, "--grid", "n_layer=1,2", "--out", out, "--no-report",
            "--storage", storage]


def cells(trials) -> list:
    return sorted(t.params["n_layer"] for t in trials)


# ----------------------------------------------------------------------------- a database that does not answer


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the fixture returns: connections are refused


@pytest.fixture
def silent_port():
    """A port that accepts connections and never says a word (a server hung, a proxy with nothing behind)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


def assert_nothing_left(out: Path) -> None:
    """No folder that looks like a started sweep: the folder the command made is gone again."""
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_a_closed_port_is_one_line_exit_1_and_nothing_is_left(tiny_corpus, tmp_path, capsys, closed_port):
    out = tmp_path / "sweeps" / "demo"
    url = f"postgresql://slm:{PASSWORD}@127.0.0.1:{closed_port}/optuna"
    line = cli_fails(sweep_argv(tiny_corpus, out, url), capsys,
                     rf"cannot open the study storage postgresql://slm:\*\*\*@127\.0\.0\.1:{closed_port}/optuna: ")
    assert PASSWORD not in line
    assert_nothing_left(out)
    assert (tmp_path / "sweeps").is_dir()  # only the folder the command made itself is removed


def test_the_same_through_the_console_script(tiny_corpus, tmp_path, closed_port):
    import subprocess

    out = tmp_path / "sw"
    url = f"postgresql://slm:{PASSWORD}@127.0.0.1:{closed_port}/optuna"
    r = subprocess.run([sys.executable, "-m", "slmkit", *map(str, sweep_argv(tiny_corpus, out, url))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: cannot open the study storage"), r.stderr
    assert PASSWORD not in r.stderr
    assert_nothing_left(out)


def test_a_host_that_never_answers_times_out_in_one_line(tiny_corpus, tmp_path, capsys, silent_port, monkeypatch):
    monkeypatch.setattr(runner, "CONNECT_TIMEOUT_S", 2)  # the default (10 s), shortened for the test
    out = tmp_path / "sw"
    start = time.monotonic()
    cli_fails(sweep_argv(tiny_corpus, out, f"postgresql://slm:{PASSWORD}@127.0.0.1:{silent_port}/optuna"), capsys,
              "cannot open the study storage .*(timeout|timed out)")
    assert time.monotonic() - start < 30
    assert_nothing_left(out)
    # The URL's own connect_timeout wins over the default.
    assert runner.connect_args("postgresql://h/db?connect_timeout=3") == {}
    assert runner.connect_args("postgresql://h/db") == {"connect_timeout": 2}


def test_a_folder_the_user_made_stays(tiny_corpus, tmp_path, capsys, closed_port):
    out = tmp_path / "sw"
    out.mkdir()
    cli_fails(sweep_argv(tiny_corpus, out, f"postgresql://u@127.0.0.1:{closed_port}/db"), capsys,
              "cannot open the study storage")
    assert out.is_dir() and not (out / SPEC_FILE).exists() and not (out / "trials").exists()


def test_a_wrong_password_is_one_line_without_it(postgres, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "sw"
    line = cli_fails(sweep_argv(tiny_corpus, out, postgres.url(password="not-the-password")), capsys,
                     "cannot open the study storage postgresql://slm:\\*\\*\\*@.*password authentication failed")
    assert "not-the-password" not in line
    assert_nothing_left(out)


def test_a_missing_database_is_one_line(postgres, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "sw"
    cli_fails(sweep_argv(tiny_corpus, out, postgres.url(database="no_such_db")), capsys,
              'cannot open the study storage .*database "no_such_db" does not exist')
    assert_nothing_left(out)


def test_without_a_driver_the_line_says_what_to_install(tiny_corpus, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("psycopg", "psycopg2") else real(name, *a))
    out = tmp_path / "sw"
    cli_fails(sweep_argv(tiny_corpus, out, "postgresql://u:pw@127.0.0.1:1/db"), capsys,
              r"needs a PostgreSQL driver: pip install \"psycopg\[binary\]\"")
    assert_nothing_left(out)


def test_urls_without_a_driver_get_the_installed_one():
    pytest.importorskip("psycopg")
    assert runner.with_driver("postgresql://u:p@h:5432/db?sslmode=require") == \
        "postgresql+psycopg://u:p@h:5432/db?sslmode=require"
    assert runner.with_driver("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    for url in ("postgresql+psycopg2://u@h/db", "sqlite:////tmp/x.db", "mysql+pymysql://u@h/db"):
        assert runner.with_driver(url) == url


# ----------------------------------------------------------------------------- sweeps on the server


def test_a_sweep_on_postgres_runs_resumes_and_reports(postgres, tiny_corpus, tmp_path, capsys):
    from slmkit.cli import main

    out = tmp_path / "pg-basic"
    main([str(a) for a in sweep_argv(tiny_corpus, out, postgres.url())])
    printed = capsys.readouterr().out
    assert "study 'pg-basic' in postgresql://slm:***@127.0.0.1" in printed and PASSWORD not in printed
    assert not (out / "study.db").exists()
    spec = load_spec(out)
    assert spec.storage == postgres.url() and spec.heartbeat == 10
    assert (out / SPEC_FILE).stat().st_mode & 0o077 == 0  # it holds the password
    trials = counted_trials(load_study(spec))
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"] and cells(trials) == [1, 2]
    main(["sweep", "--resume", str(out)])
    assert "all 2 trial(s) are finished; nothing was left to run" in capsys.readouterr().out
    main(["sweep", "report", str(out), "--sample-tokens", "0"])
    _, rows = collect_rows(out)
    assert [r["state"] for r in rows] == ["complete", "complete"]
    report = (out / "report.md").read_text()
    assert PASSWORD not in report
    # The study remembers the sweep, without the password.
    saved = load_study(spec).user_attrs["slmkit_sweep"]
    assert saved["storage"] == f"postgresql://slm:***@127.0.0.1:{postgres.port}/postgres"
    # The same study name again in the same database is refused, and the new folder is not left.
    again = tmp_path / "again" / "pg-basic"
    cli_fails(sweep_argv(tiny_corpus, again, postgres.url()), capsys, "already holds a study named 'pg-basic'")
    assert not again.exists()


def test_a_trial_taken_over_by_another_worker_is_dropped_not_counted_twice(postgres, tiny_corpus, tmp_path,
                                                                          monkeypatch):
    """A worker cut off from the database for longer than the grace period comes back to find its
    trial failed and queued again by another worker: it drops its result and goes on, no traceback."""
    train_module = sys.modules["slmkit.train"]
    d = tmp_path / "taken-over"
    spec = sweep.create(d, base(tiny_corpus), grid=["n_layer=1,2"], storage=postgres.url(), heartbeat=1)
    real, calls = train_module.train, []

    def silent_too_long(cfg, run_dir, **kwargs):
        calls.append(Path(run_dir).name)
        if len(calls) == 1:  # what another worker's fail_stale_trials does to this trial
            other = load_study(spec)
            frozen = next(t for t in other.get_trials() if t.state.name == "RUNNING")
            other._storage.set_trial_state_values(frozen._trial_id, state=optuna.trial.TrialState.FAIL)
            optuna.storages.RetryHeartbeatStaleTrialCallback()(other, other._storage.get_trial(frozen._trial_id))
        return real(cfg, run_dir, **kwargs)

    monkeypatch.setattr(train_module, "train", silent_too_long)
    assert sweep.run(d, show=False, report=False) == 3  # the taken-over one, its retry, the other cell
    study = load_study(spec)
    trials = counted_trials(study)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"] and cells(trials) == [1, 2]
    assert len(study.get_trials()) == 3
    assert study.get_trials()[0].state.name == "FAIL"


def test_the_advisory_lock_lets_one_worker_in_at_a_time(postgres, tiny_corpus, tmp_path):
    spec = sweep.create(tmp_path / "locked", base(tiny_corpus), grid=["n_layer=1,2"], storage=postgres.url())
    other = sweep.create(tmp_path / "other", base(tiny_corpus), grid=["n_layer=1,2"], storage=postgres.url())
    inside, times = threading.Event(), {}

    def first():
        with runner._study_lock(spec, tmp_path / "locked"):
            inside.set()
            time.sleep(0.8)
            times["first_out"] = time.monotonic()

    t = threading.Thread(target=first)
    t.start()
    inside.wait(10)
    start = time.monotonic()
    with runner._study_lock(other, tmp_path / "other"):  # another study: not held up
        assert time.monotonic() - start < 0.5
    with runner._study_lock(spec, tmp_path / "locked"):
        times["second_in"] = time.monotonic()
    t.join()
    assert times["second_in"] >= times["first_out"]


def test_tpe_on_postgres_asks_exactly_n_trials_with_two_workers(postgres, tiny_corpus, tmp_path):
    import os
    import subprocess

    d = tmp_path / "tpe-pg"
    sweep.create(d, base(tiny_corpus), params=["learning_rate=log:1e-3:1e-2"], search="tpe", trials=4,
                 storage=postgres.url())
    code = "import sys; from slmkit.sweep import run; print('RAN', run(sys.argv[1], show=False, report=False))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sum(int(o[0].split("RAN")[-1]) for o in outs) == 4
    assert len(load_study(load_spec(d)).trials) == 4


# ----------------------------------------------------------------------------- --heartbeat


@pytest.mark.parametrize("value", ["0", "-1", "3601"])
def test_heartbeat_out_of_range_is_one_line(value, tiny_corpus, tmp_path, capsys):
    line = cli_fails(["sweep", "--dataset", tiny_corpus, *TINY, "--grid", "n_layer=1,2", "--out", tmp_path / "sw",
                      "--heartbeat", value], capsys)
    assert "heartbeat" in line
    assert not (tmp_path / "sw").exists()


def test_a_spec_from_before_heartbeat_loads_with_the_default(tiny_corpus, tmp_path):
    d = tmp_path / "old"
    spec = sweep.create(d, base(tiny_corpus), grid=["n_layer=1,2"], heartbeat=3)
    assert load_spec(d).heartbeat == 3 and runner.grace_seconds(3) == 17
    saved = json.loads((d / SPEC_FILE).read_text())
    del saved["heartbeat"]
    (d / SPEC_FILE).write_text(json.dumps(saved))
    assert load_spec(d).heartbeat == runner.HEARTBEAT_S == 10 and runner.grace_seconds(10) == 45
    storage = load_study(load_spec(d))._storage
    assert storage.get_heartbeat_interval() == 10
    with pytest.raises(UserError, match="heartbeat must be an integer from 1"):
        sweep.create(tmp_path / "bad", base(tiny_corpus), grid=["n_layer=1,2"], heartbeat=0)
    assert spec.n_trials == 2


def test_a_running_trial_sends_heartbeats_at_the_sweeps_interval(tiny_corpus, tmp_path):
    spec = sweep.create(tmp_path / "hb", base(tiny_corpus), grid=["n_layer=1,2"], heartbeat=1)
    study = load_study(spec)
    trial = runner.next_trial(study, spec, tmp_path / "hb")
    storage, beats = runner._storage_of(study), []
    real = storage.record_heartbeat
    storage.record_heartbeat = lambda trial_id: (beats.append(time.monotonic()), real(trial_id))
    with runner.Heartbeat(study, trial._trial_id):
        time.sleep(2.5)
    assert len(beats) >= 3 and max(b - a for a, b in zip(beats, beats[1:], strict=False)) < 2


# ----------------------------------------------------------------------------- workers racing for stale trials

RACER = """
import sys, time
from pathlib import Path
from slmkit.sweep.runner import load_spec, load_study, next_trial
d = Path(sys.argv[1])
spec = load_spec(d)
study = load_study(spec)
while time.time() < float(sys.argv[2]):
    pass
trial = next_trial(study, spec, d)
print("GOT", trial.number if trial is not None else None)
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_workers_racing_for_a_dead_workers_trials_queue_each_once(backend, request, tiny_corpus, tmp_path):
    """Three workers look for work at the same moment while two trials of a dead worker are stale:
    each stale trial is failed and queued again once, and each retry goes to one worker. (On SQLite,
    Optuna's fail_stale_trials run side by side queued a trial up to once per worker.)"""
    import os
    import subprocess

    storage = {} if backend == "sqlite" else {"storage": request.getfixturevalue("postgres").url()}
    d = tmp_path / f"race-{backend}"
    spec = sweep.create(d, base(tiny_corpus), grid=["n_layer=1,2"], heartbeat=1, **storage)
    study = load_study(spec)
    dead = [runner.next_trial(study, spec, d) for _ in range(2)]  # a worker takes both cells and dies
    assert runner.next_trial(study, spec, d) is None
    import sqlalchemy

    engine = sqlalchemy.create_engine(runner.with_driver(spec.storage), poolclass=sqlalchemy.pool.NullPool)
    with engine.begin() as conn:  # its last heartbeats: long ago
        conn.execute(sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = :t"), {"t": "2000-01-01 00:00:00"})
    start_at = time.time() + 7  # every racer imported and connected by then
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(d), str(start_at)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    got = [o[0].split("GOT")[-1].strip() for o in outs]
    taken = sorted(int(g) for g in got if g != "None")
    trials = load_study(spec).get_trials()
    assert len(trials) == 4, [(t.number, t.state.name, t.system_attrs.get("failed_trial")) for t in trials]
    assert [t.state.name for t in trials[:2]] == ["FAIL", "FAIL"]
    assert sorted(t.system_attrs["failed_trial"] for t in trials[2:]) == [d.number for d in dead]
    assert taken == [2, 3]  # each retry taken by exactly one worker
