"""Every registered model: output contract, training, save/reload, empty domains."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.compat import sublayers
from mdmt_tf.data.dataset import make_dataset
from mdmt_tf.models import build_model, model_names
from tests.models.conftest import take

ALL = model_names()

# Non-default variants, at tiny widths so they stay out of the slow set.
TINY = {
    "m3oe": {"embedding_dim": 4, "bottom_units": [16, 8], "expert_units": [8, 4], "tower_units": [4],
             "num_shared_experts": 2},
    "stem": {"embedding_dim": 4, "expert_units": [8, 4], "tower_units": [4]},
}
TINY["m3oe_aftb"] = TINY["m3oe"]
VARIANTS = [
    ("m3oe", {"arch_granularity": "vector"}),
    ("m3oe", {"shared_gate": "logits"}),
    ("m3oe", {"gate_stop_gradient": False}),
    ("m3oe_aftb", {"aftb_domains": True}),
    ("m3oe_aftb", {"shared_gate": "logits", "arch_granularity": "vector"}),
    ("m3oe_aftb", {"task_embedding_fields": ["user_id"]}),
    ("m3oe", {"shared_gate": "dselect_k"}),
    ("m3oe_aftb", {"shared_gate": "dselect_k"}),
    ("stem", {"aftb": False}),
    ("stem", {"task_embedding_fields": ["user_id", "item_id"], "num_task_experts": 2}),
]
VARIANT_IDS = [f"{name}-" + "-".join(f"{k}={v}" for k, v in params.items()) for name, params in VARIANTS]


def _variant(name, params, schema):
    keras.utils.set_random_seed(0)
    return build_model(name, schema, {**TINY[name], **params})


def _small(name, schema):
    """Default architecture, except smaller widths so the suite stays fast."""
    keras.utils.set_random_seed(0)
    return build_model(name, schema)


def _bce(model, features, labels, training=False):
    out = model(features, training=training)
    return sum(tf.reduce_mean(keras.losses.binary_crossentropy(labels[t][:, None], out[t]))
               for t in model.schema.tasks)


def test_registry_lists_every_model():
    assert ALL == ["m3oe", "m3oe_aftb", "stem", "mlp", "shared_bottom", "mmoe", "omoe", "me_mmoe", "ple", "me_ple",
                   "star", "pepnet", "adi", "aesm2", "m2m", "musenet", "mtms", "sass", "esmm", "escm2", "aitm"]


@pytest.mark.parametrize("name", ALL)
def test_output_contract(name, encoded):
    schema, splits = encoded
    features, labels = take(*splits["test"], range(37))
    model = _small(name, schema)
    out = model(features)
    assert sorted(out) == sorted(schema.tasks)
    for task in schema.tasks:
        p = np.asarray(out[task])
        assert p.shape == (37, 1) and p.dtype == np.float32
        assert ((p > 0) & (p < 1)).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_one_epoch_lowers_the_loss(name, encoded):
    schema, splits = encoded
    model = _small(name, schema)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss={t: "binary_crossentropy" for t in schema.tasks})
    val = make_dataset(*splits["val"], batch_size=512)
    before = model.evaluate(val, verbose=0, return_dict=True)["loss"]
    model.fit(make_dataset(*splits["train"], batch_size=128, shuffle=True, seed=0), epochs=1, verbose=0)
    after = model.evaluate(val, verbose=0, return_dict=True)["loss"]
    assert after < before, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_save_and_reload_give_identical_predictions(name, encoded, tmp_path):
    schema, splits = encoded
    features, labels = take(*splits["test"], range(64))
    model = _small(name, schema)
    # move the weights off their initial values (and PartitionedNorm's moving statistics)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss={t: "binary_crossentropy" for t in schema.tasks})
    model.fit(features, labels, epochs=2, batch_size=32, verbose=0)
    _check_save_and_reload(model, schema, features, tmp_path)


@pytest.mark.parametrize("name, params", VARIANTS, ids=VARIANT_IDS)
def test_variants_save_and_reload_give_identical_predictions(name, params, encoded, tmp_path):
    schema, splits = encoded
    features, _ = take(*splits["test"], range(64))
    model = _variant(name, params, schema)
    for key, value in params.items():
        assert getattr(model.params, key) == (tuple(value) if isinstance(value, list) else value)
    # move every variable (alpha, beta, gate logits included) off its initial value
    rng = np.random.default_rng(0)
    for variable in model.variables:
        assert "float" in variable.dtype, variable.path
        variable.assign(np.asarray(variable) + rng.normal(0, 0.3, variable.shape).astype(variable.dtype))
    _check_save_and_reload(model, schema, features, tmp_path)


def _check_save_and_reload(model, schema, features, tmp_path):
    expected = {t: np.asarray(v) for t, v in model(features).items()}

    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(reloaded) is type(model) and reloaded.params == model.params
    for task, value in reloaded(features).items():
        np.testing.assert_array_equal(np.asarray(value), expected[task])

    signature = {n: tf.TensorSpec([None], tf.as_dtype(d), name=n) for n, d in schema.input_dtypes().items()}
    serve = tf.function(lambda feats: model(feats, training=False), input_signature=[signature])
    # the traced graph may round differently from eager execution (oneDNN fusions): compare
    # the graph before saving with the graph after reloading, bit for bit, and to eager closely
    in_graph = {t: v.numpy() for t, v in serve(features).items()}
    tf.saved_model.save(model, str(tmp_path / "saved"), signatures={"serving_default": serve.get_concrete_function()})
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    out = loaded.signatures["serving_default"](**{k: tf.constant(v) for k, v in features.items()})
    for task in schema.tasks:
        np.testing.assert_array_equal(out[task].numpy(), in_graph[task])
        np.testing.assert_allclose(out[task].numpy(), expected[task], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, params", [(n, None) for n in ALL] + VARIANTS, ids=ALL + VARIANT_IDS)
def test_batch_with_empty_domains_has_no_nan(name, params, encoded):
    """A batch holding one domain only (the others empty): finite outputs and gradients,
    in training mode (STAR's partitioned norm uses per-domain batch moments there)."""
    schema, splits = encoded
    features, labels = splits["train"]
    rows = np.flatnonzero(features[schema.domain] == schema.num_domains - 1)[:16]
    assert len(rows) == 16
    features, labels = take(features, labels, rows)
    model = _small(name, schema) if params is None else _variant(name, params, schema)
    with tf.GradientTape() as tape:
        loss = _bce(model, features, labels, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(float(loss))
    for variable, grad in zip(model.trainable_variables, grads):
        if grad is not None:
            assert np.isfinite(np.asarray(tf.convert_to_tensor(grad))).all(), variable.path
    for value in model(features, training=False).values():
        assert np.isfinite(np.asarray(value)).all()


def test_esmm_is_a_cascade(encoded):
    schema, splits = encoded
    features, _ = take(*splits["test"], range(50))
    model = _small("esmm", schema)
    out = model(features)
    details = model.explain(features)
    click, like = np.asarray(out["click"])[:, 0], np.asarray(out["like"])[:, 0]
    conditional = details.extra["conditional"]
    np.testing.assert_allclose(like, conditional[:, 0] * conditional[:, 1], rtol=1e-6)
    assert (like <= click).all()


def test_single_task_mlps_share_nothing(encoded):
    """`mlp` is one independent model per task: task 0's loss reaches only task 0's weights."""
    schema, splits = encoded
    features, labels = take(*splits["train"], range(64))
    model = _small("mlp", schema)
    with tf.GradientTape() as tape:
        out = model(features, training=True)
        loss = tf.reduce_mean(keras.losses.binary_crossentropy(labels["click"][:, None], out["click"]))
    grads = {v.path: np.zeros(v.shape) if g is None else np.asarray(tf.convert_to_tensor(g))
             for v, g in zip(model.trainable_variables, tape.gradient(loss, model.trainable_variables))}
    assert all(np.all(g == 0.0) for p, g in grads.items() if "_like" in p)
    assert all(np.abs(g).sum() > 0 for p, g in grads.items() if "_click" in p and "bias" not in p)


@pytest.mark.parametrize("name", ALL)
def test_a_training_step_under_mixed_bfloat16(name, encoded):
    """Every layer works with the mixed_bfloat16 policy `--precision auto` picks on bf16 CPUs."""
    schema, splits = encoded
    features, labels = take(*splits["train"], range(64))
    keras.utils.set_random_seed(0)
    model = build_model(name, schema, dtype="mixed_bfloat16")
    with tf.GradientTape() as tape:
        loss = _bce(model, features, labels, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(float(loss)) and any(g is not None for g in grads)
    out = model(features, training=False)
    assert all(np.asarray(v).dtype == np.float32 for v in out.values())


@pytest.mark.parametrize("name", ALL)
def test_a_model_carries_its_own_dtype_policy_into_every_layer(name, encoded):
    """Models are built with a policy, not the global one: every sub-layer (and theirs) has
    the model's policy, the global policy is untouched, and a float32 model built right after
    is float32 throughout; save/reload keeps the policy."""
    schema, splits = encoded
    features, _ = take(*splits["test"], range(8))
    keras.utils.set_random_seed(0)
    model = build_model(name, schema, dtype="mixed_bfloat16")
    plain = build_model(name, schema)
    assert keras.mixed_precision.global_policy().name == "float32"
    for built, policy in ((model, "mixed_bfloat16"), (plain, "float32")):
        layers = [built, *sublayers(built)]
        assert len(layers) >= 3  # the model and at least two of its layers
        wrong = {layer.name: layer.dtype_policy.name for layer in layers if layer.dtype_policy.name != policy}
        assert not wrong, f"{name} ({policy}): sub-layers with another policy: {wrong}"
    copy = model.copy_under("float32")
    assert {layer.dtype_policy.name for layer in [copy, *sublayers(copy)]} == {"float32"}
    np.testing.assert_allclose(np.asarray(copy(features)[schema.tasks[0]]),
                               np.asarray(model(features)[schema.tasks[0]]), atol=0.05)
    assert type(model).from_config(model.get_config()).dtype_policy.name == "mixed_bfloat16"
