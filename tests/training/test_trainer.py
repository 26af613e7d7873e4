"""The arch modes of the bi-level trainer."""
import keras
import numpy as np
import pytest

from mdmt_tf.errors import ConfigError
from mdmt_tf.models import build_model
from mdmt_tf.training.trainer import MDMTTrainer
from tests.training.conftest import batches, values

SMALL = {"bottom_units": [32, 16], "expert_units": [16, 8], "tower_units": [8], "embedding_dim": 4}


def _m3oe(enc, **params):
    keras.utils.set_random_seed(0)
    return build_model("m3oe", enc.schema, {**SMALL, **params})


def _fit(trainer, enc, epochs=1, batch_size=256):
    trainer.compile()
    trainer.fit(batches(enc, "train", batch_size, shuffle=True, seed=0), epochs=epochs, verbose=0, shuffle=False)


def _changed(before, after):
    return [not np.array_equal(a, b) for a, b in zip(before, after)]


def test_bilevel_weight_optimizer_never_touches_architecture_variables(enc):
    model = _m3oe(enc)
    trainer = MDMTTrainer(model, arch_mode="bilevel", arch_learning_rate=0.0,
                          heldout=batches(enc, "val"))
    assert {id(v) for v in trainer.weight_vars}.isdisjoint({id(v) for v in model.architecture_variables})
    arch0, weights0 = values(model.architecture_variables), values(model.weight_variables)
    _fit(trainer, enc)
    assert not any(_changed(arch0, values(model.architecture_variables)))  # arch lr 0, weight optimizer blind
    assert all(_changed(weights0, values(model.weight_variables)))
    assert int(trainer.arch_steps.numpy()) == int(trainer.weight_steps.numpy()) > 0


def test_authors_mode_lets_the_weight_optimizer_move_alpha_beta(enc):
    model = _m3oe(enc)
    steps = int(np.ceil(enc.rows("train") / 256))
    trainer = MDMTTrainer(model, arch_mode="authors", arch_learning_rate=0.0, steps_per_epoch=steps,
                          heldout=batches(enc, "train", 256, shuffle=True, seed=5))
    assert {id(v) for v in model.architecture_variables} <= {id(v) for v in trainer.weight_vars}
    arch0 = values(model.architecture_variables)
    _fit(trainer, enc, epochs=2)
    assert all(_changed(arch0, values(model.architecture_variables)))
    assert int(trainer.arch_steps.numpy()) == 2  # one per epoch


def test_authors_mode_steps_after_the_epoch_with_plain_bce_on_the_next_separate_batch(enc):
    """The released trainer: after an epoch's last weight step, one architecture step on the
    next batch of a separate pass over the training data, differentiating plain BCE over the
    [batch, tasks] outputs (not the per-(domain, task) training loss). The weights are frozen
    here (SGD at lr 0) so that only that step can move alpha / beta, by exactly -grad."""
    import tensorflow as tf

    from mdmt_tf.training.losses import bce

    model = _m3oe(enc, arch_granularity="vector")
    separate = list(batches(enc, "train", 100, shuffle=True, seed=9).take(2))  # the separate pass's batches
    stream = tf.data.Dataset.from_tensor_slices(separate[0]).batch(100).concatenate(
        tf.data.Dataset.from_tensor_slices(separate[1]).batch(100))
    trainer = MDMTTrainer(model, arch_mode="authors", steps_per_epoch=3, heldout=stream,
                          weight_optimizer=keras.optimizers.SGD(0.0), arch_optimizer=keras.optimizers.SGD(1.0))
    trainer.compile()
    train_batches = list(batches(enc, "train", 100).take(3))
    held_f, held_l = separate[0]

    def grads(loss_fn):
        with tf.GradientTape() as tape:
            loss = loss_fn()
        return [g.numpy() for g in tape.gradient(loss, model.architecture_variables)]

    def plain_bce():
        probs = model(held_f, training=True)
        entries = tf.concat([bce(tf.reshape(held_l[t], (-1,)), tf.reshape(probs[t], (-1,))) for t in enc.schema.tasks],
                            axis=0)
        return tf.reduce_mean(entries)  # over the [batch, tasks] outputs

    g_plain, g_pair = grads(plain_bce), grads(lambda: trainer.loss_of(held_f, held_l)[0])
    assert any(not np.allclose(a, b, atol=1e-5) for a, b in zip(g_plain, g_pair))
    before = values(model.architecture_variables)
    for batch in train_batches[:2]:  # not yet the epoch's end
        trainer.train_step(batch)
        assert int(trainer.arch_steps.numpy()) == 0
        assert not any(_changed(before, values(model.architecture_variables)))
    trainer.train_step(train_batches[2])  # the epoch's last step: the architecture step follows it
    assert int(trainer.arch_steps.numpy()) == 1 and int(trainer.weight_steps.numpy()) == 3
    for b, a, g in zip(before, values(model.architecture_variables), g_plain):
        np.testing.assert_allclose(a - b, -g, rtol=1e-4, atol=1e-6)
    # it read the separate stream's first batch: the next one is the second
    next_features, _ = trainer._heldout.get_next()
    np.testing.assert_array_equal(next_features["user_id"].numpy(), separate[1][0]["user_id"].numpy())


