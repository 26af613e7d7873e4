"""Loss balancing: how a weight step combines the losses of its units, for any model.

A unit is a task or a (domain, task) pair (`mdmt_tf.training.losses.unit_losses`; with
task weights, each unit carries its task's). Without balancing the step follows the sum of
the units. The strategies (`--loss-balance`):

uwl (uncertainty weighting; Kendall, Gal and Cipolla, CVPR 2018)
    A learned log-variance s_u per unit: L = sum_u exp(-s_u) L_u + s_u / 2, the form of
    their classification likelihood (1 / sigma^2 L + log sigma, s = log sigma^2). The s_u
    are trained by the weight optimizer with the network. Weight of a unit: exp(-s_u).

gradnorm (Chen, Badrinarayanan, Lee and Rabinovich, ICML 2018)
    Weights w_u (starting at 1) in L = sum_u w_u L_u. After each step's gradients, with
    n_u the norm of dL_u / dW over the shared weights W, G_u = w_u n_u, the mean G, the
    loss ratio r_u = (L_u / L_u(0)) / mean(L / L(0)) and the target G * r_u^alpha held
    constant, the weights take an Adam step (the network's learning rate) on
    sum_u |G_u - target_u|, whose gradient is sign(G_u - target_u) n_u; then they are
    renormalised to sum to the number of units (and kept >= 1e-3). The paper's W is the
    last shared layer; here it is every shared weight (see below), as no model names a
    "last shared layer".

metabalance (He et al., WWW 2022; seed 002)
    For every shared weight, the auxiliary units' gradients are pulled towards the target
    task's magnitude: with moving averages m_tar = beta m_tar + (1 - beta) |g_tar| and
    m_a = beta m_a + (1 - beta) |g_a| (per weight and unit), g_a <- g_a (r m_tar / m_a +
    1 - r), r the relax factor. The target is `--target-task` (its units: the task, or its
    (domain, task) pairs). Weights that only one unit reaches keep their gradient.

Shared weights: those two or more units' gradients reach at the same entries (`overlap`):
the embedding tables, the experts of MMoE / PLE / M3oE and the like; not the towers or the
gates, even where a model stacks every task's slice in one variable (each task's gradient
then lives in its own slice). gradnorm and metabalance compute one gradient per unit (a backward
pass each: U units cost U backward passes a step), in one replica: they refuse a
distribution strategy, whose replicas would each see their local gradients' norms. The
regularisation's gradient (embedding L2) is added unbalanced.
"""
from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from mdmt_tf.errors import ConfigError
from mdmt_tf.layers._util import register
from mdmt_tf.training.losses import unit_names
from mdmt_tf.training.options import BALANCE_UNITS, BALANCES


def norm(gradient) -> tf.Tensor:
    """The Euclidean norm of a gradient; an IndexedSlices' repeated rows are summed first
    (its dense value's norm, without densifying)."""
    if isinstance(gradient, tf.IndexedSlices):
        rows, position = tf.unique(gradient.indices)
        values = tf.math.unsorted_segment_sum(tf.cast(gradient.values, "float32"), position, tf.shape(rows)[0])
        return tf.norm(values)
    return tf.norm(tf.cast(gradient, "float32"))


def _scale(gradient, factor):
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(gradient.values * tf.cast(factor, gradient.values.dtype), gradient.indices,
                                gradient.dense_shape)
    return gradient * tf.cast(factor, gradient.dtype)


