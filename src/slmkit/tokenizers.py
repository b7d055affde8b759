"""One tokenizer interface for every kind: character level, byte-level BPE trained on the corpus
(HF `tokenizers`), and the GPT-2 vocabulary (encoded with tiktoken, the fastest exact encoder).

A tokenizer serialises to a JSON dict that travels inside every run and checkpoint, so a model
never meets the wrong vocabulary; `fingerprint()` identifies it.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.config import show as _show
from slmkit.errors import UserError

# The fine-tuning tokens of GPT-1 (start `s`, delimiter `$`, extract `e`) plus end of text.
EOT, START, DELIM, EXTRACT = "<|endoftext|>", "<|start|>", "<|delim|>", "<|extract|>"
SPECIAL_TOKENS = (EOT, START, DELIM, EXTRACT)
SPECIAL_ROLES = {EOT: "eot", START: "start", DELIM: "delim", EXTRACT: "extract"}

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the rest (control bytes, space, ...) are shifted
    to code points from 256 up, so every byte has a visible one-character stand-in ("Ġ" = space).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


@cache
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _need(d: dict[str, Any], name: str, kind: type, what: str) -> Any:
    """Field `name` of a saved tokenizer, of type `kind`, or a one-line error."""
    if name not in d:
        raise UserError(f"missing field {name!r}")
    value = d[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"field {name!r} must be {what}, got {_show(value)}")
    return value


@contextlib.contextmanager
def _foreign(what: str) -> Iterator[None]:
    """Errors of the Rust libraries (HF tokenizers, tiktoken) on bad data as one-line UserErrors.

    Their Python exceptions are plain `Exception`s, and a Rust panic arrives as pyo3's
    PanicException, which derives from BaseException: both mean 'this data is not usable'.
    """
    try:
        yield
    except UserError:
        raise
    except BaseException as exc:
        if not (isinstance(exc, Exception) or type(exc).__name__ == "PanicException"):
            raise  # KeyboardInterrupt, SystemExit
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{what}: {reason}") from None


class Tokenizer(ABC):
    """Text <-> token ids. `special` maps roles (eot, start, delim, extract) to ids where present."""

    kind: str
    special: dict[str, int]

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (special tokens: their name)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]: ...

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        return [self.token_bytes(int(i)).decode("utf-8", errors="backslashreplace") for i in ids]

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> str:
        return f"{self.kind} tokenizer, {self.vocab_size} tokens"

    def check_ids(self, ids: Iterable[int]) -> list[int]:
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside this vocabulary (0..{self.vocab_size - 1})")
        return out


class StreamDecoder:
    """Turns token ids into text one at a time, holding back incomplete multi-byte characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.special = {}
        # Dense code-point -> id table for vectorised encoding of whole corpora.
        self._table = np.full(max(map(ord, self.chars), default=0) + 1, -1, dtype=np.int64)
        for i, c in enumerate(self.chars):
            self._table[ord(c)] = i

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        if not text:
            raise UserError("cannot build a character vocabulary from an empty corpus")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        in_table = codes < len(self._table)
        ids = np.full(codes.shape, -1, dtype=np.int64)
        ids[in_table] = self._table[codes[in_table]]
        if (ids < 0).any():
            bad = chr(int(codes[np.argmax(ids < 0)]))
            raise UserError(
                f"character {bad!r} (U+{ord(bad):04X}) is not in this model's character vocabulary"
            )
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return self.chars[token_id].encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        chars = _need(d, "chars", list, "a list of single characters")
        if not chars:
            raise UserError("field 'chars' is empty: a character vocabulary needs at least one character")
        for i, c in enumerate(chars):
            if not isinstance(c, str) or len(c) != 1:
                raise UserError(f"chars[{i}] must be a single character, got {_show(c)}")
            if 0xD800 <= ord(c) <= 0xDFFF:  # a lone surrogate cannot be encoded as UTF-8 text
                raise UserError(f"chars[{i}] is a lone surrogate (U+{ord(c):04X}), not a character")
        repeated = [c for c, n in Counter(chars).items() if n > 1]
        if repeated:
            raise UserError(f"field 'chars' lists {_show(repeated[0])} more than once")
        return cls(chars)


