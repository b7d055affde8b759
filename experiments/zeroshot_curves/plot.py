"""curves.png, results.md and results.json of the zero-shot-curves experiment, from a run's metrics.jsonl.

    python experiments/zeroshot_curves/plot.py RUN_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TASKS = ("sst2", "cola", "storycloze", "rte")
METRIC = {"sst2": "acc", "cola": "MCC", "storycloze": "acc", "rte": "acc (rule not from the paper)"}


def main(run: Path, out: Path) -> None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if "val_loss" in r and "final_val_loss" not in r]
    tasks = [t for t in TASKS if f"zeroshot/{t}" in evals[-1]]
    steps = [r["step"] for r in evals]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    for t in tasks:
        left.plot(steps, [r[f"zeroshot/{t}/normalized"] for r in evals], marker="o", label=t)
    mean = [float(np.mean([r[f"zeroshot/{t}/normalized"] for t in tasks])) for r in evals]
    left.plot(steps, mean, color="black", linewidth=2, label="mean")
    left.axhline(0, color="gray", linestyle="--", linewidth=1)
    left.set_xlabel("pre-training step")
    left.set_ylabel("zero-shot score, normalised\n(0 = random guessing, 1 = GPT-1 fine-tuned)")
    left.set_title("zero-shot behaviours during pre-training (GPT-1 Fig. 2 right)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.plot(steps, [r["val_loss"] for r in evals], marker="o", color="tab:orange", label="val loss")
    right.plot(steps, [r["train_eval_loss"] for r in evals], marker="o", color="tab:blue", label="train loss")
    right.set_xlabel("pre-training step")
    right.set_ylabel("cross-entropy (nats/token)")
    right.set_title("language-model loss")
    right.grid(alpha=0.3)
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)

    head = "| step | val loss | " + " | ".join(f"{t} {METRIC[t]}" for t in tasks) + " | mean normalised |"
    lines = [head, "|---:" * (len(tasks) + 3) + "|"]
    for r, m in zip(evals, mean, strict=True):
        cells = [f"{r[f'zeroshot/{t}']:.3f} ({r[f'zeroshot/{t}/normalized']:+.2f})" for t in tasks]
        lines.append(f"| {r['step']:,} | {r['val_loss']:.3f} | " + " | ".join(cells) + f" | {m:+.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(evals, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    main(Path(sys.argv[1]), Path(sys.argv[2]))
