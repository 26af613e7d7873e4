"""Parameter-server training (experimental): a custom loop for tables too big for one worker.

Keras 3's `fit` does not run under `tf.distribute.ParameterServerStrategy`, and
MultiWorkerMirroredStrategy keeps every variable (each embedding table and Adam's two
moments of it) whole on every worker. This module is the other path: a small multi-task
network whose embedding tables are split by hand into row shards held by the parameter
servers, trained by a custom loop that a `ClusterCoordinator` dispatches to the workers.

- `ShardedTable`: one logical `rows x dim` table as `num_shards` plain `tf.Variable`s; id i
  is row i // num_shards of shard i % num_shards. Created in a ParameterServerStrategy's
  scope, consecutive shards go round-robin to consecutive parameter servers. A lookup
  partitions the ids by shard, gathers each shard's rows where the shard lives (only those
  rows cross the network) and stitches them back in order.
- `ShardedAdam`: Adam in plain TF with the rule of `mdmt_tf.training.optimizers.RowSparseAdam`
  for the shards (the rows of a batch and only those rows of the moments m and v are
  updated; rows absent from a batch keep their values and moments) and Keras' Adam rule for
  the dense weights. Its moments are plain variables colocated with their variable; its
  step count is a plain int64 variable on a parameter server.
- `ShardedMultiTaskModel`: the sparse fields' tables, a shared bottom and one tower per task
  (Keras 3 `Dense` layers, which build and train under ParameterServerStrategy when built in
  its scope before the first step); the loss is the sum over tasks of the mean binary
  cross-entropy.
- `ShardedTrainer`: the training step as a `tf.function`, scheduled on the workers by a
  `ClusterCoordinator` (fed fixed batches or per-worker datasets), or called in process
  with no coordinator (the single-process reference, same code).

`build(config, strategy)` creates the model and optimizer in the strategy's scope.

Steps on a cluster are asynchronous: workers read and update the parameter servers' values
without waiting for one another, so a production run is not the synchronous run of the same
batches. `ShardedTrainer.train(..., sync=True)` joins after every step, which makes a run
reproducible (the tests compare it with the single-process run).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mdmt_tf.errors import ConfigError

Batch = tuple[Any, Any, Any]  # (ids [batch, fields] int, dense [batch, dense features] float, labels [batch, tasks])


def _tf_variable(variable: Any) -> tf.Variable:
    """The `tf.Variable` behind a Keras 3 variable (float32: no autocast), or `variable` itself."""
    return variable.value if isinstance(variable, keras.Variable) else variable


class ShardedTable(tf.Module):
    """One `rows x dim` embedding table split row-wise into `num_shards` plain variables.

    Id i lives in shard i % num_shards, at row i // num_shards, so shard k holds
    ceil((rows - k) / num_shards) rows. The initial values are `initial` (a `rows x dim`
    array) or, without it, normal(0, stddev) drawn per shard from (seed, k): a function of
    the seed and the shard count. Create it in a strategy's scope to place it there.
    """

    def __init__(self, rows: int, dim: int, num_shards: int, *, initial: Any = None, seed: int = 0,
                 stddev: float = 0.05, validate_ids: bool = True, name: str = "table"):
        super().__init__(name=name)
        if num_shards < 1:
            raise ConfigError(f"ShardedTable {name!r}: num_shards must be >= 1, got {num_shards}")
        if dim < 1:
            raise ConfigError(f"ShardedTable {name!r}: dim must be >= 1, got {dim}")
        if rows < num_shards:
            raise ConfigError(f"ShardedTable {name!r}: rows must be >= num_shards (no empty shard), got "
                              f"rows={rows}, num_shards={num_shards}")
        if initial is not None:
            initial = np.asarray(initial, dtype="float32")
            if initial.shape != (rows, dim):
                raise ConfigError(f"ShardedTable {name!r}: initial values must have shape {(rows, dim)}, "
                                  f"got {initial.shape}")
        self.rows, self.dim, self.num_shards = int(rows), int(dim), int(num_shards)
        self.validate_ids = validate_ids
        self.shards = [tf.Variable(self._initializer(k, initial, seed, stddev), name=f"{name}_shard_{k}",
                                   dtype=tf.float32)
                       for k in range(num_shards)]

    def _initializer(self, k: int, initial: Any, seed: int, stddev: float) -> Callable[[], tf.Tensor]:
        # a callable: under ParameterServerStrategy it runs on the shard's parameter server
        if initial is not None:
            values = initial[k::self.num_shards]
            return lambda: tf.constant(values)
        shape = [self.shard_rows(k), self.dim]
        return lambda: stddev * tf.random.stateless_normal(shape, seed=[seed, k], dtype=tf.float32)

    def shard_rows(self, k: int) -> int:
        """The number of rows of shard k."""
        return (self.rows - k + self.num_shards - 1) // self.num_shards

    def lookup(self, ids: Any) -> tf.Tensor:
        """The rows of `ids` (any shape, integer): a tensor of shape ids.shape + [dim]."""
        ids = tf.cast(tf.convert_to_tensor(ids), tf.int64)
        flat = tf.reshape(ids, [-1])
        checks = []
        if self.validate_ids:
            checks = [tf.debugging.assert_non_negative(flat, message=f"{self.name}: negative id"),
                      tf.debugging.assert_less(flat, tf.constant(self.rows, tf.int64),
                                               message=f"{self.name}: id >= rows ({self.rows})")]
        with tf.control_dependencies(checks):
            shard = tf.cast(flat % self.num_shards, tf.int32)
            local = flat // self.num_shards
        positions = tf.dynamic_partition(tf.range(tf.size(flat)), shard, self.num_shards)
        locals_ = tf.dynamic_partition(local, shard, self.num_shards)
        rows = [tf.gather(variable, local_ids) for variable, local_ids in zip(self.shards, locals_)]
        out = tf.dynamic_stitch(positions, rows)
        return tf.reshape(out, tf.concat([tf.shape(ids), [self.dim]], axis=0))

    def values(self) -> np.ndarray:
        """The whole logical table as one array (read on the chief from the shards)."""
        out = np.empty((self.rows, self.dim), dtype="float32")
        for k, variable in enumerate(self.shards):
            out[k::self.num_shards] = variable.numpy()
        return out


class ShardedAdam(tf.Module):
    """Adam on plain variables: RowSparseAdam's row-sparse rule for the table shards (which
    get `tf.IndexedSlices` gradients), Keras' Adam rule for the dense weights.

    Bias correction uses the global step count `iterations` (a plain int64 variable), as
    both Keras optimizers do. Create it in the strategy's scope: each moment is colocated
    with its variable (a shard's moments on the shard's parameter server).
    """

    def __init__(self, shards: Sequence[tf.Variable], dense: Sequence[Any], learning_rate: float = 1e-3,
                 beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7, name: str = "sharded_adam"):
        super().__init__(name=name)
        if not learning_rate > 0:
            raise ConfigError(f"ShardedAdam: learning_rate must be > 0, got {learning_rate}")
        if not (0 <= beta_1 < 1 and 0 <= beta_2 < 1):
            raise ConfigError(f"ShardedAdam: beta_1 and beta_2 must be in [0, 1), got {beta_1}, {beta_2}")
        self.learning_rate, self.beta_1, self.beta_2, self.epsilon = learning_rate, beta_1, beta_2, epsilon
        self.shards = list(shards)
        self.dense = [_tf_variable(v) for v in dense]
        strategy = tf.distribute.get_strategy()
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
        self.momentums, self.velocities = [], []
        for i, variable in enumerate(self.shards + self.dense):
            with strategy.extended.colocate_vars_with(variable):
                self.momentums.append(tf.Variable(tf.zeros(variable.shape, variable.dtype), trainable=False,
                                                  name=f"m_{i}"))
                self.velocities.append(tf.Variable(tf.zeros(variable.shape, variable.dtype), trainable=False,
                                                   name=f"v_{i}"))

    def apply(self, shard_grads: Sequence[Any], dense_grads: Sequence[Any]) -> None:
        """One step: the gradients of `shards` (IndexedSlices) and of `dense`, in their order."""
        if len(shard_grads) != len(self.shards) or len(dense_grads) != len(self.dense):
            raise ConfigError(f"ShardedAdam.apply: expected {len(self.shards)} shard and {len(self.dense)} dense "
                              f"gradients, got {len(shard_grads)} and {len(dense_grads)}")
        n = len(self.shards)
        for i, (grad, variable) in enumerate(zip(shard_grads, self.shards)):
            if grad is not None:
                self._sparse_step(grad, variable, self.momentums[i], self.velocities[i])
        for i, (grad, variable) in enumerate(zip(dense_grads, self.dense)):
            if grad is not None:
                self._dense_step(tf.convert_to_tensor(grad), variable, self.momentums[n + i], self.velocities[n + i])
        self.iterations.assign_add(1)

    def _alpha(self, dtype: tf.DType) -> tf.Tensor:
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        lr = tf.cast(self.learning_rate, dtype)
        return lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))

    def _sparse_step(self, gradient: Any, variable: tf.Variable, m: tf.Variable, v: tf.Variable) -> None:
        # RowSparseAdam.update_step, term for term
        if not isinstance(gradient, tf.IndexedSlices):
            raise ConfigError(f"ShardedAdam: a table shard's gradient must be tf.IndexedSlices (a gather), got "
                              f"{type(gradient).__name__} for {variable.name}")
        dtype = variable.dtype
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        alpha = self._alpha(dtype)
        rows, position = tf.unique(gradient.indices)
        grad = tf.math.unsorted_segment_sum(tf.cast(gradient.values, dtype), position, tf.shape(rows)[0])
        m_rows = beta_1 * tf.gather(m, rows) + (1 - beta_1) * grad
        v_rows = beta_2 * tf.gather(v, rows) + (1 - beta_2) * tf.square(grad)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_sub(tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), rows))

    def _dense_step(self, gradient: tf.Tensor, variable: tf.Variable, m: tf.Variable, v: tf.Variable) -> None:
        # keras.optimizers.Adam.update_step (amsgrad off), term for term
        dtype = variable.dtype
        gradient = tf.cast(gradient, dtype)
        alpha = self._alpha(dtype)
        m.assign_add((gradient - m) * (1 - self.beta_1))
        v.assign_add((tf.square(gradient) - v) * (1 - self.beta_2))
        variable.assign_sub(m * alpha / (tf.sqrt(v) + self.epsilon))


@dataclasses.dataclass(frozen=True)
class ShardedModelConfig:
    """The sharded multi-task model: `vocab` rows per sparse field (one table each), `dim`
    embedding width, `dense_features` float inputs, `tasks` binary tasks, the shared bottom's
    and each tower's hidden units, and the number of shards of every table."""

    vocab: tuple[int, ...]
    dim: int = 8
    dense_features: int = 0
    tasks: int = 2
    bottom_units: tuple[int, ...] = (32,)
    tower_units: tuple[int, ...] = (16,)
    num_shards: int = 2
    learning_rate: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if not self.vocab or any(int(r) < 1 for r in self.vocab):
            raise ConfigError(f"ShardedModelConfig: vocab must be a non-empty list of row counts >= 1, got "
                              f"{self.vocab!r}")
        if self.tasks < 1 or self.dense_features < 0:
            raise ConfigError(f"ShardedModelConfig: tasks must be >= 1 and dense_features >= 0, got "
                              f"tasks={self.tasks}, dense_features={self.dense_features}")
        if any(int(u) < 1 for u in (*self.bottom_units, *self.tower_units)):
            raise ConfigError(f"ShardedModelConfig: hidden units must be >= 1, got bottom_units="
                              f"{self.bottom_units}, tower_units={self.tower_units}")


