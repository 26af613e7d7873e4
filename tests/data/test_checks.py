"""mdmt_tf.data.checks: nested labels for cascade models (ESMM)."""

import numpy as np
import pandas as pd
import pytest

from mdmt_tf.data.checks import check_cascade, check_nested_labels, model_is_cascade, unnested_rows
from mdmt_tf.data.dataset import MDMTData
from mdmt_tf.data.sources import load_source
from mdmt_tf.data.table import ROW
from mdmt_tf.errors import DataError, MdmtError
from mdmt_tf.models import ModelConfig


def _labels(**columns):
    return {k: np.asarray(v, dtype=np.float32) for k, v in columns.items()}


def unnest_csv(directory, positions):
    """Set like=1 on the train.csv data rows at `positions` (0-based), which have click=0;
    returns their CSV line numbers (header = line 1)."""
    path = directory / "train.csv"
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert (table.loc[positions, "click"] == "0").all()
    table.loc[positions, "like"] = "1"
    table.to_csv(path, index=False)
    return [p + 2 for p in positions]


def _click_zero_positions(directory, count, start=50):
    table = pd.read_csv(directory / "train.csv", dtype=str, keep_default_na=False)
    return [int(i) for i in np.flatnonzero(table["click"].to_numpy() == "0") if i >= start][:count]


def test_nested_labels_pass():
    check_nested_labels(_labels(click=[1, 1, 0, 0], like=[1, 0, 0, 0]), ("click", "like"))
    check_nested_labels(_labels(click=[0, 1], like=[0, 1], buy=[0, 1]), ("click", "like", "buy"))
    check_nested_labels(_labels(click=[0, 1]), ("click",))  # one task: nothing to nest


def test_names_the_first_offending_row_and_the_pair():
    labels = _labels(click=[1, 0, 1, 0, 0], like=[1, 0, 0, 1, 1])
    with pytest.raises(DataError) as err:
        check_nested_labels(labels, ("click", "like"), rows=np.array([2, 3, 4, 5, 6]), source="train.csv",
                            model="esmm")
    message = str(err.value)
    assert message.startswith("train.csv, row 5: like=1 but click=0 (1 more row(s) like it); "
                              "model esmm is a cascade click -> like and needs nested labels (every like is a click)")
    assert "--param allow_unnested=true" in message
    assert isinstance(err.value, MdmtError) and err.value.row == 5 and err.value.source == "train.csv"


def test_without_row_numbers_names_the_training_example():
    with pytest.raises(DataError, match=r"^training example 3: like=1 but click=0; a cascade click -> like ") as err:
        check_nested_labels(_labels(click=[1, 0, 0], like=[1, 0, 1]), ("click", "like"))
    assert err.value.row == 3


def test_three_tasks_check_each_consecutive_pair():
    tasks = ("click", "like", "buy")
    # row 2 breaks like -> buy only (buy without like, although clicked); row 3 click -> like
    labels = _labels(click=[1, 1, 1, 0], like=[1, 1, 0, 1], buy=[0, 1, 1, 1])
    with pytest.raises(DataError, match=r"^training example 3: buy=1 but like=0; a cascade click -> like -> buy "
                                        r"and needs nested labels \(every buy is a like\)"):
        check_nested_labels(labels, tasks)
    labels = _labels(click=[1, 1, 0], like=[1, 1, 1], buy=[0, 1, 1])  # buy nested in like, like not in click
    with pytest.raises(DataError, match=r"^training example 3: like=1 but click=0; "):
        check_nested_labels(labels, tasks)
    pairs = unnested_rows(_labels(click=[0, 1, 0], like=[1, 0, 1], buy=[0, 1, 1]), tasks)
    assert [(p, c, i.tolist()) for p, c, i in pairs] == [("click", "like", [0, 2]), ("like", "buy", [1])]


def test_csv_error_names_the_line_of_train_csv(csv_dir):
    positions = _click_zero_positions(csv_dir, 2)
    lines = unnest_csv(csv_dir, positions)
    spec, splits = load_source(f"csv:{csv_dir}")
    data = MDMTData.build(spec, splits)
    assert data.splits.train[ROW].iloc[positions[0]] == lines[0]
    with pytest.raises(DataError) as err:
        check_nested_labels(data.labels("train"), spec.tasks, rows=data.splits.train[ROW].to_numpy(),
                            source=splits.sources["train"], model="esmm")
    assert str(err.value).startswith(f"{csv_dir / 'train.csv'}, row {lines[0]}: like=1 but click=0 "
                                     "(1 more row(s) like it); model esmm is a cascade click -> like")
    # check_cascade: the same error from a run's data, only for cascade models
    labels = data.labels("train")
    with pytest.raises(DataError, match=rf"train\.csv, row {lines[0]}: like=1 but click=0"):
        check_cascade(ModelConfig("esmm"), spec.tasks, labels, data)
    with pytest.raises(DataError, match=rf"^training example {positions[0] + 1}: like=1 but click=0"):
        check_cascade(ModelConfig("esmm"), spec.tasks, labels)  # no MDMTData (the pipeline): position in the split
    check_cascade(ModelConfig("mmoe"), spec.tasks, labels, data)


def test_allow_unnested_reports_one_line(small_data, caplog):
    labels = {t: v.copy() for t, v in small_data.labels("train").items()}
    tasks = small_data.spec.tasks
    config = ModelConfig("esmm", {"allow_unnested": True})
    with caplog.at_level("INFO", logger="mdmt_tf"):
        check_cascade(config, tasks, labels, small_data)  # the synthetic labels are nested
    assert caplog.records == []
    clicked = np.flatnonzero(labels["click"] == 0)[:3]
    labels["like"][clicked] = 1
    with caplog.at_level("INFO", logger="mdmt_tf"):
        check_cascade(config, tasks, labels, small_data)
    (record,) = caplog.records
    assert record.levelname == "WARNING" and record.getMessage().startswith(
        "esmm: the training labels are not nested: 3 of")
    assert "(like=1 but click=0: 3)" in record.getMessage()
    with pytest.raises(DataError):
        check_cascade(ModelConfig("esmm"), tasks, labels, small_data)


def test_cascade_models_declare_it():
    assert model_is_cascade(ModelConfig("esmm"))
    assert not any(model_is_cascade(ModelConfig(name)) for name in ("m3oe", "mmoe", "ple", "mlp", "stem"))
    assert ModelConfig("esmm").resolved_params()["allow_unnested"] is False
    assert ModelConfig("esmm", {"allow_unnested": True}).resolved_params()["allow_unnested"] is True
