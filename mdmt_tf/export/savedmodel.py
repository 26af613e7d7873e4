"""SavedModel export: preprocessing inside the graph, two signatures, atomic writes.

Signatures (inputs and outputs keyed by name):
  serving_default  examples: serialized tf.train.Example [batch] (string)
                   -> {task: probability [batch] (float32)}
                   Each feature typed as the front expects (`raw_types` in mdmt.json): for
                   `mdmt train` models the domain and sparse features as bytes and dense ones
                   as float; for pipeline models the types ExampleGen gave the columns. A
                   missing sparse feature means the OOV bucket; labels, if present, are
                   ignored.
  predict_raw      one [batch] tensor per raw feature, same types -> the same outputs. For
                   JSON clients that don't build tf.Examples.
  transform_features  (pipeline models) serialized raw tf.Examples, labels included -> every
                   feature as the Transform graph outputs it, for analysis.
An unknown domain value fails with InvalidArgument naming the domain column.

`assets.extra/mdmt.json` records the spec, the model config, the domains and tasks, so a
SavedModel can be evaluated or served knowing only its directory;
`assets.extra/tf_serving_warmup_requests` holds PredictionLogs built from real examples,
which TF Serving replays when it loads the model. Exports are written to a temporary
sibling directory and renamed into place, and `publish_version` copies a SavedModel into
the next numbered version directory of a TF Serving base path the same way, so a polling
server never sees a half-written model.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import tensorflow as tf

from mdmt_tf.spec import DatasetSpec

METADATA = "mdmt.json"


def raw_input_specs(spec: DatasetSpec, raw_types: dict) -> dict[str, tf.TensorSpec]:
    """One [batch] TensorSpec per raw feature, typed as the front expects."""
    return {n: tf.TensorSpec([None], raw_types[n], name=n) for n in spec.features}


def example_parse_spec(spec: DatasetSpec, raw_types: dict) -> dict:
    """tf.Example parsing: every feature required except sparse ones (missing -> OOV)."""
    parse = {}
    for name in spec.features:
        dtype = raw_types[name]
        if name in spec.sparse:
            parse[name] = tf.io.FixedLenFeature([], dtype, default_value="" if dtype == tf.string else -1)
        else:
            parse[name] = tf.io.FixedLenFeature([], dtype)
    return parse


class ServingModule(tf.Module):
    """Holds the preprocessing front and the model; its tf.functions are the signatures."""

    def __init__(self, model, front, spec: DatasetSpec):
        super().__init__(name="mdmt_serving")
        self.model, self.front, self.spec = model, front, spec
        self.tasks = tuple(spec.tasks)
        self.raw_types = dict(front.raw_types)
        parse_spec = example_parse_spec(spec, self.raw_types)
        raw_specs = raw_input_specs(spec, self.raw_types)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
        def serve_examples(examples):
            return self._score(tf.io.parse_example(examples, parse_spec))

        @tf.function(input_signature=[raw_specs])
        def predict_raw(inputs):
            return self._score(inputs)

        self.serve_examples = serve_examples
        self.predict_raw = predict_raw
        self.transform_features = None
        if hasattr(front, "transform_examples"):
            @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
            def transform_features(examples):
                return front.transform_examples(examples)

            self.transform_features = transform_features

    def _score(self, raw):
        outputs = self.model(self.front(raw), training=False)
        return {task: tf.reshape(outputs[task], [-1]) for task in self.tasks}

    def signatures(self) -> dict:
        signatures = {"serving_default": self.serve_examples.get_concrete_function(),
                      "predict_raw": self.predict_raw.get_concrete_function()}
        if self.transform_features is not None:
            signatures["transform_features"] = self.transform_features.get_concrete_function()
        return signatures


def write_warmup_requests(path: Path, examples: list[bytes], batch: int = 8, model_name: str = "mdmt") -> None:
    """A TFRecord of PredictionLog: `serving_default` requests on real serialized examples."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    with tf.io.TFRecordWriter(str(path)) as writer:
        for start in range(0, len(examples), batch):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default"))
            request.inputs["examples"].CopyFrom(tf.make_tensor_proto(examples[start:start + batch], dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def export_savedmodel(model, front, spec: DatasetSpec, path: str | Path, metadata: dict | None = None,
                      warmup_examples: list[bytes] | None = None) -> Path:
    """Write a SavedModel at `path` atomically (temp dir + rename); returns `path`.

    warmup_examples: serialized tf.Examples for assets.extra/tf_serving_warmup_requests.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    module = ServingModule(model, front, spec)
    tf.saved_model.save(module, str(tmp), signatures=module.signatures())
    extra = tmp / "assets.extra"
    extra.mkdir(exist_ok=True)
    info = {"spec": spec.to_dict(), "tasks": list(spec.tasks),
            "raw_types": {n: tf.as_dtype(t).name for n, t in module.raw_types.items()}, **(metadata or {})}
    (extra / METADATA).write_text(json.dumps(info, indent=1))
    spec.to_yaml(extra / "spec.yaml")
    if warmup_examples:
        write_warmup_requests(extra / "tf_serving_warmup_requests", list(warmup_examples))
    _move_into_place(tmp, path)
    return path


def _move_into_place(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)


def versions(base_path: str | Path) -> list[int]:
    """The numbered version directories of a TF Serving base path, ascending."""
    base = Path(base_path)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def publish_version(model_dir: str | Path, base_path: str | Path, version: int | None = None) -> Path:
    """Copy a SavedModel into `base_path/<version>` (default: the next number) atomically."""
    from mdmt_tf.errors import ConfigError

    model_dir, base = Path(model_dir), Path(base_path)
    if not (model_dir / "saved_model.pb").exists():
        raise ConfigError(f"{model_dir} is not a SavedModel directory (no saved_model.pb)")
    existing = versions(base)
    version = version if version is not None else (existing[-1] + 1 if existing else 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"a model version must be a positive integer (TF Serving ignores others), got {version!r}")
    if version in existing:
        raise ConfigError(f"{base}/{version} exists already; versions present: {existing}")
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".{version}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(model_dir, tmp)
    tmp.rename(base / str(version))  # atomic on one filesystem: a poller sees all or nothing
    return base / str(version)


def read_metadata(model_dir: str | Path) -> dict:
    model_dir = Path(model_dir)
    meta = model_dir / "assets.extra" / METADATA
    if not meta.exists():
        from mdmt_tf.errors import ConfigError

        if not (model_dir / "saved_model.pb").exists():
            raise ConfigError(f"{model_dir} is not a SavedModel directory (no saved_model.pb)")
        raise ConfigError(f"{model_dir} has no assets.extra/{METADATA}: not exported by mdmt_tf")
    return json.loads(meta.read_text())
