"""The TFX pipeline of mdmt_tf: config, create_pipeline, local and Kubeflow runners."""
