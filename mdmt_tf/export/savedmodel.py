"""SavedModel export: preprocessing inside the graph, two signatures, atomic writes.

Signatures (inputs and outputs keyed by name):
  serving_default  examples: serialized tf.train.Example [batch] (string)
                   -> {task: probability [batch] (float32)}
                   Features: the domain and sparse features as bytes (a missing sparse
                   feature means the OOV bucket), dense features as float; labels, if
                   present, are ignored.
  predict_raw      one [batch] tensor per raw feature (domain / sparse: string, dense:
                   float32) -> the same outputs. For JSON clients that don't build
                   tf.Examples.
An unknown domain value fails with InvalidArgument naming the domain column.

`assets.extra/mdmt.json` records the spec, the model config, the domains and tasks, so a
SavedModel can be evaluated or served knowing only its directory. The export is written
to a temporary sibling directory and renamed into place, so a reader (a polling model
server) never sees a half-written model.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import tensorflow as tf

from mdmt_tf.spec import DatasetSpec

METADATA = "mdmt.json"


def raw_input_specs(spec: DatasetSpec) -> dict[str, tf.TensorSpec]:
    specs = {spec.domain: tf.TensorSpec([None], tf.string, name=spec.domain)}
    specs.update({n: tf.TensorSpec([None], tf.string, name=n) for n in spec.sparse})
    specs.update({n: tf.TensorSpec([None], tf.float32, name=n) for n in spec.dense})
    return specs


def example_parse_spec(spec: DatasetSpec) -> dict:
    parse = {spec.domain: tf.io.FixedLenFeature([], tf.string)}
    parse.update({n: tf.io.FixedLenFeature([], tf.string, default_value="") for n in spec.sparse})
    parse.update({n: tf.io.FixedLenFeature([], tf.float32) for n in spec.dense})
    return parse


class ServingModule(tf.Module):
    """Holds the preprocessing front and the model; its tf.functions are the signatures."""

    def __init__(self, model, front, spec: DatasetSpec):
        super().__init__(name="mdmt_serving")
        self.model, self.front, self.spec = model, front, spec
        self.tasks = tuple(spec.tasks)
        parse_spec = example_parse_spec(spec)
        raw_specs = raw_input_specs(spec)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
        def serve_examples(examples):
            return self._score(tf.io.parse_example(examples, parse_spec))

        @tf.function(input_signature=[raw_specs])
        def predict_raw(inputs):
            return self._score(inputs)

        self.serve_examples = serve_examples
        self.predict_raw = predict_raw

    def _score(self, raw):
        outputs = self.model(self.front(raw), training=False)
        return {task: tf.reshape(outputs[task], [-1]) for task in self.tasks}

    def signatures(self) -> dict:
        return {"serving_default": self.serve_examples.get_concrete_function(),
                "predict_raw": self.predict_raw.get_concrete_function()}


def export_savedmodel(model, front, spec: DatasetSpec, path: str | Path, metadata: dict | None = None) -> Path:
    """Write a SavedModel at `path` atomically (temp dir + rename); returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    module = ServingModule(model, front, spec)
    tf.saved_model.save(module, str(tmp), signatures=module.signatures())
    extra = tmp / "assets.extra"
    extra.mkdir(exist_ok=True)
    info = {"spec": spec.to_dict(), "tasks": list(spec.tasks), **(metadata or {})}
    (extra / METADATA).write_text(json.dumps(info, indent=1))
    spec.to_yaml(extra / "spec.yaml")
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def read_metadata(model_dir: str | Path) -> dict:
    model_dir = Path(model_dir)
    meta = model_dir / "assets.extra" / METADATA
    if not meta.exists():
        from mdmt_tf.errors import ConfigError

        if not (model_dir / "saved_model.pb").exists():
            raise ConfigError(f"{model_dir} is not a SavedModel directory (no saved_model.pb)")
        raise ConfigError(f"{model_dir} has no assets.extra/{METADATA}: not exported by mdmt_tf")
    return json.loads(meta.read_text())
