"""The TFX pipeline end to end on small data (LocalDagRunner, Beam in_memory)."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tests.pipeline.conftest import SMALL_TRAIN, make_config

pytestmark = pytest.mark.slow

COMPONENTS = ["CsvExampleGen", "StatisticsGen", "SchemaGen", "SchemaCurator", "ExampleValidator", "AnomalyGate",
              "Transform", "Tuner", "Trainer", "Evaluator", "Pusher"]
# The learning rate is pinned (to a value unlike SMALL_TRAIN's, so the Trainer provably takes
# the Tuner's): two 2-epoch trials cannot tell a learning rate that trains this tiny model in
# 3 epochs from one that does not (seed 0 draws 0.0012, which leaves it near chance).
TUNING = {"tuner": "random", "max_trials": 2, "epochs": 2,
          "fixed": {"expert_units": "16,8", "tower_units": "8", "embedding_dim": 4, "train.learning_rate": 0.01}}


def _component(execution) -> str:
    node = execution.custom_properties.get("__tfx_node_id__")
    return (node.string_value if node is not None else execution.type).rsplit(".", 1)[-1]


def _executions(metadata_path):
    from pipeline.results import store_for

    counts = {}
    for execution in store_for(metadata_path).get_executions():
        counts[_component(execution)] = counts.get(_component(execution), 0) + 1
    return counts


def _latest_states(metadata_path):
    """{component: last_known_state name of its newest execution}."""
    from ml_metadata.proto import metadata_store_pb2

    from pipeline.results import store_for

    latest = {}
    for execution in sorted(store_for(metadata_path).get_executions(), key=lambda e: e.id):
        latest[_component(execution)] = metadata_store_pb2.Execution.State.Name(execution.last_known_state)
    return latest


def _newest(pattern):
    import glob
    import os

    return Path(max(glob.glob(pattern), key=os.path.getmtime))


def _versions(config):
    return sorted(p for p in Path(config.serving_dir).iterdir() if p.name.isdigit())


def _examples(csv_path, raw_types, rows=40):
    """Serialized tf.Examples from CSV rows, typed as the model's raw schema says."""
    from tensorflow.core.example import example_pb2, feature_pb2

    table = pd.read_csv(csv_path, dtype=str).head(rows)
    out = []
    for record in table.to_dict("records"):
        feature = {}
        for name, dtype in raw_types.items():
            value = record[name]
            if dtype == "string":
                feature[name] = feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[value.encode()]))
            elif dtype == "int64":
                feature[name] = feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[int(float(value))]))
            else:
                feature[name] = feature_pb2.Feature(float_list=feature_pb2.FloatList(value=[float(value)]))
        out.append(example_pb2.Example(features=feature_pb2.Features(feature=feature)).SerializeToString())
    return out


@pytest.fixture(scope="module")
def first_run(pipeline_data, tmp_path_factory):
    from pipeline.local_runner import run

    data_root, spec = pipeline_data
    tmp = tmp_path_factory.mktemp("pipeline_run")
    config = make_config(tmp, data_root, spec, tune=True, tuning=TUNING)
    return config, run(config)


