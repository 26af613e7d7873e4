"""SASS (mdmt_tf.models.sass): the scenario-adaptive gate units and the bias fusion written
out in NumPy, the NT-Xent loss by hand, the contrastive pre-training stage (only the
embeddings and ML-SAT move, the labels have no effect) and the switch to fine-tuning through
MDMTTrainer.fit."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.errors import ConfigError
from mdmt_tf.models import FeatureSchema
from mdmt_tf.models.sass import SASS, nt_xent
from mdmt_tf.training.losses import mdmt_loss
from mdmt_tf.training.trainer import MDMTTrainer
from tests.models.conftest import take

SMALL = {"embedding_dim": 4, "sat_units": 6, "num_sat_layers": 2, "tower_units": [4], "pretrain_epochs": 1}


def _model(schema, dtype="float32", **params):
    keras.utils.set_random_seed(0)
    return SASS(schema=schema, params={**SMALL, **params}, name="sass", dtype=dtype)


def _batch(encoded, rows=64, split="train"):
    features, labels = encoded[1][split]
    features, labels = take(features, labels, np.arange(rows))
    return {k: tf.constant(v) for k, v in features.items()}, {k: tf.constant(v) for k, v in labels.items()}


def _dataset(encoded, rows=256, batch_size=64):
    features, labels = encoded[1]["train"]
    features, labels = take(features, labels, np.arange(rows))
    return tf.data.Dataset.from_tensor_slices((features, labels)).batch(batch_size)


def _numpy(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def _none_same(a, b):
    return not any(np.array_equal(x, y) for x, y in zip(a, b))


def _slots(optimizer, variable):
    """Adam's momentum and velocity of `variable` (named after its path)."""
    key = variable.path.replace("/", "_")
    found = [v for v in optimizer.variables if v.name in (f"{key}_momentum", f"{key}_velocity")]
    assert len(found) == 2, (variable.path, [v.name for v in optimizer.variables][:8])
    return found


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_nt_xent(a, b, tau):
    """NT-Xent with loops: the mean over the 2N views i of -log(exp(sim(i, pair)/tau) /
    sum_{k != i} exp(sim(i, k)/tau)), sim the cosine similarity."""
    views = np.concatenate([a, b]).astype("float64")
    m, n = len(views), len(a)
    total = 0.0
    for i in range(m):
        sim = [views[i] @ views[k] / (np.linalg.norm(views[i]) * np.linalg.norm(views[k])) / tau for k in range(m)]
        pair = i + n if i < n else i - n
        total -= np.log(np.exp(sim[pair]) / sum(np.exp(sim[k]) for k in range(m) if k != i))
    return total / m


def _ml_sat_by_hand(model, features):
    """Every scenario's (e_s, alpha, r, z) of every sample from the weights, in NumPy:
    e [B, D, H], alpha [B, D, H], r and z [B, D, L, H]."""
    schema, sat = model.schema, model.sat
    table = model.embedding
    emb = table.embeddings.numpy()
    rows = np.stack([features[f].numpy() + table.offsets[f] for f in table.fields], axis=1)  # [B, F]
    dense = np.stack([features[n].numpy().astype("float32") for n in schema.dense], axis=1)
    x = np.concatenate([emb[rows].reshape(len(rows), -1), dense], axis=1)
    x_a = model.scenario_embedding.embeddings.numpy()  # [D, k]: the domain's own table
    w = {v.path.split("/")[-1]: v.numpy() for v in sat.weights}
    a = np.maximum(x_a @ w["scenario_kernel"] + w["scenario_bias"], 0)  # [D, H]
    out = []
    for d in range(schema.num_domains):
        g = x
        s = np.tanh(x @ w["initial_kernel"][d] + w["initial_bias"][d])
        rs, zs = [], []
        for i, layer in enumerate(sat.global_layers):
            g = np.maximum(g @ layer.kernel.numpy() + layer.bias.numpy(), 0)
            both = np.concatenate([g, s], axis=1)
            r = _sigmoid(both @ w[f"adaptive_kernel_{i}"][d] + a[d] @ w["adaptive_scenario_kernel"])
            h = np.tanh(np.concatenate([r * g, s], axis=1) @ w[f"candidate_kernel_{i}"][d])
            z = _sigmoid(both @ w[f"update_kernel_{i}"][d] + a[d] @ w["update_scenario_kernel"])
            s = (1 - z) * s + z * h
            rs.append(r)
            zs.append(z)
        ad = np.broadcast_to(a[d], s.shape)
        alpha = _sigmoid(np.concatenate([s, ad], axis=1) @ w["fusion_kernel"])
        out.append((alpha * s + (1 - alpha) * ad, alpha, np.stack(rs, 1), np.stack(zs, 1)))
    return tuple(np.stack([o[j] for o in out], axis=1) for j in range(4))


