"""experiments/transfer/recipe.py: the held-out split the fine-tuning recipe is chosen on, and the
coordinate search over the recipe (its fine-tunes are `slm finetune`, tested on their own)."""

from pathlib import Path

import pytest
from conftest import import_script

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "transfer" / "recipe.py"


@pytest.fixture(scope="module")
def recipe():
    return import_script(SCRIPT, "transfer_recipe")


def write_tsv(path: Path, n: int) -> list[str]:
    lines = [f"{' '.join(['w'] * (i % 30 + 1))} s{i}\t{i % 2}" for i in range(n)]
    path.write_text("\n".join(["sentence\tlabel", *lines]) + "\n")
    return lines


def test_heldout_split_takes_long_sentences_apart_from_the_training_lines(recipe, tmp_path):
    lines = write_tsv(tmp_path / "train.tsv", 300)
    train, heldout = recipe.split_heldout(tmp_path / "train.tsv", tmp_path / "split", 40, 15, seed=0)
    held = heldout.read_text().splitlines()
    rest = train.read_text().splitlines()
    assert held[0] == rest[0] == "sentence\tlabel"
    assert len(held) == 41 and all(len(x.split("\t")[0].split()) >= 15 for x in held[1:])
    assert not set(held[1:]) & set(rest[1:])
    assert sorted(held[1:] + rest[1:]) == sorted(lines)  # nothing lost, nothing doubled
    # Seeded: another folder gets the same split; another seed another one.
    again = recipe.split_heldout(tmp_path / "train.tsv", tmp_path / "again", 40, 15, seed=0)[1]
    other = recipe.split_heldout(tmp_path / "train.tsv", tmp_path / "other", 40, 15, seed=1)[1]
    assert again.read_text() == heldout.read_text() != other.read_text()


def test_heldout_split_refuses_more_long_sentences_than_there_are(recipe, tmp_path):
    write_tsv(tmp_path / "train.tsv", 30)
    with pytest.raises(SystemExit, match="have 15"):
        recipe.split_heldout(tmp_path / "train.tsv", tmp_path / "split", 20, 15, seed=0)


def test_coordinate_search_keeps_each_settings_best_before_searching_the_next(recipe, tmp_path, monkeypatch):
    calls = []

    def fake_score(self, stage, init, chosen, seed, train, dev):
        calls.append((init, dict(chosen), seed))
        # Best: lr 1e-3, then 10 epochs only once lr is 1e-3 (a coordinate search must carry it forward).
        s = {1e-4: 0.5, 3e-4: 0.6, 1e-3: 0.7}[chosen["learning_rate"]]
        s += 0.1 if chosen["epochs"] == 10 and chosen["learning_rate"] == 1e-3 else 0
        s += 0.01 * chosen["lm_coef"] + 0.001 * seed
        return s

    monkeypatch.setattr(recipe.Search, "score", fake_score)
    search = recipe.Search(tmp_path, "sst2", 1000, tmp_path / "out", tmp_path / "runs", fresh=True)
    best = search.choose("pretrained", [0, 1], tmp_path, tmp_path)
    assert best["learning_rate"] == 1e-3 and best["epochs"] == 10 and best["lm_coef"] == 1.0
    assert best["clf_dropout"] == recipe.BASE["pretrained"]["clf_dropout"]  # ties keep the first value tried
    steps = search.results["steps"]["pretrained"]
    assert [s["setting"] for s in steps] == list(recipe.SPACE)
    assert steps[0]["means"] == {"0.0001": 0.5055, "0.0003": 0.6055, "0.001": 0.7055}  # mean over both seeds
    assert {seed for _, _, seed in calls} == {0, 1}
    assert (tmp_path / "out" / "results.json").exists()


def test_the_lambda_contrast_is_the_other_side_of_the_chosen_lambda(recipe):
    chosen = {**recipe.BASE["pretrained"], "lm_coef": 1.0}
    assert recipe.other_lambda(chosen) == {**chosen, "lm_coef": 0.0}  # an auxiliary LM chosen: compare without
    none = {**chosen, "lm_coef": 0.0}
    assert recipe.other_lambda(none)["lm_coef"] == 0.5  # none chosen: compare with GPT-1's
    table = {"pretrained": (0.70, 0.02, 5), "random": (0.61, 0.03, 5), "lambda": (0.68, 0.01, 5)}
    md = recipe.markdown("sst2", 1000, {"pretrained": none, "random": recipe.BASE["random"],
                                        "lambda": recipe.other_lambda(none)}, table)
    assert "pre-trained (λ = 0) | random init (λ = 0.5) | pre-trained, λ = 0.5 |" in md
    assert "| sst2 | 1000 | 70.0 ± 2.0 (n=5) | 61.0 ± 3.0 (n=5) | 68.0 ± 1.0 (n=5) | +9.0 |" in md


def test_runs_of_another_model_or_split_are_not_mixed_in(recipe, tmp_path):
    search = recipe.Search(tmp_path, "sst2", 1000, tmp_path / "out", tmp_path / "runs", fresh=True)
    setup = {"pretrained": "/runs/a", "task": "sst2", "budget": 1000, "heldout": 1000, "min_words": 15}
    search.claim_setup(setup)
    search.results["runs"]["search/pretrained/lr=0.001/s10"] = {"score": 0.7}
    search.claim_setup(dict(setup))  # the same setup again: fine
    with pytest.raises(SystemExit, match="holds runs of"):
        search.claim_setup({**setup, "pretrained": "/runs/b"})
