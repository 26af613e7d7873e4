"""The pipeline Tuner's side of tuning: a tuner over the pipeline's artifacts (TFX tuner_fn)."""
from __future__ import annotations

from pathlib import Path

from mdmt_tf.spec import DatasetSpec
from mdmt_tf.training.config import TrainConfig
from mdmt_tf.training.transformed import data_from_artifacts
from mdmt_tf.tuning.hypermodel import MDMTHyperModel
from mdmt_tf.tuning.search import make_tuner


def tuner_for_artifacts(*, train_files, eval_files, transform_output_dir: str, working_dir: str, spec: dict,
                        model: dict, train: dict, tune: dict):
    """-> (keras_tuner tuner, fit kwargs) for TFX's TunerFnResult. `tune`: tuner, max_trials,
    epochs (per trial), seed. max_trials: the trials of random / bayesian (default 3); for
    hyperband a cap on its schedule (absent: the whole schedule, see search.hyperband_schedule)."""
    dataset_spec = DatasetSpec.from_dict(spec)
    config = TrainConfig.from_dict({**train, "epochs": int(tune.get("epochs", train.get("epochs", 5)))})
    encoded = data_from_artifacts(train_files, eval_files, transform_output_dir, dataset_spec, config)
    hypermodel = MDMTHyperModel(model["name"], encoded, config, fixed=tune.get("fixed"))
    kind = tune.get("tuner", "random")
    max_trials = tune.get("max_trials", None if kind == "hyperband" else 3)
    tuner = make_tuner(hypermodel, kind, Path(working_dir), None if max_trials is None else int(max_trials),
                       int(tune.get("seed", 0)), overwrite=True, max_epochs=config.epochs)
    return tuner, {}
