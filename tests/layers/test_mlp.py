import keras
import numpy as np
import pytest

from mdmt_tf.layers import MLP

RTOL = 1e-5


def relu(z):
    return np.maximum(z, 0.0)


def _set_random(mlp, rng):
    for dense in mlp.dense_layers:
        dense.kernel.assign(rng.normal(size=dense.kernel.shape).astype("float32"))
        dense.bias.assign(rng.normal(size=dense.bias.shape).astype("float32"))


def test_golden_ones():
    mlp = MLP(units=(2, 1), kernel_initializer="ones")
    out = keras.ops.convert_to_numpy(mlp(np.array([[1.0, 2.0, 3.0]], "float32")))
    # layer 0: 1+2+3 = 6 per unit -> relu -> [6, 6]; layer 1: 6+6 = 12 -> relu -> 12
    np.testing.assert_allclose(out, [[12.0]], rtol=RTOL)
    assert out.shape == (1, 1)


@pytest.mark.parametrize("activate_last, expected", [(True, 0.0), (False, -10.0)])
def test_activate_last(activate_last, expected):
    mlp = MLP(units=(2, 1), kernel_initializer="ones", bias_initializer=keras.initializers.Constant(-10.0),
              activate_last=activate_last)
    out = keras.ops.convert_to_numpy(mlp(np.array([[1.0, 2.0, 3.0]], "float32")))
    # layer 0: 6 - 10 = -4 -> relu -> [0, 0]; layer 1: 0 + 0 - 10 = -10 -> relu 0 (or linear -10)
    np.testing.assert_allclose(out, [[expected]], rtol=RTOL)


def test_numpy_reference_no_norm():
    rng = np.random.default_rng(0)
    mlp = MLP(units=(4, 3), activation="tanh", activate_last=False)
    x = rng.normal(size=(5, 6)).astype("float32")
    mlp.build(x.shape)
    _set_random(mlp, rng)
    (k0, b0), (k1, b1) = [(d.kernel.numpy(), d.bias.numpy()) for d in mlp.dense_layers]
    expected = np.tanh(x @ k0 + b0) @ k1 + b1  # last layer linear
    np.testing.assert_allclose(keras.ops.convert_to_numpy(mlp(x)), expected, rtol=RTOL, atol=1e-6)


def _layer_norm(z, eps=1e-3):
    mean = z.mean(-1, keepdims=True)
    var = z.var(-1, keepdims=True)
    return (z - mean) / np.sqrt(var + eps)


def test_layer_norm_reference():
    rng = np.random.default_rng(1)
    mlp = MLP(units=(4, 3), norm="layer", activate_last=True)
    x = rng.normal(size=(5, 6)).astype("float32")
    mlp.build(x.shape)
    _set_random(mlp, rng)
    assert all(isinstance(n, keras.layers.LayerNormalization) for n in mlp.norm_layers)
    (k0, b0), (k1, b1) = [(d.kernel.numpy(), d.bias.numpy()) for d in mlp.dense_layers]
    h = relu(_layer_norm(x @ k0 + b0))
    expected = relu(_layer_norm(h @ k1 + b1))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(mlp(x)), expected, rtol=RTOL, atol=1e-5)


def test_no_norm_on_linear_last_layer():
    mlp = MLP(units=(4, 3, 2), norm="layer", activate_last=False)
    assert [type(n).__name__ if n is not None else None for n in mlp.norm_layers] == [
        "LayerNormalization", "LayerNormalization", None]


def test_batch_norm_training_vs_inference():
    rng = np.random.default_rng(2)
    mlp = MLP(units=(3,), norm="batch")
    x = rng.normal(size=(8, 4)).astype("float32")
    mlp.build(x.shape)
    _set_random(mlp, rng)
    k, b = mlp.dense_layers[0].kernel.numpy(), mlp.dense_layers[0].bias.numpy()
    z = x @ k + b
    # inference: fresh moving stats mean 0, variance 1
    np.testing.assert_allclose(keras.ops.convert_to_numpy(mlp(x, training=False)), relu(z / np.sqrt(1.0 + 1e-3)),
                               rtol=RTOL, atol=1e-6)
    # training: the batch's own moments (biased variance)
    expected = relu((z - z.mean(0)) / np.sqrt(z.var(0) + 1e-3))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(mlp(x, training=True)), expected, rtol=RTOL, atol=1e-5)


def test_dropout_only_in_training():
    mlp = MLP(units=(50,), kernel_initializer="ones", dropout=0.5)
    x = np.ones((4, 3), "float32")
    # every unit = 1+1+1 = 3; inference leaves it, training zeroes some and scales the rest by 1/(1-0.5) = 2
    np.testing.assert_allclose(keras.ops.convert_to_numpy(mlp(x)), np.full((4, 50), 3.0), rtol=RTOL)
    train = keras.ops.convert_to_numpy(mlp(x, training=True))
    assert set(np.unique(train).tolist()) == {0.0, 6.0}


def test_dense_layers_have_separate_weights():
    mlp = MLP(units=(2, 1), kernel_initializer="ones")
    mlp.build((None, 3))
    mlp.dense_layers[1].kernel.assign(np.full((2, 1), 3.0, "float32"))
    # layer 0 unchanged: [6, 6]; layer 1: 3*6 + 3*6 = 36
    np.testing.assert_allclose(keras.ops.convert_to_numpy(mlp(np.array([[1.0, 2.0, 3.0]], "float32"))), [[36.0]],
                               rtol=RTOL)
    assert len(mlp.trainable_weights) == 4


def test_compute_output_shape():
    assert MLP(units=(8, 5)).compute_output_shape((None, 7)) == (None, 5)
    assert MLP(units=4).units == (4,)


@pytest.mark.parametrize("norm", [None, "layer", "batch"])
def test_roundtrip(roundtrip, norm):
    mlp = MLP(units=(4, 2), norm=norm, dropout=0.25, activation="tanh", activate_last=False, name="m")
    x = np.random.default_rng(3).normal(size=(4, 3)).astype("float32")
    mlp(x)
    if norm == "batch":  # make the moving stats non-trivial so copying them matters
        mlp(x, training=True)
    roundtrip(mlp, x)


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(units=(2, 1), norm="foo"), ["`norm`", "norm='foo'"]),
    (dict(units=()), ["`units`", "units=()"]),
    (dict(units=(4, 0)), ["`units`", "units=(4, 0)"]),
    (dict(units=(4, 2.5)), ["`units`", "units=(4, 2.5)"]),
    (dict(units=(4,), dropout=1.0), ["`dropout`", "dropout=1.0"]),
    (dict(units=(4,), dropout=-0.1), ["`dropout`", "dropout=-0.1"]),
])
def test_validation(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        MLP(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
