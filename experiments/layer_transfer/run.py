"""GPT-1's Fig. 2 (left), small: how many pre-trained layers does fine-tuning need?

Fine-tunes one pre-trained run with `--transfer-layers N` for N = 0 (embeddings only) .. n_layer (all of
it): the embeddings and the first N blocks are kept, the other blocks start from a fresh initialisation.
A random-initialisation run (nothing transferred) is the reference below N = 0. Two tasks, several
seeds; writes results.json, results.md and transfer.png into --out (and the runs under --runs).

    python experiments/layer_transfer/run.py --pretrained runs/zeroshot_curves     # the pre-trained model of
                                                                                  # experiments/zeroshot_curves
The fine-tuning recipe is the gpt1_ablation experiment's cpu-long one: the paper's (3 epochs, lambda 0.5,
warmup 0.2%, linear decay, classifier dropout 0.1) with lr 1e-3, batch 16, sequences cut to 96 tokens and
seeded training subsets (sst2 4,000 of 67,349; stsb 2,000 of 5,749). Dev sets are complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
MAX_TRAIN = {"sst2": 4000, "stsb": 2000, "storycloze": 1000, "rte": 1000, "mrpc": 1000, "cola": 4000, "sick": 2000}
RECIPE = dict(learning_rate=1e-3, batch_size=16, epochs=3, max_len=96)


def task_file(task: str, split: str) -> Path:
    ext = "csv" if task == "storycloze" else "tsv"
    return SHARED / "tasks" / task / f"{split}.{ext}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", required=True, help="a pre-trained run folder")
    ap.add_argument("--tasks", default="sst2,stsb")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default=str(Path(__file__).parent), help="where results.* and transfer.png go")
    ap.add_argument("--runs", default="runs/layer_transfer", help="where the fine-tuned runs go")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"needs the shared data folder at {SHARED}")
    import torch

    from slmkit.checkpoint import find_checkpoint, load_checkpoint
    from slmkit.finetune import FinetuneConfig, finetune, get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    n_layer = load_checkpoint(find_checkpoint(args.pretrained)).config.model.n_layer
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    out, runs = Path(args.out), Path(args.runs)
    results: dict = {"pretrained": str(args.pretrained), "n_layer": n_layer, "recipe": RECIPE, "runs": {}}
    start = time.perf_counter()
    for task in tasks:
        spec = get_task(task)
        for seed in seeds:
            for n in ["random", *range(n_layer + 1)]:
                opts = dict(random_init=True) if n == "random" else dict(transfer_layers=n)
                cfg = FinetuneConfig(**RECIPE, **opts, max_train=MAX_TRAIN.get(task, 0), seed=seed, device=args.device)
                r = finetune(args.pretrained, spec, task_file(task, "train"), task_file(task, "dev"),
                             runs / f"{task}-{n}-s{seed}", cfg, overwrite=True, progress=False)
                results["runs"][f"{task}-{n}-s{seed}"] = {"task": task, "transfer": n, "seed": seed, "dev": r.best_dev,
                                                          "seconds": round(r.elapsed, 1)}
                print(f"{task:<6} seed {seed} transfer {n!s:<6} {spec.primary_metric} "
                      f"{r.best_dev[spec.primary_metric]:.4f}  [{r.elapsed:.0f}s]", flush=True)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown_table(results, tasks, seeds, n_layer)
    (out / "results.md").write_text(table + "\n")
    plot(results, tasks, seeds, n_layer, out / "transfer.png")
    print(table)
    print(f"total {results['total_seconds'] / 60:.1f} min -> {out}")


def scores(results: dict, task: str, n, seeds: list[int]) -> list[float]:
    from slmkit.finetune import get_task

    metric = get_task(task).primary_metric
    return [100 * results["runs"][f"{task}-{n}-s{s}"]["dev"][metric] for s in seeds]


def markdown_table(results: dict, tasks: list[str], seeds: list[int], n_layer: int) -> str:
    from slmkit.finetune import get_task

    cols = ["random init", *(f"N = {n}" for n in range(n_layer + 1))]
    lines = ["| task (dev metric x100) | " + " | ".join(cols) + " |", "|---" + "|---:" * len(cols) + "|"]
    for task in tasks:
        cells = []
        for n in ["random", *range(n_layer + 1)]:
            v = scores(results, task, n, seeds)
            cells.append(f"{sum(v) / len(v):.1f} ({' / '.join(f'{x:.1f}' for x in v)})")
        lines.append(f"| {task} ({get_task(task).primary_metric}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, tasks: list[str], seeds: list[int], n_layer: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slmkit.finetune import get_task

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    xs = list(range(n_layer + 1))
    for ax, task in zip(axes[0], tasks, strict=True):
        per_seed = [scores(results, task, n, seeds) for n in xs]
        ax.plot(xs, [sum(v) / len(v) for v in per_seed], marker="o", linewidth=2, label=f"mean of {len(seeds)} seeds")
        for i, s in enumerate(seeds):
            ax.plot(xs, [v[i] for v in per_seed], alpha=0.35, marker=".", label=f"seed {s}")
        rnd = scores(results, task, "random", seeds)
        ax.axhline(sum(rnd) / len(rnd), color="gray", linestyle="--", label="random init (nothing transferred)")
        ax.set_xticks(xs)
        ax.set_xlabel("pre-trained layers transferred (0 = embeddings only)")
        ax.set_ylabel(f"dev {get_task(task).primary_metric} (x100)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("layer transfer (GPT-1 Fig. 2 left)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
