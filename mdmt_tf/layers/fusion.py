"""M3oE's two-level fusion: balance (beta, level 1) and amplitude (alpha, level 2).

Level 1, within a view of G experts (G domains or G tasks), group g's view is

    view_g = sigmoid(beta_g) * E_g + (1 - sigmoid(beta_g)) / (G - 1) * sum_{j != g} E_j

(with one group, view = E). Level 2, per (domain d, task t) tower:

    fused[d, t] = shared_view[d, t] + sigmoid(alpha_d) * domain_view[d] + sigmoid(alpha_t) * task_view[t]

beta and alpha are architecture variables (see `architecture_weights`), scalars as in
the authors' code or one per group ("vector").
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from mdmt_tf.layers._util import check_positive_int, register, select_by_domain
from mdmt_tf.layers.records import ArchValue

GRANULARITIES = ("scalar", "vector")
GROUPS = ("domain", "task")


def _check_granularity(value, layer):
    if value not in GRANULARITIES:
        raise ValueError(f"{layer}: `granularity` must be one of {GRANULARITIES}, received {value!r}")
    return value


@register
class Balance(keras.layers.Layer):
    """Level-1 fusion: [B, G, H] expert outputs -> [B, G, H] views.

    Args:
      num_groups: G (domains or tasks).
      granularity: "scalar" (one beta for all groups) or "vector" (one per group).
      initial: raw initial value of beta (sigmoid(1) = 0.73).
      stop_gradient_others: view g sees the other groups' experts through stop_gradient
        (AFTB: a tower's loss then trains only its own group's expert).
      group: what the groups are, "domain" or "task" (how its beta is reported).
    """

    def __init__(self, num_groups, granularity="scalar", initial=1.0, stop_gradient_others=False, group="domain",
                 **kwargs):
        super().__init__(**kwargs)
        self.num_groups = check_positive_int(num_groups, "num_groups", "Balance")
        if group not in GROUPS:
            raise ValueError(f"Balance: `group` must be one of {GROUPS}, received group={group!r}")
        self.group = group
        self.granularity = _check_granularity(granularity, "Balance")
        self.initial = float(initial)
        self.stop_gradient_others = bool(stop_gradient_others)

    def build(self, input_shape=None):
        size = self.num_groups if self.granularity == "vector" else 1
        self.beta = self.add_weight(name="beta", shape=(size,), initializer=keras.initializers.Constant(self.initial))

    @property
    def architecture_weights(self):
        return [self.beta]

    def architecture_values(self) -> list[ArchValue]:
        return [ArchValue("beta", self.group, _sigmoid(self.beta))]

    def call(self, experts):
        if self.num_groups == 1:
            return experts
        own = ops.reshape(ops.sigmoid(ops.cast(self.beta, experts.dtype)), (1, -1, 1))
        source = ops.stop_gradient(experts) if self.stop_gradient_others else experts
        others = ops.sum(source, axis=1, keepdims=True) - source  # sum over j != g
        return own * experts + (1.0 - own) / (self.num_groups - 1) * others

    def get_config(self):
        return {**super().get_config(), "num_groups": self.num_groups, "granularity": self.granularity,
                "initial": self.initial, "stop_gradient_others": self.stop_gradient_others, "group": self.group}


@register
class Amplitude(keras.layers.Layer):
    """Level-2 fusion for each sample's own domain and every task.

    call(shared_view [B, T, H], domain_view [B, H] (own domain), task_view [B, T, H],
    domain [B]) -> fused [B, T, H].
    """

    def __init__(self, num_domains, num_tasks, granularity="scalar", initial=1.0, **kwargs):
        super().__init__(**kwargs)
        self.num_domains = check_positive_int(num_domains, "num_domains", "Amplitude")
        self.num_tasks = check_positive_int(num_tasks, "num_tasks", "Amplitude")
        self.granularity = _check_granularity(granularity, "Amplitude")
        self.initial = float(initial)

    def build(self, input_shape=None):
        vector = self.granularity == "vector"
        init = keras.initializers.Constant(self.initial)
        self.alpha_domain = self.add_weight(name="alpha_domain", shape=(self.num_domains if vector else 1,),
                                            initializer=init)
        self.alpha_task = self.add_weight(name="alpha_task", shape=(self.num_tasks if vector else 1,),
                                          initializer=init)

    @property
    def architecture_weights(self):
        return [self.alpha_domain, self.alpha_task]

    def architecture_values(self) -> list[ArchValue]:
        return [ArchValue("alpha", "domain", _sigmoid(self.alpha_domain)),
                ArchValue("alpha", "task", _sigmoid(self.alpha_task))]

    def call(self, shared_view, domain_view, task_view, domain):
        dtype = shared_view.dtype
        a_domain = ops.sigmoid(ops.cast(self.alpha_domain, dtype))
        if self.granularity == "vector":
            a_domain = select_by_domain(ops.broadcast_to(a_domain[None], (ops.shape(domain)[0], self.num_domains)),
                                        domain, self.num_domains)
            a_domain = ops.reshape(a_domain, (-1, 1, 1))
        a_task = ops.reshape(ops.sigmoid(ops.cast(self.alpha_task, dtype)), (1, -1, 1))
        return shared_view + a_domain * domain_view[:, None, :] + a_task * task_view

    def get_config(self):
        return {**super().get_config(), "num_domains": self.num_domains, "num_tasks": self.num_tasks,
                "granularity": self.granularity, "initial": self.initial}


def _sigmoid(variable) -> np.ndarray:
    """sigmoid of a variable's value, in float64 NumPy (what the fusion applies)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(ops.convert_to_numpy(variable), dtype=np.float64)))
