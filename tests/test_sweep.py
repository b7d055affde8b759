"""Sweeps: grid expansion, errors before any trial, equal budgets, resume, parallel workers, reports."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

optuna = pytest.importorskip("optuna")

from slmkit import sweep  # noqa: E402
from slmkit.errors import UserError  # noqa: E402
from slmkit.sweep.report import collect_rows, run_metrics  # noqa: E402
from slmkit.sweep.runner import TRIALS_DIR, counted_trials, load_spec, load_study  # noqa: E402
from slmkit.sweep.space import expand_grid, parse_space  # noqa: E402
from slmkit.train import read_metrics  # noqa: E402

# Tiny models train fastest on one thread, and the machine's other cores stay free.
pytestmark = pytest.mark.usefixtures("module_one_torch_thread")


def base(corpus: Path, **train):
    cfg = tiny_config(corpus, max_iters=8, eval_interval=4, sample_tokens=0, log_interval=4, **train)
    cfg.model.n_embd, cfg.model.n_layer = 16, 1
    return cfg


def finished(sweep_dir: Path):
    spec = load_spec(sweep_dir)
    return spec, counted_trials(load_study(spec))


def cells_of(trials, names):
    return sorted(tuple(t.params[n] for n in names) for t in trials)


# ----------------------------------------------------------------------------- space and errors


def test_grid_expands_in_order_with_typed_values(tiny_corpus):
    params = parse_space(["n_layer=2,4,6", "learning_rate=1e-3,3e-3", "bias=true,false"], base(tiny_corpus),
                         "--grid", ranges=False)
    cells = expand_grid(params)
    assert len(cells) == 12
    assert cells[0] == {"n_layer": 2, "learning_rate": 1e-3, "bias": True}
    assert cells[-1] == {"n_layer": 6, "learning_rate": 3e-3, "bias": False}
    assert isinstance(cells[0]["n_layer"], int) and isinstance(cells[0]["learning_rate"], float)
    assert len({tuple(c.values()) for c in cells}) == 12
    r = parse_space(["learning_rate=log:1e-4:1e-2", "n_layer=1:4", "dropout=0.0,0.1"], base(tiny_corpus),
                    "--param", ranges=True)
    assert (r[0].kind, r[0].log, r[1].kind, r[1].low, r[1].high, r[2].kind) == ("float", True, "int", 1, 4, "choice")


@pytest.mark.parametrize("kwargs, message", [
    ({"grid": ["n_layers=2,4"]}, "unknown hyperparameter 'n_layers'"),
    ({"grid": ["n_layer=two"]}, "expected int"),
    ({"grid": ["tokenizer=char,bpe"]}, "cannot be swept"),
    ({"grid": ["learning_rate=1e-4:1e-2"]}, "ranges go in --param"),
    ({"grid": ["n_embd=16,20", "n_head=2,8"]}, "1 of 4 grid cells are invalid: n_embd=20 n_head=8"),
    ({"params": ["learning_rate=log:0:1"], "search": "tpe", "trials": 2}, "log range needs LOW > 0"),
    ({"params": ["n_layer=1:2"], "search": "tpe"}, "needs --trials"),
    ({}, "say what to vary"),
    ({"grid": ["n_layer=1,2"], "storage": "sqlite:////nonexistent/dir/study.db"}, "cannot open the study storage"),
    ({"grid": ["n_layer=1,2"], "storage": "nosuchdb://host/db"}, "cannot open the study storage"),
    ({"grid": ["max_iters=10,20"], "trial_seconds": 5}, "do not also sweep max_iters"),
    ({"grid": ["epochs=1,2"], "trial_seconds": 5}, "do not also sweep epochs"),
])
def test_errors_come_before_any_trial(tmp_path, tiny_corpus, kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as exc:
        sweep.create(tmp_path / "sw", base(tiny_corpus), **kwargs)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "sw" / TRIALS_DIR).exists()


def test_cli_error_is_one_line(tmp_path, tiny_corpus, capsys):
    from slmkit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--dataset", str(tiny_corpus), "--grid", "n_embd=64,100", "--grid", "n_head=4,8",
              "--max-iters", "5", "--out", str(tmp_path / "sw")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 1 of 4 grid cells are invalid") and "--skip-invalid" in err
    assert "\n" not in err


def test_skip_invalid_queues_only_valid_cells(tmp_path, tiny_corpus):
    logged = []
    spec = sweep.create(tmp_path / "sw", base(tiny_corpus), grid=["n_embd=16,20", "n_head=2,8"],
                        skip_invalid=True, log=logged.append)
    assert spec.n_trials == 3 and len(spec.skipped) == 1
    assert logged == ["skipping invalid cell n_embd=20 n_head=8: n_embd (20) must be divisible by n_head (8)"]
    study = load_study(spec)
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 3


# ----------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, module_one_torch_thread):
    """One 2 x 2 grid sweep shared by the report tests."""
    tmp = tmp_path_factory.mktemp("grid")
    corpus = tmp / "tiny.txt"
    corpus.write_text("".join(f"the cat sat on the mat number {i % 7}.\n" for i in range(400)))
    d = tmp / "sw"
    sweep.create(d, base(corpus), grid=["n_layer=1,2", "learning_rate=1e-3,3e-3"])
    assert sweep.run(d, show=False) == 4
    return d


def test_grid_sweep_runs_every_cell_once_as_ordinary_runs(grid_sweep):
    spec, trials = finished(grid_sweep)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert cells_of(trials, ["n_layer", "learning_rate"]) == [(1, 1e-3), (1, 3e-3), (2, 1e-3), (2, 3e-3)]
    for t in trials:
        run = grid_sweep / t.user_attrs["run_dirs"][0]
        for name in ("config.json", "metrics.jsonl", "loss.png", "ckpt_best.safetensors", "ckpt_last.safetensors"):
            assert (run / name).is_file(), name
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["model"]["n_layer"] == t.params["n_layer"]
        assert cfg["train"]["learning_rate"] == t.params["learning_rate"]
        # Equal budget (--max-iters): every trial trains the same number of steps.
        assert max(r["step"] for r in read_metrics(run)) == 8
        assert t.value == pytest.approx(min(r["val_loss"] for r in read_metrics(run) if "val_loss" in r))


def test_report_rows_match_metrics_files(grid_sweep, capsys):
    from slmkit.cli import main

    main(["sweep", "report", str(grid_sweep)])
    assert "report.md" in capsys.readouterr().out
    with open(grid_sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert [float(r["best_val_loss"]) for r in rows] == sorted(float(r["best_val_loss"]) for r in rows)
    for r in rows:
        records = read_metrics(grid_sweep / r["run_dir"])
        evals = [x for x in records if "val_loss" in x]
        assert float(r["best_val_loss"]) == pytest.approx(min(x["val_loss"] for x in evals))
        assert float(r["final_train_loss"]) == pytest.approx(evals[-1]["train_eval_loss"])
        assert float(r["gap"]) == pytest.approx(evals[-1]["val_loss"] - evals[-1]["train_eval_loss"])
        assert float(r["wall_s"]) == pytest.approx(max(x["elapsed"] for x in records if "elapsed" in x))
        assert int(float(r["steps"])) == 8
        cfg = json.loads((grid_sweep / r["run_dir"] / "config.json").read_text())
        assert int(r["n_layer"]) == cfg["model"]["n_layer"]
        assert float(r["params_M"]) == pytest.approx(run_metrics(grid_sweep / r["run_dir"])["params"] / 1e6)
    md = (grid_sweep / "report.md").read_text()
    best = rows[0]
    assert f"**{float(best['best_val_loss']):.4f}**" in md
    assert md.count("\n| ") == 5  # header + 4 trials
    assert "## Sample from the best trial" in md and (grid_sweep / "sample.txt").stat().st_size > 0


def test_plots_exist_and_are_nonempty(grid_sweep):
    plots = grid_sweep / "plots"
    names = {p.name for p in plots.glob("*.png")}
    assert names == {"val_curves.png", "val_vs_params.png", "val_vs_n_layer.png", "val_vs_learning_rate.png"}
    for p in plots.glob("*.png"):
        assert p.stat().st_size > 5000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_finished_trials(tmp_path, tiny_corpus):
    d = tmp_path / "sw"
    sweep.create(d, base(tiny_corpus), grid=["n_layer=1,2,3"])
    assert sweep.run(d, show=False, report=False, max_trials=1) == 1
    _, trials = finished(d)
    first = d / trials[0].user_attrs["run_dirs"][0] / "metrics.jsonl"
    stamp = first.stat().st_mtime_ns
    assert sweep.run(d, show=False, report=False) == 2
    _, trials = finished(d)
    assert cells_of(trials, ["n_layer"]) == [(1,), (2,), (3,)] and len(trials) == 3
    assert first.stat().st_mtime_ns == stamp  # the finished trial was not run again
    assert sweep.run(d, show=False, report=False) == 0


def test_interrupted_trial_is_queued_again(tmp_path, tiny_corpus, monkeypatch):
    train_module = sys.modules["slmkit.train"]

    d = tmp_path / "sw"
    sweep.create(d, base(tiny_corpus), grid=["n_layer=1,2"])
    real = train_module.train
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train", flaky)
    with pytest.raises(UserError, match="interrupted during trial 1; continue with: slm sweep --resume"):
        sweep.run(d, show=False, report=False)
    monkeypatch.setattr(train_module, "train", real)
    assert sweep.run(d, show=False, report=False) == 1
    spec, trials = finished(d)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert cells_of(trials, ["n_layer"]) == [(1,), (2,)]
    _, rows = collect_rows(d)
    assert len(rows) == 2


def test_crashed_trial_is_failed_and_sweep_goes_on(tmp_path, tiny_corpus):
    d = tmp_path / "sw"
    # The validation split of the tiny corpus is ~2 KB: a 4096-token context cannot train on it.
    sweep.create(d, base(tiny_corpus), grid=["block_size=16,4096"])
    sweep.run(d, show=False)
    _, rows = collect_rows(d)
    by_block = {r["block_size"]: r for r in rows}
    assert by_block[16]["state"] == "complete"
    assert by_block[4096]["state"] == "failed" and "fewer than block_size" in by_block[4096]["error"]
    assert "failed: " in (d / "report.md").read_text()


def test_time_budget_gives_equal_wall_time(tmp_path, tiny_corpus, capsys):
    d = tmp_path / "sw"
    cfg = base(tiny_corpus)
    # Sized for a long run: in a 2 s trial they would leave one evaluation and a warmup never finished.
    cfg.train.eval_interval, cfg.train.warmup_iters = 20, 10**6
    sweep.create(d, cfg, grid=["n_embd=16,128"], trial_seconds=2.0)
    sweep.run(d, show=True, report=False)
    table = [line.split() for line in capsys.readouterr().out.splitlines() if line.endswith("/2]")]
    _, trials = finished(d)
    planned = {t.params["n_embd"]: t.user_attrs["planned_max_iters"] for t in trials}
    assert planned[16] > planned[128] > 1  # the bigger model gets fewer steps in the same time
    _, rows = collect_rows(d)
    for t in trials:
        records = read_metrics(d / t.user_attrs["run_dirs"][0])
        wall = max(r["elapsed"] for r in records if "elapsed" in r)
        steps = max(r["step"] for r in records)
        # The whole schedule ran, or the guard stopped it at the budget; either way within it.
        assert steps == planned[t.params["n_embd"]] or t.user_attrs.get("stopped_by_budget")
        assert wall <= 2.0 * 1.6, (t.params, wall)
        # The schedule is scaled to the budget: a short warmup, and a curve of evaluations.
        saved = json.loads((d / t.user_attrs["run_dirs"][0] / "config.json").read_text())["train"]
        assert saved["warmup_iters"] == int(0.1 * planned[t.params["n_embd"]])
        evaluations = sum("val_loss" in r for r in records)
        assert 5 <= evaluations <= 10 or t.user_attrs.get("stopped_by_budget"), evaluations
        # The terminal's time column is the report's wall time.
        row = next(r for r in rows if r["trial"] == t.number)
        assert t.user_attrs["elapsed"] == [pytest.approx(row["wall_s"], abs=0.01)]
        printed = next(cells for cells in table if cells[0] == str(t.number))
        assert printed[4] == f"{row['wall_s']:.1f}"


def test_budget_schedule_fits_evaluations_and_warmup():
    from slmkit.sweep.runner import fit_schedule

    plan = fit_schedule(warmup_iters=100, seconds=60.0, step_s=0.05, eval_s=1.0)
    evaluations = plan.max_iters // plan.eval_interval + (plan.max_iters % plan.eval_interval > 0)
    assert 8 <= evaluations <= 9 and plan.warmup_iters == 100
    assert plan.max_iters * 0.05 + evaluations * 1.0 <= 60.0
    assert fit_schedule(100, 6.0, 0.05, 0.01).warmup_iters == int(0.1 * fit_schedule(100, 6.0, 0.05, 0.01).max_iters)
    slow_eval = fit_schedule(10, 3.0, 0.01, 1.0)  # room for one evaluation besides the last
    assert (slow_eval.max_iters, slow_eval.eval_interval) == (100, 100)
    assert fit_schedule(10, 1.0, 5.0, 5.0).max_iters == 1  # nothing fits: one step, one evaluation


def test_finished_sweep_resumed_prints_its_results(grid_sweep, capsys):
    from slmkit.cli import main
    from slmkit.sweep.report import markdown_table

    stamp = (grid_sweep / "report.md").stat().st_mtime_ns
    main(["sweep", "--resume", str(grid_sweep)])
    out = capsys.readouterr().out
    spec, rows = collect_rows(grid_sweep)
    assert "all 4 trial(s) are finished; nothing was left to run" in out
    assert markdown_table(spec, rows) in out and markdown_table(spec, rows) in (grid_sweep / "report.md").read_text()
    assert f"best: trial {rows[0]['trial']}" in out
    assert (grid_sweep / "report.md").stat().st_mtime_ns == stamp  # nothing ran, nothing rewritten


def test_random_and_tpe_searches_with_seeds(tmp_path, tiny_corpus):
    d = tmp_path / "rnd"
    spec = sweep.create(d, base(tiny_corpus), params=["learning_rate=log:1e-3:1e-2", "n_layer=1:2"],
                        search="random", trials=3, seeds=2)
    assert spec.prune is True
    sweep.run(d, show=False)
    _, trials = finished(d)
    assert len(trials) == 3 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert all(1e-3 <= t.params["learning_rate"] <= 1e-2 for t in trials)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert all(len(t.user_attrs["seed_best_val_losses"]) == 2 for t in done)
    _, rows = collect_rows(d)
    assert rows[0]["seeds"] == 2 and "best_val_loss_std" in rows[0]
    assert " ± " in (d / "report.md").read_text()

    d2 = tmp_path / "tpe"
    sweep.create(d2, base(tiny_corpus), params=["learning_rate=log:1e-3:1e-2"], search="tpe", trials=3)
    assert sweep.run(d2, show=False, report=False) == 3
    _, trials = finished(d2)
    assert len(trials) == 3


def test_two_parallel_workers_share_one_study(tmp_path, tiny_corpus):
    d = tmp_path / "sw"
    cfg = base(tiny_corpus)
    sweep.create(d, cfg, grid=["n_layer=1,2,3", "learning_rate=1e-3,2e-3"])
    code = ("import sys; from slmkit.sweep import run; "
            "print('RAN', run(sys.argv[1], show=False, report=False))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    ran = [int(o[0].split("RAN")[-1]) for o in outs]
    assert sum(ran) == 6
    spec, trials = finished(d)
    assert len(load_study(spec).trials) == 6  # no extra trial was ever created
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    cells = cells_of(trials, ["n_layer", "learning_rate"])
    assert cells == sorted({(n, lr) for n in (1, 2, 3) for lr in (1e-3, 2e-3)})  # each cell exactly once
    dirs = {t.user_attrs["run_dirs"][0] for t in trials}
    assert len(dirs) == 6
    for r in dirs:
        assert max(x["step"] for x in read_metrics(d / r)) == 8  # no result lost


def test_budget_guard_stops_only_a_late_schedule(monkeypatch):
    from slmkit.sweep import runner

    clock = [100.0]
    monkeypatch.setattr(runner.time, "perf_counter", lambda: clock[0])
    guard = runner.BudgetGuard(trial=None, report=False, seconds=10.0, max_iters=100)
    clock[0] += 2.0
    assert not guard(20, 3.0)  # early and slow-looking: no decision before the budget is spent
    clock[0] += 8.5
    assert not guard(90, 2.0)  # 10.5 s spent, the last 10 steps end at ~11.7 s < 12.5 s
    assert not guard.stopped_by_budget
    late = runner.BudgetGuard(trial=None, report=False, seconds=10.0, max_iters=100)
    clock[0] += 10.5
    assert late(50, 2.0) and late.stopped_by_budget  # half done when time is up: stop here
    assert not runner.BudgetGuard(None, False, 10.0, 100)(100, 2.0)  # the schedule's end is never "late"
