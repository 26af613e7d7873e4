"""Gradient checks for the stop-gradients the papers prescribe.

AFTB (STEM, m3oe_aftb): task t's loss must give exactly zero gradient to another task's
experts and task-specific embeddings, and non-zero to its own and the shared experts.
Without AFTB those gradients are non-zero. M3oE's shared gates read stop_gradient(bottom).
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.models import build_model
from tests.models.conftest import take


def _dense(grad, variable):
    if grad is None:
        return np.zeros(variable.shape, dtype=np.float32)
    return np.asarray(tf.convert_to_tensor(grad))


def _task_loss_grads(model, features, labels, task, variables):
    with tf.GradientTape() as tape:
        out = model(features, training=True)
        loss = tf.reduce_mean(keras.losses.binary_crossentropy(labels[task][:, None], out[task]))
    return [_dense(g, v) for g, v in zip(tape.gradient(loss, variables), variables)]


@pytest.fixture()
def batch(encoded):
    _, splits = encoded
    return take(*splits["train"], range(256))


@pytest.mark.parametrize("name, params", [("stem", {}), ("m3oe_aftb", {})])
def test_aftb_blocks_other_tasks_gradients(name, params, encoded, batch):
    schema, _ = encoded
    keras.utils.set_random_seed(1)
    model = build_model(name, schema, params)
    n = model.params.num_task_experts if name == "stem" else 1
    task_kernel = model.task_experts.kernels[0]
    shared_kernel = model.shared_experts.kernels[0] if name == "stem" else model.experts.kernels[0]
    own_table, other_table = model.task_embeddings[0].embeddings, model.task_embeddings[1].embeddings
    g_task, g_shared, g_own_table, g_other_table = _task_loss_grads(
        model, *batch, "click", [task_kernel, shared_kernel, own_table, other_table])
    if name == "m3oe_aftb":
        g_shared = g_shared[model.expert_slices["shared"]]
    assert np.all(g_task[n:2 * n] == 0.0), "task 1's experts must get no gradient from task 0's loss"
    assert np.all(g_other_table == 0.0), "task 1's embeddings must get no gradient from task 0's loss"
    assert np.abs(g_task[:n]).sum() > 0, "task 0's experts must learn from task 0's loss"
    assert np.abs(g_own_table).sum() > 0 and np.abs(g_shared).sum() > 0
    # and symmetrically for task 1
    g_task, g_other_table = _task_loss_grads(model, *batch, "like", [task_kernel, own_table])
    assert np.all(g_task[:n] == 0.0) and np.all(g_other_table == 0.0)
    assert np.abs(g_task[n:2 * n]).sum() > 0


def test_without_aftb_gradients_cross_tasks(encoded, batch):
    schema, _ = encoded
    keras.utils.set_random_seed(1)
    stem = build_model("stem", schema, {"aftb": False})
    g_task, g_other_table = _task_loss_grads(stem, *batch, "click",
                                             [stem.task_experts.kernels[0], stem.task_embeddings[1].embeddings])
    assert np.abs(g_task[1]).sum() > 0 and np.abs(g_other_table).sum() > 0
    m3oe = build_model("m3oe", schema)
    (g_experts,) = _task_loss_grads(m3oe, *batch, "click", [m3oe.experts.kernels[0]])
    g_task = g_experts[m3oe.expert_slices["task"]]
    assert np.abs(g_task[1]).sum() > 0  # through the task view's balance term


@pytest.mark.parametrize("aftb_domains", [True, False])
def test_domain_by_task_aftb(aftb_domains, encoded):
    """With aftb_domains, a batch from domain 0 trains no other domain's expert."""
    schema, splits = encoded
    features, labels = splits["train"]
    features, labels = take(features, labels, np.flatnonzero(features[schema.domain] == 0)[:128])
    keras.utils.set_random_seed(2)
    model = build_model("m3oe_aftb", schema, {"aftb_domains": aftb_domains})
    (g,) = _task_loss_grads(model, features, labels, "click", [model.experts.kernels[0]])
    g = g[model.expert_slices["domain"]]
    assert np.abs(g[0]).sum() > 0
    others = np.abs(g[1:]).sum()
    assert (others == 0.0) if aftb_domains else (others > 0)


@pytest.mark.parametrize("name", ["m3oe", "m3oe_aftb"])
@pytest.mark.parametrize("stop", [True, False])
def test_m3oe_gate_reads_stop_gradient_bottom(name, stop, encoded, batch):
    schema, _ = encoded
    keras.utils.set_random_seed(3)
    model = build_model(name, schema, {"gate_stop_gradient": stop})
    features, _ = batch
    bottom_vars = model.bottom.trainable_variables + model.skip.trainable_variables + model.star.trainable_variables
    # m3oe_aftb's gates also read the task inputs: those still train through the gates
    table = [model.task_embeddings[0].embeddings] if name == "m3oe_aftb" else []
    with tf.GradientTape() as tape:
        _, details = model.forward(features, training=True)
        weights = details.gates[0].weights
        gate_sum = tf.reduce_sum(weights * tf.random.stateless_uniform(tf.shape(weights), seed=(1, 2)))
    variables = bottom_vars + table
    grads = [_dense(g, v) for g, v in zip(tape.gradient(gate_sum, variables), variables)]
    total = sum(np.abs(g).sum() for g in grads[:len(bottom_vars)])
    assert (total == 0.0) if stop else (total > 0)
    if table:
        assert np.abs(grads[-1]).sum() > 0


@pytest.mark.parametrize("name", ["stem", "m3oe_aftb"])
def test_task_embedding_field_subset(name, encoded, batch):
    """task_embedding_fields=["user_id"]: each task has a table of user ids only, the other
    fields come from the shared table; AFTB keeps task 1's table out of task 0's loss."""
    schema, _ = encoded
    keras.utils.set_random_seed(4)
    model = build_model(name, schema, {"task_embedding_fields": ["user_id"]})
    features, _ = batch
    k = model.params.embedding_dim
    # one task-specific table per task, covering user_id only
    assert [e.fields for e in model.task_embeddings] == [("user_id",)] * schema.num_tasks
    task_tables = [v for v in model.trainable_variables if "task_embedding" in v.path]
    assert len(task_tables) == schema.num_tasks
    assert all(tuple(v.shape) == (schema.sparse_sizes["user_id"], k) for v in task_tables)
    # the per-task inputs: user_id from the task's own table, every other field shared
    embedded = model.embedding(features)
    x = np.asarray(model.task_inputs(embedded, features))
    for t, table in enumerate(model.task_embeddings):
        own = np.asarray(table(features))[:, 0]
        for i, field in enumerate(model.embedding.fields):
            piece = x[:, t, i * k:(i + 1) * k]
            np.testing.assert_array_equal(piece, own if field == "user_id" else np.asarray(embedded[:, i]))
    assert not np.array_equal(np.asarray(model.task_embeddings[0](features)),
                              np.asarray(model.task_embeddings[1](features)))
    # gradients: own table yes, the other task's table exactly zero
    for task, t in (("click", 0), ("like", 1)):
        g_own, g_other = _task_loss_grads(model, *batch, task, [model.task_embeddings[t].embeddings,
                                                                model.task_embeddings[1 - t].embeddings])
        assert np.abs(g_own).sum() > 0, f"{task}: its own user_id table must learn"
        assert np.all(g_other == 0.0), f"{task}: the other task's table must get no gradient"
        # exactly the rows of the batch's users
        users = np.unique(features["user_id"])
        assert np.all(np.delete(g_own, users, axis=0) == 0.0) and (np.abs(g_own[users]).sum(1) > 0).all()
