"""The sweep's fine-tune objective: trials ranked by a short fine-tune's dev score, not by LM loss."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import tiny_config

optuna = pytest.importorskip("optuna")

from slmkit import sweep  # noqa: E402
from slmkit.errors import UserError  # noqa: E402
from slmkit.runlog import read_metrics  # noqa: E402
from slmkit.sweep.objective import FINETUNE_DIR, SMALL_RECIPE, parse_settings  # noqa: E402
from slmkit.sweep.runner import TRIALS_DIR, counted_trials, load_spec, load_study  # noqa: E402

pytestmark = pytest.mark.usefixtures("module_one_torch_thread")


def write_task(folder: Path) -> tuple[Path, Path]:
    """A small SST-2-format task whose label a sentence's adjective gives away."""
    good, bad = ["good", "fine", "great"], ["bad", "poor", "awful"]
    rows = ["sentence\tlabel"]
    for i in range(48):
        label = i % 2
        word = (good if label else bad)[i % 3]
        rows.append(f"the {['cat', 'dog', 'fox', 'bird'][i % 4]} was {word} on the mat\t{label}")
    train, dev = folder / "train.tsv", folder / "dev.tsv"
    train.write_text("\n".join(rows) + "\n")
    dev.write_text("\n".join(rows[:1] + rows[1:17]) + "\n")
    return train, dev


def task_corpus(folder: Path, train: Path) -> Path:
    """Pre-training text with every character the task's sentences use (a character model)."""
    sentences = [line.split("\t")[0] for line in train.read_text().splitlines()[1:]]
    corpus = folder / "corpus.txt"
    corpus.write_text("".join(f"{s} number {i % 7}.\n" for i, s in enumerate(sentences * 8)))
    return corpus


def base(corpus: Path):
    cfg = tiny_config(corpus, max_iters=8, eval_interval=4, sample_tokens=0, log_interval=4)
    cfg.model.n_embd, cfg.model.n_layer = 16, 1
    return cfg


def objective_flags(train: Path, dev: Path, **settings) -> dict:
    sets = [f"{k}={v}" for k, v in {"epochs": 2, "batch_size": 8, "max_train": 0, **settings}.items()]
    return {"finetune_task": "sst2", "finetune_train": str(train), "finetune_dev": str(dev), "finetune_set": sets}


@pytest.fixture(scope="module")
def ft_sweep(tmp_path_factory, module_one_torch_thread):
    tmp = tmp_path_factory.mktemp("ftsweep")
    train, dev = write_task(tmp)
    corpus = task_corpus(tmp, train)
    d = tmp / "sw"
    sweep.create(d, base(corpus), grid=["learning_rate=1e-3,3e-3"], seeds=2, **objective_flags(train, dev))
    assert sweep.run(d, show=False) == 2
    return d


def test_each_trial_is_fine_tuned_and_told_its_dev_score(ft_sweep):
    spec = load_spec(ft_sweep)
    study = load_study(spec)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = counted_trials(study)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        scores = []
        for run in t.user_attrs["run_dirs"]:
            records = [r for r in read_metrics(ft_sweep / run / FINETUNE_DIR) if "dev_accuracy" in r]
            assert len(records) == 2  # two epochs, each evaluated on dev
            scores.append(records[-1]["dev_accuracy"])  # the last epoch's, not the best one's
            cfg = json.loads((ft_sweep / run / FINETUNE_DIR / "finetune.json").read_text())["config"]
            assert cfg["learning_rate"] == SMALL_RECIPE["learning_rate"] and cfg["epochs"] == 2
        assert t.user_attrs["seed_finetune_scores"] == pytest.approx(scores)
        assert t.value == pytest.approx(sum(scores) / len(scores))
        # The seeds' fine-tunes follow their pre-training seeds.
        seeds = [json.loads((ft_sweep / run / FINETUNE_DIR / "finetune.json").read_text())["config"]["seed"]
                 for run in t.user_attrs["run_dirs"]]
        assert seeds == [seeds[0], seeds[0] + 1]


