"""MDMTHyperModel: a keras_tuner.HyperModel per registered model family.

`build(hp)` returns the real trainer (MDMTTrainer, with the bi-level train_step for M3oE)
around a model built from the sampled hyper-parameters; `fit` trains it with exact
validation metrics and early stopping, and the objective is `val_mean_auc` (maximised),
logged every epoch by mdmt_tf.training.callbacks.ValidationMetrics. A trial whose objective
is NaN (a NaN or infinite validation prediction, see training.evaluation) fails, naming the
pairs with non-finite predictions: Keras Tuner scores a trial by its first epoch unless a
later one is greater, and nothing is greater than NaN (Keras's EarlyStopping likewise keeps a
NaN first epoch as its best), so a NaN first epoch is the trial's objective; a NaN later
epoch is only a worse epoch.

Hyper-parameter names are the models' own (num_shared_experts, expert_units...), widths
lists written "256,64"; training ones are prefixed "train." (train.learning_rate,
train.arch_learning_rate, train.arch_mode, train.loss_balance: the loss balancing method,
searched with --strategy plain). `split_values` turns a tuner's values back into
(model params, training settings), the shape `mdmt train --hparams` reads.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import keras
import keras_tuner as kt

from mdmt_tf.errors import ConfigError
from mdmt_tf.models import MODELS, ModelConfig, build_model
from mdmt_tf.training.callbacks import ValidationMetrics

OBJECTIVE = "val_mean_auc"
TRAIN_PREFIX = "train."
SCHEDULE_PREFIX = "tuner/"  # Hyperband's bookkeeping values (tuner/epochs, tuner/trial_id...): not the model's
UNIT_KEYS = ("expert_units", "tower_units", "bottom_units", "units", "star_units", "aux_units", "network_units",
             "forward_units", "scenario_expert_units", "task_expert_units", "scenario_units",
             "shared_units", "pair_units")


def _units(hp, name: str, choices: list[str]) -> str:
    return hp.Choice(name, choices)


def _common(hp) -> None:
    hp.Choice("embedding_dim", [8, 16, 32])
    hp.Choice("embedding_l2", [0.0, 1e-6, 1e-5])
    hp.Choice("oov_rate", [0.0, 0.05, 0.1])  # cold start: how often training rows see the OOV ids


def _m3oe(hp) -> None:
    _common(hp)
    hp.Choice("num_shared_experts", [2, 4, 8])
    _units(hp, "expert_units", ["64", "128", "256,64"])  # on the 256-wide bottom; the authors': 64
    _units(hp, "tower_units", ["64", "32"])
    hp.Choice("arch_granularity", ["scalar", "vector"])
    hp.Choice("dropout", [0.0, 0.1])
    hp.Choice("shared_gate", ["network", "dselect_k"])  # "gating" is M3oE's softmax / aftb choice
    _dselect(hp)


def _dselect(hp) -> None:  # k <= 2: every gate of these spaces sees >= 2 experts
    hp.Choice("dselect_k", [1, 2])
    hp.Choice("dselect_entropy", [0.0, 1e-3, 1e-2])


def _m3oe_family(hp) -> None:
    _m3oe(hp)
    hp.Choice("gating", ["softmax", "aftb"])


def _stem(hp) -> None:
    _common(hp)
    hp.Choice("num_shared_experts", [1, 2, 4])
    hp.Choice("num_task_experts", [1, 2])
    _units(hp, "expert_units", ["256,64", "128,32"])
    hp.Choice("num_layers", [1, 2])
    hp.Choice("gate_input", ["sum", "concat"])


def _mmoe(hp) -> None:
    _common(hp)
    hp.Int("num_experts", 2, 8, step=2)
    _units(hp, "expert_units", ["256,64", "128,32", "512,64"])
    _units(hp, "tower_units", ["64", "32"])
    hp.Choice("gating", ["softmax", "dselect_k"])
    _dselect(hp)


def _ple(hp) -> None:
    _common(hp)
    hp.Choice("num_levels", [2, 3])
    hp.Choice("num_task_experts", [1, 2])
    hp.Choice("num_shared_experts", [1, 2, 4])
    _units(hp, "expert_units", ["256,64", "128,32"])
    hp.Choice("gating", ["softmax", "dselect_k"])
    _dselect(hp)


def _star(hp) -> None:
    _common(hp)
    _units(hp, "star_units", ["256,128,64", "128,64", "512,256"])


def _pepnet(hp) -> None:
    _common(hp)
    _units(hp, "tower_units", ["128,64", "256,128,64", "64"])
    hp.Choice("gate_hidden_units", [32, 64, 128])


def _adi(hp) -> None:
    _common(hp)
    hp.Choice("num_shared_networks", [2, 4, 8])
    _units(hp, "network_units", ["256,128", "128,64", "512,256"])
    _units(hp, "forward_units", ["64", "128,64"])
    _units(hp, "tower_units", ["32", "64"])
    hp.Choice("interest_adaptation", ["se", "domain", "none"])
    hp.Boolean("dsbn", default=True)
    hp.Choice("dropout", [0.0, 0.1])


def _aesm2(hp) -> None:
    _common(hp)
    hp.Choice("num_scenario_experts", [4, 8])
    hp.Choice("num_task_experts", [4, 8])
    hp.Choice("num_task_layers", [1, 2])
    hp.Choice("top_k_specific", [1, 2])
    hp.Choice("top_k_shared", [1, 2])
    hp.Choice("noise_std", [0.0, 0.1, 0.5])
    hp.Choice("specific_loss_weight", [0.0, 0.1, 0.5])
    hp.Choice("shared_loss_weight", [0.0, 0.1, 0.5])
    _units(hp, "scenario_expert_units", ["256,128", "128,64", "128"])
    _units(hp, "task_expert_units", ["64", "32"])
    _units(hp, "tower_units", ["32", "64"])


def _m2m(hp) -> None:
    _common(hp)
    hp.Choice("num_experts", [2, 4, 8])
    _units(hp, "expert_units", ["256,64", "128,64", "64,32"])
    _units(hp, "scenario_units", ["32", "64,32"])
    hp.Choice("num_meta_unit_layers", [1, 2, 3])
    hp.Choice("num_tower_layers", [1, 2, 3])
    hp.Choice("activation", ["relu", "leaky_relu"])
    hp.Choice("dropout", [0.0, 0.1])


def _musenet(hp) -> None:
    _common(hp)
    hp.Choice("num_scenarios", [2, 4, 8])
    _units(hp, "scenario_units", ["64,16", "32,8"])
    _units(hp, "expert_units", ["256,64", "128,64", "64"])
    _units(hp, "shared_units", ["256,64", "128,64"])
    _units(hp, "tower_units", ["64", "32"])
    hp.Choice("temperature", [0.1, 0.3, 1.0])
    hp.Choice("gumbel_tau", [0.5, 1.0, 2.0])
    hp.Choice("prototype_weight", [0.0, 0.1, 1.0])


def _mtms(hp) -> None:
    _common(hp)
    _units(hp, "pair_units", ["64", "32", "64,32"])
    _units(hp, "network_units", ["128,64", "256,128", "64"])
    hp.Choice("network_inputs", ["scenario", "task", "all"])
    hp.Choice("stage_epochs", [1, 2, 3])  # <= the patience: the tuner's EarlyStopping cannot end stage 1


def _sass(hp) -> None:
    _common(hp)
    hp.Choice("sat_units", [64, 32, 128])
    hp.Choice("num_sat_layers", [3, 2])
    _units(hp, "tower_units", ["64", "32", "64,32"])
    hp.Choice("temperature", [0.1, 0.2, 0.05])
    # <= the patience: the tuner's EarlyStopping must not end a trial in pre-training (whose
    # validation AUC is that of untrained towers); 0 is SASS-Base (no pre-training)
    hp.Choice("pretrain_epochs", [1, 2, 0])


def _bottom(hp) -> None:
    _common(hp)
    _units(hp, "bottom_units", ["256,128", "512,256", "128"])


def _mlp(hp) -> None:
    _common(hp)
    _units(hp, "units", ["256,128,64", "128,64", "512,256"])


def _esmm(hp) -> None:
    _common(hp)
    _units(hp, "tower_units", ["128,64", "256,128", "64"])
    hp.Choice("counterfactual", ["none", "ips", "dr"])  # ESCM²'s regulariser (none = ESMM)
    hp.Choice("counterfactual_weight", [0.1, 0.5, 1.0])


def _escm2(hp) -> None:
    _common(hp)
    _units(hp, "tower_units", ["128,64", "256,128", "64"])
    hp.Choice("counterfactual_weight", [0.1, 0.5, 1.0])
    hp.Choice("propensity_clip", [0.01, 0.05, 0.1])


def _aitm(hp) -> None:
    _common(hp)
    _units(hp, "tower_units", ["128,64,32", "64,32", "256,128,64"])
    hp.Choice("calibrator_weight", [0.0, 0.3, 0.6, 1.0])


# model name -> the function declaring its search space (a read-only table)
SPACES = {"m3oe": _m3oe_family, "m3oe_aftb": _m3oe, "stem": _stem, "mlp": _mlp, "shared_bottom": _bottom,
          "mmoe": _mmoe, "omoe": _mmoe, "me_mmoe": _mmoe, "ple": _ple, "me_ple": _ple, "star": _star,
          "pepnet": _pepnet, "adi": _adi, "aesm2": _aesm2, "m2m": _m2m, "musenet": _musenet,
          "mtms": _mtms, "sass": _sass, "esmm": _esmm, "escm2": _escm2, "aitm": _aitm}


def _declare_training(hp, has_architecture: bool, balances: Sequence[str] = ()) -> None:
    hp.Float(TRAIN_PREFIX + "learning_rate", 3e-4, 1e-2, sampling="log")
    if has_architecture:
        hp.Float(TRAIN_PREFIX + "arch_learning_rate", 1e-4, 3e-2, sampling="log")
        hp.Choice(TRAIN_PREFIX + "arch_mode", ["bilevel", "joint", "fixed"])
    if len(balances) > 1:
        hp.Choice(TRAIN_PREFIX + "loss_balance", list(balances))


def searchable_balances(train_config) -> tuple[str, ...]:
    """The loss balancing methods a search may try under `train_config`: every one with
    --strategy plain (gradnorm and metabalance only without a distribution strategy), none
    with MAMDR's strategies (which refuse balancing)."""
    from mdmt_tf.training.options import BALANCES

    if train_config.strategy != "plain":
        return ()
    if train_config.distribute != "none":
        return ("none", "uwl")
    return BALANCES


