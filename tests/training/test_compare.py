import json

import numpy as np
import pytest

from mdmt_tf.models import ModelConfig
from mdmt_tf.training.compare import Comparison, cold_start_shares, popularity_predictions
from mdmt_tf.training.config import TrainConfig
from mdmt_tf.training.evaluation import auc


def test_popularity_is_the_items_training_rate(data):
    preds = popularity_predictions(data, split="test")
    train, test = data.splits.train, data.splits.test
    item = test["item_id"].iloc[0]
    seen = train[train["item_id"] == item]
    rate = train["click"].mean()
    assert preds["click"][0] == pytest.approx((seen["click"].sum() + rate) / (len(seen) + 1))
    unseen = ~test["item_id"].isin(set(train["item_id"])).to_numpy()
    assert unseen.any() and np.allclose(preds["click"][unseen], rate)
    shares = cold_start_shares(data)
    assert shares["item_id"] == pytest.approx(unseen.mean())


@pytest.mark.slow
def test_compare_two_models_two_seeds(data, tmp_path):
    small = {"embedding_dim": 4}
    models = [ModelConfig("mlp", {**small, "units": [16]}), ModelConfig("shared_bottom", {**small,
                                                                                          "bottom_units": [16]})]
    report = Comparison(models, data, TrainConfig(epochs=1, batch_size=256), tmp_path, seeds=2, verbose=0).run()
    assert set(report["table"]) == {"popularity", "mlp", "shared_bottom"}
    runs = [json.loads((tmp_path / "runs" / "mlp" / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    mean, std = report["table"]["mlp"]["0/click"]
    values = [r["test"]["auc"]["0/click"] for r in runs]
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values))
    assert report["table"]["popularity"]["mean_auc"][1] == 0.0
    test = data.splits.test
    rows = (test["domain_id"] == "0").to_numpy()
    pop = popularity_predictions(data)["click"][rows]
    assert report["table"]["popularity"]["0/click"][0] == pytest.approx(auc(test["click"].to_numpy()[rows], pop))
    for name in ("compare.md", "compare.csv", "compare.png", "compare.json"):
        assert (tmp_path / name).stat().st_size > 100
    assert set(report["relative_feedback"]["groups"]) == {"A-overwhelming", "comparable", "B-overwhelming"}
    assert "± " in (tmp_path / "compare.md").read_text()


def test_a_model_with_nan_auc_ranks_last():
    from mdmt_tf.report.tables import ranked

    report = {"table": {"a": {"mean_auc": (0.70, 0.0)}, "nan": {"mean_auc": (float("nan"), float("nan"))},
                        "b": {"mean_auc": (0.75, 0.01)}, "none": {"mean_auc": (None, None)}}}
    assert ranked(report)[:2] == ["b", "a"] and set(ranked(report)[2:]) == {"nan", "none"}


def test_cold_start_auc_splits_the_test_rows_by_a_field_seen_in_training(data):
    """With most test users new (a temporal split), the report gives each model's mean AUC on
    the rows of users seen in training and of new users; here popularity's, recomputed."""
    from mdmt_tf.training.compare import Comparison, cold_start_field

    assert cold_start_field(cold_start_shares(data)) is None  # the seeded random split: (almost) every id seen
    test = data.splits.test
    domains, tasks = data.vocab.domains, list(data.spec.tasks)
    domain = test["domain_id"].map({d: i for i, d in enumerate(domains)}).to_numpy()
    labels = {t: test[t].to_numpy() for t in tasks}
    unseen = np.zeros(len(test), bool)
    unseen[::3] = True  # as if a third of the test users were new
    pop = popularity_predictions(data)
    out = Comparison._cold_start_auc({"popularity": [pop]}, labels, domain, domains, tasks, "user_id", unseen)
    assert out["rows"] == {"seen": int((~unseen).sum()), "unseen": int(unseen.sum())}
    for part, rows in (("seen", ~unseen), ("unseen", unseen)):
        values = [auc(labels[t][rows & (domain == d)], pop[t][rows & (domain == d)])
                  for d in range(len(domains)) for t in tasks]
        expected = np.mean([v for v in values if v is not None])  # one-class pairs are left out
        assert out["auc"]["popularity"][part][0] == pytest.approx(expected)
