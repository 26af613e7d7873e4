"""SavedModel export: preprocessing inside the graph, its signatures, atomic writes.

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
  model_info       request: int32 scalar, ignored (send 0) -> what a client needs to build
                   requests and read answers, as string tensors:
                     domain [] the domain column; domains [D] its values in the model's order
                     (domain index i = domains[i]); tasks [T] the outputs, in the spec's order;
                     feature_names [F], feature_dtypes [F] (TF dtype names: string, float32,
                     int64...), feature_kinds [F] (domain | sparse | dense), in the order of
                     predict_raw's inputs; plus info_version [] int32 (MODEL_INFO_VERSION).
                   Called through ordinary Predict (REST columnar: {"signature_name":
                   "model_info", "inputs": {"request": 0}}; gRPC: one int32 scalar tensor).
                   The input exists only because TF Serving's REST API refuses a signature
                   without inputs ("Failed to get input map for signature", json_tensor.cc;
                   tensorflow/serving#1676). Its outputs are not batched: ask for them in
                   the columnar format (TF Serving cannot write them as rows).
An unknown domain value fails with InvalidArgument naming the domain column.

`assets.extra/mdmt.json` records the spec, the model config, the domains and tasks, so a
SavedModel can be evaluated or served knowing only its directory;
`assets.extra/tf_serving_warmup_requests` holds PredictionLogs built from real examples,
which TF Serving replays when it loads the model. Exports are written to a temporary
sibling directory and renamed into place, and `publish_version` copies a SavedModel into
the next numbered version directory of a TF Serving base path the same way, so a polling
server never sees a half-written model. Concurrent publishers into one base path each get
their own version: a number is claimed by creating `.N.claim` (os.mkdir, atomic: exactly
one publisher succeeds), the copy is renamed to `N`, and the claim removed.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import tensorflow as tf

from mdmt_tf.spec import DatasetSpec

METADATA = "mdmt.json"
MODEL_INFO = "model_info"
MODEL_INFO_VERSION = 1


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

    def __init__(self, model, front, spec: DatasetSpec, domains: list[str] | None = None):
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

        info = model_info_values(spec, self.raw_types, domains if domains is not None else front_domains(front, spec))

        @tf.function(input_signature=[tf.TensorSpec([], tf.int32, name="request")])
        def model_info(request):
            del request  # TF Serving's REST API needs an input; the answer does not depend on it
            return {name: tf.constant(value, tf.int32 if name == "info_version" else tf.string)
                    for name, value in info.items()}

        self.serve_examples = serve_examples
        self.predict_raw = predict_raw
        self.model_info = model_info
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
                      "predict_raw": self.predict_raw.get_concrete_function(),
                      MODEL_INFO: self.model_info.get_concrete_function()}
        if self.transform_features is not None:
            signatures["transform_features"] = self.transform_features.get_concrete_function()
        return signatures


def front_domains(front, spec: DatasetSpec) -> list[str]:
    """The domain values in the model's order (index i = value i): the front's vocabulary
    (`mdmt train`), its list (pipeline), or the spec's."""
    for domains in (getattr(front, "domains", None), getattr(getattr(front, "vocab", None), "domains", None),
                    spec.domains):
        if domains:
            return [str(d) for d in domains]
    raise ValueError(f"cannot tell the domain values of the model: the front ({type(front).__name__}) "
                     "and the spec list none")


def model_info_values(spec: DatasetSpec, raw_types: dict, domains: list[str]) -> dict:
    """The model_info signature's outputs (see the module doc) as Python values."""
    names = list(spec.features)
    kinds = {spec.domain: "domain", **{n: "sparse" for n in spec.sparse}, **{n: "dense" for n in spec.dense}}
    return {"domain": spec.domain, "domains": [str(d) for d in domains], "tasks": list(spec.tasks),
            "feature_names": names, "feature_dtypes": [tf.as_dtype(raw_types[n]).name for n in names],
            "feature_kinds": [kinds[n] for n in names], "info_version": MODEL_INFO_VERSION}


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
    tmp = _new_dir(path.parent, f".{path.name}.tmp-")
    try:
        domains = (metadata or {}).get("domains")
        module = ServingModule(model, front, spec, domains=list(domains) if domains else None)
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new directory of a unique name (so concurrent writers never share one) with the
    default permissions (tempfile.mkdtemp's 0700 would hide a version from TF Serving run
    as another user)."""
    path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def _move_into_place(tmp: Path, path: Path) -> None:
    if path.exists():
        old = _new_dir(path.parent, f".{path.name}.old-")
        path.rename(old / path.name)
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


def _claimed(base: Path) -> list[int]:
    """Version numbers claimed by publishers still copying (`.N.claim`)."""
    return [int(p.name[1:-6]) for p in base.iterdir() if p.name.startswith(".") and p.name.endswith(".claim")
            and p.name[1:-6].isdigit()]


def _claim(base: Path, version: int) -> Path | None:
    """Claim `version` for this publisher (an atomic os.mkdir), or None if it is taken."""
    claim = base / f".{version}.claim"
    try:
        os.mkdir(claim)
    except FileExistsError:
        return None
    if (base / str(version)).exists():  # published (and its claim removed) since we listed
        os.rmdir(claim)
        return None
    return claim


def publish_version(model_dir: str | Path, base_path: str | Path, version: int | None = None) -> Path:
    """Copy a SavedModel into `base_path/<version>` (default: the next number) atomically.

    Safe against concurrent publishers into the same base path (threads or processes, on
    one filesystem): each claims its number first (see the module doc), so all succeed
    with distinct versions, and a polling server only ever sees complete versions.
    """
    from mdmt_tf.errors import ConfigError

    model_dir, base = Path(model_dir), Path(base_path)
    if not (model_dir / "saved_model.pb").exists():
        raise ConfigError(f"{model_dir} is not a SavedModel directory (no saved_model.pb)")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ConfigError(f"a model version must be a positive integer (TF Serving ignores others), got {version!r}")
    base.mkdir(parents=True, exist_ok=True)
    if version is not None:
        claim = _claim(base, version)
        if claim is None:
            raise ConfigError(f"{base}/{version} exists already (or is being published); versions present: "
                              f"{versions(base)}")
    else:
        while True:
            version = max(versions(base) + _claimed(base), default=0) + 1
            claim = _claim(base, version)
            if claim is not None:
                break
    tmp = None
    try:
        tmp = _new_dir(base, f".{version}.tmp-")
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        tmp.rename(base / str(version))  # atomic on one filesystem: a poller sees all or nothing
    except BaseException:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.rmdir(claim)
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
