"""STEM-Net as the paper and the authors' code: MLP gates on x_t + x_s, stacked layers with a
shared gate between them, AFTB gradients, the gate_input option, save/reload, validation."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.errors import ConfigError
from mdmt_tf.layers import STEMLayer
from mdmt_tf.models import ModelConfig, build_model
from tests.models.conftest import take

TINY = {"embedding_dim": 4, "expert_units": [8, 5], "tower_units": [3], "gate_units": [6, 4],
        "num_shared_experts": 2, "num_task_experts": 2}


def _tiny(schema, **params):
    keras.utils.set_random_seed(0)
    return build_model("stem", schema, {**TINY, **params})


def _perturb(model, scale=0.3, seed=0):
    """Move every variable off its initial value (zero biases included)."""
    rng = np.random.default_rng(seed)
    for variable in model.variables:
        variable.assign(np.asarray(variable) + rng.normal(0, scale, variable.shape).astype(variable.dtype))


def _n_in(schema, k):
    return (1 + len(schema.sparse)) * k + len(schema.dense)  # domain + sparse fields, k-d, + dense


# ------------------------------------------------------------------ NumPy restatement
def _relu(x):
    return np.maximum(x, 0.0)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np(variable):
    return np.asarray(variable).astype(np.float64)


def _lookup(table, features, field):
    return _np(table.embeddings)[table.offsets[field] + np.asarray(features[field])]


def _gate(gate, x):
    for dense in gate.hidden:
        x = _relu(x @ _np(dense.kernel) + _np(dense.bias))
    return _softmax(x @ _np(gate.logits.kernel) + _np(gate.logits.bias))


def _experts(group, x):
    """x [B, in] (every expert reads it) or [B, E, in] (expert e reads slice e) -> [B, E, H]."""
    for kernel, bias in zip(group.kernels, group.biases):
        x = _relu(np.einsum("bi,eio->beo" if x.ndim == 2 else "bei,eio->beo", x, _np(kernel)) + _np(bias))
    return x


def _reference(model, features):
    """The STEM forward pass written out in NumPy (float64): -> (logits [B, T], last task gates)."""
    p, fields = model.params, model.embedding.fields
    dense = [np.asarray(features[n], np.float64)[:, None] for n in model.schema.dense]
    x_s = np.concatenate([_lookup(model.embedding, features, f) for f in fields] + dense, axis=1)
    x_t = np.stack([np.concatenate([_lookup(table if f in model.task_fields else model.embedding, features, f)
                                    for f in fields] + dense, axis=1)
                    for table in model.task_embeddings], axis=1)  # [B, T, n_in]
    t, n, s = model.schema.num_tasks, p.num_task_experts, p.num_shared_experts
    for index, layer in enumerate(model.stem_layers):
        experts = np.concatenate([_experts(layer.shared_experts, x_s),
                                  _experts(layer.task_experts, np.repeat(x_t, n, axis=1))], axis=1)  # [B, E, H]
        assert experts.shape[1] == s + t * n
        gates = np.stack([_gate(layer.task_gates[i], x_t[:, i] + x_s) for i in range(t)], axis=1)  # [B, T, E]
        last = index == len(model.stem_layers) - 1
        assert (layer.shared_gate is None) == last  # a shared gate only where another layer follows
        if not last:
            x_s = np.einsum("be,beh->bh", _gate(layer.shared_gate, x_s), experts)
        x_t = np.einsum("bte,beh->bth", gates, experts)
    towers = model.towers
    h = x_t
    for i, (kernel, bias) in enumerate(zip(towers.kernels, towers.biases)):
        h = np.einsum("bti,tio->bto", h, _np(kernel)[0]) + _np(bias)[0]
        if i < len(towers.kernels) - 1:
            h = _relu(h)
    return h[..., 0], gates


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_forward_matches_a_numpy_restatement(num_layers, encoded):
    schema, splits = encoded
    features, _ = take(*splits["test"], range(64))
    model = _tiny(schema, num_layers=num_layers, task_embedding_fields=["user_id"])
    _perturb(model)
    logits, gates = _reference(model, features)
    assert 0.2 < logits.std() and np.abs(logits).max() < 12  # probabilities away from 0 and 1
    out, details = model.forward(features, training=False)
    np.testing.assert_allclose(np.asarray(details.logits), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(details.gate("tasks").weights), gates, rtol=1e-5, atol=1e-6)
    for i, task in enumerate(schema.tasks):
        probability = np.asarray(out[task])
        assert probability.dtype == np.float32 and probability.shape == (64, 1)
        np.testing.assert_allclose(probability[:, 0], 1 / (1 + np.exp(-logits[:, i])), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------ gradients
def _grads(model, features, labels, task, variables):
    with tf.GradientTape() as tape:
        out = model(features, training=True)
        loss = tf.reduce_mean(keras.losses.binary_crossentropy(labels[task][:, None], out[task]))
    return [np.zeros(v.shape) if g is None else np.asarray(tf.convert_to_tensor(g))
            for g, v in zip(tape.gradient(loss, variables), variables)]


@pytest.fixture()
def batch(encoded):
    _, splits = encoded
    return take(*splits["train"], range(256))


def test_stacked_aftb_gradients(encoded, batch):
    """Two layers, task 0's loss: the last layer's task-1 experts get exactly no gradient and
    the shared experts of both layers some. Task 1's lower experts and its embedding table
    are reached only through layer 0's shared gate (no stop_gradient, as in the authors'
    code): with that gate's weight on task 1's experts forced to exactly 0, their gradient is
    exactly 0 too."""
    schema, _ = encoded
    model = _tiny(schema, num_layers=2)
    first, last = model.stem_layers
    n, s = model.params.num_task_experts, model.params.num_shared_experts
    variables = [last.task_experts.kernels[0], last.shared_experts.kernels[0], first.shared_experts.kernels[0],
                 first.task_experts.kernels[0], model.task_embeddings[0].embeddings,
                 model.task_embeddings[1].embeddings]
    g_last_task, g_last_shared, g_first_shared, g_first_task, g_own_table, g_other_table = _grads(
        model, *batch, "click", variables)
    assert np.all(g_last_task[n:2 * n] == 0.0), "the last layer's task-1 experts must get no gradient from task 0"
    assert np.abs(g_last_task[:n]).sum() > 0
    assert np.abs(g_last_shared).sum() > 0 and np.abs(g_first_shared).sum() > 0
    assert np.abs(g_first_task[:n]).sum() > 0 and np.abs(g_own_table).sum() > 0
    # the shared gate path: layer 0's shared gate mixes task 1's experts without stop_gradient
    assert np.abs(g_first_task[n:2 * n]).sum() > 0 and np.abs(g_other_table).sum() > 0

    # close that path: layer 0's shared gate gives task 1's experts a logit of -1e4 (weight exactly 0)
    columns = np.arange(s + n, s + 2 * n)
    kernel, bias = np.asarray(first.shared_gate.logits.kernel), np.asarray(first.shared_gate.logits.bias)
    kernel[:, columns], bias[columns] = 0.0, -1e4
    first.shared_gate.logits.kernel.assign(kernel)
    first.shared_gate.logits.bias.assign(bias)
    _, _, _, g_first_task, g_own_table, g_other_table = _grads(model, *batch, "click", variables)
    assert np.all(g_first_task[n:2 * n] == 0.0) and np.all(g_other_table == 0.0)
    assert np.abs(g_first_task[:n]).sum() > 0 and np.abs(g_own_table).sum() > 0
    # and symmetrically, task 1's loss never reaches the last layer's task-0 experts
    (g_last_task,) = _grads(model, *batch, "like", [last.task_experts.kernels[0]])
    assert np.all(g_last_task[:n] == 0.0) and np.abs(g_last_task[n:2 * n]).sum() > 0


@pytest.mark.parametrize("num_layers", [1, 2])
def test_without_aftb_task_losses_reach_every_task(num_layers, encoded, batch):
    schema, _ = encoded
    model = _tiny(schema, num_layers=num_layers, aftb=False)
    n = model.params.num_task_experts
    g_last_task, g_other_table = _grads(model, *batch, "click", [model.stem_layers[-1].task_experts.kernels[0],
                                                                 model.task_embeddings[1].embeddings])
    assert np.abs(g_last_task[n:2 * n]).sum() > 0 and np.abs(g_other_table).sum() > 0


def test_single_layer_aftb_is_exact(encoded, batch):
    """One layer (the default): no shared gate, and task 0's loss gives task 1's experts and
    embedding table exactly no gradient."""
    schema, _ = encoded
    model = _tiny(schema)
    assert model.stem_layers[0].shared_gate is None
    assert not any("shared_gate" in v.path for v in model.variables)
    n = model.params.num_task_experts
    g_task, g_shared, g_other_table = _grads(model, *batch, "click", [model.task_experts.kernels[0],
                                                                      model.shared_experts.kernels[0],
                                                                      model.task_embeddings[1].embeddings])
    assert np.all(g_task[n:2 * n] == 0.0) and np.all(g_other_table == 0.0)
    assert np.abs(g_task[:n]).sum() > 0 and np.abs(g_shared).sum() > 0


# ---------------------------------------------------------------------- gate shapes
def test_defaults_are_the_authors_gates(encoded):
    schema, _ = encoded
    model = build_model("stem", schema)
    p = model.params
    assert (p.gate_units, p.gate_input, p.num_layers) == ((128, 64), "sum", 1)
    e = p.num_shared_experts + schema.num_tasks * p.num_task_experts
    n_in = _n_in(schema, p.embedding_dim)
    (layer,) = model.stem_layers
    assert len(layer.task_gates) == schema.num_tasks
    for gate in layer.task_gates:
        assert [tuple(d.kernel.shape) for d in gate.hidden] == [(n_in, 128), (128, 64)]
        assert [d.activation.__name__ for d in gate.hidden] == ["relu", "relu"]
        assert tuple(gate.logits.kernel.shape) == (64, e)


@pytest.mark.parametrize("gate_input, factor", [("sum", 1), ("concat", 2)])
@pytest.mark.parametrize("gate_units", [[6, 4], []])
def test_gate_input_width(gate_input, factor, gate_units, encoded):
    schema, splits = encoded
    model = _tiny(schema, num_layers=2, gate_input=gate_input, gate_units=gate_units)
    h, n_in = TINY["expert_units"][-1], _n_in(schema, TINY["embedding_dim"])
    e = TINY["num_shared_experts"] + schema.num_tasks * TINY["num_task_experts"]

    def first_kernel(gate):
        return tuple((gate.hidden[0] if gate.hidden else gate.logits).kernel.shape)

    width = gate_units[0] if gate_units else e
    for layer, fan_in in zip(model.stem_layers, (n_in, h)):
        assert [first_kernel(g) for g in layer.task_gates] == [(factor * fan_in, width)] * schema.num_tasks
        assert tuple(layer.task_gates[0].logits.kernel.shape) == ((gate_units or [factor * fan_in])[-1], e)
    # the shared gate reads the shared input alone, whatever gate_input; none in the last layer
    assert first_kernel(model.stem_layers[0].shared_gate) == (n_in, width)
    assert model.stem_layers[1].shared_gate is None
    features, _ = take(*splits["test"], range(16))
    details = model.explain(features)
    assert details.gate("tasks").weights.shape == (16, schema.num_tasks, e)


def test_stem_layer_checks_and_config():
    with pytest.raises(ValueError, match="received gate_input='mean'"):
        STEMLayer(2, 1, 1, [4], gate_input="mean")
    layer = STEMLayer(2, 1, 1, [4], gate_units=[3])
    with pytest.raises(ValueError, match="one width, received 6 and 5"):
        layer(np.zeros((2, 2, 6), "float32"), np.zeros((2, 5), "float32"))
    concat = STEMLayer(2, 1, 1, [4], gate_units=[3], gate_input="concat", shared_gate=True)
    tasks, shared, weights = concat(np.ones((2, 2, 6), "float32"), np.ones((2, 5), "float32"))
    assert tuple(tasks.shape) == (2, 2, 4) and tuple(shared.shape) == (2, 4) and tuple(weights.shape) == (2, 2, 3)
    config = concat.get_config()
    assert STEMLayer.from_config(config).get_config() == config


# ------------------------------------------------------------------- save / reload
@pytest.mark.parametrize("gate_input", ["sum", "concat"])
def test_stacked_save_and_reload(gate_input, encoded, tmp_path):
    schema, splits = encoded
    features, _ = take(*splits["test"], range(64))
    model = _tiny(schema, num_layers=2, gate_input=gate_input)
    _perturb(model)
    expected = {t: np.asarray(v) for t, v in model(features).items()}
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(reloaded) is type(model) and reloaded.params == model.params
    assert reloaded.params.num_layers == 2 and reloaded.params.gate_input == gate_input
    for task, value in reloaded(features).items():
        np.testing.assert_array_equal(np.asarray(value), expected[task])


# ------------------------------------------------------------------------ validation
@pytest.mark.parametrize("params, fragments", [
    ({"gate_input": "mean"}, ["gate_input='mean'", "choose one of ['sum', 'concat']"]),
    ({"num_layers": 0}, ["num_layers must be >= 1, got 0"]),
    ({"num_layers": "2"}, ["num_layers='2'", "must be an integer"]),
    ({"num_layers": 1.5}, ["num_layers=1.5", "must be an integer"]),
    ({"gate_units": [128, 0]}, ["gate_units=[128, 0]", "list of positive integers"]),
    ({"gate_unit": [64]}, ["unknown hyper-parameter(s) ['gate_unit']", "'gate_units'"]),
])
def test_invalid_parameters_are_named(params, fragments):
    with pytest.raises(ConfigError) as err:
        ModelConfig("stem", params)
    for fragment in fragments:
        assert fragment in str(err.value) and "stem" in str(err.value), str(err.value)
    assert ModelConfig("stem", {"gate_units": []}).resolved_params()["gate_units"] == []
