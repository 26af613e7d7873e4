import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.layers import EPNet, GateNU, PPNetTowers

RTOL = 1e-5


def np_(x):
    return keras.ops.convert_to_numpy(x)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def gate_nu_reference(x, gate):
    """scale * sigmoid(relu(x W1 + b1) W2 + b2) from the gate's current weights."""
    h = np.maximum(x @ gate.hidden.kernel.numpy() + gate.hidden.bias.numpy(), 0.0)
    return gate.scale * sigmoid(h @ gate.out.kernel.numpy() + gate.out.bias.numpy())


def _randomise(layer, rng):
    for var in layer.trainable_weights:
        var.assign(rng.normal(size=var.shape).astype("float32"))


# --- GateNU ---

def test_gate_nu_golden():
    gate = GateNU(output_dim=2, hidden_units=3, scale=2.0, kernel_initializer="ones")
    out = np_(gate(np.array([[1.0, 2.0], [-1.0, -2.0]], "float32")))
    # row 0: hidden = relu(1+2) = 3 (x3 units); out logit = 3+3+3 = 9 -> 2 * sigmoid(9)
    # row 1: hidden = relu(-3) = 0; logit 0 -> 2 * sigmoid(0) = 1 (the neutral gate)
    np.testing.assert_allclose(out, [[2 * sigmoid(9.0)] * 2, [1.0, 1.0]], rtol=RTOL)


def test_gate_nu_numpy_reference():
    rng = np.random.default_rng(0)
    gate = GateNU(output_dim=4, hidden_units=5, scale=3.0)
    x = rng.normal(size=(6, 3)).astype("float32")
    gate.build(x.shape)
    _randomise(gate, rng)
    out = np_(gate(x))
    np.testing.assert_allclose(out, gate_nu_reference(x, gate), rtol=RTOL)
    assert np.all((out > 0) & (out < 3.0))


# --- EPNet ---

def _epnet(rng, k=4, kd=3, hidden=5, scale=2.0):
    layer = EPNet(hidden_units=hidden, scale=scale)
    emb = rng.normal(size=(6, k)).astype("float32")
    dom = rng.normal(size=(6, kd)).astype("float32")
    layer(emb, dom)
    _randomise(layer, rng)
    return layer, emb, dom


def test_epnet_golden():
    layer = EPNet(hidden_units=2)
    emb = np.array([[1.0, -1.0]], "float32")
    dom = np.array([[0.5]], "float32")
    layer(emb, dom)
    for var in layer.gate.trainable_weights:
        var.assign(np.zeros(var.shape, "float32"))
    # zero weights: delta = 2 * sigmoid(0) = 1 -> output = embedding
    np.testing.assert_allclose(np_(layer(emb, dom)), emb, rtol=RTOL)
    assert layer.gate.output_dim == 2
    assert tuple(layer.gate.hidden.kernel.shape) == (1 + 2, 2)  # input: domain (1) ++ embedding (2)


def test_epnet_numpy_reference():
    rng = np.random.default_rng(1)
    layer, emb, dom = _epnet(rng, scale=2.5)
    delta = gate_nu_reference(np.concatenate([dom, emb], axis=-1), layer.gate)  # E(domain) ++ E
    np.testing.assert_allclose(np_(layer(emb, dom)), delta * emb, rtol=RTOL, atol=1e-6)


def test_epnet_gate_reads_stop_gradient_embedding():
    rng = np.random.default_rng(2)
    layer, emb, dom = _epnet(rng)
    c = rng.normal(size=emb.shape).astype("float32")
    emb_t, dom_t = tf.constant(emb), tf.constant(dom)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([emb_t, dom_t])
        loss = tf.reduce_sum(layer(emb_t, dom_t) * c)
    delta = gate_nu_reference(np.concatenate([dom, emb], axis=-1), layer.gate)
    # delta is a constant w.r.t. the embedding: d/dE sum(c * delta * E) = c * delta
    np.testing.assert_allclose(tape.gradient(loss, emb_t).numpy(), c * delta, rtol=RTOL, atol=1e-6)
    # the domain embedding still trains through the gate
    assert np.abs(tape.gradient(loss, dom_t).numpy()).max() > 1e-4


def test_epnet_return_gate():
    rng = np.random.default_rng(8)
    layer, emb, dom = _epnet(rng, scale=2.5)
    out, delta = layer(emb, dom, return_gate=True)
    expected = gate_nu_reference(np.concatenate([dom, emb], axis=-1), layer.gate)
    np.testing.assert_allclose(np_(delta), expected, rtol=RTOL, atol=1e-6)
    assert np.all((np_(delta) > 0) & (np_(delta) < 2.5))
    np.testing.assert_array_equal(np_(out), np_(layer(emb, dom)))


# --- PPNetTowers ---

def ppnet_reference(x, prior, layer):
    gate_in = np.concatenate([prior, x], axis=-1)
    t_count = layer.num_tasks
    h = np.repeat(x[:, None, :], t_count, axis=1)
    last = len(layer.kernels) - 1
    for i, (gate, kernel, bias) in enumerate(zip(layer.gates, layer.kernels, layer.biases)):
        delta = gate_nu_reference(gate_in, gate).reshape(x.shape[0], t_count, -1)
        g = delta * h
        h = np.stack([g[:, t] @ kernel.numpy()[t] for t in range(t_count)], axis=1) + bias.numpy()
        if i < last:
            h = np.maximum(h, 0.0)
    return h[..., 0]


