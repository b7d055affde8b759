"""What the labels alone, and the frozen pre-trained features, are worth on SST-2.

Two references for the fine-tuning study in this folder, on the same seeded label subsets:

- **bag of words**: logistic regression on which words a sentence holds (no pre-training, no
  Transformer), the classic baseline for sentiment;
- **linear probes**: logistic regression on a model's frozen last-layer hidden states, at the last
  token (what GPT-1's head reads) and averaged over the tokens, for a pre-trained run and for the
  same architecture with random weights.

Each logistic regression chooses its L2 strength by 4-fold cross-validation on the training labels
(never on dev), then is scored on SST-2 dev. Writes results.json and results.md into --out.

    python experiments/transfer/baselines.py --pretrained runs/transfer/cpu/pretrained
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from run import interval, task_file  # noqa: E402  (the study's task files and intervals)

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
FOLDS = 4


def read_sst2(split: str) -> list[tuple[str, int]]:
    from slmkit.finetune import get_task, read_examples

    examples = read_examples(get_task("sst2"), task_file("sst2", split)).examples
    return [(ex.segments[0], int(ex.label)) for ex in examples]


def label_subset(rows: list, budget: int, seed: int) -> list:
    """The labelled examples a fine-tuning run with --max-train `budget` --seed `seed` trains on."""
    from slmkit.finetune.loop import label_subset as indices

    return [rows[i] for i in indices(len(rows), budget, seed)]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Weights (bias last) of an L2-regularised logistic regression, by full-batch L-BFGS."""
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + l2 * (w[:-1] ** 2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def accuracy(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = torch.cat([x, torch.ones(len(x), 1)], dim=1) @ w
    return ((logits > 0).float() == y).float().mean().item()


def choose_l2(x: torch.Tensor, y: torch.Tensor) -> float:
    """The L2 strength with the best mean accuracy over FOLDS folds of the training labels."""
    folds = torch.arange(len(x)) % FOLDS
    def cv(l2: float) -> float:
        return sum(accuracy(fit_logistic(x[folds != k], y[folds != k], l2), x[folds == k], y[folds == k])
                   for k in range(FOLDS)) / FOLDS
    return max(L2_GRID, key=cv)


def probe(train_x: torch.Tensor, train_y: torch.Tensor, dev_x: torch.Tensor, dev_y: torch.Tensor) -> float:
    """Dev accuracy of a logistic regression on standardised features, its L2 chosen on train."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, dev_x = (train_x - mean) / std, (dev_x - mean) / std
    return accuracy(fit_logistic(train_x, train_y, choose_l2(train_x, train_y)), dev_x, dev_y)


def bag_of_words(train: list, dev: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary word-presence features over the training subset's words (PTB tokens: split on spaces)."""
    vocab = {w: i for i, w in enumerate(sorted({w for s, _ in train for w in s.split()}))}

    def encode(rows: list) -> torch.Tensor:
        x = torch.zeros(len(rows), len(vocab))
        for r, (s, _) in enumerate(rows):
            for w in s.split():
                if w in vocab:
                    x[r, vocab[w]] = 1.0
        return x

    return encode(train), encode(dev)


@torch.no_grad()
def hidden_features(model, tokenizer, rows: list, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(last token's, mean over tokens') final hidden state of each sentence, one sentence at a time."""
    last, mean = [], []
    for sentence, _ in rows:
        ids = tokenizer.encode(sentence)[:max_len] or [0]
        h = model.hidden_states(torch.tensor([ids]))[0].float()
        last.append(h[-1])
        mean.append(h.mean(0))
    return torch.stack(last), torch.stack(mean)


def labels(rows: list) -> torch.Tensor:
    return torch.tensor([float(y) for _, y in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", required=True, help="the pre-trained run whose frozen features are probed")
    ap.add_argument("--budgets", default="1000", help="comma-separated label budgets (default 1000)")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated label-subset seeds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "baselines"))
    args = ap.parse_args()
    from slmkit.checkpoint import load_model
    from slmkit.model import GPT

    torch.manual_seed(0)
    start = time.perf_counter()
    train_rows, dev_rows = read_sst2("train"), read_sst2("dev")
    dev_y = labels(dev_rows)
    model, tokenizer, ckpt = load_model(args.pretrained)
    torch.manual_seed(1337)  # the random-weights model as `slm train --seed 1337` would start it
    models = {"pretrained": model, "random": GPT(ckpt.config.model).eval()}
    max_len = ckpt.config.model.block_size
    dev_feats = {name: hidden_features(m, tokenizer, dev_rows, max_len) for name, m in models.items()}
    scores: dict[str, list[float]] = {}
    for budget in [int(b) for b in args.budgets.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            train = label_subset(train_rows, budget, seed)
            y = labels(train)
            x, dx = bag_of_words(train, dev_rows)
            scores.setdefault(f"{budget}/bag of words", []).append(probe(x, y, dx, dev_y))
            for name, m in models.items():
                last, mean = hidden_features(m, tokenizer, train, max_len)
                scores.setdefault(f"{budget}/{name}, last token", []).append(probe(last, y, dev_feats[name][0], dev_y))
                scores.setdefault(f"{budget}/{name}, mean", []).append(probe(mean, y, dev_feats[name][1], dev_y))
            print(f"{budget} labels, seed {seed}: " + ", ".join(f"{k.split('/')[1]} {v[-1]:.3f}"
                                                                 for k, v in scores.items()
                                                                 if k.startswith(f"{budget}/")), file=sys.stderr)
    rows = ["| labels | features | SST-2 dev accuracy × 100 |", "|---:|---|---:|"]
    for key, values in scores.items():
        budget, what = key.split("/")
        mean, half = interval(values)
        rows.append(f"| {budget} | {what} | {100 * mean:.1f} ± {100 * half:.1f} (n={len(values)}) |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"pretrained": args.pretrained, "scores": scores,
                                                  "seconds": round(time.perf_counter() - start, 1)}, indent=1) + "\n")
    (out / "results.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
