"""create_pipeline: the pipeline's wiring, one definition for every runner.

ExampleGen -> StatisticsGen -> SchemaGen (+ SchemaCurator) | ImportSchemaGen -> ExampleValidator
-> AnomalyGate -> Transform -> [Tuner] -> Trainer -> Evaluator (vs the last blessed model)
-> Pusher (only with the Evaluator's blessing).
"""
from __future__ import annotations

import json
from pathlib import Path

import tensorflow_model_analysis as tfma
from tfx import v1 as tfx

from .config import PipelineConfig, is_remote
from .custom_components import AnomalyGate, SchemaCurator

SPLITS = {"train": ("train",), "eval": ("val", "eval"), "test": ("test",)}


def _input_config(config: PipelineConfig):
    """Honour a train / val / test file split; else None (ExampleGen hashes 8:1:1). A remote
    data_root is not listed: it must hold train*, val* and test* files (e.g. train.csv, or
    train-00000-of-00008.tfrecord.gz shards)."""
    if is_remote(config.data_root):
        return tfx.proto.Input(splits=[tfx.proto.Input.Split(name=split, pattern=f"{stems[0]}*")
                                       for split, stems in SPLITS.items()])
    root = Path(config.data_root)
    if not root.is_dir():
        return tfx.proto.Input(splits=[tfx.proto.Input.Split(name="single", pattern=root.name)])
    names = [p.name for p in root.iterdir()]
    splits = []
    for split, stems in SPLITS.items():
        match = next((n for n in sorted(names) for stem in stems if n.startswith(stem + ".")), None)
        if match is None:
            return None
        splits.append(tfx.proto.Input.Split(name=split, pattern=match))
    return tfx.proto.Input(splits=splits)


def _example_gen(config: PipelineConfig):
    input_config = _input_config(config)
    root = Path(config.data_root)
    base = config.data_root if is_remote(config.data_root) else str(root if root.is_dir() else root.parent)
    output_config = None
    if input_config is None or input_config.splits[0].name == "single":
        output_config = tfx.proto.Output(split_config=tfx.proto.SplitConfig(splits=[
            tfx.proto.SplitConfig.Split(name="train", hash_buckets=8),
            tfx.proto.SplitConfig.Split(name="eval", hash_buckets=1),
            tfx.proto.SplitConfig.Split(name="test", hash_buckets=1)]))
        input_config = tfx.proto.Input(splits=[tfx.proto.Input.Split(
            name="single", pattern=root.name if not root.is_dir() else "*")])
    if config.format == "tfrecord":
        return tfx.components.ImportExampleGen(input_base=base, input_config=input_config,
                                               output_config=output_config)
    return tfx.components.CsvExampleGen(input_base=base, input_config=input_config, output_config=output_config)


def eval_config(config: PipelineConfig) -> tfma.EvalConfig:
    """AUC / logloss / count / mean prediction per task, overall and sliced by domain;
    blessing thresholds: AUC >= auc_floor for every task, no drop larger than max_auc_drop vs
    the baseline, and a mean prediction in [0, 1]: TFMA scores +-inf predictions a finite AUC
    (end buckets of its histogram), but their mean is +-inf (NaN fails every bound). A NaN
    prediction makes TFMA's AUC raise, so the Evaluator fails and nothing is blessed."""
    spec = config.dataset_spec
    threshold = tfma.MetricThreshold(
        value_threshold=tfma.GenericValueThreshold(lower_bound={"value": config.auc_floor}),
        change_threshold=tfma.GenericChangeThreshold(direction=tfma.MetricDirection.HIGHER_IS_BETTER,
                                                     absolute={"value": -config.max_auc_drop}))
    probability = tfma.MetricThreshold(value_threshold=tfma.GenericValueThreshold(
        lower_bound={"value": 0.0}, upper_bound={"value": 1.0}))
    metrics_specs = [tfma.MetricsSpec(output_names=[task], metrics=[
        tfma.MetricConfig(class_name="ExampleCount"),
        tfma.MetricConfig(class_name="AUC", threshold=threshold),
        tfma.MetricConfig(class_name="BinaryCrossentropy"),
        tfma.MetricConfig(class_name="MeanPrediction", threshold=probability)]) for task in spec.tasks]
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(signature_name="serving_default", model_type="tf_generic",
                                    label_keys={task: task for task in spec.tasks})],
        slicing_specs=[tfma.SlicingSpec(), tfma.SlicingSpec(feature_keys=[spec.domain])],
        metrics_specs=metrics_specs)


