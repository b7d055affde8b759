"""`slm zeroshot`: GPT-1 §5's zero-shot heuristics, task scores from a pre-trained language model alone."""

from __future__ import annotations

import argparse
import json
import sys

from slmkit.cli.common import add_json, add_model_source, add_threads, set_threads
from slmkit.cli.flags import Parser, add_runtime_flags, runtime
from slmkit.errors import UserError

# Kept here (not imported from slmkit.zeroshot) so that `slm --help` does not import torch.
TASKS = ("sst2", "cola", "storycloze", "multiple_choice", "winograd", "rte", "mrpc", "sick", "stsb")


def cmd_zeroshot(args: argparse.Namespace) -> None:
    from slmkit.api import load
    from slmkit.zeroshot import run_zeroshot

    if args.task not in TASKS:
        raise UserError(f"unknown zero-shot task {args.task!r}; use one of {', '.join(TASKS)}")
    set_threads(args)
    lm = load(args.run, runtime(args, "device"), runtime(args, "dtype"), args.checkpoint)
    result = run_zeroshot(lm, args.task, args.data, args.calibrate, args.batch_size, limit=args.limit)
    if args.json:
        print(json.dumps({"data": str(args.data), **result.as_dict()}))
    else:
        print(f"rule: {result.rule}", file=sys.stderr)
        print(result.line())


def _build_zeroshot(p: Parser) -> None:
    p.description = ("Zero-shot task scores from a pre-trained language model, with GPT-1's section 5 heuristics "
                     "(sst2, cola, storycloze, multiple_choice JSONL, winograd JSONL) and likelihood rules that "
                     "are NOT from the paper for rte, mrpc, sick and stsb. No training; a fine-tuned run is "
                     "scored through its language model.")
    add_model_source(p)
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--data", required=True,
                   help="labelled task file (shipped formats; multiple_choice: JSONL "
                        '{"context", "choices", "label"}; winograd: JSONL {"sentence" with "_", "options", "label"})')
    p.add_argument("--calibrate", help="cola: a labelled file on which the MCC-maximising threshold is chosen")
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward pass")
    p.add_argument("--limit", type=int, default=0,
                   help="score the first N examples of the file (and of --calibrate); 0 = all")
    add_json(p, "one JSON object, with every example's scores")
    add_runtime_flags(p, "device", "dtype")
    add_threads(p)
    p.set_defaults(func=cmd_zeroshot)


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("zeroshot", build=_build_zeroshot,
                   help="zero-shot task scores of a pre-trained language model (GPT-1 section 5 heuristics)")
