"""Parameter-server training (experimental): sharded tables, the plain-TF row-sparse Adam on
their shards, and the custom loop on an in-process cluster of 2 workers and 2 parameter
servers, which must end where the single-process run of the same steps does."""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.errors import ConfigError
from mdmt_tf.training.optimizers import RowSparseAdam
from mdmt_tf.training.parameter_servers import ShardedAdam, ShardedTable, ShardedTrainer, build
from tests.training import ps_cluster_worker as cluster

LR = 0.01


@pytest.mark.parametrize("rows, num_shards", [(10, 3), (12, 4), (7, 1), (5, 5)])
def test_lookup_equals_a_gather_on_the_unsplit_table(rows, num_shards):
    rng = np.random.default_rng(rows)
    initial = rng.normal(size=(rows, 3)).astype("float32")
    table = ShardedTable(rows, 3, num_shards, initial=initial)
    assert sum(table.shard_rows(k) for k in range(num_shards)) == rows
    for k, shard in enumerate(table.shards):
        np.testing.assert_array_equal(shard.numpy(), initial[k::num_shards])  # id i: shard i % n, row i // n
    np.testing.assert_array_equal(table.values(), initial)
    ids = np.concatenate([np.arange(rows), rng.integers(0, rows, 9 + (-rows) % 3), [rows - 1, 0, rows - 1]])
    ids = ids.reshape(3, -1)  # every id, random ones, repeats
    np.testing.assert_array_equal(table.lookup(ids).numpy(), initial[ids])
    np.testing.assert_array_equal(tf.function(table.lookup)(tf.constant(ids[:1])).numpy(), initial[ids[:1]])


def test_out_of_range_ids_and_bad_arguments_fail_clearly():
    table = ShardedTable(10, 2, 3)
    for bad in ([3, 10], [-1]):
        with pytest.raises(tf.errors.InvalidArgumentError, match="table: (id >= rows|negative id)"):
            table.lookup(np.array(bad))
    with pytest.raises(ConfigError, match="num_shards must be >= 1, got 0"):
        ShardedTable(10, 2, 0)
    with pytest.raises(ConfigError, match="rows=3, num_shards=4"):
        ShardedTable(3, 2, 4)
    with pytest.raises(ConfigError, match=r"shape \(10, 2\), got \(10, 3\)"):
        ShardedTable(10, 2, 2, initial=np.zeros((10, 3)))
    with pytest.raises(ConfigError, match="learning_rate must be > 0, got 0"):
        ShardedAdam(table.shards, [], learning_rate=0)


@pytest.mark.parametrize("rows, num_shards", [(11, 3), (8, 2)])
def test_row_sparse_adam_on_shards_equals_row_sparse_adam_on_the_table(rows, num_shards):
    """Same gradient rows each step (through the sharded lookup on one side, a gather on the
    unsplit table on the other): every row of the table, and of each moment, ends equal; rows
    absent from a step stay where they were, and rows never looked up keep their initial values."""
    rng = np.random.default_rng(num_shards)
    initial = rng.normal(size=(rows, 4)).astype("float32")
    table = ShardedTable(rows, 4, num_shards, initial=initial)
    sharded = ShardedAdam(table.shards, [], learning_rate=LR)
    unsplit, reference = keras.Variable(initial.copy()), RowSparseAdam(LR)
    never = rows - 2  # ids rows - 2 and rows - 1 are never looked up
    for step in range(5):
        ids = rng.integers(0, never if step % 2 else 3, size=9)  # odd steps: rows 3.. too, repeated ids
        upstream = rng.normal(size=(9, 4)).astype("float32")
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(table.lookup(ids) * upstream)
        before = table.values()
        sharded.apply(tape.gradient(loss, table.shards), [])
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.gather(unsplit.value, ids) * upstream)
        reference.apply([tape.gradient(loss, unsplit.value)], [unsplit])
        np.testing.assert_allclose(table.values(), unsplit.numpy(), rtol=0, atol=1e-6, err_msg=f"step {step}")
        absent = np.setdiff1d(np.arange(rows), ids)
        np.testing.assert_array_equal(table.values()[absent], before[absent])
    np.testing.assert_array_equal(table.values()[never:], initial[never:])
    assert not np.allclose(table.values()[:3], initial[:3])
    assert int(sharded.iterations.numpy()) == int(reference.iterations.numpy()) == 5
    for k in range(num_shards):
        np.testing.assert_allclose(sharded.momentums[k].numpy(), reference._momentums[0].numpy()[k::num_shards],
                                   rtol=0, atol=1e-6)
        np.testing.assert_allclose(sharded.velocities[k].numpy(), reference._velocities[0].numpy()[k::num_shards],
                                   rtol=0, atol=1e-6)


def test_dense_rule_equals_keras_adam():
    rng = np.random.default_rng(2)
    start = rng.normal(size=(4, 3)).astype("float32")
    mine, theirs = tf.Variable(start.copy()), keras.Variable(start.copy())
    sharded, adam = ShardedAdam([], [mine], learning_rate=LR), keras.optimizers.Adam(LR)
    for _ in range(4):
        grad = tf.constant(rng.normal(size=(4, 3)).astype("float32"))
        sharded.apply([], [grad])
        adam.apply([grad], [theirs])
    np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=0, atol=1e-6)
    assert not np.allclose(mine.numpy(), start)


