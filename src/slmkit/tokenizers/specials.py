"""A base tokenizer grown by appended special tokens (kind "with-specials"): what fine-tuning makes
of a vocabulary without start / delimiter / extract. Growing the model's rows to match is the
model's business (`slmkit.finetune.heads.add_special_tokens`); this is only the vocabulary."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slmkit.errors import UserError
from slmkit.tokenizers.base import SPECIAL_ROLES, Tokenizer


class WithSpecialsTokenizer(Tokenizer):
    """A base tokenizer plus appended special tokens (ids offset, offset+1, ...): kind "with-specials"."""

    kind = "with-specials"

    def __init__(self, base: Tokenizer, offset: int, tokens: list[str]):
        if offset < base.vocab_size:
            raise UserError(f"special tokens must come after the base vocabulary ({base.vocab_size}), not at {offset}")
        self.base, self.offset, self.tokens = base, offset, list(tokens)
        self.special = dict(base.special)
        for i, tok in enumerate(self.tokens):
            self.special[SPECIAL_ROLES[tok]] = offset + i

    @property
    def vocab_size(self) -> int:
        return self.offset + len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.base.encode_batch(texts)

    def token_bytes(self, token_id: int) -> bytes:
        if token_id >= self.offset:
            if token_id >= self.vocab_size:
                raise UserError(f"token id {token_id} is outside this vocabulary")
            return self.tokens[token_id - self.offset].encode()
        if token_id >= self.base.vocab_size:
            return b""  # rows between the base vocabulary and the model's padded size
        return self.base.token_bytes(token_id)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "base": self.base.to_dict(), "offset": self.offset, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any], load_base: Callable[[dict[str, Any]], Tokenizer]) -> WithSpecialsTokenizer:
        """`load_base` reads the base's dict, which may be of any kind: the registry passes its own
        `tokenizer_from_dict`, so this module needs no import of the table that lists it."""
        return cls(load_base(d["base"]), int(d["offset"]), list(d["tokens"]))

    def describe(self) -> str:
        return f"{self.base.describe()} + {len(self.tokens)} fine-tuning tokens"