@pytest.mark.parametrize("mode, moves", [("joint", True), ("fixed", False)])
def test_joint_and_fixed(mode, moves, enc):
    model = _m3oe(enc)
    trainer = MDMTTrainer(model, arch_mode=mode, arch_learning_rate=1.0)
    arch0 = values(model.architecture_variables)
    _fit(trainer, enc)
    assert all(_changed(arch0, values(model.architecture_variables))) is moves
    assert int(trainer.arch_steps.numpy()) == 0


@pytest.mark.parametrize("period", [1, 3])
def test_architecture_steps_consume_only_heldout_batches(period, enc):
    """The held-out stream is a fixed sequence of batches; after training, its next batch
    tells how many were consumed: exactly one per architecture step."""
    model = _m3oe(enc)
    heldout = batches(enc, "val", batch_size=100)  # unshuffled: batch i = rows [100 i, 100 i + 100)
    n_batches = int(np.ceil(enc.rows("val") / 100))
    trainer = MDMTTrainer(model, arch_mode="bilevel", arch_period=period, heldout=heldout)
    arch0 = values(model.architecture_variables)
    _fit(trainer, enc, epochs=1)
    weight_steps, arch_steps = int(trainer.weight_steps.numpy()), int(trainer.arch_steps.numpy())
    assert arch_steps == int(np.ceil(weight_steps / period))
    next_features, _ = trainer._heldout.get_next()
    expected_row = (arch_steps % n_batches) * 100
    np.testing.assert_array_equal(next_features["user_id"].numpy()[:5],
                                  enc.features["val"]["user_id"][expected_row:expected_row + 5])
    assert all(_changed(arch0, values(model.architecture_variables)))


def test_models_without_architecture_variables_and_errors(enc):
    keras.utils.set_random_seed(0)
    model = build_model("mmoe", enc.schema, {"expert_units": [16, 8], "tower_units": [8], "embedding_dim": 4})
    trainer = MDMTTrainer(model, arch_mode="bilevel")  # nothing to search: no held-out stream needed
    _fit(trainer, enc)
    assert int(trainer.arch_steps.numpy()) == 0
    with pytest.raises(ConfigError, match="stream of batches for the architecture steps"):
        MDMTTrainer(_m3oe(enc), arch_mode="bilevel")
    with pytest.raises(ConfigError, match="authors: a separate pass over the training data"):
        MDMTTrainer(_m3oe(enc), arch_mode="authors", steps_per_epoch=3)
    with pytest.raises(ConfigError, match="arch_mode must be one of"):
        MDMTTrainer(model, arch_mode="darts")
    with pytest.raises(ConfigError, match="unknown task"):
        MDMTTrainer(model, task_weights={"purchase": 2.0})


def test_loss_includes_embedding_regularisation(enc):
    keras.utils.set_random_seed(0)
    plain = build_model("shared_bottom", enc.schema, {"bottom_units": [8], "embedding_dim": 4})
    keras.utils.set_random_seed(0)
    reg = build_model("shared_bottom", enc.schema, {"bottom_units": [8], "embedding_dim": 4, "embedding_l2": 0.1})
    features, labels = next(iter(batches(enc, "train")))
    total_plain, loss_plain = MDMTTrainer(plain, arch_mode="fixed").loss_of(features, labels, training=False)
    total_reg, loss_reg = MDMTTrainer(reg, arch_mode="fixed").loss_of(features, labels, training=False)
    assert float(loss_plain) == pytest.approx(float(loss_reg), rel=1e-6)
    assert float(total_reg) > float(loss_reg) and float(total_plain) == pytest.approx(float(loss_plain))


def test_regularised_model_trains_under_mixed_bfloat16(enc):
    """The embedding L2 loss must add to the float32 task loss under mixed precision."""
    keras.utils.set_random_seed(0)
    model = build_model("shared_bottom", enc.schema, {"bottom_units": [8], "embedding_dim": 4, "embedding_l2": 1e-4},
                        dtype="mixed_bfloat16")
    trainer = MDMTTrainer(model, arch_mode="fixed")
    _fit(trainer, enc)
    total, loss = trainer.loss_of(*next(iter(batches(enc, "train"))), training=False)
    assert total.dtype == "float32" and float(total) > float(loss)


