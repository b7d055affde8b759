"""GPT-1's central claim, small: generative pre-training pays off in fine-tuning.

Pre-trains one GPT on the shared Gutenberg corpus within a fixed CPU budget, then fine-tunes it on
GLUE-style tasks at several label budgets, against the same architecture from random weights and
against the pre-trained model without the auxiliary LM objective (lambda = 0), with several seeds
per cell. Reports the mean and a 95% t-interval per cell, plots score against labels (log axis,
one panel per task), and writes results.json, results.md and curves.png into --out.

    python experiments/transfer/run.py --quick        # ~10 min on 2 CPU cores: SST-2, 250 and 1k labels
    python experiments/transfer/run.py                # the CPU study: 30 min pre-training, then the grid
    python experiments/transfer/run.py --scale cpu-searched  # the recipe `slm sweep --finetune-task` chose
    python experiments/transfer/run.py --scale gpu    # a larger model and every label, on a GPU

Every stage is resumable: the pre-trained run is reused when it finished, and fine-tuning cells
already in results.json are skipped (--fresh starts over). The fine-tuning learning rate is chosen
per initialisation on SST-2 dev at 1k labels (seed 0) from a short list; the dev sets are the only
held-out data the shared tasks have, so the scores reported are dev scores of the last epoch (no
early stopping on dev).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
GUTENBERG = SHARED / "corpus" / "gutenberg"
INITS = ("pretrained", "random", "no_aux")  # no_aux: pre-trained, fine-tuned with lambda = 0
# dropout: the transformer's dropout while fine-tuning; -1 keeps the pre-trained model's.
# pool: what the classifier reads (GPT-1's extract token, or the mean over the tokens).
DEFAULT_RECIPE = {"min_steps": 300, "max_epochs": 20, "lm_coef": 0.5, "dropout": -1.0, "pool": "extract"}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass
class Scale:
    """One size of the study: how to pre-train, and the grid of fine-tuning cells."""

    pretrain: list[str]  # `slm train` flags besides data, tokenizer and output
    vocab_size: int
    tasks: list[str]
    budgets: list[int]  # labelled training examples; 0 = all of them
    seeds: list[int]
    lrs: list[float]  # fine-tuning learning rates tried on SST-2 dev at 1k labels
    device: str = "cpu"
    batch_size: int = 16
    # Small budgets get more epochs, up to max_epochs, to reach min_steps updates; lm_coef is lambda
    # of the auxiliary LM objective (the no_aux cells use 0). Defaults: DEFAULT_RECIPE.
    min_steps: int = DEFAULT_RECIPE["min_steps"]
    max_epochs: int = DEFAULT_RECIPE["max_epochs"]
    lm_coef: float = DEFAULT_RECIPE["lm_coef"]
    dropout: float = DEFAULT_RECIPE["dropout"]
    pool: str = DEFAULT_RECIPE["pool"]
    extra: dict = field(default_factory=dict)


SCALES = {
    # 6 x 256, BPE 8,192, 6.87M parameters, 10.2M tokens: ~30 minutes on 2 cores of an AMD EPYC.
    "cpu": Scale(pretrain=["--n-layer", "6", "--n-head", "8", "--n-embd", "256", "--block-size", "128",
                           "--dropout", "0.1", "--ln", "pre", "--batch-size", "32", "--max-iters", "2500",
                           "--lr", "1e-3", "--warmup-iters", "150", "--weight-decay", "0.1",
                           "--eval-interval", "500", "--eval-iters", "20"],
                 vocab_size=8192, tasks=["sst2", "cola", "stsb", "storycloze"], budgets=[250, 1000, 4000, 0],
                 seeds=[0, 1, 2], lrs=[1e-4, 3e-4, 1e-3]),
    # The recipe `slm sweep --finetune-task sst2` chose (experiments/transfer/recipe_search): no dropout,
    # which also lets the bf16 attention kernel run (7,960 against 4,742 tokens/s at 6 x 256), and 6 x 384,
    # 13.8M parameters; 2,300 steps = 9.4M tokens fill ~30 minutes on 2 cores of an AMD EPYC.
    "cpu-searched": Scale(pretrain=["--n-layer", "6", "--n-head", "8", "--n-embd", "384", "--block-size", "128",
                                    "--dropout", "0.0", "--ln", "pre", "--batch-size", "32", "--max-iters", "2300",
                                    "--lr", "1e-3", "--warmup-iters", "150", "--weight-decay", "0.1",
                                    "--eval-interval", "500", "--eval-iters", "20"],
                          vocab_size=8192, tasks=["sst2"], budgets=[1000], seeds=[0, 1, 2, 3, 4],
                          lrs=[1e-4, 3e-4, 1e-3]),
    # 4 x 128, BPE 2,048, 1.07M parameters, 2.5M tokens: ~3 minutes.
    "quick": Scale(pretrain=["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "96",
                             "--dropout", "0.1", "--ln", "pre", "--batch-size", "32", "--max-iters", "800",
                             "--lr", "3e-3", "--warmup-iters", "80", "--weight-decay", "0.1",
                             "--eval-interval", "400", "--eval-iters", "10"],
                   vocab_size=2048, tasks=["sst2"], budgets=[250, 1000], seeds=[0, 1, 2], lrs=[3e-4, 1e-3]),
    # 12 x 512, BPE 16,384, ~51M parameters, 1 epoch of 2 x 256 x 24 tokens per step on a GPU.
    "gpu": Scale(pretrain=["--n-layer", "12", "--n-head", "8", "--n-embd", "512", "--block-size", "256",
                           "--dropout", "0.1", "--ln", "pre", "--batch-size", "64", "--max-iters", "6000",
                           "--lr", "6e-4", "--warmup-iters", "300", "--weight-decay", "0.1",
                           "--eval-interval", "1000", "--eval-iters", "40", "--compile", "on"],
                 vocab_size=16384, tasks=["sst2", "cola", "stsb", "storycloze", "rte", "mrpc"],
                 budgets=[250, 1000, 4000, 0], seeds=[0, 1, 2], lrs=[3e-5, 1e-4, 3e-4], device="cuda",
                 batch_size=32),
}


def task_file(task: str, split: str) -> Path:
    return SHARED / "tasks" / task / f"{split}.{'csv' if task == 'storycloze' else 'tsv'}"


def pretrain(scale: Scale, run: Path) -> None:
    """Run `slm train` unless `run` already holds a finished run of these settings."""
    settings = run / "study_settings.json"
    wanted = {"flags": scale.pretrain, "vocab_size": scale.vocab_size, "device": scale.device}
    if settings.exists() and json.loads(settings.read_text()) == wanted:
        print(f"pre-trained model: reusing {run}", file=sys.stderr)
        return
    cmd = ["slm", "train", "--out-dir", str(run), "--overwrite", "--dataset", str(GUTENBERG / "train.txt"),
           "--val-data", str(GUTENBERG / "valid.txt"), "--tokenizer", "bpe", "--bpe-vocab-size",
           str(scale.vocab_size), "--device", scale.device, "--log-interval", "100", *scale.pretrain]
    print("pre-training: " + " ".join(cmd), file=sys.stderr)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    settings.write_text(json.dumps(wanted) + "\n")
    (run / "study_pretrain_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")


def epochs_for(scale: Scale, examples: int) -> int:
    """GPT-1's 3 epochs, or more for small label budgets so that the head gets min_steps updates."""
    return min(scale.max_epochs, max(3, math.ceil(scale.min_steps * scale.batch_size / examples)))