class HFByteLevelTokenizer(Tokenizer):
    """Byte-level BPE in a HF `tokenizers` object: trained on the corpus (kind "bpe")."""

    kind = "bpe"

    def __init__(self, hf: Any):
        self.hf = hf
        self._byte_of = unicode_to_bytes()
        self.special = {}
        for tok, role in SPECIAL_ROLES.items():
            tid = hf.token_to_id(tok)
            if tid is not None:
                self.special[role] = tid
        self._special_ids = {i: name for name, i in ((t, hf.token_to_id(t)) for t in SPECIAL_TOKENS) if i is not None}

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int, show_progress: bool = False) -> HFByteLevelTokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._special_ids:
            return self._special_ids[token_id].encode()
        tok = self.hf.id_to_token(token_id)
        if tok is None:
            raise UserError(f"token id {token_id} is outside this vocabulary")
        return bytes(self._byte_of[c] for c in tok)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "hf": json.loads(self.hf.to_str())}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HFByteLevelTokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        payload = _need(d, "hf", dict, "a HF tokenizers object")
        model = payload.get("model")
        if isinstance(model, dict) and model.get("type", "BPE") != "BPE":
            raise UserError(f"the 'hf' tokenizer is a {_show(model.get('type'))} model, not byte-level BPE")
        with _foreign("HF tokenizers refuses the BPE tokenizer"):
            hf = HFTokenizer.from_str(json.dumps(payload))
            vocab = hf.get_vocab()
        _check_byte_level(vocab)
        return cls(hf)


def _check_byte_level(vocab: dict[str, int]) -> None:
    """Every token of a byte-level vocabulary is a special token or spelled in GPT-2's byte alphabet;
    anything else could not be decoded back to bytes."""
    if not vocab:
        raise UserError("the vocabulary is empty")
    alphabet = unicode_to_bytes()
    for tok in vocab:
        if tok not in SPECIAL_TOKENS and (not tok or any(c not in alphabet for c in tok)):
            raise UserError(f"token {_show(tok)} is not a byte-level BPE token")


def _check_gpt2_vocab(encoder: dict[str, Any], merges: list[Any]) -> None:
    """What tiktoken needs to encode without a Rust panic: ids 0..N-1, byte-level tokens, and a
    token for every single byte (the pieces a merge-less word falls back to)."""
    for tok, i in encoder.items():
        if not isinstance(i, int) or isinstance(i, bool):
            raise UserError(f"the id of token {_show(tok)} must be an integer, got {_show(i)}")
    if sorted(encoder.values()) != list(range(len(encoder))):
        raise UserError("token ids must be 0..N-1, each used once")
    _check_byte_level(encoder)
    missing = [c for c in bytes_to_unicode().values() if c not in encoder]
    if missing:
        raise UserError(f"{len(missing)} of the 256 single-byte tokens are missing (for example {missing[0]!r})")
    bad = next((m for m in merges if not isinstance(m, str)), None)
    if bad is not None:
        raise UserError(f"merges must be strings, got {_show(bad)}")


class GPT2Tokenizer(Tokenizer):
    """The GPT-2 vocabulary (encoder.json + vocab.bpe), encoded exactly as GPT-2 does via tiktoken."""

    kind = "gpt2"

    def __init__(self, encoder: dict[str, int], merges: list[str]):
        import tiktoken

        _check_gpt2_vocab(encoder, merges)
        self.encoder = encoder
        self.merges = merges
        byte_of = unicode_to_bytes()
        # In GPT-2's files a token's id is its merge rank, so the encoder is tiktoken's rank table.
        ranks = {bytes(byte_of[c] for c in tok): i for tok, i in encoder.items() if tok != EOT}
        eot = encoder.get(EOT, len(encoder) - 1)
        with _foreign("tiktoken refuses the GPT-2 vocabulary"):
            self._enc = tiktoken.Encoding("gpt2-slmkit", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                          special_tokens={EOT: eot})
        self._bytes = [b""] * len(encoder)
        for b, i in ranks.items():
            self._bytes[i] = b
        self._bytes[eot] = EOT.encode()
        self.special = {"eot": eot}

    @classmethod
    def from_files(cls, vocab_dir: str | Path) -> GPT2Tokenizer:
        from slmkit.fileio import read_json, read_utf8

        d = Path(vocab_dir)
        enc_path, bpe_path = d / "encoder.json", d / "vocab.bpe"
        for p in (enc_path, bpe_path):
            if not p.is_file():
                raise UserError(f"GPT-2 vocabulary file not found: {p} (--vocab-dir needs encoder.json and vocab.bpe)")
        encoder = read_json(enc_path, "GPT-2 vocabulary file")
        if not isinstance(encoder, dict):
            raise UserError(f"{enc_path} must map tokens to ids, got {type(encoder).__name__}")
        merges = [ln for ln in read_utf8(bpe_path, "GPT-2 merges file").splitlines()[1:] if ln.strip()]
        try:
            return cls(encoder, merges)
        except UserError as exc:
            raise UserError(f"{enc_path}: {exc}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPT2Tokenizer:
        encoder = _need(d, "encoder", dict, "a map of tokens to ids")
        merges = _need(d, "merges", list, "a list of merges")
        return cls(encoder, merges)

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=_threads())

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < len(self._bytes):
            raise UserError(f"token id {token_id} is outside this vocabulary")
        return self._bytes[token_id]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "encoder": self.encoder, "merges": self.merges}


