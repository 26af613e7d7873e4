"""MUSENet (mdmt_tf.models.musenet): the soft assignment to the scenario prototypes and the
mixture of scenario experts recomputed by hand, the straight-through Gumbel-softmax (hard
forward, soft gradient), the prototypes' expected-distance loss and its gradient, and the
model contract (save/reload, config, training, empty domain, mixed_bfloat16, bad params)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.errors import ConfigError
from mdmt_tf.models.musenet import MUSENet, MUSENetParams, ScenarioAssignment, straight_through_gumbel
from tests.models.conftest import take

SMALL = {"embedding_dim": 4, "num_scenarios": 3, "scenario_units": [8, 4], "expert_units": [8],
         "shared_units": [8], "tower_units": [4]}


def _model(encoded, dtype="float32", **params):
    keras.utils.set_random_seed(0)
    return MUSENet(schema=encoded[0], params={**SMALL, **params}, name="musenet", dtype=dtype)


def _batch(encoded, rows=64, split="train"):
    features, labels = encoded[1][split]
    features, labels = take(features, labels, np.arange(rows))
    return ({k: tf.constant(v) for k, v in features.items()}, {k: tf.constant(v) for k, v in labels.items()})


def _scenario_space(model, features):
    """s = f_omega(x) [B, dim] as NumPy (every input: scenario_fields is empty)."""
    x = model.flat_inputs(model.embedding(features), features)
    return x, np.asarray(model.scenario_net(x), dtype=np.float64)


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _posterior(s, prototypes, temperature, distance="cosine"):
    """pi = softmax(-d / temperature) and d, d the squared distance (of unit vectors: cosine)."""
    if distance == "cosine":
        s, prototypes = _unit(s), _unit(prototypes)
    d = ((s[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)
    z = -d / temperature
    z -= z.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True), d


def _bce(model, features, labels, training):
    out = model(features, training=training)
    return sum(tf.reduce_mean(keras.losses.binary_crossentropy(tf.cast(labels[t], "float32")[:, None], out[t]))
               for t in model.schema.tasks)


def _nonzero(grad):
    return grad is not None and float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(grad)))) > 0


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_soft_assignment_and_the_scenario_mixture_by_hand(encoded, distance):
    """pi = softmax(-||s - c_k||^2 / temperature) (s and c_k of unit length for the cosine
    distance); at inference each sample goes to its argmax scenario (the reported gate) and
    the logits read that scenario's expert only; "soft" inference mixes the experts by pi."""
    model = _model(encoded, temperature=0.5, distance=distance)
    scale = np.array([[0.7], [1.0], [1.4]], "float32")  # prototypes of different lengths
    model.assign.prototypes.assign(np.asarray(model.assign.prototypes) * scale)
    features, _ = _batch(encoded)
    _, details = model.forward(features, training=False)
    x, s = _scenario_space(model, features)
    prototypes = np.asarray(model.assign.prototypes, dtype=np.float64)
    pi, _ = _posterior(s, prototypes, 0.5, distance)
    np.testing.assert_allclose(np.asarray(details.extra["scenario_posterior"]), pi, rtol=1e-4, atol=1e-6)
    gate = np.asarray(details.gate("scenarios").weights)
    chosen = pi.argmax(axis=1)
    assert gate.shape == (64, 1, 3)
    np.testing.assert_array_equal(gate[:, 0], np.eye(3)[chosen])
    assert len(set(chosen)) >= 2  # the samples are spread over several implicit scenarios

    experts = np.asarray(model.experts(x))  # [B, K, H]
    h = np.concatenate([np.asarray(model.shared(x)), experts[np.arange(64), chosen]], axis=1)
    np.testing.assert_allclose(np.asarray(details.logits), np.asarray(model.towers(tf.constant(h))),
                               rtol=1e-5, atol=1e-6)

    soft = _model(encoded, temperature=0.5, distance=distance, inference_assignment="soft")
    soft.assign.prototypes.assign(np.asarray(soft.assign.prototypes) * scale)
    _, soft_details = soft.forward(features, training=False)
    np.testing.assert_allclose(np.asarray(soft_details.gate("scenarios").weights)[:, 0], pi, rtol=1e-4, atol=1e-6)
    experts = np.asarray(soft.experts(x))
    h = np.concatenate([np.asarray(soft.shared(x)), np.einsum("bk,bkh->bh", pi, experts)], axis=1)
    np.testing.assert_allclose(np.asarray(soft_details.logits), np.asarray(soft.towers(tf.constant(h, "float32"))),
                               rtol=1e-4, atol=1e-5)


