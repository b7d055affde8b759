"""The fine-tuning recipe for small models, chosen on held-out training data, then measured on dev.

GPT-1's fine-tuning recipe (lr 6.25e-5, batch 32, 3 epochs, warmup 0.2%, classifier dropout 0.1,
lambda 0.5) was set for 117M parameters and tens of thousands of labels. This script searches it
again for a small pre-trained model at a small label budget, separately for the pre-trained model
and for the same architecture from random weights, so that the comparison between them is fair:

1. Held-out split: `--heldout` sentences of at least `--min-words` words are drawn (seeded) from
   the task's training file; the search fine-tunes on the rest and scores on them. SST-2's dev set
   is never looked at while choosing.
2. Coordinate search from the base recipe: one setting at a time (learning rate, epochs, lambda,
   classifier dropout, warmup), each value fine-tuned with every search seed; the best mean is
   kept before the next setting is searched.
3. The chosen recipe of each initialisation is fine-tuned on the real training file with the report
   seeds and scored on dev, as mean and 95% interval; so is the pre-trained recipe with the other side
   of lambda = 0 (lambda 0 when the search chose an auxiliary LM, GPT-1's 0.5 when it chose none).

    python experiments/transfer/recipe.py --pretrained runs/transfer/cpu/pretrained

Resumable: every run's score is kept in results.json and not run again (--fresh starts over).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from run import interval, last_epoch_dev, show, task_file  # noqa: E402  (the study's own helpers)

BASE = {  # the recipe experiments/transfer/run.py used: GPT-1's, with the small-model lr and epochs
    "pretrained": {"learning_rate": 3e-4, "epochs": 5, "lm_coef": 0.5, "clf_dropout": 0.1, "warmup_frac": 0.1},
    "random": {"learning_rate": 1e-4, "epochs": 5, "lm_coef": 0.5, "clf_dropout": 0.1, "warmup_frac": 0.1},
}
SPACE = {  # searched in this order, each from the best so far
    "learning_rate": [1e-4, 3e-4, 1e-3],
    "epochs": [5, 10, 20],
    "lm_coef": [0.0, 0.5, 1.0],
    "clf_dropout": [0.1, 0.3],
    "warmup_frac": [0.002, 0.1],
}
FIXED = {"batch_size": 16, "max_len": 128, "device": "cpu"}


def split_heldout(source: Path, out: Path, size: int, min_words: int, seed: int) -> tuple[Path, Path]:
    """(search-train file, held-out file) from a training TSV whose first column is the sentence:
    `size` lines of at least `min_words` words, drawn with `seed`, and every other line. Written
    once; a resume reads the same split."""
    train, heldout = out / f"search-train-{source.name}", out / f"heldout-{source.name}"
    if train.exists() and heldout.exists():
        return train, heldout
    header, *lines = source.read_text(encoding="utf-8").splitlines()
    long = [i for i, line in enumerate(lines) if len(line.split("\t")[0].split()) >= min_words]
    if len(long) < size:
        sys.exit(f"error: only {len(long)} lines of {source} have {min_words}+ words; ask for fewer")
    chosen = set(random.Random(seed).sample(long, size))
    out.mkdir(parents=True, exist_ok=True)
    heldout.write_text("\n".join([header] + [lines[i] for i in sorted(chosen)]) + "\n", encoding="utf-8")
    train.write_text("\n".join([header] + [x for i, x in enumerate(lines) if i not in chosen]) + "\n",
                     encoding="utf-8")
    return train, heldout


class Search:
    def __init__(self, pretrained: Path, task: str, budget: int, out: Path, runs: Path, fresh: bool):
        self.pretrained, self.task, self.budget, self.out, self.runs = pretrained, task, budget, out, runs
        self.path = out / "results.json"
        self.results = {"runs": {}} if fresh or not self.path.exists() else json.loads(self.path.read_text())

    def claim_setup(self, setup: dict) -> None:
        """Record what the runs are of; refuse a results.json whose runs came from another model, task,
        budget or held-out split (runs are keyed by recipe and seed only, so they would mix)."""
        held = self.results.get("setup")
        if self.results["runs"] and held != setup:
            sys.exit(f"error: {self.path} holds runs of {held}, not {setup}; give another --out (or --fresh)")
        self.results["setup"] = setup

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.results, indent=1) + "\n")

    def score(self, stage: str, init: str, recipe: dict, seed: int, train: Path, dev: Path) -> float:
        """The last epoch's score of one fine-tune (from results.json when it ran before)."""
        from slmkit.finetune import FinetuneConfig, finetune, get_task

        settings = ",".join(f"{k}={recipe[k]:g}" for k in sorted(recipe))
        key = f"{stage}/{init}/{settings}/s{seed}"
        if key not in self.results["runs"]:
            spec = get_task(self.task)
            cfg = FinetuneConfig(**recipe, **FIXED, max_train=self.budget, random_init=init == "random", seed=seed)
            r = finetune(self.pretrained, spec, train, dev, self.runs / f"{stage}-{len(self.results['runs']):03d}",
                         cfg, overwrite=True, progress=False)
            self.results["runs"][key] = {"stage": stage, "init": init, "recipe": recipe, "seed": seed,
                                         "score": last_epoch_dev(r, spec), "seconds": round(r.elapsed, 1)}
            self.save()
            print(f"{key:<90} {self.results['runs'][key]['score']:.4f} ({r.elapsed:.0f} s)", flush=True)
        return self.results["runs"][key]["score"]

    def choose(self, init: str, seeds: list[int], train: Path, heldout: Path) -> dict:
        """Coordinate search over SPACE from BASE[init]; every step's means go into results.json."""
        best = dict(BASE[init])
        steps = self.results.setdefault("steps", {}).setdefault(init, [])
        steps.clear()
        for name, values in SPACE.items():
            means = {}
            for value in values:
                recipe = {**best, name: value}
                means[value] = sum(self.score("search", init, recipe, s, train, heldout) for s in seeds) / len(seeds)
            best[name] = max(means, key=means.get)
            steps.append({"setting": name, "means": {f"{v:g}": round(m, 4) for v, m in means.items()},
                          "chosen": best[name]})
            self.save()
        return best


