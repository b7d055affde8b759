"""Drills on the checkpoint loader: tampered metadata, forged checksums, random corruption.

Every input either loads into a consistent checkpoint or raises the one-line UserError; nothing
else escapes, and nothing is allocated beyond what the file itself holds.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slmkit.checkpoint import CHECKSUM, LAST, _crc, build_model, load_checkpoint
from slmkit.errors import UserError
from slmkit.train import train


@pytest.fixture(scope="module")
def ckpt_bytes(tmp_path_factory) -> bytes:
    base = tmp_path_factory.mktemp("ckpt")
    corpus = base / "tiny.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    cfg = tiny_config(corpus, max_iters=2, eval_interval=2, sample_tokens=0)
    train(cfg, base / "run", progress=False, final_eval=False)
    return (base / "run" / LAST).read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def with_config_change(data: bytes, change, refresh_checksum: bool, tmp_path: Path) -> Path:
    header, body = split(data)
    meta = header["__metadata__"]
    config = json.loads(meta["config"])
    change(config)
    meta["config"] = json.dumps(config)
    if refresh_checksum:  # a forger who knows the format recomputes the checksum
        tensors = load_checkpoint_tensors(data, tmp_path)
        meta[CHECKSUM] = _crc(tensors, meta)
    p = tmp_path / "tampered.safetensors"
    p.write_bytes(join(header, body))
    return p


def load_checkpoint_tensors(data: bytes, tmp_path: Path) -> dict[str, torch.Tensor]:
    p = tmp_path / "orig.safetensors"
    p.write_bytes(data)
    return load_checkpoint(p).tensors


def test_a_changed_block_size_in_the_metadata_is_caught_by_the_checksum(ckpt_bytes, tmp_path):
    p = with_config_change(ckpt_bytes, lambda c: c["model"].update(block_size=64), False, tmp_path)
    with pytest.raises(UserError, match="checksum"):
        load_checkpoint(p)


@pytest.mark.parametrize("change", [
    {"block_size": 64}, {"n_layer": 3}, {"n_embd": 64}, {"n_layer": 10**9}, {"vocab_size": 7}, {"n_inner": 1},
])
def test_a_forged_checksum_still_cannot_load_weights_into_the_wrong_shapes(change, ckpt_bytes, tmp_path):
    p = with_config_change(ckpt_bytes, lambda c: c["model"].update(change), True, tmp_path)
    with pytest.raises(UserError, match="does not match its config|invalid config|must be"):
        ckpt = load_checkpoint(p)
        build_model(ckpt)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_checkpoints_load_or_fail_with_one_line(data, ckpt_bytes, tmp_path_factory):
    raw = bytearray(ckpt_bytes)
    mode = data.draw(st.sampled_from(["flip", "truncate", "header", "garbage", "length"]))
    if mode == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
    elif mode == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif mode == "length":
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    elif mode == "garbage":
        raw = bytearray(data.draw(st.binary(max_size=256)))
    else:
        header, body = split(bytes(raw))
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["shape", "data_offsets", "dtype"]))
        header[name][field] = data.draw(st.one_of(
            st.lists(st.integers(-2, 2**62), max_size=3), st.sampled_from(["F32", "I64", "XX", "BF16"]), st.none(),
        ))
        raw = bytearray(join(header, body))
    p = tmp_path_factory.mktemp("fuzz") / "ckpt.safetensors"
    p.write_bytes(bytes(raw))
    try:
        ckpt = load_checkpoint(p)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    build_model(ckpt)  # a checkpoint that loads is consistent enough to build its model


def test_a_checkpoint_without_any_checksum_is_refused(ckpt_bytes, tmp_path):
    header, body = split(ckpt_bytes)
    del header["__metadata__"][CHECKSUM]
    p = tmp_path / "unchecked.safetensors"
    p.write_bytes(join(header, body))
    with pytest.raises(UserError, match="no checksum"):
        load_checkpoint(p)