def test_scenario_fields_choose_what_f_omega_reads(encoded):
    """With scenario_fields=[user_id], changing a row's item (or its domain) leaves its
    posterior unchanged; with every input (the default), it moves it."""
    features, _ = _batch(encoded, rows=32)
    moved = dict(features)
    moved["item_id"] = tf.roll(features["item_id"], 1, axis=0)
    moved["domain_id"] = tf.roll(features["domain_id"], 1, axis=0)
    for fields, same in (([], False), (["user_id"], True)):
        model = _model(encoded, scenario_fields=fields)
        before = np.asarray(model.forward(features)[1].extra["scenario_posterior"])
        after = np.asarray(model.forward(moved)[1].extra["scenario_posterior"])
        assert np.allclose(before, after, atol=1e-6) == same, fields
    with_dense = _model(encoded, scenario_fields=["domain_id", "age"])
    assert with_dense.scenario_net.dense_layers[0].kernel.shape[0] == 4 + 1  # one embedding + one dense value


def test_straight_through_gumbel_is_hard_forward_and_soft_backward():
    """Forward: one_hot(argmax(log_pi + g)). Backward: the Jacobian of y = softmax((log_pi + g)
    / tau), so d sum_k w_k a_k / d log_pi_j = y_j (w_j - sum_k w_k y_k) / tau."""
    rng = np.random.default_rng(0)
    log_pi = tf.constant(np.log(rng.dirichlet(np.ones(4), size=6)), "float32")
    noise = tf.constant(rng.gumbel(size=(6, 4)), "float32")
    w = rng.normal(size=(6, 4)).astype("float32")
    tau = 0.7
    with tf.GradientTape() as tape:
        tape.watch(log_pi)
        a = straight_through_gumbel(log_pi, noise, tau)
        objective = tf.reduce_sum(a * w)
    perturbed = log_pi.numpy() + noise.numpy()
    np.testing.assert_allclose(a.numpy(), np.eye(4)[perturbed.argmax(1)], atol=1e-6)
    y = np.exp(perturbed / tau) / np.exp(perturbed / tau).sum(1, keepdims=True)
    expected = y * (w - (w * y).sum(1, keepdims=True)) / tau
    np.testing.assert_allclose(tape.gradient(objective, log_pi).numpy(), expected, rtol=1e-4, atol=1e-6)


