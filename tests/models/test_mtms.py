"""MTMS (mdmt_tf.models.mtms): per-(task, scenario) tables, stage 1's logits from the own
pair's table only, stage 2's DNN over more tables with the tables frozen, and the two-stage
schedule through the real training path (MDMTTrainer.fit, a resumed Run)."""
import json
from types import MappingProxyType

import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.errors import ConfigError
from mdmt_tf.models import ModelConfig
from mdmt_tf.models.mtms import MTMS
from mdmt_tf.training.config import TrainConfig
from mdmt_tf.training.trainer import MDMTTrainer
from tests.models.conftest import take

SMALL = {"embedding_dim": 4, "pair_units": [8], "network_units": [8], "stage_epochs": 1}


def _model(schema, dtype="float32", **params):
    keras.utils.set_random_seed(0)
    return MTMS(schema=schema, params={**SMALL, **params}, name="mtms", dtype=dtype)


def _batch(encoded, rows=64, split="train"):
    features, labels = take(*encoded[1][split], np.arange(rows))
    return {k: tf.constant(v) for k, v in features.items()}, {k: tf.constant(v) for k, v in labels.items()}


def _dataset(encoded, rows=256, batch_size=64):
    features, labels = take(*encoded[1]["train"], np.arange(rows))
    return tf.data.Dataset.from_tensor_slices((features, labels)).batch(batch_size)


def _table(model, task, scenario):
    return model.pair_tables[scenario * model.schema.num_tasks + task]


def _randomise_head(model, seed=1):
    """The stage-2 head starts at zero; random values make what it reads visible."""
    rng = np.random.default_rng(seed)
    for v in model.network_head.trainable_variables:
        v.assign(rng.normal(size=v.shape).astype("float32"))


def _numpy(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def _rows(model, features):
    """[B, F]: each sample's row of every field in a (concatenated) pair table."""
    table = model.pair_tables[0]
    return np.stack([features[f].numpy() + table.offsets[f] for f in table.fields], axis=1)


def _slots(optimizer, variable):
    """Adam's momentum and velocity of `variable` (named after its path)."""
    key = variable.path.replace("/", "_")
    found = [v for v in optimizer.variables if v.name in (f"{key}_momentum", f"{key}_velocity")]
    assert len(found) == 2, (variable.path, [v.name for v in optimizer.variables][:8])
    return found


def test_stage1_logit_is_its_own_pair_table_through_its_pair_network(encoded):
    """Written out in NumPy for every sample: pair_t(x) = f_{t,s}([e_{t,s}(x), dense]) with
    f_{t,s} = relu(x W0 + b0) W1 + b1 of tower (s, t); the stage-2 DNN is not applied."""
    schema, _ = encoded
    model = _model(schema)
    _randomise_head(model)
    features, _ = _batch(encoded)
    _, details = model.forward(features)
    domain = features[schema.domain].numpy()
    assert len(set(domain)) == schema.num_domains
    dense = np.stack([features[n].numpy().astype("float32") for n in schema.dense], axis=1)
    towers = model.pair_towers
    w0, b0, w1, b1 = (v.numpy() for v in (towers.kernels[0], towers.biases[0], towers.kernels[1], towers.biases[1]))
    ids = _rows(model, features)
    for t in range(schema.num_tasks):
        want = np.empty(len(domain), "float32")
        for i, s in enumerate(domain):
            rows = _table(model, t, s).embeddings.numpy()[ids[i]]
            x = np.concatenate([rows.ravel(), dense[i]])
            want[i] = np.maximum(x @ w0[s, t] + b0[s, t], 0) @ w1[s, t, :, 0] + b1[s, t, 0]
        np.testing.assert_allclose(details.logits.numpy()[:, t], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(details.extra["network_logits"].numpy(), 0.0)  # stage 1: not applied


def test_stage1_output_ignores_every_other_table(encoded):
    """Replacing table (t', s') changes task t's output for scenario-s samples only when
    (t', s') == (t, s): no shared modeling in stage 1."""
    schema, _ = encoded
    model = _model(schema)
    _randomise_head(model)
    features, _ = _batch(encoded)
    domain = features[schema.domain].numpy()
    before = model(features)
    for t2 in range(schema.num_tasks):
        for s2 in range(schema.num_domains):
            table = _table(model, t2, s2).embeddings
            saved = table.numpy()
            table.assign(saved + 1.0)
            after = model(features)
            table.assign(saved)
            for t, task in enumerate(schema.tasks):
                for s in range(schema.num_domains):
                    rows = domain == s
                    changed = not np.array_equal(before[task].numpy()[rows], after[task].numpy()[rows])
                    assert changed == ((t, s) == (t2, s2)), (task, s, t2, s2)


def _reached_tables(model, features, task):
    """{(t', s')} whose table gets a non-zero gradient from task's stage-2 network logits."""
    tables = [v.value for v in model.embedding_tables]
    with tf.GradientTape() as tape:
        _, details = model.forward(features)
        total = tf.reduce_sum(details.extra["network_logits"][:, task])
    grads = tape.gradient(total, tables)
    t = model.schema.num_tasks
    return {(i % t, i // t) for i, g in enumerate(grads)
            if g is not None and float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(g)))) > 0}


