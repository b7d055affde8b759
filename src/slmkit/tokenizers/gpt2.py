"""The GPT-2 vocabulary (kind "gpt2"): encoder.json + vocab.bpe, encoded by tiktoken, the fastest
exact encoder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from slmkit.errors import UserError, show
from slmkit.tokenizers.base import (
    EOT,
    Tokenizer,
    bytes_to_unicode,
    check_byte_level,
    foreign_errors,
    need_field,
    unicode_to_bytes,
)

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _check_gpt2_vocab(encoder: dict[str, Any], merges: list[Any]) -> None:
    """What tiktoken needs to encode without a Rust panic: ids 0..N-1, byte-level tokens, and a
    token for every single byte (the pieces a merge-less word falls back to)."""
    for tok, i in encoder.items():
        if not isinstance(i, int) or isinstance(i, bool):
            raise UserError(f"the id of token {show(tok)} must be an integer, got {show(i)}")
    if sorted(encoder.values()) != list(range(len(encoder))):
        raise UserError("token ids must be 0..N-1, each used once")
    check_byte_level(encoder)
    missing = [c for c in bytes_to_unicode().values() if c not in encoder]
    if missing:
        raise UserError(f"{len(missing)} of the 256 single-byte tokens are missing (for example {missing[0]!r})")
    bad = next((m for m in merges if not isinstance(m, str)), None)
    if bad is not None:
        raise UserError(f"merges must be strings, got {show(bad)}")


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
        with foreign_errors("tiktoken refuses the GPT-2 vocabulary"):
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
        encoder = need_field(d, "encoder", dict, "a map of tokens to ids")
        merges = need_field(d, "merges", list, "a list of merges")
        return cls(encoder, merges)

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=_threads())

    def encode_array(self, text: str) -> Any:
        """encode() as a numpy array, without a Python list in between (corpus preparation)."""
        to_numpy = getattr(self._enc, "encode_to_numpy", None)  # tiktoken >= 0.8
        if to_numpy is None:
            import numpy as np

            return np.asarray(self.encode(text), dtype=np.uint32)
        return to_numpy(text, allowed_special=set(), disallowed_special=())  # no special: encode_ordinary

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < len(self._bytes):
            raise UserError(f"token id {token_id} is outside this vocabulary")
        return self._bytes[token_id]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "encoder": self.encoder, "merges": self.merges}
