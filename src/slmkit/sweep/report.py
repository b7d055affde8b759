"""`slm sweep report DIR`: report.md, results.csv, plots/*.png and a sample from the best trial.

Every number in a row is read back from the trial's own metrics.jsonl (seed runs: mean and std):
  best val loss   lowest val_loss at any evaluation (the fixed validation subset)
  final train     train_eval_loss at the last evaluation (the fixed training subset, not one batch)
  gap             val_loss - train_eval_loss at the last evaluation (overfitting shows as a growing gap)
  tokens/s        median training throughput, evaluations excluded
  wall (s)        training wall time at the last record (evaluations included)
  fine-tuned dev  with --finetune-task: the last epoch's dev score of the trial's fine-tune (its
                  finetune/metrics.jsonl); trials are then ranked by it, higher first
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.errors import UserError
from slmkit.runlog import pyplot, read_metrics, save_figure
from slmkit.sweep.objective import describe, read_score
from slmkit.sweep.runner import counted_trials, load_spec, load_study, redact_text, storage_errors, trial_run_dir
from slmkit.train import CONFIG

REPORT_MD, RESULTS_CSV, PLOTS_DIR, SAMPLE_TXT = "report.md", "results.csv", "plots", "sample.txt"


def run_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The table's numbers for one run directory, from its metrics.jsonl and config.json."""
    records = read_metrics(run_dir)
    # Only records whose numbers are numbers: an edited or torn metrics file loses rows, not the report.
    evals = [r for r in records if _finite(r.get("val_loss")) and _finite(r.get("train_eval_loss"))
             and isinstance(r.get("step"), int)]
    if not evals:
        return None
    records = [r for r in records if isinstance(r.get("step"), int) and _finite(r.get("elapsed", 0.0))
               and _finite(r.get("tokens_per_s", 0.0))]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    last = evals[-1]
    return {
        "best_val_loss": min(r["val_loss"] for r in evals),
        "final_train_loss": last["train_eval_loss"],
        "gap": last["val_loss"] - last["train_eval_loss"],
        "tokens_per_s": float(np.median(speeds)) if speeds else 0.0,
        "wall_s": max(r.get("elapsed", 0.0) for r in records),
        "steps": max(r["step"] for r in records),
        "params": count_params(run_dir),
        "curve": [(r["step"], r.get("elapsed"), r["val_loss"]) for r in evals],
    }


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def count_params(run_dir: Path) -> int | None:
    """Parameters of the run's model, counted on the meta device; None when its config is unreadable."""
    p = Path(run_dir) / CONFIG
    if not p.is_file():
        return None
    import torch

    from slmkit.config import RunConfig
    from slmkit.fileio import read_json
    from slmkit.model import GPT

    try:
        cfg = RunConfig.from_dict(read_json(p, "run config"))
        with torch.device("meta"):
            return GPT(cfg.model).num_params()
    except (UserError, ValueError, RecursionError):  # a corrupted config.json, or one without a vocabulary size
        return None


STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}
NUMERIC = ("best_val_loss", "final_train_loss", "gap", "tokens_per_s", "wall_s", "steps")


