"""`slm prepare`, `slm train`, `slm info` and `slm tokenize`: data, pre-training and inspection.

Their settings are RunConfig's (model, data and train sections), one flag per field."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from slmkit.cli.common import add_json, add_out_dir, add_text_input, emit, read_text_arg, read_text_file
from slmkit.cli.flags import Parser, add_config_flags, config_flags
from slmkit.config import PRESETS, DataConfig, RunConfig, resolve_config
from slmkit.errors import UserError

# ----------------------------------------------------------------------------- commands


def cmd_prepare(args: argparse.Namespace) -> None:
    from slmkit.data import names_prepared_folder, prepare

    cfg = resolve_config(args.preset, args.config, config_flags(args))
    given = names_prepared_folder(cfg.data)  # a prepared folder as --dataset: checked, not prepared
    # verify: a sharded folder that is reused, or given as --dataset, has every shard's sha256 checked
    data = prepare(cfg.data, out_dir=args.out_dir, workers=args.workers, shard_tokens=args.shard_tokens, verify=True)
    m = data.meta
    shards = sum(len(v) for v in m["shards"].values()) if "shards" in m else 0
    where = f" in {shards} shards" if shards else ""
    checked = " (every shard matches its sha256)" if given and shards else ""
    print(f"prepared {m['source']}: {m['tokens']['train']:,} train + {m['tokens']['val']:,} val tokens{where}, "
          f"{data.tokenizer.describe()}{checked} -> {data.dir}")


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / (cfg.preset or "run")


def cmd_train(args: argparse.Namespace) -> None:
    from slmkit.train import init_config, resume_config, train

    flags = config_flags(args)
    note = None
    init_from = flags.get("train", {}).pop("init_from", "")
    if args.resume:
        if init_from:
            raise UserError("--resume continues a run, which started from its own weights; drop --init-from")
        run_dir = Path(args.resume)
        cfg = resume_config(run_dir, flags)
    elif init_from:
        if args.preset or args.config:
            raise UserError("--init-from takes the configuration of the run it starts from; change it with flags, "
                            "not --preset or --config")
        cfg = init_config(init_from, flags)
        run_dir = Path(args.out_dir) if args.out_dir else Path("runs") / f"{Path(init_from).name}-continued"
    else:
        cfg, note = _new_run_config(args, flags)
        run_dir = Path(args.out_dir) if args.out_dir else default_run_dir(cfg)
    result = train(cfg, run_dir, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.quiet,
                   force=args.force, note=None if args.quiet else note)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun the result is printed once, by rank 0
    final = f", full val loss {result.final_val_loss:.4f}" if result.final_val_loss is not None else ""
    print(f"done: {result.step} steps, best val loss {result.best_val_loss:.4f}{final}, "
          f"{result.params / 1e6:.2f}M params, {result.tokens_per_s:,.0f} tokens/s -> {run_dir}")


def _new_run_config(args: argparse.Namespace, flags: dict) -> tuple[RunConfig, str | None]:
    """The configuration of a new run, and a note when no preset or config file chose it."""
    from slmkit.train import default_preset

    preset, note = args.preset, None
    if not preset and not args.config:
        preset = default_preset(flags.get("train", {}).get("device", "auto"))
        if preset:
            note = (f"no --preset or --config given: on this CPU slmkit trains the {preset} preset, the CPU "
                    "recipe (--preset shakespeare-char for the 10.8M-parameter model)")
    return resolve_config(preset, args.config, flags), note


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from slmkit.model import GPT

    if args.run:
        from slmkit.checkpoint import find_checkpoint, load_checkpoint

        ckpt = load_checkpoint(find_checkpoint(args.run))
        cfg, source = ckpt.config, str(args.run)
        tok_desc = ckpt.tokenizer.describe()
    else:
        cfg = resolve_config(args.preset, args.config, config_flags(args), need_vocab_dir=False)
        source = f"preset {args.preset}" if args.preset else "defaults"
        vocab, tok_desc = configured_vocabulary(cfg.data)
        cfg.model.vocab_size = cfg.model.vocab_size or vocab
    with torch.device("meta"):  # count parameters without allocating them (GPT-2 XL fits anywhere)
        model = GPT(cfg.model)
    b = model.param_breakdown()
    payload = {"source": source, "model": cfg.model.__dict__, "tokenizer": tok_desc,
               "params": b.as_dict(), "params_millions": round(b.total / 1e6, 3)}
    rows = [("token embedding (wte)", b.token_embedding), ("position embedding (wpe)", b.position_embedding),
            ("attention", b.attention), ("MLP", b.mlp), ("layer norms", b.layer_norm),
            ("LM head", b.head)]
    m = cfg.model
    lines = [f"{source}: {b.total / 1e6:.2f}M parameters",
             f"  {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, MLP {m.mlp_width}, block {m.block_size}, "
             f"vocab {m.vocab_size}, {m.ln}-LN, dropout {m.dropout}, bias {m.bias}",
             f"  vocabulary: {tok_desc}"]
    for name, n in rows:
        note = "  (tied to the token embedding)" if name == "LM head" and n == 0 else ""
        lines.append(f"  {name:<26}{n:>14,}  {100 * n / b.total:5.1f}%{note}")
    emit(args, payload, "\n".join(lines))


def configured_vocabulary(data: DataConfig) -> tuple[int, str]:
    """(size, description) of the vocabulary a configuration trains with, read, never assumed: a
    character model's is its corpus's distinct characters; a published one's is read from --vocab-dir,
    or, without it, is that vocabulary's published size, said as such."""
    from slmkit.config import PUBLISHED_VOCAB_SIZES
    from slmkit.data import NAMED_DATASETS, is_prepared_folder, open_prepared, read_corpus

    if data.dataset not in NAMED_DATASETS and is_prepared_folder(data.dataset):
        tok = open_prepared(data.dataset).tokenizer
        return tok.vocab_size, f"{tok.describe()}, from the prepared dataset {data.dataset}"
    if data.tokenizer == "char":
        text, source = read_corpus(data)
        chars = len(set(text))
        return chars, f"char: {chars} distinct characters of {source}"
    if data.tokenizer == "bpe":
        return data.bpe_vocab_size, (f"bpe: {data.bpe_vocab_size:,} tokens (bpe_vocab_size), trained on the corpus "
                                     "when prepared")
    if data.vocab_dir:
        from slmkit.tokenizers import named_tokenizer

        tok = named_tokenizer(data.tokenizer, data.vocab_dir)
        return tok.vocab_size, f"{tok.describe()}, read from {data.vocab_dir}"
    size = PUBLISHED_VOCAB_SIZES[data.tokenizer]
    known = {"gpt2": "GPT-2's 50,257 tokens", "gpt1": "GPT-1's 40,478 tokens + 3 fine-tuning tokens"}
    return size, (f"{data.tokenizer}: {size:,} tokens, the published size ({known[data.tokenizer]}); "
                  "the files are read with --vocab-dir")