def test_architecture_step_follows_the_heldout_gradient_not_the_training_one(enc):
    """One train_step with SGD on the architecture: alpha / beta move by exactly
    -lr * (gradient on the held-out batch), taken before the weight step. The held-out
    labels are flipped so that its gradient differs from the training batch's."""
    import tensorflow as tf

    model = _m3oe(enc, arch_granularity="vector")
    held_f, held_l = next(iter(batches(enc, "val", batch_size=100)))
    held_l = {t: 1.0 - v for t, v in held_l.items()}
    heldout = tf.data.Dataset.from_tensors((held_f, held_l))
    trainer = MDMTTrainer(model, arch_mode="bilevel", heldout=heldout,
                          arch_optimizer=keras.optimizers.SGD(1.0), learning_rate=1e-3)
    train_f, train_l = next(iter(batches(enc, "train", batch_size=100)))

    def grads(features, labels):
        with tf.GradientTape() as tape:
            total, _ = trainer.loss_of(features, labels)
        return [g.numpy() for g in tape.gradient(total, model.architecture_variables)]

    g_held, g_train = grads(held_f, held_l), grads(train_f, train_l)
    assert any(not np.allclose(a, b, atol=1e-4) for a, b in zip(g_held, g_train))
    before = values(model.architecture_variables)
    trainer.compile()
    trainer.train_step((train_f, train_l))
    after = values(model.architecture_variables)
    for b, a, gh in zip(before, after, g_held):
        np.testing.assert_allclose(a - b, -gh, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, params, mode, held_out", [
    ("m3oe", SMALL, "bilevel", True),
    ("m3oe", SMALL, "joint", False),       # nothing searched on held-out data: every row trains
    ("m3oe", SMALL, "authors", False),     # a separate pass over every training row
    ("mmoe", {"expert_units": [8], "tower_units": [8], "embedding_dim": 4}, "bilevel", False),
])
def test_holdout_slice_leaves_the_weight_steps_only_when_searching(name, params, mode, held_out, enc, tmp_path):
    from mdmt_tf.models import ModelConfig
    from mdmt_tf.training.config import TrainConfig
    from mdmt_tf.training.fit import Run

    config = TrainConfig(batch_size=100, arch_mode=mode, arch_data="holdout:0.25")
    run = Run(ModelConfig(name, params), enc, config, tmp_path)
    trainer, train, _, _ = run._trainer(build_model(name, enc.schema, params), enc)
    n = enc.rows("train")
    train_rows = sum(int(next(iter(f.values())).shape[0]) for f, _ in train)
    if held_out:
        assert train_rows == n - round(0.25 * n)
        assert trainer._heldout is not None
    else:
        assert train_rows == n and (trainer._heldout is not None) == (mode == "authors")


def test_the_default_architecture_data_is_a_training_holdout_never_the_validation_split(enc, tmp_path):
    """By default bilevel's architecture batches are 10 % of the training rows: no validation
    row (the split that picks the best epoch and scores tuner trials) ever reaches them.
    (The default arch mode is joint, which searches nothing.)"""
    from mdmt_tf.models import ModelConfig
    from mdmt_tf.training.config import TrainConfig
    from mdmt_tf.training.fit import Run

    assert TrainConfig().arch_data == "holdout:0.1"
    assert TrainConfig().arch_mode == "joint"
    run = Run(ModelConfig("m3oe", SMALL), enc, TrainConfig(batch_size=10_000, arch_mode="bilevel"), tmp_path)
    trainer, train, _, _ = run._trainer(_m3oe(enc), enc)
    held_features, _ = trainer._heldout.get_next()
    train_features, _ = next(iter(train))

    def key(f):
        return set(zip(*(np.asarray(f[k]).tolist() for k in ("user_id", "item_id", "domain_id"))))

    held, trained = key(held_features), key(train_features)
    n = enc.rows("train")
    assert len(held_features["user_id"]) == round(0.1 * n) and len(train_features["user_id"]) == n - round(0.1 * n)
    all_train = key(enc.features["train"])
    assert held <= all_train and not held <= trained


def test_a_resumed_run_does_not_replay_the_first_epochs_order(enc, tmp_path):
    """tf.data's per-iteration reshuffle restarts with a new dataset; a run resuming after
    epoch 2 shuffles with a seed derived from (seed, 2), so its first epoch's batches are
    not epoch 1's again. The held-out slice itself stays the same."""
    import json

    from mdmt_tf.models import ModelConfig
    from mdmt_tf.training.config import TrainConfig
    from mdmt_tf.training.fit import Run

    params = {"expert_units": [8], "tower_units": [8], "embedding_dim": 4}
    run = Run(ModelConfig("mmoe", params), enc, TrainConfig(batch_size=100, seed=3), tmp_path)

    def first_batch_ids():
        _, train, _, _ = run._trainer(build_model("mmoe", enc.schema, params), enc)
        return next(iter(train))[0]["user_id"].numpy()

    fresh = first_batch_ids()
    np.testing.assert_array_equal(fresh, first_batch_ids())  # deterministic for a fresh run
    assert run._data_seed() == 3
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "state.json").write_text(json.dumps({"epoch": 2}))
    assert run._data_seed() != 3
    assert not np.array_equal(fresh, first_batch_ids())
