import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.layers import Towers

RTOL = 1e-5


def np_(x):
    return keras.ops.convert_to_numpy(x)


def test_golden_rank2_per_task():
    towers = Towers(num_tasks=2, units=(2,), kernel_initializer="ones")
    x = np.array([[1.0, 2.0, 3.0]], "float32")
    # hidden: 1+2+3 = 6 per unit -> relu; logit: 6+6 = 12 for both tasks
    np.testing.assert_allclose(np_(towers(x)), [[12.0, 12.0]], rtol=RTOL)
    k0 = np.ones((1, 2, 3, 2), "float32")
    k0[0, 1] = 2.0
    towers.kernels[0].assign(k0)
    # task 1's hidden kernel x2: hidden 12 per unit -> logit 24
    np.testing.assert_allclose(np_(towers(x)), [[12.0, 24.0]], rtol=RTOL)


def test_golden_rank3_task_reads_its_slice():
    towers = Towers(num_tasks=2, units=(2,), kernel_initializer="ones")
    x = np.array([[[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]], "float32")
    # task 0: hidden 6, 6 -> 12; task 1: hidden 3, 3 -> 6
    np.testing.assert_allclose(np_(towers(x)), [[12.0, 6.0]], rtol=RTOL)


def test_linear_head():
    towers = Towers(num_tasks=1, units=(), kernel_initializer="ones",
                    bias_initializer=keras.initializers.Constant(-7.0))
    # 1 + 2 + 3 - 7 = -1, no activation on the logit
    np.testing.assert_allclose(np_(towers(np.array([[1.0, 2.0, 3.0]], "float32"))), [[-1.0]], rtol=RTOL)
    assert len(towers.kernels) == 1


def test_golden_per_domain():
    towers = Towers(num_tasks=2, units=(2,), num_domains=3, kernel_initializer="ones")
    x = np.tile(np.array([[1.0, 2.0, 3.0]], "float32"), (3, 1))
    towers(x, domain=np.array([0, 1, 2]))
    k0 = np.ones((3, 2, 3, 2), "float32") * np.arange(1, 4, dtype="float32")[:, None, None, None]
    towers.kernels[0].assign(k0)  # domain d's hidden kernel = (d + 1)
    # domain d: hidden = 6 (d+1) per unit -> logit 12 (d+1), same for both tasks
    out = np_(towers(x, domain=np.array([2, 0, 1])))
    np.testing.assert_allclose(out, [[36.0, 36.0], [12.0, 12.0], [24.0, 24.0]], rtol=RTOL)


def towers_reference(x, domain, kernels, biases):
    """Loop over samples and tasks with each sample's own domain's weights."""
    b_count = x.shape[0]
    t_count = kernels[0].shape[1]
    out = np.zeros((b_count, t_count), "float32")
    for b in range(b_count):
        d = 0 if domain is None else domain[b]
        for t in range(t_count):
            h = x[b, t] if x.ndim == 3 else x[b]
            for i, (k, bias) in enumerate(zip(kernels, biases)):
                h = h @ k[d, t] + bias[d, t]
                if i < len(kernels) - 1:
                    h = np.maximum(h, 0.0)
            out[b, t] = h[0]
    return out


@pytest.mark.parametrize("rank, num_domains", [(2, 1), (3, 1), (2, 3), (3, 3)])
def test_numpy_reference(rank, num_domains):
    rng = np.random.default_rng(rank * 10 + num_domains)
    towers = Towers(num_tasks=2, units=(4, 3), num_domains=num_domains)
    x = rng.normal(size=(6, 5) if rank == 2 else (6, 2, 5)).astype("float32")
    domain = rng.integers(0, num_domains, size=6) if num_domains > 1 else None
    towers.build(x.shape)
    assert [tuple(k.shape) for k in towers.kernels] == [(num_domains, 2, 5, 4), (num_domains, 2, 4, 3),
                                                       (num_domains, 2, 3, 1)]
    for var in towers.kernels + towers.biases:
        var.assign(rng.normal(size=var.shape).astype("float32"))
    expected = towers_reference(x, domain, [k.numpy() for k in towers.kernels], [b.numpy() for b in towers.biases])
    out = np_(towers(x, domain=domain))
    assert out.shape == (6, 2)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=1e-5)


