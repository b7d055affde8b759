"""The original GPT-1 release (openai/finetune-transformer-lm, `model/`): read it into a run directory.

`params_shapes.json` lists 146 shapes; `params_0.npy` ... `params_9.npy` hold all the float32 values
concatenated, then cut into 10 files, so one tensor can straddle two files. In order: positions
[512, 768], tokens [40478, 768], then for each of the 12 layers c_attn w [1, 768, 2304], b, c_proj w, b,
ln_1 g, b, mlp c_fc w [1, 768, 3072], b, mlp c_proj w [1, 3072, 768], b, ln_2 g, b. Conv1d weights are
[1, in, out]; our linear layers are [out, in]. The original code appended the three fine-tuning
embeddings (start, delimiter, classify) after the tokens, drawn from N(0, 0.02); so do we, seeded.

The files are read one at a time through a memory map, each value copied once into the tensor it
belongs to: peak memory is the model plus one file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from slmkit.checkpoint import BEST
from slmkit.config import ModelConfig, RunConfig, preset_config
from slmkit.errors import UserError
from slmkit.fileio import atomic_write
from slmkit.interop.common import check_out, check_shape, output_path, special_rows, staged_output, write_run
from slmkit.tokenizers.gpt1 import GPT1_SPECIALS, GPT1Tokenizer

# (release name inside a layer, our name inside transformer.h.N, conv1d weight?)
LAYER_TENSORS = (
    ("attn/c_attn/w", "attn.c_attn.weight", True),
    ("attn/c_attn/b", "attn.c_attn.bias", False),
    ("attn/c_proj/w", "attn.c_proj.weight", True),
    ("attn/c_proj/b", "attn.c_proj.bias", False),
    ("ln_1/g", "ln_1.weight", False),
    ("ln_1/b", "ln_1.bias", False),
    ("mlp/c_fc/w", "mlp.c_fc.weight", True),
    ("mlp/c_fc/b", "mlp.c_fc.bias", False),
    ("mlp/c_proj/w", "mlp.c_proj.weight", True),
    ("mlp/c_proj/b", "mlp.c_proj.bias", False),
    ("ln_2/g", "ln_2.weight", False),
    ("ln_2/b", "ln_2.bias", False),
)
N_SPECIAL = len(GPT1_SPECIALS)


def release_layout(cfg: ModelConfig) -> list[tuple[str, str, tuple[int, ...], bool]]:
    """(release name, our name, release shape, conv1d?) for every tensor, in file order."""
    C, F = cfg.n_embd, cfg.mlp_width
    n_tokens = cfg.vocab_size - N_SPECIAL
    layout = [("model/positions", "transformer.wpe.weight", (cfg.block_size, C), False),
              ("model/tokens", "transformer.wte.weight", (n_tokens, C), False)]
    shapes = {"attn/c_attn/w": (1, C, 3 * C), "attn/c_attn/b": (3 * C,), "attn/c_proj/w": (1, C, C),
              "attn/c_proj/b": (C,), "mlp/c_fc/w": (1, C, F), "mlp/c_fc/b": (F,), "mlp/c_proj/w": (1, F, C),
              "mlp/c_proj/b": (C,)}
    for i in range(cfg.n_layer):
        for rel, ours, conv in LAYER_TENSORS:
            layout.append((f"model/h{i}/{rel}", f"transformer.h.{i}.{ours}", shapes.get(rel, (C,)), conv))
    return layout


def _param_files(src: Path) -> list[Path]:
    files = []
    while (src / f"params_{len(files)}.npy").is_file():
        files.append(src / f"params_{len(files)}.npy")
    if not files:
        raise UserError(f"{src} holds no params_0.npy (the GPT-1 release has params_0.npy ... params_9.npy)")
    return files


def _open_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path} is not a readable .npy file ({str(exc).splitlines()[0]})") from None
    if arr.dtype != np.float32:
        raise UserError(f"{path} holds {arr.dtype} values; the GPT-1 release is float32")
    return arr.reshape(-1)


def _stream(files: list[Path], sizes: list[int], extra_rows: dict[int, int], width: int) -> Iterator[np.ndarray]:
    """Cut the concatenation of `files` into flat arrays of `sizes`, one file mapped at a time.
    Tensor k gets room for `extra_rows[k]` more rows of `width` after its values."""
    queue = list(files)
    arr: np.ndarray | None = None
    pos = 0
    for k, n in enumerate(sizes):
        buf = np.empty(n + extra_rows.get(k, 0) * width, dtype=np.float32)
        filled = 0
        while filled < n:
            if arr is None or pos == arr.size:
                arr, pos = _open_npy(queue.pop(0)), 0
            take = min(n - filled, arr.size - pos)
            buf[filled : filled + take] = arr[pos : pos + take]
            filled += take
            pos += take
        yield buf
    del arr


def read_release(src: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (tied head left out) from the release files in `src`, checked against `cfg`."""
    src = Path(src)
    shapes_path = src / "params_shapes.json"
    if not shapes_path.is_file():
        raise UserError(f"{src} holds no params_shapes.json: not a GPT-1 release folder")
    try:
        shapes = [tuple(int(d) for d in s) for s in json.loads(shapes_path.read_text())]
    except (json.JSONDecodeError, TypeError, ValueError):
        raise UserError(f"{shapes_path} is not a JSON list of shapes") from None
    layout = release_layout(cfg)
    if len(shapes) != len(layout):
        raise UserError(f"params_shapes.json lists {len(shapes)} tensors; a {cfg.n_layer}-layer GPT-1 has "
                        f"{len(layout)}")
    for (rel, _, want, _), got in zip(layout, shapes, strict=True):
        check_shape(rel, got, want, "params_shapes.json")
    files = _param_files(src)
    total = sum(_open_npy(f).size for f in files)
    need = sum(int(np.prod(s)) for s in shapes)
    if total != need:
        raise UserError(f"the params_*.npy files hold {total:,} values; params_shapes.json needs {need:,}")
    out: dict[str, torch.Tensor] = {}
    sizes = [int(np.prod(s)) for s in shapes]
    for (_, ours, shape, conv), flat in zip(layout, _stream(files, sizes, {1: N_SPECIAL}, cfg.n_embd), strict=True):
        if ours == "transformer.wte.weight":
            t = torch.from_numpy(flat).view(cfg.vocab_size, cfg.n_embd)
            t[-N_SPECIAL:] = special_rows(N_SPECIAL, cfg.n_embd)
        elif conv:
            t = torch.from_numpy(flat).view(shape[1], shape[2]).t().contiguous()  # [in, out] -> [out, in]
        else:
            t = torch.from_numpy(flat).view(shape)
        out[ours] = t
    return out


