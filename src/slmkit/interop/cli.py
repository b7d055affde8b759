"""`slm import` and `slm export`."""

from __future__ import annotations

import argparse
import time


def cmd_import(args: argparse.Namespace) -> None:
    from slmkit.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    if args.format == "openai-gpt1":
        from slmkit.interop.openai_gpt1 import import_openai_gpt1

        path = import_openai_gpt1(args.src, args.out, overwrite=args.overwrite)
    else:
        from slmkit.interop.hf import import_hf

        path = import_hf(args.src, args.out, overwrite=args.overwrite)
    ckpt = load_checkpoint(path)
    m = ckpt.config.model
    print(f"imported {args.format} from {args.src}: {ckpt.state['params'] / 1e6:.2f}M params, "
          f"{m.n_layer} layers, {m.n_embd} wide, {m.ln}-LN, {ckpt.tokenizer.describe()} "
          f"({time.perf_counter() - t0:.1f} s) -> {args.out}")


def cmd_export(args: argparse.Namespace) -> None:
    from slmkit.interop.hf import export_hf

    out = export_hf(args.run, args.out, which=args.checkpoint, with_tokenizer=not args.no_tokenizer,
                    overwrite=args.overwrite)
    print(f"exported {args.run} -> {out} (Hugging Face format: config.json, model.safetensors"
          f"{'' if args.no_tokenizer else ', tokenizer files'})")


def register(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("import", formatter_class=fmt,
                       help="pre-trained GPT-1 / GPT-2 weights (original release or Hugging Face) -> run directory")
    p.add_argument("--format", required=True, choices=("openai-gpt1", "hf"),
                   help="openai-gpt1: params_shapes.json + params_*.npy + encoder_bpe_40000.json + vocab_40000.bpe; "
                        "hf: a Hugging Face gpt2 / openai-gpt directory (or a Hub id such as openai-community/gpt2)")
    p.add_argument("--src", required=True, help="source directory (hf: or a Hub repo id, downloaded first)")
    p.add_argument("--out", required=True, help="run directory to create (new, empty, or an earlier import)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier import in --out (only files slmkit wrote; others are kept)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", formatter_class=fmt,
                       help="run directory -> Hugging Face directory (gpt2 for pre-LN, openai-gpt for post-LN)")
    p.add_argument("--run", required=True, help="run directory (or a checkpoint .safetensors file)")
    p.add_argument("--format", default="hf", choices=("hf",), help="output format")
    p.add_argument("--out", required=True, help="directory to write (new, empty, or an earlier export)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint of a run")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="weights and config only (needed for character-level tokenizers, which HF cannot represent)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out (only files slmkit wrote; others are kept)")
    p.set_defaults(func=cmd_export)