def test_every_component_runs_once_and_a_model_is_pushed(first_run, pipeline_data):
    config, summary = first_run
    counts = _executions(config.metadata_path)
    for component in COMPONENTS:
        assert counts.get(component) == 1, (component, counts)
    assert summary.blessed is True and summary.pushed_to
    versions = _versions(config)
    assert len(versions) == 1 and (versions[0] / "saved_model.pb").exists()
    assert {f"{d}/{t}" for d in ("0", "1", "2") for t in ("click", "like")} <= set(summary.auc)

    loaded = tf.saved_model.load(str(versions[0]))
    meta = json.loads((versions[0] / "assets.extra" / "mdmt.json").read_text())
    assert set(loaded.signatures) == {"serving_default", "predict_raw", "transform_features", "model_info"}
    examples = _examples(pipeline_data[0] / "test.csv", meta["raw_types"])
    out = loaded.signatures["serving_default"](examples=tf.constant(examples))
    for task in ("click", "like"):
        p = out[task].numpy()
        assert p.shape == (40,) and ((p > 0) & (p < 1)).all()
    assert (versions[0] / "assets.extra" / "tf_serving_warmup_requests").exists()
    vocabularies = [p.name for p in (versions[0] / "assets").iterdir()]  # Transform's, shipped with the model
    assert any("user_id" in name for name in vocabularies) and any("item_id" in name for name in vocabularies)
    raw = [tf.train.Example.FromString(e) for e in examples[:5]]
    for example, label in zip(raw, pd.read_csv(pipeline_data[0] / "test.csv", dtype=str)["click"].head(5)):
        example.features.feature["click"].int64_list.value.append(int(label))
        example.features.feature["like"].int64_list.value.append(0)
    transformed = loaded.signatures["transform_features"](examples=tf.constant([e.SerializeToString() for e in raw]))
    assert {"user_id", "domain_id", "age", "click"} <= set(transformed)
    assert transformed["user_id"].dtype == tf.int64 and transformed["age"].dtype == tf.float32


def test_mdmt_evaluate_and_predict_score_the_pushed_model(first_run, pipeline_data, tmp_path, capsys):
    """The pipeline's model reads its numeric-looking ids (the domain) as int64: `mdmt evaluate`
    and `mdmt predict --model-dir` score it through the same path as a `mdmt train` model
    (evaluate used to send strings and stop with a traceback), and evaluate's test AUC is the
    Evaluator's."""
    from mdmt_tf.cli import main

    config, summary = first_run
    pushed = _versions(config)[-1]
    assert json.loads((pushed / "assets.extra" / "mdmt.json").read_text())["raw_types"]["domain_id"] == "int64"
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--model-dir", str(pushed), "--data", f"csv:{pipeline_data[0]}", "--out", str(out)]) == 0
    ours = json.loads(out.read_text())["test"]["auc"]
    # TFMA's AUC sums over 10,000 thresholds: on a slice of ~120 test rows with ~9 positives
    # (~1,000 pairs) two scores in one bucket move it by 0.001 a pair; ours is exact
    for pair, value in summary.auc.items():
        if "/" in pair and pair in ours:
            assert ours[pair] == pytest.approx(value, abs=5e-3), pair
    predictions = tmp_path / "pred.csv"
    assert main(["predict", "--model-dir", str(pushed), "--data", str(pipeline_data[0] / "test.csv"),
                 "--out", str(predictions)]) == 0
    scored = pd.read_csv(predictions)
    assert len(scored) == len(pd.read_csv(pipeline_data[0] / "test.csv")) and set(scored) == {"click", "like"}


def test_the_trainer_uses_the_tuners_best_hyperparameters(first_run):
    import glob

    import keras_tuner as kt

    config, _ = first_run
    best_file = glob.glob(f"{config.pipeline_root}/Tuner/best_hyperparameters/*/best_hyperparameters.txt")
    best = kt.HyperParameters.from_config(json.loads(Path(best_file[0]).read_text())).values
    trained = json.loads(Path(glob.glob(f"{config.pipeline_root}/Trainer/model_run/*/metrics.json")[0]).read_text())
    assert trained["model_config"]["params"]["num_experts"] == best["num_experts"]
    assert trained["config"]["learning_rate"] == pytest.approx(best["train.learning_rate"])


def test_a_model_below_the_threshold_is_not_pushed(first_run):
    from pipeline.local_runner import run

    config, _ = first_run
    strict = dataclasses.replace(config, auc_floor=0.99)
    summary = run(strict)
    assert summary.blessed is False and summary.pushed_to is None
    assert len(_versions(config)) == 1  # the earlier push stays, nothing new
    states = _latest_states(config.metadata_path)  # same data and training: TFX's cache
    for component in ("CsvExampleGen", "Transform", "Tuner", "Trainer"):
        assert states[component] == "CACHED", (component, states)
    assert states["Evaluator"] == "COMPLETE"  # the thresholds changed


