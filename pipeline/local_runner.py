"""Run the pipeline locally: LocalDagRunner, ML Metadata in SQLite, Beam's DirectRunner
in_memory by default (fastest on a small machine); --beam-arg passes anything else
(e.g. --direct_running_mode=multi_processing --direct_num_workers=4, or a Flink / Spark /
Dataflow runner's flags)."""
from __future__ import annotations

from pathlib import Path

from .config import PipelineConfig
from .pipeline import create_pipeline


def run(config: PipelineConfig, beam_args: list[str] | None = None):
    """Run the pipeline once; returns pipeline.results.RunSummary."""
    from absl import logging
    from tfx import v1 as tfx

    from .preflight import check_csv_inputs
    from .results import summarize

    check_csv_inputs(config)
    logging.set_verbosity(logging.INFO)
    Path(config.metadata_path).parent.mkdir(parents=True, exist_ok=True)
    Path(config.pipeline_root).mkdir(parents=True, exist_ok=True)
    metadata = tfx.orchestration.metadata.sqlite_metadata_connection_config(config.metadata_path)
    from .beam_args import check_beam_args

    check_beam_args([*config.beam_args, *(beam_args or [])], "--beam-arg")
    pipeline = create_pipeline(config, metadata, beam_pipeline_args=[*config.beam_args, *(beam_args or [])])
    tfx.orchestration.LocalDagRunner().run(pipeline)
    return summarize(config.metadata_path, config.dataset_spec.domain)
