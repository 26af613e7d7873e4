"""MAMDR: the schedule, DN's and DR's updates (exact), serving, checkpointed theta_d."""
import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers, ops

from mdmt_tf.errors import ConfigError
from mdmt_tf.models import build_model
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.training.config import MAMDRConfig
from mdmt_tf.training.losses import mdmt_loss
from mdmt_tf.training.mamdr import DN, DR, PLAIN, SKIP, MAMDRSchedule, MAMDRTrainer, control
from tests.training.conftest import values

TINY = {"bottom_units": [4], "tower_units": [], "embedding_dim": 2}


def _tiny(enc, seed=0):
    keras.utils.set_random_seed(seed)
    return build_model("shared_bottom", enc.schema, TINY)


def _batch(enc, d, start=0, size=32):
    """Rows start..start+size of domain d's training rows, as tensors."""
    rows = np.flatnonzero(enc.domain["train"] == d)[start:start + size]
    return ({k: tf.constant(v[rows]) for k, v in enc.features["train"].items()},
            {k: tf.constant(v[rows]) for k, v in enc.labels["train"].items()})


def _sgd_steps(model, batches, lr, enc):
    """Plain SGD steps on `model` (the reference computation)."""
    sgd = keras.optimizers.SGD(lr)
    for features, labels in batches:
        with tf.GradientTape() as tape:
            loss = mdmt_loss(labels, model(features, training=True), features["domain_id"],
                             enc.schema.num_domains, enc.schema.tasks)
        sgd.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)


def _set_theta_d(trainer, seed=1):
    rng = np.random.default_rng(seed)
    for delta in trainer.deltas:
        delta.assign(rng.normal(0, 0.1, delta.shape).astype(np.float32))
    return [np.array(delta) for delta in trainer.deltas]


# ---------------------------------------------------------------------- the schedule
def _epoch(schedule, epoch):
    return [(rows, dict(zip(("phase", "domain", "begin", "end", "last", "epoch_end"), c)))
            for rows, c in schedule.epoch(epoch)]


SIZES = [700, 300, 120, 500, 90]  # 5 domains of unequal sizes


