"""experiments/transfer/run.py: the statistics and the bookkeeping of the pre-training study (its
fine-tuning runs are `slm finetune`, tested on their own)."""

import math
from pathlib import Path

import pytest
from conftest import import_script

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "transfer" / "run.py"


@pytest.fixture(scope="module")
def study():
    return import_script(SCRIPT, "transfer_study")


def test_interval_is_the_95_percent_t_interval(study):
    mean, half = study.interval([0.70, 0.72, 0.74])
    assert mean == pytest.approx(0.72)
    assert half == pytest.approx(4.303 * 0.02 / math.sqrt(3))  # t(0.975, 2 df) x sd / sqrt(n)
    assert study.interval([0.5]) == (0.5, 0.0)


def test_small_label_budgets_get_more_epochs_up_to_the_cap(study):
    scale = study.SCALES["cpu"]
    assert study.epochs_for(scale, 67_349) == 3  # GPT-1's 3 epochs for a full dataset
    assert study.epochs_for(scale, 1000) == math.ceil(scale.min_steps * scale.batch_size / 1000)
    assert study.epochs_for(scale, 10) == scale.max_epochs


def test_summary_keeps_only_the_chosen_learning_rates(study, tmp_path):
    s = study.Study(study.SCALES["quick"], tmp_path, tmp_path / "runs", fresh=True)
    s.results["lr"] = {"pretrained": 1e-3, "random": 3e-4}
    rows = [("pretrained", 1e-3, 0, 0.80), ("pretrained", 1e-3, 1, 0.82), ("pretrained", 3e-4, 0, 0.99),
            ("random", 3e-4, 0, 0.60), ("random", 3e-4, 1, 0.64), ("random", 1e-3, 1, 0.10)]
    for init, lr, seed, dev in rows:
        s.results["cells"][f"sst2/1000/{init}/s{seed}/lr{lr:g}"] = dict(
            task="sst2", budget=1000, init=init, seed=seed, lr=lr, dev=dev)
    summary = s.summary()
    assert summary["sst2"][1000]["pretrained"][0] == pytest.approx(0.81)  # the 0.99 at another lr is left out
    assert summary["sst2"][1000]["random"][2] == 2
    table = study.markdown(summary)
    assert "| sst2 | 1000 | 81.0 ± " in table and "| +19.0 |" in table


def test_cells_of_another_fine_tuning_recipe_are_not_mixed_in(study, tmp_path):
    from dataclasses import replace

    s = study.Study(study.SCALES["quick"], tmp_path, tmp_path / "runs", fresh=True)
    s.claim_recipe(study.SCALES["quick"])  # a new file takes any recipe
    s.results["cells"]["sst2/1000/pretrained/s0/lr0.001"] = dict(task="sst2", budget=1000, init="pretrained",
                                                                  seed=0, lr=1e-3, dev=0.8)
    s.claim_recipe(study.SCALES["quick"])  # the same recipe again: fine
    with pytest.raises(SystemExit, match="holds cells of the fine-tuning recipe"):
        s.claim_recipe(replace(study.SCALES["quick"], min_steps=600))
    del s.results["recipe"]  # a file from before the recipe was recorded: the default recipe's cells
    s.claim_recipe(study.SCALES["quick"])
    with pytest.raises(SystemExit):
        s.claim_recipe(replace(study.SCALES["quick"], lm_coef=1.0))
    # A file recorded before the fine-tuning dropout was a setting: it kept the pre-trained model's.
    s.results["recipe"] = {"min_steps": 300, "max_epochs": 20, "lm_coef": 0.5}
    s.claim_recipe(study.SCALES["quick"])
    assert s.results["recipe"]["dropout"] == -1.0
    with pytest.raises(SystemExit):
        s.claim_recipe(replace(study.SCALES["quick"], dropout=0.1))


def test_the_pooled_head_is_part_of_the_recipe(study, tmp_path):
    from dataclasses import replace

    s = study.Study(study.SCALES["quick"], tmp_path, tmp_path / "runs", fresh=True)
    # A file recorded before the pooling was a setting: GPT-1's extract token.
    s.results["recipe"] = {"min_steps": 300, "max_epochs": 20, "lm_coef": 0.5, "dropout": -1.0}
    s.results["cells"]["sst2/1000/pretrained/s0/lr0.001"] = dict(task="sst2", budget=1000, init="pretrained",
                                                                  seed=0, lr=1e-3, dev=0.8)
    s.claim_recipe(study.SCALES["quick"])
    assert s.results["recipe"]["pool"] == "extract"
    with pytest.raises(SystemExit, match="holds cells of the fine-tuning recipe"):
        s.claim_recipe(replace(study.SCALES["quick"], pool="mean"))
