"""mdmt_tf.bench: the FLOP counter on known products, the steady-state step clock, and
one tiny `run_one` whose figures must be consistent with each other."""
from __future__ import annotations

import pytest

tf = pytest.importorskip("tensorflow")


def _flops(fn, *specs):
    from mdmt_tf.bench.flops import graph_matmul_flops

    return graph_matmul_flops(tf.function(fn).get_concrete_function(*specs).graph)


def test_matmul_flops_count_two_per_multiply_add_with_transposes():
    a, b = tf.TensorSpec((8, 4)), tf.TensorSpec((4, 3))
    assert _flops(tf.matmul, a, b) == 2 * 8 * 4 * 3
    assert _flops(lambda x, y: tf.matmul(x, y, transpose_a=True), tf.TensorSpec((4, 8)), b) == 2 * 8 * 4 * 3
    assert _flops(lambda x, y: tf.matmul(x, y, transpose_b=True), a, tf.TensorSpec((3, 4))) == 2 * 8 * 4 * 3


def test_batched_and_broadcast_products_and_einsum():
    assert _flops(tf.matmul, tf.TensorSpec((5, 8, 4)), tf.TensorSpec((5, 4, 3))) == 2 * 5 * 8 * 4 * 3
    assert _flops(tf.matmul, tf.TensorSpec((1, 8, 4)), tf.TensorSpec((5, 4, 3))) == 2 * 5 * 8 * 4 * 3
    # M3oE's towers: every (domain, task) tower on every row
    assert _flops(lambda x, k: tf.einsum("bti,dtio->bdto", x, k),
                  tf.TensorSpec((16, 2, 8)), tf.TensorSpec((3, 2, 8, 5))) == 2 * 16 * 3 * 2 * 8 * 5


def test_flops_inside_called_functions_are_counted_and_elementwise_ops_are_not():
    inner = tf.function(lambda x, y: tf.nn.relu(tf.matmul(x, y)) + 1.0)
    assert _flops(lambda x, y: inner(x, y) * 2.0, tf.TensorSpec((8, 4)), tf.TensorSpec((4, 3))) == 2 * 8 * 4 * 3


def test_timed_fit_clocks_only_the_steps_after_the_warm_up(small_data):
    import keras

    from mdmt_tf.bench.train import timed_fit
    from mdmt_tf.data.dataset import make_dataset
    from mdmt_tf.models import build_model
    from mdmt_tf.training.encoded import EncodedData
    from mdmt_tf.training.trainer import MDMTTrainer

    keras.utils.set_random_seed(0)
    enc = EncodedData.from_data(small_data)
    trainer = MDMTTrainer(build_model("mmoe", enc.schema, {}), arch_mode="fixed")
    trainer.compile()
    data = make_dataset(enc.features["train"], enc.labels["train"], batch_size=64, repeat=True, drop_remainder=True)
    seconds = timed_fit(trainer, data, steps=4, warmup=2)
    assert 0 < seconds < 60
    assert int(trainer.weight_steps.numpy()) == 6  # warm-up steps ran too, untimed
    with pytest.raises(ValueError, match="warmup"):
        timed_fit(trainer, data, steps=4, warmup=0)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_run_one_reports_consistent_figures(precision):
    from mdmt_tf.bench.train import run_one

    r = run_one("mmoe", batch_size=256, steps=3, precision=precision, jit=False, trials=1)
    assert r["precision"] == precision and r["batch_size"] == 256
    # under mixed precision the bf16 serving export's forward is timed too
    assert ("infer_bf16_export_examples_per_second" in r) == (precision == "mixed_bfloat16")
    import keras

    assert keras.mixed_precision.global_policy().name == "float32"  # the model had its own policy
    # a training step is the forward pass plus a backward of about twice its products
    assert 2.5 * r["forward_flops_per_batch"] < r["train_flops_per_step"] < 3.5 * r["forward_flops_per_batch"]
    assert r["train_examples_per_second"] == pytest.approx(
        r["train_flops_per_second"] / r["train_flops_per_step"] * 256, rel=1e-6)
    assert r["train_examples_per_second_best"] >= r["train_examples_per_second"] > 0
    assert r["infer_examples_per_second_best"] >= r["infer_examples_per_second"] > 0
    assert r["peak_rss_mib"] > 100
