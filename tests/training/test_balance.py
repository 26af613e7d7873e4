"""Loss balancing (mdmt_tf.training.balance): each rule's step on a small MMoE with SGD,
against the rule written out here from per-task gradients taken with separate tapes."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.errors import ConfigError
from mdmt_tf.models import build_model
from mdmt_tf.training.balance import GradNorm, MetaBalance, UncertaintyWeighting, make_balance
from mdmt_tf.training.config import BalanceConfig, TrainConfig
from mdmt_tf.training.losses import mdmt_loss, unit_losses
from mdmt_tf.training.trainer import MDMTTrainer
from tests.training.conftest import batches

LR = 0.1
PARAMS = {"embedding_dim": 4, "expert_units": [8], "tower_units": [4], "num_experts": 2, "dropout": 0.0}


def _setup(enc, balance):
    keras.utils.set_random_seed(0)
    model = build_model("mmoe", enc.schema, PARAMS, dtype="float32")
    trainer = MDMTTrainer(model, arch_mode="joint", weight_optimizer=keras.optimizers.SGD(LR), balance=balance)
    trainer.compile()
    features, labels = next(iter(batches(enc, "train", 128)))
    return model, trainer, features, labels


def _per_task(model, features, labels, tasks, domains):
    """(per-task losses, per-task gradients {variable path: array or None}) from one tape each."""
    losses, grads = [], []
    for index in range(len(tasks)):
        with tf.GradientTape() as tape:
            probs = model(features, training=True)
            loss = unit_losses(labels, probs, features[model.schema.domain], domains, tasks)[index]
        g = tape.gradient(loss, model.weight_variables)
        losses.append(float(loss))
        grads.append({v.path: (None if x is None else np.asarray(tf.convert_to_tensor(x)))
                      for v, x in zip(model.weight_variables, g)})
    return losses, grads


def _shared(grads, path):
    """Both tasks' gradients nonzero at a common entry (a stacked per-task tower is not shared)."""
    a, b = grads[0][path], grads[1][path]
    return a is not None and b is not None and bool(np.any((a != 0) & (b != 0)))


def _assert_plain_step(model, trainer, features, labels, grads):
    """One trainer step moves every weight by -LR times the sum of the tasks' gradients."""
    before = _weights(model)
    trainer.train_step((features, labels))
    after = _weights(model)
    for path, value in before.items():
        plain = sum(g[path] for g in grads if g[path] is not None)
        np.testing.assert_allclose(after[path], value - LR * plain, atol=1e-6, err_msg=path)


def _weights(model):
    return {v.path: np.array(v.numpy()) for v in model.weight_variables}


@pytest.mark.parametrize("reduction", ["pair", "sample"])
@pytest.mark.parametrize("unit", ["task", "pair"])
def test_units_sum_to_the_training_loss(enc, unit, reduction):
    features, labels = next(iter(batches(enc, "train", 200)))
    rng = np.random.default_rng(1)
    probs = {t: tf.constant(rng.uniform(0.05, 0.95, (200, 1)), tf.float32) for t in enc.schema.tasks}
    weights = {enc.schema.tasks[0]: 2.0}
    units = unit_losses(labels, probs, features["domain_id"], enc.schema.num_domains, enc.schema.tasks, weights,
                        reduction, unit)
    assert len(units) == (len(enc.schema.tasks) * (enc.schema.num_domains if unit == "pair" else 1))
    total = mdmt_loss(labels, probs, features["domain_id"], enc.schema.num_domains, enc.schema.tasks, weights,
                      reduction)
    assert float(sum(units)) == pytest.approx(float(total), rel=1e-6)


def test_uncertainty_weighting_step(enc):
    """L = sum exp(-s) L_u + s / 2: at s = 0 the network takes the plain step and each s_u
    moves by -LR * (1/2 - L_u)."""
    tasks = list(enc.schema.tasks)
    balance = UncertaintyWeighting(tasks, name="loss_balance")
    model, trainer, features, labels = _setup(enc, balance)
    losses, grads = _per_task(model, features, labels, tasks, enc.schema.num_domains)
    _assert_plain_step(model, trainer, features, labels, grads)
    np.testing.assert_allclose(balance.log_variance.numpy(), [-LR * (0.5 - L) for L in losses], atol=1e-6)
    assert balance.weights_now() == pytest.approx([np.exp(LR * (0.5 - L)) for L in losses], rel=1e-5)