def _add(a, b):
    """a + b for gradients (None: nothing); IndexedSlices stay sparse (their rows concatenated)."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tf.IndexedSlices) and isinstance(b, tf.IndexedSlices):
        return tf.IndexedSlices(tf.concat([a.values, b.values], 0), tf.concat([a.indices, b.indices], 0),
                                a.dense_shape)
    return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)


class LossBalance(keras.layers.Layer):
    """The base of the strategies. A step computes, inside its gradient tape, the unit losses,
    the regularisation and `total = combine(losses) + regularisation` (times 1 / replicas);
    then `gradients(tape, losses, regularisation, total, variables)` gives the step's
    gradients; `weights_now()` each unit's current weight (for reports). `unit`: "task"
    or "pair" (what the units are)."""

    per_unit_gradients = False  # True: one backward pass per unit, in one replica (persistent tape)

    def __init__(self, units, unit: str = "task", **kwargs):
        super().__init__(**kwargs)
        self.units, self.unit = list(units), unit
        if len(self.units) < 2:
            raise ConfigError(f"loss balancing needs at least two units (tasks or (domain, task) pairs); "
                              f"got {self.units}")

    def combine(self, losses: list):
        return sum(losses[1:], losses[0])

    def gradients(self, tape, losses: list, regularisation, total, variables: list) -> list:
        return tape.gradient(total, variables)

    def weights_now(self) -> list[float]:
        return [1.0] * len(self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "unit": self.unit}


@register
class UncertaintyWeighting(LossBalance):
    """uwl (see the module doc): learned log-variances, trained with the network."""

    def build(self, input_shape=None):
        self.log_variance = self.add_weight(shape=(len(self.units),), initializer="zeros", name="log_variance")
        self.built = True

    def combine(self, losses: list):
        s = ops.cast(self.log_variance, "float32")
        return ops.sum(ops.exp(-s) * ops.stack([ops.cast(x, "float32") for x in losses]) + 0.5 * s)

    def weights_now(self) -> list[float]:
        return [float(v) for v in ops.convert_to_numpy(ops.exp(-self.log_variance))]


def _unit_gradients(tape, losses: list, variables: list) -> list[list]:
    """Per unit, the gradient of its loss for every variable (None: not connected)."""
    return [tape.gradient(loss, variables) for loss in losses]


def _shared(per_unit: list[list], count: int) -> list[bool]:
    """Per variable, whether two or more units reach it (in the graph: the others' gradient is None)."""
    return [sum(grads[i] is not None for grads in per_unit) >= 2 for i in range(count)]


def overlap(gradients: list) -> tf.Tensor:
    """Whether two or more of the (not None) gradients of one variable are nonzero at the
    same entry: a variable that stacks one slice per task (fused towers or gates) is reached
    by every task in the graph, but each task's gradient lives in its own slice, so it is not
    shared. Row-sparse gradients (embedding tables) count as shared."""
    present = [g for g in gradients if g is not None]
    if len(present) < 2:
        return tf.constant(False)
    if any(isinstance(g, tf.IndexedSlices) for g in present):
        return tf.constant(True)
    touched = tf.add_n([tf.cast(tf.not_equal(g, 0), tf.int32) for g in present])
    return tf.reduce_any(touched >= 2)


def _regularisation_gradients(tape, regularisation, variables):
    if isinstance(regularisation, (int, float)):
        return [None] * len(variables)
    return tape.gradient(regularisation, variables)


@register
class GradNorm(LossBalance):
    """gradnorm (see the module doc)."""

    per_unit_gradients = True

    def __init__(self, units, alpha: float = 1.5, learning_rate: float = 1e-3, **kwargs):
        super().__init__(units, **kwargs)
        if alpha < 0 or learning_rate <= 0:
            raise ConfigError(f"GradNorm needs alpha >= 0 and a positive learning rate; got alpha={alpha}, "
                              f"learning_rate={learning_rate}")
        self.alpha, self.learning_rate = float(alpha), float(learning_rate)
        self.optimizer = keras.optimizers.Adam(self.learning_rate, name="gradnorm_optimizer")

    def build(self, input_shape=None):
        n = len(self.units)
        self.loss_weights = self.add_weight(shape=(n,), initializer="ones", trainable=False, name="loss_weights")
        self.initial_losses = self.add_weight(shape=(n,), initializer="zeros", trainable=False,
                                              name="initial_losses")
        self.optimizer.build([self.loss_weights])
        self.built = True

    def combine(self, losses: list):
        return ops.sum(ops.stack([ops.cast(x, "float32") for x in losses]) * self.loss_weights)

    def gradients(self, tape, losses, regularisation, total, variables):
        per_unit = _unit_gradients(tape, losses, variables)
        shared = _shared(per_unit, len(variables))
        w = ops.convert_to_tensor(self.loss_weights)
        grads = list(_regularisation_gradients(tape, regularisation, variables))
        for u, unit_grads in enumerate(per_unit):
            for i, g in enumerate(unit_grads):
                if g is not None:
                    grads[i] = _add(grads[i], _scale(g, w[u]))
        weight = [tf.cast(overlap([grads_u[i] for grads_u in per_unit]), tf.float32) if shared[i] else None
                  for i in range(len(variables))]
        norms = ops.stack([tf.sqrt(tf.add_n([weight[i] * tf.square(norm(g)) for i, g in enumerate(unit_grads)
                                             if weight[i] is not None and g is not None] or [tf.zeros(())]))
                           for unit_grads in per_unit])
        self._update_weights(ops.stack([ops.cast(x, "float32") for x in losses]), norms)
        return grads

    def _update_weights(self, losses, norms):
        """One GradNorm step on the weights (their gradient written out: see the module doc).
        A unit absent from the batch (loss 0) keeps its weight and takes no part in the means."""
        present = ops.cast(losses > 0, "float32")
        first = ops.logical_and(self.initial_losses <= 0, losses > 0)
        self.initial_losses.assign(ops.where(first, losses, self.initial_losses))
        count = ops.maximum(ops.sum(present), 1.0)
        ratio = ops.where(present > 0, losses / ops.maximum(self.initial_losses, 1e-12), 0.0)
        relative = ratio / ops.maximum(ops.sum(ratio) / count, 1e-12)
        g = self.loss_weights * norms
        mean_g = ops.sum(g * present) / count
        target = ops.stop_gradient(mean_g * ops.power(relative, self.alpha))
        grad = ops.sign(g - target) * norms * present
        self.optimizer.apply([grad], [self.loss_weights])
        clipped = ops.maximum(self.loss_weights, 1e-3)
        self.loss_weights.assign(clipped * len(self.units) / ops.sum(clipped))

    def weights_now(self) -> list[float]:
        return [float(v) for v in ops.convert_to_numpy(self.loss_weights)]

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "learning_rate": self.learning_rate}


