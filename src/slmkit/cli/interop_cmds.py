"""`slm import` and `slm export`: GPT-1 / GPT-2 weights in and out (the original release, Hugging Face);
`slm card`: the model card an export writes, printed for a run."""

from __future__ import annotations

import argparse
import time

from slmkit.cli.common import add_model_source, add_out_dir
from slmkit.cli.flags import Parser
from slmkit.errors import UserError


def cmd_import(args: argparse.Namespace) -> None:
    from slmkit.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    if args.format == "openai-gpt1":
        from slmkit.interop.openai_gpt1 import import_openai_gpt1

        path = import_openai_gpt1(args.src, args.out_dir, overwrite=args.overwrite)
    else:
        from slmkit.interop.hf import import_hf

        path = import_hf(args.src, args.out_dir, overwrite=args.overwrite)
    ckpt = load_checkpoint(path)
    m = ckpt.config.model
    print(f"imported {args.format} from {args.src}: {ckpt.state['params'] / 1e6:.2f}M params, "
          f"{m.n_layer} layers, {m.n_embd} wide, {m.ln}-LN, {ckpt.tokenizer.describe()} "
          f"({time.perf_counter() - t0:.1f} s) -> {args.out_dir}")


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "gguf":
        _export_gguf(args)
        return
    if args.dtype is not None:
        raise UserError("--dtype is for --format gguf (a Hugging Face export is always float32)")
    from slmkit.interop.hf import export_hf

    out = export_hf(args.run, args.out_dir, which=args.checkpoint, with_tokenizer=not args.no_tokenizer,
                    overwrite=args.overwrite, card_datasets=args.card_dataset)
    print(f"exported {args.run} -> {out} (Hugging Face format: config.json, model.safetensors"
          f"{'' if args.no_tokenizer else ', tokenizer files'}, README.md model card)")


def _export_gguf(args: argparse.Namespace) -> None:
    from slmkit.interop.gguf import describe, export_gguf

    if args.no_tokenizer:
        raise UserError("--no-tokenizer is for --format hf: a GGUF file always carries its tokenizer")
    if args.card_dataset:
        raise UserError("--card-dataset is for --format hf: a GGUF file has no model card")
    t0 = time.perf_counter()
    out = export_gguf(args.run, args.out_dir, which=args.checkpoint, dtype=args.dtype or "f32",
                      overwrite=args.overwrite)
    print(f"exported {args.run} -> {out} (GGUF for llama.cpp, gpt2 architecture, {args.dtype or 'f32'}: "
          f"{describe(out)}; {time.perf_counter() - t0:.1f} s)")


def cmd_card(args: argparse.Namespace) -> None:
    from slmkit.interop.card import model_card

    print(model_card(args.run, args.checkpoint, args.card_dataset), end="")


def _add_card_dataset(p: Parser) -> None:
    p.add_argument("--card-dataset", action="append", default=[], metavar="NAME",
                   help="a dataset the model was trained on, listed under `datasets` in the model card "
                        "(repeatable; e.g. a Hub dataset id)")


def _build_import(p: Parser) -> None:
    p.add_argument("--format", required=True, choices=("openai-gpt1", "hf"),
                   help="openai-gpt1: params_shapes.json + params_*.npy + encoder_bpe_40000.json + vocab_40000.bpe; "
                        "hf: a Hugging Face gpt2 / openai-gpt directory (or a Hub id such as openai-community/gpt2)")
    p.add_argument("--src", required=True, help="source directory (hf: or a Hub repo id, downloaded first)")
    add_out_dir(p, "run directory to create (new, empty, or an earlier import)", required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier import in --out-dir (only files slmkit wrote; others are kept)")
    p.set_defaults(func=cmd_import)


def _build_export(p: Parser) -> None:
    add_model_source(p)
    p.add_argument("--format", default="hf", choices=("hf", "gguf"),
                   help="hf: a Hugging Face directory; gguf: one file for llama.cpp (pre-LN runs with a gpt2 or bpe "
                        "tokenizer)")
    add_out_dir(p, "directory to write (new, empty, or an earlier export); for gguf, the .gguf file", required=True)
    p.add_argument("--dtype", choices=("f32", "f16", "bf16", "q8_0"), default=None,
                   help="gguf only: weight type of the file (default f32, exact; q8_0: llama.cpp's 8-bit blocks)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="weights and config only (needed for character-level tokenizers, which HF cannot represent)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out-dir (only files slmkit wrote; others are kept; gguf: only "
                        "a file an earlier export wrote)")
    _add_card_dataset(p)
    p.set_defaults(func=cmd_export)


def _build_card(p: Parser) -> None:
    add_model_source(p)
    _add_card_dataset(p)
    p.set_defaults(func=cmd_card)


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("import", build=_build_import,
                   help="pre-trained GPT-1 / GPT-2 weights (original release or Hugging Face) -> run directory")
    sub.add_parser("export", build=_build_export,
                   help="run directory -> Hugging Face directory (gpt2 for pre-LN, openai-gpt for post-LN), "
                        "or a GGUF file for llama.cpp (--format gguf)")
    sub.add_parser("card", build=_build_card,
                   help="print a run's model card (the README.md that slm export writes), markdown on stdout")