@pytest.mark.parametrize("inputs", ["scenario", "task", "all"])
def test_stage2_network_reads_more_tables(encoded, inputs):
    """In stage 2, logit = pair + network; task t's DNN reads, for a scenario-s sample, the
    tables of scenario s ("scenario"), of task t ("task") or all of them ("all")."""
    schema, _ = encoded
    d, t = schema.num_domains, schema.num_tasks
    model = _model(schema, network_inputs=inputs)
    _randomise_head(model)
    model.set_stage(1)
    features, _ = _batch(encoded)
    _, details = model.forward(features)
    np.testing.assert_allclose(details.logits.numpy(), details.extra["pair_logits"].numpy()
                               + details.extra["network_logits"].numpy(), rtol=1e-6, atol=1e-6)
    assert np.abs(details.extra["network_logits"].numpy()).min() > 0
    domain = features[schema.domain].numpy()
    s = int(domain[0])
    one = {k: tf.boolean_mask(v, domain == s) for k, v in features.items()}
    for task in range(t):
        want = {"scenario": {(t2, s) for t2 in range(t)}, "task": {(task, s2) for s2 in range(d)},
                "all": {(t2, s2) for t2 in range(t) for s2 in range(d)}}[inputs]
        assert _reached_tables(model, one, task) == want, (inputs, task)


def test_stage2_starts_from_stage1_predictions(encoded):
    """The DNN's logit layer starts at zero: entering stage 2 does not change a prediction."""
    schema, _ = encoded
    model = _model(schema)
    features, _ = _batch(encoded)
    before = model(features)
    model.set_stage(1)
    after = model(features)
    for task in schema.tasks:
        np.testing.assert_array_equal(before[task].numpy(), after[task].numpy())


def test_trainable_in_stage(encoded):
    schema, _ = encoded
    model = _model(schema)
    tables = {id(v) for v in model.embedding_tables}
    network = {id(v) for v in model.network.trainable_variables + model.network_head.trainable_variables}
    pair = {id(v) for v in model.pair_towers.trainable_variables}
    assert len(tables) == schema.num_domains * schema.num_tasks
    assert {id(v) for v in model.trainable_in_stage(0)} == tables | pair
    assert {id(v) for v in model.trainable_in_stage(1)} == pair | network
    assert model.stages == ("embedding", "network")
    assert [model.stage_of_epoch(e) for e in range(4)] == [0, 1, 1, 1]
    assert [_model(schema, stage_epochs=3).stage_of_epoch(e) for e in range(4)] == [0, 0, 0, 1]


