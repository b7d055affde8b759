"""Fuzzing the safetensors reader that `slm import` runs on files from strangers.

Every input must either load, and then hold exactly what the official `safetensors` library loads
from the same file, or be refused with a one-line `UserError` naming the file; never another
exception, and never an allocation larger than the file. The official library is the referee in
both directions: what it refuses we refuse, what it accepts (in the dtypes slmkit loads) we load.
"""

from __future__ import annotations

import atexit
import json
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from slmkit.errors import UserError
from slmkit.interop import safetensors_io
from slmkit.interop.safetensors_io import DTYPES, TORCH_MAX_DIM, iter_safetensors

WORK = Path(tempfile.mkdtemp(prefix="slmkit-st-fuzz-"))  # one file rewritten per example, not one per example
atexit.register(shutil.rmtree, WORK, True)
# No example database: it would be written into the checkout.
FUZZ = settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- building files


def file_bytes(header: Any, data: bytes, header_len: int | None = None, pad: bool = True) -> bytes:
    """A safetensors file: u64 header length, the header (a JSON value, or raw bytes), then `data`."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    n = len(blob) if header_len is None else header_len
    return struct.pack("<Q", n) + blob + data


def write(raw: bytes, name: str = "fuzz.safetensors") -> Path:
    path = WORK / name
    path.write_bytes(raw)
    return path


class AllocationGuard:
    """Wraps torch.empty inside the reader: every buffer it asks for must fit in the file."""

    def __init__(self, limit: int):
        self.limit = limit
        self.calls = 0

    def empty(self, shape, dtype):
        self.calls += 1
        numel = 1
        for d in shape:
            numel *= d
        asked = numel * dtype.itemsize
        assert asked <= self.limit, f"asked for {asked} bytes from a {self.limit}-byte file"
        return torch.empty(shape, dtype=dtype)


class _TorchSeenByTheReader:
    """torch as the reader module sees it, with `empty` going through the guard."""

    def __init__(self, guard: AllocationGuard):
        self.empty = guard.empty

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextmanager
def guarded(limit: int):
    guard = AllocationGuard(limit)
    with mock.patch.object(safetensors_io, "torch", _TorchSeenByTheReader(guard)):
        yield guard


def ours(path: Path) -> dict[str, torch.Tensor] | None:
    """What slmkit loads, or None when it refuses (one line, naming the file)."""
    with guarded(path.stat().st_size):
        try:
            return dict(iter_safetensors(path))
        except UserError as exc:
            message = str(exc)
            assert "\n" not in message and str(path) in message, message
            return None


def official(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        return load_file(str(path))
    except BaseException as exc:  # noqa: BLE001 - a Rust panic surfaces as a BaseException subclass
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        return None


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def agree(path: Path) -> dict[str, torch.Tensor] | None:
    """Load with both readers and check they agree; returns slmkit's tensors (None when refused)."""
    mine, theirs = ours(path), official(path)
    if mine is not None:
        assert theirs is not None, "slmkit loaded a file the official library refuses"
        assert mine.keys() == theirs.keys()
        for k, t in mine.items():
            assert (t.dtype, t.shape) == (theirs[k].dtype, theirs[k].shape), k
            assert raw_bytes(t) == raw_bytes(theirs[k]), k
    elif theirs is not None:
        loadable = all(t.dtype in DTYPES.values() and all(d <= TORCH_MAX_DIM for d in t.shape)
                       for t in theirs.values())
        assert not loadable, "the official library loads this file but slmkit refuses it"
    return mine


# ----------------------------------------------------------------------------- strategies

DTYPE_CODES = sorted(DTYPES)
BAD_DTYPES = ["F4", "F8_E8M0", "f32", "float32", "", "X", 5, None, ["F32"]]
DIMS = st.one_of(st.integers(0, 4), st.integers(0, 4), st.sampled_from([2**31, 2**40, 2**62, 2**63, 2**64 - 1]))
JSON_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                      st.text(max_size=5), st.lists(st.integers(-3, 3), max_size=3))


