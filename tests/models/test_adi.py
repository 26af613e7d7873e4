"""ADI (mdmt_tf.models.adi): each row through its own domain's networks, domain-specific
batch normalisation with per-domain statistics, the interest adaptation, the shared gate and
the fusion layer recomputed in NumPy, and the usual contract (save/reload, config, training,
empty domains, mixed_bfloat16, parameter errors)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.errors import ConfigError
from mdmt_tf.models import FeatureSchema
from mdmt_tf.models.adi import ADI, DomainFusion, DomainInterestAdaptation, DomainSpecificNetworks, SharedNetworks
from tests.models.conftest import take

SMALL = {"embedding_dim": 4, "num_shared_networks": 3, "network_units": [8, 6], "forward_units": [5],
         "tower_units": [4]}


def _model(encoded, dtype="float32", **params):
    keras.utils.set_random_seed(0)
    return ADI(schema=encoded[0], params={**SMALL, **params}, name="adi", dtype=dtype)


def _batch(encoded, rows=60, split="test"):
    features, labels = encoded[1][split]
    features, labels = take(features, labels, np.arange(rows))
    assert len(np.unique(features[encoded[0].domain])) == encoded[0].num_domains  # every domain present
    return ({k: tf.constant(v) for k, v in features.items()}, {k: tf.constant(v) for k, v in labels.items()})


def _bce(model, features, labels, training):
    out = model(features, training=training)
    return sum(tf.reduce_mean(keras.losses.binary_crossentropy(tf.cast(labels[t][:, None], "float32"), out[t]))
               for t in model.schema.tasks)


def _perturb(model, seed=0):
    """Every variable off its initial value (moving variances kept positive)."""
    rng = np.random.default_rng(seed)
    for v in model.variables:
        value = np.asarray(v) + rng.normal(0, 0.3, v.shape).astype("float32")
        if v.path.endswith("moving_variance"):
            value = np.abs(value) + 0.5
        v.assign(value)


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype="float64")


def _relu(x):
    return np.maximum(x, 0.0)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _norm_inference(norm, h, domain):
    """PartitionedNorm at inference, by hand: domain d's moving moments and affine."""
    mean, var = _np(norm.moving_mean)[domain], _np(norm.moving_variance)[domain]
    scale = _np(norm.gamma) * _np(norm.domain_gamma)[domain]
    shift = _np(norm.beta) + _np(norm.domain_beta)[domain]
    return scale * (h - mean) / np.sqrt(var + norm.epsilon) + shift


def _specific_by_hand(layer, x, domain):
    for i, (kernel, bias) in enumerate(zip(layer.kernels, layer.biases)):
        h = np.einsum("bi,bio->bo", x, _np(kernel)[domain]) + _np(bias)[domain]
        x = _relu(_norm_inference(layer.norms[i], h, domain) if layer.dsbn else h)
    return x


def _forward_by_hand(model, features):
    """ADI's inference pass in NumPy from the model's weights -> (logits, gate, alpha, beta_1, beta_2)."""
    p, schema = model.params, model.schema
    domain = np.asarray(features[schema.domain])
    f = _np(model.domain_embedding.embeddings)[domain]  # [B, k]
    embedded = _np(model.embedding(features))  # [B, N, k]
    alpha = None
    if p.interest_adaptation == "se":
        a = model.adaptation
        pooled = embedded.mean(axis=-1)
        hidden = _relu(np.einsum("bn,bnr->br", pooled, _np(a.kernel_1)[domain]) + _np(a.bias_1)[domain])
        alpha = np.einsum("br,brn->bn", hidden, _np(a.kernel_2)[domain]) + _np(a.bias_2)[domain]
    elif p.interest_adaptation == "domain":
        alpha = _np(model.adaptation.domain_scale)[domain]
    if alpha is not None:
        embedded = embedded * alpha[:, :, None]
    x = embedded.reshape(len(domain), -1)
    if schema.dense:
        x = np.concatenate([x, np.stack([np.asarray(features[n], "float64") for n in schema.dense], 1)], 1)
    # shared networks, DSBN over the K networks' units together, then the domain gate
    logits_gate = f @ _np(model.gate.kernel) + _np(model.gate.bias)
    gate = np.exp(logits_gate - logits_gate.max(1, keepdims=True))
    gate /= gate.sum(1, keepdims=True)
    h = np.repeat(x[:, None], p.num_shared_networks, axis=1)  # [B, K, in]
    for i, (kernel, bias) in enumerate(zip(model.shared.kernels, model.shared.biases)):
        pre = np.einsum("bki,kio->bko", h, _np(kernel)) + _np(bias)
        flat = pre.reshape(len(domain), -1)
        flat = _norm_inference(model.shared.norms[i], flat, domain) if p.dsbn else flat
        h = _relu(flat).reshape(pre.shape)
    shared = np.einsum("bk,bkh->bh", gate, h)
    specific = _specific_by_hand(model.specific, x, domain)
    # the fusion layer
    fusion = model.fusion
    beta_1 = _sigmoid(np.einsum("bk,bkh->bh", f, _np(fusion.spec_kernel)[domain]) + _np(fusion.spec_bias)[domain])
    beta_2 = _sigmoid(np.einsum("bk,bkh->bh", f, _np(fusion.shared_kernel)[domain])
                      + _np(fusion.shared_bias)[domain])
    spec, common = beta_1 * specific, beta_2 * shared
    h = np.concatenate([spec, spec * common, common], axis=1)
    if model.forward_network is not None:
        h = _specific_by_hand(model.forward_network, h, domain)
    # a tower per task
    towers = model.towers
    h = np.repeat(h[:, None], schema.num_tasks, axis=1)  # [B, T, H]
    for i, (kernel, bias) in enumerate(zip(towers.kernels, towers.biases)):
        h = np.einsum("bti,tio->bto", h, _np(kernel)[0]) + _np(bias)[0]
        if i < len(towers.kernels) - 1:
            h = _relu(h)
    return h[..., 0], gate, alpha, beta_1, beta_2


