"""One bilevel step (an architecture step on a held-out batch, then a weight step) of a
small M3oE with SGD, on one fixed global batch; writes every weight to OUT.npz.

    python tests/training/one_step_worker.py OUT single [OPTIMIZER]       # one device
    TF_CONFIG=... python tests/training/one_step_worker.py OUT multiworker [OPTIMIZER]

OPTIMIZER: sgd (default) or row_sparse_adam (the weights' optimizer; the tables' rows are
then gathered from each worker's copy, mdmt_tf.layers._util.row_source).

Run as a subprocess by test_multiworker.py: N workers must end with the weights one device
reaches on the same global batch.
"""
import sys

import numpy as np

ROWS = 64  # the global batch


def batch():
    rng = np.random.default_rng(0)
    features = {"domain_id": rng.integers(0, 2, ROWS).astype("int32"),
                "user_id": rng.integers(0, 40, ROWS).astype("int32"),
                "age": rng.normal(size=ROWS).astype("float32")}
    labels = {"click": rng.integers(0, 2, ROWS).astype("float32"),
              "like": rng.integers(0, 2, ROWS).astype("float32")}
    return features, labels


def main(out: str, distributed: bool, optimizer: str = "sgd") -> None:
    import keras
    import tensorflow as tf

    from mdmt_tf.models import FeatureSchema, build_model
    from mdmt_tf.training.optimizers import RowSparseAdam
    from mdmt_tf.training.trainer import MDMTTrainer

    strategy = tf.distribute.MultiWorkerMirroredStrategy() if distributed else tf.distribute.get_strategy()
    schema = FeatureSchema(domain="domain_id", domains=("a", "b"), tasks=("click", "like"),
                           sparse=(("user_id", 40),), dense=("age",))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = tf.data.Dataset.from_tensor_slices(batch()).batch(ROWS).with_options(options)
    held = tf.data.Dataset.from_tensor_slices(batch()).shuffle(ROWS, seed=1).batch(ROWS)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = build_model("m3oe", schema, {"embedding_dim": 4, "bottom_units": [16, 8], "expert_units": [8],
                                             "tower_units": [4]}, dtype="float32")
        trainer = MDMTTrainer(model, arch_mode="bilevel", heldout=held, loss_reduction="sample",
                              weight_optimizer=keras.optimizers.SGD(0.5) if optimizer == "sgd" else RowSparseAdam(0.05),
                              arch_optimizer=keras.optimizers.SGD(0.5))
        trainer.compile()
    trainer.fit(data, epochs=1, verbose=0)
    np.savez(out, **{v.path: np.asarray(v.numpy()) for v in model.weights})


if __name__ == "__main__":
    main(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "multiworker", sys.argv[3] if len(sys.argv) > 3 else "sgd")
