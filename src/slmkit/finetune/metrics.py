"""The GLUE-style metrics: accuracy, Matthews correlation, F1, Pearson and Spearman (numpy only)."""

from __future__ import annotations

import math

import numpy as np


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(gold))) if len(gold) else 0.0


def f1(pred: np.ndarray, gold: np.ndarray, positive: int = 1) -> float:
    pred, gold = np.asarray(pred) == positive, np.asarray(gold) == positive
    tp = float(np.sum(pred & gold))
    fp, fn = float(np.sum(pred & ~gold)), float(np.sum(~pred & gold))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def mcc(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation (binary or multi-class, Gorodkin's R_K); 0 when undefined."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    classes = np.union1d(pred, gold)
    c = np.zeros((len(classes), len(classes)))
    pi, gi = np.searchsorted(classes, pred), np.searchsorted(classes, gold)
    np.add.at(c, (gi, pi), 1)
    t, p, n = c.sum(axis=1), c.sum(axis=0), c.sum()
    cov_xy = np.trace(c) * n - t @ p
    cov_xx, cov_yy = n * n - p @ p, n * n - t @ t
    denom = math.sqrt(cov_xx * cov_yy)
    return float(cov_xy / denom) if denom else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / denom) if denom else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x))
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e - 1) / 2 + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_ranks(x), _ranks(y))


METRIC_FNS = {"accuracy": accuracy, "mcc": mcc, "f1": f1, "pearson": pearson, "spearman": spearman}


def compute(names: list[str], pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    return {name: METRIC_FNS[name](pred, gold) for name in names}


def majority_baseline(names: list[str], gold: np.ndarray) -> dict[str, float]:
    """Each metric of predicting the most frequent gold value for every example (GLUE's majority-class
    baseline): accuracy is that class's share, F1 its F1 when it is the positive class (else 0), and MCC,
    Pearson and Spearman are 0, as a constant prediction correlates with nothing."""
    gold = np.asarray(gold)
    if not len(gold):
        return dict.fromkeys(names, 0.0)
    values, counts = np.unique(gold, return_counts=True)
    return compute(names, np.full_like(gold, values[np.argmax(counts)]), gold)
