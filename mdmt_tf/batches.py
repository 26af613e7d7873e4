"""Calling a function on column arrays in bounded batches: the one helper behind every
batched prediction (a model on encoded features, a SavedModel signature on raw features,
the preprocessing front on raw columns)."""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np


def rows_of(columns: Mapping[str, np.ndarray]) -> int:
    """The number of rows of a dict of equally long column arrays (0 for no columns)."""
    return len(next(iter(columns.values()))) if columns else 0


def in_batches(fn: Callable[[dict], Mapping], columns: Mapping[str, np.ndarray], batch_size: int) -> dict:
    """fn on consecutive row slices of `columns` (at most `batch_size` rows each); each output
    is converted to NumPy and the pieces are concatenated along the first axis, so the result
    is fn on all rows, computed with bounded memory. fn returns a mapping of arrays/tensors."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, received {batch_size}")
    n = rows_of(columns)
    parts: dict[str, list] = {}
    for start in range(0, n, batch_size):
        out = fn({name: values[start:start + batch_size] for name, values in columns.items()})
        for name, value in out.items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(values) for name, values in parts.items()}
