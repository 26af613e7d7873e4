"""The MDMT training loss.

    L = sum_t w_t * sum_d mean_{i in domain d} BCE(y_it, p_it)

i.e. binary cross-entropy averaged within each (domain, task) pair of the batch, then
summed over pairs, with optional per-task weights w_t. A pair with no sample in the
batch contributes 0 (no division by zero). `reduction="sample"` instead averages over
the whole batch per task (sum_t w_t mean_i BCE), which weights domains by their size.
"""
from __future__ import annotations

from keras import ops

from mdmt_tf.training.options import REDUCTIONS

EPSILON = 1e-7


def bce(labels, probs):
    """Element-wise binary cross-entropy from probabilities, clipped to [eps, 1 - eps]."""
    p = ops.clip(ops.cast(probs, "float32"), EPSILON, 1.0 - EPSILON)
    y = ops.cast(labels, "float32")
    return -(y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p))


def mdmt_loss(labels: dict, probs: dict, domain, num_domains: int, tasks, task_weights=None,
              reduction: str = "pair"):
    """labels {task: [B]}, probs {task: [B, 1]}, domain [B] int -> scalar loss."""
    terms = unit_losses(labels, probs, domain, num_domains, tasks, task_weights, reduction, unit="task")
    return sum(terms[1:], terms[0])


def unit_names(domains, tasks, unit: str) -> list[str]:
    """The units a loss is split into: the tasks ("task") or the (domain, task) pairs
    ("pair", named "domain/task", domain-major)."""
    if unit == "task":
        return list(tasks)
    if unit == "pair":
        return [f"{d}/{t}" for d in domains for t in tasks]
    raise ValueError(f"unit must be 'task' or 'pair', received {unit!r}")


def unit_losses(labels: dict, probs: dict, domain, num_domains: int, tasks, task_weights=None,
                reduction: str = "pair", unit: str = "task") -> list:
    """The loss split into units (unit_names' order), each with its task's weight; the units
    sum to mdmt_loss. "pair" units under reduction "pair" are the pairs' means; under
    "sample" each pair's share of its task's batch mean (its BCE sum over the batch size)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, received {reduction!r}")
    onehot = ops.one_hot(ops.cast(domain, "int32"), num_domains, dtype="float32")  # [B, D]
    counts = ops.maximum(ops.sum(onehot, axis=0), 1.0)  # [D]
    per_task: dict = {}
    for task in tasks:
        losses = bce(ops.reshape(labels[task], (-1,)), ops.reshape(probs[task], (-1,)))  # [B]
        sums = ops.sum(onehot * losses[:, None], axis=0)  # [D]
        if reduction == "pair":
            per_domain = sums / counts  # mean within each pair
        else:
            per_domain = sums / ops.maximum(ops.cast(ops.shape(losses)[0], "float32"), 1.0)
        weight = 1.0 if task_weights is None else float(task_weights.get(task, 1.0))
        per_task[task] = weight * per_domain
    if unit == "task":
        return [ops.sum(per_task[t]) for t in tasks]
    unit_names(range(num_domains), tasks, unit)  # checks the unit
    return [per_task[t][d] for d in range(num_domains) for t in tasks]
