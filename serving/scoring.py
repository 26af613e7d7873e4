"""Score a CSV / TFRecord file with a model server or a SavedModel (`mdmt predict`).

Both paths read the file with mdmt_tf's reader a chunk at a time (so bad rows fail with the
file, row and column named, and memory does not grow with the file), send the raw features
through the `predict_raw` signature in batches, and append one probability column per task
to the output CSV in file order.

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


def server_scorer(client, batch_rows: int = BATCH_ROWS):
    """raw feature columns -> {task: probabilities} through a model server, `batch_rows` rows a request."""
    def score(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = in_batches(client.predict_raw, raw, batch_rows)
        return {task: values.astype(np.float32).reshape(-1) for task, values in out.items()}

    return score


def predict_to_csv(score, data: str | Path, spec: DatasetSpec, out: str | Path, chunk_rows: int = 100_000) -> int:
    """Score the CSV / TFRecord file `data` `chunk_rows` rows at a time with `score` (raw
    feature columns -> {task: probabilities}) and write one probability column per task (the
    spec's tasks first), one row per input row, to the CSV `out`; returns the rows scored.
    Memory is bounded by the chunk; `out` appears only once complete (written beside it,
    then renamed), so a failure leaves no half-written predictions."""
    import pandas as pd

    from mdmt_tf.data.dataset import raw_feature_arrays
    from mdmt_tf.data.readers import feature_chunks

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    rows = 0
    try:
        with open(partial, "w", newline="") as handle:
            for table in feature_chunks(data, spec, chunk_rows):
                predictions = score(raw_feature_arrays(table, spec))
                columns = [t for t in spec.tasks if t in predictions] + sorted(set(predictions) - set(spec.tasks))
                pd.DataFrame({t: predictions[t] for t in columns}).to_csv(handle, index=False, header=rows == 0,
                                                                          float_format="%.9g")
                rows += len(table)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return rows
