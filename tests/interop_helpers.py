"""Helpers for the interop tests: random weights written in the GPT-1 release format, text batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from conftest import shared_file

LAYER = ("attn/c_attn/w", "attn/c_attn/b", "attn/c_proj/w", "attn/c_proj/b", "ln_1/g", "ln_1/b",
         "mlp/c_fc/w", "mlp/c_fc/b", "mlp/c_proj/w", "mlp/c_proj/b", "ln_2/g", "ln_2/b")


def release_shapes(n_ctx: int, n_vocab: int, n_embd: int, n_layer: int) -> tuple[list[str], list[list[int]]]:
    """Names (as HF's parameters_names.json spells them) and shapes, in the release's order."""
    C = n_embd
    per = {"attn/c_attn/w": [1, C, 3 * C], "attn/c_attn/b": [3 * C], "attn/c_proj/w": [1, C, C],
           "attn/c_proj/b": [C], "mlp/c_fc/w": [1, C, 4 * C], "mlp/c_fc/b": [4 * C], "mlp/c_proj/w": [1, 4 * C, C],
           "mlp/c_proj/b": [C]}
    names, shapes = ["model/we:0"], [[n_ctx, C], [n_vocab, C]]
    for i in range(n_layer):
        for rel in LAYER:
            names.append(f"model/h{i}/{rel}:0")
            shapes.append(per.get(rel, [C]))
    return names, shapes


def write_release(folder: Path, n_ctx: int = 512, n_embd: int = 768, n_layer: int = 12, seed: int = 0,
                  n_files: int = 10) -> list[np.ndarray]:
    """Random GPT-1 weights in the release format (+ the real GPT-1 vocabulary); returns the arrays."""
    vocab = shared_file("vocab", "gpt1", "encoder_bpe_40000.json")
    n_vocab = len(json.loads(vocab.read_text(encoding="utf-8")))
    folder.mkdir(parents=True, exist_ok=True)
    names, shapes = release_shapes(n_ctx, n_vocab, n_embd, n_layer)
    rng = np.random.default_rng(seed)
    sizes = [int(np.prod(s)) for s in shapes]
    flat = rng.standard_normal(sum(sizes), dtype=np.float32)
    flat *= 0.02
    arrays, off = [], 0
    for name, shape, n in zip(["pos", "tok", *names[1:]], shapes, sizes, strict=True):
        a = flat[off : off + n].reshape(shape)
        if name.endswith(("/g:0",)):
            a += 1.0  # layer-norm gains near 1, as in a trained model
        arrays.append(a)
        off += n
    for i, part in enumerate(np.array_split(flat, n_files)):
        np.save(folder / f"params_{i}.npy", part)
    (folder / "params_shapes.json").write_text(json.dumps(shapes))
    (folder / "parameters_names.json").write_text(json.dumps(names))  # only HF's loader reads this
    shutil.copyfile(vocab, folder / "encoder_bpe_40000.json")
    shutil.copyfile(shared_file("vocab", "gpt1", "vocab_40000.bpe"), folder / "vocab_40000.bpe")
    return arrays


def valid_lines() -> list[str]:
    return shared_file("corpus", "gutenberg", "valid.txt").read_text(encoding="utf-8").split("\n")


def text_batch(tokenizer, rows: int = 2, length: int = 64) -> list[list[int]]:
    """`rows` windows of `length` tokens of real text (Gutenberg validation)."""
    ids: list[int] = []
    for line in valid_lines()[200:]:
        ids.extend(tokenizer.encode(line + "\n"))
        if len(ids) >= rows * length:
            break
    return [ids[r * length : (r + 1) * length] for r in range(rows)]