class _Watch(keras.callbacks.Callback):
    """Each epoch's stage (as the other callbacks see it) and the variables at epoch ends."""

    def __init__(self):
        super().__init__()
        self.stages, self.ends = [], []

    def on_train_begin(self, logs=None):
        self.start = self._snapshot()

    def on_epoch_begin(self, epoch, logs=None):
        self.stages.append(self.model.net.stage)

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(self._snapshot())

    def _snapshot(self):
        net, opt = self.model.net, self.model.weight_optimizer
        groups = {"tables": net.embedding_tables, "pair": net.pair_towers.trainable_variables,
                  "network": net.network.trainable_variables + net.network_head.trainable_variables}
        out = {name: _numpy(vs) for name, vs in groups.items()}
        out.update({f"{name}_slots": _numpy([s for v in vs for s in _slots(opt, v)]) for name, vs in groups.items()})
        return out


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def _none_same(a, b):
    return not any(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("jit", [False, True])
def test_fit_switches_stage_at_the_configured_epoch_and_freezes_what_it_must(encoded, jit):
    """A 2-epoch MDMTTrainer.fit with stage_epochs=1: epoch 1 trains the tables and the pair
    networks (the stage-2 DNN, and its Adam slots, do not move); epoch 2 trains the pair
    networks and the DNN while every table and its Adam slots stay bit-identical."""
    schema, _ = encoded
    model = _model(schema)
    trainer = MDMTTrainer(model, learning_rate=0.01, jit_compile=jit)
    trainer.compile()
    watch = _Watch()
    trainer.fit(_dataset(encoded), epochs=2, verbose=0, shuffle=False, callbacks=[watch])
    assert watch.stages == [0, 1] and model.stage == 1 and trainer.stage == 1
    start, first, second = watch.start, watch.ends[0], watch.ends[1]
    # stage 1
    assert _none_same(start["tables"], first["tables"]) and _none_same(start["pair"], first["pair"])
    assert _same(start["network"], first["network"])
    assert all(not s.any() for s in first["network_slots"])  # never stepped: Adam's slots still zero
    # stage 2
    assert _same(first["tables"], second["tables"]) and _same(first["tables_slots"], second["tables_slots"])
    assert any(s.any() for s in first["tables_slots"])  # the slots that stay are stage 1's, not zeros
    assert _none_same(first["pair"], second["pair"]) and _none_same(first["network"], second["network"])


def test_training_lowers_the_loss_in_each_stage(encoded):
    schema, _ = encoded
    model = _model(schema)
    trainer = MDMTTrainer(model, learning_rate=0.01)
    features, labels = _batch(encoded, rows=256)
    for stage in (0, 1):
        trainer.enter_epoch(stage)  # stage_epochs=1: epoch 1 enters "network"
        assert trainer.stage == stage
        before = float(trainer.loss_of(features, labels, training=False)[1])
        for _ in range(5):
            trainer._weight_step(features, labels)
        assert float(trainer.loss_of(features, labels, training=False)[1]) < before, stage


def test_a_model_in_stage_2_never_goes_back(encoded):
    """A model restored or reloaded in stage 2 and fitted from epoch 0 stays in stage 2."""
    schema, _ = encoded
    model = _model(schema, stage_epochs=5)
    model.set_stage(1)
    trainer = MDMTTrainer(model)
    trainer.compile()
    tables = _numpy(model.embedding_tables)
    trainer.fit(_dataset(encoded, rows=128), epochs=1, verbose=0, shuffle=False)
    assert model.stage == 1 and _same(tables, _numpy(model.embedding_tables))


def test_save_reload_keeps_the_stage_and_the_predictions(encoded, tmp_path):
    schema, _ = encoded
    model = _model(schema)
    _randomise_head(model)
    model.set_stage(1)
    features, _ = _batch(encoded)
    want = model(features)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, MTMS) and loaded.stage == 1
    got = loaded(features)
    for task in schema.tasks:
        np.testing.assert_array_equal(want[task].numpy(), got[task].numpy())
    copy = model.copy_under("float32")
    assert copy.stage == 1
    model.set_stage(0)
    model.save(tmp_path / "s0.keras")
    assert keras.saving.load_model(tmp_path / "s0.keras").stage == 0


def test_checkpoint_restores_the_stage(encoded, tmp_path):
    schema, _ = encoded
    model = _model(schema)
    model.set_stage(1)
    path = tf.train.Checkpoint(trainer=MDMTTrainer(model)).save(str(tmp_path / "ckpt"))
    fresh = _model(schema)
    trainer = MDMTTrainer(fresh)
    assert fresh.stage == 0
    tf.train.Checkpoint(trainer=trainer).restore(path).assert_existing_objects_matched()
    assert fresh.stage == 1


