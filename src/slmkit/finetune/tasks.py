"""Declarative task specs and the readers that turn CSV / TSV / JSONL files into examples.

A task is data, not code: its family (which input transformation), the file format, which columns
hold the text segments, the answer choices and the label, the label set (or the regression range)
and the metrics. The shipped specs cover GLUE-style task files (SST-2, CoLA, RTE, SICK, STS-B,
MRPC, Story Cloze) in the column layouts of their public releases; `spec_from_flags` builds the
same kind of spec for a user's own file.

Columns are names (files with a header row) or 0-based indices. TSV files are split on tabs with
no quote handling at all (GLUE sentences hold unbalanced `"`); CSV files use standard quoting.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmkit.errors import UserError
from slmkit.fileio import read_utf8

FAMILIES = ("classification", "entailment", "similarity", "multiple_choice")
FORMATS = ("tsv", "csv", "jsonl")
METRICS = ("accuracy", "mcc", "f1", "pearson", "spearman")
# How many text segments each family joins into one sequence (multiple choice: context [+ question]).
SEGMENTS = {"classification": 1, "entailment": 2, "similarity": 2, "multiple_choice": None}
MALFORMED_LIMIT = 0.5  # a file with more than this fraction of bad rows is an error


@dataclass
class TaskSpec:
    """Everything needed to read a dataset and build its head; saved inside fine-tuned checkpoints."""

    name: str
    family: str
    format: str
    header: bool = True
    # Classification: [[text]]; entailment: [[premise], [hypothesis]]; similarity: [[a], [b]];
    # multiple choice: [[context columns...]] or [[context...], [question]]. The columns of one
    # segment are joined with a space.
    segments: list[list[str | int]] = field(default_factory=list)
    choices: list[str | int] = field(default_factory=list)  # multiple choice: one column per answer
    label: str | int | None = None
    labels: list[str] = field(default_factory=list)  # the label set (multiple choice: value -> choice index)
    label_names: list[str] = field(default_factory=list)  # readable names for predictions (optional)
    regression: list[float] | None = None  # [lo, hi] for a real-valued target (one output, MSE)
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])

    @property
    def is_regression(self) -> bool:
        return self.regression is not None

    @property
    def num_outputs(self) -> int:
        """Width of the linear head: 1 for regression and for multiple choice (one logit per answer)."""
        if self.is_regression or self.family == "multiple_choice":
            return 1
        return len(self.labels)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def display_label(self, index: int) -> str:
        return self.label_names[index] if self.label_names else self.labels[index]

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise UserError(f"task {self.name}: unknown family {self.family!r}; use one of {', '.join(FAMILIES)}")
        if self.format not in FORMATS:
            raise UserError(f"task {self.name}: unknown format {self.format!r}; use one of {', '.join(FORMATS)}")
        want = SEGMENTS[self.family]
        if want is not None and len(self.segments) != want:
            raise UserError(f"task {self.name}: a {self.family} task needs {want} text column(s) "
                            f"(got {len(self.segments)}; separate pair columns with a comma)")
        if self.family == "multiple_choice":
            if not 1 <= len(self.segments) <= 2:
                raise UserError(f"task {self.name}: multiple choice needs a context (and optionally a question)")
            if len(self.choices) < 2:
                raise UserError(f"task {self.name}: multiple choice needs at least two --choice-columns")
        if any(not seg for seg in self.segments):
            raise UserError(f"task {self.name}: every text segment needs at least one column")
        for m in self.metrics:
            if m not in METRICS:
                raise UserError(f"task {self.name}: unknown metric {m!r}; use one of {', '.join(METRICS)}")
        if self.is_regression:
            if self.family not in ("classification", "entailment", "similarity"):
                raise UserError(f"task {self.name}: regression is not defined for {self.family}")
            if len(self.regression) != 2 or not self.regression[0] < self.regression[1]:
                raise UserError(f"task {self.name}: regression range must be LO,HI with LO < HI")
        else:
            if self.family == "multiple_choice":
                if self.labels and len(self.labels) != len(self.choices):
                    raise UserError(f"task {self.name}: {len(self.labels)} labels for {len(self.choices)} choices")
            elif len(self.labels) < 2:
                raise UserError(f"task {self.name}: a classification head needs at least two labels (--labels)")
            if len(set(self.labels)) != len(self.labels):
                raise UserError(f"task {self.name}: the label list has duplicates")
            if "f1" in self.metrics and len(self.labels) != 2 and self.family != "multiple_choice":
                raise UserError(f"task {self.name}: F1 is defined here for two labels only")
        if self.label is None:
            raise UserError(f"task {self.name}: name the label column (--label-column)")
        if not self.header and any(isinstance(c, str) for c in self._all_columns()):
            raise UserError(f"task {self.name}: a file without a header row needs column indices, not names")

    def _all_columns(self) -> list[str | int]:
        cols = [c for seg in self.segments for c in seg] + list(self.choices)
        return cols + ([self.label] if self.label is not None else [])

    def choice_labels(self) -> list[str]:
        """Multiple choice: the label value that names each choice (default 1..k)."""
        return self.labels or [str(i + 1) for i in range(len(self.choices))]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        spec = cls(**d)
        spec.validate()
        return spec


def _spec(**kw: Any) -> TaskSpec:
    return TaskSpec(**kw)


# The public task files' layouts: which columns hold the text, the choices and the label.
TASKS: dict[str, TaskSpec] = {
    "sst2": _spec(name="sst2", family="classification", format="tsv", segments=[["sentence"]], label="label",
                  labels=["0", "1"], label_names=["negative", "positive"], metrics=["accuracy"]),
    "cola": _spec(name="cola", family="classification", format="tsv", header=False, segments=[[3]], label=1,
                  labels=["0", "1"], label_names=["unacceptable", "acceptable"], metrics=["mcc", "accuracy"]),
    "rte": _spec(name="rte", family="entailment", format="tsv", segments=[["sentence1"], ["sentence2"]],
                 label="label", labels=["entailment", "not_entailment"], metrics=["accuracy"]),
    "sick": _spec(name="sick", family="entailment", format="tsv", segments=[["sentence_A"], ["sentence_B"]],
                  label="entailment_label", labels=["ENTAILMENT", "NEUTRAL", "CONTRADICTION"],
                  metrics=["accuracy"]),
    "mrpc": _spec(name="mrpc", family="similarity", format="tsv", segments=[["#1 String"], ["#2 String"]],
                  label="Quality", labels=["0", "1"], label_names=["not_paraphrase", "paraphrase"],
                  metrics=["f1", "accuracy"]),
    "stsb": _spec(name="stsb", family="similarity", format="tsv", segments=[["sentence1"], ["sentence2"]],
                  label="score", regression=[0.0, 5.0], metrics=["pearson", "spearman"]),
    "storycloze": _spec(name="storycloze", family="multiple_choice", format="csv",
                        segments=[["InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4"]],
                        choices=["RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2"],
                        label="AnswerRightEnding", labels=["1", "2"], metrics=["accuracy"]),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; shipped tasks: {', '.join(TASKS)} "
                        "(or describe your own with --family, --format, --columns, --label-column, --labels)")
    return TaskSpec.from_dict(TASKS[name].to_dict())


def _column(token: str) -> str | int:
    token = token.strip()
    return int(token) if token.lstrip("-").isdigit() else token


def _columns(text: str) -> list[str | int]:
    return [_column(t) for t in text.split(",") if t.strip()]


def spec_from_flags(
    name: str,
    family: str,
    format: str,
    columns: str,
    label_column: str,
    labels: str = "",
    choice_columns: str = "",
    regression: str = "",
    metric: str = "",
    header: bool = True,
    label_names: str = "",
) -> TaskSpec:
    """A spec from command-line flags.

    `columns` lists the text segments separated by ',' (classification: one, entailment and
    similarity: two, multiple choice: the context and optionally a question); several columns
    joined into one segment are written with '+', e.g. "s1+s2+s3+s4". Columns are header names or
    0-based indices.
    """
    if family not in FAMILIES:
        raise UserError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not columns:
        raise UserError("--columns is required for a custom task (text column names or indices)")
    parts = columns.split(",")
    segments = [[_column(c) for c in part.split("+") if c.strip()] for part in parts if part.strip()]
    reg = None
    if regression:
        try:
            reg = [float(x) for x in regression.split(",")]
        except ValueError:
            raise UserError(f"--regression takes LO,HI (e.g. 0,5), got {regression!r}") from None
    default_metric = "pearson,spearman" if reg else "accuracy"
    spec = TaskSpec(
        name=name, family=family, format=format, header=header, segments=segments,
        choices=_columns(choice_columns), label=_column(label_column) if label_column else None,
        labels=[x.strip() for x in labels.split(",") if x.strip()],
        label_names=[x.strip() for x in label_names.split(",") if x.strip()],
        regression=reg, metrics=[m.strip() for m in (metric or default_metric).split(",") if m.strip()],
    )
    spec.validate()
    return spec


# ----------------------------------------------------------------------------- reading


@dataclass
class Example:
    segments: list[str]  # the text of each segment, in the spec's order
    choices: list[str]  # multiple choice answers (empty otherwise)
    label: int | float | None  # class index, choice index, or the raw regression value
    line: int  # 1-based line (row) in the source file


@dataclass
class BadRow:
    line: int
    reason: str


@dataclass
class ReadResult:
    examples: list[Example]
    bad: list[BadRow]
    source: str

    def report(self) -> str | None:
        if not self.bad:
            return None
        first = "; ".join(f"{self.source}:{b.line}: {b.reason}" for b in self.bad[:3])
        more = f" (and {len(self.bad) - 3} more)" if len(self.bad) > 3 else ""
        return f"skipped {len(self.bad)} malformed row(s): {first}{more}"


# parse_rows marks a JSONL line that is not an object with this key.
BAD_ROW = "__bad__"


def parse_rows(text: str, fmt: str, source: str) -> list[tuple[int, Any]]:
    """(line number, row) pairs; a row is a list of fields (tsv/csv) or a dict (jsonl); a JSONL line
    that is not an object becomes {BAD_ROW: reason}."""
    out: list[tuple[int, Any]] = []
    if fmt == "tsv":
        for i, line in enumerate(text.splitlines(), start=1):  # splitlines also eats CRLF
            if line.strip():
                out.append((i, line.split("\t")))
    elif fmt == "csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            for row in reader:
                if any(f.strip() for f in row):
                    out.append((reader.line_num, row))
        except csv.Error as exc:
            raise UserError(f"{source}:{reader.line_num}: CSV parse error ({exc})") from None
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            out.append((i, row if isinstance(row, dict) else {BAD_ROW: "not a JSON object"}))
    return out


def read_text(path: str | Path) -> tuple[str, str]:
    """A data file's text (without a BOM) and its name for messages."""
    text = read_utf8(path, "data file").removeprefix("\ufeff")  # spreadsheet exports start with a BOM
    return text, "<stdin>" if str(path) == "-" else str(path)


