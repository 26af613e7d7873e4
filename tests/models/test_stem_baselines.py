"""STEM's baselines (seed 004): OMoE (one gate for every task), ME-MMoE (an embedding table
per expert) and ME-PLE (a table per task's experts and one for the shared experts), each
tested on its defining mechanism."""
import keras
import numpy as np
import tensorflow as tf

from mdmt_tf.models import build_model
from tests.models.conftest import take

SMALL = {"embedding_dim": 4, "expert_units": [8], "tower_units": [4]}


def _batch(encoded, rows=64):
    features, labels = encoded[1]["train"]
    return take(features, labels, np.arange(rows))


def _tables(model, prefix):
    return [v for v in model.weight_variables if v.path.split("/")[1].startswith(prefix)]


def test_omoe_has_one_gate_for_every_task(encoded):
    schema, _ = encoded
    keras.utils.set_random_seed(0)
    model = build_model("omoe", schema, SMALL)
    features, _ = _batch(encoded)
    _, details = model.forward({k: tf.constant(v) for k, v in features.items()})
    weights = details.gates[0].weights.numpy()
    assert weights.shape[1] == len(schema.tasks)
    np.testing.assert_array_equal(weights[:, 0], weights[:, 1])  # the tasks share the gate
    mmoe = build_model("mmoe", schema, SMALL)
    assert model.gates.count_params() * len(schema.tasks) == mmoe.gates.count_params()


def test_me_mmoe_experts_read_their_own_tables_and_every_task_reaches_all(encoded):
    """Expert e's output depends on table e only; each task's output depends on every table
    (the gates read their mean and mix every expert: All Forward All Backward)."""
    schema, _ = encoded
    keras.utils.set_random_seed(0)
    model = build_model("me_mmoe", schema, {**SMALL, "num_experts": 3})
    tables = _tables(model, "expert_embedding_")
    assert len(tables) == 3
    features, _ = _batch(encoded)
    features = {k: tf.constant(v) for k, v in features.items()}
    with tf.GradientTape(persistent=True) as tape:
        inputs = tf.stack([model.flat_inputs(t(features), features) for t in model.expert_embeddings], axis=1)
        experts = model.experts(inputs)
        per_expert = [tf.reduce_sum(experts[:, e]) for e in range(3)]
        probs = model(features)
        per_task = {task: tf.reduce_sum(probs[task]) for task in schema.tasks}
    for e in range(3):
        grads = tape.gradient(per_expert[e], [t.value for t in tables])
        for j, g in enumerate(grads):
            touched = g is not None and float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(g)))) > 0
            assert touched == (j == e), (e, j)
    for task in schema.tasks:
        grads = tape.gradient(per_task[task], [t.value for t in tables])
        assert all(float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(g)))) > 0 for g in grads), task


def test_me_ple_task_experts_and_gates_read_their_task_table(encoded):
    """A table per task plus the shared one; the first level's task-t outputs (its experts
    and gate) depend on table t and the shared table only."""
    schema, _ = encoded
    keras.utils.set_random_seed(0)
    model = build_model("me_ple", schema, SMALL)
    tasks = _tables(model, "task_embedding_")
    assert len(tasks) == len(schema.tasks) and _tables(model, "embedding")
    features, _ = _batch(encoded)
    features = {k: tf.constant(v) for k, v in features.items()}
    with tf.GradientTape(persistent=True) as tape:
        task_x = tf.stack([model.flat_inputs(t(features), features) for t in model.task_tables], axis=1)
        shared_x = model.flat_inputs(model.embedding(features), features)
        outputs, _, _ = model.levels[0](task_x, shared_x)
        per_task = [tf.reduce_sum(outputs[:, t]) for t in range(len(schema.tasks))]
    for t in range(len(schema.tasks)):
        grads = tape.gradient(per_task[t], [v.value for v in tasks])
        for j, g in enumerate(grads):
            touched = g is not None and float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(g)))) > 0
            assert touched == (j == t), (t, j)
