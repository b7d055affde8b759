"""Character-level tokenizer (kind "char"): one id per distinct character of the corpus."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from slmkit.errors import UserError, show
from slmkit.tokenizers.base import Tokenizer, need_field


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
        chars = need_field(d, "chars", list, "a list of single characters")
        if not chars:
            raise UserError("field 'chars' is empty: a character vocabulary needs at least one character")
        for i, c in enumerate(chars):
            if not isinstance(c, str) or len(c) != 1:
                raise UserError(f"chars[{i}] must be a single character, got {show(c)}")
            if 0xD800 <= ord(c) <= 0xDFFF:  # a lone surrogate cannot be encoded as UTF-8 text
                raise UserError(f"chars[{i}] is a lone surrogate (U+{ord(c):04X}), not a character")
        repeated = [c for c, n in Counter(chars).items() if n > 1]
        if repeated:
            raise UserError(f"field 'chars' lists {show(repeated[0])} more than once")
        return cls(chars)
