"""Score a CSV / TFRecord file with a model server or a SavedModel (`mdmt predict`).

Both paths read the file with mdmt_tf's reader (so bad rows fail with the file, row and
column named), send the raw features through the `predict_raw` signature in batches,
and return one probability array per task in file order.

The spec of a served model: TF Serving's metadata gives the signature's inputs (string
ones are the domain and sparse features, float ones the dense features) and outputs
(the tasks), but not which string input is the domain. `served_spec` finds it by one
probe request whose strings are a value no domain has: the model answers with its
InvalidArgument "unknown value of domain column '<name>'; known values: [...]", which
names the column and lists the domains. Pass a spec to skip the probe.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np

from mdmt_tf.errors import ConfigError
from mdmt_tf.spec import DatasetSpec
from serving.errors import ServingError

PROBE_VALUE = "\x01mdmt-domain-probe"
PROBE_ID = -7_919_001  # the same for integer-typed ids (pipeline models)
ID_DTYPES = ("DT_STRING", "DT_INT64", "DT_INT32")
DOMAIN_ERROR = re.compile(r"domain column \\?'([^'\\]+)\\?'; known values: \[(.*?)\]")
BATCH_ROWS = 1024


def served_spec(client) -> DatasetSpec:
    """The DatasetSpec of the model behind `client` (see the module doc)."""
    signature = client.signature_def("predict_raw")
    dtypes = {name: info.get("dtype") for name, info in signature["inputs"].items()}
    ids = sorted(n for n, d in dtypes.items() if d in ID_DTYPES)      # domain and sparse features
    floats = sorted(n for n, d in dtypes.items() if d not in ID_DTYPES)
    probe = {**{n: [PROBE_VALUE if dtypes[n] == "DT_STRING" else PROBE_ID] for n in ids},
             **{n: [0.0] for n in floats}}
    try:
        client.predict_raw(probe)
        found = None
    except ServingError as err:
        if err.code not in (400, "INVALID_ARGUMENT"):
            raise
        found = DOMAIN_ERROR.search(err.message)
    if found is None:
        raise ConfigError(f"cannot tell which input of model {client.model_name!r} is the domain column (the probe "
                          "request did not fail with mdmt's unknown-domain error); pass --spec SPEC.yaml")
    domain = found.group(1)
    domains = [str(d) for d in ast.literal_eval("[" + found.group(2).replace("\\'", "'") + "]")]
    return DatasetSpec(domain=domain, tasks=tuple(sorted(signature["outputs"])),
                       sparse=tuple(n for n in ids if n != domain), dense=tuple(floats), domains=tuple(domains))


def _in_batches(features: dict[str, np.ndarray], score, batch_rows: int) -> dict[str, np.ndarray]:
    n = len(next(iter(features.values())))
    parts: dict[str, list] = {}
    for start in range(0, n, batch_rows):
        out = score({k: v[start:start + batch_rows] for k, v in features.items()})
        for task, values in out.items():
            parts.setdefault(task, []).append(np.asarray(values, dtype=np.float32).reshape(-1))
    return {task: np.concatenate(v) for task, v in parts.items()}


def read_features(path: str | Path, spec: DatasetSpec) -> dict[str, np.ndarray]:
    from mdmt_tf.data.dataset import raw_feature_arrays
    from mdmt_tf.data.readers import read_features_file

    return raw_feature_arrays(read_features_file(path, spec), spec)


def score_with_server(client, data: str | Path, spec: DatasetSpec | None = None,
                      batch_rows: int = BATCH_ROWS) -> tuple[DatasetSpec, dict[str, np.ndarray]]:
    spec = spec or served_spec(client)
    features = read_features(data, spec)
    return spec, _in_batches(features, client.predict_raw, batch_rows)


def score_with_savedmodel(model_dir: str | Path, data: str | Path, spec: DatasetSpec | None = None,
                          batch_rows: int = 8192) -> tuple[DatasetSpec, dict[str, np.ndarray]]:
    import tensorflow as tf

    model_dir = Path(model_dir)
    if spec is None:
        spec_file = model_dir / "assets.extra" / "spec.yaml"
        if not spec_file.exists():
            raise ConfigError(f"{model_dir} has no assets.extra/spec.yaml (not exported by mdmt_tf?); pass --spec")
        spec = DatasetSpec.from_yaml(spec_file)
    if not (model_dir / "saved_model.pb").exists():
        raise ConfigError(f"{model_dir} is not a SavedModel directory (no saved_model.pb)")
    signature = tf.saved_model.load(str(model_dir)).signatures["predict_raw"]
    wanted = signature.structured_input_signature[1]  # name -> TensorSpec: cast to its dtype
    features = {n: np.asarray(v).astype(wanted[n].dtype.as_numpy_dtype) if n in wanted and
                wanted[n].dtype != tf.string else v for n, v in read_features(data, spec).items()}

    def score(batch):
        return {k: v.numpy() for k, v in signature(**{n: tf.constant(a) for n, a in batch.items()}).items()}

    return spec, _in_batches(features, score, batch_rows)


def write_predictions(path: str | Path, predictions: dict[str, np.ndarray], tasks) -> Path:
    """CSV with one probability column per task (in `tasks` order), one row per input row."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [t for t in tasks if t in predictions] + sorted(set(predictions) - set(tasks))
    pd.DataFrame({t: predictions[t] for t in columns}).to_csv(path, index=False, float_format="%.9g")
    return path