@register
class MetaBalance(LossBalance):
    """metabalance (see the module doc); `targets`: the indices of the target task's units."""

    per_unit_gradients = True

    def __init__(self, units, targets, relax: float = 0.7, beta: float = 0.9, **kwargs):
        super().__init__(units, **kwargs)
        self.targets = sorted(int(t) for t in targets)
        if not self.targets or len(self.targets) == len(self.units):
            raise ConfigError(f"MetaBalance needs target units and auxiliary ones; got targets {self.targets} of "
                              f"{self.units}")
        if not 0 <= relax <= 1 or not 0 <= beta < 1:
            raise ConfigError(f"MetaBalance needs 0 <= relax <= 1 and 0 <= beta < 1; got relax={relax}, beta={beta}")
        self.relax, self.beta = float(relax), float(beta)
        self.variable_count = 0

    def build_for(self, variable_count: int) -> None:
        """The moving averages of the step's `variable_count` weights (per weight: the
        target's magnitude, and each unit's)."""
        self.variable_count = int(variable_count)
        self.target_magnitude = self.add_weight(shape=(self.variable_count,), initializer="zeros",
                                                trainable=False, name="target_magnitude")
        self.unit_magnitude = self.add_weight(shape=(self.variable_count, len(self.units)), initializer="zeros",
                                              trainable=False, name="unit_magnitude")
        self.built = True

    def _average(self, old, new):
        """The moving average; a zero magnitude (a unit absent from the batch) leaves it as it was."""
        return ops.where(new > 0, self.beta * old + (1.0 - self.beta) * new, old)

    def gradients(self, tape, losses, regularisation, total, variables):
        if len(variables) != self.variable_count:
            raise ValueError(f"MetaBalance was built for {self.variable_count} variables, received {len(variables)}")
        per_unit = _unit_gradients(tape, losses, variables)
        shared = _shared(per_unit, len(variables))
        grads = list(_regularisation_gradients(tape, regularisation, variables))
        target_updates, unit_updates = [], []
        for i in range(len(variables)):
            unit_grads = [per_unit[u][i] for u in range(len(self.units))]
            target = None
            for u in self.targets:
                target = _add(target, unit_grads[u])
            if not shared[i] or target is None:  # one unit's weight, or none of the target's: summed as they are
                for g in unit_grads:
                    grads[i] = _add(grads[i], g)
                target_updates.append(self.target_magnitude[i])
                unit_updates.append(self.unit_magnitude[i])
                continue
            # shared with the target (a stacked per-task variable is not: see `overlap`)
            with_target = [overlap([target, g]) if u not in self.targets and g is not None else None
                           for u, g in enumerate(unit_grads)]
            any_shared = tf.reduce_any(tf.stack([w for w in with_target if w is not None] or [tf.constant(False)]))
            m_target = self._average(self.target_magnitude[i], ops.where(any_shared, norm(target), 0.0))
            target_updates.append(m_target)
            row = []
            grads[i] = _add(grads[i], target)
            for u, g in enumerate(unit_grads):
                if with_target[u] is None:
                    row.append(self.unit_magnitude[i, u])
                    if u not in self.targets and g is not None:
                        grads[i] = _add(grads[i], g)
                    continue
                m_unit = self._average(self.unit_magnitude[i, u], ops.where(with_target[u], norm(g), 0.0))
                row.append(m_unit)
                pulled = self.relax * ops.where(m_unit > 0, m_target / ops.maximum(m_unit, 1e-12), 1.0) \
                    + (1.0 - self.relax)
                grads[i] = _add(grads[i], _scale(g, ops.where(with_target[u], pulled, 1.0)))
            unit_updates.append(ops.stack(row))
        self.target_magnitude.assign(ops.stack(target_updates))
        self.unit_magnitude.assign(ops.stack(unit_updates))
        return grads

    def weights_now(self) -> list[float]:
        """Per unit, the mean over shared weights of its scaling m_tar / m_u (1 for the target)."""
        target = ops.convert_to_numpy(self.target_magnitude)
        units = ops.convert_to_numpy(self.unit_magnitude)
        out = []
        for u in range(len(self.units)):
            seen = units[:, u] > 0
            out.append(1.0 if u in self.targets or not seen.any() else
                       float((target[seen] / units[seen, u]).mean()))
        return out

    def get_config(self):
        return {**super().get_config(), "targets": self.targets, "relax": self.relax, "beta": self.beta}


