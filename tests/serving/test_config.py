"""serving/config/*.config parse as TF Serving's protos; deployment files are consistent."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mdmt_tf.errors import ConfigError
from serving.config_protos import message_class, parse_config

SERVING = Path(__file__).resolve().parents[2] / "serving"
CONFIG = SERVING / "config"
IMAGE, GPU_IMAGE = "tensorflow/serving:2.21.0", "tensorflow/serving:2.21.0-gpu"


def test_models_config():
    from tensorflow_serving.config import model_server_config_pb2

    config = parse_config(CONFIG / "models.config", "ModelServerConfig")
    assert isinstance(config, model_server_config_pb2.ModelServerConfig)
    (model,) = config.model_config_list.config
    assert model.name == "mdmt" and model.base_path == "/models/mdmt" and model.model_platform == "tensorflow"
    assert model.model_version_policy.WhichOneof("policy_choice") == "latest"
    assert model.model_version_policy.latest.num_versions == 2
    assert dict(model.version_labels) == {"stable": 1, "canary": 2}


def test_batching_config():
    config = parse_config(CONFIG / "batching.config", "BatchingParameters")
    assert config.DESCRIPTOR.full_name == "tensorflow.serving.BatchingParameters"
    assert config.max_batch_size.value == 4096 and config.batch_timeout_micros.value > 0
    assert config.num_batch_threads.value >= 1 and config.max_enqueued_batches.value >= 1
    sizes = list(config.allowed_batch_sizes)
    assert sizes == sorted(sizes) and sizes[-1] == config.max_batch_size.value  # TF Serving's rule


def test_monitoring_config():
    config = parse_config(CONFIG / "monitoring.config", "MonitoringConfig")
    assert config.DESCRIPTOR.full_name == "tensorflow.serving.MonitoringConfig"
    assert config.prometheus_config.enable and config.prometheus_config.path == "/monitoring/prometheus/metrics"


def test_declared_messages_reject_what_tf_serving_would(tmp_path):
    bad = tmp_path / "batching.config"
    bad.write_text("max_batch_size { value: 8 }\nmax_batch_sise { value: 8 }\n")
    with pytest.raises(ConfigError, match="max_batch_sise"):
        parse_config(bad, "BatchingParameters")
    bad.write_text("max_batch_size: 8\n")  # a wrapper message, not a scalar
    with pytest.raises(ConfigError, match="batching.config"):
        parse_config(bad, "BatchingParameters")
    with pytest.raises(ConfigError, match="unknown TF Serving config message"):
        message_class("NoSuchConfig")
    # the binary encoding matches TF Serving's field numbers: max_batch_size = 1, Int64Value.value = 1
    assert message_class("BatchingParameters")(max_batch_size={"value": 8}).SerializeToString() == b"\n\x02\x08\x08"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize("compose,image,gpu", [("docker-compose.yml", IMAGE, False),
                                               ("docker-compose.gpu.yml", GPU_IMAGE, True)])
def test_compose_files(compose, image, gpu):
    service = yaml.safe_load((SERVING / compose).read_text())["services"]["tfserving"]
    assert service["image"] == image
    assert {"8500:8500", "8501:8501"} <= set(service["ports"])
    command = " ".join(service["command"])
    for flag in ("--model_config_file=/config/models.config", "--monitoring_config_file=/config/monitoring.config",
                 "--batching_parameters_file=/config/batching.config", "--enable_batching=true"):
        assert flag in command
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    assert bool(devices) == gpu and (not gpu or devices[0]["capabilities"] == ["gpu"])


@pytest.mark.parametrize("name,image,gpu", [("deployment.yaml", IMAGE, False),
                                            ("deployment-gpu.yaml", GPU_IMAGE, True)])
def test_k8s_deployments(name, image, gpu):
    (deployment,) = [d for d in _docs(SERVING / "k8s" / name) if d["kind"] == "Deployment"]
    (container,) = _containers(deployment)
    assert container["image"] == image
    assert {p["containerPort"] for p in container["ports"]} == {8500, 8501}
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/v1/models/mdmt" and probe["port"] in (8501, "http")
    limits = container["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == gpu


def test_k8s_service_and_mounts():
    docs = {d["metadata"]["name"]: d for d in _docs(SERVING / "k8s" / "service.yaml")}
    assert {p["port"] for p in docs["mdmt-serving"]["spec"]["ports"]} == {8500, 8501}
    assert docs["mdmt-serving-headless"]["spec"]["clusterIP"] == "None"
    (claim,) = _docs(SERVING / "k8s" / "storage.yaml")
    for name in ("deployment.yaml", "deployment-gpu.yaml"):
        (deployment,) = _docs(SERVING / "k8s" / name)
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["config"]["configMap"]["name"] == "mdmt-serving-config"
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        args = " ".join(_containers(deployment)[0]["args"])
        assert "--model_config_file=/config/models.config" in args and "--enable_batching=true" in args
