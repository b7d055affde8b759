"""GGUF out: one file that llama.cpp (and what builds on it: llama-cli, llama-server, llama-cpp-python,
Ollama, LM Studio) runs with its `gpt2` architecture.

llama.cpp's gpt2 graph is GPT-2 exactly: learned position embeddings, pre-LN blocks with a final layer
norm, one fused qkv projection (q, k, v stacked along the output rows, as our `c_attn`), a tanh-GELU MLP
and, when the file has no `output` tensor, the output head tied to the token embedding. So a pre-LN
run maps one to one:

    transformer.wte / wpe            token_embd / position_embd
    h.N.ln_1, attn.c_attn, attn.c_proj   blk.N.attn_norm, attn_qkv, attn_output
    h.N.ln_2, mlp.c_fc, mlp.c_proj       blk.N.ffn_norm, ffn_up, ffn_down
    ln_f                             output_norm

Our linear layers store [out, in], which is what GGUF wants (HF's Conv1D is transposed on the way,
ours is not). llama.cpp requires every bias: a model trained without them gets zero biases, which
compute the same function. What llama.cpp cannot represent is refused with one line: a post-LN
(GPT-1) model, the exact (erf) GELU, and tokenizers other than byte-level BPE (char, gpt1).

The tokenizer goes in as llama.cpp's `gpt2` BPE: the byte-level token strings in id order, the
merges in rank order, and the pre-tokenizer `gpt-2` (GPT-2's split regex, which HF's ByteLevel
pre-tokenizer with use_regex, our `bpe` kind, also applies). The end-of-text token is bos and eos.

Weights: f32 (exact), f16, bf16 or q8_0 (blocks of 32 weights with one f16 scale, llama.cpp's own
layout, made by the `gguf` package's quantizer). As llama.cpp's converter does, 1-D tensors (norms,
biases) and the position table stay f32, and a matrix whose rows do not split into blocks of 32
falls back from q8_0 to f16.

Needs the `gguf` package (pip install 'slmkit[gguf]'), the writer maintained by the llama.cpp project.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmkit.checkpoint import find_checkpoint, load_checkpoint
from slmkit.config import ModelConfig
from slmkit.errors import UserError
from slmkit.fileio import atomic_path
from slmkit.interop.common import output_path
from slmkit.tokenizers import EOT, GPT2Tokenizer, HFByteLevelTokenizer, Tokenizer

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = "gpt2"
# Written into every file: how `--overwrite` knows a file is ours to replace.
OWNER_KEY = "slmkit.version"
F16_MAX = 65504.0

# token types of llama.cpp's vocabulary (gguf.TokenType)
NORMAL, CONTROL, UNUSED = 1, 3, 5


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError("--format gguf needs the gguf package: pip install 'slmkit[gguf]' (or pip install gguf)") \
            from None
    return gguf


# ----------------------------------------------------------------------------- what llama.cpp can run


def check_model(m: ModelConfig) -> None:
    """Refuse (one line) a model llama.cpp's gpt2 architecture would compute differently."""
    if m.ln != "pre":
        raise UserError("llama.cpp has no post-LN (GPT-1) architecture: only pre-LN (GPT-2 layout) runs export to "
                        "GGUF; this one has ln = post (export it with --format hf instead)")
    if m.gelu != "tanh":
        raise UserError("llama.cpp's gpt2 architecture uses the tanh GELU, and this model was trained with the exact "
                        "(erf) one (gelu = exact): its outputs would differ, so it is not exported to GGUF")


def _base_tokens(tok: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """Token strings (byte-level form, id order), their types and the merges, in rank order."""
    if isinstance(tok, GPT2Tokenizer):
        by_id = {i: t for t, i in tok.encoder.items()}
        tokens = [by_id[i] for i in range(len(by_id))]
        types = [CONTROL if t == EOT else NORMAL for t in tokens]
        return tokens, types, list(tok.merges)
    if isinstance(tok, HFByteLevelTokenizer):
        import json

        payload = json.loads(tok.hf.to_str())
        model = payload.get("model") or {}
        vocab = tok.hf.get_vocab(with_added_tokens=True)
        added = {t.get("content"): bool(t.get("special")) for t in payload.get("added_tokens", [])}
        n = max(vocab.values(), default=-1) + 1
        tokens, types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n
        for t, i in vocab.items():
            tokens[i], types[i] = t, (CONTROL if added.get(t) else NORMAL)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return tokens, types, merges
    kind = getattr(tok, "kind", type(tok).__name__)
    why = {"char": "a character vocabulary is not a BPE llama.cpp can load",
           "gpt1": "GPT-1's tokenizer (lower-cased, </w> word ends) has no llama.cpp equivalent"}
    raise UserError(f"llama.cpp cannot represent this run's {kind} tokenizer ({why.get(kind, 'not byte-level BPE')}); "
                    "only gpt2 and bpe tokenizers export to GGUF")


def vocabulary(tok: Tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str], int]:
    """(tokens, token types, merges, end-of-text id) for llama.cpp, padded to the embedding's `n_vocab` rows."""
    from slmkit.tokenizers.specials import WithSpecialsTokenizer

    appended: dict[int, str] = {}
    base = tok
    if isinstance(tok, WithSpecialsTokenizer):  # fine-tuning tokens appended after the base vocabulary
        appended = {tok.offset + i: t for i, t in enumerate(tok.tokens)}
        base = tok.base
    tokens, types, merges = _base_tokens(base)
    size = max([len(tokens), *(i + 1 for i in appended)])
    if size > n_vocab:
        raise UserError(f"the tokenizer has {size} tokens but the model's embedding has only {n_vocab} rows")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [UNUSED] * (n_vocab - len(types))
    for i, t in appended.items():
        tokens[i], types[i] = t, CONTROL
    eot = tok.special.get("eot")
    if eot is None:
        raise UserError(f"the tokenizer has no {EOT} token, which llama.cpp's gpt2 vocabulary needs as its "
                        "begin and end of text")
    return tokens, types, merges, eot