def collect_rows(sweep_dir: str | Path) -> tuple[Any, list[dict[str, Any]]]:
    """(spec, one row per trial), best first; failed trials last."""
    sweep_dir = Path(sweep_dir)
    spec = load_spec(sweep_dir)
    with storage_errors(spec.storage):
        study = load_study(spec)
        trials = counted_trials(study)
    rows = []
    for t in trials:
        fixed = t.system_attrs.get("fixed_params", {})
        values = {p.name: t.params.get(p.name, fixed.get(p.name)) for p in spec.params}
        saved = t.user_attrs.get("run_dirs", [])
        run_dirs = [sweep_dir / r for r in saved if isinstance(r, str)] if isinstance(saved, list) else []
        run_dirs = run_dirs or [trial_run_dir(sweep_dir, t.number, i, spec.seeds) for i in range(spec.seeds)]
        runs = [(d, m) for d in run_dirs if (m := run_metrics(d)) is not None]
        row: dict[str, Any] = {"trial": t.number, "state": STATE_NAMES.get(t.state.name, t.state.name.lower()),
                               **values, "run_dir": str(run_dirs[0].relative_to(sweep_dir)),
                               "seeds": len(runs), "error": redact_text(str(t.user_attrs.get("error", "")),
                                                                        spec.storage),
                               "stopped_by_budget": bool(t.user_attrs.get("stopped_by_budget", False))}
        if runs:
            ms = [m for _, m in runs]
            row["params_M"] = (ms[0]["params"] or 0) / 1e6
            for k in NUMERIC:
                vals = [m[k] for m in ms]
                row[k] = float(np.mean(vals))
                row[f"{k}_std"] = float(np.std(vals))
            row["curves"] = [m["curve"] for m in ms]
        if spec.finetune is not None:
            scores = [s for d in run_dirs if (s := read_score(d, spec.finetune["metric"])) is not None]
            if scores:
                row[FINETUNE_KEY], row[f"{FINETUNE_KEY}_std"] = float(np.mean(scores)), float(np.std(scores))
        rows.append(row)

    objective = objective_key(spec)
    sign = -1.0 if spec.finetune is not None else 1.0  # the fine-tuned score: higher is better

    def key(r):
        ok = r["state"] == "complete" and objective in r
        return (0 if ok else 1 if objective in r else 2, sign * r.get(objective, sign * math.inf), r["trial"])

    rows.sort(key=key)
    return spec, rows


FINETUNE_KEY = "finetune_dev"  # a row's mean fine-tuned dev score, with the fine-tune objective


def objective_key(spec) -> str:
    """The row field trials are ranked by: best_val_loss, or the fine-tuned dev score."""
    return FINETUNE_KEY if spec.finetune is not None else "best_val_loss"


def best_row(rows: list[dict[str, Any]], key: str = "best_val_loss") -> dict[str, Any] | None:
    """The first complete row that has `key` (rows come sorted best first)."""
    return next((r for r in rows if r["state"] == "complete" and key in r), None)


# ----------------------------------------------------------------------------- tables


def _pm(r: dict[str, Any], k: str, fmt: str, seeds: int) -> str:
    if k not in r:
        return ""
    s = format(r[k], fmt)
    return f"{s} ± {format(r[k + '_std'], fmt)}" if seeds > 1 else s


def markdown_table(spec, rows: list[dict[str, Any]]) -> str:
    names = [p.name for p in spec.params]
    ft = spec.finetune is not None
    head = ["trial", *names, "params (M)", "tokens/s", "wall (s)", "steps", "best val loss", "final train loss",
            "gap (val − train)", *([f"fine-tuned dev {spec.finetune['metric']}"] if ft else []), "state"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    best = best_row(rows, objective_key(spec))
    for r in rows:
        k = spec.seeds
        val = _pm(r, "best_val_loss", ".4f", k)
        score = _pm(r, FINETUNE_KEY, ".4f", k)
        if best is not None and r is best:
            val, score = (val, f"**{score}**") if ft else (f"**{val}**", score)
        state = r["state"] + (f": {r['error'][:80]}" if r["state"] == "failed" and r["error"] else "")
        if r["stopped_by_budget"]:
            state += " (cut at the time budget)"
        cells = [str(r["trial"]), *[str(r[n]) for n in names],
                 f"{r['params_M']:.3f}" if "params_M" in r else "",
                 _pm(r, "tokens_per_s", ",.0f", k), _pm(r, "wall_s", ".1f", k),
                 f"{r['steps']:.0f}" if "steps" in r else "", val,
                 _pm(r, "final_train_loss", ".4f", k), _pm(r, "gap", "+.4f", k), *([score] if ft else []),
                 state.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(spec, rows: list[dict[str, Any]]) -> str:
    names = [p.name for p in spec.params]
    cols = ["trial", "state", *names, "params_M", "tokens_per_s", "wall_s", "steps", "best_val_loss",
            "best_val_loss_std", "final_train_loss", "final_train_loss_std", "gap", "gap_std",
            *([FINETUNE_KEY, f"{FINETUNE_KEY}_std"] if spec.finetune is not None else []), "seeds",
            "stopped_by_budget", "run_dir", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c, "")) for c in cols})
    return buf.getvalue()


