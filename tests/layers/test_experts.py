import keras
import numpy as np
import pytest

from mdmt_tf.layers import ExpertGroup, GroupedGlorotUniform

RTOL = 1e-5


def np_(x):
    return keras.ops.convert_to_numpy(x)


def relu(z):
    return np.maximum(z, 0.0)


def test_golden_rank2_input_every_expert_reads_it():
    layer = ExpertGroup(2, (2, 1), kernel_initializer="ones")
    x = np.array([[1.0, 2.0, 3.0]], "float32")
    # every expert: layer 0 -> 1+2+3 = 6 per unit; layer 1 -> 6+6 = 12
    np.testing.assert_allclose(np_(layer(x)), [[[12.0], [12.0]]], rtol=RTOL)
    # expert 1's first kernel doubled: 2*6 = 12 per unit -> 24; expert 0 unchanged
    layer.kernels[0].assign(np.stack([np.ones((3, 2)), 2 * np.ones((3, 2))]).astype("float32"))
    np.testing.assert_allclose(np_(layer(x)), [[[12.0], [24.0]]], rtol=RTOL)


def test_golden_rank3_input_expert_reads_its_slice():
    layer = ExpertGroup(2, (2,), kernel_initializer="ones")
    x = np.array([[[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]], "float32")
    # expert 0 reads [1, 2, 3] -> 6 per unit; expert 1 reads [1, 1, 1] -> 3 per unit
    np.testing.assert_allclose(np_(layer(x)), [[[6.0, 6.0], [3.0, 3.0]]], rtol=RTOL)
    layer.kernels[0].assign(np.stack([np.ones((3, 2)), 2 * np.ones((3, 2))]).astype("float32"))
    # expert 1 kernel x2 -> 6 per unit
    np.testing.assert_allclose(np_(layer(x)), [[[6.0, 6.0], [6.0, 6.0]]], rtol=RTOL)


def _reference(x, kernels, biases, act):
    h = x
    for k, b in zip(kernels, biases):
        if h.ndim == 2:
            h = np.stack([h @ k[e] for e in range(k.shape[0])], axis=1) + b
        else:
            h = np.stack([h[:, e] @ k[e] for e in range(k.shape[0])], axis=1) + b
        h = act(h)
    return h


@pytest.mark.parametrize("rank", [2, 3])
def test_numpy_reference(rank):
    rng = np.random.default_rng(0)
    e, units = 3, (4, 2)
    x = rng.normal(size=(5, 6) if rank == 2 else (5, e, 6)).astype("float32")
    layer = ExpertGroup(e, units, activation="relu")
    layer.build(x.shape)
    for var in layer.kernels + layer.biases:
        var.assign(rng.normal(size=var.shape).astype("float32"))
    expected = _reference(x, [k.numpy() for k in layer.kernels], [b.numpy() for b in layer.biases], relu)
    out = np_(layer(x))
    assert out.shape == (5, e, 2) == layer.compute_output_shape(x.shape)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=1e-5)


def _layer_norm(h, gamma, beta, eps):
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    return (h - mean) / np.sqrt(var + eps) * gamma + beta


@pytest.mark.parametrize("rank", [2, 3])
def test_layer_norm_per_expert_numpy_reference(rank):
    """norm="layer": Dense -> LayerNorm (each expert its own scale and offset) -> ReLU per layer."""
    rng = np.random.default_rng(3)
    e, units, eps = 3, (4, 2), 1e-5
    x = rng.normal(size=(5, 6) if rank == 2 else (5, e, 6)).astype("float32")
    layer = ExpertGroup(e, units, norm="layer", epsilon=eps)
    layer.build(x.shape)
    assert [tuple(g.shape) for g in layer.gammas] == [(3, 4), (3, 2)] == [tuple(b.shape) for b in layer.betas]
    for var in layer.kernels + layer.biases + layer.gammas + layer.betas:
        var.assign(rng.normal(size=var.shape).astype("float32"))
    h = x
    for k, b, g, bt in zip(*([np_(v) for v in vs] for vs in (layer.kernels, layer.biases, layer.gammas, layer.betas))):
        pre = np.stack([(h if h.ndim == 2 else h[:, i]) @ k[i] for i in range(e)], axis=1) + b
        h = relu(_layer_norm(pre, g, bt, eps))
    np.testing.assert_allclose(np_(layer(x)), h, rtol=1e-4, atol=1e-5)
    # a different scale for expert 1 only changes expert 1's output
    before = np_(layer(x))
    layer.gammas[1].assign(np_(layer.gammas[1]) * np.array([[1.0], [3.0], [1.0]], "float32"))
    after = np_(layer(x))
    np.testing.assert_array_equal(after[:, [0, 2]], before[:, [0, 2]])
    assert not np.allclose(after[:, 1], before[:, 1])