def split_values(values: dict) -> tuple[dict, dict]:
    """Tuner values -> (model params, training settings); "256,64" -> [256, 64]. Hyperband's
    schedule values (tuner/epochs, tuner/initial_epoch, tuner/trial_id...) are dropped."""
    model, train = {}, {}
    for name, value in values.items():
        if name.startswith(SCHEDULE_PREFIX):
            continue
        if name == TRAIN_PREFIX + "loss_balance":  # TrainConfig's balance.method
            train["balance"] = {"method": value}
        elif name.startswith(TRAIN_PREFIX):
            train[name[len(TRAIN_PREFIX):]] = value
        elif name in UNIT_KEYS and isinstance(value, str):
            model[name] = [int(u) for u in value.split(",") if u]
        else:
            model[name] = value
    return model, train


def values_from_config(config: dict) -> dict:
    """A keras_tuner HyperParameters config (TFX's best_hyperparameters) -> its values."""
    return dict(kt.HyperParameters.from_config(config).values)


class MDMTHyperModel(kt.HyperModel):
    """Search space and training of one model family on encoded data.

    fixed: hyper-parameters pinned to a value (hp.Fixed); pinning all of them leaves
    nothing to search, which is an error.
    """

    def __init__(self, model_name: str, encoded, train_config, fixed: dict | None = None, verbose: int = 0):
        if model_name not in MODELS:
            raise ConfigError(f"unknown model {model_name!r}; valid models: {list(MODELS)}")
        super().__init__(name=model_name)
        self.model_name, self.encoded, self.train_config = model_name, encoded, train_config
        self.fixed, self.verbose = dict(fixed or {}), verbose
        probe = build_model(ModelConfig(model_name, {}), encoded.schema)
        self.has_architecture = bool(probe.architecture_variables)
        # a model trained in stages (MTMS) trains without loss balancing
        self.balances = searchable_balances(train_config) if len(probe.stages) == 1 else ()
        space = kt.HyperParameters()  # the free space, without the pinned values
        SPACES[model_name](space)
        _declare_training(space, self.has_architecture, self.balances)
        unknown = sorted(set(self.fixed) - set(space.values))
        if unknown:
            raise ConfigError(f"cannot fix {unknown}: not in the {model_name} search space "
                              f"{sorted(space.values)}")
        if all(name in self.fixed for name in space.values):
            raise ConfigError(f"the {model_name} search space is empty: every hyper-parameter is fixed "
                              f"({sorted(self.fixed)})")

    def declare(self, hp) -> None:
        for name, value in self.fixed.items():
            hp.Fixed(name, value)
        SPACES[self.model_name](hp)
        _declare_training(hp, self.has_architecture, self.balances)

    def config_for(self, values: dict) -> tuple[ModelConfig, dict]:
        params, train = split_values(values)
        return ModelConfig(self.model_name, params), train

    def build(self, hp):
        from mdmt_tf.training.factory import make_trainer
        from mdmt_tf.training.runtime import resolve_precision

        self.declare(hp)
        model_config, train = self.config_for(hp.values)
        c, enc = self.train_config, self.encoded
        if "balance" in train:  # the trial's loss balancing, with the run's other balance settings
            c = dataclasses.replace(c, balance=dataclasses.replace(c.balance, **train["balance"]))
        keras.utils.set_random_seed(c.seed)  # as `mdmt train --seed`: a trial is reproducible from its values
        model = build_model(model_config, enc.schema, dtype=resolve_precision(c.precision))
        # the trainer `mdmt train` builds (held-out architecture batches included), with the trial's values;
        # its training batches are kept for fit(), which Keras Tuner calls next with this trainer
        setup = make_trainer(model, enc, c, c.seed, learning_rate=train.get("learning_rate"),
                             arch_learning_rate=train.get("arch_learning_rate"), arch_mode=train.get("arch_mode"))
        self._train_batches = setup.train
        setup.trainer.compile()
        return setup.trainer

    def fit(self, hp, model, *args, callbacks=None, epochs=None, initial_epoch=0, **kwargs):

        c, enc = self.train_config, self.encoded
        validation = ValidationMetrics.of(model.net, enc, c.eval_batch_size)
        stop = keras.callbacks.EarlyStopping(monitor=OBJECTIVE, mode="max", patience=c.patience)
        train = self._train_batches
        # the validation callback first: the tuner's callbacks read the objective from the logs
        history = model.fit(train, epochs=epochs or c.epochs, initial_epoch=initial_epoch,
                            callbacks=[validation, stop, *(callbacks or [])], verbose=self.verbose, shuffle=False)
        check_objective(history.history, validation.results)
        return history


def check_objective(logs: dict, results: Sequence[dict] = ()) -> None:
    """logs: the History's {name: [per epoch]}; results: ValidationMetrics.results (why it is NaN)."""
    if OBJECTIVE not in logs:
        raise ConfigError(f"the objective {OBJECTIVE} was never logged; logged: {sorted(logs)}")
    values = logs[OBJECTIVE]
    if values and math.isnan(values[0]):  # the trial's score (see the module docstring)
        bad = results[0].get("nonfinite_predictions") if results else None
        why = (f"non-finite predictions in {', '.join(f'{k} ({n} rows)' for k, n in bad.items())}" if bad else
               "no (domain, task) pair of the validation split has both classes" if results else
               "no per-pair results to say why")
        epochs = "" if all(math.isnan(v) for v in values) else f" in epoch 1 of {len(values)}"
        raise ConfigError(f"validation mean AUC is NaN{epochs}: {why}")
