"""Models by name, built from one config object.

    config = ModelConfig("m3oe", {"num_shared_experts": 8})
    model = build_model(config, schema)

The table is a read-only mapping: name -> (model class, preset hyper-parameters).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from mdmt_tf.errors import ConfigError
from mdmt_tf.models.adi import ADI
from mdmt_tf.models.aesm2 import AESM2
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.models.baselines import PLE, STAR, MMoE, PEPNet, SharedBottom, SingleTaskMLP
from mdmt_tf.models.cascade import AITM, ESMM
from mdmt_tf.models.m2m import M2M
from mdmt_tf.models.m3oe import M3oE
from mdmt_tf.models.mtms import MTMS
from mdmt_tf.models.musenet import MUSENet
from mdmt_tf.models.sass import SASS
from mdmt_tf.models.schema import FeatureSchema
from mdmt_tf.models.stem import STEM

MODELS: Mapping[str, tuple[type[MDMTModel], dict[str, Any]]] = MappingProxyType({
    "m3oe": (M3oE, {}),
    "m3oe_aftb": (M3oE, {"gating": "aftb"}),
    "stem": (STEM, {}),
    "mlp": (SingleTaskMLP, {}),
    "shared_bottom": (SharedBottom, {}),
    "mmoe": (MMoE, {}),
    "omoe": (MMoE, {"gates": "one"}),
    "me_mmoe": (MMoE, {"multi_embedding": True}),
    "ple": (PLE, {}),
    "me_ple": (PLE, {"multi_embedding": True}),
    "star": (STAR, {}),
    "pepnet": (PEPNet, {}),
    "adi": (ADI, {}),
    "aesm2": (AESM2, {}),
    "m2m": (M2M, {}),
    "musenet": (MUSENet, {}),
    "mtms": (MTMS, {}),
    "sass": (SASS, {}),
    "esmm": (ESMM, {}),
    "escm2": (ESMM, {"counterfactual": "dr"}),
    "aitm": (AITM, {}),
})


def model_names() -> list[str]:
    return list(MODELS)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A model name and its hyper-parameters (defaults filled from the model's Params)."""

    name: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.name not in MODELS:
            raise ConfigError(f"unknown model {self.name!r}; valid models: {model_names()}")
        cls, preset = MODELS[self.name]
        overlap = {k: v for k, v in preset.items() if k in self.params and self.params[k] != v}
        if overlap:
            raise ConfigError(f"{self.name}: hyper-parameter(s) {overlap} contradict the model's preset {preset}")
        cls.Params.from_dict({**preset, **self.params}, model=self.name)  # validate now

    @property
    def model_class(self) -> type[MDMTModel]:
        return MODELS[self.name][0]

    def resolved_params(self) -> dict[str, Any]:
        cls, preset = MODELS[self.name]
        return cls.Params.from_dict({**preset, **self.params}, model=self.name).to_dict()

    def to_dict(self) -> dict:
        return {"name": self.name, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if not isinstance(data, dict) or "name" not in data:
            raise ConfigError(f"a model config is a mapping with 'name' (one of {model_names()}) and "
                              f"optional 'params', got {data!r}")
        unknown = sorted(set(data) - {"name", "params"})
        if unknown:
            raise ConfigError(f"unknown model config key(s) {unknown}; valid: ['name', 'params']")
        return cls(name=data["name"], params=dict(data.get("params") or {}))

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"model config file {path} does not exist")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot parse: {err}") from None
        return cls.from_dict(data)


def build_model(config: ModelConfig | str, schema: FeatureSchema, params: dict | None = None,
                dtype: str | None = None) -> MDMTModel:
    """Build a registered model. `config` is a ModelConfig or a name (then `params`); `dtype`
    its dtype policy ("float32", the default, or "mixed_bfloat16", "bfloat16")."""
    if isinstance(config, str):
        config = ModelConfig(config, dict(params or {}))
    elif params:
        raise ConfigError("pass hyper-parameters inside the ModelConfig, not both")
    return config.model_class(schema=schema, params=config.resolved_params(), name=config.name,
                              dtype=dtype or "float32")
