"""Checks of the Beam pipeline arguments the components get (`beam_args` in the pipeline
config, `--beam-arg` on the local runner): flags Beam does not know (a typo would otherwise
be dropped with a log line, deep in a run) and, per runner, the flags it cannot start
without. Only the arguments are checked here: no Flink, Spark or Dataflow cluster is at hand.
"""
from __future__ import annotations

from mdmt_tf.errors import ConfigError

# runner -> flags it needs (Dataflow: where to run and stage; the portable runners: the job
# server's address and an SDK environment every worker can start)
REQUIRED = {
    "DataflowRunner": ("project", "region", "temp_location"),
    "FlinkRunner": ("flink_master",),
    "SparkRunner": ("spark_master_url",),
}


def check_beam_args(args: list[str], where: str = "beam_args") -> dict:
    """The parsed options ({name: value}, defaults dropped); a ConfigError naming unknown
    flags or a runner's missing ones."""
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(list(args))
    known = options.get_all_options(drop_default=True, retain_unknown_options=False)
    every = options.get_all_options(drop_default=True, retain_unknown_options=True)
    unknown = sorted(set(every) - set(known))
    if unknown:
        raise ConfigError(f"{where}: Beam does not know {['--' + u for u in unknown]} (a typo?); see "
                          "`python -m apache_beam.examples.wordcount --help` for the flags of this Beam")
    runner = str(known.get("runner") or "DirectRunner")
    missing = [flag for flag in REQUIRED.get(runner, ()) if not known.get(flag)]
    if missing:
        raise ConfigError(f"{where}: --runner={runner} needs {['--' + m for m in missing]}")
    if runner == "DataflowRunner" and not str(known["temp_location"]).startswith("gs://"):
        raise ConfigError(f"{where}: --temp_location must be a gs:// path for Dataflow, got {known['temp_location']!r}")
    return known