def test_layer_norm_roundtrip_and_bad_norm(roundtrip):
    layer = ExpertGroup(2, (3, 2), norm="layer", epsilon=1e-5, name="experts")
    roundtrip(layer, np.random.default_rng(4).normal(size=(4, 5)).astype("float32"))
    assert layer.get_config()["norm"] == "layer" and layer.get_config()["epsilon"] == 1e-5
    with pytest.raises(ValueError, match=r"`norm`.*received norm='batch'"):
        ExpertGroup(2, (3,), norm="batch")


def test_weight_shapes():
    layer = ExpertGroup(3, (4, 2))
    layer.build((None, 6))
    assert [tuple(k.shape) for k in layer.kernels] == [(3, 6, 4), (3, 4, 2)]
    assert [tuple(b.shape) for b in layer.biases] == [(3, 4), (3, 2)]


def test_rank3_with_wrong_expert_count_raises():
    layer = ExpertGroup(3, (4,))
    with pytest.raises(ValueError, match=r"num_experts=3.*\(None, 2, 5\)"):
        layer.build((None, 2, 5))


def test_roundtrip(roundtrip):
    layer = ExpertGroup(2, (3, 2), activation="tanh", name="experts")
    x = np.random.default_rng(1).normal(size=(4, 5)).astype("float32")
    roundtrip(layer, x)


def test_roundtrip_rank3(roundtrip):
    layer = ExpertGroup(2, (3,), kernel_initializer="glorot_uniform", bias_initializer="ones")
    x = np.random.default_rng(2).normal(size=(4, 2, 5)).astype("float32")
    roundtrip(layer, x)


@pytest.mark.parametrize("args, fragments", [
    ((0, (4,)), ["`num_experts`", "num_experts=0"]),
    ((-2, (4,)), ["`num_experts`", "num_experts=-2"]),
    ((2.0, (4,)), ["`num_experts`", "num_experts=2.0"]),
    ((2, ()), ["`units`", "units=()"]),
    ((2, (4, -1)), ["`units`", "units=(4, -1)"]),
])
def test_validation(args, fragments):
    with pytest.raises(ValueError) as info:
        ExpertGroup(*args)
    for fragment in fragments:
        assert fragment in str(info.value)


# --- GroupedGlorotUniform (the registered initializer the stacked kernels use) ---

def test_grouped_glorot_scale_ignores_leading_dims():
    init = GroupedGlorotUniform(seed=5)
    values = np_(init((16, 20, 30)))
    limit = np.sqrt(6.0 / (20 + 30))  # fans of one (20, 30) slice, not folded with the 16 experts
    assert values.shape == (16, 20, 30)
    assert np.abs(values).max() <= limit
    assert np.abs(values).max() > 0.95 * limit  # 9600 uniform draws reach the edge
    # uniform on [-l, l] has variance l^2 / 3
    np.testing.assert_allclose(values.var(), limit ** 2 / 3, rtol=0.05)


def test_grouped_glorot_seed_and_roundtrip():
    init = GroupedGlorotUniform(seed=11)
    assert init.get_config() == {"seed": 11}
    config = keras.saving.serialize_keras_object(init)
    assert config["registered_name"] == "mdmt_tf>GroupedGlorotUniform"
    clone = keras.saving.deserialize_keras_object(config)
    assert isinstance(clone, GroupedGlorotUniform)
    np.testing.assert_array_equal(np_(clone((2, 3, 4))), np_(init((2, 3, 4))))
    unseeded = GroupedGlorotUniform()
    assert isinstance(unseeded.seed, int)
