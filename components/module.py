"""The TFX module file of the mdmt_tf pipeline: preprocessing_fn, run_fn, tuner_fn.

Each function only converts TFX's arguments into plain values and delegates to mdmt_tf.
`custom_config` (set by pipeline/pipeline.py) carries the dataset spec, the model config
and the training config as plain dicts.
"""
from __future__ import annotations


def preprocessing_fn(inputs, custom_config):
    from mdmt_tf.spec import DatasetSpec
    from mdmt_tf.transform import preprocessing_fn as mdmt_preprocessing

    return mdmt_preprocessing(inputs, DatasetSpec.from_dict(custom_config["spec"]),
                              min_count=int(custom_config.get("min_count", 1)))


def run_fn(fn_args):
    from mdmt_tf.training.transformed import train_from_artifacts

    config = fn_args.custom_config
    tuned = None
    if fn_args.hyperparameters:  # the Tuner's best: a keras_tuner HyperParameters config
        from mdmt_tf.tuning.hypermodel import values_from_config

        tuned = values_from_config(fn_args.hyperparameters)
    train_from_artifacts(train_files=fn_args.train_files, eval_files=fn_args.eval_files,
                         transform_output_dir=fn_args.transform_graph_path,
                         serving_model_dir=fn_args.serving_model_dir, run_dir=fn_args.model_run_dir,
                         spec=config["spec"], model=config["model"], train=config["train"], tuned_values=tuned)


def tuner_fn(fn_args):
    from tfx import v1 as tfx

    from mdmt_tf.tuning.pipeline import tuner_for_artifacts

    config = fn_args.custom_config
    tuner, fit_kwargs = tuner_for_artifacts(
        train_files=fn_args.train_files, eval_files=fn_args.eval_files,
        transform_output_dir=fn_args.transform_graph_path, working_dir=fn_args.working_dir,
        spec=config["spec"], model=config["model"], train=config["train"], tune=config.get("tune", {}))
    return tfx.components.TunerFnResult(tuner=tuner, fit_kwargs=fit_kwargs)
