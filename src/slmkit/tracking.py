"""Experiment trackers: a run's records also in CSV, TensorBoard, Weights & Biases or MLflow.

`--logger csv,tensorboard,wandb,mlflow` (`slm train`, `slm finetune`, and each trial of `slm sweep`)
adds trackers to the run log (slmkit.runlog) as extra sinks; metrics.jsonl is written whatever they
do. Each tracker gets every record (losses, learning rate, tokens/s, validation, zero-shot and task
metrics, each at its step), the run's settings as hyperparameters, and samples.txt. Where they write:

- csv: RUN/metrics.csv, one row per record and one column per key ("step" first), for a spreadsheet.
  A row is appended; when a key appears that no column has yet, the file is rewritten atomically with
  the new column. A resumed run rebuilds it from metrics.jsonl.
- tensorboard: RUN/tensorboard/, through torch.utils.tensorboard's SummaryWriter: scalars, the
  settings as hparams and as a text, samples.txt as a text. A resumed run adds an event file to the
  same folder with `purge_step`, so TensorBoard drops the steps the interrupted run logged past its
  checkpoint; a run started again with --overwrite purges from step 0.
- wandb: RUN/wandb/ (`wandb.init(dir=RUN)`), offline unless WANDB_MODE says otherwise (online needs
  `wandb login`; an offline run is uploaded later with `wandb sync`). Project WANDB_PROJECT or "slmkit".
- mlflow: the tracking server or database of MLFLOW_TRACKING_URI when it is set; otherwise a SQLite
  database RUN/mlflow.db with artifacts in RUN/mlartifacts/. Experiment MLFLOW_EXPERIMENT_NAME or "slmkit".

Runs are named after the run folder. RUN/tracking.json keeps the W&B and MLflow run ids, so a resumed
run continues the same W&B run (resume="allow") and the same MLflow run. A tracker added on resume is
given the records the run logged before. Only the process that writes the run's files (DDP rank 0)
opens trackers.

A tracker that fails (a full disk, a server that went away, an exception inside the library) warns
once on stderr and is off for the rest of the run; training, metrics.jsonl and the other trackers go
on. A tracker that is not installed is a one-line error before anything is written (`require_loggers`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import secrets
import string
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmkit.config import logger_names
from slmkit.errors import UserError
from slmkit.fileio import append_line, atomic_write_json, atomic_write_text, read_marker, record_files
from slmkit.runlog import Sink, read_metrics

CSV_FILE, TB_DIR, WANDB_DIR, STATE = "metrics.csv", "tensorboard", "wandb", "tracking.json"
MLFLOW_DB, MLFLOW_ARTIFACTS = "mlflow.db", "mlartifacts"
PROJECT = "slmkit"  # the W&B project and the MLflow experiment when the environment names none
# What each optional tracker needs, for the one-line error when it is missing.
NEEDS = {"tensorboard": "TensorBoard", "wandb": "Weights & Biases (wandb)", "mlflow": "MLflow"}
PARAM_CHARS = 500  # MLflow's smallest parameter-value limit across the versions the extra allows
# The keys of evaluation records (pre-training, zero-shot probes, fine-tuning), flushed to disk at once.
EVALUATIONS = ("val_", "train_eval_", "final_", "zeroshot/", "dev_", "test_")


def install_hint(name: str) -> str:
    return f'--logger {name} needs {NEEDS[name]}: pip install -e ".[{name}]"'


def require_loggers(spec: str) -> list[str]:
    """The trackers `spec` names, each importable; otherwise a one-line error naming the install
    command. Called before a run folder is made, so a missing tracker writes nothing."""
    names = logger_names(spec)
    for name in names:
        try:
            _import_backend(name)
        except ImportError:
            raise UserError(install_hint(name)) from None
        except Exception as exc:  # installed but broken (a protobuf clash, a half-finished upgrade)
            raise UserError(f"--logger {name}: importing it failed ({_first_line(exc)}); reinstall it with "
                            f'pip install -e ".[{name}]"') from None
    return names


def _import_backend(name: str) -> None:
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (imports the tensorboard package)
    elif name == "wandb":
        import wandb  # noqa: F401
    elif name == "mlflow":
        import mlflow.tracking  # noqa: F401

        if not os.environ.get("MLFLOW_TRACKING_URI"):  # the local SQLite store needs the database layer
            import alembic  # noqa: F401
            import sqlalchemy  # noqa: F401


def output_names(names: Iterable[str]) -> list[str]:
    """What the trackers `names` write into the run folder (files and folders)."""
    names = list(names)
    out = []
    if "csv" in names:
        out.append(CSV_FILE)
    if "tensorboard" in names:
        out.append(TB_DIR)
    if "wandb" in names:
        out.append(WANDB_DIR)
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        out += [MLFLOW_DB, MLFLOW_ARTIFACTS]
    if "wandb" in names or "mlflow" in names:
        out.append(STATE)
    return out


def check_outputs(run_dir: str | Path, spec: str) -> None:
    """Refuse (one line) when a name the trackers would write holds a link, or something slmkit's
    marker does not list: slmkit never writes into, or through, what it did not make. Writes nothing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    owned = set((read_marker(run_dir) or {}).get("files", []))
    for name in output_names(logger_names(spec)):
        p = run_dir / name
        if p.is_symlink():
            raise UserError(f"{p} is a symbolic link; slmkit does not write through links it did not make (remove it)")
        if p.exists() and name not in owned:
            raise UserError(f"{p} exists and slmkit did not write it; move it away or choose another --out-dir")


