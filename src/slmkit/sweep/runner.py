"""Sweeps on Optuna: a study in a (SQLite by default) storage, workers that take trials from it,
and one ordinary run directory per trial (and per seed).

How trials are handed out, so that parallel workers never run a trial twice:

* grid and random: every configuration is put in Optuna's trial queue (`enqueue_trial`) when the
  sweep is created; a worker takes a queued trial by moving it WAITING -> RUNNING, which the
  storage does atomically (the same step as `Study.ask`). When the queue is empty the sweep is done.
* tpe: a worker asks TPE for a new trial while fewer than N trials exist, under a lock: a file lock
  when the storage is a local SQLite file, a PostgreSQL advisory lock when it is PostgreSQL (other
  databases have none, and workers on several machines may then ask for a trial or two more than N).
* A worker that dies stops sending heartbeats (every `heartbeat` seconds, 10 by default); after
  grace_seconds() of silence any other worker marks its trial failed and queues the same parameters
  again (Optuna's RetryHeartbeatStaleTrialCallback). Ctrl-C does the same at once. A worker that was
  only silent (a network outage longer than the grace period) and then finishes its trial finds it
  taken over: its result is dropped, since the retry stands for that configuration.

Storages: SQLite (the default, `study.db` in the sweep folder) serves the workers of one machine:
they share the file through file locks, which network filesystems do not reliably provide.
PostgreSQL (`--storage postgresql://user:password@host/db`) serves workers on any number of machines.

Equal compute (`--trial-seconds S`): before a trial, a few real optimizer steps and one evaluation
are timed, and max_iters is set to the steps that fit in S seconds, so that every trial runs its
whole warmup + cosine schedule within the same wall time. The schedule is scaled to those steps:
warmup takes at most a tenth of them, and the trial evaluates about 8 times (its curve is a curve,
whatever the preset's eval_interval was sized for). If the machine gets busier, a guard stops a
trial at the first evaluation after S seconds unless its schedule ends within 1.25 x S.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from slmkit.config import MAX_STEPS, RunConfig, show
from slmkit.errors import UserError
from slmkit.sweep.space import Param, apply_params, check_cell

SPEC_FILE, DB_FILE, LOCK_FILE, TRIALS_DIR = "sweep.json", "study.db", ".study.lock", "trials"
HEARTBEAT_S, MAX_HEARTBEAT_S = 10, 3600  # the default interval between a worker's heartbeats, and the most
# Seconds for which a database connection may not answer before a sweep command gives up (a PostgreSQL
# URL's own ?connect_timeout=N wins).
CONNECT_TIMEOUT_S = 10
MODES = ("grid", "random", "tpe")
# Limits that stop a typo, not a real sweep: trials (grid cells are expanded in memory), seeds per
# trial, the seconds of one trial (about 4 months), and the sampler seed (numpy's RandomState needs < 2**32).
MAX_TRIALS, MAX_SEEDS, MAX_TRIAL_SECONDS, SAMPLER_SEED_LIMIT = 100_000, 1000, 1e7, 2**32


@dataclass
class SweepSpec:
    mode: str
    params: list[Param]
    n_trials: int
    base: dict[str, Any]
    storage: str
    study_name: str
    trial_seconds: float | None = None
    seeds: int = 1
    prune: bool = False
    sampler_seed: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)  # invalid grid cells, with reasons
    heartbeat: int = HEARTBEAT_S  # seconds between a worker's heartbeats (sweep.json before it: 10)
    # None: trials are ranked by validation loss (lower is better). Otherwise sweep/objective.py's
    # fine-tune objective: each trial is fine-tuned on a task and ranked by its dev score (higher is better).
    finetune: dict[str, Any] | None = None
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = [p.to_dict() for p in self.params]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepSpec:
        """A spec read back from sweep.json; anything malformed is a one-line UserError."""
        if not isinstance(d, dict):
            raise UserError(f"expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        extra = sorted(str(k) for k in d if k not in known)
        missing = sorted(f.name for f in fields(cls) if f.name not in d and f.name in _REQUIRED)
        if extra or missing:
            raise UserError(f"unknown field {extra[0]!r}" if extra else f"missing field {missing[0]!r}")
        params = d["params"]
        if not isinstance(params, list) or not params:
            raise UserError(f"params must be a non-empty list, got {show(params)}")
        spec = cls(**{**d, "params": [Param.from_dict(p) for p in params]})
        spec.check()
        return spec

    def check(self) -> None:
        """Field types and ranges (the base config is checked as any config is)."""
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {show(self.mode)}")
        check_count("n_trials", self.n_trials, 0, MAX_TRIALS)
        check_count("seeds", self.seeds, 1, MAX_SEEDS)
        check_count("sampler_seed", self.sampler_seed, 0, SAMPLER_SEED_LIMIT - 1)
        check_count("heartbeat", self.heartbeat, 1, MAX_HEARTBEAT_S)
        check_trial_seconds(self.trial_seconds)
        for name in ("storage", "study_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UserError(f"{name} must be a non-empty string, got {show(getattr(self, name))}")
        if not isinstance(self.prune, bool) or not isinstance(self.skipped, list):
            raise UserError("prune must be true or false and skipped a list")
        if self.finetune is not None:
            from slmkit.sweep.objective import check_objective

            check_objective(self.finetune)
            if self.prune:
                raise UserError("pruning compares validation losses; the fine-tune objective is known only "
                                "when a trial ends: drop --prune")
        self.base_config().validate()

    @property
    def direction(self) -> str:
        return "maximize" if self.finetune else "minimize"

    def base_config(self) -> RunConfig:
        return RunConfig.from_dict(self.base)


_REQUIRED = ("mode", "params", "n_trials", "base", "storage", "study_name")


def check_count(name: str, value: Any, low: int, high: int, flag: str | None = None) -> None:
    """An integer setting within [low, high], or a one-line error naming it."""
    label = flag or name
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{label} must be an integer from {low:,} to {high:,}, got {show(value)}")


def check_trial_seconds(seconds: Any, flag: str = "trial_seconds") -> None:
    if seconds is None:
        return
    ok = isinstance(seconds, int | float) and not isinstance(seconds, bool) and math.isfinite(seconds)
    if not ok or not 0 < seconds <= MAX_TRIAL_SECONDS:
        raise UserError(f"{flag} must be a positive number of seconds up to {MAX_TRIAL_SECONDS:g}, got {show(seconds)}")


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*Heartbeat of storage is supposed to be used.*")


def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{(sweep_dir / DB_FILE).resolve()}"


# ----------------------------------------------------------------------------- storage URLs shown to people

# scheme://user:password@host/...: the userinfo ends at the last '@' (a raw '@' in a password must
# not leave half of it visible), which at worst also hides a host, never shows a secret.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]*")
_SECRET_PARAM = re.compile(r"(?i)([?&;](?:password|passwd|pwd|secret|token|sslpassword)=)[^&;\s'\"]*")


def _url_password(url: str) -> str | None:
    _, sep, rest = url.partition("://")
    userinfo = rest[: rest.rfind("@")] if sep and "@" in rest else ""
    return userinfo.split(":", 1)[1] if ":" in userinfo else None


def redact_url(url: str) -> str:
    """`url` fit to print: its password replaced by *** (postgresql://user:***@host/db), as are
    password=... query parameters."""
    scheme, sep, rest = url.partition("://")
    if _url_password(url) is not None:
        at = rest.rfind("@")
        rest = f"{rest[:at].split(':', 1)[0]}:***@{rest[at + 1:]}"
    return _SECRET_PARAM.sub(r"\1***", scheme + sep + rest)


def redact_text(text: str, url: str | None = None) -> str:
    """`text` (an error message, a report) with the credentials of `url`, and of any other URL in
    it, replaced by ***. A driver may echo the password on its own, so that is masked too."""
    if url:
        text = text.replace(url, redact_url(url))
        password = _url_password(url)
        for secret in {password, unquote(password)} if password else ():
            text = text.replace(secret, "***")
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def has_credentials(url: str) -> bool:
    return redact_url(url) != url


@contextlib.contextmanager
def storage_errors(url: str):
    """A failure of the study's database while a sweep runs (connection lost, disk full, locked)
    as one line, with the URL's password hidden."""
    try:
        yield
    except Exception as exc:
        import optuna
        from sqlalchemy.exc import SQLAlchemyError

        if not isinstance(exc, SQLAlchemyError | optuna.exceptions.StorageInternalError):
            raise
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise UserError(redact_text(f"the study storage {url} failed: {first}", url)) from None


def grace_seconds(heartbeat: int) -> int:
    """Seconds without a heartbeat after which a running trial counts as dead (10 s -> 45 s): a few
    missed heartbeats, and a margin for a busy database or a slow network."""
    return 4 * heartbeat + 5


def is_postgres(url: str) -> bool:
    return url.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def with_driver(url: str) -> str:
    """The URL SQLAlchemy is given. A PostgreSQL URL that names no driver (`postgresql://...`) gets
    the one installed: SQLAlchemy's default is psycopg2 before 2.1 and psycopg (3) since, and
    `pip install slmkit[sweep]` installs psycopg. `postgres://` (as some hosts print it) is accepted too."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    import importlib.util

    from sqlalchemy.dialects import registry

    for driver in ("psycopg", "psycopg2"):
        if importlib.util.find_spec(driver) is None:
            continue
        with contextlib.suppress(Exception):  # a SQLAlchemy too old for this driver
            registry.load(f"postgresql.{driver}")
            return f"postgresql+{driver}://{rest}"
    raise UserError("a postgresql:// study storage needs a PostgreSQL driver: pip install \"psycopg[binary]\" "
                    "(it comes with slmkit[sweep])")


def connect_args(url: str) -> dict[str, Any]:
    """What the database driver is given besides the URL."""
    if url.startswith("sqlite:"):
        # Parallel workers wait for each other's writes instead of failing with "database is locked".
        return {"timeout": 60}
    if is_postgres(url) and "connect_timeout=" not in url:
        # A host that does not answer at all (a firewall dropping packets) is an error after this
        # long, not a hang of minutes.
        return {"connect_timeout": CONNECT_TIMEOUT_S}
    return {}


def open_storage(url: str, heartbeat: int = HEARTBEAT_S):
    """An Optuna RDB storage with heartbeats every `heartbeat` seconds; any failure (driver missing,
    server down or not answering, bad URL, unwritable file) is a one-line UserError."""
    import optuna

    _quiet_optuna()
    if not isinstance(url, str) or not url:
        raise UserError(f"the study storage must be a URL, got {show(url)}")
    try:
        return optuna.storages.RDBStorage(
            with_driver(url), heartbeat_interval=heartbeat, grace_period=grace_seconds(heartbeat),
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
            engine_kwargs={"connect_args": connect_args(url)},
        )
    except UserError:
        raise
    except Exception as exc:  # driver missing, host unreachable, bad URL, unwritable file...
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise UserError(redact_text(f"cannot open the study storage {url}: {first}", url)) from None


def _sampler(spec: SweepSpec, worker_seed: int | None):
    import optuna

    if spec.mode == "tpe":
        return optuna.samplers.TPESampler(seed=worker_seed)
    if spec.mode == "grid" and spec.n_trials > 1:
        # Parameters come from the trial queue; the GridSampler describes the grid to Optuna tools
        # and leaves queued (fixed) parameters alone.
        return optuna.samplers.GridSampler({p.name: p.values for p in spec.params}, seed=spec.sampler_seed)
    return optuna.samplers.RandomSampler(seed=worker_seed)


def _pruner(spec: SweepSpec):
    import optuna

    if not spec.prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, spec.n_trials // 4)), n_warmup_steps=1)


def random_cells(spec: SweepSpec, base: RunConfig) -> list[dict[str, Any]]:
    """N configurations drawn by Optuna's RandomSampler up front (invalid draws are redrawn)."""
    import optuna

    _quiet_optuna()
    draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.sampler_seed))
    cells: list[dict[str, Any]] = []
    for _ in range(100 * spec.n_trials):
        t = draw.ask()
        values = {p.name: p.suggest(t) for p in spec.params}
        draw.tell(t, 0.0)
        if check_cell(base, spec.params, values) is None:
            cells.append(values)
            if len(cells) == spec.n_trials:
                return cells
    raise UserError("almost every random draw gives an invalid configuration (for example n_embd not divisible "
                    "by n_head); narrow the ranges")


