"""Corpus files as documents: .txt, JSON Lines / JSON, Parquet, gzip or zstd compressed, glob
patterns, and `hf:NAME[:CONFIG]` data sets from the Hugging Face Hub.

A .txt file is one document; each JSON record or Parquet row is one document (its `text_field`).
Parquet and zstd are read with pyarrow, hub data sets with HF `datasets` (the `corpora` extra);
gzip and JSON with the standard library. A JSON line that does not parse, or a record without the
text field, is skipped and counted; when most records are bad the file is refused, naming the first.

`SourceStream` reads the same documents one at a time, each as its text in pieces, for corpora larger
than memory: text is decoded a few MB at a time, JSON Lines line by line, Parquet by row batches.
Only a JSON array (not JSON Lines) is read whole.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import itertools
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.errors import UserError

TEXT, JSONL, JSON, PARQUET = "text", "jsonl", "json", "parquet"
FORMATS = {".txt": TEXT, ".text": TEXT, ".jsonl": JSONL, ".ndjson": JSONL, ".json": JSON, ".parquet": PARQUET}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
HUB_PREFIX = "hf:"
EXTRA_HINT = 'pip install -e ".[corpora]"'
FRAGMENT_BYTES = 1 << 22  # streamed text is decoded 4 MB at a time
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # where str.splitlines() cuts


@dataclass
class Documents:
    """Documents read from one or more files, where each came from, and what was skipped."""

    texts: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    skipped: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, text: str, name: str) -> None:
        self.texts.append(text)
        self.names.append(name)


def file_format(path: str | Path) -> tuple[str, str | None] | None:
    """(format, compression) from a file name: data.jsonl.gz -> ("jsonl", "gzip"); None if not a corpus file."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None or (fmt == PARQUET and compression):  # Parquet compresses inside the file
        return None
    return fmt, compression


def is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def is_corpus_source(name: str) -> bool:
    """A name this module reads: a hub data set, a glob, or a file of a known format."""
    return (name.startswith(HUB_PREFIX) or (is_glob(name) and not Path(name).expanduser().exists())
            or file_format(name) is not None)


def read_source(name: str, text_field: str = "text") -> tuple[Documents, str]:
    """The documents of `name` and a description of where they came from."""
    if name.startswith(HUB_PREFIX):
        return _read_hub(name[len(HUB_PREFIX):], text_field), name
    files, source = _files(name)
    docs = Documents()
    for f in files:
        _read_file(f, text_field, docs)
    return _checked(docs, name), source


def _files(name: str) -> tuple[list[Path], str]:
    """The files a name or glob stands for, and a description; none, or one of no known format, is an error."""
    if is_glob(name) and not Path(name).expanduser().exists():  # a file named data[1].txt is that file
        pattern = str(Path(name).expanduser())
        files = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"the pattern {name!r} matches no file")
        unknown = [f for f in files if file_format(f) is None]
        if unknown:
            raise UserError(f"{unknown[0]} (matched by {name!r}) is not a corpus file: use .txt, .jsonl, .json, "
                            ".parquet, optionally .gz or .zst compressed (Parquet compresses itself)")
        return [Path(f) for f in files], f"{len(files)} file{'s' if len(files) > 1 else ''} matching {name}"
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(f"dataset file {name} does not exist")
    return [path], str(path)


def _checked(docs: Documents, name: str) -> Documents:
    for note in docs.notes:
        print(f"note: {note}", file=sys.stderr)
    return docs


def _read_file(path: Path, text_field: str, docs: Documents) -> None:
    fmt, compression = file_format(path) or (None, None)
    if fmt is None:
        raise UserError(f"{path} is not a corpus file: use .txt, .jsonl, .json or .parquet, optionally .gz or .zst")
    if fmt == PARQUET:
        _read_parquet(path, text_field, docs)
        return
    text = _decode(_read_bytes(path, compression), path)
    if fmt == TEXT:
        docs.add(text, str(path))
    elif fmt == JSON and text.lstrip().startswith("["):
        _read_json_array(text, path, text_field, docs)
    else:
        _read_json_lines(text, path, text_field, docs)


def _read_bytes(path: Path, compression: str | None) -> bytes:
    try:
        if compression == "gzip":
            with gzip.open(path, "rb") as f:
                return f.read()
        if compression == "zstd":
            pa = _pyarrow(path)
            with pa.input_stream(str(path), compression="zstd") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except Exception as exc:  # pyarrow's errors for a corrupt zstd stream
        if type(exc).__module__.startswith("pyarrow"):
            raise UserError(f"cannot decompress {path}: {str(exc).splitlines()[0]}") from None
        raise


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}): convert it to UTF-8 first") from None


def _record_text(record: object, text_field: str) -> str | None:
    if isinstance(record, dict) and isinstance(record.get(text_field), str):
        return record[text_field]
    return None


