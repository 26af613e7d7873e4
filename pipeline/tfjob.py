"""Multi-worker training on Kubeflow: the pipeline's Trainer as a TFJob of the Kubeflow
Training Operator (kubeflow.org/v1), running the same module file's run_fn on N workers.

With `tfjob: {workers: N, ...}` in the pipeline config, the Trainer's executor
(TFJobTrainerExecutor) writes the run's arguments (TFX's FnArgs: data files, Transform
graph, output directories, custom config, tuned hyper-parameters) as JSON into the run
directory, submits a TFJob whose N Worker replicas each run

    python -m mdmt_tf pipeline tfjob-worker --fn-args <model_run>/fn_args.json

(the operator sets TF_CONFIG; worker 0 is the chief, which alone exports the model where
the Trainer's Model artifact expects it), and waits for the job to succeed or fail. The
training itself is `mdmt train`'s MultiWorkerMirroredStrategy path: loss scaled per replica,
every worker resuming from the chief's epoch checkpoint after a restart, so the default
`restartPolicy: OnFailure` is safe (a failed worker's peers fail too and are restarted).

The executor talks to the Kubernetes API of the cluster it runs in (the service account
token and CA of its pod; it needs RBAC to create and get `tfjobs` in the namespace). The
paths must be on storage every pod reaches (gs://, s3://, a shared volume). The managed
alternative on Google Cloud is the Vertex AI Trainer extension
(tfx.extensions.google_cloud_ai_platform.Trainer with a worker pool), not wired here.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from tfx.components.trainer.executor import GenericExecutor

from .config import PipelineConfig

# the TFJob v1 API's values (kubeflow.org/v1, training-operator)
REPLICA_TYPES = ("Chief", "Master", "Worker", "PS", "Evaluator")
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
CLEAN_POD_POLICIES = ("All", "Running", "None")
CONTAINER = "tensorflow"  # the container the operator gives TF_CONFIG and the port
SETTINGS = {"workers": 2, "namespace": "kubeflow", "image": None, "restart_policy": "OnFailure",
            "backoff_limit": 3, "resources": {}, "poll_seconds": 30, "timeout_seconds": 7 * 24 * 3600}


def settings(values: dict | None) -> dict:
    """The pipeline config's `tfjob` mapping with its defaults; a ConfigError for a bad value."""
    from mdmt_tf.errors import ConfigError

    values = dict(values or {})
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"pipeline config 'tfjob' has unknown key(s) {unknown}; valid: {sorted(SETTINGS)}")
    merged = {**SETTINGS, **values}
    if not isinstance(merged["workers"], int) or merged["workers"] < 1:
        raise ConfigError(f"tfjob.workers must be a positive integer, got {merged['workers']!r}")
    if merged["restart_policy"] not in RESTART_POLICIES:
        raise ConfigError(f"tfjob.restart_policy must be one of {list(RESTART_POLICIES)}, got "
                          f"{merged['restart_policy']!r}")
    return merged


def tfjob_manifest(name: str, fn_args_uri: str, image: str, tfjob: dict) -> dict:
    """The TFJob resource: `workers` Worker replicas running the tfjob-worker entry point."""
    container: dict[str, Any] = {
        "name": CONTAINER, "image": image,
        "command": ["python", "-m", "mdmt_tf", "pipeline", "tfjob-worker", "--fn-args", fn_args_uri]}
    if tfjob.get("resources"):
        container["resources"] = tfjob["resources"]
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "TFJob",
        "metadata": {"name": name, "namespace": tfjob["namespace"], "labels": {"app.kubernetes.io/part-of": "mdmt"}},
        "spec": {
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": int(tfjob["backoff_limit"])},
            "tfReplicaSpecs": {"Worker": {
                "replicas": int(tfjob["workers"]), "restartPolicy": tfjob["restart_policy"],
                "template": {"metadata": {"annotations": {"sidecar.istio.io/inject": "false"}},
                             "spec": {"containers": [container]}}}},
        },
    }


def validate_manifest(manifest: dict) -> list[str]:
    """What in a TFJob manifest the v1 API would refuse or the operator would not run ([] if
    nothing): the kind, replica types and counts, restart and clean-pod policies, and a
    container named "tensorflow" with an image in every replica."""
    problems = []
    if manifest.get("apiVersion") != "kubeflow.org/v1" or manifest.get("kind") != "TFJob":
        problems.append("apiVersion/kind must be kubeflow.org/v1 / TFJob")
    name = manifest.get("metadata", {}).get("name", "")
    if not name or len(name) > 63 or not all(c.isalnum() or c == "-" for c in name) or not name[0].isalpha() \
            or name != name.lower():
        problems.append(f"metadata.name {name!r} must be a DNS-1035 label (lower case, <= 63 characters)")
    spec = manifest.get("spec", {})
    policy = spec.get("runPolicy", {}).get("cleanPodPolicy", "None")
    if policy not in CLEAN_POD_POLICIES:
        problems.append(f"runPolicy.cleanPodPolicy {policy!r} not in {CLEAN_POD_POLICIES}")
    replicas = spec.get("tfReplicaSpecs") or {}
    if not replicas:
        problems.append("spec.tfReplicaSpecs is empty")
    for kind, replica in replicas.items():
        if kind not in REPLICA_TYPES:
            problems.append(f"replica type {kind!r} not in {REPLICA_TYPES}")
        if not isinstance(replica.get("replicas"), int) or replica["replicas"] < 1:
            problems.append(f"{kind}.replicas must be a positive integer")
        if replica.get("restartPolicy", "Never") not in RESTART_POLICIES:
            problems.append(f"{kind}.restartPolicy {replica.get('restartPolicy')!r} not in {RESTART_POLICIES}")
        containers = replica.get("template", {}).get("spec", {}).get("containers", [])
        main = [c for c in containers if c.get("name") == CONTAINER]
        if not main:
            problems.append(f"{kind} has no container named {CONTAINER!r} (the operator configures that one)")
        elif not main[0].get("image"):
            problems.append(f"{kind}'s {CONTAINER!r} container has no image")
    return problems


