import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.layers import PartitionedNorm, StarFC

RTOL = 1e-5
EPS = 1e-3


def np_(x):
    return keras.ops.convert_to_numpy(x)


def _random_norm(rng, num_domains=3, features=4, momentum=0.9):
    layer = PartitionedNorm(num_domains, momentum=momentum, epsilon=EPS)
    layer.build((None, features))
    for var in (layer.gamma, layer.beta, layer.domain_gamma, layer.domain_beta, layer.moving_mean):
        var.assign(rng.normal(size=var.shape).astype("float32"))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=layer.moving_variance.shape).astype("float32"))
    return layer


def _params(layer):
    return {name: getattr(layer, name).numpy().copy() for name in
            ("gamma", "beta", "domain_gamma", "domain_beta", "moving_mean", "moving_variance")}


def norm_reference(x, domain, p, mean, var):
    """Row-by-row: (gamma * gamma_d) (x - mean_d) / sqrt(var_d + eps) + beta + beta_d."""
    out = np.empty_like(x)
    for b, d in enumerate(domain):
        out[b] = (p["gamma"] * p["domain_gamma"][d] * (x[b] - mean[d]) / np.sqrt(var[d] + EPS)
                  + p["beta"] + p["domain_beta"][d])
    return out


def test_partitioned_norm_golden_inference():
    layer = PartitionedNorm(2, epsilon=0.25)
    x = np.array([[3.0, -1.0]], "float32")
    # fresh: moving mean 0, variance 1, gamma 1, beta 0 -> x / sqrt(1 + 0.25) = x / 1.118034
    np.testing.assert_allclose(np_(layer(x, np.array([1]))), [[2.6832816, -0.8944272]], rtol=RTOL)
    with pytest.raises(ValueError, match="epsilon"):
        PartitionedNorm(2, epsilon=0.0)
    with pytest.raises(ValueError, match="momentum"):
        PartitionedNorm(2, momentum=1.5)


