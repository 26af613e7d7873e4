"""Optimizers for large embedding tables.

RowSparseAdam is Adam whose update of a variable with a row-sparse gradient (an
`IndexedSlices`, which FieldEmbedding's lookups produce) touches only the rows in the
batch: it sums the gradient rows of repeated ids, reads those rows of the moments m and v,
updates them and the variable's rows, and writes them back. Keras 3's Adam turns the same
gradient into a dense update of every row of the table and of both moments, so a step's
cost grows with the vocabulary (10M users + 1M items at dimension 16: ~20x slower steps).

The one difference from Adam: the moments of rows absent from a batch do not decay, and
those rows do not move (Adam would keep moving them by their decaying momentum). This is
the convention of PyTorch's SparseAdam and TF-Addons' LazyAdam. When every row is in the
batch, or for a dense gradient (every other variable), it is Adam exactly; bias
correction uses the optimizer's global step count in both cases.
"""
from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from mdmt_tf.errors import ConfigError
from mdmt_tf.layers._util import row_source
from mdmt_tf.training.options import AUTO_ROWS


@keras.saving.register_keras_serializable(package="mdmt_tf")
class RowSparseAdam(keras.optimizers.Adam):
    """Adam with row-sparse updates for row-sparse gradients (see the module docstring)."""

    def __init__(self, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False,
                 name="row_sparse_adam", **kwargs):
        if amsgrad:
            raise ConfigError("RowSparseAdam: amsgrad is not supported (use keras.optimizers.Adam)")
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         amsgrad=False, name=name, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
        alpha = lr * ops.sqrt(1 - ops.power(beta_2, step)) / (1 - ops.power(beta_1, step))
        # one gradient row per distinct id (an id repeated in the batch sums its rows, as the
        # dense gradient would)
        rows, position = tf.unique(gradient.indices)
        grad = tf.math.unsorted_segment_sum(tf.cast(gradient.values, dtype), position, tf.shape(rows)[0])
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        m_rows = beta_1 * tf.gather(row_source(m), rows) + (1 - beta_1) * grad
        v_rows = beta_2 * tf.gather(row_source(v), rows) + (1 - beta_2) * tf.square(grad)
        self.assign(m, tf.IndexedSlices(m_rows, rows))
        self.assign(v, tf.IndexedSlices(v_rows, rows))
        self.assign_sub(variable, tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), rows))


def weight_optimizer(kind: str, learning_rate: float, table_rows: int, *, name: str = "weight_optimizer"):
    """The weight optimizer for `--embedding-optimizer kind`: "adam" (Keras' Adam), "row_sparse"
    (RowSparseAdam) or "auto" (RowSparseAdam when the model's embedding tables hold at least
    AUTO_ROWS rows, where it is faster; Adam below, where both cost the same and Adam's
    updates of absent rows are kept)."""
    if kind == "auto":
        kind = "row_sparse" if table_rows >= AUTO_ROWS else "adam"
    if kind == "row_sparse":
        return RowSparseAdam(learning_rate, name=name)
    if kind == "adam":
        return keras.optimizers.Adam(learning_rate, name=name)
    raise ConfigError(f"embedding optimizer must be one of auto, adam, row_sparse; got {kind!r}")

