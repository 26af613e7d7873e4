"""M2M (mdmt_tf.models.m2m): the meta unit's scenario-generated weights, the meta attention
and the residual meta tower recomputed in NumPy from the layers' variables; the scenario
representation trained only through the generated weights; save/reload, configs, training,
an empty-domain batch, mixed_bfloat16 and invalid hyper-parameters."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.errors import ConfigError
from mdmt_tf.models.m2m import M2M, MetaAttention, MetaDense, MetaTower
from tests.models.conftest import take

SMALL = {"embedding_dim": 4, "num_experts": 3, "expert_units": [8, 6], "scenario_units": [5],
         "num_meta_unit_layers": 2, "num_tower_layers": 2}


def _model(schema, dtype="float32", **params):
    keras.utils.set_random_seed(0)
    return M2M(schema=schema, params={**SMALL, **params}, name="m2m", dtype=dtype)


def _rows(encoded, rows, split="train"):
    features, labels = encoded[1][split]
    features, labels = take(features, labels, rows)
    return {k: tf.constant(v) for k, v in features.items()}, {k: tf.constant(v) for k, v in labels.items()}


def _mixed_rows(encoded, per_domain=4):
    """Rows of every domain, interleaved (domain 0, 1, 2, 0, 1, 2...)."""
    schema, splits = encoded
    domain = splits["train"][0][schema.domain]
    picks = [np.flatnonzero(domain == d)[:per_domain] for d in range(schema.num_domains)]
    return np.stack(picks, axis=1).ravel()


def _perturb(model, scale=0.3):
    """Move every variable off its initial value (the generators start small)."""
    rng = np.random.default_rng(0)
    for variable in model.variables:
        variable.assign(np.asarray(variable) + rng.normal(0, scale, variable.shape).astype(variable.dtype))


def _np(x):
    return np.asarray(tf.convert_to_tensor(x))


def _relu(x):
    return np.maximum(x, 0.0)


def _meta_np(layer, h, scenarios, domain, activate):
    """A MetaDense in NumPy: each sample's kernel and bias generated from its domain's S~."""
    kernel, bias = _np(layer.kernel), _np(layer.bias)
    v_kernel, v_bias = _np(layer.kernel_generator), _np(layer.bias_generator)
    kernels = kernel[None] + np.einsum("ds,sgio->dgio", scenarios, v_kernel)
    biases = bias[None] + np.einsum("ds,sgo->dgo", scenarios, v_bias)
    w, b = kernels[domain], biases[domain]
    if h.ndim == 3:
        y = np.einsum("bgi,bgio->bgo", h, w) + b
    else:
        y = np.einsum("bgni,bgio->bgno", h, w) + b[:, :, None]
    return _relu(y) if activate else y


# ------------------------------------------------------------------------ meta unit
def test_meta_unit_generates_each_samples_weights_from_its_scenario(encoded):
    schema, _ = encoded
    model = _model(schema)
    _perturb(model)
    features, _ = _rows(encoded, _mixed_rows(encoded, 2))  # domains 0, 1, 2, 0, 1, 2
    domain = _np(features[schema.domain])
    assert list(domain) == [0, 1, 2, 0, 1, 2]

    # S~ = the domain's embedding through a linear layer (scenario_units=[5], last layer linear)
    table = _np(model.domain_embedding.embeddings)
    dense = model.scenario.dense_layers[0]
    scenarios = table @ _np(dense.kernel) + _np(dense.bias)
    np.testing.assert_allclose(_np(model.scenario_table()), scenarios, rtol=1e-5, atol=1e-6)

    layer = model.attention.meta[0]  # [E_i || T_t] (6 + 6) -> 6, one per task
    g, fan_in, units = layer.kernel.shape
    kernel, v_kernel = _np(layer.kernel), _np(layer.kernel_generator)
    bias, v_bias = _np(layer.bias), _np(layer.bias_generator)
    per_sample = [(kernel + sum(scenarios[d, k] * v_kernel[k] for k in range(scenarios.shape[1])),
                   bias + sum(scenarios[d, k] * v_bias[k] for k in range(scenarios.shape[1]))) for d in domain]
    kernels, biases = layer.generate(scenarios)
    for i, d in enumerate(domain):
        np.testing.assert_allclose(_np(kernels)[d], per_sample[i][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_np(biases)[d], per_sample[i][1], rtol=1e-5, atol=1e-6)
    # two samples of different domains read different weights; of the same domain, the same
    assert np.abs(per_sample[0][0] - per_sample[1][0]).min() > 0
    assert np.abs(per_sample[1][0] - per_sample[2][0]).max() > 1e-3
    np.testing.assert_array_equal(per_sample[0][0], per_sample[3][0])

    # applied as a per-sample matmul with the activation, on [B, G, N, in] and [B, G, in]
    rng = np.random.default_rng(1)
    for shape in ((6, g, 3, fan_in), (6, g, fan_in)):
        x = rng.normal(size=shape).astype("float32")
        got = _np(layer(x, scenarios, domain))
        for i in range(6):
            w, b = per_sample[i]
            for t in range(g):
                want = _relu(x[i, t] @ w[t] + b[t])
                np.testing.assert_allclose(got[i, t], want, rtol=1e-5, atol=1e-5)
        # generating for every domain then indexing = generating per sample from its own S~
        np.testing.assert_allclose(_np(layer(x, scenarios[domain])), got, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- meta attention
def test_meta_attention_is_a_softmax_over_experts_of_scored_meta_units(encoded):
    schema, _ = encoded
    model = _model(schema)
    _perturb(model)
    features, _ = _rows(encoded, _mixed_rows(encoded, 3))
    domain = _np(features[schema.domain])
    x = model.flat_inputs(model.embedding(features), features)
    experts = _np(model.experts(x))  # [B, E, d]
    views = _np(model.task_views())  # [T, d]
    scenarios = _np(model.scenario_table())
    b, e, d = experts.shape
    t = schema.num_tasks

    h = np.concatenate([np.broadcast_to(experts[:, None], (b, t, e, d)),
                        np.broadcast_to(views[None, :, None], (b, t, e, views.shape[1]))], axis=-1)
    for layer in model.attention.meta:  # every layer of the attention's meta unit activated
        h = _meta_np(layer, h, scenarios, domain, activate=True)
    scores = np.einsum("bteh,th->bte", h, _np(model.attention.v))  # a_{t,i} = v_t^T Meta_t([E_i || T_t])
    alpha = np.exp(scores - scores.max(-1, keepdims=True))
    alpha /= alpha.sum(-1, keepdims=True)
    represented = np.einsum("bte,bed->btd", alpha, experts)

    details = model.explain(features)
    reported = details.gate("meta_attention").weights
    assert reported.shape == (b, t, e)
    np.testing.assert_allclose(reported, alpha, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reported.sum(-1), 1.0, rtol=1e-6)
    assert reported.std(axis=0).max() > 1e-3  # the weights depend on the sample
    got, got_alpha = model.attention(model.experts(x), model.task_views(), scenarios, domain)
    np.testing.assert_allclose(_np(got), represented, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(got_alpha), alpha, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- meta tower
def test_meta_tower_residual_blocks_and_the_logits_by_hand(encoded):
    """L^(j) = relu(Meta^(j)(L^(j-1)) + L^(j-1)), Meta's last layer linear, then a linear head:
    recomputed in NumPy from the attention's output up to the reported logits."""
    schema, _ = encoded
    model = _model(schema)
    _perturb(model)
    features, _ = _rows(encoded, _mixed_rows(encoded, 3))
    domain = _np(features[schema.domain])
    scenarios = _np(model.scenario_table())
    x = model.flat_inputs(model.embedding(features), features)
    represented, _ = model.attention(model.experts(x), model.task_views(), scenarios, domain)
    h = _np(represented)
    for j in range(model.tower.num_layers):
        block = model.tower.block(j)
        out = h
        for k, layer in enumerate(block):
            out = _meta_np(layer, out, scenarios, domain, activate=k < len(block) - 1)
        want = _relu(out + h)
        np.testing.assert_allclose(_np(model.tower.residual_block(j, h, scenarios, domain)), want,
                                   rtol=1e-5, atol=1e-5)
        assert np.abs(want - _relu(out)).max() > 1e-3  # the residual changes the block's output
        h = want
    head = model.tower.head
    logits = np.einsum("btd,tdo->bt", h, _np(head.kernels[0])[0]) + _np(head.biases[0])[0, :, 0]
    np.testing.assert_allclose(model.explain(features).logits, logits, rtol=1e-4, atol=1e-5)


