"""`slm sweep`: hyperparameter sweeps (grid, random, TPE) on Optuna, one run directory per trial.

    slm sweep --base cpu-tiny --dataset tinyshakespeare --grid "n_layer=2,4" --grid "learning_rate=1e-3,3e-3" \\
        --trial-seconds 60 --out sweeps/demo
    slm sweep --resume sweeps/demo        # continue, or join as a second worker
    slm sweep report sweeps/demo          # report.md, results.csv, plots/, sample.txt

Library use: `create(...)` then `run(sweep_dir)`; `write_report(sweep_dir)`.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slmkit.errors import UserError
from slmkit.sweep.report import REPORT_MD, collect_rows, markdown_table, write_report
from slmkit.sweep.runner import (
    MAX_SEEDS,
    MAX_TRIALS,
    SAMPLER_SEED_LIMIT,
    SPEC_FILE,
    SweepSpec,
    check_count,
    check_trial_seconds,
    create_sweep,
    default_storage,
    load_spec,
    load_study,
    random_cells,
    redact_text,
    redact_url,
    run_worker,
    storage_errors,
    work_left,
)
from slmkit.sweep.space import expand_grid, format_cell, parse_space, valid_grid

# What --trial-seconds decides for each trial (runner.Plan), so a sweep cannot also vary it.
BUDGET_SETS = ("max_iters", "epochs", "eval_interval")

__all__ = ["create", "run", "write_report", "collect_rows", "expand_grid", "register"]


def base_config(base: str | None, flags: dict[str, dict[str, Any]]):
    """--base is a preset name or a TOML / YAML config file; flags override it."""
    from slmkit.config import PRESETS, resolve_config

    if base is None or base in PRESETS:
        return resolve_config(base, None, flags)
    if Path(base).is_file():
        return resolve_config(None, base, flags)
    raise UserError(f"--base {base!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")


def create(
    sweep_dir: str | Path,
    base,
    grid: list[str] | None = None,
    params: list[str] | None = None,
    search: str | None = None,
    trials: int | None = None,
    trial_seconds: float | None = None,
    seeds: int = 1,
    prune: bool | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    skip_invalid: bool = False,
    sampler_seed: int = 0,
    log=print,
) -> SweepSpec:
    """Check everything, then create the study and sweep.json; nothing is trained here."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / SPEC_FILE).exists():
        raise UserError(f"{sweep_dir} already holds a sweep; continue it with: slm sweep --resume {sweep_dir}")
    grid, params = grid or [], params or []
    if grid and (params or search):
        raise UserError("--grid makes a grid search; for --random / --search give the ranges with --param")
    if grid:
        mode = "grid"
    elif search:
        mode = search
        if not params:
            raise UserError(f"--search {search} needs the space: --param \"learning_rate=log:1e-4:1e-2\" ...")
    else:
        raise UserError("say what to vary: --grid NAME=V1,V2 (grid), or --param NAME=LOW:HIGH with --random N or "
                        "--search tpe --trials N")
    if mode != "grid" and (trials is None or trials < 1):
        raise UserError(f"--search {mode} needs --trials N (N >= 1)")
    if mode != "grid":
        check_count("trials", trials, 1, MAX_TRIALS, "--trials")
    check_count("seeds", seeds, 1, MAX_SEEDS, "--seeds")
    check_count("sampler_seed", sampler_seed, 0, SAMPLER_SEED_LIMIT - 1, "--sampler-seed")
    check_trial_seconds(trial_seconds, "--trial-seconds")
    space = parse_space(grid or params, base, "--grid" if grid else "--param", ranges=not grid)
    budgeted = sorted(p.name for p in space if p.name in BUDGET_SETS)
    if trial_seconds is not None and budgeted:
        raise UserError(f"--trial-seconds sets max_iters and eval_interval per trial from the time budget; do not "
                        f"also sweep {', '.join(budgeted)}")
    base.validate()
    skipped: list[tuple[dict, str]] = []
    spec = SweepSpec(
        mode=mode, params=space, n_trials=trials or 0, base=base.to_dict(), storage="", study_name="",
        trial_seconds=trial_seconds, seeds=seeds, prune=(mode != "grid") if prune is None else prune,
        sampler_seed=sampler_seed,
    )
    cells = None
    if mode == "grid":
        cells, skipped = valid_grid(base, space, skip_invalid)
        spec.n_trials = len(cells)
        spec.skipped = [{"cell": c, "reason": why} for c, why in skipped]
        for c, why in skipped:
            log(f"skipping invalid cell {format_cell(c)}: {why}")
    elif mode == "random":
        cells = random_cells(spec, base)
    from slmkit.fileio import claim_folder

    # Created and marked as slmkit's before the study exists: an unwritable or foreign --out is
    # refused here, and nothing is left in the storage.
    claim_folder(sweep_dir, "sweep", overwrite=False, flag="--out")
    spec.storage = storage or default_storage(sweep_dir)
    spec.study_name = study_name or sweep_dir.resolve().name
    create_sweep(spec, sweep_dir, cells)
    return spec


