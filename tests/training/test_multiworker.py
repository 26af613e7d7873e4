"""Multi-worker training: two workers on loopback end with identical weights."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

pytestmark = pytest.mark.slow


def _ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _weights(checkpoint_dir):
    reader = tf.train.load_checkpoint(str(checkpoint_dir))
    names = [n for n, _ in tf.train.list_variables(str(checkpoint_dir)) if n.endswith(".ATTRIBUTES/VARIABLE_VALUE")]
    return {n: reader.get_tensor(n) for n in names}


@pytest.mark.parametrize("arch_mode, embedding_optimizer", [("bilevel", "adam"), ("joint", "row_sparse")])
def test_two_workers_finish_with_identical_weights(tmp_path, arch_mode, embedding_optimizer):
    cluster = [f"127.0.0.1:{p}" for p in _ports(2)]
    out = tmp_path / "run"
    command = [sys.executable, "-m", "mdmt_tf", "train", "--model", "m3oe", "--data", "synthetic:3000",
               "--out", str(out), "--epochs", "2", "--batch-size", "256", "--strategy-distribute", "multiworker",
               "--precision", "float32", "--arch-mode", arch_mode, "--embedding-optimizer", embedding_optimizer,
               "--param", "bottom_units=[32, 16]", "--param", "expert_units=[16, 8]",
               "--param", "tower_units=[8]", "--param", "embedding_dim=4"]
    workers = []
    for index in range(2):
        env = {**os.environ, "PYTHONPATH": os.getcwd(),
               "TF_CONFIG": json.dumps({"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
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
