"""The GPT-1 vocabulary (kind "gpt1"): BPE with `</w>` word ends over lower-cased, punctuation-split text.

The original code (openai/finetune-transformer-lm) ran ftfy and spaCy before BPE. Hugging Face's
`OpenAIGPTTokenizer` (transformers 5) does what its BERT basic tokenizer did when those two are
missing, and this is the path implemented here, written from the description of the pipeline:

1. clean: drop NUL, U+FFFD and control characters; every other whitespace character becomes " ";
2. put spaces around CJK ideographs;
3. strip accents (NFD, drop non-spacing marks), then lower-case, one character at a time;
4. split on whitespace and isolate every punctuation character (ASCII punctuation or Unicode P*);
5. BPE each word: its characters, the last one carrying `</w>`, merged by rank;
   a symbol not in the vocabulary becomes token 0 (`<unk>`), as in HF and the original code.

The three fine-tuning tokens (start, delimiter, extract) follow the 40,478 vocabulary entries,
as in the release: ids 40478, 40479, 40480.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slmkit.errors import UserError
from slmkit.tokenizers.base import DELIM, EXTRACT, SPECIAL_ROLES, START, Tokenizer

EOW = "</w>"
GPT1_SPECIALS = (START, DELIM, EXTRACT)
_ASCII_PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F
    )


def _is_punct(c: str) -> bool:
    return c in _ASCII_PUNCT or unicodedata.category(c).startswith("P")


def _normalize_char(c: str) -> str:
    """What one input character becomes before splitting on spaces (punctuation padded with spaces)."""
    cp = ord(c)
    if c in "\t\n\r":
        return " "
    if cp == 0 or cp == 0xFFFD or unicodedata.category(c).startswith("C"):
        return ""
    if c.isspace():
        return " "
    if _is_cjk(cp):
        return f" {c} "
    out = []
    for d in unicodedata.normalize("NFD", c):
        if unicodedata.category(d) == "Mn":
            continue
        for low in d.lower():
            out.append(f" {low} " if _is_punct(low) else low)
    return "".join(out)


class _CharTable(dict):
    """A lazily filled `str.translate` table: code point -> normalised text."""

    def __missing__(self, cp: int) -> str:
        value = self[cp] = _normalize_char(chr(cp))
        return value


_TABLE = _CharTable()


def basic_words(text: str) -> list[str]:
    """Steps 1-4: the words BPE sees."""
    return text.translate(_TABLE).split()


class GPT1Tokenizer(Tokenizer):
    """GPT-1's 40,478-entry BPE vocabulary plus its three fine-tuning tokens."""

    kind = "gpt1"

    def __init__(self, encoder: dict[str, int], merges: list[str], specials: Iterable[str] = GPT1_SPECIALS):
        self.encoder = dict(encoder)
        self.merges = list(merges)
        self.specials = list(specials)
        n = len(self.encoder)
        if sorted(self.encoder.values()) != list(range(n)):
            raise UserError("GPT-1 vocabulary ids must be 0..N-1 without gaps")
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.special_ids = {name: n + k for k, name in enumerate(self.specials)}
        self.special = {SPECIAL_ROLES[name]: i for name, i in self.special_ids.items() if name in SPECIAL_ROLES}
        self._names = {i: name for name, i in self.special_ids.items()}
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, line in enumerate(self.merges):
            parts = line.split()
            if len(parts) != 2:
                raise UserError(f"GPT-1 merges: line {rank + 1} is not two symbols: {line!r}")
            self.ranks[(parts[0], parts[1])] = rank
        self.unk = self.decoder.get(0, "<unk>")
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_files(cls, folder: str | Path) -> GPT1Tokenizer:
        """`encoder_bpe_40000.json` + `vocab_40000.bpe` (the release), or HF's `vocab.json` + `merges.txt`."""
        d = Path(folder)
        for enc_name, bpe_name in (("encoder_bpe_40000.json", "vocab_40000.bpe"), ("vocab.json", "merges.txt")):
            if (d / enc_name).is_file() and (d / bpe_name).is_file():
                return cls(read_json_vocab(d / enc_name), read_merges(d / bpe_name))
        raise UserError(f"GPT-1 vocabulary not found in {d}: need encoder_bpe_40000.json + vocab_40000.bpe")

    @property
    def base_size(self) -> int:
        return len(self.encoder)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder) + len(self.specials)

    def bpe(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        symbols = [*word[:-1], word[-1] + EOW]
        symbols = [s if s in self.encoder else self.unk for s in symbols]
        ranks = self.ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:], strict=False):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            a, b = best
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.encoder.get(s, 0) for s in symbols]
        if len(self._cache) < 200_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for word in basic_words(text):
            out.extend(self.bpe(word))
        return out

    def token_string(self, token_id: int) -> str:
        if token_id in self._names:
            return self._names[token_id]
        if token_id not in self.decoder:
            raise UserError(f"token id {token_id} is outside this vocabulary")
        return self.decoder[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        tok = self.token_string(token_id)
        return (tok[: -len(EOW)] + " " if tok.endswith(EOW) else tok).encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        """Word ends become spaces, with none after the last word (as HF's BPEDecoder)."""
        text = super().decode(ids)
        return text[:-1] if text.endswith(" ") else text

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "encoder": self.encoder, "merges": self.merges, "specials": self.specials}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPT1Tokenizer:
        return cls(d["encoder"], d["merges"], d.get("specials", GPT1_SPECIALS))


def read_json_vocab(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(vocab, dict):
        raise UserError(f"{path} must hold a JSON object of token -> id")
    return vocab


def read_merges(path: Path) -> list[str]:
    """Merge lines `a b`, without the `#version` header and blank lines."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [ln for ln in lines if ln.strip()]

