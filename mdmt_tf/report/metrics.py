"""metrics.json: the contract of a training run's results.

    {"model": name,
     "val":  {"auc": {"<domain>/<task>": float}, "logloss": {...}, "mean_auc": float,
              "mean_logloss": float, ...more keys: weighted_*, task_*, domain_*, count},
     "test": {same},
     "arch": {"alpha": {"domain": ..., "task": ...} | null, "beta": {...} | null},
     "train_seconds": float, "train_examples_per_second": float, ...}

<domain> is the domain value as it appears in the data. alpha / beta values are
sigmoid(raw), i.e. the weights the fusion actually applies: a float when the variable is a
scalar, else {domain or task: float}.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def clean(value):
    """JSON/YAML-safe: numpy scalars and arrays to Python, NaN to None."""
    return _clean(value)


def _clean(value):
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) else value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    return value


def arch_summary(values, domains, tasks) -> dict:
    """A model's ArchValues (MDMTModel.architecture_values) -> {"alpha": {"domain": ..., "task":
    ...} | None, "beta": {...} | None, "gate_logits": {layer: [[...]]} (only with them)}."""
    out: dict = {"alpha": None, "beta": None}

    def named(array, names):
        array = np.asarray(array).ravel()
        return float(array[0]) if array.size == 1 else {n: float(v) for n, v in zip(names, array)}

    for value in values:
        if value.kind == "gate_logits":
            out.setdefault("gate_logits", {})[value.group] = np.asarray(value.value).tolist()
        else:
            out[value.kind] = out[value.kind] or {}
            out[value.kind][value.group] = named(value.value, domains if value.group == "domain" else tasks)
    return out


def write_metrics(path: str | Path, payload: dict) -> dict:
    """Write metrics.json (atomically) and return the payload as written."""
    from mdmt_tf.files import write_json

    payload = _clean(payload)
    write_json(path, payload)
    return payload