def create_sweep(spec: SweepSpec, sweep_dir: Path, cells: list[dict[str, Any]] | None) -> None:
    """Write sweep.json, create the study and queue the cells (grid / random)."""
    import optuna

    storage = open_storage(spec.storage, spec.heartbeat)
    try:
        study = optuna.create_study(storage=storage, study_name=spec.study_name, direction=spec.direction,
                                    sampler=_sampler(spec, spec.sampler_seed), pruner=_pruner(spec))
    except optuna.exceptions.DuplicatedStudyError:
        raise UserError(f"the storage already holds a study named {spec.study_name!r}; "
                        "continue it with --resume, or pick --study-name") from None
    try:
        # The copy kept in the study never holds the storage's password (the study is in that storage).
        study.set_user_attr("slmkit_sweep", {**spec.to_dict(), "storage": redact_url(spec.storage)})
        for cell in cells or []:
            study.enqueue_trial(cell)
        try:
            (sweep_dir / TRIALS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create {sweep_dir / TRIALS_DIR}: {exc.strerror or exc}") from None
        write_spec(spec, sweep_dir)
    except BaseException:
        # No half-made sweep: a study without its sweep.json would block the same --study-name.
        with contextlib.suppress(Exception):
            optuna.delete_study(study_name=spec.study_name, storage=storage)
        raise


def write_spec(spec: SweepSpec, sweep_dir: Path) -> None:
    """sweep.json; readable by its owner only when the storage URL holds a password (--resume needs it)."""
    from slmkit.fileio import atomic_write

    text = json.dumps(spec.to_dict(), indent=2)
    private = has_credentials(spec.storage)

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")
        if private:
            os.chmod(tmp, 0o600)

    atomic_write(sweep_dir / SPEC_FILE, write)
    if private:
        os.chmod(sweep_dir / SPEC_FILE, 0o600)  # atomic_write gives new files the umask's mode


def load_spec(sweep_dir: Path) -> SweepSpec:
    from slmkit.fileio import read_json

    p = Path(sweep_dir) / SPEC_FILE
    if not p.is_file():
        raise UserError(f"{sweep_dir} is not a sweep directory (no {SPEC_FILE})")
    try:
        data = read_json(p, "sweep spec")
    except RecursionError:  # json.loads on thousands of nested brackets
        raise UserError(f"{p} is corrupted: nested too deeply") from None
    try:
        return SweepSpec.from_dict(data)
    except UserError as exc:
        raise UserError(f"{p} is corrupted: {exc}") from None


def load_study(spec: SweepSpec, worker_seed: int | None = None):
    import optuna

    storage = open_storage(spec.storage, spec.heartbeat)
    try:
        return optuna.load_study(study_name=spec.study_name, storage=storage,
                                 sampler=_sampler(spec, worker_seed), pruner=_pruner(spec))
    except KeyError:
        raise UserError(f"the storage {redact_url(spec.storage)} holds no study named {spec.study_name!r}") from None


# ----------------------------------------------------------------------------- trial bookkeeping


def superseded(trials) -> set[int]:
    """Numbers of trials that were interrupted or went stale and were queued again."""
    out = set()
    for t in trials:
        for n in (t.system_attrs.get("failed_trial"), t.user_attrs.get("retry_of")):
            if n is not None:
                out.add(int(n))
    return out


def counted_trials(study) -> list:
    """The sweep's trials: not waiting, and not replaced by a retry."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    gone = superseded(trials)
    return [t for t in trials if t.state != TrialState.WAITING and t.number not in gone]


# The first key of the PostgreSQL advisory locks this module takes (the second: the study's name, hashed).
_PG_LOCK_KEY = 0x534C4D  # "SLM"


def _study_lock(spec: SweepSpec, sweep_dir: Path):
    """A lock around 'take a queued trial, or count and ask': a file lock when the storage is a local
    SQLite file, an advisory lock held by one connection when it is PostgreSQL (workers on any
    machine), none otherwise (the queue alone is atomic there; tpe may overshoot N by a trial)."""
    if is_postgres(spec.storage):
        return _pg_lock(spec)
    if not spec.storage.startswith("sqlite:"):
        return contextlib.nullcontext()
    import fcntl

    @contextlib.contextmanager
    def locked():
        try:
            f = open(sweep_dir / LOCK_FILE, "a")  # noqa: SIM115 (closed by the with below)
        except OSError as exc:
            raise UserError(f"cannot open the sweep lock {sweep_dir / LOCK_FILE}: {exc.strerror or exc}") from None
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    return locked()


_lock_engines: dict[str, Any] = {}


@contextlib.contextmanager
def _pg_lock(spec: SweepSpec):
    """PostgreSQL's session advisory lock on (slmkit, the study's name), taken and given back on one
    connection; a worker that dies holding it loses its connection, and the server releases it."""
    import zlib

    import sqlalchemy

    engine = _lock_engines.get(spec.storage)
    if engine is None:
        engine = sqlalchemy.create_engine(with_driver(spec.storage), poolclass=sqlalchemy.pool.NullPool,
                                          connect_args=connect_args(spec.storage))
        _lock_engines[spec.storage] = engine
    name = zlib.crc32(spec.study_name.encode())
    key = {"a": _PG_LOCK_KEY, "b": name - 2**32 if name >= 2**31 else name}  # two int4 keys
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:a, :b)"), key)
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:a, :b)"), key)
            conn.commit()


# Optuna has no public way to move a queued trial to RUNNING atomically or to send a heartbeat for a
# trial this code runs itself, so the two private attributes it needs are read here and only here:
# an Optuna upgrade that renames them breaks these two functions and nothing else.
def _storage_of(study):
    """The study's storage backend (Optuna's private `Study._storage`)."""
    return study._storage


def _trial_id(trial) -> int:
    """The storage's id of a Trial or FrozenTrial (Optuna's private `_trial_id`; `number` is per study)."""
    return trial._trial_id


def _pop_queued(study):
    """Take a queued trial: WAITING -> RUNNING is atomic in the storage, so two workers never get
    the same one (this mirrors what Study.ask does, without falling back to a new trial)."""
    import optuna
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if _storage_of(study).set_trial_state_values(_trial_id(t), state=TrialState.RUNNING):
                return optuna.trial.Trial(study, _trial_id(t))
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def work_left(study, spec: SweepSpec) -> bool:
    """Whether any trial is queued, running (here or in another worker) or still to be asked for (tpe)."""
    from optuna.trial import TrialState

    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return True
    counted = counted_trials(study)
    if any(t.state == TrialState.RUNNING for t in counted):
        return True
    return spec.mode == "tpe" and len(counted) < spec.n_trials


def next_trial(study, spec: SweepSpec, sweep_dir: Path):
    """The next trial for this worker, or None when nothing is left to start."""
    import optuna

    with _study_lock(spec, sweep_dir):
        # Dead workers' trials go back to the queue. Under the lock: on SQLite two workers could
        # otherwise both see the same trial running, both fail it, and both queue it again.
        optuna.storages.fail_stale_trials(study)
        trial = _pop_queued(study)
        if trial is None and spec.mode == "tpe" and len(counted_trials(study)) < spec.n_trials:
            trial = study.ask()
        if trial is not None:
            # At once: a worker that died before its first heartbeat would leave a trial running
            # forever (only trials with a heartbeat can go stale), and the other workers waiting for it.
            _storage_of(study).record_heartbeat(_trial_id(trial))
    if trial is not None:
        # Which machine and process ran it: on several machines, where its run directory is.
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    return trial


class Heartbeat:
    """Tells the storage this worker is alive while a trial runs."""

    def __init__(self, study, trial_id: int):
        self.storage, self.trial_id = _storage_of(study), trial_id
        self.interval = self.storage.get_heartbeat_interval() or HEARTBEAT_S
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)
        return False


# ----------------------------------------------------------------------------- equal compute


# A time-budgeted trial evaluates about this many times, and warms up over at most this share of its steps.
BUDGET_EVALS = 8
BUDGET_WARMUP_SHARE = 0.1


@dataclass
class Plan:
    """A time-budgeted trial's schedule, from its measured speed."""

    max_iters: int
    eval_interval: int
    warmup_iters: int
    seconds_per_step: float  # one training step, evaluations excluded
    eval_seconds: float  # one evaluation (the validation and the training subsets)

    def apply(self, cfg: RunConfig) -> None:
        t = cfg.train
        t.max_iters, t.eval_interval, t.warmup_iters = self.max_iters, self.eval_interval, self.warmup_iters
        t.epochs = 0.0  # the budget decides the length
        if t.lr_decay_iters > self.max_iters:
            t.lr_decay_iters = 0  # the cosine ends with the trial, as the budget promises


