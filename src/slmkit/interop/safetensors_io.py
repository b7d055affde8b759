"""Streaming reads and writes of the safetensors format, one tensor in memory at a time.

The format is 8 bytes (little-endian u64: header length), a JSON header mapping each name to its
dtype, shape and byte range in the data section, then the data. Reading a tensor with `readinto`
fills its final buffer directly; writing serialises one tensor at a time, so a transposed copy of
a whole model never exists.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from slmkit.errors import UserError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """(header without `__metadata__`, offset of the data section)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise UserError(f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise UserError(f"{path} is not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not a safetensors file (corrupted header)") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def iter_safetensors(
    path: str | Path, skip: Callable[[str], bool] = lambda name: False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in file order; each tensor is read straight into its own buffer."""
    path = Path(path)
    header, base = read_header(path)
    size = path.stat().st_size
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    with open(path, "rb", buffering=0) as f:
        for name, info in entries:
            if skip(name):
                continue
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=dtype)
            nbytes = t.numel() * t.element_size()
            if end - start != nbytes or base + end > size:
                raise UserError(f"{path} is truncated or corrupted (tensor {name})")
            f.seek(base + start)
            if nbytes:
                view = memoryview(t.view(-1).view(torch.uint8).numpy())
                got = 0
                while got < nbytes:
                    n = f.readinto(view[got:])
                    if not n:
                        raise UserError(f"{path} is truncated (tensor {name})")
                    got += n
            yield name, t


def write_safetensors(
    path: str | Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors named in `specs` (name, shape, dtype); `produce(name)` makes each one when its turn comes."""
    header: dict[str, object] = {"__metadata__": metadata or {}}
    offset = 0
    for name, shape, dtype in specs:
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, dtype in specs:
                t = produce(name).detach().to("cpu", dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: produced shape {tuple(t.shape)} != declared {tuple(shape)}")
                if t.numel():
                    f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