def _problem(record: object, text_field: str) -> str:
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    if text_field not in record:
        keys = ", ".join(list(record)[:8]) or "none"
        return f"no field {text_field!r} (fields: {keys}); choose one with --text-field"
    return f"field {text_field!r} is {type(record[text_field]).__name__}, not a string"


def _read_json_lines(text: str, path: Path, text_field: str, docs: Documents) -> None:
    for name, pieces in _stream_json_lines(iter((text,)), path, text_field, docs.notes):
        docs.add("".join(pieces), name)


def _read_json_array(text: str, path: Path, text_field: str, docs: Documents) -> None:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    good = bad = 0
    first = ""
    for i, record in enumerate(records):
        value = _record_text(record, text_field)
        if value is None:
            bad += 1
            first = first or f"{path}: record {i}: {_problem(record, text_field)}"
            continue
        good += 1
        docs.add(value, f"{path} record {i}")
    _count_bad(good, bad, first, path, docs)


def _count_bad(good: int, bad: int, first: str, path: Path, docs: Documents) -> None:
    note = _bad_note(good, bad, first, path)
    if note:
        docs.skipped += bad
        docs.notes.append(note)


def _bad_note(good: int, bad: int, first: str, path: Path) -> str:
    """The note on skipped records ('' when none); when half or more are bad, the error."""
    if bad and bad >= good:
        raise UserError(f"{path}: {bad} of {good + bad} records have no usable text; first: {first}")
    return f"skipped {bad} of {good + bad} records of {path}; first: {first}" if bad else ""


def _pyarrow(path: Path):
    try:
        import pyarrow as pa
    except ImportError:
        raise UserError(f"reading {path.name} needs pyarrow: {EXTRA_HINT}") from None
    return pa


def _parquet_file(path: Path, text_field: str):
    _pyarrow(path)
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError for a file that is not Parquet
        raise UserError(f"cannot read {path} as Parquet: {str(exc).splitlines()[0]}") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(columns[:12])}); "
                        "choose one with --text-field")
    return pf


def _read_parquet(path: Path, text_field: str, docs: Documents) -> None:
    pf = _parquet_file(path, text_field)
    good = bad = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str):
                docs.add(value, f"{path} row {good + bad}")
                good += 1
            else:
                bad += 1
    _count_bad(good, bad, f"{path}: a row whose {text_field!r} is not text", path, docs)


def _read_hub(spec: str, text_field: str) -> Documents:
    ds = _hub_dataset(spec, text_field)
    docs = Documents()
    for i, value in enumerate(_column(ds, text_field)):
        if isinstance(value, str):
            docs.add(value, f"hf:{spec} row {i}")
        else:
            docs.skipped += 1
    return docs


def _hub_dataset(spec: str, text_field: str):
    name, _, config = spec.partition(":")
    if not name:
        raise UserError("hf: needs a data set name: hf:NAME or hf:NAME:CONFIG")
    try:
        import datasets
    except ImportError:
        raise UserError(f"hf: data sets need HF datasets: {EXTRA_HINT}") from None
    if os.environ.get("HF_HUB_OFFLINE") or not _hub_reachable():
        # Offline: read the local HF cache only, at once, instead of retrying the network for half a minute.
        import huggingface_hub.constants

        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:  # network, missing data set, bad config: all one line
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load hf:{spec} from the Hugging Face Hub ({type(exc).__name__}: {first[:200]}); "
                        "it needs a network connection, or the data set in the local HF cache") from None
    if text_field not in ds.column_names:
        raise UserError(f"hf:{spec} has no column {text_field!r} (columns: {', '.join(ds.column_names[:12])}); "
                        "choose one with --text-field")
    return ds


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _column(ds, name: str) -> Iterator[object]:
    for batch in ds.iter(batch_size=4096):
        yield from batch[name]


# ----------------------------------------------------------------------------- streaming


class SourceStream:
    """The documents of `name`, read one at a time and again on every iteration, each as (its name,
    its text in pieces): the same documents in the same order as read_source, never a whole file
    in memory (but a JSON array). A piece iterator must be read before the next document is asked
    for. `notes` (skipped records) is complete once an iteration has ended; a file of mostly bad
    records is refused when the iteration reaches its end."""

    def __init__(self, name: str, text_field: str = "text"):
        self.name, self.text_field = name, text_field
        self.notes: list[str] = []
        if name.startswith(HUB_PREFIX):
            self.files: list[Path] = []
            self.source = name
        else:
            self.files, self.source = _files(name)

    def __iter__(self) -> Iterator[tuple[str, Iterator[str]]]:
        self.notes = []
        if self.name.startswith(HUB_PREFIX):
            yield from self._hub(self.name[len(HUB_PREFIX):])
            return
        for f in self.files:
            yield from _stream_file(f, self.text_field, self.notes)

    def _hub(self, spec: str) -> Iterator[tuple[str, Iterator[str]]]:
        ds = _hub_dataset(spec, self.text_field)
        for i, value in enumerate(_column(ds, self.text_field)):
            if isinstance(value, str):
                yield f"hf:{spec} row {i}", iter((value,))


