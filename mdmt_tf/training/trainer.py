"""MDMTTrainer: a Keras model wrapping an MDMTModel whose `train_step` implements
M3oE's AutoML search (first-order DARTS) and the alternatives it is measured against.

arch_mode
  bilevel  two optimizers over disjoint sets: the architecture optimizer
           updates only the architecture variables (alpha, beta, gate logits), on
           batches of a held-out stream, every `arch_period` steps; the weight optimizer
           updates only the other weights, on training batches, every step. An
           architecture step is taken first (at the current weights), then the weight step.
  joint    (default) one optimizer updates all variables, architecture ones included, on
           training batches (no search). The default since it matched or beat the search
           on ML-100K (both splits) and the synthetic data, on validation as on test
           (docs/results.md): the search moved alpha / beta and the AUC did not follow.
  fixed    architecture variables are frozen at their initial values.
  authors  the authors' released trainer, quirks included: (1) the weight optimizer holds
           every variable, the architecture ones too (their optimizer filter `~` on a bool
           is always true), so alpha / beta are trained jointly at the weight learning rate;
           (2) in addition, once per epoch, AFTER the epoch's last weight step, one step of
           the architecture optimizer on the next batch of a separate pass over the
           training data (`heldout` is that stream here: shuffled training batches, never
           the validation split); (3) that step's loss is plain binary cross-entropy averaged
           over the [batch, tasks] outputs, not the per-(domain, task) training loss.
           (Their first-order backward reaches every weight, but only the architecture
           optimizer steps, so only alpha / beta move: the same as here.) Their learning
           rates are --lr 0.01 --arch-lr 0.001, both Adam with a coupled weight decay of 1e-5
           (not reproduced: this trainer has no weight decay; embedding_l2 is the closest).

The held-out batches come from a tf.data iterator read inside the branch of a cond, so a
batch is consumed exactly when an architecture step runs. Models without architecture
variables train the same in every mode.

Loss: mdmt_tf.training.losses.mdmt_loss (per-(domain, task) BCE means summed, optional
task weights) plus the model's regularisation losses (embedding L2).

Stages: a model trained in several stages (MDMTModel.stages, e.g. MTMS) enters, at the
start of each epoch, the stage `model.stage_of_epoch(epoch)` (never going back: a model
restored or reloaded in a later stage stays there), and the trainer then rebuilds its train
function so that the weight optimizer updates only `model.trainable_in_stage(stage)`: the
other variables, and their optimizer slots, do not move at all (they are left out of the
optimizer's step, not given zero gradients, which Adam's momentum would still move). In a
stage where `model.supervised_in_stage(stage)` is False (SASS's contrastive pre-training) the
step optimises only the model's own losses (`model.losses`); the supervised loss is still
computed and reported as the loss. The
optimizer is built on every stage's variables, so checkpoints have one structure. Such
models train in arch_mode joint or fixed, without loss balancing; a model with one stage
takes exactly the single-stage path.
"""
from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from mdmt_tf.compat import NoSymbolicBuild, in_multi_worker_mode
from mdmt_tf.errors import ConfigError
from mdmt_tf.log import LOG
from mdmt_tf.models.base import MDMTModel
from mdmt_tf.training.losses import bce, mdmt_loss, unit_losses
from mdmt_tf.training.options import ARCH_MODES


