"""Parameter-server training in an in-process cluster: 2 workers and 2 parameter servers as
`tf.distribute.Server`s on loopback ports, the chief (coordinator) in this process.

    python tests/training/ps_cluster_worker.py OUT_DIR

Run as a subprocess by test_parameter_servers.py. Three runs, each on a fresh model:
- "batches": the fixed batches of `batches()`, one per step, joined after every step;
- "dataset": per-worker datasets repeating `batches()[0]`, joined after every step;
- "async": the same datasets, every step scheduled before one join.
Writes OUT_DIR/<run>.npz (every table and dense weight, the losses, the step count) and
OUT_DIR/devices.json (each shard's device), and saves a checkpoint of the "batches" run in
OUT_DIR/checkpoint. Exit status 77 (and a message on stderr) when the servers cannot start.
"""
import json
import os
import sys

import numpy as np

from mdmt_tf.training.parameter_servers import ShardedModelConfig
from tests.cluster import free_ports

CONFIG = ShardedModelConfig(vocab=(23, 9), dim=4, dense_features=3, tasks=2, bottom_units=(16,), tower_units=(8,),
                            num_shards=2, learning_rate=0.05, seed=3)
STEPS, ROWS = 6, 32
CANNOT_START = 77


def batches():
    """STEPS fixed batches (ids, dense, labels), ids spread over both shards with repeats."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        ids = np.stack([rng.integers(0, rows, ROWS) for rows in CONFIG.vocab], axis=1).astype("int64")
        out.append((ids, rng.normal(size=(ROWS, CONFIG.dense_features)).astype("float32"),
                    rng.integers(0, 2, (ROWS, CONFIG.tasks)).astype("float32")))
    return out


def dataset_fn(input_context):
    import tensorflow as tf

    return tf.data.Dataset.from_tensors(batches()[0]).repeat()


def in_process_cluster(num_workers, num_ps):
    """Start the servers (kept alive by the returned list) and the chief's cluster resolver."""
    import tensorflow as tf

    ports = free_ports(num_workers + num_ps)
    spec = tf.train.ClusterSpec({"worker": [f"127.0.0.1:{p}" for p in ports[:num_workers]],
                                 "ps": [f"127.0.0.1:{p}" for p in ports[num_workers:]]})
    worker_config = tf.compat.v1.ConfigProto()
    worker_config.inter_op_parallelism_threads = num_workers + 1  # fewer cores than workers + 1 (the tutorial's)
    servers = [tf.distribute.Server(spec, job_name="worker", task_index=i, config=worker_config, protocol="grpc")
               for i in range(num_workers)]
    servers += [tf.distribute.Server(spec, job_name="ps", task_index=i, protocol="grpc") for i in range(num_ps)]
    return servers, tf.distribute.cluster_resolver.SimpleClusterResolver(spec, rpc_layer="grpc")


def _save(path, model, result):
    np.savez(path, **model.values(), losses=np.asarray(result.losses), steps=result.steps)


def main(out: str) -> None:
    import tensorflow as tf

    from mdmt_tf.training.parameter_servers import ShardedTrainer, build

    os.makedirs(out, exist_ok=True)
    for attempt in range(3):  # a picked port can be taken before its server binds it: pick again
        try:
            servers, resolver = in_process_cluster(2, 2)
            break
        except (tf.errors.OpError, OSError) as error:
            if attempt == 2:
                print(f"in-process servers cannot start: {error}", file=sys.stderr)
                sys.exit(CANNOT_START)
    strategy = tf.distribute.ParameterServerStrategy(resolver)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)

    model, optimizer = build(CONFIG, strategy)
    trainer = ShardedTrainer(model, optimizer, strategy, coordinator)
    devices = {v.name: v.device for v in model.table_shards}
    devices.update({f"moment:{m.name}": m.device for m in optimizer.momentums[:len(model.table_shards)]})
    devices["iterations"] = optimizer.iterations.device
    devices["dense"] = [v.device for v in model.dense_variables]
    with open(os.path.join(out, "devices.json"), "w") as f:
        json.dump(devices, f)
    _save(os.path.join(out, "batches.npz"), model, trainer.train(batches=batches(), sync=True))
    trainer.checkpoint().write(os.path.join(out, "checkpoint", "ckpt"))

    for name, sync in (("dataset", True), ("async", False)):
        model, optimizer = build(CONFIG, strategy)
        trainer = ShardedTrainer(model, optimizer, strategy, coordinator)
        iterator = trainer.per_worker_iterator(dataset_fn)
        _save(os.path.join(out, f"{name}.npz"), model, trainer.train(iterator=iterator, steps=STEPS, sync=sync))
    del servers


if __name__ == "__main__":
    main(sys.argv[1])
