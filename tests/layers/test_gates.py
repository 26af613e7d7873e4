import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.layers import GateLogits, SoftmaxGate, aftb_mix, mix

RTOL = 1e-5


def np_(x):
    return keras.ops.convert_to_numpy(x)


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


# --- SoftmaxGate ---

def test_softmax_gate_golden_uniform():
    gate = SoftmaxGate(num_experts=4, num_gates=2, kernel_initializer="ones")
    out = np_(gate(np.array([[1.0, -2.0, 3.0]], "float32")))
    # every logit = 1 - 2 + 3 = 2 -> equal logits -> 1/4 each
    assert out.shape == (1, 2, 4)
    np.testing.assert_allclose(out, np.full((1, 2, 4), 0.25), rtol=RTOL)


@pytest.mark.parametrize("hidden_units", [(), (5,)])
def test_softmax_gate_numpy_reference(hidden_units):
    rng = np.random.default_rng(0)
    gate = SoftmaxGate(num_experts=3, num_gates=2, hidden_units=hidden_units)
    x = rng.normal(size=(4, 6)).astype("float32")
    gate.build(x.shape)
    for var in gate.trainable_weights:
        var.assign(rng.normal(size=var.shape).astype("float32"))
    h = x
    for layer in gate.hidden:
        h = np.maximum(h @ layer.kernel.numpy() + layer.bias.numpy(), 0.0)
    logits = h @ gate.logits.kernel.numpy() + gate.logits.bias.numpy()  # [B, G*E], gate-major
    expected = softmax(logits.reshape(4, 2, 3))
    out = np_(gate(x))
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(out.sum(-1), np.ones((4, 2)), rtol=RTOL)
    assert len(gate.trainable_weights) == 2 + 2 * len(hidden_units)


