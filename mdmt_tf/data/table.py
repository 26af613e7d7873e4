"""Validate a raw table against a DatasetSpec and give every column its type.

Readers hand over a pandas DataFrame whose cells are strings (CSV) or Python scalars
(TFRecord) and a row number per row; `coerce_table` returns the typed table or raises
a DataError naming the file, the row and the column.

Types after coercion:
  domain  str      (empty -> error)
  sparse  str      (empty / missing -> "" which maps to the OOV bucket, id 0)
  dense   float32  (empty, non-numeric, inf -> error)
  tasks   int8     (anything but 0 / 1 -> error)
Columns outside the spec (a timestamp for a temporal split, say) are kept as they are.
The column ROW holds each row's number in its file, for later messages.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from mdmt_tf.errors import DataError
from mdmt_tf.spec import DatasetSpec

ROW = "_row"
_TRUE_LABELS = {"1", "1.0", "true", "True", "TRUE", 1}
_FALSE_LABELS = {"0", "0.0", "false", "False", "FALSE", 0}


def _first_bad(table: pd.DataFrame, bad: np.ndarray, column: str) -> tuple[int, object, int]:
    idx = np.flatnonzero(bad)
    first = idx[0]
    return int(table[ROW].iloc[first]), table[column].iloc[first], len(idx)


def _more(count: int) -> str:
    return f" ({count - 1} more row(s) like it)" if count > 1 else ""


def coerce_table(table: pd.DataFrame, spec: DatasetSpec, source: str,
                 header_row: int | None = 1, labels: bool = True) -> pd.DataFrame:
    """Check `table` against `spec` and return a typed copy (see module doc).

    `table` must carry ROW. `header_row` is the row to name for a missing column (1 for
    a CSV header; None for formats without a header). labels=False: the task columns are
    optional (scoring data); present ones are still checked.
    """
    required = spec.columns if labels else spec.features
    missing = [c for c in required if c not in table.columns]
    if missing:
        present = [c for c in table.columns if c != ROW]
        raise DataError(
            f"column(s) {missing} named by the spec are missing; the data has {present}. "
            "Fix the file or the spec (domain/tasks/sparse/dense).",
            source=source, row=header_row, column=missing[0])
    if len(table) == 0:
        raise DataError("has no data rows; every split (train, val, test) needs at least one row",
                        source=source)
    out = table.copy()

    for task in spec.tasks:
        if task not in out.columns:
            continue
        values = out[task].map(lambda v: v.strip() if isinstance(v, str) else v)
        is_one = values.isin(_TRUE_LABELS).to_numpy()
        is_zero = values.isin(_FALSE_LABELS).to_numpy()
        bad = ~(is_one | is_zero)
        if bad.any():
            row, value, count = _first_bad(out, bad, task)
            raise DataError(f"label value {value!r} is not 0 or 1; task labels must be binary"
                            f"{_more(count)}", source=source, row=row, column=task)
        out[task] = is_one.astype(np.int8)

    for name in spec.dense:
        raw = out[name]
        numbers = pd.to_numeric(raw.where(raw.astype(str).str.strip() != "", np.nan), errors="coerce")
        bad = ~np.isfinite(numbers.to_numpy(dtype=np.float64))
        if bad.any():
            row, value, count = _first_bad(out, bad, name)
            what = "is empty" if str(value).strip() in ("", "nan", "None") else f"{value!r} is not a finite number"
            raise DataError(f"dense value {what}; dense features must be numeric{_more(count)}",
                            source=source, row=row, column=name)
        out[name] = numbers.to_numpy(dtype=np.float32)

    domain = out[spec.domain].map(_as_text)
    bad = (domain == "").to_numpy()
    if bad.any():
        row, _, count = _first_bad(out, bad, spec.domain)
        raise DataError(f"domain value is empty; every row needs its domain{_more(count)}",
                        source=source, row=row, column=spec.domain)
    out[spec.domain] = domain

    for name in spec.sparse:
        out[name] = out[name].map(_as_text)
    return out


def _as_text(value) -> str:
    """A cell as the string used for vocabularies: ints without '.0', None/NaN as ''."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float):
        if np.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
    if isinstance(value, (np.floating,)):
        return _as_text(float(value))
    return str(value)


def check_domains(table: pd.DataFrame, spec: DatasetSpec, known: list[str], source: str) -> None:
    """Every domain value of `table` must be one of `known` (the training domains)."""
    bad = ~table[spec.domain].isin(known).to_numpy()
    if bad.any():
        row, value, count = _first_bad(table, bad, spec.domain)
        raise DataError(
            f"domain value {value!r} never appears in the training split (known: {known}); "
            f"a model has no tower for it. Add such rows to training or drop them{_more(count)}",
            source=source, row=row, column=spec.domain)