# ----------------------------------------------------------------------------- opening


@dataclass
class Context:
    """What every tracker is opened with."""

    run_dir: Path
    name: str  # the run's name in the trackers: its folder's name
    hparams: dict[str, Any]  # flat: setting name -> value
    metrics: list[str]  # the headline metrics (TensorBoard's hparams view lists them)
    resume_step: int | None  # None: a new run
    history: list[dict[str, Any]] = field(default_factory=list)  # records logged before this session
    state: dict[str, Any] = field(default_factory=dict)  # tracking.json

    def save_state(self, key: str, value: dict[str, Any]) -> None:
        self.state[key] = value
        atomic_write_json(self.run_dir / STATE, self.state)


def open_trackers(spec: str, run_dir: str | Path, hparams: dict[str, Any], metrics: Iterable[str] = (),
                  resume_step: int | None = None) -> list[Tracker]:
    """The trackers `spec` names, open on `run_dir`, a folder the caller has claimed and locked.

    Their outputs are recorded in the folder's marker as slmkit's; `resume_step` (a resumed run, whose
    metrics.jsonl was cut back to that step) continues the trackers' earlier runs, and a tracker that
    has none is given the records logged so far. A tracker that cannot open warns and is left out."""
    names = logger_names(spec)
    if not names:
        return []
    run_dir = Path(run_dir)
    check_outputs(run_dir, spec)
    marker = read_marker(run_dir)
    if marker is not None:
        record_files(run_dir, marker["kind"], output_names(names))
    resumed = resume_step is not None
    ctx = Context(run_dir, run_dir.resolve().name, flatten(hparams), list(metrics), resume_step,
                  history=read_metrics(run_dir) if resumed else [], state=_read_state(run_dir) if resumed else {})
    trackers = []
    for name in names:
        tracker = TRACKERS[name]()
        tracker.start(ctx)
        if not tracker.failed:
            trackers.append(tracker)
    return trackers


def _read_state(run_dir: Path) -> dict[str, Any]:
    p = run_dir / STATE
    if p.is_symlink() or not p.is_file():
        return {}
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    return state if isinstance(state, dict) else {}


def flatten(settings: dict[str, Any]) -> dict[str, Any]:
    """Nested settings ({"model": {"n_layer": 2}}) as flat names (n_layer), as the flags spell them;
    a name two sections share keeps its section (model.x, train.x)."""
    leaves: list[tuple[str, str, Any]] = []

    def walk(d: dict[str, Any], path: str) -> None:
        for key, value in d.items():
            full = f"{path}.{key}" if path else str(key)
            if isinstance(value, dict):
                walk(value, full)
            else:
                leaves.append((str(key), full, value))

    walk(settings, "")
    counts: dict[str, int] = {}
    for key, _, _ in leaves:
        counts[key] = counts.get(key, 0) + 1
    return {key if counts[key] == 1 else full: value for key, full, value in leaves}


