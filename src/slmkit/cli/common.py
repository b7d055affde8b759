"""What several commands share: their common flags (each declared here once), text inputs, output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from slmkit.errors import UserError

# ----------------------------------------------------------------------------- flags


def add_out_dir(parser: argparse.ArgumentParser, help: str, *, required: bool = False) -> None:
    """--out-dir DIR, the folder a command writes; --out is the same flag (its older name)."""
    parser.add_argument("--out-dir", "--out", dest="out_dir", metavar="DIR", required=required, help=help)


def add_model_source(parser: argparse.ArgumentParser, run_help: str = "run directory (or a checkpoint "
                     ".safetensors file)", *, required: bool = True) -> None:
    """--run and --checkpoint: which trained model a command reads."""
    parser.add_argument("--run", required=required, help=run_help)
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="which checkpoint of a run directory (default: best, the lowest validation loss)")


def add_text_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", help="the text")
    parser.add_argument("--file", help="read the text from a file ('-' = stdin)")


def add_threads(parser: argparse.ArgumentParser, help: str = "torch CPU threads; 0 = torch's default") -> None:
    parser.add_argument("--threads", type=int, default=0, help=help)


def set_threads(args: argparse.Namespace) -> None:
    """--threads N: torch's CPU thread count for this command (0 keeps torch's default)."""
    if args.threads < 0:
        raise UserError(f"--threads must not be negative, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def add_json(parser: argparse.ArgumentParser, help: str = "print one JSON object") -> None:
    parser.add_argument("--json", action="store_true", help=help)


# ----------------------------------------------------------------------------- input and output


def read_text_file(path: str) -> str:
    """A UTF-8 text file, or standard input for '-' (binary input is a one-line error)."""
    from slmkit.fileio import read_utf8

    return read_utf8(path)


def read_text_arg(args: argparse.Namespace) -> str:
    """The text of --text or --file."""
    if args.file:
        return read_text_file(args.file)
    if args.text is None:
        raise UserError("give the text with --text or --file")
    return args.text


def emit(args: argparse.Namespace, payload: dict[str, Any], human: str) -> None:
    """A result on stdout: one JSON object with --json, else the human line(s)."""
    print(json.dumps(payload) if getattr(args, "json", False) else human)


# ----------------------------------------------------------------------------- which kind of model


def is_finetuned(run: str | Path, which: str = "best") -> bool | None:
    """Whether a run or checkpoint holds a fine-tuned model (a task head), read from the checkpoint's
    header only; None when it cannot be read, so the command's own loading reports why."""
    from slmkit.checkpoint import checkpoint_metadata, find_checkpoint
    from slmkit.finetune.loop import META_KEY

    try:
        meta = checkpoint_metadata(find_checkpoint(run, which))
    except UserError:
        return None
    return None if meta is None else META_KEY in meta


def refuse_finetuned(run: str | Path, which: str = "best") -> None:
    """`slm eval` (a language model's loss on text) is not what a fine-tuned model is measured by."""
    if is_finetuned(run, which):
        raise UserError(f"{run} is a fine-tuned model; for its task metrics on a labelled file use slm evaluate "
                        f"--run {run} --data FILE (slm eval measures a pre-trained language model's loss and "
                        "perplexity on text)")


def refuse_pretrained(run: str | Path, command: str) -> None:
    """`slm evaluate` and `slm predict` need a task head: a pre-trained model has none."""
    if is_finetuned(run) is False:
        hint = (f"for its loss and perplexity on text use slm eval --run {run}" if command == "evaluate"
                else "make a fine-tuned one with slm finetune --from RUN")
        raise UserError(f"{run} is not a fine-tuned checkpoint: this is a pre-trained language model; {hint}")