def gpt1_config() -> RunConfig:
    return preset_config("gpt1")


def import_openai_gpt1(src: str | Path, out: str | Path, overwrite: bool = False,
                       config: RunConfig | None = None) -> Path:
    """Import the GPT-1 release in `src` into the run directory `out` (the `gpt1` preset).

    `config` replaces the gpt1 preset (tests use small shapes); its vocab_size counts the 3 specials.
    `out` appears only once complete; with `overwrite`, only files slmkit wrote there are replaced.
    Returns the path of the checkpoint."""
    target = output_path(out)
    check_out(target, "import", overwrite)
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"--src {src} is not a directory")
    cfg = config or gpt1_config()
    for name in ("params_shapes.json", "encoder_bpe_40000.json", "vocab_40000.bpe"):
        if not (src / name).is_file():
            raise UserError(f"{src} holds no {name}: not a GPT-1 release folder")
    tokenizer = GPT1Tokenizer.from_files(src)
    n_tokens = cfg.model.vocab_size - N_SPECIAL
    if tokenizer.base_size != n_tokens:
        raise UserError(f"the vocabulary in {src} has {tokenizer.base_size} entries but the embedding has "
                        f"{n_tokens} token rows")
    tensors = read_release(src, cfg.model)
    # The vocabulary files go into the run folder itself, which the run's data settings then name.
    cfg.data.tokenizer, cfg.data.vocab_dir, cfg.data.bpe_vocab_size = "gpt1", str(target), cfg.model.vocab_size
    with staged_output(target, "import", overwrite, last=BEST) as stage:
        for name in ("encoder_bpe_40000.json", "vocab_40000.bpe"):
            atomic_write(stage / name, lambda tmp, name=name: shutil.copyfile(src / name, tmp))
        write_run(stage, tensors, cfg, tokenizer, {"format": "openai-gpt1", "src": str(src.resolve())})
    return target / BEST
