"""The multi-worker Trainer on Kubeflow: the TFJob manifest, its executor, the compiled pipeline."""
import json
import types

import pytest

from mdmt_tf.cli import main
from mdmt_tf.data.synthetic import synthetic_spec
from pipeline import tfjob


def test_the_manifest_is_a_valid_tfjob():
    settings = tfjob.settings({"workers": 4, "namespace": "ml", "resources": {"limits": {"cpu": "8"}}})
    manifest = tfjob.tfjob_manifest("mdmt-trainer-1", "gs://b/run/fn_args.json", "example.com/mdmt:1", settings)
    assert tfjob.validate_manifest(manifest) == []
    worker = manifest["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4 and worker["restartPolicy"] == "OnFailure"
    (container,) = worker["template"]["spec"]["containers"]
    assert container["name"] == "tensorflow" and container["resources"] == {"limits": {"cpu": "8"}}
    assert container["command"][-2:] == ["--fn-args", "gs://b/run/fn_args.json"]
    assert manifest["metadata"]["namespace"] == "ml"


def test_validation_names_what_the_operator_would_refuse():
    good = tfjob.tfjob_manifest("ok", "u", "img", tfjob.settings({}))
    bad = json.loads(json.dumps(good))
    bad["metadata"]["name"] = "Bad_Name"
    bad["spec"]["tfReplicaSpecs"]["Worker"]["restartPolicy"] = "Sometimes"
    bad["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "main"
    bad["spec"]["tfReplicaSpecs"]["Boss"] = bad["spec"]["tfReplicaSpecs"]["Worker"]
    problems = " | ".join(tfjob.validate_manifest(bad))
    for fragment in ("DNS-1035", "restartPolicy 'Sometimes'", "no container named 'tensorflow'", "'Boss'"):
        assert fragment in problems
    with pytest.raises(Exception, match="tfjob.workers"):
        tfjob.settings({"workers": 0})
    with pytest.raises(Exception, match="unknown key"):
        tfjob.settings({"replicas": 2})


class FakeAPI:
    def __init__(self, states):
        self.states, self.created = list(states), []

    def create(self, manifest):
        self.created.append(manifest)

    def conditions(self, namespace, name):
        state = self.states.pop(0)
        return [{"type": "Created", "status": "True"}] + ([{"type": state, "status": "True", "reason": "r",
                                                            "message": "m"}] if state else [])


def _executor(tmp_path, states, monkeypatch):
    fn_args = types.SimpleNamespace(
        train_files=["gs://b/train/*"], eval_files=["gs://b/eval/*"], transform_graph_path="gs://b/transform",
        serving_model_dir="gs://b/serving", model_run_dir=str(tmp_path / "run"), hyperparameters=None,
        custom_config={"train": {"epochs": 2}, "tfjob": {"workers": 3, "poll_seconds": 0}})
    executor = tfjob.TFJobTrainerExecutor()
    monkeypatch.setattr(executor, "_GetFnArgs", lambda *args: fn_args)
    api = FakeAPI(states)
    executor.api_factory = lambda: api
    return executor, api


def test_the_executor_submits_the_job_and_waits_for_it(tmp_path, monkeypatch):
    executor, api = _executor(tmp_path, [None, "Running", "Succeeded"], monkeypatch)
    executor.Do({}, {}, {})
    (manifest,) = api.created
    assert tfjob.validate_manifest(manifest) == [] and manifest["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] == 3
    payload = json.loads((tmp_path / "run" / "fn_args.json").read_text())
    assert payload["custom_config"]["train"] == {"epochs": 2, "distribute": "multiworker"}
    assert "tfjob" not in payload["custom_config"] and payload["train_files"] == ["gs://b/train/*"]
    assert api.states == []  # polled until Succeeded

    failing, api = _executor(tmp_path, ["Running", "Failed"], monkeypatch)
    with pytest.raises(RuntimeError, match="failed: r: m"):
        failing.Do({}, {}, {})


def test_a_worker_runs_the_module_files_run_fn(tmp_path, monkeypatch):
    seen = {}
    module = types.SimpleNamespace(run_fn=lambda fn_args: seen.update(vars(fn_args)))
    monkeypatch.setattr("mdmt_tf._project.project_module", lambda name: module if name == "components.module"
                        else __import__("pipeline.tfjob", fromlist=["x"]))
    path = tmp_path / "fn_args.json"
    path.write_text(json.dumps({"train_files": ["t"], "custom_config": {"train": {"distribute": "multiworker"}}}))
    assert main(["pipeline", "tfjob-worker", "--fn-args", str(path)]) == 0
    assert seen == {"train_files": ["t"], "custom_config": {"train": {"distribute": "multiworker"}}}


def test_compile_with_workers_runs_the_trainer_as_a_tfjob(tmp_path):
    spec = tmp_path / "spec.yaml"
    synthetic_spec().to_yaml(spec)
    out = tmp_path / "pipeline.json"
    code = main(["pipeline", "compile", "--runner", "kubeflow", "--out", str(out), "--root", str(tmp_path / "local"),
                 "--image", "example.com/mdmt:7", "--data-root", "gs://b/data", "--pipeline-root", "gs://b/root",
                 "--serving-dir", "gs://b/serving", "--data-format", "csv", "--spec", str(spec), "--workers", "4"])
    assert code == 0
    text = out.read_text()
    assert "TFJobTrainerExecutor" in text and '\\"workers\\": 4' in text and "example.com/mdmt:7" in text
