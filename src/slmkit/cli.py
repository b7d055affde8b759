"""`slm`: argument parsing only; each subcommand calls one library function.

Hyperparameter flags are generated from the config dataclasses (config.py), so `--help` always
shows every setting with its meaning and default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from slmkit.config import PRESETS, SECTIONS, WEIGHT_FORMATS, DataConfig, RunConfig, resolve_config
from slmkit.errors import UserError

# ----------------------------------------------------------------------------- flag generation


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default, once: added as "(default: X)" unless its help already states one, and
    never for an option without a default to show (None, an empty string, an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == "" or default is argparse.SUPPRESS
        if nothing or not action.option_strings or "(default" in text or "%(default)" in text:
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """`slm` and all its subcommands (subparsers are made with the parent's class) use HelpFormatter,
    also those that ask for argparse's ArgumentDefaultsHelpFormatter: it shows the same defaults,
    without "(default: None)" or a second copy of one the help states."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("formatter_class") in (None, argparse.ArgumentDefaultsHelpFormatter):
            kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)


def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] = tuple(SECTIONS)) -> None:
    """One `--kebab-name` flag per config field; unset flags stay None so they do not override.

    Their help states the field's default (the flag's own default is None); a field with choices
    lists them ({pre,post}) instead of a metavar; `flags` in a field's metadata adds other names."""
    for section in sections:
        group = parser.add_argument_group(f"{section} settings")
        for f in fields(SECTIONS[section]):
            if not f.metadata.get("cli", True):
                continue
            names = ["--" + f.name.replace("_", "-"), *f.metadata.get("flags", ())]
            help_text = f.metadata.get("help", "") + _default_note(f.default)
            if f.type == "bool":
                group.add_argument(*names, dest=f"{section}.{f.name}", action=argparse.BooleanOptionalAction,
                                   default=None, help=help_text)
                continue
            kind = {"int": int, "float": float, "str": str}[f.type]
            choices = f.metadata.get("choices")
            group.add_argument(*names, dest=f"{section}.{f.name}", type=kind, default=None, choices=choices,
                               metavar=None if choices else f.name.upper(), help=help_text)


def _default_note(default: Any) -> str:
    """' (default: X)' for help text; nothing for an empty default (it would read "(default: )")."""
    if default is MISSING or default is None or default == "":
        return ""
    return f" (default: {default})".replace("%", "%%")


