"""A sweep objective that judges pre-training by what it is for: a short fine-tune's dev score.

The validation loss ranks pre-training recipes by how well they model the corpus; GPT-1's question is
how well they transfer. With `--finetune-task TASK --finetune-train FILE --finetune-dev FILE`, every
trial (every seed) is fine-tuned after its pre-training, into `<trial>/finetune/`, and the trial's
value is the last epoch's dev score on the task's primary metric (no early stopping on dev: choosing
the trial is the one use of the dev set). The study then maximises that score.

The fine-tune uses the small-model recipe below unless `--finetune-set NAME=VALUE` (any of
`slm finetune`'s settings) says otherwise; 1,000 labels by default, so that a trial's fine-tune costs
about half a minute on 2 CPU cores for a few-million-parameter model.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from slmkit.errors import UserError
from slmkit.finetune.loop import SMALL_MODEL_RECIPE, SMALL_MODEL_STEPS

FINETUNE_DIR = "finetune"  # inside each trial's run directory
# What a sweep's fine-tune uses unless --finetune-set changes it: experiments/transfer's recipe for
# models of a few million parameters (slm finetune's small-model suggestion) on a subset of 1,000
# labels, with the epochs that make its SMALL_MODEL_STEPS updates, sequences cut where sentence tasks end.
SMALL_LABELS = 1000
SMALL_RECIPE: dict[str, Any] = {
    **SMALL_MODEL_RECIPE, "max_train": SMALL_LABELS, "max_len": 128,
    "epochs": math.ceil(SMALL_MODEL_STEPS * SMALL_MODEL_RECIPE["batch_size"] / SMALL_LABELS)}
# Settings the sweep decides: the seed follows the trial's seed, the device the trial's.
NOT_SETTABLE = ("seed", "device", "dtype", "logger", "log_interval")


def _coerce(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if isinstance(default, int) or default is None:  # transfer_layers: int | None
            return int(raw)
        if isinstance(default, float):
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        kind = type(default).__name__ if default is not None else "int"
        raise UserError(f"--finetune-set {name}={raw}: not a valid {kind}") from None
    return raw


def parse_settings(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The fine-tune's settings: SMALL_RECIPE updated by NAME=VALUE items (FinetuneConfig's fields,
    `lr` for learning_rate), checked as `slm finetune` checks its flags."""
    from slmkit.finetune.loop import FinetuneConfig

    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    settings = dict(SMALL_RECIPE)
    for item in items:
        name, sep, raw = item.partition("=")
        name = FinetuneConfig.RENAMED.get(name.strip().replace("-", "_"), name.strip().replace("-", "_"))
        if not sep or not raw.strip():
            raise UserError(f"--finetune-set takes NAME=VALUE, got {item!r}")
        if name in NOT_SETTABLE:
            raise UserError(f"--finetune-set {name}: the sweep sets it (the trial's seed and device)")
        if name not in defaults:
            raise UserError(f"--finetune-set: unknown fine-tuning setting {name!r}; known: "
                            f"{', '.join(sorted(n for n in defaults if n not in NOT_SETTABLE))}")
        settings[name] = _coerce(name, raw.strip(), defaults[name])
    FinetuneConfig.from_dict(settings).validate()
    return settings


def make_objective(task: str, train: str, dev: str, settings: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The objective saved in sweep.json, checked now so that a wrong task, file or setting fails before
    any trial trains: the task's files are read as the fine-tune will read them."""
    from slmkit.finetune.tasks import get_task, read_examples

    spec = get_task(task)
    for flag, path in (("--finetune-train", train), ("--finetune-dev", dev)):
        if not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
        if not read_examples(spec, path).examples:
            raise UserError(f"{flag} {path}: no {task} examples in it")
    return {"task": spec.name, "metric": spec.primary_metric, "train": str(Path(train).resolve()),
            "dev": str(Path(dev).resolve()), "settings": parse_settings(settings)}


def check_encodable(objective: dict[str, Any], tokenizer) -> None:
    """Every text of the task's files in the pre-training tokenizer, before the first trial: a
    character vocabulary that lacks a character of the task would otherwise fail every trial only
    after its pre-training."""
    from slmkit.finetune.tasks import get_task, read_examples

    spec = get_task(objective["task"])
    for key in ("train", "dev"):
        for ex in read_examples(spec, objective[key]).examples:
            for text in (*ex.segments, *ex.choices):
                try:
                    tokenizer.encode(text)
                except UserError as exc:
                    raise UserError(f"--finetune-{key} {objective[key]}, line {ex.line}: the pre-training "
                                    f"tokenizer cannot encode it ({exc}); pick a tokenizer that covers the task, "
                                    "such as --tokenizer bpe") from None


def check_objective(objective: Any) -> None:
    """An objective read back from sweep.json: the fields it must have (one-line error otherwise)."""
    keys = {"task", "metric", "train", "dev", "settings"}
    if not isinstance(objective, dict) or set(objective) != keys:
        raise UserError(f"finetune must be an object with the fields {', '.join(sorted(keys))}")
    from slmkit.finetune.loop import FinetuneConfig

    FinetuneConfig.from_dict(dict(objective["settings"])).validate()


def finetune_score(objective: dict[str, Any], run_dir: Path, seed: int) -> float:
    """Fine-tune the model trained in `run_dir` and return its last epoch's dev score."""
    from slmkit.finetune.loop import FinetuneConfig, finetune
    from slmkit.finetune.tasks import get_task

    cfg = FinetuneConfig.from_dict({**objective["settings"], "seed": seed})
    finetune(run_dir, get_task(objective["task"]), objective["train"], objective["dev"], run_dir / FINETUNE_DIR,
             cfg, overwrite=True, progress=False)
    score = read_score(run_dir, objective["metric"])
    if score is None:
        raise UserError(f"the fine-tune in {run_dir / FINETUNE_DIR} recorded no dev {objective['metric']}")
    return score


def read_score(run_dir: Path, metric: str) -> float | None:
    """The last epoch's dev score of the fine-tune in `run_dir`, read back from its metrics.jsonl."""
    from slmkit.runlog import read_metrics

    folder = Path(run_dir) / FINETUNE_DIR
    if not folder.is_dir():
        return None
    scores = [r[f"dev_{metric}"] for r in read_metrics(folder)
              if isinstance(r.get(f"dev_{metric}"), int | float) and math.isfinite(r[f"dev_{metric}"])]
    return float(scores[-1]) if scores else None


def describe(objective: dict[str, Any]) -> str:
    s = objective["settings"]
    labels = f"{s['max_train']:,} labels" if s.get("max_train") else "every label"
    return (f"dev {objective['metric']} of a fine-tune on {objective['task']} ({labels}, {s['epochs']} epochs, "
            f"lr {s['learning_rate']:g}), higher is better")