def test_partitioned_norm_training_uses_each_domains_batch_moments():
    rng = np.random.default_rng(0)
    layer = _random_norm(rng)
    p = _params(layer)
    x = rng.normal(size=(9, 4)).astype("float32") * 3 + 1
    domain = np.array([0, 2, 0, 0, 2, 2, 0, 2, 0])  # domain 1 absent
    mean = np.zeros((3, 4))
    var = np.ones((3, 4))
    for d in (0, 2):
        mean[d], var[d] = x[domain == d].mean(0), x[domain == d].var(0)  # biased, like BatchNormalization
    out = np_(layer(x, domain, training=True))
    np.testing.assert_allclose(out, norm_reference(x, domain, p, mean, var), rtol=RTOL, atol=1e-5)

    # moving statistics: updated with momentum 0.9 for domains 0 and 2, domain 1 untouched
    m = 0.9
    new_mean, new_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    for d in (0, 2):
        np.testing.assert_allclose(new_mean[d], m * p["moving_mean"][d] + (1 - m) * mean[d], rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(new_var[d], m * p["moving_variance"][d] + (1 - m) * var[d], rtol=RTOL)
    np.testing.assert_array_equal(new_mean[1], p["moving_mean"][1])
    np.testing.assert_array_equal(new_var[1], p["moving_variance"][1])


def test_partitioned_norm_inference_uses_moving_stats():
    rng = np.random.default_rng(1)
    layer = _random_norm(rng)
    p = _params(layer)
    x = rng.normal(size=(6, 4)).astype("float32")
    domain = np.array([0, 1, 2, 1, 0, 2])
    expected = norm_reference(x, domain, p, p["moving_mean"], p["moving_variance"])
    np.testing.assert_allclose(np_(layer(x, domain, training=False)), expected, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(np_(layer(x, domain)), expected, rtol=RTOL, atol=1e-5)  # training unset
    np.testing.assert_array_equal(layer.moving_mean.numpy(), p["moving_mean"])
    np.testing.assert_array_equal(layer.moving_variance.numpy(), p["moving_variance"])


def test_partitioned_norm_absent_and_single_row_domains_are_finite():
    rng = np.random.default_rng(2)
    layer = _random_norm(rng)
    p = _params(layer)
    x = tf.constant(rng.normal(size=(4, 4)).astype("float32"))
    domain = np.array([0, 0, 0, 1])  # domain 1 has one row, domain 2 none
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x, domain, training=True)
        loss = tf.reduce_sum(out * rng.normal(size=(4, 4)).astype("float32"))
    sources = [x, layer.gamma, layer.beta, layer.domain_gamma, layer.domain_beta]
    grads = tape.gradient(loss, sources)
    out = out.numpy()
    assert np.all(np.isfinite(out))
    for grad in grads:
        assert np.all(np.isfinite(tf.convert_to_tensor(grad).numpy()))
    # the lone row of domain 1 is centred to exactly 0: the output is its shift beta + beta_1
    np.testing.assert_allclose(out[3], p["beta"] + p["domain_beta"][1], rtol=RTOL)
    assert np.all(np.isfinite(layer.moving_mean.numpy())) and np.all(np.isfinite(layer.moving_variance.numpy()))
    np.testing.assert_array_equal(layer.moving_mean.numpy()[2], p["moving_mean"][2])
    np.testing.assert_array_equal(layer.moving_variance.numpy()[2], p["moving_variance"][2])


def test_partitioned_norm_weights():
    layer = PartitionedNorm(3)
    layer.build((None, 5))
    assert {w.name: tuple(w.shape) for w in layer.trainable_weights} == {
        "gamma": (5,), "beta": (5,), "domain_gamma": (3, 5), "domain_beta": (3, 5)}
    assert {w.name: tuple(w.shape) for w in layer.non_trainable_weights} == {
        "moving_mean": (3, 5), "moving_variance": (3, 5)}


def test_partitioned_norm_keeps_float32_statistics_under_a_bfloat16_policy():
    """A bfloat16 serving export stores weights in bf16, but not the norm's moments: its
    statistics stay float32 and only the output takes the compute dtype."""
    rng = np.random.default_rng(4)
    reference = _random_norm(rng)
    x = rng.normal(size=(6, 4)).astype("float32")
    domain = np.array([0, 1, 2, 2, 1, 0])
    layer = PartitionedNorm(3, momentum=0.9, epsilon=EPS, dtype="bfloat16")
    layer.build((None, 4))
    layer.set_weights(reference.get_weights())
    out = layer(keras.ops.cast(x, "bfloat16"), domain)
    assert {w.dtype for w in layer.weights} == {"float32"}
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    expected = np_(reference(x, domain))
    np.testing.assert_allclose(np_(keras.ops.cast(out, "float32")), expected, rtol=2e-2, atol=2e-2)


def test_partitioned_norm_roundtrip(roundtrip):
    rng = np.random.default_rng(3)
    layer = _random_norm(rng, momentum=0.8)
    x = rng.normal(size=(5, 4)).astype("float32")
    roundtrip(layer, x, np.array([0, 2, 1, 1, 0]))


# --- StarFC ---

def test_star_fc_golden():
    layer = StarFC(num_domains=2, units=1, kernel_initializer="ones")
    x = np.array([[1.0, 2.0], [1.0, 2.0]], "float32")
    layer(x, np.array([0, 1]))
    layer.domain_kernel.assign(np.array([[[1.0], [1.0]], [[2.0], [2.0]]], "float32"))
    layer.domain_bias.assign(np.array([[0.5], [-1.0]], "float32"))
    # domain 0: 1*1 + 2*1 + 0.5 = 3.5; domain 1: 1*2 + 2*2 - 1 = 5
    np.testing.assert_allclose(np_(layer(x, np.array([0, 1]))), [[3.5], [5.0]], rtol=RTOL)


def test_star_fc_initial_state_is_the_shared_layer():
    rng = np.random.default_rng(4)
    layer = StarFC(num_domains=3, units=2)
    x = rng.normal(size=(4, 3)).astype("float32")
    out = np_(layer(x, np.array([0, 1, 2, 1])))
    np.testing.assert_allclose(out, x @ layer.kernel.numpy() + layer.bias.numpy(), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_star_fc_numpy_reference(activation):
    rng = np.random.default_rng(5)
    layer = StarFC(num_domains=3, units=4, activation=activation)
    x = rng.normal(size=(6, 5)).astype("float32")
    domain = np.array([2, 0, 1, 1, 2, 0])
    layer(x, domain)
    for var in (layer.kernel, layer.bias, layer.domain_kernel, layer.domain_bias):
        var.assign(rng.normal(size=var.shape).astype("float32"))
    w, b, wp, bp = (v.numpy() for v in (layer.kernel, layer.bias, layer.domain_kernel, layer.domain_bias))
    expected = np.stack([x[i] @ (w * wp[d]) + b + bp[d] for i, d in enumerate(domain)])
    if activation == "relu":
        expected = np.maximum(expected, 0.0)
    np.testing.assert_allclose(np_(layer(x, domain)), expected, rtol=RTOL, atol=1e-5)


def test_star_fc_other_domains_get_zero_gradient():
    rng = np.random.default_rng(6)
    layer = StarFC(num_domains=3, units=2)
    x = rng.normal(size=(4, 3)).astype("float32")
    domain = np.full(4, 2)
    layer(x, domain)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, domain) * rng.normal(size=(4, 2)).astype("float32"))
    for grad in tape.gradient(loss, [layer.domain_kernel, layer.domain_bias]):
        grad = grad.numpy()
        assert np.all(grad[:2] == 0.0)
        assert np.abs(grad[2]).max() > 0


def test_star_fc_roundtrip(roundtrip):
    rng = np.random.default_rng(7)
    layer = StarFC(num_domains=2, units=3, activation="relu", bias_initializer="ones", name="star")
    x = rng.normal(size=(4, 5)).astype("float32")
    layer(x, np.array([0, 1, 1, 0]))
    layer.domain_kernel.assign(rng.normal(size=layer.domain_kernel.shape).astype("float32"))
    roundtrip(layer, x, np.array([0, 1, 1, 0]))


@pytest.mark.parametrize("cls, args, fragments", [
    (PartitionedNorm, (0,), ["`num_domains`", "num_domains=0"]),
    (StarFC, (0, 4), ["`num_domains`", "num_domains=0"]),
    (StarFC, (2, 0), ["`units`", "units=0"]),
    (StarFC, (2, (4,)), ["`units`", "units=(4,)"]),
])
def test_validation(cls, args, fragments):
    with pytest.raises(ValueError) as info:
        cls(*args)
    for fragment in fragments:
        assert fragment in str(info.value)
