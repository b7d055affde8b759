"""Token shards: a corpus larger than memory streamed through tokenizer processes into shard files,
and the shards read back as one token array.

The streaming pipeline keeps memory flat: documents arrive as text in pieces (never a whole corpus,
nor a whole document, in one str); `split_stream` cuts the train/validation split at a character
position known from a first pass; `chunk_stream` cuts each piece exactly where `data.chunk_text`
cuts it, so the tokens are those of the in-memory path; `batches` groups the chunks into tasks that
`encode_batches` hands to worker processes (each encodes on one core; results come back in order);
`ShardWriter` appends the tokens to shard files of at most `shard_tokens` tokens.

Every shard is written under a temporary name, flushed to disk, then renamed: a file named
train_NNN.bin is always whole. After each shard the caller records the manifest so far, and where
the stream stands (batch, token), so a re-run resumes after the last whole shard.

`ShardedTokens` is the reading side: one np.memmap per shard behind a 1-D array's len, dtype and
slicing, so batches are drawn from global offsets exactly as from one file.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import multiprocessing
import numbers
import os
import signal
import sys
import tempfile
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.fileio import FILE_MODE, TMP_SUFFIX
from slmkit.tokenizers import Tokenizer, tokenizer_from_dict

SHARD_TOKENS = 1 << 27  # 134,217,728 tokens per shard by default: 256 MiB in uint16
BATCH_CHARS = 1 << 22  # text per task handed to a worker (about 4 MB)
HASH = "sha256"
HASH_BLOCK = 1 << 23


def token_dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:03d}.bin"


def file_hash(path: Path) -> str:
    """The sha256 of a file, read in blocks (never mapped: hashing GBs must not grow the RSS)."""
    h = hashlib.new(HASH)
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- a first pass


@dataclass
class Scan:
    """What a first pass over a corpus learns without keeping its text: the checksums the cache key
    is made of, the sizes the split is cut by, and (for a character vocabulary) its characters."""

    text_hash: Any = field(default_factory=lambda: hashlib.sha256())  # of the documents joined
    lengths: array = field(default_factory=lambda: array("q"))  # each document's length in characters
    documents: int = 0  # documents that hold any text
    blank: bool = True  # no character but whitespace
    chars: set[str] | None = None

    @property
    def doc_chars(self) -> int:
        """The characters of the documents themselves (the layout with end-of-text tokens)."""
        return int(sum(self.lengths))

    def joined_chars(self, joiner: str) -> int:
        """The characters of the documents joined by `joiner` (the layout without end-of-text tokens)."""
        return self.doc_chars + len(joiner) * max(len(self.lengths) - 1, 0)

    def lengths_json(self) -> Iterator[bytes]:
        """json.dumps(lengths) in pieces: '[12, 7, 0]'."""
        yield b"["
        for i in range(0, len(self.lengths), 65536):
            part = ", ".join(map(str, self.lengths[i:i + 65536]))
            yield (", " + part if i else part).encode()
        yield b"]"

    def lengths_sha256(self) -> str:
        h = hashlib.sha256()
        for part in self.lengths_json():
            h.update(part)
        return h.hexdigest()


def scan_documents(documents: Iterable[tuple[str, Iterator[str]]], joiner: str, collect_chars: bool = False) -> Scan:
    """One pass over the documents: checksums, lengths and (collect_chars) the set of characters."""
    scan = Scan(chars=set() if collect_chars else None)
    sep = joiner.encode("utf-8")
    for k, (_, pieces) in enumerate(documents):
        if k and sep:
            scan.text_hash.update(sep)
        n = 0
        for piece in pieces:
            n += len(piece)
            scan.text_hash.update(piece.encode("utf-8"))
            if scan.blank and piece and not piece.isspace():
                scan.blank = False
            if scan.chars is not None:
                scan.chars.update(piece)
        scan.lengths.append(n)
        scan.documents += n > 0
    if scan.chars is not None and len(scan.lengths) > 1:
        scan.chars.update(joiner)  # the joined text holds the joiner between documents
    return scan


# ----------------------------------------------------------------------------- pieces, the split, chunks


class Piece:
    """A run of text encoded on its own, streamed: `fragments` must be read to the end before
    `eot` (an end-of-text token follows) is asked."""

    def __init__(self, split: str, fragments: Iterator[str], eot: bool | Callable[[], bool]):
        self.split, self.fragments, self._eot = split, fragments, eot

    @property
    def eot(self) -> bool:
        return self._eot() if callable(self._eot) else self._eot


def document_pieces(documents: Iterable[tuple[str, Iterator[str]]], joiner: str,
                    eot: bool) -> Iterator[tuple[bool, Iterator[str]]]:
    """(eot, fragments): with an end-of-text token each non-empty document; without, the joined text."""
    if not eot:
        yield False, _joined(documents, joiner)
        return
    for _, fragments in documents:
        it = (f for f in fragments if f)
        first = next(it, None)
        if first is not None:
            yield True, itertools.chain((first,), it)


def _joined(documents: Iterable[tuple[str, Iterator[str]]], joiner: str) -> Iterator[str]:
    for k, (_, fragments) in enumerate(documents):
        if k and joiner:
            yield joiner
        yield from fragments


def split_stream(pieces: Iterable[tuple[bool, Iterator[str]]], cut: int | None,
                 split: str = "train") -> Iterator[Piece]:
    """The pieces as data.split_pieces lays them out: the first `cut` characters train, the rest
    validation; only the piece the cut falls in is divided, its train part without end-of-text.
    `cut` None: every piece goes to `split`. Each piece must be read before the next is asked for."""
    pos = 0
    for eot, fragments in pieces:
        if cut is None or pos >= cut:
            yield Piece(split if cut is None else "val", fragments, eot)
            continue
        it = iter(fragments)
        rest: list[str] = []

        def head(it: Iterator[str] = it, rest: list[str] = rest) -> Iterator[str]:
            nonlocal pos
            for f in it:
                room = cut - pos
                if len(f) <= room:
                    pos += len(f)
                    yield f
                    if pos == cut:
                        return
                else:
                    pos = cut
                    if room:
                        yield f[:room]
                    rest.append(f[room:])
                    return

        def tail(it: Iterator[str] = it, rest: list[str] = rest) -> list[str]:
            """The piece's text after the cut, if any (its first non-empty fragment)."""
            if not rest:
                rest.extend(itertools.islice((f for f in it if f), 1))
            return rest

        train = head()
        yield Piece("train", train, lambda eot=eot, tail=tail: eot and not tail())
        for _ in train:  # the consumer read it all; make sure
            pass
        if tail():
            yield Piece("val", itertools.chain(rest, it), eot)