def test_the_residual_carries_the_input_when_the_meta_units_give_zero(encoded):
    """With every tower meta layer zeroed, Meta(L) = 0 and L^(j) = relu(L^(j-1)) = L^(j-1)
    (the attention's output is a convex mix of relu experts, >= 0): the logits are the head
    applied to R, so they still vary across samples; without the residual they would be the
    head's bias for every sample."""
    schema, _ = encoded
    model = _model(schema)
    _perturb(model)
    for layer in model.tower.meta:
        for variable in layer.trainable_variables:
            variable.assign(np.zeros(variable.shape, "float32"))
    features, _ = _rows(encoded, _mixed_rows(encoded, 3))
    domain = features[schema.domain]
    scenarios = model.scenario_table()
    x = model.flat_inputs(model.embedding(features), features)
    represented, _ = model.attention(model.experts(x), model.task_views(), scenarios, domain)
    np.testing.assert_allclose(_np(model.tower(represented, scenarios, domain)), _np(model.tower.head(represented)),
                               rtol=1e-6, atol=1e-6)
    logits = model.explain(features).logits
    assert logits.std(axis=0).min() > 1e-3


# ---------------------------------------------------------------- scenario gradients
def test_the_scenario_representation_trains_through_the_generated_weights(encoded):
    schema, _ = encoded
    model = _model(schema)
    features, labels = _rows(encoded, _mixed_rows(encoded, 8))
    scenario_vars = [model.domain_embedding.embeddings] + list(model.scenario.trainable_variables)
    generators = [v for v in model.trainable_variables if v.path.endswith("_generator")]
    assert len(generators) == 2 * 2 * (1 + 2)  # kernel + bias, K = 2, the attention's unit and 2 tower blocks
    with tf.GradientTape() as tape:
        out = model(features, training=True)
        loss = sum(tf.reduce_mean(keras.losses.binary_crossentropy(labels[t][:, None], out[t]))
                   for t in schema.tasks)
    grads = tape.gradient(loss, [v.value for v in scenario_vars + generators])
    for variable, grad in zip(scenario_vars + generators, grads):
        assert grad is not None and np.abs(_np(grad)).sum() > 0, variable.path
    rows = _np(grads[0])  # every domain of the batch has a gradient on its embedding row
    assert (np.abs(rows).sum(axis=1) > 0).all()

    # S~ reaches the output only through the generated weights: with the generators zeroed,
    # the predictions do not depend on the domain
    other = dict(features, **{schema.domain: (features[schema.domain] + 1) % schema.num_domains})
    moved = model(other)[schema.tasks[0]]
    assert np.abs(_np(moved) - _np(model(features)[schema.tasks[0]])).max() > 1e-6
    for variable in generators:
        variable.assign(np.zeros(variable.shape, "float32"))
    for task in schema.tasks:
        np.testing.assert_array_equal(_np(model(other)[task]), _np(model(features)[task]))


