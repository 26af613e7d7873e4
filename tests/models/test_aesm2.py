"""AESM² (mdmt_tf.models.aesm2): the KL expert selection on a hand-made gate, the whole forward
recomputed in NumPy from the layers' weights, noise only in training, the auxiliary KL loss,
gradients only through the selected experts, saving, config, training and precision."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.errors import ConfigError
from mdmt_tf.models.aesm2 import AESM2, ExpertSelectionLayer, select_experts
from tests.models.conftest import take

SMALL = {"embedding_dim": 4, "num_scenario_experts": 4, "num_task_experts": 3, "scenario_expert_units": [8],
         "task_expert_units": [6], "tower_units": [4], "top_k_specific": 1, "top_k_shared": 1}


def _model(encoded, dtype="float32", **params):
    keras.utils.set_random_seed(0)
    return AESM2(schema=encoded[0], params={**SMALL, **params}, name="aesm2", dtype=dtype)


def _batch(encoded, rows=64, split="train"):
    features, labels = encoded[1][split]
    index = rows if isinstance(rows, np.ndarray) else np.arange(rows)
    features, labels = take(features, labels, index)
    return ({k: tf.constant(v) for k, v in features.items()},
            {k: tf.constant(np.asarray(v, "float32")) for k, v in labels.items()})


def _task_loss(model, features, labels, training):
    out = model(features, training=training)
    return tf.add_n([tf.reduce_mean(keras.losses.binary_crossentropy(labels[t][:, None], out[t]))
                     for t in model.schema.tasks])


# ------------------------------------------------------------------ the rule in NumPy
def _np_select(logits, index, k_sp, k_sh):
    """(weights, specific, shared, kl_sp, kl_sh) by the paper's rule, written out."""
    m = logits.shape[-2]
    g = np.exp(logits - logits.max(-2, keepdims=True))
    g = g / g.sum(-2, keepdims=True)  # G~: softmax over the gates, per expert
    p = np.eye(m)[index][..., None]  # one-hot of the own gate, [..., m, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_sp = np.where(p > 0, p * np.log(p / g), 0.0).sum(-2)
    kl_sh = ((1.0 / m) * np.log((1.0 / m) / g)).sum(-2)

    def smallest(kl, k):
        mask = np.zeros(kl.shape)
        np.put_along_axis(mask, np.argsort(kl, axis=-1, kind="stable")[..., :k], 1.0, axis=-1)
        return mask

    sp, sh = smallest(kl_sp, k_sp), smallest(kl_sh, k_sh)
    selected = np.maximum(sp, sh) > 0
    own = (p * logits).sum(-2)
    w = np.where(selected, np.exp(own - np.where(selected, own, -np.inf).max(-1, keepdims=True)), 0.0)
    return w / w.sum(-1, keepdims=True), sp, sh, kl_sp, kl_sh