class KubernetesAPI:
    """The few calls the executor makes, over the Kubernetes REST API with the pod's service
    account (in-cluster credentials)."""

    ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"

    def __init__(self):
        import requests

        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            from mdmt_tf.errors import ConfigError

            raise ConfigError("the TFJob Trainer runs inside a Kubernetes pod (KUBERNETES_SERVICE_HOST is unset)")
        self.base = f"https://{host}:{port}/apis/kubeflow.org/v1/namespaces"
        with open(f"{self.ACCOUNT}/token") as handle:
            self.session = requests.Session()
            self.session.headers["Authorization"] = f"Bearer {handle.read().strip()}"
        self.session.verify = f"{self.ACCOUNT}/ca.crt"

    def create(self, manifest: dict) -> None:
        namespace = manifest["metadata"]["namespace"]
        response = self.session.post(f"{self.base}/{namespace}/tfjobs", json=manifest, timeout=60)
        response.raise_for_status()

    def conditions(self, namespace: str, name: str) -> list[dict]:
        response = self.session.get(f"{self.base}/{namespace}/tfjobs/{name}", timeout=60)
        response.raise_for_status()
        return response.json().get("status", {}).get("conditions", [])


def wait_for(api, namespace: str, name: str, poll_seconds: float, timeout_seconds: float, sleep=time.sleep) -> None:
    """Until the TFJob's newest condition is Succeeded (return) or Failed (RuntimeError)."""
    waited = 0.0
    while waited <= timeout_seconds:
        conditions = [c for c in api.conditions(namespace, name) if c.get("status") == "True"]
        state = conditions[-1] if conditions else {}
        if state.get("type") == "Succeeded":
            return
        if state.get("type") == "Failed":
            raise RuntimeError(f"TFJob {namespace}/{name} failed: {state.get('reason')}: {state.get('message')}")
        sleep(poll_seconds)
        waited += poll_seconds
    raise RuntimeError(f"TFJob {namespace}/{name} did not finish in {timeout_seconds} s")


def fn_args_payload(fn_args) -> dict:
    """What a worker needs of TFX's FnArgs, as JSON (run_fn reads only these)."""
    custom = dict(fn_args.custom_config or {})
    custom["train"] = {**custom.get("train", {}), "distribute": "multiworker"}
    custom.pop("tfjob", None)
    return {"train_files": list(fn_args.train_files), "eval_files": list(fn_args.eval_files),
            "transform_graph_path": fn_args.transform_graph_path, "serving_model_dir": fn_args.serving_model_dir,
            "model_run_dir": fn_args.model_run_dir, "custom_config": custom,
            "hyperparameters": fn_args.hyperparameters}


def run_worker(fn_args_uri: str) -> None:
    """A TFJob worker: load the FnArgs JSON and call the module file's run_fn (TF_CONFIG is the
    operator's)."""
    import types

    import tensorflow as tf

    from mdmt_tf._project import project_module

    with tf.io.gfile.GFile(fn_args_uri) as handle:
        payload = json.load(handle)
    project_module("components.module").run_fn(types.SimpleNamespace(**payload))


class TFJobTrainerExecutor(GenericExecutor):
    """The Trainer's executor that trains on N workers as a TFJob (see the module doc)."""

    api_factory = KubernetesAPI

    def Do(self, input_dict, output_dict, exec_properties):  # noqa: N802 (TFX's name)
        import tensorflow as tf

        fn_args = self._GetFnArgs(input_dict, output_dict, exec_properties)
        tfjob = settings((fn_args.custom_config or {}).get("tfjob"))
        uri = f"{fn_args.model_run_dir}/fn_args.json"
        tf.io.gfile.makedirs(fn_args.model_run_dir)
        with tf.io.gfile.GFile(uri, "w") as handle:
            json.dump(fn_args_payload(fn_args), handle)
        name = f"mdmt-trainer-{int(time.time())}"
        image = tfjob["image"] or os.environ.get("MDMT_IMAGE") or PipelineConfig.kubeflow_image
        manifest = tfjob_manifest(name, uri, image, tfjob)
        problems = validate_manifest(manifest)
        if problems:
            raise RuntimeError(f"TFJob manifest refused: {problems}")
        api = self.api_factory()
        api.create(manifest)
        wait_for(api, tfjob["namespace"], name, tfjob["poll_seconds"], tfjob["timeout_seconds"])
