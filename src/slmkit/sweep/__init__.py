"""`slm sweep`: hyperparameter sweeps (grid, random, TPE) on Optuna, one run directory per trial.

    slm sweep --base cpu-tiny --dataset tinyshakespeare --grid "n_layer=2,4" --grid "learning_rate=1e-3,3e-3" \\
        --trial-seconds 60 --out-dir sweeps/demo
    slm sweep --resume sweeps/demo        # continue, or join as a second worker
    slm sweep report sweeps/demo          # report.md, results.csv, plots/, sample.txt

Library use: `create(sweep_dir, base, **options)` (the fields of SweepOptions) then `run(sweep_dir)`;
`write_report(sweep_dir)`. The command itself is slmkit.cli.sweep_cmds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from slmkit.errors import UserError
from slmkit.options import option
from slmkit.sweep.report import collect_rows, write_report
from slmkit.sweep.runner import (
    DB_FILE,
    HEARTBEAT_S,
    LOCK_FILE,
    MAX_HEARTBEAT_S,
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
    random_cells,
    run_worker,
    storage_errors,
)
from slmkit.sweep.space import expand_grid, format_cell, parse_space, valid_grid
from slmkit.tracking import require_loggers

# What --trial-seconds decides for each trial (runner.Plan), so a sweep cannot also vary it.
BUDGET_SETS = ("max_iters", "epochs", "eval_interval")

__all__ = ["SweepOptions", "create", "run", "write_report", "collect_rows", "expand_grid"]


@dataclass
class SweepOptions:
    """What a sweep varies and how its trials run: `create()`'s options and `slm sweep`'s flags."""

    grid: tuple[str, ...] = option((), "grid search over these values (repeatable; every combination runs)",
                                   metavar="NAME=V1,V2")
    params: tuple[str, ...] = option((), "search space for --random/--search: NAME=LOW:HIGH, NAME=log:LOW:HIGH or "
                                         "NAME=V1,V2 (repeatable)", cli="--param", metavar="SPEC")
    search: str | None = option(None, "sampler for a --param space (with --trials)", choices=("tpe", "random"))
    trials: int | None = option(None, "number of trials for --search", metavar="N")
    trial_seconds: float | None = option(None, "equal compute: each trial trains S seconds (max_iters sized so the "
                                               "schedule fits, with warmup at most a tenth of it and ~8 evaluations)",
                                         metavar="S")
    seeds: int = option(1, "train each trial with K seeds; mean ± std", metavar="K")
    prune: bool | None = option(None, "median pruning of clearly bad trials (default: on for --search/--random, "
                                      "off for grids)")
    storage: str | None = option(None, "Optuna storage URL shared by workers, e.g. postgresql://user:pw@host/db "
                                       "(default: sqlite in the sweep directory)", metavar="URL")
    study_name: str | None = option(None, "study name in the storage (default: the sweep directory's name)")
    skip_invalid: bool = option(False, "skip invalid grid cells instead of failing")
    sampler_seed: int = option(0, "seed of the random / TPE sampler")
    heartbeat: int = option(HEARTBEAT_S, "workers record a heartbeat every S seconds while a trial runs; a trial "
                                         "silent for 4 S + 5 s (45 s by default) is failed and queued again",
                            metavar="S")
    finetune_task: str | None = option(None, "rank trials by a short fine-tune's dev score on this task (sst2, "
                                             "cola, ...; with --finetune-train and --finetune-dev) instead of by "
                                             "validation loss", metavar="TASK")
    finetune_train: str | None = option(None, "the fine-tune objective's training file", metavar="FILE")
    finetune_dev: str | None = option(None, "the fine-tune objective's dev file: its score ranks the trials",
                                      metavar="FILE")
    finetune_set: tuple[str, ...] = option((), "a setting of the objective's fine-tune, as slm finetune names it "
                                               "(repeatable; default lr=3e-4 batch_size=16 epochs=5 warmup_frac=0.1 "
                                               "max_len=128 max_train=1000)", metavar="NAME=VALUE")


def sweep_options(**options: Any) -> SweepOptions:
    """SweepOptions from keyword arguments; an unknown name is a one-line error, not a TypeError."""
    known = [f.name for f in fields(SweepOptions)]
    unknown = sorted(str(k) for k in options if k not in known)
    if unknown:
        raise UserError(f"unknown sweep option {unknown[0]!r}; known: {', '.join(known)}")
    return SweepOptions(**options)


def base_config(base: str | None, flags: dict[str, dict[str, Any]]):
    """--base is a preset name or a TOML / YAML config file; flags override it."""
    from slmkit.config import PRESETS, resolve_config

    if base is None or base in PRESETS:
        return resolve_config(base, None, flags)
    if Path(base).is_file():
        return resolve_config(None, base, flags)
    raise UserError(f"--base {base!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")


def create(sweep_dir: str | Path, base, *, log=print, **options: Any) -> SweepSpec:
    """Check everything, then create the study and sweep.json; nothing is trained here.

    `options` are the fields of SweepOptions (grid=[...], params=[...], search="tpe", trials=N, ...)."""
    o = sweep_options(**options)
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / SPEC_FILE).exists():
        raise UserError(f"{sweep_dir} already holds a sweep; continue it with: slm sweep --resume {sweep_dir}")
    grid, params = list(o.grid or ()), list(o.params or ())
    search, trials, trial_seconds = o.search, o.trials, o.trial_seconds
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
    check_count("seeds", o.seeds, 1, MAX_SEEDS, "--seeds")
    check_count("sampler_seed", o.sampler_seed, 0, SAMPLER_SEED_LIMIT - 1, "--sampler-seed")
    check_count("heartbeat", o.heartbeat, 1, MAX_HEARTBEAT_S, "--heartbeat")
    check_trial_seconds(trial_seconds, "--trial-seconds")
    space = parse_space(grid or params, base, "--grid" if grid else "--param", ranges=not grid)
    budgeted = sorted(p.name for p in space if p.name in BUDGET_SETS)
    if trial_seconds is not None and budgeted:
        raise UserError(f"--trial-seconds sets max_iters and eval_interval per trial from the time budget; do not "
                        f"also sweep {', '.join(budgeted)}")
    finetune = _finetune_objective(o)
    if finetune is not None and o.prune:
        raise UserError("--prune compares validation losses during training; with --finetune-task a trial's value "
                        "is known only at its end: drop --prune")
    base.validate()
    require_loggers(base.train.logger)  # every trial logs to them: a missing one fails before the sweep exists
    skipped: list[tuple[dict, str]] = []
    spec = SweepSpec(
        mode=mode, params=space, n_trials=trials or 0, base=base.to_dict(), storage="", study_name="",
        trial_seconds=trial_seconds, seeds=o.seeds,
        prune=(mode != "grid" and finetune is None) if o.prune is None else o.prune,
        sampler_seed=o.sampler_seed, heartbeat=o.heartbeat, finetune=finetune,
    )
    cells = None
    if mode == "grid":
        cells, skipped = valid_grid(base, space, o.skip_invalid)
        spec.n_trials = len(cells)
        spec.skipped = [{"cell": c, "reason": why} for c, why in skipped]
        for c, why in skipped:
            log(f"skipping invalid cell {format_cell(c)}: {why}")
    elif mode == "random":
        cells = random_cells(spec, base)
    from slmkit.fileio import claim_folder

    # Created and marked as slmkit's before the study exists: an unwritable or foreign --out-dir is
    # refused here, and nothing is left in the storage.
    new_folder = not sweep_dir.exists()
    claim_folder(sweep_dir, "sweep", overwrite=False, flag="--out-dir")
    spec.storage = o.storage or default_storage(sweep_dir)
    spec.study_name = o.study_name or sweep_dir.resolve().name
    try:
        create_sweep(spec, sweep_dir, cells)
    except BaseException:
        # A storage that cannot be reached (or refuses the study) leaves no folder that looks like a
        # started sweep: the folder this call made goes again, if nothing else came into it.
        if new_folder:
            unclaim_folder(sweep_dir)
        raise
    return spec


def _finetune_objective(o: SweepOptions) -> dict[str, Any] | None:
    """The fine-tune objective the flags ask for (None: rank by validation loss), checked now."""
    given_flags = [flag for flag, v in (("--finetune-train", o.finetune_train), ("--finetune-dev", o.finetune_dev),
                                        ("--finetune-set", o.finetune_set)) if v]
    if o.finetune_task is None:
        if given_flags:
            raise UserError(f"{given_flags[0]} belongs to the fine-tune objective: add --finetune-task TASK")
        return None
    if not o.finetune_train or not o.finetune_dev:
        raise UserError("--finetune-task needs the task's files: --finetune-train FILE --finetune-dev FILE")
    from slmkit.sweep.objective import make_objective

    return make_objective(o.finetune_task, o.finetune_train, o.finetune_dev, o.finetune_set)


def unclaim_folder(folder: Path) -> None:
    """Remove a folder claim_folder() just created, with its marker, unless it now holds anything else."""
    from slmkit.fileio import LOCK, MARKER

    entries = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if entries <= {MARKER, LOCK, DB_FILE, f"{DB_FILE}-journal", LOCK_FILE}:
        for name in entries:
            (folder / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()


def run(sweep_dir: str | Path, show: bool = True, report: bool = True, worker_seed: int | None = None,
        max_trials: int | None = None) -> int:
    """Run (or continue, or join) the sweep in `sweep_dir`; returns the trials this worker ran."""
    from slmkit.data import prepare

    sweep_dir = Path(sweep_dir)
    spec = load_spec(sweep_dir)
    require_loggers(spec.base_config().train.logger)  # a worker that lacks a tracker says so before any trial
    data = prepare(spec.base_config().data)  # once, shared by every trial
    if spec.finetune is not None:
        from slmkit.sweep.objective import check_encodable

        check_encodable(spec.finetune, data.tokenizer)
    with storage_errors(spec.storage):
        ran = run_worker(sweep_dir, str(data.dir), show=show, worker_seed=worker_seed, max_trials=max_trials)
    if report:
        write_report(sweep_dir)
    return ran
