"""Checks of training data that depend on the model trained on it.

A cascade model (ESMM; models declaring `cascade = True`) scores
p(task_k) = p(task_{k-1}) * p(task_k | task_{k-1}) over the spec's tasks in order, which is
a likelihood of the labels only if they are nested: every positive of task k is a positive
of task k-1 (like => click). `check_nested_labels` finds the first row that is not;
`check_cascade` applies it to a training run's data (called by mdmt_tf.training.fit.Run,
so `mdmt train`, `mdmt compare` and the pipeline's Trainer all reach it).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mdmt_tf.data.table import ROW
from mdmt_tf.errors import DataError
from mdmt_tf.log import LOG


def unnested_rows(labels: dict[str, np.ndarray], tasks: Sequence[str]) -> list[tuple[str, str, np.ndarray]]:
    """(parent, child, indices) for each consecutive pair of `tasks` with rows where
    child = 1 but parent = 0; indices are 0-based positions in the arrays, ascending."""
    out = []
    for parent, child in zip(tasks[:-1], tasks[1:]):
        bad = (np.asarray(labels[child]).reshape(-1) != 0) & (np.asarray(labels[parent]).reshape(-1) == 0)
        if bad.any():
            out.append((parent, child, np.flatnonzero(bad)))
    return out


def check_nested_labels(labels: dict[str, np.ndarray], tasks: Sequence[str], *, rows=None,
                        source: str | None = None, model: str | None = None) -> None:
    """Raise DataError unless every positive of tasks[k] is a positive of tasks[k-1].

    labels: {task: 0/1 array}, one entry per row. rows: each row's number in its source
    (CSV line with the header = 1, TFRecord record number; mdmt_tf.data.table.ROW); without
    them a row is named "training example N" (1-based position). The error names the first
    offending row (the earliest over all pairs), the task pair and how many rows break it.
    """
    violations = unnested_rows(labels, tasks)
    if not violations:
        return
    parent, child, index = min(violations, key=lambda v: v[2][0])
    first = int(index[0])
    more = f" ({len(index) - 1} more row(s) like it)" if len(index) > 1 else ""
    who = f"model {model} is a cascade" if model else "a cascade"
    message = (f"{child}=1 but {parent}=0{more}; {who} {' -> '.join(tasks)} and needs nested labels "
               f"(every {child} is a {parent}). Fix the labels, or pass --param allow_unnested=true to train it "
               "anyway (its outputs are then not probabilities of the cascade)")
    if rows is not None:
        raise DataError(message, source=source, row=int(np.asarray(rows)[first]))
    where = f"training example {first + 1}"
    error = DataError(message, source=f"{source}, {where}" if source else where)
    error.row = first + 1
    raise error


def model_is_cascade(model_config) -> bool:
    """Whether the configured model's class declares `cascade = True` (its outputs chain
    the tasks in spec order)."""
    return bool(getattr(model_config.model_class, "cascade", False))


def check_cascade(model_config, tasks: Sequence[str], labels: dict[str, np.ndarray], data=None) -> None:
    """Before training: a cascade model needs nested training labels (check_nested_labels)
    unless its params set allow_unnested, which trains anyway with one line on stderr.

    labels: the training split's {task: 0/1 array}. data: the MDMTData they come from, if
    any, whose training table (its ROW column) and source name the rows; without it rows are
    named by their position in the training split.
    """
    if not model_is_cascade(model_config):
        return
    tasks = tuple(tasks)
    if model_config.resolved_params().get("allow_unnested", False):
        violations = unnested_rows(labels, tasks)
        if violations:
            count = len(np.unique(np.concatenate([index for _, _, index in violations])))
            pairs = ", ".join(f"{child}=1 but {parent}=0: {len(index)}" for parent, child, index in violations)
            LOG.warning("%s: the training labels are not nested: %d of %d row(s) break the cascade %s (%s); "
                        "training anyway (allow_unnested=true)", model_config.name, count, len(labels[tasks[0]]),
                        " -> ".join(tasks), pairs)
        return
    rows = source = None
    if data is not None:
        table = data.splits.train
        rows = table[ROW].to_numpy() if ROW in table.columns else None
        source = data.splits.sources.get("train")
    check_nested_labels(labels, tasks, rows=rows, source=source, model=model_config.name)