def test_get_config_round_trip(encoded):
    schema, _ = encoded
    model = _model(schema, network_inputs="task", stage_epochs=2)
    config = model.get_config()
    again = MTMS.from_config(json.loads(json.dumps(config)))
    assert again.params == model.params and again.get_config() == config
    again.set_weights(model.get_weights())
    features, _ = _batch(encoded)
    for task in schema.tasks:
        np.testing.assert_array_equal(model(features)[task].numpy(), again(features)[task].numpy())


def test_an_empty_scenario_gives_finite_outputs(encoded):
    schema, _ = encoded
    model = _model(schema)
    model.set_stage(1)
    features, _ = _batch(encoded, rows=128)
    keep = features[schema.domain].numpy() != 0
    out = model({k: tf.boolean_mask(v, keep) for k, v in features.items()})
    assert all(np.isfinite(out[t].numpy()).all() for t in schema.tasks)


def test_mixed_bfloat16_trains_a_step_in_each_stage(encoded):
    schema, _ = encoded
    model = _model(schema, dtype="mixed_bfloat16")
    trainer = MDMTTrainer(model)
    trainer.compile()
    history = trainer.fit(_dataset(encoded, rows=64, batch_size=32), epochs=2, steps_per_epoch=1, verbose=0,
                          shuffle=False)
    assert model.stage == 1 and all(np.isfinite(history.history["loss"]))
    assert model.embedding_tables[0].dtype == "float32" and model.stage_variable.dtype == "int32"


def test_embedding_l2_on_the_rows_each_sample_uses(encoded):
    """l2 * sum over the sample's scenario's T tables of its rows squared, / batch."""
    schema, _ = encoded
    model = _model(schema, embedding_l2=0.01)
    features, _ = _batch(encoded)
    model(features, training=True)
    assert len(model.losses) == 1
    domain = features[schema.domain].numpy()
    ids = _rows(model, features)
    total = sum(np.square(_table(model, t, s).embeddings.numpy()[ids[i]]).sum()
                for i, s in enumerate(domain) for t in range(schema.num_tasks))
    assert float(model.losses[0]) == pytest.approx(0.01 * total / len(domain), rel=1e-5)


def test_bad_params_and_unsupported_training_are_config_errors(encoded):
    schema, _ = encoded
    for params, match in (({"stage_epochs": 0}, "stage_epochs"), ({"network_inputs": "both"}, "network_inputs"),
                          ({"pair_units": []}, "pair_units"), ({"network_units": [0]}, "network_units")):
        with pytest.raises(ConfigError, match=match):
            MTMS(schema=schema, params={**SMALL, **params}, name="mtms")
    model = _model(schema)
    with pytest.raises(ConfigError, match="trains in stages.*arch_mode 'bilevel'"):
        MDMTTrainer(model, arch_mode="bilevel", heldout=_dataset(encoded))
    from mdmt_tf.training.balance import make_balance

    balance = make_balance("uwl", schema.domains, schema.tasks)
    with pytest.raises(ConfigError, match="trains in stages.*UncertaintyWeighting"):
        MDMTTrainer(model, balance=balance)


def test_a_one_stage_model_has_no_stage_variable(encoded):
    from mdmt_tf.models import build_model

    schema, _ = encoded
    model = build_model("mmoe", schema, {"embedding_dim": 4, "expert_units": [8], "tower_units": [4]})
    assert model.stages == ("train",) and model.stage == 0 and not hasattr(model, "stage_variable")
    trainer = MDMTTrainer(model)
    assert not trainer.staged and [id(v) for v in trainer.weight_vars] == [id(v) for v in model.trainable_variables]


# ------------------------------------------------------------------ runs (mdmt train)
@pytest.fixture()
def registered(monkeypatch):
    """`mtms` in the registry for Run (the lead registers it in mdmt_tf/models/registry.py)."""
    from mdmt_tf.models import registry

    if "mtms" not in registry.MODELS:
        monkeypatch.setattr(registry, "MODELS", MappingProxyType({**registry.MODELS, "mtms": (MTMS, {})}))