# ----------------------------------------------------------------------------- plots


def plot_curves(rows, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    best = best_row(rows)
    shown = [r for r in rows if r.get("curves")]
    for r in shown:
        is_best = r is best
        for i, curve in enumerate(r["curves"]):
            steps = [c[0] for c in curve]
            secs = [c[1] for c in curve]
            vals = [c[2] for c in curve]
            kw = {"lw": 2.5 if is_best else 1.0, "alpha": 1.0 if is_best else 0.55,
                  "label": f"trial {r['trial']}" + (" (best)" if is_best else "") if i == 0 else None,
                  "ls": "--" if r["state"] == "pruned" else "-"}
            axes[0].plot(steps, vals, marker=".", **kw)
            if all(s is not None for s in secs):
                axes[1].plot(secs, vals, marker=".", **kw)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training wall time (s)")
    axes[0].set_ylabel("val loss (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    if 0 < len(shown) <= 12:
        axes[1].legend(fontsize=7)
    fig.suptitle("validation loss of every trial (dashed: pruned)")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_against(rows, x_key: str, path: Path, log_x: bool, xlabel: str, envelope: bool = True,
                 y_key: str = "best_val_loss", ylabel: str = "best val loss") -> None:
    """`y_key` (the validation loss, lower is better, or the fine-tuned dev score, higher is better)
    of every trial against `x_key`; the chosen trial starred."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    pts = [r for r in rows if y_key in r and r.get(x_key) is not None and r["state"] != "failed"]
    numeric = all(isinstance(r[x_key], int | float) and not isinstance(r[x_key], bool) for r in pts)
    cats = sorted({str(r[x_key]) for r in pts}) if not numeric else []
    best = best_row(rows, y_key)  # rows come sorted by the sweep's objective: the trial it chose
    pick = max if y_key == FINETUNE_KEY else min

    def xv(r):
        return r[x_key] if numeric else cats.index(str(r[x_key]))

    for state, marker in (("complete", "o"), ("pruned", "x")):
        sel = [r for r in pts if r["state"] == state]
        if sel:
            ax.errorbar([xv(r) for r in sel], [r[y_key] for r in sel],
                        yerr=[r.get(f"{y_key}_std", 0.0) for r in sel], fmt=marker, alpha=0.75,
                        capsize=2, label=state)
    # The best trial at each value: the envelope a user would pick from.
    by_x: dict[Any, float] = {}
    for r in pts:
        by_x[xv(r)] = pick(by_x.get(xv(r), r[y_key]), r[y_key])
    if envelope and len(by_x) > 1:
        xs = sorted(by_x)
        ax.plot(xs, [by_x[x] for x in xs], "-", color="gray", alpha=0.6, label="best at this value")
    if best is not None and best in pts:
        ax.plot([xv(best)], [best[y_key]], "*", ms=16, color="crimson", label=f"best (trial {best['trial']})")
    if log_x and numeric:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    if not numeric:
        ax.set_xticks(range(len(cats)), cats)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no finished trial yet: an empty legend only warns
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def make_plots(spec, rows, out: Path) -> list[Path]:
    paths = [out / "val_curves.png", out / "val_vs_params.png"]
    plot_curves(rows, paths[0])
    plot_against(rows, "params_M", paths[1], True, "parameters (M)", envelope=False)
    for p in spec.params:
        path = out / f"val_vs_{p.name}.png"
        plot_against(rows, p.name, path, p.log_axis, p.name + (" (log)" if p.log_axis else ""))
        paths.append(path)
    if spec.finetune is not None:
        ylabel = f"fine-tuned dev {spec.finetune['metric']} ({spec.finetune['task']})"
        for key, label, log_x in (("params_M", "parameters (M)", True), ("best_val_loss", "best val loss", False),
                                  *((p.name, p.name, p.log_axis) for p in spec.params)):
            path = out / f"finetune_vs_{key}.png"
            # The envelope (best at each value) reads only over a swept setting's few values.
            plot_against(rows, key, path, log_x, label, envelope=key not in ("params_M", "best_val_loss"),
                         y_key=FINETUNE_KEY, ylabel=ylabel)
            paths.append(path)
    return paths


# ----------------------------------------------------------------------------- the report


def best_sample(sweep_dir: Path, row: dict[str, Any], max_new_tokens: int = 300) -> str:
    from slmkit.api import load

    lm = load(sweep_dir / row["run_dir"], device="cpu", dtype="float32")
    return lm.generate("", max_new_tokens=max_new_tokens, temperature=0.8, top_k=200, seed=1234)[0]


def write_report(sweep_dir: str | Path, sample_tokens: int = 300) -> Path:
    """Write report.md, results.csv, plots/ and sample.txt into the sweep directory."""
    from slmkit.fileio import atomic_write_text

    sweep_dir = Path(sweep_dir)
    spec, rows = collect_rows(sweep_dir)
    if not rows:
        raise UserError(f"{sweep_dir}: no trial has started yet")
    plots = make_plots(spec, rows, sweep_dir / PLOTS_DIR)
    atomic_write_text(sweep_dir / RESULTS_CSV, csv_text(spec, rows))
    best = best_row(rows, objective_key(spec))
    sample = ""
    if best is not None and sample_tokens > 0:
        try:
            sample = best_sample(sweep_dir, best, sample_tokens)
            atomic_write_text(sweep_dir / SAMPLE_TXT, sample + "\n")
        except UserError as exc:
            sample = f"(no sample: {exc})"
    base = spec.base_config()
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed", "running")}
    budget = (f"{spec.trial_seconds:g} s of training per trial (max_iters, warmup and evaluations sized to fit)"
              if spec.trial_seconds else f"{base.train.epochs:g} epochs per trial" if base.train.epochs > 0
              else f"{base.train.max_iters} steps per trial")
    lines = [
        f"# Sweep {sweep_dir.name}",
        "",
        f"- search: {spec.mode}, {spec.n_trials} trials; " + "; ".join(p.describe() for p in spec.params),
        f"- base: {base.preset or 'defaults'} ({base.model.n_layer} layers, {base.model.n_head} heads, "
        f"{base.model.n_embd} wide, block {base.model.block_size}, batch {base.train.batch_size}), "
        f"data {base.data.dataset} ({base.data.tokenizer})",
        f"- budget: {budget}; seeds per trial: {spec.seeds}; pruning: {'median' if spec.prune else 'off'}",
        "- ranked by: " + (describe(spec.finetune) if spec.finetune is not None else "best val loss, lower is better"),
        "- trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
    ]
    if spec.skipped:
        lines.append(f"- skipped invalid cells: {len(spec.skipped)}")
    if best is not None:
        setting = ", ".join(f"{p.name}={best[p.name]}" for p in spec.params)
        score = (f"fine-tuned dev {spec.finetune['metric']} {best[FINETUNE_KEY]:.4f}, "
                 if spec.finetune is not None else "")
        lines += ["", f"**Best: trial {best['trial']}** ({setting}): {score}best val loss {best['best_val_loss']:.4f}, "
                      f"{best['params_M']:.3f}M parameters, {best['tokens_per_s']:,.0f} tokens/s, "
                      f"run directory `{best['run_dir']}`."]
    lines += ["", markdown_table(spec, rows), ""]
    for p in plots:
        lines.append(f"![{p.stem}]({PLOTS_DIR}/{p.name})")
    if sample:
        lines += ["", f"## Sample from the best trial ({best['run_dir']})", "", "```", sample.strip("\n"), "```"]
    path = sweep_dir / REPORT_MD
    # The report is for showing around: no storage password in it, whatever a trial's error said.
    atomic_write_text(path, redact_text("\n".join(lines) + "\n", spec.storage))
    return path