def train_size(task: str) -> int:
    from slmkit.finetune import get_task, read_examples

    return len(read_examples(get_task(task), task_file(task, "train")).examples)


def last_epoch_dev(result, spec) -> float:
    """A fine-tune's dev score on the task's primary metric after its last epoch (the study reports
    that, not the best epoch: no early stopping on dev)."""
    key = f"dev_{spec.primary_metric}"
    return [h for h in result.history if key in h][-1][key]


def finetune_cell(pretrained: Path, runs: Path, scale: Scale, task: str, budget: int, init: str, seed: int,
                  lr: float) -> dict:
    """One fine-tuning run; its last epoch's dev scores and what it cost."""
    from slmkit.finetune import FinetuneConfig, finetune, get_task

    spec = get_task(task)
    examples = budget or train_size(task)
    cfg = FinetuneConfig(learning_rate=lr, batch_size=scale.batch_size, epochs=epochs_for(scale, examples),
                         warmup_frac=0.1, lm_coef=0.0 if init == "no_aux" else scale.lm_coef, clf_dropout=0.1,
                         max_train=budget, random_init=init == "random", seed=seed, device=scale.device,
                         max_len=128, dropout=scale.dropout, pool=scale.pool)
    name = f"{task}-{budget or 'all'}-{init}-lr{lr:g}-s{seed}"
    r = finetune(pretrained, spec, task_file(task, "train"), task_file(task, "dev"), runs / name, cfg,
                 overwrite=True, progress=False)
    return {"task": task, "budget": budget, "init": init, "seed": seed, "lr": lr, "epochs": cfg.epochs,
            "metric": spec.primary_metric, "dev": last_epoch_dev(r, spec),
            "best_dev": r.best_dev[spec.primary_metric], "seconds": round(r.elapsed, 1)}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    t = T_975.get(len(values) - 1, 1.96)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