def other_lambda(pretrained: dict) -> dict:
    """The pre-trained recipe with the auxiliary LM's other side: off when the search chose one, GPT-1's
    lambda when it chose none (the study's third column either way)."""
    return {**pretrained, "lm_coef": 0.0 if pretrained["lm_coef"] > 0 else BASE["pretrained"]["lm_coef"]}


def markdown(task: str, budget: int, chosen: dict, table: dict) -> str:
    """One row: each initialisation's dev score (its recipe's lambda in the header) and the gain."""
    lam = {init: f"λ = {recipe['lm_coef']:g}" for init, recipe in chosen.items()}
    gain = 100 * (table["pretrained"][0] - table["random"][0])
    return "\n".join([
        f"| task | labels | pre-trained ({lam['pretrained']}) | random init ({lam['random']}) "
        f"| pre-trained, {lam['lambda']} | gain over random |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {task} | {budget} | {show(table, 'pretrained')} | {show(table, 'random')} | {show(table, 'lambda')} "
        f"| {gain:+.1f} |"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", required=True, help="the pre-trained run (experiments/transfer/run.py's)")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--budget", type=int, default=1000, help="labelled training examples")
    ap.add_argument("--heldout", type=int, default=1000, help="training sentences held out to choose on")
    ap.add_argument("--min-words", type=int, default=15, help="held-out sentences are at least this long (SST-2's "
                    "training set is mostly short phrases, its dev set whole sentences)")
    ap.add_argument("--search-seeds", default="10,11", help="seeds of each searched recipe (not the report's)")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the chosen recipes on dev")
    ap.add_argument("--out", default=str(Path(__file__).parent / "recipe"))
    ap.add_argument("--runs", default="runs/transfer/recipe", help="where the fine-tuned runs go")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    search = Search(Path(args.pretrained), args.task, args.budget, out, Path(args.runs), args.fresh)
    search.claim_setup({"pretrained": str(Path(args.pretrained).resolve()), "task": args.task, "budget": args.budget,
                        "heldout": args.heldout, "min_words": args.min_words})
    train, heldout = split_heldout(task_file(args.task, "train"), Path(args.runs) / args.task, args.heldout,
                                   args.min_words, seed=0)
    search_seeds = [int(s) for s in args.search_seeds.split(",")]
    chosen = {init: search.choose(init, search_seeds, train, heldout) for init in ("pretrained", "random")}
    chosen["lambda"] = other_lambda(chosen["pretrained"])
    search.results["chosen"] = chosen
    table: dict = {}
    for init, recipe in chosen.items():
        scores = [search.score("dev", init, recipe, s, task_file(args.task, "train"), task_file(args.task, "dev"))
                  for s in (int(x) for x in args.seeds.split(","))]
        table[init] = (*interval(scores), len(scores))
    search.results["summary"] = table
    search.results["seconds"] = round(sum(r["seconds"] for r in search.results["runs"].values()), 1)
    search.save()
    md = markdown(args.task, args.budget, chosen, table)
    (out / "results.md").write_text(md + "\n")
    print(json.dumps(chosen, indent=1))
    print(md)
    print(f"this invocation: {(time.perf_counter() - start) / 60:.1f} min -> {out}", file=sys.stderr)


if __name__ == "__main__":
    from slmkit.errors import UserError

    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
