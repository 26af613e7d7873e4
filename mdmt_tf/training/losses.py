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
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, received {reduction!r}")
    onehot = ops.one_hot(ops.cast(domain, "int32"), num_domains, dtype="float32")  # [B, D]
    counts = ops.maximum(ops.sum(onehot, axis=0), 1.0)  # [D]
    total = 0.0
    for task in tasks:
        losses = bce(ops.reshape(labels[task], (-1,)), ops.reshape(probs[task], (-1,)))  # [B]
        if reduction == "pair":
            per_domain = ops.sum(onehot * losses[:, None], axis=0) / counts  # mean within each pair
            task_loss = ops.sum(per_domain)
        else:
            task_loss = ops.mean(losses)
        weight = 1.0 if task_weights is None else float(task_weights.get(task, 1.0))
        total = total + weight * task_loss
    return total
