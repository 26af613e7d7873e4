"""Every model x every MAMDR strategy trains a step and serves under float32 and under
mixed_bfloat16 (what `--precision auto` picks on CPUs with native bfloat16). Serving under
mixed_bfloat16 once crashed for M3oE, M3oE-AFTB and STAR: theta_d read as bfloat16 inside
the serving wrapper's autocast scope, added to a float32 variable that is not autocast."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from mdmt_tf.models import build_model, model_names
from mdmt_tf.training.mamdr import DN, DR, PLAIN, STRATEGIES, MAMDRTrainer, control
from tests.training.conftest import values

# small widths: the point is dtypes, not learning
SMALL = {
    "m3oe": {"embedding_dim": 4, "bottom_units": [16, 8], "expert_units": [8], "tower_units": [4],
             "num_shared_experts": 2},
    "m3oe_aftb": {"embedding_dim": 4, "bottom_units": [16, 8], "expert_units": [8], "tower_units": [4],
                  "num_shared_experts": 2},
    "stem": {"embedding_dim": 4, "expert_units": [8], "tower_units": [4], "gate_units": [8]},
    "mlp": {"embedding_dim": 4, "units": [8]},
    "shared_bottom": {"embedding_dim": 4, "bottom_units": [8], "tower_units": [4]},
    "mmoe": {"embedding_dim": 4, "num_experts": 2, "expert_units": [8], "tower_units": [4]},
    "omoe": {"embedding_dim": 4, "num_experts": 2, "expert_units": [8], "tower_units": [4]},
    "me_mmoe": {"embedding_dim": 4, "num_experts": 2, "expert_units": [8], "tower_units": [4]},
    "ple": {"embedding_dim": 4, "expert_units": [8], "tower_units": [4]},
    "me_ple": {"embedding_dim": 4, "expert_units": [8], "tower_units": [4]},
    "star": {"embedding_dim": 4, "star_units": [8, 4], "aux_units": [4]},
    "pepnet": {"embedding_dim": 4, "tower_units": [8], "gate_hidden_units": 8},
    "adi": {"embedding_dim": 4, "num_shared_networks": 2, "network_units": [8], "forward_units": [4],
            "tower_units": [4]},
    "aesm2": {"embedding_dim": 4, "num_scenario_experts": 3, "num_task_experts": 3, "scenario_expert_units": [8],
              "task_expert_units": [4], "tower_units": [4], "top_k_specific": 1, "top_k_shared": 1},
    "m2m": {"embedding_dim": 4, "num_experts": 2, "expert_units": [8], "scenario_units": [4],
            "num_meta_unit_layers": 1, "num_tower_layers": 1},
    "musenet": {"embedding_dim": 4, "num_scenarios": 2, "scenario_units": [4], "expert_units": [8],
                "shared_units": [8], "tower_units": [4]},
    "mtms": {"embedding_dim": 4, "pair_units": [4], "network_units": [8]},
    "sass": {"embedding_dim": 4, "sat_units": 8, "num_sat_layers": 1, "tower_units": [4]},
    "esmm": {"embedding_dim": 4, "tower_units": [8]},
    "escm2": {"embedding_dim": 4, "tower_units": [8]},
    "aitm": {"embedding_dim": 4, "tower_units": [8, 4]},
}


def _rows(enc, split, d, size):
    rows = np.flatnonzero(enc.domain[split] == d)[:size]
    return ({k: tf.constant(v[rows]) for k, v in enc.features[split].items()},
            {k: tf.constant(v[rows]) for k, v in enc.labels[split].items()})


def test_every_model_has_small_widths():
    assert sorted(SMALL) == sorted(model_names())


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", model_names())
def test_a_step_and_serving_under_each_precision(enc, name, strategy, precision):
    keras.utils.set_random_seed(0)
    model = build_model(name, enc.schema, SMALL[name], dtype=precision)
    trainer = MAMDRTrainer(model, strategy=strategy, granularity="batch", inner_lr=0.01)
    theta = values(model.trainable_variables)
    domain_0, domain_1 = _rows(enc, "train", 0, 48), _rows(enc, "train", 1, 48)
    shared = control(DN, 0, begin=1, end=1) if trainer.use_dn else control(PLAIN, 0)
    trainer.train_step((*domain_0, shared))
    if trainer.use_dr:  # one DR update of theta_0 with support domain 1
        trainer.train_step((*domain_1, control(DR, 0, begin=1)))
        trainer.train_step((*domain_0, control(DR, 0, end=1, last=1)))
    assert np.isfinite(float(trainer.loss_tracker.result()))
    after = values(model.trainable_variables)
    assert all(np.all(np.isfinite(v)) for v in after)
    assert any(not np.array_equal(a, b) for a, b in zip(theta, after))
    for delta, i in zip(trainer.deltas, trainer.specific):
        assert delta.dtype == model.trainable_variables[i].dtype == "float32"
    if trainer.use_dr:
        moved = [np.abs(np.array(delta)[0]).max() for delta in trainer.deltas]
        assert max(moved) > 0 and all(np.all(np.array(delta)[1:] == 0) for delta in trainer.deltas)

    # the serving model once, on a test batch (eagerly: the same call as validation's
    # tf.function, at a tenth of the cost)
    features = {k: tf.constant(v[:64]) for k, v in enc.features["test"].items()}
    scores = trainer.serving_model()(features, training=False)
    for task in enc.schema.tasks:
        assert tuple(scores[task].shape) == (64, 1) and scores[task].dtype == "float32"
        assert np.all((np.asarray(scores[task]) >= 0) & (np.asarray(scores[task]) <= 1))
