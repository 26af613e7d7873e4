"""Scoring rows with an exported SavedModel in-process: the one path `mdmt evaluate`,
`mdmt predict --model-dir` and the tests take.

The rows go through the model's own `predict_raw` signature (the preprocessing graph a
server runs, then the model), in bounded batches. Each raw column is cast to the dtype the
signature declares: a model exported by `mdmt train` reads ids as strings, one pushed by
the pipeline reads the numeric-looking ones (a domain index, say) as int64.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mdmt_tf.batches import in_batches
from mdmt_tf.errors import ConfigError
from mdmt_tf.export.savedmodel import read_metadata
from mdmt_tf.spec import DatasetSpec

BATCH_ROWS = 8192


class SavedModelScorer:
    """An exported mdmt_tf SavedModel, loaded once. `spec` and `domains` (in the model's
    order) come from its assets.extra metadata; `input_dtypes` from its predict_raw signature."""

    def __init__(self, model_dir: str | Path):
        import tensorflow as tf

        self.model_dir = Path(model_dir)
        meta = read_metadata(self.model_dir)  # a ConfigError naming the directory if it is not one of ours
        self.spec = DatasetSpec.from_dict(meta["spec"])
        self.domains = [str(d) for d in meta["domains"]]
        self._signature = tf.saved_model.load(str(self.model_dir)).signatures["predict_raw"]
        inputs = self._signature.structured_input_signature[1]
        self.input_dtypes = {name: spec.dtype for name, spec in inputs.items()}

    def columns(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw feature columns (as mdmt_tf.data.dataset.raw_feature_arrays reads them) cast to
        the signature's dtypes; a column missing, or holding a value its dtype cannot take,
        is a ConfigError naming the column."""
        import tensorflow as tf

        out = {}
        for name, dtype in self.input_dtypes.items():
            if name not in raw:
                raise ConfigError(f"{self.model_dir}: the model reads a feature {name!r} the data does not have "
                                  f"(data columns: {sorted(raw)})")
            values = np.asarray(raw[name])
            if dtype == tf.string:
                out[name] = values.astype(str)
                continue
            try:
                out[name] = values.astype(dtype.as_numpy_dtype)
            except ValueError:
                bad = next(v for v in values if not _castable(v, dtype.as_numpy_dtype))
                raise ConfigError(f"{self.model_dir}: the model reads {name!r} as {dtype.name}, but the data holds "
                                  f"{bad!r}; score data of the kind the model was trained on") from None
        return out

    def score(self, raw: dict[str, np.ndarray], batch_rows: int = BATCH_ROWS) -> dict[str, np.ndarray]:
        """{task: probabilities [N]} for raw feature columns of N rows."""
        import tensorflow as tf

        def call(batch):
            return self._signature(**{name: tf.constant(values) for name, values in batch.items()})

        out = in_batches(call, self.columns(raw), batch_rows)
        return {task: values.astype(np.float32).reshape(-1) for task, values in out.items()}

    def score_table(self, table, batch_rows: int = BATCH_ROWS) -> dict[str, np.ndarray]:
        """score() of a typed table (mdmt_tf.data.table) holding the spec's columns."""
        from mdmt_tf.data.dataset import raw_feature_arrays

        return self.score(raw_feature_arrays(table, self.spec), batch_rows)


def _castable(value, dtype) -> bool:
    try:
        np.asarray([value]).astype(dtype)
        return True
    except ValueError:
        return False
