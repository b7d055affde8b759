"""`slm lm-eval`: EleutherAI's lm-evaluation-harness tasks on a run (slmkit.evalharness)."""

from __future__ import annotations

import argparse
import json
import sys

from slmkit.cli.common import add_json, add_model_source, add_threads, set_threads
from slmkit.cli.flags import Parser, add_runtime_flags, runtime
from slmkit.errors import UserError


def cmd_lm_eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from slmkit.evalharness import require_lm_eval

    require_lm_eval()  # before anything else: the one line that names the install command
    if not Path(args.run).exists():
        raise UserError(f"no run directory or checkpoint at {args.run}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks needs at least one task name (comma-separated)")
    limit = args.limit
    if limit is not None and limit == int(limit) and limit >= 1:
        limit = int(limit)  # lm_eval reads a limit below 1 as a fraction of each task
    set_threads(args)
    from slmkit.evalharness import json_payload, run_lm_eval, table

    results = run_lm_eval(args.run, tasks, checkpoint=args.checkpoint, limit=limit, num_fewshot=args.num_fewshot,
                          include_path=args.include_path, batch_size=args.batch_size,
                          device=runtime(args, "device"), dtype=runtime(args, "dtype"),
                          log_samples=args.log_samples, bootstrap_iters=args.bootstrap_iters, seed=args.seed,
                          verbose=args.verbose)
    payload = json_payload(results, samples=args.log_samples)
    if args.output:
        from slmkit.fileio import atomic_write_json

        atomic_write_json(args.output, payload)
        print(f"wrote {args.output}", file=sys.stderr)
    if args.json:
        print(json.dumps(payload))
    else:
        print(table(results))


def _build_lm_eval(p: Parser) -> None:
    p.description = ("Run lm-evaluation-harness tasks (HellaSwag, LAMBADA, ARC, PIQA, ... or your own task YAML "
                     "files) on a run, through the harness model class `slmkit`: lm_eval's own tokenization "
                     "rules, batched scoring, the run's tokenizer. Needs the lm-eval extra: "
                     'pip install -e ".[lm-eval]". Hub tasks download their data (network).')
    add_model_source(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names, or task YAML files")
    p.add_argument("--limit", type=float, help="at most this many examples per task (below 1: a fraction)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples in each prompt (default: each task's own)")
    p.add_argument("--include-path", metavar="DIR", help="a folder of your own task YAML files")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward pass")
    p.add_argument("--bootstrap-iters", type=int, default=1000,
                   help="bootstrap draws for the stderr of metrics without a closed form (lm_eval's own default "
                        "is 100000; 0 = no stderr)")
    p.add_argument("--seed", type=int, default=1234, help="lm_eval's random, numpy, torch and few-shot seeds")
    p.add_argument("--log-samples", action="store_true",
                   help="add every request's responses ('samples') to the --json / --output JSON")
    add_json(p, "print lm_eval's results as one JSON object (results, groups, versions, n-shot, n-samples, "
                "config, and a 'rows' list like the table's)")
    p.add_argument("--output", metavar="FILE", help="also write that JSON object to FILE")
    add_runtime_flags(p, "device", "dtype")
    add_threads(p)
    p.add_argument("--verbose", action="store_true", help="lm_eval's INFO logging on stderr (default: warnings)")
    p.set_defaults(func=cmd_lm_eval)


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("lm-eval", build=_build_lm_eval,
                   help="lm-evaluation-harness tasks (HellaSwag, LAMBADA, ARC, PIQA, your own YAML) on a run")
