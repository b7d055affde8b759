"""Checkpoints: one safetensors file each, written atomically, read back whole and checked, never unpickled.

A checkpoint is one safetensors file: the model's weights (`model.*`), optionally the AdamW
moments (`optim.*`) and the RNG states (`rng.*`), and JSON metadata holding the run config, the
tokenizer, the training state (step, best val loss, ...) and a CRC of every tensor. One file
written to a temporary name and renamed is atomic: a crash or a full disk never replaces the last
good checkpoint with a broken one.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from slmkit.budget import param_count
from slmkit.config import RunConfig
from slmkit.errors import UserError
from slmkit.fileio import atomic_write
from slmkit.tokenizers import Tokenizer, tokenizer_from_dict

FORMAT = "slmkit-checkpoint-1"
CHECKSUM = "checksum"  # tensors and metadata
LEGACY_CRC = "crc32"  # tensors only, written before the checksum covered the metadata
LAST, BEST = "ckpt_last.safetensors", "ckpt_best.safetensors"


# ----------------------------------------------------------------------------- checkpoints


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP and torch.compile wrappers: saved names never get `_orig_mod.`."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the tied head (it is the token embedding; safetensors refuses aliases)."""
    m = unwrap(model)
    sd = m.state_dict()
    if getattr(m, "lm_head", None) is not None and m.lm_head.weight is m.transformer.wte.weight:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _crc(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> str:
    """CRC-32 of every tensor and, when given, every metadata entry: a changed config is caught too."""
    crc = 0
    for key in sorted(meta or {}):
        if key not in (CHECKSUM, LEGACY_CRC):
            crc = zlib.crc32(f"{key}={meta[key]}".encode(), crc)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(t.view(-1).view(torch.uint8).numpy().data, crc) if t.numel() else crc
    return f"{crc:08x}"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = state
    return out


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    config: RunConfig,
    tokenizer: Tokenizer,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_meta: dict[str, str] | None = None,
) -> None:
    tensors = {f"model.{k}": v.cpu() for k, v in model_tensors(model).items()}
    meta: dict[str, str] = {
        "format": FORMAT,
        "config": config.to_json(),
        "tokenizer": json.dumps(tokenizer.to_dict(), ensure_ascii=False),
        "state": json.dumps(state),
    }
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
        meta["optimizer"] = json.dumps(opt_meta)
        tensors.update(_rng_tensors())
    tensors.update(extra_tensors or {})
    meta.update(extra_meta or {})
    meta[CHECKSUM] = _crc(tensors, meta)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), private_folder=True)


@dataclass
class Checkpoint:
    path: Path
    config: RunConfig
    tokenizer: Tokenizer
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k[len("model.") :]: v for k, v in self.tensors.items() if k.startswith("model.")}

    def has_optimizer(self) -> bool:
        return "optimizer" in self.meta

    def restore_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        groups = json.loads(self.meta["optimizer"])["param_groups"]
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in self.tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})

    def restore_rng(self) -> None:
        if "rng.torch" in self.tensors:
            torch.set_rng_state(self.tensors["rng.torch"])
        cuda_states = [v for k, v in sorted(self.tensors.items()) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata, read into memory: no mapping of the file outlives this call, so the
    file can be replaced (and its disk space freed) while the model trains."""
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {p}: {exc.strerror or exc}") from None
    try:
        # The official reader checks every offset and size against the buffer before allocating.
        tensors = safetensors.torch.load(data)
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RuntimeError, struct.error, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"checkpoint {p} is corrupted or truncated ({first})") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"checkpoint {p} has corrupted metadata")
    return tensors, meta


def checkpoint_metadata(path: str | Path) -> dict[str, str] | None:
    """The metadata of an slmkit checkpoint from its safetensors header alone (no tensor is read,
    nothing is checked but the format); None when `path` is not one."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return None
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, struct.error, ValueError, AttributeError, RecursionError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    tensors, meta = _read_safetensors(p)
    if meta.get("format") != FORMAT:
        raise UserError(f"{p} is not an slmkit checkpoint")
    if CHECKSUM in meta:
        if _crc(tensors, meta) != meta[CHECKSUM]:
            raise UserError(f"checkpoint {p} is corrupted (checksum mismatch)")
    elif LEGACY_CRC in meta:
        if _crc(tensors) != meta[LEGACY_CRC]:
            raise UserError(f"checkpoint {p} is corrupted (checksum mismatch)")
    else:
        raise UserError(f"checkpoint {p} has no checksum (every slmkit checkpoint has one): refused")
    try:
        config = RunConfig.from_dict(json.loads(meta["config"]))
        config.validate()
        tokenizer = tokenizer_from_dict(json.loads(meta["tokenizer"]))
        state = json.loads(meta.get("state", "{}"))
    except UserError as exc:
        raise UserError(f"checkpoint {p} has an invalid config or tokenizer: {exc}") from None
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError):
        raise UserError(f"checkpoint {p} has corrupted metadata") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {p} has corrupted metadata")
    ckpt = Checkpoint(p, config, tokenizer, state, tensors, meta)
    check_shapes(ckpt)
    return ckpt