def _numbers(record: dict[str, Any]) -> dict[str, float | int]:
    """The numeric values of a record (bools, texts and lists are not metrics); "step" stays."""
    return {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    if isinstance(exc, UserError):
        return line
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


# ----------------------------------------------------------------------------- the trackers


class Tracker(Sink):
    """A run-log sink in front of an experiment tracker. Every call into the library is guarded: the
    first exception is one warning on stderr, and the tracker is off from then on."""

    name = ""

    def __init__(self) -> None:
        self.failed = False

    def start(self, ctx: Context) -> None:
        self._guard(self._start, ctx)

    def record(self, record: dict[str, Any]) -> None:
        self._guard(self._record, record)

    def artifact(self, name: str, text: str, step: int) -> None:
        self._guard(self._artifact, name, text, step)

    def close(self) -> None:
        self.finish(True)

    def finish(self, ok: bool) -> None:
        self._guard(self._finish, ok)
        self.failed = True  # closed: nothing more goes to it

    def _guard(self, call, *args: Any) -> None:
        if self.failed:
            return
        try:
            call(*args)
        except Exception as exc:
            self.failed = True
            print(f"warning: the {self.name} logger failed ({_first_line(exc)}); it is off for the rest of this "
                  "run (training, metrics.jsonl and the other loggers go on)", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                self._finish(False)

    def _start(self, ctx: Context) -> None:
        raise NotImplementedError

    def _record(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def _artifact(self, name: str, text: str, step: int) -> None:
        pass

    def _finish(self, ok: bool) -> None:
        pass


class CsvLogger(Tracker):
    """metrics.csv: one row per record, one column per key (see the module docstring)."""

    name = "csv"

    def _start(self, ctx: Context) -> None:
        self.path = ctx.run_dir / CSV_FILE
        self.columns: list[str] = ["step"]
        self.rows: list[dict[str, Any]] = []
        for record in ctx.history:
            self._add(record)
        self._rewrite()

    def _add(self, record: dict[str, Any]) -> bool:
        """Keep the row; whether it brought new columns."""
        new = [k for k in record if k not in self.columns]
        self.columns += new
        self.rows.append(record)
        return bool(new)

    def _record(self, record: dict[str, Any]) -> None:
        if self._add(record):
            self._rewrite()
        else:
            append_line(self.path, self._line(record))

    def _rewrite(self) -> None:
        header = self._line({c: c for c in self.columns})
        atomic_write_text(self.path, header + "".join(self._line(r) for r in self.rows))

    def _line(self, row: dict[str, Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([_cell(row.get(c)) for c in self.columns])
        return buf.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int | str):
        return str(value)
    return json.dumps(value)


class TensorBoardLogger(Tracker):
    """RUN/tensorboard/: scalars, hparams, the settings and samples.txt as texts."""

    name = "tensorboard"

    def _start(self, ctx: Context) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        folder = ctx.run_dir / TB_DIR
        earlier = folder.is_dir() and any(p.name.startswith("events.out.tfevents.") for p in folder.iterdir())
        # A run that logged here before: TensorBoard drops its steps from `purge` on (the resumed run
        # logs them again; a run started over logs everything again).
        purge = (0 if ctx.resume_step is None else ctx.resume_step + 1) if earlier else None
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge, flush_secs=30)
        values = {k: v if isinstance(v, int | float | str | bool) else json.dumps(v) for k, v in ctx.hparams.items()}
        for summary in hparams(values, dict.fromkeys(ctx.metrics, 0.0)):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", _preformatted(json.dumps(ctx.hparams, indent=2)), global_step=purge or 0)
        if not earlier:
            for record in ctx.history:
                self._record(record)
        self.writer.flush()

    def _record(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        values = _numbers(record)
        for key, value in values.items():
            if key != "step":
                self.writer.add_scalar(key, value, global_step=step)
        if any(k.startswith(EVALUATIONS) for k in values):
            self.writer.flush()  # an evaluation: on disk at once

    def _artifact(self, name: str, text: str, step: int) -> None:
        self.writer.add_text(Path(name).stem, _preformatted(text), global_step=step)
        self.writer.flush()

    def _finish(self, ok: bool) -> None:
        self.writer.close()


def _preformatted(text: str) -> str:
    """Text as TensorBoard's (markdown) text view shows it verbatim: an indented code block."""
    return "\n".join("    " + line for line in text.splitlines())


class WandbLogger(Tracker):
    """Weights & Biases: RUN/wandb/, offline unless WANDB_MODE says otherwise."""

    name = "wandb"

    def _start(self, ctx: Context) -> None:
        import wandb

        saved = ctx.state.get("wandb", {}).get("id") if isinstance(ctx.state.get("wandb"), dict) else None
        run_id = saved if isinstance(saved, str) and saved else _new_id()
        self.wandb = wandb
        # console="off": wandb leaves stdout and stderr alone (stdout carries only a command's result);
        # create_new: a run of the caller's own in the same process is left as it is.
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or PROJECT, name=ctx.name, id=run_id, resume="allow",
            dir=str(ctx.run_dir), mode=os.environ.get("WANDB_MODE") or "offline",
            config=None if saved else ctx.hparams, settings=wandb.Settings(console="off"), reinit="create_new",
        )
        ctx.save_state("wandb", {"id": run_id})
        if saved:
            self.run.config.update(ctx.hparams, allow_val_change=True)
        # Charts against the training step: the step is a logged value, so a resumed run, whose steps
        # repeat the few the interrupted one logged past its checkpoint, never logs "backwards".
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        if not saved:
            for record in ctx.history:
                self._record(record)

    def _record(self, record: dict[str, Any]) -> None:
        self.run.log(_numbers(record))

    def _artifact(self, name: str, text: str, step: int) -> None:
        table = self.wandb.Table(columns=["step", "text"], data=[[step, text]])
        self.run.log({"step": step, Path(name).stem: table})

    def _finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def _new_id() -> str:
    """A W&B run id: 8 lowercase letters and digits, as wandb makes them."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class MlflowLogger(Tracker):
    """MLflow: MLFLOW_TRACKING_URI, or a SQLite database in the run folder."""

    name = "mlflow"

    def _start(self, ctx: Context) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        local = not uri
        if local:
            uri = f"sqlite:///{(ctx.run_dir / MLFLOW_DB).resolve()}"
        with _quiet_mlflow():
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self._experiment(ctx, local)
            saved = ctx.state.get("mlflow", {}).get("run_id") if isinstance(ctx.state.get("mlflow"), dict) else None
            run = self._saved_run(saved)
            if run is not None:
                self.client.update_run(run.info.run_id, status="RUNNING")
            else:
                run = self.client.create_run(experiment, run_name=ctx.name,
                                             tags={"slmkit.run_dir": str(ctx.run_dir.resolve())})
            self.run_id = run.info.run_id
            ctx.save_state("mlflow", {"run_id": self.run_id})
            self._params(ctx.hparams, run.data.params)
            if saved is None or run.info.run_id != saved:
                self._metrics(ctx.history)

    def _experiment(self, ctx: Context, local: bool) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise UserError(f"the MLflow experiment {name!r} is deleted; restore it or set MLFLOW_EXPERIMENT_NAME")
            return found.experiment_id
        location = (ctx.run_dir / MLFLOW_ARTIFACTS).resolve().as_uri() if local else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:
            found = self.client.get_experiment_by_name(name)  # another process made it meanwhile
            if found is None:
                raise
            return found.experiment_id

    def _saved_run(self, run_id: Any):
        if not isinstance(run_id, str) or not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except Exception:  # another store, or the run was removed: start a new one
            return None
        return run if run.info.lifecycle_stage == "active" else None

    def _params(self, hparams: dict[str, Any], logged: dict[str, str]) -> None:
        """The settings as parameters. MLflow's parameters cannot change: on resume a setting given
        another value (--max-iters) is kept as the tag slmkit.resumed.NAME."""
        from mlflow.entities import Param, RunTag

        values = {k: _param_text(v) for k, v in hparams.items()}
        new = [Param(k, v) for k, v in values.items() if k not in logged]
        changed = [RunTag(f"slmkit.resumed.{k}", v) for k, v in values.items() if k in logged and logged[k] != v]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=new[i : i + 100])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def _metrics(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(r.get("step", 0)))
                   for r in records for k, v in _numbers(r).items() if k != "step"]
        for i in range(0, len(metrics), 1000):  # at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def _record(self, record: dict[str, Any]) -> None:
        self._metrics([record])

    def _artifact(self, name: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, name)

    def _finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= PARAM_CHARS else text[: PARAM_CHARS - 3] + "..."


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's and Alembic's INFO lines (creating the database's tables) and SQLAlchemy's deprecation
    warnings stay off the console while the store opens."""
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


TRACKERS: dict[str, type[Tracker]] = {"csv": CsvLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger,
                                      "mlflow": MlflowLogger}
