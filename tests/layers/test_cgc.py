import keras
import numpy as np
import pytest

from mdmt_tf.layers import CGC

RTOL = 1e-5


def np_(x):
    return keras.ops.convert_to_numpy(x)


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def relu(z):
    return np.maximum(z, 0.0)


def _inputs(rng, b=5, t=2, fan_in=4):
    return rng.normal(size=(b, t, fan_in)).astype("float32"), rng.normal(size=(b, fan_in)).astype("float32")


def _randomise(layer, rng):
    for var in layer.trainable_weights:
        var.assign(rng.normal(size=var.shape).astype("float32"))


def test_output_shapes_and_gate_rows():
    rng = np.random.default_rng(0)
    layer = CGC(num_tasks=2, num_task_experts=2, num_shared_experts=1, expert_units=(4, 3))
    task_inputs, shared_input = _inputs(rng, b=5, t=2, fan_in=6)
    task_out, shared_out, weights = (np_(o) for o in layer(task_inputs, shared_input))
    assert task_out.shape == (5, 2, 3)
    assert shared_out.shape == (5, 3)
    assert weights.shape == (5, 2, 3)  # own 2 + shared 1
    np.testing.assert_allclose(weights.sum(-1), np.ones((5, 2)), rtol=RTOL)
    assert np.all(weights > 0)
    assert layer.task_experts.num_experts == 4 and layer.shared_experts.num_experts == 1


def test_last_level_has_no_shared_output():
    rng = np.random.default_rng(1)
    layer = CGC(num_tasks=3, num_task_experts=1, num_shared_experts=2, expert_units=(4,), last_level=True)
    task_inputs, shared_input = _inputs(rng, b=2, t=3)
    task_out, shared_out, weights = layer(task_inputs, shared_input)
    assert shared_out is None
    assert np_(task_out).shape == (2, 3, 4)
    assert np_(weights).shape == (2, 3, 3)
    assert not hasattr(layer, "shared_gate")
    assert not any("shared_gate" in w.path for w in layer.weights)


def cgc_reference(task_inputs, shared_input, layer):
    """One PLE extraction level written per task and per expert."""
    t_count, nt, ns = layer.num_tasks, layer.num_task_experts, layer.num_shared_experts
    tk = [k.numpy() for k in layer.task_experts.kernels]
    tb = [b.numpy() for b in layer.task_experts.biases]
    sk = [k.numpy() for k in layer.shared_experts.kernels]
    sb = [b.numpy() for b in layer.shared_experts.biases]

    def expert(x, kernels, biases, e):
        for k, b in zip(kernels, biases):
            x = relu(x @ k[e] + b[e])
        return x

    # task t owns experts t*nt .. t*nt + nt - 1, each reading task t's input
    task_experts = [expert(task_inputs[:, e // nt], tk, tb, e) for e in range(t_count * nt)]
    shared_experts = [expert(shared_input, sk, sb, e) for e in range(ns)]
    gk, gb = layer.task_gate_kernel.numpy(), layer.task_gate_bias.numpy()
    task_out, task_weights = [], []
    for t in range(t_count):
        w = softmax(task_inputs[:, t] @ gk[t] + gb[t])  # [B, nt + ns]
        candidates = task_experts[t * nt:(t + 1) * nt] + shared_experts
        task_out.append(sum(w[:, i:i + 1] * c for i, c in enumerate(candidates)))
        task_weights.append(w)
    shared_out = None
    if not layer.last_level:
        w = softmax(shared_input @ layer.shared_gate.kernel.numpy() + layer.shared_gate.bias.numpy())
        shared_out = sum(w[:, i:i + 1] * c for i, c in enumerate(task_experts + shared_experts))
    return np.stack(task_out, axis=1), shared_out, np.stack(task_weights, axis=1)


@pytest.mark.parametrize("last_level", [False, True])
def test_numpy_reference(last_level):
    rng = np.random.default_rng(2)
    layer = CGC(num_tasks=2, num_task_experts=2, num_shared_experts=1, expert_units=(3,), last_level=last_level)
    task_inputs, shared_input = _inputs(rng, b=4, t=2, fan_in=4)
    layer(task_inputs, shared_input)
    _randomise(layer, rng)
    expected = cgc_reference(task_inputs, shared_input, layer)
    got = layer(task_inputs, shared_input)
    for e, g in zip(expected, got):
        if e is None:
            assert g is None
        else:
            np.testing.assert_allclose(np_(g), e, rtol=RTOL, atol=1e-5)


def test_golden_constant_experts():
    layer = CGC(num_tasks=2, num_task_experts=1, num_shared_experts=1, expert_units=(1,))
    task_inputs = np.array([[[1.0, 1.0], [2.0, 2.0]]], "float32")
    shared_input = np.array([[3.0, 3.0]], "float32")
    layer(task_inputs, shared_input)
    for var in layer.trainable_weights:
        var.assign(np.zeros(var.shape, "float32"))
    layer.task_experts.kernels[0].assign(np.ones((2, 2, 1), "float32"))
    layer.shared_experts.kernels[0].assign(np.ones((1, 2, 1), "float32"))
    # experts: task0 = 1+1 = 2, task1 = 2+2 = 4, shared = 3+3 = 6; zero gates -> uniform weights
    # task 0: (2 + 6) / 2 = 4; task 1: (4 + 6) / 2 = 5; shared gate over all 3: (2 + 4 + 6) / 3 = 4
    task_out, shared_out, weights = layer(task_inputs, shared_input)
    np.testing.assert_allclose(np_(task_out), [[[4.0], [5.0]]], rtol=RTOL)
    np.testing.assert_allclose(np_(shared_out), [[4.0]], rtol=RTOL)
    np.testing.assert_allclose(np_(weights), np.full((1, 2, 2), 0.5), rtol=RTOL)


@pytest.mark.parametrize("last_level", [False, True])
def test_roundtrip(roundtrip, last_level):
    rng = np.random.default_rng(3)
    layer = CGC(num_tasks=2, num_task_experts=1, num_shared_experts=2, expert_units=[3, 2], last_level=last_level,
                name="cgc")
    task_inputs, shared_input = _inputs(rng, b=3, t=2, fan_in=4)
    roundtrip(layer, task_inputs, shared_input)


@pytest.mark.parametrize("args, fragments", [
    ((0, 1, 1, (4,)), ["`num_tasks`", "num_tasks=0"]),
    ((2, 0, 1, (4,)), ["`num_task_experts`", "num_task_experts=0"]),
    ((2, 1, 0, (4,)), ["`num_shared_experts`", "num_shared_experts=0"]),
    ((2, 1, 1, ()), ["`expert_units`", "expert_units=()"]),
])
def test_validation(args, fragments):
    with pytest.raises(ValueError) as info:
        CGC(*args)
    for fragment in fragments:
        assert fragment in str(info.value)