def check_shapes(ckpt: Checkpoint) -> None:
    """Every weight has the shape the saved config implies; checked before any model is built, so
    a config edited to claim 10^9 layers never allocates anything."""
    m = ckpt.config.model
    weights = ckpt.model_state()
    if m.vocab_size <= 0 or "transformer.wte.weight" not in weights:
        raise UserError(f"checkpoint {ckpt.path} holds no token embedding")
    found = sum(t.numel() for k, t in weights.items() if k != "lm_head.weight")
    if found != param_count(m):
        raise UserError(f"checkpoint {ckpt.path} does not match its config ({found:,} weights stored, "
                        f"{param_count(m):,} expected)")
    expected = {"transformer.wte.weight": (m.vocab_size, m.n_embd), "transformer.wpe.weight": (m.block_size, m.n_embd)}
    for i in range(m.n_layer):
        expected[f"transformer.h.{i}.attn.c_attn.weight"] = (3 * m.n_embd, m.n_embd)
        expected[f"transformer.h.{i}.mlp.c_fc.weight"] = (m.mlp_width, m.n_embd)
    for name, shape in expected.items():
        got = tuple(weights[name].shape) if name in weights else None
        if got != shape:
            raise UserError(f"checkpoint {ckpt.path} does not match its config: {name} has shape "
                            f"{list(got) if got else 'none'}, the config needs {list(shape)}")


def find_checkpoint(run_or_file: str | Path, which: str = "best") -> Path:
    """A checkpoint file, or the `best` / `last` one of a run directory (falling back to the other)."""
    p = Path(run_or_file)
    if p.is_file():
        return p
    if not p.is_dir():
        raise UserError(f"no such run directory or checkpoint: {p}")
    order = [BEST, LAST] if which == "best" else [LAST, BEST]
    for name in order:
        if (p / name).is_file():
            return p / name
    raise UserError(f"{p} holds no checkpoint ({LAST} or {BEST})")


def build_model(ckpt: Checkpoint, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Instantiate the GPT a checkpoint describes and load its weights (strictly)."""
    from slmkit.model import GPT

    model = GPT(ckpt.config.model)
    load_weights(model, ckpt)
    return model.to(device)


def load_weights(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Copy a checkpoint's weights into `model`, every one of them (the tied head is the embedding)."""
    try:
        missing, unexpected = model.load_state_dict(ckpt.model_state(), strict=False)
    except RuntimeError as exc:  # a size mismatch the checks above did not name
        reason = str(exc).splitlines()[-1].strip()
        raise UserError(f"checkpoint {ckpt.path} does not match its config ({reason})") from None
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(
            f"checkpoint {ckpt.path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def load_model(run_or_file: str | Path, device: str | torch.device = "cpu", which: str = "best"):
    """(model in eval mode, tokenizer, checkpoint) from a run directory or a checkpoint file."""
    ckpt = load_checkpoint(find_checkpoint(run_or_file, which))
    model = build_model(ckpt, device)
    model.eval()
    return model, ckpt.tokenizer, ckpt
