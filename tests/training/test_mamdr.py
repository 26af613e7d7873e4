"""MAMDR: Domain Negotiation's outer update and Domain Regularization's contract."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.errors import ConfigError
from mdmt_tf.models import build_model
from mdmt_tf.training.losses import mdmt_loss
from mdmt_tf.training.mamdr import MAMDRTrainer

from tests.training.conftest import values

TINY = {"bottom_units": [4], "tower_units": [], "embedding_dim": 2}


def _tiny(enc, seed=0):
    keras.utils.set_random_seed(seed)
    return build_model("shared_bottom", enc.schema, TINY)


def _domain_batches(enc, size=32):
    out = []
    for d in range(enc.schema.num_domains):
        rows = np.flatnonzero(enc.domain["train"] == d)[:size]
        out.append(({k: tf.constant(v[rows]) for k, v in enc.features["train"].items()},
                    {k: tf.constant(v[rows]) for k, v in enc.labels["train"].items()}))
    return tuple(out)


def test_domain_negotiation_outer_update_is_exact(enc):
    """theta_new == theta + beta * (theta~ - theta), theta~ from sequential SGD steps on the
    domains in the order the trainer drew, recomputed independently on a clone."""
    alpha, beta = 0.05, 0.3
    model = _tiny(enc)
    trainer = MAMDRTrainer(model, strategy="dn", inner_lr=alpha, outer_lr=beta, inner_optimizer="sgd",
                           inner_steps=2)
    clone = _tiny(enc)
    clone.set_weights(model.get_weights())
    theta = values(model.trainable_variables)
    batches = _domain_batches(enc)

    trainer.domain_negotiation(batches)
    order = trainer.last_order.numpy().tolist()
    assert sorted(order) == [0, 1, 2]

    sgd = keras.optimizers.SGD(alpha)
    for slot in order:
        features, labels = batches[slot]
        for _ in range(2):
            with tf.GradientTape() as tape:
                loss = mdmt_loss(labels, clone(features, training=True), features["domain_id"], 3,
                                 enc.schema.tasks)
            sgd.apply(tape.gradient(loss, clone.trainable_variables), clone.trainable_variables)
    theta_tilde = values(clone.trainable_variables)
    for t, tt, new in zip(theta, theta_tilde, values(model.trainable_variables)):
        np.testing.assert_allclose(new, t + beta * (tt - t), rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(t, tt) for t, tt in zip(theta, theta_tilde))


def test_domain_regularization_updates_only_domain_parameters(enc):
    model = _tiny(enc)
    trainer = MAMDRTrainer(model, strategy="dr", inner_lr=0.05, dr_lr=0.5, k=2, inner_optimizer="sgd")
    theta = values(model.trainable_variables)
    trainer.domain_regularization(_domain_batches(enc))
    for before, after in zip(theta, values(model.trainable_variables)):
        np.testing.assert_array_equal(before, after)  # shared weights untouched
    for d in range(3):
        moved = [np.abs(np.asarray(delta)).sum() > 0 for delta in trainer.deltas[d] if delta is not None]
        assert moved and all(moved)
    # "dense" scope: the embedding table has no domain-specific copy
    paths = [v.path for v, delta in zip(model.trainable_variables, trainer.deltas[0]) if delta is None]
    assert paths == ["shared_bottom/embedding/embeddings"]


def test_serving_model_uses_theta_plus_theta_d(enc):
    model = _tiny(enc)
    trainer = MAMDRTrainer(model, strategy="dr", inner_lr=0.05, dr_lr=0.5, inner_optimizer="sgd")
    trainer.domain_regularization(_domain_batches(enc))
    serving = trainer.serving_model()
    features = {k: v[:60] for k, v in enc.features["test"].items()}
    got = {t: np.asarray(v).ravel() for t, v in serving(features).items()}
    clone = _tiny(enc)
    for d in range(3):
        for target, source, delta in zip(clone.trainable_variables, model.trainable_variables, trainer.deltas[d]):
            target.assign(np.asarray(source) + (0 if delta is None else np.asarray(delta)))
        rows = features["domain_id"] == d
        expected = clone(features, training=False)
        for task in enc.schema.tasks:
            np.testing.assert_allclose(got[task][rows], np.asarray(expected[task]).ravel()[rows], rtol=1e-5)


def test_mamdr_fit_and_errors(enc):
    model = _tiny(enc)
    trainer = MAMDRTrainer(model, strategy="mamdr", k=1)
    trainer.compile()
    data = tf.data.Dataset.from_tensors(_domain_batches(enc)).repeat(3)
    history = trainer.fit(data, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and int(trainer.iterations_done.numpy()) == 3
    with pytest.raises(ConfigError, match="strategy"):
        MAMDRTrainer(model, strategy="reptile")
    with pytest.raises(ConfigError, match="at least 2 domains"):
        MAMDRTrainer(model, strategy="dr", domains=[0])