def config_flags(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def emit(args: argparse.Namespace, payload: dict[str, Any], human: str) -> None:
    print(json.dumps(payload, indent=None if getattr(args, "json", False) else 2) if getattr(args, "json", False)
          else human)


# ----------------------------------------------------------------------------- commands


def cmd_prepare(args: argparse.Namespace) -> None:
    from slmkit.data import prepare

    cfg = resolve_config(args.preset, args.config, config_flags(args))
    data = prepare(cfg.data, out_dir=args.out)
    m = data.meta
    print(f"prepared {m['source']}: {m['tokens']['train']:,} train + {m['tokens']['val']:,} val tokens, "
          f"{data.tokenizer.describe()} -> {data.dir}")


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / (cfg.preset or "run")


def cmd_train(args: argparse.Namespace) -> None:
    from slmkit.train import default_preset, resume_config, train

    flags = config_flags(args)
    if args.resume:
        run_dir = Path(args.resume)
        cfg = resume_config(run_dir, flags)
    else:
        preset, note = args.preset, None
        if not preset and not args.config:
            preset = default_preset(flags.get("train", {}).get("device", "auto"))
            if preset:
                note = (f"no --preset or --config given: on this CPU slmkit trains the {preset} preset, the CPU "
                        "recipe (--preset shakespeare-char for the 10.8M-parameter model)")
        cfg = resolve_config(preset, args.config, flags)
        run_dir = Path(args.out_dir) if args.out_dir else default_run_dir(cfg)
        note = note if not args.quiet else None
    result = train(cfg, run_dir, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.quiet,
                   force=args.force, note=None if args.resume else note)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun the result is printed once, by rank 0
    final = f", full val loss {result.final_val_loss:.4f}" if result.final_val_loss is not None else ""
    print(f"done: {result.step} steps, best val loss {result.best_val_loss:.4f}{final}, "
          f"{result.params / 1e6:.2f}M params, {result.tokens_per_s:,.0f} tokens/s -> {run_dir}")


def read_text_file(path: str) -> str:
    """A UTF-8 text file, or standard input for '-' (binary input is a one-line error)."""
    from slmkit.fileio import read_utf8

    return read_utf8(path)


def _read_prompt(args: argparse.Namespace) -> str:
    return read_text_file(args.prompt_file) if args.prompt_file else (args.prompt or "")


def cmd_generate(args: argparse.Namespace) -> None:
    from slmkit.api import load
    from slmkit.generate import GenerationConfig

    lm = load(args.run, args.device, args.dtype, args.checkpoint, args.weights)
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        stop=tuple(s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop or ()),
        stop_at_eot=not args.no_eot_stop, seed=args.seed,
        num_samples=args.num_samples, use_cache=not args.no_cache, weights=lm.weights,
    )
    gen.validate()
    prompt = _read_prompt(args)
    ids = lm._prompt_ids(prompt)
    from slmkit.generate import generate_stream

    for i in range(gen.num_samples):
        if gen.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        if not args.no_echo:
            sys.stdout.write(prompt)
        for piece in generate_stream(lm.model, lm.tokenizer, gen=gen, device=lm.device, dtype=lm.dtype,
                                     prompt_ids=ids, sample_index=i):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def cmd_eval(args: argparse.Namespace) -> None:
    from slmkit.api import load
    from slmkit.data import dataset_tokens, open_prepared

    lm = load(args.run, args.device, args.dtype, args.checkpoint, args.weights)
    data = lm.checkpoint.config.data
    if args.prepared and args.dataset:
        raise UserError("give --dataset or --prepared, not both")
    # A text the run was not trained on has no split of its own to pick: all of it is scored.
    split = args.split or ("all" if args.dataset else "val")
    if args.dataset:
        data.dataset = args.dataset
    if args.data_path:
        data.data_path = args.data_path
    # Always the run's own tokenizer: any text is scored in the vocabulary the model was trained on.
    text = (open_prepared(args.prepared).encoded(lm.tokenizer, split) if args.prepared
            else dataset_tokens(data, lm.tokenizer, split))
    tokens = text.tokens
    chars = int(text.chars * (len(tokens) - 1) / max(len(tokens), 1))  # the first token is context only
    s = lm.evaluate_tokens(tokens, chars, args.batch_size)
    payload = {"split": split, "source": text.source, **s.as_dict()}
    emit(args, payload, f"{split} ({text.source}): loss {s.loss:.4f}  perplexity {s.perplexity:.3f}  "
                        f"bits/char {s.bits_per_char:.4f}  ({s.tokens:,} tokens)")


def cmd_score(args: argparse.Namespace) -> None:
    from slmkit.api import load

    lm = load(args.run, args.device, args.dtype, args.checkpoint, args.weights)
    text = _read_text_arg(args)
    s, ids, logp = lm.score_text(text, prepend_eot=not args.no_eot)
    payload: dict[str, Any] = {"log_likelihood": -s.nll, **s.as_dict()}
    scored = ids[len(ids) - len(logp):]
    if args.json:
        payload["tokens_detail"] = [
            {"id": int(t), "token": lm.tokenizer.token_strings([t])[0], "logprob": float(lp)}
            for t, lp in zip(scored, logp, strict=True)
        ]
    emit(args, payload, f"log-likelihood {-s.nll:.4f} nats over {s.tokens} tokens: {s.loss:.4f} per token, "
                        f"perplexity {s.perplexity:.3f}, bits/char {s.bits_per_char:.4f}")


def _read_text_arg(args: argparse.Namespace) -> str:
    if args.file:
        return read_text_file(args.file)
    if args.text is None:
        raise UserError("give the text with --text or --file")
    return args.text


def cmd_info(args: argparse.Namespace) -> None:
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
    import torch

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
    from slmkit.tokenizers import load_tokenizer, named_tokenizer

    if args.run:
        p = Path(args.run)
        if p.is_dir() and (p / "tokenizer.json").is_file():
            tok = load_tokenizer(p / "tokenizer.json")
        else:
            from slmkit.checkpoint import find_checkpoint, load_checkpoint

            tok = load_checkpoint(find_checkpoint(p)).tokenizer
    elif args.tokenizer:
        tok = named_tokenizer(args.tokenizer, args.vocab_dir or "")
    else:
        raise UserError("give --run RUN_DIR or --tokenizer NAME")
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
    text = _read_text_arg(args)
    ids = tok.encode(text)
    strings = tok.token_strings(ids)
    payload = {"ids": ids, "tokens": strings, "count": len(ids), "chars": len(text),
               "chars_per_token": len(text) / max(len(ids), 1)}
    emit(args, payload, f"{len(ids)} tokens, {len(text)} chars ({len(text) / max(len(ids), 1):.2f} chars/token)\n"
                        f"ids: {' '.join(map(str, ids))}\ntokens: {strings}")


