"""Hugging Face directories in and out: the `gpt2` family (pre-LN) and `openai-gpt` (post-LN, GPT-1).

Import reads `config.json`, the weights (`model.safetensors`, a sharded safetensors index, or
`pytorch_model.bin` with `weights_only=True`) and the tokenizer files, one tensor at a time, and
writes an ordinary run directory. Export writes `config.json`, `model.safetensors` and the tokenizer
files that `transformers.AutoModelForCausalLM` / `AutoTokenizer` load with no custom code.
Neither direction needs `transformers` installed.

HF's Conv1D stores [in, out]; our linear layers store [out, in]: the four projection matrices of
every block are transposed on the way. Everything else maps one to one, except the names of the
two embeddings of `openai-gpt` (tokens_embed, positions_embed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from slmkit.checkpoint import find_checkpoint, load_checkpoint
from slmkit.config import ModelConfig, RunConfig, preset_config
from slmkit.errors import UserError
from slmkit.interop.common import check_shape, expected_shapes, prepare_out_dir, special_rows, write_run
from slmkit.interop.gpt1_tokenizer import EOW, GPT1_SPECIALS, GPT1Tokenizer, read_json_vocab, read_merges
from slmkit.interop.safetensors_io import iter_safetensors, write_safetensors
from slmkit.tokenizers import EOT, GPT2Tokenizer, HFByteLevelTokenizer, Tokenizer, bytes_to_unicode

FAMILIES = ("gpt2", "openai-gpt")
CONV_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON") from None
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
    return ModelConfig(
        vocab_size=int(get("vocab_size")), block_size=int(get("n_positions")), n_layer=int(get("n_layer")),
        n_head=int(get("n_head")), n_embd=int(get("n_embd")), n_inner=int(n_inner),
        dropout=float(hf.get("resid_pdrop", 0.0)), bias=True, ln="pre" if family == "gpt2" else "post",
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)), gelu=gelu,
    )


def weight_files(d: Path) -> tuple[str, list[Path]]:
    if (d / "model.safetensors").is_file():
        return "safetensors", [d / "model.safetensors"]
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise UserError(f"{index} is corrupted") from None
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise UserError(f"{d} lacks weight shard {missing[0]} listed in {index.name}")
        return "safetensors", [d / s for s in shards]
    if (d / "pytorch_model.bin").is_file():
        return "bin", [d / "pytorch_model.bin"]
    raise UserError(f"{d} holds no model.safetensors or pytorch_model.bin")


def iter_weights(d: Path, skip) -> Iterator[tuple[str, torch.Tensor]]:
    kind, files = weight_files(d)
    if kind == "safetensors":
        for f in files:
            yield from iter_safetensors(f, skip)
        return
    path = files[0]
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read {path} as plain tensors ({str(exc).splitlines()[0][:160]})") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path} does not hold a state dict")
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
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{p} is not valid JSON") from None


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
    d = resolve_source(str(src))
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
    for name, t in iter_weights(d, skip=lambda n: ours_from_hf(n, family) is None):
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
    out_dir = prepare_out_dir(out, overwrite)
    _set_data_tokenizer(cfg, tokenizer, out_dir)
    return write_run(out_dir, tensors, cfg, tokenizer, {"format": "hf", "model_type": family, "src": str(src)})


def _matching_preset(m: ModelConfig) -> str:
    for name in ("gpt2-124m", "gpt1"):
        p = preset_config(name).model
        if (p.n_layer, p.n_head, p.n_embd, p.mlp_width, p.block_size, p.vocab_size, p.ln) == \
                (m.n_layer, m.n_head, m.n_embd, m.mlp_width, m.block_size, m.vocab_size, m.ln):
            return name
    return ""


def _set_data_tokenizer(cfg: RunConfig, tok: Tokenizer, out_dir: Path) -> None:
    """Point the run's data settings at the vocabulary files, so `slm eval --dataset` can tokenize."""
    vocab = out_dir / "vocab"
    if isinstance(tok, GPT2Tokenizer):
        vocab.mkdir()
        (vocab / "encoder.json").write_text(json.dumps(tok.encoder, ensure_ascii=False), encoding="utf-8")
        (vocab / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(tok.merges) + "\n", encoding="utf-8")
        cfg.data.tokenizer, cfg.data.vocab_dir = "gpt2", str(vocab.resolve())
    elif isinstance(tok, GPT1Tokenizer):
        vocab.mkdir()
        (vocab / "encoder_bpe_40000.json").write_text(json.dumps(tok.encoder, ensure_ascii=False), encoding="utf-8")
        (vocab / "vocab_40000.bpe").write_text("#version: 0.2\n" + "\n".join(tok.merges) + "\n", encoding="utf-8")
        cfg.data.tokenizer, cfg.data.vocab_dir = "gpt1", str(vocab.resolve())
    else:
        cfg.data.tokenizer = tok.kind
    cfg.data.vocab_size = tok.vocab_size


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
              overwrite: bool = False) -> Path:
    ckpt = load_checkpoint(find_checkpoint(run, which))
    m, tok = ckpt.config.model, ckpt.tokenizer
    family = "gpt2" if m.ln == "pre" else "openai-gpt"
    if with_tokenizer and tok.kind == "char":
        raise UserError("a character-level tokenizer has no Hugging Face tokenizer class; export the weights "
                        "alone with --no-tokenizer and tokenize with slmkit")
    hf_cfg = hf_config_for(m, tok)
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

    out_dir = prepare_out_dir(out, overwrite)
    write_safetensors(out_dir / "model.safetensors", specs, produce, metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if with_tokenizer:
        write_hf_tokenizer(tok, out_dir, m.block_size)
    return out_dir


def _with_bias(m: ModelConfig) -> ModelConfig:
    from dataclasses import replace

    return replace(m, bias=True)


def write_hf_tokenizer(tok: Tokenizer, d: Path, max_len: int) -> None:
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    config: dict[str, Any] = {"model_max_length": max_len}
    if isinstance(tok, HFByteLevelTokenizer):
        (d / "tokenizer.json").write_text(tok.hf.to_str(), encoding="utf-8")
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
        hf.save(str(d / "tokenizer.json"))
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
        hf.save(str(d / "tokenizer.json"))
        config.update(tokenizer_class="OpenAIGPTTokenizer", unk_token=tok.unk)
        added = {str(tok.special_ids[s]): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                                           "normalized": False, "single_word": False} for s in tok.specials}
        config["added_tokens_decoder"] = added
    else:
        raise UserError(f"a {tok.kind} tokenizer has no Hugging Face tokenizer class; export with --no-tokenizer")
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_vocab_merges(d: Path, encoder: dict[str, int], merges: list[str]) -> None:
    (d / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
