"""MAMDR (Luo et al., ICDE 2023): model-agnostic multi-domain learning.

Domain Negotiation (DN), on the shared parameters theta, one outer iteration:
    theta~ <- theta; shuffle the domains; for each domain i in that order take
    `inner_steps` steps theta~ <- theta~ - alpha * grad L(theta~, batch of domain i);
    then theta <- theta + beta * (theta~ - theta)                          (Reptile-style)

Domain Regularization (DR), on domain-specific parameters theta_i (the model for domain i
is theta + theta_i): for each domain i, for each of k sampled other domains j:
    theta~_i <- theta_i; a step on domain j's batch, then a step on domain i's batch
    (both w.r.t. theta~_i at theta + theta~_i); theta_i <- theta_i + gamma * (theta~_i - theta_i)
DR never changes theta.

Strategies: "dn" (DN only), "dr" (theta trained by plain steps on all domains, theta_i by
DR), "mamdr" (DN then DR each iteration, Algorithm 3). Domain-specific parameters cover
the dense weights (scope "dense") or every trainable variable (scope "all"). Serving uses
theta + theta_d for each sample's domain d (DomainSpecificModel).

One train_step = one outer iteration and receives one batch per domain.
"""
from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from mdmt_tf.errors import ConfigError
from mdmt_tf.layers._util import select_by_domain
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.training.losses import mdmt_loss

STRATEGIES = ("dn", "dr", "mamdr")
SCOPES = ("dense", "all")
INNER_OPTIMIZERS = ("sgd", "adam")


def specific_mask(model: MDMTModel, scope: str) -> list[bool]:
    """Which trainable variables get domain-specific copies."""
    if scope not in SCOPES:
        raise ConfigError(f"MAMDR scope must be one of {list(SCOPES)}, got {scope!r}")
    return [scope == "all" or "embedding" not in v.path for v in model.trainable_variables]


