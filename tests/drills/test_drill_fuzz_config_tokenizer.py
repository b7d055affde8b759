"""Property drills: whatever a config file, a numeric flag, a sampling option or a tokenizer file
holds, slmkit either accepts it (and the result is usable) or refuses it with a UserError, never
another exception. Only parse / validate paths run: no model is ever built from fuzzed input.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from slmkit.config import SECTIONS, RunConfig, resolve_config
from slmkit.errors import UserError
from slmkit.generate import GREEDY_BELOW, GenerationConfig, next_token
from slmkit.tokenizers import (
    EOT,
    CharTokenizer,
    HFByteLevelTokenizer,
    Tokenizer,
    bytes_to_unicode,
    load_tokenizer,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELD_NAMES = sorted({f for cls in SECTIONS.values() for f in cls.__dataclass_fields__})

# ----------------------------------------------------------------------------- values of every type

NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1e-45, 1e30, 1e308]),
)
SCALARS = st.one_of(NUMBERS, st.booleans(), st.text(max_size=12),
                    st.sampled_from(["nan", "inf", "-1", "1e30", "true", "pre", "char", "cpu", "4"]))
# Values that are often valid, so that accepted configs are checked as well as refused ones.
PLAUSIBLE = st.one_of(st.integers(0, 300), st.floats(0, 1), st.sampled_from(["pre", "post", "char", "exact", "auto"]))
VALUES = st.one_of(PLAUSIBLE, PLAUSIBLE, SCALARS, st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8))
KNOWN = st.dictionaries(st.sampled_from(FIELD_NAMES), VALUES, max_size=5)
UNKNOWN = st.dictionaries(st.one_of(st.sampled_from(["preset", "nope", "n_layers", ""]), st.text(max_size=8)),
                          VALUES, max_size=1)
# Flat keys, [section] tables (now and then a section given a plain value), and now and then an
# unknown key.
CONFIG_MAPPINGS = st.builds(
    lambda flat, sections, extra: {**flat, **sections, **extra},
    KNOWN,
    st.one_of(st.fixed_dictionaries({}, optional={
        name: st.dictionaries(st.sampled_from(sorted(cls.__dataclass_fields__)), VALUES, max_size=3)
        for name, cls in SECTIONS.items()}), st.dictionaries(st.sampled_from(list(SECTIONS)), KNOWN, max_size=1)),
    st.one_of(st.just({}), st.just({}), st.just({}), st.just({}), UNKNOWN,
              st.dictionaries(st.sampled_from(list(SECTIONS)), SCALARS, max_size=1)),
)

def toml_value(v: Any) -> str:
    """A value in TOML syntax (tomllib reads NaN and infinities; a 70-digit int is a parse error)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else "inf" if v == math.inf else "-inf" if v == -math.inf else repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_string(s: str) -> str:
    # JSON's control-character escapes are TOML's too; DEL must be escaped in TOML, not in JSON.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_text(mapping: dict[str, Any]) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in mapping.items())


def yaml_text(mapping: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(mapping, allow_unicode=True)


_SCRATCH: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _scratch(tmp_path_factory):
    """One folder for every example (Hypothesis runs many per test; tmp_path is per test)."""
    _SCRATCH.append(tmp_path_factory.mktemp("fuzz"))
    yield
    _SCRATCH.pop()


def write(suffix: str, content: str | bytes) -> Path:
    """The input file of this example (examples run one after another, so one name is reused)."""
    path = _SCRATCH[-1] / f"input{suffix}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- (a) config files


def assert_valid(cfg: RunConfig) -> None:
    cfg.validate()
    m, t = cfg.model, cfg.train
    assert 1 <= m.n_layer <= 4096 and 1 <= m.block_size <= 2**20 and m.n_embd % m.n_head == 0
    assert 0 <= t.seed < 2**63 and t.learning_rate > 0
    for section in (m, cfg.data, t):
        for name in type(section).__dataclass_fields__:
            v = getattr(section, name)
            assert not isinstance(v, float) or math.isfinite(v), name


@FUZZ
@given(mapping=CONFIG_MAPPINGS, fmt=st.sampled_from([".toml", ".yaml"]))
def test_any_config_file_is_a_valid_config_or_a_user_error(mapping, fmt):
    text = toml_text(mapping) if fmt == ".toml" else yaml_text(mapping)
    path = write(fmt, text)
    try:
        cfg = resolve_config(None, str(path), {})
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert_valid(cfg)


@FUZZ
@given(content=st.binary(max_size=200), fmt=st.sampled_from([".toml", ".yaml", ".yml"]))
def test_any_bytes_as_a_config_file_are_a_config_or_a_user_error(content, fmt):
    try:
        cfg = resolve_config(None, str(write(fmt, content)), {})
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert_valid(cfg)


# ----------------------------------------------------------------------------- (b) CLI flags, sampling options

NUMERIC_FLAGS = ["--n-layer", "--n-head", "--n-embd", "--n-inner", "--block-size", "--dropout", "--attn-dropout",
                 "--vocab-size", "--val-fraction"]
FLAG_VALUES = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(max_size=10),
    st.sampled_from(["nan", "-inf", "1e30", "0x10", "1_000", " 7 ", "", "-0", "4096", "4097", "８"]),
)


class _Built(Exception):
    """Raised instead of building the model: the flags were accepted."""


def _refuse_to_build(cfg):
    """Stands in for GPT in `slm info`: checks the config, then stops before any allocation."""
    cfg.validate()
    raise _Built