# ----------------------------------------------------------------------------- parser


def _add_model_source(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--run", required=required, help="run directory (or a checkpoint .safetensors file)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of a run directory (default: best, the lowest validation loss)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="compute precision (default: auto = bf16 where it is fast)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="auto",
                   help="auto: the checkpoint's weights in --dtype; int8: weight-only int8 linears with bf16 "
                        "activations (CPU only): ~1.3x faster generation, losses within ~0.01 nats (README)")


def _add_text_input(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", help="the text")
    p.add_argument("--file", help="read the text from a file ('-' = stdin)")


def build_parser() -> argparse.ArgumentParser:
    from slmkit import __version__

    parser = Parser(prog="slm", description="slmkit: build small GPT language models from scratch.")
    parser.add_argument("--version", action="version", version=f"slm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def preset_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", help=f"start from a preset: {', '.join(PRESETS)}")
        p.add_argument("--config", help="TOML or YAML file of settings (flags override it; it overrides the preset)")

    p = sub.add_parser("prepare", help="corpus -> tokenizer -> train.bin/val.bin token files")
    preset_args(p)
    p.add_argument("--out", help="write the prepared files here instead of the cache")
    add_config_flags(p, ("data",))
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="pre-train (or continue) a model; prepares --dataset on the fly")
    preset_args(p)
    p.add_argument("--out-dir", help="run directory (default: runs/PRESET)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out-dir")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--force", action="store_true",
                   help="train even when the memory estimate exceeds the memory that is free")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample text from a trained model (streams to stdout)")
    _add_model_source(p)
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--prompt-file", help="read the prompt from a file ('-' = stdin)")
    p.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature; 0 (or anything below 1e-5) = greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold; 1 = off")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    p.add_argument("--stop", action="append",
                   help="stop a sample at this string (repeatable; \\n and \\t mean newline and tab)")
    p.add_argument("--no-eot-stop", action="store_true", help="keep going past the end-of-text token")
    p.add_argument("--no-cache", action="store_true", help="disable the KV cache (slow; for comparison)")
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt before the continuation")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="loss, perplexity and bits/char on a whole split (deterministic)")
    _add_model_source(p)
    p.add_argument("--split", choices=("val", "train", "all"), default=None,
                   help="val or train: that split, cut as training cuts it (the run's val_fraction); all: the "
                        "whole text (default: val of the run's own dataset, all of a --dataset)")
    p.add_argument("--dataset", help="score another corpus (a .txt file, a folder of them, a named dataset or a "
                                     "prepared folder) with the model's own tokenizer")
    p.add_argument("--data-path", help="local file for a named dataset")
    p.add_argument("--prepared", help="a prepared data folder (from slm prepare --out) holding the model's tokens")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="log-likelihood of a text under a model")
    _add_model_source(p)
    _add_text_input(p)
    p.add_argument("--no-eot", action="store_true", help="do not condition the first token on end-of-text")
    p.add_argument("--json", action="store_true", help="one JSON object, with every token's log-probability")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("info", help="a model's or preset's configuration and parameter count")
    p.add_argument("--run", help="run directory or checkpoint")
    preset_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_flags(p, ("model", "data"))
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tokenize", help="text -> token ids and strings (or ids -> text with --decode)")
    p.add_argument("--run", help="run directory or checkpoint whose tokenizer to use")
    p.add_argument("--tokenizer", choices=("gpt2", "gpt1"), help="a published tokenizer instead of a run's")
    p.add_argument("--vocab-dir", help="its files: encoder.json + vocab.bpe (gpt2), encoder_bpe_40000.json + "
                                       "vocab_40000.bpe (gpt1)")
    _add_text_input(p)
    p.add_argument("--decode", help="token ids to turn back into text ('-' = stdin)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_tokenize)

    for register in extra_commands():
        register(sub)
    return parser


def extra_commands() -> list:
    """Subcommands that live with their feature (fine-tuning, interop, sweeps)."""
    registers = []
    for module in ("slmkit.finetune.cli", "slmkit.interop.cli", "slmkit.sweep"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("slmkit"):
                continue
            raise
        if hasattr(mod, "register"):
            registers.append(mod.register)
    return registers


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except OSError as exc:
        # A file error no library call turned into a UserError: still one line, never a traceback.
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        sys.exit(1)


def one_line(message: str) -> str:
    """Messages are one line: library errors sometimes carry newlines or terminal colour codes."""
    import re

    message = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", message)
    return " ".join(message.split())



