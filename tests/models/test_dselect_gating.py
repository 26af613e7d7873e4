"""DSelect-k gates (layers.DSelectKGate) as an option of the mixture-of-experts models:
MMoE / OMoE and PLE (`gating="dselect_k"`), M3oE's shared gates (`shared_gate="dselect_k"`,
with gating softmax or aftb). Same Details gates as with softmax gates, the entropy
regulariser in training passes only, training, save/reload, bfloat16, validation."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.compat import sublayers
from mdmt_tf.errors import ConfigError
from mdmt_tf.layers import DSelectKGate, SoftmaxGate
from mdmt_tf.models.baselines import PLE, MMoE
from mdmt_tf.models.m3oe import M3oE
from tests.models.conftest import take

SMALL = {"embedding_dim": 4, "expert_units": [8], "tower_units": [4]}
M3OE_SMALL = {"embedding_dim": 4, "bottom_units": [16, 8], "expert_units": [8, 4], "tower_units": [4],
              "num_shared_experts": 3}
CASES = {  # name -> (class, params, the Details gate, experts per gate row)
    "mmoe": (MMoE, {**SMALL, "gating": "dselect_k", "num_experts": 3}, "tasks", lambda s: 3),
    "omoe": (MMoE, {**SMALL, "gating": "dselect_k", "gates": "one", "dselect_k": 3, "num_experts": 5},
             "tasks", lambda s: 5),
    "ple": (PLE, {**SMALL, "gating": "dselect_k", "num_shared_experts": 2}, "tasks", lambda s: 3),
    "m3oe": (M3oE, {**M3OE_SMALL, "shared_gate": "dselect_k"}, "shared", lambda s: 3),
    "m3oe_aftb": (M3oE, {**M3OE_SMALL, "gating": "aftb", "shared_gate": "dselect_k"}, "all_experts",
                  lambda s: 3 + s.num_domains + s.num_tasks),
}


def entropy(r):
    safe = np.where(r > 0, r, 1.0)
    return -np.sum(np.where(r > 0, r * np.log(safe), 0.0), axis=-1)


def _model(encoded, name, dtype="float32", **extra):
    cls, params, _, _ = CASES[name]
    keras.utils.set_random_seed(0)
    return cls(schema=encoded[0], params={**params, **extra}, name=name, dtype=dtype)


def _batch(encoded, rows=64, split="train"):
    features, labels = take(*encoded[1][split], np.arange(rows))
    return {k: tf.constant(v) for k, v in features.items()}, labels


def _bce(model, features, labels, training=False):
    out = model(features, training=training)
    return sum(tf.reduce_mean(keras.losses.binary_crossentropy(labels[t][:, None], out[t]))
               for t in model.schema.tasks)


def _dselect_gates(model):
    if isinstance(model, PLE):  # every level's task gates, and its shared gate but the last level's
        return [gate for level in model.levels
                for gate in level.task_gates + ([] if level.last_level else [level.shared_gate])]
    return list(model.gates) if isinstance(model.gates, list) else [model.gates]


def test_the_defaults_are_unchanged(encoded):
    schema = encoded[0]
    mmoe, ple = MMoE(schema=schema, params=SMALL), PLE(schema=schema, params=SMALL)
    m3oe = M3oE(schema=schema, params=M3OE_SMALL)
    assert mmoe.params.gating == ple.params.gating == "softmax" and m3oe.params.shared_gate == "network"
    assert type(mmoe.gates) is SoftmaxGate and type(m3oe.gates) is SoftmaxGate
    assert all(hasattr(level, "task_gate_kernel") and not hasattr(level, "task_gates") for level in ple.levels)
    assert not any(isinstance(layer, DSelectKGate) for model in (mmoe, ple, m3oe) for layer in sublayers(model))


@pytest.mark.parametrize("name", list(CASES))
def test_gates_are_dselect_k_and_reported_as_before(name, encoded):
    schema = encoded[0]
    model = _model(encoded, name)
    gates = _dselect_gates(model)
    assert gates and all(isinstance(g, DSelectKGate) for g in gates)
    assert all(g.k == model.params.dselect_k and g.gamma == model.params.dselect_gamma for g in gates)
    features, _ = _batch(encoded, rows=20, split="test")
    details = model.explain(features)
    gate_name, n = CASES[name][2], CASES[name][3](schema)
    assert [g.name for g in details.gates] == [gate_name]
    weights = details.gate(gate_name).weights
    assert weights.shape == (20, schema.num_tasks, n) and weights.dtype == np.float32
    assert (weights >= 0).all() and np.abs(weights.sum(-1) - 1).max() < 1e-5
    out = model(features)
    for i, task in enumerate(schema.tasks):
        np.testing.assert_allclose(1 / (1 + np.exp(-details.logits[:, i])), np.asarray(out[task])[:, 0],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_entropy_losses_only_in_training(name, encoded):
    model = _model(encoded, name)
    features, _ = _batch(encoded, rows=16)
    model(features, training=True)
    assert len(model.losses) == len(_dselect_gates(model))  # one per DSelect-k gate (embedding L2 is off)
    assert all(float(loss) > 0 for loss in model.losses)
    model(features, training=False)
    assert not model.losses
    quiet = _model(encoded, name, dselect_entropy=0.0)
    quiet(features, training=True)
    assert not quiet.losses


def test_mmoe_entropy_by_hand(encoded):
    model = _model(encoded, "mmoe", dselect_entropy=0.05)
    features, _ = _batch(encoded, rows=32)
    for variable in model.gates.trainable_weights:  # selectors partly decided
        variable.assign(np.random.default_rng(0).normal(0, 0.3, variable.shape).astype("float32"))
    model(features, training=True)
    x = model.flat_inputs(model.embedding(features), features)
    _, r = model.gates.selectors(x)  # [B, T, k, 3]
    expected = 0.05 * entropy(np.asarray(r)).sum(axis=(1, 2)).mean()
    np.testing.assert_allclose(float(model.losses[0]), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["m3oe", "m3oe_aftb"])
def test_m3oe_regularises_only_the_gates_of_a_rows_own_domain(name, encoded):
    """M3oE computes a gate per (domain, task) and uses the row's own domain's: the entropy
    counts those, not the other domains' gates (which the row's loss never reaches)."""
    model = _model(encoded, name, dselect_entropy=0.05)
    schema = encoded[0]
    d, t = schema.num_domains, schema.num_tasks
    features, _ = _batch(encoded, rows=48)
    rng = np.random.default_rng(1)
    for gate in _dselect_gates(model):
        for variable in gate.trainable_weights:
            variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    model(features, training=True)
    domain = np.asarray(features[schema.domain])
    embedded = model.embedding(features)
    bottom = model._bottom(model.flat_inputs(embedded, features), features[schema.domain], False)
    if name == "m3oe":
        _, r = model.gates.selectors(bottom)
        h = entropy(np.asarray(r)).sum(-1).reshape(-1, d, t)  # [B, D, T]
        per_gate = [h]
    else:
        task_inputs = model.task_inputs(embedded, features)
        per_gate = []
        for i, gate in enumerate(model.gates):
            _, r = gate.selectors(tf.concat([bottom, task_inputs[:, i]], axis=-1))
            per_gate.append(entropy(np.asarray(r)).sum(-1)[:, :, None])  # [B, D, 1]
    own = sum(h[np.arange(len(domain)), domain].sum(-1) for h in per_gate)
    every = sum(h.sum(axis=(1, 2)) for h in per_gate)
    got = sum(float(loss) for loss in model.losses)
    np.testing.assert_allclose(got, 0.05 * own.mean(), rtol=1e-5)
    assert abs(got - 0.05 * every.mean()) > 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_a_few_training_steps_lower_the_loss(name, encoded):
    model = _model(encoded, name)
    features, labels = _batch(encoded, rows=128)
    optimizer = keras.optimizers.Adam(1e-2)
    variables = model.trainable_variables
    gates = [v.path for g in _dselect_gates(model) for v in g.trainable_weights]
    losses = []
    for step in range(6):
        with tf.GradientTape() as tape:
            loss = _bce(model, features, labels, training=True) + tf.add_n(model.losses)
        grads = tape.gradient(loss, variables)
        if step == 0:  # the gates' selector and combination weights all train
            by_path = dict(zip([v.path for v in variables], grads))
            for path in gates:
                assert by_path[path] is not None and np.abs(np.asarray(by_path[path])).max() > 0, path
        optimizer.apply_gradients(zip(grads, variables))
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", list(CASES))
def test_save_and_reload_give_identical_predictions(name, encoded, tmp_path):
    model = _model(encoded, name)
    rng = np.random.default_rng(0)
    for variable in model.variables:  # off their initial values: selectors partly saturated
        variable.assign(np.asarray(variable) + rng.normal(0, 0.3, variable.shape).astype(variable.dtype))
    features, _ = _batch(encoded, split="test")
    expected = {t: np.asarray(v) for t, v in model(features).items()}
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(reloaded) is type(model) and reloaded.params == model.params
    for task, value in reloaded(features).items():
        np.testing.assert_array_equal(np.asarray(value), expected[task])
    np.testing.assert_array_equal(reloaded.explain(features).gates[0].weights, model.explain(features).gates[0].weights)


@pytest.mark.parametrize("name", list(CASES))
def test_empty_domains_and_mixed_bfloat16(name, encoded):
    schema, splits = encoded
    features, labels = splits["train"]
    rows = np.flatnonzero(features[schema.domain] == schema.num_domains - 1)[:16]
    features, labels = take(features, labels, rows)
    for dtype in ("float32", "mixed_bfloat16"):
        model = _model(encoded, name, dtype=dtype)
        with tf.GradientTape() as tape:
            loss = _bce(model, features, labels, training=True) + tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        assert np.isfinite(float(loss)), dtype
        for variable, grad in zip(model.trainable_variables, grads):
            if grad is not None:
                assert np.isfinite(np.asarray(tf.convert_to_tensor(grad))).all(), (dtype, variable.path)
        assert all(np.asarray(v).dtype == np.float32 for v in model(features, training=False).values())
        gate = model.explain(features).gates[0].weights
        assert np.abs(gate.sum(-1) - 1).max() < 1e-5


@pytest.mark.parametrize("cls, params, fragment", [
    (MMoE, {"gating": "dselect"}, "choose one of ['softmax', 'dselect_k']"),
    (MMoE, {"gating": "dselect_k", "dselect_k": 5}, "dselect_k=5 exceeds the 4 experts"),
    (MMoE, {"gating": "dselect_k", "num_experts": 1, "dselect_k": 1}, "at least 2 experts per gate"),
    (MMoE, {"dselect_gamma": 0.0}, "dselect_gamma must be > 0"),
    (MMoE, {"dselect_entropy": -1.0}, "dselect_entropy must be >= 0"),
    (MMoE, {"dselect_k": 0}, "dselect_k must be >= 1"),
    (PLE, {"gating": "dselect_k", "dselect_k": 4}, "dselect_k=4 exceeds the 3 experts of a task gate"),
    (M3oE, {"shared_gate": "dselect_k", "num_shared_experts": 2, "dselect_k": 3}, "exceeds the 2 experts"),
    (M3oE, {"shared_gate": "dselect"}, "choose one of ['network', 'logits', 'dselect_k']"),
])
def test_bad_params_are_named(cls, params, fragment):
    with pytest.raises(ConfigError) as err:
        cls.Params.from_dict(params, model="mine")
    assert fragment in str(err.value) and "mine" in str(err.value)


def test_unused_dselect_params_are_not_checked_against_the_experts(encoded):
    MMoE.Params.from_dict({"num_experts": 1, "dselect_k": 3})  # softmax gates: k is not used
    M3oE.Params.from_dict({"gating": "aftb", "shared_gate": "dselect_k", "num_shared_experts": 2, "dselect_k": 6})


def test_m3oe_aftb_checks_k_against_all_its_experts_at_build(encoded):
    schema = encoded[0]
    n = 3 + schema.num_domains + schema.num_tasks
    model = _model(encoded, "m3oe_aftb", dselect_k=n)
    assert all(g.k == n for g in model.gates)
    with pytest.raises(ConfigError, match=f"dselect_k={n + 1} exceeds the {n} experts of an AFTB gate"):
        _model(encoded, "m3oe_aftb", dselect_k=n + 1)