def test_layer_norm_per_tower_numpy_reference():
    """norm="layer": each hidden layer is Dense -> LayerNorm (own scale / offset per (domain,
    task) tower) -> ReLU; the logit layer has no norm."""
    rng = np.random.default_rng(7)
    eps = 1e-5
    towers = Towers(num_tasks=2, units=(4,), num_domains=3, norm="layer", epsilon=eps)
    x = rng.normal(size=(6, 2, 5)).astype("float32")
    domain = rng.integers(0, 3, size=6)
    towers.build(x.shape)
    assert [tuple(g.shape) for g in towers.gammas] == [(3, 2, 4)] and len(towers.betas) == 1
    for var in towers.kernels + towers.biases + towers.gammas + towers.betas:
        var.assign(rng.normal(size=var.shape).astype("float32"))
    k0, b0, k1, b1 = (np_(v) for v in (towers.kernels[0], towers.biases[0], towers.kernels[1], towers.biases[1]))
    g, beta = np_(towers.gammas[0]), np_(towers.betas[0])
    expected = np.zeros((6, 2), "float32")
    for b in range(6):
        d = domain[b]
        for t in range(2):
            h = x[b, t] @ k0[d, t] + b0[d, t]
            h = (h - h.mean()) / np.sqrt(h.var() + eps) * g[d, t] + beta[d, t]
            expected[b, t] = (np.maximum(h, 0.0) @ k1[d, t] + b1[d, t])[0]
    np.testing.assert_allclose(np_(towers(x, domain=domain)), expected, rtol=1e-4, atol=1e-5)


def test_other_domains_get_zero_gradient():
    rng = np.random.default_rng(1)
    towers = Towers(num_tasks=2, units=(4,), num_domains=3)
    x = rng.normal(size=(5, 3)).astype("float32")
    domain = np.full(5, 1)
    towers(x, domain=domain)
    for var in towers.kernels + towers.biases:
        var.assign(rng.normal(size=var.shape).astype("float32"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(towers(x, domain=domain) * rng.normal(size=(5, 2)).astype("float32"))
    grads = tape.gradient(loss, towers.kernels + towers.biases)
    for grad in grads:
        grad = grad.numpy()
        assert np.all(grad[0] == 0.0) and np.all(grad[2] == 0.0)
        assert np.abs(grad[1]).max() > 0


def test_missing_domain_raises():
    towers = Towers(num_tasks=2, units=(4,), num_domains=2)
    with pytest.raises(ValueError, match="`domain`"):
        towers(np.zeros((2, 3), "float32"))


def test_rank3_with_wrong_task_count_raises():
    towers = Towers(num_tasks=2, units=(4,))
    with pytest.raises(ValueError, match=r"num_tasks=2.*\(None, 3, 5\)"):
        towers.build((None, 3, 5))


@pytest.mark.parametrize("num_domains", [1, 2])
def test_roundtrip(roundtrip, num_domains):
    rng = np.random.default_rng(2)
    towers = Towers(num_tasks=2, units=[4], num_domains=num_domains, activation="tanh", name="towers")
    x = rng.normal(size=(3, 2, 5)).astype("float32")
    roundtrip(towers, x, domain=np.array([1, 0, 1]) if num_domains > 1 else None)


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(num_tasks=0), ["`num_tasks`", "num_tasks=0"]),
    (dict(num_tasks=2, num_domains=0), ["`num_domains`", "num_domains=0"]),
    (dict(num_tasks=2, units=(0,)), ["`units`", "units=(0,)"]),
    (dict(num_tasks=2, units=(4, "8")), ["`units`", "units=(4, '8')"]),
    (dict(num_tasks=2, norm="batch"), ["`norm`", "norm='batch'"]),
])
def test_validation(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        Towers(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
