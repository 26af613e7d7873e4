"""serving: TF Serving client, development stand-in server, configs and deployment files.

  serving.client        ServingClient: predict / status / metadata over REST or gRPC
  serving.local_server  DEVELOPMENT STAND-IN for tensorflow_model_server (production: TF Serving)
  serving.scoring       score a file with a server or a SavedModel (`mdmt predict`)
  serving.config/       models.config, batching.config, monitoring.config for TF Serving
  docker-compose*.yml, k8s/   TF Serving deployments (CPU and GPU)

See serving/README.md. Imports mdmt_tf, never tfx.
"""