def make_balance(method: str, domains, tasks, *, unit: str = "task", target_task: str = "", alpha: float = 1.5,
                 relax: float = 0.7, beta: float = 0.9, learning_rate: float = 1e-3) -> LossBalance | None:
    """The strategy `method` over the units of `unit` (None for "none"); metabalance's
    target units are those of `target_task` (default: the first task)."""
    if method not in BALANCES:
        raise ConfigError(f"loss balance must be one of {list(BALANCES)}, got {method!r}")
    if method == "none":
        return None
    units = unit_names(domains, tasks, unit) if unit in BALANCE_UNITS else None
    if units is None:
        raise ConfigError(f"balance unit must be one of {list(BALANCE_UNITS)}, got {unit!r}")
    if method == "uwl":
        return UncertaintyWeighting(units, unit=unit, name="loss_balance")
    if method == "gradnorm":
        return GradNorm(units, unit=unit, alpha=alpha, learning_rate=learning_rate, name="loss_balance")
    target = target_task or tasks[0]
    if target not in tasks:
        raise ConfigError(f"target task {target!r} is not a task; tasks: {list(tasks)}")
    task_of = list(tasks) if unit == "task" else [t for _ in domains for t in tasks]
    targets = [i for i, task in enumerate(task_of) if task == target]
    return MetaBalance(units, targets, unit=unit, relax=relax, beta=beta, name="loss_balance")
