"""serving: the production client for TF Serving, its configs and deployment files.

This package's API is the client (REST and gRPC):

    from serving import ServingClient, ServingError, ModelInfo

  serving.client        ServingClient: predict / status / metadata / model_info over REST or gRPC
  serving.codec         the client's REST JSON codec
  serving.errors        ServingError, ModelInfoUnavailable
  serving.scoring       score a file with a server or a SavedModel (`mdmt predict`)
  serving.config/       models.config, batching.config, monitoring.config for TF Serving
  serving.config_protos parse those files as TF Serving's protos
  docker-compose*.yml, k8s/   TF Serving deployments (CPU and GPU)

  serving.devserver     the DEVELOPMENT STAND-IN for tensorflow_model_server (`mdmt serve`),
                        fenced off: nothing above imports it.

See serving/README.md. Imports mdmt_tf, never tfx.
"""
from .client import ModelInfo, ServingClient
from .errors import ModelInfoUnavailable, ServingError

__all__ = ["ModelInfo", "ModelInfoUnavailable", "ServingClient", "ServingError"]
