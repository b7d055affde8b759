"""`slm`: one module per command family; each command parses, calls the library, prints.

    train_cmds     prepare, train, info, tokenize   (RunConfig's settings)
    generate_cmds  generate, eval, score            (GenerationConfig's settings)
    chat_cmds      chat, generate --interactive     (an interactive loop; GenerationConfig's settings)
    finetune_cmds  finetune, predict, evaluate      (FinetuneConfig's settings)
    zeroshot_cmds  zeroshot                         (GPT-1 section 5's zero-shot rules; no settings dataclass)
    lm_eval_cmds   lm-eval                          (lm-evaluation-harness tasks; lm_eval's own options)
    serve_cmds     serve                            (ServeOptions' settings)
    interop_cmds   import, export, card
    sweep_cmds     sweep, sweep report              (SweepOptions, and RunConfig's settings)

Every settings flag is generated from its dataclass by `flags` (help, default, choices, aliases), and
`--device`/`--dtype`/`--weights` are declared once there. A command's flags are added only when that
command runs or shows its help, so importing this package, and `slm --help`, never import torch.
"""

from __future__ import annotations

import argparse
import re
import sys

from slmkit.cli import (
    chat_cmds,
    finetune_cmds,
    generate_cmds,
    interop_cmds,
    lm_eval_cmds,
    serve_cmds,
    sweep_cmds,
    train_cmds,
    zeroshot_cmds,
)
from slmkit.cli.flags import Parser, add_config_flags, config_flags
from slmkit.errors import UserError

__all__ = ["build_parser", "main", "add_config_flags", "config_flags"]

# In the order `slm --help` lists them: pre-training, using a model, inspecting, fine-tuning, interop, sweeps.
REGISTERS = (
    train_cmds.register, generate_cmds.register, chat_cmds.register, serve_cmds.register,
    train_cmds.register_inspection, finetune_cmds.register, zeroshot_cmds.register, lm_eval_cmds.register,
    interop_cmds.register, sweep_cmds.register,
)


def build_parser() -> argparse.ArgumentParser:
    from slmkit import __version__

    parser = Parser(prog="slm", description="slmkit: build small GPT language models from scratch.")
    parser.add_argument("--version", action="version", version=f"slm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTERS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
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
    message = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", message)
    return " ".join(message.split())