def test_a_step_reads_only_the_batch_rows_of_the_shards_and_their_moments():
    """In the traced step, shards and shard moments are only gathered from and scattered into
    (a whole read would copy a parameter server's shard to the worker every step); the dense
    weights, which Adam updates whole, are read whole."""
    model, optimizer = build(cluster.CONFIG)
    ids, dense, labels = (tf.constant(a) for a in cluster.batches()[0])
    graph = ShardedTrainer(model, optimizer)._step_on_batch.get_concrete_function(ids, dense, labels).graph
    internal = {id(external): placeholder for external, placeholder in graph.captures}
    n = len(model.table_shards)
    sharded = {internal[id(v.handle)].name for v in model.table_shards + optimizer.momentums[:n] +
               optimizer.velocities[:n]}
    kernel = internal[id(model.dense_variables[0].handle)].name
    readers = {}
    for op in graph.get_operations():
        for tensor in op.inputs:
            readers.setdefault(tensor.name, set()).add(op.type)
    assert len(sharded) == 3 * n
    for name in sharded:
        assert "ReadVariableOp" not in readers[name], name
        assert readers[name] & {"ResourceGather", "ResourceScatterUpdate", "ResourceScatterSub"}, name
    assert "ReadVariableOp" in readers[kernel]


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    """The in-process cluster's runs (ps_cluster_worker.py, in a subprocess of its own)."""
    out = tmp_path_factory.mktemp("ps_cluster")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("TF_CONFIG", None)
    script = os.path.join(os.path.dirname(__file__), "ps_cluster_worker.py")
    done = subprocess.run([sys.executable, script, str(out)], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode == cluster.CANNOT_START:
        # no loopback gRPC server can start here (sandbox without sockets): nothing to test
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _reference(batches=None, steps=None):
    """The single-process run (default strategy, no coordinator) of the same steps."""
    model, optimizer = build(cluster.CONFIG)
    trainer = ShardedTrainer(model, optimizer)
    if batches is not None:
        result = trainer.train(batches=batches)
    else:
        result = trainer.train(iterator=trainer.per_worker_iterator(cluster.dataset_fn), steps=steps)
    return model, optimizer, result


def _assert_equal_runs(saved, model, result):
    values = model.values()
    assert set(saved.files) == set(values) | {"losses", "steps"}
    for name, value in values.items():
        np.testing.assert_allclose(saved[name], value, rtol=0, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(saved["losses"], result.losses, rtol=0, atol=1e-5)
    assert int(saved["steps"]) == result.steps == cluster.STEPS


def test_cluster_steps_end_where_one_process_does(cluster_run):
    """Fixed batches, one step at a time on whichever worker the coordinator picks: the
    tables, dense weights and losses equal the single-process run's."""
    model, _, result = _reference(batches=cluster.batches())
    _assert_equal_runs(np.load(cluster_run / "batches.npz"), model, result)
    assert not np.allclose(model.values()["table_0"], build(cluster.CONFIG)[0].values()["table_0"])


def test_cluster_per_worker_datasets(cluster_run):
    """Per-worker datasets (create_per_worker_dataset), joined after each step: as one process.
    Asynchronous steps (one join at the end) run every step, but are not compared."""
    model, _, result = _reference(steps=cluster.STEPS)
    _assert_equal_runs(np.load(cluster_run / "dataset.npz"), model, result)
    run = np.load(cluster_run / "async.npz")
    assert int(run["steps"]) == cluster.STEPS and np.isfinite(run["losses"]).all()
    assert not np.allclose(run["table_0"], build(cluster.CONFIG)[0].values()["table_0"])


def test_shards_and_their_moments_live_on_both_parameter_servers(cluster_run):
    devices = json.loads((cluster_run / "devices.json").read_text())
    for table in range(len(cluster.CONFIG.vocab)):
        shard = [devices[f"table_{table}_shard_{k}:0"] for k in range(2)]
        assert {d.rsplit("/device:", 1)[0] for d in shard} == {"/job:ps/replica:0/task:0",
                                                               "/job:ps/replica:0/task:1"}
    for name, device in devices.items():
        if name.startswith("moment:"):
            index = int(name.split("_")[1].split(":")[0])
            assert device == devices[f"table_{index // 2}_shard_{index % 2}:0"], name  # colocated with its shard
    assert devices["iterations"].startswith("/job:ps/")
    assert all(d.startswith("/job:ps/") for d in devices["dense"])


def test_a_cluster_checkpoint_restores_in_one_process(cluster_run):
    model, optimizer = build(cluster.CONFIG)
    ShardedTrainer(model, optimizer).checkpoint().read(str(cluster_run / "checkpoint" / "ckpt")).assert_consumed()
    saved = np.load(cluster_run / "batches.npz")
    for name, value in model.values().items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)
    assert int(optimizer.iterations.numpy()) == cluster.STEPS
