"""The tokenizer kinds: one static table, complete on import, no higher layer imported, and every
kind's saved form loads back to the same encodings."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_file

import slmkit.tokenizers as tokenizers
from slmkit.tokenizers import (
    KINDS,
    CharTokenizer,
    GPT1Tokenizer,
    GPT2Tokenizer,
    HFByteLevelTokenizer,
    Tokenizer,
    WithSpecialsTokenizer,
    tokenizer_from_dict,
)

ALL_KINDS = ["bpe", "char", "gpt1", "gpt2", "with-specials"]
HIGHER = ("slmkit.finetune", "slmkit.interop", "slmkit.train", "slmkit.checkpoint")
SAMPLE = "Hello, world! The quick brown fox jumps over the lazy dog — naïve café, 42 times.\n"


def test_importing_the_package_alone_lists_every_kind_and_no_higher_layer():
    code = ("import slmkit.tokenizers as t, sys; print(sorted(t.KINDS)); "
            f"print([m for m in sys.modules if m.startswith({HIGHER!r})])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    kinds, higher = out.splitlines()
    assert kinds == repr(ALL_KINDS)
    assert higher == "[]"


def test_the_table_is_read_only():
    with pytest.raises(TypeError):
        KINDS["klingon"] = CharTokenizer.from_dict  # type: ignore[index]


def test_the_package_imports_no_higher_layer_and_no_module_by_name():
    # Read the sources: an import inside a function would not show in the subprocess test above.
    higher = re.compile(r"^\s*(from|import)\s+slmkit\.(finetune|interop|checkpoint|train|data|cli)\b", re.M)
    for path in Path(tokenizers.__file__).parent.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not higher.search(text), path.name
        assert "importlib" not in text and "__import__" not in text, path.name


def _char() -> Tokenizer:
    return CharTokenizer.train(SAMPLE)


def _bpe() -> Tokenizer:
    return HFByteLevelTokenizer.train(iter([SAMPLE * 20]), vocab_size=300)


def _gpt2() -> Tokenizer:
    return GPT2Tokenizer.from_files(shared_file("vocab", "gpt2"))


def _gpt1() -> Tokenizer:
    return GPT1Tokenizer.from_files(shared_file("vocab", "gpt1"))


def _with_specials() -> Tokenizer:
    base = _char()
    return WithSpecialsTokenizer(base, base.vocab_size + 2, ["<|start|>", "<|delim|>", "<|extract|>"])


MAKERS = {"char": _char, "bpe": _bpe, "gpt2": _gpt2, "gpt1": _gpt1, "with-specials": _with_specials}


def test_every_kind_has_a_round_trip_below():
    assert sorted(MAKERS) == sorted(KINDS)


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_saved_form_loads_back_to_the_same_encodings(kind):
    tok = MAKERS[kind]()
    assert tok.kind == kind
    saved = json.loads(json.dumps(tok.to_dict(), ensure_ascii=False))  # as it travels in a run folder
    assert saved["kind"] == kind
    again = tokenizer_from_dict(saved)
    assert type(again) is type(tok)
    assert again.to_dict() == tok.to_dict() and again.fingerprint() == tok.fingerprint()
    assert again.vocab_size == tok.vocab_size and again.special == tok.special
    ids = tok.encode(SAMPLE)
    assert again.encode(SAMPLE) == ids and again.decode(ids) == tok.decode(ids)
