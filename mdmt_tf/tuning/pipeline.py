"""The pipeline Tuner's side of tuning: a tuner over the pipeline's artifacts (TFX tuner_fn)."""
from __future__ import annotations

from mdmt_tf.spec import DatasetSpec
from mdmt_tf.training.fit import TrainConfig
from mdmt_tf.training.transformed import encoded_from_artifacts
from mdmt_tf.tuning.hypermodel import MDMTHyperModel
from mdmt_tf.tuning.search import make_tuner


def tuner_for_artifacts(*, train_files, eval_files, transform_output_dir: str, working_dir: str, spec: dict,
                        model: dict, train: dict, tune: dict):
    """-> (keras_tuner tuner, fit kwargs) for TFX's TunerFnResult. `tune`: tuner, max_trials,
    epochs (per trial), seed."""
    dataset_spec = DatasetSpec.from_dict(spec)
    encoded = encoded_from_artifacts(train_files, eval_files, transform_output_dir, dataset_spec)
    config = TrainConfig.from_dict({**train, "epochs": int(tune.get("epochs", train.get("epochs", 5)))})
    hypermodel = MDMTHyperModel(model["name"], encoded, config, fixed=tune.get("fixed"))
    tuner = make_tuner(hypermodel, tune.get("tuner", "random"), working_dir, int(tune.get("max_trials", 3)),
                       int(tune.get("seed", 0)), overwrite=True, max_epochs=config.epochs)
    return tuner, {}
