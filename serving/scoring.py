"""Score a CSV / TFRecord file with a model server or a SavedModel (`mdmt predict`).

Both paths read the file with mdmt_tf's reader (so bad rows fail with the file, row and
column named), send the raw features through the `predict_raw` signature in batches,
and return one probability array per task in file order.

The spec of a served model comes from its `model_info` signature (ServingClient.model_info:
the domain column, its values in the model's order, the tasks in order, each feature's
kind and dtype), called through ordinary Predict. A model exported without it (before
mdmt_tf added the signature) is a ConfigError asking for --spec; pass a spec to skip the
call altogether.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mdmt_tf.batches import in_batches
from mdmt_tf.spec import DatasetSpec

BATCH_ROWS = 1024


def served_spec(client) -> DatasetSpec:
    """The DatasetSpec of the model behind `client`, from its model_info signature."""
    info = client.model_info()
    return DatasetSpec(domain=info.domain, tasks=info.tasks, sparse=info.sparse, dense=info.dense,
                       domains=info.domains)


def read_features(path: str | Path, spec: DatasetSpec) -> dict[str, np.ndarray]:
    from mdmt_tf.data.dataset import raw_feature_arrays
    from mdmt_tf.data.readers import read_features_file

    return raw_feature_arrays(read_features_file(path, spec), spec)


def score_with_server(client, data: str | Path, spec: DatasetSpec | None = None,
                      batch_rows: int = BATCH_ROWS) -> tuple[DatasetSpec, dict[str, np.ndarray]]:
    spec = spec or served_spec(client)
    out = in_batches(client.predict_raw, read_features(data, spec), batch_rows)
    return spec, {task: values.astype(np.float32).reshape(-1) for task, values in out.items()}


def score_with_savedmodel(model_dir: str | Path, data: str | Path, spec: DatasetSpec | None = None,
                          batch_rows: int = 8192) -> tuple[DatasetSpec, dict[str, np.ndarray]]:
    """In-process, through mdmt_tf.export.scoring (the path `mdmt evaluate` takes too)."""
    from mdmt_tf.export.scoring import SavedModelScorer

    scorer = SavedModelScorer(model_dir)
    spec = spec or scorer.spec
    return spec, scorer.score(read_features(data, spec), batch_rows)


def write_predictions(path: str | Path, predictions: dict[str, np.ndarray], tasks) -> Path:
    """CSV with one probability column per task (in `tasks` order), one row per input row."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [t for t in tasks if t in predictions] + sorted(set(predictions) - set(tasks))
    pd.DataFrame({t: predictions[t] for t in columns}).to_csv(path, index=False, float_format="%.9g")
    return path
