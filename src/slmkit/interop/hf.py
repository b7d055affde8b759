"""Hugging Face directories in and out: the `gpt2` family (pre-LN) and `openai-gpt` (post-LN, GPT-1).

Import reads `config.json`, the weights (`model.safetensors`, a sharded safetensors index, or
`pytorch_model.bin` with `weights_only=True`) and the tokenizer files, one tensor at a time, and
writes an ordinary run directory. Export writes `config.json`, `model.safetensors`, a model card
(`README.md`) and the tokenizer files that `transformers.AutoModelForCausalLM` / `AutoTokenizer` load
with no custom code.
Neither direction needs `transformers` installed.

HF's Conv1D stores [in, out]; our linear layers store [out, in]: the four projection matrices of
every block are transposed on the way. Everything else maps one to one, except the names of the
two embeddings of `openai-gpt` (tokens_embed, positions_embed).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from slmkit.checkpoint import BEST, find_checkpoint, load_checkpoint
from slmkit.config import ModelConfig, RunConfig, preset_config
from slmkit.errors import UserError
from slmkit.fileio import atomic_write, atomic_write_json, atomic_write_text, read_json, read_marker
from slmkit.interop.common import (
    check_out,
    check_shape,
    expected_shapes,
    output_path,
    special_rows,
    staged_output,
    write_run,
)
from slmkit.interop.safetensors_io import iter_safetensors, write_safetensors
from slmkit.tokenizers import EOT, GPT2Tokenizer, HFByteLevelTokenizer, Tokenizer, bytes_to_unicode
from slmkit.tokenizers.gpt1 import EOW, GPT1_SPECIALS, GPT1Tokenizer, read_json_vocab, read_merges

FAMILIES = ("gpt2", "openai-gpt")
CONV_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# ----------------------------------------------------------------------------- source folder


def resolve_source(src: str) -> Path:
    """A local folder, or a Hub repo id downloaded first (needs huggingface_hub and a network)."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    if p.exists() or not _REPO_ID.match(src) or src.startswith("."):
        raise UserError(f"--src {src} is not a directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"--src {src} is not a local directory, and huggingface_hub is not installed to "
                        "download it (pip install huggingface_hub)") from None
    try:
        folder = Path(snapshot_download(repo_id=src, allow_patterns=HUB_FILES + ["model-*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id=src, allow_patterns=HUB_FILES + ["pytorch_model.bin"]))
    except Exception as exc:  # offline, unknown repo, gated repo: all the same to the user
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot download {src} from the Hugging Face Hub (offline? pass a local directory): "
                        f"{reason}") from None
    return folder


def read_hf_config(d: Path) -> dict[str, Any]:
    path = d / "config.json"
    if not path.is_file():
        raise UserError(f"{d} holds no config.json: not a Hugging Face model directory")
    cfg = read_json(path, "model config")
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a JSON object")
    family = cfg.get("model_type")
    if family not in FAMILIES:
        arch = ", ".join(cfg.get("architectures") or []) or "none given"
        raise UserError(f"unknown architecture in {path}: model_type {family!r} ({arch}); "
                        "slmkit imports gpt2 and openai-gpt")
    return cfg


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    family = hf["model_type"]

    def get(key: str, default: Any = None) -> Any:
        if hf.get(key, default) is None:
            raise UserError(f"config.json has no {key}")
        return hf.get(key, default)

    gelu = "tanh"
    if family == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in (*TANH_GELUS, "gelu"):
            raise UserError(f"config.json activation_function {act!r} is not supported: slmkit's GPT has the "
                            "tanh GELU (gelu_new) or the exact one (gelu)")
        gelu = "exact" if act == "gelu" else "tanh"
        for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                        ("scale_attn_weights", True)):
            if hf.get(key, ok) != ok:
                raise UserError(f"config.json sets {key} = {hf[key]}, which slmkit's GPT does not implement")
        n_inner = hf.get("n_inner") or 0
    else:
        act = hf.get("afn", "gelu")
        if act != "gelu":  # in HF's openai-gpt code "gelu" is the tanh approximation (gelu_new), as in GPT-1
            raise UserError(f"config.json afn {act!r} is not supported: slmkit's GPT uses the tanh GELU (afn gelu)")
        n_inner = 0
    try:
        return ModelConfig(
            vocab_size=int(get("vocab_size")), block_size=int(get("n_positions")), n_layer=int(get("n_layer")),
            n_head=int(get("n_head")), n_embd=int(get("n_embd")), n_inner=int(n_inner),
            dropout=float(hf.get("resid_pdrop", 0.0)), bias=True, ln="pre" if family == "gpt2" else "post",
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)), gelu=gelu,
        )
    except (TypeError, ValueError, OverflowError) as exc:  # "12" is fine; "twelve", [12] or null are not
        raise UserError(f"config.json holds a value that is not a number ({_first_line(exc)})") from None


