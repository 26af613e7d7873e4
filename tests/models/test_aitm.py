"""AITM (mdmt_tf.models.cascade): the calibrator's loss, the attention's weights, and
information flowing forward only (task 0 owes nothing to task 1's weights)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.data.checks import model_is_cascade
from mdmt_tf.errors import ConfigError
from mdmt_tf.models import ModelConfig, build_model
from tests.models.conftest import take

SMALL = {"embedding_dim": 4, "tower_units": [8, 4]}


def _model(encoded, **params):
    keras.utils.set_random_seed(0)
    return build_model("aitm", encoded[0], {**SMALL, **params})


def _features(encoded, rows=64):
    features, _ = take(*encoded[1]["train"], np.arange(rows))
    return {k: tf.constant(v) for k, v in features.items()}


def test_the_calibrator_penalises_a_later_step_likelier_than_the_one_before(encoded):
    model = _model(encoded, calibrator_weight=0.5)
    features = _features(encoded)
    out = model(features, training=True)
    click, like = (out[t].numpy().ravel() for t in encoded[0].tasks)
    expected = 0.5 * np.mean(np.maximum(like - click, 0.0))
    assert len(model.losses) == 1  # the calibrator (the embeddings' L2 is off by default)
    assert float(model.losses[-1]) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    model(features, training=False)
    assert not model.losses  # only in training
    assert model_is_cascade(ModelConfig("aitm"))


def test_attention_weights_and_forward_only_transfer(encoded):
    model = _model(encoded)
    features = _features(encoded)
    _, details = model.forward(features)
    weight = details.extra["transfer_weight"].numpy()
    assert weight.shape == (64, 1) and ((weight > 0) & (weight < 1)).all()
    tasks = encoded[0].tasks
    later = [v for v in model.weight_variables if any(k in v.path for k in ("transfer_1", "ait_h", "head_1"))]
    assert len(later) == 10  # the second task's transfer layer, h1, h2, h3 and head (kernel, bias)
    with tf.GradientTape(persistent=True) as tape:
        out = model(features)
        first, second = tf.reduce_sum(out[tasks[0]]), tf.reduce_sum(out[tasks[1]])
    for variable, g in zip(later, tape.gradient(first, [v.value for v in later])):
        assert g is None or not np.any(tf.convert_to_tensor(g).numpy()), variable.path
    towers = model.towers.kernels[0]
    grad = tape.gradient(second, towers.value).numpy()
    assert np.abs(grad[0]).sum() > 0 and np.abs(grad[1]).sum() > 0  # task 1 reads task 0's tower via p


def test_aitm_needs_two_tasks_and_a_valid_weight(encoded):
    from mdmt_tf.models import FeatureSchema

    schema = encoded[0]
    one = FeatureSchema(domain=schema.domain, domains=schema.domains, tasks=schema.tasks[:1], sparse=schema.sparse,
                        dense=schema.dense)
    with pytest.raises(ConfigError, match="1 task"):
        build_model("aitm", one, SMALL)
    with pytest.raises(ConfigError, match="calibrator_weight"):
        ModelConfig("aitm", {"calibrator_weight": -1})