def test_gradnorm_step(enc):
    """With w = 1 the network takes the plain step; n_u = |dL_u / dW| over the shared
    weights; at the first step every loss ratio is 1, so the target is mean(n), and w takes
    Adam's first step along sign(n_u - mean(n)) n_u (magnitude LR), then sums to 2."""
    tasks = list(enc.schema.tasks)
    balance = GradNorm(tasks, alpha=1.5, learning_rate=LR, name="loss_balance")
    model, trainer, features, labels = _setup(enc, balance)
    losses, grads = _per_task(model, features, labels, tasks, enc.schema.num_domains)
    shared = [p for p in grads[0] if _shared(grads, p)]
    # the towers and gates stack one slice per task in one variable: reached by both, shared by neither
    assert all(grads[1][p] is not None for p in grads[0] if "tower" in p)
    assert any("expert" in p for p in shared) and not any("tower" in p or "gate" in p for p in shared)
    norms = np.array([np.sqrt(sum(float(np.sum(g[p] ** 2)) for p in shared)) for g in grads])
    _assert_plain_step(model, trainer, features, labels, grads)
    expected = 1.0 - LR * np.sign(norms - norms.mean())
    expected = expected * len(tasks) / expected.sum()
    np.testing.assert_allclose(balance.loss_weights.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(balance.initial_losses.numpy(), losses, rtol=1e-5)
    assert balance.loss_weights.numpy().sum() == pytest.approx(len(tasks))


@pytest.mark.parametrize("relax", [0.7, 1.0])
def test_metabalance_step(enc, relax):
    """Shared weights: g_target + g_aux (r |g_target| / |g_aux| + 1 - r) after one step (the
    moving averages start at 0, so their ratio is the norms'); the towers and gates of each
    task keep their own plain gradient."""
    tasks = list(enc.schema.tasks)
    balance = MetaBalance(tasks, [0], relax=relax, beta=0.9, name="loss_balance")
    model, trainer, features, labels = _setup(enc, balance)
    _, grads = _per_task(model, features, labels, tasks, enc.schema.num_domains)
    before = _weights(model)
    trainer.train_step((features, labels))
    after = _weights(model)
    scaled = 0
    for path, value in before.items():
        target, aux = grads[0][path], grads[1][path]
        if _shared(grads, path):
            ratio = np.linalg.norm(target) / np.linalg.norm(aux)
            step = target + aux * (relax * ratio + 1 - relax)
            scaled += 1
        else:  # one task's weight (its own tower or gate slice): untouched by the balancing
            step = sum(g for g in (target, aux) if g is not None)
        np.testing.assert_allclose(after[path], value - LR * step, atol=1e-6, err_msg=path)
    assert scaled == 3  # the embedding table and the experts' kernel and bias
    index = [v.path for v in trainer.weight_vars]
    path = next(p for p in index if _shared(grads, p))
    i = index.index(path)
    assert balance.target_magnitude.numpy()[i] == pytest.approx(0.1 * np.linalg.norm(grads[0][path]), rel=1e-5)
    assert balance.unit_magnitude.numpy()[i, 1] == pytest.approx(0.1 * np.linalg.norm(grads[1][path]), rel=1e-5)


def test_make_balance_and_config_checks(enc):
    domains, tasks = ["a", "b"], ["click", "like"]
    assert make_balance("none", domains, tasks) is None
    pairs = make_balance("metabalance", domains, tasks, unit="pair", target_task="like")
    assert pairs.units == ["a/click", "a/like", "b/click", "b/like"] and pairs.targets == [1, 3]
    with pytest.raises(ConfigError, match="target task 'buy'"):
        make_balance("metabalance", domains, tasks, target_task="buy")
    with pytest.raises(ConfigError, match="loss balance must be one of"):
        BalanceConfig(method="pcgrad")
    with pytest.raises(ConfigError, match="strategy plain"):
        TrainConfig(strategy="dr", balance=BalanceConfig(method="uwl"))
    with pytest.raises(ConfigError, match="without --strategy-distribute"):
        TrainConfig(distribute="mirrored", balance=BalanceConfig(method="gradnorm"))
    assert TrainConfig.from_dict({"balance": {"method": "gradnorm", "alpha": "0.5"}}).balance.alpha == 0.5


def test_flags_and_a_run_report_the_balance(tmp_path):
    """--loss-balance and its settings reach the run; metrics.json reports the units' final
    weights; the balance's state is in the checkpoint a resumed run restores."""
    import json

    from mdmt_tf.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", "mmoe", "--data", "synthetic:3000", "--epochs", "1", "--batch-size", "256",
                 "--out", str(out), "--loss-balance", "metabalance", "--balance-unit", "pair", "--target-task",
                 "like", "--relax-factor", "0.5", "--param", "embedding_dim=4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["balance"] == {"method": "metabalance", "unit": "pair", "target_task": "like",
                                            "alpha": 1.5, "relax": 0.5, "beta": 0.9}
    report = metrics["balance"]
    assert report["method"] == "MetaBalance" and len(report["units"]) == 6 and report["units"][1] == "0/like"
    assert report["weights"][1] == 1.0 and all(w > 0 for w in report["weights"])
    assert [p["epoch"] for p in report["trajectory"]] == [0, 1] and len(report["trajectory"][1]["weights"]) == 6
    assert (out / "plots" / "balance_weights.png").stat().st_size > 5000
    names = [n for n, _ in tf.train.list_variables(str(out / "checkpoints" / "last"))]
    assert any("unit_magnitude" in n or "loss_balance" in n for n in names), names[:20]
