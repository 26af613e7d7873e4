"""Hyper-parameters of the models: frozen dataclasses validated from plain dicts.

Each model declares a Params subclass with the defaults of its paper. `from_dict`
rejects unknown keys and wrong types with a message listing what is valid, so a typo
in a YAML file or a tuner search space is caught before anything is built.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from mdmt_tf.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Params:
    """Shared by every model.

    embedding_dim: size of every embedding.
    embedding_l2: L2 penalty on looked-up embedding rows (cold-start regularisation).
    oov_rate: training-time probability of replacing an id of `oov_fields` by the OOV
      bucket, so the OOV embedding learns to serve ids unseen in training.
    oov_fields: fields oov_rate applies to; empty = every sparse field.
    dropout: dropout rate in the model's MLPs.
    embedding_tables: "concat" (the fields' tables in one variable, one gather per batch)
      or "per_field" (one variable per field, e.g. to keep a huge id table apart).
    """

    embedding_dim: int = 16
    embedding_l2: float = 0.0
    oov_rate: float = 0.0
    oov_fields: tuple[str, ...] = ()
    dropout: float = 0.0
    embedding_tables: str = "concat"

    BASE_CHOICES: ClassVar[dict[str, tuple]] = {"embedding_tables": ("concat", "per_field")}
    CHOICES: ClassVar[dict[str, tuple]] = {}  # a model's own str hyper-parameters -> their valid values
    MAY_BE_EMPTY: ClassVar[frozenset] = frozenset({"oov_fields"})  # list hyper-parameters that may be []

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, model: str = "model") -> "Params":
        values = dict(values or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"{model}: unknown hyper-parameter(s) {unknown}; valid: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        coerced = {name: _coerce(model, name, value, hints[name],
                                  {**cls.BASE_CHOICES, **cls.CHOICES}.get(name))
                   for name, value in values.items()}
        params = cls(**coerced)
        params.validate(model)
        return params

    @classmethod
    def coerce(cls, value, model: str = "model") -> "Params":
        return value if isinstance(value, cls) else cls.from_dict(value, model)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def validate(self, model: str) -> None:
        if self.embedding_dim < 1:
            raise ConfigError(f"{model}: embedding_dim must be >= 1, got {self.embedding_dim}")
        for name in ("embedding_l2",):
            if getattr(self, name) < 0:
                raise ConfigError(f"{model}: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("oov_rate", "dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{model}: {name} must be in [0, 1), got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple) and not value and f.name not in self.MAY_BE_EMPTY:
                raise ConfigError(f"{model}: {f.name} must not be empty")
            if f.name.startswith("num_") and value < 1:
                raise ConfigError(f"{model}: {f.name} must be >= 1, got {value}")


def _coerce(model: str, name: str, value: Any, hint: Any, choices: tuple | None) -> Any:
    where = f"{model}: hyper-parameter {name}={value!r}"
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, (int, str)):
            value = (value,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list")
        item_type = typing.get_args(hint)[0]
        items = tuple(value)
        if item_type is int and any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
            raise ConfigError(f"{where} must be a list of positive integers")
        if item_type is str and any(not isinstance(v, str) for v in items):
            raise ConfigError(f"{where} must be a list of names")
        return items
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads 1e-5, without a dot, as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number")
        return float(value)
    if hint is str:
        if choices is not None and value not in choices:
            raise ConfigError(f"{where} is not valid; choose one of {list(choices)}")
        return value
    return value
