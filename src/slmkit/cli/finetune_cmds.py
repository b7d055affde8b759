"""`slm finetune`, `slm predict` and `slm evaluate`: a pre-trained model on a labelled task.

`slm evaluate` is a fine-tuned model's task metrics on a labelled file; a language model's loss and
perplexity on text are `slm eval` (generate_cmds). The hyperparameter flags are FinetuneConfig's
fields, so `slm finetune` and `slmkit.finetune.finetune()` share every default."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slmkit.cli.common import add_json, add_out_dir, add_threads, refuse_pretrained, set_threads
from slmkit.cli.flags import Parser, add_dataclass_flags, add_runtime_flags, given, runtime
from slmkit.errors import UserError

FINETUNE = "finetune"  # the dest prefix of the FinetuneConfig flags
# The flags that describe a custom task (the rest of a task spec is --task and --no-header).
SPEC_FLAGS = ("format", "columns", "label_column", "labels", "choice_columns", "regression", "metric")


def _spec(args: argparse.Namespace):
    from slmkit.finetune.tasks import TASKS, get_task, spec_from_flags

    if args.family:
        return spec_from_flags(
            name=args.task, family=args.family, format=args.format or "tsv", columns=args.columns or "",
            label_column=args.label_column or "", labels=args.labels or "", choice_columns=args.choice_columns or "",
            regression=args.regression or "", metric=args.metric or "", header=not args.no_header,
            label_names=args.label_names or "",
        )
    custom = [f for f in SPEC_FLAGS if getattr(args, f)]
    if custom and args.task in TASKS:
        raise UserError(f"--{custom[0].replace('_', '-')} describes a custom task: add --family "
                        f"(and give it a name other than the shipped {args.task!r})")
    return get_task(args.task)


def finetune_config(args: argparse.Namespace):
    """FinetuneConfig from the flags given; the ones left out keep the dataclass defaults (GPT-1's)."""
    from slmkit.finetune.loop import FinetuneConfig

    return FinetuneConfig(**given(args, FINETUNE), device=runtime(args, "device"), dtype=runtime(args, "dtype"))


def cmd_finetune(args: argparse.Namespace) -> None:
    from slmkit.finetune.loop import finetune

    set_threads(args)
    spec = _spec(args)
    cfg = finetune_config(args)
    out = Path(args.out_dir) if args.out_dir else Path("runs") / f"ft-{spec.name}"
    r = finetune(args.source, spec, args.train, args.dev, out, cfg, test_path=args.test, overwrite=args.overwrite,
                 progress=not args.quiet)
    dev = "  ".join(f"{k} {v:.4f}" for k, v in r.best_dev.items())
    test = ("; test " + "  ".join(f"{k} {v:.4f}" for k, v in r.test.items())) if r.test else ""
    print(f"done: best dev (epoch {r.best_epoch}) {dev}{test}; {r.examples_per_s:,.0f} train examples/s, "
          f"{r.elapsed:.0f}s -> {out}")


def check_output_file(path: str, overwrite: bool) -> Path:
    """A file the command may (atomically) write: new, or replaced only when the user says so."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--output {p} is a directory; give a file name")
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise UserError(f"--output {p} already exists; pass --overwrite to replace it or choose another file")
    return p


def _write_rows(rows: list[dict], output: str | None, overwrite: bool) -> None:
    from slmkit.fileio import atomic_write_text

    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if not output or output == "-":
        sys.stdout.write(lines)
        return
    # Whole or not at all: a full disk or a crash never leaves half a predictions file, and a
    # symlink at the name is replaced, not followed.
    atomic_write_text(check_output_file(output, overwrite), lines)


def _load_finetuned(args: argparse.Namespace, command: str):
    from slmkit.finetune.loop import FineTuned

    refuse_pretrained(args.run, command)
    return FineTuned.load(args.run, runtime(args, "device"), runtime(args, "dtype"))


def cmd_predict(args: argparse.Namespace) -> None:
    from slmkit.finetune.tasks import read_examples

    set_threads(args)
    if args.output and args.output != "-":
        check_output_file(args.output, args.overwrite)  # before the model loads, not after it ran
    ft = _load_finetuned(args, "predict")
    read = read_examples(ft.spec, args.input, require_label=False, fmt="plain" if args.plain else None)
    if read.report():
        print(f"note: {read.report()}", file=sys.stderr)
    rows = ft.predict(read.examples, args.batch_size)
    _write_rows(rows, args.output, args.overwrite)


def cmd_evaluate(args: argparse.Namespace) -> None:
    set_threads(args)
    ft = _load_finetuned(args, "evaluate")
    result = ft.evaluate(args.data, args.batch_size)
    payload = {"task": ft.spec.name, "data": str(args.data), **result}
    if args.json:
        print(json.dumps(payload))
        return
    metrics = "  ".join(f"{k} {result[k]:.4f}" for k in ft.spec.metrics)
    print(f"{ft.spec.name} on {args.data}: {metrics}  ({result['examples']} examples"
          f"{', ' + str(result['malformed']) + ' malformed rows skipped' if result['malformed'] else ''})")


# ----------------------------------------------------------------------------- parsers


def _runtime_flags(p: argparse.ArgumentParser) -> None:
    add_runtime_flags(p, "device", "dtype")
    add_threads(p, "torch CPU threads; 0 = torch's default (1 is often fastest on a busy shared machine)")


def _build_finetune(p: Parser) -> None:
    from slmkit.finetune.loop import FinetuneConfig
    from slmkit.finetune.tasks import FAMILIES, FORMATS, TASKS

    p.description = ("Fine-tune with GPT-1's input transformations, one linear head and the auxiliary LM objective. "
                     f"Shipped tasks: {', '.join(TASKS)}; describe your own file with --family/--format/--columns/"
                     "--label-column/--labels.")
    p.add_argument("--from", dest="source", required=True, metavar="RUN_OR_CHECKPOINT",
                   help="pre-trained run directory (its best checkpoint) or a .safetensors checkpoint")
    p.add_argument("--task", required=True, help=f"task name: {', '.join(TASKS)}, or a name for a custom spec")
    p.add_argument("--train", required=True, help="training file")
    p.add_argument("--dev", required=True, help="development file (best epoch is chosen on it)")
    p.add_argument("--test", help="optional test file, scored once with the best-on-dev checkpoint")
    add_out_dir(p, "run directory (default: runs/ft-TASK)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing fine-tuned run in --out-dir (only the files slmkit wrote)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_dataclass_flags(p, FinetuneConfig, FINETUNE, "hyperparameters (defaults: GPT-1's)")
    _runtime_flags(p)
    c = p.add_argument_group("custom task spec (a dataset without code)")
    c.add_argument("--family", choices=FAMILIES, help="input transformation to use; makes --task a custom task")
    c.add_argument("--format", choices=FORMATS, help="file format (tsv files are read without quote handling)")
    c.add_argument("--columns",
                   help="text columns (names or 0-based indices): one for classification, two for entailment "
                        "and similarity, the context [and question] for multiple choice; join columns with '+'")
    c.add_argument("--choice-columns", help="multiple choice: the answer columns, comma-separated")
    c.add_argument("--label-column", help="the label column (name or index)")
    c.add_argument("--labels", help="the label set, comma-separated (multiple choice: the value naming each answer)")
    c.add_argument("--label-names", help="readable names for the labels, in the same order (optional)")
    c.add_argument("--regression", metavar="LO,HI", help="real-valued target in [LO, HI] (one output, MSE)")
    c.add_argument("--metric", help="comma-separated metrics, first = model selection: accuracy, mcc, f1, "
                                    "pearson, spearman")
    c.add_argument("--no-header", action="store_true", help="the file has no header row (use column indices)")
    p.set_defaults(func=cmd_finetune)


def _build_predict(p: Parser) -> None:
    p.add_argument("--run", required=True, help="fine-tuned run directory or checkpoint")
    p.add_argument("--input", required=True, help="file in the task's format ('-' = stdin); the label may be absent")
    p.add_argument("--plain", action="store_true",
                   help="input is one example per line: tab-separated texts (then answers), no header")
    p.add_argument("--output", help="write the JSON lines to this file instead of stdout")
    p.add_argument("--overwrite", action="store_true", help="replace the --output file when it exists")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    _runtime_flags(p)
    p.set_defaults(func=cmd_predict)


def _build_evaluate(p: Parser) -> None:
    p.add_argument("--run", required=True, help="fine-tuned run directory or checkpoint")
    p.add_argument("--data", required=True, help="labelled file in the task's format")
    add_json(p)
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    _runtime_flags(p)
    p.set_defaults(func=cmd_evaluate)


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("finetune", help="fine-tune a pre-trained model on a labelled task (GPT-1 style)",
                   build=_build_finetune)
    sub.add_parser("predict", help="predictions of a fine-tuned model, one JSON line each", build=_build_predict)
    sub.add_parser("evaluate", build=_build_evaluate,
                   help="a fine-tuned model's task metrics on a labelled file (a language model's loss and "
                        "perplexity: slm eval)",
                   description="A fine-tuned model's task metrics (accuracy, F1, correlation, ...) on a labelled "
                               "file in its task's format. For a language model's loss and perplexity on text, "
                               "use slm eval.")