# ----------------------------------------------------------------------------- tensors


def _layer_names(i: int) -> dict[str, str]:
    p, b = f"transformer.h.{i}.", f"blk.{i}."
    return {p + "ln_1": b + "attn_norm", p + "attn.c_attn": b + "attn_qkv", p + "attn.c_proj": b + "attn_output",
            p + "ln_2": b + "ffn_norm", p + "mlp.c_fc": b + "ffn_up", p + "mlp.c_proj": b + "ffn_down"}


def tensor_plan(m: ModelConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(our name, GGUF name, shape in our [out, in] order) of every tensor llama.cpp's gpt2 loader needs.
    Biases come whether or not the model has them (llama.cpp requires them; missing ones are zeros)."""
    d, ff = m.n_embd, m.mlp_width
    plan = [("transformer.wte.weight", "token_embd.weight", (m.vocab_size, d)),
            ("transformer.wpe.weight", "position_embd.weight", (m.block_size, d))]
    for i in range(m.n_layer):
        shapes = {"attn_norm": (d,), "attn_qkv": (3 * d, d), "attn_output": (d, d), "ffn_norm": (d,),
                  "ffn_up": (ff, d), "ffn_down": (d, ff)}
        for ours, theirs in _layer_names(i).items():
            shape = shapes[theirs.split(".")[-1]]
            plan.append((ours + ".weight", theirs + ".weight", shape))
            plan.append((ours + ".bias", theirs + ".bias", shape[:1]))
    plan += [("transformer.ln_f.weight", "output_norm.weight", (d,)),
             ("transformer.ln_f.bias", "output_norm.bias", (d,))]
    return plan


def _encode(gguf: Any, name: str, data: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """`data` (float32) in the file's type for `name`: 1-D tensors and the position table stay f32."""
    Q = gguf.GGMLQuantizationType
    if dtype == "f32" or data.ndim < 2 or name == "position_embd.weight":
        return data, Q.F32
    if dtype == "q8_0":
        try:
            return gguf.quants.quantize(data, Q.Q8_0), Q.Q8_0
        except gguf.QuantError:  # rows not a multiple of 32: llama.cpp's converter falls back to f16 too
            dtype = "f16"
    if dtype == "f16":
        peak = float(np.abs(data).max(initial=0.0))
        if not np.isfinite(peak) or peak > F16_MAX:
            raise UserError(f"{name} holds values beyond f16's range (|x| up to {peak:.3g}); export with --dtype "
                            "bf16 or f32")
        return data.astype(np.float16), Q.F16
    return gguf.quants.quantize(data, Q.BF16), Q.BF16


# ----------------------------------------------------------------------------- the output file


def check_gguf_out(path: Path, overwrite: bool) -> None:
    """Refuse (one line) an output file slmkit may not write: a folder, a link, an existing file
    without --overwrite, or (even with it) a file that an earlier slmkit export did not write."""
    if path.is_symlink():
        raise UserError(f"--out {path} is a symbolic link; slmkit does not write through links it did not make")
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give the name of a .gguf file")
    if not path.exists():
        return
    if not overwrite:
        raise UserError(f"--out {path} already exists; pass --overwrite to replace it or choose another file")
    if not written_by_slmkit(path):
        raise UserError(f"--out {path} exists and is not a GGUF file slmkit exported; slmkit never replaces a "
                        "file it did not write (move it away or choose another name)")


def written_by_slmkit(path: Path) -> bool:
    """True for a GGUF file whose metadata carries slmkit's key. Only the header is read (gguf's own
    reader parses every token string first: seconds for GPT-2's vocabulary); anything unreadable is
    not ours."""
    try:
        with open(path, "rb") as f:
            return OWNER_KEY in _leading_keys(f, limit=8)
    except (OSError, ValueError, struct.error):
        return False


# GGUF value types (gguf.GGUFValueType) and the sizes of the fixed-width ones.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _leading_keys(f: Any, limit: int) -> list[str]:
    """The first `limit` metadata keys of the GGUF file open in `f` (little-endian, version 2 or 3)."""
    if f.read(4) != b"GGUF":
        return []
    version, _tensors, n_kv = struct.unpack("<IQQ", f.read(20))
    if version not in (2, 3):
        return []

    def string() -> str:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 1 << 20:
            raise ValueError("implausible string length")
        return f.read(n).decode("utf-8", errors="replace")

    def skip(vtype: int) -> None:
        if vtype in _SCALAR_SIZES:
            f.seek(_SCALAR_SIZES[vtype], 1)
        elif vtype == _STRING:
            string()
        elif vtype == _ARRAY:
            etype, count = struct.unpack("<IQ", f.read(12))
            if etype in _SCALAR_SIZES:
                f.seek(_SCALAR_SIZES[etype] * count, 1)
            else:
                for _ in range(count):
                    skip(etype)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")

    keys = []
    for _ in range(min(n_kv, limit)):
        keys.append(string())
        (vtype,) = struct.unpack("<I", f.read(4))
        skip(vtype)
    return keys


def export_gguf(run: str | Path, out: str | Path, which: str = "best", dtype: str = "f32",
                overwrite: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Write the run's model as the GGUF file `out` for llama.cpp's gpt2 architecture. The file appears
    only once complete (a temporary sibling renamed over it); an existing one is replaced only with
    `overwrite`, and only when an earlier slmkit export wrote it."""
    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype for GGUF must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    gguf = _gguf()
    target = output_path(out)
    check_gguf_out(target, overwrite)
    ckpt = load_checkpoint(find_checkpoint(run, which))
    m, tok = ckpt.config.model, ckpt.tokenizer
    check_model(m)
    tokens, types, merges, eot = vocabulary(tok, m.vocab_size)
    state = ckpt.model_state()
    plan = tensor_plan(m)
    for ours, _, shape in plan:
        got = state.get(ours)
        if got is None and not ours.endswith(".bias"):
            raise UserError(f"checkpoint {ckpt.path} lacks {ours}")
        if got is not None and tuple(got.shape) != shape:
            raise UserError(f"checkpoint {ckpt.path}: {ours} has shape {list(got.shape)}, expected {list(shape)}")
    head = state.get("lm_head.weight")
    untied = head is not None and not torch.equal(head, state["transformer.wte.weight"])

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    name = Path(run).resolve().name if Path(run).is_dir() else Path(run).stem

    def write(tmp: Path) -> None:
        from slmkit import __version__

        w = gguf.GGUFWriter(str(tmp), ARCH)
        w.add_name(name)
        w.add_string(OWNER_KEY, __version__)
        w.add_context_length(m.block_size)
        w.add_embedding_length(m.n_embd)
        w.add_feed_forward_length(m.mlp_width)
        w.add_block_count(m.n_layer)
        w.add_head_count(m.n_head)
        w.add_layer_norm_eps(m.layer_norm_epsilon)
        w.add_file_type(file_type)
        if dtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")  # GPT-2's split regex: tiktoken's and HF ByteLevel(use_regex=True)'s
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(eot)
        w.add_eos_token_id(eot)
        w.add_add_bos_token(False)  # slmkit feeds the text as it is; no token is prepended
        for ours, theirs, shape in plan:
            t = state.get(ours)
            if t is None:  # a bias-free model: zero biases compute the same function
                t = torch.zeros(shape)
            data = np.ascontiguousarray(t.detach().float().cpu().numpy())
            data, qtype = _encode(gguf, theirs, data, dtype)
            w.add_tensor(theirs, data, raw_dtype=qtype)
        if untied:
            data, qtype = _encode(gguf, "output.weight", np.ascontiguousarray(head.float().cpu().numpy()), dtype)
            w.add_tensor("output.weight", data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    if progress:
        progress(f"writing {target} ({dtype}, {len(plan) + untied} tensors)")
    with atomic_path(target) as tmp:
        write(tmp)
    return target


def describe(path: str | os.PathLike[str]) -> str:
    """One line about a GGUF file: size and tensor types (for the CLI's report)."""
    from collections import Counter

    from gguf import GGUFReader

    r = GGUFReader(path)
    kinds = Counter(t.tensor_type.name for t in r.tensors)
    size = Path(path).stat().st_size
    return f"{size / 1e6:.1f} MB, {len(r.tensors)} tensors (" + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")"