def run(sweep_dir: str | Path, show: bool = True, report: bool = True, worker_seed: int | None = None,
        max_trials: int | None = None) -> int:
    """Run (or continue, or join) the sweep in `sweep_dir`; returns the trials this worker ran."""
    from slmkit.data import prepare

    sweep_dir = Path(sweep_dir)
    spec = load_spec(sweep_dir)
    data = prepare(spec.base_config().data)  # once, shared by every trial
    with storage_errors(spec.storage):
        ran = run_worker(sweep_dir, str(data.dir), show=show, worker_seed=worker_seed, max_trials=max_trials)
    if report:
        write_report(sweep_dir)
    return ran


# ----------------------------------------------------------------------------- CLI


SPACE_FLAGS = ("grid", "param", "random", "search", "trials", "trial_seconds", "storage", "study_name", "base")


@contextlib.contextmanager
def _one_line(storage: str | None = None) -> Iterator[None]:
    """What reaches the user from a sweep command: one line, never a storage password.

    File-system failures (a read-only or full disk under --out, a vanished folder) become
    UserErrors here rather than tracebacks; every message passes through the redaction."""
    try:
        yield
    except UserError as exc:
        raise UserError(redact_text(str(exc), storage)) from None
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(redact_text(f"cannot use{where}: {reason}", storage)) from None


def cmd_sweep(args: argparse.Namespace) -> None:
    with _one_line(args.storage):
        _sweep_command(args)


def _sweep_command(args: argparse.Namespace) -> None:
    from slmkit.cli import config_flags

    flags = config_flags(args)
    if args.resume:
        given = [f"--{n.replace('_', '-')}" for n in SPACE_FLAGS if getattr(args, n) not in (None, [])]
        given += [f"--{n.replace('_', '-')}" for vals in flags.values() for n in vals]
        if given:
            raise UserError(f"--resume continues the saved sweep; drop {', '.join(sorted(given))}")
        sweep_dir = Path(args.resume)
        if not _work_left(sweep_dir):
            _print_finished(sweep_dir, args.no_report)
            return
    else:
        if args.random is not None and args.search not in (None, "random"):
            raise UserError("--random N is --search random --trials N; give one of them")
        search = "random" if args.random is not None else args.search
        trials = args.random if args.random is not None else args.trials
        sweep_dir = Path(args.out) if args.out else Path("sweeps") / time.strftime("sweep-%Y%m%d-%H%M%S")
        base = base_config(args.base, flags)
        spec = create(sweep_dir, base, grid=args.grid, params=args.param, search=search, trials=trials,
                      trial_seconds=args.trial_seconds, seeds=args.seeds, prune=args.prune, storage=args.storage,
                      study_name=args.study_name, skip_invalid=args.skip_invalid, sampler_seed=args.sampler_seed)
        budget = (f"{spec.trial_seconds:g} s" if spec.trial_seconds else f"{base.train.epochs:g} epochs"
                  if base.train.epochs > 0 else f"{base.train.max_iters} steps")
        print(f"sweep {sweep_dir}: {spec.mode}, {spec.n_trials} trials x {spec.seeds} seed(s), {budget} each, "
              f"pruning {'on' if spec.prune else 'off'}; study {spec.study_name!r} in {redact_url(spec.storage)}")
    ran = run(sweep_dir, show=True, report=not args.no_report)
    _, rows = collect_rows(sweep_dir)
    print(f"this worker ran {ran} trial(s)" + _outcome(sweep_dir, rows, not args.no_report))


