"""DatasetSpec: the one description of a dataset that every stage reads.

A spec names the domain column, the task label columns (in order), the sparse
(categorical) feature columns and the dense (numeric) feature columns. No stage
hard-codes a column name. Minimal YAML:

    domain: domain_id
    tasks: [click, like]
    sparse: [user_id, item_id, gender, occupation, zip, cate_id]
    dense: [age]

Optional keys:

    domains: ["<25", "25-34", ">=35"]   # the domain values, in display order. Without it
                                        # the values seen in training, sorted (numbers
                                        # numerically). With it, other values are errors.
    vocab:                              # per sparse field, how its values become ids
      user_id: {min_count: 2, top_k: 5000000, oov_buckets: 16}
      item_id: {hash_bins: 1000000}

`vocab` (mdmt_tf.spec.FieldVocab) has the same meaning in the library, in the pipeline's
Transform and in the served models: a vocabulary of the training values seen at least
`min_count` times (default: the run's --min-count), the `top_k` most frequent of them
(ties: the larger value first, as tensorflow-transform), and `oov_buckets` ids that the
other values hash into (ids 0..oov_buckets-1; the vocabulary follows); or, with
`hash_bins`, no vocabulary at all: a value hashes into ids 1..hash_bins-1 (id 0: empty).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from mdmt_tf.errors import SpecError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names the library itself uses in feature dicts and signatures.
RESERVED = frozenset({"examples", "inputs", "outputs"})


def _as_names(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise SpecError(f"spec key '{key}' must be a list of column names, got {type(value).__name__}: {value!r}")
    return tuple(str(v) for v in value)


@dataclasses.dataclass(frozen=True)
class FieldVocab:
    """How one sparse field's values become ids (see the module doc)."""

    min_count: int | None = None
    top_k: int | None = None
    oov_buckets: int = 1
    hash_bins: int | None = None

    KEYS = ("min_count", "top_k", "oov_buckets", "hash_bins")

    @classmethod
    def from_dict(cls, data: Any, field: str) -> "FieldVocab":
        where = f"spec key 'vocab.{field}'"
        if not isinstance(data, Mapping):
            raise SpecError(f"{where} must be a mapping with keys {list(cls.KEYS)}, got {data!r}")
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {unknown}; valid keys are {list(cls.KEYS)}")
        for key, value in data.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SpecError(f"spec key 'vocab.{field}.{key}' must be a positive integer, got {value!r}")
        rule = cls(**data)
        if rule.hash_bins is not None:
            if rule.hash_bins < 2:
                raise SpecError(f"spec key 'vocab.{field}.hash_bins' must be >= 2 (id 0 is the empty value), got "
                                f"{rule.hash_bins}")
            if rule.min_count is not None or rule.top_k is not None or rule.oov_buckets != 1:
                raise SpecError(f"{where}: hash_bins hashes every value (no vocabulary): drop min_count, top_k "
                                "and oov_buckets, or drop hash_bins")
        return rule

    @property
    def hashed(self) -> bool:
        return self.hash_bins is not None

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.KEYS if getattr(self, k) != getattr(FieldVocab(), k)}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Columns of a multi-domain multi-task dataset.

    Attributes:
      domain: the column whose value says which domain (scenario) a row belongs to.
      tasks: the binary (0/1) label columns, one per task, in order. A cascade model
        (ESMM) treats tasks[0] -> tasks[1] as click -> conversion.
      sparse: categorical feature columns (ids); values are treated as strings and
        mapped to integer ids through vocabularies built on the training split, with
        index 0 the out-of-vocabulary bucket.
      dense: numeric feature columns, standardised with training-split statistics.
      domains: optional explicit list of domain values (order used in reports).
      vocab: {sparse field: FieldVocab}, the fields whose ids are not the default
        (a vocabulary of every training value, one OOV id 0).
    """

    domain: str
    tasks: tuple[str, ...]
    sparse: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()
    domains: tuple[str, ...] | None = None
    vocab: Mapping[str, FieldVocab] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "tasks", _as_names(self.tasks, "tasks"))
        object.__setattr__(self, "sparse", _as_names(self.sparse, "sparse"))
        object.__setattr__(self, "dense", _as_names(self.dense, "dense"))
        if self.domains is not None:
            object.__setattr__(self, "domains", tuple(str(d) for d in _as_names(self.domains, "domains")))
        if not isinstance(self.vocab, Mapping):
            raise SpecError(f"spec key 'vocab' must map sparse fields to their settings, got {self.vocab!r}")
        object.__setattr__(self, "vocab", {str(k): v if isinstance(v, FieldVocab) else FieldVocab.from_dict(v, k)
                                           for k, v in self.vocab.items()})
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        if not isinstance(self.domain, str) or not self.domain:
            raise SpecError(f"spec key 'domain' must name the domain column, got {self.domain!r}")
        if not self.tasks:
            raise SpecError("spec key 'tasks' must list at least one label column, got []")
        if not self.sparse and not self.dense:
            raise SpecError("the spec lists no features: give 'sparse' and/or 'dense' columns")
        for name in self.columns:
            if not _NAME.match(name):
                raise SpecError(
                    f"column name {name!r} is not usable as a feature name: use letters, digits "
                    "and '_' and do not start with a digit (rename the column)")
            if name in RESERVED:
                raise SpecError(f"column name {name!r} is reserved; valid names exclude {sorted(RESERVED)}")
        seen: dict[str, str] = {}
        for role, names in (("domain", (self.domain,)), ("tasks", self.tasks),
                            ("sparse", self.sparse), ("dense", self.dense)):
            for name in names:
                if name in seen:
                    raise SpecError(f"column {name!r} appears twice in the spec (in '{seen[name]}' and "
                                    f"'{role}'); each column has one role")
                seen[name] = role
        unknown = [f for f in self.vocab if f not in self.sparse]
        if unknown:
            raise SpecError(f"spec key 'vocab' names {unknown}, which are not sparse columns; sparse: "
                            f"{list(self.sparse)}")
        if self.domains is not None:
            if len(self.domains) < 1 or len(set(self.domains)) != len(self.domains):
                raise SpecError(f"spec key 'domains' must list distinct domain values, got {list(self.domains)}")

    # --------------------------------------------------------------- accessors
    @property
    def features(self) -> tuple[str, ...]:
        """Input columns of a model: the domain, the sparse and the dense features."""
        return (self.domain, *self.sparse, *self.dense)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the spec names: features then labels."""
        return (*self.features, *self.tasks)

    def field_vocab(self, name: str) -> FieldVocab:
        """The id rule of sparse field `name` (the default when the spec gives none)."""
        return self.vocab.get(name, FieldVocab())

    def missing_columns(self, present: Iterable[str]) -> list[str]:
        present = set(present)
        return [c for c in self.columns if c not in present]

    # ---------------------------------------------------------------- (de)serde
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "spec") -> "DatasetSpec":
        if not isinstance(data, Mapping):
            raise SpecError(f"{source}: a spec is a mapping with keys domain/tasks/sparse/dense, "
                            f"got {type(data).__name__}")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise SpecError(f"{source}: unknown spec key(s) {unknown}; valid keys are {sorted(valid)}")
        for key in ("domain", "tasks"):
            if key not in data:
                raise SpecError(f"{source}: spec key '{key}' is required (keys given: {sorted(data)})")
        try:
            return cls(domain=data["domain"], tasks=data["tasks"], sparse=data.get("sparse"),
                       dense=data.get("dense"), domains=data.get("domains"), vocab=data.get("vocab") or {})
        except SpecError as err:
            raise SpecError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "DatasetSpec":
        path = Path(path)
        if not path.exists():
            raise SpecError(f"spec file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise SpecError(f"{path}: not valid YAML: {err}") from None
        return cls.from_dict(data if data is not None else {}, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"domain": self.domain, "tasks": list(self.tasks),
                               "sparse": list(self.sparse), "dense": list(self.dense)}
        if self.domains is not None:
            out["domains"] = list(self.domains)
        if self.vocab:
            out["vocab"] = {name: rule.to_dict() for name, rule in self.vocab.items()}
        return out

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if path is not None:
            Path(path).write_text(text)
        return text