class Study:
    def __init__(self, scale: Scale, out: Path, runs: Path, fresh: bool):
        self.scale, self.out, self.runs = scale, out, runs
        self.path = out / "results.json"
        self.results = {"cells": {}, "lr": {}} if fresh or not self.path.exists() else json.loads(self.path.read_text())

    def claim_recipe(self, scale: Scale) -> None:
        """Record the fine-tuning recipe; refuse a results.json that holds another recipe's cells
        (cells are keyed by task, budget, initialisation, seed and lr only, so they would mix)."""
        recipe = {name: getattr(scale, name) for name in DEFAULT_RECIPE}
        # Files from before a key hold its default.
        held = {**DEFAULT_RECIPE, **self.results.get("recipe", {})}
        if self.results["cells"] and held != recipe:
            sys.exit(f"error: {self.path} holds cells of the fine-tuning recipe {held}, not {recipe}; give another "
                     "--out (or --fresh)")
        self.results["recipe"] = recipe

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.results, indent=1) + "\n")

    def run(self, pretrained: Path, **cell) -> dict:
        """A cell's result, from results.json when it ran before (the lr search's seed-0 runs are
        also the grid's cells at its learning rate)."""
        key = "{task}/{budget}/{init}/s{seed}/lr{lr:g}".format(**cell)
        if key not in self.results["cells"]:
            row = finetune_cell(pretrained, self.runs, self.scale, **cell)
            self.results["cells"][key] = row
            self.save()
            print(f"{key:<40} {row['metric']} {row['dev']:.4f}  ({row['epochs']} epochs, {row['seconds']:.0f} s)",
                  flush=True)
        return self.results["cells"][key]

    def choose_lrs(self, pretrained: Path) -> None:
        """Each initialisation's fine-tuning learning rate: the best SST-2 dev score at 1k labels, seed 0."""
        for init in INITS:
            if init in self.results["lr"]:
                continue
            scores = {lr: self.run(pretrained, task="sst2", budget=1000, init=init, seed=0, lr=lr)["dev"]
                      for lr in self.scale.lrs}
            self.results["lr"][init] = max(scores, key=scores.get)
            self.save()

    def grid(self, pretrained: Path, inits: tuple[str, ...] = INITS) -> None:
        for task in self.scale.tasks:
            for budget in self.scale.budgets:
                for init in inits:
                    for seed in self.scale.seeds:
                        self.run(pretrained, task=task, budget=budget, init=init, seed=seed,
                                 lr=self.results["lr"][init])

    def summary(self) -> dict:
        """{task: {budget: {init: (mean, half_width, n)}}} over every cell run so far at each
        initialisation's chosen learning rate (the search's other runs are left out)."""
        table: dict = {}
        for row in self.results["cells"].values():
            if row["lr"] != self.results["lr"][row["init"]]:
                continue
            table.setdefault(row["task"], {}).setdefault(row["budget"], {}).setdefault(row["init"], []).append(
                row["dev"])
        return {task: {budget: {init: (*interval(v), len(v)) for init, v in inits.items()}
                       for budget, inits in budgets.items()} for task, budgets in table.items()}


def show(cells: dict, init: str) -> str:
    if init not in cells:
        return "–"
    mean, half, n = cells[init]
    return f"{100 * mean:.1f} ± {100 * half:.1f} (n={n})"


def markdown(summary: dict) -> str:
    lines = ["| task | labels | pre-trained | random init | pre-trained, λ = 0 | gain over random |",
             "|---|---:|---:|---:|---:|---:|"]
    for task, budgets in summary.items():
        for budget in sorted(budgets, key=lambda b: b or math.inf):
            cells = budgets[budget]
            gain = ""
            if "pretrained" in cells and "random" in cells:
                gain = f"{100 * (cells['pretrained'][0] - cells['random'][0]):+.1f}"
            lines.append(f"| {task} | {budget or 'all'} | {show(cells, 'pretrained')} | {show(cells, 'random')} "
                         f"| {show(cells, 'no_aux')} "
                         f"| {gain} |")
    return "\n".join(lines)


