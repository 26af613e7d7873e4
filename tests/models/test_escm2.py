"""ESCM² (ESMM's counterfactual="ips"|"dr"; the `escm2` model): the regulariser's value
written out in NumPy, the stop-gradients of its propensity and imputation terms, and the
trainers (MDMTTrainer, MAMDR's stateless loss) adding it to training passes only."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.data.checks import model_is_cascade
from mdmt_tf.errors import ConfigError
from mdmt_tf.models import FeatureSchema, ModelConfig, build_model
from mdmt_tf.training.mamdr import MAMDRTrainer
from mdmt_tf.training.trainer import MDMTTrainer
from tests.models.conftest import take

SMALL = {"embedding_dim": 4, "tower_units": [8]}
CLIP = 0.05


def _model(encoded, **params):
    keras.utils.set_random_seed(0)
    return build_model("esmm", encoded[0], {**SMALL, **params})


def _batch(encoded, rows=96):
    """A training batch with nested labels (every like is a click)."""
    schema = encoded[0]
    features, labels = take(*encoded[1]["train"], np.arange(rows))
    first, second = schema.tasks[:2]
    labels = {first: labels[first].astype("float32"),
              second: (labels[second] * labels[first]).astype("float32")}
    assert labels[first].sum() > 5 and labels[second].sum() > 0 and (labels[first] == 0).sum() > 5
    return ({k: tf.constant(v) for k, v in features.items()}, {k: tf.constant(v) for k, v in labels.items()})


def _ce(target, p):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return -(target * np.log(p) + (1 - target) * np.log(1 - p))


def _domain_means(values, domain, num_domains):
    return sum(values[domain == d].mean() for d in range(num_domains) if (domain == d).any())


def _expected(model, features, labels, mode, weight):
    schema = model.schema
    _, details = model.forward(features, training=True)
    c = details.extra["conditional"].numpy()[:, 1]
    p0 = details.extra["conditional"].numpy()[:, 0]  # p(task_0): the propensity of step 1
    o, y = (labels[t].numpy() for t in schema.tasks[:2])
    phat = np.clip(p0, CLIP, 1.0)
    error = _ce(y, c)
    if mode == "ips":
        term = o * error / phat
    else:
        imputed = details.extra["imputed"].numpy()[:, 0]
        ehat = _ce(imputed, c)
        term = ehat + o * (error - ehat) / phat + o * (error - ehat) ** 2 / phat
    return weight * _domain_means(term, features[schema.domain].numpy(), schema.num_domains)


@pytest.mark.parametrize("mode", ["ips", "dr"])
def test_the_counterfactual_regulariser_written_out(encoded, mode):
    model = _model(encoded, counterfactual=mode, counterfactual_weight=0.7, propensity_clip=CLIP)
    features, labels = _batch(encoded)
    model(features, training=True, labels=labels)
    assert len(model.losses) == 1
    assert float(model.losses[0]) == pytest.approx(_expected(model, features, labels, mode, 0.7), rel=1e-5)
    model(features, training=True)  # no labels: nothing to add
    assert not model.losses
    model(features, training=False, labels=labels)  # inference: nothing to add
    assert not model.losses
    plain = _model(encoded)  # ESMM: no regulariser
    plain(features, training=True, labels=labels)
    assert not plain.losses


def test_the_propensity_is_a_constant_and_the_imputation_learns_from_its_own_term(encoded):
    model = _model(encoded, counterfactual="dr")
    features, labels = _batch(encoded)
    towers, imputation = model.towers.kernels[-1], model.imputation.kernels[-1]
    with tf.GradientTape(persistent=True) as tape:
        model(features, training=True, labels=labels)
        loss = model.losses[0]
    grad = tape.gradient(loss, towers.value).numpy()
    assert not np.any(grad[0, 0])  # the click tower is only the propensity: stop_gradient
    assert np.abs(grad[0, 1]).sum() > 0  # the conditional tower learns
    assert np.abs(tape.gradient(loss, imputation.value).numpy()).sum() > 0
    # no exposed row: the imputation terms vanish, the tower still gets the imputed errors
    unexposed = {t: tf.zeros_like(v) for t, v in labels.items()}
    with tf.GradientTape() as tape:
        model(features, training=True, labels=unexposed)
        loss = model.losses[0]
    grads = tape.gradient(loss, [towers.value, imputation.value])
    assert np.abs(grads[0].numpy()[0, 1]).sum() > 0
    assert grads[1] is None or not np.any(tf.convert_to_tensor(grads[1]).numpy())


def test_the_trainers_add_it_to_training_passes(encoded):
    features, labels = _batch(encoded)
    model = _model(encoded, counterfactual="ips")
    trainer = MDMTTrainer(model)
    total, loss = trainer.loss_of(features, labels, training=True)
    expected = _expected(model, features, labels, "ips", 0.5)
    assert float(total) - float(loss) == pytest.approx(expected, rel=1e-4)
    total, loss = trainer.loss_of(features, labels, training=False)
    assert float(total) == pytest.approx(float(loss))
    mamdr = MAMDRTrainer(_model(encoded, counterfactual="ips"), strategy="dn", granularity="batch")
    values = [v.value for v in mamdr.net.trainable_variables]
    total, loss = mamdr._loss(features, labels, values)
    assert float(total) - float(loss) == pytest.approx(expected, rel=1e-4)


def test_escm2_is_registered_as_a_dr_cascade_and_checks_its_params(encoded):
    assert ModelConfig("escm2").resolved_params()["counterfactual"] == "dr"
    assert model_is_cascade(ModelConfig("escm2"))
    _, details = build_model("escm2", encoded[0], SMALL).forward(_batch(encoded)[0])
    assert details.extra["imputed"].shape == (96, encoded[0].num_tasks - 1)
    with pytest.raises(ConfigError, match="propensity_clip"):
        ModelConfig("esmm", {"counterfactual": "ips", "propensity_clip": 0})
    with pytest.raises(ConfigError, match="counterfactual"):
        ModelConfig("esmm", {"counterfactual": "snips"})
    with pytest.raises(ConfigError, match="contradict"):
        ModelConfig("escm2", {"counterfactual": "ips"})
    schema = encoded[0]
    one = FeatureSchema(domain=schema.domain, domains=schema.domains, tasks=schema.tasks[:1], sparse=schema.sparse,
                        dense=schema.dense)
    with pytest.raises(ConfigError, match="1"):
        build_model("esmm", one, {"counterfactual": "ips"})
    build_model("esmm", one, {})  # plain ESMM on one task still builds
