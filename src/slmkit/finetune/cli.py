"""`slm finetune`, `slm predict` and `slm evaluate`: argument parsing only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slmkit.errors import UserError
from slmkit.fileio import atomic_write_text
from slmkit.finetune.loop import FinetuneConfig, FineTuned, finetune
from slmkit.finetune.tasks import FAMILIES, FORMATS, TASKS, get_task, read_examples, spec_from_flags


def _spec(args: argparse.Namespace):
    if args.family:
        return spec_from_flags(
            name=args.task, family=args.family, format=args.format or "tsv", columns=args.columns or "",
            label_column=args.label_column or "", labels=args.labels or "", choice_columns=args.choice_columns or "",
            regression=args.regression or "", metric=args.metric or "", header=not args.no_header,
            label_names=args.label_names or "",
        )
    custom = [f for f in ("format", "columns", "label_column", "labels", "choice_columns", "regression", "metric")
              if getattr(args, f)]
    if custom and args.task in TASKS:
        raise UserError(f"--{custom[0].replace('_', '-')} describes a custom task: add --family "
                        f"(and give it a name other than the shipped {args.task!r})")
    return get_task(args.task)


def cmd_finetune(args: argparse.Namespace) -> None:
    _set_threads(args)
    spec = _spec(args)
    d = FinetuneConfig()
    cfg = FinetuneConfig(
        learning_rate=args.lr, batch_size=args.batch_size, epochs=args.epochs, warmup_frac=args.warmup_frac,
        lm_coef=args.lm_coef, clf_dropout=args.clf_dropout, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, max_len=args.max_len, max_train=args.max_train,
        dropout=d.dropout if args.dropout is None else args.dropout, random_init=args.random_init,
        seed=args.seed, eval_batch_size=args.eval_batch_size, device=args.device, dtype=args.dtype,
    )
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
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if not output or output == "-":
        sys.stdout.write(lines)
        return
    # Whole or not at all: a full disk or a crash never leaves half a predictions file, and a
    # symlink at the name is replaced, not followed.
    atomic_write_text(check_output_file(output, overwrite), lines)


def cmd_predict(args: argparse.Namespace) -> None:
    _set_threads(args)
    if args.output and args.output != "-":
        check_output_file(args.output, args.overwrite)  # before the model loads, not after it ran
    ft = FineTuned.load(args.run, args.device, args.dtype)
    read = read_examples(ft.spec, args.input, require_label=False, fmt="plain" if args.plain else None)
    if read.report():
        print(f"note: {read.report()}", file=sys.stderr)
    rows = ft.predict(read.examples, args.batch_size)
    _write_rows(rows, args.output, args.overwrite)


def cmd_evaluate(args: argparse.Namespace) -> None:
    _set_threads(args)
    ft = FineTuned.load(args.run, args.device, args.dtype)
    result = ft.evaluate(args.data, args.batch_size)
    payload = {"task": ft.spec.name, "data": str(args.data), **result}
    if args.json:
        print(json.dumps(payload))
        return
    metrics = "  ".join(f"{k} {result[k]:.4f}" for k in ft.spec.metrics)
    print(f"{ft.spec.name} on {args.data}: {metrics}  ({result['examples']} examples"
          f"{', ' + str(result['malformed']) + ' malformed rows skipped' if result['malformed'] else ''})")


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="compute precision (auto = bf16 where it is fast)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 = torch's default (1 is often fastest on a busy shared machine)")


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads < 0:
        raise UserError(f"--threads must not be negative, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    d = FinetuneConfig()
    p = sub.add_parser("finetune", formatter_class=fmt,
                       help="fine-tune a pre-trained model on a labelled task (GPT-1 style)",
                       description="Fine-tune with GPT-1's input transformations, one linear head and the "
                                   f"auxiliary LM objective. Shipped tasks: {', '.join(TASKS)}; describe your "
                                   "own file with --family/--format/--columns/--label-column/--labels.")
    p.add_argument("--from", dest="source", required=True, metavar="RUN_OR_CHECKPOINT",
                   help="pre-trained run directory (its best checkpoint) or a .safetensors checkpoint")
    p.add_argument("--task", required=True, help=f"task name: {', '.join(TASKS)}, or a name for a custom spec")
    p.add_argument("--train", required=True, help="training file")
    p.add_argument("--dev", required=True, help="development file (best epoch is chosen on it)")
    p.add_argument("--test", help="optional test file, scored once with the best-on-dev checkpoint")
    p.add_argument("--out-dir", help="run directory (runs/ft-TASK when not given)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing fine-tuned run in --out-dir (only the files slmkit wrote)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    h = p.add_argument_group("hyperparameters (defaults: GPT-1's)")
    h.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate")
    h.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    h.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    h.add_argument("--warmup-frac", type=float, default=d.warmup_frac, help="linear warmup, fraction of all steps")
    h.add_argument("--lm-coef", type=float, default=d.lm_coef,
                   help="lambda of the auxiliary LM objective (L3 = L2 + lambda L1); 0 = off")
    h.add_argument("--clf-dropout", type=float, default=d.clf_dropout, help="dropout before the linear head")
    h.add_argument("--dropout", type=float, default=None,
                   help="transformer dropout (when not given: the pre-trained model's)")
    h.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay on weight matrices")
    h.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient-norm clip; 0 = off")
    h.add_argument("--max-len", type=int, default=0,
                   help="truncate sequences to this many tokens (0 = the model's context)")
    h.add_argument("--max-train", type=int, default=0, help="use a seeded random subset of N training examples")
    h.add_argument("--random-init", action="store_true",
                   help="same architecture and vocabulary, random weights (the no-pre-training baseline)")
    h.add_argument("--seed", type=int, default=d.seed, help="random seed (head init, shuffling, dropout)")
    h.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="examples per evaluation batch")
    _device_args(p)
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

    p = sub.add_parser("predict", formatter_class=fmt, help="predictions of a fine-tuned model, one JSON line each")
    p.add_argument("--run", required=True, help="fine-tuned run directory or checkpoint")
    p.add_argument("--input", required=True, help="file in the task's format ('-' = stdin); the label may be absent")
    p.add_argument("--plain", action="store_true",
                   help="input is one example per line: tab-separated texts (then answers), no header")
    p.add_argument("--output", help="write the JSON lines to this file instead of stdout")
    p.add_argument("--overwrite", action="store_true", help="replace the --output file when it exists")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    _device_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", formatter_class=fmt, help="task metrics of a fine-tuned model on a labelled file")
    p.add_argument("--run", required=True, help="fine-tuned run directory or checkpoint")
    p.add_argument("--data", required=True, help="labelled file in the task's format")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    _device_args(p)
    p.set_defaults(func=cmd_evaluate)