def plot(summary: dict, sizes: dict[str, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    labels = {"pretrained": "pre-trained", "random": "random init", "no_aux": "pre-trained, λ = 0"}
    for ax, task in zip(axes[0], tasks, strict=True):
        budgets = summary[task]
        for init in INITS:
            xs = sorted((b or sizes[task], b) for b in budgets if init in budgets[b])
            if not xs:
                continue
            mean = [100 * budgets[b][init][0] for _, b in xs]
            half = [100 * budgets[b][init][1] for _, b in xs]
            x = [n for n, _ in xs]
            # Error bars too: a task with a single budget has no band to fill.
            ax.errorbar(x, mean, yerr=half, marker="o", capsize=3, label=labels[init])
            low = [m - h for m, h in zip(mean, half, strict=True)]
            high = [m + h for m, h in zip(mean, half, strict=True)]
            ax.fill_between(x, low, high, alpha=0.2)
        ax.set_xscale("log")
        ticks = sorted({b or sizes[task] for b in budgets})
        ax.set_xticks(ticks, [f"{n:,}" for n in ticks])
        ax.minorticks_off()
        ax.set_xlabel("labelled training examples")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("dev score × 100 (mean, 95% interval)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=SCALES, default="cpu")
    ap.add_argument("--quick", action="store_true", help="the same as --scale quick (~10 minutes)")
    ap.add_argument("--pretrained", help="fine-tune this pre-trained run instead of pre-training one")
    ap.add_argument("--tasks", help="comma-separated; default: the scale's")
    ap.add_argument("--budgets", help="comma-separated label budgets, 0 = all; default: the scale's")
    ap.add_argument("--seeds", help="comma-separated; default: the scale's")
    ap.add_argument("--inits", default=",".join(INITS), help="comma-separated initialisations to fine-tune "
                    "in the grid (the learning-rate search always covers all three)")
    ap.add_argument("--lrs", help="comma-separated fine-tuning learning rates to choose from; default: the scale's")
    ap.add_argument("--min-steps", type=int, help="fine-tuning updates every run makes at least (more epochs for "
                    "small budgets, up to --max-epochs); default: the scale's (300)")
    ap.add_argument("--max-epochs", type=int, help="the most epochs a small budget gets; default: the scale's (20)")
    ap.add_argument("--lm-coef", type=float, help="lambda of the auxiliary LM objective; default: the scale's (0.5)")
    ap.add_argument("--dropout", type=float, help="the transformer's dropout while fine-tuning; default: the "
                    "pre-trained model's")
    ap.add_argument("--pool", choices=("extract", "mean"), help="what the classifier reads of the last layer: "
                    "extract (GPT-1, the default) or mean (every token's state averaged)")
    ap.add_argument("--out", help="where results.* and curves.png go (default: this folder, or "
                                  "runs/transfer/quick for --quick)")
    ap.add_argument("--runs", default="runs/transfer", help="where the pre-trained and fine-tuned runs go")
    ap.add_argument("--fresh", action="store_true", help="ignore the cells already in results.json")
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"needs the shared data folder at {SHARED}")
    name = "quick" if args.quick else args.scale
    scale = SCALES[name]
    if args.tasks:
        scale.tasks = args.tasks.split(",")
    if args.budgets:
        scale.budgets = [int(b) for b in args.budgets.split(",")]
    if args.seeds:
        scale.seeds = [int(s) for s in args.seeds.split(",")]
    if args.lrs:
        scale.lrs = [float(x) for x in args.lrs.split(",")]
    for setting in DEFAULT_RECIPE:
        if getattr(args, setting) is not None:
            setattr(scale, setting, getattr(args, setting))
    runs = Path(args.runs) / name
    here = {"cpu": Path(__file__).parent, "cpu-searched": Path(__file__).parent / "searched"}
    out = Path(args.out) if args.out else here.get(name, runs)
    start = time.perf_counter()
    pretrained = Path(args.pretrained) if args.pretrained else runs / "pretrained"
    if not args.pretrained:
        pretrain(scale, pretrained)
    study = Study(scale, out, runs / "finetune", args.fresh)
    study.claim_recipe(scale)
    study.results.update(scale=name, pretrained=str(pretrained))
    study.choose_lrs(pretrained)
    study.grid(pretrained, tuple(args.inits.split(",")))
    summary = study.summary()
    study.results["summary"] = {t: {str(b): v for b, v in bs.items()} for t, bs in summary.items()}
    study.results["finetune_seconds"] = round(sum(c["seconds"] for c in study.results["cells"].values()), 1)
    study.save()
    table = markdown(summary)
    (out / "results.md").write_text(table + "\n")
    plot(summary, {t: train_size(t) for t in summary}, out / "curves.png")
    print(table)
    print(f"this invocation: {(time.perf_counter() - start) / 60:.1f} min -> {out}", file=sys.stderr)


if __name__ == "__main__":
    from slmkit.errors import UserError

    try:
        main()
    except UserError as e:  # a task file or setting slmkit refuses: its one-line reason
        sys.exit(f"error: {e}")
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: pre-training failed (exit {e.returncode}); its message is above")