def test_gate_units_and_bias_fusion_by_hand(encoded):
    """r_l, h_l, z_l, s_l of each SAGU layer, alpha and e_s = alpha s_L + (1 - alpha) a under
    every scenario, and the task logits of the towers over the sample's own scenario's e_s."""
    schema, _ = encoded
    model = _model(schema)
    features, _ = _batch(encoded, rows=32)
    e, alpha, r, z = _ml_sat_by_hand(model, features)
    got = [t.numpy() for t in model.representations(features)]
    for want, have, name in zip((e, alpha, r, z), got, ("e_s", "alpha", "r", "z")):
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5, err_msg=name)
    assert not np.allclose(e[:, 0], e[:, 1], atol=1e-3)  # the scenarios' representations differ
    domain = features[schema.domain].numpy()
    own = e[np.arange(len(domain)), domain]
    towers = model.towers
    w0, b0, w1, b1 = (v.numpy() for v in (towers.kernels[0], towers.biases[0], towers.kernels[1], towers.biases[1]))
    _, details = model.forward(features)
    for t in range(schema.num_tasks):
        want = np.maximum(own @ w0[0, t] + b0[0, t], 0) @ w1[0, t, :, 0] + b1[0, t, 0]
        np.testing.assert_allclose(details.logits.numpy()[:, t], want, rtol=1e-4, atol=1e-5)
    rows = np.arange(len(domain))
    np.testing.assert_allclose(details.extra["fusion_alpha"].numpy(), alpha[rows, domain], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(details.extra["adaptive_gate"].numpy(), r[rows, domain].mean(-1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(details.extra["update_gate"].numpy(), z[rows, domain].mean(-1), rtol=1e-4, atol=1e-6)


def test_one_layer_sagu_written_out(encoded):
    """The single-layer case spelled out from the gate equations (no loop), on one sample."""
    schema, _ = encoded
    model = _model(schema, num_sat_layers=1)
    features, _ = _batch(encoded, rows=4)
    sat, i = model.sat, 0
    d = int(features[schema.domain].numpy()[i])
    x = model.flat_inputs(model.embedding(features), features).numpy()[i]
    x_a = model.scenario_embedding.embeddings.numpy()[d]
    a = np.maximum(x_a @ sat.scenario_kernel.numpy() + sat.scenario_bias.numpy(), 0)
    g1 = np.maximum(x @ sat.global_layers[0].kernel.numpy() + sat.global_layers[0].bias.numpy(), 0)
    s0 = np.tanh(x @ sat.initial_kernel.numpy()[d] + sat.initial_bias.numpy()[d])
    r1 = _sigmoid(np.concatenate([g1, s0]) @ sat.adaptive_kernels[0].numpy()[d]
                  + a @ sat.adaptive_scenario_kernel.numpy())
    h1 = np.tanh(np.concatenate([r1 * g1, s0]) @ sat.candidate_kernels[0].numpy()[d])
    z1 = _sigmoid(np.concatenate([g1, s0]) @ sat.update_kernels[0].numpy()[d] + a @ sat.update_scenario_kernel.numpy())
    s1 = (1 - z1) * s0 + z1 * h1
    fusion = _sigmoid(np.concatenate([s1, a]) @ sat.fusion_kernel.numpy())
    e = fusion * s1 + (1 - fusion) * a
    every, alpha, r, z = (t.numpy() for t in model.representations(features))
    np.testing.assert_allclose(r[i, d, 0], r1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(z[i, d, 0], z1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(alpha[i, d], fusion, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(every[i, d], e, rtol=1e-4, atol=1e-6)


def test_nt_xent_by_hand_on_three_samples():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4)).astype("float32"), rng.normal(size=(3, 4)).astype("float32")
    for tau in (0.1, 0.5):
        assert float(nt_xent(a, b, tau)) == pytest.approx(_np_nt_xent(a, b, tau), rel=1e-5)
    # the loss favours aligned pairs: views equal to their pair's score lower than shuffled ones
    assert float(nt_xent(a, a * 2.0, 0.1)) < float(nt_xent(a, a[[1, 2, 0]], 0.1))
    assert float(nt_xent(a[:1], b[:1], 0.1)) == pytest.approx(0.0, abs=1e-6)  # the pair is the only other view
    assert float(nt_xent(a[:0], b[:0], 0.1)) == 0.0


def test_a_training_pass_adds_the_contrastive_loss_of_the_two_scenario_views(encoded):
    """Pre-training: the NT-Xent of e_s under the own scenario d and under (d + 1) mod D; none
    in evaluation; none in fine-tuning by default, finetune_contrastive_weight times it if set."""
    schema, _ = encoded
    d = schema.num_domains
    features, _ = _batch(encoded, rows=48)
    domain = features[schema.domain].numpy()
    rows = np.arange(len(domain))
    for weight in (0.0, 0.5):
        model = _model(schema, pair_scenario="next", temperature=0.2, finetune_contrastive_weight=weight)
        every = model.representations(features)[0].numpy()
        want = _np_nt_xent(every[rows, domain], every[rows, (domain + 1) % d], 0.2)
        model(features, training=True)
        assert len(model.losses) == 1 and float(model.losses[0]) == pytest.approx(want, rel=1e-4)
        model(features, training=False)
        assert not model.losses
        model.set_stage(1)
        model(features, training=True)
        if weight:
            assert len(model.losses) == 1 and float(model.losses[0]) == pytest.approx(weight * want, rel=1e-4)
        else:
            assert not model.losses  # the second view is not even computed


def test_random_pairs_are_always_another_scenario(encoded):
    schema, _ = encoded
    d = schema.num_domains
    assert d >= 3
    model = _model(schema)
    domain = tf.constant(np.arange(600) % d, dtype="int32")
    first, second = model.other_scenario(domain).numpy(), model.other_scenario(domain).numpy()
    assert (first != domain.numpy()).all() and (first >= 0).all() and (first < d).all()
    for s in range(d):  # every other scenario is drawn
        assert set(first[domain.numpy() == s]) == set(range(d)) - {s}
    assert not np.array_equal(first, second)  # drawn anew at every pass


def test_stages(encoded):
    schema, _ = encoded
    model = _model(schema, pretrain_epochs=2)
    assert model.stages == ("pretrain", "finetune")
    assert [model.stage_of_epoch(e) for e in range(4)] == [0, 0, 1, 1]
    assert [_model(schema, pretrain_epochs=0).stage_of_epoch(e) for e in range(2)] == [1, 1]
    assert not model.supervised_in_stage(0) and model.supervised_in_stage(1)
    towers = {id(v) for v in model.towers.trainable_variables}
    rest = {id(v) for v in model.embedding_tables + model.sat.trainable_variables}
    assert len(model.embedding_tables) == 2  # the fields' and the scenarios'
    assert {id(v) for v in model.trainable_in_stage(0)} == rest
    assert {id(v) for v in model.trainable_in_stage(1)} == rest | towers


def test_a_pretraining_step_ignores_the_labels_and_leaves_the_towers(encoded):
    """In the pre-training stage the step optimises the contrastive loss only: flipping every
    label gives bit-identical updated weights; the towers and their Adam slots do not move;
    the embeddings and ML-SAT do. The reported loss is the supervised one."""
    schema, _ = encoded
    features, labels = _batch(encoded, rows=64)
    flipped = {t: 1.0 - v for t, v in labels.items()}
    results = []
    for batch_labels in (labels, flipped):
        model = _model(schema, pair_scenario="next")
        trainer = MDMTTrainer(model, learning_rate=0.01)
        assert trainer.stage == 0
        towers, rest = model.towers.trainable_variables, model.embedding_tables + model.sat.trainable_variables
        towers_before, rest_before = _numpy(towers), _numpy(rest)
        total, loss = trainer.loss_of(features, batch_labels)
        assert float(total) == pytest.approx(float(model.losses[0]))  # the optimised total: no supervised part
        probs = model(features)
        want = mdmt_loss(batch_labels, probs, features[schema.domain], schema.num_domains, schema.tasks)
        assert float(loss) == pytest.approx(float(want), rel=1e-5)  # reported: the supervised loss
        trainer._weight_step(features, batch_labels)
        results.append(_numpy(model.trainable_variables))
        assert _same(towers_before, _numpy(towers))
        assert all(not s.numpy().any() for v in towers for s in _slots(trainer.weight_optimizer, v))
        assert _none_same(rest_before, _numpy(rest))
    assert _same(results[0], results[1])


def test_a_finetuning_step_trains_everything_on_the_labels(encoded):
    schema, _ = encoded
    model = _model(schema)
    trainer = MDMTTrainer(model, learning_rate=0.01)
    trainer.enter_epoch(1)  # pretrain_epochs=1: epoch 1 fine-tunes
    assert trainer.stage == 1 and model.stage == 1
    features, labels = _batch(encoded, rows=256)
    towers, tables = _numpy(model.towers.trainable_variables), _numpy(model.embedding_tables)
    before = float(trainer.loss_of(features, labels, training=False)[1])
    for _ in range(5):
        trainer._weight_step(features, labels)
    assert float(trainer.loss_of(features, labels, training=False)[1]) < before
    assert _none_same(towers, _numpy(model.towers.trainable_variables))
    assert _none_same(tables, _numpy(model.embedding_tables))


def test_the_supervised_loss_is_optimised_by_every_one_stage_model(encoded):
    """The hook's default: a model with one stage optimises loss + regularisation as before."""
    from mdmt_tf.models import build_model

    schema, _ = encoded
    model = build_model("mmoe", schema, {"embedding_dim": 4, "expert_units": [8], "tower_units": [4],
                                         "embedding_l2": 0.01})
    assert model.supervised_in_stage(0)
    features, labels = _batch(encoded, rows=32)
    total, loss = MDMTTrainer(model).loss_of(features, labels)
    assert len(model.losses) == 1
    assert float(total) == pytest.approx(float(loss) + float(model.losses[0]), rel=1e-6)


class _Watch(keras.callbacks.Callback):
    """Each epoch's stage and the variables (and Adam slots) at epoch ends."""

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
        groups = {"tables": net.embedding_tables, "sat": net.sat.trainable_variables,
                  "towers": net.towers.trainable_variables}
        out = {name: _numpy(vs) for name, vs in groups.items()}
        out.update({f"{name}_slots": _numpy([s for v in vs for s in _slots(opt, v)]) for name, vs in groups.items()})
        return out


@pytest.mark.parametrize("jit", [False, True])
def test_fit_pretrains_then_finetunes(encoded, jit):
    """A 2-epoch MDMTTrainer.fit with pretrain_epochs=1: epoch 1 moves the embeddings and
    ML-SAT, never the towers (their Adam slots stay zero); epoch 2 moves everything."""
    schema, _ = encoded
    model = _model(schema)
    trainer = MDMTTrainer(model, learning_rate=0.01, jit_compile=jit)
    trainer.compile()
    watch = _Watch()
    history = trainer.fit(_dataset(encoded), epochs=2, verbose=0, shuffle=False, callbacks=[watch])
    assert watch.stages == [0, 1] and model.stage == 1 and trainer.stage == 1
    assert np.isfinite(history.history["loss"]).all()
    start, first, second = watch.start, watch.ends[0], watch.ends[1]
    assert _none_same(start["tables"], first["tables"]) and _none_same(start["sat"], first["sat"])
    assert _same(start["towers"], first["towers"]) and all(not s.any() for s in first["towers_slots"])
    for group in ("tables", "sat", "towers"):
        assert _none_same(first[group], second[group]), group


def test_save_reload_keeps_the_stage_and_the_predictions(encoded, tmp_path):
    schema, _ = encoded
    model = _model(schema)
    rng = np.random.default_rng(0)
    for v in model.towers.trainable_variables:  # off their initial values
        v.assign(v.numpy() + rng.normal(0, 0.3, v.shape).astype("float32"))
    model.set_stage(1)
    features, _ = _batch(encoded)
    want = model(features)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, SASS) and loaded.stage == 1 and loaded.params == model.params
    got = loaded(features)
    for task in schema.tasks:
        np.testing.assert_array_equal(want[task].numpy(), got[task].numpy())
    assert model.copy_under("float32").stage == 1
    model.set_stage(0)
    model.save(tmp_path / "s0.keras")
    assert keras.saving.load_model(tmp_path / "s0.keras").stage == 0


def test_get_config_round_trip(encoded):
    schema, _ = encoded
    model = _model(schema, pair_scenario="next", temperature=0.3, finetune_contrastive_weight=0.1, tower_units=[])
    config = model.get_config()
    again = SASS.from_config(json.loads(json.dumps(config)))
    assert again.params == model.params and again.get_config() == config
    again.set_weights(model.get_weights())
    features, _ = _batch(encoded)
    for task in schema.tasks:
        np.testing.assert_array_equal(model(features)[task].numpy(), again(features)[task].numpy())


def test_an_empty_scenario_gives_finite_outputs_and_gradients(encoded):
    schema, _ = encoded
    model = _model(schema)
    features, _ = _batch(encoded, rows=128)
    keep = features[schema.domain].numpy() != 0
    batch = {k: tf.boolean_mask(v, keep) for k, v in features.items()}
    with tf.GradientTape() as tape:
        out = model(batch, training=True)
        loss = model.losses[0]
    assert np.isfinite(float(loss))
    for g in tape.gradient(loss, model.trainable_variables):
        if g is not None:
            assert np.isfinite(tf.convert_to_tensor(g).numpy()).all()
    assert all(np.isfinite(out[t].numpy()).all() for t in schema.tasks)
    empty = {k: v[:0] for k, v in features.items()}
    model(empty, training=True)
    assert float(model.losses[0]) == 0.0


def test_mixed_bfloat16_trains_through_both_stages(encoded):
    schema, _ = encoded
    model = _model(schema, dtype="mixed_bfloat16")
    trainer = MDMTTrainer(model)
    trainer.compile()
    history = trainer.fit(_dataset(encoded, rows=64, batch_size=32), epochs=2, steps_per_epoch=1, verbose=0,
                          shuffle=False)
    assert model.stage == 1 and np.isfinite(history.history["loss"]).all()
    assert model.embedding_tables[0].dtype == "float32" and model.sat.initial_kernel.dtype == "float32"
    features, _ = _batch(encoded, rows=16)
    model.set_stage(0)
    model(features, training=True)
    assert np.isfinite(float(model.losses[0])) and model.losses[0].dtype == "float32"


def test_bad_params_are_config_errors(encoded):
    schema, _ = encoded
    for params, match in (({"temperature": 0.0}, "temperature"), ({"pretrain_epochs": -1}, "pretrain_epochs"),
                          ({"finetune_contrastive_weight": -0.1}, "finetune_contrastive_weight"),
                          ({"pair_scenario": "any"}, "pair_scenario"), ({"sat_units": 0}, "sat_units"),
                          ({"num_sat_layers": 0}, "num_sat_layers"), ({"tower_units": [0]}, "tower_units")):
        with pytest.raises(ConfigError, match=match):
            SASS(schema=schema, params={**SMALL, **params}, name="sass")


def test_a_single_scenario_cannot_form_contrastive_pairs():
    one = FeatureSchema(domain="d", domains=("a",), tasks=("y",), sparse=(("u", 3),))
    with pytest.raises(ConfigError, match="1 domain.*pretrain_epochs 0"):
        SASS(schema=one, params=SMALL, name="sass")
    with pytest.raises(ConfigError, match="1 domain"):
        SASS(schema=one, params={**SMALL, "pretrain_epochs": 0, "finetune_contrastive_weight": 0.5}, name="sass")
    model = SASS(schema=one, params={**SMALL, "pretrain_epochs": 0}, name="sass")  # no contrastive loss: SASS-Base
    features = {"d": np.zeros(4, "int32"), "u": np.array([0, 1, 2, 1], "int32")}
    model(features, training=True)
    assert not model.losses
