"""The run log: everything a run tells the disk and the person watching it, for pre-training,
fine-tuning and sweeps alike.

- records: JSON objects, one a line, appended to metrics.jsonl (never through a symbolic link),
  read back robustly (`read_metrics`), and cut back to a checkpoint's step on resume;
- text: human lines on stderr and, where the run keeps one, in a text file (fine-tuning's log.txt);
- progress: a tqdm bar on a terminal, plain lines on stderr otherwise;
- plots: PNG files written atomically (`save_figure`).

Progress and log lines go to stderr: stdout carries only a command's result, so it can be piped.
A `RunLog` hands every record and text line to its sinks: the console and the run folder's files,
always, and any extra ones given to it (objects with `record(dict)`, `text(str)` and `close()`,
such as the experiment trackers of slmkit.tracking). A sink may also take `artifact(name, text, step)`
(a text the run wrote, such as samples.txt) and `finish(ok)` (close, saying whether the run ended well).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slmkit.fileio import append_line, atomic_write, atomic_write_text, read_utf8

METRICS = "metrics.jsonl"


class Sink:
    """Where a run log's records and text lines go. Each method does nothing unless a sink needs it;
    an extra sink may also be any object with these three methods."""

    def record(self, record: dict[str, Any]) -> None:
        pass

    def text(self, line: str) -> None:
        pass

    def artifact(self, name: str, text: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- the always-on sinks


class Console(Sink):
    """Text lines on stderr; records are shown by the progress display instead."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def text(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)


class JsonlFile(Sink):
    """metrics.jsonl: one record a line, appended; a symbolic link in its place is refused."""

    def __init__(self, path: Path):
        self.path = path

    def record(self, record: dict[str, Any]) -> None:
        append_line(self.path, json.dumps(record))


class TextFile(Sink):
    """A human-readable log (log.txt): the text lines, appended; a symbolic link is refused."""

    def __init__(self, path: Path):
        self.path = path

    def text(self, line: str) -> None:
        append_line(self.path, line)


# ----------------------------------------------------------------------------- the run log


class RunLog:
    """One run's records and text lines, handed to every sink.

    Without a folder nothing is written to disk: text lines for `text_file` are held until `open`
    names the folder (nothing goes into a folder before it is known to be ours), and records go
    to the extra sinks only (a DDP rank other than 0 keeps no files)."""

    def __init__(self, folder: str | Path | None = None, *, text_file: str | None = None, echo: bool = True,
                 sinks: Iterable[Sink] = ()):
        self.folder: Path | None = None
        self.text_file = text_file
        self.console = Console(echo)
        self.extra: list[Sink] = list(sinks)
        self._files: list[Sink] = []
        self._held: list[str] = []
        if folder is not None:
            self.open(folder)

    @property
    def echo(self) -> bool:
        """Whether text lines and progress are shown on stderr."""
        return self.console.enabled

    @echo.setter
    def echo(self, on: bool) -> None:
        self.console.enabled = on

    @property
    def sinks(self) -> list[Sink]:
        # The console first: a line is seen even when writing it to the folder fails.
        return [self.console, *self._files, *self.extra]

    def open(self, folder: str | Path) -> None:
        """Start writing into `folder`: metrics.jsonl, and the text file with the lines held so far."""
        self.folder = Path(folder)
        self._files = [JsonlFile(self.folder / METRICS)]
        if self.text_file is not None:
            log = TextFile(self.folder / self.text_file)
            for line in self._held:
                log.text(line)
            self._files.append(log)
        self._held = []

    def record(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.record(record)

    def text(self, line: str) -> None:
        if self.folder is None and self.text_file is not None:
            self._held.append(line)
        for sink in self.sinks:
            sink.text(line)

    def artifact(self, name: str, text: str, step: int) -> None:
        """A text the run wrote into its folder (samples.txt), for the sinks that keep such texts."""
        for sink in self.sinks:
            if hasattr(sink, "artifact"):
                sink.artifact(name, text, step)

    def progress(self, total: int, initial: int) -> Progress:
        """A progress display over `total` steps, shown when this log echoes."""
        return Progress(total, initial, self.echo)

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.folder) if self.folder is not None else []

    def truncate_after(self, step: int) -> None:
        """On resume, drop what the interrupted run wrote after its last checkpoint, and the final
        evaluation (final_* records: the resumed run writes them again when it reaches the end)."""
        if self.folder is None or not (self.folder / METRICS).is_file():
            return
        keep = [r for r in read_metrics(self.folder) if r.get("step", 0) <= step and not is_final(r)]
        atomic_write_text(self.folder / METRICS, "".join(json.dumps(r) + "\n" for r in keep))

    def close(self, ok: bool = True) -> None:
        """Close every sink; `ok` False tells the sinks that can say so (a tracker's run status) that the
        run ended with an error or an interrupt."""
        for sink in self.sinks:
            if hasattr(sink, "finish"):
                sink.finish(ok)
            else:
                sink.close()


def is_final(record: dict[str, Any]) -> bool:
    """A record of the evaluation after the last step (final_val_loss, final_val_bpc)."""
    return any(k.startswith("final_") for k in record)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `run_dir`'s metrics.jsonl; a line that is not a JSON record (a torn write, an
    edit, nesting too deep to parse) is skipped with one warning, never a traceback."""
    p = Path(run_dir) / METRICS
    if not p.is_file():
        return []
    records, bad = [], 0
    for line in read_utf8(p, "metrics file").splitlines():
        if not line.strip():
            continue
        record = _parse(line)
        if isinstance(record, dict) and isinstance(record.get("step", 0), int):
            records.append(record)
        else:
            bad += 1
    if bad:
        print(f"warning: skipped {bad} malformed line(s) in {p}", file=sys.stderr)
    return records


def _parse(line: str) -> Any:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None


# ----------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar on a terminal; plain lines on stderr otherwise (CI logs, pipes, notebooks' files)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, info: dict[str, Any], line: bool) -> None:
        """Show `info` (None values left out) at `step`; without a bar, a line only when `line`."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: v for k, v in info.items() if v is not None}, refresh=True)
        elif line:
            print(" ".join(f"{k} {v}" for k, v in {"step": step, **info}.items() if v is not None),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_seconds(seconds: float) -> str:
    """A duration as a person reads it: 45s, 12m05s, 3h20m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ----------------------------------------------------------------------------- plots


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: plots are files, and no display may exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """Write `fig` to `path` as a PNG, atomically (a planted link is replaced, never followed; a
    failed write leaves the previous plot), and close it."""
    try:
        # The temporary name does not end in .png, so the format is given.
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        pyplot().close(fig)
