"""`mdmt tune` then `mdmt train --hparams best_hparams.yaml`, through the CLI entry point."""
import json

import yaml

from mdmt_tf.cli import build_parser, main
from mdmt_tf.cli.train import model_config_from_args, train_config_from_args

DATA = ["--data", "synthetic:3000", "--precision", "float32"]


def test_mdmt_train_hparams_trains_the_best_configuration(tmp_path, capsys):
    search = tmp_path / "search"
    assert main(["tune", "--model", "mmoe", *DATA, "--out", str(search), "--max-trials", "2", "--epochs", "1",
                 "--patience", "1", "--batch-size", "512", "--fix", "embedding_dim=4",
                 "--fix", "expert_units=16,8"]) == 0
    assert "use: mdmt train --hparams" in capsys.readouterr().out
    best = yaml.safe_load((search / "best_hparams.yaml").read_text())
    assert best["train"]["epochs"] == 1 and best["train"]["patience"] == 1 and best["train"]["batch_size"] == 512
    assert best["params"]["expert_units"] == [16, 8] and {"num_experts", "tower_units"} <= set(best["params"])

    run = tmp_path / "run"  # the budget flags repeat the search's: `--hparams` does not apply them yet (see below)
    assert main(["train", "--hparams", str(search / "best_hparams.yaml"), *DATA, "--out", str(run),
                 "--epochs", "1", "--patience", "1", "--batch-size", "512"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == best["name"] == "mmoe"
    for key, value in best["params"].items():
        assert metrics["model_config"]["params"][key] == value, key
    for key, value in best["train"].items():  # a nested setting (balance: {method}) sets its keys
        got = metrics["config"][key]
        assert (value.items() <= got.items()) if isinstance(value, dict) else got == value, key
    run_config = json.loads((run / "run_config.json").read_text())
    assert run_config["model"] == {"name": "mmoe", "params": best["params"]}


def _train_args(tmp_path, *flags):
    best = {"name": "mmoe", "params": {"embedding_dim": 4, "expert_units": [16, 8]},
            "train": {"learning_rate": 0.004, "epochs": 3, "patience": 1, "batch_size": 512},
            "objective": {"name": "val_mean_auc", "value": 0.6, "trial": "0"}}  # as search.write_report writes it
    path = tmp_path / "best_hparams.yaml"
    path.write_text(yaml.safe_dump(best))
    args = build_parser().parse_args(["train", "--hparams", str(path), "--out", str(tmp_path / "run"), *flags])
    return best, model_config_from_args(args), train_config_from_args(args)


def test_hparams_explicit_flags_win(tmp_path):
    best, model, config = _train_args(tmp_path, "--lr", "0.01", "--epochs", "7", "--patience", "2",
                                      "--batch-size", "64", "--param", "embedding_dim=8")
    assert model.params == {**best["params"], "embedding_dim": 8}
    assert (config.learning_rate, config.epochs, config.patience, config.batch_size) == (0.01, 7, 2, 64)


def test_hparams_apply_the_search_budget(tmp_path):
    best, model, config = _train_args(tmp_path)
    assert model.params == best["params"] and config.learning_rate == 0.004
    assert (config.epochs, config.patience, config.batch_size) == (3, 1, 512)


def test_flags_not_given_leave_trainconfig_defaults(tmp_path):
    import dataclasses

    from mdmt_tf.cli.train import BALANCE_FLAGS, MAMDR_FLAGS, TRAIN_FLAGS
    from mdmt_tf.training.config import BalanceConfig, MAMDRConfig, TrainConfig

    args = build_parser().parse_args(["train", "--out", str(tmp_path / "run")])
    assert train_config_from_args(args) == TrainConfig()
    # every setting has its flag (task weights: --task-weight), every flag names a setting
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"task_weights", "mamdr", "balance"}
    assert set(TRAIN_FLAGS.values()) == fields
    assert set(MAMDR_FLAGS.values()) == {f.name for f in dataclasses.fields(MAMDRConfig)}
    assert set(BALANCE_FLAGS.values()) == {f.name for f in dataclasses.fields(BalanceConfig)}
    assert all(hasattr(args, flag) for flag in [*TRAIN_FLAGS, *MAMDR_FLAGS, *BALANCE_FLAGS])


def test_hparams_apply_every_train_setting(tmp_path):
    """A search's file may hold any TrainConfig setting (not only the budget and learning rates)."""
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump({"name": "mlp", "params": {},
                                    "train": {"min_count": 3, "arch_period": 2, "loss_reduction": "sample",
                                              "mamdr": {"k": 3}}}))
    args = build_parser().parse_args(["train", "--hparams", str(path), "--out", str(tmp_path / "run"),
                                      "--mamdr-dr-lr", "0.25"])
    config = train_config_from_args(args)
    assert (config.min_count, config.arch_period, config.loss_reduction) == (3, 2, "sample")
    assert (config.mamdr.k, config.mamdr.dr_lr) == (3, 0.25)
