"""Streaming reads and writes of the safetensors format, one tensor in memory at a time.

The format is 8 bytes (little-endian u64: header length), a JSON header mapping each name to its
dtype, shape and byte range in the data section, then the data. Reading a tensor with `readinto`
fills its final buffer directly; writing serialises one tensor at a time, so a transposed copy of
a whole model never exists.

Files read here come from strangers (any Hugging Face folder), so the whole header is checked
before a single tensor is allocated, by the rules of the official library: every entry has a known
dtype, a shape of non-negative integers and a byte range that matches it, and the ranges, sorted,
tile the data section exactly (no gaps, no overlaps, nothing after the last one). After that, no
tensor can ask for more memory than the file holds.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from slmkit.errors import UserError
from slmkit.fileio import atomic_path

# Names as the format spells them; the later ones only where this torch has the type.
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U64": "uint64", "U32": "uint32",
    "U16": "uint16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}
DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if hasattr(torch, v)}
NAMES = {v: k for k, v in DTYPES.items()}
# Dtypes the format defines that torch cannot hold as a plain tensor (sub-byte floats, scale exponents).
KNOWN_UNSUPPORTED = ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0")

MAX_HEADER = 100_000_000  # the official library's limit
U64 = 1 << 64  # sizes and offsets are u64 in the official reader: beyond this it refuses (overflow)
TORCH_MAX_DIM = (1 << 63) - 1  # torch sizes are int64


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte range in the data section
    end: int


@dataclass(frozen=True)
class Header:
    entries: list[TensorEntry]  # sorted by offset: file order
    data_start: int  # offset of the data section in the file
    metadata: dict[str, str]


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys silently; two entries for one name are ambiguous.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"the name {_short(key)} appears twice")
        out[key] = value
    return out


def _no_constants(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")  # Python accepts NaN / Infinity; the format's parser does not


def _short(name: str, limit: int = 80) -> str:
    text = repr(name)  # repr escapes newlines and control characters: the error stays one line
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _is_int(x: Any) -> bool:
    return type(x) is int  # not bool, which is an int subclass in Python


def _bad(path: Path, reason: str) -> UserError:
    return UserError(f"{path} is not a valid safetensors file: {reason}")


def _parse_json(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(path, f"its header is not UTF-8 (invalid byte at offset {8 + exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKey as exc:
        raise _bad(path, f"its header is ambiguous: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; deep nesting a RecursionError
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise _bad(path, f"its header is not valid JSON ({reason})") from None
    if not isinstance(obj, dict):
        raise _bad(path, "its header is not a JSON object")
    return obj


def _metadata(path: Path, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    return value


def _numel_bytes(path: Path, name: str, shape: list[int], dtype: torch.dtype) -> int:
    """Bytes the tensor needs, in Python integers; refused where the official reader's u64 arithmetic
    would overflow, so both accept the same files."""
    n = 1
    for d in shape:
        n *= d
        if n >= U64:
            raise _bad(path, f"tensor {_short(name)} has shape {shape}, too many elements")
    bits = n * dtype.itemsize * 8
    if bits >= U64:
        raise _bad(path, f"tensor {_short(name)} has shape {shape}, too many bytes")
    return bits // 8


def _entry(path: Path, name: str, info: Any) -> TensorEntry:
    where = f"tensor {_short(name)}"
    if not isinstance(info, dict):
        raise _bad(path, f"{where} is not described by a JSON object")
    code = info.get("dtype")
    if not isinstance(code, str) or code not in DTYPES:
        what = "which slmkit cannot load" if code in KNOWN_UNSUPPORTED else "which is not a safetensors dtype"
        raise _bad(path, f"{where} has dtype {_short(str(code), 40)}, {what}")
    dtype = DTYPES[code]
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < U64 for d in shape):
        raise _bad(path, f"{where} has shape {_short(str(shape), 60)}; a shape is a list of non-negative integers")
    if any(d > TORCH_MAX_DIM for d in shape):
        raise _bad(path, f"{where} has a dimension larger than torch can represent")
    offsets = info.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) and 0 <= x < U64 for x in offsets):
        raise _bad(path, f"{where} has data_offsets {_short(str(offsets), 60)}; they must be two non-negative "
                         "integers")
    begin, end = offsets
    if begin > end:
        raise _bad(path, f"{where} has data_offsets [{begin}, {end}] that end before they begin")
    nbytes = _numel_bytes(path, name, shape, dtype)
    if end - begin != nbytes:
        raise _bad(path, f"{where} has data_offsets [{begin}, {end}] ({end - begin:,} bytes) but shape {shape} "
                         f"of {code} needs {nbytes:,} bytes")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _check_layout(path: Path, entries: list[TensorEntry], data_size: int) -> None:
    """Sorted by offset, the tensors must tile the data section exactly, as the official reader requires."""
    cursor = 0
    for e in entries:
        if e.begin < cursor:
            raise _bad(path, f"tensor {_short(e.name)} overlaps the tensor before it (bytes {e.begin}..{e.end})")
        if e.begin > cursor:
            raise _bad(path, f"there is a gap of {e.begin - cursor:,} bytes before tensor {_short(e.name)}")
        cursor = e.end
    if cursor > data_size:
        raise _bad(path, f"the tensors need {cursor:,} bytes of data but the file holds {data_size:,} "
                         "(truncated?)")
    if cursor < data_size:
        raise _bad(path, f"{data_size - cursor:,} bytes follow the last tensor")


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to `n` bytes, fewer only at the end of the file (an unbuffered read may return less)."""
    parts, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def parse_header(path: Path, f: BinaryIO, size: int) -> Header:
    """Read and fully validate the header of the open file `f` of `size` bytes; allocates at most
    the header's own bytes, which are checked to lie within the file first."""
    raw = _read_exact(f, 8)
    if len(raw) != 8:
        raise _bad(path, f"it is {size} bytes long, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER:
        raise _bad(path, f"its header length {n:,} exceeds the format's limit of {MAX_HEADER:,} bytes")
    if 8 + n > size:
        raise _bad(path, f"its header length {n:,} runs past the end of the file ({size:,} bytes)")
    blob = _read_exact(f, n)
    if len(blob) != n:
        raise _bad(path, "the file is shorter than its header (truncated)")
    header = _parse_json(path, blob)
    metadata = _metadata(path, header.pop("__metadata__", None))
    entries = [_entry(path, name, info) for name, info in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    _check_layout(path, entries, size - 8 - n)
    return Header(entries, 8 + n, metadata)


def _open_regular(path: Path) -> tuple[BinaryIO, int]:
    """Open `path` for reading without blocking (a FIFO would wait forever) and refuse what is not a file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb", buffering=0), st.st_size


def read_header(path: str | Path) -> Header:
    path = Path(path)
    f, size = _open_regular(path)
    with f:
        try:
            return parse_header(path, f, size)
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_into(path: Path, f: BinaryIO, e: TensorEntry, base: int) -> torch.Tensor:
    t = torch.empty(e.shape, dtype=e.dtype)  # e.end - e.begin bytes, which the header check bounded by the file
    nbytes = e.end - e.begin
    if not nbytes:
        return t
    f.seek(base + e.begin)
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    got = 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise _bad(path, f"it ends inside tensor {_short(e.name)} (truncated while reading?)")
        got += n
    return t


def iter_safetensors(
    path: str | Path, skip: Callable[[str], bool] = lambda name: False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in file order; each tensor is read straight into its own buffer."""
    path = Path(path)
    f, size = _open_regular(path)
    with f:
        try:
            header = parse_header(path, f, size)
            for e in header.entries:
                if not skip(e.name):
                    yield e.name, _read_into(path, f, e, header.data_start)
        except OSError as exc:  # a failing disk or network mount half way through
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def write_safetensors(
    path: str | Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors named in `specs` (name, shape, dtype); `produce(name)` makes each one when its turn comes.
    The file appears only once complete (fileio.atomic_path: unpredictable temp name, then a rename)."""
    header: dict[str, object] = {"__metadata__": metadata or {}}
    offset = 0
    for name, shape, dtype in specs:
        n = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            t = produce(name).detach().to("cpu", dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: produced shape {tuple(t.shape)} != declared {tuple(shape)}")
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