# Other kinds (the GPT-1 vocabulary) register themselves here from their own modules.
TOKENIZER_KINDS: dict[str, Any] = {
    "char": CharTokenizer.from_dict,
    "bpe": HFByteLevelTokenizer.from_dict,
    "gpt2": GPT2Tokenizer.from_dict,
}


# Named tokenizers that live in other modules: name -> loader(vocab_dir) (filled in by those modules).
NAMED_TOKENIZERS: dict[str, Any] = {}
# Where a kind that registers itself is defined, imported on first use.
_KIND_MODULES = {"gpt1": "slmkit.interop.gpt1_tokenizer", "with-specials": "slmkit.finetune.heads"}


def _import_kind(kind: Any) -> None:
    # `kind` may come from a file: only a known name (a string) ever leads to an import.
    if isinstance(kind, str) and kind in _KIND_MODULES and kind not in TOKENIZER_KINDS:
        import importlib

        try:
            importlib.import_module(_KIND_MODULES[kind])
        except ImportError as exc:
            raise UserError(f"the {kind} tokenizer needs {exc.name or 'a module'}, which is not installed") from None


def has_named_tokenizer(name: str) -> bool:
    _import_kind(name)
    return name in NAMED_TOKENIZERS


def tokenizer_from_dict(d: dict[str, Any], where: str = "saved tokenizer") -> Tokenizer:
    """A tokenizer from its `to_dict()` form; malformed data is a one-line UserError naming `where`."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind is None:
        raise UserError(f"{where}: not a tokenizer (expected a JSON object with a 'kind' field)")
    _import_kind(kind)
    if not isinstance(kind, str) or kind not in TOKENIZER_KINDS:
        raise UserError(f"{where}: unknown tokenizer kind {_show(kind)}; known: {', '.join(sorted(TOKENIZER_KINDS))}")
    try:
        return TOKENIZER_KINDS[kind](d)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    # Kinds registered by other modules read fields directly: a missing or mistyped one surfaces
    # as one of these, which here can only mean a malformed file.
    except KeyError as exc:
        raise UserError(f"{where}: malformed {kind} tokenizer: missing or unknown entry {exc}") from None
    except (TypeError, ValueError, AttributeError, IndexError, OverflowError, RecursionError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{where}: malformed {kind} tokenizer: {reason}") from None


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    from slmkit.fileio import atomic_write_text

    atomic_write_text(Path(path), json.dumps(tok.to_dict(), ensure_ascii=False))


def load_tokenizer(path: str | Path) -> Tokenizer:
    from slmkit.fileio import read_utf8

    p = Path(path)
    if not p.is_file():
        raise UserError(f"tokenizer file not found: {p}")
    text = read_utf8(p, "tokenizer file")
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        why = f"line {exc.lineno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise UserError(f"tokenizer file {p} is corrupted: not valid JSON ({why})") from None
    return tokenizer_from_dict(d, where=f"tokenizer file {p}")


def named_tokenizer(name: str, vocab_dir: str = "") -> Tokenizer:
    """Tokenizers that exist without a corpus: `gpt2` (needs --vocab-dir), and registered ones (`gpt1`)."""
    _import_kind(name)
    if name in NAMED_TOKENIZERS:
        if not vocab_dir:
            raise UserError(f"the {name} tokenizer needs a vocabulary folder (vocab_dir)")
        return NAMED_TOKENIZERS[name](vocab_dir)
    if name == "gpt2":
        if not vocab_dir:
            raise UserError("the gpt2 tokenizer needs --vocab-dir DIR holding encoder.json and vocab.bpe")
        return GPT2Tokenizer.from_files(vocab_dir)
    raise UserError(f"no named tokenizer {name!r}; use a run directory or gpt2 with --vocab-dir")