@FUZZ
@given(flags=st.lists(st.tuples(st.sampled_from(NUMERIC_FLAGS), FLAG_VALUES), min_size=1, max_size=3))
def test_numeric_flags_of_slm_info_are_accepted_or_a_clear_error(flags):
    import slmkit.model
    from slmkit.cli import main

    argv = ["info", *(f"{flag}={value}" for flag, value in flags)]
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(slmkit.model, "GPT", _refuse_to_build)
        try:
            main(argv)
        except _Built:
            return
        except SystemExit as exc:
            code = exc.code
        else:
            pytest.fail("slm info returned without reaching the model")
    lines = err.getvalue().splitlines()
    assert "Traceback" not in err.getvalue()
    if code == 1:  # ours: exactly one line
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
    else:  # argparse: usage, then one error line
        assert code == 2 and lines[-1].startswith("slm info: error: "), lines


FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, 1e-45, 5e-324, 1e-5, 0.8, 1.0, 1e300]), st.integers(-3, 3))
INTS = st.one_of(st.integers(min_value=-(2**65), max_value=2**65), st.integers(-2, 50), st.booleans())


@FUZZ
@given(temperature=FLOATS, top_p=FLOATS, top_k=INTS, max_new_tokens=INTS, num_samples=INTS,
       seed=st.one_of(st.none(), INTS), logits=st.lists(
           st.floats(min_value=-1e30, max_value=1e30), min_size=2, max_size=12))
def test_sampling_options_are_refused_or_give_a_real_token(temperature, top_p, top_k, max_new_tokens, num_samples,
                                                            seed, logits):
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           num_samples=num_samples, seed=seed)
    try:
        gen.validate()
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert math.isfinite(temperature) and temperature >= 0 and 0 < top_p <= 1 and top_k >= 0
    rng = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.tensor(logits)
    token = next_token(x, gen, rng)
    assert 0 <= token < len(logits)
    if temperature < GREEDY_BELOW:
        assert x[token] == x.max()


# ----------------------------------------------------------------------------- (c) tokenizer files


def _bases() -> dict[str, dict[str, Any]]:
    byte_chars = list(bytes_to_unicode().values())
    return {
        "char": CharTokenizer.train("hello world\n").to_dict(),
        "bpe": HFByteLevelTokenizer.train(iter(["hello world " * 20]), vocab_size=270).to_dict(),
        "gpt2": {"kind": "gpt2", "encoder": {**{c: i for i, c in enumerate(byte_chars)}, EOT: 256}, "merges": []},
        "with-specials": {"kind": "with-specials", "base": CharTokenizer.train("ab").to_dict(), "offset": 2,
                          "tokens": ["<|start|>"]},
    }


BASES = _bases()
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=10,
)
FIELDS = st.sampled_from(["kind", "chars", "hf", "encoder", "merges", "base", "offset", "tokens", "specials"])


@st.composite
def mutated_tokenizers(draw) -> Any:
    """A real tokenizer dict with a few fields replaced or removed, or its hf / encoder inner parts
    damaged: the near-misses a hand edit or a bad conversion produces."""
    d = json.loads(json.dumps(BASES[draw(st.sampled_from(sorted(BASES)))]))
    for _ in range(draw(st.integers(1, 3))):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            d[draw(FIELDS)] = draw(JSONISH)
        elif choice == 1:
            d.pop(draw(FIELDS), None)
        elif choice == 2 and isinstance(d.get("hf"), dict) and isinstance(d["hf"].get("model"), dict):
            d["hf"]["model"][draw(st.sampled_from(["type", "vocab", "merges", "unk_token"]))] = draw(JSONISH)
        elif choice == 3 and isinstance(d.get("encoder"), dict) and d["encoder"]:
            key = draw(st.sampled_from(sorted(d["encoder"])))
            d["encoder"][draw(st.one_of(st.just(key), st.text(max_size=3)))] = draw(JSONISH)
    return d


def exercise(tok: Tokenizer) -> None:
    """A loaded tokenizer must work: every call gives a result or a UserError."""
    assert tok.vocab_size > 0
    tok.fingerprint()
    tok.describe()
    text = tok.decode(range(min(tok.vocab_size, 8)))
    assert isinstance(text, str)
    for sample in (text, "hello", ""):
        try:
            ids = tok.encode(sample)
        except UserError:
            continue
        assert all(0 <= i < tok.vocab_size for i in ids)
        tok.decode(ids)
        tok.token_strings(ids)


@FUZZ
@given(payload=st.one_of(mutated_tokenizers(), JSONISH,
                         st.fixed_dictionaries({"kind": st.sampled_from(["char", "bpe", "gpt2", "gpt1"])},
                                               optional={"chars": JSONISH, "hf": JSONISH, "encoder": JSONISH,
                                                         "merges": JSONISH})))
def test_any_tokenizer_json_loads_a_working_tokenizer_or_is_a_user_error(payload):
    path = write(".json", json.dumps(payload))
    try:
        tok = load_tokenizer(path)
    except UserError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    exercise(tok)


@FUZZ
@given(content=st.one_of(st.binary(max_size=300),
                         st.sampled_from(list(BASES.values())).map(lambda d: json.dumps(d).encode()),
                         ).flatmap(lambda b: st.tuples(st.just(b), st.integers(0, max(len(b), 1)))))
def test_truncated_or_random_bytes_as_tokenizer_json_are_a_user_error(content):
    data, cut = content
    assume(cut < len(data) or not data)  # a whole real file is the only valid input here
    path = write(".json", data[:cut])
    with pytest.raises(UserError) as exc:
        load_tokenizer(path)
    assert "\n" not in str(exc.value)
