"""An M3oE trial trains with the library trainer's bi-level train_step: architecture steps
run on held-out batches and move alpha / beta away from their initial value."""
import dataclasses

import numpy as np

from mdmt_tf.training.trainer import MDMTTrainer
from mdmt_tf.tuning.hypermodel import MDMTHyperModel
from mdmt_tf.tuning.search import make_tuner, run_search
from tests.tuning.conftest import CONFIG

FIXED = {"embedding_dim": 4, "expert_units": "16,8", "tower_units": "8", "num_shared_experts": 2,
         "gating": "softmax", "shared_gate": "network", "dselect_k": 1, "dselect_entropy": 0.0,
         "arch_granularity": "vector", "train.arch_mode": "bilevel"}


def test_m3oe_trial_runs_the_bilevel_train_step(tuning_data, tmp_path):
    _, encoded = tuning_data
    config = dataclasses.replace(CONFIG, epochs=1)
    out = tmp_path / "search"
    best = run_search("m3oe", encoded, config, out, max_trials=1, fixed=FIXED)
    assert best["train"]["arch_mode"] == "bilevel" and best["train"]["epochs"] == 1

    # reopen the search (overwrite=False reloads the oracle) and load the trial's saved best weights
    hypermodel = MDMTHyperModel("m3oe", encoded, config, fixed=FIXED)
    tuner = make_tuner(hypermodel, "random", out, 1, 0, overwrite=False, max_epochs=1)
    trial = tuner.oracle.get_trial(best["objective"]["trial"])
    assert trial.metrics.get_last_value("arch_loss") > 0  # logged by MDMTTrainer.train_step
    trained = tuner.load_model(trial)
    initial = hypermodel.build(trial.hyperparameters)  # the same values and seed, untrained
    assert isinstance(trained, MDMTTrainer) and trained.arch_mode == "bilevel" and trained.searching

    # the weights train on the 90 % of training rows that the architecture's held-out slice leaves
    weight_rows = encoded.rows("train") - max(1, round(0.1 * encoded.rows("train")))
    assert config.arch_data == "holdout:0.1"
    steps = -(-weight_rows // config.batch_size)
    assert int(trained.weight_steps.numpy()) == steps == int(trained.arch_steps.numpy())  # arch_period 1
    assert int(initial.arch_steps.numpy()) == 0
    names = [v.path for v in trained.net.architecture_variables]
    assert any("alpha" in n for n in names) and any("beta" in n for n in names)
    for before, after in zip(initial.net.architecture_variables, trained.net.architecture_variables):
        before, after = np.asarray(before), np.asarray(after)
        assert np.all(before == 1.0)  # arch_init
        assert np.abs(after - before).max() > 1e-3, f"{before} -> {after}"
