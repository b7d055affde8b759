"""The static table of tokenizer kinds, and loading / saving tokenizers by kind or by name.

Every kind is listed here, in one place: nothing registers itself on import, so a saved
tokenizer loads the same whatever else the program has imported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from slmkit.errors import UserError, show
from slmkit.tokenizers.base import Tokenizer
from slmkit.tokenizers.bpe import HFByteLevelTokenizer
from slmkit.tokenizers.char import CharTokenizer
from slmkit.tokenizers.gpt1 import GPT1Tokenizer
from slmkit.tokenizers.gpt2 import GPT2Tokenizer
from slmkit.tokenizers.specials import WithSpecialsTokenizer


def _with_specials_from_dict(d: dict[str, Any]) -> WithSpecialsTokenizer:
    # The wrapped base is itself a saved tokenizer of any kind: read it through this same table.
    return WithSpecialsTokenizer.from_dict(d, load_base=tokenizer_from_dict)


# kind (the "kind" field of a saved tokenizer) -> its reader. Read-only: kinds are added here, not at run time.
KINDS: Mapping[str, Callable[[dict[str, Any]], Tokenizer]] = MappingProxyType({
    CharTokenizer.kind: CharTokenizer.from_dict,
    HFByteLevelTokenizer.kind: HFByteLevelTokenizer.from_dict,
    GPT2Tokenizer.kind: GPT2Tokenizer.from_dict,
    GPT1Tokenizer.kind: GPT1Tokenizer.from_dict,
    WithSpecialsTokenizer.kind: _with_specials_from_dict,
})

# Tokenizers that exist without a corpus, read from a vocabulary folder: name -> loader(vocab_dir).
NAMED: Mapping[str, Callable[[str], Tokenizer]] = MappingProxyType({
    "gpt2": GPT2Tokenizer.from_files,
    "gpt1": GPT1Tokenizer.from_files,
})
# What to say when a named tokenizer is asked for without its folder (gpt2's is the CLI flag).
_NEEDS_FOLDER = {"gpt2": "the gpt2 tokenizer needs --vocab-dir DIR holding encoder.json and vocab.bpe"}


def has_named_tokenizer(name: str) -> bool:
    return name in NAMED


def tokenizer_from_dict(d: dict[str, Any], where: str = "saved tokenizer") -> Tokenizer:
    """A tokenizer from its `to_dict()` form; malformed data is a one-line UserError naming `where`."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind is None:
        raise UserError(f"{where}: not a tokenizer (expected a JSON object with a 'kind' field)")
    if not isinstance(kind, str) or kind not in KINDS:
        raise UserError(f"{where}: unknown tokenizer kind {show(kind)}; known: {', '.join(sorted(KINDS))}")
    try:
        return KINDS[kind](d)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    # The gpt1 and with-specials readers read fields directly: a missing or mistyped one surfaces
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
    """Tokenizers that exist without a corpus (`gpt2`, `gpt1`), read from their vocabulary folder."""
    if name not in NAMED:
        raise UserError(f"no named tokenizer {name!r}; use a run directory or gpt2 with --vocab-dir")
    if not vocab_dir:
        raise UserError(_NEEDS_FOLDER.get(name, f"the {name} tokenizer needs a vocabulary folder (vocab_dir)"))
    return NAMED[name](vocab_dir)