def test_training_draws_hard_gumbel_assignments_and_inference_is_deterministic(encoded):
    """Near-uniform pi (temperature 1e3): training draws one-hot rows that follow the noise, not
    the argmax; inference is one_hot(argmax pi), the same at every call. The prediction loss
    reaches the prototypes and f_omega through the hard assignment (straight-through) even
    with the prototype loss off."""
    model = _model(encoded, temperature=1e3, prototype_weight=0.0)
    features, labels = _batch(encoded)
    first = np.asarray(model.forward(features, training=True)[1].gate("scenarios").weights)[:, 0]
    second = np.asarray(model.forward(features, training=True)[1].gate("scenarios").weights)[:, 0]
    for drawn in (first, second):
        np.testing.assert_allclose(np.sort(drawn, axis=1), np.tile([0.0, 0.0, 1.0], (64, 1)), atol=1e-6)
    assert (first.argmax(1) != second.argmax(1)).any()  # Gumbel noise: the draws differ

    _, inference = model.forward(features, training=False)
    again = np.asarray(model.forward(features, training=False)[1].gate("scenarios").weights)
    hard = np.asarray(inference.gate("scenarios").weights)
    np.testing.assert_array_equal(hard, again)
    np.testing.assert_array_equal(hard[:, 0], np.eye(3)[np.asarray(inference.extra["scenario_posterior"]).argmax(1)])
    assert (first.argmax(1) != hard[:, 0].argmax(1)).any()

    model = _model(encoded, prototype_weight=0.0)
    with tf.GradientTape() as tape:
        loss = _bce(model, features, labels, training=True)
    assert not model.losses
    watched = [model.assign.prototypes] + [layer.kernel for layer in model.scenario_net.dense_layers]
    for variable, grad in zip(watched, tape.gradient(loss, [v.value for v in watched])):
        assert _nonzero(grad), variable.path


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_the_prototype_loss_is_the_expected_distance_and_moves_the_prototypes_only(encoded, distance):
    """L = w * mean_i sum_k pi_ik d_ik with pi and s held: its gradient reaches the prototypes
    only, w/B * sum_i pi_ik J_k^T 2 (c'_k - s'_i) with c', s' the vectors d compares (unit
    length for cosine, J_k = (I - c'_k c'_k^T) / ||c_k|| the normalisation's Jacobian;
    Euclidean: c' = c, s' = s, J = I), and nothing reaches f_omega."""
    model = _model(encoded, prototype_weight=0.5, distance=distance)
    features, _ = _batch(encoded)
    with tf.GradientTape() as tape:
        model(features, training=True)
        assert len(model.losses) == 1
        loss = model.losses[0]
    _, s = _scenario_space(model, features)
    c = np.asarray(model.assign.prototypes, dtype=np.float64)
    pi, d = _posterior(s, c, model.params.temperature, distance)
    assert float(loss) == pytest.approx(0.5 * np.mean((pi * d).sum(1)), rel=1e-5)
    omega = [layer.kernel for layer in model.scenario_net.dense_layers]
    grads = tape.gradient(loss, [model.assign.prototypes.value] + [v.value for v in omega])
    if distance == "cosine":
        s, unit = _unit(s), _unit(c)
        jacobians = (np.eye(c.shape[1])[None] - unit[:, :, None] * unit[:, None, :]) / np.linalg.norm(
            c, axis=1)[:, None, None]
    else:
        unit, jacobians = c, np.tile(np.eye(c.shape[1]), (c.shape[0], 1, 1))
    outer = 0.5 / 64 * np.einsum("bk,bkd->kd", pi, 2 * (unit[None, :, :] - s[:, None, :]))
    expected = np.einsum("kde,ke->kd", jacobians, outer)
    np.testing.assert_allclose(np.asarray(grads[0]), expected, rtol=1e-4, atol=1e-6)
    assert not any(_nonzero(g) for g in grads[1:])
    model(features, training=False)
    assert not model.losses  # only in training


def test_a_training_step_moves_the_prototypes_and_training_lowers_the_loss(encoded):
    model = _model(encoded)
    features, labels = _batch(encoded, rows=256)
    before_prototypes = np.asarray(model.assign.prototypes).copy()
    optimizer = keras.optimizers.Adam(1e-2)
    before = float(_bce(model, features, labels, training=False))
    for _ in range(30):
        with tf.GradientTape() as tape:
            loss = _bce(model, features, labels, training=True) + tf.add_n(model.losses)
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    assert not np.allclose(np.asarray(model.assign.prototypes), before_prototypes)
    after = float(_bce(model, features, labels, training=False))
    assert after < before, (before, after)