@st.composite
def valid_files(draw) -> tuple[dict[str, Any], bytes]:
    """A well-formed header (tensors laid out contiguously, in a shuffled order) and its data."""
    n = draw(st.integers(0, 4))
    names = draw(st.lists(st.text(min_size=0, max_size=6).filter(lambda s: s != "__metadata__"),
                          min_size=n, max_size=n, unique=True))
    header: dict[str, Any] = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.text(max_size=4),
                                                                           max_size=2)))
    offset = 0
    for name in names:
        dtype = draw(st.sampled_from(DTYPE_CODES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = DTYPES[dtype].itemsize
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    items = list(header.items())
    order = draw(st.permutations(range(len(items))))
    header = {items[i][0]: items[i][1] for i in order}  # file order and header order need not match
    return header, draw(st.binary(min_size=offset, max_size=offset))


def _mutate_entry(draw, header: dict[str, Any]) -> None:
    names = [k for k in header if k != "__metadata__"]
    if not names:
        header[draw(st.text(max_size=3))] = draw(JSON_JUNK)
        return
    entry = header[draw(st.sampled_from(names))]
    if not isinstance(entry, dict):
        return
    field = draw(st.sampled_from(["dtype", "shape", "dim", "begin", "end", "offsets", "drop", "junk", "extra"]))
    if field == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPE_CODES + BAD_DTYPES))
    elif field == "shape":
        entry["shape"] = draw(st.one_of(st.lists(DIMS, max_size=4), JSON_JUNK))
    elif field == "dim" and isinstance(entry.get("shape"), list) and entry["shape"]:
        i = draw(st.integers(0, len(entry["shape"]) - 1))
        entry["shape"][i] = draw(st.one_of(DIMS, st.integers(-5, -1), st.just(True), st.just(1.0)))
    elif field in ("begin", "end") and isinstance(entry.get("data_offsets"), list) and \
            len(entry["data_offsets"]) == 2:
        i = 0 if field == "begin" else 1
        entry["data_offsets"][i] = draw(st.one_of(st.integers(-8, 64), st.sampled_from([2**40, 2**64 - 1, 2**64])))
    elif field == "offsets":
        entry["data_offsets"] = draw(st.one_of(st.lists(st.integers(0, 64), max_size=3), JSON_JUNK))
    elif field == "drop":
        entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
    elif field == "junk":
        header[draw(st.sampled_from(names))] = draw(JSON_JUNK)
    else:
        entry["extra"] = draw(JSON_JUNK)  # unknown keys: the official reader ignores them


def _shift(draw, header: dict[str, Any]) -> None:
    """Move one tensor's byte range, keeping its size: overlaps, gaps, ranges past the end, aliasing."""
    names = [k for k in header if k != "__metadata__"]
    if names:
        offsets = header[draw(st.sampled_from(names))]["data_offsets"]
        back = st.integers(-offsets[0], -1) if offsets[0] else st.nothing()  # backwards: into the one before
        delta = draw(st.one_of(back, back, st.integers(1, 16)))
        offsets[0] += delta
        offsets[1] += delta


@st.composite
def mutated_files(draw) -> bytes:
    header, data = draw(valid_files())
    kind = draw(st.sampled_from(["none", "entry", "entry", "entry", "shift", "shift", "metadata", "trailing",
                                 "truncate", "header_len", "garbage", "not_object", "no_pad"]))
    header_len, pad = None, True
    if kind == "shift":
        _shift(draw, header)
    elif kind == "entry":
        for _ in range(draw(st.integers(1, 2))):
            _mutate_entry(draw, header)
    elif kind == "metadata":
        header["__metadata__"] = draw(st.one_of(JSON_JUNK, st.dictionaries(st.text(max_size=3), JSON_JUNK,
                                                                            max_size=2)))
    elif kind == "trailing":
        data += draw(st.binary(min_size=1, max_size=9))
    elif kind == "not_object":
        header = draw(JSON_JUNK)
    elif kind == "header_len":
        header_len = draw(st.one_of(st.integers(0, 200), st.sampled_from([2**63, 2**64 - 1, 100_000_001])))
    elif kind == "no_pad":
        pad = False
    raw = file_bytes(header, data, header_len, pad)
    if kind == "truncate":
        raw = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif kind == "garbage":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at + 1:]
    return raw


# ----------------------------------------------------------------------------- properties


@FUZZ
@given(valid_files())
def test_well_formed_files_load_exactly_as_the_official_library_loads_them(case):
    header, data = case
    tensors = agree(write(file_bytes(header, data)))
    assert tensors is not None
    assert set(tensors) == {k for k in header if k != "__metadata__"}


