"""Shared by the importers: checking tensors against the model they must fill, and writing the run."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from slmkit.checkpoint import BEST, save_checkpoint
from slmkit.config import ModelConfig, RunConfig
from slmkit.errors import UserError
from slmkit.fileio import atomic_write_text
from slmkit.tokenizers import Tokenizer, save_tokenizer

SPECIAL_SEED = 1234  # the three fine-tuning embeddings GPT-1 adds are drawn from N(0, 0.02) with this seed


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for `cfg`, without allocating anything (the tied head left out)."""
    from slmkit.model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def check_shape(source_name: str, got: tuple[int, ...], want: tuple[int, ...], where: str) -> None:
    if tuple(got) != tuple(want):
        raise UserError(f"{where}: tensor {source_name} has shape {list(got)} but the model needs {list(want)}")


def special_rows(n: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SPECIAL_SEED)
    return torch.randn(n, width, generator=g) * 0.02


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {p} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()):
        if not overwrite:
            raise UserError(f"--out {p} is not empty; pass --overwrite to replace it")
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_run(out: Path, tensors: dict[str, torch.Tensor], cfg: RunConfig, tokenizer: Tokenizer,
              source: dict[str, Any]) -> Path:
    """Save `tensors` (our names, float32, tied head excluded) as an ordinary run directory."""
    from slmkit.model import GPT

    want = expected_shapes(cfg.model)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise UserError(f"imported weights do not fill the model: missing {missing[:3]}, unexpected {extra[:3]}")
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the embedding has "
                        f"{cfg.model.vocab_size} rows")
    with torch.device("meta"):
        model = GPT(cfg.model)
    model.load_state_dict(tensors, strict=False, assign=True)  # no copy: the model now owns our tensors
    model.lm_head.weight = model.transformer.wte.weight
    state = {"step": 0, "imported_from": source, "params": model.num_params()}
    save_checkpoint(out / BEST, model, cfg, tokenizer, state)
    atomic_write_text(out / "config.json", cfg.to_json())
    save_tokenizer(tokenizer, out / "tokenizer.json")
    return out / BEST
