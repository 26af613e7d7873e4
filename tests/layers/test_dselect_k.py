"""DSelectKGate (Hazimeh et al., NeurIPS 2021) and CGC with gating="dselect_k": the smooth
step, the binary-encoded selectors recomputed by hand, one-hot selection with saturated
selectors, non-power-of-two expert counts, the entropy regulariser, gradients."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.layers import CGC, DSelectKGate
from mdmt_tf.layers.gates import smooth_step
from tests.layers.conftest import to_np

RTOL = 1e-5


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def step(t, gamma):
    """The smooth step written piecewise, as in the paper."""
    cubic = -2.0 / gamma ** 3 * t ** 3 + 3.0 / (2.0 * gamma) * t + 0.5
    return np.where(t <= -gamma / 2, 0.0, np.where(t >= gamma / 2, 1.0, cubic))


def entropy(r):
    safe = np.where(r > 0, r, 1.0)
    return -np.sum(np.where(r > 0, r * np.log(safe), 0.0), axis=-1)


def _gate(n, g=2, k=2, gamma=1.0, entropy_weight=0.0, fan_in=4, **kwargs):
    gate = DSelectKGate(n, num_gates=g, k=k, gamma=gamma, entropy_weight=entropy_weight, **kwargs)
    gate.build((None, fan_in))
    return gate


def _randomise(gate, rng, scale=0.6):
    """Weights of a size that puts the selector logits partly in the cubic part, partly beyond."""
    for var in gate.trainable_weights:
        var.assign((scale * rng.normal(size=var.shape)).astype("float32"))


def _logits(gate, x):
    z = x @ to_np(gate.selector_logits.kernel) + to_np(gate.selector_logits.bias)
    g, k = gate.num_gates, gate.k
    if k == 1:  # no combination weights: softmax of one logit
        return z.reshape(len(x), g, k, -1), np.zeros((len(x), g, k))
    a = x @ to_np(gate.combination_logits.kernel) + to_np(gate.combination_logits.bias)
    return z.reshape(len(x), g, k, -1), a.reshape(len(x), g, k)


def selectors_n3(z, gamma):
    """n = 3, m = 2 bits (bit 0 = z[..., 0], least significant): codes 00, 01, 10 are experts
    0, 1, 2; code 11 (no expert 3) is expert 1 (top bit cleared). So expert 0 gets
    (1-s0)(1-s1), expert 1 gets s0(1-s1) + s0 s1 = s0, expert 2 gets (1-s0) s1."""
    s0, s1 = step(z[..., 0], gamma), step(z[..., 1], gamma)
    return np.stack([(1 - s0) * (1 - s1), s0, (1 - s0) * s1], axis=-1)


def selectors_n4(z, gamma):
    """n = 4: expert e = 2 b1 + b0 gets prod_j s_j^b_j (1 - s_j)^(1 - b_j)."""
    s0, s1 = step(z[..., 0], gamma), step(z[..., 1], gamma)
    return np.stack([(1 - s0) * (1 - s1), s0 * (1 - s1), (1 - s0) * s1, s0 * s1], axis=-1)


# --- the smooth step ---

@pytest.mark.parametrize("gamma", [1.0, 0.5, 3.0])
def test_smooth_step_values(gamma):
    t = np.array([-2 * gamma, -gamma / 2, -gamma / 4, 0.0, gamma / 4, gamma / 2, 2 * gamma], "float32")
    got = to_np(smooth_step(t, gamma))
    # S(+-gamma/4) = -2/gamma^3 (gamma/4)^3 * (+-1) + 3/(2 gamma) (+-gamma/4) + 1/2 = 1/2 +- (3/8 - 1/32)
    expected = [0.0, 0.0, 0.5 - 11 / 32, 0.5, 0.5 + 11 / 32, 1.0, 1.0]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, step(t, gamma), rtol=1e-6, atol=1e-7)


# --- the gate by hand ---

@pytest.mark.parametrize("n, by_hand", [(3, selectors_n3), (4, selectors_n4)])
@pytest.mark.parametrize("gamma, k", [(1.0, 2), (2.0, 2), (1.0, 1), (1.0, 3)])
def test_weights_recomputed_by_hand(n, by_hand, gamma, k):
    rng = np.random.default_rng(0)
    gate = _gate(n, g=2, k=k, gamma=gamma)
    _randomise(gate, rng)
    x = rng.normal(size=(16, 4)).astype("float32")
    z, a = _logits(gate, x)
    assert z.shape == (16, 2, k, 2)  # m = ceil(log2 n) = 2 bits
    s = step(z, gamma)
    assert ((s > 0) & (s < 1)).any() and ((s == 0) | (s == 1)).any()  # both regimes are exercised
    r = by_hand(z, gamma)  # [B, G, k, n]
    expected = np.einsum("bgk,bgke->bge", softmax(a), r)
    got = to_np(gate(x))
    assert got.shape == (16, 2, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)
    combination, selectors = gate.selectors(x)
    np.testing.assert_allclose(to_np(selectors), r, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(to_np(combination), softmax(a), rtol=RTOL, atol=1e-6)


def test_initial_selectors_are_undecided():
    """The authors' initialisation U(-gamma/100, gamma/100) keeps S(z) near 1/2: n = 4 starts
    uniform; n = 3 starts at (1/4, 1/2, 1/4) (expert 1 owns codes 01 and 11)."""
    x = np.random.default_rng(1).normal(0.0, 0.3, size=(8, 4)).astype("float32")
    np.testing.assert_allclose(to_np(_gate(4)(x)), 0.25, atol=0.02)
    np.testing.assert_allclose(to_np(_gate(3)(x)), np.broadcast_to([0.25, 0.5, 0.25], (8, 2, 3)), atol=0.02)


# --- selection ---

def _saturate(gate, codes, combination=None):
    """Selector i of every gate on `codes[i]` (bits at +-10, beyond gamma/2), whatever x."""
    m = gate.num_bits
    bias = np.array([[10.0 if (c >> j) & 1 else -10.0 for j in range(m)] for c in codes], "float32")
    gate.selector_logits.kernel.assign(np.zeros(gate.selector_logits.kernel.shape, "float32"))
    gate.selector_logits.bias.assign(np.tile(bias.ravel(), gate.num_gates))
    if combination is not None:
        gate.combination_logits.kernel.assign(np.zeros(gate.combination_logits.kernel.shape, "float32"))
        gate.combination_logits.bias.assign(np.tile(np.asarray(combination, "float32"), gate.num_gates))


def test_saturated_selectors_select_exactly_k_experts():
    gate = _gate(4, g=2, k=2)
    _saturate(gate, codes=[2, 3], combination=[0.3, -0.2])
    x = np.random.default_rng(2).normal(size=(5, 4)).astype("float32")
    got = to_np(gate(x))
    w = softmax(np.array([0.3, -0.2]))
    np.testing.assert_allclose(got, np.broadcast_to([0.0, 0.0, w[0], w[1]], (5, 2, 4)), rtol=1e-6)
    assert ((got > 0).sum(-1) == 2).all() and (got[..., :2] == 0).all()


@pytest.mark.parametrize("n, k", [(3, 2), (4, 2), (6, 3), (8, 2)])
def test_large_selector_logits_make_the_selectors_one_hot(n, k):
    rng = np.random.default_rng(3)
    gate = _gate(n, g=3, k=k)
    _randomise(gate, rng, scale=1.0)
    for var in (gate.selector_logits.kernel, gate.selector_logits.bias):  # |z| >> gamma / 2
        var.assign(to_np(var) * 1e4)
    x = rng.normal(size=(32, 4)).astype("float32")
    _, r = (to_np(v) for v in gate.selectors(x))
    assert set(np.unique(r)) <= {0.0, 1.0} and (r.sum(-1) == 1.0).all()  # every selector picks one expert
    got = to_np(gate(x))
    chosen = (r.argmax(-1)[..., None] == np.arange(n)).any(axis=2)  # [B, G, n]: picked by some selector
    np.testing.assert_array_equal(got > 0, chosen)
    assert ((got > 0).sum(-1) <= k).all() and ((got > 0).sum(-1) == k).any()
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("n, code, expert", [(3, 3, 1), (5, 5, 1), (5, 6, 2), (5, 7, 3), (6, 7, 3), (7, 7, 3)])
def test_codes_without_an_expert_select_a_real_one(n, code, expert):
    """n not a power of two: a selector saturated on a code >= n (no such expert) is one-hot on
    expert code - 2^(m-1), so no weight is lost (dropping the code would leave a row of zeros)."""
    gate = _gate(n, g=1, k=1)
    _saturate(gate, codes=[code])
    got = to_np(gate(np.ones((2, 4), "float32")))
    assert got.shape == (2, 1, n) and gate.combination_logits is None  # k = 1: no combination weights
    np.testing.assert_array_equal(got, np.broadcast_to(np.eye(n)[expert], (2, 1, n)))


@pytest.mark.parametrize("n", [2, 3, 5, 6, 7, 9, 16])
def test_rows_sum_to_one_for_any_number_of_experts(n):
    rng = np.random.default_rng(n)
    gate = _gate(n, g=2, k=min(n, 3))
    _randomise(gate, rng, scale=1.5)
    x = rng.normal(size=(64, 4)).astype("float32")
    got = to_np(gate(x))
    assert got.shape == (64, 2, n) and (got >= 0).all()
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=2e-6)
    np.testing.assert_allclose(to_np(gate.selectors(x)[1]).sum(-1), 1.0, rtol=2e-6)


# --- the entropy regulariser ---

@pytest.mark.parametrize("n", [3, 4])
def test_entropy_regulariser_by_hand_only_in_training(n):
    rng = np.random.default_rng(4)
    gate = _gate(n, g=2, k=2, entropy_weight=0.3)
    _randomise(gate, rng)
    x = rng.normal(size=(10, 4)).astype("float32")
    z, _ = _logits(gate, x)
    r = (selectors_n3 if n == 3 else selectors_n4)(z, 1.0)  # [B, G, k, n]
    expected = 0.3 * entropy(r).sum(axis=(1, 2)).mean()
    assert expected > 0.01
    gate(x, training=True)
    assert len(gate.losses) == 1
    np.testing.assert_allclose(float(gate.losses[0]), expected, rtol=1e-5)
    gate(x, training=False)
    assert not gate.losses
    gate(x)
    assert not gate.losses
    # only the gates an example uses, with `active`
    active = (rng.random((10, 2)) < 0.5).astype("float32")
    gate(x, training=True, active=active)
    np.testing.assert_allclose(float(gate.losses[0]), 0.3 * (entropy(r).sum(2) * active).sum(1).mean(), rtol=1e-5)
    off = _gate(n, entropy_weight=0.0)
    off(x, training=True)
    assert not off.losses


def test_entropy_is_zero_for_binary_selectors_and_an_empty_batch_is_finite():
    gate = _gate(5, g=1, k=2, entropy_weight=1.0)
    _saturate(gate, codes=[0, 7], combination=[0.0, 0.0])
    gate(np.ones((3, 4), "float32"), training=True)
    assert float(gate.losses[0]) == 0.0
    gate(np.zeros((0, 4), "float32"), training=True)
    assert float(gate.losses[0]) == 0.0


# --- gradients ---

def test_gradients_reach_selector_and_combination_weights():
    rng = np.random.default_rng(5)
    gate = _gate(3, g=2, k=2, entropy_weight=0.5)
    x = tf.constant(rng.normal(size=(8, 4)).astype("float32"))
    c = tf.constant(rng.normal(size=(8, 2, 3)).astype("float32"))
    variables = [gate.selector_logits.kernel, gate.selector_logits.bias, gate.combination_logits.kernel,
                 gate.combination_logits.bias]
    with tf.GradientTape(persistent=True) as tape:
        task = tf.reduce_sum(gate(x, training=True) * c)
        regulariser = gate.losses[0]
    for variable, grad in zip(variables, tape.gradient(task, [v.value for v in variables])):
        assert grad is not None and np.abs(grad.numpy()).max() > 1e-4, variable.path
    selector_grads = tape.gradient(regulariser, [v.value for v in variables[:2]])
    assert all(np.abs(g.numpy()).max() > 1e-4 for g in selector_grads)
    # the entropy is of the selectors only: it does not train the combination weights
    combination_grads = tape.gradient(regulariser, [v.value for v in variables[2:]])
    assert all(g is None or not np.any(g.numpy()) for g in combination_grads)


@pytest.mark.parametrize("stop", [True, False])
def test_stop_gradient_input(stop):
    rng = np.random.default_rng(6)
    gate = _gate(4, g=1, k=2, stop_gradient_input=stop)
    _randomise(gate, rng, scale=0.1)
    x = tf.constant(rng.normal(size=(5, 4)).astype("float32"))
    c = tf.constant(rng.normal(size=(5, 1, 4)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(gate(x) * c)
    grad = tape.gradient(loss, x, unconnected_gradients=tf.UnconnectedGradients.ZERO).numpy()
    assert (not np.any(grad)) if stop else np.abs(grad).max() > 1e-4


# --- serialization, precision, validation ---

def test_roundtrip(roundtrip):
    gate = DSelectKGate(5, num_gates=2, k=3, gamma=2.0, entropy_weight=0.1, stop_gradient_input=True, name="ds")
    x = np.random.default_rng(7).normal(size=(4, 6)).astype("float32")
    gate(x)
    _randomise(gate, np.random.default_rng(8))
    clone = roundtrip(gate, x)
    assert (clone.k, clone.gamma, clone.entropy_weight, clone.stop_gradient_input) == (3, 2.0, 0.1, True)


def test_mixed_bfloat16_gives_float32_rows_summing_to_one():
    gate = DSelectKGate(6, num_gates=2, k=2, entropy_weight=0.1, dtype="mixed_bfloat16")
    x = np.random.default_rng(9).normal(size=(4, 5)).astype("float32")
    out = gate(keras.ops.cast(x, "bfloat16"), training=True)
    assert out.dtype == "float32" and gate.selector_logits.dtype_policy.name == "mixed_bfloat16"
    np.testing.assert_allclose(to_np(out).sum(-1), 1.0, rtol=1e-6)
    assert gate.losses[0].dtype == "float32" and np.isfinite(float(gate.losses[0]))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"num_experts": 1}, "num_experts=1"),
    ({"num_experts": 4, "k": 0}, "k=0"),
    ({"num_experts": 3, "k": 4}, "at most num_experts=3"),
    ({"num_experts": 4, "gamma": 0.0}, "gamma=0.0"),
    ({"num_experts": 4, "entropy_weight": -1.0}, "entropy_weight=-1.0"),
])
def test_validation(kwargs, fragment):
    with pytest.raises(ValueError, match="DSelectKGate") as info:
        DSelectKGate(**kwargs)
    assert fragment in str(info.value)


# --- CGC with DSelect-k gates ---

def test_cgc_dselect_k_gates_by_hand_and_losses():
    rng = np.random.default_rng(10)
    layer = CGC(num_tasks=2, num_task_experts=1, num_shared_experts=2, expert_units=(3,), gating="dselect_k", k=2,
                entropy_weight=0.2)
    task_inputs = rng.normal(size=(6, 2, 4)).astype("float32")
    shared_input = rng.normal(size=(6, 4)).astype("float32")
    layer(task_inputs, shared_input)
    for var in layer.trainable_weights:
        var.assign((0.6 * rng.normal(size=var.shape)).astype("float32"))
    assert not any("task_gate_kernel" in w.path for w in layer.weights)
    task_out, shared_out, weights = (to_np(v) for v in layer(task_inputs, shared_input, training=True))
    assert len(layer.losses) == 3  # two task gates and the shared gate
    # task gate t is a DSelect-k gate over (task t's expert, 2 shared) on task t's input
    experts = to_np(layer.task_experts(np.repeat(task_inputs, 1, axis=1)))  # [B, 2, 3]
    shared = to_np(layer.shared_experts(shared_input))  # [B, 2, 3]
    for t, gate in enumerate(layer.task_gates):
        z, a = _logits(gate, task_inputs[:, t])
        w = np.einsum("bgk,bgke->bge", softmax(a), selectors_n3(z, 1.0))[:, 0]
        np.testing.assert_allclose(weights[:, t], w, rtol=RTOL, atol=1e-6)
        candidates = np.concatenate([experts[:, t:t + 1], shared], axis=1)
        np.testing.assert_allclose(task_out[:, t], np.einsum("be,beh->bh", w, candidates), rtol=1e-4, atol=1e-5)
    z, a = _logits(layer.shared_gate, shared_input)  # over all 4 experts
    w = np.einsum("bgk,bgke->bge", softmax(a), selectors_n4(z, 1.0))[:, 0]
    everything = np.concatenate([experts, shared], axis=1)
    np.testing.assert_allclose(shared_out, np.einsum("be,beh->bh", w, everything), rtol=1e-4, atol=1e-5)
    layer(task_inputs, shared_input)
    assert not layer.losses


@pytest.mark.parametrize("last_level", [False, True])
def test_cgc_dselect_k_roundtrip(roundtrip, last_level):
    rng = np.random.default_rng(11)
    layer = CGC(num_tasks=2, num_task_experts=2, num_shared_experts=1, expert_units=[3], last_level=last_level,
                gating="dselect_k", k=2, gamma=0.5, entropy_weight=0.1, name="cgc")
    task_inputs, shared_input = rng.normal(size=(3, 2, 4)).astype("float32"), rng.normal(size=(3, 4)).astype("float32")
    clone = roundtrip(layer, task_inputs, shared_input)
    assert clone.gating == "dselect_k" and hasattr(clone, "shared_gate") != last_level


def test_cgc_rejects_an_unknown_gating():
    with pytest.raises(ValueError, match="gating='dselect'"):
        CGC(2, 1, 1, (4,), gating="dselect")
