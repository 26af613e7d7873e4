"""End to end: train() writes metrics.json, plots, a SavedModel, and resumes after an interruption."""
import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.data.dataset import label_arrays, raw_feature_arrays
from mdmt_tf.errors import ConfigError
from mdmt_tf.models import ModelConfig
from mdmt_tf.training.config import TrainConfig
from mdmt_tf.training.fit import train

pytestmark = pytest.mark.slow

SMALL = {"bottom_units": [32, 16], "expert_units": [16, 8], "tower_units": [8], "embedding_dim": 4}
CONFIG = TrainConfig(epochs=2, batch_size=256, patience=5)


def _schema_of(split: dict, domains, tasks):
    assert set(split) >= {"auc", "logloss", "mean_auc", "mean_logloss"}
    keys = {f"{d}/{t}" for d in domains for t in tasks}
    assert set(split["auc"]) == keys and set(split["logloss"]) == keys
    assert all(isinstance(v, float) for v in split["auc"].values())
    assert isinstance(split["mean_auc"], float) and isinstance(split["mean_logloss"], float)


def test_train_writes_the_documented_outputs(data, tmp_path):
    # bilevel: the outputs of a search too (architecture steps, their trajectories)
    payload = train(ModelConfig("m3oe", SMALL), data, dataclasses.replace(CONFIG, arch_mode="bilevel"), tmp_path,
                    source="small", verbose=0)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == payload
    domains, tasks = data.vocab.domains, list(data.spec.tasks)
    assert payload["model"] == "m3oe"
    for split in ("val", "test"):
        _schema_of(payload[split], domains, tasks)
    assert set(payload["arch"]) >= {"alpha", "beta"}
    assert set(payload["arch"]["alpha"]) == {"domain", "task"} and 0 < payload["arch"]["beta"]["task"] < 1
    assert payload["train_seconds"] > 0 and payload["train_examples_per_second"] > 0
    rows = payload["data"]["rows"]["train"]
    weight_rows = rows - round(0.1 * rows)  # the default arch data: 10 % of training held out for alpha / beta
    steps = 2 * -(-weight_rows // 256)  # 2 epochs, batches of 256
    assert payload["steps"] == {"weight": steps, "architecture": steps} and payload["replicas"] == 1
    assert any((tmp_path / "logs").rglob("events.out.tfevents.*"))  # TensorBoard
    for plot in ("auc_heatmap", "training_curves", "arch_trajectories", "gate_utilisation"):
        assert (tmp_path / "plots" / f"{plot}.png").stat().st_size > 5000

    # the SavedModel: both signatures agree with each other and with the metrics
    loaded = tf.saved_model.load(str(tmp_path / "model"))
    assert set(loaded.signatures) == {"serving_default", "predict_raw", "model_info"}
    table = data.splits.test
    raw = raw_feature_arrays(table, data.spec)
    out_raw = loaded.signatures["predict_raw"](**{k: tf.constant(v) for k, v in raw.items()})
    from mdmt_tf.data.readers import example_bytes

    out_ex = loaded.signatures["serving_default"](examples=tf.constant(example_bytes(table, data.spec)))
    for task in tasks:
        np.testing.assert_allclose(out_ex[task].numpy(), out_raw[task].numpy(), rtol=1e-6)
    from mdmt_tf.training.evaluation import evaluate

    labels = label_arrays(table, data.spec)
    index = table[data.spec.domain].map({d: i for i, d in enumerate(domains)}).to_numpy()
    again = evaluate({t: out_raw[t].numpy() for t in tasks}, labels, index, domains, tasks)
    for key, value in payload["test"]["auc"].items():
        assert again["auc"][key] == pytest.approx(value, abs=1e-6)


class _Crash(keras.callbacks.Callback):
    """Interrupts after epoch 2, once that epoch's checkpoint is written (it runs after the
    checkpointing callback), remembering the weights that were checkpointed."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            self.weights = [np.array(v) for v in self.model.net.trainable_variables]
            raise KeyboardInterrupt("simulated interruption after epoch 2")


class _FirstWeights(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = [np.array(v) for v in self.model.net.trainable_variables]
        self.initial_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.initial_epoch is None:
            self.initial_epoch = epoch


def test_interrupted_run_resumes_from_its_last_checkpoint(data, tmp_path, caplog):
    config = TrainConfig(epochs=4, batch_size=256, patience=5)
    model = ModelConfig("mmoe", {"expert_units": [16, 8], "tower_units": [8], "embedding_dim": 4})
    crash = _Crash()
    with pytest.raises(KeyboardInterrupt):
        train(model, data, config, tmp_path, source="small", verbose=0, callbacks=[crash])
    state = json.loads((tmp_path / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 2 and not (tmp_path / "metrics.json").exists()

    probe = _FirstWeights()
    with caplog.at_level("INFO", logger="mdmt_tf"):
        payload = train(model, data, config, tmp_path, source="small", verbose=0, callbacks=[probe])
    assert any(r.getMessage().startswith(f"resuming {tmp_path} after epoch 2") for r in caplog.records)
    assert probe.initial_epoch == 2 and payload["epochs_trained"] == 4
    assert len(payload["history"]) == 4
    assert len(probe.weights) == len(crash.weights)
    for resumed, saved in zip(probe.weights, crash.weights):
        np.testing.assert_array_equal(resumed, saved)

    with pytest.raises(ConfigError, match="learning_rate"):
        train(model, data, TrainConfig(epochs=4, batch_size=256, learning_rate=0.01), tmp_path, source="small",
              verbose=0)


def test_mamdr_strategy_end_to_end(data, tmp_path):
    model = ModelConfig("shared_bottom", {"bottom_units": [16], "tower_units": [8], "embedding_dim": 4})
    # One epoch at the default inner lr 0.001 left this model at chance (measured before
    # MAMDR's full-pass granularity: test mean AUC 0.49-0.52 over seeds 0-2); 2 epochs at 0.05
    # clear the bars (test is 300 rows, hence the lower bar there).
    config = TrainConfig.from_dict({"epochs": 2, "batch_size": 128, "strategy": "mamdr", "mamdr": {"inner_lr": 0.05}})
    payload = train(model, data, config, tmp_path, source="small", verbose=0)
    assert payload["val"]["mean_auc"] > 0.6 and payload["test"]["mean_auc"] > 0.5
    loaded = tf.saved_model.load(str(tmp_path / "model"))
    raw = raw_feature_arrays(data.splits.test.head(10), data.spec)
    out = loaded.signatures["predict_raw"](**{k: tf.constant(v) for k, v in raw.items()})
    assert out["click"].shape == (10,)


def test_runs_from_before_a_new_setting_resume(data, tmp_path):
    """A run_config.json written before a TrainConfig field existed still matches when the
    new field is at its default."""
    model = ModelConfig("mmoe", {"expert_units": [16, 8], "tower_units": [8], "embedding_dim": 4})
    config = TrainConfig(epochs=1, batch_size=256)
    train(model, data, config, tmp_path, source="small", verbose=0, export=False, plots=False)
    run_config = json.loads((tmp_path / "run_config.json").read_text())
    del run_config["train"]["distribute"]  # as an older version wrote it
    del run_config["train"]["mamdr"]["granularity"]  # a nested setting too
    (tmp_path / "run_config.json").write_text(json.dumps(run_config))
    again = train(model, data, config, tmp_path, source="small", verbose=0, export=False, plots=False)
    assert again["epochs_trained"] == 1


def test_pepnet_run_plots_its_gate_nu_scalings(data, tmp_path):
    model = ModelConfig("pepnet", {"tower_units": [8], "gate_hidden_units": 8, "embedding_dim": 4})
    train(model, data, TrainConfig(epochs=1, batch_size=256), tmp_path, source="small", verbose=0)
    assert (tmp_path / "plots" / "gate_nu.png").stat().st_size > 5000
    assert not (tmp_path / "plots" / "gate_utilisation.png").exists()  # no softmax gates to draw


def _checkpoint_dtypes(model_dir):
    reader = tf.train.load_checkpoint(str(model_dir / "variables" / "variables"))
    return {name: dtype.name for name, dtype in reader.get_variable_to_dtype_map().items()
            if name.startswith("model/") and "OPTIMIZER" not in name}


def _predict_raw(model_dir, table, spec):
    loaded = tf.saved_model.load(str(model_dir))
    raw = raw_feature_arrays(table, spec)
    out = loaded.signatures["predict_raw"](**{k: tf.constant(v) for k, v in raw.items()})
    return {k: v.numpy() for k, v in out.items()}


def test_a_bfloat16_serving_export_scores_like_the_float32_model(data, tmp_path):
    model = ModelConfig("m3oe", SMALL)
    config = TrainConfig(epochs=2, batch_size=256, learning_rate=0.01, serving_precision="bfloat16")
    payload = train(model, data, config, tmp_path, source="small", verbose=0, plots=False, save_predictions=True)
    served = payload["serving"]
    assert served["precision"] == "bfloat16"
    assert 0 < served["test_max_abs_diff"] < 0.02  # bf16 rounding shows, and stays small
    # (AUC on 300 test rows moves by a few 1e-3 when near-tied scores swap)
    assert served["test_mean_auc"] == pytest.approx(payload["test"]["mean_auc"], abs=0.02)
    dtypes = _checkpoint_dtypes(tmp_path / "model")
    kernels = {n: d for n, d in dtypes.items() if "kernel" in n}
    assert kernels and set(kernels.values()) == {"bfloat16"}
    meta = json.loads((tmp_path / "model" / "assets.extra" / "mdmt.json").read_text())
    assert meta["serving_precision"] == "bfloat16"
    # the SavedModel scores as the float32 model evaluated for metrics.json, to bf16 rounding
    float32 = np.load(tmp_path / "test_predictions.npz")
    out = _predict_raw(tmp_path / "model", data.splits.test, data.spec)
    for task in data.spec.tasks:
        assert 0 < np.max(np.abs(out[task] - float32[task])) < 0.02

    # the serving precision may change on a rerun: it re-exports without training again
    again = train(model, data, TrainConfig(epochs=2, batch_size=256, learning_rate=0.01), tmp_path, source="small",
                  verbose=0, plots=False)
    assert again["serving"] == {"precision": "float32"} and again["test"] == payload["test"]
    assert set(_checkpoint_dtypes(tmp_path / "model").values()) == {"float32"}
    out = _predict_raw(tmp_path / "model", data.splits.test, data.spec)
    for task in data.spec.tasks:
        np.testing.assert_allclose(out[task], float32[task], rtol=1e-5, atol=1e-6)


def test_a_bfloat16_export_of_domain_regularized_weights(data, tmp_path):
    """DR serves theta + theta_d: the bf16 export carries the deltas in bf16 too."""
    model = ModelConfig("shared_bottom", {"bottom_units": [16], "tower_units": [8], "embedding_dim": 4})
    config = TrainConfig.from_dict({"epochs": 1, "batch_size": 128, "strategy": "dr", "mamdr": {"inner_lr": 0.05},
                                    "serving_precision": "bfloat16"})
    payload = train(model, data, config, tmp_path, source="small", verbose=0, plots=False)
    assert 0 < payload["serving"]["test_max_abs_diff"] < 0.02
    deltas = {n: d for n, d in _checkpoint_dtypes(tmp_path / "model").items() if "delta" in n}
    assert deltas and set(deltas.values()) == {"bfloat16"}


def test_config_values_from_yaml_are_typed():
    """A YAML config may hold 1e-3 as a string (YAML 1.1 needs a dot); a value of the wrong type
    is a ConfigError naming the setting, not a TypeError from a comparison."""
    config = TrainConfig.from_dict({"learning_rate": "1e-3", "epochs": 3.0, "mamdr": {"inner_lr": "2e-2"}})
    assert config.learning_rate == 1e-3 and config.epochs == 3 and config.mamdr.inner_lr == 0.02
    for bad, message in (({"learning_rate": "fast"}, "train.learning_rate='fast' must be a number"),
                         ({"epochs": 2.5}, "train.epochs=2.5 must be an integer"),
                         ({"mamdr": {"k": "two"}}, "train.mamdr.k='two' must be an integer"),
                         ({"epoch": 3}, "train: unknown setting(s) ['epoch']")):
        with pytest.raises(ConfigError) as err:
            TrainConfig.from_dict(bad)
        assert message in str(err.value)


def test_an_unknown_serving_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="serving precision must be one of"):
        TrainConfig(serving_precision="float16")


@pytest.mark.parametrize("name", ["run_config.json", "checkpoints/state.json"])
def test_a_truncated_run_state_file_is_named(data, tmp_path, name):
    """Run state is written by rename (never half a file); one damaged by hand or by a full
    disk is a ConfigError naming it, not a raw JSONDecodeError."""
    model = ModelConfig("mmoe", {"expert_units": [8], "tower_units": [4], "embedding_dim": 4})
    config = TrainConfig(epochs=1, batch_size=512)
    train(model, data, config, tmp_path, source="small", verbose=0, export=False, plots=False)
    assert not [p.name for p in tmp_path.rglob("*.tmp")]  # no temporary file left behind
    path = tmp_path / name
    path.write_text(path.read_text()[: len(path.read_text()) // 2])
    with pytest.raises(ConfigError, match=rf"{path} is not valid JSON .*delete the run directory"):
        train(model, data, config, tmp_path, source="small", verbose=0, export=False, plots=False)


def test_json_files_are_written_atomically(tmp_path, monkeypatch):
    """An interrupted write leaves the previous file whole."""
    import os

    from mdmt_tf.files import read_json, write_json

    path = tmp_path / "state.json"
    write_json(path, {"epoch": 1})

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"epoch": 2})
    assert read_json(path) == {"epoch": 1} and [p.name for p in tmp_path.iterdir()] == ["state.json"]