def create_pipeline(config: PipelineConfig, metadata_connection_config=None,
                    beam_pipeline_args: list[str] | None = None) -> tfx.dsl.Pipeline:
    custom_config = config.custom_config()
    example_gen = _example_gen(config)
    examples = example_gen.outputs["examples"]
    statistics_gen = tfx.components.StatisticsGen(examples=examples)
    if config.schema_path:
        schema_gen = tfx.components.ImportSchemaGen(schema_file=config.schema_path)
        curator = None
        schema = schema_gen.outputs["schema"]
    else:
        schema_gen = tfx.components.SchemaGen(statistics=statistics_gen.outputs["statistics"],
                                              infer_feature_shape=True)
        curator = SchemaCurator(schema=schema_gen.outputs["schema"], spec=json.dumps(custom_config["spec"]))
        schema = curator.outputs["curated_schema"]
    validator = tfx.components.ExampleValidator(statistics=statistics_gen.outputs["statistics"], schema=schema)
    gate = AnomalyGate(anomalies=validator.outputs["anomalies"])
    transform = tfx.components.Transform(examples=examples, schema=schema, module_file=config.module_file,
                                         materialize=False, custom_config=custom_config)
    transform.add_upstream_node(gate)
    tuner = None
    if config.tune:
        tuner = tfx.components.Tuner(
            module_file=config.module_file, examples=examples, transform_graph=transform.outputs["transform_graph"],
            schema=schema, train_args=tfx.proto.TrainArgs(splits=["train"]),
            eval_args=tfx.proto.EvalArgs(splits=["eval"]), custom_config=custom_config)
    trainer_executor = {}
    if config.tfjob:  # N workers as a Kubeflow TFJob running the same module file (pipeline/tfjob.py)
        from tfx.dsl.components.base import executor_spec

        from .tfjob import TFJobTrainerExecutor

        trainer_executor["custom_executor_spec"] = executor_spec.ExecutorClassSpec(TFJobTrainerExecutor)
    trainer = tfx.components.Trainer(
        module_file=config.module_file, examples=examples, transform_graph=transform.outputs["transform_graph"],
        schema=schema, hyperparameters=tuner.outputs["best_hyperparameters"] if tuner else None,
        train_args=tfx.proto.TrainArgs(splits=["train"]), eval_args=tfx.proto.EvalArgs(splits=["eval"]),
        custom_config=custom_config, **trainer_executor)
    resolver = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
    ).with_id("latest_blessed_model_resolver")
    evaluator = tfx.components.Evaluator(examples=examples, model=trainer.outputs["model"],
                                         baseline_model=resolver.outputs["model"], eval_config=eval_config(config),
                                         example_splits=["test"])
    pusher = tfx.components.Pusher(
        model=trainer.outputs["model"], model_blessing=evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=config.serving_dir)))
    components = [c for c in (example_gen, statistics_gen, schema_gen, curator, validator, gate, transform, tuner,
                              trainer, resolver, evaluator, pusher) if c is not None]
    return tfx.dsl.Pipeline(pipeline_name=config.name, pipeline_root=config.pipeline_root, components=components,
                            enable_cache=config.enable_cache, metadata_connection_config=metadata_connection_config,
                            beam_pipeline_args=beam_pipeline_args if beam_pipeline_args is not None
                            else list(config.beam_args))
