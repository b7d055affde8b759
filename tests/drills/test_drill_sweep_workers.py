"""Drill: three `slm sweep` workers share one study, and one of them is killed (SIGKILL) mid-trial.

On PostgreSQL (a real server, started for the test) the workers stand for three machines: each has
its own sweep folder holding a copy of sweep.json, as a machine that cannot see the others' disks
has. On SQLite they share one folder, as SQLite's workers must (one machine). Either way the killed
worker's trial stops sending heartbeats, another worker marks it failed after the grace period and
queues its parameters again, and the sweep ends with every grid cell complete exactly once, which
`slm sweep report` lists.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from pg_helpers import start_postgres, wait_for  # noqa: E402

from slmkit.sweep.report import collect_rows  # noqa: E402
from slmkit.sweep.runner import SPEC_FILE, counted_trials, grace_seconds, load_spec, load_study  # noqa: E402

pytestmark = pytest.mark.slow

HEARTBEAT = 1  # seconds: the killed trial is failed after grace_seconds(1) = 9 s of silence
GRID = {"n_layer": (1, 2, 3), "learning_rate": (1e-3, 3e-3)}
CELLS = sorted((n, lr) for n in GRID["n_layer"] for lr in GRID["learning_rate"])
# A trial trains for one to a few seconds on a busy 2-core machine: long enough to be killed in.
TINY = ["--n-head", "1", "--n-embd", "16", "--block-size", "16", "--batch-size", "8", "--max-iters", "150",
        "--eval-interval", "50", "--eval-iters", "2", "--sample-tokens", "0", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def postgres():
    with start_postgres() as server:
        yield server


def slm(*args) -> list[str]:
    return [sys.executable, "-m", "slmkit", *[str(a) for a in args]]


def start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def running_trial_of(study, pid: int, folder: Path):
    """A trial the worker with this pid is training (its run directory has metrics), or None."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        runs = t.user_attrs.get("run_dirs") or []
        if str(t.user_attrs.get("worker", "")).endswith(f":{pid}") and runs \
                and (folder / runs[0] / "metrics.jsonl").is_file():
            return t
    return None


def drill(tmp: Path, corpus: Path, storage: list[str], folders: list[Path]) -> dict:
    """Worker 0 creates the sweep in folders[0] and runs it; workers 1 and 2 join with --resume from
    their folders (given a copy of sweep.json where the folder is another one); worker 2 is killed
    in the middle of a trial. Returns what the test checks."""
    t0 = time.monotonic()
    logs = [tmp / f"worker{i}.log" for i in range(3)]
    first = start(slm("sweep", "--dataset", corpus, *TINY, *[a for k, v in GRID.items()
                                                             for a in ("--grid", f"{k}={','.join(map(str, v))}")],
                      *storage, "--heartbeat", HEARTBEAT, "--out-dir", folders[0], "--no-report"), logs[0])
    workers = [first]
    try:
        wait_for(lambda: (folders[0] / SPEC_FILE).is_file() or first.poll() is not None, 60, "the sweep's creation")
        assert first.poll() is None, logs[0].read_text()
        for i in (1, 2):
            if folders[i] != folders[0]:  # another "machine": the spec is copied over
                folders[i].mkdir()
                shutil.copy(folders[0] / SPEC_FILE, folders[i] / SPEC_FILE)
            workers.append(start(slm("sweep", "--resume", folders[i], "--no-report"), logs[i]))
        study = load_study(load_spec(folders[0]))
        victim = workers[2]
        killed = wait_for(lambda: running_trial_of(study, victim.pid, folders[2]) or victim.poll() is not None, 90,
                          "the third worker to be in the middle of a trial")
        assert victim.poll() is None, f"the victim ended before it could be killed:\n{logs[2].read_text()}"
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert victim.wait(timeout=30) == -signal.SIGKILL
        for i in (0, 1):
            assert workers[i].wait(timeout=120) == 0, logs[i].read_text()[-3000:]
        settled = time.monotonic()
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    return {"killed": killed.number, "elapsed": settled - t0, "after_kill": settled - killed_at,
            "logs": [p.read_text() for p in logs]}


def check(sweep_dir: Path, killed: int) -> None:
    """Every cell complete exactly once, the killed trial failed and retried, the report lists all."""
    spec = load_spec(sweep_dir)
    study = load_study(spec)
    trials = study.get_trials()
    assert len(trials) == len(CELLS) + 1  # the six cells and one retry, nothing more
    dead = trials[killed]
    assert dead.state.name == "FAIL"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params == dead.params  # its parameters were retried
    counted = counted_trials(study)
    assert [t.state.name for t in counted] == ["COMPLETE"] * len(CELLS)
    assert sorted((t.params["n_layer"], t.params["learning_rate"]) for t in counted) == CELLS

    report = subprocess.run(slm("sweep", "report", sweep_dir, "--sample-tokens", "0"), capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    with open(sweep_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["n_layer"]), float(r["learning_rate"])) for r in rows) == CELLS
    assert all(r["state"] == "complete" and r["best_val_loss"] for r in rows), rows
    assert killed not in {int(r["trial"]) for r in rows}
    assert (sweep_dir / "report.md").read_text().count("| complete |") == len(CELLS)


def test_three_workers_on_postgres_one_killed(postgres, tmp_path, tiny_corpus):
    machines = [tmp_path / f"machine{i}" / "sweeps" / "demo" for i in range(3)]
    machines[0].parent.mkdir(parents=True)
    for m in machines[1:]:
        m.parent.mkdir(parents=True)
    url = postgres.url()
    out = drill(tmp_path, tiny_corpus, ["--storage", url], machines)
    for log in out["logs"]:
        assert postgres.url() not in log and "pg-s3cret" not in log  # the password is never printed
    assert not (machines[0] / "study.db").exists()
    # Before the other machines' trial folders are gathered, their trials are listed without numbers.
    _, rows = collect_rows(machines[0])
    assert len(rows) == len(CELLS) and all(r["state"] == "complete" for r in rows)
    assert all(("best_val_loss" in r) == (machines[0] / r["run_dir"]).is_dir() for r in rows), rows
    # The report is written on one machine, with the other machines' trial folders copied in
    # (the README's "rsync -a B:sweeps/big/trials/ sweeps/big/trials/").
    for m in machines[1:]:
        if (m / "trials").is_dir():
            shutil.copytree(m / "trials", machines[0] / "trials", dirs_exist_ok=True)
    check(machines[0], out["killed"])
    print(f"postgres drill: {out['elapsed']:.1f} s, {out['after_kill']:.1f} s after the kill "
          f"(grace {grace_seconds(HEARTBEAT)} s)")


def test_three_workers_on_sqlite_one_killed(tmp_path, tiny_corpus):
    d = tmp_path / "sweeps" / "demo"
    out = drill(tmp_path, tiny_corpus, [], [d, d, d])
    assert (d / "study.db").is_file()
    check(d, out["killed"])
    print(f"sqlite drill: {out['elapsed']:.1f} s, {out['after_kill']:.1f} s after the kill "
          f"(grace {grace_seconds(HEARTBEAT)} s)")