def source_root(src: str, d: Path) -> Path:
    """The folder every weight shard must lie in: the model folder itself, or for a Hub download the
    repository's cache folder (a snapshot's files are links into its `blobs/`)."""
    real = d.resolve()
    if not Path(src).expanduser().is_dir() and real.parent.name == "snapshots":
        return real.parent.parent
    return real


def _shard_path(d: Path, root: Path, index: Path, name: str) -> Path:
    """`name` from the shard index as a real path inside `root`; an index is data from a stranger, and
    `../../etc/passwd`, an absolute path or a link leading out must not be read."""
    try:
        real = (d / name).resolve()
        inside = real.is_relative_to(root)
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte in the name
        inside = False
    if not inside:
        raise UserError(f"{index} lists shard {name[:120]!r}, which lies outside {d}; refused (shards must be "
                        "files inside the model folder)")
    if not real.is_file():
        raise UserError(f"{d} lacks weight shard {name[:120]!r} listed in {index.name}")
    return real


def _shard_names(index: Path) -> list[str]:
    data = read_json(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(v, str) and v for v in weight_map.values()):
        raise UserError(f"{index} is malformed: it needs a \"weight_map\" object mapping tensor names to shard "
                        "file names")
    return sorted(set(weight_map.values()))


def weight_files(d: Path, root: Path | None = None) -> tuple[str, list[Path]]:
    if (d / "model.safetensors").is_file():
        return "safetensors", [d / "model.safetensors"]
    index = d / "model.safetensors.index.json"
    if index.is_file():
        root = root or d.resolve()
        return "safetensors", [_shard_path(d, root, index, name) for name in _shard_names(index)]
    if (d / "pytorch_model.bin").is_file():
        return "bin", [d / "pytorch_model.bin"]
    raise UserError(f"{d} holds no model.safetensors or pytorch_model.bin")