def test_selection_rule_on_a_hand_made_gate():
    """3 gates (scenarios) x 4 experts. Expert 0 leans to scenario 0, expert 1 to scenario 2,
    expert 3 is flat (KL to uniform 0), expert 2 nearly flat: the specific expert of a scenario-0
    row is 0, of a scenario-2 row 1; the two shared ones are 3 and 2."""
    gate = np.array([[3.0, 0.0, 0.5, 1.0],
                     [0.0, 0.0, 0.2, 1.0],
                     [0.0, 3.0, 0.1, 1.0]])
    logits = np.stack([gate, gate])[:, None]  # [B=2, S=1, m=3, n=4]
    index = np.array([[0], [2]])
    weights, sp, sh, kl_sp, kl_sh = (np.asarray(v) for v in select_experts(
        tf.constant(logits, "float32"), tf.constant(index, "int32"), 1, 2))
    want = _np_select(logits, index, 1, 2)
    for got, expected in zip((weights, sp, sh, kl_sp, kl_sh), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sp[:, 0], [[1, 0, 0, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(sh[:, 0], [[0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_allclose(kl_sh[0, 0, 3], 0.0, atol=1e-6)
    # KL(one-hot_j || G~[:, k]) = -log G~[j, k]
    g = np.exp(gate) / np.exp(gate).sum(0)
    np.testing.assert_allclose(kl_sp[0, 0], -np.log(g[0]), rtol=1e-5)
    # the own gate renormalised over the selected experts, the others exactly 0
    first = np.exp([3.0, 0.5, 1.0]) / np.exp([3.0, 0.5, 1.0]).sum()
    np.testing.assert_allclose(weights[0, 0], [first[0], 0.0, first[1], first[2]], rtol=1e-6)
    last = np.exp([3.0, 0.1, 1.0]) / np.exp([3.0, 0.1, 1.0]).sum()
    np.testing.assert_allclose(weights[1, 0], [0.0, last[0], last[1], last[2]], rtol=1e-6)
    assert weights[0, 0, 1] == 0.0 and weights[1, 0, 0] == 0.0


# ----------------------------------------------------------- the model, recomputed
def _np_layer(layer, inputs, gate_inputs, index):
    logits = np.einsum("bsc,mcn->bsmn", gate_inputs, layer.gate_kernel.numpy()) + layer.gate_bias.numpy()
    weights, sp, sh, kl_sp, kl_sh = _np_select(logits, index, layer.top_k_specific, layer.top_k_shared)
    if inputs.ndim == 2:
        experts = np.asarray(layer.experts(inputs))  # [B, n, H]
        out = np.einsum("bsn,bnh->bsh", weights, experts)
    else:
        experts = np.stack([np.asarray(layer.experts(inputs[:, s])) for s in range(inputs.shape[1])], axis=1)
        out = np.einsum("bsn,bsnh->bsh", weights, experts)
    losses = ((sp * kl_sp).sum(-1).mean() / layer.top_k_specific, (sh * kl_sh).sum(-1).mean() / layer.top_k_shared)
    return out, weights, sp, sh, losses


def _np_forward(model, features):
    """Every layer of the model recomputed in NumPy from its weights: (logits, {layer: (weights,
    specific, shared, losses)})."""
    schema, t = model.schema, model.schema.num_tasks
    embedded = np.asarray(model.embedding(features))
    scenario = embedded[:, 0]  # the domain field comes first
    h = np.asarray(model.flat_inputs(embedded, features))
    b = h.shape[0]
    domain = np.asarray(features[schema.domain])[:, None]
    seen = {}
    for layer in model.scenario_layers:
        out, *rest = _np_layer(layer, h, np.concatenate([h, scenario], -1)[:, None], domain)
        seen[layer.name], h = rest, out[:, 0]
    tasks = np.broadcast_to(np.arange(t), (b, t))
    task_rows = np.broadcast_to(model.task_embedding.embeddings.numpy()[None], (b, t, model.params.embedding_dim))
    for layer in model.task_layers:
        per_task = h if h.ndim == 3 else np.broadcast_to(h[:, None], (b, t, h.shape[-1]))
        gate_inputs = np.concatenate([per_task, np.broadcast_to(scenario[:, None], (b, t, scenario.shape[-1])),
                                      task_rows], -1)
        out, *rest = _np_layer(layer, h, gate_inputs, tasks)
        seen[layer.name], h = rest, out
    return np.asarray(model.towers(h.astype("float32"))), seen


def test_forward_recomputed_in_numpy_from_the_weights(encoded):
    model = _model(encoded, num_scenario_layers=2, num_task_layers=2, top_k_shared=2)
    features, _ = _batch(encoded, 48)
    _, details = model.forward(features, training=False)
    logits, seen = _np_forward(model, features)
    np.testing.assert_allclose(np.asarray(details.logits), logits, rtol=1e-4, atol=1e-5)
    names = [g.name for g in details.gates]
    assert names == ["scenario_layer_0", "scenario_layer_1", "task_layer_0", "task_layer_1"]
    t = model.schema.num_tasks
    for name in names:
        weights, sp, sh, _ = seen[name]
        gate = np.asarray(details.gate(name).weights)
        n = 4 if name.startswith("scenario") else 3
        assert gate.shape == (48, 1 if name.startswith("scenario") else t, n)
        np.testing.assert_allclose(gate, weights, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(details.extra[f"{name}_specific"]), sp)
        np.testing.assert_array_equal(np.asarray(details.extra[f"{name}_shared"]), sh)
        assert (sp.sum(-1) == 1).all() and (sh.sum(-1) == 2).all()
        np.testing.assert_allclose(gate.sum(-1), 1.0, rtol=1e-6)
        assert (gate[np.maximum(sp, sh) == 0] == 0).all()  # unselected experts: weight exactly 0
    # the scenario layer picks by the row's domain: rows of different domains differ somewhere
    sp = np.asarray(details.extra["scenario_layer_0_specific"])[:, 0]
    domain = np.asarray(features[model.schema.domain])
    assert len({tuple(sp[domain == d].mean(0)) for d in np.unique(domain)}) > 1


# ------------------------------------------------------------------------- noise
def test_gate_noise_only_in_training(encoded):
    features, _ = _batch(encoded, 32)
    model = _model(encoded, noise_std=0.5)
    task = model.schema.tasks[0]
    first, second = (np.asarray(model(features, training=False)[task]) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    noisy, again = (np.asarray(model(features, training=True)[task]) for _ in range(2))
    assert np.abs(noisy - first).max() > 1e-4 and np.abs(noisy - again).max() > 1e-4
    # without noise, training and inference passes are the same function
    quiet = _model(encoded, noise_std=0.0)
    np.testing.assert_allclose(np.asarray(quiet(features, training=True)[task]),
                               np.asarray(quiet(features, training=False)[task]), rtol=1e-6)


# ---------------------------------------------------------------- auxiliary loss
def test_auxiliary_kl_loss_by_hand(encoded):
    features, _ = _batch(encoded, 40)
    model = _model(encoded, noise_std=0.0, specific_loss_weight=0.3, shared_loss_weight=0.7, top_k_shared=2)
    model(features, training=True)
    assert len(model.losses) == 1
    _, seen = _np_forward(model, features)
    specific = sum(v[3][0] for v in seen.values())
    shared = sum(v[3][1] for v in seen.values())
    assert specific > 0 and shared > 0
    assert float(model.losses[0]) == pytest.approx(0.3 * specific + 0.7 * shared, rel=1e-4)
    model(features, training=False)
    assert not model.losses  # training only
    off = _model(encoded, specific_loss_weight=0.0, shared_loss_weight=0.0)
    off(features, training=True)
    assert not off.losses


# -------------------------------------------------------------------- gradients
def _nonzero(g):
    return g is not None and float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(g)))) > 0


def test_gradients_only_through_selected_experts_and_the_own_gate(encoded):
    """For one row, the task outputs reach a scenario expert iff it is selected, reach only the
    row's own scenario gate (the selection itself has no gradient) and, in it, only the selected
    experts' columns; the auxiliary loss also trains the other scenarios' gates."""
    model = _model(encoded, noise_std=0.0)
    features, labels = _batch(encoded, 64)
    domain = np.asarray(features[model.schema.domain])
    row = int(np.flatnonzero(domain == 1)[0])
    one = {k: v[row:row + 1] for k, v in features.items()}
    layer = model.scenario_layers[0]
    _, details = model.forward(one, training=False)
    selected = np.maximum(np.asarray(details.extra["scenario_layer_0_specific"]),
                          np.asarray(details.extra["scenario_layer_0_shared"]))[0, 0] > 0
    assert 0 < selected.sum() < layer.num_experts
    with tf.GradientTape(persistent=True) as tape:
        out = model(one, training=False)
        total = tf.add_n([tf.reduce_sum(out[t]) for t in model.schema.tasks])
    expert_grads = [tape.gradient(total, k.value) for k in layer.experts.kernels]
    for k in range(layer.num_experts):
        touched = any(_nonzero(g[k]) for g in expert_grads)
        assert touched == selected[k], (k, selected)
    gate = tape.gradient(total, layer.gate_kernel.value).numpy()  # [m, c, n]
    assert not gate[[0, 2]].any()  # other scenarios' gates: no gradient from the outputs
    for k in range(layer.num_experts):
        assert bool(np.abs(gate[1, :, k]).sum() > 0) == selected[k], k
    with tf.GradientTape() as tape:
        model(one, training=True)
        aux = tf.add_n(model.losses)
    gate = tape.gradient(aux, layer.gate_kernel.value).numpy()
    assert np.abs(gate[0]).sum() > 0 and np.abs(gate[2]).sum() > 0


# ------------------------------------------------------------ saving and config
def test_save_reload_gives_identical_predictions(encoded, tmp_path):
    model = _model(encoded)
    features, _ = _batch(encoded, 32, "test")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, AESM2) and loaded.params == model.params
    for task in model.schema.tasks:
        np.testing.assert_array_equal(np.asarray(loaded(features, training=False)[task]),
                                      np.asarray(model(features, training=False)[task]))


def test_get_config_round_trip(encoded):
    model = _model(encoded, noise_std=0.3, top_k_shared=0)
    clone = AESM2.from_config(model.get_config())
    assert clone.params == model.params and clone.get_config() == model.get_config()
    clone.set_weights(model.get_weights())
    features, _ = _batch(encoded, 16)
    for task in model.schema.tasks:
        np.testing.assert_array_equal(np.asarray(clone(features)[task]), np.asarray(model(features)[task]))
    layer = model.task_layers[0]
    again = ExpertSelectionLayer.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()
    assert (again.num_gates, again.noise_std, again.top_k_shared) == (model.schema.num_tasks, 0.3, 0)


# ------------------------------------------------------------------ training
def _step(model, optimizer, features, labels):
    with tf.GradientTape() as tape:
        loss = _task_loss(model, features, labels, training=True)
        total = loss + (tf.add_n([tf.cast(v, "float32") for v in model.losses]) if model.losses else 0.0)
    optimizer.apply(tape.gradient(total, model.trainable_variables), model.trainable_variables)
    return float(total)


def test_training_lowers_the_loss(encoded):
    model = _model(encoded)
    features, labels = _batch(encoded, 128)
    before = float(_task_loss(model, features, labels, training=False))
    optimizer = keras.optimizers.Adam(0.01)
    for _ in range(25):
        _step(model, optimizer, features, labels)
    after = float(_task_loss(model, features, labels, training=False))
    assert after < before - 0.02, (before, after)


def test_a_batch_without_some_domains_is_finite(encoded):
    model = _model(encoded)
    domain = np.asarray(encoded[1]["train"][0][model.schema.domain])
    features, labels = _batch(encoded, np.flatnonzero(domain == 0)[:32])  # domains 1 and 2 absent
    for training in (False, True):
        out = model(features, training=training)
        assert all(np.isfinite(np.asarray(out[t])).all() for t in model.schema.tasks)
    assert np.isfinite(_step(model, keras.optimizers.Adam(0.01), features, labels))
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)
    empty, _ = _batch(encoded, 0)
    model(empty, training=True)
    assert np.isfinite(float(model.losses[0]))


def test_mixed_bfloat16_trains_a_step(encoded):
    model = _model(encoded, dtype="mixed_bfloat16")
    features, labels = _batch(encoded, 64)
    before = [v.numpy().copy() for v in model.trainable_variables]
    assert np.isfinite(_step(model, keras.optimizers.Adam(0.01), features, labels))
    after = [v.numpy() for v in model.trainable_variables]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    assert all(np.isfinite(v).all() for v in after)
    out, details = model.forward(features, training=False)
    assert all(out[t].dtype == "float32" for t in model.schema.tasks)
    for gate in details.gates:
        np.testing.assert_allclose(np.asarray(gate.weights).sum(-1), 1.0, rtol=1e-5)


# -------------------------------------------------------------------- params
@pytest.mark.parametrize("params, message", [
    ({"top_k_specific": 5}, "top_k_specific must be in \\[1, 3\\]"),
    ({"top_k_specific": 0}, "top_k_specific"),
    ({"top_k_shared": -1}, "top_k_shared must be in \\[0, 3\\]"),
    ({"top_k_shared": 4}, "top_k_shared"),
    ({"noise_std": -0.1}, "noise_std must be >= 0"),
    ({"specific_loss_weight": -1.0}, "specific_loss_weight"),
    ({"shared_loss_weight": -1.0}, "shared_loss_weight"),
    ({"num_task_experts": 0}, "num_task_experts must be >= 1"),
    ({"num_scenario_layers": 0}, "num_scenario_layers must be >= 1"),
    ({"top_k": 2}, "unknown hyper-parameter"),
])
def test_bad_params_raise_config_error(encoded, params, message):
    with pytest.raises(ConfigError, match=message):
        AESM2(schema=encoded[0], params={**SMALL, **params}, name="aesm2")
