import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.layers import Amplitude, Balance

RTOL = 1e-5


def np_(x):
    return keras.ops.convert_to_numpy(x)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def balance_reference(experts, beta):
    """view_g = s(b_g) E_g + (1 - s(b_g)) / (G - 1) * sum_{j != g} E_j, written as a loop."""
    g_count = experts.shape[1]
    beta = np.broadcast_to(beta, (g_count,))
    views = []
    for g in range(g_count):
        others = sum(experts[:, j] for j in range(g_count) if j != g)
        s = sigmoid(beta[g])
        views.append(s * experts[:, g] + (1 - s) / (g_count - 1) * others)
    return np.stack(views, axis=1)


# --- Balance ---

def test_balance_golden():
    layer = Balance(num_groups=2, initial=0.0)
    experts = np.array([[[1.0, 2.0], [3.0, 4.0]]], "float32")
    # s(0) = 0.5: view_0 = 0.5*[1, 2] + 0.5/1*[3, 4] = [2, 3]; view_1 = 0.5*[3, 4] + 0.5*[1, 2] = [2, 3]
    np.testing.assert_allclose(np_(layer(experts)), [[[2.0, 3.0], [2.0, 3.0]]], rtol=RTOL)


def test_balance_default_initial_is_one():
    layer = Balance(num_groups=3)
    layer.build()
    np.testing.assert_array_equal(layer.beta.numpy(), [1.0])


@pytest.mark.parametrize("granularity, beta", [("scalar", [0.7]), ("vector", [-1.0, 0.5, 2.0])])
def test_balance_numpy_reference(granularity, beta):
    rng = np.random.default_rng(0)
    layer = Balance(num_groups=3, granularity=granularity)
    experts = rng.normal(size=(4, 3, 5)).astype("float32")
    layer.build()
    assert tuple(layer.beta.shape) == (len(beta),)
    layer.beta.assign(np.array(beta, "float32"))
    np.testing.assert_allclose(np_(layer(experts)), balance_reference(experts, np.array(beta)), rtol=RTOL,
                               atol=1e-6)


def test_balance_vector_groups_differ():
    # view_0 with beta_0 large -> mostly E_0; view_1 with beta_1 very negative -> mostly E_0 (the only other)
    layer = Balance(num_groups=2, granularity="vector")
    layer.build()
    layer.beta.assign(np.array([20.0, -20.0], "float32"))
    experts = np.array([[[1.0], [5.0]]], "float32")
    np.testing.assert_allclose(np_(layer(experts)), [[[1.0], [1.0]]], rtol=RTOL)


def test_balance_single_group_returns_input():
    layer = Balance(num_groups=1, initial=-3.0)
    experts = np.random.default_rng(1).normal(size=(4, 1, 5)).astype("float32")
    np.testing.assert_array_equal(np_(layer(experts)), experts)


@pytest.mark.parametrize("stop", [True, False])
def test_balance_stop_gradient_others(stop):
    rng = np.random.default_rng(2)
    g_count = 3
    layer = Balance(num_groups=g_count, granularity="vector", stop_gradient_others=stop)
    layer.build()
    beta = np.array([-0.5, 0.3, 1.2], "float32")
    layer.beta.assign(beta)
    experts = tf.constant(rng.normal(size=(4, g_count, 5)).astype("float32"))
    c = rng.normal(size=(4, 5)).astype("float32")
    for g in range(g_count):
        with tf.GradientTape() as tape:
            tape.watch(experts)
            loss = tf.reduce_sum(layer(experts)[:, g] * c)
        grad = tape.gradient(loss, experts).numpy()
        s = sigmoid(beta[g])
        np.testing.assert_allclose(grad[:, g], s * c, rtol=RTOL)
        for j in range(g_count):
            if j == g:
                continue
            if stop:
                assert np.all(grad[:, j] == 0.0), (g, j)
            else:
                np.testing.assert_allclose(grad[:, j], (1 - s) / (g_count - 1) * c, rtol=RTOL, atol=1e-7)


def test_balance_architecture_weights():
    layer = Balance(num_groups=3, granularity="vector")
    layer.build()
    assert len(layer.architecture_weights) == 1
    assert layer.architecture_weights[0] is layer.beta


def test_balance_beta_gradient():
    layer = Balance(num_groups=2, initial=0.0)
    experts = tf.constant([[[1.0], [3.0]]])
    layer(experts)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(experts)[:, 0])
    # view_0 = s*1 + (1-s)*3 -> d/dbeta = s'(0) * (1 - 3) = 0.25 * -2 = -0.5
    np.testing.assert_allclose(tape.gradient(loss, layer.beta).numpy(), [-0.5], rtol=RTOL)


# --- Amplitude ---

def test_amplitude_golden_scalar():
    layer = Amplitude(num_domains=2, num_tasks=2, initial=0.0)
    shared = np.array([[[1.0], [2.0]]], "float32")  # [B=1, T=2, H=1]
    domain_view = np.array([[4.0]], "float32")  # [B, H]
    task_view = np.array([[[10.0], [20.0]]], "float32")
    # s(0) = 0.5: task 0: 1 + 0.5*4 + 0.5*10 = 8; task 1: 2 + 0.5*4 + 0.5*20 = 14
    out = np_(layer(shared, domain_view, task_view, np.array([1])))
    np.testing.assert_allclose(out, [[[8.0], [14.0]]], rtol=RTOL)


def amplitude_reference(shared, domain_view, task_view, domain, a_domain, a_task):
    b_count, t_count, _ = shared.shape
    out = np.empty_like(shared)
    for b in range(b_count):
        ad = a_domain[domain[b]] if len(a_domain) > 1 else a_domain[0]
        for t in range(t_count):
            at = a_task[t] if len(a_task) > 1 else a_task[0]
            out[b, t] = shared[b, t] + sigmoid(ad) * domain_view[b] + sigmoid(at) * task_view[b, t]
    return out


