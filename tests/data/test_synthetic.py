import numpy as np
import pandas as pd
import pytest

from mdmt_tf.data.synthetic import SyntheticConfig, generate, synthetic_spec
from mdmt_tf.data.table import ROW
from mdmt_tf.errors import ConfigError


def _auc(y, score):
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    pos = y == 1
    return (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())


def test_same_seed_same_rows_other_seed_other_rows():
    a = generate(SyntheticConfig(rows=5000, seed=1))
    b = generate(SyntheticConfig(rows=5000, seed=1))
    c = generate(SyntheticConfig(rows=5000, seed=2))
    pd.testing.assert_frame_equal(a, b)
    assert not a["user_id"].equals(c["user_id"])


def test_table_matches_spec_and_defaults():
    config = SyntheticConfig(rows=20_000)
    spec = synthetic_spec(config)
    table = generate(config)
    assert spec.missing_columns(table.columns) == []
    assert spec.domains == ("0", "1", "2") and spec.tasks == ("click", "like")
    share = table["domain_id"].value_counts(normalize=True)
    assert share["0"] > share["1"] > share["2"]  # unequal domain sizes
    assert abs(share["2"] - 0.15) < 0.02


def test_cascade_second_task_rarer_and_conditional():
    table = generate(SyntheticConfig(rows=40_000))
    assert (table["like"] <= table["click"]).all()
    assert abs(table["click"].mean() - 0.25) < 0.01
    assert abs(table.loc[table["click"] == 1, "like"].mean() - 0.30) < 0.015


def test_power_law_frequencies():
    table = generate(SyntheticConfig(rows=60_000))
    for column in ("user_id", "item_id"):
        counts = table[column].value_counts().to_numpy()
        top_decile = counts[: len(counts) // 10].sum() / counts.sum()
        assert top_decile > 0.35, (column, top_decile)  # uniform would be ~0.10
        assert counts[0] > 20 * np.median(counts)


def test_shared_domain_and_task_parts_each_carry_signal():
    """The planted structure: removing any part of the true logit costs AUC in every
    domain, for both tasks, so shared, domain and task experts each have something to find."""
    table, truth = generate(SyntheticConfig(rows=60_000), return_truth=True)
    domain = table["domain_id"].to_numpy()
    for task, given in (("click", None), ("like", "click")):
        y = table[task].to_numpy()
        parts = truth[task]
        rows = np.ones(len(y), bool) if given is None else table[given].to_numpy() == 1
        for d in ("0", "1", "2"):
            m = rows & (domain == d)
            full = _auc(y[m], parts["logit"][m])
            assert full > 0.8
            for part in ("shared", "domain", "task"):
                assert full - _auc(y[m], (parts["logit"] - parts[part])[m]) > 0.02, (task, d, part)


def test_domains_differ_in_what_users_like():
    """Domain-specific category preference: the per-category click rate ranking differs by domain."""
    table = generate(SyntheticConfig(rows=60_000))
    rates = table.groupby(["domain_id", "cate_id"])["click"].mean().unstack(0)
    corr = rates.corr(method="spearman")
    assert corr.loc["0", "1"] < 0.9 and corr.loc["0", "2"] < 0.9


@pytest.mark.parametrize("domains, tasks", [(5, ("click", "like", "buy")), (1, ("click",)), (2, ("a", "b"))])
def test_configurable_domains_and_tasks(domains, tasks):
    config = SyntheticConfig(rows=20_000, domains=domains, tasks=tasks, seed=3)
    spec = synthetic_spec(config)
    table = generate(config)

    # shapes: one row per impression, the spec's columns (+ the row number), one label per task
    assert len(table) == 20_000
    assert spec.tasks == tasks and spec.domains == tuple(str(d) for d in range(domains))
    assert spec.missing_columns(table.columns) == []
    assert set(table.columns) - set(spec.columns) == {ROW}
    assert set(table["domain_id"]) == set(spec.domains)
    for task in tasks:
        assert set(table[task].unique()) == {0, 1}, task
        # every domain has positives and negatives of every task (per-domain AUC is defined)
        assert table.groupby("domain_id")[task].agg(["min", "max"]).eq([0, 1]).all().all(), task

    # unequal domain sizes, largest first, in the configured proportions
    share = table["domain_id"].value_counts(normalize=True).reindex(spec.domains).to_numpy()
    assert np.allclose(share, config.weights(), atol=0.015)
    if domains > 1:
        assert (np.diff(share) < 0).all(), share

    # cascade: a later task is positive only where the previous one is, at its rate given it
    previous = np.ones(len(table), bool)
    for task, rate in zip(tasks, config.task_rates()):
        y = table[task].to_numpy() == 1
        assert not (y & ~previous).any(), task
        assert abs(y[previous].mean() - rate) < 0.04, (task, y[previous].mean(), rate)
        previous = y

    # determinism by seed
    pd.testing.assert_frame_equal(table, generate(config))
    other = generate(SyntheticConfig(rows=20_000, domains=domains, tasks=tasks, seed=4))
    assert not table["item_id"].equals(other["item_id"])
    assert not table[tasks[-1]].equals(other[tasks[-1]])


@pytest.mark.parametrize("kwargs", [dict(rows=5), dict(domains=0), dict(domain_weights=(1.0, 2.0)),
                                    dict(rates=(0.2,)), dict(tasks=("a", "a"))])
def test_invalid_configs(kwargs):
    with pytest.raises(ConfigError):
        SyntheticConfig(**kwargs)