class MAMDRTrainer(keras.Model):
    """One train_step = one DN / DR iteration over a tuple of per-domain (x, y) batches."""

    def __init__(self, model: MDMTModel, *, strategy: str = "mamdr", domains: list[int] | None = None,
                 inner_lr: float = 1e-3, outer_lr: float = 0.5, dr_lr: float = 0.5, k: int = 2,
                 inner_steps: int = 1, inner_optimizer: str = "adam", learning_rate: float = 1e-3,
                 scope: str = "dense", seed: int = 0, task_weights: dict | None = None,
                 loss_reduction: str = "pair", **kwargs):
        super().__init__(name=kwargs.pop("name", "mamdr_trainer"), **kwargs)
        if strategy not in STRATEGIES:
            raise ConfigError(f"MAMDR strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(f"inner_optimizer must be one of {list(INNER_OPTIMIZERS)}, got {inner_optimizer!r}")
        for name, value in (("inner_lr", inner_lr), ("outer_lr", outer_lr), ("dr_lr", dr_lr)):
            if not value > 0:
                raise ConfigError(f"MAMDR {name} must be > 0, got {value}")
        if k < 1 or inner_steps < 1:
            raise ConfigError(f"MAMDR k and inner_steps must be >= 1, got k={k}, inner_steps={inner_steps}")
        self.net = model
        self.strategy = strategy
        self.domain_ids = list(domains if domains is not None else range(model.schema.num_domains))
        if len(self.domain_ids) < 2 and strategy != "dn":
            raise ConfigError("MAMDR's Domain Regularization needs at least 2 domains with training data")
        self.outer_lr, self.dr_lr = float(outer_lr), float(dr_lr)
        self.k = min(int(k), max(1, len(self.domain_ids) - 1))
        self.inner_steps = int(inner_steps)
        self.seed = int(seed)
        self.task_weights, self.loss_reduction = dict(task_weights or {}), loss_reduction
        variables = model.trainable_variables
        self.use_dn = strategy in ("dn", "mamdr")
        self.use_dr = strategy in ("dr", "mamdr")
        self.mask = specific_mask(model, scope) if self.use_dr else [False] * len(variables)
        # theta_i per domain (zeros: the model starts shared)
        self.deltas = [[keras.Variable(ops.zeros(v.shape, v.dtype), trainable=False, name=f"delta_{d}_{i}")
                        if self.mask[i] else None for i, v in enumerate(variables)]
                       for d in range(model.schema.num_domains)] if self.use_dr else []
        self.backup = [keras.Variable(ops.zeros(v.shape, v.dtype), trainable=False, name=f"theta_{i}")
                       for i, v in enumerate(variables)] if self.use_dn else []
        self.scratch = [keras.Variable(ops.zeros(v.shape, v.dtype), trainable=False, name=f"scratch_{i}")
                        if self.mask[i] else None for i, v in enumerate(variables)] if self.use_dr else []

        def make(lr):
            return keras.optimizers.SGD(lr) if inner_optimizer == "sgd" else keras.optimizers.Adam(lr)

        self.inner_optimizer = make(inner_lr)  # DN's inner loop (or plain steps for "dr")
        self.inner_optimizer.build(variables)
        self.plain_optimizer = keras.optimizers.Adam(learning_rate)
        if strategy == "dr":
            self.plain_optimizer.build(variables)
        self.dr_optimizer = keras.optimizers.SGD(inner_lr)  # the theta~_i steps
        if self.use_dr:
            self.dr_optimizer.build([s for s in self.scratch if s is not None])
        self.iterations_done = keras.Variable(0, dtype="int64", trainable=False, name="outer_iterations")
        self.last_order = keras.Variable(ops.zeros((len(self.domain_ids),), "int32"), trainable=False,
                                         name="last_domain_order")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.built = True  # every variable exists

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, features, training=None):
        return self.net(features, training=training)

    def compile(self, **kwargs):
        super().compile(optimizer=self.inner_optimizer, jit_compile=False, **kwargs)

    # ------------------------------------------------------------------ pieces
    def _values(self, domain_slot: int | None, delta_override=None):
        """Trainable values theta (+ theta_d for the specific ones)."""
        values = []
        for i, v in enumerate(self.net.trainable_variables):
            value = v.value if hasattr(v, "value") else v
            if domain_slot is not None and self.mask[i]:
                delta = delta_override[i] if delta_override is not None else self.deltas[domain_slot][i]
                value = value + delta
            values.append(value)
        return values

    def _loss(self, features, labels, values):
        outputs, non_trainable, losses = self.net.stateless_call(
            values, [v.value for v in self.net.non_trainable_variables], features, training=True,
            return_losses=True)
        for variable, value in zip(self.net.non_trainable_variables, non_trainable):
            variable.assign(value)
        loss = mdmt_loss(labels, outputs, features[self.net.schema.domain], self.net.schema.num_domains,
                         self.net.schema.tasks, self.task_weights, self.loss_reduction)
        return loss + (ops.sum(ops.stack([ops.cast(l, "float32") for l in losses])) if losses else 0.0), loss

    def _shared_step(self, optimizer, features, labels, slot):
        """One step on theta with the loss of domain `slot`'s batch at theta + theta_slot."""
        variables = self.net.trainable_variables
        with tf.GradientTape() as tape:
            total, loss = self._loss(features, labels, self._values(slot if self.use_dr else None))
        optimizer.apply(tape.gradient(total, variables), variables)
        return loss

    def _batch_of(self, batches, slot_tensor):
        branches = [lambda b=b: b for b in batches]
        return tf.switch_case(slot_tensor, branches)

    # ------------------------------------------------------------------ DN / DR
    def domain_negotiation(self, batches):
        """One DN outer iteration over per-domain batches (tuple, in domain_ids order)."""
        variables = self.net.trainable_variables
        for saved, v in zip(self.backup, variables):
            saved.assign(v)
        order = tf.random.shuffle(tf.range(len(batches), dtype=tf.int32),
                                  seed=self.seed) if len(batches) > 1 else tf.zeros((1,), tf.int32)
        self.last_order.assign(order)
        losses = []
        for position in range(len(batches)):
            slot = order[position]
            features, labels = self._batch_of(batches, slot)
            domain_slot = tf.gather(tf.constant(self.domain_ids, tf.int32), slot)
            for _ in range(self.inner_steps):
                losses.append(self._inner_step(features, labels, domain_slot))
        for saved, v in zip(self.backup, variables):
            v.assign(saved + self.outer_lr * (v - saved))
        return ops.mean(ops.stack(losses))

    def _inner_step(self, features, labels, domain_slot):
        variables = self.net.trainable_variables
        with tf.GradientTape() as tape:
            values = self._values_for(domain_slot)
            total, loss = self._loss(features, labels, values)
        self.inner_optimizer.apply(tape.gradient(total, variables), variables)
        return loss

    def _values_for(self, domain_slot):
        """theta + theta_d with d a tensor (gathered from the stacked deltas)."""
        if not self.use_dr:
            return self._values(None)
        values = []
        for i, v in enumerate(self.net.trainable_variables):
            value = v.value
            if self.mask[i]:
                stacked = ops.stack([self.deltas[d][i].value for d in range(self.net.schema.num_domains)])
                value = value + ops.take(stacked, domain_slot, axis=0)
            values.append(value)
        return values

    def domain_regularization(self, batches):
        """One DR pass: update theta_i of every domain; theta is not changed."""
        losses = []
        n = len(batches)
        for slot, domain in enumerate(self.domain_ids):
            others = [j for j in range(n) if j != slot]
            picked = tf.random.shuffle(tf.constant(others, tf.int32), seed=self.seed + 1)[: self.k]
            for r in range(self.k):
                for scratch, delta in zip(self.scratch, self.deltas[domain]):
                    if scratch is not None:
                        scratch.assign(delta)
                other_features, other_labels = self._batch_of(batches, picked[r])
                losses.append(self._dr_step(other_features, other_labels))
                features, labels = batches[slot]
                losses.append(self._dr_step(features, labels))
                for scratch, delta in zip(self.scratch, self.deltas[domain]):
                    if scratch is not None:
                        delta.assign(delta + self.dr_lr * (scratch - delta))
        return ops.mean(ops.stack(losses))

    def _dr_step(self, features, labels):
        """A step on theta~_i (the scratch copy) with the loss at theta + theta~_i."""
        scratch = [s for s in self.scratch if s is not None]
        handles = [s.value for s in scratch]  # the backing tf.Variables (not trainable: watch them)
        with tf.GradientTape() as tape:
            tape.watch(handles)
            values = self._values(0, delta_override=[s.value if s is not None else None for s in self.scratch])
            total, loss = self._loss(features, labels, values)
        self.dr_optimizer.apply(tape.gradient(total, handles), scratch)
        return loss

    def _plain_step(self, batches):
        losses = [self._shared_step(self.plain_optimizer, f, y, d) for (f, y), d in zip(batches, self.domain_ids)]
        return ops.mean(ops.stack(losses))

    def train_step(self, data):
        batches = tuple(data)
        if self.use_dn:
            loss = self.domain_negotiation(batches)
        else:
            loss = self._plain_step(batches)
        if self.use_dr:
            self.domain_regularization(batches)
        self.iterations_done.assign_add(1)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def serving_model(self) -> keras.Model:
        """The model to evaluate and export: theta + theta_d per sample with DR, else theta."""
        if not self.use_dr:
            return self.net
        return DomainSpecificModel(self.net, self.deltas)