@FUZZ
@given(mutated_files())
def test_mutated_files_load_identically_or_are_refused_in_one_line(raw):
    agree(write(raw))


@FUZZ
@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_crash_the_reader(raw):
    agree(write(raw))


# ----------------------------------------------------------------------------- hand-written cases


def refused(raw: bytes, pattern: str, by_both: bool = True) -> str:
    path = write(raw, "case.safetensors")
    with guarded(len(raw)) as guard, pytest.raises(UserError, match=pattern) as err:
        list(iter_safetensors(path))
    assert guard.calls == 0, "a tensor was allocated before the header was refused"
    assert official(path) is None or not by_both
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    return str(err.value)


def f32(shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def test_a_4_tb_tensor_claim_is_refused_before_any_allocation():
    four_tb = 1 << 40  # F32 elements: 4 TiB
    refused(file_bytes({"w": f32([four_tb], 0, 4 * four_tb)}, b"\0" * 64),
            "need .* bytes of data but the file holds 64")
    refused(file_bytes({"w": f32([four_tb], 0, 64)}, b"\0" * 64), r"shape \[1099511627776\] of F32 needs")
    refused(file_bytes({"w": f32([2**32, 2**32, 2**32], 0, 64)}, b"\0" * 64), "too many elements")


def test_overlapping_offsets_are_refused():
    refused(file_bytes({"a": f32([4], 0, 16), "b": f32([4], 8, 24)}, bytes(24)), "'b' overlaps the tensor before it")
    # Two names for the same bytes: the official library refuses this aliasing too.
    refused(file_bytes({"a": f32([4], 0, 16), "b": f32([4], 0, 16)}, bytes(16)), "overlaps")


def test_a_gap_or_bytes_after_the_last_tensor_are_refused():
    refused(file_bytes({"a": f32([4], 0, 16), "b": f32([4], 24, 40)}, bytes(40)), "gap of 8 bytes before tensor 'b'")
    refused(file_bytes({"a": f32([4], 0, 16)}, bytes(20)), "4 bytes follow the last tensor")


@pytest.mark.parametrize("raw, pattern", [
    (b"", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 2**64 - 1) + b"{}", "exceeds the format's limit"),
    (struct.pack("<Q", 1000) + b"{}      ", "runs past the end of the file"),
    (file_bytes(b"{\xff}", b""), "not UTF-8"),
    (file_bytes(b"[" * 50_000 + b"]" * 50_000, b""), "not valid JSON"),
    (file_bytes(b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4], "x": NaN}}', bytes(4)), "not valid JSON"),
    (file_bytes([1, 2], b""), "not a JSON object"),
    (file_bytes({"__metadata__": {"k": 1}}, b""), "__metadata__ must map strings to strings"),
    (file_bytes({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)), "non-negative integers"),
    (file_bytes({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4)), "non-negative integers"),
    (file_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, bytes(4)), "end before they begin"),
    (file_bytes(b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', bytes(2)), "appears twice"),
])
def test_broken_headers_are_one_line_errors(raw, pattern):
    refused(raw, pattern)


def test_dtypes_torch_cannot_hold_are_refused_by_name():
    # The format's 4-bit floats pack two values a byte; nothing in slmkit can use them.
    message = refused(file_bytes({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, bytes(1)),
                      "tensor 'a' has dtype 'F4', which slmkit cannot load", by_both=False)
    assert message.startswith(str(WORK / "case.safetensors"))


def test_files_written_by_the_official_library_load_identically():
    tensors = {"f": torch.randn(3, 5), "h": torch.randn(7).half(), "b": torch.randn(2, 2).bfloat16(),
               "i": torch.arange(6, dtype=torch.int64).view(2, 3), "m": torch.tensor([True, False]),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    path = WORK / "official.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    mine = agree(path)
    assert mine is not None and mine.keys() == tensors.keys()
    for k, t in tensors.items():
        assert torch.equal(mine[k], t), k


def test_null_metadata_and_zero_size_tensors_sharing_an_offset_are_accepted():
    header = {"__metadata__": None, "z1": f32([0], 4, 4), "a": f32([1], 0, 4), "z2": f32([3, 0], 4, 4)}
    mine = agree(write(file_bytes(header, struct.pack("<f", 1.5))))
    assert mine is not None and mine["a"].tolist() == [1.5] and mine["z2"].shape == (3, 0)
