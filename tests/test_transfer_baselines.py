"""experiments/transfer/baselines.py: the logistic regressions behind the bag-of-words and
linear-probe references (the features come from slmkit's model, tested on its own)."""

from pathlib import Path

import pytest
import torch
from conftest import import_script

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "transfer" / "baselines.py"


@pytest.fixture(scope="module")
def baselines():
    return import_script(SCRIPT, "transfer_baselines")


def test_probe_learns_a_signal_and_not_noise(baselines):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 20, generator=g)
    y = (x[:, 3] - x[:, 7] > 0).float()
    assert baselines.probe(x[:200], y[:200], x[200:], y[200:]) > 0.9
    noise = torch.randint(0, 2, (400,), generator=g).float()
    assert abs(baselines.probe(x[:200], noise[:200], x[200:], noise[200:]) - 0.5) < 0.12


def test_bag_of_words_knows_only_the_training_words(baselines):
    train = [("a good film", 1), ("a bad film", 0)]
    x, dev = baselines.bag_of_words(train, [("a good plot", 1), ("unseen words", 0)])
    assert x.shape == (2, 4) and x.sum().item() == 6
    assert dev.tolist() == [[1, 0, 0, 1], [0, 0, 0, 0]]  # vocabulary: a, bad, film, good


def test_label_subsets_are_those_slm_finetune_trains_on(baselines):
    from slmkit.finetune.loop import label_subset

    rows = [(f"s{i}", i % 2) for i in range(50)]
    picked = baselines.label_subset(rows, 10, seed=3)
    assert [r for r, _ in picked] == [f"s{i}" for i in label_subset(50, 10, 3)]
    assert picked == sorted(picked, key=lambda r: int(r[0][1:])) and len(set(picked)) == 10
    assert baselines.label_subset(rows, 10, seed=4) != picked