def chunk_stream(fragments: Iterable[str], size: int) -> Iterator[str]:
    """data.chunk_text over a text given in pieces: the same chunks (cut at a newline followed by a
    non-space character, at or after `size`), without the whole text in memory."""
    it = (f for f in fragments if f)
    buf, eof, scan = "", False, size
    while True:
        if len(buf) <= size and not eof:
            nxt = next(it, None)
            if nxt is None:
                eof = True
            else:
                buf += nxt
            continue
        if len(buf) <= size:  # the end is within reach: the rest is the last chunk
            if buf:
                yield buf
            return
        cut = _good_cut(buf, scan)
        if cut < 0:
            if not eof:
                nxt = next(it, None)
                if nxt is None:
                    eof = True
                else:
                    scan = len(buf)
                    buf += nxt
                continue
            cut = len(buf) - 1  # chunk_text stops one short of the end
        yield buf[:cut]
        buf, scan = buf[cut:], size


def _good_cut(buf: str, start: int) -> int:
    """The first position >= start after a newline and before a non-space character, or -1."""
    i = buf.find("\n", start - 1)
    while i != -1 and i + 1 < len(buf):
        if not buf[i + 1].isspace():
            return i + 1
        i = buf.find("\n", i + 1)
    return -1


@dataclass
class Batch:
    """Consecutive chunks of one split, encoded as one task: `eots[i]` says an end-of-text token
    follows `texts[i]`."""

    index: int
    split: str
    texts: list[str]
    eots: list[bool]
    chars: int = 0


def batches(pieces: Iterable[Piece], chunk_chars: int, batch_chars: int = BATCH_CHARS) -> Iterator[Batch]:
    """Tasks of about `batch_chars` characters; a task never holds two splits."""
    index = 0
    cur: Batch | None = None
    size = 0
    for piece in pieces:
        if cur is not None and cur.split != piece.split:
            yield cur
            index, cur, size = index + 1, None, 0
        chunks = chunk_stream(piece.fragments, chunk_chars)
        prev = next(chunks, None)
        while prev is not None:
            nxt = next(chunks, None)
            if cur is None:
                cur = Batch(index, piece.split, [], [])
            cur.texts.append(prev)
            cur.eots.append(nxt is None and piece.eot)
            cur.chars += len(prev)
            size += len(prev)
            prev = nxt
            if size >= batch_chars:
                yield cur
                index, cur, size = index + 1, None, 0
    if cur is not None:
        yield cur


# ----------------------------------------------------------------------------- encoding in processes