@pytest.mark.parametrize("stop", [True, False])
def test_softmax_gate_stop_gradient_input(stop):
    rng = np.random.default_rng(1)
    gate = SoftmaxGate(num_experts=3, num_gates=2, hidden_units=(4,), stop_gradient_input=stop)
    x = tf.constant(rng.normal(size=(5, 6)).astype("float32"))
    c = tf.constant(rng.normal(size=(5, 2, 3)).astype("float32"))  # not constant per row: sum of a gate is 1
    gate(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(gate(x) * c)
    grad_x, *grad_w = tape.gradient(loss, [x] + gate.trainable_weights,
                                    unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if stop:
        assert np.all(grad_x.numpy() == 0.0)
    else:
        assert np.abs(grad_x.numpy()).max() > 1e-4
    # the gate's own weights train either way
    for g in grad_w:
        assert np.abs(g.numpy()).max() > 1e-4


# --- GateLogits ---

def test_gate_logits_architecture_weights_and_uniform_init():
    gate = GateLogits(num_experts=4, num_gates=3)
    out = np_(gate(np.zeros((2, 7), "float32")))
    assert len(gate.architecture_weights) == 1
    assert gate.architecture_weights[0] is gate.gate_logits
    assert tuple(gate.gate_logits.shape) == (3, 4)
    # zero logits -> 1/4 everywhere
    np.testing.assert_allclose(out, np.full((2, 3, 4), 0.25), rtol=RTOL)


def test_gate_logits_softmax_broadcast_over_batch():
    rng = np.random.default_rng(2)
    gate = GateLogits(num_experts=3, num_gates=2)
    gate.build()
    logits = rng.normal(size=(2, 3)).astype("float32")
    gate.gate_logits.assign(logits)
    out = np_(gate(np.zeros((5, 1), "float32")))
    assert out.shape == (5, 2, 3)
    np.testing.assert_allclose(out, np.broadcast_to(softmax(logits), (5, 2, 3)), rtol=RTOL)


def test_gate_logits_initializer():
    gate = GateLogits(num_experts=2, initializer=keras.initializers.Constant(3.0))
    gate.build()
    np.testing.assert_array_equal(gate.gate_logits.numpy(), [[3.0, 3.0]])


# --- mix / aftb_mix ---

def test_mix_golden():
    weights = np.array([[[0.25, 0.75]]], "float32")
    experts = np.array([[[1.0, 2.0], [3.0, 4.0]]], "float32")
    # 0.25*[1, 2] + 0.75*[3, 4] = [0.25 + 2.25, 0.5 + 3] = [2.5, 3.5]
    np.testing.assert_allclose(np_(mix(weights, experts)), [[[2.5, 3.5]]], rtol=RTOL)


def test_mix_numpy_reference():
    rng = np.random.default_rng(3)
    w = rng.random((4, 2, 3)).astype("float32")
    x = rng.normal(size=(4, 3, 5)).astype("float32")
    np.testing.assert_allclose(np_(mix(w, x)), np.einsum("bge,beh->bgh", w, x), rtol=RTOL, atol=1e-6)


KEEP = np.array([[1, 0, 1, 0], [0, 0, 1, 1]], "float32")  # expert 1 is held by every gate


def test_aftb_mix_forward_equals_mix_exactly():
    # dyadic values: every product and partial sum is exact in float32, whatever the summation order
    rng = np.random.default_rng(4)
    w = (rng.integers(0, 8, size=(3, 2, 4)) / 8).astype("float32")
    x = rng.integers(-8, 8, size=(3, 4, 5)).astype("float32")
    np.testing.assert_array_equal(np_(aftb_mix(w, x, KEEP)), np_(mix(w, x)))


def test_aftb_mix_forward_matches_mix_on_random_floats():
    rng = np.random.default_rng(5)
    w = rng.random((6, 2, 4)).astype("float32")
    x = rng.normal(size=(6, 4, 5)).astype("float32")
    np.testing.assert_allclose(np_(aftb_mix(w, x, KEEP)), np_(mix(w, x)), rtol=RTOL, atol=1e-6)


def _grads(w, x, keep, c):
    w, x = tf.constant(w), tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([w, x])
        loss = tf.reduce_sum(aftb_mix(w, x, keep) * c)
    return tape.gradient(loss, x).numpy(), tape.gradient(loss, w).numpy()


def test_aftb_mix_gradients_shared_keep():
    rng = np.random.default_rng(6)
    w = rng.random((3, 2, 4)).astype("float32")
    x = rng.normal(size=(3, 4, 5)).astype("float32")
    c = rng.normal(size=(3, 2, 5)).astype("float32")
    grad_x, grad_w = _grads(w, x, KEEP, c)
    # expert 1 is kept by no gate: exactly zero gradient
    assert np.all(grad_x[:, 1] == 0.0)
    for e in (0, 2, 3):
        assert np.all(np.abs(grad_x[:, e]) > 0), e
    # d loss / d x[b, e, h] = sum_g w[b, g, e] keep[g, e] c[b, g, h]
    np.testing.assert_allclose(grad_x, np.einsum("bge,ge,bgh->beh", w, KEEP, c), rtol=RTOL, atol=1e-6)
    # d loss / d w[b, g, e] = sum_h c[b, g, h] x[b, e, h]: held experts included
    np.testing.assert_allclose(grad_w, np.einsum("bgh,beh->bge", c, x), rtol=RTOL, atol=1e-6)
    assert np.all(np.abs(grad_w[:, :, 1]) > 0)


def test_aftb_mix_gradients_per_sample_keep():
    rng = np.random.default_rng(7)
    keep = np.zeros((2, 2, 3), "float32")  # [B, G, E]
    keep[0, 0, 1] = 1.0  # sample 0 keeps expert 1 for gate 0
    keep[1, 1, 2] = 1.0  # sample 1 keeps expert 2 for gate 1
    keep[:, :, 0] = 1.0  # expert 0 kept everywhere
    w = rng.random((2, 2, 3)).astype("float32")
    x = rng.normal(size=(2, 3, 4)).astype("float32")
    c = rng.normal(size=(2, 2, 4)).astype("float32")
    grad_x, grad_w = _grads(w, x, keep, c)
    assert np.all(grad_x[1, 1] == 0.0) and np.all(grad_x[0, 2] == 0.0)
    assert np.all(np.abs(grad_x[0, 1]) > 0) and np.all(np.abs(grad_x[1, 2]) > 0)
    np.testing.assert_allclose(grad_x, np.einsum("bge,bge,bgh->beh", w, keep, c), rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(grad_w, np.einsum("bgh,beh->bge", c, x), rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(np_(aftb_mix(w, x, keep)), np_(mix(w, x)), rtol=RTOL, atol=1e-6)


# --- serialization and validation ---

def test_softmax_gate_roundtrip(roundtrip):
    gate = SoftmaxGate(num_experts=3, num_gates=2, hidden_units=[4], stop_gradient_input=True, name="g")
    roundtrip(gate, np.random.default_rng(8).normal(size=(3, 5)).astype("float32"))


def test_gate_logits_roundtrip(roundtrip):
    gate = GateLogits(num_experts=3, num_gates=2)
    gate.build()
    gate.gate_logits.assign(np.random.default_rng(9).normal(size=(2, 3)).astype("float32"))
    clone = roundtrip(gate, np.zeros((4, 2), "float32"))
    assert clone.architecture_weights[0] is clone.gate_logits


@pytest.mark.parametrize("cls, kwargs, fragments", [
    (SoftmaxGate, dict(num_experts=0), ["`num_experts`", "num_experts=0"]),
    (SoftmaxGate, dict(num_experts=2, num_gates=0), ["`num_gates`", "num_gates=0"]),
    (SoftmaxGate, dict(num_experts=2, hidden_units=(0,)), ["`hidden_units`", "hidden_units=(0,)"]),
    (GateLogits, dict(num_experts=-1), ["`num_experts`", "num_experts=-1"]),
    (GateLogits, dict(num_experts=2, num_gates=1.5), ["`num_gates`", "num_gates=1.5"]),
])
def test_validation(cls, kwargs, fragments):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