def test_a_regression_against_the_blessed_model_is_not_pushed(first_run):
    """An M3oE Trainer that barely trains (weight lr 1e-7) clears an AUC floor of 0 but
    drops against the last blessed model: the change threshold refuses it. The same run
    shows the Trainer's bi-level search: alpha / beta moved from sigma(1)."""
    import tensorflow_model_analysis as tfma

    from pipeline.local_runner import run

    config, _ = first_run
    worse = dataclasses.replace(
        config, tune=False, auc_floor=0.0, max_auc_drop=0.0,
        model={"name": "m3oe", "params": {"bottom_units": [16, 8], "expert_units": [8, 4], "tower_units": [4],
                                          "embedding_dim": 4}},
        train={"epochs": 1, "batch_size": 256, "learning_rate": 1e-7, "patience": 1, "arch_mode": "bilevel"})
    summary = run(worse)
    assert summary.blessed is False and summary.pushed_to is None
    assert len(_versions(config)) == 1
    validation = tfma.load_validation_result(str(_newest(f"{config.pipeline_root}/Evaluator/evaluation/*")))
    assert not validation.validation_ok
    failed = [f for slice_failures in validation.metric_validations_per_slice for f in slice_failures.failures]
    assert failed and all(f.metric_key.is_diff for f in failed)  # the change threshold, not the floor
    trained = json.loads((_newest(f"{config.pipeline_root}/Trainer/model_run/*") / "metrics.json").read_text())
    assert trained["model"] == "m3oe" and trained["steps"]["architecture"] == trained["steps"]["weight"] > 0
    assert trained["arch"]["alpha"]["domain"] != pytest.approx(0.7310586, abs=1e-4)


def test_anomalies_stop_the_run_before_training(first_run, pipeline_data, tmp_path):
    from pipeline.local_runner import run
    from pipeline.schema_rules import DataAnomaliesError

    config, _ = first_run
    data_root, spec = pipeline_data
    bad = tmp_path / "bad"
    shutil.copytree(data_root, bad)
    train = pd.read_csv(bad / "train.csv", dtype=str)
    train.loc[5, "like"] = "2"  # a label outside {0, 1}
    train.to_csv(bad / "train.csv", index=False)
    before = _executions(config.metadata_path)
    with pytest.raises(Exception) as err:
        run(dataclasses.replace(config, data_root=str(bad), auc_floor=0.5))
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    anomaly = next(e for e in chain if type(e).__name__ == DataAnomaliesError.__name__)
    assert "feature 'like'" in str(anomaly) and "split 'train'" in str(anomaly)
    after = _executions(config.metadata_path)
    assert after.get("Trainer") == before.get("Trainer")  # no training
    assert after.get("Pusher") == before.get("Pusher")
    assert len(_versions(config)) == 1  # the previously pushed model stays


def test_kubeflow_compile_names_every_component(pipeline_data, tmp_path):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipeline.kubeflow_runner import compile_pipeline

    data_root, spec = pipeline_data
    config = make_config(tmp_path, data_root, spec)
    path = compile_pipeline(config, tmp_path / "kfp" / "pipeline.json", image="example.com/mdmt:test")
    job = json.loads(path.read_text())
    parsed = json_format.ParseDict(job["pipelineSpec"], pipeline_spec_pb2.PipelineSpec())
    tasks = set(parsed.root.dag.tasks)
    for component in COMPONENTS:
        if component != "Tuner":  # compiled without --tune
            assert component in tasks
    assert "example.com/mdmt:test" in path.read_text()


@pytest.mark.ml100k
def test_pipeline_on_movielens(ml100k_dir, tmp_path):
    from mdmt_tf.cli.pipeline import prepare_data
    from pipeline.local_runner import run

    data_root, spec = prepare_data(f"ml100k:{ml100k_dir}", tmp_path, None)
    config = make_config(tmp_path, data_root, spec, train={"epochs": 2, "batch_size": 1024, "patience": 2})
    summary = run(config)
    assert {"<25/click", "25-34/like", ">=35/click"} <= set(summary.auc)
    assert summary.auc["(all)/click"] > 0.6
    assert summary.blessed is True and summary.pushed_to