def fit_schedule(warmup_iters: int, seconds: float, step_s: float, eval_s: float) -> Plan:
    """The most steps that fit in `seconds` with ~BUDGET_EVALS evaluations among them (fewer when one
    evaluation takes much of the budget), evaluations every max_iters // evals steps and at the end."""
    iters, evals = 1, 1
    for n in range(BUDGET_EVALS, 0, -1):
        # n evaluations every `interval` steps, and at most one more at the last step
        fit = min(MAX_STEPS, int((seconds - (n + 1) * eval_s) / max(step_s, 1e-9)))
        if fit >= n:
            iters, evals = fit, n
            break
    warmup = min(warmup_iters, int(BUDGET_WARMUP_SHARE * iters))
    return Plan(iters, max(1, iters // evals), warmup, step_s, eval_s)


def plan_iters(cfg: RunConfig, data, seconds: float) -> Plan:
    """The schedule that fits in `seconds` of training wall time (evaluations included), from a few
    timed real steps and one timed evaluation."""
    step_s, eval_s = time_step_and_eval(cfg, data, seconds)
    return fit_schedule(cfg.train.warmup_iters, seconds, step_s, eval_s)


def time_step_and_eval(cfg: RunConfig, data, seconds: float) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluation) of `cfg` on this machine, measured."""
    import tempfile

    from slmkit.train import Trainer

    probe = copy.deepcopy(cfg)
    probe.train.max_iters, probe.train.epochs = 10**9, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(probe, Path(tmp), data)
        trainer.train_step(0)  # first step: allocation and kernel warm-up, not timed
        times: list[float] = []
        start = time.perf_counter()
        probe_s = min(5.0, max(2.0, 0.03 * seconds))  # long enough to average a busy moment out
        while len(times) < 3 or (time.perf_counter() - start < probe_s and len(times) < 200):
            t0 = time.perf_counter()
            trainer.train_step(len(times) + 1)
            times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]  # the median: robust to a busy moment on a shared machine
        start = time.perf_counter()
        trainer.fixed_loss(trainer.val_tokens, trainer._val_offsets)
        trainer.fixed_loss(trainer.train_tokens, trainer._train_eval_offsets)
        eval_s = time.perf_counter() - start
    return step_s, eval_s


class BudgetGuard:
    """on_eval hook: report to Optuna (pruning), and stop a trial that fell behind its time budget.

    The schedule was sized to fit the budget. Once the budget is spent, a trial whose schedule is
    not done goes on only if, at its pace so far, it ends within OVERRUN x budget; otherwise it
    stops at this evaluation (a busier machine, not a bigger model, made it late)."""

    OVERRUN = 1.25

    def __init__(self, trial, report: bool, seconds: float | None, max_iters: int, on_progress=None):
        self.trial, self.report, self.seconds, self.max_iters = trial, report, seconds, max_iters
        self.start = time.perf_counter()
        self.stopped_by_budget = False
        self.on_progress = on_progress

    def __call__(self, step: int, val_loss: float) -> bool:
        import optuna

        if self.on_progress is not None:
            self.on_progress(step, val_loss)
        if self.report:
            self.trial.report(val_loss, step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (val loss {val_loss:.4f})")
        if self.seconds is not None and step < self.max_iters:
            elapsed = time.perf_counter() - self.start
            at_end = elapsed + elapsed / step * (self.max_iters - step)
            if elapsed >= self.seconds and at_end > self.seconds * self.OVERRUN:
                self.stopped_by_budget = True
                return True
        return False


# ----------------------------------------------------------------------------- running trials


def trial_run_dir(sweep_dir: Path, number: int, seed_index: int, seeds: int) -> Path:
    name = f"trial_{number:04d}" + (f"_seed{seed_index}" if seeds > 1 else "")
    return sweep_dir / TRIALS_DIR / name


class _Interrupt:
    """Remembers a Ctrl-C even when the training loop turns it into a UserError."""

    def __init__(self):
        self.hit = False
        self.previous = None

    def _handler(self, signum, frame):
        self.hit = True
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def run_trial(study, trial, spec: SweepSpec, sweep_dir: Path, prepared_dir: str, on_progress=None) -> dict:
    """Train one trial (K seeds) and tell Optuna the outcome; returns a summary for the live table."""
    import numpy as np
    import optuna
    from optuna.trial import TrialState

    from slmkit.data import open_prepared
    from slmkit.train import train

    base = spec.base_config()
    values = {p.name: p.suggest(trial) for p in spec.params}
    summary: dict[str, Any] = {"number": trial.number, "values": values, "state": "fail"}
    interrupt = _Interrupt()
    try:
        with Heartbeat(study, _trial_id(trial)), interrupt:
            why = check_cell(base, spec.params, values)
            if why is not None:
                raise UserError(f"invalid configuration: {why}")
            cfg = apply_params(base, spec.params, values)
            if spec.trial_seconds:
                plan = plan_iters(cfg, open_prepared(prepared_dir), spec.trial_seconds)
                plan.apply(cfg)
                trial.set_user_attr("planned_max_iters", plan.max_iters)
                trial.set_user_attr("planned_eval_interval", plan.eval_interval)
                trial.set_user_attr("planned_warmup_iters", plan.warmup_iters)
                trial.set_user_attr("planned_seconds_per_step", round(plan.seconds_per_step, 5))
            losses, scores, runs, results = [], [], [], []
            for i in range(spec.seeds):
                run_cfg = copy.deepcopy(cfg)
                run_cfg.train.seed = cfg.train.seed + i
                run_dir = trial_run_dir(sweep_dir, trial.number, i, spec.seeds)
                runs.append(str(run_dir.relative_to(sweep_dir)))
                trial.set_user_attr("run_dirs", runs)
                guard = BudgetGuard(trial, spec.prune and i == 0, spec.trial_seconds, cfg.train.max_iters,
                                    on_progress)
                # No full-split evaluation at the end: the objective is the fixed validation subset.
                result = train(run_cfg, run_dir, overwrite=True, progress=False, prepared_dir=prepared_dir,
                               final_eval=False, on_eval=guard)
                if guard.stopped_by_budget:
                    trial.set_user_attr("stopped_by_budget", True)
                losses.append(result.best_val_loss)
                results.append(result)
                if spec.finetune is not None:
                    from slmkit.sweep.objective import finetune_score

                    scores.append(finetune_score(spec.finetune, run_dir, run_cfg.train.seed))
                    trial.set_user_attr("seed_finetune_scores", scores)
            values_told = scores if spec.finetune is not None else losses
            mean = float(np.mean(values_told))
            walls = [wall_seconds(sweep_dir / r) for r in runs]
            trial.set_user_attr("seed_best_val_losses", losses)
            trial.set_user_attr("best_val_loss_std", float(np.std(losses)) if len(losses) > 1 else 0.0)
            trial.set_user_attr("params", results[0].params)
            trial.set_user_attr("steps", [r.step for r in results])
            trial.set_user_attr("elapsed", [round(w, 2) for w in walls])
            study.tell(trial, mean)
            summary.update(state="complete", value=mean, std=float(np.std(values_told)), params=results[0].params,
                           tokens_per_s=float(np.mean([r.tokens_per_s for r in results])),
                           elapsed=float(np.mean(walls)), steps=results[0].step)
    except optuna.exceptions.UpdateFinishedTrialError:
        return _taken_over(trial, summary)
    except optuna.TrialPruned as exc:
        if _finished_elsewhere(study, trial):
            return _taken_over(trial, summary)
        study.tell(trial, state=TrialState.PRUNED)
        summary.update(state="pruned", error=str(exc))
    except (KeyboardInterrupt, Exception) as exc:
        if _finished_elsewhere(study, trial):
            if interrupt.hit or isinstance(exc, KeyboardInterrupt):
                raise UserError(f"interrupted during trial {trial.number}; continue with: "
                                f"slm sweep --resume {sweep_dir}") from None
            return _taken_over(trial, summary)
        if interrupt.hit or isinstance(exc, KeyboardInterrupt):
            # Not the trial's fault: record it as failed and queue the same configuration again.
            trial.set_user_attr("error", "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(values, user_attrs={"retry_of": trial.number})
            raise UserError(f"interrupted during trial {trial.number}; continue with: "
                            f"slm sweep --resume {sweep_dir}") from None
        message = f"{exc.__class__.__name__}: {exc}".splitlines()[0] if not isinstance(exc, UserError) \
            else (str(exc).splitlines() or [""])[0]
        message = redact_text(message, spec.storage)
        trial.set_user_attr("error", message[:500])
        study.tell(trial, state=TrialState.FAIL)
        summary.update(state="fail", error=message)
    return summary


def _finished_elsewhere(study, trial) -> bool:
    """Whether another worker already marked this running trial failed (its heartbeats stopped
    reaching the storage for longer than the grace period) and queued it again."""
    with contextlib.suppress(Exception):
        return _storage_of(study).get_trial(_trial_id(trial)).state.is_finished()
    return False


def _taken_over(trial, summary: dict) -> dict:
    """The summary of a trial another worker gave up on while it ran here: its retry stands for its
    configuration, so this result is not recorded (recording both would count the cell twice)."""
    summary.update(state="retried", error=f"trial {trial.number} went silent for longer than the heartbeat "
                                          "grace period; another worker marked it failed and queued it again")
    return summary


def wall_seconds(run_dir: Path) -> float:
    """A run's wall time as the report states it (read from its metrics.jsonl), so that the live
    table and report.md show the same number."""
    from slmkit.sweep.report import run_metrics  # report imports this module

    metrics = run_metrics(run_dir)
    return metrics["wall_s"] if metrics is not None else 0.0


# ----------------------------------------------------------------------------- the live view


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class LiveTable:
    """A progress bar over trials, with one table row printed above it per finished trial."""

    def __init__(self, spec: SweepSpec, total: int, done: int, enabled: bool = True):
        self.spec, self.enabled = spec, enabled
        self.names = [p.name for p in spec.params]
        self.widths = [max(len(n), 9) for n in self.names]
        self.bar = None
        self.total, self.done = total, done
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="trial", dynamic_ncols=True, desc="sweep")
        value = f"dev {spec.finetune['metric']}" if spec.finetune else "best val"
        self._print(self._row(["trial", *self.names, "params(M)", "tok/s", "time(s)", value, "state"]))

    def _row(self, cells: list[str]) -> str:
        widths = [6, *self.widths, 9, 8, 7, 15, 8]
        return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))

    def _print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def running(self, number: int, values: dict[str, Any], step: int | None = None, val: float | None = None):
        if self.bar is not None:
            post = {"trial": number, **{k: _fmt(v) for k, v in values.items()}}
            if step is not None:
                post.update(step=step, val=f"{val:.4f}")
            self.bar.set_postfix(post, refresh=True)

    def finished(self, s: dict[str, Any], done: int | None = None) -> None:
        self.done = done if done is not None else self.done + 1
        vals = [_fmt(s["values"].get(n, "")) for n in self.names]
        if s["state"] == "complete":
            best = f"{s['value']:.4f}" + (f" ± {s['std']:.4f}" if self.spec.seeds > 1 else "")
            cells = [s["number"], *vals, f"{s['params'] / 1e6:.3f}", f"{s['tokens_per_s']:,.0f}",
                     f"{s['elapsed']:.1f}", best, "ok"]
        else:
            cells = [s["number"], *vals, "", "", "", "", s["state"]]
        line = self._row(cells)
        if self.bar is None:
            line = f"{line}   [{self.done}/{self.total}]"
        if s.get("error") and s["state"] in ("fail", "retried"):
            line += f"   {s['error'][:100]}"
        self._print(line)
        if self.bar is not None:
            self.bar.n = self.done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_worker(sweep_dir: Path, prepared_dir: str, show: bool = True, worker_seed: int | None = None,
               max_trials: int | None = None) -> int:
    """Take and run trials until none is left (then wait for other workers' trials to settle), or
    until this worker ran max_trials; returns how many trials this worker ran."""
    from optuna.trial import TrialState

    spec = load_spec(sweep_dir)
    if worker_seed is None:
        worker_seed = (spec.sampler_seed * 1_000_003 + os.getpid()) % 2**31
    study = load_study(spec, worker_seed)
    total = spec.n_trials

    def finished_count() -> int:
        return sum(t.state.is_finished() for t in counted_trials(study))

    if not work_left(study, spec):
        return 0  # a finished sweep: no live table (slm sweep --resume prints the results instead)
    live = LiveTable(spec, total, finished_count(), enabled=show)
    ran = 0
    try:
        while max_trials is None or ran < max_trials:
            trial = next_trial(study, spec, sweep_dir)
            if trial is None:
                running = [t for t in counted_trials(study) if t.state == TrialState.RUNNING]
                if not running:
                    break
                # Trials running in other workers: wait for them (or for them to go stale and come back).
                time.sleep(2.0)
                continue
            values = {p.name: p.suggest(trial) for p in spec.params}  # queued values, or the sampler's
            live.running(trial.number, values)
            summary = run_trial(study, trial, spec, sweep_dir, prepared_dir,
                                on_progress=lambda step, val, n=trial.number, v=values: live.running(n, v, step, val))
            ran += 1
            live.finished(summary, finished_count())
    finally:
        live.close()
    return ran