@pytest.mark.parametrize("params", [{}, {"interest_adaptation": "domain", "dsbn": False, "forward_units": []},
                                    {"interest_adaptation": "none", "tower_units": []}],
                         ids=["se-dsbn", "domain-scale-no-dsbn", "no-adaptation"])
def test_the_forward_pass_recomputed_by_hand(encoded, params):
    """Interest adaptation alpha^(d), the shared networks' softmax gate, DSBN at inference,
    each row's own specific and forward networks, the fusion concat(b1 s | b1 s * b2 c | b2 c)
    and the towers, in NumPy from the weights; the Details report what the model applies."""
    model = _model(encoded, **params)
    _perturb(model)
    features, _ = _batch(encoded)
    logits, gate, alpha, beta_1, beta_2 = _forward_by_hand(model, features)
    out, details = model.forward(features, training=False)
    np.testing.assert_allclose(_np(details.logits), logits, rtol=2e-4, atol=2e-5)
    for i, task in enumerate(model.schema.tasks):
        np.testing.assert_allclose(_np(out[task])[:, 0], _sigmoid(logits[:, i]), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(_np(details.gate("shared").weights), gate[:, None, :], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(details.extra["fusion_specific"]), beta_1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(details.extra["fusion_shared"]), beta_2, rtol=1e-5, atol=1e-6)
    if alpha is None:
        assert "interest" not in details.extra
    else:
        np.testing.assert_allclose(_np(details.extra["interest"]), alpha, rtol=1e-4, atol=1e-5)
        assert np.abs(alpha - 1).max() > 0.1  # the adaptation does scale the fields
    # the gate and the fusion weights depend on the domain only, and differ between domains
    domain = np.asarray(features[model.schema.domain])
    for weights in (gate, beta_1, beta_2):
        per_domain = [weights[domain == d] for d in range(model.schema.num_domains)]
        assert all(np.ptp(w, axis=0).max() < 1e-6 for w in per_domain)
        assert np.abs(per_domain[0][0] - per_domain[1][0]).max() > 1e-3


def test_the_se_block_starts_near_the_identity(encoded):
    """Before training alpha = FC2(relu(FC1(mean F))) + 1 with small glorot terms: near 1."""
    model = _model(encoded)
    features, _ = _batch(encoded)
    alpha = _np(model.forward(features)[1].extra["interest"])
    assert alpha.shape == (60, len(model.schema.sparse)) and np.abs(alpha - 1).max() < 0.1


def test_each_row_goes_through_its_own_domains_networks(encoded):
    """Changing domain d's specific-network (or forward-network, or fusion) weights changes
    the outputs of domain-d rows only; a batch of one domain gives the other domains'
    specific networks exactly zero gradient."""
    model = _model(encoded)
    _perturb(model, seed=1)
    features, labels = _batch(encoded)
    domain = np.asarray(features[model.schema.domain])
    before = _np(model.forward(features)[1].logits)
    for variable in (model.specific.kernels[0], model.forward_network.kernels[0], model.fusion.spec_kernel):
        for d in range(model.schema.num_domains):
            original = np.asarray(variable)
            changed = original.copy()
            changed[d] += 0.5
            variable.assign(changed)
            after = _np(model.forward(features)[1].logits)
            variable.assign(original)
            moved = np.abs(after - before).max(axis=1) > 0
            np.testing.assert_array_equal(moved, domain == d, err_msg=f"{variable.path} domain {d}")
    rows = np.flatnonzero(domain == 1)
    one = ({k: tf.gather(v, rows) for k, v in features.items()}, {k: tf.gather(v, rows) for k, v in labels.items()})
    kernels = [model.specific.kernels[0], model.forward_network.kernels[0]]
    with tf.GradientTape() as tape:
        loss = _bce(model, *one, training=True)
    for kernel, grad in zip(kernels, tape.gradient(loss, [k.value for k in kernels])):
        grad = np.asarray(grad)
        assert np.abs(grad[1]).sum() > 0 and not grad[0].any() and not grad[2].any(), kernel.path


def test_dsbn_uses_per_domain_statistics_in_training_and_moving_ones_at_inference():
    """SharedNetworks' DSBN on a tiny batch: training normalises each row with its own
    domain's batch mean and (biased) variance and that domain's affine, and moves only the
    present domains' moving moments; inference uses the moving moments."""
    keras.utils.set_random_seed(0)
    layer = SharedNetworks(2, (5,), num_domains=3, momentum=0.5, name="shared")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 4)).astype("float32")
    domain = np.array([0, 0, 0, 1, 1, 1, 1], "int32")  # domain 2 absent
    layer(x, domain, training=False)
    norm = layer.norms[0]
    for v in (norm.gamma, norm.beta, norm.domain_gamma, norm.domain_beta, norm.moving_mean):
        v.assign(rng.normal(size=v.shape).astype("float32"))
    norm.moving_variance.assign(rng.uniform(0.5, 2.0, norm.moving_variance.shape).astype("float32"))
    old_mean, old_var = _np(norm.moving_mean), _np(norm.moving_variance)

    pre = (x.astype("float64") @ _np(layer.kernels[0]).transpose(1, 0, 2).reshape(4, 10)
           + _np(layer.biases[0]).reshape(-1))  # [7, K * 5]
    scale = _np(norm.gamma) * _np(norm.domain_gamma)[domain]
    shift = _np(norm.beta) + _np(norm.domain_beta)[domain]
    means = np.stack([pre[domain == d].mean(0) for d in (0, 1)])
    variances = np.stack([pre[domain == d].var(0) for d in (0, 1)])
    normed = (pre - means[domain]) / np.sqrt(variances[domain] + norm.epsilon)
    expected = _relu(scale * normed + shift).reshape(7, 2, 5)
    np.testing.assert_allclose(_np(layer(x, domain, training=True)), expected, rtol=1e-4, atol=1e-5)
    # a global batch norm would differ: the per-domain moments are not the batch's
    assert np.abs(means[0] - pre.mean(0)).max() > 0.05
    new_mean, new_var = _np(norm.moving_mean), _np(norm.moving_variance)
    np.testing.assert_allclose(new_mean[:2], 0.5 * old_mean[:2] + 0.5 * means, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_var[:2], 0.5 * old_var[:2] + 0.5 * variances, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new_mean[2], old_mean[2])  # the absent domain keeps its moments
    np.testing.assert_array_equal(new_var[2], old_var[2])

    at_inference = _relu(scale * (pre - new_mean[domain]) / np.sqrt(new_var[domain] + norm.epsilon) + shift)
    np.testing.assert_allclose(_np(layer(x, domain, training=False)), at_inference.reshape(7, 2, 5),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(_np(norm.moving_mean), new_mean)  # inference does not move them


def test_in_training_a_row_depends_only_on_its_own_domains_rows(encoded):
    """The model's DSBN normalises each domain with its own batch moments: changing the
    features of domain-1 rows leaves the other domains' training-mode outputs unchanged
    (one batch norm over the whole batch would move them)."""
    model = _model(encoded)
    features, _ = _batch(encoded)
    domain = np.asarray(features[model.schema.domain])
    changed = dict(features)
    field = model.schema.sparse_names[0]
    ids = np.asarray(features[field]).copy()
    ids[domain == 1] = (ids[domain == 1] + 1) % model.schema.sparse_sizes[field]
    changed[field] = tf.constant(ids)
    a = _np(model.forward(features, training=True)[1].logits)
    b = _np(model.forward(changed, training=True)[1].logits)
    assert np.abs(a[domain == 1] - b[domain == 1]).max() > 1e-4
    np.testing.assert_allclose(a[domain != 1], b[domain != 1], rtol=1e-5, atol=1e-6)


def test_a_batch_with_empty_domains_is_finite(encoded):
    """One domain only, in training (DSBN's batch moments of empty domains): finite loss and
    gradients, the absent domains' moving moments untouched, finite inference."""
    model = _model(encoded)
    features, labels = encoded[1]["train"]
    rows = np.flatnonzero(features[encoded[0].domain] == 2)[:16]
    features, labels = take(features, labels, rows)
    norms = model.shared.norms + model.specific.norms + model.forward_network.norms
    before = [_np(n.moving_mean) for n in norms]
    with tf.GradientTape() as tape:
        loss = _bce(model, features, labels, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(float(loss))
    for variable, grad in zip(model.trainable_variables, grads):
        if grad is not None:
            assert np.isfinite(np.asarray(tf.convert_to_tensor(grad))).all(), variable.path
    for norm, old in zip(norms, before):
        now = _np(norm.moving_mean)
        np.testing.assert_array_equal(now[:2], old[:2])
        assert np.abs(now[2] - old[2]).max() > 0, norm.path
    for value in model(features, training=False).values():
        assert np.isfinite(np.asarray(value)).all()


def test_a_training_step_lowers_the_loss(encoded):
    model = _model(encoded)
    features, labels = _batch(encoded, rows=200, split="train")
    optimizer = keras.optimizers.Adam(1e-2)
    before = float(_bce(model, features, labels, training=True))
    for _ in range(5):
        with tf.GradientTape() as tape:
            loss = _bce(model, features, labels, training=True)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    assert float(_bce(model, features, labels, training=True)) < before


def test_save_and_reload_give_identical_predictions(encoded, tmp_path):
    model = _model(encoded)
    features, labels = _batch(encoded, rows=64)
    optimizer = keras.optimizers.Adam(1e-2)
    for _ in range(2):  # move the weights and the DSBN moving moments off their initial values
        with tf.GradientTape() as tape:
            loss = _bce(model, features, labels, training=True)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    assert np.abs(_np(model.shared.norms[0].moving_mean)).max() > 0  # the moving moments moved
    expected = {t: np.asarray(v) for t, v in model(features).items()}
    model.save(tmp_path / "adi.keras")
    reloaded = keras.saving.load_model(tmp_path / "adi.keras")
    assert type(reloaded) is ADI and reloaded.params == model.params
    for task, value in reloaded(features).items():
        np.testing.assert_array_equal(np.asarray(value), expected[task])


def test_get_config_round_trip(encoded):
    model = _model(encoded, interest_adaptation="domain", dsbn=False, norm_momentum=0.8)
    _perturb(model)
    copy = ADI.from_config(model.get_config())
    assert copy.params == model.params and copy.schema == model.schema and copy.name == "adi"
    copy.set_weights(model.get_weights())
    features, _ = _batch(encoded)
    for task, value in copy(features).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(model(features)[task]))
    for layer in (model.adaptation, model.shared, model.specific, model.forward_network, model.fusion):
        config = layer.get_config()
        assert type(layer).from_config(config).get_config() == config


def test_the_layers_reject_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        DomainInterestAdaptation(3, mode="attention")
    with pytest.raises(ValueError, match="units"):
        DomainSpecificNetworks(3, ())
    with pytest.raises(ValueError, match="num_domains"):
        DomainFusion(0, 4)


def test_mixed_bfloat16_trains_a_step(encoded):
    model = _model(encoded, dtype="mixed_bfloat16")
    features, labels = _batch(encoded, rows=64, split="train")
    theta = [np.asarray(v) for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        loss = _bce(model, features, labels, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(float(loss))
    keras.optimizers.Adam(1e-2).apply_gradients(zip(grads, model.trainable_variables))
    after = [np.asarray(v) for v in model.trainable_variables]
    assert all(np.isfinite(v).all() for v in after) and any(not np.array_equal(a, b) for a, b in zip(theta, after))
    out, details = model.forward(features, training=False)
    assert all(np.asarray(v).dtype == np.float32 and np.isfinite(np.asarray(v)).all() for v in out.values())
    assert all(np.asarray(v).dtype == np.float32 for v in details.extra.values())


@pytest.mark.parametrize("params, message", [
    ({"interest_adaptation": "attention"}, r"interest_adaptation='attention' is not valid.*\['se', 'domain', 'none'\]"),
    ({"norm_momentum": 1.0}, r"norm_momentum must be in \[0, 1\), got 1.0"),
    ({"se_reduction": 0}, "se_reduction must be >= 1, got 0"),
    ({"num_shared_networks": 0}, "num_shared_networks must be >= 1, got 0"),
    ({"network_units": []}, "network_units must not be empty"),
    ({"dsbn": "yes"}, "dsbn='yes' must be true or false"),
    ({"num_experts": 4}, r"unknown hyper-parameter\(s\) \['num_experts'\]"),
])
def test_bad_params_raise_a_config_error(encoded, params, message):
    with pytest.raises(ConfigError, match=message):
        ADI(schema=encoded[0], params=params, name="adi")


def test_a_schema_without_sparse_fields_is_a_config_error(encoded):
    schema = encoded[0]
    dense_only = FeatureSchema(domain=schema.domain, domains=schema.domains, tasks=schema.tasks, sparse=(),
                               dense=("x",))
    with pytest.raises(ConfigError, match="sparse fields"):
        ADI(schema=dense_only, params=SMALL, name="adi")