def read_examples(spec: TaskSpec, path: str | Path, require_label: bool = True,
                  fmt: str | None = None) -> ReadResult:
    """Read a task file. Bad rows are collected with their line; a mostly bad file is an error.

    fmt="plain" reads one example per line with tab-separated fields in the order: segments, then
    choices, then (optionally) the label - the quick way to pipe new inputs into `slm predict`.
    """
    text, source = read_text(path)
    fmt = fmt or spec.format
    if fmt == "plain":
        rows = [(i, ln.split("\t")) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
        n_seg = len(spec.segments)
        index: dict[str | int, int] = {}
        plain_spec = TaskSpec(**{**spec.to_dict(), "header": False,
                                 "segments": [[i] for i in range(n_seg)],
                                 "choices": list(range(n_seg, n_seg + len(spec.choices))),
                                 "label": n_seg + len(spec.choices)})
        return _parse(plain_spec, rows, index, source, require_label)
    rows = parse_rows(text, fmt, source)
    if not rows:
        raise UserError(f"{source} holds no rows")
    index = {}
    if spec.header and fmt in ("tsv", "csv"):
        line, head = rows.pop(0)
        index = {name.strip(): i for i, name in enumerate(head)}
        missing = [c for c in spec._all_columns() if isinstance(c, str) and c not in index]
        if missing and not require_label and missing == [spec.label]:
            missing = []
        if missing:
            raise UserError(f"{source}:{line}: header has no column(s) {', '.join(map(repr, missing))}; "
                            f"it has: {', '.join(index)}")
    return _parse(spec, rows, index, source, require_label)


def _parse(spec: TaskSpec, rows: list[tuple[int, Any]], index: dict, source: str, require_label: bool) -> ReadResult:
    examples: list[Example] = []
    bad: list[BadRow] = []
    label_index = {v: i for i, v in enumerate(spec.choice_labels() if spec.family == "multiple_choice"
                                             else spec.labels)}

    def get(row: Any, col: str | int) -> str | None:
        if isinstance(row, dict):
            if BAD_ROW in row:
                return None
            key = col if col in row else str(col)
            value = row.get(key)
            return None if value is None else str(value)
        i = index.get(col, -1) if isinstance(col, str) else col
        return row[i] if 0 <= i < len(row) else None

    for line, row in rows:
        if isinstance(row, dict) and BAD_ROW in row:
            bad.append(BadRow(line, row[BAD_ROW]))
            continue
        problem = None
        segments: list[str] = []
        for seg in spec.segments:
            parts = [get(row, c) for c in seg]
            if any(p is None for p in parts):
                problem = f"missing column {seg[[p is None for p in parts].index(True)]!r}"
                break
            text = " ".join(p.strip() for p in parts if p.strip())
            if not text:
                problem = f"empty text in column {seg[0]!r}"
                break
            segments.append(text)
        choices: list[str] = []
        if problem is None:
            for c in spec.choices:
                value = get(row, c)
                if value is None:
                    problem = f"missing column {c!r}"
                    break
                if not value.strip():
                    problem = f"empty answer in column {c!r}"
                    break
                choices.append(value.strip())
        label: int | float | None = None
        if problem is None:
            raw = get(row, spec.label) if spec.label is not None else None
            if raw is None or not raw.strip():
                if require_label:
                    problem = f"missing label column {spec.label!r}"
            elif spec.is_regression:
                try:
                    label = float(raw)
                except ValueError:
                    problem = f"label {raw.strip()!r} is not a number"
                else:
                    lo, hi = spec.regression
                    if not lo <= label <= hi:
                        problem = f"label {label} is outside the range [{lo}, {hi}]"
            else:
                value = raw.strip()
                if value not in label_index:
                    problem = f"label {value!r} is not in the label set {list(label_index)}"
                else:
                    label = label_index[value]
        if problem is not None:
            bad.append(BadRow(line, problem))
            continue
        examples.append(Example(segments, choices, label, line))
    result = ReadResult(examples, bad, source)
    total = len(examples) + len(bad)
    if not examples or len(bad) > MALFORMED_LIMIT * total:
        first = f" first: {source}:{bad[0].line}: {bad[0].reason}" if bad else ""
        raise UserError(f"{source}: {len(bad)} of {total} rows are malformed for task {spec.name} "
                        f"({spec.family}, {spec.format});{first}")
    return result