class DomainSpecificModel(keras.Model):
    """Scores each sample with theta + theta_d, d its domain: the wrapped model is run once
    per domain with that domain's parameters (Keras stateless_call) and each sample keeps
    its own domain's outputs. Exportable like the wrapped model."""

    def __init__(self, base: MDMTModel, deltas, **kwargs):
        super().__init__(name=kwargs.pop("name", base.name), **kwargs)
        self.base = base
        self.schema = base.schema
        # a flat (tracked, hence exported) list of the theta_d variables, and per domain the
        # index of each trainable variable's delta in it (None: no domain-specific copy)
        self.delta_variables = [delta for row in deltas for delta in row if delta is not None]
        positions, layout = iter(range(len(self.delta_variables))), []
        for row in deltas:
            layout.append(tuple(None if delta is None else next(positions) for delta in row))
        self.layout = tuple(layout)

    def call(self, features, training=None):
        domain = ops.cast(features[self.schema.domain], "int32")
        non_trainable = [v.value for v in self.base.non_trainable_variables]
        per_domain = []
        for row in self.layout:
            values = [v.value if i is None else v.value + self.delta_variables[i].value
                      for v, i in zip(self.base.trainable_variables, row)]
            outputs, _ = self.base.stateless_call(values, non_trainable, features, training=False)
            per_domain.append(outputs)
        return {task: select_by_domain(ops.stack([o[task] for o in per_domain], axis=1), domain,
                                       self.schema.num_domains)
                for task in self.schema.tasks}

    def architecture_values(self):
        return self.base.architecture_values()
