"""Multi-worker training: two workers on loopback end with identical weights."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.cluster import launch_workers

pytestmark = pytest.mark.slow


def _weights(checkpoint_dir):
    reader = tf.train.load_checkpoint(str(checkpoint_dir))
    names = [n for n, _ in tf.train.list_variables(str(checkpoint_dir)) if n.endswith(".ATTRIBUTES/VARIABLE_VALUE")]
    return {n: reader.get_tensor(n) for n in names}


@pytest.mark.parametrize("arch_mode, embedding_optimizer", [("bilevel", "adam"), ("joint", "row_sparse")])
def test_two_workers_finish_with_identical_weights(tmp_path, arch_mode, embedding_optimizer):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "mdmt_tf", "train", "--model", "m3oe", "--data", "synthetic:3000",
               "--out", str(out), "--epochs", "2", "--batch-size", "256", "--strategy-distribute", "multiworker",
               "--precision", "float32", "--arch-mode", arch_mode, "--embedding-optimizer", embedding_optimizer,
               "--param", "bottom_units=[32, 16]", "--param", "expert_units=[16, 8]",
               "--param", "tower_units=[8]", "--param", "embedding_dim=4"]
    workers = launch_workers(command, {**os.environ, "PYTHONPATH": os.getcwd()})
    results = [w.communicate(timeout=900) for w in workers]
    for worker, (_, stderr) in zip(workers, results):
        assert worker.returncode == 0, stderr[-3000:]
    chief = _weights(out / "checkpoints" / "last")
    other = _weights(out / "workers" / "worker-1" / "checkpoints" / "last")
    assert set(chief) == set(other) and len(chief) > 20
    for name in chief:
        np.testing.assert_array_equal(chief[name], other[name], err_msg=name)
    assert (out / "model" / "saved_model.pb").exists()  # the chief exports
    assert not (out / "workers" / "worker-1" / "model").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 2 and metrics["config"]["distribute"] == "multiworker"
    # the gradients were all-reduced over both workers: 2 replicas in sync, and each step took
    # one global batch of 256 (128 per worker), so an epoch is ceil(weight rows / 256) steps, the
    # weight rows being (bilevel) the 90 % of training rows that the architecture's held-out
    # slice leaves; row_sparse: the embedding gradients all-gathered as IndexedSlices
    assert metrics["replicas"] == 2
    train_rows = metrics["data"]["rows"]["train"]
    weight_rows = train_rows - (round(0.1 * train_rows) if arch_mode == "bilevel" else 0)
    assert metrics["steps"]["weight"] == 2 * -(-weight_rows // 256)
    assert metrics["steps"].get("architecture", 0) == (metrics["steps"]["weight"] if arch_mode == "bilevel" else 0)


@pytest.mark.parametrize("optimizer", ["sgd", "row_sparse_adam"])
def test_two_workers_take_the_step_one_device_takes(tmp_path, optimizer):
    """One step on a global batch of 64: two workers (32 rows each, gradients summed by
    the all-reduce) end where one device does; so does the architecture step, whose held-out
    batch each worker reads whole and splits by replica. With RowSparseAdam the tables and
    moments are gathered from each worker's own copy, and the rows' gradients all-gathered."""
    script = os.path.join(os.path.dirname(__file__), "one_step_worker.py")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("TF_CONFIG", None)
    single = subprocess.run([sys.executable, script, str(tmp_path / "single"), "single", optimizer], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    workers = launch_workers(
        lambda index: [sys.executable, script, str(tmp_path / f"worker{index}"), "multiworker", optimizer], env)
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-3000:]
    one = np.load(tmp_path / "single.npz")
    for index in range(2):
        two = np.load(tmp_path / f"worker{index}.npz")
        assert set(two.files) == set(one.files)
        for name in one.files:
            np.testing.assert_allclose(two[name], one[name], rtol=0, atol=1e-5, err_msg=name)
    start = np.load(tmp_path / "single.npz")
    assert any("alpha" in name or "beta" in name for name in start.files)  # the search's scalars were compared


def test_a_killed_worker_restarts_from_the_last_checkpoint(tmp_path):
    """Worker 1 is killed during epoch 2 (as a node failure would), the chief is stopped, and
    the job restarts (what a TFJob's restart policy does): both workers resume from the
    chief's epoch checkpoint, at the same epoch and data order, finish the planned epochs with
    the planned number of steps, and end with identical weights."""
    import signal
    import time

    out = tmp_path / "run"
    epochs = 4
    command = [sys.executable, "-m", "mdmt_tf", "train", "--model", "m3oe", "--data", "synthetic:20000",
               "--out", str(out), "--epochs", str(epochs), "--patience", str(epochs), "--batch-size", "256",
               "--strategy-distribute", "multiworker", "--precision", "float32", "--param", "bottom_units=[32, 16]",
               "--param", "expert_units=[16, 8]", "--param", "tower_units=[8]", "--param", "embedding_dim=4"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    workers = launch_workers(command, env)
    state = out / "checkpoints" / "state.json"
    deadline = time.time() + 600
    while not (state.exists() and json.loads(state.read_text())["epoch"] >= 1):
        assert time.time() < deadline and all(w.poll() is None for w in workers), "epoch 1 never finished"
        time.sleep(0.1)
    workers[1].send_signal(signal.SIGKILL)
    try:
        workers[0].wait(timeout=60)  # the chief fails (or hangs) without its peer
    except subprocess.TimeoutExpired:
        workers[0].kill()
    for worker in workers:
        worker.communicate()
    killed_at = json.loads(state.read_text())["epoch"]
    assert killed_at < epochs and not (out / "metrics.json").exists()
    # the failed worker's own directory is gone (a pod's ephemeral disk): it resumes from the chief's
    shutil.rmtree(out / "workers")

    workers = launch_workers(command, env)
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr[-3000:]
        assert f"after epoch {killed_at}" in stdout + stderr  # "resuming ... after epoch k", both workers
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_trained"] == epochs
    train_rows = metrics["data"]["rows"]["train"]
    assert metrics["steps"]["weight"] == epochs * -(-train_rows // 256)  # the planned steps, none repeated
    chief = _weights(out / "checkpoints" / "last")
    other = _weights(out / "workers" / "worker-1" / "checkpoints" / "last")
    for name in chief:
        np.testing.assert_array_equal(chief[name], other[name], err_msg=name)


@pytest.mark.parametrize("shards", [4, 3])
def test_two_workers_stream_shards(tmp_path, shards):
    """--data shards:DIR under two workers (the strategy is made before the scan's first TF
    op: collective ops must be configured at program startup, and the run failed before).
    4 shards a split deal evenly: each worker reads its own two (FILE), in batches of half
    the global batch, and an epoch is the steps of the worker with fewer rows. 3 shards do
    not: every worker reads all three and keeps its part of each global batch (DATA). Both
    workers end with identical weights."""
    from mdmt_tf.data.shards import shard_files, write_sharded_synthetic
    from mdmt_tf.data.synthetic import SyntheticConfig

    data = tmp_path / "shards"
    write_sharded_synthetic(SyntheticConfig(rows=4000, users=300, items=200, seed=3), data, shards, 1000)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "mdmt_tf", "train", "--model", "mmoe", "--data", f"shards:{data}",
               "--out", str(out), "--epochs", "2", "--batch-size", "256", "--strategy-distribute", "multiworker",
               "--precision", "float32", "--param", "expert_units=[16]", "--param", "tower_units=[8]",
               "--param", "embedding_dim=4"]
    workers = launch_workers(command, {**os.environ, "PYTHONPATH": os.getcwd()})
    results = [w.communicate(timeout=600) for w in workers]
    for worker, (_, stderr) in zip(workers, results):
        assert worker.returncode == 0, stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 2 and metrics["replicas"] == 2
    counts = sorted(sum(1 for _ in tf.data.TFRecordDataset(f, compression_type="GZIP"))
                    for f in shard_files(data)["train"])
    if shards == 4:  # dealt largest first to the worker with fewer rows
        per_worker = [counts[3] + counts[0], counts[2] + counts[1]]
        assert metrics["steps"]["weight"] == 2 * (min(per_worker) // 128)
        for index, (stdout, stderr) in enumerate(results):
            assert f"worker {index} reads 2 of the 4 train files" in stdout + stderr
    else:
        assert metrics["steps"]["weight"] == 2 * -(-sum(counts) // 256)
        assert all("train files" not in stdout + stderr for stdout, stderr in results)
    chief = _weights(out / "checkpoints" / "last")
    other = _weights(out / "workers" / "worker-1" / "checkpoints" / "last")
    for name in chief:
        np.testing.assert_array_equal(chief[name], other[name], err_msg=name)