def test_run_refuses_what_a_staged_model_cannot_train_with(registered, small_data, tmp_path):
    from mdmt_tf.training.fit import train

    model = ModelConfig("mtms", SMALL)
    for config, match in ((TrainConfig.from_dict({"epochs": 2, "strategy": "mamdr"}), "--strategy plain"),
                          (TrainConfig(epochs=2, arch_mode="bilevel"), "--arch-mode joint"),
                          (TrainConfig.from_dict({"epochs": 2, "balance": {"method": "uwl"}}), "--loss-balance")):
        with pytest.raises(ConfigError, match=match):
            train(model, small_data, config, tmp_path / "a", verbose=0)
        assert not (tmp_path / "a" / "run_config.json").exists()  # refused before the run directory
    with pytest.raises(ConfigError, match="never reach its last stage 'network'"):
        train(ModelConfig("mtms", {**SMALL, "stage_epochs": 2}), small_data, TrainConfig(epochs=2), tmp_path / "b",
              verbose=0)


def test_staged_early_stopping_waits_for_the_last_stage(tmp_path):
    """patience 2, last stage from epoch index 3: the first stage never stops the run (however
    bad) and is never the best (SASS's pre-training leaves its towers untrained, however good its
    AUC looks); the last stage's epochs are monitored, the wait counting from its start."""
    from mdmt_tf.training.fit import _StagedEarlyStopping

    class _Trainer:
        stop_training = False

    stopper = _StagedEarlyStopping(tmp_path, tf.train.Checkpoint(v=tf.Variable(1.0)), patience=2, last_stage=3)
    stopper.set_model(_Trainer())
    for epoch, auc in enumerate([0.7, 0.6, 0.5, 0.6, 0.6]):
        stopper.on_epoch_end(epoch, {"val_mean_auc": auc})
        assert not stopper.model.stop_training, epoch  # plain early stopping would stop after index 2
        assert stopper.state["best_epoch"] == (None if epoch < 3 else 4) and stopper.patience == 2
        assert stopper.state["wait"] == [1, 2, 3, 0, 1][epoch], epoch
    assert [h["val_mean_auc"] for h in stopper.state["history"]] == [0.7, 0.6, 0.5, 0.6, 0.6]  # all logged
    stopper.on_epoch_end(5, {"val_mean_auc": 0.5})
    assert stopper.model.stop_training and stopper.state["stopped_early"] and stopper.state["best"] == 0.6


class _Crash(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt("simulated interruption after epoch 2")


class _Probe(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.stage_at_begin = self.model.net.stage
        self.tables = _numpy(self.model.net.embedding_tables)
        self.stages = []

    def on_epoch_begin(self, epoch, logs=None):
        self.stages.append((epoch, self.model.net.stage, self.model.stage))

    def on_epoch_end(self, epoch, logs=None):
        self.tables_after = _numpy(self.model.net.embedding_tables)


@pytest.mark.slow
def test_a_resumed_run_continues_in_stage_2(registered, small_data, tmp_path):
    from mdmt_tf.training.fit import train

    model = ModelConfig("mtms", SMALL)
    config = TrainConfig(epochs=3, batch_size=256, patience=5)
    with pytest.raises(KeyboardInterrupt):
        train(model, small_data, config, tmp_path, verbose=0, plots=False, callbacks=[_Crash()])
    assert json.loads((tmp_path / "checkpoints" / "state.json").read_text())["epoch"] == 2
    probe = _Probe()
    payload = train(model, small_data, config, tmp_path, verbose=0, plots=False, callbacks=[probe])
    assert probe.stage_at_begin == 1  # restored from the checkpoint of epoch 2
    assert probe.stages == [(2, 1, 1)]  # epoch 3 trains the network, the trainer's step too
    assert _same(probe.tables, probe.tables_after)  # the tables stay frozen
    assert payload["epochs_trained"] == 3 and np.isfinite(payload["test"]["mean_auc"])
