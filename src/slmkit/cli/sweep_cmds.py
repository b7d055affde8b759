"""`slm sweep` and `slm sweep report`: hyperparameter sweeps on Optuna (the library is slmkit.sweep).

What a sweep varies and how its trials run are SweepOptions' fields; the settings every trial starts
from are RunConfig's (model, data and train flags), as for `slm train`."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from slmkit.cli.common import add_out_dir
from slmkit.cli.flags import Parser, add_config_flags, add_dataclass_flags, config_flags, flag_names, given
from slmkit.errors import UserError

SWEEP = "sweep"  # the dest prefix of the SweepOptions flags


@contextlib.contextmanager
def _one_line(storage: str | None = None) -> Iterator[None]:
    """What reaches the user from a sweep command: one line, never a storage password.

    File-system failures (a read-only or full disk under --out-dir, a vanished folder) become
    UserErrors here rather than tracebacks; every message passes through the redaction."""
    from slmkit.sweep.runner import redact_text

    try:
        yield
    except UserError as exc:
        raise UserError(redact_text(str(exc), storage)) from None
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(redact_text(f"cannot use{where}: {reason}", storage)) from None


def cmd_sweep(args: argparse.Namespace) -> None:
    with _one_line(given(args, SWEEP).get("storage")):
        if args.resume:
            _resume(args)
        else:
            _start(args)


def _given_flags(args: argparse.Namespace) -> list[str]:
    """The flags of a new sweep that the command line gave (a resumed sweep takes none of them)."""
    from slmkit.sweep import SweepOptions

    names = {f.name: flag_names(f)[0] for f in fields(SweepOptions)}
    flags = [names[n] for n in given(args, SWEEP)]
    flags += [f"--{n.replace('_', '-')}" for values in config_flags(args).values() for n in values]
    flags += [flag for flag, value in (("--random", args.random), ("--base", args.base), ("--out-dir", args.out_dir))
              if value is not None]
    return sorted(flags)


def _resume(args: argparse.Namespace) -> None:
    given_flags = _given_flags(args)
    if given_flags:
        raise UserError(f"--resume continues the saved sweep; drop {', '.join(given_flags)}")
    sweep_dir = Path(args.resume)
    if not _work_left(sweep_dir):
        _print_finished(sweep_dir, args.no_report)
        return
    _run(sweep_dir, args.no_report)


def _start(args: argparse.Namespace) -> None:
    from slmkit.sweep import base_config, create
    from slmkit.sweep.runner import redact_url

    options = given(args, SWEEP)
    if args.random is not None:  # --random N is --search random --trials N
        if options.get("search", "random") != "random":
            raise UserError("--random N is --search random --trials N; give one of them")
        options.update(search="random", trials=args.random)
    sweep_dir = Path(args.out_dir) if args.out_dir else Path("sweeps") / time.strftime("sweep-%Y%m%d-%H%M%S")
    base = base_config(args.base, config_flags(args))
    spec = create(sweep_dir, base, **options)
    budget = (f"{spec.trial_seconds:g} s" if spec.trial_seconds else f"{base.train.epochs:g} epochs"
              if base.train.epochs > 0 else f"{base.train.max_iters} steps")
    print(f"sweep {sweep_dir}: {spec.mode}, {spec.n_trials} trials x {spec.seeds} seed(s), {budget} each, "
          f"pruning {'on' if spec.prune else 'off'}; study {spec.study_name!r} in {redact_url(spec.storage)}")
    _run(sweep_dir, args.no_report)


def _run(sweep_dir: Path, no_report: bool) -> None:
    from slmkit.sweep import collect_rows, run

    ran = run(sweep_dir, show=True, report=not no_report)
    spec, rows = collect_rows(sweep_dir)
    print(f"this worker ran {ran} trial(s)" + _outcome(sweep_dir, spec, rows, not no_report))


def _outcome(sweep_dir: Path, spec, rows: list[dict[str, Any]], report: bool) -> str:
    from slmkit.sweep.report import FINETUNE_KEY, best_row, objective_key

    b = best_row(rows, objective_key(spec))
    msg = ""
    if b is not None:
        score = f"dev {spec.finetune['metric']} {b[FINETUNE_KEY]:.4f}, " if spec.finetune else ""
        msg += f"; best: trial {b['trial']} {score}val {b['best_val_loss']:.4f} ({b['run_dir']})"
    if report:
        msg += f"; report: {sweep_dir / 'report.md'}"
    return msg


def _work_left(sweep_dir: Path) -> bool:
    from slmkit.sweep.runner import load_spec, load_study, storage_errors, work_left

    spec = load_spec(sweep_dir)
    with storage_errors(spec.storage):
        return work_left(load_study(spec), spec)


def _print_finished(sweep_dir: Path, no_report: bool) -> None:
    """A resumed sweep with nothing left: its results, as report.md tabulates them."""
    from slmkit.sweep.report import REPORT_MD, collect_rows, markdown_table

    spec, rows = collect_rows(sweep_dir)
    print(f"sweep {sweep_dir}: all {len(rows)} trial(s) are finished; nothing was left to run")
    print(markdown_table(spec, rows), end="")
    outcome = _outcome(sweep_dir, spec, rows, not no_report and (sweep_dir / REPORT_MD).is_file())
    if outcome:
        print(outcome.removeprefix("; "))


def cmd_report(args: argparse.Namespace) -> None:
    from slmkit.config import MAX_SAMPLE_TOKENS
    from slmkit.sweep import write_report
    from slmkit.sweep.runner import check_count

    check_count("sample_tokens", args.sample_tokens, 0, MAX_SAMPLE_TOKENS, "--sample-tokens")
    with _one_line():
        path = write_report(args.dir, sample_tokens=args.sample_tokens)
    print(path.read_text() if args.print else f"wrote {path}, {path.parent / 'results.csv'} and "
          f"{path.parent / 'plots'}/")


# ----------------------------------------------------------------------------- parser


# The generated usage would list every config flag and end in "report ...", which reads as a
# positional every sweep needs; these are the three ways the command is used.
USAGE = """%(prog)s (--grid NAME=V1,V2 ... | --param SPEC ... (--random N | --search tpe --trials N))
                 [--base PRESET_OR_FILE] [--trial-seconds S] [--seeds K] [--out-dir DIR] [options] [settings]
       %(prog)s --resume DIR
       %(prog)s report DIR [--print] [--sample-tokens N]"""


def _build_sweep(p: Parser) -> None:
    from slmkit.sweep import SweepOptions  # imports optuna's callers and torch: only when this command is used

    p.add_argument("--base", help="preset name or TOML/YAML config that every trial starts from")
    p.add_argument("--random", type=int, metavar="N", help="random search with N trials (Optuna RandomSampler)")
    add_dataclass_flags(p, SweepOptions, SWEEP)
    add_out_dir(p, "sweep directory (default: sweeps/sweep-DATE-TIME)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted sweep, or join it as another worker")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.set_defaults(func=cmd_sweep)
    rsub = p.add_subparsers(dest="sweep_command", title="command", metavar="report", prog=p.prog,
                            help="slm sweep report DIR: write report.md, results.csv, plots/ and a sample")
    r = rsub.add_parser("report", description="Write report.md, results.csv, plots/ and a sample for a sweep "
                                              "directory.")
    r.add_argument("dir", help="sweep directory")
    r.add_argument("--sample-tokens", type=int, default=300, help="length of the best trial's sample; 0 = none")
    r.add_argument("--print", action="store_true", help="also print report.md")
    r.set_defaults(func=cmd_report)
    add_config_flags(p)  # after the command, which --help then lists before the many settings


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "sweep", build=_build_sweep, usage=USAGE,
        help="hyperparameter sweep (grid, random, TPE on Optuna); `slm sweep report DIR` for the report",
        description="Run a sweep: one ordinary run directory per trial, a study in SQLite (or --storage). Settings "
                    "(model, data and train flags) change the base configuration of every trial.",
    )
