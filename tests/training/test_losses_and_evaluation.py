import itertools
import math

import numpy as np
import pytest

from mdmt_tf.training.evaluation import auc, auc_by_group, evaluate, logloss, relative_feedback_groups
from mdmt_tf.training.losses import mdmt_loss


def _bce(y, p):
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_pair_loss_golden():
    # domain 0: rows 0, 1; domain 1: row 2; domain 2: empty
    labels = {"a": np.array([1.0, 0.0, 1.0]), "b": np.array([0.0, 0.0, 1.0])}
    probs = {"a": np.array([[0.8], [0.4], [0.5]]), "b": np.array([[0.1], [0.3], [0.9]])}
    domain = np.array([0, 0, 1])
    a = (_bce(1, .8) + _bce(0, .4)) / 2 + _bce(1, .5)  # mean within each (domain, task), summed
    b = (_bce(0, .1) + _bce(0, .3)) / 2 + _bce(1, .9)
    got = float(mdmt_loss(labels, probs, domain, 3, ["a", "b"]))
    assert got == pytest.approx(a + b, rel=1e-6)
    got = float(mdmt_loss(labels, probs, domain, 3, ["a", "b"], task_weights={"b": 2.0}))
    assert got == pytest.approx(a + 2 * b, rel=1e-6)
    sample = (_bce(1, .8) + _bce(0, .4) + _bce(1, .5)) / 3 + (_bce(0, .1) + _bce(0, .3) + _bce(1, .9)) / 3
    assert float(mdmt_loss(labels, probs, domain, 3, ["a", "b"], reduction="sample")) == pytest.approx(sample, 1e-6)


def _brute_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        s = rng.integers(0, 6, 40).astype(float)  # many ties
        if 0 < y.sum() < 40:
            assert auc(y, s) == pytest.approx(_brute_auc(y, s), abs=1e-12)
    assert auc(np.ones(5), np.arange(5)) is None
    assert logloss([1, 0], [0.9, 0.2]) == pytest.approx((_bce(1, .9) + _bce(0, .2)) / 2)


def test_evaluate_aggregates():
    y = {"a": np.array([1, 0, 1, 0, 1, 1]), "b": np.array([0, 0, 1, 0, 0, 0])}
    p = {"a": np.array([.9, .1, .8, .3, .2, .7]), "b": np.array([.2, .1, .9, .3, .4, .5])}
    domain = np.array([0, 0, 0, 0, 1, 1])
    r = evaluate(p, y, domain, ["x", "y"], ["a", "b"])
    assert r["auc"]["x/a"] == 1.0 and r["auc"]["x/b"] == 1.0
    assert r["auc"]["y/a"] is None and r["auc"]["y/b"] is None  # one class only
    assert r["mean_auc"] == 1.0  # undefined pairs left out
    assert r["count"] == {"x/a": 4, "x/b": 4, "y/a": 2, "y/b": 2}
    assert r["task_auc"]["a"] == pytest.approx(_brute_auc(y["a"], p["a"]))
    ll = [r["logloss"][k] for k in ("x/a", "x/b", "y/a", "y/b")]
    assert r["mean_logloss"] == pytest.approx(np.mean(ll))
    assert r["weighted_logloss"] == pytest.approx(np.average(ll, weights=[4, 4, 2, 2]))


def test_relative_feedback_groups():
    pa = np.linspace(0, 1, 100)
    pb = np.linspace(1, 0, 100)
    groups = relative_feedback_groups(pa, pb, buckets=10, threshold=3)
    assert groups[0] == "B-overwhelming" and groups[-1] == "A-overwhelming" and groups[50] == "comparable"
    same = relative_feedback_groups(pa, pa)
    assert set(same) == {"comparable"}
    table = auc_by_group({"a": pa}, {"a": (pa > 0.5).astype(int)}, groups, ["a"])
    assert set(table) == {"A-overwhelming", "comparable", "B-overwhelming"}