@pytest.mark.parametrize("granularity, a_domain, a_task", [
    ("scalar", [0.3], [-0.8]),
    ("vector", [-1.0, 0.5, 2.0], [0.0, 1.5]),
])
def test_amplitude_numpy_reference(granularity, a_domain, a_task):
    rng = np.random.default_rng(3)
    layer = Amplitude(num_domains=3, num_tasks=2, granularity=granularity)
    layer.build()
    assert tuple(layer.alpha_domain.shape) == (len(a_domain),)
    assert tuple(layer.alpha_task.shape) == (len(a_task),)
    layer.alpha_domain.assign(np.array(a_domain, "float32"))
    layer.alpha_task.assign(np.array(a_task, "float32"))
    shared = rng.normal(size=(5, 2, 4)).astype("float32")
    domain_view = rng.normal(size=(5, 4)).astype("float32")
    task_view = rng.normal(size=(5, 2, 4)).astype("float32")
    domain = np.array([2, 0, 1, 2, 0])
    expected = amplitude_reference(shared, domain_view, task_view, domain, a_domain, a_task)
    out = np_(layer(shared, domain_view, task_view, domain))
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=1e-6)


def test_amplitude_vector_uses_each_samples_domain():
    layer = Amplitude(num_domains=2, num_tasks=1, granularity="vector")
    layer.build()
    layer.alpha_domain.assign(np.array([-30.0, 30.0], "float32"))  # s ~ 0 for domain 0, ~ 1 for domain 1
    layer.alpha_task.assign(np.array([-30.0], "float32"))
    zeros = np.zeros((2, 1, 1), "float32")
    out = np_(layer(zeros, np.array([[5.0], [5.0]], "float32"), zeros, np.array([0, 1])))
    np.testing.assert_allclose(out, [[[0.0]], [[5.0]]], rtol=RTOL, atol=1e-6)


def test_amplitude_architecture_weights():
    layer = Amplitude(num_domains=3, num_tasks=2, granularity="vector")
    layer.build()
    arch = layer.architecture_weights
    assert len(arch) == 2 and arch[0] is layer.alpha_domain and arch[1] is layer.alpha_task


# --- serialization and validation ---

@pytest.mark.parametrize("granularity", ["scalar", "vector"])
def test_balance_roundtrip(roundtrip, granularity):
    layer = Balance(num_groups=3, granularity=granularity, initial=0.2, stop_gradient_others=True, name="bal")
    layer.build()
    layer.beta.assign(np.linspace(-1, 1, layer.beta.shape[0]).astype("float32"))
    roundtrip(layer, np.random.default_rng(4).normal(size=(2, 3, 4)).astype("float32"))


@pytest.mark.parametrize("granularity", ["scalar", "vector"])
def test_amplitude_roundtrip(roundtrip, granularity):
    rng = np.random.default_rng(5)
    layer = Amplitude(num_domains=3, num_tasks=2, granularity=granularity, initial=-0.5)
    layer.build()
    layer.alpha_domain.assign(rng.normal(size=layer.alpha_domain.shape).astype("float32"))
    layer.alpha_task.assign(rng.normal(size=layer.alpha_task.shape).astype("float32"))
    args = (rng.normal(size=(3, 2, 4)).astype("float32"), rng.normal(size=(3, 4)).astype("float32"),
            rng.normal(size=(3, 2, 4)).astype("float32"), np.array([2, 0, 1]))
    roundtrip(layer, *args)


@pytest.mark.parametrize("cls, kwargs, fragments", [
    (Balance, dict(num_groups=2, granularity="x"), ["`granularity`", "'x'"]),
    (Balance, dict(num_groups=0), ["`num_groups`", "num_groups=0"]),
    (Amplitude, dict(num_domains=2, num_tasks=2, granularity="matrix"), ["`granularity`", "'matrix'"]),
    (Amplitude, dict(num_domains=0, num_tasks=2), ["`num_domains`", "num_domains=0"]),
    (Amplitude, dict(num_domains=2, num_tasks=-1), ["`num_tasks`", "num_tasks=-1"]),
])
def test_validation(cls, kwargs, fragments):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_layers_report_their_architecture_values_as_records():
    """Balance, Amplitude and GateLogits say what their variables are (kind, group) and give
    the value the model applies: sigmoid(raw) for alpha / beta, raw gate logits."""
    from mdmt_tf.layers import GateLogits

    balance = Balance(num_groups=3, granularity="vector", initial=0.5, group="task")
    balance.build()
    (beta,) = balance.architecture_values()
    assert (beta.kind, beta.group, beta.key) == ("beta", "task", "beta/task")
    np.testing.assert_allclose(beta.value, np.full(3, 1 / (1 + np.exp(-0.5))), rtol=1e-7)
    amplitude = Amplitude(num_domains=2, num_tasks=2, initial=-1.0)
    amplitude.build()
    assert [(v.kind, v.group) for v in amplitude.architecture_values()] == [("alpha", "domain"), ("alpha", "task")]
    np.testing.assert_allclose(amplitude.architecture_values()[0].value, [1 / (1 + np.exp(1.0))], rtol=1e-7)
    gates = GateLogits(num_experts=4, num_gates=2, initializer="ones", name="gl")
    gates.build()
    (logits,) = gates.architecture_values()
    assert (logits.kind, logits.group) == ("gate_logits", "gl") and np.array_equal(logits.value, np.ones((2, 4)))
    with pytest.raises(ValueError, match="`group` must be one of"):
        Balance(num_groups=2, group="user")