def replicas_in_sync() -> int:
    """Replicas whose gradients are summed (Keras 3 all-reduces with SUM; 1 outside a
    strategy). Each replica's loss is divided by it, so N replicas take the step one device
    takes on the global batch: exactly for --loss-reduction sample (equal per-replica
    batches), and for the default "pair" reduction the mean of the replicas' per-(domain,
    task) means, which equals the global one in expectation."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_shard(batch):
    """This replica's rows of a batch every replica reads whole (the architecture step's
    held-out batch: each worker's iterator yields the same global batch, as they share the
    seed): rows i, i + N, i + 2N, ... for replica i of N; the batch itself outside a strategy.
    (With several devices in one process, each replica draws its own batch from the shared
    iterator and keeps its share of it.)"""
    context = tf.distribute.get_replica_context()
    n = context.num_replicas_in_sync if context is not None else 1
    if n == 1:
        return batch
    index = context.replica_id_in_sync_group
    return tf.nest.map_structure(lambda x: x[index::n], batch)


def step_logs(logs: dict) -> dict:
    """A train_step's logs. Across several workers Keras averages them along axis 0, which
    scalars lack: give them a length-1 axis there (it reduces back to a scalar)."""
    if in_multi_worker_mode():
        return {name: ops.reshape(value, (1,)) for name, value in logs.items()}
    return logs


class MDMTTrainer(NoSymbolicBuild, keras.Model):
    """Train `model` with the given arch_mode. Use like any Keras model:

        trainer = MDMTTrainer(model, arch_mode="bilevel", heldout=heldout_batches)
        trainer.compile()          # optimizers are the trainer's own
        trainer.fit(train_batches, epochs=...)
    """

    def __init__(self, model: MDMTModel, *, arch_mode: str = "joint", learning_rate: float = 1e-3,
                 arch_learning_rate: float = 3e-3, arch_period: int = 1, heldout=None,
                 steps_per_epoch: int | None = None, task_weights: dict | None = None,
                 loss_reduction: str = "pair", jit_compile: bool = False, weight_optimizer=None,
                 arch_optimizer=None, checkpoint_heldout: bool = True, balance=None, **kwargs):
        super().__init__(name=kwargs.pop("name", "trainer"), **kwargs)
        if arch_mode not in ARCH_MODES:
            raise ConfigError(f"arch_mode must be one of {list(ARCH_MODES)}, got {arch_mode!r}")
        if arch_period < 1:
            raise ConfigError(f"arch_period must be >= 1, got {arch_period}")
        unknown = sorted(set(task_weights or {}) - set(model.schema.tasks))
        if unknown:
            raise ConfigError(f"task weights name unknown task(s) {unknown}; tasks: {list(model.schema.tasks)}")
        self.net = model
        self.arch_mode = arch_mode
        self.arch_period = int(arch_period)
        self.task_weights = dict(task_weights or {})
        self.loss_reduction = loss_reduction
        # loss balancing (mdmt_tf.training.balance): None sums the losses
        self.balance = balance
        if balance is not None:
            if balance.per_unit_gradients and tf.distribute.has_strategy():
                raise ConfigError(f"loss balancing {type(balance).__name__} takes per-unit gradients in one replica: "
                                  "train it without a distribution strategy")
            if not hasattr(balance, "build_for"):
                balance.build()
        # a model trained in stages: the stage this trainer's step functions update (see the module doc)
        self.staged = len(model.stages) > 1
        self.stage = model.stage
        if self.staged and (arch_mode in ("bilevel", "authors") or balance is not None):
            balancing = f", loss balancing {type(balance).__name__}" if balance is not None else ""
            got = f"arch_mode {arch_mode!r}{balancing}"
            raise ConfigError(f"{model.name} trains in stages {list(model.stages)}: use arch_mode joint or fixed "
                              f"without loss balancing (got {got})")
        self.searching = bool(model.architecture_variables) and arch_mode in ("bilevel", "authors")
        if tf.distribute.has_strategy() and self.searching and (arch_mode == "authors" or arch_period > 1):
            raise ConfigError("under a distribution strategy the architecture step runs every step: use "
                              "--arch-mode bilevel with --arch-period 1 (or joint / fixed); a periodic step "
                              "would put the gradient all-reduce inside a conditional, which TF does not allow")
        if arch_mode == "authors" and self.searching and not steps_per_epoch:
            raise ConfigError("arch_mode 'authors' needs steps_per_epoch (one architecture step per epoch)")
        self.steps_per_epoch = int(steps_per_epoch or 0)

        if balance is not None and hasattr(balance, "build_for"):
            balance.build_for(len(self.weight_vars))
        self.weight_optimizer = weight_optimizer or keras.optimizers.Adam(learning_rate, name="weight_optimizer")
        self.weight_optimizer.build(self._weight_vars_of_every_stage())
        self.arch_optimizer = arch_optimizer or keras.optimizers.Adam(arch_learning_rate, name="arch_optimizer")
        if self.arch_vars:
            self.arch_optimizer.build(self.arch_vars)
        # step counters: identical on every replica, so each replica's increment is kept once
        self.weight_steps = keras.Variable(0, dtype="int64", trainable=False, name="weight_steps",
                                           aggregation="only_first_replica")
        self.arch_steps = keras.Variable(0, dtype="int64", trainable=False, name="arch_steps",
                                         aggregation="only_first_replica")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.arch_loss_tracker = keras.metrics.Mean(name="arch_loss")

        self._heldout = None
        if self.searching:
            if heldout is None:
                raise ConfigError(f"arch_mode {arch_mode!r} needs a stream of batches for the architecture steps "
                                  "(bilevel: a held-out slice of training data or the validation split; authors: "
                                  "a separate pass over the training data)")
            iterator = iter(heldout.repeat())
            # a checkpoint saves the iterator's position (a resumed run draws the batches the
            # uninterrupted one would), unless checkpoint_heldout is False: a streamed source's
            # state holds its whole shuffle buffer, and a Transform graph's lookup tables in a
            # map function cannot be serialized; a resumed run then starts the stream afresh
            self._heldout = iterator if checkpoint_heldout else _Untracked(iterator)
        if jit_compile and tf.distribute.has_strategy():
            raise ConfigError("--jit cannot be combined with a distribution strategy (a compiled step "
                              "may not hold the gradient all-reduce)")
        self.jit = bool(jit_compile)
        self._make_step_functions()
        self.built = True  # every variable exists (the model builds itself); lets Keras save weights

    def _make_step_functions(self):
        if self.jit:  # XLA-compile each step (Keras compiles train_step itself, without XLA)
            self._weight_step = tf.function(self._weight_step_impl, jit_compile=True, reduce_retracing=True)
            self._arch_step = tf.function(self._arch_step_impl, jit_compile=True, reduce_retracing=True)
        else:
            self._weight_step, self._arch_step = self._weight_step_impl, self._arch_step_impl

    # ------------------------------------------------------------------ variables
    @property
    def arch_vars(self) -> list:
        return self.net.architecture_variables

    @property
    def weight_vars(self) -> list:
        """What the weight optimizer updates: architecture variables excluded in bilevel /
        fixed mode, included in joint / authors mode; for a model trained in stages, those of
        the current stage only."""
        variables = self._weight_vars_of_every_stage()
        if not self.staged:
            return variables
        in_stage = {id(v) for v in self.net.trainable_in_stage(self.stage)}
        return [v for v in variables if id(v) in in_stage]

    def _weight_vars_of_every_stage(self) -> list:
        own = self.balance.trainable_variables if self.balance is not None else []
        if self.arch_mode in ("bilevel", "fixed"):
            return self.net.weight_variables + own
        return self.net.trainable_variables + own

    # ------------------------------------------------------------------ stages
    def enter_epoch(self, epoch: int) -> None:
        """Before 0-based `epoch`: move the model to its stage for that epoch (never back),
        and rebuild the step functions if their stage changed."""
        stage = max(self.net.stage, self.net.stage_of_epoch(epoch))
        if stage != self.net.stage:
            self.net.set_stage(stage)
        if stage != self.stage:
            LOG.info("%s: stage %r from epoch %d", self.net.name, self.net.stages[stage], epoch + 1)
            self.stage = stage
            self._make_step_functions()
            self.make_train_function(force=True)

    def fit(self, *args, callbacks=None, **kwargs):
        if self.staged:  # first, so the other callbacks' on_epoch_begin see the epoch's stage
            callbacks = [_StageSchedule(), *(callbacks or [])]
        return super().fit(*args, callbacks=callbacks, **kwargs)

    # ------------------------------------------------------------------ Keras API
    def call(self, features, training=None):
        return self.net(features, training=training)

    @property
    def metrics(self):
        return [self.loss_tracker, self.arch_loss_tracker]

    def compile(self, **kwargs):
        # the trainer applies its own optimizers; Keras' optimizer slot holds the weight one
        super().compile(optimizer=self.weight_optimizer, jit_compile=False, **kwargs)

    def loss_of(self, features, labels, training=True):
        """(loss + regularisation, loss) on one batch (a training pass also gives the model
        the labels, for a loss that reads them: MDMTModel.label_loss). In a stage without
        supervision (MDMTModel.supervised_in_stage) the first is the regularisation alone."""
        probs = self.net(features, training=training, labels=labels if training else None)
        loss = mdmt_loss(labels, probs, features[self.net.schema.domain], self.net.schema.num_domains,
                         self.net.schema.tasks, self.task_weights, self.loss_reduction)
        if self.staged and not self.net.supervised_in_stage(self.stage):
            return self._regularisation(), loss
        return loss + self._regularisation(), loss

    def _regularisation(self):
        return (ops.sum(ops.stack([ops.cast(term, "float32") for term in self.net.losses]))
                if self.net.losses else 0.0)

    def _weight_step_impl(self, features, labels):
        if self.balance is not None:
            return self._balanced_weight_step(features, labels)
        with tf.GradientTape() as tape:
            total, loss = self.loss_of(features, labels)
            scaled = total / replicas_in_sync()
        grads = tape.gradient(scaled, self.weight_vars)
        self.weight_optimizer.apply(grads, self.weight_vars)
        return loss

    def _balanced_weight_step(self, features, labels):
        """The weight step under loss balancing: the units' losses combined, or their
        gradients balanced, by self.balance (mdmt_tf.training.balance); returns the plain loss."""
        schema = self.net.schema
        with tf.GradientTape(persistent=self.balance.per_unit_gradients) as tape:
            probs = self.net(features, training=True, labels=labels)
            losses = unit_losses(labels, probs, features[schema.domain], schema.num_domains, schema.tasks,
                                 self.task_weights, self.loss_reduction, unit=self.balance.unit)
            regularisation = self._regularisation()
            total = (self.balance.combine(losses) + regularisation) / replicas_in_sync()
        grads = self.balance.gradients(tape, losses, regularisation, total, self.weight_vars)
        del tape
        self.weight_optimizer.apply(grads, self.weight_vars)
        return sum(losses[1:], losses[0])

    def arch_loss_of(self, features, labels):
        """(loss to differentiate, loss to report) of an architecture step: the training loss,
        or in authors mode the released code's plain BCE mean over the [batch, tasks] outputs."""
        if self.arch_mode != "authors":
            return self.loss_of(features, labels)
        probs = self.net(features, training=True)
        loss = ops.mean(ops.stack([ops.mean(bce(ops.reshape(labels[t], (-1,)), ops.reshape(probs[t], (-1,))))
                                   for t in self.net.schema.tasks]))
        return loss, loss

    def _arch_step_impl(self, features, labels):
        # watch only alpha / beta / gate logits: the tape then records (and back-propagates
        # through) just the ops downstream of them, not the whole network
        handles = [v.value for v in self.arch_vars]  # the backing tf.Variables
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(handles)
            total, loss = self.arch_loss_of(features, labels)
            scaled = total / replicas_in_sync()
        grads = tape.gradient(scaled, handles)
        self.arch_optimizer.apply(grads, self.arch_vars)
        return loss

    def _heldout_arch_step(self):
        if self._heldout is None:  # only searching trainers take architecture steps, and they all have one
            raise ValueError("MDMTTrainer: an architecture step needs the held-out stream")
        iterator = self._heldout.value if isinstance(self._heldout, _Untracked) else self._heldout
        held_features, held_labels = iterator.get_next()
        return self._arch_step(*replica_shard((held_features, held_labels)))

    def _maybe_arch_step(self):
        """An architecture step if one is due now; returns (its loss or 0, 1.0 if taken else 0.0).
        bilevel: before the weight step, every arch_period steps; authors: after the epoch's
        last weight step (weight_steps already counts it)."""
        if not self.searching:
            return ops.zeros(()), ops.zeros(())
        if self.arch_mode == "bilevel" and self.arch_period == 1:  # every step: no conditional needed
            self.arch_steps.assign_add(1)
            return self._heldout_arch_step(), ops.ones(())
        period = self.arch_period if self.arch_mode == "bilevel" else self.steps_per_epoch
        due = ops.equal(self.weight_steps % period, 0)
        loss = tf.cond(due, self._heldout_arch_step, lambda: tf.zeros(()))
        self.arch_steps.assign_add(ops.cast(due, "int64"))
        return loss, ops.cast(due, "float32")

    def serving_model(self, net: MDMTModel | None = None) -> keras.Model:
        """The model to evaluate and export: `net` (a copy of the trained model, e.g. in
        float32) or the trained model itself."""
        return self.net if net is None else net

    def steps_taken(self) -> dict:
        """{"weight": steps, "architecture": steps (only when searching)} so far."""
        steps = {"weight": int(ops.convert_to_numpy(self.weight_steps))}
        if self.searching:
            steps["architecture"] = int(ops.convert_to_numpy(self.arch_steps))
        return steps

    def train_step(self, data):
        features, labels = data
        if self.arch_mode == "authors":  # the weight step, then (after an epoch's last) the architecture step
            loss = self._weight_step(features, labels)
            self.weight_steps.assign_add(1)
            arch_loss, taken = self._maybe_arch_step()
        else:
            arch_loss, taken = self._maybe_arch_step()
            loss = self._weight_step(features, labels)
            self.weight_steps.assign_add(1)
        self.loss_tracker.update_state(loss)
        self.arch_loss_tracker.update_state(arch_loss, sample_weight=taken)
        return step_logs({m.name: m.result() for m in self.metrics})

    def test_step(self, data):
        features, labels = data
        _, loss = self.loss_of(features, labels, training=False)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


class _StageSchedule(keras.callbacks.Callback):
    """Enters each epoch's training stage (MDMTTrainer.enter_epoch)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.model.enter_epoch(epoch)


class _Untracked:
    """Holds an object out of reach of tf.train.Checkpoint, which saves trackable attributes
    only."""

    def __init__(self, value):
        self.value = value