@pytest.mark.parametrize("units", [(), (3,), (3, 2)])
def test_ppnet_numpy_reference(units):
    rng = np.random.default_rng(3)
    layer = PPNetTowers(num_tasks=2, units=units, gate_hidden_units=5, scale=2.0)
    x = rng.normal(size=(6, 4)).astype("float32")
    prior = rng.normal(size=(6, 3)).astype("float32")
    layer(x, prior)
    _randomise(layer, rng)
    widths = (4,) + tuple(units)
    assert [g.output_dim for g in layer.gates] == [2 * w for w in widths]
    assert [tuple(k.shape) for k in layer.kernels] == [(2, w, o) for w, o in zip(widths, tuple(units) + (1,))]
    out = np_(layer(x, prior))
    assert out.shape == (6, 2)
    np.testing.assert_allclose(out, ppnet_reference(x, prior, layer), rtol=RTOL, atol=1e-5)


def test_ppnet_return_gates():
    rng = np.random.default_rng(9)
    layer = PPNetTowers(num_tasks=2, units=(3,), gate_hidden_units=5, scale=1.5)
    x = rng.normal(size=(6, 4)).astype("float32")
    prior = rng.normal(size=(6, 3)).astype("float32")
    layer(x, prior)
    _randomise(layer, rng)
    logits, deltas = layer(x, prior, return_gates=True)
    np.testing.assert_array_equal(np_(logits), np_(layer(x, prior)))
    assert [tuple(d.shape) for d in deltas] == [(6, 2, 4), (6, 2, 3)]
    gate_in = np.concatenate([prior, x], axis=-1)
    for delta, gate in zip(deltas, layer.gates):
        np.testing.assert_allclose(np_(delta), gate_nu_reference(gate_in, gate).reshape(np_(delta).shape),
                                   rtol=RTOL, atol=1e-6)
        assert np.all((np_(delta) > 0) & (np_(delta) < 1.5))


def test_ppnet_golden_neutral_gates():
    layer = PPNetTowers(num_tasks=2, units=(), gate_hidden_units=2)
    x = np.array([[1.0, 2.0]], "float32")
    prior = np.array([[3.0]], "float32")
    layer(x, prior)
    for gate in layer.gates:
        for var in gate.trainable_weights:
            var.assign(np.zeros(var.shape, "float32"))
    layer.kernels[0].assign(np.array([[[1.0], [1.0]], [[2.0], [-1.0]]], "float32"))
    # neutral gates (delta = 1): task 0: 1 + 2 = 3; task 1: 2*1 - 1*2 = 0
    np.testing.assert_allclose(np_(layer(x, prior)), [[3.0, 0.0]], rtol=RTOL, atol=1e-6)


def test_ppnet_gate_reads_stop_gradient_x():
    rng = np.random.default_rng(4)
    layer = PPNetTowers(num_tasks=2, units=(), gate_hidden_units=5)
    x = rng.normal(size=(5, 4)).astype("float32")
    prior = rng.normal(size=(5, 3)).astype("float32")
    layer(x, prior)
    _randomise(layer, rng)
    c = rng.normal(size=(5, 2)).astype("float32")
    x_t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_t)
        loss = tf.reduce_sum(layer(x_t, prior) * c)
    # linear head: logit_t = sum_i delta_t[i] x_i W_t[i] + b_t, delta constant w.r.t. x
    delta = gate_nu_reference(np.concatenate([prior, x], axis=-1), layer.gates[0]).reshape(5, 2, 4)
    w = layer.kernels[0].numpy()[..., 0]  # [T, in]
    expected = np.einsum("bt,bti,ti->bi", c, delta, w)
    np.testing.assert_allclose(tape.gradient(loss, x_t).numpy(), expected, rtol=RTOL, atol=1e-6)


# --- serialization and validation ---

def test_gate_nu_roundtrip(roundtrip):
    gate = GateNU(output_dim=3, hidden_units=4, scale=1.5, bias_initializer="ones", name="gnu")
    roundtrip(gate, np.random.default_rng(5).normal(size=(2, 5)).astype("float32"))


def test_epnet_roundtrip(roundtrip):
    layer, emb, dom = _epnet(np.random.default_rng(6), hidden=3, scale=1.7)
    roundtrip(layer, emb, dom)


def test_ppnet_roundtrip(roundtrip):
    rng = np.random.default_rng(7)
    layer = PPNetTowers(num_tasks=2, units=[3], gate_hidden_units=4, scale=1.5, activation="tanh", name="pp")
    x, prior = rng.normal(size=(3, 4)).astype("float32"), rng.normal(size=(3, 2)).astype("float32")
    layer(x, prior)
    _randomise(layer, rng)
    roundtrip(layer, x, prior)


@pytest.mark.parametrize("cls, kwargs, fragments", [
    (GateNU, dict(output_dim=0), ["`output_dim`", "output_dim=0"]),
    (GateNU, dict(output_dim=2, hidden_units=0), ["`hidden_units`", "hidden_units=0"]),
    (EPNet, dict(hidden_units=-3), ["`hidden_units`", "hidden_units=-3"]),
    (PPNetTowers, dict(num_tasks=0), ["`num_tasks`", "num_tasks=0"]),
    (PPNetTowers, dict(num_tasks=2, units=(0,)), ["`units`", "units=(0,)"]),
    (PPNetTowers, dict(num_tasks=2, gate_hidden_units=0), ["`gate_hidden_units`", "gate_hidden_units=0"]),
])
def test_validation(cls, kwargs, fragments):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
