"""Shared by the importers: checking tensors against the model they must fill, and writing the run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from slmkit.checkpoint import BEST, save_checkpoint
from slmkit.config import ModelConfig, RunConfig
from slmkit.errors import UserError
from slmkit.fileio import atomic_write_text, check_output_folder, staged_folder
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


def output_path(out: str | Path) -> Path:
    """`--out` with its parent resolved, so the staging folder is a true sibling ("." and ".." included).
    The last component is kept as given: a symlink there is judged by fileio (a dangling one is refused)."""
    p = Path(out).expanduser()
    if p.name in ("", ".", ".."):
        return p.resolve()
    return p.parent.resolve() / p.name


def check_out(out: Path, kind: str, overwrite: bool) -> None:
    """Refuse a bad `--out` before the slow part (reading a model), with the same rules the write applies."""
    check_output_folder(out, kind, overwrite, "--out-dir")


@contextlib.contextmanager
def staged_output(out: Path, kind: str, overwrite: bool, last: str) -> Iterator[Path]:
    """A temporary sibling of `out` to write into; it becomes `out` only when the block completes.
    Over an earlier output, `last` (the file a reader needs first) is replaced after all the others.

    Errors raised inside name the temporary folder, which the user never sees: they are rewritten to
    name `out` (whose previous contents are untouched)."""
    with staged_folder(out, kind, overwrite, "--out-dir", last=last) as stage:
        try:
            yield stage
        except UserError as exc:
            raise UserError(str(exc).replace(str(stage), str(out))) from None


def write_run(out: Path, tensors: dict[str, torch.Tensor], cfg: RunConfig, tokenizer: Tokenizer,
              source: dict[str, Any]) -> None:
    """Save `tensors` (our names, float32, tied head excluded) as an ordinary run directory in `out`
    (the staging folder: `cfg` must already name the final folder wherever it refers to one)."""
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