def read_text_pieces(path: Path, compression: str | None = None, universal_newlines: bool = False,
                     size: int | None = None) -> Iterator[str]:
    """A UTF-8 file's text, decoded `size` bytes at a time. `universal_newlines`: CR LF and CR become
    LF, as Path.read_text does (plain .txt corpora are read that way); otherwise the text is the
    bytes decoded as they are, as read_source does."""
    size = size or FRAGMENT_BYTES
    inner = codecs.getincrementaldecoder("utf-8")()
    decoder = io.IncrementalNewlineDecoder(inner, translate=True) if universal_newlines else inner
    offset = 0
    try:
        with _open_binary(path, compression) as f:
            while True:
                block = f.read(size)
                pending = len(inner.getstate()[0])
                try:
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError as exc:
                    at = offset - pending + exc.start
                    raise UserError(f"{path} is not UTF-8 text (byte {at}): convert it to UTF-8 first") from None
                offset += len(block)
                if text:
                    yield text
                if not block:
                    return
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except UserError:
        raise
    except Exception as exc:  # pyarrow's errors for a corrupt zstd stream
        if type(exc).__module__.startswith("pyarrow"):
            raise UserError(f"cannot decompress {path}: {str(exc).splitlines()[0]}") from None
        raise


def _open_binary(path: Path, compression: str | None):
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        return _pyarrow(path).input_stream(str(path), compression="zstd")
    return open(path, "rb")


def _stream_file(path: Path, text_field: str, notes: list[str]) -> Iterator[tuple[str, Iterator[str]]]:
    fmt, compression = file_format(path) or (None, None)
    if fmt is None:
        raise UserError(f"{path} is not a corpus file: use .txt, .jsonl, .json or .parquet, optionally .gz or .zst")
    if fmt == PARQUET:
        yield from _stream_parquet(path, text_field, notes)
        return
    pieces = read_text_pieces(path, compression)
    if fmt == TEXT:
        yield str(path), pieces
        return
    if fmt == JSON:
        head = []
        for piece in pieces:
            head.append(piece)
            if piece.strip():
                break
        if "".join(head).lstrip().startswith("["):  # a JSON array: read whole
            docs = Documents()
            _read_json_array("".join(itertools.chain(head, pieces)), path, text_field, docs)
            notes.extend(docs.notes)
            for text, name in zip(docs.texts, docs.names, strict=True):
                yield name, iter((text,))
            return
        pieces = itertools.chain(head, pieces)
    yield from _stream_json_lines(pieces, path, text_field, notes)


def text_lines(pieces: Iterator[str]) -> Iterator[str]:
    """The lines of a text given in pieces, as str.splitlines() cuts the whole text."""
    carry = ""
    for piece in pieces:
        parts = (carry + piece).splitlines(keepends=True)
        carry = ""
        if parts and (parts[-1][-1] not in LINE_BREAKS or parts[-1][-1] == "\r"):
            carry = parts.pop()  # unfinished, or a CR whose LF may come in the next piece
        for part in parts:
            yield _strip_break(part)
    if carry:
        yield _strip_break(carry)


def _strip_break(line: str) -> str:
    if line.endswith("\r\n"):
        return line[:-2]
    return line[:-1] if line and line[-1] in LINE_BREAKS else line


def _stream_json_lines(pieces: Iterator[str], path: Path, text_field: str,
                       notes: list[str]) -> Iterator[tuple[str, Iterator[str]]]:
    good = bad = 0
    first = ""
    for i, line in enumerate(text_lines(pieces), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            record, problem = None, f"not JSON ({exc.msg})"
        else:
            problem = "" if _record_text(record, text_field) is not None else _problem(record, text_field)
        if problem:
            bad += 1
            first = first or f"{path}:{i}: {problem}"
            continue
        good += 1
        yield f"{path}:{i}", iter((record[text_field],))
    note = _bad_note(good, bad, first, path)
    if note:
        notes.append(note)


def _stream_parquet(path: Path, text_field: str, notes: list[str]) -> Iterator[tuple[str, Iterator[str]]]:
    pf = _parquet_file(path, text_field)
    good = bad = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str):
                yield f"{path} row {good + bad}", iter((value,))
                good += 1
            else:
                bad += 1
    note = _bad_note(good, bad, f"{path}: a row whose {text_field!r} is not text", path)
    if note:
        notes.append(note)