def _first_line(exc: BaseException) -> str:
    """One clean line of an exception's text: no terminal escape codes, no control characters."""
    text = _ANSI.sub("", str(exc))
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    line = "".join(c if c.isprintable() else " " for c in line)
    return line if len(line) <= 160 else line[:157] + "..."


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A `pytorch_model.bin` state dict, unpickled with `weights_only=True`: plain tensors, never code."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own text is many lines with terminal codes, and suggests weights_only=False: never that.
        what = "holds Python objects other than tensors" if "GLOBAL" in str(exc) else \
            "is not a plain tensor file (corrupted, or it holds pickled Python code)"
        raise UserError(f"{path} {what}; refused (slmkit never unpickles code). Convert it to safetensors with "
                        "a tool you trust, or use the model's model.safetensors") from None
    except Exception as exc:  # a truncated or corrupted zip, an unreadable file
        raise UserError(f"cannot read {path} as a PyTorch state dict: {_first_line(exc)}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return sd


def iter_weights(d: Path, skip: Callable[[str], bool], root: Path | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    kind, files = weight_files(d, root)
    if kind == "safetensors":
        for f in files:
            yield from iter_safetensors(f, skip)
        return
    sd = load_bin(files[0])
    for name in list(sd):
        if not skip(name):
            yield name, sd.pop(name)


# ----------------------------------------------------------------------------- names


def ours_from_hf(name: str, family: str) -> str | None:
    """Our parameter name for a HF tensor name; None for buffers we do not keep (attention masks)."""
    n = name.removeprefix("transformer.")
    if n == "lm_head.weight":
        return "lm_head.weight"
    if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", n):
        return None
    if family == "openai-gpt":
        n = {"tokens_embed.weight": "wte.weight", "positions_embed.weight": "wpe.weight"}.get(n, n)
    return "transformer." + n


def hf_from_ours(name: str, family: str) -> str:
    n = name.removeprefix("transformer.")
    if family == "openai-gpt":
        n = {"wte.weight": "tokens_embed.weight", "wpe.weight": "positions_embed.weight"}.get(n, n)
    return "transformer." + n


def is_conv(ours: str) -> bool:
    return ours.startswith("transformer.h.") and ours.endswith(CONV_WEIGHTS)


# ----------------------------------------------------------------------------- tokenizers in


def _gpt2_ids_are_ranks(encoder: dict[str, int], merges: list[str]) -> bool:
    """tiktoken ranks merges by token id: true of GPT-2's files (bytes 0..255, then merge i = id 256+i)."""
    byte_chars = bytes_to_unicode().values()
    if any(encoder.get(c, 256) > 255 for c in byte_chars):
        return False
    last = 255
    for m in merges:
        parts = m.split(" ")
        tid = encoder.get("".join(parts)) if len(parts) == 2 else None
        if tid is None or tid <= last:
            return False
        last = tid
    return len(encoder) - (EOT in encoder) == 256 + len(merges)


def _tokenizer_json(d: Path) -> dict[str, Any] | None:
    p = d / "tokenizer.json"
    if not p.is_file():
        return None
    tj = read_json(p, "tokenizer file")
    if not isinstance(tj, dict):
        raise UserError(f"{p} is not a JSON object")
    return tj


def _merges_of(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def read_hf_tokenizer(d: Path, family: str) -> Tokenizer:
    tj = _tokenizer_json(d)
    if family == "openai-gpt":
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return GPT1Tokenizer(read_json_vocab(d / "vocab.json"), read_merges(d / "merges.txt"))
        if tj and tj.get("model", {}).get("type") == "BPE":
            return GPT1Tokenizer(tj["model"]["vocab"], _merges_of(tj["model"]))
        raise UserError(f"{d} holds no GPT-1 tokenizer files (vocab.json + merges.txt, or tokenizer.json)")
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        encoder, merges = read_json_vocab(d / "vocab.json"), read_merges(d / "merges.txt")
        if _gpt2_ids_are_ranks(encoder, merges):
            return GPT2Tokenizer(encoder, merges)
    if tj is not None:
        model = tj.get("model", {})
        if model.get("type") == "BPE" and _gpt2_ids_are_ranks(model.get("vocab", {}), _merges_of(model)) \
                and all(t.get("content") == EOT for t in tj.get("added_tokens", [])):
            return GPT2Tokenizer(model["vocab"], _merges_of(model))
        from tokenizers import Tokenizer as HFTokenizer

        pre = json.dumps(tj.get("pre_tokenizer"))
        if model.get("type") != "BPE" or "ByteLevel" not in pre:
            raise UserError(f"{d / 'tokenizer.json'} is not a byte-level BPE tokenizer")
        return HFByteLevelTokenizer(HFTokenizer.from_file(str(d / "tokenizer.json")))
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        raise UserError(f"the ids in {d / 'vocab.json'} are not GPT-2 merge ranks; add the tokenizer.json "
                        "that goes with them")
    raise UserError(f"{d} holds no GPT-2 tokenizer files (vocab.json + merges.txt, or tokenizer.json)")


# ----------------------------------------------------------------------------- import


def import_hf(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Import the HF model in `src` into the run directory `out`; returns its checkpoint's path.
    `out` appears only once complete; with `overwrite`, only files slmkit wrote there are replaced."""
    target = output_path(out)
    check_out(target, "import", overwrite)
    d = resolve_source(str(src))
    root = source_root(str(src), d)
    hf = read_hf_config(d)
    family = hf["model_type"]
    mcfg = model_config_from_hf(hf)
    tokenizer = read_hf_tokenizer(d, family)
    hf_vocab = mcfg.vocab_size
    add_specials = 0
    if family == "openai-gpt":
        if hf_vocab == tokenizer.base_size:
            add_specials = len(GPT1_SPECIALS)  # HF's openai-gpt has no fine-tuning tokens: add GPT-1's three
        elif hf_vocab != tokenizer.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer.base_size} tokens (+{len(GPT1_SPECIALS)} special) but "
                            f"config.json vocab_size is {hf_vocab}")
        mcfg.vocab_size = tokenizer.vocab_size
    elif hf_vocab != tokenizer.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but config.json vocab_size is {hf_vocab}")
    want = expected_shapes(mcfg)
    tensors: dict[str, torch.Tensor] = {}
    head: torch.Tensor | None = None
    unexpected: list[str] = []
    for name, t in iter_weights(d, lambda n: ours_from_hf(n, family) is None, root):
        ours = ours_from_hf(name, family)
        if ours == "lm_head.weight":
            head = t
            continue
        if ours not in want:
            unexpected.append(name)
            continue
        shape = want[ours]
        if ours == "transformer.wte.weight":
            if t.shape[0] != hf_vocab:
                raise UserError(f"config.json vocab_size is {hf_vocab} but {name} has {t.shape[0]} rows")
            shape = (hf_vocab, shape[1])
        check_shape(name, tuple(t.shape), shape[::-1] if is_conv(ours) else shape, str(d))
        t = t.float()
        if is_conv(ours):
            t = t.t().contiguous()
        if ours == "transformer.wte.weight" and add_specials:
            t = torch.cat([t, special_rows(add_specials, t.shape[1])])
        tensors[ours] = t
    if unexpected:
        raise UserError(f"unexpected tensor {unexpected[0]} in {d} (not part of a {family} model)")
    missing = [k for k in want if k not in tensors]
    if missing:
        raise UserError(f"{d} lacks tensor {hf_from_ours(missing[0], family)}")
    if head is not None:
        wte = tensors["transformer.wte.weight"][:hf_vocab]
        if head.shape != wte.shape or not torch.equal(head.float(), wte):
            raise UserError("lm_head.weight differs from the token embedding: slmkit ties the output head to it")
        del head
    preset = _matching_preset(mcfg)
    cfg = preset_config(preset) if preset else RunConfig()
    cfg.model = mcfg
    with staged_output(target, "import", overwrite, last=BEST) as stage:
        _write_vocab(cfg, tokenizer, stage, target)
        write_run(stage, tensors, cfg, tokenizer, {"format": "hf", "model_type": family, "src": str(src)})
    return target / BEST


def _matching_preset(m: ModelConfig) -> str:
    for name in ("gpt2-124m", "gpt1"):
        p = preset_config(name).model
        if (p.n_layer, p.n_head, p.n_embd, p.mlp_width, p.block_size, p.vocab_size, p.ln) == \
                (m.n_layer, m.n_head, m.n_embd, m.mlp_width, m.block_size, m.vocab_size, m.ln):
            return name
    return ""


def _write_vocab(cfg: RunConfig, tok: Tokenizer, stage: Path, target: Path) -> None:
    """Write the vocabulary files into the run folder itself and point the run's data settings at it
    (its final place, `target`), so `slm eval --dataset` can tokenize. One flat folder: the staged
    write replaces files, and a vocabulary subfolder could not be replaced on --overwrite."""
    if isinstance(tok, GPT2Tokenizer):
        atomic_write_text(stage / "encoder.json", json.dumps(tok.encoder, ensure_ascii=False))
        atomic_write_text(stage / "vocab.bpe", "#version: 0.2\n" + "\n".join(tok.merges) + "\n")
        cfg.data.tokenizer, cfg.data.vocab_dir = "gpt2", str(target)
    elif isinstance(tok, GPT1Tokenizer):
        atomic_write_text(stage / "encoder_bpe_40000.json", json.dumps(tok.encoder, ensure_ascii=False))
        atomic_write_text(stage / "vocab_40000.bpe", "#version: 0.2\n" + "\n".join(tok.merges) + "\n")
        cfg.data.tokenizer, cfg.data.vocab_dir = "gpt1", str(target)
    else:
        cfg.data.tokenizer = tok.kind
    cfg.data.bpe_vocab_size = tok.vocab_size


# ----------------------------------------------------------------------------- export


def hf_config_for(m: ModelConfig, tok: Tokenizer | None) -> dict[str, Any]:
    eot = tok.special.get("eot") if tok is not None else None
    common = {"vocab_size": m.vocab_size, "n_positions": m.block_size, "n_embd": m.n_embd, "n_layer": m.n_layer,
              "n_head": m.n_head, "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
              "layer_norm_epsilon": m.layer_norm_epsilon, "initializer_range": 0.02, "tie_word_embeddings": True,
              "dtype": "float32"}
    if m.ln == "pre":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_inner": m.n_inner or None, "activation_function": "gelu_new" if m.gelu == "tanh" else "gelu",
                "bos_token_id": eot, "eos_token_id": eot}
    if m.mlp_width != 4 * m.n_embd:
        raise UserError(f"HF openai-gpt has a fixed MLP width of 4 x n_embd = {4 * m.n_embd}; this model's is "
                        f"{m.mlp_width}, which no Hugging Face class loads without custom code")
    # afn "gelu" is the tanh GELU in HF's openai-gpt code (its ACT_FNS maps it to gelu_new).
    if m.gelu != "tanh":
        raise UserError("HF openai-gpt has only the tanh GELU; this model uses the exact one (export a pre-LN "
                        "model to GPT-2's format, which has both)")
    return {"architectures": ["OpenAIGPTLMHeadModel"], "model_type": "openai-gpt", **common, "afn": "gelu"}


def export_hf(run: str | Path, out: str | Path, which: str = "best", with_tokenizer: bool = True,
              overwrite: bool = False, card_datasets: list[str] | tuple[str, ...] = ()) -> Path:
    """Write the run's model as a Hugging Face folder `out`, with its model card (README.md, see
    `slmkit.interop.card`, which names `card_datasets` as the training data); it appears only once
    complete, and with `overwrite` only files an earlier export wrote there are replaced."""
    from slmkit.interop.card import model_card

    target = output_path(out)
    check_out(target, "export", overwrite)
    ckpt = load_checkpoint(find_checkpoint(run, which))
    m, tok = ckpt.config.model, ckpt.tokenizer
    family = "gpt2" if m.ln == "pre" else "openai-gpt"
    if with_tokenizer and tok.kind == "char":
        raise UserError("a character-level tokenizer has no Hugging Face tokenizer class; export the weights "
                        "alone with --no-tokenizer and tokenize with slmkit")
    hf_cfg = hf_config_for(m, tok)
    card = model_card(ckpt.path, which, card_datasets, with_tokenizer=with_tokenizer)
    state = ckpt.model_state()
    want = expected_shapes(m)
    if not m.bias:  # HF has no bias-free GPT-2: zero biases compute exactly the same function
        want_bias = {k: s for k, s in expected_shapes(_with_bias(m)).items() if k not in want}
        state.update({k: torch.zeros(s) for k, s in want_bias.items()})
        want.update(want_bias)
    specs = []
    names = {}
    for ours, shape in want.items():
        hf_name = hf_from_ours(ours, family)
        names[hf_name] = ours
        specs.append((hf_name, shape[::-1] if is_conv(ours) else shape, torch.float32))

    def produce(hf_name: str) -> torch.Tensor:
        t = state[names[hf_name]].float()
        return t.t() if is_conv(names[hf_name]) else t

    with staged_output(target, "export", overwrite, last="model.safetensors") as stage:
        write_safetensors(stage / "model.safetensors", specs, produce, metadata={"format": "pt"})
        atomic_write_json(stage / "config.json", hf_cfg)
        if with_tokenizer:
            write_hf_tokenizer(tok, stage, m.block_size)
        _stage_card(target, stage, card)
    return target


def _stage_card(target: Path, stage: Path, card: str) -> None:
    """The model card, unless `target` already has a README.md: a card is there to be edited (its
    license, its datasets), so an existing one is never replaced. One an earlier export wrote goes
    back unchanged (leaving it out would delete it with the rest of the old output); the user's own
    is not staged at all."""
    from slmkit.interop.card import CARD

    existing = target / CARD
    if not (existing.exists() or existing.is_symlink()):
        atomic_write_text(stage / CARD, card)
        return
    if CARD in (read_marker(target) or {}).get("files", []) and existing.is_file() and not existing.is_symlink():
        shutil.copy2(existing, stage / CARD)
    print(f"note: kept the existing {existing} (it may hold your edits); slm card --run RUN prints a fresh card",
          file=sys.stderr)


def _with_bias(m: ModelConfig) -> ModelConfig:
    from dataclasses import replace

    return replace(m, bias=True)


def write_hf_tokenizer(tok: Tokenizer, d: Path, max_len: int) -> None:
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    config: dict[str, Any] = {"model_max_length": max_len}
    if isinstance(tok, HFByteLevelTokenizer):
        atomic_write_text(d / "tokenizer.json", tok.hf.to_str())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if "eot" in tok.special:
            config.update(bos_token=EOT, eos_token=EOT)
    elif isinstance(tok, GPT2Tokenizer):
        _write_vocab_merges(d, {t: i for t, i in tok.encoder.items()}, tok.merges)
        hf = HFTokenizer(models.BPE(vocab=tok.encoder, merges=[tuple(m.split(" ")) for m in tok.merges],
                                    fuse_unk=False))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        hf.post_processor = processors.ByteLevel(trim_offsets=False)
        hf.add_special_tokens([AddedToken(EOT, special=True)])
        _save_hf(hf, d / "tokenizer.json")
        config.update(tokenizer_class="GPT2Tokenizer", bos_token=EOT, eos_token=EOT, unk_token=EOT,
                      add_prefix_space=False)
    elif isinstance(tok, GPT1Tokenizer):
        _write_vocab_merges(d, tok.encoder, tok.merges)
        hf = HFTokenizer(models.BPE(vocab=tok.encoder, merges=[tuple(m.split(" ")) for m in tok.merges],
                                    unk_token=tok.unk, end_of_word_suffix=EOW, fuse_unk=False))
        hf.normalizer = normalizers.BertNormalizer(lowercase=True)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.BPEDecoder(suffix=EOW)
        hf.add_special_tokens([AddedToken(s, special=True) for s in tok.specials])
        _save_hf(hf, d / "tokenizer.json")
        config.update(tokenizer_class="OpenAIGPTTokenizer", unk_token=tok.unk)
        added = {str(tok.special_ids[s]): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                                           "normalized": False, "single_word": False} for s in tok.specials}
        config["added_tokens_decoder"] = added
    else:
        raise UserError(f"a {tok.kind} tokenizer has no Hugging Face tokenizer class; export with --no-tokenizer")
    atomic_write_json(d / "tokenizer_config.json", config)


def _save_hf(hf: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: hf.save(str(tmp)))


def _write_vocab_merges(d: Path, encoder: dict[str, int], merges: list[str]) -> None:
    atomic_write_text(d / "vocab.json", json.dumps(encoder, ensure_ascii=False))
    atomic_write_text(d / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