def test_report_ranks_by_the_fine_tuned_score(ft_sweep, capsys):
    from slmkit.cli import main

    main(["sweep", "report", str(ft_sweep)])
    capsys.readouterr()
    with open(ft_sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    scores = [float(r["finetune_dev"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    trials = {t.number: t for t in counted_trials(load_study(load_spec(ft_sweep)))}
    for r in rows:
        assert float(r["finetune_dev"]) == pytest.approx(trials[int(r["trial"])].value)
    md = (ft_sweep / "report.md").read_text()
    lr = SMALL_RECIPE["learning_rate"]
    assert f"ranked by: dev accuracy of a fine-tune on sst2 (every label, 2 epochs, lr {lr:g}), higher is better" in md
    assert f"**{scores[0]:.4f} ± " in md and "fine-tuned dev accuracy" in md
    assert f"**Best: trial {rows[0]['trial']}**" in md
    for name in ("finetune_vs_params_M.png", "finetune_vs_learning_rate.png", "finetune_vs_best_val_loss.png"):
        assert (ft_sweep / "plots" / name).stat().st_size > 1000, name


def test_settings_parse_to_the_small_recipe_with_overrides():
    s = parse_settings(["lr=1e-4", "max-train=250", "random_init=true", "lm_coef=0.25"])
    assert s["learning_rate"] == 1e-4 and s["max_train"] == 250 and s["random_init"] is True
    assert s["lm_coef"] == 0.25 and s["epochs"] == SMALL_RECIPE["epochs"]
    assert parse_settings(["transfer_layers=2"])["transfer_layers"] == 2
    assert parse_settings([]) == SMALL_RECIPE


@pytest.mark.parametrize("change, message", [
    ({"finetune_task": None}, "--finetune-train belongs to the fine-tune objective: add --finetune-task"),
    ({"finetune_dev": None}, "--finetune-task needs the task's files"),
    ({"finetune_task": "nosuchtask"}, "nosuchtask"),
    ({"finetune_dev": "/nonexistent/dev.tsv"}, "--finetune-dev /nonexistent/dev.tsv: no such file"),
    ({"finetune_set": ["colour=blue"]}, "unknown fine-tuning setting 'colour'"),
    ({"finetune_set": ["seed=3"]}, "the sweep sets it"),
    ({"finetune_set": ["epochs=two"]}, "--finetune-set epochs=two: not a valid int"),
    ({"finetune_set": ["lr=-1"]}, "must be positive"),
    ({"finetune_set": ["epochs"]}, "takes NAME=VALUE"),
    ({"finetune_set": ["random_init=true", "transfer_layers=1"]}, "give one of them"),
    ({"prune": True}, "drop --prune"),
])
def test_objective_errors_come_before_any_trial(tmp_path, change, message):
    train, dev = write_task(tmp_path)
    tiny_corpus = task_corpus(tmp_path, train)
    flags = {**objective_flags(train, dev), **change}
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as exc:
        sweep.create(tmp_path / "sw", base(tiny_corpus), grid=["n_layer=1,2"], **flags)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "sw" / TRIALS_DIR).exists()


def test_a_random_search_with_the_objective_does_not_prune(tmp_path):
    train, dev = write_task(tmp_path)
    tiny_corpus = task_corpus(tmp_path, train)
    spec = sweep.create(tmp_path / "sw", base(tiny_corpus), params=["learning_rate=log:1e-3:3e-3"],
                        search="random", trials=2, **objective_flags(train, dev))
    assert spec.prune is False and spec.finetune["task"] == "sst2"
    # sweep.json keeps the objective with absolute file paths: a worker started elsewhere finds them.
    saved = json.loads((tmp_path / "sw" / "sweep.json").read_text())["finetune"]
    assert Path(saved["train"]).is_absolute() and saved["settings"]["epochs"] == 2


def test_cli_flags_make_the_objective(tmp_path, capsys):
    from slmkit.cli import main

    train, dev = write_task(tmp_path)
    tiny_corpus = task_corpus(tmp_path, train)
    out = tmp_path / "sw"
    main(["sweep", "--dataset", str(tiny_corpus), "--grid", "learning_rate=1e-3", "--max-iters", "4",
          "--eval-interval", "2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "32",
          "--batch-size", "8", "--device", "cpu", "--finetune-task", "sst2", "--finetune-train", str(train),
          "--finetune-dev", str(dev), "--finetune-set", "epochs=1", "--finetune-set", "max_train=16",
          "--out-dir", str(out), "--no-report"])
    printed = capsys.readouterr().out
    assert "best: trial 0 dev accuracy " in printed
    assert (out / TRIALS_DIR / "trial_0000" / FINETUNE_DIR / "finetune.json").is_file()


def test_a_tokenizer_that_cannot_encode_the_task_fails_before_any_trial(tmp_path, tiny_corpus):
    train, dev = write_task(tmp_path)  # "good", "was", ... use letters the tiny corpus lacks
    d = tmp_path / "sw"
    sweep.create(d, base(tiny_corpus), grid=["n_layer=1,2"], **objective_flags(train, dev))
    with pytest.raises(UserError, match=r"--finetune-train .*train.tsv, line 2: the pre-training tokenizer cannot "
                                        r"encode it \(character .* pick a tokenizer that covers the task") as exc:
        sweep.run(d, show=False)
    assert "\n" not in str(exc.value)
    assert [t.state.name for t in counted_trials(load_study(load_spec(d)))] == []  # no trial started