def test_a_batch_of_one_domain_is_finite_and_leaves_the_other_domains_alone(encoded):
    schema, splits = encoded
    domain = splits["train"][0][schema.domain]
    features, labels = _rows(encoded, np.flatnonzero(domain == schema.num_domains - 1)[:16])
    model = _model(schema)
    with tf.GradientTape() as tape:
        out = model(features, training=True)
        loss = sum(tf.reduce_mean(keras.losses.binary_crossentropy(labels[t][:, None], out[t]))
                   for t in schema.tasks)
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(float(loss))
    for variable, grad in zip(model.trainable_variables, grads):
        if grad is not None:
            assert np.isfinite(_np(grad)).all(), variable.path
        if variable is model.domain_embedding.embeddings:
            rows = np.abs(_np(grad)).sum(axis=1)
            assert rows[-1] > 0 and not rows[:-1].any()  # only the present domain's row
    for value in model(features, training=False).values():
        assert np.isfinite(_np(value)).all()


# ---------------------------------------------------------------------- training
def test_training_steps_lower_the_loss(encoded):
    schema, _ = encoded
    model = _model(schema)
    features, labels = _rows(encoded, np.arange(256))

    def loss():
        out = model(features)
        return float(sum(tf.reduce_mean(keras.losses.binary_crossentropy(labels[t][:, None], out[t]))
                         for t in schema.tasks))

    before = loss()
    optimizer = keras.optimizers.Adam(1e-2)
    for _ in range(5):
        with tf.GradientTape() as tape:
            out = model(features, training=True)
            step = sum(tf.reduce_mean(keras.losses.binary_crossentropy(labels[t][:, None], out[t]))
                       for t in schema.tasks)
        optimizer.apply_gradients(zip(tape.gradient(step, model.trainable_variables), model.trainable_variables))
    assert loss() < before - 0.05, (before, loss())


