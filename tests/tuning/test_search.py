import csv
import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from mdmt_tf.errors import ConfigError
from mdmt_tf.models import ModelConfig
from mdmt_tf.training.fit import train
from mdmt_tf.tuning.hypermodel import MDMTHyperModel, check_objective, split_values, values_from_config
from mdmt_tf.tuning.search import distributed_environment, run_search
from tests.tuning.conftest import CONFIG, SMALL


def test_split_values_and_tuner_configs():
    import keras_tuner as kt

    params, train_values = split_values({"num_experts": 4, "expert_units": "256,64", "train.learning_rate": 0.01})
    assert params == {"num_experts": 4, "expert_units": [256, 64]} and train_values == {"learning_rate": 0.01}
    hp = kt.HyperParameters()
    hp.Choice("num_experts", [2, 4])
    assert values_from_config(hp.get_config()) == {"num_experts": 2}


def test_search_space_errors(tuning_data):
    _, encoded = tuning_data
    with pytest.raises(ConfigError, match="unknown model"):
        MDMTHyperModel("m4oe", encoded, CONFIG)
    with pytest.raises(ConfigError, match="not in the mmoe search space"):
        MDMTHyperModel("mmoe", encoded, CONFIG, fixed={"num_shared_experts": 4})
    every = {"embedding_dim": 8, "embedding_l2": 0.0, "oov_rate": 0.0, "num_experts": 2, "expert_units": "128,32",
             "tower_units": "32", "gating": "softmax", "dselect_k": 1, "dselect_entropy": 0.0,
             "train.learning_rate": 0.001, "train.loss_balance": "none"}
    with pytest.raises(ConfigError, match="search space is empty"):
        MDMTHyperModel("mmoe", encoded, CONFIG, fixed=every)
    with pytest.raises(ConfigError, match="never logged; logged: \\['loss'\\]"):
        check_objective({"loss": [1.0]})


@pytest.mark.slow
def test_random_search_best_reproduces_with_mdmt_train(tuning_data, tmp_path):
    data, encoded = tuning_data
    best = run_search("mmoe", encoded, CONFIG, tmp_path / "search", max_trials=3, fixed=SMALL)
    rows = (tmp_path / "search" / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and all(",COMPLETED," in r for r in rows[1:])
    saved = yaml.safe_load((tmp_path / "search" / "best_hparams.yaml").read_text())
    assert saved == json.loads((tmp_path / "search" / "best_hparams.json").read_text()) == best
    assert (tmp_path / "search" / "objective.png").stat().st_size > 5000

    # retrain from the file, as `mdmt train --hparams` does
    config = dataclasses.replace(CONFIG, learning_rate=saved["train"]["learning_rate"],
                                 balance=dataclasses.replace(CONFIG.balance, **saved["train"].get("balance", {})))
    payload = train(ModelConfig(saved["name"], saved["params"]), data, config, tmp_path / "retrain", verbose=0,
                    export=False, plots=False)
    assert payload["val"]["mean_auc"] == pytest.approx(saved["objective"]["value"], abs=0.01)


@pytest.mark.slow
def test_search_resumes_and_failed_trials_are_recorded(tuning_data, tmp_path):
    _, encoded = tuning_data

    class Flaky(MDMTHyperModel):
        """Fails the first real trial (build call 1 only discovers the search space)."""

        calls = 0

        def build(self, hp):
            Flaky.calls += 1
            if Flaky.calls == 2:
                raise MemoryError("simulated out of memory")
            return super().build(hp)

    out = tmp_path / "search"
    first = run_search("mmoe", encoded, CONFIG, out, max_trials=2, fixed={**SMALL, "embedding_dim": 16})
    again = run_search("mmoe", encoded, CONFIG, out, max_trials=3, fixed={**SMALL, "embedding_dim": 16})
    trials = (out / "trials.csv").read_text().splitlines()[1:]
    assert len(trials) == 3 and first["objective"]["value"] <= again["objective"]["value"]

    import mdmt_tf.tuning.search as search

    original = search.MDMTHyperModel
    search.MDMTHyperModel = Flaky
    try:
        report = run_search("mmoe", encoded, CONFIG, tmp_path / "flaky", max_trials=3,
                            fixed={**SMALL, "embedding_dim": 8})
    finally:
        search.MDMTHyperModel = original
    rows = (tmp_path / "flaky" / "trials.csv").read_text().splitlines()[1:]
    failed = [r for r in rows if ",FAILED," in r]
    assert len(failed) == 1 and "simulated out of memory" in failed[0]
    assert report["objective"]["value"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_chief_and_two_workers(tmp_path):
    port = _free_port()
    common = [sys.executable, "-m", "mdmt_tf", "tune", "--model", "mmoe", "--data", "synthetic:3000",
              "--out", str(tmp_path / "search"), "--max-trials", "4", "--epochs", "1", "--batch-size", "512",
              "--fix", "embedding_dim=4", "--fix", "expert_units=128,32", "--precision", "float32",
              "--oracle-port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    chief = subprocess.Popen([*common, "--distributed", "chief"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    workers = [subprocess.Popen([*common, "--distributed", "worker", "--tuner-id", f"tuner{i}"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [w.communicate(timeout=900) for w in workers]
    chief_out, chief_err = chief.communicate(timeout=300)
    assert chief.returncode == 0, chief_err[-2000:]
    ran = {}  # worker -> the trials it ran, from its trial log (written as each trial ends, before the oracle hears)
    for i, (worker, (out, err)) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, err[-2000:]
        log = tmp_path / "search" / "trial_log" / f"tuner{i}.csv"
        ran[f"tuner{i}"] = [line.split(",") for line in log.read_text().splitlines()] if log.exists() else []
        assert f"worker tuner{i}: done (ran trials: {', '.join(t for t, _ in ran[f'tuner{i}']) or 'none'})" in out
    assert {p.stem for p in (tmp_path / "search" / "trial_log").iterdir()} <= {"tuner0", "tuner1"}  # not the chief
    with open(tmp_path / "search" / "trials.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ids = [r["trial"] for r in rows]
    assert len(ids) == 4 == len(set(ids)) and all(r["status"] == "COMPLETED" for r in rows)
    runs = [trial for trials in ran.values() for trial, status in trials]
    assert sorted(runs) == sorted(ids)  # every trial ran, and none ran twice (also not on both workers)
    assert all(status == "COMPLETED" for trials in ran.values() for _, status in trials)
    assert {r["trial"]: r["tuner"] for r in rows} == {t: w for w, trials in ran.items() for t, _ in trials}


def test_distributed_environment():
    assert distributed_environment("chief", "127.0.0.1", 9000) == {
        "KERASTUNER_TUNER_ID": "chief", "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": "9000"}
    with pytest.raises(ConfigError, match="own tuner id"):
        distributed_environment("worker", "127.0.0.1", 9000)
