"""What every tokenizer kind shares: the `Tokenizer` interface, streaming decode, the special
tokens and their roles, GPT-2's byte alphabet, and the checks that turn bad saved data into
one-line UserErrors."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from functools import cache
from typing import Any

from slmkit.errors import UserError, show

# The fine-tuning tokens of GPT-1 (start `s`, delimiter `$`, extract `e`) plus end of text.
EOT, START, DELIM, EXTRACT = "<|endoftext|>", "<|start|>", "<|delim|>", "<|extract|>"
SPECIAL_TOKENS = (EOT, START, DELIM, EXTRACT)
SPECIAL_ROLES = {EOT: "eot", START: "start", DELIM: "delim", EXTRACT: "extract"}


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


def need_field(d: dict[str, Any], name: str, kind: type, what: str) -> Any:
    """Field `name` of a saved tokenizer, of type `kind`, or a one-line error."""
    if name not in d:
        raise UserError(f"missing field {name!r}")
    value = d[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"field {name!r} must be {what}, got {show(value)}")
    return value


@contextlib.contextmanager
def foreign_errors(what: str) -> Iterator[None]:
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


def check_byte_level(vocab: dict[str, int]) -> None:
    """Every token of a byte-level vocabulary is a special token or spelled in GPT-2's byte alphabet;
    anything else could not be decoded back to bytes."""
    if not vocab:
        raise UserError("the vocabulary is empty")
    alphabet = unicode_to_bytes()
    for tok in vocab:
        if tok not in SPECIAL_TOKENS and (not tok or any(c not in alphabet for c in tok)):
            raise UserError(f"token {show(tok)} is not a byte-level BPE token")


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