def cmd_tokenize(args: argparse.Namespace) -> None:
    tok = _tokenizer(args)
    if args.decode is not None:
        raw = args.decode if args.decode != "-" else read_text_file("-")
        try:
            ids = [int(x) for x in raw.replace(",", " ").split()]
        except ValueError:
            raise UserError("--decode takes token ids: integers separated by spaces or commas") from None
        ids = tok.check_ids(ids)
        text = tok.decode(ids)
        emit(args, {"ids": ids, "text": text}, text)
        return
    text = read_text_arg(args)
    ids = tok.encode(text)
    strings = tok.token_strings(ids)
    payload = {"ids": ids, "tokens": strings, "count": len(ids), "chars": len(text),
               "chars_per_token": len(text) / max(len(ids), 1)}
    emit(args, payload, f"{len(ids)} tokens, {len(text)} chars ({len(text) / max(len(ids), 1):.2f} chars/token)\n"
                        f"ids: {' '.join(map(str, ids))}\ntokens: {strings}")


def _tokenizer(args: argparse.Namespace):
    """The tokenizer of --run (a run's tokenizer.json, or a checkpoint's), or the published --tokenizer."""
    from slmkit.tokenizers import load_tokenizer, named_tokenizer

    if args.run:
        p = Path(args.run)
        if p.is_dir() and (p / "tokenizer.json").is_file():
            return load_tokenizer(p / "tokenizer.json")
        from slmkit.checkpoint import find_checkpoint, load_checkpoint

        return load_checkpoint(find_checkpoint(p)).tokenizer
    if args.tokenizer:
        return named_tokenizer(args.tokenizer, args.vocab_dir or "")
    raise UserError("give --run RUN_DIR or --tokenizer NAME")


# ----------------------------------------------------------------------------- parsers


def _preset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"start from a preset: {', '.join(PRESETS)}")
    p.add_argument("--config", help="TOML or YAML file of settings (flags override it; it overrides the preset)")


def _build_prepare(p: Parser) -> None:
    _preset_args(p)
    add_out_dir(p, "write the prepared files to this folder instead of the cache")
    p.add_argument("--workers", type=int, metavar="N",
                   help="tokenize in N processes, streaming the corpus into token shards with flat memory "
                        "(default: all cores; the sharded path is taken when this or --shard-tokens is given, "
                        "or the corpus is over 256 MB)")
    p.add_argument("--shard-tokens", type=int, metavar="M",
                   help="tokens per shard file (default 134217728: 256 MiB of uint16)")
    add_config_flags(p, ("data",))
    p.set_defaults(func=cmd_prepare)


def _build_train(p: Parser) -> None:
    _preset_args(p)
    add_out_dir(p, "run directory (default: runs/PRESET)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out-dir")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--force", action="store_true",
                   help="train even when the memory estimate exceeds the memory that is free")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)


def _build_info(p: Parser) -> None:
    p.add_argument("--run", help="run directory or checkpoint")
    _preset_args(p)
    add_json(p)
    add_config_flags(p, ("model", "data"))
    p.set_defaults(func=cmd_info)


def _build_tokenize(p: Parser) -> None:
    p.add_argument("--run", help="run directory or checkpoint whose tokenizer to use")
    p.add_argument("--tokenizer", choices=("gpt2", "gpt1"), help="a published tokenizer instead of a run's")
    p.add_argument("--vocab-dir", help="its files: encoder.json + vocab.bpe (gpt2), encoder_bpe_40000.json + "
                                       "vocab_40000.bpe (gpt1)")
    add_text_input(p)
    p.add_argument("--decode", help="token ids to turn back into text ('-' = stdin)")
    add_json(p)
    p.set_defaults(func=cmd_tokenize)


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("prepare", help="corpus -> tokenizer -> train.bin/val.bin token files", build=_build_prepare)
    sub.add_parser("train", help="pre-train (or continue) a model; prepares --dataset on the fly", build=_build_train)


def register_inspection(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("info", help="a model's or preset's configuration and parameter count", build=_build_info)
    sub.add_parser("tokenize", help="text -> token ids and strings (or ids -> text with --decode)",
                   build=_build_tokenize)