def _outcome(sweep_dir: Path, rows: list[dict[str, Any]], report: bool) -> str:
    done = [r for r in rows if r["state"] == "complete" and "best_val_loss" in r]
    msg = ""
    if done:
        b = done[0]
        msg += f"; best: trial {b['trial']} val {b['best_val_loss']:.4f} ({b['run_dir']})"
    if report:
        msg += f"; report: {sweep_dir / 'report.md'}"
    return msg


def _work_left(sweep_dir: Path) -> bool:
    spec = load_spec(sweep_dir)
    with storage_errors(spec.storage):
        return work_left(load_study(spec), spec)


def _print_finished(sweep_dir: Path, no_report: bool) -> None:
    """A resumed sweep with nothing left: its results, as report.md tabulates them."""
    spec, rows = collect_rows(sweep_dir)
    print(f"sweep {sweep_dir}: all {len(rows)} trial(s) are finished; nothing was left to run")
    print(markdown_table(spec, rows), end="")
    outcome = _outcome(sweep_dir, rows, not no_report and (sweep_dir / REPORT_MD).is_file())
    if outcome:
        print(outcome.removeprefix("; "))


def cmd_report(args: argparse.Namespace) -> None:
    from slmkit.config import MAX_SAMPLE_TOKENS

    check_count("sample_tokens", args.sample_tokens, 0, MAX_SAMPLE_TOKENS, "--sample-tokens")
    with _one_line():
        path = write_report(args.dir, sample_tokens=args.sample_tokens)
    print(path.read_text() if args.print else f"wrote {path}, {path.parent / 'results.csv'} and "
          f"{path.parent / 'plots'}/")


# The generated usage would list every config flag and end in "report ...", which reads as a
# positional every sweep needs; these are the three ways the command is used.
USAGE = """%(prog)s (--grid NAME=V1,V2 ... | --param SPEC ... (--random N | --search tpe --trials N))
                 [--base PRESET_OR_FILE] [--trial-seconds S] [--seeds K] [--out DIR] [options] [settings]
       %(prog)s --resume DIR
       %(prog)s report DIR [--print] [--sample-tokens N]"""


def register(sub) -> None:
    from slmkit.cli import add_config_flags

    p = sub.add_parser(
        "sweep", help="hyperparameter sweep (grid, random, TPE on Optuna); `slm sweep report DIR` for the report",
        description="Run a sweep: one ordinary run directory per trial, a study in SQLite (or --storage). Settings "
                    "(model, data and train flags) change the base configuration of every trial.",
        usage=USAGE,
    )
    p.add_argument("--base", help="preset name or TOML/YAML config that every trial starts from")
    p.add_argument("--grid", action="append", metavar="NAME=V1,V2",
                   help="grid search over these values (repeatable; every combination runs)")
    p.add_argument("--param", action="append", metavar="SPEC",
                   help="search space for --random/--search: NAME=LOW:HIGH, NAME=log:LOW:HIGH or NAME=V1,V2 "
                        "(repeatable)")
    p.add_argument("--random", type=int, metavar="N", help="random search with N trials (Optuna RandomSampler)")
    p.add_argument("--search", choices=("tpe", "random"), help="sampler for a --param space (with --trials)")
    p.add_argument("--trials", type=int, metavar="N", help="number of trials for --search")
    p.add_argument("--trial-seconds", type=float, metavar="S",
                   help="equal compute: each trial trains S seconds (max_iters sized so the schedule fits, with "
                        "warmup at most a tenth of it and ~8 evaluations)")
    p.add_argument("--seeds", type=int, default=1, metavar="K", help="train each trial with K seeds; mean ± std")
    p.add_argument("--prune", action=argparse.BooleanOptionalAction, default=None,
                   help="median pruning of clearly bad trials (default: on for --search/--random, off for grids)")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid grid cells instead of failing")
    p.add_argument("--out", help="sweep directory (default: sweeps/sweep-DATE-TIME)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage URL shared by workers, e.g. postgresql://user:pw@host/db "
                        "(default: sqlite in the sweep directory)")
    p.add_argument("--study-name", help="study name in the storage (default: the sweep directory's name)")
    p.add_argument("--sampler-seed", type=int, default=0, help="seed of the random / TPE sampler")
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