class ShardedMultiTaskModel(tf.Module):
    """Sharded tables per sparse field, a shared bottom and per-task towers (Keras `Dense`).

    Inputs: ids [batch, fields] (field f's ids in [0, vocab[f])), dense [batch,
    dense_features]; output: logits [batch, tasks]. The layers are built on creation (a
    layer built inside a scheduled step would create variables on a worker).
    """

    def __init__(self, config: ShardedModelConfig, name: str = "sharded_multitask"):
        super().__init__(name=name)
        self.config = config
        c = config
        self.tables = [ShardedTable(rows, c.dim, c.num_shards, seed=c.seed + 7919 * f, name=f"table_{f}")
                       for f, rows in enumerate(c.vocab)]
        seeds = iter(range(c.seed * 1000 + 1, c.seed * 1000 + 1000))

        def dense(units: int, activation: str | None = "relu") -> keras.layers.Dense:
            return keras.layers.Dense(units, activation=activation, dtype="float32",
                                      kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)))

        width = len(c.vocab) * c.dim + c.dense_features
        self.bottom = [dense(u) for u in c.bottom_units]
        self.towers = [[dense(u) for u in c.tower_units] + [dense(1, None)] for _ in range(c.tasks)]
        for layer in self.bottom:
            layer.build((None, width))
            width = layer.units
        for tower in self.towers:
            inner = width
            for layer in tower:
                layer.build((None, inner))
                inner = layer.units

    @property
    def table_shards(self) -> list[tf.Variable]:
        """Every table's shard variables, table by table."""
        return [shard for table in self.tables for shard in table.shards]

    @property
    def dense_variables(self) -> list[tf.Variable]:
        """The `tf.Variable`s of the bottom and the towers."""
        layers = self.bottom + [layer for tower in self.towers for layer in tower]
        return [_tf_variable(w) for layer in layers for w in layer.weights]

    def __call__(self, ids: Any, dense: Any = None) -> tf.Tensor:
        ids = tf.convert_to_tensor(ids)
        parts = [table.lookup(ids[:, f]) for f, table in enumerate(self.tables)]
        if self.config.dense_features:
            parts.append(tf.cast(dense, tf.float32))
        x = tf.concat(parts, axis=-1)
        for layer in self.bottom:
            x = layer(x)
        logits = []
        for tower in self.towers:
            y = x
            for layer in tower:
                y = layer(y)
            logits.append(y)
        return tf.concat(logits, axis=-1)

    def loss(self, ids: Any, dense: Any, labels: Any) -> tf.Tensor:
        """The sum over tasks of the mean binary cross-entropy of the batch."""
        logits = self(ids, dense)
        labels = tf.cast(labels, tf.float32)
        per_task = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits), axis=0)
        return tf.reduce_sum(per_task)

    def values(self) -> dict[str, np.ndarray]:
        """Every value (whole tables and dense weights) as arrays, read on the chief."""
        out = {f"table_{f}": table.values() for f, table in enumerate(self.tables)}
        for i, variable in enumerate(self.dense_variables):
            out[f"dense_{i}"] = variable.numpy()
        return out


