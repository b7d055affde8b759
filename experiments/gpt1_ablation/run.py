"""GPT-1's Table 5 ablation, reproduced small: does pre-training help, and does the auxiliary LM?

1. Pre-train a BPE GPT on the Gutenberg corpus (../shared/data/corpus/gutenberg).
2. Fine-tune it on sst2, rte, mrpc, stsb and storycloze three ways:
   (a) pre-trained + auxiliary LM (lambda 0.5), (b) pre-trained, lambda 0,
   (c) the same architecture and vocabulary from random initialisation (lambda 0.5).
3. Write results.json, results.md (the dev-metric table) and ablation.png into --out.

    python experiments/gpt1_ablation/run.py                 # CPU scale: ~25 min on 2 cores
    python experiments/gpt1_ablation/run.py --scale cpu-long  # ~4x the model, ~1 corpus epoch (quiet CPU)
    python experiments/gpt1_ablation/run.py --scale gpu     # bigger model, full train sets

The CPU scale subsamples the training sets (max_train per task below), caps sequences at 96
tokens and uses batch 16; everything else follows the paper's fine-tuning recipe except the
learning rate (1e-3 instead of 6.25e-5: the model is ~200x smaller and takes a few hundred steps).
The CPU model is pre-LN: at this size and step budget the post-LN (GPT-1) block sat on the unigram
plateau (loss 6.3 after 150 steps at lr 1e-3 or 3e-3) where pre-LN reached 5.7.
On CPU it runs torch on one thread (--threads): on a machine shared with other jobs, two OpenMP
threads spinning against other processes were measured 10x slower than one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
TASKS = ("sst2", "rte", "mrpc", "stsb", "storycloze")
VARIANTS = {
    "a": ("pre-trained + aux LM", dict(lm_coef=0.5, random_init=False)),
    "b": ("pre-trained, no aux LM", dict(lm_coef=0.0, random_init=False)),
    "c": ("random init (no pre-training)", dict(lm_coef=0.5, random_init=True)),
}

SCALES = {
    # ~0.54M parameters (0.2M of them the embedding): ~5 CPU minutes of pre-training (1.8M tokens)
    # and ~8 for the 15 fine-tuning runs, on one thread of a shared 2-core machine.
    "cpu": {
        "model": dict(n_layer=3, n_head=4, n_embd=96, block_size=96, dropout=0.1, ln="pre"),
        "data": dict(bpe_vocab_size=2048, val_fraction=0.02),
        "train": dict(batch_size=32, max_iters=600, learning_rate=3e-3, warmup_iters=50, eval_interval=600,
                      eval_iters=10, log_interval=100, weight_decay=0.01, sample_tokens=0),
        "finetune": dict(learning_rate=1e-3, batch_size=16, epochs=3, max_len=96),
        "max_train": {"sst2": 2000, "rte": 500, "mrpc": 500, "stsb": 1000, "storycloze": 500},
    },
    # A longer CPU run for a quiet 2-core machine (~25 min): 4x the model, ~1 epoch of the corpus
    # (7.7M tokens), twice the fine-tuning examples.
    "cpu-long": {
        "model": dict(n_layer=4, n_head=4, n_embd=128, block_size=96, dropout=0.1, ln="pre"),
        "data": dict(bpe_vocab_size=2048, val_fraction=0.02),
        "train": dict(batch_size=32, max_iters=2500, learning_rate=3e-3, warmup_iters=100, eval_interval=500,
                      eval_iters=10, log_interval=100, weight_decay=0.01, sample_tokens=0),
        "finetune": dict(learning_rate=1e-3, batch_size=16, epochs=3, max_len=96),
        "max_train": {"sst2": 4000, "rte": 1000, "mrpc": 1000, "stsb": 2000, "storycloze": 1000},
    },
    # ~10M parameters and the full training sets: for one GPU (minutes on an H100).
    "gpu": {
        "model": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.1, ln="pre"),
        "data": dict(bpe_vocab_size=8192, val_fraction=0.02),
        "train": dict(batch_size=64, max_iters=6000, learning_rate=1e-3, warmup_iters=200, eval_interval=1000,
                      eval_iters=20, log_interval=100, weight_decay=0.01, sample_tokens=0),
        "finetune": dict(learning_rate=1e-4, batch_size=32, epochs=3, max_len=256),
        "max_train": {t: 0 for t in TASKS},
    },
}


def task_file(task: str, split: str) -> Path:
    ext = "csv" if task == "storycloze" else "tsv"
    return SHARED / "tasks" / task / f"{split}.{ext}"


def pretrain(scale: dict, out: Path, device: str, progress: bool) -> tuple[Path, dict]:
    from slmkit.config import RunConfig, apply_overrides
    from slmkit.train import train

    cfg = RunConfig()
    apply_overrides(cfg, {k: scale[k] for k in ("model", "data", "train")}, source="ablation scale")
    cfg.data.dataset = str(SHARED / "corpus" / "gutenberg" / "train.txt")
    cfg.data.tokenizer = "bpe"
    cfg.train.device = device
    run_dir = out / "pretrain"
    t0, c0 = time.perf_counter(), time.process_time()
    r = train(cfg, run_dir, overwrite=True, progress=progress, final_eval=False)
    info = {"params": r.params, "steps": r.step, "val_loss": r.best_val_loss, "tokens_per_s": r.tokens_per_s,
            "tokens": r.step * cfg.train.batch_size * cfg.model.block_size,
            "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}
    return run_dir, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    ap.add_argument("--gpu", action="store_true", help="shorthand for --scale gpu --device cuda")
    ap.add_argument("--out", default="runs/gpt1_ablation", help="output folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--variants", default="abc")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-pretrain", action="store_true", help="skip step 1 when OUT/pretrain exists")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.gpu:
        args.scale, args.device = "gpu", "cuda" if args.device == "cpu" else args.device
    if not SHARED.is_dir():
        sys.exit(f"needs the shared data folder at {SHARED}")

    from slmkit.finetune import FinetuneConfig, finetune, get_task

    scale = SCALES[args.scale]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    if args.reuse_pretrain and (out / "pretrain" / "ckpt_best.safetensors").is_file():
        pt_dir = out / "pretrain"
        pt_info = json.loads((out / "results.json").read_text())["pretrain"]
    else:
        pt_dir, pt_info = pretrain(scale, out, args.device, not args.quiet)
    print(f"pre-trained: {json.dumps(pt_info)}", flush=True)

    results: dict = {"scale": args.scale, "pretrain": pt_info, "runs": {}}
    for task in args.tasks.split(","):
        spec = get_task(task)
        for v in args.variants:
            name, opts = VARIANTS[v]
            c0 = time.process_time()
            cfg = FinetuneConfig(**scale["finetune"], **opts, max_train=scale["max_train"].get(task, 0),
                                 seed=args.seed, device=args.device)
            r = finetune(pt_dir, spec, task_file(task, "train"), task_file(task, "dev"), out / f"{task}-{v}", cfg,
                         overwrite=True, progress=False)
            results["runs"][f"{task}-{v}"] = {
                "task": task, "variant": v, "dev": r.best_dev, "best_epoch": r.best_epoch,
                "train_examples": r.train_examples, "examples_per_s": round(r.examples_per_s, 1),
                "seconds": round(r.elapsed, 1), "cpu_seconds": round(time.process_time() - c0, 1),
            }
            print(f"{task:<11} ({v}) {name:<30} " + "  ".join(f"{k} {x:.4f}" for k, x in r.best_dev.items())
                  + f"   [{r.train_examples} ex, {r.elapsed:.0f}s]", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    results["total_cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown_table(results, args.tasks.split(","), args.variants)
    (out / "results.md").write_text(table + "\n")
    plot(results, args.tasks.split(","), args.variants, out / "ablation.png")
    print(table)
    print(f"total {results['total_seconds'] / 60:.1f} min wall, {results['total_cpu_seconds'] / 60:.1f} min CPU "
          f"-> {out}")


def markdown_table(results: dict, tasks: list[str], variants: str) -> str:
    from slmkit.finetune import get_task

    heads = []
    for t in tasks:
        ms = get_task(t).metrics
        heads.append(f"{t} ({'/'.join('F1' if m == 'f1' else m[:3] if m != 'accuracy' else 'acc' for m in ms)})")
    lines = ["| variant | " + " | ".join(heads) + " | avg |", "|---" * (len(tasks) + 2) + "|"]
    for v in variants:
        cells, prim = [], []
        for t in tasks:
            r = results["runs"].get(f"{t}-{v}")
            if r is None:
                cells.append("-")
                continue
            ms = get_task(t).metrics
            cells.append(" / ".join(f"{100 * r['dev'][m]:.1f}" for m in ms))
            prim.append(100 * r["dev"][ms[0]])
        avg = f"{sum(prim) / len(prim):.1f}" if prim else "-"
        lines.append(f"| ({v}) {VARIANTS[v][0]} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


def plot(results: dict, tasks: list[str], variants: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slmkit.finetune import get_task

    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        vals = [100 * results["runs"][f"{t}-{v}"]["dev"][get_task(t).primary_metric]
                if f"{t}-{v}" in results["runs"] else 0 for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], vals, width, label=f"({v}) {VARIANTS[v][0]}")
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(tasks))])
    ax.set_xticklabels([f"{t}\n{get_task(t).primary_metric}" for t in tasks])
    ax.set_ylabel("dev metric (x100)")
    ax.set_title(f"GPT-1 ablation, {results['scale']} scale")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