def test_tfrecord_inputs_and_a_curated_schema(first_run, pipeline_data, tmp_path):
    """ImportExampleGen reads train/val/test .tfrecord files; ImportSchemaGen takes a schema
    the user curated in place of inference. The first run's curated schema (from CSV, where
    the domain column reads as INT) does not fit records that carry the domain as bytes: the
    run stops at the validator naming the feature; with the type fixed it trains and pushes
    (exporting in bfloat16 here, so the Evaluator and Pusher see a bf16 SavedModel too)."""
    import glob

    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    from mdmt_tf.data.readers import write_tfrecord
    from mdmt_tf.spec import DatasetSpec
    from pipeline.local_runner import run
    from pipeline.schema_rules import DataAnomaliesError

    config, _ = first_run
    data_root, spec = pipeline_data
    records = tmp_path / "records"
    records.mkdir()
    for split in ("train", "val", "test"):
        write_tfrecord(pd.read_csv(data_root / f"{split}.csv", dtype=str), records / f"{split}.tfrecord",
                       DatasetSpec.from_dict(spec))
    from_csv = glob.glob(f"{config.pipeline_root}/SchemaCurator/curated_schema/*/schema.pbtxt")[0]
    fresh = make_config(tmp_path, records, spec, schema_path=from_csv)
    with pytest.raises(DataAnomaliesError, match=r"feature 'domain_id': Unexpected data type \(Expected data of "
                                                 r"type: INT but got STRING\)"):
        run(fresh)
    assert "Trainer" not in _executions(fresh.metadata_path)

    schema = text_format.Parse(Path(from_csv).read_text(), schema_pb2.Schema())
    domain = next(f for f in schema.feature if f.name == "domain_id")
    domain.type = schema_pb2.BYTES
    domain.ClearField("int_domain")
    fixed = tmp_path / "schema.pbtxt"
    fixed.write_text(text_format.MessageToString(schema))
    # with the spec's vocabulary rules: user_id hashed, item_id its 150 most frequent + 4 OOV buckets
    vocab = {"user_id": {"hash_bins": 101}, "item_id": {"top_k": 150, "oov_buckets": 4}}
    summary = run(dataclasses.replace(fresh, schema_path=str(fixed), spec={**spec, "vocab": vocab},
                                      train={**SMALL_TRAIN, "serving_precision": "bfloat16"}))
    counts = _executions(fresh.metadata_path)
    assert counts.get("ImportExampleGen") == counts.get("ImportSchemaGen") == 2  # one per run
    assert "SchemaGen" not in counts and "CsvExampleGen" not in counts and counts.get("Trainer") == 1
    assert summary.blessed is True and len(_versions(fresh)) == 1
    assert {f"{d}/{t}" for d in ("0", "1", "2") for t in ("click", "like")} <= set(summary.auc)
    pushed = Path(summary.pushed_to)
    assert json.loads((pushed / "assets.extra" / "mdmt.json").read_text())["serving_precision"] == "bfloat16"
    # the served model applies the same rules as the library (mdmt_tf.data.idmap)
    from mdmt_tf.data.idmap import hashed_ids

    test = pd.read_csv(data_root / "test.csv", dtype=str).head(40)
    loaded = tf.saved_model.load(str(pushed))
    raw_types = json.loads((pushed / "assets.extra" / "mdmt.json").read_text())["raw_types"]
    examples = [tf.train.Example.FromString(e) for e in _examples(data_root / "test.csv", raw_types)]
    for example in examples:
        example.features.feature["click"].int64_list.value.append(0)
        example.features.feature["like"].int64_list.value.append(0)
    ids = loaded.signatures["transform_features"](examples=tf.constant([e.SerializeToString() for e in examples]))
    np.testing.assert_array_equal(ids["user_id"].numpy().reshape(-1),
                                  hashed_ids(tf.constant(test["user_id"].tolist()), 101).numpy())
    items = ids["item_id"].numpy().reshape(-1)
    assert items.max() < 150 + 4 and (items >= 4).any()