def test_save_reload_and_config_round_trip(encoded, tmp_path):
    model = _model(encoded, temperature=2.0, gumbel_tau=0.5)
    features, _ = _batch(encoded, split="test")
    rng = np.random.default_rng(0)
    for variable in model.trainable_variables:  # off their initial values
        variable.assign(np.asarray(variable) + rng.normal(0, 0.3, variable.shape).astype(variable.dtype))
    expected = {t: np.asarray(v) for t, v in model(features).items()}
    gate = np.asarray(model.explain(features).gate("scenarios").weights)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(reloaded) is MUSENet and reloaded.params == model.params
    for task, value in reloaded(features).items():
        np.testing.assert_array_equal(np.asarray(value), expected[task])
    np.testing.assert_array_equal(np.asarray(reloaded.explain(features).gate("scenarios").weights), gate)
    np.testing.assert_array_equal(np.asarray(reloaded.assign.prototypes), np.asarray(model.assign.prototypes))

    rebuilt = MUSENet.from_config(model.get_config())
    assert rebuilt.get_config() == model.get_config()
    assert rebuilt.params == MUSENetParams.from_dict({**SMALL, "temperature": 2.0, "gumbel_tau": 0.5})
    layer_config = model.assign.get_config()
    assert ScenarioAssignment.from_config(layer_config).get_config() == layer_config
    assert layer_config["temperature"] == 2.0 and layer_config["gumbel_tau"] == 0.5


def test_a_batch_with_an_empty_domain_is_finite(encoded):
    schema, splits = encoded
    features, labels = splits["train"]
    rows = np.flatnonzero(features[schema.domain] == schema.num_domains - 1)[:16]
    assert len(rows) == 16
    features, labels = take(features, labels, rows)
    model = _model(encoded)
    with tf.GradientTape() as tape:
        loss = _bce(model, features, labels, training=True) + tf.add_n(model.losses)
    assert np.isfinite(float(loss))
    for variable, grad in zip(model.trainable_variables, tape.gradient(loss, model.trainable_variables)):
        if grad is not None:
            assert np.isfinite(np.asarray(tf.convert_to_tensor(grad))).all(), variable.path
    for value in model(features, training=False).values():
        assert np.isfinite(np.asarray(value)).all()


def test_a_training_step_under_mixed_bfloat16(encoded):
    model = _model(encoded, dtype="mixed_bfloat16")
    features, labels = _batch(encoded)
    assert model.assign.prototypes.dtype == "float32"
    before = np.asarray(model.assign.prototypes).copy()
    with tf.GradientTape() as tape:
        loss = _bce(model, features, labels, training=True) + tf.add_n(model.losses)
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(float(loss))
    keras.optimizers.Adam(1e-2).apply(grads, model.trainable_variables)
    assert not np.array_equal(np.asarray(model.assign.prototypes), before)
    out, details = model.forward(features, training=False)
    assert all(np.asarray(v).dtype == np.float32 for v in out.values())
    posterior = np.asarray(details.extra["scenario_posterior"])
    assert posterior.dtype == np.float32 and np.abs(posterior.sum(1) - 1).max() < 1e-5


@pytest.mark.parametrize("params, message", [
    ({"num_scenarios": 1}, "num_scenarios must be >= 2"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"temperature": -1.0}, "temperature must be > 0"),
    ({"gumbel_tau": 0.0}, "gumbel_tau must be > 0"),
    ({"prototype_weight": -0.1}, "prototype_weight must be >= 0"),
    ({"inference_assignment": "sample"}, r"choose one of \['hard', 'soft'\]"),
    ({"distance": "dot"}, r"choose one of \['cosine', 'euclidean'\]"),
    ({"scenario_units": []}, "scenario_units must not be empty"),
])
def test_bad_params_raise_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        MUSENetParams.from_dict(params, model="musenet")


def test_unknown_scenario_fields_are_a_config_error(encoded):
    with pytest.raises(ConfigError, match=r"scenario_fields \['nope'\] are not features; valid: \['domain_id'"):
        _model(encoded, scenario_fields=["nope"])