def _domain_column(sizes=SIZES, seed=0):
    column = np.concatenate([np.full(n, d) for d, n in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(column)


def test_pass_schedule_follows_the_official_granularity():
    domain = _domain_column()
    schedule = MAMDRSchedule(domain, strategy="mamdr", granularity="pass", batch_size=64, k=2)
    orders = set()
    for epoch in range(4):
        steps = _epoch(schedule, epoch)
        assert len(steps) == schedule.steps_per_epoch
        assert [c["epoch_end"] for _, c in steps] == [0] * (len(steps) - 1) + [1]
        dn = [(rows, c) for rows, c in steps if c["phase"] == DN]
        # DN: one full pass over each domain, domain after domain, each domain's rows once
        visits = [d for d, _ in itertools.groupby(c["domain"] for _, c in dn)]
        assert sorted(visits) == [0, 1, 2, 3, 4]
        orders.add(tuple(visits))
        for d in range(5):
            rows = np.concatenate([r for r, c in dn if c["domain"] == d])
            assert np.all(domain[rows] == d) and sorted(rows) == sorted(np.flatnonzero(domain == d))
        assert dn[0][1]["begin"] == 1 and dn[-1][1]["end"] == 1
        assert sum(c["begin"] + c["end"] for _, c in dn) == 2
        # DR: per target, k support passes, each followed by a pass over the target
        dr = [(rows, c) for rows, c in steps if c["phase"] == DR]
        assert sum(c["begin"] for _, c in dr) == sum(c["end"] for _, c in dr) == 5 * 2
        supports = {}
        update = []
        for rows, c in dr:
            if c["begin"]:
                update = []
            update.append(rows)
            if c["end"]:
                target = c["domain"]
                sizes = [len(r) for r in update]
                data = domain[np.concatenate(update)]
                support = int(data[0])
                assert support != target
                assert len(data) == SIZES[support] + SIZES[target]  # one pass over j, one over i
                assert np.all(data[:SIZES[support]] == support) and np.all(data[SIZES[support]:] == target)
                assert max(sizes) <= 64
                supports.setdefault(target, []).append(support)
        assert sorted(supports) == [0, 1, 2, 3, 4]
        assert all(len(set(s)) == 2 for s in supports.values())  # without replacement
        # padding (DR's length depends on the supports drawn) is SKIP steps at the end
        tail = [c["phase"] for _, c in steps[len(dn) + len(dr):]]
        assert set(tail) <= {SKIP} and len(dn) + len(dr) + len(tail) == len(steps)
        assert [c["last"] for _, c in steps].count(1) == 1
    assert len(orders) > 1  # a new domain order each epoch


def test_dr_supports_are_drawn_independently_for_each_target():
    """The support sets of the targets differ (the positions drawn were once the same for
    every target), and over epochs each other domain is drawn about equally often."""
    domain = _domain_column()
    schedule = MAMDRSchedule(domain, strategy="dr", granularity="batch", batch_size=512, k=2)
    counts = np.zeros((5, 5))
    distinct = 0
    for epoch in range(60):
        positions = []  # each support's position among its target's other domains
        for rows, c in _epoch(schedule, epoch):
            if c["phase"] == DR and c["begin"]:
                support = int(domain[rows[0]])
                counts[c["domain"], support] += 1
                others = [j for j in range(5) if j != c["domain"]]
                positions.append(others.index(support))
        per_target = [tuple(positions[i:i + 2]) for i in range(0, len(positions), 2)]
        distinct += len(set(per_target)) > 1
    assert distinct >= 55
    assert np.all(np.diag(counts) == 0)
    off = counts[~np.eye(5, dtype=bool)]
    assert off.min() > 0.5 * off.mean()  # 60 epochs x 2 draws of 4 others: 30 each on average


def test_batch_schedule_uses_a_fresh_batch_for_every_inner_step():
    domain = _domain_column()
    schedule = MAMDRSchedule(domain, strategy="dn", granularity="batch", batch_size=32, inner_steps=3)
    steps = _epoch(schedule, 0)
    assert schedule.iterations == len(domain) // (32 * 5)
    assert len(steps) == schedule.steps_per_epoch == schedule.iterations * 5 * 3
    for d in range(5):
        rows = [r for r, c in steps if c["domain"] == d]
        assert all(len(r) == min(32, SIZES[d]) or len(r) < 32 for r in rows)
        seen = np.concatenate(rows)
        assert np.all(domain[seen] == d)
        # consecutive batches continue the domain's shuffled order: no row repeats before all are used
        first_cycle = seen[:SIZES[d]]
        assert len(set(first_cycle.tolist())) == len(first_cycle)
    # the three steps of a visit see three different batches (they overlap only where a
    # visit crosses the end of its domain's shuffled order: then a new order starts)
    for n in range(0, len(steps), 3):
        visit = [set(r.tolist()) for r, _ in steps[n:n + 3]]
        for a, b in itertools.combinations(visit, 2):
            assert len(a & b) < min(len(a), len(b)) / 2


def test_a_schedule_is_a_function_of_seed_and_epoch():
    domain = _domain_column()

    def flat(seed, epoch):
        s = MAMDRSchedule(domain, strategy="mamdr", granularity="pass", batch_size=100, seed=seed)
        return [(r.tolist(), c) for r, c in s.epoch(epoch)]

    assert flat(0, 3) == flat(0, 3)
    assert flat(0, 3) != flat(0, 4) and flat(0, 3) != flat(1, 3)


def test_dr_target_steps_caps_the_pass_over_the_target():
    domain = _domain_column()
    schedule = MAMDRSchedule(domain, strategy="dr", granularity="pass", batch_size=64, k=1, dr_target_steps=2)
    steps = _epoch(schedule, 0)
    update = []
    for rows, c in steps:
        if c["phase"] != DR:
            continue
        update = [] if c["begin"] else update
        update.append(rows)
        if c["end"]:
            data = domain[np.concatenate(update)]
            target_rows = int(np.sum(data == c["domain"]))
            assert target_rows == min(SIZES[c["domain"]], 2 * 64)
    plain = [c for _, c in steps if c["phase"] == PLAIN]
    assert len(plain) == -(-len(domain) // 64) and {c["domain"] for c in plain} == {-1}  # mixed batches


# ---------------------------------------------------------------------- DN
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_domain_negotiation_outer_update_is_exact(enc, compiled):
    """theta_new == theta + beta * (theta~ - theta), theta~ from sequential SGD steps on the
    domains in the schedule's order, each inner step on a new batch; recomputed on a clone."""
    alpha, beta = 0.05, 0.3
    model = _tiny(enc)
    trainer = MAMDRTrainer(model, strategy="dn", granularity="batch", inner_lr=alpha, outer_lr=beta,
                           inner_optimizer="sgd", inner_steps=2)
    step = tf.function(trainer.train_step) if compiled else trainer.train_step
    clone = _tiny(enc)
    clone.set_weights(model.get_weights())
    theta = values(model.trainable_variables)
    order = [2, 0, 1]
    batches = [(d, _batch(enc, d, start=32 * step)) for d in order for step in range(2)]
    for n, (d, (features, labels)) in enumerate(batches):
        step((features, labels, control(DN, d, begin=int(n == 0), end=int(n == len(batches) - 1),
                                        last=int(n == len(batches) - 1))))
    _sgd_steps(clone, [batch for _, batch in batches], alpha, enc)
    theta_tilde = values(clone.trainable_variables)
    for t, tt, new in zip(theta, theta_tilde, values(model.trainable_variables)):
        np.testing.assert_allclose(new, t + beta * (tt - t), rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(t, tt) for t, tt in zip(theta, theta_tilde))
    assert int(trainer.outer_iterations.numpy()) == 1


@pytest.mark.parametrize("with_specific", [False, True])
def test_dn_trains_theta_alone_unless_dn_with_specific(enc, with_specific):
    """With DR's theta_d non-zero, a DN step's gradient is taken at theta~ (Algorithm 3),
    or at theta~ + theta_d with dn_with_specific; theta_d is not changed by DN."""
    alpha = 0.1
    model = _tiny(enc)
    trainer = MAMDRTrainer(model, strategy="mamdr", granularity="batch", inner_lr=alpha, outer_lr=1.0,
                           inner_optimizer="sgd", dn_with_specific=with_specific)
    theta_d = _set_theta_d(trainer)
    clone = _tiny(enc)
    clone.set_weights(model.get_weights())
    features, labels = _batch(enc, 1)
    trainer.train_step((features, labels, control(DN, 1, begin=1, end=1)))
    # reference: the gradient at theta (+ theta_1), applied to theta
    theta = values(clone.trainable_variables)
    specific = iter(theta_d)
    offsets = [next(specific)[1] if m else 0 for m in trainer.mask] if with_specific else [0] * len(theta)
    for v, t, o in zip(clone.trainable_variables, theta, offsets):
        v.assign(t + o)
    with tf.GradientTape() as tape:
        loss = mdmt_loss(labels, clone(features, training=True), features["domain_id"], 3, enc.schema.tasks)
    grads = tape.gradient(loss, clone.trainable_variables)
    for new, t, g in zip(values(model.trainable_variables), theta, grads):
        np.testing.assert_allclose(new, t - alpha * np.asarray(tf.convert_to_tensor(g)), rtol=1e-5, atol=1e-7)
    for before, delta in zip(theta_d, trainer.deltas):
        np.testing.assert_array_equal(np.array(delta), before)


# ---------------------------------------------------------------------- DR
class _Logistic(MDMTModel):
    """p_t = sigmoid(w_t * age + b_t): one feature, one weight and one bias per task."""

    def build_layers(self):
        self.head = layers.Dense(self.schema.num_tasks, name="head")

    def forward(self, features, training=None):
        logits = self.head(ops.cast(features["age"], "float32")[:, None])
        return self.probabilities(logits), {"logits": logits}


def _numpy_grad(w, b, x, labels, tasks):
    """d/d(w, b) of sum_t mean_n BCE(y_nt, sigmoid(w_t x_n + b_t)) (one domain: 'pair' reduction)."""
    p = 1 / (1 + np.exp(-(x[:, None] * w[None, :] + b[None, :])))
    y = np.stack([labels[t] for t in tasks], axis=1).astype(np.float64)
    return ((p - y) * x[:, None]).mean(axis=0), (p - y).mean(axis=0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_one_domain_regularization_update_is_exact(enc, compiled):
    """theta_i <- theta_i + gamma * (theta~_i - theta_i), theta~_i after an SGD step on the
    support domain j and one on the target i, both at theta + theta~_i; all by hand in NumPy."""
    alpha, gamma, i, j = 0.5, 0.3, 0, 2
    keras.utils.set_random_seed(3)
    model = _Logistic(schema=enc.schema, name="logistic")
    trainer = MAMDRTrainer(model, strategy="dr", granularity="batch", inner_lr=alpha, dr_lr=gamma,
                           inner_optimizer="sgd")
    step = tf.function(trainer.train_step) if compiled else trainer.train_step
    assert trainer.specific == (0, 1)  # kernel and bias: both domain-specific
    kernel, bias = (np.array(v, np.float64) for v in model.trainable_variables)
    theta_d = [np.array(d, np.float64) for d in _set_theta_d(trainer)]  # [3, 1, T] and [3, T]
    support, target = _batch(enc, j, size=40), _batch(enc, i, size=40)
    step((*support, control(DR, i, begin=1)))
    step((*target, control(DR, i, end=1, last=1)))

    tasks = enc.schema.tasks
    w_i, b_i = theta_d[0][i, 0].copy(), theta_d[1][i].copy()  # theta~_i <- theta_i
    for features, labels in (support, target):
        x = features["age"].numpy().astype(np.float64)
        gw, gb = _numpy_grad(kernel[0] + w_i, bias + b_i, x, {t: labels[t].numpy() for t in tasks}, tasks)
        w_i, b_i = w_i - alpha * gw, b_i - alpha * gb
    expected_w = theta_d[0][i, 0] + gamma * (w_i - theta_d[0][i, 0])
    expected_b = theta_d[1][i] + gamma * (b_i - theta_d[1][i])
    new_kernel, new_bias = (np.array(d) for d in trainer.deltas)
    np.testing.assert_allclose(new_kernel[i, 0], expected_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new_bias[i], expected_b, rtol=1e-5, atol=1e-7)
    assert np.abs(expected_w - theta_d[0][i, 0]).max() > 1e-3  # the update is not trivially small
    for d in (1, 2):  # other domains' theta_d and the shared theta are untouched
        np.testing.assert_array_equal(new_kernel[d], theta_d[0][d].astype(np.float32))
        np.testing.assert_array_equal(new_bias[d], theta_d[1][d].astype(np.float32))
    np.testing.assert_array_equal(np.array(model.trainable_variables[0]), kernel.astype(np.float32))
    np.testing.assert_array_equal(np.array(model.trainable_variables[1]), bias.astype(np.float32))


def test_domain_regularization_updates_only_domain_parameters(enc):
    model = _tiny(enc)
    trainer = MAMDRTrainer(model, strategy="dr", granularity="batch", inner_lr=0.05, dr_lr=0.5, k=2,
                           inner_optimizer="sgd")
    theta = values(model.trainable_variables)
    for i in range(3):
        for j in (d for d in range(3) if d != i):
            trainer.train_step((*_batch(enc, j), control(DR, i, begin=1)))
            trainer.train_step((*_batch(enc, i), control(DR, i, end=1)))
    for before, after in zip(theta, values(model.trainable_variables)):
        np.testing.assert_array_equal(before, after)  # shared weights untouched
    for delta in trainer.deltas:
        assert all(np.abs(np.array(delta)[d]).sum() > 0 for d in range(3))
    # "dense" scope: the embedding table has no domain-specific copy
    paths = [v.path for n, v in enumerate(model.trainable_variables) if n not in trainer.specific]
    assert paths == ["shared_bottom/embedding/embeddings"]
    assert [d.shape[0] for d in trainer.deltas] == [3] * len(trainer.specific)


def test_serving_model_uses_theta_plus_theta_d(enc):
    model = _tiny(enc)
    trainer = MAMDRTrainer(model, strategy="dr", inner_lr=0.05, dr_lr=0.5, inner_optimizer="sgd")
    theta_d = _set_theta_d(trainer)
    serving = trainer.serving_model()
    features = {k: v[:60] for k, v in enc.features["test"].items()}
    got = {t: np.asarray(v).ravel() for t, v in serving(features).items()}
    clone = _tiny(enc)
    for d in range(3):
        stacked = iter(theta_d)
        for target, source, m in zip(clone.trainable_variables, model.trainable_variables, trainer.mask):
            target.assign(np.asarray(source) + (next(stacked)[d] if m else 0))
        rows = features["domain_id"] == d
        expected = clone(features, training=False)
        for task in enc.schema.tasks:
            np.testing.assert_allclose(got[task][rows], np.asarray(expected[task]).ravel()[rows], rtol=1e-5)


def test_theta_d_and_the_optimizer_state_are_in_the_checkpoint(enc, tmp_path):
    trainer = MAMDRTrainer(_tiny(enc), strategy="mamdr")
    trainer.compile()
    theta_d = _set_theta_d(trainer)
    path = tf.train.Checkpoint(trainer=trainer).save(str(tmp_path / "ckpt"))
    names = dict(tf.train.list_variables(path))
    for n, delta in enumerate(trainer.deltas):
        assert names[f"trainer/theta_d_{n}/.ATTRIBUTES/VARIABLE_VALUE"] == list(delta.shape)
    assert any(name.startswith("trainer/inner_optimizer/_variables/") for name in names)  # Adam's moments
    assert "trainer/epochs_done/.ATTRIBUTES/VARIABLE_VALUE" in names
    other = MAMDRTrainer(_tiny(enc, seed=5), strategy="mamdr")
    other.compile()
    tf.train.Checkpoint(trainer=other).restore(path).assert_existing_objects_matched()
    for before, delta in zip(theta_d, other.deltas):
        np.testing.assert_array_equal(np.array(delta), before)


# ---------------------------------------------------------------------- fit, errors
@pytest.mark.parametrize("granularity", ["pass", "batch"])
def test_mamdr_fit_and_errors(enc, granularity):
    model = _tiny(enc)
    trainer = MAMDRTrainer(model, strategy="mamdr", k=1, granularity=granularity)
    trainer.compile()
    data, steps, rows_per_step = trainer.training_data(enc.features["train"], enc.labels["train"], 256)
    history = trainer.fit(data, epochs=2, steps_per_epoch=steps, verbose=0, shuffle=False)
    assert np.all(np.isfinite(history.history["loss"]))
    iterations = 1 if granularity == "pass" else len(enc.domain["train"]) // (256 * 3)
    assert int(trainer.outer_iterations.numpy()) == 2 * iterations
    assert int(trainer.epochs_done.numpy()) == 2
    assert 0 < rows_per_step <= 256
    with pytest.raises(ConfigError, match="strategy"):
        MAMDRTrainer(model, strategy="reptile")
    with pytest.raises(ConfigError, match="at least 2 domains"):
        MAMDRTrainer(model, strategy="dr", domains=[0])
    with pytest.raises(ConfigError, match="granularity"):
        MAMDRTrainer(model, granularity="step")
    with pytest.raises(ConfigError, match="inner_steps=3 applies to granularity 'batch'"):
        MAMDRConfig(inner_steps=3)
    with pytest.raises(ConfigError, match="needs strategy 'mamdr'"):
        MAMDRTrainer(model, strategy="dr", dn_with_specific=True)
    with pytest.raises(ConfigError, match="dr_target_steps=2 applies to granularity 'pass'"):
        MAMDRConfig(dr_target_steps=2, granularity="batch")
    assert MAMDRConfig(inner_steps=3, granularity="batch").inner_steps == 3
