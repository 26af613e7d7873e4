"""Beam arguments for other runners are passed through and checked (no cluster here)."""
import pytest

from mdmt_tf.errors import ConfigError
from pipeline.beam_args import check_beam_args

FLINK = ["--runner=FlinkRunner", "--flink_master=flink:8081", "--environment_type=DOCKER",
         "--environment_config=registry/mdmt:0.1.0"]
SPARK = ["--runner=SparkRunner", "--spark_master_url=spark://spark:7077", "--environment_type=DOCKER",
         "--environment_config=registry/mdmt:0.1.0"]
DATAFLOW = ["--runner=DataflowRunner", "--project=p", "--region=europe-west1", "--temp_location=gs://b/tmp",
            "--sdk_container_image=registry/mdmt:0.1.0", "--experiments=use_runner_v2"]


@pytest.mark.parametrize("args", [FLINK, SPARK, DATAFLOW, ["--direct_running_mode=multi_processing",
                                                            "--direct_num_workers=2"]])
def test_the_documented_flags_parse(args):
    options = check_beam_args(args)
    for arg in args:
        name, value = arg[2:].split("=", 1)
        assert str(options[name]) == value or value in str(options[name])


def test_a_typo_or_a_missing_flag_is_named():
    with pytest.raises(ConfigError, match=r"does not know \['--flink_mastr'\]"):
        check_beam_args(["--runner=FlinkRunner", "--flink_mastr=flink:8081"])
    with pytest.raises(ConfigError, match=r"DataflowRunner needs \['--region'\]"):
        check_beam_args([a for a in DATAFLOW if not a.startswith("--region")])
    with pytest.raises(ConfigError, match="gs:// path"):
        check_beam_args([*DATAFLOW[:3], "--temp_location=/tmp/x"])


def test_the_compiled_kubeflow_pipeline_carries_them(tmp_path):
    import json

    from mdmt_tf.cli import main
    from mdmt_tf.data.synthetic import synthetic_spec

    spec = tmp_path / "spec.yaml"
    synthetic_spec().to_yaml(spec)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"beam_args": DATAFLOW}))
    out = tmp_path / "p.json"
    assert main(["pipeline", "compile", "--runner", "kubeflow", "--out", str(out), "--config", str(config),
                 "--data-root", "gs://b/data", "--data-format", "csv", "--spec", str(spec),
                 "--pipeline-root", "gs://b/root", "--serving-dir", "gs://b/serving", "--root", str(tmp_path)]) == 0
    text = out.read_text()
    assert all(flag in text for flag in DATAFLOW)
    config.write_text(json.dumps({"beam_args": ["--runner=DataflowRunner", "--project=p"]}))
    assert main(["pipeline", "compile", "--runner", "kubeflow", "--out", str(out), "--config", str(config),
                 "--data-root", "gs://b/data", "--data-format", "csv", "--spec", str(spec),
                 "--root", str(tmp_path)]) == 2