def encode_array(tok: Tokenizer, text: str, dtype: np.dtype) -> np.ndarray:
    """One text as tokens, on one core: tiktoken and the character table straight into an array."""
    encode = getattr(tok, "encode_array", None)
    if encode is not None:
        return np.asarray(encode(text)).astype(dtype, copy=False)
    return np.asarray(tok.encode(text), dtype=dtype)


def encode_texts(tok: Tokenizer, texts: list[str], eots: list[bool]) -> np.ndarray:
    """The tokens of `texts` in order, an end-of-text token after each whose `eots` entry says so."""
    dtype = token_dtype(tok)
    eot = tok.special.get("eot")
    parts = []
    for text, ends in zip(texts, eots, strict=True):
        parts.append(encode_array(tok, text, dtype))
        if ends and eot is not None:
            parts.append(np.array([eot], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tok_dict: dict[str, Any]) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker
    _worker_tokenizer = tokenizer_from_dict(tok_dict)


def _encode_task(texts: list[str], eots: list[bool]) -> np.ndarray:
    assert _worker_tokenizer is not None
    return encode_texts(_worker_tokenizer, texts, eots)


def _context() -> Any:
    """spawn (safe in a process where torch started threads), unless the main script cannot be
    imported again by a spawned child (a script read from stdin): then fork."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if path and not os.path.exists(path) and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def encode_batches(tok: Tokenizer, tasks: Iterable[Batch], workers: int,
                   start: int = 0) -> Iterator[tuple[Batch, np.ndarray]]:
    """Each batch from index `start` on with its tokens, in order. With `workers` > 1 the batches
    are encoded in that many processes (spawned: safe after torch started threads), at most two
    per worker in flight, so memory stays bounded whatever the corpus size."""
    todo = (b for b in tasks if b.index >= start)
    if workers <= 1:
        for b in todo:
            yield b, encode_texts(tok, b.texts, b.eots)
        return
    pool = ProcessPoolExecutor(workers, mp_context=_context(), initializer=_start_worker, initargs=(tok.to_dict(),))
    pending: deque[tuple[Batch, Future]] = deque()
    try:
        for b in todo:
            pending.append((b, pool.submit(_encode_task, b.texts, b.eots)))
            b.texts = []  # the worker has its copy
            if len(pending) >= 2 * workers:
                done, fut = pending.popleft()
                yield done, fut.result()
        while pending:
            done, fut = pending.popleft()
            yield done, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- writing shards


class ShardWriter:
    """Appends tokens to shard files of at most `shard_tokens` tokens, split by split.

    Each shard is written under a temporary name, fsynced and renamed; then `on_shard(shards, next)`
    is told the manifest so far and where the stream goes on after it ([batch index, token offset
    in that batch's tokens], also kept as the entry's "next"), so a re-run can resume there.
    `shards` may hold those of an earlier run.
    """

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int,
                 on_shard: Callable[[dict[str, list[dict]], list[int]], None],
                 shards: dict[str, list[dict]] | None = None):
        self.folder, self.dtype, self.shard_tokens, self.on_shard = folder, np.dtype(dtype), shard_tokens, on_shard
        self.shards: dict[str, list[dict]] = {s: list(v) for s, v in (shards or {}).items()}
        self._file: Any = None
        self._tmp: Path | None = None
        self._split = ""
        self._count = 0
        self._hash: Any = None

    def tokens(self, split: str) -> int:
        return sum(s["tokens"] for s in self.shards.get(split, []))

    def add(self, batch: Batch, tokens: np.ndarray, skip: int = 0) -> None:
        """The tokens of `batch` from offset `skip` on (a resumed run skips what is already written)."""
        if self._file is not None and self._split != batch.split:
            self._close([batch.index, skip])
        pos = skip
        tokens = tokens[skip:]
        while len(tokens):
            if self._file is None:
                self._open(batch.split)
            part = tokens[: self.shard_tokens - self._count]
            data = np.ascontiguousarray(part, dtype=self.dtype).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += len(part)
            pos += len(part)
            tokens = tokens[len(part):]
            if self._count == self.shard_tokens:
                self._close([batch.index + 1, 0] if not len(tokens) else [batch.index, pos])

    def finish(self, next_index: int) -> None:
        if self._file is not None:
            self._close([next_index, 0])

    def abort(self) -> None:
        """Drop the shard being written (an error, Ctrl-C): no half shard is left under its name."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def _open(self, split: str) -> None:
        name = shard_name(split, len(self.shards.get(split, [])))
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=self.folder)
        self._file, self._tmp = os.fdopen(fd, "wb"), Path(tmp)
        self._split, self._count, self._hash = split, 0, hashlib.new(HASH)

    def _close(self, next_pos: list[int]) -> None:
        f, tmp = self._file, self._tmp
        assert f is not None and tmp is not None
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600; a shard is as readable as any file the user makes
        entries = self.shards.setdefault(self._split, [])
        name = shard_name(self._split, len(entries))
        os.replace(tmp, self.folder / name)  # only a whole, flushed shard ever has its name
        self._tmp = None
        _fsync_dir(self.folder)
        entries.append({"file": name, "tokens": self._count, "dtype": self.dtype.name, HASH: self._hash.hexdigest(),
                        "next": next_pos})
        self.on_shard(self.shards, next_pos)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the manifest


def manifest_problem(shards: Any, tokens: dict[str, Any], dtype: str) -> str:
    """What is wrong with a meta.json's "shards" ('' when nothing): per split, a list of
    {file, tokens, dtype, sha256} whose files are plain names and whose counts add up."""
    if not isinstance(shards, dict):
        return "'shards' must map each split to its shard list"
    for split in ("train", "val"):
        entries = shards.get(split)
        if not isinstance(entries, list) or not entries:
            return f"'shards' must list the {split} shards"
        for k, e in enumerate(entries):
            if not (isinstance(e, dict) and e.get("file") == shard_name(split, k) and _is_count(e.get("tokens"))
                    and e.get("dtype") == dtype and isinstance(e.get(HASH), str) and len(e[HASH]) == 64):
                return f"shard {k} of {split} must be {{file: {shard_name(split, k)}, tokens, dtype: {dtype}, {HASH}}}"
        if sum(e["tokens"] for e in entries) != tokens.get(split):
            return f"the {split} shards do not add up to its {tokens.get(split)} tokens"
    return ""


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def shard_size_problem(folder: Path, entry: dict) -> str:
    """'' when the shard is present with the size its manifest entry says, else what is wrong."""
    path = folder / entry["file"]
    expected = entry["tokens"] * np.dtype(entry["dtype"]).itemsize
    if path.is_symlink() or not path.is_file():
        return f"shard {path} is missing"
    size = path.stat().st_size
    if size != expected:
        return f"shard {path} has {size:,} bytes, its manifest says {expected:,} (truncated or replaced)"
    return ""


def shard_hash_problem(folder: Path, entry: dict) -> str:
    """shard_size_problem, then the file's sha256 against the manifest's."""
    problem = shard_size_problem(folder, entry)
    if problem:
        return problem
    if file_hash(folder / entry["file"]) != entry[HASH]:
        return f"shard {folder / entry['file']} does not match its {HASH} in the manifest (modified or corrupted)"
    return ""


# ----------------------------------------------------------------------------- reading shards


def _memmap(path: Path, dtype: str, tokens: int) -> np.ndarray:
    if tokens == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(tokens,))