def build(config: ShardedModelConfig,
          strategy: tf.distribute.Strategy | None = None) -> tuple[ShardedMultiTaskModel, ShardedAdam]:
    """The model and its optimizer, created in `strategy`'s scope (None: the default strategy,
    one process). The tables' shards are created first and in order, so under
    ParameterServerStrategy shard k of table 0 goes to parameter server k % num_ps."""
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = ShardedMultiTaskModel(config)
        optimizer = ShardedAdam(model.table_shards, model.dense_variables, learning_rate=config.learning_rate)
    return model, optimizer


@dataclasses.dataclass
class TrainResult:
    """A run's per-step losses (in the order the steps were scheduled) and the optimizer's
    step count at its end."""

    losses: list[float]
    steps: int


class ShardedTrainer:
    """The custom training loop: `ClusterCoordinator.schedule` of a `tf.function` step on the
    workers (`coordinator` given, strategy a ParameterServerStrategy), or the same step called
    in process (no coordinator)."""

    def __init__(self, model: ShardedMultiTaskModel, optimizer: ShardedAdam,
                 strategy: tf.distribute.Strategy | None = None,
                 coordinator: tf.distribute.coordinator.ClusterCoordinator | None = None):
        if coordinator is not None and strategy is None:
            raise ConfigError("ShardedTrainer: a coordinator needs its ParameterServerStrategy (strategy=None given)")
        self.model, self.optimizer = model, optimizer
        self.strategy = strategy or tf.distribute.get_strategy()
        self.coordinator = coordinator
        self._step_on_batch = tf.function(self._step_on_batch_fn)
        self._step_on_iterator = tf.function(self._step_on_iterator_fn)

    def _replica_step(self, ids: Any, dense: Any, labels: Any) -> tf.Tensor:
        shards, dense_vars = self.model.table_shards, self.model.dense_variables
        with tf.GradientTape() as tape:
            loss = self.model.loss(ids, dense, labels)
        grads = tape.gradient(loss, shards + dense_vars)
        self.optimizer.apply(grads[:len(shards)], grads[len(shards):])
        return loss

    def _step_on_batch_fn(self, ids: Any, dense: Any, labels: Any) -> Any:
        return self.strategy.run(self._replica_step, args=(ids, dense, labels))

    def _step_on_iterator_fn(self, iterator: Any) -> Any:
        ids, dense, labels = next(iterator)
        return self.strategy.run(self._replica_step, args=(ids, dense, labels))

    def _run(self, function: Callable[..., Any], args: tuple, sync: bool) -> Any:
        if self.coordinator is None:
            return function(*args)
        value = self.coordinator.schedule(function, args=args)
        if sync:
            self.coordinator.join()
        return value

    def per_worker_iterator(self, dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset]) -> Any:
        """An iterator over `dataset_fn`'s batches (ids, dense, labels): one dataset per worker
        (`ClusterCoordinator.create_per_worker_dataset`), or one in process."""
        if self.coordinator is None:
            return iter(self.strategy.distribute_datasets_from_function(dataset_fn))

        def per_worker_dataset_fn():
            return self.strategy.distribute_datasets_from_function(dataset_fn)

        return iter(self.coordinator.create_per_worker_dataset(per_worker_dataset_fn))

    def train(self, *, batches: Iterable[Batch] | None = None, iterator: Any = None, steps: int | None = None,
              sync: bool = True) -> TrainResult:
        """Run steps: one per batch of `batches` (fixed batches, sent to whichever worker runs
        the step), or `steps` steps reading `iterator` (from `per_worker_iterator`).

        sync=True joins the cluster after every step (the steps run one after another, as in
        one process); sync=False schedules them all and joins at the end (asynchronous
        parameter-server training: workers run steps concurrently on stale values).
        """
        if (batches is None) == (iterator is None):
            raise ConfigError("ShardedTrainer.train: give exactly one of batches and iterator")
        if iterator is not None and (steps is None or steps < 1):
            raise ConfigError(f"ShardedTrainer.train: steps must be >= 1 with an iterator, got {steps}")
        values = []
        if batches is not None:
            for ids, dense, labels in batches:
                args = (tf.convert_to_tensor(ids), tf.convert_to_tensor(dense, tf.float32),
                        tf.convert_to_tensor(labels, tf.float32))
                values.append(self._run(self._step_on_batch, args, sync))
        else:
            for _ in range(int(steps or 0)):
                values.append(self._run(self._step_on_iterator, (iterator,), sync))
        if self.coordinator is not None:
            self.coordinator.join()
            losses = [float(v.fetch()) for v in values]
        else:
            losses = [float(v) for v in values]
        return TrainResult(losses=losses, steps=int(self.optimizer.iterations.numpy()))

    def checkpoint(self) -> tf.train.Checkpoint:
        """A checkpoint of the shards, dense weights, moments and step count (save it on the
        chief: it reads the variables from the parameter servers)."""
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)