def test_a_step_under_mixed_bfloat16(encoded):
    schema, _ = encoded
    model = _model(schema, dtype="mixed_bfloat16", dropout=0.1)
    features, labels = _rows(encoded, _mixed_rows(encoded, 16))
    assert model.attention.meta[0].compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    before = [np.asarray(v) for v in model.trainable_variables]
    optimizer = keras.optimizers.Adam(1e-3)
    with tf.GradientTape() as tape:
        out = model(features, training=True)
        loss = sum(tf.reduce_mean(keras.losses.binary_crossentropy(labels[t][:, None], out[t]))
                   for t in schema.tasks)
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(float(loss))
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    after = [np.asarray(v) for v in model.trainable_variables]
    assert all(np.isfinite(a).all() for a in after)
    assert sum(not np.array_equal(a, b) for a, b in zip(before, after)) > len(before) // 2
    out = model(features, training=False)
    assert all(_np(v).dtype == np.float32 and np.isfinite(_np(v)).all() for v in out.values())
    copy = model.copy_under("float32")
    np.testing.assert_allclose(_np(copy(features)[schema.tasks[0]]), _np(out[schema.tasks[0]]), atol=0.05)


# ------------------------------------------------------------- save / config
def test_save_and_reload_give_identical_predictions(encoded, tmp_path):
    schema, _ = encoded
    model = _model(schema, dropout=0.2, activation="leaky_relu")
    _perturb(model)
    features, _ = _rows(encoded, np.arange(48), split="test")
    expected = {t: _np(v) for t, v in model(features).items()}
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(reloaded) is M2M and reloaded.params == model.params
    for task, value in reloaded(features).items():
        np.testing.assert_array_equal(_np(value), expected[task])
    np.testing.assert_array_equal(reloaded.explain(features).gate("meta_attention").weights,
                                  model.explain(features).gate("meta_attention").weights)
    # the serving export: every generated-weight variable must be tracked by TensorFlow (a
    # list of lists of layers is not, and the export then refuses the untracked variables)
    generators = [v.path for v in model.variables if v.path.endswith("_generator")]
    assert all(p.startswith(("m2m/meta_attention/", "m2m/meta_tower/")) for p in generators), generators
    signature = {n: tf.TensorSpec([None], tf.as_dtype(d), name=n) for n, d in schema.input_dtypes().items()}
    serve = tf.function(lambda feats: model(feats, training=False), input_signature=[signature])
    in_graph = {t: v.numpy() for t, v in serve(features).items()}
    tf.saved_model.save(model, str(tmp_path / "saved"), signatures={"serving_default": serve.get_concrete_function()})
    out = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"](**features)
    for task in schema.tasks:
        np.testing.assert_array_equal(out[task].numpy(), in_graph[task])


def test_get_config_round_trips(encoded):
    schema, _ = encoded
    model = _model(schema, scenario_units=[])
    assert model.scenario is None  # S~ is the domain embedding itself
    config = model.get_config()
    assert config["params"]["scenario_units"] == [] and config["params"]["num_experts"] == 3
    rebuilt = M2M.from_config(config)
    assert rebuilt.get_config() == config and rebuilt.count_params() == model.count_params()
    for layer in (MetaDense(4, num_groups=2, activation="relu", name="a"),
                  MetaAttention(2, [4, 3], activation="leaky_relu", name="b"),
                  MetaTower(2, 4, num_layers=3, unit_layers=1, dropout=0.1, name="c")):
        layer_config = layer.get_config()
        assert type(layer).from_config(layer_config).get_config() == layer_config


# ----------------------------------------------------------------- validation
@pytest.mark.parametrize("params, fragments", [
    ({"num_experts": 1}, ["num_experts must be >= 2, got 1"]),
    ({"activation": "tanh"}, ["activation='tanh'", "choose one of ['relu', 'leaky_relu']"]),
    ({"num_tower_layers": 0}, ["num_tower_layers must be >= 1, got 0"]),
    ({"num_meta_unit_layers": 0}, ["num_meta_unit_layers must be >= 1, got 0"]),
    ({"expert_units": []}, ["expert_units must not be empty"]),
    ({"scenario_units": [8, 0]}, ["scenario_units=[8, 0]", "list of positive integers"]),
    ({"meta_layers": 2}, ["unknown hyper-parameter(s) ['meta_layers']", "'num_meta_unit_layers'"]),
])
def test_invalid_parameters_are_named(params, fragments, encoded):
    with pytest.raises(ConfigError) as err:
        M2M(schema=encoded[0], params={**SMALL, **params}, name="m2m", dtype="float32")
    for fragment in fragments:
        assert fragment in str(err.value) and "m2m" in str(err.value), str(err.value)


def test_layers_reject_shapes_they_cannot_serve():
    condition = np.zeros((2, 3), "float32")
    with pytest.raises(ValueError, match="received shape"):
        MetaDense(4, num_groups=2)(np.zeros((2, 3, 5), "float32"), condition)
    with pytest.raises(ValueError, match="the residual keeps the width"):
        MetaTower(2, 4)(np.zeros((2, 2, 5), "float32"), condition)
