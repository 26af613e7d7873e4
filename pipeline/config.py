"""PipelineConfig: the one place that configures the pipeline (YAML in, YAML out)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from mdmt_tf.errors import ConfigError
from mdmt_tf.models import ModelConfig
from mdmt_tf.spec import DatasetSpec
from mdmt_tf.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BEAM_ARGS = ("--direct_running_mode=in_memory", "--direct_num_workers=1")
TRAIN_KEYS = ("epochs", "batch_size", "learning_rate", "arch_learning_rate", "arch_mode", "arch_period",
              "arch_data", "patience", "seed", "loss_reduction", "precision", "min_count", "distribute",
              "serving_precision")


@dataclasses.dataclass
class PipelineConfig:
    """Everything the pipeline needs.

    data_root: a directory with train/val/test CSV (or TFRecord) files, used as the split,
      or a single file split 8:1:1 by ExampleGen's hash buckets.
    spec: the dataset spec (as in spec.yaml). schema_path: a user-curated TFDV schema
      (pbtxt) for ImportSchemaGen; without it the schema is inferred and curated from the spec.
    model: {"name": ..., "params": {...}}; train: TrainConfig fields (epochs, batch_size...).
    tune: run the Tuner first; tuning: its settings (max_trials, tuner, ...).
    tfjob: on Kubeflow, train with N workers as a TFJob of the Training Operator
      ({workers, namespace, image, restart_policy, backoff_limit, resources}: pipeline/tfjob.py);
      empty: the Trainer trains in its own container.
    auc_floor: the lowest test AUC any task may have for the model to be blessed;
    max_auc_drop: how much a task's AUC may fall below the last blessed model's.
    """

    data_root: str
    spec: dict
    name: str = "mdmt"
    data_format: str = "auto"
    schema_path: str | None = None
    model: dict = dataclasses.field(default_factory=lambda: {"name": "m3oe", "params": {}})
    train: dict = dataclasses.field(default_factory=lambda: {"epochs": 10})  # the rest: TrainConfig's defaults
    tune: bool = False
    tuning: dict = dataclasses.field(default_factory=lambda: {"tuner": "random", "max_trials": 3, "epochs": 3})
    tfjob: dict = dataclasses.field(default_factory=dict)
    pipeline_root: str = "runs/pipeline/root"
    metadata_path: str = "runs/pipeline/metadata.sqlite"
    serving_dir: str = "runs/pipeline/serving"
    auc_floor: float = 0.55
    max_auc_drop: float = 0.01
    beam_args: list = dataclasses.field(default_factory=lambda: list(DEFAULT_BEAM_ARGS))
    enable_cache: bool = True
    module_file: str = str(REPO / "components" / "module.py")
    kubeflow_image: str = "ghcr.io/mdmt-tf/mdmt-tf:0.1.0"

    def __post_init__(self):
        self.dataset_spec = DatasetSpec.from_dict(self.spec, source="pipeline config 'spec'")
        ModelConfig.from_dict(self.model)  # validates
        unknown = sorted(set(self.train) - set(TRAIN_KEYS))
        if unknown:
            raise ConfigError(f"pipeline config 'train' has unknown key(s) {unknown}; valid: {list(TRAIN_KEYS)}")
        TrainConfig.from_dict(self.train)  # validates the values (types, ranges, choices)
        if self.tfjob:
            from .tfjob import settings

            settings(self.tfjob)  # validates
        from .beam_args import check_beam_args

        check_beam_args(self.beam_args, "pipeline config beam_args")
        if self.data_format not in ("auto", "csv", "tfrecord"):
            raise ConfigError(f"data_format must be auto, csv or tfrecord, got {self.data_format!r}")
        if not 0 <= self.auc_floor < 1 or self.max_auc_drop < 0:
            raise ConfigError(f"need 0 <= auc_floor < 1 and max_auc_drop >= 0, got {self.auc_floor}, "
                              f"{self.max_auc_drop}")
        # a remote URI (gs://, s3://, hdfs://...) is for the cluster's workers: never probed here
        if is_remote(self.data_root):
            if self.data_format == "auto":
                raise ConfigError(f"data_root {self.data_root} is remote and is not probed: set data_format to csv "
                                  "or tfrecord (mdmt pipeline compile --data-format)")
        elif not Path(self.data_root).exists():
            raise ConfigError(f"data_root {self.data_root} does not exist")
        if self.schema_path and not is_remote(self.schema_path) and not Path(self.schema_path).exists():
            raise ConfigError(f"schema_path {self.schema_path} does not exist")

    @property
    def format(self) -> str:
        if self.data_format != "auto":
            return self.data_format
        root = Path(self.data_root)
        names = [p.name for p in root.iterdir()] if root.is_dir() else [root.name]
        return "tfrecord" if any(".tfrecord" in n for n in names) else "csv"

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "PipelineConfig":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"pipeline config {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        return cls.from_dict({**data, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PipelineConfig":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ConfigError(f"unknown pipeline config key(s) {unknown}; valid: {sorted(valid)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def custom_config(self) -> dict:
        """What the module file receives (plain JSON-able values)."""
        out = {"spec": self.dataset_spec.to_dict(), "model": dict(self.model), "train": dict(self.train),
               "min_count": TrainConfig.from_dict(self.train).min_count, "tune": dict(self.tuning)}
        if self.tfjob:
            out["tfjob"] = dict(self.tfjob)
        return out


def is_remote(path: str | Path) -> bool:
    """A URI with a scheme (gs://, s3://, hdfs://, ...): read by TFX's filesystems on the
    cluster, never probed from the machine that compiles the pipeline."""
    return "://" in str(path)
