"""Compile the pipeline for Kubeflow Pipelines (KFP v2 IR, offline) with KubeflowV2DagRunner.

The same create_pipeline as the local runner. Inside the cluster every component runs in
the container image built from pipeline/Dockerfile, where this repository lives at
/opt/mdmt_tf; so the module file is referenced by its path in the image and TFX is told
not to package it (UNSUPPORTED_DO_NOT_PACKAGE_USER_MODULES, which also keeps compilation
offline). data_root, pipeline_root and serving_dir must be URIs the cluster can reach
(gs://, s3://, a mounted volume).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .config import PipelineConfig
from .pipeline import create_pipeline

IMAGE_MODULE_FILE = "/opt/mdmt_tf/components/module.py"


def compile_pipeline(config: PipelineConfig, output_file: str | Path, image: str | None = None,
                     module_file: str = IMAGE_MODULE_FILE) -> Path:
    from tfx import v1 as tfx

    os.environ.setdefault("UNSUPPORTED_DO_NOT_PACKAGE_USER_MODULES", "1")
    config = dataclasses.replace(config, module_file=module_file)
    if config.tfjob and not config.tfjob.get("image"):  # the TFJob's workers run the pipeline's image
        config = dataclasses.replace(config, tfjob={**config.tfjob, "image": image or config.kubeflow_image})
    runner_config = tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(
        default_image=image or config.kubeflow_image)
    output = Path(output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
        config=runner_config, output_dir=str(output.parent), output_filename=output.name)
    runner.run(create_pipeline(config, beam_pipeline_args=list(config.beam_args)), write_out=True)
    return output