class ShardedTokens:
    """Token files read as one 1-D array: len, dtype, tokens[i], and tokens[a:b], an ndarray even
    across a shard boundary. Offsets are global, so sampling by (seed, step) sees one stream."""

    ndim = 1

    def __init__(self, parts: list[np.ndarray]):
        self._parts = [p for p in parts if len(p)]
        self.dtype = np.dtype(parts[0].dtype if parts else np.uint16)
        self._starts = [0]
        for p in self._parts:
            self._starts.append(self._starts[-1] + len(p))

    @classmethod
    def open(cls, folder: Path, entries: list[dict]) -> ShardedTokens:
        return cls([_memmap(folder / e["file"], e["dtype"], e["tokens"]) for e in entries])

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def size(self) -> int:
        return len(self)

    @property
    def shards(self) -> int:
        return len(self._parts)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=self.dtype)
        return out.astype(dtype, copy=False) if dtype is not None else out

    def __iter__(self) -> Iterator[Any]:
        for p in self._parts:
            yield from p

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._range(start, max(stop, start))
        if isinstance(key, numbers.Integral):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {int(key)} is out of bounds for {len(self)} tokens")
            k = bisect.bisect_right(self._starts, i) - 1
            return self._parts[k][i - self._starts[k]]
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of bounds for {len(self)} tokens")
        which = np.searchsorted(self._starts, idx, side="right") - 1
        out = np.empty(idx.shape, dtype=self.dtype)
        for k in np.unique(which):
            sel = which == k
            out[sel] = self._parts[k][idx[sel] - self._starts[k]]
        return out

    def _range(self, a: int, b: int) -> np.ndarray:
        if a >= b:
            return np.zeros(0, dtype=self.dtype)
        k = bisect.bisect_right(self._starts, a) - 1
        if b <= self._starts[k + 1]:
            return self._parts[k][a - self._starts[k]: b - self._starts[k]]
        out = []
        while a < b:
            end = min(b, self._starts[k + 1])
            out.append(self._parts[k][a - self._starts[k]: end - self._starts[k]])
            a, k = end, k + 1
        return np.concatenate(out)
