"""MLP: a stack of Dense -> (norm) -> activation -> (dropout) blocks."""
from __future__ import annotations

import keras

from mdmt_tf.layers._util import check_units, clone_initializer, register

NORMS = (None, "layer", "batch")


@register
class MLP(keras.layers.Layer):
    """Feed-forward block.

    Args:
      units: widths of the Dense layers, e.g. (512, 256).
      activation: activation after every layer (and its norm).
      norm: None, "layer" (LayerNormalization) or "batch" (BatchNormalization), after
        each Dense and before the activation.
      epsilon: the norm's variance epsilon (Keras' 1e-3 by default; torch uses 1e-5).
      dropout: rate after each activation (training only).
      activate_last: if False the last layer is linear (no norm, activation, dropout).
    """

    def __init__(self, units, activation="relu", norm=None, dropout=0.0, activate_last=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.units = check_units(units, "units", "MLP")
        if norm not in NORMS:
            raise ValueError(f"MLP: `norm` must be one of {NORMS}, received norm={norm!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"MLP: `dropout` must be in [0, 1), received dropout={dropout!r}")
        self.activation = keras.activations.get(activation)
        self.activation_name = activation
        self.norm, self.dropout_rate, self.activate_last = norm, float(dropout), bool(activate_last)
        self.epsilon = float(epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.dense_layers, self.norm_layers = [], []
        for i, width in enumerate(self.units):
            self.dense_layers.append(keras.layers.Dense(
                width, kernel_initializer=clone_initializer(self.kernel_initializer, i),
                bias_initializer=clone_initializer(self.bias_initializer, i), dtype=self.dtype_policy,
                name=f"dense_{i}"))
            last_linear = i == len(self.units) - 1 and not self.activate_last
            if norm == "layer" and not last_linear:
                self.norm_layers.append(keras.layers.LayerNormalization(epsilon=self.epsilon, dtype=self.dtype_policy,
                                                                        name=f"norm_{i}"))
            elif norm == "batch" and not last_linear:
                self.norm_layers.append(keras.layers.BatchNormalization(epsilon=self.epsilon, dtype=self.dtype_policy,
                                                                        name=f"norm_{i}"))
            else:
                self.norm_layers.append(None)
        self.dropout_layer = keras.layers.Dropout(self.dropout_rate,
                                                  dtype=self.dtype_policy) if self.dropout_rate else None

    def build(self, input_shape):
        shape = tuple(input_shape)
        for dense, norm in zip(self.dense_layers, self.norm_layers):
            dense.build(shape)
            shape = shape[:-1] + (dense.units,)
            if norm is not None:
                norm.build(shape)

    def call(self, x, training=None):
        last = len(self.dense_layers) - 1
        for i, (dense, norm) in enumerate(zip(self.dense_layers, self.norm_layers)):
            x = dense(x)
            if i == last and not self.activate_last:
                break
            if norm is not None:
                x = norm(x, training=training)
            x = self.activation(x)
            if self.dropout_layer is not None:
                x = self.dropout_layer(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)[:-1] + (self.units[-1],)

    def get_config(self):
        return {**super().get_config(), "units": list(self.units), "activation": self.activation_name,
                "norm": self.norm, "epsilon": self.epsilon, "dropout": self.dropout_rate,
                "activate_last": self.activate_last,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer)}
